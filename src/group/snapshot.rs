//! A group's membership as a record of `__consumer_offsets`, in Kafka's own format (the
//! GroupMetadata key, version 2, and value, version 3), so a coordinator that takes over (the
//! new leader of the offsets partition in a region cluster, or the same broker after a restart)
//! knows each group's generation, leader, members and their assignments: the members go on
//! heartbeating and committing at the new coordinator without a rebalance, as in Kafka.
//!
//! Key: `i16 version (2), string group`. Value (version 3): `string protocol_type,
//! i32 generation, nullable string protocol, nullable string leader,
//! i64 current_state_timestamp, i32 count, members`; a member: `string member_id,
//! nullable string group_instance_id, string client_id, string client_host,
//! i32 rebalance_timeout, i32 session_timeout, bytes subscription, bytes assignment`
//! (`bytes`: i32 length). A deleted group: the key with a null value.
//!
//! Owns: the encoding. Does not own: when a snapshot is taken or loaded (the
//! [`super::Coordinator`]: `take_snapshots`, `load_group`).

use super::offsets::{put_str, Reader};
use crate::batch::build::Record;
use crate::batch::RecordView;

/// One group as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub protocol_type: String,
    pub generation: i32,
    pub protocol: Option<String>,
    pub leader: Option<String>,
    pub timestamp: i64,
    pub members: Vec<MemberSnapshot>,
}

/// One member as stored: its subscription is its metadata for the group's protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberSnapshot {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub rebalance_timeout_ms: i32,
    pub session_timeout_ms: i32,
    pub subscription: Vec<u8>,
    pub assignment: Vec<u8>,
}

fn put_nullable(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => put_str(out, s),
        None => out.extend_from_slice(&(-1i16).to_be_bytes()),
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as i32).to_be_bytes());
    out.extend_from_slice(b);
}

fn nullable(r: &mut Reader<'_>) -> Option<Option<String>> {
    let save = r.at;
    let n = r.i16()?;
    if n < 0 {
        return Some(None);
    }
    r.at = save;
    Some(Some(r.string()?))
}

fn bytes(r: &mut Reader<'_>) -> Option<Vec<u8>> {
    let n = r.i32()?;
    if n < 0 {
        return Some(Vec::new());
    }
    Some(r.take(n as usize)?.to_vec())
}

/// The record for `group` (or, with `None`, the tombstone of a deleted group).
pub fn record(group: &str, s: Option<&Snapshot>) -> Record {
    let mut key = Vec::new();
    key.extend_from_slice(&2i16.to_be_bytes());
    put_str(&mut key, group);
    let value = s.map(|s| {
        let mut v = Vec::new();
        v.extend_from_slice(&3i16.to_be_bytes());
        put_str(&mut v, &s.protocol_type);
        v.extend_from_slice(&s.generation.to_be_bytes());
        put_nullable(&mut v, s.protocol.as_deref());
        put_nullable(&mut v, s.leader.as_deref());
        v.extend_from_slice(&s.timestamp.to_be_bytes());
        v.extend_from_slice(&(s.members.len() as i32).to_be_bytes());
        for m in &s.members {
            put_str(&mut v, &m.member_id);
            put_nullable(&mut v, m.instance_id.as_deref());
            put_str(&mut v, &m.client_id);
            put_str(&mut v, &m.client_host);
            v.extend_from_slice(&m.rebalance_timeout_ms.to_be_bytes());
            v.extend_from_slice(&m.session_timeout_ms.to_be_bytes());
            put_bytes(&mut v, &m.subscription);
            put_bytes(&mut v, &m.assignment);
        }
        v
    });
    Record {
        key: Some(key),
        value,
        headers: Vec::new(),
        timestamp_delta: 0,
    }
}

/// A group record read back: (group, its snapshot or `None` if deleted). Offset records
/// (key versions 0 and 1) and anything unreadable are `None`.
pub fn parse(r: &RecordView<'_>) -> Option<(String, Option<Snapshot>)> {
    let mut k = Reader { b: r.key?, at: 0 };
    if k.i16()? != 2 {
        return None;
    }
    let group = k.string()?;
    let Some(value) = r.value else {
        return Some((group, None));
    };
    let mut v = Reader { b: value, at: 0 };
    let version = v.i16()?;
    if !(0..=3).contains(&version) {
        return None;
    }
    let protocol_type = v.string()?;
    let generation = v.i32()?;
    let protocol = nullable(&mut v)?;
    let leader = nullable(&mut v)?;
    let timestamp = if version >= 2 { v.i64()? } else { -1 };
    let n = v.i32()?;
    let mut members = Vec::with_capacity(n.clamp(0, 1024) as usize);
    for _ in 0..n.max(0) {
        let member_id = v.string()?;
        let instance_id = if version >= 3 {
            nullable(&mut v)?
        } else {
            None
        };
        let client_id = v.string()?;
        let client_host = v.string()?;
        let rebalance_timeout_ms = if version >= 1 { v.i32()? } else { -1 };
        let session_timeout_ms = v.i32()?;
        let rebalance_timeout_ms = if version >= 1 {
            rebalance_timeout_ms
        } else {
            session_timeout_ms
        };
        members.push(MemberSnapshot {
            member_id,
            instance_id,
            client_id,
            client_host,
            rebalance_timeout_ms,
            session_timeout_ms,
            subscription: bytes(&mut v)?,
            assignment: bytes(&mut v)?,
        });
    }
    Some((
        group,
        Some(Snapshot {
            protocol_type,
            generation,
            protocol,
            leader,
            timestamp,
            members,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{build, records};

    #[test]
    fn a_group_and_its_tombstone_round_trip_and_offsets_parsers_skip_them() {
        let s = Snapshot {
            protocol_type: "consumer".into(),
            generation: 7,
            protocol: Some("range".into()),
            leader: Some("m-1".into()),
            timestamp: 99,
            members: vec![
                MemberSnapshot {
                    member_id: "m-1".into(),
                    instance_id: None,
                    client_id: "c".into(),
                    client_host: "/127.0.0.1".into(),
                    rebalance_timeout_ms: 300_000,
                    session_timeout_ms: 10_000,
                    subscription: vec![0, 1, 2],
                    assignment: vec![9; 40],
                },
                MemberSnapshot {
                    member_id: "m-2".into(),
                    instance_id: Some("static-2".into()),
                    client_id: "c".into(),
                    client_host: "/127.0.0.1".into(),
                    rebalance_timeout_ms: 1,
                    session_timeout_ms: 2,
                    subscription: Vec::new(),
                    assignment: Vec::new(),
                },
            ],
        };
        let b = build::batch(0, 0, None, &[record("g", Some(&s)), record("g", None)]);
        let rs = records(&b).unwrap();
        assert_eq!(parse(&rs[0]), Some(("g".into(), Some(s))));
        assert_eq!(parse(&rs[1]), Some(("g".into(), None)));
        assert_eq!(super::super::offsets::parse(&rs[0]), None);
        let o = build::batch(
            0,
            0,
            None,
            &[super::super::offsets::record("g", "t", 0, None)],
        );
        assert_eq!(parse(&records(&o).unwrap()[0]), None);
    }
}
