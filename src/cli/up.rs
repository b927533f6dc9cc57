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

fn wait_port(addr: std::net::SocketAddr, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
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
    let mut procs: Vec<Proc> = Vec::new();
    let log_dir = data_root.join("logs");
    std::fs::create_dir_all(&log_dir)?;
    for r in &topo.regions {
        for b in &r.brokers {
            let name = format!("{}/broker-{}", r.name, b.id);
            let log =
                std::fs::File::create(log_dir.join(format!("{}-broker-{}.log", r.name, b.id)))?;
            let child = Command::new(&exe)
                .arg("broker")
                .arg("--topology")
                .arg(&args.topology)
                .arg("--region")
                .arg(&r.name)
                .arg("--broker")
                .arg(b.id.to_string())
                .arg("--data-dir")
                .arg(&data_root)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {name}"))?;
            procs.push(Proc { name, child });
        }
    }
    let mut ok = true;
    for r in &topo.regions {
        for b in &r.brokers {
            if !wait_port(b.listen, Duration::from_secs(30)) {
                eprintln!(
                    "{}/broker-{} did not start listening on {}",
                    r.name, b.id, b.listen
                );
                ok = false;
            }
        }
    }
    if !ok {
        stop(&mut procs);
        bail!(
            "not every process started; see the logs in {}",
            log_dir.display()
        );
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
                "  {:<8} gateway     quic {} admin {} (the gateway is not built yet)",
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
            "  kcat -b {b} -C -t hello -o beginning -e  # read in {} (once the gateway mirrors it)",
            second.name
        );
    }
    println!("\nCtrl-C stops everything.");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let exited = rt.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let shutdown = crate::cli::broker::shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return None,
                _ = tick.tick() => {
                    for p in procs.iter_mut() {
                        if let Ok(Some(status)) = p.child.try_wait() {
                            return Some(format!("{} exited ({status})", p.name));
                        }
                    }
                }
            }
        }
    });
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
