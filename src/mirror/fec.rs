//! Forward error correction for BATCHES frames, over QUIC datagrams.
//!
//! On a lossy link a frame whose packet is lost arrives on its reliable stream one round trip
//! late at best (QUIC must learn of the loss before it resends). For topics whose rule sets
//! `wire_fec = P`, the source gateway also sends each frame as Reed-Solomon shards in QUIC
//! datagrams (unreliable, never resent): the frame cut into equal original shards that fit a
//! datagram, plus P% recovery shards (at least two). Any `originals` of them rebuild the frame,
//! so with 1% loss a frame of a few hundred packets is rebuilt as soon as enough shards are in,
//! without waiting for a resend. The reliable stream still carries every frame: shards are only
//! a faster way for the same bytes to arrive, and the sink takes whichever copy comes first
//! (`mirror::reorder` keeps one), so losing shards, or the whole feature, never loses data.
//!
//! Plain data, no I/O: [`encode`] turns a frame into datagrams, [`parse`] reads one, and an
//! [`Assembler`] collects shards until a frame can be rebuilt. The gateway sends and receives.
//!
//! ```text
//! datagram = kind u8 (1) | route u64 | first_offset i64 | frame_len u32 | originals u16 |
//!            recoveries u16 | index u16 (< originals: an original shard; else recovery
//!            index - originals) | shard bytes (every shard of a frame the same, even length)
//! ```
//! The rebuilt bytes are the frame as encoded (`Frame::encode`: length, kind, payload, CRC-32),
//! so the sink checks the same CRCs as for a frame from a stream.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

const KIND: u8 = 1;
/// Bytes before a datagram's shard.
pub const HEADER_BYTES: usize = 1 + 8 + 8 + 4 + 2 + 2 + 2;
/// Frames cut into more original shards than this travel on their stream only (a 1 MiB backlog
/// frame gains nothing from the datagram path, which is for latency).
pub const ORIGINALS_MAX: usize = 1024;
/// How long an incomplete frame's shards are kept, and a rebuilt frame remembered.
pub const KEEP: Duration = Duration::from_secs(2);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FecError {
    #[error("datagram of {0} bytes is too short for a shard")]
    Short(usize),
    #[error("unknown datagram kind {0}")]
    Kind(u8),
    #[error("shard {index} of {total} does not fit its frame ({why})")]
    Shape {
        index: u16,
        total: usize,
        why: &'static str,
    },
    #[error("Reed-Solomon: {0}")]
    Codec(String),
}

/// One parsed datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub route: u64,
    pub first_offset: i64,
    pub frame_len: u32,
    pub originals: u16,
    pub recoveries: u16,
    pub index: u16,
    pub bytes: Bytes,
}

/// Recovery shards for `originals` original ones at `percent`: at least two.
fn recoveries_for(originals: usize, percent: u8) -> usize {
    (originals * percent as usize).div_ceil(100).max(2)
}

/// The datagrams that carry `frame` (an encoded BATCHES frame) for the sink `route`, each at
/// most `datagram_max` bytes, with `percent`% recovery shards. Empty when the frame is too
/// large for the datagram path or a datagram cannot hold a shard.
pub fn encode(
    route: u64,
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
    let header = |b: &mut BytesMut, index: usize| {
        b.put_u8(KIND);
        b.put_u64(route);
        b.put_i64(first_offset);
        b.put_u32(frame.len() as u32);
        b.put_u16(originals as u16);
        b.put_u16(recoveries as u16);
        b.put_u16(index as u16);
    };
    let mut out = Vec::with_capacity(originals + recoveries);
    for (i, s) in shards.iter().chain(recovery.iter()).enumerate() {
        let mut b = BytesMut::with_capacity(HEADER_BYTES + shard_bytes);
        header(&mut b, i);
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
        first_offset: d.get_i64(),
        frame_len: d.get_u32(),
        originals: d.get_u16(),
        recoveries: d.get_u16(),
        index: d.get_u16(),
        bytes: d,
    };
    let total = s.originals as usize + s.recoveries as usize;
    let shape = |why| FecError::Shape {
        index: s.index,
        total,
        why,
    };
    if s.originals == 0 || s.originals as usize > ORIGINALS_MAX || s.recoveries == 0 {
        return Err(shape("shard counts out of range"));
    }
    if s.index as usize >= total {
        return Err(shape("index past the last shard"));
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

/// A frame's shards so far.
struct Group {
    frame_len: usize,
    originals: usize,
    recoveries: usize,
    shard_bytes: usize,
    shards: HashMap<u16, Bytes>,
}

/// Collects shards until a frame can be rebuilt. Bounded: shards of frames not rebuilt within
/// [`KEEP`] are dropped, and so are the oldest groups past `max_bytes` held.
pub struct Assembler {
    groups: HashMap<(u64, i64), Group>,
    order: VecDeque<(Instant, (u64, i64))>,
    rebuilt: HashSet<(u64, i64)>,
    rebuilt_order: VecDeque<(Instant, (u64, i64))>,
    held: usize,
    max_bytes: usize,
}

impl Assembler {
    pub fn new(max_bytes: usize) -> Assembler {
        Assembler {
            groups: HashMap::new(),
            order: VecDeque::new(),
            rebuilt: HashSet::new(),
            rebuilt_order: VecDeque::new(),
            held: 0,
            max_bytes,
        }
    }

    /// Bytes of shards held.
    pub fn held_bytes(&self) -> usize {
        self.held
    }

    /// Take a shard; returns `(route, first offset, frame bytes)` once its frame can be rebuilt
    /// (once per frame: later shards of it are ignored).
    pub fn offer(&mut self, s: Shard, now: Instant) -> Result<Option<(u64, i64, Bytes)>, FecError> {
        self.expire(now);
        let key = (s.route, s.first_offset);
        if self.rebuilt.contains(&key) {
            return Ok(None);
        }
        let g = match self.groups.get_mut(&key) {
            Some(g) => {
                if g.frame_len != s.frame_len as usize
                    || g.originals != s.originals as usize
                    || g.recoveries != s.recoveries as usize
                    || g.shard_bytes != s.bytes.len()
                {
                    return Err(FecError::Shape {
                        index: s.index,
                        total: g.originals + g.recoveries,
                        why: "differs from the frame's other shards",
                    });
                }
                g
            }
            None => {
                self.order.push_back((now, key));
                self.groups.entry(key).or_insert(Group {
                    frame_len: s.frame_len as usize,
                    originals: s.originals as usize,
                    recoveries: s.recoveries as usize,
                    shard_bytes: s.bytes.len(),
                    shards: HashMap::new(),
                })
            }
        };
        if g.shards.contains_key(&s.index) {
            return Ok(None);
        }
        self.held += s.bytes.len();
        g.shards.insert(s.index, s.bytes);
        if g.shards.len() < g.originals {
            self.trim();
            return Ok(None);
        }
        let g = self.groups.remove(&key).expect("present");
        self.held -= g.shards.values().map(|b| b.len()).sum::<usize>();
        self.rebuilt.insert(key);
        self.rebuilt_order.push_back((now, key));
        Ok(Some((key.0, key.1, rebuild(g)?)))
    }

    /// Drop what is older than [`KEEP`].
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(t, key)) = self.order.front() {
            if now.duration_since(t) < KEEP {
                break;
            }
            self.order.pop_front();
            self.drop_group(&key);
        }
        while let Some(&(t, key)) = self.rebuilt_order.front() {
            if now.duration_since(t) < KEEP {
                break;
            }
            self.rebuilt_order.pop_front();
            self.rebuilt.remove(&key);
        }
    }

    fn trim(&mut self) {
        while self.held > self.max_bytes {
            let Some((_, key)) = self.order.pop_front() else {
                break;
            };
            self.drop_group(&key);
        }
    }

    fn drop_group(&mut self, key: &(u64, i64)) {
        if let Some(g) = self.groups.remove(key) {
            self.held -= g.shards.values().map(|b| b.len()).sum::<usize>();
        }
    }
}

/// The frame from at least `originals` shards of it.
fn rebuild(g: Group) -> Result<Bytes, FecError> {
    let k = g.originals as u16;
    let mut out = BytesMut::with_capacity(g.originals * g.shard_bytes);
    if (0..k).all(|i| g.shards.contains_key(&i)) {
        for i in 0..k {
            out.put_slice(&g.shards[&i]);
        }
    } else {
        let originals = g.shards.iter().filter(|(i, _)| **i < k);
        let recovery = g
            .shards
            .iter()
            .filter(|(i, _)| **i >= k)
            .map(|(i, b)| ((*i - k) as usize, b));
        let restored = reed_solomon_simd::decode(
            g.originals,
            g.recoveries,
            originals.map(|(i, b)| (*i as usize, b)),
            recovery,
        )
        .map_err(|e| FecError::Codec(e.to_string()))?;
        for i in 0..k {
            match g.shards.get(&i) {
                Some(b) => out.put_slice(b),
                None => out.put_slice(restored.get(&(i as usize)).ok_or_else(|| {
                    FecError::Codec(format!("original shard {i} was not restored"))
                })?),
            }
        }
    }
    out.truncate(g.frame_len);
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn a_frame_is_rebuilt_from_any_enough_shards_once() {
        let f = frame(10_000);
        let ds = encode(9, 77, &f, 1200, 25).unwrap();
        let s0 = parse(ds[0].clone()).unwrap();
        assert_eq!((s0.route, s0.first_offset, s0.frame_len), (9, 77, 10_000));
        let k = s0.originals as usize;
        assert_eq!(ds.len(), k + s0.recoveries as usize);
        // Lose the first three originals: the recovery shards stand in.
        let mut a = Assembler::new(1 << 20);
        let now = Instant::now();
        let mut got = None;
        for d in ds.iter().skip(3) {
            if let Some(x) = a.offer(parse(d.clone()).unwrap(), now).unwrap() {
                assert!(got.is_none(), "rebuilt once");
                got = Some(x);
            }
        }
        let (route, first, bytes) = got.expect("rebuilt");
        assert_eq!((route, first), (9, 77));
        assert_eq!(&bytes[..], &f[..]);
        assert_eq!(a.held_bytes(), 0);
    }

    #[test]
    fn too_few_shards_wait_and_expire() {
        let f = frame(5_000);
        let ds = encode(1, 0, &f, 1200, 25).unwrap();
        let k = parse(ds[0].clone()).unwrap().originals as usize;
        let mut a = Assembler::new(1 << 20);
        let t = Instant::now();
        for d in ds.iter().take(k - 1) {
            assert!(a.offer(parse(d.clone()).unwrap(), t).unwrap().is_none());
        }
        assert!(a.held_bytes() > 0);
        a.expire(t + KEEP);
        assert_eq!(a.held_bytes(), 0);
    }

    #[test]
    fn bad_datagrams_are_refused() {
        let ds = encode(1, 0, &frame(3_000), 1200, 25).unwrap();
        assert_eq!(parse(Bytes::from_static(b"short")), Err(FecError::Short(5)));
        let mut bad = ds[0].to_vec();
        bad[0] = 9;
        assert_eq!(parse(Bytes::from(bad)), Err(FecError::Kind(9)));
        let mut bad = ds[0].to_vec();
        bad[17..21].copy_from_slice(&1_000_000u32.to_be_bytes()); // frame_len
        assert!(matches!(
            parse(Bytes::from(bad)),
            Err(FecError::Shape { .. })
        ));
        // Tiny datagrams, no percentage, or a huge frame: no datagram path at all.
        assert!(encode(1, 0, &frame(100), 40, 25).unwrap().is_empty());
        assert!(encode(1, 0, &frame(100), 1200, 0).unwrap().is_empty());
        assert!(encode(1, 0, &frame(2_000_000), 1200, 25)
            .unwrap()
            .is_empty());
    }

    proptest! {
        /// Whatever `recoveries` shards are lost, in whatever order the rest arrive, the frame
        /// comes back byte for byte.
        #[test]
        fn any_loss_within_the_recovery_shards_rebuilds_the_frame(
            len in 1usize..40_000,
            percent in 1u8..60,
            seed in any::<u64>(),
        ) {
            let f = frame(len);
            let ds = encode(3, 5, &f, 1200, percent).unwrap();
            let s0 = parse(ds[0].clone()).unwrap();
            let lose = s0.recoveries as usize;
            let mut order: Vec<usize> = (0..ds.len()).collect();
            let mut x = seed | 1;
            for i in (1..order.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                order.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut a = Assembler::new(1 << 24);
            let now = Instant::now();
            let mut got = None;
            for &i in order.iter().skip(lose) {
                if let Some(r) = a.offer(parse(ds[i].clone()).unwrap(), now).unwrap() {
                    got = Some(r);
                }
            }
            let (_, _, bytes) = got.expect("rebuilt");
            prop_assert_eq!(&bytes[..], &f[..]);
        }
    }
}
