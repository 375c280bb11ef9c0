//! A TLS front for a service that speaks only plain TCP here (tansu, chdb's
//! ClickHouse): a rustls server that requires a client certificate from a CA and
//! forwards the bytes to the service. What a client sees is the service's own TLS
//! listener with client certificates required (Kafka's `ssl.client.auth=required`,
//! ClickHouse's `https_port` with `verificationMode` strict).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::free_port;

/// A running front; stopped when dropped.
pub struct TlsFront {
    /// The port it listens on, on 127.0.0.1 and on 127.0.0.2.
    pub port: u16,
    /// Handshakes completed (a client certificate from the CA).
    pub accepted: Arc<AtomicU64>,
    /// Handshakes refused (no certificate, another CA, a client that does not
    /// speak TLS).
    pub refused: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TlsFront {
    /// A front on a free port for the service on 127.0.0.1:`upstream`.
    pub fn start(upstream: u16, ca: &Path, cert: &Path, key: &Path) -> TlsFront {
        Self::start_at(free_port(), upstream, ca, cert, key)
    }

    /// A front on `port`, serving `cert`/`key` (a certificate for 127.0.0.1) and
    /// accepting clients whose certificate chains to `ca`. It listens on
    /// 127.0.0.1, which `cert` names, and on 127.0.0.2, which it does not: a
    /// client that checks the server's name refuses that one.
    pub fn start_at(port: u16, upstream: u16, ca: &Path, cert: &Path, key: &Path) -> TlsFront {
        let acceptor = tls_acceptor(ca, cert, key);
        let listeners: Vec<std::net::TcpListener> = ["127.0.0.1", "127.0.0.2"]
            .into_iter()
            .map(|ip| {
                let l = std::net::TcpListener::bind((ip, port)).expect("bind the TLS front");
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
                                    r.fetch_add(1, Ordering::SeqCst);
                                    return;
                                };
                                a.fetch_add(1, Ordering::SeqCst);
                                let up = tokio::net::TcpStream::connect(("127.0.0.1", upstream));
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
        TlsFront {
            port,
            accepted,
            refused,
            stop: Some(tx),
        }
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A rustls server for `cert`/`key` requiring a client certificate from `ca`.
fn tls_acceptor(ca: &Path, cert: &Path, key: &Path) -> tokio_rustls::TlsAcceptor {
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
