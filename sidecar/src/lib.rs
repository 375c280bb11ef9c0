//! The sidecar's control plane, as pure state machines with thin I/O shells:
//! [`http`] admits commands (re-verification, the authoritative replay guard in
//! [`replay_store`]) and publishes them on the [`bus`] (Kafka or in-process); one
//! [`agent`] per module consumes, verifies again and applies to [`modules`]; every
//! decision is sealed into the audit ledger ([`audit`], [`ledger_sink`]); [`models`]
//! hosts hot-swappable tree models behind a versioned C ABI. [`app`]
//! wires it together from a [`config`].

pub mod agent;
pub mod app;
pub mod audit;
pub mod bus;
pub mod config;
pub mod durable;
pub mod hedge;
pub mod http;
pub mod ledger_sink;
pub mod migrations;
pub mod models;
pub mod modules;
pub mod replay_store;
pub mod sender;

/// Unix time in nanoseconds (0 before 1970, saturating far in the future).
pub fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
