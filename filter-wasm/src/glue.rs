//! The proxy-wasm shell: moves headers, bodies, shared data, metrics and time between
//! the host and [`crate::edge`]. [`crate::dispatch`] routes the host's callbacks to
//! these contexts; every host call goes through [`crate::abi`], so no host answer can
//! panic this code.

use std::cell::RefCell;
use std::rc::Rc;

use gw_core::{Code, Reject};

use crate::abi::{self, Level};

use crate::config::{Stage, StampConfig};
use crate::edge::{Edge, HeadDecision, PendingCommand, RequestHead, UpstreamHeaders};
use crate::replay_cas::{SharedStore, StoreError};
use crate::report::{EdgeReport, ReportConfig, ReportQueue};
use crate::stamp::{self, LocalSlots, Ticket, Tickets, TICKET_HEADER};

thread_local! {
    /// Verified headers handed from the verify to the stamp stage inside this VM
    /// (see [`crate::stamp`]). Borrowed only for moments without host calls.
    static HANDOVER: RefCell<LocalSlots> = RefCell::new(LocalSlots::default());
}

/// What a request callback tells the host (proxy-wasm `FilterHeadersStatus` /
/// `FilterDataStatus` / `FilterTrailersStatus`: 0 continue, 1 stop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Let the request go on.
    Continue = 0,
    /// Hold it (more body to come, or answered locally).
    Pause = 1,
}

fn info(msg: &str) {
    abi::log(Level::Info, msg);
}
fn error(msg: &str) {
    abi::log(Level::Error, msg);
}
fn debug(msg: &str) {
    abi::log(Level::Debug, msg);
}

/// Counters per decision; `None` where the host has no metrics (e.g. Kong).
struct Metrics {
    accepted: Option<u32>,
    passed: Option<u32>,
    by_code: Vec<Option<u32>>,
    /// Microseconds spent checking a command body (parse, signature, scope,
    /// freshness, replay), by the host's clock.
    command_us: Option<u32>,
}

impl Metrics {
    fn define() -> Metrics {
        let counter = |name: &str| abi::define_counter(name).ok();
        let accepted = counter("gw_edge.decision.accepted");
        if accepted.is_none() {
            info("gw_edge: host has no metrics; counting disabled");
        }
        Metrics {
            accepted,
            passed: counter("gw_edge.decision.public"),
            by_code: gw_core::Code::ALL
                .iter()
                .map(|c| counter(&format!("gw_edge.decision.{}", c.as_str())))
                .collect(),
            command_us: abi::define_histogram("gw_edge.command_check_us").ok(),
        }
    }

    fn bump(id: Option<u32>) {
        if let Some(id) = id {
            let _ = abi::increment(id, 1);
        }
    }

    fn rejected(&self, code: Code) {
        let i = Code::ALL.iter().position(|c| *c == code);
        Self::bump(i.and_then(|i| self.by_code.get(i).copied().flatten()));
    }
}

/// A root context: one per filter entry (stage) and VM.
#[derive(Default)]
pub struct Root {
    edge: Option<Rc<Edge>>,
    stamp: Option<Rc<StampConfig>>,
    tickets: Option<Rc<RefCell<Tickets>>>,
    metrics: Option<Rc<Metrics>>,
    reports: Option<Reports>,
}

/// Edge-decision reporting (see `crate::report`): the queue the request contexts
/// fill and the root context's tick drains.
#[derive(Clone)]
struct Reports {
    config: Rc<ReportConfig>,
    queue: Rc<RefCell<ReportQueue>>,
    /// Reports per in-flight call token.
    in_flight: Rc<RefCell<std::collections::BTreeMap<u32, usize>>>,
    sent: Option<u32>,
    failed: Option<u32>,
    dropped: Option<u32>,
}

/// Most batches sent per tick.
const BATCHES_PER_TICK: usize = 4;

/// A random id for this VM's ticket slots.
fn vm_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(abi::now_nanos().unwrap_or(0));
    h.finish()
}

impl Root {
    /// Parses and validates the plugin configuration; `false` fails plugin start.
    pub fn on_configure(&mut self) -> bool {
        let bytes = match abi::get_buffer(abi::BUFFER_PLUGIN_CONFIGURATION, 0, usize::MAX) {
            Ok(Some(b)) if !b.is_empty() => b,
            Ok(_) => {
                error("gw_edge: no plugin configuration given");
                return false;
            }
            Err(e) => {
                error(&format!(
                    "gw_edge: cannot read the plugin configuration: {e:?}"
                ));
                return false;
            }
        };
        match Stage::parse(&bytes) {
            Ok(Stage::Stamp(c)) => {
                info("gw_edge: stamp stage configured");
                self.stamp = Some(Rc::new(c));
                true
            }
            Ok(Stage::Verify(s)) => {
                info(&format!(
                    "gw_edge: configured: {} command key(s), {} JWT key(s), {} route rule(s), max body {} bytes",
                    s.control.keyring.len(),
                    s.jwks.keys.len(),
                    s.routes.len(),
                    s.control.max_body
                ));
                let tickets = Tickets::new(vm_id(), &s.stamp_key_prefix);
                let registered =
                    HANDOVER.with(|h| h.try_borrow_mut().map(|mut h| h.register(&tickets)));
                if registered.is_err() {
                    error("gw_edge: cannot register this VM's ticket slots");
                    return false;
                }
                self.tickets = Some(Rc::new(RefCell::new(tickets)));
                if let Some(rc) = s.report.clone() {
                    let period = u32::try_from(rc.period_ms).unwrap_or(u32::MAX);
                    match abi::set_tick_period_ms(period) {
                        Ok(()) => {
                            let counter = |name: &str| abi::define_counter(name).ok();
                            self.reports = Some(Reports {
                                config: Rc::new(rc),
                                queue: Rc::new(RefCell::new(ReportQueue::default())),
                                in_flight: Rc::default(),
                                sent: counter("gw_edge.report.sent"),
                                failed: counter("gw_edge.report.failed"),
                                dropped: counter("gw_edge.report.dropped"),
                            });
                        }
                        Err(e) => error(&format!(
                            "gw_edge: host has no ticks ({e:?}): edge decisions are not reported"
                        )),
                    }
                }
                self.edge = Some(Rc::new(Edge::new(*s)));
                self.metrics = Some(Rc::new(Metrics::define()));
                true
            }
            Err(e) => {
                error(&format!("gw_edge: invalid plugin configuration: {e}"));
                false
            }
        }
    }

    /// A context for one request of this stage (an unconfigured verify stage rejects
    /// every request).
    pub fn create_stream(&self) -> Stream {
        if let Some(stamp) = &self.stamp {
            return Stream::Stamp(Stamp {
                config: stamp.clone(),
            });
        }
        Stream::Verify(Box::new(Http {
            edge: self.edge.clone(),
            tickets: self.tickets.clone(),
            metrics: self.metrics.clone(),
            pending: None,
            reports: self.reports.clone(),
            control_path: None,
            body: None,
        }))
    }

    /// Ships queued edge reports to the ledger.
    pub fn on_tick(&mut self) {
        let Some(r) = self.reports.clone() else {
            return;
        };
        for _ in 0..BATCHES_PER_TICK {
            let Some((body, n)) = r.queue.borrow_mut().next_batch(r.config.max_batch) else {
                break;
            };
            let headers = vec![
                (":method", "POST"),
                (":path", r.config.path.as_str()),
                (":authority", r.config.authority.as_str()),
                ("content-type", "application/json"),
            ];
            let timeout = std::time::Duration::from_millis(r.config.timeout_ms);
            match abi::http_call(&r.config.cluster, &headers, &body, timeout) {
                Ok(token) => {
                    r.in_flight.borrow_mut().insert(token, n);
                }
                Err(e) => {
                    abi::log(
                        Level::Warn,
                        &format!("gw_edge: cannot report {n} edge decision(s): {e:?}"),
                    );
                    count(r.failed, n);
                }
            }
        }
        let new = r.queue.borrow_mut().take_dropped();
        if new > 0 {
            count(r.dropped, usize::try_from(new).unwrap_or(usize::MAX));
        }
    }

    /// The ledger's answer to a report batch.
    pub fn on_http_call_response(&mut self, token: u32) {
        let Some(r) = &self.reports else { return };
        let n = r.in_flight.borrow_mut().remove(&token).unwrap_or(0);
        let status = abi::http_call_response_status();
        if (200..300).contains(&status) {
            count(r.sent, n);
        } else {
            abi::log(
                Level::Warn,
                &format!("gw_edge: the ledger refused {n} edge decision(s): status {status}"),
            );
            count(r.failed, n);
        }
    }
}

fn count(id: Option<u32>, n: usize) {
    if let Some(id) = id {
        let _ = abi::increment(id, i64::try_from(n).unwrap_or(i64::MAX));
    }
}

impl Http {
    /// Queues a rejected control request for the ledger (when reporting is on).
    fn report(&self, r: &Reject) {
        let (Some(reports), Some(path)) = (&self.reports, &self.control_path) else {
            return;
        };
        let report = EdgeReport {
            decision: "rejected".into(),
            code: r.code.as_str().into(),
            path: path.clone(),
            raw_hex: self.body.as_deref().map(hex::encode).unwrap_or_default(),
            ts_ms: abi::now_nanos().map_or(0, |n| n / 1_000_000),
        };
        reports
            .queue
            .borrow_mut()
            .push(report, reports.config.max_queued);
    }
}

/// The verify stage's context for one request.
pub struct Http {
    edge: Option<Rc<Edge>>,
    tickets: Option<Rc<RefCell<Tickets>>>,
    metrics: Option<Rc<Metrics>>,
    pending: Option<(PendingCommand, Ticket)>,
    reports: Option<Reports>,
    /// The request path, when it is a control route and reporting is on
    /// (reported on rejection).
    control_path: Option<String>,
    /// The command body, once read, when reporting is on (reported on rejection).
    body: Option<Vec<u8>>,
}

/// Shared data through the host.
struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), StoreError> {
        abi::get_shared_data(key).map_err(|s| StoreError::Unavailable(format!("{s:?}")))
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        abi::set_shared_data(key, value, cas).map_err(|s| match s {
            abi::CAS_MISMATCH => StoreError::CasMismatch,
            other => StoreError::Unavailable(format!("{other:?}")),
        })
    }
}

/// Host time in unix seconds; 0 when the host cannot tell (every command is then stale).
fn now_secs() -> u64 {
    unix_secs(abi::now_nanos().ok())
}

/// Seconds of a host time in nanoseconds; 0 when the host could not tell.
fn unix_secs(ns: Option<u64>) -> u64 {
    ns.map_or(0, |ns| ns / 1_000_000_000)
}

fn local_reject(r: &Reject) {
    let body = r.to_json();
    if let Err(e) = abi::send_local_response(
        u32::from(r.code.http_status()),
        &[
            ("content-type", "application/json"),
            ("cache-control", "no-store"),
        ],
        body.as_bytes(),
    ) {
        abi::log(
            Level::Warn,
            &format!("gw_edge: cannot send the local response: {e:?}"),
        );
    }
}

impl Http {
    fn reject(&self, r: Reject) -> Action {
        debug(&format!("gw_edge: reject {}: {}", r.code, r.detail));
        if let Some(m) = &self.metrics {
            m.rejected(r.code);
        }
        self.report(&r);
        local_reject(&r);
        Action::Pause
    }

    fn forward(&self, headers: &UpstreamHeaders) -> Action {
        for (k, v) in headers {
            if let Err(e) = abi::set_request_header(k, v) {
                return self.reject(Reject::with(
                    Code::Unavailable,
                    format!("cannot set header: {e:?}"),
                ));
            }
        }
        if let Some(m) = &self.metrics {
            Metrics::bump(m.accepted);
        }
        Action::Continue
    }
}

impl Http {
    /// Strips reserved headers and decides on the request head.
    pub fn on_request_headers(&mut self, end_of_stream: bool) -> Action {
        let Some(edge) = self.edge.clone() else {
            return self.reject(Reject::new(
                Code::Unavailable,
                "the edge filter is not configured",
            ));
        };
        let raw = abi::request_headers_raw();
        let Some(headers) = raw
            .as_deref()
            .ok()
            .and_then(crate::header_map::parse_borrowed)
        else {
            return self.reject(Reject::with(
                Code::Unavailable,
                format!("cannot read headers: {:?}", raw.err()),
            ));
        };
        // Clients never choose what the upstream believes was verified.
        for (k, _) in &headers {
            if edge.is_reserved_header(k) {
                if let Err(e) = abi::remove_request_header(k) {
                    return self.reject(Reject::with(
                        Code::Unavailable,
                        format!("cannot strip header: {e:?}"),
                    ));
                }
            }
        }
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
        };
        let path = get(":path").unwrap_or("");
        let s = &edge.settings;
        if self.reports.is_some()
            && (path.starts_with(&s.command_path) || path.starts_with(&s.module_route_prefix))
        {
            self.control_path = Some(path.chars().take(256).collect());
        }
        let head = RequestHead {
            method: get(":method").unwrap_or(""),
            path,
            content_type: get("content-type"),
            authorization: get("authorization"),
            content_length: get("content-length"),
            end_of_stream,
        };
        match edge.on_request_headers(&head, now_secs()) {
            HeadDecision::Public => {
                if let Some(m) = &self.metrics {
                    Metrics::bump(m.passed);
                }
                Action::Continue
            }
            HeadDecision::Forward(h) => self.forward(&h),
            // Continue, not Pause: in ABI 0.2.x a paused header phase also stops body
            // callbacks (Envoy maps it to StopAllIterationAndWatermark). The body phase
            // pauses until the whole command is here; the host must hold the headers
            // from the upstream meanwhile (Envoy: a buffer filter after this one), so
            // the verified headers set then are the ones the upstream sees.
            HeadDecision::AwaitBody(p) => {
                let Some(tickets) = &self.tickets else {
                    return self.reject(Reject::new(
                        Code::Unavailable,
                        "the edge filter is not configured",
                    ));
                };
                let ticket = tickets.borrow_mut().issue();
                if let Err(e) = abi::set_request_header(TICKET_HEADER, &ticket.value) {
                    return self.reject(Reject::with(
                        Code::Unavailable,
                        format!("cannot set ticket: {e:?}"),
                    ));
                }
                self.pending = Some((p, ticket));
                Action::Continue
            }
            HeadDecision::Reject(r) => self.reject(r),
        }
    }

    /// Buffers a command body and verifies it once complete.
    pub fn on_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let (Some(edge), Some((pending, ticket))) = (self.edge.clone(), self.pending.clone())
        else {
            return Action::Continue;
        };
        if let Some(r) = edge.body_too_large(body_size) {
            self.pending = None;
            return self.reject(r);
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.pending = None;
        let body = match abi::get_buffer(abi::BUFFER_HTTP_REQUEST_BODY, 0, body_size) {
            Ok(b) => b.unwrap_or_default(),
            Err(e) => {
                return self.reject(Reject::with(
                    Code::Unavailable,
                    format!("cannot read body: {e:?}"),
                ))
            }
        };
        if self.reports.is_some() {
            self.body = Some(body.clone());
        }
        // One clock read serves freshness and the timing histogram.
        let started = abi::now_nanos().ok();
        let checked = edge.on_request_body(&pending, &body, unix_secs(started), &HostStore);
        let histogram = self.metrics.as_ref().and_then(|m| m.command_us);
        if let (Some(id), Some(t0)) = (histogram, started) {
            if let Ok(t1) = abi::now_nanos() {
                let _ = abi::record(id, t1.saturating_sub(t0) / 1_000);
            }
        }
        match checked.and_then(|h| hand_over(&ticket, h)) {
            Ok(()) => {
                if let Some(m) = &self.metrics {
                    Metrics::bump(m.accepted);
                }
                Action::Continue
            }
            Err(r) => self.reject(r),
        }
    }

    /// Commands carry no trailers.
    pub fn on_request_trailers(&mut self) -> Action {
        if self.pending.take().is_some() {
            return self.reject(Reject::new(
                Code::Malformed,
                "trailers are not accepted on command requests",
            ));
        }
        Action::Continue
    }
}

/// Hands the verified headers to the stamp stage: in shared data for a stamp stage
/// in another VM, and in this VM's slots for one here (the only place it looks for
/// tickets of a ring this VM still keeps; a ticket whose ring was dropped is looked
/// up in shared data).
fn hand_over(ticket: &Ticket, headers: UpstreamHeaders) -> Result<(), Reject> {
    stamp::put(&HostStore, ticket, &headers).map_err(|e| {
        Reject::with(
            Code::Unavailable,
            format!("cannot hand over headers: {e:?}"),
        )
    })?;
    HANDOVER
        .with(|l| l.try_borrow_mut().map(|mut l| l.put(ticket, headers)))
        .map(|_kept_here| ())
        .map_err(|_| Reject::new(Code::Unavailable, "cannot hand over headers in this VM"))
}

/// The stamp stage: swaps the ticket for the verified headers (see `crate::stamp`).
pub struct Stamp {
    config: Rc<StampConfig>,
}

impl Stamp {
    /// Swaps the ticket, if any, for the headers stored under it.
    pub fn on_request_headers(&self) -> Action {
        let fail = |detail: String| {
            local_reject(&Reject::with(Code::Unavailable, detail));
            Action::Pause
        };
        let ticket = match abi::request_header(TICKET_HEADER) {
            Ok(Some(t)) => t,
            Ok(None) => return Action::Continue,
            Err(e) => return fail(format!("cannot read the ticket: {e:?}")),
        };
        // This VM's tickets are in its own slots; others in shared data.
        let local = HANDOVER.with(|l| match l.try_borrow_mut() {
            Ok(mut l) => l.take(&ticket),
            Err(_) => Some(Err(stamp::TakeError::Missing)),
        });
        let taken = local
            .unwrap_or_else(|| stamp::take(&HostStore, &self.config.stamp_key_prefix, &ticket));
        let stamped = match taken {
            Ok(h) => h,
            Err(e) => return fail(format!("verified headers not found: {e:?}")),
        };
        if let Err(e) = abi::remove_request_header(TICKET_HEADER) {
            return fail(format!("cannot remove ticket: {e:?}"));
        }
        for (k, v) in &stamped {
            if let Err(e) = abi::set_request_header(k, v) {
                return fail(format!("cannot set header: {e:?}"));
            }
        }
        Action::Continue
    }
}

/// A request context of either stage.
pub enum Stream {
    /// The verify stage.
    Verify(Box<Http>),
    /// The stamp stage.
    Stamp(Stamp),
}

/// Answers a request the filter has no context for (fail closed).
pub fn reject_unknown_context() -> Action {
    local_reject(&Reject::new(
        Code::Unavailable,
        "the edge filter has no context for this request",
    ));
    Action::Pause
}
