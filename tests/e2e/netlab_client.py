"""Kafka client steps that test_netlab.py runs *inside* a netlab region (network namespace), as
`regions.sh exec N python netlab_client.py CMD ...`: the lab's namespaces are not reachable from
the root namespace, so every client has to run in one of them. Output is JSON on stdout (or in
the file named); exit code 0 on success.

  produce BS TOPIC START COUNT OUT [RATE] [STOP]
      COUNT records keyed k<i> (i = START, START+1, ...) with value value(i), idempotent,
      acks=all; RATE records/s (0 = as fast as possible). COUNT 0: produce until the file STOP
      exists, then as many more records as the number written in it, and stop. OUT: JSON list of
      [partition, offset, i].
  ends BS TOPIC PARTITIONS
      JSON list of the log end offsets (high watermarks) of partitions 0..PARTITIONS-1.
  dump BS TOPIC PARTITIONS OUT
      every record of every partition, from offset 0 to the end offset read at start:
      OUT = {"P": [[offset, key, value], ...]} (key and value as latin-1 strings).
"""
from __future__ import annotations

import json
import sys
import time


def value(i: int) -> bytes:
    return (f"value-{i:07d}-" + "netlab" * 12).encode()


def produce(bs, topic, start, count, out, rate="0", stop=""):
    import itertools
    import os
    from confluent_kafka import Producer
    start, count, rate = int(start), int(count), float(rate)
    assert count > 0 or stop, "COUNT 0 needs a STOP file"
    p = Producer({"bootstrap.servers": bs, "enable.idempotence": True, "acks": "all", "linger.ms": 5,
                  "message.timeout.ms": 60000, "socket.timeout.ms": 10000})
    acked, errors = [], []

    def cb(err, msg):
        if err is not None:
            errors.append(str(err))
        else:
            acked.append([msg.partition(), msg.offset(), int(msg.key()[1:])])

    t0 = time.monotonic()
    end = start + count if count > 0 else None
    for n, i in enumerate(itertools.count(start)):
        if end is None and n % 100 == 0 and os.path.exists(stop):
            with open(stop) as f:
                end = i + int(f.read().strip() or 0)
        if end is not None and i >= end:
            break
        if rate > 0:
            due = t0 + n / rate
            while time.monotonic() < due:
                p.poll(min(0.005, max(0.0, due - time.monotonic())))
        while True:
            try:
                p.produce(topic, key=f"k{i}".encode(), value=value(i), on_delivery=cb)
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    left = p.flush(120)
    with open(out, "w") as f:
        json.dump(acked, f)
    if left or errors:
        print(f"undelivered={left} errors={errors[:5]}", file=sys.stderr)
        sys.exit(1)


def ends(bs, topic, partitions):
    """A partition the broker does not know (yet) counts as empty: 0."""
    from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
    c = Consumer({"bootstrap.servers": bs, "group.id": "netlab-ends", "enable.auto.commit": False})
    out = []
    try:
        for p in range(int(partitions)):
            try:
                out.append(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1])
            except KafkaException as e:
                if e.args[0].code() not in (KafkaError._UNKNOWN_PARTITION, KafkaError._UNKNOWN_TOPIC,
                                            KafkaError.UNKNOWN_TOPIC_OR_PART):
                    raise
                out.append(0)
    finally:
        c.close()
    print(json.dumps(out))


def dump(bs, topic, partitions, out):
    from confluent_kafka import Consumer, KafkaError, TopicPartition
    c = Consumer({"bootstrap.servers": bs, "group.id": "netlab-dump", "enable.auto.commit": False,
                  "enable.partition.eof": True})
    result = {}
    try:
        for p in range(int(partitions)):
            end = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            recs = []
            if end > 0:
                c.assign([TopicPartition(topic, p, 0)])
                deadline = time.monotonic() + 120
                while len(recs) < end and time.monotonic() < deadline:
                    for m in c.consume(1000, 1.0):
                        if m.error():
                            if m.error().code() == KafkaError._PARTITION_EOF:
                                continue
                            raise SystemExit(f"partition {p}: {m.error()}")
                        if m.offset() < end:
                            recs.append([m.offset(), m.key().decode("latin-1"), m.value().decode("latin-1")])
                c.unassign()
            result[str(p)] = recs
    finally:
        c.close()
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    {"produce": produce, "ends": ends, "dump": dump}[sys.argv[1]](*sys.argv[2:])
