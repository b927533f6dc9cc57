//! The `ferry` command line: one file per subcommand.
//!
//! Owns argument parsing (clap), logging setup and process lifecycle (signals, shutdown). Does
//! not own any broker behaviour: subcommands build configs and call into the library.

pub mod broker;
pub mod groups;

use clap::{Parser, Subcommand, ValueEnum};

/// Ferry: Kafka-compatible brokers in every region, mirrored over QUIC.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, long_about = None)]
pub struct Cli {
    /// Log format on stderr.
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
    /// Run one Kafka-compatible broker.
    Broker(broker::BrokerArgs),
    /// Consumer groups: list, describe (members, offsets, lag), reset offsets.
    Groups(groups::GroupsArgs),
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

pub fn run(cli: Cli) -> anyhow::Result<()> {
    init_logging(cli.log_format);
    match cli.command {
        Command::Broker(args) => broker::run(args),
        Command::Groups(args) => groups::run(args),
    }
}
