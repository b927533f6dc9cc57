//! DeleteRecords: move a partition's log start offset up (`kafka-delete-records`, the admin
//! clients' `deleteRecords`). Records below it are gone for readers at once (Fetch below it is
//! OFFSET_OUT_OF_RANGE, ListOffsets earliest answers it) and segments wholly below it are
//! deleted; the new start is durable before the answer.
//!
//! Kafka's rules: offset -1 means the high watermark; an offset past the high watermark is
//! OFFSET_OUT_OF_RANGE; a topic whose `cleanup.policy` is `compact` alone is POLICY_VIOLATION;
//! only the partition's leader takes it (NOT_LEADER_OR_FOLLOWER
//! elsewhere). Ferry adds: a mirror topic's records follow its primary, so a client's
//! DeleteRecords there is POLICY_VIOLATION, and internal topics refuse it too. In a region
//! cluster the followers take the leader's log start from their next fetch; the answer's low
//! watermark is the leader's (Kafka waits for every replica's).
//!
//! Owns: the request's checks and answer. Does not own: the log start itself
//! ([`crate::log::PartitionLog::advance_start`]).

use kafka_protocol::messages::delete_records_request::DeleteRecordsRequest;
use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsResponse, DeleteRecordsTopicResult,
};

use super::code;
use crate::broker::Broker;
use crate::log::LogError;

pub fn handle(broker: &Broker, req: DeleteRecordsRequest) -> DeleteRecordsResponse {
    let mut resp = DeleteRecordsResponse::default();
    for t in req.topics {
        let name = t.name.0.to_string();
        let topic = broker.topic(&name);
        let mirror = match (broker.placement(&name), broker.config.region.as_deref()) {
            (Some(p), Some(region)) => p.primary != region,
            _ => false,
        };
        let mut tr = DeleteRecordsTopicResult::default();
        tr.name = t.name.clone();
        for p in t.partitions {
            let mut pr = DeleteRecordsPartitionResult::default();
            pr.partition_index = p.partition_index;
            pr.low_watermark = -1;
            let Some(part) = topic.as_ref().and_then(|t| t.partition(p.partition_index)) else {
                pr.error_code = code::UNKNOWN_TOPIC_OR_PARTITION;
                tr.partitions.push(pr);
                continue;
            };
            if mirror || name.starts_with("__") {
                pr.error_code = code::POLICY_VIOLATION;
                tr.partitions.push(pr);
                continue;
            }
            let mut st = part.state.lock().expect("partition lock");
            if !st.replica.leads() {
                pr.error_code = code::NOT_LEADER_OR_FOLLOWER;
                tr.partitions.push(pr);
                continue;
            }
            if !st.log.config().delete {
                // As Kafka: records of a `cleanup.policy=compact` topic go only by compaction.
                pr.error_code = code::POLICY_VIOLATION;
                tr.partitions.push(pr);
                continue;
            }
            let hw = st.high_watermark();
            let to = if p.offset == -1 { hw } else { p.offset };
            if to < 0 || to > hw {
                pr.error_code = code::OFFSET_OUT_OF_RANGE;
                tr.partitions.push(pr);
                continue;
            }
            match st.log.advance_start(to) {
                Ok(start) => {
                    pr.low_watermark = start;
                    tracing::info!(topic = %name, partition = p.partition_index, log_start = start, "deleted records: the log start moved up");
                }
                Err(LogError::OffsetOutOfRange { .. }) => pr.error_code = code::OFFSET_OUT_OF_RANGE,
                Err(e) => {
                    tracing::error!(topic = %name, partition = p.partition_index, error = %e, "delete records failed");
                    pr.error_code = 56; // KAFKA_STORAGE_ERROR
                }
            }
            tr.partitions.push(pr);
        }
        resp.topics.push(tr);
    }
    resp
}
