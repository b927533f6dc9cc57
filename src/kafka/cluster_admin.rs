//! Topic administration in a region cluster: CreateTopics (with Kafka's replica-assignment
//! fields), CreatePartitions (with its assignments) and DeleteTopics go to etcd through [`crate::broker::cluster`], and are answered
//! once this broker has applied them. The single-broker forms are in [`super::admin`].
//! ElectLeaders (preferred or unclean) is a compare-and-swap of each partition's state, decided
//! by [`crate::cluster::controller::preferred`] and [`crate::cluster::controller::unclean`].

use std::collections::BTreeMap;
use std::sync::Arc;

use kafka_protocol::messages::create_partitions_request::CreatePartitionsRequest;
use kafka_protocol::messages::create_partitions_response::{
    CreatePartitionsResponse, CreatePartitionsTopicResult,
};
use kafka_protocol::messages::create_topics_request::CreateTopicsRequest;
use kafka_protocol::messages::create_topics_response::{
    CreatableTopicResult, CreateTopicsResponse,
};
use kafka_protocol::messages::delete_topics_request::DeleteTopicsRequest;
use kafka_protocol::messages::delete_topics_response::{
    DeletableTopicResult, DeleteTopicsResponse,
};
use kafka_protocol::messages::elect_leaders_request::ElectLeadersRequest;
use kafka_protocol::messages::elect_leaders_response::{
    ElectLeadersResponse, PartitionResult, ReplicaElectionResult,
};
use kafka_protocol::messages::TopicName;

use super::{code, sb};
use crate::broker::cluster::{self, ClusterLink};
use crate::broker::{Broker, TopicError};

pub async fn create_topics(
    broker: &Arc<Broker>,
    link: &ClusterLink,
    req: CreateTopicsRequest,
    version: i16,
) -> CreateTopicsResponse {
    let mut resp = CreateTopicsResponse::default();
    for t in req.topics {
        let name = t.name.0.to_string();
        let mut r = CreatableTopicResult::default();
        r.name = t.name.clone();
        let configs: BTreeMap<String, String> = t
            .configs
            .iter()
            .filter_map(|c| {
                c.value
                    .as_ref()
                    .map(|v| (c.name.to_string(), v.to_string()))
            })
            .collect();
        let mut assignments: Vec<(i32, Vec<i32>)> = t
            .assignments
            .iter()
            .map(|a| {
                (
                    a.partition_index,
                    a.broker_ids.iter().map(|b| b.0).collect(),
                )
            })
            .collect();
        assignments.sort_by_key(|(p, _)| *p);
        let result = if !assignments.is_empty()
            && (t.num_partitions != -1 || t.replication_factor != -1)
        {
            Err(TopicError::InvalidPartitions(
                "give either replica assignments or a partition count and replication factor, not both".into(),
            ))
        } else if assignments
            .iter()
            .enumerate()
            .any(|(i, (p, _))| *p != i as i32)
        {
            Err(TopicError::Assignment(
                crate::cluster::assignment::AssignError::Assignment(
                    "partition indexes must run from 0 without gaps".into(),
                ),
            ))
        } else {
            cluster::create_topic(
                broker,
                link,
                cluster::NewTopic {
                    name: name.clone(),
                    partitions: Some(t.num_partitions),
                    replication_factor: Some(t.replication_factor as i32),
                    assignments: assignments.into_iter().map(|(_, b)| b).collect(),
                    configs,
                    validate_only: req.validate_only,
                },
            )
            .await
        };
        match result {
            Ok(a) => {
                if version >= 7 && !req.validate_only {
                    r.topic_id = a.id;
                }
                if version >= 5 {
                    r.num_partitions = a.replicas.len() as i32;
                    r.replication_factor = a.replicas.first().map_or(0, |s| s.len()) as i16;
                }
            }
            Err(e) => {
                r.error_code = e.kafka_code();
                r.error_message = Some(sb(&e.to_string()));
            }
        }
        resp.topics.push(r);
    }
    resp
}

pub async fn create_partitions(
    broker: &Arc<Broker>,
    link: &ClusterLink,
    req: CreatePartitionsRequest,
) -> CreatePartitionsResponse {
    let mut resp = CreatePartitionsResponse::default();
    for t in req.topics {
        let name = t.name.0.to_string();
        let mut r = CreatePartitionsTopicResult::default();
        r.name = t.name.clone();
        let assignments: Vec<Vec<i32>> = t
            .assignments
            .unwrap_or_default()
            .iter()
            .map(|a| a.broker_ids.iter().map(|b| b.0).collect())
            .collect();
        // A mirror topic follows its primary's partition count (the gateway grows it).
        let mirror = match (broker.placement(&name), broker.config.region.as_deref()) {
            (Some(p), Some(region)) if p.primary != region => {
                Some(TopicError::Mirror(name.clone(), p.primary))
            }
            _ => None,
        };
        let result = match mirror {
            Some(e) => Err(e),
            None => {
                cluster::create_partitions(
                    broker,
                    link,
                    &name,
                    t.count,
                    assignments,
                    req.validate_only,
                )
                .await
            }
        };
        if let Err(e) = result {
            r.error_code = e.kafka_code();
            r.error_message = Some(sb(&e.to_string()));
        }
        resp.results.push(r);
    }
    resp
}

pub async fn delete_topics(
    broker: &Arc<Broker>,
    link: &ClusterLink,
    req: DeleteTopicsRequest,
    version: i16,
) -> DeleteTopicsResponse {
    let mut resp = DeleteTopicsResponse::default();
    let img = link.member.image();
    let targets = super::admin::delete_targets(req, version);
    for (name, id) in targets {
        let mut r = DeletableTopicResult::default();
        if version >= 6 {
            r.topic_id = id;
        }
        let name = name.or_else(|| {
            img.topics
                .values()
                .find(|t| t.value.id == id)
                .map(|t| t.value.name.clone())
        });
        match name {
            None => r.error_code = code::UNKNOWN_TOPIC_ID,
            Some(n) => {
                r.name = Some(TopicName(sb(&n)));
                let outcome = cluster::delete_topic(broker, link, &n).await;
                super::admin::deleted(&mut r, version, outcome);
            }
        }
        resp.responses.push(r);
    }
    resp
}

/// ElectLeaders: type 0 (PREFERRED) moves each partition's leadership back to its first replica
/// when that one is alive and in sync; type 1 (UNCLEAN) elects an out-of-sync replica for an
/// offline partition (the loss is logged). `topic_partitions` null means every partition, and
/// then only the partitions an election changed are listed, as Kafka does.
pub async fn elect_leaders(
    broker: &Broker,
    req: ElectLeadersRequest,
    version: i16,
) -> ElectLeadersResponse {
    use crate::cluster::controller::{preferred, unclean, ElectError};
    let mut resp = ElectLeadersResponse::default();
    let all = req.topic_partitions.is_none();
    let Some(link) = broker.cluster() else {
        // Alone in a region: this broker leads everything already.
        for t in req.topic_partitions.unwrap_or_default() {
            let mut r = ReplicaElectionResult::default();
            r.topic = t.topic.clone();
            for p in t.partitions {
                let mut pr = PartitionResult::default();
                pr.partition_id = p;
                pr.error_code = ElectError::NotNeeded.kafka_code();
                r.partition_result.push(pr);
            }
            resp.replica_election_results.push(r);
        }
        return resp;
    };
    if version == 0 && req.election_type != 0 || !(0..=1).contains(&req.election_type) {
        resp.error_code = code::INVALID_REQUEST;
        return resp;
    }
    let img = link.member.image();
    let alive: std::collections::BTreeSet<i32> = img.brokers.keys().copied().collect();
    let wanted: Vec<(String, Vec<i32>)> = match req.topic_partitions {
        Some(ts) => ts
            .into_iter()
            .map(|t| (t.topic.0.to_string(), t.partitions))
            .collect(),
        None => img
            .topics
            .iter()
            .map(|(n, t)| (n.clone(), (0..t.value.replicas.len() as i32).collect()))
            .collect(),
    };
    let region = link.settings.region_index;
    for (topic, parts) in wanted {
        let mut r = ReplicaElectionResult::default();
        r.topic = TopicName(sb(&topic));
        for p in parts {
            let key = (topic.clone(), p);
            let decided = match (img.topics.get(&topic), img.partitions.get(&key)) {
                (Some(t), Some(st)) => {
                    let next = if req.election_type == 0 {
                        preferred(&t.value, p, &st.value, &alive, region)
                    } else {
                        unclean(&t.value, p, &st.value, &alive, region)
                    };
                    next.map(|n| (n, st.version))
                }
                _ => Err(ElectError::UnknownPartition),
            };
            let outcome = match decided {
                Err(e) => Err((e.kafka_code(), e.to_string())),
                Ok((next, version)) => {
                    match link
                        .member
                        .store()
                        .swap_partition(&topic, p, version, &next)
                        .await
                    {
                        Ok(crate::cluster::etcd::Outcome::Written(_)) => {
                            if req.election_type == 1 {
                                tracing::warn!(topic = %topic, partition = p, leader = next.leader, "UNCLEAN leader election by request: records acknowledged by the old ISR beyond the new leader's log end are lost");
                            } else {
                                tracing::info!(topic = %topic, partition = p, leader = next.leader, "preferred leader elected");
                            }
                            Ok(())
                        }
                        Ok(crate::cluster::etcd::Outcome::Stale) => Err((
                            code::REQUEST_TIMED_OUT,
                            "the partition changed meanwhile: try again".into(),
                        )),
                        Err(e) => Err((code::REQUEST_TIMED_OUT, e.to_string())),
                    }
                }
            };
            if all && matches!(&outcome, Err((c, _)) if *c == ElectError::NotNeeded.kafka_code()) {
                continue;
            }
            let mut pr = PartitionResult::default();
            pr.partition_id = p;
            if let Err((c, m)) = outcome {
                pr.error_code = c;
                pr.error_message = Some(sb(&m));
            }
            r.partition_result.push(pr);
        }
        if !r.partition_result.is_empty() {
            resp.replica_election_results.push(r);
        }
    }
    resp
}
