//! A deterministic multi-region simulator (`ferry simulate`): several regions — broker and
//! gateway each — in one process under simulated time, with the network, the clocks and the
//! disks supplied by the simulator and every fault drawn from a seed.
//!
//! Owns: scenario files ([`scenario`]), the seeded generator ([`rng`]), the event loop, the
//! models of what surrounds the gateway's decisions — links and a model of QUIC's ordered
//! streams, in-memory logs and the broker's rules around them, disks, clocks, clients, the
//! operator's transport — and the invariant checks ([`world`]), the trace hash ([`trace`]) and
//! the sweep chart ([`sweep`]). Does not own any decision of the gateway's: every region drives
//! the production core ([`crate::mirror::core`]: source and sink streams, liveness, offsets) and
//! [`crate::failover`] (rule states, placement, the lease, the switchover), as the tokio gateway
//! does; `docs/simulations.md` lists what runs production code and what is modelled.

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
