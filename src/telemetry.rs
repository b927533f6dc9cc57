//! Prometheus metrics: the exporter, histogram buckets, and gauges sampled from broker state.
//!
//! Counters and histograms are recorded where things happen (`metrics::counter!` in the produce,
//! fetch and request paths, the fsync in the group commit writer); this module serves them over
//! HTTP and refreshes the gauges that describe state (log end offsets, groups).
//!
//! Names: `ferry_bytes_in_total{topic}`, `ferry_records_in_total{topic}`,
//! `ferry_bytes_out_total{topic}`, `ferry_requests_total{api}`, `ferry_request_seconds{api}`,
//! `ferry_fsync_seconds`, `ferry_fsync_total`, `ferry_connections`,
//! `ferry_log_end_offset{topic,partition}`, `ferry_log_start_offset{topic,partition}`,
//! `ferry_log_size_bytes{topic,partition}`, `ferry_groups`, `ferry_group_members{group}`,
//! `ferry_produce_rejected_total{reason}`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;

use crate::broker::Broker;

/// Latency buckets in seconds: 50 µs to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Serve `/metrics` on `addr` (must be called inside a tokio runtime).
pub fn install(addr: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(SECONDS_BUCKETS)?
        .install()?;
    metrics::describe_counter!(
        "ferry_bytes_in_total",
        "Record batch bytes produced, per topic"
    );
    metrics::describe_counter!("ferry_records_in_total", "Records produced, per topic");
    metrics::describe_counter!(
        "ferry_bytes_out_total",
        "Record batch bytes fetched, per topic"
    );
    metrics::describe_counter!("ferry_requests_total", "Kafka requests, per API");
    metrics::describe_histogram!("ferry_request_seconds", "Kafka request latency, per API");
    metrics::describe_histogram!(
        "ferry_fsync_seconds",
        "Duration of one group commit fsync round"
    );
    metrics::describe_gauge!("ferry_connections", "Open client connections");
    metrics::describe_gauge!("ferry_log_end_offset", "Log end offset per partition");
    metrics::describe_gauge!("ferry_groups", "Consumer groups known to the coordinator");
    tracing::info!(%addr, "serving Prometheus metrics on http://{addr}/metrics");
    Ok(())
}

/// Refresh state gauges every `every`.
pub fn spawn_gauges(broker: Arc<Broker>, every: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            for t in broker.topics() {
                for p in t.partitions.read().expect("topic lock").iter() {
                    let (start, end, size) = {
                        let st = p.state.lock().expect("partition lock");
                        (
                            st.log.start_offset(),
                            st.log.next_offset(),
                            st.log.size_bytes(),
                        )
                    };
                    let labels = [
                        ("topic", t.name.clone()),
                        ("partition", p.index.to_string()),
                    ];
                    metrics::gauge!("ferry_log_end_offset", &labels).set(end as f64);
                    metrics::gauge!("ferry_log_start_offset", &labels).set(start as f64);
                    metrics::gauge!("ferry_log_size_bytes", &labels).set(size as f64);
                }
            }
            let groups: Vec<(String, usize)> = broker.groups().with(|c| {
                c.groups()
                    .map(|g| (g.id.clone(), g.members.len()))
                    .collect()
            });
            metrics::gauge!("ferry_groups").set(groups.len() as f64);
            for (g, n) in groups {
                metrics::gauge!("ferry_group_members", "group" => g).set(n as f64);
            }
        }
    });
}
