//! The group commit writer: one thread appends, another fsyncs, and one fsync serves every
//! batch that was waiting for it.
//!
//! The produce path (BMQ's design): a connection checks the request and each batch's CRC, then
//! queues the batch here and goes on reading. The appender thread drains everything queued,
//! checks producer sequences and appends each batch to its partition's log (page cache), and
//! answers `acks=1` right away. Batches sent with `acks=all` go to the syncer thread, which takes
//! every batch queued since its last take (a *round*), fdatasyncs each segment file they touched
//! once, and only then are they answered. While the syncer waits on the disk the appender keeps
//! appending, so the next fsync covers the next group.
//!
//! A failed fdatasync must not be followed by an acknowledgement of what it lost:
//! - the syncer fsyncs through its own open file description of the segment (opened with
//!   `/proc/self/fd`): Linux reports a write-back error once per open file description, so an
//!   error that another fsync of the shared descriptor took (a segment roll) still reaches it;
//! - a segment file whose fdatasync failed is *poisoned*: no later round answers `acks=all` for it
//!   with success (its earlier bytes may be gone from the page cache and never reach the disk,
//!   while a later fsync of the same file reports success);
//! - rounds are answered in the order they were taken ([`Rounds`]), which also keeps this true
//!   with several syncers whose fsyncs overlap (`SYNCERS`).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify};

use super::producer::SeqCheck;
use super::Partition;
use crate::batch::BatchHeader;

/// Batches the appender takes in one round at most.
const GROUP_BATCHES_MAX: usize = 4096;
/// Batches queued for the appender before producers wait.
pub const QUEUE_BATCHES_MAX: usize = 8192;
/// Syncer threads. Two (the next round's fsync starting while one is on the disk) were measured
/// against one on this project's 2-core benchmark machine and gained nothing measurable with
/// the Java or librdkafka producers (docs/benchmarks.md), so one it is; [`Rounds`] keeps more
/// than one correct.
const SYNCERS: usize = 1;
/// A syncer closes its own descriptor of a segment file not synced for this long.
const OWN_FD_IDLE: Duration = Duration::from_secs(30);

/// A batch to append.
pub struct AppendRequest {
    pub partition: Arc<Partition>,
    /// The batch as the client sent it (a slice of the request: never copied in user space);
    /// the log writes it with its base offset and leader epoch set.
    pub bytes: bytes::Bytes,
    pub header: BatchHeader,
    /// 0, 1 or -1 (all).
    pub acks: i16,
    /// Region epoch to stamp in the partition leader epoch field, if any.
    pub epoch: Option<i32>,
    /// A mirror copy: the batch keeps its offsets and must start at or past the log end (see
    /// [`crate::log::PartitionLog::append_exact`]); a batch wholly below the log end is a
    /// duplicate of what the mirror already has.
    pub exact: bool,
    /// For an exact copy: the offset from which the source holds nothing before this batch.
    /// A batch past the log end is taken only if this is at or below it (a gap the source's
    /// cleaner or log start left); otherwise it would skip records the log lacks.
    pub gap_from: i64,
    pub reply: Option<oneshot::Sender<AppendResult>>,
}

/// A successful append (or a recognised duplicate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOk {
    pub base_offset: i64,
    pub log_start_offset: i64,
    pub duplicate: bool,
}

/// Why an append was refused. Each maps to a Kafka error code.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AppendError {
    #[error("out of order sequence: expected {expected}, got {got}")]
    OutOfOrderSequence { expected: i32, got: i32 },
    #[error("producer epoch {got} is older than the current {current}")]
    InvalidProducerEpoch { current: i16, got: i16 },
    #[error("storage error on {0}")]
    Storage(String),
    #[error("the broker is shutting down")]
    ShuttingDown,
    #[error("mirror batch at offset {got} does not continue the log, which ends at {end}")]
    NotContiguous { got: i64, end: i64 },
    #[error("{0}")]
    NotWritable(String),
}

impl AppendError {
    pub fn kafka_code(&self) -> i16 {
        match self {
            AppendError::OutOfOrderSequence { .. } => 45,
            AppendError::InvalidProducerEpoch { .. } => 47,
            AppendError::Storage(_) => 56,
            AppendError::ShuttingDown => 56,
            AppendError::NotContiguous { .. } => 1,
            AppendError::NotWritable(_) => 6,
        }
    }
}

pub type AppendResult = Result<AppendOk, AppendError>;

struct Pending {
    file: Arc<File>,
    ok: AppendOk,
    reply: oneshot::Sender<AppendResult>,
}

#[derive(Default)]
struct SyncQueue {
    pending: Vec<Pending>,
    closed: bool,
    /// Number of the next round taken.
    next_round: u64,
}

/// A taken round, fsynced: its batches and the fdatasync result of each file it touched.
struct Synced {
    batch: Vec<Pending>,
    results: Vec<(Arc<File>, Result<(), String>)>,
}

/// Answers rounds in the order they were taken, and remembers poisoned files. Plain logic, no
/// threads or disks: syncers hand it finished rounds in any order.
#[derive(Default)]
struct Rounds {
    /// The round answered next.
    next: u64,
    /// Rounds fsynced but waiting for an earlier one.
    done: BTreeMap<u64, Synced>,
    /// Segment files whose fdatasync failed (held, so their address is not reused).
    poisoned: Vec<Arc<File>>,
}

impl Rounds {
    /// Record round `round` as fsynced, then answer every round now ready, in order.
    fn complete(&mut self, round: u64, synced: Synced) {
        assert!(round >= self.next, "round {round} completed twice");
        let previous = self.done.insert(round, synced);
        assert!(previous.is_none(), "round {round} completed twice");
        while let Some(Synced { batch, results }) = self.done.remove(&self.next) {
            for (file, r) in &results {
                if r.is_err() && !self.poisoned.iter().any(|f| Arc::ptr_eq(f, file)) {
                    self.poisoned.push(file.clone());
                }
            }
            for p in batch {
                let result = if self.poisoned.iter().any(|f| Arc::ptr_eq(f, &p.file)) {
                    let e = results
                        .iter()
                        .find(|(f, _)| Arc::ptr_eq(f, &p.file))
                        .and_then(|(_, r)| r.clone().err())
                        .unwrap_or_else(|| {
                            "an earlier fdatasync of this segment failed: its acks=all writes \
                             are not durable"
                                .to_string()
                        });
                    Err(AppendError::Storage(e))
                } else {
                    Ok(p.ok)
                };
                let _ = p.reply.send(result);
            }
            self.next += 1;
        }
    }
}

/// Handle to the writer threads.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<AppendRequest>,
}

impl Writer {
    /// Start the appender and syncer threads. `appended` is notified after every round, so
    /// fetches waiting for data wake up.
    pub fn start(appended: Arc<Notify>) -> Writer {
        let (tx, rx) = mpsc::channel(QUEUE_BATCHES_MAX);
        let sync = Arc::new((Mutex::new(SyncQueue::default()), Condvar::new()));
        let rounds = Arc::new(Mutex::new(Rounds::default()));
        let s2 = sync.clone();
        std::thread::Builder::new()
            .name("ferry-appender".into())
            .spawn(move || appender(rx, s2, appended))
            .expect("spawn appender thread");
        for _ in 0..SYNCERS {
            let (sync, rounds) = (sync.clone(), rounds.clone());
            std::thread::Builder::new()
                .name("ferry-syncer".into())
                .spawn(move || syncer(sync, rounds))
                .expect("spawn syncer thread");
        }
        Writer { tx }
    }

    /// Queue a batch. Waits only when the queue is full (backpressure).
    pub async fn submit(&self, req: AppendRequest) -> Result<(), AppendError> {
        self.tx
            .send(req)
            .await
            .map_err(|_| AppendError::ShuttingDown)
    }

    /// Queue a batch from a non-async thread.
    pub fn submit_blocking(&self, req: AppendRequest) -> Result<(), AppendError> {
        self.tx
            .blocking_send(req)
            .map_err(|_| AppendError::ShuttingDown)
    }
}

fn appender(
    mut rx: mpsc::Receiver<AppendRequest>,
    sync: Arc<(Mutex<SyncQueue>, Condvar)>,
    appended: Arc<Notify>,
) {
    let mut group: Vec<AppendRequest> = Vec::with_capacity(GROUP_BATCHES_MAX);
    loop {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        group.push(first);
        while group.len() < GROUP_BATCHES_MAX {
            match rx.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        let mut to_sync = Vec::new();
        for req in group.drain(..) {
            let AppendRequest {
                partition,
                bytes,
                header,
                acks,
                epoch,
                exact,
                gap_from,
                reply,
            } = req;
            let (result, file) = if exact {
                append_exact(&partition, &bytes, &header, gap_from)
            } else {
                append_one(&partition, &bytes, &header, epoch)
            };
            match (result, reply) {
                (Ok(ok), Some(reply)) if acks == -1 && !ok.duplicate => {
                    to_sync.push(Pending {
                        file: file.expect("appended to a file"),
                        ok,
                        reply,
                    });
                }
                (Ok(ok), Some(reply)) if acks == -1 => {
                    // A duplicate: the original may still be waiting for its fsync, so this
                    // answer waits for the next one too.
                    let file = partition
                        .state
                        .lock()
                        .expect("partition lock")
                        .log
                        .active_file();
                    to_sync.push(Pending { file, ok, reply });
                }
                (result, Some(reply)) => {
                    let _ = reply.send(result);
                }
                (_, None) => {}
            }
        }
        appended.notify_waiters();
        if !to_sync.is_empty() {
            let (lock, cv) = &*sync;
            let mut q = lock.lock().expect("sync queue lock");
            q.pending.extend(to_sync);
            cv.notify_one();
        }
    }
    let (lock, cv) = &*sync;
    lock.lock().expect("sync queue lock").closed = true;
    cv.notify_all();
}

fn append_one(
    partition: &Partition,
    bytes: &[u8],
    header: &BatchHeader,
    epoch: Option<i32>,
) -> (AppendResult, Option<Arc<File>>) {
    let mut st = partition.state.lock().expect("partition lock");
    let start = st.log.start_offset();
    if let Some(e) = epoch {
        // Decided under the partition lock: a fence lands between two appends.
        if !st.gate.writable || st.gate.epoch != e {
            return (
                Err(AppendError::NotWritable(format!(
                    "{}-{} does not take writes at epoch {e} here (gate: epoch {}, writable {})",
                    partition.topic, partition.index, st.gate.epoch, st.gate.writable
                ))),
                None,
            );
        }
    }
    match st.producers.check(header) {
        SeqCheck::Duplicate { base_offset } => {
            return (
                Ok(AppendOk {
                    base_offset,
                    log_start_offset: start,
                    duplicate: true,
                }),
                None,
            )
        }
        SeqCheck::OutOfOrder { expected, got } => {
            return (Err(AppendError::OutOfOrderSequence { expected, got }), None)
        }
        SeqCheck::Fenced { current, got } => {
            return (
                Err(AppendError::InvalidProducerEpoch { current, got }),
                None,
            )
        }
        SeqCheck::Append => {}
    }
    let active_before = st.log.active_base();
    match st.log.append(bytes, epoch) {
        Ok(base_offset) => {
            let st = &mut *st;
            st.producers
                .record_appended(&st.log, active_before, header, base_offset);
            let end = st.log.next_offset();
            if let crate::replica::Replica::Leader(l) = &mut st.replica {
                // A leader alone in its ISR acknowledges at once.
                if l.on_append(end).is_some() {
                    partition.replicated.notify_waiters();
                }
            }
            let file = st.log.active_file();
            (
                Ok(AppendOk {
                    base_offset,
                    log_start_offset: st.log.start_offset(),
                    duplicate: false,
                }),
                Some(file),
            )
        }
        Err(e) => {
            tracing::error!(topic = %partition.topic, partition = partition.index, error = %e, "append failed");
            (
                Err(AppendError::Storage(format!(
                    "{}-{}: {e}",
                    partition.topic, partition.index
                ))),
                None,
            )
        }
    }
}

fn append_exact(
    partition: &Partition,
    bytes: &[u8],
    header: &BatchHeader,
    gap_from: i64,
) -> (AppendResult, Option<Arc<File>>) {
    let mut st = partition.state.lock().expect("partition lock");
    let end = st.log.next_offset();
    let start = st.log.start_offset();
    if st.gate.writable {
        return (
            Err(AppendError::NotWritable(format!(
                "{}-{} is written by clients here, not mirrored",
                partition.topic, partition.index
            ))),
            None,
        );
    }
    if header.next_offset() <= end {
        // Already here (a resend after a lost acknowledgement).
        return (
            Ok(AppendOk {
                base_offset: header.base_offset,
                log_start_offset: start,
                duplicate: true,
            }),
            None,
        );
    }
    if header.base_offset < end || (header.base_offset > end && gap_from > end) {
        // Overlaps the log's last batch (not the same batches), or leaves out records the
        // source holds (the log was cut below where the stream continues).
        return (
            Err(AppendError::NotContiguous {
                got: header.base_offset,
                end,
            }),
            None,
        );
    }
    let active_before = st.log.active_base();
    match st.log.append_exact(bytes) {
        Ok(base_offset) => {
            let st = &mut *st;
            st.producers
                .record_appended(&st.log, active_before, header, base_offset);
            let file = st.log.active_file();
            (
                Ok(AppendOk {
                    base_offset,
                    log_start_offset: st.log.start_offset(),
                    duplicate: false,
                }),
                Some(file),
            )
        }
        Err(e) => {
            tracing::error!(topic = %partition.topic, partition = partition.index, error = %e, "mirror append failed");
            (
                Err(AppendError::Storage(format!(
                    "{}-{}: {e}",
                    partition.topic, partition.index
                ))),
                None,
            )
        }
    }
}

/// This syncer's own open file description of a segment file (see the module doc), kept while
/// the file is in use.
struct OwnFd {
    /// The shared file, held so its address identifies it while this entry lives.
    shared: Arc<File>,
    own: Option<File>,
    used: Instant,
}

fn own_fd(file: &File) -> Option<File> {
    use std::os::fd::AsRawFd;
    File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()
}

fn syncer(sync: Arc<(Mutex<SyncQueue>, Condvar)>, rounds: Arc<Mutex<Rounds>>) {
    let (lock, cv) = &*sync;
    let mut fds: HashMap<*const File, OwnFd> = HashMap::new();
    loop {
        let (round, batch) = {
            let mut q = lock.lock().expect("sync queue lock");
            while q.pending.is_empty() && !q.closed {
                q = cv.wait(q).expect("sync queue lock");
            }
            if q.pending.is_empty() && q.closed {
                return;
            }
            let round = q.next_round;
            q.next_round += 1;
            (round, std::mem::take(&mut q.pending))
        };
        // One fdatasync per file, however many batches wait on it.
        let mut results: Vec<(Arc<File>, Result<(), String>)> = Vec::new();
        let started = Instant::now();
        for p in &batch {
            if results.iter().any(|(f, _)| Arc::ptr_eq(f, &p.file)) {
                continue;
            }
            let entry = fds.entry(Arc::as_ptr(&p.file)).or_insert_with(|| OwnFd {
                shared: p.file.clone(),
                own: own_fd(&p.file),
                used: started,
            });
            entry.used = started;
            // Without /proc the shared description is used: an error may then reach only one
            // of two overlapping fsyncs, and the other round is still failed through poisoning
            // only if it is answered later.
            let file = entry.own.as_ref().unwrap_or(&entry.shared);
            let r = file.sync_data().map_err(|e| e.to_string());
            if let Err(e) = &r {
                tracing::error!(error = %e, "fdatasync failed: acks=all produces to this segment are answered with an error from now on");
            }
            results.push((p.file.clone(), r));
        }
        metrics::histogram!("ferry_fsync_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("ferry_fsync_total").increment(results.len() as u64);
        fds.retain(|_, e| started.duration_since(e.used) < OWN_FD_IDLE);
        rounds
            .lock()
            .expect("rounds lock")
            .complete(round, Synced { batch, results });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot::error::TryRecvError;

    fn file() -> Arc<File> {
        Arc::new(tempfile::tempfile().unwrap())
    }

    fn pending(file: &Arc<File>, base_offset: i64) -> (Pending, oneshot::Receiver<AppendResult>) {
        let (tx, rx) = oneshot::channel();
        let ok = AppendOk {
            base_offset,
            log_start_offset: 0,
            duplicate: false,
        };
        (
            Pending {
                file: file.clone(),
                ok,
                reply: tx,
            },
            rx,
        )
    }

    fn synced(batch: Vec<Pending>, results: &[(&Arc<File>, bool)]) -> Synced {
        Synced {
            batch,
            results: results
                .iter()
                .map(|(f, ok)| {
                    (
                        (*f).clone(),
                        if *ok { Ok(()) } else { Err("EIO".to_string()) },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn a_round_that_finishes_first_waits_for_the_earlier_one() {
        let a = file();
        let mut rounds = Rounds::default();
        let (p0, mut rx0) = pending(&a, 0);
        let (p1, mut rx1) = pending(&a, 1);
        rounds.complete(1, synced(vec![p1], &[(&a, true)]));
        assert_eq!(rx1.try_recv(), Err(TryRecvError::Empty));
        rounds.complete(0, synced(vec![p0], &[(&a, true)]));
        assert_eq!(rx0.try_recv().unwrap().unwrap().base_offset, 0);
        assert_eq!(rx1.try_recv().unwrap().unwrap().base_offset, 1);
    }

    #[test]
    fn a_failed_fsync_poisons_its_file_for_every_later_round() {
        let (a, b) = (file(), file());
        let mut rounds = Rounds::default();
        let (p0, mut rx0) = pending(&a, 0);
        let (p1a, mut rx1a) = pending(&a, 1);
        let (p1b, mut rx1b) = pending(&b, 0);
        // Round 1's own fsync of `a` succeeded (the error was reported to round 0's syncer only)
        // and it finished first: it must still fail, as round 0 lost bytes before its own.
        rounds.complete(1, synced(vec![p1a, p1b], &[(&a, true), (&b, true)]));
        rounds.complete(0, synced(vec![p0], &[(&a, false)]));
        assert!(matches!(rx0.try_recv().unwrap(), Err(AppendError::Storage(e)) if e == "EIO"));
        assert!(matches!(
            rx1a.try_recv().unwrap(),
            Err(AppendError::Storage(_))
        ));
        assert!(
            rx1b.try_recv().unwrap().is_ok(),
            "another file is unaffected"
        );
        let (p2, mut rx2) = pending(&a, 2);
        rounds.complete(2, synced(vec![p2], &[(&a, true)]));
        assert!(rx2.try_recv().unwrap().is_err(), "poisoned for good");
    }

    #[test]
    #[should_panic(expected = "completed twice")]
    fn completing_a_round_twice_is_a_bug() {
        let a = file();
        let mut rounds = Rounds::default();
        rounds.complete(0, synced(vec![], &[(&a, true)]));
        rounds.complete(0, synced(vec![], &[(&a, true)]));
    }

    #[test]
    fn own_descriptors_are_separate_open_files() {
        use std::io::Write;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"abc").unwrap();
        let own = own_fd(&f).expect("/proc/self/fd is there on Linux");
        own.sync_data().unwrap();
        assert_eq!(own.metadata().unwrap().len(), 3);
    }
}
