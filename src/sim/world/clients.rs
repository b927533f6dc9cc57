//! Producers and consumer groups: what they send, what they are answered, what they check.

use super::*;

impl World {
    // ---- clients ------------------------------------------------------------------------

    /// The region clients are sent to: the newest primary, if it is up.
    pub(super) fn client_target(&self) -> Option<usize> {
        let r = self.idx(&self.latest.primary);
        self.regions[r].up.then_some(r)
    }

    pub(super) fn producer_tick(&mut self, p: usize) {
        if self.now >= self.sc.duration {
            return;
        }
        let pr = &mut self.producers[p];
        let seq = pr.next_seq;
        pr.next_seq += 1;
        let payload = ((p as u64 + 1) << 40) | seq;
        let part = (seq % self.nparts as u64) as usize;
        pr.queue.push_back((part, payload));
        self.producer_send(p);
        let gap = (1000 / self.sc.workload.rate as u64).max(1);
        self.after(gap, Ev::ProducerTick(p));
    }

    pub(super) fn producer_send(&mut self, p: usize) {
        if self.now < self.producers[p].backoff_until {
            return;
        }
        let Some(target) = self.client_target() else {
            return;
        };
        while self.producers[p].inflight.len() < MAX_IN_FLIGHT {
            let pr = &mut self.producers[p];
            let Some((part, payload)) = pr.queue.pop_front() else {
                break;
            };
            let req = pr.next_req;
            pr.next_req += 1;
            pr.inflight.insert(req, (part, payload));
            let inc = self.regions[target].incarnation;
            self.after(
                LOCAL_MS,
                Ev::ProduceArrive {
                    region: target,
                    inc,
                    producer: p,
                    req,
                    part,
                    payload,
                },
            );
            self.after(REQUEST_TIMEOUT_MS, Ev::ProducerTimeout(p, req));
        }
    }

    pub(super) fn produce_reply(
        &mut self,
        p: usize,
        req: u64,
        result: Result<(usize, i64, i32), String>,
    ) {
        let Some((part, payload)) = self.producers[p].inflight.remove(&req) else {
            return; // timed out already: the client never saw this answer
        };
        match result {
            Ok((region, offset, epoch)) => {
                self.stats.acknowledged += 1;
                self.acked.push(Acked {
                    region,
                    part,
                    offset,
                    epoch,
                    payload,
                    at: self.now,
                });
                self.producer_send(p);
            }
            Err(_) => {
                self.producers[p].queue.push_front((part, payload));
                self.producers[p].backoff_until = self.now + PRODUCE_BACKOFF_MS;
                self.after(PRODUCE_BACKOFF_MS, Ev::ProducerSend(p));
            }
        }
    }

    pub(super) fn producer_timeout(&mut self, p: usize, req: u64) {
        if let Some(x) = self.producers[p].inflight.remove(&req) {
            self.producers[p].queue.push_front(x);
            self.producer_send(p);
        }
    }

    pub(super) fn consumer_poll(&mut self, c: usize) {
        let poll = self.sc.workload.poll_interval;
        self.after(poll, Ev::ConsumerPoll(c));
        let Some(target) = self.client_target() else {
            return;
        };
        if self.consumers[c].region != Some(target) {
            // The group moves to the new primary and resumes at its committed offsets there.
            let g = self.consumers[c].group;
            let committed = self.regions[target]
                .groups
                .get(&g)
                .cloned()
                .unwrap_or_else(|| vec![0; self.nparts]);
            self.log(format!(
                "group {g} moves to {} at {committed:?}",
                self.regions[target].name
            ));
            self.consumers[c].region = Some(target);
            self.consumers[c].pos = committed;
            for p in 0..self.nparts {
                let upto = (self.consumers[c].pos[p].max(0) as usize)
                    .min(self.regions[target].parts[p].durable);
                for o in 0..upto {
                    self.check_delivered(c, target, p, o, "resumes past");
                }
            }
        }
        for p in 0..self.nparts {
            let durable = self.regions[target].parts[p].durable as i64;
            let mut n = 0;
            while self.consumers[c].pos[p] < durable && n < POLL_RECORDS {
                let o = self.consumers[c].pos[p] as usize;
                if o > 0 {
                    self.check_delivered(c, target, p, o - 1, "reads past");
                }
                let payload = self.regions[target].parts[p].log[o].payload;
                let d = &mut self.consumers[c].delivered[p];
                if d.len() <= o {
                    d.resize(o + 1, Vec::new());
                }
                if !d[o].contains(&payload) {
                    d[o].push(payload);
                }
                self.consumers[c].pos[p] += 1;
                n += 1;
            }
        }
    }

    pub(super) fn check_delivered(&mut self, c: usize, r: usize, p: usize, o: usize, what: &str) {
        let rec = self.regions[r].parts[p].log[o];
        let ok = self.consumers[c].delivered[p]
            .get(o)
            .is_some_and(|v| v.contains(&rec.payload));
        if !ok {
            let m = format!(
                "group {} {what} partition {p} offset {o} in {} ({:x}, epoch {}) without having seen it",
                self.consumers[c].group, self.regions[r].name, rec.payload, rec.epoch
            );
            self.fail("consumer-no-skip", m);
        }
    }

    pub(super) fn consumer_commit(&mut self, c: usize) {
        let every = self.sc.workload.commit_interval;
        self.after(every, Ev::ConsumerCommit(c));
        if let Some(r) = self.consumers[c].region {
            if self.regions[r].up {
                let g = self.consumers[c].group;
                let pos = self.consumers[c].pos.clone();
                self.regions[r].groups.insert(g, pos);
            }
        }
    }
}
