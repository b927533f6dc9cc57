//! The async shell around the transaction [`Coordinator`]: deferred answers, the clock, the
//! durable `__transaction_state` log, and the COMMIT/ABORT markers.
//!
//! Owns: running the coordinator's actions. A state write is one record (Kafka's key and value,
//! [`crate::txn::log`]) appended with `acks=all` to `__transaction_state` (one partition,
//! compacted); the coordinator applies it only once it is on disk. Markers are control batches
//! appended to each partition of the transaction through the group commit writer (`acks=all`,
//! retried until written: a transaction's end must reach every partition); a marker in
//! `__consumer_offsets` also settles the offsets the transaction committed
//! ([`super::groups::GroupService::on_txn_marker`]). On start the log is replayed and every
//! transaction that was preparing gets its markers again.
//!
//! Does not own: the protocol rules ([`crate::txn`]) or the wire ([`crate::kafka::txn`]).
//! Serves alone in a region only: in a region cluster the coordinator would need markers sent
//! to other brokers (WriteTxnMarkers) and a replicated `__transaction_state`, which is not
//! built yet, so FindCoordinator refuses transactional ids there at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::oneshot;

use super::writer::{AppendRequest, AppendResult, Writer};
use super::{Broker, Partition};
use crate::batch::{self, build};
use crate::clock::now_ms;
use crate::log::txn::{control_batch, Marker};
use crate::replica::Replica;
use crate::txn::{self, code, Action, Answer, Coordinator, Token, TxnConfig, TxnMeta};

/// Markers that could not be written are tried again after this long.
const MARKER_RETRY: Duration = Duration::from_millis(500);

/// How long a marker of a synchronously mirrored topic waits for its mirrors in one try.
const MARKER_MIRROR_WAIT: Duration = Duration::from_secs(5);

/// How long EndTxn waits for a commit's markers to reach the synchronous mirrors before it
/// answers CONCURRENT_TRANSACTIONS (the client asks again, and is answered once they are).
const END_TXN_SYNC_WAIT: Duration = Duration::from_secs(20);

/// How long a switchover's fence waits for this region's open transactions on the fenced
/// topics to end before aborting them, and then for their abort markers.
pub const FENCE_TXN_WAIT: Duration = Duration::from_secs(5);

pub struct TxnService {
    coord: Mutex<Coordinator>,
    waiters: Mutex<HashMap<Token, oneshot::Sender<Answer>>>,
    next_token: AtomicU64,
    /// `__transaction_state-0`, when this broker coordinates transactions (alone in its
    /// region).
    log: Option<Arc<Partition>>,
    writer: Writer,
    serving: bool,
    broker: OnceLock<Weak<Broker>>,
}

/// A coordinator with the latest state of every transactional id in `log`.
fn replay(log: &Partition, config: TxnConfig) -> Coordinator {
    let mut latest: HashMap<String, Option<TxnMeta>> = HashMap::new();
    super::replay::for_each_batch(log, |h, records| {
        if h.is_control() {
            return;
        }
        for r in records {
            if let Some(id) = r.key.and_then(txn::log::parse_key) {
                latest.insert(id, r.value.and_then(txn::log::parse_value));
            }
        }
    });
    let mut c = Coordinator::new(config);
    let n = latest.len();
    for (id, m) in latest {
        c.load(&id, m);
    }
    tracing::info!(transactional_ids = n, "replayed transaction states");
    c
}

impl TxnService {
    /// Replay `__transaction_state` (its partition `log`); without one, refuse transactions.
    pub fn open(log: Option<Arc<Partition>>, writer: Writer) -> TxnService {
        let config = TxnConfig::default();
        let serving = log.is_some();
        let coord = match &log {
            Some(log) => replay(log, config),
            None => Coordinator::new(config),
        };
        TxnService {
            coord: Mutex::new(coord),
            waiters: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(1),
            log,
            writer,
            serving,
            broker: OnceLock::new(),
        }
    }

    /// Give the service its broker (markers go to the broker's partitions).
    pub fn attach(&self, broker: Weak<Broker>) {
        let _ = self.broker.set(broker);
    }

    /// Whether this broker coordinates transactions.
    pub fn serving(&self) -> bool {
        self.serving
    }

    /// Finish what was preparing before the last stop, then run the clock (transaction
    /// timeouts) until the process ends.
    pub fn start(self: &Arc<Self>) {
        if !self.serving {
            return;
        }
        let actions = {
            let mut c = self.coord.lock().expect("txn coordinator lock");
            c.resume();
            c.take_actions()
        };
        self.run(actions);
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let (actions, open) = {
                    let mut c = me.coord.lock().expect("txn coordinator lock");
                    c.tick(now_ms());
                    let open = c.all().filter(|(_, m)| m.status.unfinished()).count();
                    (c.take_actions(), open)
                };
                metrics::gauge!("ferry_txn_open").set(open as f64);
                me.run(actions);
            }
        });
    }

    pub fn with<R>(&self, f: impl FnOnce(&Coordinator) -> R) -> R {
        f(&self.coord.lock().expect("txn coordinator lock"))
    }

    /// Run `f` on the coordinator with a fresh request token and wait for its answer.
    async fn call(self: &Arc<Self>, f: impl FnOnce(&mut Coordinator, Token)) -> Answer {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().expect("waiters lock").insert(token, tx);
        let actions = {
            let mut c = self.coord.lock().expect("txn coordinator lock");
            f(&mut c, token);
            c.take_actions()
        };
        self.run(actions);
        rx.await
            .unwrap_or(Answer::Code(code::COORDINATOR_NOT_AVAILABLE))
    }

    /// InitProducerId with a transactional id: (error, producer id, epoch).
    pub async fn init_producer_id(
        self: &Arc<Self>,
        id: &str,
        timeout_ms: i32,
        current: Option<(i64, i16)>,
    ) -> (i16, i64, i16) {
        let fail = |e| (e, -1, -1);
        if !self.serving {
            return fail(code::NOT_COORDINATOR);
        }
        // A new producer id only when the transactional id has none or its epoch ran out.
        let needs_fresh = self.with(|c| c.get(id).is_none_or(|m| m.epoch >= i16::MAX - 1));
        let fresh = if needs_fresh {
            let Some(broker) = self.broker() else {
                return fail(code::COORDINATOR_NOT_AVAILABLE);
            };
            match broker.allocate_producer_id() {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "could not allocate a producer id");
                    return fail(code::COORDINATOR_NOT_AVAILABLE);
                }
            }
        } else {
            -1
        };
        let answer = self
            .call(|c, t| c.init_producer_id(t, now_ms(), id, timeout_ms, fresh, current))
            .await;
        match answer {
            Answer::ProducerId {
                error,
                producer_id,
                epoch,
            } => (error, producer_id, epoch),
            Answer::Code(e) => fail(e),
        }
    }

    /// A switchover fenced some topics here: wait up to `wait` for this region's transactions
    /// that write to a fenced topic to end (their producers may still commit or abort; markers
    /// pass the fence), then abort those still open, fencing their producers, and wait up to
    /// `wait` again for their markers. So the fence's log ends hold every transaction's end
    /// and the new primary finds none of ours open. Returns the transactional ids aborted.
    pub async fn settle_fenced(self: &Arc<Self>, broker: &Broker, wait: Duration) -> Vec<String> {
        if !self.serving {
            return Vec::new();
        }
        let fenced = |t: &str| broker.placement(t).is_some_and(|p| p.fenced);
        let unfinished = || -> Vec<(String, txn::Status)> {
            self.with(|c| {
                c.all()
                    .filter(|(_, m)| {
                        m.status.unfinished() && m.partitions.iter().any(|(t, _)| fenced(t))
                    })
                    .map(|(id, m)| (id.clone(), m.status))
                    .collect()
            })
        };
        let mut aborted = Vec::new();
        let mut deadline = tokio::time::Instant::now() + wait;
        let mut aborting = false;
        loop {
            let left = unfinished();
            if left.is_empty() {
                return aborted;
            }
            if tokio::time::Instant::now() >= deadline {
                if aborting {
                    tracing::warn!(transactions = ?left, "transactions on fenced topics did not end in time: their markers may follow the fence");
                    return aborted;
                }
                aborting = true;
                deadline = tokio::time::Instant::now() + wait;
                let actions = {
                    let mut c = self.coord.lock().expect("txn coordinator lock");
                    for (id, status) in &left {
                        if *status == txn::Status::Ongoing && c.abort(now_ms(), id) {
                            tracing::warn!(transactional_id = %id, "a switchover aborts a transaction still open at its fence");
                            aborted.push(id.clone());
                        }
                    }
                    c.take_actions()
                };
                self.run(actions);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// AddPartitionsToTxn (AddOffsetsToTxn passes the offsets partition).
    pub async fn add_partitions(
        self: &Arc<Self>,
        id: &str,
        producer_id: i64,
        epoch: i16,
        partitions: Vec<(String, i32)>,
    ) -> i16 {
        if !self.serving {
            return code::NOT_COORDINATOR;
        }
        // No transaction joins a topic fenced for a switchover, or one whose primary moved
        // away (the producer retries; it must follow the primary region).
        if let Some(broker) = self.broker() {
            if partitions.iter().any(|(t, _)| {
                !t.starts_with("__")
                    && (broker.mirror_primary(t).is_some()
                        || broker.placement(t).is_some_and(|p| p.fenced))
            }) {
                return code::CONCURRENT_TRANSACTIONS;
            }
        }
        let answer = self
            .call(|c, t| c.add_partitions(t, now_ms(), id, producer_id, epoch, &partitions))
            .await;
        code_of(answer)
    }

    /// EndTxn: answered once the decision is durable; the markers follow.
    pub async fn end_txn(
        self: &Arc<Self>,
        id: &str,
        producer_id: i64,
        epoch: i16,
        commit: bool,
    ) -> i16 {
        if !self.serving {
            return code::NOT_COORDINATOR;
        }
        let sync = self.broker().is_some_and(|b| {
            self.with(|c| {
                c.get(id).is_some_and(|m| {
                    m.partitions
                        .iter()
                        .any(|(t, _)| !b.sync_mirrors(t).is_empty())
                })
            })
        });
        let answer = code_of(
            self.call(|c, t| c.end_txn(t, now_ms(), id, producer_id, epoch, commit))
                .await,
        );
        if answer != code::NONE || !commit || !sync {
            return answer;
        }
        // A synchronously mirrored topic: the commit is answered once its markers are in the
        // mirrors (the transaction is complete), as an acks=all produce there is.
        let deadline = tokio::time::Instant::now() + END_TXN_SYNC_WAIT;
        loop {
            let done = self.with(|c| {
                c.get(id).is_none_or(|m| {
                    m.producer_id != producer_id || m.status != txn::Status::PrepareCommit
                })
            });
            if done {
                return code::NONE;
            }
            if tokio::time::Instant::now() >= deadline {
                return code::CONCURRENT_TRANSACTIONS;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Whether a transactional batch of `producer_id` at `epoch` may go to `partition` now.
    pub fn verify(&self, id: &str, producer_id: i64, epoch: i16, partition: &(String, i32)) -> i16 {
        if !self.serving {
            return code::NOT_COORDINATOR;
        }
        self.with(|c| c.verify(id, producer_id, epoch, partition))
    }

    fn broker(&self) -> Option<Arc<Broker>> {
        self.broker.get().and_then(Weak::upgrade)
    }

    /// Carry out the coordinator's actions: answers at once, writes and markers in tasks that
    /// report back.
    fn run(self: &Arc<Self>, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Reply { request, answer } => {
                    if let Some(tx) = self.waiters.lock().expect("waiters lock").remove(&request) {
                        let _ = tx.send(answer);
                    }
                }
                Action::Write {
                    write,
                    transactional_id,
                    meta,
                } => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        let error = me.write_state(&transactional_id, &meta).await;
                        let actions = {
                            let mut c = me.coord.lock().expect("txn coordinator lock");
                            c.on_written(write, error == code::NONE, error);
                            c.take_actions()
                        };
                        me.run(actions);
                    });
                }
                Action::Markers {
                    transactional_id,
                    producer_id,
                    epoch,
                    commit,
                    partitions,
                } => {
                    let me = self.clone();
                    let outcome = if commit { "commit" } else { "abort" };
                    metrics::counter!("ferry_txn_ended_total", "outcome" => outcome).increment(1);
                    tokio::spawn(async move {
                        me.write_markers(producer_id, epoch, commit, partitions)
                            .await;
                        let actions = {
                            let mut c = me.coord.lock().expect("txn coordinator lock");
                            c.on_markers_written(now_ms(), &transactional_id);
                            c.take_actions()
                        };
                        me.run(actions);
                    });
                }
            }
        }
    }

    /// Append one transactional id's state to `__transaction_state` and wait until it is on
    /// disk: NONE, or the error the request waiting on it gets.
    async fn write_state(&self, id: &str, meta: &TxnMeta) -> i16 {
        let record = build::Record {
            key: Some(txn::log::key(id)),
            value: Some(txn::log::value(meta)),
            ..Default::default()
        };
        let bytes = build::batch(0, now_ms(), None, &[record]);
        let Some(log) = &self.log else {
            return code::NOT_COORDINATOR;
        };
        match append(&self.writer, log, bytes, None).await {
            Ok(()) => code::NONE,
            Err(e) => {
                tracing::warn!(transactional_id = id, error = %e, "writing a transaction state failed");
                code::COORDINATOR_NOT_AVAILABLE
            }
        }
    }

    /// Write the transaction's marker to every partition, retrying those that fail until each
    /// has it (a partition that no longer exists needs none).
    async fn write_markers(
        &self,
        producer_id: i64,
        epoch: i16,
        commit: bool,
        partitions: Vec<(String, i32)>,
    ) {
        let marker = if commit {
            Marker::Commit
        } else {
            Marker::Abort
        };
        let mut left = partitions;
        let mut warned = false;
        loop {
            let Some(broker) = self.broker() else { return };
            // Queue every marker first, so one fsync round serves them all, then wait.
            let mut waiting = Vec::with_capacity(left.len());
            for (t, p) in &left {
                let queued = match broker.partition(t, *p) {
                    None => Ok(None),
                    // The topic's primary is another region now (a failover): the new primary
                    // ended this transaction there ([`TxnService::abort_orphans`]).
                    Some(_) if broker.mirror_primary(t).is_some() => Ok(None),
                    Some(part) => match marker_stamp(&broker, &part) {
                        Err(e) => Err(e),
                        Ok(stamp) => {
                            let mut bytes = control_batch(producer_id, epoch, marker, 0, now_ms());
                            // Stamped here, and written past a switchover's fence (no gate
                            // check): it ends a transaction decided before the fence, which
                            // the fence waits for ([`TxnService::settle_fenced`]).
                            if let Some(e) = stamp {
                                batch::set_partition_leader_epoch(&mut bytes, e);
                            }
                            submit(&self.writer, &part, bytes, None)
                                .await
                                .map(|rx| Some((part.clone(), rx)))
                        }
                    },
                };
                waiting.push(queued);
            }
            let mut failed = Vec::new();
            for ((t, p), queued) in left.iter().zip(waiting) {
                let r = match queued {
                    Ok(None) => Ok(()),
                    Ok(Some((part, rx))) => match written_at(rx).await {
                        // A synchronously mirrored topic: the marker counts once every
                        // synchronous mirror region holds it, so a failover there never aborts
                        // a transaction this region committed.
                        Ok(end) => {
                            let regions = broker.sync_mirrors(t);
                            if regions.is_empty() || part.mirrors_have(&regions, end) {
                                Ok(())
                            } else {
                                wait_mirrored(&part, &regions, end).await
                            }
                        }
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                };
                match r {
                    Ok(()) => {
                        if t == crate::group::offsets::TOPIC {
                            broker.groups().on_txn_marker(producer_id, commit);
                        }
                    }
                    Err(e) => {
                        if !warned {
                            tracing::warn!(topic = %t, partition = p, producer_id, error = %e, "a transaction marker could not be written yet; retrying");
                        }
                        failed.push((t.clone(), *p));
                    }
                }
            }
            if failed.is_empty() {
                return;
            }
            warned = true;
            left = failed;
            tokio::time::sleep(MARKER_RETRY).await;
        }
    }
}

/// A transaction found open in a partition that just became writable here (it was a mirror:
/// the transaction belongs to the region that was primary), and aborted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OrphanAbort {
    pub topic: String,
    pub partition: i32,
    pub producer_id: i64,
    pub producer_epoch: i16,
    /// Where the transaction's records start in the partition.
    pub first_offset: i64,
    /// The ABORT marker's offset.
    pub marker_offset: i64,
}

impl TxnService {
    /// After a promotion: abort every transaction still open in a partition this broker now
    /// takes writes for, unless this region's own coordinator runs it. Such a transaction was
    /// begun in the region that was primary, whose coordinator will never end it here: left
    /// open, it would hold `read_committed` consumers at its first offset forever. Its ABORT
    /// marker is written at the producer's epoch and the region's new epoch. Returns what was
    /// aborted (the promotion's report names it).
    pub async fn abort_orphans(&self, broker: &Broker) -> Vec<OrphanAbort> {
        let ours: std::collections::HashSet<i64> = self.with(|c| {
            c.all()
                .filter(|(_, m)| !m.partitions.is_empty())
                .map(|(_, m)| m.producer_id)
                .collect()
        });
        let mut queued = Vec::new();
        for topic in broker.topics() {
            if topic.is_internal() {
                continue;
            }
            let parts: Vec<Arc<Partition>> = topic.partitions.read().expect("topic lock").clone();
            for part in &parts {
                let (stamp, open) = {
                    let st = part.state.lock().expect("partition lock");
                    if !st.gate.writable || !matches!(st.replica, Replica::Solo) {
                        continue;
                    }
                    let epochs: HashMap<i64, i16> =
                        st.producers.describe().map(|(id, e, _)| (id, e)).collect();
                    let open: Vec<(i64, i16, i64)> = st
                        .log
                        .txns()
                        .open()
                        .filter(|(pid, _)| !ours.contains(pid))
                        .map(|(pid, first)| (pid, epochs.get(&pid).copied().unwrap_or(0), first))
                        .collect();
                    (st.gate.epoch, open)
                };
                for (pid, epoch, first) in open {
                    let bytes = control_batch(pid, epoch, Marker::Abort, 0, now_ms());
                    match submit(&self.writer, part, bytes, Some(stamp)).await {
                        Ok(rx) => queued.push((part.clone(), pid, epoch, first, rx)),
                        Err(e) => {
                            tracing::error!(topic = %part.topic, partition = part.index, producer_id = pid, error = %e, "could not abort a transaction of the old primary")
                        }
                    }
                }
            }
        }
        let mut done = Vec::new();
        for (part, pid, epoch, first, rx) in queued {
            match rx.await {
                Ok(Ok(ok)) => {
                    tracing::warn!(topic = %part.topic, partition = part.index, producer_id = pid, first_offset = first, marker_offset = ok.base_offset, "aborted a transaction the old primary left open");
                    metrics::counter!("ferry_txn_orphans_aborted_total").increment(1);
                    done.push(OrphanAbort {
                        topic: part.topic.to_string(),
                        partition: part.index,
                        producer_id: pid,
                        producer_epoch: epoch,
                        first_offset: first,
                        marker_offset: ok.base_offset,
                    });
                }
                Ok(Err(e)) => {
                    tracing::error!(topic = %part.topic, partition = part.index, producer_id = pid, error = %e, "could not abort a transaction of the old primary")
                }
                Err(_) => {}
            }
        }
        done
    }
}

fn code_of(a: Answer) -> i16 {
    match a {
        Answer::Code(c) => c,
        Answer::ProducerId { error, .. } => error,
    }
}

/// The epoch a marker in `part` is stamped with, as the partition's own writes are: the
/// region epoch of a topic this region is primary of (writable, or fenced for a switchover)
/// alone in its region, none for an internal topic.
fn marker_stamp(broker: &Broker, part: &Partition) -> Result<Option<i32>, String> {
    let primary_here = broker.mirror_primary(&part.topic).is_none();
    let st = part.state.lock().expect("partition lock");
    match &st.replica {
        Replica::Solo if part.topic.starts_with("__") => Ok(None),
        Replica::Solo if st.gate.writable || primary_here => Ok(Some(st.gate.epoch)),
        Replica::Solo => Err(format!(
            "{}-{} takes no writes here (a mirror, or fenced)",
            part.topic, part.index
        )),
        Replica::Leader(l) => Ok(Some(l.leader_epoch())),
        _ => Err(format!(
            "{}-{} is not led by this broker",
            part.topic, part.index
        )),
    }
}

/// Append one batch built here with `acks=all` and wait until it is on disk.
async fn append(
    writer: &Writer,
    part: &Arc<Partition>,
    bytes: Vec<u8>,
    epoch: Option<i32>,
) -> Result<(), String> {
    written(submit(writer, part, bytes, epoch).await?).await
}

/// Queue one batch built here with `acks=all`; the receiver answers once it is on disk.
async fn submit(
    writer: &Writer,
    part: &Arc<Partition>,
    bytes: Vec<u8>,
    epoch: Option<i32>,
) -> Result<oneshot::Receiver<AppendResult>, String> {
    let header = batch::validate(&bytes).expect("a batch built here");
    let (tx, rx) = oneshot::channel();
    let req = AppendRequest {
        partition: part.clone(),
        bytes: bytes.into(),
        header,
        acks: -1,
        epoch,
        exact: false,
        gap_from: i64::MAX,
        reply: Some(tx),
    };
    writer.submit(req).await.map_err(|e| e.to_string())?;
    Ok(rx)
}

async fn written(rx: oneshot::Receiver<AppendResult>) -> Result<(), String> {
    written_at(rx).await.map(|_| ())
}

/// Wait for a single-record batch's append: the offset after it.
async fn written_at(rx: oneshot::Receiver<AppendResult>) -> Result<i64, String> {
    match rx.await {
        Ok(Ok(ok)) => Ok(ok.base_offset + 1),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the writer stopped".into()),
    }
}

/// Wait up to [`MARKER_MIRROR_WAIT`] until every region in `regions` holds `part` below `end`.
async fn wait_mirrored(part: &Partition, regions: &[String], end: i64) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + MARKER_MIRROR_WAIT;
    loop {
        let notified = part.mirror_acked.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if part.mirrors_have(regions, end) {
            return Ok(());
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Err(format!(
                "the marker is not yet in the synchronous mirror region(s) {}",
                regions.join(", ")
            ));
        }
    }
}
