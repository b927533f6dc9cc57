//! Replication inside a region cluster: a partition's leader and followers.
//!
//! - [`leader`]: the leader's view of its followers (their log ends, the high watermark, ISR
//!   shrink and growth), a sans-IO state machine.
//!
//! Owns: how records reach every replica and when they count as acknowledged. Does not own:
//! who leads (the [`crate::cluster::controller`] decides, etcd stores it) or the log itself.

pub mod leader;
