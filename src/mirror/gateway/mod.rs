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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub(crate) mod control;
mod offset_sync;
mod region;
mod sinks;
mod sources;

pub use super::core::{clamp_offset, Heartbeat, PeerReport};
use super::core::{offsets, source, Liveness};
use super::frame::Frame;
use crate::client::Client;
use crate::failover::lease::Millis;
use crate::failover::{self, Placement, RegionState, RuleState};
use crate::kafka::control::{Control, OffsetsAnswer, StateAnswer};
use crate::topology::Topology;

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
    /// The local broker's Kafka address (in a region cluster, the first of the topology's;
    /// [`region`] finds the others and each partition's leader).
    pub broker: String,
    /// How to reach the broker's internal door (mutual TLS with this region's certificate):
    /// MirrorAppend, MirrorAck and FerryControl are served only there.
    pub internal: crate::transport::trust::TlsTarget,
    pub endpoint: quinn::Endpoint,
    /// The broker's failover state (`None` until first read).
    state: watch::Sender<Option<RegionState>>,
    /// The control task's inbox: it alone owns the region's [`Liveness`] (heartbeats, the
    /// lease, the replaced set, the peers' reports).
    control: tokio::sync::mpsc::Sender<control::Command>,
    /// What [`Gateway::run`] hands the control task: the machine and its inbox.
    control_parts: Mutex<Option<(Liveness, tokio::sync::mpsc::Receiver<control::Command>)>>,
    origin: Instant,
    /// Links cut through the admin API (drills), and the open connections per peer.
    /// Links cut by the control task (admin API), as it published them.
    cuts: watch::Sender<BTreeSet<String>>,
    conns: Mutex<BTreeMap<String, Vec<quinn::Connection>>>,
    /// Bumped after a promotion: every heartbeat loop sends its next heartbeat at once.
    heartbeat_now: watch::Sender<u64>,
    /// Config overrides last given to each mirror topic (from its primary's heartbeats).
    configs_applied: Mutex<BTreeMap<String, BTreeMap<String, String>>>,
    /// The log start each mirror partition was last given (from its primary's heartbeats).
    starts_applied: Mutex<BTreeMap<(String, i32), i64>>,
    /// The sinks of mirrored partitions, by the id their ROUTE frame gave out: the connection
    /// it was given on (a BATCHES stream must come on the same one) and where frames go.
    routes: Mutex<HashMap<u64, (usize, tokio::sync::mpsc::Sender<Frame>)>>,
    /// Durable log ends of the partitions mirrored here, shared by the sinks of a stream's two
    /// copies (`wire_copies = 2`): each learns at once what the other appended.
    mirror_ends: Mutex<HashMap<(String, i32), watch::Sender<i64>>>,
    /// In a region cluster: where each partition is led, as last learnt.
    leaders: Mutex<HashMap<(String, i32), String>>,
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
        let (control, inbox) = tokio::sync::mpsc::channel(1024);
        Arc::new(Gateway {
            topology,
            region,
            broker,
            internal,
            endpoint,
            state: watch::channel(None).0,
            control,
            control_parts: Mutex::new(Some((liveness, inbox))),
            origin: Instant::now(),
            cuts: watch::channel(BTreeSet::new()).0,
            conns: Mutex::new(BTreeMap::new()),
            configs_applied: Mutex::new(BTreeMap::new()),
            starts_applied: Mutex::new(BTreeMap::new()),
            heartbeat_now: watch::channel(0).0,
            routes: Mutex::new(HashMap::new()),
            mirror_ends: Mutex::new(HashMap::new()),
            leaders: Mutex::new(HashMap::new()),
        })
    }

    /// Milliseconds on this gateway's monotonic clock.
    pub fn now(&self) -> Millis {
        self.origin.elapsed().as_millis() as Millis
    }

    /// When this gateway's clock reads `ms`.
    pub(crate) fn instant_at(&self, ms: Millis) -> tokio::time::Instant {
        (self.origin + Duration::from_millis(ms)).into()
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
        self.cuts.borrow().contains(peer)
    }

    /// Cut (or heal) the link to `peer`: every connection to it is closed and none is made or
    /// accepted until healed. For drills on deployments whose network the drill cannot touch.
    /// Called by the control task (`Command::Cut`).
    fn set_cut(&self, peer: &str, cut: bool) {
        if cut {
            self.cuts.send_modify(|c| {
                c.insert(peer.to_string());
            });
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
        } else if self.cuts.send_if_modified(|c| c.remove(peer)) {
            tracing::warn!(%peer, "link healed through the admin API");
        }
    }

    fn track(&self, peer: &str, conn: &quinn::Connection) {
        let mut m = self.conns.lock().expect("conns lock");
        let v = m.entry(peer.to_string()).or_default();
        v.retain(|c| c.close_reason().is_none());
        v.push(conn.clone());
    }

    /// Move a rule to `new` in the local broker, and take the broker's state at once.
    pub async fn apply(&self, pattern: &str, new: RuleState) -> Result<bool, String> {
        let v = self.apply_report(pattern, new).await?;
        Ok(v.get("changed").and_then(|c| c.as_bool()).unwrap_or(false))
    }

    /// [`Gateway::apply`], with the broker's whole answer: `changed`, and the transactions the
    /// old primary left open that a promotion aborted (`aborted_transactions`).
    pub async fn apply_report(
        &self,
        pattern: &str,
        new: RuleState,
    ) -> Result<serde_json::Value, String> {
        let mut c = self.broker_client().await?;
        let v = c
            .control(&Control::Apply {
                pattern: pattern.to_string(),
                state: new,
            })
            .await
            .map_err(|e| e.to_string())?;
        self.refresh_state(&mut c).await?;
        Ok(v)
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

    /// Log ends and epoch histories of `topics` (every rule-covered topic when empty). In a
    /// region cluster each broker answers for the partitions it leads: the answers are merged,
    /// and a broker that does not answer leaves its partitions out.
    pub async fn offsets(&self, topics: Vec<String>) -> Result<OffsetsAnswer, String> {
        if !self.clustered() {
            return self
                .broker_client()
                .await?
                .control_as(&Control::Offsets { topics })
                .await
                .map_err(|e| e.to_string());
        }
        let mut merged: Option<OffsetsAnswer> = None;
        let mut last = String::new();
        for c in self.every_broker().await {
            let answer = match c {
                Ok(mut c) => c
                    .control_as::<OffsetsAnswer>(&Control::Offsets {
                        topics: topics.clone(),
                    })
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            match (answer, merged.as_mut()) {
                (Ok(a), None) => merged = Some(a),
                (Ok(a), Some(m)) => {
                    for (t, parts) in a.topics {
                        let e = m.topics.entry(t).or_default();
                        e.extend(parts);
                        e.sort_by_key(|p| p.partition);
                        e.dedup_by_key(|p| p.partition);
                    }
                    m.configs.extend(a.configs);
                }
                (Err(e), _) => last = e,
            }
        }
        merged.ok_or(last)
    }

    /// Run until `shutdown` completes; then stop every task, close the QUIC endpoint (the
    /// peers see the connections end at once) and wait briefly for the close to reach them.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        let Some((liveness, inbox)) = self.control_parts.lock().expect("control lock").take()
        else {
            tracing::error!("a gateway runs once");
            return;
        };
        // Every long-lived task: aborted when this set is dropped, and their own tasks with
        // them (each keeps its children in a set of its own).
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(self.clone().control_task(liveness, inbox));
        tasks.spawn(self.clone().state_poll());
        let start = async {
            // The broker's failover state first: it decides what this gateway ships.
            let mut rx = self.state.subscribe();
            while rx.borrow_and_update().is_none() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
            tasks.spawn(self.clone().accept_loop());
            for peer in self.peers() {
                tasks.spawn(self.clone().source_link(peer));
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            _ = start => {}
            _ = shutdown => {}
        }
        tracing::info!(region = %self.region, "stopping the gateway");
        tasks.shutdown().await;
        self.endpoint.close(0u32.into(), b"shutdown");
        // Let the close reach the peers, but do not wait for their idle timeout.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
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
}

/// The connection published on `rx` (by `keep_connected`), waiting while there is none;
/// `None` once its publisher is gone.
async fn next_connection(
    rx: &mut watch::Receiver<Option<quinn::Connection>>,
) -> Option<quinn::Connection> {
    loop {
        if let Some(c) = rx.borrow_and_update().clone() {
            return Some(c);
        }
        rx.changed().await.ok()?;
    }
}
