//! One partition's mirror stream on the mirror's side: whether to take an OPEN, which frames to
//! append together, what to acknowledge, and what a TRUNCATE does.
//!
//! A sink takes a stream only from the region that is primary for the topic at exactly the
//! epoch the OPEN names, and only for a topic this region mirrors ([`open_refusal`]). Frames may
//! arrive in any order (each on a QUIC stream of its own, and from two copies of the stream);
//! [`super::reorder::Reorder`] puts them back in offset order, and the contiguous run that continues
//! the log is appended in one go, up to [`COALESCE_BYTES`]. The ACK of an append carries the
//! durable end. A TRUNCATE below the end has the broker set the tail aside (quarantine) and cut
//! it, and the sink starts again from the new end.
//!
//! Owns: the refusal rules, the check of a frame's batches ([`check_frame`]: CRCs, whole
//! batches, the first where the frame says), the reassembly and coalescing, the end the sink
//! acknowledges.
//! Does not own: appending (MirrorAppend in the gateway, the in-memory log in the simulator), the broker's
//! rule that a partition taking client writes is never cut (the broker refuses).
//!
//! Invariant, asserted: an append ends where its frames end.

use super::reorder::{Payload, Reorder};
use crate::failover::Placement;

/// Contiguous frames the mirror has received are appended together, up to this much.
pub const COALESCE_BYTES: usize = 4 << 20;

/// Bytes of frames a sink holds while one before them is still on its way; past it, the stream
/// is refused and starts again from the mirror's end. The source sends at most a window
/// ([`super::source::WINDOW`]) ahead of the mirror's acknowledged end, so this is never reached
/// normally.
pub const HOLD_BYTES: usize = 3 * super::source::WINDOW.bytes;

/// Why this region does not take a stream of `topic` from `peer` at `epoch` (`None`: it does).
/// `placement` is where the topic lives as this region's failover state says.
pub fn open_refusal(
    placement: Option<&Placement>,
    me: &str,
    peer: &str,
    topic: &str,
    epoch: i32,
) -> Option<String> {
    match placement {
        None => Some(format!("no rule mirrors topic '{topic}'")),
        Some(p) if p.epoch > epoch => Some(format!(
            "region {peer} is at epoch {epoch} for '{topic}' but {} is primary at epoch {} (fenced)",
            p.primary, p.epoch
        )),
        Some(p) if p.epoch < epoch => Some(format!(
            "region {peer} is at epoch {epoch} for '{topic}', ahead of this region's {} (learning it from heartbeats)",
            p.epoch
        )),
        Some(p) if p.primary != peer || !p.mirrors.iter().any(|m| m == me) => Some(format!(
            "region {peer} may not mirror topic '{topic}' into {me}"
        )),
        Some(_) => None,
    }
}

/// What a TRUNCATE asks of the sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncation {
    /// Quarantine and cut the log from this offset, then call [`SinkStream::truncated`] and
    /// answer with POSITION.
    Cut(i64),
    /// Nothing past it: answer with POSITION as it is.
    Nothing,
}

/// One partition's sink.
#[derive(Debug)]
pub struct SinkStream<P> {
    order: Reorder<P>,
    hold_bytes: usize,
    coalesce_bytes: usize,
}

impl<P: Payload> SinkStream<P> {
    /// A sink whose log ends at `end` (durably), with the gateway's limits.
    pub fn new(end: i64) -> SinkStream<P> {
        SinkStream::with_limits(end, HOLD_BYTES, COALESCE_BYTES)
    }

    pub fn with_limits(end: i64, hold_bytes: usize, coalesce_bytes: usize) -> SinkStream<P> {
        SinkStream {
            order: Reorder::new(end, hold_bytes),
            hold_bytes,
            coalesce_bytes,
        }
    }

    /// The durable end of the mirror's log as this sink knows it.
    pub fn end(&self) -> i64 {
        self.order.end()
    }

    /// Bytes of frames held for a gap to close.
    pub fn held_bytes(&self) -> usize {
        self.order.held_bytes()
    }

    /// A checked frame of batches `[first, after)` arrived. An error refuses the stream.
    pub fn on_frame(&mut self, first: i64, after: i64, payload: P) -> Result<(), String> {
        self.order
            .offer(first, after, payload)
            .map_err(|e| e.to_string())
    }

    /// The next append: the frames that continue the log, in order (the first may start below
    /// the end: the log holds its head already), and the offset after them.
    pub fn next_append(&self) -> Option<(Vec<P>, i64)> {
        self.order.ready(self.coalesce_bytes)
    }

    /// The append of the run that ends at `after` is durable, and the log ends at `new_end`:
    /// the ACK to send carries it.
    pub fn appended(&mut self, after: i64, new_end: i64) -> i64 {
        assert_eq!(new_end, after, "an append ends where its batches end");
        self.order.advance(new_end);
        new_end
    }

    /// Another sink of the same partition (the stream's second copy) made the log durable up to
    /// `end`.
    pub fn moved(&mut self, end: i64) {
        self.order.advance(end);
    }

    /// The source asks to cut the log from `offset`.
    pub fn on_truncate(&self, offset: i64) -> Truncation {
        if offset < self.end() {
            Truncation::Cut(offset)
        } else {
            Truncation::Nothing
        }
    }

    /// The log was cut and now ends at `end`: frames held are dropped (the source starts
    /// again from the POSITION that follows).
    pub fn truncated(&mut self, end: i64) {
        self.order = Reorder::new(end, self.hold_bytes);
    }
}

/// A BATCHES frame's batches, checked (CRC, whole, the first at `first_offset` or past it: a
/// compacted source holds no record in between): the offset after the last.
pub fn check_frame(first_offset: i64, batches: &[u8]) -> Result<i64, String> {
    let parts = crate::batch::split(batches).map_err(|x| format!("corrupt batch: {x}"))?;
    match (parts.first(), parts.last()) {
        (Some((_, a)), Some((_, b))) if a.base_offset >= first_offset => Ok(b.next_offset()),
        _ => Err("frame offset disagrees with its first batch".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn placement(primary: &str, epoch: i32, mirrors: &[&str]) -> Placement {
        Placement {
            pattern: "orders.*".into(),
            primary: primary.into(),
            epoch,
            fenced: false,
            mirrors: mirrors.iter().map(|m| m.to_string()).collect(),
            mode: crate::topology::ReplicationMode::Async,
            home: primary.into(),
        }
    }

    #[test]
    fn only_the_primary_at_the_current_epoch_may_open_a_stream() {
        let p = placement("east", 257, &["west"]);
        assert!(open_refusal(Some(&p), "west", "east", "orders.a", 257).is_none());
        // A fenced old primary, a peer ahead of us, a region that is not primary, a topic no
        // rule mirrors, a topic this region does not mirror.
        let old = open_refusal(Some(&p), "west", "east", "orders.a", 0).unwrap();
        assert!(old.contains("fenced"), "{old}");
        let ahead = open_refusal(Some(&p), "west", "east", "orders.a", 513).unwrap();
        assert!(ahead.contains("ahead"), "{ahead}");
        assert!(open_refusal(Some(&p), "west", "south", "orders.a", 257).is_some());
        assert!(open_refusal(None, "west", "east", "other", 257).is_some());
        assert!(open_refusal(Some(&p), "south", "east", "orders.a", 257).is_some());
    }

    #[test]
    fn frames_are_appended_in_order_together_and_acknowledged_at_their_end() {
        let mut s: SinkStream<Bytes> = SinkStream::new(10);
        s.on_frame(20, 30, Bytes::from_static(b"bb")).unwrap();
        assert!(s.next_append().is_none(), "10..20 is missing");
        s.on_frame(10, 20, Bytes::from_static(b"aa")).unwrap();
        let (parts, after) = s.next_append().unwrap();
        assert_eq!((parts.len(), after), (2, 30));
        assert_eq!(s.appended(after, 30), 30);
        assert!(s.next_append().is_none());
        assert_eq!(s.end(), 30);
    }

    #[test]
    #[should_panic(expected = "ends where its batches end")]
    fn an_append_that_ends_elsewhere_is_a_bug() {
        let mut s: SinkStream<Bytes> = SinkStream::new(0);
        s.on_frame(0, 10, Bytes::from_static(b"a")).unwrap();
        s.appended(10, 9);
    }

    #[test]
    fn a_truncate_cuts_only_below_the_end_and_drops_what_was_held() {
        let mut s: SinkStream<Bytes> = SinkStream::new(50);
        s.on_frame(60, 70, Bytes::from_static(b"x")).unwrap();
        assert_eq!(s.on_truncate(50), Truncation::Nothing);
        assert_eq!(s.on_truncate(40), Truncation::Cut(40));
        s.truncated(40);
        assert_eq!((s.end(), s.held_bytes()), (40, 0));
    }

    #[test]
    fn too_much_held_behind_a_gap_refuses_the_stream() {
        let mut s: SinkStream<Bytes> = SinkStream::with_limits(0, 4, 1 << 20);
        s.on_frame(10, 20, Bytes::from_static(b"abc")).unwrap();
        assert!(s.on_frame(20, 30, Bytes::from_static(b"abc")).is_err());
    }
}
