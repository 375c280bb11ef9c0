//! docker-compose.yml as far as this machine (no Docker engine) can check it: the
//! project's own init script makes the secrets and the Envoy config, the compose
//! file and Dockerfile pass the structural checks, the real Envoy accepts the
//! rendered config, and the sidecar accepts the environment compose gives it.

use std::process::Command;

#[test]
fn compose_files_check_and_their_configs_load_in_the_real_programs() {
    let root = testkit::workspace_root();
    let d = testkit::TempDir::new("compose");
    let run = d.path().join("compose");
    let o = Command::new("bash")
        .arg(root.join("scripts/compose-init.sh"))
        .arg(&run)
        .output()
        .unwrap();
    assert!(o.status.success(), "compose-init: {o:?}");

    let o = Command::new(testkit::python())
        .arg(root.join("scripts/check-compose.py"))
        .arg("--run-dir")
        .arg(&run)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains("compose: ok"), "{o:?}");

    // The Envoy config compose mounts, with container paths mapped to these files.
    let yaml = std::fs::read_to_string(run.join("envoy.yaml")).unwrap();
    assert!(yaml.contains("STRICT_DNS") && yaml.contains("address: sidecar"));
    let local = yaml
        .replace(
            "/etc/gw/certs/",
            &format!("{}/", run.join("certs").display()),
        )
        .replace(
            "/etc/gw/gw_filter.wasm",
            testkit::filter_wasm().to_str().unwrap(),
        );
    let checked = d.path().join("envoy.local.yaml");
    std::fs::write(&checked, local).unwrap();
    testkit::envoy::validate(&checked).unwrap();

    // The sidecar accepts the environment compose gives it.
    let mut sidecar = Command::new(env!("CARGO_BIN_EXE_gw-sidecar"));
    sidecar.args([
        "--config",
        root.join("sidecar/config.example.json").to_str().unwrap(),
        "--check",
    ]);
    sidecar.env_clear();
    for line in std::fs::read_to_string(run.join("sidecar.env"))
        .unwrap()
        .lines()
    {
        let (k, v) = line.split_once('=').unwrap();
        sidecar.env(k, v);
    }
    // The environment compose gives the sidecar (certificates mounted at /etc/gw/certs).
    let o = Command::new(testkit::python())
        .args([
            "-c",
            "import json, sys, yaml; \
             print(json.dumps(yaml.safe_load(open(sys.argv[1]))['services']['sidecar']['environment']))",
        ])
        .arg(root.join("docker-compose.yml"))
        .output()
        .unwrap();
    let env: std::collections::BTreeMap<String, String> =
        serde_json::from_slice(&o.stdout).expect("the compose sidecar's environment");
    for (k, v) in env {
        let v = v.replace(
            "/etc/gw/certs/",
            &format!("{}/", run.join("certs").display()),
        );
        sidecar.env(k, v);
    }
    let o = sidecar.output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "config ok: listen 0.0.0.0:8080 (mutual TLS, edge envoy.local), 1 command key(s), \
         JSON-route signer op-admin-1, bus kafka kafka:9092, ledger http://clickhouse:8123",
        "{o:?}"
    );
}

#[test]
fn the_sidecar_probe_reports_health() {
    let bin = env!("CARGO_BIN_EXE_gw-sidecar");
    let port = testkit::free_port();
    let o = Command::new(bin)
        .args(["--probe", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!o.status.success(), "nothing listens: {o:?}");
    let d = testkit::TempDir::new("probe");
    let mut child = testkit::ProcessGuard::spawn(
        "gw-sidecar",
        Command::new(bin)
            .env(
                "CTRL_PUBKEY_HEX",
                hex::encode(testkit::fixtures::command_key().verifying_key().as_bytes()),
            )
            .env("GW_SIDECAR_INSECURE_PLAINTEXT", "1")
            .env(
                "GW_SIDECAR_LISTEN",
                format!("127.0.0.1:{}", testkit::free_port()),
            )
            .env("GW_OPS_LISTEN", format!("127.0.0.1:{port}"))
            .current_dir(d.path()),
        &d.path().join("sidecar.log"),
    );
    assert!(testkit::wait_tcp(port, std::time::Duration::from_secs(20)));
    child.assert_running();
    let o = Command::new(bin)
        .args(["--probe", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
}
