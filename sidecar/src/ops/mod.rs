//! Operations: `GET /healthz`, `GET /readyz` ([`ready`]) and `GET /metrics`
//! (Prometheus text from one `prometheus-client` registry every capability
//! registers its metrics in).

pub mod metrics;
pub mod ready;

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use serde_json::json;

/// `/healthz`, `/readyz` over `readiness` and `/metrics` over `registry` (the
/// ops listener).
pub fn router(registry: Arc<Registry>, readiness: Arc<ready::Readiness>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(registry)
        .merge(
            Router::new()
                .route("/readyz", get(ready::readyz))
                .with_state(readiness),
        )
}

/// `/healthz` alone (the main listener, for anyone).
pub fn health() -> Router {
    Router::new().route("/healthz", get(healthz))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"ok": true}))
}

async fn metrics(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::error!(error = %e, "metrics encoding failed");
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
}
