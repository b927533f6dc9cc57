//! FerryControl: Ferry's own request (API key [`KEY`]) with which a region's gateway reads and
//! changes the broker's failover state. Kafka clients never send it.
//!
//! Request (after a request header v1: api key, version 0, correlation id, client id): `body:
//! i32 length + JSON` of a [`Control`]. Response (header v0): `error_code: i16` (0 or -1),
//! `body: i32 length + JSON` (the answer, or `{"error": "..."}`).
//!
//! A JSON body keeps this control plane readable and easy to extend; it carries a handful of
//! requests per second, never records.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::broker::Broker;
use crate::failover::{RegionState, RuleState};
use crate::log::EpochEntry;

/// The API key (Kafka's own keys stay below 100).
pub const KEY: i16 = 20_002;

/// What a gateway asks its broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Control {
    /// The failover state of every rule.
    State,
    /// Move a rule to a new state (epochs never go back).
    Apply { pattern: String, state: RuleState },
    /// Renew the write lease for `ms` from now.
    RenewLease { ms: u64 },
    /// Log end offset and epoch history of partitions (all partitions of `topics`, or of every
    /// topic a rule covers when `topics` is empty); in a region cluster, of those the broker
    /// leads.
    Offsets {
        #[serde(default)]
        topics: Vec<String>,
    },
    /// Quarantine the records at and past `offset` and cut the log back to it.
    Truncate {
        topic: String,
        partition: i32,
        offset: i64,
        region: String,
    },
    /// Move every group's committed offset of `topic`-`partition` past `offset` back to it (a
    /// region cluster's partition leader, at the group coordinator, when it cuts a mirror's
    /// divergent tail). Answers `{"moved": n}`.
    RewindCommits {
        topic: String,
        partition: i32,
        offset: i64,
    },
    /// Move a mirror partition's log start up to its primary's (DeleteRecords there), as far
    /// as the mirror holds (the gateway, from heartbeats). Answers `{"log_start": n}`.
    AdvanceStart {
        topic: String,
        partition: i32,
        offset: i64,
    },
    /// In a region cluster, after a promotion at another broker: once `topics` are primary
    /// here, abort the transactions the old primary left open in the partitions of `topics`
    /// this broker leads. Answers `{"aborted_transactions": [...]}`.
    AbortOrphans { topics: Vec<String> },
    /// In a region cluster, at the transaction coordinator, after a switchover's fence at
    /// another broker: once `topics` are fenced here, settle the transactions on them
    /// ([`crate::broker::txns::TxnService::settle_fenced`]). Answers
    /// `{"aborted_transactions": [transactional id, ...]}`.
    SettleFenced { topics: Vec<String> },
    /// Give a mirror topic its primary's config overrides (the gateway, from heartbeats).
    SetConfigs {
        topic: String,
        configs: BTreeMap<String, String>,
    },
}

/// One partition in an [`Control::Offsets`] answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionOffsets {
    pub partition: i32,
    pub log_start: i64,
    pub log_end: i64,
    pub epochs: Vec<EpochEntry>,
}

/// Answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateAnswer {
    pub region: Option<String>,
    pub state: RegionState,
    pub lease_current: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OffsetsAnswer {
    pub topics: BTreeMap<String, Vec<PartitionOffsets>>,
    /// The config overrides of those topics.
    #[serde(default)]
    pub configs: BTreeMap<String, BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TruncateAnswer {
    pub quarantined: usize,
    pub log_end: i64,
}

/// Encode a request frame (with its length prefix).
pub fn encode_request(cid: i32, req: &Control) -> Bytes {
    let body = serde_json::to_vec(req).expect("serialisable");
    let mut b = BytesMut::with_capacity(20 + body.len());
    b.put_i32(0);
    b.put_i16(KEY);
    b.put_i16(0);
    b.put_i32(cid);
    b.put_i16(-1);
    b.put_i32(body.len() as i32);
    b.put_slice(&body);
    let n = (b.len() - 4) as i32;
    b[0..4].copy_from_slice(&n.to_be_bytes());
    b.freeze()
}

/// Decode a whole request frame (header included). `None` for anything malformed.
pub fn decode(mut frame: Bytes) -> Option<(i32, Result<Control, String>)> {
    if frame.remaining() < 10 {
        return None;
    }
    let key = frame.get_i16();
    let version = frame.get_i16();
    let cid = frame.get_i32();
    if key != KEY || version != 0 {
        return None;
    }
    let n = frame.get_i16();
    if n > 0 {
        if frame.remaining() < n as usize {
            return None;
        }
        frame.advance(n as usize);
    }
    if frame.remaining() < 4 {
        return None;
    }
    let len = frame.get_i32();
    if len < 0 || frame.remaining() != len as usize {
        return None;
    }
    Some((
        cid,
        serde_json::from_slice(&frame).map_err(|e| e.to_string()),
    ))
}

/// Encode a response frame (with its length prefix).
pub fn encode_response(cid: i32, answer: Result<serde_json::Value, String>) -> Bytes {
    let (code, body) = match answer {
        Ok(v) => (0i16, serde_json::to_vec(&v).expect("serialisable")),
        Err(e) => (
            -1,
            serde_json::to_vec(&serde_json::json!({ "error": e })).expect("serialisable"),
        ),
    };
    let mut b = BytesMut::with_capacity(14 + body.len());
    b.put_i32(0);
    b.put_i32(cid);
    b.put_i16(code);
    b.put_i32(body.len() as i32);
    b.put_slice(&body);
    let n = (b.len() - 4) as i32;
    b[0..4].copy_from_slice(&n.to_be_bytes());
    b.freeze()
}

/// Decode a response body (after the length prefix): (correlation id, answer).
pub fn decode_response(mut b: Bytes) -> Option<(i32, Result<serde_json::Value, String>)> {
    if b.remaining() < 10 {
        return None;
    }
    let cid = b.get_i32();
    let code = b.get_i16();
    let len = b.get_i32();
    if len < 0 || b.remaining() != len as usize {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&b).ok()?;
    if code == 0 {
        Some((cid, Ok(v)))
    } else {
        let e = v
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("error")
            .to_string();
        Some((cid, Err(e)))
    }
}

/// After a promotion in a region cluster: abort the transactions the old primary left open in
/// the `promoted` topics, at this broker for the partitions it leads and at every other live
/// broker of the cluster (through its internal door) for theirs. Returns them all; a broker
/// that cannot be reached is logged (its leaders' orphans stay open until it is asked again).
async fn abort_orphans_in_cluster(
    broker: &Arc<Broker>,
    link: &crate::broker::cluster::ClusterLink,
    promoted: Vec<String>,
) -> Vec<crate::broker::txns::OrphanAbort> {
    if promoted.is_empty() {
        return Vec::new();
    }
    let mut aborted = broker.txns().abort_led(broker, &promoted).await;
    let img = link.member.image();
    for b in img.brokers.values().filter(|b| b.id != link.id()) {
        let addr = format!("{}:{}", b.host, b.port);
        let Some(peers) = broker.peers().cloned() else {
            tracing::error!("this broker has no way to reach the other brokers: their partitions' orphaned transactions stay open");
            break;
        };
        match peers.abort_orphans(addr.clone(), promoted.clone()).await {
            Ok(more) => aborted.extend(more),
            Err(e) => {
                tracing::error!(broker = b.id, %addr, error = %e, "could not abort the orphaned transactions of another broker's partitions")
            }
        }
    }
    aborted
}

/// After a switchover's fence in a region cluster: the region's transactions on the fenced
/// topics end, or are aborted, at the transaction coordinator (the leader of
/// `__transaction_state-0`: this broker, or another through its internal door). Returns the
/// transactional ids aborted.
async fn settle_fenced_in_cluster(
    broker: &Arc<Broker>,
    link: &crate::broker::cluster::ClusterLink,
    fenced: Vec<String>,
) -> Result<Vec<String>, String> {
    let img = link.member.image();
    let Some(state) = img.partitions.get(&(crate::txn::log::TOPIC.to_string(), 0)) else {
        // No transactional id was ever looked up in this cluster.
        return Ok(Vec::new());
    };
    let leader = state.value.leader;
    if leader == link.id() {
        return Ok(broker
            .txns()
            .settle_fenced(broker, crate::broker::txns::FENCE_TXN_WAIT)
            .await);
    }
    let b = img.brokers.get(&leader).ok_or_else(|| {
        format!("the transaction coordinator (broker {leader}) is not live: its transactions on the fenced topics cannot be settled")
    })?;
    let addr = format!("{}:{}", b.host, b.port);
    let peers = broker
        .peers()
        .ok_or("this broker has no way to reach the transaction coordinator")?
        .clone();
    peers
        .settle_fenced(addr.clone(), fenced)
        .await
        .map_err(|e| format!("the transaction coordinator at {addr}: {e}"))
}

/// Serve one request.
pub async fn handle(broker: Arc<Broker>, req: Control) -> Result<serde_json::Value, String> {
    match req {
        Control::State => Ok(json(&StateAnswer {
            region: broker.config.region.clone(),
            state: broker.failover_state(),
            lease_current: broker.lease_current(),
        })),
        Control::Apply { pattern, state } => {
            let fencing = state.fenced;
            let mirrors_before: Vec<String> = broker
                .topics()
                .iter()
                .filter(|t| !t.is_internal() && broker.mirror_primary(&t.name).is_some())
                .map(|t| t.name.to_string())
                .collect();
            let changed = match broker.cluster() {
                Some(link) => {
                    crate::broker::cluster::apply_rule(&broker, link, &pattern, state).await?
                }
                None => broker.apply_rule(&pattern, state)?,
            };
            // Transactions the old primary left open in partitions this region now writes.
            let aborted = match broker.cluster() {
                None if changed => broker.txns().abort_orphans(&broker).await,
                Some(link) if changed => {
                    let promoted: Vec<String> = mirrors_before
                        .into_iter()
                        .filter(|t| broker.mirror_primary(t).is_none())
                        .collect();
                    abort_orphans_in_cluster(&broker, link, promoted).await
                }
                _ => Vec::new(),
            };
            // A switchover's fence: this region's transactions on the fenced topics end (or
            // are aborted) before the fence's log ends are read.
            let fence_aborted = match broker.cluster() {
                None if changed && fencing => {
                    broker
                        .txns()
                        .settle_fenced(&broker, crate::broker::txns::FENCE_TXN_WAIT)
                        .await
                }
                // In a cluster, at the transaction coordinator (this broker or another).
                Some(link) if changed && fencing => {
                    let fenced: Vec<String> = broker
                        .topics()
                        .iter()
                        .filter(|t| {
                            !t.is_internal() && broker.placement(&t.name).is_some_and(|p| p.fenced)
                        })
                        .map(|t| t.name.to_string())
                        .collect();
                    // Not settled: the new primary aborts what is left open when it takes
                    // over (as a promotion's orphans).
                    settle_fenced_in_cluster(&broker, link, fenced)
                        .await
                        .unwrap_or_else(|e| {
                            tracing::error!(error = %e, "could not settle the transactions on the fenced topics");
                            Vec::new()
                        })
                }
                _ => Vec::new(),
            };
            Ok(serde_json::json!({
                "changed": changed,
                "aborted_transactions": aborted,
                "fence_aborted_transactions": fence_aborted,
            }))
        }
        Control::RenewLease { ms } => {
            broker.renew_lease(ms).map_err(|e| e.to_string())?;
            Ok(serde_json::json!({}))
        }
        Control::Offsets { topics } => {
            let names: Vec<String> = if topics.is_empty() {
                broker
                    .topics()
                    .into_iter()
                    .filter(|t| broker.placement(&t.name).is_some())
                    .map(|t| t.name.clone())
                    .collect()
            } else {
                topics
            };
            let mut out = BTreeMap::new();
            let mut configs = BTreeMap::new();
            for name in names {
                let Some(t) = broker.topic(&name) else {
                    continue;
                };
                configs.insert(name.clone(), t.configs());
                // In a region cluster each broker answers for the partitions it leads (the
                // gateway asks them all); alone in a region, for all.
                let parts = t
                    .partitions
                    .read()
                    .expect("topic lock")
                    .iter()
                    .filter_map(|p| {
                        let st = p.state.lock().expect("partition lock");
                        st.replica.leads().then(|| PartitionOffsets {
                            partition: p.index,
                            log_start: st.log.start_offset(),
                            log_end: st.log.next_offset(),
                            epochs: st.log.epochs().to_vec(),
                        })
                    })
                    .collect();
                out.insert(name, parts);
            }
            Ok(json(&OffsetsAnswer {
                topics: out,
                configs,
            }))
        }
        Control::Truncate {
            topic,
            partition,
            offset,
            region,
        } => {
            let (quarantined, log_end) = broker
                .quarantine_and_truncate(&topic, partition, offset, &region)
                .await?;
            Ok(json(&TruncateAnswer {
                quarantined,
                log_end,
            }))
        }
        Control::AdvanceStart {
            topic,
            partition,
            offset,
        } => {
            let p = broker
                .partition(&topic, partition)
                .ok_or_else(|| format!("unknown partition {topic}-{partition}"))?;
            let mut st = p.state.lock().expect("partition lock");
            if st.gate.writable {
                return Err(format!(
                    "{topic}-{partition} takes client writes here: only a mirror follows its primary's log start"
                ));
            }
            if !st.replica.leads() {
                return Err(format!(
                    "NOT_LEADER_OR_FOLLOWER: {topic}-{partition} is not led by this broker"
                ));
            }
            let to = offset.min(st.log.next_offset());
            let before = st.log.start_offset();
            let start = st.log.advance_start(to).map_err(|e| e.to_string())?;
            if start > before {
                tracing::info!(%topic, partition, log_start = start, "mirror: the log start follows the primary's");
            }
            Ok(serde_json::json!({ "log_start": start }))
        }
        Control::SettleFenced { topics } => {
            // This broker takes the fence from its watch: wait for it (briefly).
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            while topics
                .iter()
                .any(|t| !broker.placement(t).is_some_and(|p| p.fenced))
            {
                if tokio::time::Instant::now() >= deadline {
                    return Err(format!(
                        "this broker does not hold {topics:?} fenced yet: try again"
                    ));
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            let aborted = broker
                .txns()
                .settle_fenced(&broker, crate::broker::txns::FENCE_TXN_WAIT)
                .await;
            Ok(serde_json::json!({ "aborted_transactions": aborted }))
        }
        Control::AbortOrphans { topics } => {
            // This broker takes the new failover state from its watch: wait for it (briefly).
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            while topics.iter().any(|t| broker.mirror_primary(t).is_some()) {
                if tokio::time::Instant::now() >= deadline {
                    return Err(format!(
                        "this broker does not hold {topics:?} as primary yet: try again"
                    ));
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            let aborted = broker.txns().abort_led(&broker, &topics).await;
            Ok(serde_json::json!({ "aborted_transactions": aborted }))
        }
        Control::RewindCommits {
            topic,
            partition,
            offset,
        } => {
            let moved = broker.rewind_commits(&topic, partition, offset).await?;
            Ok(serde_json::json!({ "moved": moved }))
        }
        Control::SetConfigs { topic, configs } => {
            let changed = match broker.cluster() {
                // A mirror topic's configs, in etcd like any topic's: one write for the region.
                Some(link) => crate::broker::cluster::alter_topic_configs(
                    &broker, link, &topic, configs, false, true,
                )
                .await
                .map_err(|e| e.to_string())?,
                None => broker
                    .alter_topic_configs(&topic, configs, false, true)
                    .map_err(|e| e.to_string())?,
            };
            Ok(serde_json::json!({ "changed": changed }))
        }
    }
}

/// Serialise an answer.
fn json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("serialisable")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let req = Control::Truncate {
            topic: "orders".into(),
            partition: 2,
            offset: 800,
            region: "east".into(),
        };
        let f = encode_request(5, &req);
        assert_eq!(decode(f.slice(4..)), Some((5, Ok(req))));
        assert!(decode(f.slice(4..f.len() - 1)).is_none());
        let r = encode_response(5, Err("nope".into()));
        assert_eq!(decode_response(r.slice(4..)), Some((5, Err("nope".into()))));
        let r = encode_response(5, Ok(serde_json::json!({"changed": true})));
        assert_eq!(
            decode_response(r.slice(4..)),
            Some((5, Ok(serde_json::json!({"changed": true}))))
        );
    }
}
