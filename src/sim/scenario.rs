//! Scenario files (`simulations/*.toml`): topology, workload, fault mix, duration and the
//! invariants to check, parsed with serde + toml into [`Scenario`].
//!
//! Owns: the scenario format, its defaults and validation, and the generated topology text that
//! turns a scenario's `[topology]` into a real [`crate::topology::Topology`] (parsed by
//! [`crate::topology::parse`], so the simulator runs the production failover rules against a
//! topology the production validator accepted). Does not own: running a scenario
//! ([`super::world`]).

use std::collections::BTreeSet;
use std::path::Path;

use serde::Deserialize;

use super::SimError;
use crate::topology::Topology;

/// The topic every scenario writes (matched by the generated `*` rule).
pub const TOPIC: &str = "events";

/// A parsed and validated scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Defaults to the file stem.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// How long the workload and the faults run (simulated).
    #[serde(deserialize_with = "duration_ms")]
    pub duration: u64,
    /// After `duration`: faults stop, every region restarts and every link heals, producers
    /// stop; the run continues this long so mirrors and consumers can catch up.
    #[serde(default = "default_settle", deserialize_with = "duration_ms")]
    pub settle: u64,
    pub topology: TopologySpec,
    #[serde(default)]
    pub links: LinkSpec,
    #[serde(default)]
    pub workload: Workload,
    #[serde(default)]
    pub faults: Faults,
    #[serde(default)]
    pub invariants: Invariants,
}

fn default_settle() -> u64 {
    40_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologySpec {
    /// Region names; the first is the rule's first primary, the rest its mirrors (file order).
    pub regions: Vec<String>,
    /// `async` or `sync`.
    #[serde(default = "default_mode")]
    pub mode: String,
    /// `lease` or `none`.
    #[serde(default = "default_fencing")]
    pub fencing: String,
    #[serde(default = "default_lease", deserialize_with = "duration_ms")]
    pub lease: u64,
    #[serde(default = "default_heartbeat", deserialize_with = "duration_ms")]
    pub heartbeat: u64,
    /// `manual` or `automatic`.
    #[serde(default = "default_promotion")]
    pub promotion: String,
    #[serde(default = "default_partitions")]
    pub partitions: u32,
}

fn default_mode() -> String {
    "async".into()
}
fn default_fencing() -> String {
    "lease".into()
}
fn default_lease() -> u64 {
    10_000
}
fn default_heartbeat() -> u64 {
    2_000
}
fn default_promotion() -> String {
    "manual".into()
}
fn default_partitions() -> u32 {
    2
}

/// Network behaviour of every WAN link (between two regions' gateways).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    #[serde(default = "default_rtt", deserialize_with = "duration_ms")]
    pub rtt: u64,
    /// Extra one-way delay, uniform in `0..=jitter` per message (reorders messages).
    #[serde(default, deserialize_with = "duration_ms")]
    pub jitter: u64,
    /// Probability that a message is lost (and retransmitted by the sender's timer).
    #[serde(default)]
    pub loss: f64,
    /// Probability that a message is delivered twice.
    #[serde(default)]
    pub duplicate: f64,
}

fn default_rtt() -> u64 {
    40
}

impl Default for LinkSpec {
    fn default() -> Self {
        LinkSpec {
            rtt: default_rtt(),
            jitter: 0,
            loss: 0.0,
            duplicate: 0.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Producers (each `acks=all`, writing to the current primary).
    #[serde(default = "one")]
    pub producers: u32,
    /// Records per second per producer.
    #[serde(default = "default_rate")]
    pub rate: u32,
    #[serde(default = "default_record_bytes")]
    pub record_bytes: u32,
    /// Consumer groups (each one consumer reading every partition from the primary).
    #[serde(default = "one")]
    pub consumer_groups: u32,
    #[serde(default = "default_commit", deserialize_with = "duration_ms")]
    pub commit_interval: u64,
    #[serde(default = "default_poll", deserialize_with = "duration_ms")]
    pub poll_interval: u64,
}

fn one() -> u32 {
    1
}
fn default_rate() -> u32 {
    100
}
fn default_record_bytes() -> u32 {
    512
}
fn default_commit() -> u64 {
    1_000
}
fn default_poll() -> u64 {
    50
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            producers: 1,
            rate: default_rate(),
            record_bytes: default_record_bytes(),
            consumer_groups: 1,
            commit_interval: default_commit(),
            poll_interval: default_poll(),
        }
    }
}

/// The fault mix. `*_every` is the mean time between two faults of that kind (exponential
/// inter-arrival times drawn from the seed); absent means never.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Each region's clock runs at a rate in `1 ± clock_drift` (the lease tolerates a rate
    /// difference of 10 %, so keep this at or under 0.04).
    #[serde(default)]
    pub clock_drift: f64,
    #[serde(default, deserialize_with = "opt_duration_ms")]
    pub cut_every: Option<u64>,
    #[serde(default = "default_cut_for", deserialize_with = "duration_ms")]
    pub cut_for: u64,
    /// Cut every link of one region at once (a region isolated from the others).
    #[serde(default, deserialize_with = "opt_duration_ms")]
    pub isolate_every: Option<u64>,
    #[serde(default = "default_cut_for", deserialize_with = "duration_ms")]
    pub isolate_for: u64,
    #[serde(default, deserialize_with = "opt_duration_ms")]
    pub crash_every: Option<u64>,
    #[serde(default = "default_down_for", deserialize_with = "duration_ms")]
    pub down_for: u64,
    /// Probability that an fsync fails (the process then exits, as after any failed fsync).
    #[serde(default)]
    pub fsync_failure: f64,
    /// Probability that an append fails (the produce is answered with an error).
    #[serde(default)]
    pub append_failure: f64,
    #[serde(default, deserialize_with = "opt_duration_ms")]
    pub switchover_every: Option<u64>,
    #[serde(default, deserialize_with = "opt_duration_ms")]
    pub forced_failover_every: Option<u64>,
    /// One forced failover at this moment (in addition to `forced_failover_every`).
    #[serde(default, deserialize_with = "opt_duration_ms")]
    pub forced_failover_at: Option<u64>,
    /// Region loss: the primary is cut from every peer and crashes, an operator forces a
    /// failover, and the region comes back (rejoins) after `region_loss_for`.
    #[serde(default, deserialize_with = "opt_duration_ms")]
    pub region_loss_every: Option<u64>,
    #[serde(default = "default_loss_for", deserialize_with = "duration_ms")]
    pub region_loss_for: u64,
}

fn default_cut_for() -> u64 {
    5_000
}
fn default_down_for() -> u64 {
    5_000
}
fn default_loss_for() -> u64 {
    20_000
}

/// Which invariants to check (all by default).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Invariants {
    #[serde(default = "all_invariants")]
    pub check: Vec<String>,
}

/// Every invariant name.
pub const INVARIANTS: &[&str] = &[
    "acked-not-lost",
    "no-divergence",
    "single-writer",
    "consumer-no-skip",
    "lag-zero",
    "offsets-increase",
];

fn all_invariants() -> Vec<String> {
    INVARIANTS.iter().map(|s| s.to_string()).collect()
}

impl Default for Invariants {
    fn default() -> Self {
        Invariants {
            check: all_invariants(),
        }
    }
}

impl Invariants {
    pub fn on(&self, name: &str) -> bool {
        self.check.iter().any(|c| c == name)
    }
}

fn duration_ms<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let s = String::deserialize(d)?;
    crate::units::parse_duration(&s)
        .map(|d| d.as_millis() as u64)
        .map_err(serde::de::Error::custom)
}

fn opt_duration_ms<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    duration_ms(d).map(Some)
}

impl Scenario {
    /// Read and validate `path`; every error names the file.
    pub fn load(path: &Path) -> Result<Scenario, SimError> {
        let text = std::fs::read_to_string(path).map_err(|e| SimError::Scenario {
            file: path.display().to_string(),
            message: format!("cannot read: {e}"),
        })?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Scenario::parse(&text, &path.display().to_string(), &stem)
    }

    /// Parse scenario text; `file` names it in errors, `stem` is the default name.
    pub fn parse(text: &str, file: &str, stem: &str) -> Result<Scenario, SimError> {
        let err = |message: String| SimError::Scenario {
            file: file.to_string(),
            message,
        };
        let mut s: Scenario = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        if s.name.is_empty() {
            s.name = stem.to_string();
        }
        s.validate().map_err(err)?;
        // The topology must pass the production validator.
        s.build_topology().map_err(|e| SimError::Scenario {
            file: file.to_string(),
            message: e,
        })?;
        Ok(s)
    }

    fn validate(&self) -> Result<(), String> {
        let t = &self.topology;
        if t.regions.len() < 2 {
            return Err("topology.regions: at least two regions".into());
        }
        let uniq: BTreeSet<&String> = t.regions.iter().collect();
        if uniq.len() != t.regions.len() {
            return Err("topology.regions: region names must be unique".into());
        }
        for r in &t.regions {
            if r.is_empty() || !r.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return Err(format!(
                    "topology.regions: `{r}` is not a plain name (letters, digits, -)"
                ));
            }
        }
        if !(1..=64).contains(&t.partitions) {
            return Err("topology.partitions: 1 to 64".into());
        }
        for (name, p) in [
            ("links.loss", self.links.loss),
            ("links.duplicate", self.links.duplicate),
            ("faults.fsync_failure", self.faults.fsync_failure),
            ("faults.append_failure", self.faults.append_failure),
        ] {
            if !(0.0..0.5).contains(&p) {
                return Err(format!("{name}: a probability in [0, 0.5), got {p}"));
            }
        }
        if !(0.0..=0.2).contains(&self.faults.clock_drift) {
            return Err("faults.clock_drift: 0 to 0.2".into());
        }
        if self.duration == 0 || self.duration > 24 * 3_600_000 {
            return Err("duration: more than 0 and at most 24h".into());
        }
        if self.workload.rate == 0 || self.workload.rate > 100_000 {
            return Err("workload.rate: 1 to 100000 records/s".into());
        }
        if self.workload.poll_interval == 0 || self.workload.commit_interval == 0 {
            return Err("workload: poll_interval and commit_interval must be above 0".into());
        }
        for c in &self.invariants.check {
            if !INVARIANTS.contains(&c.as_str()) {
                return Err(format!(
                    "invariants.check: unknown invariant `{c}` (known: {})",
                    INVARIANTS.join(", ")
                ));
            }
        }
        for (name, v) in [
            ("faults.cut_every", self.faults.cut_every),
            ("faults.isolate_every", self.faults.isolate_every),
            ("faults.crash_every", self.faults.crash_every),
            ("faults.switchover_every", self.faults.switchover_every),
            (
                "faults.forced_failover_every",
                self.faults.forced_failover_every,
            ),
            ("faults.region_loss_every", self.faults.region_loss_every),
        ] {
            if v == Some(0) {
                return Err(format!("{name}: must be above 0"));
            }
        }
        Ok(())
    }

    /// The topology text this scenario stands for (dummy loopback addresses).
    pub fn topology_toml(&self) -> String {
        let t = &self.topology;
        let mut s = String::new();
        for (i, r) in t.regions.iter().enumerate() {
            let base = 20_000 + 10 * i;
            s += &format!(
                "[regions.{r}]\n[[regions.{r}.brokers]]\nid = 1\nlisten = \"127.0.0.1:{}\"\n\
                 [regions.{r}.gateway]\nquic = \"127.0.0.1:{}\"\nadmin = \"127.0.0.1:{}\"\n\n",
                base,
                base + 1,
                base + 2
            );
        }
        let mirrors: Vec<String> = t.regions[1..].iter().map(|m| format!("\"{m}\"")).collect();
        s += &format!(
            "[[topics]]\npattern = \"*\"\nprimary = \"{}\"\nmirrors = [{}]\nmode = \"{}\"\npartitions = {}\n\n",
            t.regions[0],
            mirrors.join(", "),
            t.mode,
            t.partitions
        );
        s += &format!(
            "[failover]\nfencing = \"{}\"\nlease = \"{}ms\"\nheartbeat = \"{}ms\"\npromotion = \"{}\"\n",
            t.fencing, t.lease, t.heartbeat, t.promotion
        );
        s
    }

    /// The production [`Topology`] for this scenario.
    pub fn build_topology(&self) -> Result<Topology, String> {
        crate::topology::parse(
            &self.topology_toml(),
            &format!("{} (generated topology)", self.name),
            Path::new("."),
        )
        .map_err(|errs| {
            errs.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        })
    }
}
