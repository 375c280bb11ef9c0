//! What `/api/rpc` serves from, for tests: a TPU-first sender (identity `[2; 32]`)
//! whose one leader is given, a landing on a test RPC node, the arbitrage module
//! (the gating one) running.

use std::sync::Arc;

use ed25519_dalek::SigningKey;
use gw_core::module_state::{ModuleState, RunState};
use gw_core::Module;
use gw_sidecar::control::ModuleTable;
use gw_sidecar::sender::landing::{Landing, RpcNodeConfig};
use gw_sidecar::sender::leaders::{LeaderSource, StaticLeaders};
use gw_sidecar::sender::rpc::{RpcContext, RpcGate};
use gw_sidecar::sender::tpu::Leader;
use gw_sidecar::sender::{Sender, SenderConfig};
use serde_json::json;

/// A sender with the TPU route first, to `leader` only. Must run in a runtime.
pub fn tpu_first_sender(leader: Leader) -> Arc<Sender> {
    let cfg: SenderConfig = serde_json::from_value(json!({
        "tpu": {}, "leaders": {"static": []}, "route_policy": "tpu_first",
    }))
    .expect("sender config");
    let leaders: Arc<dyn LeaderSource> = Arc::new(StaticLeaders::from_leaders(vec![leader]));
    Sender::new(&cfg, &SigningKey::from_bytes(&[2; 32]), Some(leaders), None).expect("sender")
}

/// The arbitrage module (the JSON-RPC gate's) running.
pub fn arbitrage_running() -> ModuleTable {
    let modules = ModuleTable::new();
    modules.set(
        Module::Arbitrage,
        ModuleState {
            state: RunState::Running,
            ..ModuleState::default()
        },
    );
    modules
}

/// The parts of an [`RpcContext`].
pub struct RpcRig {
    pub sender: Arc<Sender>,
    pub landing: Arc<Landing>,
    pub modules: ModuleTable,
    pub gate: RpcGate,
}

impl RpcRig {
    /// Sends to `leader`, lands with the node at `node_url`, rebroadcasting every
    /// `rebroadcast_ms`. Must run in a runtime.
    pub fn new(leader: Leader, node_url: &str, rebroadcast_ms: u64) -> RpcRig {
        Self::with_sender(tpu_first_sender(leader), node_url, rebroadcast_ms)
    }

    /// [`Self::new`] with `sender`.
    pub fn with_sender(sender: Arc<Sender>, node_url: &str, rebroadcast_ms: u64) -> RpcRig {
        let landing = Landing::new(
            serde_json::from_value::<RpcNodeConfig>(json!({
                "url": node_url, "timeout_ms": 1000, "rebroadcast_ms": rebroadcast_ms,
                "max_age_secs": 30,
            }))
            .expect("rpc_node config"),
        )
        .expect("landing");
        RpcRig {
            sender,
            landing,
            modules: arbitrage_running(),
            gate: RpcGate::new(1024),
        }
    }

    /// What `rpc::handle` takes.
    pub fn ctx(&self) -> RpcContext<'_> {
        RpcContext {
            sender: &self.sender,
            landing: Some(&self.landing),
            modules: &self.modules,
            module: Module::Arbitrage,
            allow_stopped: false,
            gate: &self.gate,
            requester: Default::default(),
            orphaned: None,
        }
    }
}
