"""Brokers started from a topology (`ferry broker --topology F --region R --broker ID`):
topic rules set partitions of auto-created topics, and topics whose primary is another region
are read-only mirrors (a produce gets POLICY_VIOLATION naming the primary)."""
from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from conftest import EXTERNAL, free_port
import uuid

from helpers import ck_producer, partition_count


def topic_name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"

pytestmark = pytest.mark.skipif(bool(EXTERNAL), reason="ferry-only: topology flags")


def write_topology(path, east_port, west_port, fencing="none"):
    path.write_text(f'''
[regions.east]
[[regions.east.brokers]]
id = 1
listen = "127.0.0.1:{east_port}"
[regions.east.gateway]
quic = "127.0.0.1:{free_port()}"
admin = "127.0.0.1:{free_port()}"

[regions.west]
[[regions.west.brokers]]
id = 1
listen = "127.0.0.1:{west_port}"
[regions.west.gateway]
quic = "127.0.0.1:{free_port()}"
admin = "127.0.0.1:{free_port()}"

[[topics]]
pattern = "orders.*"
partitions = 4
primary = "east"
mirrors = ["west"]

[[topics]]
pattern = "west.*"
primary = "west"
mirrors = ["east"]

# These brokers run without their gateways: under lease fencing they would take no writes
# (see test_without_its_gateway_a_lease_fenced_primary_takes_no_writes).
[failover]
fencing = "{fencing}"
''')
    # A region with a gateway needs its certificate even to start its broker (the internal door);
    # `certs/` beside the topology is where brokers look without --certs.
    import subprocess
    from conftest import FERRY_BIN
    certs = path.parent / "certs"
    if not (certs / "ca.pem").exists():
        subprocess.run([str(FERRY_BIN), "certs", "init", "--topology", str(path), "--out", str(certs)], check=True,
                       capture_output=True, timeout=60)


@pytest.fixture
def regions(start_broker, tmp_path):
    east_port, west_port = free_port(), free_port()
    topo = tmp_path / "two.toml"
    write_topology(topo, east_port, west_port)
    east = start_broker("--topology", topo, "--region", "east", "--broker", "1", port=east_port)
    west = start_broker("--topology", topo, "--region", "west", "--broker", "1", port=west_port)
    return east, west


def produce_one(bootstrap: str, topic: str) -> str | None:
    errors = []
    p = ck_producer(bootstrap)
    p.produce(topic, b"v", callback=lambda err, msg: errors.append(err))
    assert p.flush(30) == 0, "delivery report not received"
    err = errors[0]
    return None if err is None else err


def test_rule_sets_partitions_of_auto_created_topics(regions):
    east, _ = regions
    t = topic_name("orders.")
    assert produce_one(east.bootstrap, t) is None
    assert partition_count(east.bootstrap, t) == 4
    # A topic no rule matches gets the broker default (1).
    other = topic_name("misc-")
    assert produce_one(east.bootstrap, other) is None
    assert partition_count(east.bootstrap, other) == 1


def test_produce_to_a_mirror_topic_is_refused_with_the_primary_named(regions):
    east, west = regions
    t = topic_name("orders.")
    err = produce_one(west.bootstrap, t)
    assert err is not None and err.code() == KafkaError.POLICY_VIOLATION, err
    # The primary takes it; and the reverse rule makes east a mirror of west's topics.
    assert produce_one(east.bootstrap, t) is None
    w = topic_name("west.")
    assert produce_one(west.bootstrap, w) is None
    err = produce_one(east.bootstrap, w)
    assert err is not None and err.code() == KafkaError.POLICY_VIOLATION, err


def test_mirror_refusal_message_names_the_primary(regions, tmp_path):
    """The built-in producer prints the broker's message."""
    import subprocess
    from conftest import FERRY_BIN
    _, west = regions
    t = topic_name("orders.")
    r = subprocess.run([str(FERRY_BIN), "produce", "-b", west.bootstrap, t], input=b"x\n",
                       capture_output=True, timeout=60)
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "read-only mirror" in err and "'east'" in err, err


def test_without_its_gateway_a_lease_fenced_primary_takes_no_writes(start_broker, tmp_path):
    """Under lease fencing the broker's write lease is armed from its first start: a primary
    whose gateway never renewed it (crashed, cut off, or not started) refuses writes, with a
    retriable NOT_LEADER_OR_FOLLOWER, rather than take them beside a region that replaced it."""
    from confluent_kafka import Producer
    east_port, west_port = free_port(), free_port()
    topo = tmp_path / "leased.toml"
    write_topology(topo, east_port, west_port, fencing="lease")
    east = start_broker("--topology", topo, "--region", "east", "--broker", "1", port=east_port)
    errors = []
    p = Producer({"bootstrap.servers": east.bootstrap, "message.timeout.ms": 3000})
    p.produce(topic_name("orders."), b"v", callback=lambda err, msg: errors.append(err))
    p.flush(20)
    assert len(errors) == 1 and errors[0] is not None, errors
    # The client retried NOT_LEADER_OR_FOLLOWER until its timeout.
    assert errors[0].code() in (KafkaError._MSG_TIMED_OUT, KafkaError.NOT_LEADER_FOR_PARTITION), errors[0]
    # The broker's message says why (the built-in producer prints it).
    import subprocess
    from conftest import FERRY_BIN
    r = subprocess.run([str(FERRY_BIN), "produce", "-b", east.bootstrap, topic_name("orders.")], input=b"x\n",
                       capture_output=True, timeout=120)
    assert r.returncode != 0
    assert "holds no write lease" in r.stderr.decode(), r.stderr.decode()
