//! `ferry gateway --topology FILE --region R`: run one region's mirroring gateway.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use crate::mirror::gateway::Gateway;
use crate::transport::{certs, link, tls};

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Topology file.
    #[arg(long, default_value = "topology/local.toml")]
    pub topology: PathBuf,
    /// This gateway's region.
    #[arg(long)]
    pub region: String,
    /// Directory of the certificates made by `ferry certs init --out DIR`, used when the
    /// topology has no [tls] section.
    #[arg(long, default_value = "certs")]
    pub certs: PathBuf,
}

pub fn run(args: GatewayArgs) -> anyhow::Result<()> {
    let topo = Arc::new(crate::cli::load_topology(&args.topology)?);
    let region = topo
        .region(&args.region)
        .with_context(|| format!("no region `{}` in {}", args.region, args.topology.display()))?;
    let spec = region.gateway.clone().with_context(|| {
        format!(
            "region `{}` has no gateway in {}",
            args.region,
            args.topology.display()
        )
    })?;
    let material = if topo.tls.is_some() {
        certs::load_region(&topo, &args.region)?
    } else {
        certs::load_material(
            &args.region,
            &args.certs.join("ca.pem"),
            &args.certs.join(format!("{}.pem", args.region)),
            &args.certs.join(format!("{}.key", args.region)),
        )
        .with_context(|| {
            format!(
                "loading certificates (make them with `ferry certs init --topology {} --out {}`)",
                args.topology.display(),
                args.certs.display()
            )
        })?
    };
    let settings = tls::TransportSettings::default();
    let server = tls::server_config(&material, &settings)?;
    let client = tls::client_config(&material, &settings)?;
    let (host, port) = region.brokers[0].advertised.clone();
    let broker = format!("{host}:{port}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ferry-gateway")
        .build()?;
    rt.block_on(async move {
        if let Some(m) = spec.metrics {
            crate::telemetry::install(m)?;
        }
        let endpoint = link::endpoint(spec.quic, Some(server), client)?;
        let admin = tokio::net::TcpListener::bind(spec.admin)
            .await
            .with_context(|| format!("binding the admin API on {}", spec.admin))?;
        tracing::info!(region = %args.region, quic = %spec.quic, %broker, "ferry gateway listening on {}", spec.quic);
        let gw = Gateway::new(topo, args.region.clone(), broker, endpoint.clone());
        tokio::spawn(crate::mirror::admin::serve(gw.clone(), admin));
        tokio::select! {
            _ = gw.run() => {},
            _ = crate::cli::broker::shutdown_signal() => {
                tracing::info!("shutting down the gateway");
                endpoint.close(0u32.into(), b"shutdown");
                // Let the close reach the peers, but do not wait for their idle timeout.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), endpoint.wait_idle()).await;
            }
        }
        Ok(())
    })
}
