"""Client-side helpers shared by the e2e tests: confluent-kafka, kcat, Kafka's Java tools."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

PEERS_HOME = Path(os.environ.get("PEERS_HOME", Path.home() / ".cache" / "ferry-peers"))
PEERS_LIB = Path(os.environ.get("FERRY_PEERS_LIB", "/work/shared/peers/lib.sh"))

CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]
CODEC_ID = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}


def topic_name(prefix: str) -> str:
    return f"e2e-{prefix}-{uuid.uuid4().hex[:8]}"


def wait_until(fn, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def compressible(i: int, n: int = 120) -> bytes:
    return (f"value-{i:06d}-" + "abcdefgh" * (n // 8)).encode()


# --------------------------------------------------------------------------- confluent-kafka

def ck_producer(bootstrap: str, **conf):
    from confluent_kafka import Producer
    base = {"bootstrap.servers": bootstrap, "message.timeout.ms": 30000, "socket.timeout.ms": 10000}
    base.update({k.replace("_", "."): v for k, v in conf.items()})
    return Producer(base)


def ck_produce(bootstrap: str, topic: str, items: list[dict], timeout: float = 60, **conf) -> list[tuple]:
    """items: dicts of produce() kwargs (value, key, headers, timestamp, partition).
    Returns delivery reports [(partition, offset, value)] in delivery order; fails on any error."""
    p = ck_producer(bootstrap, **conf)
    reports, errors = [], []

    def cb(err, msg):
        if err is not None:
            errors.append((err, msg.value()))
        else:
            reports.append((msg.partition(), msg.offset(), msg.value()))

    for it in items:
        while True:
            try:
                p.produce(topic, on_delivery=cb, **it)
                break
            except BufferError:
                p.poll(0.1)
        p.poll(0)
    left = p.flush(timeout)
    assert left == 0, f"{left} messages still undelivered after {timeout}s"
    assert not errors, f"delivery errors: {errors[:5]} (+{max(0, len(errors) - 5)} more)"
    assert len(reports) == len(items)
    return reports


def ck_consumer(bootstrap: str, **conf):
    from confluent_kafka import Consumer
    base = {"bootstrap.servers": bootstrap, "group.id": "e2e-" + uuid.uuid4().hex[:8],
            "enable.auto.commit": False, "enable.auto.offset.store": False,
            "auto.offset.reset": "error", "enable.partition.eof": True, "socket.timeout.ms": 10000}
    base.update({k.replace("_", "."): v for k, v in conf.items()})
    return Consumer(base)


def ck_consume(bootstrap: str, topic: str, partition: int = 0, offset: int = 0, min_count: int = 0,
               timeout: float = 30, **conf) -> list:
    """assign() at `offset` and read until end-of-partition with at least min_count messages."""
    from confluent_kafka import KafkaError, TopicPartition
    c = ck_consumer(bootstrap, **conf)
    msgs = []
    try:
        c.assign([TopicPartition(topic, partition, offset)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None:
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    if len(msgs) >= min_count:
                        return msgs
                    continue
                raise AssertionError(f"consumer error: {m.error()}")
            msgs.append(m)
        raise AssertionError(f"timed out after {timeout}s: consumed {len(msgs)} of at least {min_count} "
                             f"from {topic}[{partition}]@{offset}")
    finally:
        c.close()


def ck_read_keyed(bootstrap: str, topic: str, partition: int = 0, timeout: float = 60, **conf) -> dict:
    """Every record of a partition from its log start to its end: {offset: (key, value)}. A
    consumer error raises AssertionError (callers that wait through a leader change catch it).
    `conf`: more consumer settings (e.g. isolation_level="read_uncommitted")."""
    from confluent_kafka import KafkaError, TopicPartition
    c = ck_consumer(bootstrap, auto_offset_reset="earliest", **conf)
    out = {}
    try:
        c.assign([TopicPartition(topic, partition, -2)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None:
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    return out
                raise AssertionError(f"consumer error: {m.error()}")
            out[m.offset()] = (m.key(), m.value())
        raise AssertionError(f"did not reach the end of {topic}[{partition}] in {timeout}s")
    finally:
        c.close()


def ck_admin(bootstrap: str):
    from confluent_kafka.admin import AdminClient
    return AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 10000})


def ck_create_topic(bootstrap: str, topic: str, partitions: int = 1):
    from confluent_kafka.admin import NewTopic
    admin = ck_admin(bootstrap)  # keep a reference: a destroyed handle fails its futures
    fs = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)], operation_timeout=20)
    fs[topic].result(30)
    wait_until(lambda: partition_count(bootstrap, topic) == partitions, 30, f"{topic} with {partitions} partitions")


def partition_count(bootstrap: str, topic: str) -> int:
    # list all topics: a Metadata request naming the topic could auto-create it
    md = ck_admin(bootstrap).list_topics(timeout=15)
    t = md.topics.get(topic)
    if t is None or t.error is not None:
        return 0
    return len(t.partitions)


# --------------------------------------------------------------------------- kcat

def kcat_bin() -> str:
    k = shutil.which("kcat") or shutil.which("kafkacat")
    if not k:
        pytest.fail("kcat is not installed")
    return k


def kcat(*args, input: bytes | None = None, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [kcat_bin(), *map(str, args)]
    p = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{shlex.join(cmd)} exited {p.returncode}\nstdout: {p.stdout[-2000:]!r}\n"
                             f"stderr: {p.stderr.decode(errors='replace')[-3000:]}")
    return p


def kcat_consume(bootstrap: str, topic: str, partition: int = 0, offset="beginning", *extra,
                 timeout: float = 60) -> list[dict]:
    """kcat -C ... -e -J: one JSON dict per record."""
    p = kcat("-b", bootstrap, "-C", "-t", topic, "-p", partition, "-o", offset, "-e", "-J", "-q",
             "-X", "socket.timeout.ms=10000", *extra, timeout=timeout)
    return [json.loads(line) for line in p.stdout.decode().splitlines() if line.strip()]


def kcat_consume_until(bootstrap: str, topic: str, n: int, partition: int = 0, timeout: float = 45) -> list[dict]:
    """Consume from the beginning until at least n records are there (acks=0 may land late)."""
    deadline = time.monotonic() + timeout
    got = []
    while time.monotonic() < deadline:
        try:
            got = kcat_consume(bootstrap, topic, partition, "beginning")
        except AssertionError:
            got = []  # topic may not be known yet
        if len(got) >= n:
            return got
        time.sleep(0.3)
    raise AssertionError(f"only {len(got)} of {n} records on {topic}[{partition}] after {timeout}s")


# --------------------------------------------------------------------------- Apache Kafka Java tools

class JavaTools:
    """Runs Kafka 4.4 tool classes the way /work/shared/peers/lib.sh's kafka_tool does."""

    def __init__(self):
        script = (f'. {shlex.quote(str(PEERS_LIB))}; require_kafka >/dev/null; '
                  'printf "%s\\n" "JAVA_BIN=$JAVA_BIN" "KAFKA_HOME_DIR=$KAFKA_HOME_DIR" '
                  '"CONSOLE_PRODUCER=$CONSOLE_PRODUCER" "CONSOLE_CONSUMER=$CONSOLE_CONSUMER" "TOPIC_CMD=$TOPIC_CMD"')
        env = dict(os.environ, PEERS_HOME=str(PEERS_HOME))
        p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"require_kafka failed: {p.stderr[-2000:]}")
        self.env = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)

    def run(self, cls_var: str, *args, input: bytes | None = None, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess:
        cls = self.env.get(cls_var)
        if not cls:
            pytest.skip(f"{cls_var} not found in this Kafka installation")
        script = f'. {shlex.quote(str(PEERS_LIB))}; require_kafka >/dev/null; kafka_tool "$@"'
        env = dict(os.environ, PEERS_HOME=str(PEERS_HOME), JAVA_BIN_OVERRIDE=self.env["JAVA_BIN"])
        cmd = ["bash", "-c", script, "kafka_tool", cls, *map(str, args)]
        p = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout, env=env)
        if check and p.returncode != 0:
            raise AssertionError(f"{cls} {shlex.join(map(str, args))} exited {p.returncode}\n"
                                 f"stdout: {p.stdout.decode(errors='replace')[-2000:]}\n"
                                 f"stderr: {p.stderr.decode(errors='replace')[-4000:]}")
        return p


def kafka_installed() -> bool:
    kh = PEERS_HOME / "opt" / f"kafka-{os.environ.get('KAFKA_VERSION', '4.4.0')}"
    return (kh / ".installed").is_file() and (kh / "classes.env").is_file()
