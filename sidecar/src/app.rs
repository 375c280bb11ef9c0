//! Wiring: configuration → replay store, audit ledger, bus, agents, ledger shipper,
//! HTTP. `gw-sidecar` and the tests start the sidecar the same way.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gw_core::{ControlPolicy, Module};
use tokio::task::JoinHandle;

use crate::agent::{Agent, AgentEnv};
use crate::audit::Auditor;
use crate::bus::Bus;
use crate::config::Config;
use crate::http::{flush_ledger, AppState, Parts};
use crate::ledger_sink::Ledger;
use crate::replay_store::ReplayStore;

/// A started sidecar: its state and background tasks (stopped on drop).
pub struct Running {
    /// The handlers' state.
    pub state: Arc<AppState>,
    /// Largest body the router accepts.
    pub max_body: usize,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Running {
    /// The HTTP router.
    pub fn router(&self) -> axum::Router {
        crate::http::router(self.state.clone(), self.max_body)
    }
}

/// Opens the durable state and starts the agents and the ledger shipper. Must run
/// inside a tokio runtime.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    let dir = cfg.file.state_dir.clone();
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create state dir {}", dir.display()))?;
    let replay = ReplayStore::open(&dir.join("replay.json"), cfg.file.replay_window)?;
    let policy = ControlPolicy {
        keyring: cfg.keyring,
        max_skew: cfg.file.max_skew_secs,
        max_body: cfg.file.max_body_bytes,
    };
    let ch = cfg
        .file
        .clickhouse_url
        .as_ref()
        .map(|u| clickhouse::Client::default().with_url(u.clone()));
    let auditor = match &ch {
        Some(client) => Auditor::new(Some(Ledger::open(
            &dir.join("ledger"),
            client.clone(),
            "control_decisions",
        )?)),
        None => {
            eprintln!(
                "gw-sidecar: no clickhouse_url: decisions are NOT audited (development only)"
            );
            Auditor::new(None)
        }
    };
    let bus = match cfg.file.kafka.clone() {
        Some(k) => Bus::kafka(k).context("kafka client")?,
        None => Bus::in_process(),
    };
    let models = cfg
        .file
        .models
        .as_ref()
        .map(|m| Arc::new(crate::models::ModelHost::new(&m.dir, m.n_features)));
    if let Some(host) = &models {
        for line in host.poll() {
            eprintln!("gw-sidecar: {line}");
        }
    }
    let state = AppState::new(Parts {
        policy: policy.clone(),
        replay,
        signer: cfg.signer,
        json_issuer: cfg.file.json_issuer.clone(),
        auditor: auditor.clone(),
        bus: bus.clone(),
        apply_wait: Duration::from_millis(cfg.file.apply_wait_ms),
        models: models.clone(),
    });
    let mut tasks = Vec::new();
    if let (Some(sc), Some(identity)) = (&cfg.file.sender, &cfg.tpu_identity) {
        let (dp, t) = crate::sender::plane::start(
            sc,
            identity,
            state.modules.clone(),
            models.clone(),
            ch.clone(),
        )
        .context("sender")?;
        eprintln!(
            "gw-sidecar: sender: tpu {}, relay {}, hedge after {} ms",
            if dp.sender.tpu().is_some() {
                "on"
            } else {
                "off"
            },
            if dp.sender.relay().is_some() {
                "on"
            } else {
                "off"
            },
            sc.hedge_delay_ms
        );
        tasks.extend(t);
        if state.data.set(dp).is_err() {
            anyhow::bail!("sender started twice");
        }
    }
    // The topic must exist before consumers can be assigned partitions; keep trying
    // in the background while the broker is away (publishes answer 503 meanwhile).
    if let Err(e) = bus.prepare().await {
        eprintln!("gw-sidecar: {}: {e} (retrying)", bus.describe());
        let b = bus.clone();
        tasks.push(tokio::spawn(async move {
            while b.prepare().await.is_err() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            eprintln!("gw-sidecar: {} ready", b.describe());
        }));
    }
    let env = AgentEnv {
        policy,
        state_dir: dir,
        window: cfg.file.replay_window,
        modules: state.modules.clone(),
        auditor,
        acks: state.acks.clone(),
        outcomes: state.agent_outcomes.clone(),
    };
    for m in Module::ALL {
        let agent = Agent::open(m, &env)?;
        let consumer = bus.consumer(m).context("bus consumer")?;
        tasks.push(tokio::spawn(agent.run(consumer)));
    }
    if let Some(client) = ch {
        tasks.push(tokio::spawn(ship_ledger(state.clone(), client)));
    }
    if let (Some(host), Some(m)) = (models, &cfg.file.models) {
        let period = Duration::from_millis(m.poll_ms.max(50));
        tasks.push(tokio::spawn(host.watch(period)));
    }
    eprintln!("gw-sidecar: command bus: {}", bus.describe());
    Ok(Running {
        state,
        max_body: cfg.file.max_body_bytes,
        tasks,
    })
}

/// Applies the ledger migrations, then ships the spool in order forever; rows wait
/// in the spool while ClickHouse is away.
async fn ship_ledger(st: Arc<AppState>, client: clickhouse::Client) {
    let mut migrated = false;
    let mut last_err = String::new();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if !migrated {
            match crate::migrations::apply(&client).await {
                Ok(()) => migrated = true,
                Err(e) => {
                    if e != last_err {
                        eprintln!("gw-sidecar: ledger migrations pending: {e}");
                        last_err = e;
                    }
                    continue;
                }
            }
        }
        match flush_ledger(&st, &client, "control_decisions").await {
            Ok(_) => last_err.clear(),
            Err(e) if e != last_err => {
                eprintln!("gw-sidecar: ledger rows kept in the spool: {e}");
                last_err = e;
            }
            Err(_) => {}
        }
    }
}
