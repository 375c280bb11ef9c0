//! HTTP for the data plane: `POST /api/rpc` (Solana JSON-RPC), `POST
//! /api/opportunities` (into the hot path) and `GET /api/sender` (status).
//!
//! Every refusal of the two `POST` routes is a ledger row naming who the edge
//! said sent it ([`crate::serve::record_refusals`], within the budget of token
//! holders), written before the answer: a JSON-RPC error the gateway gives (one
//! row per refused request of a batch, keeping the transaction refused, or the
//! request as it came), and an opportunities body refused or not taken whole.
//! A batch's refusals decided before its client leaves are rows too
//! ([`rpc::RpcContext::orphaned`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gw_core::contract::Requester;
use gw_core::Module;
use serde::Deserialize;
use serde_json::{json, Value};

use super::plane::DataPlane;
use super::rpc::{self, RpcContext};
use super::strategy::{Opportunity, SignedTx, Skip};
use crate::control::ModuleTable;
use crate::serve::{Gatekeeper, Refusal, Via};
use gw_core::Code;

/// What the data plane's routes serve from.
pub struct SenderApi {
    plane: Option<Arc<DataPlane>>,
    modules: ModuleTable,
    /// What refusals are recorded with.
    gate: Gatekeeper,
    /// Large bodies decoded at once, per route (one per core each): more wait
    /// their turn rather than fill the blocking pool the ledger's shipping also
    /// uses, and JSON-RPC batches never queue the hot path's opportunities.
    decoding_rpc: Arc<tokio::sync::Semaphore>,
    decoding_opportunities: Arc<tokio::sync::Semaphore>,
}

impl SenderApi {
    /// The routes over `plane` (none: every call answers `unavailable`), their
    /// refusals recorded with `gate`.
    pub fn new(plane: Option<Arc<DataPlane>>, modules: ModuleTable, gate: Gatekeeper) -> SenderApi {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        SenderApi {
            plane,
            modules,
            gate,
            decoding_rpc: Arc::new(tokio::sync::Semaphore::new(cores)),
            decoding_opportunities: Arc::new(tokio::sync::Semaphore::new(cores)),
        }
    }

    /// `/api/rpc`, `/api/opportunities`, `/api/sender`.
    pub fn router(self) -> Router {
        Router::new()
            .route("/api/rpc", post(rpc).layer(DefaultBodyLimit::max(1 << 20)))
            .route(
                "/api/opportunities",
                post(opportunities).layer(DefaultBodyLimit::max(8 << 20)),
            )
            .route("/api/sender", get(status))
            .with_state(Arc::new(self))
    }
}

type St = State<Arc<SenderApi>>;

impl SenderApi {
    /// `answer`, once `refusals` of `who` on `route` are recorded — or after
    /// [`ROWS_WAIT`]: the data plane's answers do not wait on a journal that
    /// stalls (the rows are written, or owed, when it goes on).
    async fn refused(
        &self,
        who: &Arc<Requester>,
        route: &'static str,
        refusals: Vec<Refusal>,
        answer: Response,
    ) -> Response {
        if refusals.is_empty() {
            return answer;
        }
        let who = (**who != Requester::default()).then(|| (**who).clone());
        let g = self.gate.clone();
        let rows = tokio::spawn(async move {
            crate::serve::record_refusals(&g, Via::Edge, who, route, refusals).await;
        });
        if tokio::time::timeout(ROWS_WAIT, rows).await.is_err() {
            tracing::warn!(
                route,
                "refusal rows not durable within {ROWS_WAIT:?}: answered before them"
            );
        }
        answer
    }
}

/// How long an answer waits for its refusals' rows at most.
const ROWS_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The routes, as their rows name them.
const RPC: &str = "/api/rpc";
const OPPORTUNITIES: &str = "/api/opportunities";

/// Bytes of an answer's detail a row keeps.
pub(crate) const DETAIL_BYTES: usize = 512;

/// A refusal with nothing of the request kept: its code and detail.
fn plain_refusal(code: Code, detail: &str) -> Refusal {
    Refusal {
        code,
        raw: Bytes::new(),
        note: json!({ "detail": gw_core::contract::truncate_utf8(detail, DETAIL_BYTES) }),
    }
}

/// The row of a refused JSON-RPC request.
fn rpc_refusal(r: rpc::Refused) -> Refusal {
    let mut note = json!({
        "method": r.method,
        "rpc_code": r.rpc_code,
        "detail": gw_core::contract::truncate_utf8(&r.message, DETAIL_BYTES),
    });
    match r.signature {
        Some(sig) => {
            note["raw"] = "transaction".into();
            note["signature"] = sig.into();
        }
        None if !r.raw.is_empty() => note["raw"] = "request".into(),
        None => {}
    }
    Refusal {
        code: r.code,
        raw: r.raw,
        note,
    }
}

/// Most opportunities per request.
pub const MAX_OPPORTUNITIES: usize = 1024;
/// Most pre-signed variants per opportunity.
pub const MAX_VARIANTS: usize = 8;
/// Most features per opportunity (on every ingest path; a model's configured
/// feature count is held to it, `models.n_features`).
pub const MAX_FEATURES: usize = 256;

/// An error answer in the gateway's shape, and its refusal.
fn refusal(code: Code, detail: &str) -> (Vec<Refusal>, Response) {
    let answer = crate::error::ApiError::with(code, detail.to_owned()).into_response();
    (vec![plain_refusal(code, detail)], answer)
}

fn unavailable() -> (Vec<Refusal>, Response) {
    refusal(
        Code::Unavailable,
        "the sender is not configured (sender in the sidecar config)",
    )
}

/// The answer to a body that could not be read whole (larger than the route's
/// bound, or cut off) in the gateway's error shape — axum's own answer is plain
/// text with no code.
fn unreadable(e: &BytesRejection) -> (Vec<Refusal>, Response) {
    let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        Code::TooLarge
    } else {
        Code::Malformed
    };
    refusal(
        code,
        &format!("the body could not be read: {}", e.body_text()),
    )
}

/// Who the edge says sent a request (the routes' roles were checked before,
/// `serve::api_roles`): named in the audit rows of its sends and refusals (no
/// token: the default, naming no one).
fn requester(head: &HeaderMap) -> Arc<Requester> {
    Arc::new(
        crate::serve::edge_identity(head)
            .map(|w| w.requester)
            .unwrap_or_default(),
    )
}

/// `POST /api/rpc`: Solana JSON-RPC (always HTTP 200 with a JSON-RPC body, as
/// Solana's RPC answers).
async fn rpc(State(st): St, head: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let who = requester(&head);
    let Some(dp) = &st.plane else {
        let (r, answer) = unavailable();
        return st.refused(&who, RPC, r, answer).await;
    };
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            let (r, answer) = unreadable(&e);
            return st.refused(&who, RPC, r, answer).await;
        }
    };
    // A large body is read off the runtime (each transaction's signatures
    // verified), on a task of its own: a client that leaves meanwhile drops this
    // handler, not the reading, whose refusals are rows all the same (they were
    // dropped with it).
    // Its turn is taken here, before that task: requests whose clients left do
    // not pile up waiting for one.
    let turn = match turn_for(&st.decoding_rpc, &body).await {
        Ok(t) => t,
        Err(answer) => {
            let r = plain_refusal(Code::Unavailable, "decoding the request failed");
            return st.refused(&who, RPC, vec![r], answer).await;
        }
    };
    let read = if turn.is_none() {
        Ok(rpc::Request::parse(&body))
    } else {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (st2, who2) = (st.clone(), who.clone());
        tokio::spawn(async move {
            let read = decode_off_runtime(turn, body, rpc::Request::parse).await;
            if let Err(Ok(request)) = tx.send(read) {
                let rows: Vec<Refusal> = request
                    .read_refusals()
                    .into_iter()
                    .map(rpc_refusal)
                    .collect();
                if !rows.is_empty() {
                    tracing::info!(refusals = rows.len(), "a JSON-RPC request's client left while it was read: its refusals are recorded");
                    let _ = st2.refused(&who2, RPC, rows, Response::default()).await;
                }
            }
        });
        match rx.await {
            Ok(read) => read,
            Err(_) => Err(decode_failed()),
        }
    };
    let request = match read {
        Ok(r) => r,
        Err(answer) => {
            let r = plain_refusal(Code::Unavailable, "decoding the request failed");
            return st.refused(&who, RPC, vec![r], answer).await;
        }
    };
    let ctx = RpcContext {
        sender: &dp.sender,
        landing: dp.landing.as_ref(),
        modules: &st.modules,
        module: dp.rpc_module,
        allow_stopped: dp.rpc_allow_stopped,
        gate: &dp.rpc_gate,
        requester: who.clone(),
        orphaned: Some(Arc::new({
            let (st, who) = (st.clone(), who.clone());
            move |left: Vec<rpc::Refused>| {
                let (st, who) = (st.clone(), who.clone());
                // (No runtime: the process is ending; nothing to record them with.)
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        let rows = left.into_iter().map(rpc_refusal).collect();
                        st.refused(&who, RPC, rows, Response::default()).await
                    });
                }
            }
        })),
    };
    let done = request.run(&ctx).await;
    let refusals = done.refusals.into_iter().map(rpc_refusal).collect();
    st.refused(&who, RPC, refusals, Json(done.answer).into_response())
        .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpportunityIn {
    module: String,
    #[serde(default)]
    features: Vec<Option<f32>>,
    #[serde(default)]
    ev: Option<f32>,
    txs: Vec<String>,
    #[serde(default)]
    encoding: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpportunitiesIn {
    opportunities: Vec<OpportunityIn>,
}

fn opportunity(
    i: usize,
    o: OpportunityIn,
    received: std::time::Instant,
    requester: &Arc<Requester>,
) -> Result<Opportunity, String> {
    let module = Module::parse(&o.module)
        .ok_or_else(|| format!("opportunity {i}: unknown module {:?}", o.module))?;
    if o.features.len() > MAX_FEATURES {
        return Err(format!(
            "opportunity {i}: more than {MAX_FEATURES} features"
        ));
    }
    if o.txs.is_empty() || o.txs.len() > MAX_VARIANTS {
        return Err(format!(
            "opportunity {i}: 1 to {MAX_VARIANTS} transactions (one per tip rung)"
        ));
    }
    let enc = o.encoding.as_deref().unwrap_or("base64");
    if enc != "base64" && enc != "base58" {
        return Err(format!(
            "opportunity {i}: encoding must be base64 or base58"
        ));
    }
    let mut txs = Vec::with_capacity(o.txs.len());
    for (k, t) in o.txs.iter().enumerate() {
        let (wire, signature) = rpc::decode_tx(t, enc)
            .map_err(|e| format!("opportunity {i} tx {k}: {}", e.message()))?;
        txs.push(SignedTx { wire, signature });
    }
    Ok(Opportunity {
        module,
        features: o
            .features
            .iter()
            .map(|f| crate::models::feature(*f))
            .collect(),
        ev: o.ev.filter(|e| e.is_finite()),
        txs,
        received,
        requester: requester.clone(),
    })
}

/// The turn a body's decoding takes ([`decode_off_runtime`]): none for a small
/// one (decoded at once), else one of `turns` (waited for). `Err`: the answer
/// when none can be had.
async fn turn_for(
    turns: &Arc<tokio::sync::Semaphore>,
    body: &Bytes,
) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, Response> {
    if body.len() <= INLINE_BODY_BYTES {
        return Ok(None);
    }
    match turns.clone().acquire_owned().await {
        Ok(t) => Ok(Some(t)),
        Err(e) => {
            tracing::error!(error = %e, "decoding a request body failed");
            Err(decode_failed())
        }
    }
}

/// `decode(body)`: at once without a `turn` (a small body); a large one
/// (hundreds of transactions, each signature verified) on the blocking pool,
/// holding its turn ([`crate::blocking_in`]), not on a runtime worker every
/// other route shares. `Err`: the answer when the decoding could not run.
async fn decode_off_runtime<T: Send + 'static>(
    turn: Option<tokio::sync::OwnedSemaphorePermit>,
    body: Bytes,
    decode: impl FnOnce(&[u8]) -> T + Send + 'static,
) -> Result<T, Response> {
    let Some(turn) = turn else {
        return Ok(decode(&body));
    };
    crate::blocking_in(turn, move || decode(&body))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "decoding a request body failed");
            decode_failed()
        })
}

/// The answer when a body's decoding could not run.
fn decode_failed() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(
            json!({"error": "unavailable", "detail": "decoding the request failed; send it again"}),
        ),
    )
        .into_response()
}

/// The largest body decoded on the runtime's worker.
const INLINE_BODY_BYTES: usize = 16 << 10;

/// Every opportunity of a `/api/opportunities` body, validated.
fn decode_opportunities(
    body: &[u8],
    received: std::time::Instant,
    requester: &Arc<Requester>,
) -> Result<Vec<Opportunity>, String> {
    let req: OpportunitiesIn =
        serde_json::from_slice(body).map_err(|e| format!("opportunities body: {e}"))?;
    if req.opportunities.len() > MAX_OPPORTUNITIES {
        return Err(format!(
            "at most {MAX_OPPORTUNITIES} opportunities per request"
        ));
    }
    req.opportunities
        .into_iter()
        .enumerate()
        .map(|(i, o)| opportunity(i, o, received, requester))
        .collect()
}

/// `POST /api/opportunities`: validates every opportunity (each transaction parsed
/// and its signatures verified), then offers them all to the ring. The answer says
/// how many the ring took; the rest were dropped because it was full (429
/// `overloaded` when none fit).
async fn opportunities(
    State(st): St,
    head: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // The body has arrived: decoding and checks count in the decision latency.
    let received = std::time::Instant::now();
    let who = requester(&head);
    if st.plane.is_none() {
        let (r, answer) = unavailable();
        return st.refused(&who, OPPORTUNITIES, r, answer).await;
    }
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            let (r, answer) = unreadable(&e);
            return st.refused(&who, OPPORTUNITIES, r, answer).await;
        }
    };
    // A large body's decoding turn is taken here (waiting clients that left do
    // not pile up); then, on a task of its own, a client that leaves while its
    // body is decoded or offered drops this handler, not the decision, whose
    // refusal is a row all the same (a malformed body's, what a full ring
    // dropped).
    let turn = match turn_for(&st.decoding_opportunities, &body).await {
        Ok(t) => t,
        Err(answer) => {
            let r = plain_refusal(Code::Unavailable, "decoding the request failed");
            return st.refused(&who, OPPORTUNITIES, vec![r], answer).await;
        }
    };
    match tokio::spawn(offer(st, who, body, turn, received)).await {
        Ok(answer) => answer,
        Err(e) => {
            tracing::error!(error = %e, "offering opportunities failed");
            decode_failed()
        }
    }
}

/// The rest of [`opportunities`], once the body has arrived.
async fn offer(
    st: Arc<SenderApi>,
    who: Arc<Requester>,
    body: Bytes,
    turn: Option<tokio::sync::OwnedSemaphorePermit>,
    received: std::time::Instant,
) -> Response {
    let Some(dp) = &st.plane else {
        let (r, answer) = unavailable();
        return st.refused(&who, OPPORTUNITIES, r, answer).await;
    };
    let sender = who.clone();
    let decoded = decode_off_runtime(turn, body, move |b| {
        // A refused body's start, for its row (copied only then).
        decode_opportunities(b, received, &sender).map_err(|e| (e, crate::serve::kept_of(b)))
    });
    let items = match decoded.await {
        Ok(Ok(items)) => items,
        Ok(Err((e, kept))) => {
            let (mut r, answer) = refusal(Code::Malformed, &e);
            r[0].raw = kept;
            return st.refused(&who, OPPORTUNITIES, r, answer).await;
        }
        Err(answer) => {
            let r = plain_refusal(Code::Unavailable, "decoding the request failed");
            return st.refused(&who, OPPORTUNITIES, vec![r], answer).await;
        }
    };
    let n = items.len();
    let took = dp.hot.offer_async(items).await;
    let mut answer = json!({"accepted": took, "dropped": n - took});
    if took == n {
        return Json(answer).into_response();
    }
    // Not taken whole: a refusal of what was dropped (its row says how much).
    let mut r = plain_refusal(Code::Overloaded, "the hot path's ring is full");
    r.note["accepted"] = took.into();
    r.note["dropped"] = (n - took).into();
    let answer = if took == 0 {
        answer["error"] = "overloaded".into();
        answer["detail"] = "the hot path's ring is full: nothing was taken; retry shortly".into();
        (StatusCode::TOO_MANY_REQUESTS, Json(answer)).into_response()
    } else {
        Json(answer).into_response()
    };
    st.refused(&who, OPPORTUNITIES, vec![r], answer).await
}

/// `GET /api/sender`: routes, leaders, counters.
async fn status(State(st): St) -> Response {
    // (A status read of a sidecar without a sender refuses nothing: no row.)
    let Some(dp) = &st.plane else {
        return unavailable().1;
    };
    Json(status_json(dp)).into_response()
}

fn status_json(dp: &DataPlane) -> Value {
    let s = &dp.sender;
    let [tpu, relay] = s.route_counts();
    let leaders: Vec<Value> = dp
        .leaders
        .as_ref()
        .map(|l| {
            l.upcoming(4)
                .iter()
                .map(|l| {
                    json!({
                        "tpu_quic": l.tpu_quic.to_string(),
                        "identity": l.identity.map(|k| bs58::encode(k).into_string()),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let hs = &dp.hot.stats;
    json!({
        "routes": {
            "tpu": {"enabled": s.tpu().is_some(), "attempts": tpu.0, "failures": tpu.1},
            "relay": {"enabled": s.relay().is_some(), "attempts": relay.0, "failures": relay.1},
            "preferred": s.preferred().as_str(),
            "policy": match s.policy() {
                crate::sender::RoutePolicy::Latency => "latency",
                crate::sender::RoutePolicy::TpuFirst => "tpu_first",
            },
            "tpu_delivery_estimate": s.tpu_delivery(),
        },
        "leaders": leaders,
        "sends": {
            "landed": s.stats.landed.load(Ordering::Relaxed),
            "failed": s.stats.failed.load(Ordering::Relaxed),
            "hedged": s.stats.hedged.load(Ordering::Relaxed),
            "leaders_refused": s.stats.leaders_refused.load(Ordering::Relaxed),
        },
        "strategy": {
            "offered": hs.offered.load(Ordering::Relaxed),
            "ring_full": hs.ring_full.load(Ordering::Relaxed),
            "sent": hs.sent.load(Ordering::Relaxed),
            "scored": hs.scored.load(Ordering::Relaxed),
            "skipped": Skip::ALL
                .iter()
                .map(|w| (w.as_str().to_owned(), json!(hs.skipped(*w))))
                .collect::<serde_json::Map<_, _>>(),
        },
        "rpc_module": dp.rpc_module.as_str(),
        "rpc_node": dp.landing.as_ref().map(|l| json!({
            "pending": l.pending(),
            "preflight_failed": l.stats.preflight_failed.load(Ordering::Relaxed),
            "rebroadcasts": l.stats.rebroadcasts.load(Ordering::Relaxed),
            "seen": l.stats.seen.load(Ordering::Relaxed),
            "expired": l.stats.expired.load(Ordering::Relaxed),
            "retries_spent": l.stats.retries_spent.load(Ordering::Relaxed),
            "not_tracked": l.stats.not_tracked.load(Ordering::Relaxed),
            "refused": l.stats.refused.load(Ordering::Relaxed),
            "status_busy": l.stats.status_busy.load(Ordering::Relaxed),
        })),
    })
}
