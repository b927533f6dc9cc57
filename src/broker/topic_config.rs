//! Topic configs: which Kafka topic configs Ferry takes, how each maps onto a partition's
//! [`LogConfig`], and the effective values DescribeConfigs reports.
//!
//! Owns: parsing and checking a topic's overrides (a bad value is refused with the config's
//! name and why, and nothing changes), and the defaults shown for the rest. Does not own:
//! where overrides are stored (the broker's topic metadata, or etcd in a cluster) or who may
//! change them (mirror topics follow their primary's).

use std::collections::BTreeMap;
use std::time::Duration;

use super::TopicError;
use crate::log::cleaner::CompactConfig;
use crate::log::LogConfig;
use crate::units::{parse_duration, parse_size};

/// Topic configs the broker understands, with how they map onto the log.
pub const TOPIC_CONFIGS: &[&str] = &[
    "cleanup.policy",
    "retention.ms",
    "retention.bytes",
    "segment.bytes",
    "segment.ms",
    "max.message.bytes",
    "message.timestamp.type",
    "delete.retention.ms",
    "min.compaction.lag.ms",
    "max.compaction.lag.ms",
    "min.cleanable.dirty.ratio",
];

/// A number of milliseconds, at least `min`.
fn millis(k: &str, v: &str, min: i64) -> Result<i64, TopicError> {
    let ms: i64 = v.trim().parse().map_err(|_| {
        TopicError::InvalidConfig(k.to_string(), format!("`{v}` is not a number of ms"))
    })?;
    if ms < min {
        return Err(TopicError::InvalidConfig(
            k.to_string(),
            format!("must be at least {min}"),
        ));
    }
    Ok(ms)
}

/// The log settings of a topic with these overrides on top of the broker's `base`.
pub fn log_config(
    base: &LogConfig,
    configs: &BTreeMap<String, String>,
) -> Result<LogConfig, TopicError> {
    let mut c = base.clone();
    let bad = |k: &str, m: String| TopicError::InvalidConfig(k.to_string(), m);
    let mut compact = CompactConfig::default();
    let mut policy_compact = false;
    for (k, v) in configs {
        match k.as_str() {
            "retention.ms" => {
                let ms = millis(k, v, -1)?;
                c.retention_time = (ms >= 0).then(|| Duration::from_millis(ms as u64));
            }
            "retention.bytes" => {
                let b: i64 = v
                    .parse()
                    .map_err(|_| bad(k, format!("`{v}` is not a number of bytes")))?;
                c.retention_bytes = if b < 0 { None } else { Some(b as u64) };
            }
            "segment.bytes" => {
                c.segment_bytes = parse_size(v).map_err(|m| bad(k, m))?;
                if c.segment_bytes < 1024 {
                    return Err(bad(k, "must be at least 1024".into()));
                }
            }
            "segment.ms" => c.segment_age = parse_duration(v).map_err(|m| bad(k, m))?,
            "min.insync.replicas" => {
                let n: i64 = v
                    .parse()
                    .map_err(|_| bad(k, format!("`{v}` is not a number")))?;
                if n < 1 {
                    return Err(bad(k, "must be at least 1".into()));
                }
            }
            "unclean.leader.election.enable" => {
                if v != "true" && v != "false" {
                    return Err(bad(k, format!("`{v}` is not true or false")));
                }
            }
            "max.message.bytes" => {
                let _: u64 = v
                    .parse()
                    .map_err(|_| bad(k, format!("`{v}` is not a number")))?;
            }
            "cleanup.policy" => {
                // Kafka takes a list: "delete", "compact", "compact,delete" (either order).
                let (mut d, mut cp) = (false, false);
                for p in v.split(',').map(str::trim) {
                    match p {
                        "delete" => d = true,
                        "compact" => cp = true,
                        _ => {
                            return Err(bad(
                                k,
                                format!("`{p}` is not a cleanup policy (delete, compact)"),
                            ))
                        }
                    }
                }
                if !d && !cp {
                    return Err(bad(k, "name delete, compact or both".into()));
                }
                c.delete = d;
                policy_compact = cp;
            }
            "delete.retention.ms" => {
                compact.delete_retention = Duration::from_millis(millis(k, v, 0)? as u64)
            }
            "min.compaction.lag.ms" => {
                compact.min_lag = Duration::from_millis(millis(k, v, 0)? as u64)
            }
            "max.compaction.lag.ms" => {
                let ms = millis(k, v, 1)?;
                compact.max_lag = (ms < i64::MAX).then(|| Duration::from_millis(ms as u64));
            }
            "min.cleanable.dirty.ratio" => {
                let r: f64 = v
                    .trim()
                    .parse()
                    .map_err(|_| bad(k, format!("`{v}` is not a number")))?;
                if !(0.0..=1.0).contains(&r) {
                    return Err(bad(k, "must be between 0 and 1".into()));
                }
                compact.min_dirty_ratio = r;
            }
            "message.timestamp.type" => {
                if v != "CreateTime" {
                    return Err(bad(
                        k,
                        format!("`{v}` is not supported (only `CreateTime`)"),
                    ));
                }
            }
            _ => return Err(bad(k, "unknown topic config".into())),
        }
    }
    if let Some(max) = compact.max_lag {
        if max < compact.min_lag {
            return Err(bad(
                "max.compaction.lag.ms",
                "must not be below min.compaction.lag.ms".into(),
            ));
        }
    }
    c.compact = policy_compact.then_some(compact);
    Ok(c)
}

/// Segment size of `__consumer_offsets` (Kafka's `offsets.topic.segment.bytes` is 100 MiB; a
/// smaller one lets the cleaner reach commits sooner).
pub const OFFSETS_SEGMENT_BYTES: u64 = 16 << 20;

/// The settings internal topics always have, whatever their overrides: `__consumer_offsets` is
/// compacted (the latest commit per group, topic and partition, the latest metadata per group;
/// deleted groups' tombstones go after a day) and never loses records to retention.
pub fn internal(name: &str, mut c: LogConfig) -> LogConfig {
    if name == crate::group::offsets::TOPIC || name == crate::txn::log::TOPIC {
        c.delete = false;
        c.compact.get_or_insert_with(CompactConfig::default);
        c.segment_bytes = c.segment_bytes.min(OFFSETS_SEGMENT_BYTES);
    }
    c
}

/// Every config DescribeConfigs shows for a topic whose log settings are `c`: (name, value,
/// whether the topic overrides it).
pub fn effective(
    c: &LogConfig,
    batch_bytes_max: usize,
    min_insync: usize,
    overrides: &BTreeMap<String, String>,
) -> Vec<(String, String, bool)> {
    let ms = |d: Option<Duration>| {
        d.map(|d| d.as_millis().to_string())
            .unwrap_or_else(|| "-1".into())
    };
    let k = c.compact.clone().unwrap_or_default();
    let policy = match (c.delete, c.compact.is_some()) {
        (true, true) => "compact,delete",
        (false, true) => "compact",
        _ => "delete",
    };
    let mut out = vec![
        ("cleanup.policy".to_string(), policy.to_string()),
        ("retention.ms".to_string(), ms(c.retention_time)),
        (
            "retention.bytes".to_string(),
            c.retention_bytes
                .map(|b| b.to_string())
                .unwrap_or_else(|| "-1".into()),
        ),
        ("segment.bytes".to_string(), c.segment_bytes.to_string()),
        (
            "segment.ms".to_string(),
            c.segment_age.as_millis().to_string(),
        ),
        ("max.message.bytes".to_string(), batch_bytes_max.to_string()),
        (
            "message.timestamp.type".to_string(),
            "CreateTime".to_string(),
        ),
        ("min.insync.replicas".to_string(), min_insync.to_string()),
        (
            "unclean.leader.election.enable".to_string(),
            "false".to_string(),
        ),
        (
            "delete.retention.ms".to_string(),
            k.delete_retention.as_millis().to_string(),
        ),
        (
            "min.compaction.lag.ms".to_string(),
            k.min_lag.as_millis().to_string(),
        ),
        (
            "max.compaction.lag.ms".to_string(),
            k.max_lag
                .map(|d| d.as_millis().to_string())
                .unwrap_or_else(|| i64::MAX.to_string()),
        ),
        (
            "min.cleanable.dirty.ratio".to_string(),
            k.min_dirty_ratio.to_string(),
        ),
    ];
    for (k, v) in overrides {
        if matches!(
            k.as_str(),
            "segment.ms" | "segment.bytes" | "cleanup.policy"
        ) {
            continue; // already resolved above (may be written with units or in another order)
        }
        if let Some(e) = out.iter_mut().find(|(n, _)| n == k) {
            e.1 = v.clone();
        }
    }
    out.into_iter()
        .map(|(k, v)| {
            let overridden = overrides.contains_key(&k);
            (k, v, overridden)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&str, &str)]) -> Result<LogConfig, TopicError> {
        let m = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        log_config(&LogConfig::default(), &m)
    }

    #[test]
    fn cleanup_policies_map_onto_the_log() {
        let c = cfg(&[("cleanup.policy", "compact")]).unwrap();
        assert!(!c.delete && c.compact.is_some());
        let c = cfg(&[("cleanup.policy", "delete, compact")]).unwrap();
        assert!(c.delete && c.compact.is_some());
        let c = cfg(&[
            ("cleanup.policy", "compact"),
            ("delete.retention.ms", "100"),
            ("min.compaction.lag.ms", "5"),
            ("min.cleanable.dirty.ratio", "0.01"),
        ])
        .unwrap();
        let k = c.compact.unwrap();
        assert_eq!(k.delete_retention, Duration::from_millis(100));
        assert_eq!(k.min_lag, Duration::from_millis(5));
        assert_eq!(k.min_dirty_ratio, 0.01);
        assert!(cfg(&[("cleanup.policy", "shred")]).is_err());
        assert!(cfg(&[("min.cleanable.dirty.ratio", "2")]).is_err());
        assert!(cfg(&[
            ("min.compaction.lag.ms", "10"),
            ("max.compaction.lag.ms", "5")
        ])
        .is_err());
        let shown = effective(
            &cfg(&[("cleanup.policy", "compact,delete")]).unwrap(),
            1,
            1,
            &BTreeMap::new(),
        );
        assert!(shown.contains(&("cleanup.policy".into(), "compact,delete".into(), false)));
    }
}
