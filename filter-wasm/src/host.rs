//! What both stages and the root context share inside one VM: logging, the
//! decision counters, the clock, shared data through the host, local answers, and
//! the VM's own hand-over slots. Every host call goes through [`crate::abi`], so no
//! host answer can panic this code.

use std::cell::RefCell;
use std::rc::Rc;

use gw_core::{Code, Reject};

use crate::abi::{self, Level};
use crate::replay_cas::{SharedStore, StoreError};
use crate::report::ReportQueue;
use crate::stamp::{LocalSlots, Tickets};

thread_local! {
    /// Verified headers handed from the verify to the stamp stage inside this VM
    /// (see [`crate::stamp`]). Borrowed only for moments without host calls.
    static HANDOVER: RefCell<LocalSlots> = RefCell::new(LocalSlots::default());
    /// This VM's ticket issuers, one per shared-data prefix, for the VM's life.
    static TICKETS: RefCell<Vec<Rc<RefCell<Tickets>>>> = const { RefCell::new(Vec::new()) };
    /// This VM's edge reports waiting, for the VM's life.
    static REPORTS: RefCell<Option<Rc<RefCell<ReportQueue>>>> = const { RefCell::new(None) };
}

/// This VM's queue of edge reports: the same for every verify stage configured in
/// it, so that a configuration update (a new root context, the old one deleted)
/// loses none. Verify stages of one VM with different `report` settings share
/// it: each sends what is queued with its own (Envoy's `envoy/` configuration has
/// one verify stage per VM). `None` if it is borrowed (never, in a
/// single-threaded VM).
pub fn vm_report_queue() -> Option<Rc<RefCell<ReportQueue>>> {
    REPORTS.with(|q| {
        let mut q = q.try_borrow_mut().ok()?;
        Some(
            q.get_or_insert_with(|| Rc::new(RefCell::new(ReportQueue::new(vm_id()))))
                .clone(),
        )
    })
}

/// This VM's ticket issuer for keys under `prefix`: the same one for every verify
/// stage configured in this VM with that prefix, so a configuration update goes
/// on issuing under the same [`crate::stamp::SLOTS`] keys and numbers (a new
/// issuer per configuration took a new id, and [`crate::stamp::SLOTS`] more
/// shared-data keys that ABI 0.2.1 cannot delete, at each update; numbers that
/// started again could name an older ticket still in flight). `None` if the
/// issuers are borrowed (never, in a single-threaded VM).
pub fn vm_tickets(prefix: &str) -> Option<Rc<RefCell<Tickets>>> {
    TICKETS.with(|t| {
        let mut t = t.try_borrow_mut().ok()?;
        if let Some(found) = t
            .iter()
            .find(|x| x.try_borrow().is_ok_and(|x| x.prefix() == prefix))
        {
            return Some(found.clone());
        }
        let made = Rc::new(RefCell::new(Tickets::new(vm_id(), prefix)));
        t.push(made.clone());
        Some(made)
    })
}

/// Runs `f` on this VM's hand-over slots; `None` if they are borrowed (never, in a
/// single-threaded VM, unless a host re-enters).
pub fn with_local_slots<T>(f: impl FnOnce(&mut LocalSlots) -> T) -> Option<T> {
    HANDOVER.with(|h| h.try_borrow_mut().ok().map(|mut h| f(&mut h)))
}

/// What a request callback tells the host (proxy-wasm `FilterHeadersStatus` /
/// `FilterDataStatus` / `FilterTrailersStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Action {
    /// Let the request go on.
    Continue = 0,
    /// Hold it (more body to come, or answered locally).
    Pause = 1,
}

/// Logs at info level.
pub fn info(msg: &str) {
    abi::log(Level::Info, msg);
}
/// Logs at warn level.
pub fn warn(msg: &str) {
    abi::log(Level::Warn, msg);
}
/// Logs at error level.
pub fn error(msg: &str) {
    abi::log(Level::Error, msg);
}
/// Logs at debug level.
pub fn debug(msg: &str) {
    abi::log(Level::Debug, msg);
}

/// Decision counters; `None` where the host has no metrics (e.g. Kong).
pub struct Metrics {
    /// `gw_edge.decision.accepted`.
    pub accepted: Option<u32>,
    /// `gw_edge.decision.public`.
    pub passed: Option<u32>,
    /// `gw_edge.decision.resend`: the same command bytes let through again.
    pub resend: Option<u32>,
    by_code: Vec<Option<u32>>,
    /// `gw_edge.command_check_us`: microseconds spent checking a command body
    /// (parse, signature, scope, freshness, replay), by the host's clock.
    pub command_us: Option<u32>,
}

impl Metrics {
    /// Defines every counter (`gw_edge.decision.<code>` for each code).
    pub fn define() -> Metrics {
        let counter = |name: &str| abi::define_counter(name).ok();
        let accepted = counter("gw_edge.decision.accepted");
        if accepted.is_none() {
            info("gw_edge: host has no metrics; counting disabled");
        }
        Metrics {
            accepted,
            passed: counter("gw_edge.decision.public"),
            resend: counter("gw_edge.decision.resend"),
            by_code: Code::ALL
                .iter()
                .map(|c| counter(&format!("gw_edge.decision.{}", c.as_str())))
                .collect(),
            command_us: abi::define_histogram("gw_edge.command_check_us").ok(),
        }
    }

    /// Adds one to a counter, if the host has it.
    pub fn bump(id: Option<u32>) {
        add(id, 1);
    }

    /// Counts a rejection by its code.
    pub fn rejected(&self, code: Code) {
        let i = Code::ALL.iter().position(|c| *c == code);
        Self::bump(i.and_then(|i| self.by_code.get(i).copied().flatten()));
    }
}

/// Adds `n` to a counter, if the host has it.
pub fn add(id: Option<u32>, n: usize) {
    if let Some(id) = id {
        let _ = abi::increment(id, i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// Shared data through the host.
pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), StoreError> {
        abi::get_shared_data(key).map_err(|s| StoreError::Unavailable(format!("{s:?}")))
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        abi::set_shared_data(key, value, cas).map_err(|s| match s {
            abi::Status::CasMismatch => StoreError::CasMismatch,
            other => StoreError::Unavailable(format!("{other:?}")),
        })
    }
}

/// Seconds of a host time in nanoseconds; 0 when the host could not tell (every
/// token and command is then refused `unavailable`).
pub fn unix_secs(ns: Option<u64>) -> u64 {
    ns.map_or(0, |ns| ns / 1_000_000_000)
}

/// Host time in unix seconds (0 when the host cannot tell).
pub fn now_secs() -> u64 {
    unix_secs(abi::now_nanos().ok())
}

/// Answers the request locally with `r` as JSON.
pub fn local_reject(r: &Reject) {
    let body = r.to_json();
    if let Err(e) = abi::send_local_response(
        u32::from(r.code.http_status()),
        &[
            ("content-type", "application/json"),
            ("cache-control", "no-store"),
        ],
        body.as_bytes(),
    ) {
        warn(&format!("gw_edge: cannot send the local response: {e:?}"));
    }
}

/// Answers a request the filter has no context for (fail closed).
pub fn reject_unknown_context() -> Action {
    local_reject(&Reject::new(
        Code::Unavailable,
        "the edge filter has no context for this request",
    ));
    Action::Pause
}

/// A random id for this VM's ticket slots.
pub fn vm_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(abi::now_nanos().unwrap_or(0));
    h.finish()
}
