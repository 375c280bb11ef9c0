use std::sync::Arc;

use super::*;

/// A small transaction that says `i`.
fn payload(i: u64) -> Txn {
    Txn::of(vec![Entry::Forwarded { lsn: i }])
}

/// Recovered `(lsn, i)` of [`payload`] transactions.
type Recovered = Vec<(Lsn, u64)>;

fn open(dir: &Path, segment_bytes: u64) -> (Journal, Recovered) {
    let opened = Journal::open(
        dir,
        Options {
            segment_bytes,
            ..Options::default()
        },
    )
    .unwrap();
    let rec = opened
        .records
        .iter()
        .map(|(lsn, t)| match t.entries[..] {
            [Entry::Forwarded { lsn: i }] => (*lsn, i),
            _ => panic!("{t:?}"),
        })
        .collect();
    (opened.start(None, Vec::new()).unwrap(), rec)
}

fn commit(j: &Journal, i: u64) -> Lsn {
    j.commit_blocking(payload(i)).unwrap().lsn
}

fn segments(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".log"))
        .collect();
    v.sort();
    v
}

/// `stop` writes what was queued before it, ends the writer (any clone's later
/// commit is refused), and leaves the directory to a reopen in this process.
#[test]
fn stop_writes_what_was_queued_and_refuses_the_rest() {
    let d = testkit::TempDir::new("journal-stop");
    let (j, _) = open(d.path(), 4096);
    let other = j.clone();
    // Queued without waiting: still written, since they precede the stop.
    for i in 1..=300 {
        j.commit_detached(payload(i));
    }
    j.stop();
    assert!(matches!(
        other.commit_blocking(payload(301)),
        Err(JournalError::Closed)
    ));
    let (tx, rx) = std::sync::mpsc::channel();
    other.after_queued(Box::new(move || {
        let _ = tx.send(());
    }));
    assert!(rx.recv().is_ok(), "a marker after the stop is still called");
    // A second stop, from another clone, has nothing to wait for.
    other.stop();
    let (j, rec) = open(d.path(), 4096);
    assert_eq!(rec.len(), 300);
    assert!(rec.iter().enumerate().all(|(k, &(_, i))| i == k as u64 + 1));
    assert_eq!(commit(&j, 301), 301);
    j.stop();
}

#[test]
fn appends_are_recovered_in_order_after_a_restart() {
    let d = testkit::TempDir::new("journal-reopen");
    let (j, rec) = open(d.path(), 1 << 20);
    assert!(rec.is_empty());
    assert_eq!(commit(&j, 1), 1);
    assert_eq!(commit(&j, 2), 2);
    assert_eq!(commit(&j, 3), 3);
    j.stop();
    let (j, rec) = open(d.path(), 1 << 20);
    assert_eq!(rec, vec![(1, 1), (2, 2), (3, 3)]);
    assert_eq!(commit(&j, 4), 4);
}

#[test]
fn concurrent_appends_share_fsyncs() {
    let d = testkit::TempDir::new("journal-group");
    let (j, _) = open(d.path(), 1 << 30);
    let j = Arc::new(j);
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let j = j.clone();
            s.spawn(move || {
                for i in 0..200 {
                    commit(&j, t * 1000 + i);
                }
            });
        }
    });
    let batches = j.stats().batches.load(Ordering::Relaxed);
    assert_eq!(j.stats().records.load(Ordering::Relaxed), 1600);
    assert!(
        batches < 1600,
        "group commit: {batches} fsyncs for 1600 records"
    );
    j.stop();
    let (_, rec) = open(d.path(), 1 << 30);
    assert_eq!(rec.len(), 1600);
    assert!(rec.windows(2).all(|w| w[1].0 == w[0].0 + 1));
}

#[tokio::test]
async fn async_appends_return_once_durable() {
    let d = testkit::TempDir::new("journal-async");
    let (j, _) = open(d.path(), 1 << 20);
    let c = j.commit(payload(1)).await.unwrap();
    assert_eq!(c.lsn, 1);
    let huge = Txn::of(vec![Entry::Sends {
        rows: vec![
            crate::sender::audit::SendRow {
                signature: "x".repeat(1 << 20),
                ..crate::sender::audit::SendRow::default()
            };
            17
        ],
    }]);
    let r = j.commit(huge).await;
    assert!(matches!(r, Err(JournalError::TooLarge(_))), "{r:?}");
    // Rows without a chain are refused, and nothing was written for either.
    assert!(matches!(
        j.commit(Txn::of(vec![Entry::row(testkit::fixtures::ledger_row(1))]))
            .await,
        Err(JournalError::NoChain)
    ));
    assert_eq!(j.commit(payload(2)).await.unwrap().lsn, 2);
}

/// A journal of records 1–3 in one segment, closed (its writer dropped): the
/// directory and that segment's path.
fn three_records(name: &str) -> (testkit::TempDir, std::path::PathBuf) {
    let d = testkit::TempDir::new(name);
    let (j, _) = open(d.path(), 1 << 20);
    for i in 1..=3 {
        commit(&j, i);
    }
    j.stop();
    let seg = d.path().join(&segments(d.path())[0]);
    (d, seg)
}

/// A crash in the middle of writing a fourth record after [`three_records`]: the
/// sector holding its first bytes reached the disk, the next not (then the zeros
/// written ahead when `zeros_after`, else the file's end there). Returns the
/// length of the three records.
fn tear_a_fourth_record(seg: &std::path::Path, zeros_after: bool) -> usize {
    let len = frames(1..=3).len();
    // Long enough to reach into the next sector.
    let mut fourth = Vec::new();
    segment_frame(&mut fourth, 4, &[b'x'; 700]);
    let written = (len / 512 + 1) * 512 - len;
    assert!(written < fourth.len());
    let mut torn = std::fs::read(seg).unwrap();
    torn[len..len + written].copy_from_slice(&fourth[..written]);
    if !zeros_after {
        torn.truncate(len + written);
    }
    std::fs::write(seg, &torn).unwrap();
    len
}

/// The bytes of frames `lsns` of [`payload`] transactions.
fn frames(lsns: std::ops::RangeInclusive<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    for i in lsns {
        segment_frame(&mut out, i, &payload(i).encode().unwrap());
    }
    out
}

#[test]
fn appends_write_over_zeros_written_ahead_and_a_restart_goes_on_after_the_records() {
    let d = testkit::TempDir::new("journal-prealloc");
    let (j, _) = open(d.path(), 1 << 20);
    for i in 1..=3 {
        commit(&j, i);
    }
    let seg = d.path().join(&segments(d.path())[0]);
    let b = std::fs::read(&seg).unwrap();
    let records = frames(1..=3);
    // The records, then zeros: the next batches do not grow the file.
    assert!(b.len() >= 64 << 10, "{}", b.len());
    assert_eq!(&b[..records.len()], &records[..]);
    assert!(b[records.len()..].iter().all(|&x| x == 0));
    j.stop();
    let (j, rec) = open(d.path(), 1 << 20);
    assert_eq!(rec, vec![(1, 1), (2, 2), (3, 3)]);
    assert_eq!(commit(&j, 4), 4);
    let b = std::fs::read(&seg).unwrap();
    assert_eq!(
        &b[..frames(1..=4).len()],
        &frames(1..=4)[..],
        "written at the records' end, not after the zeros"
    );
    // Reading back stops at the zeros: record 5 is not there.
    let mut got = Vec::new();
    j.read(2, 4, &mut |lsn, _| {
        got.push(lsn);
        true
    })
    .unwrap();
    assert_eq!(got, vec![2, 3, 4]);
    assert!(matches!(
        j.read(3, 5, &mut |_, _| true),
        Err(JournalError::Corrupt { .. })
    ));
    j.stop();
    let (_, rec) = open(d.path(), 1 << 20);
    assert_eq!(rec.len(), 4);
}

#[test]
fn a_torn_last_record_is_cut_off_and_nothing_else_is_lost() {
    for zeros_after in [false, true] {
        let (d, seg) = three_records("journal-torn");
        let len = tear_a_fourth_record(&seg, zeros_after);
        let (j, rec) = open(d.path(), 1 << 20);
        assert_eq!(rec.len(), 3);
        assert_eq!(
            std::fs::metadata(&seg).unwrap().len(),
            len as u64,
            "cut back"
        );
        assert_eq!(commit(&j, 4), 4);
        j.stop();
        let (_, rec) = open(d.path(), 1 << 20);
        assert_eq!(rec.len(), 4);
    }
}

/// Damage to a record that was written whole — a flipped bit, a bad sector read
/// back as other bytes — is not a torn write, however near the end it lies: the
/// journal refuses to start rather than cut it off with the records after it
/// (acknowledged, all of them: their nonces and state would be lost).
#[test]
fn damage_near_the_end_is_not_taken_for_a_torn_write() {
    let one = frames(1..=1).len();
    let two = frames(1..=2).len();
    // (what, which byte gets which bit flipped)
    let cases = [
        ("a byte of record 2", one + 20, 0x01),
        ("a byte of the last record", two + 20, 0x01),
        // The length then reaches into the zeros after the records: by 256 bytes,
        // by 512 (a sector further: the zeros there read as one never written), by
        // 64 KiB.
        ("the last record's length", two + 1, 0x01),
        ("the last record's length, a sector on", two + 1, 0x02),
        ("the last record's length, 64 KiB on", two + 2, 0x01),
        ("the last record's length, shorter", two, 0x04),
        ("record 2's length", one + 1, 0x01),
        ("record 2's length, a sector on", one + 1, 0x02),
    ];
    for (what, at, bit) in cases {
        let (d, seg) = three_records("journal-bitrot");
        let mut b = std::fs::read(&seg).unwrap();
        b[at] ^= bit;
        refused_as_damaged(d.path(), &seg, &b, "record", what);
    }
}

/// Writes `bytes` as segment `seg` of the journal in `dir`, whose start must
/// refuse them as damaged (the detail saying `says`) and cut nothing.
fn refused_as_damaged(dir: &Path, seg: &Path, bytes: &[u8], says: &str, what: &str) {
    std::fs::write(seg, bytes).unwrap();
    match Journal::open(dir, Options::default()) {
        Err(JournalError::Corrupt { detail, .. }) => {
            assert!(detail.contains(says), "{what}: {detail}");
        }
        Err(e) => panic!("{what}: {e}"),
        Ok(o) => panic!("{what}: opened with {} records", o.records.len()),
    }
    assert_eq!(std::fs::read(seg).unwrap(), bytes, "{what}: nothing cut");
}

/// A sector of acknowledged records lost (read back as zeros: a lost write, a
/// zeroed block) is damage, even near the end of the newest segment, within what
/// one torn batch could span: whole batches written after it say it was durable.
#[test]
fn a_lost_sector_under_acknowledged_records_is_not_taken_for_a_torn_write() {
    let d = testkit::TempDir::new("journal-lost-sector");
    let (j, _) = open(d.path(), 1 << 20);
    for i in 1..=200 {
        commit(&j, i);
    }
    j.stop();
    let seg = d.path().join(&segments(d.path())[0]);
    let mut b = std::fs::read(&seg).unwrap();
    assert!(frames(1..=200).len() > 8192, "the sector is well inside");
    b[4096..4608].fill(0);
    refused_as_damaged(
        d.path(),
        &seg,
        &b,
        "a batch written after it",
        "a lost sector",
    );
}

/// Two batches of three records, the second the last: a sector lost under the
/// first batch's end (its last record's header, the end of the one before) is
/// damage, although the hole took that batch's end mark: the record after it
/// starts a batch. Without the marks (a journal written before them) the same
/// hole reads as a torn last batch, as it always did.
#[test]
fn a_hole_that_took_a_batchs_end_mark_is_still_damage() {
    for marked in [true, false] {
        let d = testkit::TempDir::new("journal-lost-mark");
        let mut b = Vec::new();
        let mut starts = Vec::new();
        for i in 1..=6u64 {
            starts.push(b.len());
            let (first, last) = (i == 1 || i == 4, i == 3 || i == 6);
            batch_frame(&mut b, i, &padded(i, 700), marked && first, marked && last);
        }
        let end = b.len();
        b.resize(end + 4096, 0);
        // The sector holding record 3's header, and not record 4's.
        let sector = starts[2] / 512 * 512;
        assert!(
            sector + 512 <= starts[3] && sector > starts[1],
            "{starts:?}"
        );
        b[sector..sector + 512].fill(0);
        let seg = d.path().join("00000000000000000001.log");
        if marked {
            refused_as_damaged(d.path(), &seg, &b, "a batch written after it", "marked");
        } else {
            std::fs::write(&seg, &b).unwrap();
            let o = Journal::open(d.path(), Options::default()).unwrap();
            let kept = if sector < starts[2] { 1 } else { 2 };
            assert_eq!(o.records.len(), kept, "unmarked: cut at the hole");
        }
    }
}

/// One writer per journal: a second open of a directory whose writer runs (a
/// second sidecar on the same state directory) is refused after a short wait,
/// and succeeds once that writer has stopped.
#[test]
fn a_journal_in_use_is_not_opened_twice() {
    let d = testkit::TempDir::new("journal-lock");
    let (j, _) = open(d.path(), 1 << 20);
    commit(&j, 1);
    let t = std::time::Instant::now();
    match Journal::open(d.path(), Options::default()) {
        Err(JournalError::Locked(dir)) => assert_eq!(dir, d.path()),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("opened while its writer runs"),
    }
    assert!(
        t.elapsed() >= std::time::Duration::from_secs(4),
        "it waited"
    );
    // The first writer's records are untouched, and it goes on.
    assert_eq!(commit(&j, 2), 2);
    j.stop();
    let (_, rec) = open(d.path(), 1 << 20);
    assert_eq!(rec, vec![(1, 1), (2, 2)]);
}

/// The encoded [`payload`] `i`, `pad` spaces longer (JSON allows them at its end).
fn padded(i: u64, pad: usize) -> Vec<u8> {
    let mut p = payload(i).encode().unwrap();
    p.resize(p.len() + pad, b' ');
    p
}

/// A segment of record 1, sized so that record 2 starts at byte 511: one byte of
/// record 2's header — its length's low byte — shares a sector with record 1.
/// Record 2's payload is `len2` bytes. Returns the directory, the segment and its
/// bytes (record 2 then zeros).
fn record_2_at_511(name: &str, len2: usize) -> (testkit::TempDir, std::path::PathBuf, Vec<u8>) {
    let d = testkit::TempDir::new(name);
    let base = payload(1).encode().unwrap().len();
    let mut b = Vec::new();
    segment_frame(&mut b, 1, &padded(1, 511 - 16 - base));
    assert_eq!(b.len(), 511);
    let two = padded(2, len2 - base);
    segment_frame(&mut b, 2, &two);
    b.resize(b.len() + 4096, 0);
    let seg = d.path().join("00000000000000000001.log");
    std::fs::write(&seg, &b).unwrap();
    (d, seg, b)
}

/// Record 2 torn so that the sector holding its first byte was not written and
/// the ones after were: that byte reads as zero, the rest of the record checks
/// but for its length. Torn, not damage: cut off.
#[test]
fn a_record_torn_in_its_first_bytes_sector_only_is_cut_off() {
    let (d, seg, mut b) = record_2_at_511("journal-torn-lead", 700);
    b[511] = 0;
    std::fs::write(&seg, &b).unwrap();
    let (_, rec) = open(d.path(), 1 << 20);
    assert_eq!(rec, vec![(1, 1)]);
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), 511, "cut back");
}

/// The same layout with record 2 whole, its length a multiple of 256 (so that
/// the byte in the first sector is a zero of its own) and a bit flipped in its
/// payload: damage, not a torn write.
#[test]
fn a_zero_length_byte_of_its_own_does_not_make_damage_a_torn_write() {
    let (d, seg, mut b) = record_2_at_511("journal-lead-zero", 768);
    assert_eq!(b[511], 0, "the length's low byte");
    assert!(
        Journal::open(d.path(), Options::default()).is_ok(),
        "whole, it opens"
    );
    b[511 + 16 + 100] ^= 0x01;
    std::fs::write(&seg, &b).unwrap();
    assert!(matches!(
        Journal::open(d.path(), Options::default()),
        Err(JournalError::Corrupt { .. })
    ));
}

/// A crash can leave a later sector of the last batch written and an earlier one
/// not: the batch is cut at its first torn record, whole records after it
/// included (the batch was never acknowledged).
#[test]
fn a_torn_batch_with_a_later_sector_written_is_cut_at_the_tear() {
    let (d, seg) = three_records("journal-torn-middle");
    let len = frames(1..=3).len();
    let mut batch = Vec::new();
    batch_frame(&mut batch, 4, &[b'x'; 1200], true, false);
    let fifth = batch.len();
    batch_frame(&mut batch, 5, b"{}", false, true);
    let mut b = std::fs::read(&seg).unwrap();
    b[len..len + batch.len()].copy_from_slice(&batch);
    // The sector after the one where record 4 starts was not written.
    let hole = (len / 512 + 1) * 512;
    b[hole..hole + 512].fill(0);
    assert!(hole + 512 < len + fifth, "the hole is inside record 4");
    std::fs::write(&seg, &b).unwrap();
    let (j, rec) = open(d.path(), 1 << 20);
    assert_eq!(rec, vec![(1, 1), (2, 2), (3, 3)]);
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        len as u64,
        "cut back"
    );
    assert_eq!(commit(&j, 4), 4);
}

/// A roll that could neither sync the directory nor remove the file it had created
/// leaves an empty segment named for an LSN whose record went on in the segment
/// before it: a start removes it, whether a later roll followed or not.
#[test]
fn an_empty_segment_left_by_a_failed_roll_is_removed_at_start() {
    for later_roll in [false, true] {
        let (d, _) = three_records("journal-leftover");
        let leftover = d.path().join("00000000000000000002.log");
        std::fs::write(&leftover, b"").unwrap();
        if later_roll {
            std::fs::write(d.path().join("00000000000000000004.log"), frames(4..=4)).unwrap();
        }
        let (j, rec) = open(d.path(), 1 << 20);
        let n = if later_roll { 4 } else { 3 };
        assert_eq!(
            rec.iter().map(|r| r.0).collect::<Vec<_>>(),
            (1..=n).collect::<Vec<_>>()
        );
        assert!(!leftover.exists());
        assert_eq!(commit(&j, n + 1), n + 1);
        j.stop();
        assert_eq!(open(d.path(), 1 << 20).1.len() as u64, n + 1);
    }
    // The roll that failed was the newest thing, and a crash then tore the next
    // batch before one of its records was whole: the empty segment is named for
    // the record after the last whole one, and the torn tail is cut as usual.
    let (d, seg) = three_records("journal-leftover-torn");
    tear_a_fourth_record(&seg, true);
    let leftover = d.path().join("00000000000000000004.log");
    std::fs::write(&leftover, b"").unwrap();
    let (j, rec) = open(d.path(), 1 << 20);
    assert_eq!(rec.len(), 3);
    assert!(!leftover.exists());
    assert_eq!(commit(&j, 4), 4);
    // One whose removal failed does not hide the records after its name from a
    // read back.
    std::fs::write(d.path().join("00000000000000000002.log"), b"").unwrap();
    let mut got = Vec::new();
    j.read(3, 4, &mut |lsn, _| {
        got.push(lsn);
        true
    })
    .unwrap();
    assert_eq!(got, vec![3, 4]);
}

/// A crash after a segment was rolled and before the zeros after its records were
/// cut off: they read as its end, at start and when records are read back.
#[test]
fn zeros_left_after_a_closed_segment_read_as_its_end() {
    let d = testkit::TempDir::new("journal-closed-zeros");
    let (j, _) = open(d.path(), 64);
    j.hold("all", 1);
    j.hold(STARTUP_HOLD, Lsn::MAX);
    for i in 1..=6 {
        commit(&j, i);
    }
    j.stop();
    let segs = segments(d.path());
    assert!(segs.len() > 2, "{segs:?}");
    let first = d.path().join(&segs[0]);
    let mut b = std::fs::read(&first).unwrap();
    assert!(
        (1..=6).any(|k| b == frames(1..=k)),
        "a closed segment is cut back to its records"
    );
    b.extend_from_slice(&[0; 4096]);
    std::fs::write(&first, &b).unwrap();
    let (j, rec) = open(d.path(), 64);
    assert_eq!(
        rec.iter().map(|r| r.0).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>()
    );
    let mut got = Vec::new();
    j.read(1, 6, &mut |lsn, _| {
        got.push(lsn);
        true
    })
    .unwrap();
    assert_eq!(got, (1..=6).collect::<Vec<_>>());
}

/// A frame as the journal writes a batch of one record.
fn segment_frame(out: &mut Vec<u8>, lsn: Lsn, p: &[u8]) {
    batch_frame(out, lsn, p, true, true);
}

/// A frame; `first`, `last`: the first, the last of its batch (the marks in its
/// length's two top bits). Neither: a frame written before the marks existed, or
/// one in the middle of its batch.
fn batch_frame(out: &mut Vec<u8>, lsn: Lsn, p: &[u8], first: bool, last: bool) {
    let marks = if first { 1 << 30 } else { 0 } | if last { 1 << 31 } else { 0 };
    let len = u32::try_from(p.len()).unwrap() | marks;
    let mut h = crc32fast::Hasher::new();
    h.update(&lsn.to_le_bytes());
    h.update(p);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(p);
}

#[test]
fn damage_before_the_tail_refuses_to_start() {
    let d = testkit::TempDir::new("journal-damage");
    let (j, _) = open(d.path(), 64);
    for i in 1..=6 {
        commit(&j, i);
    }
    j.stop();
    let segs = segments(d.path());
    assert!(segs.len() > 2, "{segs:?}");
    let first = d.path().join(&segs[0]);
    let mut b = std::fs::read(&first).unwrap();
    let last = b.len() - 1;
    b[last] ^= 0xff;
    std::fs::write(&first, &b).unwrap();
    assert!(matches!(
        Journal::open(d.path(), Options::default()),
        Err(JournalError::Corrupt { .. })
    ));
    // In the last segment, bytes other than zeros beyond what one torn batch can
    // leave, after a damaged record, are damage too.
    let (d, seg) = three_records("journal-damage-far");
    let mut b = std::fs::read(&seg).unwrap();
    let second = frames(1..=1).len();
    b[second] ^= 0xff;
    // Beyond one batch: its payloads, the record that crossed the bound, the headers.
    let far = Options::default().batch_bytes + MAX_RECORD_BYTES + 16 * (MAX_BATCH_JOBS + 1) + 64;
    b.resize(second + far, 0);
    b.push(1);
    std::fs::write(&seg, &b).unwrap();
    assert!(matches!(
        Journal::open(d.path(), Options::default()),
        Err(JournalError::Corrupt { .. })
    ));
    // A record that does not decode is damage too.
    let d = testkit::TempDir::new("journal-undecodable");
    let (j, _) = open(d.path(), 1 << 20);
    commit(&j, 1);
    j.stop();
    let seg = d.path().join(&segments(d.path())[0]);
    let mut b = std::fs::read(&seg).unwrap();
    let mut bad = Vec::new();
    segment_frame(&mut bad, 2, b"\x09not a transaction");
    let end = frames(1..=1).len();
    b[end..end + bad.len()].copy_from_slice(&bad);
    std::fs::write(&seg, &b).unwrap();
    assert!(matches!(
        Journal::open(d.path(), Options::default()),
        Err(JournalError::Corrupt { .. })
    ));
}

#[test]
fn segments_below_every_hold_are_deleted() {
    let d = testkit::TempDir::new("journal-retention");
    let (j, _) = open(d.path(), 64);
    j.hold("a", 1);
    j.hold("b", 1);
    j.hold(STARTUP_HOLD, Lsn::MAX);
    for i in 1..=10 {
        commit(&j, i);
    }
    let all = segments(d.path()).len();
    // Small records, a new segment past 64 bytes.
    assert!(all >= 4, "small segments roll: {all}");
    j.hold("a", 9);
    commit(&j, 11);
    assert!(segments(d.path()).len() >= all, "b still holds everything");
    j.hold("b", 9);
    commit(&j, 12);
    // Retention runs on the writer thread after it answers: wait for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while segments(d.path()).len() >= all && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    j.stop();
    let (_, rec) = open(d.path(), 64);
    assert!(rec.first().unwrap().0 <= 9, "what is held is kept");
    assert!(rec.first().unwrap().0 > 1, "what no one holds is gone");
    assert_eq!(rec.last().unwrap().0, 12);
}

/// Rows are sealed by the writer in journal order, continue the chain across a
/// restart, and a refused transaction does not advance the chain.
#[test]
fn rows_are_sealed_in_order_and_continue_after_a_restart() {
    use gw_core::ledger::{verify_chain, Chain};

    let d = testkit::TempDir::new("journal-rows");
    let opened = Journal::open(d.path(), Options::default()).unwrap();
    let j = opened
        .start(Some(Chain::new("node-1")), Vec::new())
        .unwrap();
    let row = |i| Entry::row(testkit::fixtures::ledger_row(i));
    let a = j.commit_blocking(Txn::of(vec![row(1), row(2)])).unwrap();
    assert_eq!(a.rows.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2]);
    let huge = Txn::of(vec![
        row(3),
        Entry::Sends {
            rows: vec![
                crate::sender::audit::SendRow {
                    signature: "x".repeat(1 << 20),
                    ..crate::sender::audit::SendRow::default()
                };
                17
            ],
        },
    ]);
    assert!(j.commit_blocking(huge).is_err());
    let b = j.commit_blocking(Txn::of(vec![row(4)])).unwrap();
    assert_eq!(b.rows[0].seq, 3, "the refused row took no seq");
    j.stop();
    let opened = Journal::open(d.path(), Options::default()).unwrap();
    let last = opened.last_row().cloned();
    let rows: Vec<_> = opened
        .records
        .iter()
        .flat_map(|(_, t)| t.entries.iter())
        .filter_map(|e| match e {
            Entry::Row(r) => Some(LedgerRow::clone(r)),
            _ => None,
        })
        .collect();
    assert_eq!(verify_chain(&rows), Ok(3));
    let chain = Chain::resume("node-1", last.as_ref()).unwrap();
    let j = opened.start(Some(chain), Vec::new()).unwrap();
    let c = j.commit_blocking(Txn::of(vec![row(5)])).unwrap();
    assert_eq!(c.rows[0].seq, 4);
}

/// Sinks hear of durable transactions in LSN order before the caller does.
#[test]
fn sinks_hear_every_durable_transaction_in_order() {
    struct Log(Mutex<Vec<Lsn>>);
    impl Sink for Log {
        fn committed(&self, lsn: Lsn, _: &Txn) {
            self.0.lock().push(lsn);
        }
    }
    let d = testkit::TempDir::new("journal-sinks");
    let log = Arc::new(Log(Mutex::new(Vec::new())));
    let j = Journal::open(d.path(), Options::default())
        .unwrap()
        .start(None, vec![log.clone() as Arc<dyn Sink>])
        .unwrap();
    for i in 1..=5 {
        let lsn = commit(&j, i);
        assert!(log.0.lock().contains(&lsn), "told before answered");
    }
    assert_eq!(*log.0.lock(), vec![1, 2, 3, 4, 5]);
}

/// Every entry that can be committed decodes again: a send whose score is NaN
/// (JSON writes `null`) once made a restart refuse the journal as damaged.
#[test]
fn a_send_without_a_score_survives_the_journal() {
    let row = crate::sender::audit::SendRow {
        score: f64::NAN,
        tip: f64::INFINITY,
        ..crate::sender::audit::SendRow::default()
    };
    let t = Txn::of(vec![Entry::Sends { rows: vec![row] }]);
    let back = Txn::decode(&t.encode().unwrap()).unwrap();
    let Entry::Sends { rows } = &back.entries[0] else {
        panic!("{back:?}")
    };
    assert!(rows[0].score.is_nan() && rows[0].tip.is_nan());
}

/// A sink that keeps nothing and holds from a fixed record on (an audit queue far
/// behind).
struct Behind(Lsn);

impl Sink for Behind {
    fn committed(&self, _: Lsn, _: &Txn) {}
    fn hold(&self) -> Lsn {
        self.0
    }
    fn audit(&self) -> bool {
        true
    }
}

/// 64-byte segments, and a horizon that follows the holds at once.
fn tiny_no_lag() -> Options {
    Options {
        segment_bytes: 64,
        horizon_lag: std::time::Duration::ZERO,
        ..Options::default()
    }
}

/// Opens `dir` with the horizon: `(every LSN handed to the audit feed, the LSNs
/// kept for the other owners)`.
fn open_horizon(dir: &Path) -> (Opened, Vec<Lsn>, Vec<Lsn>) {
    let mut fed = Vec::new();
    let opened = Journal::open_with(dir, tiny_no_lag(), &mut |lsn, _| fed.push(lsn), true).unwrap();
    let kept = opened.records.iter().map(|(l, _)| *l).collect();
    (opened, fed, kept)
}

/// While a sink (the ledger's queue, ClickHouse away) holds every segment, the
/// horizon follows the other owners' holds: a start hands every record to the
/// audit feed and keeps decoded only those from the horizon's segment on. The
/// horizon never moves back, and without its file everything is kept.
#[test]
fn a_start_keeps_decoded_only_the_records_from_the_horizon_on() {
    let d = testkit::TempDir::new("journal-horizon");
    let opened = Journal::open(d.path(), tiny_no_lag()).unwrap();
    let j = opened
        .start(None, vec![Arc::new(Behind(1)) as Arc<dyn Sink>])
        .unwrap();
    j.hold("owner", 1);
    j.hold(STARTUP_HOLD, Lsn::MAX);
    for i in 1..=20 {
        commit(&j, i);
    }
    // The owner needs records from 15 on; the behind sink keeps every segment.
    j.hold("owner", 15);
    commit(&j, 21);
    let horizon = |d: &Path| read_horizon(d, &super::segment::segments(d).unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while horizon(d.path()) <= 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let h = horizon(d.path());
    assert!(
        h > 1 && h <= 15,
        "horizon {h}: the first record of 15's segment"
    );
    // The owner lowering its hold later does not move the horizon back.
    j.hold("owner", 2);
    commit(&j, 22);
    j.stop();
    assert_eq!(horizon(d.path()), h);
    assert_eq!(
        segments(d.path()).first().map(String::as_str),
        Some("00000000000000000001.log")
    );

    let (opened, fed, kept) = open_horizon(d.path());
    assert_eq!(
        fed,
        (1..=22).collect::<Vec<_>>(),
        "the audit feed gets every record"
    );
    assert_eq!(
        kept,
        (h..=22).collect::<Vec<_>>(),
        "the others get the horizon's tail"
    );
    assert_eq!(opened.scanned, 22);
    // A writer started from this journal opened without the cut, whose owner
    // holds from record 1 again, does not move the horizon back.
    drop(opened);
    let j = Journal::open(d.path(), tiny_no_lag())
        .unwrap()
        .start(None, Vec::new())
        .unwrap();
    j.hold("owner", 1);
    j.hold(STARTUP_HOLD, Lsn::MAX);
    commit(&j, 23);
    j.stop();
    assert_eq!(horizon(d.path()), h);
    // A damaged horizon file is no horizon, nor is one beyond the last segment (a
    // journal replaced under it): everything is kept.
    for bad in ["not a number", "1000000"] {
        std::fs::write(d.path().join(HORIZON), bad).unwrap();
        let (_, _, kept) = open_horizon(d.path());
        assert_eq!(kept, (1..=23).collect::<Vec<_>>(), "{bad}");
    }
}

/// `read` hands back exactly `from..=upto` across segment boundaries, stops when
/// told, and says so when a record is no longer there.
#[test]
fn records_are_read_back_across_segments() {
    let d = testkit::TempDir::new("journal-read");
    let (j, _) = open(d.path(), 64);
    j.hold("all", 1);
    j.hold(STARTUP_HOLD, Lsn::MAX);
    for i in 1..=30 {
        commit(&j, i);
    }
    assert!(segments(d.path()).len() >= 8);
    let read = |from, upto, stop_after: usize| {
        let mut got = Vec::new();
        j.read(from, upto, &mut |lsn, t| {
            assert_eq!(t, payload(lsn));
            got.push(lsn);
            got.len() < stop_after
        })
        .map(|()| got)
    };
    assert_eq!(
        read(1, 30, usize::MAX).unwrap(),
        (1..=30).collect::<Vec<_>>()
    );
    assert_eq!(
        read(7, 19, usize::MAX).unwrap(),
        (7..=19).collect::<Vec<_>>()
    );
    assert_eq!(read(7, 19, 3).unwrap(), vec![7, 8, 9]);
    assert_eq!(read(30, 30, usize::MAX).unwrap(), vec![30]);
    assert!(read(12, 11, usize::MAX).unwrap().is_empty());
    assert!(matches!(
        read(25, 31, usize::MAX),
        Err(JournalError::Corrupt { .. })
    ));
    // Segments below a hold that moved on are gone: their records cannot be read.
    j.hold("all", 20);
    commit(&j, 31);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while read(1, 1, 1).is_ok() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(matches!(
        read(1, 5, usize::MAX),
        Err(JournalError::Corrupt { .. })
    ));
    assert_eq!(
        read(20, 31, usize::MAX).unwrap(),
        (20..=31).collect::<Vec<_>>()
    );
}

/// A batch refused on a failing disk that kept its bytes anyway (written back
/// before the device failed the sync, the cut back not durable): nothing is
/// written over it until the cut is durable, so what comes back at the next start
/// is what the disk kept of it (here all of it) — never mixed with a batch written
/// after it on the same LSNs (without the wait, the later one came back in its
/// place). Healed, the next batch makes the cut durable and is written in its
/// place.
/// (A FUSE disk, `testkit::faultfs`: needs root and `/dev/fuse`.)
#[test]
fn a_refused_batch_a_failing_disk_kept_is_never_mixed_with_a_later_one() {
    let d = testkit::TempDir::new("journal-writeback");
    let dir = d.path().join("journal");
    let disk = testkit::faultfs::FaultFs::mount(&dir)
        .expect("the failing-disk test mounts a FUSE filesystem (needs root and /dev/fuse)");
    let (j, _) = open(&dir, 1 << 20);
    for i in 1..=3 {
        commit(&j, i);
    }
    disk.fail_syncs_after_writeback();
    for i in [4, 5] {
        assert!(
            matches!(j.commit_blocking(payload(i)), Err(JournalError::Io { .. })),
            "{i} on a failing disk"
        );
    }
    j.stop();
    drop(j);
    // Power lost: the first refused batch was written back over durable bytes,
    // its cut back never made durable; the second was never written.
    disk.power_cut();
    disk.heal();
    let (j, rec) = open(&dir, 1 << 20);
    assert_eq!(rec, vec![(1, 1), (2, 2), (3, 3), (4, 4)]);

    // Healed in place: the next batch settles the cut first, then takes its LSN.
    disk.fail_syncs_after_writeback();
    assert!(j.commit_blocking(payload(6)).is_err());
    disk.heal();
    assert_eq!(commit(&j, 7), 5);
    j.stop();
    drop(j);
    disk.power_cut();
    let (j, rec) = open(&dir, 1 << 20);
    assert_eq!(rec, vec![(1, 1), (2, 2), (3, 3), (4, 4), (5, 7)]);
    j.stop();
}

/// A segment a killed process created (a roll: the file made, the directory not
/// synced yet) is taken up at the next start as the current one: its name is
/// made durable then, before any record written to it is acknowledged — a power
/// cut took the file, and every record acknowledged in it, with it.
/// (A FUSE disk, `testkit::faultfs`: needs root and `/dev/fuse`.)
#[test]
fn a_segment_taken_up_at_start_has_its_name_made_durable() {
    let d = testkit::TempDir::new("journal-adopted-segment");
    let dir = d.path().join("journal");
    let disk = testkit::faultfs::FaultFs::mount(&dir)
        .expect("the failing-disk test mounts a FUSE filesystem (needs root and /dev/fuse)");
    let (j, _) = open(&dir, 1 << 20);
    for i in 1..=3 {
        commit(&j, i);
    }
    j.stop();
    drop(j);
    // What a roll killed before its directory sync leaves: the next segment,
    // empty, its name not durable.
    std::fs::File::create(dir.join(format!("{:020}.log", 4))).unwrap();
    let (j, rec) = open(&dir, 1 << 20);
    assert_eq!(rec.len(), 3);
    assert_eq!((commit(&j, 4), commit(&j, 5)), (4, 5));
    j.stop();
    drop(j);
    disk.power_cut();
    let (j, rec) = open(&dir, 1 << 20);
    assert_eq!(rec, vec![(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]);
    j.stop();
}

/// A segment deleted whose directory sync then failed: nothing more is deleted
/// until a sync succeeds, each deletion durable before the next (a filesystem
/// that made a later removal durable first could leave, after a power cut, an
/// older segment without the one after it: a gap no start accepts). Healed, the
/// deletions go on.
/// (A FUSE disk, `testkit::faultfs`: needs root and `/dev/fuse`.)
#[test]
fn a_deletion_whose_directory_sync_failed_holds_the_next_until_one_succeeds() {
    let d = testkit::TempDir::new("journal-dir-sync");
    let dir = d.path().join("journal");
    let disk = testkit::faultfs::FaultFs::mount(&dir)
        .expect("the failing-disk test mounts a FUSE filesystem (needs root and /dev/fuse)");
    // Small segments, all held; then a journal that rolls no more (its rolls
    // sync the directory too).
    let (j, _) = open(&dir, 64);
    j.hold("keep", 1);
    j.hold(STARTUP_HOLD, Lsn::MAX);
    for i in 1..=6 {
        commit(&j, i);
    }
    j.stop();
    drop(j);
    let (j, _) = open(&dir, 1 << 20);
    j.hold("keep", 1);
    j.hold(STARTUP_HOLD, Lsn::MAX);
    let before = segments(&dir);
    assert!(before.len() >= 4, "{before:?}");
    let wait = |what: &str, done: &dyn Fn(&[String]) -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !done(&segments(&dir)) {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: {:?}",
                segments(&dir)
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    };
    disk.fail_dir_syncs();
    j.hold("keep", Lsn::MAX);
    commit(&j, 7);
    wait("the oldest deleted", &|s| s.len() < before.len());
    // Retention runs on the writer thread after each answer: two batches later,
    // the one after 8 has run.
    commit(&j, 8);
    commit(&j, 9);
    assert_eq!(
        segments(&dir),
        before[1..],
        "deleted past an unsynced removal"
    );
    disk.heal();
    commit(&j, 10);
    wait("the rest deleted once the directory syncs", &|s| {
        s.len() == 1
    });
    j.stop();
}
