//! The epoch history of one partition: at which offset each region epoch began.
//!
//! Every batch a region writes carries its region epoch in the batch header's partition leader
//! epoch field (outside the CRC), and mirrors copy batches unchanged, so every region's copy of
//! a partition has the same history. This file keeps that history small and at hand, as
//! Kafka's `leader-epoch-checkpoint` does: one `(epoch, start offset)` line per epoch, written
//! and fsynced *before* the first batch of a new epoch, and cut back to the log end when the
//! log is opened or truncated. Two regions find where their copies of a partition diverge by
//! comparing their histories ([`divergence`]).
//!
//! Owns: the `leader-epoch-checkpoint` file of a partition directory. Does not own: what an
//! epoch means or who assigns it ([`crate::failover`]).

use std::io;
use std::path::{Path, PathBuf};

/// The file name inside a partition directory.
pub const FILE: &str = "leader-epoch-checkpoint";

/// One epoch's first offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EpochEntry {
    pub epoch: i32,
    pub start_offset: i64,
}

/// The epoch history of a partition, oldest first. Epochs and start offsets strictly increase.
#[derive(Debug, Clone)]
pub struct EpochCache {
    path: PathBuf,
    entries: Vec<EpochEntry>,
}

impl EpochCache {
    /// Load the history of the partition in `dir` (empty when there is none yet). Entries that
    /// start at or past `log_end` describe batches that never reached the disk and are dropped.
    pub fn open(dir: &Path, log_end: i64) -> io::Result<(EpochCache, bool)> {
        let path = dir.join(FILE);
        let (entries, existed) = match std::fs::read_to_string(&path) {
            Ok(text) => (parse(&text).unwrap_or_default(), true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (Vec::new(), false),
            Err(e) => return Err(e),
        };
        let mut c = EpochCache { path, entries };
        if c.entries.iter().any(|e| e.start_offset >= log_end) {
            c.entries.retain(|e| e.start_offset < log_end);
            c.store()?;
        }
        Ok((c, existed))
    }

    pub fn entries(&self) -> &[EpochEntry] {
        &self.entries
    }

    /// The epoch of the last batch written, if any batch carried one.
    pub fn last_epoch(&self) -> Option<i32> {
        self.entries.last().map(|e| e.epoch)
    }

    /// Note that a batch of `epoch` starts at `offset`. A new epoch is made durable before the
    /// batch is written. An epoch below the last one is refused: history never goes back.
    pub fn observe(&mut self, epoch: i32, offset: i64) -> io::Result<()> {
        if epoch < 0 {
            return Ok(()); // a batch from before epochs were stamped
        }
        match self.entries.last() {
            Some(last) if epoch == last.epoch => Ok(()),
            Some(last) if epoch < last.epoch => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a batch of epoch {epoch} at offset {offset} follows epoch {} (epochs never go back)",
                    last.epoch
                ),
            )),
            last => {
                assert!(
                    last.is_none_or(|l| offset > l.start_offset),
                    "epoch start offsets strictly increase"
                );
                self.entries.push(EpochEntry {
                    epoch,
                    start_offset: offset,
                });
                self.store()
            }
        }
    }

    /// Forget epochs that begin at or past `offset` (the log was cut back to end there).
    pub fn truncate_to(&mut self, offset: i64) -> io::Result<()> {
        let before = self.entries.len();
        self.entries.retain(|e| e.start_offset < offset);
        if self.entries.len() != before {
            self.store()?;
        }
        Ok(())
    }

    /// Rebuild from scratch (the file was missing): `entries` found by scanning the log.
    pub fn rebuild(&mut self, entries: Vec<EpochEntry>) -> io::Result<()> {
        self.entries = entries;
        self.store()
    }

    fn store(&self) -> io::Result<()> {
        let mut text = format!("0\n{}\n", self.entries.len());
        for e in &self.entries {
            text.push_str(&format!("{} {}\n", e.epoch, e.start_offset));
        }
        crate::durable::write_atomic(&self.path, text.as_bytes())
    }
}

/// Kafka's checkpoint text: a version line (0), a count line, then `epoch offset` lines.
fn parse(text: &str) -> Option<Vec<EpochEntry>> {
    let mut lines = text.lines();
    if lines.next()?.trim() != "0" {
        return None;
    }
    let n: usize = lines.next()?.trim().parse().ok()?;
    let mut out = Vec::with_capacity(n.min(1024));
    for line in lines.take(n) {
        let mut it = line.split_whitespace();
        out.push(EpochEntry {
            epoch: it.next()?.parse().ok()?,
            start_offset: it.next()?.parse().ok()?,
        });
    }
    Some(out)
}

/// Kafka's answer to "where does epoch `epoch` end in this log?" (OffsetForLeaderEpoch, and a
/// leader's check of a follower's fetch): the largest epoch of `entries` at or below `epoch`,
/// and the start of the next epoch (or `log_end` when it is the last). `(-1, -1)` when the log
/// holds no epoch at or below `epoch` (UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET).
pub fn end_offset_for(entries: &[EpochEntry], log_end: i64, epoch: i32) -> (i32, i64) {
    let Some(i) = entries.iter().rposition(|e| e.epoch <= epoch) else {
        return (-1, -1);
    };
    let end = entries.get(i + 1).map_or(log_end, |n| n.start_offset);
    (entries[i].epoch, end)
}

/// Where a receiver's copy of a partition leaves the sender's history: the offset up to which
/// the receiver's log (`theirs`, ending at `their_end`) holds the same batches as the sender's
/// (`ours`, ending at `our_end`). Records of the receiver at and past the returned offset are
/// not in the sender's history (they were written by a region that lost its primacy) and must
/// be set aside before the receiver can mirror the sender. When nothing diverges the result is
/// `their_end`.
///
/// Each epoch was written by exactly one region, so the same epoch in two histories is the same
/// records from the same start; a receiver epoch the sender does not know, or one that runs
/// longer in the receiver than in the sender, is where they part.
pub fn divergence(ours: &[EpochEntry], our_end: i64, theirs: &[EpochEntry], their_end: i64) -> i64 {
    for (i, t) in theirs.iter().enumerate() {
        let t_end = theirs.get(i + 1).map_or(their_end, |n| n.start_offset);
        let Some(j) = ours.iter().position(|o| o.epoch == t.epoch) else {
            return t.start_offset.min(their_end);
        };
        let o = ours[j];
        let o_end = ours.get(j + 1).map_or(our_end, |n| n.start_offset);
        if o.start_offset != t.start_offset {
            return o.start_offset.min(t.start_offset).min(their_end);
        }
        if t_end > o_end {
            return o_end;
        }
    }
    their_end
}

/// An epoch history from `(epoch, start offset)` pairs (for tests).
#[cfg(test)]
pub fn history(entries: &[(i32, i64)]) -> Vec<EpochEntry> {
    entries
        .iter()
        .map(|&(epoch, start_offset)| EpochEntry {
            epoch,
            start_offset,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(epoch: i32, start_offset: i64) -> EpochEntry {
        EpochEntry {
            epoch,
            start_offset,
        }
    }

    #[test]
    fn the_end_of_an_epoch_is_where_the_next_begins() {
        let h = history(&[(0, 0), (256, 40), (513, 90)]);
        assert_eq!(end_offset_for(&h, 120, 0), (0, 40));
        assert_eq!(end_offset_for(&h, 100, 0), (0, 40));
        assert_eq!(
            end_offset_for(&h, 120, 300),
            (256, 90),
            "largest at or below"
        );
        assert_eq!(
            end_offset_for(&h, 120, 513),
            (513, 120),
            "the last runs to the end"
        );
        assert_eq!(end_offset_for(&h, 120, 9999), (513, 120));
        let later = history(&[(5, 0)]);
        assert_eq!(end_offset_for(&later, 10, 4), (-1, -1));
        assert_eq!(end_offset_for(&[], 0, 4), (-1, -1));
    }

    #[test]
    fn history_is_durable_and_cut_back_to_the_log_end() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, existed) = EpochCache::open(dir.path(), 0).unwrap();
        assert!(!existed);
        c.observe(0, 0).unwrap();
        c.observe(0, 10).unwrap();
        c.observe(2, 50).unwrap();
        assert!(c.observe(1, 60).is_err(), "epochs never go back");
        let (c2, existed) = EpochCache::open(dir.path(), 100).unwrap();
        assert!(existed);
        assert_eq!(c2.entries(), &[e(0, 0), e(2, 50)]);
        // The batch that began epoch 2 never reached the disk.
        let (c3, _) = EpochCache::open(dir.path(), 50).unwrap();
        assert_eq!(c3.entries(), &[e(0, 0)]);
    }

    #[test]
    fn a_mirror_behind_the_primary_has_not_diverged() {
        let ours = [e(0, 0), e(1, 800)];
        assert_eq!(divergence(&ours, 1500, &[e(0, 0)], 700), 700);
        assert_eq!(divergence(&ours, 1500, &[e(0, 0)], 800), 800);
        assert_eq!(divergence(&ours, 1500, &[e(0, 0), e(1, 800)], 900), 900);
    }

    #[test]
    fn an_old_primary_tail_past_the_new_epoch_diverges() {
        // east wrote 0..1200 in epoch 0; west took over at 800 with epoch 1.
        let west = [e(0, 0), e(1, 800)];
        assert_eq!(divergence(&west, 1000, &[e(0, 0)], 1200), 800);
        // east had gone on to an epoch west never saw.
        let west = [e(0, 0), e(1, 800), e(3, 900)];
        let east = [e(0, 0), e(1, 800), e(2, 850)];
        assert_eq!(divergence(&west, 1000, &east, 870), 850);
    }

    #[test]
    fn an_empty_history_agrees_with_everything() {
        assert_eq!(divergence(&[e(0, 0)], 10, &[], 0), 0);
        assert_eq!(divergence(&[], 0, &[e(0, 0)], 5), 0);
    }

    proptest::proptest! {
        /// Build one true history of epochs; the receiver holds a prefix of it possibly followed
        /// by a tail in an epoch the sender never saw. The divergence point is exactly where
        /// that prefix ends.
        #[test]
        fn divergence_is_the_end_of_the_shared_prefix(
            lens in proptest::collection::vec(1i64..50, 1..6),
            cut in 0usize..300,
            tail in 0i64..40,
        ) {
            let mut ours = Vec::new();
            let mut at = 0;
            for (i, n) in lens.iter().enumerate() {
                ours.push(e(i as i32 * 2, at));
                at += n;
            }
            let our_end = at;
            let shared = (cut as i64).min(our_end);
            let mut theirs: Vec<EpochEntry> =
                ours.iter().copied().filter(|x| x.start_offset < shared).collect();
            let mut their_end = shared;
            if tail > 0 {
                // an odd epoch: written by a deposed region, unknown to the sender
                let last = theirs.last().map_or(0, |x| x.epoch);
                theirs.push(e(last + 1, shared));
                their_end += tail;
            }
            proptest::prop_assert_eq!(divergence(&ours, our_end, &theirs, their_end), shared);
        }
    }
}
