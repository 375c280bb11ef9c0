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
        id: String::new(),
        unrecorded: None,
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
    let b = q.next_batch(2).unwrap();
    assert_eq!(b.reports.len(), 2);
    let got: Vec<EdgeReport> = serde_json::from_slice(&b.body).unwrap();
    assert_eq!(got, b.reports, "the body is the batch's reports");
    assert_eq!(
        got.iter().map(|r| r.code.as_str()).collect::<Vec<_>>(),
        ["c0", "c1"]
    );
    let rest = q.next_batch(10).unwrap();
    assert_eq!(rest.reports.len(), 1);
    assert!(q.next_batch(10).is_none() && q.is_empty());
    assert_eq!(q.in_flight(), 3);
    q.delivered(b.reports);
    q.delivered(rest.reports);
    assert_eq!(q.in_flight(), 0);
}

/// Reports that did not fit are counted by code, and a tick queues one report
/// per code standing for them (`unrecorded: n`, no path, body or requester),
/// unless one of the code is still out: a report never changes once sent (a
/// batch put back after a lost answer may have been recorded under its id),
/// and at most one per code is out. Every refusal is accounted for.
#[test]
fn dropped_reports_are_summed_per_code() {
    let mut q = ReportQueue::new(0xabc);
    assert!(q.push(r("stale", 1), 2));
    assert!(q.push(r("stale", 1), 2));
    for code in ["jwt_missing", "jwt_missing", "stale"] {
        assert!(!q.push(r(code, 1), 2));
    }
    assert_eq!(q.take_dropped(), 3);
    q.sum_dropped(7_000);
    let sums = |b: &[EdgeReport]| {
        b.iter()
            .filter(|r| r.unrecorded.is_some())
            .map(|r| {
                (
                    r.code.clone(),
                    r.unrecorded,
                    r.path.clone(),
                    r.raw_hex.clone(),
                    r.ts_ms,
                )
            })
            .collect::<Vec<_>>()
    };
    // More dropped while the sums wait: counted for later, the sums unchanged.
    assert!(!q.push(r("jwt_missing", 1), 2));
    q.sum_dropped(8_000);
    let b = q.next_batch(10).unwrap();
    assert_eq!(
        sums(&b.reports),
        [
            (
                "jwt_missing".to_owned(),
                Some(2),
                String::new(),
                String::new(),
                7_000
            ),
            (
                "stale".to_owned(),
                Some(1),
                String::new(),
                String::new(),
                7_000
            ),
        ]
    );
    assert_eq!(b.reports.len(), 4, "the two reports and the two sums");
    for s in b.reports.iter().filter(|r| r.unrecorded.is_some()) {
        assert!(s.id.starts_with("0000000000000abc-"), "{}", s.id);
        assert!(s.check().is_ok_and(|c| c.unrecorded == s.unrecorded));
    }
    // Put back (no answer): sent again as they were, nothing added.
    assert!(!q.push(r("jwt_missing", 1), 2));
    q.put_back(b.reports, b.alone);
    q.sum_dropped(9_000);
    let again = q.next_batch(10).unwrap();
    assert_eq!(sums(&again.reports)[0].1, Some(2), "unchanged once sent");
    assert_eq!(
        again.reports.len(),
        4,
        "no second sum of a code while one is out"
    );
    // Delivered: what waited (two jwt_missing) goes in a new sum.
    q.delivered(again.reports);
    q.sum_dropped(10_000);
    let next = q.next_batch(10).unwrap();
    assert_eq!(
        sums(&next.reports),
        [(
            "jwt_missing".to_owned(),
            Some(2),
            String::new(),
            String::new(),
            10_000
        )]
    );
    // Nothing dropped: nothing summed.
    q.delivered(next.reports);
    q.sum_dropped(11_000);
    assert!(q.next_batch(10).is_none());
}

/// Reports in flight still count against the bounds; one put back goes first
/// again, in its order, with its id; once delivered they make room.
#[test]
fn reports_stay_until_delivered() {
    let mut q = ReportQueue::new(0xabc);
    for i in 0..3 {
        assert!(q.push(r(&format!("c{i}"), 1), 3));
    }
    let b = q.next_batch(2).unwrap();
    assert_eq!(
        b.reports.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["0000000000000abc-0", "0000000000000abc-1"]
    );
    assert!(!q.push(r("c3", 1), 3), "in flight, still counted");
    assert_eq!(q.take_dropped(), 1);
    q.put_back(b.reports, b.alone);
    assert_eq!((q.len(), q.in_flight()), (3, 0));
    let again = q.next_batch(10).unwrap();
    assert_eq!(
        again
            .reports
            .iter()
            .map(|r| (r.code.as_str(), r.id.as_str()))
            .collect::<Vec<_>>(),
        [
            ("c0", "0000000000000abc-0"),
            ("c1", "0000000000000abc-1"),
            ("c2", "0000000000000abc-2")
        ]
    );
    q.delivered(again.reports);
    assert!(q.push(r("c3", 1), 3));
    let last = q.next_batch(10).unwrap();
    assert_eq!(last.reports[0].id, "0000000000000abc-3", "no id skipped");
    // A report with an id keeps it.
    let mut own = r("c4", 1);
    own.id = "given".into();
    assert!(q.push(own, 3));
    assert_eq!(q.next_batch(1).unwrap().reports[0].id, "given");
}

/// A batch the ledger refused (it cannot read it) goes again one report per
/// batch, first; a report refused alone is counted under its code for the next
/// sum; a sum refused alone is let go.
#[test]
fn a_refused_batch_goes_again_one_report_per_batch() {
    let mut q = ReportQueue::new(1);
    for c in ["a", "b", "c"] {
        assert!(q.push(r(c, 1), 10));
    }
    let b = q.next_batch(10).unwrap();
    assert_eq!(q.refused(b.reports), 0, "several: none let go");
    for c in ["d", "e"] {
        assert!(q.push(r(c, 1), 10));
    }
    let codes =
        |b: &gw_filter::report::Batch| b.reports.iter().map(|r| r.code.clone()).collect::<Vec<_>>();
    let ones: Vec<_> = (0..3).map(|_| q.next_batch(10).unwrap()).collect();
    assert_eq!(
        ones.iter().map(codes).collect::<Vec<_>>(),
        [["a"], ["b"], ["c"]]
    );
    assert!(ones.iter().all(|b| b.alone));
    // One that goes alone and is put back (no answer) goes alone again.
    let mut ones = ones.into_iter();
    let last = ones.next_back().unwrap();
    q.put_back(last.reports, last.alone);
    let again = q.next_batch(10).unwrap();
    assert_eq!((codes(&again), again.alone), (vec!["c".to_owned()], true));
    let ones = ones.chain([again]);
    let rest = q.next_batch(10).unwrap();
    assert_eq!(codes(&rest), ["d", "e"], "the others batched again");
    assert!(!rest.alone);
    // A batch put back in front of one that goes alone (both answered nothing)
    // does not take its mark: each goes as it went.
    let (mut r2, mut q2) = (ReportQueue::new(2), Vec::new());
    for c in ["x", "y", "p", "z"] {
        assert!(r2.push(r(c, 1), 10));
    }
    let xy = r2.next_batch(2).unwrap();
    let p = r2.next_batch(1).unwrap();
    r2.put_back(p.reports, true);
    q2.push(r2.next_batch(10).unwrap());
    assert_eq!((codes(&q2[0]), q2[0].alone), (vec!["p".to_owned()], true));
    let p = q2.pop().unwrap();
    r2.put_back(p.reports, p.alone);
    r2.put_back(xy.reports, xy.alone);
    let again: Vec<_> = std::iter::from_fn(|| r2.next_batch(10)).collect();
    assert_eq!(
        again
            .iter()
            .map(|b| (codes(b), b.alone))
            .collect::<Vec<_>>(),
        [
            (vec!["x".to_owned(), "y".to_owned()], false),
            (vec!["p".to_owned()], true),
            (vec!["z".to_owned()], false),
        ]
    );
    let mut ones = ones.into_iter();
    let (a, b, c) = (
        ones.next().unwrap(),
        ones.next().unwrap(),
        ones.next().unwrap(),
    );
    q.delivered(a.reports);
    q.delivered(c.reports);
    assert_eq!(q.refused(b.reports), 1);
    q.sum_dropped(5_000);
    let sum = q.next_batch(10).unwrap();
    assert_eq!(
        sum.reports
            .iter()
            .map(|r| (r.code.as_str(), r.unrecorded))
            .collect::<Vec<_>>(),
        [("b", Some(1))]
    );
    assert_eq!(q.refused(sum.reports), 1);
    q.sum_dropped(6_000);
    assert!(q.next_batch(10).is_none(), "a sum refused alone is let go");
    assert_eq!(q.in_flight(), 2);
    q.delivered(rest.reports);
    assert_eq!((q.in_flight(), q.len()), (0, 0));
}

#[test]
fn answers_and_backoff() {
    use gw_filter::report::{Backoff, Outcome};
    assert_eq!(Outcome::of(200), Outcome::Delivered);
    assert_eq!(Outcome::of(204), Outcome::Delivered);
    for s in [400, 413, 415, 422] {
        assert_eq!(Outcome::of(s), Outcome::Refused, "{s}");
    }
    for s in [0, 401, 403, 404, 429, 500, 502, 503, 504] {
        assert_eq!(Outcome::of(s), Outcome::Retry, "{s}");
    }
    assert_eq!(Backoff::cap(200), 25);
    assert_eq!(Backoff::cap(60_000), 1);
    let mut b = Backoff::default();
    assert_eq!(b.batches_now(4, 0), 4);
    assert_eq!(b.batches_now(4, 3), 4, "batches in flight do not hold back");
    // Waits of 1, 2, 4, 8 ticks, then the cap; then one batch at a time.
    let mut waits = Vec::new();
    for _ in 0..6 {
        b.failed(10);
        let mut skipped = 0;
        while b.batches_now(4, 0) == 0 {
            skipped += 1;
        }
        waits.push(skipped);
    }
    assert_eq!(waits, [1, 2, 4, 8, 10, 10]);
    assert_eq!(b.batches_now(4, 0), 1, "probing");
    assert_eq!(b.batches_now(4, 1), 0, "a probe unanswered: nothing more");
    b.succeeded();
    assert_eq!(b.batches_now(4, 1), 4);
}

#[test]
fn batches_stay_under_the_byte_bound() {
    let mut q = ReportQueue::default();
    for _ in 0..10 {
        q.push(r("bad_signature", 100_000), 100);
    }
    q.push(r("huge", MAX_BATCH_BYTES), 100);
    let mut sent = 0;
    while let Some(b) = q.next_batch(1024) {
        assert!(b.body.len() <= MAX_BATCH_BYTES);
        sent += b.reports.len();
        q.delivered(b.reports);
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
    let b = q.next_batch(1024).unwrap();
    assert!(!b.reports.is_empty() && b.body.len() <= MAX_BATCH_BYTES);
    let sent: Vec<EdgeReport> = serde_json::from_slice(&b.body).unwrap();
    assert_eq!(sent[0].raw_hex, cut.raw_hex);
    assert!(!q.push(cut.clone(), 65_536), "in flight: still held");
    q.take_dropped();
    q.delivered(b.reports);
    assert!(q.push(cut, 65_536));
    assert_eq!(q.take_dropped(), 0);
}
