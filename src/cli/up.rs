//! `ferry up`: run every process of a topology on this machine, each as a child process,
//! until Ctrl-C; then stop them cleanly (SIGTERM, then SIGKILL after a grace period).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

use super::supervisor::{Supervisor, STOP_GRACE};
use crate::topology;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Topology file (default: topology/local.toml, or its embedded copy when that file is
    /// not there: two regions, east and west, on loopback).
    #[arg(long, default_value = "topology/local.toml")]
    pub topology: PathBuf,
    /// Root of every region's data (`<dir>/<region>/broker-<id>`).
    #[arg(long, default_value = "ferry-data")]
    pub data_dir: PathBuf,
}

pub fn run(mut args: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    if !args.topology.exists() && args.topology == std::path::Path::new("topology/local.toml") {
        // Run from outside the repository: use the embedded copy of the default topology.
        let path = args.data_dir.join("local.toml");
        std::fs::write(&path, topology::LOCAL_TOML)?;
        args.topology = path;
    }
    let topo = match topology::load(&args.topology) {
        Ok(t) => t,
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            bail!("{} has {} error(s)", args.topology.display(), errors.len());
        }
    };
    let exe = std::env::current_exe().context("finding the ferry binary")?;
    let data_root = args.data_dir.canonicalize()?;
    let log_dir = data_root.join("logs");
    std::fs::create_dir_all(&log_dir)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(supervise(args, topo, exe, data_root, log_dir))
}

async fn supervise(
    args: UpArgs,
    topo: topology::Topology,
    exe: PathBuf,
    data_root: PathBuf,
    log_dir: PathBuf,
) -> anyhow::Result<()> {
    // Signals are handled from the very start, so a Ctrl-C during start-up stops what was
    // started instead of leaving orphans.
    let shutdown = crate::cli::broker::shutdown_signal();
    tokio::pin!(shutdown);
    // Certificates, made here when the topology names none: every region's (its gateway's
    // QUIC link, its broker's internal door, its admin API) and an operator's, for commands.
    let certs_dir = data_root.join("certs");
    let gateway_regions = topo.regions.iter().any(|r| r.gateway.is_some());
    if gateway_regions && topo.tls.is_none() && !certs_dir.join("ca.pem").exists() {
        crate::transport::certs::init(&topo, &certs_dir, false)
            .map_err(|e| anyhow::anyhow!("making certificates in {}: {e}", certs_dir.display()))?;
    }
    // Certificates made by an older Ferry have no operator certificate: issue one.
    let (op_cert, op_key) =
        crate::transport::certs::default_operator_paths(&certs_dir.join("ca.pem"));
    if gateway_regions
        && topo.tls.is_none()
        && !op_cert.exists()
        && certs_dir.join("ca.key").exists()
    {
        let ca = crate::transport::certs::Ca::load(
            &certs_dir.join("ca.pem"),
            &certs_dir.join("ca.key"),
        )?;
        crate::transport::certs::write_operator(
            &ca,
            crate::transport::certs::DEFAULT_OPERATOR,
            &op_cert,
            &op_key,
            false,
        )?;
    }
    let mut procs = Supervisor::new(exe, &args.topology, &data_root, &certs_dir, &log_dir);
    for r in &topo.regions {
        procs
            .spawn_region(&topo, &r.name)
            .map_err(|e| anyhow::anyhow!(e))?;
    }
    let started = procs.wait_ready(Duration::from_secs(60));
    let ready = tokio::select! {
        biased;
        _ = &mut shutdown => {
            eprintln!("stopping: signal received during start-up");
            procs.stop(STOP_GRACE);
            return Ok(());
        }
        r = started => r,
    };
    if let Err(why) = ready {
        eprintln!("{why}");
        procs.stop(STOP_GRACE);
        bail!("{why}");
    }
    println!(
        "ferry is up: {} ({} regions), data and logs in {}",
        args.topology.display(),
        topo.regions.len(),
        data_root.display()
    );
    for r in &topo.regions {
        for b in &r.brokers {
            let metrics = b
                .metrics
                .map(|m| format!(", metrics http://{m}/metrics"))
                .unwrap_or_default();
            println!(
                "  {:<8} broker {:<3} kafka {}{}",
                r.name, b.id, b.listen, metrics
            );
        }
        if let Some(g) = &r.gateway {
            println!(
                "  {:<8} gateway     quic {} (mutual TLS), admin https://{} (operator certificate)",
                r.name, g.quic, g.admin
            );
        }
    }
    if let (Some(first), Some(second)) = (topo.regions.first(), topo.regions.get(1)) {
        let a = first.brokers[0].listen;
        let b = second.brokers[0].listen;
        println!("\nTry it:");
        println!(
            "  seq 1 5 | kcat -b {a} -P -t hello        # produce in {}",
            first.name
        );
        println!(
            "  kcat -b {a} -C -t hello -o beginning -e  # read in {}",
            first.name
        );
        println!(
            "  kcat -b {b} -C -t hello -o beginning -e  # read the mirror in {}",
            second.name
        );
    }
    if topo.tls.is_none() && gateway_regions {
        println!(
            "\nCertificates in {}: `ferry failover`, `drill`, `status` and `quarantine` present operator.pem \
             (run them with --certs {} unless it is ferry-data/certs).",
            certs_dir.display(),
            certs_dir.display()
        );
    }
    println!("\nCtrl-C stops everything.");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let exited = loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break None,
            _ = tick.tick() => {
                for line in procs.restart_exited() {
                    eprintln!("{line}");
                }
                if let Some(why) = procs.exited() {
                    break Some(why);
                }
            }
        }
    };
    if let Some(why) = &exited {
        eprintln!("{why}: stopping the others");
    }
    procs.stop(STOP_GRACE);
    println!("stopped");
    match exited {
        Some(why) => bail!(why),
        None => Ok(()),
    }
}
