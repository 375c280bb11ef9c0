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

    /// A signed command for `route` with `args`, stamped `now_nanos`.
    pub fn sign(
        &self,
        (module, action): (Module, Action),
        args: BTreeMap<String, String>,
        now_nanos: u64,
    ) -> Result<Vec<u8>, Reject> {
        NewCommand {
            module,
            action,
            args,
            issuer: self.issuer.clone(),
            request_id: uuid::Uuid::new_v4().to_string(),
            ts: now_nanos / 1_000_000_000,
            nonce: self.nonces.next(now_nanos),
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
            .sign(route, args.clone(), 1_750_000_000_000_000_000)
            .unwrap();
        let b = s.sign(route, args, 1_750_000_000_000_000_000).unwrap();
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
                1
            )
            .unwrap_err()
            .code,
            Code::BadArgs
        );
    }
}
