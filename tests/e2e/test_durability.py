"""Crash durability: SIGKILL under load, torn segment tails, recovery."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kproto
from helpers import ck_consume, ck_consumer, ck_create_topic, ck_produce, topic_name, wait_until

from confluent_kafka import TopicPartition

HERE = Path(__file__).resolve().parent


def read_acks(path: Path) -> list[tuple[int, int, str]]:
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:  # a line being written may be partial: ignore it
            out.append((int(parts[0]), int(parts[1]), parts[2]))
    return out


def high_watermark(bootstrap, topic, partition=0) -> int:
    c = ck_consumer(bootstrap)
    try:
        return c.get_watermark_offsets(TopicPartition(topic, partition), timeout=15, cached=False)[1]
    finally:
        c.close()


def log_since_last_start(broker) -> str:
    text = broker.log_text()
    marker = f"===== ferry-e2e: start #{broker.starts}"
    return text[text.rfind(marker):] if marker in text else text


def test_sigkill_under_load_keeps_every_acked_record(start_broker, tmp_path):
    b = start_broker()
    t = topic_name("dur-load")
    ck_create_topic(b.bootstrap, t, 1)
    ack_file, stop_file = tmp_path / "acks.txt", tmp_path / "stop"
    out_file = tmp_path / "producer.out"
    with open(out_file, "wb") as out:
        prod = subprocess.Popen([sys.executable, str(HERE / "ack_producer.py"), b.bootstrap, t, str(ack_file),
                                 str(stop_file)], stdout=out, stderr=subprocess.STDOUT)
    try:
        t_start = time.monotonic()
        wait_until(lambda: len(read_acks(ack_file)) >= 500 and time.monotonic() - t_start >= 2, 60,
                   "500 acknowledged records and 2 s of load")
        b.kill()
        acked_at_kill = len(read_acks(ack_file))
        time.sleep(0.5)  # let the producer see the broken connections
        b.restart()
        wait_until(lambda: len(read_acks(ack_file)) >= acked_at_kill + 1000, 90,
                   f"1000 more acknowledgements after the restart (had {acked_at_kill} at kill)")
        stop_file.touch()
        prod.wait(timeout=120)
    finally:
        if prod.poll() is None:
            prod.kill()
            prod.wait(10)
    out = out_file.read_text(errors="replace")
    assert prod.returncode == 0 and "FATAL" not in out, f"producer failed (rc {prod.returncode}):\n{out[-3000:]}"

    acks = read_acks(ack_file)
    assert all(p == 0 for p, _, _ in acks)
    ack_offsets = [o for _, o, _ in acks]
    assert len(set(ack_offsets)) == len(ack_offsets), "two acknowledgements for the same offset"
    ack_values = [v for _, _, v in acks]
    assert len(set(ack_values)) == len(ack_values), "a record was acknowledged twice"

    hw = high_watermark(b.bootstrap, t)
    assert hw >= max(ack_offsets) + 1, f"high watermark {hw} below the highest acknowledged offset {max(ack_offsets)}"
    got = ck_consume(b.bootstrap, t, min_count=hw, timeout=120)
    assert [m.offset() for m in got] == list(range(len(got))), "offsets not contiguous from 0"
    values = [m.value().decode() for m in got]
    assert len(set(values)) == len(values), f"duplicates in the log: {len(values) - len(set(values))}"
    seqs = [int(v[2:]) for v in values]
    assert seqs == sorted(seqs), "values out of order in the log"
    missing = [(o, v) for _, o, v in acks if o >= len(values) or values[o] != v]
    assert not missing, (f"{len(missing)} acknowledged records missing or moved, e.g. {missing[:5]} "
                         f"(log has {len(values)} records)")


def produce_numbered(bootstrap, topic, start, n):
    items = [dict(value=f"r-{i:05d}-".encode() + b"x" * 60, partition=0) for i in range(start, start + n)]
    return ck_produce(bootstrap, topic, items, acks="all", linger_ms=5, batch_num_messages=50)


def expected_values(n):
    return [f"r-{i:05d}-".encode() + b"x" * 60 for i in range(n)]


def check_served(b, t, n):
    got = ck_consume(b.bootstrap, t, min_count=n, timeout=60)
    assert [m.offset() for m in got] == list(range(n))
    assert [m.value() for m in got] == expected_values(n)
    assert high_watermark(b.bootstrap, t) == n
    if n >= 5:  # an index lookup into the middle, after recovery
        mid = ck_consume(b.bootstrap, t, offset=n - 5, min_count=5)
        assert [(m.offset(), m.value()) for m in mid] == list(zip(range(n - 5, n), expected_values(n)[n - 5:]))


def continue_and_check(b, t, n):
    reports = produce_numbered(b.bootstrap, t, n, 10)
    assert [o for _, o, _ in reports] == list(range(n, n + 10)), "produce after recovery did not continue at the end"
    check_served(b, t, n + 10)
    batches = kproto.segment_batches(b.data_dir, t, 0)  # strict: no garbage left in any segment
    assert sum(x.record_count for x in batches) == n + 10


@pytest.mark.parametrize("tear", ["garbage", "mid_batch"])
def test_torn_active_segment_is_truncated(start_broker, tear):
    b = start_broker("--segment-bytes", 16384)
    t = topic_name(f"dur-{tear}")
    ck_create_topic(b.bootstrap, t, 1)
    reports = produce_numbered(b.bootstrap, t, 0, 1000)
    assert [o for _, o, _ in reports] == list(range(1000))
    b.kill()

    segs = kproto.segment_logs(b.data_dir, t, 0)
    assert len(segs) >= 2, f"--segment-bytes 16384 with ~100 KiB of data left {len(segs)} segment(s)"
    active = segs[-1]
    data = active.read_bytes()
    batches, end = kproto.parse_batches(data, strict=True)
    assert batches and sum(x.record_count for x in kproto.segment_batches(b.data_dir, t, 0)) == 1000
    if tear == "garbage":
        with open(active, "ab") as f:
            f.write(b"\xde\xad\xbe\xef" * 7 + b"\x01\x02")  # 30 bytes
        expect = 1000
    else:
        last = batches[-1]
        with open(active, "r+b") as f:
            f.truncate(last.position + last.total_len // 2)
        expect = last.base_offset

    b.restart()
    log = log_since_last_start(b)
    lines = [l for l in log.splitlines() if re.search("truncat", l, re.I)]
    assert any(active.name in l and "WARN" in l for l in lines), \
        f"no WARN line mentioning truncation of {active.name}; truncation lines: {lines}"
    check_served(b, t, expect)
    continue_and_check(b, t, expect)


def test_clean_kill_restart_keeps_everything(start_broker):
    b = start_broker("--segment-bytes", 16384)
    t = topic_name("dur-clean")
    ck_create_topic(b.bootstrap, t, 1)
    produce_numbered(b.bootstrap, t, 0, 600)
    b.kill()
    b.restart()
    check_served(b, t, 600)
    continue_and_check(b, t, 600)
    b.restart()  # and once more, with the appended data
    check_served(b, t, 610)


def test_idempotent_producer_state_in_an_older_segment_survives_a_sigkill(start_broker):
    """A producer's last batch lies in a segment that rolled before the broker was SIGKILLed:
    the producer snapshot written at the roll keeps its state, so after the restart its retry
    is answered with the original offset (not written twice), an older epoch is fenced, and a
    gap in its sequence is refused."""
    b = start_broker("--segment-bytes", 16384)
    t = topic_name("dur-pstate")
    ck_create_topic(b.bootstrap, t, 1)
    pid, epoch = 4242, 3
    now = int(time.time() * 1000)  # producers silent for a day expire, by their batches' times
    mine = kproto.build_batch([b"a", b"b", b"c"], producer_id=pid, producer_epoch=epoch, base_sequence=0,
                              base_timestamp=now)
    c = kproto.Conn(b.bootstrap)
    assert c.produce(t, 0, mine) == (0, 0)
    # Others write until the log has rolled past it.
    produce_numbered(b.bootstrap, t, 0, 600)
    assert len(kproto.segment_logs(b.data_dir, t, 0)) >= 2
    c.close()
    b.kill()
    b.restart()
    c = kproto.Conn(b.bootstrap)
    try:
        assert c.produce(t, 0, mine) == (0, 0), "the retry is answered with its original offset"
        older = kproto.build_batch([b"z"], producer_id=pid, producer_epoch=epoch - 1, base_sequence=3,
                                   base_timestamp=now)
        assert c.produce(t, 0, older)[0] == 47  # INVALID_PRODUCER_EPOCH
        gap = kproto.build_batch([b"z"], producer_id=pid, producer_epoch=epoch, base_sequence=5,
                                 base_timestamp=now)
        assert c.produce(t, 0, gap)[0] == 45  # OUT_OF_ORDER_SEQUENCE_NUMBER
        nxt = kproto.build_batch([b"d"], producer_id=pid, producer_epoch=epoch, base_sequence=3,
                                 base_timestamp=now)
        err, base = c.produce(t, 0, nxt)
        assert err == 0 and base == 603, (err, base)
    finally:
        c.close()
    assert sum(x.record_count for x in kproto.segment_batches(b.data_dir, t, 0)) == 604
