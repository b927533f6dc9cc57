//! Forward error correction for BATCHES frames: recovery shards in QUIC datagrams.
//!
//! On a lossy link a frame whose packet is lost arrives on its reliable stream one round trip
//! late at best (QUIC must learn of the loss before it resends). For topics whose rule sets
//! `wire_fec = P`, the source gateway also sends, beside each frame's stream, Reed-Solomon
//! *recovery* shards of the frame in QUIC datagrams (unreliable, never resent): the frame is cut
//! into equal original shards that fit a datagram, and P% as many recovery shards (at least two)
//! are computed from them. The original shards are the stream's own bytes: the mirror reads
//! the stream out of order (`read_chunk(.., ordered = false)`), so the packets that did arrive
//! are usable at once, and any `originals` of the shards, complete originals from the stream
//! and recovery shards from datagrams together, rebuild the frame without waiting for a resend.
//! The cost on the link is P% of the frame, not a second copy of it.
//!
//! The stream still carries every frame reliably: the shards are only a faster way to finish
//! it, so losing shards, or the whole feature, never loses data (and a frame rebuilt from them
//! is checked like one read whole: frame CRC, then every batch).
//!
//! Plain data, no I/O: [`encode`] turns a frame into datagrams, [`parse`] reads one, and a
//! [`StreamFrame`] collects one frame stream's chunks and shards until the frame is whole or can
//! be rebuilt. The gateway sends, receives and routes datagrams to their stream.
//!
//! ```text
//! datagram = kind u8 (2) | route u64 | stream u64 | wire_at u16 | first_offset i64 |
//!            frame_len u32 | originals u16 | recoveries u16 | index u16 (< recoveries) |
//!            shard bytes (every shard of a frame the same, even length)
//! ```
//! `stream` is the QUIC stream id of the frame's unidirectional stream, `wire_at` where the
//! frame starts on it (after its ROUTE frame). Original shard `i` is the frame's bytes
//! `[i × len, (i + 1) × len)`, the last one padded with zeros; the frame is as encoded
//! (`Frame::encode`: length, kind, payload, CRC-32).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;
use tokio::sync::mpsc::UnboundedSender;

const KIND: u8 = 2;
/// Bytes before a datagram's shard.
pub const HEADER_BYTES: usize = 1 + 8 + 8 + 2 + 8 + 4 + 2 + 2 + 2;
/// Frames cut into more original shards than this get no recovery shards (a 1 MiB backlog
/// frame gains nothing from them: the datagram path is for latency).
pub const ORIGINALS_MAX: usize = 1024;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FecError {
    #[error("datagram of {0} bytes is too short for a shard")]
    Short(usize),
    #[error("unknown datagram kind {0}")]
    Kind(u8),
    #[error("shard {index} of {recoveries} does not fit its frame ({why})")]
    Shape {
        index: u16,
        recoveries: u16,
        why: &'static str,
    },
    #[error("Reed-Solomon: {0}")]
    Codec(String),
}

/// One parsed datagram: a recovery shard of the frame on stream `stream`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub route: u64,
    pub stream: u64,
    pub wire_at: u16,
    pub first_offset: i64,
    pub frame_len: u32,
    pub originals: u16,
    pub recoveries: u16,
    pub index: u16,
    pub bytes: Bytes,
}

impl Shard {
    /// Whether `other` describes the same frame the same way.
    fn same_frame(&self, other: &Shard) -> bool {
        (
            self.route,
            self.stream,
            self.wire_at,
            self.first_offset,
            self.frame_len,
            self.originals,
            self.recoveries,
            self.bytes.len(),
        ) == (
            other.route,
            other.stream,
            other.wire_at,
            other.first_offset,
            other.frame_len,
            other.originals,
            other.recoveries,
            other.bytes.len(),
        )
    }
}

/// Recovery shards for `originals` original ones at `percent`: at least two.
fn recoveries_for(originals: usize, percent: u8) -> usize {
    (originals * percent as usize).div_ceil(100).max(2)
}

/// The datagrams that carry the recovery shards of `frame` (an encoded BATCHES frame, starting
/// at `wire_at` on the QUIC stream `stream` of the sink `route`), each at most `datagram_max`
/// bytes, `percent`% of the original shards' count (at least two). Empty when the frame is too
/// large for the datagram path or a datagram cannot hold a shard.
pub fn encode(
    route: u64,
    stream: u64,
    wire_at: u16,
    first_offset: i64,
    frame: &[u8],
    datagram_max: usize,
    percent: u8,
) -> Result<Vec<Bytes>, FecError> {
    let shard_bytes = datagram_max.saturating_sub(HEADER_BYTES) & !1;
    if shard_bytes < 64 || frame.is_empty() || percent == 0 {
        return Ok(Vec::new());
    }
    let originals = frame.len().div_ceil(shard_bytes);
    if originals > ORIGINALS_MAX {
        return Ok(Vec::new());
    }
    let recoveries = recoveries_for(originals, percent);
    let mut shards: Vec<Vec<u8>> = frame.chunks(shard_bytes).map(|c| c.to_vec()).collect();
    shards
        .last_mut()
        .expect("a frame has a shard")
        .resize(shard_bytes, 0);
    let recovery = reed_solomon_simd::encode(originals, recoveries, &shards)
        .map_err(|e| FecError::Codec(e.to_string()))?;
    let mut out = Vec::with_capacity(recoveries);
    for (i, s) in recovery.iter().enumerate() {
        let mut b = BytesMut::with_capacity(HEADER_BYTES + shard_bytes);
        b.put_u8(KIND);
        b.put_u64(route);
        b.put_u64(stream);
        b.put_u16(wire_at);
        b.put_i64(first_offset);
        b.put_u32(frame.len() as u32);
        b.put_u16(originals as u16);
        b.put_u16(recoveries as u16);
        b.put_u16(i as u16);
        b.put_slice(s);
        out.push(b.freeze());
    }
    Ok(out)
}

/// Read one datagram.
pub fn parse(mut d: Bytes) -> Result<Shard, FecError> {
    if d.len() <= HEADER_BYTES {
        return Err(FecError::Short(d.len()));
    }
    let kind = d.get_u8();
    if kind != KIND {
        return Err(FecError::Kind(kind));
    }
    let s = Shard {
        route: d.get_u64(),
        stream: d.get_u64(),
        wire_at: d.get_u16(),
        first_offset: d.get_i64(),
        frame_len: d.get_u32(),
        originals: d.get_u16(),
        recoveries: d.get_u16(),
        index: d.get_u16(),
        bytes: d,
    };
    let shape = |why| FecError::Shape {
        index: s.index,
        recoveries: s.recoveries,
        why,
    };
    if s.originals == 0 || s.originals as usize > ORIGINALS_MAX || s.recoveries == 0 {
        return Err(shape("shard counts out of range"));
    }
    if s.index >= s.recoveries {
        return Err(shape("index past the last recovery shard"));
    }
    if s.bytes.len() % 2 != 0 {
        return Err(shape("odd shard length"));
    }
    let capacity = s.originals as usize * s.bytes.len();
    if (s.frame_len as usize) > capacity || (s.frame_len as usize) + s.bytes.len() <= capacity {
        return Err(shape("frame length disagrees with the shards"));
    }
    Ok(s)
}

/// What a [`StreamFrame`] can give.
#[derive(Debug, PartialEq, Eq)]
pub enum Ready {
    /// Not yet.
    No,
    /// Every byte of the stream, in order (it ended and has no gap).
    Whole(Bytes),
    /// The frame rebuilt from the stream's complete original shards and recovery shards, before
    /// the stream could finish: its route, first offset and bytes (as encoded).
    Rebuilt {
        route: u64,
        first_offset: i64,
        frame: Bytes,
    },
}

/// One BATCHES frame stream being received: its chunks in any order, its end once known, and
/// the recovery shards of its frame that came as datagrams. Holds at most the stream's bytes
/// plus its frame's recovery shards; which original shards are complete is kept up to date as
/// chunks come, so that asking whether the frame can be rebuilt costs nothing.
#[derive(Debug, Default)]
pub struct StreamFrame {
    /// Chunks by stream offset (chunks may overlap).
    chunks: BTreeMap<u64, Bytes>,
    /// The stream's length, once it ended.
    end: Option<u64>,
    /// Recovery shards by index, all describing the frame the same way.
    shards: BTreeMap<u16, Shard>,
    /// Once a shard told the frame's shape: which original shards the chunks complete.
    complete: Vec<bool>,
    complete_count: usize,
    /// Set by [`StreamFrame::stop_shards`].
    no_shards: bool,
    /// The furthest stream byte seen.
    seen: u64,
}

impl StreamFrame {
    pub fn new() -> StreamFrame {
        StreamFrame::default()
    }

    /// The first shard's view of the frame: where it starts, shard length, originals, length.
    fn grid(&self) -> Option<(u64, u64, usize, u64)> {
        let s = self.shards.values().next()?;
        Some((
            s.wire_at as u64,
            s.bytes.len() as u64,
            s.originals as usize,
            s.frame_len as u64,
        ))
    }

    /// The stream bytes of original shard `i`.
    fn original_range(&self, i: usize) -> Option<(u64, u64)> {
        let (at, len, _, frame_len) = self.grid()?;
        let from = at + i as u64 * len;
        Some((from, (from + len).min(at + frame_len)))
    }

    fn mark(&mut self, i: usize) {
        if !self.complete[i] {
            if let Some((from, to)) = self.original_range(i) {
                if self.walk(from, to, None) {
                    self.complete[i] = true;
                    self.complete_count += 1;
                }
            }
        }
    }

    /// A chunk of the stream at `offset`.
    pub fn add_chunk(&mut self, offset: u64, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        let chunk_end = offset + bytes.len() as u64;
        self.seen = self.seen.max(chunk_end);
        match self.chunks.get(&offset) {
            Some(b) if b.len() >= bytes.len() => return,
            _ => {
                self.chunks.insert(offset, bytes);
            }
        }
        if let Some((at, len, k, _)) = self.grid() {
            let first = offset.saturating_sub(at) / len;
            let last = chunk_end.saturating_sub(at).div_ceil(len);
            for i in first as usize..(last as usize).min(k) {
                self.mark(i);
            }
        }
    }

    /// Shards are of no use for this stream (they did not rebuild a good frame): drop them and
    /// any that come later, and wait for the stream.
    pub fn stop_shards(&mut self) {
        self.shards.clear();
        self.complete.clear();
        self.complete_count = 0;
        self.no_shards = true;
    }

    /// The stream's bytes from its start up to its first gap.
    pub fn prefix(&self) -> Bytes {
        let mut out = Vec::new();
        let mut at = 0u64;
        for (&o, b) in &self.chunks {
            if o > at {
                break;
            }
            let end = o + b.len() as u64;
            if end > at {
                out.extend_from_slice(&b[(at - o) as usize..]);
                at = end;
            }
        }
        Bytes::from(out)
    }

    /// How far into the stream bytes have arrived (the gateway bounds it: a frame stream is one
    /// ROUTE and one frame of at most `frame::FRAME_BYTES_MAX`).
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// The stream ended: everything it carried has been added.
    pub fn finish(&mut self) {
        let end = self
            .chunks
            .iter()
            .map(|(o, b)| o + b.len() as u64)
            .max()
            .unwrap_or(0);
        self.end = Some(end);
    }

    /// A recovery shard of this stream's frame. A shard that describes the frame differently
    /// from the ones before it is refused.
    pub fn add_shard(&mut self, s: Shard) -> Result<(), FecError> {
        if self.no_shards {
            return Ok(());
        }
        if let Some(first) = self.shards.values().next() {
            if !first.same_frame(&s) {
                return Err(FecError::Shape {
                    index: s.index,
                    recoveries: s.recoveries,
                    why: "differs from the frame's other shards",
                });
            }
            self.shards.entry(s.index).or_insert(s);
            return Ok(());
        }
        let k = s.originals as usize;
        self.shards.insert(s.index, s);
        self.complete = vec![false; k];
        for i in 0..k {
            self.mark(i);
        }
        Ok(())
    }

    /// Whether bytes `[from, to)` of the stream have all arrived; if so, and `out` is given,
    /// appends them to it.
    fn walk(&self, from: u64, to: u64, mut out: Option<&mut Vec<u8>>) -> bool {
        let mut at = from;
        // The chunk holding `from` may start before it.
        let start = self
            .chunks
            .range(..=from)
            .next_back()
            .map_or(from, |(o, _)| *o);
        for (&o, b) in self.chunks.range(start..to) {
            if at >= to {
                break;
            }
            if o > at {
                return false;
            }
            let chunk_end = o + b.len() as u64;
            if chunk_end > at {
                let upto = chunk_end.min(to);
                if let Some(out) = out.as_deref_mut() {
                    out.extend_from_slice(&b[(at - o) as usize..(upto - o) as usize]);
                }
                at = upto;
            }
        }
        at >= to
    }

    /// The whole stream, or the frame rebuilt from shards, when either is at hand.
    pub fn ready(&self) -> Result<Ready, FecError> {
        if let Some(end) = self.end {
            let mut all = Vec::with_capacity(end as usize);
            if self.walk(0, end, Some(&mut all)) {
                return Ok(Ready::Whole(Bytes::from(all)));
            }
        }
        let Some(s) = self.shards.values().next() else {
            return Ok(Ready::No);
        };
        let k = s.originals as usize;
        if self.complete_count + self.shards.len() < k {
            return Ok(Ready::No);
        }
        let shard_bytes = s.bytes.len();
        let mut originals = Vec::with_capacity(self.complete_count);
        for i in (0..k).filter(|&i| self.complete[i]) {
            let (from, to) = self.original_range(i).expect("a shard gave the grid");
            let mut b = Vec::with_capacity(shard_bytes);
            self.walk(from, to, Some(&mut b));
            b.resize(shard_bytes, 0);
            originals.push((i, b));
        }
        let mut frame = BytesMut::with_capacity(k * shard_bytes);
        if originals.len() == k {
            for (_, b) in &originals {
                frame.put_slice(b);
            }
        } else {
            let restored = reed_solomon_simd::decode(
                k,
                s.recoveries as usize,
                originals.iter().map(|(i, b)| (*i, b)),
                self.shards.values().map(|r| (r.index as usize, &r.bytes)),
            )
            .map_err(|e| FecError::Codec(e.to_string()))?;
            let mut have = originals.iter().peekable();
            for i in 0..k {
                match have.peek() {
                    Some((j, b)) if *j == i => {
                        frame.put_slice(b);
                        have.next();
                    }
                    _ => frame.put_slice(restored.get(&i).ok_or_else(|| {
                        FecError::Codec(format!("original shard {i} was not restored"))
                    })?),
                }
            }
        }
        frame.truncate(s.frame_len as usize);
        Ok(Ready::Rebuilt {
            route: s.route,
            first_offset: s.first_offset,
            frame: frame.freeze(),
        })
    }
}

/// Routes one connection's shards to the task reading their stream. Shards often arrive
/// before their stream is accepted (they travel ahead of its bytes), so they wait here until
/// the stream is opened; waiting shards are bounded in bytes and dropped after [`KEEP`].
pub struct Inbox {
    open: HashMap<u64, UnboundedSender<Shard>>,
    waiting: HashMap<u64, Vec<Shard>>,
    order: VecDeque<(Instant, u64)>,
    held: usize,
    max_bytes: usize,
}

/// How long shards wait for their stream.
pub const KEEP: Duration = Duration::from_secs(2);

impl Inbox {
    pub fn new(max_bytes: usize) -> Inbox {
        Inbox {
            open: HashMap::new(),
            waiting: HashMap::new(),
            order: VecDeque::new(),
            held: 0,
            max_bytes,
        }
    }

    /// Bytes of shards waiting for their stream.
    pub fn held_bytes(&self) -> usize {
        self.held
    }

    /// A shard arrived: to its stream's reader, or to wait for it.
    pub fn deliver(&mut self, s: Shard, now: Instant) {
        self.expire(now);
        let s = match self.open.get(&s.stream) {
            Some(tx) => match tx.send(s) {
                Ok(()) => return,
                Err(e) => {
                    self.open.remove(&e.0.stream);
                    return;
                }
            },
            None => s,
        };
        let stream = s.stream;
        self.held += s.bytes.len();
        let w = self.waiting.entry(stream).or_default();
        if w.is_empty() {
            self.order.push_back((now, stream));
        }
        w.push(s);
        while self.held > self.max_bytes {
            let Some((_, oldest)) = self.order.pop_front() else {
                break;
            };
            self.drop_waiting(oldest);
        }
    }

    /// The reader of `stream` starts: the shards that came first, and the way for later ones.
    pub fn open(&mut self, stream: u64, tx: UnboundedSender<Shard>) -> Vec<Shard> {
        self.open.insert(stream, tx);
        let early = self.waiting.remove(&stream).unwrap_or_default();
        self.held -= early.iter().map(|s| s.bytes.len()).sum::<usize>();
        early
    }

    /// The reader of `stream` is done (shards for it arriving later wait and expire).
    pub fn close(&mut self, stream: u64) {
        self.open.remove(&stream);
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(t, stream)) = self.order.front() {
            if now.duration_since(t) < KEEP {
                break;
            }
            self.order.pop_front();
            self.drop_waiting(stream);
        }
    }

    fn drop_waiting(&mut self, stream: u64) {
        if let Some(w) = self.waiting.remove(&stream) {
            self.held -= w.iter().map(|s| s.bytes.len()).sum::<usize>();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// A stream as the source writes it: `route` bytes, then the frame.
    fn stream(route_len: usize, f: &[u8]) -> Vec<u8> {
        let mut s = vec![0xAB; route_len];
        s.extend_from_slice(f);
        s
    }

    /// Cut `s` into packets of `mtu` bytes: (offset, bytes).
    fn packets(s: &[u8], mtu: usize) -> Vec<(u64, Bytes)> {
        s.chunks(mtu)
            .enumerate()
            .map(|(i, c)| ((i * mtu) as u64, Bytes::copy_from_slice(c)))
            .collect()
    }

    #[test]
    fn a_whole_stream_comes_back_in_order_whatever_the_chunk_order() {
        let s = stream(17, &frame(5_000));
        let mut ps = packets(&s, 1200);
        ps.reverse();
        let mut sf = StreamFrame::new();
        for (o, b) in ps {
            assert_eq!(sf.ready().unwrap(), Ready::No, "not ended yet");
            sf.add_chunk(o, b);
        }
        sf.finish();
        assert_eq!(sf.ready().unwrap(), Ready::Whole(Bytes::from(s)));
    }

    #[test]
    fn lost_packets_are_stood_in_for_by_recovery_shards() {
        let f = frame(10_000);
        let s = stream(17, &f);
        let ds = encode(9, 4, 17, 77, &f, 1200, 25).unwrap();
        let shards: Vec<Shard> = ds.into_iter().map(|d| parse(d).unwrap()).collect();
        let k = shards[0].originals as usize;
        assert_eq!((k, shards.len()), (9, 3));
        let mut sf = StreamFrame::new();
        // The stream's second and third packets are lost (three original shards touched:
        // as many as there are recovery shards); the rest arrive, then the shards.
        for (i, (o, b)) in packets(&s, 1000).into_iter().enumerate() {
            if i != 1 && i != 2 {
                sf.add_chunk(o, b);
            }
        }
        assert_eq!(sf.ready().unwrap(), Ready::No);
        for sh in shards {
            sf.add_shard(sh).unwrap();
        }
        assert_eq!(
            sf.ready().unwrap(),
            Ready::Rebuilt {
                route: 9,
                first_offset: 77,
                frame: Bytes::from(f)
            }
        );
    }

    #[test]
    fn too_much_lost_waits_for_the_stream() {
        let f = frame(3_000);
        let s = stream(17, &f);
        let ds = encode(1, 0, 17, 0, &f, 1200, 25).unwrap();
        let mut sf = StreamFrame::new();
        sf.add_shard(parse(ds[0].clone()).unwrap()).unwrap();
        // Only the first packet: one original at most, plus one recovery shard, of three.
        let (o, b) = packets(&s, 1200).remove(0);
        sf.add_chunk(o, b);
        assert_eq!(sf.ready().unwrap(), Ready::No);
    }

    #[test]
    fn after_a_bad_rebuild_the_stream_alone_finishes_the_frame() {
        let f = frame(5_000);
        let s = stream(17, &f);
        let mut sf = StreamFrame::new();
        // Shards of other bytes, shaped like this frame's: they "rebuild" a wrong frame (the
        // gateway's CRC check refuses it) until they are stopped.
        let wrong = frame(5_000).iter().map(|b| b ^ 0x5A).collect::<Vec<u8>>();
        for d in encode(1, 0, 17, 0, &wrong, 1200, 50).unwrap() {
            sf.add_shard(parse(d).unwrap()).unwrap();
        }
        let ps = packets(&s, 1200);
        let last = ps.len() - 1;
        for (o, b) in ps.iter().take(last).cloned() {
            sf.add_chunk(o, b);
        }
        match sf.ready().unwrap() {
            Ready::Rebuilt { frame, .. } => assert_ne!(&frame[..], &f[..]),
            other => panic!("expected a (wrong) rebuild, got {other:?}"),
        }
        sf.stop_shards();
        assert_eq!(sf.ready().unwrap(), Ready::No, "no shards any more");
        for d in encode(1, 0, 17, 0, &f, 1200, 50).unwrap() {
            sf.add_shard(parse(d).unwrap()).unwrap(); // ignored
        }
        assert_eq!(sf.ready().unwrap(), Ready::No);
        let (o, b) = ps[last].clone();
        sf.add_chunk(o, b);
        sf.finish();
        assert_eq!(sf.ready().unwrap(), Ready::Whole(Bytes::from(s)));
    }

    #[test]
    fn bad_datagrams_are_refused() {
        let f = frame(3_000);
        let ds = encode(1, 0, 17, 0, &f, 1200, 25).unwrap();
        assert_eq!(parse(Bytes::from_static(b"short")), Err(FecError::Short(5)));
        let mut bad = ds[0].to_vec();
        bad[0] = 9;
        assert_eq!(parse(Bytes::from(bad)), Err(FecError::Kind(9)));
        let mut bad = ds[0].to_vec();
        bad[27..31].copy_from_slice(&1_000_000u32.to_be_bytes()); // frame_len
        assert!(matches!(
            parse(Bytes::from(bad)),
            Err(FecError::Shape { .. })
        ));
        // A shard that describes the frame differently from the first is refused.
        let mut sf = StreamFrame::new();
        sf.add_shard(parse(ds[0].clone()).unwrap()).unwrap();
        let other = encode(1, 0, 17, 5, &f, 1200, 25).unwrap();
        assert!(sf.add_shard(parse(other[1].clone()).unwrap()).is_err());
        // Tiny datagrams, no percentage, or a huge frame: no datagram path at all.
        assert!(encode(1, 0, 17, 0, &frame(100), 40, 25).unwrap().is_empty());
        assert!(encode(1, 0, 17, 0, &frame(100), 1200, 0)
            .unwrap()
            .is_empty());
        assert!(encode(1, 0, 17, 0, &frame(2_000_000), 1200, 25)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn shards_wait_for_their_stream_then_go_to_its_reader() {
        let f = frame(5_000);
        let ds: Vec<Shard> = encode(1, 4, 17, 0, &f, 1200, 50)
            .unwrap()
            .into_iter()
            .map(|d| parse(d).unwrap())
            .collect();
        let t = Instant::now();
        let mut inbox = Inbox::new(1 << 20);
        inbox.deliver(ds[0].clone(), t);
        assert!(inbox.held_bytes() > 0);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        assert_eq!(inbox.open(4, tx), vec![ds[0].clone()]);
        assert_eq!(inbox.held_bytes(), 0);
        inbox.deliver(ds[1].clone(), t);
        assert_eq!(rx.try_recv().unwrap(), ds[1]);
        inbox.close(4);
        // Late shards wait, and expire.
        inbox.deliver(ds[2].clone(), t);
        assert!(inbox.held_bytes() > 0);
        inbox.deliver(
            encode(1, 6, 17, 0, &f, 1200, 50)
                .unwrap()
                .into_iter()
                .map(|d| parse(d).unwrap())
                .next()
                .unwrap(),
            t + KEEP,
        );
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        assert!(inbox.open(4, tx).is_empty(), "expired");
        // Bounded: the oldest stream's shards go first.
        let mut small = Inbox::new(3_000);
        for (i, d) in ds.iter().enumerate() {
            let mut d = d.clone();
            d.stream = i as u64;
            small.deliver(d, t);
        }
        assert!(small.held_bytes() <= 3_000);
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        assert!(small.open(0, tx).is_empty(), "the oldest was dropped");
    }

    proptest! {
        /// Whatever packets of the stream are lost, in whatever order the rest and the shards
        /// arrive: once enough is in, the frame comes back byte for byte, and with the stream's
        /// end, the whole stream does.
        #[test]
        fn any_loss_within_the_recovery_shards_rebuilds_the_frame(
            len in 1usize..40_000,
            percent in 1u8..60,
            route_len in 1usize..40,
            mtu in 200usize..1500,
            seed in any::<u64>(),
        ) {
            let f = frame(len);
            let s = stream(route_len, &f);
            let shards: Vec<Shard> = encode(3, 8, route_len as u16, 5, &f, 1200, percent)
                .unwrap().into_iter().map(|d| parse(d).unwrap()).collect();
            let r = shards[0].recoveries as usize;
            let shard_bytes = shards[0].bytes.len();
            let mut x = seed | 1;
            let mut next = || { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x };
            let ps = packets(&s, mtu);
            // Lose packets while the original shards they touch stay within the recovery
            // shards' reach.
            let mut spoiled = std::collections::BTreeSet::new();
            let mut kept = Vec::new();
            for (o, b) in ps {
                let touches: Vec<usize> = (0..shards[0].originals as usize)
                    .filter(|i| {
                        let a = (route_len + i * shard_bytes) as u64;
                        let z = a + shard_bytes as u64;
                        o < z && o + b.len() as u64 > a
                    })
                    .collect();
                let after: std::collections::BTreeSet<usize> =
                    spoiled.iter().copied().chain(touches.iter().copied()).collect();
                if next() % 3 == 0 && after.len() <= r {
                    spoiled = after;
                } else {
                    kept.push((o, b));
                }
            }
            let mut events: Vec<Result<(u64, Bytes), Shard>> =
                kept.into_iter().map(Ok).chain(shards.into_iter().map(Err)).collect();
            for i in (1..events.len()).rev() {
                events.swap(i, (next() % (i as u64 + 1)) as usize);
            }
            let mut sf = StreamFrame::new();
            for e in events {
                match e {
                    Ok((o, b)) => sf.add_chunk(o, b),
                    Err(sh) => sf.add_shard(sh).unwrap(),
                }
            }
            match sf.ready().unwrap() {
                Ready::Rebuilt { route, first_offset, frame } => {
                    prop_assert_eq!((route, first_offset), (3, 5));
                    prop_assert_eq!(&frame[..], &f[..]);
                }
                Ready::Whole(_) => prop_assert!(false, "the stream has not ended"),
                Ready::No => prop_assert!(false, "enough shards, no frame"),
            }
        }
    }
}
