//! A property test over the production replication machines: three brokers, one partition with
//! three replicas and `min.insync.replicas = 2`, driven through random produces, follower
//! fetches, time, broker deaths and restarts, lease expiries of live brokers (zombies that keep
//! acting on what they last knew) and late learning of the metadata.
//!
//! The decisions are the production ones: the controller ([`Controller`]), ISR changes
//! ([`alter_isr`]), the leader ([`Leadership`]), the leader's divergence check
//! ([`replica::diverging`]) and the follower's cut ([`replica::truncation_point`]). The model
//! supplies only what is I/O: logs as vectors (a record per batch, on disk across a death),
//! etcd as a versioned record that takes compare-and-swap writes, and the order of events.
//!
//! Checked after every step: no record a leader exposed (below its high watermark) or
//! acknowledged (`acks=all`) is ever missing from the partition's current leader, and no offset
//! ever exposes two different records; a leader's high watermark never goes back within its
//! term. At the end, with every broker back and caught up, all replicas are identical.

use std::collections::{BTreeMap, BTreeSet};

use ferry::cluster::controller::{alter_isr, Controller};
use ferry::cluster::metadata::{
    BrokerId, BrokerInfo, Change, Image, PartitionState, TopicAssignment, Versioned, NO_LEADER,
};
use ferry::log::EpochEntry;
use ferry::replica::{self, leader::Leadership};
use proptest::prelude::*;

const REPLICAS: [BrokerId; 3] = [1, 2, 3];
const MIN_ISR: usize = 2;
const LAG_MS: u64 = 1_000;

#[derive(Debug, Clone)]
enum Role {
    Leader(Leadership),
    Follower { leader: BrokerId, epoch: i32 },
    None,
}

#[derive(Debug)]
struct Node {
    /// The process runs (it may still be a zombie: its lease gone).
    running: bool,
    incarnation: u128,
    /// (leader epoch, record id) at each offset.
    log: Vec<(i32, u64)>,
    follower_hw: i64,
    role: Role,
}

fn epochs(log: &[(i32, u64)]) -> Vec<EpochEntry> {
    let mut out: Vec<EpochEntry> = Vec::new();
    for (o, (e, _)) in log.iter().enumerate() {
        if out.last().is_none_or(|l| l.epoch != *e) {
            out.push(EpochEntry {
                epoch: *e,
                start_offset: o as i64,
            });
        }
    }
    out
}

struct World {
    nodes: BTreeMap<BrokerId, Node>,
    store: Versioned<PartitionState>,
    registered: BTreeSet<BrokerId>,
    controller: Controller,
    now: u64,
    next_record: u64,
    /// Produces waiting for acks=all: (node, leader epoch, offset, record).
    pending: Vec<(BrokerId, i32, i64, u64)>,
    /// Records acknowledged or exposed below a high watermark, by offset.
    committed: BTreeMap<i64, u64>,
    /// Each leadership's last high watermark: (node, epoch) -> hw.
    hws: BTreeMap<(BrokerId, i32), i64>,
}

fn info(id: BrokerId, inc: u128) -> BrokerInfo {
    BrokerInfo {
        id,
        host: "m".into(),
        port: 1,
        rack: None,
        incarnation: uuid::Uuid::from_u128(inc),
    }
}

fn topic() -> TopicAssignment {
    TopicAssignment {
        name: "t".into(),
        id: uuid::Uuid::nil(),
        replicas: vec![REPLICAS.to_vec()],
        configs: BTreeMap::new(),
    }
}

const KEY: fn() -> (String, i32) = || ("t".to_string(), 0);

impl World {
    fn new() -> World {
        let mut img = Image::default();
        for id in REPLICAS {
            img.brokers.insert(id, info(id, 1));
        }
        img.topics.insert(
            "t".into(),
            Versioned {
                value: topic(),
                version: 1,
            },
        );
        let store = Versioned {
            value: PartitionState::initial(&REPLICAS),
            version: 1,
        };
        img.partitions.insert(KEY(), store.clone());
        let mut controller = Controller::new(0, None);
        controller.activate(img, 0);
        let mut w = World {
            nodes: REPLICAS
                .iter()
                .map(|id| {
                    (
                        *id,
                        Node {
                            running: true,
                            incarnation: 1,
                            log: Vec::new(),
                            follower_hw: 0,
                            role: Role::None,
                        },
                    )
                })
                .collect(),
            store,
            registered: REPLICAS.iter().copied().collect(),
            controller,
            now: 0,
            next_record: 0,
            pending: Vec::new(),
            committed: BTreeMap::new(),
            hws: BTreeMap::new(),
        };
        for id in REPLICAS {
            w.learn(id);
        }
        w
    }

    /// etcd's compare-and-swap.
    fn swap(&mut self, expected: i64, state: PartitionState) -> bool {
        if self.store.version != expected {
            return false;
        }
        state
            .check(&REPLICAS)
            .expect("a written state keeps its invariants");
        assert!(state.leader_epoch >= self.store.value.leader_epoch);
        self.store = Versioned {
            value: state,
            version: expected + 1,
        };
        self.controller
            .on_change(Change::Partition(KEY(), self.store.clone()));
        true
    }

    fn control(&mut self) {
        loop {
            let writes = self.controller.poll_writes();
            if writes.is_empty() {
                return;
            }
            for w in writes {
                if !self.swap(w.expected_version, w.state.clone()) {
                    self.controller.on_write_failed(&w.key, true);
                }
            }
        }
    }

    /// A running node applies the store's state (as `broker::cluster::set_role` does).
    fn learn(&mut self, id: BrokerId) {
        let s = self.store.value.clone();
        let now = self.now;
        let n = self.nodes.get_mut(&id).unwrap();
        if !n.running {
            return;
        }
        let log_end = n.log.len() as i64;
        let old_hw = match &n.role {
            Role::Leader(l) => l.high_watermark(),
            Role::Follower { .. } => n.follower_hw.min(log_end),
            Role::None => 0,
        };
        n.role = if s.leader == id {
            match &mut n.role {
                Role::Leader(l) if l.leader_epoch() == s.leader_epoch => {
                    l.on_state(&s.isr, s.partition_epoch, log_end);
                    return;
                }
                _ => Role::Leader(Leadership::new(
                    id,
                    s.leader_epoch,
                    s.partition_epoch,
                    &REPLICAS,
                    &s.isr,
                    log_end,
                    old_hw,
                    LAG_MS,
                    now,
                )),
            }
        } else if s.leader == NO_LEADER {
            Role::None
        } else {
            n.follower_hw = old_hw;
            Role::Follower {
                leader: s.leader,
                epoch: s.leader_epoch,
            }
        };
    }

    fn produce(&mut self) {
        let Some((id, epoch, isr_ok)) = self.nodes.iter().find_map(|(id, n)| match &n.role {
            Role::Leader(l) if n.running => Some((*id, l.leader_epoch(), l.isr().len() >= MIN_ISR)),
            _ => None,
        }) else {
            return;
        };
        if !isr_ok {
            return; // NOT_ENOUGH_REPLICAS: nothing written
        }
        let record = self.next_record;
        self.next_record += 1;
        let n = self.nodes.get_mut(&id).unwrap();
        n.log.push((epoch, record));
        let end = n.log.len() as i64;
        if let Role::Leader(l) = &mut n.role {
            l.on_append(end);
        }
        self.pending.push((id, epoch, end - 1, record));
    }

    fn fetch(&mut self, id: BrokerId) {
        let (leader, epoch) = match &self.nodes[&id].role {
            Role::Follower { leader, epoch } if self.nodes[&id].running => (*leader, *epoch),
            _ => return,
        };
        let l_node = &self.nodes[&leader];
        let leads = matches!(&l_node.role, Role::Leader(l) if l.leader_epoch() == epoch);
        if !l_node.running || !leads {
            return; // refused (not the leader at that epoch) or unreachable
        }
        let l_log = l_node.log.clone();
        let f = &self.nodes[&id];
        let fetch_offset = f.log.len() as i64;
        let last = f.log.last().map_or(-1, |(e, _)| *e);
        let now = self.now;
        if let Some(d) = replica::diverging(&epochs(&l_log), l_log.len() as i64, fetch_offset, last)
        {
            let f = self.nodes.get_mut(&id).unwrap();
            let cut = replica::truncation_point(&epochs(&f.log), fetch_offset, 0, d);
            f.log.truncate(cut as usize);
            f.follower_hw = f.follower_hw.min(cut);
            return;
        }
        assert!(
            fetch_offset <= l_log.len() as i64,
            "a follower ahead of its leader without a divergence found"
        );
        let hw = {
            let Role::Leader(l) = &mut self.nodes.get_mut(&leader).unwrap().role else {
                unreachable!()
            };
            l.on_fetch(id, fetch_offset, l_log.len() as i64, now);
            l.high_watermark()
        };
        let f = self.nodes.get_mut(&id).unwrap();
        for r in l_log.iter().skip(fetch_offset as usize).take(2) {
            f.log.push(*r);
        }
        f.follower_hw = hw.min(f.log.len() as i64);
    }

    fn tick(&mut self) {
        self.now += 300;
        let alive = self.registered.clone();
        let ids: Vec<BrokerId> = self.nodes.keys().copied().collect();
        for id in ids {
            let now = self.now;
            let n = self.nodes.get_mut(&id).unwrap();
            let proposal = match &mut n.role {
                Role::Leader(l) if n.running => l.isr_change(now).map(|p| (p, l.leader_epoch())),
                _ => None,
            };
            let Some((p, epoch)) = proposal else { continue };
            let version = self.store.version;
            let ok = match alter_isr(
                &REPLICAS,
                &self.store.value,
                id,
                epoch,
                p.partition_epoch,
                &p.isr,
                &alive,
            ) {
                Ok(new) => self.swap(version, new),
                Err(_) => false,
            };
            let s = self.store.value.clone();
            let n = self.nodes.get_mut(&id).unwrap();
            let end = n.log.len() as i64;
            if let Role::Leader(l) = &mut n.role {
                if ok {
                    l.on_state(&s.isr, s.partition_epoch, end);
                } else {
                    l.on_proposal_failed();
                }
            }
        }
    }

    /// The process dies (its lease ends with it).
    fn kill(&mut self, id: BrokerId) {
        let n = self.nodes.get_mut(&id).unwrap();
        n.running = false;
        n.role = Role::None;
        self.pending.retain(|p| p.0 != id);
        self.expire(id);
    }

    /// Its lease ends; the process may run on as a zombie.
    fn expire(&mut self, id: BrokerId) {
        if self.registered.remove(&id) {
            self.controller.on_change(Change::BrokerGone(id));
        }
    }

    fn restart(&mut self, id: BrokerId) {
        let n = self.nodes.get_mut(&id).unwrap();
        if n.running && self.registered.contains(&id) {
            return;
        }
        n.running = true;
        n.incarnation += 1;
        n.role = Role::None;
        n.follower_hw = 0;
        let inc = n.incarnation;
        self.registered.insert(id);
        self.controller.on_change(Change::Broker(info(id, inc)));
    }

    /// Acknowledge what is in every ISR member; record what leaders expose; check.
    fn settle(&mut self) -> Result<(), TestCaseError> {
        self.control();
        let mut exposed = Vec::new();
        for (id, n) in &self.nodes {
            if let (true, Role::Leader(l)) = (n.running, &n.role) {
                let hw = l.high_watermark();
                let last = self.hws.insert((*id, l.leader_epoch()), hw);
                prop_assert!(last.is_none_or(|h| h <= hw), "a high watermark went back");
                for o in 0..hw {
                    exposed.push((o, n.log[o as usize].1));
                }
            }
        }
        let mut still = Vec::new();
        for (id, epoch, off, rec) in std::mem::take(&mut self.pending) {
            match &self.nodes[&id].role {
                Role::Leader(l) if l.leader_epoch() == epoch => {
                    if l.high_watermark() > off && l.isr().len() >= MIN_ISR {
                        exposed.push((off, rec));
                    } else {
                        still.push((id, epoch, off, rec));
                    }
                }
                _ => {} // NOT_LEADER_OR_FOLLOWER: the client retries; nothing promised
            }
        }
        self.pending = still;
        for (o, r) in exposed {
            if let Some(old) = self.committed.insert(o, r) {
                prop_assert_eq!(old, r, "offset {} exposed two different records", o);
            }
        }
        let leader = self.store.value.leader;
        if leader != NO_LEADER {
            let log = &self.nodes[&leader].log;
            for (o, r) in &self.committed {
                prop_assert_eq!(
                    log.get(*o as usize).map(|x| x.1),
                    Some(*r),
                    "leader {} lacks committed record {} at {}",
                    leader,
                    r,
                    o
                );
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum Op {
    Produce,
    Fetch(BrokerId),
    Tick,
    Learn(BrokerId),
    Kill(BrokerId),
    Expire(BrokerId),
    Restart(BrokerId),
}

fn op() -> impl Strategy<Value = Op> {
    let b = || prop_oneof![Just(1), Just(2), Just(3)];
    prop_oneof![
        6 => Just(Op::Produce),
        8 => b().prop_map(Op::Fetch),
        3 => Just(Op::Tick),
        4 => b().prop_map(Op::Learn),
        1 => b().prop_map(Op::Kill),
        1 => b().prop_map(Op::Expire),
        2 => b().prop_map(Op::Restart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn no_exposed_record_is_lost_and_replicas_converge(ops in proptest::collection::vec(op(), 1..250)) {
        let mut w = World::new();
        for o in ops {
            match o {
                Op::Produce => w.produce(),
                Op::Fetch(b) => w.fetch(b),
                Op::Tick => w.tick(),
                Op::Learn(b) => w.learn(b),
                Op::Kill(b) => w.kill(b),
                Op::Expire(b) => w.expire(b),
                Op::Restart(b) => { w.restart(b); w.control(); w.learn(b); }
            }
            w.settle()?;
        }
        // Heal: every broker back, everyone learns, fetches and ticks until nothing changes.
        for b in REPLICAS {
            if !w.nodes[&b].running || !w.registered.contains(&b) {
                w.kill(b);
                w.restart(b);
            }
        }
        for _ in 0..60 {
            w.control();
            for b in REPLICAS { w.learn(b); }
            for b in REPLICAS { w.fetch(b); w.fetch(b); }
            w.tick();
            w.settle()?;
        }
        let leader = w.store.value.leader;
        prop_assert!(leader != NO_LEADER, "a partition with every replica back has a leader");
        let want = &w.nodes[&leader].log;
        for b in REPLICAS {
            prop_assert_eq!(&w.nodes[&b].log, want, "replica {} differs from leader {}", b, leader);
        }
    }
}
