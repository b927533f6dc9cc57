//! ListOffsets (v1-v11): earliest (-2), latest (-1: the high watermark, or the last stable
//! offset for `read_committed`), max timestamp (-3, v7+), or the first record
//! whose timestamp is at or after a given one: found through the time index, then within its
//! batch (decompressed for the lookup if need be; the stored batch is untouched). The tiered
//! storage specs are answered as Kafka answers them without tiered storage: earliest local (-4,
//! v8+) is the log start; latest tiered (-5, v9+) and earliest pending upload (-6, v11+) have no
//! offset (-1, timestamp -1, leader epoch -1). A spec newer than the request's version gets
//! UNSUPPORTED_VERSION, as from Kafka.

use kafka_protocol::messages::list_offsets_request::ListOffsetsRequest;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsResponse, ListOffsetsTopicResponse,
};

use super::code;
use crate::broker::Broker;

pub const LATEST: i64 = -1;
pub const EARLIEST: i64 = -2;
pub const MAX_TIMESTAMP: i64 = -3;
pub const EARLIEST_LOCAL: i64 = -4;
pub const LATEST_TIERED: i64 = -5;
pub const EARLIEST_PENDING_UPLOAD: i64 = -6;

/// The first ListOffsets version that knows a special timestamp.
fn since(timestamp: i64) -> i16 {
    match timestamp {
        MAX_TIMESTAMP => 7,
        EARLIEST_LOCAL => 8,
        LATEST_TIERED => 9,
        EARLIEST_PENDING_UPLOAD => 11,
        _ => 0,
    }
}

pub fn handle(broker: &Broker, req: ListOffsetsRequest, version: i16) -> ListOffsetsResponse {
    let mut resp = ListOffsetsResponse::default();
    let isolation_level = req.isolation_level;
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
                    // Consumers see only up to the high watermark (the log end alone in a
                    // region); `read_committed` ones up to the last stable offset (v2+).
                    let hw = st.high_watermark();
                    let hw = if version >= 2 && isolation_level == 1 {
                        st.log.last_stable(hw)
                    } else {
                        hw
                    };
                    if version < since(p.timestamp) {
                        pr.error_code = code::UNSUPPORTED_VERSION;
                        tr.partitions.push(pr);
                        continue;
                    }
                    let found = match p.timestamp {
                        LATEST => Ok(Some((-1, hw))),
                        EARLIEST | EARLIEST_LOCAL => Ok(Some((-1, st.log.start_offset()))),
                        MAX_TIMESTAMP => st.log.max_timestamp(),
                        ts if ts >= 0 => st
                            .log
                            .offset_for_timestamp(ts)
                            .map(|o| o.map(|(off, t)| (t, off)).filter(|(_, off)| *off < hw)),
                        // Latest tiered, earliest pending upload: nothing is tiered here.
                        _ => {
                            if version >= 4 {
                                pr.leader_epoch = -1;
                            }
                            Ok(None)
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
