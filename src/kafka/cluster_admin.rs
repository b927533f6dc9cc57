//! Topic administration in a region cluster: CreateTopics (with Kafka's replica-assignment
//! fields) and DeleteTopics go to etcd through [`crate::broker::cluster`], and are answered
//! once this broker has applied them. The single-broker forms are in [`super::admin`].

use std::collections::BTreeMap;
use std::sync::Arc;

use kafka_protocol::messages::create_topics_request::CreateTopicsRequest;
use kafka_protocol::messages::create_topics_response::{
    CreatableTopicResult, CreateTopicsResponse,
};
use kafka_protocol::messages::delete_topics_request::DeleteTopicsRequest;
use kafka_protocol::messages::delete_topics_response::{
    DeletableTopicResult, DeleteTopicsResponse,
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

pub async fn delete_topics(
    broker: &Arc<Broker>,
    link: &ClusterLink,
    req: DeleteTopicsRequest,
    version: i16,
) -> DeleteTopicsResponse {
    let mut resp = DeleteTopicsResponse::default();
    let img = link.member.image();
    let targets: Vec<(Option<String>, uuid::Uuid)> = if version >= 6 {
        req.topics
            .into_iter()
            .map(|t| (t.name.map(|n| n.0.to_string()), t.topic_id))
            .collect()
    } else {
        req.topic_names
            .into_iter()
            .map(|n| (Some(n.0.to_string()), uuid::Uuid::nil()))
            .collect()
    };
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
                match cluster::delete_topic(broker, link, &n).await {
                    Ok(id) if version >= 6 => r.topic_id = id,
                    Ok(_) => {}
                    Err(e) => {
                        r.error_code = e.kafka_code();
                        if version >= 5 {
                            r.error_message = Some(sb(&e.to_string()));
                        }
                    }
                }
            }
        }
        resp.responses.push(r);
    }
    resp
}
