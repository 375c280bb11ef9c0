//! `GET /readyz`: whether this sidecar takes commands now, and what is degraded.
//!
//! `/healthz` says the process answers; `/readyz` says whether a command sent
//! now could be accepted: 200 when it could, 503 when something refuses every
//! command (the journal cannot write, the Kafka outbox is full, the ledger's
//! chain is not known yet), with each check and why in the body. A check that
//! is wrong without refusing commands (ClickHouse away: rows wait in the
//! journal) makes the answer `degraded`, still 200.

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

/// How long a try of the journal's disk is believed (while the journal's
/// failures do not change).
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// How long a try of the journal's disk may take before it counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The last try of the journal's disk.
struct Tried {
    at: Instant,
    /// The journal's failed batches then ([`crate::journal::JournalStats::failures`]).
    failures: u64,
    result: Result<(), String>,
}

/// What `/readyz` looks at.
pub struct Readiness {
    journal: Journal,
    bus: Bus,
    ledger: Option<Arc<RowQueue>>,
    /// The last try of the journal's disk, while its last write failed.
    tried: tokio::sync::Mutex<Option<Tried>>,
    /// A try is running (it may hang on a stuck device: none is started
    /// beside it).
    trying: Arc<std::sync::atomic::AtomicBool>,
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
}

impl Check {
    fn ok(name: &'static str) -> Check {
        Check {
            name,
            ok: true,
            refusing: false,
            detail: None,
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
            tried: tokio::sync::Mutex::new(None),
            trying: Arc::default(),
        }
    }

    /// Every check, now.
    pub async fn checks(&self) -> Vec<Check> {
        let mut checks = vec![self.journal_check().await];
        checks.push(match self.bus.outbox_full() {
            Some(why) => Check {
                name: "bus",
                ok: false,
                refusing: true,
                detail: Some(why),
            },
            None => Check::ok("bus"),
        });
        if let Some(q) = &self.ledger {
            checks.push(match q.shipping() {
                None => Check::ok("ledger"),
                Some(s) if s.refusing => Check {
                    name: "ledger",
                    ok: false,
                    refusing: true,
                    detail: Some(s.detail),
                },
                Some(s) => Check {
                    name: "ledger",
                    ok: false,
                    refusing: false,
                    detail: Some(format!(
                        "{} rows wait in the journal: {}{}",
                        q.len(),
                        s.detail,
                        if s.needs_operator {
                            " (nothing ships until an operator acts)"
                        } else {
                            ""
                        }
                    )),
                },
            });
        }
        checks
    }

    /// The journal: refusing when its writer no longer writes, or when its
    /// last batch failed and its disk still fails a write and sync of
    /// [`PROBE_FILE`] within [`PROBE_TIMEOUT`] (tried at most once a second
    /// while no other batch fails, one try at a time). The journal writes only
    /// when asked, so a disk healed since its last failure is found by the try,
    /// not by waiting for a command.
    async fn journal_check(&self) -> Check {
        use std::sync::atomic::Ordering;
        if self.journal.stopped() {
            return Check {
                name: "journal",
                ok: false,
                refusing: true,
                detail: Some(
                    "the journal's writer no longer writes (the sidecar is stopping, or its thread ended)"
                        .into(),
                ),
            };
        }
        let stats = self.journal.stats();
        if !stats.failing.load(Ordering::Acquire) {
            return Check::ok("journal");
        }
        let failure = stats.last_failure.lock().clone();
        let failures = stats.failures.load(Ordering::Acquire);
        let result = match tokio::time::timeout(PROBE_TIMEOUT, self.tried.lock()).await {
            Err(_) => Err("another look at its disk has not returned".to_owned()),
            Ok(mut tried) => {
                let fresh = tried
                    .as_ref()
                    .filter(|t| t.failures == failures && t.at.elapsed() < PROBE_EVERY)
                    .map(|t| t.result.clone());
                match fresh {
                    Some(r) => r,
                    None => {
                        let r = self.try_disk().await;
                        *tried = Some(Tried {
                            at: Instant::now(),
                            failures,
                            result: r.clone(),
                        });
                        r
                    }
                }
            }
        };
        match result {
            Ok(()) => Check {
                name: "journal",
                ok: true,
                refusing: false,
                detail: Some(format!(
                    "its last write failed ({failure}); its disk takes a write and a sync again"
                )),
            },
            Err(e) => Check {
                name: "journal",
                ok: false,
                refusing: true,
                detail: Some(format!(
                    "its last write failed ({failure}) and its disk still fails ({e}): commands are refused (503)"
                )),
            },
        }
    }
}

impl Readiness {
    /// Writes and syncs [`PROBE_FILE`] off the runtime's workers, waiting at
    /// most [`PROBE_TIMEOUT`]; no new try while an earlier one has not
    /// returned (a stuck device).
    async fn try_disk(&self) -> Result<(), String> {
        use std::sync::atomic::Ordering;
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
        match tokio::time::timeout(PROBE_TIMEOUT, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "a write and sync of its disk took more than {} ms",
                PROBE_TIMEOUT.as_millis()
            )),
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
/// accepted, 503 `{"ready": false, …}` when not; `degraded` when a check is
/// wrong without refusing commands; every check with its detail.
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
