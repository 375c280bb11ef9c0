//! `GET /readyz`: whether this sidecar takes commands now, and what is degraded.
//!
//! `/healthz` says the process answers; `/readyz` says whether a command sent
//! now could be accepted: 200 when it could, 503 when something refuses every
//! command (the journal cannot write, the Kafka outbox is full, the ledger's
//! chain is not known yet), with each check and why in the body. A check that
//! is wrong without refusing commands (ClickHouse away: rows wait in the
//! journal) makes the answer `degraded`, still 200. It answers within about a
//! second whatever the disk does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;

use crate::control::bus::Bus;
use crate::journal::Journal;
use crate::ledger::ship::RowQueue;

/// Name of the file the journal's disk is tried with, in its directory.
pub const PROBE_FILE: &str = ".ready-probe";

/// How long a try of the journal's disk is believed (while no other batch
/// fails).
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The most the journal's check waits: for another check's try of the disk,
/// then for its own.
const JOURNAL_CHECK_BOUND: Duration = Duration::from_millis(800);

/// A batch written for longer than this makes the journal refusing (a hung
/// device holds every commit behind it).
const WRITE_HUNG: Duration = Duration::from_secs(1);

/// What the journal's check knows of its disk since its last failed batch.
#[derive(Default)]
struct Disk {
    /// The last try: when, at which counts of failed and written batches, and
    /// its result.
    tried: Option<Tried>,
    /// A batch failed after a try found the disk writable: the try's file is
    /// not the journal's segment (a full preallocation, an error on that file
    /// only), so only a batch written clears it.
    distrusted: bool,
}

/// A try of the journal's disk.
struct Tried {
    at: Instant,
    failures: u64,
    batches: u64,
    result: Result<(), String>,
}

/// What `/readyz` looks at.
pub struct Readiness {
    journal: Journal,
    bus: Bus,
    ledger: Option<Arc<RowQueue>>,
    disk: tokio::sync::Mutex<Disk>,
    /// A try of the disk is running (it may hang on a stuck device: none is
    /// started beside it).
    trying: Arc<AtomicBool>,
}

/// One check as `/readyz` answers it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Check {
    /// `journal`, `bus`, `ledger`.
    pub name: &'static str,
    /// Nothing wrong.
    pub ok: bool,
    /// Commands are refused while it is wrong.
    pub refusing: bool,
    /// What is wrong, or what was and is no longer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// `ledger`: rows waiting for ClickHouse, while they are not reaching it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    /// `ledger`: nothing ships until an operator acts (ClickHouse holds more
    /// of the chain, or rows that are not this node's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub needs_operator: Option<bool>,
}

impl Check {
    fn ok(name: &'static str) -> Check {
        Check {
            name,
            ok: true,
            refusing: false,
            detail: None,
            rows: None,
            needs_operator: None,
        }
    }

    fn wrong(name: &'static str, refusing: bool, detail: String) -> Check {
        Check {
            ok: false,
            refusing,
            detail: Some(detail),
            ..Check::ok(name)
        }
    }
}

impl Readiness {
    /// Readiness over the sidecar's journal, bus and ledger queue (`None`: no
    /// ClickHouse configured).
    pub fn new(journal: Journal, bus: Bus, ledger: Option<Arc<RowQueue>>) -> Readiness {
        Readiness {
            journal,
            bus,
            ledger,
            disk: tokio::sync::Mutex::default(),
            trying: Arc::default(),
        }
    }

    /// Every check, now.
    pub async fn checks(&self) -> Vec<Check> {
        let mut checks = vec![self.journal_check().await];
        checks.push(match self.bus.outbox_full() {
            Some(why) => Check::wrong("bus", true, why),
            None => Check::ok("bus"),
        });
        if let Some(q) = &self.ledger {
            checks.push(match q.shipping() {
                None => Check::ok("ledger"),
                Some(s) if s.refusing => Check::wrong("ledger", true, s.detail),
                Some(s) => {
                    // The gauge, not the queue: its lock may be held across a
                    // read of the journal.
                    let rows = u64::try_from(q.pending_gauge().get()).unwrap_or(0);
                    Check {
                        rows: Some(rows),
                        needs_operator: Some(s.needs_operator),
                        ..Check::wrong(
                            "ledger",
                            false,
                            format!("rows are not reaching ClickHouse: {}", s.detail),
                        )
                    }
                }
            });
        }
        checks
    }

    /// The journal: refusing when its writer no longer writes, when a batch
    /// has been written for longer than [`WRITE_HUNG`], or when its last batch
    /// failed and its disk still fails a write and sync of [`PROBE_FILE`] (tried
    /// at most once a second while no other batch fails, one try at a time,
    /// within [`JOURNAL_CHECK_BOUND`]). The journal writes only when asked, so
    /// a disk healed since its last failure is found by the try, not by waiting
    /// for a command; a batch that fails after a try found the disk writable
    /// keeps it refusing until a batch is written.
    async fn journal_check(&self) -> Check {
        const NAME: &str = "journal";
        if self.journal.stopped() {
            return Check::wrong(
                NAME,
                true,
                "its writer no longer writes (the sidecar is stopping, or the writer's thread ended)"
                    .into(),
            );
        }
        if let Some(t) = self.journal.writing_for().filter(|t| *t > WRITE_HUNG) {
            return Check::wrong(
                NAME,
                true,
                format!(
                    "a batch has been written for {} ms (its disk does not answer): commands wait",
                    t.as_millis()
                ),
            );
        }
        let stats = self.journal.stats();
        let deadline = tokio::time::Instant::now() + JOURNAL_CHECK_BOUND;
        let Ok(mut disk) = tokio::time::timeout_at(deadline, self.disk.lock()).await else {
            return Check::wrong(
                NAME,
                true,
                "another look at its disk has not returned".into(),
            );
        };
        if !stats.failing.load(Ordering::Acquire) {
            *disk = Disk::default();
            return Check::ok(NAME);
        }
        let failure = stats.last_failure.lock().clone();
        let failures = stats.failures.load(Ordering::Acquire);
        let batches = stats.batches.load(Ordering::Acquire);
        if let Some(t) = &disk.tried {
            // Another batch failed, none was written, since the try said yes.
            if t.result.is_ok() && t.failures != failures && t.batches == batches {
                disk.distrusted = true;
            }
        }
        if disk.distrusted {
            return Check::wrong(
                NAME,
                true,
                format!(
                    "its last write failed ({failure}) after its disk took a write and a sync of another file: commands are refused (503) until a batch is written"
                ),
            );
        }
        let fresh = disk
            .tried
            .as_ref()
            .filter(|t| t.failures == failures && t.at.elapsed() < PROBE_EVERY)
            .map(|t| t.result.clone());
        let result = match fresh {
            Some(r) => r,
            None => {
                let result = self.try_disk(deadline).await;
                disk.tried = Some(Tried {
                    at: Instant::now(),
                    failures,
                    batches,
                    result: result.clone(),
                });
                result
            }
        };
        match result {
            Ok(()) => Check {
                detail: Some(format!(
                    "its last write failed ({failure}); its disk takes a write and a sync again"
                )),
                ..Check::ok(NAME)
            },
            Err(e) => Check::wrong(
                NAME,
                true,
                format!(
                    "its last write failed ({failure}) and its disk still fails ({e}): commands are refused (503)"
                ),
            ),
        }
    }

    /// Writes and syncs [`PROBE_FILE`] off the runtime's workers, waiting
    /// until `deadline` at most; no new try while an earlier one has not
    /// returned (a stuck device).
    async fn try_disk(&self, deadline: tokio::time::Instant) -> Result<(), String> {
        if self.trying.swap(true, Ordering::AcqRel) {
            return Err("an earlier write and sync of its disk has not returned".into());
        }
        let path = self.journal.dir().join(PROBE_FILE);
        let trying = self.trying.clone();
        let task = tokio::task::spawn_blocking(move || {
            let r = write_and_sync(&path);
            trying.store(false, Ordering::Release);
            r
        });
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("a write and sync of its disk did not return in time".into()),
        }
    }
}

/// Writes, syncs and removes `path`.
fn write_and_sync(path: &std::path::Path) -> Result<(), String> {
    use std::io::Write as _;
    let tried = (|| {
        let mut f = std::fs::File::create(path)?;
        f.write_all(b"ready?\n")?;
        f.sync_all()
    })();
    // Removed in any case (a failed sync may have left it).
    let removed = std::fs::remove_file(path);
    tried.map_err(|e| e.to_string())?;
    removed.map_err(|e| e.to_string())
}

/// `GET /readyz`: 200 `{"ready": true, …}` when a command sent now could be
/// accepted, 503 `{"ready": false, …}` when not; `degraded` when any check is
/// not ok; every check with its detail.
pub async fn readyz(State(r): State<Arc<Readiness>>) -> Response {
    let checks = r.checks().await;
    let ready = !checks.iter().any(|c| c.refusing);
    let degraded = checks.iter().any(|c| !c.ok);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({"ready": ready, "degraded": degraded, "checks": checks});
    (
        status,
        [(axum::http::header::CACHE_CONTROL, "no-store")],
        Json(body),
    )
        .into_response()
}
