//! `ferry quarantine list|show|replay`: inspect the records a rejoining region set aside (its
//! divergent tail, in `__ferry.quarantine.<topic>`), and produce them again into the live topic
//! once an operator has decided they belong there.

use std::path::PathBuf;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, Subcommand};
use hyper::Method;
use serde::Serialize;

use crate::batch::build;
use crate::broker::quarantine::{topic_for, PREFIX};
use crate::client::{decode_records, error_name, OwnedRecord, RegionClient};
use crate::mirror::admin;

#[derive(Debug, Args)]
pub struct QuarantineArgs {
    #[command(subcommand)]
    pub command: QuarantineCommand,
}

#[derive(Debug, Subcommand)]
pub enum QuarantineCommand {
    /// Quarantine topics and their record counts, per region.
    List {
        #[arg(long, default_value = "topology/local.toml")]
        topology: PathBuf,
        /// Only this region (default: every region).
        #[arg(long)]
        region: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The quarantined records of a topic in a region, with their original offset, epoch and
    /// region (one JSON object per line).
    Show {
        /// The live topic (its quarantine is `__ferry.quarantine.<topic>`).
        topic: String,
        #[arg(long, default_value = "topology/local.toml")]
        topology: PathBuf,
        #[arg(long)]
        region: String,
    },
    /// Produce the quarantined records of a topic again into the live topic, in its current
    /// primary region (same partition, key, value, headers and timestamp; the
    /// `ferry.original.*` headers are dropped). The quarantine is kept: replay once.
    Replay {
        topic: String,
        #[arg(long, default_value = "topology/local.toml")]
        topology: PathBuf,
        /// The region holding the quarantine.
        #[arg(long)]
        region: String,
    },
}

/// Records per produce request when replaying.
const REPLAY_BATCH: usize = 500;

/// A client for every broker of `region` in the topology.
fn region_client(t: &crate::topology::Topology, region: &str) -> anyhow::Result<RegionClient> {
    RegionClient::of_topology(t, region, None)
        .with_context(|| format!("no region `{region}` in the topology"))
}

/// One quarantined record.
#[derive(Debug, Clone, Serialize)]
pub struct Quarantined {
    pub partition: i32,
    /// Offset in the quarantine topic.
    pub offset: i64,
    pub original_offset: Option<i64>,
    pub original_epoch: Option<i32>,
    pub original_region: Option<String>,
    pub timestamp: i64,
    pub key: Option<String>,
    pub value: Option<String>,
    pub headers: Vec<(String, Option<String>)>,
    #[serde(skip)]
    pub record: OwnedRecord,
}

fn text(b: &Option<Vec<u8>>) -> Option<String> {
    b.as_ref().map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Every record of a quarantine topic in one region (each partition from its leader).
pub async fn read(c: &mut RegionClient, live_topic: &str) -> anyhow::Result<Vec<Quarantined>> {
    let q = topic_for(live_topic);
    let Some(partitions) = c.all_topics().await?.get(&q).copied() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for p in 0..partitions {
        let end = c
            .list_offsets(&q, &[p], -1)
            .await?
            .get(&p)
            .copied()
            .unwrap_or(0);
        let mut at = c
            .list_offsets(&q, &[p], -2)
            .await?
            .get(&p)
            .copied()
            .unwrap_or(0);
        while at < end {
            let bounds = crate::client::FetchBounds {
                max_wait_ms: 0,
                min_bytes: 0,
                max_bytes: 4 << 20,
            };
            let pr = c.fetch_partition(&q, p, at, bounds).await?;
            let mut progressed = false;
            if pr.error_code != 0 {
                bail!("fetch {q}-{p}: {}", error_name(pr.error_code));
            }
            for r in decode_records(&pr.records)? {
                if r.offset < at {
                    continue;
                }
                at = r.offset + 1;
                progressed = true;
                let h = |k: &str| {
                    r.headers
                        .iter()
                        .find(|(x, _)| x == k)
                        .and_then(|(_, v)| text(v))
                };
                out.push(Quarantined {
                    partition: p,
                    offset: r.offset,
                    original_offset: h("ferry.original.offset").and_then(|s| s.parse().ok()),
                    original_epoch: h("ferry.original.epoch").and_then(|s| s.parse().ok()),
                    original_region: h("ferry.original.region"),
                    timestamp: r.timestamp,
                    key: text(&r.key),
                    value: text(&r.value),
                    headers: r
                        .headers
                        .iter()
                        .filter(|(k, _)| !k.starts_with("ferry.original."))
                        .map(|(k, v)| (k.clone(), text(v)))
                        .collect(),
                    record: r,
                });
            }
            if !progressed {
                break;
            }
        }
    }
    Ok(out)
}

pub fn run(args: QuarantineArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match args.command {
            QuarantineCommand::List {
                topology,
                region,
                json,
            } => {
                let t = crate::cli::load_topology(&topology)?;
                let regions: Vec<String> = match region {
                    Some(r) => vec![r],
                    None => t.regions.iter().map(|r| r.name.clone()).collect(),
                };
                let mut rows = Vec::new();
                for r in regions {
                    let mut c = region_client(&t, &r)?;
                    let topics = match c.all_topics().await {
                        Ok(x) => x,
                        Err(e) => {
                            eprintln!("{r}: {e}");
                            continue;
                        }
                    };
                    for (name, partitions) in topics {
                        let Some(live) = name.strip_prefix(PREFIX) else {
                            continue;
                        };
                        let ps: Vec<i32> = (0..partitions).collect();
                        let ends = c.list_offsets(&name, &ps, -1).await?;
                        let starts = c.list_offsets(&name, &ps, -2).await?;
                        let records: i64 = ps
                            .iter()
                            .map(|p| ends.get(p).unwrap_or(&0) - starts.get(p).unwrap_or(&0))
                            .sum();
                        rows.push(serde_json::json!({
                            "region": r, "topic": live, "quarantine": name, "records": records,
                        }));
                    }
                }
                if json {
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                } else if rows.is_empty() {
                    println!("no quarantined records");
                } else {
                    println!("{:<10} {:<30} {:>10}", "REGION", "TOPIC", "RECORDS");
                    for r in rows {
                        println!(
                            "{:<10} {:<30} {:>10}",
                            r["region"].as_str().unwrap_or(""),
                            r["topic"].as_str().unwrap_or(""),
                            r["records"]
                        );
                    }
                }
            }
            QuarantineCommand::Show {
                topic,
                topology,
                region,
            } => {
                let t = crate::cli::load_topology(&topology)?;
                let mut c = region_client(&t, &region)?;
                for q in read(&mut c, &topic).await? {
                    println!("{}", serde_json::to_string(&q)?);
                }
            }
            QuarantineCommand::Replay {
                topic,
                topology,
                region,
            } => {
                let t = crate::cli::load_topology(&topology)?;
                let mut c = region_client(&t, &region)?;
                let recs = read(&mut c, &topic).await?;
                if recs.is_empty() {
                    println!("no quarantined records of `{topic}` in {region}");
                    return Ok(());
                }
                // The live topic's current primary, from the region's gateway.
                let rule = t
                    .rule_for_topic(&topic)
                    .with_context(|| format!("no topic rule covers `{topic}`"))?;
                let admin_addr = super::failover::admin_addr(&t, &region)?;
                let st = admin::call(
                    admin_addr,
                    Method::GET,
                    "/v1/state",
                    None,
                    std::time::Duration::from_secs(10),
                )
                .await
                .map_err(|e| anyhow::anyhow!("{region}: {e}"))?;
                let primary = st["rules"][&rule.pattern]["primary"]
                    .as_str()
                    .context("no state for the rule")?
                    .to_string();
                let mut live = region_client(&t, &primary)?;
                // In order per partition, up to REPLAY_BATCH records per produce request.
                let mut n = 0usize;
                let mut i = 0;
                while i < recs.len() {
                    let p = recs[i].partition;
                    let run: Vec<&Quarantined> = recs[i..]
                        .iter()
                        .take_while(|q| q.partition == p)
                        .take(REPLAY_BATCH)
                        .collect();
                    i += run.len();
                    let base_ts = run[0].record.timestamp;
                    let batch_recs: Vec<build::Record> = run
                        .iter()
                        .map(|q| build::Record {
                            key: q.record.key.clone(),
                            value: q.record.value.clone(),
                            headers: q
                                .record
                                .headers
                                .iter()
                                .filter(|(k, _)| !k.starts_with("ferry.original."))
                                .cloned()
                                .collect(),
                            timestamp_delta: q.record.timestamp - base_ts,
                        })
                        .collect();
                    let batch = Bytes::from(build::batch(0, base_ts, None, &batch_recs));
                    let (code, _) = live.produce(&topic, p, batch, -1, 30_000).await?;
                    if code != 0 {
                        bail!(
                            "replaying into {topic}-{p} in {primary}: {} (after {n} records)",
                            error_name(code)
                        );
                    }
                    n += run.len();
                }
                println!(
                    "replayed {n} quarantined records of `{topic}` from {region} into {primary} (the quarantine is kept)"
                );
            }
        }
        anyhow::Ok(())
    })
}
