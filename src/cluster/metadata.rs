//! The cluster's metadata as the controller and every broker see it: registered brokers, topic
//! assignments (which brokers hold each partition) and partition states (leader, leader epoch,
//! ISR), and the invariants each must keep. Also the etcd key layout that stores them.
//!
//! Owns: the types, their JSON form, [`Image`] (everything one broker has seen, each record with
//! the store version it was read at) and [`PartitionState::check`].
//! Does not own: decisions (the [`super::controller`] and [`super::assignment`] make them) or
//! talking to etcd (the [`super::etcd`] shell).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::failover::RegionState;

/// A broker's id in its region (Kafka's `node.id`).
pub type BrokerId = i32;

/// No leader: the partition is offline (Kafka's leader -1).
pub const NO_LEADER: BrokerId = -1;

/// What a live broker registers (bound to its etcd lease: the key goes when the lease ends).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerInfo {
    pub id: BrokerId,
    /// The Kafka listener clients are sent to.
    pub host: String,
    pub port: u16,
    #[serde(default)]
    pub rack: Option<String>,
    /// A fresh id per process start: a restarted broker is a new incarnation even when its
    /// lease key reappears before anyone saw it vanish.
    pub incarnation: Uuid,
}

/// Which brokers hold each partition of a topic, in preference order (the first is the
/// preferred leader). Written once at creation, extended when partitions are added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicAssignment {
    pub name: String,
    pub id: Uuid,
    /// `replicas[p]`: the replica set of partition `p`.
    pub replicas: Vec<Vec<BrokerId>>,
    /// Topic config overrides (Kafka names: `min.insync.replicas`,
    /// `unclean.leader.election.enable`, ...).
    #[serde(default)]
    pub configs: BTreeMap<String, String>,
}

impl TopicAssignment {
    /// Whether a replica outside the ISR may be elected when no ISR member is alive (Kafka's
    /// `unclean.leader.election.enable`, off unless the topic turns it on).
    pub fn unclean_election(&self) -> bool {
        self.configs
            .get("unclean.leader.election.enable")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }

    /// `min.insync.replicas` (1 unless set).
    pub fn min_insync(&self) -> usize {
        self.configs
            .get("min.insync.replicas")
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n >= 1)
            .unwrap_or(1)
    }
}

/// The state of one partition: who leads it, at which leader epoch, and which replicas are in
/// sync. Changed only by compare-and-swap on the version it was read at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionState {
    pub leader: BrokerId,
    /// Bumped on every leader change; never goes back.
    pub leader_epoch: i32,
    /// In-sync replicas; holds the leader whenever there is one.
    pub isr: Vec<BrokerId>,
    /// Bumped on every change of this record (Kafka's partition epoch): an ISR change from a
    /// leader names the epoch it started from, so a stale one is refused.
    pub partition_epoch: i32,
}

/// A partition state that breaks an invariant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("leader {0} is not in the ISR {1:?}")]
    LeaderNotInIsr(BrokerId, Vec<BrokerId>),
    #[error("ISR member {0} is not a replica (replicas {1:?})")]
    NotAReplica(BrokerId, Vec<BrokerId>),
    #[error("ISR {0:?} names a broker twice")]
    Duplicate(Vec<BrokerId>),
    #[error("the ISR is empty")]
    EmptyIsr,
}

impl PartitionState {
    /// The state of a new partition: the first replica leads at epoch 0, all are in sync.
    pub fn initial(replicas: &[BrokerId]) -> PartitionState {
        PartitionState {
            leader: replicas.first().copied().unwrap_or(NO_LEADER),
            leader_epoch: 0,
            isr: replicas.to_vec(),
            partition_epoch: 0,
        }
    }

    /// Whether this state keeps the invariants for a partition held by `replicas`: the ISR is
    /// a non-empty set of replicas, and the leader (if any) is in it.
    pub fn check(&self, replicas: &[BrokerId]) -> Result<(), StateError> {
        if self.isr.is_empty() {
            return Err(StateError::EmptyIsr);
        }
        let set: BTreeSet<_> = self.isr.iter().collect();
        if set.len() != self.isr.len() {
            return Err(StateError::Duplicate(self.isr.clone()));
        }
        if let Some(b) = self.isr.iter().find(|b| !replicas.contains(b)) {
            return Err(StateError::NotAReplica(*b, replicas.to_vec()));
        }
        if self.leader != NO_LEADER && !self.isr.contains(&self.leader) {
            return Err(StateError::LeaderNotInIsr(self.leader, self.isr.clone()));
        }
        Ok(())
    }
}

/// A record as read from the store, with the store's version of it (etcd's `mod_revision`):
/// a write that names this version succeeds only if nobody wrote in between.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    pub value: T,
    pub version: i64,
}

/// A partition by topic and index.
pub type PartitionKey = (String, i32);

/// Everything a broker has seen of the cluster's metadata.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Image {
    pub brokers: BTreeMap<BrokerId, BrokerInfo>,
    pub topics: BTreeMap<String, Versioned<TopicAssignment>>,
    pub partitions: BTreeMap<PartitionKey, Versioned<PartitionState>>,
    /// The broker that holds the controller key, if any.
    pub controller: Option<BrokerId>,
    /// The region's failover state (who is primary for each topic rule, at which epoch),
    /// shared by every broker of the cluster; `None` until first written.
    pub failover: Option<Versioned<RegionState>>,
}

impl Image {
    /// The replica set of a partition, if the topic and partition exist.
    pub fn replicas(&self, topic: &str, partition: i32) -> Option<&[BrokerId]> {
        let t = self.topics.get(topic)?;
        t.value
            .replicas
            .get(usize::try_from(partition).ok()?)
            .map(|r| r.as_slice())
    }

    /// Apply a change seen from the store (a watch event or a read).
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Broker(info) => {
                self.brokers.insert(info.id, info);
            }
            Change::BrokerGone(id) => {
                self.brokers.remove(&id);
            }
            Change::Topic(t) => {
                self.topics.insert(t.value.name.clone(), t);
            }
            Change::TopicGone(name) => {
                self.topics.remove(&name);
                self.partitions.retain(|(t, _), _| *t != name);
            }
            Change::Partition(key, state) => {
                if let Some(old) = self.partitions.get(&key) {
                    // A store's watch delivers changes in order; an older version is a replay.
                    if old.version > state.version {
                        return;
                    }
                    assert!(
                        state.value.leader_epoch >= old.value.leader_epoch,
                        "leader epoch of {key:?} went back: {} after {}",
                        state.value.leader_epoch,
                        old.value.leader_epoch
                    );
                }
                self.partitions.insert(key, state);
            }
            Change::PartitionGone(key) => {
                self.partitions.remove(&key);
            }
            Change::Controller(c) => self.controller = c,
            Change::Failover(f) => self.failover = f,
        }
    }
}

/// One change of the metadata, as the store reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Broker(BrokerInfo),
    BrokerGone(BrokerId),
    Topic(Versioned<TopicAssignment>),
    TopicGone(String),
    Partition(PartitionKey, Versioned<PartitionState>),
    PartitionGone(PartitionKey),
    Controller(Option<BrokerId>),
    /// The failover state written (or, `None`, deleted).
    Failover(Option<Versioned<RegionState>>),
}

/// The etcd key layout of one region's cluster, under `/ferry/<cluster>/`.
///
/// - `brokers/<id>`: [`BrokerInfo`] JSON, bound to the broker's lease;
/// - `controller`: the active controller's id, bound to its lease;
/// - `topics/<name>`: [`TopicAssignment`] JSON;
/// - `partitions/<name>/<index>`: [`PartitionState`] JSON;
/// - `failover`: the region's [`RegionState`] JSON (every rule's primary and epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    root: String,
}

impl Keys {
    pub fn new(cluster: &str) -> Keys {
        Keys {
            root: format!("/ferry/{cluster}/"),
        }
    }
    pub fn root(&self) -> &str {
        &self.root
    }
    pub fn broker(&self, id: BrokerId) -> String {
        format!("{}brokers/{id}", self.root)
    }
    pub fn controller(&self) -> String {
        format!("{}controller", self.root)
    }
    pub fn topic(&self, name: &str) -> String {
        format!("{}topics/{name}", self.root)
    }
    pub fn partitions_of(&self, topic: &str) -> String {
        format!("{}partitions/{topic}/", self.root)
    }
    pub fn partition(&self, topic: &str, index: i32) -> String {
        format!("{}partitions/{topic}/{index}", self.root)
    }
    pub fn failover(&self) -> String {
        format!("{}failover", self.root)
    }

    /// Decode a key and its value (None for a delete) into a change; None for keys that are
    /// not metadata. Errors name the key.
    pub fn decode(
        &self,
        key: &str,
        value: Option<&[u8]>,
        version: i64,
    ) -> Result<Option<Change>, String> {
        let Some(rest) = key.strip_prefix(&self.root) else {
            return Ok(None);
        };
        let bad = |e: serde_json::Error| format!("{key}: {e}");
        if rest == "controller" {
            return Ok(Some(Change::Controller(match value {
                Some(v) => Some(
                    std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                        .ok_or_else(|| format!("{key}: not a broker id"))?,
                ),
                None => None,
            })));
        }
        if rest == "failover" {
            return Ok(Some(Change::Failover(match value {
                Some(v) => Some(Versioned {
                    value: serde_json::from_slice(v).map_err(bad)?,
                    version,
                }),
                None => None,
            })));
        }
        if let Some(id) = rest.strip_prefix("brokers/") {
            let id: BrokerId = id.parse().map_err(|_| format!("{key}: not a broker id"))?;
            return Ok(Some(match value {
                Some(v) => Change::Broker(serde_json::from_slice(v).map_err(bad)?),
                None => Change::BrokerGone(id),
            }));
        }
        if let Some(name) = rest.strip_prefix("topics/") {
            return Ok(Some(match value {
                Some(v) => Change::Topic(Versioned {
                    value: serde_json::from_slice(v).map_err(bad)?,
                    version,
                }),
                None => Change::TopicGone(name.to_string()),
            }));
        }
        if let Some(p) = rest.strip_prefix("partitions/") {
            let (topic, index) = p
                .rsplit_once('/')
                .and_then(|(t, i)| Some((t.to_string(), i.parse::<i32>().ok()?)))
                .ok_or_else(|| format!("{key}: not a partition key"))?;
            return Ok(Some(match value {
                Some(v) => Change::Partition(
                    (topic, index),
                    Versioned {
                        value: serde_json::from_slice(v).map_err(bad)?,
                        version,
                    },
                ),
                None => Change::PartitionGone((topic, index)),
            }));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_keeps_its_invariants() {
        let r = [1, 2, 3];
        assert_eq!(PartitionState::initial(&r).check(&r), Ok(()));
        let s = |leader, isr: &[i32]| PartitionState {
            leader,
            leader_epoch: 1,
            isr: isr.to_vec(),
            partition_epoch: 1,
        };
        assert_eq!(
            s(1, &[2, 3]).check(&r),
            Err(StateError::LeaderNotInIsr(1, vec![2, 3]))
        );
        assert_eq!(
            s(1, &[1, 4]).check(&r),
            Err(StateError::NotAReplica(4, r.to_vec()))
        );
        assert_eq!(
            s(1, &[1, 1]).check(&r),
            Err(StateError::Duplicate(vec![1, 1]))
        );
        assert_eq!(s(NO_LEADER, &[]).check(&r), Err(StateError::EmptyIsr));
        assert_eq!(s(NO_LEADER, &[3]).check(&r), Ok(()));
    }

    #[test]
    fn keys_round_trip_through_decode() {
        let k = Keys::new("east");
        let info = BrokerInfo {
            id: 2,
            host: "127.0.0.1".into(),
            port: 9092,
            rack: None,
            incarnation: Uuid::nil(),
        };
        let v = serde_json::to_vec(&info).unwrap();
        assert_eq!(
            k.decode(&k.broker(2), Some(&v), 5).unwrap(),
            Some(Change::Broker(info))
        );
        assert_eq!(
            k.decode(&k.broker(2), None, 6).unwrap(),
            Some(Change::BrokerGone(2))
        );
        let st = PartitionState::initial(&[1, 2]);
        let v = serde_json::to_vec(&st).unwrap();
        // Topic names may hold dots and dashes; the index is what follows the last slash.
        assert_eq!(
            k.decode(&k.partition("a.b-c", 7), Some(&v), 9).unwrap(),
            Some(Change::Partition(
                ("a.b-c".into(), 7),
                Versioned {
                    value: st,
                    version: 9
                }
            ))
        );
        assert_eq!(
            k.decode(&k.controller(), Some(b"3"), 1).unwrap(),
            Some(Change::Controller(Some(3)))
        );
        assert!(k.decode(&k.broker(2), Some(b"{"), 1).is_err());
        assert_eq!(k.decode("/ferry/west/brokers/1", None, 1).unwrap(), None);
    }

    #[test]
    #[should_panic(expected = "leader epoch")]
    fn the_image_refuses_a_leader_epoch_that_goes_back() {
        let mut img = Image::default();
        let key: PartitionKey = ("t".into(), 0);
        let mut st = PartitionState::initial(&[1]);
        st.leader_epoch = 3;
        img.apply(Change::Partition(
            key.clone(),
            Versioned {
                value: st.clone(),
                version: 1,
            },
        ));
        st.leader_epoch = 2;
        img.apply(Change::Partition(
            key,
            Versioned {
                value: st,
                version: 2,
            },
        ));
    }
}
