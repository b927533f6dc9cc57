//! The log cleaner: one background round after another over every compacted partition of this
//! broker, one pass at a time, so a single offset map (`cleaner_buffer_bytes`) is the memory it
//! ever takes.
//!
//! Owns: scheduling (which partitions, how often), the bound each pass respects (the high
//! watermark: a pass never maps records a leader change could still remove), and the cleaner's
//! metrics. Does not own: the compaction rules ([`crate::log::cleaner`]) or the pass and its
//! atomic swap ([`crate::log::compact`]). The partition lock is held only to plan a pass and to
//! swap its result in; reading and writing segments happens without it, so producers and
//! readers go on meanwhile.
//!
//! Every replica of a partition (followers too, and every region's copy) cleans its own log
//! with the same rules. Cleaning only removes records, and copies take batches byte for byte
//! at their offsets, so every copy holds at each offset either the record the primary wrote
//! there or nothing.

use std::sync::Arc;
use std::time::Duration;

use super::Broker;
use crate::clock::now_ms;

/// What one round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    pub passes: u64,
    pub bytes_read: u64,
    pub bytes_reclaimed: u64,
    pub failures: u64,
}

impl Broker {
    /// Clean every compacted partition that has a pass due, once.
    pub fn clean_round(&self) -> Round {
        let mut round = Round::default();
        let map_bytes = self.config.cleaner_buffer_bytes as usize;
        let mut overdue = Duration::ZERO;
        for t in self.topics() {
            let parts = t.partitions.read().expect("topic lock").clone();
            for p in parts {
                let now = now_ms();
                let job = {
                    let st = p.state.lock().expect("partition lock");
                    // Never past an open transaction: its outcome decides what stays.
                    let bound = st
                        .log
                        .last_stable(st.replica.high_watermark(st.log.next_offset()));
                    match st.log.clean_job(bound, now) {
                        Ok(job) => {
                            if let Ok(Some(c)) = st.log.cleanable(bound, now) {
                                let labels = [
                                    ("topic", t.name.clone()),
                                    ("partition", p.index.to_string()),
                                ];
                                metrics::gauge!("ferry_cleaner_dirty_ratio", &labels)
                                    .set(c.dirty_ratio());
                                overdue = overdue.max(c.overdue);
                            }
                            job
                        }
                        Err(e) => {
                            tracing::error!(topic = %t.name, partition = p.index, error = %e, "planning a compaction failed");
                            round.failures += 1;
                            None
                        }
                    }
                };
                let Some(job) = job else { continue };
                let why = job.cleanable().due;
                let done = match job.run(map_bytes, now) {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::error!(topic = %t.name, partition = p.index, error = %e, "compaction failed: the log is as it was");
                        metrics::counter!("ferry_cleaner_failures_total").increment(1);
                        round.failures += 1;
                        continue;
                    }
                };
                let stats = done.stats;
                let installed = p
                    .state
                    .lock()
                    .expect("partition lock")
                    .log
                    .install_clean(done);
                match installed {
                    Ok(true) => {
                        round.passes += 1;
                        round.bytes_read += stats.bytes_read;
                        round.bytes_reclaimed += stats.bytes_reclaimed();
                        metrics::counter!("ferry_cleaner_passes_total").increment(1);
                        metrics::counter!("ferry_cleaner_bytes_read_total")
                            .increment(stats.bytes_read);
                        metrics::counter!("ferry_cleaner_bytes_reclaimed_total")
                            .increment(stats.bytes_reclaimed());
                        tracing::info!(
                            topic = %t.name,
                            partition = p.index,
                            reason = ?why,
                            bytes_read = stats.bytes_read,
                            bytes_written = stats.bytes_written,
                            keys = stats.keys_mapped,
                            batches_rewritten = stats.batches_rewritten,
                            batches_dropped = stats.batches_dropped,
                            cleaned_to = stats.map_end,
                            "compacted {}-{}: {} of {} bytes reclaimed",
                            t.name,
                            p.index,
                            stats.bytes_reclaimed(),
                            stats.bytes_read
                        );
                    }
                    Ok(false) => {
                        tracing::debug!(topic = %t.name, partition = p.index, "the log changed during compaction: the pass is dropped and runs again");
                    }
                    Err(e) => {
                        tracing::error!(topic = %t.name, partition = p.index, error = %e, "installing a compaction failed");
                        metrics::counter!("ferry_cleaner_failures_total").increment(1);
                        round.failures += 1;
                    }
                }
            }
        }
        metrics::gauge!("ferry_cleaner_max_compaction_delay_seconds").set(overdue.as_secs_f64());
        round
    }
}

/// Run cleaner rounds every `cleaner_interval` until the runtime stops.
pub fn spawn(broker: Arc<Broker>) {
    let every = broker.config.cleaner_interval;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let b = broker.clone();
            let _ = tokio::task::spawn_blocking(move || b.clean_round()).await;
        }
    });
}
