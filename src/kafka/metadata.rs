//! Metadata: brokers, and topics with their partitions (this broker leads them all, except in
//! a region a failover demoted: there the new primary region's broker is named as the leader,
//! so producers bootstrapped in the old primary follow the switchover without a configuration
//! change). Requested topics that do not exist are created when auto-creation is on and the
//! client allows it (`allow_auto_topic_creation`).

use kafka_protocol::messages::metadata_request::MetadataRequest;
use kafka_protocol::messages::metadata_response::{
    MetadataResponse, MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{BrokerId, TopicName};

use super::{code, sb};
use crate::broker::{Broker, Topic};

/// The broker that leads `topic` for clients of this region: this one, or (in a region a
/// failover demoted) the first broker of the primary region, with its address.
pub fn leader_of(broker: &Broker, topic: &str) -> (i32, i32, Option<(String, u16)>) {
    let own = broker.config.node_id;
    let (Some(p), Some(region), Some(t)) = (
        broker.placement(topic),
        broker.config.region.as_deref(),
        broker.config.topology.as_ref(),
    ) else {
        return (own, 0, None);
    };
    if p.home == region && p.primary != region {
        if let Some(b) = t.region(&p.primary).and_then(|r| r.brokers.first()) {
            return (
                t.node_id(&p.primary, b.id),
                p.epoch,
                Some(b.advertised.clone()),
            );
        }
    }
    (own, p.epoch, None)
}

pub fn topic_entry(broker: &Broker, t: &Topic, version: i16) -> MetadataResponseTopic {
    let (leader, epoch, _) = leader_of(broker, &t.name);
    let node = BrokerId(leader);
    let mut mt = MetadataResponseTopic::default();
    mt.name = Some(TopicName(sb(&t.name)));
    // Fields a version lacks must stay at their defaults, or encoding fails.
    if version >= 10 {
        mt.topic_id = t.id;
    }
    if version >= 1 {
        mt.is_internal = t.is_internal();
    }
    mt.topic_authorized_operations = i32::MIN;
    mt.partitions = (0..t.partition_count())
        .map(|i| {
            let mut p = MetadataResponsePartition::default();
            p.partition_index = i;
            p.leader_id = node;
            if version >= 7 {
                p.leader_epoch = epoch;
            }
            p.replica_nodes = vec![node];
            p.isr_nodes = vec![node];
            p
        })
        .collect();
    mt
}

pub fn handle(broker: &Broker, req: MetadataRequest, version: i16) -> MetadataResponse {
    let mut resp = MetadataResponse::default();
    let (host, port) = broker.config.advertised();
    let mut b = MetadataResponseBroker::default();
    b.node_id = BrokerId(broker.config.node_id);
    b.host = sb(&host);
    b.port = port as i32;
    resp.brokers = vec![b];
    if version >= 2 {
        resp.cluster_id = Some(sb(&broker.config.cluster_id));
    }
    resp.controller_id = BrokerId(broker.config.node_id);
    resp.cluster_authorized_operations = i32::MIN;
    // v0 has no null: an empty list means every topic; v1+ null means every topic.
    let resp = topics(broker, req, version, resp);
    // Brokers of other regions that lead a topic here (after a failover).
    let mut extra = std::collections::BTreeMap::new();
    for t in resp.topics.iter().filter_map(|t| t.name.as_ref()) {
        if let (node, _, Some(addr)) = leader_of(broker, t.0.as_str()) {
            extra.insert(node, addr);
        }
    }
    let mut resp = resp;
    for (node, (host, port)) in extra {
        if resp.brokers.iter().all(|b| b.node_id.0 != node) {
            let mut b = MetadataResponseBroker::default();
            b.node_id = BrokerId(node);
            b.host = sb(&host);
            b.port = port as i32;
            resp.brokers.push(b);
        }
    }
    resp
}

fn topics(
    broker: &Broker,
    req: MetadataRequest,
    version: i16,
    mut resp: MetadataResponse,
) -> MetadataResponse {
    let all = match &req.topics {
        None => true,
        Some(t) if t.is_empty() && version == 0 => true,
        _ => false,
    };
    if all {
        resp.topics = broker
            .topics()
            .iter()
            .map(|t| topic_entry(broker, t, version))
            .collect();
        return resp;
    }
    let allow_create = version < 4 || req.allow_auto_topic_creation;
    for rt in req.topics.unwrap_or_default() {
        let found = match (&rt.name, rt.topic_id.is_nil()) {
            (Some(name), _) => {
                let name = name.0.as_str();
                if allow_create {
                    broker
                        .get_or_auto_create(name)
                        .map_err(|e| (e.kafka_code(), name.to_string()))
                } else {
                    broker
                        .topic(name)
                        .ok_or((code::UNKNOWN_TOPIC_OR_PARTITION, name.to_string()))
                }
            }
            (None, false) => broker
                .topic_by_id(rt.topic_id)
                .ok_or((code::UNKNOWN_TOPIC_ID, String::new())),
            (None, true) => Err((code::INVALID_REQUEST, String::new())),
        };
        match found {
            Ok(t) => resp.topics.push(topic_entry(broker, &t, version)),
            Err((err, name)) => {
                let mut mt = MetadataResponseTopic::default();
                mt.error_code = err;
                mt.name = if name.is_empty() {
                    None
                } else {
                    Some(TopicName(sb(&name)))
                };
                if version >= 10 {
                    mt.topic_id = rt.topic_id;
                }
                resp.topics.push(mt);
            }
        }
    }
    resp
}
