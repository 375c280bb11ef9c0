//! The audit ledger: every decision of every stage is a row sealed into this node's
//! hash chain ([`gw_core::ledger`]) by the journal's writer and durable in the
//! journal before anyone acts on it ([`audit`], [`crate::journal`]); shipped to
//! ClickHouse in order by a background task ([`ship`]), checkpointed
//! ([`checkpoint`]) and read back through `/api/ledger/*` ([`query`]).

pub mod audit;
pub mod checkpoint;
pub mod migrations;
pub mod query;
pub mod ship;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::routing::get;
use axum::{Json, Router};
use gw_core::ledger::{Chain, ChainError, LedgerRow};
use gw_core::Code;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;

pub use audit::{AuditError, Auditor, Entry, ModelEvent};
use checkpoint::Checkpointer;
use query::{DecisionView, LedgerStatus, PolicyWindow, Queries};
use ship::{RowQueue, ShipError, Shipper};

use crate::error::ApiError;
use crate::journal::{self, Journal, Opened, Sink, Txn};

/// The decisions table.
pub const TABLE: &str = "control_decisions";

/// The ledger of a running sidecar: what is shipped where, and the queries.
pub struct Ledger {
    chain_id: String,
    client: Option<clickhouse::Client>,
    queries: Option<Queries>,
    checkpointer: Option<Checkpointer>,
    queue: Option<Arc<RowQueue>>,
    /// ClickHouse's last seq when the chain was taken up from there.
    resumed_after: Option<ship::Resumed>,
    /// The chain is still to be learned from ClickHouse (it did not answer at
    /// start): rows are refused until it is.
    deferred: bool,
    /// The journal's last row at start, when start-up could not compare it with
    /// ClickHouse's (the shipper does).
    journal_head: Option<u64>,
}

/// How long start-up waits for ClickHouse to say where the chain stands before the
/// sidecar serves without a chain (refusing commands with 503 until it knows).
const CHAIN_WAIT: Duration = Duration::from_secs(5);

/// How long start-up asks ClickHouse whether it holds more of the chain than the
/// journal: a start with a journal does not wait for ClickHouse (the shipper asks
/// again before its first insert).
const BEHIND_WAIT: Duration = Duration::from_secs(1);

/// How this node's chain is checkpointed.
pub struct CheckpointSettings {
    /// The ledger key (`GW_LEDGER_SK_HEX`); no checkpoints without it.
    pub key: Option<ed25519_dalek::SigningKey>,
    /// A checkpoint after this many rows.
    pub every_rows: u64,
    /// …or this long, when rows were added.
    pub every: Duration,
}

/// Why the ledger cannot start.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The chain cannot be continued.
    #[error("ledger chain: {0}")]
    Chain(#[from] ChainError),
    /// The pre-journal spool could not be shipped.
    #[error(transparent)]
    Ship(#[from] ShipError),
    /// The journal refused a row.
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    /// The journal lost rows it had shipped.
    #[error(transparent)]
    Behind(#[from] ship::JournalBehind),
    /// The ledger's directory cannot be made.
    #[error("ledger: {0}")]
    Io(String),
    /// No ClickHouse, and the journal holds rows a start with it wrote.
    #[error("the journal holds {0} ledger rows an earlier start wrote, not known to have reached ClickHouse: start with clickhouse_url to ship them, or move state_dir/journal aside to run without the ledger (its rows and the module state are then lost to this node)")]
    Unshipped(usize),
}

impl Ledger {
    /// Prepares the ledger of chain `chain_id` before `opened` starts: the chain to
    /// seal into (the journal's last row; without one, what ClickHouse holds — this
    /// waits for ClickHouse), and the queue of rows still to ship. `clickhouse`
    /// `None`: nothing is recorded (development only). `dir` holds the checkpoints
    /// (and a pre-journal spool, shipped once). `queue` holds the rows still to
    /// ship, fed by the journal's start ([`Journal::open_with`]). Registers
    /// `gw_sidecar_ledger_pending_rows{,_on_disk}`.
    pub async fn prepare(
        opened: &Opened,
        dir: &Path,
        chain_id: &str,
        clickhouse: Option<&clickhouse::Client>,
        checkpoints: CheckpointSettings,
        queue: RowQueue,
        registry: &mut Registry,
    ) -> Result<(Ledger, Option<Chain>), LedgerError> {
        let Some(client) = clickhouse else {
            // Rows of a start that had ClickHouse, not known to be there (the
            // journal keeps no mark of what was shipped; ClickHouse says): not
            // dropped by a start that cannot ship them. Let go, the journal
            // deleted them as it rolled, and the next start with ClickHouse
            // resumed after its last row without them.
            if !queue.is_empty() {
                return Err(LedgerError::Unshipped(queue.len()));
            }
            tracing::warn!("no clickhouse_url: decisions are NOT audited (development only)");
            return Ok((
                Ledger {
                    chain_id: chain_id.to_owned(),
                    client: None,
                    queries: None,
                    checkpointer: None,
                    queue: None,
                    resumed_after: None,
                    deferred: false,
                    journal_head: None,
                },
                None,
            ));
        };
        crate::durable::create_dir(dir)
            .map_err(|e| LedgerError::Io(format!("cannot create {}: {e}", dir.display())))?;
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
        let mut last = opened.last_row().cloned();
        if last.is_none() && dir.join("ledger.spool.jsonl").exists() {
            apply_migrations(client, &queue).await;
            last = ship::migrate_legacy_spool(dir, client, TABLE).await?;
        }
        // The chain's head: its rows in the journal, or the spool's last shipped.
        if let Some(l) = &last {
            queue.seed_head(l);
        }
        // A journal whose rows end before ClickHouse's lost rows it had shipped:
        // refused at once when ClickHouse answers now, else by the shipper later
        // (nothing is shipped then; commands go on, their rows kept).
        let mut journal_head = last.as_ref().map(|r| r.seq);
        if let Some(head) = journal_head {
            let check = ship::check_not_behind(client, TABLE, chain_id, head);
            match tokio::time::timeout(BEHIND_WAIT, check).await {
                Ok(Err(ShipError::Behind(e))) => return Err(e.into()),
                Ok(Err(e)) => tracing::warn!(error = %e, "ClickHouse not asked whether it holds more of the chain than the journal: the shipper asks before its first insert"),
                Ok(Ok(())) => journal_head = None,
                Err(_) => tracing::warn!("ClickHouse does not answer: the shipper asks before its first insert whether it holds more of the chain than the journal"),
            }
        }
        let anchor = anchor_of(checkpointer.as_ref(), chain_id);
        let (chain, resumed_after, deferred) = match tokio::time::timeout(
            CHAIN_WAIT,
            ship::initial_chain(chain_id, last.as_ref(), client, TABLE, anchor),
        )
        .await
        {
            Ok(r) => {
                let (c, after) = r?;
                (Some(c), after, false)
            }
            Err(_) => {
                tracing::error!(
                    chain = chain_id,
                    "ClickHouse does not answer and the journal holds no ledger rows: commands are refused (503) until ClickHouse says where the chain stands"
                );
                (None, None, true)
            }
        };
        registry.register(
            "gw_sidecar_ledger_pending_rows",
            "Ledger rows not yet in ClickHouse",
            queue.pending_gauge(),
        );
        let queue = Arc::new(queue);
        registry.register(
            "gw_sidecar_ledger_pending_rows_on_disk",
            "Of the ledger rows not yet in ClickHouse, those waiting in the journal on disk only (beyond audit_memory_rows)",
            queue.on_disk_gauge(),
        );
        registry.register(
            "gw_sidecar_ledger_pending_memory_bytes",
            "Bytes of the ledger rows not yet in ClickHouse that wait in memory (at most audit_memory_bytes, and one record beyond it)",
            queue.memory_bytes_gauge(),
        );
        registry.register(
            "gw_sidecar_ledger_rows_lost_by_clickhouse",
            "Ledger rows ClickHouse acknowledged and later did not hold (a restore, a replica behind, a power cut): not shipped again, a gap gwctl ledger verify reports",
            queue.lost_counter(),
        );
        Ok((
            Ledger {
                chain_id: chain_id.to_owned(),
                client: Some(client.clone()),
                queries: Some(
                    Queries::new(client.clone(), TABLE)
                        .with_anchors(checkpointer.as_ref().map(Checkpointer::anchors))
                        .with_signer(checkpointer.as_ref().map(Checkpointer::verifying_key))
                        .with_own_chain(chain_id),
                ),
                checkpointer,
                queue: Some(queue),
                resumed_after,
                deferred,
                journal_head,
            },
            chain,
        ))
    }

    /// Whether decisions are recorded (ClickHouse is configured).
    pub fn enabled(&self) -> bool {
        self.queue.is_some()
    }

    /// The rows waiting for ClickHouse (none without a ledger): how many, and
    /// why they are not reaching it now ([`RowQueue::shipping`]).
    pub fn queue(&self) -> Option<Arc<RowQueue>> {
        self.queue.clone()
    }

    /// The journal sink that feeds the shipper (none without a ledger).
    pub fn sink(&self) -> Option<Arc<dyn Sink>> {
        self.queue.clone().map(|q| q as Arc<dyn Sink>)
    }

    /// Starts shipping to ClickHouse (after applying the migrations). When the
    /// chain was taken up from ClickHouse, its first row says so (written before
    /// this returns).
    /// Inserts at most once per `ship_every` ([`Shipper::with_every`]), at OS
    /// priority `nice` on ClickHouse ([`Shipper::with_nice`]).
    pub async fn start(
        &mut self,
        journal: &Journal,
        ship_every: std::time::Duration,
        nice: u8,
    ) -> Result<Option<JoinHandle<()>>, LedgerError> {
        let (Some(client), Some(queue)) = (self.client.clone(), self.queue.clone()) else {
            return Ok(None);
        };
        if let Some(r) = self.resumed_after.take() {
            journal
                .commit(Txn::of(vec![journal::Entry::row(resumed_row(r))]))
                .await?;
        }
        if self.deferred {
            queue.set_shipping(Some(ship::Stalled {
                detail: "ClickHouse has not said where the chain stands (the journal holds no ledger rows): commands are refused (503) until it does".into(),
                refusing: true,
                needs_operator: false,
            }));
        }
        let shipper = Shipper::new(
            queue.clone(),
            journal.clone(),
            client.clone(),
            TABLE,
            &self.chain_id,
        )
        .with_every(ship_every)
        .with_nice(nice)
        .with_journal_head(self.journal_head);
        let checkpointer = self.checkpointer.take();
        let deferred = std::mem::take(&mut self.deferred);
        let (journal, chain_id) = (journal.clone(), self.chain_id.clone());
        let anchor = anchor_of(checkpointer.as_ref(), &chain_id);
        Ok(Some(tokio::spawn(async move {
            if deferred {
                learn_chain(&journal, &chain_id, &client, anchor).await;
                queue.set_shipping(None);
            }
            apply_migrations(&client, &queue).await;
            shipper.run(checkpointer).await;
        })))
    }

    /// `/api/ledger/*`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/api/ledger/history", get(history))
            .route("/api/ledger/request/{request_id}", get(by_request))
            .route("/api/ledger/policy-frequency", get(policy_frequency))
            .route("/api/ledger/verify", get(verify))
            .route("/api/ledger/refusals", get(refusals))
            .route("/api/ledger/sends", get(sends))
            .route("/api/ledger/checkpoints", get(checkpoints))
            .with_state(Api {
                queries: self.queries.clone(),
                pending: self.queue.clone(),
            })
    }
}

/// This node's newest signed checkpoint of `chain_id` (rows, head).
fn anchor_of(checkpointer: Option<&Checkpointer>, chain_id: &str) -> Option<(u64, [u8; 32])> {
    let c = checkpointer?;
    let anchors = c.anchors();
    let held = anchors.lock();
    held.get(chain_id).map(|cp| (cp.size, cp.head))
}

/// Learns where chain `chain_id` stands from ClickHouse (waiting for it) and gives
/// the journal its chain, with the row saying so when the chain was taken up.
async fn learn_chain(
    journal: &Journal,
    chain_id: &str,
    client: &clickhouse::Client,
    anchor: Option<(u64, [u8; 32])>,
) {
    loop {
        match ship::initial_chain(chain_id, None, client, TABLE, anchor).await {
            Ok((chain, after)) => {
                let rows = after
                    .map(|a| journal::Entry::row(resumed_row(a)))
                    .into_iter()
                    .collect();
                match journal.commit_installing(chain, Txn::of(rows)).await {
                    Ok(_) => {
                        tracing::info!(
                            chain = chain_id,
                            "ledger chain known: commands are accepted"
                        );
                        return;
                    }
                    Err(e) => tracing::error!(error = %e, "ledger chain not installed; retrying"),
                }
            }
            Err(e) => tracing::error!(error = %e, "ledger chain cannot be continued; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The row that records a chain taken up without the journal's rows (rows it
/// had not shipped are gone): after which row, the rows this node's checkpoint
/// vouched for (those between were taken as ClickHouse held them), and
/// ClickHouse's last row when the chain continues after the checkpoint instead.
fn resumed_row(r: ship::Resumed) -> LedgerRow {
    LedgerRow {
        chain_id: String::new(),
        seq: 0,
        ts_ms: crate::now_nanos() / 1_000_000,
        stage: gw_core::ledger::Stage::Sidecar.as_str().into(),
        decision: "resumed".into(),
        code: String::new(),
        request_id: String::new(),
        issuer: String::new(),
        module: String::new(),
        action: String::new(),
        pubkey_id: String::new(),
        sig_alg: String::new(),
        nonce: 0,
        args_json: match r.stored {
            None => serde_json::json!({"after_seq": r.after, "checkpointed_seq": r.checkpointed,
                "why": "the local journal held no ledger rows; the chain continues after ClickHouse's last row (rows after checkpointed_seq taken as ClickHouse holds them)"}),
            Some(stored) => serde_json::json!({"after_seq": r.after, "checkpointed_seq": r.checkpointed,
                "clickhouse_seq": stored,
                "why": "the local journal held no ledger rows and ClickHouse fewer than this node's checkpoint; the chain continues after the checkpoint"}),
        }
        .to_string(),
        raw_hex: String::new(),
        requester: String::new(),
        requester_roles: String::new(),
        token_issuer: String::new(),
        route: String::new(),
        prev_hash: String::new(),
        row_hash: String::new(),
    }
}

/// Applies the migrations, retrying until ClickHouse answers and the ledger's
/// tables (decisions, checkpoints) are ready; another table that is not (an older
/// `tx_sends` this user may not alter) is logged, and its rows wait on their own.
/// Until then rows wait in the journal ([`RowQueue::shipping`] says why).
async fn apply_migrations(client: &clickhouse::Client, queue: &RowQueue) {
    let mut last_err = String::new();
    loop {
        match migrations::apply_for(client, &[TABLE, checkpoint::TABLE]).await {
            Ok(done) => {
                if !done.existing.is_empty() || !done.skipped.is_empty() {
                    tracing::info!(
                        existing = ?done.existing,
                        not_ours = ?done.skipped,
                        "ClickHouse tables set up by an administrator"
                    );
                }
                for e in &done.not_ready {
                    tracing::warn!(error = %e, "a ClickHouse table is not ready: its rows wait in the journal");
                }
                if !last_err.is_empty() {
                    queue.set_shipping(None);
                }
                return;
            }
            Err(e) => {
                let e = e.to_string();
                if e != last_err {
                    tracing::warn!(error = %e, "ledger migrations pending");
                    queue.set_shipping(Some(ship::Stalled {
                        detail: format!("the ledger's tables are not set up yet: {e}"),
                        refusing: false,
                        needs_operator: false,
                    }));
                    last_err = e;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// What the ledger endpoints read: ClickHouse, and the rows still to ship.
#[derive(Clone)]
struct Api {
    queries: Option<Queries>,
    pending: Option<Arc<RowQueue>>,
}

impl Api {
    /// The newest `limit` rows not yet shipped that `keep` selects.
    fn pending(&self, limit: usize, keep: impl Fn(&LedgerRow) -> bool) -> Vec<DecisionView> {
        self.pending
            .as_ref()
            .map(|q| q.newest_where(limit, keep, |r| DecisionView::from(r)))
            .unwrap_or_default()
    }
}

type Q = State<Api>;

fn queries(api: Api) -> Result<Queries, ApiError> {
    api.queries.ok_or(ApiError::new(
        Code::Unavailable,
        "no audit ledger configured (clickhouse_url)",
    ))
}

/// `?limit=&stage=&decision=&before=` of `/api/ledger/history`.
#[derive(serde::Deserialize)]
struct HistoryQuery {
    limit: Option<usize>,
    stage: Option<String>,
    decision: Option<String>,
    before: Option<String>,
}

/// `?after=` of `/api/ledger/request/{id}`.
#[derive(serde::Deserialize)]
struct RequestQuery {
    after: Option<String>,
}

/// A query parameter `v` read with `parse`, when given; 400 `malformed` saying
/// `what` it takes when it does not parse.
fn param<T>(
    v: Option<&str>,
    parse: impl Fn(&str) -> Option<T>,
    what: &'static str,
) -> Result<Option<T>, ApiError> {
    v.map(|v| parse(v).ok_or_else(|| ApiError::new(Code::Malformed, what)))
        .transpose()
}

async fn history(
    State(q): Q,
    h: Result<axum::extract::Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<DecisionView>>, ApiError> {
    let h = h.map_err(|e| ApiError::with(Code::Malformed, e.body_text()))?;
    let limit = h
        .limit
        .unwrap_or(query::MAX_HISTORY)
        .min(query::MAX_HISTORY);
    // Only the decisions asked for (a flood of refusals cannot push the applied
    // commands out of a page of them).
    let only = query::Only {
        stage: param(
            h.stage.as_deref(),
            gw_core::ledger::Stage::parse,
            "stage: edge, sidecar, agent or models",
        )?,
        decision: param(
            h.decision.as_deref(),
            gw_core::ledger::Decision::parse,
            "decision: accepted, rejected, applied or duplicate",
        )?,
    };
    let before = param(
        h.before.as_deref(),
        query::Cursor::parse,
        "before: <ts_ms>.<seq>.<chain_id> of a decision (the last of a page)",
    )?;
    let older = |r: &LedgerRow| before.as_ref().is_none_or(|c| query::key_of(r) < c.key());
    // Rows durable in the journal and not yet shipped are decisions too: read
    // them first (a row shipped meanwhile is then in ClickHouse's answer).
    let day_ago = (crate::now_nanos() / 1_000_000).saturating_sub(86_400_000);
    let pending = q.pending(limit, |r| r.ts_ms > day_ago && only.keeps(r) && older(r));
    let stored = queries(q)?.history(limit, &only, before.as_ref()).await?;
    let mut all = query::with_pending(stored, pending);
    all.sort_by(|a, b| b.key().cmp(&a.key()));
    all.truncate(limit);
    Ok(Json(all))
}

async fn refusals(State(q): Q) -> Result<Json<query::Refusals>, ApiError> {
    Ok(Json(queries(q)?.refusals().await?))
}

async fn sends(State(q): Q) -> Result<Json<query::SendStats>, ApiError> {
    Ok(Json(queries(q)?.sends().await?))
}

async fn checkpoints(State(q): Q) -> Result<Json<Vec<query::CheckpointView>>, ApiError> {
    Ok(Json(queries(q)?.checkpoints().await?))
}

async fn by_request(
    State(q): Q,
    id: Result<UrlPath<String>, axum::extract::rejection::PathRejection>,
    r: Result<axum::extract::Query<RequestQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<DecisionView>>, ApiError> {
    // A request id that is not UTF-8 once decoded (`%FF`) is answered in the
    // API's shape, as every other malformed request is.
    let UrlPath(request_id) = id.map_err(|e| ApiError::with(Code::Malformed, e.body_text()))?;
    let r = r.map_err(|e| ApiError::with(Code::Malformed, e.body_text()))?;
    let after = param(
        r.after.as_deref(),
        query::Cursor::parse,
        "after: <ts_ms>.<seq>.<chain_id> of a decision (the last of a page)",
    )?;
    let later = |r: &LedgerRow| after.as_ref().is_none_or(|c| query::key_of(r) > c.key());
    let pending = q.pending(usize::MAX, |r| r.request_id == request_id && later(r));
    let stored = queries(q)?.by_request(&request_id, after.as_ref()).await?;
    let mut all = query::with_pending(stored, pending);
    all.sort_by(|a, b| a.key().cmp(&b.key()));
    all.truncate(query::MAX_BY_REQUEST);
    Ok(Json(all))
}

async fn policy_frequency(State(q): Q) -> Result<Json<Vec<PolicyWindow>>, ApiError> {
    Ok(Json(queries(q)?.policy_frequency().await?))
}

async fn verify(State(q): Q) -> Result<Json<LedgerStatus>, ApiError> {
    match queries(q)?.verify().await? {
        Some(status) => Ok(Json(status)),
        None => Err(ApiError::with(
            Code::Overloaded,
            "another verification is walking the ledger; try again once it ends",
        )),
    }
}
