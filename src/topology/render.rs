//! `ferry topology show`: a resolved [`Topology`] as plain-text tables. Owns the layout only;
//! the values come from the topology as read.

use super::*;
use crate::units::format_duration;

/// The resolved topology as plain-text tables: regions, processes and their addresses, topics
/// and where they flow, failover and TLS.
pub fn render_tables(t: &Topology) -> String {
    let mut out = format!("topology {}\n\n", t.file.display());

    out.push_str("REGIONS\n");
    let rows: Vec<Vec<String>> = t
        .regions
        .iter()
        .map(|r| {
            let primary_for: Vec<&str> = t
                .topics
                .iter()
                .filter(|x| x.primary == r.name)
                .map(|x| x.pattern.as_str())
                .collect();
            let mirror_of: Vec<&str> = t
                .topics
                .iter()
                .filter(|x| x.mirrors.contains(&r.name))
                .map(|x| x.pattern.as_str())
                .collect();
            let brokers = match &r.cluster {
                None => r.brokers.len().to_string(),
                Some(c) => format!(
                    "{} (RF {}, min ISR {})",
                    r.brokers.len(),
                    c.replication_factor,
                    c.min_insync_replicas
                ),
            };
            vec![
                r.name.clone(),
                brokers,
                if r.gateway.is_some() { "yes" } else { "no" }.to_string(),
                r.data_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(&r.name))
                    .display()
                    .to_string(),
                list_or_dash(&primary_for),
                list_or_dash(&mirror_of),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "REGION",
            "BROKERS",
            "GATEWAY",
            "DATA DIR",
            "PRIMARY FOR",
            "MIRRORS",
        ],
        &rows,
    ));

    out.push_str("\nPROCESSES\n");
    let mut rows = Vec::new();
    for r in &t.regions {
        match r.cluster.as_ref().map(|c| &c.etcd) {
            Some(EtcdSpec::Managed { client, peer }) => {
                rows.push(vec![
                    r.name.clone(),
                    "etcd".into(),
                    "client".into(),
                    client.to_string(),
                    format!("http://{client}"),
                ]);
                rows.push(vec![
                    r.name.clone(),
                    "etcd".into(),
                    "peer".into(),
                    peer.to_string(),
                    format!("http://{peer}"),
                ]);
            }
            Some(EtcdSpec::External { endpoints }) => rows.push(vec![
                r.name.clone(),
                "etcd (yours)".into(),
                "client".into(),
                "-".into(),
                endpoints.join(","),
            ]),
            None => {}
        }
        for b in &r.brokers {
            let p = format!("broker {}", b.id);
            let adv = format!("{}:{}", b.advertised.0, b.advertised.1);
            rows.push(vec![
                r.name.clone(),
                p.clone(),
                "kafka".into(),
                b.listen.to_string(),
                adv,
            ]);
            if let Some(m) = b.metrics {
                rows.push(vec![
                    r.name.clone(),
                    p,
                    "metrics".into(),
                    m.to_string(),
                    "/metrics".into(),
                ]);
            }
        }
        if let Some(g) = &r.gateway {
            let adv = format!("{}:{}", g.advertised.0, g.advertised.1);
            let p = "gateway".to_string();
            rows.push(vec![
                r.name.clone(),
                p.clone(),
                "quic (udp)".into(),
                g.quic.to_string(),
                adv,
            ]);
            rows.push(vec![
                r.name.clone(),
                p.clone(),
                "admin".into(),
                g.admin.to_string(),
                "-".into(),
            ]);
            if let Some(m) = g.metrics {
                rows.push(vec![
                    r.name.clone(),
                    p,
                    "metrics".into(),
                    m.to_string(),
                    "/metrics".into(),
                ]);
            }
        }
    }
    out.push_str(&table(
        &["REGION", "PROCESS", "ENDPOINT", "LISTEN", "ADVERTISED"],
        &rows,
    ));

    out.push_str("\nTOPICS (first matching rule wins; internal `__` topics are never mirrored)\n");
    if t.topics.is_empty() {
        out.push_str("(no rules: every topic stays in the region it is written to)\n");
    } else {
        let rows: Vec<Vec<String>> = t
            .topics
            .iter()
            .map(|r| {
                let flow = if r.mirrors.is_empty() {
                    format!("{} (not mirrored)", r.primary)
                } else {
                    format!("{} -> {}", r.primary, r.mirrors.join(", "))
                };
                vec![
                    r.pattern.clone(),
                    r.primary.clone(),
                    flow,
                    match r.mode {
                        ReplicationMode::Async => "async",
                        ReplicationMode::Sync => "sync",
                    }
                    .into(),
                    r.partitions.map_or("default".into(), |p| p.to_string()),
                    r.retention.map_or("default".into(), format_duration),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "TOPIC",
                "PRIMARY",
                "FLOWS",
                "MODE",
                "PARTITIONS",
                "RETENTION",
            ],
            &rows,
        ));
    }

    let f = &t.failover;
    out.push_str("\nFAILOVER\n");
    out.push_str(&table(
        &["FENCING", "LEASE", "HEARTBEAT", "PROMOTION", "WITNESS"],
        &[vec![
            match f.fencing {
                Fencing::Lease => "lease",
                Fencing::None => "none",
            }
            .into(),
            format_duration(f.lease),
            format_duration(f.heartbeat),
            match f.promotion {
                Promotion::Manual => "manual",
                Promotion::Automatic => "automatic",
            }
            .into(),
            f.witness.clone().unwrap_or_else(|| "-".into()),
        ]],
    ));

    out.push_str("\nTLS\n");
    match &t.tls {
        None => out.push_str("(none configured)\n"),
        Some(tls) => {
            let mut rows = vec![vec![
                "(all)".to_string(),
                "ca".into(),
                tls.ca.display().to_string(),
            ]];
            for r in &tls.regions {
                rows.push(vec![
                    r.region.clone(),
                    "cert".into(),
                    r.cert.display().to_string(),
                ]);
                rows.push(vec![
                    r.region.clone(),
                    "key".into(),
                    r.key.display().to_string(),
                ]);
            }
            out.push_str(&table(&["REGION", "FILE", "PATH"], &rows));
        }
    }
    out
}

fn list_or_dash(items: &[&str]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(", ")
    }
}

/// Left-aligned columns separated by two spaces.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}
