//! Idempotent producer state of one partition: sequence numbers per producer id.
//!
//! Kafka's rules (`ProducerStateManager`): a producer id has an epoch and, per partition, the
//! sequence of the last batches it wrote. A batch whose sequence range equals one of the last
//! five is a retry of something already written: it is answered with the original offset and
//! not written again. A batch must otherwise start right after the last sequence; a new epoch
//! starts again at 0; an older epoch is fenced.
//!
//! Durability: at each segment roll the state is written to the partition's
//! `producer-snapshot` file (as Kafka writes a `.snapshot` per segment), and
//! [`ProducerStates::rebuild`] loads it and scans only the batches after it. So a producer
//! whose last write is in an older segment keeps its epoch and sequences across a restart, a
//! new leadership and a cut. A producer silent for [`EXPIRATION_MS`] (by its batches'
//! timestamps, as Kafka's `producer.id.expiration.ms`) is left out of the next snapshot.

use std::collections::{HashMap, VecDeque};

use crate::batch::BatchHeader;
use crate::log::{LogError, PartitionLog};

/// The snapshot's file name in the partition's directory.
pub const SNAPSHOT_FILE: &str = "producer-snapshot";

/// Producers silent this long are dropped from snapshots (Kafka's `producer.id.expiration.ms`
/// default: one day).
pub const EXPIRATION_MS: i64 = 24 * 60 * 60 * 1000;

/// How many recent batches per producer are remembered for duplicate detection (Kafka: 5,
/// matching `max.in.flight.requests.per.connection`).
pub const RECENT_BATCHES_MAX: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RecentBatch {
    first_seq: i32,
    last_seq: i32,
    base_offset: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Entry {
    epoch: i16,
    recent: VecDeque<RecentBatch>,
    /// The newest timestamp of its batches (for expiry).
    last_timestamp: i64,
}

/// The verdict on one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqCheck {
    /// Not idempotent, or next in sequence: append it.
    Append,
    /// Already written at this base offset: answer success, write nothing.
    Duplicate { base_offset: i64 },
    /// Sequence gap or reorder (OUT_OF_ORDER_SEQUENCE_NUMBER).
    OutOfOrder { expected: i32, got: i32 },
    /// Epoch older than the producer's current one (INVALID_PRODUCER_EPOCH).
    Fenced { current: i16, got: i16 },
}

/// Sequence state of every producer that wrote to one partition.
#[derive(Debug, Default)]
pub struct ProducerStates {
    producers: HashMap<i64, Entry>,
}

fn seq_add(seq: i32, n: i32) -> i32 {
    // Sequences wrap from i32::MAX to 0.
    ((seq as i64 + n as i64) % (i32::MAX as i64 + 1)) as i32
}

impl ProducerStates {
    pub fn check(&self, h: &BatchHeader) -> SeqCheck {
        if h.is_control() && h.has_producer_id() {
            // A transaction marker: written by the coordinator at the producer's epoch or a
            // newer one (a fencing abort); an older epoch is a zombie coordinator's.
            return match self.producers.get(&h.producer_id) {
                Some(e) if h.producer_epoch < e.epoch => SeqCheck::Fenced {
                    current: e.epoch,
                    got: h.producer_epoch,
                },
                _ => SeqCheck::Append,
            };
        }
        if !h.has_producer_id() || h.base_sequence < 0 {
            return SeqCheck::Append;
        }
        let Some(e) = self.producers.get(&h.producer_id) else {
            // Unknown producer (new, or its state was older than what recovery scanned):
            // accept any starting sequence, as Kafka does for expired producer state.
            return SeqCheck::Append;
        };
        if h.producer_epoch < e.epoch {
            return SeqCheck::Fenced {
                current: e.epoch,
                got: h.producer_epoch,
            };
        }
        let last_seq = seq_add(h.base_sequence, h.last_offset_delta);
        if h.producer_epoch > e.epoch {
            // A bumped epoch restarts sequences at 0.
            return if h.base_sequence == 0 {
                SeqCheck::Append
            } else {
                SeqCheck::OutOfOrder {
                    expected: 0,
                    got: h.base_sequence,
                }
            };
        }
        if let Some(d) = e
            .recent
            .iter()
            .find(|r| r.first_seq == h.base_sequence && r.last_seq == last_seq)
        {
            return SeqCheck::Duplicate {
                base_offset: d.base_offset,
            };
        }
        match e.recent.back() {
            Some(last) if h.base_sequence != seq_add(last.last_seq, 1) => SeqCheck::OutOfOrder {
                expected: seq_add(last.last_seq, 1),
                got: h.base_sequence,
            },
            _ => SeqCheck::Append,
        }
    }

    /// Remember a batch that was appended at `base_offset`.
    pub fn record(&mut self, h: &BatchHeader, base_offset: i64) {
        if h.is_control() && h.has_producer_id() {
            // A marker at a bumped epoch fences the producer's older epoch from here on.
            let e = self.producers.entry(h.producer_id).or_default();
            if h.producer_epoch > e.epoch {
                e.epoch = h.producer_epoch;
                e.recent.clear();
            }
            return;
        }
        if !h.has_producer_id() || h.base_sequence < 0 {
            return;
        }
        let e = self.producers.entry(h.producer_id).or_default();
        if h.producer_epoch > e.epoch {
            e.epoch = h.producer_epoch;
            e.recent.clear();
        }
        e.last_timestamp = e.last_timestamp.max(h.max_timestamp);
        e.recent.push_back(RecentBatch {
            first_seq: h.base_sequence,
            last_seq: seq_add(h.base_sequence, h.last_offset_delta),
            base_offset,
        });
        while e.recent.len() > RECENT_BATCHES_MAX {
            e.recent.pop_front();
        }
    }

    /// Each producer's epoch and the last sequence it wrote here (DescribeProducers).
    pub fn describe(&self) -> impl Iterator<Item = (i64, i16, i32)> + '_ {
        self.producers
            .iter()
            .map(|(id, e)| (*id, e.epoch, e.recent.back().map_or(-1, |r| r.last_seq)))
    }

    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// Encode as the snapshot of a log below `at`, leaving out producers silent since
    /// `now_ms - EXPIRATION_MS`.
    pub fn encode(&self, at: i64, epoch_below: i32, now_ms: i64) -> Vec<u8> {
        let live: Vec<(&i64, &Entry)> = self
            .producers
            .iter()
            .filter(|(_, e)| e.last_timestamp >= now_ms - EXPIRATION_MS)
            .collect();
        let mut out = Vec::with_capacity(20 + live.len() * (19 + 16 * RECENT_BATCHES_MAX));
        out.extend_from_slice(b"FPS1");
        out.extend_from_slice(&at.to_be_bytes());
        out.extend_from_slice(&epoch_below.to_be_bytes());
        out.extend_from_slice(&(live.len() as u32).to_be_bytes());
        for (id, e) in live {
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&e.epoch.to_be_bytes());
            out.extend_from_slice(&e.last_timestamp.to_be_bytes());
            out.push(e.recent.len() as u8);
            for r in &e.recent {
                out.extend_from_slice(&r.first_seq.to_be_bytes());
                out.extend_from_slice(&r.last_seq.to_be_bytes());
                out.extend_from_slice(&r.base_offset.to_be_bytes());
            }
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Decode a snapshot: the offset it was taken at, the epoch of the log's history there
    /// and the states. `None` if it is damaged.
    pub fn decode(bytes: &[u8]) -> Option<(i64, i32, ProducerStates)> {
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
        if take(4)? != b"FPS1" {
            return None;
        }
        let i64_of = |s: &[u8]| i64::from_be_bytes(s.try_into().expect("8 bytes"));
        let i32_of = |s: &[u8]| i32::from_be_bytes(s.try_into().expect("4 bytes"));
        let offset = i64_of(take(8)?);
        let epoch_below = i32_of(take(4)?);
        let n = u32::from_be_bytes(take(4)?.try_into().ok()?) as usize;
        let mut states = ProducerStates::default();
        for _ in 0..n {
            let id = i64_of(take(8)?);
            let epoch = i16::from_be_bytes(take(2)?.try_into().ok()?);
            let last_timestamp = i64_of(take(8)?);
            let k = take(1)?[0] as usize;
            let mut recent = VecDeque::with_capacity(k);
            for _ in 0..k {
                recent.push_back(RecentBatch {
                    first_seq: i32_of(take(4)?),
                    last_seq: i32_of(take(4)?),
                    base_offset: i64_of(take(8)?),
                });
            }
            states.producers.insert(
                id,
                Entry {
                    epoch,
                    recent,
                    last_timestamp,
                },
            );
        }
        Some((offset, epoch_below, states))
    }

    /// Record a batch `log` just appended at `base_offset`. If the append rolled the log (its
    /// active segment's base moved from `active_before`), the states of every batch before it
    /// are written first as the partition's snapshot (a new file, fsynced, then renamed over
    /// the old one: a crash leaves one whole snapshot or the other).
    pub fn record_appended(
        &mut self,
        log: &PartitionLog,
        active_before: i64,
        h: &BatchHeader,
        base_offset: i64,
    ) {
        let at = log.active_base();
        if at != active_before && at == base_offset {
            let bytes = self.encode(at, epoch_at(log, at - 1), crate::clock::now_ms());
            if let Err(e) = crate::durable::write_atomic(&log.dir().join(SNAPSHOT_FILE), &bytes) {
                tracing::warn!(dir = %log.dir().display(), error = %e, "could not write the producer snapshot: a restart rebuilds producer state from the active segment only");
            }
        }
        self.record(h, base_offset);
    }

    /// The states of `log`: its snapshot (if whole and of this log), then every batch after
    /// it; without one, the batches of the active segment.
    pub fn rebuild(log: &PartitionLog) -> Result<ProducerStates, LogError> {
        // A snapshot describes the log it was taken of: not one cut below it, nor one whose
        // history there is another (cut, then written again from a newer epoch).
        let snap = std::fs::read(log.dir().join(SNAPSHOT_FILE))
            .ok()
            .and_then(|b| ProducerStates::decode(&b))
            .filter(|(at, epoch, _)| *at <= log.next_offset() && epoch_at(log, at - 1) == *epoch);
        let (from, mut states) = match snap {
            Some((at, _, s)) => (at.max(log.start_offset()), s),
            None => (log.active_base(), ProducerStates::default()),
        };
        log.for_each_batch(from, |h| states.record(h, h.base_offset))?;
        Ok(states)
    }
}

/// The epoch of `log`'s history at `offset` (-1 before any).
fn epoch_at(log: &PartitionLog, offset: i64) -> i32 {
    log.epochs()
        .iter()
        .take_while(|e| e.start_offset <= offset)
        .last()
        .map_or(-1, |e| e.epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(pid: i64, epoch: i16, seq: i32, n: i32) -> BatchHeader {
        BatchHeader {
            base_offset: 0,
            length: 100,
            partition_leader_epoch: 0,
            magic: 2,
            crc: 0,
            attributes: 0,
            last_offset_delta: n - 1,
            base_timestamp: 0,
            max_timestamp: 0,
            producer_id: pid,
            producer_epoch: epoch,
            base_sequence: seq,
            record_count: n,
        }
    }

    /// An idempotent batch of `pid` at `epoch` with sequences from `seq`, one record per value.
    fn idem(pid: i64, epoch: i16, seq: i32, vals: &[&[u8]]) -> Vec<u8> {
        let recs: Vec<crate::batch::build::Record> = vals
            .iter()
            .map(|v| crate::batch::build::Record {
                value: Some(v.to_vec()),
                ..Default::default()
            })
            .collect();
        crate::batch::build::batch(0, crate::clock::now_ms(), Some((pid, epoch, seq)), &recs)
    }

    fn append(log: &mut PartitionLog, s: &mut ProducerStates, bytes: &[u8], epoch: Option<i32>) {
        let h = crate::batch::validate(bytes).unwrap();
        let before = log.active_base();
        let base = log.append(bytes, epoch).unwrap();
        s.record_appended(log, before, &h, base);
    }

    #[test]
    fn a_producer_whose_last_write_is_in_an_older_segment_keeps_its_state_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::log::LogConfig {
            segment_bytes: 300,
            index_interval_bytes: 100,
            ..Default::default()
        };
        let mut log = PartitionLog::open(dir.path(), config.clone()).unwrap().0;
        let mut s = ProducerStates::default();
        append(&mut log, &mut s, &idem(7, 3, 0, &[b"a", b"b"]), Some(1));
        let first = idem(7, 3, 2, &[b"c"]);
        append(&mut log, &mut s, &first, Some(1));
        // Another producer writes until the log has rolled past producer 7's batches.
        let mut seq = 0;
        while log.active_base() <= 3 {
            append(&mut log, &mut s, &idem(8, 0, seq, &[&[b'x'; 120]]), Some(1));
            seq += 1;
        }
        drop(log);
        let log = PartitionLog::open(dir.path(), config.clone()).unwrap().0;
        let back = ProducerStates::rebuild(&log).unwrap();
        // Producer 7: its epoch fences older ones, its last batch is a duplicate, and its next
        // sequence is 3.
        let h = |b: &[u8]| crate::batch::validate(b).unwrap();
        assert_eq!(
            back.check(&h(&idem(7, 2, 0, &[b"z"]))),
            SeqCheck::Fenced { current: 3, got: 2 }
        );
        assert_eq!(
            back.check(&h(&first)),
            SeqCheck::Duplicate { base_offset: 2 }
        );
        assert_eq!(
            back.check(&h(&idem(7, 3, 4, &[b"z"]))),
            SeqCheck::OutOfOrder {
                expected: 3,
                got: 4
            }
        );
        assert_eq!(back.check(&h(&idem(7, 3, 3, &[b"z"]))), SeqCheck::Append);
        assert_eq!(back.describe().count(), 2);

        // A log cut below the snapshot and written again from a newer epoch past where the
        // snapshot was taken (in one segment: no roll writes a new snapshot): the snapshot is
        // not its history any more, so only the log's batches count.
        let snapshot_at =
            ProducerStates::decode(&std::fs::read(dir.path().join(SNAPSHOT_FILE)).unwrap())
                .unwrap()
                .0;
        let mut log = log;
        log.truncate_to(2).unwrap();
        drop(log);
        let roomy = crate::log::LogConfig {
            segment_bytes: 1 << 20,
            ..config
        };
        let mut log = PartitionLog::open(dir.path(), roomy.clone()).unwrap().0;
        let mut s2 = ProducerStates::rebuild(&log).unwrap();
        let mut seq = 0;
        while log.next_offset() <= snapshot_at + 2 {
            append(&mut log, &mut s2, &idem(9, 0, seq, &[b"y"]), Some(2));
            seq += 1;
        }
        drop(log);
        let log = PartitionLog::open(dir.path(), roomy).unwrap().0;
        let back = ProducerStates::rebuild(&log).unwrap();
        let ids: Vec<i64> = back.describe().map(|(id, _, _)| id).collect();
        assert!(!ids.contains(&8), "producer 8's writes were cut: {ids:?}");
        assert!(ids.contains(&7) && ids.contains(&9), "{ids:?}");
    }

    #[test]
    fn snapshots_round_trip_and_leave_out_expired_producers_and_damage() {
        let mut s = ProducerStates::default();
        let mut a = hdr(1, 2, 0, 3);
        a.max_timestamp = 1_000;
        s.record(&a, 10);
        let mut b = hdr(2, 0, 5, 1);
        b.max_timestamp = EXPIRATION_MS + 5_000;
        s.record(&b, 20);
        let bytes = s.encode(40, 6, EXPIRATION_MS + 2_000);
        let (at, epoch, back) = ProducerStates::decode(&bytes).unwrap();
        assert_eq!((at, epoch), (40, 6));
        // Producer 1 was silent for longer than the expiration: left out.
        assert_eq!(back.describe().collect::<Vec<_>>(), vec![(2, 0, 5)]);
        let mut bad = bytes.clone();
        bad[10] ^= 1;
        assert!(ProducerStates::decode(&bad).is_none());
        assert!(ProducerStates::decode(&bytes[..bytes.len() - 1]).is_none());
    }

    #[test]
    fn retry_is_a_duplicate_and_gaps_are_refused() {
        let mut s = ProducerStates::default();
        let a = hdr(7, 0, 0, 10);
        assert_eq!(s.check(&a), SeqCheck::Append);
        s.record(&a, 100);
        assert_eq!(s.check(&a), SeqCheck::Duplicate { base_offset: 100 });
        let b = hdr(7, 0, 10, 5);
        assert_eq!(s.check(&b), SeqCheck::Append);
        s.record(&b, 110);
        assert_eq!(s.check(&a), SeqCheck::Duplicate { base_offset: 100 });
        assert!(matches!(
            s.check(&hdr(7, 0, 20, 1)),
            SeqCheck::OutOfOrder { expected: 15, .. }
        ));
        assert!(matches!(
            s.check(&hdr(7, 1, 3, 1)),
            SeqCheck::OutOfOrder { expected: 0, .. }
        ));
        let c = hdr(7, 1, 0, 1);
        assert_eq!(s.check(&c), SeqCheck::Append);
        s.record(&c, 200);
        assert!(matches!(
            s.check(&hdr(7, 0, 15, 1)),
            SeqCheck::Fenced { current: 1, got: 0 }
        ));
        // Non-idempotent batches always append.
        assert_eq!(s.check(&hdr(-1, -1, -1, 3)), SeqCheck::Append);
    }

    #[test]
    fn a_marker_at_a_newer_epoch_fences_the_older_one() {
        let mut s = ProducerStates::default();
        let a = hdr(7, 2, 0, 3);
        s.record(&a, 0);
        let marker = |epoch| BatchHeader {
            attributes: 0x30,
            base_sequence: -1,
            ..hdr(7, epoch, -1, 1)
        };
        assert!(matches!(
            s.check(&marker(1)),
            SeqCheck::Fenced { current: 2, got: 1 }
        ));
        assert_eq!(s.check(&marker(3)), SeqCheck::Append);
        s.record(&marker(3), 3);
        assert!(matches!(
            s.check(&hdr(7, 2, 3, 1)),
            SeqCheck::Fenced { current: 3, got: 2 }
        ));
        assert_eq!(s.check(&hdr(7, 3, 0, 1)), SeqCheck::Append);
    }

    #[test]
    fn sequences_wrap() {
        let mut s = ProducerStates::default();
        let a = hdr(1, 0, i32::MAX - 1, 2);
        s.record(&a, 0);
        assert_eq!(s.check(&hdr(1, 0, 0, 1)), SeqCheck::Append);
    }
}
