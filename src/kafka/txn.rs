//! The transaction APIs: InitProducerId with a transactional id, AddPartitionsToTxn (the
//! client form, v0-3, and the batched broker form of KIP-890, v4-5, with `verify_only`),
//! AddOffsetsToTxn, EndTxn, TxnOffsetCommit, DescribeTransactions, ListTransactions and
//! DescribeProducers. Conversions between the wire messages and the broker's transaction
//! coordinator ([`crate::broker::txns`]) and group service.
//!
//! Transaction version 1 (Kafka's `transaction.version` feature is not advertised, so Kafka
//! 4.x clients add partitions explicitly and EndTxn keeps the epoch).

use std::sync::Arc;

use kafka_protocol::messages::add_offsets_to_txn_request::AddOffsetsToTxnRequest;
use kafka_protocol::messages::add_offsets_to_txn_response::AddOffsetsToTxnResponse;
use kafka_protocol::messages::add_partitions_to_txn_request::{
    AddPartitionsToTxnRequest, AddPartitionsToTxnTopic,
};
use kafka_protocol::messages::add_partitions_to_txn_response::{
    AddPartitionsToTxnPartitionResult, AddPartitionsToTxnResponse, AddPartitionsToTxnResult,
    AddPartitionsToTxnTopicResult,
};
use kafka_protocol::messages::describe_producers_request::DescribeProducersRequest;
use kafka_protocol::messages::describe_producers_response::{
    DescribeProducersResponse, PartitionResponse, ProducerState, TopicResponse,
};
use kafka_protocol::messages::describe_transactions_request::DescribeTransactionsRequest;
use kafka_protocol::messages::describe_transactions_response::{
    DescribeTransactionsResponse, TopicData, TransactionState as DescribedTxn,
};
use kafka_protocol::messages::end_txn_request::EndTxnRequest;
use kafka_protocol::messages::end_txn_response::EndTxnResponse;
use kafka_protocol::messages::init_producer_id_request::InitProducerIdRequest;
use kafka_protocol::messages::init_producer_id_response::InitProducerIdResponse;
use kafka_protocol::messages::list_transactions_request::ListTransactionsRequest;
use kafka_protocol::messages::list_transactions_response::{
    ListTransactionsResponse, TransactionState as ListedTxn,
};
use kafka_protocol::messages::txn_offset_commit_request::TxnOffsetCommitRequest;
use kafka_protocol::messages::txn_offset_commit_response::{
    TxnOffsetCommitResponse, TxnOffsetCommitResponsePartition, TxnOffsetCommitResponseTopic,
};
use kafka_protocol::messages::{ProducerId, TopicName, TransactionalId};

use super::{code, sb};
use crate::broker::Broker;
use crate::clock::now_ms;
use crate::group::Committed;
use crate::txn::code as txn_code;

/// The error for a partition that does not exist (AddPartitionsToTxn answers it per partition;
/// the others of the request get OPERATION_NOT_ATTEMPTED, as from Kafka).
const OPERATION_NOT_ATTEMPTED: i16 = 55;

/// Kafka's COORDINATOR_LOAD_IN_PROGRESS: retried by the clients with the same coordinator.
const COORDINATOR_LOAD_IN_PROGRESS: i16 = 14;

/// InitProducerId with a transactional id.
pub async fn init_producer_id(
    broker: Arc<Broker>,
    req: InitProducerIdRequest,
) -> InitProducerIdResponse {
    let id = req
        .transactional_id
        .as_ref()
        .map(|s| s.0.to_string())
        .unwrap_or_default();
    let current = (req.producer_id.0 >= 0 && req.producer_epoch >= 0)
        .then_some((req.producer_id.0, req.producer_epoch));
    let (error, pid, epoch) = broker
        .txns()
        .init_producer_id(&id, req.transaction_timeout_ms, current)
        .await;
    let mut resp = InitProducerIdResponse::default();
    resp.error_code = error;
    resp.producer_id = ProducerId(pid);
    resp.producer_epoch = epoch;
    resp
}

/// The partitions of one AddPartitionsToTxn transaction that exist, and a result per topic
/// with UNKNOWN_TOPIC_OR_PARTITION for those that do not (OPERATION_NOT_ATTEMPTED for the
/// rest then).
fn partitions_of(
    broker: &Broker,
    topics: &[AddPartitionsToTxnTopic],
) -> (Vec<(String, i32)>, bool) {
    let mut all = Vec::new();
    let mut missing = false;
    for t in topics {
        let topic = broker.topic(t.name.0.as_str());
        for p in &t.partitions {
            if topic.as_ref().and_then(|tp| tp.partition(*p)).is_none() {
                missing = true;
            }
            all.push((t.name.0.to_string(), *p));
        }
    }
    (all, missing)
}

fn results(
    broker: &Broker,
    topics: &[AddPartitionsToTxnTopic],
    error: Option<i16>,
) -> Vec<AddPartitionsToTxnTopicResult> {
    topics
        .iter()
        .map(|t| {
            let topic = broker.topic(t.name.0.as_str());
            let mut tr = AddPartitionsToTxnTopicResult::default();
            tr.name = t.name.clone();
            tr.results_by_partition = t
                .partitions
                .iter()
                .map(|p| {
                    let mut r = AddPartitionsToTxnPartitionResult::default();
                    r.partition_index = *p;
                    r.partition_error_code = match error {
                        Some(e) => e,
                        None if topic.as_ref().and_then(|tp| tp.partition(*p)).is_none() => {
                            code::UNKNOWN_TOPIC_OR_PARTITION
                        }
                        None => OPERATION_NOT_ATTEMPTED,
                    };
                    r
                })
                .collect();
            tr
        })
        .collect()
}

/// Add the partitions of one transaction (or, `verify_only`, check they are in it).
async fn add_one(
    broker: &Arc<Broker>,
    id: &str,
    producer_id: i64,
    epoch: i16,
    verify_only: bool,
    topics: &[AddPartitionsToTxnTopic],
) -> Vec<AddPartitionsToTxnTopicResult> {
    let (parts, missing) = partitions_of(broker, topics);
    if missing {
        return results(broker, topics, None);
    }
    if verify_only {
        // One answer per partition: in the open transaction, or why not.
        return topics
            .iter()
            .map(|t| {
                let mut tr = AddPartitionsToTxnTopicResult::default();
                tr.name = t.name.clone();
                tr.results_by_partition = t
                    .partitions
                    .iter()
                    .map(|p| {
                        let mut r = AddPartitionsToTxnPartitionResult::default();
                        r.partition_index = *p;
                        r.partition_error_code = broker.txns().verify(
                            id,
                            producer_id,
                            epoch,
                            &(t.name.0.to_string(), *p),
                        );
                        r
                    })
                    .collect();
                tr
            })
            .collect();
    }
    let e = broker
        .txns()
        .add_partitions(id, producer_id, epoch, parts)
        .await;
    results(broker, topics, Some(e))
}

pub async fn add_partitions(
    broker: Arc<Broker>,
    req: AddPartitionsToTxnRequest,
    version: i16,
) -> AddPartitionsToTxnResponse {
    let mut resp = AddPartitionsToTxnResponse::default();
    if version <= 3 {
        resp.results_by_topic_v3_and_below = add_one(
            &broker,
            req.v3_and_below_transactional_id.0.as_str(),
            req.v3_and_below_producer_id.0,
            req.v3_and_below_producer_epoch,
            false,
            &req.v3_and_below_topics,
        )
        .await;
        return resp;
    }
    for t in &req.transactions {
        let mut r = AddPartitionsToTxnResult::default();
        r.transactional_id = t.transactional_id.clone();
        r.topic_results = add_one(
            &broker,
            t.transactional_id.0.as_str(),
            t.producer_id.0,
            t.producer_epoch,
            t.verify_only,
            &t.topics,
        )
        .await;
        resp.results_by_transaction.push(r);
    }
    resp
}

pub async fn add_offsets(
    broker: Arc<Broker>,
    req: AddOffsetsToTxnRequest,
) -> AddOffsetsToTxnResponse {
    let mut resp = AddOffsetsToTxnResponse::default();
    // Every group's offsets live in partition 0 of the offsets topic.
    resp.error_code = broker
        .txns()
        .add_partitions(
            req.transactional_id.0.as_str(),
            req.producer_id.0,
            req.producer_epoch,
            vec![(crate::group::offsets::TOPIC.to_string(), 0)],
        )
        .await;
    resp
}

pub async fn end_txn(broker: Arc<Broker>, req: EndTxnRequest) -> EndTxnResponse {
    let mut resp = EndTxnResponse::default();
    resp.error_code = broker
        .txns()
        .end_txn(
            req.transactional_id.0.as_str(),
            req.producer_id.0,
            req.producer_epoch,
            req.committed,
        )
        .await;
    resp.producer_id = ProducerId(-1);
    resp.producer_epoch = -1;
    resp
}

pub async fn txn_offset_commit(
    broker: Arc<Broker>,
    req: TxnOffsetCommitRequest,
) -> TxnOffsetCommitResponse {
    let group = req.group_id.0.to_string();
    let offsets_partition = (crate::group::offsets::TOPIC.to_string(), 0);
    // The offsets partition must be in the producer's open transaction (AddOffsetsToTxn),
    // and a member of a live group must be current in it.
    // In a region cluster the transaction coordinator may be another broker: asked there.
    let mut check = broker
        .txns()
        .verify_anywhere(
            &broker,
            req.transactional_id.0.as_str(),
            req.producer_id.0,
            req.producer_epoch,
            &offsets_partition.0,
            offsets_partition.1,
        )
        .await;
    if crate::broker::txns::retriable(check) {
        // Retried with this (group) coordinator, which stays the same.
        check = COORDINATOR_LOAD_IN_PROGRESS;
    }
    if check == txn_code::NONE && (req.generation_id >= 0 || !req.member_id.is_empty()) {
        check = broker
            .groups()
            .check_commit(&group, req.generation_id, req.member_id.as_str());
    }
    let now = now_ms();
    let mut resp = TxnOffsetCommitResponse::default();
    let mut entries = Vec::new();
    for t in &req.topics {
        let topic = broker.topic(t.name.0.as_str());
        let mut tr = TxnOffsetCommitResponseTopic::default();
        tr.name = t.name.clone();
        for p in &t.partitions {
            let mut pr = TxnOffsetCommitResponsePartition::default();
            pr.partition_index = p.partition_index;
            if check != txn_code::NONE {
                pr.error_code = check;
            } else if topic
                .as_ref()
                .and_then(|tp| tp.partition(p.partition_index))
                .is_none()
            {
                pr.error_code = code::UNKNOWN_TOPIC_OR_PARTITION;
            } else {
                entries.push((
                    t.name.0.to_string(),
                    p.partition_index,
                    Committed {
                        offset: p.committed_offset,
                        leader_epoch: p.committed_leader_epoch,
                        metadata: p
                            .committed_metadata
                            .as_ref()
                            .map(|m| m.to_string())
                            .unwrap_or_default(),
                        commit_timestamp: now,
                    },
                ));
            }
            tr.partitions.push(pr);
        }
        resp.topics.push(tr);
    }
    let written = broker
        .groups()
        .txn_commit(&group, req.producer_id.0, req.producer_epoch, entries)
        .await;
    if written != txn_code::NONE {
        for t in &mut resp.topics {
            for p in &mut t.partitions {
                if p.error_code == txn_code::NONE {
                    p.error_code = written;
                }
            }
        }
    }
    resp
}

pub fn describe_transactions(
    broker: &Broker,
    req: DescribeTransactionsRequest,
) -> DescribeTransactionsResponse {
    let mut resp = DescribeTransactionsResponse::default();
    let serving = broker.txns().serving();
    broker.txns().with(|c| {
        for id in &req.transactional_ids {
            let mut d = DescribedTxn::default();
            d.transactional_id = id.clone();
            d.producer_id = ProducerId(-1);
            d.producer_epoch = -1;
            d.transaction_start_time_ms = -1;
            match c.get(id.0.as_str()) {
                _ if !serving => d.error_code = txn_code::NOT_COORDINATOR,
                None => d.error_code = TRANSACTIONAL_ID_NOT_FOUND,
                Some(m) => {
                    d.transaction_state = sb(m.status.name());
                    d.transaction_timeout_ms = m.timeout_ms;
                    d.transaction_start_time_ms = m.start_ms;
                    d.producer_id = ProducerId(m.producer_id);
                    d.producer_epoch = m.epoch;
                    let mut topics: Vec<TopicData> = Vec::new();
                    for (t, p) in &m.partitions {
                        match topics.last_mut() {
                            Some(last) if last.topic.0.as_str() == t => last.partitions.push(*p),
                            _ => {
                                let mut td = TopicData::default();
                                td.topic = TopicName(sb(t));
                                td.partitions.push(*p);
                                topics.push(td);
                            }
                        }
                    }
                    d.topics = topics;
                }
            }
            resp.transaction_states.push(d);
        }
    });
    resp
}

/// DescribeTransactions' answer for an unknown transactional id.
const TRANSACTIONAL_ID_NOT_FOUND: i16 = 105;

pub fn list_transactions(
    broker: &Broker,
    req: ListTransactionsRequest,
) -> ListTransactionsResponse {
    let mut resp = ListTransactionsResponse::default();
    if !broker.txns().serving() {
        // The admin client asks every broker and merges the answers: a broker of a region
        // cluster that coordinates no transaction now holds none.
        if broker.cluster().is_none() {
            resp.error_code = txn_code::COORDINATOR_NOT_AVAILABLE;
        }
        return resp;
    }
    let known = [
        "Empty",
        "Ongoing",
        "PrepareCommit",
        "PrepareAbort",
        "CompleteCommit",
        "CompleteAbort",
        "Dead",
        "PrepareEpochFence",
    ];
    resp.unknown_state_filters = req
        .state_filters
        .iter()
        .filter(|f| !known.contains(&f.as_str()))
        .cloned()
        .collect();
    let pattern = req
        .transactional_id_pattern
        .as_ref()
        .filter(|p| !p.is_empty())
        .map(|p| regex_lite::Regex::new(&format!("^(?:{})$", p.as_str())));
    let pattern = match pattern {
        Some(Err(_)) => {
            resp.error_code = code::INVALID_REQUEST;
            return resp;
        }
        Some(Ok(r)) => Some(r),
        None => None,
    };
    let now = now_ms();
    broker.txns().with(|c| {
        for (id, m) in c.all() {
            let state = m.status.name();
            if !req.state_filters.is_empty()
                && !req.state_filters.iter().any(|f| f.as_str() == state)
            {
                continue;
            }
            if !req.producer_id_filters.is_empty()
                && !req.producer_id_filters.iter().any(|p| p.0 == m.producer_id)
            {
                continue;
            }
            // KIP-994: only transactions running longer than this.
            if req.duration_filter >= 0
                && (m.start_ms < 0 || now - m.start_ms < req.duration_filter)
            {
                continue;
            }
            if pattern.as_ref().is_some_and(|r| !r.is_match(id)) {
                continue;
            }
            let mut l = ListedTxn::default();
            l.transactional_id = TransactionalId(sb(id));
            l.producer_id = ProducerId(m.producer_id);
            l.transaction_state = sb(state);
            resp.transaction_states.push(l);
        }
    });
    resp
}

pub fn describe_producers(
    broker: &Broker,
    req: DescribeProducersRequest,
) -> DescribeProducersResponse {
    let mut resp = DescribeProducersResponse::default();
    for t in &req.topics {
        let topic = broker.topic(t.name.0.as_str());
        let mut tr = TopicResponse::default();
        tr.name = t.name.clone();
        for p in &t.partition_indexes {
            let mut pr = PartitionResponse::default();
            pr.partition_index = *p;
            match topic.as_ref().and_then(|tp| tp.partition(*p)) {
                None => pr.error_code = code::UNKNOWN_TOPIC_OR_PARTITION,
                Some(part) => {
                    let st = part.state.lock().expect("partition lock");
                    if !st.replica.leads() {
                        pr.error_code = code::NOT_LEADER_OR_FOLLOWER;
                    } else {
                        let open: std::collections::HashMap<i64, i64> =
                            st.log.txns().open().collect();
                        for (id, epoch, last_seq) in st.producers.describe() {
                            let mut ps = ProducerState::default();
                            ps.producer_id = ProducerId(id);
                            ps.producer_epoch = epoch as i32;
                            ps.last_sequence = last_seq;
                            ps.last_timestamp = -1;
                            ps.coordinator_epoch = -1;
                            ps.current_txn_start_offset = open.get(&id).copied().unwrap_or(-1);
                            pr.active_producers.push(ps);
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
