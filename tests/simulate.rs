//! The deterministic simulator (`ferry simulate`, `src/sim`): scenario files parse, a seed
//! replays to the same trace hash, the CI seed budget passes, and a deliberately broken offset
//! clamp (`--features sim-bug-skip-offset-clamp`) is caught.
//!
//! CI: `cargo test --release --test simulate` and
//! `cargo test --release --features sim-bug-skip-offset-clamp --test simulate`.

use std::path::{Path, PathBuf};

use ferry::sim::{run, Outcome, Overrides, Scenario, SimError};

const ALL: &[&str] = &[
    "wan-jitter",
    "link-flap",
    "region-loss",
    "planned-switchover",
    "split-brain-attempt",
    "three-region-rolling-failure",
    "failover-under-lag",
];

fn path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("simulations")
        .join(format!("{name}.toml"))
}

fn load(name: &str) -> Scenario {
    Scenario::load(&path(name)).unwrap_or_else(|e| panic!("{e}"))
}

fn describe(name: &str, o: &Outcome) -> String {
    let f = o.failure.as_ref().expect("a failure");
    format!(
        "{name} seed {}: {} at {} ms: {}\n  replay: ferry simulate simulations/{name}.toml --seed {}\n    {}",
        o.seed,
        f.invariant,
        f.at_ms,
        f.message,
        o.seed,
        f.recent.join("\n    ")
    )
}

#[test]
fn every_scenario_file_parses() {
    let mut names = Vec::new();
    for e in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("simulations")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let sc = Scenario::load(&p).unwrap_or_else(|e| panic!("{e}"));
            names.push(sc.name);
        }
    }
    for n in ALL {
        assert!(
            names.iter().any(|x| x == n),
            "simulations/{n}.toml is missing"
        );
    }
}

#[test]
fn a_bad_scenario_names_its_file_and_field() {
    let e = Scenario::parse("duration = \"10s\"\n", "bad.toml", "bad").unwrap_err();
    let m = e.to_string();
    assert!(m.starts_with("bad.toml: ") && m.contains("topology"), "{m}");
    let text = "duration = \"10s\"\n[topology]\nregions = [\"east\", \"west\"]\nmode = \"later\"\n";
    let m = Scenario::parse(text, "mode.toml", "mode")
        .unwrap_err()
        .to_string();
    assert!(m.starts_with("mode.toml: ") && m.contains("mode"), "{m}");
    let text = "duration = \"10s\"\n[topology]\nregions = [\"east\"]\n";
    assert!(matches!(
        Scenario::parse(text, "one.toml", "one"),
        Err(SimError::Scenario { .. })
    ));
    let m = Scenario::load(Path::new("simulations/none.toml"))
        .unwrap_err()
        .to_string();
    assert!(m.contains("simulations/none.toml"), "{m}");
}

#[test]
fn replaying_a_seed_reproduces_its_trace_hash() {
    for name in ALL {
        let sc = load(name);
        let a = run(&sc, 7, &Overrides::default()).unwrap();
        let b = run(&sc, 7, &Overrides::default()).unwrap();
        assert_eq!(
            a.trace_hash, b.trace_hash,
            "{name}: seed 7 replayed differently"
        );
        assert_eq!(a.events, b.events);
        assert_eq!(a.acknowledged, b.acknowledged);
        let c = run(&sc, 8, &Overrides::default()).unwrap();
        assert_ne!(
            a.trace_hash, c.trace_hash,
            "{name}: seeds 7 and 8 ran alike"
        );
        assert!(a.acknowledged > 0, "{name}: nothing was acknowledged");
    }
}

/// The scenarios (and seeds) CI runs under the production model: every invariant must hold.
/// `region-loss` runs below (with its RPO checks). Every scenario passes every seed of 0..300
/// since finding 10 was fixed (a fence lapses); `three-region-rolling-failure`'s seeds are the
/// slowest, so it gets 40.
#[cfg(not(feature = "sim-bug-skip-offset-clamp"))]
const CI_BUDGET: &[(&str, u64)] = &[
    ("wan-jitter", 60),
    ("link-flap", 60),
    ("planned-switchover", 60),
    ("split-brain-attempt", 60),
    ("failover-under-lag", 60),
    ("three-region-rolling-failure", 40),
];

#[cfg(not(feature = "sim-bug-skip-offset-clamp"))]
#[test]
fn the_ci_seed_budget_passes() {
    let mut failures = Vec::new();
    let mut ran = 0;
    for (name, seeds) in CI_BUDGET {
        let sc = load(name);
        for seed in 0..*seeds {
            let o = run(&sc, seed, &Overrides::default()).unwrap();
            ran += 1;
            if o.failure.is_some() {
                failures.push(describe(name, &o));
            }
        }
    }
    assert!(ran >= 200);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Region loss with every region on the production core (the fix of finding 1, a zero-credit
/// acknowledgement not fed to the lease, is in `Liveness::on_ack`): forced
/// failover, rejoin and quarantine (which moves group commits back to the cut, as production
/// does since 4943f56) keep every invariant, and the run reports what it lost.
#[cfg(not(feature = "sim-bug-skip-offset-clamp"))]
#[test]
fn region_loss_reports_its_rpo() {
    let sc = load("region-loss");
    let ov = Overrides::default();
    let mut forced = 0;
    let mut quarantined = 0;
    for seed in 0..60 {
        let o = run(&sc, seed, &ov).unwrap();
        if o.failure.is_some() {
            panic!("{}", describe("region-loss", &o));
        }
        forced += o.forced_failovers;
        quarantined += o.quarantined;
        assert!(o.rpo_records <= o.reported_loss + o.acknowledged);
    }
    assert!(forced > 0, "no forced failover happened in 60 seeds");
    assert!(
        quarantined > 0,
        "no rejoining region quarantined anything in 60 seeds"
    );
}

/// The seeds that found the findings fixed in production pass under the production model: 1
/// and 5 (zero credit; an unheard peer credited at once), 2 and 4 (4943f56: no credit for a peer
/// back from a long silence; group commits move back to a quarantine cut), 3 and 3b (f2a02d3 and
/// after: the loss report compares epoch histories, every heartbeat carries them), 6 (a475907:
/// an automatic promotion takes writes only once a majority answered a heartbeat carrying its
/// epoch), 7, 8 and 9 (74b85c9: the broker's lease armed from its first start; group offsets
/// clamped to where the mirror agrees with the primary's history; a switchover waits for the
/// fenced primary's history, not just its ends), 10 (under lease fencing a switchover's fence
/// lapses if the switchover neither moved the rule nor lifted it in time).
///
/// The seeds of 1-6 were found before the model's mirror streams were pipelined, those of 3b and
/// 6-9 with the pipelined model before the fixes of 6-9 were modelled; a change of the model
/// changes every random draw after it, so most now run other histories and are kept as plain
/// regression seeds. (With the fixes of 6-9 undone in the model, the seeds of 6-9 below replay
/// the failures told in the docs.)
#[cfg(not(feature = "sim-bug-skip-offset-clamp"))]
#[test]
fn fixed_findings_stay_fixed() {
    let production = Overrides::default();
    let cases: &[(&str, u64, &Overrides)] = &[
        // 1 (zero credit) and 5 (unheard peer credited at once)
        ("region-loss", 6, &production),
        ("three-region-rolling-failure", 34, &production),
        // 2: a region that had not learnt the new epoch renewed the deposed primary's lease
        ("three-region-rolling-failure", 11, &production),
        // 3: the loss report assumed the new primary's log is a prefix of the old one's
        ("three-region-rolling-failure", 15, &production),
        // 3b: the loss report was empty when the old primary's last heartbeat predated its
        // promotion (every heartbeat now carries the sender's ends and epoch histories; seed 41
        // fails on it with the pipelined model when only a primary's heartbeat carries them)
        ("split-brain-attempt", 41, &production),
        // 4: group commits survived the quarantine cut
        ("region-loss", 48, &production),
        ("split-brain-attempt", 121, &production),
        ("split-brain-attempt", 126, &production),
        // 6: an automatic promotion acknowledged writes before a majority knew its epoch, and an
        // operator's switchover to a region that never heard of it overrode it (25); a region
        // promoted itself on answers to heartbeats sent before its isolation (297)
        ("three-region-rolling-failure", 25, &production),
        ("three-region-rolling-failure", 297, &production),
        // 7: a primary whose write lease was never armed took writes without one
        ("three-region-rolling-failure", 39, &production),
        ("three-region-rolling-failure", 60, &production),
        ("three-region-rolling-failure", 92, &production),
        ("three-region-rolling-failure", 107, &production),
        ("three-region-rolling-failure", 216, &production),
        ("region-loss", 195, &production),
        // 8: committed offsets installed on a mirror whose divergent tail was not cut yet
        ("three-region-rolling-failure", 175, &production),
        // 9: a planned switchover's catch-up compared log ends, not histories
        ("three-region-rolling-failure", 18, &production),
        // 10: a switchover abandoned while the fenced old primary was down left it fenced for
        // good, and the rule took no writes again
        ("three-region-rolling-failure", 131, &production),
    ];
    let mut failures = Vec::new();
    for (name, seed, ov) in cases {
        let o = run(&load(name), *seed, ov).unwrap();
        if o.failure.is_some() {
            failures.push(describe(name, &o));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// With the offset clamp skipped, a committed offset installed on a mirror can point past its
/// log end; after a forced failover the group resumes there and skips the records the new
/// primary writes below it. The simulator must catch it within the CI seed budget of the very
/// scenario that passes without the fault (`failover-under-lag` is in `CI_BUDGET`).
#[cfg(feature = "sim-bug-skip-offset-clamp")]
#[test]
fn skipping_the_offset_clamp_is_caught() {
    let name = "failover-under-lag";
    let sc = load(name);
    for seed in 0..60 {
        let o = run(&sc, seed, &Overrides::default()).unwrap();
        if let Some(f) = &o.failure {
            assert_eq!(f.invariant, "consumer-no-skip", "{}", describe(name, &o));
            eprintln!("caught at seed {seed}:\n{}", describe(name, &o));
            return;
        }
    }
    panic!("the skipped offset clamp went unnoticed in 60 seeds of {name}");
}
