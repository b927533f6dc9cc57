//! A region cluster in a topology file: where the region's metadata store (etcd) is, and the
//! replication defaults of its topics.
//!
//! ```toml
//! [regions.east]
//! replication_factor = 3        # topics created without one (default: min(3, brokers))
//! min_insync_replicas = 2       # topics that do not set it (default 1)
//!
//! [regions.east.etcd]           # `ferry up` starts this etcd (Debian's etcd-server)
//! client = "127.0.0.1:12379"
//! peer = "127.0.0.1:12380"
//! # or, for an etcd cluster you run:  endpoints = ["http://10.0.0.5:2379", ...]
//! ```
//!
//! Owns: reading and checking these fields. Does not own: starting etcd (`cli::supervisor`) or
//! joining the cluster (`broker::cluster`).

use std::net::SocketAddr;

use super::reader::{Cx, Obj, Val};
use super::regions::{push_listener, Listener};

/// A region of several brokers (or of one that joins through etcd): its metadata store and the
/// defaults of its replicated topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionCluster {
    pub etcd: EtcdSpec,
    /// Replicas of topics created without a replication factor; at most the broker count.
    pub replication_factor: i32,
    /// `min.insync.replicas` of topics that do not set it; at most `replication_factor`.
    pub min_insync_replicas: usize,
}

/// Where a region's etcd is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcdSpec {
    /// One etcd member that `ferry up` starts, with its data in `<region dir>/etcd`.
    Managed {
        client: SocketAddr,
        peer: SocketAddr,
    },
    /// An etcd the operator runs: its client URLs.
    External { endpoints: Vec<String> },
}

impl EtcdSpec {
    /// The client URLs brokers connect to.
    pub fn endpoints(&self) -> Vec<String> {
        match self {
            EtcdSpec::Managed { client, .. } => vec![format!("http://{client}")],
            EtcdSpec::External { endpoints } => endpoints.clone(),
        }
    }
}

const ETCD_KEYS: &[&str] = &["client", "peer", "endpoints"];

/// Read a region's `etcd`, `replication_factor` and `min_insync_replicas` (`brokers`: how many
/// the region lists). `Ok(None)`: a region of one broker without etcd. `Err(())`: errors were
/// reported.
pub(super) fn read(
    cx: &mut Cx<'_>,
    o: &Obj<'_, '_>,
    region: &str,
    brokers: usize,
    listeners: &mut Vec<Listener>,
) -> Result<Option<RegionCluster>, ()> {
    let mut ok = true;
    let etcd = match o.get("etcd") {
        None => None,
        Some(v) => {
            let e = read_etcd(cx, v, &o.field("etcd"), listeners);
            ok &= e.is_some();
            e
        }
    };
    let mut int = |key: &str, max: i64| -> Option<(i64, usize)> {
        let v = o.get(key)?;
        let n = cx.int(v, &o.field(key), 1, max);
        ok &= n.is_some();
        n.map(|n| (n, v.span().start))
    };
    let rf = int("replication_factor", 1000);
    let min_isr = int("min_insync_replicas", 1000);
    if etcd.is_none() {
        if ok && brokers > 1 {
            cx.err(
                o.at,
                &o.field("etcd"),
                format!(
                    "region `{region}` has {brokers} brokers: a region of several brokers keeps \
                     its metadata in etcd"
                ),
                Some(format!(
                    "add `[regions.{region}.etcd]` with `client` and `peer` addresses (ferry up \
                     starts it) or `endpoints` of an etcd you run"
                )),
            );
            return Err(());
        }
        for (key, v) in [("replication_factor", rf), ("min_insync_replicas", min_isr)] {
            if let Some((_, at)) = v {
                cx.err(
                    at,
                    &o.field(key),
                    format!(
                        "`{key}` applies to a region cluster, and region `{region}` has no etcd"
                    ),
                    Some(format!("add `[regions.{region}.etcd]`, or remove `{key}`")),
                );
                ok = false;
            }
        }
        return if ok { Ok(None) } else { Err(()) };
    }
    let replication_factor = match rf {
        Some((n, at)) if n as usize > brokers => {
            cx.err(
                at,
                &o.field("replication_factor"),
                format!(
                    "replication factor {n} is more than the {brokers} broker(s) of region \
                     `{region}`"
                ),
                Some(format!(
                    "at most {brokers}, or add `[[regions.{region}.brokers]]`"
                )),
            );
            return Err(());
        }
        Some((n, _)) => n as i32,
        None => brokers.min(3) as i32,
    };
    let min_insync_replicas = match min_isr {
        Some((n, at)) if n as i32 > replication_factor => {
            cx.err(
                at,
                &o.field("min_insync_replicas"),
                format!(
                    "min_insync_replicas {n} is more than the replication factor \
                     {replication_factor}: no acks=all produce could ever succeed"
                ),
                Some(format!("at most {replication_factor}")),
            );
            return Err(());
        }
        Some((n, _)) => n as usize,
        None => 1,
    };
    match (ok, etcd) {
        (true, Some(etcd)) => Ok(Some(RegionCluster {
            etcd,
            replication_factor,
            min_insync_replicas,
        })),
        _ => Err(()),
    }
}

fn read_etcd(
    cx: &mut Cx<'_>,
    v: &Val<'_>,
    path: &str,
    listeners: &mut Vec<Listener>,
) -> Option<EtcdSpec> {
    let o = cx.table(v, path)?;
    o.known(cx, ETCD_KEYS);
    let addr = |cx: &mut Cx<'_>, listeners: &mut Vec<Listener>, key: &str| {
        let v = o.get(key)?;
        let a = cx.addr(v, &o.field(key))?;
        push_listener(listeners, a, o.field(key), v.span().start);
        Some(a)
    };
    match (o.get("client"), o.get("peer"), o.get("endpoints")) {
        (None, None, Some(ev)) => {
            let items = cx.array(ev, &o.field("endpoints"))?;
            if items.is_empty() {
                cx.err(
                    ev.span().start,
                    &o.field("endpoints"),
                    "no etcd endpoint",
                    Some("e.g. `endpoints = [\"http://10.0.0.5:2379\"]`".into()),
                );
                return None;
            }
            let mut endpoints = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let field = format!("{}[{i}]", o.field("endpoints"));
                let url = cx.nonempty_string(item, &field)?;
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    cx.err(
                        item.span().start,
                        &field,
                        format!("`{url}` is not an etcd client URL"),
                        Some("write it as `http://HOST:PORT`".into()),
                    );
                    return None;
                }
                endpoints.push(url);
            }
            Some(EtcdSpec::External { endpoints })
        }
        (Some(_), Some(_), None) => {
            let client = addr(cx, listeners, "client");
            let peer = addr(cx, listeners, "peer");
            Some(EtcdSpec::Managed {
                client: client?,
                peer: peer?,
            })
        }
        (_, _, Some(ev)) => {
            cx.err(
                ev.span().start,
                &o.field("endpoints"),
                "`endpoints` (an etcd you run) and `client`/`peer` (one ferry up starts) exclude \
                 each other",
                Some("keep one of the two".into()),
            );
            None
        }
        _ => {
            cx.err(
                o.at,
                path,
                "an etcd needs both `client` and `peer` addresses (ferry up starts it), or \
                 `endpoints` (an etcd you run)",
                Some("e.g. `client = \"127.0.0.1:12379\"` and `peer = \"127.0.0.1:12380\"`".into()),
            );
            None
        }
    }
}
