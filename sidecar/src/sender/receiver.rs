//! A local TPU receiver that enforces the protocol a validator enforces: TLS 1.3 with
//! ALPN `solana-tpu`, a client certificate with an Ed25519 key (mandatory), no
//! bidirectional streams (none granted), at most `max_streams` unidirectional
//! streams at once, and each stream at most `max_tx_bytes` (a longer stream is
//! stopped and counted). Used by the tests, the benchmarks and `--tpu-sink` dry runs;
//! it is not a validator (it does not deserialize or execute transactions).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use quinn::crypto::rustls::QuicServerConfig;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::tls;
use super::tpu::{MAX_TX_BYTES, UNSTAKED_STREAMS};

/// Stream stop code for an oversized transaction.
pub const STOP_TOO_LARGE: u32 = 1;

/// One transaction as received.
#[derive(Debug, Clone)]
pub struct Received {
    /// The sender's identity (the key in its client certificate).
    pub peer: [u8; 32],
    /// The stream's bytes.
    pub bytes: Vec<u8>,
    /// When the stream ended.
    pub at: Instant,
}

/// What the receiver saw.
#[derive(Debug, Default)]
pub struct ReceiverStats {
    /// Connections accepted (handshake completed).
    pub connections: AtomicU64,
    /// Handshakes refused (no/bad client certificate, wrong ALPN, …).
    pub refused: AtomicU64,
    /// Transactions received.
    pub transactions: AtomicU64,
    /// Streams stopped because they exceeded the size limit.
    pub oversize: AtomicU64,
}

/// Receiver settings.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Largest stream accepted.
    pub max_tx_bytes: usize,
    /// Concurrent unidirectional streams granted per connection.
    pub max_streams: u32,
    /// Keep each transaction's bytes (tests) or only count them (benchmarks).
    pub keep: bool,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_tx_bytes: MAX_TX_BYTES,
            max_streams: UNSTAKED_STREAMS as u32,
            keep: true,
        }
    }
}

/// A running receiver (stops on drop).
pub struct TpuReceiver {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its identity key (what a pinned client expects).
    pub identity: [u8; 32],
    /// Counters.
    pub stats: Arc<ReceiverStats>,
    received: Arc<Mutex<Vec<Received>>>,
    notify: Arc<Notify>,
    endpoint: quinn::Endpoint,
    task: JoinHandle<()>,
}

impl Drop for TpuReceiver {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"receiver stopped");
        self.task.abort();
    }
}

impl TpuReceiver {
    /// Starts a receiver with identity `key`. Must run inside a tokio runtime.
    pub fn start(config: ReceiverConfig, key: &SigningKey) -> anyhow::Result<TpuReceiver> {
        let identity = tls::identity_cert(key)?;
        let crypto = tls::server_crypto(&identity)?;
        let mut server =
            quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(crypto)?));
        let mut t = quinn::TransportConfig::default();
        t.max_concurrent_bidi_streams(0u32.into())
            .max_concurrent_uni_streams(config.max_streams.into())
            .max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_secs(10)).ok());
        server.transport_config(Arc::new(t));
        let endpoint = quinn::Endpoint::server(server, config.listen)?;
        let addr = endpoint.local_addr()?;
        let stats = Arc::new(ReceiverStats::default());
        let received = Arc::new(Mutex::new(Vec::new()));
        let notify = Arc::new(Notify::new());
        let task = tokio::spawn(accept_loop(
            endpoint.clone(),
            Arc::new(Shared {
                config,
                stats: stats.clone(),
                received: received.clone(),
                notify: notify.clone(),
            }),
        ));
        Ok(TpuReceiver {
            addr,
            identity: key.verifying_key().to_bytes(),
            stats,
            received,
            notify,
            endpoint,
            task,
        })
    }

    /// Everything received so far (when `keep`).
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Transactions received so far.
    pub fn count(&self) -> u64 {
        self.stats.transactions.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` transactions arrived, or `timeout`; returns the count.
    pub async fn wait_for(&self, n: u64, timeout: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            let c = self.count();
            if c >= n {
                return c;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.count();
            }
        }
    }
}

/// What every connection and stream task of one receiver shares.
struct Shared {
    config: ReceiverConfig,
    stats: Arc<ReceiverStats>,
    received: Arc<Mutex<Vec<Received>>>,
    notify: Arc<Notify>,
}

async fn accept_loop(endpoint: quinn::Endpoint, sh: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        let sh = sh.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(_) => {
                    sh.stats.refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            let alpn_ok = conn
                .handshake_data()
                .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|h| h.protocol)
                .is_some_and(|p| p == tls::ALPN_TPU);
            let peer = conn
                .peer_identity()
                .and_then(|p| {
                    p.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                        .ok()
                })
                .and_then(|certs| certs.first().and_then(tls::ed25519_key_of));
            let Some(peer) = peer.filter(|_| alpn_ok) else {
                sh.stats.refused.fetch_add(1, Ordering::Relaxed);
                conn.close(
                    1u32.into(),
                    b"solana-tpu with an Ed25519 client certificate required",
                );
                return;
            };
            sh.stats.connections.fetch_add(1, Ordering::Relaxed);
            while let Ok(mut stream) = conn.accept_uni().await {
                let sh = sh.clone();
                tokio::spawn(async move {
                    match stream.read_to_end(sh.config.max_tx_bytes).await {
                        Ok(bytes) => {
                            sh.stats.transactions.fetch_add(1, Ordering::Relaxed);
                            if sh.config.keep {
                                if let Ok(mut r) = sh.received.lock() {
                                    r.push(Received {
                                        peer,
                                        bytes,
                                        at: Instant::now(),
                                    });
                                }
                            }
                            sh.notify.notify_waiters();
                        }
                        Err(quinn::ReadToEndError::TooLong) => {
                            sh.stats.oversize.fetch_add(1, Ordering::Relaxed);
                            let _ = stream.stop(STOP_TOO_LARGE.into());
                        }
                        Err(_) => {}
                    }
                });
            }
        });
    }
}
