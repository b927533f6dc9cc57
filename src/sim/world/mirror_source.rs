//! Each region's gateway, mirror streams on the source's side: the production
//! `mirror::core::source::SourceStream`, with the simulator's model of QUIC retransmission.

use crate::log::epochs::EpochEntry;
use crate::mirror::core::source::{self, Phase, Reconcile, SourceStream};

use super::*;

impl World {
    // ---- the gateway: mirror streams, source side (production: `source::SourceStream`) ----

    pub(super) fn pump_all(&mut self, r: usize) {
        if !self.regions[r].up {
            return;
        }
        for peer in self.peers(r) {
            for p in 0..self.nparts {
                self.pump(r, peer, p);
            }
        }
    }

    pub(super) fn ships(&self, r: usize, peer: usize) -> Option<i32> {
        let pl = self.placement(r);
        (pl.primary == self.regions[r].name && pl.mirrors.contains(&self.regions[peer].name))
            .then_some(pl.epoch)
    }

    pub(super) fn pump(&mut self, r: usize, peer: usize, part: usize) {
        let ships_at = self.ships(r, peer);
        let inc = self.regions[r].incarnation;
        let s = &mut self.regions[r].streams[peer][part];
        if ships_at.is_none() {
            s.core = None;
            s.backoff = false;
            s.timer_at = None;
            return;
        }
        if s.backoff {
            return;
        }
        if !s.core.as_ref().is_some_and(|c| c.current(ships_at)) {
            let epoch = ships_at.expect("shipping");
            self.seq += 1;
            let session = self.seq;
            let st = &mut self.regions[r].streams[peer][part];
            st.session = session;
            st.core = Some(SourceStream::open(epoch, source::WINDOW));
            st.timer_at = None;
            self.send(
                r,
                peer,
                Msg::Open {
                    session,
                    part,
                    epoch,
                },
            );
            let rto = self.rto();
            self.after(
                rto,
                Ev::StreamTimer {
                    region: r,
                    inc,
                    peer,
                    part,
                    session,
                    attempt: 0,
                },
            );
            return;
        }
        // Pipelined: new frames go out while the window has room, without waiting for the
        // ACKs of the frames before them.
        let per = self.sc.workload.record_bytes.max(1) as usize;
        let max = BATCH_RECORDS.min((source::FRAME_BYTES / per).max(1));
        loop {
            let s = &self.regions[r].streams[peer][part];
            let core = s.core.as_ref().expect("open");
            let log = &self.regions[r].parts[part].log;
            if !core.has_room() || core.sent() >= log.len() as i64 {
                return;
            }
            let from = core.sent() as usize;
            let to = (from + max).min(log.len());
            let records = log[from..to].to_vec();
            let session = s.session;
            let now = self.now;
            let st = &mut self.regions[r].streams[peer][part];
            let frame = SentFrame {
                seq: st.next_seq,
                records,
                sent_at: now,
            };
            st.next_seq += 1;
            let n = frame.records.len();
            st.core
                .as_mut()
                .expect("open")
                .on_sent(from as i64, to as i64, n * per, frame.clone());
            self.send_frame(r, peer, part, session, from as i64, frame);
        }
    }

    /// Send one BATCHES frame for the first time, and arm the stream's retransmission timer if
    /// it is not armed (it is then due for this frame, the last one sent).
    pub(super) fn send_frame(
        &mut self,
        r: usize,
        peer: usize,
        part: usize,
        session: u64,
        first: i64,
        f: SentFrame,
    ) {
        self.transmit(r, peer, part, session, first, f);
        if self.regions[r].streams[peer][part].timer_at.is_none() {
            let due = self.now + self.rto();
            self.arm_frame_timer(r, peer, part, session, due);
        }
    }

    pub(super) fn transmit(
        &mut self,
        r: usize,
        peer: usize,
        part: usize,
        session: u64,
        first: i64,
        f: SentFrame,
    ) {
        self.send(
            r,
            peer,
            Msg::Batches {
                session,
                part,
                seq: f.seq,
                first,
                records: f.records,
            },
        );
    }

    pub(super) fn arm_frame_timer(
        &mut self,
        r: usize,
        peer: usize,
        part: usize,
        session: u64,
        due: u64,
    ) {
        self.regions[r].streams[peer][part].timer_at = Some(due);
        let inc = self.regions[r].incarnation;
        self.at(
            due,
            Ev::FrameTimer {
                region: r,
                inc,
                peer,
                part,
                session,
            },
        );
    }

    /// Opening and truncating: the OPEN, the TRUNCATE or their answer was lost.
    pub(super) fn stream_timer(
        &mut self,
        r: usize,
        peer: usize,
        part: usize,
        session: u64,
        attempt: u32,
    ) {
        let s = &self.regions[r].streams[peer][part];
        if s.session != session {
            return;
        }
        let Some(core) = s.core.as_ref() else { return };
        let epoch = core.epoch();
        let inc = self.regions[r].incarnation;
        let rto = self.rto();
        match core.phase() {
            Phase::Opening => {
                if self.ships(r, peer) != Some(epoch) {
                    self.pump(r, peer, part);
                    return;
                }
                self.send(
                    r,
                    peer,
                    Msg::Open {
                        session,
                        part,
                        epoch,
                    },
                );
                self.after(
                    rto,
                    Ev::StreamTimer {
                        region: r,
                        inc,
                        peer,
                        part,
                        session,
                        attempt: attempt + 1,
                    },
                );
            }
            Phase::Truncating => {
                // The TRUNCATE or its POSITION was lost: open again.
                self.reset_stream(r, peer, part);
            }
            Phase::Streaming => {}
        }
    }

    /// The model of QUIC's retransmission timer: every frame sent `rto` ago or earlier and not
    /// acknowledged is sent again, each by itself (QUIC retransmits what was lost, not what
    /// followed it; the sink holds what followed until the missing frame arrives). The timer is
    /// then due for the oldest send still unacknowledged.
    pub(super) fn frame_timer(&mut self, r: usize, peer: usize, part: usize, session: u64) {
        let s = &self.regions[r].streams[peer][part];
        if s.session != session
            || s.phase() != Some(Phase::Streaming)
            || s.timer_at != Some(self.now)
        {
            return;
        }
        let epoch = s.core.as_ref().expect("streaming").epoch();
        self.regions[r].streams[peer][part].timer_at = None;
        if self.ships(r, peer) != Some(epoch) {
            self.pump(r, peer, part);
            return;
        }
        let rto = self.rto();
        let now = self.now;
        let due: Vec<(i64, SentFrame)> = {
            let core = self.regions[r].streams[peer][part]
                .core
                .as_mut()
                .expect("streaming");
            core.inflight_mut()
                .filter(|f| f.payload.sent_at + rto <= now)
                .map(|f| {
                    f.payload.sent_at = now;
                    (f.first, f.payload.clone())
                })
                .collect()
        };
        for (first, f) in due {
            self.transmit(r, peer, part, session, first, f);
        }
        let oldest = self.regions[r].streams[peer][part]
            .core
            .as_ref()
            .and_then(|c| c.inflight().iter().map(|f| f.payload.sent_at).min());
        if let Some(oldest) = oldest {
            self.arm_frame_timer(r, peer, part, session, oldest + rto);
        }
    }

    /// The stream failed: reopen it after RETRY.
    pub(super) fn reset_stream(&mut self, r: usize, peer: usize, part: usize) {
        let s = &mut self.regions[r].streams[peer][part];
        s.backoff = true;
        s.core = None;
        s.timer_at = None;
        s.session = 0;
        let inc = self.regions[r].incarnation;
        self.after(
            RETRY_MS,
            Ev::StreamRetry {
                region: r,
                inc,
                peer,
                part,
            },
        );
    }

    pub(super) fn on_position(
        &mut self,
        r: usize,
        peer: usize,
        part: usize,
        session: u64,
        log_end: i64,
        theirs: Vec<EpochEntry>,
    ) {
        let s = &self.regions[r].streams[peer][part];
        let opening = matches!(s.phase(), Some(Phase::Opening | Phase::Truncating));
        if s.session != session || !opening {
            return;
        }
        let epoch = s.core.as_ref().expect("opening").epoch();
        if self.ships(r, peer) != Some(epoch) {
            self.pump(r, peer, part);
            return;
        }
        let reg = &mut self.regions[r];
        let ours = &reg.parts[part];
        let decision = reg.streams[peer][part]
            .core
            .as_mut()
            .expect("opening")
            .on_position(log_end, &theirs, ours.end(), &ours.epochs);
        match decision {
            Reconcile::Stream { from } => {
                // Reconciled: the mirror's log is a prefix of ours.
                self.check_prefix(r, peer, part, from);
                let st = &mut self.regions[r].streams[peer][part];
                st.next_seq = 0;
                st.timer_at = None;
                self.regions[r].mirror_acked[peer][part] = from;
                self.resolve_acks(r);
                self.pump(r, peer, part);
            }
            Reconcile::Truncate(d) => {
                self.log(format!(
                    "{} -> {} p={part}: mirror tail diverges at {d} (mirror ends at {log_end})",
                    self.regions[r].name, self.regions[peer].name
                ));
                self.send(
                    r,
                    peer,
                    Msg::Truncate {
                        session,
                        part,
                        offset: d,
                    },
                );
                let rto = self.rto();
                let inc = self.regions[r].incarnation;
                self.after(
                    rto * 4,
                    Ev::StreamTimer {
                        region: r,
                        inc,
                        peer,
                        part,
                        session,
                        attempt: 0,
                    },
                );
            }
        }
    }

    /// Once a mirror is reconciled with its source (the stream open found no divergence), every
    /// offset both hold must hold the same record.
    pub(super) fn check_prefix(&mut self, r: usize, peer: usize, part: usize, upto: i64) {
        let a = &self.regions[r].parts[part].log;
        let b = &self.regions[peer].parts[part].log;
        let n = (upto as usize).min(a.len()).min(b.len());
        if let Some(o) = (0..n).find(|i| a[*i] != b[*i]) {
            let m = format!(
                "partition {part} offset {o}: {} holds {:?} but its mirror {} holds {:?} after they reconciled",
                self.regions[r].name, a[o], self.regions[peer].name, b[o]
            );
            self.fail("no-divergence", m);
        }
    }

    /// A cumulative ACK: the mirror holds, durably, everything below `log_end`;
    /// `SourceStream::on_ack` retires every frame that ends at or below it.
    pub(super) fn on_ack(
        &mut self,
        r: usize,
        peer: usize,
        part: usize,
        session: u64,
        log_end: i64,
    ) {
        let s = &mut self.regions[r].streams[peer][part];
        if s.session != session || s.phase() != Some(Phase::Streaming) {
            return;
        }
        match s.core.as_mut().expect("streaming").on_ack(log_end) {
            // Overtaken by a later ACK on the link (a QUIC stream would not reorder them), or
            // an answer to a copy of a frame already acknowledged.
            Ok(None) => {}
            Ok(Some(acked)) => {
                self.regions[r].mirror_acked[peer][part] = acked;
                self.resolve_acks(r);
                self.pump(r, peer, part);
            }
            Err(e) => {
                self.log(format!(
                    "{} -> {} p={part}: {e}",
                    self.regions[r].name, self.regions[peer].name
                ));
                self.reset_stream(r, peer, part);
            }
        }
    }
}
