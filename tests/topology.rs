//! Topology files: the examples in `topology/` load, and each kind of bad topology is reported
//! with the file, line, column and field.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry::topology::{
    load, parse, render_tables, Fencing, Promotion, ReplicationMode, Topology, TopologyError,
};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("topology")
        .join(name)
}

/// Two valid regions; tests append to it or replace parts of it.
const BASE: &str = r#"
[regions.east]

[[regions.east.brokers]]
id = 1
listen = "127.0.0.1:19092"
metrics = "127.0.0.1:19094"

[regions.east.gateway]
quic = "127.0.0.1:19093"
admin = "127.0.0.1:19095"

[regions.west]

[[regions.west.brokers]]
id = 1
listen = "127.0.0.1:29092"

[regions.west.gateway]
quic = "127.0.0.1:29093"
admin = "127.0.0.1:29095"
"#;

fn check(text: &str) -> Result<Topology, Vec<TopologyError>> {
    parse(text, "test.toml", Path::new("/nonexistent"))
}

fn errors(text: &str) -> Vec<TopologyError> {
    match check(text) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e,
    }
}

/// The 1-based line of the `nth` (0-based) line containing `needle`.
fn line_of(text: &str, needle: &str, nth: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .nth(nth)
        .unwrap_or_else(|| panic!("`{needle}` #{nth} not in text"))
        .0
        + 1
}

/// The single error naming `field`, or a panic listing all errors.
fn error_for<'e>(errs: &'e [TopologyError], field: &str) -> &'e TopologyError {
    let found: Vec<_> = errs.iter().filter(|e| e.field == field).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one error for `{field}`, got:\n{}",
        errs.iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    found[0]
}

#[test]
fn local_example_is_the_embedded_default() {
    let t = load(&example("local.toml")).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(t.regions.len(), 2);
    let east = t.region("east").unwrap();
    let west = t.region("west").unwrap();
    assert_eq!(east.brokers[0].listen, "127.0.0.1:19092".parse().unwrap());
    assert_eq!(west.brokers[0].listen, "127.0.0.1:29092".parse().unwrap());
    assert_eq!(east.brokers[0].advertised, ("127.0.0.1".to_string(), 19092));
    assert!(east.gateway.is_some() && west.gateway.is_some());
    assert!(t.tls.is_none());

    let rule = t.rule_for_topic("anything").unwrap();
    assert_eq!(rule.primary, "east");
    assert_eq!(rule.mirrors, vec!["west".to_string()]);
    assert_eq!(rule.mode, ReplicationMode::Async);
    assert!(t.rule_for_topic("__consumer_offsets").is_none());

    let embedded = Topology::local();
    assert_eq!(embedded.regions, t.regions);
    assert_eq!(embedded.topics, t.topics);
    assert_eq!(embedded.failover, t.failover);
}

#[test]
fn three_regions_example_loads() {
    let t = load(&example("three-regions.toml")).unwrap_or_else(|e| panic!("{e:?}"));
    let names: Vec<_> = t.regions.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["east", "west", "south"]);
    assert_eq!(
        t.region("south").unwrap().brokers[0].listen,
        "127.0.0.1:31092".parse().unwrap()
    );
    assert_eq!(t.region("east").unwrap().brokers[0].listen.port(), 19092);
    assert_eq!(t.region("west").unwrap().brokers[0].listen.port(), 29092);
    let rule = t.rule_for_topic("orders").unwrap();
    assert_eq!(rule.primary, "east");
    assert_eq!(rule.mirrors, vec!["west".to_string(), "south".to_string()]);
}

#[test]
fn active_active_example_has_primaries_in_both_regions() {
    let t = load(&example("active-active.toml")).unwrap_or_else(|e| panic!("{e:?}"));
    let orders = t.rule_for_topic("orders").unwrap();
    assert_eq!(
        (orders.primary.as_str(), orders.mode),
        ("east", ReplicationMode::Sync)
    );
    assert_eq!(orders.partitions, Some(6));
    assert_eq!(orders.retention, Some(Duration::from_secs(7 * 86400)));
    assert_eq!(t.rule_for_topic("payments").unwrap().primary, "west");
    assert_eq!(t.rule_for_topic("west.clicks").unwrap().primary, "west");
    assert!(t.rule_for_topic("scratch.x").unwrap().mirrors.is_empty());
    assert_eq!(t.rule_for_topic("other").unwrap().primary, "east");
    assert_eq!(t.rule_for_topic("other").unwrap().pattern, "*");
}

#[test]
fn defaults_apply() {
    let t = check(BASE).unwrap();
    assert_eq!(t.failover.fencing, Fencing::Lease);
    assert_eq!(t.failover.lease, Duration::from_secs(10));
    assert_eq!(t.failover.heartbeat, Duration::from_secs(2));
    assert_eq!(t.failover.promotion, Promotion::Manual);
    assert!(t.topics.is_empty() && t.tls.is_none());
    assert!(t.rule_for_topic("orders").is_none());
}

#[test]
fn unknown_field_is_named_with_a_hint() {
    let text = BASE.replace(
        "metrics = \"127.0.0.1:19094\"",
        "metrcs = \"127.0.0.1:19094\"",
    );
    let errs = errors(&text);
    let e = error_for(&errs, "regions.east.brokers[0].metrcs");
    assert_eq!(e.line, line_of(&text, "metrcs", 0));
    assert_eq!(e.column, 1);
    assert_eq!(e.hint.as_deref(), Some("did you mean `metrics`?"));
    assert_eq!(
        e.to_string(),
        format!(
            "test.toml:{}:1: regions.east.brokers[0].metrcs: unknown field `metrcs` \
             (hint: did you mean `metrics`?)",
            e.line
        )
    );
}

#[test]
fn unknown_top_level_field() {
    let text = format!("{BASE}\n[failovr]\nlease = \"5s\"\n");
    let errs = errors(&text);
    let e = error_for(&errs, "failovr");
    assert_eq!(e.line, line_of(&text, "[failovr]", 0));
    assert_eq!(e.hint.as_deref(), Some("did you mean `failover`?"));
}

#[test]
fn duplicate_region() {
    let text = format!("{BASE}\n[regions.east]\ndata_dir = \"e2\"\n");
    let errs = errors(&text);
    let e = error_for(&errs, "regions.east");
    assert_eq!(e.line, line_of(&text, "[regions.east]", 1));
    assert!(e.message.contains("region `east` is defined twice"), "{e}");
    let first = line_of(&text, "[regions.east]", 0);
    assert_eq!(e.hint, Some(format!("first defined at line {first}")));
}

#[test]
fn duplicate_broker_id_within_a_region() {
    let text = format!("{BASE}\n[[regions.east.brokers]]\nid = 1\nlisten = \"127.0.0.1:19192\"\n");
    let errs = errors(&text);
    let e = error_for(&errs, "regions.east.brokers[1].id");
    assert_eq!(e.line, line_of(&text, "id = 1", 2));
    assert!(e.message.contains("duplicate broker id 1"), "{e}");
    // The same id in another region is fine.
    assert!(errs.iter().all(|e| !e.field.starts_with("regions.west")));
}

#[test]
fn mirror_to_an_undefined_region() {
    let text = format!(
        "{BASE}\n[[topics]]\npattern = \"orders\"\nprimary = \"east\"\nmirrors = [\"west\", \"north\"]\n"
    );
    let errs = errors(&text);
    let e = error_for(&errs, "topics[0].mirrors[1]");
    assert_eq!(e.line, line_of(&text, "mirrors =", 0));
    assert_eq!(e.column, "mirrors = [\"west\", ".len() + 1);
    assert!(e.message.contains("mirror `north` is not a region"), "{e}");
    assert_eq!(e.hint.as_deref(), Some("defined regions: `east`, `west`"));
}

#[test]
fn primary_that_is_not_a_region() {
    let text =
        format!("{BASE}\n[[topics]]\npattern = \"*\"\nprimary = \"esat\"\nmirrors = [\"west\"]\n");
    let errs = errors(&text);
    let e = error_for(&errs, "topics[0].primary");
    assert_eq!(e.line, line_of(&text, "primary = \"esat\"", 0));
    assert_eq!(e.column, "primary = ".len() + 1);
    assert!(e.message.contains("primary `esat` is not a region"), "{e}");
}

#[test]
fn two_listeners_on_one_address_in_one_region() {
    let text = BASE.replace("admin = \"127.0.0.1:19095\"", "admin = \"127.0.0.1:19092\"");
    let errs = errors(&text);
    let e = error_for(&errs, "regions.east.gateway.admin");
    assert_eq!(e.line, line_of(&text, "admin = \"127.0.0.1:19092\"", 0));
    assert!(
        e.message
            .contains("already used by regions.east.brokers[0].listen"),
        "{e}"
    );
}

#[test]
fn two_listeners_on_one_address_across_regions() {
    let text = BASE.replace(
        "listen = \"127.0.0.1:29092\"",
        "listen = \"127.0.0.1:19092\"",
    );
    let errs = errors(&text);
    let e = error_for(&errs, "regions.west.brokers[0].listen");
    assert_eq!(e.line, line_of(&text, "listen = \"127.0.0.1:19092\"", 1));
    assert!(e.message.contains("127.0.0.1:19092 is already used"), "{e}");

    // An unspecified IP overlaps every IP on the same port.
    let text = BASE.replace(
        "listen = \"127.0.0.1:29092\"",
        "listen = \"0.0.0.0:19094\"\nadvertised = \"west.example:19094\"",
    );
    let errs = errors(&text);
    let e = error_for(&errs, "regions.west.brokers[0].listen");
    assert!(e.message.contains("regions.east.brokers[0].metrics"), "{e}");
}

#[test]
fn topic_claimed_as_primary_by_two_regions() {
    let text = format!(
        "{BASE}
[[topics]]
pattern = \"orders\"
primary = \"east\"
mirrors = [\"west\"]

[[topics]]
pattern = \"orders\"
primary = \"west\"
mirrors = [\"east\"]
"
    );
    let errs = errors(&text);
    let e = error_for(&errs, "topics[1].primary");
    assert_eq!(e.line, line_of(&text, "primary = \"west\"", 0));
    assert!(
        e.message
            .contains("topic `orders` is claimed as primary by two regions: `east`"),
        "{e}"
    );
}

#[test]
fn rule_shadowed_by_an_earlier_pattern() {
    let text = format!(
        "{BASE}
[[topics]]
pattern = \"orders.*\"
primary = \"east\"

[[topics]]
pattern = \"orders.eu\"
primary = \"west\"
"
    );
    let errs = errors(&text);
    let e = error_for(&errs, "topics[1].pattern");
    assert_eq!(e.line, line_of(&text, "pattern = \"orders.eu\"", 0));
    assert!(e.message.contains("never applies"), "{e}");

    // The specific rule first is the supported way to override a pattern.
    let text = format!(
        "{BASE}
[[topics]]
pattern = \"orders.eu\"
primary = \"west\"

[[topics]]
pattern = \"orders.*\"
primary = \"east\"
"
    );
    let t = check(&text).unwrap();
    assert_eq!(t.rule_for_topic("orders.eu").unwrap().primary, "west");
    assert_eq!(t.rule_for_topic("orders.us").unwrap().primary, "east");
    assert!(t.rule_for_topic("orders").is_none());
}

#[test]
fn missing_certificate_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    for f in ["ca.pem", "east.pem", "east.key", "west.pem"] {
        std::fs::write(dir.path().join("certs").join(f), "x").unwrap();
    }
    let tls = "
[tls]
ca = \"certs/ca.pem\"

[tls.regions.east]
cert = \"certs/east.pem\"
key = \"certs/east.key\"

[tls.regions.west]
cert = \"certs/west.pem\"
key = \"certs/west.key\"
";
    let path = dir.path().join("t.toml");
    let text = format!("{BASE}{tls}");
    std::fs::write(&path, &text).unwrap();
    let errs = load(&path).unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:?}");
    let e = error_for(&errs, "tls.regions.west.key");
    assert_eq!(e.file, path.display().to_string());
    assert_eq!(e.line, line_of(&text, "key = \"certs/west.key\"", 0));
    assert_eq!(e.column, "key = ".len() + 1);
    assert!(e.message.contains("`certs/west.key` not found"), "{e}");

    // With the file in place, paths resolve against the topology file's directory.
    std::fs::write(dir.path().join("certs/west.key"), "x").unwrap();
    let t = load(&path).unwrap();
    let tls = t.tls.unwrap();
    assert_eq!(tls.ca, dir.path().join("certs/ca.pem"));
    assert_eq!(
        tls.region("west").unwrap().key,
        dir.path().join("certs/west.key")
    );
}

#[test]
fn gateway_without_certificate_when_tls_is_configured() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), "x").unwrap();
    let text = format!("{BASE}\n[tls]\nca = \"ca.pem\"\n");
    let errs = parse(&text, "t.toml", dir.path()).unwrap_err();
    assert_eq!(errs.len(), 2, "{errs:?}");
    error_for(&errs, "tls.regions.east");
    error_for(&errs, "tls.regions.west");
}

#[test]
fn bad_duration_names_the_field() {
    let text = format!("{BASE}\n[failover]\nlease = \"10 parsecs\"\n");
    let errs = errors(&text);
    let e = error_for(&errs, "failover.lease");
    assert_eq!(e.line, line_of(&text, "parsecs", 0));
    assert_eq!(e.column, "lease = ".len() + 1);
    assert!(e.message.contains("parsecs"), "{e}");
    assert!(e.hint.is_some());
    assert!(e
        .to_string()
        .starts_with(&format!("test.toml:{}:9: failover.lease: ", e.line)));
}

#[test]
fn heartbeat_must_be_shorter_than_the_lease() {
    let text = format!("{BASE}\n[failover]\nlease = \"2s\"\nheartbeat = \"5s\"\n");
    let errs = errors(&text);
    error_for(&errs, "failover.heartbeat");
}

#[test]
fn every_error_is_reported_at_once_in_file_order() {
    let text = format!(
        "{BASE}
[[topics]]
pattern = \"a\"
primary = \"nowhere\"
mode = \"eventually\"
retention = \"forever\"
colour = \"blue\"
"
    );
    let errs = errors(&text);
    let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "topics[0].primary",
            "topics[0].mode",
            "topics[0].retention",
            "topics[0].colour"
        ]
    );
    let lines: Vec<usize> = errs.iter().map(|e| e.line).collect();
    assert!(lines.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn missing_fields_point_at_their_table() {
    let text = BASE.replace("listen = \"127.0.0.1:29092\"\n", "");
    let errs = errors(&text);
    let e = error_for(&errs, "regions.west.brokers[0].listen");
    assert_eq!(e.line, line_of(&text, "[[regions.west.brokers]]", 0));
    assert!(e.message.contains("missing field `listen`"));
}

#[test]
fn syntax_errors_have_positions() {
    let text = format!("{BASE}\n[failover]\nlease = 10s\n");
    let errs = errors(&text);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].line, line_of(&text, "lease = 10s", 0));
    assert_eq!(errs[0].field, "failover.lease");
}

#[test]
fn mirrored_regions_need_gateways() {
    let text = BASE.replace(
        "[regions.west.gateway]\nquic = \"127.0.0.1:29093\"\nadmin = \"127.0.0.1:29095\"\n",
        "",
    ) + "\n[[topics]]\npattern = \"*\"\nprimary = \"east\"\nmirrors = [\"west\"]\n";
    let errs = errors(&text);
    error_for(&errs, "regions.west.gateway");
}

#[test]
fn broker_config_resolves_listener_id_metrics_and_data_dir() {
    let t = load(&example("three-regions.toml")).unwrap();
    let c = t
        .broker_config("south", 1, Path::new("/var/ferry"))
        .unwrap();
    assert_eq!(c.listen, "127.0.0.1:31092".parse().unwrap());
    assert_eq!(c.advertised(), ("127.0.0.1".to_string(), 31092));
    // south is the third region: Kafka node ids are unique across the topology.
    assert_eq!(c.node_id, 2001);
    assert_eq!(c.metrics, Some("127.0.0.1:31094".parse().unwrap()));
    assert_eq!(c.data_dir, PathBuf::from("/var/ferry/south/broker-1"));
    assert_eq!(
        c.default_partitions, 1,
        "other settings keep their defaults"
    );
    assert!(t.broker_config("north", 1, Path::new("/d")).is_err());
    assert!(t.broker_config("east", 7, Path::new("/d")).is_err());
}

#[test]
fn show_renders_regions_processes_and_flows() {
    let t = load(&example("active-active.toml")).unwrap();
    let out = render_tables(&t);
    for needle in [
        "REGIONS",
        "PROCESSES",
        "TOPICS",
        "FAILOVER",
        "127.0.0.1:19092",
        "127.0.0.1:29093",
        "east -> west",
        "west -> east",
        "scratch.*",
        "(not mirrored)",
    ] {
        assert!(out.contains(needle), "`{needle}` missing from:\n{out}");
    }
}

#[test]
fn wire_copies_defaults_to_one_and_takes_one_or_two() {
    let rule = "\n[[topics]]\npattern = \"orders\"\nprimary = \"east\"\nmirrors = [\"west\"]\n";
    let t = check(&format!("{BASE}{rule}")).unwrap();
    assert_eq!(t.rule_for_topic("orders").unwrap().wire_copies, 1);
    let t = check(&format!("{BASE}{rule}wire_copies = 2\n")).unwrap();
    assert_eq!(t.rule_for_topic("orders").unwrap().wire_copies, 2);
    let text = format!("{BASE}{rule}wire_copies = 3\n");
    let errs = errors(&text);
    let e = error_for(&errs, "topics[0].wire_copies");
    assert_eq!(e.line, line_of(&text, "wire_copies", 0));
    assert!(e.message.contains("out of range (1 to 2)"), "{e}");
}

#[test]
fn wire_fec_defaults_to_off_and_takes_a_percentage() {
    let rule = "\n[[topics]]\npattern = \"orders\"\nprimary = \"east\"\nmirrors = [\"west\"]\n";
    let t = check(&format!("{BASE}{rule}")).unwrap();
    assert_eq!(t.rule_for_topic("orders").unwrap().wire_fec, 0);
    let t = check(&format!("{BASE}{rule}wire_fec = 25\n")).unwrap();
    assert_eq!(t.rule_for_topic("orders").unwrap().wire_fec, 25);
    let text = format!("{BASE}{rule}wire_fec = 101\n");
    let errs = errors(&text);
    let e = error_for(&errs, "topics[0].wire_fec");
    assert_eq!(e.line, line_of(&text, "wire_fec", 0));
    assert!(e.message.contains("out of range (0 to 100)"), "{e}");
}

/// `BASE` with east as a cluster of `n` brokers; `region_extra` goes into `[regions.east]`.
fn east_cluster(n: usize, region_extra: &str, etcd: &str) -> String {
    let mut t = format!("[regions.east]\n{region_extra}\n{etcd}\n");
    for i in 1..=n {
        t.push_str(&format!(
            "[[regions.east.brokers]]\nid = {i}\nlisten = \"127.0.0.1:1{i}092\"\n\n"
        ));
    }
    t.push_str(&BASE[BASE.find("[regions.west]").unwrap()..]);
    t
}

const ETCD: &str =
    "[regions.east.etcd]\nclient = \"127.0.0.1:12379\"\npeer = \"127.0.0.1:12380\"\n";

#[test]
fn clustered_example_loads_with_three_brokers_and_an_etcd_per_region() {
    let t = load(&example("clustered.toml")).expect("clustered.toml is valid");
    for r in &t.regions {
        assert_eq!(r.brokers.len(), 3);
        let c = r.cluster.as_ref().expect("a region cluster");
        assert_eq!((c.replication_factor, c.min_insync_replicas), (3, 2));
        assert!(matches!(c.etcd, ferry::topology::EtcdSpec::Managed { .. }));
    }
    // A broker of a cluster region joins it: etcd, the region's name and its defaults.
    let b = t
        .broker_config("west", 2, Path::new("/data"))
        .expect("broker 2 of west");
    let cs = b.cluster.expect("cluster settings");
    assert_eq!(cs.etcd, vec!["http://127.0.0.1:22379".to_string()]);
    assert_eq!(cs.name, "west");
    assert_eq!(cs.region_index, 1);
    assert_eq!(cs.default_replication_factor, 3);
    assert_eq!(cs.min_insync_replicas, 2);
    // The default topology stays one broker per region, without etcd.
    assert!(Topology::local()
        .regions
        .iter()
        .all(|r| r.cluster.is_none()));
}

#[test]
fn several_brokers_without_an_etcd_are_refused() {
    let text = east_cluster(3, "", "");
    let errs = errors(&text);
    let e = error_for(&errs, "regions.east.etcd");
    assert!(e.message.contains("has 3 brokers"), "{e}");
    assert!(
        e.hint.as_deref().unwrap().contains("[regions.east.etcd]"),
        "{e}"
    );
}

#[test]
fn a_replication_factor_above_the_broker_count_is_refused() {
    let text = east_cluster(2, "replication_factor = 3", ETCD);
    let errs = errors(&text);
    let e = error_for(&errs, "regions.east.replication_factor");
    assert!(e.message.contains("more than the 2 broker(s)"), "{e}");
    assert_eq!(e.line, line_of(&text, "replication_factor", 0));
}

#[test]
fn min_insync_above_the_replication_factor_is_refused() {
    let text = east_cluster(3, "replication_factor = 2\nmin_insync_replicas = 3", ETCD);
    let errs1 = errors(&text);
    let e = error_for(&errs1, "regions.east.min_insync_replicas");
    assert!(
        e.message.contains("no acks=all produce could ever succeed"),
        "{e}"
    );
}

#[test]
fn replication_settings_without_a_cluster_are_refused() {
    let text = east_cluster(1, "min_insync_replicas = 1", "");
    let errs2 = errors(&text);
    let e = error_for(&errs2, "regions.east.min_insync_replicas");
    assert!(e.message.contains("has no etcd"), "{e}");
}

#[test]
fn an_etcd_is_either_started_or_named_never_both() {
    let both = "[regions.east.etcd]\nclient = \"127.0.0.1:12379\"\npeer = \"127.0.0.1:12380\"\nendpoints = [\"http://10.0.0.5:2379\"]\n";
    let errs3 = errors(&east_cluster(3, "", both));
    let e = error_for(&errs3, "regions.east.etcd.endpoints");
    assert!(e.message.contains("exclude each other"), "{e}");
    let half = "[regions.east.etcd]\nclient = \"127.0.0.1:12379\"\n";
    let errs4 = errors(&east_cluster(3, "", half));
    let e = error_for(&errs4, "regions.east.etcd");
    assert!(e.message.contains("both `client` and `peer`"), "{e}");
    let bad = "[regions.east.etcd]\nendpoints = [\"10.0.0.5:2379\"]\n";
    let errs5 = errors(&east_cluster(3, "", bad));
    let e = error_for(&errs5, "regions.east.etcd.endpoints[0]");
    assert!(e.message.contains("not an etcd client URL"), "{e}");
    // An etcd you run: its endpoints, and the default replication factor is min(3, brokers).
    let ext =
        "[regions.east.etcd]\nendpoints = [\"http://10.0.0.5:2379\", \"http://10.0.0.6:2379\"]\n";
    let t = check(&east_cluster(2, "", ext)).expect("valid");
    let c = t.regions[0].cluster.as_ref().unwrap();
    assert_eq!(c.etcd.endpoints().len(), 2);
    assert_eq!(c.replication_factor, 2);
}

#[test]
fn an_etcd_port_clashing_with_a_broker_is_refused() {
    let clash = "[regions.east.etcd]\nclient = \"127.0.0.1:11092\"\npeer = \"127.0.0.1:12380\"\n";
    let text = east_cluster(3, "", clash);
    let errs = errors(&text);
    assert!(
        errs.iter().any(|e| e
            .message
            .contains("address 127.0.0.1:11092 is already used")),
        "{errs:?}"
    );
}
