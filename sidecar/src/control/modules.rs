//! The module table: each module's state as its agent last applied it. Agents are
//! the only writers; the sender, the JSON-RPC gate and evaluate read it.

use std::sync::Arc;

use gw_core::module_state::{ModuleState, Modules};
use gw_core::Module;
use parking_lot::RwLock;

/// A shared, cheap-to-clone view of every module's state.
#[derive(Clone, Default)]
pub struct ModuleTable(Arc<RwLock<Modules>>);

impl ModuleTable {
    /// Every module stopped, unthrottled.
    pub fn new() -> ModuleTable {
        ModuleTable::default()
    }

    /// A copy of one module's state.
    pub fn get(&self, m: Module) -> ModuleState {
        self.0.read().get(m).clone()
    }

    /// Reads one module's state without copying it.
    pub fn with<T>(&self, m: Module, f: impl FnOnce(&ModuleState) -> T) -> T {
        f(self.0.read().get(m))
    }

    /// A copy of every module's state.
    pub fn snapshot(&self) -> Modules {
        self.0.read().clone()
    }

    /// Replaces one module's state (its agent, or a test standing in for one).
    pub fn set(&self, m: Module, state: ModuleState) {
        self.0.write().set(m, state);
    }

    /// Replaces one module's state unless the table already has a later one (more
    /// commands applied): for states learned from other nodes, which may arrive
    /// after this node's agent published a newer one.
    pub fn advance(&self, m: Module, state: ModuleState) {
        let mut t = self.0.write();
        if state.applied >= t.get(m).applied {
            t.set(m, state);
        }
    }
}

impl From<Modules> for ModuleTable {
    fn from(m: Modules) -> Self {
        ModuleTable(Arc::new(RwLock::new(m)))
    }
}
