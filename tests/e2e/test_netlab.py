"""Mirroring over an emulated WAN (../shared/netlab): east and west in network namespaces
joined by a 40 ms RTT link with 2 ms jitter and 1% loss. The link is cut in the middle of a
stream of records produced in east: west must not advance while it is cut, and after the link
heals west holds every record at the offset it has in east, and `ferry status` reports no lag.

Needs root and network namespaces (skipped with the reason otherwise). On a machine without
iptables/ethtool the fixture runs `regions.sh deps` (apt-get) first. Every client runs inside a
region, as `regions.sh exec N python netlab_client.py ...`. Env: FERRY_SHARED (the shared/
directory, default ../shared beside the repository), FERRY_NETLAB_NAME (the lab's name; default
fnt + a number from the pid, so that two runs do not share a lab)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netlab_client import value  # noqa: E402  (the records' values, as the client writes them)
from conftest import ANSI, EXTERNAL, FERRY_BIN, REPO

pytestmark = pytest.mark.skipif(bool(EXTERNAL), reason="ferry-only: gateways in network namespaces")

SHARED = Path(os.environ.get("FERRY_SHARED", REPO.parent / "shared"))
REGIONS_SH = SHARED / "netlab" / "regions.sh"
CLIENT = Path(__file__).resolve().parent / "netlab_client.py"
LAB = os.environ.get("FERRY_NETLAB_NAME", f"fnt{os.getpid() % 100000}")
PARTITIONS = 6
LINK = ["--rtt", "40ms", "--jitter", "2ms", "--loss", "1%"]
# region name -> (netlab region number, address)
REGIONS = {"east": (1, "10.99.1.2"), "west": (2, "10.99.2.2")}
KAFKA, QUIC, ADMIN = 9092, 9093, 9095
# the lab's tools live in sbin, which a root PATH does not always list
PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
ENV = {**os.environ, "NETLAB_NAME": LAB, "PATH": PATH}


def lab(*args, check=True, timeout=120) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", str(REGIONS_SH), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=ENV, stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise AssertionError(f"regions.sh {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r


def netlab_prerequisites():
    """Skip (with the reason) where the lab cannot exist; install its tools where they are missing."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("netlab needs root (ip netns, iptables): run the e2e suite as root")
    if not REGIONS_SH.exists():
        pytest.skip(f"netlab not found at {REGIONS_SH} (set FERRY_SHARED to the shared/ directory)")
    if shutil.which("ip", path=PATH) is None and shutil.which("apt-get") is None:
        pytest.skip("netlab needs iproute2 (`ip netns`), and there is no apt-get to install it")
    missing = [t for t in ("ip", "iptables", "tc", "ethtool", "gcc") if shutil.which(t, path=PATH) is None]
    if missing:
        r = lab("deps", check=False, timeout=600)
        still = [t for t in missing if shutil.which(t, path=PATH) is None]
        assert not still, f"`regions.sh deps` did not install {still}:\n{r.stdout}{r.stderr}"
    probe = f"{LAB}-probe"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, env=ENV)
    if r.returncode != 0:
        pytest.skip(f"cannot create network namespaces here (`ip netns add` failed: {r.stderr.strip()})")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, env=ENV)


class Proc:
    """A ferry process started inside a region with `regions.sh exec` (which execs, so the pid is
    ferry's own); ready when its log shows `ready`."""

    def __init__(self, name: str, region: int, argv: list, log: Path, ready: str):
        self.name, self.region, self.argv, self.log, self.ready = name, region, [str(a) for a in argv], log, ready
        self.p: subprocess.Popen | None = None

    def start(self, timeout: float = 30):
        f = open(self.log, "ab")
        f.write(f"\n===== start in region {self.region}: {' '.join(self.argv)}\n".encode())
        f.flush()
        self.p = subprocess.Popen(["bash", str(REGIONS_SH), "exec", str(self.region), *self.argv], stdout=f, stderr=f,
                                  stdin=subprocess.DEVNULL, env=ENV)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready in self.text().split("===== start")[-1]:
                return self
            assert self.p.poll() is None, f"{self.name} exited\n{self.text()[-3000:]}"
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready in {timeout}s\n{self.text()[-3000:]}")

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, wait_only: bool = False):
        if self.p and self.p.poll() is None:
            if not wait_only:
                self.p.terminate()
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.p.pid, signal.SIGKILL)
                self.p.wait(10)


class WanRegions:
    """east and west, each a broker and a gateway inside its own netlab namespace."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        text = "# written by tests/e2e/test_netlab.py: east in netlab region 1, west in region 2\n"
        for n, (_, addr) in REGIONS.items():
            text += f"""
[regions.{n}]
[[regions.{n}.brokers]]
id = 1
listen = "{addr}:{KAFKA}"
[regions.{n}.gateway]
quic = "{addr}:{QUIC}"
admin = "{addr}:{ADMIN}"
"""
        text += f"""
[[topics]]
pattern = "*"
partitions = {PARTITIONS}
primary = "east"
mirrors = ["west"]
mode = "async"

# The cut below lasts seconds: shorter than east's lease, so east keeps taking writes through it
# (a primary that stays cut off past its lease stops taking writes: failover's business, not
# this test's).
[failover]
fencing = "lease"
lease = "60s"
heartbeat = "2s"
"""
        self.topology = tmp / "topology.toml"
        self.topology.write_text(text)
        self.certs = tmp / "certs"
        r = subprocess.run([str(FERRY_BIN), "certs", "init", "--topology", self.topology, "--out", self.certs],
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        self.data = tmp / "data"
        self.procs: list[Proc] = []
        self.brokers, self.gateways = {}, {}
        for n, (i, _) in REGIONS.items():
            self.brokers[n] = Proc(f"{n}/broker", i, [FERRY_BIN, "broker", "--topology", self.topology, "--region", n,
                                                      "--broker", 1, "--data-dir", self.data],
                                   tmp / f"{n}-broker.log", "ferry broker listening on")
            self.gateways[n] = Proc(f"{n}/gateway", i, [FERRY_BIN, "gateway", "--topology", self.topology,
                                                        "--region", n, "--certs", self.certs],
                                    tmp / f"{n}-gateway.log", "ferry gateway listening on")

    def start(self):
        for group in (self.brokers, self.gateways):
            for p in group.values():
                self.procs.append(p)
                p.start()
        return self

    def stop(self):
        for group in (self.gateways, self.brokers):  # SIGTERM a group at once, then wait for each
            for p in group.values():
                if p.p and p.p.poll() is None:
                    p.p.terminate()
            for p in group.values():
                p.stop(wait_only=True)

    def bootstrap(self, n: str) -> str:
        return f"{REGIONS[n][1]}:{KAFKA}"

    def client(self, n: str, *args, timeout: float = 180) -> str:
        """Run netlab_client.py inside region n; its stdout."""
        r = subprocess.run(["bash", str(REGIONS_SH), "exec", str(REGIONS[n][0]), sys.executable, str(CLIENT),
                            *map(str, args)], capture_output=True, text=True, timeout=timeout,
                           env=ENV, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"netlab_client {args[0]} in {n} failed:\n{r.stdout}{r.stderr}"
        return r.stdout

    def ends(self, n: str, topic: str) -> list[int]:
        return json.loads(self.client(n, "ends", self.bootstrap(n), topic, PARTITIONS))

    def status(self, n: str) -> dict:
        r = subprocess.run(["bash", str(REGIONS_SH), "exec", str(REGIONS[n][0]), str(FERRY_BIN), "status",
                            "--topology", str(self.topology), "--json"], capture_output=True, text=True, timeout=120,
                           env=ENV, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def logs(self) -> str:
        return "\n".join(f"----- {p.name} -----\n{ANSI.sub('', p.text())[-4000:]}" for p in self.procs)


@pytest.fixture
def wan(tmp_path, request):
    netlab_prerequisites()
    if not FERRY_BIN.exists():
        pytest.fail(f"ferry binary not found at {FERRY_BIN} (build it: cargo build --release, or set FERRY_BIN)")
    lab("down")  # a lab of the same name left over by a killed run
    regions = None
    try:
        lab("up", 2)
        lab("impair", 1, 2, *LINK)
        regions = WanRegions(tmp_path).start()
        yield regions
    finally:
        failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
        if regions is not None:
            if failed:
                print(regions.logs())
                print(lab("status", check=False).stdout)
            regions.stop()
        if lab("down", check=False).returncode == 0 and "NETLAB_STATE" not in os.environ:
            shutil.rmtree(f"/run/netlab-{LAB}", ignore_errors=True)  # the lab's state: one per run name


def produce(wan: WanRegions, out: Path, topic: str, start: int, count: int) -> list:
    """count records produced in east (from inside region 1); [[partition, offset, i], ...]."""
    wan.client("east", "produce", wan.bootstrap("east"), topic, start, count, out)
    acked = json.loads(out.read_text())
    assert len(acked) == count
    return acked


def wait_for(fn, what: str, timeout: float = 120, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last[0]:
            return last[1]
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last[1]!r})")


def test_wan_cut_mid_stream_then_heal_mirrors_every_record_at_its_offset(wan, tmp_path):
    topic = "wan-orders"
    # 5,000 records, mirrored: the link works and the mirror topic exists in west.
    files = iter(tmp_path / f"acked-{k}.json" for k in range(10))
    acked = produce(wan, next(files), topic, 0, 5_000)
    first = wan.ends("east", topic)
    assert sum(first) == 5_000
    wait_for(lambda: ((w := wan.ends("west", topic)) == first, w), f"west to reach {first}")

    # A stream at 4,000 records/s in east. Once west has received 1,500 of it, the link is cut,
    # and the producer goes on for 5,000 more records before it stops.
    stop, acked_stream = tmp_path / "stop", next(files)
    producer = subprocess.Popen(["bash", str(REGIONS_SH), "exec", "1", sys.executable, str(CLIENT), "produce",
                                 *map(str, [wan.bootstrap("east"), topic, 5_000, 0, acked_stream, 4_000, stop])],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=ENV, stdin=subprocess.DEVNULL)
    try:
        def west_streaming():
            assert producer.poll() is None, f"producer ended before the cut:\n{producer.stdout.read()}"
            w = wan.ends("west", topic)
            return sum(w) >= 6_500, w
        before_cut = wait_for(west_streaming, "west to mirror part of the stream", interval=0.1)
        lab("cut", 1, 2)
        east_at_cut = wan.ends("east", topic)  # read after the cut: west can never get past it
        (tmp_path / "stop.tmp").write_text("5000")
        os.replace(tmp_path / "stop.tmp", stop)
        out, _ = producer.communicate(timeout=180)
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait(10)
    assert producer.returncode == 0, out
    acked += json.loads(acked_stream.read_text())
    east_streamed = wan.ends("east", topic)
    assert sum(east_streamed) == len(acked) >= sum(east_at_cut) + 5_000

    # West settles (frames already past the cut may still be written), holding nothing produced
    # after the cut; then, while the link stays cut, 5,000 more records in east: west stays put.
    def settled():
        a = wan.ends("west", topic)
        time.sleep(1.0)
        b = wan.ends("west", topic)
        return a == b, b
    west_cut = wait_for(settled, "west to settle after the cut", timeout=60, interval=0)
    assert all(b <= w <= e for b, w, e in zip(before_cut, west_cut, east_at_cut)), (before_cut, west_cut, east_at_cut)
    print(f"cut: west had {sum(before_cut)} of the {len(acked)} records, settled at {sum(west_cut)} "
          f"(east held {sum(east_at_cut)} at the cut)")
    acked += produce(wan, next(files), topic, len(acked), 5_000)
    want = wan.ends("east", topic)
    assert sum(want) == len(acked)
    for _ in range(3):
        time.sleep(1.0)
        now = wan.ends("west", topic)
        assert now == west_cut, f"west advanced while the link was cut: {west_cut} -> {now}"
    assert sum(west_cut) < sum(want)

    # Heal: west catches up with every record, at the same offsets, with the same keys and values.
    lab("heal", 1, 2)
    healed = time.monotonic()
    wait_for(lambda: ((w := wan.ends("west", topic)) == want, w), f"west to reach east's ends {want}",
             timeout=120, interval=1.0)
    print(f"healed: west caught up with {sum(want) - sum(west_cut)} records in {time.monotonic() - healed:.1f} s")
    dump_e, dump_w = tmp_path / "east.json", tmp_path / "west.json"
    wan.client("east", "dump", wan.bootstrap("east"), topic, PARTITIONS, dump_e)
    wan.client("west", "dump", wan.bootstrap("west"), topic, PARTITIONS, dump_w)
    east, west = json.loads(dump_e.read_text()), json.loads(dump_w.read_text())
    expected = {str(p): [] for p in range(PARTITIONS)}
    for p, o, i in sorted(acked):
        expected[str(p)].append([o, f"k{i}", value(i).decode("latin-1")])
    assert sorted(i for _, _, i in acked) == list(range(len(acked)))
    for p in range(PARTITIONS):
        assert [r[0] for r in expected[str(p)]] == list(range(want[p])), f"east partition {p}: offsets not dense"
        assert east[str(p)] == expected[str(p)], f"east partition {p} differs from what was acknowledged"
        assert west[str(p)] == expected[str(p)], \
            f"west partition {p}: {len(west[str(p)])} records, first difference at " \
            f"{next((k for k, (a, b) in enumerate(zip(west[str(p)], expected[str(p)])) if a != b), None)}"

    # `ferry status --json`, run in west (it reaches east's broker over the healed link): lag 0.
    s = wan.status("west")
    assert {x["region"]: x["up"] for x in s["regions"]} == {"east": True, "west": True}, s["regions"]
    rows = sorted((p for p in s["partitions"] if p["topic"] == topic), key=lambda p: p["partition"])
    assert len(rows) == PARTITIONS, s["partitions"]
    assert all(p["lag_records"] == 0 and p["lag_bytes"] == 0 for p in rows), rows
    assert [p["source_log_end"] for p in rows] == [p["mirrored"] for p in rows] == want, rows
