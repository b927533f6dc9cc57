//! The gateway's control side: heartbeats to and from every peer, the lease loop (automatic
//! promotion, lapsed fences, the broker's lease renewal) and the config overrides a mirror
//! follows. The decisions are [`crate::mirror::core::liveness`]'s; this is their I/O.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

use super::*;
use crate::client::Client;
use crate::kafka::control::{Control, OffsetsAnswer, PartitionOffsets};
use crate::mirror::core::{liveness, Liveness};
use crate::mirror::frame::{self, Frame};

/// What the control task is asked. It alone owns the region's [`Liveness`]: heartbeat
/// streams, the admin API and offset installs reach it through this channel.
pub(crate) enum Command {
    /// A peer's heartbeat (from its certificate's region): the answer comes back.
    Heartbeat {
        peer: String,
        sent_at: Millis,
        hb: Box<Heartbeat>,
        reply: oneshot::Sender<liveness::Answer>,
    },
    /// A peer answered one of our heartbeats.
    Ack { peer: String, credit: Millis },
    /// Our heartbeat as sent at `sent_at`, from the broker's offsets then.
    Compose {
        sent_at: Millis,
        offsets: OffsetsAnswer,
        reply: oneshot::Sender<Heartbeat>,
    },
    /// A peer's last heartbeat.
    Report {
        peer: String,
        reply: oneshot::Sender<Option<PeerReport>>,
    },
    /// The lease and every peer's last heartbeat (the admin API's `/v1/state`).
    View { reply: oneshot::Sender<View> },
    /// Whether a forced promotion may replace `from` now.
    MayTakeOver {
        from: String,
        reply: oneshot::Sender<bool>,
    },
    /// What replacing `from` may lose, given our logs (`None`: never heard from it).
    Loss {
        from: String,
        ours: BTreeMap<String, Vec<PartitionOffsets>>,
        reply: oneshot::Sender<Option<Vec<liveness::Loss>>>,
    },
    /// A forced promotion here replaced `from`.
    Forced { from: String },
    /// Cut (or heal) the link to a peer (drills).
    Cut {
        peer: String,
        cut: bool,
        reply: oneshot::Sender<()>,
    },
}

/// The lease and the peers as the control task sees them.
#[derive(Debug, Clone)]
pub struct View {
    pub now: Millis,
    pub may_write: bool,
    /// ms left of the write lease, if there is one.
    pub remaining_ms: Option<u64>,
    pub peers: BTreeMap<String, PeerReport>,
}

impl Gateway {
    /// Ask the control task; an error when the gateway is stopping.
    pub(crate) async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, String> {
        let stopping = || "the gateway is stopping".to_string();
        let (tx, rx) = oneshot::channel();
        self.control.send(make(tx)).await.map_err(|_| stopping())?;
        rx.await.map_err(|_| stopping())
    }

    /// Tell the control task something that needs no answer.
    pub(crate) async fn tell(&self, c: Command) {
        let _ = self.control.send(c).await;
    }

    /// The control task: owns the region's [`Liveness`], answers [`Command`]s, and under lease
    /// fencing runs the lease loop every `heartbeat / 4`: first the automatic promotions that
    /// are due (a promotion restarts the lease, which must not be renewed from before it), then
    /// the fences that lapsed, then the broker's write lease, renewed while a majority (or the
    /// witness) answers our heartbeats; not renewed otherwise, so the broker stops taking writes
    /// when it runs out. Ends when every sender of commands is gone.
    pub(super) async fn control_task(
        self: Arc<Self>,
        mut live: Liveness,
        mut rx: mpsc::Receiver<Command>,
    ) {
        // One connection per broker of the region (each gates its own writes by the lease).
        let mut clients: Vec<Option<Client>> = Vec::new();
        loop {
            // The lease loop's deadline is the core's (`Liveness::poll_timeout`).
            let due = live.poll_timeout();
            let timer = async {
                match due {
                    Some(t) => tokio::time::sleep_until(self.instant_at(t)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                c = rx.recv() => match c {
                    Some(c) => self.handle(&mut live, c),
                    None => return,
                },
                _ = timer => {
                    self.lease_tick(&mut live, &mut clients).await;
                    live.on_timeout(self.now());
                }
            }
        }
    }

    fn handle(&self, live: &mut Liveness, c: Command) {
        let now = self.now();
        match c {
            Command::Heartbeat {
                peer,
                sent_at,
                hb,
                reply,
            } => {
                let a = live.on_heartbeat(&self.topology, &self.state(), &peer, sent_at, *hb, now);
                let _ = reply.send(a);
            }
            Command::Ack { peer, credit } => live.on_ack(&peer, credit),
            Command::Compose {
                sent_at,
                offsets,
                reply,
            } => {
                let hb = live.heartbeat(
                    &self.topology,
                    sent_at,
                    &self.state(),
                    &offsets.topics,
                    &offsets.configs,
                    crate::clock::now_ms(),
                );
                let _ = reply.send(hb);
            }
            Command::Report { peer, reply } => {
                let _ = reply.send(live.reports().get(&peer).cloned());
            }
            Command::View { reply } => {
                let _ = reply.send(View {
                    now,
                    may_write: live.lease().may_write(now),
                    remaining_ms: live
                        .lease()
                        .write_lease_until()
                        .map(|u| u.saturating_sub(now)),
                    peers: live.reports().clone(),
                });
            }
            Command::MayTakeOver { from, reply } => {
                let _ = reply.send(live.may_take_over(&from, now));
            }
            Command::Loss { from, ours, reply } => {
                let _ = reply.send(live.loss(&from, &ours));
            }
            Command::Forced { from } => live.forced(&from),
            Command::Cut { peer, cut, reply } => {
                self.set_cut(&peer, cut);
                let _ = reply.send(());
            }
        }
    }

    async fn lease_tick(&self, live: &mut Liveness, clients: &mut Vec<Option<Client>>) {
        let now = self.now();
        for p in live.promotions(&self.topology, &self.state(), now) {
            self.auto_promote(live, p).await;
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
        let Some(until) = live.renewal(now) else {
            return;
        };
        // Bounded, so that a broker that does not answer holds up the heartbeat answers this
        // task gives for at most a lease step. `ms` is taken just before it is sent, as
        // before: the broker counts it from when it reads the request.
        let step = self.topology.failover.heartbeat / 4;
        let brokers = self.region_brokers();
        clients.resize_with(brokers.len(), || None);
        let renewed = tokio::time::timeout(step, async {
            let mut failed = Vec::new();
            for (addr, client) in brokers.iter().zip(clients.iter_mut()) {
                if client.is_none() {
                    *client = Client::connect_internal(addr, &self.internal).await.ok();
                }
                let ms = until.saturating_sub(self.now());
                let r = match client.as_mut() {
                    Some(c) => c
                        .control(&Control::RenewLease { ms })
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    None => Err("not reachable".to_string()),
                };
                if let Err(e) = r {
                    failed.push(format!("{addr}: {e}"));
                    *client = None;
                }
            }
            failed
        })
        .await;
        match renewed {
            Ok(failed) if failed.is_empty() => {}
            Ok(failed) => {
                tracing::debug!(errors = ?failed, "renewing the brokers' write lease");
            }
            Err(_) => {
                tracing::debug!("renewing the brokers' write lease: no answer within {step:?}");
                clients.iter_mut().for_each(|c| *c = None);
            }
        }
    }

    /// Carry out an automatic promotion. The broker stops taking writes until a majority has
    /// answered a heartbeat that carries the new epoch (finding 6 of the simulator): its lease
    /// ends now, the promotion is applied, answers to earlier heartbeats stop counting, and a
    /// heartbeat goes out at once. Our own writes before a majority knows the epoch could
    /// otherwise be overruled by an operator who never heard of it.
    async fn auto_promote(&self, live: &mut Liveness, p: liveness::AutoPromotion) {
        // What it may cost, from our logs before the promotion (as `/v1/promote` reports a
        // forced one).
        let ours = self.offsets(Vec::new()).await.ok();
        // Every broker of the region: one that kept its lease could take writes under the new
        // epoch before a majority knows it.
        let mut expired = Ok(());
        for c in self.every_broker().await {
            let r = match c {
                Ok(mut c) => c
                    .control(&Control::RenewLease { ms: 0 })
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            if r.is_err() {
                expired = r;
                break;
            }
        }
        if let Err(e) = expired {
            tracing::warn!(pattern = %p.pattern, error = %e, "automatic promotion postponed: the broker's lease could not be ended");
            return;
        }
        match self.apply(&p.pattern, p.new.clone()).await {
            Ok(_) => {
                live.promoted(self.now());
                self.heartbeat_now.send_modify(|n| *n += 1);
                metrics::counter!("ferry_automatic_promotions_total").increment(1);
                let loss = ours.and_then(|o| live.loss(&p.from, &o.topics));
                tracing::warn!(pattern = %p.pattern, from = %p.from, epoch = p.new.epoch, ?loss,
                    "automatic promotion: the primary's lease ran out");
            }
            Err(e) => {
                tracing::warn!(pattern = %p.pattern, error = %e, "automatic promotion failed")
            }
        }
    }
}

impl Gateway {
    /// Give the topics this region mirrors from `peer` the config overrides `peer` has for
    /// them, when they changed since last applied (a topic not created here yet is tried again
    /// at the next heartbeat).
    pub(super) async fn follow_configs(
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
            let req = Control::SetConfigs {
                topic: topic.clone(),
                configs: c.clone(),
            };
            // Topic configs are each broker's own: every broker of the region takes them.
            let mut answer = Err(String::from("no broker answered"));
            for client in self.every_broker().await {
                let Ok(mut client) = client else {
                    return;
                };
                answer = client.control(&req).await.map_err(|e| e.to_string());
                if answer.is_err() {
                    break;
                }
            }
            match answer {
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

    /// Move the log start of each partition this region mirrors from `peer` up to `peer`'s
    /// (DeleteRecords there), at the mirror partition's leader, as far as the mirror holds; a
    /// mirror behind it is moved again at a later heartbeat.
    pub(super) async fn follow_starts(&self, peer: &str, starts: &BTreeMap<String, Vec<i64>>) {
        for (topic, parts) in starts {
            let ours = self.placement(topic);
            if !ours.is_some_and(|p| p.primary == peer && p.mirrors.contains(&self.region)) {
                continue;
            }
            for (p, start) in parts.iter().enumerate() {
                let key = (topic.clone(), p as i32);
                let done = self
                    .starts_applied
                    .lock()
                    .expect("starts lock")
                    .get(&key)
                    .copied()
                    .unwrap_or(0);
                if *start <= done {
                    continue;
                }
                let Ok(mut client) = self.leader_client(topic, p as i32).await else {
                    continue;
                };
                let req = Control::AdvanceStart {
                    topic: topic.clone(),
                    partition: p as i32,
                    offset: *start,
                };
                match client.control(&req).await {
                    Ok(v) => {
                        if let Some(now) = v.get("log_start").and_then(|s| s.as_i64()) {
                            self.starts_applied
                                .lock()
                                .expect("starts lock")
                                .insert(key, now);
                        }
                    }
                    Err(e) => {
                        self.forget_leader(topic, p as i32);
                        tracing::debug!(%topic, partition = p, error = %e, "log start not followed yet");
                    }
                }
            }
        }
    }

    /// Our heartbeat, as sent at `sent_at` (the control task reads the state after it).
    pub(super) async fn heartbeat(&self, sent_at: Millis) -> Heartbeat {
        let o = self.offsets(Vec::new()).await.unwrap_or(OffsetsAnswer {
            topics: BTreeMap::new(),
            configs: BTreeMap::new(),
        });
        self.ask(|reply| Command::Compose {
            sent_at,
            offsets: o,
            reply,
        })
        .await
        .unwrap_or_default()
    }

    /// Send a heartbeat to `peer` every `failover.heartbeat` on our connection to it; each
    /// answer renews our lease.
    pub(super) async fn heartbeats(
        self: Arc<Self>,
        peer: String,
        mut conn_rx: watch::Receiver<Option<quinn::Connection>>,
    ) {
        let every = self.topology.failover.heartbeat;
        let mut now_rx = self.heartbeat_now.subscribe();
        loop {
            let Some(conn) = next_connection(&mut conn_rx).await else {
                return;
            };
            let r: Result<(), String> = async {
                let (mut tx, mut rx) = conn.open_bi().await.map_err(|x| x.to_string())?;
                loop {
                    // The send time is taken before the state is read: an answer to a
                    // heartbeat sent after a promotion always acknowledges the new epoch.
                    let sent_at = self.now();
                    let hb = self.heartbeat(sent_at).await;
                    let json = serde_json::to_string(&hb).expect("serialisable");
                    frame::write(&mut tx, &Frame::State { sent_at, json })
                        .await
                        .map_err(|x| x.to_string())?;
                    match tokio::time::timeout(every * 2, frame::read(&mut rx)).await {
                        // 0: the peer withholds credit (we are behind on an epoch, or
                        // back from a long silence).
                        Ok(Ok(Some(Frame::StateAck { sent_at }))) => {
                            self.tell(Command::Ack {
                                peer: peer.clone(),
                                credit: sent_at,
                            })
                            .await;
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
    pub(super) async fn sink_heartbeats(
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
            let starts = hb.starts.clone();
            let answer = self
                .ask(|reply| Command::Heartbeat {
                    peer: peer.to_string(),
                    sent_at,
                    hb: Box::new(hb),
                    reply,
                })
                .await?;
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
            self.follow_starts(peer, &starts).await;
        }
    }
}
