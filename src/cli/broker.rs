//! `ferry broker`: run one broker as a process.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use crate::broker::Broker;
use crate::config::{parse_host_port, BrokerConfig, BrokerFile};
use crate::units::{parse_duration, parse_size};

#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// Settings file (TOML); flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Take this broker's settings from a topology file (with --region and --broker);
    /// --data-dir is then the root of every region's data.
    #[arg(long, value_name = "FILE", requires_all = ["region", "broker"])]
    pub topology: Option<PathBuf>,
    /// The region of this broker in the topology.
    #[arg(long)]
    pub region: Option<String>,
    /// This broker's id in its region of the topology.
    #[arg(long)]
    pub broker: Option<i32>,
    /// Address for Kafka clients.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Address given to clients in Metadata (default: the listen address).
    #[arg(long, value_name = "HOST:PORT")]
    pub advertised: Option<String>,
    /// Directory for partition logs and broker metadata.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// This broker's node id.
    #[arg(long)]
    pub node_id: Option<i32>,
    /// Roll segments at this size (e.g. 1GiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub segment_bytes: Option<u64>,
    /// Roll segments at this age (e.g. 7d).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub segment_age: Option<std::time::Duration>,
    /// Delete segments older than this (e.g. 7d, or "off").
    #[arg(long, value_name = "DURATION|off")]
    pub retention_time: Option<String>,
    /// Keep at most this many bytes per partition (e.g. 10GiB, or "off").
    #[arg(long, value_name = "SIZE|off")]
    pub retention_bytes: Option<String>,
    /// Partitions of auto-created topics and of CreateTopics without a count.
    #[arg(long, value_name = "N")]
    pub default_partitions: Option<i32>,
    /// Serve Prometheus metrics on this address (`/metrics`).
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,
    /// Wait this long after the first member joins an empty consumer group for others before
    /// its first rebalance (e.g. 0s, 3s; Kafka's group.initial.rebalance.delay.ms).
    #[arg(long, value_name = "DURATION")]
    pub group_initial_rebalance_delay: Option<String>,
    /// Create topics when clients ask for unknown ones.
    #[arg(long, value_name = "true|false", action = clap::ArgAction::Set)]
    pub auto_create: Option<bool>,
    /// Join a region cluster whose metadata is in this etcd (client URLs, comma-separated;
    /// docs/cluster.md). Without it the broker is alone in its region.
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// The region cluster's name (its keys in etcd are under /ferry/NAME/).
    #[arg(long, value_name = "NAME", requires = "etcd")]
    pub cluster: Option<String>,
    /// Replicas of topics created without a replication factor (default 3).
    #[arg(long, value_name = "N")]
    pub replication_factor: Option<i32>,
    /// min.insync.replicas of topics that do not set it (default 1).
    #[arg(long, value_name = "N")]
    pub min_insync_replicas: Option<usize>,
    /// A follower not caught up for this long leaves the ISR (default 30s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub replica_lag_max: Option<std::time::Duration>,
    /// A broker silent this long is dead to the cluster (default 6s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub session_timeout: Option<std::time::Duration>,
}

impl BrokerArgs {
    pub fn to_config(&self) -> anyhow::Result<BrokerConfig> {
        let mut c = BrokerConfig::default();
        let mut data_dir = self.data_dir.clone();
        if let (Some(path), Some(region), Some(id)) = (&self.topology, &self.region, self.broker) {
            let t = crate::cli::load_topology(path)?;
            let root = data_dir
                .take()
                .unwrap_or_else(|| PathBuf::from("ferry-data"));
            c = t.broker_config(region, id, &root)?;
            // The internal door needs the region's certificate. A region with a gateway cannot
            // work without it; one without a gateway serves no internal requests if it has none.
            match crate::cli::region_material(&t, region) {
                Ok(m) => {
                    c.internal = Some(crate::config::InternalDoor {
                        tls: crate::transport::trust::tcp_server_config(&m)?,
                        region: region.clone(),
                        client: crate::transport::trust::TlsTarget::new(
                            crate::transport::trust::tcp_client_config(&m)?,
                            region,
                        ),
                    })
                }
                Err(e) if t.region(region).is_some_and(|r| r.gateway.is_some()) => {
                    return Err(e.context(format!(
                        "region {region} has a gateway, which reaches its broker only through the internal door (mutual TLS)"
                    )))
                }
                Err(e) => {
                    tracing::info!(error = %format!("{e:#}"), "no certificate: this broker serves no internal requests")
                }
            }
            c.topology = Some(std::sync::Arc::new(t));
            c.region = Some(region.clone());
        }
        if let Some(path) = &self.config {
            BrokerFile::load(path)?.apply(&mut c)?;
        }
        let f = BrokerFile {
            listen: self.listen.clone(),
            advertised: self.advertised.clone(),
            data_dir,
            node_id: self.node_id,
            default_partitions: self.default_partitions,
            auto_create_topics: self.auto_create,
            retention_time: self
                .retention_time
                .clone()
                .map(crate::config::DurOrNum::Text),
            retention_bytes: self
                .retention_bytes
                .clone()
                .map(crate::config::SizeOrNum::Text),
            metrics: self.metrics.clone(),
            group_initial_rebalance_delay: self
                .group_initial_rebalance_delay
                .clone()
                .map(crate::config::DurOrNum::Text),
            ..Default::default()
        };
        f.apply(&mut c).context("invalid flag")?;
        if let Some(b) = self.segment_bytes {
            c.log.segment_bytes = b;
        }
        if let Some(a) = self.segment_age {
            c.log.segment_age = a;
        }
        if let Some(a) = &self.advertised {
            c.advertised = Some(parse_host_port(a).map_err(anyhow::Error::msg)?);
        }
        if !self.etcd.is_empty() {
            let mut cs = c.cluster.take().unwrap_or_default();
            cs.etcd = self.etcd.clone();
            if let Some(n) = &self.cluster {
                cs.name = n.clone();
            } else if let Some(r) = &c.region {
                cs.name = r.clone();
            }
            c.cluster = Some(cs);
        }
        if let Some(cs) = c.cluster.as_mut() {
            if let Some(n) = self.replication_factor {
                cs.default_replication_factor = n;
            }
            if let Some(n) = self.min_insync_replicas {
                cs.min_insync_replicas = n;
            }
            if let Some(d) = self.replica_lag_max {
                cs.replica_lag_max = d;
            }
            if let Some(d) = self.session_timeout {
                cs.session_timeout = d;
            }
        } else if self.replication_factor.is_some()
            || self.min_insync_replicas.is_some()
            || self.replica_lag_max.is_some()
            || self.session_timeout.is_some()
        {
            anyhow::bail!(
                "--replication-factor, --min-insync-replicas, --replica-lag-max and \
                 --session-timeout apply to a region cluster: add --etcd, or start a broker of a \
                 topology region that has `[regions.R.etcd]`"
            );
        }
        c.validate()?;
        Ok(c)
    }
}

pub fn run(args: BrokerArgs) -> anyhow::Result<()> {
    let config = args.to_config()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ferry-io")
        .build()
        .context("starting the runtime")?;
    rt.block_on(serve(config))
}

/// A future that completes on Ctrl-C (SIGINT) or SIGTERM. The handlers are installed when this
/// is called, not when the future is first polled, so no signal slips through in between.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = int.recv() => {},
            _ = term.recv() => {},
        }
    }
}

/// Open the data directory, listen, and serve until a shutdown signal.
pub async fn serve(config: BrokerConfig) -> anyhow::Result<()> {
    if let Some(addr) = config.metrics {
        crate::telemetry::install(addr).context("starting the metrics endpoint")?;
    }
    let data_dir = config.data_dir.clone();
    let listen = config.listen;
    let started = std::time::Instant::now();
    let broker = tokio::task::block_in_place(|| Broker::open(config))
        .with_context(|| format!("opening data directory {}", data_dir.display()))?;
    broker.set_peers(Arc::new(Peers {
        door: broker.config.internal.as_ref().map(|d| d.client.clone()),
    }));
    tracing::info!(
        data_dir = %data_dir.display(),
        topics = broker.topics().len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "recovered data directory"
    );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the Kafka listener {listen}"))?;
    let (host, port) = broker.config.advertised();
    tracing::info!(%listen, advertised = %format!("{host}:{port}"), "ferry broker listening on {listen}");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    if let Some(cs) = &broker.config.cluster {
        let link = crate::broker::cluster::join(&broker, stopped)
            .await
            .with_context(|| {
                format!(
                    "joining region cluster '{}' through etcd at {}",
                    cs.name,
                    cs.etcd.join(",")
                )
            })?;
        crate::follower::spawn(broker.clone(), link);
        tracing::info!(cluster = %cs.name, node_id = broker.config.node_id, "joined the region cluster");
    }
    spawn_retention(broker.clone());
    crate::broker::cleaner::spawn(broker.clone());
    broker.groups().spawn_ticker();
    broker.groups().spawn_snapshot_writer();
    broker.txns().start();
    crate::telemetry::spawn_gauges(broker.clone(), std::time::Duration::from_secs(5));
    crate::kafka::server::run(listener, broker.clone(), shutdown_signal()).await?;
    // Leave the cluster at once (the lease is revoked): leaderships move now, not after the
    // session timeout.
    let _ = stop.send(true);
    if let Some(link) = broker.cluster() {
        link.left().await;
    }
    tracing::info!("shutting down: syncing partitions");
    tokio::task::block_in_place(|| broker.sync_all());
    Ok(())
}

fn spawn_retention(broker: Arc<Broker>) {
    let every = broker.config.retention_check_interval;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            let b = broker.clone();
            let _ = tokio::task::spawn_blocking(move || b.enforce_retention()).await;
        }
    });
}

/// How this broker reaches the other brokers of its cluster as a client (see
/// [`crate::broker::quarantine::RegionPeers`]): Kafka Produce at a partition's leader, and
/// FerryControl at another broker's internal door with the region's certificate.
struct Peers {
    door: Option<crate::transport::trust::TlsTarget>,
}

impl crate::broker::quarantine::RegionPeers for Peers {
    fn produce(
        &self,
        brokers: Vec<String>,
        topic: String,
        partition: i32,
        batch: Vec<u8>,
    ) -> crate::broker::quarantine::PeerFuture<()> {
        Box::pin(async move {
            let mut c = crate::client::RegionClient::new("this cluster", brokers, None);
            let (code, _) = c
                .produce(&topic, partition, batch.into(), -1, 30_000)
                .await
                .map_err(|e| e.to_string())?;
            if code != 0 {
                return Err(crate::client::error_name(code));
            }
            Ok(())
        })
    }

    fn rewind_commits(
        &self,
        addr: String,
        topic: String,
        partition: i32,
        offset: i64,
    ) -> crate::broker::quarantine::PeerFuture<usize> {
        let door = self.door.clone();
        Box::pin(async move {
            let req = crate::kafka::control::Control::RewindCommits {
                topic,
                partition,
                offset,
            };
            let v = door_control(door, &addr, &req).await?;
            Ok(v["moved"].as_u64().unwrap_or(0) as usize)
        })
    }

    fn abort_orphans(
        &self,
        addr: String,
        topics: Vec<String>,
    ) -> crate::broker::quarantine::PeerFuture<Vec<crate::broker::txns::OrphanAbort>> {
        let door = self.door.clone();
        Box::pin(async move {
            let req = crate::kafka::control::Control::AbortOrphans { topics };
            let v = door_control(door, &addr, &req).await?;
            serde_json::from_value(v["aborted_transactions"].clone()).map_err(|e| e.to_string())
        })
    }

    fn settle_fenced(
        &self,
        addr: String,
        topics: Vec<String>,
    ) -> crate::broker::quarantine::PeerFuture<Vec<String>> {
        let door = self.door.clone();
        Box::pin(async move {
            let req = crate::kafka::control::Control::SettleFenced { topics };
            let v = door_control(door, &addr, &req).await?;
            serde_json::from_value(v["aborted_transactions"].clone()).map_err(|e| e.to_string())
        })
    }

    fn write_txn_markers(
        &self,
        addr: String,
        marker: crate::broker::markers::TxnMarker,
    ) -> crate::broker::quarantine::PeerFuture<Vec<((String, i32), i16)>> {
        use kafka_protocol::messages::write_txn_markers_request::{
            WritableTxnMarker, WritableTxnMarkerTopic, WriteTxnMarkersRequest,
        };
        let door = self.door.clone();
        Box::pin(async move {
            let mut topics: std::collections::BTreeMap<String, Vec<i32>> = Default::default();
            for (t, p) in &marker.partitions {
                topics.entry(t.clone()).or_default().push(*p);
            }
            let m = WritableTxnMarker::default()
                .with_producer_id(kafka_protocol::messages::ProducerId(marker.producer_id))
                .with_producer_epoch(marker.epoch)
                .with_transaction_result(marker.commit)
                .with_coordinator_epoch(marker.coordinator_epoch)
                .with_topics(
                    topics
                        .into_iter()
                        .map(|(t, ps)| {
                            WritableTxnMarkerTopic::default()
                                .with_name(kafka_protocol::messages::TopicName(
                                    kafka_protocol::protocol::StrBytes::from_string(t),
                                ))
                                .with_partition_indexes(ps)
                        })
                        .collect(),
                );
            let req = WriteTxnMarkersRequest::default().with_markers(vec![m]);
            let mut c = peer_client(&addr, door.as_ref()).await?;
            let resp = c.send(&req, 1).await.map_err(|e| e.to_string())?;
            Ok(resp
                .markers
                .iter()
                .flat_map(|m| {
                    m.topics.iter().flat_map(|t| {
                        t.partitions
                            .iter()
                            .map(|p| ((t.name.0.to_string(), p.partition_index), p.error_code))
                    })
                })
                .collect())
        })
    }

    fn verify_txn(
        &self,
        addr: String,
        transactional_id: String,
        producer_id: i64,
        epoch: i16,
        topic: String,
        partition: i32,
    ) -> crate::broker::quarantine::PeerFuture<i16> {
        use kafka_protocol::messages::add_partitions_to_txn_request::{
            AddPartitionsToTxnRequest, AddPartitionsToTxnTopic, AddPartitionsToTxnTransaction,
        };
        let door = self.door.clone();
        Box::pin(async move {
            let t = AddPartitionsToTxnTransaction::default()
                .with_transactional_id(kafka_protocol::messages::TransactionalId(
                    kafka_protocol::protocol::StrBytes::from_string(transactional_id),
                ))
                .with_producer_id(kafka_protocol::messages::ProducerId(producer_id))
                .with_producer_epoch(epoch)
                .with_verify_only(true)
                .with_topics(vec![AddPartitionsToTxnTopic::default()
                    .with_name(kafka_protocol::messages::TopicName(
                        kafka_protocol::protocol::StrBytes::from_string(topic),
                    ))
                    .with_partitions(vec![partition])]);
            let req = AddPartitionsToTxnRequest::default().with_transactions(vec![t]);
            let mut c = peer_client(&addr, door.as_ref()).await?;
            let resp = c.send(&req, 4).await.map_err(|e| e.to_string())?;
            if resp.error_code != 0 {
                return Ok(resp.error_code);
            }
            let code = resp
                .results_by_transaction
                .iter()
                .flat_map(|r| r.topic_results.iter())
                .flat_map(|t| t.results_by_partition.iter())
                .map(|p| p.partition_error_code)
                .next()
                .unwrap_or(-1);
            Ok(code)
        })
    }
}

/// Send FerryControl `req` to another broker's internal door (with the region's certificate).
async fn door_control(
    door: Option<crate::transport::trust::TlsTarget>,
    addr: &str,
    req: &crate::kafka::control::Control,
) -> Result<serde_json::Value, String> {
    let door = door
        .ok_or("this broker has no region certificate to reach another broker's internal door")?;
    let mut c = crate::client::Client::connect_internal(addr, &door)
        .await
        .map_err(|e| e.to_string())?;
    c.control(req).await.map_err(|e| e.to_string())
}

/// A connection to another broker of the cluster: through its internal door when this broker
/// has the region's certificate, else on its Kafka listener.
async fn peer_client(
    addr: &str,
    door: Option<&crate::transport::trust::TlsTarget>,
) -> Result<crate::client::Client, String> {
    let c = match door {
        Some(d) => crate::client::Client::connect_internal(addr, d).await,
        None => crate::client::Client::connect(addr).await,
    };
    let mut c = c.map_err(|e| e.to_string())?;
    c.timeout = std::time::Duration::from_secs(15);
    Ok(c)
}
