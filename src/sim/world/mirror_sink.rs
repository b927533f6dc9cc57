//! Each region's gateway, mirror streams on the mirror's side: the production
//! `mirror::core::sink::SinkStream` behind the model of QUIC's ordered streams, and the
//! MirrorAppend and quarantine of the broker model.

use std::collections::BTreeMap;

use crate::mirror::core::sink::{self, SinkStream, Truncation};
use crate::sim::scenario::TOPIC;

use super::*;

impl World {
    // ---- the gateway: mirror streams, sink side (production: `sink::SinkStream`) ---------

    pub(super) fn on_open(&mut self, m: usize, src: usize, part: usize, session: u64, epoch: i32) {
        let p = self.placement(m);
        let refusal = sink::open_refusal(
            Some(&p),
            &self.regions[m].name,
            &self.regions[src].name,
            TOPIC,
            epoch,
        );
        if refusal.is_some() {
            self.send(m, src, Msg::Refused { session, part });
            return;
        }
        // A second copy of the same OPEN keeps the stream as it is.
        if !self.sink_session_ok(m, src, part, session) {
            let sink = Sink {
                session,
                expected: 0,
                held: BTreeMap::new(),
                core: SinkStream::new(self.regions[m].parts[part].end()),
            };
            self.regions[m].sinks.insert((src, part), sink);
        }
        let pp = &self.regions[m].parts[part];
        let msg = Msg::Position {
            session,
            part,
            log_end: pp.end(),
            epochs: pp.epochs.clone(),
        };
        self.send(m, src, msg);
    }

    pub(super) fn sink_session_ok(&self, m: usize, src: usize, part: usize, session: u64) -> bool {
        self.regions[m]
            .sinks
            .get(&(src, part))
            .is_some_and(|s| s.session == session)
    }

    /// The sink answers ERROR and the stream closes (`sink_stream` returns): later frames of
    /// the session find no stream and are answered with ERROR again.
    pub(super) fn sink_error(&mut self, m: usize, src: usize, part: usize, session: u64) {
        if self.sink_session_ok(m, src, part, session) {
            self.regions[m].sinks.remove(&(src, part));
        }
        self.send(m, src, Msg::Error { session, part });
    }

    pub(super) fn on_truncate(
        &mut self,
        m: usize,
        src: usize,
        part: usize,
        session: u64,
        offset: i64,
    ) {
        if !self.sink_session_ok(m, src, part, session) {
            // Not a stream this process opened (it restarted): the stream is gone.
            self.send(m, src, Msg::Error { session, part });
            return;
        }
        // The broker cuts back only a mirror: a partition that takes client writes here (this
        // region is the unfenced primary) refuses (`quarantine_and_truncate`).
        let pl = self.placement(m);
        if pl.primary == self.regions[m].name && !pl.fenced {
            self.sink_error(m, src, part, session);
            return;
        }
        let end = self.regions[m].parts[part].end();
        let sink = self.regions[m]
            .sinks
            .get_mut(&(src, part))
            .expect("checked");
        // The log may have moved since the sink last looked (another source's stream).
        sink.core.moved(end);
        if let Truncation::Cut(offset) = sink.core.on_truncate(offset.min(end)) {
            let pp = &mut self.regions[m].parts[part];
            let n = pp.end() - offset;
            pp.log.truncate(offset as usize);
            pp.durable = pp.durable.min(offset as usize);
            pp.epochs.retain(|e| e.start_offset < offset);
            self.regions[m].quarantined += n as u64;
            // `quarantine_and_truncate`: every group's commit past the cut moves back to it.
            for v in self.regions[m].groups.values_mut() {
                if let Some(c) = v.get_mut(part) {
                    *c = (*c).min(offset);
                }
            }
            self.stats.quarantined += n as u64;
            self.log(format!(
                "{} quarantines {n} records of p={part} from {offset}",
                self.regions[m].name
            ));
            let sink = self.regions[m]
                .sinks
                .get_mut(&(src, part))
                .expect("checked");
            sink.core.truncated(offset);
        }
        let pp = &self.regions[m].parts[part];
        let msg = Msg::Position {
            session,
            part,
            log_end: pp.end(),
            epochs: pp.epochs.clone(),
        };
        self.send(m, src, msg);
    }

    /// A BATCHES frame off the link, through the model of the QUIC stream: in `seq` order to
    /// the sink, a frame ahead of a missing one held until it arrives, a copy of one already
    /// passed on dropped.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_batches(
        &mut self,
        m: usize,
        src: usize,
        part: usize,
        session: u64,
        seq: u64,
        first: i64,
        records: Vec<Record>,
    ) {
        if !self.sink_session_ok(m, src, part, session) {
            // Not a stream this process opened (it restarted, or it closed the stream with an
            // ERROR): the stream is gone.
            self.send(m, src, Msg::Error { session, part });
            return;
        }
        let per = self.sc.workload.record_bytes.max(1) as usize;
        let log_end = self.regions[m].parts[part].end();
        let sink = self.regions[m]
            .sinks
            .get_mut(&(src, part))
            .expect("the session was checked");
        if seq < sink.expected {
            // A copy of a frame already passed on (the link duplicated it, or the source sent
            // it again because the ACK was lost or late). QUIC drops it; the model answers with
            // the mirror's end once more, which stands in for QUIC resending a lost ACK.
            let ack = Msg::Ack {
                session,
                part,
                log_end,
            };
            self.send(m, src, ack);
            return;
        }
        if seq > sink.expected {
            sink.held.entry(seq).or_insert((first, records));
            return;
        }
        // This frame and the ones held right behind it reach the sink.
        let mut frames = vec![(first, records)];
        sink.expected += 1;
        while let Some(f) = sink.held.remove(&sink.expected) {
            frames.push(f);
            sink.expected += 1;
        }
        for (first, records) in frames {
            let after = first + records.len() as i64;
            let bytes = records.len() * per;
            if let Err(e) = sink.core.on_frame(first, after, Batch { records, bytes }) {
                self.log(format!(
                    "{} p={part}: frame refused: {e}",
                    self.regions[m].name
                ));
                self.sink_error(m, src, part, session);
                return;
            }
        }
        self.append_ready(m, src, part, session);
    }

    /// The gateway's appender: what `SinkStream::next_append` hands out goes into one
    /// MirrorAppend (the broker model below: fsynced before it answers) and one ACK.
    pub(super) fn append_ready(&mut self, m: usize, src: usize, part: usize, session: u64) {
        loop {
            // MirrorAppend accepts only topics whose primary is another region.
            if self.placement(m).primary == self.regions[m].name {
                self.sink_error(m, src, part, session);
                return;
            }
            let end = self.regions[m].parts[part].end();
            let sink = self.regions[m].sinks.get_mut(&(src, part)).expect("open");
            // The log may have moved by another source's stream (`moved`), or been cut below
            // what this sink knows: then its frames no longer continue the log.
            sink.core.moved(end);
            if sink.core.end() > end {
                self.sink_error(m, src, part, session);
                return;
            }
            let Some((parts, after)) = sink.core.next_append() else {
                return;
            };
            match self.mirror_append(m, part, parts) {
                Ok(new_end) => {
                    let sink = self.regions[m].sinks.get_mut(&(src, part)).expect("open");
                    let log_end = sink.core.appended(after, new_end);
                    self.send(
                        m,
                        src,
                        Msg::Ack {
                            session,
                            part,
                            log_end,
                        },
                    );
                }
                Err(()) => {
                    self.sink_error(m, src, part, session);
                    return;
                }
            }
        }
    }

    /// The broker's MirrorAppend, modelled: records the log holds already must agree with it
    /// (`no-divergence` is checked elsewhere; a disagreement refuses the append), the rest go at
    /// their own offsets, fsynced. May fail (`append_failure`). Returns the new log end.
    pub(super) fn mirror_append(
        &mut self,
        m: usize,
        part: usize,
        parts: Vec<Batch>,
    ) -> Result<i64, ()> {
        let end = self.regions[m].parts[part].end();
        let mut new: Vec<Record> = Vec::new();
        for rec in parts.into_iter().flat_map(|b| b.records) {
            let at = end + new.len() as i64;
            if rec.offset < end {
                if self.regions[m].parts[part].log.get(rec.offset as usize) != Some(&rec) {
                    return Err(());
                }
                continue;
            }
            if rec.offset != at {
                return Err(());
            }
            new.push(rec);
        }
        if !new.is_empty() {
            if self.rng.chance(self.sc.faults.append_failure) {
                self.log(format!(
                    "disk: mirror append failed in {}",
                    self.regions[m].name
                ));
                return Err(());
            }
            for rec in &new {
                let pp = &mut self.regions[m].parts[part];
                if observe(&mut pp.epochs, rec.epoch, rec.offset).is_err() {
                    return Err(());
                }
                pp.log.push(*rec);
                let at = pp.end() - 1;
                if rec.offset != at {
                    let msg = format!(
                        "{} p={part}: mirrored offset {} stored at {at}",
                        self.regions[m].name, rec.offset
                    );
                    self.fail("offsets-increase", msg);
                }
                self.check_increasing(m, part);
            }
            let pp = &mut self.regions[m].parts[part];
            pp.durable = pp.log.len();
        }
        Ok(self.regions[m].parts[part].end())
    }
}
