//! ListOffsets: earliest (-2), latest (-1), max timestamp (-3), or the first record whose
//! timestamp is at or after a given one: found through the time index, then within its batch
//! (decompressed for the lookup if need be; the stored batch is untouched).

use kafka_protocol::messages::list_offsets_request::ListOffsetsRequest;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsResponse, ListOffsetsTopicResponse,
};

use super::code;
use crate::broker::Broker;

pub const LATEST: i64 = -1;
pub const EARLIEST: i64 = -2;
pub const MAX_TIMESTAMP: i64 = -3;

pub fn handle(broker: &Broker, req: ListOffsetsRequest, version: i16) -> ListOffsetsResponse {
    let mut resp = ListOffsetsResponse::default();
    for t in req.topics {
        let topic = broker.topic(t.name.0.as_str());
        let mut tr = ListOffsetsTopicResponse::default();
        tr.name = t.name.clone();
        for p in t.partitions {
            let mut pr = ListOffsetsPartitionResponse::default();
            pr.partition_index = p.partition_index;
            pr.timestamp = -1;
            pr.offset = -1;
            if version >= 4 {
                pr.leader_epoch = 0;
            }
            match topic.as_ref().and_then(|t| t.partition(p.partition_index)) {
                None => pr.error_code = code::UNKNOWN_TOPIC_OR_PARTITION,
                Some(part) => {
                    let st = part.state.lock().expect("partition lock");
                    if !st.replica.leads() {
                        // In a region cluster only the leader answers (clients move).
                        pr.error_code = code::NOT_LEADER_OR_FOLLOWER;
                        tr.partitions.push(pr);
                        continue;
                    }
                    if version >= 4 {
                        pr.leader_epoch = st.replica.leader_epoch().unwrap_or(0);
                    }
                    // Consumers see only up to the high watermark (the log end alone in a region).
                    let hw = st.high_watermark();
                    let found = match p.timestamp {
                        LATEST => Ok(Some((-1, hw))),
                        EARLIEST => Ok(Some((-1, st.log.start_offset()))),
                        MAX_TIMESTAMP => st.log.max_timestamp(),
                        ts if ts >= 0 => st
                            .log
                            .offset_for_timestamp(ts)
                            .map(|o| o.map(|(off, t)| (t, off)).filter(|(_, off)| *off < hw)),
                        _ => {
                            // -4 (earliest local), -5 (latest tiered): one tier here.
                            if p.timestamp == -4 {
                                Ok(Some((-1, st.log.start_offset())))
                            } else {
                                Ok(Some((-1, hw)))
                            }
                        }
                    };
                    match found {
                        Ok(Some((ts, off))) => {
                            pr.timestamp = ts;
                            pr.offset = off;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::error!(error = %e, "list offsets failed");
                            pr.error_code = 56;
                        }
                    }
                }
            }
            tr.partitions.push(pr);
        }
        resp.topics.push(tr);
    }
    resp
}
