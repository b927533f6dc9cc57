//! One partition's mirror stream on the source's side (the region that is primary for it):
//! what to do with the mirror's POSITION, which frames may go out, what an ACK retires.
//!
//! A stream opens at the rule's epoch. The mirror answers with its POSITION (log end and epoch
//! history); if the mirror's tail is not in our history (a rejoining old primary's may not be),
//! the stream asks for it to be cut ([`Reconcile::Truncate`]) and waits for the next POSITION;
//! otherwise it streams from the mirror's end. Frames are pipelined: a new one goes out while
//! fewer than [`Window::frames`] frames and [`Window::bytes`] bytes are unacknowledged. An ACK
//! carries the mirror's durable end and retires every frame that ends at or below it.
//!
//! Owns: the stream's phase, acknowledged and sent offsets, the frames in flight (with what the
//! caller keeps of each: the encoded frame in the gateway, for a second copy; the records and
//! send time in the simulator, for its model of QUIC's retransmissions).
//! Also: what a frame carries ([`whole_batches_from`]: the whole batches of a fetch answer from
//! the resume offset).
//! Does not own: reading batches (the caller fetches them from its broker), the wire, the sync-mode acknowledgement to the local broker (the caller passes on
//! what [`SourceStream::on_ack`] returns).
//!
//! Invariants: the acknowledged end never goes back and never passes what was sent (an ACK past
//! it is an error that restarts the stream); frames in flight are contiguous and each continues
//! the one before it (asserted).

use std::collections::VecDeque;

use crate::batch;
use crate::log::epochs::divergence;
use crate::log::EpochEntry;

/// Bytes read per fetch and sent per BATCHES frame at most.
pub const FRAME_BYTES: usize = 1 << 20;

/// How much a stream may have sent and not had acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Frames: each travels on a QUIC stream of its own in the gateway, and a connection allows
    /// `max_streams` of them open at once.
    pub frames: usize,
    /// Bytes of batches: the pipeline's depth (enough for 100 MiB/s over a 100 ms round trip at
    /// 16 MiB, a stream's QUIC window).
    pub bytes: usize,
}

/// The window of every mirror stream.
pub const WINDOW: Window = Window {
    frames: 256,
    bytes: 16 << 20,
};

/// Where a stream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// OPEN sent; waiting for the mirror's POSITION.
    Opening,
    /// TRUNCATE sent; waiting for the POSITION after the cut.
    Truncating,
    /// Sending frames from the mirror's end.
    Streaming,
}

/// What to do with a POSITION.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconcile {
    /// The mirror's log past this offset is not in our history: send TRUNCATE with it.
    Truncate(i64),
    /// The mirror's log is a prefix of ours: stream from its end (acknowledged up to there).
    Stream { from: i64 },
}

/// The mirror acknowledged an end past what the stream sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the mirror acknowledged {log_end}, past what this stream sent ({sent}): its log moved by other means")]
pub struct AckPastSent {
    pub log_end: i64,
    pub sent: i64,
}

/// A frame sent and not acknowledged yet.
#[derive(Debug, Clone)]
pub struct InFlight<P> {
    /// Its first batch's base offset (at or before the end of the frame before it).
    pub first: i64,
    /// The offset after its last batch.
    pub end: i64,
    /// Its batches' size.
    pub bytes: usize,
    /// What the caller keeps of it.
    pub payload: P,
}

/// One partition's stream to one mirror.
#[derive(Debug, Clone)]
pub struct SourceStream<P> {
    epoch: i32,
    phase: Phase,
    window: Window,
    acked: i64,
    sent: i64,
    inflight: VecDeque<InFlight<P>>,
    inflight_bytes: usize,
}

impl<P> SourceStream<P> {
    /// A stream opening at `epoch` (the caller sends OPEN with it).
    pub fn open(epoch: i32, window: Window) -> SourceStream<P> {
        SourceStream {
            epoch,
            phase: Phase::Opening,
            window,
            acked: 0,
            sent: 0,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
        }
    }

    pub fn epoch(&self) -> i32 {
        self.epoch
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The mirror's end as last acknowledged.
    pub fn acked(&self) -> i64 {
        self.acked
    }

    /// The offset after the last frame sent: where the next frame starts reading.
    pub fn sent(&self) -> i64 {
        self.sent
    }

    /// Whether the stream may go on: the rule is still at the stream's epoch with this region
    /// shipping to the mirror (`ships_at`: the epoch at which it does now, if it does).
    pub fn current(&self, ships_at: Option<i32>) -> bool {
        ships_at == Some(self.epoch)
    }

    /// The mirror's POSITION: its end and epoch history, against ours.
    pub fn on_position(
        &mut self,
        mirror_end: i64,
        mirror_epochs: &[EpochEntry],
        our_end: i64,
        our_epochs: &[EpochEntry],
    ) -> Reconcile {
        assert!(
            self.phase != Phase::Streaming,
            "a POSITION comes only while opening or truncating"
        );
        let d = divergence(our_epochs, our_end, mirror_epochs, mirror_end);
        if d >= mirror_end {
            self.phase = Phase::Streaming;
            self.acked = mirror_end;
            self.sent = mirror_end;
            self.inflight.clear();
            self.inflight_bytes = 0;
            Reconcile::Stream { from: mirror_end }
        } else {
            self.phase = Phase::Truncating;
            Reconcile::Truncate(d)
        }
    }

    /// Whether a new frame may go out now.
    pub fn has_room(&self) -> bool {
        self.phase == Phase::Streaming
            && self.inflight.len() < self.window.frames
            && self.inflight_bytes < self.window.bytes
    }

    /// Frames and bytes in flight.
    pub fn in_flight(&self) -> (usize, usize) {
        (self.inflight.len(), self.inflight_bytes)
    }

    /// A frame of batches `[first, end)` went out (`first` may lie before [`Self::sent`] when
    /// the first batch started before it; `end` lies past it).
    pub fn on_sent(&mut self, first: i64, end: i64, bytes: usize, payload: P) {
        assert_eq!(
            self.phase,
            Phase::Streaming,
            "frames go out only while streaming"
        );
        assert!(
            first <= self.sent && end > self.sent,
            "a frame {first}..{end} continues the stream at {}",
            self.sent
        );
        self.sent = end;
        self.inflight_bytes += bytes;
        self.inflight.push_back(InFlight {
            first,
            end,
            bytes,
            payload,
        });
    }

    /// The mirror holds everything below `log_end`, durably. Returns the new acknowledged end
    /// if it moved (an older or repeated ACK — from a second copy, say — moves nothing). An ACK
    /// past what this stream sent means the mirror's log moved by other means (another
    /// source's stream into the same partition): the stream must start again from a POSITION.
    pub fn on_ack(&mut self, log_end: i64) -> Result<Option<i64>, AckPastSent> {
        if self.phase != Phase::Streaming || log_end <= self.acked {
            return Ok(None);
        }
        if log_end > self.sent {
            return Err(AckPastSent {
                log_end,
                sent: self.sent,
            });
        }
        self.acked = log_end;
        while self.inflight.front().is_some_and(|f| f.end <= log_end) {
            let f = self.inflight.pop_front().expect("front");
            self.inflight_bytes -= f.bytes;
        }
        Ok(Some(log_end))
    }

    /// Frames in flight, oldest first.
    pub fn inflight(&self) -> &VecDeque<InFlight<P>> {
        &self.inflight
    }

    /// Frames in flight, for the caller's bookkeeping of each (a retransmission time).
    pub fn inflight_mut(&mut self) -> impl Iterator<Item = &mut InFlight<P>> {
        self.inflight.iter_mut()
    }

    /// The frame a second copy of the stream (`wire_copies = 2`) sends next, given where it is
    /// (`cursor`: the end of the last frame it sent, or the mirror's end when it opened): the
    /// first frame holding anything past both that and the acknowledged end. It starts at or
    /// before one of them, so the mirror's log already holds, or that copy already carries,
    /// everything before it: no gap.
    pub fn next_copy(&self, cursor: i64) -> Option<&InFlight<P>> {
        let from = cursor.max(self.acked);
        let f = self.inflight.iter().find(|f| f.end > from)?;
        assert!(
            f.first <= from,
            "in-flight frames are contiguous from the acknowledged end: frame {}..{} after {from}",
            f.first,
            f.end
        );
        Some(f)
    }
}

/// What a frame carries: in a fetch answer, the whole batches that hold offsets at or past
/// `from` (a partial batch at the end waits for the next fetch; a batch that starts before
/// `from` goes whole, and the mirror skips what it holds of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Their byte range in the answer.
    pub start: usize,
    pub end: usize,
    /// The first one's base offset and timestamp.
    pub first_offset: i64,
    pub first_timestamp: i64,
    /// The offset after the last.
    pub next: i64,
    /// Whether the client sent every one of them uncompressed.
    pub uncompressed: bool,
}

pub fn whole_batches_from(bytes: &[u8], from: i64) -> Option<Span> {
    let mut span: Option<Span> = None;
    for (range, h) in batch::whole_batches(bytes) {
        if h.next_offset() <= from {
            continue;
        }
        let plain = matches!(h.compression(), Ok(batch::Compression::None));
        let s = span.get_or_insert(Span {
            start: range.start,
            end: range.start,
            first_offset: h.base_offset,
            first_timestamp: h.base_timestamp,
            next: from,
            uncompressed: true,
        });
        s.end = range.end;
        s.next = h.next_offset();
        s.uncompressed &= plain;
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::log::epochs::history as h;

    fn streaming(from: i64, window: Window) -> SourceStream<()> {
        let mut s = SourceStream::open(0, window);
        assert_eq!(
            s.on_position(from, &h(&[(0, 0)]), from, &h(&[(0, 0)])),
            Reconcile::Stream { from }
        );
        s
    }

    #[test]
    fn a_mirror_whose_tail_left_our_history_is_cut_first() {
        // The mirror (a rejoining old primary) wrote 100..150 at epoch 0 after we took over at
        // 100 with epoch 257.
        let mut s: SourceStream<()> = SourceStream::open(257, WINDOW);
        let ours = h(&[(0, 0), (257, 100)]);
        let theirs = h(&[(0, 0)]);
        assert_eq!(
            s.on_position(150, &theirs, 180, &ours),
            Reconcile::Truncate(100)
        );
        assert_eq!(s.phase(), Phase::Truncating);
        assert!(!s.has_room(), "nothing is sent before the cut");
        assert_eq!(
            s.on_position(100, &theirs, 180, &ours),
            Reconcile::Stream { from: 100 }
        );
        assert_eq!((s.acked(), s.sent()), (100, 100));
    }

    #[test]
    fn the_window_bounds_frames_and_bytes_in_flight() {
        let mut s = streaming(
            0,
            Window {
                frames: 2,
                bytes: 100,
            },
        );
        s.on_sent(0, 10, 10, ());
        s.on_sent(10, 20, 10, ());
        assert!(!s.has_room(), "two frames");
        assert_eq!(s.on_ack(10), Ok(Some(10)));
        assert!(s.has_room());
        s.on_sent(20, 30, 200, ());
        assert!(!s.has_room(), "bytes");
        assert_eq!(s.on_ack(30), Ok(Some(30)));
        assert_eq!(s.in_flight(), (0, 0));
    }

    #[test]
    fn old_and_repeated_acks_move_nothing() {
        let mut s = streaming(5, WINDOW);
        s.on_sent(5, 10, 1, ());
        s.on_sent(10, 20, 1, ());
        assert_eq!(s.on_ack(20), Ok(Some(20)));
        assert_eq!(s.on_ack(10), Ok(None));
        assert_eq!(s.on_ack(20), Ok(None));
        assert_eq!(s.acked(), 20);
    }

    #[test]
    fn an_ack_past_what_was_sent_is_an_error_not_progress() {
        let mut s = streaming(0, WINDOW);
        s.on_sent(0, 10, 1, ());
        assert_eq!(
            s.on_ack(11),
            Err(AckPastSent {
                log_end: 11,
                sent: 10
            })
        );
        assert_eq!(s.acked(), 0);
    }

    #[test]
    #[should_panic(expected = "continues the stream")]
    fn a_frame_that_leaves_a_gap_is_a_bug() {
        let mut s = streaming(0, WINDOW);
        s.on_sent(1, 10, 1, ());
    }

    #[test]
    fn the_second_copy_skips_what_the_mirror_has_and_never_leaves_a_gap() {
        let mut s = streaming(0, WINDOW);
        for (a, b) in [(0, 10), (10, 25), (25, 30)] {
            s.on_sent(a, b, 1, ());
        }
        // Starting where the mirror ends (0): the first frame.
        assert_eq!(s.next_copy(0).map(|f| f.first), Some(0));
        // The mirror acknowledged 10: the copy skips to 10..25.
        s.on_ack(10).unwrap();
        assert_eq!(s.next_copy(0).map(|f| f.first), Some(10));
        // Having sent 10..25 itself: 25..30 next, then nothing.
        assert_eq!(s.next_copy(25).map(|f| f.first), Some(25));
        assert!(s.next_copy(30).is_none());
        // An acknowledged end inside a frame (a batch boundary): that frame still goes.
        s.on_ack(12).unwrap();
        assert_eq!(s.next_copy(0).map(|f| (f.first, f.end)), Some((10, 25)));
    }

    #[test]
    fn a_fetch_answer_is_cut_to_whole_batches_from_the_resume_offset() {
        use crate::batch::build::{batch, Record};
        let rec = |v: &str| Record {
            value: Some(v.as_bytes().to_vec()),
            ..Default::default()
        };
        let mut bytes = batch(10, 1000, None, &[rec("a"), rec("b")]); // 10, 11
        let second_at = bytes.len();
        bytes.extend(batch(12, 2000, None, &[rec("c")])); // 12
        let third_at = bytes.len();
        bytes.extend(batch(13, 3000, None, &[rec("d"), rec("e")])); // 13, 14
        let all = bytes.len();
        let span = whole_batches_from(&bytes, 10).unwrap();
        assert_eq!(
            span,
            Span {
                start: 0,
                end: all,
                first_offset: 10,
                first_timestamp: 1000,
                next: 15,
                uncompressed: true
            }
        );
        // Resuming at 12 skips the first batch.
        let span = whole_batches_from(&bytes, 12).unwrap();
        assert_eq!(
            (span.start, span.first_offset, span.first_timestamp),
            (second_at, 12, 2000)
        );
        // A partial batch at the end waits for the next fetch.
        let span = whole_batches_from(&bytes[..all - 3], 10).unwrap();
        assert_eq!((span.end, span.next), (third_at, 13));
        assert_eq!(whole_batches_from(&bytes[..all - 3], 13), None);
        assert_eq!(whole_batches_from(&bytes, 15), None);
        assert_eq!(whole_batches_from(&[], 0), None);
    }
}
