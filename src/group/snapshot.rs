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
//! Owns: the encoding, and the coordinator's side of it: a group's snapshot
//! ([`Group::snapshot`]), which groups came to rest since the last write
//! ([`Coordinator::take_snapshots`]), and loading one back ([`Coordinator::load_group`]).
//! Does not own: writing the records (the shell, `broker::groups`).

use super::offsets::{put_str, Reader};
use super::{Coordinator, Group, GroupState, Member};
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

impl Group {
    /// The group's membership as stored in `__consumer_offsets`.
    pub fn snapshot(&self, now_ms: i64) -> Snapshot {
        Snapshot {
            protocol_type: self.protocol_type.clone().unwrap_or_default(),
            generation: self.generation,
            protocol: self.protocol.clone(),
            leader: self.leader.clone(),
            timestamp: now_ms,
            members: self
                .members
                .values()
                .map(|m| MemberSnapshot {
                    member_id: m.member_id.clone(),
                    instance_id: m.instance_id.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    rebalance_timeout_ms: m.rebalance_timeout_ms as i32,
                    session_timeout_ms: m.session_timeout_ms as i32,
                    subscription: self
                        .protocol
                        .as_ref()
                        .and_then(|p| m.protocols.iter().find(|(n, _)| n == p))
                        .map(|(_, md)| md.clone())
                        .unwrap_or_default(),
                    assignment: m.assignment.clone(),
                })
                .collect(),
        }
    }

    /// Whether the group is at rest (Stable with its assignment, or Empty): the states a
    /// snapshot is taken in.
    fn at_rest(&self) -> bool {
        matches!(self.state, GroupState::Stable | GroupState::Empty)
    }
}

impl Coordinator {
    /// Snapshots of the groups that came to rest (Stable with a new generation's assignment,
    /// or Empty) since the last call: the shell writes them to `__consumer_offsets`.
    pub fn take_snapshots(&mut self, now_ms: i64) -> Vec<(String, Snapshot)> {
        let mut out = Vec::new();
        for g in self.groups.values_mut() {
            let mark = (g.generation, g.members.len());
            if g.at_rest()
                && g.persisted != Some(mark)
                && (g.generation > 0 || !g.members.is_empty())
            {
                g.persisted = Some(mark);
                out.push((g.id.clone(), g.snapshot(now_ms)));
            }
        }
        out
    }

    /// Snapshots of every group at rest that has one (compaction writes them again).
    pub fn snapshots(&self, now_ms: i64) -> Vec<(String, Snapshot)> {
        self.groups
            .values()
            .filter(|g| g.persisted.is_some())
            .map(|g| (g.id.clone(), g.snapshot(now_ms)))
            .collect()
    }

    /// Take a group's membership from `__consumer_offsets` (replay, in log order): Stable with
    /// its members and their assignments if it has any (each session starting `now_ms`), Empty
    /// otherwise; `None` (a deleted group) forgets the membership.
    pub fn load_group(&mut self, now_ms: i64, group_id: &str, s: Option<Snapshot>) {
        let group = self
            .groups
            .entry(group_id.to_string())
            .or_insert_with(|| Group::new(group_id));
        group.members.clear();
        group.pending_members.clear();
        let Some(s) = s else {
            group.state = GroupState::Empty;
            group.leader = None;
            group.persisted = None;
            return;
        };
        group.generation = s.generation;
        group.protocol_type = (!s.protocol_type.is_empty()).then_some(s.protocol_type);
        group.protocol = s.protocol.clone();
        group.leader = s.leader;
        for m in s.members {
            group.members.insert(
                m.member_id.clone(),
                Member {
                    member_id: m.member_id,
                    instance_id: m.instance_id,
                    client_id: m.client_id,
                    client_host: m.client_host,
                    session_timeout_ms: m.session_timeout_ms as i64,
                    rebalance_timeout_ms: m.rebalance_timeout_ms as i64,
                    protocol_type: group.protocol_type.clone().unwrap_or_default(),
                    protocols: s
                        .protocol
                        .iter()
                        .map(|p| (p.clone(), m.subscription.clone()))
                        .collect(),
                    assignment: m.assignment,
                    last_heard_ms: now_ms,
                    pending_join: None,
                    pending_sync: None,
                },
            );
        }
        group.state = if group.members.is_empty() {
            GroupState::Empty
        } else {
            GroupState::Stable
        };
        group.persisted = Some((group.generation, group.members.len()));
    }
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
