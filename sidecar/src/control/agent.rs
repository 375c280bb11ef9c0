//! A module agent: the consumer group `ctrl-proto-{module}` that applies commands.
//!
//! [`AgentCore`] decides, without I/O, what one delivery means: not this module's,
//! refused (the signed bytes do not verify again: signature, key, scope; not
//! freshness — a consumer that lags must still apply what admission accepted in
//! time), a duplicate (a nonce it already applied: at-least-once delivery and a
//! re-published command both end here), or the next module state. Applied nonces
//! are remembered until `dedup_secs` after the later of the command's expiry and
//! its application, so a redelivery within that horizon is never applied twice.
//! Over Kafka a command arriving beyond that horizon is refused `stale` unless
//! remembered: the same bytes admitted at two nodes could otherwise be applied
//! once through each, the first forgotten by the time the second arrives. The
//! shell ([`Agent::run`]) makes the ledger row, the new module state, the applied
//! nonce and (embedded bus) the consumed offset durable in one journal transaction
//! — on the embedded bus for every delivery that is ready at once, decided in
//! order — then announces the outcomes to the waiting requests and commits the
//! offset. Its state is rebuilt from the journal at start; a snapshot now and then
//! lets the journal drop older records. On the Kafka bus the module's state is kept in Kafka
//! ([`super::kafka_state`]): each decision is first written there as the module's
//! checkpoint, and an agent that is assigned the module's partition (at start, or
//! taking it over from another node) continues from the latest checkpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use gw_core::ledger::{Decision, Stage};
use gw_core::module_state::ModuleState;
use gw_core::replay::{Limits, NonceBook, Refused};
use gw_core::{Code, Command, ControlPolicy, Module, Reject, VerifiedCommand};
use tokio::sync::broadcast;

use super::bus::{BusConsumer, BusError, Delivery, Origin, Position};
use super::clock_floor::ClockFloor;
use super::kafka_state::{Behind, Checkpoint, KafkaState, LastDecision, StoredNonce, RECENT};
use super::modules::ModuleTable;
use crate::journal::txn::{AgentEntry, AppliedNonce, RefusedCommand, SnapshotEntry, SnapshotPart};
use crate::journal::{self, Journal, JournalError, Lsn, Txn};
use crate::ledger::{Auditor, Entry};
use crate::ops::metrics::ControlMetrics;

/// What an agent did with one command, for the request that is waiting on it.
#[derive(Debug, Clone)]
pub struct Ack {
    /// Issuer of the command.
    pub issuer: String,
    /// Its nonce.
    pub nonce: u64,
    /// The module state after applying, or why it was not applied.
    pub outcome: Result<ModuleState, Reject>,
    /// The seq of the agent's row (0 when not audited, or unknown: another node).
    pub seq: u64,
    /// The chain (node) that applied it, when not this one.
    pub applied_by: Option<String>,
    /// The digest of the exact bytes decided (a waiter with other bytes under the
    /// same nonce is not answered by this).
    pub digest: gw_core::replay::Digest,
}

/// What [`Agent::handle`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Handled {
    /// Keyed for another module: nothing to do.
    NotMine,
    /// Applied.
    Applied,
    /// Already applied earlier (redelivery or a second publish): skipped.
    Duplicate,
    /// Refused (audited); the delivery is done.
    Rejected(Code),
    /// Kafka: handled before, by this node or another (the module's checkpoint in
    /// Kafka is past it); nothing to do.
    Seen,
}

impl Handled {
    /// The metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Handled::NotMine => "not_mine",
            Handled::Applied => "applied",
            Handled::Duplicate => "duplicate",
            Handled::Rejected(_) => "rejected",
            Handled::Seen => "seen",
        }
    }
}

/// The decision on one delivery.
#[derive(Debug, Clone)]
pub enum Step {
    /// Keyed for another module.
    NotMine,
    /// The bytes do not verify (again): refuse, audited.
    Refuse(Reject),
    /// The nonce was applied before: skip, audited.
    Duplicate(Box<Command>),
    /// Apply: the state and applied nonces after this command.
    Apply(Box<Applied>),
}

/// The outcome of applying one command, not yet durable.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The verified command.
    pub verified: VerifiedCommand,
    /// The module's state after it.
    pub state: ModuleState,
    /// Until when its nonce is remembered.
    pub expires: u64,
}

/// What a delivery of a batch came to, until the batch is durable.
enum Decided {
    /// Nothing to write.
    Done(Handled),
    /// Refused; `has_row`: audited; `announce`: told to whoever waits for the
    /// command (not for a copy no gateway node forwarded, nor a copy of a
    /// forward: the command it copies may still come, or has its own answer).
    Rejected {
        r: Reject,
        has_row: bool,
        announce: bool,
    },
    /// Applied before; announced with the state as of its place in the batch.
    Duplicate {
        issuer: String,
        nonce: u64,
        state: ModuleState,
        has_row: bool,
    },
    /// Applied.
    Applied { a: Box<Applied>, has_row: bool },
}

/// What an applied nonce's command asked: its module, action, request id and
/// arguments (not its time or signature: the same command sent again, or signed
/// again by the JSON route for a retry under its idempotency key, is the same).
/// A second command under a remembered nonce that asks anything else is not a
/// copy of the first: it is refused (`replay`), not answered as applied.
pub fn what_of(c: &Command) -> gw_core::replay::Digest {
    let (module, action) = (c.module.to_be_bytes(), c.action.to_be_bytes());
    let mut parts: Vec<&[u8]> = vec![
        b"gw-applied-command/1",
        &module,
        &action,
        c.request_id.as_bytes(),
    ];
    for (k, v) in &c.args {
        parts.push(k.as_bytes());
        parts.push(v.as_bytes());
    }
    gw_core::replay::digest(&super::state_sign::message(b"", &parts))
}

/// [`what_of`] as records keep it.
fn what_hex(c: &Command) -> Option<String> {
    Some(hex::encode(what_of(c)))
}

/// A record's [`what_of`] (`None`: written before it was kept, or not 16 bytes
/// of hex — any command under the nonce is then taken for a copy, as before).
pub(crate) fn what_parsed(what: Option<&str>) -> Option<gw_core::replay::Digest> {
    hex::decode(what?).ok()?.try_into().ok()
}

/// An applied nonce as an agent remembers it.
#[derive(Debug, Clone, Copy)]
pub struct AppliedAt {
    /// The seq of its `applied` row (0: not known here).
    pub seq: u64,
    /// What its command asked ([`what_of`]; `None`: not known).
    pub what: Option<gw_core::replay::Digest>,
}

/// Nonces applied by the deliveries before one in a batch not durable yet:
/// (issuer, nonce) → what each asked ([`what_of`]).
pub type Pending = BTreeMap<(String, u64), gw_core::replay::Digest>;

/// One module's agent state machine.
#[derive(Debug, Clone)]
pub struct AgentCore {
    module: Module,
    policy: ControlPolicy,
    state: ModuleState,
    /// Applied nonces, each with the seq of its `applied` row and what it asked.
    applied: NonceBook<AppliedAt>,
    dedup_secs: u64,
}

impl AgentCore {
    /// An agent for `module` with its last durable state, remembering applied
    /// nonces for `dedup_secs` beyond their commands' freshness.
    pub fn new(
        module: Module,
        policy: ControlPolicy,
        state: ModuleState,
        applied: NonceBook<AppliedAt>,
        dedup_secs: u64,
    ) -> AgentCore {
        AgentCore {
            module,
            policy,
            state,
            applied,
            dedup_secs,
        }
    }

    /// The module's state.
    pub fn state(&self) -> &ModuleState {
        &self.state
    }

    /// Decides on one delivery at `now` (unix seconds: the key's validity).
    pub fn decide(&self, d: &Delivery, now: u64) -> Step {
        self.decide_after(&self.state, &Pending::new(), d, now)
    }

    /// Decides on `d` as if the module's state were `state` and the nonces
    /// `pending` were applied too: the deliveries before it in a batch that is
    /// not durable yet.
    pub fn decide_after(
        &self,
        state: &ModuleState,
        pending: &Pending,
        d: &Delivery,
        now: u64,
    ) -> Step {
        if d.key != self.module.as_str().as_bytes() {
            // A record keyed with no module's name is every agent's "not mine":
            // the first module's agent refuses it, so that it has its row.
            let a_modules = Module::ALL.iter().any(|m| d.key == m.as_str().as_bytes());
            if a_modules || self.module != Module::ALL[0] {
                return Step::NotMine;
            }
            let key = String::from_utf8_lossy(&d.key[..d.key.len().min(64)]).into_owned();
            let code = match d.origin {
                Origin::Unverified {
                    accepted: false, ..
                } => Code::ForbiddenPeer,
                _ => Code::Malformed,
            };
            return Step::Refuse(Reject::with(
                code,
                format!("a record of the command topic keyed `{key}` names no module: no agent applies it"),
            ));
        }
        if let Origin::Unverified {
            why,
            accepted: false,
        } = &d.origin
        {
            return Step::Refuse(Reject::with(
                Code::ForbiddenPeer,
                format!("the command topic's record was not forwarded by a gateway node: {why}"),
            ));
        }
        // A record a gateway node forwarded (or this node's own) was admitted;
        // one taken unforwarded (`kafka.accept_unforwarded`) was not.
        let admitted = matches!(d.origin, Origin::Local | Origin::Node { .. });
        let v = match self
            .policy
            .verify_for_apply(&d.payload, self.module, now, admitted)
        {
            Ok(v) => v,
            Err(r) => return Step::Refuse(r),
        };
        let c = &v.command;
        let before = match self.applied.get(&c.issuer, c.nonce, now) {
            Some(s) => Some(s.value.what),
            None => pending.get(&(c.issuer.clone(), c.nonce)).map(|w| Some(*w)),
        };
        if let Some(what) = before {
            if what.is_some_and(|w| w != what_of(c)) {
                // Not a copy: answered applied, it would say a command did what
                // another one under its nonce did (the JSON route's idempotency
                // key used for another request once the replay guard forgot it).
                return Step::Refuse(Reject::with(
                    Code::Replay,
                    format!(
                        "nonce {} of issuer {} was applied to another command within the agents' memory (agent_dedup_secs): this one is not applied; send it with a new nonce (the JSON route: a new Idempotency-Key)",
                        c.nonce, c.issuer
                    ),
                ));
            }
            return Step::Duplicate(Box::new(v.command));
        }
        // An earlier application of this nonce is remembered until at least
        // `dedup_secs` past the command's expiry (`expires` below). Beyond that,
        // not knowing it is no proof it was never applied: over Kafka the same
        // bytes may have been admitted at another node too, and one copy applied
        // and forgotten before the other arrives. The embedded bus has no other
        // node, and its journal offset stands for the nonce.
        let remembered =
            gw_core::replay::expiry(c.ts, self.policy.max_skew).saturating_add(self.dedup_secs);
        if now > remembered && !matches!(d.origin, Origin::Local) {
            return Step::Refuse(Reject::with(
                Code::Stale,
                format!(
                    "arrived {} s after the agents' memory of applied commands lets it go (its ts, max_skew_secs and agent_dedup_secs): whether a copy of it was applied is not known, so it is not applied; send a new command",
                    now - remembered
                ),
            ));
        }
        // Over Kafka, an agent that could not remember this nonce could not tell a
        // copy of it admitted at another node from a new command, and would
        // apply it twice (it was applied, its nonce left unremembered and only
        // logged). Refused instead, with its row; the embedded bus has no other
        // node, and its journal offset stands for the nonce. A stop or kill is
        // never refused for it: applied twice it changes nothing more.
        let idempotent = matches!(v.action, gw_core::Action::Stop | gw_core::Action::Kill);
        if !matches!(d.origin, Origin::Local) && !idempotent {
            let held = pending.keys().filter(|(i, _)| *i == c.issuer).count();
            let reserved = std::collections::HashMap::from([(c.issuer.clone(), held)]);
            if let Err(Refused::IssuerFull | Refused::TooManyIssuers) = self
                .applied
                .check_reserved(&c.issuer, c.nonce, now, &reserved)
            {
                return Step::Refuse(Reject::with(
                    Code::ReplayCapacity,
                    format!(
                        "the agents' memory of applied commands is full for issuer {} (replay_max_per_issuer, replay_max_issuers, kept agent_dedup_secs): a copy admitted at another node could not be told apart, so it is not applied; send it again later with a new nonce",
                        c.issuer
                    ),
                ));
            }
        }
        // Saturating: a validly signed command's `ts` is not checked for freshness
        // here (it may arrive late over the bus), so it can be anything. Kept
        // `max_skew` beyond the `stale` bound above: a node whose clock runs
        // ahead (within the skew) forgets it no sooner than another node's
        // agent, deciding by its own clock, stops taking its copies.
        let expires = gw_core::replay::expiry(c.ts, self.policy.max_skew)
            .max(now)
            .saturating_add(self.dedup_secs)
            .saturating_add(self.policy.max_skew);
        let mut state = state.clone();
        state.apply(v.action, &v.args, &c.request_id);
        Step::Apply(Box::new(Applied {
            verified: v,
            state,
            expires,
        }))
    }

    /// Makes an applied step the current state once it is durable (its row: `seq`).
    pub fn commit(&mut self, a: Applied, seq: u64, now: u64) {
        self.state = a.state;
        let c = &a.verified.command;
        let at = AppliedAt {
            seq,
            what: Some(what_of(c)),
        };
        // Beyond the bound come only what `decide` lets past it: a stop or
        // kill over Kafka, anything on the embedded bus (one node: its
        // journal offset stands for the nonce). Remembered beyond it all the
        // same, as much again at most: a stop or kill applied and not
        // remembered was applied again when another node's copy of it came
        // after a later start, undoing it.
        if let Err(Refused::IssuerFull | Refused::TooManyIssuers) =
            self.applied.insert(&c.issuer, c.nonce, a.expires, at, now)
        {
            if !self
                .applied
                .remember_within_twice(&c.issuer, c.nonce, a.expires, at, now)
            {
                tracing::warn!(module = self.module.as_str(), issuer = %c.issuer, nonce = c.nonce, "agent dedup memory full, twice over: the nonce is not remembered");
            }
        }
    }

    /// Every applied nonce still remembered at `now`.
    pub fn applied(&self, now: u64) -> Vec<AppliedNonce> {
        self.applied
            .iter()
            .filter(|(_, _, s)| s.expires >= now)
            .map(|(issuer, nonce, s)| AppliedNonce {
                issuer: issuer.to_owned(),
                nonce,
                expires: s.expires,
                seq: s.value.seq,
                what: s.value.what.map(hex::encode),
            })
            .collect()
    }
}

/// A delivery not done yet: the offset must not be committed; try again later.
#[derive(Debug, thiserror::Error)]
pub enum RetryLater {
    /// The journal could not be written.
    #[error("agent: {0}")]
    Journal(#[from] JournalError),
    /// The module's checkpoint could not be written to Kafka.
    #[error("agent checkpoint: {0}")]
    Kafka(#[from] BusError),
}

/// Everything agents share.
#[derive(Clone)]
pub struct AgentEnv {
    /// Verification rules (freshness is not applied by agents).
    pub policy: ControlPolicy,
    /// Where decisions, state and consumed offsets are made durable.
    pub journal: Journal,
    /// Whether the bus is the embedded one (its offsets live in the journal).
    pub embedded_bus: bool,
    /// Bounds of the applied-nonce memory.
    pub limits: Limits,
    /// How long applied nonces are remembered beyond their commands' freshness.
    pub dedup_secs: u64,
    /// The module table agents publish their state to.
    pub modules: ModuleTable,
    /// The audit ledger.
    pub auditor: Auditor,
    /// Where outcomes are announced.
    pub acks: broadcast::Sender<Ack>,
    /// Outcome counters.
    pub metrics: ControlMetrics,
    /// Kafka bus: where module state is kept for every node.
    pub kafka_state: Option<Arc<KafkaState>>,
    /// This node's chain id.
    pub chain: String,
    /// The durable clock floor of the node's replay guards: the record of an
    /// applied nonce goes only once it is past the nonce's expiry, and no command
    /// is judged earlier.
    pub floor: ClockFloor,
}

/// The Kafka side of an agent.
struct KafkaSide {
    store: Arc<KafkaState>,
    /// The module's checkpoint as of the last delivery this agent handled or
    /// loaded. Before a load, the default state under the highest generation the
    /// journal knows was written: its generation is always the floor of the next
    /// load ([`KafkaState::load`]).
    checkpoint: Checkpoint,
    /// Keys of nonce records by expiry (tombstoned once expired).
    written: BTreeMap<u64, Vec<String>>,
    /// Per partition, the last offset this node's journal has an agent entry of.
    journalled: BTreeMap<i32, i64>,
    /// The newest record that says so (held: a restart must still know it).
    journalled_lsn: Option<Lsn>,
    /// Per partition, the last delivery taken as already handled since the
    /// checkpoint was loaded, once the topic was found to be the checkpoint's
    /// ([`Agent::topic_replaced`]); cleared when the agent catches up.
    behind: BTreeMap<i32, i64>,
    /// Partitions found replaced ([`Agent::topic_replaced`]) whose `journalled`
    /// offset is still the old topic's.
    replaced: BTreeSet<i32>,
    /// Partitions the consumer was sent back on since the checkpoint was loaded
    /// ([`Agent::rewind_for`]).
    rewound: BTreeSet<i32>,
}

/// One module's agent: the core and its effects.
pub struct Agent {
    core: AgentCore,
    env: AgentEnv,
    /// The next embedded-bus offset to consume (`None` with Kafka).
    next_offset: Option<Lsn>,
    /// The record that holds the module state (latest change or snapshot).
    state_lsn: Option<Lsn>,
    /// Records holding applied nonces still remembered, and until when.
    applied_lsns: journal::Expiring,
    /// Kafka bus only.
    kafka: Option<KafkaSide>,
}

/// Takes out of `written` (keys of nonce records by expiry) those to tombstone at
/// `now`: expired before `floor` (made to cover them first) and before the
/// module checkpoint's `checkpoint_floor`.
fn forgettable(
    written: &mut BTreeMap<u64, Vec<String>>,
    now: u64,
    floor: &ClockFloor,
    checkpoint_floor: u64,
) -> Vec<String> {
    if let Some((&e, _)) = written.range(..now).next_back() {
        floor.cover_expired(e, now);
    }
    let cut = now.min(floor.get()).min(checkpoint_floor);
    let keep = written.split_off(&cut);
    std::mem::replace(written, keep)
        .into_values()
        .flatten()
        .collect()
}

/// Writes a nonce record, waiting for the broker (after a checkpoint that lists
/// it: a lost record is written again by the next owner anyway).
async fn put_nonce(store: &KafkaState, m: Module, n: &StoredNonce) {
    for attempt in 0u32.. {
        match store.put_nonce(m, n).await {
            Ok(()) => return,
            Err(e) if attempt == 0 => {
                tracing::warn!(error = %e, "nonce record not written yet (retrying)");
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The checkpoint outcome of a refused delivery no gateway node forwarded.
pub const UNFORWARDED: &str = "unforwarded";
/// The checkpoint outcome of a refused copy of a forward decided on before.
pub const COPIED: &str = "copied";

/// Whether an agent's refusal of a forwarded command with `code` is what became
/// of the command — so that the replay guard of a node that accepted those bytes
/// tells a resend — or only of this delivery of it: `forbidden_peer` (a record
/// no listed node wrote, or in the wrong partition), `replay_unavailable`. A
/// copy of a forward is refused `replay` too, but as a copy: neither told nor
/// kept. A `replay` that is not a copy is the command's: another command under
/// its nonce was applied. An `unavailable` forward (overtaken on the topic by a
/// later one of its node) is the command's: it was not applied — applied, it
/// would be a `duplicate`, its nonce kept past the guard's — and this forward of
/// it never will be; a resend is told to sign it again.
pub fn refusal_is_the_commands(code: Code) -> bool {
    !matches!(code, Code::ForbiddenPeer | Code::ReplayUnavailable)
}

/// Whether an agent's refusal of a forward with `code` says only what became of
/// that node's forward — its place on the topic (`unavailable`: overtaken), its
/// partition (`forbidden_peer`), the guard (`replay_unavailable`) — and nothing
/// of the same bytes forwarded by another node, which may still apply. Such a
/// refusal is told to the requests waiting on the node whose forward it was
/// only: told elsewhere ("sign it again") it made a client send a second
/// command while the first was still on its way.
pub fn refusal_is_the_forwards(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::ForbiddenPeer | Code::ReplayUnavailable
    )
}

/// Applied nonces a snapshot writes to one record (each at most a few hundred
/// bytes of JSON: well within [`journal::MAX_RECORD_BYTES`]).
const SNAPSHOT_PART_NONCES: usize = 32_768;

/// Reads a snapshot's parts as they come ([`Agent::snapshot`]).
#[derive(Default)]
struct SnapshotParts<'a> {
    parts: Vec<(Lsn, &'a SnapshotEntry)>,
}

impl<'a> SnapshotParts<'a> {
    /// `s`, read at `lsn`: the whole snapshot once it is complete (a snapshot
    /// of one record at once), else `None`. A part out of its place (another
    /// snapshot's, one after a part that is missing) drops what was gathered.
    fn read(&mut self, lsn: Lsn, s: &'a SnapshotEntry) -> Option<Vec<(Lsn, &'a SnapshotEntry)>> {
        let Some(p) = s.part else {
            self.parts.clear();
            return Some(vec![(lsn, s)]);
        };
        let follows = self
            .parts
            .last()
            .and_then(|(_, last)| last.part)
            .is_some_and(|q| {
                q.id == p.id && q.count == p.count && q.index.checked_add(1) == Some(p.index)
            });
        if !follows {
            self.parts.clear();
            if p.index != 0 {
                return None;
            }
        }
        self.parts.push((lsn, s));
        (p.index.checked_add(1) == Some(p.count)).then(|| std::mem::take(&mut self.parts))
    }
}

/// Most deliveries an agent decides on in one journal transaction.
const MAX_BATCH: usize = 64;
/// And most command bytes beyond the first (a delivery's entries hold its bytes
/// about five times: raw, hex, arguments, state; far below
/// [`journal::MAX_RECORD_BYTES`], and a delivery alone is never held back).
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Says how many applied nonces read back were beyond twice the bound and
/// not remembered (bounds lowered across a restart): a copy of one of those
/// commands from another node, within `agent_dedup_secs`, would be applied
/// again.
fn unkept_nonces(module: Module, n: usize) {
    if n > 0 {
        tracing::warn!(module = module.as_str(), nonces = n, "applied nonces read back beyond twice replay_max_per_issuer (or replay_max_issuers) are not remembered: a copy of one of those commands arriving from another node within agent_dedup_secs would be applied again; raise the bounds back");
    }
}

/// The journal hold of a module's agent.
fn hold_name(m: Module) -> &'static str {
    match m {
        Module::Arbitrage => "agent-arbitrage",
        Module::Mev => "agent-mev",
    }
}

impl Agent {
    /// Rebuilds the agent's state from the journal's `records` (a module with none
    /// starts from the defaults) and publishes it to the module table.
    pub fn open(module: Module, env: &AgentEnv, records: &[(Lsn, Txn)]) -> Agent {
        let now = crate::now_secs();
        let mut state = ModuleState::default();
        let mut applied = NonceBook::new(env.limits);
        let mut unkept = 0usize;
        let mut next_offset = None;
        let mut state_lsn = None;
        let mut applied_lsns = journal::Expiring::default();
        let mut journalled: BTreeMap<i32, i64> = BTreeMap::new();
        let mut journalled_lsn = None;
        let mut generation = 0u64;
        // The last position written per partition, not the largest: a topic
        // created again (`topic_replaced`) starts at offset 0 again, and its
        // decisions come after the old topic's in the journal.
        let mut note = |p: Position, lsn: Lsn| {
            journalled.insert(p.partition, p.offset);
            journalled_lsn = Some(lsn);
        };
        let mut parts = SnapshotParts::default();
        for (lsn, t) in records {
            for e in &t.entries {
                match e {
                    journal::Entry::Snapshot(s) if s.module == module => {
                        // A snapshot in parts stands once its last part is read.
                        let Some(whole) = parts.read(*lsn, s) else {
                            continue;
                        };
                        let (first, last) = (whole[0].0, whole[whole.len() - 1].1);
                        state = last.state.clone();
                        applied = NonceBook::new(env.limits);
                        unkept = 0;
                        applied_lsns.clear();
                        for (_, part) in &whole {
                            for n in &part.applied {
                                let at = AppliedAt {
                                    seq: n.seq,
                                    what: what_parsed(n.what.as_deref()),
                                };
                                if !applied
                                    .remember_within_twice(&n.issuer, n.nonce, n.expires, at, now)
                                {
                                    unkept += 1;
                                }
                                // Held by the first part's record, as written: a
                                // later part read without it is passed over.
                                applied_lsns.note(first, n.expires);
                            }
                        }
                        state_lsn = Some(first);
                        next_offset = last.next_offset.or(next_offset);
                        for p in &last.kafka {
                            note(*p, first);
                        }
                        generation = generation.max(last.generation.unwrap_or(0));
                    }
                    _ => {}
                }
            }
            for (a, seq) in t.agent_entries() {
                if a.module != module {
                    continue;
                }
                if let Some(st) = &a.state {
                    state = st.clone();
                    state_lsn = Some(*lsn);
                }
                if let Some(n) = &a.applied {
                    let at = AppliedAt {
                        seq,
                        what: what_parsed(n.what.as_deref()),
                    };
                    if !applied.remember_within_twice(&n.issuer, n.nonce, n.expires, at, now) {
                        unkept += 1;
                    }
                    applied_lsns.note(*lsn, n.expires);
                }
                if let Some(o) = a.offset {
                    next_offset = Some(o + 1);
                }
                if let Some(p) = a.kafka {
                    note(p, *lsn);
                }
                generation = generation.max(a.generation.unwrap_or(0));
            }
        }
        unkept_nonces(module, unkept);
        if env.kafka_state.is_some() {
            // Another node may have moved the module on (a kill, a stop): until its
            // state is read from Kafka, a running module is treated as stopped.
            let mut shown = state.clone();
            if shown.state == gw_core::module_state::RunState::Running {
                shown.state = gw_core::module_state::RunState::Stopped;
            }
            env.modules.set(module, shown);
        } else {
            env.modules.set(module, state.clone());
        }
        // Nonces whose records went were forgotten before the floor.
        if let Some(f) = env.floor.get().checked_sub(1) {
            applied.forgotten(f);
        }
        let mut agent = Agent {
            core: AgentCore::new(module, env.policy.clone(), state, applied, env.dedup_secs),
            env: env.clone(),
            next_offset,
            state_lsn,
            applied_lsns,
            kafka: env.kafka_state.clone().map(|store| KafkaSide {
                store,
                checkpoint: Checkpoint {
                    generation,
                    ..Checkpoint::default()
                },
                written: BTreeMap::new(),
                journalled,
                journalled_lsn,
                behind: BTreeMap::new(),
                replaced: BTreeSet::new(),
                rewound: BTreeSet::new(),
            }),
        };
        agent.release(now);
        agent
    }

    fn row(
        &self,
        decision: Decision,
        code: Option<Code>,
        d: &Delivery,
        command: Option<&Command>,
    ) -> Option<journal::Entry> {
        self.env.auditor.row(&Entry {
            stage: Stage::Agent,
            decision,
            code,
            body: &d.payload,
            command,
            requester: Some(&d.requester),
            route: "",
        })
    }

    /// The agent entry of `d`: the consumed offset on the embedded bus, the Kafka
    /// position, the state after it and the nonce it applied.
    fn agent_entry(
        &self,
        d: &Delivery,
        state: Option<ModuleState>,
        applied: Option<AppliedNonce>,
    ) -> journal::Entry {
        journal::Entry::Agent(AgentEntry {
            module: self.core.module,
            kafka: self.kafka.is_some().then_some(d.position),
            offset: self
                .env
                .embedded_bus
                .then(|| u64::try_from(d.position.offset).unwrap_or(0)),
            state,
            applied,
            refused: None,
            generation: self.kafka.as_ref().map(|k| k.checkpoint.generation),
        })
    }

    /// [`Self::agent_entry`] of a delivery refused with `code`: the command it
    /// decodes to is named (for the replay guard), when it decodes, when the
    /// delivery is this node's own (the embedded bus, or this node's forward),
    /// and when the refusal is about the command ([`refusal_is_the_commands`]).
    fn refusal_entry(&self, d: &Delivery, code: Code) -> journal::Entry {
        let mut entry = self.agent_entry(d, None, None);
        if !self.own_forward(d) || !refusal_is_the_commands(code) {
            return entry;
        }
        if let journal::Entry::Agent(a) = &mut entry {
            a.refused = <Command as prost::Message>::decode(d.payload.as_slice())
                .ok()
                .map(|c| RefusedCommand {
                    issuer: c.issuer,
                    nonce: c.nonce,
                    digest: gw_core::replay::digest(&d.payload),
                    code: code.as_str().to_owned(),
                });
        }
        entry
    }

    /// Whether `d` is this node's own forward (or the embedded bus's delivery).
    fn own_forward(&self, d: &Delivery) -> bool {
        match &d.origin {
            Origin::Local => true,
            Origin::Node { node, .. } => *node == self.env.chain,
            Origin::Unverified { .. } => false,
        }
    }

    /// Makes what was decided durable in one journal transaction: each delivery's
    /// row, then its agent entry (`entries`), `last` being the last delivery.
    async fn commit(
        &mut self,
        entries: Vec<journal::Entry>,
        last: &Delivery,
    ) -> Result<journal::Committed, RetryLater> {
        let txn = Txn::of(entries);
        let module = self.core.module.as_str();
        let mut failed: u64 = 0;
        let mut logged: Option<std::time::Instant> = None;
        let c = loop {
            match self.env.journal.commit(txn.clone()).await {
                Ok(c) => {
                    if failed > 0 {
                        tracing::info!(module, attempts = failed + 1, "agent row written");
                    }
                    break c;
                }
                // Kafka: the checkpoint already says this delivery was handled (it
                // will not come again): the row must be written, so wait for the
                // disk (or the chain). Logged when it starts, then every 10 s.
                Err(e) if self.kafka.is_some() => {
                    failed += 1;
                    if logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        tracing::warn!(module, error = %e, attempts = failed, "agent row not written yet (retrying every 250 ms)");
                        logged = Some(std::time::Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        if self.env.embedded_bus {
            self.next_offset = Some(u64::try_from(last.position.offset).unwrap_or(0) + 1);
        }
        if let Some(k) = &mut self.kafka {
            let p = last.position.partition;
            let o = k.journalled.entry(p).or_insert(last.position.offset);
            *o = if k.replaced.remove(&p) {
                last.position.offset
            } else {
                (*o).max(last.position.offset)
            };
            k.journalled_lsn = Some(c.lsn);
            self.release(crate::now_secs());
        }
        Ok(c)
    }

    /// Handles a batch of deliveries in order: decides each against the state the
    /// ones before it leave, makes every decision durable in one journal
    /// transaction (one fsync for the batch), then applies and announces them.
    /// `Err` means "none done, retry later" (the journal could not be written);
    /// no offset may be committed. On the Kafka bus a batch holds one delivery:
    /// its checkpoint in Kafka names one decision per node.
    pub async fn handle(
        &mut self,
        batch: &[Delivery],
        now: u64,
    ) -> Result<Vec<Handled>, RetryLater> {
        debug_assert!(
            self.kafka.is_none() || batch.len() <= 1,
            "Kafka: one at a time"
        );
        let mut state = self.core.state().clone();
        let mut pending = Pending::new();
        let mut entries = Vec::new();
        let mut decided = Vec::with_capacity(batch.len());
        let mut last_written = None;
        for (i, d) in batch.iter().enumerate() {
            if i % 8 == 7 {
                // Each decision verifies a signature: let other tasks run.
                tokio::task::yield_now().await;
            }
            let handled_up_to = self.kafka.as_ref().and_then(|k| {
                k.checkpoint
                    .next
                    .get(&d.position.partition)
                    .copied()
                    .filter(|next| d.position.offset < *next)
            });
            match handled_up_to {
                Some(next) => {
                    if !self.topic_replaced(d.position, next).await? {
                        decided.push(Decided::Done(Handled::Seen));
                        continue;
                    }
                }
                // Caught up: a later step back is checked again.
                None => {
                    if let Some(k) = self.kafka.as_mut() {
                        k.behind.remove(&d.position.partition);
                    }
                }
            }
            // A forward behind its node's newest one decided on is refused
            // whatever it holds (only this module's records are judged: the
            // window is this module's): a copy silently, one overtaken with an
            // answer — unless it is a duplicate, which was applied.
            let mut copied = false;
            let misplaced = self.misplaced(d);
            let step = match self.core.decide_after(&state, &pending, d, now) {
                Step::NotMine => Step::NotMine,
                _ if misplaced.is_some() => Step::Refuse(Reject::with(
                    Code::ForbiddenPeer,
                    misplaced.clone().unwrap_or_default(),
                )),
                step => match (self.behind_forward(d), step) {
                    (Some(Behind::Copy(why)), _) => {
                        copied = true;
                        Step::Refuse(Reject::with(Code::Replay, why))
                    }
                    (Some(Behind::Overtaken(_)), step @ Step::Duplicate(_)) => step,
                    (Some(Behind::Overtaken(why)), _) => Step::Refuse(Reject::with(
                        Code::Unavailable,
                        format!("{why}; not applied, so that the module's commands apply in order: sign it again and send it if it is still wanted"),
                    )),
                    (None, step) => step,
                },
            };
            let (row, entry, next) = match step {
                Step::NotMine => {
                    decided.push(Decided::Done(Handled::NotMine));
                    continue;
                }
                Step::Refuse(r) => {
                    // Other nodes' watchers ignore an `unforwarded` or `copied`
                    // decision (see `Decided::Rejected`); written again as a
                    // refusal all the same.
                    let unforwarded = matches!(d.origin, Origin::Unverified { .. });
                    let outcome = match (unforwarded, copied) {
                        (true, _) => UNFORWARDED,
                        (false, true) => COPIED,
                        (false, false) => "rejected",
                    };
                    if misplaced.is_none() {
                        self.checkpoint(d, outcome, Some(r.code), None, None)
                            .await?;
                    }
                    let row = self.row(Decision::Rejected, Some(r.code), d, None);
                    let has_row = row.is_some();
                    let announce = !unforwarded
                        && !copied
                        && (self.own_forward(d) || !refusal_is_the_forwards(r.code));
                    // A copy's refusal is not the command's: that was decided at
                    // its first delivery.
                    let entry = if announce {
                        self.refusal_entry(d, r.code)
                    } else {
                        self.agent_entry(d, None, None)
                    };
                    (
                        row,
                        entry,
                        Decided::Rejected {
                            r,
                            has_row,
                            announce,
                        },
                    )
                }
                Step::Duplicate(c) => {
                    self.checkpoint(d, "duplicate", Some(Code::Replay), None, None)
                        .await?;
                    let row = self.row(Decision::Duplicate, Some(Code::Replay), d, Some(&c));
                    // Applied before this batch: the replay guard learns it (applied
                    // in this batch: the entry that applied it says so).
                    let known =
                        self.core
                            .applied
                            .get(&c.issuer, c.nonce, now)
                            .map(|s| AppliedNonce {
                                issuer: c.issuer.clone(),
                                nonce: c.nonce,
                                expires: s.expires,
                                seq: s.value.seq,
                                what: s.value.what.map(hex::encode),
                            });
                    let has_row = row.is_some();
                    let entry = self.agent_entry(d, None, known);
                    let next = Decided::Duplicate {
                        issuer: c.issuer,
                        nonce: c.nonce,
                        state: state.clone(),
                        has_row,
                    };
                    (row, entry, next)
                }
                Step::Apply(a) => {
                    let c = &a.verified.command;
                    let stored = StoredNonce {
                        issuer: c.issuer.clone(),
                        nonce: c.nonce,
                        expires: a.expires,
                        chain: self.env.chain.clone(),
                        what: what_hex(c),
                    };
                    self.checkpoint(d, "applied", None, Some(a.state.clone()), Some(stored))
                        .await?;
                    let row = self.row(Decision::Applied, None, d, Some(c));
                    let nonce = AppliedNonce {
                        issuer: c.issuer.clone(),
                        nonce: c.nonce,
                        expires: a.expires,
                        seq: 0,
                        what: what_hex(c),
                    };
                    let entry = self.agent_entry(d, Some(a.state.clone()), Some(nonce));
                    pending.insert((c.issuer.clone(), c.nonce), what_of(c));
                    state = a.state.clone();
                    let has_row = row.is_some();
                    (row, entry, Decided::Applied { a, has_row })
                }
            };
            entries.extend(row);
            entries.push(entry);
            decided.push(next);
            last_written = Some(d);
        }
        let committed = match last_written {
            Some(last) => Some(self.commit(entries, last).await?),
            None => None,
        };
        // Durable. The module table first: a command announced applied is in
        // effect (the send gate reads the table). Then apply and announce in
        // order, each with its row's seq. Over Kafka, while this node's journal
        // stalled after the checkpoint, another node may have applied a later
        // command, which the table holds already (from its checkpoint): never
        // set back.
        if !pending.is_empty() {
            if self.kafka.is_some() {
                let generation = self.kafka.as_ref().map(|k| k.checkpoint.generation);
                self.env
                    .modules
                    .advance(self.core.module, state, generation);
            } else {
                self.env.modules.set(self.core.module, state);
            }
        }
        let lsn = committed.as_ref().map(|c| c.lsn);
        let mut rows = committed.iter().flat_map(|c| c.rows.iter());
        let mut seq_of = |has_row: bool| {
            if has_row {
                rows.next().map_or(0, |r| r.seq)
            } else {
                0
            }
        };
        let mut out = Vec::with_capacity(decided.len());
        for (d, x) in batch.iter().zip(decided) {
            match x {
                Decided::Done(h) => out.push(h),
                Decided::Rejected {
                    r,
                    has_row,
                    announce,
                } => {
                    let code = r.code;
                    let seq = seq_of(has_row);
                    if announce {
                        self.announce_raw(d, Err(r), seq);
                    }
                    out.push(Handled::Rejected(code));
                }
                Decided::Duplicate {
                    issuer,
                    nonce,
                    state,
                    has_row,
                } => {
                    seq_of(has_row);
                    // Known applied (earlier, or earlier in this batch): a request
                    // waiting on this copy is told it was applied.
                    let seq = self
                        .core
                        .applied
                        .get(&issuer, nonce, now)
                        .map_or(0, |s| s.value.seq);
                    self.announce(d, issuer, nonce, Ok(state), seq);
                    out.push(Handled::Duplicate);
                }
                Decided::Applied { a, has_row } => {
                    let seq = seq_of(has_row);
                    let c = &a.verified.command;
                    let (issuer, n, state) = (c.issuer.clone(), c.nonce, a.state.clone());
                    let expires = a.expires;
                    self.core.commit(*a, seq, now);
                    if let Some(l) = lsn {
                        self.state_lsn = Some(l);
                        self.applied_lsns.note(l, expires);
                    }
                    self.announce(d, issuer, n, Ok(state), seq);
                    out.push(Handled::Applied);
                }
            }
        }
        self.release(now);
        Ok(out)
    }

    /// Kafka bus: makes the decision on `d` the module's checkpoint in Kafka (the
    /// commit point: the next owner of the module resumes after it), then writes
    /// the applied nonce's own record. Nothing with the embedded bus.
    async fn checkpoint(
        &mut self,
        d: &Delivery,
        outcome: &str,
        code: Option<Code>,
        state: Option<ModuleState>,
        nonce: Option<StoredNonce>,
    ) -> Result<(), RetryLater> {
        let module = self.core.module;
        let chain = self.env.chain.clone();
        let Some(k) = self.kafka.as_mut() else {
            return Ok(());
        };
        let mut cp = k.checkpoint.clone();
        if let Some(s) = state {
            cp.state = s;
        }
        cp.next.insert(d.position.partition, d.position.offset + 1);
        if let Some(n) = &nonce {
            cp.recent.push_back(n.clone());
            while cp.recent.len() > RECENT {
                cp.recent.pop_front();
            }
        }
        let (payload, omitted) = LastDecision::keep(&d.payload);
        cp.last.insert(
            chain.clone(),
            LastDecision {
                position: d.position,
                outcome: outcome.to_owned(),
                code: code.map(|c| c.as_str().to_owned()),
                payload,
                omitted,
                requester: d.requester.clone(),
                forwarded_by: match &d.origin {
                    Origin::Node { node, .. } => Some(node.clone()),
                    Origin::Local | Origin::Unverified { .. } => None,
                },
            },
        );
        cp.writer = chain;
        cp.generation = cp.generation.saturating_add(1);
        cp.clock_floor = cp.clock_floor.max(self.env.floor.get());
        if let Origin::Node { node, forward } = &d.origin {
            cp.forwards
                .entry(node.clone())
                .or_default()
                .entry(d.position.partition)
                .or_default()
                .note(*forward);
        }
        k.store.save(module, &cp).await?;
        k.checkpoint = cp;
        if let Some(n) = nonce {
            put_nonce(&k.store, module, &n).await;
            k.written.entry(n.expires).or_default().push(n.key());
        }
        Ok(())
    }

    /// Kafka bus: why `d`, a record of this module, is in the wrong partition of
    /// the command topic (nodes forward a module's commands to one partition,
    /// [`super::bus::partition_of`]). One elsewhere — put there by a client that
    /// may write to the topic, or forwarded by a node configured with another
    /// `kafka.partitions` — is refused and written in no checkpoint: this
    /// node's agent may not own the module's partition, and its copy of the
    /// checkpoint would overwrite the owner's.
    fn misplaced(&self, d: &Delivery) -> Option<String> {
        let k = self.kafka.as_ref()?;
        let module = self.core.module;
        if d.key != module.as_str().as_bytes() {
            // Keyed with no module's name (its refusal is the first module's):
            // its partition may be another node's to consume for that module,
            // and a checkpoint written here would overwrite the owner's.
            let nobodys = !Module::ALL.iter().any(|m| d.key == m.as_str().as_bytes());
            return (nobodys && module == Module::ALL[0]).then(|| {
                let key = String::from_utf8_lossy(&d.key[..d.key.len().min(64)]).into_owned();
                format!("a record of the command topic keyed `{key}` names no module: no agent applies it")
            });
        }
        let want = k.store.partition_of(module);
        (d.key == module.as_str().as_bytes() && d.position.partition != want).then(|| {
            format!(
                "a record of module {} in partition {} of the command topic: its commands are in partition {want} (kafka.partitions)",
                module.as_str(),
                d.position.partition
            )
        })
    }

    /// Kafka bus: why `d` may not be taken, if it is behind its node's newest
    /// forward this module's agents decided on (see
    /// [`super::kafka_state::ForwardWindow`]).
    fn behind_forward(&self, d: &Delivery) -> Option<Behind> {
        let (Origin::Node { node, forward }, Some(k)) = (&d.origin, &self.kafka) else {
            return None;
        };
        let w = k
            .checkpoint
            .forwards
            .get(node)?
            .get(&d.position.partition)?;
        let behind = w.check(*forward).err()?;
        let what = |why: &str| {
            format!(
                "node `{node}`'s forward {}.{}: {why}",
                forward.epoch, forward.seq
            )
        };
        let module = self.core.module.as_str();
        Some(match behind {
            Behind::Copy(why) => {
                let detail = format!("a copy of {}", what(&why));
                tracing::warn!(module, %detail, "refused a copy of a forward decided on before");
                Behind::Copy(detail)
            }
            Behind::Overtaken(why) => {
                let detail = what(&why);
                if forward.epoch < w.epoch {
                    // Also what a node numbering from a start that is over sends
                    // (its clock went back and forward.epoch was lost, or a second
                    // process runs as it): those forwards are refused here.
                    tracing::error!(module, %detail, "refused a forward from an older start of its node: overtaken by the later start's, a copy of an old record, or that node numbers from a start that is over");
                } else {
                    tracing::warn!(module, %detail, "refused a forward behind a later one of its node (overtaken on the topic, or a copy older than the window)");
                }
                Behind::Overtaken(detail)
            }
        })
    }

    /// Kafka bus: whether the command topic was replaced under the checkpoint, as
    /// a delivery at `at`, before the checkpoint's `next` offset of its partition,
    /// is about to be taken as already handled. Offsets are no identity: a topic
    /// deleted and created again starts at 0, and its commands would all be taken
    /// as handled — never applied. On the first such delivery after the checkpoint
    /// is loaded, and whenever the consumer went back, the partition is read: a
    /// topic that ends before `next`, or holds another command at the offset of the
    /// checkpoint's newest decision than the one decided there, is not the topic
    /// the checkpoint was written for. Its commands are then handled from here: an
    /// old one whose nonce is still remembered (Kafka keeps the applied nonces)
    /// comes out a `duplicate`, one older than that `stale` (or refused by its
    /// forward number, its node's window being in the checkpoint). Not detected:
    /// a new topic whose record at that offset is the same command (sent again,
    /// it landed at the same offset).
    async fn topic_replaced(&mut self, at: Position, next: i64) -> Result<bool, RetryLater> {
        let module = self.core.module.as_str();
        let Some(k) = self.kafka.as_mut() else {
            return Ok(false);
        };
        if k.behind.get(&at.partition).is_some_and(|o| *o < at.offset) {
            k.behind.insert(at.partition, at.offset);
            return Ok(false);
        }
        let decided = k
            .checkpoint
            .last
            .values()
            .filter(|l| l.position.partition == at.partition && l.position.offset < next)
            .max_by_key(|l| l.position.offset)
            .map(|l| (l.position.offset, l.digest()));
        let (end, found) = k
            .store
            .probe_command_topic(at.partition, decided.as_ref().map(|d| d.0))
            .await?;
        let why = match (decided, found) {
            _ if end < next => format!("it ends at offset {end}"),
            // (A kept digest that is not one tells nothing.)
            (Some((o, Some(want))), Some(got)) if gw_core::replay::digest(&got) != want => {
                format!("offset {o} holds another command than the one decided there")
            }
            _ => {
                k.behind.insert(at.partition, at.offset);
                return Ok(false);
            }
        };
        tracing::error!(
            module,
            partition = at.partition,
            checkpoint_next = next,
            "the command topic is not the one the module's checkpoint was written for ({why}): it was deleted and created again; its commands are handled from here"
        );
        self.env.metrics.agent(module, "topic_replaced");
        k.checkpoint.next.remove(&at.partition);
        // `journalled` keeps the old topic's offset until this partition's next
        // decision replaces it (not the larger of the two): a reload meanwhile
        // still knows the checkpoint's last decision is in the journal.
        k.replaced.insert(at.partition);
        k.behind.remove(&at.partition);
        Ok(true)
    }

    /// Kafka bus: takes the module's state from Kafka (at start and whenever the
    /// consumer is assigned partitions): the checkpoint, the applied nonces (writing
    /// again the record a crash may have lost), and this node's ledger row of its
    /// last decision when the journal does not have it. Waits for the broker.
    async fn reload(&mut self) {
        let module = self.core.module;
        let Some((store, floor)) = self
            .kafka
            .as_ref()
            .map(|k| (k.store.clone(), k.checkpoint.generation))
        else {
            return;
        };
        let mut failures = 0u32;
        let mut loaded = loop {
            match store.load(module, crate::now_secs(), floor).await {
                Ok(l) => break l,
                Err(e) => {
                    // The agent consumes nothing meanwhile: say so now and then. A
                    // state no listed node signed waits for an operator
                    // (`kafka.state_recovery`, `docs/architecture.md`, *Scale-out*).
                    if failures.is_multiple_of(40) {
                        if matches!(e, BusError::Untrusted(_)) {
                            self.env.metrics.agent(module.as_str(), "state_untrusted");
                            tracing::error!(module = module.as_str(), error = %e, failures, "agent state in Kafka not trusted; the module's agent waits");
                        } else {
                            tracing::warn!(module = module.as_str(), error = %e, failures, "agent state not loaded from Kafka yet (retrying)");
                        }
                    }
                    failures += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        };
        let now = crate::now_secs();
        for _ in 0..loaded.untrusted {
            self.env.metrics.agent(module.as_str(), "state_untrusted");
        }
        if let (true, Some(cp)) = (loaded.recovered, &mut loaded.checkpoint) {
            // Written again signed, as the newest generation, so the next load
            // needs no recovery.
            cp.writer = self.env.chain.clone();
            cp.generation = super::kafka_state::next_generation(cp.generation);
            while let Err(e) = store.save(module, cp).await {
                tracing::warn!(module = module.as_str(), error = %e, "recovered agent checkpoint not written yet (retrying)");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        for n in &loaded.missing {
            put_nonce(&store, module, n).await;
        }
        // The records of nonces already expired are tombstoned by
        // `forget_expired`, once the floors are past them; forgotten here, and
        // the agent's clock goes past them (a clock stepped back later does not
        // make them fresh and unknown).
        let mut written: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        let mut latest_expired = 0;
        for (key, expires) in std::mem::take(&mut loaded.expired) {
            latest_expired = latest_expired.max(expires.saturating_add(1));
            written.entry(expires).or_default().push(key);
        }
        let Some(cp) = loaded.checkpoint else {
            // Nothing in Kafka yet: the first checkpoint starts from this node's
            // state (numbered above what the journal knows was written).
            if floor > 0 {
                tracing::error!(module = module.as_str(), generation = floor, "the agent state topic holds no checkpoint, although this node's journal knows one of this generation was written (the topic deleted, or its tombstone compacted): going on from this node's own state");
            }
            if let Some(k) = self.kafka.as_mut() {
                for (e, keys) in written {
                    k.written.entry(e).or_default().extend(keys);
                }
                k.checkpoint.state = self.core.state().clone();
                // A numbering begun afresh starts at the clock: above what any
                // node wrote before (another node's journal may know more).
                k.checkpoint.generation =
                    super::kafka_state::next_generation(k.checkpoint.generation);
            }
            match self.kafka.as_ref() {
                Some(k) => {
                    let g = k.checkpoint.generation;
                    self.env
                        .modules
                        .set_at(module, self.core.state().clone(), g);
                }
                None => self.env.modules.set(module, self.core.state().clone()),
            }
            return;
        };
        if let Some(last) = cp.last.get(&self.env.chain) {
            let journalled = self
                .kafka
                .as_ref()
                .and_then(|k| k.journalled.get(&last.position.partition).copied());
            if journalled.is_none_or(|o| o < last.position.offset) {
                self.write_row_again(last, now).await;
            }
        }
        let mut book = NonceBook::new(self.env.limits);
        // The book this one replaces forgot nonces, and so did every node whose
        // floor is in the checkpoint (their records tombstoned), and this node's
        // guards: its clock goes on from the latest of them.
        let forgot = self
            .core
            .applied
            .clock(0)
            .max(self.env.floor.get())
            .max(cp.clock_floor)
            .max(latest_expired);
        book.forgotten(forgot.saturating_sub(1));
        let mut unkept = 0usize;
        for n in &loaded.nonces {
            let at = AppliedAt {
                seq: 0,
                what: what_parsed(n.what.as_deref()),
            };
            if !book.remember_within_twice(&n.issuer, n.nonce, n.expires, at, now) {
                unkept += 1;
            }
            written.entry(n.expires).or_default().push(n.key());
        }
        unkept_nonces(module, unkept);
        self.core = AgentCore::new(
            module,
            self.env.policy.clone(),
            cp.state.clone(),
            book,
            self.env.dedup_secs,
        );
        self.env
            .modules
            .set_at(module, cp.state.clone(), cp.generation);
        tracing::info!(module = module.as_str(), next = ?cp.next, nonces = loaded.nonces.len(), "agent state loaded from Kafka");
        if let Some(k) = self.kafka.as_mut() {
            k.checkpoint = cp;
            k.written = written;
            k.behind.clear();
            k.rewound.clear();
        }
    }

    /// Kafka: the offset the consumer must go back to before `d` is handled, if
    /// it must. A consumer starts where its group's committed offset says, which
    /// may be ahead of the module's checkpoint — reset by an operator
    /// (`--reset-offsets --to-latest`), translated by a mirror, left by a topic
    /// created again whose log is already longer — and the commands in between
    /// would be skipped, with no row and no answer. So the first delivery of a
    /// partition past the checkpoint's next offset after the checkpoint was
    /// loaded sends the consumer back there (the records in between are read
    /// again: other modules' ones, `not_mine`, among them), or to the start of a
    /// topic that is not the checkpoint's ([`Self::topic_replaced`]).
    async fn rewind_for(&mut self, d: &Delivery) -> Result<Option<i64>, RetryLater> {
        let p = d.position.partition;
        let Some(next) = self.kafka.as_ref().and_then(|k| {
            k.checkpoint
                .next
                .get(&p)
                .copied()
                .filter(|next| d.position.offset > *next && !k.rewound.contains(&p))
        }) else {
            return Ok(None);
        };
        let before = Position {
            partition: p,
            offset: next - 1,
        };
        let replaced = self.topic_replaced(before, next).await?;
        Ok(Some(if replaced { 0 } else { next }))
    }

    /// Writes this node's ledger row of a decision the checkpoint has and the
    /// journal lost (a crash between the two).
    async fn write_row_again(&mut self, last: &LastDecision, now: u64) {
        // A record larger than the checkpoint keeps: its bytes read back from the
        // command topic, when the offset still holds the record decided on.
        let fetched = match &last.omitted {
            Some(_) => self.fetch_decided(last).await,
            None => None,
        };
        let payload = fetched.unwrap_or_else(|| last.payload.clone());
        let d = Delivery {
            key: self.core.module.as_str().as_bytes().to_vec(),
            payload,
            requester: last.requester.clone(),
            position: last.position,
            origin: Origin::Local,
        };
        // (Bytes neither kept nor found: the row says what the checkpoint does.)
        let command = if d.payload.is_empty() {
            last.command()
        } else {
            <Command as prost::Message>::decode(d.payload.as_slice()).ok()
        };
        let code = last.code.as_deref().and_then(Code::parse);
        let (decision, applied) = match last.outcome.as_str() {
            "applied" => (
                Decision::Applied,
                command.as_ref().map(|c| AppliedNonce {
                    issuer: c.issuer.clone(),
                    nonce: c.nonce,
                    expires: now.saturating_add(self.env.dedup_secs),
                    seq: 0,
                    what: what_hex(c),
                }),
            ),
            "duplicate" => (Decision::Duplicate, None),
            _ => (Decision::Rejected, None),
        };
        let row = self.row(decision, code, &d, command.as_ref());
        tracing::warn!(module = self.core.module.as_str(), position = ?last.position, outcome = %last.outcome, "writing the ledger row a crash lost");
        let mut entries: Vec<journal::Entry> = row.into_iter().collect();
        // (A refusal written again is not named for the replay guard: which node's
        // delivery it was is not kept.)
        entries.push(self.agent_entry(&d, None, applied));
        if let Err(e) = self.commit(entries, &d).await {
            tracing::warn!(error = %e, "ledger row not written again");
        }
    }

    /// Kafka bus: the bytes of the record `last` decided on, read from the
    /// command topic at its position when they are the ones the checkpoint
    /// names (their digest); `None` when the offset is gone (retention, a
    /// topic created again), holds another record, or cannot be read.
    async fn fetch_decided(&self, last: &LastDecision) -> Option<Vec<u8>> {
        let module = self.core.module.as_str();
        let k = self.kafka.as_ref()?;
        let want = last.digest()?;
        let p = last.position;
        match k
            .store
            .probe_command_topic(p.partition, Some(p.offset))
            .await
        {
            Ok((_, Some(bytes))) if gw_core::replay::digest(&bytes) == want => Some(bytes),
            Ok((_, found)) => {
                tracing::error!(module, position = ?p, found = found.is_some(), "the record a lost row was of is not on the command topic: its row is written from the checkpoint (without its bytes and arguments)");
                None
            }
            Err(e) => {
                tracing::error!(module, position = ?p, error = %e, "the record a lost row was of could not be read: its row is written from the checkpoint (without its bytes and arguments)");
                None
            }
        }
    }

    /// Kafka bus: tombstones the records of nonces no longer remembered, once
    /// this node's floor and the module's checkpoint are past them (the next owner
    /// of the module, whatever its clock reads, judges commands no earlier than
    /// the checkpoint's floor). A module that receives no command keeps its
    /// expired records until it does.
    async fn forget_expired(&mut self, now: u64) {
        let module = self.core.module;
        let Some(k) = self.kafka.as_mut() else { return };
        let expired = forgettable(
            &mut k.written,
            now,
            &self.env.floor,
            k.checkpoint.clock_floor,
        );
        if let Err(e) = k.store.forget(module, &expired).await {
            tracing::debug!(error = %e, "expired nonce records not tombstoned");
        }
    }

    /// Tells the journal what this agent still needs: the record of its state and
    /// those of nonces it still remembers.
    fn release(&mut self, now: u64) {
        self.env.floor.expire(&mut self.applied_lsns, now);
        let live = self.applied_lsns.oldest();
        let low = self.held_low(live).unwrap_or(Lsn::MAX);
        self.env.journal.hold(hold_name(self.core.module), low);
    }

    /// The oldest record the agent needs: its state's, a live nonce's (`live`), and
    /// (Kafka) the one that says which deliveries its ledger has rows of.
    fn held_low(&self, live: Option<Lsn>) -> Option<Lsn> {
        let kafka = self.kafka.as_ref().and_then(|k| k.journalled_lsn);
        [self.state_lsn, live, kafka].into_iter().flatten().min()
    }

    /// Writes the agent's whole state when it holds back the journal (its oldest
    /// needed record is in a closed segment), so older records can go.
    async fn snapshot_if_needed(&mut self, now: u64) {
        self.env.floor.expire(&mut self.applied_lsns, now);
        let live = self.applied_lsns.oldest();
        let low = self.held_low(live);
        if low.is_none_or(|l| l >= self.env.journal.segment_first()) {
            self.release(now);
            return;
        }
        self.snapshot(now, SNAPSHOT_PART_NONCES).await;
    }

    /// Writes the agent's whole state: its applied nonces [`SNAPSHOT_PART_NONCES`]
    /// (`per_part`) to a record, each record carrying the state too; the
    /// snapshot stands once its last part is written (read back, parts without
    /// their last are passed over: the records before them still stand, and
    /// nothing is released until the last is written). One record held every
    /// nonce, and at some 130 000 of them (a few hundred commands a second
    /// within `agent_dedup_secs`) it was larger than a journal record may be:
    /// never written, the agent held the journal back for ever.
    async fn snapshot(&mut self, now: u64, per_part: usize) {
        // The records the snapshot replaces go, and with them every nonce it does
        // not hold: those the book forgot and those expired before the floor.
        // The floor is past the ones the book forgot first.
        let forgot = self.core.applied.clock(0);
        let floor = self.env.floor.cover(forgot, true);
        if floor < forgot {
            tracing::warn!(
                module = self.core.module.as_str(),
                "agent snapshot not written: the replay guard's clock floor cannot be written"
            );
            return;
        }
        let mut applied = self.core.applied(now.min(floor));
        // In a fixed order (the first to expire first): the same state writes
        // the same parts.
        applied.sort_unstable_by(|a, b| {
            (a.expires, &a.issuer, a.nonce).cmp(&(b.expires, &b.issuer, b.nonce))
        });
        let max_exp = applied.iter().map(|n| n.expires).max();
        let chunks: Vec<&[AppliedNonce]> = if applied.is_empty() {
            vec![&[]]
        } else {
            applied.chunks(per_part.max(1)).collect()
        };
        let count = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
        let id = crate::now_nanos();
        let mut first = None;
        for (index, chunk) in (0u32..).zip(chunks) {
            let snap = SnapshotEntry {
                module: self.core.module,
                kafka: self.kafka.as_ref().map_or_else(Vec::new, |k| {
                    k.journalled
                        .iter()
                        .map(|(p, o)| Position {
                            partition: *p,
                            offset: *o,
                        })
                        .collect()
                }),
                next_offset: self.next_offset,
                state: self.core.state().clone(),
                applied: chunk.to_vec(),
                generation: self.kafka.as_ref().map(|k| k.checkpoint.generation),
                part: (count > 1).then_some(SnapshotPart { id, index, count }),
            };
            match self
                .env
                .journal
                .commit(Txn::of(vec![journal::Entry::Snapshot(snap)]))
                .await
            {
                Ok(c) => {
                    first.get_or_insert(c.lsn);
                }
                Err(e) => {
                    tracing::warn!(module = self.core.module.as_str(), error = %e, part = index, parts = count, "agent snapshot not written");
                    return;
                }
            }
        }
        let Some(lsn) = first else {
            return;
        };
        self.state_lsn = Some(lsn);
        if let Some(k) = self.kafka.as_mut() {
            if !k.journalled.is_empty() {
                k.journalled_lsn = Some(lsn);
            }
        }
        self.applied_lsns.clear();
        if let Some(e) = max_exp {
            self.applied_lsns.note(lsn, e);
        }
        self.release(now);
    }

    fn announce(
        &self,
        d: &Delivery,
        issuer: String,
        nonce: u64,
        outcome: Result<ModuleState, Reject>,
        seq: u64,
    ) {
        // Nobody waiting is fine.
        let _ = self.env.acks.send(Ack {
            issuer,
            nonce,
            outcome,
            seq,
            applied_by: None,
            digest: gw_core::replay::digest(&d.payload),
        });
    }

    /// Announces a refusal to whoever waits for the command the bytes decode to.
    fn announce_raw(&self, d: &Delivery, outcome: Result<ModuleState, Reject>, seq: u64) {
        if let Ok(c) = <Command as prost::Message>::decode(d.payload.as_slice()) {
            self.announce(d, c.issuer, c.nonce, outcome, seq);
        }
    }

    /// Consumes forever: handle, then commit. Bus errors and failed writes are
    /// logged once per distinct message and retried; nothing is skipped. Every
    /// 30 s the agent checks whether it holds back the journal (then it snapshots).
    pub async fn run(mut self, mut consumer: BusConsumer) {
        let name = self.core.module.as_str();
        let mut last_err = String::new();
        let mut log_once = |e: String| {
            if e != last_err {
                tracing::warn!(module = name, error = %e, "agent");
                last_err = e;
            }
        };
        let pause = Duration::from_millis(250);
        let mut maintenance = tokio::time::interval(Duration::from_secs(30));
        self.reload().await;
        loop {
            let d = tokio::select! {
                d = consumer.next() => d,
                _ = maintenance.tick() => {
                    self.snapshot_if_needed(crate::now_secs()).await;
                    self.forget_expired(crate::now_secs()).await;
                    continue;
                }
            };
            if let Ok(d) = &d {
                tracing::debug!(position = ?d.position, "delivery");
            }
            if consumer.take_assigned() {
                tracing::debug!("partitions assigned: loading the module's state");
                self.reload().await;
            }
            let d = match d {
                Ok(d) => d,
                Err(e) => {
                    log_once(format!("bus: {e}"));
                    tokio::time::sleep(pause).await;
                    continue;
                }
            };
            // Kafka: a group offset ahead of the checkpoint skips nothing.
            let back = loop {
                match self.rewind_for(&d).await {
                    Ok(back) => break back,
                    Err(e) => {
                        log_once(format!("not applied yet (retrying): {e}"));
                        tokio::time::sleep(pause).await;
                    }
                }
            };
            if let Some(to) = back {
                // Also after each load when other modules' records follow this
                // one's last decision in a shared partition: read once more.
                tracing::info!(module = name, partition = d.position.partition, at = d.position.offset, to, "the consumer group's offset is past the module's checkpoint: reading the command topic again from the checkpoint's");
                self.env.metrics.agent(name, "rewound");
                // Until it is sent back (or the partition is another node's):
                // nothing past the checkpoint is handled before.
                while let Err(e) = consumer.rewind(d.position.partition, to) {
                    if !consumer.owns(&d) {
                        break;
                    }
                    log_once(format!("bus: going back to offset {to}: {e}"));
                    tokio::time::sleep(pause).await;
                }
                if let Some(k) = self.kafka.as_mut() {
                    k.rewound.insert(d.position.partition);
                }
                continue;
            }
            // What else is ready (the embedded bus): one journal transaction for all.
            let mut bytes = d.payload.len();
            let mut batch = vec![d];
            while batch.len() < MAX_BATCH {
                let Some(more) = consumer.ready(MAX_BATCH_BYTES.saturating_sub(bytes)) else {
                    break;
                };
                bytes += more.payload.len();
                batch.push(more);
            }
            let mut handled = false;
            loop {
                // Kafka: a partition taken away meanwhile (a rebalance) belongs to
                // another node's agent now; it continues from the checkpoint.
                if let Some(d) = batch.iter().find(|d| !consumer.owns(d)) {
                    tracing::info!(position = ?d.position, "partition no longer assigned: left to its new owner");
                    break;
                }
                // Retried long unpolled (a broker away, a failing write): librdkafka
                // serves a rebalance only at a poll, and past max.poll.interval.ms
                // takes the consumer out of the group while its assignment still
                // lists the partition — another node could then apply what this
                // one is about to. Poll first; the batch is read again from its
                // first delivery (a partition still owned), or left to the new
                // owner, who resumes from the checkpoint.
                if let Some(first) = batch.first().filter(|_| consumer.poll_overdue()) {
                    tracing::info!(position = ?first.position, "retried unpolled for half of kafka.max_poll_interval_ms: polling before trying again");
                    self.env.metrics.agent(name, "repolled");
                    while let Err(e) =
                        consumer.rewind(first.position.partition, first.position.offset)
                    {
                        if !consumer.owns(first) {
                            break;
                        }
                        log_once(format!(
                            "bus: going back to offset {}: {e}",
                            first.position.offset
                        ));
                        tokio::time::sleep(pause).await;
                    }
                    break;
                }
                // At the applied nonces' clock: never before a time it forgot at.
                // (and the node's floor: what its guards forgot).
                let now = self
                    .core
                    .applied
                    .clock(crate::now_secs())
                    .max(self.env.floor.get());
                match self.handle(&batch, now).await {
                    Ok(hs) => {
                        self.env.metrics.agent_batch(name, batch.len());
                        for h in hs {
                            self.env.metrics.agent(name, h.as_str());
                        }
                        handled = true;
                        break;
                    }
                    Err(e) => {
                        log_once(format!("not applied yet (retrying): {e}"));
                        if matches!(e, RetryLater::Kafka(_)) {
                            // Another node may have moved the module on meanwhile.
                            tokio::time::sleep(pause).await;
                            self.reload().await;
                            continue;
                        }
                    }
                }
                tokio::time::sleep(pause).await;
            }
            let Some(d) = batch.last().filter(|_| handled) else {
                continue;
            };
            while let Err(e) = consumer.commit(d).await {
                log_once(format!("commit: {e}"));
                tokio::time::sleep(pause).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use gw_core::module_state::RunState;
    use gw_core::{Action, KeyRing};

    use super::super::bus::Position;
    use super::*;

    const NOW: u64 = 1_750_000_000;

    fn policy() -> ControlPolicy {
        let mut keyring = KeyRing::new();
        keyring
            .insert(gw_core::keyring::CommandKey::unrestricted(
                "op-admin-1",
                testkit::fixtures::command_key().verifying_key(),
            ))
            .unwrap();
        ControlPolicy {
            keyring,
            max_skew: 30,
            max_body: 4096,
        }
    }

    fn core() -> AgentCore {
        AgentCore::new(
            Module::Mev,
            policy(),
            ModuleState::default(),
            NonceBook::new(Limits::default()),
            600,
        )
    }

    fn delivery(key: &str, payload: Vec<u8>) -> Delivery {
        Delivery {
            key: key.as_bytes().to_vec(),
            payload,
            requester: gw_core::contract::Requester::default(),
            position: Position {
                partition: 0,
                offset: 0,
            },
            origin: Origin::Local,
        }
    }

    fn start(nonce: u64) -> Vec<u8> {
        testkit::fixtures::signed_command(nonce, Action::Start, NOW, "dashboard", &[])
    }

    #[test]
    fn another_modules_delivery_is_not_mine() {
        assert!(matches!(
            core().decide(&delivery("arbitrage", start(1)), NOW),
            Step::NotMine
        ));
    }

    #[test]
    fn a_command_no_gateway_node_forwarded_is_refused_unless_accepted() {
        let unverified = |accepted| Delivery {
            origin: Origin::Unverified {
                why: "no gateway node's signature".into(),
                accepted,
            },
            ..delivery("mev", start(1))
        };
        match core().decide(&unverified(false), NOW) {
            Step::Refuse(r) => {
                assert_eq!(r.code, Code::ForbiddenPeer);
                assert!(
                    r.detail.contains("no gateway node's signature"),
                    "{}",
                    r.detail
                );
            }
            s => panic!("{s:?}"),
        }
        assert!(matches!(
            core().decide(&unverified(true), NOW),
            Step::Apply(_)
        ));
        let node = Delivery {
            origin: Origin::Node {
                node: "node-b".into(),
                forward: crate::control::bus::ForwardSeq { epoch: 1, seq: 1 },
            },
            ..delivery("mev", start(1))
        };
        assert!(matches!(core().decide(&node, NOW), Step::Apply(_)));
        // Keyed for another module: not this agent's to judge.
        let other = Delivery {
            key: b"arbitrage".to_vec(),
            ..unverified(false)
        };
        assert!(matches!(core().decide(&other, NOW), Step::NotMine));
        // Keyed for no module: refused by one agent (the first module's), so
        // that it has a row; the others leave it.
        let nobodys = Delivery {
            key: b"MEV".to_vec(),
            ..unverified(false)
        };
        assert!(matches!(core().decide(&nobodys, NOW), Step::NotMine));
        let first = AgentCore::new(
            Module::ALL[0],
            policy(),
            ModuleState::default(),
            NonceBook::new(Limits::default()),
            600,
        );
        match first.decide(&nobodys, NOW) {
            Step::Refuse(r) => {
                assert_eq!(r.code, Code::ForbiddenPeer);
                assert!(
                    r.detail.contains("keyed `MEV` names no module"),
                    "{}",
                    r.detail
                );
            }
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn applies_then_drops_the_same_nonce_as_a_duplicate() {
        let mut c = core();
        let d = delivery("mev", start(1));
        let Step::Apply(a) = c.decide(&d, NOW) else {
            panic!("not applied")
        };
        assert_eq!(a.state.state, RunState::Running);
        assert_eq!(c.state().state, RunState::Stopped, "not yet committed");
        c.commit(*a, 2, NOW);
        assert_eq!(c.state().applied, 1);
        assert!(matches!(c.decide(&d, NOW), Step::Duplicate(_)));
    }

    /// Another command under an applied nonce (its request id, action or
    /// arguments differ: not a copy) is refused `replay`, not taken for a
    /// duplicate that would be answered as applied; a copy signed again (the
    /// JSON route's retry: a new time and signature) is still a duplicate; so
    /// within a batch not durable yet.
    #[test]
    fn another_command_under_an_applied_nonce_is_refused_not_a_duplicate() {
        let mut c = core();
        let Step::Apply(a) = c.decide(&delivery("mev", start(1)), NOW) else {
            panic!("not applied")
        };
        let first = a.verified.command.clone();
        c.commit(*a, 2, NOW);
        let kill = testkit::fixtures::signed_command(1, Action::Kill, NOW + 40, "dashboard", &[]);
        match c.decide(&delivery("mev", kill.clone()), NOW + 40) {
            Step::Refuse(r) => assert_eq!(r.code, Code::Replay, "{r:?}"),
            other => panic!("{other:?}"),
        }
        let again = testkit::fixtures::signed_command(1, Action::Start, NOW + 40, "dashboard", &[]);
        assert!(matches!(
            c.decide(&delivery("mev", again), NOW + 40),
            Step::Duplicate(_)
        ));
        // The same, against a delivery earlier in the batch.
        let pending = Pending::from([(("dashboard".to_owned(), 1), what_of(&first))]);
        let fresh = core();
        match fresh.decide_after(fresh.state(), &pending, &delivery("mev", kill), NOW) {
            Step::Refuse(r) => assert_eq!(r.code, Code::Replay, "{r:?}"),
            other => panic!("{other:?}"),
        }
        // A nonce remembered from before what it asked was kept: a copy, as
        // before.
        let mut old = core();
        let Step::Apply(a) = old.decide(&delivery("mev", start(1)), NOW) else {
            panic!("not applied")
        };
        old.commit(*a, 2, NOW);
        let remembered = old.applied(NOW);
        let mut book = NonceBook::new(Limits::default());
        for n in remembered {
            let at = AppliedAt {
                seq: n.seq,
                what: what_parsed(None),
            };
            let _ = book.insert(&n.issuer, n.nonce, n.expires, at, NOW);
        }
        let old = AgentCore::new(Module::Mev, policy(), ModuleState::default(), book, 600);
        let kill = testkit::fixtures::signed_command(1, Action::Kill, NOW, "dashboard", &[]);
        assert!(matches!(
            old.decide(&delivery("mev", kill), NOW),
            Step::Duplicate(_)
        ));
    }

    #[test]
    fn a_command_dated_far_ahead_is_remembered_not_wrapped() {
        // Freshness is admission's: over the bus a signed command's ts can be
        // anything, and its nonce's expiry saturates instead of wrapping into the
        // past (forgotten at once: a redelivery applied twice).
        let mut c = core();
        let body = testkit::fixtures::signed_command(7, Action::Start, u64::MAX, "dashboard", &[]);
        let d = delivery("mev", body);
        let Step::Apply(a) = c.decide(&d, NOW) else {
            panic!("not applied")
        };
        c.commit(*a, 2, NOW);
        assert!(matches!(c.decide(&d, NOW + 86_400), Step::Duplicate(_)));
    }

    #[test]
    fn a_kill_applied_beyond_the_memorys_bound_is_remembered() {
        let limits = Limits {
            max_per_issuer: 1,
            max_issuers: 4,
        };
        let mut core = AgentCore::new(
            Module::Mev,
            policy(),
            ModuleState::default(),
            NonceBook::new(limits),
            600,
        );
        let from = |node: &str, body| Delivery {
            origin: Origin::Node {
                node: node.into(),
                forward: crate::control::bus::ForwardSeq { epoch: 1, seq: 1 },
            },
            ..delivery("mev", body)
        };
        let apply = |core: &mut AgentCore, d: &Delivery, seq| match core.decide(d, NOW) {
            Step::Apply(a) => core.commit(*a, seq, NOW),
            s => panic!("{s:?}"),
        };
        // The issuer's one place is taken.
        apply(&mut core, &from("node-a", start(1)), 1);
        let kill = testkit::fixtures::signed_command(2, Action::Kill, NOW, "dashboard", &[]);
        apply(&mut core, &from("node-a", kill.clone()), 2);
        let restart =
            |n| testkit::fixtures::signed_command(n, Action::Start, NOW, "dashboard", &[]);
        // A start beyond the bound is still refused.
        assert!(matches!(
            core.decide(&from("node-a", restart(3)), NOW),
            Step::Refuse(Reject {
                code: Code::ReplayCapacity,
                ..
            })
        ));
        // Another node's copy of the kill is a duplicate, not applied again.
        assert!(matches!(
            core.decide(&from("node-b", kill), NOW),
            Step::Duplicate(_)
        ));
        assert_eq!(core.applied(NOW).len(), 2, "both nonces remembered");
    }

    #[test]
    fn a_lagging_consumer_still_applies() {
        assert!(matches!(
            core().decide(&delivery("mev", start(1)), NOW + 86_400),
            Step::Apply(_)
        ));
    }

    /// Over Kafka, a command beyond the memory of applied nonces (its ts plus
    /// max_skew plus dedup_secs) is refused `stale` — a copy admitted at another
    /// node may have been applied and forgotten — unless it is remembered (a
    /// duplicate).
    #[test]
    fn a_forwarded_command_beyond_the_agents_memory_is_refused_stale() {
        let forwarded = |body| Delivery {
            origin: Origin::Node {
                node: "node-b".into(),
                forward: crate::control::bus::ForwardSeq { epoch: 1, seq: 1 },
            },
            ..delivery("mev", body)
        };
        let horizon = NOW + 30 + 600;
        assert!(matches!(
            core().decide(&forwarded(start(1)), horizon),
            Step::Apply(_)
        ));
        match core().decide(&forwarded(start(1)), horizon + 1) {
            Step::Refuse(r) => {
                assert_eq!(r.code, Code::Stale);
                assert!(r.detail.contains("arrived 1 s after"), "{}", r.detail);
            }
            s => panic!("{s:?}"),
        }
        let unverified = Delivery {
            origin: Origin::Unverified {
                why: "none".into(),
                accepted: true,
            },
            ..delivery("mev", start(1))
        };
        assert!(matches!(
            core().decide(&unverified, horizon + 1),
            Step::Refuse(Reject {
                code: Code::Stale,
                ..
            })
        ));
        // Applied in time: remembered max_skew past the bound (a node whose
        // clock runs ahead forgets it no sooner than another stops taking it).
        let mut c = core();
        let Step::Apply(a) = c.decide(&forwarded(start(3)), NOW) else {
            panic!("not applied")
        };
        c.commit(*a, 3, NOW);
        assert!(matches!(
            c.decide(&forwarded(start(3)), horizon + 30),
            Step::Duplicate(_)
        ));
        // Applied late (at the horizon): remembered for dedup_secs from then, so
        // a later copy is a duplicate, not stale.
        let mut c = core();
        let Step::Apply(a) = c.decide(&forwarded(start(2)), horizon) else {
            panic!("not applied")
        };
        c.commit(*a, 2, horizon);
        assert!(matches!(
            c.decide(&forwarded(start(2)), horizon + 300),
            Step::Duplicate(_)
        ));
    }

    #[test]
    fn refuses_bytes_that_do_not_verify() {
        let mut body = start(1);
        let last = body.len() - 1;
        body[last] ^= 1;
        let Step::Refuse(r) = core().decide(&delivery("mev", body), NOW) else {
            panic!("not refused")
        };
        assert_eq!(r.code, Code::BadSignature);
    }

    #[test]
    fn bytes_admission_verified_are_remembered_and_a_changed_copy_is_not() {
        let mut p = policy();
        p.keyring.remember_verified(16);
        let c = AgentCore::new(
            Module::Mev,
            p.clone(),
            ModuleState::default(),
            NonceBook::new(Limits::default()),
            600,
        );
        let good = start(1);
        // Admission's check, on a clone of the same ring (as the sidecar wires it).
        p.check(&good, NOW, None).unwrap();
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let Step::Refuse(r) = c.decide(&delivery("mev", bad), NOW) else {
            panic!("a changed copy of verified bytes was not refused")
        };
        assert_eq!(r.code, Code::BadSignature);
        assert!(matches!(
            c.decide(&delivery("mev", good), NOW),
            Step::Apply(_)
        ));
        let memo = p.keyring.memo().unwrap();
        // Admission and the changed copy did the arithmetic; the agent's check of
        // the admitted bytes was answered.
        assert_eq!(memo.counts(), (1, 2));
    }

    #[test]
    fn refuses_a_command_keyed_for_the_wrong_module() {
        let mut c = core();
        c.module = Module::Arbitrage;
        let Step::Refuse(r) = c.decide(&delivery("arbitrage", start(1)), NOW) else {
            panic!("not refused")
        };
        assert_eq!(r.code, Code::RouteMismatch);
    }

    #[test]
    fn refuses_an_oversized_delivery() {
        let mut body = start(1);
        body.resize(5000, 0);
        let Step::Refuse(r) = core().decide(&delivery("mev", body), NOW) else {
            panic!("not refused")
        };
        assert_eq!(r.code, Code::TooLarge);
    }

    /// An agent environment on `journal` (audited: rows go to it) and what it
    /// announces.
    fn agent_env(journal: &Journal, audited: bool) -> (AgentEnv, broadcast::Receiver<Ack>) {
        let (acks, heard) = broadcast::channel(16);
        let env = AgentEnv {
            policy: policy(),
            journal: journal.clone(),
            embedded_bus: true,
            limits: Limits::default(),
            dedup_secs: 600,
            modules: ModuleTable::new(),
            auditor: Auditor::new(audited.then(|| journal.clone())),
            acks,
            metrics: ControlMetrics::default(),
            kafka_state: None,
            chain: "node-1".into(),
            floor: ClockFloor::in_dir(journal.dir()).unwrap(),
        };
        (env, heard)
    }

    /// Delivery `offset` of the embedded bus for `mev`.
    fn at(offset: i64, payload: Vec<u8>) -> Delivery {
        Delivery {
            position: Position {
                partition: 0,
                offset,
            },
            ..delivery("mev", payload)
        }
    }

    /// Start (nonce 1) twice, a start whose signed nonce was changed from 3 to 5
    /// (its signature fails), a throttle (nonce 2), all signed at `now`.
    fn mixed_batch(now: u64) -> Vec<Delivery> {
        let first = testkit::fixtures::signed_command(1, Action::Start, now, "dashboard", &[]);
        let mut forged = testkit::fixtures::signed_command(3, Action::Start, now, "dashboard", &[]);
        let last = forged.len() - 1;
        forged[last] ^= 6;
        assert_eq!(
            <Command as prost::Message>::decode(forged.as_slice())
                .unwrap()
                .nonce,
            5
        );
        let throttle = testkit::fixtures::signed_command(
            2,
            Action::Throttle,
            now,
            "dashboard",
            &[("throttle_pct", "40")],
        );
        vec![
            at(0, first.clone()),
            at(1, first),
            at(2, forged),
            at(3, throttle),
        ]
    }

    /// A snapshot replaces the records of the nonces before it: the clock floor
    /// is past every nonce the agent forgot first, and a restart whose clock
    /// reads earlier (stepped back) judges commands no earlier than the floor.
    /// Before, the forgotten command was fresh and unknown to it: applied twice.
    #[tokio::test]
    async fn a_snapshot_leaves_no_forgotten_nonce_fresh_across_a_restart() {
        use crate::journal::Options;

        let d = testkit::TempDir::new("agent-snapshot-floor");
        let now = crate::now_secs();
        let opened = Journal::open(d.path(), Options::default()).unwrap();
        let journal = opened.start(None, Vec::new()).unwrap();
        let (env, _) = agent_env(&journal, false);
        let mut agent = Agent::open(Module::Mev, &env, &[]);
        let at = || AppliedAt { seq: 0, what: None };
        let book = &mut agent.core.applied;
        book.insert("dashboard", 1, now + 5, at(), now).unwrap();
        // Ten seconds on, the issuer's next nonce: the book forgets nonce 1.
        book.insert("dashboard", 2, now + 600, at(), now + 10)
            .unwrap();
        assert!(book.get("dashboard", 1, now).is_none());
        agent.snapshot(now + 10, 1_000).await;
        assert_eq!(env.floor.get(), now + 6);
        drop((agent, env, journal));

        let opened = Journal::open(d.path(), Options::default()).unwrap();
        let records = opened.records.clone();
        let journal = opened.start(None, Vec::new()).unwrap();
        let (env, _) = agent_env(&journal, false);
        let again = Agent::open(Module::Mev, &env, &records);
        let stepped_back = now - 100;
        assert!(again
            .core
            .applied
            .get("dashboard", 1, stepped_back)
            .is_none());
        assert!(again
            .core
            .applied
            .get("dashboard", 2, stepped_back)
            .is_some());
        assert_eq!(again.core.applied.clock(stepped_back), now + 6);
    }

    /// Applied nonces read back at a start are remembered beyond the bound
    /// too (a stop or kill applied beyond it), as much again at most: each one
    /// dropped was a command another node's copy of applied again.
    #[tokio::test]
    async fn applied_nonces_beyond_the_bound_are_remembered_across_a_restart() {
        use crate::journal::txn::AgentEntry;
        use crate::journal::Options;
        let d = testkit::TempDir::new("agent-beyond-bound");
        let now = crate::now_secs();
        let opened = Journal::open(d.path(), Options::default()).unwrap();
        let journal = opened.start(None, Vec::new()).unwrap();
        let (mut env, _) = agent_env(&journal, false);
        env.limits = Limits {
            max_per_issuer: 2,
            max_issuers: 4,
        };
        let records: Vec<(Lsn, Txn)> = (1..=5u64)
            .map(|n| {
                let e = journal::Entry::Agent(AgentEntry {
                    module: Module::Mev,
                    offset: Some(n),
                    kafka: None,
                    state: None,
                    applied: Some(AppliedNonce {
                        issuer: "dashboard".into(),
                        nonce: n,
                        expires: now + 600,
                        seq: 0,
                        what: None,
                    }),
                    refused: None,
                    generation: None,
                });
                (n, Txn::of(vec![e]))
            })
            .collect();
        let agent = Agent::open(Module::Mev, &env, &records);
        // Beyond the bound by as much again at most: the memory stays bounded.
        assert_eq!(agent.core.applied(now).len(), 4);
    }

    /// Kafka: a nonce record is tombstoned only once this node's floor (written
    /// first) and the module checkpoint's are past its expiry.
    #[test]
    fn nonce_records_are_tombstoned_behind_both_floors() {
        let (_d, floor) = super::super::clock_floor::scratch();
        let mut written: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for (e, k) in [(100, "a"), (105, "b"), (200, "c")] {
            written.entry(e).or_default().push(k.to_owned());
        }
        // The checkpoint's floor (no checkpoint carried one yet) holds them all.
        assert!(forgettable(&mut written, 150, &floor, 0).is_empty());
        assert_eq!(floor.get(), 106, "this node's floor covers them already");
        assert_eq!(forgettable(&mut written, 150, &floor, 101), vec!["a"]);
        assert_eq!(forgettable(&mut written, 150, &floor, 1_000), vec!["b"]);
        assert!(forgettable(&mut written, 150, &floor, 1_000).is_empty());
        assert_eq!(written.len(), 1, "c is live");
    }

    /// A snapshot too large for one journal record is written in parts, and a
    /// restart takes it whole — every nonce with its row's seq and what its
    /// command asked; a snapshot whose last part was never written (a crash
    /// between parts) is passed over, and the one before it stands.
    #[tokio::test]
    async fn a_snapshot_in_parts_stands_only_whole() {
        use crate::journal::Options;
        use gw_core::ledger::Chain;

        let d = testkit::TempDir::new("agent-snapshot-parts");
        let now = crate::now_secs();
        let opened = Journal::open(d.path(), Options::default()).unwrap();
        let journal = opened
            .start(Some(Chain::new("node-1")), Vec::new())
            .unwrap();
        let (env, _) = agent_env(&journal, false);
        let mut agent = Agent::open(Module::Mev, &env, &[]);
        let remember = |agent: &mut Agent, nonces: std::ops::Range<u64>| {
            for n in nonces {
                let at = AppliedAt {
                    seq: n,
                    what: Some([7; 16]),
                };
                agent
                    .core
                    .applied
                    .insert("dashboard", n, now + 100 + n, at, now)
                    .unwrap();
            }
        };
        remember(&mut agent, 0..2_500);
        agent.snapshot(now, 1_000).await;
        // A second snapshot (more nonces) whose last part is lost.
        remember(&mut agent, 2_500..3_100);
        agent.snapshot(now, 1_000).await;
        drop((agent, env, journal));

        let opened = Journal::open(d.path(), Options::default()).unwrap();
        let records = opened.records.clone();
        let parts: Vec<(u64, u32, u32)> = records
            .iter()
            .flat_map(|(_, t)| &t.entries)
            .filter_map(|e| match e {
                journal::Entry::Snapshot(s) => s.part.map(|p| (p.id, p.index, p.count)),
                _ => None,
            })
            .collect();
        assert_eq!(
            parts.iter().map(|p| (p.1, p.2)).collect::<Vec<_>>(),
            vec![(0, 3), (1, 3), (2, 3), (0, 4), (1, 4), (2, 4), (3, 4)]
        );
        let journal = opened.start(None, Vec::new()).unwrap();
        let (env, _) = agent_env(&journal, false);
        let mut whole = Agent::open(Module::Mev, &env, &records);
        assert_eq!(whole.core.applied(now).len(), 3_100);
        let at = whole
            .core
            .applied
            .get("dashboard", 3_099, now)
            .unwrap()
            .value;
        assert_eq!((at.seq, at.what), (3_099, Some([7; 16])));
        // Its first part's record is held while any of its nonces lives: read
        // without it, the later parts would be passed over (here the first
        // part's own nonces, the first to expire, are gone).
        let first_part = records.iter().find_map(|(lsn, t)| {
            t.entries
                .iter()
                .any(|e| {
                    matches!(e, journal::Entry::Snapshot(s)
                        if s.part.is_some_and(|p| p.index == 0 && p.count == 4))
                })
                .then_some(*lsn)
        });
        whole.applied_lsns.expire(now + 100 + 2_000);
        assert_eq!(whole.applied_lsns.oldest(), first_part);
        // Without the second snapshot's last part: the first stands.
        let cut: Vec<(Lsn, Txn)> = records[..records.len() - 1].to_vec();
        let first = Agent::open(Module::Mev, &env, &cut);
        assert_eq!(first.core.applied(now).len(), 2_500);
        assert!(first.core.applied.get("dashboard", 2_600, now).is_none());
    }

    /// A snapshot's part holds [`SNAPSHOT_PART_NONCES`] of the largest applied
    /// nonces there can be (an issuer of its most bytes, each escaped in JSON —
    /// control characters are refused — every number at its largest) within a
    /// journal record.
    #[test]
    fn a_snapshot_part_fits_in_a_journal_record() {
        let n = AppliedNonce {
            issuer: "\"".repeat(gw_core::command::MAX_ISSUER_BYTES),
            nonce: u64::MAX,
            expires: u64::MAX,
            seq: u64::MAX,
            what: Some("f".repeat(32)),
        };
        let one = serde_json::to_vec(&n).unwrap().len() + 1;
        assert!(
            one * SNAPSHOT_PART_NONCES < journal::MAX_RECORD_BYTES,
            "{one} bytes a nonce"
        );
    }

    /// A batch of deliveries is decided in order (a nonce twice in one batch is
    /// applied once, a refusal in the middle changes nothing else), made durable
    /// in one journal transaction, and a restart rebuilds the same state and
    /// applied nonces, each with its own row's seq.
    #[tokio::test]
    async fn a_batch_is_one_transaction_and_a_restart_rebuilds_it() {
        use crate::journal::Options;
        use gw_core::ledger::Chain;

        let d = testkit::TempDir::new("agent-batch");
        let now = crate::now_secs();
        let opened = Journal::open(d.path(), Options::default()).unwrap();
        let journal = opened
            .start(Some(Chain::new("node-1")), Vec::new())
            .unwrap();
        let (env, mut heard) = agent_env(&journal, true);
        let mut agent = Agent::open(Module::Mev, &env, &[]);
        let handled = agent.handle(&mixed_batch(now), now).await.unwrap();
        assert_eq!(
            handled,
            vec![
                Handled::Applied,
                Handled::Duplicate,
                Handled::Rejected(Code::BadSignature),
                Handled::Applied
            ]
        );
        let told: Vec<(u64, u64, bool)> = (0..4)
            .map(|_| {
                let a = heard.try_recv().unwrap();
                (a.nonce, a.seq, a.outcome.is_ok())
            })
            .collect();
        // Rows 1 (applied), 2 (duplicate), 3 (rejected), 4 (applied): the copy is
        // told row 1.
        assert_eq!(
            told,
            vec![(1, 1, true), (1, 1, true), (5, 3, false), (2, 4, true)]
        );
        let state = env.modules.get(Module::Mev);
        assert_eq!(state.state, RunState::Running);
        assert_eq!(state.applied, 2);
        assert_eq!(agent.next_offset, Some(4));

        drop((agent, env, journal));
        let opened = Journal::open(d.path(), Options::default()).unwrap();
        let records = opened.records.clone();
        let agents: Vec<_> = records
            .iter()
            .filter(|(_, t)| !t.agent_entries().is_empty())
            .collect();
        assert_eq!(agents.len(), 1, "one transaction for the batch");
        let seqs: Vec<u64> = agents[0]
            .1
            .agent_entries()
            .iter()
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(seqs, vec![1, 0, 0, 4]);
        // The refusal names its command, for the replay guard.
        let refused: Vec<(u64, String)> = agents[0]
            .1
            .agent_entries()
            .iter()
            .filter_map(|(a, _)| a.refused.as_ref().map(|r| (r.nonce, r.code.clone())))
            .collect();
        assert_eq!(refused, vec![(5, "bad_signature".to_owned())]);
        let journal = opened.start(None, Vec::new()).unwrap();
        let (env, _) = agent_env(&journal, false);
        let again = Agent::open(Module::Mev, &env, &records);
        assert_eq!(again.core.state(), &state);
        assert_eq!(again.next_offset, Some(4));
        let seq = |n| {
            again
                .core
                .applied
                .get("dashboard", n, now)
                .map(|s| s.value.seq)
        };
        assert_eq!((seq(1), seq(2), seq(5)), (Some(1), Some(4), None));
    }

    /// A batch the journal refuses changes nothing: no state, no nonce, no offset,
    /// nothing announced; the same batch then applies once the journal takes it.
    #[tokio::test]
    async fn a_batch_the_journal_refuses_changes_nothing() {
        use crate::journal::Options;
        use gw_core::ledger::Chain;

        let d = testkit::TempDir::new("agent-batch-refused");
        let now = crate::now_secs();
        // No chain: the journal refuses every transaction with ledger rows.
        let journal = Journal::open(d.path(), Options::default())
            .unwrap()
            .start(None, Vec::new())
            .unwrap();
        let (env_refused, mut heard) = agent_env(&journal, true);
        let mut agent = Agent::open(Module::Mev, &env_refused, &[]);
        let batch = mixed_batch(now);
        assert!(matches!(
            agent.handle(&batch, now).await,
            Err(RetryLater::Journal(_))
        ));
        assert_eq!(agent.core.state(), &ModuleState::default());
        assert!(agent.core.applied.get("dashboard", 1, now).is_none());
        assert_eq!(agent.next_offset, None);
        assert!(heard.try_recv().is_err(), "nothing announced");
        assert_eq!(env_refused.modules.get(Module::Mev), ModuleState::default());
        drop((agent, env_refused, journal));

        let journal = Journal::open(d.path(), Options::default())
            .unwrap()
            .start(Some(Chain::new("node-1")), Vec::new())
            .unwrap();
        let (env, _) = agent_env(&journal, true);
        let mut agent = Agent::open(Module::Mev, &env, &[]);
        let handled = agent.handle(&batch, now).await.unwrap();
        assert_eq!(
            handled.iter().filter(|h| **h == Handled::Applied).count(),
            2
        );
        assert_eq!(env.modules.get(Module::Mev).applied, 2);
    }
}
