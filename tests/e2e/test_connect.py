"""Apache Kafka Connect 4.4 in distributed mode against one `ferry broker`.

The worker (org.apache.kafka.connect.cli.ConnectDistributed, a real JVM with REST on loopback)
creates its three internal topics itself - config, offset and status storage - with
cleanup.policy=compact, joins its worker group (the classic group protocol, protocol type
"connect"), and keeps connector configs, task status and source offsets in those topics. A worker
that starts with the topics already there checks with DescribeConfigs that they are compact-only
and refuses to start otherwise.

Kafka 4.4's distribution ships no source connector in its libs (connect-file and the test plugins
with VerifiableSourceConnector are not in it), so the test compiles a small one with the JDK's javac:
a counter task that emits records seq = 0, 1, 2, ... with source offset {"seq": n}, resumes at the
committed offset + 1, and keys each record with the seq it started from ("start-N").

Shown: a connector created over REST writes records that confluent-kafka reads; the internal topics
are compacted on Ferry (confluent-kafka describe_configs, and the restarted worker's own check);
after SIGKILL of the worker (its own pid only) a new worker process with the same settings still
lists the connector (never created again), and its task goes on from the committed source offsets -
not from seq 0 - with the seqs contiguous.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import free_port
from helpers import JavaTools, ck_admin, ck_consumer, kafka_installed, wait_until

CONNECT_MAIN = "org.apache.kafka.connect.cli.ConnectDistributed"
WORKER_HEAP = "-Xmx256m"
LOG_TAIL = 200

CONNECTOR_JAVA = {
    "CounterSourceConnector": r"""
package ferry.e2e;

import java.util.List;
import java.util.Map;
import org.apache.kafka.common.config.ConfigDef;
import org.apache.kafka.connect.connector.Task;
import org.apache.kafka.connect.source.SourceConnector;

public class CounterSourceConnector extends SourceConnector {
    private Map<String, String> props;
    @Override public String version() { return "1.0"; }
    @Override public void start(Map<String, String> props) { this.props = props; }
    @Override public Class<? extends Task> taskClass() { return CounterSourceTask.class; }
    @Override public List<Map<String, String>> taskConfigs(int maxTasks) { return List.of(props); }
    @Override public void stop() { }
    @Override public ConfigDef config() {
        return new ConfigDef().define("topic", ConfigDef.Type.STRING, ConfigDef.Importance.HIGH, "target topic");
    }
}
""",
    "CounterSourceTask": r"""
package ferry.e2e;

import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import org.apache.kafka.connect.data.Schema;
import org.apache.kafka.connect.source.SourceRecord;
import org.apache.kafka.connect.source.SourceTask;

/** seq = committed offset + 1 (0 without one), a few records per poll, key "start-<first seq>". */
public class CounterSourceTask extends SourceTask {
    static final Map<String, String> PARTITION = Map.of("counter", "main");
    private String topic;
    private long next;
    private String key;
    private int batch;
    private long intervalMs;

    @Override public String version() { return "1.0"; }

    @Override public void start(Map<String, String> props) {
        topic = props.get("topic");
        batch = Integer.parseInt(props.getOrDefault("batch", "5"));
        intervalMs = Long.parseLong(props.getOrDefault("interval.ms", "100"));
        Map<String, Object> off = context.offsetStorageReader().offset(PARTITION);
        next = off == null ? 0 : ((Number) off.get("seq")).longValue() + 1;
        key = "start-" + next;
    }

    @Override public List<SourceRecord> poll() throws InterruptedException {
        Thread.sleep(intervalMs);
        List<SourceRecord> out = new ArrayList<>();
        for (int i = 0; i < batch; i++, next++) {
            out.add(new SourceRecord(PARTITION, Map.of("seq", next), topic, 0,
                                     Schema.STRING_SCHEMA, key, Schema.INT64_SCHEMA, next));
        }
        return out;
    }

    @Override public void stop() { }
}
""",
}

LOG4J2 = """status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.reflections.name = org.reflections
logger.reflections.level = ERROR
# "Found cleanup.policy=compact for topic 'T'": the worker's own DescribeConfigs check of its topics
logger.topicadmin.name = org.apache.kafka.connect.util.TopicAdmin
logger.topicadmin.level = DEBUG
logger.backingstore.name = org.apache.kafka.connect.storage.KafkaTopicBasedBackingStore
logger.backingstore.level = DEBUG
"""


@pytest.fixture(scope="module")
def java():
    if not kafka_installed():
        if os.environ.get("FERRY_REQUIRE_JAVA"):
            pytest.fail("FERRY_REQUIRE_JAVA is set but Apache Kafka's Java tools are not installed "
                        "(/work/shared/peers/install-kafka.sh)")
        pytest.skip("Apache Kafka Java tools not installed (set FERRY_REQUIRE_JAVA=1 to make this a failure)")
    return JavaTools()


def compile_connector(java: JavaTools, out: Path) -> Path:
    """javac beside the java that runs Kafka's tools; classes plus the ServiceLoader manifest."""
    javac = Path(os.path.realpath(java.env["JAVA_BIN"])).with_name("javac")
    if not javac.exists():
        if os.environ.get("FERRY_REQUIRE_JAVA"):
            pytest.fail(f"no javac beside {java.env['JAVA_BIN']} (a JDK is needed to build the test connector)")
        pytest.skip(f"no javac beside {java.env['JAVA_BIN']}")
    src = out / "src" / "ferry" / "e2e"
    src.mkdir(parents=True)
    files = []
    for name, text in CONNECTOR_JAVA.items():
        f = src / f"{name}.java"
        f.write_text(text)
        files.append(str(f))
    classes = out / "classes"
    services = classes / "META-INF" / "services"
    services.mkdir(parents=True)
    (services / "org.apache.kafka.connect.source.SourceConnector").write_text("ferry.e2e.CounterSourceConnector\n")
    libs = Path(java.env["KAFKA_HOME_DIR"]) / "libs"
    p = subprocess.run([str(javac), "--release", "17", "-nowarn", "-d", str(classes),
                        "-cp", f"{libs}/*", *files],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, f"javac failed:\n{p.stdout}\n{p.stderr}"
    return classes


class ConnectWorker:
    """One ConnectDistributed JVM; start() again after kill() is a new process with the same settings."""

    def __init__(self, java: JavaTools, classes: Path, tmp: Path, bootstrap: str, topics: dict[str, str]):
        self.java, self.classes, self.tmp = java, classes, tmp
        self.port = free_port()
        self.log_path = tmp / "connect-worker.log"
        self.props = tmp / "worker.properties"
        self.log4j = tmp / "connect-log4j2.properties"
        self.log4j.write_text(LOG4J2)
        settings = {
            "bootstrap.servers": bootstrap,
            "group.id": "e2e-connect-" + uuid.uuid4().hex[:8],
            "key.converter": "org.apache.kafka.connect.storage.StringConverter",
            "value.converter": "org.apache.kafka.connect.json.JsonConverter",
            "value.converter.schemas.enable": "false",
            "config.storage.topic": topics["config"],
            "offset.storage.topic": topics["offset"],
            "status.storage.topic": topics["status"],
            "config.storage.replication.factor": "1",
            "offset.storage.replication.factor": "1",
            "status.storage.replication.factor": "1",
            "offset.storage.partitions": "5",
            "status.storage.partitions": "2",
            "offset.flush.interval.ms": "500",
            "offset.flush.timeout.ms": "5000",
            "listeners": f"http://127.0.0.1:{self.port}",
            "rest.advertised.host.name": "127.0.0.1",
            "rest.advertised.port": str(self.port),
            "plugin.discovery": "service_load",
            "session.timeout.ms": "6000",
            "heartbeat.interval.ms": "1000",
            "scheduled.rebalance.max.delay.ms": "3000",
            "task.shutdown.graceful.timeout.ms": "2000",
        }
        self.props.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cmdline(self) -> list[str]:
        libs = Path(self.java.env["KAFKA_HOME_DIR"]) / "libs"
        return [self.java.env["JAVA_BIN"], "-Xms64m", WORKER_HEAP, "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={self.log4j}",
                "-cp", f"{libs}/*:{self.classes}", CONNECT_MAIN, str(self.props)]

    def start(self):
        assert self.proc is None or self.proc.poll() is not None, "worker already running"
        self.starts += 1
        with open(self.log_path, "ab") as lf:
            lf.write(f"\n===== connect-e2e: start #{self.starts}: {' '.join(self.cmdline())}\n".encode())
            lf.flush()
            self.proc = subprocess.Popen(self.cmdline(), stdout=lf, stderr=lf, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        # The REST server answers once the herder has read the config topic; until then 404/409/503.
        wait_until(lambda: self._alive_or_fail() and self.request("GET", "/connectors")[0] == 200, 120,
                   f"Connect worker REST on {self.url}", interval=0.5)

    def _alive_or_fail(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"Connect worker exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")
        return True

    def kill(self):
        """SIGKILL the worker JVM (only the process we started, by pid) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)

    def request(self, method: str, path: str, body=None, timeout: float = 15):
        """(status, decoded JSON or text); status 0 when the worker does not answer."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return 0, None
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = LOG_TAIL) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


@pytest.fixture
def connect_worker(request, java, tmp_path):
    """Factory: connect_worker(bootstrap, topics) -> ConnectWorker (not started). Kills it at the end
    and prints its log tail when the test failed."""
    workers: list[ConnectWorker] = []
    classes = compile_connector(java, tmp_path / "connector")

    def factory(bootstrap: str, topics: dict[str, str]) -> ConnectWorker:
        w = ConnectWorker(java, classes, tmp_path, bootstrap, topics)
        workers.append(w)
        return w

    yield factory
    failed = any(getattr(request.node, f"rep_{w}", None) is not None and getattr(request.node, f"rep_{w}").failed
                 for w in ("setup", "call"))
    for w in workers:
        w.kill()
        if failed:
            print(f"\n----- Connect worker log {w.log_path} (last {LOG_TAIL} lines) -----\n{w.log_tail()}")


def read_counter(bootstrap: str, topic: str, min_count: int) -> list[tuple[str, int, int]]:
    """The records of topic[0] up to its high watermark, at least min_count of them, as (key, seq, offset).
    Reads up to a high watermark taken first: the connector may still be writing."""
    from confluent_kafka import KafkaError, TopicPartition
    c = ck_consumer(bootstrap)
    try:
        tp = TopicPartition(topic, 0)
        hw = wait_until(lambda: (lambda w: w[1] if w[1] >= min_count else None)(
            c.get_watermark_offsets(tp, timeout=10)), 60, f"{min_count} records in {topic}", interval=0.5)
        c.assign([TopicPartition(topic, 0, 0)])
        out = []
        deadline = time.monotonic() + 60
        while len(out) < hw:
            assert time.monotonic() < deadline, f"read {len(out)} of {hw} records from {topic} in 60s"
            m = c.poll(0.5)
            if m is None or (m.error() and m.error().code() == KafkaError._PARTITION_EOF):
                continue
            assert not m.error(), f"consumer error: {m.error()}"
            if m.offset() < hw:
                out.append((m.key().decode(), int(m.value()), m.offset()))
        assert [o for _, _, o in out] == list(range(hw)), "offsets not dense from 0"
        return out
    finally:
        c.close()


def task_starts(records: list[tuple[str, int, int]]) -> list[int]:
    """The seq each task run started from, in order; checks every run's seqs are contiguous from
    its key's start-N (a task writes key "start-N" on all its records)."""
    starts: list[int] = []
    key, expect = None, None
    for k, seq, off in records:
        if k != key:
            key = k
            expect = int(k.removeprefix("start-"))
            starts.append(expect)
        assert seq == expect, f"offset {off}: seq {seq} where {key} expects {expect}"
        expect += 1
    return starts


def committed_seq(worker: ConnectWorker, name: str) -> int | None:
    """The task's committed source offset, from GET /connectors/NAME/offsets (read from the offset topic)."""
    status, body = worker.request("GET", f"/connectors/{name}/offsets")
    if status != 200 or not isinstance(body, dict):
        return None
    for o in body.get("offsets", []):
        if o.get("partition") == {"counter": "main"}:
            return int(o["offset"]["seq"])
    return None


def task_running(worker: ConnectWorker, name: str) -> bool:
    status, body = worker.request("GET", f"/connectors/{name}/status")
    if status != 200:
        return False
    tasks = body.get("tasks", [])
    return body["connector"]["state"] == "RUNNING" and len(tasks) == 1 and tasks[0]["state"] == "RUNNING"


def cleanup_policies(bootstrap: str, topics: list[str]) -> dict[str, str]:
    from confluent_kafka.admin import ConfigResource, ResourceType
    admin = ck_admin(bootstrap)  # kept alive until the results are in
    fs = admin.describe_configs([ConfigResource(ResourceType.TOPIC, t) for t in topics], request_timeout=20)
    out = {}
    for res, f in fs.items():
        entries = f.result(timeout=30)
        out[res.name] = entries["cleanup.policy"].value
    return out


def assert_worker_verified_compaction(worker: ConnectWorker, topics, times: int):
    """The worker ran TopicAdmin.verifyTopicCleanupPolicyOnlyCompact (a DescribeConfigs) on each internal
    topic `times` times over its log and found exactly cleanup.policy=compact; on anything else it
    would have refused to start (ConfigException), or warned that it could not check. It checks a
    topic that already exists at its start, not one it has just created itself."""
    log = worker.log_text()
    assert "Unable to use admin client to verify the cleanup policy" not in log
    for t in topics:
        n = log.count(f"Found cleanup.policy=compact for topic '{t}'")
        assert n == times, f"worker logged its compact check of {t} {n} times, not {times}"


def test_connect_distributed_keeps_connectors_and_source_offsets_across_a_worker_sigkill(start_broker,
                                                                                         connect_worker):
    broker = start_broker()
    run = uuid.uuid4().hex[:8]
    internal = {"config": f"e2e-connect-configs-{run}", "offset": f"e2e-connect-offsets-{run}",
                "status": f"e2e-connect-status-{run}"}
    target = f"e2e-connect-counter-{run}"
    name = f"counter-{run}"

    worker = connect_worker(broker.bootstrap, internal)
    worker.start()

    # Connect created its internal topics itself, compacted; confluent-kafka's DescribeConfigs sees
    # cleanup.policy=compact. (The worker checks that itself on its next start, when they exist.)
    md = ck_admin(broker.bootstrap).list_topics(timeout=15)
    for kind, t in internal.items():
        assert t in md.topics and md.topics[t].error is None, f"{kind} topic {t} missing: {sorted(md.topics)}"
    assert len(md.topics[internal["config"]].partitions) == 1
    assert len(md.topics[internal["offset"]].partitions) == 5
    assert len(md.topics[internal["status"]].partitions) == 2
    assert cleanup_policies(broker.bootstrap, list(internal.values())) == {t: "compact" for t in internal.values()}
    assert_worker_verified_compaction(worker, internal.values(), 0)

    config = {"connector.class": "ferry.e2e.CounterSourceConnector", "tasks.max": "1", "topic": target,
              "batch": "5", "interval.ms": "100",
              # Connect creates the target topic (KIP-158) rather than relying on auto-creation.
              "topic.creation.default.replication.factor": "1", "topic.creation.default.partitions": "1"}
    # A POST during the worker's first rebalance answers 409; retry until it is taken.
    created = wait_until(lambda: (lambda r: r if r[0] in (200, 201) else None)(
        worker.request("POST", "/connectors", {"name": name, "config": config})), 60, "connector created",
        interval=1.0)
    assert created[1]["name"] == name, created
    wait_until(lambda: task_running(worker, name), 60, f"{name} and its task RUNNING", interval=0.5)

    # Records arrive, and the worker commits source offsets for them (offset.flush.interval.ms=500).
    wait_until(lambda: (committed_seq(worker, name) or -1) >= 40, 90, "committed source offset seq >= 40",
               interval=0.5)
    first = read_counter(broker.bootstrap, target, 41)
    assert task_starts(first) == [0], "one task start, from seq 0"

    # SIGKILL mid-stream: no graceful offset flush, no leaving the group.
    committed_before = committed_seq(worker, name)
    worker.kill()
    written = read_counter(broker.bootstrap, target, 41)
    assert task_starts(written) == [0]
    last_seq = written[-1][1]
    assert committed_before <= last_seq

    # A new worker process: the connector is still configured (read back from the config topic),
    # nothing is POSTed again.
    worker.start()
    status, names = worker.request("GET", "/connectors")
    assert status == 200 and names == [name], (status, names)
    status, got = worker.request("GET", f"/connectors/{name}/config")
    assert status == 200 and got["topic"] == target and got["connector.class"] == config["connector.class"], got
    wait_until(lambda: task_running(worker, name), 90, f"{name} and its task RUNNING after the restart",
               interval=0.5)

    # The task resumed from the committed offset: its records carry key start-N with N = committed + 1,
    # at least what was committed before the kill (what was written but not yet committed is sent
    # again: at-least-once) and never 0.
    def resumed():
        recs = read_counter(broker.bootstrap, target, len(written))
        later = recs[len(written):]
        return later if len(later) >= 20 else None

    later = wait_until(resumed, 90, "records from the restarted worker", interval=1.0)
    starts = task_starts(later)
    start = starts[0]
    print(f"first worker: seqs 0..{last_seq} written, committed seq {committed_before} seen before SIGKILL; "
          f"restarted worker: task start(s) at seq {starts}")
    assert all(n > 0 for n in starts), f"the restarted task started over from seq 0: {starts}"
    assert committed_before + 1 <= start <= last_seq + 1, (committed_before, start, last_seq)
    # Offsets keep being committed by the new worker.
    wait_until(lambda: (committed_seq(worker, name) or -1) >= start + 10, 60, "new commits after the restart",
               interval=0.5)

    # The restarted worker found its (existing) internal topics compacted with DescribeConfigs, and
    # so does confluent-kafka.
    assert_worker_verified_compaction(worker, internal.values(), 1)
    assert cleanup_policies(broker.bootstrap, list(internal.values())) == {t: "compact" for t in internal.values()}
    assert broker.alive()
