//! MirrorAppend: Ferry's own request (API key [`KEY`], outside Kafka's range) with which a
//! region's gateway writes the primary region's batches into the local mirror, at the same
//! offsets and with the same bytes. Kafka clients never send it.
//!
//! Request (after a request header v1: api key, version 1, correlation id, client id):
//! `topic: i16 length + UTF-8`, `partition: i32`, `partition_count: i32`, `continues_from: i64`
//! (version 1), `records: i32 length + batches`. The mirror topic is created (or grown) to
//! `partition_count` partitions first. Each batch must be whole and CRC-valid; one wholly below
//! the log end is a resend and skipped; the first new one must start at the log end, or past it
//! when the request says its batches continue the stream from an offset at or below the log end
//! (`continues_from`): the source holds nothing in between (its cleaner, or its log start, left a
//! gap). A log that ends below `continues_from` (it was cut meanwhile) refuses the batches, so
//! a stream never skips what the log lacks. Version 0 has no gaps. The answer comes once the batches are on
//! disk (fdatasync), and gives the offset after the request's last batch, or for a request
//! without records the log end; either way durable. In a region cluster only the partition's
//! leader takes it (NOT_LEADER_OR_FOLLOWER elsewhere), the mirror topic is created through etcd
//! with the region's replication factor, and "durable" means on the disk of every in-sync
//! replica (the high watermark passed it; without records the answer is the high watermark).
//!
//! Response (header v0): `error_code: i16`, `log_end_offset: i64`, `message: i16 length + UTF-8`.
//! Records: empty to only ensure the topic and learn the log end.
//!
//! Only topics the topology makes mirrors here are accepted (their primary is another region),
//! so the request cannot write into topics that clients produce to.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::sync::oneshot;

use super::code;
use crate::batch;
use crate::broker::writer::AppendRequest;
use crate::broker::{Broker, NotReplicated, TopicError};
use crate::replica::Replica;

/// How long a MirrorAppend in a region cluster waits for every in-sync replica.
const REPLICATED_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The API key (Kafka's own keys stay below 100).
pub const KEY: i16 = 20_000;

/// A decoded MirrorAppend request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorAppend {
    pub topic: String,
    pub partition: i32,
    pub partition_count: i32,
    /// The stream offset the batches continue from (-1: no gap allowed, version 0).
    pub continues_from: i64,
    pub records: Bytes,
}

fn get_str(b: &mut Bytes) -> Option<String> {
    if b.remaining() < 2 {
        return None;
    }
    let n = b.get_i16();
    if n < 0 || b.remaining() < n as usize {
        return None;
    }
    String::from_utf8(b.split_to(n as usize).to_vec()).ok()
}

/// Decode a whole frame (header included). `None` for anything malformed.
pub fn decode(mut frame: Bytes) -> Option<(i32, MirrorAppend)> {
    if frame.remaining() < 8 {
        return None;
    }
    let key = frame.get_i16();
    let version = frame.get_i16();
    let cid = frame.get_i32();
    if key != KEY || !(0..=1).contains(&version) {
        return None;
    }
    // client id (nullable string) and empty tagged fields are not used
    if frame.remaining() < 2 {
        return None;
    }
    let n = frame.get_i16();
    if n > 0 {
        if frame.remaining() < n as usize {
            return None;
        }
        frame.advance(n as usize);
    }
    let topic = get_str(&mut frame)?;
    if frame.remaining() < 12 {
        return None;
    }
    let partition = frame.get_i32();
    let partition_count = frame.get_i32();
    let continues_from = if version >= 1 {
        if frame.remaining() < 12 {
            return None;
        }
        frame.get_i64()
    } else {
        -1
    };
    let len = frame.get_i32();
    if len < 0 || frame.remaining() != len as usize {
        return None;
    }
    Some((
        cid,
        MirrorAppend {
            topic,
            partition,
            partition_count,
            continues_from,
            records: frame,
        },
    ))
}

/// Encode a request frame (with its length prefix), for the gateway's client.
pub fn encode_request(cid: i32, req: &MirrorAppend) -> Bytes {
    let mut b = BytesMut::with_capacity(32 + req.topic.len() + req.records.len());
    b.put_i32(0);
    b.put_i16(KEY);
    b.put_i16(1);
    b.put_i32(cid);
    b.put_i16(-1);
    b.put_i16(req.topic.len() as i16);
    b.put_slice(req.topic.as_bytes());
    b.put_i32(req.partition);
    b.put_i32(req.partition_count);
    b.put_i64(req.continues_from);
    b.put_i32(req.records.len() as i32);
    b.put_slice(&req.records);
    let n = (b.len() - 4) as i32;
    b[0..4].copy_from_slice(&n.to_be_bytes());
    b.freeze()
}

/// Encode a response frame (with its length prefix).
pub fn encode_response(cid: i32, error: i16, log_end: i64, message: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(24 + message.len());
    b.put_i32(0);
    b.put_i32(cid);
    b.put_i16(error);
    b.put_i64(log_end);
    let m = &message.as_bytes()[..message.len().min(i16::MAX as usize)];
    b.put_i16(m.len() as i16);
    b.put_slice(m);
    let n = (b.len() - 4) as i32;
    b[0..4].copy_from_slice(&n.to_be_bytes());
    b.freeze()
}

/// Decode a response body (after the length prefix): (correlation id, error, log end, message).
pub fn decode_response(mut b: Bytes) -> Option<(i32, i16, i64, String)> {
    if b.remaining() < 14 {
        return None;
    }
    let cid = b.get_i32();
    let err = b.get_i16();
    let end = b.get_i64();
    let msg = get_str(&mut b).unwrap_or_default();
    Some((cid, err, end, msg))
}

/// Serve one MirrorAppend: (error code, log end offset, message).
pub async fn handle(broker: Arc<Broker>, req: MirrorAppend) -> (i16, i64, String) {
    let Some(placement) = broker
        .placement(&req.topic)
        .filter(|_| broker.mirror_primary(&req.topic).is_some())
    else {
        return (
            code::POLICY_VIOLATION,
            -1,
            format!("topic '{}' is not a mirror in this region", req.topic),
        );
    };
    // Ensure the mirror topic with the source's partition count (in a region cluster through
    // etcd, replicated as the region's defaults say).
    let topic = match broker.topic(&req.topic) {
        Some(t) => t,
        None if broker.cluster().is_some() => {
            let link = broker.cluster().expect("checked").clone();
            let (_, configs) = broker.topic_defaults(&req.topic);
            let made = crate::broker::cluster::create_topic(
                &broker,
                &link,
                crate::broker::cluster::NewTopic {
                    name: req.topic.clone(),
                    partitions: Some(req.partition_count.max(1)),
                    configs,
                    ..Default::default()
                },
            )
            .await;
            match made {
                Ok(_) | Err(TopicError::AlreadyExists(_)) => {}
                Err(e) => return (e.kafka_code(), -1, e.to_string()),
            }
            match broker.topic(&req.topic) {
                Some(t) => t,
                None => {
                    return (
                        code::UNKNOWN_TOPIC_OR_PARTITION,
                        -1,
                        "the mirror topic is not here yet: try again".into(),
                    )
                }
            }
        }
        None => {
            let (_, configs) = broker.topic_defaults(&req.topic);
            match broker.create_topic(
                &req.topic,
                Some(req.partition_count.max(1)),
                None,
                configs,
                false,
            ) {
                Ok(t) => t,
                Err(TopicError::AlreadyExists(_)) => match broker.topic(&req.topic) {
                    Some(t) => t,
                    None => {
                        return (
                            code::UNKNOWN_TOPIC_OR_PARTITION,
                            -1,
                            "topic vanished".into(),
                        )
                    }
                },
                Err(e) => return (e.kafka_code(), -1, e.to_string()),
            }
        }
    };
    if topic.partition_count() < req.partition_count {
        if let Some(link) = broker.cluster().cloned() {
            // Grown through etcd: every broker of the region opens the new partitions.
            match crate::broker::cluster::create_partitions(
                &broker,
                &link,
                &req.topic,
                req.partition_count,
                Vec::new(),
                false,
            )
            .await
            {
                Ok(()) | Err(TopicError::InvalidPartitions(_)) => {}
                Err(e) => return (e.kafka_code(), -1, e.to_string()),
            }
        }
    }
    if topic.partition_count() < req.partition_count && broker.cluster().is_none() {
        if let Err(e) = broker.create_partitions(&req.topic, req.partition_count, false) {
            if !matches!(e, TopicError::InvalidPartitions(_)) {
                return (e.kafka_code(), -1, e.to_string());
            }
        }
    }
    let Some(partition) = broker.partition(&req.topic, req.partition) else {
        return (
            code::UNKNOWN_TOPIC_OR_PARTITION,
            -1,
            "no such partition".into(),
        );
    };
    // In a region cluster only the partition's leader appends (its followers copy it), and the
    // answer waits until every in-sync replica has the batches.
    let replicated = {
        let st = partition.state.lock().expect("partition lock");
        match &st.replica {
            Replica::Solo => None,
            Replica::Leader(l) => Some((
                l.leader_epoch(),
                broker
                    .cluster()
                    .map(|c| crate::broker::cluster::min_insync(c, &topic.configs()))
                    .unwrap_or(1),
                st.high_watermark(),
            )),
            other => {
                return (
                    code::NOT_LEADER_OR_FOLLOWER,
                    -1,
                    format!(
                        "broker {} does not lead {}-{} (leader: {})",
                        broker.config.node_id,
                        req.topic,
                        req.partition,
                        other.leader(broker.config.node_id).unwrap_or(-1)
                    ),
                )
            }
        }
    };
    let batches = match batch::split(&req.records) {
        Ok(b) => b,
        Err(e) => return (code::CORRUPT_MESSAGE, partition.offsets().1, e.to_string()),
    };
    // A mirror holds only its primary's history: no batch may carry an epoch this region has
    // not adopted for the rule (every epoch up to the rule's is some primary's, written before
    // this region learnt of the next; a newer one comes from no primary it knows), except,
    // when the primary is a region cluster, a leader epoch of its own: those take the form of
    // the primary's region epochs (`failover::epoch_region`), so no other region wrote them.
    let primary_index = broker.config.topology.as_ref().and_then(|t| {
        t.regions
            .iter()
            .position(|r| r.name == placement.primary && r.cluster.is_some())
    });
    if let Some((_, h)) = batches.iter().find(|(_, h)| {
        h.partition_leader_epoch > placement.epoch
            && Some(crate::failover::epoch_region(h.partition_leader_epoch)) != primary_index
    }) {
        tracing::warn!(topic = %req.topic, partition = req.partition, batch_epoch = h.partition_leader_epoch,
            rule_epoch = placement.epoch, "refused a MirrorAppend: a batch from an epoch this region never adopted");
        return (
            code::FENCED_LEADER_EPOCH,
            partition.offsets().1,
            format!(
                "the batch at offset {} carries epoch {}, newer than epoch {} of rule '{}' here: not its primary's history",
                h.base_offset, h.partition_leader_epoch, placement.epoch, placement.pattern
            ),
        );
    }
    // The answer is where this request's batches end (all durable by then), not the log end:
    // a second copy of the stream may have appended further batches that are not synced yet.
    let Some(last_end) = batches.last().map(|(_, h)| h.next_offset()) else {
        if let Some((_, _, hw)) = replicated {
            // In a cluster what every in-sync replica holds: the high watermark (batches past
            // it are resent by the source, skipped here as resends, and waited for).
            return (code::NONE, hw, String::new());
        }
        // No records: the log end, made durable first (it may hold batches another copy of
        // the stream appended and that are still waiting for their fsync).
        let (end, file) = {
            let st = partition.state.lock().expect("partition lock");
            (st.log.next_offset(), st.log.active_file())
        };
        return match tokio::task::spawn_blocking(move || file.sync_data()).await {
            Ok(Ok(())) => (code::NONE, end, String::new()),
            Ok(Err(e)) => (56, -1, format!("fdatasync: {e}")),
            Err(_) => (56, -1, "sync task failed".into()),
        };
    };
    let mut waits = Vec::with_capacity(batches.len());
    // Each batch continues the source's log from the one before it; the first from where the
    // request says (version 0: from its own base, no gap).
    let mut from = if req.continues_from >= 0 {
        req.continues_from
    } else {
        i64::MAX
    };
    for (range, header) in batches {
        let (tx, rx) = oneshot::channel();
        let a = AppendRequest {
            partition: partition.clone(),
            bytes: req.records.slice(range),
            header,
            acks: -1,
            epoch: None,
            exact: true,
            gap_from: from,
            reply: Some(tx),
        };
        from = header.next_offset();
        if broker.writer().submit(a).await.is_err() {
            return (56, -1, "shutting down".into());
        }
        waits.push(rx);
    }
    for rx in waits {
        match rx.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return (e.kafka_code(), partition.offsets().1, e.to_string()),
            Err(_) => return (56, -1, "writer stopped".into()),
        }
    }
    if let Some((epoch, min_isr, _)) = replicated {
        if let Err(e) = partition
            .wait_replicated(epoch, min_isr, last_end, REPLICATED_TIMEOUT)
            .await
        {
            let c = match e {
                NotReplicated::BelowMinIsr(_) => code::NOT_ENOUGH_REPLICAS_AFTER_APPEND,
                NotReplicated::LeadershipMoved => code::NOT_LEADER_OR_FOLLOWER,
                NotReplicated::TimedOut => code::REQUEST_TIMED_OUT,
            };
            return (c, -1, e.to_string());
        }
    }
    (code::NONE, last_end, String::new())
}

/// MirrorAck: Ferry's own request (API key [`ACK_KEY`]) with which a region's gateway tells its
/// broker how far a mirror region holds a partition on disk. Produces with `acks=all` to a
/// topic mirrored synchronously wait for it.
///
/// Request (after a request header v1): `topic: i16 length + UTF-8`, `partition: i32`,
/// `region: i16 length + UTF-8`, `offset: i64` (the mirror's log end). Response (header v0):
/// `error_code: i16`, `log_end_offset: i64` (unused, -1), `message`.
pub const ACK_KEY: i16 = 20_001;

/// Encode a MirrorAck request frame (with its length prefix).
pub fn encode_ack(cid: i32, topic: &str, partition: i32, region: &str, offset: i64) -> Bytes {
    let mut b = BytesMut::with_capacity(40 + topic.len() + region.len());
    b.put_i32(0);
    b.put_i16(ACK_KEY);
    b.put_i16(0);
    b.put_i32(cid);
    b.put_i16(-1);
    b.put_i16(topic.len() as i16);
    b.put_slice(topic.as_bytes());
    b.put_i32(partition);
    b.put_i16(region.len() as i16);
    b.put_slice(region.as_bytes());
    b.put_i64(offset);
    let n = (b.len() - 4) as i32;
    b[0..4].copy_from_slice(&n.to_be_bytes());
    b.freeze()
}

/// Decode a MirrorAck frame (header included): (cid, topic, partition, region, offset).
pub fn decode_ack(mut frame: Bytes) -> Option<(i32, String, i32, String, i64)> {
    if frame.remaining() < 10 {
        return None;
    }
    let key = frame.get_i16();
    let version = frame.get_i16();
    let cid = frame.get_i32();
    if key != ACK_KEY || version != 0 {
        return None;
    }
    let n = frame.get_i16();
    if n > 0 {
        if frame.remaining() < n as usize {
            return None;
        }
        frame.advance(n as usize);
    }
    let topic = get_str(&mut frame)?;
    if frame.remaining() < 4 {
        return None;
    }
    let partition = frame.get_i32();
    let region = get_str(&mut frame)?;
    if frame.remaining() != 8 {
        return None;
    }
    Some((cid, topic, partition, region, frame.get_i64()))
}

/// Serve a MirrorAck: error code.
pub fn handle_ack(broker: &Broker, topic: &str, partition: i32, region: &str, offset: i64) -> i16 {
    match broker.partition(topic, partition) {
        Some(p) => {
            p.mirror_ack(region, offset);
            code::NONE
        }
        None => code::UNKNOWN_TOPIC_OR_PARTITION,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_response_round_trip() {
        let req = MirrorAppend {
            topic: "orders".into(),
            partition: 3,
            partition_count: 6,
            continues_from: 17,
            records: Bytes::from_static(b"batches"),
        };
        let f = encode_request(9, &req);
        assert_eq!(decode(f.slice(4..)), Some((9, req)));
        assert!(decode(f.slice(4..f.len() - 1)).is_none());
        let r = encode_response(9, 0, 42, "ok");
        assert_eq!(decode_response(r.slice(4..)), Some((9, 0, 42, "ok".into())));
    }
}
