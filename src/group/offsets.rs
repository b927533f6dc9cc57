//! Committed offsets as records of the internal `__consumer_offsets` topic, in Kafka's own
//! format, so they live in a log like any partition (and can be mirrored to other regions).
//!
//! Key (version 1): `i16 version, string group, string topic, i32 partition`.
//! Value (version 3): `i16 version, i64 offset, i32 leader epoch, string metadata,
//! i64 commit timestamp`. A deleted offset is a record with a null value (a tombstone).
//! Strings are `i16 length + bytes`, big-endian, as in Kafka.

use super::Committed;
use crate::batch::build::Record;
use crate::batch::RecordView;

/// The internal topic that holds committed offsets.
pub const TOPIC: &str = "__consumer_offsets";

pub(super) fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as i16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

pub(super) struct Reader<'a> {
    pub(super) b: &'a [u8],
    pub(super) at: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    pub(super) fn i16(&mut self) -> Option<i16> {
        Some(i16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    pub(super) fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    pub(super) fn i64(&mut self) -> Option<i64> {
        Some(i64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    pub(super) fn string(&mut self) -> Option<String> {
        let n = self.i16()?;
        if n < 0 {
            return Some(String::new());
        }
        String::from_utf8(self.take(n as usize)?.to_vec()).ok()
    }
}

/// The record for a commit (or, with `None`, a tombstone deleting it).
pub fn record(group: &str, topic: &str, partition: i32, c: Option<&Committed>) -> Record {
    let mut key = Vec::new();
    key.extend_from_slice(&1i16.to_be_bytes());
    put_str(&mut key, group);
    put_str(&mut key, topic);
    key.extend_from_slice(&partition.to_be_bytes());
    let value = c.map(|c| {
        let mut v = Vec::new();
        v.extend_from_slice(&3i16.to_be_bytes());
        v.extend_from_slice(&c.offset.to_be_bytes());
        v.extend_from_slice(&c.leader_epoch.to_be_bytes());
        put_str(&mut v, &c.metadata);
        v.extend_from_slice(&c.commit_timestamp.to_be_bytes());
        v
    });
    Record {
        key: Some(key),
        value,
        headers: Vec::new(),
        timestamp_delta: 0,
    }
}

/// An offset record read back: (group, topic, partition, the commit or `None` if deleted).
/// Other record kinds (Kafka's group metadata, key version 2: [`super::snapshot`]) are skipped.
pub type OffsetRecord = (String, String, i32, Option<Committed>);

pub fn parse(r: &RecordView<'_>) -> Option<OffsetRecord> {
    let mut k = Reader { b: r.key?, at: 0 };
    let kv = k.i16()?;
    if kv != 0 && kv != 1 {
        return None;
    }
    let group = k.string()?;
    let topic = k.string()?;
    let partition = k.i32()?;
    let Some(value) = r.value else {
        return Some((group, topic, partition, None));
    };
    let mut v = Reader { b: value, at: 0 };
    let vv = v.i16()?;
    let offset = v.i64()?;
    let leader_epoch = if vv >= 3 { v.i32()? } else { -1 };
    let metadata = v.string()?;
    let commit_timestamp = v.i64()?;
    Some((
        group,
        topic,
        partition,
        Some(Committed {
            offset,
            leader_epoch,
            metadata,
            commit_timestamp,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{build, records};

    #[test]
    fn commit_and_tombstone_round_trip() {
        let c = Committed {
            offset: 42,
            leader_epoch: 3,
            metadata: "m".into(),
            commit_timestamp: 1234,
        };
        let b = build::batch(
            0,
            0,
            None,
            &[record("g", "t", 2, Some(&c)), record("g", "t", 2, None)],
        );
        let rs = records(&b).unwrap();
        assert_eq!(parse(&rs[0]), Some(("g".into(), "t".into(), 2, Some(c))));
        assert_eq!(parse(&rs[1]), Some(("g".into(), "t".into(), 2, None)));
    }
}
