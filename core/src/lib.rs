//! Every validity rule of the edge gateway, written once, in pure Rust with no I/O.
//!
//! The proxy-wasm filter (`wasm32-wasip1`), the sidecar and `gwctl` are thin shells
//! over this crate: the command signing payload and its builder ([`command`]), the
//! key ring ([`keyring`]), freshness ([`freshness`]), the replay window ([`replay`]),
//! JWT verification ([`jwt`]), the edge↔sidecar contract ([`contract`]) and the
//! edge's seal on it ([`edge_stamp`]), module state and the send gate
//! ([`module_state`]), the ledger's hash chain ([`ledger`]) and the stable
//! rejection codes ([`code`]).

#![forbid(unsafe_code)]

pub mod args;
pub mod checkpoint;
pub mod code;
pub mod command;
pub mod contract;
pub mod edge_stamp;
pub mod edverify;
pub mod freshness;
pub mod jwk;
pub mod jwt;
pub mod jwt_cache;
pub mod keyring;
pub mod ledger;
pub mod module_state;
pub mod names;
pub mod replay;
pub mod roles;
pub mod sigmemo;
pub mod transport;
pub mod txwire;
pub mod wire;

pub use code::{Code, Reject};
pub use command::{
    sign_command, signing_payload, verify_command, ControlPolicy, NewCommand, NonceSource,
    VerifiedCommand,
};
pub use gw_proto::control::Command;
pub use keyring::KeyRing;
pub use names::{Action, Module};
pub use replay::NonceBook;
