"""Idempotent producer: a Produce whose response is lost is resent and must not be written twice.

The broker advertises the proxy's address, so every client connection (bootstrap and leader) goes
through FaultProxy, which lets the n-th Produce request reach the broker, waits for the broker's
answer, drops it and closes the client's connection."""
from __future__ import annotations

import pytest

import kproto
from conftest import free_port
from helpers import ck_consume, ck_producer, topic_name
from proxy import FaultProxy


@pytest.mark.parametrize("nth", [1, 3])
def test_lost_produce_response_is_not_duplicated(start_broker, nth):
    port = free_port()
    proxy = FaultProxy(("127.0.0.1", port))
    proxy.armed = False
    try:
        b = start_broker(advertised=proxy.address, port=port)
        t = topic_name(f"idem{nth}")
        rounds, per_round = 8, 25
        n = rounds * per_round
        p = ck_producer(proxy.address, enable_idempotence=True, acks="all", linger_ms=5,
                        message_timeout_ms=60000, retry_backoff_ms=100)
        reports, errors = {}, []

        def cb(err, msg):
            if err is not None:
                errors.append(str(err))
            else:
                reports[msg.value().decode()] = (msg.partition(), msg.offset())

        sent_before_arm = 0
        for r in range(rounds):
            if r == nth - 1:
                # arm now: the next Produce request on the wire is the nth, counting one per round
                with proxy.lock:
                    sent_before_arm = proxy.produce_requests
                    proxy.armed = True
            for i in range(r * per_round, (r + 1) * per_round):
                p.produce(t, value=f"idem-{i:05d}".encode(), partition=0, on_delivery=cb)
            assert p.flush(60) == 0, f"round {r}: messages undelivered after 60s"
        assert not errors, errors[:5]
        assert len(proxy.dropped) == 1, (f"the proxy did not drop a Produce response "
                                         f"(produce requests seen: {proxy.produce_requests})")
        assert proxy.produce_requests > sent_before_arm + 1, "the dropped batch was never resent"
        assert proxy.connections >= 2, "client did not reconnect"

        got = ck_consume(proxy.address, t, min_count=n)
        values = [m.value().decode() for m in got]
        dups = sorted({v for v in values if values.count(v) > 1})
        assert not dups, f"{len(values)} records for {n} produced; duplicated: {dups[:10]}"
        assert len(values) == n
        assert [m.offset() for m in got] == list(range(n)), "offsets not contiguous from 0"
        assert values == [f"idem-{i:05d}" for i in range(n)], "records out of order"
        wrong = {v: reports[v] for v, m in zip(values, got) if reports.get(v) != (0, m.offset())}
        assert not wrong, (f"delivery reports disagree with the log for {len(wrong)} records "
                           f"(the retried batch should report its original offset): {list(wrong.items())[:5]}")

        batches = kproto.segment_batches(b.data_dir, t, 0)
        assert sum(x.record_count for x in batches) == n
        assert len({(x.producer_id, x.producer_epoch) for x in batches}) == 1 and batches[0].producer_id >= 0
        seq = 0
        for x in batches:
            assert x.base_sequence == seq, f"stored batch at {x.base_offset} has sequence {x.base_sequence}, want {seq}"
            seq += x.record_count
    finally:
        proxy.close()
