//! Frames on a gateway's QUIC streams.
//!
//! A mirrored partition has one bidirectional stream per copy (OPEN, ROUTE, POSITION, ACK,
//! ERROR, TRUNCATE), and each BATCHES frame travels on a unidirectional stream of its own that
//! starts with the ROUTE naming the partition's sink. A lost packet then holds up only the
//! frame it carried: on one shared stream, QUIC would hold every later frame until the lost
//! packet was resent (head-of-line blocking), and on a lossy link that delay would reach most
//! records. The sink puts the frames back in offset order ([`super::core::reorder`]).
//!
//! ```text
//! frame   = length u32 (of kind..crc) | kind u8 | payload | crc u32 (CRC-32, IEEE, of kind+payload)
//! OPEN     (1, source → sink)  topic: u16 length + UTF-8, partition i32, partition_count i32,
//!                              epoch i32: the source's region epoch for the topic
//! POSITION (2, sink → source)  log_end i64: where the mirror ends, so where to resume; then
//!                              count u32 and (epoch i32, start offset i64) per entry: the
//!                              mirror's epoch history, to find where it diverges
//! BATCHES  (3, source → sink)  first_offset i64, then whole Kafka record batches, byte for byte
//! ACK      (4, sink → source)  log_end i64: the mirror holds everything below it on disk
//! ERROR    (5, sink → source)  code i16, log_end i64, message: u16 length + UTF-8
//! OFFSETS  (6, source → sink)  group: u16 length + UTF-8, count u32, then per entry
//!                              topic (u16 length + UTF-8), partition i32, offset i64
//! TRUNCATE (7, source → sink)  offset i64: the mirror's log past it is not in the source's
//!                              history: quarantine it and cut it, then send POSITION again
//! STATE    (8, either way)     sent_at u64 (sender's clock, ms), JSON (failover state, lease
//!                              report, log ends): the heartbeat on a link's control stream
//! STATE_ACK(9, answer)         sent_at u64 echoed
//! BATCHES_SNAPPY (10, source → sink)  first_offset i64, then BATCHES' bytes compressed with
//!                              Snappy (raw format); sent instead of BATCHES for rules with
//!                              `wire_compression = "snappy"` when the client sent the batches
//!                              uncompressed. The sink decompresses and sees the same bytes.
//! ROUTE    (11, sink → source, then source → sink)  id u64: sent by the sink on the partition's
//!                              stream right after it accepts OPEN, before POSITION; the source
//!                              starts every unidirectional BATCHES stream with it, so the sink
//!                              that gave it out (on that same connection) takes the frame
//! ```
//!
//! The CRC catches corruption between the two gateways' processes; each batch also carries its
//! own CRC-32C, which the sink checks before writing anything.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Largest frame accepted.
pub const FRAME_BYTES_MAX: usize = 32 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Open {
        topic: String,
        partition: i32,
        partition_count: i32,
        epoch: i32,
    },
    Position {
        log_end: i64,
        epochs: Vec<crate::log::EpochEntry>,
    },
    Batches {
        first_offset: i64,
        batches: Bytes,
    },
    /// BATCHES compressed on the wire: `batches` holds the uncompressed bytes on both sides.
    SnappyBatches {
        first_offset: i64,
        batches: Bytes,
    },
    Ack {
        log_end: i64,
    },
    Error {
        code: i16,
        log_end: i64,
        message: String,
    },
    /// A consumer group's committed offsets in the source region.
    Offsets {
        group: String,
        entries: Vec<(String, i32, i64)>,
    },
    /// Cut the mirror back to `offset` (its tail there diverged), quarantining what is cut.
    Truncate {
        offset: i64,
    },
    /// A heartbeat carrying the sender's failover state (JSON).
    State {
        sent_at: u64,
        json: String,
    },
    StateAck {
        sent_at: u64,
    },
    /// Names a partition's sink: the first frame of every BATCHES stream.
    Route {
        id: u64,
    },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes is out of range")]
    Length(usize),
    #[error("frame checksum mismatch")]
    Crc,
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("truncated {0} frame")]
    Truncated(&'static str),
    #[error("bad Snappy payload: {0}")]
    Snappy(String),
}

fn put_str(b: &mut BytesMut, s: &str) {
    let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    b.put_u16(s.len() as u16);
    b.put_slice(s);
}

fn get_str(b: &mut Bytes, what: &'static str) -> Result<String, FrameError> {
    if b.remaining() < 2 {
        return Err(FrameError::Truncated(what));
    }
    let n = b.get_u16() as usize;
    if b.remaining() < n {
        return Err(FrameError::Truncated(what));
    }
    Ok(String::from_utf8_lossy(&b.split_to(n)).into_owned())
}

impl Frame {
    /// The frame with its length prefix.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(64);
        b.put_u32(0);
        match self {
            Frame::Open {
                topic,
                partition,
                partition_count,
                epoch,
            } => {
                b.put_u8(1);
                put_str(&mut b, topic);
                b.put_i32(*partition);
                b.put_i32(*partition_count);
                b.put_i32(*epoch);
            }
            Frame::Position { log_end, epochs } => {
                b.put_u8(2);
                b.put_i64(*log_end);
                b.put_u32(epochs.len() as u32);
                for e in epochs {
                    b.put_i32(e.epoch);
                    b.put_i64(e.start_offset);
                }
            }
            Frame::Truncate { offset } => {
                b.put_u8(7);
                b.put_i64(*offset);
            }
            Frame::State { sent_at, json } => {
                b.reserve(json.len() + 16);
                b.put_u8(8);
                b.put_u64(*sent_at);
                b.put_slice(json.as_bytes());
            }
            Frame::StateAck { sent_at } => {
                b.put_u8(9);
                b.put_u64(*sent_at);
            }
            Frame::Route { id } => {
                b.put_u8(11);
                b.put_u64(*id);
            }
            Frame::Batches {
                first_offset,
                batches,
            } => {
                b.reserve(batches.len() + 16);
                b.put_u8(3);
                b.put_i64(*first_offset);
                b.put_slice(batches);
            }
            Frame::SnappyBatches {
                first_offset,
                batches,
            } => {
                let packed = snap::raw::Encoder::new()
                    .compress_vec(batches)
                    .expect("snappy takes any input under 4 GiB");
                b.reserve(packed.len() + 16);
                b.put_u8(10);
                b.put_i64(*first_offset);
                b.put_slice(&packed);
            }
            Frame::Ack { log_end } => {
                b.put_u8(4);
                b.put_i64(*log_end);
            }
            Frame::Error {
                code,
                log_end,
                message,
            } => {
                b.put_u8(5);
                b.put_i16(*code);
                b.put_i64(*log_end);
                put_str(&mut b, message);
            }
            Frame::Offsets { group, entries } => {
                b.put_u8(6);
                put_str(&mut b, group);
                b.put_u32(entries.len() as u32);
                for (t, p, o) in entries {
                    put_str(&mut b, t);
                    b.put_i32(*p);
                    b.put_i64(*o);
                }
            }
        }
        let crc = crc32fast::hash(&b[4..]);
        b.put_u32(crc);
        let n = (b.len() - 4) as u32;
        b[0..4].copy_from_slice(&n.to_be_bytes());
        b.freeze()
    }

    /// Decode a frame body (after the length prefix).
    pub fn decode(mut body: Bytes) -> Result<Frame, FrameError> {
        if body.len() < 5 || body.len() > FRAME_BYTES_MAX {
            return Err(FrameError::Length(body.len()));
        }
        let crc_at = body.len() - 4;
        let crc = u32::from_be_bytes(body[crc_at..].try_into().expect("4 bytes"));
        if crc32fast::hash(&body[..crc_at]) != crc {
            return Err(FrameError::Crc);
        }
        body.truncate(crc_at);
        let kind = body.get_u8();
        let need = |b: &Bytes, n: usize, what| {
            if b.remaining() < n {
                Err(FrameError::Truncated(what))
            } else {
                Ok(())
            }
        };
        Ok(match kind {
            1 => {
                let topic = get_str(&mut body, "OPEN")?;
                need(&body, 12, "OPEN")?;
                Frame::Open {
                    topic,
                    partition: body.get_i32(),
                    partition_count: body.get_i32(),
                    epoch: body.get_i32(),
                }
            }
            2 => {
                need(&body, 12, "POSITION")?;
                let log_end = body.get_i64();
                let n = body.get_u32() as usize;
                need(&body, n.saturating_mul(12), "POSITION")?;
                let epochs = (0..n)
                    .map(|_| crate::log::EpochEntry {
                        epoch: body.get_i32(),
                        start_offset: body.get_i64(),
                    })
                    .collect();
                Frame::Position { log_end, epochs }
            }
            7 => {
                need(&body, 8, "TRUNCATE")?;
                Frame::Truncate {
                    offset: body.get_i64(),
                }
            }
            8 => {
                need(&body, 8, "STATE")?;
                let sent_at = body.get_u64();
                Frame::State {
                    sent_at,
                    json: String::from_utf8_lossy(&body).into_owned(),
                }
            }
            9 => {
                need(&body, 8, "STATE_ACK")?;
                Frame::StateAck {
                    sent_at: body.get_u64(),
                }
            }
            11 => {
                need(&body, 8, "ROUTE")?;
                Frame::Route { id: body.get_u64() }
            }
            3 => {
                need(&body, 8, "BATCHES")?;
                let first_offset = body.get_i64();
                Frame::Batches {
                    first_offset,
                    batches: body,
                }
            }
            10 => {
                need(&body, 8, "BATCHES_SNAPPY")?;
                let first_offset = body.get_i64();
                // Never allocate more than a frame may hold, whatever the header claims.
                let n = snap::raw::decompress_len(&body)
                    .map_err(|e| FrameError::Snappy(e.to_string()))?;
                if n > FRAME_BYTES_MAX {
                    return Err(FrameError::Snappy(format!("{n} bytes uncompressed")));
                }
                let batches = snap::raw::Decoder::new()
                    .decompress_vec(&body)
                    .map_err(|e| FrameError::Snappy(e.to_string()))?;
                Frame::SnappyBatches {
                    first_offset,
                    batches: Bytes::from(batches),
                }
            }
            4 => {
                need(&body, 8, "ACK")?;
                Frame::Ack {
                    log_end: body.get_i64(),
                }
            }
            5 => {
                need(&body, 10, "ERROR")?;
                let code = body.get_i16();
                let log_end = body.get_i64();
                Frame::Error {
                    code,
                    log_end,
                    message: get_str(&mut body, "ERROR")?,
                }
            }
            6 => {
                let group = get_str(&mut body, "OFFSETS")?;
                need(&body, 4, "OFFSETS")?;
                let n = body.get_u32() as usize;
                // Each entry takes at least 14 bytes: never allocate from the count alone.
                let mut entries = Vec::with_capacity(n.min(body.remaining() / 14));
                for _ in 0..n {
                    let t = get_str(&mut body, "OFFSETS")?;
                    need(&body, 12, "OFFSETS")?;
                    entries.push((t, body.get_i32(), body.get_i64()));
                }
                Frame::Offsets { group, entries }
            }
            k => return Err(FrameError::Kind(k)),
        })
    }
}

/// Read one frame from a QUIC receive stream (`None` at a clean end of stream).
pub async fn read(rx: &mut quinn::RecvStream) -> Result<Option<Frame>, std::io::Error> {
    let mut len = [0u8; 4];
    match rx.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(std::io::Error::other(e.to_string())),
    }
    let n = u32::from_be_bytes(len) as usize;
    if !(5..=FRAME_BYTES_MAX).contains(&n) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            FrameError::Length(n),
        ));
    }
    let mut body = vec![0u8; n];
    rx.read_exact(&mut body)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Frame::decode(Bytes::from(body))
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// What [`read_or_end`] found on a stream that may stop anywhere.
#[derive(Debug)]
pub enum Read {
    Frame(Frame),
    /// The stream ended cleanly before a frame began.
    End,
    /// The stream stopped inside a frame, was reset, or its connection was lost.
    CutShort,
}

/// Read one frame, telling a stream that was cut short (its sender stopped mid-way, or the
/// connection went) from one that carried a bad frame (the `Err`).
pub async fn read_or_end(rx: &mut quinn::RecvStream) -> Result<Read, FrameError> {
    let mut len = [0u8; 4];
    match rx.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(Read::End),
        Err(_) => return Ok(Read::CutShort),
    }
    let n = u32::from_be_bytes(len) as usize;
    if !(5..=FRAME_BYTES_MAX).contains(&n) {
        return Err(FrameError::Length(n));
    }
    let mut body = vec![0u8; n];
    if rx.read_exact(&mut body).await.is_err() {
        return Ok(Read::CutShort);
    }
    Frame::decode(Bytes::from(body)).map(Read::Frame)
}

/// What [`parse_at`] found.
#[derive(Debug)]
pub enum Parsed {
    /// A frame, and the byte after it.
    Frame(Frame, usize),
    /// The bytes end where a frame would begin.
    End,
    /// The bytes end inside a frame.
    CutShort,
}

/// The frame at byte `at` of `b` (a stream read whole into memory), with the same checks as
/// [`read_or_end`].
pub fn parse_at(b: &Bytes, at: usize) -> Result<Parsed, FrameError> {
    if at >= b.len() {
        return Ok(Parsed::End);
    }
    if b.len() - at < 4 {
        return Ok(Parsed::CutShort);
    }
    let n = u32::from_be_bytes(b[at..at + 4].try_into().expect("four bytes")) as usize;
    if !(5..=FRAME_BYTES_MAX).contains(&n) {
        return Err(FrameError::Length(n));
    }
    if b.len() - at - 4 < n {
        return Ok(Parsed::CutShort);
    }
    Frame::decode(b.slice(at + 4..at + 4 + n)).map(|f| Parsed::Frame(f, at + 4 + n))
}

/// Write one frame to a QUIC send stream.
pub async fn write(tx: &mut quinn::SendStream, f: &Frame) -> Result<(), std::io::Error> {
    tx.write_all(&f.encode())
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_frame_round_trips_and_corruption_is_caught() {
        let frames = vec![
            Frame::Open {
                topic: "orders".into(),
                partition: 2,
                partition_count: 6,
                epoch: 3,
            },
            Frame::Position {
                log_end: 77,
                epochs: vec![
                    crate::log::EpochEntry {
                        epoch: 0,
                        start_offset: 0,
                    },
                    crate::log::EpochEntry {
                        epoch: 3,
                        start_offset: 70,
                    },
                ],
            },
            Frame::Truncate { offset: 70 },
            Frame::State {
                sent_at: 123,
                json: "{}".into(),
            },
            Frame::StateAck { sent_at: 123 },
            Frame::Route { id: u64::MAX - 3 },
            Frame::Batches {
                first_offset: 77,
                batches: Bytes::from_static(b"some batches"),
            },
            Frame::SnappyBatches {
                first_offset: 77,
                batches: Bytes::from(b"some batches ".repeat(100)),
            },
            Frame::Ack { log_end: 90 },
            Frame::Error {
                code: 1,
                log_end: 5,
                message: "gap".into(),
            },
            Frame::Offsets {
                group: "g".into(),
                entries: vec![("t".into(), 0, 5), ("u".into(), 3, 9)],
            },
        ];
        for f in frames {
            let e = f.encode();
            assert_eq!(Frame::decode(e.slice(4..)).unwrap(), f);
            let mut bad = e.slice(4..).to_vec();
            bad[1] ^= 1;
            assert_eq!(Frame::decode(Bytes::from(bad)), Err(FrameError::Crc));
        }
    }

    #[test]
    fn a_bad_snappy_payload_is_an_error_not_a_panic_or_a_huge_allocation() {
        let frame = |payload: &[u8]| {
            let mut body = vec![10u8];
            body.extend_from_slice(&7i64.to_be_bytes());
            body.extend_from_slice(payload);
            let crc = crc32fast::hash(&body);
            body.extend_from_slice(&crc.to_be_bytes());
            Frame::decode(Bytes::from(body))
        };
        assert!(matches!(frame(b"\xff\xff\xff"), Err(FrameError::Snappy(_))));
        // A header claiming 1 GiB uncompressed.
        assert!(matches!(
            frame(b"\x80\x80\x80\x80\x04abc"),
            Err(FrameError::Snappy(_))
        ));
        let f = Frame::SnappyBatches {
            first_offset: 7,
            batches: Bytes::from(vec![0u8; 10_000]),
        };
        assert!(f.encode().len() < 1_000, "zeros compress");
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..100)) {
            let _ = Frame::decode(Bytes::from(data));
        }
    }
}
