"""Apache Kafka 4.4 Java console tools (the Java client: xerial snappy, idempotence by default)."""
from __future__ import annotations

import functools
import os

import pytest

import kproto
from helpers import CODEC_ID, CODECS, JavaTools, ck_consume, kafka_installed, topic_name, wait_until


@functools.lru_cache(maxsize=1)
def _tools() -> JavaTools:
    return JavaTools()


@pytest.fixture(scope="module")
def java():
    if not kafka_installed():
        if os.environ.get("FERRY_REQUIRE_JAVA"):
            pytest.fail("FERRY_REQUIRE_JAVA is set but Apache Kafka's Java tools are not installed "
                        "(/work/shared/peers/install-kafka.sh)")
        pytest.skip("Apache Kafka Java tools not installed (set FERRY_REQUIRE_JAVA=1 to make this a failure)")
    return _tools()


@functools.lru_cache(maxsize=None)
def _prop_flag(java: JavaTools, cls_var: str, new: str) -> str:
    """Kafka 4.2+ renamed --property to --reader-property / --formatter-property (KIP-1147)."""
    p = java.run(cls_var, "--help", check=False, timeout=60)
    return new if new in (p.stdout + p.stderr).decode(errors="replace") else "--property"


def console_produce(java, bootstrap, topic, lines, *producer_props, codec=None):
    flag = _prop_flag(java, "CONSOLE_PRODUCER", "--reader-property")
    args = ["--bootstrap-server", bootstrap, "--topic", topic,
            flag, "parse.key=true", flag, "key.separator=:",
            "--producer-property", "delivery.timeout.ms=60000",
            "--producer-property", "request.timeout.ms=20000",
            "--producer-property", "linger.ms=20"]
    for p in producer_props:
        args += ["--producer-property", p]
    if codec:
        # ConsoleProducer overwrites compression.type with its own --compression-codec (default none)
        args += ["--compression-codec", codec]
    out = java.run("CONSOLE_PRODUCER", *args, input=("\n".join(lines) + "\n").encode())
    err = out.stderr.decode(errors="replace")
    assert "ERROR" not in err and "Exception" not in err, err[-4000:]


def console_consume(java, bootstrap, topic, n, partition=0):
    flag = _prop_flag(java, "CONSOLE_CONSUMER", "--formatter-property")
    out = java.run("CONSOLE_CONSUMER", "--bootstrap-server", bootstrap, "--topic", topic,
                   "--partition", partition, "--offset", "earliest", "--max-messages", n, "--timeout-ms", 30000,
                   flag, "print.key=true", flag, "key.separator=|", flag, "print.offset=true",
                   timeout=120, check=False)
    lines = [l for l in out.stdout.decode(errors="replace").splitlines() if l.strip()]
    assert len(lines) == n, (f"console consumer printed {len(lines)} of {n} records (rc {out.returncode})\n"
                             + out.stderr.decode(errors="replace")[-3000:])
    recs = []
    for l in lines:
        # print.offset -> "Offset:N|key|value" (Kafka 4.x DefaultMessageFormatter, separator=|)
        off, key, value = l.split("|", 2)
        recs.append((int(off.split(":")[1]), key, value))
    return recs


def check_roundtrip(java, broker, topic, n, values):
    recs = console_consume(java, broker.bootstrap, topic, n)
    assert recs == [(i, f"k{i}", values[i]) for i in range(n)]
    # cross-client: librdkafka must read what the Java client wrote, byte for byte
    got = ck_consume(broker.bootstrap, topic, min_count=n)
    assert [(m.offset(), m.key(), m.value()) for m in got] == [(i, f"k{i}".encode(), values[i].encode())
                                                               for i in range(n)]


@pytest.mark.parametrize("acks", ["0", "1", "all"])
def test_console_acks(java, broker, acks):
    t = topic_name(f"java-acks{acks}")
    n = 50
    values = [f"java-value-{i}" for i in range(n)]
    props = [f"acks={acks}"] + (["enable.idempotence=false"] if acks != "all" else [])
    console_produce(java, broker.bootstrap, t, [f"k{i}:{v}" for i, v in enumerate(values)], *props)
    if acks == "0":
        wait_until(lambda: len(ck_consume(broker.bootstrap, t, min_count=0)) >= n, 30, f"{n} records (acks=0)")
    check_roundtrip(java, broker, t, n, values)


@pytest.mark.parametrize("codec", CODECS)
def test_console_compression(java, broker, codec):
    t = topic_name(f"java-{codec}")
    n = 300
    values = [f"java-{i:05d}-" + "compressible " * 10 for i in range(n)]
    console_produce(java, broker.bootstrap, t, [f"k{i}:{v}" for i, v in enumerate(values)],
                    f"compression.type={codec}", "acks=all", "batch.size=8192", codec=codec)
    check_roundtrip(java, broker, t, n, values)
    if broker.data_dir is None:  # external broker without FERRY_E2E_DATA_DIR
        return
    batches = kproto.segment_batches(broker.data_dir, t, 0)
    assert sum(b.record_count for b in batches) == n
    assert {b.compression for b in batches} == {CODEC_ID[codec]}, "broker changed the batch compression"
    assert all(b.crc_ok() for b in batches)
    # the Java producer is idempotent by default with acks=all: producer id/sequence kept as sent
    assert all(b.producer_id >= 0 for b in batches), [b.producer_id for b in batches]
    seq = 0
    for b in batches:
        assert b.base_sequence == seq, f"batch at {b.base_offset}: base sequence {b.base_sequence}, expected {seq}"
        seq += b.record_count


def test_topic_command(java, broker):
    t = topic_name("java-tc")
    bs = broker.bootstrap
    java.run("TOPIC_CMD", "--bootstrap-server", bs, "--create", "--topic", t, "--partitions", 3,
             "--replication-factor", 1)
    listed = java.run("TOPIC_CMD", "--bootstrap-server", bs, "--list").stdout.decode().split()
    assert t in listed, listed
    desc = java.run("TOPIC_CMD", "--bootstrap-server", bs, "--describe", "--topic", t).stdout.decode()
    assert "PartitionCount: 3" in desc, desc
    java.run("TOPIC_CMD", "--bootstrap-server", bs, "--alter", "--topic", t, "--partitions", 4)
    desc = java.run("TOPIC_CMD", "--bootstrap-server", bs, "--describe", "--topic", t).stdout.decode()
    assert "PartitionCount: 4" in desc, desc
    java.run("TOPIC_CMD", "--bootstrap-server", bs, "--delete", "--topic", t)
    wait_until(lambda: t not in java.run("TOPIC_CMD", "--bootstrap-server", bs, "--list").stdout.decode().split(),
               60, f"{t} deleted", interval=1)


def test_get_offsets_tool_with_every_spec(java, broker):
    """Kafka 4.4's kafka-get-offsets (GetOffsetShell) sends ListOffsets up to v11: latest,
    earliest, max timestamp, earliest local (the log start: one tier here), and the tiered specs
    (latest tiered -5, earliest pending upload -6), which have no offset without tiered storage,
    as from Kafka (the tool prints no line for them)."""
    t = topic_name("offsets")
    console_produce(java, broker.bootstrap, t, ["k1:a", "k2:b", "k3:c"])
    java.env["GET_OFFSETS"] = "org.apache.kafka.tools.GetOffsetShell"

    def offsets(spec):
        out = java.run("GET_OFFSETS", "--bootstrap-server", broker.bootstrap, "--topic", t, "--time", spec)
        return [line for line in out.stdout.decode().splitlines() if line.strip()]
    assert offsets("-1") == [f"{t}:0:3"]
    assert offsets("latest") == [f"{t}:0:3"]
    assert offsets("-2") == [f"{t}:0:0"]
    assert offsets("-4") == [f"{t}:0:0"]
    assert offsets("earliest-local") == [f"{t}:0:0"]
    assert offsets("-5") == offsets("latest-tiered") == []
    assert offsets("-6") == offsets("earliest-pending-upload") == []
