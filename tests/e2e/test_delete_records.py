"""DeleteRecords with real clients: confluent-kafka's `delete_records` and Kafka 4.4's
kafka-delete-records (DeleteRecordsCommand). The log start offset moves up: ListOffsets
earliest answers it, a consumer starting from the beginning starts there, a fetch below it is
out of range, and it survives a restart; offsets past the high watermark are refused."""
from __future__ import annotations

import json
import os

import pytest

from helpers import JavaTools, ck_admin, ck_consumer, ck_producer, kafka_installed, topic_name, wait_until


def produce(bootstrap: str, topic: str, n: int):
    p = ck_producer(bootstrap, batch_num_messages=10, linger_ms=0)
    for i in range(n):
        p.produce(topic, value=b"v%05d" % i, partition=0)
    assert p.flush(30) == 0


def watermarks(bootstrap: str, topic: str) -> tuple[int, int]:
    from confluent_kafka import TopicPartition
    c = ck_consumer(bootstrap)
    try:
        return c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
    finally:
        c.close()


def first_read(bootstrap: str, topic: str, offset: int) -> int:
    """The first offset a consumer assigned at `offset` (auto.offset.reset=earliest) reads."""
    from confluent_kafka import TopicPartition
    c = ck_consumer(bootstrap, auto_offset_reset="earliest")
    try:
        c.assign([TopicPartition(topic, 0, offset)])
        m = wait_until(lambda: (lambda m: m if m is not None and m.error() is None else None)(c.poll(0.5)),
                       30, "a record")
        return m.offset()
    finally:
        c.close()


def delete(bootstrap: str, topic: str, offset: int):
    from confluent_kafka import TopicPartition
    admin = ck_admin(bootstrap)  # kept alive until the result is in
    fs = admin.delete_records([TopicPartition(topic, 0, offset)])
    return list(fs.values())[0].result(timeout=30)


def test_delete_records_moves_the_log_start_for_every_reader_and_across_a_restart(start_broker, tmp_path):
    broker = start_broker()
    t = topic_name("delrec")
    produce(broker.bootstrap, t, 100)
    assert watermarks(broker.bootstrap, t) == (0, 100)

    done = delete(broker.bootstrap, t, 40)
    assert done.low_watermark == 40
    assert watermarks(broker.bootstrap, t) == (40, 100)
    # From the beginning, and from below the start (out of range, reset to earliest): 40.
    assert first_read(broker.bootstrap, t, -2) == 40
    assert first_read(broker.bootstrap, t, 10) == 40
    assert first_read(broker.bootstrap, t, 70) == 70
    # Never back; past the high watermark is refused; -1 is the high watermark.
    assert delete(broker.bootstrap, t, 20).low_watermark == 40
    with pytest.raises(Exception, match="OFFSET_OUT_OF_RANGE"):
        delete(broker.bootstrap, t, 101)

    if kafka_installed() or os.environ.get("FERRY_REQUIRE_JAVA"):
        java = JavaTools()
        java.env["DELETE_RECORDS"] = "org.apache.kafka.tools.DeleteRecordsCommand"
        spec = tmp_path / "offsets.json"
        spec.write_text(json.dumps({"version": 1, "partitions": [{"topic": t, "partition": 0, "offset": 60}]}))
        out = java.run("DELETE_RECORDS", "--bootstrap-server", broker.bootstrap, "--offset-json-file", spec)
        assert "low_watermark: 60" in out.stdout.decode(), out.stdout.decode()
        assert watermarks(broker.bootstrap, t) == (60, 100)
        start = 60
    else:
        start = 40

    if broker.external:
        return
    broker.restart()
    assert watermarks(broker.bootstrap, t) == (start, 100)
    assert first_read(broker.bootstrap, t, -2) == start
    assert delete(broker.bootstrap, t, -1).low_watermark == 100
    assert watermarks(broker.bootstrap, t) == (100, 100)
    produce(broker.bootstrap, t, 5)
    assert watermarks(broker.bootstrap, t) == (100, 105)
    assert first_read(broker.bootstrap, t, -2) == 100
