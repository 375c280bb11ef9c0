//! The control plane: signed commands from the edge to the modules.
//!
//! - [`admission`]: the pure decision on one request (re-verification, replay,
//!   which ledger rows to write); [`service`] performs its effects and serves the
//!   routes.
//! - [`bus`]: the command bus (Kafka, or the embedded one).
//! - [`agent`]: one consumer per module that verifies again, applies, persists and
//!   commits; [`modules`] is the table of module states the agents publish;
//!   [`kafka_state`] keeps an agent's state in Kafka (the Kafka bus), so another
//!   node's agent can take a module over; [`state_sign`] signs and verifies
//!   those records.
//! - [`replay_store`]: the durable replay guard; [`clock_floor`]: the time no
//!   replay guard judges a command before, kept across restarts.
//! - [`json_route`]: the original API's JSON route, signed by the sidecar.
//! - [`edge_reports`]: which edge reports the ledger holds already (the filter
//!   sends a batch again after a lost answer).

pub mod admission;
pub mod agent;
pub mod bus;
pub mod clock_floor;
pub mod edge_reports;
pub mod json_route;
pub mod kafka_state;
pub mod modules;
pub mod replay_store;
pub mod service;
pub mod state_sign;

pub use modules::ModuleTable;
pub use service::{Control, ControlConfig, StartError};
