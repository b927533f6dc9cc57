"""Minimal, hand-written Kafka wire protocol helpers for the e2e tests.

Independent of the broker's own codec on purpose: frames are built with `struct`, so a bug shared
by the broker and its codec crate cannot hide here. Covers just what the tests need:

  * RecordBatch v2 build / parse (CRC-32C), segment-file scanning
  * request framing (header v1 / v2), response framing (header v0 / v1)
  * ApiVersions v0/v3, Metadata v4, Produce v3/v7 (non-flexible) and v9 (flexible),
    ListOffsets v1, Fetch v4
"""
from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

# --------------------------------------------------------------------------- CRC-32C
try:
    import crc32c as _crc32c_mod  # pip package "crc32c"

    def crc32c(data: bytes) -> int:
        return _crc32c_mod.crc32c(data)
except ImportError:  # pragma: no cover - fallback, slow but correct
    _TABLE = []
    for _i in range(256):
        _c = _i
        for _ in range(8):
            _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
        _TABLE.append(_c)

    def crc32c(data: bytes) -> int:
        c = 0xFFFFFFFF
        for b in data:
            c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
        return c ^ 0xFFFFFFFF

assert crc32c(b"123456789") == 0xE3069283, "CRC-32C self-check failed"

# --------------------------------------------------------------------------- primitives


def i8(v): return struct.pack(">b", v)
def i16(v): return struct.pack(">h", v)
def i32(v): return struct.pack(">i", v)
def i64(v): return struct.pack(">q", v)
def u32(v): return struct.pack(">I", v)


def string(s: str | None) -> bytes:
    if s is None:
        return i16(-1)
    b = s.encode()
    return i16(len(b)) + b


def kbytes(b: bytes | None) -> bytes:
    if b is None:
        return i32(-1)
    return i32(len(b)) + b


def array(items: list[bytes] | None) -> bytes:
    if items is None:
        return i32(-1)
    return i32(len(items)) + b"".join(items)


def uvarint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def varint(v: int) -> bytes:  # zigzag, 64-bit
    return uvarint((v << 1) ^ (v >> 63))


def compact_string(s: str | None) -> bytes:
    if s is None:
        return uvarint(0)
    b = s.encode()
    return uvarint(len(b) + 1) + b


def compact_bytes(b: bytes | None) -> bytes:
    if b is None:
        return uvarint(0)
    return uvarint(len(b) + 1) + b


def compact_array(items: list[bytes] | None) -> bytes:
    if items is None:
        return uvarint(0)
    return uvarint(len(items) + 1) + b"".join(items)


TAGS = uvarint(0)  # empty tagged-field section


class Reader:
    def __init__(self, data: bytes, pos: int = 0):
        self.d = data
        self.p = pos

    def _take(self, n: int) -> bytes:
        if n < 0 or self.p + n > len(self.d):
            raise ValueError(f"short read: want {n} at {self.p}, have {len(self.d) - self.p}")
        b = self.d[self.p:self.p + n]
        self.p += n
        return b

    def i8(self): return struct.unpack(">b", self._take(1))[0]
    def i16(self): return struct.unpack(">h", self._take(2))[0]
    def i32(self): return struct.unpack(">i", self._take(4))[0]
    def i64(self): return struct.unpack(">q", self._take(8))[0]
    def u32(self): return struct.unpack(">I", self._take(4))[0]

    def uvarint(self) -> int:
        shift = 0
        v = 0
        while True:
            b = self._take(1)[0]
            v |= (b & 0x7F) << shift
            if not b & 0x80:
                return v
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")

    def varint(self) -> int:
        v = self.uvarint()
        return (v >> 1) ^ -(v & 1)

    def string(self):
        n = self.i16()
        return None if n < 0 else self._take(n).decode()

    def kbytes(self):
        n = self.i32()
        return None if n < 0 else self._take(n)

    def array(self, fn):
        n = self.i32()
        if n < 0:
            return None
        return [fn(self) for _ in range(n)]

    def compact_string(self):
        n = self.uvarint()
        return None if n == 0 else self._take(n - 1).decode()

    def compact_bytes(self):
        n = self.uvarint()
        return None if n == 0 else self._take(n - 1)

    def compact_array(self, fn):
        n = self.uvarint()
        if n == 0:
            return None
        return [fn(self) for _ in range(n - 1)]

    def tags(self):
        for _ in range(self.uvarint()):
            self.uvarint()  # tag
            self._take(self.uvarint())

    def remaining(self) -> int:
        return len(self.d) - self.p


# --------------------------------------------------------------------------- record batches

BATCH_HEADER_LEN = 61
COMPRESSION = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}


@dataclass
class Record:
    offset_delta: int
    timestamp_delta: int
    key: bytes | None
    value: bytes | None
    headers: list = field(default_factory=list)  # list of (str key, bytes|None value), order kept


def encode_record(r: Record) -> bytes:
    body = i8(0) + varint(r.timestamp_delta) + varint(r.offset_delta)
    body += varint(-1) if r.key is None else varint(len(r.key)) + r.key
    body += varint(-1) if r.value is None else varint(len(r.value)) + r.value
    body += varint(len(r.headers))
    for hk, hv in r.headers:
        hkb = hk.encode()
        body += varint(len(hkb)) + hkb
        body += varint(-1) if hv is None else varint(len(hv)) + hv
    return varint(len(body)) + body


def build_batch(values, keys=None, base_timestamp=1_700_000_000_000, headers=None,
                producer_id=-1, producer_epoch=-1, base_sequence=-1, attributes=0,
                base_offset=0) -> bytes:
    """Uncompressed RecordBatch v2 with len(values) records, timestamps base+i."""
    recs = []
    for i, v in enumerate(values):
        k = keys[i] if keys else None
        h = headers[i] if headers else []
        recs.append(encode_record(Record(i, i, k, v, h)))
    n = len(values)
    after_crc = (i16(attributes) + i32(n - 1) + i64(base_timestamp) + i64(base_timestamp + n - 1)
                 + i64(producer_id) + i16(producer_epoch) + i32(base_sequence) + i32(n) + b"".join(recs))
    crc = crc32c(after_crc)
    after_len = i32(-1) + i8(2) + u32(crc) + after_crc  # partitionLeaderEpoch, magic, crc, ...
    return i64(base_offset) + i32(len(after_len)) + after_len


@dataclass
class Batch:
    position: int          # byte position inside the scanned buffer / file
    base_offset: int
    length: int            # value of the length field (bytes after it)
    leader_epoch: int
    magic: int
    crc: int
    attributes: int
    last_offset_delta: int
    base_timestamp: int
    max_timestamp: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    record_count: int
    raw: bytes             # whole batch bytes, header included

    @property
    def total_len(self) -> int:
        return 12 + self.length

    @property
    def compression(self) -> int:
        return self.attributes & 0x7

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.last_offset_delta

    def crc_ok(self) -> bool:
        return crc32c(self.raw[21:]) == self.crc

    def records(self) -> list[Record]:
        if self.compression != 0:
            raise ValueError("records() only decodes uncompressed batches")
        r = Reader(self.raw, BATCH_HEADER_LEN)
        out = []
        for _ in range(self.record_count):
            ln = r.varint()
            end = r.p + ln
            r.i8()
            ts = r.varint()
            od = r.varint()
            kl = r.varint()
            k = None if kl < 0 else r._take(kl)
            vl = r.varint()
            v = None if vl < 0 else r._take(vl)
            hs = []
            for _ in range(r.varint()):
                hkl = r.varint()
                hk = r._take(hkl).decode()
                hvl = r.varint()
                hs.append((hk, None if hvl < 0 else r._take(hvl)))
            if r.p != end:
                raise ValueError("record length mismatch")
            out.append(Record(od, ts, k, v, hs))
        return out


def parse_batches(data: bytes, strict: bool = False) -> tuple[list[Batch], int]:
    """Scan consecutive v2 batches. Returns (batches, bytes consumed). A partial trailing batch
    (as Fetch may return, or a torn segment tail) stops the scan; strict=True raises instead."""
    out = []
    pos = 0
    while pos + 12 <= len(data):
        base_offset, length = struct.unpack_from(">qi", data, pos)
        if length < BATCH_HEADER_LEN - 12 or pos + 12 + length > len(data):
            if strict:
                raise ValueError(f"partial/invalid batch at {pos}: length {length}, have {len(data) - pos}")
            break
        h = struct.unpack_from(">qiibIhiqqqhii", data, pos)
        out.append(Batch(pos, h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11],
                         h[12], bytes(data[pos:pos + 12 + length])))
        pos += 12 + length
    if strict and pos != len(data):
        raise ValueError(f"{len(data) - pos} trailing bytes after last batch")
    return out, pos


# --------------------------------------------------------------------------- segment files


def partition_dir(data_dir, topic: str, partition: int) -> Path:
    return Path(data_dir) / f"{topic}-{partition}"


def segment_logs(data_dir, topic: str, partition: int) -> list[Path]:
    d = partition_dir(data_dir, topic, partition)
    return sorted(d.glob("*.log"), key=lambda p: int(p.stem))


def segment_batches(data_dir, topic: str, partition: int) -> list[Batch]:
    """All batches of a partition, in offset order, read from the .log files (strict: no garbage)."""
    out = []
    for f in segment_logs(data_dir, topic, partition):
        assert len(f.stem) == 20 and f.stem.isdigit(), f"segment name not a 20-digit offset: {f.name}"
        bs, _ = parse_batches(f.read_bytes(), strict=True)
        out.extend(bs)
    return out


# --------------------------------------------------------------------------- framing

API_PRODUCE, API_FETCH, API_LIST_OFFSETS, API_METADATA = 0, 1, 2, 3
API_VERSIONS = 18


def request_frame(api_key: int, version: int, corr: int, body: bytes, flexible: bool = False,
                  client_id: str | None = "ferry-e2e") -> bytes:
    hdr = i16(api_key) + i16(version) + i32(corr) + string(client_id)
    if flexible:
        hdr += TAGS
    msg = hdr + body
    return i32(len(msg)) + msg


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionClosed(f"connection closed after {len(buf)}/{n} bytes")
        buf += chunk
    return bytes(buf)


class ConnectionClosed(Exception):
    pass


def recv_frame(sock: socket.socket) -> bytes:
    (n,) = struct.unpack(">i", recv_exact(sock, 4))
    if n < 0 or n > 256 << 20:
        raise ValueError(f"bad response length {n}")
    return recv_exact(sock, n)


def connect(bootstrap: str, timeout: float = 10.0) -> socket.socket:
    host, port = bootstrap.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=timeout)
    s.settimeout(timeout)
    return s


def wait_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Read until the peer closes; returns whatever arrived. Raises TimeoutError if it stays open."""
    sock.settimeout(timeout)
    got = bytearray()
    try:
        while True:
            b = sock.recv(65536)
            if not b:
                return bytes(got)
            got += b
    except ConnectionResetError:
        return bytes(got)
    except socket.timeout:
        raise TimeoutError(f"connection still open after {timeout}s (received {len(got)} bytes)")


class Conn:
    """One connection, one request at a time."""

    def __init__(self, bootstrap: str, timeout: float = 10.0):
        self.sock = connect(bootstrap, timeout)
        self.corr = 0

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def call(self, api_key: int, version: int, body: bytes, flexible_req: bool = False,
             flexible_resp: bool = False) -> Reader:
        self.corr += 1
        self.sock.sendall(request_frame(api_key, version, self.corr, body, flexible_req))
        r = Reader(recv_frame(self.sock))
        corr = r.i32()
        assert corr == self.corr, f"correlation id {corr} != {self.corr}"
        if flexible_resp:
            r.tags()
        return r

    def send_no_response(self, api_key, version, body, flexible_req=False):
        self.corr += 1
        self.sock.sendall(request_frame(api_key, version, self.corr, body, flexible_req))

    # ---- ApiVersions
    def api_versions(self, version: int = 0) -> tuple[int, dict]:
        if version >= 3:
            body = compact_string("ferry-e2e") + compact_string("1.0") + TAGS
            r = self.call(API_VERSIONS, version, body, flexible_req=True)  # response header stays v0
            err = r.i16()
            keys = r.compact_array(lambda r: (r.i16(), r.i16(), r.i16(), r.tags()))
        else:
            r = self.call(API_VERSIONS, version, b"")
            err = r.i16()
            keys = r.array(lambda r: (r.i16(), r.i16(), r.i16()))
        return err, {k[0]: (k[1], k[2]) for k in (keys or [])}

    # ---- Metadata v4
    def metadata(self, topics: list[str] | None, allow_auto_create: bool = False) -> dict:
        body = array(None if topics is None else [string(t) for t in topics]) + i8(1 if allow_auto_create else 0)
        r = self.call(API_METADATA, 4, body)
        r.i32()  # throttle
        brokers = r.array(lambda r: (r.i32(), r.string(), r.i32(), r.string()))
        r.string()  # cluster id
        r.i32()  # controller
        def part(r):
            e, idx, leader = r.i16(), r.i32(), r.i32()
            r.array(lambda r: r.i32())
            r.array(lambda r: r.i32())
            return idx, e, leader
        topics_out = r.array(lambda r: (r.i16(), r.string(), r.i8(), r.array(part)))
        return {"brokers": brokers, "topics": {t[1]: {"error": t[0], "partitions": t[3]} for t in topics_out}}

    # ---- Produce
    def produce(self, topic: str, partition: int, records: bytes, version: int = 7, acks: int = -1,
                timeout_ms: int = 10000) -> tuple[int, int]:
        """Returns (error_code, base_offset)."""
        flexible = version >= 9
        if flexible:
            part = i32(partition) + compact_bytes(records) + TAGS
            body = (compact_string(None) + i16(acks) + i32(timeout_ms)
                    + compact_array([compact_string(topic) + compact_array([part]) + TAGS]) + TAGS)
        else:
            part = i32(partition) + kbytes(records)
            body = string(None) + i16(acks) + i32(timeout_ms) + array([string(topic) + array([part])])
        r = self.call(API_PRODUCE, version, body, flexible_req=flexible, flexible_resp=flexible)

        def rpart(r):
            idx, err, base = r.i32(), r.i16(), r.i64()
            r.i64()  # log append time (v2+)
            if version >= 5:
                r.i64()  # log start offset
            if version >= 8:
                if flexible:
                    r.compact_array(lambda r: (r.i32(), r.compact_string(), r.tags()))
                    r.compact_string()
                    r.tags()
                else:
                    r.array(lambda r: (r.i32(), r.string()))
                    r.string()
            return idx, err, base

        if flexible:
            resp = r.compact_array(lambda r: (r.compact_string(), r.compact_array(rpart), r.tags()))
        else:
            resp = r.array(lambda r: (r.string(), r.array(rpart)))
        assert len(resp) == 1 and resp[0][0] == topic and len(resp[0][1]) == 1, resp
        _, err, base = resp[0][1][0]
        return err, base

    # ---- ListOffsets v1: timestamp -1 latest, -2 earliest
    def list_offset(self, topic: str, partition: int, timestamp: int = -1) -> tuple[int, int]:
        body = i32(-1) + array([string(topic) + array([i32(partition) + i64(timestamp)])])
        r = self.call(API_LIST_OFFSETS, 1, body)
        resp = r.array(lambda r: (r.string(), r.array(lambda r: (r.i32(), r.i16(), r.i64(), r.i64()))))
        _, err, _ts, off = resp[0][1][0]
        return err, off

    # ---- Fetch v4
    def fetch(self, topic: str, partition: int, offset: int, max_bytes: int = 1 << 20,
              max_wait_ms: int = 100) -> tuple[int, int, bytes]:
        """Returns (error_code, high_watermark, records bytes)."""
        body = (i32(-1) + i32(max_wait_ms) + i32(1) + i32(max_bytes) + i8(0)
                + array([string(topic) + array([i32(partition) + i64(offset) + i32(max_bytes)])]))
        r = self.call(API_FETCH, 4, body)
        r.i32()  # throttle

        def rpart(r):
            idx, err, hw, _lso = r.i32(), r.i16(), r.i64(), r.i64()
            r.array(lambda r: (r.i64(), r.i64()))
            return idx, err, hw, r.kbytes() or b""

        resp = r.array(lambda r: (r.string(), r.array(rpart)))
        _, err, hw, recs = resp[0][1][0]
        return err, hw, recs
