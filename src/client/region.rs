//! A client for a whole region, for Ferry's commands (`ferry status`, `quarantine`, `drill`):
//! each partition's request goes to the broker that leads it.
//!
//! A region of one broker has one address and this is a [`Client`] with a cache; a region
//! cluster answers a partition's reads only at its leader (NOT_LEADER_OR_FOLLOWER elsewhere),
//! so the client learns leaders from Metadata, keeps one connection per broker, and on an
//! error that means "ask elsewhere" (or a broken connection) forgets what it knew and asks
//! again, a bounded number of times.
//!
//! Owns: routing by leader and the connections. Does not own: the requests (the [`Client`]
//! methods) or what the commands do with the answers.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;

use super::{error_name, Client, ClientError, FetchBounds, FetchedPartition};
use crate::transport::trust::TlsTarget;

/// Tries of one partition request before its error is returned.
const TRIES: usize = 5;
/// The pause between tries (a leader election in a cluster takes about a second).
const PAUSE: Duration = Duration::from_millis(400);

/// Partition errors after which the request goes to a (re-learnt) leader.
fn ask_elsewhere(code: i16) -> bool {
    // UNKNOWN_TOPIC_OR_PARTITION (metadata not there yet), LEADER_NOT_AVAILABLE,
    // NOT_LEADER_OR_FOLLOWER, FENCED_LEADER_EPOCH, UNKNOWN_LEADER_EPOCH.
    matches!(code, 3 | 5 | 6 | 74 | 75)
}

pub struct RegionClient {
    region: String,
    /// Every broker of the region (its advertised Kafka address).
    brokers: Vec<String>,
    /// The internal door's TLS (for FerryControl); plain Kafka connections without it.
    tls: Option<TlsTarget>,
    conns: BTreeMap<String, Client>,
    /// topic → partition → leader address.
    leaders: BTreeMap<String, BTreeMap<i32, Option<String>>>,
    timeout: Duration,
}

impl RegionClient {
    pub fn new(region: &str, brokers: Vec<String>, tls: Option<TlsTarget>) -> RegionClient {
        RegionClient {
            region: region.to_string(),
            brokers,
            tls,
            conns: BTreeMap::new(),
            leaders: BTreeMap::new(),
            timeout: Duration::from_secs(30),
        }
    }

    /// The region `region` of a topology: every broker's advertised address.
    pub fn of_topology(
        t: &crate::topology::Topology,
        region: &str,
        tls: Option<TlsTarget>,
    ) -> Option<RegionClient> {
        let r = t.region(region)?;
        let brokers = r
            .brokers
            .iter()
            .map(|b| format!("{}:{}", b.advertised.0, b.advertised.1))
            .collect();
        Some(RegionClient::new(region, brokers, tls))
    }

    /// Answer within `timeout` or fail (each request).
    pub fn with_timeout(mut self, timeout: Duration) -> RegionClient {
        self.timeout = timeout;
        self
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn brokers(&self) -> &[String] {
        &self.brokers
    }

    /// The connection to `addr`, made if needed.
    pub async fn to(&mut self, addr: &str) -> Result<&mut Client, ClientError> {
        if !self.conns.contains_key(addr) {
            let mut c = match &self.tls {
                Some(t) => Client::connect_internal(addr, t).await?,
                None => Client::connect(addr).await?,
            };
            c.timeout = self.timeout;
            self.conns.insert(addr.to_string(), c);
        }
        Ok(self.conns.get_mut(addr).expect("just inserted"))
    }

    /// Drop the connection to `addr` (after an I/O error) and every leader learnt.
    fn forget(&mut self, addr: &str) {
        self.conns.remove(addr);
        self.leaders.clear();
    }

    /// A connection to any broker of the region that answers (the first that does), with its
    /// address.
    pub async fn any(&mut self) -> Result<(String, &mut Client), ClientError> {
        let mut last = None;
        let order: Vec<String> = self
            .conns
            .keys()
            .cloned()
            .chain(self.brokers.iter().cloned())
            .collect();
        for addr in order {
            match self.to(&addr).await {
                Ok(_) => {
                    let c = self.conns.get_mut(&addr).expect("connected");
                    return Ok((addr, c));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Kafka(format!("{}: no brokers", self.region))))
    }

    /// Run `f` on any broker that answers; a broken connection moves to the next.
    async fn on_any<T>(
        &mut self,
        mut f: impl for<'c> FnMut(
            &'c mut Client,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, ClientError>> + Send + 'c>,
        >,
    ) -> Result<T, ClientError> {
        let mut last = None;
        for _ in 0..self.brokers.len().max(1) {
            let (addr, c) = self.any().await?;
            match f(c).await {
                Ok(v) => return Ok(v),
                Err(e @ ClientError::Kafka(_)) => return Err(e),
                Err(e) => {
                    self.forget(&addr);
                    last = Some(e);
                }
            }
        }
        Err(last.expect("tried at least once"))
    }

    /// Every non-internal topic with its partition count.
    pub async fn topics(&mut self) -> Result<BTreeMap<String, i32>, ClientError> {
        self.on_any(|c| Box::pin(c.topics())).await
    }

    /// Every topic, internal ones too, with its partition count.
    pub async fn all_topics(&mut self) -> Result<BTreeMap<String, i32>, ClientError> {
        self.on_any(|c| Box::pin(all_topics(c))).await
    }

    /// FerryControl at any broker (the region's failover state is the same at each).
    pub async fn control_any(
        &mut self,
        req: &crate::kafka::control::Control,
    ) -> Result<serde_json::Value, ClientError> {
        let req = req.clone();
        self.on_any(move |c| {
            let req = req.clone();
            Box::pin(async move { c.control(&req).await })
        })
        .await
    }

    /// The address of the leader of `topic`-`partition`, from Metadata (cached).
    /// A region of one broker: that broker, whatever its Metadata says (a region a failover
    /// demoted names the new primary's broker as the leader, for producers to follow).
    pub async fn leader_of(&mut self, topic: &str, partition: i32) -> Result<String, ClientError> {
        if let [only] = self.brokers.as_slice() {
            return Ok(only.clone());
        }
        if let Some(Some(a)) = self.leaders.get(topic).and_then(|m| m.get(&partition)) {
            return Ok(a.clone());
        }
        let t = topic.to_string();
        let map = self
            .on_any(move |c| {
                let t = t.clone();
                Box::pin(async move { c.leaders(&t).await })
            })
            .await?;
        let leader = map.get(&partition).cloned().flatten();
        self.leaders.insert(topic.to_string(), map);
        leader.ok_or_else(|| {
            ClientError::Kafka(format!(
                "{}: {topic}-{partition} has no leader now",
                self.region
            ))
        })
    }

    /// Run `f` at the leader of `topic`-`partition`; it answers a partition error code with its
    /// value. A code that means "ask elsewhere" or no leader yet: learn the leader again and
    /// retry, [`TRIES`] times in all; a broken connection too if `retry_io` (not for writes: the
    /// broker may have taken the first).
    async fn at_leader<T>(
        &mut self,
        topic: &str,
        partition: i32,
        retry_io: bool,
        mut f: impl for<'c> FnMut(
            &'c mut Client,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<(i16, T), ClientError>> + Send + 'c>,
        >,
    ) -> Result<(i16, T), ClientError> {
        let mut last: Option<Result<(i16, T), ClientError>> = None;
        for i in 0..TRIES {
            if i > 0 {
                tokio::time::sleep(PAUSE).await;
            }
            let addr = match self.leader_of(topic, partition).await {
                Ok(a) => a,
                Err(e) => {
                    self.leaders.remove(topic);
                    last = Some(Err(e));
                    continue;
                }
            };
            let c = match self.to(&addr).await {
                Ok(c) => c,
                Err(e) => {
                    self.forget(&addr);
                    last = Some(Err(e));
                    continue;
                }
            };
            match f(c).await {
                Ok((code, v)) if ask_elsewhere(code) => {
                    self.leaders.remove(topic);
                    last = Some(Ok((code, v)));
                }
                Ok(answer) => return Ok(answer),
                Err(e @ ClientError::Kafka(_)) => return Err(e),
                Err(e) => {
                    self.forget(&addr);
                    if !retry_io {
                        return Err(e);
                    }
                    last = Some(Err(e));
                }
            }
        }
        last.expect("tried at least once")
    }

    /// Fetch one partition from its leader (see [`Client::fetch_partition`]).
    pub async fn fetch_partition(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        bounds: FetchBounds,
    ) -> Result<FetchedPartition, ClientError> {
        let t = topic.to_string();
        let (_, p) = self
            .at_leader(topic, partition, true, move |c| {
                let t = t.clone();
                Box::pin(async move {
                    let p = c.fetch_partition(&t, partition, offset, bounds).await?;
                    Ok((p.error_code, p))
                })
            })
            .await?;
        Ok(p)
    }

    /// Offsets of `partitions` of `topic` at `timestamp` (see [`Client::list_offsets`]), each
    /// from its partition's leader.
    pub async fn list_offsets(
        &mut self,
        topic: &str,
        partitions: &[i32],
        timestamp: i64,
    ) -> Result<BTreeMap<i32, i64>, ClientError> {
        let mut out = BTreeMap::new();
        for p in partitions {
            let t = topic.to_string();
            let (code, o) = self
                .at_leader(topic, *p, true, move |c| {
                    let t = t.clone();
                    let p = *p;
                    Box::pin(async move { list_one(c, &t, p, timestamp).await })
                })
                .await?;
            if code != 0 {
                return Err(ClientError::Kafka(format!(
                    "{}: list offsets {topic}-{p}: {} ({code})",
                    self.region,
                    error_name(code)
                )));
            }
            out.insert(*p, o);
        }
        Ok(out)
    }

    /// Each partition's last stable offset (ListOffsets latest with `read_committed`): below
    /// its log end while a transaction is open there.
    pub async fn last_stable_offsets(
        &mut self,
        topic: &str,
        partitions: &[i32],
    ) -> Result<BTreeMap<i32, i64>, ClientError> {
        let mut out = BTreeMap::new();
        for p in partitions {
            let t = topic.to_string();
            let (code, o) = self
                .at_leader(topic, *p, true, move |c| {
                    let t = t.clone();
                    let p = *p;
                    Box::pin(async move {
                        c.list_offsets_isolated(&t, &[p], -1, 1)
                            .await?
                            .remove(&p)
                            .ok_or_else(|| ClientError::Kafka(format!("no offsets for {t}-{p}")))
                    })
                })
                .await?;
            if code != 0 {
                return Err(ClientError::Kafka(format!(
                    "{}: list offsets {topic}-{p}: {} ({code})",
                    self.region,
                    error_name(code)
                )));
            }
            out.insert(*p, o);
        }
        Ok(out)
    }

    /// Produce batches to one partition at its leader (see [`Client::produce`]): the error
    /// code and base offset. A leader error (nothing written) is retried at the new leader; a
    /// broken connection is returned (the batch may or may not be written).
    pub async fn produce(
        &mut self,
        topic: &str,
        partition: i32,
        records: Bytes,
        acks: i16,
        timeout_ms: i32,
    ) -> Result<(i16, i64), ClientError> {
        let t = topic.to_string();
        self.at_leader(topic, partition, false, move |c| {
            let t = t.clone();
            let r = records.clone();
            Box::pin(async move { c.produce(&t, partition, r, acks, timeout_ms).await })
        })
        .await
    }

    /// FerryControl at the leader of `topic`-`partition` (Offsets: each broker of a cluster
    /// answers for the partitions it leads).
    pub async fn control_at_leader(
        &mut self,
        topic: &str,
        partition: i32,
        req: &crate::kafka::control::Control,
    ) -> Result<serde_json::Value, ClientError> {
        let addr = self.leader_of(topic, partition).await?;
        let c = self.to(&addr).await?;
        let r = c.control(req).await;
        if matches!(r, Err(ClientError::Io { .. } | ClientError::Timeout { .. })) {
            self.forget(&addr);
        }
        r
    }
}

impl RegionClient {
    /// The connection to the coordinator of consumer group `group`.
    pub async fn coordinator(&mut self, group: &str) -> Result<&mut Client, ClientError> {
        let g = group.to_string();
        let addr = self
            .on_any(move |c| {
                let g = g.clone();
                Box::pin(async move { c.find_coordinator(&g).await })
            })
            .await?;
        self.to(&addr).await
    }

    /// Drop every connection and leader learnt (after an error the caller saw).
    pub fn reset(&mut self) {
        self.conns.clear();
        self.leaders.clear();
    }
}

/// Every topic (internal ones too) with its partition count.
async fn all_topics(c: &mut Client) -> Result<BTreeMap<String, i32>, ClientError> {
    use kafka_protocol::messages::metadata_request::MetadataRequest;
    let mut req = MetadataRequest::default();
    req.topics = None;
    Ok(c.send(&req, 9)
        .await?
        .topics
        .into_iter()
        .filter(|t| t.error_code == 0)
        .filter_map(|t| t.name.map(|n| (n.0.to_string(), t.partitions.len() as i32)))
        .collect())
}

/// ListOffsets of one partition: its error code and offset.
async fn list_one(
    c: &mut Client,
    topic: &str,
    partition: i32,
    timestamp: i64,
) -> Result<(i16, i64), ClientError> {
    c.list_offsets_coded(topic, &[partition], timestamp)
        .await?
        .remove(&partition)
        .ok_or_else(|| ClientError::Kafka(format!("no offsets for {topic}-{partition}")))
}
