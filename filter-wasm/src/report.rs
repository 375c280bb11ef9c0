//! Edge decisions reported to the audit ledger.
//!
//! A rejection at the edge never reaches the sidecar, so the filter reports it: each
//! rejected request (on every route: a request with no token too) becomes a small
//! JSON record in a bounded per-VM queue, and the root context's tick sends the queue
//! as one `POST` (a JSON array) to the configured cluster with `dispatch_http_call`
//! (ABI 0.2.1; no Envoy-only features). Bounded everywhere: queue length, records per
//! batch, bytes per batch; what does not fit is counted as dropped, never buffered
//! without limit. Delivery is at least once: a report stays queued until the
//! ledger took it, a batch that failed (no answer, the sidecar down or restarting,
//! a 5xx) goes again after a backoff ([`Backoff`]), and each report carries an id
//! the sidecar records once, so a batch sent again after a lost answer adds no row.
//! A report that does not fit the bounded queue (or a batch) is counted as
//! dropped, by its code, and a tick queues one report per code standing for
//! them ([`EdgeReport::sum`]: `unrecorded: n`) unless one of the code is still
//! out (queued or in flight: the count waits for it to be delivered, so a
//! report never changes once sent and at most one per code is out): the ledger
//! sums them in a row, so a flood leaves a count of every refusal. A batch the
//! ledger cannot read (400, 413, 415, 422: a sidecar older than the filter, or
//! one report it refuses) is sent again one report per batch, so one report it
//! cannot read no longer costs the others; a report refused alone is counted
//! as failed and, unless it is a sum itself, counted under its code for the
//! next sum: the ledger still records that the refusal happened. Reports are
//! lost only that way (a sum refused alone) or with the VM.
//! The sidecar writes a row per report within a budget per code, and sums the rest
//! (anyone who reaches Envoy can make it refuse requests without end).
//! The report itself is the contract's ([`gw_core::contract::EdgeReport`]).

use std::collections::VecDeque;

use gw_core::contract::{EdgeReport, EDGE_DECISIONS_PATH, MAX_REPORT_BATCH_BYTES};
use serde::Deserialize;

/// `report` in the plugin configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    /// Upstream cluster (Envoy cluster name) of the sidecar.
    pub cluster: String,
    /// Path of the sidecar's endpoint.
    #[serde(default = "default_path")]
    pub path: String,
    /// `:authority` of the report requests.
    #[serde(default = "default_authority")]
    pub authority: String,
    /// Tick period: how often queued reports are sent, milliseconds.
    #[serde(default = "default_period")]
    pub period_ms: u64,
    /// Reports kept while waiting (per worker VM).
    #[serde(default = "default_queue")]
    pub max_queued: usize,
    /// Reports per request.
    #[serde(default = "default_batch")]
    pub max_batch: usize,
    /// Timeout of one report request, milliseconds.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

fn default_path() -> String {
    EDGE_DECISIONS_PATH.into()
}
fn default_authority() -> String {
    "sidecar".into()
}
fn default_period() -> u64 {
    200
}
fn default_queue() -> usize {
    1024
}
fn default_batch() -> usize {
    64
}
fn default_timeout() -> u64 {
    2000
}

impl ReportConfig {
    /// Checks bounds.
    pub fn validate(&self) -> Result<(), String> {
        if self.cluster.is_empty() || !self.path.starts_with('/') {
            return Err("report: cluster must be set and path must start with '/'".into());
        }
        if !(10..=60_000).contains(&self.period_ms) || !(100..=60_000).contains(&self.timeout_ms) {
            return Err("report: period_ms must be 10..=60000 and timeout_ms 100..=60000".into());
        }
        if !(1..=65_536).contains(&self.max_queued) || !(1..=1024).contains(&self.max_batch) {
            return Err("report: max_queued must be 1..=65536 and max_batch 1..=1024".into());
        }
        Ok(())
    }
}

/// Most bytes of reports a worker VM keeps (waiting or in flight: their bodies, as
/// hex, and fields), whatever `max_queued` says: a report holds up to 128 KiB of
/// hex, and 65 536 of them would not fit a wasm32 heap (an allocation failure
/// traps the VM, which then fails every request on its worker).
pub const MAX_QUEUED_BYTES: usize = 8 << 20;

/// The bounded queue, the reports in flight and the drop counter.
///
/// A report stays here until the ledger took it: [`ReportQueue::next_batch`] moves
/// reports in flight (still counted against both bounds), and the answer either
/// releases them ([`ReportQueue::delivered`]) or puts them back at the front, in
/// their order ([`ReportQueue::put_back`]), to go again.
#[derive(Debug, Default)]
pub struct ReportQueue {
    queue: VecDeque<EdgeReport>,
    /// What the queued and in-flight reports hold ([`size`]).
    bytes: usize,
    /// Reports in flight.
    in_flight: usize,
    /// The ids of queued reports to send one per batch (those of a batch the
    /// ledger refused, [`ReportQueue::refused`]), wherever they stand.
    alone: std::collections::BTreeSet<String>,
    dropped: u64,
    /// Reports dropped and not yet standing in a summing report, by code.
    unsent: std::collections::BTreeMap<String, u64>,
    /// Codes with a summing report out (queued or in flight).
    sums_out: std::collections::BTreeSet<String>,
    /// This VM's random origin: the first half of every report's id.
    origin: u64,
    /// The next report's sequence number.
    next_seq: u64,
}

/// A batch taken off the queue: the request body and the reports it holds (kept
/// until the ledger answers).
#[derive(Debug)]
pub struct Batch {
    /// The JSON array.
    pub body: Vec<u8>,
    /// Its reports, oldest first.
    pub reports: Vec<EdgeReport>,
    /// Whether its one report goes alone (of a batch the ledger refused,
    /// [`ReportQueue::refused`]): put back, it goes alone again.
    pub alone: bool,
}

/// About what a report takes in memory and in a batch.
fn size(r: &EdgeReport) -> usize {
    r.raw_hex.len()
        + r.path.len()
        + r.requester.len()
        + r.requester_roles.len()
        + r.token_issuer.len()
        + r.code.len()
        + r.id.len()
        + 128
}

impl ReportQueue {
    /// An empty queue whose reports' ids start with `origin` (a random number per
    /// VM, so that ids from every worker and every start differ).
    pub fn new(origin: u64) -> ReportQueue {
        ReportQueue {
            origin,
            ..ReportQueue::default()
        }
    }

    /// Queues `r`, giving it an id when it has none; `false` (and counted) when
    /// the queue is full, by count (queued and in flight) or by
    /// [`MAX_QUEUED_BYTES`].
    pub fn push(&mut self, mut r: EdgeReport, max_queued: usize) -> bool {
        if r.id.is_empty() {
            r.id = format!("{:016x}-{:x}", self.origin, self.next_seq);
        }
        let n = size(&r);
        if self.queue.len() + self.in_flight >= max_queued || self.bytes + n > MAX_QUEUED_BYTES {
            self.dropped += 1;
            let n = self.unsent.entry(r.code).or_default();
            *n = n.saturating_add(1);
            return false;
        }
        self.next_seq += 1;
        self.bytes += n;
        self.queue.push_back(r);
        true
    }

    /// Takes the oldest report off the queue, for good (it does not fit a batch).
    fn drop_front(&mut self) {
        if let Some(r) = self.queue.pop_front() {
            self.alone.remove(&r.id);
            self.bytes -= size(&r);
            self.dropped += 1;
            if r.unrecorded.is_some() {
                self.sums_out.remove(&r.code);
            }
            let n = self.unsent.entry(r.code).or_default();
            *n = n.saturating_add(r.unrecorded.unwrap_or(1));
        }
    }

    /// Queues what was dropped as one report per code standing for them
    /// ([`EdgeReport::sum`], at `ts_ms`), for each code with none out (queued or
    /// in flight: its count waits). Outside the queue's bounds: at most one per
    /// code is out, and each is small.
    pub fn sum_dropped(&mut self, ts_ms: u64) {
        let ready: Vec<String> = self
            .unsent
            .keys()
            .filter(|c| !self.sums_out.contains(*c))
            .cloned()
            .collect();
        for code in ready {
            let Some(n) = self.unsent.remove(&code) else {
                continue;
            };
            self.sums_out.insert(code.clone());
            let mut r = EdgeReport::sum(&code, n, ts_ms);
            r.id = format!("{:016x}-{:x}", self.origin, self.next_seq);
            self.next_seq += 1;
            self.bytes += size(&r);
            self.queue.push_back(r);
        }
    }

    /// Reports dropped since the last call (they did not fit), and resets the count.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    /// Reports waiting (not in flight).
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Reports in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The next batch: at most `max_batch` reports and [`MAX_REPORT_BATCH_BYTES`]
    /// (a single report larger than that is dropped, counted). Its reports are in
    /// flight until [`ReportQueue::delivered`] or [`ReportQueue::put_back`].
    pub fn next_batch(&mut self, max_batch: usize) -> Option<Batch> {
        let mut body = b"[".to_vec();
        let mut reports = Vec::new();
        let alone = self
            .queue
            .front()
            .is_some_and(|r| self.alone.contains(&r.id));
        let most = if alone { 1 } else { max_batch };
        while reports.len() < most {
            let Some(r) = self.queue.front() else { break };
            // One to go alone is not batched with those before it either.
            if !reports.is_empty() && self.alone.contains(&r.id) {
                break;
            }
            let Ok(json) = serde_json::to_vec(r) else {
                self.drop_front();
                continue;
            };
            if body.len() + json.len() + 2 > MAX_REPORT_BATCH_BYTES {
                if reports.is_empty() {
                    self.drop_front();
                    continue;
                }
                break;
            }
            if !reports.is_empty() {
                body.push(b',');
            }
            body.extend_from_slice(&json);
            reports.extend(self.queue.pop_front());
        }
        body.push(b']');
        self.in_flight += reports.len();
        for r in &reports {
            self.alone.remove(&r.id);
        }
        (!reports.is_empty()).then_some(Batch {
            body,
            reports,
            alone,
        })
    }

    /// The ledger took `reports` (or refused them for good): they leave.
    pub fn delivered(&mut self, reports: Vec<EdgeReport>) {
        self.in_flight = self.in_flight.saturating_sub(reports.len());
        for r in &reports {
            self.bytes = self.bytes.saturating_sub(size(r));
            if r.unrecorded.is_some() {
                self.sums_out.remove(&r.code);
            }
        }
    }

    /// The ledger refused `reports` as a batch it cannot read ([`Outcome::Refused`]).
    /// Several: they go first again, one per batch, to find the one it cannot
    /// read. One alone: let go, and counted under its code for the next tick's
    /// sum ([`Self::sum_dropped`]), unless it is a sum itself (let go for good:
    /// summed again it would be refused again). Returns the reports refused
    /// alone.
    pub fn refused(&mut self, reports: Vec<EdgeReport>) -> u64 {
        if reports.len() > 1 {
            self.put_back(reports, true);
            return 0;
        }
        self.in_flight = self.in_flight.saturating_sub(reports.len());
        let mut alone = 0;
        for r in reports {
            alone += 1;
            self.bytes = self.bytes.saturating_sub(size(&r));
            if r.unrecorded.is_some() {
                self.sums_out.remove(&r.code);
            } else {
                let n = self.unsent.entry(r.code).or_default();
                *n = n.saturating_add(1);
            }
        }
        alone
    }

    /// `reports` were not delivered: they go first again, in their order (still
    /// within both bounds: they were counted while in flight), one per batch
    /// when `alone` ([`Batch::alone`]; a report the ledger may not be able to
    /// read is not batched with others again before it went alone).
    pub fn put_back(&mut self, reports: Vec<EdgeReport>, alone: bool) {
        self.in_flight = self.in_flight.saturating_sub(reports.len());
        if alone {
            self.alone.extend(reports.iter().map(|r| r.id.clone()));
        }
        for r in reports.into_iter().rev() {
            self.queue.push_front(r);
        }
    }
}

/// What to do with a batch, by the `:status` of the ledger's answer (0: none, the
/// call failed or timed out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: recorded (or summed) by the ledger.
    Delivered,
    /// The sidecar cannot read the batch (400, 413, 415, 422): sent as it is, it
    /// would be refused again (a sidecar older than the filter, or one report it
    /// cannot read); [`ReportQueue::refused`].
    Refused,
    /// Anything else (no answer, 5xx, 401/403 of a peer not yet trusted, 404 of a
    /// sidecar not yet routed, 429): kept and sent again.
    Retry,
}

impl Outcome {
    /// The outcome of an answer with `status`.
    pub fn of(status: u32) -> Outcome {
        match status {
            200..=299 => Outcome::Delivered,
            400 | 413 | 415 | 422 => Outcome::Refused,
            _ => Outcome::Retry,
        }
    }
}

/// Ticks skipped after failed deliveries: 1, 2, 4, … up to `cap` ticks, then one
/// batch at a time (none while one is in flight) until a delivery succeeds, so a
/// sidecar that is down or does not answer is probed, not flooded, and hears of
/// the backlog as soon as it answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backoff {
    failures: u32,
    skip: u32,
}

impl Backoff {
    /// Most ticks skipped in a row for a tick period of `period_ms`: about 5 s.
    pub fn cap(period_ms: u64) -> u32 {
        u32::try_from((5_000 / period_ms.max(1)).max(1)).unwrap_or(u32::MAX)
    }

    /// A delivery failed.
    pub fn failed(&mut self, cap: u32) {
        self.failures = self.failures.saturating_add(1);
        let wait = 1u32 << self.failures.min(16).saturating_sub(1);
        self.skip = wait.min(cap);
    }

    /// A delivery succeeded: full speed again.
    pub fn succeeded(&mut self) {
        *self = Backoff::default();
    }

    /// At a tick, with `in_flight` batches unanswered: how many batches to send
    /// now (0 while waiting).
    pub fn batches_now(&mut self, most: usize, in_flight: usize) -> usize {
        if self.skip > 0 {
            self.skip -= 1;
            return 0;
        }
        match (self.failures, in_flight) {
            (0, _) => most,
            (_, 0) => 1,
            _ => 0,
        }
    }
}
