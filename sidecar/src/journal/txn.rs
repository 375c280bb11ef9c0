//! What a journal record holds: one transaction of entries, written and recovered
//! whole (one frame, one checksum). Ledger rows are sealed into the chain by the
//! writer as it writes them, so the chain's order is the journal's.

use std::sync::Arc;

use gw_core::contract::Requester;
use gw_core::ledger::{Decision, LedgerRow, Stage};
use gw_core::module_state::ModuleState;
use gw_core::replay::Digest;
use gw_core::Module;
use serde::{Deserialize, Serialize};

use crate::sender::audit::SendRow;

/// One durable fact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)] // Built once per transaction, never in bulk.
pub enum Entry {
    /// A ledger row (sealed: `chain_id`, `seq` and the hashes are the writer's),
    /// shared: the writer seals it once and the audit queue and the caller keep
    /// the same row (written as the row itself).
    Row(Arc<LedgerRow>),
    /// The replay guard accepted `(issuer, nonce)` until `expires`.
    Nonce(NonceEntry),
    /// A command for a module's agents: on the embedded bus its offset is this
    /// record's LSN; with Kafka it is forwarded to the topic (an outbox).
    Publish(PublishEntry),
    /// The outbox entry at `lsn` is on the Kafka topic.
    Forwarded {
        /// The record that held the [`Entry::Publish`].
        lsn: u64,
    },
    /// An agent applied (or skipped) the command at bus offset `offset`.
    Agent(AgentEntry),
    /// An agent's whole state, so older [`Entry::Agent`] records can go.
    Snapshot(SnapshotEntry),
    /// Rows of `tx_sends`.
    Sends {
        /// The rows.
        rows: Vec<SendRow>,
    },
    /// The [`Entry::Sends`] of record `lsn` are in ClickHouse.
    SendsShipped {
        /// The record.
        lsn: u64,
    },
    /// The ledger shipper is about to insert rows `first..=last` of its chain in
    /// one insert (whose deduplication token names that range): until ClickHouse
    /// holds `last`, a restart ships exactly this range again, so an insert that
    /// lands late is deduplicated rather than stored twice.
    Shipping {
        /// First seq of the insert.
        first: u64,
        /// Last seq of the insert.
        last: u64,
    },
}

/// An accepted nonce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NonceEntry {
    /// Issuer.
    pub issuer: String,
    /// Nonce.
    pub nonce: u64,
    /// Unix seconds after which the command is stale and the nonce forgotten.
    pub expires: u64,
    /// Digest of the accepted bytes, hex.
    #[serde(with = "hex_bytes16")]
    pub digest: Digest,
    /// The command's `request_id`.
    pub request_id: String,
    /// What the command asks ([`crate::control::agent::what_of`], hex; absent
    /// in records written before 2026-12-12): an `applied` of another command
    /// under the same nonce is not this one's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub what: Option<String>,
}

/// A published command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishEntry {
    /// The module it is keyed by.
    pub module: Module,
    /// The exact signed bytes (hex in the record).
    #[serde(with = "hex_vec")]
    pub payload: Vec<u8>,
    /// Who sent it.
    pub requester: Requester,
    /// Kafka bus: the forward epoch of the start that accepted it
    /// ([`crate::control::bus::forward_epoch`]); the command is forwarded as that
    /// start's forward number `LSN`, after a restart too. Absent in entries of the
    /// embedded bus and of versions before 2026-12-05 (forwarded with the current
    /// start's epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_epoch: Option<u64>,
}

/// Where a published command landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    /// Partition.
    pub partition: i32,
    /// Offset in the partition.
    pub offset: i64,
}

/// What an agent did with one delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentEntry {
    /// The module.
    pub module: Module,
    /// The embedded bus offset it consumed (the next one is `offset + 1`); `None`
    /// with Kafka, whose consumer offsets live in Kafka.
    pub offset: Option<u64>,
    /// The Kafka position it read (Kafka bus: which delivery this node's ledger
    /// already has a row of).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<Position>,
    /// The module state after it (absent when the state did not change).
    pub state: Option<ModuleState>,
    /// The nonce it applied (or found applied before: a duplicate) and until when
    /// it is remembered (absent otherwise).
    pub applied: Option<AppliedNonce>,
    /// The command it refused to apply, when it decodes (absent otherwise): the
    /// replay guard answers a resend of it, or a request that missed the agent's
    /// answer, with the refusal rather than "not applied yet".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<RefusedCommand>,
    /// Kafka bus: the generation of the module's checkpoint in Kafka as of this
    /// decision (written before it): a load never takes an older one as the
    /// newest (`kafka_state`, *rollback*).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

/// A command an agent refused to apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedCommand {
    /// Issuer.
    pub issuer: String,
    /// Nonce.
    pub nonce: u64,
    /// The digest of the bytes refused (another command under the nonce is not
    /// this one).
    pub digest: gw_core::replay::Digest,
    /// Why: the refusal's stable code.
    pub code: String,
}

/// A nonce an agent applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedNonce {
    /// Issuer.
    pub issuer: String,
    /// Nonce.
    pub nonce: u64,
    /// Unix seconds after which it is forgotten.
    pub expires: u64,
    /// Where the `applied` row is: chain and seq (0 when not audited).
    pub seq: u64,
    /// What the command under the nonce asked ([`crate::control::agent::what_of`],
    /// hex; absent in records written before 2026-12-08): another command under
    /// the same nonce is not a copy of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub what: Option<String>,
}

/// An agent's whole durable state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    /// The module.
    pub module: Module,
    /// The next embedded bus offset to consume (`None` with Kafka).
    pub next_offset: Option<u64>,
    /// Per partition, the last Kafka position this node's ledger has a row of
    /// (Kafka bus).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kafka: Vec<Position>,
    /// The module state.
    pub state: ModuleState,
    /// Every applied nonce still remembered.
    pub applied: Vec<AppliedNonce>,
    /// Kafka bus: the newest generation of the module's checkpoint this node
    /// knows was written (as [`AgentEntry::generation`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// One part of a snapshot written in several records (its applied nonces
    /// would not fit in one: [`super::MAX_RECORD_BYTES`]); absent: the whole
    /// snapshot. It stands only once every part is read, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<SnapshotPart>,
}

/// Where a [`SnapshotEntry`] stands among the records of one snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotPart {
    /// The snapshot (the time it was begun, unix nanoseconds).
    pub id: u64,
    /// This part's place, from 0.
    pub index: u32,
    /// How many parts the snapshot has.
    pub count: u32,
}

pub(crate) mod hex_vec {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

mod hex_bytes16 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 16], D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| serde::de::Error::custom("a 16-byte hex digest"))
    }
}

/// A transaction: entries made durable together, or not at all.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Txn {
    /// The entries, in order.
    pub entries: Vec<Entry>,
}

impl Entry {
    /// The entry of a ledger row not yet sealed.
    pub fn row(row: LedgerRow) -> Entry {
        Entry::Row(Arc::new(row))
    }
}

impl Txn {
    /// A transaction of `entries`.
    pub fn of(entries: Vec<Entry>) -> Txn {
        Txn { entries }
    }

    /// Each agent entry with the seq of the row that says its nonce was applied:
    /// its own `applied` row (an agent writes a delivery's row, then its entry; one
    /// transaction may hold several deliveries), else the seq the nonce was known
    /// applied with (a duplicate), else 0.
    pub fn agent_entries(&self) -> Vec<(&AgentEntry, u64)> {
        let mut out = Vec::new();
        let mut row = None;
        for e in &self.entries {
            match e {
                Entry::Row(r) if r.stage == Stage::Agent.as_str() => {
                    row = (r.decision == Decision::Applied.as_str()).then_some(r.seq);
                }
                Entry::Agent(a) => {
                    let known = a.applied.as_ref().map_or(0, |n| n.seq);
                    out.push((a, row.take().unwrap_or(known)));
                }
                _ => {}
            }
        }
        out
    }

    /// The record's bytes: a version byte, then JSON.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let mut out = vec![VERSION];
        serde_json::to_writer(&mut out, self).map_err(|e| e.to_string())?;
        Ok(out)
    }

    /// Reads a record; `Err` names what is wrong (a record this build cannot read
    /// is damage: refuse rather than drop state).
    pub fn decode(payload: &[u8]) -> Result<Txn, String> {
        match payload.split_first() {
            Some((&VERSION, body)) => serde_json::from_slice(body).map_err(|e| e.to_string()),
            // The first journal held only the replay guard's nonces.
            Some((&1, body)) => serde_json::from_slice::<NonceEntry>(body)
                .map(|n| Txn::of(vec![Entry::Nonce(n)]))
                .map_err(|e| e.to_string()),
            Some((v, _)) => Err(format!("unknown record version {v}")),
            None => Err("an empty record".into()),
        }
    }

    /// Whether it holds ledger rows.
    pub fn has_rows(&self) -> bool {
        self.entries.iter().any(|e| matches!(e, Entry::Row(_)))
    }
}

/// The record format's version.
const VERSION: u8 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_round_trips() {
        let t = Txn::of(vec![
            Entry::row(testkit::fixtures::ledger_row(1)),
            Entry::Nonce(NonceEntry {
                issuer: "dashboard".into(),
                nonce: 7,
                expires: 100,
                digest: [3; 16],
                request_id: "r".into(),
                what: Some(hex::encode([4u8; 16])),
            }),
            Entry::Publish(PublishEntry {
                module: Module::Mev,
                payload: vec![1, 2, 3],
                requester: Requester::default(),
                forward_epoch: None,
            }),
            Entry::Publish(PublishEntry {
                module: Module::Arbitrage,
                payload: vec![4],
                requester: Requester::default(),
                forward_epoch: Some(1_764_900_000_000_000),
            }),
            Entry::Forwarded { lsn: 4 },
        ]);
        assert_eq!(Txn::decode(&t.encode().unwrap()), Ok(t));
        // Every kind of entry encodes (an internally tagged enum cannot hold a bare
        // sequence: a variant like that would fail here).
        let all = Txn::of(vec![
            Entry::Sends {
                rows: vec![SendRow::default()],
            },
            Entry::SendsShipped { lsn: 1 },
            Entry::Shipping { first: 1, last: 2 },
            Entry::Agent(AgentEntry {
                refused: None,
                module: Module::Mev,
                kafka: None,
                offset: Some(3),
                state: Some(ModuleState::default()),
                applied: Some(AppliedNonce {
                    issuer: "i".into(),
                    nonce: 1,
                    expires: 2,
                    seq: 3,
                    what: Some("00".repeat(16)),
                }),
                generation: Some(7),
            }),
            Entry::Snapshot(SnapshotEntry {
                module: Module::Arbitrage,
                kafka: Vec::new(),
                next_offset: None,
                state: ModuleState::default(),
                applied: Vec::new(),
                generation: Some(7),
                part: Some(SnapshotPart {
                    id: 1,
                    index: 0,
                    count: 2,
                }),
            }),
        ]);
        assert_eq!(Txn::decode(&all.encode().unwrap()), Ok(all));
        assert!(Txn::decode(&[9, b'{', b'}']).is_err());
        assert!(Txn::decode(&[]).is_err());
    }
}
