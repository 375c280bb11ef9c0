//! The control plane's async shell: performs what [`super::admission`] decided
//! (ledger rows, publishing on the bus, the durable nonce), waits for the module's
//! agent, and serves the control routes.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use gw_core::contract::{self, EdgeIdentity, Requester};
use gw_core::ledger::{Decision, Stage};
use gw_core::module_state::{ModuleState, Modules};
use gw_core::names::parse_module_spec;
use gw_core::{Action, Code, Command, Module, Reject};
use parking_lot::Mutex;
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::admission::{Admission, Admitted, Refused, Request, Row, Verdict};
use super::agent::{Ack, Agent, AgentEnv};
use super::bus::{Bus, Position};
use super::edge_reports::{RecentReports, Seen};
use super::json_route::{self, JsonSigner};
use super::kafka_state::Checkpoint;
use super::modules::ModuleTable;
use super::replay_store::{Accepted, ReplayStore, SharedReplay};
use crate::error::ApiError;
use crate::journal::txn::PublishEntry;
use crate::journal::{self, Journal, Lsn, Txn};
use crate::ledger::{AuditError, Auditor, Entry};
use crate::ops::metrics::ControlMetrics;

/// What [`Control::start`] needs.
pub struct ControlConfig {
    /// Verification rules.
    pub policy: gw_core::ControlPolicy,
    /// The durable replay guard (fed by its journal sink).
    pub replay: SharedReplay,
    /// The JSON route's signer, when configured.
    pub signer: Option<JsonSigner>,
    /// The role the JSON route needs in the edge-verified token.
    pub command_role: String,
    /// The command bus.
    pub bus: Bus,
    /// Where decisions are recorded.
    pub auditor: Auditor,
    /// Where everything durable goes.
    pub journal: Journal,
    /// This node's chain id.
    pub node_id: String,
    /// How long a request waits for its agent before answering `pending`.
    pub apply_wait: Duration,
    /// Largest command body.
    pub max_body: usize,
    /// Bounds of the agents' applied-nonce memory.
    pub limits: gw_core::replay::Limits,
    /// How long agents remember applied nonces beyond their freshness.
    pub dedup_secs: u64,
    /// Counters.
    pub metrics: ControlMetrics,
    /// The ledger's budgets for the refusals the edge reports.
    pub edge_reports: Arc<crate::serve::EdgeBudgets>,
}

/// Follows a module's checkpoints written by other nodes (Kafka bus): their state
/// goes to this node's module table, and what they decided of a command is
/// announced to the requests waiting here and marked in the replay guard
/// (applied, or refused for a reason that is the command's), which tells a
/// resend of those bytes.
struct CheckpointWatch {
    module: Module,
    me: String,
    /// Per other node, its last decision announced here: where, and a digest of
    /// the command (a command topic created again puts other commands at offsets
    /// seen before).
    last: BTreeMap<String, (Position, gw_core::replay::Digest)>,
    modules: ModuleTable,
    replay: SharedReplay,
    acks: broadcast::Sender<Ack>,
}

impl CheckpointWatch {
    fn seen(&mut self, cp: Checkpoint) {
        if cp.writer == self.me {
            // This node's agent announced its own decisions, and set its state in
            // the table once its journal had them (its checkpoint goes to Kafka
            // before: taken from here, the state would show before it is durable).
            return;
        }
        // Only ever forward: a checkpoint read late must not undo a newer state.
        self.modules
            .advance(self.module, cp.state.clone(), Some(cp.generation));
        let Some(d) = cp.last.get(&cp.writer) else {
            return;
        };
        if d.outcome == super::agent::UNFORWARDED || d.outcome == super::agent::COPIED {
            // A copy no gateway node forwarded, or a copy of a forward: no answer
            // to anyone waiting for the command it copies, which may still come
            // or has its own answer.
            return;
        }
        let Some(digest) = d.digest() else {
            return;
        };
        if self.last.get(&cp.writer) == Some(&(d.position, digest)) {
            return;
        }
        self.last.insert(cp.writer.clone(), (d.position, digest));
        let Some(c) = d.command() else {
            return;
        };
        let outcome = match d.outcome.as_str() {
            // A duplicate was applied before: the command is applied.
            "applied" | "duplicate" => {
                self.replay.lock().mark_applied(
                    &c.issuer,
                    c.nonce,
                    0,
                    Some(super::agent::what_of(&c)),
                    crate::now_secs(),
                );
                Ok(cp.state)
            }
            _ => {
                let parsed = d.code.as_deref().and_then(Code::parse);
                let code = parsed.unwrap_or(Code::Malformed);
                // A resend of these bytes here is told why (what this node's own
                // agent's refusals tell the guard through the journal) — when the
                // refused forward was this node's (another node's forward of the
                // same bytes says nothing of this one's) and the code is one this
                // node knows.
                let ours = d.forwarded_by.as_deref() == Some(self.me.as_str());
                if !ours && parsed.is_none_or(super::agent::refusal_is_the_forwards) {
                    // Another node's forward refused for what concerns only it:
                    // this node's own forward of the bytes is still to come.
                    return;
                }
                if ours && parsed.is_some_and(super::agent::refusal_is_the_commands) {
                    self.replay.lock().mark_refused(
                        &crate::journal::txn::RefusedCommand {
                            issuer: c.issuer.clone(),
                            nonce: c.nonce,
                            digest,
                            code: code.as_str().to_owned(),
                        },
                        crate::now_secs(),
                    );
                }
                Err(Reject::with(
                    code,
                    format!("refused by the agent of node `{}`", cp.writer),
                ))
            }
        };
        let _ = self.acks.send(Ack {
            issuer: c.issuer,
            nonce: c.nonce,
            outcome,
            seq: 0,
            applied_by: Some(cp.writer),
            digest,
        });
    }
}

/// Admission's decision core (the nonces in flight) under one lock.
struct Gate {
    admission: Admission,
}

/// The running control plane.
pub struct Control {
    gate: Arc<Mutex<Gate>>,
    /// Locked after `gate` when both are needed; the journal's writer thread
    /// locks only this one.
    replay: SharedReplay,
    signer: Option<JsonSigner>,
    command_role: String,
    auditor: Auditor,
    journal: Journal,
    node_id: String,
    bus: Bus,
    acks: broadcast::Sender<Ack>,
    apply_wait: Duration,
    max_body: usize,
    modules: ModuleTable,
    metrics: ControlMetrics,
    edge_reports: Arc<crate::serve::EdgeBudgets>,
    /// The edge reports recorded last, and those being written.
    edge_seen: Mutex<RecentReports>,
}

impl Control {
    /// Rebuilds the agents from the journal's `records`, starts one agent per
    /// module and (while the broker is away) keeps preparing the bus. Must run
    /// inside a tokio runtime.
    pub fn start(
        c: ControlConfig,
        records: &[(Lsn, Txn)],
    ) -> Result<(Arc<Control>, Vec<JoinHandle<()>>), StartError> {
        let (acks, _) = broadcast::channel(4096);
        let modules = ModuleTable::new();
        let env = AgentEnv {
            policy: c.policy.clone(),
            journal: c.journal.clone(),
            embedded_bus: matches!(c.bus, Bus::InProcess(_)),
            limits: c.limits,
            dedup_secs: c.dedup_secs,
            modules: modules.clone(),
            auditor: c.auditor.clone(),
            acks: acks.clone(),
            metrics: c.metrics.clone(),
            kafka_state: c.bus.agent_state(),
            chain: c.node_id.clone(),
            floor: c.replay.lock().floor(),
        };
        let mut tasks = Vec::new();
        if let Some(store) = c.bus.agent_state() {
            for m in Module::ALL {
                let mut watch = CheckpointWatch {
                    module: m,
                    me: c.node_id.clone(),
                    last: BTreeMap::new(),
                    modules: modules.clone(),
                    replay: c.replay.clone(),
                    acks: acks.clone(),
                };
                tasks.push(tokio::spawn(
                    store.clone().watch(m, move |cp| watch.seen(cp)),
                ));
            }
        }
        for m in Module::ALL {
            let agent = Agent::open(m, &env, records);
            let consumer = c.bus.consumer(m, c.metrics.group(m.as_str()))?;
            let span = tracing::info_span!("agent", module = m.as_str());
            tasks.push(tokio::spawn(agent.run(consumer).instrument(span)));
        }
        tasks.extend(c.bus.start(&c.journal));
        let bus = c.bus.clone();
        tasks.push(tokio::spawn(async move {
            // The topic must exist before consumers are assigned partitions; commands
            // wait in the journal meanwhile.
            let mut logged = false;
            while let Err(e) = bus.prepare().await {
                if !logged {
                    tracing::warn!(bus = %bus.describe(), error = %e, "command bus not ready (retrying)");
                    logged = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            tracing::info!(bus = %bus.describe(), "command bus ready");
        }));
        c.replay
            .lock()
            .set_journal(c.journal.clone(), crate::now_secs());
        let control = Arc::new(Control {
            gate: Arc::new(Mutex::new(Gate {
                admission: Admission::new(c.policy),
            })),
            replay: c.replay,
            signer: c.signer,
            command_role: c.command_role,
            auditor: c.auditor,
            journal: c.journal,
            node_id: c.node_id,
            bus: c.bus,
            acks,
            apply_wait: c.apply_wait,
            max_body: c.max_body,
            modules,
            metrics: c.metrics,
            edge_reports: c.edge_reports,
            edge_seen: Mutex::new(RecentReports::recovered(records)),
        });
        Ok((control, tasks))
    }

    /// The module table (read by the sender and evaluate).
    pub fn modules(&self) -> ModuleTable {
        self.modules.clone()
    }

    /// The command bus (flushed at shutdown).
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The control routes: signed commands, the JSON route, module state, and the
    /// edge's reports.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route(contract::COMMAND_PATH, post(post_command))
            .route(
                "/api/control/module/{spec}",
                post(post_module).layer(DefaultBodyLimit::max(self.max_body)),
            )
            .route("/api/modules", get(get_modules))
            .route(
                "/internal/edge-decisions",
                post(edge_decisions)
                    .layer(DefaultBodyLimit::max(crate::serve::MAX_SEALED_REPORT_BYTES)),
            )
            .layer(DefaultBodyLimit::max(self.max_body))
            .with_state(self.clone())
    }

    /// The journal entries of `rows` about `body`.
    fn rows(
        &self,
        rows: &[Row],
        body: &[u8],
        command: Option<&Command>,
        requester: &Requester,
        route: &str,
    ) -> Vec<journal::Entry> {
        rows.iter()
            .filter_map(|r| {
                self.auditor.row(&Entry {
                    stage: r.stage,
                    decision: r.decision,
                    code: r.code,
                    body,
                    command,
                    requester: Some(requester),
                    route,
                })
            })
            .collect()
    }

    async fn record(&self, entries: Vec<journal::Entry>) -> Result<(), AuditError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.journal.commit(Txn::of(entries)).await?;
        Ok(())
    }

    /// Records a refusal's rows, after `prefix` (the JSON route's row of the
    /// body the edge accepted); answers with its rejection (or, when the ledger
    /// cannot take the rows, with that).
    async fn refuse(
        &self,
        prefix: Vec<journal::Entry>,
        r: Refused,
        body: &[u8],
        requester: &Requester,
        route: &str,
    ) -> ApiError {
        let mut rows = prefix;
        rows.extend(self.rows(&r.rows, body, r.command.as_ref(), requester, route));
        match self.record(rows).await {
            Ok(()) => r.reject.into(),
            // Unrecorded, a refusal is no answer: 503, send again. One that is a
            // 503 already keeps its own detail (it says what a resend tells).
            Err(e) if r.reject.code == Code::Unavailable => {
                tracing::warn!(error = %e, "a refusal's rows were not recorded");
                r.reject.into()
            }
            Err(e) => e.into(),
        }
    }

    /// Refuses a request before admission (a route, a media type, a JSON body the
    /// sidecar cannot sign): counted, answered, and recorded — after the edge's
    /// acceptance when the edge forwarded it.
    async fn refuse_early(
        &self,
        reject: Reject,
        body: &[u8],
        edge: Option<&EdgeIdentity>,
        route: &str,
    ) -> ApiError {
        self.refuse_early_naming(reject, body, edge, route, None)
            .await
    }

    /// [`Self::refuse_early`], the rows naming what `named` does of the request
    /// (the JSON route's module, action and request id: an idempotent retry's).
    async fn refuse_early_naming(
        &self,
        reject: Reject,
        body: &[u8],
        edge: Option<&EdgeIdentity>,
        route: &str,
        named: Option<Command>,
    ) -> ApiError {
        self.refuse_early_rows(reject, body, edge, edge.is_some(), route, named)
            .await
    }

    /// [`Self::refuse_early_naming`]; `edge_accepted`: whether the edge accepted
    /// what is refused (an edge row first). A signed command the edge checked
    /// only the token of (`jwt`) was not accepted by it.
    async fn refuse_early_rows(
        &self,
        reject: Reject,
        body: &[u8],
        edge: Option<&EdgeIdentity>,
        edge_accepted: bool,
        route: &str,
        named: Option<Command>,
    ) -> ApiError {
        let mut rows = Vec::with_capacity(2);
        if edge_accepted {
            rows.push(Row {
                stage: Stage::Edge,
                decision: Decision::Accepted,
                code: None,
            });
        }
        rows.push(Row {
            stage: Stage::Sidecar,
            decision: Decision::Rejected,
            code: Some(reject.code),
        });
        self.metrics.decision(reject.code.as_str());
        let requester = edge.map(|e| e.requester.clone()).unwrap_or_default();
        self.refuse(
            Vec::new(),
            Refused {
                rows,
                reject,
                command: named,
            },
            body,
            &requester,
            route,
        )
        .await
    }

    /// Admits one signed command: the one path every command takes. Nothing is
    /// applied here: the agent applies only what the bus holds, after verifying
    /// and auditing it again.
    pub async fn admit(
        &self,
        body: &[u8],
        route: Option<(Module, Action)>,
        edge: Option<&EdgeIdentity>,
    ) -> Result<Json<Value>, ApiError> {
        let span = tracing::info_span!(
            "command",
            request_id = tracing::field::Empty,
            issuer = tracing::field::Empty,
            nonce = tracing::field::Empty,
            module = tracing::field::Empty,
        );
        let requester = edge.map(|e| e.requester.clone()).unwrap_or_default();
        // The edge verifies a signed command and the token's command role on its
        // command routes; a command it forwarded as another route's request (a
        // route of Envoy's that sent it under another path) had its token's role
        // checked for that route only, and one it did not stamp had no token
        // checked at all: checked here (counted by `refuse_early`).
        if let Some(r) = self.unchecked_by_the_edge(edge) {
            // No edge row: one that checked the token alone did not accept
            // the command, and that the stamp of one that verified it names
            // this command is not checked yet (admission checks it before
            // recording the edge's acceptance). The sidecar's row names who.
            let e = self
                .refuse_early_rows(r, body, edge, false, &route_path(route), None)
                .instrument(span.clone())
                .await;
            span.in_scope(|| tracing::info!(code = %e.code(), detail = e.detail(), "refused"));
            return Err(e);
        }
        let result = self
            .admit_inner(body, route, edge, &requester, &Vec::new)
            .instrument(span.clone())
            .await;
        match &result {
            Ok(_) => self.metrics.decision("accepted"),
            Err(e) => {
                self.metrics.decision(e.code().as_str());
                span.in_scope(|| tracing::info!(code = %e.code(), detail = e.detail(), "refused"));
            }
        }
        result.map(Json)
    }

    /// What became of an accepted command that is sent again with the same bytes:
    /// applied (where in the ledger), or not yet (after waiting for its agent up to
    /// `apply_wait`). `None` when `c` was not accepted with these bytes.
    async fn resend_status(
        &self,
        c: &Command,
        body: &[u8],
        now: u64,
    ) -> Option<Map<String, Value>> {
        self.accepted_status(&c.issuer, c.nonce, Some(gw_core::replay::digest(body)), now)
            .await
    }

    /// What became of the command accepted with `(issuer, nonce)` (of these bytes,
    /// `digest`, when given): its request id, whether it was applied (waited for
    /// up to `apply_wait`), and its ledger rows; `None` when the guard does not
    /// hold it.
    async fn accepted_status(
        &self,
        issuer: &str,
        nonce: u64,
        digest: Option<gw_core::replay::Digest>,
        now: u64,
    ) -> Option<Map<String, Value>> {
        let mut acks = self.acks.subscribe();
        let seen = |me: &Self| {
            me.replay
                .lock()
                .get(issuer, nonce, now)
                .map(|s| s.value.clone())
        };
        let a = seen(self).filter(|a| digest.is_none_or(|d| a.digest == d))?;
        let digest = a.digest;
        // Applied (its row's seq), or refused (why).
        let decided = |a: &Accepted| a.decided().map(|d| d.map_err(agent_refusal));
        let outcome = match decided(&a) {
            Some(known) => Some(known),
            None => tokio::time::timeout(self.apply_wait, async {
                loop {
                    match acks.recv().await {
                        Ok(ack)
                            if ack.issuer == issuer
                                && ack.nonce == nonce
                                && ack.digest == digest =>
                        {
                            return Some(ack.outcome.map(|_| ack.seq));
                        }
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            })
            .await
            .ok()
            .flatten()
            .or_else(|| seen(self).as_ref().and_then(decided)),
        };
        let applied = outcome.as_ref().and_then(|o| o.as_ref().ok().copied());
        let mut m = Map::new();
        m.insert("request_id".into(), a.request_id.clone().into());
        m.insert("applied".into(), applied.is_some().into());
        if let Some(Err(r)) = &outcome {
            m.insert(
                "apply_error".into(),
                json!({"error": r.code.as_str(), "detail": r.detail}),
            );
        }
        let mut ledger = json!({"chain_id": self.node_id, "accepted_seq": a.seq});
        // 0: applied by another node (its chain has the row).
        if let Some(seq) = applied.filter(|s| *s > 0) {
            ledger["applied_seq"] = seq.into();
        }
        m.insert("ledger".into(), ledger);
        Some(m)
    }

    /// The answer for command `c` of `module` when the replay guard knows what
    /// became of it (a waiter that missed its agent's answer): applied, with the
    /// module's state now, or refused by this node's agent.
    fn decided_now(&self, c: &Command, module: Module, now: u64) -> Option<Outcome> {
        let decided = self
            .replay
            .lock()
            .get(&c.issuer, c.nonce, now)?
            .value
            .decided()?
            .map_err(agent_refusal);
        Some(match decided {
            Ok(seq) => (Ok(self.modules.get(module)), seq, None),
            Err(r) => (Err(r), 0, None),
        })
    }

    /// Whether the token the edge verified for `who` has the command role.
    fn has_command_role(&self, who: &EdgeIdentity) -> bool {
        let roles: Vec<&str> = who.requester.roles.split(',').map(str::trim).collect();
        gw_core::roles::satisfies(&roles, &self.command_role)
    }

    /// Why a signed command may not be admitted for what the edge checked of
    /// it: nothing — no stamp, so no token the edge verified (a filter missing
    /// from Envoy's chain, a route of Envoy's that skips it) — or a token that
    /// lacks the command role (`jwt`: checked for whatever route the edge took
    /// the path for; `edge`: checked against the filter's `command_role`). The command's signature is the sidecar's to check either way; the
    /// token is the edge's, and a command comes with both.
    fn unchecked_by_the_edge(&self, edge: Option<&EdgeIdentity>) -> Option<Reject> {
        let Some(edge) = edge else {
            return Some(Reject::new(
                Code::JwtMissing,
                "a signed command needs a token the edge verified: this request carries no stamp of the edge",
            ));
        };
        if self.has_command_role(edge) {
            return None;
        }
        // `edge`: checked by the edge against its own `command_role`, which may
        // not be this one's (a filter configured otherwise): checked again, as
        // every other route's role is.
        let why = if edge.verified == contract::Verified::Edge {
            "the edge let it through for other roles: is the filter's command_role this one?"
        } else {
            "the edge did not take this path for a command route"
        };
        Some(Reject::with(
            Code::ForbiddenRole,
            format!(
                "a signed command needs role `{}` ({why})",
                self.command_role
            ),
        ))
    }

    /// Admission of `body`. `edge`: the edge forwarded exactly this body (its row
    /// comes first); `requester`: who asked, as the edge verified it; `prefix`:
    /// the entries made durable with the acceptance or the refusal (the JSON
    /// route's row of the body the edge accepted), made when needed (a row is
    /// sealed in place: a copy kept of it would be copied whole).
    async fn admit_inner(
        &self,
        body: &[u8],
        route: Option<(Module, Action)>,
        edge: Option<&EdgeIdentity>,
        requester: &Requester,
        prefix: &(dyn Fn() -> Vec<journal::Entry> + Send + Sync),
    ) -> Result<Value, ApiError> {
        let path = route_path(route);
        let (req, verdict) = {
            let mut g = self.gate.lock();
            let replay = self.replay.lock();
            // The clock is read under the guard's lock, at the guard's time at
            // the earliest: no request judges a command at a moment before one
            // the guard already forgot nonces at (see `NonceBook::clock`).
            let req = Request {
                body,
                route,
                edge,
                now: replay.clock(crate::now_secs()),
            };
            let verdict = g.admission.decide(&req, &*replay);
            (req, verdict)
        };
        let a = match verdict {
            Verdict::Refused(r) => {
                if let Some(c) = &r.command {
                    record_command(c);
                }
                let resent = r.command.clone().filter(|_| r.reject.code == Code::Replay);
                // A stamp of another command: who it names did not send this body.
                let nobody = Requester::default();
                let requester = if r.reject.code == Code::EdgeStampInvalid {
                    &nobody
                } else {
                    requester
                };
                // The row first: a client that hangs up while a resend waits for
                // its agent below does not take the refusal's row with it.
                let e = self.refuse(prefix(), r, body, requester, &path).await;
                let status = match &resent {
                    // (Not when the row could not be written: that is the answer.)
                    Some(c) if e.code() == Code::Replay => {
                        self.resend_status(c, body, req.now).await
                    }
                    _ => None,
                };
                return Err(match status {
                    Some(fields) => e.with_fields(fields),
                    None => e,
                });
            }
            Verdict::Admitted(a) => a,
        };
        let mut reserved = Reservation {
            control: self,
            admitted: &a,
            settled: false,
        };
        // Kafka away for long: commands wait in memory until the broker takes
        // them, so no more than the bound are accepted.
        if let Some(why) = self.bus.outbox_full() {
            let r = self.gate.lock().admission.not_taken(
                &a,
                format!("{why}; not accepted: send the same bytes again later"),
            );
            // Nothing was queued for it: its nonce is free at once.
            reserved.settled();
            return Err(self.refuse(prefix(), r, body, requester, &path).await);
        }
        let c = &a.verified.command;
        record_command(c);
        // One durable step: the rows, the nonce and the command on the bus. If it
        // fails the same bytes may be sent again (`Admission::journal_failed`).
        let max_skew = self.gate.lock().admission.policy().max_skew;
        let expires = gw_core::replay::expiry(c.ts, max_skew);
        let digest = gw_core::replay::digest(body);
        let mut entries = prefix();
        entries.extend(self.rows(&a.rows, body, Some(c), requester, &path));
        entries.push(ReplayStore::entry(
            &c.issuer,
            c.nonce,
            expires,
            digest,
            &c.request_id,
            Some(super::agent::what_of(c)),
        ));
        entries.push(journal::Entry::Publish(PublishEntry {
            module: a.verified.module,
            payload: body.to_vec(),
            requester: requester.clone(),
            forward_epoch: self.bus.forward_epoch(),
        }));
        let mut acks = self.acks.subscribe();
        let result = self.journal.commit(Txn::of(entries)).await;
        reserved.settled();
        let committed = match result {
            Ok(done) => done,
            Err(e) => {
                let r = self.gate.lock().admission.journal_failed(&a, &e.public());
                return Err(self.refuse(prefix(), r, body, requester, &path).await);
            }
        };
        let accepted_seq = committed
            .rows
            .iter()
            .find(|r| r.stage == Stage::Sidecar.as_str())
            .map_or(0, |r| r.seq);
        // The journal's sink put the nonce in the guard before the commit returned
        // (a durable nonce is always remembered: `ReplayStore::record`).
        let v = &a.verified;
        let outcome = tokio::time::timeout(self.apply_wait, async {
            loop {
                match acks.recv().await {
                    Ok(ack)
                        if ack.issuer == c.issuer
                            && ack.nonce == c.nonce
                            && ack.digest == digest =>
                    {
                        return Some((ack.outcome, ack.seq, ack.applied_by))
                    }
                    Ok(_) => {}
                    // Answers this waiter did not read in time: the guard knows
                    // whether the command was applied, or refused here.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if let Some(decided) = self.decided_now(c, v.module, req.now) {
                            return Some(decided);
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .await
        .ok()
        .flatten()
        .or_else(|| self.decided_now(c, v.module, req.now));
        let mut ledger = json!({"chain_id": self.node_id, "accepted_seq": accepted_seq});
        let mut out = json!({"ok": true, "request_id": c.request_id, "module": v.module.as_str(),
                              "action": v.action.as_str(), "nonce": c.nonce,
                              "journal_lsn": committed.lsn, "applied": false});
        match outcome {
            Some((Ok(state), seq, by)) => {
                out["applied"] = json!(true);
                out["state"] = json!(state);
                match by {
                    // Applied by another node's agent: its chain has the row.
                    Some(chain) => ledger["applied_chain_id"] = chain.into(),
                    // 0: applied earlier, the row's position unknown here.
                    None if seq > 0 => ledger["applied_seq"] = seq.into(),
                    None => {}
                }
            }
            Some((Err(r), _, _)) => {
                out["apply_error"] = json!({"error": r.code.as_str(), "detail": r.detail});
            }
            None => out["pending"] = json!(true),
        }
        out["ledger"] = ledger;
        Ok(out)
    }

    /// The JSON route: the body becomes args, the sidecar signs, then [`Self::admit`].
    /// Every refusal here has its row too (about the JSON body the edge saw).
    async fn admit_json(
        &self,
        body: &[u8],
        route: (Module, Action),
        edge: Option<&EdgeIdentity>,
        idempotency_key: Result<Option<&str>, Reject>,
    ) -> Result<Json<Value>, ApiError> {
        let path = route_path(Some(route));
        // The sidecar signs these commands itself: their authority is the token's
        // role. The edge checked it on its control routes; checked here again, so
        // that no other way in (a route the edge took for another path) signs.
        let Some(who) = edge else {
            let r = Reject::new(
                Code::JwtMissing,
                "the JSON control route needs a token verified by the edge",
            );
            return Err(self.refuse_early(r, body, edge, &path).await);
        };
        if !self.has_command_role(who) {
            let r = Reject::with(
                Code::ForbiddenRole,
                format!("the JSON control route needs role `{}`", self.command_role),
            );
            return Err(self.refuse_early(r, body, edge, &path).await);
        }
        // The edge checked the token at the request's headers; its body (which
        // the edge streams here) may come up to the route's timeout later. Held
        // to its expiry again now, with the edge's leeway.
        let leeway = gw_core::jwt::JwtPolicy::default().leeway_secs;
        if who
            .token_exp
            .is_some_and(|exp| exp.saturating_add(leeway) <= crate::now_secs())
        {
            let r = Reject::new(
                Code::JwtExpired,
                "the token expired before the request's body came",
            );
            return Err(self.refuse_early(r, body, edge, &path).await);
        }
        let args = match json_route::parse_args(body, route.1) {
            Ok(a) => a,
            Err(r) => return Err(self.refuse_early(r, body, edge, &path).await),
        };
        let Some(signer) = self.signer.as_ref() else {
            return Err(self
                .refuse_early(
                    Reject::new(
                        Code::Unavailable,
                        "this sidecar has no signing key (CTRL_SIGN_SK_HEX)",
                    ),
                    body,
                    edge,
                    &path,
                )
                .await);
        };
        // With an idempotency key the command's nonce and request id are the
        // key's: a retry finds them in the replay guard and is answered with what
        // became of the first (409 `replay`, `applied`), never signed again; once
        // the guard forgot them (the command's freshness passed), an agent still
        // knows the nonce for `agent_dedup_secs` and the retry comes out a
        // `duplicate`. Another request under the same key is refused.
        let idempotent = match idempotency_key.and_then(|k| {
            k.map(|k| {
                json_route::Idempotent::new(
                    &who.requester.token_issuer,
                    &who.requester.sub,
                    k,
                    route,
                    body,
                )
            })
            .transpose()
        }) {
            Ok(i) => i,
            Err(r) => return Err(self.refuse_early(r, body, edge, &path).await),
        };
        if let Some(i) = &idempotent {
            // The rows of a refusal name the request as the key makes it.
            let named = || {
                Some(Command {
                    module: route.0.to_proto() as i32,
                    action: route.1.to_proto() as i32,
                    request_id: i.request_id.clone(),
                    ..Command::default()
                })
            };
            let now = crate::now_secs();
            let used_by = self
                .replay
                .lock()
                .get(signer.issuer(), i.nonce, now)
                .map(|s| s.value.request_id.clone());
            if let Some(first) = used_by {
                // The same request under the key has the same id (its route and
                // body are part of it).
                if first != i.request_id {
                    let r = Reject::with(
                        Code::BadArgs,
                        format!("this idempotency key was used for another request ({first})"),
                    );
                    return Err(self
                        .refuse_early_naming(r, body, edge, &path, named())
                        .await);
                }
                let r = Reject::with(
                    Code::Replay,
                    format!("this request ({first}) was accepted before: not signed again"),
                );
                let e = self
                    .refuse_early_naming(r, body, edge, &path, named())
                    .await;
                let status = self
                    .accepted_status(signer.issuer(), i.nonce, None, now)
                    .await;
                return Err(match status {
                    Some(fields) if e.code() == Code::Replay => e.with_fields(fields),
                    _ => e,
                });
            }
        }
        let signed = match signer.sign(route, args, crate::now_nanos(), idempotent.as_ref()) {
            Ok(s) => s,
            Err(r) => return Err(self.refuse_early(r, body, edge, &path).await),
        };
        // The edge saw the JSON body; the sidecar's rows are about the command it
        // signs, and say who asked for it (made durable with its acceptance). The
        // edge's row names what it accepted: the route's module and action, the
        // arguments, and the request id the command was given, so the request's
        // history finds it; the signing fields are the sidecar's, not on it.
        let accepted = <Command as prost::Message>::decode(signed.as_slice())
            .ok()
            .map(|c| Command {
                module: c.module,
                action: c.action,
                request_id: c.request_id,
                args: c.args,
                ..Command::default()
            });
        let prefix = || -> Vec<journal::Entry> {
            edge.and_then(|e| {
                self.auditor.row(&Entry {
                    stage: Stage::Edge,
                    decision: Decision::Accepted,
                    code: None,
                    body,
                    command: accepted.as_ref(),
                    requester: Some(&e.requester),
                    route: &path,
                })
            })
            .into_iter()
            .collect()
        };
        let requester = edge.map(|e| e.requester.clone()).unwrap_or_default();
        let result = self
            .admit_inner(&signed, Some(route), None, &requester, &prefix)
            .await;
        match &result {
            Ok(_) => self.metrics.decision("accepted"),
            Err(e) => self.metrics.decision(e.code().as_str()),
        }
        result.map(Json)
    }
}

/// What became of an admitted command, as its agent answered it: the module's
/// state or the refusal, the `seq` of its row, and the chain that applied it
/// when another node's did.
type Outcome = (Result<ModuleState, Reject>, u64, Option<String>);

/// The route a command came in on: the command endpoint, or a module route.
/// The refusal this node's agent recorded (its code, as the replay guard keeps it).
fn agent_refusal(code: &str) -> Reject {
    let code = Code::parse(code).unwrap_or(Code::Malformed);
    Reject::with(
        code,
        "refused by its module's agent (the ledger's agent row says why)".to_owned(),
    )
}

fn route_path(route: Option<(Module, Action)>) -> String {
    match route {
        None => contract::COMMAND_PATH.to_owned(),
        Some((m, a)) => format!(
            "{}{}:{}",
            contract::MODULE_ROUTE_PREFIX,
            m.as_str(),
            a.as_str()
        ),
    }
}

fn record_command(c: &Command) {
    let span = tracing::Span::current();
    span.record("request_id", c.request_id.as_str());
    span.record("issuer", c.issuer.as_str());
    span.record("nonce", c.nonce);
    if let Some(m) = Module::from_proto(c.module) {
        span.record("module", m.as_str());
    }
}

/// An admitted command's nonce stays reserved until its fate is settled.
struct Reservation<'a> {
    control: &'a Control,
    admitted: &'a Admitted,
    /// The journal answered the commit (the guard knows the nonce, or it failed).
    settled: bool,
}

impl Reservation<'_> {
    /// The journal answered: the nonce is released at once (durable, the guard
    /// holds it and refuses a resend; failed, the same bytes may come again), so
    /// that a request waiting for its agent does not hold a place in the guard's
    /// bounds twice.
    fn settled(&mut self) {
        if !self.settled {
            self.control.gate.lock().admission.release(self.admitted);
            self.settled = true;
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // The request was cancelled (its client went away) while its commit was
        // queued: the commit still happens. Release the nonce only once the
        // journal has dealt with it — a marker queued behind it is answered after
        // it (and after its sink put the nonce in the guard) — so a resend in
        // between is held as in flight, never admitted a second time.
        let gate = self.control.gate.clone();
        let admitted = self.admitted.clone();
        self.control.journal.after_queued(Box::new(move || {
            gate.lock().admission.release(&admitted);
        }));
    }
}

/// Why the control plane cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The bus refused a consumer.
    #[error("command bus: {0}")]
    Bus(#[from] super::bus::BusError),
}

fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
}

/// The body, or the refusal of one that could not be read whole — larger than
/// `max_body_bytes`, or cut off — recorded like every other (without its bytes).
async fn read_body(
    c: &Control,
    body: Result<Bytes, BytesRejection>,
    edge: Option<&EdgeIdentity>,
    route: &str,
) -> Result<Bytes, ApiError> {
    match body {
        Ok(b) => Ok(b),
        Err(e) => {
            let r = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Reject::with(
                    Code::TooLarge,
                    format!("the body is larger than {} bytes", c.max_body),
                )
            } else {
                Reject::with(
                    Code::Malformed,
                    format!("the body could not be read: {}", e.body_text()),
                )
            };
            Err(c.refuse_early(r, &[], edge, route).await)
        }
    }
}

async fn post_command(
    State(c): State<Arc<Control>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let edge = crate::serve::edge_identity(&headers);
    let body = read_body(&c, body, edge.as_ref(), contract::COMMAND_PATH).await?;
    if !contract::is_command_media_type(content_type(&headers)) {
        return Err(c
            .refuse_early(
                Reject::new(
                    Code::UnsupportedMediaType,
                    "a signed command is application/x-protobuf (or application/octet-stream)",
                ),
                &body,
                edge.as_ref(),
                contract::COMMAND_PATH,
            )
            .await);
    }
    c.admit(&body, None, edge.as_ref()).await
}

async fn post_module(
    State(c): State<Arc<Control>>,
    spec: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let edge = crate::serve::edge_identity(&headers);
    // A path that is not UTF-8 once decoded names no module: refused below, with
    // its row, in the API's shape.
    let spec = spec.map(|Path(s)| s).unwrap_or_default();
    let route_of_spec = format!(
        "{}{}",
        contract::MODULE_ROUTE_PREFIX,
        contract::truncate_utf8(&spec, 64)
    );
    let body = read_body(&c, body, edge.as_ref(), &route_of_spec).await?;
    let Some(route) = parse_module_spec(&spec) else {
        return Err(c
            .refuse_early(
                Reject::new(Code::Malformed, "route names an unknown module or action"),
                &body,
                edge.as_ref(),
                &route_of_spec,
            )
            .await);
    };
    let ct = content_type(&headers);
    if contract::is_command_media_type(ct) {
        return c.admit(&body, Some(route), edge.as_ref()).await;
    }
    if !json_route::is_json_media_type(ct) {
        return Err(c.refuse_early(
            Reject::new(
                Code::UnsupportedMediaType,
                "this route takes application/json, or a signed command as application/x-protobuf",
            ),
            &body,
            edge.as_ref(),
            &route_path(Some(route)),
        ).await);
    }
    let key = json_route::idempotency_key(
        headers
            .get(json_route::IDEMPOTENCY_KEY)
            .map(axum::http::HeaderValue::as_bytes),
    );
    c.admit_json(&body, route, edge.as_ref(), key).await
}

async fn get_modules(State(c): State<Arc<Control>>) -> Json<Modules> {
    Json(c.modules.snapshot())
}

/// `POST /internal/edge-decisions`: the filter's batch of edge rejections, each
/// sealed into the ledger as a `stage = edge` row noting the report's id and the
/// edge's time (`args_json` `{"report_id": …, "edge_ts_ms": …}`). The whole batch
/// is checked before any row is written. A report recorded before (its id among
/// [`RecentReports`]: a batch sent again after a lost answer) is skipped, counted
/// as a duplicate. Anyone who reaches Envoy causes these (a request with no token
/// is one), so they are within the ledger's budgets for them
/// ([`crate::serve::EdgeBudgets`]: of all codes and of each, apart for reports
/// naming a requester): beyond them a report is counted and summed in a row.
async fn edge_decisions(
    State(c): State<Arc<Control>>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let reports = contract::parse_report_batch(&body).map_err(ApiError::from)?;
    // In a task of its own: a handler dropped half-way (Envoy stopped waiting and
    // reset the stream) still ends the batch, its ids known as recorded or let
    // go, so the batch the filter sends again finds them.
    tokio::spawn(record_reports(c, reports))
        .await
        .map_err(|e| ApiError::with(Code::Unavailable, format!("edge reports: {e}")))?
}

/// Ends a batch of edge reports in [`RecentReports`] when dropped.
struct EndBatch<'a> {
    control: &'a Control,
    ids: &'a [&'a str],
    written: bool,
}

impl Drop for EndBatch<'_> {
    fn drop(&mut self) {
        self.control.edge_seen.lock().end(self.ids, self.written);
    }
}

/// [`edge_decisions`], once the batch is checked.
async fn record_reports(
    c: Arc<Control>,
    reports: Vec<contract::CheckedReport>,
) -> Result<Json<Value>, ApiError> {
    let mut fresh = Vec::with_capacity(reports.len());
    let mut duplicates = 0usize;
    let ids: Vec<&str> = {
        let mut seen = c.edge_seen.lock();
        let mut in_batch = HashSet::new();
        for r in &reports {
            if r.id.is_empty() {
                fresh.push(r);
                continue;
            }
            match seen.seen(&r.id) {
                Seen::Recorded => duplicates += 1,
                // Not decided yet: the filter sends the batch again later.
                Seen::Pending => {
                    return Err(ApiError::with(
                        Code::Unavailable,
                        "a batch being written holds some of these reports: send again",
                    ))
                }
                Seen::New if !in_batch.insert(r.id.as_str()) => duplicates += 1,
                Seen::New => fresh.push(r),
            }
        }
        let ids: Vec<&str> = in_batch.into_iter().collect();
        seen.begin(&ids);
        ids
    };
    // Whatever happens below (a panic included), the ids stop being pending:
    // recorded only when the batch was written.
    let mut ending = EndBatch {
        control: &c,
        ids: &ids,
        written: false,
    };
    // The whole batch in one transaction.
    let mut rows = Vec::with_capacity(fresh.len());
    let mut taken = Vec::new();
    let mut summed = Vec::new();
    // Reports standing for refusals the edge could not report one by one: a
    // row summing them, within the budget (else owed, summed later).
    let mut sums_taken = Vec::new();
    let mut sums_owed = Vec::new();
    for r in fresh {
        // A report with an id comes again if this batch is not written.
        let again = !r.id.is_empty();
        let budget = c.edge_reports.of(&r.requester);
        // Its id noted (a resend after a crash that lost the answer is known
        // recorded), and the edge's time.
        let mut note = Map::new();
        if again {
            note.insert("report_id".into(), json!(r.id));
        }
        note.insert("edge_ts_ms".into(), json!(r.ts_ms));
        if let Some(n) = r.raw_len {
            // The row holds the body's start: it says so.
            note.insert("raw_bytes".into(), json!(n));
            note.insert("raw_kept".into(), json!(r.raw.len()));
        }
        match r.unrecorded {
            // Refusals the edge could not report one by one: one row sums them
            // (and what the budget owed of the code).
            Some(n) => {
                let Some(owed) = budget.take_sum(r.code) else {
                    // Owed once the batch is written (else it comes again).
                    sums_owed.push((budget, r.code, n, again));
                    continue;
                };
                note.insert("unrecorded".into(), json!(n.saturating_add(owed)));
                sums_taken.push((budget, r.code, n, owed, again));
            }
            None => {
                let Some(owed) = budget.take(r.code, Some(&r.requester)) else {
                    summed.push((budget, r.code, again));
                    continue;
                };
                taken.push((budget, r.code, owed, again));
                if owed > 0 {
                    rows.extend(c.auditor.unrecorded_row(Stage::Edge, r.code, owed));
                }
            }
        }
        let e = Entry {
            stage: Stage::Edge,
            decision: Decision::Rejected,
            code: Some(r.code),
            body: &r.raw,
            command: None,
            requester: Some(&r.requester),
            // A query as its digest, even from a filter that kept it whole.
            route: &gw_core::contract::report_route(&r.path),
        };
        rows.extend(c.auditor.row_noting(&e, &Value::Object(note)));
    }
    let written = c.record(rows).await;
    ending.written = written.is_ok();
    drop(ending);
    if let Err(e) = written {
        // Nothing of the batch was written (503: the filter sends it again). The
        // sums its rows carried are owed again; so are its own reports that will
        // not come again (no id: a filter before report ids), not the others.
        for (budget, code, owed, again) in taken {
            if again {
                // Only the sum its row carried: the report itself comes again.
                budget.owe(code, owed);
            } else {
                budget.untake(code, owed);
                c.metrics.unrecorded(code.as_str());
            }
        }
        for (budget, code, again) in summed {
            if again {
                budget.forgive(code);
            } else {
                c.metrics.unrecorded(code.as_str());
            }
        }
        for (budget, code, n, owed, again) in sums_taken {
            budget.owe(code, if again { owed } else { owed.saturating_add(n) });
            if !again {
                c.metrics.unrecorded_n(code.as_str(), n);
            }
        }
        for (budget, code, n, again) in sums_owed {
            if !again {
                budget.owe(code, n);
                c.metrics.unrecorded_n(code.as_str(), n);
            }
        }
        return Err(e.into());
    }
    for (_, code, _) in &summed {
        c.metrics.unrecorded(code.as_str());
    }
    for (_, code, n, _, _) in &sums_taken {
        c.metrics.unrecorded_n(code.as_str(), *n);
    }
    for (budget, code, n, _) in &sums_owed {
        budget.owe(*code, *n);
        c.metrics.unrecorded_n(code.as_str(), *n);
    }
    for _ in 0..reports.len() - duplicates {
        c.metrics.decision("edge_reported");
    }
    for _ in 0..duplicates {
        c.metrics.decision("edge_report_duplicate");
    }
    Ok(Json(json!({
        "ok": true,
        "recorded": reports.len() - duplicates - summed.len() - sums_owed.len(),
        "unrecorded": summed.len() + sums_owed.len(),
        "duplicates": duplicates,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::kafka_state::LastDecision;

    fn checkpoint(writer: &str, offset: i64, nonce: u64) -> Checkpoint {
        let c = Command {
            issuer: "dashboard".into(),
            nonce,
            ..Command::default()
        };
        Checkpoint {
            last: [(
                writer.to_owned(),
                LastDecision {
                    position: Position {
                        partition: 0,
                        offset,
                    },
                    outcome: "applied".into(),
                    code: None,
                    payload: prost::Message::encode_to_vec(&c),
                    requester: Requester::default(),
                    forwarded_by: None,
                    omitted: None,
                },
            )]
            .into_iter()
            .collect(),
            writer: writer.to_owned(),
            ..Checkpoint::default()
        }
    }

    /// Another node's checkpoint is announced once per decision: the same one read
    /// again is not, another command at a position seen before (a command topic
    /// created again) is.
    #[test]
    fn another_nodes_decisions_are_told_apart_by_command_not_only_by_position() {
        let (acks, mut rx) = broadcast::channel(8);
        let now = crate::now_secs();
        let (_floor_dir, floor) = super::super::clock_floor::scratch();
        let mut w = CheckpointWatch {
            module: Module::Mev,
            me: "node-1".into(),
            last: BTreeMap::new(),
            modules: ModuleTable::from(Modules::default()),
            replay: Arc::new(Mutex::new(ReplayStore::open(
                &[],
                gw_core::replay::Limits::default(),
                now,
                floor,
            ))),
            acks,
        };
        w.seen(checkpoint("node-2", 5, 1));
        w.seen(checkpoint("node-2", 5, 1));
        w.seen(checkpoint("node-2", 5, 2));
        w.seen(checkpoint("node-1", 6, 3)); // this node's own: announced by its agent
                                            // A copy no gateway node forwarded, refused by node-2: not an answer to
                                            // anyone waiting for the command it copies.
        let mut copy = checkpoint("node-2", 7, 4);
        if let Some(d) = copy.last.get_mut("node-2") {
            d.outcome = crate::control::agent::UNFORWARDED.into();
            d.code = Some("forbidden_peer".into());
        }
        w.seen(copy);
        // A copy of a forward decided on before, refused by node-2: the same.
        let mut copy = checkpoint("node-2", 8, 5);
        if let Some(d) = copy.last.get_mut("node-2") {
            d.outcome = crate::control::agent::COPIED.into();
            d.code = Some("replay".into());
        }
        w.seen(copy);
        // A command too large for the checkpoint to keep whole: told all the
        // same, by what the checkpoint kept of it.
        let mut large = checkpoint("node-2", 9, 6);
        let big = prost::Message::encode_to_vec(&Command {
            issuer: "dashboard".into(),
            nonce: 6,
            args: [(
                "pad".to_owned(),
                "x".repeat(crate::control::kafka_state::LAST_PAYLOAD_MAX),
            )]
            .into(),
            ..Command::default()
        });
        if let Some(d) = large.last.get_mut("node-2") {
            (d.payload, d.omitted) = LastDecision::keep(&big);
        }
        w.seen(large);
        let told: Vec<(u64, gw_core::replay::Digest)> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|a| (a.nonce, a.digest))
            .collect();
        let nonces: Vec<u64> = told.iter().map(|t| t.0).collect();
        assert_eq!(nonces, vec![1, 2, 6]);
        assert_eq!(told[2].1, gw_core::replay::digest(&big));
    }

    /// Another node's agent refusing a command this node accepted is kept in the
    /// guard (a resend is told why, not "not applied yet"), when the refusal is
    /// the command's — `unavailable` (overtaken on the topic) and `replay`
    /// (another command under its nonce was applied) included — and not when it
    /// is only about the delivery (`forbidden_peer`).
    #[test]
    fn another_nodes_refusal_of_a_command_accepted_here_is_kept_in_the_guard() {
        let (acks, mut rx) = broadcast::channel(8);
        let now = crate::now_secs();
        let body = |nonce: u64| {
            prost::Message::encode_to_vec(&Command {
                issuer: "dashboard".into(),
                nonce,
                ..Command::default()
            })
        };
        let records: Vec<(Lsn, Txn)> = (1..=7)
            .map(|n| {
                let e = ReplayStore::entry(
                    "dashboard",
                    n,
                    now + 30,
                    gw_core::replay::digest(&body(n)),
                    "r",
                    None,
                );
                (n, Txn::of(vec![e]))
            })
            .collect();
        let (_floor_dir, floor) = super::super::clock_floor::scratch();
        let replay = Arc::new(Mutex::new(ReplayStore::open(
            &records,
            gw_core::replay::Limits::default(),
            now,
            floor,
        )));
        let mut w = CheckpointWatch {
            module: Module::Mev,
            me: "node-1".into(),
            last: BTreeMap::new(),
            modules: ModuleTable::from(Modules::default()),
            replay: replay.clone(),
            acks,
        };
        let refused = |offset: i64, nonce: u64, code: &str, by: &str| {
            let mut cp = checkpoint("node-2", offset, nonce);
            if let Some(d) = cp.last.get_mut("node-2") {
                d.outcome = "rejected".into();
                d.code = Some(code.into());
                d.forwarded_by = Some(by.into());
            }
            cp
        };
        w.seen(refused(5, 1, "unavailable", "node-1"));
        w.seen(refused(6, 2, "forbidden_peer", "node-1"));
        w.seen(refused(7, 3, "key_expired", "node-1"));
        // Another node's forward of the same bytes (a resend through it): this
        // node's own forward is still to come.
        w.seen(refused(8, 4, "unavailable", "node-3"));
        // A code this node does not know.
        w.seen(refused(9, 5, "from_the_future", "node-1"));
        // The command's own refusal, whichever node forwarded it.
        w.seen(refused(10, 6, "key_expired", "node-3"));
        // Another command under its nonce was applied: the command's.
        w.seen(refused(11, 7, "replay", "node-1"));
        // Told to the requests waiting here: not node-3's overtaken forward (it
        // would tell this node's client to sign again while its own forward is
        // still on its way), nor a code not known from another node's forward.
        let told: Vec<u64> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|a| a.nonce)
            .collect();
        assert_eq!(told, vec![1, 2, 3, 5, 6, 7]);
        let guard = replay.lock();
        let code = |n| {
            guard
                .get("dashboard", n, now)
                .and_then(|s| s.value.refused.clone())
        };
        assert_eq!(
            (
                code(1).as_deref(),
                code(2),
                code(3).as_deref(),
                code(4),
                code(5),
                code(7).as_deref()
            ),
            (
                Some("unavailable"),
                None,
                Some("key_expired"),
                None,
                None,
                Some("replay")
            )
        );
    }
}
