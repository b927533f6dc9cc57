"""Compacted topics with real clients (confluent-kafka): overwrites and tombstones read back as
the latest value per key at their original offsets once the cleaner has run; tombstones go after
delete.retention.ms; records without a key are refused; SIGKILL while the cleaner works loses
nothing; DescribeConfigs shows the policy and DeleteRecords is refused on a compact-only topic.

The broker runs with a short cleaner interval (broker.toml); the topics set short segment and
lag settings, as users of small test topics do."""
from __future__ import annotations

import random
import time

import pytest

from helpers import ck_admin, ck_consumer, ck_producer, ck_read_keyed, topic_name, wait_until

COMPACT = {
    "cleanup.policy": "compact",
    "segment.bytes": "4096",
    "segment.ms": "300",
    "min.cleanable.dirty.ratio": "0.01",
    "min.compaction.lag.ms": "0",
    "delete.retention.ms": "2000",
}


@pytest.fixture
def broker(start_broker, tmp_path):
    conf = tmp_path / "broker.toml"
    conf.write_text('cleaner_interval = "300ms"\n')
    return start_broker("--config", str(conf))


def create(bootstrap: str, topic: str, configs: dict):
    from confluent_kafka.admin import NewTopic
    admin = ck_admin(bootstrap)
    fs = admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1, config=configs)],
                             operation_timeout=20)
    fs[topic].result(30)


def produce(bootstrap: str, topic: str, items: list[tuple[bytes, bytes | None]]) -> list[int]:
    """Produce (key, value) in order; returns each one's offset."""
    p = ck_producer(bootstrap, linger_ms=5, enable_idempotence=True, batch_size=16384)
    offsets: dict[int, int] = {}
    errors = []

    def cb(i):
        def done(err, msg):
            if err is not None:
                errors.append(err)
            else:
                offsets[i] = msg.offset()
        return done

    for i, (k, v) in enumerate(items):
        while True:
            try:
                p.produce(topic, key=k, value=v, partition=0, on_delivery=cb(i))
                break
            except BufferError:
                p.poll(0.1)
        p.poll(0)
    assert p.flush(60) == 0
    assert not errors, errors[:3]
    return [offsets[i] for i in range(len(items))]


def read_all(bootstrap: str, topic: str) -> dict[int, tuple[bytes, bytes | None]]:
    """Every record from the beginning to the end: offset -> (key, value)."""
    return ck_read_keyed(bootstrap, topic)


def latest_per_key(items, offsets, tombstones_stay: bool) -> dict[int, tuple]:
    last = {}
    for (k, v), o in zip(items, offsets):
        last[k] = (o, v)
    return {o: (k, v) for k, (o, v) in last.items() if v is not None or tombstones_stay}


def roll_and_flush(bootstrap: str, topic: str, key: bytes = b"~roll") -> list[int]:
    """Wait past segment.ms and write one record, so everything before it sits in closed
    segments the cleaner may compact (the active segment never is); returns its offset."""
    time.sleep(0.5)
    return produce(bootstrap, topic, [(key, b"x")])


def test_a_compacted_topic_reads_back_the_latest_value_per_key_at_its_offset(broker):
    t = topic_name("compact")
    create(broker.bootstrap, t, COMPACT)
    rng = random.Random(7)
    items = []
    for i in range(3000):
        k = b"key-%03d" % rng.randrange(60)
        v = None if rng.random() < 0.1 else b"value-%05d-" % i + b"x" * rng.randrange(40)
        items.append((k, v))
    offsets = produce(broker.bootstrap, t, items)
    assert offsets == list(range(3000)), "offsets are assigned in order"
    produced = dict(zip(offsets, items))
    roll = roll_and_flush(broker.bootstrap, t)

    # The cleaner runs: every record still there is what was written at its offset, and the
    # log is exactly the latest value per key (tombstones too, for now) plus the last write.
    want = latest_per_key(items, offsets, tombstones_stay=True)
    want[roll[0]] = (b"~roll", b"x")
    got = wait_until(lambda: (lambda g: g if g == want else None)(read_all(broker.bootstrap, t)),
                     60, "the compacted log")
    for o, r in got.items():
        if o in produced:
            assert produced[o] == r, f"offset {o} holds what was written there"

    # delete.retention.ms later, the tombstones are gone too; the values stay where they were.
    roll2 = roll_and_flush(broker.bootstrap, t, b"~roll-2")
    want = latest_per_key(items, offsets, tombstones_stay=False)
    want[roll[0]] = (b"~roll", b"x")
    want[roll2[0]] = (b"~roll-2", b"x")
    wait_until(lambda: read_all(broker.bootstrap, t) == want, 60, "the tombstones to go")

    # A consumer at an offset the cleaner removed reads on from the next record there.
    from confluent_kafka import TopicPartition
    c = ck_consumer(broker.bootstrap)
    try:
        gone = next(o for o in range(3000) if o not in want)
        c.assign([TopicPartition(t, 0, gone)])
        m = wait_until(lambda: (lambda m: m if m is not None and m.error() is None else None)(c.poll(0.5)),
                       30, "a record after a gap")
        assert m.offset() == min(o for o in want if o > gone)
    finally:
        c.close()

    # The same after a restart.
    broker.kill()
    broker.start()
    assert read_all(broker.bootstrap, t) == want


def test_records_without_a_key_are_refused_and_compact_only_topics_refuse_delete_records(broker):
    from confluent_kafka import KafkaException, TopicPartition
    from confluent_kafka.admin import ConfigResource
    t = topic_name("compact-keyless")
    create(broker.bootstrap, t, {"cleanup.policy": "compact"})
    produce(broker.bootstrap, t, [(b"k", b"v")])
    p = ck_producer(broker.bootstrap)
    errs = []
    p.produce(t, value=b"no key", partition=0, on_delivery=lambda err, msg: errs.append(err))
    p.flush(30)
    assert len(errs) == 1 and errs[0] is not None, errs
    assert errs[0].name() == "INVALID_RECORD", errs[0]
    assert read_all(broker.bootstrap, t) == {0: (b"k", b"v")}, "nothing of the refused batch was kept"

    admin = ck_admin(broker.bootstrap)
    res = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, t)])
    configs = list(res.values())[0].result(30)
    assert configs["cleanup.policy"].value == "compact"
    assert configs["delete.retention.ms"].value == "86400000"
    with pytest.raises(KafkaException, match="POLICY_VIOLATION"):
        list(admin.delete_records([TopicPartition(t, 0, 1)]).values())[0].result(30)

    # Bad compaction settings are refused by name, and nothing changes.
    from confluent_kafka.admin import NewTopic
    fs = admin.create_topics([NewTopic(topic_name("bad"), 1, 1, config={"min.cleanable.dirty.ratio": "7"})])
    with pytest.raises(KafkaException, match="min.cleanable.dirty.ratio"):
        list(fs.values())[0].result(30)


def test_sigkill_while_the_cleaner_works_loses_nothing(broker):
    """Write while the broker is SIGKILLed again and again: the cleaner compacts the segments
    the writes close, so kills land before, during and after passes and their swaps."""
    import threading
    t = topic_name("compact-kill")
    create(broker.bootstrap, t, dict(COMPACT, **{"segment.bytes": "65536"}))
    rng = random.Random(11)
    items = [(b"key-%04d" % rng.randrange(500), b"v%06d-" % i + b"y" * 200) for i in range(60000)]
    result: dict = {}

    def write():
        try:
            result["offsets"] = produce(broker.bootstrap, t, items)
        except BaseException as e:  # reported below
            result["error"] = e

    w = threading.Thread(target=write)
    w.start()
    kills = 0
    while w.is_alive() and kills < 6:
        time.sleep(rng.uniform(0.4, 1.0))
        broker.kill()
        broker.start()
        kills += 1
    w.join(120)
    assert "error" not in result, result.get("error")
    offsets = result["offsets"]
    produced = dict(zip(offsets, items))
    roll = roll_and_flush(broker.bootstrap, t)
    want = latest_per_key(items, offsets, tombstones_stay=True)
    want[roll[0]] = (b"~roll", b"x")
    for _ in range(2):
        got = read_all(broker.bootstrap, t)
        for o, r in got.items():
            if o != roll[0]:
                assert produced[o] == r, f"offset {o} holds what was written there"
        missing = [o for o in want if o not in got]
        assert not missing, f"latest records lost: {missing[:5]}"
        broker.kill()
        broker.start()
    wait_until(lambda: read_all(broker.bootstrap, t) == want, 90, "the compacted log after the kills")


def test_transactions_in_a_compacted_topic(broker):
    """Kafka's cleaner rules for transactions (a Kafka Streams changelog is compacted and
    written in transactions): an aborted transaction's records go whole, a committed
    transaction's older values compact away like any other, the markers stay, and nothing at
    or past an open transaction's first offset is cleaned until it ends."""
    from confluent_kafka import Producer
    t = topic_name("compact-txn")
    create(broker.bootstrap, t, COMPACT)
    p = Producer({"bootstrap.servers": broker.bootstrap, "transactional.id": "compact-txn",
                  "linger.ms": 5, "transaction.timeout.ms": 300000})
    p.init_transactions(30)

    def txn(values: dict[bytes, bytes], commit: bool):
        p.begin_transaction()
        for k, v in values.items():
            p.produce(t, key=k, value=v, partition=0)
        p.flush(30)
        if commit:
            p.commit_transaction(30)
        else:
            p.abort_transaction(30)

    keys = [b"a", b"b", b"c", b"d", b"e"]
    txn({k: b"c1" for k in keys}, True)
    txn({k: b"aborted" for k in keys}, False)
    txn({b"a": b"c3", b"b": b"c3"}, True)
    # An open transaction: it overwrites c, but its outcome is not known yet. Past segment.ms,
    # so it starts a new segment and the three transactions before it lie in a closed one (the
    # segment holding the last stable offset is never cleaned).
    time.sleep(0.5)
    p.begin_transaction()
    p.produce(t, key=b"c", value=b"open", partition=0)
    p.flush(30)
    time.sleep(0.5)
    roll = produce(broker.bootstrap, t, [(b"~roll", b"x")])  # plain, after the open one
    assert roll

    def values(isolation: str) -> list[tuple]:
        return sorted((k, v) for k, v in ck_read_keyed(broker.bootstrap, t, isolation_level=isolation).values())

    # The aborted records and the overwritten c1 of a and b go; c's c1 stays (the open
    # transaction's overwrite lies past the last stable offset, so it is not mapped).
    want = [(b"a", b"c3"), (b"b", b"c3"), (b"c", b"c1"), (b"c", b"open"), (b"d", b"c1"),
            (b"e", b"c1"), (b"~roll", b"x")]
    seen = []
    try:
        wait_until(lambda: seen.append(values("read_uncommitted")) or seen[-1] == want, 60,
                   "the cleaner applies the transaction rules")
    except AssertionError:
        raise AssertionError(f"read_uncommitted: {seen[-1]}")
    assert values("read_committed") == [(b"a", b"c3"), (b"b", b"c3"), (b"c", b"c1"), (b"d", b"c1"),
                                        (b"e", b"c1")], "read_committed stops at the open transaction"
    p.commit_transaction(30)
    time.sleep(0.5)
    produce(broker.bootstrap, t, [(b"~roll", b"y")])
    # (The first ~roll stays: the second is in the active segment, which is never cleaned.)
    want = [(b"a", b"c3"), (b"b", b"c3"), (b"c", b"open"), (b"d", b"c1"), (b"e", b"c1"),
            (b"~roll", b"x"), (b"~roll", b"y")]
    try:
        wait_until(lambda: seen.append(values("read_committed")) or seen[-1] == want, 60,
                   "the committed overwrite compacts c1 away")
    except AssertionError:
        raise AssertionError(f"read_committed: {seen[-1]}")
    assert values("read_uncommitted") == want
