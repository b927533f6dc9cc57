//! The lease machine: when may a primary take writes, and when may a standby take over.
//!
//! Sans-IO: the gateway feeds it heartbeats and acknowledgements with times from a monotonic
//! clock (milliseconds from any origin), and asks it questions; the simulator does the same with
//! simulated time.
//!
//! - Every `heartbeat`, each gateway sends a heartbeat to every peer, carrying how long ago it
//!   last heard from each region. A peer answers at once.
//! - A primary holds its write lease until `contact + lease`, where `contact` is the send time
//!   of the latest heartbeat that enough peers answered for it to count a majority of all the
//!   topology's regions (itself included), or that the witness answered when the topology names
//!   one. Measured from the *send* time, so the primary's lease always ends before any peer's
//!   view of it.
//! - A standby considers the primary's lease run out once it has not heard from the primary for
//!   `lease × (1 + drift)`. It may take over (forced or automatic promotion) only when, in
//!   addition, enough regions agree that the primary is gone that the primary cannot hold a
//!   majority (`|agreeing| > regions − majority`), or the witness agrees when there is one.
//!
//! Assumption: clock *rates* differ by less than `drift` (10 % by default) over a lease; no
//! clock needs to agree with another on the time of day.

use std::collections::BTreeMap;

/// Milliseconds on a monotonic clock.
pub type Millis = u64;

/// Clock rate difference the lease tolerates.
pub const DEFAULT_DRIFT: f64 = 0.10;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub lease_ms: u64,
    pub heartbeat_ms: u64,
    pub drift: f64,
}

impl LeaseConfig {
    /// How long a standby waits after the primary's last heartbeat.
    pub fn expiry_wait_ms(&self) -> u64 {
        (self.lease_ms as f64 * (1.0 + self.drift)).ceil() as u64
    }
}

/// One region's view.
#[derive(Debug, Clone)]
pub struct Lease {
    me: String,
    regions: Vec<String>,
    witness: Option<String>,
    cfg: LeaseConfig,
    started: Millis,
    /// peer → send time of the latest of our heartbeats it answered.
    acked: BTreeMap<String, Millis>,
    /// peer → when we last received a heartbeat from it.
    heard: BTreeMap<String, Millis>,
    /// peer → (when its report arrived, its "ms since I heard X" for every X).
    reports: BTreeMap<String, (Millis, BTreeMap<String, u64>)>,
    /// peer → until when its heartbeats earn no lease credit: a peer we had not heard from for
    /// a whole lease may have been replaced meanwhile; the news of a newer epoch reaches us
    /// within this window if so.
    /// (until, our epoch mark when the window opened).
    no_credit_until: BTreeMap<String, (Millis, i64)>,
    /// Grows whenever this region learns a newer epoch of any rule (the sum of its epochs).
    epoch_mark: i64,
    /// Answers to heartbeats sent before this time earn nothing (see [`Lease::restart_acks`]).
    ack_floor: Millis,
}

impl Lease {
    /// `regions`: every region of the topology (`me` included). `now`: start time; a region
    /// never heard from counts as heard at start, so a restart never shortens a wait.
    pub fn new(
        me: &str,
        regions: Vec<String>,
        witness: Option<String>,
        cfg: LeaseConfig,
        now: Millis,
    ) -> Lease {
        assert!(
            regions.iter().any(|r| r == me),
            "a region is one of the regions"
        );
        Lease {
            me: me.to_string(),
            regions,
            witness,
            cfg,
            started: now,
            acked: BTreeMap::new(),
            heard: BTreeMap::new(),
            reports: BTreeMap::new(),
            no_credit_until: BTreeMap::new(),
            epoch_mark: 0,
            ack_floor: 0,
        }
    }

    /// Forget every answer to heartbeats sent before `at`: a region that has just promoted
    /// itself holds a write lease only once a majority has answered a heartbeat that carried
    /// its new epoch, so that no write it acknowledges can be overruled by a region that never
    /// heard of that epoch (simulator finding 6).
    pub fn restart_acks(&mut self, at: Millis) {
        self.acked.clear();
        self.ack_floor = self.ack_floor.max(at);
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    fn majority(&self) -> usize {
        self.regions.len() / 2 + 1
    }

    /// A peer answered the heartbeat we sent at `sent_at`.
    pub fn on_ack(&mut self, peer: &str, sent_at: Millis) {
        if sent_at < self.ack_floor {
            return;
        }
        let e = self.acked.entry(peer.to_string()).or_insert(sent_at);
        *e = (*e).max(sent_at);
    }

    /// A heartbeat from `peer` arrived at `now`, with its report of how long ago it heard
    /// from each region.
    pub fn on_heartbeat(&mut self, peer: &str, now: Millis, report: BTreeMap<String, u64>) {
        if self.expired_here(peer, now) {
            // Back after its lease surely ran out (or first heard that late after our own
            // start): another region may have taken over meanwhile.
            self.no_credit_until.insert(
                peer.to_string(),
                (
                    now + self.cfg.lease_ms + 2 * self.cfg.heartbeat_ms,
                    self.epoch_mark,
                ),
            );
        }
        self.heard.insert(peer.to_string(), now);
        self.reports.insert(peer.to_string(), (now, report));
    }

    /// Whether our answers to `peer`'s heartbeats may renew its lease now (see
    /// `no_credit_until`). The gateway also refuses credit to a peer behind on an epoch.
    /// The window also closes once this region has learnt a newer epoch since it opened (any
    /// takeover it was waiting to hear of is known then, and a peer behind it is refused as
    /// stale).
    pub fn grants_credit(&self, peer: &str, now: Millis) -> bool {
        self.no_credit_until
            .get(peer)
            .is_none_or(|(u, mark)| now >= *u || self.epoch_mark > *mark)
    }

    /// Tell the machine the sum of this region's rule epochs (it only grows).
    pub fn note_epoch_mark(&mut self, mark: i64) {
        self.epoch_mark = self.epoch_mark.max(mark);
    }

    /// What our heartbeats carry: ms since we heard from each other region.
    pub fn report(&self, now: Millis) -> BTreeMap<String, u64> {
        self.regions
            .iter()
            .filter(|r| **r != self.me)
            .map(|r| (r.clone(), now.saturating_sub(self.last_heard(r))))
            .collect()
    }

    fn last_heard(&self, region: &str) -> Millis {
        self.heard.get(region).copied().unwrap_or(self.started)
    }

    /// Until when this region may take writes as a primary (`None`: it never held a lease).
    pub fn write_lease_until(&self) -> Option<Millis> {
        self.write_lease_until_with(&[], 0)
    }

    /// [`Lease::write_lease_until`], counting `fenced` regions as if they had answered at
    /// `now`: regions this one replaced by a forced (operator) promotion, whose lease has run
    /// out and who get no lease credit until they adopt the new epoch.
    pub fn write_lease_until_with(&self, fenced: &[String], now: Millis) -> Option<Millis> {
        let acked = |r: &String| -> Option<Millis> {
            if fenced.contains(r) {
                Some(now)
            } else {
                self.acked.get(r).copied()
            }
        };
        let contact = match &self.witness {
            Some(w) if *w == self.me => return Some(Millis::MAX),
            Some(w) => acked(w),
            None => {
                let need = self.majority() - 1; // others besides me
                if need == 0 {
                    return Some(Millis::MAX);
                }
                let mut times: Vec<Millis> = self
                    .regions
                    .iter()
                    .filter(|r| **r != self.me)
                    .filter_map(acked)
                    .collect();
                times.sort_unstable_by(|a, b| b.cmp(a));
                times.get(need - 1).copied()
            }
        }?;
        Some(contact + self.cfg.lease_ms)
    }

    /// Whether this region, as primary, may take writes at `now`.
    pub fn may_write(&self, now: Millis) -> bool {
        self.write_lease_until().is_some_and(|u| now < u)
    }

    /// Whether we heard from `region` within the last two heartbeats (ourselves: always).
    pub fn alive(&self, region: &str, now: Millis) -> bool {
        region == self.me
            || now.saturating_sub(self.last_heard(region)) <= 2 * self.cfg.heartbeat_ms
    }

    /// The region that should take over from `primary` automatically: the first of
    /// `candidates` (a rule's regions in file order) other than the primary that is alive here.
    pub fn preferred_successor<'a>(
        &self,
        primary: &str,
        candidates: &'a [String],
        now: Millis,
    ) -> Option<&'a String> {
        candidates
            .iter()
            .find(|r| *r != primary && self.alive(r, now))
    }

    /// Whether `primary`'s lease has surely run out in our own view.
    pub fn expired_here(&self, primary: &str, now: Millis) -> bool {
        now >= self.last_heard(primary) + self.cfg.expiry_wait_ms()
    }

    /// Whether this region hears from a majority of regions (or the witness) right now: what an
    /// automatic promotion needs besides [`Lease::may_take_over`], so that two sides of a
    /// partition never both promote themselves.
    pub fn has_quorum(&self, now: Millis) -> bool {
        self.may_write(now)
    }

    /// Whether this region may take over from `primary` at `now`: the lease ran out here and
    /// enough regions agree (see the module docs). Reports older than two heartbeats do not
    /// count.
    pub fn may_take_over(&self, primary: &str, now: Millis) -> bool {
        if !self.expired_here(primary, now) {
            return false;
        }
        let wait = self.cfg.expiry_wait_ms();
        let fresh = 2 * self.cfg.heartbeat_ms;
        let agrees = |r: &str| -> bool {
            if r == self.me {
                return true;
            }
            match self.reports.get(r) {
                Some((at, rep)) if now.saturating_sub(*at) <= fresh => rep
                    .get(primary)
                    .is_some_and(|ago| ago + now.saturating_sub(*at) >= wait),
                _ => false,
            }
        };
        if let Some(w) = &self.witness {
            return w != primary && agrees(w);
        }
        let agreeing = self
            .regions
            .iter()
            .filter(|r| *r != primary && agrees(r))
            .count();
        agreeing > self.regions.len() - self.majority()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LeaseConfig {
        LeaseConfig {
            lease_ms: 10_000,
            heartbeat_ms: 2_000,
            drift: 0.1,
        }
    }

    fn regions(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn two_regions_the_primary_stops_before_the_standby_starts() {
        let mut east = Lease::new("east", regions(&["east", "west"]), None, cfg(), 0);
        let mut west = Lease::new("west", regions(&["east", "west"]), None, cfg(), 0);
        assert!(!east.may_write(0), "no lease before any peer answered");
        // east's heartbeat sent at 1000 arrives at 1010 and is answered.
        west.on_heartbeat("east", 1010, BTreeMap::new());
        east.on_ack("west", 1000);
        assert!(east.may_write(5000));
        // then the link is cut
        assert!(east.may_write(10_999));
        assert!(!east.may_write(11_000));
        assert!(!west.may_take_over("east", 11_000));
        assert!(!west.may_take_over("east", 12_009));
        assert!(west.may_take_over("east", 1010 + 11_000));
    }

    #[test]
    fn after_a_restart_of_acks_only_answers_to_later_heartbeats_count() {
        let r = regions(&["east", "west", "south"]);
        let mut west = Lease::new("west", r, None, cfg(), 0);
        west.on_ack("south", 20_000);
        assert!(west.may_write(21_000));
        // west promotes itself at 21,000: earlier answers no longer count.
        west.restart_acks(21_000);
        assert!(!west.may_write(21_001));
        // A late answer to a heartbeat sent before the promotion earns nothing ...
        west.on_ack("south", 20_500);
        assert!(!west.may_write(21_100));
        // ... an answer to one sent after it (carrying the new epoch) does.
        west.on_ack("south", 21_050);
        assert!(west.may_write(21_100));
        assert_eq!(west.write_lease_until(), Some(21_050 + 10_000));
    }

    #[test]
    fn three_regions_a_standby_needs_another_region_to_agree() {
        let r = regions(&["east", "west", "south"]);
        let mut west = Lease::new("west", r.clone(), None, cfg(), 0);
        let mut east = Lease::new("east", r, None, cfg(), 0);
        // east still reaches south: it keeps its lease.
        east.on_ack("south", 20_000);
        assert!(east.may_write(25_000));
        // west has not heard east for long, but south has.
        let mut rep = BTreeMap::new();
        rep.insert("east".to_string(), 500u64);
        west.on_heartbeat("south", 25_000, rep);
        assert!(west.expired_here("east", 25_000));
        assert!(!west.may_take_over("east", 25_000));
        // south loses east too.
        let mut rep = BTreeMap::new();
        rep.insert("east".to_string(), 11_500u64);
        west.on_heartbeat("south", 40_000, rep);
        assert!(west.may_take_over("east", 40_000));
        // a stale report does not count
        assert!(!west.may_take_over("east", 45_000));
    }

    #[test]
    fn the_first_live_region_in_rule_order_succeeds() {
        let r = regions(&["east", "west", "south"]);
        let mut south = Lease::new("south", r.clone(), None, cfg(), 0);
        south.on_heartbeat("west", 20_000, BTreeMap::new());
        assert_eq!(
            south.preferred_successor("east", &r, 21_000),
            Some(&"west".to_string())
        );
        // west fell silent too: south is next
        assert_eq!(
            south.preferred_successor("east", &r, 30_000),
            Some(&"south".to_string())
        );
    }

    #[test]
    fn a_two_region_partition_gives_no_side_a_quorum() {
        let r = regions(&["east", "west"]);
        let mut west = Lease::new("west", r.clone(), None, cfg(), 0);
        west.on_ack("east", 1_000);
        assert!(west.has_quorum(5_000));
        // cut: neither side hears the other; neither may promote itself automatically
        assert!(!west.has_quorum(12_000));
        // an operator's forced promotion counts the replaced (fenced) region
        assert_eq!(
            west.write_lease_until_with(&["east".to_string()], 12_000),
            Some(22_000)
        );
    }

    #[test]
    fn a_peer_back_from_a_long_silence_earns_no_credit_for_a_while() {
        let r = regions(&["east", "west", "south"]);
        let mut south = Lease::new("south", r, None, cfg(), 0);
        south.on_heartbeat("east", 1_000, BTreeMap::new());
        assert!(south.grants_credit("east", 1_000));
        south.on_heartbeat("east", 3_000, BTreeMap::new());
        assert!(south.grants_credit("east", 3_000));
        // silent for longer than lease x 1.1, then back
        south.on_heartbeat("east", 20_000, BTreeMap::new());
        assert!(!south.grants_credit("east", 20_000));
        assert!(!south.grants_credit("east", 33_999));
        assert!(south.grants_credit("east", 34_000));
        // learning a newer epoch closes the window early
        south.on_heartbeat("east", 60_000, BTreeMap::new());
        assert!(!south.grants_credit("east", 60_000));
        south.note_epoch_mark(1);
        assert!(south.grants_credit("east", 60_001));
    }

    #[test]
    fn a_witness_decides() {
        let r = regions(&["east", "west", "arbiter"]);
        let mut east = Lease::new("east", r.clone(), Some("arbiter".into()), cfg(), 0);
        east.on_ack("west", 5_000);
        assert!(!east.may_write(6_000), "only the witness grants the lease");
        east.on_ack("arbiter", 5_000);
        assert!(east.may_write(6_000));
    }
}
