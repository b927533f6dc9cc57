//! `ferry up`: run every process of a topology on this machine, each as a child process,
//! until Ctrl-C; then stop them cleanly (SIGTERM, then SIGKILL after a grace period).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

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

struct Proc {
    name: String,
    child: Child,
}

/// Wait until the broker has logged that it listens (a port that accepts connections is not
/// enough: another process may hold it). Fails as soon as the child exits.
async fn wait_ready(
    p: &mut Proc,
    log: &std::path::Path,
    marker: &str,
    limit: Duration,
) -> Result<(), String> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(status)) = p.child.try_wait() {
            return Err(format!(
                "{} exited ({status}) while starting; see {}",
                p.name,
                log.display()
            ));
        }
        if std::fs::read_to_string(log)
            .map(|t| t.contains(marker))
            .unwrap_or(false)
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!(
        "{} did not start listening within {limit:?}; see {}",
        p.name,
        log.display()
    ))
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
    let mut procs: Vec<Proc> = Vec::new();
    let mut logs = Vec::new();
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
    for r in &topo.regions {
        for b in &r.brokers {
            let name = format!("{}/broker-{}", r.name, b.id);
            let log_path = log_dir.join(format!("{}-broker-{}.log", r.name, b.id));
            let argv: Vec<std::ffi::OsString> = vec![
                "broker".into(),
                "--topology".into(),
                args.topology.clone().into(),
                "--region".into(),
                r.name.clone().into(),
                "--broker".into(),
                b.id.to_string().into(),
                "--data-dir".into(),
                data_root.clone().into(),
                "--certs".into(),
                certs_dir.clone().into(),
            ];
            if let Err(e) = spawn(&exe, &argv, name, &log_path, &mut procs) {
                stop(&mut procs);
                bail!(e);
            }
            logs.push(log_path);
        }
    }
    // Gateways.
    let with_gateways: Vec<&topology::Region> = topo
        .regions
        .iter()
        .filter(|r| r.gateway.is_some())
        .collect();
    for r in with_gateways {
        let name = format!("{}/gateway", r.name);
        let log_path = log_dir.join(format!("{}-gateway.log", r.name));
        let argv: Vec<std::ffi::OsString> = vec![
            "gateway".into(),
            "--topology".into(),
            args.topology.clone().into(),
            "--region".into(),
            r.name.clone().into(),
            "--certs".into(),
            certs_dir.clone().into(),
        ];
        if let Err(e) = spawn(&exe, &argv, name, &log_path, &mut procs) {
            stop(&mut procs);
            bail!(e);
        }
        logs.push(log_path);
    }
    let started = async {
        for (p, log) in procs.iter_mut().zip(&logs) {
            let marker = if p.name.ends_with("/gateway") {
                "ferry gateway listening on"
            } else {
                "ferry broker listening on"
            };
            wait_ready(p, log, marker, Duration::from_secs(60)).await?;
        }
        Ok::<(), String>(())
    };
    let ready = tokio::select! {
        biased;
        _ = &mut shutdown => {
            eprintln!("stopping: signal received during start-up");
            stop(&mut procs);
            return Ok(());
        }
        r = started => r,
    };
    if let Err(why) = ready {
        eprintln!("{why}");
        stop(&mut procs);
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
                if let Some(why) = procs.iter_mut().find_map(|p| match p.child.try_wait() {
                    Ok(Some(status)) => Some(format!("{} exited ({status})", p.name)),
                    _ => None,
                }) {
                    break Some(why);
                }
            }
        }
    };
    if let Some(why) = &exited {
        eprintln!("{why}: stopping the others");
    }
    stop(&mut procs);
    println!("stopped");
    match exited {
        Some(why) => bail!(why),
        None => Ok(()),
    }
}

/// Start `exe argv...` with stdout and stderr in `log`, and add it to `procs`.
fn spawn(
    exe: &std::path::Path,
    argv: &[std::ffi::OsString],
    name: String,
    log: &std::path::Path,
    procs: &mut Vec<Proc>,
) -> Result<(), String> {
    let err = |e: std::io::Error| format!("starting {name}: {e}");
    let out = std::fs::File::create(log)
        .map_err(|e| format!("starting {name}: {}: {e}", log.display()))?;
    let child = Command::new(exe)
        .args(argv)
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(err)?)
        .stderr(out)
        .spawn()
        .map_err(err)?;
    procs.push(Proc { name, child });
    Ok(())
}

fn stop(procs: &mut [Proc]) {
    for p in procs.iter() {
        // SIGTERM by pid: each broker syncs its partitions and exits.
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(p.child.id() as i32).expect("a child pid"),
            rustix::process::Signal::TERM,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for p in procs.iter_mut() {
        loop {
            match p.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    eprintln!("{} did not stop in time: killing it", p.name);
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}
