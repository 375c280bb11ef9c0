//! Every decision of the edge filter, natively (the same code runs in wasm).

use gw_core::edge_stamp::{Nonce, Target};
use gw_core::Command;
use gw_core::{Action, Code};
use gw_filter::config::Settings;
use gw_filter::edge::{header_safe, without_bearer_offers, Edge, HeadDecision, RequestHead};
mod common;
use common::EnvoyLikeStore;

const NOW: u64 = 1_750_000_000;

fn config() -> serde_json::Value {
    testkit::fixtures::filter_config(4096)
}

/// The seal among `h` verifies under the fixture key over the rest of `h`, for a
/// `method` request the sidecar serves at `path`; its nonce.
fn assert_sealed(h: &[(String, String)], method: &str, path: &str) -> Nonce {
    let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    let key = gw_core::edge_stamp::EdgeKey::from_hex(testkit::fixtures::EDGE_KEY_HEX).unwrap();
    let sealed = key.check(get("x-gw-stamp"), NOW, Target { method, path }, get);
    match sealed {
        Ok(s) => {
            assert_eq!(s.ts, NOW, "{h:?}");
            s.nonce
        }
        Err(e) => panic!("{e}: {h:?}"),
    }
}

/// Every test VM's nonce origin.
const ORIGIN: u64 = 0x5eed;

fn edge() -> Edge {
    Edge::new(
        Settings::parse(config().to_string().as_bytes()).unwrap(),
        ORIGIN,
    )
}

fn token(roles: &[&str]) -> String {
    testkit::fixtures::bearer(roles, NOW)
}

fn command(nonce: u64, action: Action, args: &[(&str, &str)]) -> Vec<u8> {
    testkit::fixtures::signed_command(nonce, action, NOW, "dashboard", args)
}

fn head<'a>(method: &'a str, path: &'a str, auth: Option<&'a str>) -> RequestHead<'a> {
    RequestHead {
        method,
        path,
        content_type: Some("application/x-protobuf"),
        authorization: auth,
        content_length: None,
        upgrade: None,
        websocket_protocols: None,
        end_of_stream: false,
    }
}

fn reject_code(d: HeadDecision) -> Code {
    match d {
        HeadDecision::Reject(r, _) => r.code,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn the_example_configuration_loads() {
    let text = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.json")).unwrap();
    // Its secrets and keys are placeholders no deployment can keep: refused
    // until replaced (a known JWT secret would let anyone mint an admin's token).
    let err = Settings::parse(&text).unwrap_err().to_string();
    assert!(
        err.contains("edge_key_hex: the edge key must be 32 bytes"),
        "{err}"
    );
    let mut cfg: serde_json::Value = serde_json::from_slice(&text).unwrap();
    cfg["edge_key_hex"] = testkit::fixtures::EDGE_KEY_HEX.into();
    let err = Settings::parse(cfg.to_string().as_bytes())
        .unwrap_err()
        .to_string();
    // The command key (it was one of a known seed: anyone could sign).
    assert!(
        err.contains("op-admin-1") && err.contains("placeholder"),
        "{err}"
    );
    cfg["command_keys"]["keys"][0]["public_key_hex"] =
        hex::encode(testkit::fixtures::command_key().verifying_key().as_bytes()).into();
    let err = Settings::parse(cfg.to_string().as_bytes())
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("jwt.jwks:"), "{err}");
    cfg["jwt"]["jwks"]["keys"][0]["k"] =
        gw_core::jwk::b64url_encode(testkit::fixtures::JWT_SECRET).into();
    let s = Settings::parse(cfg.to_string().as_bytes()).unwrap();
    assert_eq!(s.command_path, "/api/control/commands");
    assert!(s.rule_for("/index.html").is_some_and(|r| r.public));
}

#[test]
fn command_keys_verify_with_precomputed_tables() {
    let s = Settings::parse(config().to_string().as_bytes()).unwrap();
    let key = s.control.keyring.get("op-admin-1").expect("fixture key");
    assert!(key.is_precomputed());
}

#[test]
fn invalid_configurations_are_refused_clearly() {
    type Mutation = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(Mutation, &str)> = vec![
        (
            Box::new(|c| c["command_keys"]["keys"] = serde_json::json!([])),
            "command_keys.keys is empty",
        ),
        (
            Box::new(|c| c["jwt"]["jwks"]["keys"][0]["k"] = "c2hvcnQ".into()),
            "at least 32",
        ),
        (
            Box::new(|c| c["routes"] = serde_json::json!([])),
            "routes is empty",
        ),
        (
            Box::new(|c| c["routes"][0]["public"] = true.into()),
            "exclude each other",
        ),
        (
            Box::new(|c| c["routes"][3]["public"] = false.into()),
            "give a role",
        ),
        (
            Box::new(|c| c["max_body_bytes"] = 0.into()),
            "max_body_bytes",
        ),
        (
            Box::new(|c| c["replay_max_per_issuer"] = 100.into()),
            "max_per_issuer",
        ),
        (
            // Two issuers, a key that does not say which it signs for.
            Box::new(|c| {
                c["jwt"]["policy"]["issuers"] = serde_json::json!(["defi-dashboard", "other"]);
            }),
            "each key names the issuer it signs for",
        ),
        (
            Box::new(|c| c["max_skew_secs"] = 3600.into()),
            "max_skew_secs must be 1..=600",
        ),
        (
            Box::new(|c| c["jwt"]["policy"]["leeway_secs"] = 1_000_000_000.into()),
            "jwt.policy.leeway_secs must be 0..=300",
        ),
        (
            Box::new(|c| c["jwt"]["cache_entries"] = 1_000_000.into()),
            "jwt.cache_entries must be 0..=16384",
        ),
        (
            Box::new(|c| c["max_skew_secs"] = 0.into()),
            "max_skew_secs must be 1..=600",
        ),
        (
            // 16 384 tokens of 64 KiB: a gibibyte per worker.
            Box::new(|c| {
                c["jwt"]["cache_entries"] = 16_384.into();
                c["jwt"]["policy"]["max_token_bytes"] = 65_536.into();
            }),
            "must be at most 67108864 bytes",
        ),
        (
            // The sidecar's is one role; an empty one, or two, would let
            // other tokens through at the edge.
            Box::new(|c| c["command_role"] = "admin,viewer".into()),
            "command_role must be one role name",
        ),
        (
            Box::new(|c| c["command_role"] = "".into()),
            "command_role must be one role name",
        ),
        (
            Box::new(|c| c["replay_key_prefix"] = "gw.stamp.v1.x".into()),
            "neither a prefix of the other",
        ),
        (
            Box::new(|c| c["stamp_key_prefix"] = "".into()),
            "neither a prefix of the other",
        ),
        (Box::new(|c| c["surprise"] = 1.into()), "unknown field"),
        (
            // No key: nothing the filter stamps would be believed.
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("edge_key_hex");
            }),
            "missing field `edge_key_hex`",
        ),
        (
            Box::new(|c| c["edge_key_hex"] = "ab".repeat(16).into()),
            "edge_key_hex: the edge key must be 32 bytes",
        ),
        (
            Box::new(|c| c["edge_key_hex"] = "0".repeat(64).into()),
            "edge_key_hex: the edge key is all zeros",
        ),
        (
            Box::new(|c| c["headers"] = serde_json::json!({"sub": "X-Bad Header"})),
            "header name",
        ),
        (
            // A rename would reach the filter and not the sidecar: refused at start.
            Box::new(|c| c["headers"] = serde_json::json!({"verified": "x-gw-checked"})),
            "renaming is not supported",
        ),
        (
            Box::new(|c| c["jwt"]["policy"]["algorithms"] = serde_json::json!(["none"])),
            "unknown variant",
        ),
        (
            // A token the same issuer minted for another service would pass.
            Box::new(|c| {
                c["jwt"]["policy"]
                    .as_object_mut()
                    .unwrap()
                    .remove("audiences");
            }),
            "jwt.policy.audiences is empty: no token would be accepted",
        ),
        (
            Box::new(|c| c["jwt"]["policy"]["issuers"] = serde_json::json!([])),
            "jwt.policy.issuers is empty: no token would be accepted",
        ),
        (
            Box::new(|c| c["jwt"]["policy"]["any_issuer"] = true.into()),
            "jwt.policy.issuers and jwt.policy.any_issuer are both set",
        ),
    ];
    for (mutate, needle) in cases {
        let mut c = config();
        mutate(&mut c);
        let err = Settings::parse(c.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "`{err}` should mention `{needle}`");
    }
    assert!(Settings::parse(b"not json").is_err());
}

#[test]
fn routes_need_the_right_role() {
    let e = edge();
    let viewer = token(&["viewer"]);
    let op = token(&["operator"]);
    assert!(matches!(
        e.on_request_headers(&head("GET", "/index.html", None), NOW),
        HeadDecision::Public
    ));
    assert_eq!(
        reject_code(e.on_request_headers(&head("GET", "/api/modules", None), NOW)),
        Code::JwtMissing
    );
    assert_eq!(
        reject_code(e.on_request_headers(&head("GET", "/api/modules", Some(&viewer)), NOW)),
        Code::ForbiddenRole
    );
    // A host that gives no time (0): no token can be checked, none passes.
    assert_eq!(
        reject_code(e.on_request_headers(&head("GET", "/api/modules", Some(&op)), 0)),
        Code::Unavailable
    );
    let mut nonces = std::collections::HashSet::new();
    for _ in 0..3 {
        match e.on_request_headers(&head("GET", "/api/ledger/history?x=1", Some(&viewer)), NOW) {
            HeadDecision::Forward(h) => {
                // Sealed for the method and the path, without the query; each
                // seal with a nonce of its own (the sidecar believes it once).
                let nonce = assert_sealed(&h, "GET", "/api/ledger/history");
                assert_eq!(nonce[..8], ORIGIN.to_be_bytes(), "{h:?}");
                assert!(nonces.insert(nonce), "a nonce again: {h:?}");
            }
            other => panic!("{other:?}"),
        }
    }
    match e.on_request_headers(&head("GET", "/api/ledger/history?x=1", Some(&viewer)), NOW) {
        HeadDecision::Forward(h) => {
            assert!(h.contains(&("x-gw-sub".into(), "alice".into())));
            assert!(h.contains(&("x-gw-roles".into(), "viewer".into())));
            assert!(h.contains(&("x-gw-verified".into(), "jwt".into())));
            // The token's expiry (a realtime stream ends then).
            assert!(h.contains(&("x-gw-token-exp".into(), (NOW + 600).to_string())));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        e.on_request_headers(&head("GET", "/api/modules", Some(&op)), NOW),
        HeadDecision::Forward(_)
    ));
    assert_eq!(
        reject_code(e.on_request_headers(&head("GET", "/api/modules", Some("Basic abc")), NOW)),
        Code::JwtMissing
    );
    assert_eq!(
        reject_code(e.on_request_headers(&head("GET", "/api/modules", Some("Bearer x.y.z")), NOW)),
        Code::JwtMalformed
    );
    assert_eq!(
        reject_code(e.on_request_headers(&head("GET", "/api/modules", Some(&op)), NOW + 10_000)),
        Code::JwtExpired
    );
    for p in [
        "/api//control/commands",
        "/api/control/%2e%2e/x",
        "/api/../api/control/commands",
        "/api/x%2Fy",
        "/api/x%2fy",
        "/api/x%5Cy",
        "/api/%2E%2E/x",
        "/api/x\\y",
    ] {
        assert_eq!(
            reject_code(e.on_request_headers(&head("GET", p, Some(&op)), NOW)),
            Code::Malformed,
            "{p}"
        );
    }
    // Other escapes, a lone or trailing '%', and non-ASCII after '%' are not
    // path-changing: they reach the route rules.
    for p in ["/api/a%20b", "/api/100%", "/api/%", "/api/%é2f", "/api/x%2"] {
        assert!(
            matches!(
                e.on_request_headers(&head("GET", p, Some(&op)), NOW),
                HeadDecision::Forward(_)
            ),
            "{p}"
        );
    }
}

/// A browser's WebSocket offers its token as the subprotocol `bearer.<jwt>`: the
/// edge verifies it like `Authorization` on a `GET` upgrade only; the verify stage
/// strips every `bearer.` offer before anything is forwarded.
#[test]
fn a_websocket_may_carry_its_token_as_a_subprotocol() {
    let e = edge();
    let viewer = token(&["viewer"]);
    let jwt = viewer.trim_start_matches("Bearer ");
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let offer = leak(format!("gw.realtime.v1, bearer.{jwt}"));
    let ws = |offer: &'static str| RequestHead {
        upgrade: Some("websocket"),
        websocket_protocols: Some(offer),
        ..head("GET", "/api/realtime", None)
    };
    match e.on_request_headers(&ws(offer), NOW) {
        HeadDecision::Forward(h) => {
            assert!(h.contains(&("x-gw-roles".into(), "viewer".into())));
            assert!(h.contains(&("x-gw-verified".into(), "jwt".into())));
        }
        other => panic!("{other:?}"),
    }
    // The route's role still applies: a viewer token is not enough for /api/modules.
    let modules = RequestHead {
        path: "/api/modules",
        ..ws(offer)
    };
    assert_eq!(
        reject_code(e.on_request_headers(&modules, NOW)),
        Code::ForbiddenRole
    );
    // Only on a GET upgrade: not on a plain request, not on a POST (every control
    // route), even with an admin token.
    let plain = RequestHead {
        upgrade: None,
        ..ws(offer)
    };
    assert_eq!(
        reject_code(e.on_request_headers(&plain, NOW)),
        Code::JwtMissing
    );
    let admin = token(&["admin"]);
    let admin_offer = leak(format!(
        "gw.realtime.v1, bearer.{}",
        admin.trim_start_matches("Bearer ")
    ));
    for path in [
        "/api/control/commands",
        "/api/control/module/mev:stop",
        "/api/modules",
    ] {
        let post = RequestHead {
            method: "POST",
            path,
            ..ws(admin_offer)
        };
        assert_eq!(
            reject_code(e.on_request_headers(&post, NOW)),
            Code::JwtMissing,
            "{path}"
        );
    }
    // A bad token, two tokens, or a token with nothing else offered.
    assert_eq!(
        reject_code(e.on_request_headers(&ws("gw.realtime.v1, bearer.x.y.z"), NOW)),
        Code::JwtMalformed
    );
    let two = leak(format!("{offer}, bearer.{jwt}"));
    assert_eq!(
        reject_code(e.on_request_headers(&ws(two), NOW)),
        Code::Malformed
    );
    let alone = leak(format!("bearer.{jwt}"));
    assert_eq!(
        reject_code(e.on_request_headers(&ws(alone), NOW)),
        Code::JwtMissing
    );
    assert_eq!(
        reject_code(e.on_request_headers(&ws(offer), NOW + 10_000)),
        Code::JwtExpired
    );
    assert_eq!(
        reject_code(e.on_request_headers(&ws("gw.realtime.v1"), NOW)),
        Code::JwtMissing
    );
    // What the upstream is left with.
    assert_eq!(
        without_bearer_offers(offer).as_deref(),
        Some("gw.realtime.v1")
    );
    assert_eq!(
        without_bearer_offers(two).as_deref(),
        Some("gw.realtime.v1")
    );
    assert_eq!(without_bearer_offers(alone).as_deref(), Some(""));
    assert_eq!(without_bearer_offers("gw.realtime.v1, chat"), None);
}

/// A command's body comes after its headers (up to Envoy's request timeout
/// later): the token is held to its times again when the body is checked, so a
/// token that expired in between does not carry the command.
#[test]
fn a_token_that_expired_before_the_body_came_does_not_carry_the_command() {
    let e = edge();
    let store = EnvoyLikeStore::default();
    let admin = token(&["admin"]);
    let HeadDecision::AwaitBody(p) =
        e.on_request_headers(&head("POST", "/api/control/commands", Some(&admin)), NOW)
    else {
        panic!("expected to await the body")
    };
    // The token's exp is NOW + 600; past it and any leeway, with a command
    // signed then (fresh).
    let late = NOW + 600 + 120;
    let body = testkit::fixtures::signed_command(12, Action::Start, late, "dashboard", &[]);
    assert_eq!(
        e.on_request_body(&p, &body, late, &store).unwrap_err().code,
        Code::JwtExpired
    );
    // Within the token's time the same command is taken.
    let early = NOW + 60;
    let body = testkit::fixtures::signed_command(13, Action::Start, early, "dashboard", &[]);
    assert!(e.on_request_body(&p, &body, early, &store).is_ok());
}

#[test]
fn signed_commands_are_verified_and_accepted_once() {
    let e = edge();
    let store = EnvoyLikeStore::default();
    let admin = token(&["admin"]);
    let body = command(11, Action::Throttle, &[("throttle_pct", "40")]);
    let HeadDecision::AwaitBody(p) =
        e.on_request_headers(&head("POST", "/api/control/commands", Some(&admin)), NOW)
    else {
        panic!("expected to await the body")
    };
    let checked = e.on_request_body(&p, &body, NOW, &store).unwrap();
    assert!(!checked.resend);
    let h = checked.headers;
    for (k, v) in [
        ("x-gw-sub", "alice"),
        ("x-gw-roles", "admin"),
        ("x-gw-pubkey-id", "op-admin-1"),
        ("x-gw-issuer", "dashboard"),
        ("x-gw-nonce", "11"),
        ("x-gw-verified", "edge"),
    ] {
        assert!(h.contains(&(k.to_string(), v.to_string())), "{k}: {h:?}");
    }
    assert_sealed(&h, "POST", "/api/control/commands");
    // The same bytes again: a resend, let through to the sidecar.
    assert!(e.on_request_body(&p, &body, NOW, &store).unwrap().resend);
    // Another command reusing the nonce: refused here.
    let reused = command(11, Action::Throttle, &[("throttle_pct", "41")]);
    assert_eq!(
        e.on_request_body(&p, &reused, NOW, &store)
            .unwrap_err()
            .code,
        Code::Replay
    );
}

#[test]
fn a_configured_module_route_prefix_binds_the_command_to_its_route() {
    let mut cfg = config();
    cfg["module_route_prefix"] = "/api/ops/module/".into();
    let e = Edge::new(Settings::parse(cfg.to_string().as_bytes()).unwrap(), ORIGIN);
    let store = EnvoyLikeStore::default();
    let admin = token(&["admin"]);
    let body = command(12, Action::Throttle, &[("throttle_pct", "40")]);
    let decide = |path| e.on_request_headers(&head("POST", path, Some(&admin)), NOW);
    let HeadDecision::AwaitBody(p) = decide("/api/ops/module/mev:throttle") else {
        panic!("expected to await the body")
    };
    let checked = e.on_request_body(&p, &body, NOW, &store).unwrap();
    // Sealed for the path Envoy rewrites it to, the one the sidecar serves.
    assert_sealed(&checked.headers, "POST", "/api/control/module/mev:throttle");
    let HeadDecision::AwaitBody(p) = decide("/api/ops/module/mev:kill") else {
        panic!("expected to await the body")
    };
    let mismatch = e.on_request_body(&p, &body, NOW, &store).unwrap_err();
    assert_eq!(mismatch.code, Code::RouteMismatch);
    assert_eq!(
        reject_code(decide("/api/ops/module/hft:stop")),
        Code::Malformed
    );
}

/// With the control routes configured elsewhere, the sidecar's fixed paths (which
/// Envoy rewrites them to) are no route of the edge's: a request there would reach
/// the sidecar as a plain API call, past the replay window and the command's role.
#[test]
fn the_fixed_control_paths_are_no_route_when_others_are_configured() {
    let mut cfg = config();
    cfg["command_path"] = "/api/ops/commands".into();
    cfg["module_route_prefix"] = "/api/ops/module/".into();
    let e = Edge::new(Settings::parse(cfg.to_string().as_bytes()).unwrap(), ORIGIN);
    let admin = token(&["admin"]);
    for (method, path) in [
        ("POST", "/api/control/commands"),
        ("POST", "/api/control/commands?x=1"),
        ("GET", "/api/control/commands"),
        ("POST", "/api/control/module/mev:stop"),
        ("POST", "/api/control/module/"),
    ] {
        let d = e.on_request_headers(&head(method, path, Some(&admin)), NOW);
        assert_eq!(reject_code(d), Code::NotFound, "{method} {path}");
    }
    // The configured ones are the control routes; the defaults' neighbours are not
    // control paths.
    let d = e.on_request_headers(&head("POST", "/api/ops/commands", Some(&admin)), NOW);
    assert!(matches!(d, HeadDecision::AwaitBody(_)), "{d:?}");
    let d = e.on_request_headers(&head("GET", "/api/control/module", Some(&admin)), NOW);
    assert!(
        !matches!(d, HeadDecision::Reject(ref r, _) if r.code == Code::NotFound),
        "{d:?}"
    );
    // With the defaults, the fixed paths are the control routes.
    let d = edge().on_request_headers(&head("POST", "/api/control/commands", Some(&admin)), NOW);
    assert!(matches!(d, HeadDecision::AwaitBody(_)), "{d:?}");
}

#[test]
fn command_rejections() {
    let e = edge();
    let store = EnvoyLikeStore::default();
    let admin = token(&["admin"]);
    let op = token(&["operator"]);
    let cmd_head = |auth| head("POST", "/api/control/commands", auth);
    assert_eq!(
        reject_code(e.on_request_headers(&cmd_head(None), NOW)),
        Code::JwtMissing
    );
    assert_eq!(
        reject_code(e.on_request_headers(&cmd_head(Some(&op)), NOW)),
        Code::ForbiddenRole
    );
    assert_eq!(
        reject_code(e.on_request_headers(&head("GET", "/api/control/commands", Some(&admin)), NOW)),
        Code::MethodNotAllowed
    );
    let mut big = cmd_head(Some(&admin));
    big.content_length = Some("4097");
    assert_eq!(reject_code(e.on_request_headers(&big, NOW)), Code::TooLarge);
    let mut empty = cmd_head(Some(&admin));
    empty.end_of_stream = true;
    assert_eq!(
        reject_code(e.on_request_headers(&empty, NOW)),
        Code::Malformed
    );
    assert_eq!(
        reject_code(e.on_request_headers(
            &head("POST", "/api/control/module/hft:stop", Some(&admin)),
            NOW
        )),
        Code::Malformed
    );

    let HeadDecision::AwaitBody(p) = e.on_request_headers(&cmd_head(Some(&admin)), NOW) else {
        panic!()
    };
    let good = command(20, Action::Throttle, &[("throttle_pct", "40")]);
    let code = |b: &[u8], now| e.on_request_body(&p, b, now, &store).unwrap_err().code;
    assert_eq!(code(&good[..good.len() - 1], NOW), Code::Malformed);
    let mut flipped = good.clone();
    flipped[3] ^= 1;
    assert!(e.on_request_body(&p, &flipped, NOW, &store).is_err());
    assert_eq!(code(&good, NOW + 31), Code::Stale);
    assert_eq!(code(&good, NOW - 31), Code::Future);
    assert_eq!(
        code(
            &command(21, Action::Throttle, &[("throttle_pct", "400")]),
            NOW
        ),
        Code::BadArgs
    );
    let other = gw_core::sign_command(
        &<Command as prost::Message>::decode(&good[..]).unwrap(),
        &ed25519_dalek::SigningKey::from_bytes(&[2; 32]),
        "op-admin-1",
    );
    assert_eq!(code(&other, NOW), Code::BadSignature);
    assert_eq!(e.body_too_large(4097).unwrap().code, Code::TooLarge);
    // A host that gives no time (0): nothing passes — a command signed at a
    // `ts` within `max_skew_secs` of 0 would otherwise be fresh.
    let early = testkit::fixtures::signed_command(22, Action::Start, 10, "dashboard", &[]);
    assert_eq!(code(&early, 0), Code::Unavailable);
    assert!(
        e.on_request_body(&p, &early, 10, &store).is_ok(),
        "fresh at 10"
    );

    // Route binding.
    let HeadDecision::AwaitBody(pk) = e.on_request_headers(
        &head("POST", "/api/control/module/mev:kill", Some(&admin)),
        NOW,
    ) else {
        panic!()
    };
    assert_eq!(
        e.on_request_body(&pk, &good, NOW, &store).unwrap_err().code,
        Code::RouteMismatch
    );
    let HeadDecision::AwaitBody(pt) = e.on_request_headers(
        &head("POST", "/api/control/module/mev:throttle", Some(&admin)),
        NOW,
    ) else {
        panic!()
    };
    assert!(e.on_request_body(&pt, &good, NOW, &store).is_ok());
}

#[test]
fn json_control_route_needs_only_admin() {
    let e = edge();
    let mut h = head("POST", "/api/control/module/mev:throttle", Some(""));
    h.content_type = Some("application/json");
    let admin = token(&["admin"]);
    h.authorization = Some(&admin);
    match e.on_request_headers(&h, NOW) {
        HeadDecision::Forward(hs) => assert!(hs.contains(&("x-gw-verified".into(), "jwt".into()))),
        other => panic!("{other:?}"),
    }
    let op = token(&["operator"]);
    h.authorization = Some(&op);
    assert_eq!(
        reject_code(e.on_request_headers(&h, NOW)),
        Code::ForbiddenRole
    );
}

#[test]
fn reserved_headers_and_safe_values() {
    use gw_core::contract::headers::is_reserved;
    assert!(is_reserved("X-GW-Sub"));
    assert!(is_reserved("x-gw-anything"));
    assert!(!is_reserved("x-request-id"));
    assert_eq!(header_safe("alice"), "alice");
    assert_eq!(
        header_safe("a\r\nx-gw-roles: admin"),
        "a%0D%0Ax-gw-roles: admin"
    );
    assert_eq!(header_safe("100%"), "100%25");
    // A space a hop may trim is encoded; one inside is kept.
    assert_eq!(header_safe(" alice "), "%20alice%20");
    assert_eq!(header_safe("alice b"), "alice b");
    assert_eq!(header_safe(" "), "%20");
}

/// A token for another audience is refused at the edge; with `any_audience` the
/// operator accepts any, in so many words.
#[test]
fn the_audience_is_checked_unless_any_is_configured() {
    let claims = |aud: &str| {
        serde_json::json!({"sub": "alice", "iss": "defi-dashboard", "aud": aud,
                           "exp": NOW + 600, "roles": ["viewer"]})
    };
    let bearer = |aud: &str| {
        let t = gw_core::jwt::mint_hs256(
            testkit::fixtures::JWT_SECRET,
            Some("dev"),
            claims(aud).as_object().unwrap(),
        )
        .unwrap();
        format!("Bearer {t}")
    };
    let other = bearer("another-service");
    let d = edge().on_request_headers(&head("GET", "/api/ledger/history", Some(&other)), NOW);
    assert_eq!(reject_code(d), Code::JwtAudience);
    let mut cfg = config();
    cfg["jwt"]["policy"]["audiences"] = serde_json::json!([]);
    cfg["jwt"]["policy"]["any_audience"] = true.into();
    let e = Edge::new(Settings::parse(cfg.to_string().as_bytes()).unwrap(), ORIGIN);
    let d = e.on_request_headers(&head("GET", "/api/ledger/history", Some(&other)), NOW);
    assert!(
        !matches!(d, HeadDecision::Reject(..)),
        "any audience, configured: {d:?}"
    );
}
