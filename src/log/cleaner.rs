//! Log compaction's decisions, without files or clocks: which part of a partition is cleanable,
//! whether it is worth a pass, the bounded map of each key's latest offset, and which records of
//! a batch a pass keeps.
//!
//! Owns: Kafka's compaction rules as plain functions and values: the dirty ratio,
//! `min.compaction.lag.ms`, `max.compaction.lag.ms`, `delete.retention.ms` for tombstones, the
//! offset map's memory bound (a pass maps as many dirty batches as fit, and the next pass goes
//! on from there), and the rewrite of a batch that keeps only some of its records. Does not own:
//! reading or writing segment files, the atomic swap and its recovery ([`super::compact`]), or
//! when and for which partitions passes run (the broker's cleaner thread).
//!
//! The rules, as Kafka's cleaner has them: the log is split at the *first dirty offset* (the
//! cleaner checkpoint) into a clean head, already compacted, and a dirty tail. A pass maps each
//! key of the dirty tail to its latest offset, up to the *map end*, then rewrites every segment
//! from the log start through the map end keeping a record when
//! - it is at or past the map end (not yet looked at), or
//! - it has a key and no later record of that key is mapped, and
//! - it is not a tombstone (a null value) whose segment was last written more than
//!   `delete.retention.ms` ago.
//!
//! Records without a key are dropped (a compacted topic refuses them; only records written
//! before the topic became compacted can have none). Transactions, as Kafka's cleaner treats
//! them: the cleanable part ends at the last stable offset (an open transaction's records are
//! never looked at); a batch of an aborted transaction goes whole and maps nothing (its records
//! were never visible to `read_committed`); a committed transaction's batches are compacted like
//! any other; control batches (the COMMIT/ABORT markers) are kept. Offsets never change: a kept
//! record stays at its offset, a batch keeps its base offset and last offset delta, and a batch
//! left with no record goes.

use std::collections::HashMap;
use std::time::Duration;

use super::txn::AbortedTxn;
use crate::batch::{self, BatchError, BatchHeader, RecordView, HEADER_BYTES};

/// Compaction settings of one partition (its topic's configs).
#[derive(Debug, Clone, PartialEq)]
pub struct CompactConfig {
    /// `delete.retention.ms`: how long a tombstone stays once its segment was last written.
    pub delete_retention: Duration,
    /// `min.compaction.lag.ms`: a segment with a record younger than this is not cleaned.
    pub min_lag: Duration,
    /// `max.compaction.lag.ms`: a dirty record older than this forces a pass whatever the ratio.
    pub max_lag: Option<Duration>,
    /// `min.cleanable.dirty.ratio`: clean when the dirty tail is at least this share of the log.
    pub min_dirty_ratio: f64,
}

impl Default for CompactConfig {
    fn default() -> Self {
        CompactConfig {
            delete_retention: Duration::from_secs(24 * 3600),
            min_lag: Duration::ZERO,
            max_lag: None,
            min_dirty_ratio: 0.5,
        }
    }
}

/// What the cleaner needs to know of one closed (non-active) segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    pub base: i64,
    /// The offset after its last batch.
    pub next: i64,
    pub size: u64,
    /// The newest record timestamp in it (-1: none).
    pub max_timestamp: i64,
    /// When it was last written, in ms since the epoch (its file's modification time).
    pub last_modified_ms: i64,
}

/// Why a pass is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The dirty tail is at least `min.cleanable.dirty.ratio` of the log.
    DirtyRatio,
    /// A dirty record is older than `max.compaction.lag.ms`.
    MaxLag,
    /// A tombstone's `delete.retention.ms` has passed.
    Tombstones,
}

/// The cleanable part of a partition now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cleanable {
    /// Where the dirty tail starts (the checkpoint, at least the log start).
    pub first_dirty: i64,
    /// The first offset a pass may not map: the active segment's base, the high watermark, or
    /// the first segment younger than `min.compaction.lag.ms`, whichever comes first, rounded
    /// down to a segment's base.
    pub end: i64,
    pub dirty_bytes: u64,
    pub total_bytes: u64,
    /// How long past `max.compaction.lag.ms` the oldest dirty segment is (zero if not).
    pub overdue: Duration,
    /// Why a pass is due, if one is.
    pub due: Option<Reason>,
}

impl Cleanable {
    pub fn dirty_ratio(&self) -> f64 {
        if self.total_bytes == 0 {
            0.0
        } else {
            self.dirty_bytes as f64 / self.total_bytes as f64
        }
    }
}

/// The cleanable part of a log whose closed segments are `segments` (oldest first), cleaned
/// up to `checkpoint`, committed (high watermark) up to `bound`, at `now_ms`. `tombstone_due_ms`
/// is when the earliest tombstone kept by the last pass may go (`None`: unknown, as after a
/// restart, or none kept).
pub fn cleanable(
    segments: &[SegmentInfo],
    checkpoint: i64,
    bound: i64,
    now_ms: i64,
    cfg: &CompactConfig,
    tombstone_due_ms: Option<i64>,
) -> Cleanable {
    let start = segments.first().map(|s| s.base).unwrap_or(0);
    let first_dirty = checkpoint.max(start);
    let young = now_ms.saturating_sub(cfg.min_lag.as_millis() as i64);
    let mut end = segments.last().map(|s| s.next).unwrap_or(first_dirty);
    for s in segments {
        if s.next > bound || s.max_timestamp > young {
            end = s.base;
            break;
        }
    }
    let end = end.max(first_dirty);
    let (mut dirty_bytes, mut total_bytes) = (0u64, 0u64);
    let mut oldest_dirty: Option<i64> = None;
    for s in segments.iter().filter(|s| s.base < end) {
        total_bytes += s.size;
        if s.next > first_dirty {
            dirty_bytes += s.size;
            if s.max_timestamp >= 0 && oldest_dirty.is_none() {
                oldest_dirty = Some(s.max_timestamp);
            }
        }
    }
    let overdue = match (cfg.max_lag, oldest_dirty) {
        (Some(lag), Some(ts)) => {
            let late = now_ms - ts - lag.as_millis() as i64;
            Duration::from_millis(late.max(0) as u64)
        }
        _ => Duration::ZERO,
    };
    let mut c = Cleanable {
        first_dirty,
        end,
        dirty_bytes,
        total_bytes,
        overdue,
        due: None,
    };
    c.due = if dirty_bytes > 0 && c.dirty_ratio() >= cfg.min_dirty_ratio {
        Some(Reason::DirtyRatio)
    } else if dirty_bytes > 0
        && cfg.max_lag.is_some()
        && oldest_dirty.is_some_and(|ts| now_ms - ts >= cfg.max_lag.unwrap().as_millis() as i64)
    {
        Some(Reason::MaxLag)
    } else if total_bytes > 0 && tombstone_due_ms.is_none_or(|t| t <= now_ms) {
        // After a restart nobody knows when kept tombstones fall due: one pass finds out.
        Some(Reason::Tombstones)
    } else {
        None
    };
    c
}

/// Each key's latest offset in the mapped part of the dirty tail, within a memory budget.
#[derive(Debug)]
pub struct OffsetMap {
    map: HashMap<Box<[u8]>, i64>,
    bytes: usize,
    limit: usize,
}

/// Bytes an entry costs besides its key (hash table slot, box, offset).
const ENTRY_OVERHEAD: usize = 48;

impl OffsetMap {
    /// A map that holds at most about `limit` bytes.
    pub fn new(limit: usize) -> OffsetMap {
        OffsetMap {
            map: HashMap::new(),
            bytes: 0,
            limit,
        }
    }

    /// Whether a batch whose keys take `key_bytes` bytes in `records` records surely fits.
    pub fn fits(&self, records: usize, key_bytes: usize) -> bool {
        self.bytes + key_bytes + records * ENTRY_OVERHEAD <= self.limit
    }

    /// Map `key` to `offset` (offsets come in increasing order, so the last one wins).
    pub fn put(&mut self, key: &[u8], offset: i64) {
        match self.map.get_mut(key) {
            Some(o) => {
                debug_assert!(offset > *o, "offsets are mapped in increasing order");
                *o = offset;
            }
            None => {
                self.bytes += key.len() + ENTRY_OVERHEAD;
                self.map.insert(key.into(), offset);
            }
        }
    }

    pub fn get(&self, key: &[u8]) -> Option<i64> {
        self.map.get(key).copied()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Whether `h` is a batch of one of the `aborted` transactions.
pub fn aborted(h: &BatchHeader, aborted: &[AbortedTxn]) -> bool {
    h.is_transactional()
        && !h.is_control()
        && aborted.iter().any(|a| {
            a.producer_id == h.producer_id
                && a.first_offset <= h.base_offset
                && h.base_offset < a.last_offset
        })
}

/// Map the keys of one dirty batch. Returns `Ok(false)`, mapping nothing, when the batch's keys
/// would not fit: the map then ends before this batch. Control batches and batches of
/// `aborted_txns` map nothing.
pub fn map_batch(
    map: &mut OffsetMap,
    batch: &[u8],
    aborted_txns: &[AbortedTxn],
) -> Result<bool, BatchError> {
    let h = BatchHeader::parse(batch)?;
    if h.is_control() || aborted(&h, aborted_txns) {
        return Ok(true);
    }
    let (h, plain) = batch::plain_records(batch)?;
    let recs = batch::records_in(&h, &plain)?;
    let key_bytes = recs.iter().filter_map(|r| r.key).map(|k| k.len()).sum();
    if !map.fits(recs.len(), key_bytes) {
        return Ok(false);
    }
    for r in &recs {
        if let Some(k) = r.key {
            map.put(k, r.offset);
        }
    }
    Ok(true)
}

/// The rule a pass applies to each record below the map end.
#[derive(Debug, Clone, Copy)]
pub struct Retain<'a> {
    pub map: &'a OffsetMap,
    /// Records at or past this are kept (not looked at by this pass).
    pub map_end: i64,
    pub now_ms: i64,
    pub delete_retention: Duration,
}

impl Retain<'_> {
    /// Whether `r`, in a segment last written at `segment_modified_ms`, stays.
    pub fn keeps(&self, r: &RecordView<'_>, segment_modified_ms: i64) -> bool {
        if r.offset >= self.map_end {
            return true;
        }
        let Some(key) = r.key else {
            return false;
        };
        if self.map.get(key).is_some_and(|latest| latest > r.offset) {
            return false;
        }
        r.value.is_some() || !self.tombstone_expired(segment_modified_ms)
    }

    /// Whether tombstones in a segment last written at `segment_modified_ms` may go now.
    pub fn tombstone_expired(&self, segment_modified_ms: i64) -> bool {
        segment_modified_ms + self.delete_retention.as_millis() as i64 <= self.now_ms
    }
}

/// One batch after a pass.
#[derive(Debug, PartialEq, Eq)]
pub enum Filtered {
    /// Every record stays: the batch is copied byte for byte.
    Unchanged,
    /// No record stays: the batch goes.
    Dropped,
    /// Some stay: the batch rebuilt around them ([`batch::rebuilt`]).
    Rewritten(Vec<u8>),
}

/// What a pass does to one whole batch, and how many kept tombstones it holds.
pub fn filter_batch(
    batch: &[u8],
    aborted_txns: &[AbortedTxn],
    mut keep: impl FnMut(&RecordView<'_>) -> bool,
) -> Result<(Filtered, usize), BatchError> {
    let h = BatchHeader::parse(batch)?;
    if h.is_control() {
        return Ok((Filtered::Unchanged, 0));
    }
    if aborted(&h, aborted_txns) {
        return Ok((Filtered::Dropped, 0));
    }
    let (h, plain) = batch::plain_records(batch)?;
    let spans = batch::record_spans(&h, &plain)?;
    let mut kept = Vec::with_capacity(plain.len());
    let (mut n, mut tombstones) = (0usize, 0usize);
    let mut max_ts = -1i64;
    for (range, r) in &spans {
        if keep(r) {
            kept.extend_from_slice(&plain[range.clone()]);
            n += 1;
            tombstones += usize::from(r.value.is_none());
            max_ts = max_ts.max(r.timestamp);
        }
    }
    if n == spans.len() {
        return Ok((Filtered::Unchanged, tombstones));
    }
    if n == 0 {
        return Ok((Filtered::Dropped, 0));
    }
    if h.is_log_append_time() {
        // Every record's time is the batch's append time.
        max_ts = h.max_timestamp;
    }
    let b = batch::rebuilt(batch, &kept, n as i32, max_ts)?;
    debug_assert!(b.len() >= HEADER_BYTES);
    Ok((Filtered::Rewritten(b), tombstones))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::build;

    fn rec(key: Option<&str>, value: Option<&str>) -> build::Record {
        build::Record {
            key: key.map(|k| k.as_bytes().to_vec()),
            value: value.map(|v| v.as_bytes().to_vec()),
            ..Default::default()
        }
    }

    fn seg(base: i64, next: i64, size: u64, ts: i64) -> SegmentInfo {
        SegmentInfo {
            base,
            next,
            size,
            max_timestamp: ts,
            last_modified_ms: ts,
        }
    }

    #[test]
    fn the_dirty_ratio_decides_and_young_or_uncommitted_segments_wait() {
        let cfg = CompactConfig {
            min_lag: Duration::from_millis(100),
            ..Default::default()
        };
        let segs = [
            seg(0, 10, 100, 1000),
            seg(10, 20, 100, 1000),
            seg(20, 30, 100, 1950),
        ];
        // Cleaned to 10: 100 of 200 cleanable bytes are dirty; the third is too young.
        let c = cleanable(&segs, 10, 30, 2000, &cfg, Some(i64::MAX));
        assert_eq!((c.first_dirty, c.end), (10, 20));
        assert_eq!((c.dirty_bytes, c.total_bytes), (100, 200));
        assert_eq!(c.due, Some(Reason::DirtyRatio));
        // The high watermark inside the second segment stops the pass before it.
        let c = cleanable(&segs, 10, 15, 2000, &cfg, Some(i64::MAX));
        assert_eq!(c.end, 10);
        assert_eq!(c.due, None);
        // Below the ratio nothing is due, unless a dirty record passed the maximum lag.
        let mut cfg = CompactConfig {
            min_dirty_ratio: 0.9,
            ..cfg
        };
        assert_eq!(
            cleanable(&segs, 10, 30, 2000, &cfg, Some(i64::MAX)).due,
            None
        );
        cfg.max_lag = Some(Duration::from_millis(500));
        let c = cleanable(&segs, 10, 30, 2000, &cfg, Some(i64::MAX));
        assert_eq!(c.due, Some(Reason::MaxLag));
        assert_eq!(c.overdue, Duration::from_millis(500));
        cfg.max_lag = None;
        // Kept tombstones falling due start a pass over the clean head too.
        let c = cleanable(&segs, 20, 30, 2000, &cfg, Some(1500));
        assert_eq!(c.due, Some(Reason::Tombstones));
    }

    #[test]
    fn the_map_stays_within_its_budget() {
        let mut map = OffsetMap::new(3 * (ENTRY_OVERHEAD + 1));
        let b = build::batch(
            0,
            0,
            None,
            &[rec(Some("a"), Some("1")), rec(Some("b"), Some("1"))],
        );
        assert!(map_batch(&mut map, &b, &[]).unwrap());
        let mut b2 = build::batch(
            0,
            0,
            None,
            &[rec(Some("c"), Some("1")), rec(Some("d"), Some("1"))],
        );
        batch::set_base_offset(&mut b2, 2);
        assert!(
            !map_batch(&mut map, &b2, &[]).unwrap(),
            "two more keys do not fit"
        );
        assert_eq!(map.len(), 2);
        assert_eq!((map.get(b"a"), map.get(b"b")), (Some(0), Some(1)));
    }

    #[test]
    fn aborted_transactions_go_whole_committed_ones_compact_and_markers_stay() {
        let txn = |base: i64, pid: i64, key: &str| {
            let mut b = build::with_attributes(
                build::batch(0, 1000, Some((pid, 0, 0)), &[rec(Some(key), Some("v"))]),
                batch::TRANSACTIONAL,
            );
            batch::set_base_offset(&mut b, base);
            b
        };
        let aborted = [AbortedTxn {
            producer_id: 9,
            first_offset: 10,
            last_offset: 12,
        }];
        let mut marker =
            super::super::txn::control_batch(9, 0, super::super::txn::Marker::Abort, 0, 1000);
        batch::set_base_offset(&mut marker, 12);
        let mut map = OffsetMap::new(1 << 20);
        // The aborted batch maps nothing: its key must not hide an older committed value.
        assert!(map_batch(&mut map, &txn(10, 9, "k"), &aborted).unwrap());
        assert!(map_batch(&mut map, &marker, &aborted).unwrap());
        assert!(map.is_empty());
        assert!(map_batch(&mut map, &txn(20, 8, "k"), &aborted).unwrap());
        assert_eq!(map.get(b"k"), Some(20));
        let retain = Retain {
            map: &map,
            map_end: 100,
            now_ms: 10_000,
            delete_retention: Duration::from_secs(1),
        };
        let keep = |r: &RecordView<'_>| retain.keeps(r, 9_000);
        assert_eq!(
            filter_batch(&txn(10, 9, "k"), &aborted, keep).unwrap().0,
            Filtered::Dropped
        );
        assert_eq!(
            filter_batch(&marker, &aborted, keep).unwrap().0,
            Filtered::Unchanged
        );
        // A committed transaction's older record of the key goes, the latest stays.
        assert_eq!(
            filter_batch(&txn(5, 8, "k"), &aborted, keep).unwrap().0,
            Filtered::Dropped
        );
        assert_eq!(
            filter_batch(&txn(20, 8, "k"), &aborted, keep).unwrap().0,
            Filtered::Unchanged
        );
        // Another producer's batch inside the aborted range is not aborted.
        assert_eq!(
            filter_batch(&txn(11, 7, "j"), &aborted, keep).unwrap().0,
            Filtered::Unchanged
        );
    }

    #[test]
    fn a_batch_keeps_the_latest_records_at_their_offsets_with_a_new_crc() {
        let mut b = build::batch(
            0,
            5000,
            Some((7, 1, 0)),
            &[
                rec(Some("k1"), Some("old")),
                rec(Some("k2"), Some("v")),
                rec(None, Some("keyless")),
                rec(Some("k3"), None),
            ],
        );
        batch::set_base_offset(&mut b, 100);
        let mut map = OffsetMap::new(1 << 20);
        map.put(b"k1", 200);
        let retain = Retain {
            map: &map,
            map_end: 300,
            now_ms: 10_000,
            delete_retention: Duration::from_secs(1),
        };
        let (f, tombstones) = filter_batch(&b, &[], |r| retain.keeps(r, 9_500)).unwrap();
        let Filtered::Rewritten(nb) = f else {
            panic!("expected a rewrite, got {f:?}")
        };
        assert_eq!(tombstones, 1, "the young tombstone stays");
        let h = batch::validate(&nb).expect("a valid batch with a new CRC");
        assert_eq!(
            (h.base_offset, h.last_offset_delta, h.record_count),
            (100, 3, 2)
        );
        assert_eq!((h.producer_id, h.base_sequence), (7, 0));
        let rs = batch::records(&nb).unwrap();
        let got: Vec<_> = rs.iter().map(|r| (r.offset, r.key, r.value)).collect();
        assert_eq!(
            got,
            vec![
                (101, Some(&b"k2"[..]), Some(&b"v"[..])),
                (103, Some(&b"k3"[..]), None)
            ]
        );
        // Later, the tombstone's time is up too.
        let (f, _) = filter_batch(&b, &[], |r| retain.keeps(r, 5_000)).unwrap();
        let Filtered::Rewritten(nb) = f else { panic!() };
        assert_eq!(batch::records(&nb).unwrap().len(), 1);
        // Nothing to drop: the same bytes; everything to drop: no batch.
        let keep_all = filter_batch(&b, &[], |_| true).unwrap().0;
        assert_eq!(keep_all, Filtered::Unchanged);
        assert_eq!(
            filter_batch(&b, &[], |_| false).unwrap().0,
            Filtered::Dropped
        );
    }

    #[test]
    fn compressed_batches_are_rewritten_with_their_codec() {
        use crate::batch::Compression;
        // A gzip batch, as a client would send it: same records, compressed body.
        let plain = build::batch(
            0,
            0,
            None,
            &[rec(Some("a"), Some("1")), rec(Some("a"), Some("2"))],
        );
        let body = &plain[HEADER_BYTES..];
        let mut gz = batch::rebuilt(&plain, body, 2, 0).unwrap();
        gz[21..23].copy_from_slice(&1i16.to_be_bytes()); // gzip
        let gz = batch::rebuilt(&gz, body, 2, 0).unwrap();
        assert_eq!(
            batch::validate(&gz).unwrap().compression().unwrap(),
            Compression::Gzip
        );
        let mut map = OffsetMap::new(1 << 20);
        assert!(map_batch(&mut map, &gz, &[]).unwrap());
        let retain = Retain {
            map: &map,
            map_end: 2,
            now_ms: 0,
            delete_retention: Duration::ZERO,
        };
        let Filtered::Rewritten(nb) = filter_batch(&gz, &[], |r| retain.keeps(r, 0)).unwrap().0
        else {
            panic!()
        };
        let h = batch::validate(&nb).unwrap();
        assert_eq!(h.compression().unwrap(), Compression::Gzip);
        let (h, plain) = batch::plain_records(&nb).unwrap();
        let rs = batch::records_in(&h, &plain).unwrap();
        assert_eq!(rs.len(), 1);
        assert_eq!((rs[0].offset, rs[0].value), (1, Some(&b"2"[..])));
    }
}
