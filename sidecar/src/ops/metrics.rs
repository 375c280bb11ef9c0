//! Metric families shared between a capability's handlers and tasks. Each is
//! registered once in the sidecar's registry (see `docs/configuration.md` for the
//! list); handlers and tasks hold cheap clones.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    module: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModuleLabel {
    module: &'static str,
}

/// Deliveries per agent batch: 1, 2, 4, … 64 (`MAX_BATCH`).
fn batch_histogram() -> Histogram {
    Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])
}

/// What a module's bus consumer shows of its group: the partitions it holds, the
/// rebalances it took part in.
#[derive(Clone, Debug, Default)]
pub struct GroupMetrics {
    /// Partitions of the command topic held.
    pub held: Gauge,
    /// Assignments received (one per rebalance, an empty one included).
    pub rebalances: Counter,
}

/// The control plane's counters.
#[derive(Clone, Debug)]
pub struct ControlMetrics {
    decisions: Family<CodeLabel, Counter>,
    agent: Family<AgentLabels, Counter>,
    batches: Family<ModuleLabel, Histogram, fn() -> Histogram>,
    partitions: Family<ModuleLabel, Gauge>,
    rebalances: Family<ModuleLabel, Counter>,
    unrecorded: Family<CodeLabel, Counter>,
}

impl Default for ControlMetrics {
    fn default() -> Self {
        ControlMetrics {
            decisions: Family::default(),
            agent: Family::default(),
            batches: Family::new_with_constructor(batch_histogram),
            partitions: Family::default(),
            rebalances: Family::default(),
            unrecorded: Family::default(),
        }
    }
}

impl ControlMetrics {
    /// Registers `gw_sidecar_decisions_total{code}` and
    /// `gw_sidecar_agent_total{module,outcome}`.
    pub fn register(registry: &mut Registry) -> ControlMetrics {
        let m = ControlMetrics::default();
        // Series that exist from the start (a scrape sees 0, not nothing).
        let _ = m.decisions.get_or_create(&CodeLabel { code: "accepted" });
        for code in [gw_core::Code::Unauthenticated, gw_core::Code::ForbiddenPeer] {
            let _ = m.unrecorded.get_or_create(&CodeLabel {
                code: code.as_str(),
            });
        }
        for module in gw_core::Module::ALL {
            let label = ModuleLabel {
                module: module.as_str(),
            };
            let _ = m.batches.get_or_create(&label);
            let _ = m.partitions.get_or_create(&label);
            let _ = m.rebalances.get_or_create(&label);
            for outcome in ["applied", "duplicate", "rejected"] {
                let _ = m.agent.get_or_create(&AgentLabels {
                    module: module.as_str(),
                    outcome,
                });
            }
        }
        registry.register(
            "gw_sidecar_decisions",
            "Admission decisions by code (accepted, a rejection code, edge_reported, edge_report_duplicate)",
            m.decisions.clone(),
        );
        registry.register(
            "gw_sidecar_agent",
            "Deliveries handled by the module agents, by module and outcome",
            m.agent.clone(),
        );
        registry.register(
            "gw_sidecar_agent_batch_deliveries",
            "Deliveries an agent decided in one journal transaction",
            m.batches.clone(),
        );
        registry.register(
            "gw_sidecar_agent_partitions",
            "Partitions of a module's commands this node's agent consumes (embedded bus: 1; Kafka: what the consumer group assigned it)",
            m.partitions.clone(),
        );
        registry.register(
            "gw_sidecar_refusals_unrecorded",
            "Refusals beyond the ledger's budget for them (of callers other than the edge, and the edge's reports of the requests it refused), per code: answered, counted here, and summed in a ledger row of their own once the budget has room",
            m.unrecorded.clone(),
        );
        registry.register(
            "gw_sidecar_agent_rebalances",
            "Consumer group rebalances a module's agent on this node took part in (Kafka: one per assignment it received, an empty one included)",
            m.rebalances.clone(),
        );
        m
    }

    /// What `module`'s agent on this node shows of its consumer group (kept by its
    /// bus consumer).
    pub fn group(&self, module: &'static str) -> GroupMetrics {
        let label = ModuleLabel { module };
        GroupMetrics {
            held: self.partitions.get_or_create(&label).clone(),
            rebalances: self.rebalances.get_or_create(&label).clone(),
        }
    }

    /// Records that `module`'s agent decided `n` deliveries in one transaction.
    pub fn agent_batch(&self, module: &'static str, n: usize) {
        self.batches
            .get_or_create(&ModuleLabel { module })
            .observe(n as f64);
    }

    /// Counts one admission decision.
    pub fn decision(&self, code: &'static str) {
        self.decisions.get_or_create(&CodeLabel { code }).inc();
    }

    /// Counts a refusal (of a caller other than the edge, or reported by the edge)
    /// that got no row of its own.
    pub fn unrecorded(&self, code: &'static str) {
        self.unrecorded.get_or_create(&CodeLabel { code }).inc();
    }

    /// Counts `n` refusals that got no row of their own.
    pub fn unrecorded_n(&self, code: &'static str, n: u64) {
        self.unrecorded.get_or_create(&CodeLabel { code }).inc_by(n);
    }

    /// Counts `n` admission decisions.
    pub fn decisions(&self, code: &'static str, n: u64) {
        self.decisions.get_or_create(&CodeLabel { code }).inc_by(n);
    }

    /// Counts one delivery an agent handled.
    pub fn agent(&self, module: &'static str, outcome: &'static str) {
        self.agent
            .get_or_create(&AgentLabels { module, outcome })
            .inc();
    }

    /// Decisions counted so far for `code` (tests, status).
    pub fn decision_count(&self, code: &'static str) -> u64 {
        self.decisions.get_or_create(&CodeLabel { code }).get()
    }
}

/// Collects `gw_sidecar_journal_*` at scrape time from the journal's counters.
#[derive(Clone)]
struct JournalCollector(crate::journal::Journal);

impl std::fmt::Debug for JournalCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JournalCollector")
    }
}

impl prometheus_client::collector::Collector for JournalCollector {
    fn encode(
        &self,
        mut enc: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        use std::sync::atomic::Ordering::Relaxed;
        let s = self.0.stats();
        for (name, help, v) in [
            (
                "gw_sidecar_journal_records",
                "Transactions made durable",
                s.records.load(Relaxed),
            ),
            (
                "gw_sidecar_journal_batches",
                "Batches written (one fsync each)",
                s.batches.load(Relaxed),
            ),
            (
                "gw_sidecar_journal_failures",
                "Batches that failed to write (their transactions refused)",
                s.failures.load(Relaxed),
            ),
            (
                "gw_sidecar_journal_write_microseconds",
                "Time spent writing and syncing",
                s.write_us.load(Relaxed),
            ),
        ] {
            let c = ConstCounter::new(v);
            c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        for (name, help, v) in [
            (
                "gw_sidecar_journal_segments",
                "Segment files on disk",
                s.segments.load(Relaxed),
            ),
            (
                "gw_sidecar_journal_bytes",
                "Bytes on disk",
                s.bytes.load(Relaxed),
            ),
            (
                "gw_sidecar_journal_start_records",
                "Records read at this start (every one handed to the audit queues)",
                s.start_records.load(Relaxed),
            ),
            (
                "gw_sidecar_journal_start_kept",
                "Of those, records from the journal's horizon on, kept decoded for the replay guard, the bus and the agents",
                s.start_kept.load(Relaxed),
            ),
            (
                "gw_sidecar_journal_horizon",
                "The journal's horizon: the first record a start keeps decoded for the owners other than the audit queues",
                s.horizon.load(Relaxed),
            ),
        ] {
            let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
            g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let bounds = crate::journal::WRITE_BOUNDS_US.map(|b| b as f64 / 1e6);
        let counts: Vec<u64> = s.write_hist.iter().map(|c| c.load(Relaxed)).collect();
        histogram(
            &mut enc,
            "gw_sidecar_journal_batch_seconds",
            "Write and fdatasync time of each journal batch (a command waits for two)",
            &bounds,
            &counts,
            s.write_us.load(Relaxed) as f64 / 1e6,
        )
    }
}

/// Encodes a histogram kept as a count per bucket: `counts[i]` for the values at
/// most `bounds[i]` (above the bound before), one more for the values above the
/// last bound. The encoder makes the counts cumulative and writes the f64::MAX
/// bound given for the last as `le="+Inf"`, as Prometheus requires.
pub(crate) fn histogram(
    enc: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    bounds: &[f64],
    counts: &[u64],
    sum: f64,
) -> Result<(), std::fmt::Error> {
    let buckets: Vec<(f64, u64)> = bounds
        .iter()
        .copied()
        .chain([f64::MAX])
        .zip(counts.iter().copied())
        .collect();
    let count = counts.iter().sum();
    enc.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Histogram,
    )?
    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
}

/// Registers the journal's metrics (`gw_sidecar_journal_*`).
pub fn register_journal(registry: &mut Registry, journal: &crate::journal::Journal) {
    registry.register_collector(Box::new(JournalCollector(journal.clone())));
}

/// Collects `gw_sidecar_signature_checks_total` at scrape time from the key ring's
/// memo of verified signatures.
struct SignatureCollector(std::sync::Arc<gw_core::sigmemo::SigMemo>);

impl std::fmt::Debug for SignatureCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignatureCollector")
    }
}

impl prometheus_client::collector::Collector for SignatureCollector {
    fn encode(
        &self,
        mut enc: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        let (answered, computed) = self.0.counts();
        let mut family = enc.encode_descriptor(
            "gw_sidecar_signature_checks",
            "Command signature checks: `verified` did the Ed25519 arithmetic, `remembered` found the same bytes already verified in this process",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (how, v) in [("verified", computed), ("remembered", answered)] {
            let c = ConstCounter::new(v);
            c.encode(family.encode_family(&[("how", how)])?)?;
        }
        Ok(())
    }
}

/// Registers `gw_sidecar_signature_checks_total{how}`.
pub fn register_signatures(
    registry: &mut Registry,
    memo: std::sync::Arc<gw_core::sigmemo::SigMemo>,
) {
    registry.register_collector(Box::new(SignatureCollector(memo)));
}
