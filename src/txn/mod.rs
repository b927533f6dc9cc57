//! The transaction coordinator: Kafka's transaction protocol (transaction version 1) as a state
//! machine. The broker's shell ([`crate::broker::txns`]) drives it: it writes the states to
//! `__transaction_state`, the markers to the partitions, and answers the requests.
//!
//! Owns: each transactional id's producer id and epoch, its state (Empty → Ongoing →
//! PrepareCommit/PrepareAbort → CompleteCommit/CompleteAbort), the partitions of its open
//! transaction, fencing of zombies (InitProducerId bumps the epoch; an open transaction of the
//! old epoch is aborted first), transaction timeouts, and what must be durable before an answer.
//! Does not own: I/O. Calls take the time and a request [`Token`] and queue [`Action`]s: write a
//! state record to `__transaction_state` and report back with [`Coordinator::on_written`]; write
//! COMMIT/ABORT markers to the transaction's partitions and report back with
//! [`Coordinator::on_markers_written`]; answer a request. A state is applied in memory only once
//! its record is durable (Kafka's `pendingState`), and while one is pending the transactional id
//! answers CONCURRENT_TRANSACTIONS, which clients retry.
//!
//! Invariants, asserted: a transactional id's epoch never goes back for the same producer id; a
//! transaction's partitions are only added to while it is Ongoing.

pub mod log;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// Kafka error codes of the transaction APIs.
pub mod code {
    pub const NONE: i16 = 0;
    pub const COORDINATOR_NOT_AVAILABLE: i16 = 15;
    pub const NOT_COORDINATOR: i16 = 16;
    pub const INVALID_PRODUCER_EPOCH: i16 = 47;
    pub const INVALID_TXN_STATE: i16 = 48;
    pub const INVALID_PRODUCER_ID_MAPPING: i16 = 49;
    pub const INVALID_TRANSACTION_TIMEOUT: i16 = 50;
    pub const CONCURRENT_TRANSACTIONS: i16 = 51;
    pub const PRODUCER_FENCED: i16 = 90;
}

/// Identifies a request whose answer may come later.
pub type Token = u64;

/// A transaction's state, with Kafka's ids (`TransactionState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Empty = 0,
    Ongoing = 1,
    PrepareCommit = 2,
    PrepareAbort = 3,
    CompleteCommit = 4,
    CompleteAbort = 5,
    Dead = 6,
    PrepareEpochFence = 7,
}

impl Status {
    pub fn from_id(id: i8) -> Option<Status> {
        Some(match id {
            0 => Status::Empty,
            1 => Status::Ongoing,
            2 => Status::PrepareCommit,
            3 => Status::PrepareAbort,
            4 => Status::CompleteCommit,
            5 => Status::CompleteAbort,
            6 => Status::Dead,
            7 => Status::PrepareEpochFence,
            _ => return None,
        })
    }

    /// Kafka's name of the state (DescribeTransactions, ListTransactions).
    pub fn name(self) -> &'static str {
        match self {
            Status::Empty => "Empty",
            Status::Ongoing => "Ongoing",
            Status::PrepareCommit => "PrepareCommit",
            Status::PrepareAbort => "PrepareAbort",
            Status::CompleteCommit => "CompleteCommit",
            Status::CompleteAbort => "CompleteAbort",
            Status::Dead => "Dead",
            Status::PrepareEpochFence => "PrepareEpochFence",
        }
    }

    /// Open or ending: the transaction still has markers to write.
    pub fn unfinished(self) -> bool {
        self == Status::Ongoing || self.preparing()
    }

    fn preparing(self) -> bool {
        matches!(
            self,
            Status::PrepareCommit | Status::PrepareAbort | Status::PrepareEpochFence
        )
    }
}

/// One transactional id's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnMeta {
    pub producer_id: i64,
    pub epoch: i16,
    /// The producer id and epoch before the last InitProducerId (KIP-360: a producer retrying
    /// its InitProducerId after a lost answer is recognised).
    pub last_producer_id: i64,
    pub last_epoch: i16,
    pub timeout_ms: i32,
    pub status: Status,
    pub partitions: BTreeSet<(String, i32)>,
    /// When the open transaction began (its first AddPartitions), -1 if none.
    pub start_ms: i64,
    pub update_ms: i64,
}

/// Settings (Kafka's `transaction.*` broker settings).
#[derive(Debug, Clone)]
pub struct TxnConfig {
    /// `transaction.max.timeout.ms`: longer producer timeouts are refused.
    pub max_timeout_ms: i32,
}

impl Default for TxnConfig {
    fn default() -> Self {
        TxnConfig {
            max_timeout_ms: 900_000,
        }
    }
}

/// An answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// InitProducerId: the error, or the producer id and epoch to use.
    ProducerId {
        error: i16,
        producer_id: i64,
        epoch: i16,
    },
    /// AddPartitionsToTxn, AddOffsetsToTxn, EndTxn: one error code.
    Code(i16),
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Append `meta` as `transactional_id`'s record to `__transaction_state` (`acks=all`), then
    /// call [`Coordinator::on_written`] with `write`.
    Write {
        write: Token,
        transactional_id: String,
        meta: TxnMeta,
    },
    /// Write a COMMIT (or ABORT) control batch of `producer_id` at `epoch` to every partition,
    /// then call [`Coordinator::on_markers_written`].
    Markers {
        transactional_id: String,
        producer_id: i64,
        epoch: i16,
        commit: bool,
        partitions: Vec<(String, i32)>,
    },
    /// Answer request `request`.
    Reply { request: Token, answer: Answer },
}

/// A state write on its way to disk.
#[derive(Debug)]
struct Pending {
    transactional_id: String,
    meta: TxnMeta,
    reply: Option<(Token, Answer)>,
}

/// The coordinator of the transactional ids of one `__transaction_state` partition.
#[derive(Debug, Default)]
pub struct Coordinator {
    config: TxnConfig,
    txns: BTreeMap<String, TxnMeta>,
    pending: HashMap<Token, Pending>,
    /// Transactional ids with a write pending.
    busy: BTreeSet<String>,
    next_write: Token,
    actions: VecDeque<Action>,
}

impl Coordinator {
    pub fn new(config: TxnConfig) -> Coordinator {
        Coordinator {
            config,
            ..Default::default()
        }
    }

    /// The actions queued since the last call, in order.
    pub fn take_actions(&mut self) -> Vec<Action> {
        self.actions.drain(..).collect()
    }

    pub fn get(&self, transactional_id: &str) -> Option<&TxnMeta> {
        self.txns.get(transactional_id)
    }

    /// Every transactional id and its state.
    pub fn all(&self) -> impl Iterator<Item = (&String, &TxnMeta)> {
        self.txns.iter()
    }

    /// Whether producer `producer_id` at `epoch` may write a transactional batch to
    /// `partition` now (KIP-890's verification): its transaction is open and holds the
    /// partition. `NONE`, or the error the produce gets.
    pub fn verify(&self, id: &str, producer_id: i64, epoch: i16, partition: &(String, i32)) -> i16 {
        let Some(m) = self.txns.get(id).filter(|m| m.producer_id == producer_id) else {
            return code::INVALID_PRODUCER_ID_MAPPING;
        };
        if epoch < m.epoch {
            return code::PRODUCER_FENCED;
        }
        if epoch != m.epoch {
            return code::INVALID_PRODUCER_EPOCH;
        }
        if m.status == Status::Ongoing && m.partitions.contains(partition) {
            code::NONE
        } else {
            code::INVALID_TXN_STATE
        }
    }

    fn reply(&mut self, request: Token, answer: Answer) {
        self.actions.push_back(Action::Reply { request, answer });
    }

    fn write(&mut self, id: &str, meta: TxnMeta, reply: Option<(Token, Answer)>) {
        self.next_write += 1;
        let write = self.next_write;
        self.busy.insert(id.to_string());
        self.pending.insert(
            write,
            Pending {
                transactional_id: id.to_string(),
                meta: meta.clone(),
                reply,
            },
        );
        self.actions.push_back(Action::Write {
            write,
            transactional_id: id.to_string(),
            meta,
        });
    }

    /// Load a state replayed from `__transaction_state` (the last record of each id wins). A
    /// transaction found preparing gets its markers written again.
    pub fn load(&mut self, transactional_id: &str, meta: Option<TxnMeta>) {
        match meta {
            Some(m) => {
                self.txns.insert(transactional_id.to_string(), m);
            }
            None => {
                self.txns.remove(transactional_id);
            }
        }
    }

    /// After a replay: finish every transaction that was preparing when the last coordinator
    /// stopped (its markers may not all have been written).
    pub fn resume(&mut self) {
        let preparing: Vec<(String, TxnMeta)> = self
            .txns
            .iter()
            .filter(|(_, m)| m.status.preparing())
            .map(|(k, m)| (k.clone(), m.clone()))
            .collect();
        for (id, m) in preparing {
            self.markers(&id, &m);
        }
    }

    fn markers(&mut self, id: &str, m: &TxnMeta) {
        self.actions.push_back(Action::Markers {
            transactional_id: id.to_string(),
            producer_id: m.producer_id,
            epoch: m.epoch,
            commit: m.status == Status::PrepareCommit,
            partitions: m.partitions.iter().cloned().collect(),
        });
    }

    /// InitProducerId with a transactional id. `fresh_producer_id` is a newly allocated id,
    /// used for a new transactional id or when the epoch is exhausted. `current` is the
    /// producer's own id and epoch when it asks again (KIP-360), else `None`.
    pub fn init_producer_id(
        &mut self,
        request: Token,
        now_ms: i64,
        id: &str,
        timeout_ms: i32,
        fresh_producer_id: i64,
        current: Option<(i64, i16)>,
    ) {
        let fail = |error| Answer::ProducerId {
            error,
            producer_id: -1,
            epoch: -1,
        };
        if timeout_ms <= 0 || timeout_ms > self.config.max_timeout_ms {
            return self.reply(request, fail(code::INVALID_TRANSACTION_TIMEOUT));
        }
        if self.busy.contains(id) {
            return self.reply(request, fail(code::CONCURRENT_TRANSACTIONS));
        }
        let Some(m) = self.txns.get(id).cloned() else {
            let meta = TxnMeta {
                producer_id: fresh_producer_id,
                epoch: 0,
                last_producer_id: -1,
                last_epoch: -1,
                timeout_ms,
                status: Status::Empty,
                partitions: BTreeSet::new(),
                start_ms: -1,
                update_ms: now_ms,
            };
            let answer = Answer::ProducerId {
                error: code::NONE,
                producer_id: fresh_producer_id,
                epoch: 0,
            };
            return self.write(id, meta, Some((request, answer)));
        };
        if let Some((pid, epoch)) = current {
            let is_current = pid == m.producer_id && epoch == m.epoch;
            let is_last = pid == m.last_producer_id && epoch == m.last_epoch;
            if is_last && m.status == Status::Empty {
                // A retry whose answer was lost: the bump already happened.
                let answer = Answer::ProducerId {
                    error: code::NONE,
                    producer_id: m.producer_id,
                    epoch: m.epoch,
                };
                return self.reply(request, answer);
            }
            if !is_current {
                return self.reply(request, fail(code::PRODUCER_FENCED));
            }
        }
        match m.status {
            Status::PrepareCommit | Status::PrepareAbort | Status::PrepareEpochFence => {
                self.reply(request, fail(code::CONCURRENT_TRANSACTIONS))
            }
            Status::Ongoing => {
                // A new incarnation of the producer: fence the old one by aborting its open
                // transaction under a bumped epoch; the client retries and gets the next one.
                let mut fenced = m.clone();
                fenced.epoch = bump(m.epoch);
                fenced.status = Status::PrepareAbort;
                fenced.update_ms = now_ms;
                self.write(id, fenced, None);
                self.reply(request, fail(code::CONCURRENT_TRANSACTIONS));
            }
            Status::Empty | Status::CompleteCommit | Status::CompleteAbort | Status::Dead => {
                let mut next = m.clone();
                next.last_producer_id = m.producer_id;
                next.last_epoch = m.epoch;
                if m.epoch >= i16::MAX - 1 {
                    next.producer_id = fresh_producer_id;
                    next.epoch = 0;
                } else {
                    next.epoch = m.epoch + 1;
                }
                next.timeout_ms = timeout_ms;
                next.status = Status::Empty;
                next.partitions.clear();
                next.start_ms = -1;
                next.update_ms = now_ms;
                let answer = Answer::ProducerId {
                    error: code::NONE,
                    producer_id: next.producer_id,
                    epoch: next.epoch,
                };
                self.write(id, next, Some((request, answer)));
            }
        }
    }

    /// The checks every request of an open producer passes: its id maps to the transactional
    /// id, its epoch is current, nothing is pending.
    fn check(&self, id: &str, producer_id: i64, epoch: i16) -> Result<TxnMeta, i16> {
        let m = self
            .txns
            .get(id)
            .filter(|m| m.producer_id == producer_id)
            .ok_or(code::INVALID_PRODUCER_ID_MAPPING)?;
        if epoch < m.epoch {
            return Err(code::PRODUCER_FENCED);
        }
        if epoch != m.epoch {
            return Err(code::INVALID_PRODUCER_EPOCH);
        }
        if self.busy.contains(id) {
            return Err(code::CONCURRENT_TRANSACTIONS);
        }
        Ok(m.clone())
    }

    /// AddPartitionsToTxn (and AddOffsetsToTxn, with the group's `__consumer_offsets`
    /// partition): the partitions join the open transaction, durably before the answer.
    pub fn add_partitions(
        &mut self,
        request: Token,
        now_ms: i64,
        id: &str,
        producer_id: i64,
        epoch: i16,
        partitions: &[(String, i32)],
    ) {
        let m = match self.check(id, producer_id, epoch) {
            Ok(m) => m,
            Err(e) => return self.reply(request, Answer::Code(e)),
        };
        if m.status.preparing() {
            return self.reply(request, Answer::Code(code::CONCURRENT_TRANSACTIONS));
        }
        if m.status == Status::Ongoing && partitions.iter().all(|p| m.partitions.contains(p)) {
            return self.reply(request, Answer::Code(code::NONE));
        }
        let mut next = m.clone();
        if m.status != Status::Ongoing {
            next.partitions.clear();
            next.start_ms = now_ms;
        }
        next.status = Status::Ongoing;
        next.partitions.extend(partitions.iter().cloned());
        next.update_ms = now_ms;
        self.write(id, next, Some((request, Answer::Code(code::NONE))));
    }

    /// EndTxn: commit or abort the open transaction. Answered once the decision is durable;
    /// the markers follow.
    pub fn end_txn(
        &mut self,
        request: Token,
        now_ms: i64,
        id: &str,
        producer_id: i64,
        epoch: i16,
        commit: bool,
    ) {
        let m = match self.check(id, producer_id, epoch) {
            Ok(m) => m,
            Err(e) => return self.reply(request, Answer::Code(e)),
        };
        let answer = match (m.status, commit) {
            (Status::Ongoing, _) => {
                let mut next = m.clone();
                next.status = if commit {
                    Status::PrepareCommit
                } else {
                    Status::PrepareAbort
                };
                next.update_ms = now_ms;
                return self.write(id, next, Some((request, Answer::Code(code::NONE))));
            }
            // A retry of an EndTxn that got through.
            (Status::CompleteCommit, true) | (Status::CompleteAbort, false) => code::NONE,
            (Status::PrepareCommit, true) | (Status::PrepareAbort, false) => {
                code::CONCURRENT_TRANSACTIONS
            }
            _ => code::INVALID_TXN_STATE,
        };
        self.reply(request, Answer::Code(answer))
    }

    /// A write of [`Action::Write`] is durable (`ok`), or failed: the state applies and the
    /// request is answered, or the request gets `error` (NOT_COORDINATOR when the partition's
    /// leadership moved, else COORDINATOR_NOT_AVAILABLE) and nothing changes.
    pub fn on_written(&mut self, write: Token, ok: bool, error: i16) {
        let Some(p) = self.pending.remove(&write) else {
            return;
        };
        self.busy.remove(&p.transactional_id);
        if !ok {
            if let Some((request, answer)) = p.reply {
                let failed = match answer {
                    Answer::ProducerId { .. } => Answer::ProducerId {
                        error,
                        producer_id: -1,
                        epoch: -1,
                    },
                    Answer::Code(_) => Answer::Code(error),
                };
                self.reply(request, failed);
            }
            return;
        }
        if let Some(old) = self.txns.get(&p.transactional_id) {
            assert!(
                old.producer_id != p.meta.producer_id || p.meta.epoch >= old.epoch,
                "the epoch of {} went back from {} to {}",
                p.transactional_id,
                old.epoch,
                p.meta.epoch
            );
        }
        let preparing = p.meta.status.preparing();
        self.txns.insert(p.transactional_id.clone(), p.meta.clone());
        if let Some((request, answer)) = p.reply {
            self.reply(request, answer);
        }
        if preparing {
            self.markers(&p.transactional_id, &p.meta);
        }
    }

    /// The markers of [`Action::Markers`] are in every partition: the transaction is complete.
    pub fn on_markers_written(&mut self, now_ms: i64, id: &str) {
        let Some(m) = self.txns.get(id).cloned() else {
            return;
        };
        let done = match m.status {
            Status::PrepareCommit => Status::CompleteCommit,
            Status::PrepareAbort | Status::PrepareEpochFence => Status::CompleteAbort,
            _ => return,
        };
        let mut next = m;
        next.status = done;
        next.partitions.clear();
        next.update_ms = now_ms;
        self.write(id, next, None);
    }

    /// Abort every open transaction older than its timeout, fencing its producer (the epoch is
    /// bumped, as Kafka does, so a zombie's late writes are refused).
    pub fn tick(&mut self, now_ms: i64) {
        let expired: Vec<(String, TxnMeta)> = self
            .txns
            .iter()
            .filter(|(id, m)| {
                m.status == Status::Ongoing
                    && m.start_ms + m.timeout_ms as i64 <= now_ms
                    && !self.busy.contains(*id)
            })
            .map(|(id, m)| (id.clone(), m.clone()))
            .collect();
        for (id, _) in expired {
            self.abort(now_ms, &id);
        }
    }

    /// Abort `transactional_id`'s open transaction now, fencing its producer (as a timeout
    /// does): `true` if it was open and nothing else was pending for it.
    pub fn abort(&mut self, now_ms: i64, transactional_id: &str) -> bool {
        let Some(m) = self.txns.get(transactional_id).cloned() else {
            return false;
        };
        if m.status != Status::Ongoing || self.busy.contains(transactional_id) {
            return false;
        }
        let mut next = m.clone();
        next.epoch = bump(m.epoch);
        next.status = Status::PrepareAbort;
        next.update_ms = now_ms;
        self.write(transactional_id, next, None);
        true
    }

    /// When [`Coordinator::tick`] has work next: the earliest timeout of an open transaction.
    pub fn poll_timeout(&self) -> Option<i64> {
        self.txns
            .values()
            .filter(|m| m.status == Status::Ongoing)
            .map(|m| m.start_ms + m.timeout_ms as i64)
            .min()
    }
}

/// The next epoch, as Kafka bumps it to fence (never past `i16::MAX`).
fn bump(epoch: i16) -> i16 {
    epoch.saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Complete every write and marker the coordinator asks for; return the answers.
    fn settle(c: &mut Coordinator, now: i64) -> Vec<(Token, Answer)> {
        let mut answers = Vec::new();
        loop {
            let actions = c.take_actions();
            if actions.is_empty() {
                return answers;
            }
            for a in actions {
                match a {
                    Action::Write { write, .. } => c.on_written(write, true, 0),
                    Action::Markers {
                        transactional_id, ..
                    } => c.on_markers_written(now, &transactional_id),
                    Action::Reply { request, answer } => answers.push((request, answer)),
                }
            }
        }
    }

    fn pid(answers: &[(Token, Answer)]) -> (i64, i16) {
        match answers.last() {
            Some((
                _,
                Answer::ProducerId {
                    error: 0,
                    producer_id,
                    epoch,
                },
            )) => (*producer_id, *epoch),
            other => panic!("no producer id: {other:?}"),
        }
    }

    #[test]
    fn a_transaction_commits_after_its_decision_is_durable_then_its_markers() {
        let mut c = Coordinator::new(TxnConfig::default());
        c.init_producer_id(1, 0, "app", 60_000, 1000, None);
        let (p, e) = pid(&settle(&mut c, 0));
        assert_eq!((p, e), (1000, 0));
        c.add_partitions(2, 10, "app", p, e, &[("t".into(), 0), ("t".into(), 1)]);
        assert_eq!(settle(&mut c, 10), vec![(2, Answer::Code(0))]);
        assert_eq!(c.get("app").unwrap().status, Status::Ongoing);
        c.end_txn(3, 20, "app", p, e, true);
        let actions = c.take_actions();
        assert!(
            matches!(&actions[..], [Action::Write { meta, .. }] if meta.status == Status::PrepareCommit),
            "the decision is written first: {actions:?}"
        );
        let Action::Write { write, .. } = &actions[0] else {
            unreachable!()
        };
        // Until it is durable, the producer waits and a second EndTxn is told to retry.
        c.end_txn(4, 21, "app", p, e, true);
        assert_eq!(
            c.take_actions(),
            vec![Action::Reply {
                request: 4,
                answer: Answer::Code(code::CONCURRENT_TRANSACTIONS)
            }]
        );
        c.on_written(*write, true, 0);
        let actions = c.take_actions();
        assert_eq!(
            actions[0],
            Action::Reply {
                request: 3,
                answer: Answer::Code(0)
            }
        );
        assert_eq!(
            actions[1],
            Action::Markers {
                transactional_id: "app".into(),
                producer_id: p,
                epoch: e,
                commit: true,
                partitions: vec![("t".into(), 0), ("t".into(), 1)],
            }
        );
        c.on_markers_written(30, "app");
        settle(&mut c, 30);
        assert_eq!(c.get("app").unwrap().status, Status::CompleteCommit);
        // A retried EndTxn commit is fine, an abort now is not.
        c.end_txn(5, 40, "app", p, e, true);
        c.end_txn(6, 40, "app", p, e, false);
        assert_eq!(
            settle(&mut c, 40),
            vec![
                (5, Answer::Code(0)),
                (6, Answer::Code(code::INVALID_TXN_STATE))
            ]
        );
    }

    #[test]
    fn a_new_incarnation_fences_the_old_one_and_aborts_its_open_transaction() {
        let mut c = Coordinator::new(TxnConfig::default());
        c.init_producer_id(1, 0, "app", 60_000, 7, None);
        let (p, e0) = pid(&settle(&mut c, 0));
        c.add_partitions(2, 1, "app", p, e0, &[("t".into(), 0)]);
        settle(&mut c, 1);
        // The producer restarts: its first InitProducerId aborts the open transaction under a
        // bumped epoch and is told to retry; the retry gets the epoch after it.
        c.init_producer_id(3, 2, "app", 60_000, 8, None);
        let actions = c.take_actions();
        assert!(actions.iter().any(|a| matches!(
            a,
            Action::Reply {
                request: 3,
                answer: Answer::ProducerId {
                    error: code::CONCURRENT_TRANSACTIONS,
                    ..
                }
            }
        )));
        for a in actions {
            if let Action::Write { write, .. } = a {
                c.on_written(write, true, 0);
            }
        }
        let markers = c.take_actions();
        assert!(
            matches!(&markers[..], [Action::Markers { commit: false, epoch, .. }] if *epoch == e0 + 1),
            "the abort markers carry the fencing epoch: {markers:?}"
        );
        c.on_markers_written(3, "app");
        settle(&mut c, 3);
        assert_eq!(c.get("app").unwrap().status, Status::CompleteAbort);
        c.init_producer_id(4, 4, "app", 60_000, 9, None);
        let (p2, e2) = pid(&settle(&mut c, 4));
        assert_eq!((p2, e2), (p, e0 + 2), "same producer id, a newer epoch");
        // The zombie's requests are fenced.
        c.add_partitions(5, 5, "app", p, e0, &[("t".into(), 1)]);
        c.end_txn(6, 5, "app", p, e0, true);
        assert_eq!(
            settle(&mut c, 5),
            vec![
                (5, Answer::Code(code::PRODUCER_FENCED)),
                (6, Answer::Code(code::PRODUCER_FENCED))
            ]
        );
    }

    #[test]
    fn an_open_transaction_past_its_timeout_is_aborted_and_its_producer_fenced() {
        let mut c = Coordinator::new(TxnConfig::default());
        c.init_producer_id(1, 0, "app", 1_000, 7, None);
        let (p, e) = pid(&settle(&mut c, 0));
        c.add_partitions(2, 100, "app", p, e, &[("t".into(), 0)]);
        settle(&mut c, 100);
        assert_eq!(c.poll_timeout(), Some(1_100));
        c.tick(1_099);
        assert!(c.take_actions().is_empty());
        c.tick(1_100);
        settle(&mut c, 1_100);
        let m = c.get("app").unwrap();
        assert_eq!((m.status, m.epoch), (Status::CompleteAbort, e + 1));
        c.end_txn(3, 1_200, "app", p, e, true);
        assert_eq!(
            settle(&mut c, 1_200),
            vec![(3, Answer::Code(code::PRODUCER_FENCED))]
        );
    }

    #[test]
    fn bad_requests_get_kafkas_errors_and_a_failed_write_changes_nothing() {
        let mut c = Coordinator::new(TxnConfig::default());
        c.init_producer_id(1, 0, "app", 900_001, 7, None);
        c.add_partitions(2, 0, "nobody", 1, 0, &[("t".into(), 0)]);
        assert_eq!(
            settle(&mut c, 0),
            vec![
                (
                    1,
                    Answer::ProducerId {
                        error: code::INVALID_TRANSACTION_TIMEOUT,
                        producer_id: -1,
                        epoch: -1
                    }
                ),
                (2, Answer::Code(code::INVALID_PRODUCER_ID_MAPPING))
            ]
        );
        c.init_producer_id(3, 0, "app", 60_000, 7, None);
        let (p, e) = pid(&settle(&mut c, 0));
        c.end_txn(4, 1, "app", p, e, true);
        assert_eq!(
            settle(&mut c, 1),
            vec![(4, Answer::Code(code::INVALID_TXN_STATE))]
        );
        c.add_partitions(5, 2, "app", p, e, &[("t".into(), 0)]);
        let Some(Action::Write { write, .. }) = c.take_actions().pop() else {
            panic!()
        };
        c.on_written(write, false, code::NOT_COORDINATOR);
        assert_eq!(
            c.take_actions(),
            vec![Action::Reply {
                request: 5,
                answer: Answer::Code(code::NOT_COORDINATOR)
            }]
        );
        assert_eq!(c.get("app").unwrap().status, Status::Empty);
    }

    #[test]
    fn writes_are_verified_against_the_open_transaction_and_abort_fences() {
        let mut c = Coordinator::new(TxnConfig::default());
        c.init_producer_id(1, 0, "app", 60_000, 7, None);
        let (p, e) = pid(&settle(&mut c, 0));
        let t0 = ("t".to_string(), 0);
        let t1 = ("t".to_string(), 1);
        assert_eq!(
            c.verify("app", p, e, &t0),
            code::INVALID_TXN_STATE,
            "not begun"
        );
        c.add_partitions(2, 1, "app", p, e, std::slice::from_ref(&t0));
        settle(&mut c, 1);
        assert_eq!(c.verify("app", p, e, &t0), code::NONE);
        assert_eq!(
            c.verify("app", p, e, &t1),
            code::INVALID_TXN_STATE,
            "not added"
        );
        assert_eq!(
            c.verify("app", p + 1, e, &t0),
            code::INVALID_PRODUCER_ID_MAPPING
        );
        assert_eq!(
            c.verify("other", p, e, &t0),
            code::INVALID_PRODUCER_ID_MAPPING
        );
        assert!(c.abort(2, "app"));
        assert!(!c.abort(2, "app"), "a write is pending");
        settle(&mut c, 2);
        let m = c.get("app").unwrap();
        assert_eq!((m.status, m.epoch), (Status::CompleteAbort, e + 1));
        assert_eq!(c.verify("app", p, e, &t0), code::PRODUCER_FENCED);
        assert!(!c.abort(3, "app"), "nothing open");
    }

    #[test]
    fn a_replayed_coordinator_finishes_what_was_preparing() {
        let mut c = Coordinator::new(TxnConfig::default());
        let m = TxnMeta {
            producer_id: 5,
            epoch: 2,
            last_producer_id: -1,
            last_epoch: -1,
            timeout_ms: 60_000,
            status: Status::PrepareCommit,
            partitions: [("t".to_string(), 3)].into_iter().collect(),
            start_ms: 0,
            update_ms: 0,
        };
        c.load("app", Some(log::parse_value(&log::value(&m)).unwrap()));
        c.resume();
        assert!(matches!(
            &c.take_actions()[..],
            [Action::Markers {
                commit: true,
                producer_id: 5,
                epoch: 2,
                ..
            }]
        ));
        c.on_markers_written(1, "app");
        settle(&mut c, 1);
        assert_eq!(c.get("app").unwrap().status, Status::CompleteCommit);
    }
}
