//! Where a topic's partitions live: the replica sets of new partitions (rack-unaware round
//! robin, as Kafka places them) and the checks on a replica assignment a client gives
//! (CreateTopics' `assignments`, CreatePartitions' `assignments`).
//!
//! Owns: those pure decisions and their errors with Kafka's codes.
//! Does not own: writing the assignment (the broker that takes the request writes it to the
//! store in one transaction with the partitions' initial states) or leaders (the
//! [`super::controller`]).

use std::collections::BTreeSet;

use super::metadata::BrokerId;

/// Why an assignment cannot be made or is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssignError {
    #[error("replication factor {factor} is larger than the {brokers} available brokers")]
    ReplicationFactor { factor: i32, brokers: usize },
    #[error("invalid partition count {0}: must be at least 1")]
    Partitions(i32),
    #[error("invalid replica assignment: {0}")]
    Assignment(String),
}

impl AssignError {
    /// The Kafka error code a client gets.
    pub fn kafka_code(&self) -> i16 {
        match self {
            AssignError::ReplicationFactor { .. } => 38, // INVALID_REPLICATION_FACTOR
            AssignError::Partitions(_) => 37,            // INVALID_PARTITIONS
            AssignError::Assignment(_) => 39,            // INVALID_REPLICA_ASSIGNMENT
        }
    }
}

/// Replica sets for partitions `first..first + count` of a topic, spread over `brokers` (the
/// live brokers, any order; sorted here) the way Kafka's rack-unaware placement does: the
/// leaders go round robin from a start, and the followers of each partition are shifted so
/// that the pairs of brokers sharing partitions vary. `start` and `shift` pick the rotation
/// (a caller passes something that varies per topic, so leaders spread across topics).
pub fn round_robin(
    first: i32,
    count: i32,
    factor: i32,
    brokers: &[BrokerId],
    start: usize,
    shift: usize,
) -> Result<Vec<Vec<BrokerId>>, AssignError> {
    if count < 1 {
        return Err(AssignError::Partitions(count));
    }
    let mut sorted = brokers.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let n = sorted.len();
    if factor < 1 || factor as usize > n {
        return Err(AssignError::ReplicationFactor { factor, brokers: n });
    }
    let mut out = Vec::with_capacity(count as usize);
    for p in first..first + count {
        let p = p as usize;
        let lead = (p + start) % n;
        let mut set = vec![sorted[lead]];
        if n > 1 {
            // The follower shift grows once per full round of leaders.
            let shift = shift + p / n;
            for j in 0..(factor as usize - 1) {
                let idx = (lead + 1 + (shift + j) % (n - 1)) % n;
                set.push(sorted[idx]);
            }
        }
        out.push(set);
    }
    Ok(out)
}

/// Check a client's explicit assignment: every partition lists at least one replica, none twice,
/// all the same count, and only brokers that exist.
pub fn check_explicit(
    assignment: &[Vec<BrokerId>],
    brokers: &BTreeSet<BrokerId>,
) -> Result<(), AssignError> {
    let Some(first) = assignment.first() else {
        return Err(AssignError::Assignment("no partitions".into()));
    };
    for (p, set) in assignment.iter().enumerate() {
        if set.is_empty() {
            return Err(AssignError::Assignment(format!(
                "partition {p} has no replicas"
            )));
        }
        if set.len() != first.len() {
            return Err(AssignError::Assignment(format!(
                "partition {p} has {} replicas, partition 0 has {}: all partitions must have the same number",
                set.len(),
                first.len()
            )));
        }
        let uniq: BTreeSet<_> = set.iter().collect();
        if uniq.len() != set.len() {
            return Err(AssignError::Assignment(format!(
                "partition {p} lists a broker twice: {set:?}"
            )));
        }
        if let Some(b) = set.iter().find(|b| !brokers.contains(b)) {
            return Err(AssignError::Assignment(format!(
                "partition {p} names broker {b}, which is not registered"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn three_brokers_rf3_put_every_partition_on_all_and_rotate_leaders() {
        let a = round_robin(0, 6, 3, &[3, 1, 2], 0, 0).unwrap();
        assert_eq!(a.len(), 6);
        let leaders: Vec<_> = a.iter().map(|s| s[0]).collect();
        assert_eq!(leaders, vec![1, 2, 3, 1, 2, 3]);
        for s in &a {
            let mut s = s.clone();
            s.sort();
            assert_eq!(s, vec![1, 2, 3]);
        }
    }

    #[test]
    fn a_factor_above_the_broker_count_is_refused_with_kafkas_code() {
        let e = round_robin(0, 1, 4, &[1, 2, 3], 0, 0).unwrap_err();
        assert_eq!(e.kafka_code(), 38);
        assert_eq!(
            e.to_string(),
            "replication factor 4 is larger than the 3 available brokers"
        );
        assert_eq!(
            round_robin(0, 0, 1, &[1], 0, 0).unwrap_err().kafka_code(),
            37
        );
    }

    #[test]
    fn explicit_assignments_are_checked() {
        let known: BTreeSet<_> = [1, 2, 3].into();
        assert!(check_explicit(&[vec![1, 2], vec![2, 3]], &known).is_ok());
        let err = |a: &[Vec<i32>]| check_explicit(a, &known).unwrap_err().to_string();
        assert!(err(&[vec![1, 2], vec![3]]).contains("same number"));
        assert!(err(&[vec![1, 1]]).contains("twice"));
        assert!(err(&[vec![1, 9]]).contains("broker 9"));
        assert!(err(&[vec![]]).contains("no replicas"));
        assert!(err(&[]).contains("no partitions"));
    }

    proptest! {
        /// Every replica set has `factor` distinct live brokers, and leaders are spread evenly
        /// (no broker leads more than one more partition than another).
        #[test]
        fn round_robin_sets_are_distinct_and_leaders_balanced(
            n in 1usize..7, count in 1i32..40, start in 0usize..10, shift in 0usize..10,
            f in 1i32..7,
        ) {
            let brokers: Vec<i32> = (1..=n as i32).collect();
            let factor = f.min(n as i32);
            let a = round_robin(0, count, factor, &brokers, start, shift).unwrap();
            let mut lead = vec![0usize; n + 1];
            for s in &a {
                prop_assert_eq!(s.len(), factor as usize);
                let uniq: BTreeSet<_> = s.iter().collect();
                prop_assert_eq!(uniq.len(), s.len());
                lead[s[0] as usize] += 1;
            }
            let counts = &lead[1..];
            prop_assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1);
        }
    }
}
