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
use crate::console::realtime::Hub;
use crate::control::bus::Bus;
use crate::control::json_route::JsonSigner;
use crate::control::replay_store::{ReplaySink, ReplayStore};
use crate::control::{Control, ControlConfig};
use crate::journal::{Journal, Options as JournalOptions, Sink};
use crate::ledger::{Auditor, CheckpointSettings, Ledger};
use crate::models::api::ModelsApi;
use crate::models::ModelHost;
use crate::ops::metrics::ControlMetrics;
use crate::sender::audit::SendsQueue;
use crate::sender::http::SenderApi;
use crate::sender::plane::DataPlane;
use crate::serve::{Gatekeeper, RefusalBudget, Tls};

/// Signatures the sidecar remembers as verified (an agent further behind admission
/// than this many commands verifies in full).
const SIGNATURE_MEMO: usize = 16_384;

/// A started sidecar: its capabilities and background tasks (stopped on drop).
pub struct Running {
    tls: Option<Tls>,
    /// `ops_listen` is served with `tls` (`ops_tls`).
    ops_tls: bool,
    /// The listeners' connection counters.
    conns: crate::serve::ConnMetrics,
    gatekeeper: Gatekeeper,
    control: Arc<Control>,
    ledger: Ledger,
    models: Option<Arc<ModelHost>>,
    plane: Option<Arc<DataPlane>>,
    realtime: Arc<Hub>,
    registry: Arc<Registry>,
    readiness: Arc<crate::ops::ready::Readiness>,
    tasks: Vec<JoinHandle<()>>,
    journal: Journal,
    /// Where the console posts signed commands (the edge's path).
    command_path: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Running {
    /// Writes the sums of refusals beyond the ledger's budget still owed (before
    /// [`Self::stop`], after the data plane's `quiesce`): the QUIC ingest's
    /// refusals still queued are recorded first (within 2 s).
    pub async fn flush_refusals(&self) {
        if let Some(dp) = &self.plane {
            let refusals = &dp.hot.ingest_stats.refusals;
            refusals
                .settle(&self.gatekeeper, Duration::from_secs(2))
                .await;
        }
        crate::serve::flush_all_unrecorded(&self.gatekeeper).await;
    }

    /// Stops the background tasks, then the journal's writer (blocking until it
    /// has written what was queued): whatever was committed before is on disk,
    /// and the state directory is left to the next start — in this process too
    /// (tests restart in-process; a writer still deleting segments or writing a
    /// queued row would race the new one). Later commits are refused. Dropping
    /// does the same.
    pub fn stop(&self) {
        for t in &self.tasks {
            t.abort();
        }
        self.journal.stop();
    }

    /// The main listener's routes: every API, for the edge only (anyone else is
    /// refused and recorded), and `/healthz`.
    pub fn router(&self) -> axum::Router {
        let modules = self.control.modules();
        // The routes whose refusals write no row themselves. (Their 405s are
        // answered by the `method_not_allowed_fallback` set below on the whole
        // router, which records its own row: it replaces these routes' default
        // 405 after this layer wrapped them, so it is not wrapped, and no 405
        // gets two rows; `peer_auth.rs` checks it.)
        let reads = self
            .ledger
            .router()
            .merge(ModelsApi::new(self.models.clone(), modules.clone()).router())
            .layer(axum::middleware::from_fn_with_state(
                self.gatekeeper.clone(),
                crate::serve::record_refusals_of_reads,
            ));
        let api = self
            .control
            .router()
            .merge(reads)
            .merge(SenderApi::new(self.plane.clone(), modules, self.gatekeeper.clone()).router())
            .merge(self.realtime.router())
            .merge(crate::console::router(&self.command_path))
            .method_not_allowed_fallback({
                let g = self.gatekeeper.clone();
                move |req: axum::extract::Request| crate::serve::method_not_allowed(g, req)
            })
            .fallback_service(
                axum::Router::new()
                    .fallback(crate::serve::not_found)
                    .with_state(self.gatekeeper.clone()),
            )
            .layer(axum::middleware::from_fn_with_state(
                self.gatekeeper.clone(),
                crate::serve::api_roles,
            ))
            .layer(axum::middleware::from_fn_with_state(
                self.gatekeeper.clone(),
                crate::serve::edge_stamp,
            ))
            .layer(axum::middleware::from_fn_with_state(
                self.gatekeeper.clone(),
                crate::serve::edge_only,
            ));
        crate::ops::health().merge(api)
    }

    /// The ops listener's routes: `/healthz`, `/readyz`, `/metrics`.
    pub fn ops_router(&self) -> axum::Router {
        crate::ops::router(self.registry.clone(), self.readiness.clone())
    }

    /// Serves [`Self::ops_router`] on `listener` until `shutdown`: with the
    /// sidecar's mutual TLS under `ops_tls` (any client certificate from its
    /// client CA), plain HTTP otherwise (a loopback address: the configuration
    /// refuses any other).
    pub fn serve_ops(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let tls = self.tls.clone().filter(|_| self.ops_tls);
        // The TLS takes clients without a certificate too (the main listener
        // answers them 401 with a row): so does this.
        let app = self
            .ops_router()
            .layer(axum::middleware::from_fn_with_state(
                self.gatekeeper.clone(),
                crate::serve::certified_only,
            ));
        crate::serve::serve(listener, tls, app, self.listener("ops"), shutdown)
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
            self.listener("main"),
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
        let hub = self.realtime.clone();
        let shutdown = async move {
            shutdown.await;
            // Live streams end now, with 1001, instead of holding the drain.
            hub.shutdown();
        };
        crate::serve::serve(
            listener,
            self.tls.clone(),
            self.router(),
            self.listener("main"),
            shutdown,
        )
        .await;
    }

    /// The main listener (`main`: the edge only) or the ops listener (`ops`: any
    /// certificate from the client CA).
    fn listener(&self, name: &'static str) -> crate::serve::Listener {
        crate::serve::Listener {
            name,
            serves: if name == "ops" {
                crate::serve::Serves::Certified
            } else {
                crate::serve::Serves::Edge
            },
            metrics: self.conns.clone(),
        }
    }

    /// The control plane.
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// The data plane, when `sender` is configured.
    pub fn plane(&self) -> Option<&Arc<DataPlane>> {
        self.plane.as_ref()
    }

    /// The `/api/realtime` hub.
    pub fn realtime(&self) -> &Arc<Hub> {
        &self.realtime
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
    crate::durable::create_dir(&dir)
        .with_context(|| format!("cannot create state dir {}", dir.display()))?;
    let mut registry = Registry::default();
    let clickhouse = cfg.clickhouse()?;
    if cfg.clickhouse_in_clear() {
        // The URL holds no credentials (refused at load).
        tracing::warn!(
            url = cfg.file.clickhouse_url.as_deref().unwrap_or_default(),
            "ClickHouse over plain HTTP to a host that is not loopback: its password and the ledger's rows cross the network in clear (set clickhouse_tls and an https:// URL)"
        );
    }
    if let Some(sender) = &cfg.file.sender {
        let rpc = sender.rpc_node.as_ref().map(|r| r.url.as_str());
        let leaders = match &sender.leaders {
            Some(crate::sender::leaders::LeadersConfig::Rpc { url, .. }) => Some(url.as_str()),
            _ => None,
        };
        for (key, url) in [
            ("sender.rpc_node.url", rpc),
            ("sender.leaders.rpc.url", leaders),
        ] {
            if url.is_some_and(crate::config::in_clear) {
                // Such URLs often carry a provider's key: the scheme, host and
                // port only (`upstream::redact`).
                tracing::warn!(
                    key,
                    url = %crate::sender::upstream::redact(url.unwrap_or_default()),
                    "an RPC node over plain HTTP to a host that is not loopback: a key in its URL and every answer cross the network in clear (use https://)"
                );
            }
        }
    }
    let now = crate::now_secs();

    // Everything durable is in the journal: read it, let each owner rebuild from
    // it, then start its writer with the owners' sinks.
    // The audit queues (ledger rows and send rows still to ship to ClickHouse) are
    // fed every record; the other owners get the records from the journal's
    // horizon on (journal::HORIZON): a long ClickHouse outage does not make a start
    // hold its whole backlog in memory.
    let t0 = std::time::Instant::now();
    let rows = crate::ledger::ship::RowQueue::bounded(
        Default::default(),
        cfg.file.audit_memory_rows,
        cfg.file.audit_memory_bytes,
    );
    let mut sends = SendsQueue::new(cfg.file.audit_memory_rows);
    let mut opened = Journal::open_with(
        &dir.join("journal"),
        JournalOptions {
            segment_bytes: cfg.file.journal_segment_bytes,
            ..JournalOptions::default()
        },
        &mut |lsn, t| {
            crate::journal::Sink::committed(&rows, lsn, t);
            sends.recover(lsn, t);
        },
        true,
    )?;
    sends.recovered_all();
    tracing::info!(
        records = opened.scanned,
        kept = opened.records.len(),
        ledger_rows = rows.len(),
        send_rows = sends.pending_rows(),
        ms = t0.elapsed().as_millis(),
        "journal opened"
    );
    let (mut ledger, chain) = Ledger::prepare(
        &opened,
        &dir.join("ledger"),
        &cfg.file.node_id,
        clickhouse.as_ref(),
        CheckpointSettings {
            key: cfg.ledger_key.clone(),
            every_rows: cfg.file.checkpoint_every_rows,
            every: Duration::from_secs(cfg.file.checkpoint_every_secs),
        },
        rows,
        &mut registry,
    )
    .await?;
    let bus = match cfg.file.kafka.clone() {
        Some(k) => {
            let signer = cfg
                .state_signer()
                .context("module state key")?
                .context("kafka is configured")?;
            tracing::info!(
                node = signer.me(),
                public_key = %signer.public_hex(),
                "module state records in Kafka are signed with this node's state key"
            );
            let epoch = crate::control::bus::forward_epoch(&dir).with_context(|| {
                format!(
                    "cannot keep the forward epoch in {}",
                    dir.join(crate::control::bus::EPOCH_FILE).display()
                )
            })?;
            Bus::kafka(k, signer, epoch, &opened.records).context("kafka client")?
        }
        None => Bus::in_process(&opened.records),
    };
    if let Some(g) = bus.outbox_gauge() {
        registry.register(
            "gw_sidecar_kafka_outbox_commands",
            "Commands accepted and journalled, not yet on the command topic",
            g,
        );
    }
    // The replay guards judge commands no earlier than the time they forgot
    // nonces before (kept across restarts: `control::clock_floor`).
    let floor = crate::control::clock_floor::ClockFloor::in_dir(&dir)?;
    let replay = Arc::new(parking_lot::Mutex::new(ReplayStore::open(
        &opened.records,
        cfg.file.replay_limits(),
        now,
        floor,
    )));
    let sends = Arc::new(sends);
    // The replay guard first: it knows a nonce before the bus delivers its command.
    let mut sinks: Vec<Arc<dyn Sink>> = vec![
        Arc::new(ReplaySink(replay.clone())),
        bus.sink(),
        sends.clone(),
    ];
    let routes = Arc::new(
        gw_core::roles::RouteTable::new(cfg.file.routes.clone())
            .map_err(|e| anyhow::anyhow!("routes: {e}"))?,
    );
    let mut realtime_cfg = cfg.file.realtime.clone();
    realtime_cfg.role = routes
        .rule_for(crate::console::realtime::PATH)
        .and_then(|r| r.role.clone());
    let realtime = Hub::new(realtime_cfg, cfg.file.node_id.clone(), &mut registry);
    realtime.set_lsn(opened.next_lsn().saturating_sub(1));
    sinks.push(realtime.sink());
    sinks.extend(ledger.sink());
    let records = std::mem::take(&mut opened.records);
    let journal = opened.start(chain, sinks)?;
    crate::ops::metrics::register_journal(&mut registry, &journal);
    let mut tasks: Vec<JoinHandle<()>> = ledger
        .start(
            &journal,
            Duration::from_millis(cfg.file.ledger_ship_every_ms),
            cfg.file.clickhouse_nice,
        )
        .await?
        .into_iter()
        .collect();
    let auditor = Auditor::new(ledger.enabled().then(|| journal.clone()));

    let mut keyring = cfg.keyring;
    // Admission and the agents check each command's signature; in one process the
    // second check of the same bytes is answered from the first (gw_core::sigmemo).
    let memo = keyring.remember_verified(SIGNATURE_MEMO);
    crate::ops::metrics::register_signatures(&mut registry, memo);
    let policy = ControlPolicy {
        keyring,
        max_skew: cfg.file.max_skew_secs,
        max_body: cfg.file.max_body_bytes,
    };
    let control_metrics = ControlMetrics::register(&mut registry);
    let conns = crate::serve::ConnMetrics::register(&mut registry);
    let gatekeeper = Gatekeeper {
        auditor: auditor.clone(),
        metrics: control_metrics.clone(),
        budget: Default::default(),
        edge_reports: Arc::default(),
        routes,
        unstamped: Default::default(),
        holders: Arc::new(RefusalBudget::holders()),
        ingest: Default::default(),
        edge_seals: Arc::new(crate::serve::EdgeSeals::new(
            cfg.edge_key,
            cfg.edge_key_prev,
            crate::now_secs(),
        )),
    };
    realtime.set_gate(gatekeeper.clone());
    let (control, t) = Control::start(
        ControlConfig {
            policy,
            replay,
            signer: cfg
                .signer
                .map(|(key, id)| JsonSigner::new(key, id, cfg.file.json_issuer.clone())),
            command_role: cfg.file.command_role.clone(),
            bus: bus.clone(),
            auditor,
            journal: journal.clone(),
            node_id: cfg.file.node_id.clone(),
            apply_wait: Duration::from_millis(cfg.file.apply_wait_ms),
            max_body: cfg.file.max_body_bytes,
            limits: cfg.file.replay_limits(),
            dedup_secs: cfg.file.agent_dedup_secs,
            metrics: control_metrics,
            edge_reports: gatekeeper.edge_reports.clone(),
        },
        &records,
    )?;
    drop(records);
    tasks.extend(t);
    tasks.push(tokio::spawn(crate::serve::flush_unrecorded(
        gatekeeper.clone(),
    )));
    realtime.set_modules(control.modules());
    tracing::info!(bus = %bus.describe(), "command bus");

    if let Some(m) = &cfg.file.models {
        crate::models::watchdog::start(Duration::from_millis(m.predict_timeout_ms))
            .context("cannot start the model watchdog thread")?;
    }
    let models = cfg.file.models.as_ref().map(|m| {
        let host = Arc::new(
            ModelHost::new(&m.dir, |module| m.features_of(module), m.policy())
                .with_load_timeout(Duration::from_millis(m.load_timeout_ms))
                .with_crash_marker(cfg.file.state_dir.join("model-loading"))
                .with_audit(gatekeeper.auditor.clone())
                .requiring(&m.required),
        );
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
            let audit = clickhouse.map(|client| crate::sender::plane::AuditSetup {
                journal: journal.clone(),
                queue: sends.clone(),
                client,
                node_id: cfg.file.node_id.clone(),
            });
            let (dp, t) =
                crate::sender::plane::start(sc, identity, control.modules(), models.clone(), audit)
                    .context("sender")?;
            tracing::info!(
                tpu = dp.sender.tpu().is_some(),
                relay = dp.sender.relay().is_some(),
                hedge_delay_ms = sc.hedge_delay_ms,
                "sender"
            );
            tasks.extend(t);
            if sc.strategy.ingest.is_some() {
                tasks.push(tokio::spawn(crate::sender::ingest::record_refusals(
                    dp.hot.ingest_stats.clone(),
                    gatekeeper.clone(),
                )));
            }
            let dp = Arc::new(dp);
            registry.register_collector(Box::new(crate::sender::metrics::SenderCollector(
                dp.clone(),
            )));
            Some(dp)
        }
        _ => None,
    };
    // Send rows not shipped yet are kept whether or not anything ships them now
    // (no sender, no ClickHouse this time; the queue's `Sink::hold`): a later
    // start ships them.
    if plane.as_ref().is_none_or(|p| p.audit.is_none()) && !sends.is_empty() {
        tracing::warn!(
            rows = sends.pending_rows(),
            "send audit rows wait in the journal for a start with the sender and ClickHouse"
        );
    }
    // Every owner has said what it needs: the journal may drop the rest.
    journal.hold(crate::journal::STARTUP_HOLD, crate::journal::Lsn::MAX);
    let readiness = Arc::new(crate::ops::ready::Readiness::new(
        journal.clone(),
        bus,
        ledger.queue(),
    ));
    Ok(Running {
        tls,
        ops_tls: cfg.file.ops_tls,
        conns,
        gatekeeper,
        control,
        ledger,
        models,
        plane,
        realtime,
        registry: Arc::new(registry),
        readiness,
        tasks,
        journal,
        command_path: cfg.file.command_path.clone(),
    })
}
