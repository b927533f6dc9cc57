//! What a failover does to this region's and the lost primary's transactions: a switchover's
//! fence settles this region's open transactions on the fenced topics (bounded wait, then
//! abort: [`TxnService::settle_fenced`]); a promotion aborts the transactions the old primary
//! left open in partitions that now take writes here ([`TxnService::abort_orphans`] alone in a
//! region, [`TxnService::abort_led`] at each leader of a region cluster).
//!
//! Does not own: deciding when a failover happens (`failover`, the gateway) or writing markers
//! ([`super::super::markers`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{submit, TxnService, ORPHAN_GATE_WAIT};
use crate::broker::{Broker, Partition};
use crate::clock::now_ms;
use crate::log::txn::{control_batch, Marker};
use crate::replica::Replica;
use crate::txn;

impl TxnService {
    /// A switchover fenced some topics here: wait up to `wait` for this region's transactions
    /// that write to a fenced topic to end (their producers may still commit or abort; markers
    /// pass the fence), then abort those still open, fencing their producers, and wait up to
    /// `wait` again for their markers. So the fence's log ends hold every transaction's end
    /// and the new primary finds none of ours open. Returns the transactional ids aborted.
    pub async fn settle_fenced(self: &Arc<Self>, broker: &Broker, wait: Duration) -> Vec<String> {
        if !self.serving() {
            return Vec::new();
        }
        let fenced = |t: &str| broker.placement(t).is_some_and(|p| p.fenced);
        let unfinished = || -> Vec<(String, txn::Status)> {
            self.with(|c| {
                c.all()
                    .filter(|(_, m)| {
                        m.status.unfinished() && m.partitions.iter().any(|(t, _)| fenced(t))
                    })
                    .map(|(id, m)| (id.clone(), m.status))
                    .collect()
            })
        };
        let mut aborted = Vec::new();
        let mut deadline = tokio::time::Instant::now() + wait;
        let mut aborting = false;
        loop {
            let left = unfinished();
            if left.is_empty() {
                return aborted;
            }
            if tokio::time::Instant::now() >= deadline {
                if aborting {
                    tracing::warn!(transactions = ?left, "transactions on fenced topics did not end in time: their markers may follow the fence");
                    return aborted;
                }
                aborting = true;
                deadline = tokio::time::Instant::now() + wait;
                let (actions, generation) = {
                    let mut c = self.coord.lock().expect("txn coordinator lock");
                    let generation = c.1;
                    let c = &mut c.0;
                    for (id, status) in &left {
                        if *status == txn::Status::Ongoing && c.abort(now_ms(), id) {
                            tracing::warn!(transactional_id = %id, "a switchover aborts a transaction still open at its fence");
                            aborted.push(id.clone());
                        }
                    }
                    (c.take_actions(), generation)
                };
                self.run(actions, generation);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A transaction found open in a partition that just became writable here (it was a mirror:
/// the transaction belongs to the region that was primary), and aborted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OrphanAbort {
    pub topic: String,
    pub partition: i32,
    pub producer_id: i64,
    pub producer_epoch: i16,
    /// Where the transaction's records start in the partition.
    pub first_offset: i64,
    /// The ABORT marker's offset.
    pub marker_offset: i64,
}

impl TxnService {
    /// After a promotion: abort every transaction still open in a partition this broker now
    /// takes writes for, unless this region's own coordinator runs it. Such a transaction was
    /// begun in the region that was primary, whose coordinator will never end it here: left
    /// open, it would hold `read_committed` consumers at its first offset forever. Its ABORT
    /// marker is written at the producer's epoch and the region's new epoch. Returns what was
    /// aborted (the promotion's report names it).
    pub async fn abort_orphans(&self, broker: &Broker) -> Vec<OrphanAbort> {
        let ours: std::collections::HashSet<i64> = self.with(|c| {
            c.all()
                .filter(|(_, m)| !m.partitions.is_empty())
                .map(|(_, m)| m.producer_id)
                .collect()
        });
        let mut queued = Vec::new();
        for topic in broker.topics() {
            if topic.is_internal() {
                continue;
            }
            let parts: Vec<Arc<Partition>> = topic.partitions.read().expect("topic lock").clone();
            for part in &parts {
                let (stamp, open) = {
                    let st = part.state.lock().expect("partition lock");
                    if !st.gate.writable || !matches!(st.replica, Replica::Solo) {
                        continue;
                    }
                    let epochs: HashMap<i64, i16> =
                        st.producers.describe().map(|(id, e, _)| (id, e)).collect();
                    let open: Vec<(i64, i16, i64)> = st
                        .log
                        .txns()
                        .open()
                        .filter(|(pid, _)| !ours.contains(pid))
                        .map(|(pid, first)| (pid, epochs.get(&pid).copied().unwrap_or(0), first))
                        .collect();
                    (st.gate.epoch, open)
                };
                for (pid, epoch, first) in open {
                    let bytes = control_batch(pid, epoch, Marker::Abort, 0, now_ms());
                    match submit(&self.writer, part, bytes, Some(stamp)).await {
                        Ok(rx) => queued.push((part.clone(), pid, epoch, first, rx)),
                        Err(e) => {
                            tracing::error!(topic = %part.topic, partition = part.index, producer_id = pid, error = %e, "could not abort a transaction of the old primary")
                        }
                    }
                }
            }
        }
        let mut done = Vec::new();
        for (part, pid, epoch, first, rx) in queued {
            match rx.await {
                Ok(Ok(ok)) => {
                    tracing::warn!(topic = %part.topic, partition = part.index, producer_id = pid, first_offset = first, marker_offset = ok.base_offset, "aborted a transaction the old primary left open");
                    metrics::counter!("ferry_txn_orphans_aborted_total").increment(1);
                    done.push(OrphanAbort {
                        topic: part.topic.to_string(),
                        partition: part.index,
                        producer_id: pid,
                        producer_epoch: epoch,
                        first_offset: first,
                        marker_offset: ok.base_offset,
                    });
                }
                Ok(Err(e)) => {
                    tracing::error!(topic = %part.topic, partition = part.index, producer_id = pid, error = %e, "could not abort a transaction of the old primary")
                }
                Err(_) => {}
            }
        }
        done
    }
}

impl TxnService {
    /// After a promotion in a region cluster: abort every transaction open in a partition of
    /// `topics` (which just became primary here) that this broker leads. Such a transaction
    /// was begun in the region that was primary (this region's coordinator adds no partition
    /// of a mirror topic); its ABORT marker is written at the producer's epoch, stamped with
    /// the leader epoch, and counts once every in-sync replica has it.
    pub async fn abort_led(&self, broker: &Arc<Broker>, topics: &[String]) -> Vec<OrphanAbort> {
        let mut tasks = tokio::task::JoinSet::new();
        for name in topics {
            let Some(topic) = broker.topic(name) else {
                continue;
            };
            let parts: Vec<Arc<Partition>> = topic.partitions.read().expect("topic lock").clone();
            for part in parts {
                // A promoted cluster's leader takes writes once its leader epoch is raised
                // above the region's epochs (its gate opens then): the marker must be stamped
                // above every batch mirrored before it.
                let deadline = tokio::time::Instant::now() + ORPHAN_GATE_WAIT;
                loop {
                    let open = {
                        let st = part.state.lock().expect("partition lock");
                        st.gate.writable || !matches!(st.replica, Replica::Leader(_))
                    };
                    if open || tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let open: Vec<(i64, i16, i64)> = {
                    let st = part.state.lock().expect("partition lock");
                    if !matches!(st.replica, Replica::Solo | Replica::Leader(_)) {
                        continue;
                    }
                    let epochs: HashMap<i64, i16> =
                        st.producers.describe().map(|(id, e, _)| (id, e)).collect();
                    st.log
                        .txns()
                        .open()
                        .map(|(pid, first)| (pid, epochs.get(&pid).copied().unwrap_or(0), first))
                        .collect()
                };
                for (pid, epoch, first) in open {
                    let b = broker.clone();
                    let part = part.clone();
                    tasks.spawn(async move {
                        let r = b
                            .write_marker(&part.topic, part.index, pid, epoch, false)
                            .await;
                        (part, pid, epoch, first, r)
                    });
                }
            }
        }
        let mut done = Vec::new();
        while let Some(r) = tasks.join_next().await {
            let Ok((part, pid, epoch, first, r)) = r else {
                continue;
            };
            match r {
                Ok(marker) => {
                    tracing::warn!(topic = %part.topic, partition = part.index, producer_id = pid, first_offset = first, marker_offset = marker, "aborted a transaction the old primary left open");
                    metrics::counter!("ferry_txn_orphans_aborted_total").increment(1);
                    done.push(OrphanAbort {
                        topic: part.topic.to_string(),
                        partition: part.index,
                        producer_id: pid,
                        producer_epoch: epoch,
                        first_offset: first,
                        marker_offset: marker,
                    });
                }
                Err((_, e)) => {
                    tracing::error!(topic = %part.topic, partition = part.index, producer_id = pid, error = %e, "could not abort a transaction of the old primary")
                }
            }
        }
        done.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        done
    }
}
