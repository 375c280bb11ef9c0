//! The sidecar's control plane over real HTTP/2 (h2c, as Envoy speaks to it):
//! re-verification, the durable replay guard across a restart, the JSON route's
//! signing, module state applied by the agents over the embedded bus, metrics.

use std::path::Path;

use gw_core::Action;
use gw_sidecar::config::Config;
use serde_json::Value;
use testkit::fixtures::{command_key, signed_command};

mod common;
use common::now;

struct Sidecar(common::Served);

fn start(state_dir: &Path, with_signer: bool) -> Sidecar {
    Sidecar(common::serve(common::config(state_dir, with_signer)))
}

impl Sidecar {
    /// A JSON body goes as an admin's request stamped by the edge.
    fn post(&self, path: &str, ct: &str, body: Vec<u8>) -> (u16, Value) {
        // As the edge stamps a token with the command role.
        let req = common::as_admin(self.0.http.post(format!("{}{path}", self.0.base)));
        self.0.rt.block_on(async {
            let r = req
                .header("content-type", ct)
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.version(), reqwest::Version::HTTP_2);
            (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
        })
    }

    fn get(&self, path: &str) -> String {
        self.0.get_text(path)
    }
}

const PB: &str = "application/x-protobuf";

#[test]
fn signed_commands_apply_once_even_across_a_restart() {
    let d = testkit::TempDir::new("sidecar-http");
    let s = start(d.path(), false);
    let cmd = signed_command(
        1,
        Action::Throttle,
        now(),
        "dashboard",
        &[("throttle_pct", "25")],
    );
    let (status, body) = s.post("/api/control/commands", PB, cmd.clone());
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["ok"].clone(), body["request_id"].clone()),
        (Value::Bool(true), Value::from("req-1"))
    );
    assert_eq!(body["applied"], true, "the mev agent applied it: {body}");
    assert_eq!(body["state"]["throttle_pct"], 25);
    let modules: Value = serde_json::from_str(&s.get("/api/modules")).unwrap();
    assert_eq!(modules["mev"]["throttle_pct"], 25);
    assert_eq!(modules["arbitrage"]["throttle_pct"], 100);
    let (status, body) = s.post("/api/control/commands", PB, cmd.clone());
    assert_eq!((status, body["error"].as_str()), (409, Some("replay")));
    drop(s);

    // A new process over the same state directory still refuses the replay.
    let s = start(d.path(), false);
    let (status, body) = s.post("/api/control/commands", PB, cmd);
    assert_eq!((status, body["error"].as_str()), (409, Some("replay")));
    let modules: Value = serde_json::from_str(&s.get("/api/modules")).unwrap();
    assert_eq!(
        modules["mev"]["applied"], 1,
        "state survives; nothing applied twice"
    );
    assert_eq!(modules["mev"]["throttle_pct"], 25);

    // Rejections with codes.
    let mut flipped = signed_command(2, Action::Start, now(), "dashboard", &[]);
    let i = flipped.windows(4).position(|w| w == b"req-").unwrap();
    flipped[i] = b'X';
    assert_eq!(
        s.post("/api/control/commands", PB, flipped).1["error"],
        "bad_signature"
    );
    let stale = signed_command(3, Action::Start, now() - 120, "dashboard", &[]);
    assert_eq!(
        s.post("/api/control/commands", PB, stale).1["error"],
        "stale"
    );
    let kill = signed_command(4, Action::Kill, now(), "dashboard", &[]);
    let (status, body) = s.post("/api/control/module/mev:stop", PB, kill.clone());
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("route_mismatch"))
    );
    let (status, _) = s.post("/api/control/module/mev:kill", PB, kill);
    assert_eq!(status, 200);
    // Larger than max_body_bytes (4096 here): refused with its code, counted and
    // recorded like any refusal, on both routes.
    let (status, body) = s.post("/api/control/commands", PB, vec![0u8; 5000]);
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("too_large")),
        "{body}"
    );
    let (status, body) = s.post(
        "/api/control/module/mev:throttle",
        "application/json",
        vec![b' '; 5000],
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("too_large")),
        "{body}"
    );
    let metrics = s.0.get_ops("/metrics");
    assert!(
        metrics.contains("gw_sidecar_decisions_total{code=\"too_large\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gw_sidecar_decisions_total{code=\"replay\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gw_sidecar_decisions_total{code=\"accepted\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gw_sidecar_agent_total{module=\"mev\",outcome=\"applied\"} 1"),
        "{metrics}"
    );
    // One command, one batch of one.
    assert!(
        metrics.contains("gw_sidecar_agent_batch_deliveries_count{module=\"mev\"} 1"),
        "{metrics}"
    );
    // Four signatures checked in full (the replay, the flipped byte, the stale
    // command, the kill on the wrong route); the same kill bytes on the right route
    // were answered from that check, at admission and again at the agent.
    assert!(
        metrics.contains("gw_sidecar_signature_checks_total{how=\"verified\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gw_sidecar_signature_checks_total{how=\"remembered\"} 2"),
        "{metrics}"
    );
}

#[test]
fn json_route_signs_like_the_original_api() {
    let d = testkit::TempDir::new("sidecar-json");
    let s = start(d.path(), true);
    let (status, body) = s.post(
        "/api/control/module/mev:policy",
        "application/json",
        br#"{"ev_min": 0.25, "tip_ladder": [0.1, 0.2]}"#.to_vec(),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ok"], true);
    assert_eq!(
        body["request_id"].as_str().map(str::len),
        Some(36),
        "a UUID"
    );
    let modules: Value = serde_json::from_str(&s.get("/api/modules")).unwrap();
    assert_eq!(modules["mev"]["ev_min"], 0.25);
    assert_eq!(modules["mev"]["tip_ladder"], serde_json::json!([0.1, 0.2]));
    // Two quick JSON commands get distinct, increasing nonces: both apply.
    for _ in 0..2 {
        let (status, _) = s.post(
            "/api/control/module/arbitrage:start",
            "application/json",
            b"{}".to_vec(),
        );
        assert_eq!(status, 200);
    }
    let (status, body) = s.post(
        "/api/control/module/mev:throttle",
        "application/json",
        br#"{"throttle_pct": 140}"#.to_vec(),
    );
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_args")));
    let (status, body) = s.post(
        "/api/control/module/mev:stop",
        "application/json",
        br#"{"kill": true}"#.to_vec(),
    );
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_args")));
    let (status, body) = s.post(
        "/api/control/module/hft:stop",
        "application/json",
        b"{}".to_vec(),
    );
    assert_eq!((status, body["error"].as_str()), (400, Some("malformed")));
    // A route that is not UTF-8 once decoded: the same shape and code (axum's
    // own answer was plain text, with no row).
    let (status, body) = s.post(
        "/api/control/module/%FF:stop",
        "application/json",
        b"{}".to_vec(),
    );
    assert_eq!((status, body["error"].as_str()), (400, Some("malformed")));

    // Without CTRL_SIGN_SK_HEX the JSON route cannot sign: 503, clearly.
    let d2 = testkit::TempDir::new("sidecar-nosigner");
    let s2 = start(d2.path(), false);
    let (status, body) = s2.post(
        "/api/control/module/mev:start",
        "application/json",
        b"{}".to_vec(),
    );
    assert_eq!((status, body["error"].as_str()), (503, Some("unavailable")));
}

#[test]
fn configuration_errors_are_clear() {
    let none = |_: &str| None;
    let err = Config::load(None, &none).unwrap_err().to_string();
    assert!(err.contains("no command keys"), "{err}");
    let bad = |k: &str| (k == "CTRL_PUBKEY_HEX").then(|| "zz".to_string());
    assert!(Config::load(None, &bad)
        .unwrap_err()
        .to_string()
        .contains("CTRL_PUBKEY_HEX"));
    let short = |k: &str| (k == "CTRL_SIGN_SK_HEX").then(|| "abcd".to_string());
    let err = Config::load(None, &short).unwrap_err().to_string();
    assert!(
        err.contains("32 bytes") && !err.contains("abcd"),
        "never echo secrets: {err}"
    );
    let example_path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.json"));
    // The example with a command key in place of its placeholder.
    let d = testkit::TempDir::new("config-errors");
    let mut example: serde_json::Value =
        serde_json::from_slice(&std::fs::read(example_path).unwrap()).unwrap();
    example["command_keys"]["keys"][0]["public_key_hex"] =
        hex::encode(command_key().verifying_key().as_bytes()).into();
    let path = &d.path().join("sidecar.json");
    std::fs::write(path, example.to_string()).unwrap();
    // No key to check the edge's seal with: no stamp could be believed.
    let err = Config::load(Some(path), &none).unwrap_err().to_string();
    assert!(
        err.contains("no edge key") && err.contains("GW_EDGE_KEY_HEX"),
        "{err}"
    );
    let bad_edge_key = "ab".repeat(31);
    let short = |k: &str| (k == "GW_EDGE_KEY_HEX").then(|| bad_edge_key.clone());
    let err = Config::load(Some(path), &short).unwrap_err().to_string();
    assert!(
        err.contains("GW_EDGE_KEY_HEX") && err.contains("32 bytes") && !err.contains(&bad_edge_key),
        "never echo secrets: {err}"
    );
    let edge_key =
        |k: &str| (k == "GW_EDGE_KEY_HEX").then(|| testkit::fixtures::EDGE_KEY_HEX.to_owned());
    let bad_prev = |k: &str| match k {
        "GW_EDGE_KEY_PREV_HEX" => Some("zz".repeat(32)),
        _ => edge_key(k),
    };
    let err = Config::load(Some(path), &bad_prev).unwrap_err().to_string();
    assert!(
        err.contains("GW_EDGE_KEY_PREV_HEX") && !err.contains("zzzz"),
        "{err}"
    );
    // The example's command key is a placeholder, refused as such: it was a key
    // of a known seed, trusted by whoever kept the example's keys.
    let err = Config::load(Some(example_path), &edge_key)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("op-admin-1") && err.contains("placeholder"),
        "{err}"
    );
    assert_eq!(
        Config::load(Some(path), &edge_key).unwrap().keyring.len(),
        1
    );
    // CTRL_PUBKEY_HEX replaces the file's key of the same id (before the file's
    // keys are read).
    let pk = hex::encode(command_key().verifying_key().as_bytes());
    let env = |k: &str| {
        (k == "CTRL_PUBKEY_HEX")
            .then(|| pk.clone())
            .or_else(|| edge_key(k))
    };
    let merged = Config::load(Some(example_path), &env).unwrap();
    assert_eq!(merged.keyring.len(), 1);
    assert_eq!(
        *merged.keyring.get("op-admin-1").unwrap().key(),
        command_key().verifying_key()
    );

    // Secrets from files (`_FILE`): read, trailing newline cut; a file others may
    // read is warned of; both a variable and its file is refused.
    use std::os::unix::fs::PermissionsExt as _;
    let sk_file = d.path().join("sign.sk.hex");
    std::fs::write(
        &sk_file,
        format!("{}\n", hex::encode(command_key().to_bytes())),
    )
    .unwrap();
    std::fs::set_permissions(&sk_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let sk_path = sk_file.display().to_string();
    let from_file = |k: &str| match k {
        "CTRL_SIGN_SK_HEX_FILE" => Some(sk_path.clone()),
        _ => edge_key(k),
    };
    let c = Config::load(Some(path), &from_file).unwrap();
    assert_eq!(
        c.signer
            .as_ref()
            .map(|(k, id)| (k.verifying_key(), id.as_str())),
        Some((command_key().verifying_key(), "op-admin-1"))
    );
    assert!(
        c.warnings.len() == 1
            && c.warnings[0].contains("CTRL_SIGN_SK_HEX_FILE")
            && c.warnings[0].contains("chmod 600"),
        "{:?}",
        c.warnings
    );
    std::fs::set_permissions(&sk_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(Config::load(Some(path), &from_file)
        .unwrap()
        .warnings
        .is_empty());
    let both = |k: &str| match k {
        "CTRL_SIGN_SK_HEX" => Some(hex::encode(command_key().to_bytes())),
        _ => from_file(k),
    };
    let err = Config::load(Some(path), &both).unwrap_err().to_string();
    assert!(
        err.contains("not both") && !err.contains(&hex::encode(command_key().to_bytes())),
        "{err}"
    );
    std::fs::write(&sk_file, "not a key\n").unwrap();
    let err = Config::load(Some(path), &from_file)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("CTRL_SIGN_SK_HEX") && !err.contains("not a key"),
        "{err}"
    );
    // The sidecar's TLS from the environment: all three or none (one alone was
    // silently ignored).
    let partial = |k: &str| match k {
        "GW_SIDECAR_TLS_CERT" => Some("/x/cert.pem".to_owned()),
        _ => edge_key(k),
    };
    let err = Config::load(Some(path), &partial).unwrap_err().to_string();
    assert!(err.contains("together"), "{err}");
    // The state key and the previous edge key from files too (a Kafka cluster's
    // nodes and an edge-key rotation kept no secret in the environment).
    let state_file = d.path().join("state.sk.hex");
    let prev_file = d.path().join("edge-prev.hex");
    std::fs::write(&state_file, format!("{}\n", hex::encode([5u8; 32]))).unwrap();
    std::fs::write(&prev_file, format!("{}\n", hex::encode([6u8; 32]))).unwrap();
    for f in [&state_file, &prev_file] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let (state_path, prev_path) = (
        state_file.display().to_string(),
        prev_file.display().to_string(),
    );
    let files = |k: &str| match k {
        "GW_STATE_SK_HEX_FILE" => Some(state_path.clone()),
        "GW_EDGE_KEY_PREV_FILE" => Some(prev_path.clone()),
        _ => edge_key(k),
    };
    let c = Config::load(Some(path), &files).unwrap();
    assert_eq!(
        c.state_key
            .as_ref()
            .map(ed25519_dalek::SigningKey::to_bytes),
        Some([5u8; 32])
    );
    assert!(c.edge_key_prev.is_some());
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

/// One sidecar per state directory: a second one started on the directory whose
/// journal a running sidecar writes refuses to start (after the lock's wait, with
/// a message that says why), and the first one goes on serving (`--probe`) and
/// taking commands (`--probe-ready`).
#[test]
fn a_second_sidecar_on_the_same_state_dir_refuses_to_start() {
    let d = testkit::TempDir::new("second-sidecar");
    let ops = testkit::free_port();
    let mut first = testkit::ProcessGuard::spawn(
        "gw-sidecar",
        &mut common::plain_sidecar(d.path(), ops),
        &d.path().join("first.log"),
    );
    assert!(testkit::wait_tcp(ops, std::time::Duration::from_secs(20)));
    let mut second = common::plain_sidecar(d.path(), testkit::free_port())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while second.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = second.kill();
            panic!("a second sidecar on the same state directory kept running");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let second = second.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&second.stdout),
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(!second.status.success(), "{text}");
    assert!(text.contains("in use by another process"), "{text}");
    first.assert_running();
    let probe = std::process::Command::new(env!("CARGO_BIN_EXE_gw-sidecar"))
        .args(["--probe", &format!("127.0.0.1:{ops}")])
        .output()
        .unwrap();
    assert!(probe.status.success(), "the first still serves: {probe:?}");
    // And takes commands (`/readyz`).
    let ready = std::process::Command::new(env!("CARGO_BIN_EXE_gw-sidecar"))
        .args(["--probe-ready", &format!("127.0.0.1:{ops}")])
        .output()
        .unwrap();
    assert!(ready.status.success(), "the first is ready: {ready:?}");
}

/// `gw-sidecar --check` with the Kafka bus: the node's state key must be the one
/// `kafka.state_keys` gives it; a list that leaves it out or names another key is
/// refused with the node's public key (never the secret), and a key still to be
/// made is said so, not made.
#[test]
fn the_state_key_list_must_name_this_node_with_its_key() {
    let d = testkit::TempDir::new("sidecar-state-keys");
    let seed = [0x33u8; 32];
    let mine = hex::encode(
        ed25519_dalek::SigningKey::from_bytes(&seed)
            .verifying_key()
            .as_bytes(),
    );
    let other = hex::encode(command_key().verifying_key().as_bytes());
    let check = |keys: serde_json::Value, env_key: Option<&str>| {
        let file = d.path().join("sidecar.json");
        let cfg = serde_json::json!({
            "node_id": "node-a",
            "state_dir": d.path().join("state"),
            "kafka": {"brokers": "127.0.0.1:1", "state_keys": keys},
        });
        std::fs::write(&file, cfg.to_string()).unwrap();
        let mut cmd = common::plain_sidecar(d.path(), testkit::free_port());
        cmd.arg("--config").arg(&file).arg("--check");
        if let Some(k) = env_key {
            cmd.env("GW_STATE_SK_HEX", k);
        }
        let o = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.success(), text)
    };
    let secret = hex::encode(seed);
    let (ok, text) = check(serde_json::json!({}), None);
    assert!(
        ok && text.contains("state key made at the first start"),
        "{text}"
    );
    assert!(
        !d.path().join("state/state.sk.hex").exists(),
        "--check makes nothing"
    );
    let (ok, text) = check(serde_json::json!({"node-b": other}), Some(&secret));
    assert!(
        !ok && text.contains("must list this node `node-a`") && text.contains(&mine),
        "{text}"
    );
    assert!(!text.contains(&secret), "never the secret: {text}");
    let (ok, text) = check(serde_json::json!({"node-a": other}), Some(&secret));
    assert!(!ok && text.contains("another key"), "{text}");
    let (ok, text) = check(
        serde_json::json!({"node-a": mine, "node-b": other}),
        Some(&secret),
    );
    assert!(
        ok && text.contains(&format!("state key {mine}, 2 node(s) trusted")),
        "{text}"
    );
    let (ok, text) = check(serde_json::json!({"node-a": "zz"}), Some(&secret));
    assert!(!ok && text.contains("kafka.state_keys"), "{text}");
    let (ok, text) = check(serde_json::json!({}), Some("abcd"));
    assert!(
        !ok && text.contains("GW_STATE_SK_HEX") && !text.contains("abcd"),
        "{text}"
    );
}

/// The sidecar signs the JSON route's commands itself, so it checks the token's
/// role too: a request the edge did not stamp, or stamped for a token without the
/// command role, is refused, counted and recorded (the edge's row, then the
/// sidecar's refusal, with who asked), and nothing is signed.
#[test]
fn the_json_route_needs_the_command_role_from_the_edge() {
    let d = testkit::TempDir::new("sidecar-json-role");
    let ch = testkit::clickhouse::ClickHouse::start(d.path());
    let s = common::serve(common::config_with_clickhouse(
        &d.path().join("state"),
        true,
        &ch,
    ));
    let send = |stamp: Option<&str>| -> (u16, Value) {
        let req = s
            .http
            .post(format!("{}/api/control/module/mev:kill", s.base))
            .header("content-type", "application/json")
            .body("{}");
        let req = match stamp {
            Some(roles) => common::as_role(req, roles),
            None => req,
        };
        s.rt.block_on(async {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
        })
    };
    let (status, body) = send(None);
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("jwt_missing")),
        "{body}"
    );
    for roles in ["viewer", "", "operator-admin"] {
        let (status, body) = send(Some(roles));
        assert_eq!(
            (status, body["error"].as_str()),
            (403, Some("forbidden_role")),
            "{roles}: {body}"
        );
        assert!(
            body["detail"].as_str().unwrap().contains("`admin`"),
            "{body}"
        );
    }
    let modules = s.get_json("/api/modules");
    assert_eq!(
        modules["mev"]["applied"], 0,
        "nothing was signed: {modules}"
    );
    let metrics = s.get_ops("/metrics");
    for (code, n) in [("jwt_missing", 1), ("forbidden_role", 3)] {
        let line = format!("gw_sidecar_decisions_total{{code=\"{code}\"}} {n}");
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
    // The role ladder as at the edge: admin, and several roles with it, pass.
    let (status, body) = send(Some("viewer, admin"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(s.get_json("/api/modules")["mev"]["applied"], 1);
    // The rows: the unstamped request's refusal claims no edge and no one; each
    // stamped one has the edge's row and the refusal, both naming who asked.
    let rows = common::wait_rows(&ch, 1 + 3 * 2 + 3);
    assert_eq!(gw_core::ledger::verify_chain(&rows), Ok(rows.len() as u64));
    let of = |code: &str| rows.iter().filter(|r| r.code == code).collect::<Vec<_>>();
    let missing = of("jwt_missing");
    assert_eq!(missing.len(), 1);
    assert!(missing[0].requester.is_empty() && missing[0].stage == "sidecar");
    let forbidden = of("forbidden_role");
    assert_eq!(forbidden.len(), 3);
    assert!(forbidden
        .iter()
        .all(|r| r.stage == "sidecar" && r.requester.contains("operator-1")));
    assert_eq!(
        rows.iter().filter(|r| r.stage == "edge").count(),
        4,
        "{rows:#?}"
    );
}

/// A signed command that reached the sidecar as another route's request (the edge
/// stamped `x-gw-verified: jwt`: it checked the token for that route, not the
/// command's body nor the command role) needs the command role all the same, and
/// the ledger does not record the edge as having accepted it.
#[test]
fn a_signed_command_the_edge_did_not_verify_needs_the_command_role() {
    let d = testkit::TempDir::new("sidecar-signed-role");
    let ch = testkit::clickhouse::ClickHouse::start(d.path());
    let s = common::serve(common::config_with_clickhouse(
        &d.path().join("state"),
        false,
        &ch,
    ));
    let send = |nonce: u64, roles: &str| -> (u16, Value) {
        let body = signed_command(nonce, Action::Start, now(), "dashboard", &[]);
        let req = s
            .http
            .post(format!("{}/api/control/commands", s.base))
            .header("content-type", "application/x-protobuf")
            .body(body);
        s.rt.block_on(async {
            let r = common::as_role(req, roles).send().await.unwrap();
            (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
        })
    };
    let (status, body) = send(1, "operator");
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("forbidden_role")),
        "{body}"
    );
    assert_eq!(s.get_json("/api/modules")["mev"]["applied"], 0);
    let (status, body) = send(2, "admin");
    assert_eq!(
        (status, body["applied"].clone()),
        (200, Value::Bool(true)),
        "{body}"
    );
    // Rows: the refused one's refusal, and the admitted one's acceptance, by
    // the sidecar alone (the edge checked only the token), and its application.
    let rows = common::wait_rows(&ch, 3);
    assert_eq!(gw_core::ledger::verify_chain(&rows), Ok(rows.len() as u64));
    let got = common::row_summary(&rows);
    assert_eq!(
        got,
        vec![
            ("sidecar", "rejected", "forbidden_role", "req-1"),
            ("sidecar", "accepted", "", "req-2"),
            ("agent", "applied", "", "req-2"),
        ],
        "{rows:#?}"
    );
}

/// The JSON route with an `Idempotency-Key`: a retry of the request (its client
/// timed out, say) is not signed and applied again — it is answered with what
/// became of the first (409 `replay`, `applied`, the first's request id) — while
/// another key, or another requester's same key, is another command.
#[test]
fn a_json_request_retried_with_its_idempotency_key_is_applied_once() {
    let d = testkit::TempDir::new("sidecar-json-idem");
    let ch = testkit::clickhouse::ClickHouse::start(d.path());
    let s = common::serve(common::config_with_clickhouse(
        &d.path().join("state"),
        true,
        &ch,
    ));
    let send_body = |key: Option<&[u8]>, sub: &str, body: &'static str| -> (u16, Value) {
        let mut req = common::stamped(
            s.http
                .post(format!("{}/api/control/module/mev:throttle", s.base))
                .header("content-type", "application/json"),
            &[
                ("x-gw-verified", "jwt"),
                ("x-gw-sub", sub),
                ("x-gw-roles", "admin"),
            ],
        )
        .body(body);
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        s.rt.block_on(async {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
        })
    };
    let send = |key: Option<&[u8]>, sub: &str| send_body(key, sub, r#"{"throttle_pct": 40}"#);
    let applied = || s.get_json("/api/modules")["mev"]["applied"].clone();
    let (status, first) = send(Some(b"order-42"), "alice");
    assert_eq!(
        (status, first["applied"].clone()),
        (200, Value::Bool(true)),
        "{first}"
    );
    let (status, again) = send(Some(b"order-42"), "alice");
    assert_eq!(
        (
            status,
            again["error"].as_str(),
            again["applied"].clone(),
            again["request_id"].clone()
        ),
        (
            409,
            Some("replay"),
            Value::Bool(true),
            first["request_id"].clone()
        ),
        "{again}"
    );
    assert_eq!(applied(), 1);
    // Another request under the same key: refused, not taken for a retry.
    let (status, body) = send_body(Some(b"order-42"), "alice", r#"{"throttle_pct": 41}"#);
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("bad_args")),
        "{body}"
    );
    assert_eq!(applied(), 1);
    // Another key, and the same key from another requester: other commands.
    assert_eq!(send(Some(b"order-43"), "alice").0, 200);
    assert_eq!(send(Some(b"order-42"), "bob").0, 200);
    assert_eq!(applied(), 3);
    // No key: each request is its own command, as in the original API.
    assert_eq!(send(None, "alice").0, 200);
    assert_eq!(send(None, "alice").0, 200);
    assert_eq!(applied(), 5);
    // A key that is not 1–128 visible ASCII characters is refused, and audited.
    let (status, body) = send(Some(b"has space"), "alice");
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("bad_args")),
        "{body}"
    );
    assert_eq!(applied(), 5);
    let rows = common::wait_rows(&ch, 1);
    assert_eq!(gw_core::ledger::verify_chain(&rows), Ok(rows.len() as u64));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let rows = common::stored(&ch);
        let refusals: Vec<&str> = rows
            .iter()
            .filter(|r| r.stage == "sidecar" && r.decision == "rejected")
            .map(|r| r.code.as_str())
            .collect();
        if refusals == ["replay", "bad_args", "bad_args"] {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{refusals:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The retry's refusal comes after the edge's row of the JSON body it sent, as
    // the first request's acceptance does: both name the first's request id.
    let rows = common::stored(&ch);
    let id = first["request_id"].as_str().unwrap();
    let of_first: Vec<(&str, &str, &str)> = rows
        .iter()
        .filter(|r| r.request_id == id)
        .map(|r| (r.stage.as_str(), r.decision.as_str(), r.code.as_str()))
        .collect();
    assert_eq!(
        of_first,
        [
            ("edge", "accepted", ""),
            ("sidecar", "accepted", ""),
            ("agent", "applied", ""),
            ("edge", "accepted", ""),
            ("sidecar", "rejected", "replay"),
        ],
        "{rows:#?}"
    );
    let json = hex::encode(r#"{"throttle_pct": 40}"#);
    assert!(rows
        .iter()
        .filter(|r| r.request_id == id && r.stage == "edge")
        .all(|r| r.raw_hex == json));
}

/// Once the replay guard forgot a key's command (its freshness passed: 3 s
/// here), the agents still remember its nonce: the same request sent again is a
/// duplicate, answered with what became of it; another request under the key
/// (a kill where a start was sent) is refused `replay` and not applied. It was
/// answered `"applied": true` with the module still running.
#[test]
fn another_request_under_a_key_the_guard_forgot_is_refused_not_answered_applied() {
    let d = testkit::TempDir::new("sidecar-json-idem-late");
    let ch = testkit::clickhouse::ClickHouse::start(d.path());
    let mut cfg = common::config_with_clickhouse(&d.path().join("state"), true, &ch);
    // 3 s: the kill's refusal and its resend must both meet the guard's entry
    // (kept until the second after its freshness ends).
    cfg.file.max_skew_secs = 3;
    let s = common::serve(cfg);
    let send = |action: &str| -> (u16, Value) {
        let req = common::stamped(
            s.http
                .post(format!("{}/api/control/module/mev:{action}", s.base))
                .header("content-type", "application/json"),
            &[
                ("x-gw-verified", "jwt"),
                ("x-gw-sub", "alice"),
                ("x-gw-roles", "admin"),
            ],
        )
        .header("idempotency-key", "nightly-1");
        s.rt.block_on(async {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
        })
    };
    let (status, first) = send("start");
    assert_eq!(
        (status, &first["applied"]),
        (200, &Value::Bool(true)),
        "{first}"
    );
    // Past the command's freshness (3 s, and a second of rounding).
    std::thread::sleep(std::time::Duration::from_millis(4_600));
    let (status, kill) = send("kill");
    assert_eq!(
        (
            status,
            &kill["applied"],
            kill["apply_error"]["error"].as_str()
        ),
        (200, &Value::Bool(false), Some("replay")),
        "{kill}"
    );
    // The kill sent again (its client timed out, say): told why, at once.
    let (status, again) = send("kill");
    assert_eq!(
        (
            status,
            again["error"].as_str(),
            again["apply_error"]["error"].as_str()
        ),
        (409, Some("replay"), Some("replay")),
        "{again}"
    );
    let module = s.get_json("/api/modules")["mev"].clone();
    assert_eq!(
        (&module["state"], &module["applied"]),
        (&Value::from("running"), &Value::from(1)),
        "{module}"
    );
    // The same request again, once the guard forgot the kill too (until then it
    // says the key was used for another request): what became of it.
    std::thread::sleep(std::time::Duration::from_millis(4_600));
    let (status, again) = send("start");
    assert_eq!(
        (status, &again["applied"], &again["request_id"]),
        (200, &Value::Bool(true), &first["request_id"]),
        "{again}"
    );
    // A token that expired (beyond the edge's leeway) before the request's body
    // came: refused, not signed.
    let expired = (common::now() - 100).to_string();
    let req = common::stamped(
        s.http
            .post(format!("{}/api/control/module/mev:stop", s.base))
            .header("content-type", "application/json"),
        &[
            ("x-gw-verified", "jwt"),
            ("x-gw-sub", "alice"),
            ("x-gw-roles", "admin"),
            ("x-gw-token-exp", &expired),
        ],
    )
    .body("{}");
    let (status, body) = s.rt.block_on(async {
        let r = req.send().await.unwrap();
        (
            r.status().as_u16(),
            r.json::<Value>().await.unwrap_or(Value::Null),
        )
    });
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("jwt_expired")),
        "{body}"
    );
    // The kill's refusal is in the ledger.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let id = kill["request_id"].as_str().unwrap().to_owned();
    loop {
        let rows = common::stored(&ch);
        if rows
            .iter()
            .any(|r| r.request_id == id && r.stage == "agent" && r.code == "replay")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no agent row for {id}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A JSON request the admission refuses (the signer's key may sign for `mev`
/// only) keeps the edge's row of the JSON body it sent, before its refusal, both
/// naming the request id the command was given — as an admitted request's rows do.
#[test]
fn a_json_request_refused_at_admission_keeps_the_edges_row_of_its_body() {
    let d = testkit::TempDir::new("sidecar-json-refused");
    let ch = testkit::clickhouse::ClickHouse::start(d.path());
    let mut cfg = common::config_with_clickhouse(&d.path().join("state"), true, &ch);
    let pk = hex::encode(command_key().verifying_key().as_bytes());
    let ring: gw_core::keyring::KeyRingConfig = serde_json::from_value(serde_json::json!(
        {"keys": [{"id": "op-admin-1", "public_key_hex": pk, "modules": ["mev"]}]}
    ))
    .unwrap();
    cfg.keyring = gw_core::KeyRing::from_config(&ring).unwrap();
    let s = common::serve(cfg);
    let body = serde_json::json!({});
    let (status, answer) = s.post_json("/api/control/module/arbitrage:start", &body);
    assert_eq!(
        (status, answer["error"].as_str()),
        (403, Some("key_scope")),
        "{answer}"
    );
    let rows = common::wait_rows(&ch, 2);
    let got: Vec<(&str, &str, &str, &str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r.stage.as_str(),
                r.decision.as_str(),
                r.code.as_str(),
                r.module.as_str(),
                r.action.as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("edge", "accepted", "", "arbitrage", "start"),
            ("sidecar", "rejected", "key_scope", "arbitrage", "start"),
        ],
        "{rows:#?}"
    );
    assert_eq!(rows[0].raw_hex, hex::encode(body.to_string()));
    assert!(!rows[0].request_id.is_empty() && rows[0].request_id == rows[1].request_id);
}

/// The console posts signed commands where the edge takes them: the configured
/// `command_path` (the filter's) is written into the page, which reads it.
#[test]
fn the_console_page_names_the_edges_command_path() {
    let d = testkit::TempDir::new("console-path");
    let mut cfg = common::config(&d.path().join("state"), false);
    cfg.file.command_path = "/ops/commands".into();
    let s = common::serve(cfg);
    let page = s.get_text("/");
    assert!(
        page.contains(r#"<meta name="gw-command-path" content="/ops/commands">"#),
        "{page}"
    );
    assert!(!page.contains("/api/control/commands"), "{page}");
    let script = s.get_text("/console.js");
    assert!(script.contains(r#"meta[name="gw-command-path"]"#));
}

/// `/readyz` says whether a command sent now could be accepted. 200 while all is
/// well; with the journal's disk failing its syncs (a FUSE filesystem: the
/// kernel's own EIO) a command is refused 503 and `/readyz` answers 503 naming
/// the journal; once the disk heals it answers 200 again before any command
/// arrives (it tries the disk itself), and the next command applies.
/// ClickHouse stopped while rows wait makes it `degraded`, still 200; started
/// again, not degraded.
#[test]
fn readiness_follows_the_journal_disk_and_clickhouse() {
    use std::time::{Duration, Instant};
    let d = testkit::TempDir::new("readyz");
    let mut ch = testkit::clickhouse::ClickHouse::start(d.path());
    let state = d.path().join("state");
    let disk = testkit::faultfs::FaultFs::mount(&state.join("journal"))
        .expect("the readiness test mounts a FUSE filesystem (needs root and /dev/fuse)");
    let s = common::serve(common::config_with_clickhouse(&state, false, &ch));
    let check = |v: &Value, name: &str| {
        v["checks"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == name))
            .cloned()
            .unwrap_or(Value::Null)
    };
    // A check's `ok`, `refusing` and detail ("" without one).
    let said = |v: &Value, name: &str| {
        let c = check(v, name);
        (
            c["ok"] == true,
            c["refusing"] == true,
            c["detail"].as_str().unwrap_or_default().to_owned(),
        )
    };
    // Until `f` holds of /readyz's answer, for at most `secs`.
    let until = |secs: u64, f: &dyn Fn(u16, &Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let (status, v) = s.get_ops_json("/readyz");
            if f(status, &v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{status} {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let throttle = |n: u64, pct: &str| {
        s.post_command(signed_command(
            n,
            Action::Throttle,
            now(),
            "dashboard",
            &[("throttle_pct", pct)],
        ))
    };
    let (status, v) = s.get_ops_json("/readyz");
    assert_eq!(
        (status, &v["ready"], &v["degraded"]),
        (200, &Value::Bool(true), &Value::Bool(false)),
        "{v}"
    );
    let names: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["journal", "bus", "ledger"]);

    disk.fail_syncs();
    let (status, body) = throttle(1, "40");
    assert_eq!(status, 503, "{body}");
    let (status, v) = s.get_ops_json("/readyz");
    assert_eq!((status, &v["ready"]), (503, &Value::Bool(false)), "{v}");
    let (ok, refusing, detail) = said(&v, "journal");
    assert!(!ok && refusing && detail.contains("still fails"), "{v}");
    // `gw-sidecar --probe-ready` fails, saying why.
    let probe = std::process::Command::new(env!("CARGO_BIN_EXE_gw-sidecar"))
        .args(["--probe-ready", s.ops_base.trim_start_matches("http://")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&probe.stderr);
    assert!(
        !probe.status.success() && err.contains("503") && err.contains("still fails"),
        "{probe:?}"
    );
    // Nothing writes the journal meanwhile: the try of the disk finds it healed.
    disk.heal();
    let v = until(10, &|status, _| status == 200);
    let (ok, _, detail) = said(&v, "journal");
    assert!(
        ok && detail.contains("takes a write and a sync again"),
        "{v}"
    );
    let (status, body) = throttle(2, "50");
    assert_eq!(
        (status, &body["applied"]),
        (200, &Value::Bool(true)),
        "{body}"
    );
    let (_, v) = s.get_ops_json("/readyz");
    assert_eq!(
        check(&v, "journal"),
        serde_json::json!({"name": "journal", "ok": true, "refusing": false})
    );

    // ClickHouse away: rows wait in the journal, commands go on.
    let (http, tcp) = (ch.http_port, ch.tcp_port);
    ch.process.stop();
    let (status, body) = throttle(3, "60");
    assert_eq!(status, 200, "{body}");
    let v = until(30, &|_, v| v["degraded"] == true);
    assert_eq!(v["ready"], true, "{v}");
    let (ok, refusing, detail) = said(&v, "ledger");
    assert!(
        !ok && !refusing && detail.starts_with("rows are not reaching ClickHouse"),
        "{v}"
    );
    let ledger = check(&v, "ledger");
    assert!(ledger["rows"].as_u64().is_some_and(|n| n >= 1), "{v}");
    assert_eq!(ledger["needs_operator"], false, "{v}");
    let _ch = testkit::clickhouse::ClickHouse::start_at(d.path(), http, tcp);
    let v = until(60, &|status, v| status == 200 && v["degraded"] == false);
    assert_eq!(check(&v, "ledger")["ok"], true, "{v}");
    drop(s);
    drop(disk);
}

/// The wall clock stepped back across a restart does not make a forgotten
/// command fresh again. The real `gw-sidecar` binary applies a command; its nonce
/// expires, and later commands fill and then release the journal segment that
/// held it; the process is killed (`kill -9`) and started again with its clock
/// reading the command's own time (libfaketime in front of the binary, from the
/// test venv). The same bytes sent again are refused `stale` — judged at the
/// replay guards' durable clock floor — and nothing is applied twice. Before the
/// floor they were fresh and unknown to the guard: accepted and applied again.
#[test]
fn a_clock_stepped_back_across_a_restart_replays_nothing() {
    use std::time::{Duration, Instant};

    let d = testkit::TempDir::new("clock-back");
    let faketime = {
        let o = std::process::Command::new(testkit::venv_bin("python"))
            .args([
                "-c",
                "import libfaketime, os; print(os.path.join(os.path.dirname(libfaketime.__file__), 'vendor', 'libfaketime', 'src', 'libfaketime.so.1'))",
            ])
            .output()
            .unwrap();
        std::path::PathBuf::from(String::from_utf8(o.stdout).unwrap().trim())
    };
    assert!(
        faketime.is_file(),
        "libfaketime in the test venv: {faketime:?}"
    );
    let state = d.path().join("state");
    let file = d.path().join("sidecar.json");
    std::fs::write(
        &file,
        serde_json::json!({
            "state_dir": state,
            "max_skew_secs": 5,
            "agent_dedup_secs": 0,
            "journal_segment_bytes": 65536,
        })
        .to_string(),
    )
    .unwrap();
    let (port, ops) = (testkit::free_port(), testkit::free_port());
    let sidecar = |name: &str, behind_secs: Option<u64>| {
        let mut cmd = common::plain_sidecar(d.path(), ops);
        cmd.env("GW_SIDECAR_LISTEN", format!("127.0.0.1:{port}"))
            .arg("--config")
            .arg(&file);
        if let Some(s) = behind_secs {
            cmd.env("LD_PRELOAD", &faketime)
                .env("FAKETIME", format!("-{s}s"))
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        let p = testkit::ProcessGuard::spawn("gw-sidecar", &mut cmd, &d.path().join(name));
        assert!(testkit::wait_tcp(ops, Duration::from_secs(20)));
        p
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A new connection per request: the first process's dies with it.
    let http = reqwest::Client::builder()
        .http2_prior_knowledge()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let post = |body: Vec<u8>| -> (u16, Value) {
        rt.block_on(async {
            let r = common::as_admin(http.post(format!("{url}/api/control/commands")))
                .header("content-type", PB)
                .body(body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
        })
    };
    let throttle = |nonce: u64, ts: u64| {
        signed_command(
            nonce,
            Action::Throttle,
            ts,
            "dashboard",
            &[("throttle_pct", "25")],
        )
    };
    let segments = || {
        let mut s: Vec<String> = std::fs::read_dir(state.join("journal"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".log"))
            .collect();
        s.sort();
        s
    };

    let mut first = sidecar("first.log", None);
    let t = now();
    let x = throttle(1, t);
    let (status, body) = post(x.clone());
    assert_eq!(
        (status, body["applied"].clone()),
        (200, true.into()),
        "{body}"
    );
    let held = segments()[0].clone();
    // Later commands fill the segment that holds it, then (once their nonces
    // expired too) make the guards let it go.
    let mut nonce = 2;
    let deadline = Instant::now() + Duration::from_secs(90);
    while segments().contains(&held) {
        assert!(
            Instant::now() < deadline,
            "the segment stays: {:?}",
            segments()
        );
        let (status, body) = post(throttle(nonce, now()));
        assert_eq!(status, 200, "{body}");
        nonce += 1;
        if segments().len() > 1 {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10));

    // The restarted process's clock reads the first command's time.
    let mut second = sidecar("second.log", Some(now() - t));
    let (status, body) = post(x);
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("stale")),
        "{body}"
    );
    let modules: Value = rt
        .block_on(async {
            common::as_admin(http.get(format!("{url}/api/modules")))
                .send()
                .await
                .unwrap()
                .json()
                .await
        })
        .unwrap();
    assert_eq!(
        modules["mev"]["applied"],
        nonce - 1,
        "nothing applied twice"
    );
    second.assert_running();
    assert!(
        second
            .log()
            .contains("commands are judged no earlier than the floor"),
        "the restarted clock read earlier than the floor: {}",
        second.log()
    );
}
