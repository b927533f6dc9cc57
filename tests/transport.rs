//! The gateway transport over real QUIC on 127.0.0.1 with real certificates in a tempdir:
//! mutual TLS against the topology's CA, echo over a bidirectional stream, the server learning
//! the client's region, and refusals of a certificate from another CA and of a region the
//! topology does not know. Also `ferry certs init` and loading PEM material.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry::topology::{self, Topology};
use ferry::transport::certs::{self, Ca, CertError, RegionMaterial};
use ferry::transport::link::{self, LinkError, CLOSE_UNKNOWN_REGION};
use ferry::transport::tls::{self, TransportSettings};
use tokio::time::timeout;

/// Generous bound on every network step (loopback handshakes take milliseconds).
const STEP: Duration = Duration::from_secs(10);

fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "ferry=debug".into()),
        )
        .try_init();
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// `ca.pem` and `<region>.pem|key` for each region, all from one CA, in `dir`.
fn issue_all(dir: &Path, ca: &Ca, regions: &[&str]) {
    write(&dir.join("ca.pem"), ca.cert_pem());
    for r in regions {
        let issued = ca.issue(r).unwrap();
        write(&dir.join(format!("{r}.pem")), &issued.cert_pem);
        write(&dir.join(format!("{r}.key")), &issued.key_pem);
    }
}

fn material(dir: &Path, region: &str) -> RegionMaterial {
    certs::load_material(
        region,
        &dir.join("ca.pem"),
        &dir.join(format!("{region}.pem")),
        &dir.join(format!("{region}.key")),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// A topology of `east` and `west` whose gateways listen on the given QUIC addresses, with a
/// `[tls]` section naming the files in `dir` (the topology file is written there too).
fn topology(dir: &Path, east_quic: SocketAddr, west_quic: SocketAddr) -> Topology {
    let text = format!(
        r#"
[regions.east]
[[regions.east.brokers]]
id = 1
listen = "127.0.0.1:41092"
[regions.east.gateway]
quic = "{east_quic}"
admin = "127.0.0.1:41095"

[regions.west]
[[regions.west.brokers]]
id = 1
listen = "127.0.0.1:42092"
[regions.west.gateway]
quic = "{west_quic}"
admin = "127.0.0.1:42095"

[[topics]]
pattern = "*"
primary = "east"
mirrors = ["west"]

[tls]
ca = "ca.pem"
[tls.regions.east]
cert = "east.pem"
key = "east.key"
[tls.regions.west]
cert = "west.pem"
key = "west.key"
"#
    );
    let path = dir.join("topology.toml");
    write(&path, &text);
    topology::load(&path).unwrap_or_else(|errs| {
        panic!(
            "{}",
            errs.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// An endpoint that accepts and dials with `m`'s certificate.
fn full_endpoint(m: &RegionMaterial) -> quinn::Endpoint {
    let s = TransportSettings::default();
    link::endpoint(
        loopback(),
        Some(tls::server_config(m, &s).unwrap()),
        tls::client_config(m, &s).unwrap(),
    )
    .unwrap()
}

/// An endpoint that only dials, with `m`'s certificate.
fn client_endpoint(m: &RegionMaterial) -> quinn::Endpoint {
    let s = TransportSettings::default();
    link::endpoint(loopback(), None, tls::client_config(m, &s).unwrap()).unwrap()
}

/// `west` accepting: a server endpoint, the topology naming it, and the certificates' dir.
struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    ca: Ca,
    topology: Topology,
    east: quinn::Endpoint,
    west: quinn::Endpoint,
}

fn setup() -> Setup {
    logs();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let ca = Ca::generate("test CA").unwrap();
    issue_all(&dir, &ca, &["east", "west"]);
    let east = full_endpoint(&material(&dir, "east"));
    let west = full_endpoint(&material(&dir, "west"));
    let topology = topology(&dir, east.local_addr().unwrap(), west.local_addr().unwrap());
    Setup {
        _dir: tmp,
        dir,
        ca,
        topology,
        east,
        west,
    }
}

/// Accept one peer on `west` in the background.
fn spawn_accept(
    s: &Setup,
) -> tokio::task::JoinHandle<Result<(String, quinn::Connection), LinkError>> {
    let west = s.west.clone();
    let topology = s.topology.clone();
    tokio::spawn(async move {
        timeout(STEP, link::accept(&west, &topology))
            .await
            .expect("accept timed out")
    })
}

/// Open a stream, send `msg`, and read the reply to its end.
async fn exchange(conn: &quinn::Connection, msg: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(msg).await?;
    send.finish()?;
    Ok(recv.read_to_end(1 << 20).await?)
}

#[tokio::test]
async fn two_regions_from_one_ca_connect_and_echo() {
    let s = setup();
    let west = s.west.clone();
    let topology = s.topology.clone();
    let server = tokio::spawn(async move {
        let (region, conn) = timeout(STEP, link::accept(&west, &topology))
            .await
            .expect("accept timed out")
            .expect("east is accepted");
        let (mut send, mut recv) = timeout(STEP, conn.accept_bi()).await.unwrap().unwrap();
        let data = timeout(STEP, recv.read_to_end(1 << 20))
            .await
            .unwrap()
            .unwrap();
        send.write_all(&data).await.unwrap();
        send.finish().unwrap();
        // Keep the connection until east has read the reply.
        let _ = timeout(STEP, send.stopped()).await;
        (region, conn)
    });

    let conn = timeout(STEP, link::connect(&s.east, &s.topology, "west"))
        .await
        .expect("connect timed out")
        .expect("east connects to west");
    // The client knows the server's region too (from the server's certificate).
    assert_eq!(link::identify(&conn, &s.topology).unwrap(), "west");
    assert_eq!(conn.remote_address(), s.west.local_addr().unwrap());

    let msg: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let echoed = timeout(STEP, exchange(&conn, &msg))
        .await
        .expect("echo timed out")
        .expect("echo");
    assert_eq!(echoed, msg);

    let (region, _server_conn) = timeout(STEP, server).await.unwrap().unwrap();
    assert_eq!(region, "east", "the server identifies the client's region");
    conn.close(0u32.into(), b"done");
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let s = setup();
    let server = spawn_accept(&s);

    // Trusts the right CA (so the server's certificate is fine) but presents an `east`
    // certificate issued by another CA.
    let other_dir = s.dir.join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let other = Ca::generate("another CA").unwrap();
    issue_all(&other_dir, &other, &["east"]);
    let mut impostor = material(&other_dir, "east");
    impostor.ca = material(&s.dir, "east").ca;
    let client = client_endpoint(&impostor);

    let attempt = timeout(STEP, async {
        let conn = link::connect(&client, &s.topology, "west").await?;
        exchange(&conn, b"let me in").await
    })
    .await
    .expect("the impostor's attempt ended within the bound");
    assert!(
        attempt.is_err(),
        "the impostor got a reply: {:?}",
        attempt.unwrap()
    );

    let refused = timeout(STEP, server).await.unwrap().unwrap();
    match refused {
        Err(e @ LinkError::Handshake { .. }) => assert!(e.is_refusal(), "{e}"),
        Err(e) => panic!("expected a handshake refusal, got: {e}"),
        Ok((region, _)) => panic!("the impostor was accepted as {region}"),
    }
}

#[tokio::test]
async fn a_region_unknown_to_the_topology_is_refused() {
    let s = setup();
    let server = spawn_accept(&s);

    // Same CA, valid certificate, but for `north`, which the topology does not have.
    issue_all(&s.dir, &s.ca, &["north"]);
    let north = material(&s.dir, "north");
    let client = client_endpoint(&north);

    let outcome = timeout(STEP, async {
        match link::connect(&client, &s.topology, "west").await {
            // Closed during the handshake: the error carries the close.
            Err(LinkError::Connection { source, .. }) => Some(source),
            Err(e) => panic!("unexpected connect error: {e}"),
            Ok(conn) => {
                let reply = exchange(&conn, b"hello from north").await;
                assert!(reply.is_err(), "north got a reply: {:?}", reply.unwrap());
                Some(conn.closed().await)
            }
        }
    })
    .await
    .expect("north's attempt ended within the bound");
    match outcome {
        Some(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(close.error_code, CLOSE_UNKNOWN_REGION);
            let reason = String::from_utf8_lossy(&close.reason);
            assert!(reason.contains("north.ferry"), "close reason: {reason}");
        }
        other => panic!("expected an application close, got {other:?}"),
    }

    let refused = timeout(STEP, server).await.unwrap().unwrap();
    match refused {
        Err(e @ LinkError::UnknownRegion { .. }) => {
            assert!(e.is_refusal());
            let msg = e.to_string();
            assert!(msg.contains("north.ferry"), "{msg}");
            assert!(msg.contains("east, west"), "{msg}");
        }
        Err(e) => panic!("expected an unknown-region refusal, got: {e}"),
        Ok((region, _)) => panic!("north was accepted as {region}"),
    }
}

#[tokio::test]
async fn the_client_refuses_a_server_with_the_wrong_region_name() {
    // east dials `west` but the address is that of a server presenting east's certificate:
    // the client checks the server name `west.ferry`.
    let s = setup();
    let impostor = full_endpoint(&material(&s.dir, "east"));
    let topo = topology(
        &s.dir,
        s.east.local_addr().unwrap(),
        impostor.local_addr().unwrap(),
    );
    let srv = impostor.clone();
    let t2 = topo.clone();
    let server = tokio::spawn(async move { timeout(STEP, link::accept(&srv, &t2)).await });
    let err = timeout(STEP, link::connect(&s.east, &topo, "west"))
        .await
        .expect("connect timed out")
        .expect_err("a server with east's certificate is not west");
    assert!(
        matches!(err, LinkError::Connection { .. }),
        "unexpected error: {err}"
    );
    let _ = timeout(STEP, server).await;
}

#[test]
fn transport_settings_are_checked() {
    let bad = TransportSettings {
        keep_alive: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(30),
        ..TransportSettings::default()
    };
    let e = tls::transport_config(&bad).unwrap_err().to_string();
    assert!(e.contains("keep_alive"), "{e}");
    tls::transport_config(&TransportSettings::default()).unwrap();
}

// ---------------------------------------------------------------------------------------------
// certs init and loading
// ---------------------------------------------------------------------------------------------

const NO_TLS: &str = r#"
[regions.east]
[[regions.east.brokers]]
id = 1
listen = "127.0.0.1:41092"
[regions.east.gateway]
quic = "127.0.0.1:41093"
admin = "127.0.0.1:41095"

[regions.west]
[[regions.west.brokers]]
id = 1
listen = "127.0.0.1:42092"
[regions.west.gateway]
quic = "127.0.0.1:42093"
admin = "127.0.0.1:42095"

[regions.edge]
[[regions.edge.brokers]]
id = 1
listen = "127.0.0.1:43092"
"#;

#[test]
fn init_without_tls_writes_a_directory_and_prints_the_section() {
    let tmp = tempfile::tempdir().unwrap();
    let topo_path = tmp.path().join("topo.toml");
    write(&topo_path, NO_TLS);
    let t = certs::load_topology_for_init(&topo_path).unwrap();
    let out = tmp.path().join("certs");
    let report = certs::init(&t, &out, false).unwrap();

    let names: Vec<String> = report
        .written
        .iter()
        .map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    // `edge` has no gateway and needs no certificate.
    assert_eq!(
        names,
        [
            "ca.pem",
            "ca.key",
            "operator.pem",
            "operator.key",
            "east.pem",
            "east.key",
            "west.pem",
            "west.key"
        ]
    );
    // The operator certificate loads as an operator's, and a region's does not.
    certs::load_operator(
        &out.join("ca.pem"),
        &out.join("operator.pem"),
        &out.join("operator.key"),
    )
    .expect("an operator certificate");
    assert!(matches!(
        certs::load_operator(
            &out.join("ca.pem"),
            &out.join("east.pem"),
            &out.join("east.key")
        ),
        Err(CertError::NotOperator { .. })
    ));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("east.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "keys are private: {mode:o}");
    }

    // The printed section, pasted in, makes a valid topology whose material loads.
    let section = report.tls_section.expect("a [tls] section to paste");
    assert!(section.contains("ca = \"certs/ca.pem\""), "{section}");
    write(&topo_path, &format!("{NO_TLS}\n{section}"));
    let t = topology::load(&topo_path).unwrap();
    for r in ["east", "west"] {
        let m = certs::load_region(&t, r).unwrap();
        assert_eq!(m.region, r);
        assert_eq!((m.ca.len(), m.chain.len()), (1, 1));
    }

    // Existing files are refused (all listed, nothing written) unless forced.
    let before = std::fs::read(out.join("ca.pem")).unwrap();
    let t = certs::load_topology_for_init(&{
        write(&topo_path, NO_TLS);
        topo_path.clone()
    })
    .unwrap();
    match certs::init(&t, &out, false) {
        Err(CertError::Exists { paths }) => assert_eq!(paths.len(), 8),
        other => panic!("expected a refusal to overwrite, got {other:?}"),
    }
    assert_eq!(std::fs::read(out.join("ca.pem")).unwrap(), before);
    certs::init(&t, &out, true).unwrap();
    assert_ne!(std::fs::read(out.join("ca.pem")).unwrap(), before);
}

#[test]
fn init_with_tls_writes_exactly_the_named_files() {
    let tmp = tempfile::tempdir().unwrap();
    let topo_path = tmp.path().join("topo.toml");
    let text = format!(
        r#"{NO_TLS}
[tls]
ca = "pki/root.pem"
[tls.regions.east]
cert = "pki/e/cert.pem"
key = "pki/e/key.pem"
[tls.regions.west]
cert = "pki/w.crt"
key = "pki/w.pem"
"#
    );
    write(&topo_path, &text);
    // The files do not exist yet: an ordinary load reports them, the init load does not.
    assert!(topology::load(&topo_path).is_err());
    let t = certs::load_topology_for_init(&topo_path).unwrap();
    let report = certs::init(&t, Path::new("unused"), false).unwrap();
    assert!(report.tls_section.is_none());
    let mut written: Vec<PathBuf> = report
        .written
        .iter()
        .map(|f| f.path.strip_prefix(tmp.path()).unwrap().to_path_buf())
        .collect();
    written.sort();
    let mut expected: Vec<PathBuf> = [
        "pki/root.pem",
        "pki/root.key",
        "pki/operator.pem",
        "pki/operator.key",
        "pki/e/cert.pem",
        "pki/e/key.pem",
        "pki/w.crt",
        "pki/w.pem",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    expected.sort();
    assert_eq!(written, expected);
    assert!(!Path::new("unused").exists());

    let t = topology::load(&topo_path).expect("the topology is complete now");
    certs::load_region(&t, "east").unwrap();
    certs::load_region(&t, "west").unwrap();

    match certs::init(&t, Path::new("unused"), false) {
        Err(e @ CertError::Exists { .. }) => {
            assert!(e.to_string().contains("--force"), "{e}")
        }
        other => panic!("expected a refusal to overwrite, got {other:?}"),
    }
}

#[test]
fn loading_reports_the_file_at_fault() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Ca::generate("test CA").unwrap();
    issue_all(dir, &ca, &["east", "west"]);
    let p = |n: &str| dir.join(n);

    // west's certificate loaded as east's.
    let e = certs::load_material("east", &p("ca.pem"), &p("west.pem"), &p("west.key")).unwrap_err();
    assert!(matches!(e, CertError::WrongName { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("west.pem") && msg.contains("east.ferry"),
        "{msg}"
    );

    // Signed by another CA.
    let other = Ca::generate("other").unwrap();
    write(&p("other-ca.pem"), other.cert_pem());
    let e = certs::load_material("east", &p("other-ca.pem"), &p("east.pem"), &p("east.key"))
        .unwrap_err();
    assert!(matches!(e, CertError::NotSignedByCa { .. }), "{e}");
    assert!(e.to_string().contains("other-ca.pem"), "{e}");

    // A key file with no key, a certificate file with no certificate, a missing file.
    let e = certs::load_material("east", &p("ca.pem"), &p("east.pem"), &p("east.pem")).unwrap_err();
    assert!(matches!(e, CertError::NoKey { .. }), "{e}");
    let e = certs::load_material("east", &p("ca.pem"), &p("east.key"), &p("east.key")).unwrap_err();
    assert!(matches!(e, CertError::NoCertificates { .. }), "{e}");
    assert!(e.to_string().contains("east.key"), "{e}");
    let e =
        certs::load_material("east", &p("nope.pem"), &p("east.pem"), &p("east.key")).unwrap_err();
    assert!(matches!(e, CertError::Io { .. }), "{e}");
    assert!(e.to_string().contains("nope.pem"), "{e}");
}

#[test]
fn ferry_certs_init_command() {
    let tmp = tempfile::tempdir().unwrap();
    let topo_path = tmp.path().join("topo.toml");
    write(&topo_path, NO_TLS);
    let out = tmp.path().join("out");
    let run = |force: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
        cmd.args(["certs", "init", "--topology"])
            .arg(&topo_path)
            .arg("--out")
            .arg(&out);
        if force {
            cmd.arg("--force");
        }
        cmd.output().unwrap()
    };
    let o = run(false);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("east.pem"), "{stdout}");
    assert!(stdout.contains("[tls.regions.west]"), "{stdout}");
    assert!(out.join("west.key").is_file());

    let o = run(false);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert!(run(true).status.success());
}

#[test]
fn every_valid_region_name_makes_a_usable_certificate() {
    // Topology region names are `[a-z][a-z0-9_-]*`.
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::generate("test CA").unwrap();
    let regions = ["us_east-1", "eu-west_2", "a"];
    issue_all(tmp.path(), &ca, &regions);
    for r in regions {
        let m = material(tmp.path(), r);
        tls::server_config(&m, &TransportSettings::default()).unwrap();
        tls::client_config(&m, &TransportSettings::default()).unwrap();
    }
}

/// Each BATCHES frame comes on a unidirectional stream of its own (`mirror::frame`), and the
/// sink must tell a stream whose sender stopped mid-way (dropped, not an error) from one that
/// carries a bad frame (refused): `frame::read_or_end` over real QUIC streams.
#[tokio::test]
async fn a_frame_stream_cut_short_is_told_from_a_bad_frame() {
    use ferry::mirror::frame::{self, Frame, Read};
    let s = setup();
    let west = s.west.clone();
    let topology = s.topology.clone();
    let server = tokio::spawn(async move {
        let (_, conn) = timeout(STEP, link::accept(&west, &topology))
            .await
            .unwrap()
            .unwrap();
        let mut found = Vec::new();
        for _ in 0..4 {
            let mut rx = timeout(STEP, conn.accept_uni()).await.unwrap().unwrap();
            let first = timeout(STEP, frame::read_or_end(&mut rx)).await.unwrap();
            let second = match &first {
                Ok(Read::Frame(_)) => {
                    Some(timeout(STEP, frame::read_or_end(&mut rx)).await.unwrap())
                }
                _ => None,
            };
            found.push(format!("{first:?} then {second:?}"));
        }
        found
    });
    let conn = timeout(STEP, link::connect(&s.east, &s.topology, "west"))
        .await
        .unwrap()
        .unwrap();
    let route = Frame::Route { id: 7 }.encode();
    // 1. A whole frame, then the end of the stream.
    let mut tx = conn.open_uni().await.unwrap();
    tx.write_all(&route).await.unwrap();
    tx.finish().unwrap();
    // 2. Nothing at all: the sender stopped before writing.
    let mut tx = conn.open_uni().await.unwrap();
    tx.finish().unwrap();
    // 3. Half a frame.
    let mut tx = conn.open_uni().await.unwrap();
    tx.write_all(&route[..route.len() - 3]).await.unwrap();
    tx.finish().unwrap();
    // 4. A whole frame whose checksum is wrong.
    let mut bad = route.to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    let mut tx = conn.open_uni().await.unwrap();
    tx.write_all(&bad).await.unwrap();
    tx.finish().unwrap();
    let found = timeout(STEP, server).await.unwrap().unwrap();
    assert_eq!(
        found,
        vec![
            "Ok(Frame(Route { id: 7 })) then Some(Ok(End))".to_string(),
            "Ok(End) then None".to_string(),
            "Ok(CutShort) then None".to_string(),
            "Err(Crc) then None".to_string(),
        ]
    );
    conn.close(0u32.into(), b"done");
}

/// The QUIC endpoint's connection caps (`[limits]`): past `connections_per_address_max`
/// connections from one address, a new peer is refused before its handshake, and its place
/// comes back when an admitted connection closes.
#[tokio::test]
async fn the_per_address_cap_refuses_a_peer_before_its_handshake() {
    let s = setup();
    let gate = ferry::limits::Gate::new("quic", 10, 1);
    let west = s.west.clone();
    let topology = s.topology.clone();
    let g = gate.clone();
    let server = tokio::spawn(async move {
        let first = timeout(STEP, link::accept_admitted(&west, &topology, &g))
            .await
            .expect("accept timed out")
            .expect("the first peer is admitted");
        let second = timeout(STEP, link::accept_admitted(&west, &topology, &g))
            .await
            .expect("accept timed out");
        (first, second)
    });
    let c1 = timeout(STEP, link::connect(&s.east, &s.topology, "west"))
        .await
        .unwrap()
        .expect("the first connection");
    let c2 = timeout(STEP, link::connect(&s.east, &s.topology, "west")).await;
    let ((region, _conn, admitted), second) = server.await.unwrap();
    assert_eq!(region, "east");
    match second {
        Err(e @ LinkError::Limit { .. }) => {
            assert!(e.is_refusal());
            assert!(e.to_string().contains("connections_per_address_max"), "{e}");
        }
        other => panic!("expected a refusal by the cap, got {other:?}"),
    }
    assert!(
        matches!(c2, Ok(Err(_))),
        "the refused peer's connection fails"
    );
    assert_eq!(gate.open("127.0.0.1".parse().unwrap()), (1, 1));
    drop(admitted);
    assert_eq!(gate.open("127.0.0.1".parse().unwrap()), (0, 0));
    drop(c1);
}
