//! The TPU route: QUIC straight to the leaders (Solana's TPU protocol).
//!
//! One connection per leader, owned by that leader's worker task; the worker
//! connects as soon as the leader is known (pre-warm), reconnects with exponential
//! backoff, and sends each transaction on its own unidirectional stream. Work reaches
//! a worker through a bounded queue: when it is full the transaction is dropped and
//! counted, never buffered without bound. A transaction counts as delivered when the
//! leader has acknowledged every byte of its stream (QUIC ACK of the FIN); the TPU
//! protocol has no other answer.

use crate::config::OutOfBounds;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use futures_util::stream::{FuturesUnordered, StreamExt};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::cc::{CongestionConfig, PhaseBoostFactory, PhaseSignal};
use super::tls;

pub use gw_core::txwire::MAX_TX_BYTES;
/// Concurrent streams a validator grants an unstaked client.
pub const UNSTAKED_STREAMS: usize = 128;

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
    /// Streams in flight per connection (the validator's limit for unstaked peers is 128).
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
    /// Idle timeout of a connection, milliseconds (keep-alives every third of it).
    #[serde(default = "default_idle")]
    pub idle_timeout_ms: u64,
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
fn default_idle() -> u64 {
    10_000
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
        if self.idle_timeout_ms < 100 {
            return Err(OutOfBounds::new(
                "sender.tpu.idle_timeout_ms",
                "must be at least 100",
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
    /// The connection or stream failed while sending.
    #[error("send to leader {0} failed: {1}")]
    Stream(SocketAddr, String),
    /// The client was shut down.
    #[error("TPU client stopped")]
    Stopped,
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
    /// Handshakes completed.
    pub connects: AtomicU64,
    /// Handshakes failed.
    pub connect_failures: AtomicU64,
}

impl TpuStats {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Answer to one submitted transaction.
pub type Delivery = oneshot::Receiver<Result<(), TpuError>>;

struct Job {
    wire: Bytes,
    done: oneshot::Sender<Result<(), TpuError>>,
}

struct Link {
    tx: mpsc::Sender<Job>,
    phase: Arc<PhaseSignal>,
    conn: Arc<Mutex<Option<quinn::Connection>>>,
    last_used: Instant,
    task: JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
        if let Ok(c) = self.conn.lock() {
            if let Some(c) = c.as_ref() {
                c.close(0u32.into(), b"evicted");
            }
        }
    }
}

/// The TPU client: an endpoint and one worker per leader.
pub struct TpuClient {
    endpoint: quinn::Endpoint,
    identity: Arc<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    config: TpuConfig,
    links: Mutex<HashMap<SocketAddr, Link>>,
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
        Ok(Arc::new(TpuClient {
            endpoint,
            identity,
            config,
            links: Mutex::new(HashMap::new()),
            stats: Arc::new(TpuStats::default()),
        }))
    }

    /// Queues `wire` for `leader`; the receiver answers once the leader acknowledged
    /// it (or it failed). Refused at once when too large or the queue is full.
    pub fn submit(&self, leader: &Leader, wire: Bytes) -> Result<Delivery, TpuError> {
        if wire.len() > MAX_TX_BYTES {
            TpuStats::bump(&self.stats.too_large);
            return Err(TpuError::TooLarge(wire.len()));
        }
        let (done, rx) = oneshot::channel();
        // Queued under the links lock (try_send never waits): no Sender clone per
        // transaction.
        match self.with_link(leader, |tx| tx.try_send(Job { wire, done }))? {
            Ok(()) => Ok(rx),
            Err(mpsc::error::TrySendError::Full(_)) => {
                TpuStats::bump(&self.stats.dropped_full);
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

    /// Marks `leader`'s connection as in (or out of) its preferred phase: its
    /// congestion window is boosted while in.
    pub fn set_phase(&self, leader: SocketAddr, boosted: bool) {
        if let Ok(links) = self.links.lock() {
            if let Some(l) = links.get(&leader) {
                l.phase.set(boosted);
            }
        }
    }

    /// The live connection to `leader`, if any (statistics, tests).
    pub fn connection(&self, leader: SocketAddr) -> Option<quinn::Connection> {
        let links = self.links.lock().ok()?;
        let conn = links.get(&leader)?.conn.lock().ok()?.clone();
        conn.filter(|c| c.close_reason().is_none())
    }

    /// Leaders with a worker now.
    pub fn leaders(&self) -> Vec<SocketAddr> {
        self.links
            .lock()
            .map(|l| l.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Closes every connection.
    pub fn close(&self) {
        if let Ok(mut links) = self.links.lock() {
            links.clear();
        }
        self.endpoint.close(0u32.into(), b"shutdown");
    }

    /// Runs `f` on the leader's queue, starting its worker first if needed.
    fn with_link<R>(
        &self,
        leader: &Leader,
        f: impl FnOnce(&mpsc::Sender<Job>) -> R,
    ) -> Result<R, TpuError> {
        let mut links = self.links.lock().map_err(|_| TpuError::Stopped)?;
        if let Some(l) = links.get_mut(&leader.tpu_quic) {
            if !l.task.is_finished() {
                l.last_used = Instant::now();
                return Ok(f(&l.tx));
            }
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
        let conn = Arc::new(Mutex::new(None));
        let worker = Worker {
            endpoint: self.endpoint.clone(),
            leader: *leader,
            client: self.client_config(leader, phase.clone()),
            config: self.config.clone(),
            stats: self.stats.clone(),
            conn: conn.clone(),
        };
        let task = tokio::spawn(worker.run(rx));
        let r = f(&tx);
        links.insert(
            leader.tpu_quic,
            Link {
                tx,
                phase,
                conn,
                last_used: Instant::now(),
                task,
            },
        );
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
            // The leader never opens streams towards us.
            .max_concurrent_bidi_streams(0u32.into())
            .max_concurrent_uni_streams(0u32.into())
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
    conn: Arc<Mutex<Option<quinn::Connection>>>,
}

impl Worker {
    async fn run(self, mut rx: mpsc::Receiver<Job>) {
        let addr = self.leader.tpu_quic;
        let min = Duration::from_millis(self.config.backoff_min_ms);
        let max = Duration::from_millis(self.config.backoff_max_ms);
        let mut backoff = min;
        let mut retry_at = Instant::now();
        let mut last_err = String::from("not connected yet");
        let mut conn: Option<quinn::Connection> = None;
        // Streams in flight, driven by this task (no task per transaction).
        let mut inflight = FuturesUnordered::new();
        // Resolves when the current connection dies (made once per connection).
        let mut closed: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> =
            None;
        let backoff_timer = tokio::time::sleep_until(retry_at.into());
        tokio::pin!(backoff_timer);
        enum Next {
            Job(Option<Job>),
            Closed,
            Progress,
        }
        loop {
            if let Some(reason) = conn.as_ref().and_then(quinn::Connection::close_reason) {
                last_err = format!("connection lost: {reason}");
                conn = None;
                closed = None;
                self.publish(None);
            }
            if conn.is_none() && Instant::now() >= retry_at {
                match self.connect().await {
                    Ok(c) => {
                        TpuStats::bump(&self.stats.connects);
                        backoff = min;
                        self.publish(Some(c.clone()));
                        let watch = c.clone();
                        closed = Some(Box::pin(async move {
                            watch.closed().await;
                        }));
                        conn = Some(c);
                    }
                    Err(e) => {
                        TpuStats::bump(&self.stats.connect_failures);
                        last_err = e;
                        retry_at = Instant::now() + backoff;
                        backoff_timer.as_mut().reset(retry_at.into());
                        backoff = (backoff * 2).min(max);
                    }
                }
            }
            let room = inflight.len() < self.config.max_streams;
            let next = tokio::select! {
                biased;
                Some(()) = inflight.next(), if !inflight.is_empty() => Next::Progress,
                j = rx.recv(), if room => Next::Job(j),
                // A dead connection is noticed at once, not on the next job.
                _ = async {
                    match closed.as_mut() {
                        Some(f) => f.await,
                        None => std::future::pending().await,
                    }
                }, if closed.is_some() => Next::Closed,
                // Backing off: reconnect when it ends even with nothing to send.
                _ = &mut backoff_timer, if conn.is_none() => Next::Progress,
            };
            let job = match next {
                Next::Progress => continue,
                Next::Closed => {
                    closed = None;
                    continue;
                }
                Next::Job(Some(job)) => job,
                Next::Job(None) => break,
            };
            match &conn {
                Some(c) => {
                    inflight.push(send_job(c.clone(), job, self.stats.clone(), addr));
                    // Take what else is queued in one go (fewer trips through select).
                    while inflight.len() < self.config.max_streams {
                        let Ok(job) = rx.try_recv() else { break };
                        inflight.push(send_job(c.clone(), job, self.stats.clone(), addr));
                    }
                }
                // Not connected: fail at once so the hedge can go.
                None => {
                    TpuStats::bump(&self.stats.unreachable);
                    let _ = job
                        .done
                        .send(Err(TpuError::Unreachable(addr, last_err.clone())));
                }
            }
        }
        while inflight.next().await.is_some() {}
    }

    fn publish(&self, c: Option<quinn::Connection>) {
        if let Ok(mut slot) = self.conn.lock() {
            *slot = c;
        }
    }

    async fn connect(&self) -> Result<quinn::Connection, String> {
        let cfg = self.client.clone()?;
        let connecting = self
            .endpoint
            .connect_with(cfg, self.leader.tpu_quic, "connect")
            .map_err(|e| e.to_string())?;
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(format!("handshake failed: {e}")),
            Err(_) => Err(format!("no handshake within {timeout:?}")),
        }
    }
}

async fn send_job(conn: quinn::Connection, job: Job, stats: Arc<TpuStats>, addr: SocketAddr) {
    let r = match send_one(&conn, &job.wire).await {
        Ok(()) => {
            TpuStats::bump(&stats.delivered);
            Ok(())
        }
        Err(e) => {
            TpuStats::bump(&stats.failed);
            Err(TpuError::Stream(addr, e))
        }
    };
    let _ = job.done.send(r);
}

/// One transaction on its own unidirectional stream; done when the peer acknowledged
/// every byte.
async fn send_one(conn: &quinn::Connection, wire: &[u8]) -> Result<(), String> {
    let mut s = conn.open_uni().await.map_err(|e| e.to_string())?;
    s.write_all(wire).await.map_err(|e| e.to_string())?;
    s.finish().map_err(|e| e.to_string())?;
    match s.stopped().await {
        Ok(None) => Ok(()),
        Ok(Some(code)) => Err(format!("leader stopped the stream (code {code})")),
        Err(e) => Err(e.to_string()),
    }
}
