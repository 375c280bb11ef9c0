//! The CLI end to end: keygen → sign → verify, error exits, dev JWTs.

use std::path::Path;
use std::process::{Command, Output};

fn gwctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gwctl"))
        .args(args)
        .output()
        .expect("run gwctl")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn keygen(dir: &Path, id: &str) -> String {
    let o = gwctl(&["keygen", "--id", id, "--out", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    std::fs::read_to_string(dir.join(format!("{id}.pk.hex")))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn keygen_sign_verify_round_trip() {
    let d = testkit::TempDir::new("cli");
    let dir = d.path();
    let pk = keygen(dir, "op-admin-1");
    assert_eq!(pk.len(), 64);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("op-admin-1.sk.hex"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o077,
            0,
            "secret key must not be group/world readable"
        );
    }
    let jwk: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("op-admin-1.jwk.json")).unwrap())
            .unwrap();
    assert_eq!(jwk["kty"], "OKP");
    assert_eq!(jwk["crv"], "Ed25519");
    assert!(jwk.get("d").is_none(), "the JWK is public");

    // keygen never overwrites silently.
    let again = gwctl(&[
        "keygen",
        "--id",
        "op-admin-1",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    // Nor writes half a key: with one of its three files there, none is written
    // (the secret key was left behind without its public halves).
    let half = d.path().join("half");
    std::fs::create_dir(&half).unwrap();
    std::fs::write(half.join("op-4.jwk.json"), "{}").unwrap();
    let o = gwctl(&["keygen", "--id", "op-4", "--out", half.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let mut left: Vec<_> = std::fs::read_dir(&half)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["op-4.jwk.json"],
        "nothing else written, no temporary left"
    );
    // --force over a key file someone made readable: the new key is private again,
    // and a key is not written through a symbolic link (the link is replaced).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let keys = d.path().join("forced");
        std::fs::create_dir(&keys).unwrap();
        let sk = keys.join("op-2.sk.hex");
        std::fs::write(&sk, "old").unwrap();
        std::fs::set_permissions(&sk, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = keys.to_str().unwrap();
        let o = gwctl(&["keygen", "--id", "op-2", "--out", out, "--force"]);
        assert!(o.status.success(), "{o:?}");
        let mode = std::fs::metadata(&sk).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        assert_eq!(std::fs::read_to_string(&sk).unwrap().trim().len(), 64);
        let elsewhere = keys.join("elsewhere");
        std::fs::write(&elsewhere, "x").unwrap();
        std::os::unix::fs::symlink(&elsewhere, keys.join("op-3.sk.hex")).unwrap();
        let o = gwctl(&["keygen", "--id", "op-3", "--out", out, "--force"]);
        assert!(o.status.success(), "{o:?}");
        let link = keys.join("op-3.sk.hex");
        let m = std::fs::symlink_metadata(&link).unwrap();
        assert!(m.file_type().is_file(), "the link is replaced by the key");
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::read_to_string(&elsewhere).unwrap(),
            "x",
            "not written through the link"
        );
    }

    let cmd = dir.join("cmd.bin");
    // `gwctl sign` of a mev command into `cmd.bin` as op-admin-1, and `more`.
    let sign = |more: &[&str]| {
        let key = dir.join("op-admin-1.sk.hex");
        let mut a = vec![
            "sign",
            "--key",
            key.to_str().unwrap(),
            "--key-id",
            "op-admin-1",
            "--module",
            "mev",
            "--out",
            cmd.to_str().unwrap(),
        ];
        a.extend_from_slice(more);
        gwctl(&a)
    };
    let o = sign(&[
        "--action",
        "throttle",
        "--arg",
        "throttle_pct=40",
        "--issuer",
        "ops",
        "--nonce",
        "77",
    ]);
    assert!(o.status.success(), "{o:?}");
    // Signing over it again is refused: the file may hold a command sent with
    // an unknown outcome, and a new signature is a second command.
    let signed = std::fs::read(&cmd).unwrap();
    let again = |more: &[&str]| sign(&[&["--action", "stop"], more].concat());
    let o = again(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(err.contains("exists (use --force"), "{err}");
    assert_eq!(std::fs::read(&cmd).unwrap(), signed, "left as it was");
    let o = again(&["--force"]);
    assert!(o.status.success(), "{o:?}");
    assert_ne!(
        std::fs::read(&cmd).unwrap(),
        signed,
        "replaced under --force"
    );
    std::fs::write(&cmd, &signed).unwrap();
    let key = format!("op-admin-1={pk}");
    let o = gwctl(&["verify", "--key", &key, cmd.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(stdout(&o), "ok");
    let o = gwctl(&[
        "verify",
        "--key",
        &key,
        "--now",
        "now",
        cmd.to_str().unwrap(),
    ]);
    assert_eq!(stdout(&o), "ok");
    // Offline is offline; with an old clock the command is from the future.
    let o = gwctl(&[
        "verify",
        "--key",
        &key,
        "--now",
        "1000",
        cmd.to_str().unwrap(),
    ]);
    assert_eq!((o.status.code(), stdout(&o).as_str()), (Some(1), "future"));

    // Another key, a flipped byte, a truncated file.
    let other = keygen(dir, "other");
    let o = gwctl(&[
        "verify",
        "--key",
        &format!("op-admin-1={other}"),
        cmd.to_str().unwrap(),
    ]);
    assert_eq!(
        (o.status.code(), stdout(&o).as_str()),
        (Some(1), "bad_signature")
    );
    let o = gwctl(&[
        "verify",
        "--key",
        &format!("someone={pk}"),
        cmd.to_str().unwrap(),
    ]);
    assert_eq!(
        (o.status.code(), stdout(&o).as_str()),
        (Some(1), "unknown_key")
    );
    let mut bytes = std::fs::read(&cmd).unwrap();
    let i = bytes.windows(3).position(|w| w == b"ops").unwrap();
    bytes[i] = b'x';
    std::fs::write(dir.join("flipped.bin"), &bytes).unwrap();
    let o = gwctl(&[
        "verify",
        "--key",
        &key,
        dir.join("flipped.bin").to_str().unwrap(),
    ]);
    assert_eq!(stdout(&o), "bad_signature");
    std::fs::write(dir.join("short.bin"), &bytes[..bytes.len() - 4]).unwrap();
    let o = gwctl(&[
        "verify",
        "--key",
        &key,
        dir.join("short.bin").to_str().unwrap(),
    ]);
    assert_eq!(stdout(&o), "malformed");

    // The signed file verifies in the reference implementation too.
    let cases = serde_json::json!([{"name": "gwctl", "body_hex": hex::encode(std::fs::read(&cmd).unwrap()), "pk_hex": pk}]);
    let script = testkit::workspace_root().join("core/tests/interop/reference.py");
    let out = testkit::run_python(
        &[script.to_str().unwrap(), "verify"],
        cases.to_string().as_bytes(),
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r[0]["ok"], true);
    assert_eq!(r[0]["args"]["throttle_pct"], "40");
}

#[test]
fn bad_input_is_one_clear_line_and_exit_2() {
    let d = testkit::TempDir::new("cli-bad");
    let dir = d.path();
    keygen(dir, "k");
    let sk = dir.join("k.sk.hex");
    let out = dir.join("x.bin");
    for (args, needle) in [
        (
            vec!["--module", "hft", "--action", "stop"],
            "unknown module",
        ),
        (
            vec!["--module", "mev", "--action", "explode"],
            "unknown action",
        ),
        (
            vec![
                "--module",
                "mev",
                "--action",
                "throttle",
                "--arg",
                "throttle_pct=101",
            ],
            "bad_args",
        ),
        (
            vec!["--module", "mev", "--action", "throttle"],
            "throttle needs",
        ),
        (
            vec!["--module", "mev", "--action", "stop", "--arg", "novalue"],
            "KEY=VALUE",
        ),
        (
            vec!["--module", "mev", "--action", "stop", "--nonce", "0"],
            "non-zero",
        ),
    ] {
        let mut a = vec![
            "sign",
            "--key",
            sk.to_str().unwrap(),
            "--key-id",
            "k",
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend(args);
        let o = gwctl(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{a:?}");
        assert!(err.contains(needle), "{err} should mention {needle}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    let o = gwctl(&[
        "sign",
        "--key",
        "/nonexistent",
        "--key-id",
        "k",
        "--module",
        "mev",
        "--action",
        "stop",
        "--out",
        "-",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let o = gwctl(&["verify", "--key", "k=zz", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let o = gwctl(&["verify", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    // Refused before anything is sent: an empty token file, --insecure with a
    // CA (the CA would be ignored), --key without --checkpoint (it would check
    // no signature).
    let empty = dir.join("empty.jwt");
    std::fs::write(&empty, "\n").unwrap();
    let out = dir.join("body.bin");
    std::fs::write(&out, b"any").unwrap();
    let url = "https://127.0.0.1:9/api/control/commands";
    for (args, needle) in [
        (
            vec![
                "send",
                url,
                out.to_str().unwrap(),
                "--token-file",
                empty.to_str().unwrap(),
            ],
            "token is empty",
        ),
        (
            vec![
                "send",
                url,
                out.to_str().unwrap(),
                "--insecure",
                "--ca",
                "ca.pem",
            ],
            "--ca",
        ),
        (
            vec!["ledger", "verify", "--key", &"ab".repeat(32)],
            "--checkpoint",
        ),
    ] {
        let o = gwctl(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{err} should mention {needle}");
    }
}

/// `ledger verify` goes to the URL it is given — never to a proxy named by the
/// environment (reqwest obeys `HTTP_PROXY` even for loopback: the password went
/// there in clear, and its answer was taken as ClickHouse's) — with the password
/// read from its file; ClickHouse's error comes back as one line, its control
/// characters escaped and its length cut.
#[test]
fn ledger_verify_asks_its_url_with_the_files_password_and_prints_one_cut_line() {
    use std::io::{Read, Write};
    use std::net::TcpListener;

    let d = testkit::TempDir::new("cli-ledger-peer");
    let file = d.path().join("ch.pw");
    std::fs::write(&file, "secret-in-the-file\n").unwrap();
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    proxy.set_nonblocking(true).unwrap();
    let url = format!("http://127.0.0.1:{}", server.local_addr().unwrap().port());
    let proxy_url = format!("http://127.0.0.1:{}", proxy.local_addr().unwrap().port());
    let mut body = b"Code: 516. DB::Exception: \x1b[31mAuthentication failed\nline two ".to_vec();
    body.resize(body.len() + 200_000, b'x');
    let mut answer = format!(
        "HTTP/1.1 500 Internal Server Error\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(&body);
    // The request's head, once one comes (none within 20 s: empty).
    server.set_nonblocking(true).unwrap();
    let peer = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut s = loop {
            match server.accept() {
                Ok((s, _)) => break s,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(_) => return String::new(),
            }
        };
        s.set_nonblocking(false).unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let _ = s.write_all(&answer);
        String::from_utf8_lossy(&head).into_owned()
    });
    let o = Command::new(env!("CARGO_BIN_EXE_gwctl"))
        .args(["ledger", "verify", "--clickhouse", &url])
        .arg("--password-file")
        .arg(&file)
        .env_remove("GW_CLICKHOUSE_PASSWORD")
        .env_remove("GW_CLICKHOUSE_PASSWORD_FILE")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env("HTTP_PROXY", &proxy_url)
        .env("http_proxy", &proxy_url)
        .env("ALL_PROXY", &proxy_url)
        .output()
        .unwrap();
    let head = peer.join().unwrap().to_ascii_lowercase();
    assert!(
        matches!(proxy.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "nothing went to the proxy"
    );
    assert!(
        head.contains("x-clickhouse-key: secret-in-the-file"),
        "{head}"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("500") && err.contains("Authentication failed") && !err.contains('\x1b'),
        "{err}"
    );
    assert!(err.len() < 70_000, "cut: {} bytes", err.len());
}

#[test]
fn jwt_mints_tokens_the_core_accepts() {
    let secret = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let o = gwctl(&[
        "jwt",
        "--secret-hex",
        secret,
        "--sub",
        "alice",
        "--role",
        "admin",
        "--role",
        "viewer",
        "--ttl",
        "10m",
        "--kid",
        "dev",
    ]);
    assert!(o.status.success(), "{o:?}");
    let token = stdout(&o);
    let keys = gw_core::jwk::JwkSet::parse(&format!(
        r#"{{"keys":[{{"kty":"oct","kid":"dev","k":"{}"}}]}}"#,
        gw_core::jwk::b64url_encode(&hex::decode(secret).unwrap())
    ))
    .unwrap();
    let policy = gw_core::jwt::JwtPolicy {
        issuers: vec!["defi-dashboard".into()],
        audiences: vec!["defi-users".into()],
        ..Default::default()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let v = gw_core::jwt::verify_jwt(&token, &keys, &policy, now).unwrap();
    assert_eq!(v.sub.as_deref(), Some("alice"));
    assert_eq!(v.roles, vec!["admin", "viewer"]);
    let exp = v.exp.unwrap();
    assert!((now + 590..=now + 610).contains(&exp), "ttl 10m");
    assert_eq!(
        gw_core::jwt::verify_jwt(&token, &keys, &policy, exp + 31)
            .unwrap_err()
            .code,
        gw_core::Code::JwtExpired
    );
    let o = gwctl(&[
        "jwt",
        "--secret-hex",
        "abcd",
        "--sub",
        "a",
        "--role",
        "admin",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let o = gwctl(&[
        "jwt",
        "--secret-hex",
        secret,
        "--sub",
        "a",
        "--role",
        "admin",
        "--ttl",
        "soon",
    ]);
    assert_eq!(o.status.code(), Some(2));
}

/// `gwctl send` exits 3 when the request may have arrived and no answer came —
/// the gateway holding it past the timeout, or the connection lost once the body
/// was sent — as for a 5xx: the command is not known to be accepted, and the same
/// file is to be sent again (exit 2 read as "not sent" would have the command
/// signed again). A request that never left (nothing listening) is still 2.
#[test]
fn a_send_with_no_answer_exits_3_and_one_never_sent_exits_2() {
    use std::io::Read;
    let d = testkit::TempDir::new("cli-unanswered");
    let file = d.path().join("command.bin");
    let marker = b"gwctl-unanswered-body";
    std::fs::write(&file, marker).unwrap();
    let file = file.to_str().unwrap();
    // Takes the request whole, then holds it (`hold`) or closes the connection.
    let gateway = |hold: bool| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.windows(marker.len()).any(|w| w == marker) {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "the request ended before its body");
                got.extend_from_slice(&buf[..n]);
            }
            if hold {
                std::thread::sleep(std::time::Duration::from_secs(4));
            }
        });
        (format!("http://{addr}/api/control/commands"), t)
    };
    for hold in [true, false] {
        let (url, t) = gateway(hold);
        let o = gwctl(&["send", "--http2", "--timeout", "2s", &url, file]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(3), "hold {hold}: {err}");
        assert!(
            err.contains("not known to be accepted") && err.contains("do not sign it again"),
            "{err}"
        );
        t.join().unwrap();
    }
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let url = format!("http://{closed}/api/control/commands");
    let o = gwctl(&["send", "--http2", "--timeout", "2s", &url, file]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Over HTTP/3 to a port whose UDP goes unanswered (a firewall dropping it):
    // the timeout comes during the handshake, nothing was sent — 2, saying so,
    // not 3 ("send again to learn the outcome").
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "https://{}/api/control/commands",
        silent.local_addr().unwrap()
    );
    let o = gwctl(&["send", "--insecure", "--timeout", "2s", &url, file]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("nothing was sent") && err.contains("UDP") && !err.contains("not known"),
        "{err}"
    );
}

/// `ledger verify` takes the ClickHouse password from a file as the sidecar
/// does; given both ways it is refused before anything is asked of ClickHouse,
/// without echoing it, and an unreadable file is one clear line.
#[test]
fn the_ledger_password_comes_from_its_flag_or_its_file_not_both() {
    let d = testkit::TempDir::new("cli-ledger-pw");
    let file = d.path().join("ch.pw");
    std::fs::write(&file, "secret-in-the-file\n").unwrap();
    let run = |password: Option<&str>, file: &Path| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gwctl"));
        c.args(["ledger", "verify", "--clickhouse", "http://127.0.0.1:9"])
            .arg("--password-file")
            .arg(file)
            .env_remove("GW_CLICKHOUSE_PASSWORD")
            .env_remove("GW_CLICKHOUSE_PASSWORD_FILE");
        if let Some(p) = password {
            c.env("GW_CLICKHOUSE_PASSWORD", p);
        }
        c.output().expect("run gwctl")
    };
    let o = run(Some("secret-in-the-env"), &file);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("not both") && !err.contains("secret-in"),
        "{err}"
    );
    let o = run(None, &d.path().join("missing.pw"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("missing.pw") && err.trim().lines().count() == 1,
        "{err}"
    );
    // Read from the file, the check goes on to ClickHouse (nothing listens on
    // port 9): the error is the connection's, not the password's.
    let o = run(None, &file);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        !err.contains("not both") && !err.contains("secret-in"),
        "{err}"
    );
}
