//! Fetch: record batches as stored, with long polling.
//!
//! The answer comes as soon as `min_bytes` are available (not held until `max_wait_ms` when the
//! data is already there), or when `max_wait_ms` runs out. Each partition gets at most
//! `partition_max_bytes` and the response at most `max_bytes`, except that the first partition
//! with data always gets at least one whole batch so that consumers make progress (KIP-74).
//! The bytes may end with a partial batch, as Kafka's do; clients drop it and fetch again.
//! Records are not read here: the answer carries file ranges, which the connection sends with
//! `sendfile` (see [`super::fetch_wire`]).
//! A `read_committed` fetch (isolation level 1) reads only below the partition's last stable
//! offset (the first offset of its earliest open transaction) and carries the aborted
//! transactions of the range it reads, so the client drops their records; every answer
//! reports the last stable offset.
//! Fetch sessions (KIP-227) are not kept: the answer's session id is 0, so clients send full
//! fetches.
//!
//! In a region cluster only a partition's leader serves it (NOT_LEADER_OR_FOLLOWER elsewhere,
//! FENCED_LEADER_EPOCH / UNKNOWN_LEADER_EPOCH for a client's stale or future leader epoch), and
//! consumers read only below the high watermark. A fetch with a replica id is a follower's: it
//! reads past the watermark, its fetch offset moves the watermark, and when its last fetched
//! epoch shows its log left the leader's, the answer names the diverging epoch instead of data.

use std::sync::Arc;
use std::time::Duration;

use kafka_protocol::messages::fetch_request::FetchRequest;
use kafka_protocol::messages::fetch_response::{
    AbortedTransaction, FetchResponse, FetchableTopicResponse, PartitionData,
};
use kafka_protocol::messages::{BrokerId, ProducerId};

use super::code;
use crate::broker::Broker;
use crate::log::{LogError, ReadSlice};
use crate::replica::Replica;

/// Longest wait honoured, whatever the client asks.
const MAX_WAIT_CAP: Duration = Duration::from_secs(30);

struct Collected {
    resp: FetchResponse,
    /// Per topic and partition, the file range of its records (sent with sendfile).
    records: Vec<Vec<Option<ReadSlice>>>,
    bytes: usize,
    any_error: bool,
}

/// A fetch answer: the response fields, and the records as file ranges (see
/// [`super::fetch_wire`]).
pub struct FetchAnswer {
    pub resp: FetchResponse,
    pub records: Vec<Vec<Option<ReadSlice>>>,
}

fn collect(broker: &Broker, req: &FetchRequest, version: i16) -> Collected {
    // A fetch from a follower of this broker's cluster (its replica id), with the time.
    let follower = broker
        .cluster()
        .filter(|_| req.replica_id.0 >= 0)
        .map(|c| (req.replica_id.0, c.now()));
    let mut resp = FetchResponse::default();
    let mut budget = req.max_bytes.max(0) as usize;
    let mut total = 0usize;
    let mut any_error = false;
    let mut records: Vec<Vec<Option<ReadSlice>>> = Vec::with_capacity(req.topics.len());
    for ft in &req.topics {
        let mut trecs = Vec::with_capacity(ft.partitions.len());
        let topic = if ft.topic.0.is_empty() && !ft.topic_id.is_nil() {
            broker.topic_by_id(ft.topic_id)
        } else {
            broker.topic(ft.topic.0.as_str())
        };
        let mut tr = FetchableTopicResponse::default();
        tr.topic = ft.topic.clone();
        tr.topic_id = ft.topic_id;
        for fp in &ft.partitions {
            let mut pd = PartitionData::default();
            pd.partition_index = fp.partition;
            pd.high_watermark = -1;
            pd.last_stable_offset = -1;
            pd.preferred_read_replica = BrokerId(-1);
            pd.aborted_transactions = None;
            let Some(partition) = topic.as_ref().and_then(|t| t.partition(fp.partition)) else {
                pd.error_code = code::UNKNOWN_TOPIC_OR_PARTITION;
                any_error = true;
                tr.partitions.push(pd);
                trecs.push(None);
                continue;
            };
            let mut moved = false;
            let (slice, start, hw, lso) = {
                let mut st = partition.state.lock().expect("partition lock");
                let end = st.log.next_offset();
                let limit = (fp.partition_max_bytes.max(0) as usize).min(budget);
                // KIP-74: the first data of the response ignores the limits.
                let limit = if total == 0 { limit.max(1) } else { limit };
                // `current_leader_epoch` came with v9.
                let current = if version >= 9 {
                    fp.current_leader_epoch
                } else {
                    -1
                };
                let mut err = super::leader_check(&st.replica, current);
                if err == 0 && follower.is_some() && !matches!(st.replica, Replica::Leader(_)) {
                    err = code::NOT_LEADER_OR_FOLLOWER;
                }
                let mut r = Ok(None);
                if err == 0 {
                    // Whether the follower's log left this one.
                    let parted = crate::replica::diverging(
                        st.log.epochs(),
                        end,
                        fp.fetch_offset,
                        fp.last_fetched_epoch,
                    );
                    let crate::broker::PartitionState { log, replica, .. } = &mut *st;
                    if let (Some((id, now)), Replica::Leader(l)) = (follower, replica) {
                        // A follower: it reads past the high watermark, and its fetch offset
                        // says what it holds, unless its log left ours (then it truncates).
                        if !l.is_follower(id) {
                            err = code::NOT_LEADER_OR_FOLLOWER;
                        } else if let Some((e, e_end)) = parted {
                            pd.diverging_epoch.epoch = e;
                            pd.diverging_epoch.end_offset = e_end;
                        } else {
                            moved = l.on_fetch(id, fp.fetch_offset, end, now).is_some();
                            if limit > 0 {
                                r = log.read(fp.fetch_offset, limit);
                            }
                        }
                    } else {
                        // A `read_committed` consumer reads below the last stable offset and
                        // learns which transactions in what it reads were aborted.
                        let hw = st.high_watermark();
                        let committed = req.isolation_level == 1;
                        let bound = if committed {
                            st.log.last_stable(hw)
                        } else {
                            hw
                        };
                        if limit > 0 {
                            r = st.log.read_below(fp.fetch_offset, limit, bound);
                        }
                        if committed {
                            pd.aborted_transactions = Some(
                                st.log
                                    .txns()
                                    .aborted_in(fp.fetch_offset, bound)
                                    .into_iter()
                                    .map(|a| {
                                        let mut t = AbortedTransaction::default();
                                        t.producer_id = ProducerId(a.producer_id);
                                        t.first_offset = a.first_offset;
                                        t
                                    })
                                    .collect(),
                            );
                        }
                    }
                }
                if err != 0 {
                    pd.error_code = err;
                    if version >= 12 {
                        if let (Some(leader), Some(epoch)) = (
                            st.replica.leader(broker.config.node_id),
                            st.replica.leader_epoch(),
                        ) {
                            pd.current_leader.leader_id = BrokerId(leader);
                            pd.current_leader.leader_epoch = epoch;
                        }
                    }
                    any_error = true;
                }
                let hw = st.high_watermark();
                (r, st.log.start_offset(), hw, st.log.last_stable(hw))
            };
            if moved {
                partition.replicated.notify_waiters();
                broker.appended.notify_waiters();
            }
            pd.high_watermark = hw;
            pd.last_stable_offset = lso;
            if version >= 5 {
                pd.log_start_offset = start;
            }
            if pd.error_code != 0 {
                trecs.push(None);
                tr.partitions.push(pd);
                continue;
            }
            let mut rec = None;
            match slice {
                Ok(Some(s)) => {
                    total += s.len;
                    budget = budget.saturating_sub(s.len);
                    metrics::counter!("ferry_bytes_out_total", "topic" => partition.topic.to_string())
                        .increment(s.len as u64);
                    rec = Some(s);
                }
                Ok(None) => rec = Some(ReadSlice::empty()),
                Err(LogError::OffsetOutOfRange { .. }) => {
                    pd.error_code = code::OFFSET_OUT_OF_RANGE;
                    any_error = true;
                }
                Err(e) => {
                    tracing::error!(topic = %partition.topic, partition = fp.partition, error = %e, "read failed");
                    pd.error_code = 56; // KAFKA_STORAGE_ERROR
                    any_error = true;
                }
            }
            trecs.push(rec);
            tr.partitions.push(pd);
        }
        resp.responses.push(tr);
        records.push(trecs);
    }
    Collected {
        resp,
        records,
        bytes: total,
        any_error,
    }
}

pub async fn handle(broker: Arc<Broker>, req: FetchRequest, version: i16) -> FetchAnswer {
    let wait = Duration::from_millis(req.max_wait_ms.max(0) as u64).min(MAX_WAIT_CAP);
    let deadline = tokio::time::Instant::now() + wait;
    let min_bytes = req.min_bytes.max(1) as usize;
    loop {
        // Register for the wake-up before looking, so an append in between is not missed.
        let notified = broker.appended.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let c = collect(&broker, &req, version);
        if c.bytes >= min_bytes || c.any_error || tokio::time::Instant::now() >= deadline {
            return FetchAnswer {
                resp: c.resp,
                records: c.records,
            };
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            let c = collect(&broker, &req, version);
            return FetchAnswer {
                resp: c.resp,
                records: c.records,
            };
        }
    }
}
