//! One compaction pass over a partition's files, and the swap that makes it durable.
//!
//! Owns: the three steps of a pass and the recovery of a pass cut short. Does not own: the
//! rules (which records stay, when a pass is due: [`super::cleaner`]) or scheduling (the
//! broker's cleaner thread).
//!
//! 1. [`PartitionLog::clean_job`], under the partition lock: the closed segments from the log
//!    start up to the cleanable end, as shared file handles.
//! 2. [`CleanJob::run`], with no lock held (closed segments never change; a reader or the pass
//!    keeps its file open even if it is deleted meanwhile): map the dirty tail's keys within the
//!    memory budget, then write the kept batches of each group of old segments into a new
//!    segment, with its indexes, in `<partition>/cleaning/`, and fsync it.
//! 3. [`PartitionLog::install_clean`], under the lock again: if the old segments are still the
//!    log's first ones, swap each group in. Per group: the new log file is renamed into the
//!    partition as `<base>.<end>.swap` (one atomic rename), the old segments are deleted, the
//!    swap is renamed to `<base>.log`. A crash before the first rename leaves the old segments
//!    (the `cleaning/` directory is emptied on open); after it, [`recover_swaps`] on open
//!    deletes whatever old segments with a base in `[base, end)` remain and finishes the
//!    rename. Either way the log holds the old segments or the new one for every offset, never
//!    both and never neither. Then the cleaner checkpoint moves to where the pass mapped.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::cleaner::{self, Cleanable, CompactConfig, Filtered, OffsetMap, Retain, SegmentInfo};
use super::segment::{file_stem, Segment};
use super::{io_err, LogError, PartitionLog};
use crate::batch::{BatchHeader, HEADER_BYTES};

/// The file holding the cleaner checkpoint: the first offset not yet cleaned.
pub(super) const CHECKPOINT_FILE: &str = "cleaner-offset-checkpoint";
/// Where a pass writes its new segments before they are swapped in.
const CLEANING_DIR: &str = "cleaning";

/// An old segment a pass reads.
#[derive(Debug, Clone)]
struct Source {
    info: SegmentInfo,
    file: Arc<File>,
}

/// A planned pass: what step 2 reads, and the rules it applies.
#[derive(Debug)]
pub struct CleanJob {
    dir: PathBuf,
    sources: Vec<Source>,
    cleanable: Cleanable,
    /// The aborted transactions in the cleanable range: their batches go.
    aborted: Vec<super::txn::AbortedTxn>,
    compact: CompactConfig,
    segment_bytes: u64,
    index_interval_bytes: u64,
}

/// A finished step 2, waiting to be swapped in.
#[derive(Debug)]
pub struct Cleaned {
    sources: Vec<Source>,
    /// Each new segment and how many of `sources` (in order) it replaces.
    groups: Vec<(Segment, usize)>,
    map_end: i64,
    tombstone_due_ms: Option<i64>,
    pub stats: CleanStats,
}

/// What a pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CleanStats {
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub batches_rewritten: u64,
    pub batches_dropped: u64,
    pub keys_mapped: u64,
    /// Where this pass's map ended (the next pass goes on from here).
    pub map_end: i64,
}

impl CleanStats {
    pub fn bytes_reclaimed(&self) -> u64 {
        self.bytes_read.saturating_sub(self.bytes_written)
    }
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn modified_ms(file: &File) -> io::Result<i64> {
    Ok(ms(file.metadata()?.modified()?))
}

impl PartitionLog {
    /// The closed segments as the cleaner sees them (oldest first), with their files.
    fn closed_sources(&self) -> Result<Vec<Source>, LogError> {
        let n = self.segments.len() - 1;
        self.segments[..n]
            .iter()
            .map(|s| {
                let file = s.file();
                Ok(Source {
                    info: SegmentInfo {
                        base: s.base_offset,
                        next: s.next_offset,
                        size: s.size,
                        max_timestamp: s.max_timestamp,
                        last_modified_ms: modified_ms(&file).map_err(io_err(&self.dir))?,
                    },
                    file,
                })
            })
            .collect()
    }

    /// The cleanable part of this log now, given its high watermark `bound` (`None` if the
    /// topic is not compacted).
    pub fn cleanable(&self, bound: i64, now_ms: i64) -> Result<Option<Cleanable>, LogError> {
        let Some(cfg) = &self.config.compact else {
            return Ok(None);
        };
        let infos: Vec<SegmentInfo> = self.closed_sources()?.iter().map(|s| s.info).collect();
        Ok(Some(cleaner::cleanable(
            &infos,
            self.clean_to,
            bound,
            now_ms,
            cfg,
            self.tombstone_due_ms,
        )))
    }

    /// Step 1 of a pass: plan it, if one is due. Cheap; call under the partition lock.
    pub fn clean_job(&self, bound: i64, now_ms: i64) -> Result<Option<CleanJob>, LogError> {
        let Some(compact) = self.config.compact.clone() else {
            return Ok(None);
        };
        let sources = self.closed_sources()?;
        let infos: Vec<SegmentInfo> = sources.iter().map(|s| s.info).collect();
        let c = cleaner::cleanable(
            &infos,
            self.clean_to,
            bound,
            now_ms,
            &compact,
            self.tombstone_due_ms,
        );
        if c.due.is_none() {
            return Ok(None);
        }
        let sources = sources
            .into_iter()
            .filter(|s| s.info.base < c.end)
            .collect();
        Ok(Some(CleanJob {
            dir: self.dir.clone(),
            sources,
            aborted: self.txns().aborted_in(self.start_offset(), c.end),
            cleanable: c,
            compact,
            segment_bytes: self.config.segment_bytes,
            index_interval_bytes: self.config.index_interval_bytes,
        }))
    }

    /// Step 3 of a pass: swap the new segments in, if the old ones are still the log's first
    /// segments (retention, DeleteRecords or a truncation may have changed them meanwhile: then
    /// nothing changes and the new files are removed). Returns whether it was installed.
    pub fn install_clean(&mut self, cleaned: Cleaned) -> Result<bool, LogError> {
        let n = cleaned.sources.len();
        let same = n < self.segments.len()
            && cleaned
                .sources
                .iter()
                .zip(&self.segments)
                .all(|(src, seg)| Arc::ptr_eq(&src.file, &seg.file()) && src.info.size == seg.size);
        if !same {
            drop(cleaned.groups);
            let _ = std::fs::remove_dir_all(self.dir.join(CLEANING_DIR));
            return Ok(false);
        }
        let dir = self.dir.clone();
        let cleaning = dir.join(CLEANING_DIR);
        // Group by group; the old segments stay in the list (their open files still serve
        // reads) until their replacement is in place, so an I/O error part-way leaves the list
        // whole and the files for `recover_swaps` to finish on the next start.
        let mut rest = cleaned.sources.iter();
        for (pos, (seg, count)) in cleaned.groups.into_iter().enumerate() {
            let base = seg.base_offset;
            let group: Vec<&Source> = rest.by_ref().take(count).collect();
            let end = group.last().map(|s| s.info.next).unwrap_or(base);
            let end = self
                .segments
                .get(pos + count)
                .map(|s| s.base_offset)
                .unwrap_or(end)
                .max(end);
            let stem = file_stem(base);
            let swap = dir.join(format!("{stem}.{}.swap", file_stem(end)));
            drop(seg);
            std::fs::rename(cleaning.join(format!("{stem}.log")), &swap).map_err(io_err(&dir))?;
            crate::durable::sync_dir(&dir).map_err(io_err(&dir))?;
            for old in &self.segments[pos..pos + count] {
                let (log, index, time_index) = Segment::paths(&dir, old.base_offset);
                std::fs::remove_file(log).map_err(io_err(&dir))?;
                let _ = std::fs::remove_file(index);
                let _ = std::fs::remove_file(time_index);
            }
            for ext in ["index", "timeindex"] {
                std::fs::rename(
                    cleaning.join(format!("{stem}.{ext}")),
                    dir.join(format!("{stem}.{ext}")),
                )
                .map_err(io_err(&dir))?;
            }
            std::fs::rename(&swap, dir.join(format!("{stem}.log"))).map_err(io_err(&dir))?;
            crate::durable::sync_dir(&dir).map_err(io_err(&dir))?;
            let (fresh, _) = Segment::open(&dir, base, self.config.index_interval_bytes, false)
                .map_err(io_err(&dir))?;
            self.segments.splice(pos..pos + count, [fresh]);
        }
        for w in self.segments.windows(2) {
            assert!(
                w[0].next_offset <= w[1].base_offset,
                "cleaned segments keep the offsets in order in {}",
                dir.display()
            );
        }
        self.tombstone_due_ms = cleaned.tombstone_due_ms;
        self.write_checkpoint(cleaned.map_end)?;
        Ok(true)
    }

    /// Move the cleaner checkpoint back to `offset` (a truncation below it), durably.
    pub(super) fn set_clean_to(&mut self, offset: i64) -> Result<(), LogError> {
        if offset != self.clean_to {
            self.write_checkpoint(offset)?;
        }
        Ok(())
    }

    /// Store the checkpoint and when kept tombstones fall due: `<offset> <due ms>`.
    fn write_checkpoint(&mut self, offset: i64) -> Result<(), LogError> {
        let path = self.dir.join(CHECKPOINT_FILE);
        let due = self.tombstone_due_ms.unwrap_or(i64::MIN);
        crate::durable::write_atomic(&path, format!("{offset} {due}\n").as_bytes())
            .map_err(io_err(&self.dir))?;
        self.clean_to = offset;
        Ok(())
    }

    /// Where the next pass's dirty tail starts.
    pub fn clean_to(&self) -> i64 {
        self.clean_to
    }
}

/// Read the whole batches of one old segment in order.
fn for_each_batch(
    src: &Source,
    dir: &Path,
    mut f: impl FnMut(&[u8], &BatchHeader) -> Result<bool, LogError>,
) -> Result<(), LogError> {
    let mut pos = 0u64;
    let mut buf = Vec::new();
    let corrupt = |message: String| LogError::Corrupt {
        dir: dir.to_path_buf(),
        message,
    };
    while pos + HEADER_BYTES as u64 <= src.info.size {
        buf.resize(HEADER_BYTES, 0);
        src.file.read_exact_at(&mut buf, pos).map_err(io_err(dir))?;
        let h = BatchHeader::parse(&buf)
            .map_err(|e| corrupt(format!("segment {}: position {pos}: {e}", src.info.base)))?;
        let n = h.total_bytes();
        buf.resize(n, 0);
        src.file.read_exact_at(&mut buf, pos).map_err(io_err(dir))?;
        if !f(&buf, &h)? {
            return Ok(());
        }
        pos += n as u64;
    }
    Ok(())
}

impl CleanJob {
    pub fn cleanable(&self) -> &Cleanable {
        &self.cleanable
    }

    /// Step 2 of a pass: map the dirty tail within `map_bytes`, write the kept records into new
    /// segments. No lock is needed: it reads only closed segments.
    pub fn run(self, map_bytes: usize, now_ms: i64) -> Result<Cleaned, LogError> {
        let dir = self.dir.clone();
        let bad = |e: crate::batch::BatchError| LogError::Corrupt {
            dir: dir.clone(),
            message: format!("while cleaning: {e}"),
        };
        // Map the dirty tail.
        let mut map = OffsetMap::new(map_bytes);
        let first_dirty = self.cleanable.first_dirty;
        let mut map_end = self.cleanable.end;
        let mut full = false;
        for src in self.sources.iter().filter(|s| s.info.next > first_dirty) {
            for_each_batch(src, &dir, |b, h| {
                if h.base_offset < first_dirty {
                    return Ok(true);
                }
                if !cleaner::map_batch(&mut map, b, &self.aborted).map_err(bad)? {
                    map_end = h.base_offset;
                    full = true;
                    return Ok(false);
                }
                Ok(true)
            })?;
            if full {
                break;
            }
        }
        if full && map_end == first_dirty {
            return Err(LogError::Corrupt {
                dir: dir.clone(),
                message: format!(
                    "the cleaner's offset map ({map_bytes} bytes) cannot hold the keys of the batch at offset {first_dirty}: raise cleaner_buffer_bytes"
                ),
            });
        }
        let retain = Retain {
            map: &map,
            map_end,
            now_ms,
            delete_retention: self.compact.delete_retention,
        };
        // Rewrite every old segment that starts below the map end, in groups no larger than a
        // segment.
        let cleaning = dir.join(CLEANING_DIR);
        let _ = std::fs::remove_dir_all(&cleaning);
        std::fs::create_dir_all(&cleaning).map_err(io_err(&dir))?;
        let sources: Vec<Source> = self
            .sources
            .into_iter()
            .filter(|s| s.info.base < map_end)
            .collect();
        let mut stats = CleanStats {
            keys_mapped: map.len() as u64,
            map_end,
            ..Default::default()
        };
        let mut tombstone_due: Option<i64> = None;
        let mut groups = Vec::new();
        let mut i = 0;
        while i < sources.len() {
            let mut j = i + 1;
            let mut size = sources[i].info.size;
            // A segment's index holds offsets relative to its base as u32 (as `maybe_roll`
            // keeps them): a group never spans more.
            while j < sources.len()
                && size + sources[j].info.size <= self.segment_bytes
                && sources[j].info.next - sources[i].info.base <= (u32::MAX / 2) as i64
            {
                size += sources[j].info.size;
                j += 1;
            }
            let group = &sources[i..j];
            let mut seg = Segment::create(&cleaning, group[0].info.base, self.index_interval_bytes)
                .map_err(io_err(&cleaning))?;
            let mut modified = 0i64;
            for src in group {
                modified = modified.max(src.info.last_modified_ms);
                let seg_ms = src.info.last_modified_ms;
                for_each_batch(src, &dir, |b, h| {
                    stats.bytes_read += b.len() as u64;
                    let (f, tombstones) =
                        cleaner::filter_batch(b, &self.aborted, |r| retain.keeps(r, seg_ms))
                            .map_err(bad)?;
                    if tombstones > 0 {
                        let due = seg_ms + self.compact.delete_retention.as_millis() as i64;
                        tombstone_due = Some(tombstone_due.map_or(due, |t: i64| t.min(due)));
                    }
                    let out: std::borrow::Cow<[u8]> = match f {
                        Filtered::Unchanged => b.into(),
                        Filtered::Dropped => {
                            stats.batches_dropped += 1;
                            return Ok(true);
                        }
                        Filtered::Rewritten(nb) => {
                            stats.batches_rewritten += 1;
                            nb.into()
                        }
                    };
                    let nh = BatchHeader::parse(&out).map_err(bad)?;
                    debug_assert_eq!(
                        (nh.base_offset, nh.last_offset()),
                        (h.base_offset, h.last_offset())
                    );
                    seg.append(&out, &nh).map_err(io_err(&cleaning))?;
                    stats.bytes_written += out.len() as u64;
                    Ok(true)
                })?;
            }
            seg.sync_all().map_err(io_err(&cleaning))?;
            // The new segment was last written when its newest old segment was: tombstones
            // keep their time, and the rename below keeps the file's times.
            let when = UNIX_EPOCH + Duration::from_millis(modified.max(0) as u64);
            seg.file().set_modified(when).map_err(io_err(&cleaning))?;
            groups.push((seg, j - i));
            i = j;
        }
        Ok(Cleaned {
            sources,
            groups,
            map_end,
            tombstone_due_ms: Some(tombstone_due.unwrap_or(i64::MAX)),
            stats,
        })
    }
}

/// On open, before the segments are listed: finish or undo a pass a crash cut short.
pub(super) fn recover_swaps(dir: &Path) -> Result<(), LogError> {
    let cleaning = dir.join(CLEANING_DIR);
    if cleaning.exists() {
        std::fs::remove_dir_all(&cleaning).map_err(io_err(dir))?;
    }
    let mut swaps = Vec::new();
    let mut logs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let name = entry.map_err(io_err(dir))?.file_name();
        let name = name.to_string_lossy().to_string();
        if let Some(stem) = name.strip_suffix(".swap") {
            if let Some((b, e)) = stem.split_once('.') {
                if let (Ok(b), Ok(e)) = (b.parse::<i64>(), e.parse::<i64>()) {
                    swaps.push((b, e, name.clone()));
                }
            }
        } else if let Some(stem) = name.strip_suffix(".log") {
            if let Ok(b) = stem.parse::<i64>() {
                logs.push(b);
            }
        }
    }
    for (base, end, name) in swaps {
        tracing::warn!(dir = %dir.display(), base, end, "finishing a compaction a crash interrupted");
        for b in logs.iter().filter(|b| (base..end).contains(*b)) {
            let stem = file_stem(*b);
            for ext in ["log", "index", "timeindex"] {
                let p = dir.join(format!("{stem}.{ext}"));
                match std::fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(dir)(e)),
                }
            }
        }
        let stem = file_stem(base);
        // The index beside it may be the old segment's or the new one's: rebuild it.
        for ext in ["index", "timeindex"] {
            let _ = std::fs::remove_file(dir.join(format!("{stem}.{ext}")));
        }
        std::fs::rename(dir.join(&name), dir.join(format!("{stem}.log"))).map_err(io_err(dir))?;
        crate::durable::sync_dir(dir).map_err(io_err(dir))?;
    }
    Ok(())
}

/// The stored cleaner checkpoint and when kept tombstones fall due (`None`: not known).
pub(super) fn read_checkpoint(dir: &Path) -> Option<(i64, Option<i64>)> {
    let text = std::fs::read_to_string(dir.join(CHECKPOINT_FILE)).ok()?;
    let mut words = text.split_whitespace();
    let offset = words.next()?.parse().ok()?;
    let due = words
        .next()
        .and_then(|w| w.parse::<i64>().ok())
        .filter(|d| *d != i64::MIN);
    Some((offset, due))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{self, build};
    use crate::log::LogConfig;
    use std::collections::BTreeMap;

    fn config(delete_retention_ms: u64) -> LogConfig {
        LogConfig {
            segment_bytes: 400,
            index_interval_bytes: 100,
            delete: false,
            compact: Some(CompactConfig {
                delete_retention: Duration::from_millis(delete_retention_ms),
                min_dirty_ratio: 0.0,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Write each (key, value) as its own batch; keys are "k<n>". Returns each write's offset.
    fn write(log: &mut PartitionLog, writes: &[(u8, Option<u8>)]) -> Vec<i64> {
        writes
            .iter()
            .map(|(k, v)| {
                let r = build::Record {
                    key: Some(format!("k{k}").into_bytes()),
                    value: v.map(|v| format!("value-{v}-0123456789").into_bytes()),
                    ..Default::default()
                };
                log.append(&build::batch(0, 1000, None, &[r]), None)
                    .unwrap()
            })
            .collect()
    }

    /// Every record the log holds: offset -> (key, value).
    fn contents(log: &PartitionLog) -> BTreeMap<i64, (Vec<u8>, Option<Vec<u8>>)> {
        let mut out = BTreeMap::new();
        let mut at = log.start_offset();
        while let Some(slice) = log.read(at, 1 << 20).unwrap() {
            let bytes = slice.read().unwrap();
            let mut last = at;
            for (range, h) in batch::whole_batches(&bytes) {
                for r in batch::records(&bytes[range]).unwrap() {
                    out.insert(
                        r.offset,
                        (r.key.unwrap().to_vec(), r.value.map(<[u8]>::to_vec)),
                    );
                }
                last = h.next_offset();
            }
            assert!(last > at, "reads progress across gaps");
            at = last;
        }
        out
    }

    /// Run passes (all segments counted committed) until none is due; returns how many ran.
    fn clean_fully(log: &mut PartitionLog, now_ms: i64, map_bytes: usize) -> usize {
        let mut passes = 0;
        while let Some(job) = log.clean_job(i64::MAX, now_ms).unwrap() {
            let done = job.run(map_bytes, now_ms).unwrap();
            assert!(log.install_clean(done).unwrap());
            passes += 1;
            assert!(passes < 1000, "passes converge");
        }
        passes
    }

    /// The model: below the active segment, the last write per key stays at its offset, and a
    /// tombstone stays only while `tombstones_stay`; the active segment is untouched.
    fn model(
        writes: &[(u8, Option<u8>)],
        offsets: &[i64],
        active_base: i64,
        tombstones_stay: bool,
    ) -> BTreeMap<i64, (Vec<u8>, Option<Vec<u8>>)> {
        let mut latest: BTreeMap<u8, i64> = BTreeMap::new();
        for ((k, _), o) in writes.iter().zip(offsets) {
            if *o < active_base {
                latest.insert(*k, *o);
            }
        }
        writes
            .iter()
            .zip(offsets)
            .filter(|((k, v), o)| {
                **o >= active_base || (latest[k] == **o && (v.is_some() || tombstones_stay))
            })
            .map(|((k, v), o)| {
                (
                    *o,
                    (
                        format!("k{k}").into_bytes(),
                        v.map(|v| format!("value-{v}-0123456789").into_bytes()),
                    ),
                )
            })
            .collect()
    }

    #[test]
    fn a_pass_keeps_the_latest_per_key_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = PartitionLog::open(dir.path(), config(60_000)).unwrap();
        let writes: Vec<(u8, Option<u8>)> = (0..60u8)
            .map(|i| (i % 5, if i == 57 { None } else { Some(i) }))
            .collect();
        let offsets = write(&mut log, &writes);
        let now = modified_ms(&log.active_file()).unwrap();
        assert!(clean_fully(&mut log, now, 1 << 20) >= 1);
        let want = model(&writes, &offsets, log.active_base(), true);
        assert_eq!(contents(&log), want);
        assert_eq!(log.next_offset(), 60, "the log end never moves");
        assert_eq!(log.start_offset(), 0, "nor the log start");
        drop(log);
        let (log, _) = PartitionLog::open(dir.path(), config(60_000)).unwrap();
        assert_eq!(contents(&log), want);
        assert!(log.clean_to() > 0, "the checkpoint is kept");
        // An hour later the tombstone is gone too.
        let (mut log, _) = {
            drop(log);
            PartitionLog::open(dir.path(), config(60_000)).unwrap()
        };
        clean_fully(&mut log, now + 3_600_000, 1 << 20);
        assert_eq!(
            contents(&log),
            model(&writes, &offsets, log.active_base(), false)
        );
    }

    #[test]
    fn a_small_map_cleans_in_several_passes_to_the_same_log() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = PartitionLog::open(dir.path(), config(60_000)).unwrap();
        let writes: Vec<(u8, Option<u8>)> = (0..80u8).map(|i| (i % 20, Some(i))).collect();
        let offsets = write(&mut log, &writes);
        let now = modified_ms(&log.active_file()).unwrap();
        // Room for about 4 keys per pass.
        let passes = clean_fully(&mut log, now, 4 * 60);
        assert!(passes > 1, "the map filled: {passes} passes");
        assert_eq!(
            contents(&log),
            model(&writes, &offsets, log.active_base(), true)
        );
    }

    #[test]
    fn a_crash_during_the_swap_leaves_the_old_or_the_new_segments() {
        for crash_after_rename in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (mut log, _) = PartitionLog::open(dir.path(), config(60_000)).unwrap();
            let writes: Vec<(u8, Option<u8>)> = (0..40u8).map(|i| (i % 3, Some(i))).collect();
            let offsets = write(&mut log, &writes);
            let before = contents(&log);
            let now = modified_ms(&log.active_file()).unwrap();
            let job = log.clean_job(i64::MAX, now).unwrap().unwrap();
            let done = job.run(1 << 20, now).unwrap();
            let (seg, count) = &done.groups[0];
            let base = seg.base_offset;
            let end = done.sources[*count].info.base;
            if crash_after_rename {
                // The swap is in place and one old segment already went, then the crash.
                let stem = file_stem(base);
                std::fs::rename(
                    dir.path().join(CLEANING_DIR).join(format!("{stem}.log")),
                    dir.path().join(format!("{stem}.{}.swap", file_stem(end))),
                )
                .unwrap();
                std::fs::remove_file(dir.path().join(format!("{stem}.log"))).unwrap();
            }
            drop(done);
            drop(log);
            let (log, _) = PartitionLog::open(dir.path(), config(60_000)).unwrap();
            assert!(!dir.path().join(CLEANING_DIR).exists());
            let got = contents(&log);
            if crash_after_rename {
                // The first group is the cleaned one; the rest as before.
                for (o, r) in &got {
                    assert_eq!(before.get(o), Some(r), "offset {o} holds what it held");
                }
                let latest = model(&writes, &offsets, log.active_base(), true);
                for o in latest.keys() {
                    assert!(got.contains_key(o), "the latest record at {o} stays");
                }
                assert!(got.len() < before.len());
            } else {
                assert_eq!(got, before, "nothing was swapped: the old segments");
            }
        }
    }

    #[test]
    fn a_truncation_or_a_change_of_the_log_meanwhile_cancels_the_swap() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = PartitionLog::open(dir.path(), config(60_000)).unwrap();
        let writes: Vec<(u8, Option<u8>)> = (0..40u8).map(|i| (i % 3, Some(i))).collect();
        write(&mut log, &writes);
        let now = modified_ms(&log.active_file()).unwrap();
        let before = contents(&log);
        let job = log.clean_job(i64::MAX, now).unwrap().unwrap();
        let done = job.run(1 << 20, now).unwrap();
        log.truncate_to(3).unwrap();
        assert!(!log.install_clean(done).unwrap());
        let after = contents(&log);
        assert_eq!(
            after,
            before.range(..3).map(|(k, v)| (*k, v.clone())).collect()
        );
    }

    #[test]
    fn a_cut_in_a_gap_goes_back_to_where_the_gap_starts() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = PartitionLog::open(dir.path(), config(60_000)).unwrap();
        // k0 at 0, then k1 written 20 times: the cleaner leaves 0, (gap), 20.., active.
        let mut writes = vec![(0u8, Some(0u8))];
        writes.extend((1..40u8).map(|i| (1u8, Some(i))));
        write(&mut log, &writes);
        let now = modified_ms(&log.active_file()).unwrap();
        clean_fully(&mut log, now, 1 << 20);
        let got = contents(&log);
        assert!(
            got.contains_key(&0) && !got.contains_key(&5),
            "a gap after 0: {got:?}"
        );
        assert_eq!(
            log.cut_point(5).unwrap(),
            1,
            "the gap starts after the batch at 0"
        );
        assert_eq!(log.truncate_to(5).unwrap(), 1);
        assert_eq!(log.next_offset(), 1);
        // A copy that still has the records there sends them again from 1: they are taken.
        let mut b = build::values(1, &[b"again"]);
        batch::set_base_offset(&mut b, 3);
        assert_eq!(
            log.append_exact(&b).unwrap(),
            3,
            "a gap past the end is taken"
        );
    }

    #[test]
    fn retention_deletes_the_segments_compaction_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(60_000);
        cfg.delete = true; // compact,delete
                           // Long enough that no record (written at 1970 + 1 s) is past it.
        cfg.retention_time = Some(Duration::from_secs(100 * 365 * 24 * 3600));
        let (mut log, _) = PartitionLog::open(dir.path(), cfg).unwrap();
        // One key overwritten: every closed segment but the last ends up empty.
        let writes: Vec<(u8, Option<u8>)> = (0..40u8).map(|i| (0, Some(i))).collect();
        write(&mut log, &writes);
        write(&mut log, &[(1, Some(0))]);
        let now = modified_ms(&log.active_file()).unwrap();
        clean_fully(&mut log, now, 1 << 20);
        let before = contents(&log);
        let empty = log.segments.iter().filter(|s| s.size == 0).count();
        assert!(empty > 0, "compaction emptied segments");
        let deleted = log.enforce_retention(now).unwrap();
        assert!(deleted >= 1, "the leading empty segments go");
        assert!(log.segments.len() == 1 || log.segments[0].size > 0);
        assert_eq!(contents(&log), before, "no record goes with them");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// For any sequence of keyed writes and tombstones, any map budget: once the cleaner
        /// has nothing left to do, the log is the model "last write per key below the active
        /// segment, tombstones gone after their delay", every record at its own offset.
        #[test]
        fn the_compacted_log_is_the_last_write_per_key(
            writes in proptest::collection::vec((0u8..12, proptest::option::weighted(0.8, 0u8..255)), 1..120),
            map_keys in 1usize..16,
            later in proptest::bool::ANY,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (mut log, _) = PartitionLog::open(dir.path(), config(60_000)).unwrap();
            let offsets = write(&mut log, &writes);
            let now = modified_ms(&log.active_file()).unwrap() + if later { 120_000 } else { 0 };
            clean_fully(&mut log, now, map_keys * 60);
            let want = model(&writes, &offsets, log.active_base(), !later);
            proptest::prop_assert_eq!(contents(&log), want);
        }
    }
}
