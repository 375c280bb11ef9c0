//! The sidecar's journal: one append-only log of checksummed records for every piece
//! of durable state, written by one thread with group commit.
//!
//! Callers hand records to [`Journal::append`]; the writer thread takes everything
//! queued, writes it, calls `fdatasync` once for the whole batch, and only then
//! answers each caller — many requests, one fsync. A record is durable when its
//! `append` returns `Ok`; on a write or sync error every caller of the batch gets
//! `Err` and the segment is cut back to its last durable byte, so nothing that was
//! refused is recovered later.
//!
//! Records live in segments (`{first_lsn:020}.log`), each record framed as
//! `len u32 | crc32 u32 | lsn u64 | payload` (little-endian; the CRC covers the LSN
//! and the payload). Owners say which records they still need with
//! [`Journal::hold`]; a segment whose records are all below every hold is deleted.
//! At start, [`Journal::open`] returns the records of the retained segments in
//! order. A torn frame at the end of the last segment (a crash mid-write, never
//! acknowledged) is cut off; damage anywhere else refuses to start.

mod segment;

/// Which owner a record belongs to: the first byte of every payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Stream {
    /// The replay guard's accepted nonces.
    Nonce = 1,
}

impl Stream {
    fn from_byte(b: u8) -> Option<Stream> {
        match b {
            1 => Some(Stream::Nonce),
            _ => None,
        }
    }
}

/// A record of `stream`: its tag, then `value` as JSON.
pub fn encode(stream: Stream, value: &impl serde::Serialize) -> Vec<u8> {
    let mut out = vec![stream as u8];
    // Serialising our own plain structs cannot fail.
    let _ = serde_json::to_writer(&mut out, value);
    out
}

/// Splits a recovered record into its stream and body; `None` for a stream this
/// build does not know (a newer writer's record: kept, not interpreted).
pub fn split(payload: &[u8]) -> Option<(Stream, &[u8])> {
    let (&tag, body) = payload.split_first()?;
    Some((Stream::from_byte(tag)?, body))
}

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use parking_lot::Mutex;

use segment::{SegmentError, Writer};

/// A record's position in the journal (from 1, without gaps).
pub type Lsn = u64;

/// Largest payload of one record.
pub const MAX_RECORD_BYTES: usize = 16 << 20;

/// Journal settings.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// A segment is closed and a new one started beyond this size.
    pub segment_bytes: u64,
    /// Most bytes written in one batch (one fsync).
    pub batch_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            segment_bytes: 64 << 20,
            batch_bytes: 8 << 20,
        }
    }
}

/// Why the journal failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    /// Reading or writing the journal's files failed.
    #[error("journal {path}: {detail}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        detail: String,
    },
    /// A record other than a torn last one is damaged: refuse rather than lose state.
    #[error("journal {path} is damaged at byte {offset}: {detail}")]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// What.
        detail: String,
    },
    /// A record is larger than [`MAX_RECORD_BYTES`].
    #[error("a journal record of {0} bytes is larger than {MAX_RECORD_BYTES}")]
    TooLarge(usize),
    /// The writer thread is gone (the journal was closed).
    #[error("the journal is closed")]
    Closed,
}

impl From<SegmentError> for JournalError {
    fn from(e: SegmentError) -> Self {
        match e {
            SegmentError::Io { path, source } => JournalError::Io {
                path,
                detail: source.to_string(),
            },
            SegmentError::Corrupt {
                path,
                offset,
                detail,
            } => JournalError::Corrupt {
                path,
                offset,
                detail,
            },
        }
    }
}

/// What the writer did so far (for metrics).
#[derive(Debug, Default)]
pub struct JournalStats {
    /// Records appended.
    pub records: AtomicU64,
    /// Batches written (one fsync each).
    pub batches: AtomicU64,
    /// Failed batches.
    pub failures: AtomicU64,
    /// Segments on disk.
    pub segments: AtomicU64,
    /// Bytes on disk.
    pub bytes: AtomicU64,
}

type Reply = Box<dyn FnOnce(Result<Lsn, JournalError>) + Send>;

struct Job {
    payloads: Vec<Vec<u8>>,
    reply: Reply,
}

struct Shared {
    holds: Mutex<BTreeMap<&'static str, Lsn>>,
    stats: JournalStats,
}

/// The journal (cheap to clone).
#[derive(Clone)]
pub struct Journal {
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
}

/// The records a journal held when it was opened, in order.
pub type Recovered = Vec<(Lsn, Vec<u8>)>;

impl Journal {
    /// Opens (or creates) the journal in `dir`, returns it and the records it holds,
    /// and starts its writer thread.
    pub fn open(dir: &Path, opts: Options) -> Result<(Journal, Recovered), JournalError> {
        let (writer, records) = Writer::open(dir, opts)?;
        let shared = Arc::new(Shared {
            holds: Mutex::new(BTreeMap::new()),
            stats: JournalStats::default(),
        });
        writer.publish_stats(&shared.stats);
        let (tx, rx) = mpsc::channel::<Job>();
        let s = shared.clone();
        std::thread::Builder::new()
            .name("gw-journal".into())
            .spawn(move || run(writer, &rx, &s))
            .map_err(|e| JournalError::Io {
                path: dir.to_path_buf(),
                detail: format!("cannot start the writer thread: {e}"),
            })?;
        Ok((Journal { tx, shared }, records))
    }

    fn submit(&self, payloads: Vec<Vec<u8>>, reply: Reply) {
        if let Some(n) = payloads
            .iter()
            .map(Vec::len)
            .find(|n| *n > MAX_RECORD_BYTES)
        {
            reply(Err(JournalError::TooLarge(n)));
            return;
        }
        if let Err(mpsc::SendError(job)) = self.tx.send(Job { payloads, reply }) {
            (job.reply)(Err(JournalError::Closed));
        }
    }

    /// Appends `payloads` in order, durably: `Ok` with the last one's LSN once they
    /// are on disk (with whatever else the writer batched with them).
    pub async fn append(&self, payloads: Vec<Vec<u8>>) -> Result<Lsn, JournalError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(
            payloads,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.await.unwrap_or(Err(JournalError::Closed))
    }

    /// [`Self::append`] for threads outside the async runtime.
    pub fn append_blocking(&self, payloads: Vec<Vec<u8>>) -> Result<Lsn, JournalError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(
            payloads,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv().unwrap_or(Err(JournalError::Closed))
    }

    /// `owner` needs the records from `lsn` on (it no longer needs older ones).
    /// Segments below every owner's hold are deleted as the journal grows.
    pub fn hold(&self, owner: &'static str, lsn: Lsn) {
        self.shared.holds.lock().insert(owner, lsn);
    }

    /// What the writer did so far.
    pub fn stats(&self) -> &JournalStats {
        &self.shared.stats
    }
}

fn run(mut writer: Writer, rx: &mpsc::Receiver<Job>, shared: &Shared) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let mut bytes: usize = jobs[0].payloads.iter().map(Vec::len).sum();
        while bytes < writer.batch_bytes() {
            match rx.try_recv() {
                Ok(j) => {
                    bytes += j.payloads.iter().map(Vec::len).sum::<usize>();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        let counts: Vec<usize> = jobs.iter().map(|j| j.payloads.len()).collect();
        let payloads: Vec<&[u8]> = jobs
            .iter()
            .flat_map(|j| j.payloads.iter().map(Vec::as_slice))
            .collect();
        match writer.write_batch(&payloads) {
            Ok(first_lsn) => {
                shared
                    .stats
                    .records
                    .fetch_add(payloads.len() as u64, Ordering::Relaxed);
                shared.stats.batches.fetch_add(1, Ordering::Relaxed);
                let mut next = first_lsn;
                for (job, n) in jobs.into_iter().zip(counts) {
                    next += n as u64;
                    (job.reply)(Ok(next - 1));
                }
            }
            Err(e) => {
                shared.stats.failures.fetch_add(1, Ordering::Relaxed);
                let e = JournalError::from(e);
                tracing::error!(error = %e, "journal write failed; the batch was refused");
                for job in jobs {
                    (job.reply)(Err(e.clone()));
                }
            }
        }
        let low = shared.holds.lock().values().copied().min();
        if let Some(low) = low {
            if let Err(e) = writer.drop_below(low) {
                tracing::warn!(error = %JournalError::from(e), "old journal segments not deleted");
            }
        }
        writer.publish_stats(&shared.stats);
    }
}

#[cfg(test)]
mod tests;
