//! TLS material for the gateways' mutual TLS (`[tls]`): the CA and each region's certificate
//! and key, resolved against the topology file's directory; every named file must exist and
//! every region with a gateway must have a certificate.
//!
//! Owns: reading and checking these fields into [`Tls`]. Does not own: creating certificates
//! (`ferry certs init`, `transport::certs`), loading them into TLS configurations
//! (`transport`), or the typed readers and error collection (`reader`).

use std::path::{Path, PathBuf};

use super::reader::{Cx, Val};
use super::{Region, RegionTls, Tls};

const TLS_KEYS: &[&str] = &["ca", "regions"];
const TLS_REGION_KEYS: &[&str] = &["cert", "key"];

pub(super) fn read_tls(
    cx: &mut Cx<'_>,
    v: &Val<'_>,
    base: &Path,
    regions: &[Region],
    region_hint: &dyn Fn() -> Option<String>,
) -> Option<Tls> {
    let o = cx.table(v, "tls")?;
    o.known(cx, TLS_KEYS);
    let file_hint = |p: &Path| {
        Some(format!(
            "looked for {}; paths are relative to the topology file's directory \
             (`ferry certs init` creates a CA and one certificate per region)",
            p.display()
        ))
    };
    let path_of = |cx: &mut Cx<'_>, v: &Val<'_>, field: &str, what: &str| -> Option<PathBuf> {
        let s = cx.nonempty_string(v, field)?;
        let p = base.join(&s);
        if !p.is_file() {
            cx.err(
                v.span().start,
                field,
                format!("{what} file `{s}` not found"),
                file_hint(&p),
            );
            return None;
        }
        Some(p)
    };
    let ca = o
        .required(
            cx,
            "ca",
            Some("the CA certificate, e.g. `ca = \"certs/ca.pem\"`".into()),
        )
        .and_then(|v| path_of(cx, v, "tls.ca", "CA certificate"));
    let mut out = Vec::new();
    let mut ok = true;
    if let Some(v) = o.get("regions") {
        if let Some(rs) = cx.table(v, "tls.regions") {
            for (k, v) in rs.entries() {
                let name = k.get_ref().to_string();
                let path = format!("tls.regions.{name}");
                if !regions.iter().any(|r| r.name == name) {
                    cx.err(
                        k.span().start,
                        &path,
                        format!("`{name}` is not a region"),
                        region_hint(),
                    );
                    ok = false;
                    continue;
                }
                let Some(r) = cx.table(v, &path) else {
                    ok = false;
                    continue;
                };
                r.known(cx, TLS_REGION_KEYS);
                let cert = r
                    .required(
                        cx,
                        "cert",
                        Some(format!("e.g. `cert = \"certs/{name}.pem\"`")),
                    )
                    .and_then(|v| path_of(cx, v, &r.field("cert"), "certificate"));
                let key = r
                    .required(
                        cx,
                        "key",
                        Some(format!("e.g. `key = \"certs/{name}.key\"`")),
                    )
                    .and_then(|v| path_of(cx, v, &r.field("key"), "key"));
                match (cert, key) {
                    (Some(cert), Some(key)) => out.push(RegionTls {
                        region: name,
                        cert,
                        key,
                    }),
                    _ => ok = false,
                }
            }
        } else {
            ok = false;
        }
    }
    // Every gateway needs its certificate.
    for r in regions.iter().filter(|r| r.gateway.is_some()) {
        let named = o
            .get("regions")
            .and_then(|v| v.get_ref().as_table())
            .is_some_and(|t| t.contains_key(r.name.as_str()));
        if !named {
            cx.err(
                o.at,
                &format!("tls.regions.{}", r.name),
                format!("region `{}` has a gateway but no certificate", r.name),
                Some(format!(
                    "add `[tls.regions.{}]` with `cert` and `key`",
                    r.name
                )),
            );
            ok = false;
        }
    }
    Some(Tls {
        ca: ca?,
        regions: out,
    })
    .filter(|_| ok)
}
