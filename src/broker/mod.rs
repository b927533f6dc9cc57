//! The broker: topics, partitions, producer ids, and the path from a validated batch to disk.
//!
//! Owns: the topic registry and its durable metadata (`<data dir>/.ferry/topics/<name>.toml`),
//! opening every partition log on start (recovery), topic creation, deletion and growth, producer
//! id allocation, retention scheduling, and the group commit [`writer`]. Does not own: the Kafka
//! wire format ([`crate::kafka`]) or the bytes layout of a partition ([`crate::log`]).

pub mod cleaner;
pub mod cluster;
pub mod groups;
pub mod markers;
pub mod producer;
pub mod quarantine;
pub mod replay;
pub mod topic_config;
pub mod txns;
pub mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::config::BrokerConfig;
use crate::failover::{self, Placement, RegionState, RuleState};
use crate::log::{LogConfig, LogError, PartitionLog};
use crate::replica::Replica;
use producer::ProducerStates;
use writer::Writer;

/// Mutable state of one partition, under one lock held only briefly (never across an await).
#[derive(Debug)]
pub struct PartitionState {
    pub log: PartitionLog,
    pub producers: ProducerStates,
    /// Whether clients may write here, and at which region epoch. Checked by the writer under
    /// this lock, so a fence takes effect between two appends, never in the middle of one.
    pub gate: Gate,
    /// Its part in the region's cluster (leader, follower, ...), and so its high watermark.
    pub replica: Replica,
}

impl PartitionState {
    /// What consumers may read up to.
    pub fn high_watermark(&self) -> i64 {
        self.replica.high_watermark(self.log.next_offset())
    }
}

/// The write gate of a partition (see [`crate::failover`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gate {
    /// The region epoch stamped into every batch clients write here.
    pub epoch: i32,
    /// This region is the topic's primary and is not fenced.
    pub writable: bool,
}

/// One partition of a topic.
#[derive(Debug)]
pub struct Partition {
    pub topic: Arc<str>,
    pub index: i32,
    pub state: Mutex<PartitionState>,
    /// For topics mirrored synchronously: how far each mirror region has acknowledged (on
    /// disk), as reported by this region's gateway; produces with `acks=all` wait on it.
    pub mirror_acks: Mutex<BTreeMap<String, i64>>,
    /// Notified whenever a mirror acknowledgement moves.
    pub mirror_acked: Notify,
    /// Notified whenever the high watermark moves (`acks=all` produces in a cluster wait on it).
    pub replicated: Notify,
}

/// Why records written at a leader were not (yet) in every in-sync replica.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReplicated {
    #[error("written, but the ISR shrank to {0:?}, below min.insync.replicas")]
    BelowMinIsr(Vec<crate::cluster::metadata::BrokerId>),
    #[error("the leadership moved before every in-sync replica had the records")]
    LeadershipMoved,
    #[error("not yet in every in-sync replica")]
    TimedOut,
}

impl Partition {
    /// Wait until the high watermark passes `end` while this broker still leads the partition
    /// at `epoch` (and its ISR still has `min_isr` members), or `timeout`.
    pub async fn wait_replicated(
        &self,
        epoch: i32,
        min_isr: usize,
        end: i64,
        timeout: std::time::Duration,
    ) -> Result<(), NotReplicated> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.replicated.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.state.lock().expect("partition lock");
                match &st.replica {
                    Replica::Leader(l) if l.leader_epoch() == epoch => {
                        if l.high_watermark() >= end {
                            if l.isr().len() < min_isr {
                                return Err(NotReplicated::BelowMinIsr(l.isr().to_vec()));
                            }
                            return Ok(());
                        }
                    }
                    _ => return Err(NotReplicated::LeadershipMoved),
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(NotReplicated::TimedOut);
            }
        }
    }

    /// Record that `region` holds this partition below `offset`. Acknowledgements only grow.
    pub fn mirror_ack(&self, region: &str, offset: i64) {
        let mut acks = self.mirror_acks.lock().expect("mirror acks lock");
        let e = acks.entry(region.to_string()).or_insert(-1);
        if offset > *e {
            *e = offset;
        }
        drop(acks);
        self.mirror_acked.notify_waiters();
    }

    /// Whether every region in `regions` has acknowledged up to `offset` (exclusive end).
    pub fn mirrors_have(&self, regions: &[String], offset: i64) -> bool {
        let acks = self.mirror_acks.lock().expect("mirror acks lock");
        regions
            .iter()
            .all(|r| acks.get(r).copied().unwrap_or(-1) >= offset)
    }

    /// Whether the topic is compacted (`cleanup.policy` has `compact`).
    pub fn is_compacted(&self) -> bool {
        let st = self.state.lock().expect("partition lock");
        st.log.config().compact.is_some()
    }

    /// (log start offset, log end offset).
    pub fn offsets(&self) -> (i64, i64) {
        let st = self.state.lock().expect("partition lock");
        (st.log.start_offset(), st.log.next_offset())
    }
}

/// A topic: its id, settings and partitions.
#[derive(Debug)]
pub struct Topic {
    pub name: String,
    pub id: Uuid,
    /// Its config overrides (AlterConfigs changes them; a mirror's follow its primary's).
    pub configs: RwLock<BTreeMap<String, String>>,
    pub partitions: RwLock<Vec<Arc<Partition>>>,
}

impl Topic {
    /// Its config overrides now.
    pub fn configs(&self) -> BTreeMap<String, String> {
        self.configs.read().expect("topic configs lock").clone()
    }

    pub fn partition(&self, index: i32) -> Option<Arc<Partition>> {
        if index < 0 {
            return None;
        }
        self.partitions
            .read()
            .expect("topic lock")
            .get(index as usize)
            .cloned()
    }

    pub fn partition_count(&self) -> i32 {
        self.partitions.read().expect("topic lock").len() as i32
    }

    pub fn is_internal(&self) -> bool {
        self.name.starts_with("__")
    }
}

/// What is stored per topic in `.ferry/topics/<name>.toml`.
#[derive(Debug, Serialize, Deserialize)]
struct TopicMeta {
    id: String,
    partitions: i32,
    #[serde(default)]
    configs: BTreeMap<String, String>,
}

/// Errors of topic administration, each with its Kafka error code.
#[derive(Debug, Error)]
pub enum TopicError {
    #[error("topic '{0}' already exists")]
    AlreadyExists(String),
    #[error("topic '{0}' does not exist")]
    Unknown(String),
    #[error("invalid topic name '{0}': {1}")]
    InvalidName(String, &'static str),
    #[error("invalid partition count {0}")]
    InvalidPartitions(String),
    #[error("replication factor {0} is not supported: this broker keeps one replica per region")]
    InvalidReplicationFactor(i16),
    #[error("invalid config {0}: {1}")]
    InvalidConfig(String, String),
    #[error("topic '{0}' is a mirror of its primary region {1}: change its configuration there")]
    Mirror(String, String),
    #[error(transparent)]
    Assignment(#[from] crate::cluster::assignment::AssignError),
    #[error("the cluster's metadata store: {0}")]
    Cluster(String),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl TopicError {
    pub fn kafka_code(&self) -> i16 {
        match self {
            TopicError::AlreadyExists(_) => 36,
            TopicError::Unknown(_) => 3,
            TopicError::InvalidName(..) => 17,
            TopicError::InvalidPartitions(_) => 37,
            TopicError::InvalidReplicationFactor(_) => 38,
            TopicError::InvalidConfig(..) => 40,
            TopicError::Mirror(..) => 44,
            TopicError::Assignment(e) => e.kafka_code(),
            TopicError::Cluster(_) => 7, // REQUEST_TIMED_OUT: retriable
            TopicError::Log(_) | TopicError::Io { .. } => 56,
        }
    }
}

/// Whether this broker's region is under lease fencing.
fn lease_fenced(config: &BrokerConfig) -> bool {
    let (Some(t), Some(region)) = (config.topology.as_ref(), config.region.as_deref()) else {
        return false;
    };
    lease_fenced_in(t, region)
}

/// Whether `region` of `t` is under lease fencing: a topology of several regions with
/// `fencing = "lease"`, and a gateway in the region to renew the lease. Its brokers' write
/// lease is then armed from their first start, so a primary takes no writes until its gateway
/// renewed the lease (simulator finding 7); the simulator arms its regions by this rule.
pub fn lease_fenced_in(t: &crate::topology::Topology, region: &str) -> bool {
    t.failover.fencing == crate::topology::Fencing::Lease
        && t.regions.len() > 1
        && t.regions
            .iter()
            .any(|r| r.name == region && r.gateway.is_some())
}

pub use topic_config::TOPIC_CONFIGS;

pub fn validate_topic_name(name: &str) -> Result<(), TopicError> {
    let bad = |why| Err(TopicError::InvalidName(name.to_string(), why));
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 249 {
        return bad("longer than 249 characters");
    }
    if name == "." || name == ".." {
        return bad("'.' and '..' are not allowed");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
    {
        return bad("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TopicError + '_ {
    move |source| TopicError::Io {
        path: path.to_path_buf(),
        source,
    }
}

use crate::durable::write_atomic;

/// Allocates producer ids that stay unique across restarts, reserving blocks on disk.
#[derive(Debug)]
struct ProducerIds {
    path: PathBuf,
    next: i64,
    reserved_until: i64,
}

const PRODUCER_ID_BLOCK: i64 = 1000;

/// Producer ids of the region at position `i` of the topology (file order) start at `i << 40`,
/// so regions never hand out the same id; without a topology they start at 0. In a region
/// cluster broker `b` of the region starts at `(i << 40) + (b << 30)`.
pub fn producer_id_base(config: &BrokerConfig) -> i64 {
    let region = match (&config.topology, &config.region) {
        (Some(t), Some(r)) => t
            .regions
            .iter()
            .position(|x| &x.name == r)
            .map_or(0, |i| (i as i64) << 40),
        _ => 0,
    };
    // In a region cluster every broker hands out ids (InitProducerId goes to any broker), and
    // a partition's leader keeps every producer's sequences: each broker takes its own 2^30
    // ids of the region's range (broker ids are below 1000, so 999 << 30 < 1 << 40).
    let broker = if config.cluster.is_some() {
        (config.node_id.rem_euclid(1000) as i64) << 30
    } else {
        0
    };
    region + broker
}

impl ProducerIds {
    /// `base`: the first id of this region's range. Mirrors keep the producer state of the
    /// batches they copy, so after a failover the new primary must never hand out an id the
    /// old one used: each region allocates from its own range (see [`producer_id_base`]).
    fn open(path: PathBuf, base: i64) -> std::io::Result<Self> {
        let next = match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().parse().unwrap_or(0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        }
        .max(base);
        Ok(ProducerIds {
            path,
            next,
            reserved_until: next,
        })
    }

    fn allocate(&mut self) -> std::io::Result<i64> {
        if self.next >= self.reserved_until {
            let until = self.next + PRODUCER_ID_BLOCK;
            write_atomic(&self.path, until.to_string().as_bytes())?;
            self.reserved_until = until;
        }
        let id = self.next;
        self.next += 1;
        Ok(id)
    }
}

/// The broker of one region.
pub struct Broker {
    pub config: BrokerConfig,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    writer: Writer,
    /// Notified after every append round: long-polling fetches wait on it.
    pub appended: Arc<Notify>,
    producer_ids: Mutex<ProducerIds>,
    meta_dir: PathBuf,
    /// The group coordinator and committed offsets (set once on open).
    groups: std::sync::OnceLock<Arc<groups::GroupService>>,
    /// The transaction coordinator (set once on open).
    txns: std::sync::OnceLock<Arc<txns::TxnService>>,
    /// Serialises topic creation and deletion.
    admin: Mutex<()>,
    /// Who is primary for each topic rule (see [`crate::failover`]), durable in
    /// `.ferry/failover.json`.
    failover: RwLock<RegionState>,
    /// The write lease the gateway renews under lease fencing: (armed, valid until).
    lease: Mutex<(bool, Option<std::time::Instant>)>,
    /// The region cluster this broker is part of (set once it joined).
    cluster: std::sync::OnceLock<Arc<cluster::ClusterLink>>,
    /// How this broker reaches the other brokers of its cluster as a client (set by the
    /// binary: the clients live above this module).
    peers: std::sync::OnceLock<Arc<dyn quarantine::RegionPeers>>,
}

impl Broker {
    /// Open the broker's data directory, recovering every partition.
    pub fn open(config: BrokerConfig) -> Result<Arc<Broker>, TopicError> {
        let meta_dir = config.data_dir.join(".ferry");
        let topics_dir = meta_dir.join("topics");
        std::fs::create_dir_all(&topics_dir).map_err(io_err(&topics_dir))?;
        let appended = Arc::new(Notify::new());
        let producer_ids =
            ProducerIds::open(meta_dir.join("producer-ids"), producer_id_base(&config))
                .map_err(io_err(&meta_dir))?;
        let failover =
            RegionState::load(&meta_dir.join("failover.json")).map_err(io_err(&meta_dir))?;
        // Under lease fencing a region's broker takes writes only while its gateway holds a
        // lease, from its very first start: otherwise a primary that crashed (or was cut off)
        // before its gateway's first renewal would take writes without one after its restart,
        // next to a region that replaced it (simulator finding 7).
        let lease_armed = meta_dir.join("lease-armed").exists() || lease_fenced(&config);
        let broker = Broker {
            failover: RwLock::new(failover),
            lease: Mutex::new((lease_armed, None)),
            writer: Writer::start(appended.clone()),
            appended,
            producer_ids: Mutex::new(producer_ids),
            topics: RwLock::new(BTreeMap::new()),
            meta_dir,
            groups: std::sync::OnceLock::new(),
            txns: std::sync::OnceLock::new(),
            admin: Mutex::new(()),
            cluster: std::sync::OnceLock::new(),
            peers: std::sync::OnceLock::new(),
            config,
        };
        let mut names: Vec<String> = Vec::new();
        for entry in std::fs::read_dir(&topics_dir).map_err(io_err(&topics_dir))? {
            let entry = entry.map_err(io_err(&topics_dir))?;
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(topic) = name.strip_suffix(".toml") {
                names.push(topic.to_string());
            }
        }
        names.sort();
        for name in names {
            let path = topics_dir.join(format!("{name}.toml"));
            let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
            let meta: TopicMeta = toml::from_str(&text).map_err(|e| TopicError::Io {
                path: path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
            })?;
            let id = Uuid::parse_str(&meta.id).unwrap_or_else(|_| Uuid::new_v4());
            let topic = broker.open_topic(&name, id, meta.partitions, meta.configs)?;
            broker
                .topics
                .write()
                .expect("topics lock")
                .insert(name, topic);
        }
        // The internal topic of committed offsets, replayed into the group coordinator.
        let offsets_topic = match broker.topic(crate::group::offsets::TOPIC) {
            Some(t) => t,
            None => broker.create_topic(
                crate::group::offsets::TOPIC,
                Some(1),
                None,
                BTreeMap::new(),
                false,
            )?,
        };
        let p = offsets_topic.partition(0).expect("partition 0");
        let service = groups::GroupService::open(
            p,
            broker.writer.clone(),
            crate::group::GroupConfig {
                initial_rebalance_delay_ms: broker.config.group_initial_rebalance_delay.as_millis()
                    as i64,
                ..Default::default()
            },
            // In a cluster the coordinator waits to lead the cluster's offsets partition.
            if broker.config.cluster.is_some() {
                groups::Serving::No
            } else {
                groups::Serving::Solo
            },
        );
        let _ = broker.groups.set(Arc::new(service));
        // The transaction states, replayed into the transaction coordinator (alone in a region;
        // see `txns` for clusters).
        let txn_log = if broker.config.cluster.is_some() {
            None
        } else {
            let t = match broker.topic(crate::txn::log::TOPIC) {
                Some(t) => t,
                None => broker.create_topic(
                    crate::txn::log::TOPIC,
                    Some(1),
                    None,
                    BTreeMap::new(),
                    false,
                )?,
            };
            t.partition(0)
        };
        let txns = txns::TxnService::open(txn_log, broker.writer.clone());
        let _ = broker.txns.set(Arc::new(txns));
        let broker = Arc::new(broker);
        broker.txns().attach(Arc::downgrade(&broker));
        Ok(broker)
    }

    /// The transaction coordinator.
    pub fn txns(&self) -> &Arc<txns::TxnService> {
        self.txns.get().expect("set on open")
    }

    /// The region cluster this broker is part of, once joined (`None` alone in a region).
    pub fn cluster(&self) -> Option<&Arc<cluster::ClusterLink>> {
        self.cluster.get()
    }

    fn set_cluster(&self, link: Arc<cluster::ClusterLink>) {
        let _ = self.cluster.set(link);
    }

    /// Give the broker its way to the other brokers of its cluster (see
    /// [`quarantine::RegionPeers`]).
    pub fn set_peers(&self, peers: Arc<dyn quarantine::RegionPeers>) {
        let _ = self.peers.set(peers);
    }

    pub fn peers(&self) -> Option<&Arc<dyn quarantine::RegionPeers>> {
        self.peers.get()
    }

    /// Open (or create) this broker's copy of a topic the cluster has.
    fn open_cluster_topic(
        &self,
        t: &crate::cluster::metadata::TopicAssignment,
    ) -> Result<Arc<Topic>, TopicError> {
        let _admin = self.admin.lock().expect("admin lock");
        if let Some(local) = self.topic(&t.name) {
            if local.id == t.id {
                return Ok(local);
            }
        }
        let n = t.replicas.len() as i32;
        for i in 0..n {
            let dir = self.config.data_dir.join(format!("{}-{i}", t.name));
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
            }
        }
        let topic = self.open_topic(&t.name, t.id, n, t.configs.clone())?;
        // Every partition starts unserved until its part is applied.
        for p in topic.partitions.read().expect("topic lock").iter() {
            let mut st = p.state.lock().expect("partition lock");
            st.replica = Replica::offline();
            st.gate = cluster::gate_of(st.gate, &st.replica, -1);
        }
        self.write_meta(&topic)?;
        self.topics
            .write()
            .expect("topics lock")
            .insert(t.name.clone(), topic.clone());
        tracing::info!(topic = %t.name, partitions = n, id = %t.id, "opened the cluster's topic here");
        Ok(topic)
    }

    /// The group coordinator.
    pub fn groups(&self) -> &Arc<groups::GroupService> {
        self.groups.get().expect("set on open")
    }

    pub(crate) fn topic_log_config(
        &self,
        configs: &BTreeMap<String, String>,
    ) -> Result<LogConfig, TopicError> {
        topic_config::log_config(&self.config.log, configs)
    }

    /// The log settings of topic `name` with these overrides (internal topics add their own).
    fn log_config_for(
        &self,
        name: &str,
        configs: &BTreeMap<String, String>,
    ) -> Result<LogConfig, TopicError> {
        Ok(topic_config::internal(
            name,
            self.topic_log_config(configs)?,
        ))
    }

    fn open_partition(
        &self,
        topic: &Arc<str>,
        index: i32,
        cfg: LogConfig,
    ) -> Result<Arc<Partition>, TopicError> {
        let dir = self.config.data_dir.join(format!("{topic}-{index}"));
        let (log, report) = PartitionLog::open(&dir, cfg)?;
        if report.truncated_bytes > 0 {
            tracing::warn!(
                topic = %topic,
                partition = index,
                truncated_bytes = report.truncated_bytes,
                reason = report.reason.as_deref().unwrap_or(""),
                "partition {topic}-{index} recovered: truncated {} bytes",
                report.truncated_bytes
            );
        }
        // Idempotent producer state: the last snapshot and the batches after it.
        let producers = ProducerStates::rebuild(&log)?;
        let gate = self.gate_for(topic);
        Ok(Arc::new(Partition {
            topic: topic.clone(),
            index,
            state: Mutex::new(PartitionState {
                log,
                producers,
                gate,
                replica: Replica::Solo,
            }),
            mirror_acks: Mutex::new(BTreeMap::new()),
            mirror_acked: Notify::new(),
            replicated: Notify::new(),
        }))
    }

    fn open_topic(
        &self,
        name: &str,
        id: Uuid,
        partitions: i32,
        configs: BTreeMap<String, String>,
    ) -> Result<Arc<Topic>, TopicError> {
        let cfg = self.log_config_for(name, &configs)?;
        let tname: Arc<str> = Arc::from(name);
        let mut parts = Vec::with_capacity(partitions as usize);
        for i in 0..partitions {
            parts.push(self.open_partition(&tname, i, cfg.clone())?);
        }
        Ok(Arc::new(Topic {
            name: name.to_string(),
            id,
            configs: RwLock::new(configs),
            partitions: RwLock::new(parts),
        }))
    }

    fn write_meta(&self, t: &Topic) -> Result<(), TopicError> {
        let meta = TopicMeta {
            id: t.id.to_string(),
            partitions: t.partition_count(),
            configs: t.configs(),
        };
        let path = self
            .meta_dir
            .join("topics")
            .join(format!("{}.toml", t.name));
        let text = toml::to_string(&meta).expect("serialisable");
        write_atomic(&path, text.as_bytes()).map_err(io_err(&path))
    }

    pub fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics.read().expect("topics lock").get(name).cloned()
    }

    pub fn topic_by_id(&self, id: Uuid) -> Option<Arc<Topic>> {
        self.topics
            .read()
            .expect("topics lock")
            .values()
            .find(|t| t.id == id)
            .cloned()
    }

    pub fn topics(&self) -> Vec<Arc<Topic>> {
        self.topics
            .read()
            .expect("topics lock")
            .values()
            .cloned()
            .collect()
    }

    pub fn partition(&self, topic: &str, index: i32) -> Option<Arc<Partition>> {
        self.topic(topic)?.partition(index)
    }

    /// Create a topic. `partitions` of `None` uses the broker default.
    pub fn create_topic(
        &self,
        name: &str,
        partitions: Option<i32>,
        replication_factor: Option<i16>,
        configs: BTreeMap<String, String>,
        validate_only: bool,
    ) -> Result<Arc<Topic>, TopicError> {
        validate_topic_name(name)?;
        let n = partitions.unwrap_or(self.config.default_partitions);
        if !(1..=100_000).contains(&n) {
            return Err(TopicError::InvalidPartitions(format!(
                "{n}: must be between 1 and 100000"
            )));
        }
        if let Some(rf) = replication_factor {
            if rf != 1 && rf != -1 {
                return Err(TopicError::InvalidReplicationFactor(rf));
            }
        }
        self.topic_log_config(&configs)?;
        let _admin = self.admin.lock().expect("admin lock");
        if self.topic(name).is_some() {
            return Err(TopicError::AlreadyExists(name.to_string()));
        }
        if validate_only {
            return Ok(Arc::new(Topic {
                name: name.to_string(),
                id: Uuid::nil(),
                configs: RwLock::new(configs),
                partitions: RwLock::new(Vec::new()),
            }));
        }
        // Partition directories left by an earlier topic of the same name are removed first.
        for i in 0..n {
            let dir = self.config.data_dir.join(format!("{name}-{i}"));
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
            }
        }
        let topic = self.open_topic(name, Uuid::new_v4(), n, configs)?;
        self.write_meta(&topic)?;
        self.topics
            .write()
            .expect("topics lock")
            .insert(name.to_string(), topic.clone());
        tracing::info!(topic = name, partitions = n, id = %topic.id, "created topic");
        Ok(topic)
    }

    /// The topic, created with defaults if auto-creation is on.
    pub fn get_or_auto_create(&self, name: &str) -> Result<Arc<Topic>, TopicError> {
        if let Some(t) = self.topic(name) {
            return Ok(t);
        }
        if !self.config.auto_create_topics {
            return Err(TopicError::Unknown(name.to_string()));
        }
        // A topology's topic rule sets partitions and retention of topics it matches.
        let (partitions, configs) = self.topic_defaults(name);
        match self.create_topic(name, partitions, None, configs, false) {
            Ok(t) => Ok(t),
            Err(TopicError::AlreadyExists(_)) => self
                .topic(name)
                .ok_or_else(|| TopicError::Unknown(name.to_string())),
            Err(e) => Err(e),
        }
    }

    /// Where `topic` lives now (`None` without a topology, or for topics no rule covers).
    pub fn placement(&self, topic: &str) -> Option<Placement> {
        let t = self.config.topology.as_ref()?;
        self.config.region.as_ref()?;
        failover::placement(t, &self.failover.read().expect("failover lock"), topic)
    }

    /// The failover state of every rule of the topology.
    pub fn failover_state(&self) -> RegionState {
        self.failover.read().expect("failover lock").clone()
    }

    /// The write gate a partition of `topic` gets.
    pub fn gate_for(&self, topic: &str) -> Gate {
        match (self.placement(topic), self.config.region.as_deref()) {
            (Some(p), Some(region)) => Gate {
                epoch: p.epoch,
                writable: p.primary == region && !p.fenced,
            },
            _ => Gate {
                epoch: 0,
                writable: true,
            },
        }
    }

    /// Move a topic rule to a new state (durably), then set the write gate of every partition
    /// it covers. Returns whether anything changed.
    pub fn apply_rule(&self, pattern: &str, new: RuleState) -> Result<bool, String> {
        let Some(t) = self.config.topology.as_ref() else {
            return Err("this broker runs without a topology".into());
        };
        let mut next = self.failover_state();
        let changed = next.apply(t, pattern, new).map_err(|e| e.to_string())?;
        self.adopt_failover(next)?;
        if changed {
            tracing::info!(%pattern, "failover state changed");
        }
        Ok(changed)
    }

    /// Take `next` as the region's failover state: stored durably (when it changed), then every
    /// partition's write gate set from it. In a region cluster `next` is what etcd holds, where
    /// every change is a compare-and-swap of [`RegionState::apply`] (so epochs never go back).
    pub fn adopt_failover(&self, next: RegionState) -> Result<bool, String> {
        let mut st = self.failover.write().expect("failover lock");
        let changed = *st != next;
        if changed {
            let path = self.meta_dir.join("failover.json");
            next.store(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            *st = next;
        }
        drop(st);
        for topic in self.topics() {
            let gate = self.gate_for(&topic.name);
            for p in topic.partitions.read().expect("topic lock").iter() {
                let mut st = p.state.lock().expect("partition lock");
                let log_epoch = cluster::last_epoch(&st.log);
                st.gate = cluster::gate_of(gate, &st.replica, log_epoch);
            }
        }
        Ok(changed)
    }

    /// Renew the write lease for `ms` from now (lease fencing). The first renewal arms the
    /// lease for good: from then on (restarts included) this region takes writes for the topics
    /// it is primary of only while a renewal is current.
    pub fn renew_lease(&self, ms: u64) -> std::io::Result<()> {
        let mut l = self.lease.lock().expect("lease lock");
        if !l.0 {
            let path = self.meta_dir.join("lease-armed");
            write_atomic(&path, b"armed by the gateway under lease fencing\n")?;
            l.0 = true;
        }
        l.1 = Some(std::time::Instant::now() + Duration::from_millis(ms));
        Ok(())
    }

    /// Whether the write lease (if armed) is current.
    pub fn lease_current(&self) -> bool {
        let l = self.lease.lock().expect("lease lock");
        !l.0 || l.1.is_some_and(|u| std::time::Instant::now() < u)
    }

    /// May a client produce to `topic` here? The epoch to stamp, or the Kafka error code and
    /// message to answer with.
    pub fn write_check(&self, topic: &str) -> Result<i32, (i16, String)> {
        let (Some(p), Some(region)) = (self.placement(topic), self.config.region.as_deref()) else {
            return Ok(0);
        };
        const NOT_LEADER: i16 = 6;
        if p.primary != region {
            if p.home == region {
                // Demoted by a failover: clients still bootstrapped here follow Metadata.
                return Err((
                    NOT_LEADER,
                    format!("region '{region}' is no longer the primary of '{topic}': '{}' is (epoch {})", p.primary, p.epoch),
                ));
            }
            return Err((
                44,
                format!(
                    "topic '{topic}' is a read-only mirror of its primary region '{}': produce there",
                    p.primary
                ),
            ));
        }
        if p.fenced {
            return Err((
                NOT_LEADER,
                format!("'{topic}' is fenced in '{region}' for a switchover"),
            ));
        }
        if !self.lease_current() {
            return Err((
                NOT_LEADER,
                format!("region '{region}' holds no write lease: its gateway has not heard from a majority of regions lately (cut off, or not started)"),
            ));
        }
        Ok(p.epoch)
    }

    /// The primary region of a topic this broker holds as a mirror (the topology's rule names
    /// another region as primary), or `None` when clients may produce to it here.
    pub fn mirror_primary(&self, topic: &str) -> Option<String> {
        let region = self.config.region.as_deref()?;
        let p = self.placement(topic)?;
        (p.primary != region).then_some(p.primary)
    }

    /// The regions that must hold a batch of `topic` before an `acks=all` produce is answered:
    /// the mirrors of a topic whose rule says `mode = "sync"` and whose primary is this region.
    pub fn sync_mirrors(&self, topic: &str) -> Vec<String> {
        let Some(region) = self.config.region.as_deref() else {
            return Vec::new();
        };
        match self.placement(topic) {
            Some(p) if p.primary == region && p.mode == crate::topology::ReplicationMode::Sync => {
                p.mirrors
            }
            _ => Vec::new(),
        }
    }

    /// Partitions and configs for a new topic from the topology's rule for it, if any.
    pub fn topic_defaults(&self, name: &str) -> (Option<i32>, BTreeMap<String, String>) {
        let mut configs = BTreeMap::new();
        let Some(rule) = self
            .config
            .topology
            .as_ref()
            .and_then(|t| t.rule_for_topic(name))
        else {
            return (None, configs);
        };
        if let Some(r) = rule.retention {
            configs.insert("retention.ms".to_string(), r.as_millis().to_string());
        }
        (rule.partitions, configs)
    }

    pub fn delete_topic(&self, name: &str) -> Result<Uuid, TopicError> {
        let _admin = self.admin.lock().expect("admin lock");
        let topic = self
            .topics
            .write()
            .expect("topics lock")
            .remove(name)
            .ok_or_else(|| TopicError::Unknown(name.to_string()))?;
        let path = self.meta_dir.join("topics").join(format!("{name}.toml"));
        std::fs::remove_file(&path).map_err(io_err(&path))?;
        let _ = crate::durable::sync_dir(&self.meta_dir.join("topics"));
        for p in topic.partitions.read().expect("topic lock").iter() {
            let dir = p
                .state
                .lock()
                .expect("partition lock")
                .log
                .dir()
                .to_path_buf();
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove partition directory");
            }
        }
        tracing::info!(topic = name, "deleted topic");
        Ok(topic.id)
    }

    /// Grow a topic to `count` partitions.
    pub fn create_partitions(
        &self,
        name: &str,
        count: i32,
        validate_only: bool,
    ) -> Result<(), TopicError> {
        let _admin = self.admin.lock().expect("admin lock");
        let topic = self
            .topic(name)
            .ok_or_else(|| TopicError::Unknown(name.to_string()))?;
        let have = topic.partition_count();
        if count <= have {
            return Err(TopicError::InvalidPartitions(format!(
                "topic '{name}' has {have} partitions; the new count {count} must be larger"
            )));
        }
        if count > 100_000 {
            return Err(TopicError::InvalidPartitions(format!(
                "{count}: at most 100000"
            )));
        }
        if validate_only {
            return Ok(());
        }
        let cfg = self.log_config_for(name, &topic.configs())?;
        let tname: Arc<str> = Arc::from(name);
        let mut new = Vec::new();
        for i in have..count {
            new.push(self.open_partition(&tname, i, cfg.clone())?);
        }
        topic.partitions.write().expect("topic lock").extend(new);
        self.write_meta(&topic)?;
        tracing::info!(topic = name, from = have, to = count, "added partitions");
        Ok(())
    }

    /// Replace a topic's config overrides with `configs` (validated first; nothing changes if
    /// one is bad), apply them to every partition's log and store them. Returns whether they
    /// changed. A mirror topic's configs follow its primary's: only the gateway changes them
    /// (`from_primary`); a client asking gets [`TopicError::Mirror`].
    pub fn alter_topic_configs(
        &self,
        name: &str,
        configs: BTreeMap<String, String>,
        validate_only: bool,
        from_primary: bool,
    ) -> Result<bool, TopicError> {
        let topic = self
            .topic(name)
            .ok_or_else(|| TopicError::Unknown(name.to_string()))?;
        if !from_primary {
            if let (Some(p), Some(region)) = (self.placement(name), self.config.region.as_deref()) {
                if p.primary != region {
                    return Err(TopicError::Mirror(name.to_string(), p.primary));
                }
            }
        }
        let cfg = self.log_config_for(name, &configs)?;
        if validate_only {
            return Ok(false);
        }
        let _admin = self.admin.lock().expect("admin lock");
        if topic.configs() == configs {
            return Ok(false);
        }
        *topic.configs.write().expect("topic configs lock") = configs;
        for p in topic.partitions.read().expect("topic lock").iter() {
            p.state
                .lock()
                .expect("partition lock")
                .log
                .set_config(cfg.clone());
        }
        self.write_meta(&topic)?;
        tracing::info!(topic = name, ?cfg, "topic configs changed");
        Ok(true)
    }

    /// Effective configs of a topic: its overrides, then broker defaults.
    pub fn effective_topic_configs(&self, topic: &Topic) -> Vec<(String, String, bool)> {
        let c = self
            .log_config_for(&topic.name, &topic.configs())
            .unwrap_or_else(|_| self.config.log.clone());
        let min_insync = self
            .config
            .cluster
            .as_ref()
            .map_or(1, |c| c.min_insync_replicas);
        topic_config::effective(
            &c,
            self.config.batch_bytes_max,
            min_insync,
            &topic.configs(),
        )
    }

    /// Allocate a fresh producer id.
    pub fn allocate_producer_id(&self) -> std::io::Result<i64> {
        self.producer_ids
            .lock()
            .expect("producer id lock")
            .allocate()
    }

    pub fn writer(&self) -> &Writer {
        &self.writer
    }

    /// Run retention on every partition once.
    pub fn enforce_retention(&self) {
        let now = crate::clock::now_ms();
        for t in self.topics() {
            for p in t.partitions.read().expect("topic lock").iter() {
                let mut st = p.state.lock().expect("partition lock");
                if let Err(e) = st.log.enforce_retention(now) {
                    tracing::error!(topic = %t.name, partition = p.index, error = %e, "retention failed");
                }
            }
        }
    }

    /// fsync every partition (on shutdown).
    pub fn sync_all(&self) {
        for t in self.topics() {
            for p in t.partitions.read().expect("topic lock").iter() {
                if let Err(e) = p.state.lock().expect("partition lock").log.sync() {
                    tracing::error!(topic = %t.name, partition = p.index, error = %e, "sync failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_broker_of_every_clustered_region_hands_out_its_own_producer_ids() {
        let t = crate::topology::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("topology/clustered.toml"),
        )
        .expect("clustered.toml");
        let mut ranges = Vec::new();
        for r in &t.regions {
            for b in &r.brokers {
                let mut c = t
                    .broker_config(&r.name, b.id, Path::new("/data"))
                    .expect("a broker of the file");
                c.topology = Some(Arc::new(t.clone()));
                c.region = Some(r.name.clone());
                ranges.push(producer_id_base(&c));
            }
        }
        let mut sorted = ranges.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 6, "{ranges:?}");
        // Each range holds 2^30 ids and stays inside its region's 2^40.
        assert!(
            sorted.windows(2).all(|w| w[1] - w[0] >= 1 << 30),
            "{sorted:?}"
        );
        assert!(ranges[3..]
            .iter()
            .all(|b| (1i64 << 40..2 << 40).contains(b)));
    }

    fn topology(fencing: &str) -> crate::topology::Topology {
        let mut s = String::new();
        for (i, r) in ["east", "west"].iter().enumerate() {
            let base = 22_000 + 10 * i;
            s += &format!(
                "[regions.{r}]\n[[regions.{r}.brokers]]\nid = 1\nlisten = \"127.0.0.1:{base}\"\n"
            );
            s += &format!(
                "[regions.{r}.gateway]\nquic = \"127.0.0.1:{}\"\nadmin = \"127.0.0.1:{}\"\n",
                base + 1,
                base + 2
            );
        }
        // A region of its own, without a gateway and without rules.
        s += "[regions.south]\n[[regions.south.brokers]]\nid = 1\nlisten = \"127.0.0.1:22100\"\n";
        s += "[[topics]]\npattern = \"*\"\nprimary = \"east\"\nmirrors = [\"west\"]\n\n";
        s += &format!("[failover]\nfencing = \"{fencing}\"\n");
        crate::topology::parse(&s, "test", std::path::Path::new(".")).expect("valid")
    }

    /// Simulator finding 7: under lease fencing a primary's write lease is armed from the
    /// broker's first start, not from the gateway's first renewal.
    #[test]
    fn finding_7_lease_fencing_arms_the_lease_from_the_first_start() {
        assert!(lease_fenced_in(&topology("lease"), "east"));
        assert!(!lease_fenced_in(&topology("none"), "east"));
        // Without a gateway nothing would ever renew it.
        assert!(!lease_fenced_in(&topology("lease"), "south"));
    }
}
