//! The async shell around the transaction [`Coordinator`]: deferred answers, the clock, the
//! durable `__transaction_state` log, and the COMMIT/ABORT markers.
//!
//! Owns: running the coordinator's actions. A state write is one record (Kafka's key and value,
//! [`crate::txn::log`]) appended with `acks=all` to `__transaction_state` (one partition,
//! compacted); the coordinator applies it only once it is on disk (in a region cluster: once
//! every in-sync replica has it). Markers go to each partition of the transaction
//! ([`super::markers`]): written here for the partitions this broker holds or leads, sent with
//! WriteTxnMarkers to the leaders of the others, retried until each has its marker (a
//! transaction's end must reach every partition). On start the log is replayed and every
//! transaction that was preparing gets its markers again.
//!
//! In a region cluster `__transaction_state` is a replicated cluster topic (created on the
//! first FindCoordinator for a transactional id) and this broker coordinates transactions only
//! while it leads its partition ([`TxnService::on_role`]): taking the lead replays the log into
//! a fresh coordinator, which resumes the transactions that were preparing; losing it drops
//! every transaction and deferred answer here (clients find the new coordinator). Work begun
//! under an earlier leadership is discarded when it completes (a generation counter). The
//! partition leaders of a cluster check transactional produces with the coordinator
//! ([`TxnService::verify_produce`]).
//!
//! Does not own: the protocol rules ([`crate::txn`]) or the wire ([`crate::kafka::txn`]); what
//! a failover does to transactions is in [`failover`].

mod failover;
pub use failover::OrphanAbort;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use tokio::sync::oneshot;

use super::groups::Serving;
use super::markers::{submit, written_at, Route, TxnMarker};
use super::writer::Writer;
use super::{Broker, NotReplicated, Partition};
use crate::batch::build;
use crate::clock::now_ms;
use crate::replica::Replica;
use crate::txn::{self, code, Action, Answer, Coordinator, Token, TxnConfig, TxnMeta};

/// Markers that could not be written are tried again after this long.
const MARKER_RETRY: Duration = Duration::from_millis(500);

/// How long a state write in a region cluster waits for every in-sync replica (Kafka's
/// `transaction.state.log` writes time out as `request.timeout.ms` does).
const STATE_REPLICATION_WAIT: Duration = Duration::from_secs(5);

/// How long a promoted cluster's leader waits for its write gate before aborting the old
/// primary's open transactions.
const ORPHAN_GATE_WAIT: Duration = Duration::from_secs(10);

/// How long EndTxn waits for a commit's markers to reach the synchronous mirrors before it
/// answers CONCURRENT_TRANSACTIONS (the client asks again, and is answered once they are).
const END_TXN_SYNC_WAIT: Duration = Duration::from_secs(20);

/// How long a switchover's fence waits for this region's open transactions on the fenced
/// topics to end before aborting them, and then for their abort markers.
pub const FENCE_TXN_WAIT: Duration = Duration::from_secs(5);

/// Whether [`TxnService::verify_anywhere`]'s answer means "not now": the coordinator could
/// not be asked or answer (a produce then answers NOT_ENOUGH_REPLICAS, as Kafka does, and a
/// TxnOffsetCommit COORDINATOR_LOAD_IN_PROGRESS; both are retried by the clients).
pub fn retriable(code: i16) -> bool {
    matches!(
        code,
        code::NOT_COORDINATOR
            | code::COORDINATOR_NOT_AVAILABLE
            | 14
            | code::CONCURRENT_TRANSACTIONS
    )
}

/// The state log and this broker's part in it.
#[derive(Clone)]
struct Seat {
    /// `__transaction_state-0`, once this broker has it.
    log: Option<Arc<Partition>>,
    serving: Serving,
}

pub struct TxnService {
    /// The coordinator, with the generation it belongs to: every change of leadership starts a
    /// new one, and work begun under an older one is discarded when it completes.
    coord: Mutex<(Coordinator, u64)>,
    waiters: Mutex<HashMap<Token, oneshot::Sender<Answer>>>,
    next_token: AtomicU64,
    seat: RwLock<Seat>,
    writer: Writer,
    config: TxnConfig,
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
    /// Replay `__transaction_state` (its partition `log`), alone in a region; without one (a
    /// region cluster), wait for [`TxnService::on_role`] to name this broker the coordinator.
    pub fn open(log: Option<Arc<Partition>>, writer: Writer) -> TxnService {
        let config = TxnConfig::default();
        let (coord, serving) = match &log {
            Some(log) => (replay(log, config.clone()), Serving::Solo),
            None => (Coordinator::new(config.clone()), Serving::No),
        };
        TxnService {
            coord: Mutex::new((coord, 0)),
            waiters: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(1),
            seat: RwLock::new(Seat { log, serving }),
            writer,
            config,
            broker: OnceLock::new(),
        }
    }

    /// Give the service its broker (markers go to the broker's partitions).
    pub fn attach(&self, broker: Weak<Broker>) {
        let _ = self.broker.set(broker);
    }

    fn seat(&self) -> Seat {
        self.seat.read().expect("seat lock").clone()
    }

    /// Whether this broker coordinates transactions now.
    pub fn serving(&self) -> bool {
        self.seat().serving != Serving::No
    }

    /// The coordinator's epoch, sent with its markers: the leader epoch of
    /// `__transaction_state-0` in a cluster, 0 alone in a region.
    fn coordinator_epoch(&self) -> i32 {
        match self.seat().serving {
            Serving::Leader { epoch, .. } => epoch,
            _ => 0,
        }
    }

    fn generation(&self) -> u64 {
        self.coord.lock().expect("txn coordinator lock").1
    }

    /// In a region cluster: follow this broker's part in `__transaction_state-0` (`log`).
    /// Taking the lead (at a new leader epoch) replays the log into a fresh coordinator and
    /// resumes the transactions that were preparing; losing it drops every transaction and
    /// deferred answer here.
    pub fn on_role(self: &Arc<Self>, log: &Arc<Partition>, role: &Replica, min_insync: usize) {
        let want = match role {
            Replica::Leader(l) => Serving::Leader {
                epoch: l.leader_epoch(),
                min_insync,
            },
            _ => Serving::No,
        };
        let cur = self.seat();
        if cur.serving == want && cur.log.as_ref().is_some_and(|l| Arc::ptr_eq(l, log)) {
            return;
        }
        let fresh = match want {
            Serving::Leader { epoch, .. } => {
                tracing::info!(leader_epoch = epoch, "coordinating transactions here");
                replay(log, self.config.clone())
            }
            _ => {
                if cur.serving != Serving::No {
                    tracing::info!("no longer the transaction coordinator");
                }
                Coordinator::new(self.config.clone())
            }
        };
        let (actions, generation) = {
            let mut c = self.coord.lock().expect("txn coordinator lock");
            c.0 = fresh;
            c.1 += 1;
            *self.seat.write().expect("seat lock") = Seat {
                log: Some(log.clone()),
                serving: want,
            };
            if want != Serving::No {
                c.0.resume();
            }
            (c.0.take_actions(), c.1)
        };
        // Deferred answers end (their clients see COORDINATOR_NOT_AVAILABLE and look the
        // coordinator up again).
        self.waiters.lock().expect("waiters lock").clear();
        self.run(actions, generation);
    }

    /// Finish what was preparing before the last stop (alone in a region), then run the
    /// clock (transaction timeouts) until the process ends.
    pub fn start(self: &Arc<Self>) {
        if self.seat().serving == Serving::Solo {
            let (actions, generation) = {
                let mut c = self.coord.lock().expect("txn coordinator lock");
                c.0.resume();
                (c.0.take_actions(), c.1)
            };
            self.run(actions, generation);
        }
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let (actions, generation, open) = {
                    let mut c = me.coord.lock().expect("txn coordinator lock");
                    c.0.tick(now_ms());
                    let open = c.0.all().filter(|(_, m)| m.status.unfinished()).count();
                    (c.0.take_actions(), c.1, open)
                };
                metrics::gauge!("ferry_txn_open").set(open as f64);
                me.run(actions, generation);
            }
        });
    }

    pub fn with<R>(&self, f: impl FnOnce(&Coordinator) -> R) -> R {
        f(&self.coord.lock().expect("txn coordinator lock").0)
    }

    /// Run `f` on the coordinator with a fresh request token and wait for its answer.
    async fn call(self: &Arc<Self>, f: impl FnOnce(&mut Coordinator, Token)) -> Answer {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().expect("waiters lock").insert(token, tx);
        let (actions, generation) = {
            let mut c = self.coord.lock().expect("txn coordinator lock");
            f(&mut c.0, token);
            (c.0.take_actions(), c.1)
        };
        self.run(actions, generation);
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
        if !self.serving() {
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

    /// AddPartitionsToTxn (AddOffsetsToTxn passes the offsets partition).
    pub async fn add_partitions(
        self: &Arc<Self>,
        id: &str,
        producer_id: i64,
        epoch: i16,
        partitions: Vec<(String, i32)>,
    ) -> i16 {
        if !self.serving() {
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
        if !self.serving() {
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
        if !self.serving() {
            return code::NOT_COORDINATOR;
        }
        self.with(|c| c.verify(id, producer_id, epoch, partition))
    }

    fn broker(&self) -> Option<Arc<Broker>> {
        self.broker.get().and_then(Weak::upgrade)
    }

    /// Whether a transactional batch of `producer_id` at `epoch` may go to `topic`-`partition`
    /// at this broker, which holds or leads it (KIP-890): asked of this broker's coordinator
    /// when it is the coordinator; in a region cluster otherwise of the coordinator (the
    /// leader of `__transaction_state-0`), unless the partition already holds this producer's
    /// open transaction at this epoch (its first batch was checked). COORDINATOR_NOT_AVAILABLE
    /// when the coordinator cannot be asked now (the caller maps the coordinator's retriable
    /// errors to its own API's: [`retriable`]).
    pub async fn verify_anywhere(
        &self,
        broker: &Broker,
        id: &str,
        producer_id: i64,
        epoch: i16,
        topic: &str,
        partition: i32,
    ) -> i16 {
        if self.serving() {
            return self.verify(id, producer_id, epoch, &(topic.to_string(), partition));
        }
        let Some(link) = broker.cluster() else {
            return code::NOT_COORDINATOR;
        };
        if let Some(part) = broker.partition(topic, partition) {
            let st = part.state.lock().expect("partition lock");
            let open = st.log.txns().open().any(|(pid, _)| pid == producer_id);
            if open
                && st
                    .producers
                    .describe()
                    .any(|(pid, e, _)| pid == producer_id && e == epoch)
            {
                return code::NONE;
            }
        }
        let img = link.member.image();
        let leader = img
            .partitions
            .get(&(txn::log::TOPIC.to_string(), 0))
            .map(|s| s.value.leader);
        let Some(b) = leader.and_then(|l| img.brokers.get(&l)) else {
            return code::COORDINATOR_NOT_AVAILABLE;
        };
        if b.id == link.id() {
            // The coordinator is this broker, which has not taken the part yet.
            return code::COORDINATOR_NOT_AVAILABLE;
        }
        let Some(peers) = broker.peers().cloned() else {
            return code::COORDINATOR_NOT_AVAILABLE;
        };
        let addr = format!("{}:{}", b.host, b.port);
        match peers
            .verify_txn(
                addr.clone(),
                id.to_string(),
                producer_id,
                epoch,
                topic.to_string(),
                partition,
            )
            .await
        {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(coordinator = %addr, error = %e, "could not check a transactional write with the coordinator");
                code::COORDINATOR_NOT_AVAILABLE
            }
        }
    }

    /// Carry out the coordinator's actions (taken at `generation`): answers at once, writes
    /// and markers in tasks that report back, unless the coordinator changed meanwhile.
    fn run(self: &Arc<Self>, actions: Vec<Action>, generation: u64) {
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
                    let seat = self.seat();
                    tokio::spawn(async move {
                        let error = me.write_state(&seat, &transactional_id, &meta).await;
                        let actions = {
                            let mut c = me.coord.lock().expect("txn coordinator lock");
                            if c.1 != generation {
                                return;
                            }
                            c.0.on_written(write, error == code::NONE, error);
                            c.0.take_actions()
                        };
                        me.run(actions, generation);
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
                        if !me
                            .write_markers(generation, producer_id, epoch, commit, partitions)
                            .await
                        {
                            return;
                        }
                        let actions = {
                            let mut c = me.coord.lock().expect("txn coordinator lock");
                            if c.1 != generation {
                                return;
                            }
                            c.0.on_markers_written(now_ms(), &transactional_id);
                            c.0.take_actions()
                        };
                        me.run(actions, generation);
                    });
                }
            }
        }
    }

    /// Append one transactional id's state to `__transaction_state` and wait until it is on
    /// disk (in a cluster: in every in-sync replica): NONE, or the error the request waiting
    /// on it gets.
    async fn write_state(&self, seat: &Seat, id: &str, meta: &TxnMeta) -> i16 {
        let record = build::Record {
            key: Some(txn::log::key(id)),
            value: Some(txn::log::value(meta)),
            ..Default::default()
        };
        let bytes = build::batch(0, now_ms(), None, &[record]);
        let Some(log) = &seat.log else {
            return code::NOT_COORDINATOR;
        };
        let epoch = match seat.serving {
            Serving::No => return code::NOT_COORDINATOR,
            Serving::Solo => None,
            Serving::Leader { epoch, .. } => Some(epoch),
        };
        let end = match submit(&self.writer, log, bytes, epoch).await {
            Ok(rx) => written_at(rx).await,
            Err(e) => Err(e),
        };
        let end = match end {
            Ok(end) => end,
            Err(e) => {
                tracing::warn!(transactional_id = id, error = %e, "writing a transaction state failed");
                return if epoch.is_some() {
                    code::NOT_COORDINATOR
                } else {
                    code::COORDINATOR_NOT_AVAILABLE
                };
            }
        };
        if let Serving::Leader { epoch, min_insync } = seat.serving {
            match log
                .wait_replicated(epoch, min_insync, end, STATE_REPLICATION_WAIT)
                .await
            {
                Ok(()) => {}
                Err(NotReplicated::LeadershipMoved) => return code::NOT_COORDINATOR,
                Err(e) => {
                    tracing::warn!(transactional_id = id, error = %e, "a transaction state was not replicated");
                    return code::COORDINATOR_NOT_AVAILABLE;
                }
            }
        }
        code::NONE
    }

    /// Write the transaction's marker to every partition, at this broker or at the
    /// partition's leader, retrying those that fail until each has it. `false` if the
    /// coordinator changed meanwhile (the new one writes the markers itself).
    async fn write_markers(
        &self,
        generation: u64,
        producer_id: i64,
        epoch: i16,
        commit: bool,
        partitions: Vec<(String, i32)>,
    ) -> bool {
        let mut left = partitions;
        let mut warned = false;
        loop {
            if self.generation() != generation {
                return false;
            }
            let Some(broker) = self.broker() else {
                return false;
            };
            let coordinator_epoch = self.coordinator_epoch();
            let mut failed = Vec::new();
            let mut remote: BTreeMap<String, Vec<(String, i32)>> = BTreeMap::new();
            let mut tasks = tokio::task::JoinSet::new();
            for (t, p) in left {
                match broker.marker_route(&t, p) {
                    Route::Done => {}
                    Route::Later(why) => failed.push(((t, p), why)),
                    Route::Broker { addr, .. } => remote.entry(addr).or_default().push((t, p)),
                    Route::Here => {
                        let b = broker.clone();
                        tasks.spawn(async move {
                            let r = b.write_marker(&t, p, producer_id, epoch, commit).await;
                            vec![((t, p), r.map(|_| ()).map_err(|(_, m)| m))]
                        });
                    }
                }
            }
            for (addr, parts) in remote {
                let peers = broker.peers().cloned();
                tasks.spawn(async move {
                    let Some(peers) = peers else {
                        let why = "this broker has no way to reach the other brokers".to_string();
                        return parts.into_iter().map(|tp| (tp, Err(why.clone()))).collect();
                    };
                    let marker = TxnMarker {
                        producer_id,
                        epoch,
                        commit,
                        coordinator_epoch,
                        partitions: parts.clone(),
                    };
                    match peers.write_txn_markers(addr.clone(), marker).await {
                        Ok(codes) => parts
                            .into_iter()
                            .map(|tp| {
                                let r = match codes.iter().find(|(k, _)| *k == tp) {
                                    Some((_, 0)) => Ok(()),
                                    Some((_, e)) => {
                                        Err(format!("broker {addr} answered error {e}"))
                                    }
                                    None => Err(format!("broker {addr} did not answer it")),
                                };
                                (tp, r)
                            })
                            .collect(),
                        Err(e) => parts
                            .into_iter()
                            .map(|tp| (tp, Err(format!("broker {addr}: {e}"))))
                            .collect(),
                    }
                });
            }
            while let Some(done) = tasks.join_next().await {
                for (tp, r) in done.unwrap_or_default() {
                    if let Err(why) = r {
                        failed.push((tp, why));
                    }
                }
            }
            if failed.is_empty() {
                return true;
            }
            if !warned {
                for ((t, p), why) in &failed {
                    tracing::warn!(topic = %t, partition = p, producer_id, error = %why, "a transaction marker could not be written yet; retrying");
                }
                warned = true;
            }
            left = failed.into_iter().map(|(tp, _)| tp).collect();
            tokio::time::sleep(MARKER_RETRY).await;
        }
    }
}

fn code_of(a: Answer) -> i16 {
    match a {
        Answer::Code(c) => c,
        Answer::ProducerId { error, .. } => error,
    }
}
