//! `ferry drill --topology FILE --scenario switchover|region-loss|link-loss`: run a failover
//! drill against a running topology (`ferry up` included) through the gateways' admin APIs,
//! and report what was lost (RPO) and for how long writes were down (RTO).
//!
//! The drill writes to its own topic (`ferry-drill-<time>`, covered by the first rule with a
//! `*` pattern and at least two regions) with its own producer (`acks=all`, one record per
//! tick, each record's value its sequence number) and its own consumer group, which follows the
//! primary and commits every second. It injects the fault, fails over, heals, fails back, waits
//! until every region holds the same log, and then checks with its record of acknowledgements:
//!
//! - every acknowledged record is at its offset in the final log, unless counted as lost (RPO);
//! - a switchover loses nothing; a forced failover loses nothing beyond what it reported;
//! - every lost record is in the quarantine (nothing is silently lost), and every quarantined
//!   record diverged (its original offset holds another record in the live log);
//! - no offset holds different records in two regions;
//! - the consumer group skipped nothing (duplicates are counted, not forbidden).
//!
//! Faults on a running deployment: `region-loss` cuts every link of the primary, lets it take
//! writes a second longer (they can never be shipped), then fences it, as a dead region would
//! stop; `link-loss` cuts only the link between the primary and the target region and lets the
//! fencing policy act. Both heal afterwards; the old primary rejoins and quarantines its
//! divergent tail.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use hyper::Method;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreateTopicsRequest};
use kafka_protocol::messages::offset_fetch_request::{OffsetFetchRequest, OffsetFetchRequestTopic};
use kafka_protocol::messages::{GroupId, TopicName};
use kafka_protocol::protocol::StrBytes;
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;

use super::failover::{admin_addr, move_rule, RuleOutcome};
use super::supervisor::{Supervisor, STOP_GRACE};
use crate::batch::build;
use crate::client::{decode_records, RegionClient};
use crate::failover::{rule_regions, RuleState};
use crate::mirror::admin;
use crate::topology::Topology;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Planned switchover to the target region and back: no loss allowed.
    Switchover,
    /// The primary region is lost: forced failover, rejoin with quarantine, failback.
    RegionLoss,
    /// The link between the primary and the target is cut: the fencing policy decides.
    LinkLoss,
}

#[derive(Debug, Args)]
pub struct DrillArgs {
    #[arg(long, default_value = "topology/local.toml")]
    pub topology: PathBuf,
    #[arg(long, value_enum)]
    pub scenario: Scenario,
    /// The region to fail over to (default: the first other region of the rule).
    #[arg(long)]
    pub to: Option<String>,
    /// Records per second the drill's producer writes.
    #[arg(long, default_value_t = 100)]
    pub rate: u32,
    /// How long each phase (before, during, after) produces.
    #[arg(long, default_value = "3s", value_parser = crate::units::parse_duration)]
    pub phase: Duration,
    /// Partitions of the drill topic.
    #[arg(long, default_value_t = 3)]
    pub partitions: i32,
    /// One JSON object on stdout instead of the Markdown report.
    #[arg(long)]
    pub json: bool,
    /// Also write the Markdown report to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Run the topology's brokers and gateways itself, with data under this directory, so a
    /// region loss is real: the primary's processes are killed with SIGKILL and restarted for
    /// the rejoin. Without it the drill works against a running deployment through its admin
    /// APIs (a lost region is then emulated by cutting its links and fencing it).
    #[arg(long, value_name = "DIR")]
    pub spawn: Option<PathBuf>,
}

/// The processes of a topology the drill runs itself (`--spawn`), with the certificates they
/// and this drill's commands use.
fn spawned(
    topology: &std::path::Path,
    data: &std::path::Path,
    t: &Topology,
) -> anyhow::Result<Supervisor> {
    std::fs::create_dir_all(data.join("logs"))?;
    let exe = std::env::current_exe().context("finding the ferry binary")?;
    let data = data.canonicalize()?;
    // This drill's commands present the operator certificate made here too.
    crate::cli::default_certs_dir(data.join("certs"));
    if t.tls.is_none() && !crate::cli::certs_dir(t).join("ca.pem").exists() {
        let st = std::process::Command::new(&exe)
            .args(["certs", "init", "--topology"])
            .arg(topology)
            .arg("--out")
            .arg(crate::cli::certs_dir(t))
            .stdout(std::process::Stdio::null())
            .status()?;
        if !st.success() {
            bail!("ferry certs init failed");
        }
    }
    Ok(Supervisor::new(
        exe,
        topology,
        &data,
        &crate::cli::certs_dir(t),
        &data.join("logs"),
    ))
}

/// Start a region's processes and wait until each listens.
async fn start_region(sp: &mut Supervisor, t: &Topology, region: &str) -> anyhow::Result<()> {
    sp.spawn_region(t, region).map_err(|e| anyhow::anyhow!(e))?;
    sp.wait_ready(Duration::from_secs(30))
        .await
        .map_err(|e| anyhow::anyhow!(e))
}

/// Wait until every gateway hears all its peers and, under lease fencing, holds its lease.
async fn wait_ready(t: &Topology, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let gateways = t.regions.iter().filter(|x| x.gateway.is_some()).count();
    loop {
        let mut ok = true;
        for r in t.regions.iter().filter(|r| r.gateway.is_some()) {
            let addr = admin_addr(t, &r.name)?;
            match admin::call(addr, Method::GET, "/v1/state", None, CALL).await {
                Ok(v) => {
                    let peers = v["peers"].as_object().map_or(0, |m| m.len());
                    ok &= peers + 1 >= gateways
                        && (t.failover.fencing != crate::topology::Fencing::Lease
                            || v["lease"]["may_write"].as_bool() == Some(true));
                }
                Err(_) => ok = false,
            }
        }
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the topology's gateways did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub t_ms: u64,
    pub event: String,
}

#[derive(Debug, Clone)]
struct Ack {
    seq: u64,
    partition: i32,
    offset: i64,
    region: String,
    at: Instant,
}

/// The drill's report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub topic: String,
    pub passed: bool,
    pub primary: String,
    pub target: String,
    pub acknowledged: usize,
    pub failed_attempts: u64,
    pub rpo_records: usize,
    pub rpo_seconds: f64,
    pub rto_seconds: Option<f64>,
    /// Planned switchover: from the fence to the new primary taking writes.
    pub switchover_unavailable_ms: Option<u64>,
    pub reported_loss_records: i64,
    pub reported_unknown_window_ms: Option<u64>,
    /// Transactions the old primary left open, aborted by the new primary when it took over.
    pub aborted_transactions: Vec<crate::broker::txns::OrphanAbort>,
    /// Planned switchover: transactional ids still open at the fence, aborted there.
    pub fence_aborted_transactions: Vec<String>,
    pub duplicates: u64,
    pub skipped: u64,
    pub quarantined_records: usize,
    /// Quarantined records the producer never got an acknowledgement for: written by the lost
    /// primary, but its answer was cut off with it (the producer may have sent the record again
    /// and had that copy acknowledged). They were not promised, so they are not RPO.
    pub quarantined_unacknowledged: usize,
    /// Lease fencing: the old primary's last acknowledgement came before the new one's first.
    pub write_windows_overlap: Option<bool>,
    pub violations: Vec<String>,
    pub timeline: Vec<Event>,
    pub duration_seconds: f64,
}

struct Shared {
    start: Instant,
    timeline: Mutex<Vec<Event>>,
    acks: Mutex<Vec<Ack>>,
    failed: Mutex<u64>,
    seen: Mutex<BTreeMap<u64, u64>>,
    skipped: Mutex<u64>,
    bar: indicatif::ProgressBar,
}

impl Shared {
    fn event(&self, e: impl Into<String>) {
        let e = e.into();
        self.bar.set_message(e.clone());
        self.timeline.lock().expect("timeline").push(Event {
            t_ms: self.start.elapsed().as_millis() as u64,
            event: e,
        });
    }
}

fn sb(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

/// A client for every broker of `region` (each partition's request goes to its leader).
fn region_client(t: &Topology, region: &str) -> anyhow::Result<RegionClient> {
    RegionClient::of_topology(t, region, None).context("region")
}

/// [`region_client`], once one of its brokers answers.
async fn connected(t: &Topology, region: &str) -> Option<RegionClient> {
    let mut c = region_client(t, region).ok()?;
    c.any().await.ok()?;
    Some(c)
}

const CALL: Duration = Duration::from_secs(10);

async fn post(
    t: &Topology,
    region: &str,
    path: &str,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let addr = admin_addr(t, region)?;
    admin::call(addr, Method::POST, path, Some(body), CALL)
        .await
        .map_err(|e| anyhow::anyhow!("{region} {path}: {e}"))
}

async fn rule_state(t: &Topology, region: &str, pattern: &str) -> anyhow::Result<RuleState> {
    let addr = admin_addr(t, region)?;
    let v = admin::call(addr, Method::GET, "/v1/state", None, CALL)
        .await
        .map_err(|e| anyhow::anyhow!("{region}: {e}"))?;
    Ok(serde_json::from_value(v["rules"][pattern].clone())?)
}

async fn cut(t: &Topology, a: &str, b: &str, on: bool) -> anyhow::Result<()> {
    post(t, a, "/v1/cut", json!({ "peer": b, "cut": on })).await?;
    post(t, b, "/v1/cut", json!({ "peer": a, "cut": on })).await?;
    Ok(())
}

async fn produce_one(
    c: &mut RegionClient,
    topic: &str,
    partition: i32,
    seq: u64,
) -> Result<i64, String> {
    let rec = build::Record {
        value: Some(seq.to_string().into_bytes()),
        ..Default::default()
    };
    let batch = Bytes::from(build::batch(0, crate::clock::now_ms(), None, &[rec]));
    let (code, base) = tokio::time::timeout(
        Duration::from_secs(6),
        c.produce(topic, partition, batch, -1, 5_000),
    )
    .await
    .map_err(|_| "timeout".to_string())?
    .map_err(|e| e.to_string())?;
    if code != 0 {
        return Err(crate::client::error_name(code).to_string());
    }
    Ok(base)
}

/// Every record of the drill topic in a region: partition → [(offset, seq)].
async fn read_log(
    mut c: RegionClient,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<BTreeMap<i32, Vec<(i64, u64)>>> {
    let mut out = BTreeMap::new();
    for p in 0..partitions {
        let end = c
            .list_offsets(topic, &[p], -1)
            .await?
            .get(&p)
            .copied()
            .unwrap_or(0);
        let mut recs = Vec::new();
        let mut at = 0i64;
        while at < end {
            let got = fetch(&mut c, topic, p, at, 0).await?;
            if got.is_empty() {
                break;
            }
            for (o, v) in got {
                if o >= at {
                    recs.push((o, v));
                    at = o + 1;
                }
            }
        }
        out.insert(p, recs);
    }
    Ok(out)
}

async fn fetch(
    c: &mut RegionClient,
    topic: &str,
    partition: i32,
    offset: i64,
    wait_ms: i32,
) -> anyhow::Result<Vec<(i64, u64)>> {
    let bounds = crate::client::FetchBounds {
        max_wait_ms: wait_ms,
        min_bytes: 1,
        max_bytes: 1 << 20,
    };
    let p = c.fetch_partition(topic, partition, offset, bounds).await?;
    if p.error_code != 0 {
        bail!(
            "fetch {topic}-{partition}: {}",
            crate::client::error_name(p.error_code)
        );
    }
    let mut out = Vec::new();
    for r in decode_records(&p.records)? {
        let seq = r
            .value
            .as_deref()
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|s| s.parse().ok())
            .unwrap_or(u64::MAX);
        out.push((r.offset, seq));
    }
    Ok(out)
}

async fn producer(
    t: Arc<Topology>,
    topic: String,
    partitions: i32,
    rate: u32,
    target: watch::Receiver<String>,
    stop: watch::Receiver<bool>,
    sh: Arc<Shared>,
) {
    let tick = Duration::from_micros(1_000_000 / rate.max(1) as u64);
    let mut seq = 0u64;
    let mut client: Option<(String, RegionClient)> = None;
    while !*stop.borrow() {
        let region = target.borrow().clone();
        if client.as_ref().map(|(r, _)| r != &region).unwrap_or(true) {
            client = connected(&t, &region).await.map(|c| (region.clone(), c));
        }
        let partition = (seq % partitions as u64) as i32;
        let r = match client.as_mut() {
            Some((_, c)) => produce_one(c, &topic, partition, seq).await,
            None => Err("not connected".into()),
        };
        match r {
            Ok(offset) => {
                let mut acks = sh.acks.lock().expect("acks");
                let first_here = !acks.iter().any(|a| a.region == region);
                acks.push(Ack {
                    seq,
                    partition,
                    offset,
                    region: region.clone(),
                    at: Instant::now(),
                });
                drop(acks);
                if first_here && seq > 0 {
                    sh.event(format!("first acknowledged produce in {region}"));
                }
                sh.bar.inc(1);
            }
            Err(_) => {
                *sh.failed.lock().expect("failed") += 1;
                client = None;
            }
        }
        seq += 1;
        tokio::time::sleep(tick).await;
    }
}

async fn consumer(
    t: Arc<Topology>,
    topic: String,
    group: String,
    partitions: i32,
    mut target: watch::Receiver<String>,
    stop: watch::Receiver<bool>,
    sh: Arc<Shared>,
) {
    let mut positions: BTreeMap<i32, i64> = (0..partitions).map(|p| (p, 0)).collect();
    let mut region = String::new();
    let mut client: Option<RegionClient> = None;
    let mut last_commit = Instant::now();
    while !*stop.borrow() {
        if target.has_changed().unwrap_or(false) || client.is_none() {
            let want = target.borrow_and_update().clone();
            if want != region || client.is_none() {
                // Move (or reconnect): resume at the group's committed offsets there.
                client = connected(&t, &want).await;
                if let Some(c) = client.as_mut() {
                    if want != region && !region.is_empty() {
                        if let Ok(committed) = committed(c, &group, &topic, partitions).await {
                            for (p, pos) in positions.iter_mut() {
                                let new = committed.get(p).copied().unwrap_or(0);
                                if new > *pos {
                                    // would skip records this consumer never saw
                                    *sh.skipped.lock().expect("skipped") += (new - *pos) as u64;
                                }
                                *pos = new;
                            }
                        }
                        sh.event(format!("consumer group moved to {want}"));
                    }
                    region = want;
                }
            }
        }
        let Some(c) = client.as_mut() else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut ok = true;
        for p in 0..partitions {
            match fetch(c, &topic, p, positions[&p], 20).await {
                Ok(recs) => {
                    for (o, seq) in recs {
                        if o >= positions[&p] {
                            *sh.seen.lock().expect("seen").entry(seq).or_default() += 1;
                            positions.insert(p, o + 1);
                        }
                    }
                }
                Err(_) => ok = false,
            }
        }
        if !ok {
            client = None;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        if last_commit.elapsed() >= Duration::from_secs(1) {
            let mut m = BTreeMap::new();
            m.insert(
                topic.clone(),
                positions.iter().map(|(p, o)| (*p, *o)).collect(),
            );
            let done = match c.coordinator(&group).await {
                Ok(k) => k.commit_offsets(&group, &m).await.is_ok(),
                Err(_) => false,
            };
            if !done {
                client = None;
            }
            last_commit = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The quarantined records of a region: (partition, original offset, seq).
async fn read_quarantine(mut c: RegionClient, topic: &str) -> anyhow::Result<Vec<(i32, i64, u64)>> {
    Ok(super::quarantine::read(&mut c, topic)
        .await?
        .into_iter()
        .map(|q| {
            let seq = q
                .value
                .as_deref()
                .and_then(|v| v.parse().ok())
                .unwrap_or(u64::MAX);
            (q.partition, q.original_offset.unwrap_or(-1), seq)
        })
        .collect())
}

async fn committed(
    c: &mut RegionClient,
    group: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let c = c.coordinator(group).await?;
    let mut req = OffsetFetchRequest::default();
    req.group_id = GroupId(sb(group));
    let mut ft = OffsetFetchRequestTopic::default();
    ft.name = TopicName(sb(topic));
    ft.partition_indexes = (0..partitions).collect();
    req.topics = Some(vec![ft]);
    let resp = c.send(&req, 7).await?;
    Ok(resp
        .topics
        .into_iter()
        .flat_map(|t| t.partitions)
        .filter(|p| p.committed_offset >= 0)
        .map(|p| (p.partition_index, p.committed_offset))
        .collect())
}

/// Wait until every region of `regions` holds the same end offsets of `topic`.
async fn wait_converged(
    t: &Topology,
    regions: &[String],
    topic: &str,
    partitions: i32,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = BTreeMap::new();
    loop {
        last.clear();
        for r in regions {
            let ends = region_client(t, r)?
                .list_offsets(topic, &(0..partitions).collect::<Vec<_>>(), -1)
                .await
                .ok();
            last.insert(r.clone(), ends);
        }
        let vals: BTreeSet<_> = last.values().map(|v| format!("{v:?}")).collect();
        if vals.len() == 1 && last.values().all(|v| v.is_some()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("regions did not converge on {topic}: {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn run(args: DrillArgs) -> anyhow::Result<std::process::ExitCode> {
    let t = Arc::new(crate::cli::load_topology(&args.topology)?);
    // The drill drives the gateways' admin APIs with the operator certificate (one it makes
    // itself with --spawn).
    if args.spawn.is_none() {
        crate::cli::operator_tls(&t)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(async {
        let mut spawned = match &args.spawn {
            Some(dir) => {
                let mut s = spawned(&args.topology, dir, &t)?;
                for r in &t.regions {
                    start_region(&mut s, &t, &r.name).await?;
                }
                wait_ready(&t, Duration::from_secs(60)).await?;
                Some(s)
            }
            None => None,
        };
        let r = drill(t.clone(), &args, spawned.as_mut()).await;
        if let Some(mut s) = spawned {
            s.stop(STOP_GRACE);
        }
        r
    })?;
    let md = markdown(&report);
    if let Some(path) = &args.report {
        std::fs::write(path, &md).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{md}");
    }
    Ok(if report.passed {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    })
}

async fn drill(
    t: Arc<Topology>,
    args: &DrillArgs,
    mut spawned: Option<&mut Supervisor>,
) -> anyhow::Result<Report> {
    let rule = t
        .topics
        .iter()
        .find(|r| r.pattern.contains('*') && !r.mirrors.is_empty())
        .context("the topology has no rule with a `*` pattern and a mirror: the drill needs one for its own topic")?
        .clone();
    let stamp = crate::clock::now_ms();
    let topic = rule
        .pattern
        .replacen('*', &format!("ferry-drill-{stamp}"), 1)
        .replace('*', "");
    let group = format!("ferry-drill-{stamp}");
    let regions = rule_regions(&rule);
    let st = rule_state(&t, &rule.primary, &rule.pattern)
        .await
        .or(rule_state(&t, &regions[1], &rule.pattern).await)?;
    let primary = st.primary.clone();
    let target = match &args.to {
        Some(x) if regions.contains(x) && *x != primary => x.clone(),
        Some(x) => bail!("`{x}` is not another region of rule `{}`", rule.pattern),
        None => regions
            .iter()
            .find(|r| **r != primary)
            .cloned()
            .expect("a mirror"),
    };
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} drill {elapsed} [{pos} acked] {msg}")
            .expect("template"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let sh = Arc::new(Shared {
        start: Instant::now(),
        timeline: Mutex::new(Vec::new()),
        acks: Mutex::new(Vec::new()),
        failed: Mutex::new(0),
        seen: Mutex::new(BTreeMap::new()),
        skipped: Mutex::new(0),
        bar,
    });
    sh.event(format!(
        "drill {:?} on topic {topic}: primary {primary}, target {target}",
        args.scenario
    ));
    // The topic, created in the primary with the drill's partition count. A region cluster
    // that is still forming (too few brokers registered for the replication factor, etcd not
    // answering yet) is waited for, and so is a leader for every partition.
    {
        let mut rc = region_client(&t, &primary)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, c) = rc.any().await?;
            let mut req = CreateTopicsRequest::default();
            req.timeout_ms = 30_000;
            let mut ct = CreatableTopic::default();
            ct.name = TopicName(sb(&topic));
            ct.num_partitions = args.partitions;
            ct.replication_factor = -1;
            req.topics.push(ct);
            let resp = c.send(&req, 5).await?;
            match resp.topics.first().map_or(0, |x| x.error_code) {
                0 => break,
                // REQUEST_TIMED_OUT, INVALID_REPLICATION_FACTOR (brokers still registering)
                code @ (7 | 38) if Instant::now() < deadline => {
                    tracing::debug!(code, "the primary is not ready to create the topic yet");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                code => bail!(
                    "creating {topic} in {primary}: {} ({code})",
                    crate::client::error_name(code)
                ),
            }
        }
        for p in 0..args.partitions {
            while let Err(e) = rc.leader_of(&topic, p).await {
                if Instant::now() > deadline {
                    bail!("{topic}-{p} in {primary} has no leader: {e}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let (target_tx, target_rx) = watch::channel(primary.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    // The consumer stops later than the producer: once it has read to the end.
    let (stop_cons_tx, stop_cons_rx) = watch::channel(false);
    let prod = tokio::spawn(producer(
        t.clone(),
        topic.clone(),
        args.partitions,
        args.rate,
        target_rx.clone(),
        stop_rx,
        sh.clone(),
    ));
    let cons = tokio::spawn(consumer(
        t.clone(),
        topic.clone(),
        group.clone(),
        args.partitions,
        target_rx,
        stop_cons_rx,
        sh.clone(),
    ));
    tokio::time::sleep(args.phase).await;

    // Long enough to catch up (planned) or for the old lease to run out (forced).
    let f = &t.failover;
    let timeout = f.lease + f.lease / 10 + f.heartbeat * 2 + Duration::from_secs(5);
    let fault_at: Option<Instant>;
    let mut outcome: Option<RuleOutcome> = None;
    let mut violations = Vec::new();
    let mut unavailable = None;
    let mut old_last_ack: Option<Instant> = None;
    match args.scenario {
        Scenario::Switchover => {
            sh.event(format!("planned switchover {primary} -> {target}"));
            fault_at = Some(Instant::now());
            let o = move_rule(&t, &rule.pattern, &target, false, timeout).await?;
            unavailable = Some(o.write_unavailable_ms);
            target_tx.send_replace(target.clone());
            sh.event(format!(
                "{target} is primary at epoch {} (writes unavailable {} ms)",
                o.epoch, o.write_unavailable_ms
            ));
            outcome = Some(o);
        }
        Scenario::RegionLoss | Scenario::LinkLoss => {
            let peers: Vec<String> = if args.scenario == Scenario::RegionLoss {
                t.regions
                    .iter()
                    .map(|r| r.name.clone())
                    .filter(|r| *r != primary)
                    .collect()
            } else {
                vec![target.clone()]
            };
            fault_at = Some(Instant::now());
            let killed = match (&mut spawned, args.scenario) {
                (Some(sp), Scenario::RegionLoss) => {
                    sp.kill_region(&primary);
                    sh.event(format!("SIGKILL every process of {primary}: region lost"));
                    true
                }
                _ => false,
            };
            if !killed {
                for p in &peers {
                    cut(&t, &primary, p, true).await?;
                }
                sh.event(format!("cut {primary} from {}", peers.join(", ")));
            }
            if args.scenario == Scenario::RegionLoss && !killed {
                // The region keeps taking writes a moment (never shipped), then dies.
                tokio::time::sleep(Duration::from_secs(1)).await;
                post(
                    &t,
                    &primary,
                    "/v1/fence",
                    json!({ "patterns": [rule.pattern], "fenced": true }),
                )
                .await?;
                sh.event(format!("{primary} stopped (fenced): region lost"));
            }
            sh.event(format!("forced failover to {target}"));
            match move_rule(&t, &rule.pattern, &target, true, timeout).await {
                Ok(o) => {
                    old_last_ack = sh
                        .acks
                        .lock()
                        .expect("acks")
                        .iter()
                        .filter(|a| a.region == primary)
                        .map(|a| a.at)
                        .max();
                    target_tx.send_replace(target.clone());
                    sh.event(format!("{target} is primary at epoch {} (forced)", o.epoch));
                    outcome = Some(o);
                }
                Err(e) => {
                    sh.event(format!("no failover: {e}"));
                }
            }
        }
    }
    tokio::time::sleep(args.phase).await;
    // Heal, rejoin, fail back.
    if args.scenario != Scenario::Switchover {
        match (&mut spawned, args.scenario) {
            (Some(sp), Scenario::RegionLoss) => {
                start_region(sp, &t, &primary).await?;
                sh.event(format!("{primary} restarted"));
            }
            _ => {
                for p in t
                    .regions
                    .iter()
                    .map(|r| r.name.clone())
                    .filter(|r| *r != primary)
                {
                    let _ = cut(&t, &primary, &p, false).await;
                }
                sh.event("links healed".to_string());
            }
        }
        if outcome.is_some() {
            // The old primary learns the new epoch from heartbeats and rejoins as a mirror.
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let s = rule_state(&t, &primary, &rule.pattern).await?;
                if s.primary == target {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{primary} did not learn the new epoch after the heal");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            sh.event(format!("{primary} rejoined as a mirror of {target}"));
        } else {
            // No failover happened; make sure the old primary takes writes again.
            let _ = post(
                &t,
                &primary,
                "/v1/fence",
                json!({ "patterns": [rule.pattern], "fenced": false }),
            )
            .await;
        }
    }
    if outcome.is_some() {
        wait_converged(
            &t,
            &regions,
            &topic,
            args.partitions,
            Duration::from_secs(120),
        )
        .await?;
        sh.event(format!("failback {target} -> {primary}"));
        let o = move_rule(&t, &rule.pattern, &primary, false, timeout).await?;
        target_tx.send_replace(primary.clone());
        sh.event(format!("{primary} is primary again at epoch {}", o.epoch));
    }
    tokio::time::sleep(args.phase).await;
    stop_tx.send_replace(true);
    let _ = prod.await;
    // Let the consumer read to the end before it stops.
    wait_converged(
        &t,
        &regions,
        &topic,
        args.partitions,
        Duration::from_secs(120),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop_cons_tx.send_replace(true);
    let _ = cons.await;
    sh.event("every region holds the same log".to_string());

    // ---- checks ----
    let mut logs = BTreeMap::new();
    for r in &regions {
        logs.insert(
            r.clone(),
            read_log(region_client(&t, r)?, &topic, args.partitions).await?,
        );
    }
    let live = logs[&primary].clone();
    for (r, l) in &logs {
        if *l != live {
            violations.push(format!("{r}'s copy of {topic} differs from {primary}'s"));
        }
    }
    let at: BTreeMap<(i32, i64), u64> = live
        .iter()
        .flat_map(|(p, v)| v.iter().map(move |(o, s)| ((*p, *o), *s)))
        .collect();
    let acks = sh.acks.lock().expect("acks").clone();
    let lost: Vec<&Ack> = acks
        .iter()
        .filter(|a| at.get(&(a.partition, a.offset)) != Some(&a.seq))
        .collect();
    // The quarantines of every region (a mirror may have held a tail the new primary lacked).
    let mut quarantined: Vec<(i32, i64, u64)> = Vec::new();
    for r in &regions {
        quarantined.extend(read_quarantine(region_client(&t, r)?, &topic).await?);
    }
    for (p, o, s) in &quarantined {
        if at.get(&(*p, *o)) == Some(s) {
            violations.push(format!(
                "quarantined record {p}@{o} (seq {s}) did not diverge: the live log holds it"
            ));
        }
    }
    let qseqs: BTreeSet<u64> = quarantined.iter().map(|(_, _, s)| *s).collect();
    // Quarantined copies beyond one per lost acknowledgement: records whose answer never reached
    // the producer (cut off with the region), including the first copy of a record the
    // producer sent again after such a failure and got acknowledged on the second try.
    let mut lost_per_seq: BTreeMap<u64, usize> = BTreeMap::new();
    for a in &lost {
        *lost_per_seq.entry(a.seq).or_default() += 1;
    }
    let mut quarantined_per_seq: BTreeMap<u64, usize> = BTreeMap::new();
    for (_, _, s) in &quarantined {
        *quarantined_per_seq.entry(*s).or_default() += 1;
    }
    let quarantined_unacknowledged: usize = quarantined_per_seq
        .iter()
        .map(|(s, n)| n.saturating_sub(lost_per_seq.get(s).copied().unwrap_or(0)))
        .sum();
    for a in &lost {
        if !qseqs.contains(&a.seq) {
            violations.push(format!(
                "acknowledged record seq {} ({}@{} in {}) is lost and not in the quarantine",
                a.seq, a.partition, a.offset, a.region
            ));
        }
    }
    let reported: i64 = outcome
        .as_ref()
        .map(|o| o.loss.iter().map(|l| l.records).sum())
        .unwrap_or(0);
    let window = outcome.as_ref().and_then(|o| o.unknown_window_ms);
    match args.scenario {
        Scenario::Switchover if !lost.is_empty() => violations.push(format!(
            "a switchover lost {} acknowledged records",
            lost.len()
        )),
        Scenario::Switchover => {}
        _ => {
            // Beyond the reported RPO: lost records that were neither reported missing nor
            // written in the unknown window before the takeover.
            if let (Some(f), Some(o)) = (fault_at, outcome.as_ref()) {
                let w = Duration::from_millis(window.unwrap_or(0)) + Duration::from_secs(1);
                let _ = o;
                let unexplained = lost
                    .iter()
                    .filter(|a| a.at + w < f && (lost.len() as i64) > reported)
                    .count();
                if unexplained > 0 {
                    violations.push(format!(
                        "{unexplained} lost records fall outside the reported RPO"
                    ));
                }
            }
        }
    }
    let skipped = *sh.skipped.lock().expect("skipped");
    if skipped > 0 {
        violations.push(format!("the consumer group skipped {skipped} records"));
    }
    // Records in the live log the consumer never saw.
    let seen = sh.seen.lock().expect("seen").clone();
    let unseen = at.values().filter(|s| !seen.contains_key(s)).count();
    if unseen > 0 {
        violations.push(format!(
            "the consumer group never saw {unseen} records of the live log"
        ));
    }
    let duplicates: u64 = seen.values().map(|n| n.saturating_sub(1)).sum();
    let first_new = acks
        .iter()
        .filter(|a| a.region == target)
        .map(|a| a.at)
        .min();
    let rto = match (fault_at, first_new, outcome.is_some()) {
        (Some(f), Some(n), true) => Some(n.saturating_duration_since(f).as_secs_f64()),
        _ => None,
    };
    let overlap = match (old_last_ack, first_new) {
        (Some(o), Some(n)) if t.failover.fencing == crate::topology::Fencing::Lease => {
            let ov = o >= n;
            if ov {
                violations.push(
                    "the old primary acknowledged a write after the new one took its first".into(),
                );
            }
            Some(ov)
        }
        _ => None,
    };
    let rpo_seconds = match (
        lost.iter().map(|a| a.at).min(),
        lost.iter().map(|a| a.at).max(),
    ) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64() + 1.0 / args.rate.max(1) as f64,
        _ => 0.0,
    };
    sh.bar.finish_and_clear();
    let timeline = sh.timeline.lock().expect("timeline").clone();
    let failed_attempts = *sh.failed.lock().expect("failed");
    Ok(Report {
        scenario: args.scenario,
        topic,
        passed: violations.is_empty(),
        primary,
        target,
        acknowledged: acks.len(),
        failed_attempts,
        rpo_records: lost.len(),
        rpo_seconds,
        rto_seconds: rto,
        switchover_unavailable_ms: unavailable,
        reported_loss_records: reported,
        reported_unknown_window_ms: window,
        aborted_transactions: outcome
            .as_ref()
            .map(|o| o.aborted_transactions.clone())
            .unwrap_or_default(),
        fence_aborted_transactions: outcome
            .as_ref()
            .map(|o| o.fence_aborted_transactions.clone())
            .unwrap_or_default(),
        duplicates,
        skipped,
        quarantined_records: quarantined.len(),
        quarantined_unacknowledged,
        write_windows_overlap: overlap,
        violations,
        timeline,
        duration_seconds: sh.start.elapsed().as_secs_f64(),
    })
}

fn markdown(r: &Report) -> String {
    let mut s = format!("# Ferry drill: {:?}\n\n", r.scenario);
    s += &format!(
        "**{}**. Topic `{}`, primary `{}`, target `{}`.\n\n",
        if r.passed { "PASSED" } else { "FAILED" },
        r.topic,
        r.primary,
        r.target
    );
    s += "| measure | value |\n|---|---|\n";
    s += &format!("| acknowledged records | {} |\n", r.acknowledged);
    s += &format!("| failed produce attempts | {} |\n", r.failed_attempts);
    s += &format!("| RPO (acknowledged records lost) | {} |\n", r.rpo_records);
    s += &format!("| RPO (seconds of writes) | {:.2} |\n", r.rpo_seconds);
    s += &format!(
        "| RTO (fault to first acknowledged produce in the new primary) | {} |\n",
        r.rto_seconds
            .map(|x| format!("{x:.2} s"))
            .unwrap_or("-".into())
    );
    if let Some(u) = r.switchover_unavailable_ms {
        s += &format!("| switchover write unavailability | {u} ms |\n");
    }
    s += &format!(
        "| loss reported by the forced failover | {} records, + unknown window {} |\n",
        r.reported_loss_records,
        r.reported_unknown_window_ms
            .map(|w| format!("{w} ms"))
            .unwrap_or("-".into())
    );
    s += &format!(
        "| transactions left open by the old primary, aborted | {} |\n",
        if r.aborted_transactions.is_empty() {
            "none".to_string()
        } else {
            r.aborted_transactions
                .iter()
                .map(|a| {
                    format!(
                        "{}-{} producer {} from offset {} (ABORT at {})",
                        a.topic, a.partition, a.producer_id, a.first_offset, a.marker_offset
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        }
    );
    if !r.fence_aborted_transactions.is_empty() {
        s += &format!(
            "| transactions still open at the switchover's fence, aborted | {} |\n",
            r.fence_aborted_transactions.join(", ")
        );
    }
    s += &format!(
        "| duplicates seen by the consumer group | {} |\n",
        r.duplicates
    );
    s += &format!(
        "| records skipped by the consumer group | {} |\n",
        r.skipped
    );
    s += &format!(
        "| records quarantined | {} ({} of them never acknowledged) |\n",
        r.quarantined_records, r.quarantined_unacknowledged
    );
    if let Some(o) = r.write_windows_overlap {
        s += &format!("| write windows of old and new primary overlap | {o} |\n");
    }
    s += &format!("| drill duration | {:.1} s |\n\n", r.duration_seconds);
    s += "## Timeline\n\n";
    for e in &r.timeline {
        s += &format!("- {:>7.3} s  {}\n", e.t_ms as f64 / 1000.0, e.event);
    }
    if !r.violations.is_empty() {
        s += "\n## Broken promises\n\n";
        for v in &r.violations {
            s += &format!("- {v}\n");
        }
    }
    s
}
