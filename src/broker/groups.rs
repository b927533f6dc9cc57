//! The async shell around the group [`Coordinator`]: deferred answers, the clock, and the
//! durable `__consumer_offsets` log.
//!
//! Commits are checked by the coordinator, applied in memory, and written as one batch through
//! the group commit writer with `acks=all`; the client is answered once they are on disk. On
//! start the log is replayed. When the log grows past `compact_bytes`, every live offset is
//! written again at its end and the older segments are deleted, so the topic stays about as
//! large as the set of live offsets.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use super::writer::{AppendRequest, Writer};
use super::Partition;
use crate::batch::{self, build};
use crate::clock::now_ms;
use crate::group::offsets::{self, OffsetRecord};
use crate::group::{
    code, Committed, Coordinator, GroupConfig, JoinRequest, JoinResult, Reply, SyncResult, Token,
};

enum Waiter {
    Join(oneshot::Sender<JoinResult>),
    Sync(oneshot::Sender<SyncResult>),
}

/// Rewrite the offsets log when it is larger than this.
pub const COMPACT_BYTES_DEFAULT: u64 = 64 << 20;

pub struct GroupService {
    coord: Mutex<Coordinator>,
    waiters: Mutex<HashMap<Token, Waiter>>,
    next_token: AtomicU64,
    log: Arc<Partition>,
    writer: Writer,
    pub compact_bytes: u64,
}

impl GroupService {
    /// Replay the offsets log into a new coordinator.
    pub fn open(log: Arc<Partition>, writer: Writer, config: GroupConfig) -> GroupService {
        let mut coord = Coordinator::new(config);
        let mut n = 0u64;
        for_each_offset_record(&log, |(g, t, p, c)| {
            coord.apply_commit(&g, &t, p, c);
            n += 1;
        });
        coord.prune();
        tracing::info!(
            records = n,
            groups = coord.groups().count(),
            "replayed committed offsets"
        );
        GroupService {
            coord: Mutex::new(coord),
            waiters: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(1),
            log,
            writer,
            compact_bytes: COMPACT_BYTES_DEFAULT,
        }
    }

    /// Run the coordinator's clock (session expiry, rebalance deadlines) until the process ends.
    pub fn spawn_ticker(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let replies = {
                    let mut c = me.coord.lock().expect("coordinator lock");
                    c.tick(now_ms());
                    c.take_replies()
                };
                me.dispatch(replies);
            }
        });
    }

    fn dispatch(&self, replies: Vec<Reply>) {
        if replies.is_empty() {
            return;
        }
        let mut w = self.waiters.lock().expect("waiters lock");
        for r in replies {
            match r {
                Reply::Join(t, j) => {
                    if let Some(Waiter::Join(tx)) = w.remove(&t) {
                        let _ = tx.send(j);
                    }
                }
                Reply::Sync(t, s) => {
                    if let Some(Waiter::Sync(tx)) = w.remove(&t) {
                        let _ = tx.send(s);
                    }
                }
            }
        }
    }

    pub fn with<R>(&self, f: impl FnOnce(&Coordinator) -> R) -> R {
        f(&self.coord.lock().expect("coordinator lock"))
    }

    pub async fn join(&self, req: JoinRequest) -> JoinResult {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .expect("waiters lock")
            .insert(token, Waiter::Join(tx));
        let member = req.member_id.clone();
        let (now, replies) = {
            let mut c = self.coord.lock().expect("coordinator lock");
            let r = c.join(now_ms(), token, req);
            (r, c.take_replies())
        };
        if let Some(r) = now {
            self.waiters.lock().expect("waiters lock").remove(&token);
            self.dispatch(replies);
            return r;
        }
        self.dispatch(replies);
        rx.await.unwrap_or_else(|_| JoinResult {
            error: code::COORDINATOR_NOT_AVAILABLE,
            generation: -1,
            protocol_type: None,
            protocol_name: None,
            leader: String::new(),
            member_id: member,
            members: Vec::new(),
        })
    }

    pub async fn sync(
        &self,
        group: &str,
        generation: i32,
        member: &str,
        assignments: Vec<(String, Vec<u8>)>,
    ) -> SyncResult {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .expect("waiters lock")
            .insert(token, Waiter::Sync(tx));
        let (now, replies) = {
            let mut c = self.coord.lock().expect("coordinator lock");
            let r = c.sync(now_ms(), token, group, generation, member, assignments);
            (r, c.take_replies())
        };
        if let Some(r) = now {
            self.waiters.lock().expect("waiters lock").remove(&token);
            self.dispatch(replies);
            return r;
        }
        self.dispatch(replies);
        rx.await.unwrap_or(SyncResult {
            error: code::COORDINATOR_NOT_AVAILABLE,
            protocol_type: None,
            protocol_name: None,
            assignment: Vec::new(),
        })
    }

    pub fn heartbeat(&self, group: &str, generation: i32, member: &str) -> i16 {
        self.coord
            .lock()
            .expect("coordinator lock")
            .heartbeat(now_ms(), group, generation, member)
    }

    pub fn leave(&self, group: &str, members: &[(String, Option<String>)]) -> Vec<i16> {
        let (r, replies) = {
            let mut c = self.coord.lock().expect("coordinator lock");
            let r = c.leave(now_ms(), group, members);
            (r, c.take_replies())
        };
        self.dispatch(replies);
        r
    }

    pub fn check_commit(&self, group: &str, generation: i32, member: &str) -> i16 {
        self.coord
            .lock()
            .expect("coordinator lock")
            .check_commit(group, generation, member)
    }

    /// Apply and durably write commits (or deletions, with `None`). Returns an error code for
    /// the whole write: NONE once the records are on disk.
    pub async fn write(&self, group: &str, entries: Vec<(String, i32, Option<Committed>)>) -> i16 {
        if entries.is_empty() {
            return code::NONE;
        }
        let records: Vec<build::Record> = {
            let mut c = self.coord.lock().expect("coordinator lock");
            entries
                .iter()
                .map(|(t, p, v)| {
                    c.apply_commit(group, t, *p, v.clone());
                    offsets::record(group, t, *p, v.as_ref())
                })
                .collect()
        };
        let bytes = build::batch(0, now_ms(), None, &records);
        let header = batch::validate(&bytes).expect("a batch we built");
        let (tx, rx) = oneshot::channel();
        let req = AppendRequest {
            partition: self.log.clone(),
            bytes: bytes.into(),
            header,
            acks: -1,
            epoch: None,
            exact: false,
            reply: Some(tx),
        };
        if self.writer.submit(req).await.is_err() {
            return code::COORDINATOR_NOT_AVAILABLE;
        }
        match rx.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "writing committed offsets failed");
                return code::COORDINATOR_NOT_AVAILABLE;
            }
            Err(_) => return code::COORDINATOR_NOT_AVAILABLE,
        }
        let size = self
            .log
            .state
            .lock()
            .expect("partition lock")
            .log
            .size_bytes();
        if size > self.compact_bytes {
            self.compact();
        }
        code::NONE
    }

    /// Delete a group without members and all its offsets.
    pub async fn delete_group(&self, group: &str) -> i16 {
        let keys = {
            let mut c = self.coord.lock().expect("coordinator lock");
            c.delete_group(group)
        };
        match keys {
            Err(code) => code,
            Ok(keys) => {
                let entries = keys.into_iter().map(|(t, p)| (t, p, None)).collect();
                let r = self.write(group, entries).await;
                self.coord.lock().expect("coordinator lock").prune();
                r
            }
        }
    }

    /// Write every live offset again at the end of the log and drop the segments before it.
    pub fn compact(&self) {
        // The coordinator lock is held throughout, so no commit is applied between the snapshot
        // and its append (a commit applied later is appended later, and wins on replay).
        let c = self.coord.lock().expect("coordinator lock");
        let mut live: Vec<build::Record> = Vec::new();
        for g in c.groups() {
            for ((t, p), v) in &g.offsets {
                live.push(offsets::record(&g.id, t, *p, Some(v)));
            }
        }
        let mut st = self.log.state.lock().expect("partition lock");
        let result = (|| -> Result<usize, crate::log::LogError> {
            st.log.roll()?;
            let start = st.log.next_offset();
            for chunk in live.chunks(1000) {
                let b = build::batch(0, now_ms(), None, chunk);
                st.log.append(&b, None)?;
            }
            st.log.sync()?;
            st.log.delete_segments_before(start)
        })();
        match result {
            Ok(n) => tracing::info!(
                live = live.len(),
                deleted_segments = n,
                "compacted __consumer_offsets"
            ),
            Err(e) => tracing::error!(error = %e, "compacting __consumer_offsets failed"),
        }
    }
}

/// Read every offset record of the log, in order.
fn for_each_offset_record(p: &Partition, mut f: impl FnMut(OffsetRecord)) {
    let st = p.state.lock().expect("partition lock");
    let mut offset = st.log.start_offset();
    let end = st.log.next_offset();
    while offset < end {
        let slice = match st.log.read(offset, 1 << 20) {
            Ok(Some(s)) => s,
            _ => break,
        };
        let Ok(bytes) = slice.read() else { break };
        let mut progressed = false;
        for (range, h) in batch::whole_batches(&bytes) {
            match batch::records(&bytes[range]) {
                Ok(rs) => {
                    for r in rs.iter().filter(|r| r.offset >= offset) {
                        if let Some(rec) = offsets::parse(r) {
                            f(rec);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(offset = h.base_offset, error = %e, "skipping unreadable batch in __consumer_offsets")
                }
            }
            offset = h.next_offset();
            progressed = true;
        }
        if !progressed {
            break;
        }
    }
}
