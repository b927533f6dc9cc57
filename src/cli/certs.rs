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
    /// Issue an operator certificate (`NAME.operator.ferry`) from the topology's CA: it opens
    /// every gateway's admin API and every broker's internal requests. Needs the CA's key.
    Operator(OperatorArgs),
}

#[derive(Debug, Args)]
pub struct OperatorArgs {
    /// The operator's name (lowercase letters, digits, `-`, `_`).
    #[arg(long)]
    pub name: String,
    /// The CA certificate (its key is read from beside it: ca.pem -> ca.key).
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
    /// Where to write the certificate (the key goes beside it, `.key`) [default: NAME.pem
    /// beside the CA].
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Replace files that already exist.
    #[arg(long)]
    pub force: bool,
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
        CertsCommand::Operator(a) => operator(a),
    }
}

fn operator(args: OperatorArgs) -> anyhow::Result<()> {
    if !certs::valid_operator_name(&args.name) {
        bail!(
            "`{}` is not a valid operator name (lowercase letters, digits, `-` and `_`, starting with a letter)",
            args.name
        );
    }
    let key = args.ca.with_extension("key");
    let ca = certs::Ca::load(&args.ca, &key)?;
    let cert = args.out.unwrap_or_else(|| {
        args.ca
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join(format!("{}.pem", args.name))
    });
    let cert_key = cert.with_extension("key");
    certs::write_operator(&ca, &args.name, &cert, &cert_key, args.force)?;
    println!(
        "wrote {} and {} ({})",
        cert.display(),
        cert_key.display(),
        certs::operator_dns_name(&args.name)
    );
    println!(
        "Commands present it with --operator-cert {} --operator-key {}",
        cert.display(),
        cert_key.display()
    );
    Ok(())
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
