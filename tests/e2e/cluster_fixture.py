"""A region cluster for the e2e tests: a real etcd (Debian's etcd-server) and three
`ferry broker --etcd` processes, with helpers to find coordinators. Shared by test_cluster.py
and test_cluster_transactions.py (each starts one cluster for its module).

Needs etcd on PATH: the modules importing this are skipped without it unless
FERRY_REQUIRE_ETCD=1 (CI sets it).
"""
from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
from pathlib import Path

import pytest

import kproto
from conftest import FERRY_BIN, EXTERNAL, FerryBroker, free_port, port_open
from helpers import ck_admin, wait_until

ETCD = shutil.which("etcd")
if ETCD is None:
    if os.environ.get("FERRY_REQUIRE_ETCD") == "1":
        raise RuntimeError("etcd is not on PATH and FERRY_REQUIRE_ETCD=1 (apt-get install etcd-server)")
    pytest.skip("etcd is not on PATH (apt-get install etcd-server)", allow_module_level=True)
if EXTERNAL:
    pytest.skip("starts its own cluster of ferry brokers", allow_module_level=True)

SESSION = "3s"  # a broker silent this long is dead (its etcd lease ends)


class Etcd:
    def __init__(self, root: Path):
        self.dir = root / "etcd"
        self.client = free_port()
        self.peer = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client}"

    def start(self):
        peer = f"http://127.0.0.1:{self.peer}"
        with open(self.dir.with_suffix(".log"), "ab") as log:
            self.proc = subprocess.Popen(
                [ETCD, "--name", "n1", "--data-dir", str(self.dir), "--listen-client-urls", self.url,
                 "--advertise-client-urls", self.url, "--listen-peer-urls", peer,
                 "--initial-advertise-peer-urls", peer, "--initial-cluster", f"n1={peer}"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: port_open(self.client), 20, "etcd to listen")

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)


class Cluster:
    def __init__(self, root: Path):
        self.etcd = Etcd(root)
        self.brokers: dict[int, FerryBroker] = {}
        # Retention runs every second (topics without retention settings keep everything), the
        # log cleaner every 300 ms.
        conf = root / "broker.toml"
        conf.write_text('retention_check_interval = "1s"\ncleaner_interval = "300ms"\n')
        for i in (1, 2, 3):
            port = free_port()
            self.brokers[i] = FerryBroker(root / f"b{i}", port, [
                "--node-id", str(i), "--etcd", self.etcd.url, "--cluster", "e2e",
                "--session-timeout", SESSION, "--replica-lag-max", "10s", "--config", str(conf)], None)

    @property
    def bootstrap(self) -> str:
        return ",".join(b.bootstrap for b in self.brokers.values())

    def up(self):
        """Every broker running, registered, and every partition's ISR full."""
        for b in self.brokers.values():
            if not b.alive():
                b.start()
        wait_until(lambda: len(self.metadata().brokers) == 3, 30, "three registered brokers")
        # Admin requests (CreateTopics) go to the controller: librdkafka waits for one only as
        # long as the request's timeout.
        wait_until(lambda: self.metadata().controller_id >= 0, 30, "an elected controller")

        def isr_full():
            md = self.metadata()
            return all(len(p.isrs) == len(p.replicas) and p.leader >= 0
                       for t in md.topics.values() if not t.topic.startswith("__")
                       for p in t.partitions.values())
        wait_until(isr_full, 45, "every ISR full")

    def metadata(self, topic: str | None = None):
        return ck_admin(self.bootstrap).list_topics(topic=topic, timeout=10)

    def create(self, name: str, partitions: int, rf: int = 3, **config):
        from confluent_kafka.admin import NewTopic
        admin = ck_admin(self.bootstrap)  # kept alive until the result is in
        f = admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=rf, config=config)])
        f[name].result(timeout=30)

        def led():
            # Every partition, not `all()` of none: a broker that has not applied the topic yet
            # answers it without partitions.
            parts = self.metadata(name).topics[name].partitions
            return len(parts) == partitions and all(p.leader >= 0 for p in parts.values())
        wait_until(led, 20, f"leaders for {name}")

    def leader(self, topic: str, partition: int) -> int:
        return self.metadata(topic).topics[topic].partitions[partition].leader

    def logs(self) -> str:
        return "\n".join(f"--- broker {i}\n{b.log_tail(60)}" for i, b in self.brokers.items())


def cluster_fixture(tmp_path_factory):
    """The body of a module-scoped `cluster` fixture."""
    if not FERRY_BIN.exists():
        pytest.fail(f"ferry binary not found at {FERRY_BIN}")
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    c.etcd.start()
    try:
        c.up()
        yield c
    finally:
        for b in c.brokers.values():
            b.kill()
        c.etcd.kill()




def find_coordinator(bootstrap: str, key: str, key_type: int = 0) -> tuple[int, int]:
    """FindCoordinator v1 for a group (key type 0) or a transactional id (1), built by hand:
    (error code, node id)."""
    sock = kproto.connect(bootstrap)
    try:
        sock.sendall(kproto.request_frame(10, 1, 3, kproto.string(key) + kproto.i8(key_type)))
        r = kproto.recv_frame(sock)
    finally:
        sock.close()
    corr, _throttle, err, mlen = struct.unpack(">iihh", r[:12])
    assert corr == 3, corr
    at = 12 + max(mlen, 0)
    (node,) = struct.unpack(">i", r[at:at + 4])
    return err, node


def coordinator(cluster: Cluster, key: str, key_type: int = 0) -> int:
    """The coordinator every live broker names for `key` (they must agree)."""
    def agreed():
        named = {find_coordinator(b.bootstrap, key, key_type) for b in cluster.brokers.values() if b.alive()}
        return named.pop()[1] if len(named) == 1 and next(iter(named))[0] == 0 else None
    return wait_until(agreed, 60, f"every broker to name one coordinator for {key}")


