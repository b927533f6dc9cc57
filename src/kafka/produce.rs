//! Produce: check each partition's batches (v2 magic, CRC-32C, sizes), queue them for the group
//! commit writer in arrival order, then answer when the writer has them in the log (`acks=1`)
//! or on disk (`acks=all`). `acks=0` gets no answer. A partition whose records fail a check gets
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
use crate::broker::Broker;

enum Outcome {
    Done(i16, Option<String>),
    /// Per batch: the writer's answer, and the record count (for the synchronous mirror wait).
    Waiting(Vec<(oneshot::Receiver<AppendResult>, i64)>, SyncWait),
}

/// What an `acks=all` produce to a synchronously mirrored topic must also wait for.
#[derive(Clone)]
struct SyncWait {
    partition: Option<Arc<crate::broker::Partition>>,
    regions: Vec<String>,
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

/// Validate and queue every batch of the request. Runs before the next request is read.
pub async fn start(broker: &Arc<Broker>, req: ProduceRequest, version: i16) -> Waiting {
    let acks = req.acks;
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
            } else if req.transactional_id.is_some() {
                Outcome::Done(
                    code::TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
                    Some("transactions are not supported".into()),
                )
            } else {
                match topic.as_ref().and_then(|t| t.partition(pd.index)) {
                    None => Outcome::Done(code::UNKNOWN_TOPIC_OR_PARTITION, None),
                    Some(partition) => {
                        let records = pd.records.unwrap_or_default();
                        match batch::split(&records) {
                            Err(e) => {
                                tracing::warn!(topic = %td.name.0.as_str(), partition = pd.index, error = %e, "refused produce: corrupt batch");
                                metrics::counter!("ferry_produce_rejected_total", "reason" => "corrupt").increment(1);
                                Outcome::Done(code::CORRUPT_MESSAGE, Some(e.to_string()))
                            }
                            Ok(batches) if batches.is_empty() => {
                                Outcome::Done(code::INVALID_RECORD, Some("no record batch".into()))
                            }
                            Ok(batches)
                                if batches
                                    .iter()
                                    .any(|(r, _)| r.len() > broker.config.batch_bytes_max) =>
                            {
                                Outcome::Done(code::MESSAGE_TOO_LARGE, None)
                            }
                            Ok(batches)
                                if batches
                                    .iter()
                                    .any(|(_, h)| h.is_transactional() || h.is_control()) =>
                            {
                                Outcome::Done(
                                    code::INVALID_RECORD,
                                    Some(
                                        "transactional and control batches are not supported"
                                            .into(),
                                    ),
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
                                        epoch: Some(*write.as_ref().unwrap_or(&0)),
                                        exact: false,
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
