//! Accepting connections and moving frames: read, decode, dispatch, answer in order.
//!
//! Each connection has a reader (this task) and a writer task joined by a bounded queue of
//! pending responses. The reader decodes a request, starts it (a produce queues its batches for
//! the group commit writer right here, so batches keep the order they arrived in), and queues
//! the future that completes the answer; the writer awaits those futures one by one and writes
//! the responses in request order, as Kafka requires. So a client that pipelines produces with
//! `acks=all` has them all share one fsync instead of waiting for one each.
//!
//! Two doors on one port. A connection whose first byte is 0x16 (a TLS handshake record; as a
//! Kafka length prefix it would announce more than `frame_bytes_max` allows) is a mutual-TLS
//! connection: its certificate must chain to the topology's CA and name the region's own
//! gateway or an operator ([`crate::transport::trust::Door`]), and only such connections are
//! served Ferry's internal requests (MirrorAppend, MirrorAck, FerryControl). On plain
//! connections those requests are refused with an authorization error and a log line naming
//! the peer, and nothing they ask for happens.
//!
//! Bounds ([`crate::config::ConnectionLimits`]): caps on connections in all and per client
//! address; an idle timeout (no request in progress and no answer pending; not applied to
//! authenticated internal connections, which the gateway keeps open); a read timeout
//! from a request's first byte to its last; and one memory budget for requests being read and
//! served, taken as bytes arrive (a length prefix reserves nothing), so a client that announces
//! 100 MiB and stalls holds only what it sent, and a reader waits for room instead of
//! allocating past the budget.
//!
//! Hostile input: a frame length above `frame_bytes_max`, below 8 or negative closes the
//! connection before anything is allocated for it; an unknown API key or an unsupported version
//! closes it too (as Kafka does), except ApiVersions, which answers a too-new version with a
//! v0 UNSUPPORTED_VERSION response listing what is supported. Every reason is logged.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::messages::RequestKind;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::fetch_wire::Piece;
use super::*;
use crate::broker::Broker;
use crate::limits::{refused, Budget, Gate, Room};
use crate::log::ReadSlice;
use crate::transport::trust::{enter, Door, Identity};

/// A response being prepared; `None` means no response (produce with acks=0).
pub type Pending = Pin<Box<dyn Future<Output = Option<Vec<Piece>>> + Send>>;

/// The listener label of this port's metrics.
const LISTENER: &str = "kafka";

/// Budget is taken for at most this many bytes of a request at a time, as they arrive.
const READ_CHUNK: usize = 1 << 20;

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Serve Kafka clients on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    broker: Arc<Broker>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let limits = &broker.config.limits;
    let gate = Gate::new(
        LISTENER,
        limits.connections_max,
        limits.connections_per_address_max,
    );
    let budget = Budget::new(limits.request_memory_max);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let admitted = match gate.admit(peer.ip()) {
                    Ok(a) => a,
                    Err(why) => {
                        tracing::warn!(%peer, "refused connection: {why}");
                        continue;
                    }
                };
                let broker = broker.clone();
                let budget = budget.clone();
                tokio::spawn(async move {
                    metrics::gauge!("ferry_connections").increment(1.0);
                    if let Err(reason) = connection(stream, peer, broker, budget).await {
                        tracing::info!(%peer, %reason, "closed connection");
                    }
                    metrics::gauge!("ferry_connections").decrement(1.0);
                    drop(admitted);
                });
            }
        }
    }
}

/// Tell the door by the first byte, authenticate a TLS peer, then serve.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    broker: Arc<Broker>,
    budget: Arc<Budget>,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let limits = broker.config.limits.clone();
    let mut first = [0u8; 1];
    let n = match tokio::time::timeout(limits.idle_timeout, stream.peek(&mut first)).await {
        Ok(r) => r.map_err(|e| format!("read failed: {e}"))?,
        Err(_) => {
            refused(LISTENER, "idle_timeout");
            return Err(format!(
                "idle for {:?} (idle_timeout) before its first request",
                limits.idle_timeout
            ));
        }
    };
    if n == 0 {
        return Ok(());
    }
    if first[0] != TLS_HANDSHAKE {
        let (rd, wr) = stream.into_split();
        return serve(rd, Out::Plain(wr), peer, broker, budget, None).await;
    }
    let Some(door) = broker.config.internal.clone() else {
        refused(LISTENER, "no_internal_door");
        tracing::warn!(%peer, "refused a TLS connection: this broker has no certificate, so it serves no internal requests");
        return Err("TLS without an internal door".into());
    };
    let internal = Door::BrokerInternal {
        region: door.region.clone(),
    };
    let (tls, who) = enter(
        door.tls.clone(),
        stream,
        &internal,
        limits.request_read_timeout,
        LISTENER,
    )
    .await?;
    let who = who?;
    tracing::debug!(%peer, identity = %who, "internal connection");
    let (rd, wr) = tokio::io::split(tls);
    serve(rd, Out::Tls(wr), peer, broker, budget, Some(who)).await
}

/// Where a connection's answers go.
enum Out {
    Plain(tokio::net::tcp::OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Out {
    async fn write(&mut self, pieces: Vec<Piece>) -> Result<(), String> {
        let werr = |e: std::io::Error| format!("write failed: {e}");
        for piece in pieces {
            match (&mut *self, piece) {
                (Out::Plain(w), Piece::Bytes(b)) => w.write_all(&b).await.map_err(werr)?,
                (Out::Plain(w), Piece::File(slice)) => send_file(w, &slice).await?,
                (Out::Tls(w), Piece::Bytes(b)) => w.write_all(&b).await.map_err(werr)?,
                (Out::Tls(w), Piece::File(slice)) => copy_file(w, &slice).await?,
            }
        }
        if let Out::Tls(w) = self {
            w.flush().await.map_err(werr)?;
        }
        Ok(())
    }
}

/// Copy a file range through a (TLS) writer: the bytes must pass through user space to be
/// encrypted, so `sendfile` cannot be used.
async fn copy_file<W: AsyncWrite + Unpin>(w: &mut W, slice: &ReadSlice) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let mut at = slice.position;
    let end = slice.position + slice.len as u64;
    let mut buf = vec![0u8; slice.len.min(256 << 10)];
    while at < end {
        let want = ((end - at) as usize).min(buf.len());
        let n = slice
            .file
            .read_at(&mut buf[..want], at)
            .map_err(|e| format!("reading records: {e}"))?;
        if n == 0 {
            return Err("segment file ended before the promised records".into());
        }
        w.write_all(&buf[..n])
            .await
            .map_err(|e| format!("write failed: {e}"))?;
        at += n as u64;
    }
    Ok(())
}

/// Read requests and answer them in order until the peer leaves or breaks a rule.
async fn serve<R: AsyncRead + Unpin>(
    mut rd: R,
    mut out: Out,
    peer: SocketAddr,
    broker: Arc<Broker>,
    budget: Arc<Budget>,
    who: Option<Identity>,
) -> Result<(), String> {
    let (tx, mut rx) = mpsc::channel::<Pending>(broker.config.inflight_requests_max);
    // Answers queued and not yet written: while there are some, the connection is not idle.
    let unanswered = Arc::new(AtomicUsize::new(0));
    let writer_count = unanswered.clone();
    let writer = tokio::spawn(async move {
        while let Some(p) = rx.recv().await {
            let answer = p.await;
            if let Some(pieces) = answer {
                out.write(pieces).await?;
            }
            writer_count.fetch_sub(1, Ordering::SeqCst);
        }
        Ok::<(), String>(())
    });
    let limits = broker.config.limits.clone();
    let max = broker.config.frame_bytes_max;
    let result = async {
        loop {
            // The length prefix: waiting for its first byte is idleness; once it started, the
            // request's read timeout runs.
            let mut head = [0u8; 4];
            let mut got = 0;
            let mut deadline = None;
            while got < 4 {
                // The region's own gateway keeps its connections open while it mirrors: an
                // authenticated connection is not closed for idleness.
                let wait = match (deadline, &who) {
                    (None, Some(_)) => Ok(rd.read(&mut head[got..]).await),
                    (None, None) => {
                        tokio::time::timeout(limits.idle_timeout, rd.read(&mut head[got..])).await
                    }
                    (Some(d), _) => tokio::time::timeout_at(d, rd.read(&mut head[got..])).await,
                };
                match wait {
                    Ok(Ok(0)) if got == 0 => return Ok(()),
                    Ok(Ok(0)) => return Err("connection closed inside a length prefix".to_string()),
                    Ok(Ok(n)) => {
                        if got == 0 {
                            deadline = Some(Instant::now() + limits.request_read_timeout);
                        }
                        got += n;
                    }
                    // A TLS peer that closes without close_notify between requests has left.
                    Ok(Err(e)) if got == 0 && e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        return Ok(())
                    }
                    Ok(Err(e)) => return Err(format!("read failed: {e}")),
                    Err(_) if deadline.is_none() && unanswered.load(Ordering::SeqCst) > 0 => {}
                    Err(_) if deadline.is_none() => {
                        refused(LISTENER, "idle_timeout");
                        return Err(format!(
                            "idle for {:?} (idle_timeout): closing",
                            limits.idle_timeout
                        ));
                    }
                    Err(_) => {
                        refused(LISTENER, "request_read_timeout");
                        return Err(format!(
                            "a request's length did not arrive within {:?} (request_read_timeout)",
                            limits.request_read_timeout
                        ));
                    }
                }
            }
            let mut deadline = deadline.expect("set by the first byte");
            let len = i32::from_be_bytes(head);
            if len < 8 || len as usize > max {
                return Err(format!(
                    "refused frame of {len} bytes (must be 8 to {max}): closing without reading it"
                ));
            }
            // The body, taking budget as it arrives. A reader that holds nothing yet may wait
            // for room without its read timeout running; one that holds part of a request
            // does not get more time, so partial requests cannot hold the budget forever.
            let len = len as usize;
            let mut room = Room::empty();
            // Grown exactly by what the budget granted (no doubling past it).
            let mut buf: Vec<u8> = Vec::new();
            while buf.len() < len {
                let chunk = (len - buf.len()).min(READ_CHUNK);
                let started = Instant::now();
                let held = room.bytes() > 0;
                let take = budget.take(&mut room, chunk);
                let waited = if held {
                    match tokio::time::timeout_at(deadline, take).await {
                        Ok(w) => w,
                        Err(_) => {
                            refused(LISTENER, "request_read_timeout");
                            return Err(format!(
                                "a request of {len} bytes ({} received) waited for memory past its read timeout",
                                buf.len()
                            ));
                        }
                    }
                } else {
                    take.await
                };
                if waited && !held {
                    deadline += started.elapsed();
                }
                buf.reserve_exact(chunk);
                let target = buf.len() + chunk;
                while buf.len() < target {
                    let want = (target - buf.len()) as u64;
                    let mut limited = (&mut rd).take(want);
                    let read = limited.read_buf(&mut buf);
                    match tokio::time::timeout_at(deadline, read).await {
                        Ok(Ok(0)) => {
                            return Err(format!(
                                "truncated frame ({len} bytes announced, {} received)",
                                buf.len()
                            ))
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            return Err(format!("truncated frame ({len} bytes announced): {e}"))
                        }
                        Err(_) => {
                            refused(LISTENER, "request_read_timeout");
                            return Err(format!(
                                "a request of {len} bytes was not received within {:?} ({} received; request_read_timeout)",
                                limits.request_read_timeout,
                                buf.len()
                            ));
                        }
                    }
                }
            }
            let pending = request(&broker, Bytes::from(buf), peer, who.as_ref()).await?;
            // The request's room is given back once it is answered.
            let pending: Pending = Box::pin(async move {
                let out = pending.await;
                drop(room);
                out
            });
            unanswered.fetch_add(1, Ordering::SeqCst);
            if tx.send(pending).await.is_err() {
                return Err("response writer stopped".to_string());
            }
        }
    }
    .await;
    drop(tx);
    let w = writer
        .await
        .unwrap_or_else(|e| Err(format!("writer task failed: {e}")));
    result.and(w)
}

/// Send a file range to the socket with `sendfile`: the bytes go from the page cache to the
/// socket without a copy through user space.
pub async fn send_file(
    wr: &tokio::net::tcp::OwnedWriteHalf,
    slice: &ReadSlice,
) -> Result<(), String> {
    use std::os::fd::AsFd;
    let sock: &TcpStream = wr.as_ref();
    let mut offset = slice.position;
    let end = slice.position + slice.len as u64;
    while offset < end {
        sock.writable()
            .await
            .map_err(|e| format!("write failed: {e}"))?;
        let want = (end - offset) as usize;
        let r = sock.try_io(tokio::io::Interest::WRITABLE, || {
            rustix::fs::sendfile(sock.as_fd(), slice.file.as_fd(), Some(&mut offset), want)
                .map_err(std::io::Error::from)
        });
        match r {
            // The file got shorter than promised (truncated under us): the frame cannot be
            // completed, so the connection must close.
            Ok(0) => return Err("segment file ended before the promised records".into()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("sendfile failed: {e}")),
        }
    }
    Ok(())
}

/// Answer one of Ferry's internal requests that came on a plain connection with an
/// authorization error, and do nothing else.
fn refuse_internal(key: i16, frame: &Bytes, peer: SocketAddr) -> Pending {
    let cid = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let api = match key {
        mirror_append::KEY => "MirrorAppend",
        mirror_append::ACK_KEY => "MirrorAck",
        _ => "FerryControl",
    };
    tracing::warn!(%peer, api, "refused Ferry's internal request on a plain connection: it is served only over mutual TLS to the region's gateway and operators");
    metrics::counter!("ferry_internal_refused_total", "api" => api).increment(1);
    let msg = format!(
        "{api} is an internal request: it needs mutual TLS with the region's certificate or an operator's"
    );
    let answer = if key == super::control::KEY {
        super::control::encode_response(cid, Err(msg))
    } else {
        mirror_append::encode_response(cid, code::CLUSTER_AUTHORIZATION_FAILED, -1, &msg)
    };
    ready(Ok(answer))
}

fn ready(b: anyhow::Result<Bytes>) -> Pending {
    Box::pin(async move {
        match b {
            Ok(b) => Some(vec![Piece::Bytes(b)]),
            Err(e) => {
                tracing::error!(error = %e, "could not encode a response");
                None
            }
        }
    })
}

/// Decode one request and start it. An `Err` closes the connection with that reason.
async fn request(
    broker: &Arc<Broker>,
    mut frame: Bytes,
    peer: SocketAddr,
    who: Option<&Identity>,
) -> Result<Pending, String> {
    let started = std::time::Instant::now();
    let key = (frame.len() >= 8).then(|| i16::from_be_bytes([frame[0], frame[1]]));
    if let Some(k @ (mirror_append::KEY | mirror_append::ACK_KEY | super::control::KEY)) = key {
        if who.is_none() {
            return Ok(refuse_internal(k, &frame, peer));
        }
    }
    if frame.len() >= 2 && i16::from_be_bytes([frame[0], frame[1]]) == mirror_append::KEY {
        let Some((cid, req)) = mirror_append::decode(frame) else {
            return Err("malformed MirrorAppend request".into());
        };
        let b = broker.clone();
        return Ok(Box::pin(async move {
            let (err, end, msg) = mirror_append::handle(b, req).await;
            Some(vec![Piece::Bytes(mirror_append::encode_response(
                cid, err, end, &msg,
            ))])
        }));
    }
    if frame.len() >= 2 && i16::from_be_bytes([frame[0], frame[1]]) == super::control::KEY {
        let Some((cid, req)) = super::control::decode(frame) else {
            return Err("malformed FerryControl request".into());
        };
        let b = broker.clone();
        return Ok(Box::pin(async move {
            let answer = match req {
                Ok(r) => super::control::handle(b, r).await,
                Err(e) => Err(format!("bad control request: {e}")),
            };
            Some(vec![Piece::Bytes(super::control::encode_response(
                cid, answer,
            ))])
        }));
    }
    if frame.len() >= 2 && i16::from_be_bytes([frame[0], frame[1]]) == mirror_append::ACK_KEY {
        let Some((cid, topic, partition, region, offset)) = mirror_append::decode_ack(frame) else {
            return Err("malformed MirrorAck request".into());
        };
        let err = mirror_append::handle_ack(broker, &topic, partition, &region, offset);
        return Ok(ready(Ok(mirror_append::encode_response(cid, err, -1, ""))));
    }
    let (key, version, correlation_id, header, body) = match decode(&mut frame) {
        Decoded::Request {
            key,
            version,
            correlation_id,
            header,
            body,
        } => (key, version, correlation_id, header, body),
        Decoded::UnsupportedApiVersions { correlation_id } => {
            return Ok(ready(api_versions::unsupported(correlation_id)))
        }
        Decoded::ApiVersionsAnyway {
            correlation_id,
            version,
        } => return Ok(ready(api_versions::response(correlation_id, version))),
        Decoded::Refused(reason) => return Err(reason),
    };
    metrics::counter!("ferry_requests_total", "api" => format!("{key:?}")).increment(1);
    let cid = correlation_id;
    let b = broker.clone();
    let client = header
        .client_id
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_default();
    tracing::trace!(%peer, client, ?key, version, cid, "request");
    let api = format!("{key:?}");
    let pending: Pending = match *body {
        RequestKind::ApiVersions(_) => ready(api_versions::response(cid, version)),
        RequestKind::Metadata(r) => ready(encode_response(
            cid,
            version,
            &metadata::handle(&b, r, version),
        )),
        RequestKind::Produce(r) => {
            let waiting = produce::start(&b, r, version).await;
            Box::pin(async move {
                let resp = waiting.finish().await?;
                encode_response(cid, version, &resp)
                    .ok()
                    .map(|b| vec![Piece::Bytes(b)])
            })
        }
        RequestKind::Fetch(r) => Box::pin(async move {
            let answer = fetch::handle(b, r, version).await;
            Some(fetch_wire::encode(
                cid,
                version,
                &answer.resp,
                &answer.records,
            ))
        }),
        RequestKind::ElectLeaders(r) => Box::pin(async move {
            let resp = super::cluster_admin::elect_leaders(&b, r, version).await;
            encode_response(cid, version, &resp)
                .ok()
                .map(|b| vec![Piece::Bytes(b)])
        }),
        RequestKind::DeleteRecords(r) => ready(encode_response(
            cid,
            version,
            &super::delete_records::handle(&b, r),
        )),
        RequestKind::DescribeLogDirs(r) => ready(encode_response(
            cid,
            version,
            &super::log_dirs::handle(&b, r, version),
        )),
        RequestKind::OffsetForLeaderEpoch(r) => ready(encode_response(
            cid,
            version,
            &super::offset_for_leader_epoch::handle(&b, r),
        )),
        RequestKind::ListOffsets(r) => ready(encode_response(
            cid,
            version,
            &list_offsets::handle(&b, r, version),
        )),
        RequestKind::CreateTopics(r) if b.cluster().is_some() => Box::pin(async move {
            let link = b.cluster().expect("checked").clone();
            let resp = super::cluster_admin::create_topics(&b, &link, r, version).await;
            encode_response(cid, version, &resp)
                .ok()
                .map(|b| vec![Piece::Bytes(b)])
        }),
        RequestKind::CreatePartitions(r) if b.cluster().is_some() => Box::pin(async move {
            let link = b.cluster().expect("checked").clone();
            let resp = super::cluster_admin::create_partitions(&b, &link, r).await;
            encode_response(cid, version, &resp)
                .ok()
                .map(|b| vec![Piece::Bytes(b)])
        }),
        RequestKind::DeleteTopics(r) if b.cluster().is_some() => Box::pin(async move {
            let link = b.cluster().expect("checked").clone();
            let resp = super::cluster_admin::delete_topics(&b, &link, r, version).await;
            encode_response(cid, version, &resp)
                .ok()
                .map(|b| vec![Piece::Bytes(b)])
        }),
        RequestKind::CreateTopics(r) => ready(encode_response(
            cid,
            version,
            &admin::create_topics(&b, r, version),
        )),
        RequestKind::DeleteTopics(r) => ready(encode_response(
            cid,
            version,
            &admin::delete_topics(&b, r, version),
        )),
        RequestKind::CreatePartitions(r) => ready(encode_response(
            cid,
            version,
            &admin::create_partitions(&b, r),
        )),
        RequestKind::DescribeConfigs(r) => ready(encode_response(
            cid,
            version,
            &admin::describe_configs(&b, r, version),
        )),
        RequestKind::IncrementalAlterConfigs(r) => Box::pin(async move {
            let resp = admin::incremental_alter_configs(b, r).await;
            encode_response(cid, version, &resp)
                .ok()
                .map(|b| vec![Piece::Bytes(b)])
        }),
        RequestKind::AlterConfigs(r) => Box::pin(async move {
            let resp = admin::alter_configs(b, r).await;
            encode_response(cid, version, &resp)
                .ok()
                .map(|b| vec![Piece::Bytes(b)])
        }),
        RequestKind::DescribeCluster(_) => {
            ready(encode_response(cid, version, &admin::describe_cluster(&b)))
        }
        RequestKind::InitProducerId(r) if r.transactional_id.is_some() => Box::pin(async move {
            let resp = super::txn::init_producer_id(b, r).await;
            encode_response(cid, version, &resp)
                .ok()
                .map(|b| vec![Piece::Bytes(b)])
        }),
        RequestKind::InitProducerId(r) => {
            ready(encode_response(cid, version, &producer_id::handle(&b, r)))
        }
        RequestKind::AddPartitionsToTxn(r) => Box::pin(async move {
            let resp = super::txn::add_partitions(b, r, version).await;
            encode_response(cid, version, &resp)
                .ok()
                .map(|b| vec![Piece::Bytes(b)])
        }),
        RequestKind::AddOffsetsToTxn(r) => Box::pin(async move {
            let resp = super::txn::add_offsets(b, r).await;
            encode_response(cid, version, &resp)
                .ok()
                .map(|b| vec![Piece::Bytes(b)])
        }),
        RequestKind::WriteTxnMarkers(r) => {
            // Only through the internal door, unless this broker has none (see txn_markers).
            let trusted = who.is_some() || b.config.internal.is_none();
            Box::pin(async move {
                let resp = super::txn_markers::handle(b, r, trusted, peer).await;
                encode_response(cid, version, &resp)
                    .ok()
                    .map(|b| vec![Piece::Bytes(b)])
            })
        }
        RequestKind::EndTxn(r) => Box::pin(async move {
            let resp = super::txn::end_txn(b, r).await;
            encode_response(cid, version, &resp)
                .ok()
                .map(|b| vec![Piece::Bytes(b)])
        }),
        RequestKind::TxnOffsetCommit(r) => Box::pin(async move {
            let resp = super::txn::txn_offset_commit(b, r).await;
            encode_response(cid, version, &resp)
                .ok()
                .map(|b| vec![Piece::Bytes(b)])
        }),
        RequestKind::DescribeTransactions(r) => ready(encode_response(
            cid,
            version,
            &super::txn::describe_transactions(&b, r),
        )),
        RequestKind::ListTransactions(r) => ready(encode_response(
            cid,
            version,
            &super::txn::list_transactions(&b, r),
        )),
        RequestKind::DescribeProducers(r) => ready(encode_response(
            cid,
            version,
            &super::txn::describe_producers(&b, r),
        )),
        RequestKind::FindCoordinator(r) => Box::pin(async move {
            let resp = coordinator::find(b, r, version).await;
            encode_response(cid, version, &resp)
                .ok()
                .map(|b| vec![Piece::Bytes(b)])
        }),
        RequestKind::JoinGroup(r) => Box::pin(async move {
            let resp = coordinator::join(b, r, version, client, peer).await;
            encode_response(cid, version, &resp)
                .ok()
                .map(|b| vec![Piece::Bytes(b)])
        }),
        RequestKind::SyncGroup(r) => Box::pin(async move {
            let resp = coordinator::sync(b, r, version).await;
            encode_response(cid, version, &resp)
                .ok()
                .map(|b| vec![Piece::Bytes(b)])
        }),
        RequestKind::Heartbeat(r) => ready(encode_response(
            cid,
            version,
            &coordinator::heartbeat(&b, r),
        )),
        RequestKind::LeaveGroup(r) => ready(encode_response(
            cid,
            version,
            &coordinator::leave(&b, r, version),
        )),
        RequestKind::OffsetCommit(r) => Box::pin(async move {
            let resp = coordinator::commit(b, r).await;
            encode_response(cid, version, &resp)
                .ok()
                .map(|b| vec![Piece::Bytes(b)])
        }),
        RequestKind::OffsetFetch(r) => ready(encode_response(
            cid,
            version,
            &coordinator::fetch(&b, r, version),
        )),
        RequestKind::ListGroups(r) => ready(encode_response(
            cid,
            version,
            &coordinator::list(&b, r, version),
        )),
        RequestKind::DescribeGroups(r) => ready(encode_response(
            cid,
            version,
            &coordinator::describe(&b, r, version),
        )),
        RequestKind::DeleteGroups(r) => Box::pin(async move {
            let resp = coordinator::delete_groups(b, r).await;
            encode_response(cid, version, &resp)
                .ok()
                .map(|b| vec![Piece::Bytes(b)])
        }),
        RequestKind::OffsetDelete(r) => Box::pin(async move {
            let resp = coordinator::offset_delete(b, r).await;
            encode_response(cid, version, &resp)
                .ok()
                .map(|b| vec![Piece::Bytes(b)])
        }),
        other => {
            return Err(format!(
                "API {:?} is not handled",
                std::mem::discriminant(&other)
            ))
        }
    };
    Ok(Box::pin(async move {
        let out = pending.await;
        metrics::histogram!("ferry_request_seconds", "api" => api)
            .record(started.elapsed().as_secs_f64());
        out
    }))
}
