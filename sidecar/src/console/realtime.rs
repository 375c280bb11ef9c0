//! `/api/realtime`: a WebSocket that streams what the journal makes durable —
//! decisions (ledger rows), module state changes and send outcomes — as JSON
//! messages (schema in `docs/console.md`).
//!
//! The journal's writer thread hands every committed transaction to `RealtimeSink`,
//! which serialises it (only while someone listens) into a bounded
//! `tokio::sync::broadcast` channel, a transaction's messages as one item (in
//! items of at most [`MAX_BATCH`]): a send there never waits, so the control path
//! never waits for a viewer. Each client reads the channel at its own pace; one that
//! falls more than `queue` items behind, or whose socket does not take a message
//! within `write_timeout_ms`, is closed with code 4008 and counted. (Counted in
//! messages, one transaction of 10 000 send rows — a backlog the audit queue
//! let go at once — put every stream 9 000 behind, and closed them all.) At most
//! `max_clients` connect at once; more are refused with 503 `unavailable`.
//!
//! Browsers cannot set `Authorization` on a WebSocket, so the page offers its JWT
//! as the subprotocol `bearer.<jwt>` beside [`SUBPROTOCOL`]; the edge verifies it
//! (role `viewer`), removes it and forwards the verified identity as `x-gw-*`
//! headers. The sidecar only takes the stream from the edge and checks those
//! headers again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use gw_core::contract::Requester;
use gw_core::Code;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::config::OutOfBounds;
use crate::control::modules::ModuleTable;
use crate::error::ApiError;
use crate::journal::{Entry, Lsn, Sink, Txn};

/// The subprotocol the stream speaks (the page offers it; the sidecar selects it).
pub const SUBPROTOCOL: &str = "gw.realtime.v1";
/// Schema version in the `hello` message.
pub const SCHEMA: u32 = 1;
/// Close code for a client that cannot keep up (private-use range, RFC 6455 §7.4.2).
pub const CLOSE_SLOW: u16 = 4008;
/// Close code for a stream whose token expired (it was checked at the upgrade
/// only: the page opens a new one with a new token).
pub const CLOSE_EXPIRED: u16 = 4001;
/// The role a stream needs by default (the shipped `routes`).
pub const ROLE: &str = "viewer";

/// The most messages in one item of the hub's channel (a transaction's are split
/// into items of at most this many): what `realtime.queue` holds is bounded by
/// items, so its memory by this many messages each.
pub const MAX_BATCH: usize = 64;

/// One item of the hub's channel: messages, in order.
type Batch = Arc<[String]>;

/// `realtime` in the sidecar's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RealtimeConfig {
    /// Streams open at once; more are refused (503).
    #[serde(default = "default_max_clients")]
    pub max_clients: usize,
    /// Streams open at once for one token holder (its issuer's `sub`), so one
    /// viewer cannot take every place.
    #[serde(default = "default_max_per_sub")]
    pub max_per_sub: usize,
    /// Messages a client may fall behind before it is closed (4008).
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// How long one message may wait for the client's socket before it is closed.
    #[serde(default = "default_write_timeout")]
    pub write_timeout_ms: u64,
    /// Ping period (keeps proxies' idle timers from closing a quiet stream).
    #[serde(default = "default_ping")]
    pub ping_ms: u64,
    /// The role a stream needs: the sidecar's `routes` rule for `/api/realtime`
    /// (set at start, not read from this section; `None`: a public rule, any
    /// token).
    #[serde(skip, default = "default_role")]
    pub role: Option<String>,
}

fn default_role() -> Option<String> {
    Some(ROLE.to_owned())
}

fn default_max_clients() -> usize {
    64
}
fn default_max_per_sub() -> usize {
    8
}
fn default_queue() -> usize {
    1024
}
fn default_write_timeout() -> u64 {
    5_000
}
fn default_ping() -> u64 {
    10_000
}

impl Default for RealtimeConfig {
    fn default() -> Self {
        RealtimeConfig {
            max_clients: default_max_clients(),
            max_per_sub: default_max_per_sub(),
            queue: default_queue(),
            write_timeout_ms: default_write_timeout(),
            ping_ms: default_ping(),
            role: default_role(),
        }
    }
}

impl RealtimeConfig {
    /// Refuses values the hub cannot work with.
    pub fn validate(&self) -> Result<(), OutOfBounds> {
        if !(1..=4096).contains(&self.max_clients) {
            return Err(OutOfBounds::new(
                "realtime.max_clients",
                "must be within 1..=4096",
            ));
        }
        if !(1..=self.max_clients).contains(&self.max_per_sub) {
            return Err(OutOfBounds::new(
                "realtime.max_per_sub",
                "must be within 1..=realtime.max_clients",
            ));
        }
        if !(16..=65_536).contains(&self.queue) {
            return Err(OutOfBounds::new(
                "realtime.queue",
                "must be within 16..=65536",
            ));
        }
        if !(100..=60_000).contains(&self.write_timeout_ms) {
            return Err(OutOfBounds::new(
                "realtime.write_timeout_ms",
                "must be within 100..=60000",
            ));
        }
        if !(1_000..=25_000).contains(&self.ping_ms) {
            return Err(OutOfBounds::new(
                "realtime.ping_ms",
                "must be within 1000..=25000 (under Envoy's 30 s stream idle timeout)",
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Why a stream ended (the `reason` label of `gw_sidecar_realtime_closed_total`).
const REASONS: [&str; 8] = [
    "client",
    "slow",
    "expired",
    "write_timeout",
    "no_pong",
    "full",
    "full_for_sub",
    "shutdown",
];

#[derive(Clone, Debug, Default)]
struct Metrics {
    clients: Gauge,
    messages: Counter,
    closed: Family<ReasonLabel, Counter>,
}

/// The fan-out point: the journal sink publishes, each stream subscribes.
pub struct Hub {
    tx: broadcast::Sender<Batch>,
    clients: AtomicUsize,
    /// Streams open per token holder (issuer, subject).
    per_sub: parking_lot::Mutex<std::collections::HashMap<(String, String), usize>>,
    cfg: RealtimeConfig,
    modules: OnceLock<ModuleTable>,
    /// Where refused upgrades are recorded.
    gate: OnceLock<crate::serve::Gatekeeper>,
    node_id: String,
    metrics: Metrics,
    closing: tokio::sync::watch::Sender<bool>,
    /// The last journal position handed to the hub; held while a transaction's
    /// messages, or a `module` message, are sent (their order on the streams).
    order: parking_lot::Mutex<Lsn>,
}

impl Hub {
    /// A hub for `cfg` on node `node_id`; its metrics go into `registry`.
    pub fn new(cfg: RealtimeConfig, node_id: String, registry: &mut Registry) -> Arc<Hub> {
        let (tx, _) = broadcast::channel(cfg.queue.max(1));
        let metrics = Metrics::default();
        for reason in REASONS {
            let _ = metrics.closed.get_or_create(&ReasonLabel { reason });
        }
        registry.register(
            "gw_sidecar_realtime_clients",
            "Open /api/realtime streams",
            metrics.clients.clone(),
        );
        registry.register(
            "gw_sidecar_realtime_messages",
            "Messages published to /api/realtime streams",
            metrics.messages.clone(),
        );
        registry.register(
            "gw_sidecar_realtime_closed",
            "/api/realtime streams ended or refused, by reason",
            metrics.closed.clone(),
        );
        Arc::new(Hub {
            tx,
            clients: AtomicUsize::new(0),
            per_sub: parking_lot::Mutex::new(std::collections::HashMap::new()),
            cfg,
            modules: OnceLock::new(),
            gate: OnceLock::new(),
            node_id,
            metrics,
            closing: tokio::sync::watch::Sender::new(false),
            order: parking_lot::Mutex::new(0),
        })
    }

    /// The module table the `hello` message reads (known once the control plane
    /// started, after the journal this hub listens to); each later change of it
    /// is a `module` message — this node's agents' decisions, and what the node
    /// learns of other nodes' (Kafka bus), which its journal never sees.
    pub fn set_modules(self: &Arc<Self>, modules: ModuleTable) {
        let hub = Arc::downgrade(self);
        let observed = modules.observe(Box::new(move |m, state| {
            if let Some(hub) = hub.upgrade() {
                hub.module_changed(m, state);
            }
        }));
        if observed.is_err() {
            tracing::error!("the module table has another observer: the console's streams will not see its changes");
        }
        let _ = self.modules.set(modules);
    }

    /// A `module` message: `m`'s state now, after the journal's position `lsn`
    /// (the last transaction this hub was handed: never behind the messages
    /// before it, never between a transaction's messages).
    fn module_changed(&self, m: gw_core::Module, state: &gw_core::module_state::ModuleState) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        let last = self.order.lock();
        self.publish(json!({
            "type": "module",
            "lsn": *last,
            "module": m.as_str(),
            "state": state,
        }));
        drop(last);
    }

    /// Gives the hub the ledger its refusals are recorded in, and their budgets.
    pub fn set_gate(&self, gate: crate::serve::Gatekeeper) {
        let _ = self.gate.set(gate);
    }

    /// Answers a refused upgrade with `e` once its ledger row (the route, and who
    /// asked as the edge said) is durable, as every refusal of the sidecar.
    /// Within the ledger's budgets for refusals of forwarded requests (anyone with
    /// a token could otherwise write a row per upgrade): beyond them, counted and
    /// summed ([`crate::serve::record_refusal`]).
    async fn refuse(&self, e: ApiError, requester: Option<&Requester>) -> Response {
        if let Some(g) = self.gate.get() {
            if let Err(err) = crate::serve::record_refusal(g, e.code(), requester, PATH).await {
                // The answer stands (as every refusal's whose row is owed).
                tracing::warn!(error = %err, code = %e.code(), "a refused upgrade's row was not written; it is summed once the ledger takes rows");
            }
        }
        e.into_response()
    }

    /// Closes every stream with 1001 (the sidecar is stopping: its graceful
    /// shutdown would otherwise wait for them).
    pub fn shutdown(&self) {
        self.closing.send_replace(true);
    }

    /// The journal sink that feeds this hub.
    pub fn sink(self: &Arc<Self>) -> Arc<dyn Sink> {
        Arc::new(RealtimeSink(self.clone()))
    }

    /// `GET /api/realtime` (and HTTP/2's `CONNECT`).
    pub fn router(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route(PATH, axum::routing::any(upgrade))
            .with_state(self.clone())
    }

    /// Publishes one message to every open stream (the journal sink does so for
    /// what it commits; another capability may publish its own `type`).
    pub fn publish(&self, msg: Value) {
        self.send(Arc::from([msg.to_string()]));
    }

    fn send(&self, batch: Batch) {
        // Never blocks: a full channel drops the oldest item for the slowest
        // reader, who then sees `Lagged` and is closed.
        let n = batch.len() as u64;
        if self.tx.send(batch).is_ok() {
            self.metrics.messages.inc_by(n);
        }
    }

    /// The journal's last position before this hub was handed transactions (at
    /// start: what the journal already held).
    pub fn set_lsn(&self, lsn: Lsn) {
        let mut last = self.order.lock();
        *last = (*last).max(lsn);
    }

    fn closed(&self, reason: &'static str) {
        self.metrics
            .closed
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
}

/// Publishes each committed transaction's rows, state changes and sends.
struct RealtimeSink(Arc<Hub>);

impl Sink for RealtimeSink {
    fn committed(&self, lsn: Lsn, txn: &Txn) {
        let hub = &self.0;
        if hub.tx.receiver_count() == 0 {
            let mut last = hub.order.lock();
            *last = (*last).max(lsn);
            return;
        }
        // Made before taking `order`; sent under it, with the position raised,
        // so that a `module` message never goes between them or with a position
        // behind theirs.
        let mut out: Vec<String> = Vec::new();
        let mut publish = |v: Value| out.push(v.to_string());
        for e in &txn.entries {
            match e {
                Entry::Row(r) => publish(json!({
                    "type": "decision",
                    "lsn": lsn,
                    "chain_id": r.chain_id,
                    "seq": r.seq,
                    "ts_ms": r.ts_ms,
                    "stage": r.stage,
                    "decision": r.decision,
                    "code": r.code,
                    "request_id": r.request_id,
                    "issuer": r.issuer,
                    "module": r.module,
                    "action": r.action,
                    "nonce": r.nonce,
                    "requester": r.requester,
                    "requester_roles": r.requester_roles,
                    "route": r.route,
                })),
                // A module's state is published as the table takes it
                // (`Hub::set_modules`), after this transaction's rows.
                Entry::Sends { rows } => {
                    for s in rows {
                        publish(json!({
                            "type": "send",
                            "lsn": lsn,
                            "ts_us": s.ts_us,
                            "signature": s.signature,
                            "source": s.source,
                            "module": s.module,
                            "kind": s.kind,
                            "primary": s.primary,
                            "route": s.route,
                            "hedged": s.hedged != 0,
                            "outcome": s.outcome,
                            "latency_us": s.latency_us,
                            "leader": s.leader,
                            "scored_by": s.scored_by,
                            "bytes": s.bytes,
                            "tpu_error": s.tpu_error,
                            "relay_error": s.relay_error,
                        }));
                    }
                }
                _ => {}
            }
        }
        let mut last = hub.order.lock();
        *last = (*last).max(lsn);
        let mut out = out.into_iter().peekable();
        while out.peek().is_some() {
            hub.send(out.by_ref().take(MAX_BATCH).collect());
        }
    }
}

/// Holds one of the `max_clients` places (and one of its token holder's: the
/// subject within its issuer, so that no holder of another issuer's token with
/// the same `sub` takes them) while a stream is open.
struct Place(Arc<Hub>, (String, String));

impl Place {
    fn take(hub: &Arc<Hub>, who: &Requester) -> Result<Place, &'static str> {
        let max = hub.cfg.max_clients;
        let holder = who.holder();
        let mut per_sub = hub.per_sub.lock();
        let n = per_sub.get(&holder).copied().unwrap_or(0);
        if n >= hub.cfg.max_per_sub {
            return Err("full_for_sub");
        }
        hub.clients
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| "full")?;
        per_sub.insert(holder.clone(), n + 1);
        hub.metrics.clients.inc();
        Ok(Place(hub.clone(), holder))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut per_sub = self.0.per_sub.lock();
        if let Some(n) = per_sub.get_mut(&self.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per_sub.remove(&self.1);
            }
        }
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.clients.dec();
    }
}

/// The RFC 6455 §4.2.2 accept value for `key`.
fn accept_key(key: &[u8]) -> String {
    use base64::Engine as _;
    use sha1::Digest as _;
    let mut h = sha1::Sha1::new();
    h.update(key);
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC11B65");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Largest frame or message a client may send (it has nothing to say but pongs
/// and its close).
const MAX_CLIENT_MESSAGE: usize = 1024;

/// The stream's route.
pub const PATH: &str = "/api/realtime";

async fn upgrade(
    State(hub): State<Arc<Hub>>,
    head: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    // The edge verified the token; check that it said so and what it allows.
    let Some(who) = crate::serve::edge_identity(&head) else {
        let e = ApiError::new(
            Code::JwtMissing,
            "the stream needs a token verified by the edge",
        );
        return hub.refuse(e, None).await;
    };
    // Expired by this node's clock (within the edge's leeway, say): a stream
    // opened now would be closed at once, and a client reconnecting on the close
    // would be at it until the leeway ran out.
    if who.token_exp.is_some_and(|exp| exp <= crate::now_secs()) {
        let e = ApiError::new(Code::JwtExpired, "the token has expired");
        return hub.refuse(e, Some(&who.requester)).await;
    }
    let roles: Vec<&str> = who.requester.roles.split(',').map(str::trim).collect();
    if let Some(role) = hub
        .cfg
        .role
        .as_deref()
        .filter(|r| !gw_core::roles::satisfies(&roles, r))
    {
        let e = ApiError::with(
            Code::ForbiddenRole,
            format!("the stream needs role `{role}`"),
        );
        return hub.refuse(e, Some(&who.requester)).await;
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            let e = ApiError::with(
                Code::Malformed,
                format!("not a WebSocket upgrade: {}", e.body_text()),
            );
            return hub.refuse(e, Some(&who.requester)).await;
        }
    };
    let place = match Place::take(&hub, &who.requester) {
        Ok(p) => p,
        Err(reason) => {
            hub.closed(reason);
            let detail = if reason == "full" {
                format!(
                    "{} realtime streams are open (realtime.max_clients)",
                    hub.cfg.max_clients
                )
            } else {
                format!(
                    "{} realtime streams are open for this token's subject (realtime.max_per_sub)",
                    hub.cfg.max_per_sub
                )
            };
            let e = ApiError::with(Code::Unavailable, detail);
            return hub.refuse(e, Some(&who.requester)).await;
        }
    };
    // The roles the edge found in the token, by its `roles_claim`: the page
    // offers what they allow (it reads only a `roles` claim itself).
    let roles: Vec<String> = roles
        .iter()
        .filter(|r| !r.is_empty())
        .map(|r| (*r).to_owned())
        .collect();
    let sub = who.requester.sub;
    let mut resp = ws
        .protocols([SUBPROTOCOL])
        .max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| stream(socket, place, sub, roles, who.token_exp));
    // An HTTP/2 stream (RFC 8441) has no accept key, but Envoy presents an
    // HTTP/1.1 client's upgrade to us that way and only rewrites the status: answer
    // the key it passes on, or that client refuses the handshake.
    if let Some(key) = head.get(header::SEC_WEBSOCKET_KEY) {
        if !resp.headers().contains_key(header::SEC_WEBSOCKET_ACCEPT) {
            if let Ok(v) = HeaderValue::from_str(&accept_key(key.as_bytes())) {
                resp.headers_mut().insert(header::SEC_WEBSOCKET_ACCEPT, v);
            }
        }
    }
    resp
}

/// Sends one message within the write timeout.
async fn send(socket: &mut WebSocket, msg: Message, timeout: Duration) -> Result<(), &'static str> {
    match tokio::time::timeout(timeout, socket.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err("client"),
        Err(_) => Err("write_timeout"),
    }
}

async fn close(socket: &mut WebSocket, code: u16, reason: String, timeout: Duration) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = send(socket, Message::Close(Some(frame)), timeout).await;
}

/// When a token that expires at `exp` (unix seconds) has expired, on the
/// runtime's clock (a year ahead at most: any `exp` is a number a token may
/// carry, and an instant too far ahead does not exist).
fn expiry(exp: u64) -> tokio::time::Instant {
    let left = exp.saturating_sub(crate::now_secs()).min(365 * 86_400);
    tokio::time::Instant::now() + Duration::from_secs(left)
}

async fn stream(
    mut socket: WebSocket,
    place: Place,
    sub: String,
    roles: Vec<String>,
    token_exp: Option<u64>,
) {
    let hub = place.0.clone();
    // Subscribe before the hello, so nothing committed after its snapshot is missed.
    let mut rx = hub.tx.subscribe();
    let mut closing = hub.closing.subscribe();
    if *closing.borrow_and_update() {
        hub.closed("shutdown");
        return;
    }
    let timeout = Duration::from_millis(hub.cfg.write_timeout_ms.max(1));
    let hello = json!({
        "type": "hello",
        "schema": SCHEMA,
        "node_id": hub.node_id,
        "sub": sub,
        "roles": roles,
        "modules": hub.modules.get().map(ModuleTable::snapshot),
        "queue": hub.cfg.queue,
    });
    tracing::debug!(sub = %sub, "realtime stream opened");
    let ping_every = Duration::from_millis(hub.cfg.ping_ms.max(100));
    let mut ping = tokio::time::interval(ping_every);
    ping.tick().await;
    // A peer that answers nothing for two pings is gone (or not reading): its
    // place goes to someone else.
    let mut heard = tokio::time::Instant::now();
    // The token was checked at the upgrade: the stream ends when it expires (a
    // stream opened before its subject lost the role ends then too). No expiry
    // said (an edge before 2026-12-06): none.
    let expired =
        tokio::time::sleep_until(token_exp.map_or_else(tokio::time::Instant::now, expiry));
    tokio::pin!(expired);
    let reason = match send(
        &mut socket,
        Message::Text(hello.to_string().into()),
        timeout,
    )
    .await
    {
        Err(r) => r,
        Ok(()) => loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Ok(batch) => {
                        let mut failed = None;
                        for text in batch.iter() {
                            // A batch to a slow socket does not hold off the
                            // token's expiry or the shutdown: left for the
                            // loop, which sees them next.
                            if *closing.borrow() || (token_exp.is_some() && expired.is_elapsed()) {
                                break;
                            }
                            if let Err(r) = send(&mut socket, Message::Text(text.as_str().into()), timeout).await {
                                failed = Some(r);
                                break;
                            }
                        }
                        if let Some(r) = failed {
                            break r;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        close(&mut socket, CLOSE_SLOW,
                            format!("slow consumer: {n} transactions' messages behind"), timeout).await;
                        break "slow";
                    }
                    // The hub owns the sender: only the signal below ends streams.
                    Err(broadcast::error::RecvError::Closed) => break "shutdown",
                },
                _ = closing.changed() => {
                    close(&mut socket, 1001, "the gateway is shutting down".into(), timeout).await;
                    break "shutdown";
                }
                () = &mut expired, if token_exp.is_some() => {
                    close(&mut socket, CLOSE_EXPIRED, "the token has expired".into(), timeout).await;
                    break "expired";
                }
                _ = ping.tick() => {
                    if heard.elapsed() > ping_every * 2 + ping_every / 2 {
                        close(&mut socket, 1001, "no answer to pings".into(), timeout).await;
                        break "no_pong";
                    }
                    if let Err(r) = send(&mut socket, Message::Ping(Vec::new().into()), timeout).await {
                        break r;
                    }
                }
                // The client's frames: pongs, a close, or nothing it should send.
                m = socket.recv() => {
                    heard = tokio::time::Instant::now();
                    match m {
                        Some(Ok(Message::Close(_))) => {
                            // The reply to the client's close is queued: send it.
                            let _ = tokio::time::timeout(timeout, futures_util::SinkExt::flush(&mut socket)).await;
                            break "client";
                        }
                        None | Some(Err(_)) => break "client",
                        Some(Ok(Message::Pong(_) | Message::Ping(_))) => {}
                        Some(Ok(_)) => {
                            close(&mut socket, 1008, "this stream takes no messages".into(), timeout).await;
                            break "client";
                        }
                    }
                }
            }
        },
    };
    if reason != "client" {
        tracing::info!(sub = %sub, reason, "realtime stream closed");
    }
    hub.closed(reason);
    drop(place);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked() {
        assert!(RealtimeConfig::default().validate().is_ok());
        let bad = |f: fn(&mut RealtimeConfig)| {
            let mut c = RealtimeConfig::default();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(bad(|c| c.max_clients = 0).starts_with("realtime.max_clients"));
        assert!(bad(|c| c.queue = 1).starts_with("realtime.queue"));
        assert!(bad(|c| c.max_per_sub = 0).starts_with("realtime.max_per_sub"));
        assert!(bad(|c| c.max_per_sub = c.max_clients + 1).starts_with("realtime.max_per_sub"));
        assert!(bad(|c| c.write_timeout_ms = 0).starts_with("realtime.write_timeout_ms"));
        assert!(bad(|c| c.ping_ms = 30_000).contains("idle timeout"));
    }

    /// Every change of the module table is a `module` message, whoever made it —
    /// another node's state (Kafka bus) included, which this node's journal never
    /// sees (before, only this node's agents' journal entries were published, and
    /// a console kept showing a state another node had changed); an unchanged or
    /// older state is none.
    #[test]
    fn every_change_of_the_module_table_is_a_module_message() {
        use gw_core::module_state::{ModuleState, RunState};
        let hub = Hub::new(
            RealtimeConfig::default(),
            "node-1".into(),
            &mut Registry::default(),
        );
        let mut rx = hub.tx.subscribe();
        let table = ModuleTable::new();
        hub.set_modules(table.clone());
        hub.sink().committed(7, &Txn::of(Vec::new()));
        let running = ModuleState {
            state: RunState::Running,
            applied: 1,
            ..ModuleState::default()
        };
        table.advance(gw_core::Module::Mev, running.clone(), None);
        table.set(gw_core::Module::Mev, running.clone());
        table.advance(gw_core::Module::Mev, ModuleState::default(), None);
        let got: Vec<Value> = std::iter::from_fn(|| rx.try_recv().ok())
            .flat_map(|b| b.to_vec())
            .map(|t| serde_json::from_str(&t).unwrap_or_default())
            .collect();
        assert_eq!(
            got,
            [json!({"type": "module", "lsn": 7, "module": "mev", "state": running})]
        );
    }

    /// A transaction of many rows takes a few items of the channel, not one per
    /// message: 5 000 send rows at once (a backlog the send audit let go) leave a
    /// reader of a 128-item queue that has read nothing yet with every message, in
    /// order. Counted in messages, every stream fell 4 872 behind and was closed.
    #[test]
    fn a_large_transaction_does_not_overrun_the_queue() {
        let cfg = RealtimeConfig {
            queue: 128,
            ..RealtimeConfig::default()
        };
        let hub = Hub::new(cfg, "node-1".into(), &mut Registry::default());
        let mut rx = hub.tx.subscribe();
        let rows = (0..5_000)
            .map(|i| crate::sender::audit::SendRow {
                signature: format!("sig-{i}"),
                ..Default::default()
            })
            .collect();
        hub.sink()
            .committed(3, &Txn::of(vec![Entry::Sends { rows }]));
        let mut got = Vec::new();
        loop {
            match rx.try_recv() {
                Ok(b) => {
                    assert!(b.len() <= MAX_BATCH);
                    got.extend(b.iter().map(|t| {
                        let v: Value = serde_json::from_str(t).unwrap_or_default();
                        v["signature"].as_str().unwrap_or_default().to_owned()
                    }));
                }
                Err(broadcast::error::TryRecvError::Empty) => break,
                Err(e) => panic!("{e}"),
            }
        }
        let want: Vec<String> = (0..5_000).map(|i| format!("sig-{i}")).collect();
        assert_eq!(got, want);
    }
}
