//! The root context: one per filter entry (stage) and VM. It parses the plugin
//! configuration once, makes the request contexts of its stage, and (verify stage)
//! ships queued edge reports to the ledger on its tick.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use gw_core::contract::EdgeReport;

use crate::abi::{self, BufferType};
use crate::config::{Stage, StampConfig};
use crate::edge::Edge;
use crate::host::{self, add, Metrics};
use crate::report::{Backoff, Outcome, ReportConfig, ReportQueue};
use crate::stamp::Tickets;
use crate::stamp_stage::StampStage;
use crate::verify_stage::VerifyStage;

/// Edge-decision reporting (see [`crate::report`]): the queue the request contexts
/// fill and the root context's tick drains.
#[derive(Clone)]
pub struct Reports {
    /// Where and how often.
    pub config: Rc<ReportConfig>,
    /// Reports waiting.
    pub queue: Rc<RefCell<ReportQueue>>,
    /// Reports per in-flight call token.
    in_flight: Rc<RefCell<Flying>>,
    /// Ticks to skip after failed deliveries.
    backoff: Rc<Cell<Backoff>>,
    sent: Option<u32>,
    failed: Option<u32>,
    dropped: Option<u32>,
    retried: Option<u32>,
}

/// The reports of each batch in flight by its call's token, and whether they
/// went alone ([`crate::report::Batch::alone`]).
type Flying = BTreeMap<u32, (Vec<EdgeReport>, bool)>;

impl Reports {
    /// The reports in flight go back to the VM's queue, first, for a root context
    /// to send again (their answers would come to a context that is gone or no
    /// longer sends them; a copy the ledger already recorded is dropped there by
    /// its id). No host call here.
    fn give_back(&self) {
        let (Ok(mut flying), Ok(mut queue)) =
            (self.in_flight.try_borrow_mut(), self.queue.try_borrow_mut())
        else {
            return;
        };
        // The latest batch back first, so that the oldest ends up at the front.
        for (_, (reports, alone)) in std::mem::take(&mut *flying).into_iter().rev() {
            queue.put_back(reports, alone);
        }
    }

    /// `reports` were not delivered: back to the front of the queue, counted, and
    /// the next batches wait.
    fn retry(&self, reports: Vec<EdgeReport>, alone: bool) {
        add(self.retried, reports.len());
        self.queue.borrow_mut().put_back(reports, alone);
        let mut b = self.backoff.get();
        b.failed(Backoff::cap(self.config.period_ms));
        self.backoff.set(b);
    }
}

impl Drop for Root {
    /// The root context is deleted (a configuration update): the reports it has
    /// in flight go back to the VM's queue for the next root to send.
    fn drop(&mut self) {
        if let Some(r) = &self.reports {
            r.give_back();
        }
    }
}

/// Most batches sent per tick.
const BATCHES_PER_TICK: usize = 4;

/// A request context of either stage.
pub enum Stream {
    /// The verify stage.
    Verify(Box<VerifyStage>),
    /// The stamp stage.
    Stamp(StampStage),
}

/// A root context.
#[derive(Default)]
pub struct Root {
    edge: Option<Rc<Edge>>,
    stamp: Option<Rc<StampConfig>>,
    tickets: Option<Rc<RefCell<Tickets>>>,
    metrics: Option<Rc<Metrics>>,
    reports: Option<Reports>,
}

impl Root {
    /// Parses and validates the plugin configuration; `false` fails plugin start.
    pub fn on_configure(&mut self) -> bool {
        // Configured again (a host may reuse a root context): nothing of the
        // stage it was stays, and a configuration refused or missing leaves
        // an unconfigured verify stage, which rejects every request (a stamp
        // stage kept would skip every check).
        self.stamp = None;
        self.edge = None;
        if let Some(old) = self.reports.take() {
            old.give_back();
        }
        let bytes = match abi::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(b)) if !b.is_empty() => b,
            Ok(_) => {
                host::error("gw_edge: no plugin configuration given");
                return false;
            }
            Err(e) => {
                host::error(&format!(
                    "gw_edge: cannot read the plugin configuration: {e:?}"
                ));
                return false;
            }
        };
        match Stage::parse(&bytes) {
            Ok(Stage::Stamp(c)) => {
                host::info("gw_edge: stamp stage configured");
                self.stamp = Some(Rc::new(c));
                true
            }
            Ok(Stage::Verify(s)) => {
                host::info(&format!(
                    "gw_edge: configured: {} command key(s), {} JWT key(s), {} route rule(s), max body {} bytes",
                    s.control.keyring.len(),
                    s.jwks.keys.len(),
                    s.routes.len(),
                    s.control.max_body
                ));
                let Some(tickets) = host::vm_tickets(&s.stamp_key_prefix) else {
                    host::error("gw_edge: cannot take this VM's ticket issuer");
                    return false;
                };
                let registered = tickets
                    .try_borrow()
                    .ok()
                    .and_then(|t| host::with_local_slots(|l| l.register(&t)));
                if registered.is_none() {
                    host::error("gw_edge: cannot register this VM's ticket slots");
                    return false;
                }
                self.tickets = Some(tickets);
                if let Some(rc) = s.report.clone() {
                    self.reports = start_reports(rc);
                }
                self.edge = Some(Rc::new(Edge::new(*s, host::vm_id())));
                self.metrics = Some(Rc::new(Metrics::define()));
                true
            }
            Err(e) => {
                host::error(&format!("gw_edge: invalid plugin configuration: {e}"));
                false
            }
        }
    }

    /// A context for one request of this stage (an unconfigured verify stage rejects
    /// every request).
    pub fn create_stream(&self) -> Stream {
        if let Some(stamp) = &self.stamp {
            return Stream::Stamp(StampStage::new(stamp.clone()));
        }
        Stream::Verify(Box::new(VerifyStage::new(
            self.edge.clone(),
            self.tickets.clone(),
            self.metrics.clone(),
            self.reports.clone(),
        )))
    }

    /// Ships queued edge reports to the ledger.
    pub fn on_tick(&mut self) {
        let (Some(r), Some(edge)) = (self.reports.clone(), self.edge.clone()) else {
            return;
        };
        // No time from the host: a batch could not be sealed with one the
        // sidecar believes. The reports wait for the next tick.
        let now = host::now_secs();
        if now == 0 {
            return;
        }
        // What did not fit since the last tick, one report per code.
        r.queue.borrow_mut().sum_dropped(now.saturating_mul(1000));
        let mut b = r.backoff.get();
        let batches = b.batches_now(BATCHES_PER_TICK, r.in_flight.borrow().len());
        r.backoff.set(b);
        for _ in 0..batches {
            let Some(batch) = r.queue.borrow_mut().next_batch(r.config.max_batch) else {
                break;
            };
            // Sealed when sent (a batch sent again is sealed again): the sidecar
            // records only what the key's holder wrote.
            let nonce = edge.nonces.next();
            let seal = edge.settings.edge_key.seal_report(now, &nonce, &batch.body);
            let headers = vec![
                (":method", "POST"),
                (":path", r.config.path.as_str()),
                (":authority", r.config.authority.as_str()),
                ("content-type", "application/json"),
                (gw_core::contract::headers::STAMP, seal.as_str()),
            ];
            let timeout = std::time::Duration::from_millis(r.config.timeout_ms);
            match abi::http_call(&r.config.cluster, &headers, &batch.body, timeout) {
                Ok(token) => {
                    r.in_flight
                        .borrow_mut()
                        .insert(token, (batch.reports, batch.alone));
                }
                Err(e) => {
                    host::warn(&format!(
                        "gw_edge: cannot report {} edge decision(s) now, kept: {e:?}",
                        batch.reports.len()
                    ));
                    r.retry(batch.reports, batch.alone);
                    break;
                }
            }
        }
        let new = r.queue.borrow_mut().take_dropped();
        if new > 0 {
            add(r.dropped, usize::try_from(new).unwrap_or(usize::MAX));
        }
    }

    /// The ledger's answer to a report batch.
    pub fn on_http_call_response(&mut self, token: u32) {
        let Some(r) = &self.reports else { return };
        let Some((reports, alone)) = r.in_flight.borrow_mut().remove(&token) else {
            return;
        };
        let n = reports.len();
        let status = abi::http_call_response_status();
        match Outcome::of(status) {
            Outcome::Delivered => {
                r.queue.borrow_mut().delivered(reports);
                add(r.sent, n);
                let mut b = r.backoff.get();
                b.succeeded();
                r.backoff.set(b);
            }
            Outcome::Refused => {
                let failed = r.queue.borrow_mut().refused(reports);
                if failed == 0 {
                    host::warn(&format!(
                        "gw_edge: the ledger cannot read a batch of {n} edge decisions (status {status}): sent again one per batch"
                    ));
                } else {
                    host::warn(&format!(
                        "gw_edge: the ledger cannot read an edge decision (status {status}; a sidecar older than this filter?): counted in the next sum of its code, unless it was one"
                    ));
                    add(r.failed, usize::try_from(failed).unwrap_or(usize::MAX));
                }
            }
            Outcome::Retry => {
                // 401: the sidecar did not believe the batch's seal.
                let why = if status == 401 {
                    " (the sidecar refused the seal: is its GW_EDGE_KEY_HEX this filter's edge_key_hex?)"
                } else {
                    ""
                };
                host::warn(&format!(
                    "gw_edge: {n} edge decision(s) not delivered (status {status}{why}), kept to send again"
                ));
                r.retry(reports, alone);
            }
        }
    }
}

/// Starts the report tick; `None` (logged) on a host without ticks.
fn start_reports(rc: ReportConfig) -> Option<Reports> {
    let period = u32::try_from(rc.period_ms).unwrap_or(u32::MAX);
    match abi::set_tick_period_ms(period) {
        Ok(()) => {
            let counter = |name: &str| abi::define_counter(name).ok();
            let Some(queue) = host::vm_report_queue() else {
                host::error(
                    "gw_edge: cannot take this VM's report queue: edge decisions are not reported",
                );
                return None;
            };
            Some(Reports {
                config: Rc::new(rc),
                queue,
                in_flight: Rc::default(),
                backoff: Rc::default(),
                sent: counter("gw_edge.report.sent"),
                failed: counter("gw_edge.report.failed"),
                dropped: counter("gw_edge.report.dropped"),
                retried: counter("gw_edge.report.retried"),
            })
        }
        Err(e) => {
            host::error(&format!(
                "gw_edge: host has no ticks ({e:?}): edge decisions are not reported"
            ));
            None
        }
    }
}
