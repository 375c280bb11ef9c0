//! A module agent: the consumer group `ctrl-proto-{module}` that applies commands.
//!
//! For each delivery keyed by its module the agent verifies the signed bytes again
//! (signature, key, scope; freshness was checked at admission and a consumer that
//! lags must still apply), drops a nonce it already applied (at-least-once delivery
//! and a re-published command both end here), audits the decision, applies it,
//! persists its state (module state and the nonces it applied, one fsynced file),
//! and only then lets the caller commit the offset.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gw_core::command::verify_command;
use gw_core::replay::{ReplayGuard, ReplaySnapshot};
use gw_core::{Code, ControlPolicy, Module, Reject};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::audit::{Auditor, Decision};
use crate::bus::{BusConsumer, Delivery};
use crate::modules::{ModuleState, Modules};
use crate::replay_store::StoreError;

/// What an agent did with one command, for the request that is waiting on it.
#[derive(Debug, Clone)]
pub struct Ack {
    /// Issuer of the command.
    pub issuer: String,
    /// Its nonce.
    pub nonce: u64,
    /// The module state after applying, or why it was not applied.
    pub outcome: Result<ModuleState, Reject>,
}

/// Agent outcomes by (module, outcome) for `/metrics`.
pub type Outcomes = Arc<Mutex<std::collections::BTreeMap<(&'static str, &'static str), u64>>>;

/// What [`Agent::handle`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Handled {
    /// Keyed for another module: nothing to do.
    NotMine,
    /// Applied.
    Applied,
    /// Already applied earlier (redelivery or a second publish): skipped.
    Duplicate,
    /// Refused (audited); the delivery is done.
    Rejected(Code),
}

#[derive(Serialize, Deserialize)]
struct AgentFile {
    state: ModuleState,
    applied: ReplaySnapshot,
}

/// One module's agent.
pub struct Agent {
    module: Module,
    policy: ControlPolicy,
    path: PathBuf,
    state: ModuleState,
    applied: ReplayGuard,
    modules: Arc<Mutex<Modules>>,
    auditor: Auditor,
    acks: broadcast::Sender<Ack>,
    outcomes: Outcomes,
}

/// Everything agents share.
#[derive(Clone)]
pub struct AgentEnv {
    /// Verification rules (freshness is not applied by agents).
    pub policy: ControlPolicy,
    /// Where `agent-{module}.json` lives.
    pub state_dir: PathBuf,
    /// Nonce window per issuer.
    pub window: u32,
    /// The module states `GET /api/modules` shows.
    pub modules: Arc<Mutex<Modules>>,
    /// The audit ledger.
    pub auditor: Auditor,
    /// Where outcomes are announced.
    pub acks: broadcast::Sender<Ack>,
    /// Outcome counters.
    pub outcomes: Outcomes,
}

fn corrupt(path: &Path, detail: impl ToString) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

impl Agent {
    /// Loads the agent's state (a missing file is a fresh module; a corrupt one
    /// refuses to start) and publishes it to the shared module table.
    pub fn open(module: Module, env: &AgentEnv) -> Result<Agent, StoreError> {
        let path = env
            .state_dir
            .join(format!("agent-{}.json", module.as_str()));
        let (state, applied) = match std::fs::read(&path) {
            Ok(bytes) => {
                let f: AgentFile = serde_json::from_slice(&bytes).map_err(|e| corrupt(&path, e))?;
                (
                    f.state,
                    ReplayGuard::restore(f.applied).map_err(|e| corrupt(&path, e))?,
                )
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                ModuleState::default(),
                ReplayGuard::new(env.window).map_err(|e| corrupt(&path, e))?,
            ),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        env.modules
            .lock()
            .map_err(|_| corrupt(&path, "module table lock poisoned"))?
            .set(module, state.clone());
        Ok(Agent {
            module,
            policy: env.policy.clone(),
            path,
            state,
            applied,
            modules: env.modules.clone(),
            auditor: env.auditor.clone(),
            acks: env.acks.clone(),
            outcomes: env.outcomes.clone(),
        })
    }

    fn record(
        &self,
        decision: &str,
        code: &str,
        d: &Delivery,
        cmd: Option<&gw_core::Command>,
    ) -> Result<(), Reject> {
        self.auditor.record(
            Decision {
                stage: "agent",
                decision,
                code,
            },
            &d.payload,
            cmd,
        )
    }

    /// Handles one delivery. `Err` means "not done, retry later" (the audit ledger
    /// or the state file could not be written); the offset must not be committed.
    pub fn handle(&mut self, d: &Delivery, now: u64) -> Result<Handled, Reject> {
        if d.key != self.module.as_str().as_bytes() {
            return Ok(Handled::NotMine);
        }
        let verified = if d.payload.len() > self.policy.max_body {
            Err(Reject::with(
                Code::TooLarge,
                format!("command is {} bytes", d.payload.len()),
            ))
        } else {
            verify_command(&d.payload, &self.policy.keyring, Some(now)).and_then(|v| {
                if v.module == self.module {
                    Ok(v)
                } else {
                    Err(Reject::with(
                        Code::RouteMismatch,
                        format!(
                            "keyed for {} but signed for {}",
                            self.module.as_str(),
                            v.module.as_str()
                        ),
                    ))
                }
            })
        };
        let v = match verified {
            Ok(v) => v,
            Err(r) => {
                self.record("rejected", r.code.as_str(), d, None)?;
                self.announce(d, None, Err(r.clone()));
                return Ok(Handled::Rejected(r.code));
            }
        };
        let c = &v.command;
        if self.applied.check(&c.issuer, c.nonce).is_err() {
            self.record("duplicate", Code::Replay.as_str(), d, Some(c))?;
            return Ok(Handled::Duplicate);
        }
        self.record("applied", "", d, Some(c))?;
        let mut state = self.state.clone();
        state.apply(v.action, &v.args, &c.request_id);
        let mut applied = self.applied.clone();
        applied.accept(&c.issuer, c.nonce)?;
        let file = AgentFile {
            state: state.clone(),
            applied: applied.snapshot(),
        };
        let bytes = serde_json::to_vec(&file)
            .map_err(|e| Reject::with(Code::Unavailable, format!("agent state: {e}")))?;
        crate::durable::write_atomic(&self.path, &bytes).map_err(|e| {
            Reject::with(
                Code::Unavailable,
                format!("agent state {}: {e}", self.path.display()),
            )
        })?;
        self.state = state.clone();
        self.applied = applied;
        if let Ok(mut m) = self.modules.lock() {
            m.set(self.module, state.clone());
        }
        self.announce(d, Some(c), Ok(state));
        Ok(Handled::Applied)
    }

    fn announce(
        &self,
        d: &Delivery,
        cmd: Option<&gw_core::Command>,
        outcome: Result<ModuleState, Reject>,
    ) {
        let decoded;
        let cmd = match cmd {
            Some(c) => Some(c),
            None => {
                decoded = <gw_core::Command as prost::Message>::decode(d.payload.as_slice()).ok();
                decoded.as_ref()
            }
        };
        if let Some(c) = cmd {
            // Nobody waiting is fine.
            let _ = self.acks.send(Ack {
                issuer: c.issuer.clone(),
                nonce: c.nonce,
                outcome,
            });
        }
    }

    /// Consumes forever: handle, then commit. Bus errors and failed writes are
    /// logged once per distinct message and retried; nothing is skipped.
    pub async fn run(mut self, mut consumer: BusConsumer) {
        let name = self.module.as_str();
        let mut last_err = String::new();
        let mut log_once = |e: String| {
            if e != last_err {
                eprintln!("gw-sidecar: agent {name}: {e}");
                last_err = e;
            }
        };
        let pause = Duration::from_millis(250);
        loop {
            let d = match consumer.next().await {
                Ok(d) => d,
                Err(e) => {
                    log_once(format!("bus: {e}"));
                    tokio::time::sleep(pause).await;
                    continue;
                }
            };
            loop {
                match self.handle(&d, crate::now_nanos() / 1_000_000_000) {
                    Ok(h) => {
                        let outcome = match h {
                            Handled::NotMine => "not_mine",
                            Handled::Applied => "applied",
                            Handled::Duplicate => "duplicate",
                            Handled::Rejected(_) => "rejected",
                        };
                        if let Ok(mut o) = self.outcomes.lock() {
                            *o.entry((name, outcome)).or_default() += 1;
                        }
                        break;
                    }
                    Err(r) => log_once(format!("not applied yet (retrying): {}", r.detail)),
                }
                tokio::time::sleep(pause).await;
            }
            while let Err(e) = consumer.commit(&d).await {
                log_once(format!("commit: {e}"));
                tokio::time::sleep(pause).await;
            }
        }
    }
}
