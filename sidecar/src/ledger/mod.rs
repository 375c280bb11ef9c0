//! The audit ledger: every decision of every stage is sealed into one hash chain
//! ([`gw_core::ledger`]), fsynced to a local spool before anyone acts on it
//! ([`spool`], [`audit`]), shipped to ClickHouse in order by a background task,
//! and read back through `/api/ledger/*` ([`query`]).

pub mod audit;
pub mod checkpoint;
pub mod migrations;
pub mod query;
pub mod spool;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::routing::get;
use axum::{Json, Router};
use gw_core::Code;
use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;

pub use audit::{AuditError, Auditor, Entry};
use checkpoint::Checkpointer;
use query::{DecisionView, LedgerStatus, PolicyWindow, Queries};
use spool::{LedgerError, Spool};

use crate::error::ApiError;

/// The decisions table.
pub const TABLE: &str = "control_decisions";

/// The ledger of a running sidecar.
pub struct Ledger {
    auditor: Auditor,
    queries: Option<Queries>,
    checkpointer: Option<Checkpointer>,
}

/// How this node's chain is checkpointed.
pub struct CheckpointSettings {
    /// The ledger key (`GW_LEDGER_SK_HEX`); no checkpoints without it.
    pub key: Option<ed25519_dalek::SigningKey>,
    /// A checkpoint after this many rows.
    pub every_rows: u64,
    /// …or this long, when rows were added.
    pub every: Duration,
}

impl Ledger {
    /// Opens chain `chain_id`'s spool under `dir` and ships it to `clickhouse`
    /// (`None`: nothing is recorded; development only). Registers
    /// `gw_sidecar_ledger_pending_rows`.
    pub fn open(
        dir: &Path,
        chain_id: &str,
        clickhouse: Option<&clickhouse::Client>,
        checkpoints: CheckpointSettings,
        registry: &mut Registry,
    ) -> Result<Ledger, LedgerError> {
        let Some(client) = clickhouse else {
            tracing::warn!("no clickhouse_url: decisions are NOT audited (development only)");
            return Ok(Ledger {
                auditor: Auditor::default(),
                queries: None,
                checkpointer: None,
            });
        };
        let checkpointer = match checkpoints.key {
            Some(k) => Some(Checkpointer::new(
                k,
                dir,
                checkpoints.every_rows,
                checkpoints.every,
            )),
            None => {
                tracing::warn!("no ledger key (GW_LEDGER_SK_HEX): the chain is not checkpointed");
                None
            }
        };
        let spool = Spool::open(dir, client.clone(), TABLE, chain_id)?;
        let pending = Gauge::default();
        pending.set(i64::try_from(spool.pending()).unwrap_or(i64::MAX));
        registry.register(
            "gw_sidecar_ledger_pending_rows",
            "Ledger rows in the spool not yet acknowledged by ClickHouse",
            pending.clone(),
        );
        Ok(Ledger {
            auditor: Auditor::new(Some(Arc::new(Mutex::new(spool))), Some(pending)),
            queries: Some(Queries::new(client.clone(), TABLE)),
            checkpointer,
        })
    }

    /// Where every capability records its decisions.
    pub fn auditor(&self) -> Auditor {
        self.auditor.clone()
    }

    /// Starts shipping the spool (and checkpoints) to ClickHouse, after applying
    /// the migrations.
    pub fn start(&mut self) -> Option<JoinHandle<()>> {
        let spool = self.auditor.spool()?.clone();
        let queries = self.queries.clone()?;
        let auditor = self.auditor.clone();
        Some(tokio::spawn(ship_forever(
            spool,
            queries.client().clone(),
            auditor,
            self.checkpointer.take(),
        )))
    }

    /// `/api/ledger/*`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/api/ledger/history", get(history))
            .route("/api/ledger/request/{request_id}", get(by_request))
            .route("/api/ledger/policy-frequency", get(policy_frequency))
            .route("/api/ledger/verify", get(verify))
            .with_state(self.queries.clone())
    }
}

type Q = State<Option<Queries>>;

fn queries(q: Option<Queries>) -> Result<Queries, ApiError> {
    q.ok_or(ApiError::new(
        Code::Unavailable,
        "no audit ledger configured (clickhouse_url)",
    ))
}

async fn history(State(q): Q) -> Result<Json<Vec<DecisionView>>, ApiError> {
    Ok(Json(queries(q)?.history().await?))
}

async fn by_request(
    State(q): Q,
    UrlPath(request_id): UrlPath<String>,
) -> Result<Json<Vec<DecisionView>>, ApiError> {
    Ok(Json(queries(q)?.by_request(&request_id).await?))
}

async fn policy_frequency(State(q): Q) -> Result<Json<Vec<PolicyWindow>>, ApiError> {
    Ok(Json(queries(q)?.policy_frequency().await?))
}

async fn verify(State(q): Q) -> Result<Json<LedgerStatus>, ApiError> {
    Ok(Json(queries(q)?.verify().await?))
}

/// Ships the spool's pending rows once: `Ok(rows shipped)`.
pub async fn flush(
    spool: &Mutex<Spool>,
    client: &clickhouse::Client,
) -> Result<usize, LedgerError> {
    let batch = spool.lock().batch();
    let Some(batch) = batch else { return Ok(0) };
    batch.ship(client, TABLE).await?;
    spool.lock().mark_shipped(batch.last_seq)
}

/// Writes a checkpoint of what ClickHouse acknowledged when one is due, and ships
/// the checkpoints ClickHouse lacks.
async fn checkpoint(c: &mut Checkpointer, spool: &Mutex<Spool>, client: &clickhouse::Client) {
    let (chain, size, head) = spool.lock().shipped_head();
    match c.tick(&chain, size, head) {
        Ok(true) => tracing::debug!(size, "ledger checkpoint written"),
        Ok(false) => {}
        Err(e) => {
            tracing::error!(path = %c.path().display(), error = %e, "ledger checkpoint not written");
        }
    }
    if let Err(e) = c.ship(client).await {
        tracing::debug!(error = %e, "ledger checkpoints kept for ClickHouse");
    }
}

/// Applies the migrations, then ships the spool in order forever; rows wait in the
/// spool while ClickHouse is away. Checkpoints are written as they fall due.
async fn ship_forever(
    spool: Arc<Mutex<Spool>>,
    client: clickhouse::Client,
    auditor: Auditor,
    mut checkpointer: Option<Checkpointer>,
) {
    let mut migrated = false;
    let mut last_err = String::new();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if !migrated {
            match migrations::apply(&client).await {
                Ok(done) => {
                    if !done.existing.is_empty() || !done.skipped.is_empty() {
                        tracing::info!(
                            existing = ?done.existing,
                            not_ours = ?done.skipped,
                            "ClickHouse tables set up by an administrator"
                        );
                    }
                    migrated = true;
                }
                Err(e) => {
                    let e = e.to_string();
                    if e != last_err {
                        tracing::warn!(error = %e, "ledger migrations pending");
                        last_err = e;
                    }
                    continue;
                }
            }
        }
        let flushed = flush(&spool, &client).await;
        if let Some(c) = &mut checkpointer {
            checkpoint(c, &spool, &client).await;
        }
        match flushed {
            Ok(_) => {
                last_err.clear();
                auditor.refresh_pending();
            }
            Err(e) => {
                let e = e.to_string();
                if e != last_err {
                    tracing::warn!(error = %e, "ledger rows kept in the spool");
                    last_err = e;
                }
            }
        }
    }
}
