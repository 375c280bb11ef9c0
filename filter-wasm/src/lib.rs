//! The edge filter: a proxy-wasm (ABI 0.2.1) shell over `gw-core`.
//!
//! Natively testable parts: [`config`] parses the plugin configuration once;
//! [`edge`] makes every decision as a plain function of the request and the clock;
//! [`replay_cas`] keeps the edge replay copy in shared data with CAS; [`stamp`] hands
//! verified headers from the body phase to the upstream; [`report`] queues edge
//! rejections for the audit ledger; [`header_map`] is the ABI's header encoding.
//!
//! In wasm: `dispatch` exports the ABI's callbacks (only those the filter uses) and
//! routes them to the `root` context (configuration, ticks, report calls) or a
//! request context of the `verify_stage` or the `stamp_stage`; `host` holds what
//! they share in one VM; every host call goes through `abi`. Only ABI 0.2.1 host
//! calls are used; metrics are optional (a host without them still works).

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
mod host;
#[cfg(target_arch = "wasm32")]
mod root;
#[cfg(target_arch = "wasm32")]
mod stamp_stage;
#[cfg(target_arch = "wasm32")]
mod verify_stage;
