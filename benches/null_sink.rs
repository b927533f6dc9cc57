//! `null-sink`: a measuring instrument for `scripts/bench-broker`, not a broker.
//!
//! It speaks just enough of the Kafka protocol for the benchmark's load tools
//! (ProducerPerformance, ConsumerPerformance, rdkafka_performance) and does the least work a
//! server can: a Produce is read off the socket and answered at once, nothing checked or
//! stored; a Fetch is answered from batches written before the run to an unnamed file in the
//! temp dir (sent with `sendfile` like Ferry's own read path), found by arithmetic: no index or
//! log lookup is done. Run
//! under the same load as the brokers, it measures the load tool itself: how fast the tool goes
//! on this machine when the server costs next to nothing. A goal that asks a broker for more
//! than this cannot be met here by any broker.
//!
//! What it serves: ApiVersions, Metadata, CreateTopics, InitProducerId, Produce, ListOffsets,
//! Fetch, and the classic consumer group APIs (one member per group: the member is its
//! leader, and its own assignment is handed back).
//!
//! ```sh
//! cargo build --release --example null-sink
//! target/release/examples/null-sink --listen 127.0.0.1:19400 --serve-records 1000000 --record-size 1024
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::create_topics_response::{
    CreatableTopicResult, CreateTopicsResponse,
};
use kafka_protocol::messages::fetch_response::{
    FetchResponse, FetchableTopicResponse, PartitionData,
};
use kafka_protocol::messages::find_coordinator_response::{Coordinator, FindCoordinatorResponse};
use kafka_protocol::messages::heartbeat_response::HeartbeatResponse;
use kafka_protocol::messages::init_producer_id_response::InitProducerIdResponse;
use kafka_protocol::messages::join_group_response::{JoinGroupResponse, JoinGroupResponseMember};
use kafka_protocol::messages::leave_group_response::{LeaveGroupResponse, MemberResponse};
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::metadata_response::{
    MetadataResponse, MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponse, OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponse, OffsetFetchResponsePartition, OffsetFetchResponseTopic,
};
use kafka_protocol::messages::produce_response::{
    PartitionProduceResponse, ProduceResponse, TopicProduceResponse,
};
use kafka_protocol::messages::sync_group_response::SyncGroupResponse;
use kafka_protocol::messages::{BrokerId, ProducerId, RequestKind, TopicName};
use kafka_protocol::protocol::StrBytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use ferry::batch::{build, BatchHeader};
use ferry::kafka::fetch_wire::{self, Piece};
use ferry::kafka::{api_versions, decode, encode_response, Decoded};
use ferry::log::ReadSlice;

fn sb(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

/// The records served to consumers: `batches` batches of `per_batch` records, back to back in
/// one in-memory file, batch `i` holding offsets `i * per_batch ..`.
struct Served {
    file: Arc<std::fs::File>,
    batch_len: usize,
    per_batch: i64,
    batches: i64,
}

impl Served {
    fn build(records: i64, record_size: usize) -> std::io::Result<Served> {
        use std::io::Write;
        // About 1,000,000 bytes per batch: librdkafka's default batch.size. Batches at least as
        // large as any client writes make this an upper bound for every client.
        let per_batch = (1_000_000 / (record_size + 12)).max(1) as i64;
        let batches = ((records + per_batch - 1) / per_batch).max(1);
        let value = vec![b'x'; record_size];
        let recs: Vec<build::Record> = (0..per_batch)
            .map(|_| build::Record {
                value: Some(value.clone()),
                ..Default::default()
            })
            .collect();
        let now = ferry::clock::now_ms();
        let template = build::batch(0, now, None, &recs);
        // An unnamed file in the temp dir (the brokers' disk), synced before the sink listens:
        // Fetch then reads from the same kind of page cache as a broker's, with nothing left
        // to write back during the runs.
        let mut file = tempfile::tempfile()?;
        let mut buf = template.clone();
        for i in 0..batches {
            ferry::batch::set_base_offset(&mut buf, i * per_batch);
            file.write_all(&buf)?;
        }
        file.sync_all()?;
        Ok(Served {
            file: Arc::new(file),
            batch_len: template.len(),
            per_batch,
            batches,
        })
    }

    fn end(&self) -> i64 {
        self.batches * self.per_batch
    }

    /// Whole batches from the one holding `offset`, at least one, at most `limit` bytes after
    /// the first.
    fn read(&self, offset: i64, limit: usize) -> ReadSlice {
        if offset < 0 || offset >= self.end() {
            return ReadSlice {
                file: self.file.clone(),
                position: 0,
                len: 0,
            };
        }
        let first = offset / self.per_batch;
        let fit = (limit / self.batch_len).max(1) as i64;
        let n = fit.min(self.batches - first);
        ReadSlice {
            file: self.file.clone(),
            position: (first as usize * self.batch_len) as u64,
            len: n as usize * self.batch_len,
        }
    }
}

#[derive(Default)]
struct State {
    /// Topic name -> (id, partitions).
    topics: HashMap<String, (uuid::Uuid, i32)>,
    /// Records produced per (topic, partition): the next base offset handed out.
    produced: HashMap<(String, i32), i64>,
    producer_ids: i64,
    members: i64,
    /// Group -> (generation, protocol name, last assignment per member).
    groups: HashMap<String, (i32, String, HashMap<String, Bytes>)>,
}

struct Sink {
    host: String,
    port: i32,
    partitions: i32,
    served: Served,
    state: Mutex<State>,
}

impl Sink {
    fn topic(&self, st: &mut State, name: &str) -> (uuid::Uuid, i32) {
        *st.topics
            .entry(name.to_string())
            .or_insert_with(|| (uuid::Uuid::new_v4(), self.partitions))
    }

    fn end(&self, st: &State, topic: &str, partition: i32) -> i64 {
        let produced = st
            .produced
            .get(&(topic.to_string(), partition))
            .copied()
            .unwrap_or(0);
        produced.max(self.served.end())
    }
}

fn main() -> anyhow::Result<()> {
    let mut listen = "127.0.0.1:19400".to_string();
    let mut serve_records: i64 = 1_000_000;
    let mut record_size: usize = 1024;
    let mut partitions: i32 = 1;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--listen" => listen = val()?,
            "--serve-records" => serve_records = val()?.parse()?,
            "--record-size" => record_size = val()?.parse()?,
            "--partitions" => partitions = val()?.parse()?,
            "-h" | "--help" => {
                println!("null-sink [--listen HOST:PORT] [--serve-records N] [--record-size BYTES] [--partitions N]");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other} (see --help)"),
        }
    }
    let addr: SocketAddr = listen.parse()?;
    let served = Served::build(serve_records, record_size)?;
    let sink = Arc::new(Sink {
        host: addr.ip().to_string(),
        port: addr.port() as i32,
        partitions,
        served,
        state: Mutex::new(State::default()),
    });
    // One worker per core, like Ferry's own runtime: a single-threaded runtime served Fetch
    // more slowly than Ferry did (about 1.7 against 2.0 million records/s with
    // rdkafka_performance on the benchmark machine), which would not be a ceiling.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(addr).await?;
        eprintln!(
            "null-sink listening on {addr}: serves {} records of {record_size} B in batches of {}",
            sink.served.end(),
            sink.served.per_batch
        );
        loop {
            let (stream, peer) = listener.accept().await?;
            let sink = sink.clone();
            tokio::spawn(async move {
                if let Err(e) = connection(stream, sink).await {
                    eprintln!("null-sink: {peer}: {e}");
                }
            });
        }
    })
}

async fn connection(stream: TcpStream, sink: Arc<Sink>) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let (mut rd, wr) = stream.into_split();
    let mut wr = wr;
    loop {
        let len = match rd.read_i32().await {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        anyhow::ensure!((8..=128 << 20).contains(&len), "frame of {len} bytes");
        let mut buf = BytesMut::with_capacity(len as usize);
        while buf.len() < len as usize {
            let want = (len as usize - buf.len()) as u64;
            if (&mut rd).take(want).read_buf(&mut buf).await? == 0 {
                anyhow::bail!("truncated frame");
            }
        }
        let mut frame = buf.freeze();
        let pieces = match decode(&mut frame) {
            Decoded::Request {
                version,
                correlation_id,
                body,
                ..
            } => answer(&sink, *body, version, correlation_id).await?,
            Decoded::UnsupportedApiVersions { correlation_id } => {
                vec![Piece::Bytes(api_versions::unsupported(correlation_id)?)]
            }
            Decoded::ApiVersionsAnyway {
                correlation_id,
                version,
            } => vec![Piece::Bytes(api_versions::response(
                correlation_id,
                version,
            )?)],
            Decoded::Refused(reason) => anyhow::bail!("{reason}"),
        };
        for p in pieces {
            match p {
                Piece::Bytes(b) => wr.write_all(&b).await?,
                Piece::File(slice) => ferry::kafka::server::send_file(&wr, &slice)
                    .await
                    .map_err(|e| anyhow::anyhow!(e))?,
            }
        }
    }
}

async fn answer(
    sink: &Sink,
    body: RequestKind,
    version: i16,
    cid: i32,
) -> anyhow::Result<Vec<Piece>> {
    let one = |b: Bytes| Ok(vec![Piece::Bytes(b)]);
    match body {
        RequestKind::ApiVersions(_) => one(api_versions::response(cid, version)?),
        RequestKind::Metadata(req) => {
            let mut resp = MetadataResponse::default();
            let mut b = MetadataResponseBroker::default();
            b.node_id = BrokerId(1);
            b.host = sb(&sink.host);
            b.port = sink.port;
            resp.brokers = vec![b];
            if version >= 2 {
                resp.cluster_id = Some(sb("null-sink"));
            }
            resp.controller_id = BrokerId(1);
            resp.cluster_authorized_operations = i32::MIN;
            let mut st = sink.state.lock().unwrap();
            let names: Vec<String> = match req.topics {
                Some(ts) if !(ts.is_empty() && version == 0) => ts
                    .into_iter()
                    .filter_map(|t| t.name.map(|n| n.0.to_string()))
                    .collect(),
                _ => st.topics.keys().cloned().collect(),
            };
            for name in names {
                let (id, parts) = sink.topic(&mut st, &name);
                let mut mt = MetadataResponseTopic::default();
                mt.name = Some(TopicName(sb(&name)));
                if version >= 10 {
                    mt.topic_id = id;
                }
                mt.topic_authorized_operations = i32::MIN;
                mt.partitions = (0..parts)
                    .map(|i| {
                        let mut p = MetadataResponsePartition::default();
                        p.partition_index = i;
                        p.leader_id = BrokerId(1);
                        p.replica_nodes = vec![BrokerId(1)];
                        p.isr_nodes = vec![BrokerId(1)];
                        p
                    })
                    .collect();
                resp.topics.push(mt);
            }
            one(encode_response(cid, version, &resp)?)
        }
        RequestKind::CreateTopics(req) => {
            let mut resp = CreateTopicsResponse::default();
            let mut st = sink.state.lock().unwrap();
            for t in req.topics {
                let parts = if t.num_partitions > 0 {
                    t.num_partitions
                } else {
                    sink.partitions
                };
                st.topics
                    .entry(t.name.0.to_string())
                    .or_insert((uuid::Uuid::new_v4(), parts));
                let mut r = CreatableTopicResult::default();
                r.name = t.name;
                if version >= 5 {
                    r.num_partitions = parts;
                    r.replication_factor = 1;
                }
                resp.topics.push(r);
            }
            one(encode_response(cid, version, &resp)?)
        }
        RequestKind::InitProducerId(_) => {
            let mut st = sink.state.lock().unwrap();
            st.producer_ids += 1;
            let mut resp = InitProducerIdResponse::default();
            resp.producer_id = ProducerId(st.producer_ids);
            resp.producer_epoch = 0;
            one(encode_response(cid, version, &resp)?)
        }
        RequestKind::Produce(req) => {
            let acks = req.acks;
            let mut resp = ProduceResponse::default();
            let mut st = sink.state.lock().unwrap();
            for td in req.topic_data {
                let mut tr = TopicProduceResponse::default();
                for pd in td.partition_data {
                    // Count the records from the batch headers: nothing else is looked at.
                    let records = pd.records.unwrap_or_default();
                    let mut count = 0i64;
                    let mut at = 0usize;
                    while at < records.len() {
                        let Ok(h) = BatchHeader::parse(&records[at..]) else {
                            break;
                        };
                        count += h.last_offset_delta as i64 + 1;
                        at += h.total_bytes();
                    }
                    let next = st
                        .produced
                        .entry((td.name.0.to_string(), pd.index))
                        .or_insert(0);
                    let mut pr = PartitionProduceResponse::default();
                    pr.index = pd.index;
                    pr.base_offset = *next;
                    pr.log_append_time_ms = -1;
                    *next += count;
                    tr.partition_responses.push(pr);
                }
                tr.name = td.name;
                tr.topic_id = td.topic_id;
                resp.responses.push(tr);
            }
            if acks == 0 {
                return Ok(Vec::new());
            }
            one(encode_response(cid, version, &resp)?)
        }
        RequestKind::ListOffsets(req) => {
            let mut resp = ListOffsetsResponse::default();
            let st = sink.state.lock().unwrap();
            for t in req.topics {
                let mut tr = ListOffsetsTopicResponse::default();
                for p in t.partitions {
                    let mut pr = ListOffsetsPartitionResponse::default();
                    pr.partition_index = p.partition_index;
                    pr.timestamp = -1;
                    pr.offset = if p.timestamp == -1 {
                        sink.end(&st, t.name.0.as_str(), p.partition_index)
                    } else {
                        0
                    };
                    if version >= 4 {
                        pr.leader_epoch = 0;
                    }
                    tr.partitions.push(pr);
                }
                tr.name = t.name;
                resp.topics.push(tr);
            }
            one(encode_response(cid, version, &resp)?)
        }
        RequestKind::Fetch(req) => {
            let mut resp = FetchResponse::default();
            let mut records = Vec::new();
            let mut budget = req.max_bytes.max(0) as usize;
            let mut any = false;
            {
                let st = sink.state.lock().unwrap();
                for ft in &req.topics {
                    let mut tr = FetchableTopicResponse::default();
                    tr.topic = ft.topic.clone();
                    tr.topic_id = ft.topic_id;
                    let mut trecs = Vec::new();
                    for fp in &ft.partitions {
                        let end = sink.end(&st, ft.topic.0.as_str(), fp.partition);
                        let mut pd = PartitionData::default();
                        pd.partition_index = fp.partition;
                        pd.high_watermark = end;
                        pd.last_stable_offset = end;
                        pd.preferred_read_replica = BrokerId(-1);
                        pd.aborted_transactions = None;
                        let limit = (fp.partition_max_bytes.max(0) as usize).min(budget);
                        let slice = if any && limit == 0 {
                            sink.served.read(-1, 0)
                        } else {
                            sink.served.read(fp.fetch_offset, limit)
                        };
                        budget = budget.saturating_sub(slice.len);
                        any |= slice.len > 0;
                        trecs.push(Some(slice));
                        tr.partitions.push(pd);
                    }
                    resp.responses.push(tr);
                    records.push(trecs);
                }
            }
            if !any {
                // Nothing to serve: wait as a broker would before answering empty.
                let wait = req.max_wait_ms.clamp(0, 500) as u64;
                tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
            }
            Ok(fetch_wire::encode(cid, version, &resp, &records))
        }
        RequestKind::FindCoordinator(req) => {
            let mut resp = FindCoordinatorResponse::default();
            if version < 4 {
                resp.node_id = BrokerId(1);
                resp.host = sb(&sink.host);
                resp.port = sink.port;
            } else {
                for key in req.coordinator_keys {
                    let mut c = Coordinator::default();
                    c.key = key;
                    c.node_id = BrokerId(1);
                    c.host = sb(&sink.host);
                    c.port = sink.port;
                    resp.coordinators.push(c);
                }
            }
            one(encode_response(cid, version, &resp)?)
        }
        RequestKind::JoinGroup(req) => {
            let mut st = sink.state.lock().unwrap();
            let member = if req.member_id.is_empty() {
                st.members += 1;
                format!("member-{}", st.members)
            } else {
                req.member_id.to_string()
            };
            let proto = req.protocols.first();
            let name = proto.map(|p| p.name.to_string()).unwrap_or_default();
            let g = st.groups.entry(req.group_id.0.to_string()).or_insert((
                0,
                String::new(),
                HashMap::new(),
            ));
            g.0 += 1;
            g.1 = name.clone();
            let mut resp = JoinGroupResponse::default();
            resp.generation_id = g.0;
            if version >= 7 {
                resp.protocol_type = Some(req.protocol_type.clone());
            }
            resp.protocol_name = Some(sb(&name));
            resp.leader = sb(&member);
            resp.member_id = sb(&member);
            let mut m = JoinGroupResponseMember::default();
            m.member_id = sb(&member);
            m.metadata = proto.map(|p| p.metadata.clone()).unwrap_or_default();
            resp.members = vec![m];
            one(encode_response(cid, version, &resp)?)
        }
        RequestKind::SyncGroup(req) => {
            let mut st = sink.state.lock().unwrap();
            let g = st.groups.entry(req.group_id.0.to_string()).or_insert((
                0,
                String::new(),
                HashMap::new(),
            ));
            for a in &req.assignments {
                g.2.insert(a.member_id.to_string(), a.assignment.clone());
            }
            let mut resp = SyncGroupResponse::default();
            if version >= 5 {
                resp.protocol_type = req.protocol_type.clone();
                resp.protocol_name = Some(sb(&g.1));
            }
            resp.assignment = g.2.get(req.member_id.as_str()).cloned().unwrap_or_default();
            one(encode_response(cid, version, &resp)?)
        }
        RequestKind::Heartbeat(_) => one(encode_response(
            cid,
            version,
            &HeartbeatResponse::default(),
        )?),
        RequestKind::LeaveGroup(req) => {
            let mut resp = LeaveGroupResponse::default();
            if version >= 3 {
                for m in req.members {
                    let mut r = MemberResponse::default();
                    r.member_id = m.member_id;
                    r.group_instance_id = m.group_instance_id;
                    resp.members.push(r);
                }
            }
            one(encode_response(cid, version, &resp)?)
        }
        RequestKind::OffsetFetch(req) => {
            let mut resp = OffsetFetchResponse::default();
            for t in req.topics.unwrap_or_default() {
                let mut tr = OffsetFetchResponseTopic::default();
                tr.name = t.name;
                for p in t.partition_indexes {
                    let mut pr = OffsetFetchResponsePartition::default();
                    pr.partition_index = p;
                    pr.committed_offset = -1;
                    if version >= 5 {
                        pr.committed_leader_epoch = -1;
                    }
                    pr.metadata = Some(sb(""));
                    tr.partitions.push(pr);
                }
                resp.topics.push(tr);
            }
            one(encode_response(cid, version, &resp)?)
        }
        RequestKind::OffsetCommit(req) => {
            let mut resp = OffsetCommitResponse::default();
            for t in req.topics {
                let mut tr = OffsetCommitResponseTopic::default();
                tr.name = t.name;
                for p in t.partitions {
                    let mut pr = OffsetCommitResponsePartition::default();
                    pr.partition_index = p.partition_index;
                    tr.partitions.push(pr);
                }
                resp.topics.push(tr);
            }
            one(encode_response(cid, version, &resp)?)
        }
        other => anyhow::bail!(
            "API {:?} is not served by the null sink",
            std::mem::discriminant(&other)
        ),
    }
}
