//! The broker model: in-memory logs with a durable prefix, the write gate, group commit,
//! `acks=all` answers (after every mirror in sync mode), crashes and restarts.

use crate::mirror::core::Liveness;
use crate::sim::scenario::TOPIC;
use crate::topology::{Fencing, ReplicationMode};

use super::*;

impl World {
    // ---- broker -------------------------------------------------------------------------

    /// Whether region `r`'s broker takes writes now.
    pub(super) fn takes_writes(&self, r: usize) -> Result<(), &'static str> {
        let reg = &self.regions[r];
        if !reg.up {
            return Err("down");
        }
        let p = self.placement(r);
        if p.primary != reg.name {
            return Err("not the primary");
        }
        if p.fenced {
            return Err("fenced");
        }
        if self.fencing == Fencing::Lease && reg.armed {
            let now = self.local(r);
            if reg.broker_lease_until.is_none_or(|u| now >= u) {
                return Err("lost its write lease");
            }
        }
        Ok(())
    }

    pub(super) fn produce(
        &mut self,
        r: usize,
        producer: usize,
        req: u64,
        part: usize,
        payload: u64,
    ) {
        let reply = |w: &mut World, result| {
            w.after(
                LOCAL_MS,
                Ev::ProduceReply {
                    producer,
                    req,
                    result,
                },
            );
        };
        if let Err(why) = self.takes_writes(r) {
            reply(self, Err(why.to_string()));
            return;
        }
        if self.rng.chance(self.sc.faults.append_failure) {
            self.log(format!("disk: append failed in {}", self.regions[r].name));
            reply(self, Err("append failed".into()));
            return;
        }
        // Under lease fencing, nobody else may be taking writes at this instant.
        if self.fencing == Fencing::Lease {
            for q in 0..self.regions.len() {
                if q != r && self.takes_writes(q).is_ok() {
                    let msg = format!(
                        "{} and {} both take writes for '{TOPIC}' (epochs {} and {})",
                        self.regions[r].name,
                        self.regions[q].name,
                        self.rule_state(r).epoch,
                        self.rule_state(q).epoch
                    );
                    self.fail("single-writer", msg);
                }
            }
        }
        let epoch = self.rule_state(r).epoch;
        let p = &mut self.regions[r].parts[part];
        let offset = p.end();
        if let Err(e) = observe(&mut p.epochs, epoch, offset) {
            reply(self, Err(e));
            return;
        }
        p.log.push(Record {
            offset,
            epoch,
            payload,
        });
        self.check_increasing(r, part);
        self.regions[r].pending.push(PendingAck {
            producer,
            req,
            part,
            offset,
            payload,
            epoch,
        });
        self.log(format!(
            "append {} p={part} off={offset} epoch={epoch} payload={payload:x}",
            self.regions[r].name
        ));
        self.schedule_fsync(r);
        self.pump_all(r);
    }

    pub(super) fn check_increasing(&mut self, r: usize, part: usize) {
        let log = &self.regions[r].parts[part].log;
        let n = log.len();
        if n >= 2 && log[n - 1].offset <= log[n - 2].offset {
            let m = format!(
                "{} p={part}: offset {} follows {}",
                self.regions[r].name,
                log[n - 1].offset,
                log[n - 2].offset
            );
            self.fail("offsets-increase", m);
        }
    }

    pub(super) fn schedule_fsync(&mut self, r: usize) {
        if !self.regions[r].fsync_scheduled {
            self.regions[r].fsync_scheduled = true;
            let inc = self.regions[r].incarnation;
            self.after(FSYNC_MS, Ev::Fsync(r, inc));
        }
    }

    pub(super) fn fsync(&mut self, r: usize) {
        self.regions[r].fsync_scheduled = false;
        if self.rng.chance(self.sc.faults.fsync_failure) {
            self.log(format!(
                "disk: fsync failed in {}: the process exits",
                self.regions[r].name
            ));
            self.crash(r);
            let d = self.sc.faults.down_for;
            self.after(d, Ev::Restart(r));
            return;
        }
        for p in &mut self.regions[r].parts {
            p.durable = p.log.len();
        }
        self.resolve_acks(r);
    }

    /// Answer the produces that are durable (and, for sync topics, held by every mirror).
    pub(super) fn resolve_acks(&mut self, r: usize) {
        let pl = self.placement(r);
        let mirrors: Vec<usize> = pl.mirrors.iter().map(|m| self.idx(m)).collect();
        let sync = self.mode == ReplicationMode::Sync;
        let reg = &mut self.regions[r];
        let mut done = Vec::new();
        reg.pending.retain(|a| {
            let durable = (a.offset as usize) < reg.parts[a.part].durable;
            let mirrored = !sync
                || mirrors
                    .iter()
                    .all(|m| reg.mirror_acked[*m][a.part] > a.offset);
            if durable && mirrored {
                done.push(a.clone());
                false
            } else {
                true
            }
        });
        for a in done {
            self.after(
                LOCAL_MS,
                Ev::ProduceReply {
                    producer: a.producer,
                    req: a.req,
                    result: Ok((r, a.offset, a.epoch)),
                },
            );
            let _ = a.payload;
        }
    }

    pub(super) fn crash(&mut self, r: usize) {
        if !self.regions[r].up {
            return;
        }
        self.stats.crashes += 1;
        self.log(format!("crash {}", self.regions[r].name));
        let reg = &mut self.regions[r];
        reg.up = false;
        reg.incarnation += 1;
        for p in &mut reg.parts {
            p.log.truncate(p.durable);
            let end = p.end();
            p.epochs.retain(|e| e.start_offset < end);
        }
        reg.pending.clear();
        reg.fsync_scheduled = false;
        reg.sinks.clear();
        reg.heard_sent.clear();
        reg.broker_lease_until = None;
    }

    pub(super) fn restart(&mut self, r: usize) {
        if self.regions[r].up {
            return;
        }
        self.log(format!("restart {}", self.regions[r].name));
        let now = self.now;
        let reg = &mut self.regions[r];
        reg.up = true;
        reg.boot = now;
        reg.live = Liveness::new(&self.topo, &reg.name, 0);
        for peer in &mut reg.streams {
            for s in peer.iter_mut() {
                *s = Stream::default();
            }
        }
        for m in &mut reg.mirror_acked {
            m.iter_mut().for_each(|x| *x = 0);
        }
        self.start_process(r);
    }
}
