//! The controller's rules, one test each, and a property test over random broker failures.

use super::*;
use crate::cluster::metadata::BrokerInfo;
use proptest::prelude::*;

fn broker(id: BrokerId, inc: u128) -> BrokerInfo {
    BrokerInfo {
        id,
        host: "127.0.0.1".into(),
        port: 9000 + id as u16,
        rack: None,
        incarnation: Uuid::from_u128(inc),
    }
}

fn topic(name: &str, replicas: Vec<Vec<BrokerId>>, unclean: bool) -> TopicAssignment {
    let mut configs = BTreeMap::new();
    if unclean {
        configs.insert("unclean.leader.election.enable".into(), "true".into());
    }
    TopicAssignment {
        name: name.into(),
        id: Uuid::nil(),
        replicas,
        configs,
    }
}

/// A cluster of brokers 1..=n with one topic "t" whose partitions have `replicas`.
fn cluster(n: i32, replicas: Vec<Vec<BrokerId>>, unclean: bool) -> Controller {
    let mut img = Image::default();
    for id in 1..=n {
        img.brokers.insert(id, broker(id, 1));
    }
    for (p, r) in replicas.iter().enumerate() {
        img.partitions.insert(
            ("t".into(), p as i32),
            Versioned {
                value: PartitionState::initial(r),
                version: 1,
            },
        );
    }
    img.topics.insert(
        "t".into(),
        Versioned {
            value: topic("t", replicas, unclean),
            version: 1,
        },
    );
    let mut c = Controller::new(0, None);
    c.activate(img, 0);
    c
}

/// Make the writes as a store would (each succeeds at the next version) and return them.
fn settle(c: &mut Controller) -> Vec<Write> {
    let mut all = Vec::new();
    loop {
        let ws = c.poll_writes();
        if ws.is_empty() {
            return all;
        }
        for w in &ws {
            c.on_change(Change::Partition(
                w.key.clone(),
                Versioned {
                    value: w.state.clone(),
                    version: w.expected_version + 1,
                },
            ));
        }
        all.extend(ws);
    }
}

fn state(c: &Controller, p: i32) -> PartitionState {
    c.image().partitions[&("t".to_string(), p)].value.clone()
}

#[test]
fn a_gone_leader_is_replaced_by_the_first_alive_isr_member_at_a_new_epoch() {
    let mut c = cluster(3, vec![vec![1, 2, 3]], false);
    assert!(
        settle(&mut c).is_empty(),
        "a healthy cluster needs no writes"
    );
    c.on_change(Change::BrokerGone(1));
    let ws = settle(&mut c);
    assert_eq!(ws.len(), 1);
    assert_eq!(ws[0].why, Why::LeaderGone { old: 1 });
    assert_eq!(ws[0].expected_version, 1);
    let s = state(&c, 0);
    assert_eq!(
        (s.leader, s.leader_epoch, s.isr.clone()),
        (2, 256, vec![2, 3])
    );
    assert_eq!(s.partition_epoch, 1);
}

#[test]
fn leader_epochs_name_the_region_that_gave_them() {
    let mut c = cluster(3, vec![vec![1, 2, 3]], false);
    c.region = 2;
    c.on_change(Change::BrokerGone(1));
    settle(&mut c);
    assert_eq!(state(&c, 0).leader_epoch, 256 + 2);
    c.on_change(Change::BrokerGone(2));
    settle(&mut c);
    assert_eq!(state(&c, 0).leader_epoch, 512 + 2);
}

#[test]
fn a_gone_follower_leaves_the_isr_and_the_leader_epoch_stays() {
    let mut c = cluster(3, vec![vec![1, 2, 3]], false);
    c.on_change(Change::BrokerGone(3));
    let ws = settle(&mut c);
    assert_eq!(ws[0].why, Why::IsrShrunk { gone: vec![3] });
    let s = state(&c, 0);
    assert_eq!((s.leader, s.leader_epoch, s.isr), (1, 0, vec![1, 2]));
    // It coming back does not put it in the ISR: only its leader does, once it caught up.
    c.on_change(Change::Broker(broker(3, 1)));
    assert!(settle(&mut c).is_empty());
}

#[test]
fn with_no_isr_member_alive_the_partition_is_offline_until_one_returns() {
    let mut c = cluster(3, vec![vec![1, 2, 3]], false);
    c.on_change(Change::BrokerGone(3));
    c.on_change(Change::BrokerGone(2));
    settle(&mut c);
    assert_eq!(state(&c, 0).isr, vec![1]);
    // 3 comes back (out of sync), then the last ISR member goes.
    c.on_change(Change::Broker(broker(3, 1)));
    c.on_change(Change::BrokerGone(1));
    let ws = settle(&mut c);
    assert_eq!(ws.len(), 1);
    assert_eq!(ws[0].why, Why::Offline { old: 1 });
    let s = state(&c, 0);
    assert_eq!((s.leader, s.isr.clone()), (NO_LEADER, vec![1]));
    assert_eq!(s.leader_epoch, 256);
    // 3 is alive but was never in sync: it does not lead.
    assert!(settle(&mut c).is_empty());
    c.on_change(Change::Broker(broker(1, 1)));
    let ws = settle(&mut c);
    assert_eq!(ws[0].why, Why::Revived);
    let s = state(&c, 0);
    assert_eq!((s.leader, s.leader_epoch, s.isr), (1, 512, vec![1]));
}

#[test]
fn unclean_election_only_where_the_topic_allows_it_and_it_is_reported() {
    let mut c = cluster(2, vec![vec![1, 2]], true);
    c.on_change(Change::BrokerGone(2));
    settle(&mut c);
    c.on_change(Change::Broker(broker(2, 1)));
    c.on_change(Change::BrokerGone(1));
    let ws = settle(&mut c);
    assert_eq!(ws[0].why, Why::Unclean { old_isr: vec![1] });
    let s = state(&c, 0);
    assert_eq!((s.leader, s.isr), (2, vec![2]));
    assert_eq!(
        c.take_reports(),
        vec![Report::Unclean {
            key: ("t".into(), 0),
            leader: 2,
            leader_epoch: 256,
            old_isr: vec![1]
        }]
    );
    assert!(c.take_reports().is_empty());
}

#[test]
fn a_restarted_leader_gives_up_leadership_and_rejoins_as_a_follower() {
    let mut c = cluster(3, vec![vec![1, 2, 3], vec![2, 3, 1]], false);
    // Broker 1 restarts within its lease: the same id, a new incarnation.
    c.on_change(Change::Broker(broker(1, 2)));
    let ws = settle(&mut c);
    let s0 = state(&c, 0);
    assert_eq!((s0.leader, s0.leader_epoch, s0.isr), (2, 256, vec![2, 3]));
    let s1 = state(&c, 1);
    assert_eq!((s1.leader, s1.leader_epoch, s1.isr), (2, 0, vec![2, 3]));
    assert_eq!(ws.len(), 2);
    // Once: nothing more happens to it.
    assert!(settle(&mut c).is_empty());
}

#[test]
fn a_restarted_sole_isr_member_leads_again_at_a_new_epoch() {
    let mut c = cluster(1, vec![vec![1]], false);
    c.on_change(Change::Broker(broker(1, 2)));
    let ws = settle(&mut c);
    assert_eq!(ws.len(), 2);
    assert_eq!(ws[0].why, Why::Offline { old: 1 });
    assert_eq!(ws[1].why, Why::Revived);
    let s = state(&c, 0);
    assert_eq!((s.leader, s.leader_epoch, s.isr), (1, 512, vec![1]));
}

#[test]
fn gone_and_back_between_two_polls_is_still_a_restart() {
    let mut c = cluster(3, vec![vec![1, 2, 3]], false);
    c.on_change(Change::BrokerGone(1));
    c.on_change(Change::Broker(broker(1, 2)));
    settle(&mut c);
    assert_eq!(state(&c, 0).leader, 2);
}

#[test]
fn one_write_in_flight_per_partition_and_a_lost_compare_waits_for_the_watch() {
    let mut c = cluster(3, vec![vec![1, 2, 3]], false);
    c.on_change(Change::BrokerGone(1));
    let ws = c.poll_writes();
    assert_eq!(ws.len(), 1);
    assert!(c.poll_writes().is_empty(), "in flight");
    let key = ws[0].key.clone();
    // Someone wrote first: no retry from the stale image.
    c.on_write_failed(&key, true);
    assert!(c.poll_writes().is_empty(), "waits for the newer version");
    // The watch brings what the other writer did (here: the same decision, version 2).
    c.on_change(Change::Partition(
        key.clone(),
        Versioned {
            value: ws[0].state.clone(),
            version: 2,
        },
    ));
    assert!(c.poll_writes().is_empty());
    // An I/O failure: decide again at once.
    c.on_change(Change::BrokerGone(3));
    let ws = c.poll_writes();
    assert_eq!(ws.len(), 1);
    c.on_write_failed(&key, false);
    assert_eq!(c.poll_writes(), ws);
}

#[test]
fn an_inactive_controller_decides_nothing() {
    let mut c = cluster(3, vec![vec![1, 2, 3]], false);
    c.deactivate();
    c.on_change(Change::BrokerGone(1));
    assert!(c.poll_writes().is_empty());
}

#[test]
fn preferred_leader_elections_answer_as_kafka_does() {
    let mut c = cluster(3, vec![vec![1, 2, 3]], false);
    let key: PartitionKey = ("t".into(), 0);
    assert_eq!(c.elect_preferred(&key), Err(ElectError::NotNeeded));
    assert_eq!(
        c.elect_preferred(&("t".into(), 5)),
        Err(ElectError::UnknownPartition)
    );
    c.on_change(Change::BrokerGone(1));
    settle(&mut c);
    assert_eq!(c.elect_preferred(&key), Err(ElectError::NotAvailable));
    // Back, but not in sync until its leader adds it.
    c.on_change(Change::Broker(broker(1, 1)));
    assert_eq!(c.elect_preferred(&key), Err(ElectError::NotAvailable));
    let st = state(&c, 0);
    let grown = alter_isr(
        &[1, 2, 3],
        &st,
        2,
        st.leader_epoch,
        st.partition_epoch,
        &[2, 3, 1],
        &c.alive(),
    )
    .unwrap();
    c.on_change(Change::Partition(
        key.clone(),
        Versioned {
            value: grown,
            version: 9,
        },
    ));
    assert_eq!(c.elect_preferred(&key), Ok(()));
    let ws = settle(&mut c);
    assert_eq!(ws.len(), 1);
    assert_eq!(ws[0].why, Why::Preferred);
    let s = state(&c, 0);
    assert_eq!((s.leader, s.leader_epoch), (1, 512));
    assert_eq!(ElectError::NotNeeded.kafka_code(), 84);
}

#[test]
fn an_unclean_election_by_request_only_for_an_offline_partition() {
    let mut c = cluster(2, vec![vec![1, 2]], false);
    let t = c.image().topics["t"].value.clone();
    let alive: BTreeSet<_> = [1, 2].into();
    assert_eq!(
        unclean(&t, 0, &state(&c, 0), &alive, 0),
        Err(ElectError::NotNeeded)
    );
    c.on_change(Change::BrokerGone(2));
    settle(&mut c);
    c.on_change(Change::BrokerGone(1));
    settle(&mut c);
    c.on_change(Change::Broker(broker(2, 1)));
    settle(&mut c);
    let st = state(&c, 0);
    assert_eq!((st.leader, st.isr.clone()), (NO_LEADER, vec![1]));
    let only2: BTreeSet<_> = [2].into();
    let n = unclean(&t, 0, &st, &only2, 0).unwrap();
    assert_eq!((n.leader, n.isr), (2, vec![2]));
    assert!(n.leader_epoch > st.leader_epoch);
    assert_eq!(
        unclean(&t, 0, &st, &BTreeSet::new(), 0),
        Err(ElectError::NotAvailable)
    );
}

#[test]
fn the_automatic_rebalance_moves_leaders_back_when_due() {
    let mut c = Controller::new(
        0,
        Some(Rebalance {
            interval_ms: 1000,
            imbalance_percent: 10,
        }),
    );
    let base = cluster(2, vec![vec![1, 2], vec![2, 1]], false);
    let mut img = base.image().clone();
    // Partition 0 is led by 2 (after some failure), both in sync.
    img.partitions.get_mut(&("t".to_string(), 0)).unwrap().value = PartitionState {
        leader: 2,
        leader_epoch: 1,
        isr: vec![2, 1],
        partition_epoch: 2,
    };
    c.activate(img, 0);
    assert_eq!(c.poll_timeout(), Some(1000));
    c.on_timeout(999);
    assert!(c.poll_writes().is_empty());
    c.on_timeout(1000);
    assert_eq!(c.poll_timeout(), Some(2000));
    let ws = settle(&mut c);
    assert_eq!(ws.len(), 1);
    assert_eq!(ws[0].why, Why::Preferred);
    assert_eq!(state(&c, 0).leader, 1);
}

#[test]
fn isr_changes_from_a_leader_are_checked() {
    let st = PartitionState {
        leader: 1,
        leader_epoch: 4,
        isr: vec![1, 2],
        partition_epoch: 7,
    };
    let r = [1, 2, 3];
    let alive: BTreeSet<_> = [1, 2, 3].into();
    let ok = alter_isr(&r, &st, 1, 4, 7, &[1], &alive).unwrap();
    assert_eq!(
        (ok.isr, ok.partition_epoch, ok.leader_epoch),
        (vec![1], 8, 4)
    );
    assert_eq!(
        alter_isr(&r, &st, 2, 4, 7, &[2], &alive),
        Err(AlterError::NotLeader(2, 4))
    );
    assert_eq!(
        alter_isr(&r, &st, 1, 3, 7, &[1], &alive),
        Err(AlterError::NotLeader(1, 3))
    );
    assert_eq!(
        alter_isr(&r, &st, 1, 4, 6, &[1], &alive),
        Err(AlterError::StaleEpoch(6, 7))
    );
    assert_eq!(
        alter_isr(&r, &st, 1, 4, 7, &[2], &alive),
        Err(AlterError::DropsLeader)
    );
    assert_eq!(
        alter_isr(&r, &st, 1, 4, 7, &[1, 4], &alive),
        Err(AlterError::Ineligible(4))
    );
    let only12: BTreeSet<_> = [1, 2].into();
    assert_eq!(
        alter_isr(&r, &st, 1, 4, 7, &[1, 2, 3], &only12),
        Err(AlterError::Ineligible(3))
    );
    assert!(alter_isr(&r, &st, 1, 4, 7, &[1, 2, 3], &alive).is_ok());
}

#[derive(Debug, Clone)]
enum Op {
    Down(i32),
    Up(i32),
    Restart(i32),
    /// The leader of partition p shrinks its ISR to itself (a lagging follower).
    Shrink(i32),
    /// The leader of partition p adds every alive replica (they caught up).
    Grow(i32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1..=4i32).prop_map(Op::Down),
        (1..=4i32).prop_map(Op::Up),
        (1..=4i32).prop_map(Op::Restart),
        (0..4i32).prop_map(Op::Shrink),
        (0..4i32).prop_map(Op::Grow),
    ]
}

proptest! {
    /// Under any sequence of broker failures, restarts and ISR changes, with clean elections:
    /// every state keeps its invariants, leader epochs never go back, a leader is alive, and a
    /// new leader always comes from the ISR before the change (so it holds every acknowledged
    /// record). A partition is offline only when no ISR member is alive.
    #[test]
    fn clean_elections_only_ever_pick_an_isr_member(ops in proptest::collection::vec(op(), 1..60)) {
        let replicas = vec![vec![1, 2, 3], vec![2, 3, 4], vec![3, 4, 1], vec![4, 1, 2]];
        let mut c = cluster(4, replicas.clone(), false);
        let mut inc = 1u128;
        for o in ops {
            let before: BTreeMap<_, _> = c.image().partitions.iter()
                .map(|(k, v)| (k.clone(), v.value.clone())).collect();
            match o {
                Op::Down(b) => c.on_change(Change::BrokerGone(b)),
                Op::Up(b) => {
                    if !c.image().brokers.contains_key(&b) {
                        c.on_change(Change::Broker(broker(b, *c.incarnations.get(&b).map(|u| u.as_u128()).get_or_insert(1))));
                    }
                }
                Op::Restart(b) => { inc += 1; c.on_change(Change::Broker(broker(b, inc))); }
                Op::Shrink(p) | Op::Grow(p) => {
                    let st = state(&c, p);
                    if st.leader != NO_LEADER {
                        let alive = c.alive();
                        let isr: Vec<_> = if matches!(o, Op::Shrink(_)) { vec![st.leader] } else {
                            replicas[p as usize].iter().copied().filter(|b| alive.contains(b)).collect()
                        };
                        if let Ok(n) = alter_isr(&replicas[p as usize], &st, st.leader, st.leader_epoch, st.partition_epoch, &isr, &alive) {
                            let v = c.image().partitions[&("t".to_string(), p)].version;
                            c.on_change(Change::Partition(("t".into(), p), Versioned { value: n, version: v + 1 }));
                        }
                    }
                }
            }
            let mut prev = before.clone();
            for w in settle(&mut c) {
                let old = &prev[&w.key];
                prop_assert!(w.state.leader_epoch >= old.leader_epoch);
                prop_assert!(w.state.partition_epoch > old.partition_epoch);
                if w.state.leader != old.leader && w.state.leader != NO_LEADER {
                    prop_assert!(old.isr.contains(&w.state.leader),
                        "{:?}: leader {} not from ISR {:?}", w.key, w.state.leader, old.isr);
                    prop_assert!(w.state.leader_epoch > old.leader_epoch);
                }
                prev.insert(w.key.clone(), w.state.clone());
            }
            let alive = c.alive();
            for (k, v) in &c.image().partitions {
                prop_assert_eq!(v.value.check(&replicas[k.1 as usize]), Ok(()));
                if v.value.leader == NO_LEADER {
                    prop_assert!(v.value.isr.iter().all(|b| !alive.contains(b)));
                } else {
                    prop_assert!(alive.contains(&v.value.leader));
                }
            }
        }
    }
}
