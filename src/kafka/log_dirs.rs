//! DescribeLogDirs: this broker's one log directory (its data dir), with the size of every
//! partition it holds a replica of, and the directory's total and usable bytes (v4). Kafka's
//! `kafka-log-dirs.sh --describe` and admin clients ask every broker and add the answers up.

use kafka_protocol::messages::describe_log_dirs_request::DescribeLogDirsRequest;
use kafka_protocol::messages::describe_log_dirs_response::{
    DescribeLogDirsPartition, DescribeLogDirsResponse, DescribeLogDirsResult, DescribeLogDirsTopic,
};
use kafka_protocol::messages::TopicName;

use super::sb;
use crate::broker::Broker;
use crate::replica::Replica;

pub fn handle(
    broker: &Broker,
    req: DescribeLogDirsRequest,
    version: i16,
) -> DescribeLogDirsResponse {
    let wanted: Option<Vec<(String, Vec<i32>)>> = req.topics.map(|ts| {
        ts.into_iter()
            .map(|t| (t.topic.0.to_string(), t.partitions))
            .collect()
    });
    let mut dir = DescribeLogDirsResult::default();
    dir.log_dir = sb(&broker.config.data_dir.display().to_string());
    for topic in broker.topics() {
        let only: Option<&Vec<i32>> = match &wanted {
            None => None,
            Some(w) => match w.iter().find(|(n, _)| *n == topic.name) {
                Some((_, ps)) => Some(ps),
                None => continue,
            },
        };
        let mut t = DescribeLogDirsTopic::default();
        t.name = TopicName(sb(&topic.name));
        for p in topic.partitions.read().expect("topic lock").iter() {
            if only.is_some_and(|ps| !ps.contains(&p.index)) {
                continue;
            }
            let st = p.state.lock().expect("partition lock");
            if matches!(st.replica, Replica::Absent { .. }) {
                continue; // not a replica here
            }
            let mut dp = DescribeLogDirsPartition::default();
            dp.partition_index = p.index;
            dp.partition_size = st.log.size_bytes() as i64;
            dp.offset_lag = (st.high_watermark() - st.log.next_offset()).max(0);
            t.partitions.push(dp);
        }
        if !t.partitions.is_empty() {
            dir.topics.push(t);
        }
    }
    if version >= 4 {
        match rustix::fs::statvfs(&broker.config.data_dir) {
            Ok(s) => {
                dir.total_bytes = (s.f_blocks * s.f_frsize) as i64;
                dir.usable_bytes = (s.f_bavail * s.f_frsize) as i64;
            }
            Err(_) => {
                dir.total_bytes = -1;
                dir.usable_bytes = -1;
            }
        }
    }
    let mut resp = DescribeLogDirsResponse::default();
    resp.results.push(dir);
    resp
}
