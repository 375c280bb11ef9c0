//! Interop with independent implementations: commands signed by the original API's
//! signer (Python `protobuf` + PyNaCl) and JWTs minted by PyJWT must verify here, and
//! every tampered one must fail with the right code. The reverse direction too:
//! commands signed by this crate verify in Python.

use std::collections::BTreeMap;

use gw_core::command::{sign_command, split_signed, verify_command};
use gw_core::jwk::JwkSet;
use gw_core::jwt::{verify_jwt, JwtPolicy};
use gw_core::keyring::CommandKey;
use gw_core::{Code, Command, KeyRing};
use serde_json::Value;

fn reference_script() -> String {
    testkit::workspace_root()
        .join("core/tests/interop/reference.py")
        .display()
        .to_string()
}

fn vectors() -> Value {
    let dir = testkit::TempDir::new("interop");
    let out = dir.path().join("vectors.json");
    testkit::run_python(
        &[&reference_script(), "vectors", out.to_str().unwrap()],
        b"",
    );
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

#[test]
fn python_signed_commands_verify_and_tampered_ones_fail() {
    let v = vectors();
    let mut ring = KeyRing::new();
    for (id, hex) in v["keys"].as_object().unwrap() {
        let vk = gw_core::jwk::ed25519_from_hex(hex.as_str().unwrap()).unwrap();
        ring.insert(CommandKey::unrestricted(id.clone(), vk))
            .unwrap();
    }
    let now = v["now"].as_u64().unwrap();
    let mut non_canonical = 0;
    let cases = v["commands"].as_array().unwrap();
    assert!(cases.len() >= 20, "the reference produced too few cases");
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let body = hex::decode(c["body_hex"].as_str().unwrap()).unwrap();
        let want = c["expect"].as_str().unwrap();
        if c["canonical"] == Value::Bool(false) {
            // The published form really is in a non-canonical order.
            let parts = split_signed(&body).unwrap();
            assert!(
                parts.canonical.is_some(),
                "{name}: expected a non-canonical order"
            );
            non_canonical += 1;
        }
        match (verify_command(&body, &ring, Some(now)), want) {
            (Ok(_), "ok") => {}
            (Err(e), w) if w != "ok" => assert_eq!(e.code.as_str(), w, "{name}: {e}"),
            (got, w) => panic!("{name}: expected {w}, got {got:?}"),
        }
    }
    assert!(
        non_canonical >= 1,
        "no published vector was out of canonical order: the test would not cover it"
    );
}

#[test]
fn pyjwt_tokens_verify_and_bad_ones_fail() {
    let v = vectors();
    let keys = JwkSet::parse(&v["jwks"].to_string()).unwrap();
    let policy: JwtPolicy = serde_json::from_value(v["jwt_policy"].clone()).unwrap();
    let now = v["now"].as_u64().unwrap();
    let cases = v["jwts"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let want = c["expect"].as_str().unwrap();
        match (
            verify_jwt(c["token"].as_str().unwrap(), &keys, &policy, now),
            want,
        ) {
            (Ok(t), "ok") => {
                assert_eq!(t.sub.as_deref(), Some("alice"), "{name}");
                assert_eq!(t.roles, vec!["admin"], "{name}");
            }
            (Err(e), w) if w != "ok" => assert_eq!(e.code, Code::parse(w).unwrap(), "{name}: {e}"),
            (got, w) => panic!("{name}: expected {w}, got {got:?}"),
        }
    }
}

#[test]
fn commands_signed_here_verify_in_python() {
    let sk = ed25519_dalek::SigningKey::from_bytes(&[11; 32]);
    let pk_hex = hex::encode(sk.verifying_key().as_bytes());
    let mut cases = Vec::new();
    for (name, args) in [
        ("none", vec![]),
        ("one", vec![("throttle_pct", "40")]),
        (
            "several",
            vec![
                ("tip_ladder", "0.1,0.2"),
                ("ev_min", "0.5"),
                ("throttle_pct", "9"),
                ("a", "x"),
            ],
        ),
    ] {
        let cmd = Command {
            ts: 1_750_000_000,
            module: 1,
            action: 4,
            args: args
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            request_id: format!("rust-{name}"),
            issuer: "gwctl".into(),
            schema_version: "ctrl-v1".into(),
            nonce: 7,
            ..Default::default()
        };
        let body = sign_command(&cmd, &sk, "rust-key");
        cases.push(
            serde_json::json!({"name": name, "body_hex": hex::encode(&body), "pk_hex": pk_hex}),
        );
    }
    let out = testkit::run_python(
        &[&reference_script(), "verify"],
        serde_json::to_string(&cases).unwrap().as_bytes(),
    );
    let results: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(results.len(), 3);
    for r in results {
        assert_eq!(r["ok"], Value::Bool(true), "python rejected {}", r["name"]);
    }
}
