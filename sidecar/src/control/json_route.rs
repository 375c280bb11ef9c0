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

/// The nonce a JSON-route command of requester `sub` with idempotency key `key`
/// is signed with: the same for every retry, so the replay guard and the agents
/// know the command (a different one for another requester's same key). Its top
/// bit is set: the signer's clock-made nonces (nanoseconds) stay below 2^63.
pub fn idempotent_nonce(sub: &str, key: &str) -> u64 {
    let mut input = Vec::with_capacity(32 + sub.len() + key.len());
    input.extend_from_slice(b"gw-json-idempotency/1\0");
    input.extend_from_slice(sub.as_bytes());
    input.push(0);
    input.extend_from_slice(key.as_bytes());
    let d = gw_core::replay::digest(&input);
    let mut n = [0u8; 8];
    n.copy_from_slice(&d[..8]);
    u64::from_be_bytes(n) | 1 << 63
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

    /// A signed command for `route` with `args`, stamped `now_nanos`, with
    /// `nonce` (an idempotency key's) or the next of the signer's own.
    pub fn sign(
        &self,
        (module, action): (Module, Action),
        args: BTreeMap<String, String>,
        now_nanos: u64,
        nonce: Option<u64>,
    ) -> Result<Vec<u8>, Reject> {
        NewCommand {
            module,
            action,
            args,
            issuer: self.issuer.clone(),
            request_id: uuid::Uuid::new_v4().to_string(),
            ts: now_nanos / 1_000_000_000,
            nonce: nonce.unwrap_or_else(|| self.nonces.next(now_nanos)),
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
        let n = idempotent_nonce("alice", "order-42");
        assert_eq!(n, idempotent_nonce("alice", "order-42"));
        assert_ne!(n, idempotent_nonce("bob", "order-42"));
        assert_ne!(n, idempotent_nonce("alice", "order-43"));
        // Apart from the clock-made nonces (nanoseconds, below 2^63).
        assert!(n >= 1 << 63);
        // The key's nonce is the command's.
        let s = JsonSigner::new(
            testkit::fixtures::command_key(),
            "op-admin-1".into(),
            "dashboard".into(),
        );
        let body = s
            .sign(
                (Module::Mev, Action::Start),
                BTreeMap::new(),
                1_750_000_000_000_000_000,
                Some(n),
            )
            .unwrap();
        let c = <gw_core::Command as prost::Message>::decode(body.as_slice()).unwrap();
        assert_eq!(c.nonce, n);
    }
}
