"""The `ferry` command line end to end, always through the built binary:

- `ferry up`: the default topology (topology/local.toml, fixed ports 19092/19094 and 29092/29094)
  with kcat in east and `ferry topics` in west, a clean stop on SIGINT (children gone, exit 0) and
  a restart on the same data; a topology of our own on free ports (SIGTERM); a broker that dies;
  a bad topology.
- `ferry topology check|show`: one bad file per kind of error, asserting FILE:LINE:COLUMN, the
  field path and the message; the examples in topology/ pass and `show` prints them.
- `/metrics` of `ferry broker --metrics`: byte and record counters per topic around produces and
  fetches, scraped while a produce runs.
- `ferry produce | ferry consume`: JSON records with keys and (duplicate) headers, `key=value`
  lines, consumer groups resuming from committed offsets, `ferry topics`.

Every command and wait is bounded; nothing asserts on timing.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import tomllib
import uuid
from pathlib import Path

import pytest

from cli_support import (FerryUp, describe, ferry, kafka_partition, line_of, metric, port_open, pos_of,
                         running, scrape, wait_for)
from conftest import EXTERNAL, FERRY_BIN, REPO, free_port
from helpers import kcat_consume_until, ck_consumer, ck_produce, kcat, kcat_consume, topic_name

pytestmark = pytest.mark.skipif(bool(EXTERNAL), reason="the ferry command line needs the ferry binary")

EXAMPLES = sorted((REPO / "topology").glob("*.toml"))
# topology/local.toml: region -> (Kafka, metrics)
LOCAL_PORTS = {"east": (19092, 19094), "west": (29092, 29094)}


@pytest.fixture(autouse=True)
def _binary():
    if not FERRY_BIN.exists():
        pytest.fail(f"ferry binary not found at {FERRY_BIN} (cargo build --release, or set FERRY_BIN)")


@pytest.fixture
def ups():
    """Every `ferry up` a test starts; killed (with its brokers, by pid) at teardown if still running."""
    started: list[FerryUp] = []
    yield started
    for u in started:
        u.cleanup()


def start_up(ups, args, cwd, logdir, children: int) -> FerryUp:
    logdir.mkdir(parents=True, exist_ok=True)
    u = FerryUp(args, cwd, logdir)
    ups.append(u)
    u.start()
    u.wait_ready(children)
    return u


def kcat_produce(bootstrap: str, topic: str, lines: list[str], *extra):
    p = kcat("-b", bootstrap, "-P", "-t", topic, "-X", "message.timeout.ms=30000", "-X", "socket.timeout.ms=10000",
             *extra, input=("\n".join(lines) + "\n").encode())
    err = p.stderr.decode(errors="replace")
    assert "Delivery failed" not in err and "ERROR" not in err, err[-3000:]


def stop_cleanly(u: FerryUp, sig: int, ports: list[int]):
    """Send sig to `ferry up`; it must exit 0 after stopping every broker it started."""
    assert u.children, "no broker children recorded"
    for pid in u.children:
        assert running(pid), f"broker {pid} {u.children[pid]} is not running before the signal\n{u.output()}"
    u.signal(sig)
    rc = u.wait(60)
    assert rc == 0, f"ferry up exited {rc} on {signal.Signals(sig).name}\n{u.output()}"
    assert "stopped" in u.stdout().splitlines()[-1], u.output()
    assert "did not stop in time" not in u.stderr(), u.output()
    # the brokers were its children: once it has exited they are gone (not even orphaned)
    left = {pid: argv for pid, argv in u.children.items() if running(pid)}
    assert not left, f"broker processes still running after ferry up exited: {left}\n{u.output()}"
    still = [p for p in ports if port_open("127.0.0.1", p)]
    assert not still, f"ports still accepting connections after ferry up exited: {still}"


def broker_logs(data_root: Path) -> dict[str, str]:
    return {p.name: p.read_text(errors="replace") for p in sorted((data_root / "logs").glob("*.log"))}


# =========================================================================== ferry up


@pytest.fixture
def local_ports_free():
    """topology/local.toml has fixed ports: wait (bounded) for them to be free, else fail loudly."""
    ports = [p for pair in LOCAL_PORTS.values() for p in pair]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        busy = [p for p in ports if port_open("127.0.0.1", p)]
        if not busy:
            return ports
        time.sleep(0.5)
    pytest.fail(f"ports {busy} of topology/local.toml are in use by another process: cannot run `ferry up`")


def test_up_local_topology(ups, tmp_path, local_ports_free):
    """The issue's test: `ferry up` with topology/local.toml, kcat produce + read back in east,
    `ferry topics` against west, clean stop on SIGINT; the data survives a second `ferry up`."""
    data = tmp_path / "data"
    u = start_up(ups, ["--topology", "topology/local.toml", "--data-dir", data], REPO, tmp_path / "up1", 2)

    out = u.stdout()
    assert "127.0.0.1:19092" in out and "127.0.0.1:29092" in out, out
    assert "http://127.0.0.1:19094/metrics" in out and "http://127.0.0.1:29094/metrics" in out, out
    assert "kcat -b 127.0.0.1:19092" in out, out
    regions = sorted(a[a.index("--region") + 1] for a in u.children.values())
    assert regions == ["east", "west"], u.children
    for argv in u.children.values():
        assert argv[1] == "broker" and "--topology" in argv, argv
    for region, (kafka_port, metrics_port) in LOCAL_PORTS.items():
        assert port_open("127.0.0.1", kafka_port), f"{region} Kafka port {kafka_port} closed\n{u.output()}"
        m = scrape(f"127.0.0.1:{metrics_port}")
        assert ("ferry_connections", frozenset()) in m, f"{region} metrics lack ferry_connections: {sorted(m)[:20]}"

    # produce with kcat in east, read it back in east (kcat, then `ferry consume --region east`)
    east = "127.0.0.1:19092"
    t = topic_name("up-local")
    n = 25
    kcat_produce(east, t, [f"k{i}:v{i}" for i in range(n)], "-K", ":", "-H", "via=kcat")
    got = kcat_consume(east, t)
    assert [(r["key"], r["payload"], r["offset"]) for r in got] == [(f"k{i}", f"v{i}", i) for i in range(n)], got
    assert all(r["headers"] == ["via", "kcat"] for r in got), got[:3]
    c = ferry("consume", "--topology", "topology/local.toml", "--region", "east", t, "--from-beginning", "--keys",
              "-n", n, "--idle-exit", "20s", cwd=REPO)
    assert c.stdout.splitlines() == [f"k{i}=v{i}" for i in range(n)], describe(c)

    # `ferry topics` in both regions: east has the topic with n records; the west command really
    # talks to west's broker (its Metadata counter moves)
    e = ferry("topics", "--topology", "topology/local.toml", "--region", "east", "list", cwd=REPO)
    rows = {ln.split()[0]: ln.split()[1:] for ln in e.stdout.splitlines()[1:] if ln.strip()}
    assert rows.get(t) == ["1", str(n)], describe(e)
    before = metric(scrape("127.0.0.1:29094"), "ferry_requests_total", api="Metadata")
    w = ferry("topics", "--region", "west", "list", cwd=REPO)  # default --topology topology/local.toml
    assert w.stdout.splitlines()[0].split() == ["TOPIC", "PARTITIONS", "END", "OFFSETS"], describe(w)
    after = metric(scrape("127.0.0.1:29094"), "ferry_requests_total", api="Metadata")
    assert after > before, f"west's Metadata requests did not move ({before} -> {after}): " \
                           f"`ferry topics --region west` did not talk to west\n{describe(w)}"

    # the gateways mirror east's topic into west at the same offsets (the embedded default
    # mirrors every topic created in east to west)
    west = "127.0.0.1:29092"
    got_w = kcat_consume_until(west, t, n, timeout=60)
    assert [(r["key"], r["payload"], r["offset"]) for r in got_w] == [(f"k{i}", f"v{i}", i) for i in range(n)], got_w
    assert all(r["headers"] == ["via", "kcat"] for r in got_w), got_w[:3]

    # data layout: <data-dir>/<region>/broker-<id>
    assert list((data / "east" / "broker-1" / f"{t}-0").glob("*.log")), sorted(data.rglob("*"))
    assert (data / "west" / "broker-1").is_dir(), sorted(data.rglob("*"))

    stop_cleanly(u, signal.SIGINT, local_ports_free)
    logs = broker_logs(data)
    assert set(logs) == {"east-broker-1.log", "west-broker-1.log", "east-gateway.log", "west-gateway.log"}, logs.keys()
    for name, text in logs.items():
        if name.endswith("gateway.log"):
            assert "shutting down the gateway" in text, f"{name} did not shut down cleanly:\n{text[-3000:]}"
            continue
        assert "shutting down: syncing partitions" in text, f"{name} did not shut down cleanly:\n{text[-3000:]}"

    # a second `ferry up` on the same data dir still has the records
    u2 = start_up(ups, ["--data-dir", data], REPO, tmp_path / "up2", 2)  # default --topology
    got2 = kcat_consume(east, t)
    assert [(r["key"], r["payload"]) for r in got2] == [(f"k{i}", f"v{i}") for i in range(n)], got2
    stop_cleanly(u2, signal.SIGINT, local_ports_free)


def two_region_topology(path: Path) -> dict:
    """A topology on free ports, no gateways, no topic rules. Returns its ports."""
    ports = set()
    while len(ports) < 3:
        ports.add(free_port())
    a_kafka, a_metrics, b_kafka = sorted(ports)
    path.write_text(f"""\
[regions.alpha]
data_dir = "a-data"

[[regions.alpha.brokers]]
id = 1
listen = "127.0.0.1:{a_kafka}"
metrics = "127.0.0.1:{a_metrics}"

[regions.beta]

[[regions.beta.brokers]]
id = 7
listen = "127.0.0.1:{b_kafka}"
""")
    return {"alpha": a_kafka, "alpha_metrics": a_metrics, "beta": b_kafka}


def test_up_own_topology_sigterm(ups, tmp_path):
    """`ferry up --topology ABS --data-dir REL` from another directory: data under the region's
    data_dir and broker id, clients via `--topology --region`, SIGTERM stops everything (exit 0)."""
    topo = tmp_path / "conf" / "two.toml"
    topo.parent.mkdir()
    ports = two_region_topology(topo)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    u = start_up(ups, ["--topology", topo, "--data-dir", "root"], cwd, tmp_path / "up", 2)
    out = u.stdout()
    assert f"127.0.0.1:{ports['alpha']}" in out and f"127.0.0.1:{ports['beta']}" in out, out

    t = topic_name("up-own")
    lines = [f"line {i}" for i in range(10)]
    p = ferry("produce", "--topology", topo, "--region", "beta", t, input="\n".join(lines) + "\n", cwd=cwd)
    assert f"produced 10 records to {t}" in p.stderr, describe(p)
    c = ferry("consume", "--topology", topo, "--region", "beta", t, "--from-beginning", "-n", 10,
              "--idle-exit", "20s", cwd=cwd)
    assert sorted(c.stdout.splitlines()) == sorted(lines), describe(c)
    # it went to beta (broker 7, default data dir = region name), not alpha
    beta_dir = cwd / "root" / "beta" / "broker-7"
    assert list(beta_dir.glob(f"{t}-*")), sorted((cwd / "root").rglob("*"))
    assert (cwd / "root" / "a-data" / "broker-1").is_dir(), sorted((cwd / "root").rglob("*"))
    assert not list((cwd / "root" / "a-data").rglob(f"{t}-*"))
    m = scrape(f"127.0.0.1:{ports['alpha_metrics']}")
    assert metric(m, "ferry_records_in_total", topic=t) == 0

    stop_cleanly(u, signal.SIGTERM, [ports["alpha"], ports["alpha_metrics"], ports["beta"]])


def test_up_stops_everything_when_a_broker_dies(ups, tmp_path):
    topo = tmp_path / "two.toml"
    ports = two_region_topology(topo)
    u = start_up(ups, ["--topology", topo, "--data-dir", tmp_path / "data"], tmp_path, tmp_path / "up", 2)
    (victim,) = [pid for pid, argv in u.children.items() if "alpha" in argv]
    (other,) = [pid for pid, argv in u.children.items() if "beta" in argv]
    os.kill(victim, signal.SIGKILL)  # a broker we started (through ferry up), by pid
    rc = u.wait(60)
    assert rc != 0, f"ferry up exited 0 although alpha/broker-1 died\n{u.output()}"
    assert "alpha/broker-1 exited" in u.stderr(), u.output()
    assert not running(other), f"beta's broker {other} still running after ferry up exited\n{u.output()}"
    assert not port_open("127.0.0.1", ports["beta"])


def test_up_port_already_in_use(ups, tmp_path):
    """A broker that cannot bind its Kafka port (another process holds it): `ferry up` must not
    announce itself as up, and exits non-zero naming the broker, with no broker left running."""
    topo = tmp_path / "two.toml"
    ports = two_region_topology(topo)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", ports["alpha"]))
    squatter.listen(16)
    try:
        u = FerryUp(["--topology", topo, "--data-dir", tmp_path / "data"], tmp_path, tmp_path / "up")
        ups.append(u)
        u.start()
        rc = u.wait_exit(90)
    finally:
        squatter.close()
    assert rc != 0, u.output()
    assert "alpha/broker-1" in u.stderr(), u.output()
    log = (tmp_path / "data" / "logs" / "alpha-broker-1.log").read_text(errors="replace")
    assert "Address already in use" in log, log[-2000:]
    assert not [pid for pid in u.children if running(pid)], u.children
    assert "ferry is up" not in u.stdout(), \
        f"ferry up announced itself as up although alpha/broker-1 never listened (another process " \
        f"held 127.0.0.1:{ports['alpha']})\n{u.output()}"


def unstartable_alpha(path: Path, tmp_path: Path) -> dict:
    """two_region_topology whose alpha broker cannot open its data directory (a regular file)."""
    ports = two_region_topology(path)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    path.write_text(path.read_text().replace('data_dir = "a-data"', f'data_dir = "{blocker}"'))
    return ports


def test_up_broker_that_cannot_start(ups, tmp_path):
    topo = tmp_path / "two.toml"
    ports = unstartable_alpha(topo, tmp_path)
    u = FerryUp(["--topology", topo, "--data-dir", tmp_path / "data"], tmp_path, tmp_path / "up")
    ups.append(u)
    u.start()
    rc = u.wait_exit(120)
    assert rc != 0, u.output()
    assert "alpha/broker-1" in u.stderr(), u.output()
    assert "ferry is up" not in u.stdout(), u.output()
    assert not [pid for pid in u.children if running(pid)], u.children
    assert not port_open("127.0.0.1", ports["beta"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_up_signal_while_starting_leaves_no_broker(ups, tmp_path, sig):
    """A signal while `ferry up` still waits for its brokers must stop what it started, like a
    signal after start-up. To hold it in start-up, alpha's broker hangs while opening its data
    directory (a topic metadata file that is a FIFO blocks the read); beta starts normally."""
    topo = tmp_path / "two.toml"
    ports = two_region_topology(topo)
    data = tmp_path / "data"
    topics_meta = data / "a-data" / "broker-1" / ".ferry" / "topics"
    topics_meta.mkdir(parents=True)
    os.mkfifo(topics_meta / "blocked.toml")
    u = FerryUp(["--topology", topo, "--data-dir", data], tmp_path, tmp_path / "up")
    ups.append(u)
    u.start()
    wait_for(lambda: port_open("127.0.0.1", ports["beta"]), 30, "beta's broker to listen")
    u._record_children()
    (beta,) = [pid for pid, argv in u.children.items() if "beta" in argv]
    (alpha,) = [pid for pid, argv in u.children.items() if "alpha" in argv]
    assert running(alpha) and not port_open("127.0.0.1", ports["alpha"]), \
        "precondition: alpha's broker should hang in start-up (FIFO in its topic metadata)"
    assert u.proc.poll() is None and "ferry is up" not in u.stdout(), \
        f"precondition: ferry up should still be starting\n{u.output()}"
    u.signal(sig)
    rc = u.wait(60)
    # brokers sent SIGTERM by ferry up may still be exiting: give them a bounded while
    for name, pid in (("beta", beta), ("alpha", alpha)):
        assert wait_for_exit(pid, 20), \
            f"ferry up exited ({rc}) on {sig.name} during start-up but left {name}'s broker " \
            f"(pid {pid}, {' '.join(u.children[pid])}) running\n{u.output()}"
    assert not port_open("127.0.0.1", ports["beta"])


def wait_for_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not running(pid):
            return True
        time.sleep(0.1)
    return False


def test_up_bad_topology_starts_nothing(ups, tmp_path):
    topo = tmp_path / "bad.toml"
    port = free_port()
    topo.write_text(f'[regions.east]\n\n[[regions.east.brokers]]\nid = 1\nlisten = "127.0.0.1:{port}"\n'
                    'metrcs = "127.0.0.1:1"\n')
    p = subprocess.run([str(FERRY_BIN), "up", "--topology", str(topo), "--data-dir", str(tmp_path / "d")],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode != 0, p
    assert f"{topo}:6:1: regions.east.brokers[0].metrcs: unknown field `metrcs`" in p.stderr, p.stderr
    assert not port_open("127.0.0.1", port)
    assert not (tmp_path / "d" / "east").exists()


# =========================================================================== topology check / show

EAST = '''\
[regions.east]
data_dir = "east"

[[regions.east.brokers]]
id = 1
listen = "127.0.0.1:19092"
metrics = "127.0.0.1:19094"

[regions.east.gateway]
quic = "127.0.0.1:19093"
admin = "127.0.0.1:19095"
'''
WEST = EAST.replace("east", "west").replace(":19", ":29")
RULES = '''
[[topics]]
pattern = "orders"
primary = "east"
mirrors = ["west"]
mode = "sync"

[[topics]]
pattern = "*"
primary = "east"
mirrors = ["west"]
'''
VALID = EAST + "\n" + WEST + RULES

ERR_LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<field>[^ :]+): (?P<msg>.*)$")


def sub(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
    return text.replace(old, new)


def check(path: Path, cwd: Path | None = None):
    p = ferry("topology", "check", path, check=False, cwd=cwd)
    assert p.returncode in (0, 1), describe(p)
    return p


def check_errors(tmp_path: Path, name: str, text: str) -> tuple[Path, list[dict], subprocess.CompletedProcess]:
    f = tmp_path / f"{name}.toml"
    f.write_text(text)
    p = check(f)
    assert p.returncode == 1, f"expected exit code 1 for a bad topology\n{describe(p)}"
    errors = []
    for ln in p.stdout.splitlines():
        m = ERR_LINE.match(ln)
        assert m, f"not a FILE:LINE:COLUMN: field: message line: {ln!r}\n{describe(p)}"
        assert m["file"] == str(f), ln
        errors.append({"line": int(m["line"]), "col": int(m["col"]), "field": m["field"], "msg": m["msg"],
                       "text": ln})
    assert errors, describe(p)
    assert f"{f}: {len(errors)} error(s)" in p.stderr, describe(p)
    positions = [(e["line"], e["col"]) for e in errors]
    assert positions == sorted(positions), f"errors not sorted by position\n{p.stdout}"
    return f, errors, p


def expect(errors, f, line, col, field, msg, hint=None):
    """One error with exactly this FILE:LINE:COLUMN: field: prefix, message (and hint)."""
    prefix = f"{f}:{line}:{col}: {field}: "
    hits = [e for e in errors if e["text"].startswith(prefix)]
    assert hits, f"no error starting {prefix!r}; got:\n" + "\n".join(e["text"] for e in errors)
    (e,) = hits
    assert e["msg"].startswith(msg), f"message {e['msg']!r} does not start with {msg!r}"
    if hint is not None:
        assert e["msg"].endswith(f"(hint: {hint})"), f"{e['msg']!r} lacks hint {hint!r}"


def test_check_base_file_is_valid(tmp_path):
    """The base of every bad file below is itself valid (so each error comes from its one change)."""
    f = tmp_path / "valid.toml"
    f.write_text(VALID)
    p = check(f)
    assert p.returncode == 0 and p.stdout == f"{f}: OK\n", describe(p)


def test_check_unknown_field_broker(tmp_path):
    text = sub(VALID, 'metrics = "127.0.0.1:29094"', 'metrcs = "127.0.0.1:29094"')
    f, errors, _ = check_errors(tmp_path, "unknown-broker", text)
    assert len(errors) == 1, errors
    expect(errors, f, line_of(text, "metrcs ="), 1, "regions.west.brokers[0].metrcs", "unknown field `metrcs`",
           "did you mean `metrics`?")


def test_check_unknown_field_top_level(tmp_path):
    text = VALID + '\n[failvoer]\nlease = "10s"\n'
    f, errors, _ = check_errors(tmp_path, "unknown-top", text)
    assert len(errors) == 1, errors
    ln, col = pos_of(text, "[failvoer]", token="failvoer")
    expect(errors, f, ln, col, "failvoer", "unknown field `failvoer`", "did you mean `failover`?")


def test_check_unknown_field_topic_rule(tmp_path):
    """A misspelt required field: the unknown key at its line, the missing one at its table header."""
    text = sub(VALID, 'pattern = "*"\nprimary = "east"', 'pattern = "*"\nprimay = "east"')
    f, errors, _ = check_errors(tmp_path, "unknown-topic", text)
    assert len(errors) == 2, errors
    expect(errors, f, line_of(text, "primay ="), 1, "topics[1].primay", "unknown field `primay`",
           "did you mean `primary`?")
    expect(errors, f, line_of(text, "[[topics]]", nth=2), 1, "topics[1].primary", "missing field `primary`")


def test_check_unknown_field_gateway(tmp_path):
    text = sub(VALID, 'admin = "127.0.0.1:29095"', 'admn = "127.0.0.1:29095"')
    f, errors, _ = check_errors(tmp_path, "unknown-gateway", text)
    assert len(errors) == 2, errors
    expect(errors, f, line_of(text, "admn ="), 1, "regions.west.gateway.admn", "unknown field `admn`",
           "did you mean `admin`?")
    expect(errors, f, line_of(text, "[regions.west.gateway]"), 1, "regions.west.gateway.admin",
           "missing field `admin`")


def test_check_duplicate_region(tmp_path):
    second = '\n[regions.east]\n\n[[regions.east.brokers]]\nid = 2\nlisten = "127.0.0.1:39092"\n'
    text = VALID + second
    f, errors, _ = check_errors(tmp_path, "dup-region", text)
    ln, col = pos_of(text, "[regions.east]", nth=2, token="east")
    expect(errors, f, ln, col, "regions.east", "region `east` is defined twice",
           f"first defined at line {line_of(text, '[regions.east]')}")
    assert errors[0]["line"] == ln, "the duplicate region is the first error"


def test_check_duplicate_region_copy_pasted(tmp_path):
    """A whole region block pasted twice: the first error names the region and its first line."""
    text = VALID + "\n" + EAST.replace(":19", ":39")
    f, errors, _ = check_errors(tmp_path, "dup-region-block", text)
    ln, col = pos_of(text, "[regions.east]", nth=2, token="east")
    assert errors[0]["text"].startswith(f"{f}:{ln}:{col}: regions.east: region `east` is defined twice"), errors


def test_check_duplicate_broker_id(tmp_path):
    text = sub(VALID, "[regions.east.gateway]",
               '[[regions.east.brokers]]\nid = 1\nlisten = "127.0.0.1:19192"\n\n[regions.east.gateway]')
    f, errors, _ = check_errors(tmp_path, "dup-broker", text)
    assert len(errors) == 1, errors
    ln, col = pos_of(text, "id = 1", nth=2, token="1")
    expect(errors, f, ln, col, "regions.east.brokers[1].id", "duplicate broker id 1 in region `east`",
           f"broker 1 is first defined at line {line_of(text, 'id = 1')}; ids must be unique within a region")


def test_check_mirror_not_a_region(tmp_path):
    text = sub(VALID, 'pattern = "*"\nprimary = "east"\nmirrors = ["west"]',
               'pattern = "*"\nprimary = "east"\nmirrors = ["west", "north"]')
    f, errors, _ = check_errors(tmp_path, "mirror-undefined", text)
    assert len(errors) == 1, errors
    ln, col = pos_of(text, '"north"')
    expect(errors, f, ln, col, "topics[1].mirrors[1]", "mirror `north` is not a region",
           "defined regions: `east`, `west`")


def test_check_columns_count_characters(tmp_path):
    """Columns count characters, not bytes: `"nörth"` starts at character 20 of its line."""
    text = sub(VALID, 'pattern = "*"\nprimary = "east"\nmirrors = ["west"]',
               'pattern = "*"\nprimary = "east"\nmirrors = ["wëst", "nörth"]')
    f, errors, _ = check_errors(tmp_path, "unicode", text)
    assert len(errors) == 2, errors
    ln, col = pos_of(text, '"wëst"')
    expect(errors, f, ln, col, "topics[1].mirrors[0]", "mirror `wëst` is not a region")
    ln, col = pos_of(text, '"nörth"')
    assert col == 20
    expect(errors, f, ln, col, "topics[1].mirrors[1]", "mirror `nörth` is not a region")


def test_check_unknown_field_region(tmp_path):
    text = sub(VALID, '[regions.west]\ndata_dir = "west"', '[regions.west]\ndata_dir = "west"\nbrokerz = 1')
    f, errors, _ = check_errors(tmp_path, "unknown-region", text)
    assert len(errors) == 1, errors
    expect(errors, f, line_of(text, "brokerz"), 1, "regions.west.brokerz", "unknown field `brokerz`",
           "did you mean `brokers`?")


def test_check_syntax_error_line(tmp_path):
    text = sub(VALID, 'listen = "127.0.0.1:29092"', 'listen = "127.0.0.1:29092')
    f = tmp_path / "syntax.toml"
    f.write_text(text)
    p = check(f)
    assert p.returncode == 1, describe(p)
    ln = line_of(text, 'listen = "127.0.0.1:29092')
    assert p.stdout.startswith(f"{f}:{ln}:"), describe(p)
    assert "regions.west.brokers" in p.stdout.split(": ")[1], describe(p)


def test_check_primary_not_a_region(tmp_path):
    text = sub(VALID, 'pattern = "orders"\nprimary = "east"', 'pattern = "orders"\nprimary = "north"')
    f, errors, _ = check_errors(tmp_path, "primary-undefined", text)
    assert len(errors) == 1, errors
    ln, col = pos_of(text, 'primary = "north"', token='"north"')
    expect(errors, f, ln, col, "topics[0].primary", "primary `north` is not a region",
           "defined regions: `east`, `west`")


@pytest.mark.parametrize("case", ["same-kind", "across-kinds", "unspecified-ip"])
def test_check_two_listeners_on_one_address(tmp_path, case):
    if case == "same-kind":  # two Kafka listeners
        text = sub(VALID, 'listen = "127.0.0.1:29092"', 'listen = "127.0.0.1:19092"')
        needle, field, addr, other, other_needle = ('listen = "127.0.0.1:19092"', "regions.west.brokers[0].listen",
                                                   "127.0.0.1:19092", "regions.east.brokers[0].listen",
                                                   'listen = "127.0.0.1:19092"')
        nth = 2
    elif case == "across-kinds":  # a gateway's admin API on a broker's metrics address
        text = sub(VALID, 'admin = "127.0.0.1:29095"', 'admin = "127.0.0.1:19094"')
        needle, field, addr, other, other_needle = ('admin = "127.0.0.1:19094"', "regions.west.gateway.admin",
                                                   "127.0.0.1:19094", "regions.east.brokers[0].metrics",
                                                   'metrics = "127.0.0.1:19094"')
        nth = 1
    else:  # 0.0.0.0 overlaps every IP on the port
        text = sub(VALID, 'listen = "127.0.0.1:29092"',
                   'listen = "0.0.0.0:19093"\nadvertised = "west.example.com:19093"')
        needle, field, addr, other, other_needle = ('listen = "0.0.0.0:19093"', "regions.west.brokers[0].listen",
                                                   "0.0.0.0:19093", "regions.east.gateway.quic",
                                                   'quic = "127.0.0.1:19093"')
        nth = 1
    f, errors, _ = check_errors(tmp_path, f"listeners-{case}", text)
    assert len(errors) == 1, errors
    ln, col = pos_of(text, needle, nth=nth, token='"')
    expect(errors, f, ln, col, field,
           f"address {addr} is already used by {other} (line {line_of(text, other_needle)})",
           "every listener (Kafka, QUIC, admin, metrics) needs its own port")


def test_check_topic_with_two_primaries(tmp_path):
    text = VALID + '\n[[topics]]\npattern = "payments"\nprimary = "west"\nmirrors = ["east"]\n'
    text = sub(text, '[[topics]]\npattern = "*"', '[[topics]]\npattern = "payments"\nprimary = "east"\n\n'
                                                  '[[topics]]\npattern = "*"')
    # rules: orders(east), payments(east), *(east), payments(west): the last is claimed twice
    # (and shadowed by `*`; the two-primaries error is about payments' primary)
    f, errors, p = check_errors(tmp_path, "two-primaries", text)
    ln, col = pos_of(text, 'primary = "west"', token='"west"')
    first_rule = line_of(text, 'pattern = "payments"') - 1  # its [[topics]] header
    expect(errors, f, ln, col, "topics[3].primary",
           f"topic `payments` is claimed as primary by two regions: `east` (topics[1], line "
           f"{first_rule}) and `west`",
           "a topic has exactly one primary region; remove one rule")


def test_check_topic_with_two_primaries_adjacent(tmp_path):
    text = sub(VALID, 'pattern = "*"\nprimary = "east"\nmirrors = ["west"]',
               'pattern = "orders"\nprimary = "west"\nmirrors = ["east"]')
    f, errors, _ = check_errors(tmp_path, "two-primaries-adjacent", text)
    assert len(errors) == 1, errors
    ln, col = pos_of(text, 'primary = "west"', token='"west"')
    expect(errors, f, ln, col, "topics[1].primary",
           f"topic `orders` is claimed as primary by two regions: `east` (topics[0], line "
           f"{line_of(text, '[[topics]]')}) and `west`")


TLS = '''
[tls]
ca = "certs/ca.pem"

[tls.regions.east]
cert = "certs/east.pem"
key = "certs/east.key"

[tls.regions.west]
cert = "certs/west.pem"
key = "certs/west.key"
'''
CERT_FILES = ["ca.pem", "east.pem", "east.key", "west.pem", "west.key"]


def test_check_certificates_relative_to_the_file(tmp_path):
    """Certificate paths resolve against the topology file's directory, not the working directory."""
    conf = tmp_path / "conf"
    (conf / "certs").mkdir(parents=True)
    for n in CERT_FILES:
        (conf / "certs" / n).write_text("-----BEGIN CERTIFICATE-----\n")
    f = conf / "tls.toml"
    f.write_text(VALID + TLS)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = check(f, cwd=elsewhere)
    assert p.returncode == 0 and p.stdout == f"{f}: OK\n", describe(p)
    p = check(Path("conf/tls.toml"), cwd=tmp_path)  # a relative topology path
    assert p.returncode == 0 and p.stdout == "conf/tls.toml: OK\n", describe(p)
    s = ferry("topology", "show", f, cwd=elsewhere)
    assert str(conf / "certs" / "east.key") in s.stdout, s.stdout


@pytest.mark.parametrize("missing", CERT_FILES)
def test_check_missing_certificate_file(tmp_path, missing):
    (tmp_path / "certs").mkdir()
    for n in CERT_FILES:
        if n != missing:
            (tmp_path / "certs" / n).write_text("-----BEGIN CERTIFICATE-----\n")
    text = VALID + TLS
    f, errors, _ = check_errors(tmp_path, "tls", text)
    assert len(errors) == 1, errors
    stem, ext = missing.split(".")
    if missing == "ca.pem":
        field, what = "tls.ca", "CA certificate"
    else:
        field = f"tls.regions.{stem}.{'cert' if ext == 'pem' else 'key'}"
        what = "certificate" if ext == "pem" else "key"
    ln, col = pos_of(text, f'"certs/{missing}"')
    expect(errors, f, ln, col, field, f"{what} file `certs/{missing}` not found")
    assert f"looked for {tmp_path / 'certs' / missing}" in errors[0]["msg"], errors[0]


def test_check_gateway_region_without_certificate(tmp_path):
    (tmp_path / "certs").mkdir()
    for n in CERT_FILES:
        (tmp_path / "certs" / n).write_text("x\n")
    tls = sub(TLS, '[tls.regions.west]\ncert = "certs/west.pem"\nkey = "certs/west.key"\n', "")
    text = VALID + tls
    f, errors, _ = check_errors(tmp_path, "tls-no-west", text)
    assert len(errors) == 1, errors
    expect(errors, f, line_of(text, "[tls]"), 1, "tls.regions.west", "region `west` has a gateway but no certificate")


def test_check_reports_every_error_at_once(tmp_path):
    text = sub(VALID, 'metrics = "127.0.0.1:29094"', 'metrcs = "127.0.0.1:29094"')
    text = sub(text, 'pattern = "orders"\nprimary = "east"', 'pattern = "orders"\nprimary = "north"')
    text = text + '\n[failover]\nlease = "10 parsecs"\n'
    f, errors, _ = check_errors(tmp_path, "many", text)
    assert [e["field"] for e in errors] == ["regions.west.brokers[0].metrcs", "topics[0].primary",
                                            "failover.lease"], errors


def test_check_unreadable_file(tmp_path):
    f = tmp_path / "nope.toml"
    p = check(f)
    assert p.returncode == 1 and p.stdout.startswith(f"{f}:1:1: cannot read the topology file"), describe(p)


def split_table(text: str, title: str) -> list[list[str]]:
    """The rows (header first) of a `ferry topology show` table, cells split at 2+ spaces."""
    lines = text.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith(title))
    rows = []
    for ln in lines[i + 1:]:
        if not ln.strip():
            break
        rows.append(re.split(r"\s{2,}", ln.strip()))
    return rows


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_check_and_show(example):
    rel = example.relative_to(REPO)
    p = ferry("topology", "check", rel, cwd=REPO)
    assert p.stdout == f"{rel}: OK\n", describe(p)

    spec = tomllib.loads(example.read_text())
    s = ferry("topology", "show", rel, cwd=REPO)
    out = s.stdout

    regions = split_table(out, "REGIONS")
    assert regions[0] == ["REGION", "BROKERS", "GATEWAY", "DATA DIR", "PRIMARY FOR", "MIRRORS"], regions
    rules = spec.get("topics", [])
    want = []
    for name, r in spec["regions"].items():
        primary_for = [x["pattern"] for x in rules if x["primary"] == name]
        mirror_of = [x["pattern"] for x in rules if name in x.get("mirrors", [])]
        brokers = str(len(r["brokers"]))
        if "etcd" in r:  # a region cluster: its replication defaults too
            rf = r.get("replication_factor", min(3, len(r["brokers"])))
            brokers += f" (RF {rf}, min ISR {r.get('min_insync_replicas', 1)})"
        want.append([name, brokers, "yes" if "gateway" in r else "no", r.get("data_dir", name),
                     ", ".join(primary_for) or "-", ", ".join(mirror_of) or "-"])
    assert regions[1:] == want, out

    procs = split_table(out, "PROCESSES")
    kafka = {(row[0], row[3]) for row in procs[1:] if row[2] == "kafka"}
    assert kafka == {(name, b["listen"]) for name, r in spec["regions"].items() for b in r["brokers"]}, out
    admin = {(row[0], row[3]) for row in procs[1:] if row[2] == "admin"}
    assert admin == {(name, r["gateway"]["admin"]) for name, r in spec["regions"].items() if "gateway" in r}, out
    etcd = {(row[0], row[2], row[3]) for row in procs[1:] if row[1] == "etcd"}
    assert etcd == {(name, k, r["etcd"][k]) for name, r in spec["regions"].items()
                    for k in ("client", "peer") if k in r.get("etcd", {})}, out

    topics = split_table(out, "TOPICS")
    assert topics[0] == ["TOPIC", "PRIMARY", "FLOWS", "MODE", "PARTITIONS", "RETENTION"], topics
    want = []
    for x in rules:
        flow = f"{x['primary']} -> {', '.join(x['mirrors'])}" if x.get("mirrors") else f"{x['primary']} (not mirrored)"
        want.append([x["pattern"], x["primary"], flow, x.get("mode", "async"), str(x.get("partitions", "default")),
                     x.get("retention", "default")])
    assert topics[1:] == want, out

    fo = split_table(out, "FAILOVER")
    f = spec.get("failover", {})
    assert fo[1] == [f.get("fencing", "lease"), f.get("lease", "10s"), f.get("heartbeat", "2s"),
                     f.get("promotion", "manual"), f.get("witness", "-")], out


def test_show_bad_file_fails(tmp_path):
    f = tmp_path / "bad.toml"
    text = sub(VALID, 'pattern = "orders"\nprimary = "east"', 'pattern = "orders"\nprimary = "north"')
    f.write_text(text)
    p = ferry("topology", "show", f, check=False)
    assert p.returncode == 1, describe(p)
    assert f"{f}:{line_of(text, 'north')}:" in p.stdout and "REGIONS" not in p.stdout, describe(p)


# =========================================================================== /metrics


def log_bytes(data_dir: Path, topic: str) -> int:
    return sum(f.stat().st_size for f in data_dir.glob(f"{topic}-*/*.log"))


def test_metrics_counters_move_with_produce_and_fetch(start_broker):
    mport = free_port()
    b = start_broker("--metrics", f"127.0.0.1:{mport}")
    maddr = f"127.0.0.1:{mport}"
    wait_for(lambda: port_open("127.0.0.1", mport), 20, "the metrics endpoint")
    t, other = topic_name("metrics"), topic_name("metrics-other")
    ferry("topics", "-b", b.bootstrap, "create", t, "--partitions", 2)
    kcat_produce(b.bootstrap, other, ["x"])

    m0 = scrape(maddr)
    assert metric(m0, "ferry_records_in_total", topic=t) == 0
    assert metric(m0, "ferry_bytes_in_total", topic=t) == 0
    other0 = metric(m0, "ferry_records_in_total", default=None, topic=other)
    assert other0 == 1, other0
    produce0 = metric(m0, "ferry_request_seconds_count", api="Produce")

    # kcat, several batches (batch.num.messages), both partitions
    n1 = 57
    kcat_produce(b.bootstrap, t, [f"k{i}:value-{i}" for i in range(n1)], "-K", ":",
                 "-X", "batch.num.messages=8", "-X", "linger.ms=0")
    m1 = scrape(maddr)
    assert metric(m1, "ferry_records_in_total", default=None, topic=t) == n1
    bytes1 = metric(m1, "ferry_bytes_in_total", default=None, topic=t)
    assert bytes1 > 0
    # batches are stored as produced: the counter is exactly what the partition logs grew by
    assert bytes1 == log_bytes(b.data_dir, t), (bytes1, log_bytes(b.data_dir, t))
    assert metric(m1, "ferry_records_in_total", topic=other) == 1, "another topic's counter moved"
    assert metric(m1, "ferry_request_seconds_count", api="Produce") > produce0

    # `ferry produce`, 3 requests of at most 10 records
    n2 = 30
    p = ferry("produce", "-b", b.bootstrap, t, "--batch", 10, input="".join(f"v{i}\n" for i in range(n2)))
    assert f"produced {n2} records" in p.stderr, describe(p)
    m2 = scrape(maddr)
    assert metric(m2, "ferry_records_in_total", topic=t) == n1 + n2
    bytes2 = metric(m2, "ferry_bytes_in_total", topic=t)
    assert bytes2 > bytes1 and bytes2 == log_bytes(b.data_dir, t)
    assert metric(m2, "ferry_bytes_out_total", topic=t) == 0, "nothing was fetched yet"

    # a fetch of everything moves the bytes-out counter by at least what is stored
    got = kcat_consume(b.bootstrap, t, 0) + kcat_consume(b.bootstrap, t, 1)
    assert len(got) == n1 + n2
    m3 = scrape(maddr)
    out3 = metric(m3, "ferry_bytes_out_total", default=None, topic=t)
    assert out3 >= bytes2, (out3, bytes2)
    assert metric(m3, "ferry_records_in_total", topic=t) == n1 + n2, "a fetch moved the produce counter"
    assert metric(m3, "ferry_request_seconds_count", api="Fetch") > 0
    assert metric(m3, "ferry_fsync_seconds_count") > 0

    # the end-offset gauges are refreshed every 5 s
    def ends():
        m = scrape(maddr)
        return [metric(m, "ferry_log_end_offset", default=-1, topic=t, partition=str(i)) for i in (0, 1)]
    want = [sum(1 for r in got if r["partition"] == i) for i in (0, 1)]
    wait_for(lambda: ends() == want, 30, f"ferry_log_end_offset of {t} == {want}", interval=0.5)

    # a group that commits shows up in ferry_groups (a gauge refreshed every 5 s)
    g0 = metric(scrape(maddr), "ferry_groups", default=None)
    ferry("consume", "-b", b.bootstrap, t, "--group", "cli-metrics-" + uuid.uuid4().hex[:6], "--from-beginning",
          "-n", 3, "--idle-exit", "20s")
    wait_for(lambda: metric(scrape(maddr), "ferry_groups") == g0 + 1, 30, "ferry_groups to count the new group",
             interval=0.5)
    # every client has disconnected: the connection gauge is back to 0
    wait_for(lambda: metric(scrape(maddr), "ferry_connections", default=None) == 0, 30,
             "ferry_connections == 0 after every client left", interval=0.5)


def test_metrics_scraped_during_a_produce(start_broker):
    """Scrapes keep answering while a producer runs; the record counter never goes down and ends
    exactly at the number of records delivered."""
    mport = free_port()
    b = start_broker("--metrics", f"127.0.0.1:{mport}")
    maddr = f"127.0.0.1:{mport}"
    wait_for(lambda: port_open("127.0.0.1", mport), 20, "the metrics endpoint")
    t = topic_name("metrics-live")
    ferry("topics", "-b", b.bootstrap, "create", t, "--partitions", 3)
    seen: list[float] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def scraper():
        while not stop.is_set():
            try:
                seen.append(metric(scrape(maddr), "ferry_records_in_total", topic=t))
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return
            time.sleep(0.02)

    th = threading.Thread(target=scraper, daemon=True)
    th.start()
    n = 20000
    try:
        ck_produce(b.bootstrap, t, [{"key": f"k{i % 97}".encode(), "value": b"x" * 100} for i in range(n)],
                   linger_ms=5, batch_num_messages=200, acks="all")
    finally:
        stop.set()
        th.join(30)
    assert not errors, errors
    assert len(seen) >= 2, seen
    assert seen == sorted(seen), "ferry_records_in_total went down between scrapes"
    assert metric(scrape(maddr), "ferry_records_in_total", topic=t) == n
    assert log_bytes(b.data_dir, t) == metric(scrape(maddr), "ferry_bytes_in_total", topic=t)


# =========================================================================== produce | consume


def records_json(stdout: str) -> list[dict]:
    return [json.loads(ln) for ln in stdout.splitlines() if ln.strip()]


JSON_RECORDS = [
    {"key": "k1", "value": "v1", "headers": [["dup", "a"], ["dup", "b"], ["other", "c"]]},
    {"key": None, "value": "no key", "headers": []},
    {"key": "tomb", "value": None, "headers": [["why", "deleted"]]},
    {"key": "", "value": "", "headers": [["empty", ""], ["null", None]]},
    {"key": "k=v", "value": "a=b=c with spaces\tand a tab", "headers": [["dup", "x"], ["dup", "x"]]},
    {"key": "ünï", "value": "héllo ✓ \"quoted\" \\ backslash", "headers": [["ключ", "значение"]]},
    {"key": "k1", "value": "v1 again", "headers": []},
]


def test_produce_consume_json_roundtrip(broker):
    t = topic_name("cli-json")
    c = ferry("topics", "-b", broker.bootstrap, "create", t, "--partitions", 1)
    assert c.stdout.strip() == f"created {t} with 1 partitions", describe(c)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in JSON_RECORDS)
    p = ferry("produce", "-b", broker.bootstrap, t, "--json", "-H", "src=e2e", "-H", "dup=fixed", input=lines)
    assert f"produced {len(JSON_RECORDS)} records to {t}" in p.stderr, describe(p)

    n = len(JSON_RECORDS)
    c = ferry("consume", "-b", broker.bootstrap, t, "--json", "--from-beginning", "-n", n, "--idle-exit", "20s")
    got = records_json(c.stdout)
    assert len(got) == n, describe(c)
    for i, (want, r) in enumerate(zip(JSON_RECORDS, got)):
        assert r["partition"] == 0 and r["offset"] == i, r
        assert isinstance(r["timestamp"], int) and r["timestamp"] > 1_600_000_000_000, r
        assert r["key"] == want["key"], (want, r)
        assert r["value"] == want["value"], (want, r)
        assert r["headers"] == want["headers"] + [["src", "e2e"], ["dup", "fixed"]], (want, r)

    # an independent client sees the same keys (null vs empty), values (tombstone) and headers
    k = kcat_consume(broker.bootstrap, t, 0, "beginning", "-Z")
    assert [(r["key"], r["payload"]) for r in k] == [(w["key"], w["value"]) for w in JSON_RECORDS], k
    assert k[0]["headers"] == ["dup", "a", "dup", "b", "other", "c", "src", "e2e", "dup", "fixed"], k[0]

    # consume --json | produce --json copies a topic with keys and headers
    t2 = topic_name("cli-json-copy")
    ferry("topics", "-b", broker.bootstrap, "create", t2, "--partitions", 1)
    ferry("produce", "-b", broker.bootstrap, t2, "--json", input=c.stdout)
    c2 = ferry("consume", "-b", broker.bootstrap, t2, "--json", "--from-beginning", "-n", n, "--idle-exit", "20s")
    strip = [{k: v for k, v in r.items() if k != "timestamp"} for r in records_json(c2.stdout)]
    assert strip == [{k: v for k, v in r.items() if k != "timestamp"} for r in got], c2.stdout


def test_produce_piped_to_consume(broker):
    """A pipeline `ferry consume --json | ferry produce --json` copies a 3-partition topic: same
    partitions, offsets, keys, values and headers."""
    t, t2 = topic_name("cli-pipe-src"), topic_name("cli-pipe-dst")
    for x in (t, t2):
        ferry("topics", "-b", broker.bootstrap, "create", x, "--partitions", 3)
    n = 600  # more than one --batch of 500
    ferry("produce", "-b", broker.bootstrap, t, "--keys", "-H", "h=1", "-H", "h=2",
          input="".join(f"key{i % 13}=value {i}\n" for i in range(n)))
    src = subprocess.Popen([str(FERRY_BIN), "consume", "-b", broker.bootstrap, t, "--json", "--from-beginning",
                            "-n", str(n), "--idle-exit", "20s"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        dst = subprocess.run([str(FERRY_BIN), "produce", "-b", broker.bootstrap, t2, "--json"], stdin=src.stdout,
                             capture_output=True, text=True, timeout=60)
        src.stdout.close()
        assert src.wait(60) == 0
    finally:
        if src.poll() is None:
            src.kill()
            src.wait(10)
    assert dst.returncode == 0 and f"produced {n} records to {t2}" in dst.stderr, dst

    def dump(topic):
        c = ferry("consume", "-b", broker.bootstrap, topic, "--json", "--from-beginning", "-n", n,
                  "--idle-exit", "20s")
        rs = records_json(c.stdout)
        assert len(rs) == n, describe(c)
        return sorted((r["partition"], r["offset"], r["key"], r["value"], json.dumps(r["headers"])) for r in rs)

    a, b = dump(t), dump(t2)
    assert a == b
    assert {r[0] for r in a} == {0, 1, 2}
    assert all(r[4] == json.dumps([["h", "1"], ["h", "2"]]) for r in a)
    k = ferry("consume", "-b", broker.bootstrap, t2, "--keys", "--from-beginning", "-n", n, "--idle-exit", "20s")
    assert sorted(k.stdout.splitlines()) == sorted(f"key{i % 13}=value {i}" for i in range(n)), describe(k)


def test_consume_max_records_zero(broker):
    t = topic_name("cli-n0")
    ferry("produce", "-b", broker.bootstrap, t, input="a\nb\n")
    c = ferry("consume", "-b", broker.bootstrap, t, "--from-beginning", "-n", 0, "--idle-exit", "2s")
    assert c.stdout == "", f"-n 0 (stop after 0 records) printed records\n{describe(c)}"


def test_produce_consume_keys_partitions(broker):
    """`--keys` lines split at the first `=`; keyed records go to Kafka's murmur2 partition;
    per-key order is kept across 3 partitions."""
    t = topic_name("cli-keys")
    ferry("topics", "-b", broker.bootstrap, "create", t, "--partitions", 3)
    keys = [f"user-{i % 11}" for i in range(120)]
    lines = [f"{k}=event {i} = with equals" for i, k in enumerate(keys)] + ["no equals sign here"]
    p = ferry("produce", "-b", broker.bootstrap, t, "--keys", input="\n".join(lines) + "\n")
    assert f"produced {len(lines)} records" in p.stderr, describe(p)

    c = ferry("consume", "-b", broker.bootstrap, t, "--keys", "--from-beginning", "-n", len(lines),
              "--idle-exit", "20s")
    got = c.stdout.splitlines()
    want = lines[:-1] + ["=no equals sign here"]  # no `=`: an empty key
    assert sorted(got) == sorted(want), describe(c)
    for k in set(keys):
        assert [g for g in got if g.startswith(k + "=")] == [w for w in want if w.startswith(k + "=")], k

    by_kcat = []
    for part in range(3):
        for r in kcat_consume(broker.bootstrap, t, part):
            by_kcat.append(r)
            assert r["partition"] == kafka_partition(r["key"].encode(), 3), \
                f"key {r['key']!r} in partition {r['partition']}, Kafka's partitioner says " \
                f"{kafka_partition(r['key'].encode(), 3)}"
    assert len(by_kcat) == len(lines)
    assert {(r["key"], r["payload"]) for r in by_kcat} == {tuple(w.split("=", 1)) for w in want}


def committed_total(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    from confluent_kafka import TopicPartition
    c = ck_consumer(bootstrap, **{"group.id": group})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=20)
    finally:
        c.close()
    return sum(tp.offset for tp in tps if tp.offset >= 0)


def test_consume_group_resumes_from_committed_offsets(broker):
    t = topic_name("cli-group")
    g = "cli-" + uuid.uuid4().hex[:8]
    ferry("topics", "-b", broker.bootstrap, "create", t, "--partitions", 2)
    n = 20
    lines = [f"k{i % 5}=v{i}" for i in range(n)]
    ferry("produce", "-b", broker.bootstrap, t, "--keys", input="\n".join(lines) + "\n")

    def run(*extra):
        return ferry("consume", "-b", broker.bootstrap, t, "--keys", "--group", g, *extra).stdout.splitlines()

    first = run("--from-beginning", "-n", 7, "--idle-exit", "20s")
    assert len(first) == 7
    assert committed_total(broker.bootstrap, g, t, 2) == 7
    second = run("-n", 6, "--idle-exit", "20s")  # no --from-beginning: the group's offsets decide
    assert len(second) == 6
    assert not set(first) & set(second), (first, second)
    assert committed_total(broker.bootstrap, g, t, 2) == 13
    third = run("--from-beginning", "--idle-exit", "3s")  # committed offsets win over --from-beginning
    assert sorted(first + second + third) == sorted(lines), (first, second, third)
    assert committed_total(broker.bootstrap, g, t, 2) == n
    assert run("--from-beginning", "--idle-exit", "2s") == [], "a caught-up group got records again"

    # another group starts over
    other = ferry("consume", "-b", broker.bootstrap, t, "--keys", "--group", g + "-2", "--from-beginning",
                  "-n", n, "--idle-exit", "20s")
    assert sorted(other.stdout.splitlines()) == sorted(lines)


def test_consume_without_from_beginning_sees_only_new(broker):
    t = topic_name("cli-new")
    ferry("topics", "-b", broker.bootstrap, "create", t, "--partitions", 1)
    ferry("produce", "-b", broker.bootstrap, t, input="old-0\nold-1\n")
    assert ferry("consume", "-b", broker.bootstrap, t, "--idle-exit", "2s").stdout == ""
    c = subprocess.Popen([str(FERRY_BIN), "consume", "-b", broker.bootstrap, t, "-n", "1", "--idle-exit", "60s"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # keep producing until the consumer (which starts at the end) has one record
        i = 0
        deadline = time.monotonic() + 60
        while c.poll() is None and time.monotonic() < deadline:
            ferry("produce", "-b", broker.bootstrap, t, input=f"new-{i}\n")
            i += 1
            time.sleep(0.2)
        out, err = c.communicate(timeout=30)
    finally:
        if c.poll() is None:
            c.kill()
            c.wait(10)
    assert c.returncode == 0, err
    assert re.fullmatch(r"new-\d+\n", out), out


def test_topics_create_and_list(broker):
    t = topic_name("cli-topics")
    c = ferry("topics", "-b", broker.bootstrap, "create", t, "--partitions", 4)
    assert c.stdout.strip() == f"created {t} with 4 partitions", describe(c)
    ferry("produce", "-b", broker.bootstrap, t, input="".join(f"{i}\n" for i in range(9)))
    ls = ferry("topics", "-b", broker.bootstrap, "list")
    rows = {ln.split()[0]: ln.split()[1:] for ln in ls.stdout.splitlines()[1:] if ln.strip()}
    assert rows.get(t) == ["4", "9"], describe(ls)
    again = ferry("topics", "-b", broker.bootstrap, "create", t, "--partitions", 4, check=False)
    assert again.returncode != 0, describe(again)
    assert t in again.stderr, describe(again)


def test_clients_name_unknown_region(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text(VALID)
    for args in (["topics", "--topology", f, "--region", "north", "list"],
                 ["consume", "--topology", f, "--region", "north", "x", "--idle-exit", "1s"],
                 ["produce", "--topology", f, "--region", "north", "x"]):
        p = ferry(*args, check=False, timeout=30)
        assert p.returncode != 0 and "no region `north`" in p.stderr and "east, west" in p.stderr, describe(p)
