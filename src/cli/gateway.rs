//! `ferry gateway --topology FILE --region R`: run one region's mirroring gateway.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use crate::mirror::gateway::Gateway;
use crate::transport::{link, tls, trust};

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Topology file.
    #[arg(long, default_value = "topology/local.toml")]
    pub topology: PathBuf,
    /// This gateway's region.
    #[arg(long)]
    pub region: String,
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
    // The region's certificate: for the QUIC link, the broker's internal door (as a client)
    // and the admin API (as a server).
    let material = crate::cli::region_material(&topo, &args.region)?;
    let settings = tls::TransportSettings::default();
    let mut server = tls::server_config(&material, &settings)?;
    // Bound handshakes in progress and what they may buffer (`[limits]` caps connections).
    server
        .max_incoming(topo.limits.connections_max.min(4096))
        .incoming_buffer_size(1 << 20)
        .incoming_buffer_size_total(64 << 20);
    let internal = trust::TlsTarget::new(trust::tcp_client_config(&material)?, &args.region);
    let admin_tls = trust::tcp_server_config(&material)?;
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
        let gw = Gateway::new(topo, args.region.clone(), broker, internal, endpoint.clone());
        tokio::spawn(crate::mirror::admin::serve(gw.clone(), admin, admin_tls));
        gw.run(async {
            crate::cli::broker::shutdown_signal().await;
            tracing::info!("shutting down the gateway");
        })
        .await;
        Ok(())
    })
}
