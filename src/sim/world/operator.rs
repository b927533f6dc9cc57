//! Faults (cuts, isolations, crashes, region losses) and the operator: the production
//! `failover::switchover::Switchover` run against the simulated regions.

use std::collections::BTreeMap;

use crate::failover::{switchover, RuleState};
use crate::topology::Fencing;

use super::*;

impl World {
    // ---- faults and the operator ------------------------------------------------------

    pub(super) fn faults_on(&self) -> bool {
        !self.settled && self.now < self.sc.duration
    }

    pub(super) fn rearm(&mut self, every: Option<u64>, ev: Ev) {
        if let Some(m) = every {
            let d = self.rng.exp(m);
            self.after(d, ev);
        }
    }

    pub(super) fn cut(&mut self, a: usize, b: usize, on: bool) {
        let e = self.cuts.entry((a.min(b), a.max(b))).or_insert(0);
        if on {
            *e += 1;
        } else {
            *e = e.saturating_sub(1);
        }
        let n = *e;
        self.log(format!(
            "link {}-{} {}",
            self.regions[a].name,
            self.regions[b].name,
            if n > 0 { "cut" } else { "healed" }
        ));
    }

    pub(super) fn random_region(&mut self) -> usize {
        self.rng.below(self.regions.len() as u64) as usize
    }

    pub(super) fn fault(&mut self, ev: &Ev) {
        if !self.faults_on() {
            return;
        }
        let f = self.sc.faults.clone();
        let n = self.regions.len();
        match ev {
            Ev::FaultCut => {
                let a = self.random_region();
                let b = (a + 1 + self.rng.below(n as u64 - 1) as usize) % n;
                self.cut(a, b, true);
                let d = f.cut_for / 2 + self.rng.upto(f.cut_for);
                self.after(d, Ev::Heal(a, b));
                self.rearm(f.cut_every, Ev::FaultCut);
            }
            Ev::FaultIsolate => {
                let a = self.random_region();
                let d = f.isolate_for / 2 + self.rng.upto(f.isolate_for);
                for b in (0..n).filter(|b| *b != a) {
                    self.cut(a, b, true);
                    self.after(d, Ev::Heal(a, b));
                }
                self.rearm(f.isolate_every, Ev::FaultIsolate);
            }
            Ev::FaultCrash => {
                let a = self.random_region();
                self.crash(a);
                let d = f.down_for / 2 + self.rng.upto(f.down_for);
                self.after(d, Ev::Restart(a));
                self.rearm(f.crash_every, Ev::FaultCrash);
            }
            Ev::FaultSwitchover => {
                let to = self.pick_target();
                self.after(
                    0,
                    Ev::OpStart {
                        kind: OpKind::Switchover,
                        to,
                    },
                );
                self.rearm(f.switchover_every, Ev::FaultSwitchover);
            }
            Ev::FaultForced => {
                let to = self.pick_target();
                self.after(
                    0,
                    Ev::OpStart {
                        kind: OpKind::Forced,
                        to,
                    },
                );
                self.rearm(f.forced_failover_every, Ev::FaultForced);
            }
            Ev::FaultRegionLoss => {
                // The primary's region is lost: cut off from every peer, and (half of the time)
                // its process dies too. An operator forces a failover a little later; the region
                // comes back (rejoins) after `region_loss_for`.
                let a = self.idx(&self.latest.primary.clone());
                let d = f.region_loss_for / 2 + self.rng.upto(f.region_loss_for);
                for b in (0..n).filter(|b| *b != a) {
                    self.cut(a, b, true);
                    self.after(d, Ev::Heal(a, b));
                }
                if self.rng.chance(0.5) {
                    self.crash(a);
                    self.after(d, Ev::Restart(a));
                }
                let to = self.pick_target();
                let wait = self.rng.upto(3_000);
                self.after(
                    wait,
                    Ev::OpStart {
                        kind: OpKind::Forced,
                        to,
                    },
                );
                self.rearm(f.region_loss_every, Ev::FaultRegionLoss);
            }
            _ => {}
        }
    }

    pub(super) fn pick_target(&mut self) -> Option<usize> {
        let others: Vec<usize> = self
            .rule_regions
            .iter()
            .filter(|r| **r != self.latest.primary)
            .map(|r| self.idx(r))
            .collect();
        if others.is_empty() {
            return None;
        }
        let i = self.rng.below(others.len() as u64) as usize;
        Some(others[i])
    }

    /// `ferry failover`: plan from the newest state any reachable region knows, then carry out
    /// the production `switchover::Switchover`'s steps against the regions (the admin API's
    /// fence, promote and adopt, modelled in `admin_fence` and `op_poll`).
    pub(super) fn op_start(&mut self, kind: OpKind, to: Option<usize>) {
        let Some(to) = to else { return };
        if self.op_busy || !self.regions[to].up {
            self.log(format!(
                "operator: {kind:?} to {} skipped",
                self.regions[to].name
            ));
            return;
        }
        let states: BTreeMap<String, RuleState> = (0..self.regions.len())
            .filter(|r| self.regions[*r].up)
            .map(|r| (self.regions[r].name.clone(), self.rule_state(r)))
            .collect();
        let to_name = self.regions[to].name.clone();
        let planned = switchover::plan(
            &self.rule_pattern,
            &self.rule_regions,
            &to_name,
            crate::failover::region_index(&self.topo, &to_name),
            &states,
            matches!(kind, OpKind::Forced),
            OP_TIMEOUT_MS,
            OP_TIMEOUT_MS,
        );
        let mut op = match planned {
            Err(e) => {
                self.log(format!("operator: {kind:?} to {to_name}: {e}"));
                return;
            }
            Ok(switchover::Plan::Already { .. }) => return,
            Ok(switchover::Plan::Unfence { request, .. }) => {
                let r = self.admin_fence(to, &request).map(|_| ());
                self.log(format!("operator: unfence {to_name}: {r:?}"));
                return;
            }
            Ok(switchover::Plan::Move(op)) => op,
        };
        self.log(format!(
            "operator: {kind:?} {} -> {} epoch={}",
            op.from, op.to, op.epoch
        ));
        self.op_busy = true;
        let step = op.start();
        self.op_step(op, step);
    }

    /// Carry out one step of the operator's switchover.
    pub(super) fn op_step(&mut self, mut op: switchover::Switchover, step: switchover::Step) {
        use switchover::Step;
        match step {
            Step::Fence { region, request } => {
                let answer = self.admin_fence(self.idx(&region), &request);
                let next = op.fenced(answer);
                self.op_step(op, next);
            }
            Step::Promote { request, .. } => {
                let deadline = self.now + request.timeout_ms;
                self.after(
                    0,
                    Ev::OpPoll {
                        op: Box::new(op),
                        request: Box::new(request),
                        deadline,
                    },
                );
            }
            Step::Unfence { region, request } => {
                let answer = self.admin_fence(self.idx(&region), &request).map(|_| ());
                let next = op.unfenced(answer);
                self.op_step(op, next);
            }
            Step::Adopt { regions, request } => {
                // Every other reachable region adopts the new epoch.
                for name in regions {
                    let r = self.idx(&name);
                    if self.regions[r].up && self.rule_state(r).epoch < request.state.epoch {
                        self.apply(r, request.state.clone());
                    }
                }
                self.op_busy = false;
            }
            Step::Failed(why) => {
                self.op_busy = false;
                self.log(format!("operator: abandoned: {why}"));
            }
        }
    }

    /// `POST /v1/fence` on region `r`, as `mirror::admin` serves it: only on the primary; under
    /// lease fencing the fence lapses after `lapse_ms` on the region's wall clock; the answer
    /// holds its log ends and epoch histories, final while fenced.
    pub(super) fn admin_fence(
        &mut self,
        r: usize,
        request: &switchover::FenceRequest,
    ) -> Result<switchover::FenceAnswer, String> {
        let name = self.regions[r].name.clone();
        if !self.regions[r].up {
            return Err(format!("{name} does not answer"));
        }
        let st = self.rule_state(r);
        if st.primary != name {
            return Err(format!("{name} is not the primary ({} is)", st.primary));
        }
        let fence_until_ms = match request.lapse_ms {
            Some(ms) if request.fenced && self.fencing == Fencing::Lease => Some(self.wall(r) + ms),
            _ => None,
        };
        self.apply(
            r,
            RuleState {
                fenced: request.fenced,
                fence_until_ms,
                ..st
            },
        );
        let o = self.offsets_of(r);
        let pattern = self.rule_pattern.clone();
        Ok(switchover::FenceAnswer {
            fenced: request.fenced,
            fence_until_ms,
            ends: BTreeMap::from([(
                pattern.clone(),
                o.iter()
                    .map(|(t, ps)| (t.clone(), ps.iter().map(|p| p.log_end).collect()))
                    .collect(),
            )]),
            epochs: BTreeMap::from([(
                pattern,
                o.into_iter()
                    .map(|(t, ps)| (t, ps.into_iter().map(|p| p.epochs).collect()))
                    .collect(),
            )]),
            // The simulator models no transactions.
            aborted_transactions: Vec::new(),
        })
    }

    /// `POST /v1/promote` on the target, as `mirror::admin` serves it, polled every
    /// `OP_POLL_MS` until it is ready or its deadline: refused once the rule moved into the
    /// promotion's epoch block (`switchover::moved_on`); planned, it waits for
    /// `switchover::not_caught_up` to come back empty and refuses past `not_after_ms`
    /// (`switchover::too_late`); forced, it waits for the old primary's lease
    /// (`Liveness::may_take_over`).
    pub(super) fn op_poll(
        &mut self,
        mut op: Box<switchover::Switchover>,
        request: Box<switchover::PromoteRequest>,
        deadline: u64,
    ) {
        let to = self.idx(&op.to);
        let from = self.idx(&op.from);
        let refuse = |w: &mut World, mut op: Box<switchover::Switchover>, why: &str| {
            let next = op.promoted(Err(why.to_string()));
            w.op_step(*op, next);
        };
        if !self.regions[to].up {
            return refuse(self, op, "the target is down");
        }
        if switchover::moved_on(self.rule_state(to).epoch, request.epoch) {
            return refuse(self, op, "the epoch moved on");
        }
        let ready = if request.force {
            let now = self.local(to);
            self.regions[to]
                .live
                .may_take_over(&self.regions[from].name, now)
        } else {
            let parts = &self.regions[to].parts;
            let have = |_: &str, p: usize| parts.get(p).map(|x| (x.end(), x.epochs.clone()));
            switchover::not_caught_up(have, &request.wait_for, &request.wait_epochs).is_empty()
        };
        if !ready {
            if self.now > deadline {
                return refuse(self, op, "timed out");
            }
            self.after(
                OP_POLL_MS,
                Ev::OpPoll {
                    op,
                    request,
                    deadline,
                },
            );
            return;
        }
        if switchover::too_late(request.not_after_ms, self.wall(to)).is_some() {
            return refuse(self, op, "too late to promote: the fence is about to lapse");
        }
        let how = if request.force {
            Takeover::Forced
        } else {
            Takeover::Planned
        };
        if !self.take_over(to, from, request.epoch, how) {
            return refuse(self, op, "the promotion was refused");
        }
        if !request.force {
            self.stats.switchovers += 1;
        }
        let next = op.promoted(Ok(()));
        self.op_step(*op, next);
    }

    pub(super) fn settle(&mut self) {
        self.settled = true;
        self.log("settle: faults stop, links heal, regions restart".into());
        let keys: Vec<(usize, usize)> = self.cuts.keys().copied().collect();
        for k in keys {
            self.cuts.insert(k, 0);
        }
        for r in 0..self.regions.len() {
            self.restart(r);
        }
    }
}
