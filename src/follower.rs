//! The follower's fetch loop: one task per leader this broker follows partitions of, sending
//! the Kafka Fetch request with this broker's replica id (version 12: topic names, the last
//! fetched epoch per partition, the diverging epoch in the answer), as Kafka's
//! ReplicaFetcherThread does.
//!
//! Each round: for every partition followed from that leader, fetch from this log's end with its
//! last epoch. The leader answers with batches, or with the epoch where this log left its own
//! (after a leader change, the tail an old leader wrote and never replicated): the log is then
//! cut there ([`crate::log::PartitionLog::truncate_to`], whole batches only) and the next round
//! fetches from the cut. Batches are appended byte for byte at their offsets through the group
//! commit writer with `acks=all`, so a follower's next fetch offset (what the leader counts as
//! held) is always on its disk. The follower's high watermark is the leader's, capped at its
//! log end.
//!
//! Owns: the fetch tasks and their connections. Does not own: which partitions are followed
//! from whom ([`crate::broker::cluster`] decides from the image and publishes it in
//! [`ClusterLink::follow`]), the leader's side (the Fetch handler).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kafka_protocol::messages::fetch_request::{FetchPartition, FetchRequest, FetchTopic};
use kafka_protocol::messages::fetch_response::FetchResponse;
use kafka_protocol::messages::{BrokerId as KBrokerId, TopicName};
use kafka_protocol::protocol::StrBytes;
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use crate::batch;
use crate::broker::cluster::{ClusterLink, FollowSet};
use crate::broker::writer::AppendRequest;
use crate::broker::Broker;
use crate::client::Client;
use crate::cluster::metadata::BrokerId;
use crate::replica::Replica;

/// Fetch version: 12 names topics (13 and later only by id) and carries the last fetched epoch.
const FETCH_VERSION: i16 = 12;
/// How long a leader may hold a fetch with nothing new (Kafka's `replica.fetch.wait.max.ms`).
const WAIT_MS: i32 = 500;
const PARTITION_BYTES: i32 = 8 << 20;
const RESPONSE_BYTES: i32 = 32 << 20;

/// Run this broker's fetchers: one task per leader it follows partitions of, started, told
/// and stopped as [`ClusterLink::follow`] changes, until the link goes.
pub fn spawn(broker: Arc<Broker>, link: Arc<ClusterLink>) {
    let mut rx = link.follow.subscribe();
    tokio::spawn(async move {
        let mut fetchers = Fetchers::default();
        loop {
            let follow = rx.borrow_and_update().clone();
            fetchers.set(&broker, &link, follow);
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
}

/// The running fetch tasks, one per leader.
#[derive(Default)]
struct Fetchers {
    tasks: BTreeMap<BrokerId, watch::Sender<FollowSet>>,
}

impl Fetchers {
    /// Follow exactly `follow` (per leader) from now on: tasks start for new leaders, get their
    /// new sets, and stop when they have nothing left to follow.
    fn set(
        &mut self,
        broker: &Arc<Broker>,
        link: &ClusterLink,
        mut follow: BTreeMap<BrokerId, FollowSet>,
    ) {
        self.tasks.retain(|leader, tx| match follow.remove(leader) {
            Some(set) => {
                tx.send_if_modified(|old| {
                    let changed = *old != set;
                    *old = set;
                    changed
                });
                true
            }
            None => false, // dropping the sender stops the task
        });
        for (leader, set) in follow {
            let (tx, rx) = watch::channel(set);
            let me = link.id();
            let member = link.member.clone();
            tokio::spawn(run(broker.clone(), member, me, leader, rx));
            self.tasks.insert(leader, tx);
        }
    }
}

async fn run(
    broker: Arc<Broker>,
    member: crate::cluster::member::Member,
    me: BrokerId,
    leader: BrokerId,
    mut rx: watch::Receiver<FollowSet>,
) {
    let mut client: Option<Client> = None;
    let mut backoff = Duration::from_millis(50);
    info!(leader, "fetching from leader {leader}");
    loop {
        if rx.has_changed().is_err() {
            info!(leader, "no longer following leader {leader}");
            return;
        }
        let set = rx.borrow_and_update().clone();
        if set.is_empty() {
            if rx.changed().await.is_err() {
                return;
            }
            continue;
        }
        if client.is_none() {
            let addr = member
                .image()
                .brokers
                .get(&leader)
                .map(|b| format!("{}:{}", b.host, b.port));
            match addr {
                None => debug!(leader, "leader not registered"),
                Some(addr) => match Client::connect(&addr).await {
                    Ok(mut c) => {
                        c.timeout = Duration::from_secs(15);
                        client = Some(c);
                        backoff = Duration::from_millis(50);
                    }
                    Err(e) => debug!(leader, error = %e, "cannot reach the leader"),
                },
            }
            if client.is_none() {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = rx.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        }
        let req = request(&broker, me, &set);
        let resp = match client
            .as_mut()
            .expect("connected")
            .send(&req, FETCH_VERSION)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                debug!(leader, error = %e, "fetch from the leader failed");
                client = None;
                continue;
            }
        };
        let idle = apply(&broker, leader, &set, resp).await;
        if idle {
            // Every partition refused (not the leader any more, fenced): wait for metadata.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = rx.changed() => {}
            }
        }
    }
}

fn request(broker: &Broker, me: BrokerId, set: &FollowSet) -> FetchRequest {
    let mut req = FetchRequest::default();
    req.replica_id = KBrokerId(me);
    req.max_wait_ms = WAIT_MS;
    req.min_bytes = 1;
    req.max_bytes = RESPONSE_BYTES;
    req.session_epoch = -1;
    let mut topics: BTreeMap<&str, FetchTopic> = BTreeMap::new();
    for ((topic, index), epoch) in set {
        let Some(part) = broker.partition(topic, *index) else {
            continue;
        };
        let (end, start, last_epoch) = {
            let st = part.state.lock().expect("partition lock");
            (
                st.log.next_offset(),
                st.log.start_offset(),
                st.log.epochs().last().map_or(-1, |e| e.epoch),
            )
        };
        let mut fp = FetchPartition::default();
        fp.partition = *index;
        fp.current_leader_epoch = *epoch;
        fp.fetch_offset = end;
        fp.last_fetched_epoch = last_epoch;
        fp.log_start_offset = start;
        fp.partition_max_bytes = PARTITION_BYTES;
        topics
            .entry(topic)
            .or_insert_with(|| {
                let mut t = FetchTopic::default();
                t.topic = TopicName(StrBytes::from_string(topic.clone()));
                t
            })
            .partitions
            .push(fp);
    }
    req.topics = topics.into_values().collect();
    req
}

/// Kafka's OFFSET_OUT_OF_RANGE.
const OFFSET_OUT_OF_RANGE: i16 = 1;

/// Apply a fetch answer; true when the leader refused every partition (back off until the
/// metadata changes).
async fn apply(
    broker: &Arc<Broker>,
    leader: BrokerId,
    set: &FollowSet,
    resp: FetchResponse,
) -> bool {
    let mut idle = true;
    for t in resp.responses {
        let topic = t.topic.0.to_string();
        for pd in t.partitions {
            let key = (topic.clone(), pd.partition_index);
            let Some(&epoch) = set.get(&key) else {
                continue;
            };
            let Some(part) = broker.partition(&topic, pd.partition_index) else {
                continue;
            };
            let following = |r: &Replica| matches!(r, Replica::Follower { leader: l, leader_epoch: e, .. } if *l == leader && *e == epoch);
            if pd.error_code == OFFSET_OUT_OF_RANGE {
                // The leader's log starts past this one's end (retention deleted what this
                // replica would fetch next): start again empty at the leader's log start.
                let mut st = part.state.lock().expect("partition lock");
                let end = st.log.next_offset();
                if following(&st.replica) && pd.log_start_offset > end {
                    match st.log.reset_to(pd.log_start_offset) {
                        Ok(()) => {
                            warn!(topic = %topic, partition = pd.partition_index, leader, from = end, to = pd.log_start_offset, "the leader's log starts past this replica's end: emptied it and start again at the leader's log start");
                            st.producers = Default::default();
                            if let Replica::Follower { high_watermark, .. } = &mut st.replica {
                                *high_watermark = (*high_watermark).max(pd.log_start_offset);
                            }
                            idle = false;
                        }
                        Err(e) => {
                            warn!(topic = %topic, partition = pd.partition_index, error = %e, "starting the log again at the leader's log start failed")
                        }
                    }
                }
                continue;
            }
            if pd.error_code == 0 {
                idle = false;
            } else {
                debug!(topic = %topic, partition = pd.partition_index, leader, code = pd.error_code, "the leader refused a fetch");
                continue;
            }
            if pd.diverging_epoch.epoch != -1 || pd.diverging_epoch.end_offset != -1 {
                // This log left the leader's: cut it where they part, then fetch from there.
                let mut st = part.state.lock().expect("partition lock");
                if !following(&st.replica) {
                    continue;
                }
                let end = st.log.next_offset();
                let cut = crate::replica::truncation_point(
                    st.log.epochs(),
                    end,
                    st.log.start_offset(),
                    (pd.diverging_epoch.epoch, pd.diverging_epoch.end_offset),
                );
                match st.log.truncate_to(cut) {
                    Ok(new_end) => {
                        warn!(topic = %topic, partition = pd.partition_index, leader, from = end, to = new_end, "truncated to the leader's history (records past it were never acknowledged, or the leader moved them to the quarantine)");
                        if let Replica::Follower { high_watermark, .. } = &mut st.replica {
                            *high_watermark = (*high_watermark).min(new_end);
                        }
                    }
                    Err(e) => {
                        warn!(topic = %topic, partition = pd.partition_index, error = %e, "truncation failed")
                    }
                }
                continue;
            }
            let mut waits = Vec::new();
            if let Some(records) = &pd.records {
                let end = part.state.lock().expect("partition lock").log.next_offset();
                // This loop alone writes a follower's log: it still ends where the fetch
                // asked from, and the leader holds nothing between there and its first batch
                // (a gap its cleaner left), nor between one batch and the next.
                let mut from = end;
                for (range, h) in batch::whole_batches(records) {
                    if h.next_offset() <= end {
                        continue;
                    }
                    let bytes = records.slice(range);
                    let header = match batch::validate(&bytes) {
                        Ok(h) => h,
                        Err(e) => {
                            warn!(topic = %topic, partition = pd.partition_index, leader, error = %e, "a corrupt batch from the leader: fetching again");
                            break;
                        }
                    };
                    let (tx, rx) = oneshot::channel();
                    let req = AppendRequest {
                        partition: part.clone(),
                        bytes,
                        header,
                        acks: -1,
                        epoch: None,
                        exact: true,
                        gap_from: from,
                        reply: Some(tx),
                    };
                    from = header.next_offset();
                    if broker.writer().submit(req).await.is_err() {
                        return true;
                    }
                    waits.push(rx);
                }
            }
            for rx in waits {
                match rx.await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        debug!(topic = %topic, partition = pd.partition_index, error = %e, "follower append refused");
                        break;
                    }
                    Err(_) => break,
                }
            }
            let mut st = part.state.lock().expect("partition lock");
            let end = st.log.next_offset();
            if following(&st.replica) {
                if let Replica::Follower { high_watermark, .. } = &mut st.replica {
                    *high_watermark = pd.high_watermark.min(end).max(0);
                }
                // The leader's log start (DeleteRecords there): records below it go here too.
                let leader_start = pd.log_start_offset.min(end);
                if leader_start > st.log.start_offset() {
                    if let Err(e) = st.log.advance_start(leader_start) {
                        warn!(topic = %topic, partition = pd.partition_index, error = %e, "taking the leader's log start failed");
                    }
                }
            }
        }
    }
    idle
}
