//! HTTP for the data plane: `POST /api/rpc` (Solana JSON-RPC), `POST
//! /api/opportunities` (into the hot path), `GET /api/sender` (status), and the
//! sender's lines of `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use gw_core::Module;
use serde::Deserialize;
use serde_json::{json, Value};

use super::plane::DataPlane;
use super::rpc::{self, RpcContext};
use super::strategy::{Opportunity, SignedTx, Skip};
use crate::http::AppState;

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

/// `POST /api/rpc`: Solana JSON-RPC (always HTTP 200 with a JSON-RPC body, as
/// Solana's RPC answers).
pub async fn rpc(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let Some(dp) = st.data.get() else {
        return unavailable();
    };
    let ctx = RpcContext {
        sender: &dp.sender,
        modules: &st.modules,
        module: dp.rpc_module,
        throttle: &dp.rpc_throttle,
    };
    Json(rpc::handle(&ctx, &body).await).into_response()
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

fn opportunity(i: usize, o: OpportunityIn) -> Result<Opportunity, String> {
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
    })
}

/// `POST /api/opportunities`: validates every opportunity (each transaction parsed
/// and its signatures verified), then offers them all to the ring. The answer says
/// how many the ring took; the rest were dropped because it was full (429 when none
/// fit).
pub async fn opportunities(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let Some(dp) = st.data.get() else {
        return unavailable();
    };
    let req: OpportunitiesIn = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad(format!("opportunities body: {e}")),
    };
    if req.opportunities.len() > MAX_OPPORTUNITIES {
        return bad(format!(
            "at most {MAX_OPPORTUNITIES} opportunities per request"
        ));
    }
    let n = req.opportunities.len();
    let mut items = Vec::with_capacity(n);
    for (i, o) in req.opportunities.into_iter().enumerate() {
        match opportunity(i, o) {
            Ok(o) => items.push(o),
            Err(e) => return bad(e),
        }
    }
    let took = dp.hot.offer(items);
    let status = if took == 0 && n > 0 {
        StatusCode::TOO_MANY_REQUESTS
    } else {
        StatusCode::OK
    };
    (status, Json(json!({"accepted": took, "dropped": n - took}))).into_response()
}

/// `GET /api/sender`: routes, leaders, counters.
pub async fn status(State(st): State<Arc<AppState>>) -> Response {
    let Some(dp) = st.data.get() else {
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
        },
        "leaders": leaders,
        "sends": {
            "landed": s.stats.landed.load(Ordering::Relaxed),
            "failed": s.stats.failed.load(Ordering::Relaxed),
            "hedged": s.stats.hedged.load(Ordering::Relaxed),
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
    })
}

/// The sender's Prometheus lines.
pub fn metrics(dp: &DataPlane, out: &mut String) {
    let s = &dp.sender;
    let _ = writeln!(out, "# TYPE gw_sender_sends_total counter");
    let _ = writeln!(
        out,
        "gw_sender_sends_total{{outcome=\"landed\",route=\"tpu\"}} {}",
        s.stats.landed_by[0].load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "gw_sender_sends_total{{outcome=\"landed\",route=\"relay\"}} {}",
        s.stats.landed_by[1].load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "gw_sender_sends_total{{outcome=\"failed\",route=\"\"}} {}",
        s.stats.failed.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# TYPE gw_sender_hedged_total counter\ngw_sender_hedged_total {}",
        s.stats.hedged.load(Ordering::Relaxed)
    );
    if let Some(t) = s.tpu() {
        let st = &t.stats;
        let _ = writeln!(out, "# TYPE gw_sender_tpu_total counter");
        for (name, c) in [
            ("delivered", &st.delivered),
            ("failed", &st.failed),
            ("unreachable", &st.unreachable),
            ("dropped_queue_full", &st.dropped_full),
            ("too_large", &st.too_large),
            ("connects", &st.connects),
            ("connect_failures", &st.connect_failures),
        ] {
            let _ = writeln!(
                out,
                "gw_sender_tpu_total{{event=\"{name}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
    }
    if let Some(r) = s.relay() {
        let _ = writeln!(out, "# TYPE gw_sender_relay_total counter");
        let _ = writeln!(
            out,
            "gw_sender_relay_total{{event=\"accepted\"}} {}\ngw_sender_relay_total{{event=\"failed\"}} {}",
            r.stats.accepted.load(Ordering::Relaxed),
            r.stats.failed.load(Ordering::Relaxed)
        );
    }
    let hs = &dp.hot.stats;
    let _ = writeln!(out, "# TYPE gw_strategy_opportunities_total counter");
    let _ = writeln!(
        out,
        "gw_strategy_opportunities_total{{outcome=\"sent\"}} {}\ngw_strategy_opportunities_total{{outcome=\"ring_full\"}} {}",
        hs.sent.load(Ordering::Relaxed),
        hs.ring_full.load(Ordering::Relaxed)
    );
    for why in Skip::ALL {
        let _ = writeln!(
            out,
            "gw_strategy_opportunities_total{{outcome=\"{}\"}} {}",
            why.as_str(),
            hs.skipped(why)
        );
    }
    if let Some(a) = &dp.audit {
        let _ = writeln!(
            out,
            "# TYPE gw_sidecar_send_audit_total counter\ngw_sidecar_send_audit_total{{event=\"written\"}} {}\ngw_sidecar_send_audit_total{{event=\"dropped\"}} {}\ngw_sidecar_send_audit_total{{event=\"insert_errors\"}} {}",
            a.stats.written.load(Ordering::Relaxed),
            a.stats.dropped.load(Ordering::Relaxed),
            a.stats.insert_errors.load(Ordering::Relaxed)
        );
    }
}
