//! What a module (`arbitrage`, `mev`) is doing, as verified commands left it, and the
//! one answer to "may this module send now?" that the strategy, the Solana JSON-RPC
//! endpoint and the evaluate endpoint all ask. Pure: no I/O, no clock of its own.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::args::CommandArgs;
use crate::names::{Action, Module};

/// Whether a module may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Not started (initial) or stopped.
    Stopped,
    /// Running.
    Running,
    /// Killed: no sends until an explicit `start`.
    Killed,
}

/// One module's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleState {
    /// Run state.
    pub state: RunState,
    /// Share of the normal send rate, percent (100 = unthrottled).
    pub throttle_pct: u8,
    /// Minimum expected value for a send (POLICY).
    pub ev_min: Option<f64>,
    /// Tip ladder (POLICY).
    pub tip_ladder: Vec<f64>,
    /// Restarts so far.
    pub restarts: u64,
    /// `request_id` of the last applied command.
    pub last_request_id: Option<String>,
    /// Commands applied.
    pub applied: u64,
}

impl Default for ModuleState {
    fn default() -> Self {
        ModuleState {
            state: RunState::Stopped,
            throttle_pct: 100,
            ev_min: None,
            tip_ladder: Vec::new(),
            restarts: 0,
            last_request_id: None,
            applied: 0,
        }
    }
}

/// Why a module may not send now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    /// Not started, or stopped.
    Stopped,
    /// Killed (only `start` revives it).
    Killed,
    /// Throttled to 0 %.
    ThrottledToZero,
    /// The score is below `ev_min`.
    BelowEvMin,
    /// The score is not a number.
    NoScore,
}

impl Refusal {
    /// A short reason for answers and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Refusal::Stopped => "stopped",
            Refusal::Killed => "killed",
            Refusal::ThrottledToZero => "throttled to 0%",
            Refusal::BelowEvMin => "below ev_min",
            Refusal::NoScore => "score is not a number",
        }
    }
}

impl ModuleState {
    /// May this module send now? `score` is the opportunity's expected value when
    /// there is one (the strategy, evaluate); a transaction a client sends through
    /// JSON-RPC has none, and `ev_min` does not apply to it. The share of
    /// `throttle_pct` is the caller's [`Throttle`].
    pub fn may_send(&self, score: Option<f32>) -> Result<(), Refusal> {
        match self.state {
            RunState::Killed => return Err(Refusal::Killed),
            RunState::Stopped => return Err(Refusal::Stopped),
            RunState::Running => {}
        }
        if self.throttle_pct == 0 {
            return Err(Refusal::ThrottledToZero);
        }
        let Some(ev) = score else { return Ok(()) };
        if !ev.is_finite() {
            return Err(Refusal::NoScore);
        }
        match self.ev_min {
            Some(min) if f64::from(ev) < min => Err(Refusal::BelowEvMin),
            _ => Ok(()),
        }
    }

    /// Applies a verified command.
    pub fn apply(&mut self, action: Action, args: &CommandArgs, request_id: &str) {
        match action {
            Action::Start => self.state = RunState::Running,
            Action::Stop => {
                if self.state != RunState::Killed {
                    self.state = RunState::Stopped;
                }
            }
            Action::Restart => {
                // A restart does not revive a killed module: only `start` does.
                if self.state != RunState::Killed {
                    self.state = RunState::Running;
                    self.restarts = self.restarts.saturating_add(1);
                }
            }
            Action::Throttle => {
                if let Some(p) = args.throttle_pct {
                    self.throttle_pct = p;
                }
            }
            Action::Policy => {
                if let Some(e) = args.ev_min {
                    self.ev_min = Some(e);
                }
                if let Some(t) = &args.tip_ladder {
                    self.tip_ladder.clone_from(t);
                }
            }
            Action::Kill => self.state = RunState::Killed,
        }
        self.applied = self.applied.saturating_add(1);
        self.last_request_id = Some(request_id.to_owned());
    }
}

/// Every module's state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Modules(BTreeMap<&'static str, ModuleState>);

impl Default for Modules {
    fn default() -> Self {
        Modules(
            Module::ALL
                .iter()
                .map(|m| (m.as_str(), ModuleState::default()))
                .collect(),
        )
    }
}

impl Modules {
    /// Every module stopped, unthrottled.
    pub fn new() -> Self {
        Self::default()
    }

    /// One module's state.
    pub fn get(&self, m: Module) -> &ModuleState {
        // Every module is inserted in `new`; the default covers a hand-built value.
        static DEFAULT: std::sync::OnceLock<ModuleState> = std::sync::OnceLock::new();
        self.0
            .get(m.as_str())
            .unwrap_or_else(|| DEFAULT.get_or_init(ModuleState::default))
    }

    /// Replaces one module's state (its agent owns it).
    pub fn set(&mut self, m: Module, state: ModuleState) {
        self.0.insert(m.as_str(), state);
    }

    /// Applies a verified command to its module.
    pub fn apply(&mut self, m: Module, action: Action, args: &CommandArgs, request_id: &str) {
        self.0
            .entry(m.as_str())
            .or_default()
            .apply(action, args, request_id);
    }
}

/// The share a throttled module sends: exactly `throttle_pct` % of what passed
/// [`ModuleState::may_send`], and (when a rate is set) at most that share of it.
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
    /// Whether one more send may go at `now`, given `pct` and the rate at 100 %
    /// (`max_per_sec` 0: no rate cap).
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

    /// Gives back what an [`admit`](Throttle::admit) that answered `true` took,
    /// with the same `pct` and `max_per_sec`, for a send that did not go after all
    /// (its preflight failed, its client went away): as if it had never been asked.
    pub fn refund(&mut self, pct: u8, max_per_sec: u32) {
        let share = f64::from(pct.min(100)) / 100.0;
        self.credit += 1.0 - share;
        if max_per_sec > 0 {
            let rate = f64::from(max_per_sec) * share;
            self.tokens = (self.tokens + 1.0).min(rate.max(1.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn args(kv: &[(&str, &str)], action: Action) -> CommandArgs {
        let m = kv
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        CommandArgs::parse(action, &m).unwrap()
    }

    #[test]
    fn lifecycle() {
        let mut s = Modules::new();
        assert!(s.get(Module::Mev).may_send(None).is_err());
        s.apply(Module::Mev, Action::Start, &CommandArgs::default(), "r1");
        assert_eq!(s.get(Module::Mev).may_send(None), Ok(()));
        assert_eq!(
            s.get(Module::Arbitrage).may_send(None),
            Err(Refusal::Stopped),
            "modules are independent"
        );
        s.apply(
            Module::Mev,
            Action::Throttle,
            &args(&[("throttle_pct", "0")], Action::Throttle),
            "r2",
        );
        assert_eq!(
            s.get(Module::Mev).may_send(None),
            Err(Refusal::ThrottledToZero)
        );
        s.apply(
            Module::Mev,
            Action::Throttle,
            &args(&[("throttle_pct", "50")], Action::Throttle),
            "r3",
        );
        s.apply(
            Module::Mev,
            Action::Policy,
            &args(
                &[("ev_min", "0.2"), ("tip_ladder", "0.1,0.3")],
                Action::Policy,
            ),
            "r4",
        );
        let m = s.get(Module::Mev);
        assert_eq!(
            (m.throttle_pct, m.ev_min, m.tip_ladder.clone()),
            (50, Some(0.2), vec![0.1, 0.3])
        );
        assert_eq!(m.last_request_id.as_deref(), Some("r4"));
        assert_eq!(m.applied, 4);
    }

    #[test]
    fn the_score_gates_sends_by_state_and_ev_min() {
        let mut s = Modules::new();
        assert_eq!(
            s.get(Module::Mev).may_send(Some(5.0)),
            Err(Refusal::Stopped)
        );
        s.apply(Module::Mev, Action::Start, &CommandArgs::default(), "a");
        assert_eq!(
            s.get(Module::Mev).may_send(Some(-5.0)),
            Ok(()),
            "no ev_min: every score"
        );
        s.apply(
            Module::Mev,
            Action::Policy,
            &args(&[("ev_min", "2.5")], Action::Policy),
            "b",
        );
        let m = s.get(Module::Mev);
        assert_eq!(
            (m.may_send(Some(2.5)), m.may_send(Some(2.4))),
            (Ok(()), Err(Refusal::BelowEvMin))
        );
        assert_eq!(m.may_send(Some(f32::NAN)), Err(Refusal::NoScore));
        assert_eq!(m.may_send(None), Ok(()), "no score: ev_min does not apply");
        s.apply(Module::Mev, Action::Kill, &CommandArgs::default(), "c");
        assert_eq!(
            s.get(Module::Mev).may_send(Some(100.0)),
            Err(Refusal::Killed)
        );
        assert_eq!(s.get(Module::Mev).may_send(None), Err(Refusal::Killed));
    }

    #[test]
    fn the_counters_stop_at_their_maximum() {
        // A state learned from elsewhere (a checkpoint) may carry any count.
        let mut s = Modules::new();
        s.set(
            Module::Mev,
            ModuleState {
                state: RunState::Running,
                applied: u64::MAX,
                restarts: u64::MAX,
                ..ModuleState::default()
            },
        );
        s.apply(Module::Mev, Action::Restart, &CommandArgs::default(), "r");
        let m = s.get(Module::Mev);
        assert_eq!((m.applied, m.restarts), (u64::MAX, u64::MAX));
        assert_eq!(m.last_request_id.as_deref(), Some("r"));
    }

    #[test]
    fn kill_is_sticky_until_start() {
        let mut s = Modules::new();
        let none = CommandArgs::default();
        s.apply(Module::Arbitrage, Action::Start, &none, "a");
        s.apply(Module::Arbitrage, Action::Kill, &none, "b");
        assert_eq!(s.get(Module::Arbitrage).state, RunState::Killed);
        for a in [Action::Restart, Action::Stop] {
            s.apply(Module::Arbitrage, a, &none, "c");
            assert_eq!(s.get(Module::Arbitrage).state, RunState::Killed, "{a:?}");
        }
        s.apply(Module::Arbitrage, Action::Start, &none, "d");
        assert_eq!(s.get(Module::Arbitrage).may_send(None), Ok(()));
        assert_eq!(s.get(Module::Arbitrage).restarts, 0);
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
        let sent = (0..10_000u64)
            .filter(|i| t.admit(50, 1000, t0 + Duration::from_micros(i * 100)))
            .count();
        assert!((495..=505).contains(&sent), "{sent}");
    }

    #[test]
    fn a_refunded_send_leaves_the_throttle_as_if_never_asked() {
        let now = Instant::now();
        for pct in [25u8, 50, 73] {
            // Every third admitted send is refunded (it did not go): of the asks
            // not refunded, still exactly `pct` % went.
            let (mut t, mut asked, mut went, mut refunded) = (Throttle::default(), 0, 0, 0);
            while went < 500 {
                asked += 1;
                if t.admit(pct, 0, now) {
                    if (went + refunded) % 3 == 2 {
                        t.refund(pct, 0);
                        refunded += 1;
                    } else {
                        went += 1;
                    }
                }
            }
            let want = (asked - refunded) * usize::from(pct) / 100;
            assert!(
                went.abs_diff(want) <= 1,
                "pct {pct}: {went} of {}",
                asked - refunded
            );
        }
        // The rate cap's token comes back too (1 000/s: one token at a time).
        let mut t = Throttle::default();
        assert!(t.admit(100, 1000, now));
        assert!(!t.admit(100, 1000, now));
        t.refund(100, 1000);
        assert!(t.admit(100, 1000, now));
        assert!(!t.admit(100, 1000, now));
    }
}
