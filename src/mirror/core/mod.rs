//! The gateway's decisions, sans-IO: the state machines the tokio gateway
//! ([`super::gateway`]) and the simulator ([`crate::sim`]) both drive.
//!
//! Owns, one module per concept:
//! - [`source`]: one partition's mirror stream on the primary's side (open at an epoch, the
//!   mirror's POSITION against our history: TRUNCATE or stream from its end, the window of
//!   frames sent and not acknowledged, cumulative ACKs, the frames a second copy sends);
//! - [`sink`]: the same stream on the mirror's side (OPEN refusal rules, frames put back in
//!   offset order ([`reorder`]) and coalesced into one append, the ACK of the durable end,
//!   TRUNCATE);
//! - [`liveness`]: heartbeats and the lease around [`crate::failover::lease::Lease`] (what a
//!   heartbeat carries, the credit an answer gives, adoption of a newer epoch, the replaced
//!   set, the peers' last reports, automatic promotion, fence lapse, the broker's lease
//!   renewal, the loss report of a forced promotion);
//! - [`offsets`]: installing a primary's committed group offsets on a mirror, clamped.
//!
//! Inputs are values (frames' contents, heartbeats, broker answers, times in milliseconds on the
//! caller's clock); outputs are decisions the caller carries out (send this frame, append these
//! batches, cut the log here, renew the broker's lease until then). No sockets, no clocks, no
//! tokio: the gateway supplies `Instant`-based milliseconds and real brokers, the simulator
//! simulated ones.
//!
//! Does not own: the wire format ([`super::frame`]), QUIC, FEC and second copies on the wire
//! (the gateway's transport), the failover state and its rules ([`crate::failover`]: `apply`,
//! `placement`, `next_epoch`, the switchover's epoch-block rule), the broker's logs.

pub mod liveness;
pub mod offsets;
pub mod reorder;
pub mod sink;
pub mod source;

pub use liveness::{Heartbeat, Liveness, PeerReport};
pub use offsets::{clamp_offset, OFFSET_SYNC_INTERVAL_MS};
