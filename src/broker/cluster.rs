//! The broker in a region cluster: what it does with the metadata it watches in etcd.
//!
//! - It joins ([`join`]): registers under a lease through [`crate::cluster::member`], which also
//!   makes it a controller candidate.
//! - It applies every new image ([`apply`]): topics appear and go, and each partition it holds
//!   takes its part ([`Replica`]): leader (a new [`Leadership`] at each new leader epoch, the
//!   producer state rebuilt from its log), follower of the leader named (its fetcher is told),
//!   or absent. The write gate follows: only a leader takes client writes, stamped with its
//!   leader epoch.
//! - As a leader it proposes ISR changes ([`isr_loop`]), each a compare-and-swap in etcd checked
//!   by [`alter_isr`].
//! - Topic creation and deletion go through etcd ([`create_topic`], [`delete_topic`]); every
//!   broker, this one included, then applies them from the image.
//!
//! Owns: the link between a broker and its cluster. Does not own: the controller's decisions,
//! the etcd calls, the replication machine or the fetch loop ([`crate::follower`], which
//! watches [`ClusterLink::follow`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::{validate_topic_name, Broker, Gate, Partition, ProducerStates, TopicError};
use crate::cluster::assignment;
use crate::cluster::controller::{alter_isr, Rebalance};
use crate::cluster::etcd::{Outcome, StoreError};
use crate::cluster::member::{self, Member, MemberConfig};
use crate::cluster::metadata::{BrokerId, Image, PartitionState, TopicAssignment, NO_LEADER};
use crate::config::ClusterSettings;
use crate::failover::lease::Millis;
use crate::group::offsets;
use crate::replica::leader::Leadership;
use crate::replica::Replica;

/// The partitions followed from one leader, each with the leader epoch it is followed at.
pub type FollowSet = BTreeMap<(String, i32), i32>;

/// A broker's link to its cluster.
pub struct ClusterLink {
    pub member: Member,
    pub settings: ClusterSettings,
    started: Instant,
    /// The partitions this broker follows, per leader (the fetchers, `crate::follower`, watch
    /// it).
    pub follow: watch::Sender<BTreeMap<BrokerId, FollowSet>>,
    /// The membership task (it revokes the lease when told to stop).
    member_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl ClusterLink {
    /// Milliseconds on this link's monotonic clock (the replication machines' time).
    pub fn now(&self) -> Millis {
        self.started.elapsed().as_millis() as u64
    }

    pub fn id(&self) -> BrokerId {
        self.member.id()
    }

    /// After the shutdown signal: wait (briefly) for the lease to be revoked.
    pub async fn left(&self) {
        let task = self.member_task.lock().expect("task lock").take();
        if let Some(t) = task {
            let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
        }
    }
}

/// Join the cluster, apply the first image, and keep applying the next ones until `shutdown`.
pub async fn join(
    broker: &Arc<Broker>,
    shutdown: watch::Receiver<bool>,
) -> Result<Arc<ClusterLink>, StoreError> {
    let settings = broker
        .config
        .cluster
        .clone()
        .expect("join is called for cluster brokers");
    let (host, port) = broker.config.advertised();
    let (member, task) = member::join(
        MemberConfig {
            id: broker.config.node_id,
            host,
            port,
            rack: None,
            etcd: settings.etcd.clone(),
            cluster: settings.name.clone(),
            session_ttl_s: settings.session_timeout.as_secs().max(1) as i64,
            rebalance: Some(Rebalance::default()),
            region_index: settings.region_index,
        },
        shutdown.clone(),
    )
    .await?;
    let link = Arc::new(ClusterLink {
        member,
        settings,
        started: Instant::now(),
        follow: watch::Sender::new(BTreeMap::new()),
        member_task: Mutex::new(Some(task)),
    });
    broker.set_cluster(link.clone());
    let first = link.member.image();
    tokio::task::block_in_place(|| apply(broker, &link, &Image::default(), &first));
    tokio::spawn(reconcile_loop(
        broker.clone(),
        link.clone(),
        first,
        shutdown.clone(),
    ));
    tokio::spawn(isr_loop(broker.clone(), link.clone(), shutdown));
    Ok(link)
}

async fn reconcile_loop(
    broker: Arc<Broker>,
    link: Arc<ClusterLink>,
    mut prev: Arc<Image>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut rx = link.member.subscribe();
    loop {
        tokio::select! {
            r = rx.changed() => {
                if r.is_err() {
                    return;
                }
            }
            _ = shutdown.changed() => return,
        }
        let img = rx.borrow_and_update().clone();
        tokio::task::block_in_place(|| apply(&broker, &link, &prev, &img));
        prev = img;
    }
}

/// The write gate of a partition given the region's gate for its topic, its part here and the
/// last epoch in its log (`-1`: none): only a leader (or a broker alone in its region) takes
/// client writes, stamped with its leader epoch in a cluster, and only while that epoch is at
/// least the region's epoch for the topic and the log's last (after a promotion the mirror's
/// log holds the old primary's leader epochs: [`isr_loop`] has the leader epoch raised first).
pub fn gate_of(region: Gate, replica: &Replica, log_epoch: i32) -> Gate {
    match replica {
        Replica::Solo => region,
        Replica::Leader(l) => Gate {
            epoch: l.leader_epoch(),
            writable: region.writable
                && l.leader_epoch() >= region.epoch
                && l.leader_epoch() >= log_epoch,
        },
        other => Gate {
            epoch: other.leader_epoch().unwrap_or(-1),
            writable: false,
        },
    }
}

/// Apply an image: topics created and deleted, every partition's part.
pub fn apply(broker: &Arc<Broker>, link: &ClusterLink, prev: &Image, img: &Image) {
    // The region's failover state first: the write gates below follow it.
    if let Some(f) = &img.failover {
        if prev.failover.as_ref() != Some(f) && broker.failover_state() != f.value {
            match broker.adopt_failover(f.value.clone()) {
                Ok(_) => info!(version = f.version, "took the cluster's failover state"),
                Err(e) => warn!(error = %e, "could not store the cluster's failover state"),
            }
        }
    }
    for name in prev.topics.keys() {
        if !img.topics.contains_key(name) && broker.topic(name).is_some() {
            match broker.delete_topic(name) {
                Ok(_) => info!(topic = %name, "deleted in the cluster: removed here"),
                Err(e) => warn!(topic = %name, error = %e, "could not remove a deleted topic"),
            }
        }
    }
    let mut follow = BTreeMap::<BrokerId, FollowSet>::new();
    for (name, t) in &img.topics {
        let t = &t.value;
        let topic = match broker.topic(name) {
            Some(local) if local.id == t.id => {
                // Partitions added in the cluster (CreatePartitions at any broker).
                if local.partition_count() < t.replicas.len() as i32 {
                    match broker.create_partitions(name, t.replicas.len() as i32, false) {
                        Ok(()) => {
                            info!(topic = %name, partitions = t.replicas.len(), "took the cluster's new partitions")
                        }
                        Err(e) => {
                            warn!(topic = %name, error = %e, "could not open the cluster's new partitions")
                        }
                    }
                }
                // Configs set in the cluster (AlterConfigs at any broker, or a mirror's primary).
                if local.configs() != t.configs {
                    match broker.alter_topic_configs(name, t.configs.clone(), false, true) {
                        Ok(_) => {
                            info!(topic = %name, configs = ?t.configs, "took the cluster's topic configs")
                        }
                        Err(e) => {
                            warn!(topic = %name, error = %e, "could not take the cluster's topic configs")
                        }
                    }
                }
                local
            }
            other => {
                if other.is_some() {
                    // The same name, another topic: the old one was deleted and recreated.
                    let _ = broker.delete_topic(name);
                }
                match broker.open_cluster_topic(t) {
                    Ok(topic) => topic,
                    Err(e) => {
                        warn!(topic = %name, error = %e, "could not open the cluster's topic here");
                        continue;
                    }
                }
            }
        };
        let region = broker.gate_for(name);
        for (p, replicas) in t.replicas.iter().enumerate() {
            let Some(part) = topic.partition(p as i32) else {
                continue;
            };
            let state = img.partitions.get(&(name.clone(), p as i32));
            let role = set_role(link, &part, region, replicas, state.map(|v| &v.value));
            if name == offsets::TOPIC && p == 0 {
                let min_insync = min_insync(link, &t.configs);
                broker.groups().on_role(&part, &role, min_insync);
            }
            if name == crate::txn::log::TOPIC && p == 0 {
                let min_insync = min_insync(link, &t.configs);
                broker.txns().on_role(&part, &role, min_insync);
            }
            if let Replica::Follower {
                leader,
                leader_epoch,
                ..
            } = role
            {
                follow
                    .entry(leader)
                    .or_default()
                    .insert((name.clone(), p as i32), leader_epoch);
            }
        }
    }
    // Topics here the cluster does not know (and never had in this process): kept, not served.
    for topic in broker.topics() {
        if topic.is_internal() || img.topics.contains_key(&topic.name) {
            continue;
        }
        for part in topic.partitions.read().expect("topic lock").iter() {
            let mut st = part.state.lock().expect("partition lock");
            if !matches!(st.replica, Replica::Absent { .. }) {
                warn!(topic = %topic.name, partition = part.index, "stray partition: not in the cluster's metadata; kept on disk, not served");
                st.replica = Replica::offline();
                st.gate = gate_of(st.gate, &st.replica, -1);
            }
        }
    }
    link.follow.send_if_modified(|old| {
        let changed = *old != follow;
        *old = follow;
        changed
    });
}

/// The epoch of the last batch in `log`, or -1.
pub fn last_epoch(log: &crate::log::PartitionLog) -> i32 {
    log.epochs().last().map_or(-1, |e| e.epoch)
}

/// `min.insync.replicas` of a topic with these configs: its own, else the cluster's.
pub fn min_insync(link: &ClusterLink, configs: &BTreeMap<String, String>) -> usize {
    configs
        .get("min.insync.replicas")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(link.settings.min_insync_replicas)
}

/// Give a partition its part from its state in the image; returns the part.
fn set_role(
    link: &ClusterLink,
    part: &Arc<Partition>,
    region: Gate,
    replicas: &[BrokerId],
    state: Option<&PartitionState>,
) -> Replica {
    let me = link.id();
    let now = link.now();
    let mut st = part.state.lock().expect("partition lock");
    let log_end = st.log.next_offset();
    let old_hw = st.high_watermark();
    let new = match state {
        None => Replica::offline(),
        Some(s) if !replicas.contains(&me) => Replica::Absent {
            leader: s.leader,
            leader_epoch: s.leader_epoch,
        },
        Some(s) if s.leader == me => {
            if let Replica::Leader(l) = &mut st.replica {
                if l.leader_epoch() == s.leader_epoch {
                    if l.on_state(&s.isr, s.partition_epoch, log_end).is_some() {
                        part.replicated.notify_waiters();
                    }
                    return st.replica.clone();
                }
            }
            if !s.isr.contains(&me) {
                warn!(topic = %part.topic, partition = part.index, isr = ?s.isr, "named leader outside its ISR: not leading");
                Replica::offline()
            } else {
                info!(topic = %part.topic, partition = part.index, leader_epoch = s.leader_epoch, isr = ?s.isr, log_end, "leading");
                // Followers kept no producer state: rebuild it from the log, as on open.
                let super::PartitionState { log, producers, .. } = &mut *st;
                match ProducerStates::rebuild(log) {
                    Ok(fresh) => *producers = fresh,
                    Err(e) => {
                        warn!(topic = %part.topic, partition = part.index, error = %e, "producer state not rebuilt")
                    }
                }
                Replica::Leader(Leadership::new(
                    me,
                    s.leader_epoch,
                    s.partition_epoch,
                    replicas,
                    &s.isr,
                    log_end,
                    old_hw,
                    link.settings.replica_lag_max.as_millis() as u64,
                    now,
                ))
            }
        }
        Some(s) if s.leader == NO_LEADER => Replica::Absent {
            leader: NO_LEADER,
            leader_epoch: s.leader_epoch,
        },
        Some(s) => match &st.replica {
            Replica::Follower {
                leader,
                leader_epoch,
                high_watermark,
            } if *leader == s.leader && *leader_epoch == s.leader_epoch => Replica::Follower {
                leader: *leader,
                leader_epoch: *leader_epoch,
                high_watermark: *high_watermark,
            },
            _ => {
                info!(topic = %part.topic, partition = part.index, leader = s.leader, leader_epoch = s.leader_epoch, "following");
                Replica::Follower {
                    leader: s.leader,
                    leader_epoch: s.leader_epoch,
                    high_watermark: old_hw.min(log_end),
                }
            }
        },
    };
    st.replica = new.clone();
    st.gate = gate_of(region, &st.replica, last_epoch(&st.log));
    drop(st);
    // Produces waiting on the old part learn it ended.
    part.replicated.notify_waiters();
    new
}

/// As a leader, propose ISR changes when due (a follower lagging past `replica.lag.time.max`,
/// or one that caught up).
async fn isr_loop(
    broker: Arc<Broker>,
    link: Arc<ClusterLink>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = link.now();
        let mut proposals = Vec::new();
        let mut bumps = Vec::new();
        for topic in broker.topics() {
            let region = broker.gate_for(&topic.name);
            for part in topic.partitions.read().expect("topic lock").iter() {
                let mut st = part.state.lock().expect("partition lock");
                let log_epoch = last_epoch(&st.log);
                if let Replica::Leader(l) = &mut st.replica {
                    if let Some(p) = l.isr_change(now) {
                        proposals.push((part.clone(), l.leader_epoch(), p));
                    }
                    // This region may write here, but not at this leader epoch (it is below
                    // the region's epoch or the log's last: a promotion): raise it.
                    let e = l.leader_epoch();
                    if region.writable && (e < region.epoch || e < log_epoch) {
                        bumps.push((part.clone(), e, e.max(region.epoch).max(log_epoch)));
                    }
                }
            }
        }
        for (part, epoch, above) in bumps {
            raise_leader_epoch(&link, &part, epoch, above).await;
        }
        if proposals.is_empty() {
            continue;
        }
        let img = link.member.image();
        let alive: BTreeSet<BrokerId> = img.brokers.keys().copied().collect();
        for (part, epoch, p) in proposals {
            let key = (part.topic.to_string(), part.index);
            let written = match (img.partitions.get(&key), img.replicas(&key.0, key.1)) {
                (Some(v), Some(replicas)) => {
                    match alter_isr(
                        replicas,
                        &v.value,
                        link.id(),
                        epoch,
                        p.partition_epoch,
                        &p.isr,
                        &alive,
                    ) {
                        Ok(new) => match link
                            .member
                            .store()
                            .swap_partition(&key.0, key.1, v.version, &new)
                            .await
                        {
                            Ok(Outcome::Written(_)) => {
                                info!(topic = %key.0, partition = key.1, isr = ?new.isr, "ISR changed");
                                true
                            }
                            Ok(Outcome::Stale) => false,
                            Err(e) => {
                                debug!(error = %e, "ISR change not written");
                                false
                            }
                        },
                        Err(e) => {
                            debug!(topic = %key.0, partition = key.1, error = %e, "ISR change refused");
                            false
                        }
                    }
                }
                _ => false,
            };
            if !written {
                let mut st = part.state.lock().expect("partition lock");
                if let Replica::Leader(l) = &mut st.replica {
                    l.on_proposal_failed();
                }
            }
        }
    }
}

/// As the leader of `part` at `epoch`, take a new leader epoch (this region's form, above
/// `above`) by compare-and-swap; the watch then makes this broker lead at it.
async fn raise_leader_epoch(link: &ClusterLink, part: &Partition, epoch: i32, above: i32) {
    let img = link.member.image();
    let key = (part.topic.to_string(), part.index);
    let Some(v) = img.partitions.get(&key) else {
        return;
    };
    if v.value.leader != link.id() || v.value.leader_epoch != epoch {
        return;
    }
    let mut new = v.value.clone();
    new.leader_epoch =
        crate::cluster::controller::next_leader_epoch(above, link.settings.region_index);
    new.partition_epoch += 1;
    match link
        .member
        .store()
        .swap_partition(&key.0, key.1, v.version, &new)
        .await
    {
        Ok(Outcome::Written(_)) => {
            info!(topic = %key.0, partition = key.1, from = epoch, to = new.leader_epoch, "raised the leader epoch above the log's and the region's (this region took writes)")
        }
        Ok(Outcome::Stale) => {}
        Err(e) => debug!(error = %e, "leader epoch not raised"),
    }
}

/// Move a topic rule to `new` in the region's failover state, which in a cluster lives in etcd:
/// a compare-and-swap of [`crate::failover::RegionState::apply`] on what etcd holds (or, before
/// the first write, what this broker holds), then taken here at once; the other brokers take
/// it from their watch. Returns whether anything changed.
pub async fn apply_rule(
    broker: &Arc<Broker>,
    link: &ClusterLink,
    pattern: &str,
    new: crate::failover::RuleState,
) -> Result<bool, String> {
    let Some(t) = broker.config.topology.clone() else {
        return Err("this broker runs without a topology".into());
    };
    let mut rx = link.member.subscribe();
    for _ in 0..20 {
        let img = rx.borrow_and_update().clone();
        let (base, version) = match &img.failover {
            Some(v) => (v.value.clone(), Some(v.version)),
            None => (broker.failover_state(), None),
        };
        let mut next = base;
        let changed = next
            .apply(&t, pattern, new.clone())
            .map_err(|e| e.to_string())?;
        if !changed && version.is_some() {
            broker.adopt_failover(next)?;
            return Ok(false);
        }
        match link.member.store().swap_failover(version, &next).await {
            Ok(Outcome::Written(_)) => {
                broker.adopt_failover(next)?;
                info!(%pattern, "failover state changed in the cluster");
                return Ok(changed);
            }
            // Another broker wrote first: decide again on what it wrote.
            Ok(Outcome::Stale) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
            }
            Err(e) => return Err(format!("the cluster's metadata store: {e}")),
        }
    }
    Err("the failover state kept changing under this change: try again".into())
}

/// A topic to create in the cluster.
#[derive(Debug, Clone, Default)]
pub struct NewTopic {
    pub name: String,
    /// `None` or -1: the broker default.
    pub partitions: Option<i32>,
    /// `None` or -1: the cluster default.
    pub replication_factor: Option<i32>,
    /// Replica sets per partition (Kafka's CreateTopics `assignments`); empty: placed here.
    pub assignments: Vec<Vec<BrokerId>>,
    pub configs: BTreeMap<String, String>,
    pub validate_only: bool,
}

/// Create a topic in the cluster (CreateTopics, auto-creation): replicas placed round robin over
/// the live brokers (or as `assignments` say), written to etcd with every partition's initial
/// state; returns once this broker has applied it.
pub async fn create_topic(
    broker: &Arc<Broker>,
    link: &ClusterLink,
    new: NewTopic,
) -> Result<TopicAssignment, TopicError> {
    let NewTopic {
        name,
        partitions,
        replication_factor,
        assignments,
        configs,
        validate_only,
    } = new;
    let name = name.as_str();
    validate_topic_name(name)?;
    broker.topic_log_config(&configs)?;
    let img = link.member.image();
    if img.topics.contains_key(name) {
        return Err(TopicError::AlreadyExists(name.to_string()));
    }
    let brokers: Vec<BrokerId> = img.brokers.keys().copied().collect();
    let replicas = if !assignments.is_empty() {
        assignment::check_explicit(&assignments, &brokers.iter().copied().collect())?;
        assignments
    } else {
        let n = partitions
            .filter(|n| *n != -1)
            .unwrap_or(broker.config.default_partitions);
        if !(1..=100_000).contains(&n) {
            return Err(TopicError::InvalidPartitions(format!(
                "{n}: must be between 1 and 100000"
            )));
        }
        let rf = replication_factor
            .filter(|r| *r != -1)
            .unwrap_or(link.settings.default_replication_factor);
        // Leaders of successive topics start on different brokers.
        let start = img.topics.len();
        assignment::round_robin(0, n, rf, &brokers, start, start)?
    };
    let t = TopicAssignment {
        name: name.to_string(),
        id: Uuid::new_v4(),
        replicas,
        configs,
    };
    if validate_only {
        return Ok(t);
    }
    match link.member.store().create_topic(&t).await {
        Ok(Outcome::Written(_)) => {}
        Ok(Outcome::Stale) => return Err(TopicError::AlreadyExists(name.to_string())),
        Err(e) => return Err(TopicError::Cluster(e.to_string())),
    }
    info!(topic = name, partitions = t.replicas.len(), replicas = ?t.replicas, "created topic in the cluster");
    wait_applied(broker, link, |b| {
        b.topic(name).is_some_and(|l| l.id == t.id)
    })
    .await;
    Ok(t)
}

/// Grow a topic to `count` partitions in the cluster (CreatePartitions; or a mirror topic
/// following its primary): the new partitions' replica sets as `assignments` say (one per new
/// partition, the topic's replication factor) or round robin over the live brokers, written in
/// one compare-and-swap with their initial states; returns once this broker has opened them.
pub async fn create_partitions(
    broker: &Arc<Broker>,
    link: &ClusterLink,
    name: &str,
    count: i32,
    assignments: Vec<Vec<BrokerId>>,
    validate_only: bool,
) -> Result<(), TopicError> {
    for _ in 0..20 {
        let img = link.member.image();
        let Some(t) = img.topics.get(name) else {
            return Err(TopicError::Unknown(name.to_string()));
        };
        let have = t.value.replicas.len();
        if count as i64 <= have as i64 {
            return Err(TopicError::InvalidPartitions(format!(
                "topic '{name}' has {have} partitions; the new count {count} must be larger"
            )));
        }
        if count > 100_000 {
            return Err(TopicError::InvalidPartitions(format!(
                "{count}: at most 100000"
            )));
        }
        let factor = t.value.replicas.first().map_or(1, |r| r.len()) as i32;
        let brokers: Vec<BrokerId> = img.brokers.keys().copied().collect();
        let added = count - have as i32;
        let new_sets = if assignments.is_empty() {
            let start = img.topics.keys().position(|n| n == name).unwrap_or(0);
            assignment::round_robin(have as i32, added, factor, &brokers, start, start)?
        } else {
            if assignments.len() != added as usize {
                return Err(TopicError::InvalidPartitions(format!(
                    "{} replica assignments for {added} new partitions",
                    assignments.len()
                )));
            }
            assignment::check_explicit(&assignments, &brokers.iter().copied().collect())?;
            if assignments[0].len() != factor as usize {
                return Err(assignment::AssignError::Assignment(format!(
                    "the new partitions have {} replicas, the topic's have {factor}",
                    assignments[0].len()
                ))
                .into());
            }
            assignments.clone()
        };
        if validate_only {
            return Ok(());
        }
        let mut grown = t.value.clone();
        grown.replicas.extend(new_sets);
        match link
            .member
            .store()
            .add_partitions(t.version, have, &grown)
            .await
        {
            Ok(Outcome::Written(_)) => {
                info!(topic = name, from = have, to = count, replicas = ?&grown.replicas[have..], "added partitions in the cluster");
                wait_applied(broker, link, |b| {
                    b.topic(name)
                        .is_some_and(|l| l.id == grown.id && l.partition_count() >= count)
                })
                .await;
                return Ok(());
            }
            Ok(Outcome::Stale) => {
                let mut rx = link.member.subscribe();
                let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
            }
            Err(e) => return Err(TopicError::Cluster(e.to_string())),
        }
    }
    Err(TopicError::Cluster(format!(
        "topic '{name}' kept changing while partitions were added: try again"
    )))
}

/// Set a topic's config overrides in the cluster (AlterConfigs; or, `from_primary`, a mirror
/// topic following its primary): checked as alone in a region (a client may not change a
/// mirror topic's; the values must be valid), then a compare-and-swap of the topic's record in
/// etcd; returns once this broker took them (every broker takes them from its watch,
/// [`apply`]).
pub async fn alter_topic_configs(
    broker: &Arc<Broker>,
    link: &ClusterLink,
    name: &str,
    configs: BTreeMap<String, String>,
    validate_only: bool,
    from_primary: bool,
) -> Result<bool, TopicError> {
    // The local checks, without changing anything.
    broker.alter_topic_configs(name, configs.clone(), true, from_primary)?;
    if validate_only {
        return Ok(false);
    }
    for _ in 0..20 {
        let img = link.member.image();
        let Some(t) = img.topics.get(name) else {
            return Err(TopicError::Unknown(name.to_string()));
        };
        if t.value.configs == configs {
            return Ok(false);
        }
        let mut new = t.value.clone();
        new.configs = configs.clone();
        match link.member.store().swap_topic(t.version, &new).await {
            Ok(Outcome::Written(_)) => {
                info!(topic = name, configs = ?configs, "topic configs changed in the cluster");
                wait_applied(broker, link, |b| {
                    b.topic(name).is_some_and(|l| l.configs() == configs)
                })
                .await;
                return Ok(true);
            }
            Ok(Outcome::Stale) => {
                let mut rx = link.member.subscribe();
                let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
            }
            Err(e) => return Err(TopicError::Cluster(e.to_string())),
        }
    }
    Err(TopicError::Cluster(format!(
        "topic '{name}' kept changing while its configs were set: try again"
    )))
}

/// Delete a topic in the cluster; returns once this broker has applied it.
pub async fn delete_topic(
    broker: &Arc<Broker>,
    link: &ClusterLink,
    name: &str,
) -> Result<Uuid, TopicError> {
    let img = link.member.image();
    let Some(t) = img.topics.get(name) else {
        return Err(TopicError::Unknown(name.to_string()));
    };
    match link.member.store().delete_topic(t).await {
        Ok(Outcome::Written(_)) => {}
        Ok(Outcome::Stale) => {
            return Err(TopicError::Cluster(format!(
                "topic '{name}' changed while being deleted: try again"
            )))
        }
        Err(e) => return Err(TopicError::Cluster(e.to_string())),
    }
    let id = t.value.id;
    wait_applied(broker, link, |b| b.topic(name).is_none_or(|l| l.id != id)).await;
    Ok(id)
}

/// Wait (a bounded while) until `done` holds for this broker after an etcd write.
async fn wait_applied(broker: &Arc<Broker>, link: &ClusterLink, done: impl Fn(&Broker) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut rx = link.member.subscribe();
    while !done(broker) && Instant::now() < deadline {
        let _ = tokio::time::timeout(Duration::from_millis(50), rx.changed()).await;
    }
}
