//! Accepting connections and moving frames: read, decode, dispatch, answer in order.
//!
//! Each connection has a reader (this task) and a writer task joined by a bounded queue of
//! pending responses. The reader decodes a request, starts it (a produce queues its batches for
//! the group commit writer right here, so batches keep the order they arrived in), and queues
//! the future that completes the answer; the writer awaits those futures one by one and writes
//! the responses in request order, as Kafka requires. So a client that pipelines produces with
//! `acks=all` has them all share one fsync instead of waiting for one each.
//!
//! Hostile input: a frame length above `frame_bytes_max`, below 8 or negative closes the
//! connection before anything is allocated for it; an unknown API key or an unsupported version
//! closes it too (as Kafka does), except ApiVersions, which answers a too-new version with a
//! v0 UNSUPPORTED_VERSION response listing what is supported. Every reason is logged.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::RequestKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use super::fetch_wire::Piece;
use super::*;
use crate::broker::Broker;
use crate::log::ReadSlice;

/// A response being prepared; `None` means no response (produce with acks=0).
pub type Pending = Pin<Box<dyn Future<Output = Option<Vec<Piece>>> + Send>>;

/// Serve Kafka clients on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    broker: Arc<Broker>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let limit = Arc::new(Semaphore::new(broker.config.connections_max));
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
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "connection limit reached: closing new connection");
                    continue;
                };
                let broker = broker.clone();
                tokio::spawn(async move {
                    metrics::gauge!("ferry_connections").increment(1.0);
                    if let Err(reason) = connection(stream, peer, broker).await {
                        tracing::info!(%peer, %reason, "closed connection");
                    }
                    metrics::gauge!("ferry_connections").decrement(1.0);
                    drop(permit);
                });
            }
        }
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    broker: Arc<Broker>,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Pending>(broker.config.inflight_requests_max);
    let writer = tokio::spawn(async move {
        while let Some(p) = rx.recv().await {
            if let Some(pieces) = p.await {
                for piece in pieces {
                    match piece {
                        Piece::Bytes(b) => wr
                            .write_all(&b)
                            .await
                            .map_err(|e| format!("write failed: {e}"))?,
                        Piece::File(slice) => send_file(&wr, &slice).await?,
                    }
                }
            }
        }
        Ok(())
    });
    let max = broker.config.frame_bytes_max;
    let result = async {
        loop {
            let len = match rd.read_i32().await {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(format!("read failed: {e}")),
            };
            if len < 8 || len as usize > max {
                return Err(format!(
                    "refused frame of {len} bytes (must be 8 to {max}): closing without reading it"
                ));
            }
            // Read into uninitialised capacity (no zeroing pass over up to `frame_bytes_max`).
            let len = len as usize;
            let mut buf = BytesMut::with_capacity(len);
            while buf.len() < len {
                let want = (len - buf.len()) as u64;
                let n = (&mut rd)
                    .take(want)
                    .read_buf(&mut buf)
                    .await
                    .map_err(|e| format!("truncated frame ({len} bytes announced): {e}"))?;
                if n == 0 {
                    return Err(format!(
                        "truncated frame ({len} bytes announced, {} received)",
                        buf.len()
                    ));
                }
            }
            let pending = request(&broker, buf.freeze(), peer).await?;
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
) -> Result<Pending, String> {
    let started = std::time::Instant::now();
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
        RequestKind::ListOffsets(r) => ready(encode_response(
            cid,
            version,
            &list_offsets::handle(&b, r, version),
        )),
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
        RequestKind::IncrementalAlterConfigs(r) => ready(encode_response(
            cid,
            version,
            &admin::incremental_alter_configs(&b, r),
        )),
        RequestKind::AlterConfigs(r) => {
            ready(encode_response(cid, version, &admin::alter_configs(&b, r)))
        }
        RequestKind::DescribeCluster(_) => {
            ready(encode_response(cid, version, &admin::describe_cluster(&b)))
        }
        RequestKind::InitProducerId(r) => {
            ready(encode_response(cid, version, &producer_id::handle(&b, r)))
        }
        RequestKind::FindCoordinator(r) => ready(encode_response(
            cid,
            version,
            &coordinator::find(&b, r, version),
        )),
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
