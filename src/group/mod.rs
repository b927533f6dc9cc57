//! The group coordinator: Kafka's classic consumer group protocol as a state machine.
//!
//! Owns: group membership, generations, the rebalance state machine (Empty → PreparingRebalance
//! → CompletingRebalance → Stable), session and rebalance timeouts, static membership
//! (`group.instance.id`), and the committed offsets in memory. Does not own: I/O. Calls take
//! `now_ms` and return results at once, or a [`Token`] whose answer comes later as a
//! [`Reply`] from [`Coordinator::take_replies`] (JoinGroup waits for the rebalance, SyncGroup
//! for the leader's assignment). The async shell in [`crate::kafka::groups`] keeps the channels;
//! [`offsets`] turns commits into records of the `__consumer_offsets` topic and back.
//!
//! The partition assignment itself is computed by the group leader's client (range,
//! round-robin, cooperative-sticky: whatever the clients agree on); the coordinator only picks the
//! protocol every member supports and relays the leader's assignment.

pub mod offsets;
pub mod snapshot;

use std::collections::{BTreeMap, HashMap};

/// Kafka error codes of the group APIs.
pub mod code {
    pub const NONE: i16 = 0;
    pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
    pub const COORDINATOR_NOT_AVAILABLE: i16 = 15;
    pub const NOT_COORDINATOR: i16 = 16;
    pub const ILLEGAL_GENERATION: i16 = 22;
    pub const INCONSISTENT_GROUP_PROTOCOL: i16 = 23;
    pub const INVALID_GROUP_ID: i16 = 24;
    pub const UNKNOWN_MEMBER_ID: i16 = 25;
    pub const INVALID_SESSION_TIMEOUT: i16 = 26;
    pub const REBALANCE_IN_PROGRESS: i16 = 27;
    pub const GROUP_ID_NOT_FOUND: i16 = 69;
    pub const NON_EMPTY_GROUP: i16 = 68;
    pub const MEMBER_ID_REQUIRED: i16 = 79;
    pub const FENCED_INSTANCE_ID: i16 = 82;
    pub const GROUP_SUBSCRIBED_TO_TOPIC: i16 = 86;
}

/// Settings of the coordinator (Kafka's `group.*` broker settings).
#[derive(Debug, Clone)]
pub struct GroupConfig {
    pub session_timeout_min_ms: i64,
    pub session_timeout_max_ms: i64,
    /// Wait this long after the first member joins an empty group for others (Kafka:
    /// `group.initial.rebalance.delay.ms`).
    pub initial_rebalance_delay_ms: i64,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            session_timeout_min_ms: 6_000,
            session_timeout_max_ms: 1_800_000,
            initial_rebalance_delay_ms: 1_000,
        }
    }
}

/// Identifies a request whose answer is deferred.
pub type Token = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl GroupState {
    pub fn name(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Member {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i64,
    pub rebalance_timeout_ms: i64,
    pub protocol_type: String,
    /// (protocol name, metadata) in the member's order of preference.
    pub protocols: Vec<(String, Vec<u8>)>,
    pub assignment: Vec<u8>,
    last_heard_ms: i64,
    pending_join: Option<(Token, i16)>,
    pending_sync: Option<Token>,
}

/// A committed offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: String,
    pub commit_timestamp: i64,
}

#[derive(Debug)]
pub struct Group {
    pub id: String,
    pub state: GroupState,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol: Option<String>,
    pub leader: Option<String>,
    pub members: BTreeMap<String, Member>,
    /// When the current rebalance must finish (members that have not rejoined are dropped).
    rebalance_deadline_ms: i64,
    /// Earliest moment the rebalance may finish (initial delay for a new group).
    rebalance_not_before_ms: i64,
    pub offsets: BTreeMap<(String, i32), Committed>,
    /// Member ids handed out with MEMBER_ID_REQUIRED, valid until the given time.
    pending_members: BTreeMap<String, i64>,
    /// The (generation, member count) of the last snapshot written or loaded
    /// ([`Coordinator::take_snapshots`]).
    persisted: Option<(i32, usize)>,
}

impl Group {
    fn new(id: &str) -> Group {
        Group {
            id: id.to_string(),
            state: GroupState::Empty,
            generation: 0,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: BTreeMap::new(),
            rebalance_deadline_ms: 0,
            rebalance_not_before_ms: 0,
            offsets: BTreeMap::new(),
            pending_members: BTreeMap::new(),
            persisted: None,
        }
    }

    /// Topics the members subscribe to cannot be read without decoding the consumer protocol
    /// metadata; the group counts as subscribed to every topic it has offsets for while it has
    /// members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// The answer to a JoinGroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinResult {
    pub error: i16,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub leader: String,
    pub member_id: String,
    /// Only for the leader: every member with its metadata for the chosen protocol.
    pub members: Vec<(String, Option<String>, Vec<u8>)>,
}

/// The answer to a SyncGroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncResult {
    pub error: i16,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub assignment: Vec<u8>,
}

/// A deferred answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Join(Token, JoinResult),
    Sync(Token, SyncResult),
}

/// A JoinGroup request.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub group_id: String,
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i64,
    pub rebalance_timeout_ms: i64,
    pub protocol_type: String,
    pub protocols: Vec<(String, Vec<u8>)>,
    /// JoinGroup v4+ asks for MEMBER_ID_REQUIRED on a first join.
    pub version: i16,
}

/// The coordinator of every group on this broker.
#[derive(Debug, Default)]
pub struct Coordinator {
    pub config: GroupConfig,
    groups: HashMap<String, Group>,
    replies: Vec<Reply>,
    next_member: u64,
}

fn join_error(error: i16, member_id: &str) -> JoinResult {
    JoinResult {
        error,
        generation: -1,
        protocol_type: None,
        protocol_name: None,
        leader: String::new(),
        member_id: member_id.to_string(),
        members: Vec::new(),
    }
}

fn sync_error(error: i16) -> SyncResult {
    SyncResult {
        error,
        protocol_type: None,
        protocol_name: None,
        assignment: Vec::new(),
    }
}

impl Coordinator {
    pub fn new(config: GroupConfig) -> Coordinator {
        Coordinator {
            config,
            ..Default::default()
        }
    }

    /// Answers that became ready since the last call.
    pub fn take_replies(&mut self) -> Vec<Reply> {
        std::mem::take(&mut self.replies)
    }

    pub fn group(&self, id: &str) -> Option<&Group> {
        self.groups.get(id)
    }

    pub fn groups(&self) -> impl Iterator<Item = &Group> {
        self.groups.values()
    }

    fn new_member_id(&mut self, client_id: &str) -> String {
        self.next_member += 1;
        format!("{client_id}-{}", uuid::Uuid::new_v4())
    }

    /// JoinGroup. Returns the answer now, or `None` when it comes later through a [`Reply`].
    pub fn join(&mut self, now_ms: i64, token: Token, req: JoinRequest) -> Option<JoinResult> {
        if req.group_id.is_empty() {
            return Some(join_error(code::INVALID_GROUP_ID, &req.member_id));
        }
        if req.session_timeout_ms < self.config.session_timeout_min_ms
            || req.session_timeout_ms > self.config.session_timeout_max_ms
        {
            return Some(join_error(code::INVALID_SESSION_TIMEOUT, &req.member_id));
        }
        if req.protocols.is_empty() || req.protocol_type.is_empty() {
            return Some(join_error(
                code::INCONSISTENT_GROUP_PROTOCOL,
                &req.member_id,
            ));
        }
        let delay = self.config.initial_rebalance_delay_ms;
        let new_id = if req.member_id.is_empty() {
            Some(self.new_member_id(&req.client_id))
        } else {
            None
        };
        let group = self
            .groups
            .entry(req.group_id.clone())
            .or_insert_with(|| Group::new(&req.group_id));
        if let Some(pt) = &group.protocol_type {
            if !group.members.is_empty() && *pt != req.protocol_type {
                return Some(join_error(
                    code::INCONSISTENT_GROUP_PROTOCOL,
                    &req.member_id,
                ));
            }
        }
        if !group.members.is_empty()
            && !group.members.values().all(|m| {
                m.protocols
                    .iter()
                    .any(|(n, _)| req.protocols.iter().any(|(rn, _)| rn == n))
            })
        {
            return Some(join_error(
                code::INCONSISTENT_GROUP_PROTOCOL,
                &req.member_id,
            ));
        }

        let member_id = match (&new_id, &req.instance_id) {
            // A static member: the instance id names it; a new member id replaces the old one,
            // fencing the previous incarnation.
            (_, Some(instance)) => {
                let old = group
                    .members
                    .values()
                    .find(|m| m.instance_id.as_deref() == Some(instance))
                    .map(|m| m.member_id.clone());
                match (old, new_id.clone()) {
                    (Some(old), Some(fresh)) => {
                        let mut m = group.members.remove(&old).expect("present");
                        if let Some((t, _)) = m.pending_join.take() {
                            self.replies
                                .push(Reply::Join(t, join_error(code::FENCED_INSTANCE_ID, &old)));
                        }
                        if let Some(t) = m.pending_sync.take() {
                            self.replies
                                .push(Reply::Sync(t, sync_error(code::FENCED_INSTANCE_ID)));
                        }
                        if group.leader.as_deref() == Some(old.as_str()) {
                            group.leader = Some(fresh.clone());
                        }
                        m.member_id = fresh.clone();
                        group.members.insert(fresh.clone(), m);
                        fresh
                    }
                    (Some(old), None) if old != req.member_id => {
                        return Some(join_error(code::FENCED_INSTANCE_ID, &req.member_id));
                    }
                    (Some(old), None) => old,
                    (None, Some(fresh)) => fresh,
                    (None, None) => req.member_id.clone(),
                }
            }
            (Some(fresh), None) => {
                if req.version >= 4 {
                    // KIP-394: hand out the id and let the client join again with it, so a
                    // member that never comes back leaves no trace.
                    group
                        .pending_members
                        .insert(fresh.clone(), now_ms + req.session_timeout_ms);
                    return Some(join_error(code::MEMBER_ID_REQUIRED, fresh));
                }
                fresh.clone()
            }
            (None, None) => {
                let handed_out = group.pending_members.remove(&req.member_id).is_some();
                if !handed_out && !group.members.contains_key(&req.member_id) {
                    // An id we did not hand out, or one that expired.
                    if req.version >= 4
                        || !group.members.is_empty()
                        || group.state != GroupState::Empty
                    {
                        return Some(join_error(code::UNKNOWN_MEMBER_ID, &req.member_id));
                    }
                }
                req.member_id.clone()
            }
        };

        let known = group.members.get(&member_id).cloned();
        let unchanged = known
            .as_ref()
            .map(|m| m.protocols == req.protocols)
            .unwrap_or(false);
        let member = group
            .members
            .entry(member_id.clone())
            .or_insert_with(|| Member {
                member_id: member_id.clone(),
                instance_id: req.instance_id.clone(),
                client_id: req.client_id.clone(),
                client_host: req.client_host.clone(),
                session_timeout_ms: req.session_timeout_ms,
                rebalance_timeout_ms: req.rebalance_timeout_ms,
                protocol_type: req.protocol_type.clone(),
                protocols: req.protocols.clone(),
                assignment: Vec::new(),
                last_heard_ms: now_ms,
                pending_join: None,
                pending_sync: None,
            });
        member.protocols = req.protocols.clone();
        member.session_timeout_ms = req.session_timeout_ms;
        member.rebalance_timeout_ms = req.rebalance_timeout_ms;
        member.client_id = req.client_id.clone();
        member.last_heard_ms = now_ms;
        if let Some((t, _)) = member.pending_join.replace((token, req.version)) {
            // A second join while the first waits: the first is superseded.
            self.replies.push(Reply::Join(
                t,
                join_error(code::REBALANCE_IN_PROGRESS, &member_id),
            ));
        }
        group.protocol_type = Some(req.protocol_type.clone());

        match group.state {
            GroupState::Stable
                if unchanged && group.leader.as_deref() != Some(member_id.as_str()) =>
            {
                // A follower rejoining with nothing new: answer with the current generation.
                let m = group.members.get_mut(&member_id).expect("present");
                m.pending_join = None;
                return Some(JoinResult {
                    error: code::NONE,
                    generation: group.generation,
                    protocol_type: group.protocol_type.clone(),
                    protocol_name: group.protocol.clone(),
                    leader: group.leader.clone().unwrap_or_default(),
                    member_id,
                    members: Vec::new(),
                });
            }
            GroupState::Empty => {
                group.rebalance_not_before_ms = now_ms + delay;
                prepare_rebalance(group, now_ms, &mut self.replies);
            }
            GroupState::Stable | GroupState::CompletingRebalance => {
                group.rebalance_not_before_ms = now_ms;
                prepare_rebalance(group, now_ms, &mut self.replies);
            }
            GroupState::PreparingRebalance => {}
        }
        try_complete_join(group, now_ms, &mut self.replies);
        None
    }

    /// SyncGroup. Returns the answer now, or `None` when it comes later.
    pub fn sync(
        &mut self,
        now_ms: i64,
        token: Token,
        group_id: &str,
        generation: i32,
        member_id: &str,
        assignments: Vec<(String, Vec<u8>)>,
    ) -> Option<SyncResult> {
        let Some(group) = self.groups.get_mut(group_id) else {
            return Some(sync_error(code::UNKNOWN_MEMBER_ID));
        };
        let Some(member) = group.members.get_mut(member_id) else {
            return Some(sync_error(code::UNKNOWN_MEMBER_ID));
        };
        member.last_heard_ms = now_ms;
        if generation != group.generation {
            return Some(sync_error(code::ILLEGAL_GENERATION));
        }
        match group.state {
            GroupState::Empty => Some(sync_error(code::UNKNOWN_MEMBER_ID)),
            GroupState::PreparingRebalance => Some(sync_error(code::REBALANCE_IN_PROGRESS)),
            GroupState::Stable => Some(SyncResult {
                error: code::NONE,
                protocol_type: group.protocol_type.clone(),
                protocol_name: group.protocol.clone(),
                assignment: member.assignment.clone(),
            }),
            GroupState::CompletingRebalance => {
                member.pending_sync = Some(token);
                if group.leader.as_deref() == Some(member_id) {
                    for m in group.members.values_mut() {
                        m.assignment = Vec::new();
                    }
                    for (mid, a) in assignments {
                        if let Some(m) = group.members.get_mut(&mid) {
                            m.assignment = a;
                        }
                    }
                    group.state = GroupState::Stable;
                    tracing::info!(group = %group.id, generation = group.generation, members = group.members.len(), "group stable");
                    for m in group.members.values_mut() {
                        if let Some(t) = m.pending_sync.take() {
                            self.replies.push(Reply::Sync(
                                t,
                                SyncResult {
                                    error: code::NONE,
                                    protocol_type: group.protocol_type.clone(),
                                    protocol_name: group.protocol.clone(),
                                    assignment: m.assignment.clone(),
                                },
                            ));
                        }
                    }
                }
                None
            }
        }
    }

    /// Heartbeat: keeps the session alive and tells the member when to rejoin.
    pub fn heartbeat(
        &mut self,
        now_ms: i64,
        group_id: &str,
        generation: i32,
        member_id: &str,
    ) -> i16 {
        let Some(group) = self.groups.get_mut(group_id) else {
            return code::UNKNOWN_MEMBER_ID;
        };
        let Some(member) = group.members.get_mut(member_id) else {
            return code::UNKNOWN_MEMBER_ID;
        };
        member.last_heard_ms = now_ms;
        if generation != group.generation {
            return code::ILLEGAL_GENERATION;
        }
        match group.state {
            GroupState::PreparingRebalance => code::REBALANCE_IN_PROGRESS,
            GroupState::Empty => code::UNKNOWN_MEMBER_ID,
            _ => code::NONE,
        }
    }

    /// LeaveGroup for each (member id, instance id); returns an error code per member.
    pub fn leave(
        &mut self,
        now_ms: i64,
        group_id: &str,
        members: &[(String, Option<String>)],
    ) -> Vec<i16> {
        let Some(group) = self.groups.get_mut(group_id) else {
            return members.iter().map(|_| code::UNKNOWN_MEMBER_ID).collect();
        };
        let mut out = Vec::new();
        let mut removed = false;
        for (mid, inst) in members {
            let id = match inst {
                Some(i) => group
                    .members
                    .values()
                    .find(|m| m.instance_id.as_deref() == Some(i.as_str()))
                    .map(|m| m.member_id.clone()),
                None => group.members.contains_key(mid).then(|| mid.clone()),
            };
            match id {
                Some(id) if inst.is_some() && !mid.is_empty() && *mid != id => {
                    out.push(code::FENCED_INSTANCE_ID)
                }
                Some(id) => {
                    remove_member(group, &id, &mut self.replies);
                    removed = true;
                    out.push(code::NONE);
                }
                None => out.push(code::UNKNOWN_MEMBER_ID),
            }
        }
        if removed {
            tracing::info!(group = %group.id, "member left");
            member_gone(group, now_ms, &mut self.replies);
        }
        out
    }

    /// Expire sessions and finish rebalances whose time has come. Call regularly.
    pub fn tick(&mut self, now_ms: i64) {
        for group in self.groups.values_mut() {
            group.pending_members.retain(|_, until| *until > now_ms);
            let expired: Vec<String> = group
                .members
                .values()
                .filter(|m| {
                    let limit = if m.pending_join.is_some() {
                        // Waiting in a join: the rebalance deadline governs.
                        i64::MAX
                    } else {
                        m.last_heard_ms + m.session_timeout_ms
                    };
                    now_ms >= limit
                })
                .map(|m| m.member_id.clone())
                .collect();
            if !expired.is_empty() {
                for id in &expired {
                    tracing::info!(group = %group.id, member = %id, "member session expired");
                    remove_member(group, id, &mut self.replies);
                }
                member_gone(group, now_ms, &mut self.replies);
            }
            if group.state == GroupState::PreparingRebalance {
                try_complete_join(group, now_ms, &mut self.replies);
            }
        }
    }

    /// The next moment [`Coordinator::tick`] has something to do, if any.
    pub fn poll_timeout(&self) -> Option<i64> {
        let mut next: Option<i64> = None;
        let mut take = |t: i64| next = Some(next.map_or(t, |n: i64| n.min(t)));
        for g in self.groups.values() {
            if g.state == GroupState::PreparingRebalance {
                take(g.rebalance_not_before_ms.min(g.rebalance_deadline_ms));
                take(g.rebalance_deadline_ms);
            }
            for m in g.members.values() {
                if m.pending_join.is_none() {
                    take(m.last_heard_ms + m.session_timeout_ms);
                }
            }
        }
        next
    }

    /// Check an OffsetCommit against the group's generation, with Kafka's rules
    /// (`ClassicGroup.validateOffsetCommit`): generation -1 with no member id is a commit from a
    /// client that assigns partitions itself (or an admin tool), allowed only while the group
    /// has no members; otherwise the member must be known and at the current generation.
    /// Commits are accepted while a rebalance is being prepared (clients commit before giving
    /// up their partitions) and refused while the leader's assignment is awaited.
    pub fn check_commit(&self, group_id: &str, generation: i32, member_id: &str) -> i16 {
        let Some(g) = self.groups.get(group_id) else {
            return if generation < 0 {
                code::NONE
            } else {
                code::ILLEGAL_GENERATION
            };
        };
        if generation < 0 && g.state == GroupState::Empty {
            return code::NONE;
        }
        if generation >= 0 || !member_id.is_empty() {
            if !g.members.contains_key(member_id) {
                return code::UNKNOWN_MEMBER_ID;
            }
            if generation != g.generation {
                return code::ILLEGAL_GENERATION;
            }
        } else if g.state != GroupState::Empty {
            return code::UNKNOWN_MEMBER_ID;
        }
        if g.state == GroupState::CompletingRebalance {
            return code::REBALANCE_IN_PROGRESS;
        }
        code::NONE
    }

    /// Record a committed offset (a checked commit, or one replayed from `__consumer_offsets`).
    pub fn apply_commit(
        &mut self,
        group_id: &str,
        topic: &str,
        partition: i32,
        c: Option<Committed>,
    ) {
        let group = self
            .groups
            .entry(group_id.to_string())
            .or_insert_with(|| Group::new(group_id));
        match c {
            Some(c) => {
                group.offsets.insert((topic.to_string(), partition), c);
            }
            None => {
                group.offsets.remove(&(topic.to_string(), partition));
            }
        }
    }

    /// Every group's commit on `topic`-`partition` past `offset` (a log cut back there by a
    /// rejoin must not leave commits pointing beyond its end).
    pub fn commits_past(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Vec<(String, Committed)> {
        let key = (topic.to_string(), partition);
        self.groups
            .iter()
            .filter_map(|(g, grp)| {
                grp.offsets
                    .get(&key)
                    .filter(|c| c.offset > offset)
                    .map(|c| (g.clone(), c.clone()))
            })
            .collect()
    }

    pub fn committed(&self, group_id: &str, topic: &str, partition: i32) -> Option<&Committed> {
        self.groups
            .get(group_id)?
            .offsets
            .get(&(topic.to_string(), partition))
    }

    /// DeleteGroups: only groups without members.
    pub fn delete_group(&mut self, group_id: &str) -> Result<Vec<(String, i32)>, i16> {
        match self.groups.get(group_id) {
            None => Err(code::GROUP_ID_NOT_FOUND),
            Some(g) if !g.members.is_empty() => Err(code::NON_EMPTY_GROUP),
            Some(_) => {
                let g = self.groups.remove(group_id).expect("present");
                Ok(g.offsets.into_keys().collect())
            }
        }
    }

    /// Forget groups that have neither members nor offsets.
    pub fn prune(&mut self) {
        self.groups.retain(|_, g| {
            !g.members.is_empty() || !g.offsets.is_empty() || g.state != GroupState::Empty
        });
    }
}

fn prepare_rebalance(group: &mut Group, now_ms: i64, replies: &mut Vec<Reply>) {
    if group.state == GroupState::CompletingRebalance || group.state == GroupState::Stable {
        // Syncs waiting for an assignment that will not come.
        for m in group.members.values_mut() {
            if let Some(t) = m.pending_sync.take() {
                replies.push(Reply::Sync(t, sync_error(code::REBALANCE_IN_PROGRESS)));
            }
        }
    }
    let timeout = group
        .members
        .values()
        .map(|m| m.rebalance_timeout_ms)
        .max()
        .unwrap_or(0);
    group.rebalance_deadline_ms = now_ms + timeout;
    group.state = GroupState::PreparingRebalance;
    tracing::info!(group = %group.id, generation = group.generation, "preparing rebalance");
}

fn remove_member(group: &mut Group, id: &str, replies: &mut Vec<Reply>) {
    if let Some(mut m) = group.members.remove(id) {
        if let Some((t, _)) = m.pending_join.take() {
            replies.push(Reply::Join(t, join_error(code::UNKNOWN_MEMBER_ID, id)));
        }
        if let Some(t) = m.pending_sync.take() {
            replies.push(Reply::Sync(t, sync_error(code::UNKNOWN_MEMBER_ID)));
        }
    }
    if group.leader.as_deref() == Some(id) {
        group.leader = None;
    }
}

fn member_gone(group: &mut Group, now_ms: i64, replies: &mut Vec<Reply>) {
    if group.members.is_empty() {
        group.state = GroupState::Empty;
        group.generation += 1;
        group.leader = None;
        group.protocol = None;
        return;
    }
    match group.state {
        GroupState::Stable | GroupState::CompletingRebalance => {
            group.rebalance_not_before_ms = now_ms;
            prepare_rebalance(group, now_ms, replies);
        }
        _ => {}
    }
    try_complete_join(group, now_ms, replies);
}

fn try_complete_join(group: &mut Group, now_ms: i64, replies: &mut Vec<Reply>) {
    if group.state != GroupState::PreparingRebalance {
        return;
    }
    let all_joined = group.members.values().all(|m| m.pending_join.is_some());
    let deadline = now_ms >= group.rebalance_deadline_ms;
    if !(deadline || (all_joined && now_ms >= group.rebalance_not_before_ms)) {
        return;
    }
    // Members that did not rejoin in time are dropped.
    let late: Vec<String> = group
        .members
        .values()
        .filter(|m| m.pending_join.is_none())
        .map(|m| m.member_id.clone())
        .collect();
    for id in late {
        tracing::info!(group = %group.id, member = %id, "member did not rejoin in time");
        remove_member(group, &id, replies);
    }
    if group.members.is_empty() {
        group.state = GroupState::Empty;
        group.generation += 1;
        group.protocol = None;
        return;
    }
    // The protocol every member supports, preferring the most votes, then the leader's order.
    let first = group.members.values().next().expect("non-empty");
    let candidates: Vec<String> = first
        .protocols
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| {
            group
                .members
                .values()
                .all(|m| m.protocols.iter().any(|(mn, _)| mn == n))
        })
        .collect();
    let Some(protocol) = candidates
        .iter()
        .max_by_key(|c| {
            let votes = group
                .members
                .values()
                .filter(|m| m.protocols.first().map(|(n, _)| n == *c).unwrap_or(false))
                .count();
            (
                votes,
                std::cmp::Reverse(candidates.iter().position(|x| x == *c)),
            )
        })
        .cloned()
    else {
        for m in group.members.values_mut() {
            if let Some((t, _)) = m.pending_join.take() {
                replies.push(Reply::Join(
                    t,
                    join_error(code::INCONSISTENT_GROUP_PROTOCOL, &m.member_id),
                ));
            }
        }
        return;
    };
    group.generation += 1;
    assert!(group.generation > 0, "generations only grow");
    if group
        .leader
        .as_ref()
        .map(|l| !group.members.contains_key(l))
        .unwrap_or(true)
    {
        group.leader = group.members.keys().next().cloned();
    }
    group.protocol = Some(protocol.clone());
    group.state = GroupState::CompletingRebalance;
    let leader = group.leader.clone().expect("a leader");
    let all: Vec<(String, Option<String>, Vec<u8>)> = group
        .members
        .values()
        .map(|m| {
            let meta = m
                .protocols
                .iter()
                .find(|(n, _)| *n == protocol)
                .map(|(_, d)| d.clone())
                .unwrap_or_default();
            (m.member_id.clone(), m.instance_id.clone(), meta)
        })
        .collect();
    tracing::info!(group = %group.id, generation = group.generation, members = all.len(), %protocol, "rebalance: members joined");
    for m in group.members.values_mut() {
        m.last_heard_ms = now_ms;
        if let Some((t, _)) = m.pending_join.take() {
            replies.push(Reply::Join(
                t,
                JoinResult {
                    error: code::NONE,
                    generation: group.generation,
                    protocol_type: group.protocol_type.clone(),
                    protocol_name: Some(protocol.clone()),
                    leader: leader.clone(),
                    member_id: m.member_id.clone(),
                    members: if m.member_id == leader {
                        all.clone()
                    } else {
                        Vec::new()
                    },
                },
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(group: &str, member: &str, instance: Option<&str>) -> JoinRequest {
        JoinRequest {
            group_id: group.into(),
            member_id: member.into(),
            instance_id: instance.map(|s| s.to_string()),
            client_id: "c".into(),
            client_host: "/127.0.0.1".into(),
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 30_000,
            protocol_type: "consumer".into(),
            protocols: vec![("range".into(), b"meta".to_vec())],
            version: 5,
        }
    }

    fn joins(c: &mut Coordinator) -> Vec<(Token, JoinResult)> {
        c.take_replies()
            .into_iter()
            .filter_map(|r| match r {
                Reply::Join(t, j) => Some((t, j)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn two_members_join_sync_and_a_stale_generation_is_fenced() {
        let mut c = Coordinator::new(GroupConfig::default());
        let r = c.join(0, 1, req("g", "", None)).unwrap();
        assert_eq!(r.error, code::MEMBER_ID_REQUIRED);
        let a = r.member_id;
        assert!(c.join(0, 2, req("g", &a, None)).is_none());
        let r = c.join(10, 3, req("g", "", None)).unwrap();
        let b = r.member_id;
        assert!(c.join(10, 4, req("g", &b, None)).is_none());
        // Both joined, but the initial delay holds the rebalance.
        assert!(joins(&mut c).is_empty());
        c.tick(1_000);
        let js = joins(&mut c);
        assert_eq!(js.len(), 2);
        let gen = js[0].1.generation;
        let leader = js[0].1.leader.clone();
        assert_eq!(js.iter().filter(|(_, j)| !j.members.is_empty()).count(), 1);
        let follower = if leader == a { b.clone() } else { a.clone() };
        assert!(c.sync(1_001, 5, "g", gen, &follower, vec![]).is_none());
        assert!(c
            .sync(
                1_002,
                6,
                "g",
                gen,
                &leader,
                vec![(a.clone(), b"A".to_vec()), (b.clone(), b"B".to_vec())]
            )
            .is_none());
        let syncs = c.take_replies();
        assert_eq!(syncs.len(), 2);
        assert_eq!(c.group("g").unwrap().state, GroupState::Stable);
        assert_eq!(c.heartbeat(1_100, "g", gen, &a), code::NONE);
        assert_eq!(c.check_commit("g", gen - 1, &a), code::ILLEGAL_GENERATION);
        assert_eq!(c.check_commit("g", gen, "nobody"), code::UNKNOWN_MEMBER_ID);
        assert_eq!(c.check_commit("g", gen, &a), code::NONE);
        // b's session expires: a rebalance, and a is told to rejoin.
        for t in [5_000, 9_000] {
            assert_eq!(c.heartbeat(t, "g", gen, &a), code::NONE);
        }
        c.tick(11_500);
        assert_eq!(c.group("g").unwrap().state, GroupState::PreparingRebalance);
        assert_eq!(
            c.heartbeat(11_600, "g", gen, &a),
            code::REBALANCE_IN_PROGRESS
        );
        assert!(c.join(11_700, 7, req("g", &a, None)).is_none());
        let js = joins(&mut c);
        assert_eq!(js.len(), 1);
        assert_eq!(js[0].1.generation, gen + 1);
        assert_eq!(js[0].1.leader, a);
    }

    #[test]
    fn a_coordinator_that_takes_over_carries_a_stable_group_on_without_a_rebalance() {
        let mut c = Coordinator::new(GroupConfig::default());
        let a = c.join(0, 1, req("g", "", None)).unwrap().member_id;
        assert!(c.join(0, 2, req("g", &a, None)).is_none());
        c.tick(1_000);
        let gen = joins(&mut c)[0].1.generation;
        assert!(
            c.take_snapshots(1_000).is_empty(),
            "not at rest before the assignment"
        );
        assert!(c
            .sync(1_001, 3, "g", gen, &a, vec![(a.clone(), b"A".to_vec())])
            .is_none());
        let snaps = c.take_snapshots(1_002);
        assert_eq!(snaps.len(), 1);
        assert!(
            c.take_snapshots(1_003).is_empty(),
            "taken once per generation"
        );
        // Through the log's format, into a fresh coordinator (the next leader).
        let (g, sn) = snaps.into_iter().next().unwrap();
        let b = crate::batch::build::batch(0, 0, None, &[snapshot::record(&g, Some(&sn))]);
        let (g, sn) = snapshot::parse(&crate::batch::records(&b).unwrap()[0]).unwrap();
        let mut next = Coordinator::new(GroupConfig::default());
        next.load_group(50_000, &g, sn);
        assert_eq!(next.group("g").unwrap().state, GroupState::Stable);
        assert_eq!(next.heartbeat(55_000, "g", gen, &a), code::NONE);
        assert_eq!(next.check_commit("g", gen, &a), code::NONE);
        let s = next.sync(55_001, 4, "g", gen, &a, vec![]).unwrap();
        assert_eq!((s.error, s.assignment), (code::NONE, b"A".to_vec()));
        assert!(
            next.take_snapshots(55_002).is_empty(),
            "nothing new to write"
        );
        // Its session runs from the takeover: silent members still expire.
        next.tick(50_000 + 10_000 + 5_000 + 1);
        assert_eq!(
            next.heartbeat(70_000, "g", gen, &a),
            code::UNKNOWN_MEMBER_ID
        );
        // The group came to rest empty: that is written too.
        assert_eq!(next.take_snapshots(70_001).len(), 1);
    }

    #[test]
    fn static_member_rejoin_fences_the_old_incarnation() {
        let mut c = Coordinator::new(GroupConfig::default());
        assert!(c.join(0, 1, req("g", "", Some("i1"))).is_none());
        c.tick(1_000);
        let js = joins(&mut c);
        let old = js[0].1.member_id.clone();
        let gen = js[0].1.generation;
        c.sync(1_000, 2, "g", gen, &old, vec![(old.clone(), b"x".to_vec())]);
        c.take_replies();
        // Restarted with the same instance id: gets a new member id, old one is fenced.
        assert!(c.join(2_000, 3, req("g", "", Some("i1"))).is_none());
        c.tick(2_000);
        let js = joins(&mut c);
        let new = js.last().unwrap().1.member_id.clone();
        assert_ne!(new, old);
        assert_eq!(c.heartbeat(2_100, "g", gen, &old), code::UNKNOWN_MEMBER_ID);
    }

    #[test]
    fn leave_and_delete() {
        let mut c = Coordinator::new(GroupConfig::default());
        let a = c.join(0, 1, req("g", "", None)).unwrap().member_id;
        c.join(0, 2, req("g", &a, None));
        c.tick(1_000);
        c.take_replies();
        assert_eq!(c.delete_group("g"), Err(code::NON_EMPTY_GROUP));
        assert_eq!(c.leave(1_100, "g", &[(a.clone(), None)]), vec![code::NONE]);
        assert_eq!(c.group("g").unwrap().state, GroupState::Empty);
        c.apply_commit(
            "g",
            "t",
            0,
            Some(Committed {
                offset: 5,
                leader_epoch: -1,
                metadata: String::new(),
                commit_timestamp: 1,
            }),
        );
        assert_eq!(c.check_commit("g", -1, ""), code::NONE);
        assert_eq!(c.delete_group("g").unwrap(), vec![("t".to_string(), 0)]);
        assert_eq!(c.delete_group("g"), Err(code::GROUP_ID_NOT_FOUND));
    }

    /// Simulator finding 4: commits past a quarantine cut must move back to it (the broker's
    /// `quarantine_and_truncate` rewrites every commit this returns), or a group moving to the
    /// region skips the records mirrored into the cut range next.
    #[test]
    fn finding_4_the_commits_past_a_cut_are_found_and_only_those() {
        let mut c = Coordinator::new(GroupConfig::default());
        let at = |offset| {
            Some(Committed {
                offset,
                leader_epoch: -1,
                metadata: String::new(),
                commit_timestamp: 0,
            })
        };
        c.apply_commit("a", "t", 0, at(150));
        c.apply_commit("b", "t", 0, at(100));
        c.apply_commit("c", "t", 1, at(500));
        c.apply_commit("d", "u", 0, at(500));
        let past = c.commits_past("t", 0, 100);
        assert_eq!(past.len(), 1);
        assert_eq!((past[0].0.as_str(), past[0].1.offset), ("a", 150));
        assert!(c.commits_past("t", 0, 150).is_empty());
    }
}
