//! Metric families shared between a capability's handlers and tasks. Each is
//! registered once in the sidecar's registry (see `docs/configuration.md` for the
//! list); handlers and tasks hold cheap clones.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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

/// The control plane's counters.
#[derive(Clone, Debug, Default)]
pub struct ControlMetrics {
    decisions: Family<CodeLabel, Counter>,
    agent: Family<AgentLabels, Counter>,
}

impl ControlMetrics {
    /// Registers `gw_sidecar_decisions_total{code}` and
    /// `gw_sidecar_agent_total{module,outcome}`.
    pub fn register(registry: &mut Registry) -> ControlMetrics {
        let m = ControlMetrics::default();
        // Series that exist from the start (a scrape sees 0, not nothing).
        let _ = m.decisions.get_or_create(&CodeLabel { code: "accepted" });
        for module in gw_core::Module::ALL {
            for outcome in ["applied", "duplicate", "rejected"] {
                let _ = m.agent.get_or_create(&AgentLabels {
                    module: module.as_str(),
                    outcome,
                });
            }
        }
        registry.register(
            "gw_sidecar_decisions",
            "Admission decisions by code (accepted, a rejection code, edge_reported, replay_not_persisted)",
            m.decisions.clone(),
        );
        registry.register(
            "gw_sidecar_agent",
            "Deliveries handled by the module agents, by module and outcome",
            m.agent.clone(),
        );
        m
    }

    /// Counts one admission decision.
    pub fn decision(&self, code: &'static str) {
        self.decisions.get_or_create(&CodeLabel { code }).inc();
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
