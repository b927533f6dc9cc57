//! # Ferry
//!
//! Kafka-compatible brokers in every region plus a mirroring gateway (later issues).
//!
//! ## Layout
//! - [`batch`]: the Kafka RecordBatch v2 header: parse, validate (CRC-32C), set offsets.
//! - [`log`]: the partition log: segments, sparse indexes, recovery, retention.
//! - [`cluster`]: region clusters: metadata in etcd, the controller's decisions.
//! - [`broker`]: topics and partitions, idempotent producers, the group commit writer, the
//!   async shell of the group coordinator with its durable `__consumer_offsets` log.
//! - [`group`]: the consumer group coordinator (a state machine) and the offsets record format.
//! - [`follower`]: a cluster broker's replica fetchers (Fetch from each leader it follows).
//! - [`replica`]: replication inside a region cluster (high watermark, ISR).
//! - [`mirror`]: the mirroring gateway: frames, source and sink streams per partition.
//! - [`kafka`]: the Kafka wire protocol server, one file per API.
//! - [`config`]: broker settings from a file and flags.
//! - [`client`]: a small Kafka client for Ferry's own commands.
//! - [`cli`]: the `ferry` command.
//! - [`telemetry`]: Prometheus metrics.
//! - [`transport`]: gateway transport: certificates, mutual-TLS QUIC configs, endpoints, peer
//!   identity (the mirroring protocol on top comes with the gateway).
//! - [`sim`]: the deterministic multi-region simulator (`ferry simulate`).
//! - [`topology`]: topology files: regions, topic rules, failover, TLS; validation with positions.
//! - [`txn`]: the transaction coordinator (a state machine; not wired into the broker yet) and
//!   the `__transaction_state` record format.

pub mod batch;
pub mod broker;
pub mod cli;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod durable;
pub mod failover;
pub mod follower;
pub mod group;
pub mod kafka;
pub mod limits;
pub mod log;
pub mod mirror;
pub mod replica;
pub mod sim;
pub mod telemetry;
pub mod topology;
pub mod transport;
pub mod txn;
pub mod units;
