//! The ledger write path against a real ClickHouse: rows are durable in the journal
//! first, ClickHouse stopped mid-stream then restarted (and the node too) → every
//! row present exactly once, and the chain read back from ClickHouse verifies.

use std::sync::Arc;
use std::time::Duration;

use gw_core::ledger::{verify_chain, Chain, LedgerRow};
use gw_sidecar::journal::{self, Journal, Options, Sink, Txn};
use gw_sidecar::ledger::ship::{RowQueue, ShipError, Shipper};
use prometheus_client::metrics::gauge::Gauge;
use testkit::clickhouse::ClickHouse;

mod common;

fn row(i: u64) -> LedgerRow {
    testkit::fixtures::ledger_row(i)
}

fn create_table(ch: &ClickHouse) {
    let ddl =
        std::fs::read_to_string(testkit::workspace_root().join("sql/11_control_decisions.sql"))
            .unwrap();
    for stmt in gw_sidecar::ledger::migrations::statements(&ddl) {
        ch.query(&stmt);
    }
}

use common::stored;

/// A ClickHouse with `control_decisions` in a new directory named `name`, and a
/// client of it.
fn with_table(name: &str) -> (testkit::TempDir, ClickHouse, clickhouse::Client) {
    let d = testkit::TempDir::new(name);
    let ch = ClickHouse::start(d.path());
    create_table(&ch);
    let client = client_of(&ch);
    (d, ch, client)
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A client of `ch` as its default user.
fn client_of(ch: &ClickHouse) -> clickhouse::Client {
    clickhouse::Client::default().with_url(ch.url())
}

/// Exactly `n` rows shipped by the sidecar.
fn wait_rows(ch: &ClickHouse, n: usize) -> Vec<LedgerRow> {
    let rows = common::wait_rows(ch, n);
    assert_eq!(rows.len(), n, "rows shipped by the sidecar");
    rows
}

/// The ledger's write path of one node: rows sealed by the journal's writer,
/// shipped from its queue.
struct Node {
    journal: Journal,
    queue: Arc<RowQueue>,
    shipper: Shipper,
}

fn node(dir: &std::path::Path, client: &clickhouse::Client) -> Node {
    node_with(dir, client, Options::default(), 100_000)
}

/// A node whose journal has `opts` and whose queue keeps `memory_rows` in memory.
fn node_with(
    dir: &std::path::Path,
    client: &clickhouse::Client,
    opts: Options,
    memory_rows: usize,
) -> Node {
    let opened = Journal::open(dir, opts).unwrap();
    let chain = Chain::resume("node-1", opened.last_row()).unwrap();
    let opened_head = opened.last_row().map(|r| r.seq);
    let queue = Arc::new(RowQueue::recovered(
        &opened.records,
        Gauge::default(),
        memory_rows,
    ));
    let journal = opened
        .start(Some(chain), vec![queue.clone() as Arc<dyn Sink>])
        .unwrap();
    journal.hold(journal::STARTUP_HOLD, journal::Lsn::MAX);
    // As the sidecar does: ClickHouse may not hold more of the chain than the
    // journal's last row at start.
    let shipper = Shipper::new(
        queue.clone(),
        journal.clone(),
        client.clone(),
        "control_decisions",
        "node-1",
    )
    .with_journal_head(opened_head);
    Node {
        journal,
        queue,
        shipper,
    }
}

/// Rows `from..=to`, one transaction each, as the journal sealed them.
fn commit_sealed(n: &Node, from: u64, to: u64) -> Vec<LedgerRow> {
    (from..=to)
        .map(|i| {
            let c = n
                .journal
                .commit_blocking(Txn::of(vec![journal::Entry::row(row(i))]))
                .unwrap();
            LedgerRow::clone(&c.rows[0])
        })
        .collect()
}

fn commit_rows(n: &Node, from: u64, to: u64) -> Vec<u64> {
    commit_sealed(n, from, to).iter().map(|r| r.seq).collect()
}

/// ClickHouse's count of INSERT queries so far.
fn inserts(ch: &ClickHouse) -> u64 {
    ch.query("SELECT value FROM system.events WHERE event = 'InsertQuery'")
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Under a steady stream of rows the shipper inserts at most once per `every`
/// (each insert is a part ClickHouse writes and merges; one per few rows took two
/// thirds of the bench machine's CPU), and every row still lands once, in order.
#[test]
fn a_steady_stream_of_rows_is_shipped_in_few_inserts() {
    let (d, ch, client) = with_table("ledger-ch-steady");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut n = node(&d.path().join("journal"), &client);
    // What ClickHouse holds is known before the stream starts.
    rt.block_on(n.shipper.learn()).unwrap();
    let journal = n.journal.clone();
    let before = inserts(&ch);
    let every = std::time::Duration::from_millis(200);
    let shipping = rt.spawn(n.shipper.with_every(every).with_nice(19).run(None));
    // 2 s of rows, one every 2 ms (an insert per wake-up would be hundreds).
    let started = std::time::Instant::now();
    let mut i = 0;
    while started.elapsed() < std::time::Duration::from_secs(2) {
        i += 1;
        journal
            .commit_blocking(Txn::of(vec![journal::Entry::row(row(i))]))
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let rows = wait_rows(&ch, usize::try_from(i).unwrap());
    shipping.abort();
    assert_eq!(verify_chain(&rows), Ok(i));
    let made = inserts(&ch) - before;
    // 2 s / 200 ms, the first insert at once, and the tail after the last row.
    assert!(
        made <= 13,
        "{made} inserts for {i} rows in {:?}",
        started.elapsed()
    );
    assert!(made >= 2, "{made} inserts: shipped while rows came");
}

/// However long `every`, a thousand rows waiting are shipped at once, not after it.
#[test]
fn a_thousand_waiting_rows_are_shipped_without_waiting_for_the_interval() {
    let (d, ch, client) = with_table("ledger-ch-burst");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let n = node(&d.path().join("journal"), &client);
    let journal = n.journal.clone();
    let every = std::time::Duration::from_secs(60);
    let shipping = rt.spawn(n.shipper.with_every(every).run(None));
    // The first row is shipped at once; the interval starts then. A second row
    // sets the shipper waiting for it; the burst comes during that wait.
    journal
        .commit_blocking(Txn::of(vec![journal::Entry::row(row(1))]))
        .unwrap();
    wait_rows(&ch, 1);
    journal
        .commit_blocking(Txn::of(vec![journal::Entry::row(row(2))]))
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let burst: Vec<journal::Entry> = (3..=1_002).map(|i| journal::Entry::row(row(i))).collect();
    let started = std::time::Instant::now();
    journal.commit_blocking(Txn::of(burst)).unwrap();
    let rows = wait_rows(&ch, 1_002);
    shipping.abort();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "the burst waited for the interval: {:?}",
        started.elapsed()
    );
    assert_eq!(verify_chain(&rows), Ok(1_002));
}

/// A ClickHouse whose settings profile forbids `os_thread_priority` refuses the
/// first insert that asks for it; the shipper then ships without it, nothing lost.
#[test]
fn a_clickhouse_that_forbids_the_inserts_priority_still_gets_the_rows() {
    let d = testkit::TempDir::new("ledger-ch-nice");
    let ch = ClickHouse::start_secured_with(
        d.path(),
        "<clickhouse><profiles><default><constraints><os_thread_priority><readonly/>\
         </os_thread_priority></constraints></default></profiles></clickhouse>",
    );
    create_table(&ch);
    let users = ch.users.clone().unwrap();
    let client = clickhouse::Client::default()
        .with_url(ch.url())
        .with_user(users.sidecar.user.clone())
        .with_password(users.sidecar.password.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let n = node(&d.path().join("journal"), &client);
    commit_rows(&n, 1, 3);
    let mut shipper = n.shipper.with_nice(19);
    let refused = rt.block_on(shipper.ship_once()).unwrap_err().to_string();
    assert!(
        refused.contains("SETTING_CONSTRAINT_VIOLATION"),
        "{refused}"
    );
    assert_eq!(rt.block_on(shipper.ship_once()).unwrap(), 3);
    assert_eq!(verify_chain(&wait_rows(&ch, 3)), Ok(3));
}

#[test]
fn nothing_lost_nothing_duplicated_across_a_clickhouse_outage_and_a_restart() {
    let (d, mut ch, client) = with_table("ledger-ch");
    let rt = current_thread();
    let dir = d.path().join("journal");
    let mut n = node(&dir, &client);
    assert_eq!(commit_rows(&n, 1, 3), vec![1, 2, 3]);
    assert_eq!(rt.block_on(n.shipper.ship_once()).unwrap(), 3);
    assert_eq!(stored(&ch).len(), 3);

    // ClickHouse goes away: rows keep being sealed and wait in the journal.
    let (http, tcp) = (ch.http_port, ch.tcp_port);
    ch.process.stop();
    commit_rows(&n, 4, 6);
    assert!(rt.block_on(n.shipper.ship_once()).is_err());

    // The sidecar restarts too: the journal carries the pending rows and the chain.
    drop(n);
    let mut n = node(&dir, &client);
    assert_eq!(commit_rows(&n, 7, 7), vec![7]);
    let ch = ClickHouse::start_at(d.path(), http, tcp);
    // ClickHouse says what it holds: 1..3; the rest are shipped once.
    assert_eq!(rt.block_on(n.shipper.ship_once()).unwrap(), 4);
    let rows = stored(&ch);
    assert_eq!(
        rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=7).collect::<Vec<_>>()
    );
    assert_eq!(verify_chain(&rows), Ok(7));

    // A restart right after an insert whose answer was lost: ClickHouse's max(seq)
    // is asked again, nothing is stored twice.
    drop(n);
    let mut n = node(&dir, &client);
    assert_eq!(rt.block_on(n.shipper.ship_once()).unwrap(), 0);
    commit_rows(&n, 8, 8);
    assert_eq!(rt.block_on(n.shipper.ship_once()).unwrap(), 1);
    let count = ch.query("SELECT count() FROM control_decisions");
    assert_eq!(count.trim(), "8");
    assert_eq!(verify_chain(&stored(&ch)), Ok(8));
}

/// A ClickHouse outage longer than the memory's bound: the queue keeps the oldest
/// rows in memory and the rest wait in the journal on disk only, also across a
/// restart; when ClickHouse is back they are read back in order (across many small
/// segments), every row lands once, and the journal drops what was shipped.
#[test]
fn rows_beyond_the_memory_bound_wait_on_disk_and_land_once() {
    let (d, mut ch, client) = with_table("ledger-ch-disk");
    let rt = current_thread();
    let dir = d.path().join("journal");
    let opts = Options {
        segment_bytes: 16 << 10,
        ..Options::default()
    };
    let (http, tcp) = (ch.http_port, ch.tcp_port);
    ch.process.stop();
    // Records of 1 to 7 rows each.
    let commit = |n: &Node, from: u64, to: u64| {
        let mut i = from;
        while i <= to {
            let last = (i + i % 7).min(to);
            let rows = (i..=last).map(|k| journal::Entry::row(row(k))).collect();
            n.journal.commit_blocking(Txn::of(rows)).unwrap();
            i = last + 1;
        }
    };
    let n = node_with(&dir, &client, opts, 100);
    commit(&n, 1, 1_000);
    let in_memory = n.queue.len() as u64 - n.queue.on_disk();
    assert_eq!(n.queue.len(), 1_000);
    assert!(
        (100..107).contains(&in_memory),
        "{in_memory} rows in memory"
    );
    assert_eq!(
        n.queue.newest_where(usize::MAX, |_| true, |r| r.seq).len() as u64,
        in_memory
    );

    // A restart during the outage reads the tail back the same way.
    drop(n);
    let mut n = node_with(&dir, &client, opts, 100);
    assert_eq!((n.queue.len(), n.queue.on_disk() > 800), (1_000, true));
    commit(&n, 1_001, 1_200);
    let segments = || {
        std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "log")
            })
            .count()
    };
    let before = segments();
    assert!(before > 10, "{before} segments");

    let ch = ClickHouse::start_at(d.path(), http, tcp);
    assert_eq!(rt.block_on(n.shipper.ship_once()).unwrap(), 1_200);
    let rows = stored(&ch);
    assert_eq!(
        rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=1_200).collect::<Vec<_>>()
    );
    assert_eq!(verify_chain(&rows), Ok(1_200));
    assert_eq!((n.queue.len(), n.queue.on_disk()), (0, 0));
    // New rows go to memory again, and the shipped segments are dropped.
    commit(&n, 1_201, 1_201);
    assert_eq!((n.queue.len(), n.queue.on_disk()), (1, 0));
    // Retention runs on the writer thread after it answers: wait for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while segments() > 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(segments() <= 2, "{} of {before} segments left", segments());
}

/// An insert begun before a crash whose rows the restart finds partly in memory
/// and partly on disk only (beyond `audit_memory_rows`) is shipped again whole, as
/// the same insert: when the first run's insert lands late, nothing is stored
/// twice.
#[test]
fn an_insert_split_between_memory_and_disk_at_a_restart_is_shipped_whole() {
    let (d, ch, client) = with_table("ledger-split");
    let rt = current_thread();
    let dir = d.path().join("journal");
    let (http, tcp) = (ch.http_port, ch.tcp_port);
    let mut n = node_with(&dir, &client, Options::default(), 170);
    commit_rows(&n, 1, 150);
    assert_eq!(rt.block_on(n.shipper.ship_once()).unwrap(), 150);
    let mut ch = ch;
    ch.process.stop();
    let sealed = commit_sealed(&n, 151, 300);
    // The insert of 151..=200 begins; its answer never comes.
    let intent = journal::Entry::Shipping {
        first: 151,
        last: 200,
    };
    n.journal.commit_blocking(Txn::of(vec![intent])).unwrap();
    drop(n);

    // The journal still holds 1..=150 (one segment): the restart has 1..=170 in
    // memory and the rest on disk only, so the insert's range is split.
    let ch = ClickHouse::start_at(d.path(), http, tcp);
    // (A new client: the first one's pooled connection died with ClickHouse.)
    let client = client_of(&ch);
    let mut n = node_with(&dir, &client, Options::default(), 170);
    assert_eq!((n.queue.len(), n.queue.on_disk()), (300, 130));
    rt.block_on(n.shipper.learn()).unwrap();
    assert_eq!(n.shipper.shipped().map(|(seq, _)| seq), Some(150));
    // The first run's insert lands now.
    rt.block_on(gw_sidecar::ledger::ship::insert(
        &client,
        "control_decisions",
        &sealed[..50],
        None,
    ))
    .unwrap();
    assert_eq!(rt.block_on(n.shipper.ship_once()).unwrap(), 150);
    let rows = stored(&ch);
    assert_eq!(
        rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=300).collect::<Vec<_>>(),
        "each row once"
    );
    assert_eq!(verify_chain(&rows), Ok(300));
}

/// A node on the journal in `dir` seals rows `1..=n` and begins their insert with
/// `ch` stopped (its answer never comes), then stops: the sealed rows.
fn an_unanswered_insert(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    client: &clickhouse::Client,
    mut ch: ClickHouse,
    n: u64,
) -> Vec<LedgerRow> {
    let mut node = node(dir, client);
    rt.block_on(node.shipper.learn()).unwrap();
    ch.process.stop();
    let sealed = commit_sealed(&node, 1, n);
    assert!(rt.block_on(node.shipper.ship_once()).is_err());
    sealed
}

/// An insert that reaches ClickHouse only after its node was killed and restarted
/// (the restart asked ClickHouse what it holds before that insert landed) is not
/// stored twice: the restart ships that insert's range again, as the same insert,
/// before the rows that came since. (The late insert is played by the test with
/// the first run's rows and range; the first run's own request met a stopped
/// ClickHouse.)
#[test]
fn an_insert_that_lands_after_a_restart_is_not_stored_twice() {
    let (d, ch, client) = with_table("ledger-late");
    let rt = current_thread();
    let dir = d.path().join("journal");
    let (http, tcp) = (ch.http_port, ch.tcp_port);
    let sealed = an_unanswered_insert(&rt, &dir, &client, ch, 2);

    let mut n = node(&dir, &client);
    assert_eq!(commit_rows(&n, 3, 5), vec![3, 4, 5]);
    let ch = ClickHouse::start_at(d.path(), http, tcp);
    // ClickHouse holds nothing when the restarted node asks...
    rt.block_on(n.shipper.learn()).unwrap();
    assert_eq!(n.shipper.shipped().map(|(seq, _)| seq), Some(0));
    // ...then the first run's insert lands.
    rt.block_on(gw_sidecar::ledger::ship::insert(
        &client,
        "control_decisions",
        &sealed,
        None,
    ))
    .unwrap();
    assert_eq!(rt.block_on(n.shipper.ship_once()).unwrap(), 5);
    let rows = stored(&ch);
    assert_eq!(
        rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=5).collect::<Vec<_>>(),
        "each row once"
    );
    assert_eq!(verify_chain(&rows), Ok(5));
}

/// An insert spanning two months is one part per month in ClickHouse (the table's
/// partitions), each atomic on its own: a crash can leave the insert's last row
/// stored and not the rows before it. The restart does not take ClickHouse's head
/// for the whole insert: it counts the rows of the range and ships the insert
/// again. (The part that landed is played by the test with an insert of its own,
/// under its own token, so its row is stored twice here; a real part carries the
/// insert's token and is not.)
#[test]
fn an_insert_whose_last_row_landed_without_the_others_is_shipped_again() {
    let (d, ch, client) = with_table("ledger-partial");
    let rt = current_thread();
    let dir = d.path().join("journal");
    let (http, tcp) = (ch.http_port, ch.tcp_port);
    let sealed = an_unanswered_insert(&rt, &dir, &client, ch, 3);

    let ch = ClickHouse::start_at(d.path(), http, tcp);
    let client = client_of(&ch);
    // Of that insert, only the part holding its last row landed.
    rt.block_on(gw_sidecar::ledger::ship::insert(
        &client,
        "control_decisions",
        &sealed[2..],
        None,
    ))
    .unwrap();
    let mut n = node(&dir, &client);
    assert_eq!(rt.block_on(n.shipper.ship_once()).unwrap(), 3);
    let seqs: std::collections::BTreeSet<u64> = stored(&ch).iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=3).collect(), "rows 1 and 2 were never shipped");
}

/// ClickHouse loses rows the node shipped (a restore, a replica behind): the range
/// of the last insert, long shipped, is not sent again forever; shipping goes on
/// with the rows since, and the gap is what `verify` then reports.
#[test]
fn an_old_insert_range_does_not_stop_shipping_after_clickhouse_lost_rows() {
    let (d, ch, client) = with_table("ledger-lost");
    let rt = current_thread();
    let mut n = node(&d.path().join("journal"), &client);
    commit_rows(&n, 1, 3);
    assert_eq!(rt.block_on(n.shipper.ship_once()).unwrap(), 3);
    ch.query("DELETE FROM control_decisions WHERE seq >= 2");
    assert_eq!(stored(&ch).len(), 1);
    commit_rows(&n, 4, 5);
    // As after a failed insert: the shipper asks ClickHouse where it stands.
    rt.block_on(n.shipper.learn()).unwrap();
    // Counted (`gw_sidecar_ledger_rows_lost_by_clickhouse`) and logged, once
    // however often ClickHouse is asked again before the next insert.
    assert_eq!(n.queue.lost_counter().get(), 2);
    rt.block_on(n.shipper.learn()).unwrap();
    assert_eq!(n.queue.lost_counter().get(), 2);
    assert_eq!(rt.block_on(n.shipper.ship_once()).unwrap(), 2);
    let seqs: Vec<u64> = stored(&ch).iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![1, 4, 5]);
    rt.block_on(n.shipper.learn()).unwrap();
    assert_eq!(n.queue.lost_counter().get(), 2, "counted once");
}

/// Someone with write access to ClickHouse rewrites the chain's last rows while
/// the node is between inserts (each forged row chained properly onto the one
/// before, so walking the chain finds nothing). The node never takes their head
/// for its own: a rewritten row it still holds, or whose successor it still holds,
/// or that is its newest, is a conflict; one it no longer holds (gone after
/// ClickHouse lost rows) is not vouched for. Either way its signed checkpoints
/// name only rows it inserted itself (`own_head`).
#[test]
fn a_chain_rewritten_in_clickhouse_is_never_signed_as_the_nodes_own() {
    use gw_core::ledger::ChainError;
    let (d, ch, client) = with_table("ledger-rewritten");
    let rt = current_thread();
    let mut n = node(&d.path().join("journal"), &client);
    let sealed = commit_sealed(&n, 1, 3);
    assert_eq!(rt.block_on(n.shipper.ship_once()).unwrap(), 3);
    let own = n.shipper.own_head();
    assert_eq!(own.map(|(s, _)| s), Some(3));
    // Row `seq` replaced by a forgery chained onto `after`.
    let forge = |seq: u64, after: &LedgerRow| {
        ch.query(&format!("DELETE FROM control_decisions WHERE seq >= {seq}"));
        let mut chain = Chain::at(
            "node-1",
            seq,
            hex::decode(&after.row_hash).unwrap().try_into().unwrap(),
        );
        let mut r = row(seq);
        r.request_id = format!("forged-{seq}");
        let forged = chain.seal(r);
        rt.block_on(gw_sidecar::ledger::ship::insert(
            &client,
            "control_decisions",
            &[forged],
            None,
        ))
        .unwrap();
        assert_eq!(verify_chain(&stored(&ch)), Ok(seq), "the forgery walks");
    };
    let conflict = |n: &mut Node| {
        assert!(matches!(
            rt.block_on(n.shipper.learn()),
            Err(ShipError::Chain(ChainError::Conflict(3)))
        ));
        assert_eq!(n.shipper.own_head(), own);
    };
    // Its newest row.
    forge(3, &sealed[1]);
    conflict(&mut n);
    // A row whose successor it still holds (rows 4 and 5 not shipped yet).
    commit_rows(&n, 4, 5);
    conflict(&mut n);
    // Put back, everything shipped; then rows 2 on lost and row 2 forged: not
    // vouched for, and counted lost.
    ch.query("DELETE FROM control_decisions WHERE seq >= 3");
    rt.block_on(gw_sidecar::ledger::ship::insert(
        &client,
        "control_decisions",
        &sealed[2..],
        None,
    ))
    .unwrap();
    rt.block_on(n.shipper.learn()).unwrap();
    assert_eq!(rt.block_on(n.shipper.ship_once()).unwrap(), 2);
    let own = n.shipper.own_head();
    assert_eq!(own.map(|(s, _)| s), Some(5));
    forge(2, &sealed[0]);
    rt.block_on(n.shipper.learn()).unwrap();
    assert_eq!(n.shipper.own_head(), own, "a head it cannot vouch for");
    assert_eq!(n.queue.lost_counter().get(), 3);
}

/// Two nodes on one chain id (two configurations left at the default `node_id`)
/// and one ClickHouse. Their inserts of the same positions used to share a
/// deduplication token: the second was dropped as a retry of the first and
/// reported shipped, its rows lost without a trace. Now both are stored, so the
/// chain shows the conflict to `verify`; and a node asking where the chain stands
/// that finds rows beyond its own refuses to ship.
#[test]
fn a_second_writer_on_one_chain_id_is_seen_not_dropped() {
    let (d, ch, client) = with_table("ledger-two-writers");
    let rt = current_thread();
    let mut a = node(&d.path().join("journal-a"), &client);
    let mut b = node(&d.path().join("journal-b"), &client);
    // Both learn the chain is empty before either ships.
    rt.block_on(a.shipper.learn()).unwrap();
    rt.block_on(b.shipper.learn()).unwrap();
    commit_rows(&a, 1, 2);
    assert_eq!(rt.block_on(a.shipper.ship_once()).unwrap(), 2);
    for i in 1..=2 {
        let mut r = row(i);
        r.request_id = format!("node-b-{i}");
        b.journal
            .commit_blocking(Txn::of(vec![journal::Entry::row(r)]))
            .unwrap();
    }
    assert_eq!(rt.block_on(b.shipper.ship_once()).unwrap(), 2);
    let rows = stored(&ch);
    assert_eq!(rows.len(), 4, "both writers' rows are stored");
    assert!(matches!(
        verify_chain(&rows),
        Err(gw_core::ledger::ChainError::Conflict(1))
    ));
    commit_rows(&a, 3, 5);
    assert_eq!(rt.block_on(a.shipper.ship_once()).unwrap(), 3);
    match rt.block_on(b.shipper.learn()) {
        Err(
            e @ ShipError::ForeignRows {
                seq: 5, sealed: 2, ..
            },
        ) => {
            assert!(e.to_string().contains("own node_id"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}

/// Copies directory `from` (files only, as a journal is) to `to`.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A sidecar's configuration with its state in `state`, shipping to `ch`.
fn config_on(state: &std::path::Path, ch: &ClickHouse) -> gw_sidecar::config::Config {
    let mut c = common::config(state, false);
    c.file.clickhouse_url = Some(ch.url());
    c
}

/// A sidecar on `state` applies one throttle command (`nonce`) and stops once
/// ClickHouse holds `rows` rows.
fn one_command_shipped(state: &std::path::Path, ch: &ClickHouse, nonce: u64, rows: usize) {
    let s = common::serve(config_on(state, ch));
    assert_eq!(post_throttle(&s, nonce), 200);
    wait_rows(ch, rows);
}

/// Posts a signed throttle command with `nonce` to `s`: the status.
fn post_throttle(s: &common::Served, nonce: u64) -> u16 {
    let body = testkit::fixtures::signed_command(
        nonce,
        gw_core::Action::Throttle,
        common::now(),
        "dashboard",
        &[],
    );
    s.rt.block_on(async {
        common::as_admin(s.http.post(format!("{}/api/control/commands", s.base)))
            .header("content-type", "application/x-protobuf")
            .body(body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    })
}

/// One verification walks the ledger at a time: while one waits on a ClickHouse
/// that stopped answering (`SIGSTOP`: its data intact), a second waits 5 s for it
/// and is answered 429 `overloaded` (within the edge's 10 s route timeout, so the
/// caller hears why), and the first ends verified once ClickHouse answers again.
#[test]
fn a_second_verification_waits_for_the_first_then_hears_overloaded() {
    let d = testkit::TempDir::new("ledger-verify-429");
    let ch = ClickHouse::start(d.path());
    let s = common::serve(config_on(&d.path().join("state"), &ch));
    assert_eq!(post_throttle(&s, 41), 200);
    wait_rows(&ch, 2);
    let verify = || common::as_admin(s.http.get(format!("{}/api/ledger/verify", s.base))).send();
    ch.process.signal("STOP");
    let (first, second, waited) = s.rt.block_on(async {
        let first = tokio::spawn(verify());
        // The first holds the walk, its query unanswered.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t0 = std::time::Instant::now();
        // Bounded: a second walk that waited on the stopped ClickHouse too would
        // not end before the client's timeout.
        let second = tokio::time::timeout(Duration::from_secs(15), verify()).await;
        let waited = t0.elapsed();
        ch.process.signal("CONT");
        let second = second
            .expect("the second verification is answered")
            .unwrap();
        let second = (
            second.status().as_u16(),
            second.json::<serde_json::Value>().await.unwrap(),
        );
        let first = first.await.unwrap().unwrap();
        let first = (
            first.status().as_u16(),
            first.json::<serde_json::Value>().await.unwrap(),
        );
        (first, second, waited)
    });
    assert_eq!(
        (second.0, &second.1["error"]),
        (429, &serde_json::json!("overloaded")),
        "{second:?}"
    );
    assert!(
        waited >= gw_sidecar::ledger::query::VERIFY_WAIT && waited < Duration::from_secs(9),
        "{waited:?}"
    );
    assert_eq!(first.0, 200, "{first:?}");
    assert_eq!(first.1["ok"], true, "{first:?}");
    assert_eq!(first.1["chains"][0]["rows"], 2, "{first:?}");
}

/// A journal put back from an older copy ends before what it had shipped: the
/// rows it seals next take positions ClickHouse already holds, different. The
/// shipper refuses to ship them — it used to drop them as already shipped, silently
/// — and keeps them in the journal; ClickHouse's chain stays whole.
#[test]
fn a_journal_older_than_clickhouse_is_not_shipped_over() {
    let (d, ch, client) = with_table("ledger-behind");
    let rt = current_thread();
    let (dir, old) = (d.path().join("journal"), d.path().join("journal-copy"));
    let n = node(&dir, &client);
    commit_rows(&n, 1, 2);
    let mut n = n;
    assert_eq!(rt.block_on(n.shipper.ship_once()).unwrap(), 2);
    n.journal.stop();
    drop(n);
    copy_dir(&dir, &old);
    let mut n = node(&dir, &client);
    commit_rows(&n, 3, 4);
    assert_eq!(rt.block_on(n.shipper.ship_once()).unwrap(), 2);
    // ClickHouse now holds more than this journal held at its start, all of it
    // shipped from here: asking again (as after a failed insert) is no refusal.
    rt.block_on(n.shipper.learn()).unwrap();
    commit_rows(&n, 5, 5);
    assert_eq!(rt.block_on(n.shipper.ship_once()).unwrap(), 1);
    n.journal.stop();
    drop(n);

    // The older copy: its chain ends at row 2, ClickHouse's at 5.
    let mut n = node(&old, &client);
    commit_rows(&n, 3, 5);
    match rt.block_on(n.shipper.ship_once()) {
        Err(ShipError::Behind(e)) => {
            assert_eq!((e.journal, e.stored), (2, 5));
            let msg = e.to_string();
            assert!(msg.contains("restored from an older copy"), "{msg}");
        }
        other => panic!("shipped over ClickHouse's rows: {other:?}"),
    }
    // Nothing shipped, nothing dropped: the new rows wait in the journal (with
    // the copy's two, which it had not seen shipped).
    assert_eq!(n.queue.len(), 5);
    let rows = stored(&ch);
    assert_eq!(verify_chain(&rows), Ok(5));
    // And again on the next try (the shipper retries): still refused.
    assert!(matches!(
        rt.block_on(n.shipper.ship_once()),
        Err(ShipError::Behind(_))
    ));
    assert_eq!(stored(&ch).len(), 5);
}

/// The same at a sidecar's start while ClickHouse answers: it refuses to start,
/// and says why.
#[test]
fn a_sidecar_whose_journal_is_older_than_clickhouse_refuses_to_start() {
    let d = testkit::TempDir::new("ledger-behind-start");
    let ch = ClickHouse::start(d.path());
    let state = d.path().join("state");
    let cfg = || config_on(&state, &ch);
    one_command_shipped(&state, &ch, 81, 2);
    let (journal, copy) = (state.join("journal"), d.path().join("journal-copy"));
    copy_dir(&journal, &copy);
    one_command_shipped(&state, &ch, 82, 4);
    std::fs::remove_dir_all(&journal).unwrap();
    copy_dir(&copy, &journal);

    let rt = current_thread();
    let err = match rt.block_on(gw_sidecar::app::start(cfg())) {
        Ok(_) => panic!("started on a journal older than ClickHouse"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("last ledger row of chain `node-1` is 2")
            && err.contains("ClickHouse holds rows up to 4"),
        "{err}"
    );
    assert_eq!(verify_chain(&stored(&ch)), Ok(4));
}

/// The spool of the version before the journal is shipped once (what it had not
/// shipped) and retired; the chain continues from its last row.
#[test]
fn the_pre_journal_spool_is_shipped_once_and_the_chain_continues() {
    use gw_sidecar::ledger::ship::migrate_legacy_spool;

    let (d, ch, client) = with_table("ledger-legacy");
    let rt = current_thread();
    let mut chain = Chain::new("node-1");
    let rows: Vec<_> = (1..=3).map(|i| chain.seal(row(i))).collect();
    // Row 1 had been shipped by the old version.
    rt.block_on(gw_sidecar::ledger::ship::insert(
        &client,
        "control_decisions",
        &rows[..1],
        None,
    ))
    .unwrap();
    let legacy = d.path().join("ledger");
    std::fs::create_dir_all(&legacy).unwrap();
    let mut text: String = rows
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect();
    text.push_str("{\"torn");
    std::fs::write(legacy.join("ledger.spool.jsonl"), text).unwrap();
    std::fs::write(legacy.join("ledger.shipped"), "1\n").unwrap();
    let last = rt
        .block_on(migrate_legacy_spool(&legacy, &client, "control_decisions"))
        .unwrap()
        .unwrap();
    assert_eq!(last.seq, 3);
    assert_eq!(verify_chain(&stored(&ch)), Ok(3));
    assert!(!legacy.join("ledger.spool.jsonl").exists());
    assert!(legacy.join("ledger.spool.jsonl.migrated").exists());
    // Nothing is left to migrate.
    assert!(rt
        .block_on(migrate_legacy_spool(&legacy, &client, "control_decisions"))
        .unwrap()
        .is_none());
    let mut next = Chain::resume("node-1", Some(&last)).unwrap();
    assert_eq!(next.seal(row(4)).seq, 4);
}

#[test]
fn every_http_decision_lands_in_the_chained_ledger() {
    use gw_core::Action;
    use testkit::fixtures::{command_key, signed_command};

    let d = testkit::TempDir::new("ledger-http");
    let ch = ClickHouse::start(d.path());
    let cfg = common::config_with_clickhouse(&d.path().join("state"), false, &ch);
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
                common::as_admin(http.post(&url))
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
    // The sidecar's shipper delivers the rows in the background.
    let rows = wait_rows(&ch, 6);
    assert_eq!(verify_chain(&rows), Ok(6));
    let summary = common::row_summary(&rows);
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
    // Each row names the route it came in on (the agent's come from the bus).
    let routes: Vec<&str> = by_id
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["route"].as_str().unwrap())
        .collect();
    assert_eq!(
        routes,
        vec!["/api/control/commands", "", "/api/control/commands"]
    );
    // A row stored twice (an insert retried past the deduplication window) is
    // one decision to every query.
    ch.query("INSERT INTO control_decisions SELECT * FROM control_decisions WHERE seq = 6");
    let history = get("/api/ledger/history");
    assert_eq!(history.as_array().unwrap().len(), 6);
    assert_eq!(history[0]["seq"], 6, "newest first");
    // Only the decisions asked for.
    let seqs = |path: &str| -> Vec<u64> {
        get(path)
            .as_array()
            .unwrap_or_else(|| panic!("{path}"))
            .iter()
            .map(|r| r["seq"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(seqs("/api/ledger/history?decision=applied"), [6, 2]);
    assert_eq!(
        seqs("/api/ledger/history?stage=sidecar&decision=rejected"),
        [4, 3]
    );
    assert_eq!(seqs("/api/ledger/history?stage=agent&limit=1"), [6]);
    // Page by page, from the last decision of each: the whole history, in order.
    let whole = seqs("/api/ledger/history");
    let mut paged = Vec::new();
    let mut path = "/api/ledger/history?limit=2".to_owned();
    // Four pages at most (three of two, one empty): a cursor not honoured
    // would page forever.
    for _ in 0..4 {
        let page = get(&path);
        let page = page.as_array().unwrap();
        paged.extend(page.iter().map(|r| r["seq"].as_u64().unwrap()));
        let Some(last) = page.last() else { break };
        path = format!(
            "/api/ledger/history?limit=2&before={}.{}.{}",
            last["ts_ms"],
            last["seq"],
            last["chain_id"].as_str().unwrap()
        );
    }
    assert_eq!((paged.clone(), whole.len()), (whole, 6));
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
    // No ledger key: no checkpoint, and the node's own chain is not counted as
    // one no checkpoint vouches for.
    assert_eq!(
        (
            &verified["checkpoints"],
            &verified["unanchored"],
            &verified["chains"][0]["this_node"]
        ),
        (&false.into(), &0.into(), &true.into()),
        "{verified}"
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
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        (o.status.code(), out.lines().collect::<Vec<_>>()),
        (
            Some(0),
            vec![
                "(1 of the stored rows are copies of others, counted once)",
                "ok 6 rows"
            ]
        )
    );
    ch.query("ALTER TABLE control_decisions UPDATE code = 'none' WHERE seq = 2 SETTINGS mutations_sync = 1");
    // A second change further on is reported too: a break hides nothing after it.
    ch.query("ALTER TABLE control_decisions UPDATE code = 'none' WHERE seq = 5 SETTINGS mutations_sync = 1");
    let o = gwctl(ch.http_port);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("row 2 was altered") && out.contains("row 5 was altered"),
        "{o:?}"
    );
    // Another chain beside it, whole (each chain walked on its own, streamed).
    let mut other = Chain::new("other");
    let others: Vec<LedgerRow> = (1..=2)
        .map(|i| {
            let mut r = row(i);
            r.chain_id = "other".into();
            other.seal(r)
        })
        .collect();
    rt.block_on(gw_sidecar::ledger::ship::insert(
        &client_of(&ch),
        "control_decisions",
        &others,
        None,
    ))
    .unwrap();
    let verified = get("/api/ledger/verify");
    assert_eq!(verified["ok"], false);
    assert!(
        verified["chains"][0]["broken"]
            .as_str()
            .unwrap()
            .contains("row 2 was altered"),
        "{verified}"
    );
    // (A broken chain's rows are the rows read: the copy of row 6 too.)
    assert_eq!(verified["chains"][0]["rows"], 7, "{verified}");
    let breaks: Vec<&str> = verified["chains"][0]["breaks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap())
        .collect();
    assert_eq!(breaks.len(), 2, "{verified}");
    assert!(breaks[1].contains("row 5 was altered"), "{verified}");
    assert_eq!(
        (
            verified["chains"][1]["chain_id"].as_str(),
            verified["chains"][1]["ok"].as_bool(),
            verified["chains"][1]["rows"].as_u64()
        ),
        (Some("other"), Some(true), Some(2)),
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

    // The reads' bounds: a request id under which 1 001 rows were piled (a
    // refused request's id is whatever its body said) answers 1 000; an applied
    // policy eight days old is outside the frequency's window.
    ch.query(
        "INSERT INTO control_decisions (chain_id, seq, ts_ms, stage, decision, code, request_id) \
         SELECT 'pile', number + 1, toUInt64(toUnixTimestamp64Milli(now64(3))), 'sidecar', \
                'rejected', 'malformed', 'piled' FROM numbers(1001)",
    );
    let piled = get("/api/ledger/request/piled");
    assert_eq!(piled.as_array().map(Vec::len), Some(1000));
    // The rest from the last of the page: all 1 001, each once, in order.
    let at = |d: &serde_json::Value| {
        format!(
            "{}.{}.{}",
            d["ts_ms"],
            d["seq"],
            d["chain_id"].as_str().unwrap()
        )
    };
    let rest = get(&format!(
        "/api/ledger/request/piled?after={}",
        at(&piled[999])
    ));
    let seqs: Vec<u64> = piled
        .as_array()
        .unwrap()
        .iter()
        .chain(rest.as_array().unwrap())
        .map(|d| d["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=1001).collect::<Vec<u64>>(), "{rest}");
    // Reads refused (each a ledger row of its own: after the counts above).
    let bad = get("/api/ledger/history?before=x.1.node");
    assert_eq!(bad["error"], "malformed", "{bad}");
    let bad = get("/api/ledger/history?decision=maybe");
    assert_eq!(bad["error"], "malformed", "{bad}");
    let bad = get("/api/ledger/request/piled?after=1.2");
    assert_eq!(bad["error"], "malformed", "{bad}");
    // An id that is no text once decoded: the API's own shape too.
    let bad = get("/api/ledger/request/%FF");
    assert_eq!(bad["error"], "malformed", "{bad}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut refused: Vec<String> = common::stored(&ch)
            .into_iter()
            .filter(|r| r.code == "malformed" && r.route.starts_with("/api/ledger/"))
            .map(|r| r.route)
            .collect();
        refused.sort();
        // Each query by its digest only.
        let route = gw_core::contract::report_route;
        let mut want = [
            route("/api/ledger/history?before=x.1.node"),
            route("/api/ledger/history?decision=maybe"),
            route("/api/ledger/request/%FF"),
            route("/api/ledger/request/piled?after=1.2"),
        ];
        want.sort();
        if refused == want {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{refused:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    ch.query(
        "INSERT INTO control_decisions (chain_id, seq, ts_ms, stage, decision, action) \
         VALUES ('old', 1, toUInt64(toUnixTimestamp64Milli(now64(3))) - 8 * 86400000, \
                 'agent', 'applied', 'policy')",
    );
    let policy = get("/api/ledger/policy-frequency");
    assert_eq!(
        policy
            .as_array()
            .map(|w| w.iter().map(|w| w["commands"].as_u64()).collect::<Vec<_>>()),
        Some(vec![Some(1)]),
        "{policy}"
    );

    // What ClickHouse says when a read fails (its tables, user, grants) stays in
    // the sidecar's log.
    ch.query("DROP TABLE control_decisions");
    let failed = get("/api/ledger/history");
    assert_eq!(failed["error"], "unavailable", "{failed}");
    let detail = failed["detail"].as_str().unwrap();
    assert!(
        !detail.contains("control_decisions") && !detail.contains("Code:"),
        "{detail}"
    );
}

/// A decision durable in the journal and not yet in ClickHouse (shipped at most
/// every `ledger_ship_every_ms`) is in `/api/ledger/request/…` and
/// `/api/ledger/history` already.
#[test]
fn the_ledger_endpoints_show_rows_not_yet_shipped() {
    use gw_core::Action;
    use testkit::fixtures::signed_command;

    let d = testkit::TempDir::new("ledger-pending");
    let ch = ClickHouse::start(d.path());
    let mut cfg = common::config_with_clickhouse(&d.path().join("state"), false, &ch);
    cfg.file.ledger_ship_every_ms = 10_000;
    let served = common::serve(cfg);
    let post = |n: u64| {
        let body = signed_command(n, Action::Throttle, common::now(), "dashboard", &[]);
        let (status, body) = served.post_command(body);
        assert_eq!((status, &body["applied"]), (200, &true.into()), "{body}");
    };
    // The first rows are shipped at once; the next wait up to 10 s.
    post(21);
    assert_eq!(wait_rows(&ch, 2).len(), 2);
    post(22);
    let by_id = served.get_json("/api/ledger/request/req-22");
    let history = served.get_json("/api/ledger/history");
    assert_eq!(
        stored(&ch).len(),
        2,
        "req-22's rows are still in the journal only"
    );
    let summary: Vec<(&str, &str)> = by_id
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["stage"].as_str().unwrap(),
                r["decision"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(summary, vec![("sidecar", "accepted"), ("agent", "applied")]);
    let seqs: Vec<u64> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![4, 3, 2, 1], "newest first, each once");
}

/// Walking a hash chain cannot see a cut tail, nor a chain rebuilt from scratch
/// (the hashes have no secret); the signed checkpoints the sidecar writes can.
#[test]
fn signed_checkpoints_catch_a_cut_or_rebuilt_chain() {
    use ed25519_dalek::SigningKey;

    let d = testkit::TempDir::new("ledger-checkpoint");
    let ch = ClickHouse::start(d.path());
    let state = d.path().join("state");
    let mut cfg = common::config_with_clickhouse(&state, false, &ch);
    cfg.file.checkpoint_every_rows = 1;
    let ledger_key = SigningKey::from_bytes(&[7; 32]);
    cfg.ledger_key = Some(ledger_key.clone());
    let served = common::serve(cfg);
    for i in 1..=2 {
        assert_eq!(post_throttle(&served, 40 + i), 200);
    }
    let rows = wait_rows(&ch, 4);
    // The checkpoint of all four rows reaches the file and ClickHouse.
    let log = state.join("ledger/checkpoints.log");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains("\n4\n")) {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint of 4 rows"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // …and ClickHouse (copied right after the file).
    while ch.query("SELECT max(size) FROM control_checkpoints").trim() != "4" {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint of 4 rows in ClickHouse"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // The console's newest checkpoint of the chain is one this node signed: a
    // larger row anyone with INSERT adds does not hide it.
    ch.query(
        "INSERT INTO control_checkpoints VALUES ('node-1', 999999, 'ff', 'not a note', 1), \
         ('elsewhere', 3, 'ee', 'not a note either', 1)",
    );
    let cps = served.get_json("/api/ledger/checkpoints");
    let of = |chain: &str| {
        cps.as_array()
            .unwrap()
            .iter()
            .find(|c| c["chain_id"] == chain)
            .map(|c| {
                (
                    c["size"].as_u64().unwrap(),
                    c["signed_here"].as_bool().unwrap(),
                )
            })
    };
    assert_eq!(of("node-1"), Some((4, true)), "{cps}");
    assert_eq!(of("elsewhere"), Some((3, false)), "{cps}");
    ch.query("DELETE FROM control_checkpoints WHERE note LIKE 'not a note%'");

    let pk = hex::encode(ledger_key.verifying_key().as_bytes());
    let gwctl = |extra: &[&str]| {
        let o = std::process::Command::new(testkit::gwctl_bin())
            .args(["ledger", "verify", "--clickhouse"])
            .arg(format!("http://127.0.0.1:{}", ch.http_port))
            .args(extra)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let with_cp = ["--checkpoint", log.to_str().unwrap(), "--key", &pk];
    let (code, out, _) = gwctl(&with_cp);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("matches its checkpoint of 4 rows"), "{out}");
    // The sidecar's own verification (the console's) holds the chain to the same
    // checkpoints, from its file.
    let verified = served.get_json("/api/ledger/verify");
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(
        (
            &verified["chains"][0]["rows"],
            &verified["chains"][0]["checkpoint"]
        ),
        (&serde_json::json!(4), &serde_json::json!(4)),
        "{verified}"
    );
    // A last checkpoint cut short (the sidecar's disk failed mid-append) is not
    // read, and the whole ones still vouch for the chain.
    let whole = std::fs::read(&log).unwrap();
    let mut torn = whole.clone();
    torn.extend_from_slice(
        "gw-ledger/x\n9\nAAAA\n\n\u{2014}"
            .as_bytes()
            .split_last()
            .unwrap()
            .1,
    );
    std::fs::write(&log, &torn).unwrap();
    let (code, out, err) = gwctl(&with_cp);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("matches its checkpoint of 4 rows"), "{out}");
    let ignored = format!(
        "ignored {} bytes after the last whole checkpoint",
        torn.len() - whole.len()
    );
    assert!(err.contains(&ignored), "{err}");
    std::fs::write(&log, &whole).unwrap();
    // Another key does not vouch for these checkpoints.
    let other = hex::encode(SigningKey::from_bytes(&[8; 32]).verifying_key().as_bytes());
    let (code, ..) = gwctl(&["--checkpoint", log.to_str().unwrap(), "--key", &other]);
    assert_ne!(code, Some(0));

    // A whole chain of valid hashes planted under another id by someone with
    // INSERT: walking it says ok; no checkpoint vouches for it.
    let client = client_of(&ch);
    let mut planter = Chain::new("node-9");
    let planted: Vec<LedgerRow> = rows.iter().map(|r| planter.seal(r.clone())).collect();
    served
        .rt
        .block_on(gw_sidecar::ledger::ship::insert(
            &client,
            "control_decisions",
            &planted,
            None,
        ))
        .unwrap();
    let (code, out, _) = gwctl(&[]);
    assert_eq!(
        (code, out.contains("chain node-9: ok 4 rows")),
        (Some(0), true),
        "{out}"
    );
    // The sidecar's verification says which chain its checkpoints vouch for.
    let verified = served.get_json("/api/ledger/verify");
    let anchored = |chain: &str| {
        verified["chains"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["chain_id"] == chain)
            .map(|c| (c["ok"].clone(), c["anchored"].clone()))
    };
    let (yes, no) = (serde_json::json!(true), serde_json::json!(false));
    assert_eq!(
        anchored("node-1"),
        Some((yes.clone(), yes.clone())),
        "{verified}"
    );
    assert_eq!(anchored("node-9"), Some((yes.clone(), no)), "{verified}");
    assert_eq!(
        (
            &verified["ok"],
            &verified["unanchored"],
            &verified["checkpoints"]
        ),
        (&yes, &serde_json::json!(1), &yes),
        "{verified}"
    );
    let (code, out, _) = gwctl(&with_cp);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("unanchored: chain node-9: 4 rows, no checkpoint in the files given"),
        "{out}"
    );
    assert!(
        out.contains("chain node-1: matches its checkpoint of 4 rows"),
        "{out}"
    );
    // Checking one node's file of a cluster: listed, not failed.
    let mut one_node = with_cp.to_vec();
    one_node.push("--unanchored-ok");
    let (code, out, _) = gwctl(&one_node);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("unanchored: chain node-9"), "{out}");
    // Each node's file may be given: the same file twice vouches once.
    let mut twice = with_cp.to_vec();
    twice.extend(["--checkpoint", log.to_str().unwrap()]);
    let (code, out, _) = gwctl(&twice);
    assert_eq!(code, Some(1), "{out}");
    ch.query("DELETE FROM control_decisions WHERE chain_id = 'node-9'");
    let (code, out, _) = gwctl(&twice);
    assert_eq!(code, Some(0), "{out}");

    // The tail is cut: the walk alone still says ok, the checkpoint does not.
    ch.query("DELETE FROM control_decisions WHERE seq >= 3");
    let (code, out, _) = gwctl(&[]);
    assert_eq!((code, out.trim()), (Some(0), "ok 2 rows"));
    let (code, out, _) = gwctl(&with_cp);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("the chain was cut: 2 rows stored"), "{out}");
    let verified = served.get_json("/api/ledger/verify");
    assert_eq!(verified["ok"], false, "{verified}");
    let broken = verified["chains"][0]["broken"].as_str().unwrap_or_default();
    assert!(
        broken.contains("the chain was cut: 2 rows stored, the checkpoint saw 4"),
        "{verified}"
    );

    // Emptied: no row is no proof of anything (the wrong database or user
    // reads the same), so the walk fails unless told a ledger may be empty.
    ch.query("TRUNCATE TABLE control_decisions");
    let (code, out, _) = gwctl(&[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("holds no ledger row"), "{out}");
    let (code, out, _) = gwctl(&["--allow-empty"]);
    assert_eq!((code, out.trim()), (Some(0), "ok 0 rows"));

    // The chain is rebuilt with a changed decision and fresh, valid hashes.
    let mut forger = Chain::new(&rows[0].chain_id);
    let forged: Vec<LedgerRow> = rows
        .iter()
        .map(|r| {
            let mut r = r.clone();
            if r.seq == 1 {
                r.code = "none".into();
            }
            forger.seal(r)
        })
        .collect();
    served
        .rt
        .block_on(gw_sidecar::ledger::ship::insert(
            &client,
            "control_decisions",
            &forged,
            None,
        ))
        .unwrap();
    let (code, out, _) = gwctl(&[]);
    assert_eq!((code, out.trim()), (Some(0), "ok 4 rows"));
    let (code, out, _) = gwctl(&with_cp);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("row 4 differs from the checkpoint"), "{out}");
    let verified = served.get_json("/api/ledger/verify");
    assert_eq!(verified["ok"], false, "{verified}");
    let broken = verified["chains"][0]["broken"].as_str().unwrap_or_default();
    assert!(
        broken.contains("row 4 differs from the checkpoint"),
        "{verified}"
    );
    // Every row gone: still a chain this node vouched for.
    ch.query("TRUNCATE TABLE control_decisions");
    let verified = served.get_json("/api/ledger/verify");
    assert_eq!(
        (&verified["ok"], &verified["chains"][0]["rows"]),
        (&serde_json::json!(false), &serde_json::json!(0)),
        "{verified}"
    );
}

/// The sidecar writes as `gw_sidecar` (scripts/clickhouse-users.py): `SELECT,
/// INSERT` on its own tables and nothing else. Before an administrator has created
/// the tables its rows wait in the journal; `gw-sidecar --setup-clickhouse` as that
/// user is refused, as `gw_admin` it creates them; the rows then ship, and the
/// sidecar's user can neither cut nor rewrite them.
#[test]
fn the_sidecar_writes_as_a_user_that_cannot_cut_the_ledger() {
    let d = testkit::TempDir::new("ledger-user");
    let ch = ClickHouse::start_secured(d.path());
    let users = ch.users.clone().unwrap();
    let mut cfg = common::config(&d.path().join("state"), false);
    cfg.file.clickhouse_url = Some(ch.url());
    cfg.file.clickhouse_user = Some(users.sidecar.user.clone());
    cfg.clickhouse_password = Some(users.sidecar.password.clone());
    let served = common::serve(cfg);
    assert_eq!(post_throttle(&served, 61), 200);
    std::thread::sleep(std::time::Duration::from_millis(800));
    assert_eq!(ch.query("EXISTS TABLE control_decisions").trim(), "0");

    let setup = |who: &testkit::clickhouse::Credentials| {
        std::process::Command::new(env!("CARGO_BIN_EXE_gw-sidecar"))
            .arg("--setup-clickhouse")
            .env("GW_CLICKHOUSE_URL", ch.url())
            .env("GW_CLICKHOUSE_USER", &who.user)
            .env("GW_CLICKHOUSE_PASSWORD", &who.password)
            .env_remove("GW_CLICKHOUSE_PASSWORD_FILE")
            .output()
            .unwrap()
    };
    let o = setup(&users.sidecar);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--setup-clickhouse"),
        "{o:?}"
    );
    let o = setup(&users.admin);
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("clickhouse ready"));

    // The journalled rows ship once the tables exist.
    let rows = {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let rows = stored(&ch);
            if rows.len() >= 2 || std::time::Instant::now() > deadline {
                break rows;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    assert_eq!(verify_chain(&rows), Ok(2));

    let as_sidecar = |sql: &str| ch.query_as(sql, Some(&users.sidecar));
    for sql in [
        "TRUNCATE TABLE control_decisions",
        "DROP TABLE control_decisions",
        "ALTER TABLE control_decisions DELETE WHERE seq = 2",
        "ALTER TABLE control_decisions UPDATE code = 'x' WHERE seq = 1",
        "DELETE FROM control_decisions WHERE seq = 2",
        "TRUNCATE TABLE control_checkpoints",
        "SELECT count() FROM control_ledger",
        "CREATE TABLE scratch (x UInt8) ENGINE = Memory",
    ] {
        let (status, body) = as_sidecar(sql);
        assert_ne!(status, 200, "{sql}");
        assert!(body.contains("ACCESS_DENIED"), "{sql}: {body}");
    }
    assert_eq!(
        as_sidecar("SELECT count() FROM control_decisions").1.trim(),
        "2"
    );
    let wrong = testkit::clickhouse::Credentials {
        user: users.sidecar.user.clone(),
        password: "not-the-password".into(),
    };
    assert_ne!(ch.query_as("SELECT 1", Some(&wrong)).0, 200);
    // The default user (which the embedded engine needs) can do nothing.
    let (status, body) = ch.query_as("SELECT count() FROM control_decisions", None);
    assert_ne!(status, 200, "{body}");
    assert_eq!(stored(&ch).len(), 2);
}

/// A table made by an older version lacks a column this one writes: the sidecar's
/// user (which may not alter it) is told to run the setup as an administrator —
/// its rows wait — rather than finding out at every insert; the setup adds the
/// column, and the sidecar's user then finds everything it writes.
#[test]
fn an_older_table_is_named_until_an_administrator_adds_its_columns() {
    use gw_sidecar::ledger::migrations;
    let d = testkit::TempDir::new("ledger-older-table");
    let ch = ClickHouse::start_secured(d.path());
    let users = ch.users.clone().unwrap();
    let client = |who: &testkit::clickhouse::Credentials| {
        clickhouse::Client::default()
            .with_url(ch.url())
            .with_user(&who.user)
            .with_password(&who.password)
    };
    let rt = current_thread();
    rt.block_on(async {
        migrations::apply(&client(&users.admin)).await.unwrap();
        // As a table of 2026-12-04 was.
        client(&users.admin)
            .query(
                "ALTER TABLE tx_sends DROP COLUMN scored_by, DROP COLUMN requester, \
                 DROP COLUMN token_issuer",
            )
            .execute()
            .await
            .unwrap();
        let e = migrations::apply(&client(&users.sidecar))
            .await
            .unwrap_err();
        assert_eq!(e.file, "12_tx_sends.sql");
        let shown = e.to_string();
        assert!(
            ["scored_by", "requester", "token_issuer"]
                .iter()
                .any(|c| shown.contains(c))
                && shown.contains("--setup-clickhouse"),
            "{shown}"
        );
        // The ledger's own tables are ready: its shipper does not wait for this one.
        let ledger = ["control_decisions", "control_checkpoints"];
        let done = migrations::apply_for(&client(&users.sidecar), &ledger)
            .await
            .unwrap();
        let waiting: Vec<&str> = done.not_ready.iter().map(|e| e.file).collect();
        assert_eq!(waiting, ["12_tx_sends.sql"]);
        migrations::apply(&client(&users.admin)).await.unwrap();
        let done = migrations::apply(&client(&users.sidecar)).await.unwrap();
        assert!(done.existing.contains(&"tx_sends"), "{done:?}");
    });
}

/// A node whose journal is lost (a new disk, a wiped state directory) continues its
/// chain after ClickHouse's last row instead of starting a second chain at seq 1,
/// and its first row says so.
#[test]
fn a_node_whose_journal_is_lost_continues_after_clickhouse_and_says_so() {
    let d = testkit::TempDir::new("ledger-resume");
    let ch = ClickHouse::start(d.path());
    let state = d.path().join("state");
    let cfg = || config_on(&state, &ch);
    one_command_shipped(&state, &ch, 71, 2);
    std::fs::remove_dir_all(state.join("journal")).unwrap();

    let s = common::serve(cfg());
    assert_eq!(post_throttle(&s, 72), 200);
    let rows = wait_rows(&ch, 5);
    assert_eq!(verify_chain(&rows), Ok(5));
    assert_eq!(rows[2].decision, "resumed");
    assert!(
        rows[2].args_json.contains("\"after_seq\":2"),
        "{}",
        rows[2].args_json
    );
    assert_eq!(
        rows[3..]
            .iter()
            .map(|r| r.decision.as_str())
            .collect::<Vec<_>>(),
        vec!["accepted", "applied"]
    );
}

/// A node whose journal is lost holds ClickHouse's chain to its own newest
/// signed checkpoint before continuing it (the checkpoints file is in the
/// ledger directory, beside the journal): a chain rewritten under the
/// checkpoint (anyone who can INSERT can make one with valid hashes) is
/// refused at start rather than continued and signed over; a ClickHouse that
/// lost the rows (a table emptied) is continued after the checkpoint, not
/// from seq 1, which forked what was signed; rows after the checkpoint (taken
/// as ClickHouse holds them) are named by the `resumed` row.
#[test]
fn a_node_whose_journal_is_lost_holds_clickhouse_to_its_checkpoint() {
    let d = testkit::TempDir::new("ledger-resume-anchored");
    let ch = ClickHouse::start(d.path());
    let state = d.path().join("state");
    let cfg = || {
        let mut c = config_on(&state, &ch);
        c.file.checkpoint_every_rows = 1;
        c.ledger_key = Some(ed25519_dalek::SigningKey::from_bytes(&[7; 32]));
        c
    };
    let log = state.join("ledger/checkpoints.log");
    {
        let s = common::serve(cfg());
        assert_eq!(post_throttle(&s, 91), 200);
        wait_rows(&ch, 2);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains("\n2\n")) {
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint of 2 rows"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    let start = |c: gw_sidecar::config::Config| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(gw_sidecar::app::start(c)).map(drop)
    };
    std::fs::remove_dir_all(state.join("journal")).unwrap();
    // A second, other row at the checkpoint's position beside the signed one
    // (the last row ClickHouse names may be either): refused.
    ch.query(
        "INSERT INTO control_decisions SELECT * REPLACE (repeat('cd', 32) AS row_hash) \
         FROM control_decisions WHERE chain_id = 'node-1' AND seq = 2",
    );
    let err = start(cfg()).expect_err("a second row at the checkpoint's position was taken");
    let err = format!("{err:#}");
    assert!(err.contains("row 2") && err.contains("rewritten"), "{err}");
    ch.query(
        "ALTER TABLE control_decisions DELETE WHERE row_hash = repeat('cd', 32) \
         SETTINGS mutations_sync = 1",
    );
    // Rewritten under the checkpoint: row 2 is not the row it signed.
    ch.query(
        "ALTER TABLE control_decisions UPDATE row_hash = repeat('ab', 32) \
         WHERE chain_id = 'node-1' AND seq = 2 SETTINGS mutations_sync = 1",
    );
    let err = start(cfg()).expect_err("a chain rewritten under the checkpoint was continued");
    let err = format!("{err:#}");
    assert!(err.contains("row 2") && err.contains("rewritten"), "{err}");

    // Emptied: continued after the checkpoint (row 3 links to the signed row 2).
    ch.query("TRUNCATE TABLE control_decisions");
    std::fs::remove_dir_all(state.join("journal")).ok();
    let s = common::serve(cfg());
    assert_eq!(post_throttle(&s, 92), 200);
    let rows = wait_rows(&ch, 3);
    let resumed = &rows[0];
    assert_eq!(
        (resumed.seq, resumed.decision.as_str()),
        (3, "resumed"),
        "{rows:#?}"
    );
    let args: serde_json::Value = serde_json::from_str(&resumed.args_json).unwrap();
    assert_eq!(
        (
            &args["after_seq"],
            &args["checkpointed_seq"],
            &args["clickhouse_seq"]
        ),
        (
            &serde_json::json!(2),
            &serde_json::json!(2),
            &serde_json::json!(0)
        ),
        "{args}"
    );
    let signed = std::fs::read_to_string(&log).unwrap();
    let vk = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
    let head_2 = gw_core::checkpoint::open_all(&signed, "gw-ledger", &vk)
        .into_iter()
        .filter_map(Result::ok)
        .find(|c| c.size == 2)
        .expect("the checkpoint of 2 rows")
        .head;
    assert_eq!(resumed.prev_hash, hex::encode(head_2));
    drop(s);

    // Lost again, with rows after the checkpoint in ClickHouse: continued after
    // them, the resumed row naming the checkpointed rows.
    std::fs::remove_dir_all(state.join("journal")).unwrap();
    let s = common::serve(cfg());
    assert_eq!(post_throttle(&s, 93), 200);
    let rows = wait_rows(&ch, 6);
    let again = rows
        .iter()
        .filter(|r| r.decision == "resumed")
        .nth(1)
        .expect("a second resumed row");
    let args: serde_json::Value = serde_json::from_str(&again.args_json).unwrap();
    let checkpointed = args["checkpointed_seq"].as_u64().unwrap();
    assert!(
        checkpointed >= 2 && checkpointed <= args["after_seq"].as_u64().unwrap(),
        "{args}"
    );
    assert!(args.get("clickhouse_seq").is_none(), "{args}");
}

/// A start after a ClickHouse outage keeps decoded only the journal's horizon tail
/// for the replay guard, the bus and the agents (every record still goes to the
/// audit queues), and nothing is lost by it: a module's state set long before (its
/// agent moved it into a snapshot, so its hold moved on), the other module's state,
/// a nonce still fresh, and every ledger row once ClickHouse is back. Small
/// segments let the horizon move during the outage.
#[test]
fn a_start_after_an_outage_keeps_only_the_horizons_tail_and_loses_nothing() {
    use gw_core::Action;
    use serde_json::Value;
    use testkit::fixtures::signed_command;
    let d = testkit::TempDir::new("ledger-horizon");
    let mut ch = ClickHouse::start(d.path());
    let (http, tcp) = (ch.http_port, ch.tcp_port);
    let state = d.path().join("state");
    let config = |ch: &ClickHouse| {
        let mut c = common::config_with_clickhouse(&state, false, ch);
        c.file.journal_segment_bytes = 65_536;
        c.file.audit_memory_rows = 100;
        c.file.max_skew_secs = 15;
        c.file.agent_dedup_secs = 0;
        c
    };
    let command = |nonce: u64, action: Action, pct: u64| {
        let pct = pct.to_string();
        signed_command(
            nonce,
            action,
            common::now(),
            "dashboard",
            &[("throttle_pct", pct.as_str())],
        )
    };
    let send = |s: &common::Served, cmd: Vec<u8>| {
        let (status, body) = s.post_command(cmd);
        assert_eq!(
            (status, &body["applied"]),
            (200, &Value::Bool(true)),
            "{body}"
        );
    };
    let metric = |s: &common::Served, name: &str| {
        s.get_ops("/metrics").lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    let s = common::serve(config(&ch));
    let started = std::time::Instant::now();
    // `arbitrage` is set once, first; then only `mev` changes.
    let arbitrage = testkit::fixtures::signed_command_for(
        gw_core::Module::Arbitrage,
        1,
        Action::Throttle,
        common::now(),
        "dashboard",
        &[("throttle_pct", "25")],
    );
    send(&s, arbitrage);
    ch.process.stop();
    for n in 2..=150 {
        send(&s, command(n, Action::Throttle, n % 100));
    }
    // Wait for their nonces to expire (15 s), for them to age past the horizon's
    // lag (10 s) and for the agents' maintenance (every 30 s) to snapshot
    // `arbitrage`, whose record lies in a closed segment; then commands go on
    // (the writer moves the horizon after a batch) until the horizon has moved.
    let t150 = std::time::Instant::now();
    let until = (started + std::time::Duration::from_secs(31))
        .max(t150 + std::time::Duration::from_secs(16));
    std::thread::sleep(until.saturating_duration_since(std::time::Instant::now()));
    let mut next = 151;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    while metric(&s, "gw_sidecar_journal_horizon").unwrap_or(0) <= 1
        && std::time::Instant::now() < deadline
    {
        send(&s, command(next, Action::Throttle, next % 100));
        next += 1;
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let horizon = metric(&s, "gw_sidecar_journal_horizon").unwrap_or(0);
    assert!(horizon > 1, "the horizon moved on: {horizon}");
    // Sent last: its nonce is fresh (15 s) across the restart.
    let fresh_n = next;
    let fresh = command(fresh_n, Action::Throttle, fresh_n % 100);
    send(&s, fresh.clone());
    drop(s);

    let s = common::serve(config(&ch));
    let (scanned, kept) = (
        metric(&s, "gw_sidecar_journal_start_records").unwrap(),
        metric(&s, "gw_sidecar_journal_start_kept").unwrap(),
    );
    assert!(
        kept * 2 < scanned,
        "{kept} of {scanned} records kept decoded"
    );
    let modules = s.get_json("/api/modules");
    assert_eq!(
        (
            &modules["arbitrage"]["applied"],
            &modules["arbitrage"]["throttle_pct"]
        ),
        (&Value::from(1), &Value::from(25)),
        "{modules}"
    );
    assert_eq!(
        (&modules["mev"]["applied"], &modules["mev"]["throttle_pct"]),
        (&Value::from(fresh_n - 1), &Value::from(fresh_n % 100)),
        "{modules}"
    );
    // The fresh nonce is still known: the same bytes are a replay, said applied.
    let (status, body) = s.post_command(fresh);
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("replay")),
        "{body}"
    );
    let last = fresh_n + 1;
    send(&s, command(last, Action::Throttle, last % 100));
    let ch = ClickHouse::start_at(d.path(), http, tcp);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while metric(&s, "gw_sidecar_ledger_pending_rows") != Some(0)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let rows = stored(&ch);
    let n = rows.len() as u64;
    assert!(
        n >= 2 * last,
        "{n} rows: accepted and applied for each command"
    );
    assert_eq!(verify_chain(&rows), Ok(n), "every row once, in one chain");
    let applied = rows.iter().filter(|r| r.decision == "applied").count() as u64;
    assert_eq!(applied, last);
}

/// The sidecar reaches ClickHouse over mutual TLS: the tables made by
/// `--setup-clickhouse`, the ledger's rows shipped and the chain read back by
/// `gwctl ledger verify`, each through a listener that requires a client
/// certificate from the CA — what ClickHouse's `https_port` with
/// `verificationMode` strict is. chdb has no TLS listener (`SYSTEM START LISTEN
/// HTTPS` is refused in its embedded server), so a TLS front before its HTTP port
/// stands in. A client without a certificate, one in plain text and one dialling
/// an address the server's certificate does not name are refused at the handshake.
#[test]
fn the_ledger_ships_over_mutual_tls_and_a_client_without_a_certificate_is_refused() {
    use gw_sidecar::tls::ClientTls;
    use std::sync::atomic::Ordering;

    let d = testkit::TempDir::new("ledger-tls");
    let ch = ClickHouse::start_secured(d.path());
    let users = ch.users.clone().unwrap();
    let certs_dir = d.path().join("clickhouse-certs");
    std::fs::create_dir_all(&certs_dir).unwrap();
    let certs = testkit::envoy::dev_certs(&certs_dir);
    let front =
        testkit::tls_front::TlsFront::start(ch.http_port, &certs.ca, &certs.cert, &certs.key);
    let url = format!("https://127.0.0.1:{}", front.port);
    let tls = ClientTls {
        ca: certs.ca.clone(),
        cert: Some(certs.other_cert.clone()),
        key: Some(certs.other_key.clone()),
    };
    let file = d.path().join("sidecar.json");
    std::fs::write(
        &file,
        serde_json::json!({
            "state_dir": d.path().join("check-state"),
            "clickhouse_url": url,
            "clickhouse_tls": {"ca": tls.ca, "cert": tls.cert, "key": tls.key},
        })
        .to_string(),
    )
    .unwrap();

    // What the operator reads before starting.
    let o = common::plain_sidecar(d.path(), testkit::free_port())
        .arg("--config")
        .arg(&file)
        .arg("--check")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!("ledger {url} as default in mutual TLS, ")),
        "{o:?}"
    );

    // The tables, made by the administrator over TLS.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_gw-sidecar"))
        .arg("--config")
        .arg(&file)
        .arg("--setup-clickhouse")
        .env("GW_CLICKHOUSE_USER", &users.admin.user)
        .env("GW_CLICKHOUSE_PASSWORD", &users.admin.password)
        .env_remove("GW_CLICKHOUSE_PASSWORD_FILE")
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    assert_eq!(ch.query("EXISTS TABLE control_decisions").trim(), "1");

    // The ledger, shipped as the sidecar's user over TLS.
    let before = front.accepted.load(Ordering::SeqCst);
    let mut cfg = common::config(&d.path().join("state"), false);
    cfg.file.clickhouse_url = Some(url.clone());
    cfg.file.clickhouse_tls = Some(tls.clone());
    cfg.file.clickhouse_user = Some(users.sidecar.user.clone());
    cfg.clickhouse_password = Some(users.sidecar.password.clone());
    let served = common::serve(cfg);
    assert_eq!(post_throttle(&served, 81), 200);
    let rows = common::wait_rows(&ch, 2);
    assert_eq!(verify_chain(&rows), Ok(2));
    assert!(front.accepted.load(Ordering::SeqCst) > before);

    // The password from a file, as a deployment gives it (the sidecar's
    // GW_CLICKHOUSE_PASSWORD_FILE).
    let admin_pw = d.path().join("clickhouse-admin.pw");
    std::fs::write(&admin_pw, format!("{}\n", users.admin.password)).unwrap();
    let verify = |extra: &[&std::ffi::OsStr]| {
        std::process::Command::new(testkit::gwctl_bin())
            .args(["ledger", "verify", "--clickhouse", &url])
            .args(extra)
            .env("GW_CLICKHOUSE_USER", &users.admin.user)
            .env("GW_CLICKHOUSE_PASSWORD_FILE", &admin_pw)
            .env_remove("GW_CLICKHOUSE_PASSWORD")
            .output()
            .unwrap()
    };
    let o = verify(&[
        "--clickhouse-ca".as_ref(),
        certs.ca.as_os_str(),
        "--clickhouse-cert".as_ref(),
        certs.other_cert.as_os_str(),
        "--clickhouse-key".as_ref(),
        certs.other_key.as_os_str(),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "ok 2 rows",
        "{o:?}"
    );
    // gwctl without the CA does not trust the server; without its certificate,
    // the server does not take it.
    let o = verify(&[]);
    assert!(!o.status.success(), "{o:?}");
    let o = verify(&["--clickhouse-ca".as_ref(), certs.ca.as_os_str()]);
    assert!(!o.status.success(), "{o:?}");
    // TLS settings for a plain-text URL are refused, not ignored.
    let o = std::process::Command::new(testkit::gwctl_bin())
        .args(["ledger", "verify", "--clickhouse"])
        .arg(format!("http://127.0.0.1:{}", ch.http_port))
        .arg("--clickhouse-ca")
        .arg(&certs.ca)
        .output()
        .unwrap();
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("https://"),
        "{o:?}"
    );

    // Refused at the handshake, each.
    let rt = current_thread();
    let client = |url: String, tls: Option<ClientTls>| {
        let mut cfg = common::config(&d.path().join("client-state"), false);
        cfg.file.clickhouse_url = Some(url);
        cfg.file.clickhouse_tls = tls;
        cfg.file.clickhouse_user = Some(users.sidecar.user.clone());
        cfg.clickhouse_password = Some(users.sidecar.password.clone());
        cfg.clickhouse().unwrap().unwrap()
    };
    let bare = ClientTls {
        cert: None,
        key: None,
        ..tls.clone()
    };
    for (what, c) in [
        ("no certificate", client(url.clone(), Some(bare))),
        (
            "plain text",
            client(format!("http://127.0.0.1:{}", front.port), None),
        ),
        (
            "another name",
            client(
                format!("https://127.0.0.2:{}", front.port),
                Some(tls.clone()),
            ),
        ),
    ] {
        let before = front.refused.load(Ordering::SeqCst);
        let r = rt.block_on(
            c.query("SELECT count() FROM control_decisions")
                .fetch_one::<u64>(),
        );
        assert!(r.is_err(), "{what}: {r:?}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while front.refused.load(Ordering::SeqCst) == before {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: not refused at the front"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    // The sidecar's own client, for comparison, is let in.
    let ok = client(url.clone(), Some(tls));
    assert_eq!(
        rt.block_on(
            ok.query("SELECT count() FROM control_decisions")
                .fetch_one::<u64>()
        )
        .unwrap(),
        2
    );
}

/// `gwctl ledger verify` walks the table as ClickHouse streams it, one chain at
/// a time: about 100 MB of rows verify with the verifier's peak memory a small
/// part of that (it read the whole answer, then every row, before). Its peak
/// resident size is the kernel's, read by a parent that waits for it alone.
#[test]
fn gwctl_verifies_a_table_far_larger_than_its_memory() {
    const ROWS: u64 = 40_000;
    const BATCH: u64 = 5_000;
    let (_d, ch, client) = with_table("ledger-verify-large");
    let rt = current_thread();
    let mut chain = Chain::new("node-1");
    // Each row with a 2 KiB body (hex), as the largest a refusal keeps is 4 KiB.
    let body = "ab".repeat(1024);
    for from in (1..=ROWS).step_by(usize::try_from(BATCH).unwrap()) {
        let rows: Vec<LedgerRow> = (from..from + BATCH)
            .map(|i| {
                let mut r = row(i);
                r.raw_hex.clone_from(&body);
                chain.seal(r)
            })
            .collect();
        rt.block_on(gw_sidecar::ledger::ship::insert(
            &client,
            "control_decisions",
            &rows,
            None,
        ))
        .unwrap();
    }
    let stored: u64 = ch
        .query("SELECT sum(length(raw_hex)) FROM control_decisions")
        .trim()
        .parse()
        .unwrap();
    assert!(stored >= 80_000_000, "{stored} bytes of bodies");
    // The parent waits for gwctl alone, so its children's peak is gwctl's.
    let wrapper = "import json, resource, subprocess, sys\n\
                   p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n\
                   print(json.dumps({'code': p.returncode, 'out': p.stdout, 'err': p.stderr,\n\
                   'peak_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))";
    let o = std::process::Command::new(testkit::python())
        .arg("-c")
        .arg(wrapper)
        .arg(testkit::gwctl_bin())
        .args(["ledger", "verify", "--clickhouse", &ch.url()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (run["code"].as_i64(), run["out"].as_str()),
        (Some(0), Some(format!("ok {ROWS} rows\n").as_str())),
        "{run}"
    );
    let peak = run["peak_kib"].as_u64().unwrap();
    assert!(
        peak < 48 * 1024,
        "gwctl's peak resident size was {peak} KiB for {stored} bytes of bodies"
    );
    println!("gwctl ledger verify: {ROWS} rows, {stored} bytes of bodies, peak {peak} KiB");
}

/// Anyone who can INSERT can store a row whose strings are not UTF-8 (the
/// ledger writes only UTF-8). It is a break of its chain, shown and walked over:
/// the console's pages, the sidecar's verification and `gwctl ledger verify` go
/// on — they answered 503 "the store did not answer" and exit 2.
#[test]
fn a_row_that_is_not_utf8_is_a_break_not_an_outage() {
    let d = testkit::TempDir::new("ledger-not-utf8");
    let ch = ClickHouse::start(d.path());
    let s = common::serve(config_on(&d.path().join("state"), &ch));
    assert_eq!(post_throttle(&s, 41), 200);
    wait_rows(&ch, 2);
    // Two rows of another chain, the first's issuer not UTF-8; one more of this
    // node's chain at its second position, its code not UTF-8.
    ch.query(
        "INSERT INTO control_decisions SELECT * REPLACE ('planted' AS chain_id, \
         if(seq = 1, unhex('c3ff'), issuer) AS issuer) FROM control_decisions",
    );
    ch.query(
        "INSERT INTO control_decisions SELECT * REPLACE (unhex('ff') AS code) \
         FROM (SELECT * FROM control_decisions WHERE chain_id != 'planted' AND seq = 2)",
    );
    // The pages show every position (one row of two at one position), the
    // text replaced where it was not UTF-8.
    let history = s.get_json("/api/ledger/history");
    let rows = history.as_array().expect("a page of rows");
    assert_eq!(rows.len(), 4, "{history}");
    assert!(
        rows.iter()
            .any(|r| r["chain_id"] == "planted" && r["issuer"] == "\u{fffd}"),
        "{history}"
    );
    let request = rows[0]["request_id"].as_str().unwrap();
    let of_request = s.get_json(&format!("/api/ledger/request/{request}"));
    assert!(!of_request.as_array().unwrap().is_empty(), "{of_request}");
    // The sidecar's verification reports each as a break, and the rest.
    let verified = s.get_json("/api/ledger/verify");
    assert_eq!(verified["ok"], false, "{verified}");
    let chain = |id: &str| {
        verified["chains"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["chain_id"] == id)
            .cloned()
            .unwrap_or_default()
    };
    let breaks = |id: &str| chain(id)["breaks"].to_string();
    // Met after the row it copies, or before it (ClickHouse's order of two rows
    // at one position is its own).
    let second_row_2 = |said: &str| {
        said.contains("row 2 appears twice")
            || said.contains("row 2 has a malformed hash, or text that is not UTF-8")
    };
    assert!(second_row_2(&breaks("node-1")), "{verified}");
    assert_eq!(chain("node-1")["rows"], 3, "{verified}");
    assert!(
        breaks("planted").contains("row 1 has a malformed hash, or text that is not UTF-8"),
        "{verified}"
    );
    // A chain id that is not UTF-8: counted, not walked, not ok.
    ch.query(
        "INSERT INTO control_decisions SELECT * REPLACE (unhex('61ff') AS chain_id) \
         FROM (SELECT * FROM control_decisions WHERE chain_id = 'planted')",
    );
    let verified = s.get_json("/api/ledger/verify");
    assert_eq!(
        (
            &verified["not_utf8"]["rows"],
            &verified["not_utf8"]["chains"]
        ),
        (&serde_json::json!(2), &serde_json::json!(1)),
        "{verified}"
    );
    let gwctl = || {
        let o = std::process::Command::new(testkit::gwctl_bin())
            .args(["ledger", "verify", "--clickhouse"])
            .arg(format!("http://127.0.0.1:{}", ch.http_port))
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    let (code, out) = gwctl();
    assert_eq!(code, Some(1), "{out}");
    assert!(second_row_2(&out), "{out}");
    for said in [
        "chain planted: row 1 has a malformed hash, or text that is not UTF-8",
        "broken: 2 rows under 1 chain ids that are not UTF-8",
    ] {
        assert!(out.contains(said), "{said}: {out}");
    }
    // Without the planted rows: verified again.
    ch.query("DELETE FROM control_decisions WHERE chain_id != 'node-1' OR NOT isValidUTF8(code)");
    assert_eq!(s.get_json("/api/ledger/verify")["ok"], true);
    assert_eq!(gwctl().0, Some(0));
}

/// A ledger table made before the requester's columns were added (kept as it
/// was: an archive) is walked with them empty, as gwctl read it before it named
/// the columns it walks; a table that lacks a column no ledger lacks is refused,
/// saying which.
#[test]
fn gwctl_walks_a_table_made_before_the_requester_columns() {
    let (_d, ch, client) = with_table("ledger-verify-old-table");
    let mut chain = Chain::new("node-1");
    let rows: Vec<LedgerRow> = (1..=3)
        .map(|i| {
            let mut r = row(i);
            r.requester.clear();
            r.requester_roles.clear();
            r.token_issuer.clear();
            r.route.clear();
            chain.seal(r)
        })
        .collect();
    current_thread()
        .block_on(gw_sidecar::ledger::ship::insert(
            &client,
            "control_decisions",
            &rows,
            None,
        ))
        .unwrap();
    ch.query(
        "CREATE TABLE old_decisions ENGINE = MergeTree ORDER BY (chain_id, seq) AS \
         SELECT * EXCEPT (requester, requester_roles, token_issuer, route) FROM control_decisions",
    );
    ch.query(
        "CREATE TABLE not_a_ledger ENGINE = MergeTree ORDER BY (chain_id, seq) AS \
         SELECT chain_id, seq FROM control_decisions",
    );
    let gwctl = |table: &str| {
        let o = std::process::Command::new(testkit::gwctl_bin())
            .args([
                "ledger",
                "verify",
                "--clickhouse",
                &ch.url(),
                "--table",
                table,
            ])
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, out, err) = gwctl("old_decisions");
    assert_eq!((code, out.trim()), (Some(0), "ok 3 rows"), "{err}");
    let (code, _, err) = gwctl("not_a_ledger");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("`not_a_ledger` is not a ledger table: it has no column ts_ms"),
        "{err}"
    );
}

/// A start without `clickhouse_url` (development) on a journal whose ledger
/// rows a start with ClickHouse wrote is refused, saying what to do: such a
/// start dropped them, the journal deleted them as it rolled, and the next
/// start with ClickHouse resumed after its last row without them. Started with
/// ClickHouse again, every row lands.
#[test]
fn a_start_without_clickhouse_does_not_drop_the_rows_still_to_ship() {
    use gw_core::Action;
    use serde_json::Value;
    use testkit::fixtures::signed_command;
    let d = testkit::TempDir::new("ledger-no-url");
    let mut ch = ClickHouse::start(d.path());
    let (http, tcp) = (ch.http_port, ch.tcp_port);
    let state = d.path().join("state");
    let send = |s: &common::Served, n: u64| {
        let cmd = signed_command(n, Action::Throttle, common::now(), "dashboard", &[]);
        let (status, body) = s.post_command(cmd);
        assert_eq!(
            (status, &body["applied"]),
            (200, &Value::Bool(true)),
            "{body}"
        );
    };
    let s = common::serve(common::config_with_clickhouse(&state, false, &ch));
    send(&s, 1);
    wait_rows(&ch, 2);
    ch.process.stop();
    for n in 2..=21 {
        send(&s, n);
    }
    drop(s);
    let err = match current_thread().block_on(gw_sidecar::app::start(common::config(&state, false)))
    {
        Ok(_) => panic!("started without ClickHouse on rows still to ship"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("ledger rows an earlier start wrote") && err.contains("clickhouse_url"),
        "{err}"
    );
    let ch = ClickHouse::start_at(d.path(), http, tcp);
    let s = common::serve(common::config_with_clickhouse(&state, false, &ch));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let rows = loop {
        let rows = stored(&ch);
        let of = |id: &str| {
            rows.iter()
                .any(|r| r.request_id == id && r.stage == "agent")
        };
        if (2..=21).all(|n| of(&format!("req-{n}"))) {
            break rows;
        }
        assert!(std::time::Instant::now() < deadline, "{} rows", rows.len());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(verify_chain(&rows), Ok(rows.len() as u64));
    drop(s);
    // A journal that never held a ledger row starts without ClickHouse.
    let fresh = d.path().join("fresh");
    drop(common::serve(common::config(&fresh, false)));
}
