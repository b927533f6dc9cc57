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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdoptRequest {
    pub pattern: String,
    pub state: RuleState,
    /// Take a state that makes this region primary without the checks a switchover makes
    /// (`/v1/promote` makes them). Refused without it.
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/cut`: cut (or heal) the link to a peer (drills).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

/// What a fenced primary answers (`POST /v1/fence`): its log ends and epoch histories, final
/// while it is fenced (pattern → topic → per partition).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FenceAnswer {
    pub fenced: bool,
    #[serde(default)]
    pub fence_until_ms: Option<u64>,
    #[serde(default)]
    pub ends: BTreeMap<String, BTreeMap<String, Vec<i64>>>,
    #[serde(default)]
    pub epochs: BTreeMap<String, BTreeMap<String, Vec<Vec<EpochEntry>>>>,
    /// Transactional ids whose transactions were still open at the fence and were aborted
    /// (the fence waits a bounded time for them to end first).
    #[serde(default)]
    pub aborted_transactions: Vec<String>,
}

/// Where an operator's move of a rule begins.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// The target is the primary already.
    Already { epoch: i32 },
    /// The target is the primary but fenced (a switchover that did not finish and whose
    /// unfence failed: finding 10): lifting the fence is the whole move.
    Unfence { epoch: i32, request: FenceRequest },
    /// Move the rule.
    Move(Switchover),
}

/// Plan moving rule `pattern` (whose regions are `regions`) to `to`, from the rule's state as
/// each reachable region knows it (`states`; the newest names the primary to replace).
/// `window_ms`: the longest the operator waits for the promotion (a planned switchover's fence
/// lapses after twice that, and the target may promote only in the first half).
#[allow(clippy::too_many_arguments)]
pub fn plan(
    pattern: &str,
    regions: &[String],
    to: &str,
    to_index: usize,
    states: &BTreeMap<String, RuleState>,
    force: bool,
    window_ms: u64,
    timeout_ms: u64,
) -> Result<Plan, String> {
    let Some(target) = states.get(to) else {
        return Err(format!(
            "the gateway of `{to}` does not answer on its admin address: it cannot be promoted"
        ));
    };
    let newest = states
        .values()
        .max_by_key(|s| s.epoch)
        .expect("at least the target");
    if newest.primary == to {
        return Ok(if target.fenced && target.primary == to {
            Plan::Unfence {
                epoch: newest.epoch,
                request: FenceRequest {
                    patterns: vec![pattern.to_string()],
                    fenced: false,
                    lapse_ms: None,
                },
            }
        } else {
            Plan::Already {
                epoch: newest.epoch,
            }
        });
    }
    Ok(Plan::Move(Switchover {
        pattern: pattern.to_string(),
        regions: regions.to_vec(),
        from: newest.primary.clone(),
        to: to.to_string(),
        epoch: super::next_epoch(newest.epoch, to_index),
        force,
        window_ms,
        timeout_ms,
        phase: Phase::Start,
        failure: None,
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    Fencing,
    Promoting,
    Unfencing,
    Over,
}

/// One rule's move, as the operator runs it: each [`Step`] is a request to a region's admin
/// API (or the simulator's model of it); its outcome goes back in, the next step comes out.
#[derive(Debug, Clone, PartialEq)]
pub struct Switchover {
    pub pattern: String,
    /// Every region of the rule.
    pub regions: Vec<String>,
    /// The primary being replaced, and its replacement at `epoch`.
    pub from: String,
    pub to: String,
    pub epoch: i32,
    /// Forced: no fence, no catch-up; the target waits for the old primary's lease instead.
    pub force: bool,
    window_ms: u64,
    timeout_ms: u64,
    phase: Phase,
    failure: Option<String>,
}

/// What the operator does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Fence the old primary; feed the answer to [`Switchover::fenced`].
    Fence {
        region: String,
        request: FenceRequest,
    },
    /// Have the target promote itself (it waits up to `timeout_ms`); feed the outcome to
    /// [`Switchover::promoted`].
    Promote {
        region: String,
        request: PromoteRequest,
    },
    /// Tell every other region of the rule (the heartbeats would carry it too); the move is
    /// done. A region that does not answer learns it from the heartbeats.
    Adopt {
        regions: Vec<String>,
        request: AdoptRequest,
    },
    /// Give the old primary its writes back (the move gave up); feed the outcome to
    /// [`Switchover::unfenced`].
    Unfence {
        region: String,
        request: FenceRequest,
    },
    /// The move failed: the rule stays where it was. Why, for the operator.
    Failed(String),
}

impl Switchover {
    /// The first step: fence the old primary (planned), or promote the target (forced).
    pub fn start(&mut self) -> Step {
        assert_eq!(self.phase, Phase::Start, "a switchover starts once");
        if self.force {
            self.phase = Phase::Promoting;
            return Step::Promote {
                region: self.to.clone(),
                request: PromoteRequest {
                    pattern: self.pattern.clone(),
                    epoch: self.epoch,
                    from: self.from.clone(),
                    wait_for: BTreeMap::new(),
                    wait_epochs: BTreeMap::new(),
                    force: true,
                    timeout_ms: self.timeout_ms,
                    not_after_ms: None,
                },
            };
        }
        self.phase = Phase::Fencing;
        Step::Fence {
            region: self.from.clone(),
            request: FenceRequest {
                patterns: vec![self.pattern.clone()],
                fenced: true,
                lapse_ms: Some(2 * self.window_ms),
            },
        }
    }

    /// The old primary's answer to the fence: its final ends are what the target must reach.
    pub fn fenced(&mut self, answer: Result<FenceAnswer, String>) -> Step {
        assert_eq!(self.phase, Phase::Fencing, "a fence answers a fence");
        let a = match answer {
            Ok(a) => a,
            Err(e) => {
                self.phase = Phase::Over;
                return Step::Failed(format!(
                    "fencing `{}`: {e} (if `{}` is gone, use --force)",
                    self.from, self.from
                ));
            }
        };
        self.phase = Phase::Promoting;
        Step::Promote {
            region: self.to.clone(),
            request: PromoteRequest {
                pattern: self.pattern.clone(),
                epoch: self.epoch,
                from: self.from.clone(),
                wait_for: a.ends.get(&self.pattern).cloned().unwrap_or_default(),
                wait_epochs: a.epochs.get(&self.pattern).cloned().unwrap_or_default(),
                force: false,
                timeout_ms: self.timeout_ms,
                not_after_ms: a.fence_until_ms.map(|t| t.saturating_sub(self.window_ms)),
            },
        }
    }

    /// The target's promotion: done (every other region adopts), or given up (a planned move
    /// unfences the old primary first).
    pub fn promoted(&mut self, outcome: Result<(), String>) -> Step {
        assert_eq!(
            self.phase,
            Phase::Promoting,
            "a promotion answers a promotion"
        );
        match outcome {
            Ok(()) => {
                self.phase = Phase::Over;
                Step::Adopt {
                    regions: self
                        .regions
                        .iter()
                        .filter(|r| **r != self.to)
                        .cloned()
                        .collect(),
                    request: AdoptRequest {
                        pattern: self.pattern.clone(),
                        state: RuleState::open(self.epoch, self.to.clone()),
                        force: false,
                    },
                }
            }
            Err(e) if self.force => {
                self.phase = Phase::Over;
                Step::Failed(format!("promoting `{}`: {e}", self.to))
            }
            Err(e) => {
                self.phase = Phase::Unfencing;
                self.failure = Some(format!("promoting `{}`: {e}", self.to));
                Step::Unfence {
                    region: self.from.clone(),
                    request: FenceRequest {
                        patterns: vec![self.pattern.clone()],
                        fenced: false,
                        lapse_ms: None,
                    },
                }
            }
        }
    }

    /// The old primary's unfence after a move that gave up (it may be unreachable by now: then
    /// say so rather than claim it was unfenced).
    pub fn unfenced(&mut self, outcome: Result<(), String>) -> Step {
        assert_eq!(
            self.phase,
            Phase::Unfencing,
            "an unfence answers an unfence"
        );
        self.phase = Phase::Over;
        let why = self.failure.take().unwrap_or_default();
        let (from, pattern) = (&self.from, &self.pattern);
        Step::Failed(match outcome {
            Ok(()) => format!("{why}; `{from}` was unfenced and stays primary"),
            Err(u) => format!(
                "{why}; unfencing `{from}` failed too ({u}): it stays primary but fenced, taking \
                 no writes for `{pattern}` until its fence lapses; once it answers, run \
                 `ferry failover --to {from}` to unfence it (or move the rule elsewhere)"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::log::epochs::history as h;

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

    fn states(entries: &[(&str, i32, &str, bool)]) -> BTreeMap<String, RuleState> {
        entries
            .iter()
            .map(|(r, epoch, primary, fenced)| {
                (
                    r.to_string(),
                    RuleState {
                        fenced: *fenced,
                        ..RuleState::open(*epoch, *primary)
                    },
                )
            })
            .collect()
    }

    fn regions() -> Vec<String> {
        vec!["east".into(), "west".into(), "south".into()]
    }

    #[test]
    fn a_planned_switchover_fences_catches_up_promotes_and_has_the_others_adopt() {
        let st = states(&[("east", 0, "east", false), ("west", 0, "east", false)]);
        let Plan::Move(mut op) =
            plan("*", &regions(), "west", 1, &st, false, 10_000, 8_000).unwrap()
        else {
            panic!("a move")
        };
        assert_eq!((op.from.as_str(), op.epoch), ("east", 257));
        let Step::Fence { region, request } = op.start() else {
            panic!("fence first")
        };
        assert_eq!((region.as_str(), request.lapse_ms), ("east", Some(20_000)));
        let answer = FenceAnswer {
            fenced: true,
            fence_until_ms: Some(50_000),
            ends: BTreeMap::from([("*".into(), BTreeMap::from([("t".into(), vec![7])]))]),
            epochs: BTreeMap::new(),
            aborted_transactions: Vec::new(),
        };
        let Step::Promote { region, request } = op.fenced(Ok(answer)) else {
            panic!("then promote")
        };
        assert_eq!(region, "west");
        assert_eq!(request.wait_for["t"], vec![7]);
        assert_eq!(request.not_after_ms, Some(40_000));
        assert!(!request.force);
        let Step::Adopt { regions, request } = op.promoted(Ok(())) else {
            panic!("then adopt")
        };
        assert_eq!(regions, vec!["east".to_string(), "south".to_string()]);
        assert_eq!(request.state, RuleState::open(257, "west"));
    }

    /// Finding 10: a switchover that gives up unfences the old primary, and says so when that
    /// fails too.
    #[test]
    fn finding_10_a_switchover_that_gives_up_unfences_and_says_when_it_could_not() {
        let st = states(&[("east", 0, "east", false), ("west", 0, "east", false)]);
        let Plan::Move(mut op) = plan("*", &regions(), "west", 1, &st, false, 10, 10).unwrap()
        else {
            panic!("a move")
        };
        op.start();
        op.fenced(Ok(FenceAnswer::default()));
        let Step::Unfence { region, request } = op.promoted(Err("not caught up".into())) else {
            panic!("unfence")
        };
        assert_eq!((region.as_str(), request.fenced), ("east", false));
        let Step::Failed(m) = op.unfenced(Err("unreachable".into())) else {
            panic!("failed")
        };
        assert!(
            m.contains("not caught up") && m.contains("stays primary but fenced"),
            "{m}"
        );
    }

    #[test]
    fn a_forced_failover_promotes_at_once_and_the_newest_state_names_the_old_primary() {
        // South knows west took over (257); east, the topology's primary, is gone.
        let st = states(&[("west", 257, "west", false), ("south", 257, "west", false)]);
        let Plan::Move(mut op) = plan("*", &regions(), "south", 2, &st, true, 10, 10).unwrap()
        else {
            panic!("a move")
        };
        assert_eq!((op.from.as_str(), op.epoch), ("west", 514));
        let Step::Promote { request, .. } = op.start() else {
            panic!("promote")
        };
        assert!(request.force && request.wait_for.is_empty());
        assert!(matches!(op.promoted(Err("lease".into())), Step::Failed(_)));
    }

    #[test]
    fn moving_to_the_primary_is_nothing_or_lifts_its_leftover_fence() {
        let st = states(&[("east", 0, "east", false)]);
        assert_eq!(
            plan("*", &regions(), "east", 0, &st, false, 1, 1),
            Ok(Plan::Already { epoch: 0 })
        );
        let st = states(&[("east", 0, "east", true)]);
        assert!(matches!(
            plan("*", &regions(), "east", 0, &st, false, 1, 1),
            Ok(Plan::Unfence { .. })
        ));
        assert!(plan("*", &regions(), "west", 1, &st, false, 1, 1).is_err());
    }
}
