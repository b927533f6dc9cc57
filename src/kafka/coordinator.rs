//! Consumer group APIs: FindCoordinator, JoinGroup, SyncGroup, Heartbeat, LeaveGroup,
//! OffsetCommit, OffsetFetch, ListGroups, DescribeGroups, DeleteGroups, OffsetDelete.
//! Conversions between the wire messages and the [`crate::group`] state machine, which this
//! broker runs for every group.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::messages::delete_groups_request::DeleteGroupsRequest;
use kafka_protocol::messages::delete_groups_response::{
    DeletableGroupResult, DeleteGroupsResponse,
};
use kafka_protocol::messages::describe_groups_request::DescribeGroupsRequest;
use kafka_protocol::messages::describe_groups_response::{
    DescribeGroupsResponse, DescribedGroup, DescribedGroupMember,
};
use kafka_protocol::messages::find_coordinator_request::FindCoordinatorRequest;
use kafka_protocol::messages::find_coordinator_response::{Coordinator, FindCoordinatorResponse};
use kafka_protocol::messages::heartbeat_request::HeartbeatRequest;
use kafka_protocol::messages::heartbeat_response::HeartbeatResponse;
use kafka_protocol::messages::join_group_request::JoinGroupRequest;
use kafka_protocol::messages::join_group_response::{JoinGroupResponse, JoinGroupResponseMember};
use kafka_protocol::messages::leave_group_request::LeaveGroupRequest;
use kafka_protocol::messages::leave_group_response::{LeaveGroupResponse, MemberResponse};
use kafka_protocol::messages::list_groups_request::ListGroupsRequest;
use kafka_protocol::messages::list_groups_response::{ListGroupsResponse, ListedGroup};
use kafka_protocol::messages::offset_commit_request::OffsetCommitRequest;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponse, OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_delete_request::OffsetDeleteRequest;
use kafka_protocol::messages::offset_delete_response::{
    OffsetDeleteResponse, OffsetDeleteResponsePartition, OffsetDeleteResponseTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequest;
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponse, OffsetFetchResponseGroup, OffsetFetchResponsePartition,
    OffsetFetchResponsePartitions, OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::sync_group_request::SyncGroupRequest;
use kafka_protocol::messages::sync_group_response::SyncGroupResponse;
use kafka_protocol::messages::{BrokerId, GroupId, TopicName};

use super::{code, sb};
use crate::broker::Broker;
use crate::clock::now_ms;
use crate::group::{self, offsets, Committed, GroupState, JoinRequest};
use kafka_protocol::protocol::StrBytes;

fn opt(s: &Option<String>) -> Option<kafka_protocol::protocol::StrBytes> {
    s.as_ref().map(|s| sb(s))
}

/// The coordinator for clients of this broker, of groups (`topic` is `__consumer_offsets`) or
/// of transactions (`__transaction_state`): itself alone in a region; in a region cluster the
/// leader of the topic's one partition (the topic is created, replicated, on the first lookup,
/// as Kafka does). `Err` while there is none (COORDINATOR_NOT_AVAILABLE: the client retries).
async fn coordinator_node(broker: &Arc<Broker>, topic: &str) -> Result<(i32, String, u16), String> {
    let Some(link) = broker.cluster() else {
        let (host, port) = broker.config.advertised();
        return Ok((broker.config.node_id, host, port));
    };
    if !link.member.image().topics.contains_key(topic) {
        let made = crate::broker::cluster::create_topic(
            broker,
            link,
            crate::broker::cluster::NewTopic {
                name: topic.to_string(),
                partitions: Some(1),
                ..Default::default()
            },
        )
        .await;
        match made {
            Ok(_) | Err(crate::broker::TopicError::AlreadyExists(_)) => {}
            Err(e) => return Err(format!("{topic} cannot be created yet: {e}")),
        }
    }
    let img = link.member.image();
    let leader = img
        .partitions
        .get(&(topic.to_string(), 0))
        .map(|s| s.value.leader);
    match leader.and_then(|l| img.brokers.get(&l)) {
        Some(b) => Ok((b.id, b.host.clone(), b.port)),
        None => Err(format!("{topic}-0 has no leader yet")),
    }
}

/// FindCoordinator's key type of a transactional id.
const TRANSACTION: i8 = 1;

pub async fn find(
    broker: Arc<Broker>,
    req: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    let node = if req.key_type == 0 {
        coordinator_node(&broker, offsets::TOPIC).await
    } else if req.key_type == TRANSACTION {
        coordinator_node(&broker, crate::txn::log::TOPIC).await
    } else {
        Err(format!(
            "coordinator key type {} is not supported",
            req.key_type
        ))
    };
    // No coordinator yet (its partition has no leader): retriable, the client asks again.
    let error = code::COORDINATOR_NOT_AVAILABLE;
    if let Err(why) = &node {
        tracing::debug!(why, "no coordinator to name");
    }
    let error_code = error;
    let fill = |error: &mut i16, id: &mut BrokerId, host: &mut StrBytes, port: &mut i32| match &node
    {
        Ok((n, h, p)) => {
            *id = BrokerId(*n);
            *host = sb(h);
            *port = *p as i32;
        }
        Err(_) => {
            *error = error_code;
            *id = BrokerId(-1);
            *host = sb("");
            *port = -1;
        }
    };
    let mut resp = FindCoordinatorResponse::default();
    if version < 4 {
        fill(
            &mut resp.error_code,
            &mut resp.node_id,
            &mut resp.host,
            &mut resp.port,
        );
        if version >= 1 {
            resp.error_message = node.as_ref().err().map(|m| sb(m));
        }
        return resp;
    }
    for key in req.coordinator_keys {
        let mut c = Coordinator::default();
        c.key = key;
        fill(&mut c.error_code, &mut c.node_id, &mut c.host, &mut c.port);
        c.error_message = node.as_ref().err().map(|m| sb(m));
        resp.coordinators.push(c);
    }
    resp
}

pub async fn join(
    broker: Arc<Broker>,
    req: JoinGroupRequest,
    version: i16,
    client_id: String,
    peer: SocketAddr,
) -> JoinGroupResponse {
    let r = broker
        .groups()
        .join(JoinRequest {
            group_id: req.group_id.0.to_string(),
            member_id: req.member_id.to_string(),
            instance_id: req.group_instance_id.as_ref().map(|s| s.to_string()),
            client_id,
            client_host: format!("/{}", peer.ip()),
            session_timeout_ms: req.session_timeout_ms as i64,
            // v0 has no rebalance timeout: it is the session timeout.
            rebalance_timeout_ms: if version >= 1 {
                req.rebalance_timeout_ms as i64
            } else {
                req.session_timeout_ms as i64
            },
            protocol_type: req.protocol_type.to_string(),
            protocols: req
                .protocols
                .iter()
                .map(|p| (p.name.to_string(), p.metadata.to_vec()))
                .collect(),
            version,
        })
        .await;
    let mut resp = JoinGroupResponse::default();
    resp.error_code = r.error;
    resp.generation_id = r.generation;
    if version >= 7 {
        resp.protocol_type = opt(&r.protocol_type);
    }
    resp.protocol_name = opt(&r.protocol_name).or(if version >= 7 { None } else { Some(sb("")) });
    resp.leader = sb(&r.leader);
    resp.member_id = sb(&r.member_id);
    resp.members = r
        .members
        .into_iter()
        .map(|(id, inst, meta)| {
            let mut m = JoinGroupResponseMember::default();
            m.member_id = sb(&id);
            if version >= 5 {
                m.group_instance_id = opt(&inst);
            }
            m.metadata = Bytes::from(meta);
            m
        })
        .collect();
    resp
}

pub async fn sync(broker: Arc<Broker>, req: SyncGroupRequest, version: i16) -> SyncGroupResponse {
    let r = broker
        .groups()
        .sync(
            req.group_id.0.as_str(),
            req.generation_id,
            req.member_id.as_str(),
            req.assignments
                .iter()
                .map(|a| (a.member_id.to_string(), a.assignment.to_vec()))
                .collect(),
        )
        .await;
    let mut resp = SyncGroupResponse::default();
    resp.error_code = r.error;
    if version >= 5 {
        resp.protocol_type = opt(&r.protocol_type);
        resp.protocol_name = opt(&r.protocol_name);
    }
    resp.assignment = Bytes::from(r.assignment);
    resp
}

pub fn heartbeat(broker: &Broker, req: HeartbeatRequest) -> HeartbeatResponse {
    let mut resp = HeartbeatResponse::default();
    resp.error_code = broker.groups().heartbeat(
        req.group_id.0.as_str(),
        req.generation_id,
        req.member_id.as_str(),
    );
    resp
}

pub fn leave(broker: &Broker, req: LeaveGroupRequest, version: i16) -> LeaveGroupResponse {
    let members: Vec<(String, Option<String>)> = if version >= 3 {
        req.members
            .iter()
            .map(|m| {
                (
                    m.member_id.to_string(),
                    m.group_instance_id.as_ref().map(|s| s.to_string()),
                )
            })
            .collect()
    } else {
        vec![(req.member_id.to_string(), None)]
    };
    let codes = broker.groups().leave(req.group_id.0.as_str(), &members);
    let mut resp = LeaveGroupResponse::default();
    if version >= 3 {
        for ((mid, inst), c) in members.iter().zip(codes) {
            let mut m = MemberResponse::default();
            m.member_id = sb(mid);
            m.group_instance_id = opt(inst);
            m.error_code = c;
            resp.members.push(m);
        }
    } else {
        resp.error_code = codes.first().copied().unwrap_or(code::NONE);
    }
    resp
}

pub async fn commit(broker: Arc<Broker>, req: OffsetCommitRequest) -> OffsetCommitResponse {
    let group_id = req.group_id.0.to_string();
    let check = broker.groups().check_commit(
        &group_id,
        req.generation_id_or_member_epoch,
        req.member_id.as_str(),
    );
    let mut resp = OffsetCommitResponse::default();
    let mut entries = Vec::new();
    let now = now_ms();
    for t in &req.topics {
        let topic = broker.topic(t.name.0.as_str());
        let mut tr = OffsetCommitResponseTopic::default();
        tr.name = t.name.clone();
        for p in &t.partitions {
            let mut pr = OffsetCommitResponsePartition::default();
            pr.partition_index = p.partition_index;
            if check != code::NONE {
                pr.error_code = check;
            } else if topic
                .as_ref()
                .and_then(|t| t.partition(p.partition_index))
                .is_none()
            {
                pr.error_code = code::UNKNOWN_TOPIC_OR_PARTITION;
            } else {
                entries.push((
                    t.name.0.to_string(),
                    p.partition_index,
                    Some(Committed {
                        offset: p.committed_offset,
                        leader_epoch: p.committed_leader_epoch,
                        metadata: p
                            .committed_metadata
                            .as_ref()
                            .map(|m| m.to_string())
                            .unwrap_or_default(),
                        commit_timestamp: now,
                    }),
                ));
            }
            tr.partitions.push(pr);
        }
        resp.topics.push(tr);
    }
    let written = broker.groups().write(&group_id, entries).await;
    if written != code::NONE {
        for t in &mut resp.topics {
            for p in &mut t.partitions {
                if p.error_code == code::NONE {
                    p.error_code = written;
                }
            }
        }
    }
    resp
}

/// A topic with, per partition, its committed offset if any.
type TopicCommits = (String, Vec<(i32, Option<Committed>)>);

fn committed_parts(
    broker: &Broker,
    group: &str,
    wanted: Option<Vec<(String, Vec<i32>)>>,
) -> Vec<TopicCommits> {
    broker.groups().with(|c| {
        let wanted = wanted.unwrap_or_else(|| {
            let mut m: std::collections::BTreeMap<String, Vec<i32>> = Default::default();
            if let Some(g) = c.group(group) {
                for (t, p) in g.offsets.keys() {
                    m.entry(t.clone()).or_default().push(*p);
                }
            }
            m.into_iter().collect()
        });
        wanted
            .into_iter()
            .map(|(t, ps)| {
                let v = ps
                    .into_iter()
                    .map(|p| (p, c.committed(group, &t, p).cloned()))
                    .collect();
                (t, v)
            })
            .collect()
    })
}

/// OffsetFetch's answer for a partition whose offset an open transaction holds, when the
/// client asked for stable offsets only (it retries).
const UNSTABLE_OFFSET_COMMIT: i16 = 88;

pub fn fetch(broker: &Broker, req: OffsetFetchRequest, version: i16) -> OffsetFetchResponse {
    let mut resp = OffsetFetchResponse::default();
    let fill = |c: &Option<Committed>| -> (i64, i32, String) {
        match c {
            Some(c) => (c.offset, c.leader_epoch, c.metadata.clone()),
            None => (-1, -1, String::new()),
        }
    };
    let serving = broker.groups().serving();
    let require_stable = version >= 7 && req.require_stable;
    if version < 8 {
        if !serving {
            // v0-1 have no top-level error: the client sees a failed fetch and looks again.
            resp.error_code = group::code::NOT_COORDINATOR;
            return resp;
        }
        let group = req.group_id.0.to_string();
        let wanted = req.topics.map(|ts| {
            ts.into_iter()
                .map(|t| (t.name.0.to_string(), t.partition_indexes))
                .collect()
        });
        for (name, parts) in committed_parts(broker, &group, wanted) {
            let mut tr = OffsetFetchResponseTopic::default();
            tr.name = TopicName(sb(&name));
            for (p, c) in parts {
                let (off, epoch, meta) = fill(&c);
                let mut pr = OffsetFetchResponsePartition::default();
                pr.partition_index = p;
                if require_stable && broker.groups().txn_pending(&group, &name, p) {
                    pr.error_code = UNSTABLE_OFFSET_COMMIT;
                }
                pr.committed_offset = off;
                if version >= 5 {
                    pr.committed_leader_epoch = epoch;
                }
                pr.metadata = Some(sb(&meta));
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
        if !serving {
            gr.error_code = group::code::NOT_COORDINATOR;
            resp.groups.push(gr);
            continue;
        }
        let wanted = g.topics.map(|ts| {
            ts.into_iter()
                .map(|t| (t.name.0.to_string(), t.partition_indexes))
                .collect()
        });
        for (name, parts) in committed_parts(broker, &group, wanted) {
            let mut tr = OffsetFetchResponseTopics::default();
            tr.name = TopicName(sb(&name));
            for (p, c) in parts {
                let (off, epoch, meta) = fill(&c);
                let mut pr = OffsetFetchResponsePartitions::default();
                pr.partition_index = p;
                if require_stable && broker.groups().txn_pending(&group, &name, p) {
                    pr.error_code = UNSTABLE_OFFSET_COMMIT;
                }
                pr.committed_offset = off;
                pr.committed_leader_epoch = epoch;
                pr.metadata = Some(sb(&meta));
                tr.partitions.push(pr);
            }
            gr.topics.push(tr);
        }
        resp.groups.push(gr);
    }
    resp
}

pub fn list(broker: &Broker, req: ListGroupsRequest, version: i16) -> ListGroupsResponse {
    let mut resp = ListGroupsResponse::default();
    broker.groups().with(|c| {
        for g in c.groups() {
            let state = g.state.name();
            if version >= 4
                && !req.states_filter.is_empty()
                && !req
                    .states_filter
                    .iter()
                    .any(|s| s.as_str().eq_ignore_ascii_case(state))
            {
                continue;
            }
            let mut l = ListedGroup::default();
            l.group_id = GroupId(sb(&g.id));
            l.protocol_type = sb(g.protocol_type.as_deref().unwrap_or("consumer"));
            if version >= 4 {
                l.group_state = sb(state);
            }
            if version >= 5 {
                l.group_type = sb("classic");
            }
            resp.groups.push(l);
        }
    });
    resp
}

pub fn describe(
    broker: &Broker,
    req: DescribeGroupsRequest,
    version: i16,
) -> DescribeGroupsResponse {
    let mut resp = DescribeGroupsResponse::default();
    let serving = broker.groups().serving();
    broker.groups().with(|c| {
        for id in req.groups {
            let mut d = DescribedGroup::default();
            d.group_id = id.clone();
            if !serving {
                d.error_code = group::code::NOT_COORDINATOR;
                resp.groups.push(d);
                continue;
            }
            match c.group(id.0.as_str()) {
                None => {
                    // Kafka answers an unknown group as Dead with no members.
                    d.group_state = sb("Dead");
                    if version >= 6 {
                        d.error_code = group::code::GROUP_ID_NOT_FOUND;
                    }
                }
                Some(g) => {
                    d.group_state = sb(g.state.name());
                    d.protocol_type = sb(g.protocol_type.as_deref().unwrap_or(""));
                    let stable = matches!(
                        g.state,
                        GroupState::Stable | GroupState::CompletingRebalance
                    );
                    d.protocol_data = sb(if stable {
                        g.protocol.as_deref().unwrap_or("")
                    } else {
                        ""
                    });
                    for m in g.members.values() {
                        let mut dm = DescribedGroupMember::default();
                        dm.member_id = sb(&m.member_id);
                        if version >= 4 {
                            dm.group_instance_id = opt(&m.instance_id);
                        }
                        dm.client_id = sb(&m.client_id);
                        dm.client_host = sb(&m.client_host);
                        if stable {
                            let proto = g.protocol.clone().unwrap_or_default();
                            dm.member_metadata = m
                                .protocols
                                .iter()
                                .find(|(n, _)| *n == proto)
                                .map(|(_, d)| Bytes::from(d.clone()))
                                .unwrap_or_default();
                            dm.member_assignment = Bytes::from(m.assignment.clone());
                        }
                        d.members.push(dm);
                    }
                }
            }
            resp.groups.push(d);
        }
    });
    resp
}

pub async fn delete_groups(broker: Arc<Broker>, req: DeleteGroupsRequest) -> DeleteGroupsResponse {
    let mut resp = DeleteGroupsResponse::default();
    for g in req.groups_names {
        let mut r = DeletableGroupResult::default();
        r.error_code = broker.groups().delete_group(g.0.as_str()).await;
        r.group_id = g;
        resp.results.push(r);
    }
    resp
}

pub async fn offset_delete(broker: Arc<Broker>, req: OffsetDeleteRequest) -> OffsetDeleteResponse {
    let group = req.group_id.0.to_string();
    let mut resp = OffsetDeleteResponse::default();
    if !broker.groups().serving() {
        resp.error_code = group::code::NOT_COORDINATOR;
        return resp;
    }
    let (exists, empty) = broker.groups().with(|c| {
        c.group(&group)
            .map(|g| (true, g.is_empty()))
            .unwrap_or((false, true))
    });
    if !exists {
        resp.error_code = group::code::GROUP_ID_NOT_FOUND;
        return resp;
    }
    let mut entries = Vec::new();
    for t in req.topics {
        let mut tr = OffsetDeleteResponseTopic::default();
        tr.name = t.name.clone();
        for p in t.partitions {
            let mut pr = OffsetDeleteResponsePartition::default();
            pr.partition_index = p.partition_index;
            if !empty {
                // Without decoding the members' subscriptions, an active group is taken to be
                // subscribed to every topic it has offsets for.
                pr.error_code = group::code::GROUP_SUBSCRIBED_TO_TOPIC;
            } else {
                entries.push((t.name.0.to_string(), p.partition_index, None));
            }
            tr.partitions.push(pr);
        }
        resp.topics.push(tr);
    }
    let written = broker.groups().write(&group, entries).await;
    if written != code::NONE {
        resp.error_code = written;
    }
    resp
}
