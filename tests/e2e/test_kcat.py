"""kcat 1.7.1 (librdkafka 2.0.2): the strict old client."""
from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest

import kproto
from conftest import require_ferry
from helpers import (CODEC_ID, compressible, kcat, kcat_bin, kcat_consume, kcat_consume_until, topic_name,
                     wait_until)


def kcat_produce(bootstrap, topic, lines: list[str], *extra, partition=0):
    data = ("\n".join(lines) + "\n").encode()
    p = kcat("-b", bootstrap, "-P", "-t", topic, "-p", partition, "-X", "message.timeout.ms=30000",
             "-X", "socket.timeout.ms=10000", *extra, input=data)
    err = p.stderr.decode(errors="replace")
    assert "Delivery failed" not in err, err[-3000:]
    return p


def test_metadata_json(broker):
    t = topic_name("kcat-md")
    kcat_produce(broker.bootstrap, t, ["hello"])  # auto-creates the topic
    for args in (["-t", t], []):
        md = json.loads(kcat("-b", broker.bootstrap, "-L", "-J", *args).stdout)
        brokers = {b["id"]: b["name"] for b in md["brokers"]}
        assert list(brokers.values()) == [broker.bootstrap], md["brokers"]
        topics = {x["topic"]: x for x in md["topics"]}
        assert t in topics, f"{t} not in metadata {list(topics)}"
        tm = topics[t]
        assert "error" not in tm, tm
        parts = sorted(p["partition"] for p in tm["partitions"])
        assert parts == list(range(len(parts))) and parts, tm
        for p in tm["partitions"]:
            assert p["leader"] in brokers, p
            assert "error" not in p, p


def test_metadata_default_partitions(start_broker):
    b = start_broker("--default-partitions", "3")
    t = topic_name("kcat-md3")
    kcat_produce(b.bootstrap, t, ["x"], partition=2)
    md = json.loads(kcat("-b", b.bootstrap, "-L", "-J", "-t", t).stdout)
    (tm,) = [x for x in md["topics"] if x["topic"] == t]
    assert sorted(p["partition"] for p in tm["partitions"]) == [0, 1, 2]
    assert [r["payload"] for r in kcat_consume(b.bootstrap, t, 2)] == ["x"]
    assert kcat_consume(b.bootstrap, t, 0) == []


@pytest.mark.parametrize("acks", ["0", "1", "all"])
def test_produce_acks(broker, acks):
    t = topic_name(f"kcat-acks{acks}")
    n = 100
    lines = [f"key-{i}:val-{i}" for i in range(n)]
    kcat_produce(broker.bootstrap, t, lines, "-K", ":", "-X", f"acks={acks}", "-H", "dup=a", "-H", "dup=b",
                 "-H", "other=c")
    got = kcat_consume_until(broker.bootstrap, t, n)
    assert len(got) == n, f"expected exactly {n} records, got {len(got)}"
    assert [r["offset"] for r in got] == list(range(n))
    assert [r["key"] for r in got] == [f"key-{i}" for i in range(n)]
    assert [r["payload"] for r in got] == [f"val-{i}" for i in range(n)]
    for r in got:
        assert r["headers"] == ["dup", "a", "dup", "b", "other", "c"], r


@pytest.mark.parametrize("codec", ["none", "gzip", "snappy", "lz4", "zstd"])
def test_produce_compression(broker, codec):
    t = topic_name(f"kcat-{codec}")
    n = 500
    values = [compressible(i).decode() for i in range(n)]
    lines = [f"k{i}:{v}" for i, v in enumerate(values)]
    p = kcat_produce(broker.bootstrap, t, lines, "-K", ":", "-z", codec, "-X", "linger.ms=50",
                     "-X", "batch.num.messages=100", "-X", "acks=all", "-d", "msg,feature")
    debug = p.stderr.decode(errors="replace")
    declined = [l for l in debug.splitlines() if "does not support compression" in l]
    assert not declined, (
        f"librdkafka 2.0.2 sent {codec} batches UNCOMPRESSED because of the broker's ApiVersions: it "
        f"compresses gzip/snappy/lz4 only if the advertised Produce range includes v0 (Apache Kafka 4.x "
        f"keeps advertising Produce 0..13 for this reason, KAFKA-18659, and rejects v0-2 requests):\n"
        + "\n".join(declined[:1] + [l for l in debug.splitlines() if "ApiKey Produce" in l][:1]))
    got = kcat_consume(broker.bootstrap, t)
    assert [r["payload"] for r in got] == values
    assert [r["key"] for r in got] == [f"k{i}" for i in range(n)]
    assert [r["offset"] for r in got] == list(range(n))

    if broker.data_dir is None:  # external broker without FERRY_E2E_DATA_DIR
        return
    batches = kproto.segment_batches(broker.data_dir, t, 0)
    assert batches, "no batches in the segment files"
    assert sum(b.record_count for b in batches) == n
    codecs = {b.compression for b in batches}
    assert codecs == {CODEC_ID[codec]}, f"stored batch codecs {codecs}, client sent {codec} ({CODEC_ID[codec]})"
    expect = 0
    for b in batches:
        assert b.magic == 2
        assert b.crc_ok(), f"stored batch at offset {b.base_offset} fails its CRC-32C"
        assert b.base_offset == expect, f"batch base offset {b.base_offset}, expected {expect}"
        assert b.last_offset_delta == b.record_count - 1
        expect = b.last_offset + 1


def test_consume_offsets(broker):
    t = topic_name("kcat-off")
    kcat_produce(broker.bootstrap, t, [f"old-{i}" for i in range(10)], "-X", "acks=all")
    bs = broker.bootstrap
    assert [r["payload"] for r in kcat_consume(bs, t, 0, "beginning")] == [f"old-{i}" for i in range(10)]
    assert [r["payload"] for r in kcat_consume(bs, t, 0, "5")] == [f"old-{i}" for i in range(5, 10)]
    assert [r["payload"] for r in kcat_consume(bs, t, 0, "-3")] == ["old-7", "old-8", "old-9"]
    assert kcat_consume(bs, t, 0, "end") == []


def test_consume_from_end_sees_only_new(broker):
    """kcat -o end (no -e) started after 10 records exist must print only records produced later.
    Markers are produced one by one until the consumer has printed 3: no race on when it resolved 'end'."""
    t = topic_name("kcat-end")
    bs = broker.bootstrap
    kcat_produce(bs, t, [f"old-{i}" for i in range(10)], "-X", "acks=all")
    cons = subprocess.Popen([kcat_bin(), "-b", bs, "-C", "-t", t, "-p", "0", "-o", "end", "-c", "3", "-J", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(l.decode() for l in cons.stdout), daemon=True)
    reader.start()
    try:
        k = 0
        deadline = time.monotonic() + 60
        while cons.poll() is None and time.monotonic() < deadline:
            kcat_produce(bs, t, [f"new-{k}"], "-X", "acks=all")
            k += 1
            time.sleep(0.3)
        assert cons.poll() is not None, "kcat -o end never received 3 new records"
        reader.join(10)
    finally:
        if cons.poll() is None:
            cons.kill()
        cons.wait(10)
    recs = [json.loads(l) for l in lines if l.strip()]
    assert len(recs) == 3, (recs, cons.stderr.read())
    payloads = [r["payload"] for r in recs]
    assert all(p.startswith("new-") for p in payloads), f"-o end delivered old records: {payloads}"
    first = int(payloads[0].split("-")[1])
    assert payloads == [f"new-{first + j}" for j in range(3)]
    assert [r["offset"] for r in recs] == [10 + first + j for j in range(3)]


def test_consume_from_timestamp(broker):
    t = topic_name("kcat-ts")
    bs = broker.bootstrap
    kcat_produce(bs, t, [f"a-{i}" for i in range(5)], "-X", "acks=all")
    time.sleep(0.2)  # separates CreateTime of the two runs; checked below, not assumed
    kcat_produce(bs, t, [f"b-{i}" for i in range(5)], "-X", "acks=all")
    allr = kcat_consume(bs, t)
    assert [r["payload"] for r in allr] == [f"a-{i}" for i in range(5)] + [f"b-{i}" for i in range(5)]
    ts = [r["ts"] for r in allr]
    assert all(r["tstype"] == "create" for r in allr), allr[0]
    assert min(ts[5:]) > max(ts[:5]), f"precondition: timestamps not separated {ts}"

    for target in (ts[0], ts[5], ts[2], ts[0] - 1000):
        first = next(i for i, x in enumerate(ts) if x >= target)
        got = kcat_consume(bs, t, 0, f"s@{target}")
        assert [r["offset"] for r in got] == list(range(first, 10)), f"s@{target} (timestamps {ts})"
    assert kcat_consume(bs, t, 0, f"s@{max(ts) + 1}") == []
