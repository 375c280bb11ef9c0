//! The relay route: a Jito-style block engine over JSON-RPC.
//!
//! `sendTransaction` posts to `{url}/api/v1/transactions`, `sendBundle` (1–5
//! transactions, all or nothing) to `{url}/api/v1/bundles`; transactions travel as
//! base64; an optional `x-jito-auth` header carries the access token (never logged).
//! A transaction counts as delivered when the engine answers a JSON-RPC `result`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use super::upstream;

/// Most transactions in one bundle.
pub const MAX_BUNDLE: usize = 5;

/// The longest result, in bytes, taken as a transaction's signature or a bundle's
/// id (a signature is 88 characters of base58, a bundle id 64 hex digits).
const MAX_ANSWER_ID: usize = 256;

/// `relay` in the sender configuration.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Base URL of the block engine (`https://…`; `http://` for a relay on
    /// loopback, or one that takes no `auth`).
    pub url: String,
    /// `x-jito-auth` token (also `GW_RELAY_AUTH`).
    #[serde(default)]
    pub auth: Option<String>,
    /// Deadline per request, milliseconds.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

fn default_timeout() -> u64 {
    2000
}

impl std::fmt::Debug for RelayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayConfig")
            .field("url", &upstream::redact(&self.url))
            .field("auth", &self.auth.as_ref().map(|_| "<set>"))
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// Why the relay did not take it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// No answer within the deadline.
    #[error("relay timed out after {0:?}")]
    Timeout(Duration),
    /// No connection to the relay could be made: nothing was sent.
    #[error("relay unreachable: {0}")]
    Unreachable(String),
    /// The connection to the relay failed once made.
    #[error("relay connection failed: {0}")]
    Transport(String),
    /// HTTP error status.
    #[error("relay answered HTTP {0}: {1}")]
    Http(u16, String),
    /// JSON-RPC error.
    #[error("relay refused it: {1} (code {0})")]
    Rpc(i64, String),
    /// Not a JSON-RPC answer.
    #[error("relay answered something that is not JSON-RPC: {0}")]
    BadResponse(String),
    /// Bundle with 0 or more than 5 transactions.
    #[error("a bundle holds 1 to {MAX_BUNDLE} transactions, not {0}")]
    BundleSize(usize),
}

impl RelayError {
    /// Whether the relay may have taken the request all the same: no answer in
    /// time, the connection lost, a 5xx, or a success that names nothing. A
    /// refusal it answered (a 4xx, a JSON-RPC error) or one made here did not.
    pub fn maybe_sent(&self) -> bool {
        match self {
            RelayError::Timeout(_) | RelayError::Transport(_) | RelayError::BadResponse(_) => true,
            RelayError::Http(status, _) => *status >= 500,
            RelayError::Unreachable(_) | RelayError::Rpc(..) | RelayError::BundleSize(_) => false,
        }
    }
}

/// Counters.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Requests answered with a result.
    pub accepted: AtomicU64,
    /// Requests that failed (any [`RelayError`]).
    pub failed: AtomicU64,
}

/// The relay client.
pub struct RelayClient {
    http: reqwest::Client,
    tx_url: String,
    bundle_url: String,
    auth: Option<reqwest::header::HeaderValue>,
    timeout: Duration,
    /// Counters.
    pub stats: RelayStats,
}

impl RelayClient {
    /// A client for `config`.
    pub fn new(config: &RelayConfig) -> anyhow::Result<RelayClient> {
        let base = config.url.trim_end_matches('/');
        anyhow::ensure!(
            base.starts_with("http://") || base.starts_with("https://"),
            "relay.url must start with http:// or https://, got {}",
            upstream::redact(base)
        );
        // The token would cross the network readable by anyone on the path
        // (the relay's rate limits and tips are the holder's).
        anyhow::ensure!(
            config.auth.is_none() || !crate::config::in_clear(base),
            "relay.auth (GW_RELAY_AUTH) would be sent in clear over {}: use https:// (http:// is for a relay on loopback)",
            upstream::redact(base)
        );
        let timeout = Duration::from_millis(config.timeout_ms.max(1));
        let auth = match &config.auth {
            Some(a) => {
                let mut v = reqwest::header::HeaderValue::from_str(a.trim())
                    .map_err(|_| anyhow::anyhow!("relay.auth is not a valid header value"))?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let http = super::upstream::client_builder()
            .timeout(timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()?;
        Ok(RelayClient {
            http,
            tx_url: format!("{base}/api/v1/transactions"),
            bundle_url: format!("{base}/api/v1/bundles"),
            auth,
            timeout,
            stats: RelayStats::default(),
        })
    }

    /// `sendTransaction`: the engine's answer is the transaction signature.
    pub async fn send_transaction(&self, wire: &[u8]) -> Result<String, RelayError> {
        let tx = base64::engine::general_purpose::STANDARD.encode(wire);
        let body = json!({
            "jsonrpc": "2.0", "id": 1, "method": "sendTransaction",
            "params": [tx, {"encoding": "base64"}],
        });
        self.call(&self.tx_url, body).await
    }

    /// `sendBundle`: all of `txs` land in order or none; the answer is the bundle id.
    pub async fn send_bundle(&self, txs: &[Bytes]) -> Result<String, RelayError> {
        if txs.is_empty() || txs.len() > MAX_BUNDLE {
            return Err(RelayError::BundleSize(txs.len()));
        }
        let enc: Vec<String> = txs
            .iter()
            .map(|t| base64::engine::general_purpose::STANDARD.encode(t))
            .collect();
        let body = json!({
            "jsonrpc": "2.0", "id": 1, "method": "sendBundle",
            "params": [enc, {"encoding": "base64"}],
        });
        self.call(&self.bundle_url, body).await
    }

    async fn call(&self, url: &str, body: Value) -> Result<String, RelayError> {
        let r = self.call_inner(url, body).await;
        let c = if r.is_ok() {
            &self.stats.accepted
        } else {
            &self.stats.failed
        };
        c.fetch_add(1, Ordering::Relaxed);
        r
    }

    async fn call_inner(&self, url: &str, body: Value) -> Result<String, RelayError> {
        let mut req = self.http.post(url).json(&body);
        if let Some(a) = &self.auth {
            req = req.header("x-jito-auth", a.clone());
        }
        let resp = req.send().await.map_err(|e| self.failed(e.into()))?;
        let status = resp.status();
        let body = upstream::read_capped(resp, upstream::MAX_RELAY_ANSWER_BYTES)
            .await
            .map_err(|e| match e {
                // A large error page still says what the status was.
                e @ upstream::ReadError::TooLarge(_) if !status.is_success() => {
                    RelayError::Http(status.as_u16(), e.to_string())
                }
                e => self.failed(e),
            })?;
        let text = String::from_utf8_lossy(&body);
        let parsed: Option<Value> = serde_json::from_slice(&body).ok();
        if let Some(err) = parsed.as_ref().and_then(|v| v.get("error")) {
            let code = err.get("code").and_then(Value::as_i64).unwrap_or(0);
            let msg = err
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("no message");
            return Err(RelayError::Rpc(code, snippet(msg)));
        }
        if !status.is_success() {
            return Err(RelayError::Http(status.as_u16(), snippet(&text)));
        }
        // The answer names the transaction or bundle (a signature, a bundle id);
        // it goes into the audit row, so it is bounded too. Anything else (`null`,
        // `false`, `{}`) is not a delivery: taken as one, it would stop the hedge
        // and record the transaction as landed.
        let id = match parsed.as_ref().and_then(|v| v.get("result")) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(RelayError::BadResponse(snippet(&text))),
        };
        if id.len() > MAX_ANSWER_ID {
            return Err(RelayError::BadResponse(format!(
                "a result of {} bytes, not an id: {}",
                id.len(),
                snippet(&id)
            )));
        }
        Ok(id)
    }

    /// The relay's failure to answer (`upstream` renders transport errors without
    /// the URL: a relay's key may be part of it).
    fn failed(&self, e: upstream::ReadError) -> RelayError {
        match e {
            upstream::ReadError::Timeout => RelayError::Timeout(self.timeout),
            upstream::ReadError::Connect(e) => RelayError::Unreachable(snippet(&e)),
            upstream::ReadError::Transport(e) => RelayError::Transport(snippet(&e)),
            e @ upstream::ReadError::TooLarge(_) => RelayError::BadResponse(e.to_string()),
        }
    }
}

fn snippet(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relay token never crosses a network in clear: `http://` with `auth` is
    /// refused beyond loopback, without showing the token.
    #[test]
    fn a_relay_token_is_not_sent_in_clear() {
        let cfg = |url: &str, auth: Option<&str>| RelayConfig {
            url: url.into(),
            auth: auth.map(Into::into),
            timeout_ms: 1000,
        };
        let err = RelayClient::new(&cfg("http://10.0.0.7:8010/x?key=k", Some("s3cret")))
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("in clear") && !err.contains("s3cret") && !err.contains("key=k"),
            "{err}"
        );
        for ok in [
            cfg("http://127.0.0.1:8010", Some("s3cret")),
            cfg("http://localhost:8010", Some("s3cret")),
            cfg("https://relay.example:443", Some("s3cret")),
            cfg("http://10.0.0.7:8010", None),
        ] {
            assert!(RelayClient::new(&ok).is_ok(), "{ok:?}");
        }
    }
}
