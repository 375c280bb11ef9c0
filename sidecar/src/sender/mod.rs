//! The transaction sender (the sidecar's data plane): two routes to the leader —
//! QUIC straight to its TPU ([`tpu`]) and a block-engine relay ([`relay`]) — raced
//! by the pure hedging state machine in [`hedge`]: send on the preferred
//! route, and on the other one too if the first fails or has not confirmed within
//! `hedge_delay`. Per-route statistics pick the preferred route. Every send is
//! audited ([`audit`]). The hot path from opportunities to sends is in [`strategy`].

pub mod audit;
pub mod cc;
pub mod hedge;
pub mod http;
pub mod ingest;
pub mod landing;
pub mod leaders;
pub mod metrics;
pub mod plane;
pub mod relay;
pub mod rpc;
pub mod strategy;
pub mod tls;
pub mod tpu;
pub mod upstream;
pub use gw_core::txwire;

use crate::config::OutOfBounds;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gw_core::contract::Requester;
use serde::Deserialize;
use std::future::Future as _;
use std::task::Poll;

use audit::{SendAudit, SendRow};
use hedge::{Action, Event, Hedge, Route, RouteStats};
use leaders::{LeaderSource, LeadersConfig};
use relay::{RelayClient, RelayConfig, RelayError};
use tpu::{TpuClient, TpuConfig};

/// A secret from the configuration file (a key as hex): its `Debug` says only that
/// it is set.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<set>")
    }
}

/// `sender` in the sidecar configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SenderConfig {
    /// The TPU route (off without it).
    #[serde(default)]
    pub tpu: Option<TpuConfig>,
    /// The relay route (off without it).
    #[serde(default)]
    pub relay: Option<RelayConfig>,
    /// Where the leaders come from (needed by the TPU route).
    #[serde(default)]
    pub leaders: Option<LeadersConfig>,
    /// Identity key of the TPU client certificate, 32-byte seed as hex (also
    /// `GW_TPU_IDENTITY_HEX`); a fresh key each start without it (unstaked anyway).
    #[serde(default)]
    pub identity_hex: Option<SecretString>,
    /// How long the preferred route has to confirm before the other is tried.
    #[serde(default = "default_hedge_delay")]
    pub hedge_delay_ms: u64,
    /// Route tried first until the statistics know better.
    #[serde(default = "default_primary")]
    pub primary: Route,
    /// Let per-route statistics choose the first route (else always `primary`).
    #[serde(default = "default_true")]
    pub adaptive: bool,
    /// Leaders each transaction goes to on the TPU route (current, next, …).
    #[serde(default = "default_fanout")]
    pub fanout: usize,
    /// Upcoming leaders kept connected ahead of their slots.
    #[serde(default = "default_prewarm")]
    pub prewarm: usize,
    /// The hot path.
    #[serde(default)]
    pub strategy: strategy::StrategyConfig,
    /// Audit rows queued for ClickHouse before new ones are dropped.
    #[serde(default = "default_audit_queue")]
    pub audit_queue: usize,
    /// Module whose state gates JSON-RPC sends (stopped or killed → refused,
    /// `throttle_pct`).
    #[serde(default = "default_rpc_module")]
    pub rpc_module: String,
    /// Let JSON-RPC sends through while the gating module is stopped (not killed).
    #[serde(default)]
    pub rpc_allow_stopped: bool,
    /// JSON-RPC sends running at once (each runs to its end on a task of its own,
    /// even when its client has gone); beyond, refused `busy` (-32005).
    #[serde(default = "default_rpc_max_in_flight")]
    pub rpc_max_in_flight: usize,
    /// How a transaction's routes are chosen ([`RoutePolicy`]).
    #[serde(default)]
    pub route_policy: RoutePolicy,
    /// `tpu_first`: the relay hedges after `hedge_delay_ms` only while the TPU
    /// route's recent delivery estimate is below this share (0..=1).
    #[serde(default = "default_relay_hedge_below")]
    pub relay_hedge_below: f64,
    /// `tpu_first`: how long the TPU route has to confirm before the relay is
    /// tried anyway (a leader that went silent fails no faster than QUIC's idle
    /// timeout).
    #[serde(default = "default_relay_failover")]
    pub relay_failover_ms: u64,
    /// Leaders (identity, base58) the TPU route may send to; empty = any. A
    /// leader whose identity is unknown is not on any allow list.
    #[serde(default)]
    pub leader_allow: Vec<String>,
    /// Leaders (identity, base58) the TPU route never sends to (nor connects to).
    #[serde(default)]
    pub leader_deny: Vec<String>,
    /// A Solana RPC node for JSON-RPC's landing semantics (preflight,
    /// `minContextSlot`, `maxRetries`, `getSignatureStatuses`).
    #[serde(default)]
    pub rpc_node: Option<landing::RpcNodeConfig>,
}

/// How the sender picks routes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutePolicy {
    /// The route with the better expected time to land goes first (`primary`
    /// until both have landed once, or always `primary` without `adaptive`); the
    /// other hedges after `hedge_delay_ms` or on failure.
    #[default]
    Latency,
    /// The TPU goes first, always (the relay costs a tip). The relay is tried when
    /// the TPU route fails or has not confirmed within `relay_failover_ms`, and
    /// after `hedge_delay_ms` while the TPU route's delivery estimate is below
    /// `relay_hedge_below`. Bundles go to the relay (the TPU has none).
    TpuFirst,
}

fn default_relay_hedge_below() -> f64 {
    0.9
}

fn default_relay_failover() -> u64 {
    300
}

/// Which leaders the TPU route may use (`leader_allow`, `leader_deny`).
#[derive(Debug, Clone, Default)]
pub struct LeaderFilter {
    allow: std::collections::HashSet<[u8; 32]>,
    deny: std::collections::HashSet<[u8; 32]>,
}

impl LeaderFilter {
    /// From base58 identities.
    pub fn new(allow: &[String], deny: &[String]) -> Result<LeaderFilter, OutOfBounds> {
        let parse = |key: &'static str, list: &[String]| {
            list.iter()
                .map(|s| {
                    leaders::pubkey_from_b58(s)
                        .map_err(|e| OutOfBounds::new(key, format!("`{}`: {e}", s.escape_debug())))
                })
                .collect::<Result<std::collections::HashSet<_>, _>>()
        };
        Ok(LeaderFilter {
            allow: parse("sender.leader_allow", allow)?,
            deny: parse("sender.leader_deny", deny)?,
        })
    }

    /// Whether the TPU route may send to (and connect to) `l`.
    pub fn permits(&self, l: &tpu::Leader) -> bool {
        match &l.identity {
            Some(id) => {
                !self.deny.contains(id) && (self.allow.is_empty() || self.allow.contains(id))
            }
            None => self.allow.is_empty(),
        }
    }
}

fn default_rpc_module() -> String {
    "arbitrage".into()
}

fn default_rpc_max_in_flight() -> usize {
    1024
}

fn default_hedge_delay() -> u64 {
    10
}
fn default_primary() -> Route {
    Route::Tpu
}
fn default_true() -> bool {
    true
}
fn default_fanout() -> usize {
    1
}
fn default_prewarm() -> usize {
    4
}
fn default_audit_queue() -> usize {
    100_000
}

impl SenderConfig {
    /// Checks the bounds.
    pub fn validate(&self) -> Result<(), OutOfBounds> {
        if self.tpu.is_none() && self.relay.is_none() {
            return Err(OutOfBounds::new(
                "sender",
                "configure at least one route (tpu or relay)",
            ));
        }
        if self.tpu.is_some() && self.leaders.is_none() {
            return Err(OutOfBounds::new(
                "sender.tpu",
                "needs sender.leaders (static list or rpc)",
            ));
        }
        if let Some(t) = &self.tpu {
            t.validate()?;
        }
        if self.fanout == 0 || self.fanout > 8 {
            return Err(OutOfBounds::new("sender.fanout", "must be within 1..=8"));
        }
        if let Some(t) = &self.tpu {
            let need = self.prewarm.max(self.fanout);
            if t.max_leaders < need {
                return Err(OutOfBounds::new(
                    "sender.tpu.max_leaders",
                    format!(
                        "must be at least prewarm and fanout ({need}): fewer would close and open again the connections to upcoming leaders on every leader refresh"
                    ),
                ));
            }
        }
        if self.route_policy == RoutePolicy::TpuFirst && self.primary == Route::Relay {
            return Err(OutOfBounds::new(
                "sender.primary",
                "route_policy tpu_first sends on the TPU first: primary must be tpu",
            ));
        }
        if !(1..=60_000).contains(&self.relay_failover_ms) {
            return Err(OutOfBounds::new(
                "sender.relay_failover_ms",
                "must be within 1..=60000",
            ));
        }
        if !(0.0..=1.0).contains(&self.relay_hedge_below) {
            return Err(OutOfBounds::new(
                "sender.relay_hedge_below",
                "must be within 0..=1",
            ));
        }
        LeaderFilter::new(&self.leader_allow, &self.leader_deny)?;
        if !(1..=1_000_000).contains(&self.rpc_max_in_flight) {
            return Err(OutOfBounds::new(
                "sender.rpc_max_in_flight",
                "must be within 1..=1000000",
            ));
        }
        if let Some(n) = &self.rpc_node {
            n.validate()?;
        }
        if self.hedge_delay_ms > 60_000 {
            return Err(OutOfBounds::new(
                "sender.hedge_delay_ms",
                "must be at most 60000",
            ));
        }
        self.strategy.validate()
    }
}

/// Whether a send decided before may still go out on another route: asked when
/// its hedge leg is about to start, so that a module stopped or killed after the
/// send was decided sends nothing more (a paid relay send after a kill). The
/// default is always open.
#[derive(Clone, Default)]
pub struct SendGate(Option<Arc<dyn Fn() -> bool + Send + Sync>>);

impl SendGate {
    /// A gate open while `f` says so.
    pub fn new(f: impl Fn() -> bool + Send + Sync + 'static) -> SendGate {
        SendGate(Some(Arc::new(f)))
    }

    /// Whether the send may go on.
    pub fn open(&self) -> bool {
        self.0.as_ref().is_none_or(|f| f())
    }
}

impl std::fmt::Debug for SendGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "SendGate(..)"
        } else {
            "SendGate(open)"
        })
    }
}

/// The route error of a hedge leg the gate held back.
pub const HELD_BACK: &str = "not sent: its module was stopped or killed after the send was decided";

/// Who asked for a send and why (for the audit row).
#[derive(Debug, Clone, Default)]
pub struct SendMeta {
    /// `rpc` or `strategy`.
    pub source: &'static str,
    /// Gating module, if any.
    pub module: &'static str,
    /// Tip chosen.
    pub tip: f64,
    /// Model score.
    pub score: Option<f32>,
    /// What gave the score: a model's `name@version`, or `ev` (the opportunity's
    /// own); `None` when nothing scored the send (JSON-RPC).
    pub scored_by: Option<Arc<str>>,
    /// Who asked for it: the token the edge verified (JSON-RPC, opportunities over
    /// HTTP), or the QUIC ingest's client (its base58 identity as `sub`).
    pub requester: Arc<Requester>,
    /// Whether a hedge leg may still start ([`SendGate`]).
    pub gate: SendGate,
}

/// How one send ended.
#[derive(Debug, Clone)]
pub struct SendOutcome {
    /// Base58 signature.
    pub signature: String,
    /// Route tried first.
    pub primary: Route,
    /// Route that took it, if any.
    pub landed: Option<Route>,
    /// Whether the other route was used.
    pub hedged: bool,
    /// When the hedge went out, after the start (timing statistics).
    pub hedged_after: Option<Duration>,
    /// Until a route took it (or both failed).
    pub latency: Duration,
    /// TPU leader tried.
    pub leader: Option<std::net::SocketAddr>,
    /// Why the TPU route failed.
    pub tpu_error: Option<String>,
    /// Why the relay route failed.
    pub relay_error: Option<String>,
    /// Not landed, and a route that failed may have delivered it all the same
    /// (a stream that failed once its bytes went, a relay that timed out or
    /// failed after taking the request): whether it was sent is not known.
    /// False when no route sent anything.
    pub maybe_sent: bool,
}

impl SendOutcome {
    /// A send of `signature` begun with `primary`: nothing answered yet.
    fn begun(signature: String, primary: Route) -> SendOutcome {
        SendOutcome {
            signature,
            primary,
            landed: None,
            hedged: false,
            hedged_after: None,
            latency: Duration::ZERO,
            leader: None,
            tpu_error: None,
            relay_error: None,
            maybe_sent: false,
        }
    }

    /// Both routes' errors in one line.
    pub fn error(&self) -> String {
        let mut parts = Vec::new();
        if let Some(e) = &self.tpu_error {
            parts.push(format!("tpu: {e}"));
        }
        if let Some(e) = &self.relay_error {
            parts.push(format!("relay: {e}"));
        }
        parts.join("; ")
    }
}

/// Counters.
#[derive(Debug, Default)]
pub struct SenderStats {
    /// Sends that landed on a route.
    pub landed: AtomicU64,
    /// Sends both routes failed.
    pub failed: AtomicU64,
    /// Sends that used the second route.
    pub hedged: AtomicU64,
    /// Leaders passed over by `leader_allow` / `leader_deny` when sending.
    pub leaders_refused: AtomicU64,
    /// Landed per route: tpu, relay.
    pub landed_by: [AtomicU64; 2],
}

/// The sender.
pub struct Sender {
    tpu: Option<Arc<TpuClient>>,
    relay: Option<Arc<RelayClient>>,
    leaders: Option<Arc<dyn LeaderSource>>,
    delay: Duration,
    primary: Route,
    adaptive: bool,
    fanout: usize,
    prewarm: usize,
    policy: RoutePolicy,
    relay_hedge_below: f64,
    relay_failover: Duration,
    leader_filter: LeaderFilter,
    routes: Arc<Mutex<RouteStats>>,
    audit: Option<SendAudit>,
    /// Counters.
    pub stats: SenderStats,
}

/// tokio's timer resolution.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// A started route's answer: `Ok` when it confirmed, or why it failed (`None`
/// when the route is not configured). Whoever polls it reads the clock.
type RouteResult = Result<(), RouteFailure>;

/// Why a route failed (`None`: it is not configured), and whether its bytes
/// may have reached the leader or the relay all the same.
#[derive(Debug)]
struct RouteFailure {
    why: Option<String>,
    maybe_sent: bool,
}

impl RouteFailure {
    /// A route that sent nothing.
    fn unsent(why: Option<String>) -> RouteFailure {
        RouteFailure {
            why,
            maybe_sent: false,
        }
    }
}

/// The relay route's send.
type RouteFuture = std::pin::Pin<Box<dyn std::future::Future<Output = RouteResult> + Send>>;

/// A started route, polled in place by [`Sender::send`]: no box around the TPU
/// route and no task for it (this is the send's hot path). Polled until it is
/// ready, and not after.
enum Attempt {
    /// Every upcoming leader's delivery.
    Tpu(TpuAttempt),
    /// The relay's send.
    Relay(RouteFuture),
    /// The route could not start (not configured, no leader, every leader
    /// refused): answered at once, and not counted in the route's statistics.
    Refused(Option<String>),
}

impl Attempt {
    /// Whether its outcome counts in the route's statistics.
    fn counted(&self) -> bool {
        !matches!(self, Attempt::Refused(_))
    }
}

impl std::future::Future for Attempt {
    type Output = RouteResult;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<RouteResult> {
        match self.get_mut() {
            Attempt::Tpu(t) => t.poll_first(cx),
            Attempt::Relay(f) => f.as_mut().poll(cx),
            Attempt::Refused(e) => Poll::Ready(Err(RouteFailure::unsent(e.take()))),
        }
    }
}

/// The TPU route's deliveries, one per upcoming leader: confirmed by the first
/// leader that acknowledges, failed when every one failed.
struct TpuAttempt {
    /// Not yet answered (`fanout` is at most 8, usually 1 or 2).
    pending: smallvec::SmallVec<[tpu::Delivery; 2]>,
    last_err: Option<String>,
    /// Whether a failed delivery may have reached its leader
    /// ([`tpu::TpuError::maybe_sent`]).
    maybe_sent: bool,
}

impl TpuAttempt {
    fn poll_first(&mut self, cx: &mut std::task::Context<'_>) -> Poll<RouteResult> {
        let mut i = 0;
        while i < self.pending.len() {
            let Poll::Ready(r) = std::pin::Pin::new(&mut self.pending[i]).poll(cx) else {
                i += 1;
                continue;
            };
            drop(self.pending.swap_remove(i));
            match r {
                Ok(Ok(())) => {
                    // The other leaders' copies still go out: one sent on this
                    // task is sent by its delivery (a queued one by the leader's
                    // worker, whether or not it is awaited).
                    self.pending.retain(|d| d.is_direct());
                    if !self.pending.is_empty() {
                        tokio::spawn(futures_util::future::join_all(std::mem::take(
                            &mut self.pending,
                        )));
                    }
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => {
                    self.maybe_sent |= e.maybe_sent();
                    self.last_err = Some(e.to_string());
                }
                Err(_) => {
                    // Where the worker was with it is not known.
                    self.maybe_sent = true;
                    self.last_err = Some("TPU worker stopped".into());
                }
            }
        }
        if self.pending.is_empty() {
            Poll::Ready(Err(RouteFailure {
                why: self.last_err.take(),
                maybe_sent: self.maybe_sent,
            }))
        } else {
            Poll::Pending
        }
    }
}

impl Sender {
    /// Builds the routes from `config`. Must run inside a tokio runtime.
    pub fn new(
        config: &SenderConfig,
        identity: &ed25519_dalek::SigningKey,
        leaders: Option<Arc<dyn LeaderSource>>,
        audit: Option<SendAudit>,
    ) -> anyhow::Result<Arc<Sender>> {
        config.validate()?;
        // `quanta` calibrates its clock against the system's on first use (up to
        // 200 ms): here, not in the first send.
        let _ = quanta::Instant::now();
        let tpu = match &config.tpu {
            Some(t) => Some(TpuClient::new(t.clone(), identity)?),
            None => None,
        };
        let relay = match &config.relay {
            Some(r) => Some(Arc::new(RelayClient::new(r)?)),
            None => None,
        };
        Ok(Arc::new(Sender {
            tpu,
            relay,
            leaders,
            delay: Duration::from_millis(config.hedge_delay_ms),
            primary: config.primary,
            adaptive: config.adaptive,
            fanout: config.fanout,
            prewarm: config.prewarm,
            policy: config.route_policy,
            relay_hedge_below: config.relay_hedge_below,
            relay_failover: Duration::from_millis(config.relay_failover_ms),
            leader_filter: LeaderFilter::new(&config.leader_allow, &config.leader_deny)?,
            routes: Arc::new(Mutex::new(RouteStats::default())),
            audit,
            stats: SenderStats::default(),
        }))
    }

    /// The TPU client, when that route is on.
    pub fn tpu(&self) -> Option<&Arc<TpuClient>> {
        self.tpu.as_ref()
    }

    /// The relay client, when that route is on.
    pub fn relay(&self) -> Option<&Arc<RelayClient>> {
        self.relay.as_ref()
    }

    /// Per-route attempts and failures: (tpu, relay).
    pub fn route_counts(&self) -> [(u64, u64); 2] {
        self.routes
            .lock()
            .map(|r| [r.counts(Route::Tpu), r.counts(Route::Relay)])
            .unwrap_or_default()
    }

    /// Whether `route` is configured.
    pub fn configured(&self, route: Route) -> bool {
        match route {
            Route::Tpu => self.tpu.is_some(),
            Route::Relay => self.relay.is_some(),
        }
    }

    /// The route policy.
    pub fn policy(&self) -> RoutePolicy {
        self.policy
    }

    /// The TPU route's recent delivery estimate: the share of recent attempts the
    /// leader acknowledged (`None` before its first attempt). An acknowledgement is
    /// not a landing: an unstaked sender's transactions can be acknowledged and
    /// dropped.
    pub fn tpu_delivery(&self) -> Option<f64> {
        self.routes.lock().ok().and_then(|r| r.delivery(Route::Tpu))
    }

    /// The route the next send tries first.
    pub fn preferred(&self) -> Route {
        let want = if self.policy == RoutePolicy::TpuFirst {
            Route::Tpu
        } else if self.adaptive {
            self.routes
                .lock()
                .map_or(self.primary, |r| r.preferred(self.primary))
        } else {
            self.primary
        };
        // A route that is not configured cannot go first.
        if self.configured(want) {
            want
        } else {
            want.other()
        }
    }

    /// Connects ahead to the upcoming leaders and marks the current one's phase
    /// (its connection's congestion window is boosted); call every slot or so.
    pub fn refresh_leaders(&self) {
        let (Some(tpu), Some(src)) = (&self.tpu, &self.leaders) else {
            return;
        };
        let mut up = src.upcoming(self.prewarm.max(self.fanout));
        // A leader the policy refuses is not even connected to.
        up.retain(|l| self.leader_filter.permits(l));
        tpu.prewarm(&up);
        for (i, l) in up.iter().enumerate() {
            tpu.set_phase(l.tpu_quic, i < self.fanout);
        }
    }

    /// Sends one signed transaction (`wire`, named by `signature`) hedged across the
    /// routes; audited.
    pub async fn send(&self, wire: Bytes, signature: String, meta: &SendMeta) -> SendOutcome {
        let primary = self.preferred();
        let mut out = SendOutcome::begun(signature, primary);
        if self.configured(primary.other()) {
            self.hedged(&wire, Instant::now(), &mut out, &meta.gate)
                .await;
        } else {
            // One route: nothing to hedge to (no timer, no hedging state), and the
            // route's failure is the send's (no audit row saying a hedge went to a
            // route that does not exist). This is the send's hot path; its clock is
            // the CPU's counter (`quanta`: ≈ 10 ns a read here, the system's
            // monotonic clock ≈ 23 ns, and each read showed in `bench sender`).
            let t0 = quanta::Instant::now();
            let attempt = self.launch(primary, &wire, &mut out);
            let counted = attempt.counted();
            let r = attempt.await;
            out.latency = quanta::Instant::now().saturating_duration_since(t0);
            let lat = counted.then_some(out.latency);
            if let Event::Confirmed(route) = self.answered(primary, r, lat, &mut out) {
                out.landed = Some(route);
            }
        }
        self.count(&out);
        self.audit_row(&out, wire.len(), meta, "transaction");
        out
    }

    /// Sends again a transaction sent before (the landing's rebroadcast, which
    /// only a sender with a TPU route makes): by the TPU route alone — to the
    /// current and next `fanout` leaders, as an RPC node rebroadcasts — never
    /// hedged to the relay, where
    /// each copy is one more request against its rate limit and a tip; and not
    /// counted in the routes' statistics, which choose the first route of new
    /// sends (a burst of resends that fills a leader's queue made the TPU route
    /// look failing, and new sends hedge to the relay). Audited.
    pub async fn resend(&self, wire: Bytes, signature: String, meta: &SendMeta) -> SendOutcome {
        let route = Route::Tpu;
        let mut out = SendOutcome::begun(signature, route);
        let t0 = quanta::Instant::now();
        let r = self.launch(route, &wire, &mut out).await;
        out.latency = quanta::Instant::now().saturating_duration_since(t0);
        if let Event::Confirmed(route) = self.answered(route, r, None, &mut out) {
            out.landed = Some(route);
        }
        self.count(&out);
        self.audit_row(&out, wire.len(), meta, "transaction");
        out
    }

    /// Races the two routes from `t0` (the primary first, the other after the
    /// hedge delay or on the primary's failure — if `gate` is still open then),
    /// filling `out`.
    async fn hedged(&self, wire: &Bytes, t0: Instant, out: &mut SendOutcome, gate: &SendGate) {
        let primary = out.primary;
        let hedge_after = match self.policy {
            RoutePolicy::Latency => self.delay,
            // The relay hedges early only while the TPU route delivers too rarely;
            // otherwise it waits for the TPU route to fail or run out of time.
            RoutePolicy::TpuFirst
                if primary == Route::Tpu
                    && self
                        .tpu_delivery()
                        .is_some_and(|l| l < self.relay_hedge_below) =>
            {
                self.delay
            }
            RoutePolicy::TpuFirst => self.relay_failover.max(self.delay),
        };
        let mut hedge = Hedge::new(primary, hedge_after);
        // The routes are polled right here (no task per send); one still running
        // when the send is decided is handed to a task: its statistics still count,
        // and a TPU copy sent on this task is still sent by it.
        let mut routes: [Option<Attempt>; 2] = [None, None];
        // When each route started, if its outcome is counted.
        let mut started: [Option<Instant>; 2] = [None, None];
        // The hedge's own deadline (with `tpu_first` that is `relay_failover_ms`,
        // not `hedge_delay_ms`: a timer at the shorter one would fire early and,
        // never re-armed, be ready on every poll until the deadline — a spin).
        //
        // Asked one tick sooner: tokio's timer counts whole milliseconds, rounds a
        // deadline up to one, and a driver that parks at once sleeps that many
        // ticks from its current time, so a timer asked for `d` fired ≈ 1.1 ms
        // after `d` (`bench sender`, hedge timing). Asked for `d` − 1 ms it fires at
        // ≈ `d` on a quiet runtime. When it fires before `d` (a busy driver turns
        // sooner, or a park crossed a millisecond boundary) the hedge is not due
        // yet and the timer is re-armed at `d` itself: never early, at worst about
        // as late as before (a tick after `d`, from when this task re-arms it).
        let deadline = t0 + hedge_after;
        let asked = deadline.checked_sub(TIMER_TICK).unwrap_or(deadline);
        let timer = tokio::time::sleep_until(asked.into());
        tokio::pin!(timer);
        let mut now = t0;
        let mut action = hedge.on(Event::Start, t0);
        let (mut launched, mut held_back) = (false, false);
        loop {
            match action.take() {
                // The hedge leg of a send whose module was stopped or killed
                // since: not sent, a failure of its route.
                Some(Action::Send(r)) if launched && !gate.open() => {
                    match r {
                        Route::Tpu => out.tpu_error = Some(HELD_BACK.to_owned()),
                        Route::Relay => out.relay_error = Some(HELD_BACK.to_owned()),
                    }
                    held_back = true;
                    action = hedge.on(Event::Failed(r), now);
                    continue;
                }
                Some(Action::Send(r)) => {
                    launched = true;
                    let a = self.launch(r, wire, out);
                    started[r.index()] = a.counted().then_some(now);
                    routes[r.index()] = Some(a);
                }
                Some(Action::Landed(r)) => {
                    out.landed = Some(r);
                    break;
                }
                Some(Action::Failed) => break,
                None => {}
            }
            let armed = hedge.deadline().is_some();
            let next = std::future::poll_fn(|cx| {
                for (i, slot) in routes.iter_mut().enumerate() {
                    if let Some(f) = slot.as_mut() {
                        if let Poll::Ready(r) = std::pin::Pin::new(f).poll(cx) {
                            *slot = None;
                            return Poll::Ready(Some((Route::ALL[i], r)));
                        }
                    }
                }
                if armed && timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                Poll::Pending
            });
            let answer = next.await;
            now = Instant::now();
            let event = match answer {
                Some((route, r)) => {
                    let lat = started[route.index()].map(|t| now.saturating_duration_since(t));
                    self.answered(route, r, lat, out)
                }
                None => Event::Timer,
            };
            action = hedge.on(event, now);
            if let (Event::Timer, None, Some(d)) = (event, action, hedge.deadline()) {
                // Early (asked a tick sooner, above): wait for the deadline itself.
                timer.as_mut().reset(d.into());
            }
        }
        for (i, a) in routes.into_iter().enumerate() {
            let Some(a) = a else { continue };
            let (route, t, stats) = (Route::ALL[i], started[i], self.routes.clone());
            tokio::spawn(async move {
                let r = a.await;
                if let Some(t) = t {
                    record(&stats, route, &r, t.elapsed());
                }
            });
        }
        out.latency = now.saturating_duration_since(t0);
        // A leg held back was not sent: no hedge.
        out.hedged = hedge.hedged() && !held_back;
        out.hedged_after = hedge
            .hedged_at()
            .filter(|_| !held_back)
            .map(|t| t.saturating_duration_since(t0));
    }

    /// `route` answered `r` after `lat`: recorded in its statistics when it is
    /// counted (`lat` is `Some`); its error, if any, goes into `out`.
    fn answered(
        &self,
        route: Route,
        r: RouteResult,
        lat: Option<Duration>,
        out: &mut SendOutcome,
    ) -> Event {
        if let Some(lat) = lat {
            record(&self.routes, route, &r, lat);
        }
        let err = match r {
            Ok(()) => return Event::Confirmed(route),
            Err(f) => {
                out.maybe_sent |= f.maybe_sent;
                f.why
                    .unwrap_or_else(|| format!("{} route is not configured", route.as_str()))
            }
        };
        match route {
            Route::Tpu => out.tpu_error = Some(err),
            Route::Relay => out.relay_error = Some(err),
        }
        Event::Failed(route)
    }

    /// Starts `route`: the attempt answers when the route confirmed or failed.
    fn launch(&self, route: Route, wire: &Bytes, out: &mut SendOutcome) -> Attempt {
        match route {
            Route::Tpu => {
                let Some(tpu) = &self.tpu else {
                    return Attempt::Refused(None);
                };
                let mut leaders = self
                    .leaders
                    .as_ref()
                    .map(|s| s.upcoming(self.fanout))
                    .unwrap_or_default();
                if leaders.is_empty() {
                    return Attempt::Refused(Some("no leader known".to_owned()));
                }
                let known = leaders.len();
                leaders.retain(|l| self.leader_filter.permits(l));
                let refused = known - leaders.len();
                if refused > 0 {
                    self.stats
                        .leaders_refused
                        .fetch_add(refused as u64, Ordering::Relaxed);
                }
                if leaders.is_empty() {
                    return Attempt::Refused(Some(format!(
                        "leader_allow/leader_deny refuse all {known} upcoming leader(s)"
                    )));
                }
                out.leader = leaders.first().map(|l| l.tpu_quic);
                let mut pending = smallvec::SmallVec::new();
                let mut last_err = None;
                for l in &leaders {
                    match tpu.send(l, wire.clone()) {
                        Ok(d) => pending.push(d),
                        Err(e) => last_err = Some(e.to_string()),
                    }
                }
                Attempt::Tpu(TpuAttempt {
                    pending,
                    last_err,
                    maybe_sent: false,
                })
            }
            Route::Relay => {
                let Some(relay) = self.relay.clone() else {
                    return Attempt::Refused(None);
                };
                let wire = wire.clone();
                Attempt::Relay(Box::pin(async move {
                    let r = relay.send_transaction(&wire).await;
                    r.map(|_| ()).map_err(|e| RouteFailure {
                        why: Some(e.to_string()),
                        maybe_sent: e.maybe_sent(),
                    })
                }))
            }
        }
    }

    /// Sends a bundle (1–5 signed transactions, all or none) through the relay; the
    /// TPU has no bundles, so there is no hedge. Returns the bundle id, or why it
    /// failed and whether the relay may have taken it all the same
    /// ([`RelayError::maybe_sent`]).
    pub async fn send_bundle(
        &self,
        txs: Vec<Bytes>,
        signature: String,
        meta: &SendMeta,
    ) -> Result<String, (String, bool)> {
        let t0 = Instant::now();
        let Some(relay) = &self.relay else {
            return Err((
                "bundles need the relay route, which is not configured".into(),
                false,
            ));
        };
        let r = relay.send_bundle(&txs).await;
        let maybe_sent = r.as_ref().err().is_some_and(RelayError::maybe_sent);
        let r = r.map_err(|e| e.to_string());
        let out = SendOutcome {
            signature: match &r {
                Ok(id) => id.clone(),
                Err(_) => signature,
            },
            primary: Route::Relay,
            landed: r.as_ref().ok().map(|_| Route::Relay),
            hedged: false,
            hedged_after: None,
            latency: t0.elapsed(),
            leader: None,
            tpu_error: None,
            relay_error: r.as_ref().err().cloned(),
            maybe_sent,
        };
        self.count(&out);
        let bytes: usize = txs.iter().map(bytes::Bytes::len).sum();
        self.audit_row(&out, bytes, meta, "bundle");
        r.map_err(|e| (e, maybe_sent))
    }

    fn count(&self, out: &SendOutcome) {
        let c = match out.landed {
            Some(r) => {
                self.stats.landed_by[r.index()].fetch_add(1, Ordering::Relaxed);
                &self.stats.landed
            }
            None => &self.stats.failed,
        };
        c.fetch_add(1, Ordering::Relaxed);
        if out.hedged {
            self.stats.hedged.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn audit_row(&self, out: &SendOutcome, bytes: usize, meta: &SendMeta, kind: &str) {
        let Some(a) = &self.audit else { return };
        a.record(SendRow {
            ts_us: crate::now_nanos() / 1000,
            signature: out.signature.clone(),
            source: meta.source.to_owned(),
            module: meta.module.to_owned(),
            kind: kind.to_owned(),
            primary: out.primary.as_str().to_owned(),
            route: out.landed.map_or("", Route::as_str).to_owned(),
            hedged: u8::from(out.hedged),
            outcome: match (out.landed, out.maybe_sent) {
                (Some(_), _) => "landed",
                (None, true) => "unknown",
                (None, false) => "failed",
            }
            .to_owned(),
            latency_us: u64::try_from(out.latency.as_micros()).unwrap_or(u64::MAX),
            leader: out.leader.map(|l| l.to_string()).unwrap_or_default(),
            tip: meta.tip,
            score: meta.score.map_or(f64::NAN, f64::from),
            scored_by: meta.scored_by.as_deref().unwrap_or_default().to_owned(),
            requester: meta.requester.sub.clone(),
            token_issuer: meta.requester.token_issuer.clone(),
            tpu_error: out.tpu_error.clone().unwrap_or_default(),
            relay_error: out.relay_error.clone().unwrap_or_default(),
            bytes: u32::try_from(bytes).unwrap_or(u32::MAX),
        });
    }
}

/// Records `route`'s answer `r`, given after `lat`, in its statistics.
fn record(stats: &Mutex<RouteStats>, route: Route, r: &RouteResult, lat: Duration) {
    if let Ok(mut s) = stats.lock() {
        s.record(route, r.as_ref().map(|()| lat).map_err(|_| ()));
    }
}

#[cfg(test)]
mod tests {
    /// The documented `sender` example is a configuration the sidecar accepts.
    #[test]
    fn the_documented_example_parses_and_validates() {
        let readme = include_str!("../../../docs/configuration.md");
        let start = readme
            .find("```json\n\"sender\": {")
            .expect("docs/configuration.md has the sender example");
        let body = &readme[start + "```json\n".len()..];
        let end = body.find("\n```").expect("closed block");
        let cfg: crate::config::FileConfig =
            serde_json::from_str(&format!("{{{}}}", &body[..end])).expect("parses");
        let sender = cfg.sender.expect("sender section");
        sender.validate().expect("valid");
        assert_eq!(sender.hedge_delay_ms, 10);
    }

    /// The configuration's `Debug` (what a `?config` in a log would print) shows no
    /// key: not the TPU identity, the relay's token, or a key in an RPC URL.
    #[test]
    fn the_configurations_debug_shows_no_secret() {
        let seed = "7a".repeat(32);
        let cfg: super::SenderConfig = serde_json::from_value(serde_json::json!({
            "tpu": {}, "identity_hex": seed,
            "relay": {"url": "https://relay.example:8443/SECRET-1", "auth": "SECRET-2"},
            "leaders": {"rpc": {"url": "https://rpc.example/?api-key=SECRET-3"}},
            "rpc_node": {"url": "https://user:SECRET-4@rpc.example/SECRET-5/"},
        }))
        .expect("parses");
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("SECRET") && !shown.contains(&seed),
            "{shown}"
        );
        for part in ["relay.example:8443/…", "rpc.example/…", "<set>"] {
            assert!(shown.contains(part), "{part}: {shown}");
        }
    }

    /// Fewer leader connections than upcoming leaders to keep warm (or to send to)
    /// would close and reopen them on every refresh: refused.
    #[test]
    fn max_leaders_below_prewarm_or_fanout_is_refused() {
        let cfg = |prewarm: usize, fanout: usize| -> super::SenderConfig {
            serde_json::from_value(serde_json::json!({
                "tpu": {"max_leaders": 8}, "leaders": {"static": []},
                "prewarm": prewarm, "fanout": fanout,
            }))
            .expect("parses")
        };
        assert!(cfg(8, 1).validate().is_ok());
        for (p, f) in [(12, 1), (4, 9)] {
            let e = cfg(p, f).validate().expect_err("refused").to_string();
            assert!(
                e.contains("sender.tpu.max_leaders") || e.contains("fanout"),
                "{e}"
            );
        }
        let e = cfg(12, 1).validate().expect_err("refused").to_string();
        assert!(e.contains("sender.tpu.max_leaders"), "{e}");
    }
}
