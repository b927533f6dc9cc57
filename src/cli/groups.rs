//! `ferry groups`: list consumer groups, describe one (members, assignment, committed offsets
//! and lag per partition), and reset a group's offsets while it has no members.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use kafka_protocol::messages::consumer_protocol_assignment::ConsumerProtocolAssignment;
use kafka_protocol::messages::describe_groups_request::DescribeGroupsRequest;
use kafka_protocol::messages::list_groups_request::ListGroupsRequest;
use kafka_protocol::messages::metadata_request::{MetadataRequest, MetadataRequestTopic};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequest;
use kafka_protocol::messages::{GroupId, TopicName};
use kafka_protocol::protocol::{Decodable, StrBytes};

use crate::client::{error_name, Client};

#[derive(Debug, Args)]
pub struct GroupsArgs {
    /// A broker of the region (HOST:PORT).
    #[arg(long, short = 'b', default_value = "127.0.0.1:9092")]
    pub bootstrap: String,
    #[command(subcommand)]
    pub command: GroupsCommand,
}

#[derive(Debug, Subcommand)]
pub enum GroupsCommand {
    /// List consumer groups with their state.
    List,
    /// Members, assignments, committed offsets and lag of a group.
    Describe { group: String },
    /// Move a group's committed offsets (the group must have no members).
    Reset(ResetArgs),
}

#[derive(Debug, Args)]
pub struct ResetArgs {
    pub group: String,
    /// Topic whose partitions are reset.
    #[arg(long)]
    pub topic: String,
    /// Where to: `earliest`, `latest`, `timestamp:MILLIS` or `offset:N`.
    #[arg(long)]
    pub to: String,
    /// Commit the new offsets (without it, only print the plan).
    #[arg(long)]
    pub execute: bool,
}

fn sb(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

pub fn run(args: GroupsArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut c = Client::connect(&args.bootstrap).await?;
        match args.command {
            GroupsCommand::List => list(&mut c).await,
            GroupsCommand::Describe { group } => describe(&mut c, &group).await,
            GroupsCommand::Reset(r) => reset(&mut c, r).await,
        }
    })
}

async fn list(c: &mut Client) -> anyhow::Result<()> {
    let resp = c.send(&ListGroupsRequest::default(), 4).await?;
    if resp.error_code != 0 {
        bail!("ListGroups failed: {}", error_name(resp.error_code));
    }
    println!("{:<40} {:<22} PROTOCOL TYPE", "GROUP", "STATE");
    for g in resp.groups {
        println!(
            "{:<40} {:<22} {}",
            g.group_id.0.as_str(),
            g.group_state.as_str(),
            g.protocol_type.as_str()
        );
    }
    Ok(())
}

async fn group_state(
    c: &mut Client,
    group: &str,
) -> anyhow::Result<kafka_protocol::messages::describe_groups_response::DescribedGroup> {
    let mut req = DescribeGroupsRequest::default();
    req.groups = vec![GroupId(sb(group))];
    let resp = c.send(&req, 5).await?;
    resp.groups
        .into_iter()
        .next()
        .context("no group in the answer")
}

async fn describe(c: &mut Client, group: &str) -> anyhow::Result<()> {
    let g = group_state(c, group).await?;
    println!(
        "group {group}: state {}, protocol {}",
        g.group_state.as_str(),
        g.protocol_data.as_str()
    );
    let mut owner: BTreeMap<(String, i32), String> = BTreeMap::new();
    if !g.members.is_empty() {
        println!(
            "\n{:<50} {:<20} {:<16} ASSIGNMENT",
            "MEMBER", "CLIENT", "HOST"
        );
    }
    for m in &g.members {
        let mut assigned = Vec::new();
        if m.member_assignment.len() >= 2 {
            let mut b = m.member_assignment.clone();
            let version = i16::from_be_bytes([b[0], b[1]]);
            bytes::Buf::advance(&mut b, 2);
            if let Ok(a) = ConsumerProtocolAssignment::decode(&mut b, version.clamp(0, 3)) {
                for tp in a.assigned_partitions {
                    for p in tp.partitions {
                        assigned.push(format!("{}-{p}", tp.topic.0.as_str()));
                        owner.insert((tp.topic.0.to_string(), p), m.member_id.to_string());
                    }
                }
            }
        }
        println!(
            "{:<50} {:<20} {:<16} {}",
            m.member_id.as_str(),
            m.client_id.as_str(),
            m.client_host.as_str(),
            assigned.join(",")
        );
    }
    let mut req = OffsetFetchRequest::default();
    req.group_id = GroupId(sb(group));
    req.topics = None;
    let resp = c.send(&req, 7).await?;
    println!(
        "\n{:<30} {:>9} {:>14} {:>14} {:>10}  MEMBER",
        "TOPIC", "PARTITION", "COMMITTED", "END", "LAG"
    );
    for t in resp.topics {
        let topic = t.name.0.to_string();
        let parts: Vec<i32> = t.partitions.iter().map(|p| p.partition_index).collect();
        let ends = c.list_offsets(&topic, &parts, -1).await.unwrap_or_default();
        for p in t.partitions {
            let end = ends.get(&p.partition_index).copied().unwrap_or(-1);
            let lag = if p.committed_offset >= 0 && end >= 0 {
                (end - p.committed_offset).to_string()
            } else {
                "-".into()
            };
            println!(
                "{:<30} {:>9} {:>14} {:>14} {:>10}  {}",
                topic,
                p.partition_index,
                p.committed_offset,
                end,
                lag,
                owner
                    .get(&(topic.clone(), p.partition_index))
                    .map(String::as_str)
                    .unwrap_or("-")
            );
        }
    }
    Ok(())
}

async fn reset(c: &mut Client, r: ResetArgs) -> anyhow::Result<()> {
    let g = group_state(c, &r.group).await?;
    let state = g.group_state.to_string();
    if !g.members.is_empty() || !(state == "Empty" || state == "Dead") {
        bail!(
            "group {} has {} members (state {state}): stop its consumers before resetting offsets",
            r.group,
            g.members.len()
        );
    }
    let mut mreq = MetadataRequest::default();
    let mut mt = MetadataRequestTopic::default();
    mt.name = Some(TopicName(sb(&r.topic)));
    mreq.topics = Some(vec![mt]);
    let meta = c.send(&mreq, 4).await?;
    let t = meta
        .topics
        .into_iter()
        .next()
        .context("no topic in Metadata")?;
    if t.error_code != 0 {
        bail!("topic {}: {}", r.topic, error_name(t.error_code));
    }
    let parts: Vec<i32> = t.partitions.iter().map(|p| p.partition_index).collect();
    let targets: BTreeMap<i32, i64> = match r.to.as_str() {
        "earliest" => c.list_offsets(&r.topic, &parts, -2).await?,
        "latest" => c.list_offsets(&r.topic, &parts, -1).await?,
        s if s.starts_with("timestamp:") => {
            let ts: i64 = s["timestamp:".len()..]
                .parse()
                .context("timestamp:MILLIS")?;
            let by_ts = c.list_offsets(&r.topic, &parts, ts).await?;
            let ends = c.list_offsets(&r.topic, &parts, -1).await?;
            // No record at or after the timestamp: the end of the partition.
            by_ts
                .into_iter()
                .map(|(p, o)| (p, if o < 0 { ends[&p] } else { o }))
                .collect()
        }
        s if s.starts_with("offset:") => {
            let o: i64 = s["offset:".len()..].parse().context("offset:N")?;
            let earliest = c.list_offsets(&r.topic, &parts, -2).await?;
            let latest = c.list_offsets(&r.topic, &parts, -1).await?;
            parts
                .iter()
                .map(|p| (*p, o.clamp(earliest[p], latest[p])))
                .collect()
        }
        other => bail!("--to {other}: use earliest, latest, timestamp:MILLIS or offset:N"),
    };
    println!("{:<30} {:>9} {:>14}", "TOPIC", "PARTITION", "NEW OFFSET");
    for (p, o) in &targets {
        println!("{:<30} {:>9} {:>14}", r.topic, p, o);
    }
    if !r.execute {
        println!("(dry run: add --execute to commit these offsets)");
        return Ok(());
    }
    let entries = BTreeMap::from([(
        r.topic.clone(),
        targets.iter().map(|(p, o)| (*p, *o)).collect(),
    )]);
    c.commit_offsets(&r.group, &entries).await?;
    println!("committed");
    Ok(())
}
