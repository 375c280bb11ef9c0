//! The TPU route: QUIC straight to the leaders (Solana's TPU protocol).
//!
//! One connection per leader (its address and the identity it must present),
//! owned by that leader's worker task; the worker
//! connects as soon as the leader is known (pre-warm), reconnects with exponential
//! backoff and jitter, and sends each transaction on its own unidirectional stream.
//! [`TpuClient::send`] writes the stream on the caller's own task instead when the
//! connection is up, nothing waits in the leader's queue and a stream is free (the
//! worker and the callers share the `max_streams` permits), saving the hand-over
//! to the worker and back.
//!
//! Connection hygiene (a validator sees every handshake): a connection the leader
//! closes before it carried a stream or stayed up `stable_after_ms`, or closes with
//! one of Agave's refusal codes (1 dropped, 2 disallowed, 4 too many), is a
//! refusal: the next attempt waits `refused_backoff_min_ms`, doubling up to
//! `refused_backoff_max_ms`, and a refusing leader is not retried at all while
//! there is nothing to send. The backoff resets only after a connection carried a
//! stream or stayed up, even one the leader dropped (Agave's code 1: it evicts
//! working entries under load; the next attempt then waits the first step), but
//! not one closed as stalled or with another refusal code. Handshakes are capped per leader
//! (`max_handshakes_per_leader_per_min`, Agave's own per-IP budget is 8 a minute)
//! and in all (`max_handshakes_per_sec`). Every close is counted by reason. Work reaches
//! a worker through a bounded queue: when it is full the transaction is dropped and
//! counted, never buffered without bound. A transaction counts as delivered when the
//! leader has acknowledged every byte of its stream (QUIC ACK of the FIN); the TPU
//! protocol has no other answer. A connection on which nothing was acknowledged
//! for `stall_timeout_ms` while streams waited is closed as stalled (a refusal):
//! no send waits on a live leader that never grants a stream.

use crate::config::OutOfBounds;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use futures_util::stream::{FuturesUnordered, StreamExt};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::cc::{CongestionConfig, PhaseBoostFactory, PhaseSignal};
use super::tls;

pub use gw_core::txwire::MAX_TX_BYTES;
/// Concurrent streams a validator grants an unstaked client (Agave's
/// `QUIC_MAX_UNSTAKED_CONCURRENT_STREAMS`).
pub const UNSTAKED_STREAMS: usize = 128;
/// The most concurrent streams a validator grants a staked client (Agave's
/// `QUIC_MAX_STAKED_CONCURRENT_STREAMS`).
pub const STAKED_STREAMS_MAX: usize = 512;

/// A leader's TPU endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Leader {
    /// The TPU QUIC address (`tpuQuic` in `getClusterNodes`).
    pub tpu_quic: SocketAddr,
    /// Its identity key, when known: the TLS certificate must carry it.
    pub identity: Option<[u8; 32]>,
}

/// `tpu` in the sender configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpuConfig {
    /// Local UDP address of the QUIC endpoint.
    #[serde(default = "default_bind")]
    pub bind: SocketAddr,
    /// Transactions waiting per leader before new ones are dropped.
    #[serde(default = "default_queue")]
    pub queue_per_leader: usize,
    /// Streams in flight per connection, until acknowledged (and the largest
    /// batch). Best set to what the leaders grant this identity (their QUIC stream
    /// credit): Agave grants an unstaked peer 128, a staked one up to 512 by its
    /// stake. Above the grant, jobs wait on quinn for credit, and quinn wakes every
    /// one of them each time the leader grants a stream (≈ 15 % of the rate lost
    /// at 512 against a grant of 128 in `bench/`); below it, the connection
    /// carries less than it could.
    #[serde(default = "default_streams")]
    pub max_streams: usize,
    /// Handshake deadline, milliseconds.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// Reconnect backoff, first and largest step, milliseconds.
    #[serde(default = "default_backoff_min")]
    pub backoff_min_ms: u64,
    /// See `backoff_min_ms`.
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
    /// Backoff after the leader refused a connection (closed it before it was
    /// stable, or with a refusal code), first and largest step, milliseconds.
    #[serde(default = "default_refused_backoff_min")]
    pub refused_backoff_min_ms: u64,
    /// See `refused_backoff_min_ms`.
    #[serde(default = "default_refused_backoff_max")]
    pub refused_backoff_max_ms: u64,
    /// A connection that stayed up this long (or carried a stream) is stable: its
    /// loss resets the backoff. Milliseconds.
    #[serde(default = "default_stable_after")]
    pub stable_after_ms: u64,
    /// Handshakes per leader per minute at most (Agave allows 8 per IP).
    #[serde(default = "default_handshakes_per_leader")]
    pub max_handshakes_per_leader_per_min: u32,
    /// Handshakes per second at most, all leaders together.
    #[serde(default = "default_handshakes_per_sec")]
    pub max_handshakes_per_sec: u32,
    /// Idle timeout of a connection, milliseconds (keep-alives every third of it).
    #[serde(default = "default_idle")]
    pub idle_timeout_ms: u64,
    /// A connection with streams waiting (for the leader's stream credit or its
    /// acknowledgement) on which no stream was acknowledged for this long is
    /// stalled: closed, its sends failed (their hedge goes), the leader backed off
    /// as one that refused us. Milliseconds. A live peer that never grants a
    /// stream keeps a connection up past `idle_timeout_ms`; this bounds how long a
    /// send can wait for it.
    #[serde(default = "default_stall")]
    pub stall_timeout_ms: u64,
    /// Leader connections kept; the least recently used beyond it is closed.
    #[serde(default = "default_max_leaders")]
    pub max_leaders: usize,
    /// Congestion control.
    #[serde(default)]
    pub congestion: CongestionConfig,
}

fn default_bind() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}
fn default_queue() -> usize {
    1024
}
fn default_streams() -> usize {
    UNSTAKED_STREAMS
}
fn default_connect_timeout() -> u64 {
    2000
}
fn default_backoff_min() -> u64 {
    50
}
fn default_backoff_max() -> u64 {
    2000
}
fn default_refused_backoff_min() -> u64 {
    1000
}
fn default_refused_backoff_max() -> u64 {
    60_000
}
fn default_stable_after() -> u64 {
    2000
}
fn default_handshakes_per_leader() -> u32 {
    8
}
fn default_handshakes_per_sec() -> u32 {
    32
}
fn default_idle() -> u64 {
    10_000
}
fn default_stall() -> u64 {
    2000
}
fn default_max_leaders() -> usize {
    8
}

impl Default for TpuConfig {
    fn default() -> Self {
        serde_json::from_str("{}").unwrap_or_else(|_| unreachable!("all fields have defaults"))
    }
}

impl TpuConfig {
    /// Checks the bounds.
    pub fn validate(&self) -> Result<(), OutOfBounds> {
        if self.queue_per_leader == 0 || self.queue_per_leader > 1 << 20 {
            return Err(OutOfBounds::new(
                "sender.tpu.queue_per_leader",
                "must be within 1..=1048576",
            ));
        }
        if self.max_streams == 0 || self.max_streams > 4096 {
            return Err(OutOfBounds::new(
                "sender.tpu.max_streams",
                "must be within 1..=4096",
            ));
        }
        if self.max_leaders == 0 {
            return Err(OutOfBounds::new(
                "sender.tpu.max_leaders",
                "must be at least 1",
            ));
        }
        if self.backoff_min_ms == 0 || self.backoff_max_ms < self.backoff_min_ms {
            return Err(OutOfBounds::new(
                "sender.tpu.backoff_min_ms",
                "must be > 0 and <= backoff_max_ms",
            ));
        }
        if self.refused_backoff_min_ms == 0
            || self.refused_backoff_max_ms < self.refused_backoff_min_ms
        {
            return Err(OutOfBounds::new(
                "sender.tpu.refused_backoff_min_ms",
                "must be > 0 and <= refused_backoff_max_ms",
            ));
        }
        if self.stable_after_ms == 0 {
            return Err(OutOfBounds::new(
                "sender.tpu.stable_after_ms",
                "must be at least 1 (0 would take every early close for a stable connection)",
            ));
        }
        if self.max_handshakes_per_leader_per_min == 0 || self.max_handshakes_per_sec == 0 {
            return Err(OutOfBounds::new(
                "sender.tpu.max_handshakes_per_leader_per_min",
                "and max_handshakes_per_sec must be at least 1",
            ));
        }
        // Beyond an hour QUIC's idle timeout could not be represented (quinn
        // turns it off); 0 would time every handshake out at its first packet.
        if !(100..=3_600_000).contains(&self.idle_timeout_ms) {
            return Err(OutOfBounds::new(
                "sender.tpu.idle_timeout_ms",
                "must be within 100..=3600000",
            ));
        }
        if !(10..=60_000).contains(&self.connect_timeout_ms) {
            return Err(OutOfBounds::new(
                "sender.tpu.connect_timeout_ms",
                "must be within 10..=60000",
            ));
        }
        if !(100..=60_000).contains(&self.stall_timeout_ms) {
            return Err(OutOfBounds::new(
                "sender.tpu.stall_timeout_ms",
                "must be within 100..=60000",
            ));
        }
        self.congestion.validate()
    }
}

/// Why the TPU route did not deliver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TpuError {
    /// The transaction is larger than the TPU accepts.
    #[error("transaction is {0} bytes; the TPU accepts at most {MAX_TX_BYTES}")]
    TooLarge(usize),
    /// The leader's queue is full (dropped and counted).
    #[error("queue for leader {0} is full: dropped")]
    QueueFull(SocketAddr),
    /// No connection (handshake failed, timed out or backing off).
    #[error("leader {0} unreachable: {1}")]
    Unreachable(SocketAddr, String),
    /// The connection or stream failed while sending, once its bytes may have
    /// reached the leader.
    #[error("send to leader {0} failed: {1}")]
    Stream(SocketAddr, String),
    /// The stream failed where the leader cannot have read it: it could not be
    /// opened or written to its end (a leader takes a transaction only from a
    /// finished stream), or its connection was closed with one of the codes
    /// Agave refuses a connection with before admitting it (2, 4).
    #[error("send to leader {0} failed, not read: {1}")]
    Unread(SocketAddr, String),
    /// The client was shut down.
    #[error("TPU client stopped")]
    Stopped,
    /// A batch larger than the streams one connection may have in flight.
    #[error("a batch of {0} transactions; at most max_streams = {1}")]
    BatchTooLarge(usize, usize),
}

impl TpuError {
    /// Whether the leader may have the transaction all the same: its stream
    /// failed once written (a connection closed as the stream was acknowledged,
    /// other than Agave's refusal of a fresh one, a stall, a stream the leader
    /// stopped after reading it). Every other error is before anything was
    /// written, or a refusal of what was.
    pub fn maybe_sent(&self) -> bool {
        matches!(self, TpuError::Stream(..))
    }
}

/// Counters (read by `/metrics` and the tests).
#[derive(Debug, Default)]
pub struct TpuStats {
    /// Transactions acknowledged by a leader.
    pub delivered: AtomicU64,
    /// Transactions that failed on a connection or stream.
    pub failed: AtomicU64,
    /// Transactions refused because no connection was up.
    pub unreachable: AtomicU64,
    /// Transactions dropped on a full queue.
    pub dropped_full: AtomicU64,
    /// Transactions refused as too large.
    pub too_large: AtomicU64,
    /// Transactions refused in batches of more than `max_streams`.
    pub batch_too_large: AtomicU64,
    /// Handshakes completed.
    pub connects: AtomicU64,
    /// Handshakes failed.
    pub connect_failures: AtomicU64,
    /// Of those, handshakes the leader refused (`CONNECTION_REFUSED`, an
    /// application close, a TLS failure): backed off as a refusing leader.
    pub handshakes_refused: AtomicU64,
    /// Handshakes not attempted because a rate cap had no room.
    pub handshakes_capped: AtomicU64,
    /// Connections closed, by reason ([`CLOSE_REASONS`]).
    pub closes: [AtomicU64; CLOSE_REASONS.len()],
}

/// Why a connection ended, as counted in [`TpuStats::closes`]: Agave's own close
/// codes by their names, then what QUIC says.
pub const CLOSE_REASONS: [&str; 11] = [
    "dropped",
    "disallowed",
    "exceed_max_stream_count",
    "too_many",
    "invalid_stream",
    "application_other",
    "transport",
    "timed_out",
    "reset",
    "local",
    "stalled",
];

/// The [`CLOSE_REASONS`] index of a connection this side closed as stalled
/// (`stall_timeout_ms`).
const STALLED: usize = 10;

/// Agave's `CONNECTION_CLOSE_CODE_*` that mean "not now": 1 dropped (evicted by
/// stake), 2 disallowed (per-IP budget), 4 too many (per-peer cap).
const REFUSAL_CODES: [u64; 3] = [1, 2, 4];

/// Of those, the codes Agave closes a connection with before admitting it
/// (`solana-streamer`: its per-IP budget, 2; its per-peer cap, 4): nothing that
/// came on it was read. Code 1 drops an admitted connection, whose streams may
/// have been.
const ADMISSION_REFUSALS: [u64; 2] = [2, 4];

/// Whether `e` closed the connection with one of [`ADMISSION_REFUSALS`].
fn refused_before_admission(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ApplicationClosed(c)
        if ADMISSION_REFUSALS.contains(&c.error_code.into_inner()))
}

/// Whether a handshake that failed with `e` was refused by the leader: closed
/// with `CONNECTION_REFUSED` (Agave refuses so when its connection table is
/// full), closed by its application, or a TLS failure (the leader is not the
/// identity pinned, or does not speak `solana-tpu`) — not a timeout or a
/// network error, which the short backoff retries.
fn handshake_refused(e: &quinn::ConnectionError) -> bool {
    use quinn::ConnectionError as E;
    // TLS alerts are the transport codes 0x100..=0x1ff (RFC 9001 §4.8).
    let tls = |code: quinn::TransportErrorCode| (0x100..=0x1ff).contains(&u64::from(code));
    match e {
        // A server's application close during the handshake arrives as
        // APPLICATION_ERROR (RFC 9000 §10.2.3).
        E::ConnectionClosed(c) => {
            c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
                || c.error_code == quinn::TransportErrorCode::APPLICATION_ERROR
                || tls(c.error_code)
        }
        E::ApplicationClosed(_) => true,
        E::TransportError(t) => tls(t.code),
        _ => false,
    }
}

/// The [`CLOSE_REASONS`] index of `e`, and whether it is one of the refusal codes.
fn close_reason(e: &quinn::ConnectionError) -> (usize, bool) {
    use quinn::ConnectionError as E;
    match e {
        E::ApplicationClosed(c) => {
            let code = c.error_code.into_inner();
            let i = match code {
                1..=5 => code as usize - 1,
                _ => 5,
            };
            (i, REFUSAL_CODES.contains(&code))
        }
        E::ConnectionClosed(_) | E::TransportError(_) | E::VersionMismatch => (6, false),
        E::TimedOut => (7, false),
        E::Reset => (8, false),
        E::LocallyClosed | E::CidsExhausted => (9, false),
    }
}

/// A token bucket: `burst` handshakes, refilled at one per `every`.
struct RateCap {
    every: Duration,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateCap {
    fn new(burst: u32, per: Duration) -> RateCap {
        let burst = f64::from(burst.max(1));
        RateCap {
            every: per.div_f64(burst),
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// The tokens of `st` refilled up to `now`.
    fn refilled(&self, st: &(f64, Instant), now: Instant) -> f64 {
        let refill = now.duration_since(st.1).as_secs_f64() / self.every.as_secs_f64();
        (st.0 + refill).min(self.burst)
    }

    /// Whether the cap remembers no handshake (its bucket is full again).
    fn is_full(&self) -> bool {
        self.state
            .lock()
            .is_ok_and(|st| self.refilled(&st, Instant::now()) >= self.burst)
    }

    /// Gives back a token taken for a handshake that was not made.
    fn refund(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.0 = (st.0 + 1.0).min(self.burst);
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&self) -> Result<(), Duration> {
        let Ok(mut st) = self.state.lock() else {
            return Ok(());
        };
        let now = Instant::now();
        st.0 = self.refilled(&st, now);
        st.1 = now;
        if st.0 >= 1.0 {
            st.0 -= 1.0;
            Ok(())
        } else {
            Err(self.every.mul_f64(1.0 - st.0))
        }
    }
}

/// Exponential backoff with jitter: each delay is the step times 1 to 1.5 (never
/// shorter than the step), the step doubling up to `max`.
struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    fn new(min_ms: u64, max_ms: u64) -> Backoff {
        let (min, max) = (Duration::from_millis(min_ms), Duration::from_millis(max_ms));
        Backoff {
            min,
            max,
            step: min,
        }
    }

    fn reset(&mut self) {
        self.step = self.min;
    }

    fn next_delay(&mut self) -> Duration {
        let mut b = [0u8; 4];
        let r = match rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut b) {
            Ok(()) => f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX),
            Err(_) => 0.5,
        };
        let d = self.step.mul_f64(1.0 + r / 2.0);
        self.step = (self.step * 2).min(self.max);
        d
    }
}

impl TpuStats {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn add(c: &AtomicU64, n: usize) {
        c.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Answer to one transaction: resolves once the leader acknowledged it (or it
/// failed); `Err(RecvError)` when the client stopped before answering. One that
/// went through the leader's queue ([`TpuClient::submit`]) is sent whether or not
/// anyone awaits this; one [`TpuClient::send`] sends on the caller's task is sent
/// by this future (see there).
#[must_use = "a delivery answers only when awaited, and one sent on the caller's task is sent by it"]
pub struct Delivery(Pending);

impl Delivery {
    /// Whether this future is what sends its transaction (sent on the caller's
    /// task) rather than an answer from the leader's worker.
    pub fn is_direct(&self) -> bool {
        matches!(self.0, Pending::Direct(_))
    }
}

enum Pending {
    Queued(oneshot::Receiver<Result<(), TpuError>>),
    Direct(Pin<Box<dyn Future<Output = Result<(), TpuError>> + Send>>),
}

impl Future for Delivery {
    type Output = Result<Result<(), TpuError>, oneshot::error::RecvError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            Pending::Queued(rx) => Pin::new(rx).poll(cx),
            Pending::Direct(f) => f.as_mut().poll(cx).map(Ok),
        }
    }
}

/// Answer to a submitted batch: one result per transaction, in order.
pub type BatchDelivery = oneshot::Receiver<Vec<Result<(), TpuError>>>;

enum Job {
    One {
        wire: Bytes,
        done: oneshot::Sender<Result<(), TpuError>>,
    },
    Batch {
        wires: Vec<Bytes>,
        done: oneshot::Sender<Vec<Result<(), TpuError>>>,
    },
}

impl Job {
    /// Streams it takes.
    fn streams(&self) -> usize {
        match self {
            Job::One { .. } => 1,
            Job::Batch { wires, .. } => wires.len(),
        }
    }

    /// Answers every transaction with `e()`.
    fn fail(self, e: impl Fn() -> TpuError) {
        match self {
            Job::One { done, .. } => {
                let _ = done.send(Err(e()));
            }
            Job::Batch { wires, done } => {
                let _ = done.send(wires.iter().map(|_| Err(e())).collect());
            }
        }
    }
}

struct Link {
    tx: mpsc::Sender<Job>,
    phase: Arc<PhaseSignal>,
    shared: Arc<Shared>,
    /// When it was last used, in [`TpuClient::uses`] (the order is all that
    /// counts; no clock read per transaction).
    last_used: u64,
    task: JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(l) = self.shared.live() {
            l.conn.close(0u32.into(), b"evicted");
        }
    }
}

/// What a leader's worker shares with the tasks that submit to it.
struct Shared {
    /// The live connection, set and cleared by the worker.
    live: Mutex<Option<Live>>,
    /// Streams in flight to the leader, the worker's and those sent on the
    /// callers' tasks together: `max_streams` permits.
    streams: Arc<Semaphore>,
    /// Set while the worker holds a job taken from the queue that waits for
    /// permits. While it does, or anything is in the queue, sends queue behind it,
    /// so that one caller's transactions keep their order (all but a job the
    /// worker is taking at that moment: it is not counted per job, which would
    /// bounce a shared counter between the cores for every transaction).
    holding: AtomicBool,
}

impl Shared {
    fn live(&self) -> Option<Live> {
        self.live.lock().ok()?.clone()
    }
}

/// The leaders' links.
/// A link per leader address and the identity its connections pin: an address
/// the schedule names with another identity (a validator moved, or stale
/// gossip) gets a link of its own, and the two never tear each other down.
type LinkKey = (SocketAddr, Option<[u8; 32]>);
type Links = HashMap<LinkKey, Link, foldhash::fast::RandomState>;

/// The TPU client: an endpoint and one worker per leader.
pub struct TpuClient {
    endpoint: quinn::Endpoint,
    identity: Arc<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    config: TpuConfig,
    /// By leader; looked up on every send (a fast hash: the keys are leaders'
    /// addresses from the leader source, not a client's input).
    links: Mutex<Links>,
    /// Uses of the links so far (their least-recently-used order).
    uses: AtomicU64,
    /// `max_handshakes_per_sec`, shared by every worker.
    handshakes: Arc<RateCap>,
    /// `max_handshakes_per_leader_per_min` per leader, kept beyond its link: a
    /// leader whose link was closed (least recently used) and opened again does not
    /// start with a fresh budget.
    leader_caps: Mutex<HashMap<SocketAddr, Arc<RateCap>>>,
    /// Counters.
    pub stats: Arc<TpuStats>,
}

impl TpuClient {
    /// Binds the endpoint; `identity` signs the client certificate. Must run inside
    /// a tokio runtime.
    pub fn new(config: TpuConfig, identity: &SigningKey) -> anyhow::Result<Arc<Self>> {
        config.validate()?;
        let identity = Arc::new(tls::identity_cert(identity)?);
        let endpoint = quinn::Endpoint::client(config.bind)
            .map_err(|e| anyhow::anyhow!("cannot bind the TPU endpoint on {}: {e}", config.bind))?;
        let handshakes = Arc::new(RateCap::new(
            config.max_handshakes_per_sec,
            Duration::from_secs(1),
        ));
        Ok(Arc::new(TpuClient {
            endpoint,
            identity,
            config,
            links: Mutex::new(Links::default()),
            uses: AtomicU64::new(0),
            handshakes,
            leader_caps: Mutex::new(HashMap::new()),
            stats: Arc::new(TpuStats::default()),
        }))
    }

    /// `addr`'s handshake budget (the same one its earlier links used). Caps that
    /// remember nothing and belong to no link (`links`) are forgotten.
    fn leader_cap(&self, addr: SocketAddr, links: &Links) -> Arc<RateCap> {
        let mut caps = self
            .leader_caps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if caps.len() >= 4 * self.config.max_leaders {
            caps.retain(|a, c| links.keys().any(|(x, _)| x == a) || !c.is_full());
        }
        caps.entry(addr)
            .or_insert_with(|| {
                Arc::new(RateCap::new(
                    self.config.max_handshakes_per_leader_per_min,
                    Duration::from_secs(60),
                ))
            })
            .clone()
    }

    /// Queues `wire` for `leader`; the receiver answers once the leader acknowledged
    /// it (or it failed). Refused at once when too large or the queue is full.
    pub fn submit(&self, leader: &Leader, wire: Bytes) -> Result<Delivery, TpuError> {
        if wire.len() > MAX_TX_BYTES {
            TpuStats::bump(&self.stats.too_large);
            return Err(TpuError::TooLarge(wire.len()));
        }
        let (done, rx) = oneshot::channel();
        self.queue(leader, Job::One { wire, done })?;
        Ok(Delivery(Pending::Queued(rx)))
    }

    /// Sends `wire` to `leader` on the caller's task when it can, else queues it as
    /// [`Self::submit`] does. On the caller's task (the leader's connection up,
    /// nothing queued to its worker, a stream free) there is no hand-over to the
    /// worker and back — two wake-ups of other tasks per transaction — but the
    /// returned future is what sends it: nothing goes, and no stream is taken,
    /// until it is polled; dropped before the transaction is written, it is not
    /// sent (once written it still goes, but is not counted). For callers that
    /// await the answer at once, as [`super::Sender::send`] does.
    pub fn send(&self, leader: &Leader, wire: Bytes) -> Result<Delivery, TpuError> {
        if wire.len() > MAX_TX_BYTES {
            TpuStats::bump(&self.stats.too_large);
            return Err(TpuError::TooLarge(wire.len()));
        }
        match self.direct(leader, &wire) {
            Some(d) => Ok(d),
            None => self.submit(leader, wire),
        }
    }

    fn direct(&self, leader: &Leader, wire: &Bytes) -> Option<Delivery> {
        let shared = {
            let mut links = self.links.lock().ok()?;
            let l = links.get_mut(&(leader.tpu_quic, leader.identity))?;
            if l.tx.capacity() < l.tx.max_capacity()
                || l.shared.holding.load(Ordering::Acquire)
                || l.task.is_finished()
            {
                return None;
            }
            l.last_used = self.uses.fetch_add(1, Ordering::Relaxed);
            l.shared.clone()
        };
        // A connection closed but not yet noticed by the worker is left to it: it
        // reconnects and sends (one read of the connection's state per send).
        let live = shared.live()?;
        if live.marks.closed().is_some()
            || live.conn.close_reason().is_some()
            || shared.streams.available_permits() == 0
        {
            return None;
        }
        let sending = Sending {
            conn: live.conn,
            stats: self.stats.clone(),
            addr: leader.tpu_quic,
            marks: live.marks,
            direct: true,
        };
        let wire = wire.clone();
        Some(Delivery(Pending::Direct(Box::pin(async move {
            // The permit is taken when polled (an unpolled delivery holds none);
            // if another took the last one meanwhile, this waits its turn with the
            // worker's jobs.
            let permit = match shared.streams.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => match shared.streams.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return Err(TpuError::Stopped),
                },
            };
            let r = sending.one(&wire).await;
            drop(permit);
            r
        }))))
    }

    /// Queues `wires` for `leader` as one job: each on its own stream, in order,
    /// opened one after another by one future; one answer for all
    /// (a result per transaction) once the leader acknowledged them or they failed.
    /// Cheaper per transaction than [`Self::submit`] (one job, one answer, one
    /// future). Refused whole when a transaction is too large, the batch exceeds
    /// `max_streams`, or the queue is full. An empty batch is answered at once.
    pub fn submit_batch(
        &self,
        leader: &Leader,
        wires: Vec<Bytes>,
    ) -> Result<BatchDelivery, TpuError> {
        if let Some(w) = wires.iter().find(|w| w.len() > MAX_TX_BYTES) {
            TpuStats::add(&self.stats.too_large, wires.len());
            return Err(TpuError::TooLarge(w.len()));
        }
        if wires.is_empty() {
            let (done, rx) = oneshot::channel();
            let _ = done.send(Vec::new());
            return Ok(rx);
        }
        if wires.len() > self.config.max_streams {
            TpuStats::add(&self.stats.batch_too_large, wires.len());
            return Err(TpuError::BatchTooLarge(
                wires.len(),
                self.config.max_streams,
            ));
        }
        let (done, rx) = oneshot::channel();
        self.queue(leader, Job::Batch { wires, done })?;
        Ok(rx)
    }

    /// Queues `job` under the links lock (try_send never waits): no Sender clone
    /// per transaction.
    fn queue(&self, leader: &Leader, job: Job) -> Result<(), TpuError> {
        let n = job.streams();
        let sent = self.with_link(leader, |l| l.tx.try_send(job))?;
        match sent {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                TpuStats::add(&self.stats.dropped_full, n);
                Err(TpuError::QueueFull(leader.tpu_quic))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(TpuError::Stopped),
        }
    }

    /// Starts connecting to upcoming leaders before there is anything to send.
    pub fn prewarm(&self, leaders: &[Leader]) {
        for l in leaders {
            let _ = self.with_link(l, |_| ());
        }
    }

    /// Marks `leader`'s connections (of every identity it is linked under) as in
    /// (or out of) its preferred phase: their congestion window is boosted while in.
    pub fn set_phase(&self, leader: SocketAddr, boosted: bool) {
        if let Ok(links) = self.links.lock() {
            for ((a, _), l) in links.iter() {
                if *a == leader {
                    l.phase.set(boosted);
                }
            }
        }
    }

    /// A live connection to `leader`, if any (statistics, tests).
    pub fn connection(&self, leader: SocketAddr) -> Option<quinn::Connection> {
        let links = self.links.lock().ok()?;
        links
            .iter()
            .filter(|((a, _), _)| *a == leader)
            .filter_map(|(_, l)| l.shared.live())
            .map(|live| live.conn)
            .find(|c| c.close_reason().is_none())
    }

    /// Leaders with a worker now.
    pub fn leaders(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = self
            .links
            .lock()
            .map(|l| l.keys().map(|(a, _)| *a).collect())
            .unwrap_or_default();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Closes every connection.
    pub fn close(&self) {
        if let Ok(mut links) = self.links.lock() {
            links.clear();
        }
        self.endpoint.close(0u32.into(), b"shutdown");
    }

    /// Runs `f` on the leader's queue, starting its worker first if needed.
    fn with_link<R>(&self, leader: &Leader, f: impl FnOnce(&Link) -> R) -> Result<R, TpuError> {
        let mut links = self.links.lock().map_err(|_| TpuError::Stopped)?;
        let key = (leader.tpu_quic, leader.identity);
        if let Some(l) = links.get_mut(&key) {
            if !l.task.is_finished() {
                l.last_used = self.uses.fetch_add(1, Ordering::Relaxed);
                return Ok(f(l));
            }
            // Its worker ended: replaced.
            links.remove(&key);
        }
        if links.len() >= self.config.max_leaders {
            let oldest = links
                .iter()
                .min_by_key(|(_, l)| l.last_used)
                .map(|(a, _)| *a);
            if let Some(a) = oldest {
                links.remove(&a);
            }
        }
        let (tx, rx) = mpsc::channel(self.config.queue_per_leader);
        let phase = PhaseSignal::new();
        let shared = Arc::new(Shared {
            live: Mutex::new(None),
            streams: Arc::new(Semaphore::new(self.config.max_streams)),
            holding: AtomicBool::new(false),
        });
        let worker = Worker {
            endpoint: self.endpoint.clone(),
            leader: *leader,
            client: self.client_config(leader, phase.clone()),
            config: self.config.clone(),
            stats: self.stats.clone(),
            shared: shared.clone(),
            global_cap: self.handshakes.clone(),
            leader_cap: self.leader_cap(leader.tpu_quic, &links),
        };
        let link = Link {
            tx,
            phase,
            shared,
            last_used: self.uses.fetch_add(1, Ordering::Relaxed),
            task: tokio::spawn(worker.run(rx)),
        };
        let r = f(&link);
        links.insert(key, link);
        Ok(r)
    }

    fn client_config(
        &self,
        leader: &Leader,
        phase: Arc<PhaseSignal>,
    ) -> Result<quinn::ClientConfig, String> {
        let crypto =
            tls::client_crypto(&self.identity, leader.identity).map_err(|e| e.to_string())?;
        let quic = QuicClientConfig::try_from(crypto).map_err(|e| e.to_string())?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
        let idle = Duration::from_millis(self.config.idle_timeout_ms);
        let mut t = quinn::TransportConfig::default();
        t.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok())
            .keep_alive_interval(Some(idle / 3))
            // A transaction is of use to the leader only whole: a stream is sent to
            // its end before the next begins (no round-robin between streams), so
            // each one's last byte arrives sooner — as Agave's own clients do.
            .send_fairness(false)
            // The leader never opens streams towards us, nor are its datagrams
            // read (quinn's default would park up to 1.25 MB of them).
            .max_concurrent_bidi_streams(0u32.into())
            .max_concurrent_uni_streams(0u32.into())
            .datagram_receive_buffer_size(None)
            .congestion_controller_factory(PhaseBoostFactory::new(
                self.config.congestion.clone(),
                phase,
            ));
        cfg.transport_config(Arc::new(t));
        Ok(cfg)
    }
}

impl Drop for TpuClient {
    fn drop(&mut self) {
        self.close();
    }
}

struct Worker {
    endpoint: quinn::Endpoint,
    leader: Leader,
    client: Result<quinn::ClientConfig, String>,
    config: TpuConfig,
    stats: Arc<TpuStats>,
    shared: Arc<Shared>,
    global_cap: Arc<RateCap>,
    leader_cap: Arc<RateCap>,
}

/// The worker's connection.
#[derive(Clone)]
struct Live {
    conn: quinn::Connection,
    marks: Arc<Marks>,
}

/// What the worker and the streams of one connection learn about it, without
/// taking the connection's lock (which its driver holds while it reads packets)
/// for every acknowledged stream.
struct Marks {
    /// When the handshake completed.
    since: Instant,
    /// Set once a stream on it was acknowledged.
    carried: std::sync::atomic::AtomicBool,
    /// Set once the connection outlived a refusal's window (two round trips,
    /// at least 10 ms): its round-trip time need not be read again.
    settled: std::sync::atomic::AtomicBool,
    /// 0 while open; then 1 + its [`CLOSE_REASONS`] index, with
    /// [`Marks::REFUSAL`] set for a refusal code. Set by the worker as it sees the
    /// close, before it polls the streams again (see [`Worker::run`]); the first
    /// one set stays.
    closed: std::sync::atomic::AtomicU8,
    /// Streams acknowledged (the stall watch's progress), on a line of its own:
    /// every acknowledgement writes it, every send reads the fields above.
    acked: Padded,
}

/// An atomic counter alone on its cache line.
#[repr(align(64))]
#[derive(Default)]
struct Padded(AtomicU64);

impl Marks {
    const REFUSAL: u8 = 0x80;

    fn new() -> Marks {
        Marks {
            since: Instant::now(),
            carried: std::sync::atomic::AtomicBool::new(false),
            settled: std::sync::atomic::AtomicBool::new(false),
            closed: std::sync::atomic::AtomicU8::new(0),
            acked: Padded::default(),
        }
    }

    fn set_closed(&self, e: &quinn::ConnectionError) {
        let (i, refusal) = close_reason(e);
        self.mark_closed(i, refusal);
    }

    /// Marks the close as `CLOSE_REASONS[i]` unless one is marked already (a
    /// stall this side closed for stays a stall, not `local`).
    fn mark_closed(&self, i: usize, refusal: bool) {
        let v = (i as u8 + 1) | if refusal { Marks::REFUSAL } else { 0 };
        let _ = self
            .closed
            .compare_exchange(0, v, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The close seen so far: its [`CLOSE_REASONS`] index and whether it is a refusal.
    fn closed(&self) -> Option<(usize, bool)> {
        match self.closed.load(Ordering::Acquire) {
            0 => None,
            v => Some((
                usize::from((v & !Marks::REFUSAL) - 1),
                v & Marks::REFUSAL != 0,
            )),
        }
    }
}

/// The stall watch of one worker: the connection it looked at last (its marks,
/// held: a new connection's can never be taken for it), its acknowledged
/// streams then, and since when that count has not moved while streams waited.
#[derive(Default)]
struct StallWatch {
    seen: Option<(Arc<Marks>, u64, Instant)>,
}

impl StallWatch {
    /// A look at the connection `marks` are of at `now` (`busy`: streams in
    /// flight or waiting for credit): true when no stream was acknowledged on it
    /// for `stall` while busy.
    fn stalled(&mut self, marks: &Arc<Marks>, busy: bool, stall: Duration, now: Instant) -> bool {
        let acked = marks.acked.0.load(Ordering::Relaxed);
        match &self.seen {
            _ if !busy => self.seen = None,
            Some((c, n, since)) if Arc::ptr_eq(c, marks) && *n == acked => {
                if now.saturating_duration_since(*since) >= stall {
                    self.seen = None;
                    return true;
                }
            }
            _ => self.seen = Some((marks.clone(), acked, now)),
        }
        false
    }
}

/// What a worker knows between events.
struct State {
    /// Backoff after failed handshakes.
    unreachable: Backoff,
    /// Backoff after refused connections.
    refused: Backoff,
    /// No attempt before this.
    retry_at: Instant,
    /// The leader refused us: no attempt until there is something to send.
    dormant: bool,
    last_err: String,
    live: Option<Live>,
}

type Closed = Pin<Box<dyn Future<Output = ()> + Send>>;
type PermitWait =
    Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, tokio::sync::AcquireError>> + Send>>;

impl Worker {
    async fn run(self, mut rx: mpsc::Receiver<Job>) {
        let addr = self.leader.tpu_quic;
        let c = &self.config;
        let mut st = State {
            unreachable: Backoff::new(c.backoff_min_ms, c.backoff_max_ms),
            refused: Backoff::new(c.refused_backoff_min_ms, c.refused_backoff_max_ms),
            retry_at: Instant::now(),
            dormant: false,
            last_err: String::from("not connected yet"),
            live: None,
        };
        // Jobs in flight, driven by this task (no task per transaction); each holds
        // the permits of its streams until it is answered.
        let mut inflight = FuturesUnordered::new();
        // A job taken from the queue that waits for permits (the queue is not read
        // while one waits; permits released meanwhile go to it first), and its wait.
        let mut held: Option<(Job, PermitWait)> = None;
        // Resolves when the current connection dies (made once per connection).
        let mut closed: Option<Closed> = None;
        let backoff_timer = tokio::time::sleep_until(st.retry_at.into());
        tokio::pin!(backoff_timer);
        // The stall watch looks four times per `stall_timeout_ms` while connected.
        let stall = Duration::from_millis(c.stall_timeout_ms);
        let mut stall_tick = tokio::time::interval(stall / 4);
        stall_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watch = StallWatch::default();
        enum Next {
            Job(Option<Job>),
            /// The held job's permits (`None`: the semaphore closed).
            Permits(Option<OwnedSemaphorePermit>),
            Closed,
            Progress,
            Watch,
        }
        loop {
            if self.notice_loss(&mut st) {
                closed = None;
                backoff_timer.as_mut().reset(st.retry_at.into());
            }
            if st.live.is_none() && !st.dormant && Instant::now() >= st.retry_at {
                closed = self.connect_now(&mut st).await;
                backoff_timer.as_mut().reset(st.retry_at.into());
            }
            let waiting = st.live.is_none() && !st.dormant;
            let next = tokio::select! {
                biased;
                // A dead connection is noticed at once, not on the next job, and
                // before the streams are polled again: a close the worker was woken
                // for is marked when they look (`confirm`). One that arrives while
                // this task is being polled is marked on its next poll — as a close
                // arriving just after an acknowledgement always could be.
                _ = async {
                    match closed.as_mut() {
                        Some(f) => f.await,
                        None => std::future::pending().await,
                    }
                }, if closed.is_some() => Next::Closed,
                Some(()) = inflight.next(), if !inflight.is_empty() => Next::Progress,
                p = async {
                    match held.as_mut() {
                        Some((_, wait)) => wait.await.ok(),
                        None => std::future::pending().await,
                    }
                }, if held.is_some() => Next::Permits(p),
                j = rx.recv(), if held.is_none() => Next::Job(j),
                // Backing off: reconnect when it ends even with nothing to send
                // (not while the leader refuses us: then only for work).
                _ = &mut backoff_timer, if waiting => Next::Progress,
                _ = stall_tick.tick(), if st.live.is_some() => Next::Watch,
            };
            let (job, permits) = match next {
                Next::Progress => continue,
                Next::Watch => {
                    if let Some(l) = &st.live {
                        let busy = self.shared.streams.available_permits() < c.max_streams;
                        if watch.stalled(&l.marks, busy, stall, Instant::now()) {
                            // Its sends fail (`Sending::count` names the stall)
                            // and the hedge goes; `notice_loss` backs off.
                            l.marks.mark_closed(STALLED, true);
                            l.conn.close(0u32.into(), b"stalled");
                        }
                    }
                    continue;
                }
                Next::Closed => {
                    closed = None;
                    continue;
                }
                Next::Permits(p) => {
                    self.shared.holding.store(false, Ordering::Release);
                    let Some((job, _)) = held.take() else {
                        continue;
                    };
                    match p {
                        Some(p) => (job, Some(p)),
                        None => {
                            job.fail(|| TpuError::Stopped);
                            continue;
                        }
                    }
                }
                Next::Job(Some(job)) => (job, None),
                Next::Job(None) => break,
            };
            if self.notice_loss(&mut st) {
                closed = None;
            }
            if st.live.is_none() && Instant::now() >= st.retry_at {
                // Something to send: a refusing leader is tried again (its backoff
                // has run out).
                st.dormant = false;
                closed = self.connect_now(&mut st).await;
            }
            backoff_timer.as_mut().reset(st.retry_at.into());
            match &st.live {
                Some(l) => {
                    let link = || Sending {
                        conn: l.conn.clone(),
                        stats: self.stats.clone(),
                        addr,
                        marks: l.marks.clone(),
                        direct: false,
                    };
                    // Take what else is queued in one go (fewer trips through select);
                    // a job whose streams are not free waits for them.
                    let mut next = Some((job, permits));
                    while let Some((job, permits)) = next.take() {
                        let n = u32::try_from(job.streams()).unwrap_or(u32::MAX);
                        let got = match permits {
                            Some(p) => Ok(p),
                            None => self.shared.streams.clone().try_acquire_many_owned(n),
                        };
                        let got = match got {
                            Ok(p) => Some(p),
                            Err(_) => {
                                // Polled once here, so that it queues for permits at
                                // once: released ones go to it before any send on a
                                // caller's task takes them.
                                let mut wait: PermitWait =
                                    Box::pin(self.shared.streams.clone().acquire_many_owned(n));
                                let mut cx = Context::from_waker(Waker::noop());
                                match wait.as_mut().poll(&mut cx) {
                                    Poll::Ready(Ok(p)) => Some(p),
                                    Poll::Ready(Err(_)) => {
                                        job.fail(|| TpuError::Stopped);
                                        break;
                                    }
                                    Poll::Pending => {
                                        self.shared.holding.store(true, Ordering::Release);
                                        held = Some((job, wait));
                                        break;
                                    }
                                }
                            }
                        };
                        if let Some(p) = got {
                            inflight.push(link().job(job, p));
                        }
                        next = rx.try_recv().ok().map(|j| (j, None));
                    }
                }
                // Not connected: fail at once so the hedge can go.
                None => {
                    TpuStats::add(&self.stats.unreachable, job.streams());
                    job.fail(|| TpuError::Unreachable(addr, st.last_err.clone()));
                }
            }
        }
        // Drain what is in flight, still marking a close (a refusal counts to the end).
        loop {
            tokio::select! {
                biased;
                _ = async {
                    match closed.as_mut() {
                        Some(f) => f.await,
                        None => std::future::pending().await,
                    }
                }, if closed.is_some() => closed = None,
                n = inflight.next() => {
                    if n.is_none() {
                        break;
                    }
                }
            }
        }
    }

    /// If the connection died: counts the reason and schedules the next attempt
    /// (at once after a stable connection, after the refused backoff otherwise).
    /// True when it died.
    fn notice_loss(&self, st: &mut State) -> bool {
        // The close watch marks it (no lock on the connection per event).
        let Some((i, refusal)) = st.live.as_ref().and_then(|l| l.marks.closed()) else {
            return false;
        };
        let Some(live) = st.live.take() else {
            return false;
        };
        self.publish(None);
        let reason = match live.conn.close_reason() {
            _ if i == STALLED => format!(
                "stalled: no stream acknowledged within {} ms",
                self.config.stall_timeout_ms
            ),
            Some(r) => r.to_string(),
            None => CLOSE_REASONS[i].to_owned(),
        };
        TpuStats::bump(&self.stats.closes[i]);
        let stable = live.marks.carried.load(Ordering::Relaxed)
            || live.marks.since.elapsed() >= Duration::from_millis(self.config.stable_after_ms);
        // A stable connection the leader dropped (Agave's code 1: an established
        // entry evicted to make room under load) starts the backoff over: each
        // such drop of a working connection doubled the wait until the leader
        // was out of reach for a minute. The next attempt still waits the first
        // step. A stall, and the other refusal codes, escalate as before.
        let dropped = i == 0;
        if stable && (!refusal || dropped) {
            st.unreachable.reset();
            st.refused.reset();
        }
        if stable && !refusal {
            st.retry_at = Instant::now();
        } else {
            st.retry_at = Instant::now() + st.refused.next_delay();
            st.dormant = true;
        }
        st.last_err = format!("connection lost: {reason}");
        true
    }

    /// One handshake, if the rate caps allow it; on success the new connection's
    /// close watch.
    async fn connect_now(&self, st: &mut State) -> Option<Closed> {
        let capped = self.leader_cap.take().and_then(|()| {
            self.global_cap.take().inspect_err(|_| {
                // No handshake after all: the leader's token goes back.
                self.leader_cap.refund();
            })
        });
        if let Err(wait) = capped {
            TpuStats::bump(&self.stats.handshakes_capped);
            st.retry_at = Instant::now() + wait;
            st.last_err = "handshake rate cap reached".into();
            return None;
        }
        match self.connect().await {
            Ok(c) => {
                TpuStats::bump(&self.stats.connects);
                st.unreachable.reset();
                let watch = c.clone();
                let marks = Arc::new(Marks::new());
                let live = Live {
                    conn: c,
                    marks: marks.clone(),
                };
                self.publish(Some(live.clone()));
                st.live = Some(live);
                Some(Box::pin(async move {
                    let e = watch.closed().await;
                    marks.set_closed(&e);
                }))
            }
            Err((e, refused)) => {
                TpuStats::bump(&self.stats.connect_failures);
                st.last_err = e;
                if refused {
                    // Refused at the handshake (a full connection table, an
                    // identity that is not the one pinned): backed off as a
                    // refusing leader, and not tried again until there is
                    // something to send.
                    TpuStats::bump(&self.stats.handshakes_refused);
                    st.retry_at = Instant::now() + st.refused.next_delay();
                    st.dormant = true;
                } else {
                    st.retry_at = Instant::now() + st.unreachable.next_delay();
                }
                None
            }
        }
    }

    fn publish(&self, l: Option<Live>) {
        if let Ok(mut slot) = self.shared.live.lock() {
            *slot = l;
        }
    }

    /// A connection, or why not and whether the leader refused it (rather
    /// than not answering).
    async fn connect(&self) -> Result<quinn::Connection, (String, bool)> {
        let cfg = self.client.clone().map_err(|e| (e, false))?;
        let connecting = self
            .endpoint
            .connect_with(cfg, self.leader.tpu_quic, "connect")
            .map_err(|e| (e.to_string(), false))?;
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err((format!("handshake failed: {e}"), handshake_refused(&e))),
            Err(_) => Err((format!("no handshake within {timeout:?}"), false)),
        }
    }
}

/// What sending a job on the worker's connection needs.
struct Sending {
    conn: quinn::Connection,
    stats: Arc<TpuStats>,
    addr: SocketAddr,
    marks: Arc<Marks>,
    /// Sent on the caller's task, not by the worker (which marks a close before it
    /// polls its streams again; a caller's task does not know of it).
    direct: bool,
}

impl Sending {
    /// One transaction on its own stream, counted; done once acknowledged.
    async fn one(&self, wire: &[u8]) -> Result<(), TpuError> {
        let r = match write_one(&self.conn, wire).await {
            Ok(s) => confirm(&self.conn, s, &self.marks, self.direct).await,
            Err(e) => Err(e),
        };
        self.count(r)
    }

    /// Sends `job` and answers it, holding its streams' permits until then.
    async fn job(self, job: Job, permits: OwnedSemaphorePermit) {
        match job {
            Job::One { wire, done } => {
                let r = self.one(&wire).await;
                drop(permits);
                let _ = done.send(r);
            }
            Job::Batch { wires, done } => {
                // Every stream written before any acknowledgement is awaited: the
                // batch is in flight at once, driven by this one future.
                let mut sent = Vec::with_capacity(wires.len());
                for w in &wires {
                    sent.push(write_one(&self.conn, w).await);
                }
                let mut out = Vec::with_capacity(wires.len());
                for s in sent {
                    let r = match s {
                        Ok(s) => confirm(&self.conn, s, &self.marks, false).await,
                        Err(e) => Err(e),
                    };
                    out.push(self.count(r));
                }
                drop(permits);
                let _ = done.send(out);
            }
        }
    }

    fn count(&self, r: Result<(), StreamFailure>) -> Result<(), TpuError> {
        match r {
            Ok(()) => {
                TpuStats::bump(&self.stats.delivered);
                self.marks.acked.0.fetch_add(1, Ordering::Relaxed);
                // Read first: once set, the line is only read (every stream's
                // send reads `closed` and `settled` beside it).
                if !self.marks.carried.load(Ordering::Relaxed) {
                    self.marks.carried.store(true, Ordering::Relaxed);
                }
                Ok(())
            }
            Err(StreamFailure { why, read }) => {
                TpuStats::bump(&self.stats.failed);
                // Closed by the stall watch: say so, not quinn's "closed".
                let why = match self.marks.closed() {
                    Some((STALLED, _)) => {
                        format!("the connection stalled (no stream acknowledged in time): {why}")
                    }
                    _ => why,
                };
                Err(if read {
                    TpuError::Stream(self.addr, why)
                } else {
                    TpuError::Unread(self.addr, why)
                })
            }
        }
    }
}

/// Why a stream failed, and whether the leader may have read it.
#[derive(Debug)]
struct StreamFailure {
    why: String,
    read: bool,
}

impl StreamFailure {
    /// A failure once bytes went: the leader may have them.
    fn maybe_read(why: impl ToString) -> StreamFailure {
        StreamFailure {
            why: why.to_string(),
            read: true,
        }
    }
}

/// One transaction written on its own unidirectional stream, finished.
async fn write_one(
    conn: &quinn::Connection,
    wire: &[u8],
) -> Result<quinn::SendStream, StreamFailure> {
    let mut s = conn.open_uni().await.map_err(|e| StreamFailure {
        why: e.to_string(),
        read: false,
    })?;
    // Not written to its end: no leader takes a transaction from an unfinished
    // stream.
    let unfinished = |e: &dyn std::fmt::Display| StreamFailure {
        why: e.to_string(),
        read: false,
    };
    s.write_all(wire).await.map_err(|e| unfinished(&e))?;
    s.finish().map_err(|e| unfinished(&e))?;
    Ok(s)
}

/// Done when the peer acknowledged every byte of stream `s` and, on a connection
/// younger than two round trips (`marks.since`), the connection is still open two
/// round trips after it was made; on an older one, when it has not been closed
/// with a refusal code. `direct`: polled on a caller's task, not the worker's.
async fn confirm(
    conn: &quinn::Connection,
    s: quinn::SendStream,
    marks: &Marks,
    direct: bool,
) -> Result<(), StreamFailure> {
    match s.stopped().await {
        Ok(None) => {}
        Ok(Some(code)) => {
            return Err(StreamFailure::maybe_read(format!(
                "leader stopped the stream (code {code})"
            )))
        }
        // Closed before every byte was acknowledged: read unless Agave refused
        // the connection before admitting it.
        Err(e) => {
            let read = !matches!(&e, quinn::StoppedError::ConnectionLost(c) if refused_before_admission(c));
            return Err(StreamFailure {
                why: e.to_string(),
                read,
            });
        }
    }
    // Agave closes a connection its budget does not allow right after the
    // handshake; its QUIC stack has ACKed what arrived with the handshake by then,
    // but its server never read it. A refusal arrives within a round trip of the
    // handshake, so on a fresh connection the ACK counts only once the connection
    // outlived that. Otherwise a failure, and the hedge goes (a transaction sent
    // twice lands once: Solana deduplicates by signature).
    let closed = |i: usize| {
        format!(
            "the connection closed ({}) as the stream was acknowledged",
            CLOSE_REASONS[i]
        )
    };
    if !marks.settled.load(Ordering::Relaxed) {
        let settled = marks.since + (conn.rtt() * 2).max(Duration::from_millis(10));
        if Instant::now() < settled {
            // On a fresh connection any close counts (read from the connection
            // itself: fresh connections are few).
            tokio::time::sleep_until(settled.into()).await;
            return match conn.close_reason() {
                // Refused as Agave refuses a connection: what came with the
                // handshake was not read. Any other close: it may have been.
                Some(r) => Err(StreamFailure {
                    why: closed(close_reason(&r).0),
                    read: !refused_before_admission(&r),
                }),
                None => Ok(()),
            };
        }
        marks.settled.store(true, Ordering::Relaxed);
    }
    // Later a refusal code still counts, as the worker has marked it (it marks a
    // close it was woken for before it polls the streams again; best effort, like
    // any check of a close that may arrive a moment after the acknowledgement). A
    // caller's task may run before the worker has seen a close that came with the
    // acknowledgement: it reads the connection itself (one take of its lock).
    if direct && marks.closed().is_none() {
        if let Some(r) = conn.close_reason() {
            marks.set_closed(&r);
        }
    }
    match marks.closed() {
        // Codes 1..=5 are the first five reasons (`close_reason`).
        Some((i, true)) => Err(StreamFailure {
            why: closed(i),
            read: !ADMISSION_REFUSALS.contains(&(i as u64 + 1)),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handshake deadline of 0 (every handshake timed out at its first
    /// packet, and tried again at the cap's rate) and an idle timeout QUIC
    /// cannot hold (quinn turned it off) are refused.
    #[test]
    fn timeouts_are_bounded() {
        assert!(TpuConfig::default().validate().is_ok());
        let with = |f: fn(&mut TpuConfig)| {
            let mut c = TpuConfig::default();
            f(&mut c);
            c.validate().map_err(|e| e.to_string())
        };
        let e = with(|c| c.connect_timeout_ms = 0).unwrap_err();
        assert!(e.starts_with("sender.tpu.connect_timeout_ms"), "{e}");
        let e = with(|c| c.idle_timeout_ms = 1 << 62).unwrap_err();
        assert!(e.starts_with("sender.tpu.idle_timeout_ms"), "{e}");
        assert!(with(|c| c.idle_timeout_ms = 3_600_000).is_ok());
    }

    #[test]
    fn a_connection_is_stalled_when_no_stream_is_acknowledged_while_busy() {
        let (stall, t0) = (Duration::from_millis(100), Instant::now());
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let (a, b) = (Arc::new(Marks::new()), Arc::new(Marks::new()));
        let mut w = StallWatch::default();
        assert!(!w.stalled(&a, true, stall, at(0)), "first look");
        assert!(!w.stalled(&a, true, stall, at(99)));
        assert!(
            w.stalled(&a, true, stall, at(100)),
            "busy, nothing acknowledged"
        );
        // Progress restarts the wait; so does an idle look, or another connection.
        assert!(!w.stalled(&a, true, stall, at(100)));
        a.acked.0.fetch_add(1, Ordering::Relaxed);
        assert!(!w.stalled(&a, true, stall, at(150)), "acknowledged since");
        assert!(!w.stalled(&a, true, stall, at(249)));
        assert!(!w.stalled(&a, false, stall, at(260)), "idle");
        assert!(!w.stalled(&a, true, stall, at(270)));
        assert!(!w.stalled(&b, true, stall, at(371)), "a new connection");
        assert!(!w.stalled(&b, true, stall, at(470)));
        assert!(w.stalled(&b, true, stall, at(471)));
        // A stall this side marked stays the reason over the close it causes.
        b.mark_closed(STALLED, true);
        b.set_closed(&quinn::ConnectionError::LocallyClosed);
        assert_eq!(b.closed(), Some((STALLED, true)));
    }

    #[test]
    fn backoff_doubles_with_upward_jitter_and_resets() {
        let mut b = Backoff::new(1000, 8000);
        let steps: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        for (d, step) in steps.iter().zip([1000u64, 2000, 4000, 8000, 8000, 8000]) {
            let step = Duration::from_millis(step);
            assert!(
                *d >= step && *d <= step.mul_f64(1.5),
                "{d:?} for step {step:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(1500));
    }

    #[test]
    fn the_rate_cap_allows_its_burst_then_says_how_long_to_wait() {
        let cap = RateCap::new(8, Duration::from_secs(60));
        for _ in 0..8 {
            assert!(cap.take().is_ok());
        }
        let wait = cap.take().unwrap_err();
        assert!(
            wait <= Duration::from_millis(7500) && wait >= Duration::from_millis(7000),
            "{wait:?}"
        );
    }

    #[test]
    fn agaves_refusal_codes_are_refusals_and_named() {
        use quinn::{ApplicationClose, ConnectionError, VarInt};
        let app = |code: u32| {
            ConnectionError::ApplicationClosed(ApplicationClose {
                error_code: VarInt::from_u32(code),
                reason: Bytes::new(),
            })
        };
        let named = |e: &ConnectionError| {
            let (i, refusal) = close_reason(e);
            (CLOSE_REASONS[i], refusal)
        };
        assert_eq!(named(&app(1)), ("dropped", true));
        assert_eq!(named(&app(2)), ("disallowed", true));
        assert_eq!(named(&app(3)), ("exceed_max_stream_count", false));
        assert_eq!(named(&app(4)), ("too_many", true));
        assert_eq!(named(&app(5)), ("invalid_stream", false));
        assert_eq!(named(&app(0)), ("application_other", false));
        assert_eq!(named(&ConnectionError::TimedOut), ("timed_out", false));
        assert_eq!(named(&ConnectionError::LocallyClosed), ("local", false));
        // The worker's marks carry the same answer to the streams.
        for e in [
            app(1),
            app(2),
            app(3),
            app(4),
            app(0),
            ConnectionError::Reset,
        ] {
            let m = Marks::new();
            assert_eq!(m.closed(), None);
            m.set_closed(&e);
            assert_eq!(m.closed(), Some(close_reason(&e)), "{e}");
        }
    }
}
