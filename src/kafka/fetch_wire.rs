//! Writing a Fetch response so that record bytes go from the page cache to the socket with
//! `sendfile`, never through user space (the zero-copy read path).
//!
//! The crate's encoder needs the records in memory. This writer produces the same bytes, but as
//! pieces: encoded framing in memory, and file ranges for each partition's records, which the
//! connection sends with `sendfile`. It covers the versions the broker serves (4-12) and only the
//! fields the broker sets (the aborted transactions; of the tagged fields, the diverging epoch
//! and the current leader); a test checks it against the crate's encoder byte for byte.

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::fetch_response::FetchResponse;

use crate::log::ReadSlice;

/// One part of a response on the wire.
#[derive(Debug, Clone)]
pub enum Piece {
    Bytes(Bytes),
    File(ReadSlice),
}

impl Piece {
    pub fn len(&self) -> usize {
        match self {
            Piece::Bytes(b) => b.len(),
            Piece::File(s) => s.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn put_uvarint(b: &mut BytesMut, mut v: u32) {
    while v >= 0x80 {
        b.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    b.put_u8(v as u8);
}

/// Encode `resp` (whose `records` fields are ignored) with `records[i][j]` as the records of
/// topic i, partition j: `Some(slice)` sent from the file, `None` as an empty record set.
/// Returns the pieces, the first of which starts with the 4-byte frame length.
pub fn encode(
    correlation_id: i32,
    version: i16,
    resp: &FetchResponse,
    records: &[Vec<Option<ReadSlice>>],
) -> Vec<Piece> {
    let flexible = version >= 12;
    let mut pieces = Vec::new();
    let mut b = BytesMut::with_capacity(256);
    b.put_i32(0); // frame length, patched below
    b.put_i32(correlation_id);
    if flexible {
        b.put_u8(0); // response header tagged fields
    }
    b.put_i32(resp.throttle_time_ms);
    if version >= 7 {
        b.put_i16(resp.error_code);
        b.put_i32(resp.session_id);
    }
    let put_len = |b: &mut BytesMut, n: usize| {
        if flexible {
            put_uvarint(b, n as u32 + 1);
        } else {
            b.put_i32(n as i32);
        }
    };
    put_len(&mut b, resp.responses.len());
    for (ti, t) in resp.responses.iter().enumerate() {
        let name = t.topic.0.as_str().as_bytes();
        if flexible {
            put_uvarint(&mut b, name.len() as u32 + 1);
        } else {
            b.put_i16(name.len() as i16);
        }
        b.put_slice(name);
        put_len(&mut b, t.partitions.len());
        for (pi, p) in t.partitions.iter().enumerate() {
            b.put_i32(p.partition_index);
            b.put_i16(p.error_code);
            b.put_i64(p.high_watermark);
            b.put_i64(p.last_stable_offset);
            if version >= 5 {
                b.put_i64(p.log_start_offset);
            }
            // aborted_transactions: null, or (producer id, first offset) each
            match &p.aborted_transactions {
                None if flexible => put_uvarint(&mut b, 0),
                None => b.put_i32(-1),
                Some(list) => {
                    put_len(&mut b, list.len());
                    for a in list {
                        b.put_i64(a.producer_id.0);
                        b.put_i64(a.first_offset);
                        if flexible {
                            b.put_u8(0);
                        }
                    }
                }
            }
            if version >= 11 {
                b.put_i32(p.preferred_read_replica.0);
            }
            match records.get(ti).and_then(|r| r.get(pi)).cloned().flatten() {
                // No records (an error, or nothing to send): empty, never null, as Kafka sends
                // (librdkafka refuses a null record set: "invalid MessageSetSize -1").
                None => {
                    if flexible {
                        put_uvarint(&mut b, 1);
                    } else {
                        b.put_i32(0);
                    }
                }
                Some(slice) => {
                    if flexible {
                        put_uvarint(&mut b, slice.len as u32 + 1);
                    } else {
                        b.put_i32(slice.len as i32);
                    }
                    if slice.len > 0 {
                        pieces.push(Piece::Bytes(b.split().freeze()));
                        pieces.push(Piece::File(slice));
                    }
                }
            }
            if flexible {
                // Partition tagged fields: the diverging epoch (0) a follower truncates to, and
                // the current leader (1), when set.
                let diverging = p.diverging_epoch.epoch != -1 || p.diverging_epoch.end_offset != -1;
                let leader =
                    p.current_leader.leader_id.0 != -1 || p.current_leader.leader_epoch != -1;
                b.put_u8(u8::from(diverging) + u8::from(leader));
                if diverging {
                    b.put_u8(0);
                    b.put_u8(13);
                    b.put_i32(p.diverging_epoch.epoch);
                    b.put_i64(p.diverging_epoch.end_offset);
                    b.put_u8(0);
                }
                if leader {
                    b.put_u8(1);
                    b.put_u8(9);
                    b.put_i32(p.current_leader.leader_id.0);
                    b.put_i32(p.current_leader.leader_epoch);
                    b.put_u8(0);
                }
            }
        }
        if flexible {
            b.put_u8(0); // topic tagged fields
        }
    }
    if flexible {
        b.put_u8(0); // top-level tagged fields
    }
    pieces.push(Piece::Bytes(b.freeze()));
    let total: usize = pieces.iter().map(Piece::len).sum::<usize>() - 4;
    // The length goes in the first piece's first 4 bytes.
    if let Some(Piece::Bytes(first)) = pieces.first_mut() {
        let mut m = BytesMut::from(&first[..]);
        m[0..4].copy_from_slice(&(total as i32).to_be_bytes());
        *first = m.freeze();
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
    use kafka_protocol::messages::{BrokerId, TopicName};
    use std::io::Write;
    use std::sync::Arc;

    fn flatten(pieces: &[Piece]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in pieces {
            match p {
                Piece::Bytes(b) => out.extend_from_slice(b),
                Piece::File(s) => out.extend_from_slice(&s.read().unwrap()),
            }
        }
        out
    }

    #[test]
    fn matches_the_crate_encoder_for_every_served_version() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let file = Arc::new(f);
        let slice = |pos: u64, len: usize| ReadSlice {
            file: file.clone(),
            position: pos,
            len,
        };
        for version in 4..=12i16 {
            let mut resp = FetchResponse::default();
            if version >= 7 {
                resp.session_id = 0;
                resp.error_code = 0;
            }
            let mut records: Vec<Vec<Option<ReadSlice>>> = Vec::new();
            for (ti, name) in ["alpha", "b"].iter().enumerate() {
                let mut t = FetchableTopicResponse::default();
                t.topic = TopicName(kafka_protocol::protocol::StrBytes::from_static_str(name));
                let mut rs = Vec::new();
                for pi in 0..3 {
                    let mut p = PartitionData::default();
                    p.partition_index = pi;
                    p.high_watermark = 1000 + pi as i64;
                    p.last_stable_offset = 1000 + pi as i64;
                    if version >= 5 {
                        p.log_start_offset = 7;
                    }
                    p.preferred_read_replica = BrokerId(-1);
                    let s = match (ti, pi) {
                        (0, 0) => Some(slice(10, 300)),
                        (0, 1) => Some(slice(0, 0)),
                        (1, 2) => Some(slice(400, 200)),
                        (1, 0) => None,
                        _ => Some(slice(1000, 1)),
                    };
                    if pi == 1 && ti == 1 {
                        p.error_code = 1;
                    }
                    if version >= 12 && pi == 2 {
                        p.diverging_epoch.epoch = 513;
                        p.diverging_epoch.end_offset = 77;
                    }
                    if version >= 12 && ti == 1 {
                        p.current_leader.leader_id = BrokerId(3);
                        p.current_leader.leader_epoch = 768;
                    }
                    // No slice is an empty record set (Kafka's MemoryRecords.EMPTY).
                    p.records = Some(
                        s.as_ref()
                            .map(|s| Bytes::from(s.read().unwrap()))
                            .unwrap_or_default(),
                    );
                    p.aborted_transactions = match pi {
                        0 => None,
                        1 => Some(Vec::new()),
                        _ => Some(
                            (0..2)
                                .map(|i| {
                                    let mut a = kafka_protocol::messages::fetch_response::AbortedTransaction::default();
                                    a.producer_id = kafka_protocol::messages::ProducerId(1000 + i);
                                    a.first_offset = 77 * i;
                                    a
                                })
                                .collect(),
                        ),
                    };
                    rs.push(s);
                    t.partitions.push(p);
                }
                records.push(rs);
                resp.responses.push(t);
            }
            let expected = super::super::encode_response(42, version, &resp).unwrap();
            let got = flatten(&encode(42, version, &resp, &records));
            assert_eq!(got, expected.to_vec(), "fetch v{version}");
        }
    }
}
