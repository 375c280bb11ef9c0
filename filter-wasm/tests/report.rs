//! The edge-report queue and its configuration (pure; the wasm glue drains it on
//! the root tick).

use gw_core::contract::{EdgeReport, MAX_REPORT_BATCH_BYTES as MAX_BATCH_BYTES};
use gw_filter::report::{ReportConfig, ReportQueue};

fn r(code: &str, raw: usize) -> EdgeReport {
    EdgeReport {
        decision: "rejected".into(),
        code: code.into(),
        path: "/api/control/commands".into(),
        raw_hex: "ab".repeat(raw),
        ts_ms: 1,
        requester: String::new(),
        requester_roles: String::new(),
        token_issuer: String::new(),
    }
}

#[test]
fn bounded_queue_and_batches() {
    let mut q = ReportQueue::default();
    for i in 0..5 {
        assert_eq!(q.push(r(&format!("c{i}"), 1), 3), i < 3);
    }
    assert_eq!((q.len(), q.take_dropped()), (3, 2));
    assert_eq!(q.take_dropped(), 0, "the count resets");
    let (body, n) = q.next_batch(2).unwrap();
    assert_eq!(n, 2);
    let got: Vec<EdgeReport> = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        got.iter().map(|r| r.code.as_str()).collect::<Vec<_>>(),
        ["c0", "c1"]
    );
    let (_, n) = q.next_batch(10).unwrap();
    assert_eq!(n, 1);
    assert!(q.next_batch(10).is_none() && q.is_empty());
}

#[test]
fn batches_stay_under_the_byte_bound() {
    let mut q = ReportQueue::default();
    for _ in 0..10 {
        q.push(r("bad_signature", 100_000), 100);
    }
    q.push(r("huge", MAX_BATCH_BYTES), 100);
    let mut sent = 0;
    while let Some((body, n)) = q.next_batch(1024) {
        assert!(body.len() <= MAX_BATCH_BYTES);
        sent += n;
    }
    assert_eq!(
        (sent, q.take_dropped()),
        (10, 1),
        "the oversized report is dropped, counted"
    );
}

#[test]
fn config_bounds() {
    let c: ReportConfig = serde_json::from_str(r#"{"cluster": "sidecar"}"#).unwrap();
    assert_eq!(c.validate(), Ok(()));
    assert_eq!(c.path, "/internal/edge-decisions");
    let bad: ReportConfig =
        serde_json::from_str(r#"{"cluster": "sidecar", "period_ms": 0}"#).unwrap();
    assert!(bad.validate().is_err());
}
