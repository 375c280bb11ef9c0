//! Wiring: configuration → ledger, control plane (bus, agents, replay guard),
//! models, sender, ops; their routers merged into one. `gw-sidecar` and the tests
//! start the sidecar the same way.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gw_core::ControlPolicy;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::control::bus::Bus;
use crate::control::json_route::JsonSigner;
use crate::control::replay_store::ReplayStore;
use crate::control::{Control, ControlConfig};
use crate::journal::{Journal, Options as JournalOptions};
use crate::ledger::{CheckpointSettings, Ledger};
use crate::models::api::ModelsApi;
use crate::models::ModelHost;
use crate::ops::metrics::ControlMetrics;
use crate::sender::http::SenderApi;
use crate::sender::plane::DataPlane;
use crate::serve::{Gatekeeper, Tls};

/// A started sidecar: its capabilities and background tasks (stopped on drop).
pub struct Running {
    tls: Option<Tls>,
    gatekeeper: Gatekeeper,
    control: Arc<Control>,
    ledger: Ledger,
    models: Option<Arc<ModelHost>>,
    plane: Option<Arc<DataPlane>>,
    registry: Arc<Registry>,
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
    /// The main listener's routes: every API, for the edge only (anyone else is
    /// refused and recorded), and `/healthz`.
    pub fn router(&self) -> axum::Router {
        let modules = self.control.modules();
        let api = self
            .control
            .router()
            .merge(self.ledger.router())
            .merge(ModelsApi::new(self.models.clone(), modules.clone()).router())
            .merge(SenderApi::new(self.plane.clone(), modules).router())
            .fallback_service(
                axum::Router::new()
                    .fallback(crate::serve::not_found)
                    .with_state(self.gatekeeper.clone()),
            )
            .layer(axum::middleware::from_fn_with_state(
                self.gatekeeper.clone(),
                crate::serve::edge_only,
            ));
        crate::ops::health().merge(api)
    }

    /// The ops listener's routes: `/healthz`, `/metrics`.
    pub fn ops_router(&self) -> axum::Router {
        crate::ops::router(self.registry.clone())
    }

    /// A task serving [`Self::router`] on `listener` for as long as it runs (tests,
    /// benchmarks: spawn it on the sidecar's runtime).
    pub fn serving_task(
        &self,
        listener: tokio::net::TcpListener,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        crate::serve::serve(
            listener,
            self.tls.clone(),
            self.router(),
            std::future::pending(),
        )
    }

    /// Serves [`Self::router`] on `listener` (mutual TLS, or plain HTTP when so
    /// configured) until `shutdown`.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        crate::serve::serve(listener, self.tls.clone(), self.router(), shutdown).await;
    }

    /// The control plane.
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// The data plane, when `sender` is configured.
    pub fn plane(&self) -> Option<&Arc<DataPlane>> {
        self.plane.as_ref()
    }

    /// The model host, when `models` is configured.
    pub fn models(&self) -> Option<&Arc<ModelHost>> {
        self.models.as_ref()
    }
}

/// Opens the durable state and starts every capability's tasks. Must run inside a
/// tokio runtime.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    let tls = match &cfg.file.tls {
        Some(t) => Some(Tls::load(t)?),
        None => {
            tracing::warn!(
                listen = %cfg.file.listen,
                "INSECURE: plain HTTP without TLS; every caller on this loopback address is trusted as the edge (development only)"
            );
            None
        }
    };
    let dir = cfg.file.state_dir.clone();
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create state dir {}", dir.display()))?;
    let mut registry = Registry::default();
    let clickhouse = cfg.clickhouse();
    let mut ledger = Ledger::open(
        &dir.join("ledger"),
        &cfg.file.node_id,
        clickhouse.as_ref(),
        CheckpointSettings {
            key: cfg.ledger_key.clone(),
            every_rows: cfg.file.checkpoint_every_rows,
            every: Duration::from_secs(cfg.file.checkpoint_every_secs),
        },
        &mut registry,
    )?;
    let mut tasks: Vec<JoinHandle<()>> = ledger.start().into_iter().collect();

    let bus = match cfg.file.kafka.clone() {
        Some(k) => Bus::kafka(k).context("kafka client")?,
        None => Bus::in_process(),
    };
    let policy = ControlPolicy {
        keyring: cfg.keyring,
        max_skew: cfg.file.max_skew_secs,
        max_body: cfg.file.max_body_bytes,
    };
    let (journal, recovered) = Journal::open(&dir.join("journal"), JournalOptions::default())?;
    let replay = ReplayStore::open(
        journal,
        &crate::control::replay_store::recovered(&recovered),
        cfg.file.replay_limits(),
        crate::now_secs(),
    )?;
    let control_metrics = ControlMetrics::register(&mut registry);
    let gatekeeper = Gatekeeper {
        auditor: ledger.auditor(),
        metrics: control_metrics.clone(),
    };
    let (control, t) = Control::start(ControlConfig {
        policy,
        replay,
        signer: cfg
            .signer
            .map(|(key, id)| JsonSigner::new(key, id, cfg.file.json_issuer.clone())),
        bus: bus.clone(),
        auditor: ledger.auditor(),
        apply_wait: Duration::from_millis(cfg.file.apply_wait_ms),
        max_body: cfg.file.max_body_bytes,
        state_dir: dir,
        limits: cfg.file.replay_limits(),
        dedup_secs: cfg.file.agent_dedup_secs,
        metrics: control_metrics,
    })?;
    tasks.extend(t);
    tracing::info!(bus = %bus.describe(), "command bus");

    let models = cfg.file.models.as_ref().map(|m| {
        let host = Arc::new(ModelHost::new(&m.dir, m.n_features));
        host.register(&mut registry);
        for line in host.poll() {
            tracing::info!("{line}");
        }
        tasks.push(tokio::spawn(
            host.clone().watch(Duration::from_millis(m.poll_ms.max(50))),
        ));
        host
    });

    let plane = match (&cfg.file.sender, &cfg.tpu_identity) {
        (Some(sc), Some(identity)) => {
            let (dp, t) = crate::sender::plane::start(
                sc,
                identity,
                control.modules(),
                models.clone(),
                clickhouse,
            )
            .context("sender")?;
            tracing::info!(
                tpu = dp.sender.tpu().is_some(),
                relay = dp.sender.relay().is_some(),
                hedge_delay_ms = sc.hedge_delay_ms,
                "sender"
            );
            tasks.extend(t);
            let dp = Arc::new(dp);
            registry.register_collector(Box::new(crate::sender::metrics::SenderCollector(
                dp.clone(),
            )));
            Some(dp)
        }
        _ => None,
    };
    Ok(Running {
        tls,
        gatekeeper,
        control,
        ledger,
        models,
        plane,
        registry: Arc::new(registry),
        tasks,
    })
}
