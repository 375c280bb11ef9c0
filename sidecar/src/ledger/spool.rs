//! The ledger's write path: every decision row is sealed into the hash chain and
//! appended to a local spool (fsync) *before* anything else, then shipped to
//! ClickHouse in order. While ClickHouse is away rows wait in the spool; a retried
//! batch carries an `insert_deduplication_token`, so nothing is lost and nothing is
//! stored twice.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use gw_core::ledger::{Chain, LedgerRow};
use serde::{Deserialize, Serialize};

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

/// Why the ledger cannot proceed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Spool I/O.
    #[error("ledger spool {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A spool line (not the last) does not parse: refuse rather than lose rows.
    #[error("ledger spool {path} line {line} is corrupt")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
    },
    /// The chain in the spool is broken.
    #[error("ledger spool chain: {0}")]
    Chain(#[from] gw_core::ledger::ChainError),
    /// ClickHouse refused or is unreachable (rows stay in the spool).
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LedgerError + '_ {
    move |source| LedgerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The most rows one insert carries.
pub const MAX_BATCH_ROWS: usize = 10_000;

/// A run of pending rows ready to ship.
#[derive(Debug, Clone)]
pub struct Batch {
    rows: Vec<DecisionRow>,
    token: String,
    /// The last `seq` in the batch.
    pub last_seq: u64,
}

impl Batch {
    /// The rows (in `seq` order).
    pub fn rows(&self) -> &[DecisionRow] {
        &self.rows
    }

    /// Inserts the rows into `table`; a retry of the same batch is deduplicated.
    pub async fn ship(&self, client: &clickhouse::Client, table: &str) -> Result<(), LedgerError> {
        let client = client
            .clone()
            .with_setting("insert_deduplication_token", self.token.clone());
        let mut insert = client.insert::<DecisionRow>(table).await?;
        for r in &self.rows {
            insert.write(r).await?;
        }
        insert.end().await?;
        Ok(())
    }
}

/// The hash of row `seq` in `rows` (zero when absent).
fn hash_of(rows: &[LedgerRow], seq: u64) -> [u8; 32] {
    rows.iter()
        .find(|r| r.seq == seq)
        .and_then(|r| hex::decode(&r.row_hash).ok())
        .and_then(|v| v.try_into().ok())
        .unwrap_or([0; 32])
}

/// Sealed rows on disk, and the highest `seq` ClickHouse has acknowledged.
pub struct Spool {
    spool_path: PathBuf,
    shipped_path: PathBuf,
    spool: File,
    pending: Vec<LedgerRow>,
    shipped: u64,
    /// The hash of row `shipped` (zero before the first).
    shipped_head: [u8; 32],
    chain: Chain,
    client: clickhouse::Client,
    table: String,
}

impl Spool {
    /// Opens (or creates) the spool of chain `chain_id` in `dir`; rows go to `table`
    /// through `client`.
    pub fn open(
        dir: &Path,
        client: clickhouse::Client,
        table: &str,
        chain_id: &str,
    ) -> Result<Spool, LedgerError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let spool_path = dir.join("ledger.spool.jsonl");
        let shipped_path = dir.join("ledger.shipped");
        let shipped = match fs::read_to_string(&shipped_path) {
            Ok(s) => s.trim().parse().map_err(|_| LedgerError::Corrupt {
                path: shipped_path.clone(),
                line: 1,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io(&shipped_path)(e)),
        };
        let mut rows: Vec<LedgerRow> = Vec::new();
        let mut good_len = 0u64;
        if let Ok(f) = File::open(&spool_path) {
            let lines: Vec<String> = BufReader::new(f)
                .lines()
                .collect::<Result<_, _>>()
                .map_err(io(&spool_path))?;
            let n = lines.len();
            for (i, line) in lines.iter().enumerate() {
                match serde_json::from_str::<LedgerRow>(line) {
                    Ok(r) => {
                        rows.push(r);
                        good_len += line.len() as u64 + 1;
                    }
                    // A torn last line is a crash mid-append: that row was never acknowledged.
                    Err(_) if i + 1 == n => break,
                    Err(_) => {
                        return Err(LedgerError::Corrupt {
                            path: spool_path.clone(),
                            line: i + 1,
                        })
                    }
                }
            }
        }
        let spool = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spool_path)
            .map_err(io(&spool_path))?;
        spool.set_len(good_len).map_err(io(&spool_path))?;
        let chain = Chain::resume(chain_id, rows.last())?;
        let shipped_head = hash_of(&rows, shipped);
        let pending = rows.into_iter().filter(|r| r.seq > shipped).collect();
        Ok(Spool {
            spool_path,
            shipped_path,
            spool,
            pending,
            shipped,
            shipped_head,
            chain,
            client,
            table: table.to_owned(),
        })
    }

    /// Seals `row` into the chain and makes it durable in the spool.
    pub fn append(&mut self, row: LedgerRow) -> Result<LedgerRow, LedgerError> {
        let sealed = self.chain.clone().seal(row);
        let mut line = serde_json::to_vec(&sealed).map_err(|e| LedgerError::Io {
            path: self.spool_path.clone(),
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        self.spool.write_all(&line).map_err(io(&self.spool_path))?;
        self.spool.sync_data().map_err(io(&self.spool_path))?;
        // Only a durable row advances the chain.
        self.chain = Chain::resume(self.chain.id(), Some(&sealed))?;
        self.pending.push(sealed.clone());
        Ok(sealed)
    }

    /// Rows not yet acknowledged by ClickHouse.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The oldest pending rows as one batch: rows and the dedup token of exactly this
    /// range.
    /// At most [`MAX_BATCH_ROWS`] rows, so a long outage drains in bounded inserts.
    pub fn batch(&self) -> Option<Batch> {
        let rows = &self.pending[..self.pending.len().min(MAX_BATCH_ROWS)];
        let (first, last) = (rows.first()?, rows.last()?);
        Some(Batch {
            rows: rows.iter().map(DecisionRow::from).collect(),
            token: format!("gw-ledger-{}-{}-{}", first.chain_id, first.seq, last.seq),
            last_seq: last.seq,
        })
    }

    /// Records that ClickHouse holds every row up to `last_seq`.
    pub fn mark_shipped(&mut self, last_seq: u64) -> Result<usize, LedgerError> {
        let before = self.pending.len();
        if last_seq > self.shipped {
            self.shipped_head = hash_of(&self.pending, last_seq);
        }
        self.pending.retain(|r| r.seq > last_seq);
        self.shipped = self.shipped.max(last_seq);
        let tmp = self.shipped_path.with_extension("tmp");
        fs::write(&tmp, format!("{}\n", self.shipped)).map_err(io(&tmp))?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io(&tmp))?;
        fs::rename(&tmp, &self.shipped_path).map_err(io(&self.shipped_path))?;
        Ok(before - self.pending.len())
    }

    /// Ships every pending row, in order, in batches. On error the unshipped rows stay.
    pub async fn flush(&mut self) -> Result<usize, LedgerError> {
        let mut shipped = 0;
        while let Some(batch) = self.batch() {
            batch.ship(&self.client, &self.table).await?;
            shipped += self.mark_shipped(batch.last_seq)?;
        }
        Ok(shipped)
    }

    /// The ClickHouse client the ledger ships with (for read queries).
    pub fn client(&self) -> &clickhouse::Client {
        &self.client
    }

    /// The ClickHouse table of the decisions.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The chain's id, the rows ClickHouse acknowledged and the last one's hash:
    /// what a checkpoint may vouch for.
    pub fn shipped_head(&self) -> (String, u64, [u8; 32]) {
        (self.chain.id().to_owned(), self.shipped, self.shipped_head)
    }

    /// The highest `seq` ClickHouse acknowledged.
    pub fn shipped(&self) -> u64 {
        self.shipped
    }
}
