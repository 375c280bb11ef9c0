//! Module state: what `arbitrage` and `mev` are doing, changed only by verified
//! commands. Pure: no I/O, no clock.

use std::collections::BTreeMap;

use gw_core::args::CommandArgs;
use gw_core::{Action, Module};
use serde::{Deserialize, Serialize};

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

impl ModuleState {
    /// Whether the module may send now.
    pub fn may_send(&self) -> bool {
        self.state == RunState::Running && self.throttle_pct > 0
    }

    /// Whether an opportunity scored `ev` by the module's model may be sent now:
    /// `Err` names why not (killed, stopped, throttled to 0 %, below `ev_min`, or a
    /// score that is not a number).
    pub fn gate(&self, ev: f32) -> Result<(), &'static str> {
        match self.state {
            RunState::Killed => return Err("killed"),
            RunState::Stopped => return Err("stopped"),
            RunState::Running => {}
        }
        if self.throttle_pct == 0 {
            return Err("throttled to 0%");
        }
        if !ev.is_finite() {
            return Err("score is not a number");
        }
        match self.ev_min {
            Some(min) if f64::from(ev) < min => Err("below ev_min"),
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
                    self.restarts += 1;
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
                    self.tip_ladder = t.clone();
                }
            }
            Action::Kill => self.state = RunState::Killed,
        }
        self.applied += 1;
        self.last_request_id = Some(request_id.to_owned());
    }
}

/// Both modules.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Modules(BTreeMap<&'static str, ModuleState>);

impl Modules {
    /// Every module stopped, unthrottled.
    pub fn new() -> Self {
        Modules(
            Module::ALL
                .iter()
                .map(|m| (m.as_str(), ModuleState::default()))
                .collect(),
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(kv: &[(&str, &str)], action: Action) -> CommandArgs {
        let m = kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CommandArgs::parse(action, &m).unwrap()
    }

    #[test]
    fn lifecycle() {
        let mut s = Modules::new();
        assert!(!s.get(Module::Mev).may_send());
        s.apply(Module::Mev, Action::Start, &CommandArgs::default(), "r1");
        assert!(s.get(Module::Mev).may_send());
        assert!(
            !s.get(Module::Arbitrage).may_send(),
            "modules are independent"
        );
        s.apply(
            Module::Mev,
            Action::Throttle,
            &args(&[("throttle_pct", "0")], Action::Throttle),
            "r2",
        );
        assert!(!s.get(Module::Mev).may_send(), "0% is no sends");
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
    fn the_model_score_gates_sends_by_state_and_ev_min() {
        let mut s = Modules::new();
        assert_eq!(s.get(Module::Mev).gate(5.0), Err("stopped"));
        s.apply(Module::Mev, Action::Start, &CommandArgs::default(), "a");
        assert_eq!(
            s.get(Module::Mev).gate(-5.0),
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
        assert_eq!((m.gate(2.5), m.gate(2.4)), (Ok(()), Err("below ev_min")));
        assert_eq!(m.gate(f32::NAN), Err("score is not a number"));
        s.apply(Module::Mev, Action::Kill, &CommandArgs::default(), "c");
        assert_eq!(s.get(Module::Mev).gate(100.0), Err("killed"));
    }

    #[test]
    fn kill_is_sticky_until_start() {
        let mut s = Modules::new();
        s.apply(
            Module::Arbitrage,
            Action::Start,
            &CommandArgs::default(),
            "a",
        );
        s.apply(
            Module::Arbitrage,
            Action::Kill,
            &CommandArgs::default(),
            "b",
        );
        assert_eq!(s.get(Module::Arbitrage).state, RunState::Killed);
        for a in [Action::Restart, Action::Stop] {
            s.apply(Module::Arbitrage, a, &CommandArgs::default(), "c");
            assert_eq!(s.get(Module::Arbitrage).state, RunState::Killed, "{a:?}");
        }
        s.apply(
            Module::Arbitrage,
            Action::Start,
            &CommandArgs::default(),
            "d",
        );
        assert!(s.get(Module::Arbitrage).may_send());
        assert_eq!(s.get(Module::Arbitrage).restarts, 0);
    }
}
