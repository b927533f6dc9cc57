//! The partition log: a directory of segments holding Kafka record batches byte for byte.
//!
//! Owns: the on-disk layout (`<topic>-<partition>/<base offset>.log|.index|.timeindex`), offset
//! assignment (the base offset field, outside the CRC), rolling by size and age, retention by
//! time and bytes, recovery on open, and locating bytes for reads. Does not own: who may write
//! (idempotence, mirrors, epochs: see [`crate::broker`]), when to fsync (the broker's group
//! commit writer calls [`PartitionLog::sync`]), or the wire protocol.
//!
//! Invariants, asserted: offsets strictly increase across batches and segments; a segment's base
//! offset is the offset of its first batch; the log end offset never goes back except by
//! [`PartitionLog::truncate_to`].

pub mod cleaner;
pub mod compact;
pub mod epochs;
pub mod index;
pub mod segment;
pub mod txn;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::batch::{self, BatchHeader, HEADER_BYTES};
use epochs::EpochCache;
pub use epochs::EpochEntry;
use segment::Segment;

/// Storage settings of one partition.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Roll the active segment when it would grow past this.
    pub segment_bytes: u64,
    /// Roll the active segment when it is older than this.
    pub segment_age: Duration,
    /// Delete whole segments whose newest record is older than this (`None`: keep).
    pub retention_time: Option<Duration>,
    /// Delete the oldest segments while the partition is larger than this (`None`: no cap).
    pub retention_bytes: Option<u64>,
    /// Bytes between offset index entries.
    pub index_interval_bytes: u64,
    /// `cleanup.policy` has `delete`: retention applies, and DeleteRecords is allowed.
    pub delete: bool,
    /// `cleanup.policy` has `compact`: the cleaner keeps the latest record per key.
    pub compact: Option<cleaner::CompactConfig>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 1 << 30,
            segment_age: Duration::from_secs(7 * 24 * 3600),
            retention_time: Some(Duration::from_secs(7 * 24 * 3600)),
            retention_bytes: None,
            index_interval_bytes: 4096,
            delete: true,
            compact: None,
        }
    }
}

#[derive(Debug, Error)]
pub enum LogError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("offset {offset} is out of range [{start}, {end}]")]
    OffsetOutOfRange { offset: i64, start: i64, end: i64 },
    #[error("corrupt log in {dir}: {message}")]
    Corrupt { dir: PathBuf, message: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Bytes to send for a read: a range of one segment file. Read them with `pread` or `sendfile`
/// after releasing the partition lock; the file stays readable even if retention deletes it.
#[derive(Debug, Clone)]
pub struct ReadSlice {
    pub file: Arc<File>,
    pub position: u64,
    pub len: usize,
}

impl ReadSlice {
    /// An empty range (no records).
    pub fn empty() -> ReadSlice {
        static EMPTY: std::sync::OnceLock<Arc<File>> = std::sync::OnceLock::new();
        let file = EMPTY
            .get_or_init(|| Arc::new(File::open("/dev/null").expect("/dev/null")))
            .clone();
        ReadSlice {
            file,
            position: 0,
            len: 0,
        }
    }

    pub fn read(&self) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; self.len];
        self.file.read_exact_at(&mut buf, self.position)?;
        Ok(buf)
    }
}

/// What recovery did to a partition, for the log.
#[derive(Debug, Default, Clone)]
pub struct OpenReport {
    pub segments: usize,
    pub truncated_bytes: u64,
    pub reason: Option<String>,
}

/// One partition's log.
#[derive(Debug)]
pub struct PartitionLog {
    dir: PathBuf,
    config: LogConfig,
    /// Sorted by base offset; the last is the active segment. Never empty.
    segments: Vec<Segment>,
    /// At which offset each region epoch began.
    epochs: EpochCache,
    /// The log start offset: at least the first segment's base; moved further (inside a
    /// segment) by DeleteRecords, and kept in [`START_FILE`] across restarts.
    start: i64,
    /// The cleaner checkpoint: records below it were compacted (kept in
    /// [`compact::CHECKPOINT_FILE`]).
    clean_to: i64,
    /// When the earliest tombstone the last compaction kept may go (`None`: not known).
    tombstone_due_ms: Option<i64>,
    /// The open and aborted transactions of the log (see [`txn`]).
    txn: txn::TxnIndex,
    /// The last snapshot of `txn` written to [`txn::SNAPSHOT_FILE`]: the offset it describes
    /// the log below, and the index then.
    txn_snapshot: Option<(i64, txn::TxnIndex)>,
}

/// The file of a partition's log start offset (when DeleteRecords moved it inside a segment).
const START_FILE: &str = "log-start-offset";

impl PartitionLog {
    /// Open (or create) the log in `dir`, recovering the active segment.
    pub fn open(dir: &Path, config: LogConfig) -> Result<(Self, OpenReport), LogError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        compact::recover_swaps(dir)?;
        let mut bases: Vec<i64> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(stem) = name.strip_suffix(".log") {
                if let Ok(base) = stem.parse::<i64>() {
                    bases.push(base);
                }
            }
        }
        bases.sort_unstable();
        let mut report = OpenReport::default();
        let mut segments = Vec::with_capacity(bases.len().max(1));
        let n = bases.len();
        for (i, base) in bases.into_iter().enumerate() {
            let active = i + 1 == n;
            let (seg, r) = Segment::open(dir, base, config.index_interval_bytes, active)
                .map_err(io_err(dir))?;
            if r.truncated_bytes > 0 {
                tracing::warn!(
                    file = %seg.log_path().display(),
                    truncated_bytes = r.truncated_bytes,
                    kept_bytes = r.valid_bytes,
                    kept_batches = r.batches,
                    reason = r.reason.as_deref().unwrap_or(""),
                    "recovery truncated a torn or corrupt tail of {}: cut {} bytes, kept {} bytes",
                    seg.log_path().display(),
                    r.truncated_bytes,
                    r.valid_bytes
                );
                report.truncated_bytes += r.truncated_bytes;
                report.reason = r.reason.clone();
            }
            if let Some(prev) = segments.last() {
                let prev: &Segment = prev;
                assert!(
                    seg.base_offset >= prev.next_offset,
                    "segments overlap in {}",
                    dir.display()
                );
            }
            segments.push(seg);
        }
        if segments.is_empty() {
            segments
                .push(Segment::create(dir, 0, config.index_interval_bytes).map_err(io_err(dir))?);
        }
        report.segments = segments.len();
        let log_end = segments.last().expect("not empty").next_offset;
        let (epochs, existed) = EpochCache::open(dir, log_end).map_err(io_err(dir))?;
        let first = segments[0].base_offset;
        let stored = std::fs::read_to_string(dir.join(START_FILE))
            .ok()
            .and_then(|t| t.trim().parse::<i64>().ok())
            .unwrap_or(first);
        let checkpoint = compact::read_checkpoint(dir);
        let mut log = PartitionLog {
            dir: dir.to_path_buf(),
            config,
            segments,
            epochs,
            start: stored.clamp(first, log_end),
            clean_to: checkpoint.map_or(first, |c| c.0).min(log_end),
            tombstone_due_ms: checkpoint.and_then(|c| c.1),
            txn: txn::TxnIndex::default(),
            txn_snapshot: None,
        };
        if !existed {
            // No history file yet (a new partition, or one written before epochs): scan it.
            let mut found: Vec<EpochEntry> = Vec::new();
            log.for_each_batch(0, |h| {
                let e = h.partition_leader_epoch;
                if e >= 0 && found.last().is_none_or(|l| e > l.epoch) {
                    found.push(EpochEntry {
                        epoch: e,
                        start_offset: h.base_offset,
                    });
                }
            })?;
            log.epochs.rebuild(found).map_err(io_err(dir))?;
        }
        log.txn_snapshot = std::fs::read(dir.join(txn::SNAPSHOT_FILE))
            .ok()
            .and_then(|b| txn::TxnIndex::decode(&b))
            .filter(|(at, _)| *at <= log_end);
        log.rebuild_txns()?;
        if log
            .txn_snapshot
            .as_ref()
            .is_none_or(|(at, _)| *at < log.active_base())
        {
            // The next open scans from here rather than from further back.
            log.snapshot_txns()?;
        }
        Ok((log, report))
    }

    /// Rebuild the transaction index from the last snapshot at or below the log end (from the
    /// whole log without one).
    fn rebuild_txns(&mut self) -> Result<(), LogError> {
        let end = self.next_offset();
        let (from, mut ix) = match &self.txn_snapshot {
            Some((at, ix)) if *at <= end => (*at, ix.clone()),
            _ => (0, txn::TxnIndex::default()),
        };
        self.scan_txns(from, &mut ix)?;
        ix.prune_below(self.start_offset());
        self.txn = ix;
        Ok(())
    }

    /// Feed every batch from `from` on to `ix`.
    fn scan_txns(&self, from: i64, ix: &mut txn::TxnIndex) -> Result<(), LogError> {
        for seg in self.segments.iter().filter(|s| s.next_offset > from) {
            let mut pos = 0u64;
            while let Some(b) = seg.batch_at(pos).map_err(io_err(&self.dir))? {
                let h = b.header;
                pos += h.total_bytes() as u64;
                if h.base_offset < from || !h.is_transactional() {
                    continue;
                }
                let marker = if h.is_control() {
                    let slice = ReadSlice {
                        file: seg.file(),
                        position: b.position,
                        len: h.total_bytes(),
                    };
                    txn::marker(&slice.read().map_err(io_err(&self.dir))?)
                } else {
                    None
                };
                ix.observe(&h, marker);
            }
        }
        Ok(())
    }

    /// Write the transaction index as the snapshot of the log below its end.
    fn snapshot_txns(&mut self) -> Result<(), LogError> {
        let at = self.next_offset();
        let path = self.dir.join(txn::SNAPSHOT_FILE);
        crate::durable::write_atomic(&path, &self.txn.encode(at)).map_err(io_err(&self.dir))?;
        self.txn_snapshot = Some((at, self.txn.clone()));
        Ok(())
    }

    /// The open and aborted transactions of this log.
    pub fn txns(&self) -> &txn::TxnIndex {
        &self.txn
    }

    /// The last stable offset under the high watermark `hw`: consumers reading committed
    /// records stop at the first open transaction.
    pub fn last_stable(&self, hw: i64) -> i64 {
        self.txn.last_stable(hw)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    pub fn set_config(&mut self, config: LogConfig) {
        self.config = config;
    }

    fn active(&self) -> &Segment {
        self.segments.last().expect("a log always has a segment")
    }

    /// The offset the next batch will get (the log end offset).
    pub fn next_offset(&self) -> i64 {
        self.active().next_offset
    }

    /// The first offset still in the log (the log start offset).
    pub fn start_offset(&self) -> i64 {
        self.start.max(self.segments[0].base_offset)
    }

    /// Move the log start offset up to `offset` (DeleteRecords; a follower taking its leader's
    /// log start): records below it are gone for readers, whole segments below it are deleted.
    /// Never moves it back, never past the log end. Durable when this returns. Returns the new
    /// log start offset.
    pub fn advance_start(&mut self, offset: i64) -> Result<i64, LogError> {
        let end = self.next_offset();
        if offset > end {
            return Err(LogError::OffsetOutOfRange {
                offset,
                start: self.start_offset(),
                end,
            });
        }
        if offset <= self.start_offset() {
            return Ok(self.start_offset());
        }
        crate::durable::write_atomic(&self.dir.join(START_FILE), offset.to_string().as_bytes())
            .map_err(io_err(&self.dir))?;
        self.start = offset;
        if offset == end && self.active().size > 0 {
            // Everything is deleted: roll, so the old active segment can go too.
            self.roll()?;
        }
        while self.segments.len() > 1 && self.segments[0].next_offset <= offset {
            self.delete_oldest()?;
        }
        self.txn.prune_below(self.start_offset());
        Ok(self.start_offset())
    }

    /// Total bytes of all segments.
    pub fn size_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.size).sum()
    }

    /// The partition's epoch history.
    pub fn epochs(&self) -> &[EpochEntry] {
        self.epochs.entries()
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Append a validated batch, assigning it offsets from the log end. `bytes` is rewritten in
    /// place (base offset, and the epoch when given) and written as is. Returns the base offset.
    pub fn append(&mut self, bytes: &[u8], epoch: Option<i32>) -> Result<i64, LogError> {
        let base = self.next_offset();
        // The offsets and the leader epoch lie outside the CRC: patch a copy of the header and
        // write it before the rest, which goes to the file as the client sent it.
        let mut head = [0u8; HEADER_BYTES];
        head.copy_from_slice(&bytes[..HEADER_BYTES]);
        batch::set_base_offset(&mut head, base);
        if let Some(e) = epoch {
            batch::set_partition_leader_epoch(&mut head, e);
        }
        let h = BatchHeader::parse(&head).expect("validated before append");
        self.epochs
            .observe(h.partition_leader_epoch, base)
            .map_err(io_err(&self.dir))?;
        self.maybe_roll(bytes.len() as u64)?;
        let dir = self.dir.clone();
        self.segments
            .last_mut()
            .expect("a log always has a segment")
            .append_parts(&head, &bytes[HEADER_BYTES..], &h)
            .map_err(io_err(&dir))?;
        self.observe_txn(&h, bytes);
        Ok(base)
    }

    /// Keep the transaction index in step with a batch just appended.
    fn observe_txn(&mut self, h: &BatchHeader, bytes: &[u8]) {
        if h.is_transactional() {
            let marker = if h.is_control() {
                txn::marker(bytes)
            } else {
                None
            };
            self.txn.observe(h, marker);
        }
    }

    /// Append a batch that already carries its offsets (a mirror or follower copy): its base
    /// offset must be at or past the log end offset, so the copy stays offset-identical. Past
    /// it is a gap the source's cleaner left (its log holds no record there either).
    pub fn append_exact(&mut self, bytes: &[u8]) -> Result<i64, LogError> {
        let h = batch::validate(bytes).map_err(|e| LogError::Io {
            path: self.dir.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;
        if h.base_offset < self.next_offset() {
            return Err(LogError::OffsetOutOfRange {
                offset: h.base_offset,
                start: self.start_offset(),
                end: self.next_offset(),
            });
        }
        self.epochs
            .observe(h.partition_leader_epoch, h.base_offset)
            .map_err(io_err(&self.dir))?;
        self.append_at(bytes, &h)?;
        self.observe_txn(&h, bytes);
        Ok(h.base_offset)
    }

    fn append_at(&mut self, bytes: &[u8], h: &BatchHeader) -> Result<(), LogError> {
        self.maybe_roll(bytes.len() as u64)?;
        let dir = self.dir.clone();
        let seg = self
            .segments
            .last_mut()
            .expect("a log always has a segment");
        seg.append(bytes, h).map_err(io_err(&dir))
    }

    fn maybe_roll(&mut self, incoming: u64) -> Result<(), LogError> {
        let active = self.active();
        let too_big = active.size > 0 && active.size + incoming > self.config.segment_bytes;
        let too_old = active.size > 0
            && active
                .created
                .elapsed()
                .map(|age| age >= self.config.segment_age)
                .unwrap_or(false);
        // Relative offsets in the index are u32.
        let too_many = active.next_offset - active.base_offset > (u32::MAX / 2) as i64;
        if too_big || too_old || too_many {
            self.roll()?;
        }
        Ok(())
    }

    /// Start a new active segment at the log end; the old one is made durable first, so recovery
    /// only ever needs to scan the active segment.
    pub fn roll(&mut self) -> Result<(), LogError> {
        let next = self.next_offset();
        self.active().sync_all().map_err(io_err(&self.dir))?;
        let seg = Segment::create(&self.dir, next, self.config.index_interval_bytes)
            .map_err(io_err(&self.dir))?;
        crate::durable::sync_dir(&self.dir).map_err(io_err(&self.dir))?;
        self.segments.push(seg);
        // Recovery scans the transactions from the new segment on.
        self.snapshot_txns()
    }

    /// fdatasync the active segment (the group commit writer calls this).
    pub fn sync(&self) -> Result<(), LogError> {
        self.active().sync().map_err(io_err(&self.dir))
    }

    /// A handle that syncs the active segment without holding the partition lock.
    pub fn active_file(&self) -> Arc<File> {
        self.active().file()
    }

    /// Locate up to `max_bytes` starting at the batch that holds `offset`. At least one whole
    /// batch is returned even if larger than `max_bytes` (as Kafka does, so consumers progress).
    /// Returns `Ok(None)` at the log end.
    pub fn read(&self, offset: i64, max_bytes: usize) -> Result<Option<ReadSlice>, LogError> {
        let end = self.next_offset();
        if offset < self.start_offset() || offset > end {
            return Err(LogError::OffsetOutOfRange {
                offset,
                start: self.start_offset(),
                end,
            });
        }
        if offset == end {
            return Ok(None);
        }
        let i = self
            .segments
            .partition_point(|s| s.base_offset <= offset)
            .saturating_sub(1);
        for seg in &self.segments[i..] {
            if let Some(b) = seg.find_batch(offset).map_err(io_err(&self.dir))? {
                let avail = (seg.size - b.position) as usize;
                let first = b.header.total_bytes();
                let len = avail.min(max_bytes.max(first));
                return Ok(Some(ReadSlice {
                    file: seg.file(),
                    position: b.position,
                    len,
                }));
            }
        }
        Ok(None)
    }

    /// Like [`PartitionLog::read`], but nothing at or past `below`: a leader's high watermark,
    /// so consumers see only what every in-sync replica holds. An offset between `below` and
    /// the log end reads as nothing yet (not out of range), as in Kafka. A `below` inside a
    /// batch stops before that batch.
    pub fn read_below(
        &self,
        offset: i64,
        max_bytes: usize,
        below: i64,
    ) -> Result<Option<ReadSlice>, LogError> {
        let end = self.next_offset();
        if offset >= below && offset >= self.start_offset() && offset <= end {
            return Ok(None);
        }
        let Some(mut slice) = self.read(offset, max_bytes)? else {
            return Ok(None);
        };
        if below >= end {
            return Ok(Some(slice));
        }
        let i = self
            .segments
            .partition_point(|s| s.base_offset <= below)
            .saturating_sub(1);
        let seg = &self.segments[i];
        if Arc::ptr_eq(&seg.file(), &slice.file) {
            if let Some(b) = seg.find_batch(below).map_err(io_err(&self.dir))? {
                if b.position <= slice.position {
                    return Ok(None);
                }
                slice.len = slice.len.min((b.position - slice.position) as usize);
            }
        }
        Ok(Some(slice))
    }

    /// The offset and timestamp of the first record whose timestamp is at or after `timestamp`
    /// (found through the time index, then within the batch); `None` when every record is older.
    pub fn offset_for_timestamp(&self, timestamp: i64) -> Result<Option<(i64, i64)>, LogError> {
        for seg in &self.segments {
            if seg.max_timestamp < timestamp {
                continue;
            }
            if let Some(b) = seg
                .find_by_timestamp(timestamp)
                .map_err(io_err(&self.dir))?
            {
                // The batch reaches the timestamp; the answer is its first record that does
                // (Kafka's rule), which needs the records, decompressed if need be.
                let slice = ReadSlice {
                    file: seg.file(),
                    position: b.position,
                    len: b.header.total_bytes(),
                };
                let bytes = slice.read().map_err(io_err(&self.dir))?;
                let (off, ts) = batch::first_record_at_or_after(&bytes, timestamp)
                    .unwrap_or((b.header.base_offset, b.header.max_timestamp));
                return Ok(Some((off.max(self.start_offset()), ts)));
            }
        }
        Ok(None)
    }

    /// The largest timestamp in the log and the offset of the batch that holds it.
    pub fn max_timestamp(&self) -> Result<Option<(i64, i64)>, LogError> {
        let Some(seg) = self.segments.iter().rev().find(|s| s.max_timestamp >= 0) else {
            return Ok(None);
        };
        let ts = seg.max_timestamp;
        Ok(seg
            .find_by_timestamp(ts)
            .map_err(io_err(&self.dir))?
            .map(|b| (ts, b.header.base_offset)))
    }

    /// Visit every batch header from `offset` on, in order (used to rebuild producer state).
    pub fn for_each_batch(
        &self,
        from_segment_base: i64,
        mut f: impl FnMut(&BatchHeader),
    ) -> Result<(), LogError> {
        for seg in self
            .segments
            .iter()
            .filter(|s| s.next_offset > from_segment_base)
        {
            let mut pos = 0u64;
            while let Some(b) = seg.batch_at(pos).map_err(io_err(&self.dir))? {
                f(&b.header);
                pos += b.header.total_bytes() as u64;
            }
        }
        Ok(())
    }

    /// Base offset of the active segment.
    pub fn active_base(&self) -> i64 {
        self.active().base_offset
    }

    /// Apply retention: delete whole non-active segments that are too old, then the oldest while
    /// the log is over its byte limit. An active segment past the retention time is rolled first
    /// so that it can be deleted next time. Returns the number of segments deleted.
    pub fn enforce_retention(&mut self, now_ms: i64) -> Result<usize, LogError> {
        let mut deleted = 0;
        if !self.config.delete {
            // `cleanup.policy=compact` alone: the cleaner, not time or size, removes records.
            return Ok(0);
        }
        if let Some(rt) = self.config.retention_time {
            let limit = now_ms - rt.as_millis() as i64;
            // A closed segment the cleaner emptied (`compact,delete`) holds nothing to keep.
            while self.segments.len() > 1
                && (self.segments[0].size == 0
                    || (self.segments[0].max_timestamp >= 0
                        && self.segments[0].max_timestamp < limit))
            {
                self.delete_oldest()?;
                deleted += 1;
            }
            let a = self.active();
            if self.segments.len() == 1
                && a.size > 0
                && a.max_timestamp >= 0
                && a.max_timestamp < limit
            {
                self.roll()?;
            }
        }
        if let Some(rb) = self.config.retention_bytes {
            while self.segments.len() > 1 && self.size_bytes() - self.segments[0].size >= rb {
                self.delete_oldest()?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    fn delete_oldest(&mut self) -> Result<(), LogError> {
        let seg = self.segments.remove(0);
        tracing::info!(
            segment = %seg.log_path().display(),
            base_offset = seg.base_offset,
            next_offset = seg.next_offset,
            "retention deleted segment"
        );
        seg.delete().map_err(io_err(&self.dir))?;
        self.txn.prune_below(self.start_offset());
        Ok(())
    }

    /// Delete whole segments that end at or before `offset` (never the active one). Used to
    /// trim internal topics after their live entries were written again further on.
    pub fn delete_segments_before(&mut self, offset: i64) -> Result<usize, LogError> {
        let mut n = 0;
        while self.segments.len() > 1 && self.segments[0].next_offset <= offset {
            self.delete_oldest()?;
            n += 1;
        }
        Ok(n)
    }

    /// Cut the log back to [`PartitionLog::cut_point`]`(offset)` (used by mirrors and rejoin,
    /// never by clients) and return the new end. Whole segments past it are removed; the
    /// segment holding it is truncated at that batch boundary.
    pub fn truncate_to(&mut self, offset: i64) -> Result<i64, LogError> {
        // One rule for every cut: whole batches only (`cut_point`). A cut inside a batch once
        // kept the batch here while the quarantine took its records from the cut on, so they
        // stood in both places and the log end never reached the cut.
        let offset = self.cut_point(offset)?;
        if offset >= self.next_offset() {
            return Ok(self.next_offset());
        }
        while self.segments.len() > 1 && self.active().base_offset >= offset {
            let seg = self.segments.pop().expect("len > 1");
            seg.delete().map_err(io_err(&self.dir))?;
        }
        let base = self.active().base_offset;
        let idx = self.config.index_interval_bytes;
        // Reopen the active segment cut at the batch that starts at `offset`.
        let pos = {
            let seg = self.active();
            let mut pos = 0u64;
            loop {
                match seg.batch_at(pos).map_err(io_err(&self.dir))? {
                    Some(b) if b.header.base_offset < offset => {
                        pos += b.header.total_bytes() as u64
                    }
                    _ => break pos,
                }
            }
        };
        let f = self.active().file();
        f.set_len(pos).map_err(io_err(&self.dir))?;
        f.sync_all().map_err(io_err(&self.dir))?;
        self.segments.pop();
        let (seg, _) = Segment::open(&self.dir, base, idx, true).map_err(io_err(&self.dir))?;
        self.segments.push(seg);
        if self.next_offset() < offset {
            // The cut is the log start, inside a segment whose batches all lay past it: the
            // log end is the cut, as in Kafka (a restart finds the segment's own end again).
            self.segments.last_mut().expect("not empty").next_offset = offset;
        }
        // After the log: a crash in between leaves entries past the end, dropped on open.
        self.epochs.truncate_to(offset).map_err(io_err(&self.dir))?;
        if self.clean_to > offset {
            self.set_clean_to(offset)?;
        }
        if self
            .txn_snapshot
            .as_ref()
            .is_some_and(|(at, _)| *at > offset)
        {
            let _ = std::fs::remove_file(self.dir.join(txn::SNAPSHOT_FILE));
            self.txn_snapshot = None;
        }
        self.rebuild_txns()?;
        assert_eq!(
            self.next_offset(),
            offset,
            "a cut ends the log at its cut point"
        );
        Ok(offset)
    }

    /// Empty the log and start it again at `offset` (Kafka's `truncateFullyAndStartAt`): a
    /// follower whose leader's log now starts past this log's end (retention deleted what it
    /// would fetch next). Every segment is deleted, newest first, then one empty segment at
    /// `offset` is created and the epoch history emptied (the leader's batches bring theirs). A
    /// crash in between leaves a shorter or an empty log, which the next fetch resets again.
    pub fn reset_to(&mut self, offset: i64) -> Result<(), LogError> {
        assert!(
            offset >= self.next_offset(),
            "a reset moves the log start forward past its end ({offset} < {})",
            self.next_offset()
        );
        while let Some(seg) = self.segments.pop() {
            seg.delete().map_err(io_err(&self.dir))?;
        }
        let seg = Segment::create(&self.dir, offset, self.config.index_interval_bytes)
            .map_err(io_err(&self.dir))?;
        crate::durable::sync_dir(&self.dir).map_err(io_err(&self.dir))?;
        self.segments.push(seg);
        self.start = offset;
        let _ = std::fs::remove_file(self.dir.join(START_FILE));
        self.set_clean_to(offset)?;
        self.epochs.rebuild(Vec::new()).map_err(io_err(&self.dir))?;
        self.txn = txn::TxnIndex::default();
        self.snapshot_txns()?;
        assert_eq!((self.start_offset(), self.next_offset()), (offset, offset));
        Ok(())
    }

    /// Where a cut of the log at `offset` really falls: the base offset of the batch that holds
    /// `offset` (batches are never split), `offset` itself at a batch boundary, the log end past
    /// it. Truncation (`truncate_to`), the quarantine of a divergent tail and the answer to the
    /// mirror all use it, so the records set aside are exactly the records cut, and the log
    /// ends where the cut says. Never above `offset`.
    pub fn cut_point(&self, offset: i64) -> Result<i64, LogError> {
        if offset >= self.next_offset() {
            return Ok(self.next_offset());
        }
        if offset <= self.start_offset() {
            return Ok(offset.max(self.start_offset()));
        }
        let Some(slice) = self.read(offset, 1)? else {
            return Ok(self.next_offset());
        };
        let bytes = slice.read().map_err(io_err(&self.dir))?;
        let h = BatchHeader::parse(&bytes).map_err(|e| LogError::Corrupt {
            dir: self.dir.clone(),
            message: format!("no batch header at offset {offset}: {e}"),
        })?;
        assert!(
            offset < h.next_offset(),
            "the batch read for {offset} is not below it"
        );
        if h.base_offset <= offset {
            return Ok(h.base_offset);
        }
        // In a gap the cleaner left: the cut goes back to where the gap starts, the end of the
        // batch before it. Every copy of the partition has the same batch boundaries (cleaning
        // keeps each batch's offsets), so a copy that still holds the gap's records can send
        // them again from there.
        Ok(self.end_before(offset)?.max(self.start_offset()))
    }

    /// The end of the last batch that starts at or below `offset` (the first segment's base if
    /// none does).
    fn end_before(&self, offset: i64) -> Result<i64, LogError> {
        let i = self
            .segments
            .partition_point(|s| s.base_offset <= offset)
            .saturating_sub(1);
        for seg in self.segments[..=i].iter().rev() {
            let (mut pos, mut last) = (0u64, None);
            while let Some(b) = seg.batch_at(pos).map_err(io_err(&self.dir))? {
                if b.header.base_offset > offset {
                    break;
                }
                last = Some(b.header.next_offset());
                pos += b.header.total_bytes() as u64;
            }
            if let Some(end) = last {
                return Ok(end);
            }
        }
        Ok(self.segments[0].base_offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::build;
    use crate::clock::now_ms;

    fn small() -> LogConfig {
        LogConfig {
            segment_bytes: 300,
            index_interval_bytes: 100,
            ..Default::default()
        }
    }

    fn append_values(log: &mut PartitionLog, ts: i64, vals: &[&[u8]]) -> i64 {
        let b = build::values(ts, vals);
        log.append(&b, None).unwrap()
    }

    fn txn_batch(pid: i64, vals: &[&[u8]]) -> Vec<u8> {
        let recs: Vec<build::Record> = vals
            .iter()
            .map(|v| build::Record {
                value: Some(v.to_vec()),
                ..Default::default()
            })
            .collect();
        build::with_attributes(
            build::batch(0, now_ms(), Some((pid, 0, 0)), &recs),
            crate::batch::TRANSACTIONAL,
        )
    }

    #[test]
    fn transactions_survive_rolls_reopens_and_cuts() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = PartitionLog::open(dir.path(), small()).unwrap().0;
        append_values(&mut log, now_ms(), &[b"plain"]); // 0
        log.append(&txn_batch(7, &[b"a", b"b"]), None).unwrap(); // 1-2
        log.append(&txn_batch(8, &[b"c"]), None).unwrap(); // 3
        assert_eq!(log.last_stable(log.next_offset()), 1);
        let abort = txn::control_batch(7, 0, txn::Marker::Abort, 0, now_ms());
        assert_eq!(log.append(&abort, None).unwrap(), 4);
        assert_eq!(log.last_stable(log.next_offset()), 3);
        // Enough to roll segments several times (snapshots at each roll).
        for _ in 0..10 {
            append_values(&mut log, now_ms(), &[&[b'x'; 100]]);
        }
        assert!(log.segment_count() > 2);
        let commit = txn::control_batch(8, 0, txn::Marker::Commit, 0, now_ms());
        let commit_at = log.append(&commit, None).unwrap();
        log.append(&txn_batch(9, &[b"d"]), None).unwrap();
        let expect = log.txns().clone();
        assert_eq!(log.last_stable(i64::MAX), commit_at + 1);
        drop(log);
        let mut log = PartitionLog::open(dir.path(), small()).unwrap().0;
        assert_eq!(
            log.txns(),
            &expect,
            "recovered from the snapshot and the scan"
        );
        assert_eq!(log.txns().aborted_in(0, 100).len(), 1);
        // Cut below the commit marker: producer 8's transaction is open again.
        log.truncate_to(commit_at).unwrap();
        assert_eq!(log.last_stable(i64::MAX), 3);
        // Cut below everything transactional: nothing open, nothing aborted.
        log.truncate_to(1).unwrap();
        assert_eq!(log.txns().open().count(), 0);
        assert_eq!(log.txns().aborted_count(), 0);
        drop(log);
        let log = PartitionLog::open(dir.path(), small()).unwrap().0;
        assert_eq!(log.next_offset(), 1);
        assert_eq!(log.txns(), &txn::TxnIndex::default());
    }

    #[test]
    fn offsets_are_assigned_and_segments_roll() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = PartitionLog::open(dir.path(), small()).unwrap();
        let mut expected = 0;
        for i in 0..20 {
            let off = append_values(&mut log, 1000 + i, &[b"value-aaaaaaaaaaaaaaaaaaaa", b"v2"]);
            assert_eq!(off, expected);
            expected += 2;
        }
        assert_eq!(log.next_offset(), 40);
        assert!(log.segment_count() > 3, "rolled by size");
        // Every offset reads back the batch that holds it.
        for o in 0..40 {
            let s = log.read(o, 1).unwrap().unwrap();
            let bytes = s.read().unwrap();
            let h = batch::validate(&bytes).unwrap();
            assert!(h.base_offset <= o && o <= h.last_offset());
        }
        assert!(log.read(40, 100).unwrap().is_none());
        assert!(log.read(41, 100).is_err());
        // By timestamp: the first batch at or after.
        assert_eq!(log.offset_for_timestamp(1005).unwrap().unwrap().0, 10);
        assert!(log.offset_for_timestamp(5000).unwrap().is_none());
    }

    #[test]
    fn reads_below_the_watermark_stop_at_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = PartitionLog::open(dir.path(), small()).unwrap();
        for i in 0..20 {
            append_values(&mut log, 1000 + i, &[b"value-aaaaaaaaaaaaaaaaaaaa", b"v2"]);
        }
        for below in [0i64, 2, 6, 13, 22, 40] {
            for o in 0..40 {
                let got = log.read_below(o, 1 << 20, below).unwrap();
                // Batches hold two records: the one holding `o` ends at o | 1.
                if (o | 1) >= below {
                    assert!(got.is_none(), "at {o}, below {below}");
                    continue;
                }
                let bytes = got.expect("data below the watermark").read().unwrap();
                let last = batch::split(&bytes::Bytes::from(bytes))
                    .unwrap()
                    .last()
                    .map(|(_, h)| h.last_offset())
                    .unwrap();
                assert!(last >= o, "holds {o}");
                // An odd watermark falls inside a batch: that batch is not read.
                assert!(last < below, "at {o}: read {last}, below {below}");
            }
        }
        // Between the watermark and the end is nothing yet; past the end is out of range.
        assert!(log.read_below(40, 100, 30).unwrap().is_none());
        assert!(log.read_below(41, 100, 30).is_err());
    }

    #[test]
    fn a_batch_is_stored_as_sent_but_for_its_offset_and_leader_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = PartitionLog::open(dir.path(), LogConfig::default()).unwrap();
        append_values(&mut log, 1, &[b"first"]);
        let sent = build::values(2, &[b"x", b"y", b"z"]);
        assert_eq!(log.append(&sent, Some(7)).unwrap(), 1);
        let stored = log.read(1, 1 << 20).unwrap().unwrap().read().unwrap();
        let mut want = sent.clone();
        batch::set_base_offset(&mut want, 1);
        batch::set_partition_leader_epoch(&mut want, 7);
        assert_eq!(stored, want);
        let h = batch::validate(&stored).unwrap();
        assert_eq!((h.base_offset, h.partition_leader_epoch), (1, 7));
        // What was sent is untouched (the request buffer is shared, never patched).
        assert_eq!(BatchHeader::parse(&sent).unwrap().base_offset, 0);
    }

    #[test]
    fn reopen_recovers_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig::default();
        {
            let (mut log, _) = PartitionLog::open(dir.path(), cfg.clone()).unwrap();
            for i in 0..10 {
                append_values(&mut log, i, &[b"abc"]);
            }
            log.sync().unwrap();
        }
        let p = dir.path().join("00000000000000000000.log");
        let len = std::fs::metadata(&p).unwrap().len();
        // Tear the last batch in the middle.
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len - 5).unwrap();
        let (mut log, report) = PartitionLog::open(dir.path(), cfg.clone()).unwrap();
        assert!(report.truncated_bytes > 0);
        assert_eq!(log.next_offset(), 9);
        assert_eq!(append_values(&mut log, 99, &[b"next"]), 9);
        // Garbage appended after whole batches is cut too.
        drop(log);
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&[0xAB; 30]).unwrap();
        let (log, report) = PartitionLog::open(dir.path(), cfg).unwrap();
        assert_eq!(report.truncated_bytes, 30);
        assert_eq!(log.next_offset(), 10);
    }

    #[test]
    fn stale_index_of_an_old_segment_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut log, _) = PartitionLog::open(dir.path(), small()).unwrap();
            for i in 0..20 {
                append_values(&mut log, i, &[b"0123456789012345678901234567890123456789"]);
            }
        }
        std::fs::write(dir.path().join("00000000000000000000.index"), [1u8, 2, 3]).unwrap();
        let (log, _) = PartitionLog::open(dir.path(), small()).unwrap();
        for o in 0..20 {
            assert!(log.read(o, 1).unwrap().is_some());
        }
    }

    #[test]
    fn retention_deletes_old_segments_by_bytes_and_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = small();
        cfg.retention_bytes = Some(600);
        cfg.retention_time = None;
        let (mut log, _) = PartitionLog::open(dir.path(), cfg).unwrap();
        for i in 0..30 {
            append_values(&mut log, i, &[b"0123456789012345678901234567890123456789"]);
        }
        let before = log.segment_count();
        let n = log.enforce_retention(now_ms()).unwrap();
        assert!(n > 0);
        assert_eq!(log.segment_count(), before - n);
        assert!(log.size_bytes() < 600 + 300);
        assert!(log.start_offset() > 0);
        assert!(log.read(0, 10).is_err());
        let mut cfg = small();
        cfg.retention_time = Some(Duration::from_millis(10));
        log.set_config(cfg);
        log.enforce_retention(now_ms()).unwrap();
        log.enforce_retention(now_ms()).unwrap();
        assert_eq!(log.segment_count(), 1);
        assert_eq!(log.next_offset(), 30);
    }

    #[test]
    fn truncate_to_cuts_at_a_batch_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = PartitionLog::open(dir.path(), small()).unwrap();
        for i in 0..20 {
            append_values(&mut log, i, &[b"0123456789012345678901234567890123456789"]);
        }
        assert_eq!(log.truncate_to(7).unwrap(), 7);
        assert_eq!(log.next_offset(), 7);
        assert_eq!(append_values(&mut log, 50, &[b"x"]), 7);
    }

    #[test]
    fn the_log_start_moves_inside_a_segment_deletes_whole_ones_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = PartitionLog::open(dir.path(), small()).unwrap();
        for i in 0..20 {
            append_values(&mut log, i, &[b"0123456789012345678901234567890123456789"]);
        }
        let segs = log.segment_count();
        assert!(segs > 2);
        assert_eq!(log.advance_start(7).unwrap(), 7);
        assert_eq!(log.start_offset(), 7);
        assert!(
            log.segment_count() < segs,
            "segments wholly below 7 are deleted"
        );
        assert!(matches!(
            log.read(6, 100),
            Err(LogError::OffsetOutOfRange { start: 7, .. })
        ));
        assert!(log.read(7, 100).unwrap().is_some());
        assert_eq!(log.advance_start(3).unwrap(), 7, "never back");
        assert!(log.advance_start(21).is_err(), "never past the end");
        drop(log);
        let (mut log, _) = PartitionLog::open(dir.path(), small()).unwrap();
        assert_eq!((log.start_offset(), log.next_offset()), (7, 20));
        // Everything: the log is empty from 20 on, and takes the next batch there.
        assert_eq!(log.advance_start(20).unwrap(), 20);
        assert_eq!(log.segment_count(), 1);
        assert_eq!(append_values(&mut log, 99, &[b"x"]), 20);
    }

    #[test]
    fn a_reset_empties_the_log_and_starts_it_again_further_on() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = PartitionLog::open(dir.path(), small()).unwrap();
        for i in 0..20 {
            append_values(&mut log, i, &[b"0123456789012345678901234567890123456789"]);
        }
        assert!(log.segment_count() > 1);
        log.reset_to(500).unwrap();
        assert_eq!(
            (log.start_offset(), log.next_offset(), log.segment_count()),
            (500, 500, 1)
        );
        assert!(log.epochs().is_empty());
        assert!(log.read(0, 100).is_err(), "nothing below the new start");
        let mut b = build::values(1, &[b"x"]);
        batch::set_base_offset(&mut b, 500);
        assert_eq!(log.append_exact(&b).unwrap(), 500);
        drop(log);
        // What was reset stays reset after a restart.
        let (log, _) = PartitionLog::open(dir.path(), small()).unwrap();
        assert_eq!((log.start_offset(), log.next_offset()), (500, 501));
    }

    proptest::proptest! {
        /// Whatever the batches and wherever the cut: the log ends at the start of the batch
        /// holding the cut (never inside a batch, never above the cut), every batch wholly
        /// below it stays, and cutting there again changes nothing (no repeated truncation).
        #[test]
        fn a_cut_falls_on_the_batch_holding_it_and_once(
            sizes in proptest::collection::vec(1usize..6, 1..25),
            cut in 0i64..130,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (mut log, _) = PartitionLog::open(dir.path(), small()).unwrap();
            let mut bases = Vec::new();
            for (i, n) in sizes.iter().enumerate() {
                let vals: Vec<&[u8]> = (0..*n).map(|_| b"value-0123456789".as_slice()).collect();
                bases.push(append_values(&mut log, i as i64, &vals));
            }
            let end = log.next_offset();
            let want = if cut >= end {
                end
            } else {
                *bases.iter().filter(|b| **b <= cut).max().unwrap()
            };
            proptest::prop_assert_eq!(log.cut_point(cut).unwrap(), want);
            proptest::prop_assert_eq!(log.truncate_to(cut).unwrap(), want);
            proptest::prop_assert_eq!(log.next_offset(), want);
            proptest::prop_assert!(want <= cut.max(0).min(end) || want == end);
            // Every offset below the cut point still reads back its batch.
            for o in 0..want {
                let b = log.read(o, 1).unwrap().unwrap().read().unwrap();
                let h = batch::validate(&b).unwrap();
                proptest::prop_assert!(h.next_offset() <= want);
            }
            proptest::prop_assert_eq!(log.truncate_to(cut).unwrap(), want);
            proptest::prop_assert_eq!(log.cut_point(want).unwrap(), want);
        }
    }
}
