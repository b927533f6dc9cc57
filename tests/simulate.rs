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

/// The scenarios (and seeds) CI runs: every invariant must hold. `region-loss` and
/// `three-region-rolling-failure` are not here: they fail on open production findings (see
/// `docs/simulations.md`, "What it found"), as do seeds 121 and 126 of `split-brain-attempt`.
#[cfg(not(feature = "sim-bug-skip-offset-clamp"))]
const CI_BUDGET: &[(&str, u64)] = &[
    ("wan-jitter", 60),
    ("link-flap", 60),
    ("planned-switchover", 60),
    ("split-brain-attempt", 60),
    ("failover-under-lag", 60),
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

/// Region loss with the proposed fixes of two findings modelled (stale credit, stale commits):
/// forced failover, rejoin and quarantine then keep every invariant, and the run reports what
/// it lost.
#[cfg(not(feature = "sim-bug-skip-offset-clamp"))]
#[test]
fn region_loss_reports_its_rpo() {
    let sc = load("region-loss");
    let ov = Overrides {
        ignore_zero_credit: true,
        clamp_offsets_on_truncate: true,
        ..Overrides::default()
    };
    let mut forced = 0;
    let mut quarantined = 0;
    for seed in 0..20 {
        let o = run(&sc, seed, &ov).unwrap();
        if o.failure.is_some() {
            panic!("{}", describe("region-loss", &o));
        }
        forced += o.forced_failovers;
        quarantined += o.quarantined;
        assert!(o.rpo_records <= o.reported_loss + o.acknowledged);
    }
    assert!(forced > 0, "no forced failover happened in 20 seeds");
    assert!(
        quarantined > 0,
        "no rejoining region quarantined anything in 20 seeds"
    );
}

/// Regressions for the production findings (docs/simulations.md): these seeds fail today under
/// the production model. Run with `--ignored`; un-ignore once the gateway fixes land.
#[cfg(not(feature = "sim-bug-skip-offset-clamp"))]
#[test]
#[ignore = "open production findings: see docs/simulations.md, What it found"]
fn found_seeds_pass_once_the_findings_are_fixed() {
    let cases: &[(&str, u64)] = &[
        ("region-loss", 6), // stale credit 0 grants a lease after restart
        ("three-region-rolling-failure", 11), // a region that missed the new epoch renews the old primary
        ("three-region-rolling-failure", 15), // finding 1 first; with it fixed: the loss report misses a divergent tail
        ("region-loss", 48),                  // committed offsets survive the quarantine truncation
    ];
    let mut failures = Vec::new();
    for (name, seed) in cases {
        let o = run(&load(name), *seed, &Overrides::default()).unwrap();
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
