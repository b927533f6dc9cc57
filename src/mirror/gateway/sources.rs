//! The gateway's source side: a connection to every peer (and a second one for the second
//! copy of `wire_copies = 2` rules), one stream per partition it ships, pipelined BATCHES frames
//! each on a QUIC stream of its own, FEC recovery shards, and the second copy. The decisions
//! are [`crate::mirror::core::source`]'s; this is their I/O.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use super::*;
use crate::client::Client;
use crate::failover::{self};
use crate::mirror::core::source;
use crate::mirror::fec;
use crate::mirror::frame::{self, Frame};
use crate::topology::WireCompression;
use crate::transport::link;

impl Gateway {
    /// Keep a connection to `peer` and a stream per partition of every topic it mirrors (plus
    /// a second connection for the second copy of topics with `wire_copies = 2`).
    pub(super) async fn source_link(self: Arc<Self>, peer: String) {
        // Every task of this link: dropped (aborted) with it when the gateway stops.
        let mut tasks = tokio::task::JoinSet::new();
        let (conn_tx, conn_rx) = watch::channel::<Option<quinn::Connection>>(None);
        tasks.spawn(self.clone().keep_connected(peer.clone(), conn_tx, "peer"));
        let copies_rx = if self.sends_copies_to(&peer) {
            let (tx, rx) = watch::channel::<Option<quinn::Connection>>(None);
            tasks.spawn(self.clone().keep_connected(peer.clone(), tx, "second-copy"));
            Some(rx)
        } else {
            None
        };
        tasks.spawn(self.clone().offset_sync(peer.clone(), conn_rx.clone()));
        tasks.spawn(self.clone().heartbeats(peer.clone(), conn_rx.clone()));
        // Discover topics and start one task per partition this region ships to `peer`; a
        // task ends when a failover moves the topic away, and starts again if it comes back.
        let started: Arc<Mutex<HashSet<(String, i32)>>> = Arc::default();
        loop {
            while tasks.try_join_next().is_some() {}
            match self.local_topics().await {
                Ok(topics) => {
                    for (topic, count) in topics {
                        if !self.ships(&topic, &peer) {
                            continue;
                        }
                        for p in 0..count {
                            if started
                                .lock()
                                .expect("started lock")
                                .insert((topic.clone(), p))
                            {
                                let me = self.clone();
                                let rx = conn_rx.clone();
                                let copies = copies_rx.clone();
                                let (t, pr) = (topic.clone(), peer.clone());
                                let started = started.clone();
                                tasks.spawn(async move {
                                    me.source_partition(pr, t.clone(), p, count, rx, copies)
                                        .await;
                                    started.lock().expect("started lock").remove(&(t, p));
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

    /// Dial `peer` and keep the connection up (reconnecting with backoff), publishing it on
    /// `conn_tx` (`None` while down). `what` names the connection in the log.
    pub(super) async fn keep_connected(
        self: Arc<Self>,
        peer: String,
        conn_tx: watch::Sender<Option<quinn::Connection>>,
        what: &'static str,
    ) {
        let mut backoff = RETRY;
        loop {
            if self.is_cut(&peer) {
                tokio::time::sleep(RETRY).await;
                continue;
            }
            match link::connect(&self.endpoint, &self.topology, &peer).await {
                Ok(conn) => {
                    self.track(&peer, &conn);
                    tracing::info!(%peer, connection = what, "connected to peer gateway");
                    backoff = RETRY;
                    let _ = conn_tx.send(Some(conn.clone()));
                    let reason = conn.closed().await;
                    tracing::warn!(%peer, connection = what, %reason, "peer connection lost: reconnecting");
                    let _ = conn_tx.send(None);
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "could not reach peer gateway")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// Whether some rule this region may ship to `peer` (as primary now or after a failover)
    /// asks for two copies on the wire.
    pub(super) fn sends_copies_to(&self, peer: &str) -> bool {
        self.topology.topics.iter().any(|r| {
            let regions = failover::rule_regions(r);
            r.wire_copies > 1 && regions.contains(&self.region) && regions.iter().any(|x| x == peer)
        })
    }

    pub(super) async fn local_topics(&self) -> Result<BTreeMap<String, i32>, String> {
        let mut c = self.plain_client().await?;
        c.topics().await.map_err(|e| e.to_string())
    }

    pub(super) async fn source_partition(
        self: Arc<Self>,
        peer: String,
        topic: String,
        partition: i32,
        count: i32,
        mut conn_rx: watch::Receiver<Option<quinn::Connection>>,
        copies_rx: Option<watch::Receiver<Option<quinn::Connection>>>,
    ) {
        loop {
            if !self.ships(&topic, &peer) {
                tracing::info!(%peer, %topic, partition, "no longer shipped from here (failover)");
                return;
            }
            let Some(conn) = next_connection(&mut conn_rx).await else {
                return;
            };
            if let Err(e) = self
                .source_stream(&conn, copies_rx.clone(), &peer, &topic, partition, count)
                .await
            {
                tracing::info!(%peer, %topic, partition, error = %e, "mirror stream interrupted: resuming");
                // In a region cluster the leader may have moved: look it up again.
                self.forget_leader(&topic, partition);
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    pub(super) async fn source_stream(
        &self,
        conn: &quinn::Connection,
        copies_rx: Option<watch::Receiver<Option<quinn::Connection>>>,
        peer: &str,
        topic: &str,
        partition: i32,
        count: i32,
    ) -> Result<(), String> {
        let e = |x: std::io::Error| x.to_string();
        let epoch = self
            .placement(topic)
            .map(|p| p.epoch)
            .ok_or("no rule for the topic")?;
        let (mut tx, mut rx) = conn.open_bi().await.map_err(|x| x.to_string())?;
        frame::write(
            &mut tx,
            &Frame::Open {
                topic: topic.to_string(),
                partition,
                partition_count: count,
                epoch,
            },
        )
        .await
        .map_err(e)?;
        let (route_id, route) = read_route(&mut rx).await?;
        // Where the mirror ends, and whether its tail is in our history (a rejoining region's
        // may not be): if not, have it quarantined and cut first.
        let mut stream: source::SourceStream<Wire> =
            source::SourceStream::open(epoch, source::WINDOW);
        let next = loop {
            let (log_end, theirs) = match frame::read(&mut rx).await.map_err(e)? {
                Some(Frame::Position { log_end, epochs }) => (log_end, epochs),
                Some(Frame::Error { message, .. }) => {
                    return Err(format!("refused by the mirror: {message}"))
                }
                other => return Err(format!("expected POSITION, got {other:?}")),
            };
            let o = self.offsets(vec![topic.to_string()]).await?;
            let ours = o
                .topics
                .get(topic)
                .and_then(|ps| ps.iter().find(|p| p.partition == partition))
                .cloned()
                .ok_or("partition vanished")?;
            match stream.on_position(log_end, &theirs, ours.log_end, &ours.epochs) {
                source::Reconcile::Stream { from } => break from,
                source::Reconcile::Truncate(d) => {
                    tracing::warn!(%peer, %topic, partition, mirror_end = log_end, diverges_at = d,
                        "the mirror's tail is not in this region's history: it will be quarantined");
                    frame::write(&mut tx, &Frame::Truncate { offset: d })
                        .await
                        .map_err(e)?;
                }
            }
        };
        // Pipelined from here on: the sender fetches and sends while earlier frames are still
        // being appended in the mirror, within `source::WINDOW`; the ack reader turns
        // the mirror's durable ends into sync-mode acknowledgements on the local broker.
        // From the partition's leader (in a region cluster), which answers reads below its
        // high watermark only: what this region's in-sync replicas all hold.
        let leader = self.leader_of(topic, partition).await?;
        let mut fetch_client = Client::connect(&leader).await.map_err(|x| x.to_string())?;
        let mut ack_client = self.leader_client(topic, partition).await?;
        let _ = ack_client.mirror_ack(topic, partition, peer, next).await;
        let labels = [
            ("peer", peer.to_string()),
            ("topic", topic.to_string()),
            ("partition", partition.to_string()),
        ];
        let snappy = self
            .topology
            .rule_for_topic(topic)
            .is_some_and(|r| r.wire_compression == WireCompression::Snappy);
        let fec_percent = self
            .topology
            .rule_for_topic(topic)
            .map_or(0, |r| r.wire_fec);
        let copies = copies_rx.filter(|_| {
            self.topology
                .rule_for_topic(topic)
                .is_some_and(|r| r.wire_copies > 1)
        });
        let (acked_tx, mut acked_rx) = watch::channel(next);
        let (sent_tx, sent_rx) = watch::channel(next);
        let source_end = AtomicI64::new(next);
        // The stream's state: the window, the frames sent and not acknowledged yet (what a
        // second copy of the stream sends from), the acknowledged end.
        let stream = Mutex::new(stream);
        // Acknowledged ends, from this stream and from the second copy's.
        let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<i64>();
        let sender = async {
            loop {
                acked_rx.borrow_and_update();
                let (room, sent, inflight_bytes) = {
                    let s = stream.lock().expect("stream lock");
                    (s.has_room(), s.sent(), s.in_flight().1)
                };
                if !room {
                    acked_rx
                        .changed()
                        .await
                        .map_err(|_| "the ack reader ended".to_string())?;
                    continue;
                }
                let ships_at = self
                    .placement(topic)
                    .filter(|_| self.ships(topic, peer))
                    .map(|p| p.epoch);
                if !stream.lock().expect("stream lock").current(ships_at) {
                    return Err::<(), String>("the topic's failover state changed".into());
                }
                let (mut err, mut bytes, mut end, start) =
                    fetch_raw(&mut fetch_client, topic, partition, sent).await?;
                if err == OFFSET_OUT_OF_RANGE && start > sent {
                    // Retention or DeleteRecords removed what the mirror lacks: it goes on from
                    // the log start, with a gap the heartbeat's log start then removes there.
                    tracing::warn!(%peer, %topic, partition, mirror_end = sent, log_start = start,
                        "the mirror is behind this region's log start: it continues from there");
                    (err, bytes, end, _) =
                        fetch_raw(&mut fetch_client, topic, partition, start).await?;
                }
                if err != 0 {
                    return Err(format!("fetch {topic}-{partition} at {sent}: error {err}"));
                }
                source_end.store(end, Ordering::Relaxed);
                metrics::gauge!("ferry_mirror_source_end_offset", &labels).set(end as f64);
                let acked = *acked_rx.borrow();
                metrics::gauge!("ferry_mirror_lag_records", &labels)
                    .set((end - acked).max(0) as f64);
                let Some(span) = source::whole_batches_from(&bytes, sent) else {
                    if inflight_bytes == 0 {
                        metrics::gauge!("ferry_mirror_lag_seconds", &labels).set(0.0);
                        metrics::gauge!("ferry_mirror_lag_bytes", &labels).set(0.0);
                    }
                    continue;
                };
                // Bytes the mirror lacks: exact when the fetch reached the source's end (it was
                // under CHUNK_BYTES), a lower bound otherwise.
                metrics::gauge!("ferry_mirror_lag_bytes", &labels)
                    .set((inflight_bytes + bytes.len() - span.start) as f64);
                // Age of the oldest record the mirror does not hold yet.
                let oldest = stream
                    .lock()
                    .expect("stream lock")
                    .inflight()
                    .front()
                    .map_or(span.first_timestamp, |f| f.payload.first_timestamp);
                let age = (crate::clock::now_ms() - oldest).max(0) as f64 / 1000.0;
                metrics::gauge!("ferry_mirror_lag_seconds", &labels).set(age);
                let batches = bytes.slice(span.start..span.end);
                let n = batches.len();
                // The frame continues the stream from where this fetch read: a first batch past
                // it means the source holds nothing in between (its cleaner removed it), and
                // the mirror takes the same gap.
                let first_offset = span.first_offset.min(sent);
                let f = if snappy && span.uncompressed {
                    Frame::SnappyBatches {
                        first_offset,
                        batches,
                    }
                } else {
                    Frame::Batches {
                        first_offset,
                        batches,
                    }
                };
                let wire = f.encode();
                // Queued before it is written, so that the second copy can send it meanwhile.
                stream.lock().expect("stream lock").on_sent(
                    first_offset,
                    span.next,
                    n,
                    Wire {
                        first_timestamp: span.first_timestamp,
                        wire: wire.clone(),
                    },
                );
                let sent = span.next;
                let _ = sent_tx.send(sent);
                let fec = (fec_percent > 0).then_some(Fec {
                    route: route_id,
                    first_offset,
                    percent: fec_percent,
                    topic,
                });
                send_frame(conn, &route, &wire, fec).await?;
                metrics::counter!("ferry_mirror_bytes_out_total", "topic" => topic.to_string())
                    .increment(n as u64);
                metrics::counter!("ferry_mirror_wire_bytes_out_total", "topic" => topic.to_string())
                    .increment(wire.len() as u64);
                metrics::gauge!("ferry_mirror_sent_offset", &labels).set(sent as f64);
            }
        };
        let answers = async {
            let mut last = next;
            loop {
                match frame::read(&mut rx).await.map_err(e)? {
                    Some(Frame::Ack { log_end }) => {
                        assert!(log_end >= last, "the mirror's end never goes back");
                        last = log_end;
                        let _ = ack_tx.send(log_end);
                    }
                    Some(Frame::Error {
                        code,
                        log_end,
                        message,
                    }) => {
                        let acked = *acked_tx.borrow();
                        return Err::<(), String>(format!("mirror refused batches after {acked} (error {code}, mirror ends at {log_end}): {message}"));
                    }
                    None => return Err("the mirror closed the stream".into()),
                    other => return Err(format!("expected ACK, got {other:?}")),
                }
            }
        };
        let acker = async {
            while let Some(log_end) = ack_rx.recv().await {
                // Either copy's acknowledgement is a durable end; the later one is old news.
                let moved = stream.lock().expect("stream lock").on_ack(log_end);
                let Some(acked) = moved.map_err(|x| x.to_string())? else {
                    continue;
                };
                let _ = acked_tx.send(acked);
                // The local broker answers acks=all produces of synchronously mirrored topics
                // once every such mirror holds them.
                let err = ack_client
                    .mirror_ack(topic, partition, peer, acked)
                    .await
                    .map_err(|x| x.to_string())?;
                if err != 0 {
                    tracing::debug!(%topic, partition, err, "broker did not take the mirror acknowledgement");
                }
                metrics::gauge!("ferry_mirror_acked_offset", &labels).set(acked as f64);
                let end = source_end.load(Ordering::Relaxed);
                metrics::gauge!("ferry_mirror_lag_records", &labels)
                    .set((end - acked).max(0) as f64);
                if acked >= *sent_tx.borrow() {
                    metrics::gauge!("ferry_mirror_lag_bytes", &labels).set(0.0);
                    if acked >= end {
                        metrics::gauge!("ferry_mirror_lag_seconds", &labels).set(0.0);
                    }
                }
            }
            Ok::<(), String>(())
        };
        // The second copy (`wire_copies = 2`): best effort, on a connection of its own; its
        // failures only cost the redundancy until it reconnects.
        let copier = async {
            let Some(mut conn_rx) = copies else {
                return Ok::<(), String>(());
            };
            loop {
                let current = conn_rx.borrow_and_update().clone();
                let Some(conn) = current else {
                    if conn_rx.changed().await.is_err() {
                        return Ok(());
                    }
                    continue;
                };
                let copy = SecondCopy {
                    topic,
                    partition,
                    count,
                    epoch,
                    stream: &stream,
                    sent_rx: sent_rx.clone(),
                    ack_tx: ack_tx.clone(),
                };
                if let Err(m) = copy.run(&conn).await {
                    tracing::info!(%peer, %topic, partition, error = %m, "second copy of the stream ended: retrying");
                }
                tokio::time::sleep(RETRY).await;
            }
        };
        tokio::try_join!(sender, answers, acker, copier).map(|_| ())
    }
}

/// What the source keeps of a frame in flight: its first record's time (for the lag metric)
/// and the frame as sent (for the second copy).
struct Wire {
    first_timestamp: i64,
    wire: Bytes,
}

/// The second copy of a partition's stream (`wire_copies = 2`), on its own connection: it
/// sends the frames of the first copy that the mirror has not acknowledged, skipping what it
/// has, so it can start, fall behind or restart at any time without a gap.
struct SecondCopy<'a> {
    topic: &'a str,
    partition: i32,
    count: i32,
    epoch: i32,
    stream: &'a Mutex<source::SourceStream<Wire>>,
    sent_rx: watch::Receiver<i64>,
    ack_tx: tokio::sync::mpsc::UnboundedSender<i64>,
}

impl SecondCopy<'_> {
    pub(super) async fn run(mut self, conn: &quinn::Connection) -> Result<(), String> {
        let e = |x: std::io::Error| x.to_string();
        let (mut tx, mut rx) = conn.open_bi().await.map_err(|x| x.to_string())?;
        frame::write(
            &mut tx,
            &Frame::Open {
                topic: self.topic.to_string(),
                partition: self.partition,
                partition_count: self.count,
                epoch: self.epoch,
            },
        )
        .await
        .map_err(e)?;
        let (_, route) = read_route(&mut rx).await?;
        let mut cursor = match frame::read(&mut rx).await.map_err(e)? {
            Some(Frame::Position { log_end, .. }) => log_end,
            Some(Frame::Error { message, .. }) => {
                return Err(format!("refused by the mirror: {message}"))
            }
            other => return Err(format!("expected POSITION, got {other:?}")),
        };
        let ack_tx = self.ack_tx.clone();
        let answers = async {
            loop {
                match frame::read(&mut rx).await.map_err(e)? {
                    Some(Frame::Ack { log_end }) => {
                        let _ = ack_tx.send(log_end);
                    }
                    Some(Frame::Error { message, .. }) => {
                        return Err::<(), String>(format!("refused by the mirror: {message}"))
                    }
                    None => return Err("the mirror closed the stream".into()),
                    other => return Err(format!("expected ACK, got {other:?}")),
                }
            }
        };
        let writer = async {
            loop {
                self.sent_rx.borrow_and_update();
                let next = self
                    .stream
                    .lock()
                    .expect("stream lock")
                    .next_copy(cursor)
                    .map(|f| (f.end, f.payload.wire.clone()));
                match next {
                    Some((end, wire)) => {
                        // (Not `?`: this `return` gives the async block its type.)
                        #[allow(clippy::question_mark)]
                        if let Err(x) = send_frame(conn, &route, &wire, None).await {
                            return Err::<(), String>(x);
                        }
                        metrics::counter!("ferry_mirror_wire_bytes_out_total", "topic" => self.topic.to_string())
                            .increment(wire.len() as u64);
                        metrics::counter!("ferry_mirror_second_copy_wire_bytes_out_total", "topic" => self.topic.to_string())
                            .increment(wire.len() as u64);
                        cursor = end;
                    }
                    None => self
                        .sent_rx
                        .changed()
                        .await
                        .map_err(|_| "the stream ended".to_string())?,
                }
            }
        };
        tokio::try_join!(answers, writer).map(|_| ())
    }
}

/// The sink's answer to OPEN: the ROUTE that BATCHES streams start with (encoded), or its
/// refusal.
async fn read_route(rx: &mut quinn::RecvStream) -> Result<(u64, Bytes), String> {
    match frame::read(rx).await.map_err(|x| x.to_string())? {
        Some(f @ Frame::Route { id }) => Ok((id, f.encode())),
        Some(Frame::Error { message, .. }) => Err(format!("refused by the mirror: {message}")),
        other => Err(format!("expected ROUTE, got {other:?}")),
    }
}

/// Send one encoded BATCHES frame on a unidirectional stream of its own, after the sink's
/// `route`. Returns once QUIC has the bytes (it resends them until they arrive or the
/// connection ends); the sink's ACK on the partition's stream says when they are durable.
async fn send_frame(
    conn: &quinn::Connection,
    route: &Bytes,
    wire: &Bytes,
    fec: Option<Fec<'_>>,
) -> Result<(), String> {
    let mut s = conn.open_uni().await.map_err(|x| x.to_string())?;
    if let Some(fec) = fec {
        // Ahead of the stream's bytes, so that they reach the mirror no later than those.
        let stream = quinn::VarInt::from(s.id()).into_inner();
        send_shards(conn, &fec, stream, route.len(), wire);
    }
    s.write_all(route).await.map_err(|x| x.to_string())?;
    s.write_all(wire).await.map_err(|x| x.to_string())?;
    s.finish().map_err(|x| x.to_string())
}

/// A frame's `wire_fec` recovery shards: for the sink `route`, the frame at `first_offset`.
struct Fec<'a> {
    route: u64,
    first_offset: i64,
    percent: u8,
    topic: &'a str,
}

/// The frame's Reed-Solomon recovery shards as datagrams (`wire_fec`, see [`fec`]): best
/// effort, not awaited, never resent; the frame's stream (QUIC stream `stream`, the frame at
/// byte `wire_at` of it) is what makes it arrive for sure.
fn send_shards(conn: &quinn::Connection, fec: &Fec<'_>, stream: u64, wire_at: usize, wire: &Bytes) {
    let Some(max) = conn.max_datagram_size() else {
        return;
    };
    let Ok(wire_at) = u16::try_from(wire_at) else {
        return;
    };
    match fec::encode(
        fec.route,
        stream,
        wire_at,
        fec.first_offset,
        wire,
        max,
        fec.percent,
    ) {
        Ok(datagrams) => {
            let mut bytes = 0;
            for d in datagrams {
                bytes += d.len();
                if conn.send_datagram(d).is_err() {
                    break;
                }
            }
            metrics::counter!("ferry_mirror_fec_wire_bytes_out_total", "topic" => fec.topic.to_string())
                .increment(bytes as u64);
        }
        Err(e) => tracing::debug!(topic = %fec.topic, error = %e, "no FEC shards for a frame"),
    }
}

/// Kafka's OFFSET_OUT_OF_RANGE.
const OFFSET_OUT_OF_RANGE: i16 = 1;

/// Fetch raw record batches from the local broker (long poll, 500 ms).
async fn fetch_raw(
    c: &mut Client,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<(i16, Bytes, i64, i64), String> {
    let bounds = crate::client::FetchBounds {
        max_wait_ms: 500,
        min_bytes: 1,
        max_bytes: CHUNK_BYTES,
    };
    let p = c
        .fetch_partition(topic, partition, offset, bounds)
        .await
        .map_err(|e| e.to_string())?;
    Ok((
        p.error_code,
        p.records,
        p.high_watermark,
        p.log_start_offset,
    ))
}
