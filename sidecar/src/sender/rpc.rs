//! A Solana JSON-RPC endpoint so existing clients (web3.js, solana-py, the CLI with
//! `--url`) can send through the gateway: `sendTransaction` (base58 — the RPC default
//! — or base64), `getSignatureStatuses`, `sendBundle` (Jito's method, relay only)
//! and `getHealth`; single requests and batches.
//!
//! The gateway refuses what is not a transaction or whose signatures do not verify,
//! before spending a send. It has no bank: with `sender.rpc_node` configured,
//! `skipPreflight`, `preflightCommitment`, `minContextSlot` and `maxRetries` mean
//! what they mean on a Solana RPC node ([`super::landing`]); without one, the
//! transaction is sent once, unsimulated, and `getSignatureStatuses` knows nothing.
//! The answer comes once a route took the transaction: its signature, as Solana
//! answers, or an error naming both routes' failures. Sends are gated by the configured
//! module with the strategy's own gate ([`ModuleState::may_send`]): stopped or
//! killed → refused with -32005 (a stopped module may send through JSON-RPC only
//! with `sender.rpc_allow_stopped`); `throttle_pct` → only that share goes (a
//! transaction that is not sent after all — its preflight failed, its client went
//! away — gives its share back). At most `sender.rpc_max_in_flight` sends run at
//! once (they run on tasks of their own, past their client's patience): beyond,
//! -32005 with a message starting `busy:`, nothing sent.
//!
//! Every error the gateway answers is a refusal with a stable code
//! ([`Refused`]; `/api/rpc` makes each a ledger row): `malformed` (not JSON-RPC,
//! an unknown method, bad parameters, a transaction that does not decode),
//! `bad_signature` (its signatures do not verify), `module_refused`, `throttled`,
//! `overloaded` (`busy:`), `node_refused` (the RPC node's preflight refused it,
//! passed on as the node gave it) and `unavailable` (no relay for a bundle, the
//! node's answer missing or useless, a send task that failed). A send no route
//! took is not a refusal: it is a `failed` row of `tx_sends`.

use std::collections::hash_map::{Entry, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use bytes::Bytes;
use gw_core::contract::Requester;
use gw_core::{Code, Module};
use serde_json::{json, Value};

use gw_core::module_state::{ModuleState, Refusal, Throttle};
use parking_lot::Mutex;

use super::landing::{Landing, NodeError, MAX_STATUS_SIGNATURES};
use super::{SendMeta, Sender};
use crate::control::ModuleTable;
use gw_core::txwire::{self, DecodeError, Encoding, TxError};

/// Most requests in one batch.
pub const MAX_BATCH: usize = 64;

/// JSON-RPC error codes used here.
pub mod code {
    /// Not JSON.
    pub const PARSE: i64 = -32700;
    /// Not a JSON-RPC request.
    pub const INVALID_REQUEST: i64 = -32600;
    /// Unknown method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Bad parameters (encoding, size, malformed transaction).
    pub const INVALID_PARAMS: i64 = -32602;
    /// A transaction whose signatures do not verify: Solana's
    /// `TransactionSignatureVerificationFailure`, the code web3.js and Agave's
    /// clients know.
    pub const SIGNATURE_VERIFICATION_FAILURE: i64 = -32003;
    /// No route took it.
    pub const SEND_FAILED: i64 = -32603;
    /// Sends refused by the module state (killed, throttled), or while
    /// `sender.rpc_max_in_flight` sends are running (the message starts `busy:`).
    pub const REFUSED: i64 = -32005;
}

/// What the endpoint needs.
pub struct RpcContext<'a> {
    /// The sender.
    pub sender: &'a Arc<Sender>,
    /// Landing semantics with an RPC node (`sender.rpc_node`).
    pub landing: Option<&'a Arc<Landing>>,
    /// Module states.
    pub modules: &'a ModuleTable,
    /// Module whose state gates RPC sends.
    pub module: Module,
    /// Whether a stopped (not killed) module still lets RPC sends through.
    pub allow_stopped: bool,
    /// The gate's throttle, permits and counters.
    pub gate: &'a RpcGate,
    /// Who asked (the token the edge verified).
    pub requester: Arc<Requester>,
    /// Where the refusals already decided go when the request is dropped before
    /// it answers (its client went away: a batch whose other requests still
    /// wait for the node); `None`: nowhere.
    pub orphaned: Option<Orphaned>,
}

/// Takes the refusals of a request dropped before it answered, to record them.
pub type Orphaned = Arc<dyn Fn(Vec<Refused>) + Send + Sync>;

/// The refusals of a request as they are decided: taken with its answer, or
/// handed to [`RpcContext::orphaned`] when the request is dropped first.
struct Decided {
    /// By the request's place in its batch.
    refusals: Mutex<Vec<(usize, Refused)>>,
    orphaned: Option<Orphaned>,
}

impl Decided {
    fn add(&self, i: usize, r: impl IntoIterator<Item = Refused>) {
        self.refusals.lock().extend(r.into_iter().map(|r| (i, r)));
    }

    /// In the batch's order (its rows too), whatever order they were decided in.
    fn take(&self) -> Vec<Refused> {
        let mut r = std::mem::take(&mut *self.refusals.lock());
        r.sort_by_key(|(i, _)| *i);
        r.into_iter().map(|(_, r)| r).collect()
    }
}

impl Drop for Decided {
    fn drop(&mut self) {
        let left = self.take();
        if let (false, Some(f)) = (left.is_empty(), &self.orphaned) {
            tracing::info!(
                refusals = left.len(),
                "a JSON-RPC request was dropped before it answered (its client went away): its refusals are recorded"
            );
            f(left);
        }
    }
}

/// What the JSON-RPC gate keeps between requests.
pub struct RpcGate {
    throttle: Mutex<Throttle>,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    /// Sends' calls to the RPC node at once (preflights, `minContextSlot`
    /// checks), apart from the sends: a slow node holds these, not the sends
    /// that do not call it (`skipPreflight`).
    at_node: Arc<Semaphore>,
    /// Each transaction's send in flight (from its gate to its tracking), by
    /// signature: a copy arriving meanwhile in another request waits for it.
    /// Only a send that passed its gate has an entry, and each holds a place in
    /// `at_node` or `in_flight` (or is refused), so the map is bounded by them.
    flights: Flights,
    /// Sends refused by the gate, by why.
    pub stats: GateStats,
}

/// See [`RpcGate`]'s `flights`, by a transaction's signature or a bundle's
/// [`bundle_key`]: once the send ended, its answer if it went (`Some(None)`:
/// it did not).
type Flights = Arc<Mutex<HashMap<[u8; 64], watch::Receiver<Option<Option<String>>>>>>;

/// A send in flight (a transaction's, or a bundle's), made by this request:
/// when it ends (sent, refused, failed, or its request cancelled), copies
/// waiting for it learn its answer if it went, and the next copy may send.
struct Flight {
    flights: Flights,
    key: [u8; 64],
    ended: watch::Sender<Option<Option<String>>>,
    /// The answer, once the send went.
    answer: Option<String>,
}

impl Drop for Flight {
    fn drop(&mut self) {
        // Out of the map before the waiters wake: one that sends again (this
        // one did not go) finds the place free.
        self.flights.lock().remove(&self.key);
        self.ended.send_replace(Some(self.answer.take()));
    }
}

/// Whose the send of `key` is.
enum Claimed {
    /// This request's to make.
    Mine(Flight),
    /// Another request's send of it went while this one waited: its answer.
    Went(String),
}

/// The send of `key` (a transaction's signature, a bundle's [`bundle_key`]):
/// this request's to make, or the answer of another request's send of it that
/// went while this one waited (a send that did not go lets the next waiter make
/// its own).
async fn claim(ctx: &RpcContext<'_>, key: [u8; 64]) -> Claimed {
    loop {
        let mut ended = match ctx.gate.flights.lock().entry(key) {
            Entry::Occupied(e) => e.get().clone(),
            Entry::Vacant(v) => {
                let (ended, rx) = watch::channel(None);
                v.insert(rx);
                return Claimed::Mine(Flight {
                    flights: ctx.gate.flights.clone(),
                    key,
                    ended,
                    answer: None,
                });
            }
        };
        let answer = ended
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|v| v.clone().flatten());
        if let Some(answer) = answer {
            ctx.gate.stats.coalesced.fetch_add(1, Ordering::Relaxed);
            return Claimed::Went(answer);
        }
    }
}

/// A bundle's key among the sends in flight: SHA-512 over its transactions'
/// signatures, in order (a bundle is those transactions, in that order).
fn bundle_key(signatures: &[String]) -> [u8; 64] {
    use sha2::Digest as _;
    let mut h = sha2::Sha512::new();
    h.update(b"gw-rpc-bundle");
    for s in signatures {
        h.update((s.len() as u32).to_le_bytes());
        h.update(s.as_bytes());
    }
    h.finalize().into()
}

/// The gate's refusals.
#[derive(Debug, Default)]
pub struct GateStats {
    /// The module stopped or killed.
    pub refused: AtomicU64,
    /// Not this send's turn under `throttle_pct`.
    pub throttled: AtomicU64,
    /// `rpc_max_in_flight` sends were running.
    pub busy: AtomicU64,
    /// Copies of a transaction answered by another request's send of it, made
    /// while they waited (not refusals: answered with its signature).
    pub coalesced: AtomicU64,
}

impl RpcGate {
    /// At most `max_in_flight` sends running at once, and as many of their calls
    /// to the RPC node.
    pub fn new(max_in_flight: usize) -> RpcGate {
        RpcGate {
            throttle: Mutex::new(Throttle::default()),
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            at_node: Arc::new(Semaphore::new(max_in_flight)),
            flights: Flights::default(),
            stats: GateStats::default(),
        }
    }

    /// Sends running now.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight
            .saturating_sub(self.in_flight.available_permits())
    }
}

/// Handles one HTTP body; returns the JSON-RPC answer ([`Request::parse`], then
/// [`Request::run`], both here).
pub async fn handle(ctx: &RpcContext<'_>, body: &[u8]) -> Value {
    Request::parse(body).run(ctx).await.answer
}

/// The JSON-RPC answer to a body, and the refusals it holds (one per request of
/// a batch that was refused).
pub struct Answered {
    /// What the client is answered.
    pub answer: Value,
    /// Each refusal, to record.
    pub refusals: Vec<Refused>,
}

/// A request of a body refused by the gateway (or by the node, passed on).
#[derive(Debug)]
pub struct Refused {
    /// The stable code of its row.
    pub code: Code,
    /// The JSON-RPC error code answered.
    pub rpc_code: i64,
    /// The method, when it was one the gateway serves (`""`: none, or another).
    pub method: &'static str,
    /// The message answered.
    pub message: String,
    /// What the row keeps of it: the transaction refused (`sendTransaction`;
    /// a bundle's first) when `signature` is set, else the request (a body
    /// refused whole as it came, one request of a batch serialised again), each
    /// at most [`crate::serve::REFUSED_BODY_BYTES`].
    pub raw: Bytes,
    /// The transaction's (a bundle's first) signature, base58, when it decoded.
    pub signature: Option<String>,
}

/// An error of ours: the JSON-RPC code and message answered, and the stable code
/// of its row.
#[derive(Debug, Clone)]
pub struct RpcErr {
    rpc: i64,
    /// `None`: no refusal — a send that went and that no route took, whose row
    /// is its `tx_sends` row.
    code: Option<Code>,
    message: String,
}

impl RpcErr {
    /// A refusal whose row's code is not the one its JSON-RPC code implies.
    fn coded(code: Code, rpc: i64, message: String) -> RpcErr {
        RpcErr {
            rpc,
            code: Some(code),
            message,
        }
    }

    /// The message answered.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// The row's code implied by a JSON-RPC code of ours (a send no route took is
/// no refusal).
impl From<(i64, String)> for RpcErr {
    fn from((rpc, message): (i64, String)) -> RpcErr {
        let code = match rpc {
            code::SIGNATURE_VERIFICATION_FAILURE => Some(Code::BadSignature),
            code::SEND_FAILED => None,
            code::REFUSED => Some(Code::Overloaded),
            _ => Some(Code::Malformed),
        };
        RpcErr { rpc, code, message }
    }
}

/// A JSON-RPC body read and checked: every transaction in it decoded and its
/// signatures verified, every parameter read. What is left needs the runtime: the
/// gate, the node, the sends. Parsing is synchronous and can take tens of
/// milliseconds for a full batch, so a caller parses a large body off the
/// runtime's workers (`/api/rpc` does, on the blocking pool).
pub struct Request(Parsed);

enum Parsed {
    /// Refused already (not JSON, an empty or oversized batch): the answer, and
    /// the refusal (the body's start).
    Answer(Value, Option<Refused>),
    One(Box<Call>),
    Batch(Vec<Call>),
}

/// One request of a body: its id, and its method with its parameters read, or
/// the error to answer.
struct Call {
    id: Value,
    /// The method's name, when the gateway serves it.
    name: &'static str,
    /// Read, or refused with the request's start.
    method: Result<Method, (RpcErr, Bytes)>,
}

enum Method {
    Health,
    Send {
        wire: Bytes,
        info: txwire::TxInfo,
        opts: SendOptions,
    },
    Statuses {
        sigs: Vec<String>,
        history: Option<bool>,
    },
    Bundle {
        txs: Vec<Bytes>,
        first_sig: String,
        /// Its [`bundle_key`].
        key: [u8; 64],
    },
}

impl Request {
    /// The refusals decided in reading the request (what its run records first),
    /// for one that is never run: its client left while it was read.
    pub fn read_refusals(self) -> Vec<Refused> {
        let calls = match self.0 {
            Parsed::Answer(_, r) => return r.into_iter().collect(),
            Parsed::One(c) => vec![*c],
            Parsed::Batch(calls) => calls,
        };
        calls
            .into_iter()
            .filter_map(|c| match c.method {
                Err((e, raw)) => refusal(e, c.name, raw, None),
                Ok(_) => None,
            })
            .collect()
    }

    /// Reads `body`: everything a request can be refused for before the gate.
    pub fn parse(body: &[u8]) -> Request {
        let whole = |rpc: i64, message: String| {
            let answer = error(Value::Null, rpc, &message);
            let e = RpcErr::coded(Code::Malformed, rpc, message);
            let raw = crate::serve::kept_of(body);
            Parsed::Answer(answer, refusal(e, "", raw, None))
        };
        let req: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return Request(whole(code::PARSE, format!("parse error: {e}"))),
        };
        Request(match req {
            Value::Array(items) => {
                if items.is_empty() || items.len() > MAX_BATCH {
                    whole(
                        code::INVALID_REQUEST,
                        format!("a batch holds 1 to {MAX_BATCH} requests"),
                    )
                } else {
                    Parsed::Batch(items.iter().map(parse_call).collect())
                }
            }
            other => Parsed::One(Box::new(parse_call(&other))),
        })
    }

    /// Gates and sends what was parsed; the JSON-RPC answer (a batch's requests
    /// run at once) and its refusals.
    /// A batch's refusals are kept as each request is decided: a client that
    /// leaves while others still run takes none of their rows with it.
    pub async fn run(self, ctx: &RpcContext<'_>) -> Answered {
        let decided = Decided {
            refusals: Mutex::new(Vec::new()),
            orphaned: ctx.orphaned.clone(),
        };
        let answer = match self.0 {
            Parsed::Answer(v, r) => {
                decided.add(0, r);
                v
            }
            Parsed::One(call) => {
                let (v, r) = run_call(ctx, *call).await;
                decided.add(0, r);
                v
            }
            Parsed::Batch(calls) => {
                // A transaction twice in one batch is sent once: a later copy is
                // answered as the first (under its own id), one decision and one
                // row. Run together, neither was tracked before its send went,
                // and both were sent.
                let mut first: HashMap<[u8; 64], usize> = HashMap::new();
                let copy_of: Vec<Option<usize>> = calls
                    .iter()
                    .enumerate()
                    .map(|(i, c)| match &c.method {
                        Ok(Method::Send { info, .. }) => match first.entry(info.signature) {
                            Entry::Occupied(e) => Some(*e.get()),
                            Entry::Vacant(v) => {
                                v.insert(i);
                                None
                            }
                        },
                        _ => None,
                    })
                    .collect();
                let ids: Vec<Value> = calls.iter().map(|c| c.id.clone()).collect();
                let decided = &decided;
                let one = |(i, c)| async move {
                    let (v, r) = run_call(ctx, c).await;
                    decided.add(i, r);
                    (i, v)
                };
                let run = calls
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| copy_of[*i].is_none())
                    .map(one);
                let mut answers: Vec<Value> = vec![Value::Null; ids.len()];
                for (i, v) in futures_util::future::join_all(run).await {
                    answers[i] = v;
                }
                for (i, of) in copy_of.iter().enumerate() {
                    if let Some(j) = of {
                        let mut v = answers[*j].clone();
                        v["id"] = ids[i].clone();
                        answers[i] = v;
                    }
                }
                Value::Array(answers)
            }
        };
        Answered {
            answer,
            refusals: decided.take(),
        }
    }
}

/// The refusal `e` is (`None`: none, a send no route took — its row is its
/// `tx_sends` row).
fn refusal(
    e: RpcErr,
    method: &'static str,
    raw: Bytes,
    signature: Option<String>,
) -> Option<Refused> {
    Some(Refused {
        code: e.code?,
        rpc_code: e.rpc,
        method,
        message: e.message,
        raw,
        signature,
    })
}

fn error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": id})
}

fn node_error(id: Value, e: &NodeError) -> Value {
    let mut err = json!({"code": e.code, "message": e.message});
    if let Some(d) = &e.data {
        err["data"] = d.clone();
    }
    json!({"jsonrpc": "2.0", "error": err, "id": id})
}

fn result(id: Value, v: Value) -> Value {
    json!({"jsonrpc": "2.0", "result": v, "id": id})
}

/// The methods served.
const METHODS: [&str; 4] = [
    "getHealth",
    "sendTransaction",
    "getSignatureStatuses",
    "sendBundle",
];

fn parse_call(req: &Value) -> Call {
    let id = req.get("id").cloned().unwrap_or(Value::Null);
    let asked = req.get("method").and_then(Value::as_str);
    let name = METHODS
        .into_iter()
        .find(|m| Some(*m) == asked)
        .unwrap_or("");
    let method = parse_method(req).map_err(|e| {
        // The request, for its row (serialised again, only when refused).
        let mut raw = serde_json::to_vec(req).unwrap_or_default();
        raw.truncate(crate::serve::REFUSED_BODY_BYTES);
        (e, Bytes::from(raw))
    });
    Call { id, name, method }
}

fn parse_method(req: &Value) -> Result<Method, RpcErr> {
    if req.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(RpcErr::from((
            code::INVALID_REQUEST,
            "not a JSON-RPC 2.0 request".to_owned(),
        )));
    }
    let Some(method) = req.get("method").and_then(Value::as_str) else {
        return Err(RpcErr::from((
            code::INVALID_REQUEST,
            "no method".to_owned(),
        )));
    };
    let no_params = Value::Array(Vec::new());
    let params = req.get("params").unwrap_or(&no_params);
    match method {
        "getHealth" => Ok(Method::Health),
        "sendTransaction" => parse_send(params),
        "getSignatureStatuses" => parse_statuses(params),
        "sendBundle" => parse_bundle(params),
        other => Err((
            code::METHOD_NOT_FOUND,
            format!(
                "method {:?} is not served by the gateway (sendTransaction, getSignatureStatuses, sendBundle, getHealth)",
                other.escape_debug().to_string()
            ),
        )
            .into()),
    }
}

/// Runs one request: its answer, and its refusal if it was one.
async fn run_call(ctx: &RpcContext<'_>, call: Call) -> (Value, Option<Refused>) {
    let Call { id, name, method } = call;
    // What the row of a refusal keeps: the transaction (a bundle's first).
    let mut refused_tx: Option<(Bytes, String)> = None;
    let answer = match method {
        Err((e, raw)) => {
            let answer = error(id, e.rpc, &e.message);
            return (answer, refusal(e, name, raw, None));
        }
        Ok(Method::Health) => Ok(json!("ok")),
        Ok(Method::Send { wire, info, opts }) => {
            let (kept, signature) = (wire.clone(), info.signature);
            let out = send_transaction(ctx, wire, info, opts).await;
            if out.is_err() {
                refused_tx = Some((kept, bs58::encode(signature).into_string()));
            }
            out.map(|sig| json!(sig))
        }
        Ok(Method::Statuses { sigs, history }) => signature_statuses(ctx, &sigs, history).await,
        Ok(Method::Bundle {
            txs,
            first_sig,
            key,
        }) => {
            let kept = txs.first().cloned().unwrap_or_default();
            let signature = first_sig.clone();
            let out = send_bundle(ctx, txs, first_sig, key).await;
            if out.is_err() {
                refused_tx = Some((kept, signature));
            }
            out.map(|b| json!(b)).map_err(SendErr::Rpc)
        }
    };
    let (answer, e) = match answer {
        Ok(v) => return (result(id, v), None),
        Err(SendErr::Rpc(e)) => (error(id, e.rpc, &e.message), e),
        Err(SendErr::Node(n)) => {
            let answer = node_error(id, &n);
            (answer, RpcErr::coded(n.refusal, n.code, n.message))
        }
    };
    let refused = match refused_tx {
        Some((wire, signature)) => refusal(e, name, wire, Some(signature)),
        None => refusal(e, name, Bytes::new(), None),
    };
    (answer, refused)
}

/// The error of a send task that failed (it panicked, or was cancelled).
fn task_failed(e: tokio::task::JoinError) -> RpcErr {
    RpcErr::coded(
        Code::Unavailable,
        code::SEND_FAILED,
        format!("send task failed: {e}"),
    )
}

/// A refusal of ours, or the node's (passed on as it gave it).
enum SendErr {
    Rpc(RpcErr),
    Node(NodeError),
}

impl From<RpcErr> for SendErr {
    fn from(e: RpcErr) -> SendErr {
        SendErr::Rpc(e)
    }
}

impl From<(i64, String)> for SendErr {
    fn from(e: (i64, String)) -> SendErr {
        SendErr::Rpc(e.into())
    }
}

impl From<NodeError> for SendErr {
    fn from(e: NodeError) -> SendErr {
        SendErr::Node(e)
    }
}

/// `sendTransaction`'s options that change what the gateway does.
struct SendOptions {
    skip_preflight: bool,
    preflight_commitment: String,
    min_context_slot: Option<u64>,
    max_retries: Option<usize>,
}

fn send_options(opts: Option<&Value>) -> Result<SendOptions, RpcErr> {
    let bad = |what: &str| RpcErr::from((code::INVALID_PARAMS, format!("Invalid params: {what}")));
    let get = |k: &str| opts.and_then(|o| o.get(k)).filter(|v| !v.is_null());
    let skip_preflight = match get("skipPreflight") {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| bad("skipPreflight must be a boolean"))?,
    };
    let preflight_commitment = match get("preflightCommitment") {
        None => "finalized".to_owned(),
        Some(Value::String(c)) if ["processed", "confirmed", "finalized"].contains(&c.as_str()) => {
            c.clone()
        }
        Some(_) => {
            return Err(bad(
                "preflightCommitment must be processed, confirmed or finalized",
            ))
        }
    };
    let min_context_slot = match get("minContextSlot") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| bad("minContextSlot must be a slot"))?,
        ),
    };
    let max_retries = match get("maxRetries") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| bad("maxRetries must be a non-negative integer"))?,
        ),
    };
    Ok(SendOptions {
        skip_preflight,
        preflight_commitment,
        min_context_slot,
        max_retries,
    })
}

fn encoding(opts: Option<&Value>) -> Result<&str, RpcErr> {
    match opts.and_then(|o| o.get("encoding")) {
        None | Some(Value::Null) => Ok("base58"),
        Some(Value::String(s)) if s == "base58" || s == "base64" => Ok(s.as_str()),
        // Agave's deprecated name of base58.
        Some(Value::String(s)) if s == "binary" => Ok("base58"),
        Some(other) => Err(RpcErr::from((
            code::INVALID_PARAMS,
            format!("unsupported encoding {other}: base58 or base64"),
        ))),
    }
}

/// Decodes one encoded transaction and checks it (structure, size, signatures).
pub fn decode_tx(s: &str, encoding: &str) -> Result<(Bytes, String), RpcErr> {
    decode_tx_info(s, encoding).map(|(w, info)| (w, info.signature_b58()))
}

/// [`decode_tx`], with what the transaction tells (its blockhash).
fn decode_tx_info(s: &str, encoding: &str) -> Result<(Bytes, txwire::TxInfo), RpcErr> {
    let enc = if encoding == "base64" {
        Encoding::Base64
    } else {
        Encoding::Base58
    };
    let (raw, info) = txwire::decode(s, enc).map_err(|e| match e {
        DecodeError::Tx(e @ TxError::BadSignature(_)) => (
            code::SIGNATURE_VERIFICATION_FAILURE,
            format!("Transaction signature verification failure: {e}"),
        ),
        // Agave's words: "invalid transaction: …".
        DecodeError::Tx(e @ (TxError::Sanitize(_) | TxError::AccountLoadedTwice)) => {
            (code::INVALID_PARAMS, e.to_string())
        }
        DecodeError::Tx(e) => (
            code::INVALID_PARAMS,
            format!("failed to deserialize transaction: {e}"),
        ),
        e => (code::INVALID_PARAMS, e.to_string()),
    })?;
    Ok((Bytes::from(raw), info))
}

/// Whether the gating module's state refuses a send now (run state only; the
/// throttle is [`gate`]'s).
fn state_refusal(modules: &ModuleTable, module: Module, allow_stopped: bool) -> Option<Refusal> {
    let verdict = modules.with(module, |st: &ModuleState| st.may_send(None));
    match verdict {
        Err(Refusal::Stopped) if allow_stopped => None,
        // Throttled to 0 % is the throttle's answer.
        Err(Refusal::ThrottledToZero) | Ok(()) => None,
        Err(why) => Some(why),
    }
}

fn refused(ctx: &RpcContext<'_>, why: Refusal) -> RpcErr {
    ctx.gate.stats.refused.fetch_add(1, Ordering::Relaxed);
    let module = ctx.module;
    RpcErr::coded(
        Code::ModuleRefused,
        code::REFUSED,
        format!(
            "sends are refused: module {} is {}",
            module.as_str(),
            why.as_str()
        ),
    )
}

/// A send the gate let through: its share of the throttle, given back when it is
/// dropped unsent (a failed preflight, a module killed meanwhile, no permit to run,
/// a client that went away): only sends that go count against `throttle_pct`.
struct Admitted<'a> {
    throttle: &'a Mutex<Throttle>,
    pct: u8,
    sent: bool,
}

impl Admitted<'_> {
    /// The send goes: its share stays spent.
    fn go(mut self) {
        self.sent = true;
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if !self.sent {
            self.throttle.lock().refund(self.pct, 0);
        }
    }
}

fn gate<'a>(ctx: &RpcContext<'a>) -> Result<Admitted<'a>, RpcErr> {
    if let Some(why) = state_refusal(ctx.modules, ctx.module, ctx.allow_stopped) {
        return Err(refused(ctx, why));
    }
    let pct = ctx
        .modules
        .with(ctx.module, |st: &ModuleState| st.throttle_pct);
    if !ctx.gate.throttle.lock().admit(pct, 0, Instant::now()) {
        ctx.gate.stats.throttled.fetch_add(1, Ordering::Relaxed);
        return Err(RpcErr::coded(
            Code::Throttled,
            code::REFUSED,
            format!(
                "throttled: module {} sends {} % of transactions",
                ctx.module.as_str(),
                pct
            ),
        ));
    }
    Ok(Admitted {
        throttle: &ctx.gate.throttle,
        pct,
        sent: false,
    })
}

/// A permit to run one send (on a task of its own), or `busy`.
fn permit(ctx: &RpcContext<'_>) -> Result<OwnedSemaphorePermit, RpcErr> {
    place(ctx, &ctx.gate.in_flight, "sends are running; retry later")
}

/// A place for a send's call to the RPC node ([`RpcGate`]'s `at_node`).
fn at_node(ctx: &RpcContext<'_>) -> Result<OwnedSemaphorePermit, RpcErr> {
    place(
        ctx,
        &ctx.gate.at_node,
        "sends are calling the RPC node; retry later, or skip the preflight",
    )
}

/// One of `places`, or `busy` saying `why` none is free.
fn place(
    ctx: &RpcContext<'_>,
    places: &Arc<Semaphore>,
    why: &str,
) -> Result<OwnedSemaphorePermit, RpcErr> {
    places.clone().try_acquire_owned().map_err(|_| {
        ctx.gate.stats.busy.fetch_add(1, Ordering::Relaxed);
        RpcErr::coded(
            Code::Overloaded,
            code::REFUSED,
            format!("busy: sender.rpc_max_in_flight {why}"),
        )
    })
}

fn rpc_meta(ctx: &RpcContext<'_>) -> SendMeta {
    let (modules, module, allow_stopped) = (ctx.modules.clone(), ctx.module, ctx.allow_stopped);
    SendMeta {
        source: "rpc",
        module: ctx.module.as_str(),
        tip: 0.0,
        score: None,
        scored_by: None,
        requester: ctx.requester.clone(),
        gate: super::SendGate::new(move || {
            state_refusal(&modules, module, allow_stopped).is_none()
        }),
    }
}

fn parse_send(params: &Value) -> Result<Method, RpcErr> {
    let p = params.as_array().ok_or((
        code::INVALID_PARAMS,
        "params must be [transaction, options]".to_owned(),
    ))?;
    let tx = p.first().and_then(Value::as_str).ok_or((
        code::INVALID_PARAMS,
        "params[0] must be the encoded transaction".to_owned(),
    ))?;
    let (wire, info) = decode_tx_info(tx, encoding(p.get(1))?)?;
    let opts = send_options(p.get(1))?;
    Ok(Method::Send { wire, info, opts })
}

async fn send_transaction(
    ctx: &RpcContext<'_>,
    wire: Bytes,
    info: txwire::TxInfo,
    opts: SendOptions,
) -> Result<String, SendErr> {
    let sig = info.signature_b58();
    // A copy of a transaction another request is sending (at the node for its
    // preflight, or on the wire) waits for that send and is answered with its
    // signature when it went: one send, one `tx_sends` row. Both copies were
    // sent before (a client resending on a short timeout, two bots with one
    // transaction), twice on the wire and twice to the relay. Answered as that
    // send went, whatever options this copy gave; gated (module, throttle) only
    // when it sends itself.
    let mut flight = match claim(ctx, info.signature).await {
        Claimed::Mine(f) => f,
        Claimed::Went(sig) => return Ok(sig),
    };
    if ctx.landing.is_some_and(|l| l.is_pending(&sig)) {
        // Already rebroadcast (a client resending it until it lands, as Solana
        // documents): answered with its signature, not sent again — as Agave's
        // send-transaction-service takes a transaction already in its retry
        // pool. The module's state still answers (a stop or kill ends its
        // rebroadcasts too); the throttle does not: nothing is sent.
        if let Some(why) = state_refusal(ctx.modules, ctx.module, ctx.allow_stopped) {
            return Err(SendErr::Rpc(refused(ctx, why)));
        }
        flight.answer = Some(sig.clone());
        return Ok(sig);
    }
    let admitted = gate(ctx)?;
    if let Some(landing) = ctx.landing {
        // `rpc_max_in_flight` bounds the simulations a flood of sends makes
        // there too (the provider's rate limit would otherwise refuse every
        // client's), apart from the sends: a slow node held every send's place,
        // and `skipPreflight` sends, which never call it, were refused `busy`.
        let _at_node = (!opts.skip_preflight || opts.min_context_slot.is_some())
            .then(|| at_node(ctx))
            .transpose()?;
        if !opts.skip_preflight {
            landing
                .preflight(&wire, &opts.preflight_commitment, opts.min_context_slot)
                .await?;
        } else if let Some(min) = opts.min_context_slot {
            // As Agave: without a preflight the slot is the processed bank's.
            landing.check_min_slot(min, "processed").await?;
        }
        // The module may have been killed while the node answered.
        if let Some(why) = state_refusal(ctx.modules, ctx.module, ctx.allow_stopped) {
            return Err(SendErr::Rpc(refused(ctx, why)));
        }
    }
    let permit = permit(ctx)?;
    admitted.go();
    // On a task of its own: a client that goes away mid-send (its stream reset, the
    // handler dropped) cancels neither the send, nor its audit row, nor the
    // rebroadcasts of a transaction that went (as a Solana node's RPC).
    let sender = ctx.sender.clone();
    let landing = ctx.landing.cloned();
    let meta = rpc_meta(ctx);
    let out = tokio::spawn(async move {
        let _permit = permit;
        let out = sender.send(wire.clone(), sig, &meta).await;
        // Sent, or maybe sent (a route failed once its bytes went) and
        // rebroadcast from now on: answered with its signature, as a Solana node
        // answers a transaction its send-transaction-service retries. "Not sent"
        // would have the client sign it again, and both could land.
        let mut rebroadcast = false;
        if let (true, Some(landing)) = (out.landed.is_some() || out.maybe_sent, landing) {
            let retry = SendMeta {
                source: "rpc_retry",
                ..meta
            };
            // Ended once tracked (`flight` dropped at the task's end): no moment
            // when a copy finds it neither in flight nor pending.
            rebroadcast = landing.track(
                sender,
                wire,
                out.signature.clone(),
                info.recent_blockhash,
                opts.max_retries,
                retry,
            );
        }
        let went = out.landed.is_some() || rebroadcast;
        flight.answer = went.then(|| out.signature.clone());
        drop(flight);
        (out, went)
    })
    .await
    .map_err(task_failed)?;
    match out {
        (out, true) => Ok(out.signature),
        (out, false) if out.maybe_sent => Err(SendErr::Rpc(RpcErr::from((
            code::SEND_FAILED,
            format!(
                "transaction {} may have been sent, and is not sent again by the gateway: {}; getSignatureStatuses tells whether it landed — do not sign it again with a new blockhash before this one expires",
                out.signature,
                out.error()
            ),
        )))),
        (out, false) => Err(SendErr::Rpc(RpcErr::from((
            code::SEND_FAILED,
            format!(
                "transaction {} was not sent: {}",
                out.signature,
                out.error()
            ),
        )))),
    }
}

/// `getSignatureStatuses([signatures], {searchTransactionHistory})`'s parameters.
fn parse_statuses(params: &Value) -> Result<Method, RpcErr> {
    let p = params.as_array().ok_or((
        code::INVALID_PARAMS,
        "params must be [[signatures], options]".to_owned(),
    ))?;
    let list = p.first().and_then(Value::as_array).ok_or((
        code::INVALID_PARAMS,
        "params[0] must be a list of signatures".to_owned(),
    ))?;
    if list.len() > MAX_STATUS_SIGNATURES {
        return Err(RpcErr::from((
            code::INVALID_PARAMS,
            format!("Too many inputs provided; max {MAX_STATUS_SIGNATURES}"),
        )));
    }
    let mut sigs = Vec::with_capacity(list.len());
    for s in list {
        let ok = s
            .as_str()
            .filter(|s| gw_core::txwire::b58_exact::<64>(s).is_some());
        match ok {
            Some(s) => sigs.push(s.to_owned()),
            None => {
                let mut shown = s.to_string();
                if shown.len() > 100 {
                    shown = shown.chars().take(96).chain(['…']).collect();
                }
                return Err(RpcErr::from((
                    code::INVALID_PARAMS,
                    format!("Invalid param: {shown} is not a signature"),
                )));
            }
        }
    }
    // The configuration as Agave reads it (`Option<RpcSignatureStatusConfig>`:
    // absent or null, else an object — or a one-element array — whose
    // `searchTransactionHistory` is a boolean; other fields ignored), and only that
    // goes to the node: a client's JSON is not forwarded as it came.
    let history = match p.get(1) {
        None | Some(Value::Null) => None,
        Some(Value::Object(o)) => Some(o.get("searchTransactionHistory")),
        Some(Value::Array(a)) if a.len() == 1 => Some(a.first()),
        Some(_) => Some(None),
    };
    let history = match history {
        None => None,
        Some(Some(Value::Bool(b))) => Some(*b),
        Some(_) => {
            return Err(RpcErr::from((
                code::INVALID_PARAMS,
                "Invalid params: params[1] must be {\"searchTransactionHistory\": <bool>}"
                    .to_owned(),
            )))
        }
    };
    Ok(Method::Statuses { sigs, history })
}

/// `getSignatureStatuses`: the node's answer, or none known without a node.
async fn signature_statuses(
    ctx: &RpcContext<'_>,
    sigs: &[String],
    history: Option<bool>,
) -> Result<Value, SendErr> {
    match ctx.landing {
        Some(l) => Ok(l.statuses(sigs, history).await?),
        // No node: the gateway knows no statuses (null = unknown, as Solana says).
        None => Ok(json!({"context": {"slot": 0}, "value": vec![Value::Null; sigs.len()]})),
    }
}

fn parse_bundle(params: &Value) -> Result<Method, RpcErr> {
    let p = params.as_array().ok_or((
        code::INVALID_PARAMS,
        "params must be [[transactions], options]".to_owned(),
    ))?;
    let list = p.first().and_then(Value::as_array).ok_or((
        code::INVALID_PARAMS,
        "params[0] must be the list of encoded transactions".to_owned(),
    ))?;
    if list.is_empty() || list.len() > super::relay::MAX_BUNDLE {
        return Err(RpcErr::from((
            code::INVALID_PARAMS,
            format!(
                "a bundle holds 1 to {} transactions, not {}",
                super::relay::MAX_BUNDLE,
                list.len()
            ),
        )));
    }
    let enc = encoding(p.get(1))?;
    let mut txs = Vec::with_capacity(list.len());
    let mut sigs = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let s = t.as_str().ok_or((
            code::INVALID_PARAMS,
            format!("transaction {i} is not a string"),
        ))?;
        let (wire, sig) = decode_tx(s, enc).map_err(|e| RpcErr {
            message: format!("transaction {i}: {}", e.message),
            ..e
        })?;
        sigs.push(sig);
        txs.push(wire);
    }
    let key = bundle_key(&sigs);
    Ok(Method::Bundle {
        txs,
        key,
        first_sig: sigs.into_iter().next().unwrap_or_default(),
    })
}

async fn send_bundle(
    ctx: &RpcContext<'_>,
    txs: Vec<Bytes>,
    first_sig: String,
    key: [u8; 64],
) -> Result<String, RpcErr> {
    if ctx.sender.relay().is_none() {
        // Not a send that failed: there is nothing to send it with.
        return Err(RpcErr::coded(
            Code::Unavailable,
            code::SEND_FAILED,
            "bundle was not sent: bundles need the relay route, which is not configured".to_owned(),
        ));
    }
    // The same bundle in two requests at once is sent once, as a transaction.
    let mut flight = match claim(ctx, key).await {
        Claimed::Mine(f) => f,
        Claimed::Went(id) => return Ok(id),
    };
    let admitted = gate(ctx)?;
    let permit = permit(ctx)?;
    admitted.go();
    // On a task of its own, as `sendTransaction`.
    let (sender, m) = (ctx.sender.clone(), rpc_meta(ctx));
    tokio::spawn(async move {
        let _permit = permit;
        let r = sender.send_bundle(txs, first_sig, &m).await;
        flight.answer = r.as_ref().ok().cloned();
        drop(flight);
        r
    })
    .await
    .map_err(task_failed)?
    .map_err(|(e, maybe_sent)| {
        let what = if maybe_sent {
            "bundle may have been sent, and is not sent again (the relay may have taken it; its transactions' statuses tell — do not sign them again before their blockhash expires)"
        } else {
            "bundle was not sent"
        };
        (code::SEND_FAILED, format!("{what}: {e}")).into()
    })
}
