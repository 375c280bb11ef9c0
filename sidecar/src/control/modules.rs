//! The module table: each module's state as its agent last applied it. Written
//! by this node's agents and by what the node learns of other nodes' (Kafka bus);
//! the sender, the JSON-RPC gate, evaluate and the console read it.

use std::sync::{Arc, OnceLock};

use gw_core::module_state::{ModuleState, Modules};
use gw_core::Module;
use parking_lot::RwLock;

/// Told each change of a module's state, under the table's write lock (so in the
/// order of the changes): it must not use the table.
pub type Observer = Box<dyn Fn(Module, &ModuleState) + Send + Sync>;

/// A shared, cheap-to-clone view of every module's state.
#[derive(Clone, Default)]
pub struct ModuleTable(Arc<Inner>);

#[derive(Default)]
struct Inner {
    table: RwLock<Modules>,
    observer: OnceLock<Observer>,
}

impl ModuleTable {
    /// Every module stopped, unthrottled.
    pub fn new() -> ModuleTable {
        ModuleTable::default()
    }

    /// A copy of one module's state.
    pub fn get(&self, m: Module) -> ModuleState {
        self.0.table.read().get(m).clone()
    }

    /// Reads one module's state without copying it.
    pub fn with<T>(&self, m: Module, f: impl FnOnce(&ModuleState) -> T) -> T {
        f(self.0.table.read().get(m))
    }

    /// A copy of every module's state.
    pub fn snapshot(&self) -> Modules {
        self.0.table.read().clone()
    }

    /// Replaces one module's state (its agent, or a test standing in for one).
    pub fn set(&self, m: Module, state: ModuleState) {
        let mut t = self.0.table.write();
        self.replace(&mut t, m, state);
    }

    /// Replaces one module's state unless the table already has a later one (more
    /// commands applied): for states learned from other nodes, which may arrive
    /// after this node's agent published a newer one.
    pub fn advance(&self, m: Module, state: ModuleState) {
        let mut t = self.0.table.write();
        if state.applied >= t.get(m).applied {
            self.replace(&mut t, m, state);
        }
    }

    /// Has `f` told of every later change of a module's state, whoever makes it
    /// (this node's agent, another node's checkpoint, a state loaded from Kafka).
    /// Once: a second observer is refused (returned).
    pub fn observe(&self, f: Observer) -> Result<(), Observer> {
        self.0.observer.set(f)
    }

    fn replace(&self, t: &mut Modules, m: Module, state: ModuleState) {
        if *t.get(m) == state {
            return;
        }
        t.set(m, state);
        if let Some(f) = self.0.observer.get() {
            f(m, t.get(m));
        }
    }
}

impl From<Modules> for ModuleTable {
    fn from(m: Modules) -> Self {
        ModuleTable(Arc::new(Inner {
            table: RwLock::new(m),
            observer: OnceLock::new(),
        }))
    }
}
