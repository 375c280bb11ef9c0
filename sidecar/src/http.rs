//! The sidecar's HTTP surface behind Envoy: re-verifies and applies signed commands,
//! signs commands for the original JSON route, shows module state, health and metrics.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ed25519_dalek::SigningKey;
use gw_core::command::{sign_command, SCHEMA_CTRL_V1};
use gw_core::names::parse_module_spec;
use gw_core::{Action, Code, Command, ControlPolicy, Module, Reject};
use serde::Deserialize;
use serde_json::json;

use tokio::sync::broadcast;

use crate::agent::Ack;
use crate::audit::{Auditor, Decision};
use crate::bus::Bus;
use crate::ledger_sink::DecisionRow;
use crate::modules::Modules;
use crate::now_nanos;
use crate::replay_store::ReplayStore;

/// Shared state of the handlers.
pub struct AppState {
    /// Verification rules.
    pub policy: ControlPolicy,
    /// Authoritative replay guard.
    pub replay: Mutex<ReplayStore>,
    /// Module state (written by the agents).
    pub modules: Arc<Mutex<Modules>>,
    /// Key for the JSON route.
    pub signer: Option<(SigningKey, String)>,
    /// Issuer of JSON-route commands.
    pub json_issuer: String,
    /// Decisions by code (`accepted` for published commands).
    pub decisions: Mutex<BTreeMap<&'static str, u64>>,
    /// The audit ledger (spool + ClickHouse), when configured.
    pub auditor: Auditor,
    /// Where admitted commands go.
    pub bus: Bus,
    /// Agents announce outcomes here.
    pub acks: broadcast::Sender<Ack>,
    /// How long a request waits for its agent before answering `applied: false`.
    pub apply_wait: Duration,
    /// Agent outcomes by (module, outcome), shared with the agents.
    pub agent_outcomes: crate::agent::Outcomes,
    /// Tree models, when configured.
    pub models: Option<Arc<crate::models::ModelHost>>,
    /// The transaction sender and hot path, when `sender` is configured.
    pub data: std::sync::OnceLock<crate::sender::plane::DataPlane>,
    pending: Mutex<HashSet<(String, u64)>>,
    last_nonce: AtomicU64,
}

/// What [`AppState::new`] needs.
pub struct Parts {
    /// Verification rules.
    pub policy: ControlPolicy,
    /// Authoritative replay guard.
    pub replay: ReplayStore,
    /// Key for the JSON route.
    pub signer: Option<(SigningKey, String)>,
    /// Issuer of JSON-route commands.
    pub json_issuer: String,
    /// Audit ledger.
    pub auditor: Auditor,
    /// Command bus.
    pub bus: Bus,
    /// See [`AppState::apply_wait`].
    pub apply_wait: Duration,
    /// Tree models, when configured.
    pub models: Option<Arc<crate::models::ModelHost>>,
}

impl AppState {
    /// Builds the state (agents are started separately, see [`crate::app`]).
    pub fn new(p: Parts) -> Arc<AppState> {
        let (acks, _) = broadcast::channel(1024);
        Arc::new(AppState {
            policy: p.policy,
            replay: Mutex::new(p.replay),
            modules: Arc::new(Mutex::new(Modules::new())),
            signer: p.signer,
            json_issuer: p.json_issuer,
            decisions: Mutex::new(BTreeMap::new()),
            auditor: p.auditor,
            bus: p.bus,
            acks,
            apply_wait: p.apply_wait,
            agent_outcomes: Default::default(),
            models: p.models,
            data: std::sync::OnceLock::new(),
            pending: Mutex::new(HashSet::new()),
            last_nonce: AtomicU64::new(0),
        })
    }

    fn audit(
        &self,
        decision: &str,
        code: &str,
        body: &[u8],
        cmd: Option<&Command>,
    ) -> Result<(), Reject> {
        self.auditor.record(
            Decision {
                stage: "sidecar",
                decision,
                code,
            },
            body,
            cmd,
        )
    }

    fn reject(&self, r: Reject, body: &[u8], cmd: Option<&Command>) -> Reject {
        match self.audit("rejected", r.code.as_str(), body, cmd) {
            Ok(()) => r,
            Err(audit) => audit,
        }
    }

    fn count(&self, what: &'static str) {
        if let Ok(mut d) = self.decisions.lock() {
            *d.entry(what).or_default() += 1;
        }
    }

    /// A nonce strictly above every one this process issued: unix nanoseconds.
    fn next_nonce(&self) -> u64 {
        let now = now_nanos();
        let mut prev = self.last_nonce.load(Ordering::Relaxed);
        loop {
            let next = now.max(prev + 1);
            match self
                .last_nonce
                .compare_exchange(prev, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(p) => prev = p,
            }
        }
    }
}

/// A nonce being admitted: a concurrent copy of the same command is refused
/// until this one is published (then the replay guard has it) or failed.
struct Reservation<'a> {
    st: &'a AppState,
    key: (String, u64),
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Ok(mut p) = self.st.pending.lock() {
            p.remove(&self.key);
        }
    }
}

struct ApiError(Reject);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.code.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
        (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            self.0.to_json(),
        )
            .into_response()
    }
}

impl From<Reject> for ApiError {
    fn from(r: Reject) -> Self {
        ApiError(r)
    }
}

/// Whether Envoy's filter verified this request: `edge` (JWT and signed command) or
/// `jwt` (JWT and role: the JSON route). The filter strips any client-sent `x-gw-*`
/// header, so only the edge sets this.
fn edge_verified(headers: &HeaderMap) -> bool {
    headers
        .get("x-gw-verified")
        .is_some_and(|v| matches!(v.as_bytes(), b"edge" | b"jwt"))
}

/// The edge's decision goes into the chain before the sidecar's own. `body` is what
/// the edge saw (the signed command, or the JSON body of the original route).
fn record_edge_accepted(st: &AppState, body: &[u8]) -> Result<(), Reject> {
    st.auditor.record(
        Decision {
            stage: "edge",
            decision: "accepted",
            code: "",
        },
        body,
        None,
    )
}

/// Re-verifies, reserves the nonce, audits, publishes the exact bytes on the bus,
/// records the nonce durably; then waits (bounded) for the module's agent to
/// apply it. The one path every command takes. Nothing is applied here: the agent
/// applies only what the bus holds, after verifying and auditing it again.
async fn admit(
    st: &AppState,
    body: &[u8],
    route: Option<(Module, Action)>,
    headers: &HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    match admit_inner(st, body, route, edge_verified(headers)).await {
        Ok(v) => {
            st.count("accepted");
            Ok(Json(v))
        }
        Err(r) => {
            st.count(r.code.as_str());
            Err(ApiError(r))
        }
    }
}

async fn admit_inner(
    st: &AppState,
    body: &[u8],
    route: Option<(Module, Action)>,
    edge_verified: bool,
) -> Result<serde_json::Value, Reject> {
    if edge_verified {
        record_edge_accepted(st, body)?;
    }
    let now = now_nanos() / 1_000_000_000;
    let v = st
        .policy
        .check(body, now, route)
        .map_err(|r| st.reject(r, body, None))?;
    let c = &v.command;
    let key = (c.issuer.clone(), c.nonce);
    let reserved = (|| {
        let replay = st
            .replay
            .lock()
            .map_err(|_| Reject::new(Code::ReplayUnavailable, "replay state lock poisoned"))?;
        replay.check(&c.issuer, c.nonce)?;
        let mut pending = st
            .pending
            .lock()
            .map_err(|_| Reject::new(Code::ReplayUnavailable, "replay state lock poisoned"))?;
        if !pending.insert(key.clone()) {
            return Err(Reject::new(
                Code::Replay,
                "the same command is being admitted by another request",
            ));
        }
        Ok(())
    })();
    reserved.map_err(|r| st.reject(r, body, Some(c)))?;
    let _reservation = Reservation { st, key };
    // Audited before it is published: nothing reaches the bus without its row, and
    // the ledger reads accepted → applied. If publishing then fails, an
    // `unavailable` row for the same request follows.
    st.audit("accepted", "", body, Some(c))?;
    let mut acks = st.acks.subscribe();
    let position = st.bus.publish(v.module, body).await.map_err(|e| {
        st.reject(
            Reject::with(
                Code::Unavailable,
                format!("command bus: {e}; nothing was applied"),
            ),
            body,
            Some(c),
        )
    })?;
    // On the bus: the agent will apply it. Make the nonce durable here too; if that
    // fails the agent still refuses a second copy (it keeps the nonces it applied).
    let persisted = st
        .replay
        .lock()
        .map_err(|_| Reject::new(Code::ReplayUnavailable, "replay state lock poisoned"))
        .and_then(|mut r| r.accept(&c.issuer, c.nonce));
    if let Err(r) = persisted {
        eprintln!(
            "gw-sidecar: published command {} but the replay state was not saved: {}",
            c.request_id, r.detail
        );
        st.count("replay_not_persisted");
    }
    let outcome = tokio::time::timeout(st.apply_wait, async {
        loop {
            match acks.recv().await {
                Ok(a) if a.issuer == c.issuer && a.nonce == c.nonce => return Some(a.outcome),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .await
    .ok()
    .flatten();
    let mut out = json!({"ok": true, "request_id": c.request_id, "module": v.module.as_str(),
                          "action": v.action.as_str(), "nonce": c.nonce, "published": position,
                          "applied": false});
    match outcome {
        Some(Ok(state)) => {
            out["applied"] = json!(true);
            out["state"] = json!(state);
        }
        Some(Err(r)) => out["apply_error"] = json!({"error": r.code.as_str(), "detail": r.detail}),
        None => out["pending"] = json!(true),
    }
    Ok(out)
}

/// Ships the ledger's pending rows once (the flusher task calls this in a loop).
pub async fn flush_ledger(
    st: &AppState,
    client: &clickhouse::Client,
    table: &str,
) -> Result<usize, String> {
    let Some(ledger) = st.auditor.ledger() else {
        return Ok(0);
    };
    let batch = match ledger.lock() {
        Ok(l) => l.batch(),
        Err(_) => return Err("audit ledger lock poisoned".into()),
    };
    let Some(batch) = batch else { return Ok(0) };
    batch.ship(client, table).await.map_err(|e| e.to_string())?;
    ledger
        .lock()
        .map_err(|_| "audit ledger lock poisoned".to_string())?
        .mark_shipped(batch.last_seq)
        .map_err(|e| e.to_string())
}

async fn post_command(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    admit(&st, &body, None, &headers).await
}

/// One edge rejection reported by the filter (`filter-wasm/src/report.rs`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EdgeReportIn {
    decision: String,
    code: String,
    path: String,
    raw_hex: String,
    ts_ms: u64,
}

/// Most reports in one request.
const MAX_EDGE_REPORTS: usize = 1024;

/// `POST /internal/edge-decisions`: the filter's batch of edge rejections, each
/// sealed into the ledger as a `stage = edge` row. Not routed by Envoy (the filter
/// calls the sidecar cluster directly); like the JSON route, the sidecar trusts its
/// loopback / mTLS peer. The whole batch is checked before any row is written.
async fn edge_decisions(
    State(st): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let reports: Vec<EdgeReportIn> = serde_json::from_slice(&body)
        .map_err(|e| Reject::with(Code::Malformed, format!("edge reports: {e}")))?;
    if reports.len() > MAX_EDGE_REPORTS {
        return Err(Reject::with(
            Code::TooLarge,
            format!("{} reports; at most {MAX_EDGE_REPORTS}", reports.len()),
        )
        .into());
    }
    let mut checked = Vec::with_capacity(reports.len());
    for r in &reports {
        let code = Code::ALL
            .iter()
            .find(|c| c.as_str() == r.code)
            .ok_or_else(|| {
                Reject::with(
                    Code::Malformed,
                    format!("unknown code `{}`", r.code.escape_debug()),
                )
            })?;
        if r.decision != "rejected" || r.path.len() > 256 || r.ts_ms == 0 {
            return Err(Reject::new(
                Code::Malformed,
                "an edge report is `rejected`, with a path of at most 256 bytes and a time",
            )
            .into());
        }
        let raw = hex::decode(&r.raw_hex)
            .map_err(|_| Reject::new(Code::Malformed, "raw_hex is not hex"))?;
        checked.push((code.as_str(), raw));
    }
    for (code, raw) in &checked {
        st.auditor.record(
            Decision {
                stage: "edge",
                decision: "rejected",
                code,
            },
            raw,
            None,
        )?;
        st.count("edge_reported");
    }
    Ok(Json(json!({"ok": true, "recorded": checked.len()})))
}

/// The original API's JSON body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlBody {
    throttle_pct: Option<i64>,
    ev_min: Option<f64>,
    tip_ladder: Option<Vec<f64>>,
    kill: Option<bool>,
}

fn is_protobuf(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .is_some_and(|m| {
            matches!(
                m.as_str(),
                "application/x-protobuf" | "application/protobuf" | "application/octet-stream"
            )
        })
}

async fn post_module(
    State(st): State<Arc<AppState>>,
    Path(spec): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let route = parse_module_spec(&spec)
        .ok_or_else(|| Reject::new(Code::Malformed, "route names an unknown module or action"))?;
    if is_protobuf(&headers) {
        return admit(&st, &body, Some(route), &headers).await;
    }
    let req: ControlBody = if body.is_empty() {
        ControlBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| Reject::with(Code::Malformed, format!("JSON body: {e}")))?
    };
    let (module, action) = route;
    if req.kill == Some(true) && action != Action::Kill {
        return Err(Reject::new(Code::BadArgs, "`kill: true` needs the kill action").into());
    }
    let mut args = BTreeMap::new();
    if let Some(p) = req.throttle_pct {
        args.insert("throttle_pct".to_string(), p.to_string());
    }
    if let Some(e) = req.ev_min {
        args.insert("ev_min".to_string(), e.to_string());
    }
    if let Some(t) = req.tip_ladder.filter(|t| !t.is_empty()) {
        args.insert(
            "tip_ladder".to_string(),
            t.iter().map(f64::to_string).collect::<Vec<_>>().join(","),
        );
    }
    if edge_verified(&headers) {
        record_edge_accepted(&st, &body).map_err(ApiError)?;
    }
    let Some((sk, key_id)) = &st.signer else {
        return Err(Reject::new(
            Code::Unavailable,
            "this sidecar has no signing key (CTRL_SIGN_SK_HEX)",
        )
        .into());
    };
    let cmd = Command {
        ts: now_nanos() / 1_000_000_000,
        module: module.to_proto() as i32,
        action: action.to_proto() as i32,
        args,
        request_id: uuid::Uuid::new_v4().to_string(),
        issuer: st.json_issuer.clone(),
        schema_version: SCHEMA_CTRL_V1.into(),
        nonce: st.next_nonce(),
        ..Default::default()
    };
    admit(
        &st,
        &sign_command(&cmd, sk, key_id),
        Some(route),
        &HeaderMap::new(),
    )
    .await
}

async fn get_modules(State(st): State<Arc<AppState>>) -> Result<Json<serde_json::Value>, ApiError> {
    let m = st
        .modules
        .lock()
        .map_err(|_| Reject::new(Code::Unavailable, "module state lock poisoned"))?;
    Ok(Json(serde_json::to_value(&*m).unwrap_or_default()))
}

/// A decision as the ledger endpoints return it.
#[derive(Debug, clickhouse::Row, serde::Serialize, serde::Deserialize)]
struct DecisionView {
    seq: u64,
    ts_ms: u64,
    stage: String,
    decision: String,
    code: String,
    issuer: String,
    module: String,
    action: String,
    request_id: String,
    nonce: u64,
}

/// One five-minute window of accepted POLICY commands.
#[derive(Debug, clickhouse::Row, serde::Serialize, serde::Deserialize)]
struct PolicyWindow {
    window_start: u32,
    commands: u64,
}

const DECISION_COLUMNS: &str =
    "seq, ts_ms, stage, decision, code, issuer, module, action, request_id, nonce";

fn ledger_client(st: &AppState) -> Result<(clickhouse::Client, String), Reject> {
    let l = st
        .auditor
        .ledger()
        .ok_or_else(|| {
            Reject::new(
                Code::Unavailable,
                "no audit ledger configured (clickhouse_url)",
            )
        })?
        .lock()
        .map_err(|_| Reject::new(Code::Unavailable, "audit ledger lock poisoned"))?;
    Ok((l.client().clone(), l.table().to_owned()))
}

fn ch_err(e: clickhouse::error::Error) -> ApiError {
    ApiError(Reject::with(Code::Unavailable, format!("clickhouse: {e}")))
}

/// Operator history: decisions of the last 24 hours, newest first.
async fn ledger_history(
    State(st): State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (client, table) = ledger_client(&st)?;
    let rows = client
        .query(&format!(
            "SELECT {DECISION_COLUMNS} FROM {table} FINAL \
             WHERE ts_ms > toUInt64(toUnixTimestamp64Milli(now64(3))) - 86400000 ORDER BY seq DESC LIMIT 10000"
        ))
        .fetch_all::<DecisionView>()
        .await
        .map_err(ch_err)?;
    Ok(Json(json!(rows)))
}

/// Every decision about one `request_id`, in order.
async fn ledger_by_request(
    State(st): State<Arc<AppState>>,
    Path(request_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (client, table) = ledger_client(&st)?;
    let rows = client
        .query(&format!(
            "SELECT {DECISION_COLUMNS} FROM {table} FINAL WHERE request_id = ? ORDER BY seq"
        ))
        .bind(request_id)
        .fetch_all::<DecisionView>()
        .await
        .map_err(ch_err)?;
    Ok(Json(json!(rows)))
}

/// Applied POLICY commands per five minutes.
async fn ledger_policy_frequency(
    State(st): State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (client, table) = ledger_client(&st)?;
    let rows = client
        .query(&format!(
            "SELECT toUnixTimestamp(toStartOfFiveMinute(fromUnixTimestamp64Milli(toInt64(ts_ms)))) AS window_start, \
                    count() AS commands \
             FROM {table} FINAL WHERE action = 'policy' AND stage = 'agent' AND decision = 'applied' \
             GROUP BY window_start ORDER BY window_start"
        ))
        .fetch_all::<PolicyWindow>()
        .await
        .map_err(ch_err)?;
    Ok(Json(json!(rows)))
}

/// Walks the stored hash chain (as `gwctl ledger verify` does): `{"ok": true,
/// "rows": N}`, or `{"ok": false, "broken": "..."}` naming the first bad `seq`.
async fn ledger_verify(
    State(st): State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (client, table) = ledger_client(&st)?;
    let mut cursor = client
        .query(&format!("SELECT ?fields FROM {table} FINAL ORDER BY seq"))
        .fetch::<DecisionRow>()
        .map_err(ch_err)?;
    let mut rows = Vec::new();
    while let Some(r) = cursor.next().await.map_err(ch_err)? {
        rows.push(gw_core::ledger::LedgerRow::from(r));
    }
    Ok(Json(match gw_core::ledger::verify_chain(&rows) {
        Ok(n) => json!({"ok": true, "rows": n}),
        Err(e) => json!({"ok": false, "rows": rows.len(), "broken": e.to_string()}),
    }))
}

fn model_host(st: &AppState) -> Result<&Arc<crate::models::ModelHost>, Reject> {
    st.models
        .as_ref()
        .ok_or_else(|| Reject::new(Code::Unavailable, "no models configured (models.dir)"))
}

/// What serves each module (`GET /api/models`).
async fn get_models(State(st): State<Arc<AppState>>) -> Result<Json<serde_json::Value>, ApiError> {
    let host = model_host(&st)?;
    let view: serde_json::Map<String, serde_json::Value> = host
        .view()
        .into_iter()
        .map(|(m, v)| (m.to_string(), json!(v)))
        .collect();
    Ok(Json(serde_json::Value::Object(view)))
}

/// `POST /api/models/{module}/predict` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictBody {
    /// Rows of features; `null` is a missing value.
    rows: Vec<Vec<Option<f32>>>,
}

/// Scores a batch with the module's serving model.
async fn predict_models(
    State(st): State<Arc<AppState>>,
    Path(module): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (model, out) = score(&st, &module, &body).await?;
    let outputs: Vec<&[f32]> = out.chunks(model.n_outputs as usize).collect();
    Ok(Json(json!({
        "module": module, "model": model.name, "version": model.version, "outputs": outputs
    })))
}

/// Parses a `{"rows": …}` body and scores it with the model serving `module`:
/// the model (held for the call) and its outputs, `n_outputs` per row.
async fn score(
    st: &AppState,
    module: &str,
    body: &[u8],
) -> Result<(Arc<crate::models::Model>, Vec<f32>), Reject> {
    let host = model_host(st)?;
    if host.slot(module).is_none() {
        return Err(Reject::with(
            Code::Malformed,
            format!("no model slot `{}` (mev, arbitrage)", module.escape_debug()),
        ));
    }
    let req: PredictBody = serde_json::from_slice(body)
        .map_err(|e| Reject::with(Code::Malformed, format!("predict body: {e}")))?;
    let model = host.current(module).ok_or_else(|| {
        Reject::with(
            Code::Unavailable,
            format!("no model is serving `{module}` yet"),
        )
    })?;
    let n = model.n_features as usize;
    if req.rows.len() > crate::models::MAX_ROWS {
        return Err(Reject::with(
            Code::TooLarge,
            format!(
                "{} rows; at most {}",
                req.rows.len(),
                crate::models::MAX_ROWS
            ),
        ));
    }
    let mut flat = Vec::with_capacity(req.rows.len() * n);
    for (i, row) in req.rows.iter().enumerate() {
        if row.len() != n {
            return Err(Reject::with(
                Code::BadArgs,
                format!("row {i} has {} features; the model takes {n}", row.len()),
            ));
        }
        flat.extend(row.iter().map(|v| v.unwrap_or(f32::NAN)));
    }
    let m = model.clone();
    let out = tokio::task::spawn_blocking(move || m.predict(&flat))
        .await
        .map_err(|e| Reject::with(Code::Unavailable, format!("predict task: {e}")))?
        .map_err(|e| Reject::with(Code::Unavailable, format!("predict: {e}")))?;
    Ok((model, out))
}

/// `POST /api/modules/{module}/evaluate`: scores opportunities with the module's
/// model and says, per row, whether the module may send it now (state, throttle,
/// `ev_min` from POLICY commands).
async fn evaluate(
    State(st): State<Arc<AppState>>,
    Path(module): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let m = Module::parse(&module).ok_or_else(|| {
        Reject::with(
            Code::Malformed,
            format!("unknown module `{}`", module.escape_debug()),
        )
    })?;
    let (model, out) = score(&st, m.as_str(), &body).await?;
    let state = st
        .modules
        .lock()
        .map_err(|_| Reject::new(Code::Unavailable, "module state lock poisoned"))?
        .get(m)
        .clone();
    // The EV is each row's first output.
    let decisions: Vec<serde_json::Value> = out
        .chunks(model.n_outputs as usize)
        .map(|o| {
            let ev = o[0];
            match state.gate(ev) {
                Ok(()) => json!({"ev": ev, "send": true}),
                Err(why) => json!({"ev": ev, "send": false, "reason": why}),
            }
        })
        .collect();
    Ok(Json(json!({
        "module": m.as_str(), "version": model.version, "ev_min": state.ev_min,
        "state": state.state, "decisions": decisions
    })))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"ok": true}))
}

async fn metrics(State(st): State<Arc<AppState>>) -> impl IntoResponse {
    let mut out = String::from("# TYPE gw_sidecar_decisions_total counter\n");
    if let Ok(d) = st.decisions.lock() {
        for (code, n) in d.iter() {
            out.push_str(&format!(
                "gw_sidecar_decisions_total{{code=\"{code}\"}} {n}\n"
            ));
        }
    }
    out.push_str("# TYPE gw_sidecar_agent_total counter\n");
    if let Ok(a) = st.agent_outcomes.lock() {
        for ((module, outcome), n) in a.iter() {
            out.push_str(&format!(
                "gw_sidecar_agent_total{{module=\"{module}\",outcome=\"{outcome}\"}} {n}\n"
            ));
        }
    }
    if let Some(host) = &st.models {
        out.push_str("# TYPE gw_sidecar_model_loads_total counter\n");
        out.push_str("# TYPE gw_sidecar_model_rejected_total counter\n");
        for slot in &host.slots {
            out.push_str(&format!(
                "gw_sidecar_model_loads_total{{module=\"{}\"}} {}\ngw_sidecar_model_rejected_total{{module=\"{}\"}} {}\n",
                slot.module,
                slot.loads.load(Ordering::Relaxed),
                slot.module,
                slot.rejected.load(Ordering::Relaxed)
            ));
        }
    }
    if let Some(l) = st.auditor.ledger() {
        if let Ok(l) = l.lock() {
            out.push_str(&format!(
                "# TYPE gw_sidecar_ledger_pending_rows gauge\ngw_sidecar_ledger_pending_rows {}\n",
                l.pending()
            ));
        }
    }
    if let Some(dp) = st.data.get() {
        crate::sender::http::metrics(dp, &mut out);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

/// The router.
pub fn router(st: Arc<AppState>, max_body: usize) -> Router {
    Router::new()
        .route("/api/control/commands", post(post_command))
        .route("/api/control/module/{spec}", post(post_module))
        .route("/api/modules", get(get_modules))
        .route("/api/ledger/history", get(ledger_history))
        .route("/api/ledger/request/{request_id}", get(ledger_by_request))
        .route("/api/ledger/policy-frequency", get(ledger_policy_frequency))
        .route("/api/ledger/verify", get(ledger_verify))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/models", get(get_models))
        .route(
            "/api/modules/{module}/evaluate",
            post(evaluate).layer(axum::extract::DefaultBodyLimit::max(4 << 20)),
        )
        .route(
            "/api/models/{module}/predict",
            post(predict_models).layer(axum::extract::DefaultBodyLimit::max(4 << 20)),
        )
        .route(
            "/internal/edge-decisions",
            post(edge_decisions).layer(axum::extract::DefaultBodyLimit::max(1 << 20)),
        )
        .route(
            "/api/rpc",
            post(crate::sender::http::rpc).layer(axum::extract::DefaultBodyLimit::max(1 << 20)),
        )
        .route(
            "/api/opportunities",
            post(crate::sender::http::opportunities)
                .layer(axum::extract::DefaultBodyLimit::max(8 << 20)),
        )
        .route("/api/sender", get(crate::sender::http::status))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .with_state(st)
}
