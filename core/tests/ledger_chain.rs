//! The audit ledger hash chain: intact chains verify; removal, alteration and
//! reordering are detected.

use gw_core::ledger::{verify_chain, Chain, ChainError, LedgerRow, GENESIS};

fn parse_hash(s: &str) -> [u8; 32] {
    hex::decode(s).unwrap().try_into().unwrap()
}

fn row(i: u64) -> LedgerRow {
    testkit::fixtures::ledger_row(i)
}

fn chain(n: u64) -> Vec<LedgerRow> {
    let mut c = Chain::new("node-1");
    (1..=n).map(|i| c.seal(row(i))).collect()
}

#[test]
fn a_row_with_the_last_seq_cannot_be_resumed_after() {
    // A stored row (ClickHouse's, the journal's) numbered u64::MAX: nothing can
    // follow it, and resuming says so instead of wrapping to row 0.
    let mut last = chain(1).remove(0);
    last.seq = u64::MAX;
    assert!(matches!(
        Chain::resume("node-1", Some(&last)),
        Err(ChainError::Full(u64::MAX))
    ));
}

/// A walk that follows a row planted at the next-to-last seq (a gap it goes on
/// after) meets a valid row at the last seq: a break, not an overflow.
#[test]
fn a_walk_that_follows_a_row_to_the_last_seq_stops_there() {
    let mut base = chain(1).remove(0);
    base.seq = u64::MAX - 2;
    let mut c = Chain::resume("node-1", Some(&base)).unwrap();
    let a = c.seal(row(2));
    assert_eq!(a.seq, u64::MAX - 1);
    let mut b = row(3);
    b.chain_id = "node-1".into();
    b.seq = u64::MAX;
    b.prev_hash.clone_from(&a.row_hash);
    b.row_hash = hex::encode(b.compute_hash(&parse_hash(&a.row_hash)));
    let mut w = gw_core::ledger::Walker::new();
    let breaks: Vec<ChainError> = [chain(1).remove(0), a, b]
        .iter()
        .flat_map(|r| w.push_on(r))
        .collect();
    assert!(breaks.contains(&ChainError::Full(u64::MAX)), "{breaks:?}");
    assert!(
        matches!(breaks[0], ChainError::Gap { .. }),
        "the planted row first: {breaks:?}"
    );
}

/// A chain's times never go back as its seq goes up (rows are made, then sealed
/// in commit order: two writers, or a clock stepped back, gave a later seq an
/// earlier time, and paging by (time, chain, seq) skipped a row); a chain resumed
/// after a row keeps to it too. The rows still verify.
#[test]
fn a_chains_times_never_go_back() {
    let mut c = Chain::new("node-1");
    let at = |i: u64, ts: u64| {
        let mut r = row(i);
        r.ts_ms = ts;
        r
    };
    let t = 1_750_000_000_000u64;
    let rows: Vec<LedgerRow> = [(1, t), (2, t - 1), (3, t + 1), (4, t - 50_000)]
        .into_iter()
        .map(|(i, ts)| c.seal(at(i, ts)))
        .collect();
    let times: Vec<u64> = rows.iter().map(|r| r.ts_ms).collect();
    assert_eq!(times, [t, t, t + 1, t + 1]);
    assert_eq!(verify_chain(&rows), Ok(4));
    let mut resumed = Chain::resume("node-1", rows.last()).unwrap();
    assert_eq!(resumed.seal(at(5, t - 7)).ts_ms, t + 1);
    // Far behind (a clock set right after it had jumped ahead): the row keeps
    // its own time, and the rows after it follow it, not the jump.
    let back = t + 1 - gw_core::ledger::MAX_TS_RAISE_MS - 1;
    assert_eq!(resumed.seal(at(6, back)).ts_ms, back);
    assert_eq!(resumed.seal(at(7, back + 5)).ts_ms, back + 5);
}

#[test]
fn an_intact_chain_verifies_and_resumes() {
    let mut rows = chain(5);
    assert_eq!(verify_chain(&rows), Ok(5));
    let mut c = Chain::resume("node-1", rows.last()).unwrap();
    rows.push(c.seal(row(6)));
    assert_eq!(verify_chain(&rows), Ok(6));
    assert_eq!(verify_chain(&[]), Ok(0));
}

#[test]
fn removal_alteration_and_reordering_are_detected() {
    let rows = chain(5);
    let mut removed = rows.clone();
    removed.remove(2);
    assert_eq!(
        verify_chain(&removed),
        Err(ChainError::Gap {
            expected: 3,
            found: 4
        })
    );
    let mut last_removed = rows.clone();
    last_removed.pop();
    // Removing the tail is only visible against the expected count (the store's max seq).
    assert_eq!(verify_chain(&last_removed), Ok(4));
    let mut altered = rows.clone();
    altered[1].code = "accepted-after-all".into();
    assert_eq!(verify_chain(&altered), Err(ChainError::Altered(2)));
    let mut resealed = rows.clone();
    resealed[1].nonce = 999;
    resealed[1].row_hash =
        hex::encode(resealed[1].compute_hash(&parse_hash(&resealed[1].prev_hash)));
    assert_eq!(verify_chain(&resealed), Err(ChainError::BrokenLink(3)));
    let mut swapped = rows.clone();
    swapped.swap(0, 1);
    assert!(verify_chain(&swapped).is_err());
    let mut bad = rows;
    bad[0].row_hash = "zz".into();
    assert_eq!(verify_chain(&bad), Err(ChainError::BadHash(1)));
}

/// A row stored twice whole (an insert retried) is one row; a different row
/// claiming a position — another writer, or the same hashes over other content —
/// is a conflict. The walk holds no row (`Walker`), and gives what `walk` gives.
#[test]
fn a_row_stored_twice_is_one_row_and_two_rows_at_one_position_conflict() {
    use gw_core::ledger::{walk, Walker};
    let rows = chain(4);
    let mut twice = rows.clone();
    twice.insert(2, rows[1].clone());
    twice.push(rows[3].clone());
    assert_eq!(verify_chain(&twice), Ok(4));
    assert_eq!(walk(&twice), walk(&rows));
    // Another row sealed onto row 1, next to row 2.
    let mut other = row(2);
    other.request_id = "another-writer".into();
    let mut c = Chain::resume("node-1", Some(&rows[0])).unwrap();
    let mut forked = rows.clone();
    forked.insert(2, c.seal(other));
    assert_eq!(verify_chain(&forked), Err(ChainError::Conflict(2)));
    // Row 2's hashes over other content.
    let mut same_hashes = rows[1].clone();
    same_hashes.nonce += 1;
    let mut posing = rows.clone();
    posing.insert(2, same_hashes);
    assert_eq!(verify_chain(&posing), Err(ChainError::Conflict(2)));
    // A row at an earlier position than the last is out of order, not a duplicate.
    let mut late = rows.clone();
    late.push(rows[1].clone());
    assert!(matches!(
        verify_chain(&late),
        Err(ChainError::Gap {
            expected: 5,
            found: 2
        })
    ));
    let mut w = Walker::new();
    for r in &rows {
        w.push(r).unwrap();
    }
    assert_eq!(Ok(w.head()), walk(&rows));
    // A stored row numbered u64::MAX after them: a gap, not an overflow.
    let mut last = rows[3].clone();
    last.seq = u64::MAX;
    assert_eq!(
        w.push(&last),
        Err(ChainError::Gap {
            expected: 5,
            found: u64::MAX
        })
    );
}

#[test]
fn fields_cannot_shift_into_each_other() {
    let mut a = row(1);
    let mut b = row(1);
    a.issuer = "dash".into();
    a.module = "boardmev".into();
    b.issuer = "dashboard".into();
    b.module = "mev".into();
    assert_ne!(a.compute_hash(&GENESIS), b.compute_hash(&GENESIS));
}

/// A field added after rows were written (`route`) is hashed only when set: a row
/// without it keeps the hash it was written with, and setting or changing it
/// changes the hash.
#[test]
fn a_later_field_keeps_older_rows_verifying() {
    let mut old = row(1);
    old.route = String::new();
    let h = old.compute_hash(&GENESIS);
    let mut routed = old.clone();
    routed.route = "/api/control/commands".into();
    assert_ne!(routed.compute_hash(&GENESIS), h);
    let mut other = routed.clone();
    other.route = "/api/control/module/mev:stop".into();
    assert_ne!(other.compute_hash(&GENESIS), routed.compute_hash(&GENESIS));
    // The route cannot pose as the end of the token issuer.
    let mut shifted = old.clone();
    shifted.token_issuer = format!("{}x", old.token_issuer);
    let mut tail = old.clone();
    tail.route = "x".into();
    assert_ne!(shifted.compute_hash(&GENESIS), tail.compute_hash(&GENESIS));
}

/// Every break of a chain, one after another: a walk that goes on after the
/// first (`Walker::push_on`) reports a planted row, a later altered one, a
/// missing one, and a tail that was rebuilt, each where it is — a row planted
/// early does not hide the rest.
#[test]
fn a_walk_that_goes_on_reports_every_break() {
    use gw_core::ledger::Walker;
    let breaks = |rows: &[LedgerRow]| -> Vec<ChainError> {
        let mut w = Walker::new();
        rows.iter().flat_map(|r| w.push_on(r)).collect()
    };
    let good = chain(12);
    assert!(breaks(&good).is_empty());
    let mut rows = good.clone();
    // A second row at position 3 (planted, its hash recomputed so it links).
    let mut planted = good[2].clone();
    planted.code = "planted".into();
    planted.row_hash = hex::encode(planted.compute_hash(&parse_hash(&planted.prev_hash)));
    rows.insert(3, planted);
    // Row 6's content changed in place.
    rows[6].code = "changed".into();
    assert_eq!(rows[6].seq, 6);
    // Row 9 gone.
    rows.retain(|r| r.seq != 9);
    assert_eq!(
        breaks(&rows),
        [
            ChainError::Conflict(3),
            ChainError::Altered(6),
            ChainError::Gap {
                expected: 9,
                found: 10
            },
        ]
    );
    // The walk ended at the chain's end: positions, not verified rows.
    let mut w = Walker::new();
    rows.iter().for_each(|r| drop(w.push_on(r)));
    // A row followed after a gap is checked for itself too: row 9 gone and row
    // 10 changed in place are two breaks.
    let mut both = good.clone();
    both.retain(|r| r.seq != 9);
    both[8].code = "changed".into();
    assert_eq!(both[8].seq, 10);
    assert_eq!(
        breaks(&both),
        [
            ChainError::Gap {
                expected: 9,
                found: 10
            },
            ChainError::Altered(10),
        ]
    );
    // A planted row that sorts first: the stored one after it is the second
    // row at its position, and the next row links to the stored one.
    let mut first = good.clone();
    let mut planted = good[2].clone();
    planted.code = "planted".into();
    planted.row_hash = hex::encode(planted.compute_hash(&parse_hash(&planted.prev_hash)));
    first.insert(2, planted);
    assert_eq!(
        breaks(&first),
        [ChainError::Conflict(3), ChainError::BrokenLink(4)]
    );
    assert_eq!(w.head(), (12, parse_hash(&good[11].row_hash)));
    // A tail rebuilt from row 10 on (rows sealed anew after a forged row 10):
    // one break where it starts, none after it (the rebuilt rows chain).
    let mut forged = Chain::resume("node-1", Some(&good[8])).unwrap();
    let mut rebuilt: Vec<LedgerRow> = good[..9].to_vec();
    let mut ten = row(10);
    ten.code = "forged".into();
    rebuilt.push(forged.seal(ten));
    rebuilt.extend((11..=12).map(|i| forged.seal(row(i))));
    assert!(
        breaks(&rebuilt).is_empty(),
        "a rebuilt tail chains: only a checkpoint sees it"
    );
    // … and a row between changed on its own: its successor no longer links.
    let mut cut = good.clone();
    cut[4].row_hash = hex::encode([7u8; 32]);
    assert_eq!(
        breaks(&cut),
        [ChainError::Altered(5), ChainError::BrokenLink(6)]
    );
}

/// A verification lists the first breaks and counts the rest.
#[test]
fn breaks_list_the_first_and_count_the_rest() {
    let mut b = gw_core::ledger::Breaks::default();
    assert!(b.is_empty());
    for i in 0..gw_core::ledger::MAX_BREAKS + 3 {
        b.note(format!("break {i}"));
    }
    assert_eq!(b.listed.len(), gw_core::ledger::MAX_BREAKS);
    assert_eq!(b.listed[0], "break 0");
    assert_eq!(b.more, 3);
}

/// Every chain of a store's answer, walked as it streams: each chain handed back
/// when the next begins, held to its checkpoint, a checkpointed chain with no row
/// reported last, copies counted as read and walked once — and an answer out of
/// order (a chain in two runs, a row sent back) refused, as nothing after it can
/// be believed.
#[test]
fn every_chain_is_walked_from_an_ordered_answer_and_disorder_is_refused() {
    use gw_core::checkpoint::{ChainsWalk, Checkpoint, OrderError};
    let of = |id: &str, n: u64| {
        let mut c = Chain::new(id);
        (1..=n).map(|i| c.seal(row(i))).collect::<Vec<_>>()
    };
    let (a, b) = (of("node-a", 3), of("node-b", 2));
    let head = |r: &LedgerRow| parse_hash(&r.row_hash);
    let anchors = [
        ("node-a", Checkpoint::for_chain("node-a", 3, head(&a[2]))),
        ("node-b", Checkpoint::for_chain("node-b", 2, head(&b[0]))),
        ("node-z", Checkpoint::for_chain("node-z", 4, [4; 32])),
    ]
    .into_iter()
    .map(|(id, c)| (id.to_owned(), c))
    .collect();
    let mut walk = ChainsWalk::new(anchors);
    let mut ended = Vec::new();
    // Row 2 of node-a stored twice.
    for r in [&a[0], &a[1], &a[1], &a[2], &b[0], &b[1]] {
        ended.extend(walk.push(r).unwrap());
    }
    assert_eq!(ended.len(), 1, "node-a, handed back as node-b began");
    ended.extend(walk.finish());
    let ids: Vec<&str> = ended.iter().map(|w| w.chain_id.as_str()).collect();
    assert_eq!(ids, ["node-a", "node-b", "node-z"]);
    let (wa, wb, wz) = (&ended[0], &ended[1], &ended[2]);
    assert_eq!((wa.read, wa.walked()), (4, 3));
    assert!(wa.breaks.is_empty() && wb.breaks.is_empty());
    assert_eq!(wa.held().map(|h| h.is_ok()), Some(true));
    // node-b's checkpoint names another head at its size.
    assert_eq!(wb.held().map(|h| h.is_ok()), Some(false));
    assert_eq!((wz.read, wz.checkpoint_size()), (0, Some(4)));
    assert_eq!(wz.held().map(|h| h.is_ok()), Some(false), "cut to nothing");

    let mut walk = ChainsWalk::new(Default::default());
    for r in [&a[0], &b[0]] {
        walk.push(r).unwrap();
    }
    assert_eq!(
        walk.push(&a[1]).unwrap_err(),
        OrderError::ChainTwice("node-a".into())
    );
    // A chain ordered before the one walked, met for the first time: the answer
    // is not in order either (no set of the chains seen is kept to tell).
    let mut walk = ChainsWalk::new(Default::default());
    walk.push(&b[0]).unwrap();
    assert_eq!(
        walk.push(&a[0]).unwrap_err(),
        OrderError::ChainTwice("node-a".into())
    );
    let mut walk = ChainsWalk::new(Default::default());
    for r in [&a[0], &a[2]] {
        walk.push(r).unwrap();
    }
    let e = walk.push(&a[1]).unwrap_err();
    assert_eq!(
        e,
        OrderError::SeqBack {
            chain: "node-a".into(),
            seq: 2,
            after: 3
        }
    );
    assert!(e.to_string().contains("not ordered by seq"), "{e}");
}

/// The columns a walk selects are the row's fields, each once (the sidecar's
/// ClickHouse row type holds them in `COLUMNS`' order: its own test).
#[test]
fn the_walks_columns_are_the_rows_fields_in_order() {
    let v = serde_json::to_value(chain(1).remove(0)).unwrap();
    let fields: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    let mut columns = gw_core::ledger::COLUMNS.to_vec();
    let mut sorted = fields.clone();
    sorted.sort_unstable();
    columns.sort_unstable();
    assert_eq!(sorted, columns);
    let list = gw_core::ledger::walk_select_list();
    // Split at the commas outside parentheses.
    let (mut items, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, ch) in list.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                items.push(list[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(list[start..].trim());
    let selected: Vec<&str> = items
        .iter()
        .map(|c| c.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(selected, gw_core::ledger::COLUMNS);
    // Every text column but the chain's id is read as UTF-8; the numbers as
    // they are; the row hash checks every text column.
    assert!(
        list.starts_with("chain_id, seq, ts_ms, toValidUTF8(stage) AS stage,"),
        "{list}"
    );
    assert!(
        list.contains("isValidUTF8(args_json)") && list.contains(", nonce,"),
        "{list}"
    );
}
