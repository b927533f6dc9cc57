//! WriteTxnMarkers (API 27, v1): the request with which a region cluster's transaction
//! coordinator has the leader of a partition write a transaction's COMMIT or ABORT marker
//! there ([`crate::broker::markers`]). Brokers send it, never clients.
//!
//! Who may send it: a connection through the internal door (mutual TLS with the region's
//! certificate), or any connection when this broker has no internal door (a region without
//! certificates, whose Kafka listener serves every API to the network, as Kafka's PLAINTEXT
//! listener without an authorizer does). Otherwise every partition is answered
//! CLUSTER_AUTHORIZATION_FAILED and nothing is written: a stranger must not end someone's
//! transaction. A marker from a coordinator whose epoch is below the one the cluster's
//! metadata names (the leader epoch of `__transaction_state-0`) is refused with
//! TRANSACTION_COORDINATOR_FENCED.

use std::sync::Arc;

use kafka_protocol::messages::write_txn_markers_request::WriteTxnMarkersRequest;
use kafka_protocol::messages::write_txn_markers_response::{
    WritableTxnMarkerPartitionResult, WritableTxnMarkerResult, WritableTxnMarkerTopicResult,
    WriteTxnMarkersResponse,
};

use super::code;
use crate::broker::Broker;

/// Kafka's TRANSACTION_COORDINATOR_FENCED.
const TRANSACTION_COORDINATOR_FENCED: i16 = 52;

/// The error every partition of a marker from a coordinator at `coordinator_epoch` gets
/// before anything is written, if any.
fn refuse(broker: &Broker, trusted: bool, coordinator_epoch: i32) -> Option<i16> {
    if !trusted {
        return Some(code::CLUSTER_AUTHORIZATION_FAILED);
    }
    let link = broker.cluster()?;
    let img = link.member.image();
    let current = img
        .partitions
        .get(&(crate::txn::log::TOPIC.to_string(), 0))
        .map(|s| s.value.leader_epoch)?;
    (coordinator_epoch < current).then_some(TRANSACTION_COORDINATOR_FENCED)
}

pub async fn handle(
    broker: Arc<Broker>,
    req: WriteTxnMarkersRequest,
    trusted: bool,
    peer: std::net::SocketAddr,
) -> WriteTxnMarkersResponse {
    let mut resp = WriteTxnMarkersResponse::default();
    for m in req.markers {
        let refused = refuse(&broker, trusted, m.coordinator_epoch);
        if refused == Some(code::CLUSTER_AUTHORIZATION_FAILED) {
            tracing::warn!(%peer, producer_id = m.producer_id.0, "refused WriteTxnMarkers on a plain connection: it is served only through the internal door");
            metrics::counter!("ferry_internal_refused_total", "api" => "WriteTxnMarkers")
                .increment(1);
        }
        // Every partition's marker at once (one fsync round serves them all).
        let mut tasks = tokio::task::JoinSet::new();
        for t in &m.topics {
            for &p in &t.partition_indexes {
                let b = broker.clone();
                let topic = t.name.0.to_string();
                let (pid, epoch, commit) =
                    (m.producer_id.0, m.producer_epoch, m.transaction_result);
                tasks.spawn(async move {
                    let error = match refused {
                        Some(e) => e,
                        None => match b.write_marker(&topic, p, pid, epoch, commit).await {
                            Ok(_) => code::NONE,
                            Err((e, why)) => {
                                tracing::debug!(%topic, partition = p, producer_id = pid, error = %why, "a transaction marker was not written");
                                e
                            }
                        },
                    };
                    (topic, p, error)
                });
            }
        }
        let mut done = Vec::new();
        while let Some(r) = tasks.join_next().await {
            if let Ok(r) = r {
                done.push(r);
            }
        }
        let mut result = WritableTxnMarkerResult::default();
        result.producer_id = m.producer_id;
        for t in &m.topics {
            let mut tr = WritableTxnMarkerTopicResult::default();
            tr.name = t.name.clone();
            for &p in &t.partition_indexes {
                let mut pr = WritableTxnMarkerPartitionResult::default();
                pr.partition_index = p;
                pr.error_code = done
                    .iter()
                    .find(|(name, q, _)| name == t.name.0.as_str() && *q == p)
                    .map_or(code::UNKNOWN_SERVER_ERROR, |(_, _, e)| *e);
                tr.partitions.push(pr);
            }
            result.topics.push(tr);
        }
        resp.markers.push(result);
    }
    resp
}
