//! Produce: check each partition's batches (v2 magic, CRC-32C, sizes), queue them for the group
//! commit writer in arrival order, then answer when the writer has them in the log (`acks=1`)
//! or on disk (`acks=all`; in a region cluster also on the disk of every in-sync replica, with
//! `min.insync.replicas` enforced). `acks=0` gets no answer. A partition whose records fail a check gets
//! its error and nothing of it is written; the other partitions are unaffected.

use std::sync::Arc;

use kafka_protocol::messages::produce_request::ProduceRequest;
use kafka_protocol::messages::produce_response::{
    PartitionProduceResponse, ProduceResponse, TopicProduceResponse,
};
use kafka_protocol::messages::TopicName;
use tokio::sync::oneshot;

use super::{code, sb};
use crate::batch;
use crate::broker::writer::{AppendRequest, AppendResult};
use crate::broker::{Broker, NotReplicated};
use crate::replica::Replica;

enum Outcome {
    Done(i16, Option<String>),
    /// Per batch: the writer's answer, and the record count (for the synchronous mirror wait).
    Waiting(Vec<(oneshot::Receiver<AppendResult>, i64)>, SyncWait),
}

/// What an `acks=all` produce must also wait for: the synchronous mirror regions of its topic,
/// and in a region cluster every in-sync replica (the high watermark).
#[derive(Clone)]
struct SyncWait {
    partition: Option<Arc<crate::broker::Partition>>,
    regions: Vec<String>,
    /// The leader epoch the records were written at and `min.insync.replicas`.
    replicated: Option<(i32, usize)>,
}

/// In a region cluster, may this broker take the produce for `partition`? The epoch to stamp,
/// and for `acks=all` what to wait for; or the Kafka error (not the leader; fewer in-sync
/// replicas than `min.insync.replicas`).
#[allow(clippy::type_complexity)]
fn replica_check(
    broker: &Broker,
    partition: &crate::broker::Partition,
    topic: &crate::broker::Topic,
    acks: i16,
    region_epoch: i32,
) -> Result<(i32, Option<(i32, usize)>), (i16, String)> {
    let st = partition.state.lock().expect("partition lock");
    match &st.replica {
        Replica::Solo => Ok((region_epoch, None)),
        Replica::Leader(l) => {
            let min_isr = broker
                .cluster()
                .map(|c| crate::broker::cluster::min_insync(c, &topic.configs()))
                .unwrap_or(1);
            if acks == -1 && l.isr().len() < min_isr {
                return Err((
                    code::NOT_ENOUGH_REPLICAS,
                    format!(
                        "{}-{} has {} in-sync replicas ({:?}), min.insync.replicas is {min_isr}",
                        partition.topic,
                        partition.index,
                        l.isr().len(),
                        l.isr()
                    ),
                ));
            }
            Ok((
                l.leader_epoch(),
                (acks == -1).then_some((l.leader_epoch(), min_isr)),
            ))
        }
        other => Err((
            code::NOT_LEADER_OR_FOLLOWER,
            format!(
                "broker {} does not lead {}-{} (leader: {})",
                broker.config.node_id,
                partition.topic,
                partition.index,
                other.leader(broker.config.node_id).unwrap_or(-1)
            ),
        )),
    }
}

/// Wait until every in-sync replica has the records below `end` ([`Partition::wait_replicated`]);
/// the Kafka error to answer with otherwise.
async fn wait_replicated(
    partition: &crate::broker::Partition,
    epoch: i32,
    min_isr: usize,
    end: i64,
    timeout: std::time::Duration,
) -> Result<(), (i16, String)> {
    partition
        .wait_replicated(epoch, min_isr, end, timeout)
        .await
        .map_err(|e| {
            let c = match e {
                NotReplicated::BelowMinIsr(_) => code::NOT_ENOUGH_REPLICAS_AFTER_APPEND,
                NotReplicated::LeadershipMoved => code::NOT_LEADER_OR_FOLLOWER,
                NotReplicated::TimedOut => code::REQUEST_TIMED_OUT,
            };
            (c, e.to_string())
        })
}

/// (topic name, topic id, per partition: index and outcome).
type TopicOutcome = (TopicName, uuid::Uuid, Vec<(i32, Outcome)>);

/// A produce whose batches are queued; [`Waiting::finish`] builds the answer.
pub struct Waiting {
    acks: i16,
    timeout: std::time::Duration,
    version: i16,
    topics: Vec<TopicOutcome>,
}

/// Whether a (validated) batch holds a record without a key, or cannot be read to tell.
fn has_keyless(batch_bytes: &[u8]) -> bool {
    batch::plain_records(batch_bytes)
        .and_then(|(h, plain)| {
            Ok(batch::records_in(&h, &plain)?
                .iter()
                .any(|r| r.key.is_none()))
        })
        .unwrap_or(true)
}

/// Whether a batch may be written by a client: never a control batch (only the transaction
/// coordinator writes markers); a transactional one only with the request's transactional id,
/// into a transaction that holds this partition (KIP-890's verification, so a late write after
/// the transaction ended cannot open a transaction no one will end).
async fn transactional_check(
    broker: &Broker,
    txn_id: Option<&str>,
    h: &batch::BatchHeader,
    topic: &str,
    partition: i32,
) -> Result<(), (i16, String)> {
    if h.is_control() {
        return Err((
            code::INVALID_RECORD,
            "clients may not write control batches (transaction markers)".into(),
        ));
    }
    match (txn_id, h.is_transactional()) {
        (None, false) => Ok(()),
        (None, true) => Err((
            code::INVALID_RECORD,
            "a transactional batch needs the request's transactional id".into(),
        )),
        (Some(_), false) => Err((
            code::INVALID_RECORD,
            "a request with a transactional id may hold only transactional batches".into(),
        )),
        (Some(id), true) => {
            let e = broker
                .txns()
                .verify_anywhere(
                    broker,
                    id,
                    h.producer_id,
                    h.producer_epoch,
                    topic,
                    partition,
                )
                .await;
            // The coordinator cannot answer now: retriable, as Kafka answers it.
            let e = if crate::broker::txns::retriable(e) {
                code::NOT_ENOUGH_REPLICAS
            } else {
                e
            };
            if e == 0 {
                Ok(())
            } else {
                Err((
                    e,
                    format!("{topic}-{partition} is not in an open transaction of '{id}' at producer id {} epoch {}", h.producer_id, h.producer_epoch),
                ))
            }
        }
    }
}

/// [`transactional_check`] of one partition's batches: each distinct producer, epoch and kind
/// once (in a region cluster a check may ask the coordinator).
async fn txn_check_all(
    broker: &Broker,
    txn_id: Option<&str>,
    batches: &[(std::ops::Range<usize>, batch::BatchHeader)],
    topic: &str,
    partition: i32,
) -> Result<(), (i16, String)> {
    let mut seen: Vec<(i64, i16, bool, bool)> = Vec::new();
    for (_, h) in batches {
        let k = (
            h.producer_id,
            h.producer_epoch,
            h.is_transactional(),
            h.is_control(),
        );
        if seen.contains(&k) {
            continue;
        }
        seen.push(k);
        transactional_check(broker, txn_id, h, topic, partition).await?;
    }
    Ok(())
}

/// Validate and queue every batch of the request. Runs before the next request is read.
pub async fn start(broker: &Arc<Broker>, req: ProduceRequest, version: i16) -> Waiting {
    let acks = req.acks;
    let txn_id = req.transactional_id.as_ref().map(|t| t.0.to_string());
    let mut topics = Vec::with_capacity(req.topic_data.len());
    for td in req.topic_data {
        let topic = broker.topic(td.name.0.as_str());
        // A topic whose primary is another region is a read-only mirror here; a fenced one
        // (switchover, lost lease) takes no writes.
        let write = broker.write_check(td.name.0.as_str());
        let mut parts = Vec::with_capacity(td.partition_data.len());
        for pd in td.partition_data {
            let outcome = if let Err((code, message)) = &write {
                Outcome::Done(*code, Some(message.clone()))
            } else if !(-1..=1).contains(&acks) {
                Outcome::Done(code::INVALID_REQUIRED_ACKS, None)
            } else {
                match topic.as_ref().and_then(|t| t.partition(pd.index)) {
                    None => Outcome::Done(code::UNKNOWN_TOPIC_OR_PARTITION, None),
                    Some(partition) => match replica_check(
                        broker,
                        &partition,
                        topic.as_ref().expect("found"),
                        acks,
                        *write.as_ref().unwrap_or(&0),
                    ) {
                        Err((code, message)) => Outcome::Done(code, Some(message)),
                        Ok((epoch, replicated)) => {
                            let records = pd.records.unwrap_or_default();
                            let split = batch::split(&records);
                            let txn_verdict = match &split {
                                Ok(batches) => {
                                    txn_check_all(
                                        broker,
                                        txn_id.as_deref(),
                                        batches,
                                        td.name.0.as_str(),
                                        pd.index,
                                    )
                                    .await
                                }
                                Err(_) => Ok(()),
                            };
                            match split {
                                Err(e) => {
                                    tracing::warn!(topic = %td.name.0.as_str(), partition = pd.index, error = %e, "refused produce: corrupt batch");
                                    metrics::counter!("ferry_produce_rejected_total", "reason" => "corrupt").increment(1);
                                    Outcome::Done(code::CORRUPT_MESSAGE, Some(e.to_string()))
                                }
                                Ok(batches) if batches.is_empty() => Outcome::Done(
                                    code::INVALID_RECORD,
                                    Some("no record batch".into()),
                                ),
                                Ok(batches)
                                    if batches
                                        .iter()
                                        .any(|(r, _)| r.len() > broker.config.batch_bytes_max) =>
                                {
                                    Outcome::Done(code::MESSAGE_TOO_LARGE, None)
                                }
                                Ok(_) if txn_verdict.is_err() => {
                                    let (code, message) = txn_verdict.expect_err("checked");
                                    Outcome::Done(code, Some(message))
                                }
                                Ok(batches)
                                    if partition.is_compacted()
                                        && batches
                                            .iter()
                                            .any(|(r, _)| has_keyless(&records[r.clone()])) =>
                                {
                                    metrics::counter!("ferry_produce_rejected_total", "reason" => "keyless").increment(1);
                                    Outcome::Done(
                                        code::INVALID_RECORD,
                                        Some(format!(
                                            "Compacted topic cannot accept message without key in topic partition {}-{}.",
                                            td.name.0.as_str(),
                                            pd.index
                                        )),
                                    )
                                }
                                Ok(batches) => {
                                    let mut rxs = Vec::with_capacity(batches.len());
                                    let sync = SyncWait {
                                        partition: Some(partition.clone()),
                                        regions: if acks == -1 {
                                            broker.sync_mirrors(td.name.0.as_str())
                                        } else {
                                            Vec::new()
                                        },
                                        replicated,
                                    };
                                    let topic_label = td.name.0.to_string();
                                    for (range, header) in batches {
                                        metrics::counter!("ferry_bytes_in_total", "topic" => topic_label.clone())
                                        .increment(range.len() as u64);
                                        metrics::counter!("ferry_records_in_total", "topic" => topic_label.clone())
                                        .increment(header.record_count.max(0) as u64);
                                        let (tx, rx) = oneshot::channel();
                                        let req = AppendRequest {
                                            partition: partition.clone(),
                                            bytes: records.slice(range),
                                            header,
                                            acks,
                                            epoch: Some(epoch),
                                            exact: false,
                                            gap_from: i64::MAX,
                                            reply: if acks == 0 { None } else { Some(tx) },
                                        };
                                        if broker.writer().submit(req).await.is_err() {
                                            break;
                                        }
                                        rxs.push((rx, header.last_offset_delta as i64 + 1));
                                    }
                                    Outcome::Waiting(rxs, sync)
                                }
                            }
                        }
                    },
                }
            };
            parts.push((pd.index, outcome));
        }
        topics.push((td.name, td.topic_id, parts));
    }
    Waiting {
        acks,
        timeout: std::time::Duration::from_millis(req.timeout_ms.clamp(0, 300_000) as u64),
        version,
        topics,
    }
}

impl Waiting {
    /// Wait for the writer and build the response (`None` for acks=0).
    pub async fn finish(self) -> Option<ProduceResponse> {
        if self.acks == 0 {
            return None;
        }
        let mut resp = ProduceResponse::default();
        for (name, topic_id, parts) in self.topics {
            let mut tr = TopicProduceResponse::default();
            tr.name = name;
            tr.topic_id = topic_id;
            for (index, outcome) in parts {
                let mut pr = PartitionProduceResponse::default();
                pr.index = index;
                pr.base_offset = -1;
                pr.log_append_time_ms = -1;
                match outcome {
                    Outcome::Done(err, msg) => {
                        pr.error_code = err;
                        if self.version >= 8 {
                            pr.error_message = msg.map(|m| sb(&m));
                        }
                    }
                    Outcome::Waiting(rxs, sync) => {
                        let mut first = true;
                        let mut end = -1i64;
                        for (rx, count) in rxs {
                            match rx.await {
                                Ok(Ok(ok)) => {
                                    end = end.max(ok.base_offset + count);
                                    if first {
                                        pr.base_offset = ok.base_offset;
                                        if self.version >= 5 {
                                            pr.log_start_offset = ok.log_start_offset;
                                        }
                                    }
                                }
                                Ok(Err(e)) => {
                                    pr.error_code = e.kafka_code();
                                    if self.version >= 8 {
                                        pr.error_message = Some(sb(&e.to_string()));
                                    }
                                }
                                Err(_) => pr.error_code = code::UNKNOWN_SERVER_ERROR,
                            }
                            first = false;
                        }
                        if let (0, Some((epoch, min_isr)), Some(part)) =
                            (pr.error_code, sync.replicated, sync.partition.as_ref())
                        {
                            if end >= 0 {
                                if let Err((code, message)) =
                                    wait_replicated(part, epoch, min_isr, end, self.timeout).await
                                {
                                    pr.error_code = code;
                                    if self.version >= 8 {
                                        pr.error_message = Some(sb(&message));
                                    }
                                }
                            }
                        }
                        if pr.error_code == 0 && !sync.regions.is_empty() && end >= 0 {
                            let part = sync.partition.as_ref().expect("set with regions");
                            if !wait_mirrors(part, &sync.regions, end, self.timeout).await {
                                // Written here, not yet in every synchronous mirror: the client
                                // retries (an idempotent producer's retry is not written twice).
                                pr.error_code = code::REQUEST_TIMED_OUT;
                                if self.version >= 8 {
                                    pr.error_message = Some(sb(&format!(
                                        "not yet on disk in the synchronous mirror region(s) {}",
                                        sync.regions.join(", ")
                                    )));
                                }
                            }
                        }
                    }
                }
                tr.partition_responses.push(pr);
            }
            resp.responses.push(tr);
        }
        Some(resp)
    }
}

/// Wait until every region in `regions` has acknowledged `partition` up to `end`, or `timeout`.
async fn wait_mirrors(
    partition: &crate::broker::Partition,
    regions: &[String],
    end: i64,
    timeout: std::time::Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let notified = partition.mirror_acked.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if partition.mirrors_have(regions, end) {
            return true;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return partition.mirrors_have(regions, end);
        }
    }
}
