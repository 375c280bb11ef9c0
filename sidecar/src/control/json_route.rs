//! The original API's JSON control route: `POST /api/control/module/{name}:{action}`
//! with `{"throttle_pct", "ev_min", "tip_ladder", "kill"}`. The sidecar builds the
//! command with the core's builder, signs it with its own key (`CTRL_SIGN_SK_HEX`,
//! `CTRL_PUBKEY_ID`), and admits it like any other.

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use gw_core::{Action, Code, Module, NewCommand, NonceSource, Reject};
use serde::Deserialize;

/// Whether a `content-type` is JSON, or absent (the original API's clients).
pub fn is_json_media_type(content_type: Option<&str>) -> bool {
    content_type.is_none_or(|ct| {
        ct.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case("application/json")
    })
}

/// The request header naming a JSON-route request, so that a retry of it (after a
/// timeout, say) does not sign and apply the command again.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The idempotency key of a request, if it gave one: 1–128 visible ASCII
/// characters.
pub fn idempotency_key(raw: Option<&[u8]>) -> Result<Option<&str>, Reject> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    if raw.is_empty() || raw.len() > 128 || !raw.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(Reject::new(
            Code::BadArgs,
            "idempotency-key must be 1 to 128 visible ASCII characters",
        ));
    }
    Ok(std::str::from_utf8(raw).ok())
}

/// A JSON-route request made idempotent by its key: the nonce and request id its
/// command is signed with, the same for every retry of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotent {
    /// Made from the token's issuer, its subject and the key, so that the replay
    /// guard and the agents know a retry (and another requester's same key is
    /// another command). Its top bit is set: the signer's clock-made nonces
    /// (nanoseconds) stay below 2^63.
    pub nonce: u64,
    /// `idem-{nonce}-{request}`: `request` is a digest of the route and the JSON
    /// body, so a retry can be told from another request under the same key.
    pub request_id: String,
}

impl Idempotent {
    /// For key `key` of the requester `sub` of a token from `token_issuer`, on
    /// `route` with JSON `body`. A token without a subject cannot scope a key.
    pub fn new(
        token_issuer: &str,
        sub: &str,
        key: &str,
        (module, action): (Module, Action),
        body: &[u8],
    ) -> Result<Idempotent, Reject> {
        if sub.is_empty() {
            return Err(Reject::new(
                Code::BadArgs,
                "idempotency-key needs a token with a subject (`sub`)",
            ));
        }
        // Every part length-prefixed, the tag too (an empty domain).
        let half = |parts: &[&[u8]]| {
            let d = gw_core::replay::digest(&super::state_sign::message(b"", parts));
            let mut n = [0u8; 8];
            n.copy_from_slice(&d[..8]);
            u64::from_be_bytes(n)
        };
        let nonce = half(&[
            b"gw-json-idempotency/1",
            token_issuer.as_bytes(),
            sub.as_bytes(),
            key.as_bytes(),
        ]) | 1 << 63;
        let request = half(&[
            b"gw-json-request/1",
            module.as_str().as_bytes(),
            action.as_str().as_bytes(),
            body,
        ]);
        Ok(Idempotent {
            nonce,
            request_id: format!("idem-{nonce:016x}-{request:016x}"),
        })
    }
}

/// The original API's JSON body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlBody {
    throttle_pct: Option<i64>,
    ev_min: Option<f64>,
    tip_ladder: Option<Vec<f64>>,
    kill: Option<bool>,
}

/// Parses a JSON body for `action` into the command's `args` (an empty body is no
/// args). The args' bounds are checked when the command is built.
pub fn parse_args(body: &[u8], action: Action) -> Result<BTreeMap<String, String>, Reject> {
    let req: ControlBody = if body.is_empty() {
        ControlBody::default()
    } else {
        serde_json::from_slice(body)
            .map_err(|e| Reject::with(Code::Malformed, format!("JSON body: {e}")))?
    };
    if req.kill == Some(true) && action != Action::Kill {
        return Err(Reject::new(
            Code::BadArgs,
            "`kill: true` needs the kill action",
        ));
    }
    let mut args = BTreeMap::new();
    if let Some(p) = req.throttle_pct {
        args.insert("throttle_pct".to_string(), p.to_string());
    }
    if let Some(e) = req.ev_min {
        args.insert("ev_min".to_string(), e.to_string());
    }
    if let Some(t) = req.tip_ladder.filter(|t| !t.is_empty()) {
        args.insert(
            "tip_ladder".to_string(),
            t.iter().map(f64::to_string).collect::<Vec<_>>().join(","),
        );
    }
    Ok(args)
}

/// The sidecar's own signer for the JSON route.
pub struct JsonSigner {
    key: SigningKey,
    key_id: String,
    issuer: String,
    nonces: NonceSource,
}

impl JsonSigner {
    /// Signs as `key_id` for `issuer`.
    pub fn new(key: SigningKey, key_id: String, issuer: String) -> JsonSigner {
        JsonSigner {
            key,
            key_id,
            issuer,
            nonces: NonceSource::default(),
        }
    }

    /// The issuer of the commands it signs.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// A signed command for `route` with `args`, stamped `now_nanos`, with an
    /// idempotent request's nonce and request id, or the next of the signer's own
    /// nonces and a fresh id.
    pub fn sign(
        &self,
        (module, action): (Module, Action),
        args: BTreeMap<String, String>,
        now_nanos: u64,
        idempotent: Option<&Idempotent>,
    ) -> Result<Vec<u8>, Reject> {
        let (nonce, request_id) = match idempotent {
            Some(i) => (i.nonce, i.request_id.clone()),
            None => (
                self.nonces.next(now_nanos),
                uuid::Uuid::new_v4().to_string(),
            ),
        };
        NewCommand {
            module,
            action,
            args,
            issuer: self.issuer.clone(),
            request_id,
            ts: now_nanos / 1_000_000_000,
            nonce,
        }
        .sign(&self.key, &self.key_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_bodies_become_args() {
        let a = parse_args(
            br#"{"throttle_pct": 40, "ev_min": 0.5, "tip_ladder": [0.1, 0.2]}"#,
            Action::Policy,
        )
        .unwrap();
        assert_eq!(a["throttle_pct"], "40");
        assert_eq!(a["ev_min"], "0.5");
        assert_eq!(a["tip_ladder"], "0.1,0.2");
        assert!(parse_args(b"", Action::Start).unwrap().is_empty());
    }

    #[test]
    fn refuses_malformed_json() {
        assert_eq!(
            parse_args(b"{", Action::Start).unwrap_err().code,
            Code::Malformed
        );
        assert_eq!(
            parse_args(br#"{"nope": 1}"#, Action::Start)
                .unwrap_err()
                .code,
            Code::Malformed,
            "unknown fields"
        );
    }

    #[test]
    fn refuses_kill_on_another_action() {
        assert_eq!(
            parse_args(br#"{"kill": true}"#, Action::Throttle)
                .unwrap_err()
                .code,
            Code::BadArgs
        );
        assert!(parse_args(br#"{"kill": true}"#, Action::Kill).is_ok());
    }

    #[test]
    fn signed_commands_verify_and_never_share_a_nonce() {
        let key = testkit::fixtures::command_key();
        let s = JsonSigner::new(key.clone(), "op-admin-1".into(), "dashboard".into());
        let mut ring = gw_core::KeyRing::new();
        ring.insert(gw_core::keyring::CommandKey::unrestricted(
            "op-admin-1",
            key.verifying_key(),
        ))
        .unwrap();
        let route = (Module::Mev, Action::Throttle);
        let args = parse_args(br#"{"throttle_pct": 5}"#, Action::Throttle).unwrap();
        let a = s
            .sign(route, args.clone(), 1_750_000_000_000_000_000, None)
            .unwrap();
        let b = s
            .sign(route, args, 1_750_000_000_000_000_000, None)
            .unwrap();
        let (va, vb) = (
            gw_core::verify_command(&a, &ring, None).unwrap(),
            gw_core::verify_command(&b, &ring, None).unwrap(),
        );
        assert_eq!(va.command.issuer, "dashboard");
        assert_ne!(va.command.nonce, vb.command.nonce);
        assert_eq!(
            s.sign(
                route,
                parse_args(br#"{"throttle_pct": 500}"#, Action::Throttle).unwrap(),
                1,
                None
            )
            .unwrap_err()
            .code,
            Code::BadArgs
        );
    }

    #[test]
    fn an_idempotency_key_names_one_nonce_per_requester() {
        assert_eq!(idempotency_key(None), Ok(None));
        assert_eq!(idempotency_key(Some(b"order-42")), Ok(Some("order-42")));
        for bad in [&b""[..], b"has space", b"\xff", &[b'k'; 129]] {
            assert_eq!(
                idempotency_key(Some(bad)).unwrap_err().code,
                Code::BadArgs,
                "{bad:?}"
            );
        }
        let route = (Module::Mev, Action::Throttle);
        let body = br#"{"throttle_pct": 40}"#;
        let i = |iss: &str, sub: &str, key: &str, route, body: &[u8]| {
            Idempotent::new(iss, sub, key, route, body).unwrap()
        };
        let a = i("idp", "alice", "order-42", route, body);
        assert_eq!(a, i("idp", "alice", "order-42", route, body));
        // Another requester, another token issuer, another key: another nonce.
        for other in [
            i("idp", "bob", "order-42", route, body),
            i("idp-2", "alice", "order-42", route, body),
            i("idp", "alice", "order-43", route, body),
            // The fields cannot run into each other.
            i("idp", "alic", "eorder-42", route, body),
        ] {
            assert_ne!(a.nonce, other.nonce);
        }
        // Another request under the same key: the same nonce, told apart.
        let b = i(
            "idp",
            "alice",
            "order-42",
            (Module::Arbitrage, Action::Throttle),
            body,
        );
        let c = i(
            "idp",
            "alice",
            "order-42",
            route,
            br#"{"throttle_pct": 41}"#,
        );
        for other in [&b, &c] {
            assert_eq!(a.nonce, other.nonce);
            assert_ne!(a.request_id, other.request_id);
        }
        // Apart from the clock-made nonces (nanoseconds, below 2^63).
        assert!(a.nonce >= 1 << 63);
        // No subject, no scope.
        assert_eq!(
            Idempotent::new("idp", "", "k", route, body)
                .unwrap_err()
                .code,
            Code::BadArgs
        );
        // The command carries them.
        let s = JsonSigner::new(
            testkit::fixtures::command_key(),
            "op-admin-1".into(),
            "dashboard".into(),
        );
        let args = parse_args(body, Action::Throttle).unwrap();
        let signed = s
            .sign(route, args, 1_750_000_000_000_000_000, Some(&a))
            .unwrap();
        let cmd = <gw_core::Command as prost::Message>::decode(signed.as_slice()).unwrap();
        assert_eq!((cmd.nonce, cmd.request_id), (a.nonce, a.request_id));
    }
}
