//! The `ferry` command line: one file per subcommand.
//!
//! Owns argument parsing (clap), logging setup and process lifecycle (signals, shutdown). Does
//! not own any broker behaviour: subcommands build configs and call into the library.

pub mod broker;
pub mod certs;
pub mod clients;
pub mod drill;
pub mod failover;
pub mod gateway;
pub mod groups;
pub mod quarantine;
pub mod simulate;
pub mod status;
pub mod supervisor;
pub mod topology;
pub mod up;

use std::path::Path;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Ferry: Kafka-compatible brokers in every region, mirrored over QUIC.
///
/// Start with `ferry up` (two regions on loopback, from topology/local.toml), then produce and
/// consume with any Kafka client, or with `ferry produce` and `ferry consume`.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, long_about)]
pub struct Cli {
    /// Log format on stderr (RUST_LOG sets the level, default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub certs: CertOpts,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
// Parsed once per process: the size of the largest variant (the broker's flags) costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run every process of a topology on this machine until Ctrl-C.
    Up(up::UpArgs),
    /// Run one Kafka-compatible broker (from flags, a config file, or a topology).
    Broker(broker::BrokerArgs),
    /// Run one region's mirroring gateway (QUIC with mutual TLS to the other regions).
    Gateway(gateway::GatewayArgs),
    /// Cross-region offsets and lag per link and partition (tables, or --json).
    Status(status::StatusArgs),
    /// Check or show a topology file.
    Topology(topology::TopologyArgs),
    /// Produce lines from stdin (values, key=value, or JSON records).
    Produce(clients::ProduceArgs),
    /// Print records of a topic (values, key=value, or JSON records).
    Consume(clients::ConsumeArgs),
    /// List or create topics in a region.
    Topics(clients::TopicsArgs),
    /// Consumer groups: list, describe (members, offsets, lag), reset offsets.
    Groups(groups::GroupsArgs),
    /// Create the gateways' certificates: a CA and one per region.
    Certs(certs::CertsArgs),
    /// Move the primary of topic rules to another region (planned switchover, or --force).
    Failover(failover::FailoverArgs),
    /// Run a failover drill against a running topology and report RPO and RTO.
    Drill(drill::DrillArgs),
    /// Records a rejoining region set aside: list, show, replay into the live topic.
    Quarantine(quarantine::QuarantineArgs),
    /// Run a deterministic multi-region simulation (seeds, invariants, trace hash), or a sweep.
    Simulate(simulate::SimulateArgs),
}

/// Where the certificates are (see docs/security.md).
#[derive(Debug, Clone, clap::Args)]
pub struct CertOpts {
    /// Directory of the certificates `ferry certs init --out DIR` made (and `ferry up` makes in
    /// `<data-dir>/certs`), used when the topology has no [tls] section: ca.pem, REGION.pem and
    /// REGION.key for brokers and gateways, operator.pem and operator.key for commands
    /// [default: ferry-data/certs, else `certs` beside the topology file].
    #[arg(long, global = true, env = "FERRY_CERTS", value_name = "DIR")]
    pub certs: Option<std::path::PathBuf>,
    /// The operator certificate that `ferry failover`, `drill`, `status` and `quarantine`
    /// present (default: operator.pem beside the CA certificate).
    #[arg(long, global = true, env = "FERRY_OPERATOR_CERT", value_name = "FILE")]
    pub operator_cert: Option<std::path::PathBuf>,
    /// The operator certificate's private key (default: operator.key beside the CA).
    #[arg(long, global = true, env = "FERRY_OPERATOR_KEY", value_name = "FILE")]
    pub operator_key: Option<std::path::PathBuf>,
}

static CERT_OPTS: std::sync::Mutex<Option<CertOpts>> = std::sync::Mutex::new(None);
static OPERATOR_TLS: std::sync::OnceLock<std::sync::Arc<rustls::ClientConfig>> =
    std::sync::OnceLock::new();

/// The certificate options of this process (set once when the command line is read).
pub fn cert_opts() -> CertOpts {
    CERT_OPTS
        .lock()
        .expect("cert options lock")
        .clone()
        .unwrap_or(CertOpts {
            certs: None,
            operator_cert: None,
            operator_key: None,
        })
}

/// Use `dir` as the certificates directory unless one was given (`ferry drill --spawn DIR`
/// makes its certificates in `DIR/certs`).
pub fn default_certs_dir(dir: std::path::PathBuf) {
    let mut o = CERT_OPTS.lock().expect("cert options lock");
    let opts = o.get_or_insert(CertOpts {
        certs: None,
        operator_cert: None,
        operator_key: None,
    });
    if opts.certs.is_none() {
        opts.certs = Some(dir);
    }
}

/// The certificates directory of a topology without `[tls]`: `--certs` (or `FERRY_CERTS`), else
/// `certs` beside the topology file if it holds a CA (where `ferry certs init --topology FILE`
/// is usually pointed), else `ferry-data/certs` (where `ferry up` makes them).
pub fn certs_dir(t: &crate::topology::Topology) -> std::path::PathBuf {
    if let Some(d) = cert_opts().certs {
        return d;
    }
    let beside = t
        .file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join("certs");
    if beside.join("ca.pem").exists() {
        beside
    } else {
        std::path::PathBuf::from("ferry-data/certs")
    }
}

/// The CA certificate of a topology: its `[tls]` CA, or `ca.pem` in the certificates directory.
pub fn ca_path(t: &crate::topology::Topology) -> std::path::PathBuf {
    match &t.tls {
        Some(tls) => tls.ca.clone(),
        None => certs_dir(t).join("ca.pem"),
    }
}

/// A region's certificate material: from the topology's `[tls]`, or from the certificates
/// directory (`ca.pem`, `REGION.pem`, `REGION.key`).
pub fn region_material(
    t: &crate::topology::Topology,
    region: &str,
) -> anyhow::Result<crate::transport::RegionMaterial> {
    use anyhow::Context;
    if t.tls.is_some() {
        return Ok(crate::transport::certs::load_region(t, region)?);
    }
    let dir = certs_dir(t);
    crate::transport::certs::load_material(
        region,
        &dir.join("ca.pem"),
        &dir.join(format!("{region}.pem")),
        &dir.join(format!("{region}.key")),
    )
    .with_context(|| {
        format!(
            "loading region {region}'s certificate (make them with `ferry certs init --topology {} --out {}`, or point --certs at them)",
            t.file.display(),
            dir.display()
        )
    })
}

/// The TLS client configuration of this process's operator certificate (loaded once), for the
/// gateways' admin APIs and the brokers' internal requests.
pub fn operator_tls(
    t: &crate::topology::Topology,
) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
    use anyhow::Context;
    if let Some(c) = OPERATOR_TLS.get() {
        return Ok(c.clone());
    }
    let opts = cert_opts();
    let ca = ca_path(t);
    let (dcert, dkey) = crate::transport::certs::default_operator_paths(&ca);
    let cert = opts.operator_cert.unwrap_or(dcert);
    let key = opts.operator_key.unwrap_or(dkey);
    let m = crate::transport::certs::load_operator(&ca, &cert, &key).context(
        "loading the operator certificate (`ferry certs init` makes one beside the CA, `ferry certs operator` issues more; --certs, --operator-cert and --operator-key say where they are)",
    )?;
    let c = crate::transport::trust::tcp_client_config(&m)?;
    Ok(OPERATOR_TLS.get_or_init(|| c).clone())
}

/// Set up `tracing` on stderr; `RUST_LOG` overrides the default level (info).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

/// The Kafka address of a region's first broker in a topology file.
pub fn topology_bootstrap(path: &Path, region: &str) -> anyhow::Result<String> {
    let t = load_topology(path)?;
    let r = t.region(region).ok_or_else(|| {
        anyhow::anyhow!(
            "{}: no region `{region}` (regions: {})",
            path.display(),
            t.regions
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let (h, p) = &r.brokers[0].advertised;
    Ok(format!("{h}:{p}"))
}

/// Load a topology or fail with every error listed.
pub fn load_topology(path: &Path) -> anyhow::Result<crate::topology::Topology> {
    crate::topology::load(path).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        anyhow::anyhow!("invalid topology:\n{}", lines.join("\n"))
    })
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    init_logging(cli.log_format);
    *CERT_OPTS.lock().expect("cert options lock") = Some(cli.certs.clone());
    match cli.command {
        Command::Up(args) => up::run(args).map(|_| ExitCode::SUCCESS),
        Command::Broker(args) => broker::run(args).map(|_| ExitCode::SUCCESS),
        Command::Topology(args) => topology::run(args),
        Command::Status(args) => status::run(args).map(|_| ExitCode::SUCCESS),
        Command::Gateway(args) => gateway::run(args).map(|_| ExitCode::SUCCESS),
        Command::Produce(args) => clients::produce(args).map(|_| ExitCode::SUCCESS),
        Command::Consume(args) => clients::consume(args).map(|_| ExitCode::SUCCESS),
        Command::Topics(args) => clients::topics(args).map(|_| ExitCode::SUCCESS),
        Command::Groups(args) => groups::run(args).map(|_| ExitCode::SUCCESS),
        Command::Certs(args) => certs::run(args).map(|_| ExitCode::SUCCESS),
        Command::Failover(args) => failover::run(args).map(|_| ExitCode::SUCCESS),
        Command::Drill(args) => drill::run(args),
        Command::Simulate(args) => simulate::run(args),
        Command::Quarantine(args) => quarantine::run(args).map(|_| ExitCode::SUCCESS),
    }
}
