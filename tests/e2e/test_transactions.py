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
import signal
import subprocess
import time
from pathlib import Path

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


JAVA_DIR = Path(__file__).parent / "java"


def java_tools():
    if not (kafka_installed() or os.environ.get("FERRY_REQUIRE_JAVA")):
        pytest.skip("Apache Kafka's Java client is not installed (set FERRY_REQUIRE_JAVA=1 to make this a failure)")
    return JavaTools()


def compile_java(java: JavaTools, name: str, out: Path) -> Path:
    """javac beside the java that runs Kafka's tools, against Kafka 4.4's libs."""
    javac = Path(os.path.realpath(java.env["JAVA_BIN"])).with_name("javac")
    if not javac.exists():
        pytest.fail(f"no javac beside {java.env['JAVA_BIN']}")
    classes = out / "classes"
    libs = Path(java.env["KAFKA_HOME_DIR"]) / "libs"
    p = subprocess.run([str(javac), "--release", "17", "-nowarn", "-d", str(classes), "-cp", f"{libs}/*",
                        str(JAVA_DIR / f"{name}.java")], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, f"javac failed:\n{p.stdout}\n{p.stderr}"
    return classes


def test_java_consume_transform_produce_is_exactly_once_through_sigkills(broker, tmp_path):
    """Kafka's Java client in a read-process-write loop (sendOffsetsToTransaction): the app is
    SIGKILLed inside a transaction and restarted, then the broker is SIGKILLed and restarted;
    the output, read with read_committed, has every input exactly once."""
    java = java_tools()
    classes = compile_java(java, "TxnCopier", tmp_path)
    libs = Path(java.env["KAFKA_HOME_DIR"]) / "libs"
    src, dst = topic_name("ctp-in"), topic_name("ctp-out")
    ck_create_topic(broker.bootstrap, src, partitions=3)
    ck_create_topic(broker.bootstrap, dst, partitions=2)
    n = 3000
    plain = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5})
    for i in range(n):
        plain.produce(src, value=f"in-{i}".encode(), partition=i % 3)
    assert plain.flush(60) == 0
    log = open(tmp_path / "copier.log", "ab")
    cmd = [java.env["JAVA_BIN"], "-Xmx256m", "-cp", f"{classes}:{libs}/*", "ferry.e2e.TxnCopier",
           broker.bootstrap, src, dst, "e2e-ctp-java", "e2e-ctp-java"]

    def start():
        return subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)

    def written():
        total = 0
        for part in range(2):
            _, hi = positions(broker.bootstrap, dst, "read_uncommitted", part)
            total += hi
        return total

    app = start()
    try:
        wait_until(lambda: written() >= 800, 120, "the copier writes")
        os.kill(app.pid, signal.SIGKILL)  # most likely inside a transaction
        app.wait()
        app = start()
        wait_until(lambda: written() >= 2000, 120, "the restarted copier writes")
        broker.kill()
        broker.start()
        # The app goes on (or, after a fatal client error, is restarted as a supervisor would)
        # until every input is copied, then stops on its own when idle.
        restarts = 0
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            rc = app.poll()
            if rc == 0:
                break
            if rc is not None:
                restarts += 1
                assert restarts < 5, (tmp_path / "copier.log").read_text()[-4000:]
                app = start()
            time.sleep(0.5)
        else:
            raise AssertionError("the copier did not finish: " + (tmp_path / "copier.log").read_text()[-4000:])
    finally:
        if app.poll() is None:
            os.kill(app.pid, signal.SIGKILL)
            app.wait()
        log.close()
    assert_copied_exactly_once(broker.bootstrap, dst, n)


def assert_copied_exactly_once(bootstrap, dst, n):
    """TxnCopier's output `dst` (2 partitions), read with read_committed, holds each of the `n`
    inputs (3 partitions, `in-i` at partition i % 3) exactly once, upper-cased."""
    out = {}
    for part in range(2):
        c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"chk-{time.monotonic_ns()}",
                      "isolation.level": "read_committed", "enable.partition.eof": True})
        c.assign([TopicPartition(dst, part, 0)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = c.poll(1)
            if m is None:
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    break
                raise KafkaException(m.error())
            k = m.key().decode()
            assert k not in out, f"input {k} copied twice"
            out[k] = m.value()
        c.close()
    expected = {f"{i % 3}-{i // 3}": f"IN-{i}".encode() for i in range(n)}
    missing = sorted(set(expected) - set(out))[:10]
    assert out == expected, f"{len(out)} of {n} copied; missing e.g. {missing}"
