//! Consumer group offsets between regions: the primary ships every group's commits of the
//! topics a peer mirrors, every [`super::OFFSET_SYNC_INTERVAL`]; the mirror installs them
//! clamped ([`crate::mirror::core::offsets`]).

use std::sync::Arc;

use tokio::sync::watch;

use super::control::Command;
use super::*;
use crate::client::Client;
use crate::mirror::core::offsets;
use crate::mirror::frame::{self, Frame};

impl Gateway {
    /// Install a group's committed offsets from the primary, each clamped to what this mirror
    /// holds, so a consumer that moves here never skips a record it has not seen.
    pub(super) async fn sink_offsets(
        &self,
        peer: &str,
        first: Frame,
        mut tx: quinn::SendStream,
        mut rx: quinn::RecvStream,
    ) -> Result<(), String> {
        let e = |x: std::io::Error| x.to_string();
        let mut client = self.coordinator_client("ferry-gateway").await?;
        let mut next = Some(first);
        loop {
            let f = match next.take() {
                Some(f) => f,
                None => match frame::read(&mut rx).await.map_err(e)? {
                    Some(f) => f,
                    None => return Ok(()),
                },
            };
            let Frame::Offsets { group, entries } = f else {
                return Err("expected OFFSETS".into());
            };
            let reply = match self
                .install_offsets(&mut client, peer, &group, entries)
                .await
            {
                Ok(n) => {
                    metrics::counter!("ferry_mirror_group_offsets_installed_total")
                        .increment(n as u64);
                    Frame::Ack { log_end: n as i64 }
                }
                Err(message) => {
                    tracing::debug!(%peer, %group, %message, "group offsets not installed");
                    Frame::Error {
                        code: -1,
                        log_end: -1,
                        message,
                    }
                }
            };
            frame::write(&mut tx, &reply).await.map_err(e)?;
        }
    }

    pub(super) async fn install_offsets(
        &self,
        client: &mut Client,
        peer: &str,
        group: &str,
        entries: Vec<(String, i32, i64)>,
    ) -> Result<usize, String> {
        let wanted = offsets::wanted(entries, |t| {
            self.placement(t)
                .is_some_and(|p| p.primary == peer && p.mirrors.contains(&self.region))
        });
        // What the primary last told us it holds (its heartbeat) bounds what is installed.
        let primary = self
            .ask(|reply| Command::Report {
                peer: peer.to_string(),
                reply,
            })
            .await?
            .map(|r| r.heartbeat);
        if primary.is_none() || wanted.is_empty() {
            return Ok(0);
        }
        let mine = self.offsets(wanted.keys().cloned().collect()).await?;
        let commit = offsets::clamped(wanted, primary.as_ref(), &mine.topics);
        let n = commit.values().map(Vec::len).sum();
        if commit.is_empty() {
            return Ok(0);
        }
        client
            .commit_offsets(group, &commit)
            .await
            .map_err(|x| format!("{x} (the group may be active in this region)"))?;
        Ok(n)
    }

    /// Every [`OFFSET_SYNC_INTERVAL`], ship the committed offsets of every group for the topics
    /// `peer` mirrors.
    pub(super) async fn offset_sync(
        self: Arc<Self>,
        peer: String,
        mut conn_rx: watch::Receiver<Option<quinn::Connection>>,
    ) {
        loop {
            let Some(conn) = next_connection(&mut conn_rx).await else {
                return;
            };
            if let Err(e) = self.offset_stream(&conn, &peer).await {
                tracing::debug!(%peer, error = %e, "offset sync interrupted");
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    pub(super) async fn offset_stream(
        &self,
        conn: &quinn::Connection,
        peer: &str,
    ) -> Result<(), String> {
        use kafka_protocol::messages::list_groups_request::ListGroupsRequest;
        use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequest;
        use kafka_protocol::messages::GroupId;
        let e = |x: std::io::Error| x.to_string();
        let (mut tx, mut rx) = conn.open_bi().await.map_err(|x| x.to_string())?;
        // Every group has one coordinator (one `__consumer_offsets` partition): any name finds it.
        let mut client = self.coordinator_client("ferry-gateway").await?;
        loop {
            let groups = client
                .send(&ListGroupsRequest::default(), 4)
                .await
                .map_err(|x| x.to_string())?
                .groups;
            for g in groups {
                let mut of = OffsetFetchRequest::default();
                of.group_id = GroupId(g.group_id.0.clone());
                of.topics = None;
                let resp = client.send(&of, 7).await.map_err(|x| x.to_string())?;
                let entries: Vec<(String, i32, i64)> = resp
                    .topics
                    .into_iter()
                    .filter(|t| self.ships(t.name.0.as_str(), peer))
                    .flat_map(|t| {
                        let name = t.name.0.to_string();
                        t.partitions
                            .into_iter()
                            .filter(|p| p.committed_offset >= 0)
                            .map(move |p| (name.clone(), p.partition_index, p.committed_offset))
                    })
                    .collect();
                if entries.is_empty() {
                    continue;
                }
                let group = g.group_id.0.to_string();
                frame::write(
                    &mut tx,
                    &Frame::Offsets {
                        group: group.clone(),
                        entries,
                    },
                )
                .await
                .map_err(e)?;
                match frame::read(&mut rx).await.map_err(e)? {
                    Some(Frame::Ack { .. }) => {}
                    Some(Frame::Error { message, .. }) => {
                        tracing::debug!(%peer, %group, %message, "peer did not install offsets")
                    }
                    other => return Err(format!("expected ACK, got {other:?}")),
                }
            }
            tokio::time::sleep(OFFSET_SYNC_INTERVAL).await;
        }
    }
}
