//! The cluster metadata shell against a real etcd (Debian's `etcd-server`): registration under
//! leases, one controller, topic creation, leaders moved when a broker dies without a word
//! (its task stops; its lease runs out as a SIGKILLed broker's would), and an etcd SIGKILL and
//! restart that the members ride out.
//!
//! Needs `etcd` on PATH. Without it these tests say so and pass, unless FERRY_REQUIRE_ETCD=1
//! (CI sets it: scripts/test installs etcd).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry::cluster::assignment;
use ferry::cluster::etcd::{Outcome, Store};
use ferry::cluster::member::{join, Member, MemberConfig};
use ferry::cluster::metadata::{BrokerId, Image, TopicAssignment, NO_LEADER};
use tokio::sync::watch;

fn etcd_bin() -> Option<PathBuf> {
    // The members' log lines, shown with a failing test (RUST_LOG picks the level).
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "ferry=info".into()),
        )
        .try_init();
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("etcd"))
            .find(|f| f.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("FERRY_REQUIRE_ETCD").as_deref() != Ok("1"),
            "etcd is not on PATH and FERRY_REQUIRE_ETCD=1 (apt-get install etcd-server)"
        );
        eprintln!("SKIPPED: etcd is not on PATH (apt-get install etcd-server)");
    }
    found
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One etcd on loopback, in its own data dir; SIGKILLed on drop.
struct Etcd {
    bin: PathBuf,
    dir: tempfile::TempDir,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

impl Etcd {
    fn start(bin: PathBuf) -> Etcd {
        let mut e = Etcd {
            bin,
            dir: tempfile::tempdir().unwrap(),
            client: free_port(),
            peer: free_port(),
            child: None,
        };
        e.spawn();
        e
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }

    fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).unwrap();
        let child = Command::new(&self.bin)
            .args(["--name", "n1", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &self.url()])
            .args(["--advertise-client-urls", &self.url()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("n1={peer}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn store(etcd: &Etcd) -> Store {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = Store::connect(&[etcd.url()], "east").await {
            if s.read().await.is_ok() {
                return s;
            }
        }
        assert!(Instant::now() < deadline, "etcd did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Running {
    member: Member,
    task: tokio::task::JoinHandle<()>,
    _stop: watch::Sender<bool>,
}

async fn start_member(etcd: &Etcd, id: BrokerId, ttl: i64) -> Running {
    let (stop, rx) = watch::channel(false);
    let (member, task) = join(
        MemberConfig {
            id,
            host: "127.0.0.1".into(),
            port: 9000 + id as u16,
            rack: None,
            etcd: vec![etcd.url()],
            cluster: "east".into(),
            session_ttl_s: ttl,
            rebalance: None,
            region_index: 0,
        },
        rx,
    )
    .await
    .expect("join");
    Running {
        member,
        task,
        _stop: stop,
    }
}

async fn create(store: &Store, image: &Image, name: &str, partitions: i32, rf: i32) {
    let brokers: Vec<_> = image.brokers.keys().copied().collect();
    let replicas = assignment::round_robin(0, partitions, rf, &brokers, 0, 0).unwrap();
    let t = TopicAssignment {
        name: name.into(),
        id: uuid::Uuid::new_v4(),
        replicas,
        configs: Default::default(),
    };
    assert!(matches!(
        store.create_topic(&t).await.unwrap(),
        Outcome::Written(_)
    ));
    assert_eq!(store.create_topic(&t).await.unwrap(), Outcome::Stale);
}

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_controller_is_elected_and_moves_leaders_off_a_broker_that_dies() {
    let Some(bin) = etcd_bin() else { return };
    let etcd = Etcd::start(bin);
    let _ = store(&etcd).await;
    let mut members = Vec::new();
    for id in 1..=3 {
        members.push(start_member(&etcd, id, 2).await);
    }
    let img = members[0]
        .member
        .wait_for(WAIT, |i| i.brokers.len() == 3 && i.controller.is_some())
        .await
        .expect("three brokers and a controller");
    let controller = img.controller.unwrap();
    create(members[0].member.store(), &img, "orders", 6, 3).await;
    for m in &members {
        m.member
            .wait_for(WAIT, |i| i.partitions.len() == 6)
            .await
            .expect("every member sees the topic");
    }
    let before = members[0].member.image();
    let led: Vec<_> = before
        .partitions
        .iter()
        .filter(|(_, s)| s.value.leader == controller)
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(
        led.len(),
        2,
        "round robin gives each of 3 brokers 2 of 6 leaders"
    );

    // The controller's broker dies without a word: no revoke, its lease runs out.
    let dead = members.remove((controller - 1) as usize);
    dead.task.abort();
    let survivor = members[0].member.clone();
    let after = survivor
        .wait_for(WAIT, |i| {
            i.controller.is_some_and(|c| c != controller)
                && !i.brokers.contains_key(&controller)
                && i.partitions
                    .values()
                    .all(|s| s.value.leader != controller && !s.value.isr.contains(&controller))
        })
        .await
        .expect("a new controller moves every leadership and ISR seat off the dead broker");
    for (k, s) in &after.partitions {
        let old = &before.partitions[k].value;
        assert_ne!(s.value.leader, NO_LEADER, "{k:?} has two live ISR members");
        assert!(
            old.isr.contains(&s.value.leader),
            "{k:?}: leader from the ISR"
        );
        if led.contains(k) {
            assert_eq!(s.value.leader_epoch, old.leader_epoch + 256, "{k:?}");
        } else {
            assert_eq!(s.value.leader_epoch, old.leader_epoch, "{k:?}: same leader");
        }
        assert_eq!(s.value.isr.len(), 2);
    }

    // It restarts: registered again, but not in any ISR until a leader adds it.
    members.push(start_member(&etcd, controller, 2).await);
    let back = survivor
        .wait_for(WAIT, |i| i.brokers.contains_key(&controller))
        .await
        .expect("registered again");
    assert!(back
        .partitions
        .values()
        .all(|s| !s.value.isr.contains(&controller)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_ride_out_an_etcd_sigkill_and_resume_when_it_returns() {
    let Some(bin) = etcd_bin() else { return };
    let mut etcd = Etcd::start(bin);
    let _ = store(&etcd).await;
    let a = start_member(&etcd, 1, 4).await;
    let b = start_member(&etcd, 2, 4).await;
    let img = a
        .member
        .wait_for(WAIT, |i| i.brokers.len() == 2 && i.controller.is_some())
        .await
        .expect("two brokers and a controller");
    create(a.member.store(), &img, "payments", 2, 2).await;
    let seen = b
        .member
        .wait_for(WAIT, |i| i.partitions.len() == 2)
        .await
        .unwrap();

    etcd.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // While etcd is away, the last image stays in force.
    assert_eq!(b.member.image().partitions, seen.partitions);
    assert!(store_reachable(&etcd).await.is_none());

    etcd.spawn();
    let s = store(&etcd).await;
    // Metadata changes resume: a new topic reaches both members through their new watches.
    let (now, _) = s.read().await.unwrap();
    create(&s, &now, "refunds", 1, 2).await;
    for m in [&a, &b] {
        m.member
            .wait_for(WAIT, |i| i.topics.contains_key("refunds"))
            .await
            .expect("the watch resumed");
    }
    // And the controller decides again: the other broker dies, its ISR seats go.
    let ctl = a.member.image().controller.expect("a controller");
    let (keep, gone) = if ctl == 1 { (&a, b) } else { (&b, a) };
    let gone_id = gone.member.id();
    gone.task.abort();
    keep.member
        .wait_for(WAIT, |i| {
            i.partitions
                .values()
                .all(|s| !s.value.isr.contains(&gone_id) && s.value.leader != gone_id)
        })
        .await
        .expect("the controller shrinks the ISRs after etcd came back");
}

async fn store_reachable(etcd: &Etcd) -> Option<()> {
    let s = Store::connect(&[etcd.url()], "east").await.ok()?;
    s.read().await.ok().map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_etcd_is_a_clear_error_not_a_hang() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    // Every call is bounded (CALL_TIMEOUT); a minute only tells a hang from an answer.
    let err = tokio::time::timeout(Duration::from_secs(60), async {
        match Store::connect(std::slice::from_ref(&url), "east").await {
            Err(e) => e.to_string(),
            Ok(s) => s.read().await.unwrap_err().to_string(),
        }
    })
    .await
    .expect("an unreachable etcd must be an error, not a hang");
    assert!(err.contains(&url), "{err}");
}
