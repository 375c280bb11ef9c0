//! The proxy-wasm shell: moves headers, bodies, shared data, metrics and time between
//! the host and [`crate::edge`]. The SDK provides the context dispatch; every host
//! call goes through [`crate::abi`], so no host answer can panic this code.

use std::rc::Rc;

use gw_core::{Code, Reject};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::abi::{self, Level};

use crate::config::Settings;
use crate::edge::{Edge, HeadDecision, PendingCommand, RequestHead, UpstreamHeaders};
use crate::replay_cas::{SharedStore, StoreError};

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
    metrics: Option<Rc<Metrics>>,
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
        match Settings::parse(&bytes) {
            Ok(s) => {
                info(&format!(
                    "gw_edge: configured: {} command key(s), {} JWT key(s), {} route rule(s), max body {} bytes",
                    s.control.keyring.len(),
                    s.jwks.keys.len(),
                    s.routes.len(),
                    s.control.max_body
                ));
                self.edge = Some(Rc::new(Edge::new(s)));
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
        Some(Box::new(Http {
            edge: self.edge.clone(),
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
    metrics: Option<Rc<Metrics>>,
    pending: Option<PendingCommand>,
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

impl Http {
    fn reject(&self, r: Reject) -> Action {
        debug(&format!("gw_edge: reject {}: {}", r.code, r.detail));
        if let Some(m) = &self.metrics {
            m.rejected(r.code);
        }
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
            HeadDecision::AwaitBody(p) => {
                self.pending = Some(p);
                Action::Pause
            }
            HeadDecision::Reject(r) => self.reject(r),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let (Some(edge), Some(pending)) = (self.edge.clone(), self.pending.clone()) else {
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
            Ok(h) => self.forward(&h),
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
