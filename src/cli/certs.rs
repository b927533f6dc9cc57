//! `ferry certs`: create the gateways' certificates (a CA and one certificate per region).

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Subcommand};

use crate::transport::certs;

#[derive(Debug, Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    pub command: CertsCommand,
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a CA and, per gateway region, a certificate and key signed by it (PEM).
    ///
    /// When the topology has a `[tls]` section, exactly the files it names are written (plus the
    /// CA key beside the CA certificate). Without one, the files go to --out and the `[tls]`
    /// section to add to the topology is printed.
    Init(InitArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The topology file.
    #[arg(long)]
    pub topology: PathBuf,
    /// Directory for ca.pem, ca.key, REGION.pem and REGION.key when the topology has no `[tls]`
    /// section [default: certs].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace files that already exist.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    match args.command {
        CertsCommand::Init(a) => init(a),
    }
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    let topology = certs::load_topology_for_init(&args.topology).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        anyhow::anyhow!("invalid topology:\n{}", lines.join("\n"))
    })?;
    if topology.tls.is_some() && args.out.is_some() {
        bail!(
            "{}: the [tls] section names the files to write; --out applies only to a topology \
             without [tls]",
            args.topology.display()
        );
    }
    let out = args.out.unwrap_or_else(|| PathBuf::from("certs"));
    let report = certs::init(&topology, &out, args.force)?;
    for f in &report.written {
        println!("wrote {}  ({})", f.path.display(), f.what);
    }
    println!(
        "\nThe gateways never read {}: keep it offline; it is needed only to issue more \
         certificates.",
        report.ca_key.display()
    );
    if let Some(section) = &report.tls_section {
        println!(
            "\nAdd this to {} (paths are relative to its directory):\n\n{section}",
            args.topology.display()
        );
    }
    Ok(())
}
