//! docker-compose.yml as far as this machine (no Docker engine) can check it: the
//! project's own init script makes the secrets and the Envoy config, the compose
//! file and Dockerfile pass the structural checks, the real Envoy accepts the
//! rendered config, and the sidecar accepts the configuration and environment
//! compose gives it (the sender on, to the development TPU compose runs).

use std::process::Command;

mod common;

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
    // Each container's user reads its own secrets, and no one else: 0600 and one
    // ACL entry (Envoy's image runs as 101, the sidecar's as 10001). `.ci/run`
    // installs setfacl; without it compose-init says the secrets are open.
    use std::os::unix::fs::PermissionsExt as _;
    for (file, uid) in [
        ("envoy.yaml", 101),
        ("certs/server.key", 101),
        ("certs/envoy-client.key", 101),
        ("certs/sidecar.key", 10001),
        ("keys/clickhouse-sidecar.pw", 10001),
        ("keys/clickhouse-admin.pw", 10001),
        ("keys/op-admin-1.sk.hex", 10001),
        ("keys/ledger.sk.hex", 10001),
        ("keys/edge.key.hex", 10001),
        ("keys/tpu-identity.sk.hex", 10001),
        ("keys/tpu-sink.sk.hex", 10002),
    ] {
        let path = run.join(file);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o007,
            0,
            "{file} is readable by every user: {mode:o}"
        );
        let acl = Command::new("getfacl")
            .args(["-n", "-p"])
            .arg(&path)
            .output()
            .unwrap();
        let acl = String::from_utf8_lossy(&acl.stdout);
        assert!(
            acl.contains(&format!("user:{uid}:r--")) && acl.contains("other::---"),
            "{file}: {acl}"
        );
    }

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

    // The sidecar accepts the configuration and environment compose gives it.
    let mut sidecar = Command::new(env!("CARGO_BIN_EXE_gw-sidecar"));
    sidecar.args([
        "--config",
        run.join("sidecar.json").to_str().unwrap(),
        "--check",
    ]);
    sidecar.env_clear();
    // The environment compose gives the sidecar (its only source: no env_file),
    // each mounted path as the file compose mounts there.
    let o = Command::new(testkit::python())
        .args([
            "-c",
            "import json, sys, yaml; s = yaml.safe_load(open(sys.argv[1]))['services']['sidecar']; \
             print(json.dumps([s['environment'], s['volumes']]))",
        ])
        .arg(root.join("docker-compose.yml"))
        .output()
        .unwrap();
    let (env, volumes): (std::collections::BTreeMap<String, String>, Vec<String>) =
        serde_json::from_slice(&o.stdout).expect("the compose sidecar's environment");
    let mounted: Vec<(String, std::path::PathBuf)> = volumes
        .iter()
        .filter_map(|v| {
            let mut parts = v.split(':');
            let src = parts.next()?.strip_prefix("./.run/compose/")?;
            Some((parts.next()?.to_owned(), run.join(src)))
        })
        .collect();
    for (k, v) in env {
        let v = match mounted.iter().find(|(target, _)| *target == v) {
            Some((_, file)) => file.to_str().unwrap().to_owned(),
            None => {
                assert!(!v.starts_with("/etc/"), "{k}={v}: no volume mounts it");
                v
            }
        };
        sidecar.env(k, v);
    }
    let o = sidecar.output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "config ok: listen 0.0.0.0:8080 (mutual TLS, edge envoy.local), 1 command key(s), \
         JSON-route signer op-admin-1, bus kafka kafka:9092 in plain text (state key made at the first start in \
         /var/lib/gw/.run/sidecar/state.sk.hex, 1 node(s) trusted, commands apply within 630 s of their ts), ledger http://clickhouse:8123 as gw_sidecar in plain text \
         (not loopback: password and rows readable on the network), \
         sender tpu+relay (ingest 0.0.0.0:8011), models /opt/gw/models",
        "{o:?}"
    );
}

/// The users compose drops into the ClickHouse image's `users.d/`, merged by the
/// real engine over a users.xml shaped like the image's (a password-less default
/// user with every right): the administrator creates, the sidecar's user only
/// reads and inserts, the default user can do nothing.
#[test]
fn compose_clickhouse_users_merge_over_the_image_defaults() {
    let root = testkit::workspace_root();
    let d = testkit::TempDir::new("compose-ch");
    let run = d.path().join("compose");
    let o = Command::new("bash")
        .arg(root.join("scripts/dev-keys.sh"))
        .arg(&run)
        .output()
        .unwrap();
    assert!(o.status.success(), "dev-keys: {o:?}");
    let etc = d.path().join("etc");
    std::fs::create_dir_all(etc.join("users.d")).unwrap();
    std::fs::write(
        etc.join("users.xml"),
        "<clickhouse><profiles><default/></profiles><users><default><password></password>\
         <networks><ip>::/0</ip></networks><profile>default</profile><quota>default</quota>\
         </default></users><quotas><default/></quotas></clickhouse>",
    )
    .unwrap();
    std::fs::copy(
        run.join("clickhouse-users.users-d.xml"),
        etc.join("users.d/gw.xml"),
    )
    .unwrap();
    let users = testkit::clickhouse::Users::from_files(
        &run.join("keys/clickhouse-admin.pw"),
        &run.join("keys/clickhouse-sidecar.pw"),
    );
    let ch =
        testkit::clickhouse::ClickHouse::start_with_users(d.path(), &etc.join("users.xml"), users);
    let users = ch.users.clone().unwrap();
    ch.query("CREATE TABLE control_decisions (seq UInt64) ENGINE = MergeTree ORDER BY seq");
    let sidecar = Some(&users.sidecar);
    assert_eq!(
        ch.query_as("INSERT INTO control_decisions VALUES (1)", sidecar)
            .0,
        200
    );
    let (status, body) = ch.query_as("TRUNCATE TABLE control_decisions", sidecar);
    assert!(status != 200 && body.contains("ACCESS_DENIED"), "{body}");
    let (status, body) = ch.query_as("SELECT count() FROM control_decisions", None);
    assert!(status != 200 && body.contains("ACCESS_DENIED"), "{body}");
    assert_eq!(
        ch.query("SELECT count() FROM control_decisions").trim(),
        "1"
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
        &mut common::plain_sidecar(d.path(), port),
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
