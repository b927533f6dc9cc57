//! Heartbeats and the lease: what a region tells its peers every `failover.heartbeat`, what it
//! makes of theirs, and the decisions that follow (adopt a newer epoch, promote itself, lift a
//! lapsed fence, renew the broker's write lease, report a forced promotion's loss).
//!
//! A heartbeat ([`Heartbeat`]) carries the sender's failover state, how long ago it heard from
//! each region, and the log ends and epoch histories of every rule-covered topic it holds. The
//! receiver answers at once with the heartbeat's send time as lease credit, or with 0 (no
//! credit) to a peer behind on some rule's epoch (a replaced primary that has not learnt it) or
//! back from a silence longer than a lease (findings 2 and 5, [`Lease::grants_credit`]); the
//! sender ignores a 0 (finding 1). A heartbeat carrying a newer epoch of a rule is adopted (the
//! peer is authenticated by mTLS): that is how a region that was away learns it was replaced.
//!
//! Owns: the [`Lease`], the set of regions replaced by a forced promotion (they count as
//! answering until they come back), the last heartbeat of each peer.
//! Does not own: the failover state (the caller's broker holds it, and applies what this module
//! decides through [`crate::failover::RegionState::apply`]), sending and receiving.
//!
//! Times are milliseconds on the caller's monotonic clock, except fence deadlines, which are on
//! its wall clock (Unix ms).

use std::collections::{BTreeMap, BTreeSet};

use crate::failover::lease::{Lease, LeaseConfig, Millis, DEFAULT_DRIFT};
use crate::failover::{self, RegionState, RuleState};
use crate::kafka::control::PartitionOffsets;
use crate::log::epochs::divergence;
use crate::log::EpochEntry;
use crate::topology::{Fencing, Promotion, Topology};

/// What a heartbeat carries (JSON in a STATE frame).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Heartbeat {
    pub region: String,
    pub state: RegionState,
    /// ms since the sender last heard from each region.
    pub report: BTreeMap<String, u64>,
    /// Log end offsets of every rule-covered topic the sender holds, per partition.
    pub ends: BTreeMap<String, Vec<i64>>,
    /// Their epoch histories, per partition: a forced failover's loss report compares them
    /// with the new primary's, which need not be a prefix of the old primary's log.
    #[serde(default)]
    pub epochs: BTreeMap<String, Vec<Vec<EpochEntry>>>,
    /// Config overrides of the topics the sender is primary for: its mirrors follow them.
    #[serde(default)]
    pub configs: BTreeMap<String, BTreeMap<String, String>>,
    /// Log start offsets of the topics the sender is primary for, per partition (moved by
    /// DeleteRecords): its mirrors move theirs up to them once they hold that far.
    #[serde(default)]
    pub starts: BTreeMap<String, Vec<i64>>,
    /// Sender's wall clock (for reports only; leases use monotonic time).
    pub unix_ms: i64,
}

/// The last heartbeat from a peer, and when it arrived (caller's monotonic ms).
#[derive(Debug, Clone)]
pub struct PeerReport {
    pub received: Millis,
    pub heartbeat: Heartbeat,
}

/// The answer to a peer's heartbeat, and what it changes here.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The STATE_ACK's `sent_at`: the heartbeat's send time, or 0 (no credit).
    pub credit: Millis,
    /// The peer is behind on some rule's epoch.
    pub stale: bool,
    /// The peer was heard again after a silence longer than its lease, and earns nothing yet.
    pub withheld: bool,
    /// The heartbeat names a region other than the peer's certificate: ignored past the answer.
    pub misnamed: bool,
    /// Newer rule states the peer knows, to apply here (pattern, state).
    pub adopt: Vec<(String, RuleState)>,
}

/// An automatic promotion due now. The caller ends its broker's write lease, applies `new`, and
/// then calls [`Liveness::promoted`] and sends a heartbeat to every peer at once (finding 6).
#[derive(Debug, Clone, PartialEq)]
pub struct AutoPromotion {
    pub pattern: String,
    /// The primary whose lease ran out.
    pub from: String,
    pub new: RuleState,
}

/// One partition a forced promotion may lose: the old primary last reported `reported_end`, and
/// its history leaves ours at `mirrored_end`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Loss {
    pub topic: String,
    pub partition: i32,
    pub reported_end: i64,
    pub mirrored_end: i64,
    pub records: i64,
}

/// One region's heartbeats and lease.
#[derive(Debug, Clone)]
pub struct Liveness {
    region: String,
    fencing: Fencing,
    promotion: Promotion,
    lease: Lease,
    replaced: BTreeSet<String>,
    reports: BTreeMap<String, PeerReport>,
    /// The lease loop's period (`heartbeat / 4`) and next deadline (`None` without lease
    /// fencing: there is no lease loop).
    step: Millis,
    next_tick: Option<Millis>,
}

impl Liveness {
    /// Region `region` of `topology`, its process started at `now`.
    pub fn new(topology: &Topology, region: &str, now: Millis) -> Liveness {
        let f = &topology.failover;
        let cfg = LeaseConfig {
            lease_ms: f.lease.as_millis() as u64,
            heartbeat_ms: f.heartbeat.as_millis() as u64,
            drift: DEFAULT_DRIFT,
        };
        let regions = topology.regions.iter().map(|r| r.name.clone()).collect();
        Liveness {
            region: region.to_string(),
            fencing: f.fencing,
            promotion: f.promotion,
            lease: Lease::new(region, regions, f.witness.clone(), cfg, now),
            replaced: BTreeSet::new(),
            reports: BTreeMap::new(),
            step: (f.heartbeat.as_millis() as Millis / 4).max(1),
            next_tick: (f.fencing == Fencing::Lease).then_some(now),
        }
    }

    /// When the lease loop must run next (caller's ms; `None`: never, without lease fencing).
    /// At it the caller runs, in order, [`Liveness::promotions`] (carrying out each and calling
    /// [`Liveness::promoted`]), [`lapsed_fences`] and [`Liveness::renewal`], then
    /// [`Liveness::on_timeout`].
    pub fn poll_timeout(&self) -> Option<Millis> {
        self.next_tick
    }

    /// The lease loop ran at `now`: it runs again a step (`heartbeat / 4`) later.
    pub fn on_timeout(&mut self, now: Millis) {
        if self.next_tick.is_some() {
            self.next_tick = Some(now + self.step);
        }
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Regions replaced by a forced promotion here that have not come back yet.
    pub fn replaced(&self) -> &BTreeSet<String> {
        &self.replaced
    }

    /// Each peer's last heartbeat.
    pub fn reports(&self) -> &BTreeMap<String, PeerReport> {
        &self.reports
    }

    /// Our heartbeat, as sent at `now`, from the broker's state and offsets (`offsets`: every
    /// rule-covered topic, mirrors included: a region promoted later may be judged by what it
    /// held before) and its topics' config overrides (`configs`: only those of topics this
    /// region is primary for go out).
    pub fn heartbeat(
        &self,
        topology: &Topology,
        now: Millis,
        state: &RegionState,
        offsets: &BTreeMap<String, Vec<PartitionOffsets>>,
        configs: &BTreeMap<String, BTreeMap<String, String>>,
        unix_ms: i64,
    ) -> Heartbeat {
        let primary_of = |t: &str| {
            failover::placement(topology, state, t).is_some_and(|p| p.primary == self.region)
        };
        Heartbeat {
            region: self.region.clone(),
            state: state.clone(),
            report: self.lease.report(now),
            ends: offsets
                .iter()
                .map(|(t, ps)| (t.clone(), ps.iter().map(|p| p.log_end).collect()))
                .collect(),
            epochs: offsets
                .iter()
                .map(|(t, ps)| (t.clone(), ps.iter().map(|p| p.epochs.clone()).collect()))
                .collect(),
            configs: configs
                .iter()
                .filter(|(t, _)| primary_of(t))
                .map(|(t, c)| (t.clone(), c.clone()))
                .collect(),
            starts: offsets
                .iter()
                .filter(|(t, _)| primary_of(t))
                .map(|(t, ps)| (t.clone(), ps.iter().map(|p| p.log_start).collect()))
                .collect(),
            unix_ms,
        }
    }

    /// A heartbeat from `peer` (its certificate's region), sent at `sent_at` on its clock,
    /// arrived at `now`; `ours` is this region's failover state.
    pub fn on_heartbeat(
        &mut self,
        topology: &Topology,
        ours: &RegionState,
        peer: &str,
        sent_at: Millis,
        hb: Heartbeat,
        now: Millis,
    ) -> Answer {
        let epoch_of = |s: &RegionState, pattern: &str| s.rule(topology, pattern).map(|r| r.epoch);
        let stale = topology.topics.iter().any(|r| {
            hb_epoch(&hb.state, topology, &r.pattern) < epoch_of(ours, &r.pattern).unwrap_or(0)
        });
        // The sum of our epochs grows whenever we learn a newer one: it closes no-credit
        // windows early (finding 2).
        let mark: i64 = topology
            .topics
            .iter()
            .map(|r| epoch_of(ours, &r.pattern).unwrap_or(0) as i64)
            .sum();
        let misnamed = hb.region != peer;
        let fresh = !misnamed && {
            self.lease.note_epoch_mark(mark);
            self.lease.on_heartbeat(peer, now, hb.report.clone());
            self.lease.grants_credit(peer, now)
        };
        let credit = if stale || !fresh { 0 } else { sent_at };
        let mut answer = Answer {
            credit,
            stale,
            withheld: !misnamed && !stale && !fresh,
            misnamed,
            adopt: Vec::new(),
        };
        if misnamed {
            return answer;
        }
        if !stale {
            self.replaced.remove(peer);
        }
        for (pattern, theirs) in &hb.state.rules {
            let Some(mine) = ours.rule(topology, pattern) else {
                continue;
            };
            if theirs.epoch > mine.epoch && theirs.primary != self.region {
                answer.adopt.push((
                    pattern.clone(),
                    RuleState::open(theirs.epoch, theirs.primary.clone()),
                ));
            }
        }
        self.reports.insert(
            peer.to_string(),
            PeerReport {
                received: now,
                heartbeat: hb,
            },
        );
        answer
    }

    /// A peer's STATE_ACK: credit for our heartbeat sent at `credit` (0: none, ignored; taking
    /// it as "sent at 0" once gave a restarted stale primary a lease: finding 1).
    pub fn on_ack(&mut self, peer: &str, credit: Millis) {
        if credit > 0 {
            self.lease.on_ack(peer, credit);
        }
    }

    /// Automatic promotions due at `now` (`promotion = "automatic"` under lease fencing): rules
    /// whose primary's lease has surely run out, when a real quorum (acknowledgements, not the
    /// credit of replaced regions: two sides of a partition never both promote themselves)
    /// agrees and this region is the first live one after the primary in the rule's order.
    pub fn promotions(
        &self,
        topology: &Topology,
        state: &RegionState,
        now: Millis,
    ) -> Vec<AutoPromotion> {
        if self.fencing != Fencing::Lease || self.promotion != Promotion::Automatic {
            return Vec::new();
        }
        let mut due = Vec::new();
        for rule in &topology.topics {
            let regions = failover::rule_regions(rule);
            if !regions.contains(&self.region) {
                continue;
            }
            let Some(cur) = state.rule(topology, &rule.pattern) else {
                continue;
            };
            if cur.primary == self.region {
                continue;
            }
            let l = &self.lease;
            let go = l.has_quorum(now)
                && l.may_take_over(&cur.primary, now)
                && l.preferred_successor(&cur.primary, &regions, now) == Some(&self.region);
            if go {
                let epoch =
                    failover::next_epoch(cur.epoch, failover::region_index(topology, &self.region));
                due.push(AutoPromotion {
                    pattern: rule.pattern.clone(),
                    from: cur.primary.clone(),
                    new: RuleState::open(epoch, self.region.clone()),
                });
            }
        }
        due
    }

    /// A promotion was applied at `now`: answers to heartbeats sent before it earn nothing (the
    /// broker takes writes only once a majority acknowledged a heartbeat carrying the new epoch:
    /// finding 6).
    pub fn promoted(&mut self, now: Millis) {
        self.lease.restart_acks(now);
    }

    /// An operator's forced promotion replaced `from`: its lease ran out and it cannot renew it,
    /// so it counts towards this region's majority until it comes back.
    pub fn forced(&mut self, from: &str) {
        self.replaced.insert(from.to_string());
    }

    /// Until when the broker's write lease is renewed at `now` (under lease fencing, while a
    /// majority or the witness answers; regions replaced by a forced promotion count as
    /// answering), if that lies in the future.
    pub fn renewal(&self, now: Millis) -> Option<Millis> {
        if self.fencing != Fencing::Lease {
            return None;
        }
        let replaced: Vec<String> = self.replaced.iter().cloned().collect();
        self.lease
            .write_lease_until_with(&replaced, now)
            .filter(|u| now < *u)
    }

    /// Whether the lease of `primary` has surely run out here, and enough regions agree, for a
    /// forced promotion to replace it (always, without lease fencing).
    pub fn may_take_over(&self, primary: &str, now: Millis) -> bool {
        self.fencing != Fencing::Lease || self.lease.may_take_over(primary, now)
    }

    /// What replacing `from` may lose, per partition of the topics `ours` holds (`ours`: this
    /// region's log ends and histories): `from`'s last reported end past the point where its
    /// history leaves ours. `None` when `from` was never heard (everything it had is unknown).
    pub fn loss(
        &self,
        from: &str,
        ours: &BTreeMap<String, Vec<PartitionOffsets>>,
    ) -> Option<Vec<Loss>> {
        let hb = &self.reports.get(from)?.heartbeat;
        let mut loss = Vec::new();
        for (topic, mine) in ours {
            let Some(ends) = hb.ends.get(topic) else {
                continue;
            };
            for m in mine {
                let Some(their_end) = ends.get(m.partition as usize).copied() else {
                    continue;
                };
                let theirs = hb
                    .epochs
                    .get(topic)
                    .and_then(|v| v.get(m.partition as usize))
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let d = divergence(&m.epochs, m.log_end, theirs, their_end);
                if their_end > d {
                    loss.push(Loss {
                        topic: topic.clone(),
                        partition: m.partition,
                        reported_end: their_end,
                        mirrored_end: d,
                        records: their_end - d,
                    });
                }
            }
        }
        Some(loss)
    }
}

fn hb_epoch(state: &RegionState, topology: &Topology, pattern: &str) -> i32 {
    state.rule(topology, pattern).map_or(0, |s| s.epoch)
}

/// Fences of this region's rules whose deadline passed at `wall_ms` (Unix ms), to lift (finding
/// 10): a switchover that fenced this region and then neither moved the rule nor unfenced it
/// would otherwise leave the rule without writes for good. Under lease fencing only: the region
/// still writes only under a majority's lease, which no region gives a primary at an older
/// epoch than one it knows.
pub fn lapsed_fences(
    topology: &Topology,
    state: &RegionState,
    region: &str,
    wall_ms: u64,
) -> Vec<(String, RuleState)> {
    if topology.failover.fencing != Fencing::Lease {
        return Vec::new();
    }
    topology
        .topics
        .iter()
        .filter_map(|rule| {
            let cur = state.rule(topology, &rule.pattern)?;
            (cur.primary == region && cur.fence_lapsed(wall_ms)).then(|| {
                (
                    rule.pattern.clone(),
                    RuleState::open(cur.epoch, cur.primary.clone()),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    //! One test per simulator finding this module owns (docs/simulations.md, "What it found").
    use super::*;
    use std::path::Path;

    const LEASE: u64 = 3_000;

    fn topology(promotion: &str) -> Topology {
        let mut s = String::new();
        for (i, r) in ["east", "west", "south"].iter().enumerate() {
            let base = 21_000 + 10 * i;
            s += &format!(
                "[regions.{r}]\n[[regions.{r}.brokers]]\nid = 1\nlisten = \"127.0.0.1:{base}\"\n\
                 [regions.{r}.gateway]\nquic = \"127.0.0.1:{}\"\nadmin = \"127.0.0.1:{}\"\n\n",
                base + 1,
                base + 2
            );
        }
        s += "[[topics]]\npattern = \"*\"\nprimary = \"east\"\nmirrors = [\"west\", \"south\"]\n\n";
        s += &format!(
            "[failover]\nfencing = \"lease\"\nlease = \"{LEASE}ms\"\nheartbeat = \"500ms\"\npromotion = \"{promotion}\"\n"
        );
        crate::topology::parse(&s, "test", Path::new(".")).expect("a valid topology")
    }

    fn state(t: &Topology, epoch: i32, primary: &str) -> RegionState {
        let mut s = RegionState::default();
        if epoch != 0 || primary != "east" {
            s.apply(t, "*", RuleState::open(epoch, primary)).unwrap();
        }
        s
    }

    fn hb(t: &Topology, region: &str, st: &RegionState) -> Heartbeat {
        let l = Liveness::new(t, region, 0);
        l.heartbeat(t, 0, st, &BTreeMap::new(), &BTreeMap::new(), 0)
    }

    /// Finding 1: a STATE_ACK of 0 ("no credit") gave a restarted stale primary a lease from
    /// its clock's start.
    #[test]
    fn finding_1_a_zero_credit_answer_gives_no_lease() {
        let t = topology("manual");
        let mut east = Liveness::new(&t, "east", 0);
        east.on_ack("west", 0);
        east.on_ack("south", 0);
        assert_eq!(east.renewal(100), None);
        east.on_ack("west", 50);
        assert_eq!(east.renewal(100), Some(50 + LEASE));
    }

    /// Findings 2 and 5: a peer heard again after a silence longer than a lease — or heard for
    /// the first time longer than a lease after this process started — may have been replaced
    /// meanwhile: its heartbeats earn no credit until this region learns a newer epoch or the
    /// window passes.
    #[test]
    fn findings_2_and_5_no_credit_for_a_peer_back_from_a_long_silence() {
        let t = topology("manual");
        let ours = state(&t, 0, "east");
        let mut south = Liveness::new(&t, "south", 0);
        let east_hb = hb(&t, "east", &ours);
        // Heard within a lease of the start: credit.
        let a = south.on_heartbeat(&t, &ours, "east", 7, east_hb.clone(), 1_000);
        assert_eq!((a.credit, a.withheld), (7, false));
        // Silent for longer than a lease × 1.1: nothing.
        let a = south.on_heartbeat(&t, &ours, "east", 9, east_hb.clone(), 10_000);
        assert_eq!((a.credit, a.withheld), (0, true));
        // Finding 5: west, never heard since south started, first heard late.
        let west_hb = hb(&t, "west", &ours);
        let a = south.on_heartbeat(&t, &ours, "west", 11, west_hb, 10_000);
        assert_eq!(a.credit, 0);
        // Learning a newer epoch closes the window early.
        let newer = state(&t, 257, "west");
        let a = south.on_heartbeat(&t, &newer, "east", 13, hb(&t, "east", &newer), 10_100);
        assert_eq!(a.credit, 13);
    }

    /// A peer behind on an epoch (a replaced primary) gets no credit and stays replaced; a peer
    /// ahead is adopted from.
    #[test]
    fn a_stale_peer_earns_nothing_and_a_newer_epoch_is_adopted() {
        let t = topology("manual");
        let new = state(&t, 257, "west");
        let old = state(&t, 0, "east");
        let mut west = Liveness::new(&t, "west", 0);
        west.forced("east");
        let a = west.on_heartbeat(&t, &new, "east", 5, hb(&t, "east", &old), 100);
        assert_eq!((a.credit, a.stale), (0, true));
        assert!(west.replaced().contains("east"));
        assert!(a.adopt.is_empty());
        let mut east = Liveness::new(&t, "east", 0);
        let a = east.on_heartbeat(&t, &old, "west", 5, hb(&t, "west", &new), 100);
        assert_eq!(
            a.adopt,
            vec![("*".to_string(), RuleState::open(257, "west"))]
        );
        // A heartbeat that names another region than its certificate's is ignored.
        let a = east.on_heartbeat(&t, &old, "south", 5, hb(&t, "west", &new), 100);
        assert!(a.misnamed && a.credit == 0 && a.adopt.is_empty());
    }

    /// Finding 6: a region that promotes itself takes writes only once a majority answered a
    /// heartbeat carrying its new epoch: answers to earlier heartbeats stop counting.
    #[test]
    fn finding_6_a_promotion_renews_only_from_heartbeats_after_it() {
        let t = topology("automatic");
        let ours = state(&t, 0, "east");
        let mut west = Liveness::new(&t, "west", 0);
        // West heard east once at 100, then south keeps answering and reporting east gone.
        west.on_heartbeat(&t, &ours, "east", 1, hb(&t, "east", &ours), 100);
        let mut now = 100;
        let mut due = Vec::new();
        while due.is_empty() && now < 20_000 {
            now += 250;
            west.on_ack("south", now);
            let mut report = hb(&t, "south", &ours);
            report.report = BTreeMap::from([("east".to_string(), now - 100)]);
            west.on_heartbeat(&t, &ours, "south", now, report, now);
            due = west.promotions(&t, &ours, now);
        }
        assert!(
            now > 100 + LEASE,
            "no promotion before east's lease surely ran out"
        );
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].new, RuleState::open(257, "west"));
        assert!(west.renewal(now).is_some());
        west.promoted(now);
        assert_eq!(west.renewal(now), None, "old answers no longer count");
        west.on_ack("south", now - 1);
        assert_eq!(west.renewal(now), None);
        west.on_ack("south", now + 1);
        assert!(west.renewal(now + 2).is_some());
    }

    /// Findings 3 and 3b: the loss of a forced promotion is the old primary's last reported end
    /// past where its history leaves ours (our log need not be a prefix of its), from any
    /// heartbeat it sent, primary or mirror.
    #[test]
    fn findings_3_and_3b_the_loss_report_compares_histories() {
        let t = topology("manual");
        let e = |epoch, start_offset| EpochEntry {
            epoch,
            start_offset,
        };
        let mut south = Liveness::new(&t, "south", 0);
        // West (a mirror then) reported 0..3368 of epoch 0; south holds 0..824 of epoch 0 and
        // then its own epoch-258 records to 900.
        let mut west_hb = hb(&t, "west", &state(&t, 0, "east"));
        west_hb.ends = BTreeMap::from([("t".to_string(), vec![3368])]);
        west_hb.epochs = BTreeMap::from([("t".to_string(), vec![vec![e(0, 0)]])]);
        south.on_heartbeat(&t, &state(&t, 0, "east"), "west", 1, west_hb, 10);
        let ours = BTreeMap::from([(
            "t".to_string(),
            vec![PartitionOffsets {
                partition: 0,
                log_start: 0,
                log_end: 900,
                epochs: vec![e(0, 0), e(258, 824)],
            }],
        )]);
        let loss = south.loss("west", &ours).unwrap();
        assert_eq!(
            loss,
            vec![Loss {
                topic: "t".into(),
                partition: 0,
                reported_end: 3368,
                mirrored_end: 824,
                records: 3368 - 824
            }]
        );
        assert_eq!(south.loss("east", &ours), None, "never heard: unknown");
    }

    /// Finding 10: a fence whose deadline passed lifts, under lease fencing, on its primary.
    #[test]
    fn finding_10_a_lapsed_fence_lifts() {
        let t = topology("manual");
        let mut st = RegionState::default();
        st.apply(
            &t,
            "*",
            RuleState {
                fenced: true,
                fence_until_ms: Some(5_000),
                ..RuleState::open(0, "east")
            },
        )
        .unwrap();
        assert!(lapsed_fences(&t, &st, "east", 4_999).is_empty());
        assert!(lapsed_fences(&t, &st, "west", 6_000).is_empty());
        assert_eq!(
            lapsed_fences(&t, &st, "east", 6_000),
            vec![("*".to_string(), RuleState::open(0, "east"))]
        );
    }

    /// The lease loop's schedule is the core's: at once, then every `heartbeat / 4`; none
    /// without lease fencing.
    #[test]
    fn the_lease_loop_runs_when_poll_timeout_says() {
        let t = topology("manual");
        let mut l = Liveness::new(&t, "east", 1_000);
        assert_eq!(l.poll_timeout(), Some(1_000));
        l.on_timeout(1_003);
        assert_eq!(l.poll_timeout(), Some(1_003 + 125));
        let mut none = t.clone();
        none.failover.fencing = Fencing::None;
        let mut l = Liveness::new(&none, "east", 0);
        l.on_timeout(5);
        assert_eq!(l.poll_timeout(), None);
    }
}
