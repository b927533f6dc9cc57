"""Failover with real processes on loopback: `ferry failover` moves a topic rule's primary
between regions through the gateways' admin APIs. A planned switchover loses nothing and
reverses the mirror direction; a forced failover while the old primary is cut off, followed by
the cut healing, quarantines exactly the old primary's divergent tail and leaves both regions
with the same records at every offset."""
from __future__ import annotations

import json
import subprocess
import time
import urllib.request

import pytest

from cli_support import admin_call
from conftest import ANSI, EXTERNAL, FERRY_BIN
from test_mirror import PARTITIONS, end_offsets, produce, read_all, regions_factory, wait_mirrored  # noqa: F401

pytestmark = pytest.mark.skipif(bool(EXTERNAL), reason="ferry-only: gateways")


def admin(r, region: str, method: str, path: str, body: dict | None = None) -> dict:
    text = r.topology.read_text()
    # the admin port of a region, as written by Regions
    port = int(text.split(f"[regions.{region}.gateway]")[1].split("admin = \"127.0.0.1:")[1].split('"')[0])
    status, out = admin_call(port, r.certs, method, path, body)
    assert status == 200, (status, out)
    return out


def failover(r, to: str, *extra: str) -> dict:
    p = subprocess.run([str(FERRY_BIN), "failover", "--topology", str(r.topology), "--to", to, "--json", *extra],
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode() + "\n" + r.logs()
    return json.loads(p.stdout)


def all_records(bootstrap: str, topic: str, ends: list[int]) -> list:
    out = []
    for p in range(PARTITIONS):
        out += [(p, *rec) for rec in read_all(bootstrap, topic, p, ends[p])]
    return out


def local(bootstrap: str, topic: str) -> dict:
    """Every record a broker holds, read from that broker itself with `ferry consume` (a Kafka
    client would follow Metadata to the primary region after a failover):
    {(partition, offset): (key, value)}."""
    p = subprocess.run([str(FERRY_BIN), "consume", "-b", bootstrap, topic, "--from-beginning", "--json",
                        "--idle-exit", "1s"], capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    out = {}
    for line in p.stdout.decode().splitlines():
        j = json.loads(line)
        out[(j["partition"], j["offset"])] = (j.get("key"), j.get("value"))
    return out


def wait_same(r, regions: list[str], topic: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        logs = [local(r.bootstrap(x), topic) for x in regions]
        if all(l == logs[0] for l in logs[1:]):
            return logs[0]
        assert time.monotonic() < deadline, f"{regions} differ: {[len(l) for l in logs]}\n{r.logs()}"
        time.sleep(0.5)


def text(acked: dict) -> dict:
    return {k: (key.decode(), value.decode()) for k, (key, value, _h, _ts) in acked.items()}


def wait_state(r, region: str, epoch: int, primary: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    s = None
    while time.monotonic() < deadline:
        s = admin(r, region, "GET", "/v1/state")
        if s["rules"]["*"]["epoch"] == epoch and s["rules"]["*"]["primary"] == primary:
            return s
        time.sleep(0.2)
    raise AssertionError(f"{region} state {s}")


def test_planned_switchover_loses_nothing_reverses_the_mirror_and_fails_back(regions_factory):
    r = regions_factory(["east", "west"])
    topic = "switch"
    acked = produce(r.bootstrap("east"), topic, 3_000)
    out = failover(r, "west")["rules"][0]
    # Epochs: the next multiple of 256 plus the region's position (east 0, west 1).
    assert (out["from"], out["to"], out["epoch"], out["forced"]) == ("east", "west", 257, False), out
    assert out["write_unavailable_ms"] >= 0
    # Lag 0 at the switch: west holds everything east acknowledged, at the same offsets.
    assert local(r.bootstrap("west"), topic) == local(r.bootstrap("east"), topic) == text(acked)
    wait_state(r, "east", 257, "west")
    # A producer still bootstrapped in east learns from Metadata that west leads now (east
    # itself answers NOT_LEADER_OR_FOLLOWER to writes); west takes them and ships them to east.
    acked.update(produce(r.bootstrap("east"), topic, 1_000, start=3_000))
    acked.update(produce(r.bootstrap("west"), topic, 1_000, start=4_000))
    assert wait_same(r, ["west", "east"], topic) == text(acked)
    # `ferry status` follows the failover: the link now runs west -> east.
    st = subprocess.run([str(FERRY_BIN), "status", "--topology", str(r.topology), "--json"], capture_output=True,
                        timeout=60)
    rows = [p for p in json.loads(st.stdout)["partitions"] if p["topic"] == topic]
    assert len(rows) == PARTITIONS and all(
        (p["source"], p["mirror"], p["lag_records"]) == ("west", "east", 0) for p in rows), rows
    # Failback is a planned switchover back.
    back = failover(r, "east")["rules"][0]
    assert (back["from"], back["to"], back["epoch"]) == ("west", "east", 512), back
    acked.update(produce(r.bootstrap("east"), topic, 1_000, start=5_000))
    assert wait_same(r, ["east", "west"], topic) == text(acked)
    want = end_offsets(r.bootstrap("east"), topic)
    assert sum(want) == len(acked) == 6_000
    east = all_records(r.bootstrap("east"), topic, want)
    west = all_records(r.bootstrap("west"), topic, want)
    assert east == west
    got = {(p, o): (k, v, h, ts) for (p, o, k, v, h, ts) in east}
    assert got == acked
    # Nothing was quarantined.
    s = subprocess.run([str(FERRY_BIN), "topics", "--bootstrap", r.bootstrap("east")], capture_output=True, timeout=30)
    assert b"__ferry.quarantine" not in s.stdout


def test_forced_failover_then_rejoin_quarantines_exactly_the_divergent_tail(regions_factory):
    r = regions_factory(["east", "west"])
    topic = "forced"
    acked = produce(r.bootstrap("east"), topic, 2_000)
    shipped = end_offsets(r.bootstrap("east"), topic)
    wait_mirrored(r, "west", topic, shipped)
    # Cut the link both ways; east (fencing = none) keeps taking writes that never reach west.
    admin(r, "east", "POST", "/v1/cut", {"peer": "west"})
    admin(r, "west", "POST", "/v1/cut", {"peer": "east"})
    divergent = produce(r.bootstrap("east"), topic, 500, start=2_000)
    out = failover(r, "west", "--force")["rules"][0]
    assert (out["from"], out["to"], out["epoch"], out["forced"]) == ("east", "west", 257, True), out
    assert end_offsets(r.bootstrap("west"), topic) == shipped
    acked_west = produce(r.bootstrap("west"), topic, 300, start=10_000)
    # east, still cut off, has the divergent tail only.
    assert len(local(r.bootstrap("east"), topic)) == 2_500
    # `ferry status` reports east's tail as a divergence from the new primary, not as lag.
    st = subprocess.run([str(FERRY_BIN), "status", "--topology", str(r.topology), "--json"], capture_output=True,
                        timeout=60)
    rows = {p["partition"]: p for p in json.loads(st.stdout)["partitions"] if p["topic"] == topic}
    assert len(rows) == PARTITIONS and all((p["source"], p["mirror"]) == ("west", "east") for p in rows.values())
    tails = {pp for (pp, _o) in divergent}
    assert tails, divergent
    for pp, row in rows.items():
        if pp in tails:
            assert row["diverged_at"] == shipped[pp] and "epoch history" in row["divergence"], row
        else:
            assert row["diverged_at"] is None, row
    # Heal: east learns epoch 257 from west's heartbeats, moves its divergent tail to the
    # quarantine, and becomes a mirror of west.
    admin(r, "east", "POST", "/v1/cut", {"peer": "west", "cut": False})
    admin(r, "west", "POST", "/v1/cut", {"peer": "east", "cut": False})
    wait_state(r, "east", 257, "west")
    live = wait_same(r, ["west", "east"], topic)
    assert live == text({**acked, **acked_west}), "every acknowledged record but the divergent tail"
    want = end_offsets(r.bootstrap("west"), topic)
    west = all_records(r.bootstrap("west"), topic, want)
    live = {(p, o): (k, v, h, ts) for (p, o, k, v, h, ts) in west}
    for key, rec in {**{k: v for k, v in acked.items()}, **acked_west}.items():
        assert live[key] == rec
    # The quarantine holds exactly the divergent tail, with its original offsets.
    q = f"__ferry.quarantine.{topic}"
    qends = end_offsets(r.bootstrap("east"), q)
    assert sum(qends) == len(divergent) == 500
    quarantined = {}
    for p in range(PARTITIONS):
        for (o, k, v, h, ts) in read_all(r.bootstrap("east"), q, p, qends[p]):
            hd = dict((hk, hv) for hk, hv in h if hk.startswith("ferry.original."))
            assert hd["ferry.original.region"] == b"east" and hd["ferry.original.epoch"] == b"0"
            assert int(hd["ferry.original.partition"]) == p
            orig = [(hk, hv) for hk, hv in h if not hk.startswith("ferry.original.")]
            quarantined[(p, int(hd["ferry.original.offset"]))] = (k, v, orig, ts)
    assert quarantined == divergent

    # `ferry quarantine`: list, show, replay into the live topic in its current primary (west).
    def ferry(*a):
        p = subprocess.run([str(FERRY_BIN), *a, "--topology", str(r.topology)], capture_output=True, timeout=120)
        assert p.returncode == 0, p.stderr.decode()
        return p.stdout.decode()

    rows = json.loads(ferry("quarantine", "list", "--json"))
    assert [(x["region"], x["topic"], x["records"]) for x in rows] == [("east", topic, 500)], rows
    shown = [json.loads(line) for line in ferry("quarantine", "show", topic, "--region", "east").splitlines()]
    assert sorted((x["partition"], x["original_offset"]) for x in shown) == sorted(divergent)
    assert all(x["original_region"] == "east" and x["original_epoch"] == 0 for x in shown)
    before = local(r.bootstrap("west"), topic)
    assert "replayed 500" in ferry("quarantine", "replay", topic, "--region", "east")
    after = wait_same(r, ["west", "east"], topic)
    added = sorted(v for k, v in after.items() if k not in before)
    assert added == sorted((k.decode(), v.decode()) for (k, v, _h, _ts) in divergent.values())


def test_moving_a_rule_to_its_fenced_primary_lifts_the_fence(regions_factory):
    """A switchover that could not finish (the target never caught up, then the old primary's
    unfence failed) leaves the old primary fenced: `ferry failover --to` that primary lifts it."""
    r = regions_factory(["east", "west"])
    topic = "stuck"
    acked = produce(r.bootstrap("east"), topic, 100)
    # Without lease fencing a fence never lapses: `lapse_ms` is ignored.
    fenced = admin(r, "east", "POST", "/v1/fence", {"patterns": ["*"], "fenced": True, "lapse_ms": 500})
    assert fenced["fenced"] is True and sum(fenced["ends"]["*"][topic]) == 100, fenced
    assert fenced["epochs"]["*"][topic], fenced
    assert fenced["fence_until_ms"] is None, fenced
    time.sleep(1.5)
    p = subprocess.run([str(FERRY_BIN), "produce", "-b", r.bootstrap("east"), topic], input=b"x\n",
                       capture_output=True, timeout=60)
    assert p.returncode != 0 and "fenced" in p.stderr.decode(), p.stderr.decode()
    out = failover(r, "east")["rules"][0]
    assert (out["from"], out["to"], out["epoch"]) == ("east", "east", 0), out
    assert "unfenced" in out["note"], out
    assert admin(r, "east", "GET", "/v1/state")["rules"]["*"]["fenced"] is False
    acked.update(produce(r.bootstrap("east"), topic, 100, start=100))
    assert len(acked) == 200


def test_under_lease_fencing_an_abandoned_switchovers_fence_lapses(regions_factory):
    """Simulator finding 10: a switchover that fenced the primary and then went away (its
    operator or its target lost) must not leave the rule without writes for good. Under lease
    fencing the fence carries a deadline (`lapse_ms`), kept in the durable failover state; past
    it, and with the rule still at the same epoch, the primary's gateway lifts it."""
    r = regions_factory(["east", "west"], failover='fencing = "lease"\nlease = "2s"\nheartbeat = "500ms"')
    topic = "lapse"
    acked = produce(r.bootstrap("east"), topic, 100)
    fenced = admin(r, "east", "POST", "/v1/fence", {"patterns": ["*"], "fenced": True, "lapse_ms": 4000})
    until = fenced["fence_until_ms"]
    assert fenced["fenced"] is True and until > time.time() * 1000, fenced
    state = admin(r, "east", "GET", "/v1/state")["rules"]["*"]
    assert state["fenced"] is True and state["fence_until_ms"] == until, state
    p = subprocess.run([str(FERRY_BIN), "produce", "-b", r.bootstrap("east"), topic], input=b"x\n",
                       capture_output=True, timeout=60)
    assert p.returncode != 0 and "fenced" in p.stderr.decode(), p.stderr.decode()
    # The fence is durable: a SIGKILLed broker comes back fenced, deadline and all.
    r.brokers["east"].kill()
    r.brokers["east"].start()
    state = admin(r, "east", "GET", "/v1/state")["rules"]["*"]
    assert state["fenced"] is True and state["fence_until_ms"] == until, state
    deadline = time.monotonic() + 30
    while admin(r, "east", "GET", "/v1/state")["rules"]["*"]["fenced"]:
        assert time.monotonic() < deadline, r.logs()
        time.sleep(0.2)
    assert time.time() * 1000 >= until, "lifted before its deadline"
    state = admin(r, "east", "GET", "/v1/state")["rules"]["*"]
    assert state["epoch"] == 0 and state["primary"] == "east" and "fence_until_ms" not in state, state
    assert "the fence lapsed" in ANSI.sub("", r.gateways["east"].text())
    acked.update(produce(r.bootstrap("east"), topic, 100, start=100))
    assert len(acked) == 200
    want = end_offsets(r.bootstrap("east"), topic)
    assert sum(want) == 200
    wait_mirrored(r, "west", topic, want)
