//! Topic rules (`[[topics]]`): which region is primary for the topics matching a name or glob,
//! which regions mirror them and how (mode, retention, wire compression, copies, FEC), and the
//! checks across rules: none is shadowed by an earlier one, so a topic never gets two
//! primaries, and every region that sends or receives mirrored topics has a gateway.
//!
//! Owns: reading and checking these fields into [`TopicRule`]. Does not own: matching a topic
//! to its rule at run time (`Topology::rule_for_topic`, [`glob_match`]), the regions the rules
//! name (`regions`), or the typed readers and error collection (`reader`).

use std::collections::HashMap;

use super::reader::{Cx, Val};
use super::regions::RegionAt;
use super::{glob_match, Region, ReplicationMode, TopicRule, WireCompression};

const TOPIC_KEYS: &[&str] = &[
    "pattern",
    "partitions",
    "primary",
    "mirrors",
    "mode",
    "retention",
    "wire_compression",
    "wire_copies",
    "wire_fec",
];

pub(super) struct RuleAt {
    at: usize,
    pattern_at: usize,
    primary_at: usize,
}

fn valid_pattern(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 249
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '*'))
}

pub(super) fn read_rule(
    cx: &mut Cx<'_>,
    v: &Val<'_>,
    path: &str,
    regions: &[&str],
    region_hint: &dyn Fn() -> Option<String>,
) -> Option<(TopicRule, RuleAt)> {
    let o = cx.table(v, path)?;
    o.known(cx, TOPIC_KEYS);
    let mut ok = true;
    let pv = o.required(
        cx,
        "pattern",
        Some("a topic name or glob, e.g. `pattern = \"orders.*\"`".into()),
    );
    let pattern = pv.and_then(|v| cx.nonempty_string(v, &o.field("pattern")));
    if let (Some(p), Some(v)) = (&pattern, pv) {
        if !valid_pattern(p) {
            cx.err(
                v.span().start,
                &o.field("pattern"),
                format!("`{p}` is not a topic name or pattern"),
                Some(
                    "topic names use letters, digits, `.`, `_` and `-`; `*` matches any run".into(),
                ),
            );
            ok = false;
        } else if p.starts_with("__") {
            cx.err(
                v.span().start,
                &o.field("pattern"),
                format!("`{p}` names an internal topic"),
                Some("internal `__` topics are never mirrored by topic rules".into()),
            );
            ok = false;
        }
    }

    let partitions = o.get("partitions").map(|v| {
        let n = cx.int(v, &o.field("partitions"), 1, i32::MAX as i64);
        ok &= n.is_some();
        n.map(|n| n as i32)
    });

    let prv = o.required(
        cx,
        "primary",
        Some(format!(
            "the region that accepts writes; {}",
            region_hint().unwrap_or_default()
        )),
    );
    let primary = prv.and_then(|v| cx.nonempty_string(v, &o.field("primary")));
    if let (Some(p), Some(v)) = (&primary, prv) {
        if !regions.contains(&p.as_str()) {
            cx.err(
                v.span().start,
                &o.field("primary"),
                format!("primary `{p}` is not a region"),
                region_hint(),
            );
            ok = false;
        }
    }

    let mut mirrors: Vec<String> = Vec::new();
    if let Some(v) = o.get("mirrors") {
        match cx.array(v, &o.field("mirrors")) {
            None => ok = false,
            Some(items) => {
                for (i, m) in items.iter().enumerate() {
                    let field = format!("{}[{i}]", o.field("mirrors"));
                    let Some(name) = cx.nonempty_string(m, &field) else {
                        ok = false;
                        continue;
                    };
                    let at = m.span().start;
                    if !regions.contains(&name.as_str()) {
                        cx.err(
                            at,
                            &field,
                            format!("mirror `{name}` is not a region"),
                            region_hint(),
                        );
                        ok = false;
                    } else if primary.as_deref() == Some(name.as_str()) {
                        cx.err(
                            at,
                            &field,
                            format!("`{name}` is the primary; it cannot also mirror the topic"),
                            Some("list only the other regions in `mirrors`".into()),
                        );
                        ok = false;
                    } else if mirrors.contains(&name) {
                        cx.err(at, &field, format!("`{name}` is listed twice"), None);
                        ok = false;
                    } else {
                        mirrors.push(name);
                    }
                }
            }
        }
    }

    let mode = match o.get("mode") {
        None => Some(ReplicationMode::Async),
        Some(v) => cx
            .choice(v, &o.field("mode"), &["async", "sync"])
            .map(|i| [ReplicationMode::Async, ReplicationMode::Sync][i]),
    };
    if mode == Some(ReplicationMode::Sync) && mirrors.is_empty() && ok {
        cx.err(
            o.get("mode").map_or(o.at, |v| v.span().start),
            &o.field("mode"),
            "`sync` needs at least one mirror",
            Some("add `mirrors = [\"REGION\"]` or use `mode = \"async\"`".into()),
        );
        ok = false;
    }

    let retention = o.get("retention").map(|v| {
        let d = cx.duration(v, &o.field("retention"));
        ok &= d.is_some();
        d
    });

    let wire_compression = match o.get("wire_compression") {
        None => Some(WireCompression::None),
        Some(v) => cx
            .choice(v, &o.field("wire_compression"), &["none", "snappy"])
            .map(|i| [WireCompression::None, WireCompression::Snappy][i]),
    };

    let wire_copies = match o.get("wire_copies") {
        None => Some(1),
        Some(v) => cx.int(v, &o.field("wire_copies"), 1, 2).map(|n| n as u8),
    };

    let wire_fec = match o.get("wire_fec") {
        None => Some(0),
        Some(v) => cx.int(v, &o.field("wire_fec"), 0, 100).map(|n| n as u8),
    };

    let rule = TopicRule {
        pattern: pattern?,
        partitions: partitions.flatten(),
        primary: primary?,
        mirrors,
        mode: mode?,
        retention: retention.flatten(),
        wire_compression: wire_compression?,
        wire_copies: wire_copies?,
        wire_fec: wire_fec?,
    };
    let at = RuleAt {
        at: o.at,
        pattern_at: pv?.span().start,
        primary_at: prv?.span().start,
    };
    // Returned even when another field had an error, so the cross-rule checks still see it
    // (the topology as a whole is rejected anyway).
    Some((rule, at))
}

/// Cross-rule checks: no rule shadowed by an earlier one (so no topic has two primaries), and
/// the regions that mirror have gateways.
pub(super) fn check_rules(
    cx: &mut Cx<'_>,
    rules: &[(usize, TopicRule)],
    at: &[RuleAt],
    regions: &[Region],
    region_at: &HashMap<String, RegionAt>,
) {
    for (j, (jj, b)) in rules.iter().enumerate() {
        // An earlier rule matching b's pattern (its `*` taken literally) matches every topic b
        // matches, so b never applies.
        let Some((i, (ii, a))) = rules[..j]
            .iter()
            .enumerate()
            .find(|(_, (_, a))| glob_match(&a.pattern, &b.pattern))
        else {
            continue;
        };
        let line = cx.line(at[i].at);
        if a.pattern == b.pattern && a.primary != b.primary {
            cx.err(
                at[j].primary_at,
                &format!("topics[{jj}].primary"),
                format!(
                    "topic `{}` is claimed as primary by two regions: `{}` (topics[{ii}], line \
                     {line}) and `{}`",
                    b.pattern, a.primary, b.primary
                ),
                Some("a topic has exactly one primary region; remove one rule".into()),
            );
        } else if a.pattern == b.pattern {
            cx.err(
                at[j].pattern_at,
                &format!("topics[{jj}].pattern"),
                format!(
                    "duplicate rule for `{}` (topics[{ii}], line {line})",
                    b.pattern
                ),
                Some("merge the two rules".into()),
            );
        } else {
            cx.err(
                at[j].pattern_at,
                &format!("topics[{jj}].pattern"),
                format!(
                    "this rule never applies: topics[{ii}] (`{}`, primary `{}`, line {line}) \
                     already matches every topic `{}` matches",
                    a.pattern, a.primary, b.pattern
                ),
                Some("the first matching rule wins; put more specific rules first".into()),
            );
        }
    }

    // Mirroring needs a gateway on both ends.
    let mut reported = Vec::new();
    for (j, (jj, r)) in rules.iter().enumerate() {
        if r.mirrors.is_empty() {
            continue;
        }
        for name in std::iter::once(&r.primary).chain(&r.mirrors) {
            let Some(region) = regions.iter().find(|g| &g.name == name) else {
                continue;
            };
            if region.gateway.is_none() && !reported.contains(name) {
                reported.push(name.clone());
                let at_name = region_at.get(name).map_or(0, |a| a.name_at);
                cx.err(
                    at_name,
                    &format!("regions.{name}.gateway"),
                    format!(
                        "region `{name}` has no gateway but mirrors topics (topics[{jj}], line {})",
                        cx.line(at[j].at)
                    ),
                    Some(format!(
                        "add `[regions.{name}.gateway]` with `quic` and `admin` addresses"
                    )),
                );
            }
        }
    }
}
