"""Support for test_cli.py: running `ferry` subcommands, `ferry up` as a supervised process,
Prometheus text parsing, positions in topology files, and Kafka's murmur2 partitioner."""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from conftest import ANSI, FERRY_BIN

CMD_TIMEOUT = 60.0


# --------------------------------------------------------------------------- running ferry

def ferry(*args, input: bytes | str | None = None, cwd: Path | str | None = None, timeout: float = CMD_TIMEOUT,
          check: bool = True, ok_codes=(0,)) -> subprocess.CompletedProcess:
    """Run `ferry ARGS` to completion (bounded); text stdout/stderr. With check, a code outside
    ok_codes fails with the whole command line and its output."""
    cmd = [str(FERRY_BIN), *map(str, args)]
    if isinstance(input, str):
        input = input.encode()
    p = subprocess.run(cmd, input=input if input is not None else b"", capture_output=True, timeout=timeout,
                       cwd=str(cwd) if cwd else None)
    p.stdout = p.stdout.decode(errors="replace")
    p.stderr = ANSI.sub("", p.stderr.decode(errors="replace"))
    if check and p.returncode not in ok_codes:
        raise AssertionError(f"{describe(p)}")
    return p


def describe(p: subprocess.CompletedProcess) -> str:
    return (f"$ {shlex.join(map(str, p.args))}\nexit code {p.returncode}\n"
            f"--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}")


# --------------------------------------------------------------------------- processes

def children_of(pid: int) -> list[int]:
    """Direct children of pid, from /proc/*/stat (field 4 is the parent pid)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # comm (field 2) may contain spaces; fields after the closing paren are space separated
        rest = stat[stat.rfind(")") + 2:].split()
        if int(rest[1]) == pid:
            out.append(int(d))
    return sorted(out)


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def running(pid: int) -> bool:
    """The pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for(fn, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class FerryUp:
    """`ferry up` as a child process (own session), stdout/stderr to files under `logdir`.

    The brokers it starts are its children; `children` records them (pid -> argv) once it is up.
    `cleanup()` SIGKILLs by pid whatever of this up process and its recorded children is still
    running."""

    READY = "Ctrl-C stops everything."

    def __init__(self, args: list[str], cwd: Path, logdir: Path):
        self.args = [str(FERRY_BIN), "up", *map(str, args)]
        self.cwd = cwd
        self.out_path = logdir / "up.stdout"
        self.err_path = logdir / "up.stderr"
        self.proc: subprocess.Popen | None = None
        self.children: dict[int, list[str]] = {}

    def start(self):
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(self.args, cwd=str(self.cwd), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, start_new_session=True)
        return self

    def stdout(self) -> str:
        try:
            return self.out_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr(self) -> str:
        try:
            return ANSI.sub("", self.err_path.read_text(errors="replace"))
        except FileNotFoundError:
            return ""

    def output(self) -> str:
        return f"$ {shlex.join(self.args)} (cwd {self.cwd})\n--- stdout\n{self.stdout()[-4000:]}\n" \
               f"--- stderr\n{self.stderr()[-4000:]}"

    def wait_ready(self, expect_children: int, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._record_children()
            if self.READY in self.stdout():
                self._record_children()
                assert len(self.children) == expect_children, \
                    f"expected {expect_children} child processes, got {self.children}\n{self.output()}"
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"ferry up exited with {self.proc.returncode} before it was up\n"
                                     + self.output())
            time.sleep(0.1)
        raise AssertionError(f"ferry up did not print {self.READY!r} within {timeout}s\n" + self.output())

    def _record_children(self):
        """Record the broker children (argv `ferry broker ...`; a child seen between fork and exec
        still shows ferry up's argv and is recorded once it has exec'd)."""
        if self.proc is None:
            return
        for c in children_of(self.proc.pid):
            argv = cmdline(c)
            if len(argv) > 1 and argv[1] == "broker":
                self.children[c] = argv

    def signal(self, sig: int):
        assert self.proc is not None and self.proc.poll() is None, "ferry up is not running\n" + self.output()
        os.kill(self.proc.pid, sig)

    def wait_exit(self, timeout: float) -> int:
        """Wait for ferry up to exit on its own, recording its children meanwhile."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._record_children()
            time.sleep(0.05)
        return self.wait(5)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"ferry up still running {timeout}s after the signal\n" + self.output())

    def cleanup(self):
        if self.proc is None:
            return
        victims = set()
        if self.proc.poll() is None:
            # stopped, ferry up starts nothing more; its children are exactly what it started
            os.kill(self.proc.pid, signal.SIGSTOP)
            victims.update(children_of(self.proc.pid))
        for pid, argv in self.children.items():
            # a recorded broker that outlived ferry up: same pid and the argv we recorded
            if running(pid) and cmdline(pid) == argv:
                victims.add(pid)
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        for pid in sorted(victims):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --------------------------------------------------------------------------- Prometheus

def scrape(addr: str, timeout: float = 10) -> dict[tuple[str, frozenset], float]:
    """GET http://addr/metrics -> {(name, frozenset(labels.items())): value}."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=timeout) as r:
        assert r.status == 200, r.status
        text = r.read().decode()
    return parse_prometheus(text)


def parse_prometheus(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line.split("{", 1)
            labels_s, value = rest.rsplit("}", 1)
            labels = {}
            i = 0
            while i < len(labels_s):
                eq = labels_s.index("=", i)
                k = labels_s[i:eq].strip().lstrip(",").strip()
                assert labels_s[eq + 1] == '"', line
                j = eq + 2
                v = []
                while labels_s[j] != '"':
                    if labels_s[j] == "\\":
                        j += 1
                        v.append({"n": "\n"}.get(labels_s[j], labels_s[j]))
                    else:
                        v.append(labels_s[j])
                    j += 1
                labels[k] = "".join(v)
                i = j + 1
                while i < len(labels_s) and labels_s[i] in ", ":
                    i += 1
        else:
            name, value = line.split(None, 1)
            labels = {}
        out[(name.strip(), frozenset(labels.items()))] = float(value.split()[0])
    return out


def metric(m: dict, name: str, default: float | None = 0.0, **labels) -> float:
    v = m.get((name, frozenset(labels.items())))
    if v is None:
        if default is None:
            raise AssertionError(f"no sample {name}{labels}; have: "
                                 f"{sorted(k for k in m if k[0] == name)}")
        return default
    return v


# --------------------------------------------------------------------------- topology text

def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based number of the line holding the nth occurrence of needle (which must exist)."""
    found = 0
    for i, line in enumerate(text.splitlines(), 1):
        if needle in line:
            found += 1
            if found == nth:
                return i
    raise AssertionError(f"{needle!r} (occurrence {nth}) not in the text")


def pos_of(text: str, needle: str, nth: int = 1, token: str | None = None) -> tuple[int, int]:
    """(line, column) of `token` (default: needle) within the line holding the nth occurrence of
    needle; the column is 1-based in characters."""
    ln = line_of(text, needle, nth)
    line = text.splitlines()[ln - 1]
    col = line.index(token if token is not None else needle) + 1
    return ln, col


# --------------------------------------------------------------------------- Kafka's partitioner

def murmur2(data: bytes) -> int:
    """Kafka's Utils.murmur2 (signed 32-bit result)."""
    length = len(data)
    seed = 0x9747B28C
    m = 0x5BD1E995
    r = 24
    h = (seed ^ length) & 0xFFFFFFFF
    length4 = length // 4
    for i in range(length4):
        i4 = i * 4
        k = (data[i4] & 0xFF) + ((data[i4 + 1] & 0xFF) << 8) + ((data[i4 + 2] & 0xFF) << 16) \
            + ((data[i4 + 3] & 0xFF) << 24)
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    rem = length % 4
    if rem == 3:
        h ^= (data[(length & ~3) + 2] & 0xFF) << 16
    if rem >= 2:
        h ^= (data[(length & ~3) + 1] & 0xFF) << 8
    if rem >= 1:
        h ^= data[length & ~3] & 0xFF
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def kafka_partition(key: bytes, partitions: int) -> int:
    """The Java client's default partition of a keyed record."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


assert murmur2(b"21") == -973932308 and murmur2(b"foobar") == -790332482  # Kafka's UtilsTest
assert murmur2(b"a-little-bit-long-string") == -985981536


# --------------------------------------------------------------------------- admin API (HTTPS)

def admin_context(certs: Path | str, cert: str | None = "operator.pem", key: str | None = "operator.key",
                  ca: Path | str | None = None):
    """A TLS client context for a gateway's admin API: trusts the topology's CA (ca.pem in certs)
    and presents an operator certificate (cert/key in certs; None for no client certificate).
    The gateway proves `<region>.ferry`, not the loopback address, so the host name is not checked."""
    import ssl
    certs = Path(certs)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(str(ca or certs / "ca.pem"))
    ctx.check_hostname = False
    if cert:
        ctx.load_cert_chain(str(certs / cert), str(certs / key))
    return ctx


def admin_call(port: int, certs: Path | str, method: str, path: str, body: dict | None = None,
               ctx=None, timeout: float = 30) -> tuple[int, dict]:
    """One admin API request over HTTPS with the operator certificate: (status, JSON body)."""
    import http.client
    import json
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx or admin_context(certs), timeout=timeout)
    try:
        conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                     headers={"content-type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, (json.loads(data) if data else {})
    finally:
        conn.close()
