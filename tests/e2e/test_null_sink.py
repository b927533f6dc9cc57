"""The null sink (benches/null_sink.rs), the instrument scripts/bench-broker uses to measure the
load tools' own ceiling: real clients must be able to produce to it and read its served batches,
or the benchmark's ceiling column would measure a broken server."""
from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import REPO, free_port, port_open
from helpers import ck_consume, ck_produce

SINK = Path(REPO) / "target" / "release" / "examples" / "null-sink"


@pytest.fixture
def sink():
    if not SINK.exists():
        pytest.fail(f"{SINK} is missing: cargo build --release --example null-sink")
    port = free_port()
    proc = subprocess.Popen([str(SINK), "--listen", f"127.0.0.1:{port}", "--serve-records", "1000",
                             "--record-size", "100"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not port_open(port):
        assert proc.poll() is None, f"null-sink exited: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "null-sink did not listen within 20 s"
        time.sleep(0.1)
    yield f"127.0.0.1:{port}"
    proc.kill()
    proc.wait()


def test_producers_get_consecutive_offsets(sink):
    t = "sink-" + uuid.uuid4().hex[:6]
    reports = ck_produce(sink, t, [dict(value=b"v%d" % i, partition=0) for i in range(500)], acks="all",
                         linger_ms=5, batch_num_messages=64)
    assert sorted(o for _, o, _ in reports) == list(range(500))


def test_consumers_read_the_served_batches(sink):
    got = ck_consume(sink, "served", min_count=1000)
    assert len(got) >= 1000
    assert [m.offset() for m in got] == list(range(len(got)))
    assert all(m.value() == b"x" * 100 for m in got)


def test_a_group_consumer_joins_and_reads(sink):
    from confluent_kafka import Consumer
    c = Consumer({"bootstrap.servers": sink, "group.id": "g-" + uuid.uuid4().hex[:6],
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        c.subscribe(["served-group"])
        n, deadline = 0, time.monotonic() + 30
        while n < 1000 and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and not m.error():
                assert m.offset() == n
                n += 1
        assert n == 1000, f"read {n} of 1000 records through a consumer group"
        c.commit(asynchronous=False)
    finally:
        c.close()
