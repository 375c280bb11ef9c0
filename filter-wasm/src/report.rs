//! Edge decisions reported to the audit ledger.
//!
//! A rejection at the edge never reaches the sidecar, so the filter reports it: each
//! rejected request (on every route: a request with no token too) becomes a small
//! JSON record in a bounded per-VM queue, and the root context's tick sends the queue
//! as one `POST` (a JSON array) to the configured cluster with `dispatch_http_call`
//! (ABI 0.2.1; no Envoy-only features). Bounded everywhere: queue length, records per
//! batch, bytes per batch; what does not fit is counted as dropped, never buffered
//! without limit. Delivery is at most once (a failed batch is counted, not retried):
//! the edge is a first line; the sidecar's own rows are the authoritative record.
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

/// Most bytes of reports a worker VM keeps waiting (their bodies, as hex, and
/// fields), whatever `max_queued` says: a report holds up to 128 KiB of hex,
/// and 65 536 of them would not fit a wasm32 heap (an allocation failure traps
/// the VM, which then fails every request on its worker).
pub const MAX_QUEUED_BYTES: usize = 8 << 20;

/// The bounded queue and its drop counter.
#[derive(Debug, Default)]
pub struct ReportQueue {
    queue: VecDeque<EdgeReport>,
    /// What the queued reports hold ([`size`]).
    bytes: usize,
    dropped: u64,
}

/// About what a report takes in memory and in a batch.
fn size(r: &EdgeReport) -> usize {
    r.raw_hex.len()
        + r.path.len()
        + r.requester.len()
        + r.requester_roles.len()
        + r.token_issuer.len()
        + r.code.len()
        + 128
}

impl ReportQueue {
    /// Queues `r`; `false` (and counted) when the queue is full, by count or by
    /// [`MAX_QUEUED_BYTES`].
    pub fn push(&mut self, r: EdgeReport, max_queued: usize) -> bool {
        let n = size(&r);
        if self.queue.len() >= max_queued || self.bytes + n > MAX_QUEUED_BYTES {
            self.dropped += 1;
            return false;
        }
        self.bytes += n;
        self.queue.push_back(r);
        true
    }

    /// Takes the oldest report off the queue.
    fn pop(&mut self) {
        if let Some(r) = self.queue.pop_front() {
            self.bytes -= size(&r);
        }
    }

    /// Reports dropped since the last call (they did not fit), and resets the count.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    /// Reports waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The next batch as a JSON array: at most `max_batch` reports and
    /// [`MAX_REPORT_BATCH_BYTES`] (a single report larger than that is dropped,
    /// counted).
    pub fn next_batch(&mut self, max_batch: usize) -> Option<(Vec<u8>, usize)> {
        let mut body = b"[".to_vec();
        let mut n = 0;
        while n < max_batch {
            let Some(r) = self.queue.front() else { break };
            let Ok(json) = serde_json::to_vec(r) else {
                self.pop();
                self.dropped += 1;
                continue;
            };
            if body.len() + json.len() + 2 > MAX_REPORT_BATCH_BYTES {
                if n == 0 {
                    self.pop();
                    self.dropped += 1;
                    continue;
                }
                break;
            }
            if n > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&json);
            self.pop();
            n += 1;
        }
        body.push(b']');
        (n > 0).then_some((body, n))
    }
}
