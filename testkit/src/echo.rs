//! An in-process HTTP/1.1 + h2c upstream that answers every request with a JSON echo
//! of what it received: method, path, version, headers, body length and SHA-256.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::Request;
use axum::response::IntoResponse;
use sha2::{Digest, Sha256};

async fn echo(req: Request) -> impl IntoResponse {
    let (parts, body) = req.into_parts();
    let body: Bytes = axum::body::to_bytes(body, 4 << 20)
        .await
        .unwrap_or_default();
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
            )
        })
        .collect();
    let hash = Sha256::digest(&body);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    axum::Json(serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map_or("", axum::http::uri::PathAndQuery::as_str),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_len": body.len(),
        "body_sha256": hex,
    }))
}

/// A running echo server; stops when dropped.
pub struct EchoServer {
    /// Its address.
    pub addr: SocketAddr,
    _rt: tokio::runtime::Runtime,
}

impl EchoServer {
    /// Starts on a free port of 127.0.0.1.
    pub fn start() -> EchoServer {
        Self::start_on("127.0.0.1:0".parse().expect("addr"))
    }

    /// Starts on `addr`.
    pub fn start_on(addr: SocketAddr) -> EchoServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("echo runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .expect("bind echo");
        let addr = listener.local_addr().expect("echo addr");
        let app = axum::Router::new().fallback(echo);
        rt.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        EchoServer { addr, _rt: rt }
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}
