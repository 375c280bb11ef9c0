//! The verify stage's context for one request: strips client-sent `x-gw-*`
//! headers, decides on the head (JWT, role, route), buffers and checks a signed
//! command's body, and hands the verified headers to the stamp stage under a ticket.

use std::cell::RefCell;
use std::rc::Rc;

use gw_core::contract::{self, EdgeReport, Requester};
use gw_core::{Code, Reject};

use crate::abi::{self, BufferType};
use crate::edge::{
    header_safe, without_bearer_offers, Edge, HeadDecision, PendingCommand, RequestHead,
    UpstreamHeaders, WS_PROTOCOL_HEADER,
};
use crate::host::{self, local_reject, Action, HostStore, Metrics};
use crate::root::Reports;
use crate::stamp::{self, Ticket, Tickets};

/// The verify stage's context for one request.
pub struct VerifyStage {
    edge: Option<Rc<Edge>>,
    tickets: Option<Rc<RefCell<Tickets>>>,
    metrics: Option<Rc<Metrics>>,
    pending: Option<(PendingCommand, Ticket)>,
    reports: Option<Reports>,
    /// The request path, when reporting is on (reported on rejection).
    reported_path: Option<String>,
    /// The command body, once read, when reporting is on (reported on rejection).
    body: Option<Vec<u8>>,
    /// Who sent it, once the JWT verified (reported on rejection).
    requester: Option<Requester>,
}

impl VerifyStage {
    /// A context of the verify stage (an unconfigured one rejects every request).
    pub fn new(
        edge: Option<Rc<Edge>>,
        tickets: Option<Rc<RefCell<Tickets>>>,
        metrics: Option<Rc<Metrics>>,
        reports: Option<Reports>,
    ) -> VerifyStage {
        VerifyStage {
            edge,
            tickets,
            metrics,
            pending: None,
            reports,
            reported_path: None,
            body: None,
            requester: None,
        }
    }

    /// Queues a rejected control request for the ledger (when reporting is on).
    fn report(&self, r: &Reject) {
        let (Some(reports), Some(path)) = (&self.reports, &self.reported_path) else {
            return;
        };
        let report = EdgeReport::rejected(
            r.code,
            path,
            self.body.as_deref().unwrap_or_default(),
            abi::now_nanos().map_or(0, |n| n / 1_000_000),
            self.requester.as_ref(),
        );
        reports
            .queue
            .borrow_mut()
            .push(report, reports.config.max_queued);
    }

    fn reject(&self, r: Reject) -> Action {
        host::debug(&format!("gw_edge: reject {}: {}", r.code, r.detail));
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
            if contract::headers::is_reserved(k) {
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
                .map(|(_, v)| v.as_ref())
        };
        // The bearer token stops here, whatever the decision (read below from
        // the copy): the upstream is told what was verified (`x-gw-*`, sealed),
        // never reads the token, and would only keep it in its logs and traces.
        if get("authorization").is_some() {
            if let Err(e) = abi::remove_request_header("authorization") {
                return self.reject(Reject::with(
                    Code::Unavailable,
                    format!("cannot strip authorization: {e:?}"),
                ));
            }
        }
        // Every line of the subprotocol header, as one list (a second line must
        // not carry a token past the rewrite below).
        let ws_lines: Vec<&str> = headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(WS_PROTOCOL_HEADER))
            .map(|(_, v)| v.as_ref())
            .collect();
        let ws_protocols = match ws_lines.as_slice() {
            [] => None,
            [one] => Some(std::borrow::Cow::Borrowed(*one)),
            many => Some(std::borrow::Cow::Owned(many.join(", "))),
        };
        // A token offered as a WebSocket subprotocol stops here, whatever the
        // decision (read below from the unmodified copy).
        if let Some(rest) = ws_protocols.as_deref().and_then(without_bearer_offers) {
            // Every line goes (Envoy's replace changes only a header's first line),
            // then what is left comes back as one.
            let done = abi::remove_request_header(WS_PROTOCOL_HEADER).and_then(|()| {
                if rest.is_empty() {
                    Ok(())
                } else {
                    abi::set_request_header(WS_PROTOCOL_HEADER, &header_safe(&rest))
                }
            });
            if let Err(e) = done {
                return self.reject(Reject::with(
                    Code::Unavailable,
                    format!("cannot rewrite {WS_PROTOCOL_HEADER}: {e:?}"),
                ));
            }
        }
        let path = get(":path").unwrap_or("");
        // Every refusal is reported (the ledger has a row for each), whatever the
        // route; a refusal before the path is read has no route.
        if self.reports.is_some() {
            self.reported_path = Some(contract::report_route(path));
        }
        let head = RequestHead {
            method: get(":method").unwrap_or(""),
            path,
            content_type: get("content-type"),
            authorization: get("authorization"),
            content_length: get("content-length"),
            upgrade: get("upgrade"),
            websocket_protocols: ws_protocols.as_deref(),
            end_of_stream,
        };
        match edge.on_request_headers(&head, host::now_secs()) {
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
                if let Err(e) = abi::set_request_header(contract::headers::TICKET, &ticket.value) {
                    return self.reject(Reject::with(
                        Code::Unavailable,
                        format!("cannot set ticket: {e:?}"),
                    ));
                }
                if self.reports.is_some() {
                    self.requester = Some(p.requester());
                }
                self.pending = Some((p, ticket));
                Action::Continue
            }
            HeadDecision::Reject(r, who) => {
                self.requester = who;
                self.reject(r)
            }
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
        let body = match abi::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
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
        let checked = edge.on_request_body(&pending, &body, host::unix_secs(started), &HostStore);
        let histogram = self.metrics.as_ref().and_then(|m| m.command_us);
        if let (Some(id), Some(t0)) = (histogram, started) {
            if let Ok(t1) = abi::now_nanos() {
                let _ = abi::record(id, t1.saturating_sub(t0) / 1_000);
            }
        }
        let resend = checked.as_ref().is_ok_and(|c| c.resend);
        match checked.and_then(|c| hand_over(&ticket, c.headers)) {
            Ok(()) => {
                if let Some(m) = &self.metrics {
                    Metrics::bump(m.accepted);
                    if resend {
                        Metrics::bump(m.resend);
                    }
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
    host::with_local_slots(|l| l.put(ticket, headers))
        .map(|_kept_here| ())
        .ok_or(Reject::new(
            Code::Unavailable,
            "cannot hand over headers in this VM",
        ))
}
