"""Ferry's own doors (issue 14), against one `ferry up` of two regions with lease fencing and
small connection limits.

What was done by hand with crafted bytes from a plain TCP client is replayed here and must change
nothing: FerryControl apply (fence east) and truncate (cut west's mirror), a forged but CRC-valid
MirrorAppend into west, a MirrorAck. The admin API refuses plain HTTP, a client without a
certificate, a certificate from another CA and a region's certificate, and `adopt` does not make
a region primary without its checks. `ferry failover`, `ferry drill` and `ferry status` work with
the operator certificate. Stalled partial frames keep the broker within its memory budget while
normal clients produce and consume; idle and trickling connections are closed; the per-address
connection cap refuses the excess with a log line and a metric."""
from __future__ import annotations

import json
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cli_support import FerryUp, admin_call, admin_context
from conftest import ANSI, EXTERNAL, FERRY_BIN, free_port
from helpers import ck_consume, ck_produce, topic_name
from kproto import Conn, ConnectionClosed, build_batch, i16, i32, recv_frame

pytestmark = pytest.mark.skipif(bool(EXTERNAL), reason="ferry-only: Ferry's own doors")

REGIONS = ["east", "west"]
MEMORY = 128 << 20        # [limits] request_memory_max in the fixture's topology
PER_ADDRESS = 64          # [limits] connections_per_address_max
TIMEOUT_S = 3             # [limits] idle_timeout and request_read_timeout


class Up:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        used: set[int] = set()

        def fresh() -> int:  # free_port() may hand out a port twice
            while (p := free_port()) in used:
                pass
            used.add(p)
            return p

        self.ports = {r: {k: fresh() for k in ("kafka", "quic", "admin", "metrics", "gw_metrics")} for r in REGIONS}
        text = ""
        for r in REGIONS:
            p = self.ports[r]
            text += f"""
[regions.{r}]
[[regions.{r}.brokers]]
id = 1
listen = "127.0.0.1:{p['kafka']}"
metrics = "127.0.0.1:{p['metrics']}"
[regions.{r}.gateway]
quic = "127.0.0.1:{p['quic']}"
admin = "127.0.0.1:{p['admin']}"
metrics = "127.0.0.1:{p['gw_metrics']}"
"""
        text += f"""
[[topics]]
pattern = "*"
partitions = 2
primary = "east"
mirrors = ["west"]

[failover]
fencing = "lease"
lease = "6s"
heartbeat = "1s"

[limits]
connections_per_address_max = {PER_ADDRESS}
idle_timeout = "{TIMEOUT_S}s"
request_read_timeout = "{TIMEOUT_S}s"
request_memory_max = "{MEMORY >> 20}MiB"
"""
        self.topology = tmp / "topology.toml"
        self.topology.write_text(text)
        self.data = tmp / "data"
        self.certs = self.data / "certs"
        self.up = FerryUp(["--topology", self.topology, "--data-dir", self.data], tmp, tmp / "logs")

    def bootstrap(self, r: str) -> str:
        return f"127.0.0.1:{self.ports[r]['kafka']}"

    def admin(self, r: str, method: str, path: str, body: dict | None = None, ctx=None) -> tuple[int, dict]:
        return admin_call(self.ports[r]["admin"], self.certs, method, path, body, ctx=ctx)

    def state(self, r: str) -> dict:
        status, out = self.admin(r, "GET", "/v1/state")
        assert status == 200, out
        return out

    def log(self, name: str) -> str:
        return ANSI.sub("", (self.data / "logs" / f"{name}.log").read_text(errors="replace"))

    def broker_pid(self, r: str) -> int:
        return next(pid for pid, argv in self.up.children.items() if r in argv)

    def metric(self, r: str, name: str, **labels) -> float:
        import urllib.request
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.ports[r]['metrics']}/metrics", timeout=10).read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                head, value = line.rsplit(" ", 1)
                if all(f'{k}="{v}"' in head for k, v in labels.items()):
                    total += float(value)
        return total

    def ferry(self, *args, check=True, timeout=180) -> subprocess.CompletedProcess:
        if "--certs" not in args:
            args = (*args, "--certs", self.certs)
        p = subprocess.run([str(FERRY_BIN), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                           cwd=self.tmp)
        if check:
            assert p.returncode == 0, f"{args}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        return p


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    u = Up(tmp_path_factory.mktemp("security"))
    u.up.start()
    try:
        u.up.wait_ready(len(REGIONS))
        deadline = time.monotonic() + 60
        while True:
            try:
                ok = all(set(u.state(r)["peers"]) == set(REGIONS) - {r} and u.state(r)["lease"]["may_write"]
                         for r in REGIONS)
            except (OSError, AssertionError):
                ok = False
            if ok:
                break
            assert time.monotonic() < deadline, u.up.output()
            time.sleep(0.2)
        yield u
    finally:
        u.up.cleanup()


def ends(bootstrap: str, topic: str) -> list[int]:
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "ends", "enable.auto.commit": False})
    try:
        return [c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(2)]
    finally:
        c.close()


def records(bootstrap: str, topic: str) -> dict:
    out = {}
    for p, end in enumerate(ends(bootstrap, topic)):
        for m in ck_consume(bootstrap, topic, partition=p, offset=0, min_count=end):
            out[(p, m.offset())] = (m.key(), m.value())
    return out


def wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = fn()
        except Exception:  # noqa: BLE001 - e.g. a topic the mirror has not created yet
            v = None
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def produce(bootstrap: str, topic: str, n: int, tag: str):
    acked = ck_produce(bootstrap, topic, [{"key": f"k{i}".encode(), "value": f"{tag}-{i}".encode()} for i in range(n)],
                       acks="all")
    assert len(acked) == n, acked


def internal_frame(key: int, body: bytes, cid: int = 7) -> bytes:
    """One of Ferry's own request frames: key, version 0, correlation id, no client id, body."""
    frame = i16(key) + i16(0) + i32(cid) + i16(-1) + body
    return i32(len(frame)) + frame


def control_frame(op: dict) -> bytes:
    body = json.dumps(op).encode()
    return internal_frame(20_002, i32(len(body)) + body)


def mirror_append_frame(topic: str, partition: int, partitions: int, records: bytes) -> bytes:
    t = topic.encode()
    return internal_frame(20_000, i16(len(t)) + t + i32(partition) + i32(partitions) + i32(len(records)) + records)


def mirror_ack_frame(topic: str, partition: int, region: str, offset: int) -> bytes:
    t, r = topic.encode(), region.encode()
    return internal_frame(20_001, i16(len(t)) + t + i32(partition) + i16(len(r)) + r + struct.pack(">q", offset))


def call_raw(bootstrap: str, frame: bytes) -> bytes:
    host, port = bootstrap.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(frame)
        return recv_frame(s)


def test_plain_tcp_internal_requests_change_nothing(up):
    topic = topic_name("doors")
    produce(up.bootstrap("east"), topic, 200, "before")
    want = ends(up.bootstrap("east"), topic)
    wait_for(lambda: ends(up.bootstrap("west"), topic) == want, 60, "west to mirror the first records")
    west_before = records(up.bootstrap("west"), topic)
    state_before = up.state("east")["rules"]["*"]

    # FerryControl apply: fence east (it would stop taking writes).
    fence = {"op": "apply", "pattern": "*",
             "state": {"epoch": state_before["epoch"] + 1, "primary": "east", "fenced": True}}
    answer = call_raw(up.bootstrap("east"), control_frame(fence))
    cid, code = struct.unpack(">ih", answer[:6])
    assert cid == 7 and code != 0 and b"internal request" in answer, answer
    # FerryControl truncate: cut west's mirror back to 1 (after quarantining the rest).
    cut = {"op": "truncate", "topic": topic, "partition": 0, "offset": 1, "region": "west"}
    answer = call_raw(up.bootstrap("west"), control_frame(cut))
    assert struct.unpack(">h", answer[4:6])[0] != 0 and b"internal request" in answer, answer
    # A forged but CRC-valid MirrorAppend of records east never had, at west's end.
    forged = build_batch([b"forged-1", b"forged-2"], base_offset=want[0])
    answer = call_raw(up.bootstrap("west"), mirror_append_frame(topic, 0, 2, forged))
    cid, err = struct.unpack(">ih", answer[:6])
    assert (cid, err) == (7, 31), answer  # CLUSTER_AUTHORIZATION_FAILED
    answer = call_raw(up.bootstrap("east"), mirror_ack_frame(topic, 0, "west", 10**9))
    assert struct.unpack(">ih", answer[:6]) == (7, 31), answer

    # Nothing happened: east keeps taking writes, west keeps its records and mirrors the new ones.
    assert up.state("east")["rules"]["*"] == state_before
    produce(up.bootstrap("east"), topic, 50, "after")
    want = ends(up.bootstrap("east"), topic)
    wait_for(lambda: ends(up.bootstrap("west"), topic) == want, 60, "west to mirror the later records")
    west_after = records(up.bootstrap("west"), topic)
    assert {k: v for k, v in west_after.items() if k in west_before} == west_before
    assert records(up.bootstrap("east"), topic) == west_after
    assert not any(b"forged" in (v[1] or b"") for v in west_after.values())
    rows = json.loads(up.ferry("quarantine", "list", "--json", "--topology", up.topology).stdout)
    assert rows == [], rows
    p = up.ferry("status", "--json", "--topology", up.topology)
    assert "warning" not in p.stderr, p.stderr  # it used the operator certificate
    rows = [p for p in json.loads(p.stdout)["partitions"] if p["topic"] == topic]
    assert rows and all(p["diverged_at"] is None and p["lag_records"] == 0 for p in rows), rows

    # Each refusal was logged with the peer's address; the API keys are not advertised.
    log = up.log("east-broker-1") + up.log("west-broker-1")
    refusals = [ln for ln in log.splitlines() if "refused Ferry's internal request" in ln]
    assert len(refusals) >= 4 and all("peer=127.0.0.1:" in ln for ln in refusals), refusals
    with Conn(up.bootstrap("east")) as c:
        _, apis = c.api_versions(3)
    assert not set(apis) & {20_000, 20_001, 20_002}, apis


def call_tls(up, region: str, frame: bytes, cert: str = "operator.pem", key: str = "operator.key") -> bytes:
    """A request on the broker's internal door: mutual TLS on its Kafka port."""
    ctx = admin_context(up.certs, cert, key)
    with socket.create_connection(("127.0.0.1", up.ports[region]["kafka"]), timeout=10) as raw:
        with ctx.wrap_socket(raw) as s:
            s.sendall(frame)
            return recv_frame(s)


def test_the_internal_door_serves_its_region_and_operators_only_their_history(up):
    topic = topic_name("door")
    produce(up.bootstrap("east"), topic, 20, "x")
    want = ends(up.bootstrap("east"), topic)
    wait_for(lambda: ends(up.bootstrap("west"), topic) == want, 60, "west to mirror")
    # The operator's certificate opens the door: FerryControl answers.
    answer = call_tls(up, "west", control_frame({"op": "state"}))
    assert struct.unpack(">ih", answer[:6]) == (7, 0) and b"rules" in answer, answer
    # Another region's certificate does not: east's gateway has no business in west's broker.
    with pytest.raises((ssl.SSLError, ConnectionError, OSError, ValueError, ConnectionClosed)):
        call_tls(up, "west", control_frame({"op": "state"}), "east.pem", "east.key")
    # Even through the door, a batch from an epoch west never adopted does not get in.
    forged = bytearray(build_batch([b"forged"], base_offset=want[0]))
    forged[12:16] = i32(1 << 20)  # partitionLeaderEpoch, outside the CRC
    answer = call_tls(up, "west", mirror_append_frame(topic, 0, 2, bytes(forged)))
    cid, err = struct.unpack(">ih", answer[:6])
    assert (cid, err) == (7, 74) and b"never" not in answer and b"newer than epoch" in answer, answer
    assert ends(up.bootstrap("west"), topic) == want
    assert "a batch from an epoch this region never adopted" in up.log("west-broker-1")


def test_the_admin_api_refuses_anyone_but_an_operator(up, tmp_path):
    port = up.ports["east"]["admin"]
    before = up.state("east")["rules"]["*"]
    adopt = {"pattern": "*", "state": {"epoch": before["epoch"] + 7, "primary": "west"}}
    # Plain HTTP on the HTTPS port.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/adopt HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
        s.settimeout(10)
        assert b"200 OK" not in s.recv(4096)
    # HTTPS without a client certificate: the handshake fails.
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        up.admin("east", "POST", "/v1/adopt", adopt, ctx=admin_context(up.certs, cert=None))
    # A certificate from another CA.
    other = tmp_path / "other"
    (tmp_path / "other.toml").write_text(up.topology.read_text())
    subprocess.run([str(FERRY_BIN), "certs", "init", "--topology", tmp_path / "other.toml", "--out", other],
                   check=True, capture_output=True, timeout=60)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        up.admin("east", "POST", "/v1/adopt", adopt, ctx=admin_context(other, ca=up.certs / "ca.pem"))
    # A region's certificate (from the right CA) is not an operator's.
    status, out = up.admin("east", "POST", "/v1/adopt", adopt, ctx=admin_context(up.certs, "west.pem", "west.key"))
    assert status == 403 and "not an operator" in out["error"], (status, out)
    assert up.state("east")["rules"]["*"] == before
    log = up.log("east-gateway")
    refusals = [ln for ln in log.splitlines() if "refused a TLS connection" in ln and 'listener="admin"' in ln]
    assert any("handshake failed" in ln for ln in refusals), log[-3000:]
    assert any("not an operator" in ln for ln in refusals), log[-3000:]

    # An operator may adopt a state that demotes nothing of its own, but not one that makes its
    # region primary without a switchover's checks.
    status, out = up.admin("west", "POST", "/v1/adopt", {"pattern": "*", "state": {"epoch": before["epoch"] + 7,
                                                                                   "primary": "west"}})
    assert status == 409 and "without the checks" in out["error"], (status, out)
    assert up.state("west")["rules"]["*"] == before


def test_failover_drill_and_status_work_with_the_operator_certificate(up, tmp_path):
    topic = topic_name("op")
    produce(up.bootstrap("east"), topic, 30, "x")
    out = json.loads(up.ferry("failover", "--topology", up.topology, "--to", "west", "--json").stdout)
    assert out["rules"][0]["to"] == "west" and out["rules"][0]["loss"] == [], out
    out = json.loads(up.ferry("failover", "--topology", up.topology, "--to", "east", "--json").stdout)
    assert out["rules"][0]["to"] == "east", out
    p = up.ferry("drill", "--topology", up.topology, "--scenario", "switchover", "--phase", "2s", "--json",
                 "--report", tmp_path / "drill.md")
    assert json.loads(p.stdout)["passed"], p.stdout
    # Without the operator certificate the same commands stop before doing anything.
    p = up.ferry("failover", "--topology", up.topology, "--to", "west", "--certs", tmp_path / "nowhere", check=False)
    assert p.returncode != 0 and "operator certificate" in p.stderr, p.stderr
    assert up.state("east")["rules"]["*"]["primary"] == "east"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))


def test_stalled_partial_frames_stay_within_the_memory_budget(up):
    east = up.bootstrap("east")
    port = up.ports["east"]["kafka"]
    pid = up.broker_pid("east")
    topic = topic_name("budget")
    produce(east, topic, 10, "warm")
    base = rss_kib(pid)
    timeouts = up.metric("east", "ferry_connections_refused_total", reason="request_read_timeout")
    # 24 connections from another address each announce 100 MiB and send 8 MiB (192 MiB in all,
    # past the 128 MiB budget), then stall.
    stallers, peak = [], [base]
    stop = threading.Event()

    def stall(i: int):
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.connect(("127.0.0.1", port))
        s.settimeout(0.5)
        stallers.append(s)
        payload = i32(100 << 20) + bytes(8 << 20)
        sent = 0
        while sent < len(payload) and not stop.is_set():
            try:
                sent += s.send(payload[sent:sent + (1 << 20)])
            except socket.timeout:
                continue
            except OSError:
                return

    threads = [threading.Thread(target=stall, args=(i,), daemon=True) for i in range(24)]
    for t in threads:
        t.start()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kib(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        # Normal clients keep producing and consuming meanwhile (they may wait for room until
        # the stalled requests' read timeout gives it back).
        produce(east, topic, 200, "during")
        got = ck_consume(east, topic, partition=0, offset=0, min_count=ends(east, topic)[0])
        assert len(got) == ends(east, topic)[0]
        # Every staller is closed by the read timeout.
        wait_for(lambda: up.metric("east", "ferry_connections_refused_total", reason="request_read_timeout")
                 >= timeouts + 24, 60, "the stalled connections to time out")
    finally:
        stop.set()
        for s in stallers:
            s.close()
        sampler.join(5)
    grown_mib = (peak[0] - base) / 1024
    print(f"broker RSS {base >> 10} MiB before, peak {peak[0] >> 10} MiB with the stalled frames")
    assert grown_mib < (MEMORY >> 20) + 48, f"the broker grew by {grown_mib:.0f} MiB (budget {MEMORY >> 20} MiB)"
    assert up.metric("east", "ferry_request_memory_waits_total") > 0, "the budget was never full"


def test_idle_and_trickling_connections_are_closed(up):
    port = up.ports["east"]["kafka"]
    idle = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=("127.0.0.3", 0))
    trickle = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=("127.0.0.3", 0))
    t0 = time.monotonic()
    trickle.sendall(i32(64))
    closed_at = None
    for _ in range(30):  # one byte a second, never a whole request
        try:
            trickle.sendall(b"\0")
        except OSError:
            closed_at = time.monotonic() - t0
            break
        time.sleep(1)
    assert closed_at is not None and closed_at < 15, closed_at
    idle.settimeout(30)
    assert idle.recv(1) == b""  # closed by the broker
    assert time.monotonic() - t0 < 20
    idle.close()
    trickle.close()
    log = up.log("east-broker-1")
    assert "idle_timeout" in log and "request_read_timeout" in log, log[-3000:]


def test_the_per_address_cap_refuses_the_excess(up):
    port = up.ports["east"]["kafka"]
    before = up.metric("east", "ferry_connections_refused_total", reason="connections_per_address_max")
    held = [socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.4", 0))
            for _ in range(PER_ADDRESS)]
    try:
        with Conn(up.bootstrap("east")) as c:  # another address still gets in
            c.api_versions(0)
        extra = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.4", 0))
        extra.settimeout(10)
        assert extra.recv(1) == b"", "the connection past the cap was not closed"
        extra.close()
        assert up.metric("east", "ferry_connections_refused_total", reason="connections_per_address_max") > before
        assert "connections_per_address_max" in up.log("east-broker-1")
        for s in held[:4]:  # the held ones are still served
            s.sendall(i32(10) + i16(18) + i16(0) + i32(1) + i16(-1))
            assert struct.unpack(">i", recv_frame(s)[:4])[0] == 1
    finally:
        for s in held:
            s.close()


def test_adopt_with_force_says_what_it_skipped(up):
    """Last in the module: it moves the rule (and the test moves it back)."""
    before = up.state("west")["rules"]["*"]
    epoch = (before["epoch"] // 256 + 1) * 256 + 1
    status, out = up.admin("west", "POST", "/v1/adopt",
                           {"pattern": "*", "state": {"epoch": epoch, "primary": "west"}, "force": True})
    assert status == 200 and "without catch-up or lease checks" in out.get("unchecked", ""), (status, out)
    assert "WITHOUT catch-up or lease checks" in up.log("west-gateway")
    wait_for(lambda: up.state("east")["rules"]["*"]["primary"] == "west", 30, "east to adopt the newer epoch")
    up.ferry("failover", "--topology", up.topology, "--to", "east")
    assert up.state("west")["rules"]["*"]["primary"] == "east"


def test_a_cut_inside_a_batch_falls_on_its_start_and_happens_once(up):
    """One rule for every cut of a log (`PartitionLog::cut_point`): a truncation asked for inside
    a batch cuts at the start of that batch, the quarantine holds exactly the records cut (not
    also records the log keeps), the answer says where the log now ends, and the mirror then
    catches up from there with the primary's records at the same offsets: no second cut."""
    from kproto import segment_batches
    topic = topic_name("cut")
    # Several records per batch: one send, lingered.
    acked = ck_produce(up.bootstrap("east"), topic,
                       [{"key": b"k", "value": f"v{i}".encode()} for i in range(40)],
                       acks="all", **{"linger.ms": 200})
    assert len(acked) == 40, acked
    want = ends(up.bootstrap("east"), topic)
    wait_for(lambda: ends(up.bootstrap("west"), topic) == want, 60, "west to mirror")
    part = next(p for p in range(2) if want[p] > 0)
    west_dir = up.data / "west" / "broker-1"
    batch = next(b for b in segment_batches(west_dir, topic, part) if b.last_offset_delta >= 2)
    inside = batch.base_offset + 1
    answer = call_tls(up, "west", control_frame(
        {"op": "truncate", "topic": topic, "partition": part, "offset": inside, "region": "test"}))
    assert struct.unpack(">ih", answer[:6]) == (7, 0), answer
    body = json.loads(answer[answer.index(b"{"):])
    assert body["log_end"] == batch.base_offset, (body, batch.base_offset, inside)
    assert body["quarantined"] == want[part] - batch.base_offset, (body, want)
    # The quarantine holds exactly the offsets cut, each once.
    quarantine = f"__ferry.quarantine.{topic}"
    got = ck_consume(up.bootstrap("west"), quarantine, partition=part, offset=0,
                     min_count=body["quarantined"])
    originals = sorted(int(dict(m.headers())["ferry.original.offset"]) for m in got)
    assert originals == list(range(batch.base_offset, want[part])), originals
    # The cut came from outside the mirror stream (a stream's own TRUNCATE restarts it): the
    # next frame no longer continues the log, the stream starts again from the cut, and the
    # mirror catches up with the primary's records at the same offsets.
    ck_produce(up.bootstrap("east"), topic, [{"key": b"k", "value": b"after"}], acks="all")
    want = ends(up.bootstrap("east"), topic)
    wait_for(lambda: ends(up.bootstrap("west"), topic) == want, 60, "west to mirror again")
    assert records(up.bootstrap("west"), topic) == records(up.bootstrap("east"), topic)
    cuts = [ln for ln in up.log("west-broker-1").splitlines()
            if "moved the divergent tail" in ln and topic in ln]
    assert len(cuts) == 1, cuts
