//! A local block-engine relay speaking Jito's JSON-RPC (`sendTransaction` on
//! `/api/v1/transactions`, `sendBundle` on `/api/v1/bundles`, base64, optional
//! `x-jito-auth`), recording what it received. Its behaviour can be switched at run
//! time: answer, refuse with a JSON-RPC error, answer late, or fail with an HTTP status.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Json;
use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::http_thread::HttpThread;

/// How the relay answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Takes everything.
    Accept,
    /// Answers after this long.
    Delay(Duration),
    /// JSON-RPC error.
    Refuse(i64, String),
    /// Bare HTTP error status.
    Status(u16),
    /// `307 Temporary Redirect` to this URL (a client that follows it posts the
    /// same request there, headers and all).
    Redirect(String),
    /// `{"jsonrpc": "2.0", "result": <this>, "id": …}`, whatever it is.
    Answer(Value),
}

/// One call as received.
#[derive(Debug, Clone)]
pub struct Call {
    /// `sendTransaction` or `sendBundle`.
    pub method: String,
    /// Decoded transactions.
    pub txs: Vec<Vec<u8>>,
    /// The `x-jito-auth` header.
    pub auth: Option<String>,
    /// When it arrived.
    pub at: Instant,
}

#[derive(Clone)]
struct Shared {
    calls: Arc<Mutex<Vec<Call>>>,
    mode: Arc<Mutex<Mode>>,
    require_auth: Option<String>,
}

/// A running relay; stops when dropped.
pub struct Relay {
    /// Base URL (`http://127.0.0.1:PORT`).
    pub url: String,
    /// Its address.
    pub addr: SocketAddr,
    shared: Shared,
    _server: HttpThread,
}

impl Relay {
    /// Starts on a free port; requests must carry `x-jito-auth: require_auth` when
    /// given. Runs on its own thread, so it can be started and dropped anywhere.
    pub fn start(require_auth: Option<&str>) -> Relay {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), require_auth)
    }

    /// Starts on `addr`.
    pub fn start_on(addr: SocketAddr, require_auth: Option<&str>) -> Relay {
        let shared = Shared {
            calls: Arc::new(Mutex::new(Vec::new())),
            mode: Arc::new(Mutex::new(Mode::Accept)),
            require_auth: require_auth.map(str::to_owned),
        };
        let app = axum::Router::new()
            .route("/api/v1/transactions", post(handle))
            .route("/api/v1/bundles", post(handle))
            .with_state(shared.clone());
        let server = HttpThread::start(addr, app);
        Relay {
            url: server.url(),
            addr: server.addr,
            shared,
            _server: server,
        }
    }

    /// Switches the behaviour.
    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().expect("mode") = mode;
    }

    /// Everything received so far.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.calls.lock().expect("calls").clone()
    }
}

/// What the relay answers for `txs`: a bundle's id (the SHA-256 of its
/// signatures), or the transaction's signature.
fn answer_id(method: &str, txs: &[Vec<u8>]) -> String {
    if method == "sendBundle" {
        let mut h = Sha256::new();
        for t in txs {
            h.update(&t[1..65]);
        }
        h.finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    } else {
        bs58_encode(&txs[0][1..65])
    }
}

fn rpc_error(id: Value, code: i64, msg: &str) -> Response {
    Json(json!({"jsonrpc": "2.0", "error": {"code": code, "message": msg}, "id": id}))
        .into_response()
}

async fn handle(State(sh): State<Shared>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let auth = headers
        .get("x-jito-auth")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(want) = &sh.require_auth {
        if auth.as_deref() != Some(want.as_str()) {
            return (StatusCode::UNAUTHORIZED, "missing or wrong x-jito-auth").into_response();
        }
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return rpc_error(Value::Null, -32700, "parse error");
    };
    let id = req.get("id").cloned().unwrap_or(Value::Null);
    let method = req
        .get("method")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let params = req
        .get("params")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if params
        .get(1)
        .and_then(|o| o.get("encoding"))
        .and_then(Value::as_str)
        != Some("base64")
    {
        return rpc_error(id, -32602, "this relay expects base64");
    }
    let encoded: Vec<String> = match (method.as_str(), params.first()) {
        ("sendTransaction", Some(Value::String(s))) => vec![s.clone()],
        ("sendBundle", Some(Value::Array(a))) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => return rpc_error(id, -32601, "unknown method or params"),
    };
    if method == "sendBundle" && (encoded.is_empty() || encoded.len() > 5) {
        return rpc_error(id, -32602, "bundle must hold 1 to 5 transactions");
    }
    let mut txs = Vec::new();
    for e in &encoded {
        match base64::engine::general_purpose::STANDARD.decode(e) {
            Ok(t) if t.len() >= 65 => txs.push(t),
            _ => return rpc_error(id, -32602, "not a base64 transaction"),
        }
    }
    let mode = sh.mode.lock().expect("mode").clone();
    match mode {
        // Taken when it arrives (kept even when its client gives up waiting
        // and the answer is never written).
        Mode::Delay(d) => {
            sh.calls.lock().expect("calls").push(Call {
                method: method.clone(),
                txs: txs.clone(),
                auth: auth.clone(),
                at: Instant::now(),
            });
            tokio::time::sleep(d).await;
            return axum::Json(
                json!({"jsonrpc": "2.0", "result": answer_id(&method, &txs), "id": id}),
            )
            .into_response();
        }
        Mode::Refuse(code, msg) => return rpc_error(id, code, &msg),
        Mode::Status(s) => {
            return StatusCode::from_u16(s)
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
                .into_response()
        }
        Mode::Redirect(to) => {
            return (
                StatusCode::TEMPORARY_REDIRECT,
                [(axum::http::header::LOCATION, to)],
            )
                .into_response()
        }
        Mode::Answer(v) => {
            return axum::Json(json!({"jsonrpc": "2.0", "result": v, "id": id})).into_response()
        }
        Mode::Accept => {}
    }
    let result = answer_id(&method, &txs);
    sh.calls.lock().expect("calls").push(Call {
        method,
        txs,
        auth,
        at: Instant::now(),
    });
    Json(json!({"jsonrpc": "2.0", "result": result, "id": id})).into_response()
}

/// Base58 (Bitcoin alphabet), enough for signatures.
pub fn bs58_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    let mut digits: Vec<u8> = Vec::new();
    for &b in bytes {
        let mut carry = u32::from(b);
        for d in digits.iter_mut() {
            carry += u32::from(*d) << 8;
            *d = (carry % 58) as u8;
            carry /= 58;
        }
        while carry > 0 {
            digits.push((carry % 58) as u8);
            carry /= 58;
        }
    }
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    std::iter::repeat_n(b'1', zeros)
        .chain(digits.iter().rev().map(|d| ALPHABET[*d as usize]))
        .map(char::from)
        .collect()
}
