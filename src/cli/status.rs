//! `ferry status --topology FILE [--json]`: regions, links and per-partition cross-region offsets.
//!
//! Asks every region's brokers directly through their internal door (mutual TLS with the
//! operator certificate; in a region cluster each partition at its leader), so it needs no
//! gateway admin API: for each topic rule, each topic of its
//! primary region and each mirror region, the source's log end and high watermark, the mirror's
//! log end (which is also what the mirror has acknowledged: the sink answers only after fsync),
//! and the lag in records, bytes and seconds. Lag seconds are the age of the oldest record the
//! mirror does not have yet. Partitions with an open transaction (the last stable offset below
//! the log end: `read_committed` consumers wait there) are listed with it.
//!
//! A mirror that holds records its primary does not have is reported as **diverged**, not as
//! lag: its epoch history leaves the primary's (`log::epochs::divergence`), it holds records past
//! the primary's end, or the last batch both should share differs (offsets or CRC).

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use crate::batch;
use crate::client::{FetchBounds, RegionClient};
use crate::clock::now_ms;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Topology file.
    #[arg(long, default_value = "topology/local.toml")]
    pub topology: PathBuf,
    /// One JSON object on stdout instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct RegionStatus {
    region: String,
    /// The broker that answered (the first listed, when none did).
    broker: String,
    /// How many brokers the region lists.
    brokers: usize,
    up: bool,
    topics: usize,
}

#[derive(Debug, Serialize)]
struct PartitionLag {
    source: String,
    mirror: String,
    topic: String,
    partition: i32,
    source_log_end: i64,
    source_high_watermark: i64,
    /// The source's last stable offset: below its end while a transaction is open there, which
    /// holds `read_committed` consumers at it (`None`: not known).
    source_last_stable: Option<i64>,
    mirrored: Option<i64>,
    acknowledged: Option<i64>,
    lag_records: Option<i64>,
    /// At least this many bytes (exact unless `lag_bytes_truncated`).
    lag_bytes: Option<u64>,
    lag_bytes_truncated: bool,
    lag_seconds: Option<f64>,
    /// Where the mirror stops holding the primary's records, when it holds others (`None`:
    /// no divergence found).
    diverged_at: Option<i64>,
    /// Why it counts as diverged.
    divergence: Option<String>,
}

#[derive(Debug, Serialize)]
struct Status {
    topology: String,
    regions: Vec<RegionStatus>,
    partitions: Vec<PartitionLag>,
}

const LAG_BYTES_SCAN_MAX: i32 = 64 << 20;

/// Bytes from `from` to the end of the source partition (bounded scan), and the timestamp of
/// the first record at `from`.
async fn unmirrored(
    c: &mut RegionClient,
    topic: &str,
    p: i32,
    from: i64,
) -> anyhow::Result<(u64, bool, Option<i64>, i64)> {
    let bounds = FetchBounds {
        max_wait_ms: 0,
        min_bytes: 0,
        max_bytes: LAG_BYTES_SCAN_MAX,
    };
    let part = c.fetch_partition(topic, p, from, bounds).await?;
    let bytes = part.records;
    let mut total = 0u64;
    let mut first_ts = None;
    let mut last_next = from;
    for (range, h) in batch::whole_batches(&bytes) {
        if h.next_offset() > from {
            total += range.len() as u64;
            if first_ts.is_none() {
                first_ts = batch::first_record_at_or_after(&bytes[range], i64::MIN)
                    .map(|(_, ts)| ts)
                    .or(Some(h.base_timestamp));
            }
        }
        last_next = h.next_offset();
    }
    Ok((
        total,
        last_next < part.high_watermark,
        first_ts,
        part.high_watermark,
    ))
}

/// The header of the batch holding `offset` (base offset, last offset, CRC), if there is one.
async fn batch_at(
    c: &mut RegionClient,
    topic: &str,
    p: i32,
    offset: i64,
) -> Option<(i64, i64, u32)> {
    let bounds = FetchBounds {
        max_wait_ms: 0,
        min_bytes: 0,
        max_bytes: 1,
    };
    let part = c.fetch_partition(topic, p, offset, bounds).await.ok()?;
    let (_, h) = batch::whole_batches(&part.records).next()?;
    Some((h.base_offset, h.next_offset() - 1, h.crc))
}

/// Whether (and where, and why) `mirror` holds records `source` does not: by epoch history, by
/// length, and by the last batch both should hold.
async fn find_divergence(
    source: &mut RegionClient,
    mirror: &mut RegionClient,
    topic: &str,
    p: i32,
    src_end: i64,
    mirror_end: i64,
) -> Option<(i64, String)> {
    use crate::kafka::control::{Control, OffsetsAnswer};
    let req = Control::Offsets {
        topics: vec![topic.to_string()],
    };
    let histories = async {
        let a: OffsetsAnswer =
            serde_json::from_value(source.control_at_leader(topic, p, &req).await.ok()?).ok()?;
        let b: OffsetsAnswer =
            serde_json::from_value(mirror.control_at_leader(topic, p, &req).await.ok()?).ok()?;
        let pick = |o: &OffsetsAnswer| {
            o.topics
                .get(topic)
                .and_then(|v| v.iter().find(|x| x.partition == p).cloned())
        };
        Some((pick(&a)?, pick(&b)?))
    }
    .await;
    if let Some((a, b)) = histories {
        let d = crate::log::epochs::divergence(&a.epochs, a.log_end, &b.epochs, b.log_end);
        if d < b.log_end {
            return Some((
                d,
                format!("the mirror's epoch history leaves the primary's at offset {d}"),
            ));
        }
    }
    if mirror_end > src_end {
        return Some((
            src_end,
            format!(
                "the mirror holds records up to {mirror_end}, past the primary's end {src_end}"
            ),
        ));
    }
    let last = mirror_end.min(src_end) - 1;
    if last >= 0 {
        let (x, y) = (
            batch_at(source, topic, p, last).await,
            batch_at(mirror, topic, p, last).await,
        );
        if let (Some(x), Some(y)) = (x, y) {
            if x != y {
                return Some((
                    x.0.min(y.0),
                    format!(
                        "the batch holding offset {last} differs (primary: offsets {}..={} crc {:08x}; mirror: {}..={} crc {:08x})",
                        x.0, x.1, x.2, y.0, y.1, y.2
                    ),
                ));
            }
        }
    }
    None
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let topo = crate::cli::load_topology(&args.topology)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The operator certificate opens each broker's internal door (failover state, epoch
    // histories); without it the status shows lag from the client port only.
    let operator = match crate::cli::operator_tls(&topo) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("warning: {e:#}: showing lag without failover state or divergence checks");
            None
        }
    };
    let status = rt.block_on(async {
        let mut clients: BTreeMap<String, RegionClient> = BTreeMap::new();
        let mut regions = Vec::new();
        for r in &topo.regions {
            let (h, p) = &r.brokers[0].advertised;
            let mut st = RegionStatus {
                region: r.name.clone(),
                broker: format!("{h}:{p}"),
                brokers: r.brokers.len(),
                up: false,
                topics: 0,
            };
            let tls = operator
                .as_ref()
                .map(|tls| crate::transport::trust::TlsTarget::new(tls.clone(), &r.name));
            let Some(c) = RegionClient::of_topology(&topo, &r.name, tls) else {
                continue;
            };
            let mut c = c.with_timeout(std::time::Duration::from_secs(10));
            if let Ok((addr, _)) = c.any().await {
                st.broker = addr;
                if let Ok(t) = c.topics().await {
                    st.up = true;
                    st.topics = t.len();
                    clients.insert(r.name.clone(), c);
                }
            }
            regions.push(st);
        }
        // The newest failover state any reachable region knows (links follow failovers).
        let mut state = crate::failover::RegionState::default();
        for c in clients.values_mut() {
            let answer = c
                .control_any(&crate::kafka::control::Control::State)
                .await
                .ok()
                .and_then(|v| serde_json::from_value::<crate::kafka::control::StateAnswer>(v).ok());
            if let Some(a) = answer {
                for (pattern, rs) in a.state.rules {
                    let newer = state
                        .rules
                        .get(&pattern)
                        .is_none_or(|have| rs.epoch > have.epoch);
                    if newer {
                        state.rules.insert(pattern, rs);
                    }
                }
            }
        }
        let mut partitions = Vec::new();
        let primaries: Vec<String> = topo.regions.iter().map(|r| r.name.clone()).collect();
        for primary in primaries {
            let Some(src) = clients.get_mut(&primary) else {
                continue;
            };
            let Ok(src_topics) = src.topics().await else {
                continue;
            };
            for (topic, n) in src_topics {
                let Some(rule) = crate::failover::placement(&topo, &state, &topic) else {
                    continue;
                };
                if rule.primary != primary {
                    continue;
                }
                let src = clients.get_mut(&primary).expect("present");
                let src_ends = src
                    .list_offsets(&topic, &(0..n).collect::<Vec<_>>(), -1)
                    .await
                    .unwrap_or_default();
                let src_stable = src
                    .last_stable_offsets(&topic, &(0..n).collect::<Vec<_>>())
                    .await
                    .unwrap_or_default();
                for mirror in &rule.mirrors {
                    let mirror_ends = match clients.get_mut(mirror) {
                        Some(c) => c
                            .list_offsets(&topic, &(0..n).collect::<Vec<_>>(), -1)
                            .await
                            .ok(),
                        None => None,
                    };
                    for p in 0..n {
                        let src_end = src_ends.get(&p).copied().unwrap_or(-1);
                        let m = mirror_ends
                            .as_ref()
                            .map(|e| e.get(&p).copied().unwrap_or(0));
                        let mut row = PartitionLag {
                            source: primary.clone(),
                            mirror: mirror.clone(),
                            topic: topic.clone(),
                            partition: p,
                            source_log_end: src_end,
                            source_high_watermark: src_end,
                            source_last_stable: src_stable.get(&p).copied(),
                            mirrored: m,
                            acknowledged: m,
                            lag_records: m.map(|m| (src_end - m).max(0)),
                            lag_bytes: None,
                            lag_bytes_truncated: false,
                            lag_seconds: None,
                            diverged_at: None,
                            divergence: None,
                        };
                        if let (Some(m), Some(mut mc)) = (m, clients.remove(mirror)) {
                            let src = clients.get_mut(&primary).expect("present");
                            if let Some((at, why)) =
                                find_divergence(src, &mut mc, &topic, p, src_end, m).await
                            {
                                row.diverged_at = Some(at);
                                row.divergence = Some(why);
                            }
                            clients.insert(mirror.clone(), mc);
                        }
                        if let Some(m) = m {
                            if row.diverged_at.is_some() {
                                // Not lag: the mirror holds other records.
                            } else if m >= src_end {
                                row.lag_bytes = Some(0);
                                row.lag_seconds = Some(0.0);
                            } else {
                                let src = clients.get_mut(&primary).expect("present");
                                if let Ok((bytes, truncated, ts, _)) =
                                    unmirrored(src, &topic, p, m).await
                                {
                                    row.lag_bytes = Some(bytes);
                                    row.lag_bytes_truncated = truncated;
                                    row.lag_seconds =
                                        ts.map(|ts| ((now_ms() - ts).max(0)) as f64 / 1000.0);
                                }
                            }
                        }
                        partitions.push(row);
                    }
                }
            }
        }
        Status {
            topology: args.topology.display().to_string(),
            regions,
            partitions,
        }
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    println!(
        "{:<10} {:<24} {:<5} {:>7}",
        "REGION", "BROKER", "UP", "TOPICS"
    );
    for r in &status.regions {
        println!(
            "{:<10} {:<24} {:<5} {:>7}",
            r.region,
            r.broker,
            if r.up { "yes" } else { "DOWN" },
            r.topics
        );
    }
    println!();
    let mut links: BTreeMap<(String, String), (i64, u64, f64, usize)> = BTreeMap::new();
    for p in &status.partitions {
        let e = links
            .entry((p.source.clone(), p.mirror.clone()))
            .or_default();
        if p.diverged_at.is_some() {
            e.3 += 1;
            continue;
        }
        e.0 += p.lag_records.unwrap_or(0);
        e.1 += p.lag_bytes.unwrap_or(0);
        e.2 = e.2.max(p.lag_seconds.unwrap_or(0.0));
    }
    println!(
        "{:<20} {:>12} {:>14} {:>12}  DIVERGED",
        "LINK", "LAG RECORDS", "LAG BYTES", "LAG SECONDS"
    );
    for ((s, m), (r, b, secs, diverged)) in &links {
        println!(
            "{:<20} {:>12} {:>14} {:>12.1}  {}",
            format!("{s} -> {m}"),
            r,
            b,
            secs,
            if *diverged > 0 {
                format!("DIVERGED in {diverged} partition(s)")
            } else {
                "no".into()
            }
        );
    }
    println!();
    println!(
        "{:<16} {:<28} {:>4} {:>12} {:>12} {:>10} {:>12} {:>9}",
        "LINK", "TOPIC", "PART", "SOURCE END", "MIRRORED", "LAG", "LAG BYTES", "LAG SEC"
    );
    for p in &status.partitions {
        let opt = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_else(|| "down".into());
        println!(
            "{:<16} {:<28} {:>4} {:>12} {:>12} {:>10} {:>12} {:>9}",
            format!("{} -> {}", p.source, p.mirror),
            p.topic,
            p.partition,
            p.source_log_end,
            opt(p.mirrored),
            match p.diverged_at {
                Some(at) => format!("DIVERGED@{at}"),
                None => opt(p.lag_records),
            },
            p.lag_bytes
                .map(|b| format!("{b}{}", if p.lag_bytes_truncated { "+" } else { "" }))
                .unwrap_or_else(|| "-".into()),
            p.lag_seconds
                .map(|s| format!("{s:.1}"))
                .unwrap_or_else(|| "-".into()),
        );
    }
    let held: Vec<&PartitionLag> = status
        .partitions
        .iter()
        .filter(|p| p.source_last_stable.is_some_and(|s| s < p.source_log_end))
        .collect();
    if !held.is_empty() {
        println!("\nOPEN TRANSACTIONS (read_committed consumers wait at the last stable offset):");
        let mut seen = std::collections::BTreeSet::new();
        for p in held {
            if seen.insert((&p.source, &p.topic, p.partition)) {
                println!(
                    "  {} {}-{}: last stable offset {} of {} (`kafka-transactions.sh describe-producers` names the producers)",
                    p.source,
                    p.topic,
                    p.partition,
                    p.source_last_stable.unwrap_or(-1),
                    p.source_log_end
                );
            }
        }
    }
    for p in status.partitions.iter().filter(|p| p.divergence.is_some()) {
        println!(
            "\n{} -> {} {}-{}: DIVERGED at offset {}: {}",
            p.source,
            p.mirror,
            p.topic,
            p.partition,
            p.diverged_at.unwrap_or(-1),
            p.divergence.as_deref().unwrap_or("")
        );
    }
    Ok(())
}
