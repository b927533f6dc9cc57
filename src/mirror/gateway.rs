//! The gateway process: one QUIC endpoint that accepts the peers that mirror from us... and
//! dials the peers that mirror our topics.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchRequest, FetchTopic};
use kafka_protocol::messages::{BrokerId, TopicName};
use kafka_protocol::protocol::StrBytes;
use tokio::sync::watch;

use super::frame::{self, Frame};
use crate::batch;
use crate::client::Client;
use crate::kafka::mirror_append::MirrorAppend;
use crate::topology::Topology;
use crate::transport::link;

/// Bytes read per fetch and sent per BATCHES frame at most.
const CHUNK_BYTES: i32 = 1 << 20;
const RETRY: Duration = Duration::from_secs(1);
/// How often committed group offsets are shipped to the mirrors. After a failover, a consumer
/// group resumes at most this much (plus its own commit interval) behind where it was.
pub const OFFSET_SYNC_INTERVAL: Duration = Duration::from_secs(2);

/// A committed offset installed in a mirror never points past what the mirror holds.
pub fn clamp_offset(committed: i64, mirror_log_end: i64) -> i64 {
    committed.min(mirror_log_end)
}

/// Everything a gateway needs.
pub struct Gateway {
    pub topology: Arc<Topology>,
    pub region: String,
    /// The local broker's Kafka address.
    pub broker: String,
    pub endpoint: quinn::Endpoint,
}

impl Gateway {
    /// Run until the process ends.
    pub async fn run(self: Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move { me.accept_loop().await });
        // Peers that mirror at least one topic whose primary is this region.
        let peers: Vec<String> = self
            .topology
            .topics
            .iter()
            .filter(|r| r.primary == self.region)
            .flat_map(|r| r.mirrors.iter().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for peer in peers {
            let me = self.clone();
            tokio::spawn(async move { me.source_link(peer).await });
        }
        std::future::pending::<()>().await;
    }

    // ---- sink side ----------------------------------------------------------------------

    async fn accept_loop(self: Arc<Self>) {
        loop {
            match link::accept(&self.endpoint, &self.topology).await {
                Ok((peer, conn)) => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        loop {
                            match conn.accept_bi().await {
                                Ok((tx, rx)) => {
                                    let me = me.clone();
                                    let peer = peer.clone();
                                    tokio::spawn(async move {
                                        if let Err(e) = me.sink_stream(&peer, tx, rx).await {
                                            tracing::warn!(%peer, error = %e, "mirror stream ended");
                                        }
                                    });
                                }
                                Err(e) => {
                                    tracing::info!(%peer, error = %e, "peer connection closed");
                                    return;
                                }
                            }
                        }
                    });
                }
                Err(link::LinkError::EndpointClosed) => return,
                Err(e) if e.is_refusal() => {}
                Err(e) => tracing::warn!(error = %e, "accepting a peer failed"),
            }
        }
    }

    async fn sink_stream(
        &self,
        peer: &str,
        mut tx: quinn::SendStream,
        mut rx: quinn::RecvStream,
    ) -> Result<(), String> {
        let e = |x: std::io::Error| x.to_string();
        let (topic, partition, partition_count) = match frame::read(&mut rx).await.map_err(e)? {
            Some(Frame::Open {
                topic,
                partition,
                partition_count,
            }) => (topic, partition, partition_count),
            Some(f @ Frame::Offsets { .. }) => return self.sink_offsets(peer, f, tx, rx).await,
            _ => return Err("stream did not start with OPEN or OFFSETS".into()),
        };
        // Only topics this peer is primary for, and that this region mirrors.
        let allowed = self
            .topology
            .rule_for_topic(&topic)
            .map(|r| r.primary == peer && r.mirrors.contains(&self.region))
            .unwrap_or(false);
        if !allowed {
            let msg = format!(
                "region {peer} may not mirror topic '{topic}' into {}",
                self.region
            );
            let _ = frame::write(
                &mut tx,
                &Frame::Error {
                    code: 44,
                    log_end: -1,
                    message: msg.clone(),
                },
            )
            .await;
            return Err(msg);
        }
        let mut client = Client::connect(&self.broker)
            .await
            .map_err(|x| x.to_string())?;
        let mut req = MirrorAppend {
            topic: topic.clone(),
            partition,
            partition_count,
            records: Bytes::new(),
        };
        let (err, mut end, msg) = client
            .mirror_append(&req)
            .await
            .map_err(|x| x.to_string())?;
        if err != 0 {
            let _ = frame::write(
                &mut tx,
                &Frame::Error {
                    code: err,
                    log_end: end,
                    message: msg.clone(),
                },
            )
            .await;
            return Err(format!("{topic}-{partition}: {msg}"));
        }
        frame::write(&mut tx, &Frame::Position { log_end: end })
            .await
            .map_err(e)?;
        tracing::info!(%peer, %topic, partition, log_end = end, "mirroring partition");
        loop {
            let Some(f) = frame::read(&mut rx).await.map_err(e)? else {
                return Ok(());
            };
            let Frame::Batches {
                first_offset,
                batches,
            } = f
            else {
                return Err("expected BATCHES".into());
            };
            // Check every batch before writing any: CRC and continuity.
            let reply = match batch::split(&batches) {
                Err(x) => Frame::Error {
                    code: 2,
                    log_end: end,
                    message: format!("corrupt batch: {x}"),
                },
                Ok(parts) if parts.first().map(|(_, h)| h.base_offset) != Some(first_offset) => {
                    Frame::Error {
                        code: 2,
                        log_end: end,
                        message: "frame offset disagrees with its first batch".into(),
                    }
                }
                Ok(_) if first_offset > end => Frame::Error {
                    code: 1,
                    log_end: end,
                    message: format!(
                        "gap: batches start at {first_offset}, the mirror ends at {end}"
                    ),
                },
                Ok(_) => {
                    req.records = batches;
                    let (err, new_end, msg) = client
                        .mirror_append(&req)
                        .await
                        .map_err(|x| x.to_string())?;
                    if err == 0 {
                        end = new_end;
                        metrics::counter!("ferry_mirror_bytes_in_total", "topic" => topic.clone())
                            .increment(req.records.len() as u64);
                        metrics::gauge!("ferry_mirror_log_end_offset", "topic" => topic.clone(), "partition" => partition.to_string()).set(end as f64);
                        Frame::Ack { log_end: end }
                    } else {
                        Frame::Error {
                            code: err,
                            log_end: new_end.max(end),
                            message: msg,
                        }
                    }
                }
            };
            frame::write(&mut tx, &reply).await.map_err(e)?;
        }
    }

    /// Install a group's committed offsets from the primary, each clamped to what this mirror
    /// holds, so a consumer that moves here never skips a record it has not seen.
    async fn sink_offsets(
        &self,
        peer: &str,
        first: Frame,
        mut tx: quinn::SendStream,
        mut rx: quinn::RecvStream,
    ) -> Result<(), String> {
        let e = |x: std::io::Error| x.to_string();
        let mut client = Client::connect(&self.broker)
            .await
            .map_err(|x| x.to_string())?;
        let mut next = Some(first);
        loop {
            let f = match next.take() {
                Some(f) => f,
                None => match frame::read(&mut rx).await.map_err(e)? {
                    Some(f) => f,
                    None => return Ok(()),
                },
            };
            let Frame::Offsets { group, entries } = f else {
                return Err("expected OFFSETS".into());
            };
            let reply = match self
                .install_offsets(&mut client, peer, &group, entries)
                .await
            {
                Ok(n) => {
                    metrics::counter!("ferry_mirror_group_offsets_installed_total")
                        .increment(n as u64);
                    Frame::Ack { log_end: n as i64 }
                }
                Err(message) => {
                    tracing::debug!(%peer, %group, %message, "group offsets not installed");
                    Frame::Error {
                        code: -1,
                        log_end: -1,
                        message,
                    }
                }
            };
            frame::write(&mut tx, &reply).await.map_err(e)?;
        }
    }

    async fn install_offsets(
        &self,
        client: &mut Client,
        peer: &str,
        group: &str,
        entries: Vec<(String, i32, i64)>,
    ) -> Result<usize, String> {
        let mut by_topic: BTreeMap<String, Vec<(i32, i64)>> = BTreeMap::new();
        for (t, p, o) in entries {
            let ok = self
                .topology
                .rule_for_topic(&t)
                .map(|r| r.primary == peer && r.mirrors.contains(&self.region))
                .unwrap_or(false);
            if ok && o >= 0 {
                by_topic.entry(t).or_default().push((p, o));
            }
        }
        let mut commit: BTreeMap<String, Vec<(i32, i64)>> = BTreeMap::new();
        let mut n = 0;
        for (t, parts) in by_topic {
            // The mirror's log ends: offsets past them are clamped.
            let ps: Vec<i32> = parts.iter().map(|(p, _)| *p).collect();
            let ends = client
                .list_offsets(&t, &ps, -1)
                .await
                .map_err(|x| x.to_string())?;
            let clamped: Vec<(i32, i64)> = parts
                .into_iter()
                .filter_map(|(p, o)| ends.get(&p).map(|end| (p, clamp_offset(o, *end))))
                .collect();
            n += clamped.len();
            if !clamped.is_empty() {
                commit.insert(t, clamped);
            }
        }
        if commit.is_empty() {
            return Ok(0);
        }
        client
            .commit_offsets(group, &commit)
            .await
            .map_err(|x| format!("{x} (the group may be active in this region)"))?;
        Ok(n)
    }

    // ---- source side ----------------------------------------------------------------------

    /// Every [`OFFSET_SYNC_INTERVAL`], ship the committed offsets of every group for the topics
    /// `peer` mirrors.
    async fn offset_sync(
        self: Arc<Self>,
        peer: String,
        mut conn_rx: watch::Receiver<Option<quinn::Connection>>,
    ) {
        loop {
            let conn = loop {
                if let Some(c) = conn_rx.borrow_and_update().clone() {
                    break c;
                }
                if conn_rx.changed().await.is_err() {
                    return;
                }
            };
            if let Err(e) = self.offset_stream(&conn, &peer).await {
                tracing::debug!(%peer, error = %e, "offset sync interrupted");
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    async fn offset_stream(&self, conn: &quinn::Connection, peer: &str) -> Result<(), String> {
        use kafka_protocol::messages::list_groups_request::ListGroupsRequest;
        use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequest;
        use kafka_protocol::messages::GroupId;
        let e = |x: std::io::Error| x.to_string();
        let (mut tx, mut rx) = conn.open_bi().await.map_err(|x| x.to_string())?;
        let mut client = Client::connect(&self.broker)
            .await
            .map_err(|x| x.to_string())?;
        loop {
            let groups = client
                .send(&ListGroupsRequest::default(), 4)
                .await
                .map_err(|x| x.to_string())?
                .groups;
            for g in groups {
                let mut of = OffsetFetchRequest::default();
                of.group_id = GroupId(g.group_id.0.clone());
                of.topics = None;
                let resp = client.send(&of, 7).await.map_err(|x| x.to_string())?;
                let entries: Vec<(String, i32, i64)> = resp
                    .topics
                    .into_iter()
                    .filter(|t| {
                        self.topology
                            .rule_for_topic(t.name.0.as_str())
                            .map(|r| {
                                r.primary == self.region && r.mirrors.iter().any(|m| m == peer)
                            })
                            .unwrap_or(false)
                    })
                    .flat_map(|t| {
                        let name = t.name.0.to_string();
                        t.partitions
                            .into_iter()
                            .filter(|p| p.committed_offset >= 0)
                            .map(move |p| (name.clone(), p.partition_index, p.committed_offset))
                    })
                    .collect();
                if entries.is_empty() {
                    continue;
                }
                let group = g.group_id.0.to_string();
                frame::write(
                    &mut tx,
                    &Frame::Offsets {
                        group: group.clone(),
                        entries,
                    },
                )
                .await
                .map_err(e)?;
                match frame::read(&mut rx).await.map_err(e)? {
                    Some(Frame::Ack { .. }) => {}
                    Some(Frame::Error { message, .. }) => {
                        tracing::debug!(%peer, %group, %message, "peer did not install offsets")
                    }
                    other => return Err(format!("expected ACK, got {other:?}")),
                }
            }
            tokio::time::sleep(OFFSET_SYNC_INTERVAL).await;
        }
    }

    /// Keep a connection to `peer` and a stream per partition of every topic it mirrors.
    async fn source_link(self: Arc<Self>, peer: String) {
        let (conn_tx, conn_rx) = watch::channel::<Option<quinn::Connection>>(None);
        let me = self.clone();
        let p2 = peer.clone();
        tokio::spawn(async move {
            let mut backoff = RETRY;
            loop {
                match link::connect(&me.endpoint, &me.topology, &p2).await {
                    Ok(conn) => {
                        tracing::info!(peer = %p2, "connected to peer gateway");
                        backoff = RETRY;
                        let _ = conn_tx.send(Some(conn.clone()));
                        let reason = conn.closed().await;
                        tracing::warn!(peer = %p2, %reason, "peer connection lost: reconnecting");
                        let _ = conn_tx.send(None);
                    }
                    Err(e) => {
                        tracing::debug!(peer = %p2, error = %e, "could not reach peer gateway")
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        });
        {
            let me = self.clone();
            let rx = conn_rx.clone();
            let pr = peer.clone();
            tokio::spawn(async move { me.offset_sync(pr, rx).await });
        }
        // Discover topics and start one task per partition.
        let mut started: HashSet<(String, i32)> = HashSet::new();
        loop {
            match self.local_topics().await {
                Ok(topics) => {
                    for (topic, count) in topics {
                        let mirrored = self
                            .topology
                            .rule_for_topic(&topic)
                            .map(|r| r.primary == self.region && r.mirrors.contains(&peer))
                            .unwrap_or(false);
                        if !mirrored {
                            continue;
                        }
                        for p in 0..count {
                            if started.insert((topic.clone(), p)) {
                                let me = self.clone();
                                let rx = conn_rx.clone();
                                let (t, pr) = (topic.clone(), peer.clone());
                                tokio::spawn(async move {
                                    me.source_partition(pr, t, p, count, rx).await
                                });
                            }
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "local broker not reachable"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn local_topics(&self) -> Result<BTreeMap<String, i32>, String> {
        let mut c = Client::connect(&self.broker)
            .await
            .map_err(|e| e.to_string())?;
        c.topics().await.map_err(|e| e.to_string())
    }

    async fn source_partition(
        self: Arc<Self>,
        peer: String,
        topic: String,
        partition: i32,
        count: i32,
        mut conn_rx: watch::Receiver<Option<quinn::Connection>>,
    ) {
        loop {
            let conn = loop {
                if let Some(c) = conn_rx.borrow_and_update().clone() {
                    break c;
                }
                if conn_rx.changed().await.is_err() {
                    return;
                }
            };
            if let Err(e) = self
                .source_stream(&conn, &peer, &topic, partition, count)
                .await
            {
                tracing::info!(%peer, %topic, partition, error = %e, "mirror stream interrupted: resuming");
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    async fn source_stream(
        &self,
        conn: &quinn::Connection,
        peer: &str,
        topic: &str,
        partition: i32,
        count: i32,
    ) -> Result<(), String> {
        let e = |x: std::io::Error| x.to_string();
        let (mut tx, mut rx) = conn.open_bi().await.map_err(|x| x.to_string())?;
        frame::write(
            &mut tx,
            &Frame::Open {
                topic: topic.to_string(),
                partition,
                partition_count: count,
            },
        )
        .await
        .map_err(e)?;
        let mut next = match frame::read(&mut rx).await.map_err(e)? {
            Some(Frame::Position { log_end }) => log_end,
            Some(Frame::Error { message, .. }) => {
                return Err(format!("refused by the mirror: {message}"))
            }
            other => return Err(format!("expected POSITION, got {other:?}")),
        };
        let mut client = Client::connect(&self.broker)
            .await
            .map_err(|x| x.to_string())?;
        let _ = client.mirror_ack(topic, partition, peer, next).await;
        loop {
            let (err, bytes, source_end) = fetch_raw(&mut client, topic, partition, next).await?;
            if err != 0 {
                return Err(format!("fetch {topic}-{partition} at {next}: error {err}"));
            }
            let labels = [
                ("peer", peer.to_string()),
                ("topic", topic.to_string()),
                ("partition", partition.to_string()),
            ];
            metrics::gauge!("ferry_mirror_source_end_offset", &labels).set(source_end as f64);
            metrics::gauge!("ferry_mirror_acked_offset", &labels).set(next as f64);
            metrics::gauge!("ferry_mirror_lag_records", &labels)
                .set((source_end - next).max(0) as f64);
            // Whole batches from `next` on; a partial batch at the end waits for the next fetch.
            let mut end_at = 0usize;
            let mut first = None;
            let mut at = 0usize;
            while at + batch::HEADER_BYTES <= bytes.len() {
                let Ok(h) = batch::BatchHeader::parse(&bytes[at..]) else {
                    break;
                };
                let n = h.total_bytes();
                if at + n > bytes.len() {
                    break;
                }
                if h.next_offset() <= next {
                    at += n;
                    end_at = at;
                    continue;
                }
                if first.is_none() {
                    first = Some((at, h.base_offset));
                }
                at += n;
                end_at = at;
            }
            let Some((start_at, first_offset)) = first else {
                metrics::gauge!("ferry_mirror_lag_seconds", &labels).set(0.0);
                continue;
            };
            // Age of the oldest record the mirror does not have yet.
            if let Ok(h) = batch::BatchHeader::parse(&bytes[start_at..]) {
                let age = (crate::log::now_ms() - h.base_timestamp).max(0) as f64 / 1000.0;
                metrics::gauge!("ferry_mirror_lag_seconds", &labels).set(age);
            }
            let chunk = bytes.slice(start_at..end_at);
            let sent = chunk.len();
            frame::write(
                &mut tx,
                &Frame::Batches {
                    first_offset,
                    batches: chunk,
                },
            )
            .await
            .map_err(e)?;
            match frame::read(&mut rx).await.map_err(e)? {
                Some(Frame::Ack { log_end }) => {
                    assert!(log_end >= next, "the mirror's end never goes back");
                    next = log_end;
                    // The local broker answers acks=all produces of synchronously mirrored
                    // topics once every such mirror holds them.
                    let err = client
                        .mirror_ack(topic, partition, peer, next)
                        .await
                        .map_err(|x| x.to_string())?;
                    if err != 0 {
                        tracing::debug!(%topic, partition, err, "broker did not take the mirror acknowledgement");
                    }
                    metrics::gauge!("ferry_mirror_acked_offset", &labels).set(next as f64);
                    metrics::gauge!("ferry_mirror_lag_records", &labels)
                        .set((source_end - next).max(0) as f64);
                    metrics::counter!("ferry_mirror_bytes_out_total", "topic" => topic.to_string())
                        .increment(sent as u64);
                }
                Some(Frame::Error {
                    code,
                    log_end,
                    message,
                }) => {
                    return Err(format!("mirror refused batches at {first_offset} (error {code}, mirror ends at {log_end}): {message}"));
                }
                other => return Err(format!("expected ACK, got {other:?}")),
            }
        }
    }
}

/// Fetch raw record batches from the local broker (long poll, 500 ms).
async fn fetch_raw(
    c: &mut Client,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<(i16, Bytes, i64), String> {
    let mut req = FetchRequest::default();
    req.replica_id = BrokerId(-1);
    req.max_wait_ms = 500;
    req.min_bytes = 1;
    req.max_bytes = CHUNK_BYTES;
    let mut ft = FetchTopic::default();
    ft.topic = TopicName(StrBytes::from_string(topic.to_string()));
    let mut fp = FetchPartition::default();
    fp.partition = partition;
    fp.fetch_offset = offset;
    fp.partition_max_bytes = CHUNK_BYTES;
    ft.partitions.push(fp);
    req.topics.push(ft);
    let resp = c.send(&req, 11).await.map_err(|e| e.to_string())?;
    let p = resp
        .responses
        .into_iter()
        .next()
        .and_then(|t| t.partitions.into_iter().next())
        .ok_or("empty fetch response")?;
    Ok((
        p.error_code,
        p.records.unwrap_or_default(),
        p.high_watermark,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installed_offsets_never_pass_the_mirror_end() {
        assert_eq!(clamp_offset(120, 100), 100);
        assert_eq!(clamp_offset(80, 100), 80);
        assert_eq!(clamp_offset(0, 0), 0);
    }
}
