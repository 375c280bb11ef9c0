//! Serving a sidecar state over real HTTP (h1 + h2c) for tests.

#![allow(dead_code)]

use std::sync::Arc;

use gw_sidecar::http::{router, AppState};

/// A sidecar listening on a free port; stops with its runtime.
pub struct Served {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The runtime serving it (use it to drive the client too).
    pub rt: tokio::runtime::Runtime,
    /// An HTTP/2 (prior knowledge) client, as Envoy speaks to the sidecar.
    pub http: reqwest::Client,
}

/// Serves `state` with a 4 KiB body limit.
pub fn serve(state: Arc<AppState>) -> Served {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(state, 4096);
    rt.spawn(async move { axum::serve(listener, app).await });
    Served {
        base: format!("http://{addr}"),
        rt,
        http: reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap(),
    }
}

/// Unix seconds now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
