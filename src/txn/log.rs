//! The records of `__transaction_state`, in Kafka's format (`TransactionLogKey` version 0 and
//! `TransactionLogValue` version 0), so each transactional id's latest state is one compacted
//! record, and a coordinator taking over replays it.
//!
//! Owns: encoding and decoding of a key and a value. Does not own: what the states mean
//! ([`super::Coordinator`]) or writing them (the broker's shell).

use std::collections::BTreeSet;

use super::{Status, TxnMeta};

/// The internal topic of transaction states.
pub const TOPIC: &str = "__transaction_state";

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as i16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.buf.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn i8(&mut self) -> Option<i8> {
        Some(self.take(1)?[0] as i8)
    }
    fn i16(&mut self) -> Option<i16> {
        Some(i16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<String> {
        let n = self.i16()?;
        if n < 0 {
            return None;
        }
        String::from_utf8(self.take(n as usize)?.to_vec()).ok()
    }
}

/// The record key of a transactional id.
pub fn key(transactional_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + transactional_id.len());
    k.extend_from_slice(&0i16.to_be_bytes());
    put_str(&mut k, transactional_id);
    k
}

/// The transactional id of a record key (`None`: not a version 0 key).
pub fn parse_key(k: &[u8]) -> Option<String> {
    let mut r = Reader { buf: k, at: 0 };
    if r.i16()? != 0 {
        return None;
    }
    r.string()
}

/// The record value of a transaction's state.
pub fn value(m: &TxnMeta) -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    v.extend_from_slice(&0i16.to_be_bytes());
    v.extend_from_slice(&m.producer_id.to_be_bytes());
    v.extend_from_slice(&m.epoch.to_be_bytes());
    v.extend_from_slice(&m.timeout_ms.to_be_bytes());
    v.push(m.status as u8);
    // Partitions grouped by topic, as Kafka writes them.
    let mut topics: Vec<(&str, Vec<i32>)> = Vec::new();
    for (t, p) in &m.partitions {
        match topics.last_mut() {
            Some((last, ps)) if *last == t.as_str() => ps.push(*p),
            _ => topics.push((t.as_str(), vec![*p])),
        }
    }
    v.extend_from_slice(&(topics.len() as i32).to_be_bytes());
    for (t, ps) in topics {
        put_str(&mut v, t);
        v.extend_from_slice(&(ps.len() as i32).to_be_bytes());
        for p in ps {
            v.extend_from_slice(&p.to_be_bytes());
        }
    }
    v.extend_from_slice(&m.update_ms.to_be_bytes());
    v.extend_from_slice(&m.start_ms.to_be_bytes());
    v
}

/// A transaction's state from a version 0 value (`None`: not one).
pub fn parse_value(v: &[u8]) -> Option<TxnMeta> {
    let mut r = Reader { buf: v, at: 0 };
    if r.i16()? != 0 {
        return None;
    }
    let producer_id = r.i64()?;
    let epoch = r.i16()?;
    let timeout_ms = r.i32()?;
    let status = Status::from_id(r.i8()?)?;
    let mut partitions = BTreeSet::new();
    let topics = r.i32()?;
    for _ in 0..topics.max(0) {
        let t = r.string()?;
        let n = r.i32()?;
        for _ in 0..n.max(0) {
            partitions.insert((t.clone(), r.i32()?));
        }
    }
    let update_ms = r.i64()?;
    let start_ms = r.i64()?;
    Some(TxnMeta {
        producer_id,
        epoch,
        last_producer_id: -1,
        last_epoch: -1,
        timeout_ms,
        status,
        partitions,
        start_ms,
        update_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_round_trip_in_kafkas_layout() {
        let k = key("orders-app");
        assert_eq!(
            &k[..4],
            &[0, 0, 0, 10],
            "version 0, then an int16-length string"
        );
        assert_eq!(parse_key(&k).as_deref(), Some("orders-app"));
        let m = TxnMeta {
            producer_id: 4242,
            epoch: 3,
            last_producer_id: -1,
            last_epoch: -1,
            timeout_ms: 60_000,
            status: Status::PrepareCommit,
            partitions: [
                ("a".to_string(), 0),
                ("a".to_string(), 2),
                ("b".to_string(), 1),
            ]
            .into_iter()
            .collect(),
            start_ms: 1000,
            update_ms: 2000,
        };
        let v = value(&m);
        // version, pid, epoch, timeout, status
        assert_eq!(&v[..2], &[0, 0]);
        assert_eq!(v[16], Status::PrepareCommit as u8);
        assert_eq!(&v[17..21], &2i32.to_be_bytes(), "two topics");
        assert_eq!(parse_value(&v), Some(m));
        assert_eq!(
            parse_value(&v[..v.len() - 1]),
            None,
            "a short value is refused"
        );
    }
}
