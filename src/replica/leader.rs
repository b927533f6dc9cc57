//! A partition leader's view of its followers, as a sans-IO state machine: how far each
//! follower has fetched, the high watermark that follows from it, and when the ISR should shrink
//! (a follower lagging past `replica.lag.time.max`) or grow (a follower that caught up).
//!
//! Kafka's rules, as its ReplicaManager and Partition apply them:
//! - a follower's fetch at offset `o` says it holds everything below `o`; it is caught up when
//!   `o` reaches the leader's log end as of this fetch, or as of its previous fetch (so a
//!   follower fetching continuously under load counts as caught up);
//! - the high watermark is the least log end of the leader and every member of the *maximal*
//!   ISR (the committed ISR plus members being added): a record below it is in every replica
//!   that may be elected leader. It never goes back;
//! - an ISR change is proposed one at a time and takes effect when the store has it
//!   ([`Leadership::on_state`]); a shrink only counts once committed, a growth counts at once
//!   for the high watermark (the maximal ISR), so no acknowledged record is ever below the
//!   log end of a replica outside the committed ISR;
//! - a follower joins the ISR when its log end reaches the high watermark and the start of this
//!   leader's epoch (it then holds every record this leader acknowledged).
//!
//! Owns: follower progress, the high watermark, ISR proposals.
//! Does not own: the partition state in etcd (the caller writes proposals through
//! [`crate::cluster::controller::alter_isr`]), the log, or fetching.

use std::collections::BTreeMap;

use crate::cluster::metadata::BrokerId;
use crate::failover::lease::Millis;

/// One follower's progress as the leader sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Follower {
    /// Its log end (its last fetch offset); -1 until it fetched in this leader's term.
    pub log_end: i64,
    /// When it was last caught up.
    pub caught_up_at: Millis,
    /// The leader's log end at its previous fetch.
    prev_leader_end: i64,
    /// When that previous fetch was.
    prev_fetch_at: Millis,
}

/// A change of the ISR the leader asks the store for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsrProposal {
    pub isr: Vec<BrokerId>,
    /// The partition epoch the proposal is made from.
    pub partition_epoch: i32,
}

/// The leader of one partition, for one leader epoch.
#[derive(Debug, Clone)]
pub struct Leadership {
    me: BrokerId,
    leader_epoch: i32,
    partition_epoch: i32,
    replicas: Vec<BrokerId>,
    isr: Vec<BrokerId>,
    /// The log end when this term began: a follower must reach it to join the ISR.
    epoch_start: i64,
    high_watermark: i64,
    followers: BTreeMap<BrokerId, Follower>,
    /// The proposal in flight, if any.
    pending: Option<IsrProposal>,
    lag_max_ms: Millis,
}

impl Leadership {
    /// Take up leadership at `leader_epoch` with the log ending at `log_end` and the last
    /// known high watermark `high_watermark`. Followers start as caught up now (each gets
    /// `lag_max_ms` to fetch before it is dropped).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: BrokerId,
        leader_epoch: i32,
        partition_epoch: i32,
        replicas: &[BrokerId],
        isr: &[BrokerId],
        log_end: i64,
        high_watermark: i64,
        lag_max_ms: Millis,
        now: Millis,
    ) -> Leadership {
        assert!(isr.contains(&me), "a leader is in its ISR");
        let followers = replicas
            .iter()
            .filter(|r| **r != me)
            .map(|r| {
                (
                    *r,
                    Follower {
                        log_end: -1,
                        caught_up_at: now,
                        prev_leader_end: -1,
                        prev_fetch_at: now,
                    },
                )
            })
            .collect();
        let mut l = Leadership {
            me,
            leader_epoch,
            partition_epoch,
            replicas: replicas.to_vec(),
            isr: isr.to_vec(),
            epoch_start: log_end,
            high_watermark: high_watermark.min(log_end),
            followers,
            pending: None,
            lag_max_ms,
        };
        l.advance(log_end);
        l
    }

    pub fn leader_epoch(&self) -> i32 {
        self.leader_epoch
    }

    pub fn high_watermark(&self) -> i64 {
        self.high_watermark
    }

    /// The committed ISR.
    pub fn isr(&self) -> &[BrokerId] {
        &self.isr
    }

    pub fn follower(&self, id: BrokerId) -> Option<&Follower> {
        self.followers.get(&id)
    }

    /// Whether `id` is a replica of this partition other than the leader.
    pub fn is_follower(&self, id: BrokerId) -> bool {
        self.followers.contains_key(&id)
    }

    /// The ISR the high watermark waits for: committed plus members being added.
    fn maximal_isr(&self) -> Vec<BrokerId> {
        let mut m = self.isr.clone();
        if let Some(p) = &self.pending {
            for b in &p.isr {
                if !m.contains(b) {
                    m.push(*b);
                }
            }
        }
        m
    }

    /// Recompute the high watermark with the leader's log at `log_end`; the new value if it
    /// moved.
    fn advance(&mut self, log_end: i64) -> Option<i64> {
        let mut hw = log_end;
        for b in self.maximal_isr() {
            if b == self.me {
                continue;
            }
            let end = self.followers.get(&b).map_or(-1, |f| f.log_end);
            // A member not heard from in this term holds the watermark where it is.
            hw = hw.min(if end < 0 { self.high_watermark } else { end });
        }
        if hw > self.high_watermark {
            self.high_watermark = hw;
            return Some(hw);
        }
        None
    }

    /// The leader's log grew to `log_end`: the new high watermark if it moved (an ISR of the
    /// leader alone acknowledges at once).
    pub fn on_append(&mut self, log_end: i64) -> Option<i64> {
        self.advance(log_end)
    }

    /// Follower `id` fetched at `offset` while the leader's log ends at `log_end`. Returns the
    /// new high watermark if it moved. A fetch from a broker that is not a follower is ignored.
    pub fn on_fetch(
        &mut self,
        id: BrokerId,
        offset: i64,
        log_end: i64,
        now: Millis,
    ) -> Option<i64> {
        let f = self.followers.get_mut(&id)?;
        f.log_end = offset.min(log_end);
        if offset >= log_end {
            f.caught_up_at = now;
        } else if f.prev_leader_end >= 0 && offset >= f.prev_leader_end {
            f.caught_up_at = f.caught_up_at.max(f.prev_fetch_at);
        }
        f.prev_leader_end = log_end;
        f.prev_fetch_at = now;
        self.advance(log_end)
    }

    /// The leader's log was cut back to `offset` (a rejoining region moved its mirror's
    /// divergent tail to the quarantine, `crate::broker::quarantine`): the one case where the
    /// high watermark goes back, because the records past the cut are no longer in the
    /// region's history. Every follower's known log end is capped at the cut (each fetch past
    /// it now gets the diverging epoch and truncates too), and so is this term's start.
    pub fn on_cut(&mut self, offset: i64) {
        self.high_watermark = self.high_watermark.min(offset);
        self.epoch_start = self.epoch_start.min(offset);
        for f in self.followers.values_mut() {
            f.log_end = f.log_end.min(offset);
            f.prev_leader_end = f.prev_leader_end.min(offset);
        }
    }

    /// An ISR change to ask for now, if any (one at a time): drop members that lag past
    /// `replica.lag.time.max`, add followers that caught up.
    pub fn isr_change(&mut self, now: Millis) -> Option<IsrProposal> {
        if self.pending.is_some() {
            return None;
        }
        let mut isr: Vec<BrokerId> = self
            .isr
            .iter()
            .copied()
            .filter(|b| {
                *b == self.me
                    || self
                        .followers
                        .get(b)
                        .is_some_and(|f| now.saturating_sub(f.caught_up_at) <= self.lag_max_ms)
            })
            .collect();
        let need = self.high_watermark.max(self.epoch_start);
        for r in &self.replicas {
            if isr.contains(r) {
                continue;
            }
            if self.followers.get(r).is_some_and(|f| {
                f.log_end >= need && now.saturating_sub(f.caught_up_at) <= self.lag_max_ms
            }) {
                isr.push(*r);
            }
        }
        if isr == self.isr {
            return None;
        }
        let p = IsrProposal {
            isr,
            partition_epoch: self.partition_epoch,
        };
        self.pending = Some(p.clone());
        Some(p)
    }

    /// The store refused or failed the proposal: propose again later.
    pub fn on_proposal_failed(&mut self) {
        self.pending = None;
    }

    /// The partition's state as the store now has it, at the same leader epoch (a new epoch
    /// means a new [`Leadership`]). Returns the new high watermark if it moved.
    pub fn on_state(
        &mut self,
        isr: &[BrokerId],
        partition_epoch: i32,
        log_end: i64,
    ) -> Option<i64> {
        if partition_epoch < self.partition_epoch {
            return None;
        }
        self.isr = isr.to_vec();
        self.partition_epoch = partition_epoch;
        self.pending = None;
        self.advance(log_end)
    }

    /// When the next follower would pass `replica.lag.time.max` (time for
    /// [`Leadership::isr_change`]).
    pub fn poll_timeout(&self) -> Option<Millis> {
        self.isr
            .iter()
            .filter_map(|b| self.followers.get(b))
            .map(|f| f.caught_up_at + self.lag_max_ms + 1)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lead(isr: &[i32], end: i64) -> Leadership {
        Leadership::new(1, 0, 0, &[1, 2, 3], isr, end, 0, 10_000, 0)
    }

    #[test]
    fn the_high_watermark_waits_for_every_isr_member() {
        let mut l = lead(&[1, 2, 3], 0);
        assert_eq!(l.on_append(10), None, "followers have not fetched");
        assert_eq!(l.on_fetch(2, 10, 10, 5), None, "3 has not");
        assert_eq!(l.on_fetch(3, 6, 10, 5), Some(6));
        assert_eq!(l.on_fetch(3, 10, 10, 6), Some(10));
        assert_eq!(l.high_watermark(), 10);
    }

    #[test]
    fn a_cut_takes_the_watermark_and_every_follower_back_to_it_and_no_further() {
        let mut l = lead(&[1, 2, 3], 0);
        l.on_append(10);
        l.on_fetch(2, 10, 10, 5);
        l.on_fetch(3, 10, 10, 5);
        assert_eq!(l.high_watermark(), 10);
        l.on_cut(6);
        assert_eq!(l.high_watermark(), 6);
        assert_eq!(l.follower(2).map(|f| f.log_end), Some(6));
        // The leader's log grows again from the cut; the watermark waits for the followers to
        // fetch the new records, not for what they held before the cut.
        assert_eq!(l.on_append(8), None);
        assert_eq!(
            l.on_fetch(2, 8, 8, 6),
            None,
            "3 has not fetched past the cut"
        );
        assert_eq!(l.on_fetch(3, 8, 8, 6), Some(8));
        // A cut past the watermark changes nothing.
        l.on_cut(20);
        assert_eq!(l.high_watermark(), 8);
    }

    #[test]
    fn a_leader_alone_in_the_isr_acknowledges_at_once() {
        let mut l = lead(&[1], 0);
        assert_eq!(l.on_append(5), Some(5));
    }

    #[test]
    fn a_lagging_follower_leaves_the_isr_and_the_watermark_moves_once_that_is_committed() {
        let mut l = lead(&[1, 2, 3], 0);
        l.on_append(10);
        l.on_fetch(2, 10, 10, 100);
        assert_eq!(l.high_watermark(), 0, "3 holds it");
        assert_eq!(l.isr_change(10_000), None, "3 has lag.max to fetch");
        assert_eq!(l.poll_timeout(), Some(10_001));
        let p = l.isr_change(10_001).expect("3 lagged past lag.max");
        assert_eq!(p.isr, vec![1, 2]);
        assert_eq!(l.isr_change(10_002), None, "one proposal at a time");
        // Not committed yet: the watermark still waits for 3.
        assert_eq!(l.on_append(10), None);
        assert_eq!(l.on_state(&[1, 2], 1, 10), Some(10));
    }

    #[test]
    fn a_follower_rejoins_when_it_reaches_the_watermark_and_counts_at_once() {
        let mut l = lead(&[1, 2], 0);
        l.on_append(10);
        l.on_fetch(2, 10, 10, 1);
        assert_eq!(l.high_watermark(), 10);
        l.on_fetch(3, 5, 10, 2);
        assert_eq!(l.isr_change(3), None, "3 is below the watermark");
        l.on_fetch(3, 10, 10, 4);
        let p = l.isr_change(5).unwrap();
        assert_eq!(p.isr, vec![1, 2, 3]);
        // Being added: the watermark now waits for 3 as well.
        l.on_append(20);
        l.on_fetch(2, 20, 20, 6);
        assert_eq!(l.high_watermark(), 10);
        l.on_fetch(3, 20, 20, 7);
        assert_eq!(l.high_watermark(), 20);
        assert_eq!(l.on_state(&[1, 2, 3], 1, 20), None);
        assert_eq!(l.isr(), &[1, 2, 3]);
    }

    #[test]
    fn a_follower_must_reach_this_terms_start_to_join() {
        // New leader with log end 50 but an old watermark of 40.
        let mut l = Leadership::new(1, 3, 0, &[1, 2], &[1], 50, 40, 10_000, 0);
        assert_eq!(l.high_watermark(), 50, "alone in the ISR");
        l.on_fetch(2, 45, 50, 1);
        assert_eq!(l.isr_change(2), None);
        l.on_fetch(2, 50, 50, 3);
        assert_eq!(l.isr_change(4).unwrap().isr, vec![1, 2]);
    }

    #[test]
    fn a_follower_fetching_under_load_counts_as_caught_up() {
        let mut l = lead(&[1, 2], 0);
        l.on_append(10);
        l.on_fetch(2, 0, 10, 1_000);
        // It always fetches up to the previous end, never the current one.
        for t in 1..20u64 {
            let end = 10 * (t as i64 + 1);
            l.on_append(end);
            l.on_fetch(2, end - 10, end, 1_000 + t * 1_000);
        }
        assert_eq!(l.isr_change(20_000), None, "not lagging past lag.max");
    }

    #[test]
    fn a_stranger_fetch_changes_nothing() {
        let mut l = lead(&[1, 2, 3], 0);
        assert_eq!(l.on_fetch(9, 100, 100, 1), None);
        assert!(!l.is_follower(9));
    }

    proptest! {
        /// Under any interleaving of appends, follower fetches (never past the leader's end),
        /// ISR proposals and their commits: the high watermark never goes back, never passes
        /// the leader's end, and never passes the log end of a committed ISR member that has
        /// fetched in this term.
        #[test]
        fn the_watermark_never_goes_back_or_past_an_isr_member(
            ops in proptest::collection::vec((0u8..4, 0i64..5, 2i32..4), 1..200)
        ) {
            let mut l = lead(&[1, 2, 3], 0);
            let mut end = 0i64;
            let mut now = 0u64;
            let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
            let mut last_hw = l.high_watermark();
            for (kind, n, who) in ops {
                now += 700;
                match kind {
                    0 => { end += n; l.on_append(end); }
                    1 => {
                        let at = (ends.get(&who).copied().unwrap_or(0) + n).min(end);
                        ends.insert(who, at);
                        l.on_fetch(who, at, end, now);
                    }
                    2 => { let _ = l.isr_change(now); }
                    _ => {
                        if let Some(p) = l.pending.clone() {
                            l.on_state(&p.isr, p.partition_epoch + 1, end);
                        }
                    }
                }
                let hw = l.high_watermark();
                prop_assert!(hw >= last_hw);
                prop_assert!(hw <= end);
                for b in l.isr() {
                    if let Some(e) = ends.get(b) {
                        prop_assert!(hw <= *e || *b == 1, "hw {} past {}'s end {}", hw, b, e);
                    }
                }
                last_hw = hw;
            }
        }
    }
}
