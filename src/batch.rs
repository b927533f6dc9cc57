//! Kafka RecordBatch v2 headers: parsing, validation and the two fields a broker may rewrite.
//!
//! Owns: the 61-byte batch header layout, CRC-32C validation, splitting a byte buffer into
//! whole batches. Does not own: record decoding (the broker never decodes or re-encodes the
//! records inside a batch; they are stored and shipped as the client sent them, compressed or
//! not) or where batches are stored (see [`crate::log`]).
//!
//! Layout (big-endian), as in Kafka's `DefaultRecordBatch`:
//!
//! ```text
//! 0  baseOffset i64          <- set by the broker (outside the CRC)
//! 8  length i32              (bytes after this field)
//! 12 partitionLeaderEpoch i32 <- set by the broker (outside the CRC): Ferry's region epoch
//! 16 magic i8 (= 2)
//! 17 crc u32                 CRC-32C over bytes [21, end)
//! 21 attributes i16
//! 23 lastOffsetDelta i32
//! 27 baseTimestamp i64
//! 35 maxTimestamp i64
//! 43 producerId i64
//! 51 producerEpoch i16
//! 53 baseSequence i32
//! 57 recordCount i32
//! 61 records...
//! ```

use thiserror::Error;

/// The attributes bit of a transactional batch.
pub const TRANSACTIONAL: i16 = 0x10;
/// The attributes bit of a control batch.
pub const CONTROL: i16 = 0x20;

/// Size of the v2 batch header.
pub const HEADER_BYTES: usize = 61;
/// Bytes before the `length` field's count starts (baseOffset + length).
pub const LOG_OVERHEAD: usize = 12;
/// Offset of the first byte covered by the CRC.
const CRC_START: usize = 21;

/// Compression codec, the low three bits of the attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

/// Why a byte range is not a valid batch.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("batch truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("batch length field {0} is out of range")]
    BadLength(i32),
    #[error("unsupported record batch magic {0} (only v2 is accepted)")]
    BadMagic(i8),
    #[error("batch CRC mismatch: header says {expected:#010x}, bytes give {actual:#010x}")]
    BadCrc { expected: u32, actual: u32 },
    #[error("batch record count {count} disagrees with last offset delta {last_offset_delta}")]
    BadCount { count: i32, last_offset_delta: i32 },
    #[error("unknown compression codec {0}")]
    BadCompression(i16),
}

/// The parsed header of one v2 record batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    /// Value of the length field: bytes after offset 12.
    pub length: i32,
    pub partition_leader_epoch: i32,
    pub magic: i8,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub record_count: i32,
}

fn be_i64(b: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn be_i32(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

impl BatchHeader {
    /// Parse the header at the start of `buf` (which must hold at least [`HEADER_BYTES`]).
    /// Checks only what the header itself can tell: magic and length range.
    pub fn parse(buf: &[u8]) -> Result<BatchHeader, BatchError> {
        if buf.len() < HEADER_BYTES {
            return Err(BatchError::Truncated {
                need: HEADER_BYTES,
                have: buf.len(),
            });
        }
        let magic = buf[16] as i8;
        let length = be_i32(buf, 8);
        if magic != 2 {
            return Err(BatchError::BadMagic(magic));
        }
        if (length as i64) < (HEADER_BYTES - LOG_OVERHEAD) as i64 {
            return Err(BatchError::BadLength(length));
        }
        Ok(BatchHeader {
            base_offset: be_i64(buf, 0),
            length,
            partition_leader_epoch: be_i32(buf, 12),
            magic,
            crc: u32::from_be_bytes(buf[17..21].try_into().expect("4 bytes")),
            attributes: be_i16(buf, 21),
            last_offset_delta: be_i32(buf, 23),
            base_timestamp: be_i64(buf, 27),
            max_timestamp: be_i64(buf, 35),
            producer_id: be_i64(buf, 43),
            producer_epoch: be_i16(buf, 51),
            base_sequence: be_i32(buf, 53),
            record_count: be_i32(buf, 57),
        })
    }

    /// Total size of the batch on the wire and on disk.
    pub fn total_bytes(&self) -> usize {
        self.length as usize + LOG_OVERHEAD
    }

    /// Offset of the last record in the batch.
    pub fn last_offset(&self) -> i64 {
        self.base_offset + self.last_offset_delta as i64
    }

    /// The next offset after this batch.
    pub fn next_offset(&self) -> i64 {
        self.last_offset() + 1
    }

    pub fn compression(&self) -> Result<Compression, BatchError> {
        Ok(match self.attributes & 0x07 {
            0 => Compression::None,
            1 => Compression::Gzip,
            2 => Compression::Snappy,
            3 => Compression::Lz4,
            4 => Compression::Zstd,
            _ => return Err(BatchError::BadCompression(self.attributes)),
        })
    }

    /// Timestamp type bit: log append time rather than create time.
    pub fn is_log_append_time(&self) -> bool {
        self.attributes & 0x08 != 0
    }

    pub fn is_transactional(&self) -> bool {
        self.attributes & 0x10 != 0
    }

    pub fn is_control(&self) -> bool {
        self.attributes & 0x20 != 0
    }

    pub fn has_producer_id(&self) -> bool {
        self.producer_id >= 0
    }
}

/// Check one whole batch: header, that `buf` is exactly the batch, the CRC and the counts.
pub fn validate(buf: &[u8]) -> Result<BatchHeader, BatchError> {
    let h = BatchHeader::parse(buf)?;
    if buf.len() != h.total_bytes() {
        return Err(BatchError::Truncated {
            need: h.total_bytes(),
            have: buf.len(),
        });
    }
    let actual = crc32c::crc32c(&buf[CRC_START..]);
    if actual != h.crc {
        return Err(BatchError::BadCrc {
            expected: h.crc,
            actual,
        });
    }
    h.compression()?;
    // A batch with records has last_offset_delta = count - 1 when written by a client; an empty
    // batch (count 0, left by compaction) is legal too. Reject only what cannot be right.
    if h.record_count < 0 || h.last_offset_delta < 0 || h.record_count > h.last_offset_delta + 1 {
        return Err(BatchError::BadCount {
            count: h.record_count,
            last_offset_delta: h.last_offset_delta,
        });
    }
    Ok(h)
}

/// Overwrite the base offset (bytes 0..8). Outside the CRC, so the batch stays valid.
pub fn set_base_offset(buf: &mut [u8], base_offset: i64) {
    buf[0..8].copy_from_slice(&base_offset.to_be_bytes());
}

/// Overwrite the partition leader epoch (bytes 12..16). Outside the CRC.
pub fn set_partition_leader_epoch(buf: &mut [u8], epoch: i32) {
    buf[12..16].copy_from_slice(&epoch.to_be_bytes());
}

/// The whole batches at the start of `buf` (a Fetch answer's records, which may end in a
/// partial batch): each one's byte range and header, up to the first partial or unparsable
/// one. Nothing is CRC-checked here ([`split`] and [`validate`] do that).
pub fn whole_batches(
    buf: &[u8],
) -> impl Iterator<Item = (std::ops::Range<usize>, BatchHeader)> + '_ {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at + HEADER_BYTES > buf.len() {
            return None;
        }
        let h = BatchHeader::parse(&buf[at..]).ok()?;
        let n = h.total_bytes();
        if n == 0 || at + n > buf.len() {
            return None;
        }
        let range = at..at + n;
        at += n;
        Some((range, h))
    })
}

/// Split a records blob (as sent in a Produce request) into whole, valid batches.
/// Returns the byte ranges and headers, or the first error.
pub fn split(buf: &[u8]) -> Result<Vec<(std::ops::Range<usize>, BatchHeader)>, BatchError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < buf.len() {
        let rest = &buf[at..];
        let h = BatchHeader::parse(rest)?;
        let n = h.total_bytes();
        if rest.len() < n {
            return Err(BatchError::Truncated {
                need: n,
                have: rest.len(),
            });
        }
        let h = validate(&rest[..n])?;
        out.push((at..at + n, h));
        at += n;
    }
    Ok(out)
}

/// One record of an uncompressed batch, borrowed from the batch bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordView<'a> {
    pub offset: i64,
    pub timestamp: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    /// Headers in order; duplicate keys are kept (they are legal in Kafka).
    pub headers: Vec<(&'a [u8], Option<&'a [u8]>)>,
}

fn get_varint(buf: &[u8], at: &mut usize) -> Result<i64, BatchError> {
    let mut z: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*at).ok_or(BatchError::Truncated {
            need: *at + 1,
            have: buf.len(),
        })?;
        *at += 1;
        z |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            return Ok(((z >> 1) as i64) ^ -((z & 1) as i64));
        }
    }
    Err(BatchError::BadLength(-1))
}

fn get_bytes<'a>(buf: &'a [u8], at: &mut usize) -> Result<Option<&'a [u8]>, BatchError> {
    let n = get_varint(buf, at)?;
    if n < 0 {
        return Ok(None);
    }
    let end = at
        .checked_add(n as usize)
        .filter(|e| *e <= buf.len())
        .ok_or(BatchError::Truncated {
            need: *at + n as usize,
            have: buf.len(),
        })?;
    let s = &buf[*at..end];
    *at = end;
    Ok(Some(s))
}

/// The records of one whole, uncompressed batch (the broker's own internal topics write only
/// such batches). Compressed batches are refused: the broker never decompresses client data.
pub fn records(batch: &[u8]) -> Result<Vec<RecordView<'_>>, BatchError> {
    let h = validate(batch)?;
    if h.compression()? != Compression::None {
        return Err(BatchError::BadCompression(h.attributes));
    }
    records_in(&h, &batch[HEADER_BYTES..])
}

/// Parse the (uncompressed) records section of a batch whose header is `h`.
pub fn records_in<'a>(h: &BatchHeader, body: &'a [u8]) -> Result<Vec<RecordView<'a>>, BatchError> {
    Ok(record_spans(h, body)?.into_iter().map(|(_, r)| r).collect())
}

/// Like [`records_in`], with each record's byte range in `body` (its length prefix included).
/// A record's bytes hold its offset and timestamp as deltas from the batch's base offset and
/// base timestamp, so they stay valid in any batch with the same bases: the log cleaner builds
/// a compacted batch from the ranges it keeps.
pub fn record_spans<'a>(
    h: &BatchHeader,
    body: &'a [u8],
) -> Result<Vec<(std::ops::Range<usize>, RecordView<'a>)>, BatchError> {
    let mut at = 0;
    let mut out = Vec::new();
    for _ in 0..h.record_count {
        let from = at;
        let len = get_varint(body, &mut at)?;
        let end = at + len.max(0) as usize;
        if end > body.len() {
            return Err(BatchError::Truncated {
                need: end,
                have: body.len(),
            });
        }
        let rec = &body[..end];
        at += 1; // attributes
        let ts_delta = get_varint(rec, &mut at)?;
        let off_delta = get_varint(rec, &mut at)?;
        let key = get_bytes(rec, &mut at)?;
        let value = get_bytes(rec, &mut at)?;
        let nh = get_varint(rec, &mut at)?;
        let mut headers = Vec::new();
        for _ in 0..nh.max(0) {
            let k = get_bytes(rec, &mut at)?.unwrap_or_default();
            let v = get_bytes(rec, &mut at)?;
            headers.push((k, v));
        }
        at = end;
        out.push((
            from..end,
            RecordView {
                offset: h.base_offset + off_delta,
                timestamp: h.base_timestamp + ts_delta,
                key,
                value,
                headers,
            },
        ));
    }
    Ok(out)
}

/// The records section of a whole batch, decompressed when the batch is compressed. Used where
/// a single record must be found (ListOffsets by timestamp) or shown (`ferry consume`); stored
/// and shipped batches are never rewritten.
pub fn plain_records(batch: &[u8]) -> Result<(BatchHeader, bytes::Bytes), BatchError> {
    use bytes::Buf;
    use kafka_protocol::compression::{Decompressor, Gzip, Lz4, Snappy, Zstd};
    let h = validate(batch)?;
    let body = bytes::Bytes::copy_from_slice(&batch[HEADER_BYTES..]);
    let take = |buf: &mut bytes::Bytes| -> anyhow::Result<bytes::Bytes> {
        Ok(buf.copy_to_bytes(buf.remaining()))
    };
    let mut b = body.clone();
    let plain = match h.compression()? {
        Compression::None => Ok(body),
        Compression::Gzip => Gzip::decompress(&mut b, take),
        Compression::Snappy => Snappy::decompress(&mut b, take),
        Compression::Lz4 => Lz4::decompress(&mut b, take),
        Compression::Zstd => Zstd::decompress(&mut b, take),
    }
    .map_err(|_| BatchError::BadCompression(h.attributes))?;
    Ok((h, plain))
}

/// The batch `original` holding only `records` instead (its plain record bytes, whole records
/// cut from it by [`record_spans`]), `count` of them, newest timestamp `max_timestamp`: same
/// base offset, last offset delta, leader epoch, attributes, producer fields and base
/// timestamp, the records compressed again with the batch's codec, a new CRC. Only the log
/// cleaner builds batches from client records, and only this way.
pub fn rebuilt(
    original: &[u8],
    records: &[u8],
    count: i32,
    max_timestamp: i64,
) -> Result<Vec<u8>, BatchError> {
    use bytes::BufMut;
    use kafka_protocol::compression::{Compressor, Gzip, Lz4, Snappy, Zstd};
    let h = BatchHeader::parse(original)?;
    let put = |out: &mut bytes::BytesMut| -> anyhow::Result<()> {
        out.put_slice(records);
        Ok(())
    };
    let mut body = bytes::BytesMut::new();
    match h.compression()? {
        Compression::None => put(&mut body),
        Compression::Gzip => Gzip::compress(&mut body, put),
        Compression::Snappy => Snappy::compress(&mut body, put),
        Compression::Lz4 => Lz4::compress(&mut body, put),
        Compression::Zstd => Zstd::compress(&mut body, put),
    }
    .map_err(|_| BatchError::BadCompression(h.attributes))?;
    let mut b = Vec::with_capacity(HEADER_BYTES + body.len());
    b.extend_from_slice(&original[..HEADER_BYTES]);
    b.extend_from_slice(&body);
    let length = (b.len() - LOG_OVERHEAD) as i32;
    b[8..12].copy_from_slice(&length.to_be_bytes());
    b[35..43].copy_from_slice(&max_timestamp.to_be_bytes());
    b[57..61].copy_from_slice(&count.to_be_bytes());
    let crc = crc32c::crc32c(&b[CRC_START..]);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    Ok(b)
}

/// The first record at or after `timestamp` in a whole batch: (offset, timestamp).
pub fn first_record_at_or_after(batch: &[u8], timestamp: i64) -> Option<(i64, i64)> {
    let (h, plain) = plain_records(batch).ok()?;
    if h.is_log_append_time() {
        return Some((h.base_offset, h.max_timestamp));
    }
    records_in(&h, &plain)
        .ok()?
        .into_iter()
        .find(|r| r.timestamp >= timestamp)
        .map(|r| (r.offset, r.timestamp))
}

/// Build a v2 batch from raw record bodies, uncompressed. Used by tests, the built-in client and
/// internal topics; never for data a client sent.
pub mod build {
    use super::*;

    /// One record to encode.
    #[derive(Debug, Clone, Default)]
    pub struct Record {
        pub key: Option<Vec<u8>>,
        pub value: Option<Vec<u8>>,
        pub headers: Vec<(String, Option<Vec<u8>>)>,
        pub timestamp_delta: i64,
    }

    fn put_varint(out: &mut Vec<u8>, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        while z >= 0x80 {
            out.push((z as u8) | 0x80);
            z >>= 7;
        }
        out.push(z as u8);
    }

    fn put_bytes(out: &mut Vec<u8>, b: Option<&[u8]>) {
        match b {
            None => put_varint(out, -1),
            Some(b) => {
                put_varint(out, b.len() as i64);
                out.extend_from_slice(b);
            }
        }
    }

    /// Encode an uncompressed batch. `producer` is (id, epoch, base sequence) or None.
    pub fn batch(
        base_offset: i64,
        base_timestamp: i64,
        producer: Option<(i64, i16, i32)>,
        records: &[Record],
    ) -> Vec<u8> {
        let mut body = Vec::new();
        let mut max_ts = base_timestamp;
        for (i, r) in records.iter().enumerate() {
            let mut rec = Vec::new();
            rec.push(0u8); // attributes
            put_varint(&mut rec, r.timestamp_delta);
            put_varint(&mut rec, i as i64);
            put_bytes(&mut rec, r.key.as_deref());
            put_bytes(&mut rec, r.value.as_deref());
            put_varint(&mut rec, r.headers.len() as i64);
            for (k, v) in &r.headers {
                put_bytes(&mut rec, Some(k.as_bytes()));
                put_bytes(&mut rec, v.as_deref());
            }
            put_varint(&mut body, rec.len() as i64);
            body.extend_from_slice(&rec);
            max_ts = max_ts.max(base_timestamp + r.timestamp_delta);
        }
        let (pid, pepoch, seq) = producer.unwrap_or((-1, -1, -1));
        let mut b = Vec::with_capacity(HEADER_BYTES + body.len());
        b.extend_from_slice(&base_offset.to_be_bytes());
        b.extend_from_slice(&((HEADER_BYTES - LOG_OVERHEAD + body.len()) as i32).to_be_bytes());
        b.extend_from_slice(&0i32.to_be_bytes());
        b.push(2);
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&(records.len().max(1) as i32 - 1).to_be_bytes());
        b.extend_from_slice(&base_timestamp.to_be_bytes());
        b.extend_from_slice(&max_ts.to_be_bytes());
        b.extend_from_slice(&pid.to_be_bytes());
        b.extend_from_slice(&pepoch.to_be_bytes());
        b.extend_from_slice(&seq.to_be_bytes());
        b.extend_from_slice(&(records.len() as i32).to_be_bytes());
        b.extend_from_slice(&body);
        let crc = crc32c::crc32c(&b[CRC_START..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        b
    }

    /// `b` (a built batch) with its attributes set to `attributes`, its CRC computed again.
    pub fn with_attributes(mut b: Vec<u8>, attributes: i16) -> Vec<u8> {
        b[21..23].copy_from_slice(&attributes.to_be_bytes());
        let crc = crc32c::crc32c(&b[CRC_START..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        b
    }

    /// A batch of plain values, one record each, for tests.
    pub fn values(base_timestamp: i64, values: &[&[u8]]) -> Vec<u8> {
        let recs: Vec<Record> = values
            .iter()
            .map(|v| Record {
                value: Some(v.to_vec()),
                ..Default::default()
            })
            .collect();
        batch(0, base_timestamp, None, &recs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_batch_validates_and_offsets_are_outside_the_crc() {
        let mut b = build::values(1000, &[b"a", b"bb", b"ccc"]);
        let h = validate(&b).unwrap();
        assert_eq!(h.record_count, 3);
        assert_eq!(h.last_offset_delta, 2);
        assert_eq!(h.compression().unwrap(), Compression::None);
        set_base_offset(&mut b, 42);
        set_partition_leader_epoch(&mut b, 7);
        let h = validate(&b).unwrap();
        assert_eq!(h.base_offset, 42);
        assert_eq!(h.partition_leader_epoch, 7);
        assert_eq!(h.next_offset(), 45);
    }

    #[test]
    fn corrupt_crc_is_rejected() {
        let mut b = build::values(1000, &[b"hello"]);
        let n = b.len();
        b[n - 1] ^= 0xff;
        assert!(matches!(validate(&b), Err(BatchError::BadCrc { .. })));
    }

    #[test]
    fn split_finds_each_batch_and_rejects_a_torn_one() {
        let a = build::values(1, &[b"x"]);
        let b = build::values(2, &[b"y", b"z"]);
        let mut all = a.clone();
        all.extend_from_slice(&b);
        let parts = split(&all).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1].0, a.len()..all.len());
        all.truncate(all.len() - 3);
        assert!(matches!(split(&all), Err(BatchError::Truncated { .. })));
    }

    #[test]
    fn whole_batches_stops_at_a_partial_batch() {
        let a = build::values(1, &[b"x"]);
        let b = build::values(2, &[b"y", b"z"]);
        let mut all = a.clone();
        all.extend_from_slice(&b);
        let ranges: Vec<_> = whole_batches(&all).map(|(r, _)| r).collect();
        assert_eq!(ranges, vec![0..a.len(), a.len()..all.len()]);
        // A Fetch answer cut inside the second batch, then inside its header.
        assert_eq!(whole_batches(&all[..all.len() - 1]).count(), 1);
        assert_eq!(whole_batches(&all[..a.len() + 10]).count(), 1);
        assert_eq!(whole_batches(&[]).count(), 0);
    }

    #[test]
    fn records_round_trip_with_duplicate_header_keys() {
        let recs = vec![
            build::Record {
                key: Some(b"k".to_vec()),
                value: Some(b"v".to_vec()),
                headers: vec![("h".into(), Some(b"1".to_vec())), ("h".into(), None)],
                timestamp_delta: 5,
            },
            build::Record {
                key: None,
                value: None,
                ..Default::default()
            },
        ];
        let mut b = build::batch(0, 100, None, &recs);
        set_base_offset(&mut b, 10);
        let r = records(&b).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].offset, 10);
        assert_eq!(r[0].timestamp, 105);
        assert_eq!(r[0].key, Some(&b"k"[..]));
        assert_eq!(
            r[0].headers,
            vec![(&b"h"[..], Some(&b"1"[..])), (&b"h"[..], None)]
        );
        assert_eq!(r[1].offset, 11);
        assert_eq!(r[1].value, None);
    }

    proptest::proptest! {
        #[test]
        fn split_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = split(&data);
        }
    }
}
