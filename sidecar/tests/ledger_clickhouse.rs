//! The ledger write path against a real ClickHouse: rows are durable in the spool
//! first, ClickHouse stopped mid-stream then restarted → every row present exactly
//! once, and the chain read back from ClickHouse verifies.

use gw_core::ledger::{verify_chain, LedgerRow};
use gw_sidecar::ledger::spool::Spool as Ledger;
use testkit::clickhouse::ClickHouse;

mod common;

fn row(i: u64) -> LedgerRow {
    testkit::fixtures::ledger_row(i)
}

fn create_table(ch: &ClickHouse) {
    let ddl =
        std::fs::read_to_string(testkit::workspace_root().join("sql/11_control_decisions.sql"))
            .unwrap();
    let body: String = ddl
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    ch.query(body.trim().trim_end_matches(';'));
}

use common::stored;

/// Exactly `n` rows shipped by the sidecar.
fn wait_rows(ch: &ClickHouse, n: usize) -> Vec<LedgerRow> {
    let rows = common::wait_rows(ch, n);
    assert_eq!(rows.len(), n, "rows shipped by the sidecar");
    rows
}

#[test]
fn nothing_lost_nothing_duplicated_across_a_clickhouse_outage() {
    let d = testkit::TempDir::new("ledger-ch");
    let mut ch = ClickHouse::start(d.path());
    create_table(&ch);
    let client =
        clickhouse::Client::default().with_url(format!("http://127.0.0.1:{}", ch.http_port));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let spool = d.path().join("spool");
    let mut ledger = Ledger::open(&spool, client.clone(), "control_decisions", "node-1").unwrap();
    for i in 1..=3 {
        ledger.append(row(i)).unwrap();
    }
    assert_eq!(rt.block_on(ledger.flush()).unwrap(), 3);
    assert_eq!(stored(&ch).len(), 3);

    // ClickHouse goes away: rows keep being sealed and wait in the spool.
    let (http, tcp) = (ch.http_port, ch.tcp_port);
    ch.process.stop();
    for i in 4..=6 {
        ledger.append(row(i)).unwrap();
    }
    assert!(rt.block_on(ledger.flush()).is_err());
    assert_eq!(ledger.pending(), 3);

    // The sidecar restarts too: the spool carries the pending rows and the chain.
    drop(ledger);
    let mut ledger = Ledger::open(&spool, client, "control_decisions", "node-1").unwrap();
    assert_eq!((ledger.pending(), ledger.shipped()), (3, 3));
    let sealed = ledger.append(row(7)).unwrap();
    assert_eq!(sealed.seq, 7);

    let ch = ClickHouse::start_at(d.path(), http, tcp);
    assert_eq!(rt.block_on(ledger.flush()).unwrap(), 4);
    let rows = stored(&ch);
    assert_eq!(
        rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=7).collect::<Vec<_>>()
    );
    assert_eq!(verify_chain(&rows), Ok(7));

    // A batch that landed but whose acknowledgement was lost is retried: not stored twice.
    std::fs::write(spool.join("ledger.shipped"), "3\n").unwrap();
    let mut again = Ledger::open(
        &spool,
        clickhouse::Client::default().with_url(format!("http://127.0.0.1:{http}")),
        "control_decisions",
        "node-1",
    )
    .unwrap();
    assert_eq!(again.pending(), 4);
    rt.block_on(again.flush()).unwrap();
    let count = ch
        .query("SELECT count() FROM control_decisions")
        .trim()
        .to_string();
    assert_eq!(count, "7", "deduplicated by insert_deduplication_token");
}

#[test]
fn a_torn_last_spool_line_is_dropped_and_a_corrupt_one_refused() {
    let d = testkit::TempDir::new("ledger-spool");
    let spool = d.path().join("spool");
    let client = clickhouse::Client::default()
        .with_url(format!("http://127.0.0.1:{}", testkit::free_port()));
    let mut l = Ledger::open(&spool, client.clone(), "control_decisions", "node-1").unwrap();
    l.append(row(1)).unwrap();
    l.append(row(2)).unwrap();
    drop(l);
    let path = spool.join("ledger.spool.jsonl");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"seq\":3,\"ts_");
    std::fs::write(&path, &text).unwrap();
    let mut l = Ledger::open(&spool, client.clone(), "control_decisions", "node-1").unwrap();
    assert_eq!(l.pending(), 2);
    assert_eq!(l.append(row(3)).unwrap().seq, 3);
    drop(l);
    let lines: Vec<String> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    std::fs::write(&path, format!("{}\ngarbage\n{}\n", lines[0], lines[2])).unwrap();
    let err = Ledger::open(&spool, client, "control_decisions", "node-1")
        .err()
        .expect("corrupt")
        .to_string();
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn every_http_decision_lands_in_the_chained_ledger() {
    use gw_core::Action;
    use testkit::fixtures::{command_key, signed_command};

    let d = testkit::TempDir::new("ledger-http");
    let ch = ClickHouse::start(d.path());
    let mut cfg = common::config(&d.path().join("state"), false);
    cfg.file.clickhouse_url = Some(format!("http://127.0.0.1:{}", ch.http_port));
    let served = common::serve(cfg);
    let (rt, http) = (&served.rt, &served.http);
    let url = format!("{}/api/control/commands", served.base);
    let now = common::now();
    let good = signed_command(11, Action::Throttle, now, "dashboard", &[]);
    let mut bad = good.clone();
    let i = bad.windows(4).position(|w| w == b"req-").unwrap();
    bad[i] = b'X';
    let policy_cmd = signed_command(12, Action::Policy, now, "dashboard", &[("ev_min", "0.2")]);
    let statuses: Vec<u16> = [good.clone(), bad, good, policy_cmd]
        .into_iter()
        .map(|b| {
            rt.block_on(async {
                http.post(&url)
                    .header("content-type", "application/x-protobuf")
                    .body(b)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    assert_eq!(statuses, vec![200, 401, 409, 200]);
    // The sidecar's shipper delivers the spool in the background.
    let rows = wait_rows(&ch, 6);
    assert_eq!(verify_chain(&rows), Ok(6));
    let summary: Vec<(&str, &str, &str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r.stage.as_str(),
                r.decision.as_str(),
                r.code.as_str(),
                r.request_id.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("sidecar", "accepted", "", "req-11"),
            ("agent", "applied", "", "req-11"),
            ("sidecar", "rejected", "bad_signature", "Xeq-11"),
            ("sidecar", "rejected", "replay", "req-11"),
            ("sidecar", "accepted", "", "req-12"),
            ("agent", "applied", "", "req-12"),
        ]
    );
    // The audit queries, served by the sidecar.
    let get = |path: &str| served.get_json(path);
    let by_id = get("/api/ledger/request/req-11");
    let decisions: Vec<&str> = by_id
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["decision"].as_str().unwrap())
        .collect();
    assert_eq!(decisions, vec!["accepted", "applied", "rejected"]);
    assert_eq!(by_id[2]["code"], "replay");
    let history = get("/api/ledger/history");
    assert_eq!(history.as_array().unwrap().len(), 6);
    assert_eq!(history[0]["seq"], 6, "newest first");
    let policy = get("/api/ledger/policy-frequency");
    assert_eq!(policy.as_array().unwrap().len(), 1);
    assert_eq!(policy[0]["commands"], 1);
    let verified = get("/api/ledger/verify");
    assert_eq!(
        (
            verified["ok"].clone(),
            verified["chains"][0]["rows"].clone()
        ),
        (true.into(), 6.into())
    );
    // gwctl walks the stored chain; tampering in ClickHouse is caught.
    let gwctl = |port: u16| {
        std::process::Command::new(testkit::gwctl_bin())
            .args([
                "ledger",
                "verify",
                "--clickhouse",
                &format!("http://127.0.0.1:{port}"),
            ])
            .output()
            .unwrap()
    };
    let o = gwctl(ch.http_port);
    assert_eq!(
        (o.status.code(), String::from_utf8_lossy(&o.stdout).trim()),
        (Some(0), "ok 6 rows")
    );
    ch.query("ALTER TABLE control_decisions UPDATE code = 'none' WHERE seq = 2 SETTINGS mutations_sync = 1");
    let o = gwctl(ch.http_port);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("row 2 was altered"),
        "{o:?}"
    );
    let verified = get("/api/ledger/verify");
    assert_eq!(verified["ok"], false);
    assert!(
        verified["chains"][0]["broken"]
            .as_str()
            .unwrap()
            .contains("row 2 was altered"),
        "{verified}"
    );
    ch.query("DELETE FROM control_decisions WHERE seq = 2");
    let o = gwctl(ch.http_port);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("row 2 is missing"),
        "{o:?}"
    );

    // The stored raw message re-verifies offline.
    let raw = hex::decode(&rows[0].raw_hex).unwrap();
    let mut ring = gw_core::KeyRing::new();
    ring.insert(gw_core::keyring::CommandKey::unrestricted(
        "op-admin-1",
        command_key().verifying_key(),
    ))
    .unwrap();
    assert!(gw_core::verify_command(&raw, &ring, None).is_ok());
}
