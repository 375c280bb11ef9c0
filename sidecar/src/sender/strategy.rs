//! The hot path: opportunities → lock-free SPSC ring (`gw-ring`) → strategy thread →
//! sender.
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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gw_core::Module;
use serde::Deserialize;

use super::{SendMeta, Sender};
use crate::models::ModelHost;
use crate::modules::{ModuleState, Modules, RunState};

/// `strategy` in the sender configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrategyConfig {
    /// Opportunities the ring holds (rounded up to a power of two).
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
        }
    }
}

impl StrategyConfig {
    /// Checks the bounds.
    pub fn validate(&self) -> Result<(), String> {
        if self.ring_capacity == 0 || self.ring_capacity > gw_ring::MAX_CAPACITY {
            return Err("sender.strategy.ring_capacity must be within 1..=2^30".into());
        }
        if self.batch == 0 || self.batch > 4096 {
            return Err("sender.strategy.batch must be within 1..=4096".into());
        }
        if self.max_inflight == 0 {
            return Err("sender.strategy.max_inflight must be at least 1".into());
        }
        Ok(())
    }
}

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
    /// No model and no `ev`, or the model failed.
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
}

impl StrategyStats {
    fn skip(&self, why: Skip) {
        self.skipped[why as usize].fetch_add(1, Ordering::Relaxed);
    }
    /// Skips so far for `why`.
    pub fn skipped(&self, why: Skip) -> u64 {
        self.skipped[why as usize].load(Ordering::Relaxed)
    }
}

/// The per-module throttle: an exact share and an optional rate cap.
#[derive(Debug, Clone)]
pub struct Throttle {
    credit: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl Default for Throttle {
    fn default() -> Self {
        // The share starts with no credit (exactly pct % of any window from the
        // first opportunity); the rate bucket starts with one token.
        Throttle {
            credit: 0.0,
            tokens: 1.0,
            last: None,
        }
    }
}

impl Throttle {
    /// Whether one more send may go at `now`, given `pct` and the rate at 100 %.
    pub fn admit(&mut self, pct: u8, max_per_sec: u32, now: Instant) -> bool {
        let share = f64::from(pct.min(100)) / 100.0;
        if max_per_sec > 0 {
            let rate = f64::from(max_per_sec) * share;
            if let Some(last) = self.last {
                self.tokens = (self.tokens
                    + now.saturating_duration_since(last).as_secs_f64() * rate)
                    .min(rate.max(1.0));
            }
            self.last = Some(now);
            if self.tokens < 1.0 {
                return false;
            }
        }
        self.credit += share;
        if self.credit + 1e-9 < 1.0 {
            return false;
        }
        self.credit -= 1.0;
        if max_per_sec > 0 {
            self.tokens -= 1.0;
        }
        true
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

/// The decision for one scored opportunity against its module's state.
pub fn decide(
    state: &ModuleState,
    throttle: &mut Throttle,
    max_per_sec: u32,
    ev: f32,
    now: Instant,
) -> Result<(usize, f64), Skip> {
    match state.state {
        RunState::Killed => return Err(Skip::Killed),
        RunState::Stopped => return Err(Skip::Stopped),
        RunState::Running => {}
    }
    if state.gate(ev).is_err() {
        return Err(if state.throttle_pct == 0 {
            Skip::Throttled
        } else if ev.is_finite() {
            Skip::BelowEvMin
        } else {
            Skip::NoScore
        });
    }
    let rung = pick_rung(&state.tip_ladder, ev).ok_or(Skip::BelowTip)?;
    if !throttle.admit(state.throttle_pct, max_per_sec, now) {
        return Err(Skip::Throttled);
    }
    Ok(rung)
}

/// The running hot path (stops its thread on drop).
pub struct HotPath {
    producer: Mutex<gw_ring::Producer<Opportunity>>,
    thread: Option<std::thread::Thread>,
    stop: Arc<AtomicBool>,
    join: Option<std::thread::JoinHandle<()>>,
    /// Counters.
    pub stats: Arc<StrategyStats>,
}

impl Drop for HotPath {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = &self.thread {
            t.unpark();
        }
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

impl HotPath {
    /// Starts the strategy thread; sends run on `rt`.
    pub fn start(
        config: &StrategyConfig,
        sender: Arc<Sender>,
        modules: Arc<Mutex<Modules>>,
        models: Option<Arc<ModelHost>>,
        rt: tokio::runtime::Handle,
    ) -> anyhow::Result<HotPath> {
        config.validate().map_err(anyhow::Error::msg)?;
        let (producer, consumer) = gw_ring::channel(config.ring_capacity)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(StrategyStats::default());
        let worker = Worker {
            consumer,
            sender,
            modules,
            models,
            rt,
            stop: stop.clone(),
            stats: stats.clone(),
            batch: config.batch,
            max_per_sec: config.max_sends_per_sec,
            max_inflight: config.max_inflight,
            inflight: Arc::new(AtomicUsize::new(0)),
            throttles: BTreeMap::new(),
        };
        let join = std::thread::Builder::new()
            .name("gw-strategy".into())
            .spawn(move || worker.run())?;
        Ok(HotPath {
            producer: Mutex::new(producer),
            thread: Some(join.thread().clone()),
            stop,
            join: Some(join),
            stats,
        })
    }

    /// Offers opportunities; returns how many the ring took (the rest are counted
    /// as `ring_full` and dropped: the producer must not block a searcher).
    pub fn offer(&self, items: Vec<Opportunity>) -> usize {
        let total = items.len();
        let mut it = items.into_iter();
        let took = match self.producer.lock() {
            Ok(mut p) => p.push_iter(&mut it),
            Err(_) => 0,
        };
        self.stats.offered.fetch_add(took as u64, Ordering::Relaxed);
        self.stats
            .ring_full
            .fetch_add((total - took) as u64, Ordering::Relaxed);
        if took > 0 {
            if let Some(t) = &self.thread {
                t.unpark();
            }
        }
        took
    }
}

struct Worker {
    consumer: gw_ring::Consumer<Opportunity>,
    sender: Arc<Sender>,
    modules: Arc<Mutex<Modules>>,
    models: Option<Arc<ModelHost>>,
    rt: tokio::runtime::Handle,
    stop: Arc<AtomicBool>,
    stats: Arc<StrategyStats>,
    batch: usize,
    max_per_sec: u32,
    max_inflight: usize,
    inflight: Arc<AtomicUsize>,
    throttles: BTreeMap<&'static str, Throttle>,
}

/// Gives back one in-flight slot when a send ends (or its task is dropped).
struct InflightSlot(Arc<AtomicUsize>);

impl Drop for InflightSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Worker {
    fn run(mut self) {
        let mut buf = Vec::with_capacity(self.batch);
        let mut idle = 0u32;
        while !self.stop.load(Ordering::Acquire) {
            buf.clear();
            if self.consumer.pop_into(&mut buf, self.batch) == 0 {
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
        let states: BTreeMap<&'static str, ModuleState> = match self.modules.lock() {
            Ok(m) => Module::ALL
                .iter()
                .map(|x| (x.as_str(), m.get(*x).clone()))
                .collect(),
            Err(_) => return,
        };
        let scores = self.score(batch);
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
            let (rung, tip) = match decide(state, throttle, self.max_per_sec, ev, now) {
                Ok(r) => r,
                Err(why) => {
                    self.stats.skip(why);
                    continue;
                }
            };
            let Some(tx) = opp
                .txs
                .get(rung.min(opp.txs.len().saturating_sub(1)))
                .cloned()
            else {
                self.stats.skip(Skip::NoTx);
                continue;
            };
            if self.inflight.load(Ordering::Acquire) >= self.max_inflight {
                self.stats.skip(Skip::Saturated);
                continue;
            }
            self.inflight.fetch_add(1, Ordering::AcqRel);
            let slot = InflightSlot(self.inflight.clone());
            self.stats.sent.fetch_add(1, Ordering::Relaxed);
            let sender = self.sender.clone();
            let meta = SendMeta {
                source: "strategy",
                module: name,
                tip,
                score: Some(ev),
            };
            self.rt.spawn(async move {
                sender.send(tx.wire, tx.signature, &meta).await;
                drop(slot);
            });
        }
    }

    /// Each opportunity's score: its module's model over the whole batch when one
    /// serves, else the opportunity's own `ev`.
    fn score(&self, batch: &[Opportunity]) -> Vec<Option<f32>> {
        let mut out: Vec<Option<f32>> = batch.iter().map(|o| o.ev).collect();
        let Some(host) = &self.models else { return out };
        for m in Module::ALL {
            let Some(model) = host.current(m.as_str()) else {
                continue;
            };
            let n = model.n_features as usize;
            let idx: Vec<usize> = (0..batch.len())
                .filter(|i| batch[*i].module == m && batch[*i].features.len() == n)
                .collect();
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
                    for i in idx {
                        out[i] = None;
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn throttle_share_is_exact_over_a_window() {
        let now = Instant::now();
        for pct in [0u8, 1, 25, 50, 73, 100] {
            let mut t = Throttle::default();
            let sent = (0..1000).filter(|_| t.admit(pct, 0, now)).count();
            assert_eq!(sent, usize::from(pct) * 10, "pct {pct}");
        }
    }

    #[test]
    fn throttle_rate_cap_scales_with_pct() {
        let t0 = Instant::now();
        let mut t = Throttle::default();
        // 1000/s at 100 %, throttled to 50 %: 500/s. Offer 10 000 over one second.
        let sent = (0..10_000)
            .filter(|i| t.admit(50, 1000, t0 + Duration::from_micros(*i as u64 * 100)))
            .count();
        assert!((495..=505).contains(&sent), "{sent}");
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
