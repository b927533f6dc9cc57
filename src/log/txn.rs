//! The transactions in one partition's log: which producers have a transaction open here and
//! from which offset (so the last stable offset), and which transactions were aborted (Kafka's
//! transaction index, `.txnindex`), in step with every batch the log takes.
//!
//! Owns: the rules that turn batch headers and control markers into that state, truncation and
//! log-start pruning of it, and its snapshot format. Does not own: the files (the log writes the
//! snapshot at each segment roll and scans from it on open, see [`super::PartitionLog`]) or
//! who may write a transactional batch (the broker's producer state and the coordinator).
//!
//! Kafka's rules: a transactional data batch of producer P opens P's transaction here at its
//! base offset unless one is open; a control batch of P (COMMIT or ABORT) closes it at the
//! marker's offset, and an aborted one is indexed as (P, first offset, marker offset) so a
//! `read_committed` consumer can drop its batches. The last stable offset is the first offset
//! of the earliest open transaction (or the high watermark).

use std::collections::BTreeMap;

use crate::batch::{self, BatchHeader};

/// The snapshot file, in a partition's directory.
pub const SNAPSHOT_FILE: &str = "txn-snapshot";

/// The type of a control batch's marker (its record key: version i16, type i16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    Abort,
    Commit,
}

impl Marker {
    /// Kafka's control record type.
    pub fn type_id(self) -> i16 {
        match self {
            Marker::Abort => 0,
            Marker::Commit => 1,
        }
    }
}

/// The marker of a whole control batch, `None` for other batches or an unknown control type
/// (Kafka's leader-change and snapshot control records carry no transaction).
pub fn marker(bytes: &[u8]) -> Option<Marker> {
    let h = BatchHeader::parse(bytes).ok()?;
    if !h.is_control() {
        return None;
    }
    let recs = batch::records(bytes).ok()?;
    let key = recs.first()?.key?;
    if key.len() < 4 {
        return None;
    }
    match i16::from_be_bytes([key[2], key[3]]) {
        0 => Some(Marker::Abort),
        1 => Some(Marker::Commit),
        _ => None,
    }
}

/// An aborted transaction in this partition: the producer, its first offset here and the
/// offset of its ABORT marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbortedTxn {
    pub producer_id: i64,
    pub first_offset: i64,
    pub last_offset: i64,
}

/// The open and aborted transactions of one partition's log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TxnIndex {
    /// Producer id → first offset of its open transaction here.
    open: BTreeMap<i64, i64>,
    /// Ordered by marker offset (markers are appended in order).
    aborted: Vec<AbortedTxn>,
}

impl TxnIndex {
    /// Take the batch `h` (at its final offsets); `marker` is its control marker, if any.
    pub fn observe(&mut self, h: &BatchHeader, marker: Option<Marker>) {
        if !h.is_transactional() || !h.has_producer_id() {
            return;
        }
        if h.is_control() {
            let Some(m) = marker else { return };
            if let Some(first) = self.open.remove(&h.producer_id) {
                if m == Marker::Abort {
                    if let Some(last) = self.aborted.last() {
                        assert!(
                            last.last_offset < h.base_offset,
                            "abort markers go forward ({} after {})",
                            h.base_offset,
                            last.last_offset
                        );
                    }
                    self.aborted.push(AbortedTxn {
                        producer_id: h.producer_id,
                        first_offset: first,
                        last_offset: h.base_offset,
                    });
                }
            }
            return;
        }
        self.open.entry(h.producer_id).or_insert(h.base_offset);
    }

    /// The first offset of the earliest open transaction: the last stable offset, unless the
    /// high watermark is below it.
    pub fn first_unstable(&self) -> Option<i64> {
        self.open.values().copied().min()
    }

    /// The last stable offset under high watermark `hw`.
    pub fn last_stable(&self, hw: i64) -> i64 {
        self.first_unstable().map_or(hw, |f| f.min(hw))
    }

    /// Open transactions: (producer id, first offset).
    pub fn open(&self) -> impl Iterator<Item = (i64, i64)> + '_ {
        self.open.iter().map(|(p, f)| (*p, *f))
    }

    /// The aborted transactions a read of `[from, to)` must know (Kafka's
    /// `collectAbortedTransactions`): those ending at or after `from` and starting below `to`.
    pub fn aborted_in(&self, from: i64, to: i64) -> Vec<AbortedTxn> {
        let i = self.aborted.partition_point(|a| a.last_offset < from);
        self.aborted[i..]
            .iter()
            .filter(|a| a.first_offset < to)
            .copied()
            .collect()
    }

    pub fn aborted_count(&self) -> usize {
        self.aborted.len()
    }

    /// Forget aborted transactions wholly below the log start `start`.
    pub fn prune_below(&mut self, start: i64) {
        let i = self.aborted.partition_point(|a| a.last_offset < start);
        self.aborted.drain(..i);
    }

    /// Whether every offset this index names lies below `end` (so it describes a log ending
    /// there, and a truncation to `end` leaves it as it is).
    pub fn below(&self, end: i64) -> bool {
        self.open.values().all(|f| *f < end) && self.aborted.iter().all(|a| a.last_offset < end)
    }

    /// Encode as the snapshot of a log ending at `at`.
    pub fn encode(&self, at: i64) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + 16 * self.open.len() + 24 * self.aborted.len());
        out.extend_from_slice(b"FTX1");
        out.extend_from_slice(&at.to_be_bytes());
        out.extend_from_slice(&(self.open.len() as u32).to_be_bytes());
        for (p, f) in &self.open {
            out.extend_from_slice(&p.to_be_bytes());
            out.extend_from_slice(&f.to_be_bytes());
        }
        out.extend_from_slice(&(self.aborted.len() as u32).to_be_bytes());
        for a in &self.aborted {
            out.extend_from_slice(&a.producer_id.to_be_bytes());
            out.extend_from_slice(&a.first_offset.to_be_bytes());
            out.extend_from_slice(&a.last_offset.to_be_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Decode a snapshot: the offset it was taken at and the index. `None` if it is damaged.
    pub fn decode(bytes: &[u8]) -> Option<(i64, TxnIndex)> {
        let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
        if crc32c::crc32c(body) != u32::from_be_bytes(crc.try_into().ok()?) {
            return None;
        }
        let mut at = 0usize;
        let mut take = |n: usize| -> Option<&[u8]> {
            let s = body.get(at..at + n)?;
            at += n;
            Some(s)
        };
        if take(4)? != b"FTX1" {
            return None;
        }
        let i64_of = |s: &[u8]| i64::from_be_bytes(s.try_into().expect("8 bytes"));
        let offset = i64_of(take(8)?);
        let n_open = u32::from_be_bytes(take(4)?.try_into().ok()?) as usize;
        let mut ix = TxnIndex::default();
        for _ in 0..n_open {
            let p = i64_of(take(8)?);
            let f = i64_of(take(8)?);
            ix.open.insert(p, f);
        }
        let n_aborted = u32::from_be_bytes(take(4)?.try_into().ok()?) as usize;
        for _ in 0..n_aborted {
            ix.aborted.push(AbortedTxn {
                producer_id: i64_of(take(8)?),
                first_offset: i64_of(take(8)?),
                last_offset: i64_of(take(8)?),
            });
        }
        Some((offset, ix))
    }
}

/// A control batch of `producer` at `epoch` carrying `marker` (Kafka's `EndTransactionMarker`:
/// key version 0 and type; value version 0 and the coordinator epoch), uncompressed, with the
/// transactional and control attributes.
pub fn control_batch(
    producer_id: i64,
    epoch: i16,
    marker: Marker,
    coordinator_epoch: i32,
    timestamp: i64,
) -> Vec<u8> {
    let mut key = Vec::with_capacity(4);
    key.extend_from_slice(&0i16.to_be_bytes());
    key.extend_from_slice(&marker.type_id().to_be_bytes());
    let mut value = Vec::with_capacity(6);
    value.extend_from_slice(&0i16.to_be_bytes());
    value.extend_from_slice(&coordinator_epoch.to_be_bytes());
    let rec = batch::build::Record {
        key: Some(key),
        value: Some(value),
        ..Default::default()
    };
    batch::build::with_attributes(
        batch::build::batch(0, timestamp, Some((producer_id, epoch, -1)), &[rec]),
        batch::TRANSACTIONAL | batch::CONTROL,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pid: i64, base: i64, n: i32) -> BatchHeader {
        BatchHeader {
            base_offset: base,
            length: 100,
            partition_leader_epoch: 0,
            magic: 2,
            crc: 0,
            attributes: 0x10,
            last_offset_delta: n - 1,
            base_timestamp: 0,
            max_timestamp: 0,
            producer_id: pid,
            producer_epoch: 0,
            base_sequence: 0,
            record_count: n,
        }
    }

    fn ctrl(pid: i64, at: i64) -> BatchHeader {
        BatchHeader {
            attributes: 0x30,
            base_sequence: -1,
            ..data(pid, at, 1)
        }
    }

    #[test]
    fn markers_close_transactions_and_aborts_are_indexed() {
        let mut ix = TxnIndex::default();
        ix.observe(&data(1, 0, 3), None);
        ix.observe(&data(2, 3, 2), None);
        ix.observe(&data(1, 5, 1), None);
        assert_eq!(ix.first_unstable(), Some(0));
        assert_eq!(ix.last_stable(2), 0);
        ix.observe(&ctrl(1, 6), Some(Marker::Commit));
        assert_eq!(ix.first_unstable(), Some(3));
        ix.observe(&ctrl(2, 7), Some(Marker::Abort));
        assert_eq!(ix.first_unstable(), None);
        assert_eq!(ix.last_stable(8), 8);
        assert_eq!(
            ix.aborted_in(0, 8),
            vec![AbortedTxn {
                producer_id: 2,
                first_offset: 3,
                last_offset: 7
            }]
        );
        assert!(ix.aborted_in(8, 100).is_empty());
        assert!(ix.aborted_in(0, 3).is_empty());
        // A marker with nothing open here (the transaction wrote elsewhere) changes nothing.
        ix.observe(&ctrl(9, 8), Some(Marker::Abort));
        assert_eq!(ix.aborted_count(), 1);
        // Non-transactional batches never open anything.
        let mut plain = data(3, 9, 1);
        plain.attributes = 0;
        ix.observe(&plain, None);
        assert_eq!(ix.first_unstable(), None);
        let (at, back) = TxnIndex::decode(&ix.encode(9)).unwrap();
        assert_eq!((at, &back), (9, &ix));
        ix.prune_below(8);
        assert_eq!(ix.aborted_count(), 0);
    }

    #[test]
    fn a_built_control_batch_is_valid_and_reads_back_its_marker() {
        let b = control_batch(42, 3, Marker::Commit, 0, 1000);
        let h = batch::validate(&b).unwrap();
        assert!(h.is_control() && h.is_transactional());
        assert_eq!(
            (h.producer_id, h.producer_epoch, h.base_sequence),
            (42, 3, -1)
        );
        assert_eq!(marker(&b), Some(Marker::Commit));
        assert_eq!(
            marker(&control_batch(42, 3, Marker::Abort, 0, 1000)),
            Some(Marker::Abort)
        );
        assert_eq!(marker(&batch::build::values(0, &[b"x"])), None);
    }

    #[test]
    fn a_damaged_snapshot_is_refused() {
        let mut ix = TxnIndex::default();
        ix.observe(&data(1, 0, 3), None);
        let mut b = ix.encode(3);
        b[10] ^= 1;
        assert!(TxnIndex::decode(&b).is_none());
        assert!(TxnIndex::decode(&[]).is_none());
    }
}
