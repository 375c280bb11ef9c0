//! The data plane as the sidecar runs it: sender, hot path, RPC gate, send audit and
//! the leader refresher, built from `sender` in the configuration.

use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use gw_core::Module;
use tokio::task::JoinHandle;

use super::audit::SendAudit;
use super::leaders::{LeaderSource, LeadersConfig, RpcLeaders, StaticLeaders, SLOT_MS};
use super::strategy::HotPath;
use super::{Sender, SenderConfig};
use crate::control::ModuleTable;
use crate::models::ModelHost;

/// The running data plane.
pub struct DataPlane {
    /// The hedged sender.
    pub sender: Arc<Sender>,
    /// Opportunities → strategy → sender.
    pub hot: HotPath,
    /// Module whose state gates JSON-RPC sends.
    pub rpc_module: Module,
    /// JSON-RPC sends go through while that module is stopped.
    pub rpc_allow_stopped: bool,
    /// The JSON-RPC gate: throttle, sends in flight, refusals.
    pub rpc_gate: super::rpc::RpcGate,
    /// The send audit, when ClickHouse is configured.
    pub audit: Option<SendAudit>,
    /// The leader source, for status.
    pub leaders: Option<Arc<dyn LeaderSource>>,
    /// Landing semantics with an RPC node (`sender.rpc_node`).
    pub landing: Option<Arc<super::landing::Landing>>,
}

impl DataPlane {
    /// At shutdown, once the listeners have stopped: stops the hot path and the
    /// rebroadcasts, waits (at most `within`) for the sends running to end — each
    /// records its audit row — then for those rows to be in the journal. Sends
    /// still running then are given up (their rows with them), and logged.
    pub async fn quiesce(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        self.hot.stop();
        if let Some(l) = &self.landing {
            l.stop();
        }
        let resending = || self.landing.as_ref().map_or(0, |l| l.resending());
        while !(self.hot.idle() && self.rpc_gate.in_flight() == 0 && resending() == 0) {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    rpc = self.rpc_gate.in_flight(),
                    rebroadcasts = resending(),
                    "sends still running at shutdown: their audit rows are lost"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(a) = &self.audit {
            if tokio::time::timeout_at(deadline + Duration::from_secs(2), a.flush())
                .await
                .is_err()
            {
                tracing::warn!("send audit rows not all journalled at shutdown");
            }
        }
    }
}

/// The TPU identity: `identity_hex` / `GW_TPU_IDENTITY_HEX`, else a fresh key.
pub fn identity(
    config: &SenderConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<SigningKey> {
    let hex_key = env("GW_TPU_IDENTITY_HEX")
        .or_else(|| config.identity_hex.as_ref().map(|s| s.expose().to_owned()));
    match hex_key {
        Some(h) => gw_core::jwk::ed25519_secret_from_hex(&h)
            .map_err(|e| anyhow::anyhow!("TPU identity: {e}")),
        None => {
            let mut seed = zeroize::Zeroizing::new([0u8; 32]);
            getrandom_fill(&mut seed[..])?;
            Ok(SigningKey::from_bytes(&seed))
        }
    }
}

fn getrandom_fill(buf: &mut [u8]) -> anyhow::Result<()> {
    use rand_core::RngCore;
    rand_core::OsRng
        .try_fill_bytes(buf)
        .map_err(|e| anyhow::anyhow!("no randomness for the TPU identity: {e}"))
}

/// Where the send audit goes (ClickHouse configured).
pub struct AuditSetup {
    /// The journal rows are made durable in.
    pub journal: crate::journal::Journal,
    /// Its sink of send rows (registered when the journal started).
    pub queue: Arc<super::audit::SendsQueue>,
    /// ClickHouse.
    pub client: clickhouse::Client,
    /// This node's id (deduplication tokens).
    pub node_id: String,
}

/// Builds and starts the data plane. Must run inside a tokio runtime.
pub fn start(
    config: &SenderConfig,
    identity: &SigningKey,
    modules: ModuleTable,
    models: Option<Arc<ModelHost>>,
    audit: Option<AuditSetup>,
) -> anyhow::Result<(DataPlane, Vec<JoinHandle<()>>)> {
    config.validate()?;
    let rpc_module = Module::parse(&config.rpc_module).ok_or_else(|| {
        anyhow::anyhow!(
            "sender.rpc_module {:?} is not a module (arbitrage, mev)",
            config.rpc_module
        )
    })?;
    let mut tasks = Vec::new();
    let leaders: Option<Arc<dyn LeaderSource>> = match &config.leaders {
        Some(LeadersConfig::Static(list)) => Some(Arc::new(
            StaticLeaders::new(list).map_err(|e| anyhow::anyhow!("sender.leaders: {e}"))?,
        )),
        Some(LeadersConfig::Rpc {
            url,
            refresh_ms,
            private_addrs,
        }) => Some(RpcLeaders::start(
            url,
            Duration::from_millis(*refresh_ms),
            *private_addrs,
        )?),
        None => None,
    };
    let audit = audit.map(|a| {
        let (audit, t) = SendAudit::start(
            a.journal,
            a.queue,
            a.client,
            "tx_sends",
            &a.node_id,
            config.audit_queue,
        );
        tasks.extend(t);
        audit
    });
    let sender = Sender::new(config, identity, leaders.clone(), audit.clone())?;
    if sender.tpu().is_some() {
        let s = sender.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                s.refresh_leaders();
                tokio::time::sleep(Duration::from_millis(SLOT_MS / 2)).await;
            }
        }));
    }
    let hot = HotPath::start(
        &config.strategy,
        sender.clone(),
        modules,
        models,
        tokio::runtime::Handle::current(),
        Some(identity),
    )?;
    Ok((
        DataPlane {
            sender,
            hot,
            rpc_module,
            rpc_allow_stopped: config.rpc_allow_stopped,
            rpc_gate: super::rpc::RpcGate::new(config.rpc_max_in_flight),
            audit,
            leaders,
            landing: config
                .rpc_node
                .clone()
                .map(super::landing::Landing::new)
                .transpose()?,
        },
        tasks,
    ))
}
