"""`ferry up --topology topology/clustered.toml`: two regions, three brokers and one etcd each
(etcd from Debian's etcd-server), every process started by `ferry up`. The example file is used
as shipped, with its loopback ports moved to free ones.

Shows: both clusters form (three brokers, a controller, RF=3 topics); a SIGKILL of a partition's
leader in east while librdkafka produces with acks=all and a consumer group reads loses no
acknowledged record (each read at its acknowledged offset, once), the group reads every record,
`ferry up` starts the killed broker again and it rejoins; west's mirror then holds the same
records at the same offsets, and every replica in both regions the same bytes.

Needs etcd on PATH: skipped without it unless FERRY_REQUIRE_ETCD=1 (CI sets it).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from cli_support import FerryUp, children_of, cmdline, ferry
from conftest import EXTERNAL, FERRY_BIN, free_port
from helpers import ck_admin, ck_consumer, topic_name, wait_until
from test_cluster import produce_during, read_all
from test_transactions import positions, read_all as read_isolated

if shutil.which("etcd") is None:
    if os.environ.get("FERRY_REQUIRE_ETCD") == "1":
        raise RuntimeError("etcd is not on PATH and FERRY_REQUIRE_ETCD=1 (apt-get install etcd-server)")
    pytest.skip("etcd is not on PATH (apt-get install etcd-server)", allow_module_level=True)
if EXTERNAL:
    pytest.skip("starts its own regions", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]


class Region:
    def __init__(self, name: str, bootstraps: list[str], data: Path):
        self.name, self.bootstraps, self.data = name, bootstraps, data

    @property
    def bootstrap(self) -> str:
        return ",".join(self.bootstraps)

    def metadata(self, topic: str | None = None):
        return ck_admin(self.bootstrap).list_topics(topic=topic, timeout=10)

    def segment_bytes(self, broker: int, topic: str, partition: int) -> bytes:
        d = self.data / self.name / f"broker-{broker}" / f"{topic}-{partition}"
        return b"".join(f.read_bytes() for f in sorted(d.glob("*.log")))


class Up:
    def __init__(self, tmp: Path):
        text = (REPO / "topology" / "clustered.toml").read_text()
        ports: dict[str, int] = {}

        def move(m):
            return f"127.0.0.1:{ports.setdefault(m.group(1), free_port())}"
        text = re.sub(r"127\.0\.0\.1:(\d+)", move, text)
        self.topology = tmp / "clustered.toml"
        self.topology.write_text(text)
        self.data = tmp / "data"
        self.up = FerryUp(["--topology", self.topology, "--data-dir", self.data], tmp, tmp)
        addr = lambda p: f"127.0.0.1:{ports[str(p)]}"
        self.east = Region("east", [addr(19092), addr(19192), addr(19292)], self.data)
        self.west = Region("west", [addr(29092), addr(29192), addr(29292)], self.data)

    def broker_pid(self, region: str, broker: int) -> int:
        for pid in children_of(self.up.proc.pid):
            argv = cmdline(pid)
            if len(argv) > 1 and argv[1] == "broker" and region in argv \
                    and argv[argv.index("--broker") + 1] == str(broker):
                return pid
        raise AssertionError(f"no running {region} broker {broker}")

    def etcd_pids(self) -> list[int]:
        return [pid for pid in children_of(self.up.proc.pid)
                if cmdline(pid)[:1] and cmdline(pid)[0].endswith("etcd")]


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    if not FERRY_BIN.exists():
        pytest.fail(f"ferry binary not found at {FERRY_BIN}")
    u = Up(tmp_path_factory.mktemp("clustered"))
    u.up.start()
    try:
        u.up.wait_ready(expect_children=6, timeout=120)
        for r in (u.east, u.west):
            wait_until(lambda: len(r.metadata().brokers) == 3, 60, f"three brokers in {r.name}")
        yield u
    finally:
        u.up.cleanup()


def node(region_index: int, broker: int) -> int:
    return region_index * 1000 + broker


def test_up_starts_both_clusters_with_their_etcd(up):
    assert len(up.etcd_pids()) == 2, "one etcd per region"
    md = up.east.metadata()
    assert sorted(md.brokers) == [1, 2, 3]
    assert md.controller_id in (1, 2, 3)
    assert sorted(up.west.metadata().brokers) == [1001, 1002, 1003]
    shown = ferry("topology", "show", up.topology)
    assert shown.returncode == 0, shown.stderr
    assert "3 (RF 3, min ISR 2)" in shown.stdout, shown.stdout


def test_a_leader_sigkilled_under_acks_all_and_a_group_reading_loses_nothing_in_either_region(up):
    from confluent_kafka import Consumer, KafkaError
    t = topic_name("clustered")
    from confluent_kafka.admin import NewTopic
    admin = ck_admin(up.east.bootstrap)
    admin.create_topics([NewTopic(t, num_partitions=3)])[t].result(timeout=30)
    wait_until(lambda: all(len(p.isrs) == 3 and p.leader >= 0
                           for p in up.east.metadata(t).topics[t].partitions.values()), 30, "full ISRs")
    victim = up.east.metadata(t).topics[t].partitions[0].leader
    victim_pid = up.broker_pid("east", victim)

    # A consumer group reads while the records arrive and the leader dies.
    group = Consumer({"bootstrap.servers": up.east.bootstrap, "group.id": "g-" + t,
                      "auto.offset.reset": "earliest", "enable.auto.commit": True,
                      "session.timeout.ms": 10000})
    group.subscribe([t])
    seen: set[tuple[int, int]] = set()

    def drain():
        for m in group.consume(500, 0.2):
            if m.error() is None:
                seen.add((m.partition(), m.offset()))

    def kill():
        os.kill(victim_pid, signal.SIGKILL)
        drain()

    try:
        acked, errors = produce_during(up.east, t, 8, during=kill, acks="all",
                                       enable_idempotence=True, linger_ms=2, message_timeout_ms=60000)
        assert not errors, f"delivery errors: {errors[:5]}"
        assert len(acked) > 1000, len(acked)
        got = read_all(up.east, t, 3, len(acked))
        missing = [k for k, v in acked.items() if got.get(k) != v]
        assert not missing, f"{len(missing)} acknowledged records not read at their offsets: {missing[:5]}"
        assert len(set(got.values())) == len(got), "a record was written twice"
        wait_until(lambda: (drain(), seen >= set(got))[1], 90, "the group to read every record")
    finally:
        group.close()

    # ferry up started the killed broker again: it rejoins every ISR.
    def restarted():
        try:
            return up.broker_pid("east", victim) != victim_pid
        except AssertionError:
            return False
    wait_until(restarted, 30, "the broker started again")
    assert "started again" in up.up.stderr()
    wait_until(lambda: all(len(p.isrs) == 3
                           for p in up.east.metadata(t).topics[t].partitions.values()), 60,
               "the restarted broker back in every ISR")

    # West mirrors the same records at the same offsets ...
    def mirrored():
        return read_all(up.west, t, 3, len(got), timeout=10) == got
    wait_until(mirrored, 90, "west to hold every record at its offset")
    # ... and every replica in both regions holds the same bytes.
    for p in range(3):
        def identical():
            copies = {r.segment_bytes(b, t, p) for r in (up.east, up.west) for b in (1, 2, 3)}
            return len(copies) == 1
        wait_until(identical, 60, f"identical replicas of {t}-{p} in east and west")


def test_a_switchover_between_clusters_writes_above_every_epoch_and_mirrors_back(up):
    """A planned switchover moves the primary to west: west's leaders first raise their leader
    epochs above the log's (east's leader epochs) in west's form, then take writes; east mirrors
    them back at the same offsets, every replica in both regions byte-identical. Then back."""
    from confluent_kafka.admin import NewTopic
    t = topic_name("switch")
    admin = ck_admin(up.east.bootstrap)
    admin.create_topics([NewTopic(t, num_partitions=2)])[t].result(timeout=30)
    wait_until(lambda: all(len(p.isrs) == 3 and p.leader >= 0
                           for p in up.east.metadata(t).topics[t].partitions.values()), 30, "full ISRs")
    first, errors = produce_during(up.east, t, 2, acks="all", enable_idempotence=True)
    assert not errors, errors[:5]
    wait_until(lambda: read_all(up.west, t, 2, len(first), timeout=10) == first, 60, "west mirrors east")
    # A transaction left open in east: the fence settles it at east's transaction coordinator
    # (it waits, then aborts it) and the answer names it.
    from confluent_kafka import Producer
    txp = Producer({"bootstrap.servers": up.east.bootstrap, "transactional.id": "e2e-clustered-switch",
                    "transaction.timeout.ms": 900000})
    txp.init_transactions(60)
    txp.begin_transaction()
    txp.produce(t, value=b"open at the fence", partition=0)
    txp.flush(30)

    certs = up.data / "certs"
    p = ferry("failover", "--topology", up.topology, "--certs", certs, "--to", "west", "--json", timeout=120)
    out = __import__("json").loads(p.stdout)
    assert out["rules"][0]["to"] == "west" and out["rules"][0]["loss"] == [], out
    assert out["rules"][0]["fence_aborted_transactions"] == ["e2e-clustered-switch"], out
    assert out["rules"][0]["aborted_transactions"] == [], out
    del txp
    # Two idempotent producers, each first talking to a different broker: every broker of a
    # cluster hands out producer ids of its own (the same id twice would make the second
    # producer's sequences collide with the first's at the leader: a fatal error).
    second = {}
    for b in up.west.bootstraps[:2]:
        more, errors = produce_during(Region("west", [b], up.data), t, 1, acks="all",
                                      enable_idempotence=True)
        assert not errors, errors[:5]
        second.update(more)
    both = {**first, **second}
    assert len(both) == len(first) + len(second), "west wrote over offsets east had"
    assert read_all(up.west, t, 2, len(both)) == both
    wait_until(lambda: read_all(up.east, t, 2, len(both), timeout=10) == both, 60, "east mirrors west")
    for p in range(2):
        def identical():
            return len({r.segment_bytes(b, t, p) for r in (up.east, up.west) for b in (1, 2, 3)}) == 1
        wait_until(identical, 60, f"identical replicas of {t}-{p} in east and west")

    p = ferry("failover", "--topology", up.topology, "--certs", certs, "--to", "east", "--json", timeout=120)
    out = __import__("json").loads(p.stdout)
    assert out["rules"][0]["to"] == "east", out
    third, errors = produce_during(up.east, t, 1, acks="all", enable_idempotence=True)
    assert not errors, errors[:5]
    assert read_all(up.east, t, 2, len(both) + len(third)) == {**both, **third}




def test_an_etcd_sigkill_under_ferry_up_leaves_the_data_path_serving_and_metadata_resumes(up):
    """East's etcd is SIGKILLed: producers with acks=all and readers go on with the leaders and
    ISRs every broker last saw; a CreateTopics waits (a retriable error) until `ferry up` has
    started etcd again, then succeeds, and the new topic is mirrored to west."""
    from confluent_kafka.admin import NewTopic
    t = topic_name("etcdkill")
    admin = ck_admin(up.east.bootstrap)
    admin.create_topics([NewTopic(t, num_partitions=2)])[t].result(timeout=30)
    wait_until(lambda: all(len(p.isrs) == 3 and p.leader >= 0
                           for p in up.east.metadata(t).topics[t].partitions.values()), 30, "full ISRs")
    (pid,) = [p for p in up.etcd_pids() if "east" in cmdline(p)]
    os.kill(pid, signal.SIGKILL)
    acked, errors = produce_during(up.east, t, 2, acks="all", enable_idempotence=True)
    assert not errors, errors[:5]
    assert read_all(up.east, t, 2, len(acked)) == acked
    late = topic_name("after-etcd")

    def created():
        try:
            admin.create_topics([NewTopic(late, num_partitions=1)])[late].result(timeout=15)
            return True
        except Exception as e:  # REQUEST_TIMED_OUT while etcd is away, then TOPIC_ALREADY_EXISTS
            return "already exists" in str(e).lower() or "TOPIC_ALREADY_EXISTS" in str(e)
    wait_until(created, 90, "CreateTopics once etcd is back")
    assert [p for p in up.etcd_pids() if "east" in cmdline(p)] != [pid], "etcd started again"
    more, errors = produce_during(up.east, late, 1, acks="all", enable_idempotence=True)
    assert not errors, errors[:5]
    wait_until(lambda: read_all(up.west, late, 1, len(more), timeout=10) == more, 90, "west mirrors the new topic")

def test_partitions_added_in_a_cluster_are_replicated_and_mirrored(up):
    """CreatePartitions at any broker goes through etcd: every broker opens the new partitions
    (placed round robin, or as the request's assignment says), each with three replicas in sync;
    acks=all writes to them are mirrored into west, whose mirror topic grows too; a client may
    not grow the mirror itself."""
    from confluent_kafka.admin import NewPartitions, NewTopic
    t = topic_name("grow")
    admin = ck_admin(up.east.bootstrap)
    admin.create_topics([NewTopic(t, num_partitions=2)])[t].result(timeout=30)
    wait_until(lambda: all(len(p.isrs) == 3 and p.leader >= 0
                           for p in up.east.metadata(t).topics[t].partitions.values()), 30, "full ISRs")
    before, errors = produce_during(up.east, t, 1, acks="all", enable_idempotence=True)
    assert not errors, errors[:5]
    # At a single broker (not the controller's business: any broker writes etcd).
    one = ck_admin(up.east.bootstraps[2])
    one.create_partitions([NewPartitions(t, 4)])[t].result(timeout=30)
    one.create_partitions([NewPartitions(t, 5, replica_assignment=[[2, 3, 1]])])[t].result(timeout=30)
    for b in up.east.bootstraps:
        def grown():
            parts = Region("east", [b], up.data).metadata(t).topics[t].partitions
            return len(parts) == 5 and all(len(p.isrs) == 3 and p.leader >= 0 for p in parts.values())
        wait_until(grown, 30, f"five partitions, three in sync each, at {b}")
    assert up.east.metadata(t).topics[t].partitions[4].replicas == [2, 3, 1]
    # Shrinking, or the same count, is refused.
    with pytest.raises(Exception, match="INVALID_PARTITIONS"):
        admin.create_partitions([NewPartitions(t, 3)])[t].result(timeout=30)
    after, errors = produce_during(up.east, t, 1, acks="all", enable_idempotence=True)
    assert not errors, errors[:5]
    assert {p for (p, _o) in after} == {0, 1, 2, 3, 4}, "the producer writes every partition"
    both = {**before, **after}
    assert read_all(up.east, t, 5, len(both)) == both
    # West's mirror grows to five partitions through its own etcd and holds the same records.
    wait_until(lambda: len(up.west.metadata(t).topics[t].partitions) == 5, 60, "west grows the mirror")
    wait_until(lambda: read_all(up.west, t, 5, len(both), timeout=10) == both, 90, "west mirrors every partition")
    for p in (3, 4):
        def identical():
            return len({r.segment_bytes(b, t, p) for r in (up.east, up.west) for b in (1, 2, 3)}) == 1
        wait_until(identical, 60, f"identical replicas of {t}-{p} in east and west")
    west = ck_admin(up.west.bootstrap)  # kept alive until the result is in
    with pytest.raises(Exception, match="POLICY_VIOLATION"):
        west.create_partitions([NewPartitions(t, 6)])[t].result(timeout=30)


def test_delete_records_in_the_primary_cluster_reaches_the_mirror_cluster(up):
    """DeleteRecords at east's leader moves the log start there and, through the primary's
    heartbeats, in west's mirror (at its leader, replicated to its followers); a client may not
    delete records from the mirror itself."""
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import NewTopic
    t = topic_name("delrec")
    admin = ck_admin(up.east.bootstrap)
    admin.create_topics([NewTopic(t, num_partitions=1)])[t].result(timeout=30)
    wait_until(lambda: all(len(p.isrs) == 3 and p.leader >= 0
                           for p in up.east.metadata(t).topics[t].partitions.values()), 30, "full ISRs")
    p = __import__("helpers").ck_producer(up.east.bootstrap, acks="all", batch_num_messages=10, linger_ms=0)
    for i in range(100):
        p.produce(t, value=b"v%05d" % i, partition=0)
    assert p.flush(30) == 0
    wait_until(lambda: len(read_all(up.west, t, 1, 100, timeout=10)) == 100, 60, "west mirrors east")

    def watermarks(region):
        c = ck_consumer(region.bootstrap)
        try:
            return c.get_watermark_offsets(TopicPartition(t, 0), timeout=10)
        except Exception:  # noqa: BLE001
            return None
        finally:
            c.close()
    done = list(admin.delete_records([TopicPartition(t, 0, 40)]).values())[0].result(timeout=30)
    assert done.low_watermark == 40 and watermarks(up.east) == (40, 100)
    wait_until(lambda: watermarks(up.west) == (40, 100), 60, "west's log start to follow east's")
    west = ck_admin(up.west.bootstrap)  # kept alive until the result is in
    with pytest.raises(Exception, match="POLICY_VIOLATION"):
        list(west.delete_records([TopicPartition(t, 0, 60)]).values())[0].result(timeout=30)
    assert watermarks(up.west) == (40, 100)

def gateway_admin(up, region: str, method: str, path: str, body: dict | None = None) -> dict:
    from cli_support import admin_call
    text = up.topology.read_text()
    port = int(text.split(f"[regions.{region}.gateway]")[1].split('admin = "127.0.0.1:')[1].split('"')[0])
    status, out = admin_call(port, up.data / "certs", method, path, body)
    assert status == 200, (status, out)
    return out


def test_a_strangers_write_txn_markers_on_a_plain_connection_writes_nothing(up):
    """WriteTxnMarkers (the coordinator's inter-broker request) is served only through the
    internal door of a broker that has the region's certificate: sent on the plain Kafka port,
    every partition is answered CLUSTER_AUTHORIZATION_FAILED and no marker is written."""
    import struct
    import kproto
    from confluent_kafka.admin import NewTopic
    t = topic_name("stranger-marker")
    admin = ck_admin(up.east.bootstrap)  # kept alive until the result is in
    admin.create_topics([NewTopic(t, num_partitions=1)])[t].result(timeout=30)
    wait_until(lambda: up.east.metadata(t).topics[t].partitions[0].leader >= 0, 30, "a leader")
    leader = up.east.metadata(t).topics[t].partitions[0].leader
    addr = next(b for b in up.east.bootstraps
                if up.east.metadata().brokers[leader].port == int(b.rsplit(":", 1)[1]))
    topic = kproto.compact_string(t) + kproto.compact_array([kproto.i32(0)]) + kproto.TAGS
    marker = (kproto.i64(12345) + kproto.i16(0) + kproto.i8(1) + kproto.compact_array([topic])
              + kproto.i32(1 << 20) + kproto.TAGS)
    sock = kproto.connect(addr)
    try:
        sock.sendall(kproto.request_frame(27, 1, 9, kproto.compact_array([marker]) + kproto.TAGS,
                                          flexible=True))
        r = kproto.recv_frame(sock)
    finally:
        sock.close()
    (corr,) = struct.unpack(">i", r[:4])
    assert corr == 9
    body = r[5:]  # the header's tagged fields: none
    assert body[0] == 2 and struct.unpack(">q", body[1:9])[0] == 12345, body  # one marker
    at = 9
    assert body[at] == 2  # one topic
    nlen = body[at + 1] - 1
    at += 2 + nlen
    assert body[at] == 2  # one partition
    part, err = struct.unpack(">ih", body[at + 1:at + 7])
    assert (part, err) == (0, 31), (part, err)  # CLUSTER_AUTHORIZATION_FAILED
    assert up.east.segment_bytes(leader % 1000, t, 0) == b"", "a marker was written"


def test_a_forced_failover_between_clusters_then_rejoin_quarantines_the_tail_on_every_replica(up):
    """East (lease fencing) keeps acknowledging acks=all writes for its lease's last seconds
    after the link to west is cut; west is promoted by force; when the cut heals east rejoins
    as a mirror: the leader of each east partition moves exactly the divergent tail to the
    quarantine (a cluster topic), cuts its log and high watermark back, and its followers
    truncate to it, so every replica in both regions ends byte-identical. `ferry status`,
    `ferry quarantine list/show/replay` read the clusters through each partition's leader.
    Runs last in this module: it leaves west the primary."""
    import json
    from confluent_kafka.admin import NewTopic
    t = topic_name("rejoin")
    admin = ck_admin(up.east.bootstrap)
    admin.create_topics([NewTopic(t, num_partitions=3)])[t].result(timeout=30)
    wait_until(lambda: all(len(p.isrs) == 3 and p.leader >= 0
                           for p in up.east.metadata(t).topics[t].partitions.values()), 30, "full ISRs")
    first, errors = produce_during(up.east, t, 1, acks="all", enable_idempotence=True)
    assert not errors, errors[:5]
    wait_until(lambda: read_all(up.west, t, 3, len(first), timeout=10) == first, 60, "west mirrors east")

    # A transaction committed in east's cluster and one left open there (their coordinator is
    # the leader of east's __transaction_state-0): both reach west byte for byte.
    from confluent_kafka import Producer
    tx = topic_name("rejoin-txn")
    admin.create_topics([NewTopic(tx, num_partitions=3)])[tx].result(timeout=30)
    wait_until(lambda: all(len(p.isrs) == 3 and p.leader >= 0
                           for p in up.east.metadata(tx).topics[tx].partitions.values()), 30, "full ISRs")
    txp = Producer({"bootstrap.servers": up.east.bootstrap, "transactional.id": "e2e-clustered-txn",
                    "transaction.timeout.ms": 900000})
    txp.init_transactions(60)
    for name, commit in (("c", True), ("o", False)):
        txp.begin_transaction()
        for i in range(6):
            txp.produce(tx, value=f"{name}{i}".encode(), partition=i % 3)
        txp.flush(30)
        if commit:
            txp.commit_transaction(60)
    for part in range(3):
        wait_until(lambda: len(read_isolated(up.west.bootstrap, tx, "read_uncommitted", part, idle=1)) == 4,
                   60, f"west to mirror both transactions in {tx}-{part}")
        # West's read_committed sees the committed one only; the open one holds its LSO.
        assert [v for _, v in read_isolated(up.west.bootstrap, tx, "read_committed", part, idle=1)] \
            == [f"c{i}".encode() for i in (part, part + 3)]

    gateway_admin(up, "east", "POST", "/v1/cut", {"peer": "west"})
    gateway_admin(up, "west", "POST", "/v1/cut", {"peer": "east"})
    # East still holds its write lease: these are acknowledged and never reach west.
    divergent, errors = produce_during(up.east, t, 1, acks="all", enable_idempotence=False)
    assert not errors, errors[:5]
    assert divergent, "nothing written during the cut"
    certs = up.data / "certs"
    p = ferry("failover", "--topology", up.topology, "--certs", certs, "--to", "west", "--force", "--json",
              timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)["rules"][0]
    assert (out["to"], out["forced"]) == ("west", True), out
    # The transaction east left open is aborted in every partition, at whichever west broker
    # leads it, and the answer names each (its records start after the committed one's two
    # records and marker).
    orphans = [a for a in out["aborted_transactions"] if a["topic"] == tx]
    assert sorted(a["partition"] for a in orphans) == [0, 1, 2], out["aborted_transactions"]
    assert all(a["first_offset"] == 3 and a["marker_offset"] == 5 for a in orphans), orphans
    for part in range(3):
        assert positions(up.west.bootstrap, tx, "read_committed", part) == \
            positions(up.west.bootstrap, tx, "read_uncommitted", part), "nothing left open in west"
        assert [v for _, v in read_isolated(up.west.bootstrap, tx, "read_committed", part, idle=1)] \
            == [f"c{i}".encode() for i in (part, part + 3)]
    del txp
    west_acked, errors = produce_during(up.west, t, 1, acks="all", enable_idempotence=True)
    assert not errors, errors[:5]
    live = {**first, **west_acked}
    assert len(live) == len(first) + len(west_acked), "west wrote over offsets it held"

    gateway_admin(up, "east", "POST", "/v1/cut", {"peer": "west", "cut": False})
    gateway_admin(up, "west", "POST", "/v1/cut", {"peer": "east", "cut": False})
    wait_until(lambda: gateway_admin(up, "east", "GET", "/v1/state")["rules"]["*"]["primary"] == "west", 60,
               "east to learn that west is primary")

    def east_holds_wests_log():
        try:
            return read_all(up.east, t, 3, len(live), timeout=10) == live
        except AssertionError:
            # A reader past the end while east cuts its tail is out of range, as in Kafka.
            return False
    wait_until(east_holds_wests_log, 120, "east to hold west's log, its own tail cut")
    for part in range(3):
        def identical():
            return len({r.segment_bytes(b, t, part) for r in (up.east, up.west) for b in (1, 2, 3)}) == 1
        wait_until(identical, 60, f"identical replicas of {t}-{part} in east and west")

    # The quarantine (a replicated cluster topic in east) holds exactly the divergent tail.
    def run(*a):
        p = ferry(*a, "--topology", up.topology, "--certs", certs, timeout=120)
        assert p.returncode == 0, p.stderr
        return p.stdout
    rows = json.loads(run("quarantine", "list", "--json"))
    assert [(x["region"], x["topic"], x["records"]) for x in rows] == [("east", t, len(divergent))], rows
    shown = [json.loads(line) for line in run("quarantine", "show", t, "--region", "east").splitlines()]
    assert {(x["partition"], x["original_offset"]): x["value"].encode() for x in shown} == divergent
    q = up.east.metadata(f"__ferry.quarantine.{t}").topics[f"__ferry.quarantine.{t}"]
    assert all(len(p.replicas) == 3 for p in q.partitions.values()), "the quarantine is replicated"
    # `ferry status` reads both clusters through each partition's leader: no lag, no divergence.
    st = json.loads(run("status", "--json"))
    rows = [r for r in st["partitions"] if r["topic"] == t]
    assert len(rows) == 3 and all((r["source"], r["mirror"], r["lag_records"], r["diverged_at"])
                                  == ("west", "east", 0, None) for r in rows), rows
    assert {r["region"]: (r["up"], r["brokers"]) for r in st["regions"]} == {"east": (True, 3), "west": (True, 3)}
    # Replayed into the live topic in its primary (west), then mirrored to east. After the long
    # silence each side withholds lease credit from the other for a lease and two heartbeats
    # (docs/failover.md): west takes writes again once its lease is renewed.
    wait_until(lambda: gateway_admin(up, "west", "GET", "/v1/state")["lease"]["may_write"], 60,
               "west to hold its write lease again")
    assert f"replayed {len(divergent)}" in run("quarantine", "replay", t, "--region", "east")
    total = len(live) + len(divergent)
    back = read_all(up.west, t, 3, total)
    assert sorted(back.values()) == sorted(list(live.values()) + list(divergent.values()))
    wait_until(lambda: read_all(up.east, t, 3, total, timeout=10) == back, 60, "east mirrors the replay")
