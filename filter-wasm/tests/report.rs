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
        raw_len: None,
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

/// A refused command's body is carried up to 64 KiB (it used to be dropped whole,
/// with no row, past the batch bound), and the queue is bounded by bytes as well
/// as by count: 65 536 reports of 128 KiB of hex would not fit a wasm32 heap.
#[test]
fn a_large_body_is_cut_and_the_queue_is_bounded_by_bytes() {
    use gw_core::contract::MAX_REPORT_RAW_BYTES;
    use gw_core::Code;
    use gw_filter::report::MAX_QUEUED_BYTES;
    let big = vec![7u8; 300_000];
    let cut = EdgeReport::rejected(Code::BadSignature, "/api/control/commands", &big, 1, None);
    assert_eq!(cut.raw_hex.len(), 2 * MAX_REPORT_RAW_BYTES);
    assert_eq!(cut.raw_len, Some(300_000), "marked as cut");
    let whole = EdgeReport::rejected(Code::BadSignature, "/", &[1, 2], 1, None);
    assert_eq!(whole.raw_len, None);
    assert!(!serde_json::to_string(&whole).unwrap().contains("raw_len"));
    let mut q = ReportQueue::default();
    let mut queued = 0;
    while q.push(cut.clone(), 65_536) {
        queued += 1;
    }
    let each = cut.raw_hex.len();
    assert!(
        queued * each <= MAX_QUEUED_BYTES && (queued + 2) * each > MAX_QUEUED_BYTES,
        "{queued} queued"
    );
    assert_eq!(q.take_dropped(), 1);
    // Each fits a batch; once some are sent there is room again.
    let (body, n) = q.next_batch(1024).unwrap();
    assert!(n >= 1 && body.len() <= MAX_BATCH_BYTES);
    let sent: Vec<EdgeReport> = serde_json::from_slice(&body).unwrap();
    assert_eq!(sent[0], cut);
    assert!(q.push(cut, 65_536));
    assert_eq!(q.take_dropped(), 0);
}
