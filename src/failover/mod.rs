//! Failover: which region is primary for each topic rule, at which epoch, and whether it may
//! take writes now.
//!
//! The unit of failover is a `[[topics]]` rule of the topology (a group of topics sharing a
//! primary). The topology names each rule's first primary; every change after that is a
//! [`RuleState`] with a region epoch that only grows, kept durably by every region's broker
//! (`<data dir>/.ferry/failover.json`). The epoch is stamped into the partition leader epoch
//! field of every batch the primary writes, so any two regions can find where their copies of a
//! partition part ([`crate::log::epochs::divergence`]).
//!
//! Owns: the durable per-rule state and the pure rules for changing it ([`RegionState::apply`]),
//! the resolution of a topic to its current placement ([`placement`]), and the lease machine
//! ([`lease`]) that fences a primary cut off from its peers. Does not own: moving the state
//! between regions (the gateway, [`crate::mirror`]) or the commands that drive it
//! ([`crate::cli`]).

pub mod lease;
pub mod switchover;

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::topology::{ReplicationMode, TopicRule, Topology};

/// The state of one topic rule after (or before) failovers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleState {
    /// Grows by one at every change of primary; 0 is the topology's own primary.
    pub epoch: i32,
    pub primary: String,
    /// The primary takes no writes (a switchover is moving the rule away from it).
    #[serde(default)]
    pub fenced: bool,
    /// While fenced: when the fence lapses by itself (Unix ms, on the fenced primary's clock)
    /// if the switchover that set it has not moved the rule by then. Lease fencing only (the
    /// primary still writes only under a majority's lease after it lapses); `None`: no lapse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_until_ms: Option<u64>,
}

impl RuleState {
    /// A rule at `epoch` whose primary takes writes.
    pub fn open(epoch: i32, primary: impl Into<String>) -> RuleState {
        RuleState {
            epoch,
            primary: primary.into(),
            fenced: false,
            fence_until_ms: None,
        }
    }

    /// Whether the fence has lapsed at `now_ms` (Unix ms).
    pub fn fence_lapsed(&self, now_ms: u64) -> bool {
        self.fenced && self.fence_until_ms.is_some_and(|t| now_ms >= t)
    }
}

/// What a region knows of every rule. Rules it has no entry for are as the topology says.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionState {
    #[serde(default)]
    pub rules: BTreeMap<String, RuleState>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StateError {
    #[error("no topic rule has the pattern '{0}'")]
    UnknownRule(String),
    #[error("region '{region}' is not one of the regions of rule '{pattern}'")]
    NotInRule { pattern: String, region: String },
    #[error("rule '{pattern}' is at epoch {have}; epoch {got} would go back")]
    EpochBack {
        pattern: String,
        have: i32,
        got: i32,
    },
    #[error("rule '{pattern}' epoch {epoch} already belongs to '{have}', not '{got}'")]
    EpochTaken {
        pattern: String,
        epoch: i32,
        have: String,
        got: String,
    },
}

/// The epoch a region takes when it becomes primary after `current`: the next multiple of 256,
/// plus the region's position in the topology. Two regions promoted from the same state (say an
/// automatic promotion not yet heard of, and an operator's switchover elsewhere) therefore never
/// take the same epoch, so each epoch is written by exactly one region, which is what
/// [`crate::log::epochs::divergence`] relies on, and every region converges on the greater one
/// (found by the simulator, docs/simulations.md, finding 6).
/// The region (its position in the topology) that took `epoch` with [`next_epoch`] (in a region
/// cluster also every leader epoch takes that form, so a batch's epoch names its region).
/// Epoch 0, every rule's first, is the topology's first region's form.
pub fn epoch_region(epoch: i32) -> usize {
    (epoch & 0xff) as usize
}

pub fn next_epoch(current: i32, region_index: usize) -> i32 {
    assert!(region_index < 256, "at most 256 regions");
    let next = (((current >> 8) + 1) << 8) | region_index as i32;
    assert!(next > current, "epochs only grow");
    next
}

/// The position of `region` in the topology (file order).
pub fn region_index(topology: &Topology, region: &str) -> usize {
    topology
        .regions
        .iter()
        .position(|r| r.name == region)
        .unwrap_or(0)
}

/// The regions of a rule: its first primary, then its mirrors, in file order.
pub fn rule_regions(rule: &TopicRule) -> Vec<String> {
    std::iter::once(rule.primary.clone())
        .chain(rule.mirrors.iter().cloned())
        .collect()
}

impl RegionState {
    /// Load from `path`; a missing file is the topology's initial state.
    pub fn load(path: &Path) -> io::Result<RegionState> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(RegionState::default()),
            Err(e) => Err(e),
        }
    }

    /// Write durably (temporary file, fsync, rename, fsync of the directory).
    pub fn store(&self, path: &Path) -> io::Result<()> {
        let b = serde_json::to_vec_pretty(self).expect("serialisable");
        crate::durable::write_atomic(path, &b)
    }

    /// The current state of the rule with `pattern`.
    pub fn rule(&self, topology: &Topology, pattern: &str) -> Option<RuleState> {
        let rule = topology.topics.iter().find(|r| r.pattern == pattern)?;
        Some(
            self.rules
                .get(pattern)
                .cloned()
                .unwrap_or_else(|| RuleState::open(0, rule.primary.clone())),
        )
    }

    /// Move a rule to `new`. The epoch never goes back; one epoch has one primary; the
    /// primary is one of the rule's regions. Returns whether anything changed.
    pub fn apply(
        &mut self,
        topology: &Topology,
        pattern: &str,
        new: RuleState,
    ) -> Result<bool, StateError> {
        let rule = topology
            .topics
            .iter()
            .find(|r| r.pattern == pattern)
            .ok_or_else(|| StateError::UnknownRule(pattern.to_string()))?;
        if !rule_regions(rule).contains(&new.primary) {
            return Err(StateError::NotInRule {
                pattern: pattern.to_string(),
                region: new.primary,
            });
        }
        let have = self.rule(topology, pattern).expect("rule exists");
        if new.epoch < have.epoch {
            return Err(StateError::EpochBack {
                pattern: pattern.to_string(),
                have: have.epoch,
                got: new.epoch,
            });
        }
        if new.epoch == have.epoch && new.primary != have.primary {
            return Err(StateError::EpochTaken {
                pattern: pattern.to_string(),
                epoch: new.epoch,
                have: have.primary,
                got: new.primary,
            });
        }
        if new == have {
            return Ok(false);
        }
        self.rules.insert(pattern.to_string(), new);
        Ok(true)
    }
}

/// Where a topic lives now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The rule's pattern (the unit of failover).
    pub pattern: String,
    pub epoch: i32,
    pub primary: String,
    /// Every other region of the rule, in file order.
    pub mirrors: Vec<String>,
    pub fenced: bool,
    pub mode: ReplicationMode,
    /// The primary the topology names (the region a failback returns to).
    pub home: String,
}

/// The placement of `topic`, or `None` for topics no rule covers (internal ones included).
pub fn placement(topology: &Topology, state: &RegionState, topic: &str) -> Option<Placement> {
    let rule = topology.rule_for_topic(topic)?;
    let st = state.rule(topology, &rule.pattern).expect("rule exists");
    Some(Placement {
        pattern: rule.pattern.clone(),
        epoch: st.epoch,
        mirrors: rule_regions(rule)
            .into_iter()
            .filter(|r| *r != st.primary)
            .collect(),
        primary: st.primary,
        fenced: st.fenced,
        mode: rule.mode,
        home: rule.primary.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo() -> Topology {
        crate::topology::parse(crate::topology::LOCAL_TOML, "local.toml", Path::new(".")).unwrap()
    }

    #[test]
    fn placement_follows_the_state_and_epochs_only_grow() {
        let t = topo();
        let mut s = RegionState::default();
        let p = placement(&t, &s, "orders").unwrap();
        assert_eq!(
            (p.epoch, p.primary.as_str(), p.mirrors.clone()),
            (0, "east", vec!["west".to_string()])
        );
        assert!(placement(&t, &s, "__consumer_offsets").is_none());
        let west1 = RuleState::open(1, "west");
        assert_eq!(s.apply(&t, "*", west1.clone()), Ok(true));
        assert_eq!(s.apply(&t, "*", west1.clone()), Ok(false));
        let p = placement(&t, &s, "orders").unwrap();
        assert_eq!(
            (p.epoch, p.primary.as_str(), p.mirrors.clone()),
            (1, "west", vec!["east".to_string()])
        );
        assert_eq!(p.home, "east");
        let back = RuleState::open(0, "east");
        assert!(matches!(
            s.apply(&t, "*", back),
            Err(StateError::EpochBack { .. })
        ));
        let taken = RuleState::open(1, "east");
        assert!(matches!(
            s.apply(&t, "*", taken),
            Err(StateError::EpochTaken { .. })
        ));
        let nowhere = RuleState::open(2, "south");
        assert!(matches!(
            s.apply(&t, "*", nowhere),
            Err(StateError::NotInRule { .. })
        ));
    }

    #[test]
    fn promotions_from_the_same_state_never_share_an_epoch() {
        assert_eq!(next_epoch(0, 1), 257);
        assert_eq!(next_epoch(257, 0), 512);
        assert_eq!(next_epoch(257, 2), 514);
        assert_ne!(next_epoch(300, 1), next_epoch(300, 2));
        assert!(next_epoch(511, 0) > 511);
    }

    #[test]
    fn state_survives_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("failover.json");
        assert_eq!(RegionState::load(&path).unwrap(), RegionState::default());
        let t = topo();
        let mut s = RegionState::default();
        s.apply(
            &t,
            "*",
            RuleState {
                epoch: 3,
                primary: "west".into(),
                fenced: true,
                fence_until_ms: Some(1_800_000_000_000),
            },
        )
        .unwrap();
        s.store(&path).unwrap();
        assert_eq!(RegionState::load(&path).unwrap(), s);
        // A state file written before fences could lapse: no deadline, never lapses.
        std::fs::write(
            &path,
            r#"{"rules": {"*": {"epoch": 3, "primary": "west", "fenced": true}}}"#,
        )
        .unwrap();
        let old = RegionState::load(&path).unwrap().rule(&t, "*").unwrap();
        assert!(old.fenced && old.fence_until_ms.is_none() && !old.fence_lapsed(u64::MAX));
    }

    #[test]
    fn a_fence_lapses_only_at_its_deadline_and_only_while_fenced() {
        let mut st = RuleState::open(3, "west");
        st.fence_until_ms = Some(1_000);
        assert!(!st.fence_lapsed(2_000), "not fenced: nothing to lapse");
        st.fenced = true;
        assert!(!st.fence_lapsed(999));
        assert!(st.fence_lapsed(1_000) && st.fence_lapsed(5_000));
    }
}
