//! Send audit: one row per transaction or bundle in ClickHouse `tx_sends`
//! (`sql/12_tx_sends.sql`), written off the send path.
//!
//! A send is never delayed by its audit: its row goes through a bounded queue to a
//! batcher that makes each batch durable in the journal (group commit with
//! everything else), and a shipper inserts each journal record's rows into
//! ClickHouse with that record's deduplication token (a retry, or a restart between
//! the insert and its mark, stores nothing twice) and marks it shipped. While
//! ClickHouse is away the rows wait in the journal; a crash loses only rows not yet
//! in the journal (the batcher's last few milliseconds), a shutdown none: it waits
//! for the sends running and then [`SendAudit::flush`]es the queue into the
//! journal. While the journal cannot be written the batcher retries, and rows that
//! find the queue full are dropped and counted
//! (`gw_sidecar_send_audit_total{event="dropped"}`). Rows not shipped yet are kept
//! in the journal even by a start that ships nothing (no sender, no ClickHouse).

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::journal::{self, Journal, Lsn, Sink, Txn};

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
    /// Why the TPU route failed (`""` if it did not).
    pub tpu_error: String,
    /// Why the relay route failed (`""` if it did not).
    pub relay_error: String,
    /// Wire size.
    pub bytes: u32,
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

/// The journal hold of rows not yet in ClickHouse.
const HOLD: &str = "sends";

/// How long the batcher gathers rows before it commits them.
const GATHER: Duration = Duration::from_millis(20);

/// Journalled send rows not yet in ClickHouse, by record, in order (a journal
/// [`Sink`]).
#[derive(Default)]
pub struct SendsQueue {
    records: Mutex<VecDeque<(Lsn, Vec<SendRow>)>>,
    /// Rows in `records`.
    rows: AtomicU64,
    grew: Notify,
}

impl Sink for SendsQueue {
    fn committed(&self, lsn: Lsn, txn: &Txn) {
        let mut q = self.records.lock();
        for e in &txn.entries {
            if let journal::Entry::Sends { rows } = e {
                self.rows.fetch_add(rows.len() as u64, Ordering::Relaxed);
                q.push_back((lsn, rows.clone()));
            }
        }
        drop(q);
        self.grew.notify_one();
    }
}

impl SendsQueue {
    /// Tells `journal` the oldest record with rows not yet shipped (none: nothing).
    /// Set at every start before the journal may drop anything, shipper or not.
    pub fn hold_unshipped(&self, journal: &Journal) {
        let q = self.records.lock();
        journal.hold(HOLD, q.front().map_or(Lsn::MAX, |(l, _)| *l));
    }

    /// The rows of `records` not yet marked shipped.
    pub fn recovered(records: &[(Lsn, Txn)]) -> SendsQueue {
        let shipped: BTreeSet<Lsn> = records
            .iter()
            .flat_map(|(_, t)| t.entries.iter())
            .filter_map(|e| match e {
                journal::Entry::SendsShipped { lsn } => Some(*lsn),
                _ => None,
            })
            .collect();
        let q = SendsQueue::default();
        for (lsn, t) in records {
            if !shipped.contains(lsn) {
                q.committed(*lsn, t);
            }
        }
        q
    }

    /// Rows waiting for ClickHouse (in the journal, and held in memory until
    /// shipped).
    pub fn pending_rows(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }

    /// Records waiting.
    pub fn len(&self) -> usize {
        self.records.lock().len()
    }

    /// Whether none wait.
    pub fn is_empty(&self) -> bool {
        self.records.lock().is_empty()
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

/// Ships journalled rows record by record, each with its record's token.
async fn shipper(
    queue: Arc<SendsQueue>,
    journal: Journal,
    client: clickhouse::Client,
    table: String,
    node_id: String,
    stats: Arc<AuditStats>,
) {
    let mut last_err = String::new();
    loop {
        let woke = queue.grew.notified();
        queue.hold_unshipped(&journal);
        let next = queue.records.lock().front().cloned();
        let Some((lsn, rows)) = next else {
            woke.await;
            continue;
        };
        let token = format!("gw-sends-{node_id}-{lsn}");
        match insert(&client, &table, &token, &rows).await {
            Ok(()) => {
                stats
                    .written
                    .fetch_add(rows.len() as u64, Ordering::Relaxed);
                if let Some((_, r)) = queue.records.lock().pop_front() {
                    queue.rows.fetch_sub(r.len() as u64, Ordering::Relaxed);
                }
                journal.commit_detached(Txn::of(vec![journal::Entry::SendsShipped { lsn }]));
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
    let mut ins = client
        .clone()
        .with_setting("insert_deduplication_token", token)
        .insert::<SendRow>(table)
        .await
        .map_err(|e| e.to_string())?;
    for r in rows {
        ins.write(r).await.map_err(|e| e.to_string())?;
    }
    ins.end().await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Entry, Options, STARTUP_HOLD};

    fn open(dir: &std::path::Path) -> (Journal, SendsQueue) {
        let opened = Journal::open(
            dir,
            Options {
                segment_bytes: 256,
                ..Options::default()
            },
        )
        .unwrap();
        let q = SendsQueue::recovered(&opened.records);
        (opened.start(None, Vec::new()).unwrap(), q)
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
        drop(j);
        // The start that ships nothing: it only says what it keeps.
        let (j, q) = open(d.path());
        assert_eq!(q.len(), 1);
        q.hold_unshipped(&j);
        j.hold(STARTUP_HOLD, Lsn::MAX);
        for i in 0..40 {
            j.commit_blocking(Txn::of(vec![Entry::Forwarded { lsn: i }]))
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
        drop(j);
        let (_, q) = open(d.path());
        assert_eq!(q.len(), 1, "the unshipped row is still in the journal");
        let front = q.records.lock().front().cloned().unwrap();
        assert_eq!(front.1[0].signature, "kept");
    }
}
