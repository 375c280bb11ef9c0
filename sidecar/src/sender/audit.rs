//! Send audit: one row per transaction or bundle in ClickHouse `tx_sends`
//! (`sql/12_tx_sends.sql`), written in batches off the send path.
//!
//! Sends are too frequent for the control ledger's fsync-per-row discipline: rows go
//! through a bounded queue to one writer task that inserts up to 10 000 at a time and
//! keeps a failed batch to retry (ClickHouse away). When the queue is full, rows are
//! dropped and counted (`gw_sidecar_send_audit_total{event="dropped"}`): a send is never
//! delayed by its audit. A crash loses what is queued (at most the queue size).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Rows per insert at most.
pub const MAX_BATCH: usize = 10_000;

/// A row of `tx_sends`.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, Serialize, Deserialize)]
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
    pub tip: f64,
    /// Model score (NaN when none).
    pub score: f64,
    /// Why the TPU route failed (`""` if it did not).
    pub tpu_error: String,
    /// Why the relay route failed (`""` if it did not).
    pub relay_error: String,
    /// Wire size.
    pub bytes: u32,
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

/// The audit queue's sending side.
#[derive(Clone)]
pub struct SendAudit {
    tx: mpsc::Sender<SendRow>,
    /// Counters.
    pub stats: Arc<AuditStats>,
}

impl SendAudit {
    /// Starts the writer for `table`. Must run inside a tokio runtime.
    pub fn start(
        client: clickhouse::Client,
        table: &str,
        capacity: usize,
    ) -> (SendAudit, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let stats = Arc::new(AuditStats::default());
        let task = tokio::spawn(writer(rx, client, table.to_owned(), stats.clone()));
        (SendAudit { tx, stats }, task)
    }

    /// Queues `row`; dropped and counted when the queue is full.
    pub fn record(&self, row: SendRow) {
        if self.tx.try_send(row).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn writer(
    mut rx: mpsc::Receiver<SendRow>,
    client: clickhouse::Client,
    table: String,
    stats: Arc<AuditStats>,
) {
    let mut batch: Vec<SendRow> = Vec::new();
    let mut token = String::new();
    let mut last_err = String::new();
    loop {
        if batch.is_empty() {
            match rx.recv().await {
                Some(r) => batch.push(r),
                None => return,
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            // A retried batch is the same batch with the same token: an insert that
            // landed but whose answer was lost is not stored twice.
            token = uuid::Uuid::new_v4().to_string();
        }
        match insert(&client, &table, &token, &batch).await {
            Ok(()) => {
                stats
                    .written
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                batch.clear();
                last_err.clear();
            }
            Err(e) => {
                stats.insert_errors.fetch_add(1, Ordering::Relaxed);
                if e != last_err {
                    tracing::warn!(rows = batch.len(), error = %e, "send audit rows kept for retry");
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
