"""The mirroring gateway with real processes on loopback: `ferry broker` and `ferry gateway` per
region, certificates from `ferry certs init`, records produced with confluent-kafka in east and
read in the mirrors at the same offsets, with identical segment bytes; SIGKILL of the receiving
gateway and broker mid-stream resumes with no gap and no duplicate."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ANSI, EXTERNAL, FERRY_BIN, free_port, port_open
from helpers import ck_producer, ck_read_keyed, kcat_consume, wait_until

pytestmark = pytest.mark.skipif(bool(EXTERNAL), reason="ferry-only: gateways")

PARTITIONS = 6


class Proc:
    def __init__(self, name: str, argv: list, log: Path, ready: str):
        self.name, self.argv, self.log, self.ready = name, [str(a) for a in argv], log, ready
        self.p: subprocess.Popen | None = None

    def start(self, timeout: float = 30):
        f = open(self.log, "ab")
        f.write(f"\n===== start: {' '.join(self.argv)}\n".encode())
        f.flush()
        self.p = subprocess.Popen(self.argv, stdout=f, stderr=f, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready in self.text().split("===== start")[-1]:
                return self
            assert self.p.poll() is None, f"{self.name} exited\n{self.text()[-3000:]}"
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready in {timeout}s\n{self.text()[-3000:]}")

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self):
        if self.p and self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGKILL)
            self.p.wait(10)

    def stop(self):
        if self.p and self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


class Regions:
    def __init__(self, tmp: Path, names: list[str], mode: str = "async", failover: str = 'fencing = "none"',
                 wire: str = "none", copies: int = 1, fec: int = 0, broker_config: str = ""):
        self.tmp, self.names = tmp, names
        used: set[int] = set()

        def fresh() -> int:
            # free_port() may hand out a port twice (it is free again once probed); a topology
            # with two listeners on one port is refused, so draw until all differ.
            while (p := free_port()) in used:
                pass
            used.add(p)
            return p

        self.kafka = {n: fresh() for n in names}
        quic = {n: fresh() for n in names}
        admin = {n: fresh() for n in names}
        self.gateway_metrics = {n: fresh() for n in names}
        mirrors = ", ".join(f'"{n}"' for n in names[1:])
        text = ""
        for n in names:
            text += f"""
[regions.{n}]
[[regions.{n}.brokers]]
id = 1
listen = "127.0.0.1:{self.kafka[n]}"
[regions.{n}.gateway]
quic = "127.0.0.1:{quic[n]}"
admin = "127.0.0.1:{admin[n]}"
metrics = "127.0.0.1:{self.gateway_metrics[n]}"
"""
        text += f"""
[[topics]]
pattern = "*"
partitions = {PARTITIONS}
primary = "{names[0]}"
mirrors = [{mirrors}]
mode = "{mode}"
wire_compression = "{wire}"
wire_copies = {copies}
wire_fec = {fec}

# These tests stop gateways on purpose; lease fencing (which would stop east's writes once it
# cannot reach west) has tests of its own.
[failover]
{failover}
"""
        self.topology = tmp / "topology.toml"
        self.topology.write_text(text)
        self.certs = tmp / "certs"
        r = subprocess.run([str(FERRY_BIN), "certs", "init", "--topology", self.topology, "--out", self.certs],
                           capture_output=True, timeout=60)
        assert r.returncode == 0, f"ferry certs init: {r.stderr.decode()}\n{text}"
        self.data = tmp / "data"
        extra = []
        if broker_config:
            (tmp / "broker.toml").write_text(broker_config)
            extra = ["--config", tmp / "broker.toml"]
        self.brokers: dict[str, Proc] = {}
        self.gateways: dict[str, Proc] = {}
        for n in names:
            self.brokers[n] = Proc(f"{n}/broker", [FERRY_BIN, "broker", "--topology", self.topology, "--region", n,
                                                   "--broker", 1, "--data-dir", self.data, *extra],
                                   tmp / f"{n}-broker.log", "ferry broker listening on")
            self.gateways[n] = Proc(f"{n}/gateway", [FERRY_BIN, "gateway", "--topology", self.topology, "--region", n,
                                                     "--certs", self.certs],
                                    tmp / f"{n}-gateway.log", "ferry gateway listening on")

    def start(self):
        for n in self.names:
            self.brokers[n].start()
        for n in self.names:
            self.gateways[n].start()
        return self

    def metric(self, n: str, name: str, **labels) -> float:
        """Sum of a gateway's Prometheus samples of `name` whose labels include `labels`."""
        import urllib.request
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.gateway_metrics[n]}/metrics", timeout=10).read().decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def bootstrap(self, n: str) -> str:
        return f"127.0.0.1:{self.kafka[n]}"

    def segment_dir(self, n: str, topic: str, p: int) -> Path:
        return self.data / n / "broker-1" / f"{topic}-{p}"

    def stop(self):
        for procs in (self.gateways, self.brokers):
            for p in procs.values():
                p.stop()

    def logs(self) -> str:
        out = []
        for procs in (self.brokers, self.gateways):
            for p in procs.values():
                out.append(f"----- {p.name} -----\n{p.text()[-4000:]}")
        return "\n".join(out)


@pytest.fixture
def regions_factory(tmp_path, request):
    made: list[Regions] = []

    def make(names, mode="async", **kw):
        r = Regions(tmp_path, names, mode, **kw).start()
        made.append(r)
        return r

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for r in made:
        if failed:
            print(r.logs())
        r.stop()


def produce(bootstrap: str, topic: str, n: int, start: int = 0) -> dict:
    """n keyed records with headers and explicit timestamps; returns {(partition, offset): record}."""
    p = ck_producer(bootstrap, linger_ms=5, enable_idempotence=True, acks="all")
    acked, errors = {}, []
    base_ts = int(time.time() * 1000) - 100_000

    def cb(err, msg, headers):
        if err is not None:
            errors.append(err)
        else:
            # Delivery reports carry no headers: keep the ones sent.
            acked[(msg.partition(), msg.offset())] = (msg.key(), msg.value(), headers, msg.timestamp()[1])

    for i in range(start, start + n):
        headers = [("h", f"{i}".encode()), ("h", b"dup")]
        while True:
            try:
                p.produce(topic, key=f"k{i}".encode(), value=f"value-{i}".encode() * 3, headers=headers,
                          timestamp=base_ts + i, on_delivery=lambda err, msg, h=headers: cb(err, msg, h))
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    assert p.flush(120) == 0
    assert not errors, errors[:3]
    return acked


def end_offsets(bootstrap: str, topic: str) -> list[int]:
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "wm", "enable.auto.commit": False})
    try:
        return [c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(PARTITIONS)]
    finally:
        c.close()


def wait_mirrored(r: Regions, region: str, topic: str, want: list[int], timeout: float = 120):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = end_offsets(r.bootstrap(region), topic)
            if last == want:
                return
        except Exception as e:  # the broker may be restarting
            last = repr(e)
        time.sleep(0.5)
    raise AssertionError(f"{region} did not catch up: {last} != {want}\n{r.logs()}")


def read_all(bootstrap: str, topic: str, partition: int, count: int) -> list:
    from confluent_kafka import Consumer, KafkaError, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "read", "enable.auto.commit": False,
                  "enable.partition.eof": True, "fetch.max.bytes": 8 << 20})
    out = []
    try:
        c.assign([TopicPartition(topic, partition, 0)])
        deadline = time.monotonic() + 120
        while len(out) < count and time.monotonic() < deadline:
            for m in c.consume(1000, 1.0):
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        continue
                    raise AssertionError(m.error())
                out.append((m.offset(), m.key(), m.value(), m.headers(), m.timestamp()[1]))
    finally:
        c.close()
    return out


def check_identical(r: Regions, region: str, topic: str, acked: dict):
    src, dst = r.names[0], region
    for p in range(PARTITIONS):
        want = sorted((o, *rec) for (pp, o), rec in acked.items() if pp == p)
        got = read_all(r.bootstrap(dst), topic, p, len(want))
        assert got == want, f"{dst} partition {p}: {len(got)} records, first difference at " \
                            f"{next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)}"
        a = sorted(r.segment_dir(src, topic, p).glob("*.log"))
        b = sorted(r.segment_dir(dst, topic, p).glob("*.log"))
        assert [x.name for x in a] == [x.name for x in b]
        for x, y in zip(a, b):
            assert x.read_bytes() == y.read_bytes(), f"segment {x.name} of {topic}-{p} differs in {dst}"


@pytest.mark.parametrize("names", [["east", "west"], ["east", "west", "south"]], ids=["two", "three"])
def test_100k_records_mirrored_offset_exact_with_identical_segments(regions_factory, names):
    r = regions_factory(names)
    topic = "orders"
    acked = produce(r.bootstrap("east"), topic, 100_000)
    assert len(acked) == 100_000
    want = end_offsets(r.bootstrap("east"), topic)
    assert sum(want) == 100_000
    for n in names[1:]:
        wait_mirrored(r, n, topic, want)
        check_identical(r, n, topic, acked)
    # kcat (librdkafka 2.0.2) reads the same records at the same offsets in a mirror
    last = names[-1]
    got = kcat_consume(r.bootstrap(last), topic, 3)
    src = kcat_consume(r.bootstrap("east"), topic, 3)
    assert [(x["offset"], x["key"], x["payload"]) for x in got] == [(x["offset"], x["key"], x["payload"]) for x in src]


def test_sigkill_receiving_gateway_then_broker_mid_stream(regions_factory):
    r = regions_factory(["east", "west"])
    topic = "events"
    acked = produce(r.bootstrap("east"), topic, 20_000)
    # Kill west's gateway while it is still copying, then its broker; restart both.
    r.gateways["west"].kill()
    acked.update(produce(r.bootstrap("east"), topic, 20_000, start=20_000))
    r.gateways["west"].start()
    time.sleep(0.5)
    r.brokers["west"].kill()
    acked.update(produce(r.bootstrap("east"), topic, 20_000, start=40_000))
    r.brokers["west"].start()
    want = end_offsets(r.bootstrap("east"), topic)
    assert sum(want) == 60_000
    wait_mirrored(r, "west", topic, want, timeout=180)
    check_identical(r, "west", topic, acked)


def test_link_cut_by_stopping_the_source_gateway_heals(regions_factory):
    r = regions_factory(["east", "west"])
    topic = "cut"
    acked = produce(r.bootstrap("east"), topic, 5_000)
    r.gateways["east"].stop()
    acked.update(produce(r.bootstrap("east"), topic, 5_000, start=5_000))
    r.gateways["east"].start()
    want = end_offsets(r.bootstrap("east"), topic)
    wait_mirrored(r, "west", topic, want)
    check_identical(r, "west", topic, acked)


def committed(bootstrap: str, group: str, topic: str) -> list[int]:
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        return [tp.offset for tp in c.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)]
    finally:
        c.close()


def test_group_committed_in_east_resumes_in_west(regions_factory):
    from confluent_kafka import Consumer, KafkaError, TopicPartition
    r = regions_factory(["east", "west"])
    topic = "payments"
    acked = produce(r.bootstrap("east"), topic, 6_000)
    group = "billing"
    # Consume about half in east, committing what was read.
    c = Consumer({"bootstrap.servers": r.bootstrap("east"), "group.id": group, "enable.auto.commit": False,
                  "auto.offset.reset": "earliest"})
    seen_east = set()
    try:
        c.subscribe([topic])
        deadline = time.monotonic() + 60
        while len(seen_east) < 3_000 and time.monotonic() < deadline:
            for m in c.consume(500, 1.0):
                if not m.error():
                    seen_east.add((m.partition(), m.offset()))
        c.commit(asynchronous=False)
    finally:
        c.close()
    east_committed = committed(r.bootstrap("east"), group, topic)
    assert sum(o for o in east_committed if o > 0) == len(seen_east), (east_committed, len(seen_east))
    # The gateway ships the offsets; west installs them (all records are mirrored by then).
    wait_mirrored(r, "west", topic, end_offsets(r.bootstrap("east"), topic))
    deadline = time.monotonic() + 60
    west = None
    while time.monotonic() < deadline:
        west = committed(r.bootstrap("west"), group, topic)
        if west == east_committed:
            break
        time.sleep(0.5)
    assert west == east_committed, (west, east_committed)
    # A consumer of the same group in west reads exactly the records east had not consumed.
    c = Consumer({"bootstrap.servers": r.bootstrap("west"), "group.id": group, "enable.auto.commit": False,
                  "auto.offset.reset": "earliest", "enable.partition.eof": True})
    seen_west = set()
    eofs = set()
    try:
        c.subscribe([topic])
        deadline = time.monotonic() + 60
        while len(eofs) < PARTITIONS and time.monotonic() < deadline:
            for m in c.consume(500, 1.0):
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        eofs.add(m.partition())
                    continue
                seen_west.add((m.partition(), m.offset()))
    finally:
        c.close()
    assert not (seen_east & seen_west), "records consumed in east were delivered again in west"
    assert seen_east | seen_west == set(acked), f"skipped {len(set(acked) - seen_east - seen_west)} records"



def status(r: Regions) -> dict:
    import json
    p = subprocess.run([str(FERRY_BIN), "status", "--topology", r.topology, "--json"], capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr.decode()
    return json.loads(p.stdout)


def test_status_reports_lag_while_the_link_is_cut_and_zero_after(regions_factory):
    r = regions_factory(["east", "west"])
    topic = "status"
    produce(r.bootstrap("east"), topic, 3_000)
    wait_mirrored(r, "west", topic, end_offsets(r.bootstrap("east"), topic))
    s = status(r)
    rows = [p for p in s["partitions"] if p["topic"] == topic]
    assert len(rows) == PARTITIONS and all(p["lag_records"] == 0 and p["lag_bytes"] == 0 for p in rows), rows
    assert {x["region"]: x["up"] for x in s["regions"]} == {"east": True, "west": True}
    # Cut the link (stop the receiving gateway) and produce more: status shows the lag.
    r.gateways["west"].stop()
    produce(r.bootstrap("east"), topic, 1_200, start=3_000)
    rows = [p for p in status(r)["partitions"] if p["topic"] == topic]
    assert sum(p["lag_records"] for p in rows) == 1_200, rows
    assert all((p["lag_bytes"] > 0) == (p["lag_records"] > 0) for p in rows), rows
    assert all(p["source_log_end"] - p["mirrored"] == p["lag_records"] for p in rows), rows
    # Heal: the lag returns to zero.
    r.gateways["west"].start()
    wait_mirrored(r, "west", topic, end_offsets(r.bootstrap("east"), topic))
    rows = [p for p in status(r)["partitions"] if p["topic"] == topic]
    assert all(p["lag_records"] == 0 for p in rows), rows


def test_sync_mode_answers_acks_all_only_once_the_mirror_has_it(regions_factory):
    from confluent_kafka import KafkaError
    r = regions_factory(["east", "west"], mode="sync")
    topic = "ledger"
    # With the mirror reachable: when a delivery report arrives, west already holds the record.
    p = ck_producer(r.bootstrap("east"), acks="all", enable_idempotence=True, linger_ms=0)
    for i in range(20):
        done = []
        p.produce(topic, key=b"k", value=f"v{i}".encode(), partition=0,
                  on_delivery=lambda err, msg: done.append((err, msg.offset())))
        assert p.flush(30) == 0
        err, offset = done[0]
        assert err is None, err
        assert end_offsets(r.bootstrap("west"), topic)[0] >= offset + 1, \
            f"acknowledged offset {offset} but west ends at {end_offsets(r.bootstrap('west'), topic)[0]}"
    # With the mirror's gateway down, an acks=all produce is not acknowledged as successful.
    r.gateways["west"].stop()
    q = ck_producer(r.bootstrap("east"), acks="all", enable_idempotence=False, linger_ms=0,
                    request_timeout_ms=2000, message_timeout_ms=5000, retries=0)
    done = []
    q.produce(topic, value=b"during-cut", partition=0, on_delivery=lambda err, msg: done.append(err))
    q.flush(30)
    assert done and done[0] is not None, "acks=all succeeded while the synchronous mirror was unreachable"
    assert done[0].code() in (KafkaError.REQUEST_TIMED_OUT, KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT), done[0]
    # Healed: the record written meanwhile reaches west, and new produces succeed again.
    r.gateways["west"].start()
    wait_mirrored(r, "west", topic, end_offsets(r.bootstrap("east"), topic))
    done = []
    p.produce(topic, value=b"after", partition=0, on_delivery=lambda err, msg: done.append(err))
    assert p.flush(60) == 0 and done == [None], done


def test_sync_mode_answers_a_commit_only_once_the_mirror_has_its_markers(regions_factory):
    """A transaction on a synchronously mirrored topic: commit_transaction() returns once west
    holds the COMMIT marker, so read_committed in west already sees the transaction (a failover
    then never aborts what east committed)."""
    from confluent_kafka import Consumer, Producer, TopicPartition
    from helpers import ck_create_topic
    r = regions_factory(["east", "west"], mode="sync")
    topic = "ledger-txn"
    ck_create_topic(r.bootstrap("east"), topic)
    p = Producer({"bootstrap.servers": r.bootstrap("east"), "transactional.id": "sync-txn"})
    p.init_transactions(30)
    west = Consumer({"bootstrap.servers": r.bootstrap("west"), "group.id": "sync-txn-check",
                     "isolation.level": "read_committed"})
    try:
        for i in range(10):
            p.begin_transaction()
            p.produce(topic, value=f"t{i}".encode(), partition=0)
            p.commit_transaction(30)
            # Each transaction is a record and its marker: west's last stable offset is there.
            _, stable = west.get_watermark_offsets(TopicPartition(topic, 0), timeout=10, cached=False)
            assert stable == 2 * (i + 1), (i, stable)
    finally:
        west.close()


def test_snappy_on_the_wire_sends_fewer_bytes_and_stores_the_same(regions_factory):
    """`wire_compression = "snappy"`: uncompressed client batches travel Snappy-compressed and
    the mirror stores the source's bytes; batches the client compressed travel as they are."""
    r = regions_factory(["east", "west"], wire="snappy")
    acked = produce(r.bootstrap("east"), "zipped", 5_000)
    wait_mirrored(r, "west", "zipped", end_offsets(r.bootstrap("east"), "zipped"))
    check_identical(r, "west", "zipped", acked)
    plain = r.metric("east", "ferry_mirror_bytes_out_total", topic="zipped")
    wire = r.metric("east", "ferry_mirror_wire_bytes_out_total", topic="zipped")
    assert plain > 0 and wire < 0.7 * plain, (plain, wire)

    # Batches compressed by the client (lz4 here) are shipped as they are: no second compression.
    p = ck_producer(r.bootstrap("east"), compression_type="lz4", linger_ms=5)
    for i in range(2_000):
        p.produce("packed", key=f"k{i}".encode(), value=f"value-{i}".encode() * 3)
        p.poll(0)
    assert p.flush(60) == 0
    wait_mirrored(r, "west", "packed", end_offsets(r.bootstrap("east"), "packed"))
    for part in range(PARTITIONS):
        a = sorted(r.segment_dir("east", "packed", part).glob("*.log"))
        b = sorted(r.segment_dir("west", "packed", part).glob("*.log"))
        assert [x.read_bytes() for x in a] == [y.read_bytes() for y in b]
    plain = r.metric("east", "ferry_mirror_bytes_out_total", topic="packed")
    wire = r.metric("east", "ferry_mirror_wire_bytes_out_total", topic="packed")
    # Frame headers only: 13 bytes per frame plus the length prefix.
    assert plain > 0 and plain <= wire < plain * 1.1, (plain, wire)


def mirror_across_a_west_gateway_restart(r, topic: str) -> None:
    """30,000 records into east, the middle 10,000 while west's gateway is down; west's copy
    ends up offset- and byte-identical, with no gap or duplicate."""
    acked = produce(r.bootstrap("east"), topic, 10_000)
    r.gateways["west"].kill()
    acked.update(produce(r.bootstrap("east"), topic, 10_000, start=10_000))
    r.gateways["west"].start()
    acked.update(produce(r.bootstrap("east"), topic, 10_000, start=20_000))
    want = end_offsets(r.bootstrap("east"), topic)
    assert sum(want) == 30_000
    wait_mirrored(r, "west", topic, want)
    check_identical(r, "west", topic, acked)


def test_two_wire_copies_race_into_one_identical_mirror(regions_factory):
    """`wire_copies = 2`: every frame also travels on a second connection and the mirror
    appends whichever copy comes first. The two streams of each partition race into the same
    log, through a restart of the receiving gateway, and the mirror is still offset- and
    byte-identical, with no gap or duplicate."""
    r = regions_factory(["east", "west"], copies=2)
    topic = "twice"
    mirror_across_a_west_gateway_restart(r, topic)
    # The second copy did travel: on its own connection, with bytes of its own.
    east_log = ANSI.sub("", r.gateways["east"].text())
    assert 'connected to peer gateway peer=west connection="second-copy"' in east_log, east_log[-3000:]
    second = r.metric("east", "ferry_mirror_second_copy_wire_bytes_out_total", topic=topic)
    plain = r.metric("east", "ferry_mirror_bytes_out_total", topic=topic)
    assert 0 < second, (second, plain)
    # Every partition of west was fed by two streams after the restart.
    west_log = ANSI.sub("", r.gateways["west"].text())
    for part in range(PARTITIONS):
        streams = [line for line in west_log.splitlines() if "mirroring partition" in line
                   and f" topic={topic} partition={part} " in line]
        assert len(streams) >= 2, (part, streams)


def test_fec_shards_race_the_stream_into_one_identical_mirror(regions_factory):
    """`wire_fec = 25`: beside every frame's stream, Reed-Solomon recovery shards travel in
    QUIC datagrams, and the mirror, reading the stream out of order, rebuilds the frame from the
    stream's complete shards and the recovery shards as soon as enough are in (stopping the rest
    of the stream), or takes the whole stream. Both paths feed the same log, through a restart
    of the receiving gateway, and the mirror is still offset- and byte-identical, with no gap or
    duplicate."""
    r = regions_factory(["east", "west"], fec=25)
    topic = "coded"
    mirror_across_a_west_gateway_restart(r, topic)
    # Shards did travel, and west rebuilt frames from them.
    assert r.metric("east", "ferry_mirror_fec_wire_bytes_out_total", topic=topic) > 0
    assert r.metric("west", "ferry_mirror_fec_frames_rebuilt_total") > 0


def topic_configs(bootstrap: str, topic: str) -> dict:
    from confluent_kafka.admin import AdminClient, ConfigResource
    a = AdminClient({"bootstrap.servers": bootstrap})
    res = ConfigResource(ConfigResource.Type.TOPIC, topic)
    entries = a.describe_configs([res])[res].result(timeout=10)
    return {k: e.value for k, e in entries.items()}


def test_mirror_topics_follow_their_primarys_configs(regions_factory):
    """A topic created in east with configs is created in west with them; a change made in east
    with IncrementalAlterConfigs reaches west; west refuses changes to its mirror."""
    from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic
    r = regions_factory(["east", "west"])
    east = AdminClient({"bootstrap.servers": r.bootstrap("east")})
    east.create_topics([NewTopic("conf", PARTITIONS, 1, config={"retention.ms": "7200000"})])["conf"].result(20)
    produce(r.bootstrap("east"), "conf", 100)
    wait_mirrored(r, "west", "conf", end_offsets(r.bootstrap("east"), "conf"))

    def wait_west(key, want):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = topic_configs(r.bootstrap("west"), "conf").get(key)
            if got == want:
                return
            time.sleep(0.3)
        raise AssertionError(f"west's {key} is {got}, not {want}\n{r.logs()}")

    wait_west("retention.ms", "7200000")
    res = ConfigResource(ConfigResource.Type.TOPIC, "conf", incremental_configs=[
        ConfigEntry("retention.ms", "3600000", incremental_operation=AlterConfigOpType.SET),
        ConfigEntry("segment.bytes", "2097152", incremental_operation=AlterConfigOpType.SET)])
    east.incremental_alter_configs([res])[res].result(20)
    assert topic_configs(r.bootstrap("east"), "conf")["segment.bytes"] == "2097152"
    wait_west("retention.ms", "3600000")
    wait_west("segment.bytes", "2097152")
    # A deleted override falls back to the default in both regions.
    res = ConfigResource(ConfigResource.Type.TOPIC, "conf", incremental_configs=[
        ConfigEntry("segment.bytes", None, incremental_operation=AlterConfigOpType.DELETE)])
    east.incremental_alter_configs([res])[res].result(20)
    default = topic_configs(r.bootstrap("east"), "conf")["segment.bytes"]
    assert default != "2097152"
    wait_west("segment.bytes", default)

    # The mirror is read-only, its configs included.
    west = AdminClient({"bootstrap.servers": r.bootstrap("west")})
    res = ConfigResource(ConfigResource.Type.TOPIC, "conf", incremental_configs=[
        ConfigEntry("retention.ms", "1000", incremental_operation=AlterConfigOpType.SET)])
    with pytest.raises(Exception) as e:
        west.incremental_alter_configs([res])[res].result(20)
    assert "mirror of its primary region east" in str(e.value), e.value
    assert topic_configs(r.bootstrap("west"), "conf")["retention.ms"] == "3600000"
    # A bad value is refused with its reason, and nothing changes.
    res = ConfigResource(ConfigResource.Type.TOPIC, "conf", incremental_configs=[
        ConfigEntry("retention.ms", "soon", incremental_operation=AlterConfigOpType.SET)])
    with pytest.raises(Exception) as e:
        east.incremental_alter_configs([res])[res].result(20)
    assert "retention.ms" in str(e.value), e.value
    assert topic_configs(r.bootstrap("east"), "conf")["retention.ms"] == "3600000"
    # Changed configs are stored with the topic: they survive a SIGKILL of either broker.
    for region in ("east", "west"):
        r.brokers[region].kill()
        r.brokers[region].start()
        assert topic_configs(r.bootstrap(region), "conf")["retention.ms"] == "3600000", region


def test_a_compacted_topic_is_mirrored_with_its_gaps_and_stays_offset_exact(regions_factory):
    """East compacts and deletes records (DeleteRecords) before west's mirror starts: west copies
    the compacted log from east's log start with its gaps, takes the topic's compaction configs,
    compacts its own copy with the same rules, and holds at every offset what east held there;
    live overwrites afterwards converge in both regions to the latest value per key."""
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic
    r = regions_factory(["east", "west"], broker_config='cleaner_interval = "300ms"\n')
    r.gateways["east"].stop()
    t = "compacted"
    configs = {"cleanup.policy": "compact,delete", "segment.bytes": "4096", "segment.ms": "300",
               "min.cleanable.dirty.ratio": "0.01", "delete.retention.ms": "600000"}
    east = AdminClient({"bootstrap.servers": r.bootstrap("east")})
    east.create_topics([NewTopic(t, PARTITIONS, 1, config=configs)])[t].result(20)
    written: dict[int, tuple] = {}

    def write(items):
        p = ck_producer(r.bootstrap("east"), linger_ms=5, enable_idempotence=True, batch_size=4096)
        for k, v in items:
            p.produce(t, key=k, value=v, partition=0,
                      on_delivery=lambda err, m: written.__setitem__(m.offset(), (m.key(), m.value())))
            p.poll(0)
        assert p.flush(60) == 0
        time.sleep(0.5)  # past segment.ms: the next write rolls, so everything before is cleanable
        # Each roll record has a key of its own: the active segment is never cleaned, so a
        # later roll record there would not yet supersede an earlier one.
        p.produce(t, key=b"~roll-%d" % len(written), value=b"x", partition=0,
                  on_delivery=lambda err, m: written.__setitem__(m.offset(), (m.key(), m.value())))
        assert p.flush(60) == 0

    def model(start: int) -> dict:
        last = {}
        for o in sorted(written):
            last[written[o][0]] = o
        return {o: written[o] for o in last.values() if o >= start}

    def read(region: str) -> dict:
        return ck_read_keyed(r.bootstrap(region), t, timeout=30)

    def converge(region: str, want: dict, what: str):
        deadline = time.monotonic() + 90
        got = None
        while time.monotonic() < deadline:
            try:
                got = read(region)
                if got == want:
                    return
            except Exception as e:  # topic not there yet
                got = repr(e)
            time.sleep(0.5)
        raise AssertionError(f"{region}: {what}: {got if isinstance(got, str) else sorted(set(got) ^ set(want))[:10]}"
                             f"\n{r.logs()}")

    write([(b"k%02d" % (i % 20), b"v%04d" % i) for i in range(400)])
    converge("east", model(0), "the latest value per key")
    # Delete records below a key's latest value: east's log start moves past the first ones.
    start = sorted(model(0))[5]
    east.delete_records([TopicPartition(t, 0, start)])
    wm = wait_until(lambda: (lambda lo: lo if lo == start else None)(
        __import__("confluent_kafka").Consumer({"bootstrap.servers": r.bootstrap("east"), "group.id": "w"})
        .get_watermark_offsets(TopicPartition(t, 0), timeout=10)[0]), 30, "east's log start")
    assert wm == start
    converge("east", model(start), "the deleted records gone")

    # West's mirror starts now, after east compacted and deleted: east's log from its start.
    r.gateways["east"].start()
    converge("west", model(start), "the compacted log, mirrored")
    assert topic_configs(r.bootstrap("west"), t)["cleanup.policy"] == "compact,delete"

    # Live: more overwrites, mirrored as they come; both regions compact them.
    write([(b"k%02d" % (i % 30), b"w%04d" % i) for i in range(300)])
    want = model(start)
    converge("east", want, "the latest value per key after more writes")
    converge("west", want, "the latest value per key after more writes")
    for o, rec in read("west").items():
        assert written[o] == rec, f"west holds at {o} what east wrote there"
