//! The built filter (`gw_filter.wasm`) driven through a proxy-wasm 0.2.1 host on
//! wasmtime: every decision, header hygiene, and the shared-data replay copy across
//! two VMs (two "workers"), including concurrent duplicates.

use gw_core::Action;
use testkit::proxy_wasm::{Gateway, Host, Outcome};

const NOW: u64 = 1_750_000_000;

fn config() -> String {
    testkit::fixtures::filter_config(2048).to_string()
}

fn bearer(roles: &[&str]) -> String {
    testkit::fixtures::bearer(roles, NOW)
}

fn command(nonce: u64, issuer: &str) -> Vec<u8> {
    testkit::fixtures::signed_command(nonce, Action::Throttle, NOW, issuer, &[])
}

/// Another command of `issuer` reusing `nonce` (different bytes).
fn reuse(nonce: u64, issuer: &str, variant: u8) -> Vec<u8> {
    let pct = (41 + u32::from(variant)).to_string();
    testkit::fixtures::signed_command(
        nonce,
        Action::Throttle,
        NOW,
        issuer,
        &[("throttle_pct", &pct)],
    )
}

fn post<'a>(path: &'a str, auth: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        (":method", "POST"),
        (":path", path),
        (":authority", "gw"),
        ("content-type", "application/x-protobuf"),
        ("authorization", auth),
    ]
}

#[test]
fn uses_only_proxy_wasm_0_2_1_and_wasi() {
    let host = Host::new();
    // Every host function of proxy-wasm ABI 0.2.1; nothing else may be imported.
    let abi_0_2_1 = [
        "proxy_log",
        "proxy_get_log_level",
        "proxy_get_current_time_nanoseconds",
        "proxy_set_tick_period_milliseconds",
        "proxy_get_buffer_bytes",
        "proxy_set_buffer_bytes",
        "proxy_get_header_map_pairs",
        "proxy_set_header_map_pairs",
        "proxy_get_header_map_value",
        "proxy_replace_header_map_value",
        "proxy_add_header_map_value",
        "proxy_remove_header_map_value",
        "proxy_get_property",
        "proxy_set_property",
        "proxy_get_shared_data",
        "proxy_set_shared_data",
        "proxy_register_shared_queue",
        "proxy_resolve_shared_queue",
        "proxy_dequeue_shared_queue",
        "proxy_enqueue_shared_queue",
        "proxy_continue_stream",
        "proxy_close_stream",
        "proxy_send_local_response",
        "proxy_http_call",
        "proxy_grpc_call",
        "proxy_grpc_stream",
        "proxy_grpc_send",
        "proxy_grpc_cancel",
        "proxy_grpc_close",
        "proxy_get_status",
        "proxy_set_effective_context",
        "proxy_call_foreign_function",
        "proxy_done",
        "proxy_define_metric",
        "proxy_increment_metric",
        "proxy_record_metric",
        "proxy_get_metric",
    ];
    for imp in host.imports() {
        let (module, name) = imp.split_once("::").unwrap();
        match module {
            "env" => assert!(
                abi_0_2_1.contains(&name),
                "not an ABI 0.2.1 host call: {name}"
            ),
            "wasi_snapshot_preview1" => {}
            other => panic!("unexpected import module {other}"),
        }
    }
    assert!(
        host.exports()
            .iter()
            .any(|e| e == "proxy_abi_version_0_2_1"),
        "declares ABI 0.2.1"
    );
}

#[test]
fn exports_only_the_callbacks_it_uses() {
    // A host calls a callback only if the module exports it; each call is a VM
    // entry (in Envoy, into V8), so response, `done` and `log` callbacks that would
    // only answer "continue" must not be exported.
    let mut exports: Vec<String> = Host::new()
        .exports()
        .into_iter()
        .filter(|e| e.starts_with("proxy_"))
        .collect();
    exports.sort();
    assert_eq!(
        exports,
        [
            "proxy_abi_version_0_2_1",
            "proxy_on_configure",
            "proxy_on_context_create",
            "proxy_on_delete",
            "proxy_on_http_call_response",
            "proxy_on_memory_allocate",
            "proxy_on_request_body",
            "proxy_on_request_headers",
            "proxy_on_request_trailers",
            "proxy_on_tick",
            "proxy_on_vm_start",
        ]
    );
}

#[test]
fn a_request_under_an_unknown_root_context_is_refused_not_passed() {
    let host = Host::new();
    let mut vm = host.vm(&config(), NOW).unwrap();
    let admin = bearer(&["admin"]);
    let head = [
        (":method", "GET"),
        (":path", "/api/modules"),
        (":authority", "gw"),
        ("authorization", admin.as_str()),
    ];
    let out = vm.request_to(999, &head, b"", 1);
    assert_eq!(out.status(), 503, "{out:?}");
    assert_eq!(out.code().as_deref(), Some("unavailable"));
}

#[test]
fn invalid_configuration_fails_plugin_start_with_a_clear_log() {
    let host = Host::new();
    let logs = host.vm("{\"routes\": []}", NOW).err().expect("must refuse");
    assert!(
        logs.iter()
            .any(|l| l.contains("invalid plugin configuration")),
        "{logs:?}"
    );
    let mut bad: serde_json::Value = serde_json::from_str(&config()).unwrap();
    bad["replay_max_per_issuer"] = 100.into();
    let logs = host.vm(&bad.to_string(), NOW).err().expect("must refuse");
    assert!(
        logs.iter().any(|l| l.contains("max_per_issuer")),
        "{logs:?}"
    );
}

#[test]
fn accepted_command_goes_upstream_with_verified_headers_only() {
    let host = Host::new();
    let mut vm = host.gateway(&config(), NOW).unwrap();
    let admin = bearer(&["admin"]);
    let body = command(1, "dashboard");
    let mut h = post("/api/control/commands", &admin);
    h.push(("x-gw-verified", "edge"));
    h.push(("x-gw-pubkey-id", "forged"));
    h.push(("X-GW-Roles", "admin"));
    h.push(("x-gw-anything", "1"));
    let out = vm.request(&h, &body, 3);
    match &out {
        Outcome::Forwarded { headers, body: fwd } => {
            assert_eq!(fwd, &body, "body reaches upstream intact");
            for (k, v) in [
                ("x-gw-sub", "alice"),
                ("x-gw-roles", "admin"),
                ("x-gw-pubkey-id", "op-admin-1"),
                ("x-gw-issuer", "dashboard"),
                ("x-gw-nonce", "1"),
                ("x-gw-verified", "edge"),
            ] {
                let got: Vec<_> = headers.iter().filter(|(hk, _)| hk == k).collect();
                assert_eq!(got, vec![&(k.to_string(), v.to_string())], "{k}");
            }
            assert!(!headers
                .iter()
                .any(|(k, _)| k == "x-gw-anything" || k == "x-gw-ticket"));
        }
        other => panic!("{other:?}\n{:?}", vm.logs()),
    }
    assert_eq!(vm.metric("gw_edge.decision.accepted"), Some(1));
    // One command checked: one sample of its cost.
    assert_eq!(
        vm.samples("gw_edge.command_check_us").map(|v| v.len()),
        Some(1)
    );

    // Spoofed headers never pass on public or JWT routes either.
    let out = vm.request(
        &[
            (":method", "GET"),
            (":path", "/index.html"),
            ("x-gw-verified", "edge"),
        ],
        b"",
        1,
    );
    assert!(
        matches!(&out, Outcome::Forwarded { headers, .. } if !headers.iter().any(|(k, _)| k.starts_with("x-gw-")))
    );
    let viewer = bearer(&["viewer"]);
    let out = vm.request(
        &[
            (":method", "GET"),
            (":path", "/api/ledger/history"),
            ("authorization", &viewer),
            ("x-gw-sub", "root"),
        ],
        b"",
        1,
    );
    assert_eq!(out.header("x-gw-sub"), Some("alice"));
    assert_eq!(out.header("x-gw-verified"), Some("jwt"));
}

/// A token offered as a WebSocket subprotocol never travels past the edge, also
/// when the client splits the header over several lines (the host answers a
/// header's first line only; the second used to go upstream as it came).
#[test]
fn a_subprotocol_token_on_a_second_header_line_stops_at_the_edge() {
    let host = Host::new();
    let mut vm = host.gateway(&config(), NOW).unwrap();
    let viewer = bearer(&["viewer"]);
    let offer = format!("bearer.{}", viewer.trim_start_matches("Bearer "));
    // Without and with an Authorization header (then the token checked is that
    // one): either way the offer on the second line is taken out.
    for auth in [None, Some(viewer.as_str())] {
        let mut h = vec![
            (":method", "GET"),
            (":path", "/api/realtime"),
            ("upgrade", "websocket"),
            ("connection", "upgrade"),
            ("sec-websocket-protocol", "gw.realtime.v1"),
            ("sec-websocket-protocol", offer.as_str()),
        ];
        h.extend(auth.map(|a| ("authorization", a)));
        let out = vm.request(&h, b"", 1);
        match &out {
            Outcome::Forwarded { headers, .. } => {
                let ws: Vec<_> = headers
                    .iter()
                    .filter(|(k, _)| k == "sec-websocket-protocol")
                    .map(|(_, v)| v.as_str())
                    .collect();
                assert_eq!(ws, ["gw.realtime.v1"], "{auth:?}");
                assert!(
                    !headers.iter().any(|(_, v)| v.contains("bearer.")),
                    "{headers:?}"
                );
                assert_eq!(out.header("x-gw-roles"), Some("viewer"));
            }
            other => panic!("{other:?}\n{:?}", vm.logs()),
        }
    }
}

#[test]
fn every_rejection_has_its_status_and_code() {
    let host = Host::new();
    let mut vm = host.gateway(&config(), NOW).unwrap();
    let admin = bearer(&["admin"]);
    let operator = bearer(&["operator"]);
    let good = command(50, "dashboard");
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<u8>, u32, &'a str);
    let mut cases: Vec<Case> = vec![
        (
            "no token",
            vec![(":method", "POST"), (":path", "/api/control/commands")],
            good.clone(),
            401,
            "jwt_missing",
        ),
        (
            "operator",
            post("/api/control/commands", &operator),
            good.clone(),
            403,
            "forbidden_role",
        ),
        (
            "GET",
            vec![
                (":method", "GET"),
                (":path", "/api/control/commands"),
                ("authorization", &admin),
            ],
            vec![],
            405,
            "method_not_allowed",
        ),
        (
            "empty",
            post("/api/control/commands", &admin),
            vec![],
            400,
            "malformed",
        ),
        (
            "truncated",
            post("/api/control/commands", &admin),
            good[..good.len() - 1].to_vec(),
            400,
            "malformed",
        ),
        (
            "route",
            post("/api/control/module/mev:kill", &admin),
            good.clone(),
            403,
            "route_mismatch",
        ),
        (
            "unknown route",
            post("/api/control/module/hft:stop", &admin),
            good.clone(),
            400,
            "malformed",
        ),
        (
            "unknown issuer scope",
            post("/api/control/commands", &admin),
            command(51, "mallory"),
            403,
            "key_scope",
        ),
        (
            "too large",
            post("/api/control/commands", &admin),
            vec![0u8; 4096],
            413,
            "too_large",
        ),
    ];
    let mut flipped = good.clone();
    let i = flipped.windows(4).position(|w| w == b"req-").unwrap();
    flipped[i] = b'X';
    cases.push((
        "flipped",
        post("/api/control/commands", &admin),
        flipped,
        401,
        "bad_signature",
    ));
    let mut big = post("/api/control/commands", &admin);
    big.push(("content-length", "999999"));
    cases.push(("content-length", big, good.clone(), 413, "too_large"));
    for (name, headers, body, status, code) in cases {
        let out = vm.request(&headers, &body, 2);
        assert_eq!(
            (out.status(), out.code().as_deref()),
            (status, Some(code)),
            "{name}: {out:?}"
        );
        if let Outcome::Local(l) = &out {
            assert!(
                l.headers
                    .contains(&("content-type".into(), "application/json".into())),
                "{name}"
            );
        }
    }
    // Freshness follows the host clock.
    vm.set_now(NOW + 31);
    let out = vm.request(
        &post("/api/control/commands", &admin),
        &command(60, "ops"),
        1,
    );
    assert_eq!(out.code().as_deref(), Some("stale"));
    vm.set_now(NOW - 31);
    let out = vm.request(
        &post("/api/control/commands", &admin),
        &command(61, "ops"),
        1,
    );
    assert_eq!(out.code().as_deref(), Some("future"));
    vm.set_now(NOW);
    // Replay: another command reusing the nonce is refused here; the same bytes
    // again go on to the sidecar, which knows whether the first was applied.
    assert!(matches!(
        vm.request(&post("/api/control/commands", &admin), &good, 1),
        Outcome::Forwarded { .. }
    ));
    let out = vm.request(
        &post("/api/control/commands", &admin),
        &reuse(50, "dashboard", 0),
        1,
    );
    assert_eq!((out.status(), out.code().as_deref()), (409, Some("replay")));
    assert_eq!(vm.metric("gw_edge.decision.replay"), Some(1));
    assert!(matches!(
        vm.request(&post("/api/control/commands", &admin), &good, 1),
        Outcome::Forwarded { .. }
    ));
    assert_eq!(vm.metric("gw_edge.decision.resend"), Some(1));
    assert_eq!(vm.metric("gw_edge.decision.bad_signature"), Some(1));
    // No panic was logged anywhere.
    assert!(
        !vm.logs().iter().any(|l| l.contains("panicked")),
        "{:?}",
        vm.logs()
    );
}

#[test]
fn workers_share_the_replay_state() {
    let host = Host::new();
    let mut a = host.gateway(&config(), NOW).unwrap();
    let mut b = host.gateway(&config(), NOW).unwrap();
    let admin = bearer(&["admin"]);
    let body = command(7, "dashboard");
    assert!(matches!(
        a.request(&post("/api/control/commands", &admin), &body, 1),
        Outcome::Forwarded { .. }
    ));
    assert_eq!(
        b.request(
            &post("/api/control/commands", &admin),
            &reuse(7, "dashboard", 0),
            1
        )
        .code()
        .as_deref(),
        Some("replay")
    );
    // An older nonce, later, on the other worker is fine, once.
    let older = command(5, "dashboard");
    assert!(matches!(
        b.request(&post("/api/control/commands", &admin), &older, 1),
        Outcome::Forwarded { .. }
    ));
    assert_eq!(
        a.request(
            &post("/api/control/commands", &admin),
            &reuse(5, "dashboard", 1),
            1
        )
        .code()
        .as_deref(),
        Some("replay")
    );
}

#[test]
fn concurrent_duplicates_on_two_workers_are_accepted_exactly_once() {
    let host = Host::new();
    let admin = bearer(&["admin"]);
    // The two workers send different commands reusing the same 200 nonces.
    let bodies: Vec<Vec<Vec<u8>>> = (0..2u8)
        .map(|w| (1..=200).map(|n| reuse(1_000 + n, "ops", w)).collect())
        .collect();
    let accepted: usize = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|w| {
                let mut vm = host.gateway(&config(), NOW).unwrap();
                let (admin, bodies) = (&admin, &bodies[w]);
                s.spawn(move || {
                    bodies
                        .iter()
                        .filter(|b| {
                            matches!(
                                vm.request(&post("/api/control/commands", admin), b, 1),
                                Outcome::Forwarded { .. }
                            )
                        })
                        .count()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    assert_eq!(accepted, 200, "each nonce exactly once across both workers");
    let count_key = gw_filter::replay_cas::keys_count_key("gw.replay.v1.");
    let replay_keys: Vec<_> = host
        .shared
        .keys()
        .into_iter()
        .filter(|k| k.starts_with("gw.replay.") && *k != count_key)
        .collect();
    assert!(
        replay_keys
            .iter()
            .all(|k| k.starts_with("gw.replay.v1.ops."))
            && replay_keys.len() <= gw_core::replay::SHARDS as usize,
        "the issuer's shards only: {replay_keys:?}"
    );
    // Each shard key created was counted against the edge's bound first (twice
    // at most: both workers may find it missing at once).
    let counted = host
        .shared
        .get(&count_key)
        .0
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes);
    let made = replay_keys.len() as u64;
    assert!(
        counted.is_some_and(|n| (made..=2 * made).contains(&n)),
        "{counted:?} counted for {made} shard keys"
    );
    let stamp_keys = host
        .shared
        .keys()
        .into_iter()
        .filter(|k| k.starts_with("gw.stamp."))
        .count();
    assert!(
        stamp_keys <= 2 * stamp_slots(),
        "ticket slots stay bounded: {stamp_keys}"
    );
}

fn stamp_slots() -> usize {
    gw_filter::stamp::SLOTS as usize
}

#[test]
fn a_forged_ticket_never_stamps_headers() {
    let host = Host::new();
    let mut gw = host.gateway(&config(), NOW).unwrap();
    // A client ticket is stripped by the verify stage...
    let viewer = bearer(&["viewer"]);
    let out = gw.request(
        &[
            (":method", "GET"),
            (":path", "/api/ledger/x"),
            ("authorization", &viewer),
            ("x-gw-ticket", "0000000000000001.1.1"),
        ],
        b"",
        1,
    );
    assert_eq!(out.header("x-gw-verified"), Some("jwt"));
    assert_eq!(out.header("x-gw-ticket"), None);
    // The bearer token is not handed on: the upstream has the verified headers.
    assert_eq!(out.header("authorization"), None);
    // ...and the stamp stage alone refuses tickets it cannot find (fail closed).
    let mut stamp = host.vm(r#"{"stage": "stamp"}"#, NOW).unwrap();
    let out = stamp.request(
        &[
            (":method", "GET"),
            (":path", "/"),
            ("x-gw-ticket", "0000000000000001.1.1"),
        ],
        b"",
        1,
    );
    assert_eq!(
        (out.status(), out.code().as_deref()),
        (503, Some("unavailable"))
    );
    assert!(host.vm(r#"{"stage": "other"}"#, NOW).is_err());
}

/// The headers the verify stage hands on for one accepted command, and its ticket.
fn handed_on(gw: &mut Gateway, nonce: u64) -> (Vec<(String, String)>, String) {
    let admin = bearer(&["admin"]);
    match gw.verify(
        &post("/api/control/commands", &admin),
        &command(nonce, "dashboard"),
        2,
    ) {
        Outcome::Forwarded { headers, .. } => {
            assert!(
                !headers.iter().any(|(k, _)| k == "x-gw-nonce"),
                "stamped only by the stamp stage"
            );
            assert!(
                !headers
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case("authorization")),
                "the bearer token stops at the edge"
            );
            let ticket = headers
                .iter()
                .find(|(k, _)| k == "x-gw-ticket")
                .map(|(_, v)| v.clone())
                .expect("a ticket");
            (headers, ticket)
        }
        other => panic!("{other:?}"),
    }
}

/// Both stages in one VM, or (`split`) each in a VM of its own.
fn both_stages(host: &Host, split: bool) -> Gateway {
    if split {
        host.split_gateway(&config(), NOW)
    } else {
        host.gateway(&config(), NOW)
    }
    .unwrap()
}

#[test]
fn the_stamp_stage_takes_verified_headers_from_its_own_vm_or_from_shared_data() {
    for split in [false, true] {
        let host = Host::new();
        let mut gw = both_stages(&host, split);
        let (headers, _) = handed_on(&mut gw, 1);
        let out = gw.stamp(&headers);
        assert_eq!(out.header("x-gw-nonce"), Some("1"), "split {split}");
        assert_eq!(out.header("x-gw-verified"), Some("edge"));
        assert_eq!(out.header("x-gw-ticket"), None);
        // A ticket stamps once, wherever its headers were kept.
        let again = gw.stamp(&headers);
        assert_eq!(
            (again.status(), again.code().as_deref()),
            (503, Some("unavailable")),
            "split {split}"
        );
    }
}

#[test]
fn in_one_vm_the_stamp_stage_does_not_depend_on_shared_data() {
    // Shared data loses the hand-over between the stages: a stamp stage in the
    // verify stage's VM does not read it; one in another VM has nothing else.
    let prefix = "gw.stamp.v1."; // the default stamp_key_prefix
    for split in [false, true] {
        let host = Host::new();
        let mut gw = both_stages(&host, split);
        let (headers, ticket) = handed_on(&mut gw, 7);
        let key = gw_filter::stamp::key_of(prefix, &ticket).unwrap();
        assert!(
            host.shared.keys().contains(&key),
            "written for other VMs too"
        );
        host.shared.set(&key, b"", 0).unwrap();
        let out = gw.stamp(&headers);
        if split {
            assert_eq!(
                (out.status(), out.code().as_deref()),
                (503, Some("unavailable"))
            );
        } else {
            assert_eq!(out.header("x-gw-nonce"), Some("7"));
        }
    }
}

#[test]
fn a_verify_stage_whose_slots_were_dropped_still_hands_over_through_shared_data() {
    let host = Host::new();
    // Verify stages of as many other prefixes as the VM keeps rings, configured
    // after the first: the first stage's ring is dropped.
    let mut other: serde_json::Value = serde_json::from_str(&config()).unwrap();
    let others: Vec<String> = (0..gw_filter::stamp::MAX_RINGS)
        .map(|i| {
            other["stamp_key_prefix"] = format!("gw.stamp.other{i}.").into();
            other.to_string()
        })
        .collect();
    let mut gw = host
        .gateway_after_updates_with(&config(), NOW, &others)
        .unwrap();
    let admin = bearer(&["admin"]);
    let out = gw.request(
        &post("/api/control/commands", &admin),
        &command(3, "dashboard"),
        1,
    );
    assert_eq!(
        out.header("x-gw-nonce"),
        Some("3"),
        "{out:?}\n{:?}",
        gw.logs()
    );
    assert_eq!(out.header("x-gw-verified"), Some("edge"));
}

/// A verify stage configured again in the same VM (a configuration update) goes
/// on with the VM's ticket issuer: its tickets take the same shared-data keys and
/// go on numbering. Before, each update took a new id and up to 1024 more
/// shared-data keys, which ABI 0.2.1 cannot delete, per worker and update.
#[test]
fn configuration_updates_hand_over_under_the_same_shared_data_keys() {
    let host = Host::new();
    let updates = 3;
    let mut gw = host.gateway_after_updates(&config(), NOW, updates).unwrap();
    let admin = bearer(&["admin"]);
    let mut tickets = Vec::new();
    for i in 0..=updates {
        gw.use_verify_stage(i);
        let Outcome::Forwarded { headers, .. } = gw.verify(
            &post("/api/control/commands", &admin),
            &command(40 + i as u64, "dashboard"),
            1,
        ) else {
            panic!("{:?}", gw.logs())
        };
        let ticket = headers
            .iter()
            .find(|(k, _)| k == "x-gw-ticket")
            .map(|(_, v)| v.clone())
            .unwrap();
        let out = gw.stamp(&headers);
        assert_eq!(
            out.header("x-gw-nonce"),
            Some((40 + i).to_string().as_str())
        );
        tickets.push(ticket);
    }
    let vm_ids: std::collections::BTreeSet<&str> =
        tickets.iter().filter_map(|t| t.split('.').next()).collect();
    assert_eq!(vm_ids.len(), 1, "{tickets:?}");
    let numbers: Vec<u64> = tickets
        .iter()
        .filter_map(|t| t.rsplit('.').next()?.parse().ok())
        .collect();
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{tickets:?}");
    let keys = host
        .shared
        .keys()
        .into_iter()
        .filter(|k| k.starts_with("gw.stamp.v1."))
        .count();
    assert_eq!(keys, tickets.len(), "{:?}", host.shared.keys());
}

/// A root context configured as the stamp stage and then, by a host that
/// reuses root contexts, as the verify stage verifies: it kept serving stamp
/// contexts, which check nothing. A configuration refused leaves it rejecting
/// every request.
#[test]
fn a_root_configured_again_keeps_nothing_of_its_old_stage() {
    let host = Host::new();
    let mut vm = host.vm(r#"{"stage": "stamp"}"#, NOW).unwrap();
    assert!(vm.configure_again(&config()));
    let mut headers = post("/api/control/commands", "");
    headers.retain(|(k, _)| *k != "authorization");
    let no_token = vm.request(&headers, &command(1, "ops"), 1);
    assert_eq!(
        no_token.code().as_deref(),
        Some("jwt_missing"),
        "{:?}",
        vm.logs()
    );
    let admin = bearer(&["admin"]);
    assert!(matches!(
        vm.request(
            &post("/api/control/commands", &admin),
            &command(2, "ops"),
            1
        ),
        Outcome::Forwarded { .. }
    ));
    // Refused: an unconfigured verify stage, not the old one.
    let mut vm = host.vm(r#"{"stage": "stamp"}"#, NOW).unwrap();
    assert!(!vm.configure_again(r#"{"stage": "verify", "surprise": 1}"#));
    let refused = vm.request(
        &post("/api/control/commands", &admin),
        &command(3, "ops"),
        1,
    );
    assert!(refused.status() >= 500, "{refused:?}");
    // Configured again with nothing: the same.
    let mut vm = host.vm(r#"{"stage": "stamp"}"#, NOW).unwrap();
    assert!(!vm.configure_again(""));
    let refused = vm.request(
        &post("/api/control/commands", &admin),
        &command(4, "ops"),
        1,
    );
    assert!(refused.status() >= 500, "{refused:?}");
}

#[test]
fn a_host_without_metrics_still_works() {
    let host = Host::new();
    let mut vm = host.gateway_with(&config(), NOW, true).unwrap();
    let admin = bearer(&["admin"]);
    assert!(matches!(
        vm.request(
            &post("/api/control/commands", &admin),
            &command(9, "ops"),
            1
        ),
        Outcome::Forwarded { .. }
    ));
    assert_eq!(
        vm.request(
            &post("/api/control/commands", &admin),
            &reuse(9, "ops", 0),
            1
        )
        .code()
        .as_deref(),
        Some("replay")
    );
}

/// A configuration update loses no edge report: the VM keeps one report queue
/// for its verify stages, and the reports in flight when the old root context
/// is deleted go back to it, sent again by the new one with their ids (the
/// ledger drops a copy it already recorded). Before, the queue and the batch in
/// flight went with the old root.
#[test]
fn a_configuration_update_loses_no_edge_report() {
    let host = Host::new();
    let mut cfg = testkit::fixtures::filter_config(2048);
    cfg["report"] = serde_json::json!({"cluster": "sidecar", "period_ms": 100});
    let mut vm = host.vm(&cfg.to_string(), NOW).unwrap();
    let refuse = |vm: &mut testkit::proxy_wasm::Vm| {
        let out = vm.request(&[(":method", "GET"), (":path", "/api/modules")], b"", 1);
        assert_eq!(out.status(), 401);
    };
    refuse(&mut vm);
    refuse(&mut vm);
    vm.tick();
    let first = vm.calls()[0].clone();
    let ids = |body: &[u8]| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&first.body).len(), 2);
    // One more waits in the queue; the update comes before the answer.
    refuse(&mut vm);
    let mut vm = vm.update(&cfg.to_string()).unwrap();
    vm.tick();
    let calls = vm.calls();
    assert_eq!(calls.len(), 2, "{:?}", vm.logs());
    let again = ids(&calls[1].body);
    assert_eq!(again.len(), 3, "{again:?}");
    assert_eq!(
        again[..2],
        ids(&first.body)[..],
        "the batch in flight, first"
    );
    vm.respond(calls[1].token, 200);
    assert_eq!(vm.metric("gw_edge.report.sent"), Some(3));
}

#[test]
fn rejected_control_requests_are_reported_in_bounded_batches_on_tick() {
    let host = Host::new();
    let mut cfg = testkit::fixtures::filter_config(2048);
    cfg["report"] = serde_json::json!({"cluster": "sidecar", "period_ms": 100, "max_queued": 3});
    let mut vm = host.vm(&cfg.to_string(), NOW).unwrap();
    assert_eq!(vm.tick_ms(), 100);
    let admin = bearer(&["admin"]);
    let mut tampered = command(1, "dashboard");
    let i = tampered.windows(4).position(|w| w == b"req-").unwrap();
    tampered[i] = b'X';
    let out = vm.request(&post("/api/control/commands", &admin), &tampered, 1);
    assert_eq!(out.code().as_deref(), Some("bad_signature"));
    // Any route's refusal is reported, with its path — and its query only as a
    // digest: it may hold a secret (an RPC provider's key), and the ledger keeps
    // its rows for good.
    let out = vm.request(
        &[
            (":method", "GET"),
            (":path", "/api/modules?api-key=s3cret#x"),
        ],
        b"",
        1,
    );
    assert_eq!(out.status(), 401);
    // A header-phase rejection on a module route: reported without a body.
    let viewer = bearer(&["viewer"]);
    let out = vm.request(&post("/api/control/module/mev:stop", &viewer), b"{}", 1);
    assert_eq!(out.code().as_deref(), Some("forbidden_role"));
    // The queue holds three: a fourth rejection is dropped (counted at the next tick).
    let out = vm.request(&post("/api/control/commands", "Bearer nope"), b"", 1);
    assert_eq!(out.status(), 401);
    let dropped_code = out.code().expect("a code");
    assert!(vm.calls().is_empty(), "nothing is sent outside the tick");

    vm.tick();
    let calls = vm.calls();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call.upstream, "sidecar");
    let h = |k: &str| {
        call.headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(
        (h(":method"), h(":path"), h("content-type")),
        (
            Some("POST"),
            Some("/internal/edge-decisions"),
            Some("application/json")
        )
    );
    // Sealed over its body under the edge key, at the host's time.
    let key = gw_core::edge_stamp::EdgeKey::from_hex(testkit::fixtures::EDGE_KEY_HEX).unwrap();
    let sealed = key.check_report(h("x-gw-stamp"), NOW, &call.body);
    assert_eq!(sealed.map(|s| s.ts), Ok(NOW));
    let reports: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
    // The three queued, and one standing for the rejection that did not fit.
    assert_eq!(reports.as_array().unwrap().len(), 4);
    assert_eq!(reports[3]["unrecorded"], 1, "{reports}");
    assert_eq!(reports[3]["code"], dropped_code.as_str(), "{reports}");
    assert_eq!(
        (reports[3]["path"].as_str(), reports[3]["ts_ms"].as_u64()),
        (Some(""), Some(NOW * 1000))
    );
    assert_eq!(reports[0]["code"], "bad_signature");
    assert_eq!(reports[0]["raw_hex"], hex::encode(&tampered));
    assert_eq!(reports[0]["ts_ms"], NOW * 1000);
    let summary = |r: &serde_json::Value| {
        (
            r["code"].as_str().map(str::to_owned),
            r["path"].as_str().map(str::to_owned),
            r["raw_hex"].as_str().map(str::to_owned),
            r["requester"].as_str().map(str::to_owned),
        )
    };
    let s = |c: &str, p: &str, who: &str| {
        (
            Some(c.to_owned()),
            Some(p.to_owned()),
            Some(String::new()),
            Some(who.to_owned()),
        )
    };
    // The query as its digest: `sha256("api-key=s3cret")`, first 8 bytes.
    assert_eq!(
        summary(&reports[1]),
        s("jwt_missing", "/api/modules?sha256=a1b8473324d91796", "")
    );
    assert_eq!(
        summary(&reports[2]),
        s("forbidden_role", "/api/control/module/mev:stop", "alice")
    );
    assert_eq!(vm.metric("gw_edge.report.dropped"), Some(1));
    // Each report has its own id: this VM's random origin and a sequence number.
    let ids: Vec<&str> = (0..3).map(|i| reports[i]["id"].as_str().unwrap()).collect();
    for id in &ids {
        let (origin, seq) = id.split_once('-').unwrap();
        assert!(
            origin.len() == 16 && origin.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
        assert!(u64::from_str_radix(seq, 16).is_ok(), "{id}");
    }
    assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
    vm.respond(call.token, 200);
    assert_eq!(vm.metric("gw_edge.report.sent"), Some(4));

    // A batch not delivered (503: the sidecar down) is kept and sent again, the same
    // reports with the same ids, after a backoff of 1, then 2 ticks.
    vm.request(&post("/api/control/commands", &admin), &tampered, 1);
    vm.tick();
    let first = vm.calls()[1].clone();
    vm.respond(first.token, 503);
    assert_eq!(vm.metric("gw_edge.report.retried"), Some(1));
    assert_eq!(vm.metric("gw_edge.report.failed"), Some(0));
    vm.tick();
    assert_eq!(vm.calls().len(), 2, "one tick skipped");
    vm.tick();
    let again = vm.calls()[2].clone();
    assert_eq!(again.body, first.body, "the same report again");
    // No answer at all (a timeout, a reset): the same, and the wait doubles.
    vm.respond_without_answer(again.token);
    assert_eq!(vm.metric("gw_edge.report.retried"), Some(2));
    vm.tick();
    vm.tick();
    assert_eq!(vm.calls().len(), 3, "two ticks skipped");
    vm.tick();
    let third = vm.calls()[3].clone();
    assert_eq!(third.body, first.body);
    vm.respond(third.token, 200);
    assert_eq!(vm.metric("gw_edge.report.sent"), Some(5));
    vm.tick();
    assert_eq!(vm.calls().len(), 4, "an empty queue sends nothing");

    // A batch the ledger cannot read (422: a sidecar older than this filter, or
    // one report it refuses) goes again one report per batch: the one it reads
    // is recorded; the one it refuses alone is counted as failed and its code
    // goes into the next sum, which the ledger records; a sum refused alone is
    // let go.
    vm.request(&post("/api/control/commands", &admin), &tampered, 1);
    vm.request(&[(":method", "GET"), (":path", "/api/modules")], b"", 1);
    vm.tick();
    let both = vm.calls()[4].clone();
    let body = |c: &testkit::proxy_wasm::HttpCall| -> Vec<serde_json::Value> {
        serde_json::from_slice(&c.body).unwrap()
    };
    assert_eq!(body(&both).len(), 2);
    vm.respond(both.token, 422);
    assert_eq!(vm.metric("gw_edge.report.failed"), Some(0));
    vm.tick();
    let calls = vm.calls();
    assert_eq!(calls.len(), 7, "one call per report");
    let (one, two) = (calls[5].clone(), calls[6].clone());
    assert_eq!(
        [body(&one), body(&two)].concat(),
        body(&both),
        "the same reports, in order"
    );
    vm.respond(one.token, 200);
    vm.respond(two.token, 422);
    assert_eq!(vm.metric("gw_edge.report.failed"), Some(1));
    vm.tick();
    let sum = vm.calls()[7].clone();
    let sum_body = body(&sum);
    assert_eq!(
        (
            sum_body.len(),
            &sum_body[0]["code"],
            &sum_body[0]["unrecorded"]
        ),
        (1, &serde_json::json!("jwt_missing"), &serde_json::json!(1)),
        "{sum_body:?}"
    );
    vm.respond(sum.token, 422);
    assert_eq!(vm.metric("gw_edge.report.failed"), Some(2));
    vm.tick();
    vm.tick();
    assert_eq!(vm.calls().len(), 8, "a sum refused alone is not sent again");
}

/// The filter verifies with the core's fixed-base tables (`gw_core::edverify`), not
/// with `ed25519-dalek`. Compiled to wasm32 as it runs in Envoy, it must agree with
/// `ed25519-dalek`'s `verify_strict` on valid signatures from fresh keys and on
/// one-bit corruptions of every byte of R and s. (The adversarial cases — small-order
/// R, non-canonical s and R — are held natively by `core/src/edverify/tests.rs`.)
#[test]
fn the_wasm_filter_verifies_signatures_exactly_like_ed25519_dalek() {
    use ed25519_dalek::{Signature, Signer, SigningKey};
    use gw_core::{signing_payload, Command, Module};

    let host = Host::new();
    let admin = bearer(&["admin"]);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        // splitmix64: a fixed, reproducible stream.
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let (mut accepted, mut refused) = (0, 0);
    let mut nonce = 0u64; // unique: the replay copy is per issuer, shared by the VMs
    let mut flips = 0u64;
    for _ in 0..6 {
        let mut seed = [0u8; 32];
        for chunk in seed.chunks_mut(8) {
            chunk.copy_from_slice(&next().to_le_bytes());
        }
        let sk = SigningKey::from_bytes(&seed);
        let mut cfg = testkit::fixtures::filter_config(2048);
        cfg["command_keys"]["keys"][0]["public_key_hex"] =
            hex::encode(sk.verifying_key().as_bytes()).into();
        let mut vm = host.gateway(&cfg.to_string(), NOW).unwrap();
        for i in 0..24u64 {
            nonce += 1;
            let cmd = Command {
                ts: NOW,
                module: Module::Mev.to_proto() as i32,
                action: Action::Throttle.to_proto() as i32,
                args: [("throttle_pct".to_string(), format!("{}", next() % 101))].into(),
                request_id: format!("req-{nonce}"),
                issuer: "dashboard".into(),
                schema_version: "ctrl-v1".into(),
                nonce,
                ..Default::default()
            };
            let payload = signing_payload(&cmd);
            let mut sig = sk.sign(&payload).to_bytes();
            if i % 2 == 1 {
                // One flipped bit; over the run every byte of R and s gets one, and
                // the first flip is R's sign bit.
                let byte = if flips == 0 { 31 } else { (flips * 7) % 64 };
                let bit = if flips == 0 { 7 } else { next() % 8 };
                sig[byte as usize] ^= 1 << bit;
                flips += 1;
            }
            let dalek = sk
                .verifying_key()
                .verify_strict(&payload, &Signature::from_bytes(&sig))
                .is_ok();
            let body = prost::Message::encode_to_vec(&Command {
                sig: sig.to_vec(),
                pubkey_id: "op-admin-1".into(),
                sig_alg: "ed25519-v1".into(),
                ..cmd
            });
            let out = vm.request(&post("/api/control/commands", &admin), &body, 1);
            if dalek {
                assert_eq!(out.status(), 200, "{:?}", out.code());
                accepted += 1;
            } else {
                assert_eq!(
                    (out.status(), out.code().as_deref()),
                    (401, Some("bad_signature"))
                );
                refused += 1;
            }
        }
    }
    assert_eq!((accepted, refused), (72, 72));
}

/// Every edge stat `docs/configuration.md` names is one the filter defines.
#[test]
fn every_documented_edge_stat_is_defined() {
    let doc = std::fs::read_to_string(testkit::workspace_root().join("docs/configuration.md"))
        .expect("docs/configuration.md");
    let mut names = Vec::new();
    for l in doc.lines().filter(|l| l.starts_with("| `gw_edge.")) {
        let name = l.split('`').nth(1).unwrap_or_default();
        match name.strip_suffix("<code>") {
            Some(prefix) => names.extend(
                gw_core::Code::ALL
                    .iter()
                    .map(|c| format!("{prefix}{}", c.as_str())),
            ),
            None => names.push(name.to_owned()),
        }
    }
    assert!(names.len() > 10, "the table was not found");
    let mut cfg: serde_json::Value = serde_json::from_str(&config()).unwrap();
    cfg["report"] = serde_json::json!({"cluster": "sidecar"});
    let vm = Host::new().vm(&cfg.to_string(), NOW).unwrap();
    for n in &names {
        assert!(
            vm.metric(n).is_some() || vm.samples(n).is_some(),
            "documented but not defined: {n}"
        );
    }
}
