//! The mirroring gateway: ships a region's record batches to the regions that mirror its
//! topics, over QUIC with mutual TLS, so that every mirror holds the same bytes at the same
//! offsets.
//!
//! Owns: the frames on a gateway stream ([`frame`]), the source side (read batches from the
//! local broker with Fetch, send them on one stream per partition and peer) and the sink side
//! (check each batch's CRC and offset continuity, write it into the local broker with
//! MirrorAppend at the same offsets, acknowledge the durable end). Resuming is by position: a
//! stream opens with the sink's log end, and the source reads from there, so a restart of
//! either gateway or broker, or a cut link, resumes with no gap and no duplicate.
//! Does not own: certificates and connections ([`crate::transport`]), the broker's append path
//! ([`crate::kafka::mirror_append`]).
//!
//! Not built yet (see the gateway issue): lag figures and `ferry status`, consumer group offset
//! sync, sync replication mode, snappy on the wire, pipelining more than one request per
//! partition stream.

pub mod admin;
pub mod frame;
pub mod gateway;
pub mod reorder;
