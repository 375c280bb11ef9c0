//! The edge filter: a proxy-wasm (ABI 0.2.1) shell over `gw-core`.
//!
//! [`config`] parses the plugin configuration once; [`edge`] makes every decision as
//! a plain function (tested natively); [`replay_cas`] keeps the edge replay copy in
//! shared data with CAS; [`stamp`] hands verified headers from the body phase to the
//! upstream; [`report`] queues edge rejections for the audit ledger. In wasm, `glue`
//! connects them to the host and `dispatch` exports the ABI's callbacks (only those
//! the filter uses). Only ABI 0.2.1 host calls are used; metrics are optional (a host
//! without them still works).

pub mod config;
pub mod edge;
pub mod header_map;
pub mod replay_cas;
pub mod report;
pub mod stamp;

#[cfg(target_arch = "wasm32")]
mod abi;
#[cfg(target_arch = "wasm32")]
mod dispatch;
#[cfg(target_arch = "wasm32")]
mod glue;
