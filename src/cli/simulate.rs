//! `ferry simulate FILE.toml [--seed N | --seeds A..B] [--json]` and
//! `ferry simulate sweep FILE.toml --out docs/sim-sweep.svg`: run a simulation scenario
//! (see `docs/simulations.md`).
//!
//! Owns: arguments, the per-seed summary lines, replay commands for failing seeds, the exit
//! code. Does not own: the simulator ([`crate::sim`]).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;

use crate::sim::{self, Overrides, Scenario};

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// A scenario file (`simulations/*.toml`), or `sweep` followed by one.
    #[arg(required = true, num_args = 1..=2, value_name = "[sweep] FILE")]
    pub args: Vec<String>,
    /// Run this one seed (prints the trace hash).
    #[arg(long, conflicts_with = "seeds")]
    pub seed: Option<u64>,
    /// Run the seeds A..B (B excluded). Default: 0..20 (sweep: 0..3 per grid point).
    #[arg(long)]
    pub seeds: Option<String>,
    /// One JSON object per seed on stdout.
    #[arg(long)]
    pub json: bool,
    /// Sweep: where to write the SVG chart.
    #[arg(long, default_value = "docs/sim-sweep.svg")]
    pub out: PathBuf,
    /// Print every trace line of a single-seed run on stderr.
    #[arg(long)]
    pub verbose: bool,
}

fn parse_range(s: &str) -> anyhow::Result<std::ops::Range<u64>> {
    let (a, b) = s
        .split_once("..")
        .with_context(|| format!("--seeds `{s}`: expected A..B, e.g. 0..100"))?;
    let a: u64 = a.trim().parse().with_context(|| format!("--seeds `{s}`"))?;
    let b: u64 = b.trim().parse().with_context(|| format!("--seeds `{s}`"))?;
    if b <= a {
        bail!("--seeds `{s}`: the range is empty");
    }
    Ok(a..b)
}

pub fn run(args: SimulateArgs) -> anyhow::Result<ExitCode> {
    let (sweep, file) = match args.args.as_slice() {
        [f] => (false, f.clone()),
        [s, f] if s == "sweep" => (true, f.clone()),
        _ => bail!("usage: ferry simulate [sweep] FILE.toml"),
    };
    let sc = Scenario::load(std::path::Path::new(&file))?;
    if sweep {
        let seeds = match &args.seeds {
            Some(s) => parse_range(s)?,
            None => 0..3,
        };
        let t0 = Instant::now();
        let points = sim::sweep::sweep(&sc, seeds)?;
        for p in &points {
            println!(
                "loss {:>5.1}%  rtt {:>4} ms  mean lag {:>8.1}  max lag {:>8.1}  rpo {:>7.1}  failing seeds {}",
                p.loss * 100.0,
                p.rtt,
                p.mean_lag,
                p.max_lag,
                p.rpo,
                p.failures
            );
        }
        sim::sweep::chart(&sc.name, &points, &args.out)?;
        println!(
            "wrote {} ({} points in {:.1}s)",
            args.out.display(),
            points.len(),
            t0.elapsed().as_secs_f64()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let single = args.seed.is_some();
    let seeds = match (args.seed, &args.seeds) {
        (Some(s), _) => s..s + 1,
        (None, Some(r)) => parse_range(r)?,
        (None, None) => 0..20,
    };
    let t0 = Instant::now();
    let mut failed = 0u64;
    let mut sim_ms = 0u64;
    let n = seeds.end - seeds.start;
    for seed in seeds {
        let ov = Overrides::default();
        let mut w = sim::world::World::new(&sc, seed, &ov)?;
        if single && args.verbose {
            w.keep_trace();
        }
        let (o, lines) = w.run_keep();
        if single && args.verbose {
            for l in &lines {
                eprintln!("{l}");
            }
        }
        sim_ms += o.sim_ms;
        let result = match &o.failure {
            None => "ok".to_string(),
            Some(f) => format!("FAIL {}", f.invariant),
        };
        if args.json {
            println!(
                "{}",
                json!({
                    "scenario": sc.name, "seed": o.seed, "simulated_s": o.sim_ms as f64 / 1000.0,
                    "events": o.events, "acknowledged": o.acknowledged, "rpo_records": o.rpo_records,
                    "reported_loss": o.reported_loss, "switchovers": o.switchovers,
                    "forced_failovers": o.forced_failovers, "crashes": o.crashes,
                    "quarantined": o.quarantined, "max_lag": o.max_lag, "mean_lag": o.mean_lag,
                    "trace_hash": format!("{:016x}", o.trace_hash),
                    "result": result,
                    "failure": o.failure.as_ref().map(|f| json!({
                        "invariant": f.invariant, "message": f.message, "at_ms": f.at_ms,
                        "recent": f.recent,
                    })),
                })
            );
        } else {
            println!(
                "seed {:>6}  {:>6.0} s simulated  {:>8} events  {:>7} acknowledged  rpo {:>5}  switchovers {}  forced {}  crashes {}  {}",
                o.seed,
                o.sim_ms as f64 / 1000.0,
                o.events,
                o.acknowledged,
                o.rpo_records,
                o.switchovers,
                o.forced_failovers,
                o.crashes,
                result
            );
        }
        if let Some(f) = &o.failure {
            failed += 1;
            if !args.json {
                println!(
                    "  invariant broken: {} at {} ms: {}",
                    f.invariant, f.at_ms, f.message
                );
                println!("  replay: ferry simulate {file} --seed {seed}");
                println!("  last events:");
                for l in &f.recent {
                    println!("    {l}");
                }
            }
        }
        if single && !args.json {
            println!("trace hash: {:016x}", o.trace_hash);
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    if !args.json {
        eprintln!(
            "{n} seeds, {failed} failed; {:.0} simulated s in {wall:.2} s wall ({:.0} simulated s per wall s)",
            sim_ms as f64 / 1000.0,
            sim_ms as f64 / 1000.0 / wall.max(1e-9)
        );
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
