//! Topic administration: CreateTopics, DeleteTopics, CreatePartitions, DescribeConfigs,
//! AlterConfigs, IncrementalAlterConfigs and DescribeCluster.

use std::collections::BTreeMap;
use std::sync::Arc;

use kafka_protocol::messages::create_partitions_request::CreatePartitionsRequest;
use kafka_protocol::messages::create_partitions_response::{
    CreatePartitionsResponse, CreatePartitionsTopicResult,
};
use kafka_protocol::messages::create_topics_request::CreateTopicsRequest;
use kafka_protocol::messages::create_topics_response::{
    CreatableTopicConfigs, CreatableTopicResult, CreateTopicsResponse,
};
use kafka_protocol::messages::delete_topics_request::DeleteTopicsRequest;
use kafka_protocol::messages::delete_topics_response::{
    DeletableTopicResult, DeleteTopicsResponse,
};
use kafka_protocol::messages::describe_cluster_response::{
    DescribeClusterBroker, DescribeClusterResponse,
};
use kafka_protocol::messages::describe_configs_request::DescribeConfigsRequest;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResponse, DescribeConfigsResult,
};
use kafka_protocol::messages::{
    AlterConfigsRequest, AlterConfigsResponse, BrokerId, IncrementalAlterConfigsRequest,
    IncrementalAlterConfigsResponse, TopicName,
};

use super::{code, sb};
use crate::broker::{Broker, TopicError};

/// Config sources (DescribeConfigs): topic override, static broker config, default.
const SOURCE_TOPIC: i8 = 1;
const SOURCE_DEFAULT: i8 = 5;
const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;

pub fn create_topics(
    broker: &Broker,
    req: CreateTopicsRequest,
    version: i16,
) -> CreateTopicsResponse {
    let mut resp = CreateTopicsResponse::default();
    for t in req.topics {
        let name = t.name.0.to_string();
        let mut r = CreatableTopicResult::default();
        r.name = t.name.clone();
        let mut configs = BTreeMap::new();
        for c in &t.configs {
            if let Some(v) = &c.value {
                configs.insert(c.name.to_string(), v.to_string());
            }
        }
        let result = if !t.assignments.is_empty() {
            Err(TopicError::InvalidPartitions(
                "manual replica assignment is not supported".into(),
            ))
        } else {
            broker.create_topic(
                &name,
                (t.num_partitions != -1).then_some(t.num_partitions),
                Some(t.replication_factor),
                configs,
                req.validate_only,
            )
        };
        match result {
            Ok(topic) => {
                if version >= 7 {
                    r.topic_id = topic.id;
                }
                let n = if req.validate_only {
                    if t.num_partitions == -1 {
                        broker.config.default_partitions
                    } else {
                        t.num_partitions
                    }
                } else {
                    topic.partition_count()
                };
                if version >= 5 {
                    r.num_partitions = n;
                    r.replication_factor = 1;
                }
                if version >= 5 && !req.validate_only {
                    r.configs = Some(
                        broker
                            .effective_topic_configs(&topic)
                            .into_iter()
                            .map(|(k, v, overridden)| {
                                let mut c = CreatableTopicConfigs::default();
                                c.name = sb(&k);
                                c.value = Some(sb(&v));
                                c.config_source = if overridden {
                                    SOURCE_TOPIC
                                } else {
                                    SOURCE_DEFAULT
                                };
                                c
                            })
                            .collect(),
                    );
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

/// The topics a DeleteTopics request names: by name (every version) or by id (v6+).
pub(super) fn delete_targets(
    req: DeleteTopicsRequest,
    version: i16,
) -> Vec<(Option<String>, uuid::Uuid)> {
    if version >= 6 {
        req.topics
            .into_iter()
            .map(|t| (t.name.map(|n| n.0.to_string()), t.topic_id))
            .collect()
    } else {
        req.topic_names
            .into_iter()
            .map(|n| (Some(n.0.to_string()), uuid::Uuid::nil()))
            .collect()
    }
}

/// Fill a DeleteTopics result from the outcome of one deletion (either mode).
pub(super) fn deleted(
    r: &mut DeletableTopicResult,
    version: i16,
    outcome: Result<uuid::Uuid, TopicError>,
) {
    match outcome {
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

pub fn delete_topics(
    broker: &Broker,
    req: DeleteTopicsRequest,
    version: i16,
) -> DeleteTopicsResponse {
    let mut resp = DeleteTopicsResponse::default();
    let targets = delete_targets(req, version);
    for (name, id) in targets {
        let mut r = DeletableTopicResult::default();
        if version >= 6 {
            r.topic_id = id;
        }
        let name = match name {
            Some(n) => Some(n),
            None => broker.topic_by_id(id).map(|t| t.name.clone()),
        };
        match name {
            None => {
                r.error_code = code::UNKNOWN_TOPIC_ID;
            }
            Some(n) => {
                r.name = Some(TopicName(sb(&n)));
                deleted(&mut r, version, broker.delete_topic(&n));
            }
        }
        resp.responses.push(r);
    }
    resp
}

pub fn create_partitions(
    broker: &Broker,
    req: CreatePartitionsRequest,
) -> CreatePartitionsResponse {
    let mut resp = CreatePartitionsResponse::default();
    for t in req.topics {
        let mut r = CreatePartitionsTopicResult::default();
        r.name = t.name.clone();
        if let Err(e) = broker.create_partitions(t.name.0.as_str(), t.count, req.validate_only) {
            r.error_code = e.kafka_code();
            r.error_message = Some(sb(&e.to_string()));
        }
        resp.results.push(r);
    }
    resp
}

fn config_entry(
    name: &str,
    value: &str,
    source: i8,
    read_only: bool,
) -> DescribeConfigsResourceResult {
    let mut c = DescribeConfigsResourceResult::default();
    c.name = sb(name);
    c.value = Some(sb(value));
    c.config_source = source;
    c.read_only = read_only;
    c
}

pub fn describe_configs(
    broker: &Broker,
    req: DescribeConfigsRequest,
    _version: i16,
) -> DescribeConfigsResponse {
    let mut resp = DescribeConfigsResponse::default();
    for res in req.resources {
        let mut r = DescribeConfigsResult::default();
        r.resource_type = res.resource_type;
        r.resource_name = res.resource_name.clone();
        let wanted = |k: &str| {
            res.configuration_keys
                .as_ref()
                .map(|keys| keys.iter().any(|w| w.as_str() == k))
                .unwrap_or(true)
        };
        match res.resource_type {
            RESOURCE_TOPIC => match broker.topic(res.resource_name.as_str()) {
                None => {
                    r.error_code = code::UNKNOWN_TOPIC_OR_PARTITION;
                    r.error_message = Some(sb("unknown topic"));
                }
                Some(t) => {
                    for (k, v, overridden) in broker.effective_topic_configs(&t) {
                        if wanted(&k) {
                            let src = if overridden {
                                SOURCE_TOPIC
                            } else {
                                SOURCE_DEFAULT
                            };
                            r.configs.push(config_entry(&k, &v, src, false));
                        }
                    }
                }
            },
            RESOURCE_BROKER => {
                let c = &broker.config;
                let (host, port) = c.advertised();
                let ms = |d: Option<std::time::Duration>| {
                    d.map(|d| d.as_millis().to_string())
                        .unwrap_or_else(|| "-1".into())
                };
                let entries = [
                    ("node.id", c.node_id.to_string()),
                    ("advertised.listeners", format!("PLAINTEXT://{host}:{port}")),
                    ("listeners", format!("PLAINTEXT://{}", c.listen)),
                    ("log.dirs", c.data_dir.display().to_string()),
                    ("log.segment.bytes", c.log.segment_bytes.to_string()),
                    ("log.roll.ms", c.log.segment_age.as_millis().to_string()),
                    ("log.retention.ms", ms(c.log.retention_time)),
                    (
                        "log.retention.bytes",
                        c.log
                            .retention_bytes
                            .map(|b| b.to_string())
                            .unwrap_or_else(|| "-1".into()),
                    ),
                    ("num.partitions", c.default_partitions.to_string()),
                    (
                        "auto.create.topics.enable",
                        c.auto_create_topics.to_string(),
                    ),
                    ("message.max.bytes", c.batch_bytes_max.to_string()),
                    ("socket.request.max.bytes", c.frame_bytes_max.to_string()),
                ];
                for (k, v) in entries {
                    if wanted(k) {
                        r.configs.push(config_entry(k, &v, SOURCE_DEFAULT, true));
                    }
                }
            }
            other => {
                r.error_code = code::INVALID_REQUEST;
                r.error_message = Some(sb(&format!("resource type {other} is not supported")));
            }
        }
        resp.results.push(r);
    }
    resp
}

pub fn describe_cluster(broker: &Broker) -> DescribeClusterResponse {
    let (host, port) = broker.config.advertised();
    let mut resp = DescribeClusterResponse::default();
    resp.cluster_id = sb(&broker.config.cluster_id);
    resp.controller_id = BrokerId(broker.config.node_id);
    resp.endpoint_type = 1;
    resp.cluster_authorized_operations = i32::MIN;
    if let Some(link) = broker.cluster() {
        // A region cluster: every registered broker, and the controller.
        let img = link.member.image();
        resp.controller_id = BrokerId(img.controller.unwrap_or(-1));
        resp.brokers = img
            .brokers
            .values()
            .map(|i| {
                let mut b = DescribeClusterBroker::default();
                b.broker_id = BrokerId(i.id);
                b.host = sb(&i.host);
                b.port = i.port as i32;
                b.rack = i.rack.as_deref().map(sb);
                b
            })
            .collect();
        return resp;
    }
    let mut b = DescribeClusterBroker::default();
    b.broker_id = BrokerId(broker.config.node_id);
    b.host = sb(&host);
    b.port = port as i32;
    resp.brokers = vec![b];
    resp
}

/// What to do with one config of an IncrementalAlterConfigs resource.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ConfigOp {
    Set(String),
    Delete,
}

/// Apply one topic's config changes: `replace` starts from no overrides (AlterConfigs), else
/// from the topic's current ones (IncrementalAlterConfigs). Returns (error code, message).
async fn alter_topic(
    broker: &Arc<Broker>,
    topic: &str,
    ops: Vec<(String, ConfigOp)>,
    replace: bool,
    validate_only: bool,
) -> (i16, Option<String>) {
    let Some(t) = broker.topic(topic) else {
        return (
            code::UNKNOWN_TOPIC_OR_PARTITION,
            Some("unknown topic".into()),
        );
    };
    let mut configs = if replace {
        BTreeMap::new()
    } else {
        t.configs()
    };
    for (k, op) in ops {
        match op {
            ConfigOp::Set(v) => {
                configs.insert(k, v);
            }
            ConfigOp::Delete => {
                configs.remove(&k);
            }
        }
    }
    // In a region cluster a topic's configs live in etcd with its assignment: every broker
    // takes them from there.
    let done = match broker.cluster() {
        Some(link) => {
            crate::broker::cluster::alter_topic_configs(
                broker,
                link,
                topic,
                configs,
                validate_only,
                false,
            )
            .await
        }
        None => broker.alter_topic_configs(topic, configs, validate_only, false),
    };
    match done {
        Ok(_) => (0, None),
        Err(e) => (e.kafka_code(), Some(e.to_string())),
    }
}

/// The answer to altering a resource that is not a topic.
fn not_alterable(resource_type: i8) -> (i16, Option<String>) {
    (
        code::INVALID_REQUEST,
        Some(format!(
            "resource type {resource_type} cannot be altered: broker settings come from its config file"
        )),
    )
}

/// IncrementalAlterConfigs (KIP-339) on topics: SET and DELETE; APPEND and SUBTRACT are for
/// list-valued configs, which no topic config this broker knows is.
pub async fn incremental_alter_configs(
    broker: Arc<Broker>,
    req: IncrementalAlterConfigsRequest,
) -> IncrementalAlterConfigsResponse {
    use kafka_protocol::messages::incremental_alter_configs_response::AlterConfigsResourceResponse;
    let mut resp = IncrementalAlterConfigsResponse::default();
    for res in req.resources {
        let mut r = AlterConfigsResourceResponse::default();
        r.resource_type = res.resource_type;
        r.resource_name = res.resource_name.clone();
        let (code, msg) = if res.resource_type != RESOURCE_TOPIC {
            not_alterable(res.resource_type)
        } else {
            let mut ops = Vec::new();
            let mut bad = None;
            for c in res.configs {
                let k = c.name.to_string();
                match (c.config_operation, c.value) {
                    (0, Some(v)) => ops.push((k, ConfigOp::Set(v.to_string()))),
                    (0, None) => bad = Some(format!("SET of {k} without a value")),
                    (1, _) => ops.push((k, ConfigOp::Delete)),
                    (2 | 3, _) => {
                        bad = Some(format!(
                            "{k} is not a list: APPEND and SUBTRACT do not apply"
                        ))
                    }
                    (o, _) => bad = Some(format!("unknown config operation {o}")),
                }
            }
            match bad {
                Some(m) => (code::INVALID_CONFIG, Some(m)),
                None => {
                    alter_topic(
                        &broker,
                        res.resource_name.as_str(),
                        ops,
                        false,
                        req.validate_only,
                    )
                    .await
                }
            }
        };
        r.error_code = code;
        r.error_message = msg.map(|m| sb(&m));
        resp.responses.push(r);
    }
    resp
}

/// AlterConfigs (the older API): the given configs replace all of a topic's overrides.
pub async fn alter_configs(broker: Arc<Broker>, req: AlterConfigsRequest) -> AlterConfigsResponse {
    use kafka_protocol::messages::alter_configs_response::AlterConfigsResourceResponse;
    let mut resp = AlterConfigsResponse::default();
    for res in req.resources {
        let mut r = AlterConfigsResourceResponse::default();
        r.resource_type = res.resource_type;
        r.resource_name = res.resource_name.clone();
        let (code, msg) = if res.resource_type != RESOURCE_TOPIC {
            not_alterable(res.resource_type)
        } else {
            let ops = res
                .configs
                .into_iter()
                .filter_map(|c| Some((c.name.to_string(), ConfigOp::Set(c.value?.to_string()))))
                .collect();
            alter_topic(
                &broker,
                res.resource_name.as_str(),
                ops,
                true,
                req.validate_only,
            )
            .await
        };
        r.error_code = code;
        r.error_message = msg.map(|m| sb(&m));
        resp.responses.push(r);
    }
    resp
}
