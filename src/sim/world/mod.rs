//! The simulated world: regions (broker + gateway each), WAN links, producers, consumer groups,
//! an operator, and the fault injector, driven by one event queue under simulated time.
//!
//! Owns: the discrete-event loop (events ordered by `(time, sequence number)`), the models of
//! everything that in production is I/O (logs in memory with a durable prefix and the broker's
//! rules around them, links that delay, lose, duplicate and reorder messages, a model of QUIC's
//! ordered streams, process crashes, per-process clocks that drift), clients, the operator's
//! transport, and the invariant checks. The submodules drive, per region, the production
//! machines: `heartbeats` (`Liveness`), `mirror_source` (`SourceStream`), `mirror_sink`
//! (`SinkStream`), `group_sync` (`offsets`), `operator` (`Switchover`); `broker` and
//! `clients` are models. Does not own: any decision of the gateway's ([`crate::mirror::core`],
//! [`crate::failover`]).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use super::rng::Rng;
use super::scenario::{Scenario, TOPIC};
use super::trace::Trace;
use crate::failover::lease::Millis;
use crate::failover::{placement, rule_regions, switchover, Placement, RegionState, RuleState};
use crate::log::epochs::EpochEntry;
use crate::mirror::core::reorder::Payload;
use crate::mirror::core::sink::SinkStream;
use crate::mirror::core::source::{Phase, SourceStream};
use crate::mirror::core::{offsets, Heartbeat, Liveness};
use crate::topology::{Fencing, ReplicationMode, Topology};

mod broker;
mod clients;
mod group_sync;
mod heartbeats;
mod mirror_sink;
mod mirror_source;
mod operator;

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
                    // Under lease fencing the broker's lease is armed from its first start.
                    armed: crate::broker::lease_fenced_in(&topo, name),
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
        let c = self.rng.below(offsets::OFFSET_SYNC_INTERVAL_MS);
        self.after(a, Ev::Heartbeat(r, inc));
        self.arm_lease_tick(r);
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
