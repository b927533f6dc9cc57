//! `ferry failover --topology FILE --to REGION [--topics ...] [--force]`: move the primary of
//! topic rules to another region through the gateways' admin APIs.
//!
//! Planned (default): fence the old primary (its final log ends come back), have the new one
//! catch up to exactly those ends and take the next epoch, then tell the old primary and every
//! other region to adopt it; the mirror direction reverses on its own. Nothing acknowledged is
//! lost. `--force`, when the old primary cannot be reached: the new primary takes the next
//! epoch at once (under lease fencing, once the old lease has run out) and the command prints
//! what may be lost per partition.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use hyper::Method;
use serde::Serialize;
use serde_json::{json, Value};

use crate::failover::switchover::{self, Plan, Step};
use crate::failover::{rule_regions, RuleState};
use crate::mirror::admin;
use crate::topology::Topology;

#[derive(Debug, Args)]
pub struct FailoverArgs {
    #[arg(long, default_value = "topology/local.toml")]
    pub topology: PathBuf,
    /// The region that becomes primary.
    #[arg(long)]
    pub to: String,
    /// Only the rules covering these topics (names or rule patterns, comma separated).
    #[arg(long, value_delimiter = ',')]
    pub topics: Vec<String>,
    /// Take over without the old primary (it is unreachable); may lose what it had not shipped.
    #[arg(long)]
    pub force: bool,
    /// How long the new primary may take to catch up (planned) or to see the old lease run out.
    #[arg(long, default_value = "60s", value_parser = crate::units::parse_duration)]
    pub timeout: Duration,
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// What may have been lost in one partition by a forced failover.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionLoss {
    pub topic: String,
    pub partition: usize,
    /// The old primary's last reported log end.
    pub reported_end: i64,
    /// Where the old primary's log leaves the new primary's history (what the new primary held
    /// of it when it took over).
    pub mirrored_end: i64,
    pub records: i64,
}

/// The outcome for one rule.
#[derive(Debug, Clone, Serialize)]
pub struct RuleOutcome {
    pub pattern: String,
    pub from: String,
    pub to: String,
    pub epoch: i32,
    pub forced: bool,
    /// Planned: from the fence to the new primary taking writes.
    pub write_unavailable_ms: u64,
    /// Forced: records the old primary reported that the new one lacks.
    pub loss: Vec<PartitionLoss>,
    /// Forced: how long before the takeover the old primary last reported (writes in that
    /// window are unknown to the new primary).
    pub unknown_window_ms: Option<u64>,
    /// Transactions the old primary left open in the rule's partitions, aborted by the new
    /// primary when it took over (their records are never visible to `read_committed`).
    pub aborted_transactions: Vec<crate::broker::txns::OrphanAbort>,
    /// Planned: transactional ids of the old primary whose transactions were still open at
    /// the fence after its bounded wait, and were aborted there.
    pub fence_aborted_transactions: Vec<String>,
    pub note: String,
}

/// How to reach `region`'s admin API: its address, with this process's operator certificate.
pub fn admin_addr(t: &Topology, region: &str) -> anyhow::Result<admin::AdminTarget> {
    let addr = t
        .region(region)
        .with_context(|| format!("no region `{region}` in the topology"))?
        .gateway
        .as_ref()
        .map(|g| g.admin)
        .with_context(|| format!("region `{region}` has no gateway"))?;
    let tls = crate::transport::trust::TlsTarget::new(crate::cli::operator_tls(t)?, region);
    Ok(admin::AdminTarget { addr, tls })
}

const CALL: Duration = Duration::from_secs(10);

async fn get_state(t: &Topology, region: &str) -> Result<Value, String> {
    let addr = admin_addr(t, region).map_err(|e| e.to_string())?;
    admin::call(addr, Method::GET, "/v1/state", None, CALL).await
}

fn rule_of(v: &Value, pattern: &str) -> Option<RuleState> {
    serde_json::from_value(v.get("rules")?.get(pattern)?.clone()).ok()
}

/// The patterns of the rules to move.
pub fn select_rules(t: &Topology, to: &str, topics: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for r in &t.topics {
        if !rule_regions(r).iter().any(|x| x == to) {
            continue;
        }
        let wanted = topics.is_empty()
            || topics.iter().any(|x| {
                *x == r.pattern || t.rule_for_topic(x).is_some_and(|m| m.pattern == r.pattern)
            });
        if wanted {
            out.push(r.pattern.clone());
        }
    }
    if out.is_empty() {
        bail!(
            "no topic rule has region `{to}` among its regions{}",
            if topics.is_empty() {
                String::new()
            } else {
                format!(" and covers {}", topics.join(", "))
            }
        );
    }
    Ok(out)
}

/// Move one rule. Used by `ferry failover` and `ferry drill`: the steps are
/// [`switchover::Switchover`]'s, carried out over the gateways' admin APIs.
pub async fn move_rule(
    t: &Topology,
    pattern: &str,
    to: &str,
    force: bool,
    timeout: Duration,
) -> anyhow::Result<RuleOutcome> {
    let rule = t
        .topics
        .iter()
        .find(|r| r.pattern == pattern)
        .with_context(|| format!("no rule `{pattern}`"))?;
    let regions = rule_regions(rule);
    // The newest state any reachable region knows.
    let mut states = BTreeMap::new();
    for r in &regions {
        if let Ok(v) = get_state(t, r).await {
            if let Some(s) = rule_of(&v, pattern) {
                states.insert(r.clone(), s);
            }
        }
    }
    // Under lease fencing the fence lifts by itself if this switchover neither moves the rule
    // nor unfences it (this process dies, the target is lost): after twice the longest this
    // command waits, while the target may promote only in the first half.
    let window = timeout + CALL;
    let planned = switchover::plan(
        pattern,
        &regions,
        to,
        crate::failover::region_index(t, to),
        &states,
        force,
        window.as_millis() as u64,
        timeout.as_millis() as u64,
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let outcome = |from: &str, epoch: i32, note: String| RuleOutcome {
        pattern: pattern.into(),
        from: from.into(),
        to: to.into(),
        epoch,
        forced: force,
        write_unavailable_ms: 0,
        loss: Vec::new(),
        unknown_window_ms: None,
        aborted_transactions: Vec::new(),
        fence_aborted_transactions: Vec::new(),
        note,
    };
    let mut op = match planned {
        Plan::Already { epoch } => {
            return Ok(outcome(to, epoch, format!("`{to}` is already the primary")))
        }
        Plan::Unfence { epoch, request } => {
            // A switchover that could not finish left `to` fenced (its unfence failed:
            // simulator finding 10): moving the rule to it again lifts the fence.
            call(t, to, "/v1/fence", &request)
                .await
                .map_err(|e| anyhow::anyhow!("unfencing `{to}`: {e}"))?;
            return Ok(outcome(to, epoch, format!("`{to}` was the primary but fenced (a switchover that did not finish): unfenced, it takes writes again")));
        }
        Plan::Move(op) => op,
    };
    let mut result = outcome(&op.from.clone(), op.epoch, String::new());
    let t0 = Instant::now();
    let mut step = op.start();
    loop {
        step = match step {
            Step::Fence { region, request } => {
                let answer = call(t, &region, "/v1/fence", &request)
                    .await
                    .and_then(|v| serde_json::from_value(v).map_err(|e| e.to_string()));
                if let Ok(a) = &answer {
                    let a: &crate::failover::switchover::FenceAnswer = a;
                    result
                        .fence_aborted_transactions
                        .extend(a.aborted_transactions.iter().cloned());
                }
                op.fenced(answer)
            }
            Step::Promote { region, request } => {
                let answer = admin::call(
                    admin_addr(t, &region)?,
                    Method::POST,
                    "/v1/promote",
                    Some(serde_json::to_value(&request)?),
                    timeout + CALL,
                )
                .await;
                if let Ok(v) = &answer {
                    result.aborted_transactions =
                        serde_json::from_value(v["aborted_transactions"].clone())
                            .unwrap_or_default();
                    if request.force {
                        forced_report(&mut result, v);
                    } else {
                        result.write_unavailable_ms = t0.elapsed().as_millis() as u64;
                    }
                }
                op.promoted(answer.map(|_| ()))
            }
            Step::Unfence { region, request } => {
                // Give the old primary its writes back: nothing moved.
                let mut unfenced = Err(String::new());
                for attempt in 0..3 {
                    if attempt > 0 {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    unfenced = call(t, &region, "/v1/fence", &request).await.map(|_| ());
                    if unfenced.is_ok() {
                        break;
                    }
                }
                op.unfenced(unfenced)
            }
            Step::Adopt { regions, request } => {
                for r in &regions {
                    if let Err(e) = call(t, r, "/v1/adopt", &request).await {
                        if !force || *r != op.from {
                            tracing::warn!(region = %r, error = %e, "could not tell the region of the new epoch (it learns it from heartbeats)");
                        }
                    }
                }
                return Ok(result);
            }
            Step::Failed(why) => bail!(why),
        };
    }
}

/// POST a request body to `region`'s admin API.
async fn call(
    t: &Topology,
    region: &str,
    path: &str,
    body: &impl Serialize,
) -> Result<Value, String> {
    let addr = admin_addr(t, region).map_err(|e| e.to_string())?;
    let body = serde_json::to_value(body).map_err(|e| e.to_string())?;
    admin::call(addr, Method::POST, path, Some(body), CALL).await
}

/// A forced promotion's answer: what may be lost, as the target reported it.
fn forced_report(outcome: &mut RuleOutcome, v: &Value) {
    let last = &v["from_last_report"];
    outcome.unknown_window_ms = last["heard_ms_ago"].as_u64();
    for x in v["loss"].as_array().into_iter().flatten() {
        outcome.loss.push(PartitionLoss {
            topic: x["topic"].as_str().unwrap_or_default().to_string(),
            partition: x["partition"].as_u64().unwrap_or(0) as usize,
            reported_end: x["reported_end"].as_i64().unwrap_or(0),
            mirrored_end: x["mirrored_end"].as_i64().unwrap_or(0),
            records: x["records"].as_i64().unwrap_or(0),
        });
    }
    if last.is_null() {
        outcome.note = format!(
            "`{}` never heard from `{}`: what it may have lost is unknown",
            outcome.to, outcome.from
        );
    }
}

pub fn run(args: FailoverArgs) -> anyhow::Result<()> {
    let t = crate::cli::load_topology(&args.topology)?;
    if t.region(&args.to).is_none() {
        bail!("{}: no region `{}`", args.topology.display(), args.to);
    }
    let patterns = select_rules(&t, &args.to, &args.topics)?;
    // Every step goes through the admin APIs, which take the operator certificate only.
    crate::cli::operator_tls(&t)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outcomes: Vec<RuleOutcome> = rt.block_on(async {
        let mut v = Vec::new();
        for p in &patterns {
            v.push(move_rule(&t, p, &args.to, args.force, args.timeout).await?);
        }
        anyhow::Ok(v)
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "rules": outcomes }))?
        );
        return Ok(());
    }
    for o in &outcomes {
        if !o.note.is_empty() && o.from == o.to {
            println!("rule `{}`: {}", o.pattern, o.note);
            continue;
        }
        println!(
            "rule `{}`: primary {} -> {} at epoch {}{}",
            o.pattern,
            o.from,
            o.to,
            o.epoch,
            if o.forced { " (forced)" } else { "" }
        );
        if !o.forced {
            println!(
                "  writes unavailable for {} ms; nothing acknowledged was lost",
                o.write_unavailable_ms
            );
        } else {
            if o.loss.is_empty() {
                println!("  the new primary held everything the old one last reported");
            }
            for l in &o.loss {
                println!(
                    "  may be lost: {}-{}: {} records (old primary reported {}, new primary had {})",
                    l.topic, l.partition, l.records, l.reported_end, l.mirrored_end
                );
            }
            if let Some(w) = o.unknown_window_ms {
                println!("  plus whatever the old primary accepted in its last {:.1} s before the takeover (unreported)", w as f64 / 1000.0);
            }
            if !o.note.is_empty() {
                println!("  {}", o.note);
            }
            println!("  when the old primary returns, its divergent tail moves to __ferry.quarantine.<topic>");
        }
        for id in &o.fence_aborted_transactions {
            println!("  aborted transactional id '{id}': its transaction was still open at the fence after {} s", crate::broker::txns::FENCE_TXN_WAIT.as_secs());
        }
        for a in &o.aborted_transactions {
            println!(
                "  aborted a transaction the old primary left open: {}-{} producer id {} (epoch {}) from offset {}, ABORT marker at {}",
                a.topic, a.partition, a.producer_id, a.producer_epoch, a.first_offset, a.marker_offset
            );
        }
    }
    Ok(())
}
