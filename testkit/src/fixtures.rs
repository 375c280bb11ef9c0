//! Shared test fixtures: one command key, one JWT secret, a filter configuration
//! around them, tokens and signed commands.

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use gw_core::jwk::b64url_encode;
use gw_core::{sign_command, Action, Command, Module};
use serde_json::{json, Value};

/// The HS256 secret the fixture configuration trusts (kid `dev`).
pub const JWT_SECRET: &[u8; 32] = b"edge-gw-test-secret-0123456789ab";

/// The key the edge seals its stamp with (`edge_key_hex`, `GW_EDGE_KEY_HEX`).
pub const EDGE_KEY_HEX: &str = "65646765207365616c206b6579206f6620746865207465737473202030313233";

/// The seal the edge filter adds ([`gw_core::contract::headers::STAMP`]) over the
/// `x-gw-*` headers among `headers` of a `method` request to `path` (the
/// sidecar's, without the query), under the key `key_hex`, sealed at `ts` with a
/// new random nonce.
pub fn edge_seal_at(
    headers: &[(&str, &str)],
    ts: u64,
    method: &str,
    path: &str,
    key_hex: &str,
) -> (&'static str, String) {
    let key = gw_core::edge_stamp::EdgeKey::from_hex(key_hex).expect("an edge key");
    let target = gw_core::edge_stamp::Target { method, path };
    let seal = key.seal(ts, &fresh_nonce(), target, |name| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    });
    (gw_core::contract::headers::STAMP, seal)
}

/// The seal the edge filter adds over the `x-gw-*` headers among `headers` of a
/// `method` request to `path`, under [`EDGE_KEY_HEX`], now; `None` when none of
/// them is the edge's.
pub fn edge_seal(
    headers: &[(&str, &str)],
    method: &str,
    path: &str,
) -> Option<(&'static str, String)> {
    let stamped = headers
        .iter()
        .any(|(k, _)| gw_core::contract::headers::is_reserved(k));
    stamped.then(|| edge_seal_at(headers, unix_now(), method, path, EDGE_KEY_HEX))
}

/// A random seal nonce (the filter's are its VM's origin and a counter; any
/// unique value serves).
pub fn fresh_nonce() -> gw_core::edge_stamp::Nonce {
    use rand_core::RngCore as _;
    let mut n = [0u8; gw_core::edge_stamp::NONCE_BYTES];
    rand_core::OsRng.fill_bytes(&mut n);
    n
}

/// A batch of edge reports' seal under [`EDGE_KEY_HEX`], now.
pub fn report_seal(body: &[u8]) -> (&'static str, String) {
    let key = gw_core::edge_stamp::EdgeKey::from_hex(EDGE_KEY_HEX).expect("the fixture key");
    (
        gw_core::contract::headers::STAMP,
        key.seal_report(unix_now(), &fresh_nonce(), body),
    )
}

/// This clock, in unix seconds.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The command key `op-admin-1`.
pub fn command_key() -> SigningKey {
    SigningKey::from_bytes(&[3; 32])
}

/// A gw_edge filter configuration: `op-admin-1` for issuers `dashboard` and `ops`,
/// the HS256 key, routes `/api/ledger/` and `/api/realtime` (viewer), `/api/`
/// (operator), `/` (public).
pub fn filter_config(max_body_bytes: usize) -> Value {
    json!({
        "edge_key_hex": EDGE_KEY_HEX,
        "command_keys": {"keys": [{"id": "op-admin-1",
                                    "public_key_hex": hex::encode(command_key().verifying_key().as_bytes()),
                                    "issuers": ["dashboard", "ops"]}]},
        "jwt": {
            "jwks": {"keys": [{"kty": "oct", "kid": "dev", "k": b64url_encode(JWT_SECRET)}]},
            "policy": {"issuers": ["defi-dashboard"], "audiences": ["defi-users"]}
        },
        "routes": [
            {"prefix": "/api/ledger/", "role": "viewer"},
            {"prefix": "/api/realtime", "role": "viewer"},
            {"prefix": "/api/", "role": "operator"},
            {"prefix": "/", "public": true}
        ],
        "max_body_bytes": max_body_bytes,
        "replay_max_per_issuer": 1024
    })
}

/// `Bearer <jwt>` for `alice` with `roles`, valid for 10 minutes from `now`.
pub fn bearer(roles: &[&str], now: u64) -> String {
    let claims = json!({"sub": "alice", "iss": "defi-dashboard", "aud": "defi-users",
                        "exp": now + 600, "roles": roles});
    let token =
        gw_core::jwt::mint_hs256(JWT_SECRET, Some("dev"), claims.as_object().expect("object"))
            .expect("fixture secret is long enough");
    format!("Bearer {token}")
}

/// A `mev` command signed by `op-admin-1` with request id `req-<nonce>`. THROTTLE
/// gets `throttle_pct=40` unless `args` say otherwise.
pub fn signed_command(
    nonce: u64,
    action: Action,
    ts: u64,
    issuer: &str,
    args: &[(&str, &str)],
) -> Vec<u8> {
    signed_command_for(Module::Mev, nonce, action, ts, issuer, args)
}

/// [`signed_command`] for `module`.
pub fn signed_command_for(
    module: Module,
    nonce: u64,
    action: Action,
    ts: u64,
    issuer: &str,
    args: &[(&str, &str)],
) -> Vec<u8> {
    let mut map = BTreeMap::new();
    if action == Action::Throttle {
        map.insert("throttle_pct".to_string(), "40".to_string());
    }
    map.extend(args.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let c = Command {
        ts,
        module: module.to_proto() as i32,
        action: action.to_proto() as i32,
        args: map,
        request_id: format!("req-{nonce}"),
        issuer: issuer.into(),
        schema_version: "ctrl-v1".into(),
        nonce,
        ..Default::default()
    };
    sign_command(&c, &command_key(), "op-admin-1")
}

/// An unsealed ledger decision row for request `req-<i>` (seal it with a `Chain`).
pub fn ledger_row(i: u64) -> gw_core::ledger::LedgerRow {
    gw_core::ledger::LedgerRow {
        chain_id: "node-1".into(),
        seq: 0,
        // Recent (tables with a TTL by age keep them).
        ts_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            + i,
        stage: "sidecar".into(),
        decision: if i.is_multiple_of(3) {
            "rejected"
        } else {
            "accepted"
        }
        .into(),
        code: if i.is_multiple_of(3) { "replay" } else { "" }.into(),
        request_id: format!("req-{i}"),
        issuer: "dashboard".into(),
        module: "mev".into(),
        action: "throttle".into(),
        pubkey_id: "op-admin-1".into(),
        sig_alg: "ed25519-v1".into(),
        nonce: i,
        args_json: r#"{"throttle_pct":"40"}"#.into(),
        raw_hex: "0801".into(),
        requester: "alice".into(),
        requester_roles: "admin".into(),
        token_issuer: "defi-dashboard".into(),
        route: "/api/control/commands".into(),
        prev_hash: String::new(),
        row_hash: String::new(),
    }
}
