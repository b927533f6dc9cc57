"""`ferry drill` against topologies run by `ferry up`: the shipped two-region (topology/local.toml)
and three-region (topology/three-regions.toml) files, both with lease fencing.

For every scenario the test reads the final logs itself (every region must hold the same records
at the same offsets), counts the quarantined records itself, and checks them against the drill's
report: a switchover loses nothing; after a region loss the report's RPO equals the loss the test
counts, and the quarantine holds exactly that divergent tail; under lease fencing the old
primary's last acknowledged write comes before the new primary's first."""
from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from cli_support import FerryUp, admin_call, port_open
from conftest import EXTERNAL, FERRY_BIN, REPO

pytestmark = pytest.mark.skipif(bool(EXTERNAL), reason="ferry-only: gateways")

TOPOLOGIES = {
    "local": (REPO / "topology" / "local.toml", ["east", "west"]),
    "three-regions": (REPO / "topology" / "three-regions.toml", ["east", "west", "south"]),
}
KAFKA = {"east": 19092, "west": 29092, "south": 31092}
ADMIN = {"east": 19095, "west": 29095, "south": 31095}


def state(region: str, certs: Path) -> dict:
    status, out = admin_call(ADMIN[region], certs, "GET", "/v1/state", timeout=10)
    assert status == 200, out
    return out


@pytest.fixture(params=list(TOPOLOGIES))
def running(request, tmp_path):
    path, regions = TOPOLOGIES[request.param]
    deadline = time.monotonic() + 20
    while True:  # the previous test's processes may still be exiting
        busy = [p for r in regions for p in (KAFKA[r], KAFKA[r] + 2, ADMIN[r], ADMIN[r] + 1)
                if port_open("127.0.0.1", p)]
        if not busy:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"ports {busy} of {path.name} are in use by another process")
        time.sleep(0.2)
    for attempt in range(3):
        certs = tmp_path / f"data{attempt}" / "certs"
        u = FerryUp(["--topology", path, "--data-dir", tmp_path / f"data{attempt}"], tmp_path, tmp_path / f"logs{attempt}")
        u.start()
        try:
            u.wait_ready(len(regions))  # broker children (gateways are not counted)
            break
        except AssertionError:
            # a port of the previous test's processes not released yet (UDP, or a listener
            # without SO_REUSEADDR): try again shortly
            u.cleanup()
            if attempt == 2:
                raise
            time.sleep(3)
    try:
        # Every gateway hears every peer (heartbeats flow, leases are granted).
        deadline = time.monotonic() + 60
        while True:
            try:
                ok = all(set(state(r, certs)["peers"]) == set(regions) - {r} and state(r, certs)["lease"]["may_write"]
                         for r in regions)
            except (OSError, AssertionError):
                ok = False
            if ok:
                break
            assert time.monotonic() < deadline, u.output()
            time.sleep(0.2)
        yield path, regions, u, certs
        u.signal(signal.SIGINT)
        u.wait(60)
    finally:
        u.cleanup()


def drill(path: Path, scenario: str, certs: Path) -> dict:
    """`ferry drill`, presenting the operator certificate `ferry up` made in certs."""
    report = certs.parent / f"{scenario}.md"
    p = subprocess.run([str(FERRY_BIN), "drill", "--topology", str(path), "--scenario", scenario, "--phase", "2s",
                        "--json", "--report", str(report), "--certs", str(certs)], capture_output=True, timeout=240)
    out = json.loads(p.stdout)
    assert (p.returncode == 0) == out["passed"], p.stderr.decode()[-2000:]
    assert report.read_text().startswith(f"# Ferry drill"), report.read_text()
    for k in ("scenario", "passed", "rpo_records", "rpo_seconds", "rto_seconds", "duplicates",
              "quarantined_records", "quarantined_unacknowledged", "timeline"):
        assert k in out, k
    return out


def read_log(region: str, topic: str) -> list:
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": f"127.0.0.1:{KAFKA[region]}", "group.id": "check",
                  "enable.auto.commit": False, "enable.partition.eof": True})
    out = []
    try:
        md = c.list_topics(topic, timeout=10).topics[topic]
        for p in sorted(md.partitions):
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if hi == 0:
                continue
            c.assign([TopicPartition(topic, p, 0)])
            got = []
            deadline = time.monotonic() + 60
            while (not got or got[-1][1] < hi - 1) and time.monotonic() < deadline:
                for m in c.consume(500, 1.0):
                    if not m.error():
                        got.append((p, m.offset(), m.value()))
            out += got
    finally:
        c.close()
    return out


def quarantine_count(region: str, topic: str) -> int:
    from confluent_kafka import Consumer, TopicPartition
    q = f"__ferry.quarantine.{topic}"
    c = Consumer({"bootstrap.servers": f"127.0.0.1:{KAFKA[region]}", "group.id": "check"})
    try:
        md = c.list_topics(q, timeout=10).topics.get(q)
        if md is None or md.error is not None:
            return 0
        return sum(c.get_watermark_offsets(TopicPartition(q, p), timeout=10)[1] for p in md.partitions)
    finally:
        c.close()


def check_converged(regions: list[str], topic: str) -> list:
    logs = {r: read_log(r, topic) for r in regions}
    first = logs[regions[0]]
    for r in regions[1:]:
        assert logs[r] == first, f"{r} differs from {regions[0]} on {topic}"
    return first


def test_switchover_loses_nothing(running):
    path, regions, u, tmp = running
    # A transaction left open in the primary: the fence waits for it a bounded time, then
    # aborts it there (so the new primary takes over no open transaction), and says so.
    txn_topic = f"drill-sw-txn-{int(time.time() * 1000)}"
    producer = open_transaction(txn_topic, "drill-sw-txn")
    out = drill(path, "switchover", tmp)
    assert out["passed"], json.dumps(out)
    assert out["fence_aborted_transactions"] == ["drill-sw-txn"], out
    assert out["aborted_transactions"] == [], out
    for r in regions:
        assert txn_values(r, txn_topic, "read_committed") == [b"committed"], r
    del producer
    assert out["rpo_records"] == 0 and out["quarantined_records"] == 0
    assert out["switchover_unavailable_ms"] is not None
    live = check_converged(regions, out["topic"])
    assert len(live) == out["acknowledged"] + 0 or len(live) >= out["acknowledged"]
    assert sum(quarantine_count(r, out["topic"]) for r in regions) == 0
    # The topology is left as found: east is primary again, nothing fenced, no cut.
    for r in regions:
        s = state(r, tmp)
        assert s["rules"]["*"]["primary"] == "east" and not s["rules"]["*"]["fenced"] and not s["cuts"], s


def txn_values(region: str, topic: str, isolation: str) -> list:
    """Every value of partition 0 of `topic` in `region`, read with `isolation`."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition
    c = Consumer({"bootstrap.servers": f"127.0.0.1:{KAFKA[region]}", "group.id": "txn-check",
                  "isolation.level": isolation, "enable.partition.eof": True})
    out = []
    try:
        c.assign([TopicPartition(topic, 0, 0)])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None:
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    break
                continue
            out.append(m.value())
    finally:
        c.close()
    return out


def open_transaction(topic: str, txn_id: str = "drill-txn"):
    """In east: a committed transaction, then one left open; both mirrored before returning.
    Returns the open one's producer."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    a = AdminClient({"bootstrap.servers": f"127.0.0.1:{KAFKA['east']}"})
    a.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(30)
    p = Producer({"bootstrap.servers": f"127.0.0.1:{KAFKA['east']}", "transactional.id": txn_id,
                  "transaction.timeout.ms": 900000})
    p.init_transactions(30)
    p.begin_transaction()
    p.produce(topic, value=b"committed", partition=0)
    p.commit_transaction(30)
    p.begin_transaction()
    p.produce(topic, value=b"open", partition=0)
    p.flush(30)
    deadline = time.monotonic() + 30
    while txn_values("west", topic, "read_uncommitted") != [b"committed", b"open"]:
        assert time.monotonic() < deadline, "the transactions reach the mirror"
        time.sleep(0.3)
    # In the mirror region read_committed sees exactly the committed transaction.
    assert txn_values("west", topic, "read_committed") == [b"committed"]
    return p


def test_region_loss_reports_the_loss_it_quarantines(running):
    path, regions, u, tmp = running
    # A transaction open in the primary when it is lost: the new primary aborts it and the
    # drill's report names it.
    txn_topic = f"drill-txn-{int(time.time() * 1000)}"
    producer = open_transaction(txn_topic)
    # `ferry status` shows the partition held at the open transaction's first offset.
    st = subprocess.run([str(FERRY_BIN), "status", "--topology", str(path), "--json", "--certs", str(tmp)],
                        capture_output=True, timeout=60)
    rows = [p for p in json.loads(st.stdout)["partitions"] if p["topic"] == txn_topic]
    assert rows and all((p["source_last_stable"], p["source_log_end"]) == (2, 3) for p in rows), rows
    out = drill(path, "region-loss", tmp)
    assert out["passed"], json.dumps(out)
    check_converged(regions, out["topic"])
    aborted = [a for a in out["aborted_transactions"] if a["topic"] == txn_topic]
    assert len(aborted) == 1 and aborted[0]["first_offset"] == 2, out["aborted_transactions"]
    for r in regions:
        assert txn_values(r, txn_topic, "read_committed") == [b"committed"], r
        assert txn_values(r, txn_topic, "read_uncommitted") == [b"committed", b"open"], r
    del producer
    counted = sum(quarantine_count(r, out["topic"]) for r in regions)
    # The primary took writes for a second after it was cut off: they are lost, and quarantined.
    assert counted > 0
    # Every lost acknowledged record is quarantined; the quarantine may also hold records the
    # producer never heard back about (the answer was cut off with the region), which are not RPO.
    assert counted == out["quarantined_records"], (out, counted)
    assert out["rpo_records"] == counted - out["quarantined_unacknowledged"], (out, counted)
    assert out["rto_seconds"] is not None
    assert out["write_windows_overlap"] is False


def test_link_loss_under_lease_fencing_never_overlaps_writes(running):
    path, regions, u, tmp = running
    out = drill(path, "link-loss", tmp)
    assert out["passed"], json.dumps(out)
    check_converged(regions, out["topic"])
    counted = sum(quarantine_count(r, out["topic"]) for r in regions)
    assert counted == out["quarantined_records"], (out, counted)
    assert out["rpo_records"] == counted - out["quarantined_unacknowledged"], (out, counted)
    if len(regions) == 2:
        # Two regions: the cut-off primary loses its majority, stops, and west takes over after it.
        assert out["rto_seconds"] is not None and out["write_windows_overlap"] is False, out
    else:
        # Three regions: east still reaches south, keeps its lease, and west may not take over.
        assert out["rto_seconds"] is None and out["rpo_records"] == 0, out


def test_region_loss_with_sigkill_when_the_drill_runs_the_topology(tmp_path):
    """`--spawn`: the drill runs local.toml's processes itself, SIGKILLs the primary region's broker
    and gateway, fails over, restarts them for the rejoin, fails back and stops everything."""
    deadline = time.monotonic() + 20
    while any(port_open("127.0.0.1", p) for p in (19092, 19095, 29092, 29095)):
        assert time.monotonic() < deadline, "local.toml's ports are in use"
        time.sleep(0.2)
    path = TOPOLOGIES["local"][0]
    p = subprocess.run([str(FERRY_BIN), "drill", "--topology", str(path), "--scenario", "region-loss", "--phase", "2s",
                        "--json", "--spawn", str(tmp_path / "data")], capture_output=True, timeout=300)
    out = json.loads(p.stdout)
    assert p.returncode == 0 and out["passed"], json.dumps(out) + p.stderr.decode()[-2000:]
    events = [e["event"] for e in out["timeline"]]
    assert any("SIGKILL every process of east" in e for e in events), events
    assert any("east restarted" in e for e in events) and any("east rejoined" in e for e in events), events
    # What east acknowledged but had not shipped when it was killed is lost to the live topic
    # and sits in east's quarantine; nothing else is lost.
    assert out["rpo_records"] == out["quarantined_records"] - out["quarantined_unacknowledged"], out
    assert out["rto_seconds"] is not None and out["write_windows_overlap"] is False, out
    # The drill stopped every process it started.
    assert not any(port_open("127.0.0.1", p) for p in (19092, 29092))


def test_region_loss_of_a_cluster_when_the_drill_runs_the_clustered_topology(tmp_path):
    """`--spawn` with topology/clustered.toml as shipped: the drill starts two regions of three
    brokers and an etcd each, SIGKILLs every process of east (its etcd too), fails over to west,
    starts east again (the cluster re-forms from its etcd data), and east rejoins: the leader of
    each partition moves east's divergent tail to the quarantine and every follower truncates
    with it. The drill reads every region through each partition's leader."""
    import os
    import shutil
    if shutil.which("etcd") is None:
        if os.environ.get("FERRY_REQUIRE_ETCD") == "1":
            raise RuntimeError("etcd is not on PATH and FERRY_REQUIRE_ETCD=1")
        pytest.skip("etcd is not on PATH (apt-get install etcd-server)")
    ports = (19092, 19192, 19292, 19095, 12379, 29092, 29192, 29292, 29095, 22379)
    deadline = time.monotonic() + 20
    while any(port_open("127.0.0.1", p) for p in ports):
        assert time.monotonic() < deadline, "clustered.toml's ports are in use"
        time.sleep(0.2)
    path = REPO / "topology" / "clustered.toml"
    p = subprocess.run([str(FERRY_BIN), "drill", "--topology", str(path), "--scenario", "region-loss", "--phase", "2s",
                        "--json", "--spawn", str(tmp_path / "data")], capture_output=True, timeout=420)
    out = json.loads(p.stdout)
    assert p.returncode == 0 and out["passed"], json.dumps(out) + p.stderr.decode()[-3000:]
    events = [e["event"] for e in out["timeline"]]
    assert any("SIGKILL every process of east" in e for e in events), events
    assert any("east restarted" in e for e in events) and any("east rejoined" in e for e in events), events
    assert out["rpo_records"] == out["quarantined_records"] - out["quarantined_unacknowledged"], out
    assert out["rto_seconds"] is not None and out["write_windows_overlap"] is False, out
    assert not any(port_open("127.0.0.1", p) for p in ports)
