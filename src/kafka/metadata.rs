//! Metadata: brokers, and topics with their partitions (this broker leads them all, except in
//! a region a failover demoted: there the new primary region's broker is named as the leader,
//! so producers bootstrapped in the old primary follow the switchover without a configuration
//! change). Requested topics that do not exist are created when auto-creation is on and the
//! client allows it (`allow_auto_topic_creation`).
//!
//! In a region cluster the answer comes from the cluster's metadata (etcd, as this broker last
//! saw it): every live broker, the controller, and per partition its leader, leader epoch,
//! replicas and ISR. A topic being auto-created answers LEADER_NOT_AVAILABLE until it exists,
//! as in Kafka.

use kafka_protocol::messages::metadata_request::MetadataRequest;
use kafka_protocol::messages::metadata_response::{
    MetadataResponse, MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{BrokerId, TopicName};

use std::sync::Arc;

use super::{code, sb};
use crate::broker::cluster::ClusterLink;
use crate::broker::{Broker, Topic};
use crate::cluster::metadata::{Image, NO_LEADER};

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

pub fn handle(broker: &Arc<Broker>, req: MetadataRequest, version: i16) -> MetadataResponse {
    if let Some(link) = broker.cluster() {
        return cluster(broker, link, req, version);
    }
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

/// The answer in a region cluster.
fn cluster(
    broker: &Arc<Broker>,
    link: &Arc<ClusterLink>,
    req: MetadataRequest,
    version: i16,
) -> MetadataResponse {
    let img = link.member.image();
    let mut resp = MetadataResponse::default();
    for b in img.brokers.values() {
        let mut mb = MetadataResponseBroker::default();
        mb.node_id = BrokerId(b.id);
        mb.host = sb(&b.host);
        mb.port = b.port as i32;
        if version >= 1 {
            mb.rack = b.rack.as_deref().map(sb);
        }
        resp.brokers.push(mb);
    }
    if version >= 2 {
        resp.cluster_id = Some(sb(&broker.config.cluster_id));
    }
    resp.controller_id = BrokerId(img.controller.unwrap_or(-1));
    resp.cluster_authorized_operations = i32::MIN;
    let all = match &req.topics {
        None => true,
        Some(t) if t.is_empty() && version == 0 => true,
        _ => false,
    };
    if all {
        resp.topics = img
            .topics
            .keys()
            .map(|name| cluster_topic(&img, name, version))
            .collect();
        return resp;
    }
    let allow_create =
        (version < 4 || req.allow_auto_topic_creation) && broker.config.auto_create_topics;
    for rt in req.topics.unwrap_or_default() {
        let name = match (&rt.name, rt.topic_id.is_nil()) {
            (Some(n), _) => Some(n.0.to_string()),
            (None, false) => img
                .topics
                .values()
                .find(|t| t.value.id == rt.topic_id)
                .map(|t| t.value.name.clone()),
            (None, true) => None,
        };
        let mut mt = MetadataResponseTopic::default();
        match name {
            Some(n) if img.topics.contains_key(&n) => {
                resp.topics.push(cluster_topic(&img, &n, version));
                continue;
            }
            Some(n) => {
                mt.name = Some(TopicName(sb(&n)));
                if allow_create && crate::broker::validate_topic_name(&n).is_ok() {
                    mt.error_code = code::LEADER_NOT_AVAILABLE;
                    let (b, l) = (broker.clone(), link.clone());
                    tokio::spawn(async move {
                        let (partitions, configs) = b.topic_defaults(&n);
                        let new = crate::broker::cluster::NewTopic {
                            name: n.clone(),
                            partitions,
                            configs,
                            ..Default::default()
                        };
                        match crate::broker::cluster::create_topic(&b, &l, new).await {
                            Ok(_) | Err(crate::broker::TopicError::AlreadyExists(_)) => {}
                            Err(e) => {
                                tracing::warn!(topic = %n, error = %e, "auto-creation failed")
                            }
                        }
                    });
                } else {
                    mt.error_code = code::UNKNOWN_TOPIC_OR_PARTITION;
                }
            }
            None => {
                mt.error_code = if rt.topic_id.is_nil() {
                    code::INVALID_REQUEST
                } else {
                    code::UNKNOWN_TOPIC_ID
                };
            }
        }
        if version >= 10 {
            mt.topic_id = rt.topic_id;
        }
        resp.topics.push(mt);
    }
    resp
}

fn cluster_topic(img: &Image, name: &str, version: i16) -> MetadataResponseTopic {
    let t = &img.topics[name].value;
    let mut mt = MetadataResponseTopic::default();
    mt.name = Some(TopicName(sb(name)));
    if version >= 10 {
        mt.topic_id = t.id;
    }
    mt.topic_authorized_operations = i32::MIN;
    for (p, replicas) in t.replicas.iter().enumerate() {
        let mut mp = MetadataResponsePartition::default();
        mp.partition_index = p as i32;
        let st = img.partitions.get(&(name.to_string(), p as i32));
        let (leader, epoch, isr) = st.map_or((NO_LEADER, -1, Vec::new()), |s| {
            (s.value.leader, s.value.leader_epoch, s.value.isr.clone())
        });
        mp.leader_id = BrokerId(leader);
        if leader == NO_LEADER {
            mp.error_code = code::LEADER_NOT_AVAILABLE;
        }
        if version >= 7 {
            mp.leader_epoch = epoch;
        }
        mp.replica_nodes = replicas.iter().map(|b| BrokerId(*b)).collect();
        mp.isr_nodes = isr.into_iter().map(BrokerId).collect();
        if version >= 5 {
            mp.offline_replicas = replicas
                .iter()
                .filter(|b| !img.brokers.contains_key(b))
                .map(|b| BrokerId(*b))
                .collect();
        }
        mt.partitions.push(mp);
    }
    mt
}
