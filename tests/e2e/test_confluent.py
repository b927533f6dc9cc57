"""confluent-kafka 2.16 (librdkafka 2.16): producer matrix, consumer, admin client."""
from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import ConfigResource, NewPartitions, NewTopic, OffsetSpec, ResourceType

import kproto
from helpers import (CODEC_ID, CODECS, JavaTools, ck_admin, ck_consume, ck_consumer, ck_create_topic,
                     ck_produce, compressible, kafka_installed, partition_count, topic_name, wait_until)

T0 = (int(time.time()) - 3600) * 1000  # recent: old timestamps would fall to retention
HEADERS = [("dup", b"first"), ("dup", b"second"), ("empty", b""), ("nullv", None), ("dup", b"third")]


def key_of(i):
    return None if i % 7 == 3 else f"key-{i}".encode()


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("acks", ["0", "1", "all"])
def test_produce_consume_matrix(broker, acks, codec):
    t = topic_name(f"ck-{acks}-{codec}")
    n = 300
    items = [dict(value=compressible(i), key=key_of(i), headers=HEADERS if i % 2 == 0 else [("solo", b"x")],
                  timestamp=T0 + 10 * i, partition=0) for i in range(n)]
    ck_produce(broker.bootstrap, t, items, acks=acks, compression_type=codec, linger_ms=50,
               batch_num_messages=100)
    got = ck_consume(broker.bootstrap, t, min_count=n)
    assert len(got) == n, f"expected exactly {n} records, got {len(got)}"
    for i, m in enumerate(got):
        assert m.offset() == i
        assert m.value() == items[i]["value"], f"value at {i}"
        assert m.key() == items[i]["key"], f"key at {i}"
        assert m.timestamp() == (1, T0 + 10 * i), f"timestamp at {i}: {m.timestamp()}"
        assert list(m.headers() or []) == items[i]["headers"], f"headers at {i}: {m.headers()}"

    if broker.data_dir is None:  # external broker without FERRY_E2E_DATA_DIR
        return
    batches = kproto.segment_batches(broker.data_dir, t, 0)
    assert sum(b.record_count for b in batches) == n
    assert len(batches) >= 2, "expected several batches (batch.num.messages=100)"
    assert {b.compression for b in batches} == {CODEC_ID[codec]}, "broker changed the batch compression"
    assert all(b.crc_ok() for b in batches), "stored batch fails CRC-32C"
    assert batches[0].base_timestamp == T0 and batches[-1].max_timestamp == T0 + 10 * (n - 1)


def test_multi_partition_keys(broker):
    t = topic_name("ck-parts")
    ck_create_topic(broker.bootstrap, t, 4)
    items = [dict(value=f"v{i}".encode(), key=f"k{i % 10}".encode()) for i in range(200)]
    reports = ck_produce(broker.bootstrap, t, items, acks="all")
    by_part = {}
    for p, off, v in reports:
        by_part.setdefault(p, []).append((off, v))
    assert len(by_part) > 1, "partitioner used a single partition"
    key_parts = {}
    for p, recs in by_part.items():
        recs.sort()
        assert [o for o, _ in recs] == list(range(len(recs))), f"partition {p} offsets not contiguous"
        got = ck_consume(broker.bootstrap, t, p, min_count=len(recs))
        assert [(m.offset(), m.value()) for m in got] == recs
        for m in got:
            key_parts.setdefault(m.key(), set()).add(p)
    assert all(len(ps) == 1 for ps in key_parts.values()), f"a key landed in several partitions: {key_parts}"


def test_offsets_for_times_and_watermarks(broker):
    t = topic_name("ck-oft")
    n = 20
    items = [dict(value=f"v{i}".encode(), timestamp=T0 + 1000 * i, partition=0) for i in range(n)]
    ck_produce(broker.bootstrap, t, items[:10], acks="all", linger_ms=100)
    ck_produce(broker.bootstrap, t, items[10:], acks="all", linger_ms=100)
    c = ck_consumer(broker.bootstrap)
    try:
        assert c.get_watermark_offsets(TopicPartition(t, 0), timeout=15, cached=False) == (0, n)
        cases = {T0 - 1: 0, T0: 0, T0 + 1: 1, T0 + 7000: 7, T0 + 6500: 7, T0 + 10000: 10,
                 T0 + 19000: 19, T0 + 19001: -1}
        got = {}
        for ts in cases:  # one query per timestamp: a list may not repeat a partition
            (r,) = c.offsets_for_times([TopicPartition(t, 0, ts)], timeout=15)
            assert r.error is None, r
            got[ts] = r.offset
        assert got == cases
    finally:
        c.close()


def test_admin_list_offsets(broker):
    t = topic_name("ck-lo")
    ck_produce(broker.bootstrap, t, [dict(value=b"x", timestamp=T0 + i, partition=0) for i in range(5)], acks="all")
    a = ck_admin(broker.bootstrap)
    tp = TopicPartition(t, 0)
    for spec, want in ((OffsetSpec.earliest(), 0), (OffsetSpec.latest(), 5), (OffsetSpec.for_timestamp(T0 + 3), 3)):
        fs = a.list_offsets({tp: spec}, request_timeout=15)
        assert fs[tp].result(20).offset == want, spec


def test_list_topics_and_cluster(broker):
    t = topic_name("ck-lt")
    ck_create_topic(broker.bootstrap, t, 2)
    a = ck_admin(broker.bootstrap)
    md = a.list_topics(timeout=15)
    assert t in md.topics and md.topics[t].error is None
    assert sorted(md.topics[t].partitions) == [0, 1]
    assert len(md.brokers) == 1
    (b,) = md.brokers.values()
    assert f"{b.host}:{b.port}" == broker.bootstrap
    for p in md.topics[t].partitions.values():
        assert p.leader == b.id and p.error is None
    cl = a.describe_cluster(request_timeout=15).result(20)
    assert [f"{n.host}:{n.port}" for n in cl.nodes] == [broker.bootstrap]
    assert cl.cluster_id, "empty cluster id"


def test_admin_create_delete_partitions(broker):
    bs = broker.bootstrap
    a = ck_admin(bs)
    t = topic_name("ck-admin")
    ck_create_topic(bs, t, 3)

    fs = a.create_topics([NewTopic(t, num_partitions=3, replication_factor=1)], operation_timeout=20)
    with pytest.raises(KafkaException) as ei:
        fs[t].result(30)
    assert ei.value.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS

    bad = topic_name("ck-admin-bad")
    fs = a.create_topics([NewTopic(bad, num_partitions=0, replication_factor=1)], operation_timeout=20)
    with pytest.raises(KafkaException) as ei:
        fs[bad].result(30)
    assert ei.value.args[0].code() == KafkaError.INVALID_PARTITIONS
    assert bad not in a.list_topics(timeout=15).topics

    fs = a.create_partitions([NewPartitions(t, 5)], operation_timeout=20)
    fs[t].result(30)
    wait_until(lambda: partition_count(bs, t) == 5, 30, "5 partitions")
    (r,) = ck_produce(bs, t, [dict(value=b"in-p4", partition=4)], acks="all")
    assert r[:2] == (4, 0)
    assert [m.value() for m in ck_consume(bs, t, 4, min_count=1)] == [b"in-p4"]

    fs = a.create_partitions([NewPartitions(t, 2)], operation_timeout=20)
    with pytest.raises(KafkaException) as ei:
        fs[t].result(30)
    assert ei.value.args[0].code() == KafkaError.INVALID_PARTITIONS
    assert partition_count(bs, t) == 5

    fs = a.delete_topics([t], operation_timeout=20)
    fs[t].result(30)
    wait_until(lambda: t not in a.list_topics(timeout=15).topics, 30, f"{t} gone from metadata")

    fs = a.delete_topics([topic_name("ck-never")], operation_timeout=20)
    with pytest.raises(KafkaException) as ei:
        list(fs.values())[0].result(30)
    assert ei.value.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART


def test_delete_then_recreate_starts_empty(broker):
    bs = broker.bootstrap
    a = ck_admin(bs)
    t = topic_name("ck-recreate")
    ck_create_topic(bs, t, 1)
    ck_produce(bs, t, [dict(value=b"old", partition=0)], acks="all")
    a.delete_topics([t], operation_timeout=20)[t].result(30)
    wait_until(lambda: t not in a.list_topics(timeout=15).topics, 30, f"{t} deleted")
    ck_create_topic(bs, t, 1)
    (r,) = ck_produce(bs, t, [dict(value=b"new", partition=0)], acks="all")
    assert r[1] == 0, f"recreated topic continued at offset {r[1]}"
    assert [m.value() for m in ck_consume(bs, t, min_count=1)] == [b"new"]


def test_describe_configs_topic(broker):
    t = topic_name("ck-cfg")
    ck_create_topic(broker.bootstrap, t, 1)
    a = ck_admin(broker.bootstrap)
    res = ConfigResource(ResourceType.TOPIC, t)
    cfg = a.describe_configs([res], request_timeout=15)[res].result(30)
    assert isinstance(cfg, dict) and cfg, "DescribeConfigs returned no entries for the topic"
    for name, entry in cfg.items():
        assert entry.name == name

    missing = ConfigResource(ResourceType.TOPIC, topic_name("ck-cfg-missing"))
    with pytest.raises(KafkaException) as ei:
        a.describe_configs([missing], request_timeout=15)[missing].result(30)
    assert ei.value.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART


def test_describe_configs_broker(broker):
    a = ck_admin(broker.bootstrap)
    (bid,) = a.list_topics(timeout=15).brokers.keys()
    res = ConfigResource(ResourceType.BROKER, str(bid))
    cfg = a.describe_configs([res], request_timeout=15)[res].result(30)
    assert isinstance(cfg, dict)


def test_kafka_producer_perf_test_runs_transactions(broker, tmp_path):
    """`kafka-producer-perf-test --transactional-id` (which timed out on InitProducerId before
    the transaction coordinator existed) writes its records in transactions that commit."""
    import os
    if not (kafka_installed() or os.environ.get("FERRY_REQUIRE_JAVA")):
        pytest.skip("Kafka's tools are not installed")
    t = topic_name("txn-perf")
    ck_create_topic(broker.bootstrap, t)
    java = JavaTools()
    java.env["PRODUCER_PERF"] = "org.apache.kafka.tools.ProducerPerformance"
    out = java.run("PRODUCER_PERF", "--topic", t, "--num-records", "1000", "--record-size", "10",
                   "--throughput", "-1", "--transactional-id", "e2e-perf-txn",
                   "--transaction-duration-ms", "100", "--producer-props",
                   f"bootstrap.servers={broker.bootstrap}", "max.block.ms=60000", check=False, timeout=90)
    text = (out.stdout + out.stderr).decode(errors="replace")
    assert out.returncode == 0 and "1000 records sent" in text, text[-3000:]
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"perf-{t}",
                  "isolation.level": "read_committed", "auto.offset.reset": "earliest"})
    c.assign([TopicPartition(t, 0, 0)])
    got = 0
    deadline = time.monotonic() + 60
    while got < 1000 and time.monotonic() < deadline:
        m = c.poll(1)
        if m is not None and not m.error():
            got += 1
    c.close()
    assert got == 1000
