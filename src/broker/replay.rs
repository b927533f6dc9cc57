//! Reading an internal topic's log (`__consumer_offsets`, `__transaction_state`) from its start,
//! batch by batch, to rebuild a coordinator's state.
//!
//! Owns: walking the log under the partition lock and decoding each batch's records. Does not
//! own: what the records mean (the group and transaction coordinators' shells).

use crate::batch::{self, BatchHeader, RecordView};

use super::Partition;

/// Visit every batch of `p` in order, with its records (those at or past where the walk is:
/// the log start may lie inside the first batch). Control batches come too, so a reader can
/// settle the transactions the log holds. An unreadable batch is skipped with a warning.
pub fn for_each_batch(p: &Partition, mut f: impl FnMut(&BatchHeader, &[RecordView<'_>])) {
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
                    let from = rs
                        .iter()
                        .position(|r| r.offset >= offset)
                        .unwrap_or(rs.len());
                    f(&h, &rs[from..]);
                }
                Err(e) => {
                    tracing::warn!(topic = %p.topic, offset = h.base_offset, error = %e, "skipping an unreadable batch of an internal topic")
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
