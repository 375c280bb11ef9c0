//! The hot path's QUIC ingest endpoint (`sender.strategy.ingest`).
//!
//! Searchers connect over QUIC (ALPN `gw-opportunities`, TLS 1.3) with a client
//! certificate self-signed from an Ed25519 key, as on Solana's TPU; only keys on the
//! allow-list complete the handshake. The server presents the sender's identity,
//! so a client can pin it. Each unidirectional stream carries any number of
//! `hotpath.Opportunity` frames (`proto/opportunity.proto`), each preceded by its
//! length as a protobuf varint.
//!
//! Everything here runs on the ingest thread (a current-thread runtime): frames are
//! decoded, validated (each transaction parsed and its signatures verified, as on
//! `POST /api/opportunities`) and pushed into the ring there, so that thread stays
//! the ring's only producer.
//!
//! Bad input never panics and never stalls other streams: a frame longer than
//! `max_frame_bytes`, an unreadable length or an undecodable frame stops the
//! stream with code [`STOP_MALFORMED`]; a decodable frame whose opportunity is
//! invalid (unknown module, bad transaction, too many features or variants) is
//! counted and skipped, and the stream goes on.
//!
//! Nothing unauthenticated holds resources for long: a client whose address is
//! not yet validated gets a QUIC Retry first (no spoofed floods), handshakes in
//! progress have places by address ([`handshakes`]: a pool of `max_connections`
//! for addresses an allowed client is connected from, or was within the last
//! hour, another for everyone else, who may start 8 a minute per address; 4 at
//! once from any one address or IPv6 /64), so that strangers starting handshakes and stalling them cannot
//! lock the searchers out; each must finish within `handshake_timeout_ms`, and
//! only authenticated connections count against `max_connections` and
//! `max_connections_per_identity`. Each stream's
//! flow-control window is two frames (`max_frame_bytes`, at least 64 KiB), a
//! connection's that for each of its `max_streams_per_connection` streams.
//!
//! Searchers share the thread fairly: a stream decodes frames holding at most
//! [`TXS_PER_TURN`] transactions (each one's signatures checked; a frame's
//! first always) before it yields, and the streams of one client
//! identity (over all its connections) take one turn at a time between them, so
//! a client with many streams gets no more of the thread, the ring or the
//! module's send rate than one with a single stream while both have frames to
//! offer. What a client offers beyond its share waits (a chunk read into its
//! stream's buffer, the rest in QUIC's flow control): it is slowed, not dropped.
//!
//! Every refusal is a ledger row ([`IngestRefusals`], route [`ROUTE`]): a
//! handshake refused or failed (`overloaded`, `unauthenticated`: no identity,
//! the remote address in the row), a connection beyond its identity's bound
//! (`overloaded`), a stream stopped and an opportunity skipped (`malformed`, the
//! bytes in question kept), a connection closed for breaking QUIC's rules (a
//! bidirectional stream, a datagram: `malformed`), each naming the client's
//! identity when it has one.
//! The ingest thread only queues them (bounded; beyond, counted and summed): a
//! task on the sidecar's runtime writes them, within the ledger's budgets.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use ed25519_dalek::SigningKey;
use gw_core::contract::Requester;
use gw_core::Module;
use prost::Message;
use serde::Deserialize;

pub mod handshakes;

use handshakes::Handshakes;

use super::strategy::{Opportunity, SignedTx};
use super::tls;
use super::txwire;
use crate::config::OutOfBounds;
use crate::serve::{Gatekeeper, Refusal, Via};
use gw_core::Code;
use serde_json::json;

/// The ingest endpoint's ALPN id.
pub const ALPN_OPPORTUNITIES: &[u8] = b"gw-opportunities";
/// Application code of a stream stopped for malformed framing.
pub const STOP_MALFORMED: u32 = 1;
/// Application code of a connection refused because `max_connections` are open.
pub const CLOSE_BUSY: u32 = 2;
/// Most pre-signed variants per opportunity (as on HTTP).
pub const MAX_VARIANTS: usize = 8;
/// Most features per opportunity (as on HTTP).
pub const MAX_FEATURES: usize = super::http::MAX_FEATURES;
/// Most `max_connections`.
pub const MAX_CONNECTIONS: usize = 4096;

/// A handshake must finish within this, by default
/// (`handshake_timeout_ms`).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Transactions a stream's frames may hold (each one's signatures are checked)
/// before other streams get the thread: a turn is work, not frames, so frames of
/// eight variants buy no more of the thread than frames of one.
pub const TXS_PER_TURN: usize = 16;

/// `sender.strategy.ingest`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// UDP address of the QUIC endpoint.
    pub bind: SocketAddr,
    /// Client identities allowed to connect: base58 Ed25519 public keys (as Solana
    /// writes them). Required, non-empty: nobody is trusted for reaching the port.
    pub allow: Vec<String>,
    /// Authenticated connections at once at most (and handshakes in progress).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections one client identity may hold at once.
    #[serde(default = "default_per_identity")]
    pub max_connections_per_identity: usize,
    /// Longest frame (bytes after the length).
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
    /// Unidirectional streams a client may have open at once.
    #[serde(default = "default_streams")]
    pub max_streams_per_connection: u32,
    /// A silent connection is closed after this long.
    #[serde(default = "default_idle")]
    pub idle_timeout_ms: u64,
    /// A handshake must finish within this.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_ms: u64,
}

fn default_max_connections() -> usize {
    64
}
fn default_per_identity() -> usize {
    4
}
fn default_max_frame() -> usize {
    64 << 10
}
fn default_streams() -> u32 {
    16
}
fn default_idle() -> u64 {
    30_000
}
fn default_handshake_timeout() -> u64 {
    HANDSHAKE_TIMEOUT.as_millis() as u64
}

impl IngestConfig {
    /// Checks the bounds and parses the allow-list.
    pub fn validate(&self) -> Result<(), OutOfBounds> {
        self.allowed().map(|_| ())?;
        if self.max_connections == 0 || self.max_connections > MAX_CONNECTIONS {
            return Err(OutOfBounds::new(
                "sender.strategy.ingest.max_connections",
                "must be within 1..=4096",
            ));
        }
        if self.max_connections_per_identity == 0 || self.max_connections_per_identity > 4096 {
            return Err(OutOfBounds::new(
                "sender.strategy.ingest.max_connections_per_identity",
                "must be within 1..=4096",
            ));
        }
        if self.max_frame_bytes < 256 || self.max_frame_bytes > 1 << 20 {
            return Err(OutOfBounds::new(
                "sender.strategy.ingest.max_frame_bytes",
                "must be within 256..=1048576",
            ));
        }
        if self.max_streams_per_connection == 0 || self.max_streams_per_connection > 1024 {
            return Err(OutOfBounds::new(
                "sender.strategy.ingest.max_streams_per_connection",
                "must be within 1..=1024",
            ));
        }
        if !(100..=10_000).contains(&self.handshake_timeout_ms) {
            return Err(OutOfBounds::new(
                "sender.strategy.ingest.handshake_timeout_ms",
                "must be within 100..=10000",
            ));
        }
        if !(1000..=600_000).contains(&self.idle_timeout_ms) {
            return Err(OutOfBounds::new(
                "sender.strategy.ingest.idle_timeout_ms",
                "must be within 1000..=600000",
            ));
        }
        Ok(())
    }

    /// The allow-list as keys.
    pub fn allowed(&self) -> Result<Vec<[u8; 32]>, OutOfBounds> {
        if self.allow.is_empty() {
            return Err(OutOfBounds::new(
                "sender.strategy.ingest.allow",
                "must name at least one client identity (base58 Ed25519 key)",
            ));
        }
        self.allow
            .iter()
            .map(|k| {
                gw_core::txwire::b58_exact::<32>(k).ok_or_else(|| {
                    OutOfBounds::new(
                        "sender.strategy.ingest.allow",
                        "every entry must be a base58 Ed25519 public key (32 bytes)",
                    )
                })
            })
            .collect()
    }
}

/// The route the ingest's refusal rows name.
pub const ROUTE: &str = "quic:ingest";

/// Refusals queued for their rows at most; beyond, counted and summed.
const REFUSALS_QUEUED: usize = 1024;

/// A refusal of the ingest, and who it names (the client's identity, when the
/// handshake gave one).
type Queued = (Option<Arc<Requester>>, Refusal);

/// The ingest thread's refusals, on their way to the ledger
/// ([`record_refusals`] writes them).
#[derive(Debug)]
pub struct IngestRefusals {
    tx: tokio::sync::mpsc::Sender<Queued>,
    rx: parking_lot::Mutex<Option<tokio::sync::mpsc::Receiver<Queued>>>,
    /// Queued and not yet recorded (or summed).
    pending: std::sync::atomic::AtomicUsize,
    /// Refusals that found the queue full, by code.
    overflow: parking_lot::Mutex<std::collections::BTreeMap<Code, u64>>,
}

impl Default for IngestRefusals {
    fn default() -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(REFUSALS_QUEUED);
        IngestRefusals {
            tx,
            rx: parking_lot::Mutex::new(Some(rx)),
            pending: Default::default(),
            overflow: Default::default(),
        }
    }
}

impl IngestRefusals {
    /// Queues a refusal with `code` naming `who`; `raw`: what of the request its
    /// row keeps (its start: `serve::kept_of`); `detail`, `remote`: what it says.
    /// With the queue full it is only counted: nothing is copied on the ingest
    /// thread for a refusal that is not queued.
    fn report(
        &self,
        code: Code,
        who: Option<&Arc<Requester>>,
        raw: &[u8],
        detail: &str,
        remote: Option<SocketAddr>,
    ) {
        self.report_noting(code, who, raw, detail, remote, |_| {});
    }

    /// [`Self::report`], the note completed by `more`.
    fn report_noting(
        &self,
        code: Code,
        who: Option<&Arc<Requester>>,
        raw: &[u8],
        detail: &str,
        remote: Option<SocketAddr>,
        more: impl FnOnce(&mut serde_json::Value),
    ) {
        let Ok(slot) = self.tx.try_reserve() else {
            *self.overflow.lock().entry(code).or_default() += 1;
            return;
        };
        // Bounded as the HTTP route's: a detail may quote what the peer sent.
        let mut note = json!({
            "detail": gw_core::contract::truncate_utf8(detail, super::http::DETAIL_BYTES)
        });
        if let Some(a) = remote {
            note["remote"] = a.to_string().into();
        }
        more(&mut note);
        let r = Refusal {
            code,
            raw: crate::serve::kept_of(raw),
            note,
        };
        self.pending.fetch_add(1, Ordering::Relaxed);
        slot.send((who.cloned(), r));
    }

    /// Refusals that found the queue full since the last call, by code.
    fn take_overflow(&self) -> std::collections::BTreeMap<Code, u64> {
        std::mem::take(&mut *self.overflow.lock())
    }

    /// At a stop (the ingest stopped): waits, at most `within`, for the queued
    /// refusals to be recorded by [`record_refusals`], then counts those that
    /// found the queue full as beyond the budget (summed by the stop's flush).
    pub async fn settle(&self, g: &Gatekeeper, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.pending.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let left = self.pending.load(Ordering::Relaxed);
        if left > 0 {
            tracing::warn!(
                refusals = left,
                "QUIC ingest refusals not recorded by the stop: they have no row"
            );
        }
        for (code, n) in self.take_overflow() {
            crate::serve::unrecorded(g, Via::Direct, code, n);
        }
    }
}

/// Most refusals recorded in one journal transaction.
const REFUSALS_PER_COMMIT: usize = 64;

/// Writes the ingest's refusals (`stats.refusals`) as ledger rows with `g`,
/// within its budgets (those naming no identity within the budget of callers
/// other than the edge), and sums those that found the queue full, each
/// second. Runs as long as the sidecar; a second call finds no queue to read
/// and returns.
pub async fn record_refusals(stats: Arc<IngestStats>, g: Gatekeeper) {
    let refusals = &stats.refusals;
    let Some(mut rx) = refusals.rx.lock().take() else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut got = Vec::with_capacity(REFUSALS_PER_COMMIT);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut got, REFUSALS_PER_COMMIT) => {
                if n == 0 {
                    return;
                }
            }
            _ = tick.tick() => {
                for (code, n) in refusals.take_overflow() {
                    crate::serve::unrecorded(&g, Via::Direct, code, n);
                }
                continue;
            }
        }
        // One transaction for each run of refusals naming the same client.
        let mut it = std::mem::take(&mut got).into_iter().peekable();
        while let Some((who, r)) = it.next() {
            let mut run = vec![r];
            while let Some((_, next)) = it.next_if(|(w, _)| *w == who) {
                run.push(next);
            }
            let n = run.len();
            let who = who.map(|w| (*w).clone());
            crate::serve::record_refusals(&g, Via::Direct, who, ROUTE, run).await;
            refusals.pending.fetch_sub(n, Ordering::Relaxed);
        }
    }
}

/// Counters of the ingest endpoint.
#[derive(Debug, Default)]
pub struct IngestStats {
    /// Handshakes completed by allowed clients.
    pub connections: AtomicU64,
    /// Connections refused: handshake failed (identity not allowed, no
    /// certificate, wrong ALPN) or `max_connections` reached.
    pub refused: AtomicU64,
    /// Opportunities decoded and valid (then offered to the ring).
    pub frames: AtomicU64,
    /// Frames that decoded but whose opportunity was invalid (skipped).
    pub invalid: AtomicU64,
    /// Streams stopped for malformed framing (length, size, protobuf), and
    /// connections closed for breaking QUIC's rules.
    pub malformed: AtomicU64,
    /// Valid frames by client identity (only allowed identities connect: at most
    /// one entry per allow-list key).
    pub frames_by_identity:
        parking_lot::Mutex<std::collections::BTreeMap<[u8; 32], Arc<AtomicU64>>>,
    /// Each refusal, for its row.
    pub refusals: IngestRefusals,
}

/// What the ingest thread needs to serve the endpoint.
pub struct IngestSetup {
    /// The configuration.
    pub config: IngestConfig,
    /// The server's identity (the sender's).
    pub identity: SigningKey,
}

/// The endpoint, bound (inside the ingest thread's runtime).
pub(crate) fn bind(setup: &IngestSetup) -> anyhow::Result<quinn::Endpoint> {
    setup.config.validate()?;
    let allowed = setup.config.allowed()?;
    let id = tls::identity_cert(&setup.identity)?;
    let crypto = tls::server_crypto_allow(&id, ALPN_OPPORTUNITIES, Some(allowed))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(crypto)?,
    ));
    // Flow control bounds what a client can make us buffer: two frames per
    // stream, every stream's worth per connection.
    let per_stream = (2 * setup.config.max_frame_bytes as u64).max(64 << 10);
    let per_conn = per_stream * u64::from(setup.config.max_streams_per_connection);
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(quinn::VarInt::from_u64(per_stream)?)
        .receive_window(quinn::VarInt::from_u64(per_conn)?)
        .max_concurrent_uni_streams(setup.config.max_streams_per_connection.into())
        .max_concurrent_bidi_streams(0u32.into())
        // No datagrams are read: none are taken (quinn's default parks up to
        // 1.25 MB of them per connection).
        .datagram_receive_buffer_size(None)
        .max_idle_timeout(Some(
            Duration::from_millis(setup.config.idle_timeout_ms).try_into()?,
        ));
    server.transport_config(Arc::new(transport));
    // A searcher's address is the one it proved (Retry) and is known by
    // (`handshakes`): a connection does not move to another.
    server.migration(false);
    Ok(quinn::Endpoint::server(server, setup.config.bind)?)
}

/// Accepts connections until the endpoint closes; `push` hands a batch of valid
/// opportunities to the ring (on this thread).
pub(crate) async fn serve(
    endpoint: quinn::Endpoint,
    config: IngestConfig,
    stats: Arc<IngestStats>,
    push: Rc<dyn Fn(Vec<Opportunity>) -> usize>,
) {
    let handshakes = Rc::new(RefCell::new(Handshakes::new(
        config.max_connections,
        Instant::now(),
    )));
    let open: Rc<RefCell<HashMap<[u8; 32], Share>>> = Rc::default();
    while let Some(incoming) = endpoint.accept().await {
        // A client proves it owns its address (one round trip, once per
        // connection) before any handshake state is kept for it.
        if !incoming.remote_address_validated() && incoming.may_retry() {
            let _ = incoming.retry();
            continue;
        }
        let remote = incoming.remote_address();
        let place = handshakes.borrow_mut().start(remote.ip(), Instant::now());
        let place = match place {
            Ok(place) => place,
            Err(why) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                incoming.refuse();
                stats
                    .refusals
                    .report(Code::Overloaded, None, &[], why, Some(remote));
                continue;
            }
        };
        let (stats, push, open, handshakes, config) = (
            stats.clone(),
            push.clone(),
            open.clone(),
            handshakes.clone(),
            config.clone(),
        );
        tokio::task::spawn_local(async move {
            let within = Duration::from_millis(config.handshake_timeout_ms);
            let conn = tokio::time::timeout(within, incoming).await;
            handshakes.borrow_mut().ended(place);
            let conn = match conn {
                Ok(Ok(conn)) => conn,
                failed => {
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    let detail = match failed {
                        Ok(Err(e)) => format!("handshake failed: {e}"),
                        _ => format!("handshake not finished within {within:?}"),
                    };
                    let code = Code::Unauthenticated;
                    stats
                        .refusals
                        .report(code, None, &[], &detail, Some(remote));
                    return;
                }
            };
            let Some(key) = peer_key(&conn) else {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                conn.close(CLOSE_BUSY.into(), b"no identity");
                let detail = "no Ed25519 identity in the client's certificate";
                stats
                    .refusals
                    .report(Code::Unauthenticated, None, &[], detail, Some(remote));
                return;
            };
            // Its sends' audit rows and its refusals name the client by its
            // identity.
            let who = Arc::new(Requester {
                sub: bs58::encode(key).into_string(),
                ..Requester::default()
            });
            let share = {
                let mut open = open.borrow_mut();
                let total: usize = open.values().map(|s| s.connections).sum();
                let mine = open.entry(key).or_insert_with(|| Share::new(&stats, key));
                if total >= config.max_connections
                    || mine.connections >= config.max_connections_per_identity
                {
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    // Only allowed identities complete the handshake: its
                    // address is a searcher's all the same.
                    handshakes.borrow_mut().seen(remote.ip(), Instant::now());
                    conn.close(CLOSE_BUSY.into(), b"too many connections");
                    let detail = "connections at their bound (max_connections, or this identity's)";
                    stats
                        .refusals
                        .report(Code::Overloaded, Some(&who), &[], detail, Some(remote));
                    return;
                }
                mine.connections += 1;
                Rc::new(mine.reader(who))
            };
            stats.connections.fetch_add(1, Ordering::Relaxed);
            // Only allowed identities complete the handshake: while this
            // connection lasts, and an hour after, its address is a
            // searcher's, whose handshakes strangers cannot crowd out.
            // (Clients do not migrate: `bind`.)
            handshakes
                .borrow_mut()
                .connected(remote.ip(), Instant::now());
            let ended = loop {
                match conn.accept_uni().await {
                    Ok(recv) => {
                        let (stats, push) = (stats.clone(), push.clone());
                        let stream =
                            read_stream(recv, config.max_frame_bytes, stats, push, share.clone());
                        tokio::task::spawn_local(stream);
                    }
                    Err(e) => break e,
                }
            };
            handshakes
                .borrow_mut()
                .disconnected(remote.ip(), Instant::now());
            // A client breaking QUIC's rules (a bidirectional stream, a
            // datagram, more streams than allowed) is closed by quinn: a
            // refusal of what it sent.
            if let quinn::ConnectionError::TransportError(e) = &ended {
                stats.malformed.fetch_add(1, Ordering::Relaxed);
                let detail = format!("connection closed: {e}");
                stats.refusals.report(
                    Code::Malformed,
                    Some(&share.who),
                    &[],
                    &detail,
                    Some(remote),
                );
            }
            // The identity's entry stays (at most one per allow-list key): streams
            // still being read keep sharing its turn with a new connection's.
            if let Some(s) = open.borrow_mut().get_mut(&key) {
                s.connections -= 1;
            }
        });
    }
}

/// One client identity's part of the ingest: its connections, the turn its
/// streams take one at a time, its frame counter.
struct Share {
    connections: usize,
    turn: Rc<tokio::sync::Semaphore>,
    frames: Arc<AtomicU64>,
}

impl Share {
    fn new(stats: &IngestStats, key: [u8; 32]) -> Share {
        let frames = stats
            .frames_by_identity
            .lock()
            .entry(key)
            .or_default()
            .clone();
        Share {
            connections: 0,
            turn: Rc::new(tokio::sync::Semaphore::new(1)),
            frames,
        }
    }

    /// What each stream of one connection needs: the turn, the counter, and who
    /// its rows name.
    fn reader(&self, who: Arc<Requester>) -> Reader {
        Reader {
            turn: self.turn.clone(),
            frames: self.frames.clone(),
            who,
        }
    }
}

/// A connection's streams' view of their identity's [`Share`].
struct Reader {
    turn: Rc<tokio::sync::Semaphore>,
    frames: Arc<AtomicU64>,
    who: Arc<Requester>,
}

/// The Ed25519 key in the client's certificate.
fn peer_key(conn: &quinn::Connection) -> Option<[u8; 32]> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    tls::ed25519_key_of(certs.first()?)
}

/// One stream: frames until it ends, is reset, or breaks the framing. Each turn
/// (frames of at most [`TXS_PER_TURN`] transactions) is taken under its
/// identity's turn.
async fn read_stream(
    mut recv: quinn::RecvStream,
    max_frame: usize,
    stats: Arc<IngestStats>,
    push: Rc<dyn Fn(Vec<Opportunity>) -> usize>,
    reader: Rc<Reader>,
) {
    let requester = &reader.who;
    let mut buf = BytesMut::with_capacity(16 << 10);
    // When the bytes being decoded arrived (decoding and checks count in the
    // decision latency, as on HTTP).
    let mut arrived = Instant::now();
    let mut invalid = Vec::new();
    loop {
        // The turn is never closed; were it, the stream would end unread.
        let Ok(turn) = reader.turn.acquire().await else {
            return;
        };
        let mut batch = Vec::new();
        let framing = drain_frames(
            &mut buf,
            max_frame,
            TXS_PER_TURN,
            arrived,
            &stats,
            &mut batch,
            &mut invalid,
        );
        for o in &mut batch {
            o.requester = requester.clone();
        }
        if !batch.is_empty() {
            let n = batch.len();
            reader.frames.fetch_add(n as u64, Ordering::Relaxed);
            let took = push(batch);
            // Not taken whole (the ring is full): a refusal naming the client,
            // as over HTTP (the row says how many were dropped).
            if took < n {
                stats.refusals.report_noting(
                    Code::Overloaded,
                    Some(requester),
                    &[],
                    "the hot path's ring is full",
                    None,
                    |note| {
                        note["accepted"] = took.into();
                        note["dropped"] = (n - took).into();
                    },
                );
            }
        }
        // One refusal for the opportunities this turn skipped: the first one's
        // frame and why, and how many.
        if let Some((frame, why)) = invalid.first() {
            let (detail, skipped) = (format!("opportunity skipped: {why}"), invalid.len());
            stats.refusals.report_noting(
                Code::Malformed,
                Some(requester),
                frame,
                &detail,
                None,
                |note| note["skipped"] = skipped.into(),
            );
            invalid.clear();
        }
        // Other streams, connections and HTTP's offers get the thread too (after
        // every turn, valid or not). The turn is held through the yield (nothing
        // before it awaits: taken and given back without a yield, no other
        // stream would ever find it taken), then handed to this identity's next
        // stream waiting for it; this one queues behind.
        tokio::task::yield_now().await;
        drop(turn);
        let why = match framing {
            Ok(Drained::Turn) => continue,
            Ok(Drained::NeedBytes) => None,
            Err(why) => Some(why),
        };
        if let Some(why) = why {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            let _ = recv.stop(STOP_MALFORMED.into());
            let detail = format!("stream stopped: {why}");
            // The bytes that broke it: the frame that does not decode (taken off
            // the buffer already), else what is left there (the length).
            let broke = match &why {
                Framing::Undecodable(frame) => &frame[..],
                _ => &buf[..],
            };
            stats
                .refusals
                .report(Code::Malformed, Some(requester), broke, &detail, None);
            return;
        }
        match recv.read_chunk(64 << 10, true).await {
            Ok(Some(chunk)) => {
                arrived = Instant::now();
                buf.extend_from_slice(&chunk.bytes);
            }
            Ok(None) => {
                if !buf.is_empty() {
                    stats.malformed.fetch_add(1, Ordering::Relaxed);
                    let detail = "the stream ended inside a frame";
                    stats
                        .refusals
                        .report(Code::Malformed, Some(requester), &buf, detail, None);
                }
                return;
            }
            Err(_) => return,
        }
    }
}

/// Why a stream's framing is broken.
#[derive(Debug, PartialEq, Eq)]
pub enum Framing {
    /// The length prefix is not a varint of at most 10 bytes.
    BadLength,
    /// A frame longer than `max_frame_bytes`.
    TooLong(u64),
    /// The frame (here) is not a `hotpath.Opportunity`.
    Undecodable(Bytes),
}

impl std::fmt::Display for Framing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Framing::BadLength => f.write_str("a length that is not a varint of at most 10 bytes"),
            Framing::TooLong(n) => write!(f, "a frame of {n} bytes, beyond max_frame_bytes"),
            Framing::Undecodable(_) => f.write_str("a frame that is not a hotpath.Opportunity"),
        }
    }
}

/// Where [`drain_frames`] stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Drained {
    /// At an incomplete frame (or none): more bytes are needed.
    NeedBytes,
    /// After frames of `txs` transactions: complete ones may be left in the
    /// buffer.
    Turn,
}

/// Takes complete frames off the front of `buf` until they held `txs`
/// transactions (a frame counts its transactions, at least one, at most
/// [`MAX_VARIANTS`]; the frame that crosses the budget is taken whole): valid
/// opportunities go to `out`, invalid ones are counted and go to `invalid` (the
/// frame, and why). Stops at an incomplete frame, at the budget, or at broken
/// framing.
pub fn drain_frames(
    buf: &mut BytesMut,
    max_frame: usize,
    txs: usize,
    received: Instant,
    stats: &IngestStats,
    out: &mut Vec<Opportunity>,
    invalid: &mut Vec<(Bytes, String)>,
) -> Result<Drained, Framing> {
    let mut spent = 0;
    while spent < txs {
        let Some((len, at)) = varint(buf)? else {
            return Ok(Drained::NeedBytes);
        };
        if len > max_frame as u64 {
            return Err(Framing::TooLong(len));
        }
        let end = at + len as usize;
        if buf.len() < end {
            return Ok(Drained::NeedBytes);
        }
        buf.advance(at);
        let frame = buf.split_to(len as usize).freeze();
        let msg = gw_proto::hotpath::Opportunity::decode(frame.clone())
            .map_err(|_| Framing::Undecodable(frame.clone()))?;
        spent += msg.txs.len().clamp(1, MAX_VARIANTS);
        match opportunity(msg, received) {
            Ok(o) => {
                stats.frames.fetch_add(1, Ordering::Relaxed);
                out.push(o);
            }
            Err(why) => {
                stats.invalid.fetch_add(1, Ordering::Relaxed);
                invalid.push((frame, why));
            }
        }
    }
    Ok(Drained::Turn)
}

/// A protobuf varint at the front of `buf`: `(value, its length)`; `None` while
/// incomplete.
fn varint(buf: &[u8]) -> Result<Option<(u64, usize)>, Framing> {
    let mut v = 0u64;
    for (i, b) in buf.iter().take(10).enumerate() {
        let bits = u64::from(b & 0x7f);
        if i == 9 && *b > 1 {
            return Err(Framing::BadLength);
        }
        v |= bits << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((v, i + 1)));
        }
    }
    if buf.len() >= 10 {
        return Err(Framing::BadLength);
    }
    Ok(None)
}

/// One frame's opportunity, checked as `POST /api/opportunities` checks it.
pub fn opportunity(
    msg: gw_proto::hotpath::Opportunity,
    received: Instant,
) -> Result<Opportunity, String> {
    let module = Module::parse(&msg.module).ok_or_else(|| {
        format!(
            "unknown module {:?}",
            gw_core::contract::truncate_utf8(&msg.module, 64)
        )
    })?;
    if msg.features.len() > MAX_FEATURES {
        return Err(format!("more than {MAX_FEATURES} features"));
    }
    if msg.txs.is_empty() || msg.txs.len() > MAX_VARIANTS {
        return Err(format!(
            "1 to {MAX_VARIANTS} transactions (one per tip rung)"
        ));
    }
    let mut txs = Vec::with_capacity(msg.txs.len());
    for (k, wire) in msg.txs.into_iter().enumerate() {
        let info = txwire::parse(&wire, true).map_err(|e| format!("tx {k}: {e}"))?;
        txs.push(SignedTx {
            signature: info.signature_b58(),
            wire: Bytes::from(wire),
        });
    }
    Ok(Opportunity {
        module,
        // Not finite: missing, as on every other way in.
        features: msg
            .features
            .into_iter()
            .map(|f| crate::models::feature(Some(f)))
            .collect(),
        ev: msg.ev.filter(|e| e.is_finite()),
        txs,
        received,
        // Named by the stream it came on (read_stream).
        requester: Arc::default(),
    })
}

/// A client for the endpoint (searchers in Rust, the tests and the benchmark):
/// connects with `identity`, pins the server's key when given.
pub async fn connect(
    addr: SocketAddr,
    identity: &SigningKey,
    server_key: Option<[u8; 32]>,
) -> anyhow::Result<quinn::Connection> {
    connect_from(
        (std::net::Ipv4Addr::LOCALHOST, 0).into(),
        addr,
        identity,
        server_key,
    )
    .await
}

/// [`connect`] from a socket bound to `local`.
pub async fn connect_from(
    local: SocketAddr,
    addr: SocketAddr,
    identity: &SigningKey,
    server_key: Option<[u8; 32]>,
) -> anyhow::Result<quinn::Connection> {
    let id = tls::identity_cert(identity)?;
    let mut crypto = tls::client_crypto(&id, server_key)?;
    crypto.alpn_protocols = vec![ALPN_OPPORTUNITIES.to_vec()];
    let mut ep = quinn::Endpoint::client(local)?;
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto)?,
    )));
    Ok(ep.connect(addr, "ingest")?.await?)
}

/// `o` as one delimited frame.
pub fn frame(o: &gw_proto::hotpath::Opportunity) -> Vec<u8> {
    o.encode_length_delimited_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx(b: u8) -> Vec<u8> {
        txwire::example_tx(&SigningKey::from_bytes(&[9u8; 32]), [b; 32], 10)
    }

    fn msg(module: &str, txs: Vec<Vec<u8>>) -> gw_proto::hotpath::Opportunity {
        gw_proto::hotpath::Opportunity {
            module: module.into(),
            features: vec![1.0, f32::NAN],
            ev: Some(2.5),
            txs,
        }
    }

    #[test]
    fn frames_split_anywhere_decode_the_same() {
        let mut wire = Vec::new();
        for i in 0..5 {
            wire.extend(frame(&msg("mev", vec![tx(i)])));
        }
        for cut in [1, 2, 7, 100, wire.len() - 1] {
            let (stats, mut out, mut buf) = (IngestStats::default(), Vec::new(), BytesMut::new());
            for part in wire.chunks(cut) {
                buf.extend_from_slice(part);
                drain_frames(
                    &mut buf,
                    4096,
                    usize::MAX,
                    Instant::now(),
                    &stats,
                    &mut out,
                    &mut Vec::new(),
                )
                .unwrap();
            }
            assert!(buf.is_empty());
            assert_eq!(out.len(), 5, "cut {cut}");
            assert_eq!(out[3].txs[0].wire.as_ref(), &tx(3)[..]);
            assert_eq!(out[0].module, Module::Mev);
            assert!(out[0].features[1].is_nan());
        }
        // A turn takes frames of 2 transactions at most (one each here); the
        // rest wait in the buffer.
        let (stats, mut out, mut buf) = (IngestStats::default(), Vec::new(), BytesMut::new());
        buf.extend_from_slice(&wire);
        let mut turn = |out: &mut Vec<Opportunity>| {
            drain_frames(
                &mut buf,
                4096,
                2,
                Instant::now(),
                &stats,
                out,
                &mut Vec::new(),
            )
        };
        assert_eq!(turn(&mut out), Ok(Drained::Turn));
        assert_eq!(out.len(), 2);
        assert_eq!(turn(&mut out), Ok(Drained::Turn));
        assert_eq!(turn(&mut out), Ok(Drained::NeedBytes));
        assert_eq!(out.len(), 5);
        assert_eq!(out[4].txs[0].wire.as_ref(), &tx(4)[..]);
        // A turn is transactions, not frames: frames of eight take a turn of
        // sixteen in two.
        let mut wide = Vec::new();
        for i in 0..3 {
            wide.extend(frame(&msg("mev", (0..8).map(|k| tx(i * 8 + k)).collect())));
        }
        let (stats, mut out, mut buf) = (IngestStats::default(), Vec::new(), BytesMut::new());
        buf.extend_from_slice(&wide);
        let mut skipped = Vec::new();
        let r = drain_frames(
            &mut buf,
            1 << 16,
            16,
            Instant::now(),
            &stats,
            &mut out,
            &mut skipped,
        );
        assert_eq!(r, Ok(Drained::Turn));
        assert_eq!(out.len() + skipped.len(), 2, "{skipped:?}");
    }

    #[test]
    fn bad_framing_is_named_and_bad_opportunities_are_skipped() {
        let stats = IngestStats::default();
        let mut out = Vec::new();
        let mut invalid = Vec::new();
        let mut run = |bytes: &[u8]| {
            let mut buf = BytesMut::from(bytes);
            drain_frames(
                &mut buf,
                1000,
                usize::MAX,
                Instant::now(),
                &stats,
                &mut out,
                &mut invalid,
            )
        };
        assert_eq!(run(&[0xff; 10]), Err(Framing::BadLength));
        assert_eq!(run(&[0xff; 9]), Ok(Drained::NeedBytes), "still incomplete");
        assert_eq!(run(&[0xe9, 0x07]), Err(Framing::TooLong(1001)));
        assert_eq!(
            run(&[3, 0xff, 0xff, 0xff]),
            Err(Framing::Undecodable(Bytes::from_static(&[
                0xff, 0xff, 0xff
            ])))
        );
        let mut tampered = tx(1);
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        let mut wire = frame(&msg("nope", vec![tx(1)]));
        wire.extend(frame(&msg("mev", vec![tampered])));
        wire.extend(frame(&msg("mev", vec![])));
        wire.extend(frame(&msg("arbitrage", vec![tx(2)])));
        assert_eq!(run(&wire), Ok(Drained::NeedBytes));
        assert_eq!(stats.invalid.load(Ordering::Relaxed), 3);
        assert_eq!(stats.frames.load(Ordering::Relaxed), 1);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].module, Module::Arbitrage);
        // Each skipped one with its frame and why.
        let why: Vec<&str> = invalid.iter().map(|(_, w)| w.as_str()).collect();
        assert_eq!(why.len(), 3);
        assert!(why[0].starts_with("unknown module"), "{why:?}");
        assert!(why[1].starts_with("tx 0:"), "{why:?}");
        assert!(why[2].starts_with("1 to 8 transactions"), "{why:?}");
        let first = msg("nope", vec![tx(1)]).encode_to_vec();
        assert_eq!(
            invalid[0].0.as_ref(),
            &first[..],
            "the frame, without its length"
        );
    }

    #[test]
    fn refusals_beyond_the_queue_are_counted_by_code() {
        let r = IngestRefusals::default();
        let who = Arc::new(Requester {
            sub: "searcher".into(),
            ..Requester::default()
        });
        for _ in 0..REFUSALS_QUEUED {
            r.report(Code::Malformed, Some(&who), &[7u8; 10_000], "bad", None);
        }
        r.report(Code::Malformed, None, &[], "one more", None);
        r.report(Code::Overloaded, None, &[], "and another", None);
        assert_eq!(r.pending.load(Ordering::Relaxed), REFUSALS_QUEUED);
        let over = r.take_overflow();
        assert_eq!(over.get(&Code::Malformed), Some(&1));
        assert_eq!(over.get(&Code::Overloaded), Some(&1));
        assert!(r.take_overflow().is_empty(), "taken once");
        let mut rx = r.rx.lock().take().unwrap();
        let (named, first) = rx.try_recv().unwrap();
        assert_eq!(named.as_deref(), Some(&*who));
        assert_eq!(
            first.raw.len(),
            crate::serve::REFUSED_BODY_BYTES,
            "a row keeps 4 KiB at most"
        );
        assert_eq!(first.note["detail"], "bad");
    }

    #[test]
    fn the_allow_list_must_hold_keys() {
        let mut c: IngestConfig = serde_json::from_value(serde_json::json!({
            "bind": "127.0.0.1:0", "allow": [],
        }))
        .unwrap();
        assert!(c.validate().is_err(), "an empty allow-list");
        c.allow = vec!["not-base58!".into()];
        assert!(c.validate().is_err());
        c.allow = vec![bs58::encode([7u8; 32]).into_string()];
        c.validate().unwrap();
        assert_eq!(c.allowed().unwrap(), vec![[7u8; 32]]);
        for (ms, ok) in [(99, false), (100, true), (10_000, true), (10_001, false)] {
            c.handshake_timeout_ms = ms;
            assert_eq!(c.validate().is_ok(), ok, "handshake_timeout_ms {ms}");
        }
    }
}
