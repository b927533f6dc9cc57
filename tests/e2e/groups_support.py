"""Support for test_groups.py: consumer group wire frames, consumer-member subprocesses, Java
console consumers, and `ferry groups`.

Run as a script it is one confluent-kafka group member (see `member_main`):

    python groups_support.py member --bootstrap B --topic T --group G --log FILE [--name N]

Raw frames are built with kproto's struct primitives (hand-written, independent of the broker's
codec). Versions: JoinGroup v5, SyncGroup v3, Heartbeat v3, LeaveGroup v3, OffsetCommit v7,
OffsetFetch v5, DescribeGroups v4, FindCoordinator v1 - all non-flexible (request header v1, response header v0).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import kproto  # noqa: E402
from kproto import Reader, array, i8, i16, i32, i64, kbytes, string  # noqa: E402

# --------------------------------------------------------------------------- error codes

NONE = 0
UNKNOWN_TOPIC_OR_PARTITION = 3
ILLEGAL_GENERATION = 22
UNKNOWN_MEMBER_ID = 25
REBALANCE_IN_PROGRESS = 27
MEMBER_ID_REQUIRED = 79

ERROR_NAMES = {0: "NONE", 3: "UNKNOWN_TOPIC_OR_PARTITION", 15: "COORDINATOR_NOT_AVAILABLE",
               16: "NOT_COORDINATOR", 22: "ILLEGAL_GENERATION", 23: "INCONSISTENT_GROUP_PROTOCOL",
               25: "UNKNOWN_MEMBER_ID", 26: "INVALID_SESSION_TIMEOUT", 27: "REBALANCE_IN_PROGRESS",
               69: "GROUP_ID_NOT_FOUND", 79: "MEMBER_ID_REQUIRED", 82: "FENCED_INSTANCE_ID"}


def ename(code: int) -> str:
    return f"{code} ({ERROR_NAMES.get(code, '?')})"


API_OFFSET_COMMIT, API_OFFSET_FETCH, API_FIND_COORDINATOR, API_JOIN_GROUP, API_HEARTBEAT = 8, 9, 10, 11, 12
API_LEAVE_GROUP, API_SYNC_GROUP, API_DESCRIBE_GROUPS = 13, 14, 15

# --------------------------------------------------------------------------- consumer protocol


def subscription(topics: list[str]) -> bytes:
    """ConsumerProtocolSubscription v0."""
    return i16(0) + array([string(t) for t in topics]) + kbytes(None)


def assignment(parts: dict[str, list[int]]) -> bytes:
    """ConsumerProtocolAssignment v0."""
    return i16(0) + array([string(t) + array([i32(p) for p in ps]) for t, ps in parts.items()]) + kbytes(None)


def parse_assignment(b: bytes | None) -> dict[str, list[int]]:
    if not b or len(b) < 2:
        return {}
    r = Reader(b)
    r.i16()  # version; v0-v3 start with the same fields
    out = {}
    for t, ps in r.array(lambda r: (r.string(), r.array(lambda r: r.i32()))) or []:
        out[t] = ps
    return out


# --------------------------------------------------------------------------- group frames


class GroupConn(kproto.Conn):
    """One connection speaking the classic group protocol. Each call returns a dict."""

    def find_coordinator(self, group: str) -> dict:
        r = self.call(API_FIND_COORDINATOR, 1, string(group) + i8(0))
        return {"throttle": r.i32(), "error": r.i16(), "message": r.string(), "node": r.i32(),
                "host": r.string(), "port": r.i32()}

    def wait_coordinator(self, group: str, timeout: float = 30):
        """FindCoordinator until it answers without error (Kafka creates __consumer_offsets on
        the first one); the coordinator must be the broker we are connected to."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.find_coordinator(group)
            if r["error"] == NONE:
                return r
            assert time.monotonic() < deadline, f"FindCoordinator({group}) still failing after {timeout}s: {r}"
            time.sleep(0.2)

    def join_group(self, group: str, member_id: str = "", topics: list[str] | None = None,
                   session_timeout_ms: int = 6000, rebalance_timeout_ms: int = 10000,
                   instance_id: str | None = None, protocols: list[tuple[str, bytes]] | None = None) -> dict:
        if protocols is None:
            protocols = [("range", subscription(topics or []))]
        body = (string(group) + i32(session_timeout_ms) + i32(rebalance_timeout_ms) + string(member_id)
                + string(instance_id) + string("consumer")
                + array([string(n) + kbytes(m) for n, m in protocols]))
        r = self.call(API_JOIN_GROUP, 5, body)
        out = {"throttle": r.i32(), "error": r.i16(), "generation": r.i32(), "protocol": r.string(),
               "leader": r.string(), "member_id": r.string()}
        out["members"] = r.array(lambda r: (r.string(), r.string(), r.kbytes())) or []
        return out

    def join_with_retry(self, group: str, member_id: str = "", **kw) -> dict:
        """JoinGroup; a MEMBER_ID_REQUIRED answer (KIP-394) is retried with the id handed out."""
        r = self.join_group(group, member_id, **kw)
        if r["error"] == MEMBER_ID_REQUIRED:
            assert r["member_id"], f"MEMBER_ID_REQUIRED without a member id: {r}"
            r = self.join_group(group, r["member_id"], **kw)
        return r

    def sync_group(self, group: str, generation: int, member_id: str,
                   assignments: dict[str, bytes] | None = None, instance_id: str | None = None) -> dict:
        body = (string(group) + i32(generation) + string(member_id) + string(instance_id)
                + array([string(m) + kbytes(a) for m, a in (assignments or {}).items()]))
        r = self.call(API_SYNC_GROUP, 3, body)
        return {"throttle": r.i32(), "error": r.i16(), "assignment": r.kbytes()}

    def heartbeat(self, group: str, generation: int, member_id: str, instance_id: str | None = None) -> int:
        r = self.call(API_HEARTBEAT, 3, string(group) + i32(generation) + string(member_id) + string(instance_id))
        r.i32()
        return r.i16()

    def leave_group(self, group: str, member_ids: list[str]) -> dict:
        body = string(group) + array([string(m) + string(None) for m in member_ids])
        r = self.call(API_LEAVE_GROUP, 3, body)
        out = {"throttle": r.i32(), "error": r.i16()}
        out["members"] = r.array(lambda r: (r.string(), r.string(), r.i16())) or []
        return out

    def offset_commit(self, group: str, generation: int, member_id: str,
                      offsets: dict[str, dict[int, int]], instance_id: str | None = None) -> dict:
        """offsets: {topic: {partition: offset}} -> {(topic, partition): error_code}."""
        topics = [string(t) + array([i32(p) + i64(o) + i32(-1) + string("") for p, o in ps.items()])
                  for t, ps in offsets.items()]
        body = string(group) + i32(generation) + string(member_id) + string(instance_id) + array(topics)
        r = self.call(API_OFFSET_COMMIT, 7, body)
        r.i32()
        res = r.array(lambda r: (r.string(), r.array(lambda r: (r.i32(), r.i16()))))
        out = {}
        for t, ps in res or []:
            for p, e in ps or []:
                out[(t, p)] = e
        want = {(t, p) for t, ps in offsets.items() for p in ps}
        assert set(out) == want, f"OffsetCommit answered for {sorted(out)}, asked for {sorted(want)}"
        return out

    def offset_fetch(self, group: str, topics: dict[str, list[int]] | None = None) -> tuple[int, dict]:
        """-> (group error, {(topic, partition): (offset, error)})."""
        body = string(group) + array(None if topics is None else
                                     [string(t) + array([i32(p) for p in ps]) for t, ps in topics.items()])
        r = self.call(API_OFFSET_FETCH, 5, body)
        r.i32()
        res = r.array(lambda r: (r.string(), r.array(
            lambda r: (r.i32(), r.i64(), r.i32(), r.string(), r.i16()))))
        err = r.i16()
        out = {}
        for t, ps in res or []:
            for p, off, _epoch, _meta, e in ps or []:
                out[(t, p)] = (off, e)
        return err, out

    def describe_group(self, group: str) -> dict:
        r = self.call(API_DESCRIBE_GROUPS, 4, array([string(group)]) + i8(0))
        r.i32()

        def member(r):
            return {"member_id": r.string(), "instance_id": r.string(), "client_id": r.string(),
                    "client_host": r.string(), "metadata": r.kbytes(), "assignment": parse_assignment(r.kbytes())}

        gs = r.array(lambda r: {"error": r.i16(), "group": r.string(), "state": r.string(),
                                "protocol_type": r.string(), "protocol": r.string(),
                                "members": r.array(member) or [], "ops": r.i32()})
        assert len(gs) == 1, gs
        return gs[0]


def describe_group(bootstrap: str, group: str) -> dict:
    with GroupConn(bootstrap) as c:
        return c.describe_group(group)


def stable_assignment(bootstrap: str, group: str, topic: str, members: int, partitions: int):
    """The group's {member_id: [partitions]} if it is Stable with `members` members whose
    assignments of `topic` are disjoint and cover all `partitions`; else None."""
    g = describe_group(bootstrap, group)
    if g["state"] != "Stable" or len(g["members"]) != members:
        return None
    owned = {m["member_id"]: sorted(m["assignment"].get(topic, [])) for m in g["members"]}
    flat = [p for ps in owned.values() for p in ps]
    if sorted(flat) != list(range(partitions)) or any(not ps for ps in owned.values()):
        return None
    return owned


class Joiner(threading.Thread):
    """Runs a (blocking) JoinGroup on its own connection; .result holds the answer."""

    def __init__(self, bootstrap: str, group: str, member_id: str = "", timeout: float = 30, **kw):
        super().__init__(daemon=True)
        self.conn = GroupConn(bootstrap, timeout=timeout)
        self.args = (group, member_id)
        self.kw = kw
        self.result = None
        self.error = None

    def run(self):
        try:
            self.result = self.conn.join_with_retry(*self.args, **self.kw)
        except Exception as e:  # noqa: BLE001 - reported by get()
            self.error = e

    def get(self, timeout: float) -> dict:
        self.join(timeout)
        assert not self.is_alive(), f"JoinGroup {self.args} got no answer within {timeout}s"
        if self.error:
            raise self.error
        return self.result


# --------------------------------------------------------------------------- confluent-kafka helpers


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int, timeout: float = 20) -> dict:
    """{partition: committed offset (-1001 = none)} via confluent-kafka committed() (OffsetFetch)."""
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                  "socket.timeout.ms": 10000})
    try:
        res = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=timeout)
        out = {}
        for tp in res:
            assert tp.error is None, f"committed() {topic}[{tp.partition}]: {tp.error}"
            out[tp.partition] = tp.offset
        return out
    finally:
        c.close()


def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict:
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "e2e-watermarks", "socket.timeout.ms": 10000})
    try:
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=15, cached=False)[1]
                for p in range(partitions)}
    finally:
        c.close()


class BackgroundProducer(threading.Thread):
    """Produces `values` (keyed k<value>) at about `rate` records/s; .reports maps value -> (p, o)."""

    def __init__(self, bootstrap: str, topic: str, values: list[str], rate: float = 250.0,
                 round_robin: int | None = None):
        """round_robin=N: record i goes to partition i % N (else the key decides)."""
        super().__init__(daemon=True)
        self.round_robin = round_robin
        self.bootstrap, self.topic, self.values, self.rate = bootstrap, topic, values, rate
        self.reports: dict[str, tuple[int, int]] = {}
        self.errors: list = []
        self.done = threading.Event()

    def run(self):
        from confluent_kafka import Producer
        p = Producer({"bootstrap.servers": self.bootstrap, "acks": "all", "linger.ms": 5,
                      "message.timeout.ms": 60000, "socket.timeout.ms": 10000})

        def cb(err, msg):
            if err is not None:
                self.errors.append((err, msg.value()))
            else:
                self.reports[msg.value().decode()] = (msg.partition(), msg.offset())

        start = time.monotonic()
        try:
            for i, v in enumerate(self.values):
                while time.monotonic() - start < i / self.rate:
                    p.poll(0.01)
                extra = {"partition": i % self.round_robin} if self.round_robin else {}
                p.produce(self.topic, key=f"k{v}".encode(), value=v.encode(), on_delivery=cb, **extra)
                p.poll(0)
            left = p.flush(60)
            if left:
                self.errors.append(f"{left} undelivered after 60 s")
        except Exception as e:  # noqa: BLE001
            self.errors.append(repr(e))
        finally:
            self.done.set()

    def result(self, timeout: float = 120) -> dict:
        self.join(timeout)
        assert not self.is_alive(), f"background producer still running after {timeout}s"
        assert not self.errors, f"produce errors: {self.errors[:5]}"
        assert len(self.reports) == len(self.values)
        return self.reports


# --------------------------------------------------------------------------- member subprocess


def member_main(argv: list[str]):
    """One confluent-kafka group member. Every event is one JSON line appended to --log with
    os.write (so a SIGKILL loses nothing already written):

      {"e":"start"} {"e":"assign","parts":[..]} {"e":"revoke","parts":[..]} {"e":"lost",...}
      {"e":"r","p":P,"o":O,"v":VALUE}       a record, written BEFORE its offset is committed
      {"e":"c","ok":{P:O},"err":{P:ERR}}    a synchronous commit after each processed batch
      {"e":"cerr","err":...}                a commit that failed as a whole
      {"e":"closed"}                        after consumer.close() (SIGTERM asks for it)

    Offsets are committed synchronously after every batch is written (at-least-once), and again
    in the revoke callback for anything processed but not yet committed."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--name", default="member")
    ap.add_argument("--session-timeout-ms", type=int, default=6000)
    ap.add_argument("--strategy", default="range")
    ap.add_argument("--process-ms", type=int, default=20, help="simulated work per batch")
    a = ap.parse_args(argv)

    fd = os.open(a.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(*evs):
        now = time.time()
        os.write(fd, "".join(json.dumps(dict(ev, t=now)) + "\n" for ev in evs).encode())

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    emit({"e": "start", "pid": os.getpid(), "name": a.name})

    processed: dict[int, int] = {}   # partition -> next offset to process
    committed: dict[int, int] = {}   # partition -> last offset committed successfully

    c = Consumer({"bootstrap.servers": a.bootstrap, "group.id": a.group, "client.id": a.name,
                  "session.timeout.ms": a.session_timeout_ms, "heartbeat.interval.ms": 1000,
                  "partition.assignment.strategy": a.strategy, "enable.auto.commit": False,
                  "auto.offset.reset": "earliest", "socket.timeout.ms": 10000,
                  "topic.metadata.refresh.interval.ms": 5000,
                  "error_cb": lambda err: emit({"e": "error", "err": str(err)})})

    def commit(parts):
        todo = {p: o for p, o in processed.items() if p in parts and committed.get(p) != o}
        if not todo:
            return
        try:
            res = c.commit(offsets=[TopicPartition(a.topic, p, o) for p, o in todo.items()], asynchronous=False)
        except KafkaException as e:
            emit({"e": "cerr", "err": str(e), "want": todo})
            return
        ok, err = {}, {}
        for tp in res:
            if tp.error is None:
                ok[tp.partition] = tp.offset
                committed[tp.partition] = tp.offset
            else:
                err[tp.partition] = str(tp.error)
        emit({"e": "c", "ok": ok, "err": err})

    def on_assign(_c, parts):
        emit({"e": "assign", "parts": sorted(p.partition for p in parts)})

    def on_revoke(_c, parts):
        ps = {p.partition for p in parts}
        commit(ps)
        for p in ps:
            processed.pop(p, None)
            committed.pop(p, None)
        emit({"e": "revoke", "parts": sorted(ps)})

    def on_lost(_c, parts):
        ps = {p.partition for p in parts}
        for p in ps:
            processed.pop(p, None)
            committed.pop(p, None)
        emit({"e": "lost", "parts": sorted(ps)})

    c.subscribe([a.topic], on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost)
    try:
        while not stop.is_set():
            msgs = c.consume(num_messages=100, timeout=0.5)
            recs = []
            for m in msgs:
                if m.error():
                    emit({"e": "error", "err": str(m.error())})
                    continue
                recs.append(m)
            if not recs:
                continue
            emit(*({"e": "r", "p": m.partition(), "o": m.offset(), "v": m.value().decode()} for m in recs))
            for m in recs:
                processed[m.partition()] = m.offset() + 1
            if a.process_ms:
                time.sleep(a.process_ms / 1000)
            commit({m.partition() for m in recs})
    finally:
        c.close()
        emit({"e": "closed"})
        os.close(fd)


def read_events(path: Path) -> list[dict]:
    out = []
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return out


class Member:
    """A member subprocess started by the test (stopped/killed only by its own pid)."""

    def __init__(self, bootstrap: str, topic: str, group: str, log: Path, name: str, **opts):
        self.log = Path(log)
        self.name = name
        cmd = [sys.executable, str(Path(__file__).resolve()), "member", "--bootstrap", bootstrap,
               "--topic", topic, "--group", group, "--log", str(self.log), "--name", name]
        for k, v in opts.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        self.out_path = self.log.with_suffix(".out")
        with open(self.out_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self.killed_at: float | None = None

    def events(self) -> list[dict]:
        return read_events(self.log)

    def records(self) -> list[dict]:
        return [e for e in self.events() if e["e"] == "r"]

    def assignment(self) -> list[int] | None:
        """The partitions held now (per the latest assign/revoke/lost event), or None."""
        cur = None
        for e in self.events():
            if e["e"] == "assign":
                cur = e["parts"]
            elif e["e"] in ("revoke", "lost", "closed"):
                cur = None
        return cur

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30):
        """SIGTERM: the member closes its consumer (revoke, commit, LeaveGroup) and exits."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"member {self.name} did not exit within {timeout}s of SIGTERM:\n{self.output()}")
        assert rc == 0, f"member {self.name} exited {rc}:\n{self.output()}"

    def kill(self):
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.killed_at = time.time()
        self.proc.wait(20)

    def output(self) -> str:
        try:
            return self.out_path.read_text(errors="replace")[-3000:]
        except FileNotFoundError:
            return ""


# --------------------------------------------------------------------------- Java console consumer

CONSOLE_LINE = re.compile(r"^Partition:(\d+)\|Offset:(\d+)\|(.*)$")


class JavaConsoleConsumer:
    """Kafka 4.4 ConsoleConsumer in a group, run directly as `java ...` (the kafka_tool command
    line of lib.sh, with our own pid so it can be SIGKILLed). Prints Partition:P|Offset:O|VALUE."""

    def __init__(self, tools, bootstrap: str, topic: str, group: str, out: Path, *props: str):
        env = tools.env
        home = env["KAFKA_HOME_DIR"]
        heap = os.environ.get("TOOL_HEAP_OPTS", "-Xms128m -Xmx512m").split()
        cmd = [env["JAVA_BIN"], *heap, "-Djava.awt.headless=true",
               f"-Dlog4j2.configurationFile={home}/config/tools-log4j2.properties",
               f"-Dlog4j.configuration=file:{home}/config/tools-log4j.properties",
               "-cp", f"{home}/libs/*", env["CONSOLE_CONSUMER"],
               "--bootstrap-server", bootstrap, "--topic", topic, "--group", group, "--from-beginning"]
        for p in ("group.protocol=classic", "session.timeout.ms=6000", "heartbeat.interval.ms=1000",
                  "client.id=" + Path(out).stem, *props):
            cmd += ["--command-property", p]
        for p in ("print.partition=true", "print.offset=true", "key.separator=|"):
            cmd += ["--formatter-property", p]
        self.out = Path(out)
        self.err = self.out.with_suffix(".err")
        self.cmd = cmd
        with open(self.out, "wb") as o, open(self.err, "wb") as e:
            self.proc = subprocess.Popen(cmd, stdout=o, stderr=e, stdin=subprocess.DEVNULL, start_new_session=True)

    def records(self) -> list[tuple[int, int, str]]:
        out = []
        try:
            lines = self.out.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return out
        for line in lines:
            m = CONSOLE_LINE.match(line)
            if m:
                out.append((int(m.group(1)), int(m.group(2)), m.group(3)))
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self):
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(20)

    def stderr_tail(self) -> str:
        try:
            return self.err.read_text(errors="replace")[-3000:]
        except FileNotFoundError:
            return ""


# --------------------------------------------------------------------------- ferry groups CLI


def ferry_groups(ferry_bin, bootstrap: str, *args, timeout: float = 60, check: bool = True):
    cmd = [str(ferry_bin), "groups", "-b", bootstrap, *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{shlex.join(cmd)} exited {p.returncode}\nstdout: {p.stdout[-3000:]}\n"
                             f"stderr: {p.stderr[-3000:]}")
    return p


def parse_describe_offsets(text: str, topic: str) -> dict[int, dict]:
    """The per-partition rows of `ferry groups describe`: {partition: {committed, end, lag, member}}."""
    rows = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 6 and f[0] == topic and f[1].isdigit():
            rows[int(f[1])] = {"committed": int(f[2]), "end": int(f[3]),
                               "lag": None if f[4] == "-" else int(f[4]), "member": f[5]}
    return rows


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "member":
        member_main(sys.argv[2:])
    else:
        sys.exit("usage: groups_support.py member --bootstrap B --topic T --group G --log FILE")
