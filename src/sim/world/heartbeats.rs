//! Each region's gateway, heartbeats and the lease: the production
//! `mirror::core::liveness::Liveness` driven over the simulated links and clocks.

use std::collections::BTreeMap;

use crate::failover::lease::Millis;
use crate::failover::RuleState;
use crate::kafka::control::PartitionOffsets;
use crate::mirror::core::{liveness, Heartbeat};
use crate::sim::scenario::TOPIC;

use super::*;

impl World {
    // ---- the gateway: heartbeats and the lease (production: `mirror::core::liveness`) -------

    pub(super) fn peers(&self, r: usize) -> Vec<usize> {
        let me = &self.regions[r].name;
        if !self.rule_regions.contains(me) {
            return Vec::new();
        }
        self.rule_regions
            .iter()
            .filter(|x| *x != me)
            .map(|x| self.idx(x))
            .collect()
    }

    /// Region `r`'s log ends and epoch histories, as its broker's `Offsets` answers them.
    pub(super) fn offsets_of(&self, r: usize) -> BTreeMap<String, Vec<PartitionOffsets>> {
        let parts = self.regions[r]
            .parts
            .iter()
            .enumerate()
            .map(|(i, p)| PartitionOffsets {
                partition: i as i32,
                log_start: 0,
                log_end: p.end(),
                epochs: p.epochs.clone(),
            })
            .collect();
        BTreeMap::from([(TOPIC.to_string(), parts)])
    }

    pub(super) fn heartbeat(&mut self, r: usize) {
        self.send_heartbeats(r);
        let every = self.topo.failover.heartbeat.as_millis() as u64;
        let d = self.local_delay(r, every);
        let inc = self.regions[r].incarnation;
        self.after(d, Ev::Heartbeat(r, inc));
        self.sample_lag(r);
    }

    /// One heartbeat to every peer of the rule, as `Liveness::heartbeat` makes it.
    pub(super) fn send_heartbeats(&mut self, r: usize) {
        let now = self.local(r);
        let offsets = self.offsets_of(r);
        let reg = &self.regions[r];
        let hb = reg.live.heartbeat(
            &self.topo,
            now,
            &reg.state,
            &offsets,
            &BTreeMap::new(),
            self.wall(r) as i64,
        );
        for peer in self.peers(r) {
            let msg = Msg::Heartbeat {
                sent_at: now,
                sent_sim: self.now,
                hb: Box::new(hb.clone()),
            };
            self.send(r, peer, msg);
        }
    }

    pub(super) fn sample_lag(&mut self, r: usize) {
        if self.placement(r).primary != self.regions[r].name {
            return;
        }
        for peer in self.peers(r) {
            // Lag while the mirror can be reached (a cut or a crash makes its own lag).
            if !self.regions[peer].up || self.link_cut(r, peer) {
                continue;
            }
            for p in 0..self.nparts {
                let lag =
                    (self.regions[r].parts[p].end() - self.regions[peer].parts[p].end()).max(0);
                self.stats.max_lag = self.stats.max_lag.max(lag);
                self.lag_sum += lag as f64;
                self.lag_samples += 1;
            }
        }
    }

    /// `sink_heartbeats`: the production `Liveness::on_heartbeat` decides the credit and the
    /// epochs to adopt.
    pub(super) fn on_heartbeat(
        &mut self,
        r: usize,
        peer: usize,
        sent_at: Millis,
        sent_sim: u64,
        hb: Heartbeat,
    ) {
        let pname = self.regions[peer].name.clone();
        let now = self.local(r);
        let reg = &mut self.regions[r];
        let answer = reg
            .live
            .on_heartbeat(&self.topo, &reg.state, &pname, sent_at, hb, now);
        reg.heard_sent.insert(pname.clone(), sent_sim);
        if answer.withheld {
            self.log(format!(
                "{} withholds credit from {pname} (back from a long silence)",
                self.regions[r].name
            ));
        }
        self.send(
            r,
            peer,
            Msg::HeartbeatAck {
                credit: answer.credit,
            },
        );
        for (_, new) in answer.adopt {
            self.log(format!(
                "{} adopts epoch {} ({}) from {pname}'s heartbeat",
                self.regions[r].name, new.epoch, new.primary
            ));
            self.apply(r, new);
        }
    }

    /// The gateway's lease loop (`gateway::control`), when `Liveness::poll_timeout` says: the automatic promotions due (each restarts the lease, which must not be
    /// renewed from before it), the fences that lapsed, then the broker's lease renewal.
    pub(super) fn lease_tick(&mut self, r: usize) {
        let now = self.local(r);
        let due = self.regions[r]
            .live
            .promotions(&self.topo, &self.regions[r].state, now);
        for p in due {
            self.auto_promote(r, now, p);
        }
        let lapsed = liveness::lapsed_fences(
            &self.topo,
            &self.regions[r].state,
            &self.regions[r].name,
            self.wall(r),
        );
        for (_, open) in lapsed {
            self.log(format!(
                "{}: the fence lapsed (epoch {})",
                self.regions[r].name, open.epoch
            ));
            self.apply(r, open);
        }
        let reg = &mut self.regions[r];
        if let Some(u) = reg.live.renewal(now) {
            reg.broker_lease_until = Some(u);
            reg.armed = true;
        }
        let now = self.local(r);
        self.regions[r].live.on_timeout(now);
        self.arm_lease_tick(r);
    }

    /// The next lease tick, when the region's `Liveness::poll_timeout` says (on its clock).
    pub(super) fn arm_lease_tick(&mut self, r: usize) {
        let Some(due) = self.regions[r].live.poll_timeout() else {
            return;
        };
        let d = self.local_delay(r, due.saturating_sub(self.local(r)));
        let inc = self.regions[r].incarnation;
        self.after(d, Ev::LeaseTick(r, inc));
    }

    /// `Gateway::auto_promote`: the broker's lease ends first (`RenewLease { ms: 0 }`), the
    /// promotion is applied, `Liveness::promoted`, and a heartbeat goes out at once.
    pub(super) fn auto_promote(&mut self, r: usize, now: Millis, p: liveness::AutoPromotion) {
        let me = self.regions[r].name.clone();
        self.log(format!(
            "{me}: automatic promotion (the lease of {} ran out)",
            p.from
        ));
        let from = self.idx(&p.from);
        let reg = &mut self.regions[r];
        reg.broker_lease_until = Some(now);
        reg.armed = true;
        if self.take_over(r, from, p.new.epoch, Takeover::Automatic) {
            self.regions[r].live.promoted(now);
            self.send_heartbeats(r);
        }
    }

    /// Region `to` becomes primary at `epoch`, replacing `from`. Forced or automatic: record the
    /// loss report (`Liveness::loss`, as `/v1/promote` reports it; what an automatic promotion
    /// may lose is bounded the same way); only an operator-forced one adds `from` to the
    /// replaced set.
    pub(super) fn take_over(&mut self, to: usize, from: usize, epoch: i32, how: Takeover) -> bool {
        let old_epoch = self.rule_state(to).epoch.max(self.latest.epoch);
        let new = RuleState::open(epoch, self.regions[to].name.clone());
        // What the report is computed from: this region's logs before the promotion.
        let ours = self.offsets_of(to);
        if !self.apply(to, new.clone()) {
            return false;
        }
        if how != Takeover::Planned {
            self.stats.forced_failovers += 1;
            let fname = self.regions[from].name.clone();
            if how == Takeover::Forced {
                self.regions[to].live.forced(&fname);
            }
            let loss = self.regions[to].live.loss(&fname, &ours);
            let window_start = self.regions[to].heard_sent.get(&fname).copied();
            let ends: Vec<i64> = self.regions[to].parts.iter().map(|p| p.end()).collect();
            let (ranges, window_start): (Vec<(i64, i64)>, u64) = match (loss, window_start) {
                (Some(loss), Some(sent)) => (
                    ends.iter()
                        .enumerate()
                        .map(|(p, m)| {
                            loss.iter()
                                .find(|l| l.partition == p as i32)
                                .map_or((*m, *m), |l| (l.mirrored_end, l.reported_end))
                        })
                        .collect(),
                    sent,
                ),
                // Never heard from the old primary: everything it may have had is unknown.
                _ => (ends.iter().map(|m| (*m, i64::MAX)).collect(), 0),
            };
            let behind: i64 = ranges
                .iter()
                .map(|(a, b)| ((*b).min(a + 1_000_000_000) - a).max(0))
                .sum();
            self.log(format!(
                "forced failover {fname} -> {} epoch={epoch}: behind {ranges:?}, unknown since {window_start}",
                self.regions[to].name
            ));
            self.stats.reported_loss += behind.max(0) as u64;
            self.reports.push(LossReport {
                old_epoch,
                ranges,
                window_start,
            });
        }
        true
    }
}
