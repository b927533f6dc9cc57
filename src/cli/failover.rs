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

/// Move one rule. Used by `ferry failover` and `ferry drill`.
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
    let Some(target) = states.get(to).cloned() else {
        bail!("the gateway of `{to}` does not answer on its admin address: it cannot be promoted");
    };
    let newest = states
        .values()
        .max_by_key(|s| s.epoch)
        .cloned()
        .expect("at least the target");
    let from = newest.primary.clone();
    if from == to {
        let note = if target.fenced {
            // A switchover that could not finish left `to` fenced (its unfence failed:
            // simulator finding 10): moving the rule to it again lifts the fence.
            admin::call(
                admin_addr(t, to)?,
                Method::POST,
                "/v1/fence",
                Some(json!({ "patterns": [pattern], "fenced": false })),
                CALL,
            )
            .await
            .map_err(|e| anyhow::anyhow!("unfencing `{to}`: {e}"))?;
            format!("`{to}` was the primary but fenced (a switchover that did not finish): unfenced, it takes writes again")
        } else {
            format!("`{to}` is already the primary")
        };
        return Ok(RuleOutcome {
            pattern: pattern.into(),
            from: from.clone(),
            to: to.into(),
            epoch: newest.epoch,
            forced: force,
            write_unavailable_ms: 0,
            loss: Vec::new(),
            unknown_window_ms: None,
            note,
        });
    }
    let epoch = crate::failover::next_epoch(newest.epoch, crate::failover::region_index(t, to));
    let to_addr = admin_addr(t, to)?;
    let mut outcome = RuleOutcome {
        pattern: pattern.into(),
        from: from.clone(),
        to: to.into(),
        epoch,
        forced: force,
        write_unavailable_ms: 0,
        loss: Vec::new(),
        unknown_window_ms: None,
        note: String::new(),
    };
    let _ = target;
    if !force {
        let from_addr = admin_addr(t, &from)?;
        let t0 = Instant::now();
        // Under lease fencing the fence lifts by itself if this switchover neither moves the
        // rule nor unfences it (this process dies, the target is lost): after twice the
        // longest this command waits, while the target may promote only in the first half.
        let window = timeout + CALL;
        let fenced = admin::call(
            from_addr.clone(),
            Method::POST,
            "/v1/fence",
            Some(json!({
                "patterns": [pattern], "fenced": true,
                "lapse_ms": 2 * window.as_millis() as u64,
            })),
            CALL,
        )
        .await
        .map_err(|e| anyhow::anyhow!("fencing `{from}`: {e} (if `{from}` is gone, use --force)"))?;
        let ends = fenced["ends"][pattern].clone();
        let epochs = match &fenced["epochs"][pattern] {
            Value::Null => json!({}),
            v => v.clone(),
        };
        let not_after = fenced["fence_until_ms"]
            .as_u64()
            .map(|t| t - window.as_millis() as u64);
        let promoted = admin::call(
            to_addr,
            Method::POST,
            "/v1/promote",
            Some(json!({
                "pattern": pattern, "epoch": epoch, "from": from, "wait_for": ends,
                "wait_epochs": epochs, "not_after_ms": not_after,
                "force": false, "timeout_ms": timeout.as_millis() as u64,
            })),
            timeout + CALL,
        )
        .await;
        if let Err(e) = promoted {
            // Give the old primary its writes back: nothing moved. It may be unreachable by
            // now; say so rather than claim it was unfenced (simulator finding 10).
            let mut unfence = Err(String::new());
            for attempt in 0..3 {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                unfence = admin::call(
                    from_addr.clone(),
                    Method::POST,
                    "/v1/fence",
                    Some(json!({ "patterns": [pattern], "fenced": false })),
                    CALL,
                )
                .await
                .map(|_| ());
                if unfence.is_ok() {
                    break;
                }
            }
            match unfence {
                Ok(()) => bail!("promoting `{to}`: {e}; `{from}` was unfenced and stays primary"),
                Err(u) => bail!(
                    "promoting `{to}`: {e}; unfencing `{from}` failed too ({u}): it stays primary \
                     but fenced, taking no writes for `{pattern}`; once it answers, run \
                     `ferry failover --to {from}` to unfence it (or move the rule elsewhere)"
                ),
            }
        }
        outcome.write_unavailable_ms = t0.elapsed().as_millis() as u64;
    } else {
        let v = admin::call(
            to_addr,
            Method::POST,
            "/v1/promote",
            Some(json!({
                "pattern": pattern, "epoch": epoch, "from": from,
                "force": true, "timeout_ms": timeout.as_millis() as u64,
            })),
            timeout + CALL,
        )
        .await
        .map_err(|e| anyhow::anyhow!("promoting `{to}`: {e}"))?;
        let ours: BTreeMap<String, Vec<i64>> =
            serde_json::from_value(v["ends"].clone()).unwrap_or_default();
        let last = &v["from_last_report"];
        let reported: BTreeMap<String, Vec<i64>> =
            serde_json::from_value(last["ends"].clone()).unwrap_or_default();
        outcome.unknown_window_ms = last["heard_ms_ago"].as_u64();
        if let Some(l) = v["loss"].as_array() {
            // The gateway compared epoch histories: use its figures.
            for x in l {
                outcome.loss.push(PartitionLoss {
                    topic: x["topic"].as_str().unwrap_or_default().to_string(),
                    partition: x["partition"].as_u64().unwrap_or(0) as usize,
                    reported_end: x["reported_end"].as_i64().unwrap_or(0),
                    mirrored_end: x["mirrored_end"].as_i64().unwrap_or(0),
                    records: x["records"].as_i64().unwrap_or(0),
                });
            }
        }
        for (topic, ends) in reported.into_iter().filter(|_| v["loss"].is_null()) {
            let have = ours.get(&topic).cloned().unwrap_or_default();
            for (p, end) in ends.iter().enumerate() {
                let m = have.get(p).copied().unwrap_or(0);
                if *end > m {
                    outcome.loss.push(PartitionLoss {
                        topic: topic.clone(),
                        partition: p,
                        reported_end: *end,
                        mirrored_end: m,
                        records: end - m,
                    });
                }
            }
        }
        if last.is_null() {
            outcome.note =
                format!("`{to}` never heard from `{from}`: what it may have lost is unknown");
        }
    }
    // Every other region adopts the new epoch (the heartbeats would carry it too).
    let new = RuleState::open(epoch, to);
    for r in regions.iter().filter(|r| **r != to) {
        if let Ok(addr) = admin_addr(t, r) {
            if let Err(e) = admin::call(
                addr,
                Method::POST,
                "/v1/adopt",
                Some(json!({ "pattern": pattern, "state": new })),
                CALL,
            )
            .await
            {
                if !force || *r != from {
                    tracing::warn!(region = %r, error = %e, "could not tell the region of the new epoch (it learns it from heartbeats)");
                }
            }
        }
    }
    Ok(outcome)
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
    }
    Ok(())
}
