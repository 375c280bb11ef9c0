use std::sync::Arc;

use super::*;

fn payload(i: u64) -> Vec<u8> {
    format!("record {i}").into_bytes()
}

fn open(dir: &Path, segment_bytes: u64) -> (Journal, Recovered) {
    Journal::open(
        dir,
        Options {
            segment_bytes,
            ..Options::default()
        },
    )
    .unwrap()
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

#[test]
fn appends_are_recovered_in_order_after_a_restart() {
    let d = testkit::TempDir::new("journal-reopen");
    let (j, rec) = open(d.path(), 1 << 20);
    assert!(rec.is_empty());
    assert_eq!(j.append_blocking(vec![payload(1), payload(2)]).unwrap(), 2);
    assert_eq!(j.append_blocking(vec![payload(3)]).unwrap(), 3);
    drop(j);
    let (j, rec) = open(d.path(), 1 << 20);
    assert_eq!(rec, vec![(1, payload(1)), (2, payload(2)), (3, payload(3))]);
    assert_eq!(j.append_blocking(vec![payload(4)]).unwrap(), 4);
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
                    j.append_blocking(vec![payload(t * 1000 + i)]).unwrap();
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
    drop(j);
    let (_, rec) = open(d.path(), 1 << 30);
    assert_eq!(rec.len(), 1600);
    assert!(rec.windows(2).all(|w| w[1].0 == w[0].0 + 1));
}

#[tokio::test]
async fn async_appends_return_once_durable() {
    let d = testkit::TempDir::new("journal-async");
    let (j, _) = open(d.path(), 1 << 20);
    let lsn = j.append(vec![payload(1)]).await.unwrap();
    assert_eq!(lsn, 1);
    assert!(matches!(
        j.append(vec![vec![0u8; MAX_RECORD_BYTES + 1]]).await,
        Err(JournalError::TooLarge(_))
    ));
}

#[test]
fn a_torn_last_record_is_cut_off_and_nothing_else_is_lost() {
    let d = testkit::TempDir::new("journal-torn");
    let (j, _) = open(d.path(), 1 << 20);
    for i in 1..=3 {
        j.append_blocking(vec![payload(i)]).unwrap();
    }
    drop(j);
    let seg = d.path().join(&segments(d.path())[0]);
    let len = std::fs::metadata(&seg).unwrap().len();
    // A crash in the middle of writing the fourth record.
    let mut torn = std::fs::read(&seg).unwrap();
    let mut fourth = Vec::new();
    segment_frame(&mut fourth, 4, &payload(4));
    torn.extend_from_slice(&fourth[..fourth.len() - 3]);
    std::fs::write(&seg, &torn).unwrap();
    let (j, rec) = open(d.path(), 1 << 20);
    assert_eq!(rec.len(), 3);
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), len, "cut back");
    assert_eq!(j.append_blocking(vec![payload(4)]).unwrap(), 4);
}

fn segment_frame(out: &mut Vec<u8>, lsn: Lsn, p: &[u8]) {
    let len = u32::try_from(p.len()).unwrap();
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
        j.append_blocking(vec![payload(i)]).unwrap();
    }
    drop(j);
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
}

#[test]
fn segments_below_every_hold_are_deleted() {
    let d = testkit::TempDir::new("journal-retention");
    let (j, _) = open(d.path(), 64);
    j.hold("a", 1);
    j.hold("b", 1);
    for i in 1..=10 {
        j.append_blocking(vec![payload(i)]).unwrap();
    }
    let all = segments(d.path()).len();
    // 25-byte records, a new segment past 64 bytes: three records a segment.
    assert!(all >= 4, "small segments roll: {all}");
    j.hold("a", 9);
    j.append_blocking(vec![payload(11)]).unwrap();
    assert!(segments(d.path()).len() >= all, "b still holds everything");
    j.hold("b", 9);
    j.append_blocking(vec![payload(12)]).unwrap();
    // Retention runs on the writer thread after it answers: wait for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while segments(d.path()).len() >= all && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    drop(j);
    let (_, rec) = open(d.path(), 64);
    assert!(rec.first().unwrap().0 <= 9, "what is held is kept");
    assert!(rec.first().unwrap().0 > 1, "what no one holds is gone");
    assert_eq!(rec.last().unwrap().0, 12);
}
