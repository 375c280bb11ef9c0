//! Shipping the ledger to ClickHouse: the rows of every durable transaction are
//! queued in order ([`RowQueue`], a journal [`Sink`]); one task inserts them in
//! batches, in `seq` order, each batch with an `insert_deduplication_token` (a retry
//! is not stored twice), and lets the journal drop what ClickHouse holds. ClickHouse
//! is what says what it holds: at start, and after an answer went missing, the
//! shipper asks for the chain's `max(seq)` rather than trusting a local mark.

use std::borrow::Borrow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gw_core::ledger::{Chain, ChainError, LedgerRow};
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::checkpoint::Checkpointer;
use crate::journal::{self, Journal, Lsn, Sink, Txn, Window};

/// The most rows one insert carries.
pub const MAX_BATCH_ROWS: usize = 10_000;

/// The ClickHouse row of `control_decisions` (same fields as [`LedgerRow`]).
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Serialize, Deserialize)]
pub struct DecisionRow {
    chain_id: String,
    seq: u64,
    ts_ms: u64,
    stage: String,
    decision: String,
    code: String,
    request_id: String,
    issuer: String,
    module: String,
    action: String,
    pubkey_id: String,
    sig_alg: String,
    nonce: u64,
    args_json: String,
    raw_hex: String,
    requester: String,
    requester_roles: String,
    token_issuer: String,
    route: String,
    prev_hash: String,
    row_hash: String,
}

impl From<&LedgerRow> for DecisionRow {
    fn from(r: &LedgerRow) -> Self {
        DecisionRow {
            chain_id: r.chain_id.clone(),
            seq: r.seq,
            ts_ms: r.ts_ms,
            stage: r.stage.clone(),
            decision: r.decision.clone(),
            code: r.code.clone(),
            request_id: r.request_id.clone(),
            issuer: r.issuer.clone(),
            module: r.module.clone(),
            action: r.action.clone(),
            pubkey_id: r.pubkey_id.clone(),
            sig_alg: r.sig_alg.clone(),
            nonce: r.nonce,
            args_json: r.args_json.clone(),
            raw_hex: r.raw_hex.clone(),
            requester: r.requester.clone(),
            requester_roles: r.requester_roles.clone(),
            token_issuer: r.token_issuer.clone(),
            route: r.route.clone(),
            prev_hash: r.prev_hash.clone(),
            row_hash: r.row_hash.clone(),
        }
    }
}

/// A [`DecisionRow`] borrowed from a [`LedgerRow`]: what shipping writes (no copy
/// of the row's strings).
#[derive(Debug, clickhouse::Row, Serialize)]
struct DecisionRowRef<'a> {
    chain_id: &'a str,
    seq: u64,
    ts_ms: u64,
    stage: &'a str,
    decision: &'a str,
    code: &'a str,
    request_id: &'a str,
    issuer: &'a str,
    module: &'a str,
    action: &'a str,
    pubkey_id: &'a str,
    sig_alg: &'a str,
    nonce: u64,
    args_json: &'a str,
    raw_hex: &'a str,
    requester: &'a str,
    requester_roles: &'a str,
    token_issuer: &'a str,
    route: &'a str,
    prev_hash: &'a str,
    row_hash: &'a str,
}

impl<'a> From<&'a LedgerRow> for DecisionRowRef<'a> {
    fn from(r: &'a LedgerRow) -> Self {
        DecisionRowRef {
            chain_id: &r.chain_id,
            seq: r.seq,
            ts_ms: r.ts_ms,
            stage: &r.stage,
            decision: &r.decision,
            code: &r.code,
            request_id: &r.request_id,
            issuer: &r.issuer,
            module: &r.module,
            action: &r.action,
            pubkey_id: &r.pubkey_id,
            sig_alg: &r.sig_alg,
            nonce: r.nonce,
            args_json: &r.args_json,
            raw_hex: &r.raw_hex,
            requester: &r.requester,
            requester_roles: &r.requester_roles,
            token_issuer: &r.token_issuer,
            route: &r.route,
            prev_hash: &r.prev_hash,
            row_hash: &r.row_hash,
        }
    }
}

impl From<DecisionRow> for LedgerRow {
    fn from(r: DecisionRow) -> Self {
        LedgerRow {
            chain_id: r.chain_id,
            seq: r.seq,
            ts_ms: r.ts_ms,
            stage: r.stage,
            decision: r.decision,
            code: r.code,
            request_id: r.request_id,
            issuer: r.issuer,
            module: r.module,
            action: r.action,
            pubkey_id: r.pubkey_id,
            sig_alg: r.sig_alg,
            nonce: r.nonce,
            args_json: r.args_json,
            raw_hex: r.raw_hex,
            requester: r.requester,
            requester_roles: r.requester_roles,
            token_issuer: r.token_issuer,
            route: r.route,
            prev_hash: r.prev_hash,
            row_hash: r.row_hash,
        }
    }
}

/// Why shipping (or finding the chain's position) failed; rows stay queued.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    /// ClickHouse refused or is unreachable.
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    /// What ClickHouse holds of this chain does not continue the local one.
    #[error("ledger chain: {0}")]
    Chain(#[from] ChainError),
    /// Rows waiting on disk only could not be read back from the journal.
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    /// ClickHouse holds rows of this chain beyond the journal's last one at start.
    #[error(transparent)]
    Behind(#[from] JournalBehind),
    /// ClickHouse holds a row of this chain this node never sealed: another
    /// writer uses the chain id. Nothing is shipped (rows of either writer would
    /// be dropped as stored by the other).
    #[error("ClickHouse holds row {seq} of chain `{chain}`, and this node sealed rows up to {sealed} only: another writer uses the chain id `{chain}` (each node needs its own node_id); nothing is shipped until that is resolved")]
    ForeignRows {
        /// The chain.
        chain: String,
        /// ClickHouse's last row.
        seq: u64,
        /// The newest row this node sealed.
        sealed: u64,
    },
    /// The pre-journal spool could not be read.
    #[error("legacy ledger spool {path}: {detail}")]
    Legacy {
        /// The file.
        path: PathBuf,
        /// What.
        detail: String,
    },
}

/// The journal's ledger rows end before ClickHouse's rows of the same chain: it
/// lost rows it had shipped (a state directory restored from an older copy, or
/// writes lost at its end). Its chain cannot go on: the rows it would seal next
/// already exist, different, in ClickHouse — and its nonces and agent state are
/// as old as its rows.
#[derive(Debug, thiserror::Error)]
#[error(
    "the journal's last ledger row of chain `{chain}` is {journal}, but ClickHouse holds rows up to {stored}: the journal lost rows it had shipped (restored from an older copy?), and its nonces and agent state are as old; nothing is shipped. Put back the newest journal, or move the journal aside: the chain then resumes after ClickHouse's row {stored}, with a `resumed` row that says so (docs/architecture.md, The control path)"
)]
pub struct JournalBehind {
    /// The chain.
    pub chain: String,
    /// The journal's last row.
    pub journal: u64,
    /// ClickHouse's last row.
    pub stored: u64,
}

impl JournalBehind {
    /// `Err` when ClickHouse's last row of `chain`, `stored`, lies beyond the
    /// journal's, `journal`.
    fn check(chain: &str, journal: u64, stored: u64) -> Result<(), JournalBehind> {
        if stored <= journal {
            return Ok(());
        }
        Err(JournalBehind {
            chain: chain.to_owned(),
            journal,
            stored,
        })
    }
}

/// Whether ClickHouse's last row of `chain_id` lies beyond the journal's last row
/// `journal_head` (see [`JournalBehind`]); `Ok(())` also when ClickHouse holds
/// nothing of it.
pub async fn check_not_behind(
    client: &clickhouse::Client,
    table: &str,
    chain_id: &str,
    journal_head: u64,
) -> Result<(), ShipError> {
    match stored_head(client, table, chain_id).await {
        Ok(Some((stored, _))) => Ok(JournalBehind::check(chain_id, journal_head, stored)?),
        Ok(None) => Ok(()),
        Err(e) if e.to_string().contains("UNKNOWN_TABLE") => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Sealed rows not yet in ClickHouse, in `seq` order, with their records' LSNs: the
/// oldest in memory, at most the queue's bound (`audit_memory_rows`); the rest wait
/// in the journal on disk and are read back as the rows before them are shipped
/// ([`journal::Window`]). Shared (`Arc`), so that an insert takes its rows without
/// copying them under the lock the journal's writer waits on.
pub struct RowQueue {
    rows: Mutex<Window<Arc<LedgerRow>>>,
    /// The record of the newest row: kept, so a restart knows the chain's head.
    last: AtomicU64,
    /// The newest row's seq (in memory or on disk only) and hash, read together.
    head: Mutex<(u64, String)>,
    /// ClickHouse holds every row up to this seq: not read back from disk.
    stored: AtomicU64,
    /// The range of the latest insert begun ([`journal::Entry::Shipping`]).
    intent: Mutex<Option<(u64, u64)>>,
    grew: Notify,
    pending: Gauge,
    /// Of those, rows waiting on disk only.
    pending_on_disk: Gauge,
    /// Bytes of the rows waiting in memory.
    memory_bytes: Gauge,
    /// Rows ClickHouse acknowledged and later did not hold ([`Shipper::learn`]).
    lost: Counter,
    /// Rows per insert at most: [`MAX_BATCH_ROWS`], or half the memory's bound, so
    /// that an insert's range read back after a restart is in memory whole.
    batch_rows: usize,
    /// Why rows are not reaching ClickHouse now, if they are not
    /// ([`RowQueue::shipping`]).
    shipping: Mutex<Option<Stalled>>,
}

/// Why the ledger's rows are not reaching ClickHouse now ([`RowQueue::shipping`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stalled {
    /// What is wrong, as the log says it.
    pub detail: String,
    /// Commands are refused meanwhile (the chain is not known yet), not only
    /// kept in the journal.
    pub refusing: bool,
    /// Nothing ships until an operator acts (ClickHouse holds more of the chain,
    /// or rows that are not this node's).
    pub needs_operator: bool,
}

/// Rows of the ledger and of the send audit kept in memory while they wait for
/// ClickHouse, by default (`audit_memory_rows`).
pub const MEMORY_ROWS: usize = 100_000;

/// Bytes of ledger rows kept in memory while they wait for ClickHouse, by default
/// (`audit_memory_bytes`): 256 MiB.
pub const MEMORY_BYTES: usize = 256 << 20;

impl Sink for RowQueue {
    fn committed(&self, lsn: Lsn, txn: &Txn) {
        let mut rows = Vec::new();
        for e in &txn.entries {
            match e {
                journal::Entry::Row(r) => rows.push(Arc::clone(r)),
                journal::Entry::Shipping { first, last } => {
                    *self.intent.lock() = Some((*first, *last));
                }
                _ => {}
            }
        }
        let Some(newest) = rows.last() else {
            self.rows.lock().push(lsn, rows);
            return;
        };
        self.last.store(lsn, Ordering::Relaxed);
        {
            let mut head = self.head.lock();
            head.0 = newest.seq;
            head.1.clear();
            head.1.push_str(&newest.row_hash);
        }
        let mut q = self.rows.lock();
        q.push(lsn, rows);
        self.publish(&q);
        drop(q);
        self.grew.notify_one();
    }

    /// The oldest record with a row still to ship (in memory or on disk only), and
    /// the record of the newest row (the chain's head for the next start).
    fn hold(&self) -> Lsn {
        let first = self.rows.lock().hold();
        match self.last.load(Ordering::Relaxed) {
            0 => first,
            last => first.min(last),
        }
    }

    fn audit(&self) -> bool {
        true
    }
}

impl RowQueue {
    /// A queue holding the recovered transactions' rows (all of them, at most
    /// `memory_rows` in memory: the shipper drops what ClickHouse already has).
    pub fn recovered(records: &[(Lsn, Txn)], pending: Gauge, memory_rows: usize) -> RowQueue {
        let q = RowQueue::new(pending, memory_rows);
        for (lsn, t) in records {
            q.committed(*lsn, t);
        }
        q
    }

    /// An empty queue keeping at most `memory_rows` rows in memory; recovered
    /// records are handed to it as [`Sink::committed`] ([`Journal::open_with`]).
    pub fn new(pending: Gauge, memory_rows: usize) -> RowQueue {
        RowQueue::bounded(pending, memory_rows, usize::MAX)
    }

    /// An empty queue keeping at most `memory_rows` rows, and `memory_bytes` of
    /// them ([`journal::Weigh::bytes`]: a refusal's row may hold 128 KiB, a
    /// command's twice its body), in memory — at least one record's.
    pub fn bounded(pending: Gauge, memory_rows: usize, memory_bytes: usize) -> RowQueue {
        RowQueue {
            rows: Mutex::new(Window::bounded(memory_rows, memory_bytes)),
            memory_bytes: Gauge::default(),
            pending_on_disk: Gauge::default(),
            lost: Counter::default(),
            batch_rows: (memory_rows / 2).clamp(1, MAX_BATCH_ROWS),
            last: AtomicU64::new(0),
            head: Mutex::new((0, String::new())),
            stored: AtomicU64::new(0),
            intent: Mutex::new(None),
            grew: Notify::new(),
            pending,
            shipping: Mutex::new(None),
        }
    }

    /// Why rows are not reaching ClickHouse now (`None`: the last insert, or
    /// look at ClickHouse, went through, or none was tried yet).
    pub fn shipping(&self) -> Option<Stalled> {
        self.shipping.lock().clone()
    }

    /// Notes why rows are not reaching ClickHouse (`None`: they are again).
    pub fn set_shipping(&self, stalled: Option<Stalled>) {
        *self.shipping.lock() = stalled;
    }

    /// The chain's newest row is `row` unless a newer one was handed on (a chain
    /// taken up from a pre-journal spool: the journal holds none of its rows).
    pub fn seed_head(&self, row: &LedgerRow) {
        let mut head = self.head.lock();
        if head.0 < row.seq {
            *head = (row.seq, row.row_hash.clone());
        }
    }

    /// The gauge of rows waiting.
    pub fn pending_gauge(&self) -> Gauge {
        self.pending.clone()
    }

    /// Rows waiting (in memory and on disk only).
    pub fn len(&self) -> usize {
        usize::try_from(self.rows.lock().pending()).unwrap_or(usize::MAX)
    }

    /// Whether none wait.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows waiting on disk only.
    pub fn on_disk(&self) -> u64 {
        self.rows.lock().on_disk()
    }

    /// The gauge of rows waiting on disk only.
    pub fn on_disk_gauge(&self) -> Gauge {
        self.pending_on_disk.clone()
    }

    /// Bytes of the rows waiting in memory.
    pub fn bytes_in_memory(&self) -> usize {
        self.rows.lock().bytes_in_memory()
    }

    /// The gauge of [`Self::bytes_in_memory`].
    pub fn memory_bytes_gauge(&self) -> Gauge {
        self.memory_bytes.clone()
    }

    /// The count of rows ClickHouse acknowledged and later did not hold.
    pub fn lost_counter(&self) -> Counter {
        self.lost.clone()
    }

    fn publish(&self, q: &Window<Arc<LedgerRow>>) {
        self.pending
            .set(i64::try_from(q.pending()).unwrap_or(i64::MAX));
        self.pending_on_disk
            .set(i64::try_from(q.on_disk()).unwrap_or(i64::MAX));
        self.memory_bytes
            .set(i64::try_from(q.bytes_in_memory()).unwrap_or(i64::MAX));
    }

    /// ClickHouse holds every row through `seq`: drops them from memory, and from
    /// what is read back from disk.
    fn drop_through(&self, seq: u64) {
        self.stored.store(seq, Ordering::Relaxed);
        let mut q = self.rows.lock();
        while q.front().is_some_and(|(_, r)| r.seq <= seq) {
            q.pop_front();
        }
        self.publish(&q);
    }

    fn newest_seq(&self) -> Option<u64> {
        (!self.is_empty()).then(|| self.head.lock().0)
    }

    /// When the rows in memory are shipped and more wait on disk: reads the next
    /// ones back from `journal` (blocking), `at_least` of them if the bound is
    /// less. `Ok(rows read back)`.
    fn read_back(
        &self,
        journal: &Journal,
        at_least: usize,
    ) -> Result<usize, journal::JournalError> {
        let stored = self.stored.load(Ordering::Relaxed);
        let n = Window::read_back(
            &self.rows,
            journal,
            &mut |_, t| {
                t.entries
                    .iter()
                    .filter_map(|e| match e {
                        journal::Entry::Row(r) => Some(Arc::clone(r)),
                        _ => None,
                    })
                    .collect()
            },
            &|_, r| r.seq > stored,
            at_least,
        )?;
        self.publish(&self.rows.lock());
        Ok(n)
    }

    /// `view` of the newest `limit` rows in memory still to ship that `keep`
    /// selects, newest first, among the newest [`PENDING_SCAN`] (what the ledger
    /// endpoints add to ClickHouse's answer). Rows waiting on disk only (behind a
    /// long ClickHouse outage) are not among them. The journal's writer waits on
    /// the queue's lock, so the rows are taken under it [`SCAN_CHUNK`] at a time,
    /// by reference only, and `keep` and `view` run outside it: a commit waits
    /// for one chunk's references at most, however many rows are queued. Rows
    /// shipped meanwhile end the scan (ClickHouse holds them); rows queued
    /// meanwhile are newer than the scan's start and not among them.
    pub fn newest_where<T>(
        &self,
        limit: usize,
        keep: impl Fn(&LedgerRow) -> bool,
        view: impl Fn(&LedgerRow) -> T,
    ) -> Vec<T> {
        let mut shown: Vec<Arc<LedgerRow>> = Vec::new();
        // The scan goes on below this seq (`None`: from the newest).
        let mut below: Option<u64> = None;
        let mut scanned = 0;
        while scanned < PENDING_SCAN && shown.len() < limit {
            let chunk: Vec<Arc<LedgerRow>> = {
                let q = self.rows.lock();
                let end = match below {
                    None => q.in_memory(),
                    Some(seq) => q.partition_point(|(_, r)| r.seq < seq),
                };
                let n = SCAN_CHUNK.min(PENDING_SCAN - scanned).min(end);
                (end - n..end)
                    .rev()
                    .filter_map(|i| q.get(i).map(|(_, r)| Arc::clone(r)))
                    .collect()
            };
            let Some(last) = chunk.last() else {
                break;
            };
            scanned += chunk.len();
            below = Some(last.seq);
            shown.extend(
                chunk
                    .into_iter()
                    .filter(|r| keep(r))
                    .take(limit - shown.len()),
            );
        }
        shown.iter().map(|r| view(r)).collect()
    }

    /// Row `seq`, when it is in memory.
    fn find(&self, seq: u64) -> Option<LedgerRow> {
        let q = self.rows.lock();
        let front = q.front()?.1.seq;
        // Consecutive seqs: row `seq` is at its distance from the front.
        let at = usize::try_from(seq.checked_sub(front)?).ok()?;
        let row = q.get(at).map(|(_, r)| Arc::clone(r));
        drop(q);
        row.filter(|r| r.seq == seq).map(|r| LedgerRow::clone(&r))
    }

    /// Row `seq` among the rows waiting on disk only (blocking; reads the journal
    /// until it is found or passed).
    fn find_on_disk(
        &self,
        journal: &Journal,
        seq: u64,
    ) -> Result<Option<LedgerRow>, journal::JournalError> {
        let (from, upto) = {
            let q = self.rows.lock();
            match q.first_on_disk() {
                Some(f) => (f, q.heard()),
                None => return Ok(None),
            }
        };
        let mut found = None;
        journal.read(from, upto, &mut |_, t| {
            for e in t.entries {
                if let journal::Entry::Row(r) = e {
                    if r.seq >= seq {
                        found = (r.seq == seq).then(|| Arc::unwrap_or_clone(r));
                        return false;
                    }
                }
            }
            true
        })?;
        Ok(found)
    }

    /// The queued rows `first..=last` in memory (an insert's range: however many).
    fn range(&self, first: u64, last: u64) -> Vec<Arc<LedgerRow>> {
        self.rows
            .lock()
            .iter()
            .skip_while(|(_, r)| r.seq < first)
            .take_while(|(_, r)| r.seq <= last)
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// Whether every row `first..=last` is queued in memory (the queue holds
    /// consecutive seqs: rows are sealed in order and dropped from the front).
    fn holds(&self, first: u64, last: u64) -> bool {
        let q = self.rows.lock();
        matches!((q.front(), q.back()), (Some((_, f)), Some((_, b))) if f.seq <= first && last <= b.seq)
    }

    /// The range of the latest insert begun, in this run or (from the journal) an
    /// earlier one.
    fn intent(&self) -> Option<(u64, u64)> {
        *self.intent.lock()
    }

    /// The oldest rows in memory, up to `batch_rows` and seq `until`.
    fn batch(&self, until: u64) -> Vec<Arc<LedgerRow>> {
        self.rows
            .lock()
            .iter()
            .take_while(|(_, r)| r.seq <= until)
            .take(self.batch_rows)
            .map(|(_, r)| r.clone())
            .collect()
    }
}

/// What ClickHouse holds of chain `chain_id`: its last `seq` and that row's hash.
pub async fn stored_head(
    client: &clickhouse::Client,
    table: &str,
    chain_id: &str,
) -> Result<Option<(u64, String)>, clickhouse::error::Error> {
    #[derive(clickhouse::Row, Deserialize)]
    struct Head {
        seq: u64,
        row_hash: String,
    }
    // A table that does not exist yet (an administrator has not run the setup)
    // holds nothing. `system.tables` lists what this user may see, without a grant.
    let exists: u64 = client
        .query("SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = ?")
        .bind(table)
        .fetch_one()
        .await?;
    if exists == 0 {
        return Ok(None);
    }
    let heads = client
        .query(&format!(
            "SELECT seq, {} FROM {table} WHERE chain_id = ? ORDER BY seq DESC LIMIT 1",
            gw_core::ledger::read_as_utf8("row_hash")
        ))
        .bind(chain_id)
        .fetch_all::<Head>()
        .await?;
    Ok(heads.into_iter().next().map(|h| (h.seq, h.row_hash)))
}

/// How many of the rows `first..=last` of `chain_id` ClickHouse holds.
pub async fn stored_in_range(
    client: &clickhouse::Client,
    table: &str,
    chain_id: &str,
    (first, last): (u64, u64),
) -> Result<u64, clickhouse::error::Error> {
    client
        .query(&format!(
            "SELECT uniqExact(seq) FROM {table} WHERE chain_id = ? AND seq BETWEEN ? AND ?"
        ))
        .bind(chain_id)
        .bind(first)
        .bind(last)
        .fetch_one()
        .await
}

/// The hashes ClickHouse holds for row `seq` of `chain_id` (several when rows
/// conflict there), hex.
async fn stored_hashes_at(
    client: &clickhouse::Client,
    table: &str,
    chain_id: &str,
    seq: u64,
) -> Result<Vec<String>, clickhouse::error::Error> {
    client
        .query(&format!(
            "SELECT DISTINCT {} FROM {table} WHERE chain_id = ? AND seq = ? LIMIT 16",
            gw_core::ledger::read_as_utf8("row_hash")
        ))
        .bind(chain_id)
        .bind(seq)
        .fetch_all::<String>()
        .await
}

/// How a chain was taken up without the journal's rows: after row `after`;
/// `checkpointed`, the rows this node's newest checkpoint of the chain vouches
/// for (0 without one: rows `checkpointed + 1..=after` were taken from
/// ClickHouse, not sealed under a checkpoint this node holds); `stored`,
/// ClickHouse's last row when that was not `after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resumed {
    /// The row the chain continues after.
    pub after: u64,
    /// The rows this node's newest checkpoint vouches for.
    pub checkpointed: u64,
    /// ClickHouse's last row, when the chain continues after the checkpoint
    /// instead (ClickHouse holds fewer rows than it vouches for).
    pub stored: Option<u64>,
}

/// The chain to continue at start: the journal's last row when it has one;
/// otherwise (a new node, or one whose journal was lost) what ClickHouse holds of
/// `chain_id`, waiting for ClickHouse if it must, held to `anchor`, this node's
/// newest signed checkpoint of the chain: ClickHouse's row at the checkpoint
/// must be the row it signed (else its rows were rewritten, and continuing
/// would sign them: refused), and a ClickHouse holding fewer rows than the
/// checkpoint (rows lost) is continued after the checkpoint, not after its own
/// last row (which would fork what was signed). `Ok((chain, resumed))`:
/// `resumed` says how the chain was taken up from ClickHouse.
pub async fn initial_chain(
    chain_id: &str,
    last_row: Option<&LedgerRow>,
    client: &clickhouse::Client,
    table: &str,
    anchor: Option<(u64, [u8; 32])>,
) -> Result<(Chain, Option<Resumed>), ChainError> {
    if let Some(r) = last_row {
        if r.chain_id != chain_id {
            return Err(ChainError::OtherChain {
                seq: r.seq,
                expected: chain_id.to_owned(),
                found: r.chain_id.clone(),
            });
        }
        return Ok((Chain::resume(chain_id, Some(r))?, None));
    }
    let mut logged = false;
    let head = loop {
        match stored_head(client, table, chain_id).await {
            Ok(h) => break h,
            // A table that does not exist yet holds nothing.
            Err(e) if e.to_string().contains("UNKNOWN_TABLE") => break None,
            Err(e) => {
                if !logged {
                    tracing::warn!(error = %e, "the journal holds no ledger rows: waiting for ClickHouse to learn where chain {chain_id} stands");
                    logged = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let stored = head.as_ref().map(|(seq, _)| *seq);
    if let Some((size, signed)) = anchor.filter(|(size, _)| *size > 0) {
        if stored.is_none_or(|seq| seq < size) {
            tracing::error!(
                chain = chain_id,
                checkpointed = size,
                clickhouse = stored.unwrap_or(0),
                "the journal holds no ledger rows and ClickHouse fewer than this node's checkpoint vouches for: the chain continues after the checkpoint (gwctl ledger verify reports the rows ClickHouse lost)"
            );
            return continued(chain_id, signed, size, size, Some(stored.unwrap_or(0)));
        }
        let held = loop {
            match stored_hashes_at(client, table, chain_id, size).await {
                Ok(h) => break h,
                Err(e) => {
                    tracing::warn!(error = %e, "waiting for ClickHouse to read the row this node's checkpoint signed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        // Every row ClickHouse holds there is the one signed (a second, other
        // row at that position could be the one its last row links back to).
        if held.is_empty() {
            return Err(ChainError::CheckpointedRowMissing(size));
        }
        if held.iter().any(|h| hex_hash(h) != signed) {
            return Err(ChainError::NotCheckpointed(size));
        }
        if stored == Some(size) {
            // Ends at the checkpoint: continued from the row it signed.
            return continued(chain_id, signed, size, size, None);
        }
    }
    let checkpointed = anchor.map_or(0, |(size, _)| size);
    match head {
        None => Ok((Chain::new(chain_id), None)),
        Some((seq, hash)) => {
            let head: [u8; 32] = hex::decode(&hash)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or(ChainError::BadHash(seq))?;
            tracing::warn!(
                chain = chain_id,
                after = seq,
                checkpointed,
                "the journal holds no ledger rows: the chain continues after ClickHouse's last row (those after this node's checkpoint taken as ClickHouse holds them)"
            );
            continued(chain_id, head, seq, checkpointed, None)
        }
    }
}

/// The chain `chain_id` continued after row `after`, whose hash is `head`, and
/// how it was taken up ([`Resumed`]).
fn continued(
    chain_id: &str,
    head: [u8; 32],
    after: u64,
    checkpointed: u64,
    stored: Option<u64>,
) -> Result<(Chain, Option<Resumed>), ChainError> {
    let next = after.checked_add(1).ok_or(ChainError::Full(after))?;
    let resumed = Resumed {
        after,
        checkpointed,
        stored,
    };
    Ok((Chain::at(chain_id, next, head), Some(resumed)))
}

/// Inserts `rows` into `table`; a retry of the same rows is deduplicated.
/// The token names the range and its last row's hash (which commits to every row
/// before it): the same rows again are one insert, other rows on the same
/// positions (another writer on the chain id) are not.
pub async fn insert(
    client: &clickhouse::Client,
    table: &str,
    rows: &[impl Borrow<LedgerRow>],
    nice: Option<u8>,
) -> Result<(), clickhouse::error::Error> {
    let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
        return Ok(());
    };
    let (first, last) = (first.borrow(), last.borrow());
    let token = format!(
        "gw-ledger-{}-{}-{}-{}",
        first.chain_id, first.seq, last.seq, last.row_hash
    );
    let mut client = insert_once(client, &token);
    if let Some(n) = nice {
        client = client.with_setting("os_thread_priority", n.to_string());
    }
    let mut ins = client.insert::<DecisionRowRef<'_>>(table).await?;
    for r in rows {
        ins.write(&DecisionRowRef::from(r.borrow())).await?;
    }
    ins.end().await
}

/// `client` for an insert that is acknowledged only once written — synchronous
/// (a profile that turns on `async_insert` would acknowledge before the disk, and
/// ignore the token) — and stored once when sent again under the same `token` (an
/// answer lost). Every insert of the ledger, the send audit and the checkpoints.
pub fn insert_once(client: &clickhouse::Client, token: &str) -> clickhouse::Client {
    client
        .clone()
        .with_setting("async_insert", "0")
        .with_setting("insert_deduplication_token", token)
}

/// Ships the queue to ClickHouse for as long as it runs.
pub struct Shipper {
    queue: std::sync::Arc<RowQueue>,
    journal: Journal,
    client: clickhouse::Client,
    table: String,
    chain_id: String,
    /// Last seq ClickHouse holds, once known; and its hash.
    shipped: Option<(u64, [u8; 32])>,
    /// The last seq ClickHouse acknowledged to this process: holding less later,
    /// it lost rows ([`Self::learn`] says so).
    acknowledged: u64,
    /// The newest row ClickHouse holds that is known to be this node's own (it
    /// inserted it, or its hash matched this node's row): the only head a
    /// checkpoint signs — a head read from ClickHouse and not matched could be
    /// anyone's.
    own: Option<(u64, [u8; 32])>,
    /// The least time between two inserts (while fewer than [`SHIP_NOW_ROWS`] wait).
    every: Duration,
    /// ClickHouse's `os_thread_priority` for the inserts.
    nice: Option<u8>,
    /// The intent of the insert being tried is in the journal (a recovered one is).
    intent_durable: bool,
    /// The journal's last row at start, when it had one: ClickHouse may not hold
    /// more of the chain than that ([`JournalBehind`]) when it is first asked
    /// (later it holds what this process shipped too).
    journal_head: Option<u64>,
    /// The insert begun earlier of which ClickHouse holds the last row but not
    /// every row ([`Self::learn`]): it goes again, whole, before anything else.
    partial: Option<(u64, u64)>,
}

/// Rows still to ship in memory that the ledger endpoints look through, newest
/// first (more than this means ClickHouse has been away; beyond
/// `audit_memory_rows`, memory holds the oldest unshipped rows, not the newest).
pub const PENDING_SCAN: usize = 65_536;

/// Rows [`RowQueue::newest_where`] takes under the queue's lock at a time.
pub const SCAN_CHUNK: usize = 4_096;

/// Rows that are shipped at once, however recent the last insert.
pub const SHIP_NOW_ROWS: usize = 1_000;

impl Shipper {
    /// A shipper of `queue` (chain `chain_id`) into `table`.
    pub fn new(
        queue: std::sync::Arc<RowQueue>,
        journal: Journal,
        client: clickhouse::Client,
        table: &str,
        chain_id: &str,
    ) -> Shipper {
        Shipper {
            queue,
            journal,
            client,
            table: table.to_owned(),
            chain_id: chain_id.to_owned(),
            shipped: None,
            acknowledged: 0,
            own: None,
            every: Duration::ZERO,
            nice: None,
            intent_durable: true,
            journal_head: None,
            partial: None,
        }
    }

    /// The journal's last row at start was `seq`, not yet compared with
    /// ClickHouse's: the first [`Self::learn`] that hears from ClickHouse refuses
    /// to ship when it holds more of the chain ([`JournalBehind`]) — rows sealed
    /// since would take positions ClickHouse has, and be dropped as shipped.
    pub fn with_journal_head(mut self, seq: Option<u64>) -> Shipper {
        self.journal_head = seq;
        self
    }

    /// Inserts at most once per `every` while fewer than [`SHIP_NOW_ROWS`] rows
    /// wait: every insert is a part ClickHouse writes and later merges, so many
    /// small ones cost it more than the rows themselves. The rows wait in the
    /// journal meanwhile (durable already); only their arrival in ClickHouse waits.
    pub fn with_every(mut self, every: Duration) -> Shipper {
        self.every = every;
        self
    }

    /// Inserts at OS priority `nice` on ClickHouse (its `os_thread_priority`; 0:
    /// not set). A server that refuses the setting gets the inserts without it.
    pub fn with_nice(mut self, nice: u8) -> Shipper {
        self.nice = (nice > 0).then_some(nice);
        self
    }

    /// Asks ClickHouse what it holds and drops that from the queue (the first
    /// [`Self::ship_once`] does it when not done).
    pub async fn learn(&mut self) -> Result<(), ShipError> {
        let head = stored_head(&self.client, &self.table, &self.chain_id).await?;
        let (seq, hash) = match head {
            Some((seq, h)) => (
                seq,
                hex::decode(&h)
                    .ok()
                    .and_then(|v| v.try_into().ok())
                    .ok_or(ChainError::BadHash(seq))?,
            ),
            None => (0, [0; 32]),
        };
        // Only the first time: later, ClickHouse holds what this process shipped.
        if let Some(journal) = self.journal_head {
            JournalBehind::check(&self.chain_id, journal, seq)?;
        }
        self.journal_head = None;
        // Every row ClickHouse holds of this chain was shipped by this node (the
        // newest it sealed is read after ClickHouse answered).
        let (sealed, sealed_hash) = {
            let head = self.queue.head.lock();
            (head.0, hex_hash(&head.1))
        };
        if seq > sealed {
            return Err(ShipError::ForeignRows {
                chain: self.chain_id.clone(),
                seq,
                sealed,
            });
        }
        if seq < self.acknowledged {
            // Gone from ClickHouse after it acknowledged them (a restore, a replica
            // behind, a power cut on a table without fsync_after_insert), and
            // from this node's queue since: not shipped again. The gap stays in
            // the chain for `gwctl ledger verify` to report.
            self.queue.lost.inc_by(self.acknowledged - seq);
            tracing::error!(
                chain = %self.chain_id,
                from = seq + 1,
                to = self.acknowledged,
                "ClickHouse lost ledger rows it had acknowledged; they are not shipped again (gwctl ledger verify reports the gap)"
            );
        }
        // ClickHouse's head from now on: asked again (an insert failing
        // meanwhile), the same head is no new loss.
        self.acknowledged = seq;
        // A row ClickHouse holds that is still queued here must be the same row,
        // and the next one queued must link to it: otherwise another writer used
        // this chain id, or ClickHouse's rows were rewritten (nothing is dropped
        // then, and no checkpoint signs them).
        let vouched = if seq == 0 {
            false
        } else if let Some(r) = self.queued(seq).await? {
            if hex_hash(&r.row_hash) != hash {
                return Err(ChainError::Conflict(seq).into());
            }
            true
        } else if let Some(next) = self.queued(seq + 1).await? {
            if hex_hash(&next.prev_hash) != hash {
                return Err(ChainError::Conflict(seq).into());
            }
            true
        } else if seq == sealed {
            if sealed_hash != hash {
                return Err(ChainError::Conflict(seq).into());
            }
            true
        } else {
            // Shipped and gone from here (ClickHouse lost rows after it): not
            // this node's to vouch for.
            false
        };
        let own_before = self.own;
        if vouched && self.own.is_none_or(|(s, _)| s < seq) {
            self.own = Some((seq, hash));
        }
        // An insert that spans two months is one part per month in ClickHouse
        // (the table's partitions), each atomic on its own: ClickHouse may hold the
        // insert's last row and not every row before it. A head inside the range
        // of the insert begun last (or at its end) is believed only when every row
        // of the range is there; otherwise the insert goes again, whole (the same
        // token: the part that landed is not stored twice).
        self.partial = None;
        let mut held = seq;
        if let Some((first, last)) = self
            .queue
            .intent()
            .filter(|&(first, last)| first >= 1 && first <= seq && seq <= last)
        {
            let n =
                stored_in_range(&self.client, &self.table, &self.chain_id, (first, last)).await?;
            if n < last - first + 1 {
                tracing::warn!(
                    chain = %self.chain_id, first, last, stored = n,
                    "ClickHouse holds part of the last ledger insert: it goes again"
                );
                held = first - 1;
                self.partial = Some((first, last));
            }
        }
        // An insert begun earlier (maybe by a process since killed) that ClickHouse
        // does not hold yet may still land: its rows are shipped again as that same
        // insert (same range, same deduplication token) before any other. Its rows
        // must be in memory, whole: when some wait on disk only, memory is read
        // back from its first row on.
        if let Some((first, last)) = self
            .queue
            .intent()
            .filter(|&(first, last)| first >= 1 && first - 1 <= held && held < last)
        {
            self.queue.drop_through(first - 1);
            if !self.queue.holds(first, last) {
                self.queue.rows.lock().unread();
                let rows = usize::try_from(last - first + 1).unwrap_or(usize::MAX);
                self.read_back(rows).await?;
            }
        }
        // Rows no longer here (shipped whole before, ClickHouse lost some since):
        // not this node's to send again; the gap shows in `gwctl ledger verify`.
        if self
            .partial
            .is_some_and(|(first, last)| !self.queue.holds(first, last))
        {
            self.partial = None;
            held = seq;
        }
        // A checkpoint signs no head whose rows before it ClickHouse lacks. (Rows
        // of such a range still in the journal are shipped again even when the
        // insert was acknowledged and ClickHouse lost them since: the same token,
        // so nothing is stored twice.)
        if self.partial.is_some() {
            self.own = own_before;
        }
        match self.redo(held) {
            Some((first, _)) => self.queue.drop_through(first - 1),
            None => self.queue.drop_through(seq),
        }
        self.shipped = Some((seq, hash));
        Ok(())
    }

    /// Ships what is queued, in batches: `Ok(rows shipped)`. Rows queued while it
    /// ships wait for the next call (under load the inserts would otherwise shrink
    /// to the few rows that arrive during one).
    pub async fn ship_once(&mut self) -> Result<usize, ShipError> {
        if self.shipped.is_none() {
            self.learn().await?;
        }
        let mut n = 0;
        let Some(until) = self.queue.newest_seq() else {
            return Ok(0);
        };
        loop {
            self.read_back(1).await?;
            let stored = match self.partial {
                Some((first, _)) => first - 1,
                None => self.shipped.map_or(0, |(seq, _)| seq),
            };
            let batch = match self.redo(stored) {
                Some((first, last)) => self.queue.range(first, last),
                None => self.queue.batch(until),
            };
            let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
                return Ok(n);
            };
            if self.queue.intent() != Some((first.seq, last.seq)) || !self.intent_durable {
                self.begin(first.seq, last.seq).await;
            }
            if let Err(e) = insert(&self.client, &self.table, &batch, self.nice).await {
                // ClickHouse 26 names the setting os_threads_nice_value_query (its
                // old name os_thread_priority stays an alias).
                if self.nice.is_some() && e.to_string().contains("os_thread") {
                    tracing::warn!(error = %e, "ClickHouse refuses os_thread_priority: ledger inserts go on without it (clickhouse_nice 0 says so)");
                    self.nice = None;
                }
                // The insert may have landed: ask again before the next try.
                self.shipped = None;
                return Err(e.into());
            }
            let (seq, head) = (last.seq, hex_hash(&last.row_hash));
            self.partial = None;
            self.queue.drop_through(seq);
            self.shipped = Some((seq, head));
            self.own = Some((seq, head));
            self.acknowledged = self.acknowledged.max(seq);
            n += batch.len();
        }
    }

    /// When the rows in memory are shipped and more wait on disk only: reads the
    /// next ones back (on a blocking thread).
    async fn read_back(&self, at_least: usize) -> Result<(), ShipError> {
        if !self.queue.rows.lock().must_read_back() {
            return Ok(());
        }
        self.off_runtime(move |q, j| q.read_back(j, at_least))
            .await?;
        Ok(())
    }

    /// Runs `f` (reading the journal's files) on a blocking thread.
    async fn off_runtime<T: Send + 'static>(
        &self,
        f: impl FnOnce(&RowQueue, &Journal) -> Result<T, journal::JournalError> + Send + 'static,
    ) -> Result<T, ShipError> {
        let (queue, journal) = (self.queue.clone(), self.journal.clone());
        let r = tokio::task::spawn_blocking(move || f(&queue, &journal))
            .await
            .map_err(|e| journal::JournalError::Io {
                path: PathBuf::from("journal"),
                detail: format!("reading ledger rows back: {e}"),
            })?;
        Ok(r?)
    }

    /// The insert begun and not known to be in ClickHouse, which holds the chain
    /// up to `stored`: it is the next one, whatever else is queued. An intent
    /// whose rows are no longer all queued was shipped (ClickHouse has since lost
    /// rows: a restore, a replica behind), and one that does not follow `stored`
    /// is older than such a loss: both are moot, and shipping goes on from the
    /// queue (the gap shows in `gwctl ledger verify`).
    fn redo(&self, stored: u64) -> Option<(u64, u64)> {
        self.queue.intent().filter(|&(first, last)| {
            first >= 1 && first - 1 <= stored && stored < last && self.queue.holds(first, last)
        })
    }

    /// Records that the insert of `first..=last` begins, durably before it does
    /// (see [`Self::redo`]). A journal that cannot write does not stop shipping:
    /// shipping is what lets it drop segments. This run still retries the same
    /// range; only a crash before ClickHouse answers could then store rows twice.
    async fn begin(&mut self, first: u64, last: u64) {
        *self.queue.intent.lock() = Some((first, last));
        let txn = Txn::of(vec![journal::Entry::Shipping { first, last }]);
        match self.journal.commit(txn).await {
            Ok(_) => self.intent_durable = true,
            Err(e) => {
                // Tried again before each retry of this insert.
                self.intent_durable = false;
                tracing::warn!(first, last, error = %e, "the ledger insert's range is not in the journal: shipping it anyway");
            }
        }
    }

    /// What ClickHouse holds, once known: last seq and its hash.
    pub fn shipped(&self) -> Option<(u64, [u8; 32])> {
        self.shipped
    }

    /// The newest row ClickHouse holds that is known to be this node's: what a
    /// checkpoint signs.
    pub fn own_head(&self) -> Option<(u64, [u8; 32])> {
        self.own
    }

    /// Row `seq` among the rows still to ship, in memory or on disk only.
    async fn queued(&self, seq: u64) -> Result<Option<LedgerRow>, ShipError> {
        match self.queue.find(seq) {
            Some(r) => Ok(Some(r)),
            None if self.queue.rows.lock().first_on_disk().is_some() => {
                self.off_runtime(move |q, j| q.find_on_disk(j, seq)).await
            }
            None => Ok(None),
        }
    }

    /// Ships forever: after each wake-up (new rows, at most once per `every` unless
    /// [`SHIP_NOW_ROWS`] wait — then at once, even mid-wait — or a retry every
    /// 500 ms while ClickHouse is away);
    /// checkpoints as they fall due.
    pub async fn run(mut self, mut checkpointer: Option<Checkpointer>) {
        let mut last_err = String::new();
        let mut last_cp_err = String::new();
        let mut last_cp_ship_err = String::new();
        let queue = self.queue.clone();
        let mut last_insert: Option<tokio::time::Instant> = None;
        loop {
            if let Some(due) = last_insert.map(|t| t + self.every) {
                // Until the insert is due, or SHIP_NOW_ROWS rows wait.
                let sleep = tokio::time::sleep_until(due);
                tokio::pin!(sleep);
                while queue.len() < SHIP_NOW_ROWS {
                    tokio::select! {
                        () = &mut sleep => break,
                        () = queue.grew.notified() => {}
                    }
                }
            }
            let woke = queue.grew.notified();
            match self.ship_once().await {
                Ok(n) => {
                    if n > 0 {
                        last_insert = Some(tokio::time::Instant::now());
                    }
                    if !last_err.is_empty() {
                        queue.set_shipping(None);
                    }
                    last_err.clear();
                }
                Err(e) => {
                    // Nothing ships until an operator acts: said loudly.
                    let behind = matches!(e, ShipError::Behind(_) | ShipError::ForeignRows { .. });
                    let e = e.to_string();
                    if e != last_err {
                        queue.set_shipping(Some(Stalled {
                            detail: e.clone(),
                            refusing: false,
                            needs_operator: behind,
                        }));
                        if behind {
                            tracing::error!(error = %e, rows = self.queue.len(), "ledger rows kept in the journal");
                        } else {
                            tracing::warn!(error = %e, rows = self.queue.len(), "ledger rows kept in the journal");
                        }
                        last_err = e;
                    }
                }
            }
            if let Some((seq, head)) = self.own {
                let due = checkpointer
                    .as_ref()
                    .is_some_and(|c| c.due(&self.chain_id, seq));
                if let Some(mut c) = checkpointer.take_if(|_| due) {
                    // The append and its fsync run off the async workers.
                    let (chain, path) = (self.chain_id.clone(), c.path().to_owned());
                    let written = tokio::task::spawn_blocking(move || {
                        let r = c.tick(&chain, seq, head);
                        (c, r)
                    })
                    .await;
                    match written {
                        Ok((c, r)) => {
                            checkpointer = Some(c);
                            match r {
                                Ok(true) => {
                                    tracing::debug!(seq, "ledger checkpoint written");
                                    last_cp_err.clear();
                                }
                                Ok(false) => {}
                                Err(e) => {
                                    let e = e.to_string();
                                    if e != last_cp_err {
                                        tracing::error!(path = %path.display(), error = %e, "ledger checkpoint not written");
                                        last_cp_err = e;
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            tracing::error!(path = %path.display(), error = %e, "ledger checkpoints stopped: their writer failed");
                        }
                    }
                }
                if let Some(c) = checkpointer.as_mut() {
                    match c.ship(&self.client).await {
                        Ok(()) => last_cp_ship_err.clear(),
                        Err(e) => {
                            let e = e.to_string();
                            if e != last_cp_ship_err {
                                tracing::warn!(error = %e, "ledger checkpoints not in ClickHouse yet (kept in the file, sent again)");
                                last_cp_ship_err = e;
                            }
                        }
                    }
                }
            }
            if last_err.is_empty() {
                // Idle until rows come, but wake for due checkpoints.
                let _ = tokio::time::timeout(Duration::from_secs(1), woke).await;
            } else {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

fn hex_hash(h: &str) -> [u8; 32] {
    hex::decode(h)
        .ok()
        .and_then(|v| v.try_into().ok())
        .unwrap_or([0; 32])
}

/// The ledger before the journal: `ledger.spool.jsonl` (sealed rows, one per line)
/// and `ledger.shipped` (the last seq ClickHouse acknowledged). At the first start
/// with the journal, its unshipped rows are shipped (ClickHouse must answer), then
/// the files are renamed `*.migrated`; the chain continues from its last row.
/// `Ok(None)` when there is no such spool.
pub async fn migrate_legacy_spool(
    dir: &Path,
    client: &clickhouse::Client,
    table: &str,
) -> Result<Option<LedgerRow>, ShipError> {
    let spool = dir.join("ledger.spool.jsonl");
    let text = match std::fs::read_to_string(&spool) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ShipError::Legacy {
                path: spool,
                detail: e.to_string(),
            })
        }
    };
    let shipped: u64 = std::fs::read_to_string(dir.join("ledger.shipped"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let mut rows: Vec<LedgerRow> = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<LedgerRow>(line) {
            Ok(r) => rows.push(r),
            // A torn last line was never acknowledged.
            Err(_) if i + 1 == lines.len() => break,
            Err(e) => {
                return Err(ShipError::Legacy {
                    path: spool,
                    detail: format!("line {}: {e}", i + 1),
                })
            }
        }
    }
    let pending: Vec<LedgerRow> = rows.iter().filter(|r| r.seq > shipped).cloned().collect();
    for chunk in pending.chunks(MAX_BATCH_ROWS) {
        insert(client, table, chunk, None).await?;
    }
    for name in ["ledger.spool.jsonl", "ledger.shipped"] {
        let from = dir.join(name);
        if from.exists() {
            let _ = std::fs::rename(&from, dir.join(format!("{name}.migrated")));
        }
    }
    tracing::info!(
        rows = pending.len(),
        "the pre-journal ledger spool was shipped and retired"
    );
    Ok(rows.pop())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Weigh;

    /// A walk selects `gw_core::ledger::COLUMNS` in order: the row type decodes
    /// them by position.
    #[test]
    fn the_row_type_holds_the_walks_columns_in_order() {
        assert_eq!(
            <DecisionRow as clickhouse::Row>::COLUMN_NAMES,
            gw_core::ledger::COLUMNS
        );
    }

    /// A queue holding rows `1..=n`, one record each.
    fn queue_of(n: u64) -> RowQueue {
        let q = RowQueue::new(Gauge::default(), usize::MAX);
        for seq in 1..=n {
            q.committed(seq, &Txn::of(vec![row(seq)]));
        }
        q
    }

    fn row(seq: u64) -> journal::Entry {
        let mut r = testkit::fixtures::ledger_row(seq);
        r.seq = seq;
        journal::Entry::row(r)
    }

    /// Rows holding 64 KiB of hex each (what the edge keeps of a refused body)
    /// while ClickHouse is away: memory takes them up to the byte bound and one
    /// row past it, the rest wait on disk only; a read back takes the same bound,
    /// or more when more rows are needed whole (an insert's range); and every
    /// row is there, in order.
    #[test]
    fn rows_waiting_are_bounded_in_bytes_in_memory_and_when_read_back() {
        let d = testkit::TempDir::new("ship-bytes");
        let bound = 1 << 20;
        let q = Arc::new(RowQueue::bounded(Gauge::default(), 100_000, bound));
        let opened = Journal::open(d.path(), journal::Options::default()).unwrap();
        let journal = opened
            .start(Some(Chain::new("node-1")), vec![q.clone() as Arc<dyn Sink>])
            .unwrap();
        journal.hold(journal::STARTUP_HOLD, Lsn::MAX);
        let big = |i: u64| {
            let mut r = testkit::fixtures::ledger_row(i);
            r.raw_hex = "ab".repeat(32 << 10);
            r
        };
        for i in 1..=200 {
            journal
                .commit_blocking(Txn::of(vec![journal::Entry::row(big(i))]))
                .unwrap();
        }
        // A sealed row's size (their request ids differ by a few bytes).
        let one = q.find(10).map_or(0, |r| r.bytes());
        assert!(one > 64 << 10, "{one}");
        let in_memory = |q: &RowQueue| q.rows.lock().in_memory() as u64;
        let (held, n) = (q.bytes_in_memory(), in_memory(&q));
        assert!(held >= bound && held < bound + one + 64, "{held} bytes");
        assert_eq!(n, (bound / one + 1) as u64);
        assert_eq!((q.len(), q.on_disk()), (200, 200 - n));

        // Shipped: memory reads the next ones back, to the same bound.
        q.drop_through(n);
        assert_eq!(q.read_back(&journal, 1).unwrap() as u64, n);
        assert!(q.bytes_in_memory() < bound + one + 64);
        assert_eq!(q.find(n + 1).map(|r| r.seq), Some(n + 1));
        // Thirty rows needed whole: all thirty, however many bytes.
        q.drop_through(2 * n);
        assert_eq!(q.read_back(&journal, 30).unwrap(), 30);
        assert!(q.bytes_in_memory() > 29 * one, "{}", q.bytes_in_memory());
        // The rest, in order, to the last.
        let mut next = 2 * n + 1;
        while next <= 200 {
            let front = q.rows.lock().front().map(|(_, r)| r.seq);
            assert_eq!(front, Some(next));
            next += in_memory(&q);
            q.drop_through(next - 1);
            q.read_back(&journal, 1).unwrap();
        }
        assert_eq!((q.len(), q.bytes_in_memory()), (0, 0));
    }

    /// The ledger endpoints' scan of the rows still to ship: newest first, within
    /// its bound, across the chunks it takes under the queue's lock — and `keep`
    /// runs outside the lock (here it ships rows and queues more meanwhile, as
    /// the shipper and the journal's writer do: a `keep` under the lock would
    /// deadlock). Rows shipped meanwhile end the scan; rows queued meanwhile are
    /// not among it.
    #[test]
    fn the_pending_scan_goes_newest_first_by_chunks_outside_the_lock() {
        let n = (PENDING_SCAN + 3 * SCAN_CHUNK + 7) as u64;
        let q = queue_of(n);
        let seqs = |q: &RowQueue, limit: usize, keep: &dyn Fn(&LedgerRow) -> bool| {
            q.newest_where(limit, keep, |r| r.seq)
        };
        let all = seqs(&q, usize::MAX, &|_| true);
        let bound = PENDING_SCAN as u64;
        assert_eq!(all, (n - bound + 1..=n).rev().collect::<Vec<_>>());
        // Every third row, across several chunks, cut at the limit.
        let third = seqs(&q, 5_000, &|r| r.seq % 3 == 0);
        let want: Vec<u64> = (1..=n).rev().filter(|s| s % 3 == 0).take(5_000).collect();
        assert_eq!(third, want);
        assert!(n - third[4_999] > 2 * SCAN_CHUNK as u64);
        assert_eq!(seqs(&q, 0, &|_| true), Vec::<u64>::new());

        // While the first chunk is kept, rows are shipped up to 50 below it, and
        // more are queued.
        let first_chunk_end = n - SCAN_CHUNK as u64 + 1;
        let shipped_to = first_chunk_end - 51;
        let busy = seqs(&q, usize::MAX, &|r| {
            if r.seq == n {
                q.drop_through(shipped_to);
                q.committed(n + 1, &Txn::of(vec![row(n + 1)]));
            }
            true
        });
        assert_eq!(busy, (shipped_to + 1..=n).rev().collect::<Vec<_>>());
        // Shipped through the newest: nothing is pending.
        q.drop_through(n + 1);
        assert!(seqs(&q, usize::MAX, &|_| true).is_empty());
    }
}
