//! The sink's reassembly of one partition's BATCHES frames.
//!
//! Each frame travels on a QUIC stream of its own (see [`crate::mirror::frame`]), so that a lost packet
//! delays only the frame it carried, not every frame sent after it on a shared stream; frames
//! may therefore arrive in any order. The mirror's log must stay offset-identical to the
//! source's, so a frame is appended only once everything before it is in the log: this
//! structure holds the frames that arrived early, hands out the contiguous run that continues
//! the log, and forgets what the log already holds (a frame appended through the other copy of
//! the stream, `wire_copies = 2`).
//!
//! Plain data, no I/O: the sink ([`super::sink`]) feeds it frames and log ends and appends what
//! it hands out. Generic over what a frame carries ([`Payload`]): the gateway's record batches
//! (`Bytes`), the simulator's records.
//!
//! Invariants, asserted: the log end it knows never goes back (a truncation starts a new
//! `Reorder`); a run it hands out starts at or below that end and has no gap.

use std::collections::BTreeMap;

use bytes::Bytes;
use thiserror::Error;

/// What a frame carries, as far as holding it goes: its size in bytes.
pub trait Payload: Clone {
    fn bytes(&self) -> usize;
}

impl Payload for Bytes {
    fn bytes(&self) -> usize {
        self.len()
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReorderError {
    #[error("{held} bytes of frames wait for a gap at offset {end} to close (at most {max})")]
    TooMuchHeld { end: i64, held: usize, max: usize },
    #[error("frame {first}..{after} is empty or runs backwards")]
    BadFrame { first: i64, after: i64 },
}

/// A checked frame waiting for its turn: its batches cover `[first, after)`.
#[derive(Debug, Clone)]
struct Held<P> {
    after: i64,
    batches: P,
}

/// Frames of one partition that arrived ahead of the log end.
#[derive(Debug)]
pub struct Reorder<P = Bytes> {
    /// The mirror's log end as last learned (durable).
    end: i64,
    /// By first offset.
    held: BTreeMap<i64, Held<P>>,
    held_bytes: usize,
    max_bytes: usize,
}

impl<P: Payload> Reorder<P> {
    /// Start at the mirror's log end; hold at most `max_bytes` of early frames.
    pub fn new(end: i64, max_bytes: usize) -> Reorder<P> {
        Reorder {
            end,
            held: BTreeMap::new(),
            held_bytes: 0,
            max_bytes,
        }
    }

    /// The log end this structure knows.
    pub fn end(&self) -> i64 {
        self.end
    }

    /// Bytes of frames held.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// A checked frame arrived: its batches cover `[first, after)`. A frame the log already
    /// holds is dropped; one that arrived twice is kept once.
    pub fn offer(&mut self, first: i64, after: i64, batches: P) -> Result<(), ReorderError> {
        if after <= first {
            return Err(ReorderError::BadFrame { first, after });
        }
        if after <= self.end || self.held.contains_key(&first) {
            return Ok(());
        }
        let n = batches.bytes();
        if self.held_bytes + n > self.max_bytes && first > self.end {
            return Err(ReorderError::TooMuchHeld {
                end: self.end,
                held: self.held_bytes + n,
                max: self.max_bytes,
            });
        }
        self.held_bytes += n;
        self.held.insert(first, Held { after, batches });
        Ok(())
    }

    /// The log end moved to `end` (this sink appended, or the other copy of the stream did):
    /// frames wholly below it are dropped.
    pub fn advance(&mut self, end: i64) {
        if end <= self.end {
            return;
        }
        self.end = end;
        while let Some((&first, h)) = self.held.first_key_value() {
            if h.after > end {
                break;
            }
            self.held_bytes -= h.batches.bytes();
            self.held.remove(&first);
        }
    }

    /// The frames that continue the log, in order, up to about `max_bytes` (at least one), and
    /// the offset after them; `None` while the frame at the log end has not arrived. They stay
    /// counted as held until [`Reorder::advance`] passes them (an append may fail).
    pub fn ready(&self, max_bytes: usize) -> Option<(Vec<P>, i64)> {
        let mut at = self.end;
        let mut parts: Vec<P> = Vec::new();
        let mut total = 0usize;
        while parts.is_empty() || total < max_bytes {
            // Of the frames that start at or before `at`, the one reaching furthest past it.
            let Some(h) = self
                .held
                .range(..=at)
                .map(|(_, h)| h)
                .filter(|h| h.after > at)
                .max_by_key(|h| h.after)
            else {
                break;
            };
            parts.push(h.batches.clone());
            total += h.batches.bytes();
            at = h.after;
        }
        if parts.is_empty() {
            return None;
        }
        assert!(at > self.end, "a run continues the log");
        Some((parts, at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn b(n: usize) -> Bytes {
        Bytes::from(vec![7u8; n])
    }

    #[test]
    fn early_frames_wait_for_the_gap_and_then_go_together() {
        let mut r: Reorder = Reorder::new(10, 1 << 20);
        r.offer(20, 30, b(100)).unwrap();
        r.offer(30, 35, b(50)).unwrap();
        assert!(r.ready(1 << 20).is_none(), "10..20 has not arrived");
        r.offer(10, 20, b(100)).unwrap();
        let (parts, after) = r.ready(1 << 20).unwrap();
        assert_eq!((parts.len(), after), (3, 35));
        // Not dropped until the append is known to have worked.
        assert_eq!(r.held_bytes(), 250);
        r.advance(after);
        assert_eq!((r.end(), r.held_bytes()), (35, 0));
        assert!(r.ready(1 << 20).is_none());
    }

    #[test]
    fn what_the_other_copy_appended_is_dropped_and_an_overlapping_frame_is_ready() {
        let mut r: Reorder = Reorder::new(0, 1 << 20);
        r.offer(10, 20, b(10)).unwrap();
        r.offer(20, 30, b(10)).unwrap();
        // The other copy appended up to 15 (a batch boundary inside the frame 10..20).
        r.advance(15);
        let (parts, after) = r.ready(1 << 20).unwrap();
        assert_eq!((parts.len(), after), (2, 30));
        r.advance(25);
        assert_eq!(r.held_bytes(), 10, "10..20 is dropped, 20..30 still needed");
        // A frame that arrives after the log passed it is ignored.
        r.offer(0, 10, b(10)).unwrap();
        assert_eq!(r.held_bytes(), 10);
    }

    #[test]
    fn the_hold_is_bounded() {
        let mut r: Reorder = Reorder::new(0, 100);
        r.offer(10, 20, b(60)).unwrap();
        assert!(matches!(
            r.offer(20, 30, b(60)),
            Err(ReorderError::TooMuchHeld { .. })
        ));
        // The frame at the log end is always taken, whatever is held.
        r.offer(0, 10, b(60)).unwrap();
        assert!(r.ready(1).is_some());
        assert!(matches!(
            r.offer(5, 5, b(1)),
            Err(ReorderError::BadFrame { .. })
        ));
    }

    proptest! {
        /// However frames are cut, duplicated (two copies) and ordered, the log receives every
        /// offset exactly once, in order, with no gap.
        #[test]
        fn any_arrival_order_gives_the_log_in_order(
            sizes in prop::collection::vec(1i64..20, 1..30),
            seed in any::<u64>(),
            dup in any::<bool>(),
            chunk in 1usize..100,
        ) {
            let mut frames = Vec::new();
            let mut at = 0i64;
            for s in &sizes {
                frames.push((at, at + s));
                at += s;
            }
            let total = at;
            if dup {
                let again = frames.clone();
                frames.extend(again);
            }
            // A deterministic shuffle from the seed.
            let mut x = seed | 1;
            for i in (1..frames.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                frames.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut r: Reorder = Reorder::new(0, 1 << 30);
            let mut log_end = 0i64;
            for (first, after) in frames {
                r.offer(first, after, b((after - first) as usize)).unwrap();
                while let Some((parts, after)) = r.ready(chunk) {
                    prop_assert!(!parts.is_empty());
                    let len: usize = parts.iter().map(|p| p.len()).sum();
                    // The run covers (log_end - overlap) .. after without a gap: its bytes are
                    // at least the new offsets (one byte per offset here).
                    prop_assert!(len as i64 >= after - log_end);
                    prop_assert!(after > log_end);
                    log_end = after;
                    r.advance(after);
                }
            }
            prop_assert_eq!(log_end, total);
            prop_assert_eq!(r.held_bytes(), 0);
        }
    }
}
