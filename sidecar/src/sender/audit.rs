//! Send audit: one row per transaction or bundle in ClickHouse `tx_sends`
//! (`sql/12_tx_sends.sql`), written off the send path.
//!
//! A send is never delayed by its audit: its row goes through a bounded queue to a
//! batcher that makes each batch durable in the journal (group commit with
//! everything else), and a shipper inserts each journal record's rows into
//! ClickHouse with that record's deduplication token (a retry, or a restart between
//! the insert and its mark, stores nothing twice) and marks it shipped (a
//! journal refusing the marks stops shipping a little past them). While
//! ClickHouse is away the rows wait in the journal; a crash loses only rows not yet
//! in the journal (the batcher's last few milliseconds), a shutdown none: it waits
//! for the sends running and then [`SendAudit::flush`]es the queue into the
//! journal. While the journal cannot be written the batcher retries, and rows that
//! find the queue full are dropped and counted
//! (`gw_sidecar_send_audit_total{event="dropped"}`). Rows not shipped yet are kept
//! in the journal even by a start that ships nothing (no sender, no ClickHouse).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::journal::{self, Journal, Lsn, Sink, Txn, Window};

/// Rows per insert at most.
pub const MAX_BATCH: usize = 10_000;

/// A row of `tx_sends`.
#[derive(Debug, Clone, Default, PartialEq, clickhouse::Row, Serialize, Deserialize)]
pub struct SendRow {
    /// Unix time, microseconds.
    pub ts_us: u64,
    /// Base58 signature (bundles: the relay's bundle id once known, else the first
    /// transaction's signature).
    pub signature: String,
    /// `rpc` (JSON-RPC endpoint) or `strategy` (hot path).
    pub source: String,
    /// Module whose state gated it (`""` when none did).
    pub module: String,
    /// `transaction` or `bundle`.
    pub kind: String,
    /// Route tried first.
    pub primary: String,
    /// Route that took it (`""` when none did).
    pub route: String,
    /// 1 when the second route was used.
    pub hedged: u8,
    /// `landed` (a route took it) or `failed`.
    pub outcome: String,
    /// From the decision to send until a route took it (or both failed).
    pub latency_us: u64,
    /// TPU leader address tried (`""` when none).
    pub leader: String,
    /// Tip chosen by the strategy (0 when none).
    #[serde(deserialize_with = "nan_when_null")]
    pub tip: f64,
    /// Model score (NaN when none; JSON, the journal's encoding, writes NaN as
    /// `null`, read back as NaN).
    #[serde(deserialize_with = "nan_when_null")]
    pub score: f64,
    /// What gave the score: the model's `name@version`, `ev` (the opportunity's
    /// own, for a module without a model), or `""` (not scored: JSON-RPC). Absent
    /// from rows journalled before 2026-12-05: `""`.
    #[serde(default)]
    pub scored_by: String,
    /// Why the TPU route failed (`""` if it did not).
    pub tpu_error: String,
    /// Why the relay route failed (`""` if it did not).
    pub relay_error: String,
    /// Wire size.
    pub bytes: u32,
    /// Who asked for it: the `sub` of the token the edge verified (JSON-RPC,
    /// opportunities over HTTP), or the QUIC ingest client's base58 identity.
    /// Absent from rows journalled before 2026-12-06: `""`.
    #[serde(default)]
    pub requester: String,
    /// That token's issuer (`""` for the QUIC ingest).
    #[serde(default)]
    pub token_issuer: String,
}

/// A number that JSON wrote as `null` (NaN or ±∞) reads back as NaN.
fn nan_when_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    use serde::Deserialize;
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Counters.
#[derive(Debug, Default)]
pub struct AuditStats {
    /// Rows stored in ClickHouse.
    pub written: AtomicU64,
    /// Rows dropped on a full queue.
    pub dropped: AtomicU64,
    /// Failed inserts (retried).
    pub insert_errors: AtomicU64,
}

/// How long the batcher gathers rows before it commits them.
const GATHER: Duration = Duration::from_millis(20);

/// Journalled send rows not yet in ClickHouse, by record, in order (a journal
/// [`Sink`]): the oldest in memory, at most `audit_memory_rows`; the rest wait in
/// the journal on disk only and are read back as the ones before them are shipped
/// ([`journal::Window`]). Shared (`Arc`), so that an insert takes its record
/// without copying it under the lock the journal's writer waits on.
pub struct SendsQueue {
    records: Mutex<Window<Arc<Vec<SendRow>>>>,
    /// Records waiting on disk only that an earlier run shipped (marked after the
    /// first record on disk only): not read back.
    shipped_on_disk: BTreeSet<Lsn>,
    /// While recovering: the weight of each record pushed on disk only, so that a
    /// later mark that it was shipped takes it off the on-disk gauge
    /// ([`Self::recovered_all`] drops it). At most `memory_rows` records, as the
    /// window's bound: beyond them a shipped record is counted until read back.
    recovering: BTreeMap<Lsn, u64>,
    memory_rows: usize,
    grew: Notify,
}

/// A record's send rows.
fn sends_of(txn: &Txn) -> Vec<Arc<Vec<SendRow>>> {
    txn.entries
        .iter()
        .filter_map(|e| match e {
            journal::Entry::Sends { rows } => Some(Arc::new(rows.clone())),
            _ => None,
        })
        .collect()
}

impl Sink for SendsQueue {
    fn committed(&self, lsn: Lsn, txn: &Txn) {
        let rows = sends_of(txn);
        let grew = !rows.is_empty();
        self.records.lock().push(lsn, rows);
        if grew {
            self.grew.notify_one();
        }
    }

    /// The oldest record with rows not yet shipped, whether anything ships them in
    /// this run or not (no sender, no ClickHouse): a later start does.
    fn hold(&self) -> Lsn {
        self.records.lock().hold()
    }

    fn audit(&self) -> bool {
        true
    }
}

impl SendsQueue {
    /// The rows of `records` not yet marked shipped, at most `memory_rows` of them
    /// in memory.
    pub fn recovered(records: &[(Lsn, Txn)], memory_rows: usize) -> SendsQueue {
        let mut q = SendsQueue::new(memory_rows);
        for (lsn, t) in records {
            q.recover(*lsn, t);
        }
        q.recovered_all();
        q
    }

    /// An empty queue keeping at most `memory_rows` rows in memory; recovered
    /// records go through [`Self::recover`].
    pub fn new(memory_rows: usize) -> SendsQueue {
        SendsQueue {
            records: Mutex::new(Window::new(memory_rows)),
            shipped_on_disk: BTreeSet::new(),
            recovering: BTreeMap::new(),
            memory_rows,
            grew: Notify::new(),
        }
    }

    /// Record `lsn`, read back at start: its rows wait, until a later record says
    /// they were shipped (a record shipped after it went to disk only is
    /// remembered, not read back, and taken off the on-disk gauge).
    /// [`Self::recovered_all`] follows the last.
    pub fn recover(&mut self, lsn: Lsn, txn: &Txn) {
        let w = self.records.get_mut();
        let rows = sends_of(txn);
        let weight: u64 = rows.iter().map(|r| r.len() as u64).sum();
        w.push(lsn, rows);
        if weight > 0
            && w.first_on_disk().is_some_and(|d| lsn >= d)
            && self.recovering.len() < self.memory_rows
        {
            self.recovering.insert(lsn, weight);
        }
        for e in &txn.entries {
            if let journal::Entry::SendsShipped { lsn: shipped } = e {
                if w.remove(*shipped) || w.first_on_disk().is_none_or(|d| *shipped < d) {
                    continue;
                }
                self.shipped_on_disk.insert(*shipped);
                if let Some(weight) = self.recovering.remove(shipped) {
                    w.forget_on_disk(weight);
                }
            }
        }
    }

    /// The last record was recovered: what only recovery needed is dropped.
    pub fn recovered_all(&mut self) {
        self.recovering = BTreeMap::new();
    }

    /// Rows waiting for ClickHouse (in the journal, and the oldest of them in
    /// memory until shipped).
    pub fn pending_rows(&self) -> u64 {
        self.records.lock().pending()
    }

    /// Of those, rows waiting on disk only.
    pub fn pending_rows_on_disk(&self) -> u64 {
        self.records.lock().on_disk()
    }

    /// Whether none wait.
    pub fn is_empty(&self) -> bool {
        self.pending_rows() == 0
    }

    /// When the records in memory are shipped and more wait on disk only: reads
    /// the next ones back (blocking).
    fn read_back(&self, journal: &Journal) -> Result<usize, journal::JournalError> {
        // A record an earlier run shipped was pushed without its rows at start.
        let mut extract = |lsn: Lsn, t: &Txn| {
            if self.shipped_on_disk.contains(&lsn) {
                Vec::new()
            } else {
                sends_of(t)
            }
        };
        Window::read_back(&self.records, journal, &mut extract, &|_, _| true, 0)
    }
}

/// What the batcher is handed.
// Nearly every item is a row: boxing it would cost an allocation per send.
#[allow(clippy::large_enum_variant)]
enum Item {
    Row(SendRow),
    /// Commit what came before now, then answer.
    Flush(oneshot::Sender<()>),
}

/// The audit queue's sending side.
#[derive(Clone)]
pub struct SendAudit {
    tx: mpsc::Sender<Item>,
    queue: Arc<SendsQueue>,
    /// Counters.
    pub stats: Arc<AuditStats>,
}

impl SendAudit {
    /// Starts the batcher (into `journal`) and the shipper (of `queue`, into
    /// `table`; `node_id` names the deduplication tokens). Must run inside a tokio
    /// runtime.
    pub fn start(
        journal: Journal,
        queue: Arc<SendsQueue>,
        client: clickhouse::Client,
        table: &str,
        node_id: &str,
        capacity: usize,
    ) -> (SendAudit, Vec<tokio::task::JoinHandle<()>>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let stats = Arc::new(AuditStats::default());
        let tasks = vec![
            tokio::spawn(batcher(rx, journal.clone(), stats.clone())),
            tokio::spawn(shipper(
                queue.clone(),
                journal,
                client,
                table.to_owned(),
                node_id.to_owned(),
                stats.clone(),
            )),
        ];
        (SendAudit { tx, queue, stats }, tasks)
    }

    /// Rows journalled and not yet in ClickHouse.
    pub fn pending_rows(&self) -> u64 {
        self.queue.pending_rows()
    }

    /// Of those, rows waiting on disk only.
    pub fn pending_rows_on_disk(&self) -> u64 {
        self.queue.pending_rows_on_disk()
    }

    /// Queues `row`; dropped and counted when the queue is full.
    pub fn record(&self, row: SendRow) {
        if self.tx.try_send(Item::Row(row)).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Returns once every row recorded before it is in the journal (or the batcher
    /// is gone).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Item::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Gathers rows for [`GATHER`] (or [`MAX_BATCH`], or until a flush) and journals
/// them.
async fn batcher(mut rx: mpsc::Receiver<Item>, journal: Journal, stats: Arc<AuditStats>) {
    loop {
        let mut batch = match rx.recv().await {
            None => return,
            Some(Item::Flush(done)) => {
                let _ = done.send(());
                continue;
            }
            Some(Item::Row(r)) => vec![r],
        };
        let mut flushed = None;
        let deadline = tokio::time::Instant::now() + GATHER;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Item::Row(r))) => batch.push(r),
                Ok(Some(Item::Flush(done))) => {
                    flushed = Some(done);
                    break;
                }
                Ok(None) | Err(_) => break,
            }
        }
        journal_rows(&journal, batch, &stats).await;
        if let Some(done) = flushed {
            let _ = done.send(());
        }
    }
}

/// Makes `rows` durable, retrying while the journal's disk fails (the queue in
/// front fills meanwhile, and what no longer fits is dropped and counted).
async fn journal_rows(journal: &Journal, rows: Vec<SendRow>, stats: &AuditStats) {
    let n = rows.len();
    let txn = Txn::of(vec![journal::Entry::Sends { rows }]);
    for attempt in 0u32.. {
        match journal.commit(txn.clone()).await {
            Ok(_) => return,
            Err(e @ journal::JournalError::Io { .. }) => {
                if attempt == 0 {
                    tracing::error!(rows = n, error = %e, "send audit rows not journalled yet (retrying)");
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => {
                tracing::error!(rows = n, error = %e, "send audit rows not journalled (lost)");
                stats.dropped.fetch_add(n as u64, Ordering::Relaxed);
                return;
            }
        }
    }
}

/// Records shipped whose marks are not yet durable, at most: a journal refusing
/// the marks (a failing disk) stops shipping past them. A restart inserts such
/// records again under the same names, which ClickHouse drops only while it
/// remembers them: `tx_sends` keeps the last 1 000 inserts' names
/// (`sql/12_tx_sends.sql`, shared by every node writing it). Unbounded, a backlog
/// shipped while the marks failed was stored twice after the restart. Not zero:
/// shipping is what lets the journal drop segments, and a full disk may take
/// the marks only once it has.
const MAX_UNMARKED: usize = 100;

/// Ships journalled rows record by record, each with its record's token, and
/// marks each shipped ([`MAX_UNMARKED`]).
async fn shipper(
    queue: Arc<SendsQueue>,
    journal: Journal,
    client: clickhouse::Client,
    table: String,
    node_id: String,
    stats: Arc<AuditStats>,
) {
    let mut last_err = String::new();
    // Said once while the marks keep failing (inserts go on between attempts).
    let mut mark_err = String::new();
    let mut unmarked: Vec<Lsn> = Vec::new();
    loop {
        let woke = queue.grew.notified();
        if !unmarked.is_empty() {
            let marks = unmarked
                .iter()
                .map(|&lsn| journal::Entry::SendsShipped { lsn })
                .collect();
            match journal.commit(Txn::of(marks)).await {
                Ok(_) => {
                    unmarked.clear();
                    mark_err.clear();
                }
                Err(e) => {
                    let e = e.to_string();
                    if e != mark_err {
                        tracing::error!(records = unmarked.len(), error = %e, "send audit records shipped but not marked in the journal (retrying; shipping stops 100 records past the last mark)");
                        mark_err = e;
                    }
                    if unmarked.len() >= MAX_UNMARKED {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
            }
        }
        if queue.records.lock().must_read_back() {
            let (q, j) = (queue.clone(), journal.clone());
            let read = tokio::task::spawn_blocking(move || q.read_back(&j)).await;
            let failed = match read {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(e) = failed {
                if e != last_err {
                    tracing::error!(error = %e, "send audit rows not read back from the journal (retrying)");
                    last_err = e;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        }
        let next = queue.records.lock().front().cloned();
        let Some((lsn, rows)) = next else {
            if unmarked.is_empty() {
                woke.await;
            } else {
                // The marks owed are tried again meanwhile.
                let _ = tokio::time::timeout(Duration::from_millis(500), woke).await;
            }
            continue;
        };
        let token = insert_token(&node_id, lsn, &rows);
        match insert(&client, &table, &token, &rows).await {
            Ok(()) => {
                stats
                    .written
                    .fetch_add(rows.len() as u64, Ordering::Relaxed);
                queue.records.lock().pop_front();
                unmarked.push(lsn);
                last_err.clear();
            }
            Err(e) => {
                stats.insert_errors.fetch_add(1, Ordering::Relaxed);
                if e != last_err {
                    tracing::warn!(rows = rows.len(), error = %e, "send audit rows wait in the journal");
                    last_err = e;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn insert(
    client: &clickhouse::Client,
    table: &str,
    token: &str,
    rows: &[SendRow],
) -> Result<(), String> {
    let mut ins = crate::ledger::ship::insert_once(client, token)
        .insert::<SendRow>(table)
        .await
        .map_err(|e| e.to_string())?;
    for r in rows {
        ins.write(r).await.map_err(|e| e.to_string())?;
    }
    ins.end().await.map_err(|e| e.to_string())
}

/// The name of the insert of journal record `lsn`'s `rows` (ClickHouse takes an
/// insert under a name it has seen for a retry, and drops it answering
/// success): the node, the record, and a digest of the rows. Named by the record
/// alone, two journals under one node id (a state directory restored from a
/// copy, a configuration cloned) numbered different sends alike, and the later
/// ones were dropped unseen. A retry of one insert has the same rows: the
/// digest covers what a row keeps exactly through the journal (each send's
/// time, signature and outcome; not its floating-point tip and score, which
/// may read back a bit apart) — read back after a restart, the rows of an
/// insert that landed name it as before.
fn insert_token(node_id: &str, lsn: Lsn, rows: &[SendRow]) -> String {
    let times: Vec<[u8; 8]> = rows.iter().map(|r| r.ts_us.to_be_bytes()).collect();
    let parts: Vec<&[u8]> = rows
        .iter()
        .zip(&times)
        .flat_map(|(r, t)| [&t[..], r.signature.as_bytes(), r.outcome.as_bytes()])
        .collect();
    let body = crate::control::state_sign::message(b"", &parts);
    format!(
        "gw-sends-{node_id}-{lsn}-{}",
        hex::encode(gw_core::replay::digest(&body))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Entry, Options, STARTUP_HOLD};

    /// An insert's name holds its rows: the same record's retry keeps it, other
    /// rows under the same record number (another journal of the node id) do
    /// not share it.
    #[test]
    fn an_inserts_name_holds_its_rows() {
        let row = |sig: &str| SendRow {
            signature: sig.into(),
            ..SendRow::default()
        };
        let a = insert_token("node-1", 7, &[row("a")]);
        assert_eq!(a, insert_token("node-1", 7, &[row("a")]));
        // What the journal may read back a bit apart does not rename it.
        let scored = SendRow {
            score: f64::from(0.184_903_73_f32),
            tip: 0.1,
            ..row("a")
        };
        assert_eq!(a, insert_token("node-1", 7, &[scored]));
        assert_ne!(a, insert_token("node-1", 7, &[row("b")]));
        assert_ne!(a, insert_token("node-1", 8, &[row("a")]));
        assert!(a.starts_with("gw-sends-node-1-7-"), "{a}");
    }

    fn open(dir: &std::path::Path) -> (Journal, Arc<SendsQueue>) {
        let opened = Journal::open(
            dir,
            Options {
                segment_bytes: 256,
                ..Options::default()
            },
        )
        .unwrap();
        let q = Arc::new(SendsQueue::recovered(&opened.records, 100));
        let sinks = vec![q.clone() as Arc<dyn Sink>];
        (opened.start(None, sinks).unwrap(), q)
    }

    /// A row journalled by an older version (no `scored_by`, no `requester`, no
    /// `token_issuer`; NaN written as `null`) reads back with those empty.
    #[test]
    fn rows_journalled_before_the_newer_columns_read_back() {
        let old = r#"{"ts_us":1,"signature":"s","source":"rpc","module":"mev","kind":"transaction","primary":"tpu","route":"tpu","hedged":0,"outcome":"landed","latency_us":5,"leader":"","tip":0.0,"score":null,"tpu_error":"","relay_error":"","bytes":100}"#;
        let row: SendRow = serde_json::from_str(old).unwrap();
        assert_eq!(
            (
                row.scored_by.as_str(),
                row.requester.as_str(),
                row.token_issuer.as_str()
            ),
            ("", "", "")
        );
        assert!(row.score.is_nan());
        assert_eq!((row.signature.as_str(), row.bytes), ("s", 100));
    }

    /// Rows not shipped are kept by a start that ships nothing (no sender, no
    /// ClickHouse): the journal rolls and drops its old segments around them, and
    /// a later start still finds them.
    #[test]
    fn unshipped_rows_outlive_a_start_that_ships_nothing() {
        let d = testkit::TempDir::new("sends-hold");
        // A row journalled and never shipped (the start holds everything).
        let (j, _) = open(d.path());
        let row = SendRow {
            signature: "kept".into(),
            ..SendRow::default()
        };
        j.commit_blocking(Txn::of(vec![Entry::Sends { rows: vec![row] }]))
            .unwrap();
        j.stop();
        // The start that ships nothing: it only says what it keeps.
        let (j, q) = open(d.path());
        assert_eq!(q.pending_rows(), 1);
        j.hold(STARTUP_HOLD, Lsn::MAX);
        for i in 0..40 {
            j.commit_blocking(Txn::of(vec![Entry::Forwarded { lsn: i }]))
                .unwrap();
        }
        j.stop();
        let (_, q) = open(d.path());
        assert_eq!(
            q.pending_rows(),
            1,
            "the unshipped row is still in the journal"
        );
        let front = q.records.lock().front().cloned().unwrap();
        assert_eq!(front.1[0].signature, "kept");
    }

    /// Beyond `audit_memory_rows` the rows wait on disk only, across many segments
    /// and a restart, and come back in order as the ones before them are shipped;
    /// what an earlier run marked shipped is not read back.
    #[test]
    fn rows_beyond_the_memory_bound_are_read_back_in_order() {
        let d = testkit::TempDir::new("sends-window");
        let rows_of = |r: u32| -> Vec<SendRow> {
            (0..10)
                .map(|i| SendRow {
                    signature: format!("{r}-{i}"),
                    ..SendRow::default()
                })
                .collect()
        };
        let (j, q) = open(d.path());
        j.hold(STARTUP_HOLD, Lsn::MAX);
        let mut lsns = Vec::new();
        for r in 0..30 {
            let c = j
                .commit_blocking(Txn::of(vec![Entry::Sends { rows: rows_of(r) }]))
                .unwrap();
            lsns.push(c.lsn);
        }
        assert_eq!((q.pending_rows(), q.pending_rows_on_disk()), (300, 200));
        // An earlier run shipped the first 5 records and 3 of those on disk only
        // (and marked them).
        for lsn in lsns[..5].iter().chain(&lsns[12..15]) {
            j.commit_blocking(Txn::of(vec![Entry::SendsShipped { lsn: *lsn }]))
                .unwrap();
        }
        j.stop();
        drop(q);
        // With room to remember only 10 records' weights, the shipped ones beyond
        // them are still not read back, and counted until they would be.
        let opened = Journal::open(d.path(), Options::default()).unwrap();
        let small = SendsQueue::recovered(&opened.records, 10);
        drop(opened);
        assert_eq!(
            (small.pending_rows(), small.pending_rows_on_disk()),
            (250, 250)
        );
        let skipped: Vec<Lsn> = small.shipped_on_disk.iter().copied().collect();
        assert_eq!(skipped, [&lsns[1..5], &lsns[12..15]].concat());
        let (j, q) = open(d.path());
        j.hold(STARTUP_HOLD, Lsn::MAX);
        // Recovery is one pass: the first 10 records went to memory, the 5 marked
        // shipped left it again, and the other 20 wait on disk only, of which the
        // 3 marked shipped are not counted.
        assert_eq!((q.pending_rows(), q.pending_rows_on_disk()), (220, 170));
        // Ship the way the shipper does, with rows still coming.
        let mut shipped = Vec::new();
        for r in 30..33 {
            j.commit_blocking(Txn::of(vec![Entry::Sends { rows: rows_of(r) }]))
                .unwrap();
        }
        loop {
            if q.records.lock().must_read_back() {
                q.read_back(&j).unwrap();
            }
            assert!(
                q.records.lock().in_memory() <= 10,
                "at most 100 rows in memory"
            );
            let Some((lsn, rows)) = q.records.lock().pop_front() else {
                break;
            };
            j.commit_blocking(Txn::of(vec![Entry::SendsShipped { lsn }]))
                .unwrap();
            shipped.push(rows[0].signature.clone());
        }
        let want: Vec<String> = (5..12).chain(15..33).map(|r| format!("{r}-0")).collect();
        assert_eq!(shipped, want);
        assert_eq!((q.pending_rows(), q.pending_rows_on_disk()), (0, 0));
        // The window is whole again: a new record is in memory, and a restart
        // finds only it.
        j.commit_blocking(Txn::of(vec![Entry::Sends { rows: rows_of(99) }]))
            .unwrap();
        assert_eq!((q.pending_rows(), q.pending_rows_on_disk()), (10, 0));
        j.stop();
        drop(q);
        let (_, q) = open(d.path());
        assert_eq!(q.pending_rows(), 10);
    }
}
