//! The gateway's admin API: HTTPS (HTTP/1.1, JSON bodies) on the topology's `admin` address.
//!
//! `ferry failover`, `ferry drill` and operators' scripts drive a region through it:
//!
//! | method and path      | body                                              | does |
//! |----------------------|---------------------------------------------------|------|
//! | `GET /v1/state`      |                                                   | rules (epoch, primary, fenced), lease, peers' last heartbeats, cut links |
//! | `GET /v1/offsets`    |                                                   | log end and epoch history of every partition a rule covers |
//! | `POST /v1/fence`     | `{"patterns": [..], "fenced": true, "lapse_ms"}`  | stop (or resume) client writes for rules this region is primary of; answers the final log ends (and, under lease fencing with `lapse_ms`, `fence_until_ms`: when the fence lifts by itself unless the rule moved) |
//! | `POST /v1/promote`   | `{"pattern", "epoch", "from", "wait_for", "force", "timeout_ms", "not_after_ms"}` | become primary at `epoch`: after catching up to `wait_for` (planned, and not after `not_after_ms`), or once `from`'s lease ran out (forced) |
//! | `POST /v1/adopt`     | `{"pattern", "state": {"epoch", "primary"}, "force"}` | take a newer rule state (a demoted or third region); one that makes this region primary is refused unless `force` (then the answer and the log say that no catch-up check was made) |
//! | `POST /v1/cut`       | `{"peer", "cut": true}`                           | cut (or heal) the link to a peer (drills) |
//!
//! Errors answer 4xx/5xx with `{"error": "..."}`.
//!
//! Only operators get in: the connection is TLS 1.3 with a client certificate from the
//! topology's CA that names an operator (`<name>.operator.ferry`, see
//! [`crate::transport::trust`]). A client without a certificate, or with one from another CA,
//! fails the handshake; a region's certificate gets 403 on every path. Either way no state is
//! read or touched. Connections are bounded like the broker's (`[limits]`): caps in all and
//! per address, a deadline for the handshake and for each request's head and body, and one
//! request per connection.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use super::gateway::control::Command;
use super::gateway::Gateway;
use crate::failover::RuleState;
use crate::kafka::control::PartitionOffsets;
use crate::log::EpochEntry;
use crate::topology::Fencing;

use crate::failover::switchover::{moved_on, too_late, FenceAnswer};
/// The request bodies, shared with `ferry failover`, `ferry drill` and the simulator.
pub use crate::failover::switchover::{AdoptRequest, CutRequest, FenceRequest, PromoteRequest};

/// The listener label of the admin API's metrics.
const LISTENER: &str = "admin";

/// Serve the admin API on a bound listener until the process ends: TLS with `tls` (the
/// region's certificate; client certificates from the topology's CA required), operators only.
pub async fn serve(
    gw: Arc<Gateway>,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "gateway admin API on https://{addr}/v1/state (operator certificates only)");
    }
    let limits = gw.topology.limits.clone();
    let gate = crate::limits::Gate::new(
        LISTENER,
        limits.connections_max,
        limits.connections_per_address_max,
    );
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let admitted = match gate.admit(peer.ip()) {
            Ok(a) => a,
            Err(why) => {
                tracing::warn!(%peer, "admin API: refused connection: {why}");
                continue;
            }
        };
        let gw = gw.clone();
        let tls = tls.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            let _admitted = admitted;
            let door = crate::transport::trust::Door::Admin;
            // A certificate the door does not admit still gets an answer: 403 on every path.
            let Ok((tls, who)) = crate::transport::trust::enter(
                tls,
                stream,
                &door,
                limits.request_read_timeout,
                LISTENER,
            )
            .await
            else {
                return;
            };
            let refusal = who.as_ref().err().cloned();
            let svc = hyper::service::service_fn(move |req| {
                let gw = gw.clone();
                let refusal = refusal.clone();
                let who = who.clone();
                let limit = limits.request_read_timeout;
                async move {
                    if let Some(r) = refusal {
                        return Ok::<_, Infallible>(reply(
                            StatusCode::FORBIDDEN,
                            json!({ "error": r }),
                        ));
                    }
                    let who = who.expect("admitted");
                    tracing::info!(%peer, operator = %who, method = %req.method(), path = %req.uri().path(), "admin API request");
                    Ok::<_, Infallible>(route(gw, req, limit).await)
                }
            });
            let io = hyper_util::rt::TokioIo::new(tls);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.request_read_timeout)
                .keep_alive(false)
                .serve_connection(io, svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}

fn reply(status: StatusCode, v: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec_pretty(&v).expect("serialisable"),
    )));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Request bodies larger than this are refused unread.
const BODY_BYTES_MAX: usize = 1 << 20;

async fn body<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    limit: Duration,
) -> Result<T, String> {
    let limited = http_body_util::Limited::new(req.into_body(), BODY_BYTES_MAX);
    let b = match tokio::time::timeout(limit, limited.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            return Err(format!(
                "bad request body (at most {BODY_BYTES_MAX} bytes): {e}"
            ))
        }
        Err(_) => return Err(format!("request body not received within {limit:?}")),
    };
    serde_json::from_slice(&b).map_err(|e| format!("bad request body: {e}"))
}

async fn route(gw: Arc<Gateway>, req: Request<Incoming>, limit: Duration) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let r: Result<Value, (StatusCode, String)> = match (req.method().clone(), path.as_str()) {
        (Method::GET, "/v1/state") => state(&gw)
            .await
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e)),
        (Method::GET, "/v1/offsets") => gw
            .offsets(Vec::new())
            .await
            .map(|o| serde_json::to_value(o).expect("serialisable"))
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e)),
        (Method::POST, "/v1/fence") => match body::<FenceRequest>(req, limit).await {
            Ok(f) => fence(&gw, f).await,
            Err(e) => Err((StatusCode::BAD_REQUEST, e)),
        },
        (Method::POST, "/v1/promote") => match body::<PromoteRequest>(req, limit).await {
            Ok(p) => promote(&gw, p).await,
            Err(e) => Err((StatusCode::BAD_REQUEST, e)),
        },
        (Method::POST, "/v1/adopt") => match body::<AdoptRequest>(req, limit).await {
            Ok(a) => adopt(&gw, a).await,
            Err(e) => Err((StatusCode::BAD_REQUEST, e)),
        },
        (Method::POST, "/v1/cut") => match body::<CutRequest>(req, limit).await {
            Ok(c) if gw.peers().contains(&c.peer) => gw
                .ask(|reply| Command::Cut {
                    peer: c.peer.clone(),
                    cut: c.cut,
                    reply,
                })
                .await
                .map(|()| json!({ "peer": c.peer, "cut": c.cut }))
                .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e)),
            Ok(c) => Err((StatusCode::NOT_FOUND, format!("'{}' is not a peer", c.peer))),
            Err(e) => Err((StatusCode::BAD_REQUEST, e)),
        },
        _ => Err((StatusCode::NOT_FOUND, format!("no route {path}"))),
    };
    match r {
        Ok(v) => reply(StatusCode::OK, v),
        Err((s, e)) => reply(s, json!({ "error": e })),
    }
}

/// Take a newer rule state. One that would make this region primary is what `/v1/promote`
/// does after its checks (catch-up for a switchover, the old lease for a forced failover), so
/// it is refused here unless `force`, and then the answer and the log say what was skipped.
async fn adopt(gw: &Gateway, a: AdoptRequest) -> Result<Value, (StatusCode, String)> {
    let makes_primary = a.state.primary == gw.region;
    let current = gw.state().rule(&gw.topology, &a.pattern);
    let already = current
        .as_ref()
        .is_some_and(|c| c.primary == gw.region && c.epoch == a.state.epoch);
    if makes_primary && !already && !a.force {
        return Err((
            StatusCode::CONFLICT,
            format!(
                "adopting this state would make {} primary of '{}' without the checks a switchover makes (catch-up to the old primary's log, or its lease running out): use `ferry failover --to {}` (POST /v1/promote), or pass \"force\": true to skip them",
                gw.region, a.pattern, gw.region
            ),
        ));
    }
    let changed = gw
        .apply(&a.pattern, a.state)
        .await
        .map_err(|e| (StatusCode::CONFLICT, e))?;
    if makes_primary && !already && changed {
        tracing::warn!(pattern = %a.pattern, "adopt --force made this region primary WITHOUT catch-up or lease checks: records the old primary acknowledged and did not ship may be lost");
        return Ok(json!({
            "changed": changed,
            "unchecked": "this region became primary without catch-up or lease checks (force)",
        }));
    }
    Ok(json!({ "changed": changed }))
}

async fn state(gw: &Gateway) -> Result<Value, String> {
    let st = gw.state();
    let rules: BTreeMap<String, RuleState> = gw
        .topology
        .topics
        .iter()
        .filter_map(|r| Some((r.pattern.clone(), st.rule(&gw.topology, &r.pattern)?)))
        .collect();
    let view = gw.ask(|reply| Command::View { reply }).await?;
    let (may_write, until) = (view.may_write, view.remaining_ms);
    let peers: BTreeMap<String, Value> = view
        .peers
        .iter()
        .map(|(p, r)| {
            (
                p.clone(),
                json!({
                    "heard_ms_ago": view.now.saturating_sub(r.received),
                    "ends": r.heartbeat.ends,
                    "rules": r.heartbeat.state.rules,
                }),
            )
        })
        .collect();
    let cuts: Vec<String> = gw.peers().into_iter().filter(|p| gw.is_cut(p)).collect();
    Ok(json!({
        "region": gw.region,
        "rules": rules,
        "lease": {
            "fencing": match gw.topology.failover.fencing { Fencing::Lease => "lease", Fencing::None => "none" },
            "may_write": may_write,
            "remaining_ms": until.map(|u| u.min(u64::MAX / 2)),
        },
        "peers": peers,
        "cuts": cuts,
    }))
}

/// Log ends and epoch histories of the partitions of the topics a rule covers.
async fn offsets_of(
    gw: &Gateway,
    pattern: &str,
) -> Result<BTreeMap<String, Vec<PartitionOffsets>>, String> {
    let o = gw.offsets(Vec::new()).await?;
    Ok(o.topics
        .into_iter()
        .filter(|(t, _)| gw.placement(t).is_some_and(|p| p.pattern == pattern))
        .collect())
}

/// Log ends of the topics a rule covers.
async fn ends_of(gw: &Gateway, pattern: &str) -> Result<BTreeMap<String, Vec<i64>>, String> {
    Ok(offsets_of(gw, pattern)
        .await?
        .into_iter()
        .map(|(t, ps)| (t, ps.iter().map(|p| p.log_end).collect()))
        .collect())
}

/// The partitions of `wait_for` where `ours` does not yet hold the fenced primary's log.
fn not_caught_up(
    ours: &BTreeMap<String, Vec<PartitionOffsets>>,
    wait_for: &BTreeMap<String, Vec<i64>>,
    wait_epochs: &BTreeMap<String, Vec<Vec<EpochEntry>>>,
) -> Vec<String> {
    let have = |t: &str, i: usize| {
        let p = ours.get(t)?.get(i)?;
        Some((p.log_end, p.epochs.clone()))
    };
    crate::failover::switchover::not_caught_up(have, wait_for, wait_epochs)
}

async fn fence(gw: &Gateway, f: FenceRequest) -> Result<Value, (StatusCode, String)> {
    let mut ends = BTreeMap::new();
    let mut aborted_transactions = Vec::new();
    let mut epochs = BTreeMap::new();
    // Only under lease fencing may a fence lapse: the primary then still needs a majority's
    // lease to write, which no region gives it once it knows a newer epoch.
    let fence_until_ms = match f.lapse_ms {
        Some(ms) if f.fenced && gw.topology.failover.fencing == Fencing::Lease => {
            Some(crate::clock::now_ms().max(0) as u64 + ms)
        }
        _ => None,
    };
    for pattern in &f.patterns {
        let st = gw
            .state()
            .rule(&gw.topology, pattern)
            .ok_or((StatusCode::NOT_FOUND, format!("no rule '{pattern}'")))?;
        if st.primary != gw.region {
            return Err((
                StatusCode::CONFLICT,
                format!(
                    "{} is not the primary of '{pattern}' ({} is)",
                    gw.region, st.primary
                ),
            ));
        }
        let applied = gw
            .apply_report(
                pattern,
                RuleState {
                    fenced: f.fenced,
                    fence_until_ms,
                    ..st
                },
            )
            .await
            .map_err(|e| (StatusCode::CONFLICT, e))?;
        // The broker ended this region's transactions on the fenced topics (or aborted them)
        // before answering, so the ends below hold their markers.
        for id in applied["fence_aborted_transactions"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(id) = id.as_str() {
                aborted_transactions.push(id.to_string());
            }
        }
        // The gates are shut under each partition's lock: these ends are final.
        let o = offsets_of(gw, pattern)
            .await
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e))?;
        ends.insert(
            pattern.clone(),
            o.iter()
                .map(|(t, ps)| (t.clone(), ps.iter().map(|p| p.log_end).collect::<Vec<_>>()))
                .collect::<BTreeMap<_, _>>(),
        );
        epochs.insert(
            pattern.clone(),
            o.into_iter()
                .map(|(t, ps)| (t, ps.into_iter().map(|p| p.epochs).collect::<Vec<_>>()))
                .collect::<BTreeMap<_, _>>(),
        );
    }
    let answer = FenceAnswer {
        fenced: f.fenced,
        fence_until_ms,
        ends,
        epochs,
        aborted_transactions,
    };
    Ok(serde_json::to_value(answer).expect("serialisable"))
}

async fn promote(gw: &Gateway, p: PromoteRequest) -> Result<Value, (StatusCode, String)> {
    let conflict = |e: String| (StatusCode::CONFLICT, e);
    let cur = gw
        .state()
        .rule(&gw.topology, &p.pattern)
        .ok_or((StatusCode::NOT_FOUND, format!("no rule '{}'", p.pattern)))?;
    if cur.primary == gw.region && cur.epoch >= p.epoch {
        return Ok(json!({ "epoch": cur.epoch, "already": true }));
    }
    // Any promotion since the caller read the state took an epoch in `p.epoch`'s block of 256
    // or a later one (`failover::next_epoch`): the rule moved on, and this promotion (a
    // switchover waiting for catch-up, say) must not override it.
    if moved_on(cur.epoch, p.epoch) {
        return Err(conflict(format!(
            "the rule is at epoch {} (primary {}) since this promotion to epoch {} began",
            cur.epoch, cur.primary, p.epoch
        )));
    }
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_millis(p.timeout_ms);
    if !p.force {
        // Planned: catch up to the fenced primary's final log ends (lag 0), holding its
        // records, not someone else's at the same offsets.
        loop {
            let ours = offsets_of(gw, &p.pattern)
                .await
                .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e))?;
            let behind = not_caught_up(&ours, &p.wait_for, &p.wait_epochs);
            if behind.is_empty() {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err((
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("not caught up in time: {}", behind.join(", ")),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    } else if gw.topology.failover.fencing == Fencing::Lease {
        // Forced: only once the old primary's lease has surely run out.
        loop {
            let ok = gw
                .ask(|reply| Command::MayTakeOver {
                    from: p.from.clone(),
                    reply,
                })
                .await
                .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e))?;
            if ok {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err((
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "the lease of '{}' has not run out in time (it may still be alive)",
                        p.from
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let now_state = gw
        .state()
        .rule(&gw.topology, &p.pattern)
        .ok_or((StatusCode::NOT_FOUND, format!("no rule '{}'", p.pattern)))?;
    if moved_on(now_state.epoch, p.epoch) {
        return Err(conflict(format!(
            "the rule moved to epoch {} (primary {}) while this promotion waited",
            now_state.epoch, now_state.primary
        )));
    }
    let ours = ends_of(gw, &p.pattern)
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e))?;
    // What may be lost, per partition: the old primary's last reported log past the point
    // where it leaves our history (not simply past our end: our log need not be a prefix of
    // its log, e.g. after earlier failovers among three regions).
    let mut loss = Vec::new();
    if p.force {
        let mut our_offsets = gw
            .offsets(Vec::new())
            .await
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e))?
            .topics;
        our_offsets.retain(|t, _| gw.placement(t).is_some_and(|x| x.pattern == p.pattern));
        loss = gw
            .ask(|reply| Command::Loss {
                from: p.from.clone(),
                ours: our_offsets,
                reply,
            })
            .await
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e))?
            .unwrap_or_default();
    }
    if let Some(ago) = too_late(p.not_after_ms, crate::clock::now_ms().max(0) as u64) {
        return Err((
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "too late to promote: the switchover's window closed {ago} ms ago (the fence on '{}' is about to lapse)",
                p.from
            ),
        ));
    }
    let applied = gw
        .apply_report(&p.pattern, RuleState::open(p.epoch, gw.region.clone()))
        .await
        .map_err(conflict)?;
    if p.force {
        gw.tell(Command::Forced {
            from: p.from.clone(),
        })
        .await;
    }
    tracing::warn!(pattern = %p.pattern, epoch = p.epoch, from = %p.from, force = p.force, "promoted to primary");
    // What the old primary last said it had, for the loss report of a forced failover.
    let last = gw
        .ask(|reply| Command::View { reply })
        .await
        .ok()
        .and_then(|v| {
            let r = v.peers.get(&p.from)?;
            Some(json!({
                "heard_ms_ago": v.now.saturating_sub(r.received),
                "ends": r.heartbeat.ends,
            }))
        });
    Ok(json!({
        "epoch": p.epoch,
        "waited_ms": started.elapsed().as_millis() as u64,
        "ends": ours,
        "from_last_report": last,
        "loss": loss,
        // Transactions the old primary left open here, aborted by this promotion.
        "aborted_transactions": applied.get("aborted_transactions").cloned().unwrap_or(json!([])),
    }))
}

/// Where a gateway's admin API is and how to reach it: its address, and TLS presenting an
/// operator's certificate to a server that must prove `<region>.ferry`.
#[derive(Debug, Clone)]
pub struct AdminTarget {
    pub addr: std::net::SocketAddr,
    pub tls: crate::transport::trust::TlsTarget,
}

/// Call a gateway's admin API: `method` `path` with an optional JSON body. A non-2xx answer is
/// an `Err` with the gateway's message.
pub async fn call(
    target: AdminTarget,
    method: Method,
    path: &str,
    body: Option<Value>,
    timeout: Duration,
) -> Result<Value, String> {
    let addr = target.addr;
    let fut = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("gateway admin {addr}: {e}"))?;
        let stream = target
            .tls
            .connect(stream)
            .await
            .map_err(|e| format!("gateway admin {addr}: TLS: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("gateway admin {addr}: {e}"))?;
        tokio::spawn(conn);
        let bytes = body
            .map(|b| serde_json::to_vec(&b).expect("serialisable"))
            .unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("gateway admin {addr}: {e}"))?;
        let status = resp.status();
        let b = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
        if status.is_success() {
            Ok(v)
        } else {
            Err(v
                .get("error")
                .and_then(|e| e.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| format!("gateway admin {addr}: HTTP {status}")))
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("gateway admin {addr}: no answer within {timeout:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::log::epochs::history as h;

    fn ours(end: i64, epochs: Vec<EpochEntry>) -> BTreeMap<String, Vec<PartitionOffsets>> {
        let p = PartitionOffsets {
            partition: 0,
            log_start: 0,
            log_end: end,
            epochs,
        };
        BTreeMap::from([("t".to_string(), vec![p])])
    }

    #[test]
    fn a_switchover_target_must_hold_the_fenced_primarys_records_not_just_as_many() {
        let want = BTreeMap::from([("t".to_string(), vec![150])]);
        // The fenced primary (west): epoch 0 up to 100, its own epoch 769 from 100 to 150.
        let primary = BTreeMap::from([("t".to_string(), vec![h(&[(0, 0), (769, 100)])])]);
        // Shorter: behind.
        assert_eq!(
            not_caught_up(&ours(120, h(&[(0, 0), (769, 100)])), &want, &primary).len(),
            1
        );
        // Caught up with the same history.
        assert!(not_caught_up(&ours(150, h(&[(0, 0), (769, 100)])), &want, &primary).is_empty());
        // Longer, but with another region's epoch-512 records where west has its 769 ones
        // (finding 9): not caught up.
        let b = not_caught_up(&ours(200, h(&[(0, 0), (512, 100)])), &want, &primary);
        assert_eq!(b.len(), 1, "{b:?}");
        assert!(
            b[0].contains("leaves the fenced primary's history at 100"),
            "{b:?}"
        );
        // Without histories (an older caller) only the ends count, as before.
        assert!(not_caught_up(
            &ours(200, h(&[(0, 0), (512, 100)])),
            &want,
            &BTreeMap::new()
        )
        .is_empty());
    }
}
