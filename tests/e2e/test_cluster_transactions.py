"""Transactions in a region cluster (issue 18): three `ferry broker --etcd` processes and a real
etcd, one cluster for the module. The transaction coordinator is the leader of
`__transaction_state-0`; it has the leaders of the other partitions write the markers
(WriteTxnMarkers), and they check each transactional produce with it.

Shows, with real clients: a committed and an aborted transaction over partitions led by
different brokers read exactly with read_committed and read_uncommitted; confluent-kafka
running transactions while the coordinator's broker is SIGKILLed, with a transaction open at
the kill, ends with every transaction whole (committed ones all there, aborted ones absent,
nothing left open); the Java client's consume-transform-produce loop copies every input exactly
once through the SIGKILL of the coordinator's broker.

Needs etcd on PATH: skipped without it unless FERRY_REQUIRE_ETCD=1 (CI sets it).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from confluent_kafka import KafkaException, Producer

from cluster_fixture import Cluster, cluster_fixture, coordinator
from helpers import topic_name, wait_until
from test_transactions import (assert_copied_exactly_once, compile_java, java_tools, positions,
                               read_all, txn_producer)

TRANSACTION = 1  # FindCoordinator's key type of a transactional id


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from cluster_fixture(tmp_path_factory)


def leaders(cluster: Cluster, topic: str, partitions: int) -> list[int]:
    parts = cluster.metadata(topic).topics[topic].partitions
    return [parts[p].leader for p in range(partitions)]


def committed_values(cluster: Cluster, topic: str, partitions: int) -> list[bytes]:
    return [v for p in range(partitions)
            for _, v in read_all(cluster.bootstrap, topic, "read_committed", p)]


def test_commit_and_abort_over_partitions_led_by_different_brokers(cluster):
    t = topic_name("cl-txn")
    cluster.create(t, 3)
    p = txn_producer(cluster.bootstrap, "e2e-cl-txn")
    coord = coordinator(cluster, "e2e-cl-txn", TRANSACTION)
    led = leaders(cluster, t, 3)
    # The markers of at least one partition are written by another broker than the coordinator.
    assert any(b != coord for b in led), (coord, led)
    for name, commit in (("a", True), ("b", False), ("c", True)):
        p.begin_transaction()
        for i in range(9):
            p.produce(t, value=f"{name}{i}".encode(), partition=i % 3)
        p.flush(30)
        if commit:
            p.commit_transaction(30)
        else:
            p.abort_transaction(30)
    for part in range(3):
        want = [f"{n}{i}".encode() for n in "ac" for i in range(part, 9, 3)]
        got = [v for _, v in read_all(cluster.bootstrap, t, "read_committed", part)]
        assert got == want, (part, got)
        every = [v for _, v in read_all(cluster.bootstrap, t, "read_uncommitted", part)]
        assert every == [f"{n}{i}".encode() for n in "abc" for i in range(part, 9, 3)], (part, every)
        # Nothing left open: the last stable offset is the high watermark.
        assert positions(cluster.bootstrap, t, "read_committed", part) == \
            positions(cluster.bootstrap, t, "read_uncommitted", part)


def test_transactions_stay_whole_when_the_coordinators_broker_is_sigkilled(cluster):
    """A producer runs transactions of 9 records over 3 partitions; the coordinator's broker is
    SIGKILLed while a transaction is open, and the producer carries on with the new coordinator
    (the leader of `__transaction_state-0` elected from the in-sync replicas). Afterwards every
    transaction is whole in read_committed: all of each committed one, none of an aborted one,
    all or none of one whose commit was cut off, and nothing is left open."""
    t = topic_name("cl-txn-kill")
    cluster.create(t, 3)
    txn_id = "e2e-cl-txn-kill"
    p = txn_producer(cluster.bootstrap, txn_id)
    coord = coordinator(cluster, txn_id, TRANSACTION)
    outcome: dict[int, str] = {}
    killed_at = None
    try:
        for i in range(30):
            # A producer that hit a fatal error is replaced, as an application would.
            try:
                p.begin_transaction()
                for j in range(9):
                    p.produce(t, value=f"{i}-{j}".encode(), partition=j % 3)
                p.flush(30)
                if i == 8:
                    # Inside a transaction whose partitions are added and records written.
                    killed_at = i
                    cluster.brokers[coord].kill()
                for attempt in range(10):
                    try:
                        p.commit_transaction(60)
                        outcome[i] = "committed"
                        break
                    except KafkaException as e:
                        err = e.args[0]
                        if err.retriable() and attempt < 9:
                            continue
                        raise
            except KafkaException as e:
                err = e.args[0]
                if err.txn_requires_abort():
                    p.abort_transaction(60)
                    outcome[i] = "aborted"
                else:
                    outcome[i] = "unknown"
                    p = txn_producer(cluster.bootstrap, txn_id)
    finally:
        cluster.up()
    assert killed_at is not None
    assert sum(1 for o in outcome.values() if o == "committed") >= 20, outcome
    for part in range(3):
        # Nothing is left open on any partition.
        wait_until(lambda: positions(cluster.bootstrap, t, "read_committed", part)
                   == positions(cluster.bootstrap, t, "read_uncommitted", part), 60,
                   f"partition {part}'s last stable offset at its end\n{cluster.logs()}")
    seen: dict[int, list[str]] = {}
    for v in committed_values(cluster, t, 3):
        i, j = v.decode().split("-")
        seen.setdefault(int(i), []).append(j)
    for i, o in outcome.items():
        got = sorted(seen.get(i, []))
        if o == "committed":
            assert got == [str(j) for j in range(9)], (i, got)
        elif o == "aborted":
            assert got == [], (i, got)
        else:
            assert got in ([], [str(j) for j in range(9)]), (i, got)
    for i, js in seen.items():
        assert len(js) == len(set(js)), f"transaction {i} has a record twice: {js}"


def test_java_consume_transform_produce_is_exactly_once_through_the_coordinators_sigkill(
        cluster, tmp_path):
    """Kafka's Java client in a read-process-write loop (sendOffsetsToTransaction) against the
    cluster; the broker coordinating its transactions is SIGKILLed mid-run and comes back. The
    output, read with read_committed, has every input exactly once."""
    java = java_tools()
    classes = compile_java(java, "TxnCopier", tmp_path)
    libs = Path(java.env["KAFKA_HOME_DIR"]) / "libs"
    src, dst = topic_name("cl-ctp-in"), topic_name("cl-ctp-out")
    cluster.create(src, 3)
    cluster.create(dst, 2)
    n = 3000
    plain = Producer({"bootstrap.servers": cluster.bootstrap, "linger.ms": 5})
    for i in range(n):
        plain.produce(src, value=f"in-{i}".encode(), partition=i % 3)
    assert plain.flush(60) == 0
    txn_id = "e2e-cl-ctp-java"
    log = open(tmp_path / "copier.log", "ab")
    cmd = [java.env["JAVA_BIN"], "-Xmx256m", "-cp", f"{classes}:{libs}/*", "ferry.e2e.TxnCopier",
           cluster.bootstrap, src, dst, "e2e-cl-ctp-java", txn_id]

    def start():
        return subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                start_new_session=True)

    def written():
        try:
            return sum(positions(cluster.bootstrap, dst, "read_uncommitted", part)[1]
                       for part in range(2))
        except KafkaException:
            return 0  # a leader just died: the client has not found the new one yet

    app = start()
    try:
        wait_until(lambda: written() >= 800, 120, "the copier writes")
        coord = coordinator(cluster, txn_id, TRANSACTION)
        cluster.brokers[coord].kill()
        wait_until(lambda: written() >= 2000, 180,
                   f"the copier writes with a new coordinator\n{cluster.logs()}")
        cluster.up()
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
            raise AssertionError("the copier did not finish: "
                                 + (tmp_path / "copier.log").read_text()[-4000:])
    finally:
        if app.poll() is None:
            os.kill(app.pid, signal.SIGKILL)
            app.wait()
        log.close()
        cluster.up()
    assert_copied_exactly_once(cluster.bootstrap, dst, n)
