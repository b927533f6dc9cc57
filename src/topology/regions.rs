//! The regions of a topology file (`[regions.NAME]`): their brokers, gateway and data
//! directory, and the checks across regions (no two share a data directory, no two listeners
//! share an address). Also the walk over the whole file (`read_topology`), which hands
//! `[[topics]]`, `[failover]`, `[tls]` and `[limits]` to their own readers.
//!
//! Owns: reading and checking these fields into [`Region`], [`BrokerSpec`] and [`GatewaySpec`],
//! and the listeners seen while reading. Does not own: a region's etcd and replication defaults
//! (`cluster`), topic rules (`rules`), the other top-level tables (`failover`, `limits`, `tls`),
//! or the typed readers and error collection (`reader`).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use toml::de::DeTable;

use super::cluster;
use super::failover::read_failover;
use super::limits::read_limits;
use super::reader::{Cx, Obj, Val};
use super::rules::{check_rules, read_rule};
use super::tls::read_tls;
use super::{BrokerSpec, FailoverPolicy, GatewaySpec, Region, Topology};

// ---------------------------------------------------------------------------------------------
// The schema
// ---------------------------------------------------------------------------------------------

const ROOT_KEYS: &[&str] = &["regions", "topics", "failover", "tls", "limits"];
const REGION_KEYS: &[&str] = &[
    "brokers",
    "gateway",
    "data_dir",
    "etcd",
    "replication_factor",
    "min_insync_replicas",
];
const BROKER_KEYS: &[&str] = &["id", "listen", "advertised", "metrics"];
const GATEWAY_KEYS: &[&str] = &["quic", "advertised", "admin", "metrics"];

/// A listener seen while reading, for the overlap check.
pub(super) struct Listener {
    addr: SocketAddr,
    field: String,
    at: usize,
}

/// Where a region was defined, for cross-references.
pub(super) struct RegionAt {
    pub(super) name_at: usize,
    data_dir_at: usize,
}

pub(super) fn read_topology(
    cx: &mut Cx<'_>,
    root: &DeTable<'_>,
    file_name: &str,
    base: &Path,
) -> Topology {
    let root = Obj {
        t: root,
        path: String::new(),
        at: 0,
    };
    root.known(cx, ROOT_KEYS);
    let mut listeners = Vec::new();

    // Regions.
    let mut regions = Vec::new();
    // Every region named in the file, even one with errors, so that references to it are not
    // reported a second time.
    let mut declared: Vec<String> = Vec::new();
    let mut region_at: HashMap<String, RegionAt> = HashMap::new();
    match root.get("regions") {
        None => cx.err(
            0,
            "regions",
            "no regions defined",
            Some(
                "add a `[regions.NAME]` table with at least one `[[regions.NAME.brokers]]`".into(),
            ),
        ),
        Some(v) => {
            if let Some(rs) = cx.table(v, "regions") {
                if rs.t.is_empty() {
                    cx.err(rs.at, "regions", "no regions defined", None);
                }
                for (k, v) in rs.entries() {
                    let name = k.get_ref().to_string();
                    declared.push(name.clone());
                    if let Some((r, at)) = read_region(cx, &name, k.span().start, v, &mut listeners)
                    {
                        region_at.insert(name, at);
                        regions.push(r);
                    }
                }
            }
        }
    }
    check_region_dirs(cx, &regions, &region_at);
    check_listeners(cx, &listeners);
    let names: Vec<&str> = declared.iter().map(String::as_str).collect();
    let known_regions = names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let region_hint = || Some(format!("defined regions: {known_regions}"));

    // Topics.
    let mut topics = Vec::new();
    let mut rule_at = Vec::new();
    if let Some(v) = root.get("topics") {
        if let Some(items) = cx.array(v, "topics") {
            for (i, item) in items.iter().enumerate() {
                let path = format!("topics[{i}]");
                if let Some((rule, at)) = read_rule(cx, item, &path, &names, &region_hint) {
                    topics.push((i, rule));
                    rule_at.push(at);
                }
            }
        }
    }
    check_rules(cx, &topics, &rule_at, &regions, &region_at);

    // Failover.
    let failover = match root.get("failover") {
        Some(v) => read_failover(cx, v, &names, &region_hint),
        None => FailoverPolicy::default(),
    };

    // TLS.
    let tls = root
        .get("tls")
        .and_then(|v| read_tls(cx, v, base, &regions, &region_hint));

    // Limits.
    let limits = match root.get("limits") {
        Some(v) => read_limits(cx, v),
        None => crate::limits::ConnectionLimits::default(),
    };

    Topology {
        regions,
        topics: topics.into_iter().map(|(_, r)| r).collect(),
        failover,
        tls,
        limits,
        file: PathBuf::from(file_name),
    }
}

fn valid_region_name(name: &str) -> bool {
    let mut c = name.chars();
    matches!(c.next(), Some('a'..='z'))
        && c.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && name.len() <= 64
}

fn read_region(
    cx: &mut Cx<'_>,
    name: &str,
    name_at: usize,
    v: &Val<'_>,
    listeners: &mut Vec<Listener>,
) -> Option<(Region, RegionAt)> {
    let path = format!("regions.{name}");
    let mut ok = true;
    if !valid_region_name(name) {
        cx.err(
            name_at,
            &path,
            format!("`{name}` is not a valid region name"),
            Some("use lowercase letters, digits, `-` and `_`, starting with a letter".into()),
        );
        ok = false;
    }
    let o = cx.table(v, &path)?;
    o.known(cx, REGION_KEYS);

    let mut data_dir = None;
    let mut data_dir_at = o.at;
    if let Some(v) = o.get("data_dir") {
        data_dir_at = v.span().start;
        data_dir = cx
            .nonempty_string(v, &o.field("data_dir"))
            .map(PathBuf::from);
        ok &= data_dir.is_some();
    }

    // Brokers.
    let mut brokers: Vec<BrokerSpec> = Vec::new();
    let mut id_lines: BTreeMap<i32, usize> = BTreeMap::new();
    let hint = format!("add a `[[regions.{name}.brokers]]` table with `id` and `listen`");
    match o.required(cx, "brokers", Some(hint.clone())) {
        None => ok = false,
        Some(v) => match cx.array(v, &o.field("brokers")) {
            None => ok = false,
            Some([]) => {
                cx.err(
                    v.span().start,
                    &o.field("brokers"),
                    "a region needs at least one broker",
                    Some(hint),
                );
                ok = false;
            }
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    let bpath = format!("{path}.brokers[{i}]");
                    match read_broker(cx, item, &bpath, listeners) {
                        Some((b, id_at)) => {
                            if let Some(line) = id_lines.get(&b.id) {
                                cx.err(
                                    id_at,
                                    &format!("{bpath}.id"),
                                    format!("duplicate broker id {} in region `{name}`", b.id),
                                    Some(format!(
                                        "broker {} is first defined at line {line}; ids must be \
                                         unique within a region",
                                        b.id
                                    )),
                                );
                                ok = false;
                            } else {
                                id_lines.insert(b.id, cx.line(id_at));
                            }
                            brokers.push(b);
                        }
                        None => ok = false,
                    }
                }
            }
        },
    }

    // A cluster's etcd and replication defaults (only once the brokers are known to count).
    let cluster = if ok {
        match cluster::read(cx, &o, name, brokers.len(), listeners) {
            Ok(c) => c,
            Err(()) => {
                ok = false;
                None
            }
        }
    } else {
        None
    };

    // Gateway.
    let gateway = match o.get("gateway") {
        None => None,
        Some(v) => {
            let g = read_gateway(cx, v, &o.field("gateway"), listeners);
            ok &= g.is_some();
            g
        }
    };

    ok.then(|| {
        (
            Region {
                name: name.to_string(),
                brokers,
                gateway,
                cluster,
                data_dir,
            },
            RegionAt {
                name_at,
                data_dir_at,
            },
        )
    })
}

pub(super) fn push_listener(
    listeners: &mut Vec<Listener>,
    addr: SocketAddr,
    field: String,
    at: usize,
) {
    listeners.push(Listener { addr, field, at });
}

/// The advertised address: given, or the listener's (which must then be a specific IP).
fn advertised_or_listen(
    cx: &mut Cx<'_>,
    o: &Obj<'_, '_>,
    listen: Option<(SocketAddr, usize)>,
    listen_key: &str,
) -> Option<(String, u16)> {
    match o.get("advertised") {
        Some(v) => cx.host_port(v, &o.field("advertised")),
        None => {
            let (l, at) = listen?;
            if l.ip().is_unspecified() {
                cx.err(
                    at,
                    &o.field(listen_key),
                    format!("`{l}` listens on every interface, so it cannot be advertised"),
                    Some(format!(
                        "add `advertised = \"HOST:{}\"` with the address others connect to",
                        l.port()
                    )),
                );
                return None;
            }
            Some((l.ip().to_string(), l.port()))
        }
    }
}

/// Returns the broker and where its id was written.
fn read_broker(
    cx: &mut Cx<'_>,
    v: &Val<'_>,
    path: &str,
    listeners: &mut Vec<Listener>,
) -> Option<(BrokerSpec, usize)> {
    let o = cx.table(v, path)?;
    o.known(cx, BROKER_KEYS);
    let idv = o.required(cx, "id", Some("broker id 0..=999, e.g. `id = 1`".into()));
    let id = idv.and_then(|v| cx.int(v, &o.field("id"), 0, 999));
    let listen = o
        .required(
            cx,
            "listen",
            Some("Kafka listener, e.g. `listen = \"127.0.0.1:19092\"`".into()),
        )
        .and_then(|v| cx.addr(v, &o.field("listen")).map(|a| (a, v.span().start)));
    if let Some((a, at)) = listen {
        push_listener(listeners, a, o.field("listen"), at);
    }
    let advertised = advertised_or_listen(cx, &o, listen, "listen");
    let mut metrics_ok = true;
    let metrics = o.get("metrics").and_then(|v| {
        let a = cx.addr(v, &o.field("metrics"));
        metrics_ok = a.is_some();
        if let Some(a) = a {
            push_listener(listeners, a, o.field("metrics"), v.span().start);
        }
        a
    });
    Some((
        BrokerSpec {
            id: id? as i32,
            listen: listen?.0,
            advertised: advertised?,
            metrics,
        },
        idv?.span().start,
    ))
    .filter(|_| metrics_ok)
}

fn read_gateway(
    cx: &mut Cx<'_>,
    v: &Val<'_>,
    path: &str,
    listeners: &mut Vec<Listener>,
) -> Option<GatewaySpec> {
    let o = cx.table(v, path)?;
    o.known(cx, GATEWAY_KEYS);
    let mut addr =
        |cx: &mut Cx<'_>, key: &str, hint: Option<&str>| -> (Option<(SocketAddr, usize)>, bool) {
            let v = match hint {
                Some(h) => o.required(cx, key, Some(h.to_string())),
                None => match o.get(key) {
                    None => return (None, true),
                    Some(v) => Some(v),
                },
            };
            let Some(v) = v else { return (None, false) };
            match cx.addr(v, &o.field(key)) {
                Some(a) => {
                    push_listener(listeners, a, o.field(key), v.span().start);
                    (Some((a, v.span().start)), true)
                }
                None => (None, false),
            }
        };
    let (quic, _) = addr(
        cx,
        "quic",
        Some("QUIC (UDP) listener, e.g. `quic = \"127.0.0.1:19093\"`"),
    );
    let (admin, _) = addr(
        cx,
        "admin",
        Some("HTTP admin listener, e.g. `admin = \"127.0.0.1:19095\"`"),
    );
    let (metrics, metrics_ok) = addr(cx, "metrics", None);
    let advertised = advertised_or_listen(cx, &o, quic, "quic");
    if !metrics_ok {
        return None;
    }
    Some(GatewaySpec {
        quic: quic?.0,
        advertised: advertised?,
        admin: admin?.0,
        metrics: metrics.map(|m| m.0),
    })
}

/// Two regions may not share a data directory.
fn check_region_dirs(cx: &mut Cx<'_>, regions: &[Region], at: &HashMap<String, RegionAt>) {
    let mut seen: HashMap<PathBuf, &str> = HashMap::new();
    for r in regions {
        let dir = r.data_dir.clone().unwrap_or_else(|| PathBuf::from(&r.name));
        if let Some(other) = seen.get(&dir) {
            let a = &at[&r.name];
            cx.err(
                a.data_dir_at,
                &format!("regions.{}.data_dir", r.name),
                format!(
                    "data directory `{}` is already used by region `{other}`",
                    dir.display()
                ),
                Some("give each region its own `data_dir`".into()),
            );
        } else {
            seen.insert(dir, &r.name);
        }
    }
}

/// No two listeners on one address. Port 0 (pick any) never conflicts; an unspecified IP
/// (`0.0.0.0`, `::`) conflicts with every IP on the same port.
fn check_listeners(cx: &mut Cx<'_>, listeners: &[Listener]) {
    for (j, b) in listeners.iter().enumerate() {
        if b.addr.port() == 0 {
            continue;
        }
        let clash = listeners[..j].iter().find(|a| {
            a.addr.port() == b.addr.port()
                && (a.addr.ip() == b.addr.ip()
                    || a.addr.ip().is_unspecified()
                    || b.addr.ip().is_unspecified())
        });
        if let Some(a) = clash {
            let line = cx.line(a.at);
            cx.err(
                b.at,
                &b.field,
                format!(
                    "address {} is already used by {} (line {line})",
                    b.addr, a.field
                ),
                Some("every listener (Kafka, QUIC, admin, metrics) needs its own port".into()),
            );
        }
    }
}
