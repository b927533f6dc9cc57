//! The cluster metadata store on etcd: the I/O shell under [`super::controller`] and every
//! broker's view of the cluster.
//!
//! Every call is bounded in time ([`CALL_TIMEOUT`]); a store that does not answer is an error
//! the caller retries, never a hang. Writes of partition states are compare-and-swap on the
//! key's `mod_revision` (the [`Versioned::version`] the decision was made from); a topic is
//! created with its partitions' initial states in one transaction that succeeds only if the
//! topic key does not exist yet; the controller key and broker registrations are bound to the
//! broker's lease, so they vanish when it stops renewing.
//!
//! Owns: the etcd client, the lease and its renewal, the reads, the watch, the transactions.
//! Does not own: what to write (the controller and the broker decide) or when.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};

use super::controller::Write;
use super::metadata::{
    BrokerId, BrokerInfo, Change, Image, Keys, PartitionState, TopicAssignment, Versioned,
};

/// The longest any one call to etcd may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// What went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// (The cause is in the message, not chained: printed with its chain it would repeat.)
    #[error("etcd at {endpoints}: {cause}")]
    Etcd {
        endpoints: String,
        cause: etcd_client::Error,
    },
    #[error("etcd at {0} did not answer within {CALL_TIMEOUT:?}")]
    Timeout(String),
    #[error("metadata in etcd cannot be read: {0}")]
    Decode(String),
    #[error("the watch on etcd ended: {0}")]
    WatchEnded(String),
    #[error("the lease {0:x} expired in etcd")]
    LeaseExpired(i64),
}

/// A connection to one region's etcd, with the key layout of its cluster.
#[derive(Clone)]
pub struct Store {
    client: Client,
    keys: Keys,
    endpoints: String,
}

/// A write's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Written: the record's new version.
    Written(i64),
    /// The compare failed: someone wrote first, or the key is not what was expected.
    Stale,
}

impl Store {
    /// Connect to etcd at `endpoints` (URLs such as `http://127.0.0.1:2379`) for the cluster
    /// named `cluster`.
    pub async fn connect(endpoints: &[String], cluster: &str) -> Result<Store, StoreError> {
        let joined = endpoints.join(",");
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        let client = bounded(&joined, Client::connect(endpoints, Some(opts))).await?;
        Ok(Store {
            client,
            keys: Keys::new(cluster),
            endpoints: joined,
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// Read the whole metadata image, and the store revision it was read at (a watch from the
    /// next revision misses nothing).
    pub async fn read(&self) -> Result<(Image, i64), StoreError> {
        let mut c = self.client.clone();
        let resp = bounded(
            &self.endpoints,
            c.get(self.keys.root(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut image = Image::default();
        for kv in resp.kvs() {
            let key = kv
                .key_str()
                .map_err(|e| StoreError::Decode(format!("a key is not UTF-8: {e}")))?;
            if let Some(change) = self
                .keys
                .decode(key, Some(kv.value()), kv.mod_revision())
                .map_err(StoreError::Decode)?
            {
                image.apply(change);
            }
        }
        Ok((image, revision))
    }

    /// Watch every metadata change after `revision`.
    pub async fn watch(&self, revision: i64) -> Result<Watch, StoreError> {
        let mut c = self.client.clone();
        let stream = bounded(
            &self.endpoints,
            c.watch(
                self.keys.root(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            ),
        )
        .await?;
        Ok(Watch {
            stream,
            keys: self.keys.clone(),
            endpoints: self.endpoints.clone(),
        })
    }

    /// Grant a lease of `ttl` seconds.
    pub async fn grant(&self, ttl: i64) -> Result<i64, StoreError> {
        let mut c = self.client.clone();
        Ok(bounded(&self.endpoints, c.lease_grant(ttl, None))
            .await?
            .id())
    }

    /// Renew `lease` once. A lease etcd no longer knows is [`StoreError::LeaseExpired`].
    pub async fn renew(&self, lease: i64) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        let (mut keeper, mut answers) = bounded(&self.endpoints, c.lease_keep_alive(lease)).await?;
        bounded(&self.endpoints, keeper.keep_alive()).await?;
        match bounded(&self.endpoints, answers.message()).await? {
            Some(a) if a.ttl() > 0 => Ok(()),
            _ => Err(StoreError::LeaseExpired(lease)),
        }
    }

    /// Give `lease` back: its keys go at once (a clean shutdown).
    pub async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        bounded(&self.endpoints, c.lease_revoke(lease)).await?;
        Ok(())
    }

    /// Register a live broker under `lease`.
    pub async fn register(&self, info: &BrokerInfo, lease: i64) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        let value = serde_json::to_vec(info).expect("broker info serializes");
        bounded(
            &self.endpoints,
            c.put(
                self.keys.broker(info.id),
                value,
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await?;
        Ok(())
    }

    /// Try to become the controller: succeeds only if no one holds the key. The key is bound
    /// to `lease`, so it goes when this broker stops renewing.
    pub async fn campaign(&self, id: BrokerId, lease: i64) -> Result<bool, StoreError> {
        let key = self.keys.controller();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                id.to_string(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let mut c = self.client.clone();
        Ok(bounded(&self.endpoints, c.txn(txn)).await?.succeeded())
    }

    /// Run a compare-and-swap transaction: written at a revision, or stale.
    async fn swap(&self, txn: Txn) -> Result<Outcome, StoreError> {
        let mut c = self.client.clone();
        let resp = bounded(&self.endpoints, c.txn(txn)).await?;
        Ok(if resp.succeeded() {
            Outcome::Written(resp.header().map(|h| h.revision()).unwrap_or(0))
        } else {
            Outcome::Stale
        })
    }

    /// Make a controller write: compare-and-swap on the version it was decided from.
    pub async fn write_partition(&self, w: &Write) -> Result<Outcome, StoreError> {
        self.swap_partition(&w.key.0, w.key.1, w.expected_version, &w.state)
            .await
    }

    /// Replace a partition's state if its version is still `expected`.
    pub async fn swap_partition(
        &self,
        topic: &str,
        index: i32,
        expected: i64,
        state: &PartitionState,
    ) -> Result<Outcome, StoreError> {
        let key = self.keys.partition(topic, index);
        let value = serde_json::to_vec(state).expect("partition state serializes");
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                expected,
            )])
            .and_then([TxnOp::put(key, value, None)]);
        self.swap(txn).await
    }

    /// Replace a topic's record (its configs) if its version is still `expected`.
    pub async fn swap_topic(
        &self,
        expected: i64,
        t: &TopicAssignment,
    ) -> Result<Outcome, StoreError> {
        let key = self.keys.topic(&t.name);
        let value = serde_json::to_vec(t).expect("topic serializes");
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                expected,
            )])
            .and_then([TxnOp::put(key, value, None)]);
        self.swap(txn).await
    }

    /// Write the region's failover state if it is still at `expected` (its version; `None`:
    /// not written yet).
    pub async fn swap_failover(
        &self,
        expected: Option<i64>,
        state: &crate::failover::RegionState,
    ) -> Result<Outcome, StoreError> {
        let key = self.keys.failover();
        let value = serde_json::to_vec(state).expect("failover state serializes");
        let cmp = match expected {
            Some(v) => Compare::mod_revision(key.clone(), CompareOp::Equal, v),
            None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
        };
        self.swap(
            Txn::new()
                .when([cmp])
                .and_then([TxnOp::put(key, value, None)]),
        )
        .await
    }

    /// Create a topic with every partition's initial state, in one transaction; `Stale` if the
    /// topic exists.
    pub async fn create_topic(&self, t: &TopicAssignment) -> Result<Outcome, StoreError> {
        let key = self.keys.topic(&t.name);
        let mut ops = vec![TxnOp::put(
            key.clone(),
            serde_json::to_vec(t).expect("topic serializes"),
            None,
        )];
        for (p, replicas) in t.replicas.iter().enumerate() {
            ops.push(TxnOp::put(
                self.keys.partition(&t.name, p as i32),
                serde_json::to_vec(&PartitionState::initial(replicas)).expect("serializes"),
                None,
            ));
        }
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then(ops);
        self.swap(txn).await
    }

    /// Add partitions to a topic: its record grows to `t` (the existing replica sets first, as
    /// they were) and each new partition gets its initial state, in one transaction, if the
    /// record still has `version`.
    pub async fn add_partitions(
        &self,
        version: i64,
        have: usize,
        t: &TopicAssignment,
    ) -> Result<Outcome, StoreError> {
        let key = self.keys.topic(&t.name);
        let mut ops = vec![TxnOp::put(
            key.clone(),
            serde_json::to_vec(t).expect("topic serializes"),
            None,
        )];
        for (p, replicas) in t.replicas.iter().enumerate().skip(have) {
            ops.push(TxnOp::put(
                self.keys.partition(&t.name, p as i32),
                serde_json::to_vec(&PartitionState::initial(replicas)).expect("serializes"),
                None,
            ));
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, version)])
            .and_then(ops);
        self.swap(txn).await
    }

    /// Delete a topic and its partition states in one transaction, if it still has `version`.
    pub async fn delete_topic(
        &self,
        t: &Versioned<TopicAssignment>,
    ) -> Result<Outcome, StoreError> {
        let key = self.keys.topic(&t.value.name);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                t.version,
            )])
            .and_then([
                TxnOp::delete(key, None),
                TxnOp::delete(
                    self.keys.partitions_of(&t.value.name),
                    Some(etcd_client::DeleteOptions::new().with_prefix()),
                ),
            ]);
        self.swap(txn).await
    }
}

/// A watch on the cluster's metadata.
pub struct Watch {
    stream: etcd_client::WatchStream,
    keys: Keys,
    endpoints: String,
}

impl Watch {
    /// The next changes, in store order, with the revision they bring the image to. An error
    /// means the watch is over (etcd gone, or history compacted): read the image again.
    pub async fn next(&mut self) -> Result<(Vec<Change>, i64), StoreError> {
        loop {
            let resp = self
                .stream
                .message()
                .await
                .map_err(|e| StoreError::Etcd {
                    endpoints: self.endpoints.clone(),
                    cause: e,
                })?
                .ok_or_else(|| StoreError::WatchEnded("the stream closed".into()))?;
            if resp.canceled() {
                return Err(StoreError::WatchEnded(format!(
                    "canceled ({}; compacted at {})",
                    resp.cancel_reason(),
                    resp.compact_revision()
                )));
            }
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            let mut changes = Vec::new();
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let key = kv
                    .key_str()
                    .map_err(|e| StoreError::Decode(format!("a key is not UTF-8: {e}")))?;
                let value = match ev.event_type() {
                    EventType::Put => Some(kv.value()),
                    EventType::Delete => None,
                };
                if let Some(c) = self
                    .keys
                    .decode(key, value, kv.mod_revision())
                    .map_err(StoreError::Decode)?
                {
                    changes.push(c);
                }
            }
            if !changes.is_empty() {
                return Ok((changes, revision));
            }
        }
    }
}

/// Run one etcd call within [`CALL_TIMEOUT`].
async fn bounded<T>(
    endpoints: &str,
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(cause)) => Err(StoreError::Etcd {
            endpoints: endpoints.to_string(),
            cause,
        }),
        Err(_) => Err(StoreError::Timeout(endpoints.to_string())),
    }
}
