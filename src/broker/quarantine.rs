//! Quarantine: where a rejoining region puts the tail of a partition that is not in the new
//! primary's history, before cutting it from the log.
//!
//! Each divergent record is written again, uncompressed, into the local topic
//! `__ferry.quarantine.<topic>` (same partition), with its key, value, headers and timestamp and
//! four headers more: `ferry.original.offset`, `ferry.original.epoch`, `ferry.original.region`
//! and `ferry.original.partition`. The quarantine batches are on disk before the log is cut, so
//! a crash in between can only quarantine a record twice, never lose it. Internal topics are
//! never mirrored, so the quarantine stays in the region that accepted the records until an
//! operator replays it (`ferry quarantine replay`).
//!
//! Owns: moving a tail to the quarantine topic and cutting it. Does not own: deciding where
//! two histories diverge ([`crate::log::epochs::divergence`]).

use std::sync::Arc;

use tokio::sync::oneshot;

use super::writer::AppendRequest;
use super::{Broker, ProducerStates, TopicError};
use crate::batch::{self, build};

/// Quarantine topics are named `<PREFIX><topic>`.
pub const PREFIX: &str = "__ferry.quarantine.";

pub fn topic_for(topic: &str) -> String {
    format!("{PREFIX}{topic}")
}

/// Read at most this much of a divergent tail per step.
const READ_BYTES: usize = 1 << 20;

impl Broker {
    /// Move the records of `topic`-`partition` at and past `offset` to its quarantine topic,
    /// then cut the log back to `offset`. Only for a partition that is a mirror here (its gate
    /// shut), so no client writes race the cut. Returns (records quarantined, new log end).
    pub async fn quarantine_and_truncate(
        self: &Arc<Self>,
        topic: &str,
        partition: i32,
        offset: i64,
        region: &str,
    ) -> Result<(usize, i64), String> {
        let t = self
            .topic(topic)
            .ok_or_else(|| format!("unknown topic '{topic}'"))?;
        let p = t
            .partition(partition)
            .ok_or_else(|| format!("unknown partition {topic}-{partition}"))?;
        // Whole batches only: the cut falls at the start of the batch holding `offset`
        // (`PartitionLog::cut_point`), and exactly the records from there on are set aside, so
        // the log ends where the cut says and the next divergence check finds nothing to cut.
        let offset = {
            let st = p.state.lock().expect("partition lock");
            if st.gate.writable {
                return Err(format!(
                    "{topic}-{partition} takes client writes here: only a mirror is cut back"
                ));
            }
            if offset < st.log.start_offset() {
                return Err(format!(
                    "{topic}-{partition}: offset {offset} is below the log start {}",
                    st.log.start_offset()
                ));
            }
            st.log.cut_point(offset).map_err(|e| e.to_string())?
        };
        // Read and re-encode the tail.
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut records = 0usize;
        let mut at = offset;
        loop {
            let slice = {
                let st = p.state.lock().expect("partition lock");
                if at >= st.log.next_offset() {
                    break;
                }
                st.log.read(at, READ_BYTES).map_err(|e| e.to_string())?
            };
            let Some(slice) = slice else { break };
            let bytes = slice.read().map_err(|e| e.to_string())?;
            let parts = batch::split(&bytes).map_err(|e| e.to_string())?;
            if parts.is_empty() {
                return Err(format!("{topic}-{partition}: no whole batch at {at}"));
            }
            for (range, h) in parts {
                if h.next_offset() <= at {
                    continue;
                }
                let (h, plain) = batch::plain_records(&bytes[range]).map_err(|e| e.to_string())?;
                let recs = batch::records_in(&h, &plain).map_err(|e| e.to_string())?;
                let Some(first) = recs.first() else {
                    at = h.next_offset();
                    continue;
                };
                let base_ts = first.timestamp;
                let mut batch_recs = Vec::with_capacity(recs.len());
                for r in recs.iter().filter(|r| r.offset >= offset) {
                    let mut headers: Vec<(String, Option<Vec<u8>>)> = r
                        .headers
                        .iter()
                        .map(|(k, v)| {
                            (
                                String::from_utf8_lossy(k).into_owned(),
                                v.map(|v| v.to_vec()),
                            )
                        })
                        .collect();
                    for (k, v) in [
                        ("ferry.original.offset", r.offset.to_string()),
                        ("ferry.original.epoch", h.partition_leader_epoch.to_string()),
                        ("ferry.original.region", region.to_string()),
                        ("ferry.original.partition", partition.to_string()),
                    ] {
                        headers.push((k.to_string(), Some(v.into_bytes())));
                    }
                    batch_recs.push(build::Record {
                        key: r.key.map(|k| k.to_vec()),
                        value: r.value.map(|v| v.to_vec()),
                        headers,
                        timestamp_delta: r.timestamp - base_ts,
                    });
                }
                records += batch_recs.len();
                if !batch_recs.is_empty() {
                    out.push(build::batch(0, base_ts, None, &batch_recs));
                }
                at = h.next_offset();
            }
        }
        if !out.is_empty() {
            let qname = topic_for(topic);
            let qt = match self.topic(&qname) {
                Some(q) => q,
                None => match self.create_topic(
                    &qname,
                    Some(t.partition_count()),
                    None,
                    Default::default(),
                    false,
                ) {
                    Ok(q) => q,
                    Err(TopicError::AlreadyExists(_)) => {
                        self.topic(&qname).ok_or("quarantine topic vanished")?
                    }
                    Err(e) => return Err(e.to_string()),
                },
            };
            if qt.partition_count() <= partition {
                self.create_partitions(&qname, partition + 1, false)
                    .map_err(|e| e.to_string())?;
            }
            let qp = self
                .partition(&qname, partition)
                .ok_or("quarantine partition missing")?;
            let mut waits = Vec::with_capacity(out.len());
            for b in out {
                let header = batch::validate(&b).map_err(|e| e.to_string())?;
                let (tx, rx) = oneshot::channel();
                self.writer()
                    .submit(AppendRequest {
                        partition: qp.clone(),
                        bytes: b.into(),
                        header,
                        acks: -1,
                        epoch: None,
                        exact: false,
                        reply: Some(tx),
                    })
                    .await
                    .map_err(|_| "the broker is shutting down".to_string())?;
                waits.push(rx);
            }
            for rx in waits {
                rx.await
                    .map_err(|_| "writer stopped".to_string())?
                    .map_err(|e| e.to_string())?;
            }
        }
        // The quarantine is on disk: cut the log.
        let end = {
            let mut st = p.state.lock().expect("partition lock");
            let cut = st.log.truncate_to(offset).map_err(|e| e.to_string())?;
            if cut != offset {
                // Another cut got there first (two streams into the partition).
                return Err(format!(
                    "{topic}-{partition}: the log moved while its tail from {offset} was set aside (it now ends at {cut})"
                ));
            }
            let mut producers = ProducerStates::default();
            st.log
                .for_each_batch(st.log.active_base(), |h| producers.record(h, h.base_offset))
                .map_err(|e| e.to_string())?;
            st.producers = producers;
            st.log.next_offset()
        };
        // Commits past the cut would make a group skip the records mirrored into that range
        // next: bring them back to the cut.
        let past = self
            .groups()
            .with(|c| c.commits_past(topic, partition, offset));
        for (group, c) in past {
            let moved = crate::group::Committed { offset, ..c };
            let code = self
                .groups()
                .write(&group, vec![(topic.to_string(), partition, Some(moved))])
                .await;
            if code != 0 {
                return Err(format!("moving group {group}'s commit on {topic}-{partition} back to {offset}: error {code}"));
            }
            tracing::warn!(%group, %topic, partition, offset, "rejoin: moved a committed offset back to the cut");
        }
        tracing::warn!(
            %topic,
            partition,
            offset,
            records,
            quarantine = %topic_for(topic),
            "rejoin: moved the divergent tail of {topic}-{partition} from offset {offset} ({records} records) to the quarantine"
        );
        Ok((records, end))
    }
}
