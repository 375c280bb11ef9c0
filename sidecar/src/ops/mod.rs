//! Operations: `GET /healthz` and `GET /metrics` (Prometheus text from one
//! `prometheus-client` registry every capability registers its metrics in).

pub mod metrics;

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use serde_json::json;

/// `/healthz` and `/metrics` over `registry` (the ops listener).
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(registry)
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
