//! Starting a sidecar (the same wiring as `gw-sidecar`) over real HTTP (h1 + h2c).

#![allow(dead_code)]

pub mod rpc;

use std::path::Path;

use gw_core::ledger::LedgerRow;
use gw_sidecar::app::Running;
use gw_sidecar::config::Config;
use testkit::clickhouse::ClickHouse;
use testkit::envoy::DevCerts;
use testkit::fixtures::command_key;

/// A sidecar listening on a free port; stops with its runtime.
pub struct Served {
    /// `https://127.0.0.1:PORT`.
    pub base: String,
    /// `http://127.0.0.1:PORT` of the ops listener (`/healthz`, `/metrics`).
    pub ops_base: String,
    /// The started sidecar (state, agents, ledger shipper).
    pub running: Running,
    /// An HTTP/2 client over TLS presenting Envoy's certificate: the edge.
    pub http: reqwest::Client,
    /// The dev certificates (the sidecar's, the edge's, another client's).
    pub certs: DevCerts,
    /// The runtime serving it (use it to drive the client too); dropped last.
    pub rt: tokio::runtime::Runtime,
}

/// The dev certificates of a test's sidecar, made once in `state_dir/test-certs`
/// (inside the state directory, so they go with the test's temporary directory).
pub fn certs(state_dir: &Path) -> DevCerts {
    let dir = state_dir.join("test-certs");
    std::fs::create_dir_all(&dir).unwrap();
    testkit::envoy::dev_certs(&dir)
}

/// A configuration with the fixture key (`op-admin-1`, also the JSON route's
/// signer when `with_signer`), state in `state_dir`, a 4 KiB body limit, mutual
/// TLS with the dev certificates ([`certs`]), no ops listener.
pub fn config(state_dir: &Path, with_signer: bool) -> Config {
    let pk = hex::encode(command_key().verifying_key().as_bytes());
    let sk = hex::encode(command_key().to_bytes());
    let env = move |k: &str| match k {
        "CTRL_PUBKEY_HEX" => Some(pk.clone()),
        "CTRL_PUBKEY_ID" => Some("op-admin-1".to_string()),
        "CTRL_SIGN_SK_HEX" if with_signer => Some(sk.clone()),
        "GW_EDGE_KEY_HEX" => Some(testkit::fixtures::EDGE_KEY_HEX.to_owned()),
        _ => None,
    };
    let c = certs(state_dir);
    let (cert, key, ca) = (
        c.sidecar_cert.display().to_string(),
        c.sidecar_key.display().to_string(),
        c.ca.display().to_string(),
    );
    let env = move |k: &str| match k {
        "GW_SIDECAR_TLS_CERT" => Some(cert.clone()),
        "GW_SIDECAR_TLS_KEY" => Some(key.clone()),
        "GW_SIDECAR_CLIENT_CA" => Some(ca.clone()),
        other => env(other),
    };
    let mut cfg = Config::load(None, &env).unwrap();
    cfg.file.state_dir = state_dir.to_path_buf();
    cfg.file.ops_listen = None;
    cfg.file.max_body_bytes = 4096;
    cfg.file.replay_max_per_issuer = 1024;
    cfg
}

impl Served {
    /// `GET path` → JSON (panics on a transport error or a non-JSON answer).
    pub fn get_json(&self, path: &str) -> serde_json::Value {
        serde_json::from_str(&self.get_text(path)).unwrap()
    }

    /// `GET path`, stamped as the edge stamps an admin's token ([`as_admin`]) →
    /// body text (panics on a transport error).
    pub fn get_text(&self, path: &str) -> String {
        self.rt.block_on(async {
            as_admin(self.http.get(format!("{}{path}", self.base)))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        })
    }

    /// `GET path` of the ops listener → body text.
    pub fn get_ops(&self, path: &str) -> String {
        self.rt.block_on(async {
            reqwest::get(format!("{}{path}", self.ops_base))
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        })
    }

    /// `GET path` of the ops listener → status and JSON (`null` when not JSON).
    pub fn get_ops_json(&self, path: &str) -> (u16, serde_json::Value) {
        self.answer(self.http.get(format!("{}{path}", self.ops_base)))
    }

    /// `POST /api/control/commands` of signed command bytes, stamped as the edge
    /// stamps an admin's token ([`as_admin`]) → status and JSON (`null` when not
    /// JSON).
    pub fn post_command(&self, body: Vec<u8>) -> (u16, serde_json::Value) {
        self.answer(
            as_admin(
                self.http
                    .post(format!("{}/api/control/commands", self.base)),
            )
            .header("content-type", "application/x-protobuf")
            .body(body),
        )
    }

    /// `POST path` with a JSON body, stamped as the edge stamps an admin's token
    /// ([`as_admin`]) → status and JSON (`null` when not JSON).
    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        self.answer(as_admin(self.http.post(format!("{}{path}", self.base))).json(body))
    }

    /// Sends `req` → status and JSON (`null` when not JSON).
    fn answer(&self, req: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
        self.rt.block_on(async {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json().await.unwrap_or(serde_json::Value::Null))
        })
    }
}

/// [`config`], its ledger shipped to `ch` (as its default user).
pub fn config_with_clickhouse(state_dir: &Path, with_signer: bool, ch: &ClickHouse) -> Config {
    let mut cfg = config(state_dir, with_signer);
    cfg.file.clickhouse_url = Some(format!("http://127.0.0.1:{}", ch.http_port));
    cfg
}

/// Starts `cfg` and serves it.
pub fn serve(cfg: Config) -> Served {
    // `GW_LOG=debug cargo test ...` shows the sidecar's logs (with --nocapture).
    if std::env::var_os("GW_LOG").is_some() {
        static INIT: std::sync::Once = std::sync::Once::new();
        INIT.call_once(|| gw_sidecar::telemetry::init(gw_sidecar::telemetry::LogFormat::Text));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let certs = certs(&cfg.file.state_dir);
    let ops_tls = cfg.file.ops_tls;
    let running = rt.block_on(gw_sidecar::app::start(cfg)).unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = running.serving_task(listener);
    rt.spawn(serving);
    let ops = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let ops_addr = ops.local_addr().unwrap();
    rt.spawn(running.serve_ops(ops, std::future::pending()));
    Served {
        base: format!("https://{addr}"),
        ops_base: format!("{}://{ops_addr}", if ops_tls { "https" } else { "http" }),
        running,
        http: certs.edge_client(),
        certs,
        rt,
    }
}

/// `gw-sidecar` with the fixture key, plain HTTP on a free loopback port
/// (development) and its ops listener on `ops_port`, nothing else from this
/// environment; run in `dir`.
pub fn plain_sidecar(dir: &Path, ops_port: u16) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_gw-sidecar"));
    cmd.env_clear()
        .env(
            "CTRL_PUBKEY_HEX",
            hex::encode(command_key().verifying_key().as_bytes()),
        )
        .env("GW_SIDECAR_INSECURE_PLAINTEXT", "1")
        .env("GW_EDGE_KEY_HEX", testkit::fixtures::EDGE_KEY_HEX)
        .env(
            "GW_SIDECAR_LISTEN",
            format!("127.0.0.1:{}", testkit::free_port()),
        )
        .env("GW_OPS_LISTEN", format!("127.0.0.1:{ops_port}"))
        .current_dir(dir);
    cmd
}

/// The body of `GET url` (panics on a transport error).
pub async fn get_text(url: &str) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// Unix seconds now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Every row of `control_decisions`, in `seq` order (none before the sidecar made
/// the table).
pub fn stored(ch: &ClickHouse) -> Vec<LedgerRow> {
    if ch.query("EXISTS TABLE control_decisions").trim() != "1" {
        return Vec::new();
    }
    ch.query("SELECT * FROM control_decisions ORDER BY chain_id, seq FORMAT JSONEachRow")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Each row as `(stage, decision, code, request_id)`, for comparing a ledger
/// with what a test expects.
pub fn row_summary(rows: &[LedgerRow]) -> Vec<(&str, &str, &str, &str)> {
    rows.iter()
        .map(|r| {
            (
                r.stage.as_str(),
                r.decision.as_str(),
                r.code.as_str(),
                r.request_id.as_str(),
            )
        })
        .collect()
}

/// The stored rows once there are at least `n` (the sidecar ships in the
/// background), or whatever is there after 30 s.
pub fn wait_rows(ch: &ClickHouse, n: usize) -> Vec<LedgerRow> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let rows = stored(ch);
        if rows.len() >= n || std::time::Instant::now() > deadline {
            return rows;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `req` with the headers the edge stamps on a request whose token it verified,
/// for a token with role `admin` (the JSON control route checks them).
pub fn as_admin(req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    as_role(req, "admin")
}

/// `req` as the edge stamps a verified token with `roles`, sealed.
pub fn as_role(req: reqwest::RequestBuilder, roles: &str) -> reqwest::RequestBuilder {
    stamped(
        req,
        &[
            ("x-gw-verified", "jwt"),
            ("x-gw-sub", "operator-1"),
            ("x-gw-roles", roles),
            ("x-gw-token-issuer", "tests"),
        ],
    )
}

/// `req` carrying the batch of edge reports `batch` as the filter posts it: JSON,
/// sealed under the edge key, now.
pub fn edge_reports(
    req: reqwest::RequestBuilder,
    batch: &serde_json::Value,
) -> reqwest::RequestBuilder {
    let body = serde_json::to_vec(batch).unwrap();
    let (k, v) = testkit::fixtures::report_seal(&body);
    req.header("content-type", "application/json")
        .header(k, v)
        .body(body)
}

/// `req` with the edge's `stamp` and its seal ([`testkit::envoy::stamped`]).
pub use testkit::envoy::stamped;
