//! A broker's membership in its region's cluster: the runtime shell that registers the broker
//! in etcd under a lease, keeps the lease alive, watches the metadata into an [`Image`] every
//! part of the broker can read, campaigns for the controller key and, while it holds it,
//! drives the [`Controller`] machine and makes its writes.
//!
//! When etcd is unreachable the last image stays in force (the data path keeps serving with the
//! leaders it knows) and metadata changes wait: the member retries with a bounded backoff, then
//! reads the whole image again and resumes the watch. If its lease expired meanwhile, it
//! registers again under a new one (the controller has moved its leaderships by then).
//!
//! Owns: the lease, the registration, the watch loop, the controller's I/O.
//! Does not own: the controller's decisions ([`super::controller`]), the store calls
//! ([`super::etcd`]), or what a broker does with the image (replication, the Kafka APIs).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};
use uuid::Uuid;

use super::controller::{Controller, Rebalance, Report};
use super::etcd::{Outcome, Store, StoreError};
use super::metadata::{BrokerId, BrokerInfo, Change, Image, Versioned};

/// How a broker joins its cluster.
#[derive(Debug, Clone)]
pub struct MemberConfig {
    pub id: BrokerId,
    /// The Kafka listener other brokers and clients are sent to.
    pub host: String,
    pub port: u16,
    pub rack: Option<String>,
    /// etcd client URLs.
    pub etcd: Vec<String>,
    /// The cluster's name (the region's): its keys live under `/ferry/<cluster>/`.
    pub cluster: String,
    /// Lease time to live: a broker silent this long is dead (Kafka's
    /// `broker.session.timeout.ms`, 9 s there).
    pub session_ttl_s: i64,
    pub rebalance: Option<Rebalance>,
    /// The region's position in the topology (the low byte of the leader epochs it gives).
    pub region_index: usize,
}

/// What the rest of the broker holds of its membership.
#[derive(Clone)]
pub struct Member {
    id: BrokerId,
    image: watch::Receiver<Arc<Image>>,
    store: Store,
}

impl Member {
    pub fn id(&self) -> BrokerId {
        self.id
    }

    /// The latest image.
    pub fn image(&self) -> Arc<Image> {
        self.image.borrow().clone()
    }

    /// A receiver that wakes on every image change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Image>> {
        self.image.clone()
    }

    /// The store, for writes a broker makes itself (topic creation, ISR changes).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Wait until `pred` holds for the image, up to `timeout`; the image it held for.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&Image) -> bool,
    ) -> Option<Arc<Image>> {
        let mut rx = self.image.clone();
        let r = tokio::time::timeout(timeout, async {
            loop {
                let img = rx.borrow_and_update().clone();
                if pred(&img) {
                    return Some(img);
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        r.ok().flatten()
    }
}

/// Join the cluster: connect to etcd, register, read the image; then keep all of it going in
/// a task until `shutdown` turns true (the lease is then revoked, so the broker's keys go at
/// once). Errors only if etcd cannot be reached at the start.
pub async fn join(
    cfg: MemberConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(Member, tokio::task::JoinHandle<()>), StoreError> {
    let store = Store::connect(&cfg.etcd, &cfg.cluster).await?;
    let info = BrokerInfo {
        id: cfg.id,
        host: cfg.host.clone(),
        port: cfg.port,
        rack: cfg.rack.clone(),
        incarnation: Uuid::new_v4(),
    };
    let lease = store.grant(cfg.session_ttl_s).await?;
    store.register(&info, lease).await?;
    let (image, revision) = store.read().await?;
    let (tx, rx) = watch::channel(Arc::new(image));
    let member = Member {
        id: cfg.id,
        image: rx,
        store: store.clone(),
    };
    let mut run = Run {
        controller: Controller::new(cfg.region_index, cfg.rebalance),
        cfg,
        store,
        info,
        lease,
        image: tx,
        started: Instant::now(),
    };
    let task = tokio::spawn(async move {
        run.main(revision, &mut shutdown).await;
    });
    Ok((member, task))
}

struct Run {
    cfg: MemberConfig,
    store: Store,
    info: BrokerInfo,
    lease: i64,
    image: watch::Sender<Arc<Image>>,
    controller: Controller,
    started: Instant,
}

impl Run {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    async fn main(&mut self, mut revision: i64, shutdown: &mut watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.session(revision, shutdown).await {
                Ok(()) => break,
                Err(e) => {
                    if self.controller.is_active() {
                        warn!(broker = self.cfg.id, "controller paused: {e}");
                    } else {
                        warn!(broker = self.cfg.id, "cluster metadata paused: {e}");
                    }
                    self.controller.deactivate();
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                break;
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
            match self.resync().await {
                Ok(r) => {
                    revision = r;
                    backoff = Duration::from_millis(100);
                    info!(
                        broker = self.cfg.id,
                        "cluster metadata resumed at revision {r}"
                    );
                }
                Err(e) => warn!(broker = self.cfg.id, "etcd still unreachable: {e}"),
            }
        }
        // A clean stop: the registration (and the controller key) go now, not at lease expiry.
        if let Err(e) = self.store.revoke(self.lease).await {
            warn!(broker = self.cfg.id, "could not revoke the lease: {e}");
        }
    }

    /// Read the whole image again (after the watch ended) and renew or replace the lease.
    async fn resync(&mut self) -> Result<i64, StoreError> {
        match self.store.renew(self.lease).await {
            Ok(()) => {}
            Err(StoreError::LeaseExpired(_)) => {
                self.lease = self.store.grant(self.cfg.session_ttl_s).await?;
                warn!(
                    broker = self.cfg.id,
                    "the lease expired while etcd was away: registering again"
                );
            }
            Err(e) => return Err(e),
        }
        self.store.register(&self.info, self.lease).await?;
        let (image, revision) = self.store.read().await?;
        self.image.send_replace(Arc::new(image));
        Ok(revision)
    }

    /// Watch, renew and control until the watch fails (Err) or shutdown (Ok).
    async fn session(
        &mut self,
        revision: i64,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), StoreError> {
        let mut watch = self.store.watch(revision).await?;
        let renew_every =
            Duration::from_millis((self.cfg.session_ttl_s as u64 * 1000 / 3).max(200));
        let mut renew = tokio::time::interval(renew_every);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.campaign_if_free().await?;
        loop {
            self.drive().await?;
            let timer = self
                .controller
                .poll_timeout()
                .map(|t| self.started + Duration::from_millis(t));
            tokio::select! {
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        return Ok(());
                    }
                }
                _ = renew.tick() => {
                    match self.store.renew(self.lease).await {
                        Ok(()) => {}
                        Err(StoreError::LeaseExpired(l)) => {
                            // Everything bound to the lease is gone: start over.
                            return Err(StoreError::LeaseExpired(l));
                        }
                        Err(e) => return Err(e),
                    }
                }
                _ = sleep_until(timer) => {
                    let now = self.now();
                    self.controller.on_timeout(now);
                }
                next = watch.next() => {
                    let (changes, _rev) = next?;
                    let mut image = (**self.image.borrow()).clone();
                    let mut controller_free = false;
                    let mut registration_gone = false;
                    for c in changes {
                        match &c {
                            Change::Controller(None) => controller_free = true,
                            Change::Controller(Some(id)) if *id != self.cfg.id && self.controller.is_active() => {
                                warn!(broker = self.cfg.id, "broker {id} holds the controller key now");
                                self.controller.deactivate();
                            }
                            Change::BrokerGone(id) if *id == self.cfg.id => registration_gone = true,
                            _ => {}
                        }
                        image.apply(c.clone());
                        if self.controller.is_active() {
                            self.controller.on_change(c);
                        }
                    }
                    self.image.send_replace(Arc::new(image));
                    if registration_gone {
                        return Err(StoreError::LeaseExpired(self.lease));
                    }
                    if controller_free {
                        self.campaign_if_free().await?;
                    }
                }
            }
        }
    }

    async fn campaign_if_free(&mut self) -> Result<(), StoreError> {
        if self.controller.is_active() {
            return Ok(());
        }
        let holder = self.image.borrow().controller;
        // Still ours after a pause (the key lives as long as our lease): take up again.
        let ours = holder == Some(self.cfg.id);
        if ours || (holder.is_none() && self.store.campaign(self.cfg.id, self.lease).await?) {
            // Read after winning: the image the decisions start from is at least as new as
            // the key, so nothing that happened before the election is missed.
            let (image, _) = self.store.read().await?;
            info!(
                broker = self.cfg.id,
                brokers = image.brokers.len(),
                partitions = image.partitions.len(),
                "this broker is the controller"
            );
            let now = self.now();
            self.controller.activate(image, now);
        }
        Ok(())
    }

    /// Make the controller's writes until it has none.
    async fn drive(&mut self) -> Result<(), StoreError> {
        loop {
            let writes = self.controller.poll_writes();
            if writes.is_empty() {
                break;
            }
            for w in writes {
                match self.store.write_partition(&w).await {
                    Ok(Outcome::Written(version)) => {
                        info!(
                            broker = self.cfg.id,
                            topic = %w.key.0,
                            partition = w.key.1,
                            leader = w.state.leader,
                            leader_epoch = w.state.leader_epoch,
                            isr = ?w.state.isr,
                            why = ?w.why,
                            "partition state changed"
                        );
                        self.controller.on_change(Change::Partition(
                            w.key.clone(),
                            Versioned {
                                value: w.state.clone(),
                                version,
                            },
                        ));
                    }
                    Ok(Outcome::Stale) => self.controller.on_write_failed(&w.key, true),
                    Err(e) => {
                        self.controller.on_write_failed(&w.key, false);
                        return Err(e);
                    }
                }
            }
        }
        for r in self.controller.take_reports() {
            match r {
                Report::Unclean {
                    key,
                    leader,
                    leader_epoch,
                    old_isr,
                } => {
                    metrics::counter!("ferry_unclean_elections_total").increment(1);
                    warn!(
                        topic = %key.0,
                        partition = key.1,
                        leader,
                        leader_epoch,
                        ?old_isr,
                        "UNCLEAN leader election: records acknowledged by the old ISR beyond the new leader's log end are lost"
                    );
                }
            }
        }
        Ok(())
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
