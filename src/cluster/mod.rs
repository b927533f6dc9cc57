//! Region clusters: several brokers per region, with the cluster's metadata (brokers, topic
//! assignments, partition leaders and ISRs) in etcd.
//!
//! - [`metadata`]: the records, their invariants and the etcd key layout;
//! - [`assignment`]: which brokers hold a new partition, and checks on a client's assignment;
//! - [`controller`]: the controller's decisions (leader election from the ISR, ISR shrink when a
//!   broker goes, preferred leaders), a sans-IO state machine;
//! - [`etcd`]: the shell: registration under a lease, the controller election, reads, watches
//!   and compare-and-swap writes;
//! - [`member`]: a broker's membership: its lease, the watched image, and the controller's
//!   runtime when this broker holds the key.
//!
//! Owns: cluster metadata and who decides it. Does not own: replication of the records
//! themselves (the broker's replica fetchers) or anything that crosses regions (the gateway).

pub mod assignment;
pub mod controller;
pub mod etcd;
pub mod member;
pub mod metadata;
