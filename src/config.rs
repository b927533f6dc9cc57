//! Broker settings: defaults, an optional TOML file, and command-line flags on top.
//!
//! Owns the [`BrokerConfig`] type and its file format. Does not own the topology file (a later
//! `topology` module resolves a region's broker into a `BrokerConfig`).
//!
//! ```toml
//! # ferry broker --config broker.toml
//! listen = "127.0.0.1:9092"
//! advertised = "127.0.0.1:9092"   # what Metadata tells clients; defaults to listen
//! data_dir = "./data"
//! node_id = 1
//! segment_bytes = "1GiB"
//! segment_age = "7d"
//! retention_time = "7d"           # or "off"
//! retention_bytes = "off"         # or e.g. "10GiB"
//! default_partitions = 1
//! auto_create_topics = true
//! # connection bounds (see docs/security.md)
//! connections_max = 10000
//! connections_per_address_max = 1000
//! idle_timeout = "10m"
//! request_read_timeout = "30s"
//! request_memory_max = "256MiB"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

pub use crate::limits::ConnectionLimits;
use crate::log::LogConfig;
pub use crate::units::parse_host_port;
use crate::units::{parse_duration, parse_size};

/// Everything a broker process needs to run.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub listen: SocketAddr,
    /// Host and port clients are told to connect to (Metadata); defaults to `listen`.
    pub advertised: Option<(String, u16)>,
    pub data_dir: PathBuf,
    pub node_id: i32,
    pub cluster_id: String,
    pub log: LogConfig,
    pub default_partitions: i32,
    pub auto_create_topics: bool,
    /// Largest request frame accepted; larger ones close the connection unread.
    pub frame_bytes_max: usize,
    /// Largest record batch accepted in a produce.
    pub batch_bytes_max: usize,
    /// How often retention runs.
    pub retention_check_interval: Duration,
    /// How often the log cleaner looks for compacted partitions with work to do (Kafka's
    /// `log.cleaner.backoff.ms`, default 15 s).
    pub cleaner_interval: Duration,
    /// Memory for one compaction pass's offset map (Kafka's `log.cleaner.dedupe.buffer.size`);
    /// a partition with more keys is cleaned in several passes.
    pub cleaner_buffer_bytes: u64,
    /// How long the coordinator waits after the first member joins an empty group for others
    /// before the first rebalance (Kafka: `group.initial.rebalance.delay.ms`, default 3 s).
    pub group_initial_rebalance_delay: Duration,
    /// Queued requests per connection before the broker stops reading from it.
    pub inflight_requests_max: usize,
    /// Bounds on connections: caps, timeouts and the memory budget of requests being read.
    pub limits: ConnectionLimits,
    /// The door of Ferry's internal requests (mutual TLS on the Kafka port), when the broker
    /// has its region's certificate; without it those requests are served to no one.
    pub internal: Option<InternalDoor>,
    /// Serve Prometheus metrics here (`/metrics`), if set.
    pub metrics: Option<SocketAddr>,
    /// The topology this broker belongs to, if started from one: auto-created topics take
    /// their partitions and retention from its topic rules.
    pub topology: Option<std::sync::Arc<crate::topology::Topology>>,
    /// This broker's region in the topology.
    pub region: Option<String>,
    /// Membership in a region cluster (several brokers, metadata in etcd); `None` for a region
    /// of one broker.
    pub cluster: Option<ClusterSettings>,
}

/// How a broker takes part in its region's cluster (see docs/cluster.md).
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// etcd client URLs (`http://127.0.0.1:2379`, ...).
    pub etcd: Vec<String>,
    /// The cluster's name: its metadata lives under `/ferry/<name>/` in etcd.
    pub name: String,
    /// A broker silent this long is dead (its etcd lease ends; Kafka's
    /// `broker.session.timeout.ms`).
    pub session_timeout: Duration,
    /// A follower not caught up for this long leaves the ISR (Kafka's
    /// `replica.lag.time.max.ms`, 30 s there).
    pub replica_lag_max: Duration,
    /// Replicas of topics created without a replication factor (Kafka's
    /// `default.replication.factor`).
    pub default_replication_factor: i32,
    /// `min.insync.replicas` of topics that do not set it.
    pub min_insync_replicas: usize,
    /// The region's position in its topology (the low byte of its leader epochs).
    pub region_index: usize,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            etcd: Vec::new(),
            name: "ferry".into(),
            session_timeout: Duration::from_secs(6),
            replica_lag_max: Duration::from_secs(30),
            default_replication_factor: 3,
            min_insync_replicas: 1,
            region_index: 0,
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: "127.0.0.1:9092".parse().expect("valid"),
            advertised: None,
            data_dir: PathBuf::from("./data"),
            node_id: 1,
            cluster_id: "ferry-cluster".into(),
            log: LogConfig::default(),
            default_partitions: 1,
            auto_create_topics: true,
            frame_bytes_max: crate::limits::FRAME_BYTES_MAX_DEFAULT,
            batch_bytes_max: 8 << 20,
            retention_check_interval: Duration::from_secs(60),
            cleaner_interval: Duration::from_secs(15),
            cleaner_buffer_bytes: 32 << 20,
            group_initial_rebalance_delay: Duration::from_secs(1),
            inflight_requests_max: 64,
            limits: ConnectionLimits::default(),
            internal: None,
            metrics: None,
            topology: None,
            region: None,
            cluster: None,
        }
    }
}

/// The broker's door for Ferry's internal requests: the TLS server configuration (the region's
/// certificate, client certificates from the topology's CA required) and the region whose
/// gateway, with operators, it admits.
#[derive(Clone)]
pub struct InternalDoor {
    pub tls: std::sync::Arc<rustls::ServerConfig>,
    pub region: String,
    /// The same certificate as a client: a broker of a region cluster asks another's internal
    /// door (the group coordinator, to move commits back when a mirror's tail is cut).
    pub client: crate::transport::trust::TlsTarget,
}

impl std::fmt::Debug for InternalDoor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InternalDoor")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// The largest `frame_bytes_max`: a TLS handshake record starts with byte 0x16, which as the
/// first byte of a Kafka length prefix means at least 0x16000000 bytes, so with frames capped
/// below that the first byte of a connection tells TLS from Kafka without ambiguity.
pub const FRAME_BYTES_LIMIT: usize = 256 << 20;

impl BrokerConfig {
    /// Check settings that depend on each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let val = |field: &str, message: String| ConfigError::Value {
            field: field.into(),
            message,
        };
        if self.frame_bytes_max > FRAME_BYTES_LIMIT || self.frame_bytes_max < 1024 {
            return Err(val(
                "frame_bytes_max",
                format!(
                    "{} must be from 1 KiB to {FRAME_BYTES_LIMIT} (256 MiB)",
                    self.frame_bytes_max
                ),
            ));
        }
        if self.limits.request_memory_max < self.frame_bytes_max {
            return Err(val(
                "request_memory_max",
                format!(
                    "{} is below frame_bytes_max ({}): a largest request could never be read",
                    self.limits.request_memory_max, self.frame_bytes_max
                ),
            ));
        }
        for (field, n) in [
            ("connections_max", self.limits.connections_max),
            (
                "connections_per_address_max",
                self.limits.connections_per_address_max,
            ),
        ] {
            if n == 0 {
                return Err(val(field, "must be 1 or more".into()));
            }
        }
        if let Some(cs) = &self.cluster {
            if cs.etcd.is_empty() {
                return Err(val("etcd", "a cluster needs at least one etcd URL".into()));
            }
            if cs.default_replication_factor < 1 || cs.min_insync_replicas < 1 {
                return Err(val(
                    "replication_factor/min_insync_replicas",
                    "must be 1 or more".into(),
                ));
            }
            if self.node_id < 0 {
                return Err(val("node_id", "must be 0 or more in a cluster".into()));
            }
        }
        if self.limits.idle_timeout.is_zero() || self.limits.request_read_timeout.is_zero() {
            return Err(val(
                "idle_timeout/request_read_timeout",
                "must be longer than 0".into(),
            ));
        }
        Ok(())
    }

    /// Host and port advertised to clients.
    pub fn advertised(&self) -> (String, u16) {
        self.advertised
            .clone()
            .unwrap_or_else(|| (self.listen.ip().to_string(), self.listen.port()))
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{field}: {message}")]
    Value { field: String, message: String },
}

/// The file form: every field optional, human units as strings or numbers.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerFile {
    pub listen: Option<String>,
    pub advertised: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub node_id: Option<i32>,
    pub cluster_id: Option<String>,
    pub segment_bytes: Option<SizeOrNum>,
    pub segment_age: Option<DurOrNum>,
    pub retention_time: Option<DurOrNum>,
    pub retention_bytes: Option<SizeOrNum>,
    pub index_interval_bytes: Option<SizeOrNum>,
    pub default_partitions: Option<i32>,
    pub auto_create_topics: Option<bool>,
    pub frame_bytes_max: Option<SizeOrNum>,
    pub batch_bytes_max: Option<SizeOrNum>,
    pub retention_check_interval: Option<DurOrNum>,
    pub cleaner_interval: Option<DurOrNum>,
    pub cleaner_buffer_bytes: Option<SizeOrNum>,
    pub group_initial_rebalance_delay: Option<DurOrNum>,
    pub metrics: Option<String>,
    pub connections_max: Option<usize>,
    pub connections_per_address_max: Option<usize>,
    pub idle_timeout: Option<DurOrNum>,
    pub request_read_timeout: Option<DurOrNum>,
    pub request_memory_max: Option<SizeOrNum>,
}

/// A size written as a number of bytes or a string with a unit (or `off`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SizeOrNum {
    Num(u64),
    Text(String),
}

/// A duration written as milliseconds or a string with a unit (or `off`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum DurOrNum {
    Num(u64),
    Text(String),
}

impl SizeOrNum {
    /// `None` for `off`.
    pub fn get(&self, field: &str) -> Result<Option<u64>, ConfigError> {
        match self {
            SizeOrNum::Num(n) => Ok(Some(*n)),
            SizeOrNum::Text(t) if t == "off" || t == "none" => Ok(None),
            SizeOrNum::Text(t) => parse_size(t)
                .map(Some)
                .map_err(|message| ConfigError::Value {
                    field: field.into(),
                    message,
                }),
        }
    }
}

impl DurOrNum {
    /// `None` for `off`.
    pub fn get(&self, field: &str) -> Result<Option<Duration>, ConfigError> {
        match self {
            DurOrNum::Num(n) => Ok(Some(Duration::from_millis(*n))),
            DurOrNum::Text(t) if t == "off" || t == "none" => Ok(None),
            DurOrNum::Text(t) => {
                parse_duration(t)
                    .map(Some)
                    .map_err(|message| ConfigError::Value {
                        field: field.into(),
                        message,
                    })
            }
        }
    }
}

fn required<T>(v: Option<T>, field: &str) -> Result<T, ConfigError> {
    v.ok_or_else(|| ConfigError::Value {
        field: field.into(),
        message: "may not be `off`".into(),
    })
}

impl BrokerFile {
    pub fn load(path: &Path) -> Result<BrokerFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Apply the fields that are set on top of `c`.
    pub fn apply(&self, c: &mut BrokerConfig) -> Result<(), ConfigError> {
        let val = |field: &str, message: String| ConfigError::Value {
            field: field.into(),
            message,
        };
        if let Some(l) = &self.listen {
            c.listen = l
                .parse()
                .map_err(|e| val("listen", format!("`{l}`: {e}")))?;
        }
        if let Some(a) = &self.advertised {
            c.advertised = Some(parse_host_port(a).map_err(|m| val("advertised", m))?);
        }
        if let Some(d) = &self.data_dir {
            c.data_dir = d.clone();
        }
        if let Some(n) = self.node_id {
            c.node_id = n;
        }
        if let Some(id) = &self.cluster_id {
            c.cluster_id = id.clone();
        }
        if let Some(v) = &self.segment_bytes {
            c.log.segment_bytes = required(v.get("segment_bytes")?, "segment_bytes")?;
        }
        if let Some(v) = &self.segment_age {
            c.log.segment_age = required(v.get("segment_age")?, "segment_age")?;
        }
        if let Some(v) = &self.retention_time {
            c.log.retention_time = v.get("retention_time")?;
        }
        if let Some(v) = &self.retention_bytes {
            c.log.retention_bytes = v.get("retention_bytes")?;
        }
        if let Some(v) = &self.index_interval_bytes {
            c.log.index_interval_bytes =
                required(v.get("index_interval_bytes")?, "index_interval_bytes")?;
        }
        if let Some(n) = self.default_partitions {
            if n < 1 {
                return Err(val("default_partitions", format!("{n} must be 1 or more")));
            }
            c.default_partitions = n;
        }
        if let Some(b) = self.auto_create_topics {
            c.auto_create_topics = b;
        }
        if let Some(v) = &self.frame_bytes_max {
            c.frame_bytes_max = required(v.get("frame_bytes_max")?, "frame_bytes_max")? as usize;
        }
        if let Some(v) = &self.batch_bytes_max {
            c.batch_bytes_max = required(v.get("batch_bytes_max")?, "batch_bytes_max")? as usize;
        }
        if let Some(m) = &self.metrics {
            c.metrics = Some(
                m.parse()
                    .map_err(|e| val("metrics", format!("`{m}`: {e}")))?,
            );
        }
        if let Some(v) = &self.retention_check_interval {
            c.retention_check_interval = required(
                v.get("retention_check_interval")?,
                "retention_check_interval",
            )?;
        }
        if let Some(v) = &self.cleaner_interval {
            c.cleaner_interval = required(v.get("cleaner_interval")?, "cleaner_interval")?;
        }
        if let Some(v) = &self.cleaner_buffer_bytes {
            c.cleaner_buffer_bytes =
                required(v.get("cleaner_buffer_bytes")?, "cleaner_buffer_bytes")?;
            if c.cleaner_buffer_bytes < 64 << 10 {
                return Err(val(
                    "cleaner_buffer_bytes",
                    "must be at least 64 KiB".into(),
                ));
            }
        }
        if let Some(n) = self.connections_max {
            c.limits.connections_max = n;
        }
        if let Some(n) = self.connections_per_address_max {
            c.limits.connections_per_address_max = n;
        }
        if let Some(v) = &self.idle_timeout {
            c.limits.idle_timeout = required(v.get("idle_timeout")?, "idle_timeout")?;
        }
        if let Some(v) = &self.request_read_timeout {
            c.limits.request_read_timeout =
                required(v.get("request_read_timeout")?, "request_read_timeout")?;
        }
        if let Some(v) = &self.request_memory_max {
            c.limits.request_memory_max =
                required(v.get("request_memory_max")?, "request_memory_max")? as usize;
        }
        if let Some(v) = &self.group_initial_rebalance_delay {
            // 0 is allowed (no wait), so not `required`.
            c.group_initial_rebalance_delay = v
                .get("group_initial_rebalance_delay")?
                .unwrap_or(Duration::ZERO);
        }
        Ok(())
    }
}

/// Resolving a topology's broker into its settings (here rather than in `topology`, so that the
/// topology file's module does not depend on the broker's settings).
impl crate::topology::Topology {
    /// Settings for one broker: its listener, advertised address, node id and metrics address
    /// from the file, data in `<region dir>/broker-<id>`; every other setting keeps its
    /// [`BrokerConfig`] default.
    pub fn broker_config(
        &self,
        region: &str,
        broker_id: i32,
        data_root: &Path,
    ) -> Result<BrokerConfig, crate::topology::LookupError> {
        let r = self.region_or_err(region)?;
        let b = r
            .brokers
            .iter()
            .find(|b| b.id == broker_id)
            .ok_or_else(|| crate::topology::LookupError::NoBroker {
                file: self.file.display().to_string(),
                region: region.to_string(),
                id: broker_id,
                known: r
                    .brokers
                    .iter()
                    .map(|b| b.id.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let region_index = self
            .regions
            .iter()
            .position(|x| x.name == region)
            .unwrap_or(0);
        let cluster = r.cluster.as_ref().map(|c| ClusterSettings {
            etcd: c.etcd.endpoints(),
            name: region.to_string(),
            default_replication_factor: c.replication_factor,
            min_insync_replicas: c.min_insync_replicas,
            region_index,
            ..ClusterSettings::default()
        });
        Ok(BrokerConfig {
            cluster,
            listen: b.listen,
            advertised: Some(b.advertised.clone()),
            node_id: self.node_id(region, b.id),
            metrics: b.metrics,
            limits: self.limits.clone(),
            data_dir: self
                .region_dir(region, data_root)?
                .join(format!("broker-{}", b.id)),
            ..BrokerConfig::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_with_human_units_applies() {
        let f: BrokerFile = toml::from_str(
            r#"
            listen = "127.0.0.1:1234"
            segment_bytes = "64MiB"
            retention_time = "off"
            retention_bytes = 1000
            auto_create_topics = false
            group_initial_rebalance_delay = "0s"
            "#,
        )
        .unwrap();
        let mut c = BrokerConfig::default();
        assert_eq!(c.group_initial_rebalance_delay, Duration::from_secs(1));
        f.apply(&mut c).unwrap();
        assert_eq!(c.group_initial_rebalance_delay, Duration::ZERO);
        assert_eq!(c.listen.port(), 1234);
        assert_eq!(c.log.segment_bytes, 64 << 20);
        assert_eq!(c.log.retention_time, None);
        assert_eq!(c.log.retention_bytes, Some(1000));
        assert!(!c.auto_create_topics);
        assert_eq!(c.advertised(), ("127.0.0.1".to_string(), 1234));
    }

    #[test]
    fn unknown_field_is_an_error() {
        let e = toml::from_str::<BrokerFile>("segmentbytes = 5").unwrap_err();
        assert!(e.to_string().contains("segmentbytes"));
    }
}
