//! The group commit writer: one thread appends, another fsyncs, and one fsync serves every batch
//! that was waiting for it.
//!
//! The produce path (BMQ's design): a connection checks the request and each batch's CRC, then
//! queues the batch here and goes on reading. The appender thread drains everything queued,
//! checks producer sequences and appends each batch to its partition's log (page cache), and
//! answers `acks=1` right away. Batches sent with `acks=all` go to the syncer thread, which
//! takes every batch queued since its last round, fdatasyncs each segment file they touched once,
//! and only then answers them. While the syncer waits on the disk the appender keeps appending,
//! so the next fsync covers the next group.

use std::fs::File;
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::{mpsc, oneshot, Notify};

use super::producer::SeqCheck;
use super::Partition;
use crate::batch::BatchHeader;

/// Batches the appender takes in one round at most.
const GROUP_BATCHES_MAX: usize = 4096;
/// Batches queued for the appender before producers wait.
pub const QUEUE_BATCHES_MAX: usize = 8192;

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
    /// A mirror copy: the batch keeps its offsets and must start at the log end (see
    /// [`crate::log::PartitionLog::append_exact`]); a batch wholly below the log end is a
    /// duplicate of what the mirror already has.
    pub exact: bool,
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
        let s2 = sync.clone();
        std::thread::Builder::new()
            .name("ferry-appender".into())
            .spawn(move || appender(rx, s2, appended))
            .expect("spawn appender thread");
        std::thread::Builder::new()
            .name("ferry-syncer".into())
            .spawn(move || syncer(sync))
            .expect("spawn syncer thread");
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
                reply,
            } = req;
            let (result, file) = if exact {
                append_exact(&partition, &bytes, &header)
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
    cv.notify_one();
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
    match st.log.append(bytes, epoch) {
        Ok(base_offset) => {
            st.producers.record(header, base_offset);
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
    if header.base_offset != end {
        return (
            Err(AppendError::NotContiguous {
                got: header.base_offset,
                end,
            }),
            None,
        );
    }
    match st.log.append_exact(bytes) {
        Ok(base_offset) => {
            st.producers.record(header, base_offset);
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

fn syncer(sync: Arc<(Mutex<SyncQueue>, Condvar)>) {
    let (lock, cv) = &*sync;
    loop {
        let batch = {
            let mut q = lock.lock().expect("sync queue lock");
            while q.pending.is_empty() && !q.closed {
                q = cv.wait(q).expect("sync queue lock");
            }
            if q.pending.is_empty() && q.closed {
                return;
            }
            std::mem::take(&mut q.pending)
        };
        // One fdatasync per file, however many batches wait on it.
        let mut files: Vec<(*const File, Result<(), String>)> = Vec::new();
        let started = std::time::Instant::now();
        for p in &batch {
            let ptr = Arc::as_ptr(&p.file);
            if files.iter().any(|(f, _)| *f == ptr) {
                continue;
            }
            let r = p.file.sync_data().map_err(|e| e.to_string());
            if let Err(e) = &r {
                tracing::error!(error = %e, "fdatasync failed: acks=all produces are answered with an error");
            }
            files.push((ptr, r));
        }
        metrics::histogram!("ferry_fsync_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("ferry_fsync_total").increment(files.len() as u64);
        for p in batch {
            let ptr = Arc::as_ptr(&p.file);
            let r = files
                .iter()
                .find(|(f, _)| *f == ptr)
                .map(|(_, r)| r.clone())
                .unwrap_or(Ok(()));
            let _ = p.reply.send(match r {
                Ok(()) => Ok(p.ok),
                Err(e) => Err(AppendError::Storage(e)),
            });
        }
    }
}
