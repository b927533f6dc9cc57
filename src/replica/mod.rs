//! Replication inside a region cluster: a partition's leader and followers.
//!
//! - [`Replica`]: the part a partition plays on this broker (alone in its region, leader,
//!   follower, or absent), kept under the partition's lock with its log;
//! - [`leader`]: the leader's view of its followers (their log ends, the high watermark, ISR
//!   shrink and growth), a sans-IO state machine;
//!
//! Owns: how records reach every replica and when they count as acknowledged. Does not own:
//! who leads (the [`crate::cluster::controller`] decides, etcd stores it), the log itself, or
//! I/O (the broker's `cluster` and `follower` shells drive these types).

pub mod leader;

use crate::cluster::metadata::{BrokerId, NO_LEADER};
use crate::log::epochs::end_offset_for;
use crate::log::EpochEntry;
use leader::Leadership;

/// The leader's check of a follower's fetch (Fetch v12's `last_fetched_epoch`): `None` when
/// the follower's log is a prefix of the leader's up to `fetch_offset`, otherwise the epoch and
/// end offset where they part (the answer's `diverging_epoch`), as Kafka's leader computes it.
pub fn diverging(
    leader_epochs: &[EpochEntry],
    leader_end: i64,
    fetch_offset: i64,
    last_fetched_epoch: i32,
) -> Option<(i32, i64)> {
    if last_fetched_epoch < 0 {
        return None;
    }
    let (e, end) = end_offset_for(leader_epochs, leader_end, last_fetched_epoch);
    (end < fetch_offset || e < last_fetched_epoch).then_some((e, end))
}

/// Where a follower cuts its log when the leader names a diverging `(epoch, end)`: the end of
/// that epoch in the follower's own log, or the leader's end for it if smaller; the log start
/// when the follower holds no epoch at or below it. (The next fetch checks again, so a follower
/// that parted earlier cuts further.)
pub fn truncation_point(
    epochs: &[EpochEntry],
    log_end: i64,
    log_start: i64,
    diverging: (i32, i64),
) -> i64 {
    let (mine, my_end) = end_offset_for(epochs, log_end, diverging.0);
    if mine == -1 {
        log_start
    } else {
        my_end.min(diverging.1)
    }
}

/// The part a partition plays on this broker.
#[derive(Debug, Clone)]
pub enum Replica {
    /// A region of one broker: this broker holds and leads it, and the high watermark is the
    /// log end (what Ferry did before clusters).
    Solo,
    /// This broker leads it in its cluster.
    Leader(Leadership),
    /// This broker follows `leader`, fetching from it.
    Follower {
        leader: BrokerId,
        leader_epoch: i32,
        /// The leader's high watermark as last fetched, capped at this log's end.
        high_watermark: i64,
    },
    /// Not a replica here, or the partition is offline (`leader` is then
    /// [`NO_LEADER`]).
    Absent { leader: BrokerId, leader_epoch: i32 },
}

impl Replica {
    /// The high watermark for a log ending at `log_end`: what consumers may read.
    pub fn high_watermark(&self, log_end: i64) -> i64 {
        match self {
            Replica::Solo => log_end,
            Replica::Leader(l) => l.high_watermark(),
            Replica::Follower { high_watermark, .. } => (*high_watermark).min(log_end),
            Replica::Absent { .. } => 0,
        }
    }

    /// The leader epoch this broker knows for the partition (`None` alone in a region).
    pub fn leader_epoch(&self) -> Option<i32> {
        match self {
            Replica::Solo => None,
            Replica::Leader(l) => Some(l.leader_epoch()),
            Replica::Follower { leader_epoch, .. } | Replica::Absent { leader_epoch, .. } => {
                Some(*leader_epoch)
            }
        }
    }

    /// The leader as this broker knows it (`None` alone in a region).
    pub fn leader(&self, me: BrokerId) -> Option<BrokerId> {
        match self {
            Replica::Solo => None,
            Replica::Leader(_) => Some(me),
            Replica::Follower { leader, .. } | Replica::Absent { leader, .. } => Some(*leader),
        }
    }

    /// Whether clients' produces and fetches are served here.
    pub fn leads(&self) -> bool {
        matches!(self, Replica::Solo | Replica::Leader(_))
    }

    pub fn offline() -> Replica {
        Replica::Absent {
            leader: NO_LEADER,
            leader_epoch: -1,
        }
    }
}
