//! Moving a rule to another region: the requests an operator (`ferry failover`, `ferry
//! drill`, the simulator's operator) sends to the gateways' admin APIs, and the rules the
//! target applies before it promotes itself.
//!
//! A planned switchover fences the old primary (its log ends and epoch histories are then
//! final: [`FenceRequest`]), has the target catch up to exactly that log ([`not_caught_up`]) and
//! promote itself ([`PromoteRequest`]), and has every other region adopt the new epoch
//! ([`AdoptRequest`]); when it gives up it unfences the old primary. A forced one promotes the
//! target once the old primary's lease has surely run out. Either way a promotion is refused
//! once the rule has moved into its epoch's block since the operator read the state
//! ([`moved_on`]): a switchover waiting for catch-up never overrides a promotion that happened
//! meanwhile (simulator finding 6).
//!
//! Owns: the request bodies (JSON on the admin API) and those rules. Does not own: serving the
//! requests ([`crate::mirror::admin`]), the state they change ([`super::RegionState`]), the
//! lease that decides a forced promotion ([`super::lease`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::RuleState;
use crate::log::epochs::divergence;
use crate::log::EpochEntry;

/// `POST /v1/fence`: fence (or unfence) this region's rules.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FenceRequest {
    pub patterns: Vec<String>,
    #[serde(default = "yes")]
    pub fenced: bool,
    /// When fencing under lease fencing: lift the fence by itself after this many ms unless
    /// the rule moved (a switchover that did not finish). Ignored otherwise.
    #[serde(default)]
    pub lapse_ms: Option<u64>,
}

fn yes() -> bool {
    true
}

/// `POST /v1/promote`: make the target primary of a rule at `epoch`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromoteRequest {
    pub pattern: String,
    pub epoch: i32,
    /// The primary being replaced.
    pub from: String,
    /// Planned: the log ends to reach first (topic → per partition).
    #[serde(default)]
    pub wait_for: BTreeMap<String, Vec<i64>>,
    /// Planned: the fenced primary's epoch histories at those ends (topic → per partition):
    /// the new primary's log must be a prefix of its, not merely as long (simulator finding 9).
    #[serde(default)]
    pub wait_epochs: BTreeMap<String, Vec<Vec<EpochEntry>>>,
    #[serde(default)]
    pub force: bool,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Planned: do not promote after this time (Unix ms), well before the fenced primary's
    /// fence lapses (`FenceRequest::lapse_ms`).
    #[serde(default)]
    pub not_after_ms: Option<u64>,
}

fn default_timeout() -> u64 {
    60_000
}

/// `POST /v1/adopt`: take a newer rule state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdoptRequest {
    pub pattern: String,
    pub state: RuleState,
    /// Take a state that makes this region primary without the checks a switchover makes
    /// (`/v1/promote` makes them). Refused without it.
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/cut`: cut (or heal) the link to a peer (drills).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CutRequest {
    pub peer: String,
    #[serde(default = "yes")]
    pub cut: bool,
}

/// Whether a rule now at `current` has moved on since a promotion to `promoting` began: any
/// promotion since then took an epoch in `promoting`'s block of 256 or a later one
/// ([`super::next_epoch`]).
pub fn moved_on(current: i32, promoting: i32) -> bool {
    (current >> 8) >= (promoting >> 8)
}

/// The partitions of `wait_for` where the target does not yet hold the fenced primary's log:
/// shorter, or (when its history is known) leaving that history before its end (finding 9).
/// `have(topic, partition)` is the target's log end and epoch history. Described for errors.
pub fn not_caught_up(
    have: impl Fn(&str, usize) -> Option<(i64, Vec<EpochEntry>)>,
    wait_for: &BTreeMap<String, Vec<i64>>,
    wait_epochs: &BTreeMap<String, Vec<Vec<EpochEntry>>>,
) -> Vec<String> {
    let mut behind = Vec::new();
    for (t, want) in wait_for {
        for (i, w) in want.iter().enumerate() {
            let mine = have(t, i);
            let end = mine.as_ref().map_or(0, |m| m.0);
            if end < *w {
                behind.push(format!("{t}-{i} (at {end}, want {w})"));
                continue;
            }
            if let (Some((end, hist)), Some(theirs)) =
                (mine, wait_epochs.get(t).and_then(|e| e.get(i)))
            {
                let d = divergence(theirs, *w, &hist, end);
                if d < *w {
                    behind.push(format!(
                        "{t}-{i} (leaves the fenced primary's history at {d}, want {w})"
                    ));
                }
            }
        }
    }
    behind
}

/// How long ago (ms) a planned promotion's window closed at `now_ms`, if it did: the fenced
/// primary's fence is about to lapse, and promoting now could race it.
pub fn too_late(not_after_ms: Option<u64>, now_ms: u64) -> Option<u64> {
    not_after_ms.filter(|t| now_ms > *t).map(|t| now_ms - t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(entries: &[(i32, i64)]) -> Vec<EpochEntry> {
        entries
            .iter()
            .map(|(epoch, start_offset)| EpochEntry {
                epoch: *epoch,
                start_offset: *start_offset,
            })
            .collect()
    }

    /// Finding 9: the target must hold the fenced primary's records, not just as many.
    #[test]
    fn finding_9_a_switchover_target_must_hold_the_fenced_primarys_records() {
        let want = BTreeMap::from([("t".to_string(), vec![150])]);
        let primary = BTreeMap::from([("t".to_string(), vec![h(&[(0, 0), (769, 100)])])]);
        let at =
            |end: i64, hist: Vec<EpochEntry>| move |_: &str, _: usize| Some((end, hist.clone()));
        assert_eq!(
            not_caught_up(at(120, h(&[(0, 0), (769, 100)])), &want, &primary).len(),
            1,
            "short"
        );
        assert!(not_caught_up(at(150, h(&[(0, 0), (769, 100)])), &want, &primary).is_empty());
        let b = not_caught_up(at(200, h(&[(0, 0), (512, 100)])), &want, &primary);
        assert!(
            b[0].contains("leaves the fenced primary's history at 100"),
            "{b:?}"
        );
        // Without the fenced primary's history (an older operator), the ends decide.
        assert!(not_caught_up(at(150, h(&[(0, 0)])), &want, &BTreeMap::new()).is_empty());
        assert_eq!(not_caught_up(|_, _| None, &want, &primary).len(), 1);
    }

    /// Finding 6 (the operator's part): a promotion is refused once the rule moved into its
    /// epoch's block.
    #[test]
    fn finding_6_a_promotion_never_overrides_one_that_happened_meanwhile() {
        // Began at epoch 0 to make south (index 2) primary at 258.
        assert!(!moved_on(0, 258));
        // West promoted itself meanwhile: 257.
        assert!(moved_on(257, 258));
        assert!(moved_on(513, 258));
    }

    #[test]
    fn a_promotion_after_its_window_is_too_late() {
        assert_eq!(too_late(None, 10), None);
        assert_eq!(too_late(Some(10), 10), None);
        assert_eq!(too_late(Some(10), 15), Some(5));
    }
}
