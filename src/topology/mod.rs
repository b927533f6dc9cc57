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

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::units::parse_host_port;
use crate::units::{format_duration, parse_duration};

mod cluster;
mod render;
pub use cluster::{EtcdSpec, RegionCluster};
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

// ---------------------------------------------------------------------------------------------
// Reading: a context that collects errors, and typed readers over the spanned tree
// ---------------------------------------------------------------------------------------------

type Val<'i> = Spanned<DeValue<'i>>;

struct Cx<'a> {
    text: &'a str,
    file: String,
    line_starts: Vec<usize>,
    errors: Vec<TopologyError>,
}

impl<'a> Cx<'a> {
    fn new(text: &'a str, file: &str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Cx {
            text,
            file: file.to_string(),
            line_starts,
            errors: Vec::new(),
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    fn pos(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset) - 1;
        let start = self.line_starts[line];
        let column = self
            .text
            .get(start..offset)
            .map(|s| s.chars().count())
            .unwrap_or(offset - start);
        (line + 1, column + 1)
    }

    fn line(&self, offset: usize) -> usize {
        self.pos(offset).0
    }

    fn err(&mut self, at: usize, field: &str, message: impl Into<String>, hint: Option<String>) {
        let (line, column) = self.pos(at);
        self.errors.push(TopologyError {
            file: self.file.clone(),
            line,
            column,
            field: field.to_string(),
            message: message.into(),
            hint,
        });
    }

    fn finish(mut self) -> Vec<TopologyError> {
        self.errors.sort_by(|a, b| {
            (a.line, a.column, &a.field, &a.message).cmp(&(b.line, b.column, &b.field, &b.message))
        });
        self.errors.dedup();
        self.errors
    }

    /// A TOML syntax error, with the field guessed from the line it is on.
    fn syntax_error(&mut self, e: &toml::de::Error) {
        let at = e.span().map(|s| s.start).unwrap_or(0);
        let fields = fields_by_line(self.text);
        let line = self.line(at) - 1;
        let field = fields.get(line).cloned().flatten().unwrap_or_default();
        if e.message() == "duplicate key" && !field.is_empty() {
            let first = fields[..line]
                .iter()
                .position(|f| f.as_deref() == Some(field.as_str()))
                .map(|l| format!("first defined at line {}", l + 1));
            let parts: Vec<&str> = field.split('.').collect();
            let message = match parts.as_slice() {
                ["regions", name] => format!("region `{name}` is defined twice"),
                _ => format!("`{field}` is defined twice"),
            };
            self.err(at, &field, message, first);
        } else {
            self.err(at, &field, e.message().to_string(), None);
        }
    }

    fn table<'t, 'i>(&mut self, v: &'t Val<'i>, path: &str) -> Option<Obj<'t, 'i>> {
        match v.get_ref() {
            DeValue::Table(t) => Some(Obj {
                t,
                path: path.to_string(),
                at: v.span().start,
            }),
            other => {
                self.type_err(v, path, "a table", other);
                None
            }
        }
    }

    fn type_err(&mut self, v: &Val<'_>, field: &str, expected: &str, found: &DeValue<'_>) {
        self.err(
            v.span().start,
            field,
            format!("expected {expected}, found {}", found.type_str()),
            None,
        );
    }

    fn string(&mut self, v: &Val<'_>, field: &str) -> Option<String> {
        match v.get_ref() {
            DeValue::String(s) => Some(s.to_string()),
            other => {
                self.type_err(v, field, "a string", other);
                None
            }
        }
    }

    fn nonempty_string(&mut self, v: &Val<'_>, field: &str) -> Option<String> {
        let s = self.string(v, field)?;
        if s.trim().is_empty() {
            self.err(v.span().start, field, "may not be empty", None);
            return None;
        }
        Some(s)
    }

    fn int(&mut self, v: &Val<'_>, field: &str, min: i64, max: i64) -> Option<i64> {
        match v.get_ref() {
            DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
                Ok(n) if (min..=max).contains(&n) => Some(n),
                _ => {
                    self.err(
                        v.span().start,
                        field,
                        format!("{i} is out of range ({min} to {max})"),
                        None,
                    );
                    None
                }
            },
            other => {
                self.type_err(v, field, "an integer", other);
                None
            }
        }
    }

    /// A listener address: `IP:PORT` (host names are not resolved for listeners).
    fn addr(&mut self, v: &Val<'_>, field: &str) -> Option<SocketAddr> {
        let s = self.string(v, field)?;
        match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    v.span().start,
                    field,
                    format!("`{s}` is not an IP:PORT address"),
                    Some(
                        "write e.g. `127.0.0.1:19092`, `0.0.0.0:9092` or `[::1]:9092`; \
                         host names belong in `advertised`"
                            .into(),
                    ),
                );
                None
            }
        }
    }

    fn host_port(&mut self, v: &Val<'_>, field: &str) -> Option<(String, u16)> {
        let s = self.string(v, field)?;
        match parse_host_port(&s) {
            Ok(hp) => Some(hp),
            Err(m) => {
                self.err(
                    v.span().start,
                    field,
                    m,
                    Some("write HOST:PORT, e.g. `kafka-east.example.com:9092`".into()),
                );
                None
            }
        }
    }

    /// A duration: a string with a unit (`10s`) or an integer number of milliseconds.
    fn duration(&mut self, v: &Val<'_>, field: &str) -> Option<Duration> {
        let hint = Some("write e.g. `500ms`, `10s`, `5m`, `2h` or `7d`".to_string());
        match v.get_ref() {
            DeValue::Integer(_) => self
                .int(v, field, 0, i64::MAX)
                .map(|n| Duration::from_millis(n as u64)),
            DeValue::String(s) => {
                // Guard the unit multiplication in `parse_duration` against overflow (it
                // multiplies without checking).
                let digits: String = s
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_digit())
                    .collect();
                let too_big = digits
                    .parse::<u128>()
                    .is_ok_and(|n| n * 86_400_000 > u64::MAX as u128)
                    || digits.len() > 30;
                if too_big {
                    self.err(v.span().start, field, format!("`{s}` is too long"), hint);
                    return None;
                }
                match parse_duration(s) {
                    Ok(d) => Some(d),
                    Err(m) => {
                        // `units` ends its messages with a parenthesised suggestion: make it
                        // the hint.
                        let (m, h) = match m.rsplit_once(" (") {
                            Some((m, h)) if h.ends_with(')') => {
                                (m.to_string(), Some(h.trim_end_matches(')').to_string()))
                            }
                            _ => (m, hint),
                        };
                        self.err(v.span().start, field, m, h);
                        None
                    }
                }
            }
            other => {
                self.type_err(v, field, "a duration such as \"10s\"", other);
                None
            }
        }
    }

    /// One of `options` (exact, lowercase); returns its index.
    fn choice(&mut self, v: &Val<'_>, field: &str, options: &[&str]) -> Option<usize> {
        let s = self.string(v, field)?;
        match options.iter().position(|o| *o == s) {
            Some(i) => Some(i),
            None => {
                let list = options
                    .iter()
                    .map(|o| format!("`{o}`"))
                    .collect::<Vec<_>>()
                    .join(" or ");
                self.err(
                    v.span().start,
                    field,
                    format!("`{s}` is not one of {list}"),
                    suggest(&s, options).map(|m| format!("did you mean `{m}`?")),
                );
                None
            }
        }
    }

    fn array<'t, 'i>(&mut self, v: &'t Val<'i>, field: &str) -> Option<&'t [Val<'i>]> {
        match v.get_ref() {
            DeValue::Array(a) => Some(&a[..]),
            other => {
                self.type_err(v, field, "an array", other);
                None
            }
        }
    }
}

/// A table being read: its path for error messages and where it starts.
struct Obj<'t, 'i> {
    t: &'t DeTable<'i>,
    path: String,
    at: usize,
}

impl<'t, 'i> Obj<'t, 'i> {
    fn field(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn get(&self, key: &str) -> Option<&'t Val<'i>> {
        self.t.get(key)
    }

    /// Entries in file order.
    fn entries(&self) -> Vec<(&'t Spanned<std::borrow::Cow<'i, str>>, &'t Val<'i>)> {
        let mut e: Vec<_> = self.t.iter().collect();
        e.sort_by_key(|(k, _)| k.span().start);
        e
    }

    /// Report keys not in `allowed`, with a did-you-mean hint.
    fn known(&self, cx: &mut Cx<'_>, allowed: &[&str]) {
        for (k, _) in self.entries() {
            let key = k.get_ref().as_ref();
            if !allowed.contains(&key) {
                let hint = match suggest(key, allowed) {
                    Some(m) => format!("did you mean `{m}`?"),
                    None => format!("expected one of: {}", allowed.join(", ")),
                };
                cx.err(
                    k.span().start,
                    &self.field(key),
                    format!("unknown field `{key}`"),
                    Some(hint),
                );
            }
        }
    }

    fn required(&self, cx: &mut Cx<'_>, key: &str, hint: Option<String>) -> Option<&'t Val<'i>> {
        let v = self.get(key);
        if v.is_none() {
            cx.err(
                self.at,
                &self.field(key),
                format!("missing field `{key}`"),
                hint,
            );
        }
        v
    }
}

/// The closest of `options` to `word` if it is close enough to be a likely typo.
fn suggest<'o>(word: &str, options: &[&'o str]) -> Option<&'o str> {
    let w = word.to_lowercase();
    options
        .iter()
        .map(|o| (edit_distance(&w, o), *o))
        .filter(|(d, o)| *d <= 2.max(o.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, o)| o)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// For each line, the dotted key it defines (`[a.b]` gives `a.b`, `k = v` under it `a.b.k`).
/// Only used to name the field of a TOML syntax error.
fn fields_by_line(text: &str) -> Vec<Option<String>> {
    let norm = |s: &str| {
        s.split('.')
            .map(|p| p.trim().trim_matches(|c| c == '"' || c == '\''))
            .collect::<Vec<_>>()
            .join(".")
    };
    let mut table = String::new();
    text.lines()
        .map(|line| {
            let t = line.trim();
            if let Some(rest) = t.strip_prefix("[[") {
                table = norm(rest.split("]]").next().unwrap_or(rest));
                Some(table.clone())
            } else if let Some(rest) = t.strip_prefix('[') {
                table = norm(rest.split(']').next().unwrap_or(rest));
                Some(table.clone())
            } else if !t.starts_with('#') && t.contains('=') {
                let key = norm(t.split('=').next().unwrap_or(""));
                Some(if table.is_empty() {
                    key
                } else {
                    format!("{table}.{key}")
                })
            } else if table.is_empty() {
                None
            } else {
                Some(table.clone())
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The schema
// ---------------------------------------------------------------------------------------------

const ROOT_KEYS: &[&str] = &["regions", "topics", "failover", "tls", "limits"];
const LIMITS_KEYS: &[&str] = &[
    "connections_max",
    "connections_per_address_max",
    "idle_timeout",
    "request_read_timeout",
    "request_memory_max",
];
const REGION_KEYS: &[&str] = &[
    "brokers",
    "gateway",
    "data_dir",
    "etcd",
    "replication_factor",
    "min_insync_replicas",
];
const BROKER_KEYS: &[&str] = &["id", "listen", "advertised", "metrics"];
const GATEWAY_KEYS: &[&str] = &["quic", "advertised", "admin", "metrics"];
const TOPIC_KEYS: &[&str] = &[
    "pattern",
    "partitions",
    "primary",
    "mirrors",
    "mode",
    "retention",
    "wire_compression",
    "wire_copies",
    "wire_fec",
];
const FAILOVER_KEYS: &[&str] = &["fencing", "lease", "heartbeat", "promotion", "witness"];
const TLS_KEYS: &[&str] = &["ca", "regions"];
const TLS_REGION_KEYS: &[&str] = &["cert", "key"];

/// A listener seen while reading, for the overlap check.
struct Listener {
    addr: SocketAddr,
    field: String,
    at: usize,
}

/// Where a region was defined, for cross-references.
struct RegionAt {
    name_at: usize,
    data_dir_at: usize,
}

struct RuleAt {
    at: usize,
    pattern_at: usize,
    primary_at: usize,
}

fn read_topology(cx: &mut Cx<'_>, root: &DeTable<'_>, file_name: &str, base: &Path) -> Topology {
    let root = Obj {
        t: root,
        path: String::new(),
        at: 0,
    };
    root.known(cx, ROOT_KEYS);
    let mut listeners = Vec::new();

    // Regions.
    let mut regions = Vec::new();
    // Every region named in the file, even one with errors, so that references to it are not
    // reported a second time.
    let mut declared: Vec<String> = Vec::new();
    let mut region_at: HashMap<String, RegionAt> = HashMap::new();
    match root.get("regions") {
        None => cx.err(
            0,
            "regions",
            "no regions defined",
            Some(
                "add a `[regions.NAME]` table with at least one `[[regions.NAME.brokers]]`".into(),
            ),
        ),
        Some(v) => {
            if let Some(rs) = cx.table(v, "regions") {
                if rs.t.is_empty() {
                    cx.err(rs.at, "regions", "no regions defined", None);
                }
                for (k, v) in rs.entries() {
                    let name = k.get_ref().to_string();
                    declared.push(name.clone());
                    if let Some((r, at)) = read_region(cx, &name, k.span().start, v, &mut listeners)
                    {
                        region_at.insert(name, at);
                        regions.push(r);
                    }
                }
            }
        }
    }
    check_region_dirs(cx, &regions, &region_at);
    check_listeners(cx, &listeners);
    let names: Vec<&str> = declared.iter().map(String::as_str).collect();
    let known_regions = names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let region_hint = || Some(format!("defined regions: {known_regions}"));

    // Topics.
    let mut topics = Vec::new();
    let mut rule_at = Vec::new();
    if let Some(v) = root.get("topics") {
        if let Some(items) = cx.array(v, "topics") {
            for (i, item) in items.iter().enumerate() {
                let path = format!("topics[{i}]");
                if let Some((rule, at)) = read_rule(cx, item, &path, &names, &region_hint) {
                    topics.push((i, rule));
                    rule_at.push(at);
                }
            }
        }
    }
    check_rules(cx, &topics, &rule_at, &regions, &region_at);

    // Failover.
    let failover = match root.get("failover") {
        Some(v) => read_failover(cx, v, &names, &region_hint),
        None => FailoverPolicy::default(),
    };

    // TLS.
    let tls = root
        .get("tls")
        .and_then(|v| read_tls(cx, v, base, &regions, &region_hint));

    // Limits.
    let limits = match root.get("limits") {
        Some(v) => read_limits(cx, v),
        None => crate::limits::ConnectionLimits::default(),
    };

    Topology {
        regions,
        topics: topics.into_iter().map(|(_, r)| r).collect(),
        failover,
        tls,
        limits,
        file: PathBuf::from(file_name),
    }
}

fn valid_region_name(name: &str) -> bool {
    let mut c = name.chars();
    matches!(c.next(), Some('a'..='z'))
        && c.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && name.len() <= 64
}

fn read_region(
    cx: &mut Cx<'_>,
    name: &str,
    name_at: usize,
    v: &Val<'_>,
    listeners: &mut Vec<Listener>,
) -> Option<(Region, RegionAt)> {
    let path = format!("regions.{name}");
    let mut ok = true;
    if !valid_region_name(name) {
        cx.err(
            name_at,
            &path,
            format!("`{name}` is not a valid region name"),
            Some("use lowercase letters, digits, `-` and `_`, starting with a letter".into()),
        );
        ok = false;
    }
    let o = cx.table(v, &path)?;
    o.known(cx, REGION_KEYS);

    let mut data_dir = None;
    let mut data_dir_at = o.at;
    if let Some(v) = o.get("data_dir") {
        data_dir_at = v.span().start;
        data_dir = cx
            .nonempty_string(v, &o.field("data_dir"))
            .map(PathBuf::from);
        ok &= data_dir.is_some();
    }

    // Brokers.
    let mut brokers: Vec<BrokerSpec> = Vec::new();
    let mut id_lines: BTreeMap<i32, usize> = BTreeMap::new();
    let hint = format!("add a `[[regions.{name}.brokers]]` table with `id` and `listen`");
    match o.required(cx, "brokers", Some(hint.clone())) {
        None => ok = false,
        Some(v) => match cx.array(v, &o.field("brokers")) {
            None => ok = false,
            Some([]) => {
                cx.err(
                    v.span().start,
                    &o.field("brokers"),
                    "a region needs at least one broker",
                    Some(hint),
                );
                ok = false;
            }
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    let bpath = format!("{path}.brokers[{i}]");
                    match read_broker(cx, item, &bpath, listeners) {
                        Some((b, id_at)) => {
                            if let Some(line) = id_lines.get(&b.id) {
                                cx.err(
                                    id_at,
                                    &format!("{bpath}.id"),
                                    format!("duplicate broker id {} in region `{name}`", b.id),
                                    Some(format!(
                                        "broker {} is first defined at line {line}; ids must be \
                                         unique within a region",
                                        b.id
                                    )),
                                );
                                ok = false;
                            } else {
                                id_lines.insert(b.id, cx.line(id_at));
                            }
                            brokers.push(b);
                        }
                        None => ok = false,
                    }
                }
            }
        },
    }

    // A cluster's etcd and replication defaults (only once the brokers are known to count).
    let cluster = if ok {
        match cluster::read(cx, &o, name, brokers.len(), listeners) {
            Ok(c) => c,
            Err(()) => {
                ok = false;
                None
            }
        }
    } else {
        None
    };

    // Gateway.
    let gateway = match o.get("gateway") {
        None => None,
        Some(v) => {
            let g = read_gateway(cx, v, &o.field("gateway"), listeners);
            ok &= g.is_some();
            g
        }
    };

    ok.then(|| {
        (
            Region {
                name: name.to_string(),
                brokers,
                gateway,
                cluster,
                data_dir,
            },
            RegionAt {
                name_at,
                data_dir_at,
            },
        )
    })
}

fn push_listener(listeners: &mut Vec<Listener>, addr: SocketAddr, field: String, at: usize) {
    listeners.push(Listener { addr, field, at });
}

/// The advertised address: given, or the listener's (which must then be a specific IP).
fn advertised_or_listen(
    cx: &mut Cx<'_>,
    o: &Obj<'_, '_>,
    listen: Option<(SocketAddr, usize)>,
    listen_key: &str,
) -> Option<(String, u16)> {
    match o.get("advertised") {
        Some(v) => cx.host_port(v, &o.field("advertised")),
        None => {
            let (l, at) = listen?;
            if l.ip().is_unspecified() {
                cx.err(
                    at,
                    &o.field(listen_key),
                    format!("`{l}` listens on every interface, so it cannot be advertised"),
                    Some(format!(
                        "add `advertised = \"HOST:{}\"` with the address others connect to",
                        l.port()
                    )),
                );
                return None;
            }
            Some((l.ip().to_string(), l.port()))
        }
    }
}

/// Returns the broker and where its id was written.
fn read_broker(
    cx: &mut Cx<'_>,
    v: &Val<'_>,
    path: &str,
    listeners: &mut Vec<Listener>,
) -> Option<(BrokerSpec, usize)> {
    let o = cx.table(v, path)?;
    o.known(cx, BROKER_KEYS);
    let idv = o.required(cx, "id", Some("broker id 0..=999, e.g. `id = 1`".into()));
    let id = idv.and_then(|v| cx.int(v, &o.field("id"), 0, 999));
    let listen = o
        .required(
            cx,
            "listen",
            Some("Kafka listener, e.g. `listen = \"127.0.0.1:19092\"`".into()),
        )
        .and_then(|v| cx.addr(v, &o.field("listen")).map(|a| (a, v.span().start)));
    if let Some((a, at)) = listen {
        push_listener(listeners, a, o.field("listen"), at);
    }
    let advertised = advertised_or_listen(cx, &o, listen, "listen");
    let mut metrics_ok = true;
    let metrics = o.get("metrics").and_then(|v| {
        let a = cx.addr(v, &o.field("metrics"));
        metrics_ok = a.is_some();
        if let Some(a) = a {
            push_listener(listeners, a, o.field("metrics"), v.span().start);
        }
        a
    });
    Some((
        BrokerSpec {
            id: id? as i32,
            listen: listen?.0,
            advertised: advertised?,
            metrics,
        },
        idv?.span().start,
    ))
    .filter(|_| metrics_ok)
}

fn read_gateway(
    cx: &mut Cx<'_>,
    v: &Val<'_>,
    path: &str,
    listeners: &mut Vec<Listener>,
) -> Option<GatewaySpec> {
    let o = cx.table(v, path)?;
    o.known(cx, GATEWAY_KEYS);
    let mut addr =
        |cx: &mut Cx<'_>, key: &str, hint: Option<&str>| -> (Option<(SocketAddr, usize)>, bool) {
            let v = match hint {
                Some(h) => o.required(cx, key, Some(h.to_string())),
                None => match o.get(key) {
                    None => return (None, true),
                    Some(v) => Some(v),
                },
            };
            let Some(v) = v else { return (None, false) };
            match cx.addr(v, &o.field(key)) {
                Some(a) => {
                    push_listener(listeners, a, o.field(key), v.span().start);
                    (Some((a, v.span().start)), true)
                }
                None => (None, false),
            }
        };
    let (quic, _) = addr(
        cx,
        "quic",
        Some("QUIC (UDP) listener, e.g. `quic = \"127.0.0.1:19093\"`"),
    );
    let (admin, _) = addr(
        cx,
        "admin",
        Some("HTTP admin listener, e.g. `admin = \"127.0.0.1:19095\"`"),
    );
    let (metrics, metrics_ok) = addr(cx, "metrics", None);
    let advertised = advertised_or_listen(cx, &o, quic, "quic");
    if !metrics_ok {
        return None;
    }
    Some(GatewaySpec {
        quic: quic?.0,
        advertised: advertised?,
        admin: admin?.0,
        metrics: metrics.map(|m| m.0),
    })
}

/// Two regions may not share a data directory.
fn check_region_dirs(cx: &mut Cx<'_>, regions: &[Region], at: &HashMap<String, RegionAt>) {
    let mut seen: HashMap<PathBuf, &str> = HashMap::new();
    for r in regions {
        let dir = r.data_dir.clone().unwrap_or_else(|| PathBuf::from(&r.name));
        if let Some(other) = seen.get(&dir) {
            let a = &at[&r.name];
            cx.err(
                a.data_dir_at,
                &format!("regions.{}.data_dir", r.name),
                format!(
                    "data directory `{}` is already used by region `{other}`",
                    dir.display()
                ),
                Some("give each region its own `data_dir`".into()),
            );
        } else {
            seen.insert(dir, &r.name);
        }
    }
}

/// No two listeners on one address. Port 0 (pick any) never conflicts; an unspecified IP
/// (`0.0.0.0`, `::`) conflicts with every IP on the same port.
fn check_listeners(cx: &mut Cx<'_>, listeners: &[Listener]) {
    for (j, b) in listeners.iter().enumerate() {
        if b.addr.port() == 0 {
            continue;
        }
        let clash = listeners[..j].iter().find(|a| {
            a.addr.port() == b.addr.port()
                && (a.addr.ip() == b.addr.ip()
                    || a.addr.ip().is_unspecified()
                    || b.addr.ip().is_unspecified())
        });
        if let Some(a) = clash {
            let line = cx.line(a.at);
            cx.err(
                b.at,
                &b.field,
                format!(
                    "address {} is already used by {} (line {line})",
                    b.addr, a.field
                ),
                Some("every listener (Kafka, QUIC, admin, metrics) needs its own port".into()),
            );
        }
    }
}

fn valid_pattern(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 249
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '*'))
}

fn read_rule(
    cx: &mut Cx<'_>,
    v: &Val<'_>,
    path: &str,
    regions: &[&str],
    region_hint: &dyn Fn() -> Option<String>,
) -> Option<(TopicRule, RuleAt)> {
    let o = cx.table(v, path)?;
    o.known(cx, TOPIC_KEYS);
    let mut ok = true;
    let pv = o.required(
        cx,
        "pattern",
        Some("a topic name or glob, e.g. `pattern = \"orders.*\"`".into()),
    );
    let pattern = pv.and_then(|v| cx.nonempty_string(v, &o.field("pattern")));
    if let (Some(p), Some(v)) = (&pattern, pv) {
        if !valid_pattern(p) {
            cx.err(
                v.span().start,
                &o.field("pattern"),
                format!("`{p}` is not a topic name or pattern"),
                Some(
                    "topic names use letters, digits, `.`, `_` and `-`; `*` matches any run".into(),
                ),
            );
            ok = false;
        } else if p.starts_with("__") {
            cx.err(
                v.span().start,
                &o.field("pattern"),
                format!("`{p}` names an internal topic"),
                Some("internal `__` topics are never mirrored by topic rules".into()),
            );
            ok = false;
        }
    }

    let partitions = o.get("partitions").map(|v| {
        let n = cx.int(v, &o.field("partitions"), 1, i32::MAX as i64);
        ok &= n.is_some();
        n.map(|n| n as i32)
    });

    let prv = o.required(
        cx,
        "primary",
        Some(format!(
            "the region that accepts writes; {}",
            region_hint().unwrap_or_default()
        )),
    );
    let primary = prv.and_then(|v| cx.nonempty_string(v, &o.field("primary")));
    if let (Some(p), Some(v)) = (&primary, prv) {
        if !regions.contains(&p.as_str()) {
            cx.err(
                v.span().start,
                &o.field("primary"),
                format!("primary `{p}` is not a region"),
                region_hint(),
            );
            ok = false;
        }
    }

    let mut mirrors: Vec<String> = Vec::new();
    if let Some(v) = o.get("mirrors") {
        match cx.array(v, &o.field("mirrors")) {
            None => ok = false,
            Some(items) => {
                for (i, m) in items.iter().enumerate() {
                    let field = format!("{}[{i}]", o.field("mirrors"));
                    let Some(name) = cx.nonempty_string(m, &field) else {
                        ok = false;
                        continue;
                    };
                    let at = m.span().start;
                    if !regions.contains(&name.as_str()) {
                        cx.err(
                            at,
                            &field,
                            format!("mirror `{name}` is not a region"),
                            region_hint(),
                        );
                        ok = false;
                    } else if primary.as_deref() == Some(name.as_str()) {
                        cx.err(
                            at,
                            &field,
                            format!("`{name}` is the primary; it cannot also mirror the topic"),
                            Some("list only the other regions in `mirrors`".into()),
                        );
                        ok = false;
                    } else if mirrors.contains(&name) {
                        cx.err(at, &field, format!("`{name}` is listed twice"), None);
                        ok = false;
                    } else {
                        mirrors.push(name);
                    }
                }
            }
        }
    }

    let mode = match o.get("mode") {
        None => Some(ReplicationMode::Async),
        Some(v) => cx
            .choice(v, &o.field("mode"), &["async", "sync"])
            .map(|i| [ReplicationMode::Async, ReplicationMode::Sync][i]),
    };
    if mode == Some(ReplicationMode::Sync) && mirrors.is_empty() && ok {
        cx.err(
            o.get("mode").map_or(o.at, |v| v.span().start),
            &o.field("mode"),
            "`sync` needs at least one mirror",
            Some("add `mirrors = [\"REGION\"]` or use `mode = \"async\"`".into()),
        );
        ok = false;
    }

    let retention = o.get("retention").map(|v| {
        let d = cx.duration(v, &o.field("retention"));
        ok &= d.is_some();
        d
    });

    let wire_compression = match o.get("wire_compression") {
        None => Some(WireCompression::None),
        Some(v) => cx
            .choice(v, &o.field("wire_compression"), &["none", "snappy"])
            .map(|i| [WireCompression::None, WireCompression::Snappy][i]),
    };

    let wire_copies = match o.get("wire_copies") {
        None => Some(1),
        Some(v) => cx.int(v, &o.field("wire_copies"), 1, 2).map(|n| n as u8),
    };

    let wire_fec = match o.get("wire_fec") {
        None => Some(0),
        Some(v) => cx.int(v, &o.field("wire_fec"), 0, 100).map(|n| n as u8),
    };

    let rule = TopicRule {
        pattern: pattern?,
        partitions: partitions.flatten(),
        primary: primary?,
        mirrors,
        mode: mode?,
        retention: retention.flatten(),
        wire_compression: wire_compression?,
        wire_copies: wire_copies?,
        wire_fec: wire_fec?,
    };
    let at = RuleAt {
        at: o.at,
        pattern_at: pv?.span().start,
        primary_at: prv?.span().start,
    };
    // Returned even when another field had an error, so the cross-rule checks still see it
    // (the topology as a whole is rejected anyway).
    Some((rule, at))
}

/// Cross-rule checks: no rule shadowed by an earlier one (so no topic has two primaries), and
/// the regions that mirror have gateways.
fn check_rules(
    cx: &mut Cx<'_>,
    rules: &[(usize, TopicRule)],
    at: &[RuleAt],
    regions: &[Region],
    region_at: &HashMap<String, RegionAt>,
) {
    for (j, (jj, b)) in rules.iter().enumerate() {
        // An earlier rule matching b's pattern (its `*` taken literally) matches every topic b
        // matches, so b never applies.
        let Some((i, (ii, a))) = rules[..j]
            .iter()
            .enumerate()
            .find(|(_, (_, a))| glob_match(&a.pattern, &b.pattern))
        else {
            continue;
        };
        let line = cx.line(at[i].at);
        if a.pattern == b.pattern && a.primary != b.primary {
            cx.err(
                at[j].primary_at,
                &format!("topics[{jj}].primary"),
                format!(
                    "topic `{}` is claimed as primary by two regions: `{}` (topics[{ii}], line \
                     {line}) and `{}`",
                    b.pattern, a.primary, b.primary
                ),
                Some("a topic has exactly one primary region; remove one rule".into()),
            );
        } else if a.pattern == b.pattern {
            cx.err(
                at[j].pattern_at,
                &format!("topics[{jj}].pattern"),
                format!(
                    "duplicate rule for `{}` (topics[{ii}], line {line})",
                    b.pattern
                ),
                Some("merge the two rules".into()),
            );
        } else {
            cx.err(
                at[j].pattern_at,
                &format!("topics[{jj}].pattern"),
                format!(
                    "this rule never applies: topics[{ii}] (`{}`, primary `{}`, line {line}) \
                     already matches every topic `{}` matches",
                    a.pattern, a.primary, b.pattern
                ),
                Some("the first matching rule wins; put more specific rules first".into()),
            );
        }
    }

    // Mirroring needs a gateway on both ends.
    let mut reported = Vec::new();
    for (j, (jj, r)) in rules.iter().enumerate() {
        if r.mirrors.is_empty() {
            continue;
        }
        for name in std::iter::once(&r.primary).chain(&r.mirrors) {
            let Some(region) = regions.iter().find(|g| &g.name == name) else {
                continue;
            };
            if region.gateway.is_none() && !reported.contains(name) {
                reported.push(name.clone());
                let at_name = region_at.get(name).map_or(0, |a| a.name_at);
                cx.err(
                    at_name,
                    &format!("regions.{name}.gateway"),
                    format!(
                        "region `{name}` has no gateway but mirrors topics (topics[{jj}], line {})",
                        cx.line(at[j].at)
                    ),
                    Some(format!(
                        "add `[regions.{name}.gateway]` with `quic` and `admin` addresses"
                    )),
                );
            }
        }
    }
}

fn read_failover(
    cx: &mut Cx<'_>,
    v: &Val<'_>,
    regions: &[&str],
    region_hint: &dyn Fn() -> Option<String>,
) -> FailoverPolicy {
    let mut f = FailoverPolicy::default();
    let Some(o) = cx.table(v, "failover") else {
        return f;
    };
    o.known(cx, FAILOVER_KEYS);
    if let Some(v) = o.get("fencing") {
        if let Some(i) = cx.choice(v, "failover.fencing", &["lease", "none"]) {
            f.fencing = [Fencing::Lease, Fencing::None][i];
        }
    }
    let mut lease_ok = true;
    if let Some(v) = o.get("lease") {
        match cx.duration(v, "failover.lease") {
            Some(d) if d.is_zero() => {
                cx.err(
                    v.span().start,
                    "failover.lease",
                    "must be longer than 0",
                    None,
                );
                lease_ok = false;
            }
            Some(d) => f.lease = d,
            None => lease_ok = false,
        }
    }
    let mut hb_ok = true;
    if let Some(v) = o.get("heartbeat") {
        match cx.duration(v, "failover.heartbeat") {
            Some(d) if d.is_zero() => {
                cx.err(
                    v.span().start,
                    "failover.heartbeat",
                    "must be longer than 0",
                    None,
                );
                hb_ok = false;
            }
            Some(d) => f.heartbeat = d,
            None => hb_ok = false,
        }
    }
    if lease_ok && hb_ok && f.heartbeat >= f.lease {
        let at = o
            .get("heartbeat")
            .or(o.get("lease"))
            .map_or(o.at, |v| v.span().start);
        cx.err(
            at,
            "failover.heartbeat",
            format!(
                "heartbeat {} is not shorter than the lease {}",
                format_duration(f.heartbeat),
                format_duration(f.lease)
            ),
            Some("renew several times per lease, e.g. heartbeat = lease / 5".into()),
        );
    }
    if let Some(v) = o.get("promotion") {
        if let Some(i) = cx.choice(v, "failover.promotion", &["manual", "automatic"]) {
            f.promotion = [Promotion::Manual, Promotion::Automatic][i];
            if f.promotion == Promotion::Automatic && f.fencing == Fencing::None {
                cx.err(
                    v.span().start,
                    "failover.promotion",
                    "automatic promotion without fencing can leave two primaries",
                    Some("set `fencing = \"lease\"` or `promotion = \"manual\"`".into()),
                );
            }
        }
    }
    if let Some(v) = o.get("witness") {
        if let Some(w) = cx.nonempty_string(v, "failover.witness") {
            if regions.contains(&w.as_str()) {
                f.witness = Some(w);
            } else {
                cx.err(
                    v.span().start,
                    "failover.witness",
                    format!("witness `{w}` is not a region"),
                    region_hint(),
                );
            }
        }
    }
    if let Some(v) = o.get("promotion") {
        if f.promotion == Promotion::Automatic && regions.len() < 3 && f.witness.is_none() {
            cx.err(
                v.span().start,
                "failover.promotion",
                "automatic promotion needs a third region or a witness: with two regions, both sides of a cut would promote themselves",
                Some("add a region (it may be a witness: `witness = \"NAME\"`) or use `promotion = \"manual\"` and `ferry failover --force`".into()),
            );
        }
    }
    f
}

fn read_limits(cx: &mut Cx<'_>, v: &Val<'_>) -> crate::limits::ConnectionLimits {
    let mut l = crate::limits::ConnectionLimits::default();
    let Some(o) = cx.table(v, "limits") else {
        return l;
    };
    o.known(cx, LIMITS_KEYS);
    if let Some(v) = o.get("connections_max") {
        if let Some(n) = cx.int(v, "limits.connections_max", 1, 1 << 24) {
            l.connections_max = n as usize;
        }
    }
    if let Some(v) = o.get("connections_per_address_max") {
        if let Some(n) = cx.int(v, "limits.connections_per_address_max", 1, 1 << 24) {
            l.connections_per_address_max = n as usize;
        }
    }
    for (key, slot) in [
        ("idle_timeout", &mut l.idle_timeout),
        ("request_read_timeout", &mut l.request_read_timeout),
    ] {
        if let Some(v) = o.get(key) {
            let field = format!("limits.{key}");
            match cx.duration(v, &field) {
                Some(d) if d.is_zero() => {
                    cx.err(v.span().start, &field, "must be longer than 0", None)
                }
                Some(d) => *slot = d,
                None => {}
            }
        }
    }
    if let Some(v) = o.get("request_memory_max") {
        let field = "limits.request_memory_max";
        let bytes = match v.get_ref() {
            DeValue::Integer(_) => cx.int(v, field, 0, i64::MAX).map(|n| n as u64),
            DeValue::String(s) => match crate::units::parse_size(s) {
                Ok(n) => Some(n),
                Err(m) => {
                    cx.err(v.span().start, field, m, None);
                    None
                }
            },
            other => {
                cx.type_err(v, field, "a size such as \"256MiB\"", other);
                None
            }
        };
        match bytes {
            Some(n) if (n as usize) < crate::limits::FRAME_BYTES_MAX_DEFAULT => cx.err(
                v.span().start,
                field,
                format!("{n} bytes is below the largest request a broker reads (100 MiB)"),
                Some("write at least \"100MiB\"".into()),
            ),
            Some(n) => l.request_memory_max = n as usize,
            None => {}
        }
    }
    l
}

fn read_tls(
    cx: &mut Cx<'_>,
    v: &Val<'_>,
    base: &Path,
    regions: &[Region],
    region_hint: &dyn Fn() -> Option<String>,
) -> Option<Tls> {
    let o = cx.table(v, "tls")?;
    o.known(cx, TLS_KEYS);
    let file_hint = |p: &Path| {
        Some(format!(
            "looked for {}; paths are relative to the topology file's directory \
             (`ferry certs init` creates a CA and one certificate per region)",
            p.display()
        ))
    };
    let path_of = |cx: &mut Cx<'_>, v: &Val<'_>, field: &str, what: &str| -> Option<PathBuf> {
        let s = cx.nonempty_string(v, field)?;
        let p = base.join(&s);
        if !p.is_file() {
            cx.err(
                v.span().start,
                field,
                format!("{what} file `{s}` not found"),
                file_hint(&p),
            );
            return None;
        }
        Some(p)
    };
    let ca = o
        .required(
            cx,
            "ca",
            Some("the CA certificate, e.g. `ca = \"certs/ca.pem\"`".into()),
        )
        .and_then(|v| path_of(cx, v, "tls.ca", "CA certificate"));
    let mut out = Vec::new();
    let mut ok = true;
    if let Some(v) = o.get("regions") {
        if let Some(rs) = cx.table(v, "tls.regions") {
            for (k, v) in rs.entries() {
                let name = k.get_ref().to_string();
                let path = format!("tls.regions.{name}");
                if !regions.iter().any(|r| r.name == name) {
                    cx.err(
                        k.span().start,
                        &path,
                        format!("`{name}` is not a region"),
                        region_hint(),
                    );
                    ok = false;
                    continue;
                }
                let Some(r) = cx.table(v, &path) else {
                    ok = false;
                    continue;
                };
                r.known(cx, TLS_REGION_KEYS);
                let cert = r
                    .required(
                        cx,
                        "cert",
                        Some(format!("e.g. `cert = \"certs/{name}.pem\"`")),
                    )
                    .and_then(|v| path_of(cx, v, &r.field("cert"), "certificate"));
                let key = r
                    .required(
                        cx,
                        "key",
                        Some(format!("e.g. `key = \"certs/{name}.key\"`")),
                    )
                    .and_then(|v| path_of(cx, v, &r.field("key"), "key"));
                match (cert, key) {
                    (Some(cert), Some(key)) => out.push(RegionTls {
                        region: name,
                        cert,
                        key,
                    }),
                    _ => ok = false,
                }
            }
        } else {
            ok = false;
        }
    }
    // Every gateway needs its certificate.
    for r in regions.iter().filter(|r| r.gateway.is_some()) {
        let named = o
            .get("regions")
            .and_then(|v| v.get_ref().as_table())
            .is_some_and(|t| t.contains_key(r.name.as_str()));
        if !named {
            cx.err(
                o.at,
                &format!("tls.regions.{}", r.name),
                format!("region `{}` has a gateway but no certificate", r.name),
                Some(format!(
                    "add `[tls.regions.{}]` with `cert` and `key`",
                    r.name
                )),
            );
            ok = false;
        }
    }
    Some(Tls {
        ca: ca?,
        regions: out,
    })
    .filter(|_| ok)
}
