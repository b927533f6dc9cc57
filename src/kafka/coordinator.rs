//! FindCoordinator, OffsetCommit and OffsetFetch, minimal: this broker is every group's
//! coordinator and keeps committed offsets in memory. Enough for clients that assign partitions
//! themselves and commit; the group coordinator (rebalancing, durable `__consumer_offsets`) is
//! a separate piece of work.

use kafka_protocol::messages::find_coordinator_request::FindCoordinatorRequest;
use kafka_protocol::messages::find_coordinator_response::{Coordinator, FindCoordinatorResponse};
use kafka_protocol::messages::offset_commit_request::OffsetCommitRequest;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponse, OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequest;
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponse, OffsetFetchResponseGroup, OffsetFetchResponsePartition,
    OffsetFetchResponsePartitions, OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::{BrokerId, TopicName};

use super::{code, sb};
use crate::broker::{Broker, CommittedOffset};
use crate::log::now_ms;

pub fn find(broker: &Broker, req: FindCoordinatorRequest, version: i16) -> FindCoordinatorResponse {
    let (host, port) = broker.config.advertised();
    let mut resp = FindCoordinatorResponse::default();
    if version < 4 {
        resp.node_id = BrokerId(broker.config.node_id);
        resp.host = sb(&host);
        resp.port = port as i32;
        if req.key_type != 0 {
            resp.error_code = code::COORDINATOR_NOT_AVAILABLE;
            resp.node_id = BrokerId(-1);
        }
        return resp;
    }
    for key in req.coordinator_keys {
        let mut c = Coordinator::default();
        c.key = key;
        c.node_id = BrokerId(broker.config.node_id);
        c.host = sb(&host);
        c.port = port as i32;
        if req.key_type != 0 {
            c.error_code = code::COORDINATOR_NOT_AVAILABLE;
            c.node_id = BrokerId(-1);
        }
        resp.coordinators.push(c);
    }
    resp
}

pub fn commit(broker: &Broker, req: OffsetCommitRequest) -> OffsetCommitResponse {
    let group = req.group_id.0.to_string();
    let mut resp = OffsetCommitResponse::default();
    let mut store = broker.committed.lock().expect("offsets lock");
    for t in req.topics {
        let topic = broker.topic(t.name.0.as_str());
        let mut tr = OffsetCommitResponseTopic::default();
        tr.name = t.name.clone();
        for p in t.partitions {
            let mut pr = OffsetCommitResponsePartition::default();
            pr.partition_index = p.partition_index;
            if topic
                .as_ref()
                .and_then(|t| t.partition(p.partition_index))
                .is_none()
            {
                pr.error_code = code::UNKNOWN_TOPIC_OR_PARTITION;
            } else {
                store.insert(
                    (group.clone(), t.name.0.to_string(), p.partition_index),
                    CommittedOffset {
                        offset: p.committed_offset,
                        metadata: p.committed_metadata.map(|m| m.to_string()),
                        commit_timestamp: now_ms(),
                    },
                );
            }
            tr.partitions.push(pr);
        }
        resp.topics.push(tr);
    }
    resp
}

pub fn fetch(broker: &Broker, req: OffsetFetchRequest, version: i16) -> OffsetFetchResponse {
    let store = broker.committed.lock().expect("offsets lock");
    let lookup = |group: &str, topic: &str, p: i32| {
        store
            .get(&(group.to_string(), topic.to_string(), p))
            .cloned()
    };
    let all_for = |group: &str| -> Vec<(String, Vec<i32>)> {
        let mut m: std::collections::BTreeMap<String, Vec<i32>> = Default::default();
        for (g, t, p) in store.keys() {
            if g == group {
                m.entry(t.clone()).or_default().push(*p);
            }
        }
        m.into_iter().collect()
    };
    let mut resp = OffsetFetchResponse::default();
    if version < 8 {
        let group = req.group_id.0.to_string();
        let wanted: Vec<(String, Vec<i32>)> = match req.topics {
            Some(ts) => ts
                .into_iter()
                .map(|t| (t.name.0.to_string(), t.partition_indexes))
                .collect(),
            None => all_for(&group),
        };
        for (name, parts) in wanted {
            let mut tr = OffsetFetchResponseTopic::default();
            tr.name = TopicName(sb(&name));
            for p in parts {
                let mut pr = OffsetFetchResponsePartition::default();
                pr.partition_index = p;
                pr.committed_leader_epoch = -1;
                match lookup(&group, &name, p) {
                    Some(c) => {
                        pr.committed_offset = c.offset;
                        pr.metadata = c.metadata.map(|m| sb(&m));
                    }
                    None => {
                        pr.committed_offset = -1;
                        pr.metadata = Some(sb(""));
                    }
                }
                tr.partitions.push(pr);
            }
            resp.topics.push(tr);
        }
        return resp;
    }
    for g in req.groups {
        let group = g.group_id.0.to_string();
        let mut gr = OffsetFetchResponseGroup::default();
        gr.group_id = g.group_id.clone();
        let wanted: Vec<(String, Vec<i32>)> = match g.topics {
            Some(ts) => ts
                .into_iter()
                .map(|t| (t.name.0.to_string(), t.partition_indexes))
                .collect(),
            None => all_for(&group),
        };
        for (name, parts) in wanted {
            let mut tr = OffsetFetchResponseTopics::default();
            tr.name = TopicName(sb(&name));
            for p in parts {
                let mut pr = OffsetFetchResponsePartitions::default();
                pr.partition_index = p;
                pr.committed_leader_epoch = -1;
                match lookup(&group, &name, p) {
                    Some(c) => {
                        pr.committed_offset = c.offset;
                        pr.metadata = c.metadata.map(|m| sb(&m));
                    }
                    None => {
                        pr.committed_offset = -1;
                        pr.metadata = Some(sb(""));
                    }
                }
                tr.partitions.push(pr);
            }
            gr.topics.push(tr);
        }
        resp.groups.push(gr);
    }
    resp
}
