//! Transaction markers: the COMMIT or ABORT control batch that ends a transaction in each of
//! its partitions, written at the partition's leader.
//!
//! Owns: writing one marker at this broker ([`Broker::write_marker`]): stamped with the
//! partition's epoch, appended with `acks=all` (on disk; in a region cluster also in every
//! in-sync replica; on a synchronously mirrored topic also in every synchronous mirror region),
//! and, in `__consumer_offsets`, settling the offsets the transaction committed; and finding
//! where each marker goes ([`Broker::marker_route`]): this broker, another broker of the
//! region cluster (the coordinator sends it WriteTxnMarkers there, through
//! [`super::quarantine::RegionPeers::write_txn_markers`]), or nowhere (the partition is gone,
//! or its primary is another region now).
//!
//! Does not own: deciding a transaction's end or retrying its markers ([`super::txns`]), the
//! wire ([`crate::kafka::txn`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::writer::{AppendRequest, AppendResult, Writer};
use super::{Broker, NotReplicated, Partition};
use crate::batch;
use crate::clock::now_ms;
use crate::log::txn::{control_batch, Marker};
use crate::replica::Replica;

/// Kafka's error codes a marker's write answers with.
pub mod code {
    pub const UNKNOWN_SERVER_ERROR: i16 = -1;
    pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
    pub const NOT_LEADER_OR_FOLLOWER: i16 = 6;
    pub const NOT_ENOUGH_REPLICAS: i16 = 19;
}

/// How long a marker of a synchronously mirrored topic waits for its mirrors in one try.
const MARKER_MIRROR_WAIT: Duration = Duration::from_secs(5);

/// How long a marker in a region cluster waits for every in-sync replica in one try.
const MARKER_REPLICATION_WAIT: Duration = Duration::from_secs(5);

/// Where one partition's marker is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// At this broker (alone in its region, or the partition's leader).
    Here,
    /// At this broker of the region cluster (its Kafka address).
    Broker { id: i32, addr: String },
    /// Nowhere: the partition is gone, or another region is its primary now (a failover; the
    /// new primary ended the transaction there, [`super::txns::TxnService::abort_orphans`]).
    Done,
    /// Not now: the partition has no live leader (the coordinator tries again).
    Later(String),
}

/// One transaction's marker for some partitions led by one broker (WriteTxnMarkers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnMarker {
    pub producer_id: i64,
    pub epoch: i16,
    pub commit: bool,
    /// The coordinator's epoch: the leader epoch of `__transaction_state-0` it coordinates
    /// at (0 alone in a region).
    pub coordinator_epoch: i32,
    pub partitions: Vec<(String, i32)>,
}

/// Why a marker was not written (a Kafka error code and a message).
pub type MarkerError = (i16, String);

impl Broker {
    /// Where the marker of `topic`-`partition` goes.
    pub fn marker_route(&self, topic: &str, partition: i32) -> Route {
        if self.mirror_primary(topic).is_some() {
            return Route::Done;
        }
        let Some(link) = self.cluster() else {
            return match self.partition(topic, partition) {
                Some(_) => Route::Here,
                None => Route::Done,
            };
        };
        let img = link.member.image();
        if !img.topics.contains_key(topic) {
            return Route::Done;
        }
        let Some(state) = img.partitions.get(&(topic.to_string(), partition)) else {
            return Route::Later(format!(
                "{topic}-{partition} has no state in the cluster yet"
            ));
        };
        let leader = state.value.leader;
        if leader == link.id() {
            return Route::Here;
        }
        match img.brokers.get(&leader) {
            Some(b) => Route::Broker {
                id: b.id,
                addr: format!("{}:{}", b.host, b.port),
            },
            None => Route::Later(format!(
                "{topic}-{partition} has no live leader (broker {leader})"
            )),
        }
    }

    /// Write the marker of producer `producer_id` at `epoch` into `topic`-`partition`, which
    /// this broker leads (or holds alone), and wait until it counts: on disk, in every in-sync
    /// replica, in every synchronous mirror region. A marker in `__consumer_offsets` then
    /// settles the transaction's offsets in this broker's group coordinator (the offsets
    /// partition's leader is the group coordinator). Returns the marker's offset (-1 where
    /// none was needed: the partition's primary is another region now).
    pub async fn write_marker(
        &self,
        topic: &str,
        partition: i32,
        producer_id: i64,
        epoch: i16,
        commit: bool,
    ) -> Result<i64, MarkerError> {
        let Some(part) = self.partition(topic, partition) else {
            return Err((
                code::UNKNOWN_TOPIC_OR_PARTITION,
                format!("{topic}-{partition} does not exist here"),
            ));
        };
        if self.mirror_primary(topic).is_some() {
            return Ok(-1);
        }
        let (stamp, replicated) = marker_stamp(self, &part)?;
        let marker = if commit {
            Marker::Commit
        } else {
            Marker::Abort
        };
        let mut bytes = control_batch(producer_id, epoch, marker, 0, now_ms());
        // Stamped here, and written past a switchover's fence (no gate check): it ends a
        // transaction decided before the fence, which the fence waits for
        // ([`super::txns::TxnService::settle_fenced`]).
        if let Some(e) = stamp {
            batch::set_partition_leader_epoch(&mut bytes, e);
        }
        let rx = submit(self.writer(), &part, bytes, None)
            .await
            .map_err(|e| (code::UNKNOWN_SERVER_ERROR, e))?;
        let end = written_at(rx)
            .await
            .map_err(|e| (code::UNKNOWN_SERVER_ERROR, e))?;
        if let Some((leader_epoch, min_isr)) = replicated {
            part.wait_replicated(leader_epoch, min_isr, end, MARKER_REPLICATION_WAIT)
                .await
                .map_err(|e| match e {
                    NotReplicated::LeadershipMoved => (
                        code::NOT_LEADER_OR_FOLLOWER,
                        format!("{topic}-{partition}: {e}"),
                    ),
                    _ => (
                        code::NOT_ENOUGH_REPLICAS,
                        format!("{topic}-{partition}: {e}"),
                    ),
                })?;
        }
        // A synchronously mirrored topic: the marker counts once every synchronous mirror
        // region holds it, so a failover there never aborts a transaction this region
        // committed.
        let regions = self.sync_mirrors(topic);
        if !regions.is_empty() && !part.mirrors_have(&regions, end) {
            wait_mirrored(&part, &regions, end)
                .await
                .map_err(|e| (code::NOT_ENOUGH_REPLICAS, e))?;
        }
        if topic == crate::group::offsets::TOPIC {
            self.groups().on_txn_marker(producer_id, commit);
        }
        Ok(end - 1)
    }
}

/// The epoch a marker in `part` is stamped with, as the partition's own writes are (the
/// region epoch of a topic this region is primary of, alone in its region; the leader epoch
/// in a cluster; none for an internal topic alone in its region), and, in a cluster, the
/// leader epoch and `min.insync.replicas` it must be replicated under.
#[allow(clippy::type_complexity)]
fn marker_stamp(
    broker: &Broker,
    part: &Partition,
) -> Result<(Option<i32>, Option<(i32, usize)>), MarkerError> {
    let primary_here = broker.mirror_primary(&part.topic).is_none();
    let min_isr = || {
        broker
            .cluster()
            .zip(broker.topic(&part.topic))
            .map(|(c, t)| super::cluster::min_insync(c, &t.configs()))
            .unwrap_or(1)
    };
    let st = part.state.lock().expect("partition lock");
    match &st.replica {
        Replica::Solo if part.topic.starts_with("__") => Ok((None, None)),
        Replica::Solo if st.gate.writable || primary_here => Ok((Some(st.gate.epoch), None)),
        Replica::Solo => Err((
            code::NOT_LEADER_OR_FOLLOWER,
            format!(
                "{}-{} takes no writes here (a mirror, or fenced)",
                part.topic, part.index
            ),
        )),
        Replica::Leader(l) => Ok((Some(l.leader_epoch()), Some((l.leader_epoch(), min_isr())))),
        _ => Err((
            code::NOT_LEADER_OR_FOLLOWER,
            format!("{}-{} is not led by this broker", part.topic, part.index),
        )),
    }
}

/// Queue one batch built here with `acks=all` (stamped with `epoch` and gate-checked, if
/// given); the receiver answers once it is on disk.
pub(super) async fn submit(
    writer: &Writer,
    part: &Arc<Partition>,
    bytes: Vec<u8>,
    epoch: Option<i32>,
) -> Result<oneshot::Receiver<AppendResult>, String> {
    let header = batch::validate(&bytes).expect("a batch built here");
    let (tx, rx) = oneshot::channel();
    let req = AppendRequest {
        partition: part.clone(),
        bytes: bytes.into(),
        header,
        acks: -1,
        epoch,
        exact: false,
        gap_from: i64::MAX,
        reply: Some(tx),
    };
    writer.submit(req).await.map_err(|e| e.to_string())?;
    Ok(rx)
}

/// Wait for a single-record batch's append: the offset after it.
pub(super) async fn written_at(rx: oneshot::Receiver<AppendResult>) -> Result<i64, String> {
    match rx.await {
        Ok(Ok(ok)) => Ok(ok.base_offset + 1),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the writer stopped".into()),
    }
}

/// Wait up to [`MARKER_MIRROR_WAIT`] until every region in `regions` holds `part` below `end`.
async fn wait_mirrored(part: &Partition, regions: &[String], end: i64) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + MARKER_MIRROR_WAIT;
    loop {
        let notified = part.mirror_acked.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if part.mirrors_have(regions, end) {
            return Ok(());
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Err(format!(
                "the marker is not yet in the synchronous mirror region(s) {}",
                regions.join(", ")
            ));
        }
    }
}
