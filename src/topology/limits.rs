//! Connection limits (`[limits]`): how many connections in all and per client address, idle
//! and request-read timeouts, and the memory all requests being read may hold.
//!
//! Owns: reading and checking these fields into a `limits::ConnectionLimits`. Does not own: the
//! limits' defaults or enforcing them (`crate::limits`), or the typed readers and error
//! collection (`reader`).

use toml::de::DeValue;

use super::reader::{Cx, Val};

const LIMITS_KEYS: &[&str] = &[
    "connections_max",
    "connections_per_address_max",
    "idle_timeout",
    "request_read_timeout",
    "request_memory_max",
];

pub(super) fn read_limits(cx: &mut Cx<'_>, v: &Val<'_>) -> crate::limits::ConnectionLimits {
    let mut l = crate::limits::ConnectionLimits::default();
    let Some(o) = cx.table(v, "limits") else {
        return l;
    };
    o.known(cx, LIMITS_KEYS);
    if let Some(v) = o.get("connections_max") {
        if let Some(n) = cx.int(v, "limits.connections_max", 1, 1 << 24) {
            l.connections_max = n as usize;
        }
    }
    if let Some(v) = o.get("connections_per_address_max") {
        if let Some(n) = cx.int(v, "limits.connections_per_address_max", 1, 1 << 24) {
            l.connections_per_address_max = n as usize;
        }
    }
    for (key, slot) in [
        ("idle_timeout", &mut l.idle_timeout),
        ("request_read_timeout", &mut l.request_read_timeout),
    ] {
        if let Some(v) = o.get(key) {
            let field = format!("limits.{key}");
            match cx.duration(v, &field) {
                Some(d) if d.is_zero() => {
                    cx.err(v.span().start, &field, "must be longer than 0", None)
                }
                Some(d) => *slot = d,
                None => {}
            }
        }
    }
    if let Some(v) = o.get("request_memory_max") {
        let field = "limits.request_memory_max";
        let bytes = match v.get_ref() {
            DeValue::Integer(_) => cx.int(v, field, 0, i64::MAX).map(|n| n as u64),
            DeValue::String(s) => match crate::units::parse_size(s) {
                Ok(n) => Some(n),
                Err(m) => {
                    cx.err(v.span().start, field, m, None);
                    None
                }
            },
            other => {
                cx.type_err(v, field, "a size such as \"256MiB\"", other);
                None
            }
        };
        match bytes {
            Some(n) if (n as usize) < crate::limits::FRAME_BYTES_MAX_DEFAULT => cx.err(
                v.span().start,
                field,
                format!("{n} bytes is below the largest request a broker reads (100 MiB)"),
                Some("write at least \"100MiB\"".into()),
            ),
            Some(n) => l.request_memory_max = n as usize,
            None => {}
        }
    }
    l
}
