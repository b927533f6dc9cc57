//! The mirroring gateway: ships a region's record batches to the regions that mirror its
//! topics, over QUIC with mutual TLS, so that every mirror holds the same bytes at the same
//! offsets.
//!
//! Two layers: [`core`], the decisions as sans-IO state machines (also driven by the
//! simulator), and [`gateway`], the tokio shell that carries them out over QUIC and the broker.
//!
//! Owns: the frames on the gateway's streams ([`frame`]), the source side (read batches from
//! the local broker with Fetch, open a session stream per partition and peer, send each BATCHES
//! frame on a stream of its own, pipelined, optionally twice), the sink side (check each
//! batch's CRC, put frames back in offset order ([`core::reorder`]), write them into the local broker
//! with MirrorAppend at the same offsets, acknowledge the durable end), consumer group offset
//! sync, heartbeats and the failover state they carry, lag metrics, and the admin API
//! ([`admin`]). Resuming is by position: a session opens with the sink's log end, and the
//! source reads from there, so a restart of either gateway or broker, or a cut link, resumes
//! with no gap and no duplicate.
//! Does not own: certificates and connections ([`crate::transport`]), the broker's append path
//! ([`crate::kafka::mirror_append`]), failover decisions ([`crate::failover`]).

pub mod admin;
pub mod core;
pub mod fec;
pub mod frame;
pub mod gateway;
