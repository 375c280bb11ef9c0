//! A module agent: the consumer group `ctrl-proto-{module}` that applies commands.
//!
//! [`AgentCore`] decides, without I/O, what one delivery means: not this module's,
//! refused (the signed bytes do not verify again: signature, key, scope; not
//! freshness — a consumer that lags must still apply what admission accepted in
//! time), a duplicate (a nonce it already applied: at-least-once delivery and a
//! re-published command both end here), or the next module state. Applied nonces
//! are remembered until `dedup_secs` after the later of the command's expiry and
//! its application, so a redelivery within that horizon is never applied twice. The shell
//! ([`Agent::run`]) writes the ledger row, persists the state (module state and
//! applied nonces, one fsynced file), announces the outcome to the waiting request,
//! and only then commits the offset.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gw_core::ledger::{Decision, Stage};
use gw_core::module_state::ModuleState;
use gw_core::replay::{Limits, NonceBook, Refused};
use gw_core::{Code, Command, ControlPolicy, Module, Reject, VerifiedCommand};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::bus::{BusConsumer, Delivery};
use super::modules::ModuleTable;
use super::replay_store::StoreError;
use crate::ledger::{AuditError, Auditor, Entry};
use crate::ops::metrics::ControlMetrics;

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

impl Handled {
    /// The metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Handled::NotMine => "not_mine",
            Handled::Applied => "applied",
            Handled::Duplicate => "duplicate",
            Handled::Rejected(_) => "rejected",
        }
    }
}

/// The decision on one delivery.
#[derive(Debug, Clone)]
pub enum Step {
    /// Keyed for another module.
    NotMine,
    /// The bytes do not verify (again): refuse, audited.
    Refuse(Reject),
    /// The nonce was applied before: skip, audited.
    Duplicate(Box<Command>),
    /// Apply: the state and applied nonces after this command.
    Apply(Box<Applied>),
}

/// The outcome of applying one command, not yet durable.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The verified command.
    pub verified: VerifiedCommand,
    /// The module's state after it.
    pub state: ModuleState,
    /// The applied nonces after it.
    pub applied: NonceBook<()>,
}

/// One module's agent state machine.
#[derive(Debug, Clone)]
pub struct AgentCore {
    module: Module,
    policy: ControlPolicy,
    state: ModuleState,
    applied: NonceBook<()>,
    dedup_secs: u64,
}

impl AgentCore {
    /// An agent for `module` with its last durable state, remembering applied
    /// nonces for `dedup_secs` beyond their commands' freshness.
    pub fn new(
        module: Module,
        policy: ControlPolicy,
        state: ModuleState,
        applied: NonceBook<()>,
        dedup_secs: u64,
    ) -> AgentCore {
        AgentCore {
            module,
            policy,
            state,
            applied,
            dedup_secs,
        }
    }

    /// The module's state.
    pub fn state(&self) -> &ModuleState {
        &self.state
    }

    /// Decides on one delivery at `now` (unix seconds: the key's validity).
    pub fn decide(&self, d: &Delivery, now: u64) -> Step {
        if d.key != self.module.as_str().as_bytes() {
            return Step::NotMine;
        }
        let v = match self.policy.verify_for_apply(&d.payload, self.module, now) {
            Ok(v) => v,
            Err(r) => return Step::Refuse(r),
        };
        let c = &v.command;
        if self.applied.get(&c.issuer, c.nonce, now).is_some() {
            return Step::Duplicate(Box::new(v.command));
        }
        let mut applied = self.applied.clone();
        let expires =
            gw_core::replay::expiry(c.ts, self.policy.max_skew).max(now) + self.dedup_secs;
        if let Err(Refused::IssuerFull | Refused::TooManyIssuers) =
            applied.insert(&c.issuer, c.nonce, expires, (), now)
        {
            // Never refuse to apply what admission accepted; this nonce is just not
            // remembered for deduplication (logged by the shell).
            tracing::warn!(module = self.module.as_str(), issuer = %c.issuer, nonce = c.nonce, "agent dedup memory full");
        }
        let mut state = self.state.clone();
        state.apply(v.action, &v.args, &c.request_id);
        Step::Apply(Box::new(Applied {
            verified: v,
            state,
            applied,
        }))
    }

    /// Makes an applied step the current state (once it is durable).
    pub fn commit(&mut self, a: Applied) {
        self.state = a.state;
        self.applied = a.applied;
    }
}

#[derive(Serialize, Deserialize)]
struct AgentFile {
    state: ModuleState,
    /// Applied nonces still remembered: issuer, nonce, unix seconds to forget them.
    applied: Vec<(String, u64, u64)>,
}

/// A delivery not done yet: the offset must not be committed; try again later.
#[derive(Debug, thiserror::Error)]
pub enum RetryLater {
    /// The ledger row could not be written.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The agent's state file could not be written.
    #[error("agent state {path}: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Everything agents share.
#[derive(Clone)]
pub struct AgentEnv {
    /// Verification rules (freshness is not applied by agents).
    pub policy: ControlPolicy,
    /// Where `agent-{module}.json` lives.
    pub state_dir: PathBuf,
    /// Bounds of the applied-nonce memory.
    pub limits: Limits,
    /// How long applied nonces are remembered beyond their commands' freshness.
    pub dedup_secs: u64,
    /// The module table agents publish their state to.
    pub modules: ModuleTable,
    /// The audit ledger.
    pub auditor: Auditor,
    /// Where outcomes are announced.
    pub acks: broadcast::Sender<Ack>,
    /// Outcome counters.
    pub metrics: ControlMetrics,
}

/// One module's agent: the core and its effects.
pub struct Agent {
    core: AgentCore,
    path: PathBuf,
    env: AgentEnv,
}

fn corrupt(path: &Path, detail: &dyn std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("agent state {}: {detail}", path.display()))
}

impl Agent {
    /// Loads the agent's state (a missing file is a fresh module; a corrupt one
    /// refuses to start) and publishes it to the module table.
    pub fn open(module: Module, env: &AgentEnv) -> Result<Agent, StoreError> {
        let path = env
            .state_dir
            .join(format!("agent-{}.json", module.as_str()));
        let now = crate::now_secs();
        let mut applied = NonceBook::new(env.limits);
        let state = match std::fs::read(&path) {
            Ok(bytes) => {
                let f: AgentFile =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(&path, &e))?;
                for (issuer, nonce, expires) in f.applied {
                    let _ = applied.insert(&issuer, nonce, expires, (), now);
                }
                f.state
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ModuleState::default(),
            Err(e) => return Err(corrupt(&path, &e)),
        };
        env.modules.set(module, state.clone());
        Ok(Agent {
            core: AgentCore::new(module, env.policy.clone(), state, applied, env.dedup_secs),
            path,
            env: env.clone(),
        })
    }

    fn record(
        &self,
        decision: Decision,
        code: Option<Code>,
        d: &Delivery,
        command: Option<&Command>,
    ) -> Result<(), AuditError> {
        self.env.auditor.record(Entry {
            stage: Stage::Agent,
            decision,
            code,
            body: &d.payload,
            command,
            requester: Some(&d.requester),
            route: "",
        })
    }

    /// Handles one delivery. `Err` means "not done, retry later" (the audit ledger
    /// or the state file could not be written); the offset must not be committed.
    pub fn handle(&mut self, d: &Delivery, now: u64) -> Result<Handled, RetryLater> {
        match self.core.decide(d, now) {
            Step::NotMine => Ok(Handled::NotMine),
            Step::Refuse(r) => {
                self.record(Decision::Rejected, Some(r.code), d, None)?;
                let code = r.code;
                self.announce_raw(d, Err(r));
                Ok(Handled::Rejected(code))
            }
            Step::Duplicate(c) => {
                self.record(Decision::Duplicate, Some(Code::Replay), d, Some(&c))?;
                Ok(Handled::Duplicate)
            }
            Step::Apply(a) => {
                let c = &a.verified.command;
                self.record(Decision::Applied, None, d, Some(c))?;
                let file = AgentFile {
                    state: a.state.clone(),
                    applied: a
                        .applied
                        .iter()
                        .map(|(issuer, nonce, s)| (issuer.to_owned(), nonce, s.expires))
                        .collect(),
                };
                let bytes = serde_json::to_vec(&file).map_err(|e| RetryLater::State {
                    path: self.path.clone(),
                    source: std::io::Error::other(e),
                })?;
                crate::durable::write_atomic(&self.path, &bytes).map_err(|source| {
                    RetryLater::State {
                        path: self.path.clone(),
                        source,
                    }
                })?;
                let (issuer, nonce, state) = (c.issuer.clone(), c.nonce, a.state.clone());
                self.core.commit(*a);
                self.env.modules.set(self.core.module, state.clone());
                self.announce(issuer, nonce, Ok(state));
                Ok(Handled::Applied)
            }
        }
    }

    fn announce(&self, issuer: String, nonce: u64, outcome: Result<ModuleState, Reject>) {
        // Nobody waiting is fine.
        let _ = self.env.acks.send(Ack {
            issuer,
            nonce,
            outcome,
        });
    }

    /// Announces a refusal to whoever waits for the command the bytes decode to.
    fn announce_raw(&self, d: &Delivery, outcome: Result<ModuleState, Reject>) {
        if let Ok(c) = <Command as prost::Message>::decode(d.payload.as_slice()) {
            self.announce(c.issuer, c.nonce, outcome);
        }
    }

    /// Consumes forever: handle, then commit. Bus errors and failed writes are
    /// logged once per distinct message and retried; nothing is skipped.
    pub async fn run(mut self, mut consumer: BusConsumer) {
        let name = self.core.module.as_str();
        let mut last_err = String::new();
        let mut log_once = |e: String| {
            if e != last_err {
                tracing::warn!(module = name, error = %e, "agent");
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
                match self.handle(&d, crate::now_secs()) {
                    Ok(h) => {
                        self.env.metrics.agent(name, h.as_str());
                        break;
                    }
                    Err(e) => log_once(format!("not applied yet (retrying): {e}")),
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

#[cfg(test)]
mod tests {
    use gw_core::module_state::RunState;
    use gw_core::{Action, KeyRing};

    use super::super::bus::Position;
    use super::*;

    const NOW: u64 = 1_750_000_000;

    fn core() -> AgentCore {
        let mut keyring = KeyRing::new();
        keyring
            .insert(gw_core::keyring::CommandKey::unrestricted(
                "op-admin-1",
                testkit::fixtures::command_key().verifying_key(),
            ))
            .unwrap();
        AgentCore::new(
            Module::Mev,
            ControlPolicy {
                keyring,
                max_skew: 30,
                max_body: 4096,
            },
            ModuleState::default(),
            NonceBook::new(Limits::default()),
            600,
        )
    }

    fn delivery(key: &str, payload: Vec<u8>) -> Delivery {
        Delivery {
            key: key.as_bytes().to_vec(),
            payload,
            requester: gw_core::contract::Requester::default(),
            position: Position {
                partition: 0,
                offset: 0,
            },
        }
    }

    fn start(nonce: u64) -> Vec<u8> {
        testkit::fixtures::signed_command(nonce, Action::Start, NOW, "dashboard", &[])
    }

    #[test]
    fn another_modules_delivery_is_not_mine() {
        assert!(matches!(
            core().decide(&delivery("arbitrage", start(1)), NOW),
            Step::NotMine
        ));
    }

    #[test]
    fn applies_then_drops_the_same_nonce_as_a_duplicate() {
        let mut c = core();
        let d = delivery("mev", start(1));
        let Step::Apply(a) = c.decide(&d, NOW) else {
            panic!("not applied")
        };
        assert_eq!(a.state.state, RunState::Running);
        assert_eq!(c.state().state, RunState::Stopped, "not yet committed");
        c.commit(*a);
        assert_eq!(c.state().applied, 1);
        assert!(matches!(c.decide(&d, NOW), Step::Duplicate(_)));
    }

    #[test]
    fn a_lagging_consumer_still_applies() {
        assert!(matches!(
            core().decide(&delivery("mev", start(1)), NOW + 86_400),
            Step::Apply(_)
        ));
    }

    #[test]
    fn refuses_bytes_that_do_not_verify() {
        let mut body = start(1);
        let last = body.len() - 1;
        body[last] ^= 1;
        let Step::Refuse(r) = core().decide(&delivery("mev", body), NOW) else {
            panic!("not refused")
        };
        assert_eq!(r.code, Code::BadSignature);
    }

    #[test]
    fn refuses_a_command_keyed_for_the_wrong_module() {
        let mut c = core();
        c.module = Module::Arbitrage;
        let Step::Refuse(r) = c.decide(&delivery("arbitrage", start(1)), NOW) else {
            panic!("not refused")
        };
        assert_eq!(r.code, Code::RouteMismatch);
    }

    #[test]
    fn refuses_an_oversized_delivery() {
        let mut body = start(1);
        body.resize(5000, 0);
        let Step::Refuse(r) = core().decide(&delivery("mev", body), NOW) else {
            panic!("not refused")
        };
        assert_eq!(r.code, Code::TooLarge);
    }
}
