//! The async shell around the group [`Coordinator`]: deferred answers, the clock, and the
//! durable `__consumer_offsets` log.
//!
//! Commits are checked by the coordinator, applied in memory, and written as one batch through
//! the group commit writer with `acks=all`; the client is answered once they are on disk. On
//! start the log is replayed. The topic is compacted by the broker's log cleaner like any
//! `cleanup.policy=compact` topic (see [`crate::broker::topic_config::internal`]): each commit's
//! key is (group, topic, partition) and each group snapshot's key is the group, in Kafka's
//! formats, so the latest of each stays and a deleted group's tombstones go after a day.
//!
//! In a region cluster `__consumer_offsets` is a replicated cluster topic and this broker
//! coordinates groups only while it leads its partition ([`GroupService::on_role`]): on taking
//! the lead it replays the log into a fresh coordinator; on losing it, it drops every group
//! (members learn NOT_COORDINATOR and find the new leader). A commit is answered once every
//! in-sync replica has it (the high watermark passed it), so the next leader replays it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::oneshot;

use super::writer::{AppendRequest, Writer};
use super::{NotReplicated, Partition};
use crate::batch::{self, build};
use crate::clock::now_ms;
use crate::group::offsets;
use crate::group::snapshot;
use crate::group::{
    code, Committed, Coordinator, GroupConfig, JoinRequest, JoinResult, Reply, SyncResult, Token,
};
use crate::replica::Replica;

enum Waiter {
    Join(oneshot::Sender<JoinResult>),
    Sync(oneshot::Sender<SyncResult>),
}

/// How long a commit in a cluster waits for every in-sync replica (Kafka's
/// `offsets.commit.timeout.ms`).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether this broker coordinates groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    /// Alone in its region: always, on its local log.
    Solo,
    /// In a cluster, while it leads the offsets partition at this leader epoch; commits wait
    /// for `min_insync` in-sync replicas.
    Leader { epoch: i32, min_insync: usize },
    /// In a cluster, another broker (or none yet) leads the offsets partition.
    No,
}

/// The offsets log and this broker's part in it.
#[derive(Clone)]
struct Seat {
    log: Arc<Partition>,
    serving: Serving,
}

pub struct GroupService {
    coord: Mutex<Coordinator>,
    waiters: Mutex<HashMap<Token, Waiter>>,
    next_token: AtomicU64,
    seat: RwLock<Seat>,
    writer: Writer,
    config: GroupConfig,
    /// Offsets committed in transactions not yet ended (TxnOffsetCommit).
    txn_offsets: Mutex<TxnOffsets>,
}

/// Offsets committed inside open transactions, per producer id: applied when the
/// transaction's COMMIT marker is in the offsets log, dropped at its ABORT.
type TxnOffsets = HashMap<i64, Vec<(String, String, i32, Committed)>>;

/// A coordinator with every commit and group snapshot of `log` replayed, in log order, and the
/// offsets of transactions still open at the log's end.
fn replay(log: &Partition, config: &GroupConfig) -> (Coordinator, TxnOffsets) {
    let mut coord = Coordinator::new(config.clone());
    let mut open: TxnOffsets = HashMap::new();
    let (mut n, mut groups) = (0u64, 0u64);
    let now = now_ms();
    super::replay::for_each_batch(log, |h, records| {
        if h.is_control() {
            // A transaction's end: its offsets apply (COMMIT) or go (ABORT).
            let commit = records
                .first()
                .and_then(|r| r.key)
                .is_some_and(|k| k.len() >= 4 && k[2..4] == [0, 1]);
            if let Some(entries) = open.remove(&h.producer_id) {
                if commit {
                    for (g, t, p, c) in entries {
                        coord.apply_commit(&g, &t, p, Some(c));
                        n += 1;
                    }
                }
            }
            return;
        }
        for r in records {
            if let Some((g, t, p, c)) = offsets::parse(r) {
                match (h.is_transactional(), c) {
                    (true, Some(c)) => open.entry(h.producer_id).or_default().push((g, t, p, c)),
                    (true, None) => {}
                    (false, c) => {
                        coord.apply_commit(&g, &t, p, c);
                        n += 1;
                    }
                }
            } else if let Some((g, sn)) = snapshot::parse(r) {
                coord.load_group(now, &g, sn);
                groups += 1;
            }
        }
    });
    coord.prune();
    tracing::info!(
        records = n,
        group_records = groups,
        groups = coord.groups().count(),
        open_transactions = open.len(),
        "replayed committed offsets and group metadata"
    );
    (coord, open)
}

impl GroupService {
    /// Replay the offsets log into a new coordinator (alone in a region), or, with
    /// `Serving::No`, wait for [`GroupService::on_role`] to name this broker the coordinator.
    pub fn open(
        log: Arc<Partition>,
        writer: Writer,
        config: GroupConfig,
        serving: Serving,
    ) -> GroupService {
        let (coord, txn_offsets) = if serving == Serving::Solo {
            replay(&log, &config)
        } else {
            (Coordinator::new(config.clone()), HashMap::new())
        };
        GroupService {
            txn_offsets: Mutex::new(txn_offsets),
            coord: Mutex::new(coord),
            waiters: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(1),
            seat: RwLock::new(Seat { log, serving }),
            writer,
            config,
        }
    }

    fn seat(&self) -> Seat {
        self.seat.read().expect("seat lock").clone()
    }

    /// Whether this broker coordinates groups now.
    pub fn serving(&self) -> bool {
        self.seat().serving != Serving::No
    }

    /// NOT_COORDINATOR unless this broker coordinates groups now.
    fn refuse(&self) -> Option<i16> {
        (!self.serving()).then_some(code::NOT_COORDINATOR)
    }

    /// In a cluster: follow this broker's part in the offsets partition `log`. Taking the lead
    /// (at a new leader epoch) replays the log into a fresh coordinator; losing it drops every
    /// group and deferred answer here.
    pub fn on_role(&self, log: &Arc<Partition>, role: &Replica, min_insync: usize) {
        let want = match role {
            Replica::Leader(l) => Serving::Leader {
                epoch: l.leader_epoch(),
                min_insync,
            },
            _ => Serving::No,
        };
        let cur = self.seat();
        if cur.serving == want && Arc::ptr_eq(&cur.log, log) {
            return;
        }
        let (fresh, open) = match want {
            Serving::Leader { epoch, .. } => {
                tracing::info!(leader_epoch = epoch, "coordinating consumer groups here");
                replay(log, &self.config)
            }
            _ => {
                if cur.serving != Serving::No {
                    tracing::info!("no longer the group coordinator");
                }
                (Coordinator::new(self.config.clone()), HashMap::new())
            }
        };
        *self.coord.lock().expect("coordinator lock") = fresh;
        *self.txn_offsets.lock().expect("txn offsets lock") = open;
        // Deferred joins and syncs end (their clients see COORDINATOR_NOT_AVAILABLE and look
        // the coordinator up again).
        self.waiters.lock().expect("waiters lock").clear();
        *self.seat.write().expect("seat lock") = Seat {
            log: log.clone(),
            serving: want,
        };
    }

    /// Run the coordinator's clock (session expiry, rebalance deadlines) until the process ends.
    pub fn spawn_ticker(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let replies = {
                    let mut c = me.coord.lock().expect("coordinator lock");
                    c.tick(now_ms());
                    c.take_replies()
                };
                me.dispatch(replies);
            }
        });
    }

    /// Write the groups that came to rest, in order, every tick (a task of its own: a slow
    /// write must not hold up session expiry).
    pub fn spawn_snapshot_writer(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                me.write_snapshots().await;
            }
        });
    }

    fn dispatch(&self, replies: Vec<Reply>) {
        if replies.is_empty() {
            return;
        }
        let mut w = self.waiters.lock().expect("waiters lock");
        for r in replies {
            match r {
                Reply::Join(t, j) => {
                    if let Some(Waiter::Join(tx)) = w.remove(&t) {
                        let _ = tx.send(j);
                    }
                }
                Reply::Sync(t, s) => {
                    if let Some(Waiter::Sync(tx)) = w.remove(&t) {
                        let _ = tx.send(s);
                    }
                }
            }
        }
    }

    pub fn with<R>(&self, f: impl FnOnce(&Coordinator) -> R) -> R {
        f(&self.coord.lock().expect("coordinator lock"))
    }

    pub async fn join(&self, req: JoinRequest) -> JoinResult {
        if let Some(error) = self.refuse() {
            return JoinResult {
                error,
                generation: -1,
                protocol_type: None,
                protocol_name: None,
                leader: String::new(),
                member_id: req.member_id,
                members: Vec::new(),
            };
        }
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .expect("waiters lock")
            .insert(token, Waiter::Join(tx));
        let member = req.member_id.clone();
        let (now, replies) = {
            let mut c = self.coord.lock().expect("coordinator lock");
            let r = c.join(now_ms(), token, req);
            (r, c.take_replies())
        };
        if let Some(r) = now {
            self.waiters.lock().expect("waiters lock").remove(&token);
            self.dispatch(replies);
            return r;
        }
        self.dispatch(replies);
        rx.await.unwrap_or_else(|_| JoinResult {
            error: code::COORDINATOR_NOT_AVAILABLE,
            generation: -1,
            protocol_type: None,
            protocol_name: None,
            leader: String::new(),
            member_id: member,
            members: Vec::new(),
        })
    }

    pub async fn sync(
        &self,
        group: &str,
        generation: i32,
        member: &str,
        assignments: Vec<(String, Vec<u8>)>,
    ) -> SyncResult {
        if let Some(error) = self.refuse() {
            return SyncResult {
                error,
                protocol_type: None,
                protocol_name: None,
                assignment: Vec::new(),
            };
        }
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .expect("waiters lock")
            .insert(token, Waiter::Sync(tx));
        let (now, replies) = {
            let mut c = self.coord.lock().expect("coordinator lock");
            let r = c.sync(now_ms(), token, group, generation, member, assignments);
            (r, c.take_replies())
        };
        if let Some(r) = now {
            self.waiters.lock().expect("waiters lock").remove(&token);
            self.dispatch(replies);
            return r;
        }
        self.dispatch(replies);
        rx.await.unwrap_or(SyncResult {
            error: code::COORDINATOR_NOT_AVAILABLE,
            protocol_type: None,
            protocol_name: None,
            assignment: Vec::new(),
        })
    }

    pub fn heartbeat(&self, group: &str, generation: i32, member: &str) -> i16 {
        if let Some(error) = self.refuse() {
            return error;
        }
        self.coord
            .lock()
            .expect("coordinator lock")
            .heartbeat(now_ms(), group, generation, member)
    }

    pub fn leave(&self, group: &str, members: &[(String, Option<String>)]) -> Vec<i16> {
        if let Some(error) = self.refuse() {
            return vec![error; members.len().max(1)];
        }
        let (r, replies) = {
            let mut c = self.coord.lock().expect("coordinator lock");
            let r = c.leave(now_ms(), group, members);
            (r, c.take_replies())
        };
        self.dispatch(replies);
        r
    }

    pub fn check_commit(&self, group: &str, generation: i32, member: &str) -> i16 {
        if let Some(error) = self.refuse() {
            return error;
        }
        self.coord
            .lock()
            .expect("coordinator lock")
            .check_commit(group, generation, member)
    }

    /// Apply and durably write commits (or deletions, with `None`). Returns an error code for
    /// the whole write: NONE once the records are on disk.
    pub async fn write(&self, group: &str, entries: Vec<(String, i32, Option<Committed>)>) -> i16 {
        let seat = self.seat();
        if seat.serving == Serving::No {
            return code::NOT_COORDINATOR;
        }
        if entries.is_empty() {
            return code::NONE;
        }
        let records: Vec<build::Record> = {
            let mut c = self.coord.lock().expect("coordinator lock");
            entries
                .iter()
                .map(|(t, p, v)| {
                    c.apply_commit(group, t, *p, v.clone());
                    offsets::record(group, t, *p, v.as_ref())
                })
                .collect()
        };
        self.append(&seat, records, group).await
    }

    /// Append `records` to the offsets log as one batch with `acks=all` (in a cluster: until
    /// every in-sync replica has it). `what` names them in logs.
    async fn append(&self, seat: &Seat, records: Vec<build::Record>, what: &str) -> i16 {
        self.append_as(seat, records, what, None).await
    }

    /// [`GroupService::append`], as a transactional batch of `producer` (id, epoch) if given.
    async fn append_as(
        &self,
        seat: &Seat,
        records: Vec<build::Record>,
        what: &str,
        producer: Option<(i64, i16)>,
    ) -> i16 {
        let epoch = match seat.serving {
            Serving::No => return code::NOT_COORDINATOR,
            Serving::Solo => None,
            Serving::Leader { epoch, .. } => Some(epoch),
        };
        let bytes = match producer {
            None => build::batch(0, now_ms(), None, &records),
            Some((id, epoch)) => build::with_attributes(
                build::batch(0, now_ms(), Some((id, epoch, -1)), &records),
                batch::TRANSACTIONAL,
            ),
        };
        let header = batch::validate(&bytes).expect("a batch we built");
        let (tx, rx) = oneshot::channel();
        let last_delta = header.last_offset_delta as i64;
        let req = AppendRequest {
            partition: seat.log.clone(),
            bytes: bytes.into(),
            header,
            acks: -1,
            epoch,
            exact: false,
            gap_from: i64::MAX,
            reply: Some(tx),
        };
        if self.writer.submit(req).await.is_err() {
            return code::COORDINATOR_NOT_AVAILABLE;
        }
        let base = match rx.await {
            Ok(Ok(ok)) => ok.base_offset,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "writing committed offsets failed");
                return if epoch.is_some() {
                    code::NOT_COORDINATOR
                } else {
                    code::COORDINATOR_NOT_AVAILABLE
                };
            }
            Err(_) => return code::COORDINATOR_NOT_AVAILABLE,
        };
        if let Serving::Leader { epoch, min_insync } = seat.serving {
            // As Kafka maps them: the leadership moved, NOT_COORDINATOR; too few replicas or
            // too slow, COORDINATOR_NOT_AVAILABLE (the client retries either way).
            match seat
                .log
                .wait_replicated(epoch, min_insync, base + last_delta + 1, COMMIT_TIMEOUT)
                .await
            {
                Ok(()) => {}
                Err(NotReplicated::LeadershipMoved) => return code::NOT_COORDINATOR,
                Err(e) => {
                    tracing::warn!(group = what, error = %e, "committed offsets not replicated");
                    return code::COORDINATOR_NOT_AVAILABLE;
                }
            }
        }
        code::NONE
    }

    /// Write the groups that came to rest since the last call (their generation, members and
    /// assignments), so a coordinator that takes over carries them on without a rebalance.
    /// A failed write is not retried: a coordinator that loses it costs the group one
    /// rebalance, as before snapshots existed.
    async fn write_snapshots(&self) {
        let seat = self.seat();
        if seat.serving == Serving::No {
            return;
        }
        let snaps = self
            .coord
            .lock()
            .expect("coordinator lock")
            .take_snapshots(now_ms());
        if snaps.is_empty() {
            return;
        }
        let records: Vec<build::Record> = snaps
            .iter()
            .map(|(g, sn)| snapshot::record(g, Some(sn)))
            .collect();
        let code = self.append(&seat, records, "group metadata").await;
        if code != code::NONE {
            tracing::warn!(code, groups = snaps.len(), "writing group metadata failed: a coordinator taking over would rebalance these groups");
        }
    }

    /// TxnOffsetCommit: write offsets as part of producer `producer_id`'s open transaction (a
    /// transactional batch in the offsets log). They apply when its COMMIT marker is written
    /// ([`GroupService::on_txn_marker`]) and are invisible to OffsetFetch until then.
    pub async fn txn_commit(
        &self,
        group: &str,
        producer_id: i64,
        producer_epoch: i16,
        entries: Vec<(String, i32, Committed)>,
    ) -> i16 {
        let seat = self.seat();
        if seat.serving == Serving::No {
            return code::NOT_COORDINATOR;
        }
        if entries.is_empty() {
            return code::NONE;
        }
        let records = entries
            .iter()
            .map(|(t, p, c)| offsets::record(group, t, *p, Some(c)))
            .collect();
        let r = self
            .append_as(&seat, records, group, Some((producer_id, producer_epoch)))
            .await;
        if r == code::NONE {
            let mut open = self.txn_offsets.lock().expect("txn offsets lock");
            let list = open.entry(producer_id).or_default();
            list.extend(
                entries
                    .into_iter()
                    .map(|(t, p, c)| (group.to_string(), t, p, c)),
            );
        }
        r
    }

    /// The transaction of `producer_id` ended with a marker now in the offsets log: its
    /// offsets apply (`commit`) or are dropped.
    pub fn on_txn_marker(&self, producer_id: i64, commit: bool) {
        let entries = self
            .txn_offsets
            .lock()
            .expect("txn offsets lock")
            .remove(&producer_id);
        if let (true, Some(entries)) = (commit, entries) {
            let mut c = self.coord.lock().expect("coordinator lock");
            for (g, t, p, o) in entries {
                c.apply_commit(&g, &t, p, Some(o));
            }
        }
    }

    /// Whether an open transaction holds an offset of `group` for this partition (OffsetFetch
    /// with `require_stable` answers UNSTABLE_OFFSET_COMMIT then, as Kafka does).
    pub fn txn_pending(&self, group: &str, topic: &str, partition: i32) -> bool {
        self.txn_offsets
            .lock()
            .expect("txn offsets lock")
            .values()
            .flatten()
            .any(|(g, t, p, _)| g == group && t == topic && *p == partition)
    }

    /// Delete a group without members and all its offsets.
    pub async fn delete_group(&self, group: &str) -> i16 {
        if let Some(error) = self.refuse() {
            return error;
        }
        let keys = {
            let mut c = self.coord.lock().expect("coordinator lock");
            c.delete_group(group)
        };
        match keys {
            Err(code) => code,
            Ok(keys) => {
                let entries = keys.into_iter().map(|(t, p)| (t, p, None)).collect();
                let mut r = self.write(group, entries).await;
                if r == code::NONE {
                    // The group's membership goes too.
                    r = self
                        .append(&self.seat(), vec![snapshot::record(group, None)], group)
                        .await;
                }
                self.coord.lock().expect("coordinator lock").prune();
                r
            }
        }
    }
}
