"""Kafka Streams 4.4 with exactly_once_v2 against one `ferry broker`: a word count survives a
SIGKILL of the broker and a SIGKILL of the Streams application, counting every word exactly once.

The application (streams/WordCountEos.java, compiled here with the JDK's javac against the Kafka
Streams jars of scripts/peers/install-streams.sh and Kafka 4.4's kafka-clients) splits lines into
words, re-keys them by word through a repartition topic, counts them in a persistent RocksDB store
backed by a compacted changelog topic and writes every updated count to the output topic. With
processing.guarantee=exactly_once_v2 each commit (every 200 ms) is one transaction of its
producer: output records, repartition and changelog records and the consumed input offsets
(TxnOffsetCommit) commit or abort together; its consumers read with read_committed. The app takes
about a millisecond per counted word, so a kill lands while a wave of input is half counted.

The test produces 2000 lines over a 12-word vocabulary in four waves; after each wave it waits
until the latest count of every word in the output (read_committed, latest value per key) is
exactly the number of times the word was produced so far, and fails at once if any output
record shows more (double counting). The app has no record cache, so each counted word makes one
output record: per word, the committed counts in the output must be exactly 1, 2, 3, ...
(nothing counted twice or lost, no record of an aborted transaction visible). Mid-wave 2 the
broker is SIGKILLed and started again on the same port and data dir; mid-wave 3 the Streams JVM
is SIGKILLed and started again on the same state dir (its RocksDB store, left without a
checkpoint, is restored from the changelog). Each kill waits until part of the wave is committed
and a read_uncommitted reader already sees output records that read_committed does not: a
transaction is open, with records in the log. At the end the changelog holds the same counts;
the test prints how many records of aborted transactions read_uncommitted saw and read_committed
hid.

Against another broker (FERRY_E2E_BOOTSTRAP, e.g. Apache Kafka from kafka-up.sh) the broker kill
is left out, unless FERRY_E2E_KAFKA_NAME names the kafka-up.sh instance (its recorded pid is
SIGKILLed and kafka-up.sh starts it again): the reference run.
"""
from __future__ import annotations

import logging
import os
import random
import re
import signal
import struct
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import KafkaError

from helpers import PEERS_HOME, PEERS_LIB, JavaTools, ck_admin, ck_create_topic, ck_produce, kafka_installed, wait_until

HERE = Path(__file__).resolve().parent
APP_SRC = HERE / "streams" / "WordCountEos.java"
APP_MAIN = "ferry.e2e.WordCountEos"
STREAMS_HOME = PEERS_HOME / "opt" / f"kafka-streams-{os.environ.get('KAFKA_VERSION', '4.4.0')}"
APP_HEAP = "-Xmx384m"
LOG_TAIL = 150

VOCAB = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
         "kilo", "lima"]
LINES, WAVES = 2000, 4
COMMIT_MS = 200
WORD_DELAY_MS = 1          # the app's time per counted word: a wave (~2250 words) takes 2-3 s
INPUT_PARTITIONS = OUTPUT_PARTITIONS = 2
WAVE_TIMEOUT = 300         # generous: a restarted broker, a rebalance and a store restore

LOG4J2 = """status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
logger.metadata.name = org.apache.kafka.clients.Metadata
logger.metadata.level = WARN
"""


def streams_installed() -> bool:
    return (STREAMS_HOME / ".installed").is_file() and (STREAMS_HOME / "libs").is_dir()


@pytest.fixture(scope="module")
def java():
    missing = []
    if not kafka_installed():
        missing.append("Apache Kafka's Java tools (/work/shared/peers/install-kafka.sh)")
    if not streams_installed():
        missing.append(f"Kafka Streams in {STREAMS_HOME} (scripts/peers/install-streams.sh)")
    if missing:
        if os.environ.get("FERRY_REQUIRE_JAVA"):
            pytest.fail("FERRY_REQUIRE_JAVA is set but these are not installed: " + "; ".join(missing))
        pytest.skip("not installed: " + "; ".join(missing) + " (set FERRY_REQUIRE_JAVA=1 to make this a failure)")
    return JavaTools()


def compile_app(java: JavaTools, out: Path) -> Path:
    """javac beside the java that runs Kafka's tools, against the Streams jars + Kafka 4.4's kafka-clients."""
    javac = Path(os.path.realpath(java.env["JAVA_BIN"])).with_name("javac")
    if not javac.exists():
        if os.environ.get("FERRY_REQUIRE_JAVA"):
            pytest.fail(f"no javac beside {java.env['JAVA_BIN']} (a JDK is needed to build the Streams app)")
        pytest.skip(f"no javac beside {java.env['JAVA_BIN']}")
    clients = sorted((Path(java.env["KAFKA_HOME_DIR"]) / "libs").glob("kafka-clients-*.jar"))
    assert clients, f"no kafka-clients jar in {java.env['KAFKA_HOME_DIR']}/libs"
    classes = out / "classes"
    classes.mkdir(parents=True)
    p = subprocess.run([str(javac), "--release", "17", "-nowarn", "-d", str(classes),
                        "-cp", f"{STREAMS_HOME / 'libs'}/*:{clients[0]}", str(APP_SRC)],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, f"javac failed:\n{p.stdout}\n{p.stderr}"
    return classes


class StreamsApp:
    """One WordCountEos JVM; start() again after kill() is a new process with the same settings."""

    def __init__(self, java: JavaTools, classes: Path, tmp: Path, args: list[str]):
        self.java, self.classes, self.tmp, self.args = java, classes, tmp, args
        self.log_path = tmp / "streams-app.log"
        self.log4j = tmp / "streams-log4j2.properties"
        self.log4j.write_text(LOG4J2)
        self.jvm_tmp = tmp / "jvm-tmp"      # rocksdbjni unpacks its library here, not in /tmp
        self.jvm_tmp.mkdir(exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def cmdline(self) -> list[str]:
        return [self.java.env["JAVA_BIN"], "-Xms64m", APP_HEAP, "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                "-Djava.awt.headless=true", f"-Djava.io.tmpdir={self.jvm_tmp}",
                f"-Dlog4j2.configurationFile={self.log4j}",
                "-cp", f"{STREAMS_HOME / 'libs'}/*:{self.classes}", APP_MAIN, *self.args]

    def start(self):
        assert self.proc is None or self.proc.poll() is not None, "app already running"
        self.starts += 1
        before = self.running_count()
        with open(self.log_path, "ab") as lf:
            lf.write(f"\n===== streams-e2e: start #{self.starts}: {' '.join(self.cmdline())}\n".encode())
            lf.flush()
            self.proc = subprocess.Popen(self.cmdline(), stdout=lf, stderr=lf, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        wait_until(lambda: self.check_alive() and self.running_count() > before, 180,
                   f"Streams app start #{self.starts} RUNNING", interval=0.2)

    def check_alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"Streams app exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")
        return True

    def kill(self):
        """SIGKILL the app JVM (only the process we started, by pid) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def running_count(self) -> int:
        return sum(1 for line in self.log_text().splitlines() if line == "RUNNING")

    def uncaught(self) -> list[str]:
        return [line for line in self.log_text().splitlines() if line.startswith("UNCAUGHT ")]

    def log_tail(self, n: int = LOG_TAIL) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


@pytest.fixture
def streams_app(request, java, tmp_path):
    """Factory: streams_app(args) -> StreamsApp (not started). Kills it at the end and prints its
    log tail when the test failed."""
    apps: list[StreamsApp] = []
    classes = compile_app(java, tmp_path / "app")

    def factory(args: list[str]) -> StreamsApp:
        a = StreamsApp(java, classes, tmp_path, [str(x) for x in args])
        apps.append(a)
        return a

    yield factory
    failed = any(getattr(request.node, f"rep_{w}", None) is not None and getattr(request.node, f"rep_{w}").failed
                 for w in ("setup", "call"))
    for a in apps:
        a.kill()
        if failed:
            print(f"\n----- Streams app log {a.log_path} (last {LOG_TAIL} lines) -----\n{a.log_tail()}")


QUIET = logging.getLogger("e2e.streams.librdkafka")   # connection refused while the broker is down
QUIET.addHandler(logging.NullHandler())
QUIET.propagate = False


class TopicReader:
    """A consumer assigned to every partition of a topic from its start, kept across broker restarts;
    drain() adds what has become readable: records[partition] = [(offset, key, value)]."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, isolation: str = "read_committed"):
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
        self.topic = topic
        self.c = Consumer({"bootstrap.servers": bootstrap, "group.id": "e2e-reader-" + uuid.uuid4().hex[:8],
                           "enable.auto.commit": False, "isolation.level": isolation,
                           "auto.offset.reset": "error",
                           "enable.partition.eof": False, "socket.timeout.ms": 10000,
                           "topic.metadata.refresh.interval.ms": 2000,
                           "reconnect.backoff.ms": 500, "reconnect.backoff.max.ms": 2000},
                          logger=QUIET)
        self.c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        self.records: dict[int, list[tuple[int, bytes, bytes]]] = {p: [] for p in range(partitions)}
        self.errors: list[str] = []

    def drain(self, idle: float = 0.3, limit: float = 10.0) -> int:
        """Poll until nothing came for `idle` seconds (at most `limit` seconds); number of new records."""
        n, deadline = 0, time.monotonic() + limit
        while time.monotonic() < deadline:
            m = self.c.poll(idle)
            if m is None:
                break
            if m.error():
                # transport errors while the broker is down are retried by librdkafka; a lost
                # position (offset out of range) is not
                self.errors.append(str(m.error()))
                assert m.error().code() != KafkaError._AUTO_OFFSET_RESET, f"{self.topic}: {m.error()}"
                continue
            self.records[m.partition()].append((m.offset(), m.key(), m.value()))
            n += 1
        return n

    def close(self):
        self.c.close()


def counts_in(reader: TopicReader) -> dict[str, list[int]]:
    """Per word, the counts of its output records in offset order (a word lives in one partition)."""
    out: dict[str, list[int]] = {}
    for recs in reader.records.values():
        for _, key, value in recs:
            out.setdefault(key.decode(), []).append(struct.unpack(">q", value)[0])
    return out


def latest(counts: dict[str, list[int]]) -> dict[str, int]:
    return {w: c[-1] for w, c in counts.items()}


def check_counts(reader: TopicReader, expected: dict[str, int], stage: str) -> dict[str, list[int]]:
    """The invariants of every prefix of the committed output: a key is a produced word, no count is
    above the true count of that word produced so far, and (the app has no record cache: one output
    record per counted word) a word's counts in offset order are exactly 1, 2, 3, ...: nothing
    counted twice, nothing skipped, no record of an aborted transaction."""
    for p, recs in reader.records.items():
        offs = [o for o, _, _ in recs]
        assert offs == sorted(set(offs)), f"{stage}: the reader of output partition {p} saw offsets go back"
    counts = counts_in(reader)
    for w, seq in counts.items():
        assert w in expected, f"{stage}: output key {w!r} was never produced"
        over = [c for c in seq if c > expected[w]]
        assert not over, (f"{stage}: DOUBLE COUNTING: {w!r} reached {max(over)} but was produced only "
                          f"{expected[w]} times so far (its last committed counts: {seq[-20:]})")
        if seq != list(range(1, len(seq) + 1)):
            bad = next(i for i, c in enumerate(seq) if c != i + 1)
            raise AssertionError(f"{stage}: committed counts of {w!r} are not 1, 2, 3, ...: record #{bad} says "
                                 f"{seq[bad]} (around it: {seq[max(0, bad - 5):bad + 5]})")
    return counts


def wait_for_counts(reader: TopicReader, app: StreamsApp, expected: dict[str, int], stage: str):
    """Until the latest count of every word equals `expected`; fails at once on double counting."""
    def done():
        app.check_alive()
        reader.drain()
        return latest(check_counts(reader, expected, stage)) == expected
    try:
        wait_until(done, WAVE_TIMEOUT, f"{stage}: exact word counts in the output", interval=0.2)
    except AssertionError as e:
        got = latest(counts_in(reader))
        diff = {w: (got.get(w), n) for w, n in expected.items() if got.get(w) != n}
        raise AssertionError(f"{e}\n{stage}: words whose latest count differs (got, want): {diff}; "
                             f"consumer errors: {reader.errors[-5:]}") from None


def make_lines(seed: int) -> list[str]:
    rnd = random.Random(seed)
    lines = []
    for i in range(LINES):
        words = [rnd.choice(VOCAB) for _ in range(rnd.randint(1, 8))]
        # mixed case and punctuation: the app lower-cases and splits on non-word characters
        if i % 7 == 0:
            words[0] = words[0].capitalize()
        lines.append(" ".join(words) + ("." if i % 5 == 0 else ""))
    return lines


def word_counts(lines: list[str]) -> Counter:
    return Counter(w for line in lines for w in re.split(r"\W+", line.lower()) if w)


def produce_lines(bootstrap: str, topic: str, lines: list[str], first: int):
    ck_produce(bootstrap, topic, [{"key": f"line-{first + i}".encode(), "value": line.encode()}
                                  for i, line in enumerate(lines)],
               timeout=120, enable_idempotence=True, acks="all", linger_ms=5)


def wait_mid_wave(reader: TopicReader, raw: TopicReader, app: StreamsApp, before: dict[str, int],
                  after: dict[str, int], stage: str) -> str:
    """Until part of the wave is committed and the log holds more: records of an open transaction
    that read_uncommitted (`raw`) sees and read_committed (`reader`) does not yet. Then a kill
    lands mid-wave with a transaction open. Returns how it stood (the wave may also be done first)."""
    t0 = time.monotonic()
    while True:
        app.check_alive()
        reader.drain(idle=0.02, limit=1)
        raw.drain(idle=0.02, limit=1)
        got = latest(check_counts(reader, after, stage))
        seen = latest(counts_in(raw))
        ahead = sum(max(0, seen.get(w, 0) - got.get(w, 0)) for w in after)
        done = sum(got.values()) - sum(before.values())
        wave = sum(after.values()) - sum(before.values())
        if got == after:
            return f"after the wave was counted ({time.monotonic() - t0:.1f} s)"
        if done > 0 and ahead > 0:
            return (f"mid-wave: {done} of {wave} words committed, {ahead} more in an open transaction, "
                    f"{time.monotonic() - t0:.1f} s after the wave was produced")
        assert time.monotonic() - t0 < WAVE_TIMEOUT, f"{stage}: no progress in {WAVE_TIMEOUT} s ({done} of {wave})"


def kill_and_restart_broker(broker) -> str:
    """SIGKILL the broker and start it again on the same port and data dir. Returns what was done."""
    if not broker.external:
        broker.kill()
        broker.start()
        return f"ferry broker SIGKILLed and started again (start #{broker.starts})"
    name = os.environ.get("FERRY_E2E_KAFKA_NAME")
    if not name:
        return "broker kill left out (external broker; set FERRY_E2E_KAFKA_NAME for a kafka-up.sh instance)"
    # reference run against Apache Kafka from /work/shared/peers/kafka-up.sh NAME PORT
    d = PEERS_HOME / name
    pid, st = (d / "kafka.pid").read_text().split()
    with open(f"/proc/{pid}/stat") as f:
        assert f.read().rsplit(")", 1)[1].split()[19] == st, "kafka.pid is stale"
    os.kill(int(pid), signal.SIGKILL)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 30, f"kafka pid {pid} gone")
    port = broker.bootstrap.rsplit(":", 1)[1]
    subprocess.run([str(PEERS_LIB.parent / "kafka-up.sh"), name, port], check=True, capture_output=True, timeout=180,
                   env=dict(os.environ, PEERS_HOME=str(PEERS_HOME)))
    return f"Apache Kafka {name} (pid {pid}) SIGKILLed and started again"


def read_changelog(bootstrap: str, topic: str, partitions: int) -> dict[str, int]:
    """Latest value per key of the store's changelog (read_committed). The count store is a
    timestamped key-value store: each value is an 8-byte timestamp then the 8-byte count."""
    r = TopicReader(bootstrap, topic, partitions)
    try:
        wait_until(lambda: r.drain(idle=1.0) == 0 and any(r.records.values()), 60, f"{topic} read", interval=0.2)
        out = {}
        for recs in r.records.values():
            for _, key, value in recs:
                out[key.decode()] = struct.unpack(">q", value[-8:])[0]
        return out
    finally:
        r.close()


def low_watermarks(bootstrap: str, topic: str, partitions: int) -> list[int]:
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "e2e-wm-" + uuid.uuid4().hex[:8]}, logger=QUIET)
    try:
        return [c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[0] for p in range(partitions)]
    finally:
        c.close()


def test_streams_word_count_exactly_once_across_broker_and_app_sigkills(start_broker, streams_app, tmp_path):
    t_start = time.monotonic()
    broker = start_broker()
    run = uuid.uuid4().hex[:8]
    app_id = f"e2e-wc-{run}"
    input_topic, output_topic = f"e2e-wc-in-{run}", f"e2e-wc-out-{run}"
    ck_create_topic(broker.bootstrap, input_topic, INPUT_PARTITIONS)
    ck_create_topic(broker.bootstrap, output_topic, OUTPUT_PARTITIONS)

    lines = make_lines(seed=4404)
    wave_len = LINES // WAVES
    waves = [lines[i * wave_len:(i + 1) * wave_len] for i in range(WAVES)]
    expected = [dict(word_counts(lines[:(k + 1) * wave_len])) for k in range(WAVES)]

    state_dir = tmp_path / "state"
    app = streams_app([broker.bootstrap, app_id, input_topic, output_topic, state_dir, COMMIT_MS, 1, WORD_DELAY_MS])
    app.start()
    reader = TopicReader(broker.bootstrap, output_topic, OUTPUT_PARTITIONS)
    raw = TopicReader(broker.bootstrap, output_topic, OUTPUT_PARTITIONS, isolation="read_uncommitted")
    notes = []
    try:
        # wave 1: plain counting
        produce_lines(broker.bootstrap, input_topic, waves[0], 0)
        wait_for_counts(reader, app, expected[0], "wave 1")

        # wave 2: SIGKILL the broker while the wave is half counted, start it again
        produce_lines(broker.bootstrap, input_topic, waves[1], wave_len)
        how = wait_mid_wave(reader, raw, app, expected[0], expected[1], "wave 2")
        notes.append(f"{kill_and_restart_broker(broker)} {how}")
        wait_for_counts(reader, app, expected[1], "wave 2 (broker SIGKILLed)")

        # wave 3: SIGKILL the Streams app while the wave is half counted, start it on the same state dir
        produce_lines(broker.bootstrap, input_topic, waves[2], 2 * wave_len)
        how = wait_mid_wave(reader, raw, app, expected[1], expected[2], "wave 3")
        app.kill()
        notes.append(f"Streams app SIGKILLed {how}")
        app.start()
        wait_for_counts(reader, app, expected[2], "wave 3 (app SIGKILLed)")

        # wave 4: the restarted app goes on counting
        produce_lines(broker.bootstrap, input_topic, waves[3], 3 * wave_len)
        wait_for_counts(reader, app, expected[3], "wave 4")
        final = check_counts(reader, expected[3], "final")
        # read_uncommitted also shows the records of aborted transactions, which read_committed hid
        wait_until(lambda: raw.drain(idle=1.0) == 0, 60, "output read_uncommitted", interval=0.2)
        uncommitted = sum(len(r) for r in raw.records.values())
    finally:
        reader.close()
        raw.close()

    assert latest(final) == dict(word_counts(lines)) == expected[3]

    # The internal topics Streams made: a repartition topic and the store's compacted changelog,
    # which holds the same counts.
    changelog, repartition = f"{app_id}-counts-changelog", f"{app_id}-words-repartition"
    md = ck_admin(broker.bootstrap).list_topics(timeout=15)
    for t in (changelog, repartition):
        assert t in md.topics and md.topics[t].error is None, f"internal topic {t} missing: {sorted(md.topics)}"
    from confluent_kafka.admin import ConfigResource, ResourceType
    admin = ck_admin(broker.bootstrap)
    fs = admin.describe_configs([ConfigResource(ResourceType.TOPIC, changelog)], request_timeout=20)
    policy = next(iter(fs.values())).result(timeout=30)["cleanup.policy"].value
    assert policy == "compact", f"{changelog} has cleanup.policy={policy}"
    assert read_changelog(broker.bootstrap, changelog, len(md.topics[changelog].partitions)) == expected[3]
    # Streams deletes the repartition records it has consumed and committed (DeleteRecords, at most
    # every second here): each repartition partition's log start moves past 0.
    wait_until(lambda: all(lo > 0 for lo in low_watermarks(broker.bootstrap, repartition,
                                                              len(md.topics[repartition].partitions))),
               90, f"{repartition} purged by Streams (log start offsets > 0)", interval=1.0)

    committed = sum(len(seq) for seq in final.values())
    assert uncommitted >= committed
    print(f"\nstreams EOS: {'; '.join(notes)}; app starts {app.starts}, RUNNING {app.running_count()} times, "
          f"uncaught thread exceptions {len(app.uncaught())}; output records: {committed} committed, "
          f"{uncommitted - committed} more read_uncommitted (aborted); {time.monotonic() - t_start:.1f} s")
    for u in app.uncaught():
        print("  " + u)
    assert broker.alive()
