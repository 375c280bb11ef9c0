//! End to end with every real component: `gwctl send` over HTTP/3 → Envoy with the
//! gw_edge filter → the sidecar → module agent → ClickHouse ledger. Edge rejections
//! never reach the sidecar, so the filter reports them (tick + http_call) and they are
//! chained into the same ledger as `stage = edge` rows; `gwctl ledger verify` then
//! walks the whole chain.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use gw_core::ledger::{verify_chain, LedgerRow};
use gw_core::Action;
use serde_json::{json, Value};
use testkit::clickhouse::ClickHouse;
use testkit::envoy;
use testkit::fixtures::{bearer, filter_config, signed_command};

mod common;
use common::now;

fn gwctl_send(url: &str, file: &Path, token: &str, ca: &Path) -> (String, Option<i32>) {
    let o = Command::new(testkit::gwctl_bin())
        .args([
            "send",
            url,
            file.to_str().unwrap(),
            "--token",
            token,
            "--ca",
        ])
        .arg(ca)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&o.stdout).to_string(),
        o.status.code(),
    )
}

#[test]
fn commands_from_gwctl_through_envoy_reach_the_ledger_with_the_edge_decisions() {
    let d = testkit::TempDir::new("edge-ledger");
    let dir = d.path();
    let ch = ClickHouse::start(dir);
    let cfg = common::config_with_clickhouse(&dir.join("state"), true, &ch);
    let s = common::serve(cfg);
    let sidecar_port: u16 = s.base.rsplit(':').next().unwrap().parse().unwrap();

    let mut fc = filter_config(4096);
    fc["report"] = json!({"cluster": "sidecar", "period_ms": 50});
    let gw = envoy::render_gateway(dir, &fc.to_string(), sidecar_port, &s.certs);
    let (port, admin, certs) = (gw.port, gw.admin.clone(), &gw.certs);
    let envoy_proc = envoy::start_envoy_ready(&gw.config, &admin, dir);
    let t = now();
    let admin_tok = bearer(&["admin"], t);
    let admin_tok = admin_tok.trim_start_matches("Bearer ");
    let viewer_tok = bearer(&["viewer"], t);
    let viewer_tok = viewer_tok.trim_start_matches("Bearer ");
    let url = format!("https://127.0.0.1:{port}/api/control/commands");

    // Accepted over HTTP/3, applied by the mev agent.
    let good = dir.join("good.bin");
    std::fs::write(
        &good,
        signed_command(
            1,
            Action::Throttle,
            t,
            "dashboard",
            &[("throttle_pct", "30")],
        ),
    )
    .unwrap();
    let (out, code) = gwctl_send(&url, &good, admin_tok, &certs.ca);
    assert_eq!(code, Some(0), "{out}\n{}", envoy_proc.log());
    assert!(
        out.starts_with("HTTP/3 200") && out.contains("\"applied\":true"),
        "{out}"
    );
    // The same bytes again: the edge lets a resend through, the sidecar (which knows
    // it was applied) refuses it as a replay and says so.
    let (out, code) = gwctl_send(&url, &good, admin_tok, &certs.ca);
    assert!(
        out.starts_with("HTTP/3 409") && out.contains("already accepted"),
        "{out}"
    );
    assert_eq!(code, Some(0), "applied by the first send: {out}");
    // Rejected at the edge: another command reusing the nonce, a tampered signature,
    // a viewer sending a command.
    let reuse = dir.join("reuse.bin");
    std::fs::write(
        &reuse,
        signed_command(
            1,
            Action::Throttle,
            t,
            "dashboard",
            &[("throttle_pct", "31")],
        ),
    )
    .unwrap();
    let (out, code) = gwctl_send(&url, &reuse, admin_tok, &certs.ca);
    assert!(
        out.starts_with("HTTP/3 409") && out.contains("replay"),
        "{out}"
    );
    assert_eq!(code, Some(1), "another command on a used nonce: {out}");
    let mut tampered = signed_command(2, Action::Start, t, "dashboard", &[]);
    let i = tampered.windows(4).position(|w| w == b"req-").unwrap();
    tampered[i] = b'X';
    let bad = dir.join("bad.bin");
    std::fs::write(&bad, tampered).unwrap();
    let (out, _) = gwctl_send(&url, &bad, admin_tok, &certs.ca);
    assert!(
        out.starts_with("HTTP/3 401") && out.contains("bad_signature"),
        "{out}"
    );
    let third = dir.join("third.bin");
    std::fs::write(&third, signed_command(3, Action::Kill, t, "dashboard", &[])).unwrap();
    let (out, _) = gwctl_send(&url, &third, viewer_tok, &certs.ca);
    assert!(
        out.starts_with("HTTP/3 403") && out.contains("forbidden_role"),
        "{out}"
    );

    // The original JSON route over HTTP/2 + TLS: the sidecar signs, the agent applies.
    let client = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&certs.ca).unwrap()).unwrap(),
        )
        .build()
        .unwrap();
    let base = format!("https://localhost:{port}");
    let (status, body): (u16, Value) = s.rt.block_on(async {
        let r = client
            .post(format!("{base}/api/control/module/arbitrage:start"))
            .bearer_auth(admin_tok)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    });
    assert_eq!(
        (status, body["applied"].clone()),
        (200, Value::Bool(true)),
        "{body}"
    );
    let modules: Value = s.rt.block_on(async {
        client
            .get(format!("{base}/api/modules"))
            .bearer_auth(admin_tok)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert_eq!(modules["mev"]["throttle_pct"], 30);
    assert_eq!(modules["arbitrage"]["state"], "running");
    assert_eq!(
        modules["mev"]["state"], "stopped",
        "the viewer's kill never applied"
    );

    // Every decision, edge ones included, in one verified chain.
    let rows = common::wait_rows(&ch, 11);
    assert_eq!(verify_chain(&rows), Ok(11), "{rows:#?}");
    let mut got: Vec<(String, String, String, String)> = rows
        .iter()
        .map(|r| {
            let id = if r.request_id.starts_with("req-") || r.request_id.starts_with("Xeq-") {
                r.request_id.clone()
            } else if r.request_id.is_empty() {
                String::new()
            } else {
                "<uuid>".into()
            };
            (r.stage.clone(), r.decision.clone(), r.code.clone(), id)
        })
        .collect();
    got.sort();
    let mut want: Vec<(String, String, String, String)> = [
        ("agent", "applied", "", "<uuid>"),
        ("agent", "applied", "", "req-1"),
        ("edge", "accepted", "", "<uuid>"),
        ("edge", "accepted", "", "req-1"),
        ("edge", "accepted", "", "req-1"),
        ("edge", "rejected", "bad_signature", "Xeq-2"),
        ("edge", "rejected", "forbidden_role", ""),
        ("edge", "rejected", "replay", "req-1"),
        ("sidecar", "accepted", "", "<uuid>"),
        ("sidecar", "accepted", "", "req-1"),
        ("sidecar", "rejected", "replay", "req-1"),
    ]
    .iter()
    .map(|(a, b, c, d)| (a.to_string(), b.to_string(), c.to_string(), d.to_string()))
    .collect();
    want.sort();
    assert_eq!(got, want);
    // The JSON route's rows name one request: the edge's too (the request id the
    // sidecar gave the command it signed, the route's module and action; the
    // body the edge saw; no signing fields, which are the sidecar's).
    let json_rows: Vec<_> = rows
        .iter()
        .filter(|r| r.route == "/api/control/module/arbitrage:start")
        .collect();
    let ids: std::collections::BTreeSet<_> = json_rows.iter().map(|r| &r.request_id).collect();
    assert_eq!((json_rows.len(), ids.len()), (2, 1), "{json_rows:#?}");
    let edge_row = json_rows.iter().find(|r| r.stage == "edge").unwrap();
    assert_eq!(
        (edge_row.module.as_str(), edge_row.action.as_str()),
        ("arbitrage", "start")
    );
    assert_eq!((edge_row.pubkey_id.as_str(), edge_row.nonce), ("", 0));
    assert!(hex::decode(&edge_row.raw_hex).unwrap().starts_with(b"{"));
    // The edge replay row carries the raw command: it re-verifies offline.
    let replay = rows.iter().find(|r| r.code == "replay").unwrap();
    assert_eq!(
        hex::decode(&replay.raw_hex).unwrap(),
        std::fs::read(&good).unwrap()
    );

    let o = Command::new(testkit::gwctl_bin())
        .args(["ledger", "verify", "--clickhouse"])
        .arg(format!("http://127.0.0.1:{}", ch.http_port))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "ok 11 rows");
    // Envoy counted the reports it delivered.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, stats) = envoy::admin_get(&admin, "/stats?filter=gw_edge.report").unwrap();
        if stats.contains("gw_edge.report.sent: 3") {
            break;
        }
        assert!(Instant::now() < deadline, "{stats}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Posts a batch of edge reports to the sidecar as the edge does: the status and
/// the answer.
fn post_reports(s: &common::Served, body: &Value) -> (u16, Value) {
    s.rt.block_on(async {
        let r = common::edge_reports(
            s.http.post(format!("{}/internal/edge-decisions", s.base)),
            body,
        )
        .send()
        .await
        .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    })
}

#[test]
fn bad_edge_reports_are_refused_whole() {
    let d = testkit::TempDir::new("edge-report-bad");
    let ch = ClickHouse::start(d.path());
    let cfg = common::config_with_clickhouse(&d.path().join("state"), false, &ch);
    let s = common::serve(cfg);
    let post = |body: Value| post_reports(&s, &body);
    let ok = json!({"decision": "rejected", "code": "stale", "path": "/api/control/commands", "raw_hex": "", "ts_ms": 1});
    let unknown =
        json!({"decision": "rejected", "code": "whatever", "path": "/", "raw_hex": "", "ts_ms": 1});
    let (status, body) = post(json!([ok.clone(), unknown]));
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("malformed")),
        "{body}"
    );
    let (status, body) = post(
        json!([ok.clone(), {"decision": "rejected", "code": "stale", "path": "/", "raw_hex": "zz", "ts_ms": 1}]),
    );
    assert_eq!(status, 400, "{body}");
    // A report id is short and of [0-9a-z-].
    for id in ["Upper-1", "a b", &"x".repeat(65)] {
        let mut bad = ok.clone();
        bad["id"] = json!(id);
        let (status, body) = post(json!([ok.clone(), bad]));
        assert_eq!(status, 400, "{id}: {body}");
    }
    // A path with a query (a filter that kept it): recorded with the query's
    // digest only (`sha256("api-key=s3cret")`, 8 bytes), as the filter now
    // reports it: the query may hold a secret, and the ledger keeps rows for good.
    let mut ok = ok;
    ok["path"] = json!("/api/control/commands?api-key=s3cret");
    let (status, body) = post(json!([ok]));
    assert_eq!((status, body["recorded"].clone()), (200, json!(1)));
    let rows = common::wait_rows(&ch, 1);
    assert_eq!(rows.len(), 1, "only the good batch was written");
    assert_eq!(
        (
            rows[0].stage.as_str(),
            rows[0].code.as_str(),
            rows[0].route.as_str()
        ),
        (
            "edge",
            "stale",
            "/api/control/commands?sha256=a1b8473324d91796"
        )
    );
    // A body the edge kept only the start of: the row says so.
    let cut = json!({"decision": "rejected", "code": "bad_signature", "path": "/api/control/commands",
        "raw_hex": "0a0b", "raw_len": 300000, "ts_ms": 1});
    let (status, _) = post(json!([cut]));
    assert_eq!(status, 200);
    let rows = common::wait_rows(&ch, 2);
    assert_eq!(rows[1].raw_hex, "0a0b");
    let note: Value = serde_json::from_str(&rows[1].args_json).unwrap();
    assert_eq!(
        note,
        json!({"raw_bytes": 300000, "raw_kept": 2, "edge_ts_ms": 1})
    );
}

/// A report standing for refusals the edge could not queue (`unrecorded: n`)
/// is a row summing them (`{"unrecorded": n}` with its id, its code, no
/// requester), recorded once whatever the resends of its batch — after a
/// restart too (its id is read back from the journal); one that carries more
/// than its count is refused with its batch.
#[test]
fn refusals_the_edge_could_not_queue_are_summed_in_a_row() {
    let d = testkit::TempDir::new("edge-report-sum");
    let ch = ClickHouse::start(d.path());
    let cfg = || common::config_with_clickhouse(&d.path().join("state"), false, &ch);
    let s = common::serve(cfg());
    let sum = json!({"decision": "rejected", "code": "jwt_missing", "path": "", "raw_hex": "",
        "ts_ms": 5, "id": "00000000000000ab-9", "unrecorded": 41});
    let mut bad = sum.clone();
    bad["path"] = json!("/api/modules");
    bad["id"] = json!("00000000000000ab-a");
    let (status, body) = post_reports(&s, &json!([bad]));
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("malformed")),
        "{body}"
    );
    let (status, body) = post_reports(&s, &json!([sum.clone()]));
    assert_eq!(status, 200, "{body}");
    // The batch again (its answer lost): recorded once.
    let (status, body) = post_reports(&s, &json!([sum.clone()]));
    assert_eq!(
        (status, body["duplicates"].clone()),
        (200, json!(1)),
        "{body}"
    );
    let rows = common::wait_rows(&ch, 1);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let rows_now = common::stored(&ch);
    assert_eq!(rows_now.len(), 1, "{rows_now:#?}");
    let r = &rows[0];
    assert_eq!(
        (
            r.stage.as_str(),
            r.decision.as_str(),
            r.code.as_str(),
            r.requester.as_str()
        ),
        ("edge", "rejected", "jwt_missing", "")
    );
    let note: Value = serde_json::from_str(&r.args_json).unwrap();
    assert_eq!(
        note,
        json!({"unrecorded": 41, "report_id": "00000000000000ab-9", "edge_ts_ms": 5})
    );
    let metrics = s.get_ops("/metrics");
    assert!(
        metrics.contains(r#"gw_sidecar_refusals_unrecorded_total{code="jwt_missing"} 41"#),
        "{metrics}"
    );
    // Restarted (the answer lost in a crash): the resend is known recorded.
    drop(s);
    let s = common::serve(cfg());
    let (status, body) = post_reports(&s, &json!([sum]));
    assert_eq!(
        (status, body["duplicates"].clone()),
        (200, json!(1)),
        "{body}"
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(common::stored(&ch).len(), 1);
}

/// The edge reports every request it refuses, and anyone who reaches Envoy can
/// make it refuse one (no token at all), of several codes: the ledger takes
/// those reports within a budget (of all codes, and of each). A flood of three
/// codes with no token gets rows up to the budget and sums beyond it; a token
/// holder's refused signed command, reported in the middle of it, has its own
/// row (reports naming a requester have a budget of their own), and so it does
/// after another holder's flood of the same code (each holder has a share of
/// its own); every report is accounted for, once the flood stops, with no later
/// report to carry the sum.
#[test]
fn edge_reports_beyond_the_ledgers_budget_are_summed_per_code() {
    use gw_sidecar::serve::{
        EDGE_REPORT_ROWS_BURST as BURST, EDGE_REPORT_ROWS_PER_HOLDER_BURST as HOLDER_BURST,
        EDGE_REPORT_ROWS_PER_SEC as PER_SEC,
    };
    let d = testkit::TempDir::new("edge-report-budget");
    let ch = ClickHouse::start(d.path());
    let cfg = common::config_with_clickhouse(&d.path().join("state"), false, &ch);
    let s = common::serve(cfg);
    let post = |body: Value| -> Value {
        let (status, answer) = post_reports(&s, &body);
        assert_eq!(status, 200, "{answer}");
        answer
    };
    let report = |code: &str, who: &str| {
        json!({"decision": "rejected", "code": code, "path": "/api/x", "raw_hex": "",
            "ts_ms": 1, "requester": who})
    };
    let codes = ["jwt_missing", "jwt_malformed", "method_not_allowed"];
    let each = 400;
    let started = Instant::now();
    let mut unrecorded = 0u64;
    for batch in 0..4 {
        let mut reports: Vec<Value> = codes
            .iter()
            .flat_map(|c| vec![report(c, ""); each / 4])
            .collect();
        if batch == 2 {
            // More than the code's budget (one holder would take it all).
            reports.extend(vec![
                report("bad_signature", "mallory");
                3 * HOLDER_BURST as usize
            ]);
            reports.push(report("bad_signature", "alice"));
        }
        let answer = post(Value::Array(reports));
        unrecorded += answer["unrecorded"].as_u64().unwrap();
    }
    let took = started.elapsed().as_secs_f64();
    let flood = (codes.len() * each) as f64;
    let mallory = 3 * HOLDER_BURST as u64;
    // The anonymous budget of all codes, at most: its burst, and its refill.
    let most = BURST + PER_SEC * took;
    assert!(
        unrecorded as f64 >= flood - most + (mallory as f64 - HOLDER_BURST - 10.0 * took),
        "{unrecorded} of {flood} + {mallory} unrecorded in {took:.2} s"
    );
    let sum_of =
        |r: &LedgerRow| serde_json::from_str::<Value>(&r.args_json).ok()?["unrecorded"].as_u64();
    let deadline = Instant::now() + Duration::from_secs(30);
    let rows = loop {
        let rows = common::stored(&ch);
        if rows.iter().filter_map(sum_of).sum::<u64>() >= unrecorded {
            break rows;
        }
        assert!(Instant::now() < deadline, "the sums were not written");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(rows.iter().all(|r| r.stage == "edge"));
    let (sums, own): (Vec<&LedgerRow>, Vec<&LedgerRow>) =
        rows.iter().partition(|r| sum_of(r).is_some());
    assert!(sums.iter().all(
        |r| (codes.contains(&r.code.as_str()) || r.code == "bad_signature") && r.route.is_empty()
    ));
    assert_eq!(
        sums.iter().filter_map(|r| sum_of(r)).sum::<u64>(),
        unrecorded
    );
    assert_eq!(own.len() as u64 + unrecorded, flood as u64 + mallory + 1);
    assert_eq!(
        own.iter()
            .filter(|r| r.code == "bad_signature" && r.requester == "alice")
            .count(),
        1,
        "the token holder's refusal has its row"
    );
    let metrics = s.get_ops("/metrics");
    let counted: u64 = codes
        .iter()
        .chain(&["bad_signature"])
        .map(|c| {
            let needle = format!("gw_sidecar_refusals_unrecorded_total{{code=\"{c}\"}} ");
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(needle.as_str()))
                .map_or(0, |v| v.trim().parse::<u64>().unwrap())
        })
        .sum();
    assert_eq!(counted, unrecorded, "{metrics}");
    // The console's count of refusals is of refusals, sums included, not rows.
    let refusals: Value = serde_json::from_str(&s.get_text("/api/ledger/refusals")).unwrap();
    let count = |code: &str| {
        refusals["by_code"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["code"] == code && c["stage"] == "edge")
            .map(|c| c["count"].as_u64().unwrap())
            .sum::<u64>()
    };
    for code in codes {
        assert_eq!(count(code), each as u64, "{code}: {refusals}");
    }
    assert_eq!(count("bad_signature"), mallory + 1, "{refusals}");
    let per_minute: u64 = refusals["per_minute"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["count"].as_u64().unwrap())
        .sum();
    assert_eq!(per_minute, flood as u64 + mallory + 1, "{refusals}");
}
