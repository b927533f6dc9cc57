//! The gateway's way to the brokers of its own region. Alone in a region, that is the one
//! broker. In a region cluster (docs/cluster.md) each request goes where Kafka would send it:
//! a partition's reads, appends, acknowledgements and cuts to its leader (found with Metadata,
//! remembered until a request fails), the write lease to every broker (each gates its own
//! writes), and the rest (the failover state, which lives in etcd; topic listing) to any broker
//! that answers.
//!
//! Owns: choosing the broker. Does not own: what is asked (the other gateway modules).

use super::*;

impl Gateway {
    /// The Kafka address of every broker of this region, in the topology's order.
    pub(super) fn region_brokers(&self) -> Vec<String> {
        self.topology
            .region(&self.region)
            .map(|r| {
                r.brokers
                    .iter()
                    .map(|b| format!("{}:{}", b.advertised.0, b.advertised.1))
                    .collect()
            })
            .filter(|v: &Vec<String>| !v.is_empty())
            .unwrap_or_else(|| vec![self.broker.clone()])
    }

    /// Whether this region is a cluster of several brokers.
    pub(super) fn clustered(&self) -> bool {
        self.region_brokers().len() > 1
    }

    /// A client of the internal door (every API, Ferry's own included) of the first broker of
    /// the region that answers.
    pub async fn broker_client(&self) -> Result<Client, String> {
        let mut last = String::from("no broker in the region");
        for addr in self.region_brokers() {
            match Client::connect_internal(&addr, &self.internal).await {
                Ok(c) => return Ok(c),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }

    /// A plain Kafka client of the first broker of the region that answers.
    pub(super) async fn plain_client(&self) -> Result<Client, String> {
        let mut last = String::from("no broker in the region");
        for addr in self.region_brokers() {
            match Client::connect(&addr).await {
                Ok(c) => return Ok(c),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }

    /// Internal clients of every broker of the region that answers (the write lease is renewed
    /// on each), with the errors of those that do not.
    pub(super) async fn every_broker(&self) -> Vec<Result<Client, String>> {
        let mut out = Vec::new();
        for addr in self.region_brokers() {
            out.push(
                Client::connect_internal(&addr, &self.internal)
                    .await
                    .map_err(|e| format!("{addr}: {e}")),
            );
        }
        out
    }

    /// The address of the broker that leads `topic`-`partition` here.
    pub(super) async fn leader_of(&self, topic: &str, partition: i32) -> Result<String, String> {
        if !self.clustered() {
            return Ok(self.broker.clone());
        }
        let key = (topic.to_string(), partition);
        if let Some(a) = self.leaders.lock().expect("leaders lock").get(&key) {
            return Ok(a.clone());
        }
        let leaders = self
            .plain_client()
            .await?
            .leaders(topic)
            .await
            .map_err(|e| e.to_string())?;
        let mut cache = self.leaders.lock().expect("leaders lock");
        for (p, a) in &leaders {
            if let Some(a) = a {
                cache.insert((topic.to_string(), *p), a.clone());
            }
        }
        match leaders.get(&partition) {
            Some(Some(a)) => Ok(a.clone()),
            Some(None) => Err(format!("{topic}-{partition} has no leader here yet")),
            None => Err(format!("{topic}-{partition} does not exist here")),
        }
    }

    /// Forget where `topic`-`partition` is led (a request there failed): the next
    /// [`Gateway::leader_of`] asks again.
    pub(super) fn forget_leader(&self, topic: &str, partition: i32) {
        self.leaders
            .lock()
            .expect("leaders lock")
            .remove(&(topic.to_string(), partition));
    }

    /// An internal client of the broker that leads `topic`-`partition`.
    pub(super) async fn leader_client(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<Client, String> {
        let addr = self.leader_of(topic, partition).await?;
        Client::connect_internal(&addr, &self.internal)
            .await
            .map_err(|e| {
                self.forget_leader(topic, partition);
                e.to_string()
            })
    }

    /// A plain client of the group coordinator (alone in a region, the broker; in a region
    /// cluster the leader of `__consumer_offsets`, which coordinates every group).
    pub(super) async fn coordinator_client(&self, group: &str) -> Result<Client, String> {
        if !self.clustered() {
            return Client::connect(&self.broker)
                .await
                .map_err(|e| e.to_string());
        }
        let addr = self
            .plain_client()
            .await?
            .find_coordinator(group)
            .await
            .map_err(|e| e.to_string())?;
        Client::connect(&addr).await.map_err(|e| e.to_string())
    }
}
