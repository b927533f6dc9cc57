"""Transactions and exactly-once in a one-broker region (issue 18), with real clients.

confluent-kafka: a committed and an aborted transaction read with read_committed and
read_uncommitted; the last stable offset stops at an open transaction; a zombie fenced by a new
instance of its transactional id; a transaction that outlives its timeout is aborted; the
transaction state survives a SIGKILL of the broker. The Java client: a consume-transform-produce
loop with sendOffsetsToTransaction, killed with SIGKILL mid-transaction and restarted, has every
input exactly once in its output. Kafka's `kafka-transactions` tool lists and describes the
transactions.
"""
import os
import subprocess
import time

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from helpers import JavaTools, ck_create_topic, kafka_installed, topic_name, wait_until


def txn_producer(bootstrap, txn_id, **conf):
    p = Producer({"bootstrap.servers": bootstrap, "transactional.id": txn_id,
                  "transaction.timeout.ms": conf.pop("timeout_ms", 60000), **conf})
    p.init_transactions(30)
    return p


def read_all(bootstrap, topic, isolation, partition=0, idle=3.0, timeout=60):
    """Every message of a partition from its start with `isolation`, until idle at the end."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"rd-{time.monotonic_ns()}",
                  "enable.auto.commit": False, "isolation.level": isolation,
                  "auto.offset.reset": "earliest", "enable.partition.eof": True})
    c.assign([TopicPartition(topic, partition, 0)])
    out, deadline, eof_at = [], time.monotonic() + timeout, None
    try:
        while time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None:
                if eof_at and time.monotonic() - eof_at > idle:
                    break
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    eof_at = eof_at or time.monotonic()
                    continue
                raise KafkaException(m.error())
            eof_at = None
            out.append((m.offset(), m.value()))
    finally:
        c.close()
    return out


def positions(bootstrap, topic, isolation, partition=0):
    """(low, high) watermarks as a consumer with `isolation` sees the end (ListOffsets latest)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"wm-{time.monotonic_ns()}",
                  "isolation.level": isolation})
    try:
        tp = TopicPartition(topic, partition, -1)
        lo, hi = c.get_watermark_offsets(tp, timeout=10, cached=False)
        return lo, hi
    finally:
        c.close()


def test_commit_and_abort_read_committed_and_uncommitted(broker):
    t = topic_name("txn-basic")
    ck_create_topic(broker.bootstrap, t, partitions=2)
    p = txn_producer(broker.bootstrap, "e2e-basic")
    p.begin_transaction()
    for i in range(5):
        p.produce(t, value=f"c{i}".encode(), partition=i % 2)
    p.commit_transaction(30)
    p.begin_transaction()
    for i in range(4):
        p.produce(t, value=f"a{i}".encode(), partition=i % 2)
    p.flush(30)
    p.abort_transaction(30)
    p.begin_transaction()
    p.produce(t, value=b"c5", partition=0)
    p.commit_transaction(30)

    for part, committed in ((0, [b"c0", b"c2", b"c4", b"c5"]), (1, [b"c1", b"c3"])):
        rc = [v for _, v in read_all(broker.bootstrap, t, "read_committed", part)]
        assert rc == committed, (part, rc)
        ru = [v for _, v in read_all(broker.bootstrap, t, "read_uncommitted", part)]
        assert [v for v in ru if v.startswith(b"c")] == committed
        assert sorted(v for v in ru if v.startswith(b"a")) == sorted(
            f"a{i}".encode() for i in range(4) if i % 2 == part), ru
    p.flush()


def test_the_last_stable_offset_stops_at_an_open_transaction(broker):
    t = topic_name("txn-lso")
    ck_create_topic(broker.bootstrap, t)
    plain = Producer({"bootstrap.servers": broker.bootstrap})
    for i in range(3):
        plain.produce(t, value=f"p{i}".encode(), partition=0)
    plain.flush(30)
    p = txn_producer(broker.bootstrap, "e2e-lso")
    p.begin_transaction()
    p.produce(t, value=b"open", partition=0)
    p.flush(30)
    # A plain record after the open transaction: past the last stable offset.
    plain.produce(t, value=b"after", partition=0)
    plain.flush(30)
    _, hw = positions(broker.bootstrap, t, "read_uncommitted")
    _, lso = positions(broker.bootstrap, t, "read_committed")
    assert (lso, hw) == (3, 5), (lso, hw)
    assert [v for _, v in read_all(broker.bootstrap, t, "read_committed", idle=1.5)] == [b"p0", b"p1", b"p2"]
    assert len(read_all(broker.bootstrap, t, "read_uncommitted", idle=1.5)) == 5
    p.commit_transaction(30)
    wait_until(lambda: positions(broker.bootstrap, t, "read_committed")[1] == 6, 15, "the LSO moves past the marker")
    got = [v for _, v in read_all(broker.bootstrap, t, "read_committed")]
    assert got == [b"p0", b"p1", b"p2", b"open", b"after"], got


def test_a_zombie_is_fenced_by_a_new_instance_and_its_transaction_aborted(broker):
    t = topic_name("txn-zombie")
    ck_create_topic(broker.bootstrap, t)
    old = txn_producer(broker.bootstrap, "e2e-zombie")
    old.begin_transaction()
    old.produce(t, value=b"zombie", partition=0)
    old.flush(30)
    # A new instance with the same transactional id: its init aborts the open transaction.
    new = txn_producer(broker.bootstrap, "e2e-zombie")
    new.begin_transaction()
    new.produce(t, value=b"live", partition=0)
    new.commit_transaction(30)
    old.produce(t, value=b"zombie-2", partition=0)
    with pytest.raises(KafkaException) as e:
        old.commit_transaction(30)
    err = e.value.args[0]
    assert err.fatal() or err.code() in (KafkaError._FENCED, KafkaError.PRODUCER_FENCED,
                                         KafkaError.INVALID_PRODUCER_EPOCH), err
    assert [v for _, v in read_all(broker.bootstrap, t, "read_committed")] == [b"live"]


def test_a_transaction_past_its_timeout_is_aborted(broker):
    t = topic_name("txn-timeout")
    ck_create_topic(broker.bootstrap, t)
    p = txn_producer(broker.bootstrap, "e2e-timeout", timeout_ms=2000)
    p.begin_transaction()
    p.produce(t, value=b"late", partition=0)
    p.flush(30)
    # The coordinator aborts it: the LSO moves past the abort marker with nothing committed.
    wait_until(lambda: positions(broker.bootstrap, t, "read_committed")[1] == 2, 30,
               "the timed-out transaction is aborted")
    assert read_all(broker.bootstrap, t, "read_committed", idle=1) == []
    with pytest.raises(KafkaException):
        p.commit_transaction(30)


def test_transactions_survive_a_broker_sigkill(broker):
    t = topic_name("txn-kill")
    ck_create_topic(broker.bootstrap, t)
    p = txn_producer(broker.bootstrap, "e2e-kill")
    p.begin_transaction()
    p.produce(t, value=b"one", partition=0)
    p.commit_transaction(30)
    p.begin_transaction()
    p.produce(t, value=b"open", partition=0)
    p.flush(30)
    broker.kill()
    broker.start()
    # The open transaction is still open after the restart (the LSO holds at it) ...
    assert positions(broker.bootstrap, t, "read_committed")[1] == 2
    # ... and a new instance of the producer aborts it and commits its own.
    q = txn_producer(broker.bootstrap, "e2e-kill")
    q.begin_transaction()
    q.produce(t, value=b"two", partition=0)
    q.commit_transaction(30)
    assert [v for _, v in read_all(broker.bootstrap, t, "read_committed")] == [b"one", b"two"]


def test_offsets_sent_in_a_transaction_apply_only_when_it_commits(broker):
    src, dst = topic_name("txn-src"), topic_name("txn-dst")
    ck_create_topic(broker.bootstrap, src)
    ck_create_topic(broker.bootstrap, dst)
    plain = Producer({"bootstrap.servers": broker.bootstrap})
    for i in range(10):
        plain.produce(src, value=f"in{i}".encode(), partition=0)
    plain.flush(30)
    group = "e2e-ctp"
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group, "enable.auto.commit": False,
                  "auto.offset.reset": "earliest", "isolation.level": "read_committed"})
    c.assign([TopicPartition(src, 0, 0)])
    p = txn_producer(broker.bootstrap, "e2e-ctp")
    msgs = []
    while len(msgs) < 10:
        m = c.poll(5)
        if m is not None and not m.error():
            msgs.append(m)
    meta = c.consumer_group_metadata()

    def committed():
        return c.committed([TopicPartition(src, 0)], timeout=10)[0].offset

    p.begin_transaction()
    for m in msgs[:4]:
        p.produce(dst, value=m.value().upper(), partition=0)
    p.send_offsets_to_transaction([TopicPartition(src, 0, 4)], meta, 30)
    p.abort_transaction(30)
    assert committed() < 0, "an aborted transaction's offsets do not apply"
    p.begin_transaction()
    for m in msgs[:6]:
        p.produce(dst, value=m.value().upper(), partition=0)
    p.send_offsets_to_transaction([TopicPartition(src, 0, 6)], meta, 30)
    p.commit_transaction(30)
    assert committed() == 6
    c.close()
    assert [v for _, v in read_all(broker.bootstrap, dst, "read_committed")] == [
        f"IN{i}".encode() for i in range(6)]
    # The committed offset survives a restart (replayed from the offsets log with its marker).
    broker.kill()
    broker.start()
    c2 = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
    assert c2.committed([TopicPartition(src, 0)], timeout=10)[0].offset == 6
    c2.close()


def test_kafka_transactions_tool_lists_and_describes(broker):
    if not (kafka_installed() or os.environ.get("FERRY_REQUIRE_JAVA")):
        pytest.skip("Kafka's tools are not installed")
    t = topic_name("txn-tool")
    ck_create_topic(broker.bootstrap, t)
    p = txn_producer(broker.bootstrap, "e2e-tool")
    p.begin_transaction()
    p.produce(t, value=b"x", partition=0)
    p.flush(30)
    java = JavaTools()
    java.env["TXN_TOOL"] = "org.apache.kafka.tools.TransactionsCommand"
    out = java.run("TXN_TOOL", "--bootstrap-server", broker.bootstrap, "list", timeout=60)
    text = out.stdout.decode()
    assert "e2e-tool" in text and "Ongoing" in text, text
    out = java.run("TXN_TOOL", "--bootstrap-server", broker.bootstrap, "describe",
                   "--transactional-id", "e2e-tool", timeout=60)
    text = out.stdout.decode()
    assert "Ongoing" in text and t in text, text
    out = java.run("TXN_TOOL", "--bootstrap-server", broker.bootstrap, "describe-producers",
                   "--topic", t, "--partition", "0", timeout=60)
    text = out.stdout.decode()
    assert "0" in text, text  # the open transaction's start offset
    p.commit_transaction(30)
