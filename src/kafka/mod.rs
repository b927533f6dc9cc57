//! The Kafka wire protocol: framing, version negotiation and one handler file per API.
//!
//! Owns: reading frames off a connection (with a size cap checked before anything is
//! allocated), decoding request headers and bodies with the `kafka-protocol` crate (a patched
//! copy that never pre-allocates from counts read off the wire), the table of API versions the
//! broker advertises, and encoding responses in request order. Does not own: what the broker
//! does with a request ([`crate::broker`]), or record bytes (batches are passed through as the
//! client sent them and never decoded).
//!
//! Files: [`server`] (connections), [`api_versions`], [`metadata`], [`produce`], [`fetch`],
//! [`list_offsets`], [`admin`] (CreateTopics, DeleteTopics, CreatePartitions, DescribeConfigs,
//! AlterConfigs, IncrementalAlterConfigs, DescribeCluster), [`producer_id`] (InitProducerId), [`coordinator`] (the consumer group APIs).

pub mod admin;
pub mod api_versions;
pub mod cluster_admin;
pub mod control;
pub mod coordinator;
pub mod delete_records;
pub mod fetch;
pub mod fetch_wire;
pub mod list_offsets;
pub mod log_dirs;
pub mod metadata;
pub mod mirror_append;
pub mod offset_for_leader_epoch;
pub mod produce;
pub mod producer_id;
pub mod server;
pub mod txn;
pub mod txn_markers;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

/// Kafka error codes used here.
pub mod code {
    pub const NONE: i16 = 0;
    pub const OFFSET_OUT_OF_RANGE: i16 = 1;
    pub const CORRUPT_MESSAGE: i16 = 2;
    pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
    pub const REQUEST_TIMED_OUT: i16 = 7;
    pub const MESSAGE_TOO_LARGE: i16 = 10;
    pub const COORDINATOR_NOT_AVAILABLE: i16 = 15;
    pub const INVALID_TOPIC_EXCEPTION: i16 = 17;
    pub const INVALID_REQUIRED_ACKS: i16 = 21;
    pub const UNSUPPORTED_VERSION: i16 = 35;
    pub const INVALID_REQUEST: i16 = 42;
    pub const POLICY_VIOLATION: i16 = 44;
    pub const UNKNOWN_SERVER_ERROR: i16 = -1;
    pub const INVALID_RECORD: i16 = 87;
    pub const UNKNOWN_TOPIC_ID: i16 = 100;
    pub const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 = 53;
    pub const CLUSTER_AUTHORIZATION_FAILED: i16 = 31;
    pub const FENCED_LEADER_EPOCH: i16 = 74;
    pub const UNKNOWN_LEADER_EPOCH: i16 = 75;
    pub const NOT_LEADER_OR_FOLLOWER: i16 = 6;
    pub const LEADER_NOT_AVAILABLE: i16 = 5;
    pub const NOT_ENOUGH_REPLICAS: i16 = 19;
    pub const INVALID_PARTITIONS: i16 = 37;
    pub const NOT_ENOUGH_REPLICAS_AFTER_APPEND: i16 = 20;
    pub const INVALID_CONFIG: i16 = 40;
}

/// The APIs and versions this broker serves: (key, min, max). Produce stops at 12 and Fetch at
/// 12 because later versions name topics by id only; clients negotiate down. ApiVersions 0-4.
pub const SUPPORTED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 12),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 11),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 7),
    (ApiKey::FindCoordinator, 0, 4),
    (ApiKey::JoinGroup, 0, 9),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::ListGroups, 0, 4),
    (ApiKey::ApiVersions, 0, 4),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 6),
    (ApiKey::InitProducerId, 0, 5),
    (ApiKey::DescribeConfigs, 1, 4),
    (ApiKey::AlterConfigs, 0, 2),
    (ApiKey::IncrementalAlterConfigs, 0, 1),
    (ApiKey::CreatePartitions, 0, 3),
    (ApiKey::DescribeCluster, 0, 1),
    (ApiKey::DeleteGroups, 0, 2),
    (ApiKey::OffsetDelete, 0, 0),
    (ApiKey::OffsetForLeaderEpoch, 2, 4),
    (ApiKey::DescribeLogDirs, 1, 4),
    (ApiKey::ElectLeaders, 0, 2),
    (ApiKey::DeleteRecords, 0, 2),
    (ApiKey::AddPartitionsToTxn, 0, 5),
    (ApiKey::AddOffsetsToTxn, 0, 4),
    (ApiKey::EndTxn, 0, 4),
    (ApiKey::TxnOffsetCommit, 0, 4),
    (ApiKey::DescribeTransactions, 0, 0),
    (ApiKey::ListTransactions, 0, 2),
    (ApiKey::DescribeProducers, 0, 0),
    (ApiKey::WriteTxnMarkers, 1, 1),
];

/// Versions advertised in ApiVersions where they differ from those served. Produce is listed
/// from v0, as Apache Kafka 4.x still does (KAFKA-18659), because librdkafka before 2.x decides
/// whether it may compress with gzip, snappy or lz4 by whether the broker lists Produce v0;
/// requests below v3 are still refused when they come.
pub fn advertised_min(key: ApiKey, served_min: i16) -> i16 {
    match key {
        ApiKey::Produce => 0,
        _ => served_min,
    }
}

/// The supported version range of an API, if served.
pub fn supported(key: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED
        .iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, lo, hi)| (*lo, *hi))
}

/// Whether this broker serves a partition in this part to a client that names
/// `current_leader_epoch` (-1: none): `0`, or the Kafka error (NOT_LEADER_OR_FOLLOWER off the
/// leader; FENCED_LEADER_EPOCH / UNKNOWN_LEADER_EPOCH for an older or newer epoch than the
/// leader's). Fetch and OffsetForLeaderEpoch answer by it.
pub fn leader_check(replica: &crate::replica::Replica, current_leader_epoch: i32) -> i16 {
    use crate::replica::Replica;
    match replica {
        Replica::Solo => 0,
        Replica::Leader(l) if current_leader_epoch >= 0 => {
            if current_leader_epoch < l.leader_epoch() {
                code::FENCED_LEADER_EPOCH
            } else if current_leader_epoch > l.leader_epoch() {
                code::UNKNOWN_LEADER_EPOCH
            } else {
                0
            }
        }
        Replica::Leader(_) => 0,
        _ => code::NOT_LEADER_OR_FOLLOWER,
    }
}

pub fn sb(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

/// Encode a response with its header and the 4-byte length prefix.
pub fn encode_response<R: Encodable + HeaderVersion>(
    correlation_id: i32,
    version: i16,
    resp: &R,
) -> anyhow::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(256);
    buf.put_i32(0);
    let header = ResponseHeader::default().with_correlation_id(correlation_id);
    header.encode(&mut buf, R::header_version(version))?;
    resp.encode(&mut buf, version)?;
    let len = (buf.len() - 4) as i32;
    buf[0..4].copy_from_slice(&len.to_be_bytes());
    Ok(buf.freeze())
}

/// What a request frame (without its length prefix) decodes to.
#[derive(Debug)]
pub enum Decoded {
    Request {
        key: ApiKey,
        version: i16,
        correlation_id: i32,
        header: RequestHeader,
        body: Box<RequestKind>,
    },
    /// ApiVersions with a version newer than served: answer v0 with UNSUPPORTED_VERSION (KIP-511).
    UnsupportedApiVersions { correlation_id: i32 },
    /// ApiVersions whose body does not parse (a newer client): answer anyway, as Kafka does.
    ApiVersionsAnyway { correlation_id: i32, version: i16 },
    /// Anything else that cannot be served: close the connection with this reason.
    Refused(String),
}

/// Decode one request frame. Never panics and never allocates much more than the frame's size,
/// whatever the input (the fuzz target `fuzz/fuzz_targets/request.rs` holds it to that).
pub fn decode(frame: &mut Bytes) -> Decoded {
    if frame.len() < 8 {
        return Decoded::Refused(format!(
            "frame of {} bytes is shorter than a request header",
            frame.len()
        ));
    }
    let key_raw = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let correlation_id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let Ok(key) = ApiKey::try_from(key_raw) else {
        return Decoded::Refused(format!("unknown API key {key_raw}"));
    };
    let Some((lo, hi)) = supported(key) else {
        return Decoded::Refused(format!(
            "API {key:?} (key {key_raw}) is not supported by this broker"
        ));
    };
    if version < lo || version > hi {
        if key == ApiKey::ApiVersions {
            return Decoded::UnsupportedApiVersions { correlation_id };
        }
        return Decoded::Refused(format!(
            "{key:?} version {version} is not supported (supported: {lo} to {hi})"
        ));
    }
    let header = match RequestHeader::decode(frame, key.request_header_version(version)) {
        Ok(h) => h,
        Err(e) => return Decoded::Refused(format!("bad {key:?} v{version} request header: {e}")),
    };
    // The patched decoder returns errors on bad input; the unwind guard is a second line.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        RequestKind::decode(key, frame, version)
    })) {
        Ok(Ok(body)) => Decoded::Request {
            key,
            version,
            correlation_id,
            header,
            body: Box::new(body),
        },
        Ok(Err(_)) if key == ApiKey::ApiVersions => Decoded::ApiVersionsAnyway {
            correlation_id,
            version,
        },
        Ok(Err(e)) => Decoded::Refused(format!("malformed {key:?} v{version} request: {e}")),
        Err(_) => Decoded::Refused(format!(
            "malformed {key:?} v{version} request (decoder panicked)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(key: i16, version: i16, rest: &[u8]) -> Bytes {
        let mut b = Vec::new();
        b.extend_from_slice(&key.to_be_bytes());
        b.extend_from_slice(&version.to_be_bytes());
        b.extend_from_slice(&7i32.to_be_bytes());
        b.extend_from_slice(rest);
        Bytes::from(b)
    }

    #[test]
    fn hostile_counts_do_not_allocate() {
        // Produce v7: client id (null), transactional id (null), acks, timeout, then a topic
        // array claiming i32::MAX entries. The unpatched crate aborted on this allocation.
        let mut rest = Vec::new();
        rest.extend_from_slice(&(-1i16).to_be_bytes());
        rest.extend_from_slice(&(-1i16).to_be_bytes());
        rest.extend_from_slice(&1i16.to_be_bytes());
        rest.extend_from_slice(&1000i32.to_be_bytes());
        rest.extend_from_slice(&i32::MAX.to_be_bytes());
        let mut f = frame(0, 7, &rest);
        assert!(matches!(decode(&mut f), Decoded::Refused(_)));
    }

    #[test]
    fn unknown_keys_versions_and_short_frames_are_refused() {
        assert!(matches!(
            decode(&mut frame(9999, 0, &[])),
            Decoded::Refused(_)
        ));
        assert!(matches!(
            decode(&mut frame(3, 999, &[])),
            Decoded::Refused(_)
        ));
        assert!(matches!(
            decode(&mut Bytes::from_static(&[0, 1])),
            Decoded::Refused(_)
        ));
        assert!(matches!(
            decode(&mut frame(18, 99, &[])),
            Decoded::UnsupportedApiVersions { correlation_id: 7 }
        ));
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(key in 0i16..80, version in 0i16..14, body in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let mut f = frame(key, version, &body);
            let _ = decode(&mut f);
        }
    }
}
