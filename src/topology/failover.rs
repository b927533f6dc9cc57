//! The failover policy (`[failover]`): fencing, lease and heartbeat, manual or automatic
//! promotion, and the witness region, checked against each other (the heartbeat is shorter
//! than the lease; automatic promotion needs lease fencing and a third region or a witness).
//!
//! Owns: reading and checking these fields into [`FailoverPolicy`] (its defaults are
//! `FailoverPolicy::default`). Does not own: acting on the policy (the gateway's leases and
//! promotion, `crate::failover`), or the typed readers and error collection (`reader`).

use super::reader::{Cx, Val};
use super::{FailoverPolicy, Fencing, Promotion};
use crate::units::format_duration;

const FAILOVER_KEYS: &[&str] = &["fencing", "lease", "heartbeat", "promotion", "witness"];

pub(super) fn read_failover(
    cx: &mut Cx<'_>,
    v: &Val<'_>,
    regions: &[&str],
    region_hint: &dyn Fn() -> Option<String>,
) -> FailoverPolicy {
    let mut f = FailoverPolicy::default();
    let Some(o) = cx.table(v, "failover") else {
        return f;
    };
    o.known(cx, FAILOVER_KEYS);
    if let Some(v) = o.get("fencing") {
        if let Some(i) = cx.choice(v, "failover.fencing", &["lease", "none"]) {
            f.fencing = [Fencing::Lease, Fencing::None][i];
        }
    }
    let mut lease_ok = true;
    if let Some(v) = o.get("lease") {
        match cx.duration(v, "failover.lease") {
            Some(d) if d.is_zero() => {
                cx.err(
                    v.span().start,
                    "failover.lease",
                    "must be longer than 0",
                    None,
                );
                lease_ok = false;
            }
            Some(d) => f.lease = d,
            None => lease_ok = false,
        }
    }
    let mut hb_ok = true;
    if let Some(v) = o.get("heartbeat") {
        match cx.duration(v, "failover.heartbeat") {
            Some(d) if d.is_zero() => {
                cx.err(
                    v.span().start,
                    "failover.heartbeat",
                    "must be longer than 0",
                    None,
                );
                hb_ok = false;
            }
            Some(d) => f.heartbeat = d,
            None => hb_ok = false,
        }
    }
    if lease_ok && hb_ok && f.heartbeat >= f.lease {
        let at = o
            .get("heartbeat")
            .or(o.get("lease"))
            .map_or(o.at, |v| v.span().start);
        cx.err(
            at,
            "failover.heartbeat",
            format!(
                "heartbeat {} is not shorter than the lease {}",
                format_duration(f.heartbeat),
                format_duration(f.lease)
            ),
            Some("renew several times per lease, e.g. heartbeat = lease / 5".into()),
        );
    }
    if let Some(v) = o.get("promotion") {
        if let Some(i) = cx.choice(v, "failover.promotion", &["manual", "automatic"]) {
            f.promotion = [Promotion::Manual, Promotion::Automatic][i];
            if f.promotion == Promotion::Automatic && f.fencing == Fencing::None {
                cx.err(
                    v.span().start,
                    "failover.promotion",
                    "automatic promotion without fencing can leave two primaries",
                    Some("set `fencing = \"lease\"` or `promotion = \"manual\"`".into()),
                );
            }
        }
    }
    if let Some(v) = o.get("witness") {
        if let Some(w) = cx.nonempty_string(v, "failover.witness") {
            if regions.contains(&w.as_str()) {
                f.witness = Some(w);
            } else {
                cx.err(
                    v.span().start,
                    "failover.witness",
                    format!("witness `{w}` is not a region"),
                    region_hint(),
                );
            }
        }
    }
    if let Some(v) = o.get("promotion") {
        if f.promotion == Promotion::Automatic && regions.len() < 3 && f.witness.is_none() {
            cx.err(
                v.span().start,
                "failover.promotion",
                "automatic promotion needs a third region or a witness: with two regions, both sides of a cut would promote themselves",
                Some("add a region (it may be a witness: `witness = \"NAME\"`) or use `promotion = \"manual\"` and `ferry failover --force`".into()),
            );
        }
    }
    f
}
