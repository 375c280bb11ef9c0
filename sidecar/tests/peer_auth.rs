//! Only the edge may call the sidecar: mutual TLS with Envoy's client certificate.
//! A caller without a certificate gets 401, one with another certificate from the
//! same CA gets 403 — on every route, whatever `x-gw-*` headers it sends — and each
//! refusal is a ledger row that claims nothing about the edge.

use std::sync::Arc;

use gw_core::Action;
use gw_sidecar::config::Config;
use serde_json::{json, Value};
use testkit::clickhouse::ClickHouse;
use testkit::fixtures::signed_command;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::now;

/// `method path` from `client` with `headers`, and the edge's seal over those of
/// them that are the edge's (`x-gw-*`), as the filter seals them.
fn call(
    s: &common::Served,
    client: &reqwest::Client,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, Value) {
    let seal =
        testkit::fixtures::edge_seal(headers, method, path.split('?').next().unwrap_or(path));
    let mut all = headers.to_vec();
    if let Some((k, v)) = &seal {
        all.push((k, v.as_str()));
    }
    send(s, client, method, path, &all, body)
}

/// `method path` from `client` with exactly `headers` (no seal added).
fn send(
    s: &common::Served,
    client: &reqwest::Client,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, Value) {
    s.rt.block_on(async {
        let mut r = client.request(method.parse().unwrap(), format!("{}{path}", s.base));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let r = r.body(body).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    })
}

/// The headers the edge stamps on a request with an operator's token.
const OPERATOR: &[(&str, &str)] = &[
    ("x-gw-verified", "jwt"),
    ("x-gw-sub", "operator-1"),
    ("x-gw-roles", "operator"),
];

/// A TLS connection to the sidecar without a client certificate (HTTP/1.1).
async fn raw_tls(s: &common::Served) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&s.certs.ca).unwrap();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(s.base.trim_start_matches("https://"))
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

/// A change of the edge key without refusals: the sidecar takes the new key
/// (`GW_EDGE_KEY_HEX`) and keeps believing the old one (`GW_EDGE_KEY_PREV_HEX`)
/// while Envoy's filters move to the new one; a seal under neither is refused.
#[test]
fn during_a_change_of_the_edge_key_the_previous_key_is_believed_too() {
    let d = testkit::TempDir::new("edge-key-change");
    let mut cfg = common::config(&d.path().join("state"), false);
    let new = "22".repeat(32);
    cfg.edge_key = gw_core::edge_stamp::EdgeKey::from_hex(&new).unwrap();
    cfg.edge_key_prev =
        Some(gw_core::edge_stamp::EdgeKey::from_hex(testkit::fixtures::EDGE_KEY_HEX).unwrap());
    let s = common::serve(cfg);
    let modules_sealed_under = |key: &str| {
        let (k, v) = testkit::fixtures::edge_seal_at(OPERATOR, now(), "GET", "/api/modules", key);
        let mut head = OPERATOR.to_vec();
        head.push((k, v.as_str()));
        let (status, body) = send(&s, &s.http, "GET", "/api/modules", &head, Vec::new());
        (status, body["error"].as_str().map(str::to_owned))
    };
    assert_eq!(modules_sealed_under(&new), (200, None), "the new key");
    assert_eq!(
        modules_sealed_under(testkit::fixtures::EDGE_KEY_HEX),
        (200, None),
        "the previous key"
    );
    assert_eq!(
        modules_sealed_under(&"33".repeat(32)),
        (401, Some("edge_stamp_invalid".to_owned())),
        "neither"
    );
}

/// `ops_tls`: `/metrics` and `/healthz` over the sidecar's mutual TLS: a
/// scraper with a certificate from its client CA reads them (it need not be
/// the edge); plain HTTP reads nothing, a TLS client without a certificate is
/// answered 401 `unauthenticated`, with its ledger row.
#[test]
fn the_ops_listener_under_ops_tls_answers_certified_clients_only() {
    let d = testkit::TempDir::new("ops-tls");
    let ch = ClickHouse::start(d.path());
    let mut cfg = common::config_with_clickhouse(&d.path().join("state"), false, &ch);
    cfg.file.ops_tls = true;
    let s = common::serve(cfg);
    assert!(s.ops_base.starts_with("https://"), "{}", s.ops_base);
    let metrics = format!("{}/metrics", s.ops_base);
    let scraper = s
        .certs
        .client(Some((&s.certs.other_cert, &s.certs.other_key)));
    s.rt.block_on(async {
        let r = scraper.get(&metrics).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let text = r.text().await.unwrap();
        assert!(text.contains("gw_sidecar_decisions_total"), "{text}");
        let health = scraper
            .get(format!("{}/healthz", s.ops_base))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status().as_u16(), 200);
        // The TLS takes a client without a certificate (as the main listener's
        // does); the listener answers it 401 and nothing else.
        let anonymous = s.certs.client(None).get(&metrics).send().await.unwrap();
        assert_eq!(anonymous.status().as_u16(), 401);
        let body: Value = anonymous.json().await.unwrap();
        assert_eq!(body["error"], "unauthenticated", "{body}");
        let plain = metrics.replacen("https://", "http://", 1);
        assert!(
            reqwest::get(&plain).await.is_err(),
            "plain HTTP on a TLS listener"
        );
    });
    // The anonymous scrape is a refusal row like any other, naming no one.
    let rows = common::wait_rows(&ch, 1);
    assert_eq!(
        rows.iter()
            .map(|r| (
                r.route.as_str(),
                r.code.as_str(),
                r.decision.as_str(),
                r.requester.as_str()
            ))
            .collect::<Vec<_>>(),
        [("/metrics", "unauthenticated", "rejected", "")],
        "{rows:#?}"
    );
}

/// Each seal is believed once: the same sealed request again (whoever read the
/// mutual-TLS hop, sending it within the seal's minute) is refused 401
/// `edge_stamp_invalid` with its row naming no one — a read, a signed command,
/// a batch of edge reports — and a seal made before the sidecar started, which
/// cannot know what its predecessor believed, is refused 503 (sent again, it is
/// sealed anew). A stamp saying the edge
/// verified a signed command is believed for that command only.
#[test]
fn each_seal_is_believed_once_and_for_its_own_command() {
    let d = testkit::TempDir::new("seal-once");
    let ch = ClickHouse::start(d.path());
    let before_start = now() - 1;
    let s = common::serve(common::config_with_clickhouse(
        &d.path().join("state"),
        true,
        &ch,
    ));
    let sealed = |head: &[(&'static str, &'static str)], method: &str, path: &str| {
        let mut head: Vec<(&str, String)> = head.iter().map(|(k, v)| (*k, v.to_string())).collect();
        let seal = testkit::fixtures::edge_seal(
            &head
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect::<Vec<_>>(),
            method,
            path,
        );
        head.extend(seal);
        head
    };
    let twice = |head: &[(&str, String)], method: &str, path: &str, body: Vec<u8>| {
        let head: Vec<(&str, &str)> = head.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let first = send(&s, &s.http, method, path, &head, body.clone());
        let again = send(&s, &s.http, method, path, &head, body);
        (
            first.0,
            (again.0, again.1["error"].as_str().map(str::to_owned)),
        )
    };
    let refused = (401, Some("edge_stamp_invalid".to_owned()));
    // A read.
    let read = sealed(OPERATOR, "GET", "/api/modules");
    assert_eq!(
        twice(&read, "GET", "/api/modules", Vec::new()),
        (200, refused.clone())
    );
    // A signed command: the second is refused for its seal, before its nonce
    // is looked at, and it is applied once.
    let admin: &[(&str, &str)] = &[
        ("x-gw-verified", "jwt"),
        ("x-gw-sub", "operator-1"),
        ("x-gw-roles", "admin"),
        ("content-type", "application/x-protobuf"),
    ];
    let command = signed_command(
        7,
        Action::Throttle,
        now(),
        "dashboard",
        &[("throttle_pct", "40")],
    );
    let post = sealed(admin, "POST", "/api/control/commands");
    assert_eq!(
        twice(&post, "POST", "/api/control/commands", command),
        (200, refused.clone())
    );
    // A batch of edge reports.
    let report = serde_json::to_vec(&json!([{"decision": "rejected", "code": "replay",
        "path": "/once", "raw_hex": "", "ts_ms": 1}]))
    .unwrap();
    let batch = testkit::fixtures::report_seal(&report);
    let batch = [(batch.0, batch.1)];
    let (first, again) = twice(&batch, "POST", "/internal/edge-decisions", report);
    assert!((200..300).contains(&first), "{first}");
    assert_eq!(again, refused);
    // Made before this sidecar started (within the minute: not stale).
    let (k, v) = testkit::fixtures::edge_seal_at(
        OPERATOR,
        before_start,
        "GET",
        "/api/modules",
        testkit::fixtures::EDGE_KEY_HEX,
    );
    let mut old = OPERATOR.to_vec();
    old.push((k, v.as_str()));
    let (status, body) = send(&s, &s.http, "GET", "/api/modules", &old, Vec::new());
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("unavailable")),
        "send it again: {body}"
    );
    // The edge verified a signed command (`x-gw-verified: edge`, with the
    // command's key, issuer and nonce; no role check follows): sealed, but
    // naming nonce 99 while the body is nonce 8.
    let verified = |nonce: &'static str| -> [(&'static str, &'static str); 7] {
        [
            ("x-gw-verified", "edge"),
            ("x-gw-sub", "operator-1"),
            ("x-gw-roles", "admin"),
            ("x-gw-pubkey-id", "op-admin-1"),
            ("x-gw-issuer", "dashboard"),
            ("x-gw-nonce", nonce),
            ("content-type", "application/x-protobuf"),
        ]
    };
    let command = signed_command(
        8,
        Action::Throttle,
        now(),
        "dashboard",
        &[("throttle_pct", "30")],
    );
    let other = verified("99");
    let (status, body) = call(
        &s,
        &s.http,
        "POST",
        "/api/control/commands",
        &other,
        command.clone(),
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("edge_stamp_invalid")),
        "{body}"
    );
    // Verified by an edge whose command_role is not the sidecar's (a token
    // of role viewer let through): the role is checked again.
    let mut viewer = verified("8");
    viewer[2] = ("x-gw-roles", "viewer");
    let (status, body) = call(
        &s,
        &s.http,
        "POST",
        "/api/control/commands",
        &viewer,
        command.clone(),
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("forbidden_role")),
        "{body}"
    );
    let own = verified("8");
    let (status, body) = call(&s, &s.http, "POST", "/api/control/commands", &own, command);
    assert_eq!(status, 200, "{body}");
    let (_, modules) = call(&s, &s.http, "GET", "/api/modules", OPERATOR, Vec::new());
    assert_eq!(modules["mev"]["throttle_pct"], 30, "{modules}");
    assert_eq!(modules["mev"]["applied"], 2, "each applied once: {modules}");
    // Each refusal has its row, naming no one; the batch's report is recorded once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let rows = loop {
        let rows = common::wait_rows(&ch, 1);
        let refusals = rows
            .iter()
            .filter(|r| r.code == "edge_stamp_invalid")
            .count();
        if refusals >= 4 || std::time::Instant::now() > deadline {
            break rows;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let refusals: Vec<_> = rows
        .iter()
        .filter(|r| ["edge_stamp_invalid", "unavailable"].contains(&r.code.as_str()))
        .collect();
    assert_eq!(refusals.len(), 5, "{rows:#?}");
    assert!(
        refusals
            .iter()
            .all(|r| r.requester.is_empty() && r.stage == "sidecar"),
        "{rows:#?}"
    );
    assert_eq!(
        rows.iter()
            .filter(|r| r.stage == "edge" && r.route == "/once")
            .count(),
        1,
        "{rows:#?}"
    );
}

#[test]
fn only_the_edge_may_call_and_every_refusal_is_recorded() {
    let d = testkit::TempDir::new("peer-auth");
    let ch = ClickHouse::start(d.path());
    let cfg = common::config_with_clickhouse(&d.path().join("state"), true, &ch);
    let s = common::serve(cfg);
    let anonymous = s.certs.client(None);
    let other = s
        .certs
        .client(Some((&s.certs.other_cert, &s.certs.other_key)));
    let spoof = [
        ("x-gw-verified", "edge"),
        ("x-gw-sub", "root"),
        ("x-gw-roles", "admin"),
        ("content-type", "application/x-protobuf"),
    ];
    let cmd = || signed_command(1, Action::Throttle, now(), "dashboard", &[]);
    let report = serde_json::to_vec(&json!([{"decision": "rejected", "code": "replay",
        "path": "/", "raw_hex": "", "ts_ms": 1}]))
    .unwrap();
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("POST", "/api/control/commands", cmd()),
        ("POST", "/api/control/module/mev:throttle", b"{}".to_vec()),
        ("POST", "/internal/edge-decisions", report.clone()),
        ("GET", "/api/modules", Vec::new()),
        ("GET", "/api/ledger/history", Vec::new()),
        (
            "POST",
            "/api/rpc",
            br#"{"jsonrpc":"2.0","id":1,"method":"getHealth"}"#.to_vec(),
        ),
        ("GET", "/api/models", Vec::new()),
    ];
    let mut refused = 0;
    for (client, status, code) in [
        (&anonymous, 401, "unauthenticated"),
        (&other, 403, "forbidden_peer"),
    ] {
        for (method, path, body) in &cases {
            let (got, b) = call(&s, client, method, path, &spoof, body.clone());
            assert_eq!(
                (got, b["error"].as_str()),
                (status, Some(code)),
                "{method} {path}: {b}"
            );
            refused += 1;
        }
    }
    // A caller without a certificate that sends part of a body and hangs up, and
    // one that trickles its body and never ends it: each is refused and recorded
    // all the same, the second answered within the body wait (2 s), not held.
    s.rt.block_on(async {
        let mut hung_up = raw_tls(&s).await;
        hung_up
            .write_all(b"POST /api/control/commands HTTP/1.1\r\nhost: localhost\r\ncontent-length: 100000\r\n\r\nabc")
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        drop(hung_up);
        let mut trickle = raw_tls(&s).await;
        trickle
            .write_all(b"POST /api/rpc HTTP/1.1\r\nhost: localhost\r\ncontent-length: 100000\r\n\r\n{")
            .await
            .unwrap();
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), trickle.read(&mut answer))
            .await
            .expect("a trickled body held the refusal's answer")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    });
    refused += 2;
    // A refused body longer than a row keeps: its first 4 KiB are recorded.
    let (status, _) = call(&s, &anonymous, "POST", "/api/rpc", &[], vec![b'z'; 70_000]);
    assert_eq!(status, 401);
    refused += 1;
    // Health needs no certificate.
    let (ok, _) = call(&s, &anonymous, "GET", "/healthz", &[], Vec::new());
    assert_eq!(ok, 200);
    // Nothing was applied, and the edge itself still gets through.
    let (status, modules) = call(&s, &s.http, "GET", "/api/modules", OPERATOR, Vec::new());
    assert_eq!(status, 200);
    assert_eq!(modules["mev"]["applied"], 0, "{modules}");
    // From the edge, a signed command, with the token the edge verified.
    let post_command = |body: Vec<u8>| {
        let admin = [
            ("x-gw-verified", "jwt"),
            ("x-gw-sub", "operator-1"),
            ("x-gw-roles", "admin"),
            ("content-type", "application/x-protobuf"),
        ];
        call(&s, &s.http, "POST", "/api/control/commands", &admin, body)
    };
    let (status, body) = post_command(cmd());
    assert_eq!(status, 200, "{body}");
    // The same bytes with no stamp: the edge verified no token for them (a filter
    // missing from Envoy's chain): 401, however good the signature, and a row.
    let unstamped = |body: Vec<u8>| {
        let head = [("content-type", "application/x-protobuf")];
        call(&s, &s.http, "POST", "/api/control/commands", &head, body)
    };
    let (status, body) = unstamped(cmd());
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("jwt_missing")),
        "{body}"
    );
    // From the edge's certificate, a stamp the filter did not seal (an Envoy
    // whose chain lost it, or anyone else holding that certificate): 401
    // edge_stamp_invalid, each with its row naming no one.
    let root = [
        ("x-gw-verified", "jwt"),
        ("x-gw-sub", "root"),
        ("x-gw-roles", "admin"),
    ];
    let key = testkit::fixtures::EDGE_KEY_HEX;
    let other_key = "11".repeat(32);
    let seal_at = |h: &[(&str, &str)], ts: u64, method: &str, path: &str, key: &str| {
        testkit::fixtures::edge_seal_at(h, ts, method, path, key).1
    };
    let seal = |h: &[(&str, &str)], ts: u64, key: &str| seal_at(h, ts, "GET", "/api/modules", key);
    let as_operator = [root[0], root[1], ("x-gw-roles", "operator")];
    let forged: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("no seal", vec![]),
        (
            "another key",
            vec![("x-gw-stamp", seal(&root, now(), &other_key))],
        ),
        (
            "two minutes old",
            vec![("x-gw-stamp", seal(&root, now() - 120, key))],
        ),
        (
            "over other roles",
            vec![("x-gw-stamp", seal(&as_operator, now(), key))],
        ),
        (
            "for another path",
            vec![(
                "x-gw-stamp",
                seal_at(&root, now(), "GET", "/api/ledger/history", key),
            )],
        ),
        (
            "for another method",
            vec![(
                "x-gw-stamp",
                seal_at(&root, now(), "POST", "/api/modules", key),
            )],
        ),
        (
            "roles sent twice",
            vec![
                ("x-gw-stamp", seal(&root, now(), key)),
                ("x-gw-roles", "admin".to_owned()),
            ],
        ),
    ];
    let mut forgeries = 0;
    for (what, extra) in &forged {
        let mut head: Vec<(&str, &str)> = root.to_vec();
        head.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
        let (status, body) = send(&s, &s.http, "GET", "/api/modules", &head, Vec::new());
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("edge_stamp_invalid")),
            "{what}: {body}"
        );
        forgeries += 1;
    }
    // A batch of edge reports: with no seal, and with one over another body.
    let other_body = br#"[]"#;
    let sealed_report = testkit::fixtures::report_seal(&report);
    for head in [
        vec![],
        vec![testkit::fixtures::report_seal(other_body)],
        // Its own seal, and an identity the edge never sends with a batch.
        vec![sealed_report.clone(), ("x-gw-sub", "mallory".to_owned())],
    ] {
        let head: Vec<(&str, &str)> = head.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, body) = send(
            &s,
            &s.http,
            "POST",
            "/internal/edge-decisions",
            &head,
            report.clone(),
        );
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("edge_stamp_invalid")),
            "{body}"
        );
        forgeries += 1;
    }
    // A path the sidecar does not serve: 404 not_found, with its row too.
    let (status, body) = call(&s, &s.http, "POST", "/api/nope", OPERATOR, b"x".to_vec());
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    // A path it serves, with a method it does not: 405, with its row.
    let (status, body) = call(&s, &s.http, "GET", "/api/control/commands", &[], Vec::new());
    assert_eq!(
        (status, body["error"].as_str()),
        (405, Some("method_not_allowed"))
    );

    // A read of the ledger it cannot answer: 400 malformed, with its row naming
    // who asked; a method the ledger's route does not serve: one row, the 405's.
    let (status, body) = call(
        &s,
        &s.http,
        "GET",
        "/api/ledger/history?stage=bogus",
        OPERATOR,
        Vec::new(),
    );
    assert_eq!((status, body["error"].as_str()), (400, Some("malformed")));
    let (status, body) = call(
        &s,
        &s.http,
        "POST",
        "/api/ledger/history",
        OPERATOR,
        Vec::new(),
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (405, Some("method_not_allowed"))
    );

    // A body over max_body_bytes (4096 here), from the edge: 413 too_large, and
    // its row too (without the bytes it did not read).
    // (Unstamped: the body is refused before the stamp is looked at.)
    let (status, body) = unstamped(vec![7u8; 5000]);
    assert_eq!((status, body["error"].as_str()), (413, Some("too_large")));

    // Every refusal is a sidecar row with its code; no row claims the edge.
    let rows = common::wait_rows(&ch, refused + forgeries + 8);
    let forged_rows: Vec<_> = rows
        .iter()
        .filter(|r| r.code == "edge_stamp_invalid")
        .collect();
    assert_eq!(forged_rows.len(), forgeries, "{rows:#?}");
    assert!(
        forged_rows.iter().all(|r| r.requester.is_empty()
            && r.stage == "sidecar"
            && ["/api/modules", "/internal/edge-decisions"].contains(&r.route.as_str())),
        "the identity a forged stamp claims is not believed: {rows:#?}"
    );
    assert_eq!(
        forged_rows
            .iter()
            .filter(|r| r.route == "/internal/edge-decisions")
            .map(|r| r.raw_hex.clone())
            .collect::<Vec<_>>(),
        vec![hex::encode(&report); 3],
        "a refused batch's row keeps its body"
    );
    let unstamped: Vec<_> = rows.iter().filter(|r| r.code == "jwt_missing").collect();
    assert_eq!(
        (
            unstamped.len(),
            unstamped[0].route.as_str(),
            unstamped[0].requester.as_str()
        ),
        (1, "/api/control/commands", ""),
        "{rows:#?}"
    );
    let big: Vec<_> = rows.iter().filter(|r| r.code == "too_large").collect();
    assert_eq!(
        (big.len(), big[0].route.as_str(), big[0].raw_hex.as_str()),
        (1, "/api/control/commands", "")
    );
    let nf: Vec<_> = rows.iter().filter(|r| r.code == "not_found").collect();
    assert_eq!(
        (nf.len(), nf[0].route.as_str(), nf[0].raw_hex.as_str()),
        (1, "/api/nope", "78")
    );
    assert_eq!(nf[0].requester, "operator-1", "the edge named who asked");
    let na: Vec<_> = rows
        .iter()
        .filter(|r| r.code == "method_not_allowed")
        .collect();
    assert_eq!(
        na.iter().map(|r| r.route.as_str()).collect::<Vec<_>>(),
        ["/api/control/commands", "/api/ledger/history"]
    );
    let bad_read: Vec<_> = rows.iter().filter(|r| r.code == "malformed").collect();
    assert_eq!(
        bad_read
            .iter()
            .map(|r| (r.route.as_str(), r.requester.as_str()))
            .collect::<Vec<_>>(),
        // Its query by its digest only.
        [(
            gw_core::contract::report_route("/api/ledger/history?stage=bogus").as_str(),
            "operator-1"
        )],
        "{rows:#?}"
    );
    let refusals: Vec<_> = rows
        .iter()
        .filter(|r| r.code == "unauthenticated" || r.code == "forbidden_peer")
        .collect();
    assert_eq!(refusals.len(), refused, "{rows:#?}");
    // What arrived of a body cut off, and the start of one too long, are kept.
    assert!(refusals.iter().any(|r| r.raw_hex == "616263"), "{rows:#?}");
    assert!(refusals
        .iter()
        .any(|r| r.raw_hex.len() == 2 * 4096 && r.raw_hex.bytes().all(|b| b"7a".contains(&b))));
    assert!(refusals
        .iter()
        .all(|r| r.stage == "sidecar" && r.decision == "rejected" && r.requester.is_empty()));
    assert!(
        rows.iter().all(|r| r.stage != "edge"),
        "no row claims to come from the edge: {rows:#?}"
    );
    assert_eq!(gw_core::ledger::verify_chain(&rows), Ok(rows.len() as u64));
    let metrics = s.get_ops("/metrics");
    assert!(
        metrics.contains("gw_sidecar_decisions_total{code=\"forbidden_peer\"} 7"),
        "{metrics}"
    );
}

/// A caller that is not the edge, refused again and again: the ledger writes a
/// row for each refusal up to its budget (`serve::REFUSAL_ROWS_BURST` at once,
/// `REFUSAL_ROWS_PER_SEC` after), answers the rest all the same without reading
/// their bodies, counts them, and sums them in rows of their own — before the
/// next refusal it records, or within a second once the flood stops — so every
/// refusal is accounted for, and an attacker no longer chooses how much the node
/// writes.
#[test]
fn refusals_beyond_the_ledgers_budget_are_summed_not_written_one_by_one() {
    use gw_sidecar::serve::{REFUSAL_ROWS_BURST, REFUSAL_ROWS_PER_SEC};
    let d = testkit::TempDir::new("peer-auth-budget");
    let ch = ClickHouse::start(d.path());
    let cfg = common::config_with_clickhouse(&d.path().join("state"), true, &ch);
    let s = common::serve(cfg);
    let anonymous = s.certs.client(None);
    let sent = 2 * REFUSAL_ROWS_BURST as usize;
    let started = std::time::Instant::now();
    let statuses: Vec<u16> = s.rt.block_on(async {
        let call = || {
            anonymous
                .post(format!("{}/api/rpc", s.base))
                .body(vec![b'q'; 1000])
                .send()
        };
        // One first, so that the rest share its HTTP/2 connection: a refused
        // peer holds few connections (`serve::MAX_REFUSED_PEERS`), and a
        // client opening one per request would see most closed unanswered.
        let first = call().await.unwrap().status().as_u16();
        let rest = futures_util::future::join_all((1..sent).map(|_| call())).await;
        std::iter::once(first)
            .chain(rest.into_iter().map(|r| r.unwrap().status().as_u16()))
            .collect()
    });
    let took = started.elapsed().as_secs_f64();
    assert!(statuses.iter().all(|&st| st == 401), "{statuses:?}");
    // The flood stops: what it owes is summed within a second or two, with no
    // other refusal to carry the sum.
    let metrics = s.get_ops("/metrics");
    let unrecorded: u64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("gw_sidecar_refusals_unrecorded_total{code=\"unauthenticated\"} ")
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    // The bucket, at most: the burst, and what refilled while the calls ran.
    let most = REFUSAL_ROWS_BURST + REFUSAL_ROWS_PER_SEC * took;
    assert!(
        (sent as f64 - most..=sent as f64 - REFUSAL_ROWS_BURST).contains(&(unrecorded as f64)),
        "{unrecorded} of {sent} unrecorded in {took:.2} s"
    );
    // Rows: one per refusal recorded, and the sums (before a refusal that found
    // room again while the calls ran, or written once they stopped).
    let recorded = sent - unrecorded as usize;
    let sum_of = |r: &gw_core::ledger::LedgerRow| {
        serde_json::from_str::<Value>(&r.args_json).ok()?["unrecorded"].as_u64()
    };
    let summed = |rows: &[gw_core::ledger::LedgerRow]| rows.iter().filter_map(sum_of).sum::<u64>();
    let rows = {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let rows = common::stored(&ch);
            if summed(&rows) >= unrecorded || std::time::Instant::now() > deadline {
                break rows;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    let sums: Vec<&gw_core::ledger::LedgerRow> =
        rows.iter().filter(|r| sum_of(r).is_some()).collect();
    assert_eq!(summed(&rows), unrecorded, "every refusal accounted for");
    assert_eq!(
        rows.len(),
        recorded + sums.len(),
        "one row each, and the sums"
    );
    for sum in &sums {
        assert_eq!(
            (sum.code.as_str(), sum.route.as_str()),
            ("unauthenticated", "")
        );
    }
    // One more refusal: recorded on its own, nothing owed before it.
    let (status, _) = call(&s, &anonymous, "GET", "/api/modules", &[], Vec::new());
    assert_eq!(status, 401);
    let rows = common::wait_rows(&ch, rows.len() + 1);
    assert_eq!(rows.last().unwrap().route, "/api/modules");
    assert_eq!(rows.len(), recorded + sums.len() + 1, "no sum before it");
    assert!(rows.iter().all(|r| r.code == "unauthenticated"));
    let metrics = s.get_ops("/metrics");
    assert!(
        metrics.contains(&format!(
            "gw_sidecar_decisions_total{{code=\"unauthenticated\"}} {}",
            sent + 1
        )),
        "{metrics}"
    );
}

#[test]
fn plain_http_only_on_loopback_and_only_when_asked_for() {
    let pk = hex::encode(testkit::fixtures::command_key().verifying_key().as_bytes());
    let load = |extra: &'static [(&'static str, &'static str)]| {
        let pk = pk.clone();
        Config::load(None, &move |k: &str| {
            if k == "CTRL_PUBKEY_HEX" {
                return Some(pk.clone());
            }
            if k == "GW_EDGE_KEY_HEX" {
                return Some(testkit::fixtures::EDGE_KEY_HEX.to_owned());
            }
            extra
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        })
    };
    let err = load(&[]).unwrap_err().to_string();
    assert!(err.contains("mutual TLS"), "{err}");
    let err = load(&[
        ("GW_SIDECAR_INSECURE_PLAINTEXT", "1"),
        ("GW_SIDECAR_LISTEN", "0.0.0.0:8080"),
    ])
    .unwrap_err()
    .to_string();
    assert!(err.contains("loopback"), "{err}");
    let ok = load(&[("GW_SIDECAR_INSECURE_PLAINTEXT", "1")]).unwrap();
    assert!(ok.file.insecure_plaintext && ok.file.tls.is_none());
}

/// Asserts that the sidecar closes `conn` (`what`) within `limit`, unanswered.
async fn closed_within<S>(conn: &mut S, limit: std::time::Duration, what: &str)
where
    S: tokio::io::AsyncRead + Unpin,
{
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(limit, conn.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{what} was held"));
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "{what}: closed, not answered: {n:?}"
    );
}

/// A peer that opens a connection and stalls — before its TLS handshake is done,
/// before its first bytes after it, or before its request's headers are done —
/// is dropped after `serve::HANDSHAKE_TIMEOUT`, not held (each would keep a task
/// and a file descriptor of the sidecar's for as long as it liked).
#[test]
fn a_peer_that_stalls_its_handshake_or_its_headers_is_dropped() {
    let d = testkit::TempDir::new("sidecar-stall");
    let s = common::serve(common::config(d.path(), false));
    let limit = gw_sidecar::serve::HANDSHAKE_TIMEOUT + std::time::Duration::from_secs(5);
    s.rt.block_on(async {
        let started = std::time::Instant::now();
        // TCP only: not one byte of a ClientHello.
        let mut silent = tokio::net::TcpStream::connect(s.base.trim_start_matches("https://"))
            .await
            .unwrap();
        // TLS done, then nothing (hyper would wait to tell HTTP/1.1 from HTTP/2).
        let mut idle = raw_tls(&s).await;
        // TLS done, then half a request line.
        let mut slow = raw_tls(&s).await;
        slow.write_all(b"GET /api/modules HTTP/1.1\r\nhost: loc")
            .await
            .unwrap();
        closed_within(&mut silent, limit, "a connection without a handshake").await;
        closed_within(&mut idle, limit, "a connection silent after its handshake").await;
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(limit, slow.read(&mut buf))
            .await
            .expect("a request without its headers was held");
        // hyper may answer 408 before it closes.
        if let Ok(n) = n {
            let got = String::from_utf8_lossy(&buf[..n]).to_string();
            assert!(n == 0 || got.starts_with("HTTP/1.1 408"), "{got}");
        }
        assert!(
            started.elapsed()
                >= gw_sidecar::serve::HANDSHAKE_TIMEOUT - std::time::Duration::from_secs(1),
            "dropped only once the time was up: {:?}",
            started.elapsed()
        );
    });
    // The sidecar still serves the edge.
    let (status, _) = call(&s, &s.http, "GET", "/api/modules", OPERATOR, Vec::new());
    assert_eq!(status, 200);
}

/// An anonymous TLS connection that sent one request and read its answer (a
/// 401): the status line's code, the connection left open (HTTP/1.1
/// keep-alive), or `None` when the sidecar closed it unanswered.
async fn refused_and_held(
    s: &common::Served,
) -> (
    Option<u16>,
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) {
    let mut c = raw_tls(s).await;
    c.write_all(b"GET /api/modules HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    // The whole answer: headers and the body its content-length gives.
    loop {
        let n = match tokio::time::timeout_at(deadline, c.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_owned())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= len {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&got).to_string();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok());
    (status, c)
}

/// A peer without the edge's certificate can only be refused, so the sidecar
/// holds few of its connections and not for long: at most
/// `serve::MAX_REFUSED_PEERS` at once (one more is closed unanswered and
/// counted), each for `serve::REFUSED_PEER_LIFETIME` at most. The edge is served
/// whatever they hold, and a place freed is taken again.
#[test]
fn connections_of_peers_that_are_only_refused_are_few_and_short() {
    use gw_sidecar::serve::{MAX_REFUSED_PEERS, REFUSED_PEER_LIFETIME};
    let d = testkit::TempDir::new("sidecar-refused-peers");
    let s = common::serve(common::config(d.path(), false));
    let started = std::time::Instant::now();
    let mut held = s.rt.block_on(async {
        let mut held = Vec::new();
        for i in 0..MAX_REFUSED_PEERS {
            let (status, c) = refused_and_held(&s).await;
            assert_eq!(status, Some(401), "connection {i}");
            held.push(c);
        }
        let (status, mut c) = refused_and_held(&s).await;
        assert_eq!(
            status, None,
            "one more than {MAX_REFUSED_PEERS}: closed unanswered"
        );
        closed_within(
            &mut c,
            std::time::Duration::from_secs(2),
            "the one too many",
        )
        .await;
        held
    });
    // The edge is served meanwhile.
    let (status, _) = call(&s, &s.http, "GET", "/api/modules", OPERATOR, Vec::new());
    assert_eq!(status, 200);
    let shed = s.get_ops("/metrics");
    assert!(
        shed.contains(
            r#"gw_sidecar_connections_shed_total{listener="main",reason="refused_peers"} 1"#
        ),
        "{shed}"
    );
    // A place freed is taken again.
    drop(held.pop());
    s.rt.block_on(async {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let (status, c) = refused_and_held(&s).await;
            if status == Some(401) {
                held.push(c);
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the freed place was not taken again"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        // Each is closed once its time is up.
        let left = (REFUSED_PEER_LIFETIME + std::time::Duration::from_secs(5))
            .saturating_sub(started.elapsed());
        for (i, c) in held.iter_mut().enumerate() {
            closed_within(c, left, &format!("refused peer's connection {i}")).await;
        }
        assert!(
            started.elapsed() >= REFUSED_PEER_LIFETIME - std::time::Duration::from_secs(1),
            "closed only once their time was up: {:?}",
            started.elapsed()
        );
    });
    let (status, _) = call(&s, &s.http, "GET", "/api/modules", OPERATOR, Vec::new());
    assert_eq!(status, 200);
}

/// Connections that never finish their handshake hold at most
/// `serve::MAX_HANDSHAKING` places: one more gives up the oldest, so a peer
/// keeping that many open and silent neither holds more nor keeps the edge from
/// opening a new connection.
#[test]
fn silent_connections_do_not_keep_the_edge_out() {
    use gw_sidecar::serve::MAX_HANDSHAKING;
    let d = testkit::TempDir::new("sidecar-handshaking");
    let s = common::serve(common::config(d.path(), false));
    let addr = s.base.trim_start_matches("https://").to_owned();
    s.rt.block_on(async {
        let mut silent = Vec::new();
        for _ in 0..MAX_HANDSHAKING {
            silent.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
        }
        // The edge, on a connection of its own (a new client: no pooled one).
        let edge = s
            .certs
            .client(Some((&s.certs.edge_cert, &s.certs.edge_key)));
        let mut r = edge.get(format!("{}/api/modules", s.base));
        for (k, v) in OPERATOR {
            r = r.header(*k, *v);
        }
        if let Some((k, v)) = testkit::fixtures::edge_seal(OPERATOR, "GET", "/api/modules") {
            r = r.header(k, v);
        }
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), r.send())
            .await
            .expect("the edge's new connection was held")
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        // The oldest silent connection was given up for it, at once.
        closed_within(
            &mut silent[0],
            std::time::Duration::from_secs(2),
            "the oldest silent connection",
        )
        .await;
    });
    let shed = s.get_ops("/metrics");
    assert!(
        shed.contains(
            r#"gw_sidecar_connections_shed_total{listener="main",reason="handshaking"} 1"#
        ),
        "{shed}"
    );
}

/// The edge checks each API route's role; the sidecar checks it again from its own
/// `routes` (the filter's table), so that a table loosened at the edge, or a
/// request forwarded with no token, reaches no data plane, model or ledger query.
/// Each refusal is a ledger row naming who was refused, and a flood of requests
/// with no token does not take the rows of a token holder's refusals.
#[test]
fn the_sidecar_checks_each_api_routes_role_again_and_records_every_refusal() {
    use gw_core::roles::RouteRule;
    let d = testkit::TempDir::new("api-roles");
    let ch = ClickHouse::start(d.path());
    let mut cfg = common::config_with_clickhouse(&d.path().join("state"), true, &ch);
    // The ledger's queries for a role of the operator's own (matched exactly), the
    // models' list for anyone the edge lets through.
    cfg.file.routes = vec![
        RouteRule::needs("/api/ledger/", "auditor"),
        RouteRule::needs("/api/realtime", "auditor"),
        RouteRule {
            prefix: "/api/models".into(),
            role: None,
            public: true,
        },
        RouteRule::needs("/api/", "operator"),
    ];
    let s = common::serve(cfg);
    let as_token = |roles: &str| {
        vec![
            ("x-gw-verified", "jwt".to_owned()),
            ("x-gw-sub", format!("holder-of-{roles}")),
            ("x-gw-roles", roles.to_owned()),
            ("x-gw-token-issuer", "tests".to_owned()),
        ]
    };
    let ask = |method: &str, path: &str, who: Option<&str>| {
        let head = who.map(as_token).unwrap_or_default();
        let head: Vec<(&str, &str)> = head.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let body = if method == "POST" {
            br#"{"jsonrpc":"2.0","id":1,"method":"getHealth"}"#.to_vec()
        } else {
            Vec::new()
        };
        let (status, b) = call(&s, &s.http, method, path, &head, body);
        (status, b["error"].as_str().unwrap_or("").to_owned())
    };
    let refused = |code: &str| {
        (
            if code == "jwt_missing" { 401 } else { 403 },
            code.to_owned(),
        )
    };
    // (method, path, roles (None: no token), refused with, requester recorded)
    let cases = [
        ("GET", "/api/ledger/history", None, Some("jwt_missing")),
        (
            "GET",
            "/api/ledger/history",
            Some("admin"),
            Some("forbidden_role"),
        ),
        ("GET", "/api/ledger/history", Some("viewer,auditor"), None),
        ("POST", "/api/rpc", None, Some("jwt_missing")),
        ("POST", "/api/rpc", Some("viewer"), Some("forbidden_role")),
        (
            "POST",
            "/api/opportunities",
            Some("viewer"),
            Some("forbidden_role"),
        ),
        ("GET", "/api/sender", Some("viewer"), Some("forbidden_role")),
        (
            "GET",
            "/api/modules",
            Some("viewer"),
            Some("forbidden_role"),
        ),
        (
            "POST",
            "/api/modules/mev/evaluate",
            Some("viewer"),
            Some("forbidden_role"),
        ),
        ("GET", "/api/models", None, None),
        ("POST", "/api/rpc", Some("operator"), None),
        ("GET", "/api/modules", Some("admin"), None),
    ];
    let mut rows_wanted = Vec::new();
    for (method, path, roles, refusal) in cases {
        let (status, code) = ask(method, path, roles);
        match refusal {
            Some(want) => {
                assert_eq!(
                    (status, code),
                    refused(want),
                    "{method} {path} as {roles:?}"
                );
                let sub = roles.map(|r| format!("holder-of-{r}")).unwrap_or_default();
                rows_wanted.push((want.to_owned(), path.to_owned(), sub));
            }
            None => assert!(
                !["jwt_missing", "forbidden_role"].contains(&code.as_str()) && status != 401,
                "{method} {path} as {roles:?}: {status} {code}"
            ),
        }
    }
    // Past the roles, this sidecar has no sender: its data plane refuses the
    // operator's call, and that refusal has its row too.
    rows_wanted.push((
        "unavailable".into(),
        "/api/rpc".into(),
        "holder-of-operator".into(),
    ));
    let rows = common::wait_rows(&ch, rows_wanted.len());
    let got: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r.code.clone(), r.route.clone(), r.requester.clone()))
        .collect();
    assert_eq!(got, rows_wanted, "one row per refusal, naming who");
    assert!(rows
        .iter()
        .all(|r| r.stage == "sidecar" && r.decision == "rejected"));
    let forbidden = rows.iter().find(|r| r.code == "forbidden_role").unwrap();
    assert_eq!(
        (
            forbidden.requester_roles.as_str(),
            forbidden.token_issuer.as_str()
        ),
        ("admin", "tests")
    );

    // Beyond the budget of refusals with no token: counted, not written — and a
    // token holder's refusal still has its row.
    let burst = gw_sidecar::serve::REFUSAL_ROWS_BURST as usize;
    // Asked until the budget ran out (at least its burst and 20 more: a slow
    // machine refills it meanwhile), counting the refusals.
    let unrecorded = |code: &str| {
        s.get_ops("/metrics").contains(&format!(
            "gw_sidecar_refusals_unrecorded_total{{code=\"{code}\"}}"
        ))
    };
    let flood = |code: &str, one: &dyn Fn()| {
        let mut n = 0;
        while n < burst + 20 || !unrecorded(code) {
            assert!(n < 20 * burst, "{n} refusals and the budget never ran out");
            for _ in 0..20 {
                one();
            }
            n += 20;
        }
        n
    };
    let flooded = flood("jwt_missing", &|| {
        assert_eq!(ask("GET", "/api/sender", None), refused("jwt_missing"));
    });
    assert_eq!(
        ask("GET", "/api/sender", Some("viewer")),
        refused("forbidden_role")
    );
    // (The flood's rows written as the budget refilled may land first.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let holders = loop {
        let rows = common::wait_rows(&ch, 0);
        let holders: Vec<String> = rows
            .iter()
            .filter(|r| r.route == "/api/sender" && !r.requester.is_empty())
            .map(|r| format!("{} {}", r.code, r.requester))
            .collect();
        if !holders.is_empty() || std::time::Instant::now() > deadline {
            break holders;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(
        holders,
        ["forbidden_role holder-of-viewer"],
        "the holder's refusal is written, past the flood's budget"
    );
    let metrics = s.get_ops("/metrics");
    assert!(
        metrics.contains("gw_sidecar_refusals_unrecorded_total{code=\"jwt_missing\"}"),
        "{metrics}"
    );
    // The flood stops: what had no row is summed within a second or two, and
    // every refusal without a token is accounted for.
    let sum_of = |r: &gw_core::ledger::LedgerRow| {
        let v: Value = serde_json::from_str(&r.args_json).ok()?;
        v["unrecorded"].as_u64()
    };
    let no_token = 2 + flooded as u64;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let rows = common::wait_rows(&ch, 0);
        let (summed, single): (Vec<_>, Vec<_>) = rows
            .iter()
            .filter(|r| r.code == "jwt_missing")
            .partition(|r| sum_of(r).is_some());
        let total = single.len() as u64 + summed.iter().filter_map(|r| sum_of(r)).sum::<u64>();
        if total == no_token {
            assert!(!summed.is_empty() && summed.iter().all(|r| r.route.is_empty()));
            break;
        }
        assert!(
            total < no_token && std::time::Instant::now() < deadline,
            "{total} of {no_token} refusals without a token accounted for"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // The stream's own check follows the table too: a role of the operator's
    // own opens it (here the request is no upgrade, so the stream refuses it as
    // malformed, past both role checks); viewer does not.
    assert_eq!(
        ask("GET", "/api/realtime", Some("viewer")),
        refused("forbidden_role")
    );
    assert_eq!(
        ask("GET", "/api/realtime", Some("auditor")),
        (400, "malformed".to_owned())
    );
    // The stream's own refusals take the token holders' budget too: a holder
    // who keeps asking writes at most its burst of rows.
    flood("malformed", &|| {
        assert_eq!(
            ask("GET", "/api/realtime", Some("auditor")),
            (400, "malformed".to_owned())
        );
    });
    let metrics = s.get_ops("/metrics");
    assert!(
        metrics.contains("gw_sidecar_refusals_unrecorded_total{code=\"malformed\"}"),
        "{metrics}"
    );
}
