//! The hot path: opportunities → one ingest thread, the ring's only producer →
//! lock-free SPSC ring (`rtrb`) → one strategy thread, its only consumer → sender.
//! The ingest thread reads searchers' frames from its own QUIC endpoint
//! ([`super::ingest`], `strategy.ingest`); other producers (HTTP handlers,
//! in-process searchers) hand it batches through a bounded channel and learn how
//! many the ring took.
//!
//! The strategy thread pops batches, scores each module's rows with that module's
//! model in one call (or uses the opportunity's own `ev` when no model serves it),
//! then gates every opportunity on the module's state as the control commands left
//! it: not `running` (stopped, killed) → no send; `ev_min` from `policy` → score
//! below it, no send; `throttle_pct` → only that share of the opportunities that
//! passed go out (exactly: a credit of pct/100 per opportunity, a send per whole
//! credit) and, when `max_sends_per_sec` is set, at most pct % of that rate;
//! `tip_ladder` from `policy` → the highest tip the score covers picks which of the
//! opportunity's pre-signed transactions goes (one per rung). Each decision is
//! counted by reason; the sends themselves are audited by the sender.

use crate::config::OutOfBounds;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gw_core::contract::Requester;
use gw_core::module_state::{ModuleState, Refusal, Throttle};
use gw_core::Module;
use serde::Deserialize;

use super::ingest::{IngestConfig, IngestSetup, IngestStats};
use super::{SendMeta, Sender};
use crate::control::ModuleTable;
use crate::models::ModelHost;

/// `strategy` in the sender configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrategyConfig {
    /// Opportunities the ring holds (allocated whole at start).
    #[serde(default = "default_ring")]
    pub ring_capacity: usize,
    /// Most opportunities taken per batch.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Sends per second per module at `throttle_pct = 100` (0: no rate cap).
    #[serde(default)]
    pub max_sends_per_sec: u32,
    /// Sends in flight at most (each waits for a route); beyond it opportunities
    /// are skipped as `saturated`, so a stalled route cannot pile up memory.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: usize,
    /// The QUIC ingest endpoint for searchers (off without it).
    #[serde(default)]
    pub ingest: Option<IngestConfig>,
}

fn default_max_inflight() -> usize {
    4096
}

fn default_ring() -> usize {
    4096
}
fn default_batch() -> usize {
    64
}

impl Default for StrategyConfig {
    fn default() -> Self {
        StrategyConfig {
            ring_capacity: default_ring(),
            batch: default_batch(),
            max_sends_per_sec: 0,
            max_inflight: default_max_inflight(),
            ingest: None,
        }
    }
}

impl StrategyConfig {
    /// Checks the bounds.
    pub fn validate(&self) -> Result<(), OutOfBounds> {
        if let Some(i) = &self.ingest {
            i.validate()?;
        }
        if self.ring_capacity == 0 || self.ring_capacity > MAX_RING_CAPACITY {
            return Err(OutOfBounds::new(
                "sender.strategy.ring_capacity",
                "must be within 1..=1048576",
            ));
        }
        if self.batch == 0 || self.batch > 4096 {
            return Err(OutOfBounds::new(
                "sender.strategy.batch",
                "must be within 1..=4096",
            ));
        }
        if self.max_inflight == 0 {
            return Err(OutOfBounds::new(
                "sender.strategy.max_inflight",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Largest ring (allocated at start: about 90 bytes an opportunity, so 90 MiB
/// at most; 2^30 aborted the start with an allocation of ≈ 94 GB).
pub const MAX_RING_CAPACITY: usize = 1 << 20;
/// Batches waiting for the ingest thread at most (a producer beyond it is refused).
pub const INGEST_QUEUE: usize = 64;

/// One signed transaction ready to go.
#[derive(Debug, Clone)]
pub struct SignedTx {
    /// Wire bytes.
    pub wire: Bytes,
    /// Base58 first signature.
    pub signature: String,
}

/// Something worth sending, as a searcher found it.
#[derive(Debug, Clone)]
pub struct Opportunity {
    /// Which module's state gates it and which model scores it.
    pub module: Module,
    /// Model features (NaN = missing).
    pub features: Vec<f32>,
    /// The producer's own expected value, used when no model serves the module.
    pub ev: Option<f32>,
    /// Pre-signed variants, one per tip-ladder rung (lowest first); one is enough
    /// without a ladder.
    pub txs: Vec<SignedTx>,
    /// When the gateway received it (the decision latency is measured from here).
    pub received: Instant,
    /// Who sent it (its send's audit row names them).
    pub requester: Arc<Requester>,
}

/// Why an opportunity was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Skip {
    /// Module stopped.
    Stopped,
    /// Module killed.
    Killed,
    /// Throttled (share or rate).
    Throttled,
    /// Score below `ev_min`.
    BelowEvMin,
    /// Score below the lowest tip.
    BelowTip,
    /// No model and no `ev`, the model failed, or the opportunity's features do
    /// not fit its module's model (the searcher's own `ev` is then not taken).
    NoScore,
    /// No transaction attached.
    NoTx,
    /// `max_inflight` sends are already waiting for a route.
    Saturated,
}

impl Skip {
    /// Every reason, in declaration order (`Skip::ALL[r as usize] == r`).
    pub const ALL: [Skip; 8] = [
        Skip::Stopped,
        Skip::Killed,
        Skip::Throttled,
        Skip::BelowEvMin,
        Skip::BelowTip,
        Skip::NoScore,
        Skip::NoTx,
        Skip::Saturated,
    ];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::Stopped => "stopped",
            Skip::Killed => "killed",
            Skip::Throttled => "throttled",
            Skip::BelowEvMin => "below_ev_min",
            Skip::BelowTip => "below_tip",
            Skip::NoScore => "no_score",
            Skip::NoTx => "no_tx",
            Skip::Saturated => "saturated",
        }
    }
}

/// Counters.
#[derive(Debug, Default)]
pub struct StrategyStats {
    /// Opportunities accepted into the ring.
    pub offered: AtomicU64,
    /// Opportunities refused because the ring was full.
    pub ring_full: AtomicU64,
    /// Opportunities handed to the sender.
    pub sent: AtomicU64,
    /// Skipped, by reason (indexed by `Skip as usize`; lock-free on the hot path).
    skipped: [AtomicU64; Skip::ALL.len()],
    /// Opportunities scored by a model.
    pub scored: AtomicU64,
    /// Opportunities the serving model failed to score (its `predict` returned an
    /// error; skipped as `no_score`), by module (in `Module::ALL`'s order).
    model_errors: [AtomicU64; Module::ALL.len()],
    /// Received → send decision, for each opportunity sent: bucket `i` counts
    /// latencies below 2^i µs (and at least 2^(i-1)); the last takes the rest.
    decision_us: [AtomicU64; DECISION_BUCKETS],
}

/// Buckets of [`StrategyStats::decision_buckets`].
pub const DECISION_BUCKETS: usize = 24;

impl StrategyStats {
    fn skip(&self, why: Skip) {
        self.skipped[why as usize].fetch_add(1, Ordering::Relaxed);
    }
    /// Opportunities of `m` its serving model failed to score so far.
    pub fn model_errors(&self, m: Module) -> u64 {
        Module::ALL
            .iter()
            .position(|x| *x == m)
            .map_or(0, |i| self.model_errors[i].load(Ordering::Relaxed))
    }

    /// Skips so far for `why`.
    pub fn skipped(&self, why: Skip) -> u64 {
        self.skipped[why as usize].load(Ordering::Relaxed)
    }
    fn decided(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let i = (64 - us.leading_zeros() as usize).min(DECISION_BUCKETS - 1);
        self.decision_us[i].fetch_add(1, Ordering::Relaxed);
    }
    /// The decision-latency histogram: `(upper bound in µs, count)` per bucket,
    /// not cumulative; the last bound is `u64::MAX`.
    pub fn decision_buckets(&self) -> Vec<(u64, u64)> {
        self.decision_us
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let le = if i + 1 == DECISION_BUCKETS {
                    u64::MAX
                } else {
                    1u64 << i
                };
                (le, c.load(Ordering::Relaxed))
            })
            .collect()
    }
}

/// Picks the rung: the highest tip the score covers. `None`: below the lowest tip.
pub fn pick_rung(ladder: &[f64], ev: f32) -> Option<(usize, f64)> {
    if ladder.is_empty() {
        return Some((0, 0.0));
    }
    ladder
        .iter()
        .enumerate()
        .filter(|(_, t)| **t <= f64::from(ev))
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, t)| (i, *t))
}

/// The decision for one scored opportunity against its module's state: the one
/// send gate ([`ModuleState::may_send`]), the tip rung, then the throttle's share.
pub fn decide(
    state: &ModuleState,
    throttle: &mut Throttle,
    max_per_sec: u32,
    ev: f32,
    now: Instant,
) -> Result<(usize, f64), Skip> {
    state.may_send(Some(ev)).map_err(|r| match r {
        Refusal::Killed => Skip::Killed,
        Refusal::Stopped => Skip::Stopped,
        Refusal::ThrottledToZero => Skip::Throttled,
        Refusal::BelowEvMin => Skip::BelowEvMin,
        Refusal::NoScore => Skip::NoScore,
    })?;
    let rung = pick_rung(&state.tip_ladder, ev).ok_or(Skip::BelowTip)?;
    if !throttle.admit(state.throttle_pct, max_per_sec, now) {
        return Err(Skip::Throttled);
    }
    Ok(rung)
}

/// Where an offer's answer goes.
enum Reply {
    /// A thread waiting in [`HotPath::offer`].
    Blocking(mpsc::SyncSender<usize>),
    /// A task waiting in [`HotPath::offer_async`].
    Async(tokio::sync::oneshot::Sender<usize>),
}

struct Offer {
    items: Vec<Opportunity>,
    reply: Reply,
}

/// The running hot path (stops its threads on drop).
pub struct HotPath {
    ingest: Option<tokio::sync::mpsc::Sender<Offer>>,
    strategy: std::thread::Thread,
    stop: Arc<AtomicBool>,
    /// Set by the strategy thread when it has left its loop.
    finished: Arc<AtomicBool>,
    /// Sends the strategy started that have not ended.
    inflight: Arc<AtomicUsize>,
    joins: Vec<std::thread::JoinHandle<()>>,
    /// Counters.
    pub stats: Arc<StrategyStats>,
    /// Where the QUIC ingest endpoint listens (when configured).
    pub ingest_addr: Option<SocketAddr>,
    /// The ingest endpoint's counters.
    pub ingest_stats: Arc<IngestStats>,
}

impl Drop for HotPath {
    fn drop(&mut self) {
        // Closing the channel ends the ingest thread; the flag the strategy thread.
        self.ingest = None;
        self.stop.store(true, Ordering::Release);
        self.strategy.unpark();
        for j in self.joins.drain(..) {
            let _ = j.join();
        }
    }
}

impl HotPath {
    /// Starts the ingest and strategy threads; sends run on `rt`. With
    /// `config.ingest`, the ingest thread also serves the QUIC endpoint, presenting
    /// `identity` (the sender's); a bind failure is returned here.
    pub fn start(
        config: &StrategyConfig,
        sender: Arc<Sender>,
        modules: ModuleTable,
        models: Option<Arc<ModelHost>>,
        rt: tokio::runtime::Handle,
        identity: Option<&ed25519_dalek::SigningKey>,
    ) -> anyhow::Result<HotPath> {
        config.validate()?;
        let setup = match (&config.ingest, identity) {
            (Some(c), Some(k)) => Some(IngestSetup {
                config: c.clone(),
                identity: k.clone(),
            }),
            (Some(_), None) => anyhow::bail!("sender.strategy.ingest needs the sender's identity"),
            (None, _) => None,
        };
        let (producer, consumer) = rtrb::RingBuffer::new(config.ring_capacity);
        let stop = Arc::new(AtomicBool::new(false));
        let finished = Arc::new(AtomicBool::new(false));
        let inflight = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(StrategyStats::default());
        let gates = Module::ALL.map(|m| {
            let modules = modules.clone();
            super::SendGate::new(move || {
                modules.with(m, |s| s.state == gw_core::module_state::RunState::Running)
            })
        });
        let worker = Worker {
            consumer,
            sender,
            modules,
            models,
            rt,
            stop: stop.clone(),
            finished: finished.clone(),
            stats: stats.clone(),
            batch: config.batch,
            max_per_sec: config.max_sends_per_sec,
            max_inflight: config.max_inflight,
            inflight: inflight.clone(),
            throttles: BTreeMap::new(),
            ev_label: Arc::from("ev"),
            gates,
        };
        let strategy = std::thread::Builder::new()
            .name("gw-strategy".into())
            .spawn(move || {
                let _ = crate::sched::apply_here();
                worker.run();
            })?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Offer>(INGEST_QUEUE);
        let ingest = Ingest {
            producer,
            strategy: strategy.thread().clone(),
            stats: stats.clone(),
        };
        let ingest_stats = Arc::new(IngestStats::default());
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let ist = ingest_stats.clone();
        let ingest_join =
            std::thread::Builder::new()
                .name("gw-ingest".into())
                .spawn(move || {
                    let _ = crate::sched::apply_here();
                    ingest.run(rx, setup, ist, &ready_tx);
                })?;
        let mut hot = HotPath {
            ingest: Some(tx),
            strategy: strategy.thread().clone(),
            stop,
            finished,
            inflight,
            joins: vec![ingest_join, strategy],
            stats,
            ingest_addr: None,
            ingest_stats,
        };
        // Dropping `hot` on an error stops both threads.
        hot.ingest_addr = ready_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the ingest thread ended while starting"))??;
        Ok(hot)
    }

    /// Stops deciding (at shutdown): the strategy thread leaves its loop after the
    /// batch in hand; opportunities still in the ring are not sent.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.strategy.unpark();
    }

    /// Whether the strategy thread has stopped and every send it started has ended
    /// (its audit row recorded).
    pub fn idle(&self) -> bool {
        self.finished.load(Ordering::Acquire) && self.inflight.load(Ordering::Acquire) == 0
    }

    fn hand_off(&self, items: Vec<Opportunity>, reply: Reply) -> Result<(), usize> {
        let n = items.len();
        let Some(tx) = &self.ingest else {
            return Err(n);
        };
        tx.try_send(Offer { items, reply }).map_err(|_| n)
    }

    fn refused(&self, n: usize) -> usize {
        self.stats.ring_full.fetch_add(n as u64, Ordering::Relaxed);
        0
    }

    /// Offers opportunities from a thread (not a tokio task: it blocks until the
    /// ingest thread answered); returns how many the ring took. The rest are counted
    /// as `ring_full` and dropped: a searcher is never made to wait for room.
    pub fn offer(&self, items: Vec<Opportunity>) -> usize {
        let (tx, rx) = mpsc::sync_channel(1);
        match self.hand_off(items, Reply::Blocking(tx)) {
            Ok(()) => rx.recv().unwrap_or(0),
            Err(n) => self.refused(n),
        }
    }

    /// [`Self::offer`] for async callers (HTTP handlers).
    pub async fn offer_async(&self, items: Vec<Opportunity>) -> usize {
        let (tx, rx) = tokio::sync::oneshot::channel();
        match self.hand_off(items, Reply::Async(tx)) {
            Ok(()) => rx.await.unwrap_or(0),
            Err(n) => self.refused(n),
        }
    }
}

/// The ring's only producer.
struct Ingest {
    producer: rtrb::Producer<Opportunity>,
    strategy: std::thread::Thread,
    stats: Arc<StrategyStats>,
}

impl Ingest {
    /// The ingest thread: a current-thread runtime serving the QUIC endpoint (when
    /// configured) and the other producers' channel; every push into the ring
    /// happens here. Reports the endpoint's address (or why it did not start) on
    /// `ready`, then runs until the channel closes.
    fn run(
        self,
        mut rx: tokio::sync::mpsc::Receiver<Offer>,
        setup: Option<IngestSetup>,
        stats: Arc<IngestStats>,
        ready: &mpsc::SyncSender<anyhow::Result<Option<SocketAddr>>>,
    ) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready.send(Err(e.into()));
                return;
            }
        };
        let me = Rc::new(RefCell::new(self));
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let endpoint = match setup.as_ref().map(super::ingest::bind).transpose() {
                Ok(ep) => ep,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            let addr = endpoint.as_ref().and_then(|e| e.local_addr().ok());
            let _ = ready.send(Ok(addr));
            if let (Some(ep), Some(setup)) = (endpoint.clone(), setup) {
                let ring = me.clone();
                let push: Rc<dyn Fn(Vec<Opportunity>) -> usize> =
                    Rc::new(move |items| ring.borrow_mut().push(items));
                tokio::task::spawn_local(super::ingest::serve(ep, setup.config, stats, push));
            }
            while let Some(offer) = rx.recv().await {
                let took = me.borrow_mut().push(offer.items);
                match offer.reply {
                    Reply::Blocking(r) => {
                        let _ = r.send(took);
                    }
                    Reply::Async(r) => {
                        let _ = r.send(took);
                    }
                }
            }
            if let Some(ep) = endpoint {
                ep.close(0u32.into(), b"shutdown");
                // Let the CONNECTION_CLOSE frames go out before the runtime ends.
                let _ = tokio::time::timeout(Duration::from_millis(200), ep.wait_idle()).await;
            }
        });
    }

    fn push(&mut self, items: Vec<Opportunity>) -> usize {
        let total = items.len();
        let n = self.producer.slots().min(total);
        let took = match self.producer.write_chunk_uninit(n) {
            Ok(chunk) => chunk.fill_from_iter(items),
            Err(_) => 0,
        };
        self.stats.offered.fetch_add(took as u64, Ordering::Relaxed);
        self.stats
            .ring_full
            .fetch_add((total - took) as u64, Ordering::Relaxed);
        if took > 0 {
            self.strategy.unpark();
        }
        took
    }
}

struct Worker {
    consumer: rtrb::Consumer<Opportunity>,
    sender: Arc<Sender>,
    modules: ModuleTable,
    models: Option<Arc<ModelHost>>,
    rt: tokio::runtime::Handle,
    stop: Arc<AtomicBool>,
    finished: Arc<AtomicBool>,
    stats: Arc<StrategyStats>,
    batch: usize,
    max_per_sec: u32,
    max_inflight: usize,
    inflight: Arc<AtomicUsize>,
    throttles: BTreeMap<&'static str, Throttle>,
    /// The audit's `scored_by` of a send scored by its opportunity's own `ev`.
    ev_label: Arc<str>,
    /// Per module (as in `Module::ALL`), whether its sends' hedge legs may still
    /// go: made once, shared by every send.
    gates: [super::SendGate; Module::ALL.len()],
}

/// The label of the model that scored each module's opportunities in a batch
/// (modules not named were scored by their own `ev`).
type Scorers = Vec<(Module, Arc<str>)>;

/// Gives back one in-flight slot when a send ends (or its task is dropped).
struct InflightSlot(Arc<AtomicUsize>);

impl Drop for InflightSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Worker {
    fn run(mut self) {
        /// Says the thread has left its loop, also when it panics.
        struct Finished(Arc<AtomicBool>);
        impl Drop for Finished {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let _finished = Finished(self.finished.clone());
        let mut buf = Vec::with_capacity(self.batch);
        let mut idle = 0u32;
        while !self.stop.load(Ordering::Acquire) {
            buf.clear();
            let n = self.consumer.slots().min(self.batch);
            if let Ok(chunk) = self.consumer.read_chunk(n) {
                buf.extend(chunk);
            }
            if buf.is_empty() {
                // Spin briefly (latency), then park until the producer unparks us.
                idle += 1;
                if idle < 64 {
                    std::hint::spin_loop();
                } else {
                    std::thread::park_timeout(Duration::from_millis(50));
                }
                continue;
            }
            idle = 0;
            // The batch buffer is drained, not replaced: no allocation per batch.
            self.handle(&mut buf);
        }
    }

    fn handle(&mut self, batch: &mut Vec<Opportunity>) {
        // One look at the module states per batch.
        let snapshot = self.modules.snapshot();
        let states: BTreeMap<&'static str, &ModuleState> = Module::ALL
            .iter()
            .map(|x| (x.as_str(), snapshot.get(*x)))
            .collect();
        let (scores, scorers) = self.score(batch);
        let now = Instant::now();
        for (opp, ev) in batch.drain(..).zip(scores) {
            let name = opp.module.as_str();
            let Some(state) = states.get(name) else {
                continue;
            };
            let Some(ev) = ev else {
                self.stats.skip(Skip::NoScore);
                continue;
            };
            let throttle = self.throttles.entry(name).or_default();
            let rung = match decide(state, throttle, self.max_per_sec, ev, now) {
                Ok((rung, _)) => rung,
                Err(why) => {
                    self.stats.skip(why);
                    continue;
                }
            };
            // Fewer variants than rungs: the highest rung the searcher signed whose
            // tip the score covers (a ladder written before rungs had to ascend
            // may hold a higher tip lower down), audited with its own tip; none:
            // not sent.
            let rung = if rung < opp.txs.len() {
                rung
            } else {
                let signed = opp.txs.len().min(state.tip_ladder.len());
                pick_rung(&state.tip_ladder[..signed], ev).map_or(usize::MAX, |(i, _)| i)
            };
            let tip = state.tip_ladder.get(rung).copied().unwrap_or(0.0);
            let tx = opp.txs.get(rung).cloned();
            let saturated = self.inflight.load(Ordering::Acquire) >= self.max_inflight;
            let Some(tx) = tx.filter(|_| !saturated) else {
                // Not sent: the throttle's share is given back (only sends count).
                throttle.refund(state.throttle_pct, self.max_per_sec);
                self.stats.skip(if saturated {
                    Skip::Saturated
                } else {
                    Skip::NoTx
                });
                continue;
            };
            self.inflight.fetch_add(1, Ordering::AcqRel);
            let slot = InflightSlot(self.inflight.clone());
            self.stats.sent.fetch_add(1, Ordering::Relaxed);
            self.stats
                .decided(now.saturating_duration_since(opp.received));
            let sender = self.sender.clone();
            let scored_by = scorers
                .iter()
                .find(|(m, _)| *m == opp.module)
                .map_or_else(|| self.ev_label.clone(), |(_, l)| l.clone());
            let gate = Module::ALL
                .iter()
                .position(|m| *m == opp.module)
                .and_then(|i| self.gates.get(i))
                .cloned()
                .unwrap_or_default();
            let meta = SendMeta {
                source: "strategy",
                module: name,
                tip,
                score: Some(ev),
                scored_by: Some(scored_by),
                requester: opp.requester.clone(),
                gate,
            };
            self.rt.spawn(async move {
                sender.send(tx.wire, tx.signature, &meta).await;
                drop(slot);
            });
        }
    }

    /// Each opportunity's score: its module's model over the whole batch when the
    /// module has one, else the opportunity's own `ev`. Where a module has a model,
    /// only the model scores: an opportunity whose features do not fit it has no
    /// score (a searcher does not get past the model by sending other features and
    /// an `ev`), nor has any while no model serves (refused at start, still
    /// loading): a searcher's own `ev` is never taken for a model that is missing.
    ///
    /// Also returns, per module a model scored, the model's label (the others'
    /// scores are their own `ev`).
    fn score(&self, batch: &[Opportunity]) -> (Vec<Option<f32>>, Scorers) {
        let mut out: Vec<Option<f32>> = batch.iter().map(|o| o.ev).collect();
        let mut scorers = Vec::new();
        let Some(host) = &self.models else {
            return (out, scorers);
        };
        for m in Module::ALL {
            let Some(model) = host.current(m.as_str()) else {
                if host.linked(m.as_str()) {
                    for (i, _) in batch.iter().enumerate().filter(|(_, o)| o.module == m) {
                        out[i] = None;
                    }
                }
                continue;
            };
            scorers.push((m, model.label.clone()));
            let n = model.n_features as usize;
            let mut idx = Vec::new();
            for (i, o) in batch.iter().enumerate().filter(|(_, o)| o.module == m) {
                if o.features.len() == n {
                    idx.push(i);
                } else {
                    out[i] = None;
                }
            }
            if idx.is_empty() {
                continue;
            }
            let mut rows = Vec::with_capacity(idx.len() * n);
            for i in &idx {
                rows.extend_from_slice(&batch[*i].features);
            }
            let outs = model.n_outputs.max(1) as usize;
            match model.predict(&rows) {
                Ok(scores) => {
                    for (k, i) in idx.iter().enumerate() {
                        out[*i] = scores.get(k * outs).copied();
                    }
                    self.stats
                        .scored
                        .fetch_add(idx.len() as u64, Ordering::Relaxed);
                }
                Err(_) => {
                    if let Some(c) = Module::ALL
                        .iter()
                        .position(|x| *x == m)
                        .and_then(|i| self.stats.model_errors.get(i))
                    {
                        c.fetch_add(idx.len() as u64, Ordering::Relaxed);
                    }
                    for i in idx {
                        out[i] = None;
                    }
                }
            }
        }
        (out, scorers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use gw_core::module_state::RunState;

    fn running() -> ModuleState {
        ModuleState {
            state: RunState::Running,
            ..ModuleState::default()
        }
    }

    #[test]
    fn every_skip_reason_has_its_own_counter() {
        for (i, w) in Skip::ALL.iter().enumerate() {
            assert_eq!(*w as usize, i);
        }
        let st = StrategyStats::default();
        st.skip(Skip::Saturated);
        assert_eq!(
            (st.skipped(Skip::Saturated), st.skipped(Skip::NoTx)),
            (1, 0)
        );
    }

    #[test]
    fn decisions_follow_the_module_state() {
        let now = Instant::now();
        let mut t = Throttle::default();
        let mut s = running();
        assert_eq!(decide(&s, &mut t, 0, 1.0, now), Ok((0, 0.0)));
        s.state = RunState::Killed;
        assert_eq!(decide(&s, &mut t, 0, 1.0, now), Err(Skip::Killed));
        s.state = RunState::Stopped;
        assert_eq!(decide(&s, &mut t, 0, 1.0, now), Err(Skip::Stopped));
        s = running();
        s.ev_min = Some(2.0);
        assert_eq!(decide(&s, &mut t, 0, 1.5, now), Err(Skip::BelowEvMin));
        assert_eq!(decide(&s, &mut t, 0, f32::NAN, now), Err(Skip::NoScore));
        s.tip_ladder = vec![1.0, 3.0, 5.0];
        assert_eq!(decide(&s, &mut t, 0, 4.0, now), Ok((1, 3.0)));
        assert_eq!(decide(&s, &mut t, 0, 9.0, now), Ok((2, 5.0)));
        s.ev_min = None;
        assert_eq!(decide(&s, &mut t, 0, 0.5, now), Err(Skip::BelowTip));
        s.throttle_pct = 0;
        assert_eq!(decide(&s, &mut t, 0, 9.0, now), Err(Skip::Throttled));
    }
}
