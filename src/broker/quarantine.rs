//! Quarantine: where a rejoining region puts the tail of a partition that is not in the new
//! primary's history, before cutting it from the log.
//!
//! Each divergent record is written again, uncompressed, into the local topic
//! `__ferry.quarantine.<topic>` (same partition), with its key, value, headers and timestamp and
//! four headers more: `ferry.original.offset`, `ferry.original.epoch`, `ferry.original.region`
//! and `ferry.original.partition`. The quarantine batches are on disk before the log is cut, so
//! a crash in between can only quarantine a record twice, never lose it. Internal topics are
//! never mirrored, so the quarantine stays in the region that accepted the records until an
//! operator replays it (`ferry quarantine replay`).
//!
//! In a region cluster the partition's leader does it: the quarantine topic is a cluster topic
//! (created through etcd, replicated like any other), its records are produced with `acks=all`
//! to the leader of their partition (this broker or another), then the leader cuts its log and
//! its high watermark back to the cut ([`crate::replica::leader::Leadership::on_cut`]); each
//! follower, fetching past the cut, is told the diverging epoch and truncates too. Committed
//! group offsets past the cut are moved back at the group coordinator, before the cut and
//! again after it.
//!
//! Owns: moving a tail to the quarantine topic and cutting it. Does not own: deciding where
//! two histories diverge ([`crate::log::epochs::divergence`]).

use std::sync::Arc;

use tokio::sync::oneshot;

use super::cluster::ClusterLink;
use super::writer::AppendRequest;
use super::{Broker, Partition, ProducerStates, TopicError};
use crate::batch::{self, build};
use crate::replica::Replica;

/// Quarantine topics are named `<PREFIX><topic>`.
pub const PREFIX: &str = "__ferry.quarantine.";

pub fn topic_for(topic: &str) -> String {
    format!("{PREFIX}{topic}")
}

/// How a broker of a region cluster reaches the others as a client, for the quarantine and
/// the transaction coordinator: the binary provides it (`cli::broker`, with Ferry's Kafka
/// client), so the broker does not depend on the client or the wire format.
pub trait RegionPeers: Send + Sync {
    /// Produce one batch with `acks=all` to `topic`-`partition` at its leader among `brokers`
    /// (Kafka addresses), following the leader if it moves.
    fn produce(
        &self,
        brokers: Vec<String>,
        topic: String,
        partition: i32,
        batch: Vec<u8>,
    ) -> PeerFuture<()>;
    /// Ask the broker at `addr` (its internal door) to move every group's commit of
    /// `topic`-`partition` past `offset` back to it ([`Broker::rewind_commits`] there).
    fn rewind_commits(
        &self,
        addr: String,
        topic: String,
        partition: i32,
        offset: i64,
    ) -> PeerFuture<usize>;
    /// Send one transaction's marker to the broker at `addr`, which leads every partition
    /// named (WriteTxnMarkers: at its internal door when this broker has the region's
    /// certificate, else on its Kafka listener). Answers each partition's error code.
    fn write_txn_markers(
        &self,
        addr: String,
        marker: super::markers::TxnMarker,
    ) -> PeerFuture<Vec<((String, i32), i16)>>;
    /// Ask the broker at `addr` (its internal door) to abort the transactions the old primary
    /// left open in the partitions of `topics` it leads ([`super::txns::TxnService::abort_led`]).
    fn abort_orphans(
        &self,
        addr: String,
        topics: Vec<String>,
    ) -> PeerFuture<Vec<super::txns::OrphanAbort>>;
    /// Ask the transaction coordinator at `addr` (its internal door) to settle the
    /// transactions on `topics`, which a switchover fenced: the transactional ids it aborted.
    fn settle_fenced(&self, addr: String, topics: Vec<String>) -> PeerFuture<Vec<String>>;
    /// Ask the transaction coordinator at `addr` whether `topic`-`partition` is in the open
    /// transaction of `transactional_id` at producer `producer_id`, `epoch` (KIP-890's
    /// AddPartitionsToTxn with `verify_only`): its error code for the partition.
    fn verify_txn(
        &self,
        addr: String,
        transactional_id: String,
        producer_id: i64,
        epoch: i16,
        topic: String,
        partition: i32,
    ) -> PeerFuture<i16>;
}

/// What a [`RegionPeers`] call returns.
pub type PeerFuture<T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, String>> + Send + 'static>>;

/// Read at most this much of a divergent tail per step.
const READ_BYTES: usize = 1 << 20;

/// A partition's tail from the cut on, re-encoded as quarantine batches.
struct Tail {
    /// Where the log is cut (the start of the batch holding the asked offset).
    cut: i64,
    batches: Vec<Vec<u8>>,
    records: usize,
}

impl Broker {
    /// Move the records of `topic`-`partition` at and past `offset` to its quarantine topic,
    /// then cut the log back to `offset`. Only for a partition that is a mirror here (its gate
    /// shut), so no client writes race the cut; in a region cluster only at its leader.
    /// Returns (records quarantined, new log end).
    pub async fn quarantine_and_truncate(
        self: &Arc<Self>,
        topic: &str,
        partition: i32,
        offset: i64,
        region: &str,
    ) -> Result<(usize, i64), String> {
        let t = self
            .topic(topic)
            .ok_or_else(|| format!("unknown topic '{topic}'"))?;
        let p = t
            .partition(partition)
            .ok_or_else(|| format!("unknown partition {topic}-{partition}"))?;
        if let Some(link) = self.cluster() {
            let link = link.clone();
            return self
                .quarantine_in_cluster(&link, &p, t.partition_count(), offset, region)
                .await;
        }
        let tail = self.divergent_tail(&p, offset, region, None)?;
        let offset = tail.cut;
        let records = tail.records;
        if !tail.batches.is_empty() {
            self.write_local_quarantine(topic, partition, t.partition_count(), tail.batches)
                .await?;
        }
        // The quarantine is on disk: cut the log.
        let end = cut_log(&p, offset, None)?;
        self.rewind_commits(topic, partition, offset).await?;
        announce(topic, partition, offset, records);
        Ok((records, end))
    }

    /// [`Broker::quarantine_and_truncate`] at a partition's leader in a region cluster.
    async fn quarantine_in_cluster(
        self: &Arc<Self>,
        link: &Arc<ClusterLink>,
        p: &Arc<Partition>,
        partitions: i32,
        offset: i64,
        region: &str,
    ) -> Result<(usize, i64), String> {
        let (topic, partition) = (p.topic.to_string(), p.index);
        let epoch = match &p.state.lock().expect("partition lock").replica {
            Replica::Leader(l) => l.leader_epoch(),
            _ => {
                return Err(format!(
                    "NOT_LEADER_OR_FOLLOWER: {topic}-{partition} is not led by this broker"
                ))
            }
        };
        let tail = self.divergent_tail(p, offset, region, Some(epoch))?;
        let offset = tail.cut;
        // Commits past the cut first: a failure here leaves the log as it was.
        self.rewind_commits_in_cluster(link, &topic, partition, offset)
            .await?;
        if !tail.batches.is_empty() {
            let qname = topic_for(&topic);
            if !link.member.image().topics.contains_key(&qname) {
                let new = super::cluster::NewTopic {
                    name: qname.clone(),
                    partitions: Some(partitions),
                    ..Default::default()
                };
                match super::cluster::create_topic(self, link, new).await {
                    Ok(_) | Err(TopicError::AlreadyExists(_)) => {}
                    Err(e) => return Err(format!("creating {qname} in the cluster: {e}")),
                }
            }
            let have = link
                .member
                .image()
                .topics
                .get(&qname)
                .map_or(0, |t| t.value.replicas.len());
            if have <= partition as usize {
                match super::cluster::create_partitions(
                    self,
                    link,
                    &qname,
                    partitions.max(partition + 1),
                    Vec::new(),
                    false,
                )
                .await
                {
                    Ok(()) | Err(TopicError::InvalidPartitions(_)) => {}
                    Err(e) => return Err(format!("adding partitions to {qname}: {e}")),
                }
            }
            let img = link.member.image();
            let brokers: Vec<String> = img
                .brokers
                .values()
                .map(|b| format!("{}:{}", b.host, b.port))
                .collect();
            let peers = self
                .peers()
                .ok_or("this broker has no way to reach the other brokers of its cluster")?
                .clone();
            for b in tail.batches {
                peers
                    .produce(brokers.clone(), qname.clone(), partition, b)
                    .await
                    .map_err(|e| format!("writing the quarantine {qname}-{partition}: {e}"))?;
            }
        }
        // The quarantine is in every in-sync replica of its partition: cut the log.
        let end = cut_log(p, offset, Some(epoch))?;
        if let Err(e) = self
            .rewind_commits_in_cluster(link, &topic, partition, offset)
            .await
        {
            tracing::warn!(%topic, partition, error = %e, "moving commits back to the cut again failed (they were moved before it)");
        }
        announce(&topic, partition, offset, tail.records);
        Ok((tail.records, end))
    }

    /// Read the tail of `p` from the batch holding `offset` on and re-encode it as quarantine
    /// batches. Refused where clients write the partition, and (with `leader_epoch`) unless
    /// this broker still leads it at that epoch.
    fn divergent_tail(
        &self,
        p: &Partition,
        offset: i64,
        region: &str,
        leader_epoch: Option<i32>,
    ) -> Result<Tail, String> {
        let (topic, partition) = (&*p.topic, p.index);
        // Whole batches only: the cut falls at the start of the batch holding `offset`
        // (`PartitionLog::cut_point`), and exactly the records from there on are set aside, so
        // the log ends where the cut says and the next divergence check finds nothing to cut.
        let offset = {
            let st = p.state.lock().expect("partition lock");
            if st.gate.writable {
                return Err(format!(
                    "{topic}-{partition} takes client writes here: only a mirror is cut back"
                ));
            }
            check_leader(&st.replica, leader_epoch, topic, partition)?;
            if offset < st.log.start_offset() {
                return Err(format!(
                    "{topic}-{partition}: offset {offset} is below the log start {}",
                    st.log.start_offset()
                ));
            }
            st.log.cut_point(offset).map_err(|e| e.to_string())?
        };
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut records = 0usize;
        let mut at = offset;
        loop {
            let slice = {
                let st = p.state.lock().expect("partition lock");
                if at >= st.log.next_offset() {
                    break;
                }
                st.log.read(at, READ_BYTES).map_err(|e| e.to_string())?
            };
            let Some(slice) = slice else { break };
            let bytes = slice.read().map_err(|e| e.to_string())?;
            let parts = batch::split(&bytes).map_err(|e| e.to_string())?;
            if parts.is_empty() {
                return Err(format!("{topic}-{partition}: no whole batch at {at}"));
            }
            for (range, h) in parts {
                if h.next_offset() <= at {
                    continue;
                }
                let (h, plain) = batch::plain_records(&bytes[range]).map_err(|e| e.to_string())?;
                let recs = batch::records_in(&h, &plain).map_err(|e| e.to_string())?;
                let Some(first) = recs.first() else {
                    at = h.next_offset();
                    continue;
                };
                let base_ts = first.timestamp;
                let mut batch_recs = Vec::with_capacity(recs.len());
                for r in recs.iter().filter(|r| r.offset >= offset) {
                    let mut headers: Vec<(String, Option<Vec<u8>>)> = r
                        .headers
                        .iter()
                        .map(|(k, v)| {
                            (
                                String::from_utf8_lossy(k).into_owned(),
                                v.map(|v| v.to_vec()),
                            )
                        })
                        .collect();
                    for (k, v) in [
                        ("ferry.original.offset", r.offset.to_string()),
                        ("ferry.original.epoch", h.partition_leader_epoch.to_string()),
                        ("ferry.original.region", region.to_string()),
                        ("ferry.original.partition", partition.to_string()),
                    ] {
                        headers.push((k.to_string(), Some(v.into_bytes())));
                    }
                    batch_recs.push(build::Record {
                        key: r.key.map(|k| k.to_vec()),
                        value: r.value.map(|v| v.to_vec()),
                        headers,
                        timestamp_delta: r.timestamp - base_ts,
                    });
                }
                records += batch_recs.len();
                if !batch_recs.is_empty() {
                    out.push(build::batch(0, base_ts, None, &batch_recs));
                }
                at = h.next_offset();
            }
        }
        Ok(Tail {
            cut: offset,
            batches: out,
            records,
        })
    }

    /// Append quarantine batches to this broker's own quarantine topic (a region of one
    /// broker), on disk when this returns.
    async fn write_local_quarantine(
        self: &Arc<Self>,
        topic: &str,
        partition: i32,
        partitions: i32,
        batches: Vec<Vec<u8>>,
    ) -> Result<(), String> {
        let qname = topic_for(topic);
        let qt = match self.topic(&qname) {
            Some(q) => q,
            None => {
                match self.create_topic(&qname, Some(partitions), None, Default::default(), false) {
                    Ok(q) => q,
                    Err(TopicError::AlreadyExists(_)) => {
                        self.topic(&qname).ok_or("quarantine topic vanished")?
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        };
        if qt.partition_count() <= partition {
            self.create_partitions(&qname, partition + 1, false)
                .map_err(|e| e.to_string())?;
        }
        let qp = self
            .partition(&qname, partition)
            .ok_or("quarantine partition missing")?;
        let mut waits = Vec::with_capacity(batches.len());
        for b in batches {
            let header = batch::validate(&b).map_err(|e| e.to_string())?;
            let (tx, rx) = oneshot::channel();
            self.writer()
                .submit(AppendRequest {
                    partition: qp.clone(),
                    bytes: b.into(),
                    header,
                    acks: -1,
                    epoch: None,
                    exact: false,
                    gap_from: i64::MAX,
                    reply: Some(tx),
                })
                .await
                .map_err(|_| "the broker is shutting down".to_string())?;
            waits.push(rx);
        }
        for rx in waits {
            rx.await
                .map_err(|_| "writer stopped".to_string())?
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Move every group's committed offset of `topic`-`partition` past `offset` back to it, at
    /// this broker's group coordinator. Returns how many were moved.
    pub async fn rewind_commits(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<usize, String> {
        // Commits past the cut would make a group skip the records mirrored into that range
        // next: bring them back to the cut.
        let past = self
            .groups()
            .with(|c| c.commits_past(topic, partition, offset));
        let n = past.len();
        for (group, c) in past {
            let moved = crate::group::Committed { offset, ..c };
            let code = self
                .groups()
                .write(&group, vec![(topic.to_string(), partition, Some(moved))])
                .await;
            if code != 0 {
                return Err(format!("moving group {group}'s commit on {topic}-{partition} back to {offset}: error {code}"));
            }
            tracing::warn!(%group, %topic, partition, offset, "rejoin: moved a committed offset back to the cut");
        }
        Ok(n)
    }

    /// [`Broker::rewind_commits`] at the cluster's group coordinator (the leader of
    /// `__consumer_offsets`), this broker or another through its internal door.
    async fn rewind_commits_in_cluster(
        &self,
        link: &ClusterLink,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<usize, String> {
        let img = link.member.image();
        let key = (crate::group::offsets::TOPIC.to_string(), 0);
        let Some(state) = img.partitions.get(&key) else {
            // No group has ever committed in this cluster.
            return Ok(0);
        };
        let leader = state.value.leader;
        if leader == self.config.node_id {
            return self.rewind_commits(topic, partition, offset).await;
        }
        let info = img
            .brokers
            .get(&leader)
            .ok_or_else(|| format!("the group coordinator (leader of {}-0) is not live", key.0))?;
        let addr = format!("{}:{}", info.host, info.port);
        let peers = self
            .peers()
            .ok_or("this broker has no way to reach the group coordinator")?
            .clone();
        peers
            .rewind_commits(addr.clone(), topic.to_string(), partition, offset)
            .await
            .map_err(|e| format!("the group coordinator at {addr}: {e}"))
    }
}

/// Whether `replica` is the leadership a cut was decided under (`None`: any part).
fn check_leader(
    replica: &Replica,
    leader_epoch: Option<i32>,
    topic: &str,
    partition: i32,
) -> Result<(), String> {
    let Some(e) = leader_epoch else { return Ok(()) };
    match replica {
        Replica::Leader(l) if l.leader_epoch() == e => Ok(()),
        _ => Err(format!(
            "NOT_LEADER_OR_FOLLOWER: {topic}-{partition} is no longer led here at epoch {e}"
        )),
    }
}

/// Cut `p`'s log back to `offset` (a batch boundary), rebuild its producer states, and at a
/// cluster leader take the high watermark back with it. Returns the new log end.
fn cut_log(p: &Partition, offset: i64, leader_epoch: Option<i32>) -> Result<i64, String> {
    let (topic, partition) = (&*p.topic, p.index);
    let mut st = p.state.lock().expect("partition lock");
    check_leader(&st.replica, leader_epoch, topic, partition)?;
    let cut = st.log.truncate_to(offset).map_err(|e| e.to_string())?;
    if cut != offset {
        // Another cut got there first (two streams into the partition).
        return Err(format!(
            "{topic}-{partition}: the log moved while its tail from {offset} was set aside (it now ends at {cut})"
        ));
    }
    st.producers = ProducerStates::rebuild(&st.log).map_err(|e| e.to_string())?;
    if let Replica::Leader(l) = &mut st.replica {
        l.on_cut(offset);
    }
    Ok(st.log.next_offset())
}

fn announce(topic: &str, partition: i32, offset: i64, records: usize) {
    tracing::warn!(
        %topic,
        partition,
        offset,
        records,
        quarantine = %topic_for(topic),
        "rejoin: moved the divergent tail of {topic}-{partition} from offset {offset} ({records} records) to the quarantine"
    );
}
