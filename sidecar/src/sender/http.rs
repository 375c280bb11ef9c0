//! HTTP for the data plane: `POST /api/rpc` (Solana JSON-RPC), `POST
//! /api/opportunities` (into the hot path) and `GET /api/sender` (status).

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

/// What the data plane's routes serve from.
pub struct SenderApi {
    plane: Option<Arc<DataPlane>>,
    modules: ModuleTable,
    /// Large bodies decoded at once, per route (one per core each): more wait
    /// their turn rather than fill the blocking pool the ledger's shipping also
    /// uses, and JSON-RPC batches never queue the hot path's opportunities.
    decoding_rpc: Arc<tokio::sync::Semaphore>,
    decoding_opportunities: Arc<tokio::sync::Semaphore>,
}

impl SenderApi {
    /// The routes over `plane` (none: every call answers `unavailable`).
    pub fn new(plane: Option<Arc<DataPlane>>, modules: ModuleTable) -> SenderApi {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        SenderApi {
            plane,
            modules,
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

/// Most opportunities per request.
pub const MAX_OPPORTUNITIES: usize = 1024;
/// Most pre-signed variants per opportunity.
pub const MAX_VARIANTS: usize = 8;
/// Most features per opportunity.
pub const MAX_FEATURES: usize = 256;

fn unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": "unavailable", "detail": "the sender is not configured (sender in the sidecar config)"})),
    )
        .into_response()
}

fn bad(detail: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": "malformed", "detail": detail})),
    )
        .into_response()
}

/// The answer to a body that could not be read whole (larger than the route's
/// bound, or cut off) in the gateway's error shape — axum's own answer is plain
/// text with no code.
fn unreadable(e: &BytesRejection) -> Response {
    let (status, code) = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        (StatusCode::PAYLOAD_TOO_LARGE, "too_large")
    } else {
        (StatusCode::BAD_REQUEST, "malformed")
    };
    let detail = format!("the body could not be read: {}", e.body_text());
    (status, Json(json!({"error": code, "detail": detail}))).into_response()
}

/// Who the edge says sent a request (the routes' roles were checked before,
/// `serve::api_roles`): named in the audit rows of its sends.
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
    let Some(dp) = &st.plane else {
        return unavailable();
    };
    let body = match body {
        Ok(b) => b,
        Err(e) => return unreadable(&e),
    };
    let request = match decode_off_runtime(&st.decoding_rpc, body, rpc::Request::parse).await {
        Ok(r) => r,
        Err(answer) => return answer,
    };
    let ctx = RpcContext {
        sender: &dp.sender,
        landing: dp.landing.as_ref(),
        modules: &st.modules,
        module: dp.rpc_module,
        allow_stopped: dp.rpc_allow_stopped,
        gate: &dp.rpc_gate,
        requester: requester(&head),
    };
    Json(request.run(&ctx).await).into_response()
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
        let (wire, signature) =
            rpc::decode_tx(t, enc).map_err(|(_, m)| format!("opportunity {i} tx {k}: {m}"))?;
        txs.push(SignedTx { wire, signature });
    }
    Ok(Opportunity {
        module,
        features: o.features.iter().map(|f| f.unwrap_or(f32::NAN)).collect(),
        ev: o.ev.filter(|e| e.is_finite()),
        txs,
        received,
        requester: requester.clone(),
    })
}

/// `decode(body)`: at once for a small body; a large one (hundreds of
/// transactions, each signature verified) on the blocking pool, one of `turns`
/// at a time ([`crate::blocking_turn`]), not on a runtime worker every other
/// route shares. `Err`: the answer when the decoding could not run.
async fn decode_off_runtime<T: Send + 'static>(
    turns: &Arc<tokio::sync::Semaphore>,
    body: Bytes,
    decode: impl FnOnce(&[u8]) -> T + Send + 'static,
) -> Result<T, Response> {
    if body.len() <= INLINE_BODY_BYTES {
        return Ok(decode(&body));
    }
    crate::blocking_turn(turns, move || decode(&body))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "decoding a request body failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": "unavailable", "detail": "decoding the request failed; send it again"})),
            )
                .into_response()
        })
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
    let Some(dp) = &st.plane else {
        return unavailable();
    };
    let body = match body {
        Ok(b) => b,
        Err(e) => return unreadable(&e),
    };
    let who = requester(&head);
    let decoded = decode_off_runtime(&st.decoding_opportunities, body, move |b| {
        decode_opportunities(b, received, &who)
    });
    let items = match decoded.await {
        Ok(Ok(items)) => items,
        Ok(Err(e)) => return bad(e),
        Err(answer) => return answer,
    };
    let n = items.len();
    let took = dp.hot.offer_async(items).await;
    let mut answer = json!({"accepted": took, "dropped": n - took});
    if took == 0 && n > 0 {
        answer["error"] = "overloaded".into();
        answer["detail"] = "the hot path's ring is full: nothing was taken; retry shortly".into();
        return (StatusCode::TOO_MANY_REQUESTS, Json(answer)).into_response();
    }
    Json(answer).into_response()
}

/// `GET /api/sender`: routes, leaders, counters.
async fn status(State(st): St) -> Response {
    let Some(dp) = &st.plane else {
        return unavailable();
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
