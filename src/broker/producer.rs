//! Idempotent producer state of one partition: sequence numbers per producer id.
//!
//! Kafka's rules (`ProducerStateManager`): a producer id has an epoch and, per partition, the
//! sequence of the last batches it wrote. A batch whose sequence range equals one of the last
//! five is a retry of something already written: it is answered with the original offset and
//! not written again. A batch must otherwise start right after the last sequence; a new epoch
//! starts again at 0; an older epoch is fenced.

use std::collections::{HashMap, VecDeque};

use crate::batch::BatchHeader;

/// How many recent batches per producer are remembered for duplicate detection (Kafka: 5,
/// matching `max.in.flight.requests.per.connection`).
pub const RECENT_BATCHES_MAX: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RecentBatch {
    first_seq: i32,
    last_seq: i32,
    base_offset: i64,
}

#[derive(Debug, Clone, Default)]
struct Entry {
    epoch: i16,
    recent: VecDeque<RecentBatch>,
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
