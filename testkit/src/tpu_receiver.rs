//! A local TPU receiver that enforces the protocol a validator enforces: TLS 1.3 with
//! ALPN `solana-tpu`, a client certificate with an Ed25519 key (mandatory), no
//! bidirectional streams (none granted), at most `max_streams` unidirectional
//! streams at once, and each stream at most `max_tx_bytes` (a longer stream is
//! stopped and counted). A test peer for the sender's TPU route (and `gw-tpu-sink`
//! for the local run); it is not a validator (it does not deserialize or execute
//! transactions). Its TLS is written here, apart from the sender's, so the peer
//! does not share the code it tests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use quinn::crypto::rustls::QuicServerConfig;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Largest transaction (Solana's `PACKET_DATA_SIZE`).
pub const MAX_TX_BYTES: usize = 1232;
/// Concurrent streams a validator grants an unstaked peer.
pub const UNSTAKED_STREAMS: u32 = 128;

/// Stream stop code for an oversized transaction.
pub const STOP_TOO_LARGE: u32 = 1;
/// Agave's connection close code when a connection is not allowed (its per-IP
/// connection budget is spent): `CONNECTION_CLOSE_CODE_DISALLOWED`.
pub const CLOSE_DISALLOWED: u32 = 2;
/// Agave's close code when a peer has too many connections: `..._TOO_MANY`.
pub const CLOSE_TOO_MANY: u32 = 4;

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
    /// Completed handshakes closed at once because [`TpuReceiver::refuse_with`]
    /// was set (also counted in `connections`).
    pub closed_after_handshake: AtomicU64,
    /// Connection attempts refused before any handshake (`CONNECTION_REFUSED`)
    /// because [`TpuReceiver::refuse_incoming`] was set.
    pub refused_incoming: AtomicU64,
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
            max_streams: UNSTAKED_STREAMS,
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
    refuse: Arc<AtomicU32>,
    refuse_incoming: Arc<std::sync::atomic::AtomicBool>,
    live: Arc<Mutex<Vec<quinn::Connection>>>,
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
        let crypto = tls::server_crypto(key)?;
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
        let refuse = Arc::new(AtomicU32::new(0));
        let refuse_incoming = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let live = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(accept_loop(
            endpoint.clone(),
            Arc::new(Shared {
                config,
                stats: stats.clone(),
                received: received.clone(),
                notify: notify.clone(),
                refuse: refuse.clone(),
                refuse_incoming: refuse_incoming.clone(),
                live: live.clone(),
            }),
        ));
        Ok(TpuReceiver {
            addr,
            identity: key.verifying_key().to_bytes(),
            stats,
            received,
            notify,
            refuse,
            refuse_incoming,
            live,
            endpoint,
            task,
        })
    }

    /// Fault injection: while `code` is non-zero, every completed handshake is
    /// closed at once with that application code, as Agave's TPU server closes a
    /// connection its per-IP budget (`CLOSE_DISALLOWED`) or per-peer cap
    /// (`CLOSE_TOO_MANY`) does not allow. 0 accepts again.
    pub fn refuse_with(&self, code: u32) {
        self.refuse.store(code, Ordering::Relaxed);
    }

    /// Fault injection: while set, every connection attempt is refused before
    /// its handshake (`CONNECTION_REFUSED`), as Agave's server refuses one when
    /// its connection table is full (`Incoming::refuse`).
    pub fn refuse_incoming(&self, on: bool) {
        self.refuse_incoming.store(on, Ordering::Relaxed);
    }

    /// Fault injection: closes every connection accepted so far with the
    /// application code `code`, as Agave's server drops an established entry
    /// (`CONNECTION_CLOSE_CODE_DROPPED_ENTRY`, 1) to make room for another peer.
    /// Returns how many were open.
    pub fn evict_with(&self, code: u32) -> usize {
        let live = self.live.lock().map(|mut l| std::mem::take(&mut *l));
        let live = live.unwrap_or_default();
        let open = live.iter().filter(|c| c.close_reason().is_none()).count();
        for c in live {
            c.close(code.into(), b"dropped");
        }
        open
    }

    /// Everything received so far (when `keep`).
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// When the latest transaction arrived (when `keep`).
    pub fn last_at(&self) -> Option<Instant> {
        self.received.lock().ok()?.last().map(|r| r.at)
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
    refuse: Arc<AtomicU32>,
    refuse_incoming: Arc<std::sync::atomic::AtomicBool>,
    /// Connections accepted (closed ones let go at each accept).
    live: Arc<Mutex<Vec<quinn::Connection>>>,
}

async fn accept_loop(endpoint: quinn::Endpoint, sh: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        if sh.refuse_incoming.load(Ordering::Relaxed) {
            sh.stats.refused_incoming.fetch_add(1, Ordering::Relaxed);
            incoming.refuse();
            continue;
        }
        let sh = sh.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else {
                sh.stats.refused.fetch_add(1, Ordering::Relaxed);
                return;
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
            let refuse = sh.refuse.load(Ordering::Relaxed);
            if refuse != 0 {
                sh.stats
                    .closed_after_handshake
                    .fetch_add(1, Ordering::Relaxed);
                let reason: &[u8] = match refuse {
                    CLOSE_DISALLOWED => b"disallowed",
                    CLOSE_TOO_MANY => b"too_many",
                    _ => b"refused",
                };
                conn.close(refuse.into(), reason);
                return;
            }
            if let Ok(mut live) = sh.live.lock() {
                live.retain(|c| c.close_reason().is_none());
                live.push(conn.clone());
            }
            while let Ok(mut stream) = conn.accept_uni().await {
                let sh = sh.clone();
                tokio::spawn(async move {
                    match stream.read_to_end(sh.config.max_tx_bytes).await {
                        Ok(bytes) => {
                            let at = Instant::now();
                            // Kept before counted: a test that saw the count
                            // finds the transaction in `received`.
                            if sh.config.keep {
                                if let Ok(mut r) = sh.received.lock() {
                                    r.push(Received { peer, bytes, at });
                                }
                            }
                            sh.stats.transactions.fetch_add(1, Ordering::Relaxed);
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

/// The receiver's TLS: a self-signed certificate for its identity, and a client
/// verifier that demands an Ed25519 client certificate.
mod tls {
    use std::sync::Arc;

    use ed25519_dalek::SigningKey;
    use rustls::client::danger::HandshakeSignatureValid;
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
    use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
    use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

    /// The TPU's ALPN id.
    pub const ALPN_TPU: &[u8] = b"solana-tpu";

    /// RFC 8410: an Ed25519 SubjectPublicKeyInfo is this prefix and the 32-byte key.
    const SPKI_PREFIX: [u8; 12] = [
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];

    /// The Ed25519 key in a certificate's subject, if that is what it holds.
    pub fn ed25519_key_of(cert: &CertificateDer<'_>) -> Option<[u8; 32]> {
        let ee = webpki::EndEntityCert::try_from(cert).ok()?;
        let spki = ee.subject_public_key_info();
        let der: &[u8] = spki.as_ref();
        der.strip_prefix(&SPKI_PREFIX[..])?.try_into().ok()
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    #[derive(Debug)]
    struct Ed25519Client(Arc<CryptoProvider>);

    impl ClientCertVerifier for Ed25519Client {
        fn offer_client_auth(&self) -> bool {
            true
        }
        fn client_auth_mandatory(&self) -> bool {
            true
        }
        fn root_hint_subjects(&self) -> &[DistinguishedName] {
            &[]
        }
        fn verify_client_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _now: UnixTime,
        ) -> Result<ClientCertVerified, rustls::Error> {
            ed25519_key_of(end_entity)
                .map(|_| ClientCertVerified::assertion())
                .ok_or(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::BadEncoding,
                ))
        }
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::Tls12NotOffered,
            ))
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            vec![SignatureScheme::ED25519]
        }
    }

    /// TLS 1.3, ALPN `solana-tpu`, a certificate for `key`, a mandatory Ed25519
    /// client certificate.
    pub fn server_crypto(key: &SigningKey) -> anyhow::Result<rustls::ServerConfig> {
        // PKCS#8 v1 of an Ed25519 seed (RFC 8410).
        let mut pkcs8 = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        pkcs8.extend_from_slice(key.as_bytes());
        let der = PrivatePkcs8KeyDer::from(pkcs8);
        let kp = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)?;
        let cert = rcgen::CertificateParams::new(Vec::<String>::new())?.self_signed(&kp)?;
        let provider = provider();
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(Ed25519Client(provider)))
            .with_single_cert(vec![cert.der().clone()], PrivateKeyDer::Pkcs8(der))?;
        cfg.alpn_protocols = vec![ALPN_TPU.to_vec()];
        Ok(cfg)
    }
}

/// The first signature of a Solana transaction's wire bytes (a compact-u16 count,
/// then 64-byte signatures), if there is one.
pub fn first_signature(wire: &[u8]) -> Option<[u8; 64]> {
    let mut n = 0usize;
    let mut i = 0usize;
    loop {
        let b = *wire.get(i)?;
        n |= usize::from(b & 0x7f) << (7 * i);
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i == 3 {
            return None;
        }
    }
    if n == 0 {
        return None;
    }
    wire.get(i..i + 64)?.try_into().ok()
}
