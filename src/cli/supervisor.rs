//! The processes of a topology run on this machine as children of one command: `ferry up`
//! (every region until Ctrl-C) and `ferry drill --spawn` (a region lost for real with SIGKILL,
//! then restarted).
//!
//! Owns: each broker's, gateway's and (for a region cluster whose topology says so) etcd's
//! command line, starting one with its output appended to `<logs>/<region>-broker-<id>.log`,
//! `<logs>/<region>-gateway.log` or `<logs>/<region>-etcd.log`, waiting until each logs
//! that it listens (a port that accepts connections is not enough: another process may hold
//! it), noticing a child that exits (a broker or etcd of a region cluster is started again, since
//! its cluster rides out the loss; any other exit stops everything), SIGKILL of a region, and a clean stop of everything
//! (SIGTERM, each broker syncs and exits; SIGKILL after a grace period; etcd last, so brokers
//! can leave their cluster first). A region's etcd is ready before its brokers start.
//! Does not own: certificates (made by the caller first), readiness of the cluster as a whole
//! (the drill asks the gateways' admin APIs).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::topology::{EtcdSpec, Topology};

/// How long a stop waits for SIGTERM to end a process before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(15);

const BROKER_READY: &str = "ferry broker listening on";
const GATEWAY_READY: &str = "ferry gateway listening on";
const ETCD_READY: &str = "ready to serve client requests";

/// A region cluster's member that exits is started again, at most this often.
pub const RESTART_BACKOFF: Duration = Duration::from_secs(2);

/// Debian's etcd-server (or any etcd on PATH).
fn etcd_binary() -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "etcd is not installed, and this topology has a region cluster whose etcd ferry up \
             starts: install Debian's etcd-server (`apt-get install etcd-server`, or \
             scripts/install-build-deps.sh --etcd)"
                .to_string()
        })
}

/// One child process.
struct Proc {
    /// `<region>/broker-<id>` or `<region>/gateway`.
    name: String,
    region: String,
    child: Child,
    log: PathBuf,
    /// Where its log ended when it started: readiness is looked for after it.
    from: usize,
    marker: &'static str,
    ready: bool,
    /// How it was started (to start it again).
    exe: PathBuf,
    argv: Vec<std::ffi::OsString>,
    /// A member of a region cluster (a broker or its etcd): when it exits it is started again,
    /// because the cluster rides out the loss of one; any other child's exit stops everything.
    restartable: bool,
    started: Instant,
}

/// The children of one command.
pub struct Supervisor {
    exe: PathBuf,
    topology: PathBuf,
    data: PathBuf,
    certs: PathBuf,
    logs: PathBuf,
    procs: Vec<Proc>,
}

impl Supervisor {
    /// Processes of `topology` (a file) running `exe`, with data under `data`, certificates in
    /// `certs` and logs in `logs`.
    pub fn new(
        exe: PathBuf,
        topology: &Path,
        data: &Path,
        certs: &Path,
        logs: &Path,
    ) -> Supervisor {
        Supervisor {
            exe,
            topology: topology.to_path_buf(),
            data: data.to_path_buf(),
            certs: certs.to_path_buf(),
            logs: logs.to_path_buf(),
            procs: Vec::new(),
        }
    }

    /// Start every broker of `region` and its gateway, if it has one (without waiting).
    pub fn spawn_region(&mut self, t: &Topology, region: &str) -> Result<(), String> {
        let r = t
            .region(region)
            .ok_or_else(|| format!("no region `{region}`"))?;
        if let Some(EtcdSpec::Managed { client, peer }) = r.cluster.as_ref().map(|c| &c.etcd) {
            let exe = etcd_binary()?;
            let dir = t
                .region_dir(region, &self.data)
                .map_err(|e| e.to_string())?
                .join("etcd");
            let (client, peer) = (format!("http://{client}"), format!("http://{peer}"));
            let argv: Vec<std::ffi::OsString> = vec![
                "--name".into(),
                region.into(),
                "--data-dir".into(),
                dir.into(),
                "--listen-client-urls".into(),
                client.clone().into(),
                "--advertise-client-urls".into(),
                client.into(),
                "--listen-peer-urls".into(),
                peer.clone().into(),
                "--initial-advertise-peer-urls".into(),
                peer.clone().into(),
                "--initial-cluster".into(),
                format!("{region}={peer}").into(),
            ];
            let name = format!("{region}/etcd");
            let log = self.logs.join(format!("{region}-etcd.log"));
            self.spawn_exe(exe, name, region, &argv, log, ETCD_READY)?;
            self.procs.last_mut().expect("just started").restartable = true;
            // The brokers join through it as they start.
            self.wait_last_ready(Duration::from_secs(30))?;
        }
        for b in &r.brokers {
            let argv: Vec<std::ffi::OsString> = vec![
                "broker".into(),
                "--topology".into(),
                self.topology.clone().into(),
                "--region".into(),
                region.into(),
                "--broker".into(),
                b.id.to_string().into(),
                "--data-dir".into(),
                self.data.clone().into(),
                "--certs".into(),
                self.certs.clone().into(),
            ];
            let name = format!("{region}/broker-{}", b.id);
            let log = self.logs.join(format!("{region}-broker-{}.log", b.id));
            self.spawn(name, region, &argv, log, BROKER_READY)?;
            if r.cluster.is_some() {
                self.procs.last_mut().expect("just started").restartable = true;
            }
        }
        if r.gateway.is_some() {
            let argv: Vec<std::ffi::OsString> = vec![
                "gateway".into(),
                "--topology".into(),
                self.topology.clone().into(),
                "--region".into(),
                region.into(),
                "--certs".into(),
                self.certs.clone().into(),
            ];
            let name = format!("{region}/gateway");
            let log = self.logs.join(format!("{region}-gateway.log"));
            self.spawn(name, region, &argv, log, GATEWAY_READY)?;
        }
        Ok(())
    }

    fn spawn(
        &mut self,
        name: String,
        region: &str,
        argv: &[std::ffi::OsString],
        log: PathBuf,
        marker: &'static str,
    ) -> Result<(), String> {
        self.spawn_exe(self.exe.clone(), name, region, argv, log, marker)
    }

    /// Wait (blocking, at most `limit`) until the process started last logs its marker.
    fn wait_last_ready(&mut self, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        let p = self.procs.last_mut().expect("a process was started");
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                return Err(format!(
                    "{} exited ({status}); see {}",
                    p.name,
                    p.log.display()
                ));
            }
            let text = std::fs::read(&p.log).unwrap_or_default();
            if String::from_utf8_lossy(&text[p.from.min(text.len())..]).contains(p.marker) {
                p.ready = true;
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(format!(
                    "{} was not ready within {limit:?}; see {}",
                    p.name,
                    p.log.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn spawn_exe(
        &mut self,
        exe: PathBuf,
        name: String,
        region: &str,
        argv: &[std::ffi::OsString],
        log: PathBuf,
        marker: &'static str,
    ) -> Result<(), String> {
        let err = |e: std::io::Error| format!("starting {name}: {}: {e}", log.display());
        let from = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0) as usize;
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(err)?;
        let child = Command::new(&exe)
            .args(argv)
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(err)?)
            .stderr(out)
            .spawn()
            .map_err(err)?;
        self.procs.push(Proc {
            name,
            region: region.to_string(),
            child,
            log,
            from,
            marker,
            ready: false,
            exe,
            argv: argv.to_vec(),
            restartable: false,
            started: Instant::now(),
        });
        Ok(())
    }

    /// Wait until every process started logs that it listens, at most `limit`; fails as soon
    /// as one exits, naming its log.
    pub async fn wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Some(why) = self.exited() {
                return Err(why);
            }
            for p in self.procs.iter_mut().filter(|p| !p.ready) {
                let text = std::fs::read(&p.log).unwrap_or_default();
                p.ready =
                    String::from_utf8_lossy(&text[p.from.min(text.len())..]).contains(p.marker);
            }
            let waiting: Vec<&Proc> = self.procs.iter().filter(|p| !p.ready).collect();
            let Some(first) = waiting.first() else {
                return Ok(());
            };
            if start.elapsed() > limit {
                return Err(format!(
                    "{} did not start listening within {limit:?}; see {}",
                    first.name,
                    first.log.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Start again every member of a region cluster that exited (at most once every
    /// [`RESTART_BACKOFF`] each); returns what was done, one line each.
    pub fn restart_exited(&mut self) -> Vec<String> {
        let mut done = Vec::new();
        for p in self.procs.iter_mut().filter(|p| p.restartable) {
            let Ok(Some(status)) = p.child.try_wait() else {
                continue;
            };
            if p.started.elapsed() < RESTART_BACKOFF {
                continue;
            }
            let from = std::fs::metadata(&p.log).map(|m| m.len()).unwrap_or(0) as usize;
            let out = match std::fs::OpenOptions::new().append(true).open(&p.log) {
                Ok(f) => f,
                Err(e) => {
                    done.push(format!("{} exited ({status}); not restarted: {e}", p.name));
                    continue;
                }
            };
            let child = out.try_clone().and_then(|err| {
                Command::new(&p.exe)
                    .args(&p.argv)
                    .stdin(Stdio::null())
                    .stdout(out)
                    .stderr(err)
                    .spawn()
            });
            match child {
                Ok(c) => {
                    p.child = c;
                    p.from = from;
                    p.ready = false;
                    p.started = Instant::now();
                    done.push(format!(
                        "{} exited ({status}): started again (its region cluster rides out the loss)",
                        p.name
                    ));
                }
                Err(e) => done.push(format!("{} exited ({status}); not restarted: {e}", p.name)),
            }
        }
        done
    }

    /// The first child that exited and is not restarted, if any: its name, status and log.
    pub fn exited(&mut self) -> Option<String> {
        self.procs
            .iter_mut()
            .filter(|p| !p.restartable)
            .find_map(|p| match p.child.try_wait() {
                Ok(Some(status)) => Some(format!(
                    "{} exited ({status}); see {}",
                    p.name,
                    p.log.display()
                )),
                _ => None,
            })
    }

    /// SIGKILL every process of `region` (a region lost).
    pub fn kill_region(&mut self, region: &str) {
        let (gone, kept): (Vec<Proc>, Vec<Proc>) = std::mem::take(&mut self.procs)
            .into_iter()
            .partition(|p| p.region == region);
        self.procs = kept;
        for mut p in gone {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// SIGTERM every process, then SIGKILL those still running after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        // etcd last: brokers revoke their leases on the way out.
        let (etcd, others): (Vec<Proc>, Vec<Proc>) = std::mem::take(&mut self.procs)
            .into_iter()
            .partition(|p| p.marker == ETCD_READY);
        stop_all(others, grace);
        stop_all(etcd, grace);
    }
}

/// SIGTERM every process, then SIGKILL those still running after `grace`.
fn stop_all(mut all: Vec<Proc>, grace: Duration) {
    for p in &all {
        if let Some(pid) = rustix::process::Pid::from_raw(p.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
    let deadline = Instant::now() + grace;
    for p in &mut all {
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

impl Drop for Supervisor {
    /// No orphans, whatever path the caller leaves by.
    fn drop(&mut self) {
        self.stop(STOP_GRACE);
    }
}
