//! A real Kafka-protocol broker: `tansu` 0.6.0, installed once by
//! `scripts/install-tansu.sh` into the cache, in-memory storage.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{cache_dir, free_port, wait_tcp, ProcessGuard};

/// The tansu binary; panics with the install command when missing.
pub fn tansu_bin() -> PathBuf {
    let p = cache_dir().join("tansu/bin/tansu");
    assert!(
        p.exists(),
        "{} not found: run `bash scripts/install-tansu.sh` (the README's test command does)",
        p.display()
    );
    p
}

/// A running broker; stopped when dropped.
pub struct Kafka {
    /// Listener port.
    pub port: u16,
    /// The process.
    pub process: ProcessGuard,
}

impl Kafka {
    /// Starts a broker on a free port, logging under `dir`.
    pub fn start(dir: &Path) -> Kafka {
        Self::start_at(dir, free_port())
    }

    /// Starts a broker on `port`.
    pub fn start_at(dir: &Path, port: u16) -> Kafka {
        let url = format!("tcp://127.0.0.1:{port}");
        Self::spawn(dir, port, &url, &url)
    }

    /// Starts a broker listening at `listen` (on `port`) that tells clients to
    /// connect to `advertised`.
    fn spawn(dir: &Path, port: u16, listen: &str, advertised: &str) -> Kafka {
        let mut cmd = Command::new(tansu_bin());
        cmd.args([
            "broker",
            "--listener-url",
            listen,
            "--advertised-listener-url",
            advertised,
            "--storage-engine",
            "memory://tansu/",
        ]);
        let mut process =
            ProcessGuard::spawn("tansu", &mut cmd, &dir.join(format!("tansu-{port}.log")));
        if !wait_tcp(port, Duration::from_secs(30)) {
            process.assert_running();
            panic!("tansu did not listen on {port}:\n{}", process.log());
        }
        Kafka { port, process }
    }

    /// `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// A broker reached over mutual TLS only: tansu listens in plain text on a port
/// no client is told of, and advertises the port of a TLS front (rustls) that
/// checks each client's certificate against the CA and forwards the bytes. What
/// a client sees is a broker with an `SSL` listener that requires client
/// certificates (`ssl.client.auth=required`).
pub struct TlsKafka {
    /// The broker behind the front.
    pub kafka: Kafka,
    /// The front's port (`bootstrap.servers`, and what the broker advertises).
    pub port: u16,
    /// Handshakes the front completed (a client certificate from the CA).
    pub accepted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Handshakes it refused (no certificate, another CA, a client that does not
    /// speak TLS).
    pub refused: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TlsKafka {
    /// Starts tansu behind a TLS front serving `cert`/`key` (a certificate for
    /// 127.0.0.1) and accepting clients whose certificate chains to `ca`.
    pub fn start(dir: &Path, ca: &Path, cert: &Path, key: &Path) -> TlsKafka {
        use std::sync::atomic::AtomicU64;
        use std::sync::Arc;

        let (inner, front) = (free_port(), free_port());
        let kafka = Kafka::spawn(
            dir,
            inner,
            &format!("tcp://127.0.0.1:{inner}"),
            &format!("tcp://127.0.0.1:{front}"),
        );
        let acceptor = tls_acceptor(ca, cert, key);
        // On 127.0.0.1, which `cert` names, and on 127.0.0.2, which it does not (a
        // client that checks the broker's name refuses that one).
        let listeners: Vec<std::net::TcpListener> = ["127.0.0.1", "127.0.0.2"]
            .into_iter()
            .map(|ip| {
                let l = std::net::TcpListener::bind((ip, front)).expect("bind the TLS front");
                l.set_nonblocking(true).expect("nonblocking");
                l
            })
            .collect();
        let (accepted, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (tx, mut stop) = tokio::sync::oneshot::channel::<()>();
        let (a, r) = (accepted.clone(), refused.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                for listener in listeners {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                    let (acceptor, a, r) = (acceptor.clone(), a.clone(), r.clone());
                    tokio::spawn(async move {
                        loop {
                            let Ok((tcp, _)) = listener.accept().await else {
                                continue;
                            };
                            let (acceptor, a, r) = (acceptor.clone(), a.clone(), r.clone());
                            tokio::spawn(async move {
                                let Ok(mut tls) = acceptor.accept(tcp).await else {
                                    r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                    return;
                                };
                                a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                let up = tokio::net::TcpStream::connect(("127.0.0.1", inner));
                                if let Ok(mut up) = up.await {
                                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                                }
                            });
                        }
                    });
                }
                let _ = (&mut stop).await;
            });
        });
        TlsKafka {
            kafka,
            port: front,
            accepted,
            refused,
            stop: Some(tx),
        }
    }

    /// `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsKafka {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A rustls server for `cert`/`key` requiring a client certificate from `ca`.
fn tls_acceptor(ca: &Path, cert: &Path, key: &Path) -> tokio_rustls::TlsAcceptor {
    use std::sync::Arc;

    let pem = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let chain: Vec<_> = rustls_pemfile::certs(&mut pem(cert).as_slice())
        .collect::<Result<_, _>>()
        .expect("certificate");
    let key = rustls_pemfile::private_key(&mut pem(key).as_slice())
        .expect("key")
        .expect("a private key");
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem(ca).as_slice()) {
        roots.add(c.expect("CA")).expect("CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .expect("client verifier");
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("server certificate");
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}
