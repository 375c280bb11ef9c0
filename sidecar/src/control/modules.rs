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
    table: RwLock<Table>,
    observer: OnceLock<Observer>,
}

#[derive(Default)]
struct Table {
    modules: Modules,
    /// Per module, the checkpoint generation of the state held, when it came
    /// with one (Kafka bus; 0: none known).
    generation: std::collections::BTreeMap<Module, u64>,
}

impl ModuleTable {
    /// Every module stopped, unthrottled.
    pub fn new() -> ModuleTable {
        ModuleTable::default()
    }

    /// A copy of one module's state.
    pub fn get(&self, m: Module) -> ModuleState {
        self.0.table.read().modules.get(m).clone()
    }

    /// Reads one module's state without copying it.
    pub fn with<T>(&self, m: Module, f: impl FnOnce(&ModuleState) -> T) -> T {
        f(self.0.table.read().modules.get(m))
    }

    /// A copy of every module's state.
    pub fn snapshot(&self) -> Modules {
        self.0.table.read().modules.clone()
    }

    /// Replaces one module's state (its agent, or a test standing in for one).
    pub fn set(&self, m: Module, state: ModuleState) {
        let mut t = self.0.table.write();
        self.replace(&mut t, m, state);
    }

    /// Replaces one module's state with one read from checkpoint `generation`
    /// (an agent loading it from Kafka, or beginning a numbering afresh there):
    /// states learned later from other nodes are ordered after it by their
    /// generation ([`Self::advance`]). A state set without one
    /// ([`Self::set`]) leaves the generation as it was.
    /// A table already holding a later generation (the watch read a newer
    /// checkpoint while the agent was loading) keeps it.
    pub fn set_at(&self, m: Module, state: ModuleState, generation: u64) {
        let mut t = self.0.table.write();
        if t.generation.get(&m).is_some_and(|&held| held > generation) {
            return;
        }
        t.generation.insert(m, generation);
        self.replace(&mut t, m, state);
    }

    /// Replaces one module's state unless the table already has a later one: for
    /// states learned from other nodes, which may arrive after this node's agent
    /// published a newer one. Later is a higher checkpoint `generation` when
    /// both have one (the count of commands applied starts again lower when the
    /// cluster's numbering begins afresh: compared by counts, every state after
    /// that — a kill — was passed over until the count caught up), else more
    /// commands applied.
    pub fn advance(&self, m: Module, state: ModuleState, generation: Option<u64>) {
        let mut t = self.0.table.write();
        let held = t.generation.get(&m).copied().unwrap_or(0);
        let applied = state.applied >= t.modules.get(m).applied;
        let later = match generation {
            Some(g) if g > 0 && held > 0 => g > held || (g == held && applied),
            _ => applied,
        };
        if later {
            if let Some(g) = generation.filter(|&g| g > held) {
                t.generation.insert(m, g);
            }
            self.replace(&mut t, m, state);
        }
    }

    /// Has `f` told of every later change of a module's state, whoever makes it
    /// (this node's agent, another node's checkpoint, a state loaded from Kafka).
    /// Once: a second observer is refused (returned).
    pub fn observe(&self, f: Observer) -> Result<(), Observer> {
        self.0.observer.set(f)
    }

    fn replace(&self, t: &mut Table, m: Module, state: ModuleState) {
        if *t.modules.get(m) == state {
            return;
        }
        t.modules.set(m, state);
        if let Some(f) = self.0.observer.get() {
            f(m, t.modules.get(m));
        }
    }
}

impl From<Modules> for ModuleTable {
    fn from(modules: Modules) -> Self {
        ModuleTable(Arc::new(Inner {
            table: RwLock::new(Table {
                modules,
                generation: Default::default(),
            }),
            observer: OnceLock::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gw_core::module_state::RunState;

    fn state(run: RunState, applied: u64) -> ModuleState {
        ModuleState {
            state: run,
            applied,
            ..ModuleState::default()
        }
    }

    #[test]
    fn a_later_generation_is_taken_whatever_its_count() {
        let t = ModuleTable::new();
        let m = Module::Mev;
        t.advance(m, state(RunState::Running, 50), Some(10));
        // A numbering begun afresh: fewer commands counted, a later checkpoint.
        t.advance(m, state(RunState::Killed, 3), Some(11));
        assert_eq!(t.get(m).state, RunState::Killed);
        // An older checkpoint read late sets nothing back, whatever its count.
        t.advance(m, state(RunState::Running, 100), Some(9));
        assert_eq!(t.get(m).state, RunState::Killed);
        // A state loaded from checkpoint 15 (an agent taking the module over):
        // a checkpoint of 13 read late by the watch is older.
        t.set_at(m, state(RunState::Running, 1), 15);
        t.advance(m, state(RunState::Killed, 2), Some(13));
        assert_eq!(t.get(m).state, RunState::Running);
        // A load of an older checkpoint than the table holds keeps the newer.
        t.set_at(m, state(RunState::Killed, 9), 14);
        assert_eq!(t.get(m).state, RunState::Running);
        // (Generation 11 for what follows: a fresh table.)
        let t = ModuleTable::new();
        t.set_at(m, state(RunState::Killed, 3), 11);
        // Of one generation, or without one: the count decides.
        t.advance(m, state(RunState::Stopped, 4), Some(11));
        assert_eq!(t.get(m).state, RunState::Stopped);
        t.advance(m, state(RunState::Running, 2), None);
        assert_eq!(t.get(m).state, RunState::Stopped);
        t.advance(m, state(RunState::Running, 5), None);
        assert_eq!(t.get(m).state, RunState::Running);
    }
}
