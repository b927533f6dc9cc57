//! Topology files: the regions, their brokers and gateways, which region is primary for each
//! topic and which regions mirror it, TLS material for the gateways, and the failover policy.
//!
//! Owns: the TOML format (reference: `docs/topology.md`), validation with errors of the form
//! `FILE:LINE:COLUMN: field: message (hint: ...)`, the resolved [`Topology`] that `ferry up`,
//! `ferry broker --topology`, and the gateway read, resolving one broker into a
//! [`BrokerConfig`], and the tables printed by `ferry topology show`. Does not own: running
//! processes, creating certificates, or mirroring itself.
//!
//! The file is read into toml's spanned document tree ([`toml::de::DeTable`], the tree toml's
//! serde deserializer consumes) and walked by hand rather than through `#[derive(Deserialize)]`:
//! derive stops at the first problem, while a topology check must report every unknown field,
//! bad value and conflict at once, each with its position and dotted field path.
//!
//! Invariants of a [`Topology`] returned by [`load`] or [`parse`], checked there:
//! - region names are unique, lowercase `[a-z][a-z0-9_-]*`, and so are their data directories;
//! - broker ids are unique within a region; a region of several brokers has an etcd, and its
//!   replication factor is at most its broker count; no two listeners (Kafka, metrics, QUIC,
//!   admin, etcd) share an address anywhere in the file (an unspecified IP such as `0.0.0.0`
//!   overlaps every IP);
//! - every `primary`, mirror and `witness` names a defined region; a mirror is never the primary;
//! - no topic rule is shadowed by an earlier one, so a topic name never gets two primaries;
//! - regions that send or receive mirrored topics have a gateway;
//! - when `[tls]` is present, every gateway region has a certificate and key and every named
//!   file exists (paths are relative to the topology file's directory);
//! - `heartbeat < lease`; automatic promotion requires lease fencing.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use toml::de::DeTable;

mod cluster;
mod failover;
mod limits;
mod reader;
mod regions;
mod render;
mod rules;
mod tls;
pub use cluster::{EtcdSpec, RegionCluster};
use reader::Cx;
use regions::read_topology;
pub use render::render_tables;

/// The embedded default topology (`topology/local.toml`): `east` and `west` on loopback.
pub const LOCAL_TOML: &str = include_str!("../../topology/local.toml");

// ---------------------------------------------------------------------------------------------
// Resolved types
// ---------------------------------------------------------------------------------------------

/// A validated topology file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// In file order.
    pub regions: Vec<Region>,
    /// In file order; the first rule matching a topic applies.
    pub topics: Vec<TopicRule>,
    pub failover: FailoverPolicy,
    pub tls: Option<Tls>,
    /// Bounds on connections (`[limits]`): every broker's Kafka port, every gateway's admin API
    /// and QUIC endpoint apply them.
    pub limits: crate::limits::ConnectionLimits,
    /// The file this was read from (for embedded or in-memory text: the name given to [`parse`]).
    pub file: PathBuf,
}

/// One region: a Kafka cluster of its own plus (optionally) a gateway to the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub name: String,
    /// At least one, ids unique within the region.
    pub brokers: Vec<BrokerSpec>,
    pub gateway: Option<GatewaySpec>,
    /// Set when the region's brokers form a cluster with their metadata in etcd (required for
    /// several brokers; see docs/cluster.md).
    pub cluster: Option<RegionCluster>,
    /// The region's directory under the data root; `None` means the region's name. An absolute
    /// path is used as is. See [`Topology::region_dir`].
    pub data_dir: Option<PathBuf>,
}

/// One broker process of a region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerSpec {
    /// Kafka node id, unique within the region.
    pub id: i32,
    /// Kafka listener.
    pub listen: SocketAddr,
    /// Host and port clients are told in Metadata (defaults to `listen`).
    pub advertised: (String, u16),
    /// Prometheus metrics over HTTP (`GET /metrics`).
    pub metrics: Option<SocketAddr>,
}

/// The region's mirroring gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewaySpec {
    /// QUIC (UDP) listener for the other regions' gateways.
    pub quic: SocketAddr,
    /// Host and port other gateways dial (defaults to `quic`).
    pub advertised: (String, u16),
    /// HTTP admin API (status, promotion).
    pub admin: SocketAddr,
    /// Prometheus metrics over HTTP (`GET /metrics`).
    pub metrics: Option<SocketAddr>,
}

/// Where topics matching `pattern` are written (primary) and copied to (mirrors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRule {
    /// An exact topic name, or a glob where `*` matches any run of characters.
    pub pattern: String,
    /// Partitions when the topic is created from this rule (`None`: the broker default).
    pub partitions: Option<i32>,
    /// The region that accepts writes.
    pub primary: String,
    /// Regions that receive a copy, in file order; never contains `primary`.
    pub mirrors: Vec<String>,
    pub mode: ReplicationMode,
    /// Time retention for the topic in every region (`None`: the broker default).
    pub retention: Option<Duration>,
    /// How batches travel between gateways.
    pub wire_compression: WireCompression,
    /// How many copies of every frame the primary's gateway sends to each mirror, each over a
    /// QUIC connection of its own (1 or 2). With 2 the mirror appends whichever copy arrives
    /// first, so a record is late only when both copies meet a loss: lower tail latency on a
    /// lossy link, for twice the bytes on it.
    pub wire_copies: u8,
    /// Forward error correction on the wire: besides its reliable stream, every frame of these
    /// topics also sends Reed-Solomon recovery shards in QUIC datagrams, this many percent of
    /// the frame's packet-sized shards (0: off; 1-100). The mirror rebuilds a frame from the
    /// stream's complete shards and the recovery shards without waiting for QUIC to resend a
    /// lost packet (see `mirror::fec`).
    pub wire_fec: u8,
}

/// Compression of record batches between gateways, on top of what the client chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireCompression {
    /// Batches travel as they are stored.
    #[default]
    None,
    /// Batches the client sent uncompressed travel Snappy-compressed (decompressed by the
    /// receiving gateway, so the mirror stores the source's bytes); compressed ones as they are.
    Snappy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationMode {
    /// The primary acknowledges produces on its own; mirrors catch up.
    Async,
    /// The primary acknowledges a produce once every mirror has it.
    Sync,
}

/// How a standby region may take over a primary's topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverPolicy {
    pub fencing: Fencing,
    /// How long a primary's lease lasts without renewal (default 10s).
    pub lease: Duration,
    /// How often leases are renewed and peers are probed (default 2s, less than `lease`).
    pub heartbeat: Duration,
    pub promotion: Promotion,
    /// A region consulted to break ties before an automatic promotion.
    pub witness: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fencing {
    /// A primary stops accepting writes when its lease runs out; a standby is promoted only
    /// after the old lease has expired.
    Lease,
    /// No fencing: promotion is trusted to the operator.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promotion {
    /// An operator promotes a standby (`ferry` admin command / gateway admin API).
    Manual,
    /// The gateway promotes a standby when the primary's lease expires.
    Automatic,
}

impl Default for FailoverPolicy {
    fn default() -> Self {
        FailoverPolicy {
            fencing: Fencing::Lease,
            lease: Duration::from_secs(10),
            heartbeat: Duration::from_secs(2),
            promotion: Promotion::Manual,
            witness: None,
        }
    }
}

/// Certificates for the gateways' mutual TLS. Paths are resolved against the topology file's
/// directory (absolute paths are kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// The CA that signs every region's certificate.
    pub ca: PathBuf,
    /// One entry per region that has one, in file order.
    pub regions: Vec<RegionTls>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionTls {
    pub region: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Tls {
    pub fn region(&self, name: &str) -> Option<&RegionTls> {
        self.regions.iter().find(|r| r.region == name)
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// One problem in a topology file, at a 1-based line and column (columns count characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Dotted path such as `regions.west.brokers[0].listen` or `topics[2].primary`; empty when
    /// the whole file is concerned (it could not be read).
    pub field: String,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for TopologyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

impl std::error::Error for TopologyError {}

/// Asking a valid topology for a region or broker it does not have.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum LookupError {
    #[error("{file}: no region `{region}` (regions: {known})")]
    NoRegion {
        file: String,
        region: String,
        known: String,
    },
    #[error("{file}: region `{region}` has no broker {id} (brokers: {known})")]
    NoBroker {
        file: String,
        region: String,
        id: i32,
        known: String,
    },
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

/// Read and validate a topology file; certificate paths are relative to its directory.
/// Returns every error found, sorted by position.
pub fn load(path: &Path) -> Result<Topology, Vec<TopologyError>> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![TopologyError {
            file: name.clone(),
            line: 1,
            column: 1,
            field: String::new(),
            message: format!("cannot read the topology file: {e}"),
            hint: None,
        }]
    })?;
    let base = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut t = parse(&text, &name, &base)?;
    t.file = path.to_path_buf();
    Ok(t)
}

/// Validate topology text. `file_name` is used in errors and as [`Topology::file`]; `base_dir`
/// resolves certificate paths (and is where they must exist).
pub fn parse(text: &str, file_name: &str, base_dir: &Path) -> Result<Topology, Vec<TopologyError>> {
    let mut cx = Cx::new(text, file_name);
    let (root, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        for e in syntax {
            cx.syntax_error(&e);
        }
        return Err(cx.finish());
    }
    let topology = read_topology(&mut cx, root.get_ref(), file_name, base_dir);
    if cx.errors.is_empty() {
        Ok(topology)
    } else {
        Err(cx.finish())
    }
}

impl Topology {
    /// The embedded default (`topology/local.toml`).
    pub fn local() -> Topology {
        parse(LOCAL_TOML, "topology/local.toml", Path::new("."))
            .expect("the embedded topology/local.toml is valid (checked by tests)")
    }

    pub fn region(&self, name: &str) -> Option<&Region> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// The first rule matching `topic`. Internal topics (`__consumer_offsets`, any `__` name)
    /// never match.
    pub fn rule_for_topic(&self, topic: &str) -> Option<&TopicRule> {
        if topic.starts_with("__") {
            return None;
        }
        self.topics.iter().find(|r| r.matches(topic))
    }

    /// `<data_root>/<data_dir or region name>`; an absolute `data_dir` is used as is. Brokers
    /// keep their logs in `broker-<id>` below it (the gateway may use `gateway`).
    pub fn region_dir(&self, region: &str, data_root: &Path) -> Result<PathBuf, LookupError> {
        let r = self.region_or_err(region)?;
        Ok(data_root.join(r.data_dir.clone().unwrap_or_else(|| PathBuf::from(&r.name))))
    }

    /// The Kafka node id of a broker: `1000 × region position (file order) + id`, unique
    /// across the topology, so a Metadata answer can name brokers of other regions (after a
    /// failover) without clashing. The first region's brokers keep their own ids.
    pub fn node_id(&self, region: &str, broker_id: i32) -> i32 {
        let i = self
            .regions
            .iter()
            .position(|r| r.name == region)
            .unwrap_or(0) as i32;
        i * 1000 + broker_id
    }

    pub(crate) fn region_or_err(&self, name: &str) -> Result<&Region, LookupError> {
        self.region(name).ok_or_else(|| LookupError::NoRegion {
            file: self.file.display().to_string(),
            region: name.to_string(),
            known: self
                .regions
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

impl TopicRule {
    /// Whether `topic` matches this rule's name or glob (internal topics are not special here;
    /// see [`Topology::rule_for_topic`]).
    pub fn matches(&self, topic: &str) -> bool {
        glob_match(&self.pattern, topic)
    }
}

/// `*` matches any run of characters (including none); everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}
