"""Consumer groups end to end: the classic rebalance protocol with real clients (confluent-kafka
members as subprocesses, Kafka 4.4 Java console consumers), committed offsets across member and
broker restarts, the coordinator's error codes on raw frames, and `ferry groups`.

Session timeouts are 6 s (the broker's minimum); every wait is bounded by a multiple of it.
"""
from __future__ import annotations

import functools
import os
import threading
import time
import uuid
from collections import defaultdict

import pytest

from conftest import FERRY_BIN, require_ferry
from groups_support import (
    ILLEGAL_GENERATION, MEMBER_ID_REQUIRED, NONE, REBALANCE_IN_PROGRESS, UNKNOWN_MEMBER_ID,
    UNKNOWN_TOPIC_OR_PARTITION, BackgroundProducer, GroupConn, JavaConsoleConsumer, Joiner, Member,
    assignment, committed_offsets, describe_group, end_offsets, ename, ferry_groups,
    parse_describe_offsets, stable_assignment,
)
from helpers import JavaTools, ck_create_topic, ck_produce, kafka_installed, topic_name, wait_until

SESSION_S = 6.0
PARTS = 6
# A clean leave must move partitions well within a session timeout; a SIGKILLed member is noticed
# after one session timeout, then the group rebalances: generous upper bounds.
LEAVE_BOUND_S = SESSION_S + 10
KILL_BOUND_S = 2 * SESSION_S + 15


def group_name(prefix: str) -> str:
    return f"e2e-{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def procs():
    """Every member/console consumer a test starts; SIGKILLed by pid at teardown if still alive."""
    started = []
    yield started
    for p in started:
        try:
            p.kill()
        except Exception:  # noqa: BLE001
            pass


# --------------------------------------------------------------------------- confluent-kafka members


class Run:
    """One group of confluent-kafka member subprocesses on a 6-partition topic."""

    def __init__(self, broker, tmp_path, procs, tag: str):
        self.b = broker
        self.tmp = tmp_path
        self.procs = procs
        self.topic = topic_name(f"grp-{tag}")
        self.group = group_name(tag)
        self.members: list[Member] = []
        self.reports: dict[str, tuple[int, int]] = {}
        ck_create_topic(broker.bootstrap, self.topic, PARTS)

    def start(self, n: int, gen: str) -> list[Member]:
        ms = []
        for i in range(n):
            name = f"{gen}-m{i}"
            m = Member(self.b.bootstrap, self.topic, self.group, self.tmp / f"{name}.jsonl", name)
            self.procs.append(m)
            self.members.append(m)
            ms.append(m)
        return ms

    def assignments(self, ms) -> dict[str, list[int] | None]:
        return {m.name: m.assignment() for m in ms}

    def covered(self, ms) -> bool:
        """Each member holds partitions, disjoint, together all of them."""
        a = self.assignments(ms)
        if any(not v for v in a.values()):
            return False
        flat = sorted(p for v in a.values() for p in v)
        return flat == list(range(PARTS))

    def wait_covered(self, ms, timeout: float, what: str):
        for m in ms:
            assert m.alive(), f"member {m.name} died:\n{m.output()}"
        try:
            wait_until(lambda: self.covered(ms), timeout, what, interval=0.2)
        except AssertionError as e:
            raise AssertionError(f"{e}; assignments: {self.assignments(ms)}\n{self.diag()}") from None

    def produce(self, values: list[str]):
        reps = ck_produce(self.b.bootstrap, self.topic,
                          [{"key": f"k{v}".encode(), "value": v.encode()} for v in values])
        for p, o, v in reps:
            self.reports[v.decode()] = (p, o)

    def seen(self, ms=None) -> dict[str, list[dict]]:
        """value -> every consumption of it: dicts with member name, p, o, t."""
        out = defaultdict(list)
        for m in ms if ms is not None else self.members:
            for e in m.records():
                out[e["v"]].append(dict(e, m=m.name))
        return out

    def wait_consumed(self, values, timeout: float, ms=None):
        want = set(values)

        def missing():
            s = self.seen(ms)
            return [v for v in want if v not in s]
        try:
            wait_until(lambda: not missing(), timeout, f"{len(want)} records consumed", interval=0.3)
        except AssertionError:
            miss = missing()
            raise AssertionError(f"{len(miss)} of {len(want)} records never consumed, e.g. "
                                 f"{sorted(miss)[:5]} at {[self.reports.get(v) for v in sorted(miss)[:5]]}\n"
                                 + self.diag()) from None

    def check_positions(self):
        """Every consumed record carries the partition/offset its delivery report gave."""
        bad = [(v, c["m"], (c["p"], c["o"]), self.reports.get(v)) for v, cs in self.seen().items()
               for c in cs if self.reports.get(v) != (c["p"], c["o"])]
        assert not bad, f"records consumed at the wrong partition/offset: {bad[:5]}"

    def diag(self) -> str:
        lines = []
        for m in self.members:
            evs = [e for e in m.events() if e["e"] != "r"]
            bad = [e for e in evs if e["e"] in ("cerr", "error", "lost") or (e["e"] == "c" and e["err"])]
            lines.append(f"  {m.name} alive={m.alive()} records={len(m.records())} "
                         f"events={[(e['e'], e.get('parts')) for e in evs if e['e'] in ('assign', 'revoke', 'lost', 'closed')]}")
            for e in bad[:8]:
                lines.append(f"    {e}")
        return "member logs:\n" + "\n".join(lines)

    def stop_all(self):
        for m in self.members:
            if m.alive():
                m.stop()

    def settle(self, gen: str, n_values: int = 1500) -> list[str]:
        """Start 3 members, wait until they share the 6 partitions, produce n_values records and
        check each was consumed by exactly one member."""
        ms = self.start(3, gen)
        self.wait_covered(ms, 30, "3 members sharing 6 partitions")
        values = [f"{gen}-a-{i:05d}" for i in range(n_values)]
        self.produce(values)
        self.wait_consumed(values, 60)
        dups = {v: cs for v, cs in self.seen().items() if len(cs) > 1}
        assert not dups, (f"{len(dups)} records delivered more than once with 3 stable members, e.g. "
                          f"{list(dups.items())[:3]}\n{self.diag()}")
        by_member = defaultdict(set)
        for v, cs in self.seen().items():
            by_member[cs[0]["m"]].add(cs[0]["p"])
        assert len(by_member) == 3, f"only {sorted(by_member)} consumed anything"
        return values


def _ck_available():
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        pytest.fail("confluent-kafka is not installed in this Python")


def test_ck_three_members_exactly_once_and_clean_leave(broker, tmp_path, procs):
    _ck_available()
    run = Run(broker, tmp_path, procs, "leave")
    first = run.settle("g1")
    m0, m1, m2 = run.members
    left_parts = m2.assignment()

    # Records keep coming while m2 closes its consumer (commit, LeaveGroup).
    values = [f"g1-b-{i:05d}" for i in range(2000)]
    bg = BackgroundProducer(broker.bootstrap, run.topic, values, rate=250)
    bg.start()
    time.sleep(2)
    t_leave = time.time()
    m2.stop()
    run.wait_covered([m0, m1], LEAVE_BOUND_S, f"{left_parts} of the leaving member moved to the other two")
    moved_after = time.time() - t_leave
    run.reports.update(bg.result())
    run.wait_consumed(first + values, 60)
    run.check_positions()

    seen = run.seen()
    dups = {v: cs for v, cs in seen.items() if len(cs) > 1}
    assert not dups, (
        f"{len(dups)} records delivered more than once although no member died (m2 left cleanly "
        f"holding {left_parts}; partitions moved after {moved_after:.1f}s), e.g.\n"
        + "\n".join(f"  {v}: {[(c['m'], c['p'], c['o']) for c in cs]}" for v, cs in list(dups.items())[:5])
        + "\n" + run.diag())
    # m2's partitions really went to the others: records produced after it left were read by them
    after = [v for v, cs in seen.items() if cs[0]["t"] > t_leave + moved_after and run.reports[v][0] in left_parts]
    assert after, "no record of the leaving member's partitions was consumed after it left"
    assert all(seen[v][0]["m"] != m2.name for v in after)
    run.stop_all()


def test_ck_member_sigkill_partitions_move_within_session_timeout(broker, tmp_path, procs):
    _ck_available()
    run = Run(broker, tmp_path, procs, "kill")
    first = run.settle("g1")
    m0, m1, m2 = run.members

    # production goes on well past the session timeout, through the rebalance
    values = [f"g1-b-{i:05d}" for i in range(3000)]
    bg = BackgroundProducer(broker.bootstrap, run.topic, values, rate=200)
    bg.start()
    time.sleep(2)
    killed_parts = m2.assignment()
    assert killed_parts, "m2 held no partition"
    m2.kill()
    t_kill = m2.killed_at
    run.wait_covered([m0, m1], KILL_BOUND_S, f"{killed_parts} of the SIGKILLed member moved to the other two")
    moved_after = time.time() - t_kill
    run.reports.update(bg.result())
    run.wait_consumed(first + values, 60)
    run.check_positions()

    # The killed member's last successful commit per partition: records it read at or after
    # that offset may legally be read again by the new owner; nothing else may be.
    k_committed = {}
    for e in m2.events():
        if e["e"] == "c":
            for p, o in e["ok"].items():
                k_committed[int(p)] = o
    bad = []
    ndup = 0
    for v, cs in run.seen().items():
        if len(cs) == 1:
            continue
        ndup += 1
        # (`seen` lists members in order, m2 last: find the killed member's read by name)
        killed = [c for c in cs if c["m"] == m2.name]
        ok = (len(cs) == 2 and len(killed) == 1
              and killed[0]["p"] in killed_parts and killed[0]["o"] >= k_committed.get(killed[0]["p"], 0))
        if not ok:
            bad.append((v, [(c["m"], c["p"], c["o"]) for c in cs]))
    assert not bad, (
        f"{len(bad)} of {ndup} duplicate deliveries are not explained by the killed member's "
        f"uncommitted records (it held {killed_parts}, last commits {k_committed}; partitions moved "
        f"after {moved_after:.1f}s), e.g.\n" + "\n".join(f"  {x}" for x in bad[:6]) + "\n" + run.diag())
    run.stop_all()


def test_ck_committed_offsets_survive_member_and_broker_restart(start_broker, tmp_path, procs):
    _ck_available()
    broker = start_broker()
    run = Run(broker, tmp_path, procs, "restart")
    run.settle("g1", 900)
    run.stop_all()
    ends = end_offsets(broker.bootstrap, run.topic, PARTS)
    c1 = committed_offsets(broker.bootstrap, run.group, run.topic, PARTS)
    assert c1 == ends, f"after every record was consumed and all members stopped: committed {c1}, end {ends}"

    def resume(gen: str, committed: dict):
        """Produce while no member runs, start 3 new members, produce more: they must read every
        new record and nothing below the committed offsets."""
        down = [f"{gen}-down-{i:04d}" for i in range(300)]
        run.produce(down)
        ms = run.start(3, gen)
        run.wait_covered(ms, 30, f"{gen}: 3 restarted members sharing 6 partitions")
        up = [f"{gen}-up-{i:04d}" for i in range(300)]
        run.produce(up)
        run.wait_consumed(down + up, 60, ms)
        old = [(c["m"], c["p"], c["o"], v) for v, cs in run.seen(ms).items() for c in cs
               if c["o"] < committed[c["p"]]]
        assert not old, (f"{gen}: restarted members re-read {len(old)} records below the committed offsets "
                         f"{committed}, e.g. {old[:5]}\n{run.diag()}")
        extra = set(run.seen(ms)) - set(down) - set(up)
        assert not extra, f"{gen}: restarted members read records consumed before: {sorted(extra)[:5]}"
        run.check_positions()
        for m in ms:
            m.stop()
        ends = end_offsets(broker.bootstrap, run.topic, PARTS)
        c = committed_offsets(broker.bootstrap, run.group, run.topic, PARTS)
        assert c == ends, f"{gen}: committed {c} != end offsets {ends} after all members stopped"
        return c

    c2 = resume("g2", c1)

    # SIGKILL the broker, restart it on the same port and data dir.
    require_ferry(broker)
    broker.restart()
    c_after = wait_until(lambda: _try(lambda: committed_offsets(broker.bootstrap, run.group, run.topic, PARTS)),
                         30, "committed offsets readable after the broker restart")
    assert c_after == c2, f"committed offsets changed across a broker SIGKILL/restart: before {c2}, after {c_after}"
    desc = ferry_groups(FERRY_BIN, broker.bootstrap, "describe", run.group).stdout
    rows = parse_describe_offsets(desc, run.topic)
    assert {p: r["committed"] for p, r in rows.items()} == c2, f"ferry groups describe after restart:\n{desc}"
    assert all(r["lag"] == 0 for r in rows.values()), desc
    resume("g3", c2)


def test_ck_running_members_survive_broker_sigkill(start_broker, tmp_path, procs):
    """Members keep running while the broker is SIGKILLed and restarted: the restarted
    coordinator replays their group (its GroupMetadata records) with the committed offsets, and
    they carry on at the committed offsets, with no rebalance when the broker was back within
    their session, reading every record produced afterwards."""
    _ck_available()
    broker = start_broker()
    require_ferry(broker)
    run = Run(broker, tmp_path, procs, "bkill")
    first = run.settle("g1", 900)
    ends = end_offsets(broker.bootstrap, run.topic, PARTS)
    wait_until(lambda: committed_offsets(broker.bootstrap, run.group, run.topic, PARTS) == ends, 30,
               "every consumed record committed")
    t_kill = time.time()
    broker.restart()
    t_restart = time.time()
    c_after = wait_until(lambda: _try(lambda: committed_offsets(broker.bootstrap, run.group, run.topic, PARTS)),
                         30, "committed offsets readable after the broker restart")
    assert c_after == ends, f"committed offsets after the broker SIGKILL/restart: {c_after}, before: {ends}"
    # the same member processes form the group again on the restarted broker
    run.wait_covered(run.members, KILL_BOUND_S + 30, "the 3 running members sharing 6 partitions again")
    values = [f"g1-after-{i:05d}" for i in range(900)]
    run.produce(values)
    run.wait_consumed(values, 60)
    run.check_positions()
    again = {v: [(c["m"], c["p"], c["o"]) for c in cs] for v, cs in run.seen().items()
             if v in set(first) and len(cs) > 1}
    assert not again, (f"{len(again)} records committed before the broker restart were delivered again, e.g. "
                       f"{list(again.items())[:5]}\n{run.diag()}")
    assert all(m.alive() for m in run.members), run.diag()
    if t_restart - t_kill < SESSION_S / 2:
        # Back well within the members' session: the group carried on with its generation.
        reassigned = [(i, e) for i, m in enumerate(run.members) for e in m.events()
                      if e["e"] == "assign" and e["t"] > t_kill]
        assert not reassigned, f"a rebalance after the broker restart: {reassigned}\n{run.diag()}"
    run.stop_all()


def _try(fn):
    try:
        return fn()
    except Exception:  # noqa: BLE001
        return None


# --------------------------------------------------------------------------- Java console consumers


@functools.lru_cache(maxsize=1)
def _tools() -> JavaTools:
    return JavaTools()


@pytest.fixture(scope="module")
def java():
    if not kafka_installed():
        if os.environ.get("FERRY_REQUIRE_JAVA"):
            pytest.fail("FERRY_REQUIRE_JAVA is set but Apache Kafka's Java tools are not installed")
        pytest.skip("Apache Kafka Java tools not installed (set FERRY_REQUIRE_JAVA=1 to make this a failure)")
    return _tools()


def test_java_three_console_consumers_share_and_take_over(java, broker, tmp_path, procs):
    topic = topic_name("grp-java")
    group = group_name("java")
    ck_create_topic(broker.bootstrap, topic, PARTS)
    cs = []
    for i in range(3):
        c = JavaConsoleConsumer(java, broker.bootstrap, topic, group, tmp_path / f"java-c{i}.txt")
        procs.append(c)
        cs.append(c)

    def diag():
        return "\n".join(f"--- c{i} alive={c.alive()} records={len(c.records())} stderr:\n{c.stderr_tail()}"
                         for i, c in enumerate(cs))

    try:
        owned = wait_until(lambda: stable_assignment(broker.bootstrap, group, topic, 3, PARTS), 90,
                           "3 Java consumers sharing 6 partitions (Stable)", interval=0.5)
    except AssertionError as e:
        raise AssertionError(f"{e}; group: {describe_group(broker.bootstrap, group)}\n{diag()}") from None

    values = [f"java-a-{i:05d}" for i in range(600)]
    reps = {v.decode(): (p, o) for p, o, v in ck_produce(
        broker.bootstrap, topic, [{"key": f"k{v}".encode(), "value": v.encode()} for v in values])}

    def seen(which=None):
        out = defaultdict(list)
        for i, c in enumerate(cs):
            if which is None or i in which:
                for p, o, v in c.records():
                    out[v].append((i, p, o))
        return out

    def wait_all(vals, timeout, which=None):
        try:
            wait_until(lambda: set(vals) <= set(seen(which)), timeout, f"{len(vals)} records consumed", interval=0.5)
        except AssertionError as e:
            s = seen(which)
            miss = [v for v in vals if v not in s]
            raise AssertionError(f"{e}: {len(miss)} missing, e.g. {miss[:5]}\n{diag()}") from None

    wait_all(values, 60)
    s = seen()
    dups = {v: x for v, x in s.items() if len(x) > 1}
    assert not dups, f"{len(dups)} records delivered to more than one Java consumer: {list(dups.items())[:5]}"
    bad = [(v, x, reps[v]) for v, x in s.items() if (x[0][1], x[0][2]) != reps[v]]
    assert not bad, f"records at unexpected partition/offset: {bad[:5]}"
    # partitions per consumer: disjoint, and each consumer read only what the group assigned it
    parts_of = defaultdict(set)
    for v, x in s.items():
        parts_of[x[0][0]].add(x[0][1])
    assert len(parts_of) == 3 and sum(map(len, parts_of.values())) == PARTS, dict(parts_of)

    # Let the auto-commit (5 s) cover everything read so far, then SIGKILL one consumer.
    ends = end_offsets(broker.bootstrap, topic, PARTS)
    wait_until(lambda: committed_offsets(broker.bootstrap, group, topic, PARTS) == ends, 30,
               "auto-commit of every consumed record", interval=1)
    victim = 2
    cs[victim].kill()
    killed_parts = sorted(parts_of[victim])
    t_kill = time.monotonic()

    # records to all 6 partitions, produced steadily through session expiry and the rebalance
    after = [f"java-b-{i:05d}" for i in range(1200)]
    bg = BackgroundProducer(broker.bootstrap, topic, after, rate=80, round_robin=PARTS)
    bg.start()
    reps.update(bg.result(60))
    wait_all(after, KILL_BOUND_S + 30, which={0, 1})
    took = time.monotonic() - t_kill
    owned = wait_until(lambda: stable_assignment(broker.bootstrap, group, topic, 2, PARTS), 30,
                       "2 surviving consumers holding all 6 partitions", interval=0.5)
    s = seen()
    again = {v: x for v, x in s.items() if v in set(values) and len(x) > 1}
    assert not again, (f"records committed before the kill were delivered again: {list(again.items())[:5]}\n{diag()}")
    dups = {v: x for v, x in s.items() if v in set(after) and len(x) > 1}
    assert not dups, (f"{len(dups)} records produced after the kill (of the consumer holding {killed_parts}) were "
                      f"delivered more than once although the survivors read them: {list(dups.items())[:5]} "
                      f"(all read {took:.1f}s after the kill; assignment now {owned})\n{diag()}")
    for c in cs[:2]:
        assert c.alive(), diag()


# --------------------------------------------------------------------------- raw protocol


def _join_two(bootstrap, group, topic):
    """A joins and syncs alone (generation g1); B joins, A rejoins: generation g2 with both.
    Returns (connA, a_id, g1, connB, b_id, g2)."""
    a = GroupConn(bootstrap, timeout=30)
    a.wait_coordinator(group)
    # Kafka may still be loading a new __consumer_offsets partition (COORDINATOR_LOAD_IN_PROGRESS,
    # COORDINATOR_NOT_AVAILABLE, NOT_COORDINATOR): retry those for a bounded time.
    r = wait_until(lambda: (lambda r: r if r["error"] not in (14, 15, 16) else None)(
        a.join_group(group, "", topics=[topic])), 30, "JoinGroup past coordinator loading", interval=0.3)
    assert r["error"] == MEMBER_ID_REQUIRED and r["member_id"], f"first JoinGroup v5: {r}"
    a_id = r["member_id"]
    r = a.join_group(group, a_id, topics=[topic])
    assert r["error"] == NONE, f"JoinGroup with the handed-out id: {ename(r['error'])}"
    g1 = r["generation"]
    assert g1 > 0 and r["leader"] == a_id and r["member_id"] == a_id, r
    assert [m[0] for m in r["members"]] == [a_id], r
    s = a.sync_group(group, g1, a_id, {a_id: assignment({topic: [0, 1]})})
    assert s["error"] == NONE, ename(s["error"])
    assert s["assignment"] == assignment({topic: [0, 1]})
    assert a.heartbeat(group, g1, a_id) == NONE

    jb = Joiner(bootstrap, group, topics=[topic])
    jb.start()
    # A learns of the rebalance from its heartbeat, then rejoins.
    wait_until(lambda: a.heartbeat(group, g1, a_id) == REBALANCE_IN_PROGRESS, 2 * SESSION_S,
               "heartbeat answering REBALANCE_IN_PROGRESS after a second member joined", interval=0.2)
    ra = a.join_group(group, a_id, topics=[topic])
    rb = jb.get(2 * SESSION_S)
    assert ra["error"] == NONE and rb["error"] == NONE, (ra, rb)
    g2 = ra["generation"]
    assert g2 > g1 and rb["generation"] == g2, (g1, ra, rb)
    b_id = rb["member_id"]
    leader = ra["leader"]
    assert leader in (a_id, b_id) and rb["leader"] == leader
    lead, follow = (a, b_id) if leader == a_id else (jb.conn, a_id)
    assign = {a_id: assignment({topic: [0]}), b_id: assignment({topic: [1]})}
    # the follower's SyncGroup waits for the leader's: run it in a thread
    res = {}
    fconn = jb.conn if follow == b_id else a
    t = threading.Thread(target=lambda: res.update(f=fconn.sync_group(group, g2, follow)), daemon=True)
    t.start()
    time.sleep(0.2)
    sl = lead.sync_group(group, g2, leader, assign)
    t.join(2 * SESSION_S)
    assert not t.is_alive(), "follower SyncGroup got no answer"
    assert sl["error"] == NONE and res["f"]["error"] == NONE, (sl, res)
    assert res["f"]["assignment"] == assign[follow]
    return a, a_id, g1, jb.conn, b_id, g2


def test_raw_stale_generation_unknown_member_and_bad_partition(broker):
    topic = topic_name("grp-raw")
    group = group_name("raw")
    ck_create_topic(broker.bootstrap, topic, 2)
    a, a_id, g1, b, b_id, g2 = _join_two(broker.bootstrap, group, topic)
    try:
        # the current generation commits
        assert a.offset_commit(group, g2, a_id, {topic: {0: 5}}) == {(topic, 0): NONE}
        # a stale member: A's previous generation
        r = a.offset_commit(group, g1, a_id, {topic: {0: 7}})
        assert r == {(topic, 0): ILLEGAL_GENERATION}, f"commit with old generation {g1} (current {g2}): {r}"
        # an unknown member
        r = a.offset_commit(group, g2, "nobody-" + uuid.uuid4().hex, {topic: {0: 7}})
        assert r == {(topic, 0): UNKNOWN_MEMBER_ID}, f"commit from an unknown member: {r}"
        # a partition / topic that does not exist, next to a good one
        missing = topic_name("grp-missing")
        r = b.offset_commit(group, g2, b_id, {topic: {1: 3, 99: 1}, missing: {0: 1}})
        assert r == {(topic, 1): NONE, (topic, 99): UNKNOWN_TOPIC_OR_PARTITION,
                     (missing, 0): UNKNOWN_TOPIC_OR_PARTITION}, {k: ename(v) for k, v in r.items()}
        err, got = a.offset_fetch(group, {topic: [0, 1]})
        assert err == NONE and got == {(topic, 0): (5, NONE), (topic, 1): (3, NONE)}, got
        # the stale commits were not applied; heartbeats tell the same story
        assert a.heartbeat(group, g1, a_id) == ILLEGAL_GENERATION
        assert a.heartbeat(group, g2, "nobody") == UNKNOWN_MEMBER_ID
        assert a.heartbeat(group, g2, a_id) == NONE

        # a group that does not exist: generation -1 and no member id is a plain offset store...
        g_new = group_name("raw-new")
        r = a.offset_commit(g_new, -1, "", {topic: {0: 11}})
        assert r == {(topic, 0): NONE}, f"generation -1 commit for a new group: {r}"
        assert a.offset_fetch(g_new, {topic: [0]})[1] == {(topic, 0): (11, NONE)}
        # ...but with a generation it is ILLEGAL_GENERATION (OffsetCommit < v9), and nothing is stored
        g_none = group_name("raw-none")
        r = a.offset_commit(g_none, 3, "someone", {topic: {0: 11}})
        assert r == {(topic, 0): ILLEGAL_GENERATION}, f"commit with generation 3 to an unknown group: {r}"
        assert a.offset_fetch(g_none, {topic: [0]})[1] == {(topic, 0): (-1, NONE)}

        # after both leave, the empty group takes generation -1 commits again
        lr = a.leave_group(group, [a_id, b_id])
        assert lr["error"] == NONE and sorted(m[2] for m in lr["members"]) == [NONE, NONE], lr
        assert describe_group(broker.bootstrap, group)["state"] == "Empty"
        r = a.offset_commit(group, -1, "", {topic: {0: 2}})
        assert r == {(topic, 0): NONE}, f"generation -1 commit to the now empty group: {r}"
        assert a.offset_fetch(group, {topic: [0]})[1] == {(topic, 0): (2, NONE)}
    finally:
        a.close()
        b.close()


def test_raw_commit_states_follow_kafka(broker):
    """Kafka's classic coordinator (ClassicGroup.validateOffsetCommit) accepts a commit with the
    current generation while the group is PreparingRebalance - that is how consumers commit in
    onPartitionsRevoked before rejoining - refuses it with REBALANCE_IN_PROGRESS while
    CompletingRebalance, refuses a generation -1 / no-member commit with UNKNOWN_MEMBER_ID while
    the group has members, and answers a former member's commit to the empty group with
    UNKNOWN_MEMBER_ID."""
    topic = topic_name("grp-raws")
    group = group_name("raws")
    ck_create_topic(broker.bootstrap, topic, 2)
    a, a_id, g1, b, b_id, g2 = _join_two(broker.bootstrap, group, topic)
    wrong = {}
    try:
        r = a.offset_commit(group, -1, "", {topic: {0: 1}})[(topic, 0)]
        if r != UNKNOWN_MEMBER_ID:
            wrong["generation -1 / no member id while the group has 2 members"] = (ename(r), "25 (UNKNOWN_MEMBER_ID)")

        # A third member joins: PreparingRebalance; A and B have not rejoined yet.
        jc = Joiner(broker.bootstrap, group, topics=[topic])
        jc.start()
        wait_until(lambda: describe_group(broker.bootstrap, group)["state"] == "PreparingRebalance", 2 * SESSION_S,
                   "PreparingRebalance after a third member joined", interval=0.1)
        r = a.offset_commit(group, g2, a_id, {topic: {0: 4}})[(topic, 0)]
        if r != NONE:
            wrong["current generation while PreparingRebalance (commit before rejoining)"] = (ename(r), "0 (NONE)")

        # A and B rejoin -> CompletingRebalance until the leader syncs
        jb = threading.Thread(target=lambda: res.update(b=b.join_group(group, b_id, topics=[topic])), daemon=True)
        res = {}
        jb.start()
        ra = a.join_group(group, a_id, topics=[topic])
        jb.join(2 * SESSION_S)
        assert "b" in res, "B's JoinGroup got no answer"
        rc = jc.get(2 * SESSION_S)
        assert ra["error"] == NONE and res["b"]["error"] == NONE and rc["error"] == NONE, (ra, res, rc)
        g3 = ra["generation"]
        assert describe_group(broker.bootstrap, group)["state"] == "CompletingRebalance"
        r = a.offset_commit(group, g3, a_id, {topic: {0: 6}})[(topic, 0)]
        if r != REBALANCE_IN_PROGRESS:
            wrong["current generation while CompletingRebalance"] = (ename(r), "27 (REBALANCE_IN_PROGRESS)")

        # everyone leaves; A commits with its last generation to the empty group
        c_id = rc["member_id"]
        a.leave_group(group, [a_id, b_id, c_id])
        wait_until(lambda: describe_group(broker.bootstrap, group)["state"] == "Empty", 10, "Empty group")
        r = a.offset_commit(group, g3, a_id, {topic: {0: 8}})[(topic, 0)]
        if r != UNKNOWN_MEMBER_ID:
            wrong["former member with its last generation, group Empty"] = (ename(r), "25 (UNKNOWN_MEMBER_ID)")
        jc.conn.close()
    finally:
        a.close()
        b.close()
    assert not wrong, "OffsetCommit answers differing from Kafka's (got, Kafka's):\n" + "\n".join(
        f"  {k}: got {v[0]}, Kafka answers {v[1]}" for k, v in wrong.items())


# --------------------------------------------------------------------------- ferry groups


def test_ferry_groups_list_describe_reset(broker, tmp_path, procs):
    require_ferry(broker)
    _ck_available()
    topic = topic_name("grp-cli")
    group = group_name("cli")
    ck_create_topic(broker.bootstrap, topic, 3)
    ck_produce(broker.bootstrap, topic, [{"partition": i % 3, "value": f"cli-{i:03d}".encode()} for i in range(30)])
    m = Member(broker.bootstrap, topic, group, tmp_path / "cli-m0.jsonl", "cli-member-0")
    procs.append(m)
    wait_until(lambda: len({e["v"] for e in m.records()}) >= 30, 60, "the member consumed all 30 records")
    wait_until(lambda: committed_offsets(broker.bootstrap, group, topic, 3) == {0: 10, 1: 10, 2: 10}, 30,
               "committed offsets 10/10/10")

    out = ferry_groups(FERRY_BIN, broker.bootstrap, "list").stdout
    row = [line.split() for line in out.splitlines() if line.split()[:1] == [group]]
    assert row and row[0][1] == "Stable", f"ferry groups list does not show {group} as Stable:\n{out}"

    desc = ferry_groups(FERRY_BIN, broker.bootstrap, "describe", group).stdout
    assert "state Stable" in desc, desc
    g = describe_group(broker.bootstrap, group)
    assert len(g["members"]) == 1
    mid = g["members"][0]["member_id"]
    mline = [line for line in desc.splitlines() if line.startswith(mid)]
    assert mline and "cli-member-0" in mline[0], f"member {mid} (client cli-member-0) not described:\n{desc}"
    assert all(f"{topic}-{p}" in mline[0] for p in range(3)), f"assignment missing:\n{desc}"
    rows = parse_describe_offsets(desc, topic)
    assert rows == {p: {"committed": 10, "end": 10, "lag": 0, "member": mid} for p in range(3)}, desc

    # reset is refused while the group has a member, and changes nothing
    p = ferry_groups(FERRY_BIN, broker.bootstrap, "reset", group, "--topic", topic, "--to", "earliest",
                     "--execute", check=False)
    assert p.returncode != 0, f"reset of an active group succeeded:\n{p.stdout}\n{p.stderr}"
    assert "member" in (p.stdout + p.stderr).lower(), p.stderr
    assert committed_offsets(broker.bootstrap, group, topic, 3) == {0: 10, 1: 10, 2: 10}

    m.stop()
    ck_produce(broker.bootstrap, topic, [{"partition": 0, "value": f"cli-late-{i}".encode()} for i in range(5)])
    desc = ferry_groups(FERRY_BIN, broker.bootstrap, "describe", group).stdout
    assert "state Empty" in desc, desc
    rows = parse_describe_offsets(desc, topic)
    assert {q: (r["committed"], r["end"], r["lag"]) for q, r in rows.items()} == \
        {0: (10, 15, 5), 1: (10, 10, 0), 2: (10, 10, 0)}, desc

    # dry run: a plan, nothing committed
    p = ferry_groups(FERRY_BIN, broker.bootstrap, "reset", group, "--topic", topic, "--to", "earliest")
    assert "dry run" in p.stdout, p.stdout
    assert committed_offsets(broker.bootstrap, group, topic, 3) == {0: 10, 1: 10, 2: 10}
    ferry_groups(FERRY_BIN, broker.bootstrap, "reset", group, "--topic", topic, "--to", "earliest", "--execute")
    assert committed_offsets(broker.bootstrap, group, topic, 3) == {0: 0, 1: 0, 2: 0}
    ferry_groups(FERRY_BIN, broker.bootstrap, "reset", group, "--topic", topic, "--to", "offset:7", "--execute")
    assert committed_offsets(broker.bootstrap, group, topic, 3) == {0: 7, 1: 7, 2: 7}
    ferry_groups(FERRY_BIN, broker.bootstrap, "reset", group, "--topic", topic, "--to", "latest", "--execute")
    assert committed_offsets(broker.bootstrap, group, topic, 3) == {0: 15, 1: 10, 2: 10}
    ferry_groups(FERRY_BIN, broker.bootstrap, "reset", group, "--topic", topic, "--to", "earliest", "--execute")

    # a member started now resumes at the reset offsets: it reads everything again
    m2 = Member(broker.bootstrap, topic, group, tmp_path / "cli-m1.jsonl", "cli-member-1")
    procs.append(m2)
    wait_until(lambda: len(m2.records()) >= 35, 60, "the restarted member re-read all 35 records")
    recs = m2.records()
    assert sorted((e["p"], e["o"]) for e in recs) == sorted(
        [(0, o) for o in range(15)] + [(q, o) for q in (1, 2) for o in range(10)]), "re-read after reset"
    m2.stop()
