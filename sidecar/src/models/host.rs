//! Serving models per module: [`ModelHost`] watches `lib<name>_latest.so` links and
//! swaps a new model in atomically (`arc-swap`) once it passed every check of
//! [`Model::load`]; a library that fails any check is refused with a log line and
//! a counter while the old model keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;

use super::library::Model;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModuleLabel {
    module: &'static str,
}

/// One module's slot.
pub struct Slot {
    /// Module name in the API (`mev`, `arbitrage`).
    pub module: &'static str,
    /// Library stem: `lib<stem>_latest.so`.
    pub stem: &'static str,
    current: ArcSwapOption<Model>,
    /// Link target refused last (not retried until the link changes).
    refused: Mutex<Option<(PathBuf, String)>>,
    /// Models swapped in (this slot's entry of `gw_sidecar_model_loads_total`).
    loads: Counter,
    /// Libraries refused (its entry of `gw_sidecar_model_rejected_total`).
    rejected: Counter,
}

impl Slot {
    /// Models swapped in since start.
    pub fn loads(&self) -> u64 {
        self.loads.get()
    }

    /// Libraries refused since start.
    pub fn rejected(&self) -> u64 {
        self.rejected.get()
    }
}

/// Every module's model.
pub struct ModelHost {
    dir: PathBuf,
    n_features: u32,
    /// The slots (`mev` → libmev, `arbitrage` → libarb).
    slots: Vec<Slot>,
    loads: Family<ModuleLabel, Counter>,
    rejected: Family<ModuleLabel, Counter>,
}

/// What `GET /api/models` shows of a slot.
#[derive(Debug, Serialize)]
pub struct SlotView {
    /// Serving model, if any.
    pub serving: Option<ModelView>,
    /// The last refused library and why.
    pub refused: Option<(String, String)>,
    /// Models swapped in since start.
    pub loads: u64,
    /// Libraries refused since start.
    pub rejected: u64,
}

/// A serving model.
#[derive(Debug, Serialize)]
pub struct ModelView {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Library file.
    pub path: String,
    /// Features per row.
    pub n_features: u32,
    /// Outputs per row.
    pub n_outputs: u32,
}

impl ModelHost {
    /// A host over `dir` feeding `n_features` per row; nothing loaded yet.
    pub fn new(dir: &Path, n_features: u32) -> ModelHost {
        let loads = Family::<ModuleLabel, Counter>::default();
        let rejected = Family::<ModuleLabel, Counter>::default();
        let slot = |module, stem| {
            let label = ModuleLabel { module };
            Slot {
                module,
                stem,
                current: ArcSwapOption::empty(),
                refused: Mutex::new(None),
                // A family's counter is shared: the slot and the family count as one.
                loads: loads.get_or_create(&label).clone(),
                rejected: rejected.get_or_create(&label).clone(),
            }
        };
        let slots = vec![slot("mev", "mev"), slot("arbitrage", "arb")];
        ModelHost {
            dir: dir.to_path_buf(),
            n_features,
            slots,
            loads,
            rejected,
        }
    }

    /// Registers `gw_sidecar_model_loads_total{module}` and
    /// `gw_sidecar_model_rejected_total{module}`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "gw_sidecar_model_loads",
            "Models swapped in, by module",
            self.loads.clone(),
        );
        registry.register(
            "gw_sidecar_model_rejected",
            "Model libraries refused (the old model kept serving), by module",
            self.rejected.clone(),
        );
    }

    /// The modules with a slot.
    pub fn modules(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.slots.iter().map(|s| s.module)
    }

    /// The slot of `module`.
    pub fn slot(&self, module: &str) -> Option<&Slot> {
        self.slots.iter().find(|s| s.module == module)
    }

    /// The serving model of `module` (hold the `Arc` for the whole prediction).
    pub fn current(&self, module: &str) -> Option<Arc<Model>> {
        self.slot(module).and_then(|s| s.current.load_full())
    }

    /// Checks every `lib<stem>_latest.so` once: a changed link target is loaded and,
    /// if it passes every check, swapped in. Returns the log lines of what happened.
    pub fn poll(&self) -> Vec<String> {
        let mut log = Vec::new();
        for s in &self.slots {
            let link = self.dir.join(format!("lib{}_latest.so", s.stem));
            let Ok(target) = std::fs::canonicalize(&link) else {
                continue; // no link yet: nothing to serve
            };
            if s.current.load().as_ref().is_some_and(|m| m.path == target) {
                continue;
            }
            let mut refused = s.refused.lock();
            if refused.as_ref().is_some_and(|(p, _)| *p == target) {
                continue;
            }
            match Model::load(&target, self.n_features) {
                Ok(m) => {
                    log.push(format!(
                        "model {}: serving {} {} from {}",
                        s.module,
                        m.name,
                        m.version,
                        target.display()
                    ));
                    s.current.store(Some(Arc::new(m)));
                    s.loads.inc();
                    *refused = None;
                }
                Err(e) => {
                    let kept = s
                        .current
                        .load()
                        .as_ref()
                        .map_or("nothing".to_string(), |m| m.version.clone());
                    log.push(format!(
                        "model {}: refused ({e}); still serving {kept}",
                        s.module
                    ));
                    s.rejected.inc();
                    *refused = Some((target, e.to_string()));
                }
            }
        }
        log
    }

    /// What serves each module.
    pub fn view(&self) -> Vec<(&'static str, SlotView)> {
        self.slots
            .iter()
            .map(|s| {
                let serving = s.current.load().as_ref().map(|m| ModelView {
                    name: m.name.clone(),
                    version: m.version.clone(),
                    path: m.path.display().to_string(),
                    n_features: m.n_features,
                    n_outputs: m.n_outputs,
                });
                let refused = s
                    .refused
                    .lock()
                    .as_ref()
                    .map(|(p, e)| (p.display().to_string(), e.clone()));
                (
                    s.module,
                    SlotView {
                        serving,
                        refused,
                        loads: s.loads.get(),
                        rejected: s.rejected.get(),
                    },
                )
            })
            .collect()
    }

    /// Polls every `period` forever, logging changes (run as a task).
    pub async fn watch(self: Arc<Self>, period: Duration) {
        loop {
            let host = self.clone();
            if let Ok(lines) = tokio::task::spawn_blocking(move || host.poll()).await {
                for l in lines {
                    tracing::info!("{l}");
                }
            }
            tokio::time::sleep(period).await;
        }
    }
}
