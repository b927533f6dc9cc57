//! Consumer group offsets shipped from a primary to its mirrors, and installed there clamped, so
//! that a group moving to the mirror never skips a record it has not seen.
//!
//! Every [`OFFSET_SYNC_INTERVAL_MS`] the primary ships each group's committed offsets of the
//! topics a mirror mirrors. The mirror installs an offset only from the region it believes is
//! primary for the topic, only once it holds a heartbeat from it, and clamps each to
//! `min(committed, divergence(primary's history, primary's end, mirror's history, mirror's end),
//! mirror's end)`: the mirror's log counts only as far as it agrees with what the primary last
//! said it holds (a rejoining old primary that has not cut its divergent tail yet must not take a
//! commit past its own unshipped records: simulator finding 8).
//!
//! Owns: which offsets are taken and the clamp. Does not own: reading the primary's commits or
//! committing on the mirror (the caller's broker calls), the heartbeats ([`super::liveness`]).
//!
//! The test-only feature `sim-bug-skip-offset-clamp` skips the clamp here, in the production
//! path, so that CI proves the simulator catches a broken clamp in the code the gateway runs.

use std::collections::BTreeMap;

use super::liveness::Heartbeat;
use crate::kafka::control::PartitionOffsets;
use crate::log::epochs::divergence;

/// How often committed group offsets are shipped to the mirrors (ms). After a failover, a
/// consumer group resumes at most this much (plus its own commit interval) behind where it was.
pub const OFFSET_SYNC_INTERVAL_MS: u64 = 2_000;

/// A committed offset installed in a mirror never points past what the mirror holds.
#[cfg(not(feature = "sim-bug-skip-offset-clamp"))]
pub fn clamp_offset(committed: i64, mirror_log_end: i64) -> i64 {
    committed.min(mirror_log_end)
}

/// The deliberately broken clamp (test-only feature): the commit is installed as it is.
#[cfg(feature = "sim-bug-skip-offset-clamp")]
pub fn clamp_offset(committed: i64, _mirror_log_end: i64) -> i64 {
    committed
}

/// The offsets of a group's commits that this mirror takes from `peer`, by topic: those of
/// topics `mirrored_from_peer` says this region mirrors from `peer` (as primary), and only real
/// offsets (not -1).
pub fn wanted(
    entries: Vec<(String, i32, i64)>,
    mirrored_from_peer: impl Fn(&str) -> bool,
) -> BTreeMap<String, Vec<(i32, i64)>> {
    let mut by_topic: BTreeMap<String, Vec<(i32, i64)>> = BTreeMap::new();
    for (t, p, o) in entries {
        if o >= 0 && mirrored_from_peer(&t) {
            by_topic.entry(t).or_default().push((p, o));
        }
    }
    by_topic
}

/// The offsets to commit on the mirror: each of `wanted` clamped against the primary's last
/// heartbeat and the mirror's own log ends and histories (`mine`). Nothing without a heartbeat
/// from the primary; a partition either side does not know is left out.
pub fn clamped(
    wanted: BTreeMap<String, Vec<(i32, i64)>>,
    primary: Option<&Heartbeat>,
    mine: &BTreeMap<String, Vec<PartitionOffsets>>,
) -> BTreeMap<String, Vec<(i32, i64)>> {
    let mut commit = BTreeMap::new();
    let Some(hb) = primary else {
        return commit;
    };
    for (t, parts) in wanted {
        let clamped: Vec<(i32, i64)> = parts
            .into_iter()
            .filter_map(|(p, o)| {
                let m = mine.get(&t)?.iter().find(|x| x.partition == p)?;
                let their_end = *hb.ends.get(&t)?.get(p as usize)?;
                let their_hist = hb.epochs.get(&t)?.get(p as usize)?;
                let agreed = divergence(their_hist, their_end, &m.epochs, m.log_end);
                Some((p, clamp_offset(o, agreed.min(m.log_end))))
            })
            .collect();
        if !clamped.is_empty() {
            commit.insert(t, clamped);
        }
    }
    commit
}

#[cfg(all(test, not(feature = "sim-bug-skip-offset-clamp")))]
mod tests {
    use super::*;
    use crate::log::EpochEntry;

    use crate::log::epochs::history as h;

    fn mine(end: i64, epochs: Vec<EpochEntry>) -> BTreeMap<String, Vec<PartitionOffsets>> {
        BTreeMap::from([(
            "t".to_string(),
            vec![PartitionOffsets {
                partition: 0,
                log_start: 0,
                log_end: end,
                epochs,
            }],
        )])
    }

    fn primary(end: i64, epochs: Vec<EpochEntry>) -> Heartbeat {
        Heartbeat {
            region: "west".into(),
            ends: BTreeMap::from([("t".to_string(), vec![end])]),
            epochs: BTreeMap::from([("t".to_string(), vec![epochs])]),
            ..Heartbeat::default()
        }
    }

    fn want(o: i64) -> BTreeMap<String, Vec<(i32, i64)>> {
        wanted(vec![("t".into(), 0, o), ("other".into(), 0, 5)], |t| {
            t == "t"
        })
    }

    #[test]
    fn installed_offsets_never_pass_the_mirror_end() {
        let hb = primary(500, h(&[(0, 0)]));
        let c = clamped(want(400), Some(&hb), &mine(300, h(&[(0, 0)])));
        assert_eq!(c, BTreeMap::from([("t".to_string(), vec![(0, 300)])]));
        let c = clamped(want(200), Some(&hb), &mine(300, h(&[(0, 0)])));
        assert_eq!(c["t"], vec![(0, 200)]);
    }

    /// Simulator finding 8: a mirror (a rejoining old primary) that still holds a tail the
    /// primary never had (epoch 0 past 100, while the primary took over at 100 with 257) takes
    /// no commit past where the two histories part.
    #[test]
    fn finding_8_no_commit_past_an_uncut_divergent_tail() {
        let hb = primary(180, h(&[(0, 0), (257, 100)]));
        let c = clamped(want(150), Some(&hb), &mine(160, h(&[(0, 0)])));
        assert_eq!(c["t"], vec![(0, 100)]);
    }

    #[test]
    fn nothing_without_a_heartbeat_from_the_primary_or_for_other_topics() {
        assert!(clamped(want(10), None, &mine(300, h(&[(0, 0)]))).is_empty());
        assert_eq!(want(10).len(), 1, "'other' is not mirrored from the peer");
        assert!(wanted(vec![("t".into(), 0, -1)], |_| true).is_empty());
    }
}
