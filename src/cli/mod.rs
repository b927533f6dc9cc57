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
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
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
