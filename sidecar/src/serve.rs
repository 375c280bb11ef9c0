//! Serving the sidecar's routes: mutual TLS with the edge (rustls), or plain HTTP on
//! a loopback address when explicitly configured for development. Every request
//! carries the [`Peer`] that sent it; [`edge_only`] lets only the edge through and
//! answers everyone else with 401 or 403, each refusal recorded in the ledger (its
//! own row, or beyond a budget a row that counts it: [`RefusalBudget`]).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use gw_core::ledger::Stage;
use gw_core::Code;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::net::TcpListener;
use tower::ServiceExt as _;

use crate::error::{Answered, ApiError};
use crate::ledger::Auditor;
use crate::ops::metrics::ControlMetrics;

/// `tls` in the sidecar's configuration: its certificate, and whom it trusts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The sidecar's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// CA certificates client certificates must chain to (PEM).
    pub client_ca: PathBuf,
    /// DNS names a client certificate must hold to be the edge (Envoy).
    #[serde(default = "default_edge_identities")]
    pub edge_identities: Vec<String>,
}

fn default_edge_identities() -> Vec<String> {
    vec!["envoy.local".into()]
}

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// The edge: a client certificate from the gateway's CA naming an edge identity.
    Edge(String),
    /// A client certificate from the gateway's CA that is not the edge's.
    Other,
    /// No client certificate.
    Anonymous,
    /// Plain HTTP on loopback (development): trusted as the edge.
    Plaintext,
}

use crate::tls::certs;
pub use crate::tls::TlsError;

/// The sidecar's TLS: the rustls configuration and the edge's names.
#[derive(Clone)]
pub struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    edge: Arc<Vec<String>>,
}

impl Tls {
    /// Loads `c`: TLS 1.2+ with ALPN h2 and http/1.1; a client certificate is asked
    /// for and, when given, must chain to `client_ca`.
    pub fn load(c: &TlsConfig) -> Result<Tls, TlsError> {
        let chain = certs(&c.cert)?;
        let key = crate::tls::private_key(&c.key)?;
        let roots = crate::tls::roots(&c.client_ca)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                // Callers without a certificate get an HTTP 401 (recorded), not a
                // handshake failure nobody sees.
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Rustls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        if c.edge_identities.is_empty() {
            return Err(TlsError::Rustls("tls.edge_identities is empty".into()));
        }
        Ok(Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
            edge: Arc::new(c.edge_identities.clone()),
        })
    }

    /// Who presented `chain` (already verified against the CA by rustls).
    fn peer(&self, chain: Option<&[CertificateDer<'_>]>) -> Peer {
        let Some(leaf) = chain.and_then(<[_]>::first) else {
            return Peer::Anonymous;
        };
        let Ok(ee) = webpki::EndEntityCert::try_from(leaf) else {
            return Peer::Other;
        };
        for name in self.edge.iter() {
            let Ok(sn) = ServerName::try_from(name.as_str()) else {
                continue;
            };
            if ee.verify_is_valid_for_subject_name(&sn).is_ok() {
                return Peer::Edge(name.clone());
            }
        }
        Peer::Other
    }
}

/// How long a connection may take to finish its TLS handshake and send its first
/// bytes, and an HTTP/1.1 request to send its headers: a peer that stalls is
/// dropped, not kept (each one holds a task and a file descriptor).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long accepting pauses after an error that is not one connection's (out of
/// file descriptors, say): retrying at once would spin.
const ACCEPT_PAUSE: Duration = Duration::from_millis(500);

/// The most connections a listener holds in their TLS handshake, and (those of
/// peers it only refuses) until their first bytes ([`HANDSHAKE_TIMEOUT`] at
/// most each): one more gives up the oldest of them. A peer holding
/// connections open and silent does not keep a new one (the edge's) from
/// being taken; one opening them faster than a handshake completes (a few
/// milliseconds) can still give up the edge's new connection during its
/// handshake — a delay for a new connection (the edge keeps its connections
/// open), never a cut in one in use. Once the handshake names a peer the
/// listener serves, its connection leaves the count.
pub const MAX_HANDSHAKING: usize = 256;

/// The connections of a listener in their handshake, oldest first, each with
/// what tells it it was given up.
#[derive(Default)]
struct Opening {
    next: u64,
    open: std::collections::BTreeMap<u64, Arc<tokio::sync::Notify>>,
}

/// One connection's place in [`Opening`], left when dropped.
struct OpeningSlot {
    id: u64,
    of: Arc<parking_lot::Mutex<Opening>>,
    given_up: Arc<tokio::sync::Notify>,
}

impl OpeningSlot {
    /// A place for a new connection; the oldest is given up when all
    /// [`MAX_HANDSHAKING`] are taken (`true` then).
    fn take(of: &Arc<parking_lot::Mutex<Opening>>) -> (OpeningSlot, bool) {
        let mut o = of.lock();
        let full = o.open.len() >= MAX_HANDSHAKING;
        if full {
            if let Some((_, oldest)) = o.open.pop_first() {
                // Stored if it is not waiting yet: it sees it at its next await.
                oldest.notify_one();
            }
        }
        let id = o.next;
        o.next += 1;
        let given_up = Arc::new(tokio::sync::Notify::new());
        o.open.insert(id, given_up.clone());
        let slot = OpeningSlot {
            id,
            of: of.clone(),
            given_up,
        };
        (slot, full)
    }

    /// `fut` until `deadline`, or until this connection is given up: `None` then.
    async fn before<F: Future>(&self, deadline: tokio::time::Instant, fut: F) -> Option<F::Output> {
        tokio::select! {
            r = tokio::time::timeout_at(deadline, fut) => r.ok(),
            () = self.given_up.notified() => None,
        }
    }
}

impl Drop for OpeningSlot {
    fn drop(&mut self) {
        self.of.lock().open.remove(&self.id);
    }
}

/// The most connections a listener holds from peers it only refuses (on the
/// main listener: no client certificate, or one that is not the edge's): one
/// more is closed after its handshake, unanswered. Each is held
/// [`REFUSED_PEER_LIFETIME`] at most: long enough to read its 401 or 403, not
/// to sit on a file descriptor and a task (HTTP/2 has no idle timeout).
pub const MAX_REFUSED_PEERS: usize = 64;

/// How long a connection from a peer the listener only refuses is kept.
pub const REFUSED_PEER_LIFETIME: Duration = HANDSHAKE_TIMEOUT;

/// Whom a listener serves; every other peer is only refused (a 401 or 403 and
/// its ledger row), within [`MAX_REFUSED_PEERS`] connections held at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serves {
    /// The edge (and plain HTTP on loopback in development): the main listener.
    Edge,
    /// Any certificate from the client CA: the ops listener under `ops_tls`.
    Certified,
}

impl Serves {
    fn serves(self, peer: &Peer) -> bool {
        match peer {
            Peer::Edge(_) | Peer::Plaintext => true,
            Peer::Other => self == Serves::Certified,
            Peer::Anonymous => false,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ShedLabels {
    listener: &'static str,
    reason: &'static str,
}

/// Connections a listener closed unserved because a bound above was reached
/// (`gw_sidecar_connections_shed_total{listener,reason}`).
#[derive(Clone, Debug, Default)]
pub struct ConnMetrics {
    shed: prometheus_client::metrics::family::Family<
        ShedLabels,
        prometheus_client::metrics::counter::Counter,
    >,
}

impl ConnMetrics {
    /// Registers `gw_sidecar_connections_shed_total`, its series at 0.
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> ConnMetrics {
        let m = ConnMetrics::default();
        for listener in ["main", "ops"] {
            for reason in ["handshaking", "refused_peers"] {
                let _ = m.shed.get_or_create(&ShedLabels { listener, reason });
            }
        }
        registry.register(
            "gw_sidecar_connections_shed",
            "Connections closed unserved: `handshaking` given up, the oldest, when 256 were in their TLS handshake, `refused_peers` when 64 from peers the listener only refuses (no certificate, or not the edge's) were open",
            m.shed.clone(),
        );
        m
    }

    fn shed(&self, listener: &'static str, reason: &'static str) {
        self.shed
            .get_or_create(&ShedLabels { listener, reason })
            .inc();
    }
}

/// A listener: what it is called in metrics, whom it serves, and its counters.
#[derive(Clone, Debug)]
pub struct Listener {
    /// `main` or `ops`.
    pub name: &'static str,
    /// Whom it serves.
    pub serves: Serves,
    /// Its counters.
    pub metrics: ConnMetrics,
}

/// Whether an `accept` error concerns only the connection being accepted.
fn connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    )
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains open
/// connections. With `tls`, every connection is TLS and every request carries its
/// [`Peer`]; without, requests are [`Peer::Plaintext`]. Connections still in
/// their handshake, and those of peers `of` only refuses, are bounded
/// ([`MAX_HANDSHAKING`], [`MAX_REFUSED_PEERS`]).
pub async fn serve(
    listener: TcpListener,
    tls: Option<Tls>,
    app: Router,
    of: Listener,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let opening = Arc::new(parking_lot::Mutex::new(Opening::default()));
    let refused_peers = Arc::new(tokio::sync::Semaphore::new(MAX_REFUSED_PEERS));
    tokio::pin!(shutdown);
    loop {
        let (tcp, from) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) if connection_error(&e) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, pause_ms = ACCEPT_PAUSE.as_millis() as u64, "accept failed");
                    tokio::select! {
                        () = tokio::time::sleep(ACCEPT_PAUSE) => continue,
                        () = &mut shutdown => break,
                    }
                }
            },
            () = &mut shutdown => break,
        };
        let (handshake, full) = OpeningSlot::take(&opening);
        if full {
            of.metrics.shed(of.name, "handshaking");
            tracing::debug!(
                "{MAX_HANDSHAKING} connections in their handshake: the oldest given up"
            );
        }
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        let (of, refused_peers) = (of.clone(), refused_peers.clone());
        tokio::spawn(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            // WebSockets (`/api/realtime`): HTTP/1.1 upgrades, and RFC 8441's
            // extended CONNECT when the edge multiplexes them over HTTP/2.
            builder.http2().enable_connect_protocol();
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT);
            let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
            match tls {
                Some(tls) => {
                    let stream = match handshake.before(deadline, tls.acceptor.accept(tcp)).await {
                        Some(Ok(s)) => s,
                        Some(Err(e)) => {
                            tracing::debug!(%from, error = %e, "TLS handshake failed");
                            return;
                        }
                        None => {
                            tracing::debug!(%from, "TLS handshake not finished in time, or given up: dropped");
                            return;
                        }
                    };
                    let peer = tls.peer(stream.get_ref().1.peer_certificates());
                    let served = of.serves.serves(&peer);
                    // A peer served (the edge) leaves the count at once; one only
                    // refused stays in it until its first bytes.
                    let first = if served {
                        drop(handshake);
                        tokio::time::timeout_at(deadline, first_bytes(stream))
                            .await
                            .ok()
                            .flatten()
                    } else {
                        let first = handshake.before(deadline, first_bytes(stream)).await;
                        drop(handshake);
                        first.flatten()
                    };
                    let Some(stream) = first else {
                        tracing::debug!(%from, "no request in time after the TLS handshake: dropped");
                        return;
                    };
                    let svc = with_peer(app, peer.clone(), from);
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    if served {
                        let _ = watcher.watch(conn.into_owned()).await;
                        return;
                    }
                    let Ok(_held) = refused_peers.try_acquire_owned() else {
                        of.metrics.shed(of.name, "refused_peers");
                        tracing::debug!(%from, ?peer, "{MAX_REFUSED_PEERS} connections of refused peers open: closed");
                        return;
                    };
                    let _ = tokio::time::timeout(
                        REFUSED_PEER_LIFETIME,
                        watcher.watch(conn.into_owned()),
                    )
                    .await;
                }
                None => {
                    let Some(tcp) = handshake.before(deadline, first_bytes(tcp)).await.flatten()
                    else {
                        tracing::debug!(%from, "no request in time: dropped");
                        return;
                    };
                    drop(handshake);
                    let svc = with_peer(app, Peer::Plaintext, from);
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc);
                    let _ = watcher.watch(conn.into_owned()).await;
                }
            }
        });
    }
    graceful.shutdown().await;
}

/// `io` once its peer has sent its first bytes (`None`: it hung up first; the
/// caller bounds the wait). hyper reads those bytes to tell HTTP/1.1 from
/// HTTP/2 without a timer of its own, and an HTTP/2 connection without its
/// preface would be held as long as the peer liked.
async fn first_bytes<S>(io: S) -> Option<BufReader<S>>
where
    S: tokio::io::AsyncRead + Unpin,
{
    let mut r = BufReader::new(io);
    let got = matches!(r.fill_buf().await, Ok(b) if !b.is_empty());
    got.then_some(r)
}

fn with_peer(
    app: Router,
    peer: Peer,
    from: SocketAddr,
) -> TowerToHyperService<
    tower::util::MapRequest<
        Router,
        impl Fn(Request<hyper::body::Incoming>) -> Request<Body> + Clone,
    >,
> {
    let tag = move |req: Request<hyper::body::Incoming>| {
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(peer.clone());
        req.extensions_mut().insert(from);
        req
    };
    TowerToHyperService::new(app.map_request(tag))
}

/// What [`edge_only`] records refusals with.
#[derive(Clone)]
pub struct Gatekeeper {
    /// The ledger.
    pub auditor: Auditor,
    /// Counters.
    pub metrics: ControlMetrics,
    /// Rows for callers other than the edge.
    pub budget: Arc<RefusalBudget>,
    /// Rows for the refusals the edge reports (taken by the control routes;
    /// here for the flusher).
    pub edge_reports: Arc<EdgeBudgets>,
    /// The roles the API routes need ([`api_roles`]).
    pub routes: Arc<gw_core::roles::RouteTable>,
    /// Rows for requests the edge forwarded with no token, refused here
    /// ([`api_roles`], [`not_found`], [`method_not_allowed`]): a route the edge
    /// made public lets anyone cause them.
    pub unstamped: Arc<RefusalBudget>,
    /// Rows for the same refusals of token holders: no flood without a token
    /// takes them.
    pub holders: Arc<RefusalBudget>,
    /// Rows for the QUIC ingest's refusals naming no identity (anyone who
    /// reaches its port causes them): apart, so that they take no rows of
    /// callers of the sidecar's own port.
    pub ingest: Arc<RefusalBudget>,
    /// The keys the edge seals its stamp and its reports with ([`edge_stamp`]):
    /// the current one, and the one before a change while it is still believed;
    /// and the seals believed so far (each is believed once).
    pub edge_seals: Arc<EdgeSeals>,
}

impl Gatekeeper {
    /// Every budget whose sums the flusher writes.
    fn budgets(&self) -> impl Iterator<Item = &RefusalBudget> {
        [
            &*self.budget,
            &*self.unstamped,
            &*self.holders,
            &*self.ingest,
        ]
        .into_iter()
        .chain(self.edge_reports.all())
    }

    /// The budget of a refusal of a request the edge forwarded, naming `who`.
    fn forwarded(&self, who: Option<&gw_core::contract::Requester>) -> &RefusalBudget {
        self.budget_of(Via::Edge, who)
    }

    /// The budget of a refusal of a request that came `via`, naming `who`: a
    /// holder's (a token the edge verified, an identity the sidecar did) within
    /// the holders' budget; the others apart, by the way they came.
    fn budget_of(&self, via: Via, who: Option<&gw_core::contract::Requester>) -> &RefusalBudget {
        match (via, who) {
            (_, Some(_)) => &self.holders,
            (Via::Edge, None) => &self.unstamped,
            (Via::Direct, None) => &self.ingest,
        }
    }
}

/// How a refused request reached the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Forwarded by the edge.
    Edge,
    /// Straight to the hot path's QUIC ingest.
    Direct,
}

/// The ledger's budgets for the refusals the edge reports: one for requests
/// refused before a token verified (anyone who reaches Envoy causes them, of
/// several codes), one for refusals of token holders (a signed command refused,
/// a role missing) — so that no flood without a token, of any codes, takes the
/// rows of a token holder's refusals.
pub struct EdgeBudgets {
    /// Reports naming no requester.
    pub anonymous: RefusalBudget,
    /// Reports naming the requester whose token the edge verified.
    pub identified: RefusalBudget,
}

impl Default for EdgeBudgets {
    fn default() -> Self {
        EdgeBudgets {
            anonymous: RefusalBudget::edge_reports(),
            identified: RefusalBudget::edge_reports().per_holder((
                EDGE_REPORT_ROWS_PER_HOLDER_PER_SEC,
                EDGE_REPORT_ROWS_PER_HOLDER_BURST,
            )),
        }
    }
}

impl EdgeBudgets {
    /// The budget a report naming `requester` takes from.
    pub fn of(&self, requester: &gw_core::contract::Requester) -> &RefusalBudget {
        if *requester == gw_core::contract::Requester::default() {
            &self.anonymous
        } else {
            &self.identified
        }
    }

    /// Both.
    fn all(&self) -> [&RefusalBudget; 2] {
        [&self.anonymous, &self.identified]
    }
}

/// Body bytes kept in the row of a refused caller: enough to tell what it sent,
/// little enough that rows cost an attacker's bandwidth, not the node's disk.
pub const REFUSED_BODY_BYTES: usize = 4 * 1024;

/// What a refusal's row keeps of `body`: its first [`REFUSED_BODY_BYTES`].
pub fn kept_of(body: &[u8]) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(&body[..body.len().min(REFUSED_BODY_BYTES)])
}

/// Rows a second, on average, for refusals of callers other than the edge
/// ([`RefusalBudget`]), of all codes and of each.
pub const REFUSAL_ROWS_PER_SEC: f64 = 20.0;

/// And at once.
pub const REFUSAL_ROWS_BURST: f64 = 200.0;

/// Rows a second, on average, for the refusals the edge reports, of all codes,
/// for each of [`EdgeBudgets`].
pub const EDGE_REPORT_ROWS_PER_SEC: f64 = 50.0;

/// And at once.
pub const EDGE_REPORT_ROWS_BURST: f64 = 500.0;

/// Rows a second, on average, for the refusals the edge reports, of each code:
/// a flood of one code leaves the rest of the budget to the others.
pub const EDGE_REPORT_ROWS_PER_CODE_PER_SEC: f64 = 20.0;

/// And at once.
pub const EDGE_REPORT_ROWS_PER_CODE_BURST: f64 = 200.0;

/// Rows a second, on average, for the refusals the edge reports of each token
/// holder (`iss` and `sub`): one holder's flood, of any code, leaves most of the
/// identified budget — and of its code's — to the others.
pub const EDGE_REPORT_ROWS_PER_HOLDER_PER_SEC: f64 = 10.0;

/// And at once.
pub const EDGE_REPORT_ROWS_PER_HOLDER_BURST: f64 = 100.0;

/// Rows a second, on average, for the sidecar's own refusals of each token holder
/// (a route's role, the data plane's refusals): a quarter of
/// [`REFUSAL_ROWS_PER_SEC`].
pub const HOLDER_REFUSAL_ROWS_PER_SEC: f64 = 5.0;

/// And at once.
pub const HOLDER_REFUSAL_ROWS_BURST: f64 = 50.0;

/// Token holders whose buckets a budget keeps at once. Beyond, the buckets of
/// holders idle long enough to be full again are dropped (a fresh one is the
/// same); a new holder finding none to drop gets no row of its own (counted, and
/// summed as every refusal beyond a budget).
const MAX_HOLDERS: usize = 4096;

/// The ledger's budget for refusals anyone can cause without limit: of callers
/// that are not the edge (anyone who reaches the port), and of requests the edge
/// refused and reports (anyone who reaches Envoy, with no token at all). Each
/// could otherwise make the node write (and fsync, and ship) a row per request
/// without end. A row takes from the budget of all codes and from its code's
/// own, so one code's flood cannot take every row (a refused signed command keeps
/// its row through a flood of `jwt_missing`), and codes taken in turn cannot
/// pass the whole. A budget for token holders ([`Self::per_holder`]) also keeps a
/// bucket per holder, smaller than the others, so that one holder's flood leaves
/// rows to the rest. Within the budget each refusal has its row; beyond it a
/// refusal is answered all the same, counted
/// (`gw_sidecar_refusals_unrecorded_total{code}`), and summed in one row of the
/// budget's stage (`args_json` `{"unrecorded": n}`): before the next recorded
/// refusal of its code, or by [`flush_unrecorded`] within a second once the
/// budget has room again.
pub struct RefusalBudget {
    state: parking_lot::Mutex<BudgetState>,
    stage: Stage,
    /// Rows a second and at once, of all codes.
    total: (f64, f64),
    /// The same, of each code.
    per_code: (f64, f64),
    /// The same, of each token holder (`None`: not counted by holder).
    holder_rate: Option<(f64, f64)>,
}

/// A token holder, as a budget tells them apart: the token's issuer and subject.
type Holder = (String, String);

/// Rows a budget may write now, as of when.
#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: std::time::Instant,
}

impl Bucket {
    fn full(burst: f64) -> Bucket {
        Bucket {
            tokens: burst,
            at: std::time::Instant::now(),
        }
    }

    /// Refilled for the time since it was last looked at.
    fn refill(&mut self, (per_sec, burst): (f64, f64), now: std::time::Instant) {
        let refill = now.duration_since(self.at).as_secs_f64() * per_sec;
        self.tokens = (self.tokens + refill).min(burst);
        self.at = now;
    }
}

struct BudgetState {
    total: Bucket,
    codes: std::collections::BTreeMap<Code, Bucket>,
    /// Refusals not recorded since the last row of their code.
    unrecorded: std::collections::BTreeMap<Code, u64>,
    /// Of each token holder, when the budget counts them ([`MAX_HOLDERS`]).
    holders: std::collections::HashMap<Holder, Bucket>,
}

impl Default for RefusalBudget {
    fn default() -> Self {
        let b = (REFUSAL_ROWS_PER_SEC, REFUSAL_ROWS_BURST);
        RefusalBudget::new(Stage::Sidecar, b, b)
    }
}

impl RefusalBudget {
    /// `total` (rows a second on average, at once) of all codes, `per_code` of
    /// each; sums are rows of `stage`.
    pub fn new(stage: Stage, total: (f64, f64), per_code: (f64, f64)) -> RefusalBudget {
        RefusalBudget {
            state: parking_lot::Mutex::new(BudgetState {
                total: Bucket::full(total.1),
                codes: Default::default(),
                unrecorded: Default::default(),
                holders: Default::default(),
            }),
            stage,
            total,
            per_code,
            holder_rate: None,
        }
    }

    /// The same budget, which also gives each token holder `rate` (rows a second
    /// on average, at once) of its own: a holder past it gets no row, whatever
    /// the rest of the budget holds.
    pub fn per_holder(mut self, rate: (f64, f64)) -> RefusalBudget {
        self.holder_rate = Some(rate);
        self
    }

    /// The budget of the sidecar's refusals of token holders ([`Gatekeeper::holders`]).
    pub fn holders() -> RefusalBudget {
        RefusalBudget::default()
            .per_holder((HOLDER_REFUSAL_ROWS_PER_SEC, HOLDER_REFUSAL_ROWS_BURST))
    }

    /// A budget for the refusals the edge reports ([`EdgeBudgets`]).
    fn edge_reports() -> RefusalBudget {
        RefusalBudget::new(
            Stage::Edge,
            (EDGE_REPORT_ROWS_PER_SEC, EDGE_REPORT_ROWS_BURST),
            (
                EDGE_REPORT_ROWS_PER_CODE_PER_SEC,
                EDGE_REPORT_ROWS_PER_CODE_BURST,
            ),
        )
    }

    /// The stage its sums are rows of.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// Takes `n` rows for `code` from the buckets of all codes and of `code`,
    /// and one from `holder`'s (a sum is no holder's), if each has them.
    fn spend(&self, s: &mut BudgetState, code: Code, n: f64, holder: Option<Holder>) -> bool {
        let now = std::time::Instant::now();
        s.total.refill(self.total, now);
        let own = s
            .codes
            .entry(code)
            .or_insert_with(|| Bucket::full(self.per_code.1));
        own.refill(self.per_code, now);
        if own.tokens < n || s.total.tokens < n {
            return false;
        }
        if let (Some(rate), Some(holder)) = (self.holder_rate, holder) {
            if s.holders.len() >= MAX_HOLDERS && !s.holders.contains_key(&holder) {
                // Buckets full again are as good as new ones.
                s.holders.retain(|_, b| {
                    b.refill(rate, now);
                    b.tokens < rate.1
                });
                if s.holders.len() >= MAX_HOLDERS {
                    return false;
                }
            }
            let theirs = s
                .holders
                .entry(holder)
                .or_insert_with(|| Bucket::full(rate.1));
            theirs.refill(rate, now);
            if theirs.tokens < 1.0 {
                return false;
            }
            theirs.tokens -= 1.0;
        }
        own.tokens -= n;
        s.total.tokens -= n;
        true
    }

    /// A row for a refusal with `code` of `who` (`None`: no token) now: `Some(n)`
    /// — it may be written, after one summing the `n` of its code that were not
    /// (0: none) — or `None`: over the budget, counted as not recorded.
    pub fn take(&self, code: Code, who: Option<&gw_core::contract::Requester>) -> Option<u64> {
        // (A requester with roles alone is one holder, as in `EdgeBudgets::of`.)
        let holder = self
            .holder_rate
            .and(who)
            .filter(|w| **w != gw_core::contract::Requester::default())
            .map(gw_core::contract::Requester::holder);
        let mut s = self.state.lock();
        // The summary takes a row of the budget too.
        let owed = s.unrecorded.get(&code).copied().unwrap_or(0);
        let need = if owed > 0 { 2.0 } else { 1.0 };
        if self.spend(&mut s, code, need, holder) {
            s.unrecorded.remove(&code);
            return Some(owed);
        }
        *s.unrecorded.entry(code).or_default() += 1;
        None
    }

    /// What [`Self::take`] gave for a refusal whose rows were not written after
    /// all: the refusal, and the `owed` its sum held, are owed again.
    pub fn untake(&self, code: Code, owed: u64) {
        self.owe(code, owed + 1);
    }

    /// The sums owed that the budget has room for now (a row each), taken.
    fn take_owed(&self) -> Vec<(Code, u64)> {
        let mut s = self.state.lock();
        let owed: Vec<Code> = s.unrecorded.keys().copied().collect();
        let mut out = Vec::new();
        for code in owed {
            if self.spend(&mut s, code, 1.0, None) {
                if let Some(n) = s.unrecorded.remove(&code) {
                    out.push((code, n));
                }
            }
        }
        out
    }

    /// Every sum owed, taken whatever the budget (a stop writes them).
    fn take_all_owed(&self) -> Vec<(Code, u64)> {
        std::mem::take(&mut self.state.lock().unrecorded)
            .into_iter()
            .collect()
    }

    /// A row summing refusals of `code` that were never recorded one by one
    /// (the edge could not queue them): `Some(owed)` when the budget has room
    /// for it (the row carries `owed` more, taken), else `None` and nothing
    /// changes (the caller owes its sum once it is sure it will not come
    /// again: [`Self::owe`]).
    pub fn take_sum(&self, code: Code) -> Option<u64> {
        let mut s = self.state.lock();
        let owed = s.unrecorded.get(&code).copied().unwrap_or(0);
        if self.spend(&mut s, code, 1.0, None) {
            s.unrecorded.remove(&code);
            return Some(owed);
        }
        None
    }

    /// `n` refusals with `code` whose rows were not written after all (a summary
    /// row, or the sum a refused batch's row carried): owed again.
    pub fn owe(&self, code: Code, n: u64) {
        if n == 0 {
            return;
        }
        let mut s = self.state.lock();
        let owed = s.unrecorded.entry(code).or_default();
        *owed = owed.saturating_add(n);
    }

    /// A refusal [`Self::take`] counted as not recorded that will come again
    /// after all: no longer owed.
    pub fn forgive(&self, code: Code) {
        let mut s = self.state.lock();
        if let Some(n) = s.unrecorded.get_mut(&code) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.unrecorded.remove(&code);
            }
        }
    }
}

/// Lets only the edge (or, in development, plain HTTP on loopback) through; anyone
/// else is answered 401 (no certificate) or 403 (another certificate), each refusal
/// a ledger row — or, beyond the [`RefusalBudget`], counted in one.
pub async fn edge_only(State(g): State<Gatekeeper>, req: Request, next: Next) -> Response {
    let (code, detail) = match req.extensions().get::<Peer>() {
        Some(Peer::Edge(_) | Peer::Plaintext) => return next.run(req).await,
        Some(Peer::Other) => (
            Code::ForbiddenPeer,
            "only the edge (Envoy's client certificate) may call the sidecar",
        ),
        Some(Peer::Anonymous) | None => (
            Code::Unauthenticated,
            "the sidecar takes requests from the edge only: present its client certificate",
        ),
    };
    refuse_within(&g, &g.budget, code, detail, None, req).await
}

/// The ops listener under `ops_tls`: lets through callers with a client
/// certificate from the sidecar's client CA (the edge's, or another: a metrics
/// scraper's) and plain HTTP on loopback; one without a certificate is answered
/// 401, its refusal a ledger row within the budget of callers other than the edge.
pub async fn certified_only(State(g): State<Gatekeeper>, req: Request, next: Next) -> Response {
    match req.extensions().get::<Peer>() {
        Some(Peer::Edge(_) | Peer::Other | Peer::Plaintext) => next.run(req).await,
        Some(Peer::Anonymous) | None => {
            let detail = "present a client certificate from the sidecar's client CA";
            refuse_within(&g, &g.budget, Code::Unauthenticated, detail, None, req).await
        }
    }
}

/// The most seals of the edge the sidecar remembers at once (each while it is
/// timely: about 61 s after it was made, longer when the edge's clock runs
/// ahead): about 17 000 sealed requests a second, held steadily. Beyond it the
/// edge's requests are refused 429 `overloaded` until older seals go stale.
/// About 40 MB at most.
pub const MAX_SEEN_SEALS: usize = 1 << 20;

/// How long after its start the sidecar refuses seals made before it (by its
/// monotonic clock): by then every one of them is stale, and a wall clock
/// stepped back after the start must not refuse new ones.
const BEFORE_START_WINDOW: std::time::Duration =
    std::time::Duration::from_secs(2 * gw_core::edge_stamp::VALID_SECS);

/// What the sidecar checks the edge's seals with: the edge key, the one before
/// it while a change goes through (Envoy's filters moved to the new key one by
/// one; a seal verifies under either), and the seals already believed.
pub struct EdgeSeals {
    /// `GW_EDGE_KEY_HEX`.
    pub current: gw_core::edge_stamp::EdgeKey,
    /// `GW_EDGE_KEY_PREV_HEX`.
    pub previous: Option<gw_core::edge_stamp::EdgeKey>,
    /// The seals believed and still within their window (the lock is held for
    /// one hash-set look-up and insert).
    seen: std::sync::Mutex<gw_core::edge_stamp::Seen>,
    /// When this process started checking seals.
    started: std::time::Instant,
}

impl EdgeSeals {
    /// Checks seals under `current` (and `previous`); refuses those made before
    /// `since` (unix seconds: this process's start), for its first two minutes.
    pub fn new(
        current: gw_core::edge_stamp::EdgeKey,
        previous: Option<gw_core::edge_stamp::EdgeKey>,
        since: u64,
    ) -> EdgeSeals {
        EdgeSeals {
            current,
            previous,
            seen: std::sync::Mutex::new(gw_core::edge_stamp::Seen::new(since, MAX_SEEN_SEALS)),
            started: std::time::Instant::now(),
        }
    }

    /// `check` under the current key, then (for a MAC that does not verify)
    /// under the previous one; a seal that verifies is believed at `now` if this
    /// is its first use.
    fn believe(
        &self,
        now: u64,
        check: impl Fn(
            &gw_core::edge_stamp::EdgeKey,
        ) -> Result<gw_core::edge_stamp::Sealed, gw_core::edge_stamp::StampError>,
    ) -> Result<(), gw_core::edge_stamp::StampError> {
        let sealed = match (check(&self.current), &self.previous) {
            (Err(gw_core::edge_stamp::StampError::Mismatch), Some(previous)) => check(previous),
            (verdict, _) => verdict,
        }?;
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.started.elapsed() > BEFORE_START_WINDOW {
            seen.forget_start();
        }
        seen.first_use(sealed, now)
    }
}

/// Largest body of a batch of edge reports the seal is checked over (the filter
/// sends at most half of it).
pub const MAX_SEALED_REPORT_BYTES: usize = 2 * gw_core::contract::MAX_REPORT_BATCH_BYTES;

/// How long a batch of edge reports may take to arrive whole.
const REPORT_BODY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Believes the edge's stamp only under its seal (after [`edge_only`]; see
/// [`gw_core::edge_stamp`]). A request carrying any `x-gw-*` header is refused 401
/// `edge_stamp_invalid` unless its seal verifies under the edge key over the
/// stamped headers, the method and the path, is at most
/// [`gw_core::edge_stamp::VALID_SECS`] from this clock, was not used before, and
/// each stamped header comes once; its row names no one (the identity it claims
/// is not believed), within the budget of callers that are not the edge. A seal
/// made before this process's start second is refused 503 `unavailable` (sent
/// again, it is sealed anew); with no room left to remember seals
/// ([`MAX_SEEN_SEALS`]), 429 `overloaded`. A request with no `x-gw-*` header goes
/// on unstamped (a route that needs a token refuses it). A batch of edge reports
/// must carry the seal over its body, and nothing else of the edge's.
pub async fn edge_stamp(State(g): State<Gatekeeper>, req: Request, next: Next) -> Response {
    use gw_core::contract::headers;
    use gw_core::edge_stamp::{timely, StampError};
    let now = crate::now_secs();
    let report = req.uri().path() == gw_core::contract::EDGE_DECISIONS_PATH;
    let h = req.headers();
    let reserved = |k: &axum::http::HeaderName| headers::is_reserved(k.as_str());
    if !report && !h.keys().any(reserved) {
        return next.run(req).await;
    }
    let get = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
    let seal = get(headers::STAMP).map(str::to_owned);
    let checked = if headers::STAMPED
        .iter()
        .chain([&headers::STAMP])
        .any(|name| h.get_all(*name).iter().nth(1).is_some())
    {
        Err(StampError::Duplicate)
    } else if report {
        if h.keys().any(|k| reserved(k) && k != headers::STAMP) {
            Err(StampError::Stray)
        } else {
            // Shape and time first: an unsealed batch is not read.
            timely(seal.as_deref(), now)
        }
    } else {
        let target = gw_core::edge_stamp::Target {
            method: req.method().as_str(),
            path: req.uri().path(),
        };
        g.edge_seals
            .believe(now, |k| k.check(seal.as_deref(), now, target, get))
    };
    match checked {
        Err(e) => refuse_unsealed(&g, e, req).await,
        Ok(()) if !report => next.run(req).await,
        Ok(()) => {
            let (parts, body) = req.into_parts();
            let body = match body_within(body, MAX_SEALED_REPORT_BYTES).await {
                Ok(body) => body,
                Err((code, detail)) => {
                    let req = Request::from_parts(parts, Body::empty());
                    return refuse_within(&g, &g.budget, code, detail, None, req).await;
                }
            };
            // The clock again: the body may have taken a while.
            let now = crate::now_secs();
            let checked = g
                .edge_seals
                .believe(now, |k| k.check_report(seal.as_deref(), now, &body));
            let req = Request::from_parts(parts, Body::from(body));
            match checked {
                Ok(()) => next.run(req).await,
                Err(e) => refuse_unsealed(&g, e, req).await,
            }
        }
    }
}

/// Refuses `req`, whose stamp or report batch the edge did not seal (`why`).
async fn refuse_unsealed(
    g: &Gatekeeper,
    why: gw_core::edge_stamp::StampError,
    req: Request,
) -> Response {
    let detail = format!("the edge's stamp is not believed: {why}");
    let code = match why {
        gw_core::edge_stamp::StampError::NoRoom => Code::Overloaded,
        // Sent again, it gets a seal this sidecar believes.
        gw_core::edge_stamp::StampError::BeforeStart => Code::Unavailable,
        _ => Code::EdgeStampInvalid,
    };
    refuse_within(g, &g.budget, code, detail, None, req).await
}

/// The whole of `body`, at most `max` bytes, arrived within [`REPORT_BODY_WAIT`];
/// else the code and detail to refuse it with.
async fn body_within(body: Body, max: usize) -> Result<bytes::Bytes, (Code, String)> {
    use futures_util::StreamExt as _;
    let mut out = Vec::new();
    let mut data = body.into_data_stream();
    let read = tokio::time::timeout(REPORT_BODY_WAIT, async {
        while let Some(chunk) = data.next().await {
            let chunk = chunk.map_err(|e| {
                (
                    Code::Malformed,
                    format!("the body did not arrive whole: {e}"),
                )
            })?;
            if out.len() + chunk.len() > max {
                return Err((
                    Code::TooLarge,
                    format!("a batch of edge reports is at most {max} bytes"),
                ));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(())
    })
    .await;
    match read {
        Ok(Ok(())) => Ok(out.into()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err((
            Code::Malformed,
            format!(
                "the body did not arrive within {} s",
                REPORT_BODY_WAIT.as_secs()
            ),
        )),
    }
}

/// Answers `req` with `code`: with its row (naming `who`) when `budget` has room
/// for it — after the row summing the refusals of its code that had none — else
/// at once, its body unread, counted, and summed later ([`flush_unrecorded`]).
/// A row the ledger does not take (a failing journal) is owed and summed the
/// same way; the answer stands.
async fn refuse_within(
    g: &Gatekeeper,
    budget: &RefusalBudget,
    code: Code,
    detail: impl Into<std::borrow::Cow<'static, str>>,
    who: Option<gw_core::contract::Requester>,
    req: Request,
) -> Response {
    let detail = detail.into();
    let unrecorded = |detail| {
        g.metrics.decision(code.as_str());
        g.metrics.unrecorded(code.as_str());
        ApiError::with(code, detail).into_response()
    };
    let Some(owed) = budget.take(code, who.as_ref()) else {
        return unrecorded(detail);
    };
    if matches!(
        code,
        Code::Unauthenticated | Code::ForbiddenPeer | Code::EdgeStampInvalid
    ) {
        tracing::warn!(path = %req.uri().path(), code = %code, "refused a caller that is not the edge");
    }
    if owed > 0 {
        if let Err(e) = write_sum(g, budget, code, owed).await {
            // Owed again, this one with them.
            tracing::warn!(error = %e, "the sum of unrecorded refusals was not written");
            budget.owe(code, 1);
            return unrecorded(detail);
        }
    }
    match refuse_as(g, code, detail.clone(), who, req).await {
        Ok(answer) => answer,
        // Its row was not written after all: owed, and summed once it can be,
        // under the code the caller is answered with (a refusal of this kind
        // stands without its row; a command's, which a resend settles, does not).
        Err(_) => {
            budget.owe(code, 1);
            g.metrics.unrecorded(code.as_str());
            ApiError::with(code, detail).into_response()
        }
    }
}

/// Checks the role an API route needs ([`Gatekeeper::routes`], the filter's
/// `routes` again) in the identity the edge stamped, after [`edge_only`]: a
/// request with no verified token is 401 `jwt_missing`, one whose roles fall
/// short 403 `forbidden_role`, each with its ledger row (within the budgets).
/// The control routes are left to their own checks (`command_role`, the
/// command's signature); paths outside `/api/` are the console's public assets or
/// answered 404.
pub async fn api_roles(State(g): State<Gatekeeper>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let control = path == gw_core::contract::COMMAND_PATH
        || path.starts_with(gw_core::contract::MODULE_ROUTE_PREFIX);
    if control || !path.starts_with("/api/") {
        return next.run(req).await;
    }
    let need = match g.routes.rule_for(path) {
        Some(r) if r.public => return next.run(req).await,
        Some(r) => r.role.clone(),
        None => None,
    };
    let (code, detail, who) = match (need, edge_requester(&req)) {
        (None, who) => (
            Code::ForbiddenRole,
            "no access rule covers this path (routes)".to_owned(),
            who,
        ),
        (Some(_), None) => (
            Code::JwtMissing,
            "this route needs a token verified by the edge".to_owned(),
            None,
        ),
        (Some(role), Some(who)) => {
            let roles: Vec<&str> = who.roles.split(',').map(str::trim).collect();
            if gw_core::roles::satisfies(&roles, &role) {
                return next.run(req).await;
            }
            (
                Code::ForbiddenRole,
                format!("this route needs role `{role}`"),
                Some(who),
            )
        }
    };
    refuse_within(&g, g.forwarded(who.as_ref()), code, detail, who, req).await
}

/// Records a refusal answered without its request (the realtime stream's, after
/// the upgrade was taken apart): its row — the route and who asked — within the
/// budget of requests the edge forwarded (with a token or without), else
/// counted and summed later; counted as a decision of its code either way.
/// `Err`: the ledger refused the row (owed, and summed once it takes rows; the
/// caller's answer stands).
pub async fn record_refusal(
    g: &Gatekeeper,
    code: Code,
    who: Option<&gw_core::contract::Requester>,
    route: &str,
) -> Result<(), crate::ledger::AuditError> {
    g.metrics.decision(code.as_str());
    record_refusal_of(g, code, who, route, &[])
        .await
        .inspect_err(|_| g.metrics.unrecorded(code.as_str()))
}

/// [`record_refusal`], the row keeping `body` (what of the request was read).
async fn record_refusal_of(
    g: &Gatekeeper,
    code: Code,
    who: Option<&gw_core::contract::Requester>,
    route: &str,
    body: &[u8],
) -> Result<(), crate::ledger::AuditError> {
    let budget = g.forwarded(who);
    let unrecorded = || {
        g.metrics.unrecorded(code.as_str());
        Ok(())
    };
    let Some(owed) = budget.take(code, who) else {
        return unrecorded();
    };
    if owed > 0 && write_sum(g, budget, code, owed).await.is_err() {
        budget.owe(code, 1);
        return unrecorded();
    }
    g.auditor
        .refusal(code, body, who, route)
        .await
        .inspect_err(|_| budget.owe(code, 1))
}

/// Records the refusals of the routes that answer them as any other error and
/// write no row themselves — the ledger's reads, the models' scoring: each
/// answer of a 4xx [`ApiError`] ([`Answered`]) gets its row before it is sent,
/// naming who the edge said sent the request and keeping what of its body the
/// route read (at most [`REFUSED_BODY_BYTES`]), within the budget of requests
/// the edge forwarded (beyond it, counted and summed). The answer stands when
/// the row cannot be written (owed, and summed once the ledger takes rows).
/// The sidecar's own failures and limits (5xx: ClickHouse not answering, no
/// ledger configured; 429 `overloaded`: another verification walking the
/// ledger) are no refusal of the caller's request, and write no row.
pub async fn record_refusals_of_reads(
    State(g): State<Gatekeeper>,
    req: Request,
    next: Next,
) -> Response {
    use futures_util::StreamExt as _;
    let who = edge_requester(&req);
    let route = gw_core::contract::report_route(
        req.uri()
            .path_and_query()
            .map_or(req.uri().path(), |p| p.as_str()),
    );
    // What the route reads of the body, copied as it passes (up to the bound).
    let read = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let req = req.map(|body| {
        let read = read.clone();
        Body::from_stream(body.into_data_stream().inspect(move |chunk| {
            if let Ok(chunk) = chunk {
                keep_prefix(&mut read.lock(), chunk, REFUSED_BODY_BYTES);
            }
        }))
    });
    let answer = next.run(req).await;
    let Some(&Answered(code)) = answer.extensions().get() else {
        return answer;
    };
    // The sidecar's own limits are no refusal of what the caller asked.
    if !answer.status().is_client_error() || code == Code::Overloaded {
        return answer;
    }
    let body = std::mem::take(&mut *read.lock());
    g.metrics.decision(code.as_str());
    // On a task of its own: a caller that hangs up does not take the row along.
    let recorded = tokio::spawn(async move {
        record_refusal_of(&g, code, who.as_ref(), &route, &body)
            .await
            .inspect_err(|_| g.metrics.unrecorded(code.as_str()))
    })
    .await;
    match recorded {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, code = %code, "a refusal's row was not written; it is summed once the ledger takes rows");
        }
        Err(e) => tracing::error!(error = %e, "recording a refusal failed"),
    }
    answer
}

/// A refusal a route answered in its own shape (the data plane's: JSON-RPC
/// errors, the hot path's counts), to record: its code, what its row keeps of
/// the request, and what the row says of it (`args_json`).
#[derive(Debug)]
pub struct Refusal {
    /// The stable code.
    pub code: Code,
    /// What of the request the row keeps (`raw_hex`).
    pub raw: bytes::Bytes,
    /// The row's `args_json`.
    pub note: serde_json::Value,
}

/// Records `refusals` on `route` of requests that came `via`, all asked by `who`
/// (the edge's stamp, or an identity the sidecar verified): each within the
/// budget of such requests naming `who` (`Gatekeeper::budget_of`) — beyond it,
/// counted and summed later — in one journal transaction, on a task of its own
/// (a client that hangs up does not take the rows with it). Returns once they
/// are durable. The answer stands either way: rows the ledger refused are owed,
/// and summed once it takes rows again (logged).
pub async fn record_refusals(
    g: &Gatekeeper,
    via: Via,
    who: Option<gw_core::contract::Requester>,
    route: &'static str,
    refusals: Vec<Refusal>,
) {
    if refusals.is_empty() {
        return;
    }
    let g = g.clone();
    let recorded = tokio::spawn(async move {
        let budget = g.budget_of(via, who.as_ref());
        let mut rows = Vec::with_capacity(refusals.len());
        let mut taken = Vec::new();
        for r in &refusals {
            g.metrics.decision(r.code.as_str());
            let Some(owed) = budget.take(r.code, who.as_ref()) else {
                g.metrics.unrecorded(r.code.as_str());
                continue;
            };
            taken.push((r.code, owed));
            if owed > 0 {
                rows.extend(g.auditor.unrecorded_row(budget.stage(), r.code, owed));
            }
            rows.extend(g.auditor.refusal_row(r.code, &r.raw, who.as_ref(), route, &r.note));
        }
        if let Err(e) = g.auditor.commit(rows).await {
            tracing::warn!(error = %e, route, "the rows of refusals were not written; they are summed once the ledger takes rows");
            for (code, owed) in taken {
                budget.untake(code, owed);
                g.metrics.unrecorded(code.as_str());
            }
        }
    })
    .await;
    if let Err(e) = recorded {
        tracing::error!(error = %e, route, "recording refusals failed");
    }
}

/// Refusals of requests that came `via` whose rows were never asked for (a
/// queue of them was full): counted as beyond the budget, and summed.
pub fn unrecorded(g: &Gatekeeper, via: Via, code: Code, n: u64) {
    g.budget_of(via, None).owe(code, n);
    g.metrics.decisions(code.as_str(), n);
    g.metrics.unrecorded_n(code.as_str(), n);
}

/// Writes the sums of refusals that went beyond the budget ([`RefusalBudget`]) once
/// it has room, within a second, when no later refusal of their code did: a flood
/// that stops is summed all the same. Runs for as long as the sidecar does.
pub async fn flush_unrecorded(g: Gatekeeper) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_err = String::new();
    loop {
        tick.tick().await;
        for budget in g.budgets() {
            for (code, n) in budget.take_owed() {
                match write_sum(&g, budget, code, n).await {
                    Ok(()) => last_err.clear(),
                    // Said once while it lasts (the journal refusing commits).
                    Err(e) if e != last_err => {
                        tracing::warn!(error = %e, "the sum of unrecorded refusals was not written; retried every second");
                        last_err = e;
                    }
                    Err(_) => {}
                }
            }
        }
    }
}

/// Writes every sum still owed, whatever the budget: at a stop.
pub async fn flush_all_unrecorded(g: &Gatekeeper) {
    for budget in g.budgets() {
        for (code, n) in budget.take_all_owed() {
            if let Err(e) = write_sum(g, budget, code, n).await {
                tracing::warn!(error = %e, refusals = n, "the sum of unrecorded refusals was not written at the stop");
            }
        }
    }
}

/// One sum's row; owed again when it is not written.
async fn write_sum(
    g: &Gatekeeper,
    budget: &RefusalBudget,
    code: Code,
    n: u64,
) -> Result<(), String> {
    tracing::warn!(code = %code, stage = budget.stage().as_str(), refusals = n, "refusals went beyond the ledger's budget: one row sums them");
    g.auditor
        .unrecorded(budget.stage(), code, n)
        .await
        .map_err(|e| {
            budget.owe(code, n);
            e.to_string()
        })
}

/// Any path the sidecar does not serve (after [`edge_only`]): 404 `not_found`, with
/// its ledger row like every refusal.
pub async fn not_found(State(g): State<Gatekeeper>, req: Request) -> Response {
    refuse_forwarded(&g, Code::NotFound, "the sidecar has no such route", req).await
}

/// A path the sidecar serves, with a method it does not serve there (after
/// [`edge_only`]): 405 `method_not_allowed`, with its ledger row like every
/// refusal (axum's own 405 wrote none).
pub async fn method_not_allowed(g: Gatekeeper, req: Request) -> Response {
    let detail = "the sidecar serves this path with other methods";
    refuse_forwarded(&g, Code::MethodNotAllowed, detail, req).await
}

/// Refuses a request the edge forwarded, its row naming who the edge said sent
/// it, within that budget.
async fn refuse_forwarded(
    g: &Gatekeeper,
    code: Code,
    detail: &'static str,
    req: Request,
) -> Response {
    let who = edge_requester(&req);
    refuse_within(g, g.forwarded(who.as_ref()), code, detail, who, req).await
}

/// What the edge stamped on a request it forwarded (after [`edge_only`], the
/// stamp is the edge's), if anything.
pub fn edge_identity(headers: &axum::http::HeaderMap) -> Option<gw_core::contract::EdgeIdentity> {
    gw_core::contract::EdgeIdentity::from_headers(|k| headers.get(k).and_then(|v| v.to_str().ok()))
}

/// Who the edge says sent `req`.
fn edge_requester(req: &Request) -> Option<gw_core::contract::Requester> {
    edge_identity(req.headers()).map(|w| w.requester)
}

/// How long a refused caller's body is waited for; its row is then written with
/// what arrived in time.
const REFUSED_BODY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The first `max` bytes of `body`, or what of them arrived within `wait` (a body
/// cut off, or longer, still leaves its start).
async fn body_prefix(body: Body, max: usize, wait: std::time::Duration) -> Vec<u8> {
    use futures_util::StreamExt as _;
    let mut out = Vec::new();
    let mut data = body.into_data_stream();
    let _ = tokio::time::timeout(wait, async {
        while out.len() < max {
            match data.next().await {
                Some(Ok(chunk)) => keep_prefix(&mut out, &chunk, max),
                _ => break,
            }
        }
    })
    .await;
    out
}

/// Adds to `out` what of `chunk` keeps it within `max` bytes.
fn keep_prefix(out: &mut Vec<u8>, chunk: &[u8], max: usize) {
    let take = chunk.len().min(max.saturating_sub(out.len()));
    out.extend_from_slice(&chunk[..take]);
}

/// Answers `req` with `code`, after its row (the route and up to
/// [`REFUSED_BODY_BYTES`] of its body) is durable. The body is read and the row
/// written on a task of its own, the read bounded by [`REFUSED_BODY_WAIT`]: a caller
/// that hangs up mid-body, or trickles it, neither keeps its refusal out of the
/// ledger nor holds the answer.
///
/// The row names `requester` when the edge verified a token. `Err`: the row was
/// not written (the answer says why).
async fn refuse_as(
    g: &Gatekeeper,
    code: Code,
    detail: impl Into<std::borrow::Cow<'static, str>>,
    requester: Option<gw_core::contract::Requester>,
    req: Request,
) -> Result<Response, Response> {
    let g = g.clone();
    let recorded = tokio::spawn(async move {
        let path = req
            .uri()
            .path_and_query()
            .map_or(req.uri().path(), |p| p.as_str())
            .to_owned();
        let body = body_prefix(req.into_body(), REFUSED_BODY_BYTES, REFUSED_BODY_WAIT).await;
        g.metrics.decision(code.as_str());
        let route = gw_core::contract::report_route(&path);
        g.auditor
            .refusal(code, &body, requester.as_ref(), &route)
            .await
    })
    .await;
    match recorded {
        Ok(Ok(())) => Ok(ApiError::with(code, detail).into_response()),
        Ok(Err(e)) => Err(ApiError::from(e).into_response()),
        Err(e) => Err(
            ApiError::with(Code::Unavailable, format!("refusal not recorded: {e}")).into_response(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gw_core::contract::Requester;

    fn holder(sub: &str) -> Requester {
        Requester {
            sub: sub.into(),
            token_issuer: "tests".into(),
            ..Requester::default()
        }
    }

    /// Rows `who` gets of `n` refusals with `code`, taken at once.
    fn rows(b: &RefusalBudget, code: Code, who: Option<&Requester>, n: usize) -> usize {
        (0..n).filter(|_| b.take(code, who).is_some()).count()
    }

    #[test]
    fn one_holders_flood_leaves_rows_to_the_others() {
        let b = RefusalBudget::holders();
        let burst = HOLDER_REFUSAL_ROWS_BURST as usize;
        let mallory = holder("mallory");
        // Its own burst and hardly more (refill while the loop runs).
        let got = rows(&b, Code::Malformed, Some(&mallory), 1000);
        assert!((burst..burst + 3).contains(&got), "{got}");
        // Another holder, the same code: its row, after the flood's sum.
        assert_eq!(
            b.take(Code::Malformed, Some(&holder("alice"))),
            Some(1000 - got as u64)
        );
        // The same subject from another issuer is another holder.
        let other = Requester {
            token_issuer: "elsewhere".into(),
            ..mallory.clone()
        };
        assert_eq!(b.take(Code::Malformed, Some(&other)), Some(0));
    }

    #[test]
    fn a_budget_without_holders_counts_every_holder_as_one() {
        let b = RefusalBudget::default();
        let burst = REFUSAL_ROWS_BURST as usize;
        let got = rows(&b, Code::Malformed, Some(&holder("mallory")), 1000);
        assert!((burst..burst + 3).contains(&got), "{got}");
        assert_eq!(b.take(Code::Malformed, Some(&holder("alice"))), None);
    }

    #[test]
    fn holders_take_from_the_budget_of_their_code_and_of_all() {
        let b = RefusalBudget::holders();
        let per_holder = HOLDER_REFUSAL_ROWS_BURST as usize;
        // Enough holders, each within its own bucket, spend the code's bucket.
        let taken: usize = (0..10)
            .map(|i| {
                rows(
                    &b,
                    Code::Malformed,
                    Some(&holder(&format!("h{i}"))),
                    per_holder,
                )
            })
            .sum();
        let burst = REFUSAL_ROWS_BURST as usize;
        assert!((burst..burst + 3).contains(&taken), "{taken}");
        assert_eq!(b.take(Code::Malformed, Some(&holder("late"))), None);
    }

    #[test]
    fn idle_holders_buckets_make_room_for_new_ones() {
        let b = RefusalBudget::new(Stage::Sidecar, (1e9, 1e9), (1e9, 1e9)).per_holder((1e9, 1.0));
        for i in 0..MAX_HOLDERS {
            assert!(b
                .take(Code::Malformed, Some(&holder(&format!("h{i}"))))
                .is_some());
        }
        // Every bucket refills at once at this rate: a new holder finds room.
        assert!(b.take(Code::Malformed, Some(&holder("new"))).is_some());
        assert!(b.state.lock().holders.len() <= MAX_HOLDERS);
        // Held buckets (empty, refilling slowly) are kept: a new holder has none.
        let b = RefusalBudget::new(Stage::Sidecar, (1e9, 1e9), (1e9, 1e9)).per_holder((1e-9, 1.0));
        for i in 0..MAX_HOLDERS {
            assert!(b
                .take(Code::Malformed, Some(&holder(&format!("h{i}"))))
                .is_some());
        }
        assert_eq!(b.take(Code::Malformed, Some(&holder("new"))), None);
        assert_eq!(
            b.take(Code::Malformed, None),
            Some(1),
            "no token: no holder's bucket"
        );
    }
}
