//! The gateway process: one QUIC endpoint that accepts the peers that mirror from us... and
//! dials every peer it shares a topic rule with.
//!
//! Each gateway dials its peers and, on its own connection to a peer, sends a heartbeat every
//! `failover.heartbeat` on a control stream (its failover state, how long ago it heard from
//! each region, and the log ends of the topics it is primary for), plus one stream per
//! partition it ships. Which partitions it ships follows the broker's failover state, polled
//! every [`STATE_POLL`]: after a failover the direction reverses by itself. A peer whose
//! heartbeat carries a newer epoch for a rule is believed (the peer is authenticated by mTLS),
//! which is how a rejoining region learns it was replaced.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;

pub use super::core::{clamp_offset, Heartbeat, PeerReport};
use super::core::{liveness, offsets, sink, source, Liveness};
use super::fec;
use super::frame::{self, Frame};
use crate::batch;
use crate::client::Client;
use crate::failover::lease::Millis;
use crate::failover::{self, Placement, RegionState, RuleState};
use crate::kafka::control::{Control, OffsetsAnswer, StateAnswer};
use crate::kafka::mirror_append::MirrorAppend;
use crate::topology::{Fencing, Topology, WireCompression};
use crate::transport::link;

/// How often the gateway reads its broker's failover state.
pub const STATE_POLL: Duration = Duration::from_millis(250);

/// Bytes read per fetch and sent per BATCHES frame at most.
const CHUNK_BYTES: i32 = source::FRAME_BYTES as i32;
/// Bytes of FEC shards a connection's sink side holds for frames not rebuilt yet.
const FEC_HOLD_BYTES: usize = 64 << 20;
const RETRY: Duration = Duration::from_secs(1);
/// How often committed group offsets are shipped to the mirrors.
pub const OFFSET_SYNC_INTERVAL: Duration = Duration::from_millis(offsets::OFFSET_SYNC_INTERVAL_MS);

/// Everything a gateway needs.
pub struct Gateway {
    pub topology: Arc<Topology>,
    pub region: String,
    /// The local broker's Kafka address.
    pub broker: String,
    /// How to reach the broker's internal door (mutual TLS with this region's certificate):
    /// MirrorAppend, MirrorAck and FerryControl are served only there.
    pub internal: crate::transport::trust::TlsTarget,
    pub endpoint: quinn::Endpoint,
    /// The broker's failover state (`None` until first read).
    state: watch::Sender<Option<RegionState>>,
    /// Heartbeats, the lease, the replaced set and the peers' reports (see [`Liveness`]).
    pub(crate) liveness: Mutex<Liveness>,
    origin: Instant,
    /// Links cut through the admin API (drills), and the open connections per peer.
    cuts: Mutex<BTreeSet<String>>,
    conns: Mutex<BTreeMap<String, Vec<quinn::Connection>>>,
    /// Bumped after a promotion: every heartbeat loop sends its next heartbeat at once.
    heartbeat_now: watch::Sender<u64>,
    /// Config overrides last given to each mirror topic (from its primary's heartbeats).
    configs_applied: Mutex<BTreeMap<String, BTreeMap<String, String>>>,
    /// The sinks of mirrored partitions, by the id their ROUTE frame gave out: the connection
    /// it was given on (a BATCHES stream must come on the same one) and where frames go.
    routes: Mutex<HashMap<u64, (usize, tokio::sync::mpsc::Sender<Frame>)>>,
    /// Durable log ends of the partitions mirrored here, shared by the sinks of a stream's two
    /// copies (`wire_copies = 2`): each learns at once what the other appended.
    mirror_ends: Mutex<HashMap<(String, i32), watch::Sender<i64>>>,
}

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
    pub fn new(
        topology: Arc<Topology>,
        region: String,
        broker: String,
        internal: crate::transport::trust::TlsTarget,
        endpoint: quinn::Endpoint,
    ) -> Arc<Gateway> {
        let liveness = Liveness::new(&topology, &region, 0);
        Arc::new(Gateway {
            topology,
            region,
            broker,
            internal,
            endpoint,
            state: watch::channel(None).0,
            liveness: Mutex::new(liveness),
            origin: Instant::now(),
            cuts: Mutex::new(BTreeSet::new()),
            conns: Mutex::new(BTreeMap::new()),
            configs_applied: Mutex::new(BTreeMap::new()),
            heartbeat_now: watch::channel(0).0,
            routes: Mutex::new(HashMap::new()),
            mirror_ends: Mutex::new(HashMap::new()),
        })
    }

    /// Milliseconds on this gateway's monotonic clock.
    pub fn now(&self) -> Millis {
        self.origin.elapsed().as_millis() as Millis
    }

    /// The failover state as last read from the broker.
    pub fn state(&self) -> RegionState {
        self.state.borrow().clone().unwrap_or_default()
    }

    /// Where `topic` lives now.
    pub fn placement(&self, topic: &str) -> Option<Placement> {
        failover::placement(&self.topology, &self.state(), topic)
    }

    /// Whether this region ships `topic` to `peer` now.
    fn ships(&self, topic: &str, peer: &str) -> bool {
        self.placement(topic)
            .is_some_and(|p| p.primary == self.region && p.mirrors.iter().any(|m| m == peer))
    }

    /// Regions this one shares a topic rule with.
    pub fn peers(&self) -> Vec<String> {
        self.topology
            .topics
            .iter()
            .map(failover::rule_regions)
            .filter(|rs| rs.contains(&self.region))
            .flatten()
            .filter(|r| *r != self.region)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    pub fn is_cut(&self, peer: &str) -> bool {
        self.cuts.lock().expect("cuts lock").contains(peer)
    }

    /// Cut (or heal) the link to `peer`: every connection to it is closed and none is made or
    /// accepted until healed. For drills on deployments whose network the drill cannot touch.
    pub fn set_cut(&self, peer: &str, cut: bool) {
        if cut {
            self.cuts
                .lock()
                .expect("cuts lock")
                .insert(peer.to_string());
            for c in self
                .conns
                .lock()
                .expect("conns lock")
                .remove(peer)
                .unwrap_or_default()
            {
                c.close(2u32.into(), b"link cut by the admin API");
            }
            tracing::warn!(%peer, "link cut through the admin API");
        } else if self.cuts.lock().expect("cuts lock").remove(peer) {
            tracing::warn!(%peer, "link healed through the admin API");
        }
    }

    fn track(&self, peer: &str, conn: &quinn::Connection) {
        let mut m = self.conns.lock().expect("conns lock");
        let v = m.entry(peer.to_string()).or_default();
        v.retain(|c| c.close_reason().is_none());
        v.push(conn.clone());
    }

    /// A client of the local broker's internal door (every API, Ferry's own included).
    pub async fn broker_client(&self) -> Result<Client, String> {
        Client::connect_internal(&self.broker, &self.internal)
            .await
            .map_err(|e| e.to_string())
    }

    /// Move a rule to `new` in the local broker, and take the broker's state at once.
    pub async fn apply(&self, pattern: &str, new: RuleState) -> Result<bool, String> {
        let mut c = self.broker_client().await?;
        let v = c
            .control(&Control::Apply {
                pattern: pattern.to_string(),
                state: new,
            })
            .await
            .map_err(|e| e.to_string())?;
        self.refresh_state(&mut c).await?;
        Ok(v.get("changed").and_then(|c| c.as_bool()).unwrap_or(false))
    }

    async fn refresh_state(&self, c: &mut Client) -> Result<(), String> {
        let a: StateAnswer = c
            .control_as(&Control::State)
            .await
            .map_err(|e| e.to_string())?;
        self.state.send_if_modified(|s| {
            if s.as_ref() != Some(&a.state) {
                *s = Some(a.state);
                true
            } else {
                false
            }
        });
        Ok(())
    }

    /// Log ends and epoch histories of `topics` (every rule-covered topic when empty).
    pub async fn offsets(&self, topics: Vec<String>) -> Result<OffsetsAnswer, String> {
        self.broker_client()
            .await?
            .control_as(&Control::Offsets { topics })
            .await
            .map_err(|e| e.to_string())
    }

    /// Run until the process ends.
    pub async fn run(self: Arc<Self>) {
        // The broker's failover state first: it decides what this gateway ships.
        let mut rx = self.state.subscribe();
        {
            let me = self.clone();
            tokio::spawn(async move { me.state_poll().await });
        }
        while rx.borrow_and_update().is_none() {
            if rx.changed().await.is_err() {
                return;
            }
        }
        let me = self.clone();
        tokio::spawn(async move { me.accept_loop().await });
        if self.topology.failover.fencing == Fencing::Lease {
            let me = self.clone();
            tokio::spawn(async move { me.lease_loop().await });
        }
        for peer in self.peers() {
            let me = self.clone();
            tokio::spawn(async move { me.source_link(peer).await });
        }
        std::future::pending::<()>().await;
    }

    async fn state_poll(self: Arc<Self>) {
        loop {
            match self.broker_client().await {
                Ok(mut c) => loop {
                    if let Err(e) = self.refresh_state(&mut c).await {
                        tracing::debug!(error = %e, "reading the broker's failover state");
                        break;
                    }
                    tokio::time::sleep(STATE_POLL).await;
                },
                Err(e) => tracing::debug!(error = %e, "local broker not reachable"),
            }
            tokio::time::sleep(STATE_POLL).await;
        }
    }

    /// Under lease fencing, every `heartbeat / 4`: first the automatic promotions that are due
    /// (a promotion restarts the lease, which must not be renewed from before it), then the
    /// fences that lapsed, then the broker's write lease, renewed while a majority (or the
    /// witness) answers our heartbeats; not renewed otherwise, so the broker stops taking
    /// writes when it runs out. The decisions are [`Liveness`]'s.
    async fn lease_loop(self: Arc<Self>) {
        let step = self.topology.failover.heartbeat / 4;
        let mut client: Option<Client> = None;
        loop {
            tokio::time::sleep(step).await;
            let now = self.now();
            let due = self
                .liveness()
                .promotions(&self.topology, &self.state(), now);
            for p in due {
                self.auto_promote(p).await;
            }
            let wall = crate::clock::now_ms().max(0) as u64;
            for (pattern, open) in
                liveness::lapsed_fences(&self.topology, &self.state(), &self.region, wall)
            {
                tracing::warn!(%pattern, epoch = open.epoch,
                    "the fence lapsed: the switchover that set it did not move the rule in time; taking writes again");
                match self.apply(&pattern, open).await {
                    Ok(_) => metrics::counter!("ferry_fence_lapses_total").increment(1),
                    Err(e) => tracing::warn!(%pattern, error = %e, "lifting a lapsed fence"),
                }
            }
            let now = self.now();
            let Some(until) = self.liveness().renewal(now) else {
                continue;
            };
            let ms = until.saturating_sub(now);
            if client.is_none() {
                client = self.broker_client().await.ok();
            }
            if let Some(c) = client.as_mut() {
                if let Err(e) = c.control(&Control::RenewLease { ms }).await {
                    tracing::debug!(error = %e, "renewing the broker's write lease");
                    client = None;
                }
            }
        }
    }

    /// The lease and heartbeat state.
    pub(crate) fn liveness(&self) -> std::sync::MutexGuard<'_, Liveness> {
        self.liveness.lock().expect("liveness lock")
    }

    /// Carry out an automatic promotion. The broker stops taking writes until a majority has
    /// answered a heartbeat that carries the new epoch (finding 6 of the simulator): its lease
    /// ends now, the promotion is applied, answers to earlier heartbeats stop counting, and a
    /// heartbeat goes out at once. Our own writes before a majority knows the epoch could
    /// otherwise be overruled by an operator who never heard of it.
    async fn auto_promote(&self, p: liveness::AutoPromotion) {
        let expired = match self.broker_client().await {
            Ok(mut c) => c
                .control(&Control::RenewLease { ms: 0 })
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        if let Err(e) = expired {
            tracing::warn!(pattern = %p.pattern, error = %e, "automatic promotion postponed: the broker's lease could not be ended");
            return;
        }
        match self.apply(&p.pattern, p.new.clone()).await {
            Ok(_) => {
                let at = self.now();
                self.liveness().promoted(at);
                self.heartbeat_now.send_modify(|n| *n += 1);
                metrics::counter!("ferry_automatic_promotions_total").increment(1);
                // What it may have cost, as `/v1/promote` reports a forced one.
                let loss = match self.offsets(Vec::new()).await {
                    Ok(o) => self.liveness().loss(&p.from, &o.topics),
                    Err(_) => None,
                };
                tracing::warn!(pattern = %p.pattern, from = %p.from, epoch = p.new.epoch, ?loss,
                    "automatic promotion: the primary's lease ran out");
            }
            Err(e) => {
                tracing::warn!(pattern = %p.pattern, error = %e, "automatic promotion failed")
            }
        }
    }

    // ---- sink side ----------------------------------------------------------------------

    async fn accept_loop(self: Arc<Self>) {
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
    async fn sink_frame(
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
    async fn sink_datagrams(
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
    fn mirror_end(&self, topic: &str, partition: i32, end: i64) -> watch::Receiver<i64> {
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
    fn publish_mirror_end(&self, topic: &str, partition: i32, end: i64, reset: bool) {
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

    async fn sink_stream(
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
        let mut client = self.broker_client().await?;
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
                    let (err, new_end, msg) = client
                        .mirror_append(&req)
                        .await
                        .map_err(|x| x.to_string())?;
                    if err != 0 {
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
                        let held = check_frame(first_offset, &batches)
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
                            .map_err(|x| x.to_string())?;
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

    /// Give the topics this region mirrors from `peer` the config overrides `peer` has for
    /// them, when they changed since last applied (a topic not created here yet is tried again
    /// at the next heartbeat).
    async fn follow_configs(
        &self,
        peer: &str,
        configs: &BTreeMap<String, BTreeMap<String, String>>,
    ) {
        for (topic, c) in configs {
            let ours = self.placement(topic);
            if !ours.is_some_and(|p| p.primary == peer && p.mirrors.contains(&self.region)) {
                continue;
            }
            if self
                .configs_applied
                .lock()
                .expect("configs lock")
                .get(topic)
                == Some(c)
            {
                continue;
            }
            let Ok(mut client) = self.broker_client().await else {
                return;
            };
            let req = Control::SetConfigs {
                topic: topic.clone(),
                configs: c.clone(),
            };
            match client.control(&req).await {
                Ok(v) => {
                    if v.get("changed").and_then(|c| c.as_bool()) == Some(true) {
                        tracing::info!(%peer, %topic, configs = ?c, "mirror topic follows its primary's configs");
                    }
                    self.configs_applied
                        .lock()
                        .expect("configs lock")
                        .insert(topic.clone(), c.clone());
                }
                Err(e) => tracing::debug!(%topic, error = %e, "configs not applied yet"),
            }
        }
    }

    /// Our heartbeat, as sent now.
    async fn heartbeat(&self) -> Heartbeat {
        let state = self.state();
        let o = self.offsets(Vec::new()).await.unwrap_or(OffsetsAnswer {
            topics: BTreeMap::new(),
            configs: BTreeMap::new(),
        });
        let now = self.now();
        self.liveness().heartbeat(
            &self.topology,
            now,
            &state,
            &o.topics,
            &o.configs,
            crate::clock::now_ms(),
        )
    }

    /// Send a heartbeat to `peer` every `failover.heartbeat` on our connection to it; each
    /// answer renews our lease.
    async fn heartbeats(
        self: Arc<Self>,
        peer: String,
        mut conn_rx: watch::Receiver<Option<quinn::Connection>>,
    ) {
        let every = self.topology.failover.heartbeat;
        let mut now_rx = self.heartbeat_now.subscribe();
        loop {
            let conn = loop {
                if let Some(c) = conn_rx.borrow_and_update().clone() {
                    break c;
                }
                if conn_rx.changed().await.is_err() {
                    return;
                }
            };
            let r: Result<(), String> = async {
                let (mut tx, mut rx) = conn.open_bi().await.map_err(|x| x.to_string())?;
                loop {
                    // The send time is taken before the state is read: an answer to a
                    // heartbeat sent after a promotion always acknowledges the new epoch.
                    let sent_at = self.now();
                    let hb = self.heartbeat().await;
                    let json = serde_json::to_string(&hb).expect("serialisable");
                    frame::write(&mut tx, &Frame::State { sent_at, json })
                        .await
                        .map_err(|x| x.to_string())?;
                    match tokio::time::timeout(every * 2, frame::read(&mut rx)).await {
                        // 0: the peer withholds credit (we are behind on an epoch, or
                        // back from a long silence).
                        Ok(Ok(Some(Frame::StateAck { sent_at }))) => {
                            self.liveness().on_ack(&peer, sent_at);
                        }
                        Ok(Ok(other)) => return Err(format!("expected STATE_ACK, got {other:?}")),
                        Ok(Err(x)) => return Err(x.to_string()),
                        Err(_) => return Err("no STATE_ACK in two heartbeats".into()),
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = now_rx.changed() => {}
                    }
                }
            }
            .await;
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "heartbeats interrupted");
            }
            tokio::time::sleep(RETRY.min(every)).await;
        }
    }

    /// Take heartbeats from `peer`: note them for the lease, answer at once, and adopt any
    /// newer epoch they carry (how a region that was away learns it has been replaced).
    async fn sink_heartbeats(
        &self,
        peer: &str,
        first: Frame,
        mut tx: quinn::SendStream,
        mut rx: quinn::RecvStream,
    ) -> Result<(), String> {
        let mut next = Some(first);
        loop {
            let f = match next.take() {
                Some(f) => f,
                None => match frame::read(&mut rx).await.map_err(|x| x.to_string())? {
                    Some(f) => f,
                    None => return Ok(()),
                },
            };
            let Frame::State { sent_at, json } = f else {
                return Err("expected STATE".into());
            };
            let hb: Heartbeat = match serde_json::from_str(&json) {
                Ok(h) => h,
                Err(x) => {
                    tracing::warn!(%peer, error = %x, "unreadable heartbeat");
                    Heartbeat::default()
                }
            };
            let configs = hb.configs.clone();
            let now = self.now();
            let answer =
                self.liveness()
                    .on_heartbeat(&self.topology, &self.state(), peer, sent_at, hb, now);
            frame::write(
                &mut tx,
                &Frame::StateAck {
                    sent_at: answer.credit,
                },
            )
            .await
            .map_err(|x| x.to_string())?;
            if answer.misnamed {
                tracing::warn!(%peer, "heartbeat names another region");
                continue;
            }
            if answer.withheld {
                tracing::info!(%peer, "no lease credit for a peer back from a long silence");
            }
            for (pattern, new) in answer.adopt {
                tracing::warn!(%peer, %pattern, epoch = new.epoch, primary = %new.primary,
                    "a peer knows a newer epoch: adopting it");
                if let Err(e) = self.apply(&pattern, new).await {
                    tracing::warn!(%pattern, error = %e, "could not adopt the newer epoch");
                }
            }
            self.follow_configs(peer, &configs).await;
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
        let mut client = self.broker_client().await?;
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
        let wanted = offsets::wanted(entries, |t| {
            self.placement(t)
                .is_some_and(|p| p.primary == peer && p.mirrors.contains(&self.region))
        });
        // What the primary last told us it holds (its heartbeat) bounds what is installed.
        let primary = self
            .liveness()
            .reports()
            .get(peer)
            .map(|r| r.heartbeat.clone());
        if primary.is_none() || wanted.is_empty() {
            return Ok(0);
        }
        let mine = self.offsets(wanted.keys().cloned().collect()).await?;
        let commit = offsets::clamped(wanted, primary.as_ref(), &mine.topics);
        let n = commit.values().map(Vec::len).sum();
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
                    .filter(|t| self.ships(t.name.0.as_str(), peer))
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

    /// Keep a connection to `peer` and a stream per partition of every topic it mirrors (plus
    /// a second connection for the second copy of topics with `wire_copies = 2`).
    async fn source_link(self: Arc<Self>, peer: String) {
        let (conn_tx, conn_rx) = watch::channel::<Option<quinn::Connection>>(None);
        tokio::spawn(self.clone().keep_connected(peer.clone(), conn_tx, "peer"));
        let copies_rx = if self.sends_copies_to(&peer) {
            let (tx, rx) = watch::channel::<Option<quinn::Connection>>(None);
            tokio::spawn(self.clone().keep_connected(peer.clone(), tx, "second-copy"));
            Some(rx)
        } else {
            None
        };
        {
            let me = self.clone();
            let rx = conn_rx.clone();
            let pr = peer.clone();
            tokio::spawn(async move { me.offset_sync(pr, rx).await });
        }
        {
            let me = self.clone();
            let rx = conn_rx.clone();
            let pr = peer.clone();
            tokio::spawn(async move { me.heartbeats(pr, rx).await });
        }
        // Discover topics and start one task per partition this region ships to `peer`; a
        // task ends when a failover moves the topic away, and starts again if it comes back.
        let started: Arc<Mutex<HashSet<(String, i32)>>> = Arc::default();
        loop {
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
                                tokio::spawn(async move {
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
    async fn keep_connected(
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
    fn sends_copies_to(&self, peer: &str) -> bool {
        self.topology.topics.iter().any(|r| {
            let regions = failover::rule_regions(r);
            r.wire_copies > 1 && regions.contains(&self.region) && regions.iter().any(|x| x == peer)
        })
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
        copies_rx: Option<watch::Receiver<Option<quinn::Connection>>>,
    ) {
        loop {
            if !self.ships(&topic, &peer) {
                tracing::info!(%peer, %topic, partition, "no longer shipped from here (failover)");
                return;
            }
            let conn = loop {
                if let Some(c) = conn_rx.borrow_and_update().clone() {
                    break c;
                }
                if conn_rx.changed().await.is_err() {
                    return;
                }
            };
            if let Err(e) = self
                .source_stream(&conn, copies_rx.clone(), &peer, &topic, partition, count)
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
        let mut fetch_client = Client::connect(&self.broker)
            .await
            .map_err(|x| x.to_string())?;
        let mut ack_client = self.broker_client().await?;
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
                let (err, bytes, end) =
                    fetch_raw(&mut fetch_client, topic, partition, sent).await?;
                if err != 0 {
                    return Err(format!("fetch {topic}-{partition} at {sent}: error {err}"));
                }
                source_end.store(end, Ordering::Relaxed);
                metrics::gauge!("ferry_mirror_source_end_offset", &labels).set(end as f64);
                let acked = *acked_rx.borrow();
                metrics::gauge!("ferry_mirror_lag_records", &labels)
                    .set((end - acked).max(0) as f64);
                let Some(span) = whole_batches_from(&bytes, sent) else {
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
                let first_offset = span.first_offset;
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
    async fn run(mut self, conn: &quinn::Connection) -> Result<(), String> {
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

/// A BATCHES frame's batches, checked (CRC, whole, the first at `first_offset`): the offset
/// after the last.
fn check_frame(first_offset: i64, batches: &[u8]) -> Result<i64, String> {
    let parts = batch::split(batches).map_err(|x| format!("corrupt batch: {x}"))?;
    match (parts.first(), parts.last()) {
        (Some((_, a)), Some((_, b))) if a.base_offset == first_offset => Ok(b.next_offset()),
        _ => Err("frame offset disagrees with its first batch".into()),
    }
}

/// In a fetch answer, the whole batches that hold offsets at or past `from` (a partial batch at
/// the end waits for the next fetch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    /// Their byte range in the answer.
    start: usize,
    end: usize,
    /// The first one's base offset and timestamp.
    first_offset: i64,
    first_timestamp: i64,
    /// The offset after the last.
    next: i64,
    /// Whether the client sent every one of them uncompressed.
    uncompressed: bool,
}

fn whole_batches_from(bytes: &[u8], from: i64) -> Option<Span> {
    let mut span: Option<Span> = None;
    for (range, h) in batch::whole_batches(bytes) {
        if h.next_offset() <= from {
            continue;
        }
        let plain = matches!(h.compression(), Ok(batch::Compression::None));
        let s = span.get_or_insert(Span {
            start: range.start,
            end: range.start,
            first_offset: h.base_offset,
            first_timestamp: h.base_timestamp,
            next: from,
            uncompressed: true,
        });
        s.end = range.end;
        s.next = h.next_offset();
        s.uncompressed &= plain;
    }
    span
}

/// Fetch raw record batches from the local broker (long poll, 500 ms).
async fn fetch_raw(
    c: &mut Client,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<(i16, Bytes, i64), String> {
    let bounds = crate::client::FetchBounds {
        max_wait_ms: 500,
        min_bytes: 1,
        max_bytes: CHUNK_BYTES,
    };
    let p = c
        .fetch_partition(topic, partition, offset, bounds)
        .await
        .map_err(|e| e.to_string())?;
    Ok((p.error_code, p.records, p.high_watermark))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetch_answer_is_cut_to_whole_batches_from_the_resume_offset() {
        use crate::batch::build::{batch, Record};
        let rec = |v: &str| Record {
            value: Some(v.as_bytes().to_vec()),
            ..Default::default()
        };
        let mut bytes = batch(10, 1000, None, &[rec("a"), rec("b")]); // 10, 11
        let second_at = bytes.len();
        bytes.extend(batch(12, 2000, None, &[rec("c")])); // 12
        let third_at = bytes.len();
        bytes.extend(batch(13, 3000, None, &[rec("d"), rec("e")])); // 13, 14
        let all = bytes.len();
        let span = whole_batches_from(&bytes, 10).unwrap();
        assert_eq!(
            span,
            Span {
                start: 0,
                end: all,
                first_offset: 10,
                first_timestamp: 1000,
                next: 15,
                uncompressed: true
            }
        );
        // Resuming at 12 skips the first batch.
        let span = whole_batches_from(&bytes, 12).unwrap();
        assert_eq!(
            (span.start, span.first_offset, span.first_timestamp),
            (second_at, 12, 2000)
        );
        // A partial batch at the end waits for the next fetch.
        let span = whole_batches_from(&bytes[..all - 3], 10).unwrap();
        assert_eq!((span.end, span.next), (third_at, 13));
        assert_eq!(whole_batches_from(&bytes[..all - 3], 13), None);
        assert_eq!(whole_batches_from(&bytes, 15), None);
        assert_eq!(whole_batches_from(&[], 0), None);
    }

    #[test]
    fn installed_offsets_never_pass_the_mirror_end() {
        assert_eq!(clamp_offset(120, 100), 100);
        assert_eq!(clamp_offset(80, 100), 80);
        assert_eq!(clamp_offset(0, 0), 0);
    }
}
