//! The sidecar's journal: one append-only log of checksummed records for every piece
//! of durable state — ledger rows, accepted nonces, the embedded bus, agent state,
//! send audit — written by one thread with group commit.
//!
//! Callers hand transactions ([`Txn`]) to [`Journal::commit`]; the writer thread
//! takes everything queued, seals the ledger rows into the chain in order, writes
//! each transaction as one record, calls `fdatasync` once for the whole batch, and
//! only then answers each caller — many requests, one fsync. A transaction is
//! durable, whole, when its `commit` returns `Ok`; on a write or sync error every
//! caller of the batch gets `Err`, the chain is rolled back and the segment is cut
//! back to its last durable byte, so nothing that was refused is recovered later.
//! [`Sink`]s are told of every durable transaction, in order, before its caller is
//! answered (the ledger shipper, the embedded bus, the send audit), and say which
//! records they still need ([`Sink::hold`]).
//!
//! Records live in segments (`{first_lsn:020}.log`), each record framed as
//! `len u32 | crc32 u32 | lsn u64 | payload` (little-endian; the CRC covers the LSN
//! and the payload). Owners say which records they still need with
//! [`Journal::hold`]; a segment whose records are all below every hold is deleted.
//! Records are written over zeros written ahead of them (`segment::Writer::write_batch`),
//! which read as a segment's end. At start, [`Journal::open`] returns the records
//! of the retained segments in order. A torn frame at the end of the last segment
//! (a crash mid-write, never acknowledged) is cut off; damage anywhere else refuses
//! to start.

pub mod expiring;
mod segment;
pub mod txn;
pub mod window;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use parking_lot::Mutex;

pub use expiring::Expiring;
use gw_core::ledger::{Chain, LedgerRow};
use segment::{SegmentError, Writer};
pub use txn::{Entry, Txn};
pub use window::{Weigh, Window};

/// A record's position in the journal (from 1, without gaps).
pub type Lsn = u64;

/// Largest payload of one record.
pub const MAX_RECORD_BYTES: usize = 16 << 20;

/// The file naming the journal's horizon: the first record of the segment that
/// holds the oldest record any owner other than the audit queues needs — the
/// replay guard, the bus and the agents, by [`Journal::hold`] or [`Sink::hold`] —
/// and never a record committed in the last [`HORIZON_LAG`] (an owner learns of
/// its record as the commit returns and says what it holds just after). The
/// records before it are needed only by the audit queues ([`Sink::audit`]: the
/// ledger's and the send audit's, far behind while ClickHouse is away), so a start
/// hands every record to those queues and keeps only the horizon's tail decoded
/// for the others ([`Journal::open_with`]). Written by the writer thread, moved
/// only forward, replaced atomically; a lost or older file only makes a start
/// decode more, and one beyond the journal's last segment (a journal replaced
/// under it) is ignored.
pub const HORIZON: &str = "horizon";

/// No record written this recently falls below the horizon (by default).
pub const HORIZON_LAG: std::time::Duration = std::time::Duration::from_secs(10);

/// The journal's horizon in `dir`, whose segments are `found` (0, everything, when
/// there is none, or when it is no segment's start).
fn read_horizon(dir: &Path, found: &[(Lsn, PathBuf)]) -> Lsn {
    let h: Lsn = std::fs::read_to_string(dir.join(HORIZON))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if h == 0 {
        return 0;
    }
    // Written, it is below the first retained segment or one segment's first.
    if found.first().is_some_and(|(f, _)| h <= *f) || found.iter().any(|(f, _)| *f == h) {
        return h;
    }
    tracing::warn!(
        horizon = h,
        segments = found.len(),
        "journal: a horizon that is no segment's start is ignored (everything is decoded)"
    );
    0
}

/// The file a journal's writer holds locked (`flock`, exclusive) while it runs: a
/// second process on the same state directory would cut the live writer's batch
/// as torn and write over its records.
pub const LOCK: &str = "lock";

/// How long an open waits for the lock: a writer of this process that is still
/// ending, or a previous process still stopping.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Takes `dir`'s [`LOCK`], waiting up to [`LOCK_WAIT`] for its holder to end.
fn lock(dir: &Path) -> Result<std::fs::File, JournalError> {
    let path = dir.join(LOCK);
    let io = |e: std::io::Error| JournalError::Io {
        path: path.clone(),
        detail: e.to_string(),
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io)?;
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(JournalError::Locked(dir.to_path_buf()))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
    }
}

/// Replaces the horizon in `dir` (the file's data synced before the rename: a
/// crash leaves the old horizon or the new one).
fn write_horizon(dir: &Path, lsn: Lsn) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{HORIZON}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "{lsn}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(HORIZON))
}

/// Journal settings.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// A segment is closed and a new one started beyond this size.
    pub segment_bytes: u64,
    /// Most bytes written in one batch (one fsync).
    pub batch_bytes: usize,
    /// No record written this recently falls below the [`HORIZON`].
    pub horizon_lag: std::time::Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            segment_bytes: 64 << 20,
            batch_bytes: 8 << 20,
            horizon_lag: HORIZON_LAG,
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
    /// Another writer holds the journal: a second process on the same state
    /// directory (its [`LOCK`] file).
    #[error(
        "journal {0} is in use by another process (another gw-sidecar on the same state_dir?)"
    )]
    Locked(PathBuf),
    /// A transaction could not be encoded (a bug: nothing was written).
    #[error("a journal transaction does not encode: {0}")]
    Encode(String),
    /// A transaction holds ledger rows but this journal keeps no ledger.
    #[error("the ledger's chain position is not known yet (waiting for ClickHouse to say where the chain stands)")]
    NoChain,
}

/// Fuzzing only: how many records a start keeps of `bytes` read as a segment
/// (`None`: it refuses them as damaged), panicking if what it keeps is not
/// consistent. Not an API.
#[doc(hidden)]
pub fn fuzz_scan(bytes: &[u8]) -> Option<usize> {
    segment::fuzz_scan(bytes, 1 << 16)
}

impl JournalError {
    /// What a client may be told: the error without the server's file paths (the
    /// sidecar's log has them).
    pub fn public(&self) -> String {
        match self {
            JournalError::Io { detail, .. } => format!("the journal's disk failed: {detail}"),
            JournalError::Corrupt { .. } => "the journal is damaged".into(),
            other => other.to_string(),
        }
    }
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

/// Upper bounds, in µs, of [`JournalStats::write_hist`]'s buckets.
pub const WRITE_BOUNDS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// What the writer did so far (for metrics).
#[derive(Debug, Default)]
pub struct JournalStats {
    /// Records appended.
    pub records: AtomicU64,
    /// Batches written (one fsync each).
    pub batches: AtomicU64,
    /// Failed batches.
    pub failures: AtomicU64,
    /// Microseconds spent writing and syncing (sum over batches).
    pub write_us: AtomicU64,
    /// Batches by their write-and-sync time: a count per bound of
    /// [`WRITE_BOUNDS_US`] (at most that long, above the bound before) and one for
    /// the longer ones. A command waits for two batches; their tail is its tail.
    pub write_hist: [AtomicU64; WRITE_BOUNDS_US.len() + 1],
    /// Segments on disk.
    pub segments: AtomicU64,
    /// Bytes on disk.
    pub bytes: AtomicU64,
    /// The first LSN of the segment being written (records below it are in
    /// closed segments, which holds can keep from being deleted).
    pub segment_first: AtomicU64,
    /// Records read at start.
    pub start_records: AtomicU64,
    /// Of those, records kept decoded for the owners other than the audit queues.
    pub start_kept: AtomicU64,
    /// The horizon written last ([`HORIZON`]).
    pub horizon: AtomicU64,
    /// The last batch failed: nothing has been written since (the next batch
    /// clears it). Its callers, commands among them, were refused.
    pub failing: AtomicBool,
    /// Why the last failed batch failed.
    pub last_failure: Mutex<String>,
}

type Reply = Box<dyn FnOnce(Result<Committed, JournalError>) + Send>;

/// The hold a started journal begins with, keeping everything until lifted.
pub const STARTUP_HOLD: &str = "startup";

/// A durable transaction: its record's LSN and its ledger rows as sealed.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The record.
    pub lsn: Lsn,
    /// The transaction's ledger rows with their `seq` and hashes, in order (the
    /// rows the record holds, not copies).
    pub rows: Vec<Arc<LedgerRow>>,
}

/// Told of every durable transaction, in LSN order, on the writer thread (before
/// the caller is answered). Must not block.
pub trait Sink: Send + Sync {
    /// `txn` is durable at `lsn`.
    fn committed(&self, lsn: Lsn, txn: &Txn);

    /// The oldest record this sink still needs (`Lsn::MAX`: none), asked by the
    /// writer after each batch, before it drops segments; with [`Journal::hold`]
    /// for owners that are not sinks.
    fn hold(&self) -> Lsn {
        Lsn::MAX
    }

    /// Whether this sink is an audit queue: it is handed every record at start
    /// ([`Journal::open_with`]) and its hold does not keep the [`HORIZON`] back.
    fn audit(&self) -> bool {
        false
    }
}

struct Job {
    txn: Txn,
    reply: Reply,
    /// The chain to seal into from this job on, when the journal has none yet.
    install: Option<Chain>,
    /// Not a transaction: called once every job queued before it was answered.
    marker: Option<Marker>,
}

/// A callback queued as a job: called once, by the writer in its turn, or when
/// it is dropped unanswered (the writer gone).
struct Marker(Option<Box<dyn FnOnce() + Send>>);

impl Marker {
    /// Calls the callback (its `Drop` does).
    fn call(self) {}
}

impl Drop for Marker {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

struct Shared {
    holds: Mutex<BTreeMap<&'static str, Lsn>>,
    stats: JournalStats,
    dir: PathBuf,
    /// The horizon written last.
    horizon: AtomicU64,
    /// Set on the writer thread by [`Journal::stop`]'s marker: the writer ends
    /// after the batch that carried it.
    stopping: AtomicBool,
    /// The writer thread has ended (however: set as it unwinds too).
    ended: AtomicBool,
    /// When the batch being written began, in µs after `born` plus one (0: no
    /// write is running).
    writing_since: AtomicU64,
    /// The clock [`Self::writing_since`] counts from.
    born: std::time::Instant,
    /// The writer thread, joined by [`Journal::stop`].
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Sets [`Shared::ended`] when the writer thread ends, a panic included.
struct Ended(Arc<Shared>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.ended.store(true, Ordering::Release);
    }
}

/// The journal (cheap to clone).
#[derive(Clone)]
pub struct Journal {
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
}

/// A journal read but not written to yet: what it holds, decoded.
pub struct Opened {
    writer: Writer,
    dir: PathBuf,
    /// Every retained transaction from the horizon on, in order (all of them when
    /// opened with [`Journal::open`]).
    pub records: Vec<(Lsn, Txn)>,
    /// Records read (before the horizon too).
    pub scanned: u64,
    /// Records kept in `records` when opened.
    kept: u64,
    last_row: Option<LedgerRow>,
    horizon: Lsn,
}

impl Opened {
    /// The LSN the next record gets.
    pub fn next_lsn(&self) -> Lsn {
        self.writer.next_lsn()
    }

    /// The last ledger row recovered, if any.
    pub fn last_row(&self) -> Option<&LedgerRow> {
        self.last_row.as_ref()
    }

    /// Starts the writer thread: ledger rows are sealed into `chain` (none: a
    /// transaction with rows is refused); `sinks` hear of every durable one.
    pub fn start(
        self,
        chain: Option<Chain>,
        sinks: Vec<Arc<dyn Sink>>,
    ) -> Result<Journal, JournalError> {
        // Nothing is dropped until every owner has set its hold: the caller lifts
        // this one (`hold(STARTUP_HOLD, Lsn::MAX)`) once they have.
        let shared = Arc::new(Shared {
            holds: Mutex::new(BTreeMap::from([(STARTUP_HOLD, 0)])),
            stats: JournalStats::default(),
            dir: self.dir.clone(),
            horizon: AtomicU64::new(self.horizon),
            stopping: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            writing_since: AtomicU64::new(0),
            born: std::time::Instant::now(),
            thread: Mutex::new(None),
        });
        self.writer.publish_stats(&shared.stats);
        let st = &shared.stats;
        st.start_records.store(self.scanned, Ordering::Relaxed);
        st.start_kept.store(self.kept, Ordering::Relaxed);
        st.horizon.store(self.horizon, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel::<Job>();
        let s = shared.clone();
        let writer = self.writer;
        let thread = std::thread::Builder::new()
            .name("gw-journal".into())
            .spawn(move || {
                // Every command waits for this thread twice. (In gw-sidecar it
                // inherited the slice already; this is for an embedding process.)
                let _ = crate::sched::apply_here();
                let _ended = Ended(s.clone());
                run(writer, &rx, &s, chain, &sinks);
            })
            .map_err(|e| JournalError::Io {
                path: self.dir.clone(),
                detail: format!("cannot start the writer thread: {e}"),
            })?;
        *shared.thread.lock() = Some(thread);
        Ok(Journal { tx, shared })
    }
}

impl Journal {
    /// Opens (or creates) the journal in `dir` and decodes what it holds, every
    /// record kept in [`Opened::records`]; a record that does not decode refuses
    /// the start (state would be lost otherwise).
    pub fn open(dir: &Path, opts: Options) -> Result<Opened, JournalError> {
        Self::open_with(dir, opts, &mut |_, _| {}, false)
    }

    /// [`Self::open`] for a start whose audit queues (the ledger's rows, the send
    /// audit's) may be far behind: every record is handed to `audit`, in order, and
    /// with `horizon` only those from the journal's horizon on are kept in
    /// [`Opened::records`] for the other owners (the records before it are needed
    /// by no owner but the audit queues: see [`HORIZON`]). Memory then holds what
    /// the audit queues keep (their bounded windows) and the horizon's tail.
    pub fn open_with(
        dir: &Path,
        opts: Options,
        audit: &mut dyn FnMut(Lsn, &Txn),
        horizon: bool,
    ) -> Result<Opened, JournalError> {
        crate::durable::create_dir(dir).map_err(|e| JournalError::Io {
            path: dir.to_path_buf(),
            detail: e.to_string(),
        })?;
        let lock = lock(dir)?;
        let found = segment::segments(dir)?;
        let persisted = read_horizon(dir, &found);
        let from = if horizon { persisted } else { 0 };
        let mut records = Vec::new();
        let (mut scanned, mut last_row) = (0u64, None);
        let writer = Writer::open(dir, found, opts, lock, &mut |lsn, payload| {
            let txn = Txn::decode(payload).map_err(|detail| SegmentError::Corrupt {
                path: dir.to_path_buf(),
                offset: lsn,
                detail: format!("record {lsn}: {detail}"),
            })?;
            scanned += 1;
            audit(lsn, &txn);
            if let Some(r) = txn.entries.iter().rev().find_map(|e| match e {
                Entry::Row(r) => Some(r),
                _ => None,
            }) {
                last_row = Some(LedgerRow::clone(r));
            }
            if lsn >= from {
                records.push((lsn, txn));
            }
            Ok(())
        })?;
        let kept = records.len() as u64;
        Ok(Opened {
            writer,
            dir: dir.to_path_buf(),
            records,
            scanned,
            kept,
            last_row,
            horizon: persisted,
        })
    }

    fn submit(&self, txn: Txn, reply: Reply) {
        self.submit_job(Job {
            txn,
            reply,
            install: None,
            marker: None,
        });
    }

    fn submit_job(&self, job: Job) {
        if let Err(mpsc::SendError(job)) = self.tx.send(job) {
            (job.reply)(Err(JournalError::Closed));
        }
    }

    /// Makes `txn` durable, whole: `Ok` once it is on disk (with whatever else the
    /// writer batched with it).
    pub async fn commit(&self, txn: Txn) -> Result<Committed, JournalError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(
            txn,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.await.unwrap_or(Err(JournalError::Closed))
    }

    /// Gives a journal started without a chain its chain and commits `txn` (its
    /// first rows) in it: transactions with rows before this one were refused
    /// ([`JournalError::NoChain`]); those after it are sealed after `txn`'s rows. A
    /// journal that has a chain keeps it. On `Err` nothing was installed.
    pub async fn commit_installing(
        &self,
        chain: Chain,
        txn: Txn,
    ) -> Result<Committed, JournalError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit_job(Job {
            txn,
            reply: Box::new(move |r| {
                let _ = tx.send(r);
            }),
            install: Some(chain),
            marker: None,
        });
        rx.await.unwrap_or(Err(JournalError::Closed))
    }

    /// Calls `f` on the writer thread once every transaction queued before this
    /// call has been answered (and its sinks told), without writing anything; on a
    /// stopped journal, at once or as the writer's queue is dropped.
    pub fn after_queued(&self, f: Box<dyn FnOnce() + Send>) {
        let job = Job {
            txn: Txn::default(),
            reply: Box::new(|_| {}),
            install: None,
            marker: Some(Marker(Some(f))),
        };
        if let Err(mpsc::SendError(mut job)) = self.tx.send(job) {
            // The writer is gone: nothing queued will be answered any more.
            if let Some(m) = job.marker.take() {
                m.call();
            }
        }
    }

    /// Stops the writer and waits for its thread to end: every transaction queued
    /// before the first stop is written and answered (its sinks told), and the
    /// segments no owner holds any more are deleted, as after any batch. Later
    /// commits, from any clone, are refused with [`JournalError::Closed`]. The
    /// directory may then be opened again in this process (a dropped journal's
    /// writer ends only once every clone is gone, and may still be deleting
    /// segments when a reopen lists them). Blocks until the writer has ended,
    /// also when called again or from several clones at once: call it outside
    /// the async runtime's workers (or in `block_in_place`).
    pub fn stop(&self) {
        let shared = self.shared.clone();
        self.after_queued(Box::new(move || {
            shared.stopping.store(true, Ordering::Release);
        }));
        // Held across the join: a concurrent stop returns only once it is done.
        let mut thread = self.shared.thread.lock();
        if let Some(t) = thread.take() {
            if t.join().is_err() {
                tracing::error!("the journal's writer thread panicked");
            }
        }
    }

    /// [`Self::commit`] for threads outside the async runtime.
    pub fn commit_blocking(&self, txn: Txn) -> Result<Committed, JournalError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(
            txn,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv().unwrap_or(Err(JournalError::Closed))
    }

    /// Queues `txn` without waiting for it (its durability is reported to the
    /// sinks; a failure is logged and counted).
    pub fn commit_detached(&self, txn: Txn) {
        self.submit(txn, Box::new(|_| {}));
    }

    /// `owner` needs the records from `lsn` on (it no longer needs older ones).
    /// Segments below every owner's hold are deleted as the journal grows.
    pub fn hold(&self, owner: &'static str, lsn: Lsn) {
        let horizon = self.shared.horizon.load(Ordering::Relaxed);
        let before = self.shared.holds.lock().insert(owner, lsn);
        // A start would not hand this owner records below the horizon (said once
        // as the hold falls below it).
        if lsn < horizon && owner != STARTUP_HOLD && before.is_none_or(|b| b >= horizon) {
            tracing::warn!(owner, lsn, horizon, "journal: a hold below the horizon");
        }
    }

    /// Reads the durable records `from..=upto` back from disk, in order, until `f`
    /// returns `false` (blocking: call it off the async runtime's workers). For a
    /// sink whose records wait on disk only ([`Window`]): they must be durable (a
    /// sink heard of them) and kept by the caller's hold.
    pub fn read(
        &self,
        from: Lsn,
        upto: Lsn,
        f: &mut dyn FnMut(Lsn, Txn) -> bool,
    ) -> Result<(), JournalError> {
        let dir = &self.shared.dir;
        let mut failed = None;
        segment::read_range(
            dir,
            from,
            upto,
            &mut |lsn, payload| match Txn::decode(payload) {
                Ok(t) => f(lsn, t),
                Err(detail) => {
                    failed = Some(JournalError::Corrupt {
                        path: dir.clone(),
                        offset: lsn,
                        detail: format!("record {lsn}: {detail}"),
                    });
                    false
                }
            },
        )?;
        failed.map_or(Ok(()), Err)
    }

    /// What the writer did so far.
    pub fn stats(&self) -> &JournalStats {
        &self.shared.stats
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Whether its writer no longer writes: [`Self::stop`] stopped it (or is
    /// stopping it), or its thread ended otherwise (it panicked). Later commits
    /// are refused.
    pub fn stopped(&self) -> bool {
        self.shared.stopping.load(Ordering::Acquire) || self.shared.ended.load(Ordering::Acquire)
    }

    /// How long the batch being written has been at it (`None`: no write is
    /// running). A write that does not return (a hung device) holds every
    /// commit behind it.
    pub fn writing_for(&self) -> Option<std::time::Duration> {
        let since = self.shared.writing_since.load(Ordering::Acquire);
        let since = std::time::Duration::from_micros(since.checked_sub(1)?);
        Some(self.shared.born.elapsed().saturating_sub(since))
    }

    /// The first LSN of the segment being written.
    pub fn segment_first(&self) -> Lsn {
        self.shared.stats.segment_first.load(Ordering::Relaxed)
    }
}

/// Seals `job`'s rows into `chain` and encodes it; `Err` leaves `chain` as it was.
fn prepare(
    job: &mut Job,
    chain: &mut Option<Chain>,
) -> Result<(Vec<u8>, Vec<Arc<LedgerRow>>), JournalError> {
    // Taken before the install too: on `Err` nothing was installed.
    let before = chain.clone();
    if let Some(c) = job.install.take() {
        chain.get_or_insert(c);
    }
    let mut rows = Vec::new();
    for e in &mut job.txn.entries {
        if let Entry::Row(r) = e {
            let Some(c) = chain.as_mut() else {
                return Err(JournalError::NoChain);
            };
            // The row is the caller's alone until sealed: no copy is made here.
            let row = Arc::make_mut(r);
            *row = c.seal(std::mem::take(row));
            rows.push(Arc::clone(r));
        }
    }
    let bytes = match job.txn.encode() {
        Ok(b) => b,
        Err(detail) => {
            *chain = before;
            return Err(JournalError::Encode(detail));
        }
    };
    if bytes.len() > MAX_RECORD_BYTES {
        *chain = before;
        return Err(JournalError::TooLarge(bytes.len()));
    }
    Ok((bytes, rows))
}

/// Most transactions taken into one batch.
const MAX_BATCH_JOBS: usize = 4096;

fn run(
    mut writer: Writer,
    rx: &mpsc::Receiver<Job>,
    shared: &Shared,
    mut chain: Option<Chain>,
    sinks: &[Arc<dyn Sink>],
) {
    let mut horizon = shared.horizon.load(Ordering::Relaxed);
    let mut recent = Recent::new(writer.next_lsn(), writer.horizon_lag());
    let mut retry_horizon = std::time::Instant::now();
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH_JOBS {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let mut part: Vec<Prepared> = Vec::with_capacity(jobs.len());
        let mut part_start = chain.clone();
        let mut bytes = 0usize;
        let mut markers = Vec::new();
        for mut job in jobs {
            if let Some(m) = job.marker.take() {
                markers.push(m);
                continue;
            }
            match prepare(&mut job, &mut chain) {
                Ok((payload, rows)) => {
                    bytes += payload.len();
                    part.push((job, payload, rows));
                }
                Err(e) => (job.reply)(Err(e)),
            }
            // A batch beyond the bound is written in parts (one fsync each).
            if bytes >= writer.batch_bytes() {
                write_part(
                    &mut writer,
                    shared,
                    std::mem::take(&mut part),
                    part_start,
                    &mut chain,
                    sinks,
                );
                part_start = chain.clone();
                bytes = 0;
            }
        }
        if !part.is_empty() {
            write_part(&mut writer, shared, part, part_start, &mut chain, sinks);
        }
        for m in markers {
            m.call();
        }
        let held = shared
            .holds
            .lock()
            .values()
            .copied()
            .min()
            .unwrap_or(Lsn::MAX);
        let (mut low, mut others) = (held, held);
        for s in sinks {
            let h = s.hold();
            low = low.min(h);
            if !s.audit() {
                others = others.min(h);
            }
        }
        if let Err(e) = writer.drop_below(low) {
            tracing::warn!(error = %JournalError::from(e), "old journal segments not deleted");
        }
        let now = std::time::Instant::now();
        let settled = recent.settled(now, writer.next_lsn());
        let floor = writer.segment_floor(others.min(settled));
        if floor > horizon && now >= retry_horizon {
            match write_horizon(&shared.dir, floor) {
                Ok(()) => {
                    horizon = floor;
                    shared.horizon.store(floor, Ordering::Relaxed);
                    shared.stats.horizon.store(floor, Ordering::Relaxed);
                }
                Err(e) => {
                    retry_horizon = now + std::time::Duration::from_secs(5);
                    tracing::warn!(error = %e, "journal horizon not moved (a start decodes more; retried in 5 s)");
                }
            }
        }
        writer.publish_stats(&shared.stats);
        if shared.stopping.load(Ordering::Acquire) {
            break;
        }
    }
    // Stopped: whatever was queued after the stop is refused (a job sent between
    // this and the channel's end is dropped with it, which its caller reads as
    // `Closed` too, and a marker's drop calls it).
    while let Ok(mut job) = rx.try_recv() {
        match job.marker.take() {
            Some(m) => m.call(),
            None => (job.reply)(Err(JournalError::Closed)),
        }
    }
}

/// A transaction ready to write: its job, record and sealed rows.
type Prepared = (Job, Vec<u8>, Vec<Arc<LedgerRow>>);

/// Writes `part` with one fsync; on failure the chain goes back to `rollback` and
/// every caller of the part is refused.
fn write_part(
    writer: &mut Writer,
    shared: &Shared,
    part: Vec<Prepared>,
    rollback: Option<Chain>,
    chain: &mut Option<Chain>,
    sinks: &[Arc<dyn Sink>],
) {
    let payloads: Vec<&[u8]> = part.iter().map(|(_, p, _)| p.as_slice()).collect();
    let t0 = std::time::Instant::now();
    let began = t0.saturating_duration_since(shared.born).as_micros();
    let began = u64::try_from(began).unwrap_or(u64::MAX - 1);
    shared.writing_since.store(began + 1, Ordering::Release);
    let written = writer.write_batch(&payloads);
    shared.writing_since.store(0, Ordering::Release);
    let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
    shared.stats.write_us.fetch_add(us, Ordering::Relaxed);
    let bucket = WRITE_BOUNDS_US.partition_point(|&b| b < us);
    if let Some(c) = shared.stats.write_hist.get(bucket) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    match written {
        Ok(first_lsn) => {
            shared
                .stats
                .records
                .fetch_add(part.len() as u64, Ordering::Relaxed);
            shared.stats.batches.fetch_add(1, Ordering::Relaxed);
            if shared.stats.failing.swap(false, Ordering::AcqRel) {
                tracing::info!("the journal writes again");
            }
            for (i, (job, _, rows)) in part.into_iter().enumerate() {
                let lsn = first_lsn + i as u64;
                for s in sinks {
                    s.committed(lsn, &job.txn);
                }
                (job.reply)(Ok(Committed { lsn, rows }));
            }
        }
        Err(e) => {
            *chain = rollback;
            shared.stats.failures.fetch_add(1, Ordering::Relaxed);
            let e = JournalError::from(e);
            *shared.stats.last_failure.lock() = e.to_string();
            shared.stats.failing.store(true, Ordering::Release);
            tracing::error!(error = %e, transactions = part.len(), "journal write failed; the batch was refused");
            for (job, _, _) in part {
                (job.reply)(Err(e.clone()));
            }
        }
    }
}

/// When the journal's records were written, coarsely: marks of about a second
/// each (a tenth of the lag), for as far back as the lag.
struct Recent {
    /// (opened, last batch, the next record's LSN after it), oldest first: every
    /// record below that LSN was written by the mark's last batch.
    marks: std::collections::VecDeque<(std::time::Instant, std::time::Instant, Lsn)>,
    lag: std::time::Duration,
}

impl Recent {
    fn new(next: Lsn, lag: std::time::Duration) -> Recent {
        let now = std::time::Instant::now();
        Recent {
            marks: std::collections::VecDeque::from([(now, now, next)]),
            lag,
        }
    }

    /// Notes a batch that left `next` as the next LSN at `now`; the first record
    /// that may have been written less than the lag ago (0 until the journal has
    /// been written for that long in this run).
    fn settled(&mut self, now: std::time::Instant, next: Lsn) -> Lsn {
        let step = (self.lag / 10).min(std::time::Duration::from_secs(1));
        match self.marks.back_mut() {
            Some((opened, last, n)) if now.duration_since(*opened) < step => {
                (*last, *n) = (now, next);
            }
            _ => self.marks.push_back((now, now, next)),
        }
        let lag = self.lag;
        let old = |t: &std::time::Instant| now.duration_since(*t) >= lag;
        while self.marks.get(1).is_some_and(|(_, t, _)| old(t)) {
            self.marks.pop_front();
        }
        match self.marks.front() {
            Some((_, t, lsn)) if old(t) => *lsn,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests;
