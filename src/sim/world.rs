//! The simulated world: regions (broker + gateway each), WAN links, producers, consumer groups,
//! an operator, and the fault injector, driven by one event queue under simulated time.
//!
//! Owns: the discrete-event loop (events ordered by `(time, sequence number)`), the models of
//! everything that in production is I/O (logs in memory with a durable prefix, links that delay,
//! lose, duplicate and reorder messages, process crashes, per-process clocks that drift), the
//! re-modelled event handling of the gateway (`crate::mirror::gateway` is async I/O code: its
//! heartbeat, lease, stream-open/divergence/truncate, pipelined batch/ack and offset-sync
//! handling are re-implemented here step by step), and the invariant checks. Does not own: the
//! failover rules, the lease machine, the divergence function or the offset clamp — those are
//! the production functions, called as they are ([`RegionState::apply`], [`placement`],
//! [`Lease`], [`divergence`], [`clamp_offset`]).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use super::rng::Rng;
use super::scenario::{Scenario, TOPIC};
use super::trace::Trace;
use crate::failover::lease::Millis;
use crate::failover::{placement, rule_regions, switchover, Placement, RegionState, RuleState};
use crate::kafka::control::PartitionOffsets;
use crate::log::epochs::EpochEntry;
use crate::mirror::core::reorder::Payload;
use crate::mirror::core::sink::{self, SinkStream, Truncation};
use crate::mirror::core::source::{self, Phase, Reconcile, SourceStream};
use crate::mirror::core::{liveness, offsets, Heartbeat, Liveness};
use crate::topology::{Fencing, ReplicationMode, Topology};

/// Client ↔ broker latency inside a region (one way), ms.
const LOCAL_MS: u64 = 1;
/// Group commit: an fsync this long after the first unsynced append, ms.
const FSYNC_MS: u64 = 2;
/// Most records in one BATCHES frame (the model's stand-in for a fetch answer cut at batch
/// boundaries: at most this many records, and at most the gateway's `source::FRAME_BYTES`).
const BATCH_RECORDS: usize = 64;
/// A stream that failed is reopened after this long (the gateway's RETRY), ms.
const RETRY_MS: u64 = 1_000;
/// A producer's request timeout and error backoff, ms.
const REQUEST_TIMEOUT_MS: u64 = 5_000;
const PRODUCE_BACKOFF_MS: u64 = 100;
const MAX_IN_FLIGHT: usize = 5;
/// A consumer poll delivers at most this many records per partition.
const POLL_RECORDS: i64 = 500;
/// Operator waits: how often a promotion polls, and when it gives up.
const OP_POLL_MS: u64 = 50;
const OP_TIMEOUT_MS: u64 = 20_000;

/// One record as stored: its offset, the region epoch stamped into its batch, and which
/// produced record it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub offset: i64,
    pub epoch: i32,
    pub payload: u64,
}

/// One partition's copy in one region.
#[derive(Debug, Clone, Default)]
struct Part {
    log: Vec<Record>,
    /// Records `0..durable` were fsynced; a crash loses the rest.
    durable: usize,
    /// The partition's `leader-epoch-checkpoint`, kept in memory (durable in production; here
    /// it is cut back to the durable log end on restart, as `EpochCache::open` does).
    epochs: Vec<EpochEntry>,
}

impl Part {
    fn end(&self) -> i64 {
        self.log.len() as i64
    }
}

/// `EpochCache::observe` without the file: a new epoch starts at `offset`; epochs never go back.
fn observe(epochs: &mut Vec<EpochEntry>, epoch: i32, offset: i64) -> Result<(), String> {
    match epochs.last() {
        Some(l) if l.epoch == epoch => Ok(()),
        Some(l) if epoch < l.epoch => Err(format!(
            "a batch of epoch {epoch} at offset {offset} follows epoch {}",
            l.epoch
        )),
        _ => {
            epochs.push(EpochEntry {
                epoch,
                start_offset: offset,
            });
            Ok(())
        }
    }
}

/// What the source keeps of a BATCHES frame in flight (`source::InFlight::payload`): its place
/// in the stream and its records for the model of QUIC's retransmission, and when it was last
/// sent (it is sent again at `sent_at + rto` unless an ACK covers it by then).
#[derive(Debug, Clone)]
struct SentFrame {
    /// Its place in the stream: 0 for the first frame after POSITION, then 1, 2, …
    seq: u64,
    records: Vec<Record>,
    sent_at: u64,
}

/// A frame's records as the sink holds them (`reorder::Payload`).
#[derive(Debug, Clone)]
struct Batch {
    records: Vec<Record>,
    bytes: usize,
}

impl Payload for Batch {
    fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The source side of one partition's mirror stream to one peer: the production
/// `source::SourceStream`, plus the session id and the retransmission timer of the model of
/// QUIC (one per stream, as QUIC has one loss-detection timer per connection).
#[derive(Debug, Clone, Default)]
struct Stream {
    session: u64,
    /// `None`: idle (or backing off).
    core: Option<SourceStream<SentFrame>>,
    /// Failed; reopened by a retry timer.
    backoff: bool,
    /// The `seq` of the next new frame.
    next_seq: u64,
    timer_at: Option<u64>,
}

impl Stream {
    fn phase(&self) -> Option<Phase> {
        self.core.as_ref().map(|c| c.phase())
    }
}

/// The sink side of one partition's mirror stream from one source: the production
/// `sink::SinkStream`, behind the model of the ordered, reliable QUIC stream: frames reach the
/// sink in `seq` order; one that arrives ahead of a missing one is held until the missing one
/// arrives (QUIC's head-of-line blocking).
#[derive(Debug)]
struct Sink {
    session: u64,
    /// The `seq` of the next frame for the sink.
    expected: u64,
    /// Frames that arrived ahead of `expected`, by `seq`: (first offset, records).
    held: BTreeMap<u64, (i64, Vec<Record>)>,
    core: SinkStream<Batch>,
}

#[derive(Debug, Clone)]
struct PendingAck {
    producer: usize,
    req: u64,
    part: usize,
    offset: i64,
    payload: u64,
    epoch: i32,
}

/// One region: its broker and its gateway, as one process.
struct Region {
    name: String,
    up: bool,
    incarnation: u64,
    /// Clock rate of this machine (1 ± drift) and the simulated time the process booted.
    rate: f64,
    boot: u64,
    parts: Vec<Part>,
    state: RegionState,
    /// The gateway's production heartbeat and lease machine (in memory: lost at a crash).
    live: Liveness,
    /// When (simulated time) the last heartbeat heard from each peer was sent: the start of the
    /// unknown window of a forced failover's loss, for the `acked-not-lost` check.
    heard_sent: BTreeMap<String, u64>,
    /// The broker's write lease (its own clock), renewed by the lease tick; `armed` persists,
    /// and is set from the first start under lease fencing (`broker::lease_fenced`).
    broker_lease_until: Option<Millis>,
    armed: bool,
    /// [peer][partition] source streams.
    streams: Vec<Vec<Stream>>,
    /// [peer][partition] mirror ends acknowledged by peers (sync mode).
    mirror_acked: Vec<Vec<i64>>,
    /// (peer, partition) → the sink stream accepted from that source.
    sinks: BTreeMap<(usize, usize), Sink>,
    pending: Vec<PendingAck>,
    fsync_scheduled: bool,
    /// Committed offsets per consumer group (durable: written with acks=all in production).
    groups: BTreeMap<u32, Vec<i64>>,
    /// Records set aside by truncation (quarantine), for the report.
    quarantined: u64,
}

#[derive(Debug, Clone)]
enum Msg {
    Heartbeat {
        sent_at: Millis,
        sent_sim: u64,
        hb: Box<Heartbeat>,
    },
    HeartbeatAck {
        credit: Millis,
    },
    Open {
        session: u64,
        part: usize,
        epoch: i32,
    },
    Position {
        session: u64,
        part: usize,
        log_end: i64,
        epochs: Vec<EpochEntry>,
    },
    Refused {
        session: u64,
        part: usize,
    },
    Truncate {
        session: u64,
        part: usize,
        offset: i64,
    },
    Batches {
        session: u64,
        part: usize,
        /// The frame's place in the stream (the model of the QUIC stream's byte order).
        seq: u64,
        first: i64,
        records: Vec<Record>,
    },
    Ack {
        session: u64,
        part: usize,
        log_end: i64,
    },
    Error {
        session: u64,
        part: usize,
    },
    Offsets {
        group: u32,
        entries: Vec<i64>,
    },
}

impl Msg {
    fn line(&self) -> String {
        match self {
            Msg::Heartbeat { sent_at, hb, .. } => {
                format!("HB sent_at={sent_at} ends={:?}", hb.ends.get(TOPIC))
            }
            Msg::HeartbeatAck { credit } => format!("HB_ACK credit={credit}"),
            Msg::Open {
                session,
                part,
                epoch,
            } => format!("OPEN s={session} p={part} epoch={epoch}"),
            Msg::Position {
                session,
                part,
                log_end,
                epochs,
            } => format!(
                "POSITION s={session} p={part} end={log_end} epochs={:?}",
                epochs
                    .iter()
                    .map(|e| (e.epoch, e.start_offset))
                    .collect::<Vec<_>>()
            ),
            Msg::Refused { session, part } => format!("REFUSED s={session} p={part}"),
            Msg::Truncate {
                session,
                part,
                offset,
            } => format!("TRUNCATE s={session} p={part} at={offset}"),
            Msg::Batches {
                session,
                part,
                seq,
                first,
                records,
            } => format!(
                "BATCHES s={session} p={part} seq={seq} first={first} n={}",
                records.len()
            ),
            Msg::Ack {
                session,
                part,
                log_end,
            } => format!("ACK s={session} p={part} end={log_end}"),
            Msg::Error { session, part } => format!("ERROR s={session} p={part}"),
            Msg::Offsets { group, entries } => format!("OFFSETS g={group} {entries:?}"),
        }
    }
}

#[derive(Debug, Clone)]
enum OpKind {
    Switchover,
    Forced,
}

/// How a region becomes primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Takeover {
    /// Planned switchover: nothing lost, nothing reported.
    Planned,
    /// Operator-forced (`ferry failover --force`): a loss report, and the old primary joins the
    /// new primary's replaced set.
    Forced,
    /// Automatic promotion: a loss report, no replaced set.
    Automatic,
}

#[derive(Debug, Clone)]
enum Ev {
    ProducerTick(usize),
    ProducerSend(usize),
    ProducerTimeout(usize, u64),
    ProduceArrive {
        region: usize,
        inc: u64,
        producer: usize,
        req: u64,
        part: usize,
        payload: u64,
    },
    ProduceReply {
        producer: usize,
        req: u64,
        result: Result<(usize, i64, i32), String>,
    },
    Fsync(usize, u64),
    Deliver {
        from: usize,
        to: usize,
        from_inc: u64,
        to_inc: u64,
        msg: Msg,
    },
    Heartbeat(usize, u64),
    LeaseTick(usize, u64),
    OffsetSync(usize, u64),
    StreamTimer {
        region: usize,
        inc: u64,
        peer: usize,
        part: usize,
        session: u64,
        attempt: u32,
    },
    /// A streaming partition's retransmission timer (one per stream, as QUIC has one
    /// loss-detection timer per connection rather than one per packet).
    FrameTimer {
        region: usize,
        inc: u64,
        peer: usize,
        part: usize,
        session: u64,
    },
    StreamRetry {
        region: usize,
        inc: u64,
        peer: usize,
        part: usize,
    },
    ConsumerPoll(usize),
    ConsumerCommit(usize),
    FaultCut,
    FaultIsolate,
    FaultCrash,
    FaultSwitchover,
    FaultForced,
    FaultRegionLoss,
    Heal(usize, usize),
    Restart(usize),
    OpStart {
        kind: OpKind,
        to: Option<usize>,
    },
    OpPoll {
        op: Box<switchover::Switchover>,
        request: Box<switchover::PromoteRequest>,
        deadline: u64,
    },
    Settle,
}

impl Ev {
    fn line(&self) -> String {
        match self {
            Ev::Deliver {
                from, to, msg: m, ..
            } => format!("deliver {from}->{to} {}", m.line()),
            Ev::OpPoll { op, .. } => format!(
                "op-poll {}->{} epoch={} force={}",
                op.from, op.to, op.epoch, op.force
            ),
            e => format!("{e:?}"),
        }
    }
}

struct Scheduled {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> Ordering {
        // BinaryHeap is a max-heap: the earliest (time, seq) is the greatest.
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Debug, Clone)]
struct Producer {
    next_seq: u64,
    next_req: u64,
    queue: VecDeque<(usize, u64)>,
    inflight: BTreeMap<u64, (usize, u64)>,
    backoff_until: u64,
}

#[derive(Debug, Clone)]
struct Consumer {
    group: u32,
    region: Option<usize>,
    pos: Vec<i64>,
    /// [partition][offset] → payloads delivered at that offset (usually one).
    delivered: Vec<Vec<Vec<u64>>>,
}

/// An acknowledged record, as the producer saw it.
#[derive(Debug, Clone, Copy)]
struct Acked {
    region: usize,
    part: usize,
    offset: i64,
    epoch: i32,
    payload: u64,
    at: u64,
}

/// What a forced failover reported it may have lost: the records of `ranges` (the old primary's
/// last reported ends past what the new primary held) and anything acknowledged from
/// `window_start` on (the unknown window: since the old primary's last heartbeat was sent).
#[derive(Debug, Clone)]
struct LossReport {
    old_epoch: i32,
    ranges: Vec<(i64, i64)>,
    window_start: u64,
}

/// The first broken invariant of a run.
#[derive(Debug, Clone)]
pub struct Failure {
    pub invariant: &'static str,
    pub message: String,
    pub at_ms: u64,
    /// The last trace lines before it (oldest first).
    pub recent: Vec<String>,
}

/// The result of one seed.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub seed: u64,
    pub sim_ms: u64,
    pub events: u64,
    pub acknowledged: u64,
    /// Acknowledged records lost, every one of them inside a forced failover's report.
    pub rpo_records: u64,
    /// What the forced failovers reported (records behind + acknowledged in unknown windows).
    pub reported_loss: u64,
    pub switchovers: u32,
    pub forced_failovers: u32,
    pub crashes: u32,
    pub quarantined: u64,
    pub max_lag: i64,
    pub mean_lag: f64,
    pub trace_hash: u64,
    pub failure: Option<Failure>,
}

/// Knobs the sweep overrides on top of a scenario.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub loss: Option<f64>,
    pub rtt: Option<u64>,
}

pub struct World {
    sc: Scenario,
    topo: Topology,
    rule_pattern: String,
    rule_regions: Vec<String>,
    mode: ReplicationMode,
    fencing: Fencing,
    nparts: usize,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Scheduled>,
    regions: Vec<Region>,
    /// Cut counters per unordered link (index by min,max).
    cuts: BTreeMap<(usize, usize), u32>,
    link_rtt: u64,
    link_loss: f64,
    producers: Vec<Producer>,
    consumers: Vec<Consumer>,
    acked: Vec<Acked>,
    reports: Vec<LossReport>,
    /// The newest rule state any region applied (what clients follow).
    latest: RuleState,
    op_busy: bool,
    settled: bool,
    trace: Trace,
    failure: Option<Failure>,
    stats: Outcome,
    lag_samples: u64,
    lag_sum: f64,
}

impl World {
    pub fn new(sc: &Scenario, seed: u64, ov: &Overrides) -> Result<World, super::SimError> {
        let topo = sc.build_topology().map_err(|m| super::SimError::Scenario {
            file: sc.name.clone(),
            message: m,
        })?;
        let rule = topo.topics[0].clone();
        let rule_regions = rule_regions(&rule);
        let mut rng = Rng::new(seed);
        let all: Vec<String> = topo.regions.iter().map(|r| r.name.clone()).collect();
        let nparts = sc.topology.partitions as usize;
        let n = all.len();
        // `broker::lease_fenced`: under lease fencing (several regions, each with a gateway)
        // the broker's write lease is armed from its first start (finding 7).
        let lease_fenced = topo.failover.fencing == Fencing::Lease
            && n > 1
            && topo.regions.iter().all(|r| r.gateway.is_some());
        let regions = all
            .iter()
            .map(|name| {
                let d = sc.faults.clock_drift;
                let rate = 1.0 + (rng.unit() * 2.0 - 1.0) * d;
                Region {
                    name: name.clone(),
                    up: true,
                    incarnation: 0,
                    rate,
                    boot: 0,
                    parts: vec![Part::default(); nparts],
                    state: RegionState::default(),
                    live: Liveness::new(&topo, name, 0),
                    heard_sent: BTreeMap::new(),
                    broker_lease_until: None,
                    armed: lease_fenced,
                    streams: vec![vec![Stream::default(); nparts]; n],
                    mirror_acked: vec![vec![0; nparts]; n],
                    sinks: BTreeMap::new(),
                    pending: Vec::new(),
                    fsync_scheduled: false,
                    groups: BTreeMap::new(),
                    quarantined: 0,
                }
            })
            .collect();
        let latest = RegionState::default()
            .rule(&topo, &rule.pattern)
            .expect("the rule exists");
        let producers = (0..sc.workload.producers)
            .map(|_| Producer {
                next_seq: 0,
                next_req: 0,
                queue: VecDeque::new(),
                inflight: BTreeMap::new(),
                backoff_until: 0,
            })
            .collect();
        let consumers = (0..sc.workload.consumer_groups)
            .map(|g| Consumer {
                group: g,
                region: None,
                pos: vec![0; nparts],
                delivered: vec![Vec::new(); nparts],
            })
            .collect();
        let mut w = World {
            mode: rule.mode,
            fencing: topo.failover.fencing,
            rule_pattern: rule.pattern.clone(),
            rule_regions,
            nparts,
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            regions,
            cuts: BTreeMap::new(),
            link_rtt: ov.rtt.unwrap_or(sc.links.rtt),
            link_loss: ov.loss.unwrap_or(sc.links.loss),
            producers,
            consumers,
            acked: Vec::new(),
            reports: Vec::new(),
            latest,
            op_busy: false,
            settled: false,
            trace: Trace::new(),
            failure: None,
            stats: Outcome {
                seed,
                sim_ms: 0,
                events: 0,
                acknowledged: 0,
                rpo_records: 0,
                reported_loss: 0,
                switchovers: 0,
                forced_failovers: 0,
                crashes: 0,
                quarantined: 0,
                max_lag: 0,
                mean_lag: 0.0,
                trace_hash: 0,
                failure: None,
            },
            lag_samples: 0,
            lag_sum: 0.0,
            sc: sc.clone(),
            topo,
        };
        w.boot();
        Ok(w)
    }

    fn boot(&mut self) {
        for r in 0..self.regions.len() {
            self.start_process(r);
        }
        let gap = (1000 / self.sc.workload.rate as u64).max(1);
        for p in 0..self.producers.len() {
            let at = self.rng.below(gap);
            self.at(at, Ev::ProducerTick(p));
        }
        for c in 0..self.consumers.len() {
            let poll = self.sc.workload.poll_interval;
            let commit = self.sc.workload.commit_interval;
            let a = self.rng.below(poll);
            let b = self.rng.below(commit);
            self.at(a, Ev::ConsumerPoll(c));
            self.at(b, Ev::ConsumerCommit(c));
        }
        let f = self.sc.faults.clone();
        for (every, ev) in [
            (f.cut_every, Ev::FaultCut),
            (f.isolate_every, Ev::FaultIsolate),
            (f.crash_every, Ev::FaultCrash),
            (f.switchover_every, Ev::FaultSwitchover),
            (f.forced_failover_every, Ev::FaultForced),
            (f.region_loss_every, Ev::FaultRegionLoss),
        ] {
            if let Some(m) = every {
                let at = self.rng.exp(m);
                self.at(at, ev);
            }
        }
        if let Some(at) = f.forced_failover_at {
            let to = self.pick_target();
            self.at(
                at,
                Ev::OpStart {
                    kind: OpKind::Forced,
                    to,
                },
            );
        }
        self.at(self.sc.duration, Ev::Settle);
    }

    /// Start (or restart) the process of region `r`: timers on its own clock.
    fn start_process(&mut self, r: usize) {
        let inc = self.regions[r].incarnation;
        let hb = self.topo.failover.heartbeat.as_millis() as u64;
        let a = self.rng.below(hb);
        let b = self.rng.below(hb / 4 + 1);
        let c = self.rng.below(offsets::OFFSET_SYNC_INTERVAL_MS);
        self.after(a, Ev::Heartbeat(r, inc));
        self.after(b, Ev::LeaseTick(r, inc));
        self.after(c, Ev::OffsetSync(r, inc));
        self.pump_all(r);
    }

    fn at(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at,
            seq: self.seq,
            ev,
        });
    }

    fn after(&mut self, delay: u64, ev: Ev) {
        self.at(self.now + delay, ev);
    }

    /// Simulated ms for `local_ms` on region `r`'s clock.
    fn local_delay(&self, r: usize, local_ms: u64) -> u64 {
        ((local_ms as f64) / self.regions[r].rate).ceil() as u64
    }

    /// Region `r`'s wall clock now (it drifts like the process clock but survives restarts):
    /// what a fence's deadline is measured on.
    fn wall(&self, r: usize) -> u64 {
        (self.now as f64 * self.regions[r].rate) as u64
    }

    /// Region `r`'s process clock now.
    fn local(&self, r: usize) -> Millis {
        let reg = &self.regions[r];
        ((self.now - reg.boot) as f64 * reg.rate) as Millis
    }

    fn idx(&self, name: &str) -> usize {
        self.regions
            .iter()
            .position(|r| r.name == name)
            .expect("a known region")
    }

    fn placement(&self, r: usize) -> Placement {
        placement(&self.topo, &self.regions[r].state, TOPIC).expect("the rule covers the topic")
    }

    fn rule_state(&self, r: usize) -> RuleState {
        self.regions[r]
            .state
            .rule(&self.topo, &self.rule_pattern)
            .expect("the rule exists")
    }

    fn log(&mut self, line: String) {
        let l = format!("{} {line}", self.now);
        self.trace.push(l);
    }

    fn fail(&mut self, invariant: &'static str, message: String) {
        if self.failure.is_some() || !self.sc.invariants.on(invariant) {
            return;
        }
        self.log(format!("INVARIANT BROKEN {invariant}: {message}"));
        self.failure = Some(Failure {
            invariant,
            message,
            at_ms: self.now,
            recent: self.trace.recent(),
        });
    }

    /// Apply a rule change in region `r` through the production rules.
    fn apply(&mut self, r: usize, new: RuleState) -> bool {
        let pattern = self.rule_pattern.clone();
        let res = self.regions[r]
            .state
            .apply(&self.topo, &pattern, new.clone());
        match res {
            Ok(changed) => {
                if changed {
                    self.log(format!(
                        "apply {} epoch={} primary={} fenced={}",
                        self.regions[r].name, new.epoch, new.primary, new.fenced
                    ));
                    if new.epoch > self.latest.epoch
                        || (new.epoch == self.latest.epoch && new.primary == self.latest.primary)
                    {
                        self.latest = new;
                    }
                    self.pump_all(r);
                }
                true
            }
            Err(e) => {
                self.log(format!("apply {} refused: {e}", self.regions[r].name));
                false
            }
        }
    }

    // ---- network ------------------------------------------------------------------------

    fn link_cut(&self, a: usize, b: usize) -> bool {
        self.cuts.get(&(a.min(b), a.max(b))).is_some_and(|n| *n > 0)
    }

    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        if !self.regions[from].up || !self.regions[to].up || self.link_cut(from, to) {
            return;
        }
        let jitter = self.sc.links.jitter;
        let copies = if self.rng.chance(self.sc.links.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            if self.rng.chance(self.link_loss) {
                continue; // lost: the sender's timer retransmits
            }
            let d = (self.link_rtt / 2).max(1) + if jitter > 0 { self.rng.upto(jitter) } else { 0 };
            let ev = Ev::Deliver {
                from,
                to,
                from_inc: self.regions[from].incarnation,
                to_inc: self.regions[to].incarnation,
                msg: msg.clone(),
            };
            self.after(d, ev);
        }
    }

    /// How long a stream waits for an answer before sending again.
    fn rto(&self) -> u64 {
        (self.link_rtt * 2 + self.sc.links.jitter * 2).max(50)
    }

    // ---- broker -------------------------------------------------------------------------

    /// Whether region `r`'s broker takes writes now.
    fn takes_writes(&self, r: usize) -> Result<(), &'static str> {
        let reg = &self.regions[r];
        if !reg.up {
            return Err("down");
        }
        let p = self.placement(r);
        if p.primary != reg.name {
            return Err("not the primary");
        }
        if p.fenced {
            return Err("fenced");
        }
        if self.fencing == Fencing::Lease && reg.armed {
            let now = self.local(r);
            if reg.broker_lease_until.is_none_or(|u| now >= u) {
                return Err("lost its write lease");
            }
        }
        Ok(())
    }

    fn produce(&mut self, r: usize, producer: usize, req: u64, part: usize, payload: u64) {
        let reply = |w: &mut World, result| {
            w.after(
                LOCAL_MS,
                Ev::ProduceReply {
                    producer,
                    req,
                    result,
                },
            );
        };
        if let Err(why) = self.takes_writes(r) {
            reply(self, Err(why.to_string()));
            return;
        }
        if self.rng.chance(self.sc.faults.append_failure) {
            self.log(format!("disk: append failed in {}", self.regions[r].name));
            reply(self, Err("append failed".into()));
            return;
        }
        // Under lease fencing, nobody else may be taking writes at this instant.
        if self.fencing == Fencing::Lease {
            for q in 0..self.regions.len() {
                if q != r && self.takes_writes(q).is_ok() {
                    let msg = format!(
                        "{} and {} both take writes for '{TOPIC}' (epochs {} and {})",
                        self.regions[r].name,
                        self.regions[q].name,
                        self.rule_state(r).epoch,
                        self.rule_state(q).epoch
                    );
                    self.fail("single-writer", msg);
                }
            }
        }
        let epoch = self.rule_state(r).epoch;
        let p = &mut self.regions[r].parts[part];
        let offset = p.end();
        if let Err(e) = observe(&mut p.epochs, epoch, offset) {
            reply(self, Err(e));
            return;
        }
        p.log.push(Record {
            offset,
            epoch,
            payload,
        });
        self.check_increasing(r, part);
        self.regions[r].pending.push(PendingAck {
            producer,
            req,
            part,
            offset,
            payload,
            epoch,
        });
        self.log(format!(
            "append {} p={part} off={offset} epoch={epoch} payload={payload:x}",
            self.regions[r].name
        ));
        self.schedule_fsync(r);
        self.pump_all(r);
    }

    fn check_increasing(&mut self, r: usize, part: usize) {
        let log = &self.regions[r].parts[part].log;
        let n = log.len();
        if n >= 2 && log[n - 1].offset <= log[n - 2].offset {
            let m = format!(
                "{} p={part}: offset {} follows {}",
                self.regions[r].name,
                log[n - 1].offset,
                log[n - 2].offset
            );
            self.fail("offsets-increase", m);
        }
    }

    fn schedule_fsync(&mut self, r: usize) {
        if !self.regions[r].fsync_scheduled {
            self.regions[r].fsync_scheduled = true;
            let inc = self.regions[r].incarnation;
            self.after(FSYNC_MS, Ev::Fsync(r, inc));
        }
    }

    fn fsync(&mut self, r: usize) {
        self.regions[r].fsync_scheduled = false;
        if self.rng.chance(self.sc.faults.fsync_failure) {
            self.log(format!(
                "disk: fsync failed in {}: the process exits",
                self.regions[r].name
            ));
            self.crash(r);
            let d = self.sc.faults.down_for;
            self.after(d, Ev::Restart(r));
            return;
        }
        for p in &mut self.regions[r].parts {
            p.durable = p.log.len();
        }
        self.resolve_acks(r);
    }

    /// Answer the produces that are durable (and, for sync topics, held by every mirror).
    fn resolve_acks(&mut self, r: usize) {
        let pl = self.placement(r);
        let mirrors: Vec<usize> = pl.mirrors.iter().map(|m| self.idx(m)).collect();
        let sync = self.mode == ReplicationMode::Sync;
        let reg = &mut self.regions[r];
        let mut done = Vec::new();
        reg.pending.retain(|a| {
            let durable = (a.offset as usize) < reg.parts[a.part].durable;
            let mirrored = !sync
                || mirrors
                    .iter()
                    .all(|m| reg.mirror_acked[*m][a.part] > a.offset);
            if durable && mirrored {
                done.push(a.clone());
                false
            } else {
                true
            }
        });
        for a in done {
            self.after(
                LOCAL_MS,
                Ev::ProduceReply {
                    producer: a.producer,
                    req: a.req,
                    result: Ok((r, a.offset, a.epoch)),
                },
            );
            let _ = a.payload;
        }
    }

    fn crash(&mut self, r: usize) {
        if !self.regions[r].up {
            return;
        }
        self.stats.crashes += 1;
        self.log(format!("crash {}", self.regions[r].name));
        let reg = &mut self.regions[r];
        reg.up = false;
        reg.incarnation += 1;
        for p in &mut reg.parts {
            p.log.truncate(p.durable);
            let end = p.end();
            p.epochs.retain(|e| e.start_offset < end);
        }
        reg.pending.clear();
        reg.fsync_scheduled = false;
        reg.sinks.clear();
        reg.heard_sent.clear();
        reg.broker_lease_until = None;
    }

    fn restart(&mut self, r: usize) {
        if self.regions[r].up {
            return;
        }
        self.log(format!("restart {}", self.regions[r].name));
        let now = self.now;
        let reg = &mut self.regions[r];
        reg.up = true;
        reg.boot = now;
        reg.live = Liveness::new(&self.topo, &reg.name, 0);
        for peer in &mut reg.streams {
            for s in peer.iter_mut() {
                *s = Stream::default();
            }
        }
        for m in &mut reg.mirror_acked {
            m.iter_mut().for_each(|x| *x = 0);
        }
        self.start_process(r);
    }

    // ---- the gateway: heartbeats and the lease (production: `mirror::core::liveness`) -------

    fn peers(&self, r: usize) -> Vec<usize> {
        let me = &self.regions[r].name;
        if !self.rule_regions.contains(me) {
            return Vec::new();
        }
        self.rule_regions
            .iter()
            .filter(|x| *x != me)
            .map(|x| self.idx(x))
            .collect()
    }

    /// Region `r`'s log ends and epoch histories, as its broker's `Offsets` answers them.
    fn offsets_of(&self, r: usize) -> BTreeMap<String, Vec<PartitionOffsets>> {
        let parts = self.regions[r]
            .parts
            .iter()
            .enumerate()
            .map(|(i, p)| PartitionOffsets {
                partition: i as i32,
                log_start: 0,
                log_end: p.end(),
                epochs: p.epochs.clone(),
            })
            .collect();
        BTreeMap::from([(TOPIC.to_string(), parts)])
    }

    fn heartbeat(&mut self, r: usize) {
        self.send_heartbeats(r);
        let every = self.topo.failover.heartbeat.as_millis() as u64;
        let d = self.local_delay(r, every);
        let inc = self.regions[r].incarnation;
        self.after(d, Ev::Heartbeat(r, inc));
        self.sample_lag(r);
    }

    /// One heartbeat to every peer of the rule, as `Liveness::heartbeat` makes it.
    fn send_heartbeats(&mut self, r: usize) {
        let now = self.local(r);
        let offsets = self.offsets_of(r);
        let reg = &self.regions[r];
        let hb = reg.live.heartbeat(
            &self.topo,
            now,
            &reg.state,
            &offsets,
            &BTreeMap::new(),
            self.wall(r) as i64,
        );
        for peer in self.peers(r) {
            let msg = Msg::Heartbeat {
                sent_at: now,
                sent_sim: self.now,
                hb: Box::new(hb.clone()),
            };
            self.send(r, peer, msg);
        }
    }

    fn sample_lag(&mut self, r: usize) {
        if self.placement(r).primary != self.regions[r].name {
            return;
        }
        for peer in self.peers(r) {
            // Lag while the mirror can be reached (a cut or a crash makes its own lag).
            if !self.regions[peer].up || self.link_cut(r, peer) {
                continue;
            }
            for p in 0..self.nparts {
                let lag =
                    (self.regions[r].parts[p].end() - self.regions[peer].parts[p].end()).max(0);
                self.stats.max_lag = self.stats.max_lag.max(lag);
                self.lag_sum += lag as f64;
                self.lag_samples += 1;
            }
        }
    }

    /// `sink_heartbeats`: the production `Liveness::on_heartbeat` decides the credit and the
    /// epochs to adopt.
    fn on_heartbeat(
        &mut self,
        r: usize,
        peer: usize,
        sent_at: Millis,
        sent_sim: u64,
        hb: Heartbeat,
    ) {
        let pname = self.regions[peer].name.clone();
        let now = self.local(r);
        let reg = &mut self.regions[r];
        let answer = reg
            .live
            .on_heartbeat(&self.topo, &reg.state, &pname, sent_at, hb, now);
        reg.heard_sent.insert(pname.clone(), sent_sim);
        if answer.withheld {
            self.log(format!(
                "{} withholds credit from {pname} (back from a long silence)",
                self.regions[r].name
            ));
        }
        self.send(
            r,
            peer,
            Msg::HeartbeatAck {
                credit: answer.credit,
            },
        );
        for (_, new) in answer.adopt {
            self.log(format!(
                "{} adopts epoch {} ({}) from {pname}'s heartbeat",
                self.regions[r].name, new.epoch, new.primary
            ));
            self.apply(r, new);
        }
    }

    /// `lease_loop`: the automatic promotions due (each restarts the lease, which must not be
    /// renewed from before it), the fences that lapsed, then the broker's lease renewal.
    fn lease_tick(&mut self, r: usize) {
        let now = self.local(r);
        let due = self.regions[r]
            .live
            .promotions(&self.topo, &self.regions[r].state, now);
        for p in due {
            self.auto_promote(r, now, p);
        }
        let lapsed = liveness::lapsed_fences(
            &self.topo,
            &self.regions[r].state,
            &self.regions[r].name,
            self.wall(r),
        );
        for (_, open) in lapsed {
            self.log(format!(
                "{}: the fence lapsed (epoch {})",
                self.regions[r].name, open.epoch
            ));
            self.apply(r, open);
        }
        let reg = &mut self.regions[r];
        if let Some(u) = reg.live.renewal(now) {
            reg.broker_lease_until = Some(u);
            reg.armed = true;
        }
        let step = (self.topo.failover.heartbeat.as_millis() as u64 / 4).max(1);
        let d = self.local_delay(r, step);
        let inc = self.regions[r].incarnation;
        self.after(d, Ev::LeaseTick(r, inc));
    }

    /// `Gateway::auto_promote`: the broker's lease ends first (`RenewLease { ms: 0 }`), the
    /// promotion is applied, `Liveness::promoted`, and a heartbeat goes out at once.
    fn auto_promote(&mut self, r: usize, now: Millis, p: liveness::AutoPromotion) {
        let me = self.regions[r].name.clone();
        self.log(format!(
            "{me}: automatic promotion (the lease of {} ran out)",
            p.from
        ));
        let from = self.idx(&p.from);
        let reg = &mut self.regions[r];
        reg.broker_lease_until = Some(now);
        reg.armed = true;
        if self.take_over(r, from, p.new.epoch, Takeover::Automatic) {
            self.regions[r].live.promoted(now);
            self.send_heartbeats(r);
        }
    }

    /// Region `to` becomes primary at `epoch`, replacing `from`. Forced or automatic: record the
    /// loss report (`Liveness::loss`, as `/v1/promote` reports it; what an automatic promotion
    /// may lose is bounded the same way); only an operator-forced one adds `from` to the
    /// replaced set.
    fn take_over(&mut self, to: usize, from: usize, epoch: i32, how: Takeover) -> bool {
        let old_epoch = self.rule_state(to).epoch.max(self.latest.epoch);
        let new = RuleState::open(epoch, self.regions[to].name.clone());
        // What the report is computed from: this region's logs before the promotion.
        let ours = self.offsets_of(to);
        if !self.apply(to, new.clone()) {
            return false;
        }
        if how != Takeover::Planned {
            self.stats.forced_failovers += 1;
            let fname = self.regions[from].name.clone();
            if how == Takeover::Forced {
                self.regions[to].live.forced(&fname);
            }
            let loss = self.regions[to].live.loss(&fname, &ours);
            let window_start = self.regions[to].heard_sent.get(&fname).copied();
            let ends: Vec<i64> = self.regions[to].parts.iter().map(|p| p.end()).collect();
            let (ranges, window_start): (Vec<(i64, i64)>, u64) = match (loss, window_start) {
                (Some(loss), Some(sent)) => (
                    ends.iter()
                        .enumerate()
                        .map(|(p, m)| {
                            loss.iter()
                                .find(|l| l.partition == p as i32)
                                .map_or((*m, *m), |l| (l.mirrored_end, l.reported_end))
                        })
                        .collect(),
                    sent,
                ),
                // Never heard from the old primary: everything it may have had is unknown.
                _ => (ends.iter().map(|m| (*m, i64::MAX)).collect(), 0),
            };
            let behind: i64 = ranges
                .iter()
                .map(|(a, b)| ((*b).min(a + 1_000_000_000) - a).max(0))
                .sum();
            self.log(format!(
                "forced failover {fname} -> {} epoch={epoch}: behind {ranges:?}, unknown since {window_start}",
                self.regions[to].name
            ));
            self.stats.reported_loss += behind.max(0) as u64;
            self.reports.push(LossReport {
                old_epoch,
                ranges,
                window_start,
            });
        }
        true
    }

    // ---- the gateway: mirror streams, source side (production: `source::SourceStream`) ----

    fn pump_all(&mut self, r: usize) {
        if !self.regions[r].up {
            return;
        }
        for peer in self.peers(r) {
            for p in 0..self.nparts {
                self.pump(r, peer, p);
            }
        }
    }

    fn ships(&self, r: usize, peer: usize) -> Option<i32> {
        let pl = self.placement(r);
        (pl.primary == self.regions[r].name && pl.mirrors.contains(&self.regions[peer].name))
            .then_some(pl.epoch)
    }

    fn pump(&mut self, r: usize, peer: usize, part: usize) {
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
    fn send_frame(
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

    fn transmit(
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

    fn arm_frame_timer(&mut self, r: usize, peer: usize, part: usize, session: u64, due: u64) {
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
    fn stream_timer(&mut self, r: usize, peer: usize, part: usize, session: u64, attempt: u32) {
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
    fn frame_timer(&mut self, r: usize, peer: usize, part: usize, session: u64) {
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
    fn reset_stream(&mut self, r: usize, peer: usize, part: usize) {
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

    fn on_position(
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
    fn check_prefix(&mut self, r: usize, peer: usize, part: usize, upto: i64) {
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
    fn on_ack(&mut self, r: usize, peer: usize, part: usize, session: u64, log_end: i64) {
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

    // ---- the gateway: mirror streams, sink side (production: `sink::SinkStream`) ---------

    fn on_open(&mut self, m: usize, src: usize, part: usize, session: u64, epoch: i32) {
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

    fn sink_session_ok(&self, m: usize, src: usize, part: usize, session: u64) -> bool {
        self.regions[m]
            .sinks
            .get(&(src, part))
            .is_some_and(|s| s.session == session)
    }

    /// The sink answers ERROR and the stream closes (`sink_stream` returns): later frames of
    /// the session find no stream and are answered with ERROR again.
    fn sink_error(&mut self, m: usize, src: usize, part: usize, session: u64) {
        if self.sink_session_ok(m, src, part, session) {
            self.regions[m].sinks.remove(&(src, part));
        }
        self.send(m, src, Msg::Error { session, part });
    }

    fn on_truncate(&mut self, m: usize, src: usize, part: usize, session: u64, offset: i64) {
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
    fn on_batches(
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
    fn append_ready(&mut self, m: usize, src: usize, part: usize, session: u64) {
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
    fn mirror_append(&mut self, m: usize, part: usize, parts: Vec<Batch>) -> Result<i64, ()> {
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

    // ---- the gateway: group offset sync (production: `mirror::core::offsets`) -------------

    fn offset_sync(&mut self, r: usize) {
        for peer in self.peers(r) {
            if self.ships(r, peer).is_none() {
                continue;
            }
            let groups: Vec<(u32, Vec<i64>)> = self.regions[r]
                .groups
                .iter()
                .map(|(g, v)| (*g, v.clone()))
                .collect();
            for (group, entries) in groups {
                self.send(r, peer, Msg::Offsets { group, entries });
            }
        }
        let d = self.local_delay(r, offsets::OFFSET_SYNC_INTERVAL_MS);
        let inc = self.regions[r].incarnation;
        self.after(d, Ev::OffsetSync(r, inc));
    }

    /// `install_offsets`: `offsets::wanted` and `offsets::clamped` against the primary's last
    /// heartbeat and this mirror's logs.
    fn on_offsets(&mut self, m: usize, src: usize, group: u32, entries: Vec<i64>) {
        let p = self.placement(m);
        let src_name = self.regions[src].name.clone();
        let me = self.regions[m].name.clone();
        let entries = entries
            .iter()
            .enumerate()
            .map(|(i, o)| (TOPIC.to_string(), i as i32, *o))
            .collect();
        let wanted = offsets::wanted(entries, |_| {
            p.primary == src_name && p.mirrors.contains(&me)
        });
        let primary = self.regions[m]
            .live
            .reports()
            .get(&src_name)
            .map(|r| r.heartbeat.clone());
        let commit = offsets::clamped(wanted, primary.as_ref(), &self.offsets_of(m));
        let nparts = self.nparts;
        for (_, parts) in commit {
            let v = self.regions[m]
                .groups
                .entry(group)
                .or_insert_with(|| vec![0; nparts]);
            for (i, o) in parts {
                v[i as usize] = o;
            }
        }
    }

    // ---- clients ------------------------------------------------------------------------

    /// The region clients are sent to: the newest primary, if it is up.
    fn client_target(&self) -> Option<usize> {
        let r = self.idx(&self.latest.primary);
        self.regions[r].up.then_some(r)
    }

    fn producer_tick(&mut self, p: usize) {
        if self.now >= self.sc.duration {
            return;
        }
        let pr = &mut self.producers[p];
        let seq = pr.next_seq;
        pr.next_seq += 1;
        let payload = ((p as u64 + 1) << 40) | seq;
        let part = (seq % self.nparts as u64) as usize;
        pr.queue.push_back((part, payload));
        self.producer_send(p);
        let gap = (1000 / self.sc.workload.rate as u64).max(1);
        self.after(gap, Ev::ProducerTick(p));
    }

    fn producer_send(&mut self, p: usize) {
        if self.now < self.producers[p].backoff_until {
            return;
        }
        let Some(target) = self.client_target() else {
            return;
        };
        while self.producers[p].inflight.len() < MAX_IN_FLIGHT {
            let pr = &mut self.producers[p];
            let Some((part, payload)) = pr.queue.pop_front() else {
                break;
            };
            let req = pr.next_req;
            pr.next_req += 1;
            pr.inflight.insert(req, (part, payload));
            let inc = self.regions[target].incarnation;
            self.after(
                LOCAL_MS,
                Ev::ProduceArrive {
                    region: target,
                    inc,
                    producer: p,
                    req,
                    part,
                    payload,
                },
            );
            self.after(REQUEST_TIMEOUT_MS, Ev::ProducerTimeout(p, req));
        }
    }

    fn produce_reply(&mut self, p: usize, req: u64, result: Result<(usize, i64, i32), String>) {
        let Some((part, payload)) = self.producers[p].inflight.remove(&req) else {
            return; // timed out already: the client never saw this answer
        };
        match result {
            Ok((region, offset, epoch)) => {
                self.stats.acknowledged += 1;
                self.acked.push(Acked {
                    region,
                    part,
                    offset,
                    epoch,
                    payload,
                    at: self.now,
                });
                self.producer_send(p);
            }
            Err(_) => {
                self.producers[p].queue.push_front((part, payload));
                self.producers[p].backoff_until = self.now + PRODUCE_BACKOFF_MS;
                self.after(PRODUCE_BACKOFF_MS, Ev::ProducerSend(p));
            }
        }
    }

    fn producer_timeout(&mut self, p: usize, req: u64) {
        if let Some(x) = self.producers[p].inflight.remove(&req) {
            self.producers[p].queue.push_front(x);
            self.producer_send(p);
        }
    }

    fn consumer_poll(&mut self, c: usize) {
        let poll = self.sc.workload.poll_interval;
        self.after(poll, Ev::ConsumerPoll(c));
        let Some(target) = self.client_target() else {
            return;
        };
        if self.consumers[c].region != Some(target) {
            // The group moves to the new primary and resumes at its committed offsets there.
            let g = self.consumers[c].group;
            let committed = self.regions[target]
                .groups
                .get(&g)
                .cloned()
                .unwrap_or_else(|| vec![0; self.nparts]);
            self.log(format!(
                "group {g} moves to {} at {committed:?}",
                self.regions[target].name
            ));
            self.consumers[c].region = Some(target);
            self.consumers[c].pos = committed;
            for p in 0..self.nparts {
                let upto = (self.consumers[c].pos[p].max(0) as usize)
                    .min(self.regions[target].parts[p].durable);
                for o in 0..upto {
                    self.check_delivered(c, target, p, o, "resumes past");
                }
            }
        }
        for p in 0..self.nparts {
            let durable = self.regions[target].parts[p].durable as i64;
            let mut n = 0;
            while self.consumers[c].pos[p] < durable && n < POLL_RECORDS {
                let o = self.consumers[c].pos[p] as usize;
                if o > 0 {
                    self.check_delivered(c, target, p, o - 1, "reads past");
                }
                let payload = self.regions[target].parts[p].log[o].payload;
                let d = &mut self.consumers[c].delivered[p];
                if d.len() <= o {
                    d.resize(o + 1, Vec::new());
                }
                if !d[o].contains(&payload) {
                    d[o].push(payload);
                }
                self.consumers[c].pos[p] += 1;
                n += 1;
            }
        }
    }

    fn check_delivered(&mut self, c: usize, r: usize, p: usize, o: usize, what: &str) {
        let rec = self.regions[r].parts[p].log[o];
        let ok = self.consumers[c].delivered[p]
            .get(o)
            .is_some_and(|v| v.contains(&rec.payload));
        if !ok {
            let m = format!(
                "group {} {what} partition {p} offset {o} in {} ({:x}, epoch {}) without having seen it",
                self.consumers[c].group, self.regions[r].name, rec.payload, rec.epoch
            );
            self.fail("consumer-no-skip", m);
        }
    }

    fn consumer_commit(&mut self, c: usize) {
        let every = self.sc.workload.commit_interval;
        self.after(every, Ev::ConsumerCommit(c));
        if let Some(r) = self.consumers[c].region {
            if self.regions[r].up {
                let g = self.consumers[c].group;
                let pos = self.consumers[c].pos.clone();
                self.regions[r].groups.insert(g, pos);
            }
        }
    }

    // ---- faults and the operator ------------------------------------------------------

    fn faults_on(&self) -> bool {
        !self.settled && self.now < self.sc.duration
    }

    fn rearm(&mut self, every: Option<u64>, ev: Ev) {
        if let Some(m) = every {
            let d = self.rng.exp(m);
            self.after(d, ev);
        }
    }

    fn cut(&mut self, a: usize, b: usize, on: bool) {
        let e = self.cuts.entry((a.min(b), a.max(b))).or_insert(0);
        if on {
            *e += 1;
        } else {
            *e = e.saturating_sub(1);
        }
        let n = *e;
        self.log(format!(
            "link {}-{} {}",
            self.regions[a].name,
            self.regions[b].name,
            if n > 0 { "cut" } else { "healed" }
        ));
    }

    fn random_region(&mut self) -> usize {
        self.rng.below(self.regions.len() as u64) as usize
    }

    fn fault(&mut self, ev: &Ev) {
        if !self.faults_on() {
            return;
        }
        let f = self.sc.faults.clone();
        let n = self.regions.len();
        match ev {
            Ev::FaultCut => {
                let a = self.random_region();
                let b = (a + 1 + self.rng.below(n as u64 - 1) as usize) % n;
                self.cut(a, b, true);
                let d = f.cut_for / 2 + self.rng.upto(f.cut_for);
                self.after(d, Ev::Heal(a, b));
                self.rearm(f.cut_every, Ev::FaultCut);
            }
            Ev::FaultIsolate => {
                let a = self.random_region();
                let d = f.isolate_for / 2 + self.rng.upto(f.isolate_for);
                for b in (0..n).filter(|b| *b != a) {
                    self.cut(a, b, true);
                    self.after(d, Ev::Heal(a, b));
                }
                self.rearm(f.isolate_every, Ev::FaultIsolate);
            }
            Ev::FaultCrash => {
                let a = self.random_region();
                self.crash(a);
                let d = f.down_for / 2 + self.rng.upto(f.down_for);
                self.after(d, Ev::Restart(a));
                self.rearm(f.crash_every, Ev::FaultCrash);
            }
            Ev::FaultSwitchover => {
                let to = self.pick_target();
                self.after(
                    0,
                    Ev::OpStart {
                        kind: OpKind::Switchover,
                        to,
                    },
                );
                self.rearm(f.switchover_every, Ev::FaultSwitchover);
            }
            Ev::FaultForced => {
                let to = self.pick_target();
                self.after(
                    0,
                    Ev::OpStart {
                        kind: OpKind::Forced,
                        to,
                    },
                );
                self.rearm(f.forced_failover_every, Ev::FaultForced);
            }
            Ev::FaultRegionLoss => {
                // The primary's region is lost: cut off from every peer, and (half of the time)
                // its process dies too. An operator forces a failover a little later; the region
                // comes back (rejoins) after `region_loss_for`.
                let a = self.idx(&self.latest.primary.clone());
                let d = f.region_loss_for / 2 + self.rng.upto(f.region_loss_for);
                for b in (0..n).filter(|b| *b != a) {
                    self.cut(a, b, true);
                    self.after(d, Ev::Heal(a, b));
                }
                if self.rng.chance(0.5) {
                    self.crash(a);
                    self.after(d, Ev::Restart(a));
                }
                let to = self.pick_target();
                let wait = self.rng.upto(3_000);
                self.after(
                    wait,
                    Ev::OpStart {
                        kind: OpKind::Forced,
                        to,
                    },
                );
                self.rearm(f.region_loss_every, Ev::FaultRegionLoss);
            }
            _ => {}
        }
    }

    fn pick_target(&mut self) -> Option<usize> {
        let others: Vec<usize> = self
            .rule_regions
            .iter()
            .filter(|r| **r != self.latest.primary)
            .map(|r| self.idx(r))
            .collect();
        if others.is_empty() {
            return None;
        }
        let i = self.rng.below(others.len() as u64) as usize;
        Some(others[i])
    }

    /// `ferry failover`: plan from the newest state any reachable region knows, then carry out
    /// the production `switchover::Switchover`'s steps against the regions (the admin API's
    /// fence, promote and adopt, modelled in `admin_fence` and `op_poll`).
    fn op_start(&mut self, kind: OpKind, to: Option<usize>) {
        let Some(to) = to else { return };
        if self.op_busy || !self.regions[to].up {
            self.log(format!(
                "operator: {kind:?} to {} skipped",
                self.regions[to].name
            ));
            return;
        }
        let states: BTreeMap<String, RuleState> = (0..self.regions.len())
            .filter(|r| self.regions[*r].up)
            .map(|r| (self.regions[r].name.clone(), self.rule_state(r)))
            .collect();
        let to_name = self.regions[to].name.clone();
        let planned = switchover::plan(
            &self.rule_pattern,
            &self.rule_regions,
            &to_name,
            crate::failover::region_index(&self.topo, &to_name),
            &states,
            matches!(kind, OpKind::Forced),
            OP_TIMEOUT_MS,
            OP_TIMEOUT_MS,
        );
        let mut op = match planned {
            Err(e) => {
                self.log(format!("operator: {kind:?} to {to_name}: {e}"));
                return;
            }
            Ok(switchover::Plan::Already { .. }) => return,
            Ok(switchover::Plan::Unfence { request, .. }) => {
                let r = self.admin_fence(to, &request).map(|_| ());
                self.log(format!("operator: unfence {to_name}: {r:?}"));
                return;
            }
            Ok(switchover::Plan::Move(op)) => op,
        };
        self.log(format!(
            "operator: {kind:?} {} -> {} epoch={}",
            op.from, op.to, op.epoch
        ));
        self.op_busy = true;
        let step = op.start();
        self.op_step(op, step);
    }

    /// Carry out one step of the operator's switchover.
    fn op_step(&mut self, mut op: switchover::Switchover, step: switchover::Step) {
        use switchover::Step;
        match step {
            Step::Fence { region, request } => {
                let answer = self.admin_fence(self.idx(&region), &request);
                let next = op.fenced(answer);
                self.op_step(op, next);
            }
            Step::Promote { request, .. } => {
                let deadline = self.now + request.timeout_ms;
                self.after(
                    0,
                    Ev::OpPoll {
                        op: Box::new(op),
                        request: Box::new(request),
                        deadline,
                    },
                );
            }
            Step::Unfence { region, request } => {
                let answer = self.admin_fence(self.idx(&region), &request).map(|_| ());
                let next = op.unfenced(answer);
                self.op_step(op, next);
            }
            Step::Adopt { regions, request } => {
                // Every other reachable region adopts the new epoch.
                for name in regions {
                    let r = self.idx(&name);
                    if self.regions[r].up && self.rule_state(r).epoch < request.state.epoch {
                        self.apply(r, request.state.clone());
                    }
                }
                self.op_busy = false;
            }
            Step::Failed(why) => {
                self.op_busy = false;
                self.log(format!("operator: abandoned: {why}"));
            }
        }
    }

    /// `POST /v1/fence` on region `r`, as `mirror::admin` serves it: only on the primary; under
    /// lease fencing the fence lapses after `lapse_ms` on the region's wall clock; the answer
    /// holds its log ends and epoch histories, final while fenced.
    fn admin_fence(
        &mut self,
        r: usize,
        request: &switchover::FenceRequest,
    ) -> Result<switchover::FenceAnswer, String> {
        let name = self.regions[r].name.clone();
        if !self.regions[r].up {
            return Err(format!("{name} does not answer"));
        }
        let st = self.rule_state(r);
        if st.primary != name {
            return Err(format!("{name} is not the primary ({} is)", st.primary));
        }
        let fence_until_ms = match request.lapse_ms {
            Some(ms) if request.fenced && self.fencing == Fencing::Lease => Some(self.wall(r) + ms),
            _ => None,
        };
        self.apply(
            r,
            RuleState {
                fenced: request.fenced,
                fence_until_ms,
                ..st
            },
        );
        let o = self.offsets_of(r);
        let pattern = self.rule_pattern.clone();
        Ok(switchover::FenceAnswer {
            fenced: request.fenced,
            fence_until_ms,
            ends: BTreeMap::from([(
                pattern.clone(),
                o.iter()
                    .map(|(t, ps)| (t.clone(), ps.iter().map(|p| p.log_end).collect()))
                    .collect(),
            )]),
            epochs: BTreeMap::from([(
                pattern,
                o.into_iter()
                    .map(|(t, ps)| (t, ps.into_iter().map(|p| p.epochs).collect()))
                    .collect(),
            )]),
        })
    }

    /// `POST /v1/promote` on the target, as `mirror::admin` serves it, polled every
    /// `OP_POLL_MS` until it is ready or its deadline: refused once the rule moved into the
    /// promotion's epoch block (`switchover::moved_on`); planned, it waits for
    /// `switchover::not_caught_up` to come back empty and refuses past `not_after_ms`
    /// (`switchover::too_late`); forced, it waits for the old primary's lease
    /// (`Liveness::may_take_over`).
    fn op_poll(
        &mut self,
        mut op: Box<switchover::Switchover>,
        request: Box<switchover::PromoteRequest>,
        deadline: u64,
    ) {
        let to = self.idx(&op.to);
        let from = self.idx(&op.from);
        let refuse = |w: &mut World, mut op: Box<switchover::Switchover>, why: &str| {
            let next = op.promoted(Err(why.to_string()));
            w.op_step(*op, next);
        };
        if !self.regions[to].up {
            return refuse(self, op, "the target is down");
        }
        if switchover::moved_on(self.rule_state(to).epoch, request.epoch) {
            return refuse(self, op, "the epoch moved on");
        }
        let ready = if request.force {
            let now = self.local(to);
            self.regions[to]
                .live
                .may_take_over(&self.regions[from].name, now)
        } else {
            let parts = &self.regions[to].parts;
            let have = |_: &str, p: usize| parts.get(p).map(|x| (x.end(), x.epochs.clone()));
            switchover::not_caught_up(have, &request.wait_for, &request.wait_epochs).is_empty()
        };
        if !ready {
            if self.now > deadline {
                return refuse(self, op, "timed out");
            }
            self.after(
                OP_POLL_MS,
                Ev::OpPoll {
                    op,
                    request,
                    deadline,
                },
            );
            return;
        }
        if switchover::too_late(request.not_after_ms, self.wall(to)).is_some() {
            return refuse(self, op, "too late to promote: the fence is about to lapse");
        }
        let how = if request.force {
            Takeover::Forced
        } else {
            Takeover::Planned
        };
        if !self.take_over(to, from, request.epoch, how) {
            return refuse(self, op, "the promotion was refused");
        }
        if !request.force {
            self.stats.switchovers += 1;
        }
        let next = op.promoted(Ok(()));
        self.op_step(*op, next);
    }

    fn settle(&mut self) {
        self.settled = true;
        self.log("settle: faults stop, links heal, regions restart".into());
        let keys: Vec<(usize, usize)> = self.cuts.keys().copied().collect();
        for k in keys {
            self.cuts.insert(k, 0);
        }
        for r in 0..self.regions.len() {
            self.restart(r);
        }
    }

    // ---- the loop -----------------------------------------------------------------------

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::ProducerTick(p) => self.producer_tick(p),
            Ev::ProducerSend(p) => self.producer_send(p),
            Ev::ProducerTimeout(p, req) => self.producer_timeout(p, req),
            Ev::ProduceArrive {
                region,
                inc,
                producer,
                req,
                part,
                payload,
            } => {
                if self.regions[region].up && self.regions[region].incarnation == inc {
                    self.produce(region, producer, req, part, payload);
                }
            }
            Ev::ProduceReply {
                producer,
                req,
                result,
            } => self.produce_reply(producer, req, result),
            Ev::Fsync(r, inc) => {
                if self.regions[r].up && self.regions[r].incarnation == inc {
                    self.fsync(r);
                }
            }
            Ev::Deliver {
                from,
                to,
                from_inc,
                to_inc,
                msg,
            } => {
                let alive = |w: &World, r: usize, inc: u64| {
                    w.regions[r].up && w.regions[r].incarnation == inc
                };
                if !alive(self, from, from_inc)
                    || !alive(self, to, to_inc)
                    || self.link_cut(from, to)
                {
                    return;
                }
                self.deliver(from, to, msg);
            }
            Ev::Heartbeat(r, inc) => {
                if self.regions[r].up && self.regions[r].incarnation == inc {
                    self.heartbeat(r);
                }
            }
            Ev::LeaseTick(r, inc) => {
                if self.regions[r].up && self.regions[r].incarnation == inc {
                    self.lease_tick(r);
                }
            }
            Ev::OffsetSync(r, inc) => {
                if self.regions[r].up && self.regions[r].incarnation == inc {
                    self.offset_sync(r);
                }
            }
            Ev::StreamTimer {
                region,
                inc,
                peer,
                part,
                session,
                attempt,
            } => {
                if self.regions[region].up && self.regions[region].incarnation == inc {
                    self.stream_timer(region, peer, part, session, attempt);
                }
            }
            Ev::FrameTimer {
                region,
                inc,
                peer,
                part,
                session,
            } => {
                if self.regions[region].up && self.regions[region].incarnation == inc {
                    self.frame_timer(region, peer, part, session);
                }
            }
            Ev::StreamRetry {
                region,
                inc,
                peer,
                part,
            } => {
                if self.regions[region].up && self.regions[region].incarnation == inc {
                    let s = &mut self.regions[region].streams[peer][part];
                    s.backoff = false;
                    self.pump(region, peer, part);
                }
            }
            Ev::ConsumerPoll(c) => self.consumer_poll(c),
            Ev::ConsumerCommit(c) => self.consumer_commit(c),
            Ev::Heal(a, b) => {
                if !self.settled {
                    self.cut(a, b, false);
                }
            }
            Ev::Restart(r) => self.restart(r),
            Ev::OpStart { kind, to } => {
                if self.faults_on() {
                    self.op_start(kind, to)
                }
            }
            Ev::OpPoll {
                op,
                request,
                deadline,
            } => self.op_poll(op, request, deadline),
            Ev::Settle => self.settle(),
            e @ (Ev::FaultCut
            | Ev::FaultIsolate
            | Ev::FaultCrash
            | Ev::FaultSwitchover
            | Ev::FaultForced
            | Ev::FaultRegionLoss) => self.fault(&e),
        }
    }

    fn deliver(&mut self, from: usize, to: usize, msg: Msg) {
        match msg {
            Msg::Heartbeat {
                sent_at,
                sent_sim,
                hb,
            } => self.on_heartbeat(to, from, sent_at, sent_sim, *hb),
            Msg::HeartbeatAck { credit } => {
                let name = self.regions[from].name.clone();
                self.regions[to].live.on_ack(&name, credit);
            }
            Msg::Open {
                session,
                part,
                epoch,
            } => self.on_open(to, from, part, session, epoch),
            Msg::Position {
                session,
                part,
                log_end,
                epochs,
            } => self.on_position(to, from, part, session, log_end, epochs),
            Msg::Refused { session, part } | Msg::Error { session, part } => {
                if self.regions[to].streams[from][part].session == session {
                    self.reset_stream(to, from, part);
                }
            }
            Msg::Truncate {
                session,
                part,
                offset,
            } => self.on_truncate(to, from, part, session, offset),
            Msg::Batches {
                session,
                part,
                seq,
                first,
                records,
            } => self.on_batches(to, from, part, session, seq, first, records),
            Msg::Ack {
                session,
                part,
                log_end,
            } => self.on_ack(to, from, part, session, log_end),
            Msg::Offsets { group, entries } => self.on_offsets(to, from, group, entries),
        }
    }

    /// Keep every trace line (for `--verbose`).
    pub fn keep_trace(&mut self) {
        self.trace.keep_all = true;
    }

    /// Run, and return every trace line kept (none unless [`World::keep_trace`]).
    pub fn run_keep(mut self) -> (Outcome, Vec<String>) {
        let lines = std::mem::take(&mut self.trace.all);
        let mut w = self;
        w.trace.all = lines;
        w.run_inner()
    }

    /// Run to the end (or the first broken invariant).
    pub fn run(self) -> Outcome {
        self.run_inner().0
    }

    fn run_inner(mut self) -> (Outcome, Vec<String>) {
        let end = self.sc.duration + self.sc.settle;
        while let Some(s) = self.queue.pop() {
            if s.at > end || self.failure.is_some() {
                break;
            }
            self.now = s.at;
            let line = s.ev.line();
            self.log(line);
            self.dispatch(s.ev);
        }
        self.now = end;
        if self.failure.is_none() {
            self.final_checks();
        }
        self.stats.sim_ms = end;
        self.stats.events = self.trace.events();
        self.stats.trace_hash = self.trace.hash();
        self.stats.mean_lag = if self.lag_samples > 0 {
            self.lag_sum / self.lag_samples as f64
        } else {
            0.0
        };
        self.stats.failure = self.failure.take();
        let lines = std::mem::take(&mut self.trace.all);
        (self.stats, lines)
    }

    fn final_checks(&mut self) {
        let primary = self.idx(&self.latest.primary.clone());
        // Every region agrees on the rule and holds the primary's log (lag zero).
        for r in 0..self.regions.len() {
            let st = self.rule_state(r);
            if st.epoch != self.latest.epoch || st.primary != self.latest.primary || st.fenced {
                let m = format!(
                    "after settling, {} is at epoch {} ({}{}) but the newest is {} ({})",
                    self.regions[r].name,
                    st.epoch,
                    st.primary,
                    if st.fenced { ", fenced" } else { "" },
                    self.latest.epoch,
                    self.latest.primary
                );
                self.fail("lag-zero", m);
            }
        }
        for r in 0..self.regions.len() {
            if r == primary {
                continue;
            }
            for p in 0..self.nparts {
                let a = &self.regions[primary].parts[p].log;
                let b = &self.regions[r].parts[p].log;
                let n = a.len().min(b.len());
                let diverged = (0..n).find(|i| a[*i] != b[*i]).map(|o| {
                    format!(
                        "partition {p} offset {o}: {} holds {:?}, {} holds {:?}",
                        self.regions[primary].name, a[o], self.regions[r].name, b[o]
                    )
                });
                let lagging = (a.len() != b.len()).then(|| {
                    format!(
                        "after settling, {} ends partition {p} at {} but the primary {} at {}",
                        self.regions[r].name,
                        b.len(),
                        self.regions[primary].name,
                        a.len()
                    )
                });
                if let Some(m) = diverged {
                    self.fail("no-divergence", m);
                }
                if let Some(m) = lagging {
                    self.fail("lag-zero", m);
                }
            }
        }
        for c in 0..self.consumers.len() {
            for p in 0..self.nparts {
                let end = self.regions[primary].parts[p].end();
                let pos = self.consumers[c].pos[p];
                if self.consumers[c].region != Some(primary) || pos < end {
                    let m = format!(
                        "after settling, group {} is at {pos} of partition {p} ({:?}), the log ends at {end} in {}",
                        self.consumers[c].group,
                        self.consumers[c].region.map(|r| self.regions[r].name.clone()),
                        self.regions[primary].name
                    );
                    self.fail("lag-zero", m);
                }
            }
        }
        // Every acknowledged record is where it was acknowledged, unless a forced failover
        // reported it as possibly lost.
        let acked = std::mem::take(&mut self.acked);
        let mut lost = 0u64;
        for a in &acked {
            let log = &self.regions[primary].parts[a.part].log;
            let there = log
                .get(a.offset as usize)
                .is_some_and(|r| r.payload == a.payload);
            if there {
                continue;
            }
            let reported = self.reports.iter().any(|rep| {
                a.epoch <= rep.old_epoch
                    && (rep.ranges[a.part].0 <= a.offset && a.offset < rep.ranges[a.part].1
                        || a.at >= rep.window_start)
            });
            if reported {
                lost += 1;
            } else {
                let m = format!(
                    "record {:x} acknowledged by {} at {} ms (partition {}, offset {}, epoch {}) is missing and no failover reported it",
                    a.payload, self.regions[a.region].name, a.at, a.part, a.offset, a.epoch
                );
                self.fail("acked-not-lost", m);
            }
        }
        self.stats.rpo_records = lost;
        self.acked = acked;
    }
}

/// Run one seed of a scenario.
pub fn run(sc: &Scenario, seed: u64, ov: &Overrides) -> Result<Outcome, super::SimError> {
    Ok(World::new(sc, seed, ov)?.run())
}
