"""End-to-end harness: starts the real `ferry` binary on a free port with a temp data dir.

Environment:
  FERRY_BIN              broker binary (default: <repo>/target/release/ferry)
  FERRY_E2E_BOOTSTRAP    run the client tests against an already running Kafka-compatible broker
                         (e.g. Apache Kafka from /work/shared/peers/kafka-up.sh) instead of starting
                         ferry; ferry-specific checks (segment files, restarts, flags) are skipped.
  FERRY_E2E_DATA_DIR     with FERRY_E2E_BOOTSTRAP: that broker's data dir (Kafka's log.dirs), to run
                         the segment-file checks against it too.
  FERRY_REQUIRE_JAVA=1   missing Apache Kafka Java tools fail the Java tests instead of skipping them.
  PEERS_HOME             where the peers live (default ~/.cache/ferry-peers).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FERRY_BIN = Path(os.environ.get("FERRY_BIN", REPO / "target" / "release" / "ferry"))
EXTERNAL = os.environ.get("FERRY_E2E_BOOTSTRAP")
START_TIMEOUT = 20.0
LOG_TAIL_LINES = 300
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class FerryBroker:
    external = False

    def __init__(self, data_dir: Path, port: int, args: list[str], advertised: str | None):
        self.data_dir = Path(data_dir)
        self.port = port
        self.args = list(args)
        self.advertised = advertised
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.broker.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cmdline(self) -> list[str]:
        cmd = [str(FERRY_BIN), "broker", "--listen", self.bootstrap, "--data-dir", str(self.data_dir)]
        if self.advertised:
            cmd += ["--advertised", self.advertised]
        return cmd + self.args

    def start(self):
        assert self.proc is None or self.proc.poll() is not None, "broker already running"
        self.starts += 1
        with open(self.log_path, "ab") as lf:
            lf.write(f"\n===== ferry-e2e: start #{self.starts}: {' '.join(self.cmdline())}\n".encode())
            lf.flush()
            self.proc = subprocess.Popen(self.cmdline(), stdout=lf, stderr=lf, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ferry exited with code {self.proc.returncode} during start-up; log:\n"
                                   + self.log_tail())
            if port_open(self.port):
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"ferry did not accept connections on {self.bootstrap} within {START_TIMEOUT}s; log:\n"
                           + self.log_tail())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """SIGKILL the broker (only the process we started, by pid) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)

    def restart(self):
        self.kill()
        self.start()

    def log_text(self) -> str:
        """The broker's stderr over all its starts, ANSI colour codes removed."""
        try:
            return ANSI.sub("", self.log_path.read_text(errors="replace"))
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")


class ExternalBroker:
    """A broker we did not start (FERRY_E2E_BOOTSTRAP). Ferry-only operations skip the test."""
    external = True

    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap
        # Apache Kafka keeps the same <topic>-<partition>/<offset>.log layout and stores batches as
        # sent (compression.type=producer): point this at its log.dirs to run the segment checks too.
        dd = os.environ.get("FERRY_E2E_DATA_DIR")
        self.data_dir = Path(dd) if dd else None

    def _skip(self, what):
        pytest.skip(f"{what} needs the ferry binary (running against external {self.bootstrap})")

    def log_text(self): self._skip("broker log")
    def kill(self): self._skip("kill")
    def restart(self): self._skip("restart")
    def rss_kib(self): self._skip("RSS")
    def alive(self): return port_open(int(self.bootstrap.rsplit(":", 1)[1]))
    def log_tail(self, n=0): return ""


def require_ferry(broker):
    if broker.external:
        pytest.skip("ferry-specific check (running against an external broker)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def start_broker(request, tmp_path):
    """Factory: start_broker(*extra_args, advertised=None, port=None) -> FerryBroker.

    With FERRY_E2E_BOOTSTRAP set it returns an ExternalBroker when called without ferry-specific
    arguments, and skips the test otherwise."""
    started: list[FerryBroker] = []
    request.node._ferry_brokers = started

    def factory(*args, advertised: str | None = None, port: int | None = None):
        if EXTERNAL:
            if args or advertised:
                pytest.skip(f"needs ferry flags {args} / --advertised (external broker {EXTERNAL})")
            return ExternalBroker(EXTERNAL)
        if not FERRY_BIN.exists():
            pytest.fail(f"ferry binary not found at {FERRY_BIN} (build it: cargo build --release, or set FERRY_BIN)")
        data_dir = tmp_path / f"ferry-data-{len(started)}"
        data_dir.mkdir()
        b = FerryBroker(data_dir, port or free_port(), [str(a) for a in args], advertised)
        started.append(b)
        b.start()
        return b

    yield factory

    failed = any(getattr(request.node, f"rep_{w}", None) is not None and getattr(request.node, f"rep_{w}").failed
                 for w in ("setup", "call"))
    for b in started:
        b.kill()
        if failed:
            print(f"\n----- ferry broker log {b.log_path} (last {LOG_TAIL_LINES} lines) -----\n{b.log_tail()}")


@pytest.fixture
def broker(start_broker):
    """A default broker (auto-create on)."""
    return start_broker()
