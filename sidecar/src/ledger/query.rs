//! Reading the ledger back from ClickHouse: an operator's history, one request's
//! decisions, the frequency of policy updates, and a walk of the hash chain.

use gw_core::Code;
use serde::{Deserialize, Serialize};

use super::ship::DecisionRow;
use crate::error::ApiError;

/// A decision as the ledger endpoints return it.
#[derive(Debug, clickhouse::Row, Serialize, Deserialize)]
pub struct DecisionView {
    /// The chain (gateway node).
    pub chain_id: String,
    /// Position in the chain.
    pub seq: u64,
    /// Unix milliseconds.
    pub ts_ms: u64,
    /// `edge`, `sidecar`, `agent`.
    pub stage: String,
    /// `accepted`, `rejected`, `applied`, `duplicate`.
    pub decision: String,
    /// The rejection code, if any.
    pub code: String,
    /// Command issuer.
    pub issuer: String,
    /// Module.
    pub module: String,
    /// Action.
    pub action: String,
    /// Command `request_id`.
    pub request_id: String,
    /// Command nonce.
    pub nonce: u64,
    /// Who sent the request (the JWT `sub` the edge verified).
    pub requester: String,
    /// The requester's roles.
    pub requester_roles: String,
    /// The JWT's issuer.
    pub token_issuer: String,
    /// The route the request came in on.
    pub route: String,
}

impl From<&gw_core::ledger::LedgerRow> for DecisionView {
    fn from(r: &gw_core::ledger::LedgerRow) -> Self {
        DecisionView {
            chain_id: r.chain_id.clone(),
            seq: r.seq,
            ts_ms: r.ts_ms,
            stage: r.stage.clone(),
            decision: r.decision.clone(),
            code: r.code.clone(),
            issuer: r.issuer.clone(),
            module: r.module.clone(),
            action: r.action.clone(),
            request_id: r.request_id.clone(),
            nonce: r.nonce,
            requester: r.requester.clone(),
            requester_roles: r.requester_roles.clone(),
            token_issuer: r.token_issuer.clone(),
            route: r.route.clone(),
        }
    }
}

/// `stored` (ClickHouse's answer) with the `pending` rows it does not hold yet
/// (read from the journal's queue before ClickHouse was asked, so a row shipped
/// in between is in `stored`), each `(chain_id, seq)` once.
pub fn with_pending(
    mut stored: Vec<DecisionView>,
    pending: Vec<DecisionView>,
) -> Vec<DecisionView> {
    let have: std::collections::HashSet<(&str, u64)> = stored
        .iter()
        .map(|d| (d.chain_id.as_str(), d.seq))
        .collect();
    let missing: Vec<DecisionView> = pending
        .into_iter()
        .filter(|r| !have.contains(&(r.chain_id.as_str(), r.seq)))
        .collect();
    stored.extend(missing);
    stored
}

/// Whether `r`'s note verifies with `vk` and says what the row says.
fn signed_by(r: &CheckpointRow, vk: &ed25519_dalek::VerifyingKey) -> bool {
    gw_core::checkpoint::Checkpoint::open(&r.note, super::checkpoint::KEY_NAME, vk).is_ok_and(|c| {
        c.chain_id() == Some(r.chain_id.as_str())
            && c.size == r.size
            && hex::encode(c.head) == r.head
    })
}

/// A decision's place in the order the ledger's reads give them: its time, then
/// its chain, then its position. Written `<ts_ms>.<seq>.<chain_id>` (the chain
/// last: it may hold dots). A page ends with a decision; the next page is asked
/// for from it (`before=` of `history`, `after=` of `request/{id}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// Unix milliseconds.
    pub ts_ms: u64,
    /// The chain.
    pub chain_id: String,
    /// Position in the chain.
    pub seq: u64,
}

impl Cursor {
    /// Parses `<ts_ms>.<seq>.<chain_id>`.
    pub fn parse(s: &str) -> Option<Cursor> {
        let mut parts = s.splitn(3, '.');
        let ts_ms = gw_core::contract::decimal_u64(parts.next()?)?;
        let seq = gw_core::contract::decimal_u64(parts.next()?)?;
        let chain_id = parts.next()?;
        (!chain_id.is_empty() && chain_id.len() <= 256).then(|| Cursor {
            ts_ms,
            chain_id: chain_id.to_owned(),
            seq,
        })
    }

    /// The key the reads order by.
    pub fn key(&self) -> (u64, &str, u64) {
        (self.ts_ms, &self.chain_id, self.seq)
    }
}

impl DecisionView {
    /// The key the reads order by ([`Cursor::key`]).
    pub fn key(&self) -> (u64, &str, u64) {
        (self.ts_ms, &self.chain_id, self.seq)
    }
}

/// A row's key in the reads' order ([`Cursor::key`]).
pub fn key_of(r: &gw_core::ledger::LedgerRow) -> (u64, &str, u64) {
    (r.ts_ms, &r.chain_id, r.seq)
}

/// Binds a cursor's test to `q`: whether there is one, then its fields (the SQL
/// reads `(? = 0 OR (ts_ms, chain_id, seq) <op> (?, ?, ?))`).
fn bind_cursor(q: clickhouse::query::Query, c: Option<&Cursor>) -> clickhouse::query::Query {
    let (on, ts, chain, seq) = c.map_or((0u8, 0, "", 0), |c| {
        (1, c.ts_ms, c.chain_id.as_str(), c.seq)
    });
    q.bind(on).bind(ts).bind(chain).bind(seq)
}

/// Which decisions a history keeps (`None`: any).
#[derive(Debug, Default, Clone, Copy)]
pub struct Only {
    /// Of this stage.
    pub stage: Option<gw_core::ledger::Stage>,
    /// With this decision.
    pub decision: Option<gw_core::ledger::Decision>,
}

impl Only {
    /// Whether `r` is one of them.
    pub fn keeps(&self, r: &gw_core::ledger::LedgerRow) -> bool {
        self.stage.is_none_or(|s| r.stage == s.as_str())
            && self.decision.is_none_or(|d| r.decision == d.as_str())
    }
}

/// One five-minute window of applied POLICY commands.
#[derive(Debug, clickhouse::Row, Serialize, Deserialize)]
pub struct PolicyWindow {
    /// Unix seconds.
    pub window_start: u32,
    /// Commands applied in it.
    pub commands: u64,
}

/// Decisions with one code in a window, by stage.
#[derive(Debug, clickhouse::Row, Serialize, Deserialize)]
pub struct CodeCount {
    /// `edge`, `sidecar`, `agent`.
    pub stage: String,
    /// The code (`accepted`/`applied` rows have none and are not counted).
    pub code: String,
    /// Refusals: a row each, a row summing those beyond a budget its sum.
    pub count: u64,
}

/// Refusals in one minute, by stage.
#[derive(Debug, clickhouse::Row, Serialize, Deserialize)]
pub struct MinuteCount {
    /// Unix seconds, start of the minute.
    pub minute: u32,
    /// `edge`, `sidecar`, `agent`.
    pub stage: String,
    /// Refusals, counted as [`CodeCount::count`].
    pub count: u64,
}

/// What was refused in the last hour ([`Queries::refusals`]).
#[derive(Debug, Serialize)]
pub struct Refusals {
    /// Totals by stage and code.
    pub by_code: Vec<CodeCount>,
    /// Per minute, by stage.
    pub per_minute: Vec<MinuteCount>,
}

/// Sends in one minute by route and outcome.
#[derive(Debug, clickhouse::Row, Serialize, Deserialize)]
pub struct SendMinute {
    /// Unix seconds, start of the minute.
    pub minute: u32,
    /// The route that took it (`tpu`, `relay`; empty when none did).
    pub route: String,
    /// `landed` or `failed`.
    pub outcome: String,
    /// Sends hedged to the other route.
    pub hedged: u64,
    /// Sends.
    pub count: u64,
}

/// Sends by latency bucket (powers of two of microseconds) and route.
#[derive(Debug, clickhouse::Row, Serialize, Deserialize)]
pub struct LatencyBucket {
    /// The route.
    pub route: String,
    /// Upper bound of the bucket, microseconds (a power of two).
    pub le_us: u64,
    /// Sends.
    pub count: u64,
}

/// The send audit of the last hour ([`Queries::sends`]).
#[derive(Debug, Serialize)]
pub struct SendStats {
    /// Per minute.
    pub per_minute: Vec<SendMinute>,
    /// Latency histogram of landed sends.
    pub latency: Vec<LatencyBucket>,
}

/// A signed checkpoint as stored.
#[derive(Debug, clickhouse::Row, Serialize, Deserialize)]
struct CheckpointRow {
    chain_id: String,
    size: u64,
    head: String,
    note: String,
    ts_ms: u64,
}

/// A chain's newest checkpoint ([`Queries::checkpoints`]).
#[derive(Debug, Serialize)]
pub struct CheckpointView {
    /// The chain.
    pub chain_id: String,
    /// Rows covered.
    pub size: u64,
    /// Hash of row `size`, hex.
    pub head: String,
    /// The signed note.
    pub note: String,
    /// Unix milliseconds.
    pub ts_ms: u64,
    /// The note verifies with this node's ledger key and says the same chain,
    /// size and head as the row (`false`: another node's, or not a checkpoint
    /// anyone signed — the table takes any row its writers insert).
    pub signed_here: bool,
}

/// Checkpoints of each chain a read weighs, newest first, to find one this
/// node signed.
pub const CHECKPOINTS_READ: usize = 16;

/// The result of walking one stored chain.
#[derive(Debug, Serialize)]
pub struct ChainStatus {
    /// The chain.
    pub chain_id: String,
    /// Whether every row verified.
    pub ok: bool,
    /// Rows read (all of them verified when `ok`).
    pub rows: u64,
    /// Where the chain breaks first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broken: Option<String>,
    /// Every break found, in order ([`gw_core::ledger::MAX_BREAKS`] at most; the walk goes on
    /// after each, so that one row planted or lost hides nothing after it).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub breaks: Vec<String>,
    /// Breaks found beyond those listed.
    #[serde(skip_serializing_if = "crate::is_zero")]
    pub more_breaks: u64,
    /// The size of this node's newest signed checkpoint of the chain, which the
    /// stored chain was held to: not shorter, and the same row at that size
    /// (absent: this node has no checkpoint of the chain).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<u64>,
    /// Whether this node holds a signed checkpoint of the chain (`false`: the
    /// rows verify against each other only — another node's chain, or one anyone
    /// with INSERT could have written whole with valid hashes; `gwctl ledger
    /// verify --checkpoint` with every node's file tells them apart).
    pub anchored: bool,
    /// The chain is the one this node writes (not anchored: no checkpoint of it
    /// yet).
    pub this_node: bool,
}

/// The chains a verification lists, and the others counted.
#[derive(Default)]
struct Listing {
    chains: Vec<ChainStatus>,
    /// Listed chains that verified (those a broken one may take the place of).
    listed_ok: usize,
    more_ok: u64,
    more_broken: u64,
    /// Chains, listed or not, other than this node's, that no checkpoint of
    /// this node vouches for.
    unanchored: u64,
}

impl Listing {
    fn add(&mut self, c: ChainStatus) {
        self.unanchored += u64::from(!c.anchored && !c.this_node);
        if self.chains.len() < MAX_CHAINS_LISTED {
            self.listed_ok += usize::from(c.ok);
            self.chains.push(c);
        } else if c.ok {
            self.more_ok += 1;
        } else if self.listed_ok > 0 {
            // A broken chain is listed in the place of one that verified.
            if let Some(i) = self.chains.iter().rposition(|x| x.ok) {
                self.chains[i] = c;
                self.listed_ok -= 1;
                self.more_ok += 1;
            }
        } else {
            self.more_broken += 1;
        }
    }

    fn status(
        mut self,
        error: Option<String>,
        checkpoints: bool,
        not_utf8: Option<NotUtf8>,
    ) -> LedgerStatus {
        self.chains.sort_by(|a, b| a.chain_id.cmp(&b.chain_id));
        LedgerStatus {
            ok: error.is_none()
                && not_utf8.is_none()
                && self.more_broken == 0
                && self.chains.iter().all(|c| c.ok),
            not_utf8,
            chains: self.chains,
            more_chains_ok: self.more_ok,
            more_chains_broken: self.more_broken,
            unanchored: self.unanchored,
            checkpoints,
            error,
        }
    }
}

/// A chain's status from its walk in [`Queries::verify`], held to this node's
/// newest checkpoint of it.
fn chain_status(w: gw_core::checkpoint::ChainWalk, own: Option<&str>) -> ChainStatus {
    // A chain whose rows walk counts each once; a broken one, the rows read.
    let rows = if w.breaks.is_empty() {
        w.walked()
    } else {
        w.read
    };
    let (held, checkpoint) = (w.held(), w.checkpoint_size());
    let mut breaks = w.breaks;
    if let Some(Err(e)) = held {
        breaks.note(format!("{e} (this node's signed checkpoint)"));
    }
    ChainStatus {
        ok: breaks.is_empty(),
        rows,
        broken: breaks.listed.first().cloned(),
        anchored: checkpoint.is_some(),
        this_node: own == Some(w.chain_id.as_str()),
        checkpoint,
        chain_id: w.chain_id,
        breaks: breaks.listed,
        more_breaks: breaks.more,
    }
}

/// Rows under chain ids that are not UTF-8 ([`LedgerStatus::not_utf8`]).
#[derive(Debug, Serialize)]
pub struct NotUtf8 {
    /// Rows.
    pub rows: u64,
    /// Distinct chain ids.
    pub chains: u64,
}

/// Chains one verification lists at most (broken ones in preference); the rest
/// are counted: anyone who can INSERT can plant a million one-row chains, and the
/// answer stays bounded.
pub const MAX_CHAINS_LISTED: usize = 256;

/// The result of walking every stored chain.
#[derive(Debug, Serialize)]
pub struct LedgerStatus {
    /// Whether every chain verified.
    pub ok: bool,
    /// Each chain (walked to its end: when the walk stopped, those before it), in
    /// the order of their ids: [`MAX_CHAINS_LISTED`] at most, a broken one
    /// listed in the place of one that verified.
    pub chains: Vec<ChainStatus>,
    /// Chains that verified and are not listed.
    #[serde(skip_serializing_if = "crate::is_zero")]
    pub more_chains_ok: u64,
    /// Broken chains not listed.
    #[serde(skip_serializing_if = "crate::is_zero")]
    pub more_chains_broken: u64,
    /// Chains, listed or not, other than this node's own, that no signed
    /// checkpoint of this node vouches for ([`ChainStatus::anchored`]): `ok` does
    /// not count them against the ledger, since one store may hold every node's
    /// chains.
    pub unanchored: u64,
    /// Whether this node signs checkpoints of its chain (a ledger key is
    /// configured): without, no chain is held to more than its own hashes.
    pub checkpoints: bool,
    /// Rows stored under chain ids that are not UTF-8: not walked (no gateway
    /// writes such an id; whoever can INSERT can), and the ledger is not `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_utf8: Option<NotUtf8>,
    /// Why the walk stopped before the table's end (ClickHouse's answer was out
    /// of order): nothing after that point was judged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The most rows `history` returns.
pub const MAX_HISTORY: usize = 10_000;

/// The send audit table.
const SENDS_TABLE: &str = "tx_sends";

/// The columns of a [`DecisionView`], text read as UTF-8
/// ([`gw_core::ledger::read_as_utf8`]: a row anyone with INSERT stored with
/// other bytes is shown, not a failure of every page that holds it).
fn decision_columns() -> String {
    texts_as_utf8(<DecisionView as clickhouse::Row>::COLUMN_NAMES)
}

/// A select list of the ledger's `columns`, text read as UTF-8.
fn texts_as_utf8(columns: &[&str]) -> String {
    columns
        .iter()
        .map(|c| gw_core::ledger::read_as_utf8(c))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A select list of text `columns` of another table, read as UTF-8.
fn utf8(columns: &[&str]) -> String {
    columns
        .iter()
        .map(|c| format!("toValidUTF8({c}) AS {c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// ClickHouse could not answer.
#[derive(Debug, thiserror::Error)]
#[error("clickhouse: {0}")]
pub struct QueryError(#[from] clickhouse::error::Error);

impl From<QueryError> for ApiError {
    /// The caller is told the store did not answer; what ClickHouse said (its
    /// user, tables, grants, version) goes to the sidecar's log only.
    fn from(e: QueryError) -> Self {
        tracing::warn!(error = %e, "a ledger query failed");
        ApiError::with(
            Code::Unavailable,
            "the ledger's store (ClickHouse) did not answer; the sidecar's log says why",
        )
    }
}

/// Settings of every read: bounded in time, and never a partial answer taken
/// for a whole one (a profile that `break`s on a limit would cut a result
/// short, and a cut chain would verify).
const READ_SETTINGS: &str = "SETTINGS max_execution_time = 60, \
     result_overflow_mode = 'throw', read_overflow_mode = 'throw', \
     timeout_overflow_mode = 'throw'";

/// Most decisions `by_request` returns.
pub const MAX_BY_REQUEST: usize = 1_000;

/// How long a verification waits for the one running at most (less than the
/// edge's 10 s timeout of its route, so that the caller hears why).
pub const VERIFY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How far back `policy_frequency` looks.
pub const POLICY_FREQUENCY_DAYS: u32 = 7;

/// Queries over the decisions table.
#[derive(Clone)]
pub struct Queries {
    client: clickhouse::Client,
    table: String,
    /// One walk of every chain at a time ([`Queries::verify`]).
    walking: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// This node's checkpoints, which [`Queries::verify`] holds the chains to.
    anchors: Option<super::checkpoint::Anchors>,
    /// The key this node's checkpoints verify with ([`Queries::checkpoints`]).
    signer: Option<ed25519_dalek::VerifyingKey>,
    /// The chain this node writes.
    own_chain: Option<String>,
}

impl Queries {
    /// Queries `table` through `client`.
    pub fn new(client: clickhouse::Client, table: &str) -> Queries {
        Queries {
            client,
            table: table.to_owned(),
            walking: Default::default(),
            anchors: None,
            signer: None,
            own_chain: None,
        }
    }

    /// Tells the checkpoints this node signed (with `signer`) from the others.
    pub fn with_signer(mut self, signer: Option<ed25519_dalek::VerifyingKey>) -> Queries {
        self.signer = signer;
        self
    }

    /// Holds the chains [`Queries::verify`] walks to this node's checkpoints too.
    pub fn with_anchors(mut self, anchors: Option<super::checkpoint::Anchors>) -> Queries {
        self.anchors = anchors;
        self
    }

    /// Names the chain this node writes ([`ChainStatus::this_node`]).
    pub fn with_own_chain(mut self, chain_id: &str) -> Queries {
        self.own_chain = Some(chain_id.to_owned());
        self
    }

    /// The client (the shipper writes through it).
    pub fn client(&self) -> &clickhouse::Client {
        &self.client
    }

    /// Decisions of the last 24 hours that `only` keeps, newest first (by
    /// [`Cursor::key`], descending), after `before` when given (at most `limit`,
    /// at most [`MAX_HISTORY`]).
    pub async fn history(
        &self,
        limit: usize,
        only: &Only,
        before: Option<&Cursor>,
    ) -> Result<Vec<DecisionView>, QueryError> {
        let mut q = self.client.query(&format!(
            "SELECT {} FROM {} \
             WHERE ts_ms > toUInt64(toUnixTimestamp64Milli(now64(3))) - 86400000 \
               AND (? = '' OR stage = ?) AND (? = '' OR decision = ?) \
               AND (? = 0 OR (ts_ms, chain_id, seq) < (?, ?, ?)) \
             ORDER BY ts_ms DESC, chain_id DESC, seq DESC LIMIT 1 BY chain_id, seq LIMIT {} \
             {READ_SETTINGS}",
            decision_columns(),
            self.table,
            limit.min(MAX_HISTORY)
        ));
        let stage = only.stage.map_or("", gw_core::ledger::Stage::as_str);
        let decision = only.decision.map_or("", gw_core::ledger::Decision::as_str);
        q = q.bind(stage).bind(stage).bind(decision).bind(decision);
        Ok(bind_cursor(q, before).fetch_all::<DecisionView>().await?)
    }

    /// Refusals of the last hour: by stage and code, and per minute.
    pub async fn refusals(&self) -> Result<Refusals, QueryError> {
        const HOUR: &str =
            "code != '' AND ts_ms > toUInt64(toUnixTimestamp64Milli(now64(3))) - 3600000";
        // A row summing refusals beyond a budget (route '', `{"unrecorded": n}`)
        // counts its n: under a flood the counts say how many were refused, not
        // how many rows the budget let through.
        // (Only such a row: no command's, whose arguments could say anything.)
        const COUNT: &str = "sum(if(route = '' AND request_id = '' AND stage != 'agent' \
             AND JSONHas(args_json, 'unrecorded'), \
             JSONExtractUInt(args_json, 'unrecorded'), 1)) AS count";
        // A row stored twice (an insert retried) is one row.
        let rows = format!(
            "(SELECT chain_id, seq, {}, ts_ms, route, request_id, args_json FROM {} \
             WHERE {HOUR} LIMIT 1 BY chain_id, seq)",
            texts_as_utf8(&["stage", "code"]),
            self.table
        );
        let by_code = self
            .client
            .query(&format!(
                "SELECT stage, code, {COUNT} FROM {rows} \
                 GROUP BY stage, code ORDER BY count DESC, stage, code {READ_SETTINGS}"
            ))
            .fetch_all::<CodeCount>()
            .await?;
        let per_minute = self
            .client
            .query(&format!(
                "SELECT toUInt32(intDiv(ts_ms, 60000) * 60) AS minute, stage, {COUNT} \
                 FROM {rows} GROUP BY minute, stage ORDER BY minute, stage {READ_SETTINGS}"
            ))
            .fetch_all::<MinuteCount>()
            .await?;
        Ok(Refusals {
            by_code,
            per_minute,
        })
    }

    /// The send audit of the last hour: per minute by route and outcome, and the
    /// latency histogram of landed sends.
    pub async fn sends(&self) -> Result<SendStats, QueryError> {
        const HOUR: &str = "ts_us > toUInt64(toUnixTimestamp64Micro(now64(6))) - 3600000000";
        let per_minute = self
            .client
            .query(&format!(
                "SELECT toUInt32(intDiv(ts_us, 60000000) * 60) AS minute, {}, \
                        countIf(hedged = 1) AS hedged, count() AS count \
                 FROM {SENDS_TABLE} WHERE {HOUR} \
                 GROUP BY minute, route, outcome ORDER BY minute, route, outcome \
                 {READ_SETTINGS}",
                utf8(&["route", "outcome"])
            ))
            .fetch_all::<SendMinute>()
            .await?;
        let latency = self
            .client
            .query(&format!(
                "SELECT {}, toUInt64(pow(2, ceil(log2(greatest(latency_us, 1))))) AS le_us, \
                        count() AS count \
                 FROM {SENDS_TABLE} WHERE {HOUR} AND outcome = 'landed' \
                 GROUP BY route, le_us ORDER BY route, le_us {READ_SETTINGS}",
                utf8(&["route"])
            ))
            .fetch_all::<LatencyBucket>()
            .await?;
        Ok(SendStats {
            per_minute,
            latency,
        })
    }

    /// The newest checkpoint of each chain: of the [`CHECKPOINTS_READ`] largest,
    /// the largest this node signed when there is one (a row inserted with a
    /// larger size and no such signature does not hide it), else the largest.
    pub async fn checkpoints(&self) -> Result<Vec<CheckpointView>, QueryError> {
        let rows = self
            .client
            .query(&format!(
                "SELECT {}, size, {}, ts_ms FROM {} \
                 ORDER BY chain_id, size DESC LIMIT {CHECKPOINTS_READ} BY chain_id {READ_SETTINGS}",
                utf8(&["chain_id"]),
                utf8(&["head", "note"]),
                super::checkpoint::TABLE
            ))
            .fetch_all::<CheckpointRow>()
            .await?;
        let mut out: Vec<CheckpointView> = Vec::new();
        for r in rows {
            let signed_here = self.signer.as_ref().is_some_and(|vk| signed_by(&r, vk));
            let view = CheckpointView {
                chain_id: r.chain_id,
                size: r.size,
                head: r.head,
                note: r.note,
                ts_ms: r.ts_ms,
                signed_here,
            };
            match out.last_mut() {
                // The chain's first (largest) row; replaced by a smaller one
                // this node signed, if the first was not.
                Some(v) if v.chain_id == view.chain_id => {
                    if !v.signed_here && view.signed_here {
                        *v = view;
                    }
                }
                _ => out.push(view),
            }
        }
        Ok(out)
    }

    /// The decisions about one `request_id`, in order ([`Cursor::key`]), after
    /// `after` when given: [`MAX_BY_REQUEST`] at most (a refused request's id is
    /// whatever its body said, so anyone may pile rows under one; the next page
    /// starts after the last).
    pub async fn by_request(
        &self,
        request_id: &str,
        after: Option<&Cursor>,
    ) -> Result<Vec<DecisionView>, QueryError> {
        let q = self
            .client
            .query(&format!(
                "SELECT {} FROM {} WHERE request_id = ? \
                   AND (? = 0 OR (ts_ms, chain_id, seq) > (?, ?, ?)) \
                 ORDER BY ts_ms, chain_id, seq LIMIT 1 BY chain_id, seq LIMIT {MAX_BY_REQUEST} \
                 {READ_SETTINGS}",
                decision_columns(),
                self.table
            ))
            .bind(request_id);
        Ok(bind_cursor(q, after).fetch_all::<DecisionView>().await?)
    }

    /// Applied POLICY commands per five minutes, over the last
    /// [`POLICY_FREQUENCY_DAYS`] days.
    pub async fn policy_frequency(&self) -> Result<Vec<PolicyWindow>, QueryError> {
        Ok(self
            .client
            .query(&format!(
                "SELECT toUnixTimestamp(toStartOfFiveMinute(fromUnixTimestamp64Milli(toInt64(ts_ms)))) AS window_start, \
                        uniqExact(chain_id, seq) AS commands \
                 FROM {} WHERE action = 'policy' AND stage = 'agent' AND decision = 'applied' \
                   AND ts_ms > toUInt64(toUnixTimestamp64Milli(now64(3))) - {} \
                 GROUP BY window_start ORDER BY window_start {READ_SETTINGS}",
                self.table,
                u64::from(POLICY_FREQUENCY_DAYS) * 86_400_000
            ))
            .fetch_all::<PolicyWindow>()
            .await?)
    }

    /// Walks every stored hash chain, as `gwctl ledger verify` does: streamed,
    /// holding no row (a ledger of any size is walked in constant memory), one
    /// walk at a time: a caller waits for the one running [`VERIFY_WAIT`] at
    /// most (`None`: it was still running).
    pub async fn verify(&self) -> Result<Option<LedgerStatus>, QueryError> {
        let Ok(_one) = tokio::time::timeout(VERIFY_WAIT, self.walking.lock()).await else {
            return Ok(None);
        };
        // Rows under a chain id that is not UTF-8 are not walked (no gateway
        // writes one), but counted: the ledger does not verify while it holds any.
        #[derive(clickhouse::Row, Deserialize)]
        struct NotWalked {
            rows: u64,
            chains: u64,
        }
        let not_walked = self
            .client
            .query(&gw_core::ledger::not_walked_sql(&self.table))
            .fetch_one::<NotWalked>()
            .await?;
        let mut cursor = self
            .client
            .query(&gw_core::ledger::walk_sql(&self.table))
            .fetch::<DecisionRow>()?;
        let not_utf8 = (not_walked.rows > 0).then_some(NotUtf8 {
            rows: not_walked.rows,
            chains: not_walked.chains,
        });
        let anchors = self
            .anchors
            .as_ref()
            .map(|a| a.lock().clone())
            .unwrap_or_default();
        let mut listing = Listing::default();
        let mut walk = gw_core::checkpoint::ChainsWalk::new(anchors);
        while let Some(r) = cursor.next().await? {
            match walk.push(&gw_core::ledger::LedgerRow::from(r)) {
                Ok(ended) => {
                    if let Some(w) = ended {
                        listing.add(chain_status(w, self.own_chain.as_deref()));
                    }
                }
                Err(e) => {
                    // Nothing after it can be believed: the walk ends here, not
                    // verified; the chains walked to their end before it stand.
                    tracing::error!(error = %e, "ledger verification: ClickHouse's answer is out of order");
                    return Ok(Some(listing.status(
                        Some(format!("the walk stopped: {e}")),
                        self.anchors.is_some(),
                        not_utf8,
                    )));
                }
            }
        }
        // Then the chains this node checkpointed and ClickHouse holds no row of.
        for w in walk.finish() {
            listing.add(chain_status(w, self.own_chain.as_deref()));
        }
        Ok(Some(listing.status(None, self.anchors.is_some(), not_utf8)))
    }
}

#[cfg(test)]
mod tests {
    use super::{ChainStatus, Cursor, Listing, MAX_CHAINS_LISTED};

    fn status(id: usize, ok: bool) -> ChainStatus {
        ChainStatus {
            chain_id: format!("c{id:07}"),
            ok,
            rows: 1,
            broken: (!ok).then(|| "broken".to_owned()),
            breaks: Vec::new(),
            more_breaks: 0,
            checkpoint: None,
            anchored: id.is_multiple_of(2),
            this_node: id == 1,
        }
    }

    /// However many chains a store holds, a verification lists a bounded number,
    /// broken ones in the place of ones that verified, and counts the rest.
    #[test]
    fn a_verification_lists_a_bounded_number_of_chains_broken_ones_first() {
        let mut l = Listing::default();
        for i in 0..10_000 {
            l.add(status(i, i % 1000 != 999));
        }
        let s = l.status(None, true, None);
        assert_eq!(s.chains.len(), MAX_CHAINS_LISTED);
        assert!(!s.ok);
        let broken = s.chains.iter().filter(|c| !c.ok).count();
        assert_eq!((broken, s.more_chains_broken), (10, 0));
        assert_eq!(s.more_chains_ok, 10_000 - MAX_CHAINS_LISTED as u64);
        assert!(s.chains.windows(2).all(|w| w[0].chain_id < w[1].chain_id));
        // Every chain no checkpoint vouches for is counted, listed or not, but
        // this node's own (c0000001: no checkpoint of it yet).
        assert_eq!(s.unanchored, 4_999);
        // More broken chains than places: the rest counted, still not ok.
        let mut l = Listing::default();
        for i in 0..MAX_CHAINS_LISTED + 5 {
            l.add(status(i, false));
        }
        let s = l.status(None, true, None);
        assert_eq!(
            (s.chains.len(), s.more_chains_broken),
            (MAX_CHAINS_LISTED, 5)
        );
        let mut l = Listing::default();
        l.add(status(1, true));
        assert!(l.status(None, true, None).ok);
    }

    #[test]
    fn a_cursor_is_the_time_the_position_and_the_chain_which_may_hold_dots() {
        let c = Cursor::parse("1800000000123.42.node-a.eu").unwrap();
        assert_eq!(c.key(), (1_800_000_000_123, "node-a.eu", 42));
        for bad in [
            "",
            "1.2",
            "1.2.",
            "x.2.n",
            "1.+2.n",
            "1..n",
            "99999999999999999999999.1.n",
        ] {
            assert_eq!(Cursor::parse(bad), None, "{bad:?}");
        }
        assert!(Cursor::parse(&format!("1.2.{}", "c".repeat(257))).is_none());
    }
}
