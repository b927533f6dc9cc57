//! A deterministic multi-region simulator (`ferry simulate`): several regions — broker and
//! gateway each — in one process under simulated time, with the network, the clocks and the
//! disks supplied by the simulator and every fault drawn from a seed.
//!
//! Owns: scenario files ([`scenario`]), the seeded generator ([`rng`]), the event loop, the
//! models and the invariant checks ([`world`]), the trace hash ([`trace`]) and the sweep chart
//! ([`sweep`]). Does not own: the failover rules, the lease, the divergence point or the offset
//! clamp — it calls the production functions ([`crate::failover::RegionState::apply`],
//! [`crate::failover::placement`], [`crate::failover::lease::Lease`],
//! [`crate::log::epochs::divergence`], [`crate::mirror::gateway::clamp_offset`]). The gateway's
//! and broker's async I/O code is *re-modelled* in [`world`]; `docs/simulations.md` lists what is
//! shared and what is modelled.

pub mod rng;
pub mod scenario;
pub mod sweep;
pub mod trace;
pub mod world;

use thiserror::Error;

pub use scenario::Scenario;
pub use world::{run, Failure, Outcome, Overrides};

#[derive(Debug, Error)]
pub enum SimError {
    #[error("{file}: {message}")]
    Scenario { file: String, message: String },
    #[error("writing the chart {path}: {message}")]
    Chart { path: String, message: String },
}
