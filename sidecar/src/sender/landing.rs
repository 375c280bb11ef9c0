//! What a Solana RPC node does for `sendTransaction` beyond sending it once, done
//! with a configured RPC node (`sender.rpc_node`) that has the bank the gateway
//! lacks:
//!
//! - **preflight**: `skipPreflight: false` (Solana's default) simulates the
//!   transaction on the node first (`simulateTransaction`, `preflightCommitment`)
//!   and refuses it the way Solana does: -32002 "Transaction simulation failed: …"
//!   with the simulation's `err`, `logs`, `accounts`, `unitsConsumed` as `data`;
//! - **`minContextSlot`**: the node's slot must have reached it, else -32016
//!   "Minimum context slot has not been reached" with `data.contextSlot`;
//! - **`maxRetries`**: absent, the transaction is sent again every
//!   `rebroadcast_ms` until the node sees its signature confirmed
//!   (`getSignatureStatuses`; while only processed, it waits without resending),
//!   its blockhash expires (`isBlockhashValid`: false after true, or five times in
//!   a row), the gating module stops sending, or `max_age_secs` (150 blocks) pass;
//!   `N` sends it again at most N times; 0 never. One loop polls for every
//!   transaction in flight, in rounds at a quarter of `rebroadcast_ms`: one
//!   `getSignatureStatuses` per 256 signatures due, and one `isBlockhashValid` per
//!   blockhash in use at most once per `rebroadcast_ms` (so "five in a row" is
//!   five periods), up to 8 calls of each kind at once; the node's load grows
//!   with the blockhashes in use, not with the transactions. The node is polled
//!   by one task at a time, never cut short, and what it says is acted on when a
//!   transaction is next due; a round waits for it at most `rebroadcast_ms`, so a
//!   slow node delays no resend by more than that. A transaction whose resend is
//!   still on its way is not resent again;
//! - **`getSignatureStatuses`**: the node's answer, with the statuses the
//!   rebroadcast loop saw confirmed filled in where the node has none (e.g. a
//!   lagging node behind a load balancer).
//!
//! The node is called with a deadline (`timeout_ms`); when it cannot answer a
//! preflight, the send is refused (-32603, transient, naming the node): an
//! unchecked transaction is not sent when the client asked for a check. At most `max_pending`
//! transactions are rebroadcast at once, at most `max_pending_per_requester` (half,
//! by default) of one requester's; beyond that a send goes out once and is
//! counted.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{upstream, SendMeta, Sender};
use crate::config::OutOfBounds;

/// Solana's code for a failed preflight.
pub const PREFLIGHT_FAILURE: i64 = -32002;
/// Solana's code for a `minContextSlot` the node has not reached.
pub const MIN_CONTEXT_SLOT_NOT_REACHED: i64 = -32016;
/// Most signatures `getSignatureStatuses` takes (Solana's limit).
pub const MAX_STATUS_SIGNATURES: usize = 256;
/// Confirmed statuses the rebroadcast loop saw, kept for `getSignatureStatuses`.
const SEEN_KEPT: usize = 65_536;

/// `sender.rpc_node`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpcNodeConfig {
    /// JSON-RPC URL of a Solana node.
    pub url: String,
    /// Deadline of each call to it.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// How often an unconfirmed transaction is sent again (Solana's
    /// send-transaction-service: 2 s).
    #[serde(default = "default_rebroadcast")]
    pub rebroadcast_ms: u64,
    /// The longest a transaction is rebroadcast (150 blocks ≈ 60–90 s).
    #[serde(default = "default_max_age")]
    pub max_age_secs: u64,
    /// Transactions rebroadcast at once.
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    /// Of those, the most one requester (the token's `sub`) may have: one client
    /// sending faster than its transactions land does not take every other's
    /// rebroadcasts. Default: half of `max_pending`.
    #[serde(default)]
    pub max_pending_per_requester: Option<usize>,
}

impl std::fmt::Debug for RpcNodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL without its path and query: a provider's key may be in either.
        f.debug_struct("RpcNodeConfig")
            .field("url", &upstream::redact(&self.url))
            .field("timeout_ms", &self.timeout_ms)
            .field("rebroadcast_ms", &self.rebroadcast_ms)
            .field("max_age_secs", &self.max_age_secs)
            .field("max_pending", &self.max_pending)
            .field("max_pending_per_requester", &self.max_pending_per_requester)
            .finish()
    }
}

fn default_timeout() -> u64 {
    2_000
}
fn default_rebroadcast() -> u64 {
    2_000
}
fn default_max_age() -> u64 {
    90
}
fn default_max_pending() -> usize {
    10_000
}

impl RpcNodeConfig {
    /// Checks the bounds.
    pub fn validate(&self) -> Result<(), OutOfBounds> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(OutOfBounds::new(
                "sender.rpc_node.url",
                "must be an http(s) URL",
            ));
        }
        if !(50..=60_000).contains(&self.timeout_ms) {
            return Err(OutOfBounds::new(
                "sender.rpc_node.timeout_ms",
                "must be within 50..=60000",
            ));
        }
        if !(50..=60_000).contains(&self.rebroadcast_ms) {
            return Err(OutOfBounds::new(
                "sender.rpc_node.rebroadcast_ms",
                "must be within 50..=60000",
            ));
        }
        if !(1..=600).contains(&self.max_age_secs) {
            return Err(OutOfBounds::new(
                "sender.rpc_node.max_age_secs",
                "must be within 1..=600",
            ));
        }
        if !(1..=1_000_000).contains(&self.max_pending) {
            return Err(OutOfBounds::new(
                "sender.rpc_node.max_pending",
                "must be within 1..=1000000",
            ));
        }
        if self
            .max_pending_per_requester
            .is_some_and(|n| !(1..=self.max_pending).contains(&n))
        {
            return Err(OutOfBounds::new(
                "sender.rpc_node.max_pending_per_requester",
                "must be within 1..=max_pending",
            ));
        }
        Ok(())
    }

    /// What one requester may have rebroadcast at once.
    pub fn per_requester(&self) -> usize {
        self.max_pending_per_requester
            .unwrap_or(self.max_pending.div_ceil(2))
    }
}

/// A JSON-RPC error to answer with: code, message, data.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeError {
    /// The stable code of its ledger row: `node_refused` (the node's own error,
    /// passed on), `unavailable` (the node did not answer, or not usefully),
    /// `overloaded` (no turn at the node).
    pub refusal: gw_core::Code,
    /// JSON-RPC code.
    pub code: i64,
    /// Message.
    pub message: String,
    /// `data`, when any.
    pub data: Option<Value>,
}

/// Counters.
#[derive(Debug, Default)]
pub struct LandingStats {
    /// Preflights that refused a transaction.
    pub preflight_failed: AtomicU64,
    /// Transactions sent again.
    pub rebroadcasts: AtomicU64,
    /// Rebroadcasts that ended because the node saw the signature.
    pub seen: AtomicU64,
    /// … because the blockhash expired (or `max_age_secs` passed).
    pub expired: AtomicU64,
    /// … because `maxRetries` was used up.
    pub retries_spent: AtomicU64,
    /// Sends not rebroadcast because `max_pending` were.
    pub not_tracked: AtomicU64,
    /// Rebroadcasts ended because the gating module no longer lets sends through.
    pub refused: AtomicU64,
    /// Clients' `getSignatureStatuses` refused `busy`: no turn within a node
    /// call's timeout.
    pub status_busy: AtomicU64,
}

/// One transaction being rebroadcast.
struct Pending {
    sender: Arc<Sender>,
    wire: Bytes,
    blockhash: String,
    max_retries: Option<usize>,
    /// Whether it is sent again (a sender with a TPU route); else only followed
    /// until it is seen, expires or `max_age_secs` pass.
    resend: bool,
    /// Its audit row's context; its gate holds resends too (the module's kill
    /// switch and stop).
    meta: SendMeta,
    sent_again: usize,
    /// A resend of it is still on its way (no second one is started meanwhile).
    sending: Arc<std::sync::atomic::AtomicBool>,
    /// Rebroadcasting ends at this moment (`max_age_secs`).
    until: Instant,
    /// Next poll (each transaction waits `rebroadcast_ms` between polls).
    due: Instant,
}

/// What the rebroadcast loop works on; `running` says whether the loop is up.
#[derive(Default)]
struct Tracked {
    txs: HashMap<String, Pending>,
    /// Of `txs`, how many each requester (the token's issuer and `sub`) has.
    by_requester: HashMap<(String, String), usize>,
    running: bool,
}

impl Tracked {
    /// Takes `sig` off, and off its requester's count.
    fn remove(&mut self, sig: &str) {
        let Some(t) = self.txs.remove(sig) else {
            return;
        };
        let holder = t.meta.requester.holder();
        if let Some(n) = self.by_requester.get_mut(&holder) {
            *n -= 1;
            if *n == 0 {
                self.by_requester.remove(&holder);
            }
        }
    }
}

/// The blockhash counts as expired once the node said it was valid and then not
/// [`INVALID_AFTER_VALID`] times in a row (one answer from a node behind a load
/// balancer that has not seen it yet does not end the rebroadcast), or said "not
/// valid" this many times in a row (a node that lags the client's blockhash source;
/// a durable nonce's "blockhash").
const INVALID_IN_A_ROW: u32 = 5;
/// See [`INVALID_IN_A_ROW`].
const INVALID_AFTER_VALID: u32 = 2;

/// What the node said of one blockhash.
#[derive(Default, Debug)]
struct Blockhash {
    /// It was valid once.
    was_valid: bool,
    /// "Not valid" answers in a row.
    invalid: u32,
    /// When it was last asked (at most once per `rebroadcast_ms`).
    polled: Option<Instant>,
    /// It counts as expired.
    expired: bool,
}

impl Blockhash {
    /// The node's answer to `isBlockhashValid` (`None`: no answer).
    fn answered(&mut self, valid: Option<bool>) {
        match valid {
            Some(true) => (self.was_valid, self.invalid) = (true, 0),
            Some(false) => {
                self.invalid += 1;
                let need = if self.was_valid {
                    INVALID_AFTER_VALID
                } else {
                    INVALID_IN_A_ROW
                };
                if self.invalid >= need {
                    self.expired = true;
                }
            }
            None => {}
        }
    }
}

/// Node calls of one round at once at most.
const ROUND_CONCURRENCY: usize = 8;
/// Clients' `getSignatureStatuses` calls to the node at once at most (a batch of
/// 64 is 64 calls; more wait their turn).
const STATUS_CONCURRENCY: usize = 8;

/// The landing semantics, with a node.
pub struct Landing {
    http: reqwest::Client,
    cfg: RpcNodeConfig,
    pending: Mutex<Tracked>,
    /// What the node said of each blockhash in use.
    blockhashes: Mutex<HashMap<String, Blockhash>>,
    seen: Mutex<(HashMap<String, Value>, VecDeque<String>)>,
    /// Statuses the rebroadcast loop's polls learned, not yet acted on (`Null`:
    /// the node has none): taken when their transaction is next due, however
    /// late the node answered.
    learned: Mutex<HashMap<String, Value>>,
    /// Turns of clients' status calls ([`STATUS_CONCURRENCY`]).
    status_calls: tokio::sync::Semaphore,
    /// Set at shutdown ([`Landing::stop`]): nothing is resent or tracked after.
    stopped: std::sync::atomic::AtomicBool,
    /// Resends on the wire (their audit rows not recorded yet).
    resending: Arc<std::sync::atomic::AtomicUsize>,
    /// Counters.
    pub stats: LandingStats,
}

impl Landing {
    /// A client of `cfg.url`.
    pub fn new(cfg: RpcNodeConfig) -> anyhow::Result<Arc<Landing>> {
        cfg.validate()?;
        let http = super::upstream::client_builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .build()?;
        Ok(Arc::new(Landing {
            http,
            cfg,
            pending: Mutex::new(Tracked::default()),
            blockhashes: Mutex::new(HashMap::new()),
            seen: Mutex::new((HashMap::new(), VecDeque::new())),
            learned: Mutex::new(HashMap::new()),
            status_calls: tokio::sync::Semaphore::new(STATUS_CONCURRENCY),
            stopped: std::sync::atomic::AtomicBool::new(false),
            resending: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            stats: LandingStats::default(),
        }))
    }

    /// At shutdown: nothing is resent or tracked from now on, so that every
    /// resend that went has its audit row before the journal stops
    /// ([`Self::resending`] says when the last one on the wire ended).
    pub fn stop(&self) {
        // Under the lock `settle` decides resends in (and counts them in
        // `resending`) under: once this returns, no resend starts.
        let _p = self.pending.lock();
        self.stopped.store(true, Ordering::Release);
    }

    /// Resends on the wire now (each records its audit row as it ends).
    pub fn resending(&self) -> usize {
        self.resending.load(Ordering::Acquire)
    }

    /// Calls `method` on the node: its `result`, or its error as [`NodeError`]
    /// (a transport failure is code -32603 naming the node).
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, NodeError> {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let unreachable = |e: String| NodeError {
            refusal: gw_core::Code::Unavailable,
            code: -32603,
            message: format!("the RPC node did not answer {method}: {e}"),
            data: None,
        };
        // Read within a bound, and with the node's URL kept out of the message:
        // it goes to JSON-RPC callers and audit rows, and a provider's key is
        // often in the URL.
        let mut v =
            upstream::post_json(&self.http, &self.cfg.url, &body, upstream::MAX_ANSWER_BYTES)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
        if let Some(e) = v.get_mut("error") {
            return Err(node_refusal(method, e));
        }
        v.get_mut("result")
            .map(Value::take)
            .ok_or_else(|| unreachable("an answer without result".into()))
    }

    /// `minContextSlot` without a preflight: the node's slot at `commitment`.
    pub async fn check_min_slot(&self, min: u64, commitment: &str) -> Result<(), NodeError> {
        let slot = self
            .call("getSlot", json!([{"commitment": commitment}]))
            .await?
            .as_u64()
            .ok_or_else(|| NodeError {
                refusal: gw_core::Code::Unavailable,
                code: -32603,
                message: "the RPC node answered getSlot with no slot".to_owned(),
                data: None,
            })?;
        if slot < min {
            return Err(NodeError {
                refusal: gw_core::Code::NodeRefused,
                code: MIN_CONTEXT_SLOT_NOT_REACHED,
                message: "Minimum context slot has not been reached".into(),
                data: Some(json!({"contextSlot": slot})),
            });
        }
        Ok(())
    }

    /// Simulates `wire` on the node; refuses it the way Solana's preflight does.
    pub async fn preflight(
        &self,
        wire: &[u8],
        commitment: &str,
        min_context_slot: Option<u64>,
    ) -> Result<(), NodeError> {
        use base64::Engine as _;
        let mut opts = json!({"encoding": "base64", "commitment": commitment, "sigVerify": true});
        if let Some(m) = min_context_slot {
            opts["minContextSlot"] = json!(m);
        }
        let tx = base64::engine::general_purpose::STANDARD.encode(wire);
        // The node's own refusals (e.g. -32016) pass through as it gave them; a
        // node that does not answer is -32603 (transient, not a failed
        // simulation), and the transaction is not sent unchecked.
        let r = self
            .call("simulateTransaction", json!([tx, opts]))
            .await
            .map_err(|mut e| {
                if e.code == -32603 {
                    e.message = format!("{}; the transaction was not sent", e.message);
                }
                e
            })?;
        // A simulation's answer is `{"context": …, "value": {"err": …, …}}` (`err`
        // null when it passed). One of another shape (`null`, `{}`) checked
        // nothing: the transaction is not sent unchecked.
        let value = r.get("value").cloned().unwrap_or(Value::Null);
        if value.get("err").is_none() {
            return Err(NodeError {
                refusal: gw_core::Code::Unavailable,
                code: -32603,
                message: "the RPC node's simulateTransaction answer holds no simulation; the transaction was not sent".into(),
                data: None,
            });
        }
        match value.get("err") {
            None | Some(Value::Null) => Ok(()),
            Some(err) => {
                self.stats.preflight_failed.fetch_add(1, Ordering::Relaxed);
                Err(NodeError {
                    refusal: gw_core::Code::NodeRefused,
                    code: PREFLIGHT_FAILURE,
                    message: format!("Transaction simulation failed: {}", describe(err)),
                    data: Some(value),
                })
            }
        }
    }

    /// Rebroadcasts `wire` until the node sees `signature`, its `blockhash`
    /// expires, `max_retries` resends are spent, `max_age_secs` pass, or `meta`'s
    /// gate closes. Whether it is rebroadcast now (tracked before, or from now
    /// on; not when only followed, without a TPU route, or not taken).
    pub fn track(
        self: &Arc<Self>,
        sender: Arc<Sender>,
        wire: Bytes,
        signature: String,
        blockhash: [u8; 32],
        max_retries: Option<usize>,
        meta: SendMeta,
    ) -> bool {
        // Not when its module stopped sending meanwhile: the first round would
        // end it unsent, after its client was told it goes on.
        if max_retries == Some(0) || self.stopped.load(Ordering::Acquire) || !meta.gate.open() {
            return false;
        }
        // Without a TPU route it is followed, not rebroadcast: every resend went
        // to the relay (a block engine forwards what it takes to the leader
        // itself), each a request against its rate limit (≈ 45 a transaction at
        // the defaults, thousands a second with `max_pending` waiting), which
        // the new sends then found spent. A client's resend of it is sent (it is
        // the only one), and its status is what the loop saw.
        let resend = sender.configured(super::hedge::Route::Tpu);
        let every = Duration::from_millis(self.cfg.rebroadcast_ms);
        let now = Instant::now();
        let start_loop = {
            let mut p = self.pending.lock();
            if let Some(t) = p.txs.get(&signature) {
                // Already tracked (a client resent the same bytes).
                return t.resend;
            }
            let holder = meta.requester.holder();
            let mine = p.by_requester.get(&holder).copied().unwrap_or(0);
            if p.txs.len() >= self.cfg.max_pending || mine >= self.cfg.per_requester() {
                self.stats.not_tracked.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            *p.by_requester.entry(holder).or_default() += 1;
            p.txs.insert(
                signature,
                Pending {
                    sender,
                    wire,
                    blockhash: bs58::encode(blockhash).into_string(),
                    max_retries,
                    resend,
                    meta,
                    sent_again: 0,
                    sending: Arc::default(),
                    until: now + Duration::from_secs(self.cfg.max_age_secs),
                    due: now + every,
                },
            );
            !std::mem::replace(&mut p.running, true)
        };
        if start_loop {
            tokio::spawn(self.clone().rebroadcast_loop());
        }
        resend
    }

    /// Polls the node for every transaction due, in batches, and resends those
    /// still unseen; ends when nothing is left (the next `track` starts it again).
    async fn rebroadcast_loop(self: Arc<Self>) {
        /// Marks the loop stopped if it ends abnormally (a panic, the runtime
        /// shutting down), so the next `track` starts it again; disarmed on the
        /// normal exit, which clears `running` under the lock itself.
        struct Running<'a>(Option<&'a Mutex<Tracked>>);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                if let Some(m) = self.0 {
                    m.lock().running = false;
                }
            }
        }
        let mut guard = Running(Some(&self.pending));
        let every = Duration::from_millis(self.cfg.rebroadcast_ms);
        // Rounds at a quarter of the period: each transaction is polled between
        // 1 and 1.25 periods after its previous poll.
        let tick = (every / 4).max(Duration::from_millis(10));
        // The node is polled by one task at a time, which is never cut short: its
        // answers are acted on when they come ([`Landing::learned`], the
        // blockhashes' state). A round waits for it at most a period; a
        // transaction due is resent on time whatever the node has not said yet,
        // as Agave's service resends on its timer.
        let mut poll: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            tokio::time::sleep(tick).await;
            let now = Instant::now();
            let (due, hashes): (Vec<String>, HashSet<String>) = {
                let mut p = self.pending.lock();
                // Stopped (shutdown): nothing more is resent, nor the node polled.
                if p.txs.is_empty() || self.stopped.load(Ordering::Acquire) {
                    // Under the lock: a `track` after this starts a new loop.
                    p.running = false;
                    guard.0 = None;
                    drop(p);
                    self.blockhashes.lock().clear();
                    self.learned.lock().clear();
                    return;
                }
                let due: Vec<String> = p
                    .txs
                    .iter()
                    .filter(|(_, t)| t.due <= now)
                    .map(|(s, _)| s.clone())
                    .collect();
                let hashes = due
                    .iter()
                    .filter_map(|s| p.txs.get(s).map(|t| t.blockhash.clone()))
                    .collect();
                // Forget blockhashes no pending transaction uses.
                let live: HashSet<&str> = p.txs.values().map(|t| t.blockhash.as_str()).collect();
                self.blockhashes
                    .lock()
                    .retain(|h, _| live.contains(h.as_str()));
                self.learned.lock().retain(|s, _| p.txs.contains_key(s));
                (due, hashes)
            };
            if due.is_empty() {
                continue;
            }
            if poll
                .as_ref()
                .is_none_or(tokio::task::JoinHandle::is_finished)
            {
                let (me, sigs) = (self.clone(), due.clone());
                let hashes = hashes.clone();
                poll = Some(tokio::spawn(async move {
                    let (statuses, ()) =
                        tokio::join!(me.poll_statuses(&sigs), me.poll_blockhashes(hashes, every));
                    me.learned.lock().extend(statuses);
                }));
            }
            if let Some(running) = poll.as_mut() {
                let round = tokio::time::Instant::now() + every;
                if tokio::time::timeout_at(round, running).await.is_ok() {
                    poll = None;
                }
            }
            let statuses: HashMap<String, Value> = {
                let mut learned = self.learned.lock();
                due.iter()
                    .filter_map(|s| learned.remove(s).map(|v| (s.clone(), v)))
                    .collect()
            };
            let expired: HashSet<String> = {
                let known = self.blockhashes.lock();
                hashes
                    .into_iter()
                    .filter(|h| known.get(h).is_some_and(|b| b.expired))
                    .collect()
            };
            self.settle(due, &statuses, &expired, now + every);
        }
    }

    /// `getSignatureStatuses` for `sigs`, 256 at a time, a few calls at once: each
    /// signature's status (absent when the node did not answer, `Null` when it has
    /// none).
    async fn poll_statuses(&self, sigs: &[String]) -> HashMap<String, Value> {
        use futures_util::stream::{self, StreamExt};
        // Owned chunks: a future over borrowed ones is not `Send` for every
        // lifetime, which `tokio::spawn` needs.
        let chunks: Vec<Vec<String>> = sigs
            .chunks(MAX_STATUS_SIGNATURES)
            .map(<[String]>::to_vec)
            .collect();
        let answers: Vec<(Vec<String>, Option<Value>)> = stream::iter(chunks)
            .map(|chunk| async move {
                let v = self
                    .call(
                        "getSignatureStatuses",
                        json!([chunk, {"searchTransactionHistory": false}]),
                    )
                    .await
                    .ok();
                (chunk, v)
            })
            .buffer_unordered(ROUND_CONCURRENCY)
            .collect()
            .await;
        let mut out = HashMap::with_capacity(sigs.len());
        for (chunk, v) in answers {
            // An answer of another shape says nothing of these signatures
            // (polled again next round).
            let Some(values) = v.as_ref().and_then(|v| status_values(v, chunk.len())) else {
                continue;
            };
            out.extend(chunk.into_iter().zip(values));
        }
        out
    }

    /// `isBlockhashValid` for each blockhash not asked within `every`, a few at
    /// once; what the node said goes into each blockhash's state.
    async fn poll_blockhashes(&self, hashes: HashSet<String>, every: Duration) {
        use futures_util::stream::{self, StreamExt};
        let now = Instant::now();
        let ask: Vec<String> = {
            let known = self.blockhashes.lock();
            hashes
                .iter()
                .filter(|h| {
                    known
                        .get(*h)
                        .and_then(|b| b.polled)
                        .is_none_or(|t| now.duration_since(t) >= every)
                })
                .cloned()
                .collect()
        };
        let answers: Vec<(String, Option<Value>)> = stream::iter(ask)
            .map(|h| async move {
                let v = self
                    .call("isBlockhashValid", json!([h, {"commitment": "processed"}]))
                    .await
                    .ok();
                (h, v)
            })
            .buffer_unordered(ROUND_CONCURRENCY)
            .collect()
            .await;
        let mut known = self.blockhashes.lock();
        for (h, v) in answers {
            let b = known.entry(h).or_default();
            b.polled = Some(now);
            b.answered(v.as_ref().and_then(|v| v["value"].as_bool()));
        }
    }

    /// Ends or resends each polled transaction, as its status, its blockhash, its
    /// age, its retries and its module allow.
    fn settle(
        &self,
        due: Vec<String>,
        statuses: &HashMap<String, Value>,
        expired: &HashSet<String>,
        next: Instant,
    ) {
        enum Next<'a> {
            /// Rebroadcasting ends; the counter says why.
            End(&'a AtomicU64),
            Wait,
            Resend(
                Arc<Sender>,
                Bytes,
                SendMeta,
                Arc<std::sync::atomic::AtomicBool>,
            ),
        }
        let now = Instant::now();
        let mut p = self.pending.lock();
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        for sig in due {
            let next = {
                let Some(t) = p.txs.get_mut(&sig) else {
                    continue;
                };
                t.due = next;
                let status = statuses.get(&sig).filter(|s| !s.is_null());
                let level =
                    status.map(|st| st["confirmationStatus"].as_str().unwrap_or("processed"));
                if let (Some(st), Some("confirmed" | "finalized")) = (status, level) {
                    self.remember(&sig, st.clone());
                    Next::End(&self.stats.seen)
                } else if now >= t.until || expired.contains(&t.blockhash) {
                    Next::End(&self.stats.expired)
                } else if status.is_some() {
                    // In a block not yet confirmed: wait, do not resend (a dropped
                    // fork makes it null again, and then it is resent).
                    Next::Wait
                } else if !t.meta.gate.open() {
                    // The module's kill switch and stop hold for resends too.
                    Next::End(&self.stats.refused)
                } else if !t.resend {
                    Next::Wait
                } else if t.max_retries.is_some_and(|m| t.sent_again >= m) {
                    Next::End(&self.stats.retries_spent)
                } else if t.sending.swap(true, Ordering::AcqRel) {
                    // The previous resend has not finished (a stalled route): no
                    // second one on top of it.
                    Next::Wait
                } else {
                    t.sent_again += 1;
                    Next::Resend(
                        t.sender.clone(),
                        t.wire.clone(),
                        t.meta.clone(),
                        t.sending.clone(),
                    )
                }
            };
            match next {
                Next::Wait => {}
                Next::End(why) => {
                    p.remove(&sig);
                    why.fetch_add(1, Ordering::Relaxed);
                }
                Next::Resend(sender, wire, meta, sending) => {
                    self.stats.rebroadcasts.fetch_add(1, Ordering::Relaxed);
                    let resending = self.resending.clone();
                    resending.fetch_add(1, Ordering::AcqRel);
                    tokio::spawn(async move {
                        let _ = sender.resend(wire, sig, &meta).await;
                        sending.store(false, Ordering::Release);
                        resending.fetch_sub(1, Ordering::AcqRel);
                    });
                }
            }
        }
    }

    fn remember(&self, signature: &str, status: Value) {
        let mut g = self.seen.lock();
        let (map, order) = &mut *g;
        if map.insert(signature.to_owned(), status).is_none() {
            order.push_back(signature.to_owned());
            while order.len() > SEEN_KEPT {
                if let Some(old) = order.pop_front() {
                    map.remove(&old);
                }
            }
        }
    }

    /// Transactions being rebroadcast now.
    pub fn pending(&self) -> usize {
        self.pending.lock().txs.len()
    }

    /// Whether `signature` is being rebroadcast now (a transaction only followed,
    /// a relay-only sender's, is not: a client's resend of it is the only one).
    pub fn is_pending(&self, signature: &str) -> bool {
        self.pending
            .lock()
            .txs
            .get(signature)
            .is_some_and(|t| t.resend)
    }

    /// `getSignatureStatuses`: the node's answer, with what the rebroadcast loop saw
    /// filled in where the node has nothing.
    pub async fn statuses(
        &self,
        signatures: &[String],
        search_history: Option<bool>,
    ) -> Result<Value, NodeError> {
        let params = match search_history {
            Some(b) => json!([signatures, { "searchTransactionHistory": b }]),
            None => json!([signatures]),
        };
        let mut r = {
            // Waits at most a node call's timeout for a turn: one client's batch
            // of calls does not hold everyone else's polling until their own
            // clients give up.
            let wait = Duration::from_millis(self.cfg.timeout_ms);
            let _turn = match tokio::time::timeout(wait, self.status_calls.acquire()).await {
                Ok(Ok(turn)) => turn,
                Ok(Err(_)) => {
                    return Err(NodeError {
                        refusal: gw_core::Code::Unavailable,
                        code: -32603,
                        message: "shutting down".to_owned(),
                        data: None,
                    })
                }
                Err(_) => {
                    self.stats.status_busy.fetch_add(1, Ordering::Relaxed);
                    return Err(NodeError {
                        refusal: gw_core::Code::Overloaded,
                        code: super::rpc::code::REFUSED,
                        message: format!(
                            "busy: {STATUS_CONCURRENCY} status calls to the RPC node are running; retry later"
                        ),
                        data: None,
                    });
                }
            };
            self.call("getSignatureStatuses", params).await?
        };
        let Some(mut values) = status_values(&r, signatures.len()) else {
            return Err(NodeError {
                refusal: gw_core::Code::Unavailable,
                code: -32603,
                message: format!(
                    "the RPC node's answer to getSignatureStatuses is not one for {} signature(s)",
                    signatures.len()
                ),
                data: None,
            });
        };
        let seen = self.seen.lock();
        for (v, sig) in values.iter_mut().zip(signatures) {
            if v.is_null() {
                if let Some(st) = seen.0.get(sig) {
                    *v = st.clone();
                }
            }
        }
        // The node's context (its slot), and the statuses as Solana gives them.
        let context = match r.get_mut("context").map(Value::take) {
            Some(c @ Value::Object(_)) => c,
            _ => json!({}),
        };
        Ok(json!({"context": context, "value": values}))
    }
}

/// The JSON-RPC errors of a Solana node that refuse the transaction or the
/// request itself, passed on as the node gave them (`node_refused`): a failed
/// preflight (-32002), a signature that does not verify (-32003), a precompile
/// that does not (-32006), no transaction history on this node for
/// `searchTransactionHistory` (-32011), signatures not matching the message (-32013), an
/// unsupported version (-32015), `minContextSlot` not reached (-32016), invalid
/// parameters (-32602).
const NODE_REFUSALS: [i64; 8] = [
    -32002, -32003, -32006, -32011, -32013, -32015, -32016, -32602,
];

/// The longest message passed on from the node's error, in characters.
const MAX_NODE_MESSAGE_CHARS: usize = 512;

/// The node's `error` to `method` as the gateway's [`NodeError`]: one of
/// [`NODE_REFUSALS`] passed on (its message cut to [`MAX_NODE_MESSAGE_CHARS`]);
/// anything else — a provider's rate limit (-32429, or HTTP 429 with a JSON
/// body), an unhealthy node (-32005), an error that is no JSON-RPC error object —
/// is the node failing to answer: `unavailable`, -32603 naming what it said
/// (a client must not take a provider's limit for a refusal of its transaction).
fn node_refusal(method: &str, e: &mut Value) -> NodeError {
    let code = e.get("code").and_then(Value::as_i64);
    let message = cut_chars(
        e.get("message")
            .and_then(Value::as_str)
            .unwrap_or("no message"),
        MAX_NODE_MESSAGE_CHARS,
    );
    match code {
        Some(code) if NODE_REFUSALS.contains(&code) => NodeError {
            refusal: gw_core::Code::NodeRefused,
            code,
            message,
            data: e.get_mut("data").map(Value::take),
        },
        _ => NodeError {
            refusal: gw_core::Code::Unavailable,
            code: -32603,
            message: format!(
                "the RPC node did not answer {method}: its error {}: {message}",
                code.map_or_else(|| "without a code".to_owned(), |c| c.to_string())
            ),
            data: None,
        },
    }
}

/// `s`, at most `most` characters (and `…` when cut).
fn cut_chars(s: &str, most: usize) -> String {
    match s.char_indices().nth(most) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// The statuses of `n` signatures in a `getSignatureStatuses` result
/// (`{"context": …, "value": [...]}`), each `null` or a status object with only
/// the fields Solana defines (`slot`, `confirmations`, `err`, `status`,
/// `confirmationStatus`); `None` when the answer is not that: a list of another
/// length, or an entry of another kind, would pair a status with the wrong
/// signature.
fn status_values(result: &Value, n: usize) -> Option<Vec<Value>> {
    let values = result.get("value")?.as_array()?;
    if values.len() != n {
        return None;
    }
    values
        .iter()
        .map(|v| match v {
            Value::Null => Some(Value::Null),
            Value::Object(m) => {
                let confirmation = m.get("confirmationStatus").and_then(Value::as_str);
                if !matches!(
                    confirmation,
                    None | Some("processed" | "confirmed" | "finalized")
                ) {
                    return None;
                }
                let mut out = serde_json::Map::new();
                out.insert("slot".into(), json!(m.get("slot")?.as_u64()?));
                // `null` is rooted: a count that is not one is refused, not read
                // as the strongest claim.
                let confirmations = match m.get("confirmations") {
                    None | Some(Value::Null) => Value::Null,
                    Some(c) => json!(c.as_u64()?),
                };
                out.insert("confirmations".into(), confirmations);
                let err = m.get("err").cloned().unwrap_or(Value::Null);
                out.insert("err".into(), err.clone());
                out.insert(
                    "status".into(),
                    m.get("status").cloned().unwrap_or_else(|| match err {
                        Value::Null => json!({"Ok": null}),
                        e => json!({"Err": e}),
                    }),
                );
                out.insert("confirmationStatus".into(), json!(confirmation));
                Some(Value::Object(out))
            }
            _ => None,
        })
        .collect()
}

/// A transaction error as Agave's message (its `Display`) names it, for the common
/// variants: `"BlockhashNotFound"` → `Blockhash not found`,
/// `{"InstructionError":[0,{"Custom":1}]}` → `Error processing Instruction 0:
/// custom program error: 0x1`; others by their variant name.
fn describe(err: &Value) -> String {
    match err {
        Value::String(s) => match s.as_str() {
            "BlockhashNotFound" => "Blockhash not found".into(),
            "AlreadyProcessed" => "This transaction has already been processed".into(),
            "InsufficientFundsForFee" => "Insufficient funds for fee".into(),
            "AccountNotFound" => {
                "Attempt to debit an account but found no record of a prior credit.".into()
            }
            "AccountInUse" => "Account in use".into(),
            other => other.to_owned(),
        },
        Value::Object(m) => match m.get("InstructionError").and_then(Value::as_array) {
            Some(a) if a.len() == 2 => {
                let what = match &a[1] {
                    Value::Object(e) => match e.get("Custom").and_then(Value::as_u64) {
                        Some(n) => format!("custom program error: {n:#x}"),
                        None => a[1].to_string(),
                    },
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                format!("Error processing Instruction {}: {what}", a[0])
            }
            _ => err.to_string(),
        },
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blockhash_expires_on_answers_in_a_row_not_on_one() {
        let run = |answers: &[Option<bool>]| {
            let mut b = Blockhash::default();
            for a in answers {
                b.answered(*a);
            }
            b.expired
        };
        let (t, f) = (Some(true), Some(false));
        assert!(!run(&[t, f]), "one lagging node's answer");
        assert!(!run(&[t, f, t, f]), "flapping behind a load balancer");
        assert!(!run(&[t, f, None, t]));
        assert!(run(&[t, f, f]), "valid, then not, twice");
        assert!(
            !run(&[f, f, f, f]),
            "never valid: the node may lag the client"
        );
        assert!(run(&[f, f, f, f, f]));
    }

    #[test]
    fn errors_are_named_as_solana_names_them() {
        assert_eq!(describe(&json!("BlockhashNotFound")), "Blockhash not found");
        assert_eq!(
            describe(&json!({"InstructionError": [0, {"Custom": 1}]})),
            "Error processing Instruction 0: custom program error: 0x1"
        );
        assert_eq!(
            describe(&json!({"InstructionError": [2, "InvalidArgument"]})),
            "Error processing Instruction 2: InvalidArgument"
        );
    }

    #[test]
    fn bounds_are_checked() {
        let ok: RpcNodeConfig =
            serde_json::from_value(json!({"url": "http://127.0.0.1:8899"})).unwrap();
        assert!(ok.validate().is_ok());
        let mut bad = ok.clone();
        bad.url = "ftp://x".into();
        assert!(bad.validate().is_err());
        let mut bad = ok;
        bad.rebroadcast_ms = 1;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("rebroadcast_ms"));
    }
}
