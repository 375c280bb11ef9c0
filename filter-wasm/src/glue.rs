//! The proxy-wasm shell: moves headers, bodies, shared data, metrics and time between
//! the host and [`crate::edge`]. The SDK provides the context dispatch; every host
//! call goes through [`crate::abi`], so no host answer can panic this code.

use std::rc::Rc;

use gw_core::{Code, Reject};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::abi::{self, Level};

use std::cell::RefCell;

use crate::config::{Stage, StampConfig};
use crate::edge::{Edge, HeadDecision, PendingCommand, RequestHead, UpstreamHeaders};
use crate::replay_cas::{SharedStore, StoreError};
use crate::stamp::{self, Ticket, Tickets, TICKET_HEADER};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

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

#[derive(Default)]
struct Root {
    edge: Option<Rc<Edge>>,
    stamp: Option<Rc<StampConfig>>,
    tickets: Option<Rc<RefCell<Tickets>>>,
    metrics: Option<Rc<Metrics>>,
}

/// A random id for this VM's ticket slots.
fn vm_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(abi::now_nanos().unwrap_or(0));
    h.finish()
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
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
                self.tickets = Some(Rc::new(RefCell::new(Tickets::new(
                    vm_id(),
                    &s.stamp_key_prefix,
                ))));
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

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        if let Some(stamp) = &self.stamp {
            return Some(Box::new(Stamp {
                config: stamp.clone(),
            }));
        }
        Some(Box::new(Http {
            edge: self.edge.clone(),
            tickets: self.tickets.clone(),
            metrics: self.metrics.clone(),
            pending: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    edge: Option<Rc<Edge>>,
    tickets: Option<Rc<RefCell<Tickets>>>,
    metrics: Option<Rc<Metrics>>,
    pending: Option<(PendingCommand, Ticket)>,
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
    abi::now_nanos().map_or(0, |ns| ns / 1_000_000_000)
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

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(edge) = self.edge.clone() else {
            return self.reject(Reject::new(
                Code::Unavailable,
                "the edge filter is not configured",
            ));
        };
        let headers = match abi::request_headers() {
            Ok(h) => h,
            Err(e) => {
                return self.reject(Reject::with(
                    Code::Unavailable,
                    format!("cannot read headers: {e:?}"),
                ))
            }
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
                .map(|(_, v)| v.as_str())
        };
        let head = RequestHead {
            method: get(":method").unwrap_or(""),
            path: get(":path").unwrap_or(""),
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

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
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
        match edge.on_request_body(&pending, &body, now_secs(), &HostStore) {
            Ok(h) => match stamp::put(&HostStore, &ticket, &h) {
                Ok(()) => {
                    if let Some(m) = &self.metrics {
                        Metrics::bump(m.accepted);
                    }
                    Action::Continue
                }
                Err(e) => self.reject(Reject::with(
                    Code::Unavailable,
                    format!("cannot hand over headers: {e:?}"),
                )),
            },
            Err(r) => self.reject(r),
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if self.pending.take().is_some() {
            return self.reject(Reject::new(
                Code::Malformed,
                "trailers are not accepted on command requests",
            ));
        }
        Action::Continue
    }
}

/// The stamp stage: swaps the ticket for the verified headers (see `crate::stamp`).
struct Stamp {
    config: Rc<StampConfig>,
}

impl Context for Stamp {}

impl HttpContext for Stamp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let fail = |detail: String| {
            local_reject(&Reject::with(Code::Unavailable, detail));
            Action::Pause
        };
        let ticket = match abi::request_header(TICKET_HEADER) {
            Ok(Some(t)) => t,
            Ok(None) => return Action::Continue,
            Err(e) => return fail(format!("cannot read the ticket: {e:?}")),
        };
        let stamped = match stamp::take(&HostStore, &self.config.stamp_key_prefix, &ticket) {
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
