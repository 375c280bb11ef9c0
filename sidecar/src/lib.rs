//! The sidecar's control plane, as pure state machines with thin I/O shells:
//! [`modules`] (what each trading module is doing) and [`replay_store`] (the
//! authoritative replay guard, persisted so a restart never re-opens a nonce).

pub mod config;
pub mod http;
pub mod ledger_sink;
pub mod migrations;
pub mod modules;
pub mod replay_store;
