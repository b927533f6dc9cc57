//! The gateway's sink side: accepting peers, reading each BATCHES frame off its own QUIC
//! stream (with FEC recovery shards from datagrams), and each partition's sink stream: OPEN,
//! POSITION, frames into MirrorAppend, ACK, TRUNCATE. The decisions are
//! [`crate::mirror::core::sink`]'s; this is their I/O.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::watch;

use super::*;
use crate::kafka::control::Control;
use crate::kafka::mirror_append::MirrorAppend;
use crate::mirror::core::sink;
use crate::mirror::fec;
use crate::mirror::frame::{self, Frame};
use crate::transport::link;

/// Removes a sink's route when the sink ends.
struct RouteGuard<'a> {
    gateway: &'a Gateway,
    id: u64,
}

impl Drop for RouteGuard<'_> {
    fn drop(&mut self) {
        self.gateway
            .routes
            .lock()
            .expect("routes lock")
            .remove(&self.id);
    }
}

impl Gateway {
    pub(super) async fn accept_loop(self: Arc<Self>) {
        let limits = &self.topology.limits;
        let gate = crate::limits::Gate::new(
            "quic",
            limits.connections_max,
            limits.connections_per_address_max,
        );
        loop {
            match link::accept_admitted(&self.endpoint, &self.topology, &gate).await {
                Ok((peer, conn, admitted)) => {
                    {
                        // The connection's place is held until it closes.
                        let conn = conn.clone();
                        tokio::spawn(async move {
                            conn.closed().await;
                            drop(admitted);
                        });
                    }
                    if self.is_cut(&peer) {
                        conn.close(2u32.into(), b"link cut by the admin API");
                        continue;
                    }
                    self.track(&peer, &conn);
                    let me = self.clone();
                    let conn_id = conn.stable_id();
                    // FEC recovery shards (`wire_fec`) come as datagrams, for the readers of
                    // their frames' streams.
                    let inbox = Arc::new(Mutex::new(fec::Inbox::new(FEC_HOLD_BYTES)));
                    {
                        let me = me.clone();
                        let conn = conn.clone();
                        let peer = peer.clone();
                        let inbox = inbox.clone();
                        tokio::spawn(async move { me.sink_datagrams(&conn, &peer, &inbox).await });
                    }
                    {
                        // Every BATCHES frame comes on a unidirectional stream of its own.
                        let me = me.clone();
                        let conn = conn.clone();
                        let peer = peer.clone();
                        tokio::spawn(async move {
                            while let Ok(rx) = conn.accept_uni().await {
                                let me = me.clone();
                                let conn = conn.clone();
                                let peer = peer.clone();
                                let inbox = inbox.clone();
                                tokio::spawn(async move {
                                    if let Err(e) = me.sink_frame(&conn, rx, &inbox).await {
                                        tracing::warn!(%peer, error = %e, "BATCHES stream refused");
                                    }
                                });
                            }
                        });
                    }
                    tokio::spawn(async move {
                        loop {
                            match conn.accept_bi().await {
                                Ok((tx, rx)) => {
                                    let me = me.clone();
                                    let peer = peer.clone();
                                    tokio::spawn(async move {
                                        if let Err(e) = me.sink_stream(&peer, conn_id, tx, rx).await
                                        {
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

    /// One BATCHES frame on a unidirectional stream of its own: ROUTE, the frame, the end.
    /// It goes to the sink the route names, which must have given the route out on this
    /// connection. A stream cut short before its ROUTE is dropped (its sender stopped: its
    /// session is ending); one cut short after it, or carrying a bad frame, makes its sink
    /// refuse the partition stream (the source then resumes from the mirror's end); a bad ROUTE,
    /// or a ROUTE of another connection, closes the connection.
    ///
    /// The stream is read out of order, so that under `wire_fec` the packets that arrived and
    /// the recovery shards that came as datagrams (`inbox`) can rebuild the frame before QUIC
    /// resends a lost packet ([`fec::StreamFrame`]); the rest of the stream is then stopped.
    pub(super) async fn sink_frame(
        &self,
        conn: &quinn::Connection,
        mut rx: quinn::RecvStream,
        inbox: &Mutex<fec::Inbox>,
    ) -> Result<(), String> {
        let stream = quinn::VarInt::from(rx.id()).into_inner();
        let (stx, mut srx) = tokio::sync::mpsc::unbounded_channel();
        let early = inbox.lock().expect("inbox lock").open(stream, stx);
        let _close = InboxClose { inbox, stream };
        let mut sf = fec::StreamFrame::new();
        for s in early {
            if let Err(e) = sf.add_shard(s) {
                tracing::debug!(error = %e, "FEC shard dropped");
            }
        }
        enum Got {
            Whole(Bytes),
            Rebuilt(u64, Frame),
            CutShort,
            TooLong,
        }
        // A ROUTE and one frame: anything longer is refused before it is held.
        let longest = (frame::FRAME_BYTES_MAX + 64) as u64;
        let mut ended = false;
        let got = loop {
            tokio::select! {
                c = rx.read_chunk(usize::MAX, false), if !ended => match c {
                    Ok(Some(c)) => {
                        sf.add_chunk(c.offset, c.bytes);
                        if sf.seen() > longest {
                            break Got::TooLong;
                        }
                    }
                    Ok(None) => {
                        sf.finish();
                        ended = true;
                    }
                    Err(_) => break Got::CutShort,
                },
                Some(sh) = srx.recv() => {
                    if let Err(e) = sf.add_shard(sh) {
                        tracing::debug!(error = %e, "FEC shard dropped");
                    }
                }
                else => break Got::CutShort,
            }
            match sf.ready() {
                Ok(fec::Ready::No) if ended => break Got::CutShort,
                Ok(fec::Ready::No) => {}
                Ok(fec::Ready::Whole(b)) => break Got::Whole(b),
                Ok(fec::Ready::Rebuilt {
                    route,
                    first_offset,
                    frame,
                }) => match Frame::decode(frame.slice(4.min(frame.len())..)) {
                    Ok(
                        f @ (Frame::Batches {
                            first_offset: o, ..
                        }
                        | Frame::SnappyBatches {
                            first_offset: o, ..
                        }),
                    ) if o == first_offset => break Got::Rebuilt(route, f),
                    other => {
                        tracing::debug!(first_offset, rebuilt = ?other.map(|_| ()), "rebuilt frame is not the BATCHES its shards named; waiting for the stream");
                        sf.stop_shards();
                    }
                },
                Err(e) => {
                    tracing::debug!(error = %e, "FEC rebuild failed; waiting for the stream");
                    sf.stop_shards();
                }
            }
        };
        let (id, frame) = match got {
            Got::Rebuilt(id, f) => {
                // The rest of the stream is not needed: have the source stop resending it.
                let _ = rx.stop(0u32.into());
                metrics::counter!("ferry_mirror_fec_frames_rebuilt_total").increment(1);
                (id, Ok(f))
            }
            Got::Whole(b) => {
                let (id, after_route) = match frame::parse_at(&b, 0) {
                    Ok(frame::Parsed::Frame(Frame::Route { id }, next)) => (id, next),
                    Ok(frame::Parsed::End | frame::Parsed::CutShort) => return Ok(()),
                    other => {
                        let m = format!("a BATCHES stream must start with ROUTE, got {other:?}");
                        conn.close(3u32.into(), b"bad BATCHES stream");
                        return Err(m);
                    }
                };
                let frame = match frame::parse_at(&b, after_route) {
                    Ok(frame::Parsed::Frame(
                        f @ (Frame::Batches { .. } | Frame::SnappyBatches { .. }),
                        next,
                    )) => match frame::parse_at(&b, next) {
                        Ok(frame::Parsed::End) => Ok(f),
                        other => Err(format!(
                            "a BATCHES stream holds one frame and ends, found after it: {other:?}"
                        )),
                    },
                    Ok(frame::Parsed::Frame(other, _)) => {
                        Err(format!("expected BATCHES after ROUTE, got {other:?}"))
                    }
                    Ok(frame::Parsed::End | frame::Parsed::CutShort) => {
                        Err("BATCHES stream cut short".to_string())
                    }
                    Err(e) => Err(format!("BATCHES stream: {e}")),
                };
                (id, frame)
            }
            Got::CutShort => match frame::parse_at(&sf.prefix(), 0) {
                // Cut short after its ROUTE: the sink cannot go on without this frame.
                Ok(frame::Parsed::Frame(Frame::Route { id }, _)) => {
                    (id, Err("BATCHES stream cut short".to_string()))
                }
                _ => return Ok(()),
            },
            Got::TooLong => {
                let _ = rx.stop(0u32.into());
                let m = format!("a BATCHES stream ran past {longest} bytes, longer than a frame");
                match frame::parse_at(&sf.prefix(), 0) {
                    Ok(frame::Parsed::Frame(Frame::Route { id }, _)) => (id, Err(m)),
                    _ => {
                        conn.close(3u32.into(), b"bad BATCHES stream");
                        return Err(m);
                    }
                }
            }
        };
        let route = self.routes.lock().expect("routes lock").get(&id).cloned();
        let sink = match route {
            Some((c, sink)) if c == conn.stable_id() => sink,
            Some(_) => {
                conn.close(3u32.into(), b"ROUTE of another connection");
                return Err(format!("route {id} was given out on another connection"));
            }
            None => {
                // Its sink ended (the source is starting over): nothing to deliver it to.
                let _ = rx.stop(0u32.into());
                return Ok(());
            }
        };
        match frame {
            Ok(f) => sink.send(f).await.map_err(|_| "its sink ended".to_string()),
            Err(m) => {
                // The sink cannot go on without this frame: have it refuse its stream.
                let _ = sink
                    .send(Frame::Error {
                        code: 2,
                        log_end: -1,
                        message: m.clone(),
                    })
                    .await;
                Err(m)
            }
        }
    }

    /// FEC recovery shards (`wire_fec`, see [`fec`]) arriving as datagrams on `conn`, handed to
    /// the reader of their frame's stream through `inbox`. Shards whose route was not given out
    /// on this connection, and bad datagrams, are dropped: the stream still brings the frame.
    pub(super) async fn sink_datagrams(
        &self,
        conn: &quinn::Connection,
        peer: &str,
        inbox: &Mutex<fec::Inbox>,
    ) {
        while let Ok(d) = conn.read_datagram().await {
            let shard = match fec::parse(d) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "datagram dropped");
                    continue;
                }
            };
            let ours = matches!(
                self.routes.lock().expect("routes lock").get(&shard.route),
                Some((c, _)) if *c == conn.stable_id()
            );
            if ours {
                inbox
                    .lock()
                    .expect("inbox lock")
                    .deliver(shard, Instant::now());
            }
        }
    }

    /// The durable end of a mirrored partition as the sinks of this gateway know it.
    pub(super) fn mirror_end(&self, topic: &str, partition: i32, end: i64) -> watch::Receiver<i64> {
        let mut m = self.mirror_ends.lock().expect("mirror ends lock");
        let s = m
            .entry((topic.to_string(), partition))
            .or_insert_with(|| watch::channel(end).0);
        s.send_if_modified(|v| {
            let moved = end > *v;
            *v = (*v).max(end);
            moved
        });
        s.subscribe()
    }

    /// A sink made `end` durable (`reset`: after a truncation, which moves it back).
    pub(super) fn publish_mirror_end(&self, topic: &str, partition: i32, end: i64, reset: bool) {
        let m = self.mirror_ends.lock().expect("mirror ends lock");
        if let Some(s) = m.get(&(topic.to_string(), partition)) {
            if reset {
                s.send_replace(end);
            } else {
                s.send_if_modified(|v| {
                    let moved = end > *v;
                    *v = (*v).max(end);
                    moved
                });
            }
        }
    }

    pub(super) async fn sink_stream(
        &self,
        peer: &str,
        conn_id: usize,
        mut tx: quinn::SendStream,
        mut rx: quinn::RecvStream,
    ) -> Result<(), String> {
        let e = |x: std::io::Error| x.to_string();
        let (topic, partition, partition_count, epoch) = match frame::read(&mut rx)
            .await
            .map_err(e)?
        {
            Some(Frame::Open {
                topic,
                partition,
                partition_count,
                epoch,
            }) => (topic, partition, partition_count, epoch),
            Some(f @ Frame::Offsets { .. }) => return self.sink_offsets(peer, f, tx, rx).await,
            Some(f @ Frame::State { .. }) => return self.sink_heartbeats(peer, f, tx, rx).await,
            _ => return Err("stream did not start with OPEN, OFFSETS or STATE".into()),
        };
        // Only topics this peer is primary for at this very epoch, and that this region mirrors.
        let placement = self.placement(&topic);
        let refusal = sink::open_refusal(placement.as_ref(), &self.region, peer, &topic, epoch);
        if let Some(msg) = refusal {
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
        // The mirror partition's leader; before the mirror topic exists, any broker (its first
        // MirrorAppend creates the topic, then the stream starts again at the leader).
        let mut client = match self.leader_client(&topic, partition).await {
            Ok(c) => c,
            Err(_) => self.broker_client().await?,
        };
        let mut req = MirrorAppend {
            topic: topic.clone(),
            partition,
            partition_count,
            continues_from: -1,
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
            self.forget_leader(&topic, partition);
            return Err(format!("{topic}-{partition}: {msg}"));
        }
        let topic_ref = &topic;
        let position = |end: i64| async move {
            let o = self.offsets(vec![topic_ref.clone()]).await?;
            let epochs = o
                .topics
                .get(topic_ref)
                .and_then(|ps| ps.iter().find(|p| p.partition == partition))
                .map(|p| p.epochs.clone())
                .unwrap_or_default();
            Ok::<Frame, String>(Frame::Position {
                log_end: end,
                epochs,
            })
        };
        // Frames come on streams of their own that start with this route (and, if a source
        // sends them so, on this stream); the reader and those streams feed one queue.
        let (ftx, mut frx) = tokio::sync::mpsc::channel::<Frame>(64);
        let route = loop {
            let id = uuid::Uuid::new_v4().as_u64_pair().0;
            let mut routes = self.routes.lock().expect("routes lock");
            if let std::collections::hash_map::Entry::Vacant(v) = routes.entry(id) {
                v.insert((conn_id, ftx.clone()));
                break RouteGuard { gateway: self, id };
            }
        };
        frame::write(&mut tx, &Frame::Route { id: route.id })
            .await
            .map_err(e)?;
        frame::write(&mut tx, &position(end).await?)
            .await
            .map_err(e)?;
        tracing::info!(%peer, %topic, partition, log_end = end, epoch, "mirroring partition");
        // The reader takes frames off the stream while the appender writes earlier ones; the
        // stream's end (the source stopped or reconnected) ends the sink.
        let reader = async move {
            while let Some(f) = frame::read(&mut rx).await.map_err(e)? {
                if ftx.send(f).await.is_err() {
                    break;
                }
            }
            Ok::<(), String>(())
        };
        let mut shared = self.mirror_end(&topic, partition, end);
        let appender = async {
            let refuse = |code: i16, end: i64, message: String| Frame::Error {
                code,
                log_end: end,
                message,
            };
            let mut order: sink::SinkStream<Bytes> = sink::SinkStream::new(end);
            loop {
                // Append what continues the log: the frames that arrived meanwhile go together.
                if let Some((mut parts, after)) = order.next_append() {
                    // The run continues the stream from where this sink knows the log ends: if
                    // the log was cut below that meanwhile, the broker refuses the run and the
                    // stream starts again from the cut.
                    req.continues_from = order.end();
                    let total: usize = parts.iter().map(|p| p.len()).sum();
                    req.records = if parts.len() == 1 {
                        parts.pop().expect("one part")
                    } else {
                        let mut b = bytes::BytesMut::with_capacity(total);
                        for p in &parts {
                            b.extend_from_slice(p);
                        }
                        b.freeze()
                    };
                    let (err, new_end, msg) = client.mirror_append(&req).await.map_err(|x| {
                        self.forget_leader(&topic, partition);
                        x.to_string()
                    })?;
                    if err != 0 {
                        self.forget_leader(&topic, partition);
                        let _ = frame::write(&mut tx, &refuse(err, new_end.max(end), msg.clone()))
                            .await;
                        return Err(format!("{topic}-{partition}: append refused: {msg}"));
                    }
                    // `new_end` is where these batches end, durable; another copy of the stream
                    // may have appended further (not acknowledged here until it is durable).
                    let ack = order.appended(after, new_end);
                    end = end.max(ack);
                    self.publish_mirror_end(&topic, partition, end, false);
                    metrics::counter!("ferry_mirror_bytes_in_total", "topic" => topic.clone())
                        .increment(total as u64);
                    metrics::gauge!("ferry_mirror_log_end_offset", "topic" => topic.clone(), "partition" => partition.to_string()).set(end as f64);
                    frame::write(&mut tx, &Frame::Ack { log_end: ack })
                        .await
                        .map_err(e)?;
                    continue;
                }
                // Wait for a frame, or for the other copy of the stream to move the log end
                // past what this one holds.
                let f = tokio::select! {
                    f = frx.recv() => match f {
                        Some(f) => f,
                        None => return Ok::<(), String>(()),
                    },
                    moved = shared.changed(), if order.held_bytes() > 0 => {
                        if moved.is_ok() {
                            let other = *shared.borrow_and_update();
                            end = end.max(other);
                            order.moved(end);
                        }
                        continue;
                    }
                };
                match f {
                    Frame::Batches {
                        first_offset,
                        batches,
                    }
                    | Frame::SnappyBatches {
                        first_offset,
                        batches,
                    } => {
                        // Check every batch before holding any: CRC, whole, the first where the
                        // frame says.
                        let held = sink::check_frame(first_offset, &batches)
                            .and_then(|after| order.on_frame(first_offset, after, batches));
                        if let Err(m) = held {
                            let _ = frame::write(&mut tx, &refuse(2, end, m.clone())).await;
                            return Err(m);
                        }
                    }
                    Frame::Truncate { offset }
                        if order.on_truncate(offset) == sink::Truncation::Cut(offset) =>
                    {
                        // Our tail past `offset` is not in the primary's history: set it aside.
                        let answer: crate::kafka::control::TruncateAnswer = client
                            .control_as(&Control::Truncate {
                                topic: topic.clone(),
                                partition,
                                offset,
                                region: self.region.clone(),
                            })
                            .await
                            .map_err(|x| {
                                // In a cluster only the leader cuts: learn it again.
                                self.forget_leader(&topic, partition);
                                x.to_string()
                            })?;
                        metrics::counter!("ferry_quarantined_records_total", "topic" => topic.clone())
                            .increment(answer.quarantined as u64);
                        end = answer.log_end;
                        order.truncated(end);
                        self.publish_mirror_end(&topic, partition, end, true);
                        frame::write(&mut tx, &position(end).await?)
                            .await
                            .map_err(e)?;
                    }
                    Frame::Truncate { .. } => {
                        frame::write(&mut tx, &position(end).await?)
                            .await
                            .map_err(e)?;
                    }
                    // A BATCHES stream of this sink could not be read (see `sink_frame`).
                    Frame::Error { message, .. } => {
                        let _ = frame::write(&mut tx, &refuse(2, end, message.clone())).await;
                        return Err(message);
                    }
                    _ => return Err("expected BATCHES or TRUNCATE".into()),
                }
            }
        };
        let result = tokio::select! {
            r = reader => r,
            r = appender => r,
        };
        drop(route);
        result
    }
}

/// Closes a stream's entry in the FEC inbox when its reader is done.
struct InboxClose<'a> {
    inbox: &'a Mutex<fec::Inbox>,
    stream: u64,
}

impl Drop for InboxClose<'_> {
    fn drop(&mut self) {
        self.inbox.lock().expect("inbox lock").close(self.stream);
    }
}
