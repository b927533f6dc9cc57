"""A region cluster: three `ferry broker --etcd` processes and a real etcd (Debian's etcd-server),
driven by confluent-kafka (librdkafka). One cluster for the module; tests that kill brokers bring
them back before they end.

Shows: replicated topics (leader, replicas and ISR in Metadata); a SIGKILLed leader under acks=all
loses no acknowledged record and the replicas end byte-identical; min.insync.replicas refuses with
NOT_ENOUGH_REPLICAS, never a false acknowledgement; an etcd SIGKILL leaves the data path serving
while metadata changes wait, and they resume when etcd returns.

Needs etcd on PATH: skipped without it unless FERRY_REQUIRE_ETCD=1 (CI sets it).
"""
from __future__ import annotations

import os
import subprocess
import time

import pytest

import struct

import kproto
from conftest import FERRY_BIN, FerryBroker
from helpers import (JavaTools, ck_admin, ck_consumer, ck_producer, ck_read_keyed, kafka_installed,
                     topic_name, wait_until)
from cluster_fixture import Cluster, cluster_fixture, coordinator


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from cluster_fixture(tmp_path_factory)


def produce_during(cluster: Cluster, topic: str, seconds: float, during=None, **conf):
    """Produce numbered records for `seconds` with delivery reports; call `during()` halfway.
    Returns ({(partition, offset): value} acknowledged, [errors])."""
    p = ck_producer(cluster.bootstrap, **conf)
    acked, errors = {}, []

    def cb(err, msg):
        if err is not None:
            errors.append(err)
        else:
            acked[(msg.partition(), msg.offset())] = msg.value()

    start, i, done = time.monotonic(), 0, False
    while time.monotonic() - start < seconds:
        try:
            p.produce(topic, key=b"k%d" % i, value=b"v%08d" % i, on_delivery=cb)
            i += 1
        except BufferError:
            p.poll(0.05)
            continue
        p.poll(0)
        if i % 200 == 0:
            time.sleep(0.01)
        if during is not None and not done and time.monotonic() - start > seconds / 3:
            during()
            done = True
    assert p.flush(90) == 0, "records still undelivered"
    return acked, errors


def read_all(cluster: Cluster, topic: str, partitions: int, expect: int, timeout: float = 60) -> dict:
    from confluent_kafka import KafkaError, TopicPartition
    c = ck_consumer(cluster.bootstrap)
    got, eof = {}, set()
    try:
        c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (len(got) >= expect and len(eof) == partitions):
            m = c.poll(0.5)
            if m is None:
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    eof.add(m.partition())
                    continue
                raise AssertionError(f"consumer error: {m.error()}")
            eof.discard(m.partition())
            key = (m.partition(), m.offset())
            assert key not in got, f"offset {key} read twice"
            got[key] = m.value()
    finally:
        c.close()
    return got


def offset_for_leader_epoch(bootstrap: str, topic: str, partition: int, current: int,
                            epoch: int) -> tuple[int, int, int]:
    """OffsetForLeaderEpoch v3, built by hand: (error code, leader epoch, end offset)."""
    body = (kproto.i32(-1) + kproto.i32(1) + kproto.string(topic) + kproto.i32(1)
            + kproto.i32(partition) + kproto.i32(current) + kproto.i32(epoch))
    s = kproto.connect(bootstrap)
    try:
        s.sendall(kproto.request_frame(23, 3, 7, body))
        r = kproto.recv_frame(s)
    finally:
        s.close()
    corr, _throttle, ntopics = struct.unpack(">iii", r[:12])
    assert corr == 7 and ntopics == 1
    (nlen,) = struct.unpack(">h", r[12:14])
    at = 14 + nlen
    nparts, err, part, leader_epoch, end = struct.unpack(">ihiiq", r[at:at + 22])
    assert nparts == 1 and part == partition
    return err, leader_epoch, end


def java_tools() -> JavaTools:
    """Kafka 4.4's Java tools; missing ones fail under FERRY_REQUIRE_JAVA=1, else skip."""
    if not kafka_installed():
        if os.environ.get("FERRY_REQUIRE_JAVA") == "1":
            pytest.fail("Apache Kafka's Java tools are not installed (scripts/install-peers.sh)")
        pytest.skip("Apache Kafka's Java tools are not installed")
    return JavaTools()


def segment_bytes(broker: FerryBroker, topic: str, partition: int) -> bytes:
    d = broker.data_dir / f"{topic}-{partition}"
    return b"".join(f.read_bytes() for f in sorted(d.glob("*.log")))


def test_metadata_names_each_partitions_leader_replicas_and_isr(cluster):
    t = topic_name("rf3")
    cluster.create(t, 3)
    # Every broker names all three partitions (each applies the topic from its own etcd watch).
    for b in cluster.brokers.values():
        wait_until(lambda: len(ck_admin(b.bootstrap).list_topics(t, timeout=10).topics[t].partitions) == 3,
                   20, f"{t} at {b.bootstrap}")
    parts = cluster.metadata(t).topics[t].partitions
    assert sorted(parts) == [0, 1, 2]
    for p in parts.values():
        assert sorted(p.replicas) == [1, 2, 3]
        assert sorted(p.isrs) == [1, 2, 3]
        assert p.leader == p.replicas[0]
    assert sorted(p.leader for p in parts.values()) == [1, 2, 3], "leaders spread over the brokers"
    # `ferry topics describe` shows the same, from any broker.
    out = subprocess.run([str(FERRY_BIN), "topics", "-b", cluster.brokers[2].bootstrap, "describe", t],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [(t, "0"), (t, "1"), (t, "2")], out
    for r in rows:
        p = parts[int(r[1])]
        assert (int(r[2]), r[4]) == (p.leader, ",".join(map(str, p.replicas))), out
        assert sorted(r[5].split(",")) == ["1", "2", "3"], out
    # A replication factor above the broker count is refused with Kafka's error.
    from confluent_kafka.admin import NewTopic
    admin = ck_admin(cluster.bootstrap)
    f = admin.create_topics([NewTopic(topic_name("rf4"), 1, replication_factor=4)])
    with pytest.raises(Exception) as e:
        list(f.values())[0].result(timeout=30)
    assert "INVALID_REPLICATION_FACTOR" in str(e.value) or "replication factor 4" in str(e.value)


def test_a_sigkilled_leader_under_acks_all_loses_no_acknowledged_record(cluster):
    cluster.up()
    t = topic_name("kill")
    cluster.create(t, 2, **{"min.insync.replicas": "2"})
    victim = cluster.leader(t, 0)
    acked, errors = produce_during(cluster, t, 9, during=lambda: cluster.brokers[victim].kill(),
                                   acks="all", enable_idempotence=True, linger_ms=2,
                                   message_timeout_ms=60000)
    assert not errors, f"delivery errors: {errors[:5]}"
    assert len(acked) > 1000, len(acked)
    new = cluster.leader(t, 0)
    assert new not in (victim, -1), f"partition 0 still led by {new}"
    got = read_all(cluster, t, 2, len(acked))
    missing = [k for k, v in acked.items() if got.get(k) != v]
    assert not missing, f"{len(missing)} acknowledged records not read at their offsets: {missing[:5]}"
    values = list(got.values())
    assert len(values) == len(set(values)), "a record was written twice"
    # OffsetForLeaderEpoch on the new leader: the first leader's epoch (0) ends where the new
    # leader's began, at or below what was acknowledged in it; the new epoch runs to the log end.
    # A client still naming the old leader epoch is fenced; the old leader's peers refuse.
    md = cluster.metadata(t).topics[t].partitions[0]
    lead = cluster.brokers[md.leader].bootstrap
    p0 = sorted(o for (p, o) in got if p == 0)
    err, e, end = offset_for_leader_epoch(lead, t, 0, -1, 0)
    assert (err, e) == (0, 0) and 0 < end <= p0[-1] + 1, (err, e, end)
    err, e, end_new = offset_for_leader_epoch(lead, t, 0, -1, 1 << 30)
    assert err == 0 and e >= 256 and end_new == p0[-1] + 1, (err, e, end_new, p0[-1])
    err, _, _ = offset_for_leader_epoch(lead, t, 0, 0, 0)
    assert err == 74, f"FENCED_LEADER_EPOCH expected, got {err}"
    other = next(b for i, b in cluster.brokers.items() if i != md.leader and b.alive())
    err, _, _ = offset_for_leader_epoch(other.bootstrap, t, 0, -1, 0)
    assert err == 6, f"NOT_LEADER_OR_FOLLOWER expected, got {err}"

    # The victim comes back, truncates to the new leader's history and catches up: every
    # replica then holds the same bytes.
    cluster.up()
    for p in (0, 1):
        wait_until(lambda: len({segment_bytes(b, t, p) for b in cluster.brokers.values()}) == 1,
                   45, f"identical replicas of {t}-{p}")


def test_min_insync_replicas_refuses_instead_of_acknowledging(cluster):
    cluster.up()
    t = topic_name("minisr")
    cluster.create(t, 1, **{"min.insync.replicas": "2"})
    leader = cluster.leader(t, 0)
    followers = [i for i in (1, 2, 3) if i != leader]
    cluster.brokers[followers[0]].kill()
    wait_until(lambda: len(cluster.metadata(t).topics[t].partitions[0].isrs) == 2, 30,
               "the dead follower to leave the ISR")
    acked, errors = produce_during(cluster, t, 2, acks="all", enable_idempotence=True)
    assert acked and not errors, errors[:3]
    cluster.brokers[leader].kill()
    wait_until(lambda: cluster.metadata(t).topics[t].partitions[0].leader == followers[1], 30,
               "the last in-sync replica to lead")
    assert cluster.metadata(t).topics[t].partitions[0].isrs == [followers[1]]
    # No retries, so the broker's own error reaches the delivery report (librdkafka would
    # otherwise retry this retriable error until its message timeout).
    acked2, errors2 = produce_during(cluster, t, 2, acks="all", retries=0, message_timeout_ms=4000)
    assert not acked2, f"{len(acked2)} records acknowledged with one in-sync replica"
    assert errors2 and all("NOT_ENOUGH_REPLICAS" in e.name() for e in errors2), \
        {e.name() for e in errors2}
    # acks=1 asks only the leader.
    acked3, errors3 = produce_during(cluster, t, 1, acks=1)
    assert acked3 and not errors3
    got = read_all(cluster, t, 1, len(acked) + len(acked3))
    for k, v in list(acked.items()) + list(acked3.items()):
        assert got.get(k) == v, f"acknowledged record at {k} not read back"
    cluster.up()


def test_an_etcd_sigkill_leaves_the_data_path_serving_and_metadata_resumes(cluster):
    cluster.up()
    t = topic_name("etcd")
    cluster.create(t, 1)
    cluster.etcd.kill()
    try:
        acked, errors = produce_during(cluster, t, 2, acks="all")
        assert acked and not errors, errors[:3]
        got = read_all(cluster, t, 1, len(acked))
        assert all(got.get(k) == v for k, v in acked.items())
        # A metadata change waits for etcd: a clear, retriable error, not a hang.
        from confluent_kafka.admin import NewTopic
        admin = ck_admin(cluster.bootstrap)
        f = admin.create_topics([NewTopic(topic_name("while-down"), 1, 3)], request_timeout=30)
        with pytest.raises(Exception) as e:
            list(f.values())[0].result(timeout=40)
        assert "metadata store" in str(e.value) or "TIMED_OUT" in str(e.value), str(e.value)
    finally:
        cluster.etcd.start()
    # Back: metadata changes resume.
    t2 = topic_name("after")
    wait_until(lambda: _try_create(cluster, t2), 60, "topic creation after etcd returned", interval=1)
    acked, errors = produce_during(cluster, t2, 1, acks="all")
    assert acked and not errors


def _try_create(cluster: Cluster, name: str) -> bool:
    try:
        cluster.create(name, 1)
        return True
    except Exception:
        return False


def test_kafka_log_dirs_tool_sizes_every_replica(cluster):
    """Kafka 4.4's kafka-log-dirs (LogDirsCommand) asks every broker with DescribeLogDirs."""
    java = java_tools()
    import json
    cluster.up()
    t = topic_name("logdirs")
    cluster.create(t, 2)
    acked, errors = produce_during(cluster, t, 1, acks="all")
    assert acked and not errors
    for p in (0, 1):
        wait_until(lambda: len({segment_bytes(b, t, p) for b in cluster.brokers.values()}) == 1,
                   30, f"identical replicas of {t}-{p}")
    java.env["LOG_DIRS"] = "org.apache.kafka.tools.LogDirsCommand"
    out = java.run("LOG_DIRS", "--bootstrap-server", cluster.bootstrap, "--describe",
                   "--topic-list", t).stdout.decode()
    data = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    brokers = {b["broker"]: b for b in data["brokers"]}
    assert sorted(brokers) == [1, 2, 3], out
    for i, b in brokers.items():
        (d,) = b["logDirs"]
        assert d["error"] is None and d["logDir"] == str(cluster.brokers[i].data_dir), d
        sizes = {x["partition"]: x["size"] for x in d["partitions"]}
        assert sizes == {f"{t}-{p}": len(segment_bytes(cluster.brokers[i], t, p)) for p in (0, 1)}, d


def test_kafka_leader_election_tool_moves_leadership_back_to_the_preferred_replica(cluster):
    """Kafka 4.4's kafka-leader-election (LeaderElectionCommand) sends ElectLeaders."""
    java = java_tools()
    cluster.up()
    t = topic_name("elect")
    cluster.create(t, 1)
    preferred = cluster.metadata(t).topics[t].partitions[0].replicas[0]
    assert cluster.leader(t, 0) == preferred
    cluster.brokers[preferred].kill()
    wait_until(lambda: cluster.leader(t, 0) not in (preferred, -1), 30, "a new leader")
    cluster.up()  # back, and in sync again
    assert cluster.leader(t, 0) != preferred
    java.env["LEADER_ELECTION"] = "org.apache.kafka.tools.LeaderElectionCommand"
    out = java.run("LEADER_ELECTION", "--bootstrap-server", cluster.bootstrap,
                   "--election-type", "PREFERRED", "--topic", t, "--partition", "0").stdout.decode()
    assert "Successfully completed leader election" in out, out
    wait_until(lambda: cluster.leader(t, 0) == preferred, 20, "the preferred replica leading")
    # Asked again, nothing to do: Kafka's ELECTION_NOT_NEEDED.
    out = java.run("LEADER_ELECTION", "--bootstrap-server", cluster.bootstrap,
                   "--election-type", "PREFERRED", "--topic", t, "--partition", "0").stdout.decode()
    assert "Valid replica already elected" in out, out


def test_members_bootstrapped_at_different_brokers_meet_in_one_group(cluster):
    """Every broker names the same group coordinator, the leader of `__consumer_offsets`-0 (it
    is created, replicated, on the first lookup), so a group's members meet there whichever
    broker they bootstrap from (partitions split, none twice)."""
    from confluent_kafka import Consumer
    cluster.up()
    t = topic_name("group")
    cluster.create(t, 2)
    group = "g-" + t
    node = coordinator(cluster, group)
    offsets = cluster.metadata("__consumer_offsets").topics["__consumer_offsets"]
    assert node == offsets.partitions[0].leader
    assert len(offsets.partitions[0].replicas) == 3, offsets.partitions[0].replicas
    consumers = [Consumer({"bootstrap.servers": cluster.brokers[i].bootstrap, "group.id": group,
                           "auto.offset.reset": "earliest", "session.timeout.ms": 10000})
                 for i in (2, 3)]
    try:
        for c in consumers:
            c.subscribe([t])

        def split():
            for c in consumers:
                c.poll(0.2)
            owned = [sorted(tp.partition for tp in c.assignment()) for c in consumers]
            return owned if sorted(owned) == [[0], [1]] else None
        wait_until(split, 60, "the two members to share the two partitions")
    finally:
        for c in consumers:
            c.close()


def test_a_group_keeps_reading_and_its_commits_survive_when_the_coordinator_is_sigkilled(cluster):
    """Commits and group membership are replicated in `__consumer_offsets`: SIGKILL the
    coordinator's broker while a group reads; a new leader of the offsets partition becomes the
    coordinator with every acknowledged commit and the group's generation, members and
    assignments, so the consumer reads on without a rebalance and without skipping a record,
    and its next commits land there."""
    from confluent_kafka import Consumer, TopicPartition
    cluster.up()
    t = topic_name("coord")
    cluster.create(t, 2)
    p = ck_producer(cluster.bootstrap, acks="all")
    total = 2000
    for i in range(total):
        p.produce(t, value=f"r{i}".encode(), partition=i % 2)
    assert p.flush(60) == 0
    ends = {0: total // 2, 1: total // 2}
    group = "g-" + t
    conf = {"bootstrap.servers": cluster.bootstrap, "group.id": group,
            "auto.offset.reset": "earliest", "enable.auto.commit": False,
            "session.timeout.ms": 10000}
    c = Consumer(conf)
    seen: set[tuple[int, int]] = set()
    assigned = []
    try:
        c.subscribe([t], on_assign=lambda _c, parts: assigned.append(len(parts)))

        def read(n):
            def more():
                for m in c.consume(500, 0.5):
                    if m.error() is None:
                        seen.add((m.partition(), m.offset()))
                return len(seen) >= n
            return more
        wait_until(read(total // 2), 60, "half the records")
        c.commit(asynchronous=False)
        before = {tp.partition: tp.offset for tp in c.committed(
            [TopicPartition(t, 0), TopicPartition(t, 1)], timeout=10)}
        # (a partition not read from yet has no commit: librdkafka's -1001)
        assert sum(max(o, 0) for o in before.values()) >= total // 2, before

        old = coordinator(cluster, group)
        cluster.brokers[old].kill()
        new = wait_until(lambda: (lambda n: n if n != old else None)(coordinator(cluster, group)),
                         60, "a new coordinator")
        assert new != old

        def committed_now():
            try:
                return {tp.partition: tp.offset for tp in c.committed(
                    [TopicPartition(t, 0), TopicPartition(t, 1)], timeout=10)}
            except Exception:
                return None
        # The commit acknowledged before the kill is at the new coordinator.
        assert wait_until(committed_now, 60, "committed offsets from the new coordinator") == before
        errors = []

        def committed(final: bool):
            def attempt():
                # Until the client finds the new coordinator a commit may fail with a
                # retriable error; it is never refused for its generation or member id.
                read(total)()
                if final and len(seen) < total:
                    return False
                try:
                    c.commit(asynchronous=False)
                    return True
                except Exception as e:
                    errors.append(str(e))
                    return False
            return attempt
        wait_until(committed(False), 60, "a commit at the new coordinator")
        wait_until(committed(True), 90, "every record read and committed after the death")
        print("commits refused during the move:", errors)
        assert not [e for e in errors if "GENERATION" in e or "UNKNOWN_MEMBER" in e], errors
        # No rebalance: the member kept its assignment through the move.
        assert assigned == [2], assigned
        # Every offset of both partitions read: nothing skipped.
        assert seen == {(q, o) for q in (0, 1) for o in range(ends[q])}
    finally:
        c.close()
    # A fresh member of the group gets the last commit from the new coordinator.
    c2 = Consumer(conf)
    try:
        after = {tp.partition: tp.offset for tp in c2.committed(
            [TopicPartition(t, 0), TopicPartition(t, 1)], timeout=30)}
    finally:
        c2.close()
    assert after == ends, (after, ends)
    cluster.up()


def test_a_topic_deleted_in_the_cluster_goes_from_every_broker(cluster):
    cluster.up()
    t = topic_name("delete")
    cluster.create(t, 2)
    admin = ck_admin(cluster.brokers[3].bootstrap)
    admin.delete_topics([t])[t].result(timeout=30)
    for b in cluster.brokers.values():
        wait_until(lambda: not list(b.data_dir.glob(f"{t}-*")), 20, f"{t} removed from {b.data_dir}")
    assert t not in cluster.metadata().topics
    # Deleting it again is Kafka's UNKNOWN_TOPIC_OR_PARTITION, with the reason.
    with pytest.raises(Exception) as e:
        admin.delete_topics([t])[t].result(timeout=30)
    assert "UNKNOWN_TOPIC" in str(e.value), str(e.value)


def test_topic_configs_altered_at_any_broker_reach_every_broker(cluster):
    """AlterConfigs in a cluster writes the topic's configs to etcd: every broker takes them
    (DescribeConfigs asked of each), whichever broker the client altered them at."""
    from confluent_kafka.admin import ConfigResource
    cluster.up()
    t = topic_name("configs")
    cluster.create(t, 1)
    res = ConfigResource(ConfigResource.Type.TOPIC, t,
                         set_config={"retention.ms": "3600000", "min.insync.replicas": "2"})
    leader = cluster.leader(t, 0)
    other = next(i for i in cluster.brokers if i != leader)
    admin = ck_admin(cluster.brokers[other].bootstrap)
    admin.alter_configs([res])[res].result(timeout=30)
    for i, b in cluster.brokers.items():
        def described():
            r = ConfigResource(ConfigResource.Type.TOPIC, t)
            a = ck_admin(b.bootstrap)
            got = a.describe_configs([r])[r].result(timeout=10)
            return {k: got[k].value for k in ("retention.ms", "min.insync.replicas")}
        wait_until(lambda: described() == {"retention.ms": "3600000", "min.insync.replicas": "2"},
                   20, f"broker {i} to take the topic's configs")
    # A bad value is refused with Kafka's error and changes nothing.
    bad = ConfigResource(ConfigResource.Type.TOPIC, t, set_config={"retention.ms": "soon"})
    with pytest.raises(Exception) as e:
        admin.alter_configs([bad])[bad].result(timeout=30)
    assert "INVALID_CONFIG" in str(e.value) or "retention.ms" in str(e.value), str(e.value)


def test_a_follower_whose_next_records_the_leader_deleted_starts_again_at_the_leaders_log_start(cluster):
    """A follower is down while retention deletes, at the leader, the segments it would fetch
    next: when it returns, the leader answers OFFSET_OUT_OF_RANGE with its log start, and the
    follower empties its log, starts again there and rejoins the ISR (Kafka's
    truncateFullyAndStartAt). Without it the follower would never catch up."""
    t = topic_name("reset")
    cluster.create(t, 1, **{"segment.bytes": "16384", "retention.bytes": "65536"})
    leader = cluster.leader(t, 0)
    follower = next(b for b in (1, 2, 3) if b != leader)
    cluster.brokers[follower].kill()
    try:
        # Small batches (20 records, about 4 KiB), so the 16 KiB segments roll often.
        p = ck_producer(cluster.bootstrap, acks="1", batch_num_messages=20)
        for i in range(3000):
            p.produce(t, value=b"%08d" % i + b"x" * 200)
            if i % 200 == 0:
                p.poll(0)
        assert p.flush(60) == 0
        low = lambda: ck_consumer(cluster.bootstrap).get_watermark_offsets(
            __import__("confluent_kafka").TopicPartition(t, 0), timeout=10)
        wait_until(lambda: low()[0] > 0, 30, "retention to delete the leader's first segments")
        start, end = low()
        assert end == 3000
    finally:
        cluster.brokers[follower].start()
    wait_until(lambda: follower in cluster.metadata(t).topics[t].partitions[0].isrs, 60,
               f"broker {follower} back in the ISR\n{cluster.logs()}")
    logs = sorted(int(f.stem) for f in (cluster.brokers[follower].data_dir / f"{t}-0").glob("*.log"))
    assert logs and logs[0] >= start, (logs, start)
    assert "start again at the leader's log start" in cluster.brokers[follower].log_tail(400)


def test_delete_records_at_the_leader_reaches_every_replica(cluster):
    """DeleteRecords goes to the partition's leader; its followers take the new log start from
    their next fetch, so after the leader is SIGKILLed the new leader answers the same earliest
    offset and a consumer from the beginning starts there."""
    from confluent_kafka import TopicPartition
    cluster.up()
    t = topic_name("delrec")
    cluster.create(t, 1)
    p = ck_producer(cluster.bootstrap, acks="all", batch_num_messages=10, linger_ms=0)
    for i in range(100):
        p.produce(t, value=b"v%05d" % i, partition=0)
    assert p.flush(30) == 0
    admin = ck_admin(cluster.bootstrap)
    done = list(admin.delete_records([TopicPartition(t, 0, 50)]).values())[0].result(timeout=30)
    assert done.low_watermark == 50

    def earliest():
        c = ck_consumer(cluster.bootstrap)
        try:
            return c.get_watermark_offsets(TopicPartition(t, 0), timeout=10)
        finally:
            c.close()
    assert earliest() == (50, 100)
    leader = cluster.leader(t, 0)

    def followers_took_it():
        for i, b in cluster.brokers.items():
            f = b.data_dir / f"{t}-0" / "log-start-offset"
            if i != leader and not (f.exists() and f.read_text().strip() == "50"):
                return False
        return True
    wait_until(followers_took_it, 30, "every follower's log start at 50")
    cluster.brokers[leader].kill()
    wait_until(lambda: cluster.leader(t, 0) not in (-1, leader), 30, "a new leader")
    wait_until(lambda: (lambda w: w if w == (50, 100) else None)(_try_earliest(earliest)), 30,
               "the new leader's log start")
    cluster.up()


def _try_earliest(f):
    try:
        return f()
    except Exception:  # noqa: BLE001
        return None


def test_a_compacted_topic_compacts_on_every_replica_and_survives_its_leaders_sigkill(cluster):
    """Every replica compacts its own copy. A follower that was down while the leader compacted
    copies the compacted batches with their gaps and rejoins the ISR; after the leader is
    SIGKILLed the new leader serves exactly the latest value per key, at the original offsets."""
    cluster.up()
    t = topic_name("compact")
    cluster.create(t, 1, **{"cleanup.policy": "compact", "segment.bytes": "4096", "segment.ms": "300",
                            "min.cleanable.dirty.ratio": "0.01"})
    leader = cluster.leader(t, 0)
    late = next(b for b in (1, 2, 3) if b != leader)
    written: dict[int, tuple] = {}

    def write(items):
        p = ck_producer(cluster.bootstrap, acks="all", linger_ms=5, batch_size=2048)
        for k, v in items:
            p.produce(t, key=k, value=v, partition=0,
                      on_delivery=lambda err, m: err is None and written.__setitem__(m.offset(), (m.key(), m.value())))
            p.poll(0)
        assert p.flush(60) == 0

    def model() -> dict:
        last = {}
        for o in sorted(written):
            last[written[o][0]] = o
        return {o: written[o] for o in last.values()}

    def read() -> dict | None:
        try:
            return ck_read_keyed(cluster.bootstrap, t, timeout=20)
        except AssertionError:
            return None  # a leader change under way

    cluster.brokers[late].kill()
    try:
        write([(b"k%02d" % (i % 25), b"v%05d" % i + b"z" * 50) for i in range(1500)])
        time.sleep(0.5)  # past segment.ms: the next write rolls, so all before it is cleanable
        write([(b"~roll", b"x")])
        want = model()
        wait_until(lambda: read() == want, 60, f"the leader's compacted log\n{cluster.logs()}")
    finally:
        cluster.brokers[late].start()
    wait_until(lambda: late in cluster.metadata(t).topics[t].partitions[0].isrs, 60,
               f"broker {late} back in the ISR with the compacted log\n{cluster.logs()}")
    cluster.brokers[leader].kill()
    wait_until(lambda: cluster.leader(t, 0) not in (-1, leader), 30, "a new leader")
    wait_until(lambda: read() == want, 60, f"the new leader's compacted log\n{cluster.logs()}")
    cluster.up()
    for b in cluster.brokers.values():
        size = sum(f.stat().st_size for f in (b.data_dir / f"{t}-0").glob("*.log"))
        assert size < 1500 * 60, f"broker {b.port} holds {size} bytes: not compacted"
