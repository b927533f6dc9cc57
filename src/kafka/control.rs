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
            let changed = match broker.cluster() {
                Some(link) => {
                    crate::broker::cluster::apply_rule(&broker, link, &pattern, state).await?
                }
                None => broker.apply_rule(&pattern, state)?,
            };
            // Transactions the old primary left open in partitions this region now writes
            // (alone in a region: transactions are not coordinated in clusters yet).
            let aborted = if changed && broker.cluster().is_none() {
                broker.txns().abort_orphans(&broker).await
            } else {
                Vec::new()
            };
            // A switchover's fence: this region's transactions on the fenced topics end (or
            // are aborted) before the fence's log ends are read.
            let fence_aborted = if changed && fencing && broker.cluster().is_none() {
                broker
                    .txns()
                    .settle_fenced(&broker, crate::broker::txns::FENCE_TXN_WAIT)
                    .await
            } else {
                Vec::new()
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
