"""Hostile and malformed input over raw sockets, frames built with struct (see kproto.py)."""
from __future__ import annotations

import socket
import struct
import time

import pytest

import kproto
from conftest import require_ferry
from kproto import Conn, array, i8, i16, i32, i64, string

RSS_GROWTH_MAX_KIB = 64 * 1024


def assert_alive(broker):
    """The process is up and a fresh connection gets a sane ApiVersions v0 answer."""
    if not broker.external:
        assert broker.alive(), f"broker died (exit code {broker.proc.returncode})"
    with Conn(broker.bootstrap) as c:
        err, keys = c.api_versions(0)
    assert err == 0
    for k in (0, 1, 2, 3, 18):
        assert k in keys, f"ApiVersions lacks api key {k}: {sorted(keys)}"


def rss(broker):
    return None if broker.external else broker.rss_kib()


def assert_rss_sane(broker, before):
    if before is None:
        return
    after = broker.rss_kib()
    assert after - before < RSS_GROWTH_MAX_KIB, f"RSS grew from {before} KiB to {after} KiB"


def raw(broker, payload: bytes, close_after_send: bool = False):
    s = kproto.connect(broker.bootstrap)
    s.sendall(payload)
    if close_after_send:
        s.close()
        return None
    return s


def assert_closed_without_answer(s: socket.socket, timeout=10.0):
    try:
        got = kproto.wait_closed(s, timeout)
    finally:
        s.close()
    assert got == b"", f"expected the connection closed without a response, got {got[:64]!r}"


def ensure_topic(conn: Conn, topic: str):
    """Metadata v4 with auto-creation until the partition has a leader."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        md = conn.metadata([topic], allow_auto_create=True)
        t = md["topics"].get(topic)
        if t and t["error"] == 0 and t["partitions"] and all(p[1] == 0 and p[2] >= 0 for p in t["partitions"]):
            return
        time.sleep(0.2)
    raise AssertionError(f"topic {topic} not available: {md}")


# --------------------------------------------------------------------------- framing


def test_truncated_frame_then_close(broker):
    before = rss(broker)
    raw(broker, i32(100) + b"\x00\x12\x00\x00" + b"x" * 16, close_after_send=True)
    raw(broker, b"\x00\x00", close_after_send=True)  # half a length prefix
    assert_alive(broker)
    assert_rss_sane(broker, before)


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_frame_shorter_than_a_header(broker, n):
    s = raw(broker, i32(n) + b"\x00" * n)
    assert_closed_without_answer(s)
    assert_alive(broker)


@pytest.mark.parametrize("length", [0x7FFFFFFF, 100 * 1024 * 1024 + 1, -1, -0x80000000])
def test_absurd_length_prefix(broker, length):
    before = rss(broker)
    s = raw(broker, struct.pack(">i", length) + b"\x00\x03\x00\x01" + b"\x00" * 1000)
    assert_closed_without_answer(s)
    assert_alive(broker)
    assert_rss_sane(broker, before)


def test_many_connections_with_large_prefixes(broker):
    """Announced-but-never-sent frames just under the cap must not be buffered up front.
    Stricter than Apache Kafka, which allocates each announced frame and runs out of heap here."""
    require_ferry(broker)
    before = rss(broker)
    socks = [raw(broker, i32(90 * 1024 * 1024) + b"\x00\x00\x00\x07") for _ in range(20)]
    time.sleep(1)
    assert_alive(broker)
    assert_rss_sane(broker, before)
    for s in socks:
        s.close()
    assert_alive(broker)


@pytest.mark.parametrize("case", ["produce_topics", "metadata_topics", "fetch_partitions", "apiversions_v3_keys"])
def test_huge_array_counts(broker, case):
    """Tiny frames claiming i32::MAX elements (kafka-protocol pre-allocates from such counts)."""
    before = rss(broker)
    big = i32(0x7FFFFFFF)
    if case == "produce_topics":
        frame = kproto.request_frame(0, 7, 1, string(None) + i16(1) + i32(1000) + big)
    elif case == "metadata_topics":
        frame = kproto.request_frame(3, 4, 1, big + i8(0))
    elif case == "fetch_partitions":
        frame = kproto.request_frame(1, 4, 1, i32(-1) + i32(100) + i32(1) + i32(1 << 20) + i8(0)
                                     + i32(1) + string("t") + big)
    else:  # flexible: compact string length 2^31 (uvarint)
        frame = kproto.request_frame(18, 3, 1, kproto.uvarint(0x7FFFFFFF) + b"abc", flexible=True)
    s = raw(broker, frame)
    try:
        kproto.wait_closed(s, 10)  # an error response or a close are both fine; hanging is not
    except TimeoutError:
        pass  # still open is acceptable as long as the broker is healthy
    finally:
        s.close()
    assert_alive(broker)
    assert_rss_sane(broker, before)


# --------------------------------------------------------------------------- versions


def test_unknown_api_key(broker):
    s = raw(broker, kproto.request_frame(9999, 0, 7, b""))
    assert_closed_without_answer(s)
    assert_alive(broker)


def test_unsupported_metadata_version(broker):
    s = raw(broker, kproto.request_frame(3, 999, 7, i32(-1)))
    assert_closed_without_answer(s)
    assert_alive(broker)


def test_api_versions_too_new_gets_v0_error_35(broker):
    # as a newer client sends it: request header v2 (ApiVersions >= v3 is flexible), v3-shaped body
    body = kproto.compact_string("ferry-e2e") + kproto.compact_string("9.9") + kproto.TAGS
    s = raw(broker, kproto.request_frame(18, 999, 4242, body, flexible=True))
    try:
        r = kproto.Reader(kproto.recv_frame(s))
    finally:
        s.close()
    assert r.i32() == 4242
    assert r.i16() == 35, "expected UNSUPPORTED_VERSION (35)"
    keys = r.array(lambda r: (r.i16(), r.i16(), r.i16()))  # v0 body: no throttle, no tags
    assert r.remaining() == 0, f"{r.remaining()} bytes after a v0 ApiVersions body"
    if keys:
        assert 18 in {k for k, _, _ in keys}, "the error response lists versions but not ApiVersions"
    assert_alive(broker)


def test_api_versions_v3_flexible(broker):
    with Conn(broker.bootstrap) as c:
        err, keys = c.api_versions(3)
        assert err == 0
        assert keys[18][1] >= 3
        for k, (lo, hi) in keys.items():
            assert 0 <= lo <= hi, (k, lo, hi)
        # the connection is still usable afterwards
        err0, _ = c.api_versions(0)
        assert err0 == 0


# --------------------------------------------------------------------------- produce validation

PRODUCE_VERSIONS = [3, 7, 9]


@pytest.mark.parametrize("version", PRODUCE_VERSIONS)
def test_produce_roundtrip_raw(broker, version):
    """Control for the negative tests below: the same hand-built frames succeed, and Fetch returns the
    stored batch byte-identical except baseOffset (0..8) and partitionLeaderEpoch (12..16)."""
    t = f"e2e-raw-ok-v{version}-{time.monotonic_ns() % 10**9}"
    with Conn(broker.bootstrap) as c:
        ensure_topic(c, t)
        b1 = kproto.build_batch([b"a", b"b", b"c"], keys=[b"k1", None, b"k3"],
                                headers=[[("h", b"1"), ("h", b"2")], [], [("x", None)]])
        b2 = kproto.build_batch([b"d", b"e"])
        assert c.produce(t, 0, b1, version) == (0, 0)
        assert c.produce(t, 0, b2, version) == (0, 3)
        assert c.list_offset(t, 0, -1) == (0, 5)
        assert c.list_offset(t, 0, -2) == (0, 0)
        err, hw, recs = c.fetch(t, 0, 0)
        assert (err, hw) == (0, 5)
        got, _ = kproto.parse_batches(recs)
        assert [x.base_offset for x in got] == [0, 3]
        for sent, stored in zip((b1, b2), got):
            assert stored.raw[8:12] == sent[8:12] and stored.raw[16:] == sent[16:], "batch bytes changed"
        recs1 = got[0].records()
        assert [(r.key, r.value, r.headers) for r in recs1] == [
            (b"k1", b"a", [("h", b"1"), ("h", b"2")]), (None, b"b", []), (b"k3", b"c", [("x", None)])]
        # fetch from the middle of a batch returns that batch (the client skips records)
        err, hw, recs = c.fetch(t, 0, 4)
        got, _ = kproto.parse_batches(recs)
        assert err == 0 and got and got[0].base_offset == 3


def corrupt(kind: str, batch: bytes) -> bytes:
    b = bytearray(batch)
    if kind == "crc":
        b[17] ^= 0xFF
    elif kind == "payload_bitflip":
        b[-3] ^= 0x01
    elif kind == "length_too_long":
        struct.pack_into(">i", b, 8, len(b) - 12 + 50)
    elif kind == "length_too_short":
        struct.pack_into(">i", b, 8, len(b) - 12 - 5)
    elif kind == "magic1":
        b[16] = 1
    elif kind == "record_count_lies":
        struct.pack_into(">i", b, 57, 7)  # header says 7 records, 3 present; CRC recomputed
        struct.pack_into(">I", b, 17, kproto.crc32c(bytes(b[21:])))
    elif kind == "truncated_header":
        b = b[:40]
    return bytes(b)


@pytest.mark.parametrize("version", PRODUCE_VERSIONS)
@pytest.mark.parametrize("kind", ["crc", "payload_bitflip", "length_too_long", "length_too_short", "magic1",
                                  "record_count_lies", "truncated_header"])
def test_produce_invalid_batch_writes_nothing(broker, version, kind):
    t = f"e2e-raw-bad-{kind}-v{version}-{time.monotonic_ns() % 10**9}"
    with Conn(broker.bootstrap) as c:
        ensure_topic(c, t)
        assert c.produce(t, 0, kproto.build_batch([b"one", b"two"]), version) == (0, 0)
        bad = corrupt(kind, kproto.build_batch([b"x", b"y", b"z"]))
        try:
            err, _ = c.produce(t, 0, bad, version)
        except kproto.ConnectionClosed:
            err = None  # closing the connection is acceptable for malformed data...
        if kind in ("crc", "payload_bitflip"):
            assert err == 2, f"bad CRC: expected CORRUPT_MESSAGE (2), got {err}"
        else:
            assert err != 0, f"{kind}: broker accepted a malformed batch"
    with Conn(broker.bootstrap) as c:  # ...but nothing may be written
        assert c.list_offset(t, 0, -1) == (0, 2), "the rejected batch moved the log end"
        assert c.produce(t, 0, kproto.build_batch([b"three"]), version) == (0, 2)
        err, hw, recs = c.fetch(t, 0, 0)
        got, _ = kproto.parse_batches(recs)
        assert (err, hw) == (0, 3)
        assert [(x.base_offset, x.record_count) for x in got] == [(0, 2), (2, 1)]
    if broker.data_dir is not None:
        stored = kproto.segment_batches(broker.data_dir, t, 0)
        assert [(x.base_offset, x.record_count) for x in stored] == [(0, 2), (2, 1)]
        assert all(x.crc_ok() for x in stored)


def test_produce_acks0_gets_no_response(broker):
    t = f"e2e-raw-acks0-{time.monotonic_ns() % 10**9}"
    with Conn(broker.bootstrap) as c:
        ensure_topic(c, t)
        body = string(None) + i16(0) + i32(5000) + array([string(t) + array([i32(0) + kproto.kbytes(
            kproto.build_batch([b"fire", b"forget"]))])])
        c.send_no_response(0, 7, body)
        # the next response on this connection must answer the next request, not the acks=0 produce
        err, _ = c.api_versions(0)
        assert err == 0
        deadline = time.monotonic() + 10
        while c.list_offset(t, 0, -1) != (0, 2):
            assert time.monotonic() < deadline, "acks=0 batch never appeared"
            time.sleep(0.1)


def test_produce_unknown_partition(broker):
    t = f"e2e-raw-part-{time.monotonic_ns() % 10**9}"
    with Conn(broker.bootstrap) as c:
        ensure_topic(c, t)
        n = len(c.metadata([t])["topics"][t]["partitions"])
        assert c.produce(t, n + 5, kproto.build_batch([b"x"]), 7)[0] == 3


def test_produce_missing_topic_without_autocreate(start_broker):
    b = start_broker("--auto-create", "false")
    with Conn(b.bootstrap) as c:
        for v in PRODUCE_VERSIONS:
            assert c.produce("e2e-missing", 0, kproto.build_batch([b"x"]), v)[0] == 3, f"Produce v{v}"
        md = c.metadata(["e2e-missing"], allow_auto_create=True)
        assert md["topics"]["e2e-missing"]["error"] == 3
        md = c.metadata(None)
        assert "e2e-missing" not in md["topics"]
    assert not (b.data_dir / "e2e-missing-0").exists()
    assert_alive(b)


def test_list_offsets_by_timestamp_raw(broker):
    """ListOffsets v1 by timestamp answers the first *record* with timestamp >= target, not the base
    offset of the batch holding it (what Apache Kafka does; clients seek to exactly that offset)."""
    t = f"e2e-raw-lo-ts-{time.monotonic_ns() % 10**9}"
    now = (int(time.time()) - 600) * 1000
    with Conn(broker.bootstrap) as c:
        ensure_topic(c, t)
        assert c.produce(t, 0, kproto.build_batch([b"a%d" % i for i in range(10)], base_timestamp=now)) == (0, 0)
        assert c.produce(t, 0, kproto.build_batch([b"b%d" % i for i in range(10)], base_timestamp=now + 100)) == (0, 10)
        cases = {now - 5: 0, now: 0, now + 3: 3, now + 9: 9, now + 10: 10, now + 100: 10, now + 105: 15,
                 now + 109: 19, now + 110: -1, -2: 0, -1: 20}
        got = {ts: c.list_offset(t, 0, ts) for ts in cases}
        assert got == {ts: (0, off) for ts, off in cases.items()}
