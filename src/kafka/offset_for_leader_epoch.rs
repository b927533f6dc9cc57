//! OffsetForLeaderEpoch: where an epoch ends in this partition's log (KIP-101, KIP-320).
//! Clients ask it after a leader change to learn whether the records they read were truncated;
//! the answer is the largest epoch at or below the one asked and its end offset
//! ([`crate::log::epochs::end_offset_for`]), the log end for the latest epoch. Only a leader
//! answers in a region cluster, fenced by the `current_leader_epoch` asked, as Fetch is.

use kafka_protocol::messages::offset_for_leader_epoch_request::OffsetForLeaderEpochRequest;
use kafka_protocol::messages::offset_for_leader_epoch_response::{
    EpochEndOffset, OffsetForLeaderEpochResponse, OffsetForLeaderTopicResult,
};

use super::code;
use crate::broker::Broker;
use crate::log::epochs::end_offset_for;

pub fn handle(broker: &Broker, req: OffsetForLeaderEpochRequest) -> OffsetForLeaderEpochResponse {
    let mut resp = OffsetForLeaderEpochResponse::default();
    for t in req.topics {
        let topic = broker.topic(t.topic.0.as_str());
        let mut tr = OffsetForLeaderTopicResult::default();
        tr.topic = t.topic.clone();
        for p in t.partitions {
            let mut r = EpochEndOffset::default();
            r.partition = p.partition;
            r.leader_epoch = -1;
            r.end_offset = -1;
            match topic.as_ref().and_then(|t| t.partition(p.partition)) {
                None => r.error_code = code::UNKNOWN_TOPIC_OR_PARTITION,
                Some(part) => {
                    let st = part.state.lock().expect("partition lock");
                    r.error_code = super::leader_check(&st.replica, p.current_leader_epoch);
                    if r.error_code == 0 {
                        let (e, end) =
                            end_offset_for(st.log.epochs(), st.log.next_offset(), p.leader_epoch);
                        r.leader_epoch = e;
                        r.end_offset = end;
                    }
                }
            }
            tr.partitions.push(r);
        }
        resp.topics.push(tr);
    }
    resp
}
