//! A small Kafka client for Ferry's own commands (`ferry groups`, and later `ferry produce`,
//! `consume`, `topics`, `status`): one connection, one request at a time, codecs from the
//! `kafka-protocol` crate. Not a general-purpose client: users keep their own.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub mod region;
pub use region::RegionClient;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{api:?}: {source}")]
    Io {
        api: ApiKey,
        #[source]
        source: std::io::Error,
    },
    #[error("{api:?}: {message}")]
    Codec { api: ApiKey, message: String },
    #[error("{api:?}: no answer within {0:?}", .timeout)]
    Timeout { api: ApiKey, timeout: Duration },
    #[error("{0}")]
    Kafka(String),
}

/// What a client's connection runs over: plain TCP, or mutual TLS to the broker's internal door.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Sync {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Sync> Stream for T {}

/// One connection to a broker.
pub struct Client {
    stream: Box<dyn Stream>,
    correlation: i32,
    client_id: String,
    pub timeout: Duration,
}

/// Responses larger than this are refused.
const RESPONSE_BYTES_MAX: usize = 256 << 20;

impl Client {
    pub async fn connect(addr: &str) -> Result<Client, ClientError> {
        let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Connect {
                addr: addr.to_string(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"),
            })?
            .map_err(|source| ClientError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        Ok(Client {
            stream: Box::new(stream),
            correlation: 0,
            client_id: "ferry-cli".into(),
            timeout: Duration::from_secs(30),
        })
    }

    /// Connect to a broker's internal door: mutual TLS on its Kafka port, presenting the
    /// certificate of `tls` (the region's own, for its gateway; an operator's, for commands).
    /// Ferry's internal requests (MirrorAppend, MirrorAck, FerryControl) are served only here.
    pub async fn connect_internal(
        addr: &str,
        tls: &crate::transport::trust::TlsTarget,
    ) -> Result<Client, ClientError> {
        let err = |source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        };
        let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
        let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .map_err(|_| err(timed_out()))?
            .map_err(err)?;
        let _ = stream.set_nodelay(true);
        let stream = tokio::time::timeout(Duration::from_secs(10), tls.connect(stream))
            .await
            .map_err(|_| err(timed_out()))?
            .map_err(err)?;
        Ok(Client {
            stream: Box::new(stream),
            correlation: 0,
            client_id: "ferry-internal".into(),
            timeout: Duration::from_secs(30),
        })
    }

    /// Write a whole request (and push it through TLS, where there is TLS).
    async fn put(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(frame).await?;
        self.stream.flush().await
    }

    /// Send `req` at `version` and wait for its response.
    pub async fn send<R: Request>(
        &mut self,
        req: &R,
        version: i16,
    ) -> Result<R::Response, ClientError> {
        let api = ApiKey::try_from(R::KEY).expect("a known request");
        self.correlation += 1;
        let cid = self.correlation;
        let codec = |message: String| ClientError::Codec { api, message };
        let mut buf = BytesMut::new();
        buf.put_i32(0);
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(cid)
            .with_client_id(Some(StrBytes::from_string(self.client_id.clone())));
        header
            .encode(&mut buf, R::header_version(version))
            .map_err(|e| codec(e.to_string()))?;
        req.encode(&mut buf, version)
            .map_err(|e| codec(e.to_string()))?;
        let len = (buf.len() - 4) as i32;
        buf[0..4].copy_from_slice(&len.to_be_bytes());
        let io = |source| ClientError::Io { api, source };
        let timeout = self.timeout;
        let fut = async {
            self.put(&buf).await.map_err(io)?;
            let n = self.stream.read_i32().await.map_err(io)?;
            if n < 4 || n as usize > RESPONSE_BYTES_MAX {
                return Err(codec(format!("response of {n} bytes")));
            }
            let mut body = vec![0u8; n as usize];
            self.stream.read_exact(&mut body).await.map_err(io)?;
            Ok(Bytes::from(body))
        };
        let mut body = tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout { api, timeout })??;
        let h = ResponseHeader::decode(
            &mut body,
            <R::Response as HeaderVersion>::header_version(version),
        )
        .map_err(|e| codec(e.to_string()))?;
        if h.correlation_id != cid {
            return Err(codec(format!(
                "correlation id {} for request {cid}",
                h.correlation_id
            )));
        }
        let resp = R::Response::decode(&mut body, version).map_err(|e| codec(e.to_string()))?;
        if body.has_remaining() {
            tracing::debug!(?api, left = body.remaining(), "response had trailing bytes");
        }
        Ok(resp)
    }
}

impl Client {
    /// Send one of Ferry's own request frames (length prefix included) and read the response
    /// body, bounded in size and time.
    async fn ferry_round_trip(
        &mut self,
        frame: &[u8],
        api: ApiKey,
        what: &str,
    ) -> Result<Bytes, ClientError> {
        let io = |source| ClientError::Io { api, source };
        let timeout = self.timeout;
        let fut = async {
            self.put(frame).await.map_err(io)?;
            let n = self.stream.read_i32().await.map_err(io)?;
            if n < 4 || n as usize > RESPONSE_BYTES_MAX {
                return Err(ClientError::Codec {
                    api,
                    message: format!("{what} response of {n} bytes"),
                });
            }
            let mut body = vec![0u8; n as usize];
            self.stream.read_exact(&mut body).await.map_err(io)?;
            Ok(Bytes::from(body))
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout { api, timeout })?
    }

    /// MirrorAppend (Ferry's own request, see [`crate::kafka::mirror_append`]):
    /// (error code, log end offset, message).
    pub async fn mirror_append(
        &mut self,
        req: &crate::kafka::mirror_append::MirrorAppend,
    ) -> Result<(i16, i64, String), ClientError> {
        use crate::kafka::mirror_append as ma;
        let api = ApiKey::Produce; // for error context only
        self.correlation += 1;
        let cid = self.correlation;
        let frame = ma::encode_request(cid, req);
        let body = self.ferry_round_trip(&frame, api, "MirrorAppend").await?;
        let (rcid, err, end, msg) = ma::decode_response(body).ok_or(ClientError::Codec {
            api,
            message: "malformed MirrorAppend response".into(),
        })?;
        if rcid != cid {
            return Err(ClientError::Codec {
                api,
                message: format!("correlation id {rcid} for {cid}"),
            });
        }
        Ok((err, end, msg))
    }
}

impl Client {
    /// MirrorAck (see [`crate::kafka::mirror_append::ACK_KEY`]): tell the broker how far
    /// `region` holds a partition. Returns the error code.
    pub async fn mirror_ack(
        &mut self,
        topic: &str,
        partition: i32,
        region: &str,
        offset: i64,
    ) -> Result<i16, ClientError> {
        use crate::kafka::mirror_append as ma;
        let api = ApiKey::Produce; // for error context only
        self.correlation += 1;
        let cid = self.correlation;
        let frame = ma::encode_ack(cid, topic, partition, region, offset);
        let io = |source| ClientError::Io { api, source };
        self.put(&frame).await.map_err(io)?;
        let n = self.stream.read_i32().await.map_err(io)?;
        if !(4..=1024).contains(&n) {
            return Err(ClientError::Codec {
                api,
                message: format!("MirrorAck response of {n} bytes"),
            });
        }
        let mut body = vec![0u8; n as usize];
        self.stream.read_exact(&mut body).await.map_err(io)?;
        let (rcid, err, _, _) =
            ma::decode_response(Bytes::from(body)).ok_or(ClientError::Codec {
                api,
                message: "malformed MirrorAck response".into(),
            })?;
        if rcid != cid {
            return Err(ClientError::Codec {
                api,
                message: format!("correlation id {rcid} for {cid}"),
            });
        }
        Ok(err)
    }
}

/// How much one [`Client::fetch_partition`] may wait for and bring back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchBounds {
    /// Long poll: how long the broker may wait for `min_bytes` (0: answer at once).
    pub max_wait_ms: i32,
    pub min_bytes: i32,
    /// Bytes of records at most (the broker still returns a first batch larger than this).
    pub max_bytes: i32,
}

/// One partition's part of a Fetch answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedPartition {
    /// The partition's Kafka error code (0: none).
    pub error_code: i16,
    /// The record batches, as stored (whole batches; possibly starting before the offset asked
    /// for, and possibly ending in a partial batch the caller drops).
    pub records: Bytes,
    pub high_watermark: i64,
    /// The partition's log start offset (-1 if the broker did not say).
    pub log_start_offset: i64,
}

impl Client {
    /// Fetch (v11) one partition of `topic` from `offset` as a consumer (replica id -1).
    pub async fn fetch_partition(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        bounds: FetchBounds,
    ) -> Result<FetchedPartition, ClientError> {
        use kafka_protocol::messages::fetch_request::{FetchPartition, FetchRequest, FetchTopic};
        use kafka_protocol::messages::{BrokerId, TopicName};
        let mut req = FetchRequest::default();
        req.replica_id = BrokerId(-1);
        req.max_wait_ms = bounds.max_wait_ms;
        req.min_bytes = bounds.min_bytes;
        req.max_bytes = bounds.max_bytes;
        let mut ft = FetchTopic::default();
        ft.topic = TopicName(StrBytes::from_string(topic.to_string()));
        let mut fp = FetchPartition::default();
        fp.partition = partition;
        fp.fetch_offset = offset;
        fp.partition_max_bytes = bounds.max_bytes;
        ft.partitions.push(fp);
        req.topics.push(ft);
        let resp = self.send(&req, 11).await?;
        let p = resp
            .responses
            .into_iter()
            .flat_map(|t| t.partitions)
            .find(|p| p.partition_index == partition)
            .ok_or_else(|| ClientError::Codec {
                api: ApiKey::Fetch,
                message: format!("no answer for {topic}-{partition}"),
            })?;
        Ok(FetchedPartition {
            error_code: p.error_code,
            records: p.records.unwrap_or_default(),
            high_watermark: p.high_watermark,
            log_start_offset: p.log_start_offset,
        })
    }
}

impl Client {
    /// Produce (v8) the record batches `records` to one partition with `acks`; the partition's
    /// error code (0 when written) and the base offset the broker gave the first batch.
    pub async fn produce(
        &mut self,
        topic: &str,
        partition: i32,
        records: Bytes,
        acks: i16,
        timeout_ms: i32,
    ) -> Result<(i16, i64), ClientError> {
        use kafka_protocol::messages::produce_request::{
            PartitionProduceData, ProduceRequest, TopicProduceData,
        };
        use kafka_protocol::messages::TopicName;
        let mut req = ProduceRequest::default();
        req.acks = acks;
        req.timeout_ms = timeout_ms;
        let mut td = TopicProduceData::default();
        td.name = TopicName(StrBytes::from_string(topic.to_string()));
        let mut pd = PartitionProduceData::default();
        pd.index = partition;
        pd.records = Some(records);
        td.partition_data.push(pd);
        req.topic_data.push(td);
        let resp = self.send(&req, 8).await?;
        let p = resp
            .responses
            .into_iter()
            .flat_map(|t| t.partition_responses)
            .find(|p| p.index == partition)
            .ok_or_else(|| ClientError::Codec {
                api: ApiKey::Produce,
                message: format!("no answer for {topic}-{partition}"),
            })?;
        Ok((p.error_code, p.base_offset))
    }
}

impl Client {
    /// Offsets of `partitions` of `topic` at `timestamp` (-1 latest, -2 earliest, or a time):
    /// partition → offset (-1 when no record is that recent). A partition error fails the call.
    pub async fn list_offsets(
        &mut self,
        topic: &str,
        partitions: &[i32],
        timestamp: i64,
    ) -> Result<std::collections::BTreeMap<i32, i64>, ClientError> {
        let mut out = std::collections::BTreeMap::new();
        for (p, (code, offset)) in self
            .list_offsets_coded(topic, partitions, timestamp)
            .await?
        {
            if code != 0 {
                return Err(ClientError::Kafka(format!(
                    "list offsets {topic}-{p}: {} ({code})",
                    error_name(code)
                )));
            }
            out.insert(p, offset);
        }
        Ok(out)
    }

    /// [`Client::list_offsets`] with each partition's error code: partition → (code, offset).
    pub async fn list_offsets_coded(
        &mut self,
        topic: &str,
        partitions: &[i32],
        timestamp: i64,
    ) -> Result<std::collections::BTreeMap<i32, (i16, i64)>, ClientError> {
        self.list_offsets_isolated(topic, partitions, timestamp, 0)
            .await
    }

    /// [`Client::list_offsets_coded`] at an isolation level (1: `read_committed`, whose latest
    /// offset is the last stable offset).
    pub async fn list_offsets_isolated(
        &mut self,
        topic: &str,
        partitions: &[i32],
        timestamp: i64,
        isolation_level: i8,
    ) -> Result<std::collections::BTreeMap<i32, (i16, i64)>, ClientError> {
        use kafka_protocol::messages::list_offsets_request::{
            ListOffsetsPartition, ListOffsetsRequest, ListOffsetsTopic,
        };
        use kafka_protocol::messages::{BrokerId, TopicName};
        let mut req = ListOffsetsRequest::default();
        req.replica_id = BrokerId(-1);
        req.isolation_level = isolation_level;
        let mut t = ListOffsetsTopic::default();
        t.name = TopicName(StrBytes::from_string(topic.to_string()));
        for p in partitions {
            let mut lp = ListOffsetsPartition::default();
            lp.partition_index = *p;
            lp.timestamp = timestamp;
            t.partitions.push(lp);
        }
        req.topics.push(t);
        Ok(self
            .send(&req, 7)
            .await?
            .topics
            .into_iter()
            .flat_map(|t| t.partitions)
            .map(|p| (p.partition_index, (p.error_code, p.offset)))
            .collect())
    }

    /// Commit offsets of a group from outside it (generation -1, no member id: the group must
    /// have no members). `offsets` is topic → [(partition, offset)]. The first partition error
    /// fails the call.
    pub async fn commit_offsets(
        &mut self,
        group: &str,
        offsets: &std::collections::BTreeMap<String, Vec<(i32, i64)>>,
    ) -> Result<(), ClientError> {
        use kafka_protocol::messages::offset_commit_request::{
            OffsetCommitRequest, OffsetCommitRequestPartition, OffsetCommitRequestTopic,
        };
        use kafka_protocol::messages::{GroupId, TopicName};
        let sb = |s: &str| StrBytes::from_string(s.to_string());
        let mut req = OffsetCommitRequest::default();
        req.group_id = GroupId(sb(group));
        req.generation_id_or_member_epoch = -1;
        req.member_id = sb("");
        for (topic, parts) in offsets {
            let mut t = OffsetCommitRequestTopic::default();
            t.name = TopicName(sb(topic));
            for (p, o) in parts {
                let mut cp = OffsetCommitRequestPartition::default();
                cp.partition_index = *p;
                cp.committed_offset = *o;
                cp.committed_metadata = Some(sb(""));
                t.partitions.push(cp);
            }
            req.topics.push(t);
        }
        for t in self.send(&req, 7).await?.topics {
            for p in t.partitions {
                if p.error_code != 0 {
                    return Err(ClientError::Kafka(format!(
                        "commit {} {}-{}: {} ({})",
                        group,
                        t.name.0.as_str(),
                        p.partition_index,
                        error_name(p.error_code),
                        p.error_code
                    )));
                }
            }
        }
        Ok(())
    }

    /// The `host:port` of the coordinator of consumer group `group`.
    pub async fn find_coordinator(&mut self, group: &str) -> Result<String, ClientError> {
        use kafka_protocol::messages::find_coordinator_request::FindCoordinatorRequest;
        let mut req = FindCoordinatorRequest::default();
        req.key = StrBytes::from_string(group.to_string());
        let r = self.send(&req, 2).await?;
        if r.error_code != 0 {
            return Err(ClientError::Kafka(format!(
                "coordinator of {group}: {} ({})",
                error_name(r.error_code),
                r.error_code
            )));
        }
        Ok(format!("{}:{}", r.host.as_str(), r.port))
    }

    /// Where each partition of `topic` is led: partition → the leader's `host:port` (`None`
    /// while it has none). An unknown topic is an error.
    pub async fn leaders(
        &mut self,
        topic: &str,
    ) -> Result<std::collections::BTreeMap<i32, Option<String>>, ClientError> {
        use kafka_protocol::messages::metadata_request::{MetadataRequest, MetadataRequestTopic};
        use kafka_protocol::messages::TopicName;
        let mut req = MetadataRequest::default();
        let mut t = MetadataRequestTopic::default();
        t.name = Some(TopicName(StrBytes::from_string(topic.to_string())));
        req.topics = Some(vec![t]);
        req.allow_auto_topic_creation = false;
        let resp = self.send(&req, 9).await?;
        let nodes: std::collections::BTreeMap<i32, String> = resp
            .brokers
            .iter()
            .map(|b| (b.node_id.0, format!("{}:{}", b.host.as_str(), b.port)))
            .collect();
        let t = resp
            .topics
            .into_iter()
            .find(|t| t.name.as_ref().is_some_and(|n| n.0.as_str() == topic))
            .ok_or_else(|| ClientError::Kafka(format!("no metadata for topic {topic}")))?;
        if t.error_code != 0 {
            return Err(ClientError::Kafka(format!(
                "metadata of {topic}: {} ({})",
                error_name(t.error_code),
                t.error_code
            )));
        }
        Ok(t.partitions
            .into_iter()
            .map(|p| (p.partition_index, nodes.get(&p.leader_id.0).cloned()))
            .collect())
    }

    /// Every non-internal topic with its partition count.
    pub async fn topics(&mut self) -> Result<std::collections::BTreeMap<String, i32>, ClientError> {
        use kafka_protocol::messages::metadata_request::MetadataRequest;
        let mut req = MetadataRequest::default();
        req.topics = None;
        Ok(self
            .send(&req, 9)
            .await?
            .topics
            .into_iter()
            .filter(|t| t.error_code == 0)
            .filter_map(|t| t.name.map(|n| (n.0.to_string(), t.partitions.len() as i32)))
            .filter(|(n, _)| !n.starts_with("__"))
            .collect())
    }
}

/// Kafka error code names for messages.
pub fn error_name(code: i16) -> String {
    use kafka_protocol::error::ResponseError;
    match ResponseError::try_from_code(code) {
        None => "NONE".into(),
        Some(ResponseError::Unknown(c)) => format!("error {c}"),
        // The crate's variant names, in Kafka's spelling: NotEnoughReplicas → NOT_ENOUGH_REPLICAS.
        Some(e) => {
            let name = format!("{e:?}");
            let mut out = String::with_capacity(name.len() + 8);
            for (i, ch) in name.chars().enumerate() {
                if ch.is_ascii_uppercase() && i > 0 {
                    out.push('_');
                }
                out.push(ch.to_ascii_uppercase());
            }
            out
        }
    }
}

/// A record decoded for display (`ferry consume`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedRecord {
    pub offset: i64,
    pub timestamp: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// Decode the records of every whole batch in `bytes` (a Fetch answer's records), decompressing
/// as needed. A partial batch at the end is ignored, as clients do.
pub fn decode_records(bytes: &[u8]) -> Result<Vec<OwnedRecord>, ClientError> {
    use crate::batch::{self, BatchHeader, HEADER_BYTES};
    let bad = |m: String| ClientError::Kafka(format!("bad record batch: {m}"));
    let mut out = Vec::new();
    let mut at = 0;
    while at + HEADER_BYTES <= bytes.len() {
        let h = BatchHeader::parse(&bytes[at..]).map_err(|e| bad(e.to_string()))?;
        let n = h.total_bytes();
        if at + n > bytes.len() {
            break;
        }
        let whole = &bytes[at..at + n];
        batch::validate(whole).map_err(|e| bad(e.to_string()))?;
        at += n;
        if h.is_control() {
            continue;
        }
        let (_, plain) = batch::plain_records(whole).map_err(|e| bad(e.to_string()))?;
        for r in batch::records_in(&h, &plain).map_err(|e| bad(e.to_string()))? {
            out.push(OwnedRecord {
                offset: r.offset,
                timestamp: r.timestamp,
                key: r.key.map(|k| k.to_vec()),
                value: r.value.map(|v| v.to_vec()),
                headers: r
                    .headers
                    .iter()
                    .map(|(k, v)| {
                        (
                            String::from_utf8_lossy(k).into_owned(),
                            v.map(|v| v.to_vec()),
                        )
                    })
                    .collect(),
            });
        }
    }
    Ok(out)
}

/// Kafka's default partitioner hash (murmur2), so keyed records land where the Java client
/// and librdkafka's `murmur2_random` would put them.
pub fn murmur2(data: &[u8]) -> i32 {
    let m: u32 = 0x5bd1_e995;
    let r = 24;
    let mut h: u32 = 0x9747_b28c ^ (data.len() as u32);
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(m);
        k ^= k >> r;
        k = k.wrapping_mul(m);
        h = h.wrapping_mul(m);
        h ^= k;
    }
    match tail.len() {
        3 => {
            h ^= (tail[2] as u32) << 16;
            h ^= (tail[1] as u32) << 8;
            h ^= tail[0] as u32;
            h = h.wrapping_mul(m);
        }
        2 => {
            h ^= (tail[1] as u32) << 8;
            h ^= tail[0] as u32;
            h = h.wrapping_mul(m);
        }
        1 => {
            h ^= tail[0] as u32;
            h = h.wrapping_mul(m);
        }
        _ => {}
    }
    h ^= h >> 13;
    h = h.wrapping_mul(m);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's default partitioner picks for a key.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

impl Client {
    /// FerryControl (see [`crate::kafka::control`]): one request to the broker's failover
    /// control plane. `Err(ClientError::Kafka)` carries the broker's refusal.
    pub async fn control(
        &mut self,
        req: &crate::kafka::control::Control,
    ) -> Result<serde_json::Value, ClientError> {
        use crate::kafka::control as c;
        let api = ApiKey::Metadata; // for error context only
        self.correlation += 1;
        let cid = self.correlation;
        let frame = c::encode_request(cid, req);
        let body = self.ferry_round_trip(&frame, api, "FerryControl").await?;
        let (rcid, answer) = c::decode_response(body).ok_or(ClientError::Codec {
            api,
            message: "malformed FerryControl response".into(),
        })?;
        if rcid != cid {
            return Err(ClientError::Codec {
                api,
                message: format!("correlation id {rcid} for {cid}"),
            });
        }
        answer.map_err(ClientError::Kafka)
    }

    /// [`Client::control`] with the answer decoded into `T`.
    pub async fn control_as<T: serde::de::DeserializeOwned>(
        &mut self,
        req: &crate::kafka::control::Control,
    ) -> Result<T, ClientError> {
        let v = self.control(req).await?;
        serde_json::from_value(v).map_err(|e| ClientError::Codec {
            api: ApiKey::Metadata,
            message: format!("FerryControl answer: {e}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_are_kafkas() {
        assert_eq!(error_name(0), "NONE");
        assert_eq!(error_name(19), "NOT_ENOUGH_REPLICAS");
        assert_eq!(error_name(6), "NOT_LEADER_OR_FOLLOWER");
        assert_eq!(error_name(3), "UNKNOWN_TOPIC_OR_PARTITION");
        assert_eq!(error_name(-1), "UNKNOWN_SERVER_ERROR");
    }

    #[test]
    fn murmur2_matches_kafka() {
        // Values from Kafka's UtilsTest.testMurmur2.
        assert_eq!(murmur2(b"21"), -973932308);
        assert_eq!(murmur2(b"foobar"), -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string"), -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string"), -1486304829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"),
            -58897971
        );
        assert_eq!(murmur2(b"abc"), 479470107);
    }
}
