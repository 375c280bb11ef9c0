//! Signed checkpoints of this node's chain ([`gw_core::checkpoint`]), written every
//! `every_rows` rows or `every_secs` seconds (when rows were added): appended to a
//! local file (fsync) and inserted into ClickHouse `control_checkpoints`, so a chain
//! cut or rewritten in ClickHouse is caught by `gwctl ledger verify --checkpoint`.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use gw_core::checkpoint::{notes, Checkpoint};
use serde::{Deserialize, Serialize};

/// The key name checkpoints are signed under.
pub const KEY_NAME: &str = "gw-ledger";
/// The ClickHouse table of checkpoints.
pub const TABLE: &str = "control_checkpoints";

/// A row of `control_checkpoints`.
#[derive(Debug, Clone, clickhouse::Row, Serialize, Deserialize)]
pub struct CheckpointRow {
    /// The chain.
    pub chain_id: String,
    /// Rows in the chain.
    pub size: u64,
    /// The head hash, hex.
    pub head: String,
    /// The signed note.
    pub note: String,
    /// When, unix milliseconds.
    pub ts_ms: u64,
}

/// When and how checkpoints are written.
pub struct Checkpointer {
    key: SigningKey,
    path: PathBuf,
    every_rows: u64,
    every: Duration,
    last_size: u64,
    last_at: Instant,
    /// Written to the file, not yet to ClickHouse.
    unsent: Vec<CheckpointRow>,
}

impl Checkpointer {
    /// Checkpoints signed with `key`, appended to `dir/checkpoints.log`.
    /// Continues after the newest checkpoint already in the file.
    pub fn new(key: SigningKey, dir: &Path, every_rows: u64, every: Duration) -> Checkpointer {
        let path = dir.join("checkpoints.log");
        let vk = key.verifying_key();
        let last_size = std::fs::read_to_string(&path).map_or(0, |text| {
            notes(&text)
                .iter()
                .filter_map(|n| Checkpoint::open(n, KEY_NAME, &vk).ok())
                .map(|c| c.size)
                .max()
                .unwrap_or(0)
        });
        Checkpointer {
            key,
            path,
            every_rows: every_rows.max(1),
            every,
            last_size,
            last_at: Instant::now(),
            unsent: Vec::new(),
        }
    }

    /// The checkpoint file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a checkpoint of chain `chain_id` (`size` rows, head `head`) when one
    /// is due; `Ok(true)` when written.
    pub fn tick(&mut self, chain_id: &str, size: u64, head: [u8; 32]) -> std::io::Result<bool> {
        let grown = size.saturating_sub(self.last_size);
        let due = grown >= self.every_rows || (grown > 0 && self.last_at.elapsed() >= self.every);
        if !due {
            return Ok(false);
        }
        let note = Checkpoint::for_chain(chain_id, size, head).sign(KEY_NAME, &self.key);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        f.write_all(note.as_bytes())?;
        f.sync_data()?;
        self.last_size = size;
        self.last_at = Instant::now();
        self.unsent.push(CheckpointRow {
            chain_id: chain_id.to_owned(),
            size,
            head: hex::encode(head),
            note,
            ts_ms: crate::now_nanos() / 1_000_000,
        });
        Ok(true)
    }

    /// Inserts the checkpoints not yet in ClickHouse (kept for the next try on error).
    pub async fn ship(
        &mut self,
        client: &clickhouse::Client,
    ) -> Result<(), clickhouse::error::Error> {
        if self.unsent.is_empty() {
            return Ok(());
        }
        let mut insert = client.insert::<CheckpointRow>(TABLE).await?;
        for r in &self.unsent {
            insert.write(r).await?;
        }
        insert.end().await?;
        self.unsent.clear();
        Ok(())
    }
}
