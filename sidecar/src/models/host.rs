//! Serving models per module: [`ModelHost`] watches `lib<name>_latest.so` links and
//! swaps a new model in atomically (`arc-swap`) once it passed every check of
//! [`Model::load`] (golden vectors included); a library that fails any check is
//! refused with a log line and `gw_sidecar_model_rejected_total{module,reason}`
//! while the old model keeps serving.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use gw_core::ledger::Decision;
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;

use super::library::{LoadError, LoadPolicy, Model};
use crate::ledger::{Auditor, ModelEvent};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModuleLabel {
    module: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabel {
    module: &'static str,
    reason: &'static str,
}

/// Swaps and refusals kept per slot for `GET /api/models`.
const HISTORY: usize = 16;

/// One swap or refusal.
#[derive(Debug, Clone, Serialize)]
pub struct SwapEvent {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// The library file.
    pub path: String,
    /// `served`, the refusal's reason label, or `link_lost` (the link is gone or
    /// dangling; `path` is the link's).
    pub outcome: &'static str,
    /// The version served, or why it was refused.
    pub detail: String,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One module's slot.
pub struct Slot {
    /// Module name in the API (`mev`, `arbitrage`).
    pub module: &'static str,
    /// Library stem: `lib<stem>_latest.so`.
    pub stem: &'static str,
    /// Features per row, from the module's configuration.
    pub n_features: u32,
    current: ArcSwapOption<Model>,
    /// A `lib<stem>_latest.so` link was seen since start: the module is scored by
    /// its model alone, and scores nothing while none serves.
    linked: AtomicBool,
    /// The link is missing or dangling now (logged once per change).
    link_lost: AtomicBool,
    /// The link itself was seen since start (dangling or not): only such a
    /// link can be lost (`models.required`, or a directory not there, link
    /// the module without one).
    link_seen: AtomicBool,
    /// Link target refused last, why, and whether it is tried again at each look
    /// ([`super::LoadError::retried`]; else not until the link changes).
    refused: Mutex<Option<(PathBuf, String, bool)>>,
    /// Link target of the model serving (its own path, or another path to a file
    /// already loaded, served from there): a link still naming it swaps nothing.
    serving_target: Mutex<Option<PathBuf>>,
    /// What the link named at the last look: a refused build is tried again
    /// only when the link changed since (named the serving one meanwhile, say).
    last_target: Mutex<Option<PathBuf>>,
    /// Last swaps and refusals, oldest first.
    history: Mutex<VecDeque<SwapEvent>>,
    /// A model that passed every check but whose swap the ledger could not
    /// record yet, its link target and the link's owner then: not served until
    /// it is.
    unrecorded: Mutex<Option<(PathBuf, Arc<Model>, String)>>,
    /// Refusals (and lost links) whose row the ledger could not take when they
    /// happened, oldest first ([`MAX_OWED`] at most): written at each look until
    /// it takes them.
    owed: Mutex<VecDeque<OwedRow>>,
    /// Owed rows dropped beyond [`MAX_OWED`] and not yet said in a row.
    owed_dropped: AtomicU64,
    /// Models swapped in (this slot's entry of `gw_sidecar_model_loads_total`).
    loads: Counter,
    /// Libraries refused, every reason.
    rejected: AtomicU64,
}

impl Slot {
    /// Its `lib<stem>_latest.so` link in `dir`.
    fn link(&self, dir: &Path) -> PathBuf {
        dir.join(format!("lib{}_latest.so", self.stem))
    }

    /// Models swapped in since start.
    pub fn loads(&self) -> u64 {
        self.loads.get()
    }

    /// Libraries refused since start.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Whether the module has a model (its link was seen since start), serving or
    /// not: such a module is scored by its model alone, never by an
    /// opportunity's own `ev`.
    pub fn linked(&self) -> bool {
        self.linked.load(Ordering::Acquire)
    }

    /// The version serving now, or `nothing`.
    fn serving_version(&self) -> String {
        self.current
            .load()
            .as_ref()
            .map_or("nothing".to_string(), |m| m.version.clone())
    }

    fn record(&self, path: &Path, outcome: &'static str, detail: String) {
        let mut h = self.history.lock();
        if h.len() == HISTORY {
            h.pop_front();
        }
        h.push_back(SwapEvent {
            at_ms: unix_ms(),
            path: path.display().to_string(),
            outcome,
            detail,
        });
    }
}

/// Every module's model.
pub struct ModelHost {
    dir: PathBuf,
    policy: LoadPolicy,
    /// Where each swap and refusal is recorded (none: not recorded).
    audit: Auditor,
    /// The slots (`mev` → libmev, `arbitrage` → libarb).
    slots: Vec<Slot>,
    loads: Family<ModuleLabel, Counter>,
    rejected: Family<RejectLabel, Counter>,
    /// Libraries alive now, by file (device and inode, as the system loader tells
    /// files apart: a hard link or a second path to a loaded file is that file): a
    /// file that is still loaded (a model swapped out but still predicting, or the
    /// other module's) is served again from there, never opened a second time, so
    /// its `init` runs once and its `release` once, as the ABI promises (the
    /// system loader shares one handle per file).
    loaded: Mutex<HashMap<(u64, u64), Weak<Model>>>,
    /// How long opening and checking a library may take.
    load_timeout: Duration,
    /// A file naming the library being loaded, removed once it loaded or was
    /// refused: found at start, the process died loading it.
    marker: Option<PathBuf>,
    /// The libraries not opened: those a process died inside (loading one, or
    /// in its `predict`: [`CRASHED_LIST`] beside the marker), and the one the
    /// last process ended loading (the marker's; this start only).
    crashed: Vec<PathBuf>,
    /// A library whose loader timed out and is still inside it.
    stuck: Arc<Mutex<Option<PathBuf>>>,
    /// Models swapped out, kept until nobody else holds them: their last
    /// reference is never dropped by a hot-path batch or a request that held
    /// them across the swap (the library's `release`, its `dlclose` and
    /// finalisers would run there, for as long as they take).
    retired: Mutex<Vec<Arc<Model>>>,
    /// Releases running, each on a thread of its own (`gw-model-release`): one
    /// that hangs holds only its thread and its model.
    releasing: Arc<std::sync::atomic::AtomicUsize>,
    /// Swapped-out models wait for [`MAX_RELEASING`] releases still running
    /// (logged once while it lasts).
    release_capped: AtomicBool,
}

/// Releases running at once at most; a retired model found free beyond them
/// waits for a later look.
const MAX_RELEASING: usize = 4;

/// A refusal row still to be written: its link, the link's owner when it was
/// refused, its reason, its note.
type OwedRow = (PathBuf, String, &'static str, serde_json::Value);

/// Refusal rows a slot owes at most; beyond, the oldest is dropped and the next
/// written says how many were (`rows_not_recorded`).
const MAX_OWED: usize = 64;

/// The file, beside the crash marker, listing the libraries a process died inside
/// (one path a line, newest last): the handler of the fatal signals appends to it
/// when a library's own fault or abort strikes a thread running its code.
pub const CRASHED_LIST: &str = "model-crashed";

/// The newest lines kept in [`CRASHED_LIST`] (older ones are dropped at start).
const MAX_CRASHED: usize = 64;

fn bytes_path(b: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt as _;
    PathBuf::from(std::ffi::OsStr::from_bytes(b))
}

/// The libraries listed at `list`, each once, the newest [`MAX_CRASHED`]; the
/// file is cut to those when it held more.
fn crashed_list_read(list: &Path) -> Vec<PathBuf> {
    let bytes = match std::fs::read(list) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(error = %e, list = %list.display(), "the list of model libraries the sidecar died in cannot be read");
            return Vec::new();
        }
    };
    let lines: Vec<&[u8]> = bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let mut kept: Vec<&[u8]> = Vec::new();
    for l in lines.iter().rev() {
        if kept.len() < MAX_CRASHED && !kept.contains(l) {
            kept.push(l);
        }
    }
    kept.reverse();
    if kept.len() < lines.len() {
        let mut text = kept.join(&b'\n');
        text.push(b'\n');
        if let Err(e) = crate::durable::write_atomic(list, &text) {
            tracing::warn!(error = %e, list = %list.display(), "the list of model libraries the sidecar died in was not cut");
        }
    }
    kept.into_iter().map(bytes_path).collect()
}

/// Default of [`ModelHost::with_load_timeout`].
pub const DEFAULT_LOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// What `GET /api/models` shows of a slot.
#[derive(Debug, Serialize)]
pub struct SlotView {
    /// Serving model, if any.
    pub serving: Option<ModelView>,
    /// The last refused library and why.
    pub refused: Option<(String, String)>,
    /// Models swapped in since start.
    pub loads: u64,
    /// Libraries refused since start.
    pub rejected: u64,
    /// Features per row the module is configured for.
    pub n_features: u32,
    /// Whether the module has a model (a link was seen since start): while none
    /// serves, its opportunities are not scored (`no_score`).
    pub linked: bool,
    /// Last swaps and refusals, oldest first.
    pub history: Vec<SwapEvent>,
}

/// A serving model, as `GET /api/models` shows it (the model's own serialization).
#[derive(Debug)]
pub struct ModelView(pub Arc<Model>);

impl Serialize for ModelView {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl ModelHost {
    /// A host over `dir`; `n_features(module)` is what the module is configured
    /// to feed. Nothing loaded yet.
    pub fn new(dir: &Path, n_features: impl Fn(&str) -> u32, policy: LoadPolicy) -> ModelHost {
        let loads = Family::<ModuleLabel, Counter>::default();
        let slot = |module: &'static str, stem| {
            let label = ModuleLabel { module };
            Slot {
                module,
                stem,
                n_features: n_features(module),
                current: ArcSwapOption::empty(),
                linked: AtomicBool::new(false),
                link_lost: AtomicBool::new(false),
                link_seen: AtomicBool::new(false),
                refused: Mutex::new(None),
                serving_target: Mutex::new(None),
                last_target: Mutex::new(None),
                history: Mutex::new(VecDeque::with_capacity(HISTORY)),
                unrecorded: Mutex::new(None),
                owed: Mutex::new(VecDeque::new()),
                owed_dropped: AtomicU64::new(0),
                // A family's counter is shared: the slot and the family count as one.
                loads: loads.get_or_create(&label).clone(),
                rejected: AtomicU64::new(0),
            }
        };
        let slots = vec![slot("mev", "mev"), slot("arbitrage", "arb")];
        // Every (module, reason) from the start, at zero: alerts see a series.
        let rejected = Family::<RejectLabel, Counter>::default();
        for s in &slots {
            for reason in LoadError::REASONS {
                drop(rejected.get_or_create(&RejectLabel {
                    module: s.module,
                    reason,
                }));
            }
        }
        ModelHost {
            dir: dir.to_path_buf(),
            policy,
            audit: Auditor::default(),
            slots,
            loads,
            rejected,
            loaded: Mutex::new(HashMap::new()),
            load_timeout: DEFAULT_LOAD_TIMEOUT,
            marker: None,
            crashed: Vec::new(),
            stuck: Arc::new(Mutex::new(None)),
            retired: Mutex::new(Vec::new()),
            releasing: Arc::default(),
            release_capped: AtomicBool::new(false),
        }
    }

    /// Releases every retired model nobody else holds any more (a count of one:
    /// this list's) and whose file no link names, each on a thread of its own
    /// ([`MAX_RELEASING`] at once; the rest at a later look). A look that loads
    /// the same file again before the thread let go takes it up through
    /// `loaded` and serves it on (nothing is released then).
    fn reap(&self) {
        let mut retired = self.retired.lock();
        if retired.is_empty() {
            return;
        }
        // A file a link names again (a rollback) is about to be served again
        // from memory: its model is not released under it.
        let named: std::collections::HashSet<(u64, u64)> = self
            .slots
            .iter()
            .filter_map(|s| std::fs::metadata(s.link(&self.dir)).ok())
            .map(|m| super::library::file_id(&m))
            .collect();
        let mut i = 0;
        let mut capped = false;
        while i < retired.len() {
            if Arc::strong_count(&retired[i]) > 1 || named.contains(&retired[i].file) {
                i += 1;
                continue;
            }
            if self.releasing.load(Ordering::Acquire) >= MAX_RELEASING {
                capped = true;
                i += 1;
                continue;
            }
            let m = retired.swap_remove(i);
            self.releasing.fetch_add(1, Ordering::AcqRel);
            let releasing = self.releasing.clone();
            let started = std::thread::Builder::new()
                .name("gw-model-release".into())
                .spawn(move || {
                    drop(m);
                    releasing.fetch_sub(1, Ordering::AcqRel);
                });
            if let Err(e) = started {
                // `spawn` dropped the closure, and the model with it, here.
                self.releasing.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!(error = %e, "no thread to release a swapped-out model: released by the watcher");
            }
        }
        // Said once while it lasts: releases that do not return hold every
        // later one (and its library's file, `still_mapped`).
        if capped != self.release_capped.swap(capped, Ordering::Relaxed) && capped {
            tracing::warn!(
                running = MAX_RELEASING,
                waiting = retired.len(),
                "model releases still running hold swapped-out models back (a library whose release does not return?)"
            );
        }
    }

    /// The live model of `target` for a slot fed `n_features`, or a fresh load.
    /// Opening and checking a library may take at most `t` (a library whose
    /// `init` or `predict` hangs is refused, `timeout`, instead of holding the
    /// watcher, and the sidecar's start, for good).
    #[must_use]
    pub fn with_load_timeout(mut self, t: Duration) -> ModelHost {
        self.load_timeout = t;
        self
    }

    /// Records every swap and refusal in the ledger through `audit` (stage
    /// `models`, action `swap`, the link's owner as the requester): a model is
    /// swapped in only once its row is durable.
    #[must_use]
    pub fn with_audit(mut self, audit: Auditor) -> ModelHost {
        self.audit = audit;
        self
    }

    /// The ledger row of a swap or refusal in `s`, of the link `owner` placed
    /// (read when the link was: a row written later — after a long load, or
    /// owed — named whoever owned the link then): why it could not be made
    /// durable, if it could not.
    fn audit_event(
        &self,
        s: &Slot,
        link: &Path,
        owner: &str,
        decision: Decision,
        reason: &str,
        note: serde_json::Value,
    ) -> Result<(), String> {
        let owner = owner.to_owned();
        let link = link.display().to_string();
        let event = ModelEvent {
            module: s.module,
            decision,
            reason,
            link: &link,
            owner,
            note,
        };
        self.audit.record_model(&event).map_err(|e| e.to_string())
    }

    /// Writes a refusal's row (decision `rejected`, code `reason`); one the
    /// ledger cannot take now is owed, written at a later look (after those owed
    /// before it).
    fn refusal_row(
        &self,
        s: &Slot,
        link: &Path,
        owner: &str,
        reason: &'static str,
        note: serde_json::Value,
        log: &mut Vec<String>,
    ) {
        let mut owed = s.owed.lock();
        if owed.is_empty() {
            match self.audit_event(s, link, owner, Decision::Rejected, reason, note.clone()) {
                Ok(()) => return,
                Err(why) => log.push(format!(
                    "model {}: the ledger cannot record this refusal now ({why}): it is written at a later look",
                    s.module
                )),
            }
        }
        if owed.len() >= MAX_OWED {
            owed.pop_front();
            let dropped = s.owed_dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(module = s.module, dropped, "model refusal rows owed beyond the bound: the oldest is dropped (counted in the next row)");
        }
        // The row is written later: it says when the refusal happened.
        let mut note = note;
        note["refused_at_ms"] = (crate::now_nanos() / 1_000_000).into();
        owed.push_back((link.to_path_buf(), owner.to_owned(), reason, note));
    }

    /// Writes the refusal rows `s` owes, oldest first, until the ledger refuses
    /// one (it stays, with those after it; said when it was first owed).
    fn pay_owed(&self, s: &Slot, log: &mut Vec<String>) {
        let mut owed = s.owed.lock();
        let mut paid = 0usize;
        while let Some((link, owner, reason, mut note)) = owed.front().cloned() {
            let dropped = s.owed_dropped.load(Ordering::Relaxed);
            if dropped > 0 {
                note["rows_not_recorded"] = dropped.into();
            }
            note["recorded_late"] = true.into();
            match self.audit_event(s, &link, &owner, Decision::Rejected, reason, note) {
                Ok(()) => {
                    s.owed_dropped.fetch_sub(dropped, Ordering::Relaxed);
                    owed.pop_front();
                    paid += 1;
                }
                Err(_) => return,
            }
        }
        if paid > 0 {
            log.push(format!(
                "model {}: {paid} refusal rows the ledger could not take before are recorded",
                s.module
            ));
        }
    }

    /// Keeps a crash marker at `path` (under the state directory), and beside it
    /// the list of libraries a process died inside ([`CRASHED_LIST`]): a library
    /// whose code crashes the process (a segfault or an abort in `init`, the
    /// checks, or a `predict` on the hot path) is refused at every later start
    /// (`crashed`) instead of taking the process down again; one the last process
    /// ended inside without such a signal (killed, or stopped while a load hung)
    /// is refused at this start only, as the marker says.
    #[must_use]
    pub fn with_crash_marker(mut self, path: PathBuf) -> ModelHost {
        let list = path.with_file_name(CRASHED_LIST);
        match std::fs::read(&path) {
            Ok(named) => {
                let named = bytes_path(named.strip_suffix(b"\n").unwrap_or(&named));
                if !named.as_os_str().is_empty() {
                    tracing::error!(library = %named.display(), "the last process died loading this model library: it is refused at this start");
                    self.crashed.push(named);
                }
                // Read: it says nothing of later starts (a load refused as
                // `crashed` never rewrites it, so it would otherwise stay).
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(error = %e, marker = %path.display(), "the model crash marker was not removed");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(error = %e, marker = %path.display(), "the model crash marker cannot be read");
            }
        }
        let listed = crashed_list_read(&list);
        for p in &listed {
            tracing::error!(library = %p.display(), list = %list.display(), "the sidecar died inside this model library (loading it or in its predict): it is refused while a link names it");
        }
        self.crashed.extend(listed);
        if let Err(e) = super::crash_note::install(&list) {
            tracing::warn!(error = %e, "a crash inside a model library will not name it");
        }
        self.marker = Some(path);
        self
    }

    fn load(&self, target: &Path, n_features: u32) -> Result<Arc<Model>, super::LoadError> {
        let shown = target.display().to_string();
        // A link may point anywhere: only a library in the models directory is
        // opened (a link to a system library would run its initialisers here).
        match std::fs::canonicalize(&self.dir) {
            Ok(dir) if target.parent() == Some(dir.as_path()) => {}
            Ok(dir) => {
                return Err(super::LoadError::Untrusted(
                    shown,
                    format!("not in the models directory {}", dir.display()),
                ))
            }
            Err(e) => return Err(super::LoadError::Open(shown, e.to_string())),
        }
        if self.crashed.iter().any(|p| p == target) {
            return Err(super::LoadError::Crashed(shown));
        }
        let file = std::fs::metadata(target)
            .map(|m| super::library::file_id(&m))
            .map_err(|e| super::LoadError::Open(shown.clone(), e.to_string()))?;
        {
            let mut loaded = self.loaded.lock();
            loaded.retain(|_, m| m.strong_count() > 0);
            if let Some(m) = loaded.get(&file).and_then(Weak::upgrade) {
                // Served as it is, or refused for what it is: a file is open once.
                if m.n_features == n_features {
                    return Ok(m);
                }
                return Err(super::LoadError::Features {
                    path: shown,
                    got: m.n_features,
                    want: n_features,
                });
            }
        }
        // Cheap, before a loader thread and the marker: `Model::load` checks again.
        if let Some(why) = super::library::still_mapped(file) {
            return Err(super::LoadError::StillMapped(shown, why));
        }
        if let Some(p) = self.stuck.lock().as_ref() {
            return Err(super::LoadError::LoaderStuck(
                shown,
                p.display().to_string(),
            ));
        }
        if let Some(m) = &self.marker {
            // Written before the library's code runs; a process crash keeps it. The
            // loader thread removes it once the library's code has returned.
            if let Err(e) = std::fs::write(m, super::library::path_line(target)) {
                tracing::warn!(error = %e, "model crash marker not written");
            }
        }
        // On a thread of its own, waited for with a deadline: the library's code
        // runs there (init, the self-test, the golden rows).
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        // Disconnected once the loader thread has ended.
        let (ended_tx, ended) = std::sync::mpsc::sync_channel::<()>(0);
        let (path, policy) = (target.to_path_buf(), self.policy.clone());
        let (stuck, marker) = (self.stuck.clone(), self.marker.clone());
        let started = std::time::Instant::now();
        std::thread::Builder::new()
            .name("gw-model-load".into())
            .spawn(move || {
                let _ended = ended_tx;
                // A library refused after its `init` ran is let go after the
                // answer, as one nobody waits for: its `release` may hang.
                let (r, refused) = match Model::load_or_refused(&path, n_features, policy) {
                    Ok(m) => (Ok(m), None),
                    Err((e, refused)) => (Err(e), refused),
                };
                // Under the lock the waiter takes when it gives up: it then sees
                // either this answer or a loader still inside the library.
                let mut st = stuck.lock();
                let gave_up = st.as_deref() == Some(path.as_path());
                if gave_up {
                    *st = None;
                    tracing::warn!(library = %path.display(), "the timed-out model library returned at last");
                }
                if let Some(m) = &marker {
                    let _ = std::fs::remove_file(m);
                }
                // Sent under the lock, unless the waiter gave up: a model nobody
                // waits for any more is let go here, after the lock (its
                // `release` may hang, and every later load takes the lock; sent,
                // it would be let go by whoever drops the channel).
                let unwanted = if gave_up { Some(r) } else { tx.send(r).err().map(|e| e.0) };
                drop(st);
                drop(unwanted);
                drop(refused);
            })
            .map_err(|e| super::LoadError::Open(shown.clone(), format!("no loader thread: {e}")))?;
        let answer = rx.recv_timeout(self.load_timeout).or_else(|why| {
            if why == std::sync::mpsc::RecvTimeoutError::Disconnected {
                // The loader ended without an answer (it panicked): not inside
                // the library any more, nothing is stuck.
                return Err(super::LoadError::Open(
                    shown.clone(),
                    "the loader thread ended without an answer".to_owned(),
                ));
            }
            let mut st = self.stuck.lock();
            // An answer that came between the deadline and this lock is taken.
            rx.try_recv().map_err(|_| {
                // Still inside the library: no other is loaded (nor the marker
                // rewritten) until it returns; a crash it ends in names it.
                *st = Some(target.to_path_buf());
                let ms = u64::try_from(self.load_timeout.as_millis()).unwrap_or(u64::MAX);
                super::LoadError::Timeout(shown, ms)
            })
        });
        if let Ok(Err(e)) = &answer {
            // Refused after its `init` ran, it is being let go on the loader
            // thread: waited for within the deadline, so that its file is free
            // at the next look; a `release` that hangs is left to that thread.
            let left = self.load_timeout.saturating_sub(started.elapsed());
            if ended.recv_timeout(left) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                tracing::warn!(library = %target.display(), refused = %e, "a refused model library's release has not returned: its file waits (still_mapped) until it does");
            }
        }
        let m = Arc::new(answer??);
        // Known by the file it was read from (a file renamed over the path since
        // the look above is not cached under the old one's inode).
        self.loaded.lock().insert(m.file, Arc::downgrade(&m));
        Ok(m)
    }

    /// `modules` are scored by their model alone from the start
    /// (`models.required`): while none serves — its link not placed yet, the
    /// directory empty or not mounted after a restart — their opportunities are
    /// not sent, never scored by their own `ev`. Unknown names are ignored (the
    /// configuration checks them).
    pub fn requiring(self, modules: &[String]) -> ModelHost {
        for s in &self.slots {
            if modules.iter().any(|m| m == s.module) {
                s.linked.store(true, Ordering::Release);
            }
        }
        self
    }

    /// Registers `gw_sidecar_model_loads_total{module}` and
    /// `gw_sidecar_model_rejected_total{module,reason}`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "gw_sidecar_model_loads",
            "Models swapped in, by module",
            self.loads.clone(),
        );
        registry.register(
            "gw_sidecar_model_rejected",
            "Model libraries refused (the old model kept serving), by module and reason",
            self.rejected.clone(),
        );
    }

    /// The modules with a slot.
    pub fn modules(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.slots.iter().map(|s| s.module)
    }

    /// The slot of `module`.
    pub fn slot(&self, module: &str) -> Option<&Slot> {
        self.slots.iter().find(|s| s.module == module)
    }

    /// The serving model of `module` (hold the `Arc` for the whole prediction).
    pub fn current(&self, module: &str) -> Option<Arc<Model>> {
        self.slot(module).and_then(|s| s.current.load_full())
    }

    /// Whether `module` has a model, serving or not ([`Slot::linked`]).
    pub fn linked(&self, module: &str) -> bool {
        self.slot(module).is_some_and(Slot::linked)
    }

    /// Scores `rows` with the model serving `module` into `out` (`n_outputs` per
    /// row), without taking a reference count or allocating (what `bench models`
    /// measures; the hot path's `score` holds the model's `Arc` for a batch and
    /// allocates the batch's rows and scores, once per batch).
    /// The model stays loaded for the call (arc-swap's guard).
    pub fn predict_into(
        &self,
        module: &str,
        rows: &[f32],
        out: &mut [f32],
    ) -> Result<(), super::PredictError> {
        let slot = self.slot(module).ok_or(super::PredictError::NoModel)?;
        let guard = slot.current.load();
        let model = guard.as_ref().ok_or(super::PredictError::NoModel)?;
        model.predict_into(rows, out, false)
    }

    /// Checks every `lib<stem>_latest.so` once: a changed link target is loaded and,
    /// if it passes every check, swapped in. Returns the log lines of what happened.
    pub fn poll(&self) -> Vec<String> {
        self.reap();
        let mut log = Vec::new();
        for s in &self.slots {
            self.pay_owed(s, &mut log);
        }
        // A models directory that is not there (a volume not mounted, a path
        // mistyped) cannot say a module has no model either.
        // (A directory named by a dangling link is not there either.)
        let dir_missing = matches!(
            std::fs::metadata(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound
        );
        for s in &self.slots {
            let link = s.link(&self.dir);
            // The link itself (even dangling: a deploy that links before the file
            // is there) says the module has a model; so does a directory that
            // cannot be read, or is not there (it cannot say the module has
            // none).
            let meta = std::fs::symlink_metadata(&link);
            let not_there = matches!(&meta, Err(e) if e.kind() == std::io::ErrorKind::NotFound);
            if !not_there || dir_missing {
                s.linked.store(true, Ordering::Release);
            }
            if meta.is_ok() {
                s.link_seen.store(true, Ordering::Release);
            }
            // Who placed the link, as it is now (the row's requester).
            let owner = {
                use std::os::unix::fs::MetadataExt as _;
                meta.map_or(String::new(), |m| format!("uid:{}", m.uid()))
            };
            let target = match std::fs::canonicalize(&link) {
                Ok(t) => t,
                Err(e) => {
                    // No link yet: nothing to serve. A link gone or dangling after
                    // one was seen changes nothing (the model serving goes on; none
                    // serving, the module still scores nothing): said once.
                    let lost = s.link_seen.load(Ordering::Acquire) || !not_there;
                    if s.linked() && lost && !s.link_lost.swap(true, Ordering::AcqRel) {
                        let kept = s.serving_version();
                        log.push(format!(
                            "model {}: {} is gone or dangling ({e}); still serving {kept} (point the link at another build to change it)",
                            s.module,
                            link.display()
                        ));
                        s.record(&link, "link_lost", e.to_string());
                        let note = serde_json::json!({"detail": e.to_string(), "serving": kept});
                        self.refusal_row(s, &link, &owner, "link_lost", note, &mut log);
                    }
                    continue;
                }
            };
            s.linked.store(true, Ordering::Release);
            s.link_lost.store(false, Ordering::Release);
            // A model loaded and checked before, whose row the ledger could not take
            // then: only its row is tried again. Once the link names another it is
            // let go where retired models are (its `release` never runs on this
            // thread: one that hung would stop every later swap).
            let kept = s.unrecorded.lock().take();
            let waiting = match kept {
                Some((t, m, _)) if t != target => {
                    self.retired.lock().push(m);
                    None
                }
                kept => kept,
            };
            let relinked = s.last_target.lock().replace(target.clone()).as_ref() != Some(&target);
            if s.serving_target.lock().as_ref() == Some(&target) {
                continue;
            }
            // Not held while the library loads: `view` (GET /api/models) reads it.
            // A refusal of a kind that passes is tried again, and said again only
            // when it changes; any other only once the link changed (named the
            // serving build meanwhile, say: tried, and its row written, again).
            let refused_before = match s.refused.lock().as_ref() {
                Some((p, _, false)) if *p == target && !relinked => continue,
                Some((p, why, true)) if *p == target => Some(why.clone()),
                _ => None,
            };
            // Said when it was first kept.
            let said = waiting.is_some();
            let (loaded, owner) = match waiting {
                Some((_, m, then)) => (Ok(m), then),
                None => (self.load(&target, s.n_features), owner),
            };
            match loaded {
                Ok(m) => {
                    let note = serde_json::json!({
                        "path": target.display().to_string(), "sha256": m.sha256,
                        "name": m.name, "version": m.version, "abi": m.abi,
                        "verified": m.golden.is_some(),
                    });
                    if let Err(why) =
                        self.audit_event(s, &link, &owner, Decision::Applied, "", note)
                    {
                        // Not served unrecorded: kept, its row tried at each look.
                        if !said {
                            log.push(format!(
                                "model {}: {} {} passed every check, but the ledger cannot record its swap ({why}); still serving {} until it can",
                                s.module,
                                m.name,
                                m.version,
                                s.serving_version()
                            ));
                        }
                        *s.unrecorded.lock() = Some((target, m, owner));
                        continue;
                    }
                    let verified = m.golden.as_ref().map_or_else(
                        || "UNVERIFIED (no golden vectors; models.allow_unverified)".to_string(),
                        |g| {
                            format!(
                                "{} golden rows match (largest relative difference {:.1e})",
                                g.rows, g.worst
                            )
                        },
                    );
                    log.push(format!(
                        "model {}: serving {} {} (ABI v{}, {}, {}) from {} (sha256 {}); {verified}",
                        s.module,
                        m.name,
                        m.version,
                        m.abi,
                        m.trainer,
                        m.leaf_type,
                        target.display(),
                        m.sha256
                    ));
                    s.record(
                        &target,
                        "served",
                        format!("{} sha256 {}", m.version, m.sha256),
                    );
                    // The model swapped out waits for its last user elsewhere; one
                    // taken up again (its file named again before it was let go)
                    // is not retired any more.
                    let mut retired = self.retired.lock();
                    retired.retain(|r| !Arc::ptr_eq(r, &m));
                    if let Some(old) = s.current.swap(Some(m)) {
                        if !retired.iter().any(|r| Arc::ptr_eq(r, &old)) {
                            retired.push(old);
                        }
                    }
                    drop(retired);
                    *s.serving_target.lock() = Some(target.clone());
                    s.loads.inc();
                    *s.refused.lock() = None;
                }
                Err(e) if refused_before.as_deref() == Some(e.to_string().as_str()) => {}
                Err(e) => {
                    let kept = s.serving_version();
                    log.push(format!(
                        "model {}: refused [{}] ({e}); still serving {kept}",
                        s.module,
                        e.reason()
                    ));
                    s.rejected.fetch_add(1, Ordering::Relaxed);
                    self.rejected
                        .get_or_create(&RejectLabel {
                            module: s.module,
                            reason: e.reason(),
                        })
                        .inc();
                    s.record(&target, e.reason(), e.to_string());
                    let note = serde_json::json!({
                        "path": target.display().to_string(), "detail": e.to_string(),
                        "serving": kept,
                    });
                    self.refusal_row(s, &link, &owner, e.reason(), note, &mut log);
                    *s.refused.lock() = Some((target, e.to_string(), e.retried()));
                }
            }
        }
        log
    }

    /// What serves each module.
    pub fn view(&self) -> Vec<(&'static str, SlotView)> {
        self.slots
            .iter()
            .map(|s| {
                let serving = s.current.load_full().map(ModelView);
                let refused = s
                    .refused
                    .lock()
                    .as_ref()
                    .map(|(p, e, _)| (p.display().to_string(), e.clone()));
                (
                    s.module,
                    SlotView {
                        serving,
                        refused,
                        loads: s.loads.get(),
                        rejected: s.rejected(),
                        n_features: s.n_features,
                        linked: s.linked(),
                        history: s.history.lock().iter().cloned().collect(),
                    },
                )
            })
            .collect()
    }

    /// Polls every `period` forever, logging changes (run as a task).
    pub async fn watch(self: Arc<Self>, period: Duration) {
        loop {
            let host = self.clone();
            if let Ok(lines) = tokio::task::spawn_blocking(move || host.poll()).await {
                for l in lines {
                    tracing::info!("{l}");
                }
            }
            tokio::time::sleep(period).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crashed_list_keeps_each_library_once_and_the_newest() {
        let d = std::env::temp_dir().join(format!("gw-crashed-list-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let list = d.join(CRASHED_LIST);
        let _ = std::fs::remove_file(&list);
        assert!(
            crashed_list_read(&list).is_empty(),
            "no list: nothing refused"
        );
        let mut text: String = (0..70).map(|i| format!("/m/lib{i}.so\n")).collect();
        text.push_str("/m/lib3.so\n");
        std::fs::write(&list, text).unwrap();
        let kept = crashed_list_read(&list);
        assert_eq!(kept.len(), MAX_CRASHED);
        assert_eq!(
            kept.last(),
            Some(&PathBuf::from("/m/lib3.so")),
            "newest last"
        );
        assert_eq!(kept.first(), Some(&PathBuf::from("/m/lib7.so")));
        // Cut to those, so the list stays bounded on disk too.
        let text = std::fs::read_to_string(&list).unwrap();
        assert_eq!(text.lines().count(), MAX_CRASHED);
        assert_eq!(crashed_list_read(&list), kept);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
