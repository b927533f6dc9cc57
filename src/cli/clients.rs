//! `ferry produce`, `ferry consume` and `ferry topics`: built-in Kafka clients for quick checks.
//!
//! Formats (stdin for produce, stdout for consume):
//! - default: one record per line, the line is the value;
//! - `--keys`: `key=value` (split at the first `=`);
//! - `--json`: one JSON object per line, `{"key":..,"value":..,"headers":[[k,v],..],
//!   "partition":..,"offset":..,"timestamp":..}` (strings; nulls allowed), so
//!   `ferry consume --json | ferry produce --json` round-trips keys and headers.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, Subcommand};
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreateTopicsRequest};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchRequest, FetchTopic};
use kafka_protocol::messages::metadata_request::{MetadataRequest, MetadataRequestTopic};
use kafka_protocol::messages::offset_fetch_request::{OffsetFetchRequest, OffsetFetchRequestTopic};
use kafka_protocol::messages::produce_request::{
    PartitionProduceData, ProduceRequest, TopicProduceData,
};
use kafka_protocol::messages::{BrokerId, GroupId, TopicName};
use kafka_protocol::protocol::StrBytes;
use serde::{Deserialize, Serialize};

use crate::batch::build::{self, Record};
use crate::client::{decode_records, error_name, partition_for_key, Client};
use crate::clock::now_ms;

fn sb(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

/// Where the built-in clients connect.
#[derive(Debug, Args, Clone)]
pub struct Endpoint {
    /// A broker address (HOST:PORT).
    #[arg(long, short = 'b')]
    pub bootstrap: Option<String>,
    /// A topology file; with --region, connect to that region's first broker.
    #[arg(long, value_name = "FILE")]
    pub topology: Option<std::path::PathBuf>,
    /// The region to connect to (with --topology).
    #[arg(long)]
    pub region: Option<String>,
}

impl Endpoint {
    pub fn address(&self) -> anyhow::Result<String> {
        if let Some(b) = &self.bootstrap {
            return Ok(b.clone());
        }
        let path = self
            .topology
            .clone()
            .unwrap_or_else(|| std::path::PathBuf::from("topology/local.toml"));
        let region = self
            .region
            .as_deref()
            .context("give --bootstrap HOST:PORT, or --topology FILE with --region NAME")?;
        crate::cli::topology_bootstrap(&path, region)
    }
}

#[derive(Debug, Args)]
pub struct ProduceArgs {
    #[command(flatten)]
    pub endpoint: Endpoint,
    pub topic: String,
    /// Lines are `key=value`.
    #[arg(long)]
    pub keys: bool,
    /// Lines are JSON objects with key, value and headers.
    #[arg(long, conflicts_with = "keys")]
    pub json: bool,
    /// A header `name=value` added to every record (repeatable).
    #[arg(long = "header", short = 'H', value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// Records per request at most.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
}

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    #[command(flatten)]
    pub endpoint: Endpoint,
    pub topic: String,
    /// Read from the earliest offset (default: only new records), unless the group has
    /// committed offsets.
    #[arg(long)]
    pub from_beginning: bool,
    /// Commit offsets to this group and resume from its committed offsets.
    #[arg(long)]
    pub group: Option<String>,
    /// Print `key=value`.
    #[arg(long)]
    pub keys: bool,
    /// Print JSON objects (see `ferry produce --json`).
    #[arg(long, conflicts_with = "keys")]
    pub json: bool,
    /// Stop after this many records.
    #[arg(long, short = 'n')]
    pub max_records: Option<u64>,
    /// Stop when no record arrived for this long (e.g. `5s`); default: run until Ctrl-C.
    #[arg(long, value_parser = crate::units::parse_duration)]
    pub idle_exit: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct TopicsArgs {
    #[command(flatten)]
    pub endpoint: Endpoint,
    #[command(subcommand)]
    pub command: TopicsCommand,
}

#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// List topics with partitions and end offsets.
    List,
    /// Each partition's leader, leader epoch, replicas and in-sync replicas (all topics, or
    /// the one named).
    Describe { name: Option<String> },
    /// Create a topic.
    Create {
        name: String,
        #[arg(long, default_value_t = 1)]
        partitions: i32,
        /// Replicas per partition in a region cluster (default: the cluster's).
        #[arg(long, default_value_t = -1)]
        replication_factor: i16,
        /// A topic config `name=value` (repeatable), e.g. retention.ms=86400000.
        #[arg(long = "config", value_name = "NAME=VALUE")]
        configs: Vec<String>,
    },
}

#[derive(Debug, Serialize, Deserialize, Default)]
struct JsonRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    partition: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    offset: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timestamp: Option<i64>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    headers: Vec<(String, Option<String>)>,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Partition count of a topic (created by the broker if auto-creation is on).
async fn partitions(c: &mut Client, topic: &str) -> anyhow::Result<i32> {
    for _ in 0..20 {
        let mut req = MetadataRequest::default();
        let mut t = MetadataRequestTopic::default();
        t.name = Some(TopicName(sb(topic)));
        req.topics = Some(vec![t]);
        req.allow_auto_topic_creation = true;
        let resp = c.send(&req, 9).await?;
        let t = resp
            .topics
            .into_iter()
            .next()
            .context("no topic in Metadata")?;
        match t.error_code {
            0 if !t.partitions.is_empty() => return Ok(t.partitions.len() as i32),
            0 | 5 => tokio::time::sleep(Duration::from_millis(100)).await,
            e => bail!("topic {topic}: {} ({e})", error_name(e)),
        }
    }
    bail!("topic {topic} has no partitions")
}

pub fn produce(args: ProduceArgs) -> anyhow::Result<()> {
    let addr = args.endpoint.address()?;
    let fixed: Vec<(String, Option<Vec<u8>>)> = args
        .headers
        .iter()
        .map(|h| match h.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.as_bytes().to_vec())),
            None => (h.clone(), None),
        })
        .collect();
    runtime()?.block_on(async move {
        let mut c = Client::connect(&addr).await?;
        let n = partitions(&mut c, &args.topic).await?;
        let stdin = std::io::stdin();
        let mut pending: BTreeMap<i32, Vec<Record>> = BTreeMap::new();
        let mut count = 0usize;
        let mut next_rr = 0i32;
        let mut total = 0u64;
        let mut lines = stdin.lock().lines();
        loop {
            let line = lines.next().transpose().context("reading stdin")?;
            let done = line.is_none();
            if let Some(line) = line {
                let mut r = Record::default();
                let mut partition = None;
                if args.json {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let j: JsonRecord = serde_json::from_str(&line)
                        .with_context(|| format!("not a JSON record: {line}"))?;
                    r.key = j.key.map(String::into_bytes);
                    r.value = j.value.map(String::into_bytes);
                    r.headers = j
                        .headers
                        .into_iter()
                        .map(|(k, v)| (k, v.map(String::into_bytes)))
                        .collect();
                    partition = j.partition.filter(|p| *p < n);
                } else if args.keys {
                    let (k, v) = line.split_once('=').unwrap_or(("", line.as_str()));
                    r.key = Some(k.as_bytes().to_vec());
                    r.value = Some(v.as_bytes().to_vec());
                } else {
                    r.value = Some(line.into_bytes());
                }
                r.headers.extend(fixed.iter().cloned());
                let p = partition.unwrap_or_else(|| match &r.key {
                    Some(k) => partition_for_key(k, n),
                    None => {
                        next_rr = (next_rr + 1) % n;
                        next_rr
                    }
                });
                pending.entry(p).or_default().push(r);
                count += 1;
            }
            if (done || count >= args.batch) && count > 0 {
                total += send_batch(&mut c, &args.topic, &mut pending).await?;
                count = 0;
            }
            if done {
                break;
            }
        }
        eprintln!("produced {total} records to {}", args.topic);
        Ok(())
    })
}

async fn send_batch(
    c: &mut Client,
    topic: &str,
    pending: &mut BTreeMap<i32, Vec<Record>>,
) -> anyhow::Result<u64> {
    let mut req = ProduceRequest::default();
    req.acks = -1;
    req.timeout_ms = 30_000;
    let mut td = TopicProduceData::default();
    td.name = TopicName(sb(topic));
    let mut n = 0u64;
    let now = now_ms();
    for (p, recs) in std::mem::take(pending) {
        n += recs.len() as u64;
        let mut pd = PartitionProduceData::default();
        pd.index = p;
        pd.records = Some(Bytes::from(build::batch(0, now, None, &recs)));
        td.partition_data.push(pd);
    }
    req.topic_data.push(td);
    let resp = c.send(&req, 8).await?;
    for t in resp.responses {
        for p in t.partition_responses {
            if p.error_code != 0 {
                let msg = p
                    .error_message
                    .map(|m| m.to_string())
                    .unwrap_or_else(|| error_name(p.error_code).to_string());
                bail!(
                    "produce to {topic}-{}: {msg} (error {})",
                    p.index,
                    p.error_code
                );
            }
        }
    }
    Ok(n)
}

fn text(b: &Option<Vec<u8>>) -> Option<String> {
    b.as_ref().map(|b| String::from_utf8_lossy(b).into_owned())
}

pub fn consume(args: ConsumeArgs) -> anyhow::Result<()> {
    let addr = args.endpoint.address()?;
    if args.max_records == Some(0) {
        return Ok(());
    }
    runtime()?.block_on(async move {
        let mut c = Client::connect(&addr).await?;
        let n = partitions(&mut c, &args.topic).await?;
        let start = if args.from_beginning { -2 } else { -1 };
        let mut positions = c
            .list_offsets(&args.topic, &(0..n).collect::<Vec<_>>(), start)
            .await?;
        if let Some(g) = &args.group {
            let mut req = OffsetFetchRequest::default();
            req.group_id = GroupId(sb(g));
            let mut t = OffsetFetchRequestTopic::default();
            t.name = TopicName(sb(&args.topic));
            t.partition_indexes = (0..n).collect();
            req.topics = Some(vec![t]);
            let resp = c.send(&req, 7).await?;
            for t in resp.topics {
                for p in t.partitions {
                    if p.committed_offset >= 0 {
                        positions.insert(p.partition_index, p.committed_offset);
                    }
                }
            }
        }
        let mut out = std::io::stdout().lock();
        let mut seen = 0u64;
        let mut last_data = Instant::now();
        loop {
            let mut req = FetchRequest::default();
            req.replica_id = BrokerId(-1);
            req.max_wait_ms = 500;
            req.min_bytes = 1;
            req.max_bytes = 16 << 20;
            let mut ft = FetchTopic::default();
            ft.topic = TopicName(sb(&args.topic));
            for (p, o) in &positions {
                let mut fp = FetchPartition::default();
                fp.partition = *p;
                fp.fetch_offset = *o;
                fp.partition_max_bytes = 1 << 20;
                ft.partitions.push(fp);
            }
            req.topics.push(ft);
            let resp = c.send(&req, 11).await?;
            let mut got = false;
            for t in resp.responses {
                for p in t.partitions {
                    if p.error_code != 0 {
                        bail!(
                            "fetch {}-{}: {}",
                            args.topic,
                            p.partition_index,
                            error_name(p.error_code)
                        );
                    }
                    let Some(bytes) = p.records else { continue };
                    let pos = positions.get(&p.partition_index).copied().unwrap_or(0);
                    for r in decode_records(&bytes)? {
                        if r.offset < pos {
                            continue;
                        }
                        got = true;
                        positions.insert(p.partition_index, r.offset + 1);
                        if args.json {
                            let j = JsonRecord {
                                partition: Some(p.partition_index),
                                offset: Some(r.offset),
                                timestamp: Some(r.timestamp),
                                key: text(&r.key),
                                value: text(&r.value),
                                headers: r
                                    .headers
                                    .iter()
                                    .map(|(k, v)| (k.clone(), text(v)))
                                    .collect(),
                            };
                            writeln!(out, "{}", serde_json::to_string(&j)?)?;
                        } else if args.keys {
                            writeln!(
                                out,
                                "{}={}",
                                text(&r.key).unwrap_or_default(),
                                text(&r.value).unwrap_or_default()
                            )?;
                        } else {
                            writeln!(out, "{}", text(&r.value).unwrap_or_default())?;
                        }
                        seen += 1;
                        if args.max_records.is_some_and(|m| seen >= m) {
                            out.flush()?;
                            return commit(&mut c, &args, &positions).await;
                        }
                    }
                }
            }
            out.flush()?;
            if got {
                last_data = Instant::now();
                commit(&mut c, &args, &positions).await?;
            } else if args.idle_exit.is_some_and(|d| last_data.elapsed() >= d) {
                return Ok(());
            }
        }
    })
}

async fn commit(
    c: &mut Client,
    args: &ConsumeArgs,
    positions: &BTreeMap<i32, i64>,
) -> anyhow::Result<()> {
    let Some(g) = &args.group else { return Ok(()) };
    let entries = BTreeMap::from([(
        args.topic.clone(),
        positions.iter().map(|(p, o)| (*p, *o)).collect::<Vec<_>>(),
    )]);
    c.commit_offsets(g, &entries).await?;
    Ok(())
}

pub fn topics(args: TopicsArgs) -> anyhow::Result<()> {
    let addr = args.endpoint.address()?;
    runtime()?.block_on(async move {
        let mut c = Client::connect(&addr).await?;
        match args.command {
            TopicsCommand::List => {
                let mut req = MetadataRequest::default();
                req.topics = None;
                let resp = c.send(&req, 9).await?;
                println!("{:<40} {:>10} {:>16}", "TOPIC", "PARTITIONS", "END OFFSETS");
                let mut topics: Vec<_> = resp.topics.into_iter().collect();
                topics.sort_by(|a, b| a.name.cmp(&b.name));
                for t in topics {
                    let name = t.name.map(|n| n.0.to_string()).unwrap_or_default();
                    let n = t.partitions.len() as i32;
                    let ends = c.list_offsets(&name, &(0..n).collect::<Vec<_>>(), -1).await.unwrap_or_default();
                    let total: i64 = ends.values().sum();
                    println!("{name:<40} {n:>10} {total:>16}");
                }
            }
            TopicsCommand::Describe { name } => {
                let mut req = MetadataRequest::default();
                req.topics = name.map(|n| {
                    let mut t = kafka_protocol::messages::metadata_request::MetadataRequestTopic::default();
                    t.name = Some(TopicName(sb(&n)));
                    vec![t]
                });
                let resp = c.send(&req, 9).await?;
                println!(
                    "{:<40} {:>9} {:>6} {:>12} {:<16} {:<16} OFFLINE",
                    "TOPIC", "PARTITION", "LEADER", "LEADER EPOCH", "REPLICAS", "ISR"
                );
                let ids = |v: &[kafka_protocol::messages::BrokerId]| {
                    v.iter().map(|b| b.0.to_string()).collect::<Vec<_>>().join(",")
                };
                let mut topics: Vec<_> = resp.topics.into_iter().collect();
                topics.sort_by(|a, b| a.name.cmp(&b.name));
                for t in topics {
                    let tname = t.name.map(|n| n.0.to_string()).unwrap_or_default();
                    if t.error_code != 0 {
                        bail!("describe {tname}: {}", error_name(t.error_code));
                    }
                    let mut parts = t.partitions;
                    parts.sort_by_key(|p| p.partition_index);
                    for p in parts {
                        println!(
                            "{tname:<40} {:>9} {:>6} {:>12} {:<16} {:<16} {}",
                            p.partition_index,
                            p.leader_id.0,
                            p.leader_epoch,
                            ids(&p.replica_nodes),
                            ids(&p.isr_nodes),
                            ids(&p.offline_replicas)
                        );
                    }
                }
            }
            TopicsCommand::Create { name, partitions, replication_factor, configs } => {
                let mut req = CreateTopicsRequest::default();
                req.timeout_ms = 30_000;
                let mut t = CreatableTopic::default();
                t.name = TopicName(sb(&name));
                t.num_partitions = partitions;
                t.replication_factor = replication_factor;
                for c in configs {
                    let (k, v) = c.split_once('=').context("--config NAME=VALUE")?;
                    let mut cc = kafka_protocol::messages::create_topics_request::CreatableTopicConfig::default();
                    cc.name = sb(k);
                    cc.value = Some(sb(v));
                    t.configs.push(cc);
                }
                req.topics.push(t);
                let resp = c.send(&req, 5).await?;
                for r in resp.topics {
                    if r.error_code != 0 {
                        bail!(
                            "create {}: {}",
                            r.name.0.as_str(),
                            r.error_message.map(|m| m.to_string()).unwrap_or_else(|| error_name(r.error_code))
                        );
                    }
                    println!("created {} with {} partitions", r.name.0.as_str(), r.num_partitions);
                }
            }
        }
        Ok(())
    })
}
