//! Signed checkpoints of this node's chain ([`gw_core::checkpoint`]), written every
//! `every_rows` rows or `every_secs` seconds (when rows were added): appended to a
//! local file (fsync) and inserted into ClickHouse `control_checkpoints`, so a chain
//! cut or rewritten in ClickHouse is caught by `gwctl ledger verify --checkpoint`
//! and by `/api/ledger/verify` ([`Anchors`]).

use std::collections::{BTreeMap, VecDeque};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use gw_core::checkpoint::{open_all, whole_len, Checkpoint};
use serde::{Deserialize, Serialize};

/// The key name checkpoints are signed under.
pub const KEY_NAME: &str = "gw-ledger";
/// The ClickHouse table of checkpoints.
pub const TABLE: &str = "control_checkpoints";

/// The newest checkpoint of each chain this node signed with its key (read from
/// its file at start, then as it writes them), by chain id: what
/// `/api/ledger/verify` holds the chains stored in ClickHouse to. The file is on
/// this node's disk, so rows cut from ClickHouse, or rewritten there with every
/// hash after them made again, do not match it.
pub type Anchors = Arc<parking_lot::Mutex<BTreeMap<String, Checkpoint>>>;

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
    last_at: Instant,
    /// Bytes of whole notes in the file: where the next one goes (`None` until
    /// the file could be read).
    whole: Option<u64>,
    /// Whether this process made the file's directory entry durable.
    entry_synced: bool,
    /// Written to the file, not yet to ClickHouse: the newest [`MAX_UNSENT`] (the
    /// file keeps every one; ClickHouse's copy is for reading them).
    unsent: VecDeque<CheckpointRow>,
    /// Old ones were dropped from `unsent` since ClickHouse last took them (said
    /// once).
    dropping: bool,
    /// The newest of each chain.
    anchors: Anchors,
}

/// Checkpoints kept for ClickHouse while it is away (a week's at one a minute,
/// fewer hours when rows come fast: one per `checkpoint_every_rows`).
const MAX_UNSENT: usize = 10_080;

impl Checkpointer {
    /// Checkpoints signed with `key`, appended to `dir/checkpoints.log`.
    /// Continues after the newest checkpoint already in the file, and cuts off a
    /// checkpoint whose append was cut short (`whole_notes`).
    pub fn new(key: SigningKey, dir: &Path, every_rows: u64, every: Duration) -> Checkpointer {
        let path = dir.join("checkpoints.log");
        let vk = key.verifying_key();
        let file = OpenOptions::new().read(true).write(true).open(&path);
        let (kept, whole) = match file.and_then(|f| whole_notes(&f, &path)) {
            Ok((kept, whole)) => (kept, Some(whole)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), Some(0)),
            Err(e) => {
                // Nothing is written until the file is read (at the next
                // checkpoint).
                tracing::error!(path = %path.display(), error = %e, "ledger checkpoint: the file cannot be read, or a checkpoint cut short in it cannot be cut off");
                (Vec::new(), None)
            }
        };
        let mut bad = 0;
        let mut anchors = BTreeMap::<String, Checkpoint>::new();
        for r in open_all(&String::from_utf8_lossy(&kept), KEY_NAME, &vk) {
            match r {
                Ok(c) => {
                    if let Some(id) = c.chain_id() {
                        if anchors.get(id).is_none_or(|a| a.size < c.size) {
                            anchors.insert(id.to_owned(), c.clone());
                        }
                    }
                }
                Err(_) => bad += 1,
            }
        }
        if bad > 0 {
            // Not cut off (only a tail without a whole signature line is):
            // `gwctl ledger verify --checkpoint` refuses the file until someone
            // looks at it.
            tracing::error!(path = %path.display(), notes = bad, "ledger checkpoint: whole notes in the file do not verify with this key");
        }
        Checkpointer {
            key,
            path,
            every_rows: every_rows.max(1),
            every,
            last_at: Instant::now(),
            whole,
            entry_synced: false,
            unsent: VecDeque::new(),
            dropping: false,
            anchors: Arc::new(parking_lot::Mutex::new(anchors)),
        }
    }

    /// The newest checkpoint of each chain, kept up to date as checkpoints are
    /// written.
    pub fn anchors(&self) -> Anchors {
        self.anchors.clone()
    }

    /// The key its checkpoints verify with.
    pub fn verifying_key(&self) -> ed25519_dalek::VerifyingKey {
        self.key.verifying_key()
    }

    /// The checkpoint file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a checkpoint of chain `chain_id`, now of `size` rows, is due: by
    /// its own last checkpoint (a node renamed checkpoints its new chain from its
    /// first rows).
    pub fn due(&self, chain_id: &str, size: u64) -> bool {
        let last = self.anchors.lock().get(chain_id).map_or(0, |a| a.size);
        let grown = size.saturating_sub(last);
        grown >= self.every_rows || (grown > 0 && self.last_at.elapsed() >= self.every)
    }

    /// Writes a checkpoint of chain `chain_id` (`size` rows, head `head`) when one
    /// is due ([`Checkpointer::due`]); `Ok(true)` when written. Blocks for the
    /// append's `fsync`: call it off the async runtime's workers.
    pub fn tick(&mut self, chain_id: &str, size: u64, head: [u8; 32]) -> std::io::Result<bool> {
        if !self.due(chain_id, size) {
            return Ok(false);
        }
        let checkpoint = Checkpoint::for_chain(chain_id, size, head);
        let note = checkpoint.sign(KEY_NAME, &self.key);
        self.append(note.as_bytes())?;
        self.anchors.lock().insert(chain_id.to_owned(), checkpoint);
        self.last_at = Instant::now();
        self.unsent.push_back(CheckpointRow {
            chain_id: chain_id.to_owned(),
            size,
            head: hex::encode(head),
            note,
            ts_ms: crate::now_nanos() / 1_000_000,
        });
        if self.unsent.len() > MAX_UNSENT {
            self.unsent.pop_front();
            if !std::mem::replace(&mut self.dropping, true) {
                tracing::warn!(kept = MAX_UNSENT, "ledger checkpoints: ClickHouse has not taken them for long; only the newest are kept for it (the file keeps every one)");
            }
        }
        Ok(true)
    }

    /// Writes `note` after the whole notes and makes it durable; a note that
    /// failed is cut back off (best effort: the next append and the next start cut
    /// it off too). The file's directory entry is synced once per process.
    fn append(&mut self, note: &[u8]) -> std::io::Result<()> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .read(true)
            .open(&self.path)?;
        let len = f.metadata()?.len();
        let whole = match self.whole {
            Some(w) if w == len => w,
            // Not what this process wrote (a tail cut short by a failure, or a
            // file `new` could not read): the file itself says where its whole
            // notes end, and nothing before that is ever cut.
            _ => whole_notes(&f, &self.path)?.1,
        };
        self.whole = Some(whole);
        if let Err(e) = f.write_all_at(note, whole).and_then(|()| f.sync_data()) {
            let _ = f.set_len(whole).and_then(|()| f.sync_data());
            return Err(e);
        }
        self.whole = Some(whole + note.len() as u64);
        if !self.entry_synced {
            // The note is durable in the file; its entry is retried with the next.
            match crate::durable::sync_parent(&self.path) {
                Ok(()) => self.entry_synced = true,
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "ledger checkpoint: the file's directory entry is not synced yet");
                }
            }
        }
        Ok(())
    }

    /// Inserts the checkpoints not yet in ClickHouse (kept for the next try on error).
    pub async fn ship(
        &mut self,
        client: &clickhouse::Client,
    ) -> Result<(), clickhouse::error::Error> {
        let (Some(first), Some(last)) = (self.unsent.front(), self.unsent.back()) else {
            return Ok(());
        };
        let token = format!(
            "gw-checkpoint-{}-{}-{}-{}",
            first.chain_id, first.size, last.chain_id, last.size
        );
        let mut insert = super::ship::insert_once(client, &token)
            .insert::<CheckpointRow>(TABLE)
            .await?;
        for r in &self.unsent {
            insert.write(r).await?;
        }
        insert.end().await?;
        self.unsent.clear();
        self.dropping = false;
        Ok(())
    }
}

/// The whole notes of the file open as `f` (at its start) and their length; a
/// tail after them (a checkpoint whose write was cut short) is cut off durably
/// first: left there, the next note would be appended to it and neither would
/// open.
fn whole_notes(f: &std::fs::File, path: &Path) -> std::io::Result<(Vec<u8>, u64)> {
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut &*f, &mut bytes)?;
    let whole = whole_len(&bytes);
    if whole < bytes.len() {
        f.set_len(whole as u64)?;
        f.sync_data()?;
        tracing::warn!(path = %path.display(), bytes = bytes.len() - whole, "ledger checkpoint: cut off a checkpoint whose write was cut short");
        bytes.truncate(whole);
    }
    Ok((bytes, whole as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opened(path: &Path, key: &SigningKey) -> Vec<u64> {
        let text = std::fs::read_to_string(path).unwrap();
        open_all(&text, KEY_NAME, &key.verifying_key())
            .into_iter()
            .map(|c| c.unwrap().size)
            .collect()
    }

    /// A checkpoint whose append was cut short (cut here inside its signature
    /// line's em dash, so the file is not even UTF-8) is cut off at the next start,
    /// and the checkpoints written next open, as do those before it.
    #[test]
    fn a_checkpoint_cut_short_is_cut_off_and_the_next_ones_open() {
        let d = testkit::TempDir::new("checkpoint-torn");
        let key = SigningKey::from_bytes(&[5; 32]);
        let mut c = Checkpointer::new(key.clone(), d.path(), 1, Duration::from_secs(60));
        assert!(c.tick("node-1", 3, [1; 32]).unwrap());
        assert!(
            !c.tick("node-1", 3, [1; 32]).unwrap(),
            "not due: no row added"
        );
        let path = c.path().to_owned();
        drop(c);
        let note = Checkpoint::for_chain("node-1", 5, [2; 32]).sign(KEY_NAME, &key);
        let cut = note.find('\u{2014}').unwrap() + 1;
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut f, &note.as_bytes()[..cut]).unwrap();
        drop(f);
        assert!(
            std::fs::read_to_string(&path).is_err(),
            "cut inside the dash"
        );

        let mut c = Checkpointer::new(key.clone(), d.path(), 1, Duration::from_secs(60));
        assert_eq!(opened(&path, &key), vec![3], "the torn note is gone");
        assert!(
            !c.tick("node-1", 3, [1; 32]).unwrap(),
            "continues after size 3"
        );
        assert!(c.tick("node-1", 6, [3; 32]).unwrap());
        assert_eq!(opened(&path, &key), vec![3, 6]);

        // Torn again while this process runs (another writer's bytes, or a
        // failure's left-overs): the next append still starts after whole notes.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut f, b"gw-ledger/node-1\n7\n").unwrap();
        drop(f);
        assert!(c.tick("node-1", 8, [4; 32]).unwrap());
        assert_eq!(opened(&path, &key), vec![3, 6, 8]);
    }

    /// The anchors `/api/ledger/verify` holds chains to: the newest checkpoint of
    /// each chain, as written and as read back from the file at the next start —
    /// only those this node's key signed.
    #[test]
    fn the_newest_checkpoint_of_each_chain_is_an_anchor_across_a_restart() {
        let d = testkit::TempDir::new("checkpoint-anchors");
        let key = SigningKey::from_bytes(&[5; 32]);
        let mut c = Checkpointer::new(key.clone(), d.path(), 1, Duration::from_secs(60));
        assert!(c.anchors().lock().is_empty());
        assert!(c.tick("node-1", 3, [1; 32]).unwrap());
        assert!(c.tick("node-1", 5, [2; 32]).unwrap());
        let anchors = c.anchors();
        assert_eq!(
            anchors.lock()["node-1"],
            Checkpoint::for_chain("node-1", 5, [2; 32])
        );
        // The node renamed: its new chain is checkpointed from its first rows
        // (not once it outgrows the old one), and the old chain's checkpoints
        // still anchor that chain.
        assert!(c.due("node-2", 2));
        assert!(c.tick("node-2", 2, [3; 32]).unwrap());
        let path = c.path().to_owned();
        drop(c);
        // A note another key signed is no anchor.
        let other = SigningKey::from_bytes(&[6; 32]);
        let forged = Checkpoint::for_chain("node-1", 2, [9; 32]).sign(KEY_NAME, &other);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut f, forged.as_bytes()).unwrap();
        drop(f);
        let c = Checkpointer::new(key, d.path(), 1, Duration::from_secs(60));
        let got = c.anchors().lock().clone();
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            vec![
                (
                    "node-1".to_owned(),
                    Checkpoint::for_chain("node-1", 5, [2; 32])
                ),
                (
                    "node-2".to_owned(),
                    Checkpoint::for_chain("node-2", 2, [3; 32])
                ),
            ]
        );
    }
}
