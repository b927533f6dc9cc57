//! The controller's decisions, as a sans-IO state machine: which broker leads each partition
//! and which replicas are in sync, when brokers come and go.
//!
//! One broker of a region holds the controller key in etcd at a time; the
//! [`super::etcd`] shell feeds this machine the metadata changes it watches and carries out the
//! [`Write`]s it asks for, each a compare-and-swap on the version the decision was made from.
//! The machine is level-triggered: every decision is recomputed from the image, so a new
//! controller, a lost write or a replayed event needs no special path.
//!
//! The rules (Kafka's, with the ISR kept as the set that holds every acknowledged record):
//! - a leader that is gone is replaced by the first replica, in preference order, that is alive
//!   and in the ISR; the ISR loses the members that are gone; the leader epoch goes up;
//! - with no such replica the partition goes offline (leader -1) and keeps its ISR, so the
//!   first ISR member to come back leads again; only a topic with
//!   `unclean.leader.election.enable=true` elects a replica outside the ISR, and that is
//!   reported ([`Report::Unclean`]) because records acknowledged by the old ISR may be lost;
//! - a follower that is gone leaves the ISR (the leader's epoch stays);
//! - a broker that restarted (a new incarnation under its id) counts as gone once for every
//!   partition it led or was in sync for: its unsynced tail may be lost, so it rejoins as a
//!   follower that catches up, never as a leader on a log it may have lost a tail of;
//! - preferred leaders: on request ([`preferred`], Kafka's ElectLeaders) and, when
//!   `auto_rebalance` is set, every interval for the brokers whose share of non-preferred
//!   leaders passes the imbalance ratio (Kafka's `auto.leader.rebalance.enable`).
//!
//! ISR changes a leader proposes (shrink a lagging follower, add a caught-up one) are checked by
//! [`alter_isr`], the same rules wherever they run.
//!
//! Owns: those decisions, the writes in flight and the rebalance schedule.
//! Does not own: the store, the election of the controller itself, or replication.

use std::collections::{BTreeMap, BTreeSet};

use uuid::Uuid;

use super::metadata::{
    BrokerId, Change, Image, PartitionKey, PartitionState, TopicAssignment, Versioned, NO_LEADER,
};
use crate::failover::lease::Millis;

/// Why the controller changes a partition (logged with the write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// The leader is gone; a member of the ISR takes over.
    LeaderGone { old: BrokerId },
    /// No ISR member is alive: the partition is offline until one comes back.
    Offline { old: BrokerId },
    /// An ISR member came back to an offline partition and leads it.
    Revived,
    /// Followers that are gone leave the ISR.
    IsrShrunk { gone: Vec<BrokerId> },
    /// Unclean election: a replica outside the ISR leads; records may be lost.
    Unclean { old_isr: Vec<BrokerId> },
    /// The preferred replica takes its leadership back.
    Preferred,
}

/// A compare-and-swap the controller asks the shell to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub key: PartitionKey,
    /// The store version the decision was made from; the write fails if the record moved.
    pub expected_version: i64,
    pub state: PartitionState,
    pub why: Why,
}

/// Something an operator must hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// An unclean election: records acknowledged by `old_isr` beyond the new leader's log end
    /// are lost (the truncating replicas log the exact ranges).
    Unclean {
        key: PartitionKey,
        leader: BrokerId,
        leader_epoch: i32,
        old_isr: Vec<BrokerId>,
    },
}

/// Automatic preferred-leader rebalancing (Kafka's `auto.leader.rebalance.enable`,
/// `leader.imbalance.check.interval.seconds`, `leader.imbalance.per.broker.percentage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebalance {
    pub interval_ms: Millis,
    pub imbalance_percent: u32,
}

impl Default for Rebalance {
    fn default() -> Self {
        Rebalance {
            interval_ms: 300_000,
            imbalance_percent: 10,
        }
    }
}

/// The controller state machine.
#[derive(Debug)]
pub struct Controller {
    /// This region's position in the topology: the low byte of every leader epoch it gives
    /// (see [`next_leader_epoch`]).
    region: usize,
    image: Image,
    active: bool,
    /// Brokers as last seen, with their incarnation (to tell a restart).
    incarnations: BTreeMap<BrokerId, Uuid>,
    /// Partitions that must treat a restarted broker as gone once.
    bounced: BTreeMap<PartitionKey, BTreeSet<BrokerId>>,
    /// Writes issued: the version each was made from. A partition with a write in flight gets
    /// no other until the store answers.
    inflight: BTreeMap<PartitionKey, i64>,
    /// Writes whose compare failed: wait for the watch to bring a version newer than this.
    stale: BTreeMap<PartitionKey, i64>,
    /// Preferred-leader elections asked for and not yet written.
    wanted_preferred: BTreeSet<PartitionKey>,
    rebalance: Option<Rebalance>,
    next_rebalance: Option<Millis>,
    reports: Vec<Report>,
}

impl Controller {
    pub fn new(region: usize, rebalance: Option<Rebalance>) -> Controller {
        Controller {
            region,
            image: Image::default(),
            active: false,
            incarnations: BTreeMap::new(),
            bounced: BTreeMap::new(),
            inflight: BTreeMap::new(),
            stale: BTreeMap::new(),
            wanted_preferred: BTreeSet::new(),
            rebalance,
            next_rebalance: None,
            reports: Vec::new(),
        }
    }

    /// This broker became the controller, with a fresh read of the store.
    pub fn activate(&mut self, image: Image, now: Millis) {
        self.image = Image::default();
        self.incarnations.clear();
        self.bounced.clear();
        self.inflight.clear();
        self.stale.clear();
        self.wanted_preferred.clear();
        self.active = true;
        for info in image.brokers.values() {
            self.incarnations.insert(info.id, info.incarnation);
        }
        self.image = image;
        self.next_rebalance = self.rebalance.map(|r| now + r.interval_ms);
    }

    /// This broker lost the controller key: it decides nothing until activated again.
    pub fn deactivate(&mut self) {
        self.active = false;
        self.next_rebalance = None;
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    pub fn image(&self) -> &Image {
        &self.image
    }

    /// A change seen in the store (watch event, or the result of this controller's own write).
    pub fn on_change(&mut self, change: Change) {
        match &change {
            Change::Broker(info) => {
                let old = self.incarnations.insert(info.id, info.incarnation);
                if old.is_some_and(|o| o != info.incarnation) {
                    // A restart that the lease did not outlive: gone once, everywhere it counted.
                    for (key, st) in &self.image.partitions {
                        if st.value.leader == info.id || st.value.isr.contains(&info.id) {
                            self.bounced.entry(key.clone()).or_default().insert(info.id);
                        }
                    }
                }
            }
            // The incarnation is kept: a broker that is gone and back under a new one between
            // two polls is still seen to have restarted.
            Change::BrokerGone(_) => {}
            Change::Partition(key, v) => {
                if self.inflight.get(key).is_some_and(|e| v.version > *e) {
                    self.inflight.remove(key);
                }
                if self.stale.get(key).is_some_and(|e| v.version > *e) {
                    self.stale.remove(key);
                }
            }
            Change::PartitionGone(key) => self.forget(key),
            Change::TopicGone(name) => {
                let keys: Vec<_> = self
                    .image
                    .partitions
                    .keys()
                    .filter(|(t, _)| t == name)
                    .cloned()
                    .collect();
                for k in keys {
                    self.forget(&k);
                }
            }
            Change::Topic(_) | Change::Controller(_) | Change::Failover(_) => {}
        }
        self.image.apply(change);
    }

    fn forget(&mut self, key: &PartitionKey) {
        self.inflight.remove(key);
        self.stale.remove(key);
        self.bounced.remove(key);
        self.wanted_preferred.remove(key);
    }

    /// The store refused a write: `stale` when its compare failed (someone wrote first; wait
    /// for the watch to bring that version), otherwise an I/O failure (decide again).
    pub fn on_write_failed(&mut self, key: &PartitionKey, stale: bool) {
        if let Some(v) = self.inflight.remove(key) {
            if stale {
                self.stale.insert(key.clone(), v);
            }
        }
    }

    /// Ask for the preferred replica to lead `key` (ElectLeaders). Errors as Kafka answers them.
    pub fn elect_preferred(&mut self, key: &PartitionKey) -> Result<(), ElectError> {
        let (topic, st) = self.lookup(key)?;
        preferred(topic, key.1, &st.value, &self.alive(), self.region)?;
        self.wanted_preferred.insert(key.clone());
        Ok(())
    }

    fn lookup(
        &self,
        key: &PartitionKey,
    ) -> Result<(&TopicAssignment, &Versioned<PartitionState>), ElectError> {
        let topic = self
            .image
            .topics
            .get(&key.0)
            .ok_or(ElectError::UnknownPartition)?;
        let st = self
            .image
            .partitions
            .get(key)
            .ok_or(ElectError::UnknownPartition)?;
        Ok((&topic.value, st))
    }

    fn alive(&self) -> BTreeSet<BrokerId> {
        self.image.brokers.keys().copied().collect()
    }

    /// The writes to make now. Each partition has at most one in flight.
    pub fn poll_writes(&mut self) -> Vec<Write> {
        if !self.active {
            return Vec::new();
        }
        let alive = self.alive();
        let mut out = Vec::new();
        let mut settled = Vec::new();
        for (key, st) in &self.image.partitions {
            if self.inflight.contains_key(key) || self.stale.contains_key(key) {
                continue;
            }
            let Some(topic) = self.image.topics.get(&key.0) else {
                continue;
            };
            let Some(replicas) = topic.value.replicas.get(key.1 as usize) else {
                continue;
            };
            let mut view = alive.clone();
            if let Some(b) = self.bounced.get(key) {
                view.retain(|id| !b.contains(id));
            }
            let mut decision = decide(&topic.value, replicas, &st.value, &view, self.region);
            if decision.is_none() && self.bounced.contains_key(key) {
                // The restart changes nothing here (the partition was offline or the broker
                // out of sync already): the broker counts as alive again at once.
                settled.push(key.clone());
                view = alive.clone();
                decision = decide(&topic.value, replicas, &st.value, &view, self.region);
            }
            if decision.is_none() && self.wanted_preferred.contains(key) {
                decision = preferred(&topic.value, key.1, &st.value, &view, self.region)
                    .ok()
                    .map(|s| (s, Why::Preferred));
                settled.push(key.clone());
            }
            if decision.is_none() {
                continue;
            }
            let (state, why) = decision.expect("checked");
            debug_assert_eq!(state.check(replicas), Ok(()));
            assert!(state.leader_epoch >= st.value.leader_epoch);
            if let Why::Unclean { old_isr } = &why {
                self.reports.push(Report::Unclean {
                    key: key.clone(),
                    leader: state.leader,
                    leader_epoch: state.leader_epoch,
                    old_isr: old_isr.clone(),
                });
            }
            out.push(Write {
                key: key.clone(),
                expected_version: st.version,
                state,
                why,
            });
        }
        for w in &out {
            self.inflight.insert(w.key.clone(), w.expected_version);
            // A bounce is one write: the next decision sees the broker as alive again.
            self.bounced.remove(&w.key);
            if w.why == Why::Preferred {
                self.wanted_preferred.remove(&w.key);
            }
        }
        for k in settled {
            self.bounced.remove(&k);
            if !out.iter().any(|w| w.key == k) {
                self.wanted_preferred.remove(&k);
            }
        }
        out
    }

    /// Reports since the last call.
    pub fn take_reports(&mut self) -> Vec<Report> {
        std::mem::take(&mut self.reports)
    }

    /// When the machine next wants [`Controller::on_timeout`].
    pub fn poll_timeout(&self) -> Option<Millis> {
        self.next_rebalance
    }

    /// Time passed: the automatic rebalance check, if due.
    pub fn on_timeout(&mut self, now: Millis) {
        let (Some(r), Some(due)) = (self.rebalance, self.next_rebalance) else {
            return;
        };
        if now < due || !self.active {
            return;
        }
        self.next_rebalance = Some(now + r.interval_ms);
        let alive = self.alive();
        // Per preferred broker: partitions it should lead, and how many it does not.
        let mut share: BTreeMap<BrokerId, (u32, u32)> = BTreeMap::new();
        for (key, st) in &self.image.partitions {
            let Some(first) = self.image.replicas(&key.0, key.1).and_then(|r| r.first()) else {
                continue;
            };
            let e = share.entry(*first).or_default();
            e.0 += 1;
            if st.value.leader != *first {
                e.1 += 1;
            }
        }
        let over: BTreeSet<BrokerId> = share
            .iter()
            .filter(|(_, (total, off))| *off * 100 > *total * r.imbalance_percent)
            .map(|(b, _)| *b)
            .collect();
        for (key, st) in &self.image.partitions {
            let Some(topic) = self.image.topics.get(&key.0) else {
                continue;
            };
            let first = topic
                .value
                .replicas
                .get(key.1 as usize)
                .and_then(|r| r.first());
            if first.is_some_and(|b| over.contains(b))
                && preferred(&topic.value, key.1, &st.value, &alive, self.region).is_ok()
            {
                self.wanted_preferred.insert(key.clone());
            }
        }
    }
}

/// The leader epoch after `current` in region `region`: the next block of 256 with the
/// region's position as its low byte, the form region epochs take
/// ([`crate::failover::next_epoch`]). Leader epochs are stamped into the batches a leader
/// writes, and batches cross regions byte for byte: so an epoch names the one region (and
/// term) that wrote it, whatever the regions' clusters did, and epoch histories compared
/// across regions stay exact.
pub fn next_leader_epoch(current: i32, region: usize) -> i32 {
    crate::failover::next_epoch(current, region)
}

/// The change a partition needs given which brokers are alive, if any (the rules in the
/// module doc, except preferred leaders).
pub fn decide(
    topic: &TopicAssignment,
    replicas: &[BrokerId],
    st: &PartitionState,
    alive: &BTreeSet<BrokerId>,
    region: usize,
) -> Option<(PartitionState, Why)> {
    let isr_alive: Vec<BrokerId> = st
        .isr
        .iter()
        .copied()
        .filter(|b| alive.contains(b))
        .collect();
    let next = |leader: BrokerId, isr: Vec<BrokerId>, bump: bool| PartitionState {
        leader,
        leader_epoch: if bump {
            next_leader_epoch(st.leader_epoch, region)
        } else {
            st.leader_epoch
        },
        isr,
        partition_epoch: st.partition_epoch + 1,
    };
    if st.leader != NO_LEADER && alive.contains(&st.leader) {
        if isr_alive.len() < st.isr.len() {
            let gone = st
                .isr
                .iter()
                .copied()
                .filter(|b| !alive.contains(b))
                .collect();
            return Some((next(st.leader, isr_alive, false), Why::IsrShrunk { gone }));
        }
        return None;
    }
    if let Some(c) = replicas.iter().copied().find(|r| isr_alive.contains(r)) {
        let why = if st.leader == NO_LEADER {
            Why::Revived
        } else {
            Why::LeaderGone { old: st.leader }
        };
        return Some((next(c, isr_alive, true), why));
    }
    if topic.unclean_election() {
        if let Some(c) = replicas.iter().copied().find(|r| alive.contains(r)) {
            return Some((
                next(c, vec![c], true),
                Why::Unclean {
                    old_isr: st.isr.clone(),
                },
            ));
        }
    }
    if st.leader != NO_LEADER {
        return Some((
            next(NO_LEADER, st.isr.clone(), true),
            Why::Offline { old: st.leader },
        ));
    }
    None
}

/// Why a preferred-leader election is not made (Kafka's ElectLeaders errors).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElectError {
    #[error("the preferred replica already leads")]
    NotNeeded,
    #[error("no eligible replica is alive (the preferred one must be alive and in sync)")]
    NotAvailable,
    #[error("no such topic or partition")]
    UnknownPartition,
}

impl ElectError {
    pub fn kafka_code(&self) -> i16 {
        match self {
            ElectError::NotNeeded => 84,    // ELECTION_NOT_NEEDED
            ElectError::NotAvailable => 80, // PREFERRED_LEADER_NOT_AVAILABLE
            ElectError::UnknownPartition => 3,
        }
    }
}

fn replica_set(topic: &TopicAssignment, partition: i32) -> Result<&[BrokerId], ElectError> {
    usize::try_from(partition)
        .ok()
        .and_then(|p| topic.replicas.get(p))
        .map(|r| r.as_slice())
        .ok_or(ElectError::UnknownPartition)
}

/// The state with the preferred replica (the first) leading, if it may.
pub fn preferred(
    topic: &TopicAssignment,
    partition: i32,
    st: &PartitionState,
    alive: &BTreeSet<BrokerId>,
    region: usize,
) -> Result<PartitionState, ElectError> {
    let first = *replica_set(topic, partition)?
        .first()
        .ok_or(ElectError::UnknownPartition)?;
    if st.leader == first {
        return Err(ElectError::NotNeeded);
    }
    if !alive.contains(&first) || !st.isr.contains(&first) {
        return Err(ElectError::NotAvailable);
    }
    Ok(PartitionState {
        leader: first,
        leader_epoch: next_leader_epoch(st.leader_epoch, region),
        isr: st.isr.clone(),
        partition_epoch: st.partition_epoch + 1,
    })
}

/// The state after an operator's unclean election (ElectLeaders with election type UNCLEAN):
/// only for an offline partition with no ISR member alive, the first alive replica leads alone.
/// Records acknowledged by the old ISR beyond its log end are lost; the caller reports it.
pub fn unclean(
    topic: &TopicAssignment,
    partition: i32,
    st: &PartitionState,
    alive: &BTreeSet<BrokerId>,
    region: usize,
) -> Result<PartitionState, ElectError> {
    let replicas = replica_set(topic, partition)?;
    if st.leader != NO_LEADER || st.isr.iter().any(|b| alive.contains(b)) {
        return Err(ElectError::NotNeeded);
    }
    let c = replicas
        .iter()
        .copied()
        .find(|r| alive.contains(r))
        .ok_or(ElectError::NotAvailable)?;
    Ok(PartitionState {
        leader: c,
        leader_epoch: next_leader_epoch(st.leader_epoch, region),
        isr: vec![c],
        partition_epoch: st.partition_epoch + 1,
    })
}

/// Why a leader's ISR change is refused (Kafka's AlterPartition errors).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AlterError {
    #[error("broker {0} does not lead this partition at epoch {1}")]
    NotLeader(BrokerId, i32),
    #[error("the change was made from partition epoch {0}, the partition is at {1}")]
    StaleEpoch(i32, i32),
    #[error("broker {0} cannot join the ISR: it is not an alive replica")]
    Ineligible(BrokerId),
    #[error("the new ISR must hold the leader")]
    DropsLeader,
}

/// Check an ISR change proposed by `leader` at `leader_epoch`, made from `partition_epoch`,
/// and give the new state. The new ISR must hold the leader; members it adds must be alive
/// replicas. (That a follower caught up is the leader's judgement; the replication core makes it.)
pub fn alter_isr(
    replicas: &[BrokerId],
    st: &PartitionState,
    leader: BrokerId,
    leader_epoch: i32,
    partition_epoch: i32,
    new_isr: &[BrokerId],
    alive: &BTreeSet<BrokerId>,
) -> Result<PartitionState, AlterError> {
    if st.leader != leader || st.leader_epoch != leader_epoch {
        return Err(AlterError::NotLeader(leader, leader_epoch));
    }
    if st.partition_epoch != partition_epoch {
        return Err(AlterError::StaleEpoch(partition_epoch, st.partition_epoch));
    }
    if !new_isr.contains(&leader) {
        return Err(AlterError::DropsLeader);
    }
    let mut isr = Vec::with_capacity(new_isr.len());
    for b in new_isr {
        if isr.contains(b) {
            continue;
        }
        if !st.isr.contains(b) && (!replicas.contains(b) || !alive.contains(b)) {
            return Err(AlterError::Ineligible(*b));
        }
        isr.push(*b);
    }
    Ok(PartitionState {
        leader,
        leader_epoch,
        isr,
        partition_epoch: st.partition_epoch + 1,
    })
}

#[cfg(test)]
mod tests;
