//! Module agent state kept in Kafka (the Kafka bus), so that an agent on another
//! node can take over a module's partition after a rebalance.
//!
//! Each module has a compacted topic `{topic}-state-{module}` with one partition:
//! - key `state`: the [`Checkpoint`] — the module state, the next command offset to
//!   handle in each partition of the command topic, the last applied nonces, and
//!   the last delivery each chain (node) decided;
//! - key `n/{issuer}/{nonce}`: an applied nonce ([`StoredNonce`]); a tombstone once
//!   it is no longer remembered.
//!
//! The checkpoint is the commit point of a delivery: it is written (and
//! acknowledged with `acks=all`) before the node writes its ledger row, the nonce's
//! own record and the consumer offset. The command offsets it carries are what the
//! next owner resumes from, so a command is handled once even if the consumer
//! group's committed offset is behind. A crash after the checkpoint loses at most
//! the nonce record (the next owner writes it again from `recent`) and the node's
//! ledger row (the node writes it at its restart, from `last`).
//!
//! Every record a node writes is signed with its state key, and only records a
//! node of `kafka.state_keys` signed are read ([`super::state_sign`]): a client
//! that may write to the topic cannot forge a checkpoint or a used nonce.
//!
//! Each checkpoint is numbered ([`Checkpoint::generation`]), so a genuine one
//! written again later — a *rollback*, by anyone who may write to the topic or by
//! a node that was cut off from its group — is not taken as the newest: a load
//! compares the newest with every signed checkpoint still in the topic and with
//! the highest generation the node's own journal knows was written (which still
//! holds once compaction has removed the newer records).
//!
//! Zombie fencing is not done here: a node that is paused (not dead) past its group
//! session and then resumes could write one stale checkpoint. Kafka transactions
//! (a transactional id per module, the checkpoint read `read_committed`) would
//! fence it, but tansu 0.6.0, the broker this project runs, does not end
//! transactions: tried on 2026-12-02 with rust-rdkafka, `init_transactions` and
//! `begin_transaction` succeed and `commit_transaction` fails with "EndTxnRequest
//! (KIP-98) not supported by broker". Against a broker with transactions this is
//! the way to fence; `docs/architecture.md` describes the gap.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use gw_core::contract::Requester;
use gw_core::module_state::ModuleState;
use gw_core::{Command, Module};
use rdkafka::admin::{NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureRecord;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use super::bus::{BusError, CloseOffRuntime, KafkaConfig, Position, ProducerSlot};
use super::state_sign::{Opened, StateRecovery, StateSigner};

/// How many applied nonces a checkpoint repeats (the nonce records are written
/// after it; a crash can lose the last one).
pub const RECENT: usize = 16;

/// How many records back a watcher starts (a checkpoint written between an
/// agent's load and the watcher's start is not missed; seeing one again is
/// harmless).
const WATCH_TAIL: i64 = 64;

/// Key of the checkpoint record.
const STATE_KEY: &str = "state";

/// The state of a module's agent as of a command offset.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The module state.
    pub state: ModuleState,
    /// Per partition of the command topic, the next offset to handle.
    pub next: BTreeMap<i32, i64>,
    /// The last applied nonces, newest last.
    pub recent: VecDeque<StoredNonce>,
    /// Per chain (node id), the last delivery it decided.
    pub last: BTreeMap<String, LastDecision>,
    /// The chain that wrote this checkpoint.
    #[serde(default)]
    pub writer: String,
    /// Per gateway node and partition of the command topic, which of its
    /// forwards the module's agents have decided on: a copy of one, at a later
    /// offset, is refused even once its nonce is forgotten.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub forwards: BTreeMap<String, BTreeMap<i32, ForwardWindow>>,
    /// One more than the checkpoint it was made from; a numbering begun afresh
    /// (no checkpoint in the topic, a recovery) starts at its writer's clock in
    /// µs ([`next_generation`]; 0: written before 2026-12-06). A load takes the
    /// newest checkpoint only when no signed one before it, and nothing its
    /// node's journal knows was written, has a higher generation: a genuine
    /// checkpoint written again later (a replay, or a node cut off from its group
    /// writing from an older state) is a rollback.
    #[serde(default)]
    pub generation: u64,
    /// The latest clock floor of a node that wrote a checkpoint of this module
    /// ([`super::clock_floor`], unix seconds): nonce records expiring before it
    /// may be tombstoned, so an agent taking the module over judges commands no
    /// earlier than it, whatever its own clock reads (0: written before
    /// 2026-12-07).
    #[serde(default, skip_serializing_if = "crate::is_zero")]
    pub clock_floor: u64,
}

/// The generation of a checkpoint that begins a numbering afresh (the state topic
/// holds none, or a recovery) after `prev`: above it, and at least this node's
/// clock in µs — above every checkpoint any node wrote before, unless that node's
/// clock was ahead of this one's. A checkpoint made from another is one more
/// than it: a node cut off from its group that writes from an older state
/// writes a lower number than the new owner's, whatever the clocks.
pub fn next_generation(prev: u64) -> u64 {
    prev.saturating_add(1).max(crate::now_nanos() / 1_000)
}

/// How many numbers below a node's newest forward the window remembers which
/// were decided on (a copy of one of them is known as one).
pub const FORWARD_WINDOW: u64 = 128;

/// Why a forward is not taken: it is behind the newest one decided on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behind {
    /// Decided on before (within the window): a copy of a record, refused and
    /// answered to nobody.
    Copy(String),
    /// Not known to be decided on: overtaken on the topic by a later record of
    /// the node (its send failed and was retried after the later one went; a
    /// command of an earlier start still waiting to be sent counts too), or a copy
    /// older than the window or from an older start. Refused, so that a module's
    /// commands apply in their node's order, and answered.
    Overtaken(String),
}

/// Which of one node's forwards to one partition were decided on: its newest
/// start (`epoch`), the highest number decided on in it, and which of the
/// [`FORWARD_WINDOW`] numbers up to it were — the anti-replay window of IPsec
/// (RFC 4303 §3.4.3), with one rule more: only a number above the highest is
/// taken. A node hands its records to an idempotent producer in journal order
/// and sends a failed one again with the same number, so a record below the
/// highest is a copy, or one that a later record overtook (taking it would apply
/// the module's commands out of order).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardWindow {
    /// The node's newest start seen.
    pub epoch: u64,
    /// The highest forward number decided on in that start.
    pub top: u64,
    /// Bit `i`: forward `top - i` was decided on (bit 0 is `top`).
    pub seen: u128,
}

impl ForwardWindow {
    /// Whether `f` may be taken: `Err` says why not.
    pub fn check(&self, f: super::bus::ForwardSeq) -> Result<(), Behind> {
        if f.epoch != self.epoch {
            return if f.epoch > self.epoch {
                Ok(())
            } else {
                Err(Behind::Overtaken(format!(
                    "it is from the node's start {}, and forwards from its later start {} were decided on",
                    f.epoch, self.epoch
                )))
            };
        }
        if f.seq > self.top {
            return Ok(());
        }
        let back = self.top - f.seq;
        if back < FORWARD_WINDOW && self.seen & (1u128 << back) != 0 {
            return Err(Behind::Copy(format!(
                "forward {} of this start was decided on before",
                f.seq
            )));
        }
        Err(Behind::Overtaken(format!(
            "forward {} comes after the node's forward {} was decided on",
            f.seq, self.top
        )))
    }

    /// Notes `f` as decided on.
    pub fn note(&mut self, f: super::bus::ForwardSeq) {
        if f.epoch > self.epoch {
            *self = ForwardWindow {
                epoch: f.epoch,
                top: f.seq,
                seen: 1,
            };
        } else if f.epoch == self.epoch {
            if f.seq > self.top {
                let shift = f.seq - self.top;
                self.seen = if shift >= FORWARD_WINDOW {
                    0
                } else {
                    self.seen << shift
                };
                self.seen |= 1;
                self.top = f.seq;
            } else if self.top - f.seq < FORWARD_WINDOW {
                self.seen |= 1u128 << (self.top - f.seq);
            }
        }
    }
}

/// An applied nonce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredNonce {
    /// Issuer.
    pub issuer: String,
    /// Nonce.
    pub nonce: u64,
    /// Unix seconds after which it is forgotten.
    pub expires: u64,
    /// The chain that applied it.
    pub chain: String,
    /// What the command under the nonce asked ([`AppliedNonce::what`];
    /// absent in records written before 2026-12-08).
    ///
    /// [`AppliedNonce::what`]: crate::journal::txn::AppliedNonce::what
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub what: Option<String>,
}

impl StoredNonce {
    /// Its record's key.
    pub fn key(&self) -> String {
        nonce_key(&self.issuer, self.nonce)
    }
}

fn nonce_key(issuer: &str, nonce: u64) -> String {
    format!("n/{issuer}/{nonce}")
}

/// What a chain decided about one delivery (enough to write its ledger row again).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastDecision {
    /// Where the command was read.
    pub position: Position,
    /// `applied`, `duplicate`, `rejected`, `unforwarded` (refused: no gateway
    /// node forwarded it), or `copied` (refused: a copy of a forward decided on
    /// before).
    pub outcome: String,
    /// The refusal code (`rejected`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The exact signed bytes — empty when there were more than
    /// [`LAST_PAYLOAD_MAX`] (`omitted` says what is kept of them).
    #[serde(with = "crate::journal::txn::hex_vec")]
    pub payload: Vec<u8>,
    /// What is kept of a record whose bytes are not: a record of up to Kafka's
    /// own bound (about 1 MB) made the checkpoint, which holds one decision of
    /// every node, too large to produce, and the agent tried again for ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub omitted: Option<Omitted>,
    /// Who sent it.
    pub requester: Requester,
    /// The gateway node whose forward it was (none: a record no node forwarded,
    /// the embedded bus, or a checkpoint written before 2026-12-07): a refusal
    /// of that forward is told to that node's replay guard — another node may
    /// have forwarded the same bytes, whose own forward is still to come.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarded_by: Option<String>,
}

/// The most bytes of a decision's record a checkpoint keeps ([`LastDecision`]).
/// A command of this gateway is a few hundred bytes; one can be larger (its
/// arguments up to about 35 KB, `max_body_bytes` 64 KiB by default): then what
/// the checkpoint's readers need of it is kept ([`Omitted`]).
pub const LAST_PAYLOAD_MAX: usize = 16 << 10;

/// What a checkpoint keeps of a decided record larger than
/// [`LAST_PAYLOAD_MAX`]: enough to tell it from another record at its offset, to
/// answer the requests waiting on it and to write its row again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Omitted {
    /// The record's size.
    pub bytes: u64,
    /// Its digest ([`gw_core::replay::digest`]), hex.
    pub digest: String,
    /// The command's issuer, nonce, request id, module and action (their wire
    /// numbers), when the record decodes as a command with an issuer and request
    /// id of at most 256 bytes each (else empty).
    #[serde(default)]
    pub issuer: String,
    /// See `issuer`.
    #[serde(default)]
    pub nonce: u64,
    /// See `issuer`.
    #[serde(default)]
    pub request_id: String,
    /// See `issuer`.
    #[serde(default)]
    pub module: i32,
    /// See `issuer`.
    #[serde(default)]
    pub action: i32,
}

impl LastDecision {
    /// Keeps `payload` whole up to [`LAST_PAYLOAD_MAX`], else what [`Omitted`]
    /// says: the two fields of a [`LastDecision`].
    pub fn keep(payload: &[u8]) -> (Vec<u8>, Option<Omitted>) {
        if payload.len() <= LAST_PAYLOAD_MAX {
            return (payload.to_vec(), None);
        }
        let c = <Command as prost::Message>::decode(payload)
            .ok()
            .filter(|c| c.issuer.len() <= 256 && c.request_id.len() <= 256)
            .unwrap_or_default();
        let omitted = Omitted {
            bytes: payload.len() as u64,
            digest: hex::encode(gw_core::replay::digest(payload)),
            issuer: c.issuer,
            nonce: c.nonce,
            request_id: c.request_id,
            module: c.module,
            action: c.action,
        };
        (Vec::new(), Some(omitted))
    }

    /// The record's digest (`None`: a kept digest that is not one).
    pub fn digest(&self) -> Option<gw_core::replay::Digest> {
        match &self.omitted {
            None => Some(gw_core::replay::digest(&self.payload)),
            Some(o) => hex::decode(&o.digest).ok()?.try_into().ok(),
        }
    }

    /// The command decided on, as far as the checkpoint knows it (its bytes
    /// not kept: only its issuer, nonce, request id, module and action; `None`
    /// when they are not known either).
    pub fn command(&self) -> Option<Command> {
        match &self.omitted {
            None => <Command as prost::Message>::decode(self.payload.as_slice()).ok(),
            Some(o) if o.issuer.is_empty() => None,
            Some(o) => Some(Command {
                issuer: o.issuer.clone(),
                nonce: o.nonce,
                request_id: o.request_id.clone(),
                module: o.module,
                action: o.action,
                ..Command::default()
            }),
        }
    }
}

/// What [`KafkaState::load`] found.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// The latest checkpoint (none before the first delivery).
    pub checkpoint: Option<Checkpoint>,
    /// Every nonce still remembered at `now` (records and the checkpoint's `recent`).
    pub nonces: Vec<StoredNonce>,
    /// Nonces of `recent` whose own record is missing (to write again).
    pub missing: Vec<StoredNonce>,
    /// Keys of nonce records no longer remembered, and their expiries (to
    /// tombstone once the clock floors are past them).
    pub expired: Vec<(String, u64)>,
    /// The newest checkpoint record was not signed by a listed node and
    /// `kafka.state_recovery` decided what was taken: to write again, signed, so
    /// that the next load needs no recovery.
    pub recovered: bool,
    /// Records ignored because no listed node signed them.
    pub untrusted: usize,
}

/// The state topics.
pub struct KafkaState {
    cfg: KafkaConfig,
    /// Replaced when it cannot go on, as the command forwarder's: an agent
    /// retries its state records until they are written, and must not retry
    /// through a producer that will never send again.
    producer: ProducerSlot,
    signer: Arc<StateSigner>,
}

impl KafkaState {
    /// Clients for `cfg` (no broker needed yet), signing and verifying with
    /// `signer`.
    pub fn new(cfg: &KafkaConfig, signer: StateSigner) -> Result<KafkaState, BusError> {
        let producer = ProducerSlot::new(cfg)?;
        Ok(KafkaState {
            cfg: cfg.clone(),
            producer,
            signer: Arc::new(signer),
        })
    }

    /// What signs and verifies the records (and the commands this node forwards).
    pub fn signer(&self) -> &StateSigner {
        &self.signer
    }

    /// The same, shared.
    pub(crate) fn shared_signer(&self) -> Arc<StateSigner> {
        self.signer.clone()
    }

    /// The partition of the command topic `m`'s commands are forwarded to.
    pub fn partition_of(&self, m: Module) -> i32 {
        super::bus::partition_of(m.as_str().as_bytes(), self.cfg.partitions)
    }

    /// The state topic of `m`.
    pub fn topic(&self, m: Module) -> String {
        format!("{}-state-{}", self.cfg.topic, m.as_str())
    }

    /// Creates the state topics (compacted) when missing. Idempotent. Each
    /// load reads a topic whole, and a checkpoint is written per command: the
    /// log rolls a segment every hour or 64 MiB (Kafka compacts only rolled
    /// segments; its defaults, 7 days and 1 GiB, let superseded checkpoints
    /// pile up to be read at every load) and is compacted once a tenth of it
    /// is superseded.
    pub async fn prepare(&self) -> Result<(), BusError> {
        let names: Vec<String> = Module::ALL.iter().map(|m| self.topic(*m)).collect();
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|n| {
                NewTopic::new(n, 1, TopicReplication::Fixed(self.cfg.replication))
                    .set("cleanup.policy", "compact")
                    .set("segment.ms", "3600000")
                    .set("segment.bytes", "67108864")
                    .set("min.cleanable.dirty.ratio", "0.1")
            })
            .collect();
        self.cfg.create_topics(&topics).await
    }

    /// Writes record `key` holding `body` (signed), or its tombstone (`None`).
    async fn put(&self, m: Module, key: &str, body: Option<&[u8]>) -> Result<(), BusError> {
        let topic = self.topic(m);
        let value = body.map(|b| self.signer.seal(&topic, key, b));
        let mut record = FutureRecord::<str, [u8]>::to(&topic).key(key).partition(0);
        if let Some(v) = &value {
            record = record.payload(v);
        }
        let wait = Duration::from_millis(self.cfg.message_timeout_ms);
        let sent = self.producer.current().send(record, wait).await;
        match sent {
            Ok(_) => {
                self.producer.succeeded(&topic);
                Ok(())
            }
            Err((e, _)) => {
                if !self.producer.replace_if_fatal("agent state")?
                    && self.producer.keeps_failing(&topic)
                {
                    tracing::warn!(error = %e, topic, "kafka state producer keeps failing; recreating it");
                    self.producer.replace()?;
                }
                Err(e.into())
            }
        }
    }

    /// Writes `m`'s checkpoint (acknowledged by every in-sync replica).
    pub async fn save(&self, m: Module, c: &Checkpoint) -> Result<(), BusError> {
        let v = serde_json::to_vec(c).map_err(|e| BusError::Encode(e.to_string()))?;
        self.put(m, STATE_KEY, Some(&v)).await
    }

    /// Writes the record of an applied nonce.
    pub async fn put_nonce(&self, m: Module, n: &StoredNonce) -> Result<(), BusError> {
        let v = serde_json::to_vec(n).map_err(|e| BusError::Encode(e.to_string()))?;
        self.put(m, &n.key(), Some(&v)).await
    }

    /// Tombstones nonce records (`keys`) no longer remembered.
    pub async fn forget(&self, m: Module, keys: &[String]) -> Result<(), BusError> {
        for k in keys {
            self.put(m, k, None).await?;
        }
        Ok(())
    }

    /// Calls `f` with every checkpoint of `m` written from now on by a listed node,
    /// forever (one no listed node signed, or older than one seen — written again
    /// later — is skipped, logged at most every 10 s).
    pub async fn watch(self: Arc<Self>, m: Module, mut f: impl FnMut(Checkpoint) + Send) {
        let topic = self.topic(m);
        let mut skipped = Skipped::default();
        let mut newest = 0u64;
        loop {
            // Closed off the runtime when dropped (a broker that is away must not
            // hold up shutdown).
            let c: StreamConsumer = match self
                .cfg
                .client()
                .set("group.id", "gw-agent-state-watch")
                .set("enable.auto.commit", "false")
                .set("auto.offset.reset", "earliest")
                .set("isolation.level", "read_committed")
                .create()
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "agent state watcher not started (retrying)");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    continue;
                }
            };
            let c = CloseOffRuntime::new(c);
            let mut tpl = TopicPartitionList::new();
            if let Err(e) = tpl
                .add_partition_offset(&topic, 0, Offset::OffsetTail(WATCH_TAIL))
                .and_then(|()| c.assign(&tpl))
            {
                tracing::warn!(error = %e, "agent state watcher not assigned (retrying)");
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
            loop {
                match c.recv().await {
                    Ok(msg) if msg.key() == Some(STATE_KEY.as_bytes()) => {
                        let Some(v) = msg.payload() else { continue };
                        match checkpoint_of(self.signer.open(&topic, STATE_KEY, v)) {
                            Ok(Ok(cp)) if cp.generation < newest => skipped.note(
                                m,
                                msg.offset(),
                                &format!(
                                    "generation {} is older than generation {newest}, seen before it: written again",
                                    cp.generation
                                ),
                            ),
                            Ok(Ok(cp)) => {
                                newest = cp.generation;
                                f(cp);
                            }
                            Ok(Err(e)) => {
                                tracing::warn!(module = m.as_str(), error = %e, "agent checkpoint unreadable");
                            }
                            Err(why) => skipped.note(m, msg.offset(), &why),
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "agent state watcher");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    }

    /// Partition `partition` of the command topic as it is now: where it ends (its
    /// high watermark: the offset its next command will get) and, when `at` is
    /// given and the partition still holds that offset, the payload there.
    pub async fn probe_command_topic(
        &self,
        partition: i32,
        at: Option<i64>,
    ) -> Result<(i64, Option<Vec<u8>>), BusError> {
        let client = self.cfg.client();
        let topic = self.cfg.topic.clone();
        let wait = Duration::from_millis(self.cfg.message_timeout_ms.max(1000));
        tokio::task::spawn_blocking(move || probe(client, &topic, partition, at, wait))
            .await
            .map_err(|e| BusError::Encode(format!("command topic probe: {e}")))?
    }

    /// Reads `m`'s state topic to its end: the latest checkpoint and the nonces
    /// remembered at `now`. `floor`: the highest checkpoint generation this node
    /// knows was written (the newest checkpoint must not be below it).
    pub async fn load(&self, m: Module, now: u64, floor: u64) -> Result<Loaded, BusError> {
        let client = self.cfg.client();
        let topic = self.topic(m);
        let wait = Duration::from_millis(self.cfg.message_timeout_ms.max(1000));
        let t = topic.clone();
        let records = tokio::task::spawn_blocking(move || read_all(client, &t, wait))
            .await
            .map_err(|e| BusError::Encode(format!("state loader: {e}")))??;
        fold(records, now, m, &topic, &self.signer, floor)
    }
}

/// A record's key and value (`None`: a tombstone).
type Record = (String, Option<Vec<u8>>);

/// Every record of partition 0 of `topic`, in order.
fn read_all(
    mut client: ClientConfig,
    topic: &str,
    wait: Duration,
) -> Result<Vec<Record>, BusError> {
    let c: BaseConsumer = client
        .set("group.id", "gw-agent-state-loader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    let (low, high) = match c.fetch_watermarks(topic, 0, wait) {
        Ok(w) => w,
        // No topic yet: nothing was ever written (the bus creates it).
        Err(KafkaError::MetadataFetch(
            RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownPartition,
        )) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    if high <= low {
        return Ok(out);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(low))?;
    c.assign(&tpl)?;
    // Gives up only when no record arrives for `wait` (a long topic takes as long
    // as it takes).
    let mut deadline = std::time::Instant::now() + wait;
    loop {
        if std::time::Instant::now() > deadline {
            return Err(BusError::Encode(format!(
                "reading {topic}: nothing for {wait:?} at offset {} of {high}",
                out.len()
            )));
        }
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(msg)) => {
                deadline = std::time::Instant::now() + wait;
                let key = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
                out.push((key, msg.payload().map(<[u8]>::to_vec)));
                if msg.offset() + 1 >= high {
                    return Ok(out);
                }
            }
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
}

/// Checkpoints a watcher skipped, logged at most every 10 s (anyone who may write
/// to the topic could otherwise fill the logs).
#[derive(Default)]
struct Skipped {
    since_log: u64,
    logged: Option<std::time::Instant>,
}

impl Skipped {
    fn note(&mut self, m: Module, offset: i64, why: &str) {
        self.since_log += 1;
        if self
            .logged
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        {
            return;
        }
        tracing::warn!(
            module = m.as_str(),
            offset,
            skipped = self.since_log,
            "agent checkpoint skipped: {why}"
        );
        self.since_log = 0;
        self.logged = Some(std::time::Instant::now());
    }
}

/// See [`KafkaState::probe_command_topic`].
fn probe(
    mut client: ClientConfig,
    topic: &str,
    partition: i32,
    at: Option<i64>,
    wait: Duration,
) -> Result<(i64, Option<Vec<u8>>), BusError> {
    let c: BaseConsumer = client
        .set("group.id", "gw-agent-topic-probe")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        // An offset gone between the watermarks and the fetch: read from the start
        // (then past it: no record), not wait for new ones.
        .set("auto.offset.reset", "earliest")
        .create()?;
    let (low, high) = c.fetch_watermarks(topic, partition, wait)?;
    let Some(at) = at.filter(|o| (low..high).contains(o)) else {
        return Ok((high, None));
    };
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(at))?;
    c.assign(&tpl)?;
    let deadline = std::time::Instant::now() + wait;
    while std::time::Instant::now() < deadline {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) if m.offset() == at => {
                return Ok((high, Some(m.payload().unwrap_or_default().to_vec())))
            }
            // Before it (a compacted or transactional log skips offsets): read on.
            Some(Ok(m)) if m.offset() < at => {}
            // Past it: the offset holds no record.
            Some(Ok(_)) => return Ok((high, None)),
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
    // Nothing came (a broker that serves no record for an offset inside a batch):
    // nothing to compare, the topic is judged by its end alone.
    tracing::warn!(
        topic,
        partition,
        at,
        "command topic probe: no record at the offset within {wait:?}"
    );
    Ok((high, None))
}

/// A checkpoint record opened: the checkpoint a listed node signed (or an error
/// when it does not decode), or why it is not trusted.
fn checkpoint_of(o: Opened<'_>) -> Result<Result<Checkpoint, String>, String> {
    match o {
        Opened::Signed { writer, body } => Ok(match serde_json::from_slice::<Checkpoint>(body) {
            Ok(cp) if cp.writer != writer => {
                return Err(format!(
                    "signed by node `{writer}` but names `{}` as its writer",
                    cp.writer
                ))
            }
            Ok(cp) => Ok(cp),
            Err(e) => Err(e.to_string()),
        }),
        Opened::Unverified { why, .. } => Err(why),
    }
}

/// The latest value of every key, read as a checkpoint and nonces, trusting only
/// records a listed node signed. The newest checkpoint record must be one: when
/// it is not (forged, a tombstone, written by a node not listed or by a version
/// that did not sign), the load fails — an older signed checkpoint is not taken
/// instead, as the newer one may be genuine and taking the older would handle its
/// commands again — unless `kafka.state_recovery` says what to take. An untrusted
/// nonce record is skipped (unless the checkpoint is adopted as it is). A
/// checkpoint that does not decode is an error too: never start over from
/// nothing (the next checkpoint would overwrite every node's progress). Nor is a
/// newest checkpoint taken whose generation is below a signed one before it or
/// below `floor` (the highest this node's journal knows was written): that is a
/// rollback, also unless `kafka.state_recovery` says what to take.
fn fold(
    records: Vec<Record>,
    now: u64,
    m: Module,
    topic: &str,
    signer: &StateSigner,
    floor: u64,
) -> Result<Loaded, BusError> {
    let mut loaded = Loaded::default();
    // The newest signed checkpoint; the decodable signed one of the highest
    // generation (the newest of equals); and the newest checkpoint record when it
    // is not signed (why, and its body).
    let mut signed: Option<Result<Checkpoint, String>> = None;
    let mut highest: Option<Checkpoint> = None;
    let mut tail: Option<(String, Option<Vec<u8>>)> = None;
    for (_, v) in records.iter().filter(|(k, _)| k == STATE_KEY) {
        let Some(v) = v else {
            loaded.untrusted += 1;
            tail = Some(("a tombstone (no node deletes a checkpoint)".into(), None));
            continue;
        };
        let opened = signer.open(topic, STATE_KEY, v);
        let body = match &opened {
            Opened::Unverified { body, .. } => body.map(<[u8]>::to_vec),
            Opened::Signed { body, .. } => Some(body.to_vec()),
        };
        match checkpoint_of(opened) {
            Ok(c) => {
                if let Ok(cp) = &c {
                    if highest
                        .as_ref()
                        .is_none_or(|h| cp.generation >= h.generation)
                    {
                        highest = Some(cp.clone());
                    }
                }
                signed = Some(c);
                tail = None;
            }
            Err(why) => {
                loaded.untrusted += 1;
                tail = Some((why, body));
            }
        }
    }
    let module = m.as_str();
    let mut adopted = false;
    // The highest generation known to have been written, and where it is known
    // from. A newest checkpoint below it is a rollback.
    let seen = highest.as_ref().map_or(0, |h| h.generation);
    let top = seen.max(floor);
    let known = if seen >= floor {
        "a signed checkpoint before it in the topic has it"
    } else {
        "this node's journal knows it was written"
    };
    // What `newest_signed` takes: the signed checkpoint of the highest generation,
    // unless the journal knows of a higher one (compacted away).
    let best = highest.filter(|h| h.generation >= floor);
    loaded.checkpoint = match tail {
        None => match signed.map(|c| c.map_err(unreadable)).transpose()? {
            Some(c) if c.generation < top => {
                loaded.recovered = true;
                Some(rolled_back(module, signer.recovery(), c, best, top, known)?)
            }
            c => c,
        },
        Some((why, body)) => {
            let (c, adopt) = unsigned_newest(module, signer.recovery(), &why, body, signed, best)?;
            loaded.recovered = true;
            adopted = adopt;
            Some(c)
        }
    };
    if loaded.recovered {
        // Numbered as the highest known (not as an unsigned record says): written
        // again one above it, it is the newest for every later load.
        if let Some(c) = &mut loaded.checkpoint {
            c.generation = top;
        }
    }
    // The nonces: the newest value of each key a listed node signed (or, with an
    // adopted checkpoint, any), tombstones forgetting.
    let mut nonces: BTreeMap<String, Option<(StoredNonce, bool)>> = BTreeMap::new();
    let mut skipped_nonce: Option<(String, String)> = None;
    for (k, v) in records.into_iter().filter(|(k, _)| k != STATE_KEY) {
        let Some(v) = v else {
            nonces.insert(k, None);
            continue;
        };
        let (body, trusted) = match signer.open(topic, &k, &v) {
            Opened::Signed { body, .. } => (body, true),
            Opened::Unverified {
                body: Some(body), ..
            } if adopted => (body, false),
            Opened::Unverified { why, .. } => {
                loaded.untrusted += 1;
                skipped_nonce.get_or_insert((k, why));
                continue;
            }
        };
        match serde_json::from_slice::<StoredNonce>(body) {
            Ok(n) if n.key() == k => {
                nonces.insert(k, Some((n, trusted)));
            }
            Ok(_) => tracing::warn!(key = %k, "nonce record under another key; ignored"),
            Err(e) => tracing::warn!(key = %k, error = %e, "nonce record unreadable; ignored"),
        }
    }
    if let Some((k, why)) = skipped_nonce {
        // One line per load: anyone who may write to the topic could otherwise
        // fill the logs.
        tracing::warn!(module, key = %k, untrusted = loaded.untrusted, "nonce records no listed node signed are ignored; the first: {why}");
    }
    let mut keys = std::collections::BTreeSet::new();
    for (k, v) in nonces {
        let Some((n, trusted)) = v else { continue };
        if n.expires < now {
            loaded.expired.push((k, n.expires));
            continue;
        }
        keys.insert(k);
        if !trusted {
            // Adopted: written again, signed.
            loaded.missing.push(n.clone());
        }
        loaded.nonces.push(n);
    }
    if let Some(c) = &loaded.checkpoint {
        for n in &c.recent {
            if n.expires >= now && !keys.contains(&n.key()) {
                loaded.missing.push(n.clone());
                loaded.nonces.push(n.clone());
            }
        }
    }
    Ok(loaded)
}

/// A checkpoint that does not decode.
fn unreadable(e: String) -> BusError {
    BusError::Encode(format!("agent checkpoint unreadable: {e}"))
}

/// A newest signed checkpoint `c` below generation `top` (`known`: where that is
/// known from) is a rollback. What `recovery` takes instead: `best`, the signed
/// checkpoint of the highest generation (`newest_signed`), or `c` as it is
/// (`adopt_newest`); without one, the load fails.
fn rolled_back(
    module: &str,
    recovery: Option<StateRecovery>,
    c: Checkpoint,
    best: Option<Checkpoint>,
    top: u64,
    known: &str,
) -> Result<Checkpoint, BusError> {
    let why = format!(
        "the newest, generation {} by node `{}`, is older than generation {top} ({known}): a checkpoint written again later, or by a node cut off from its group",
        c.generation, c.writer
    );
    match (recovery, best) {
        (Some(StateRecovery::NewestSigned), Some(b)) => {
            tracing::error!(module, "kafka.state_recovery newest_signed: the agent checkpoint was rolled back ({why}); generation {} is taken and written again (remove the option once started)", b.generation);
            Ok(b)
        }
        (Some(StateRecovery::AdoptNewest), _) => {
            tracing::error!(module, "kafka.state_recovery adopt_newest: taking the newest agent checkpoint although it was rolled back ({why}); it is written again as the newest (remove the option once started)");
            Ok(c)
        }
        (recovery, _) => {
            let what = match recovery {
                Some(StateRecovery::NewestSigned) => "newest_signed finds no signed checkpoint of that generation in the topic (compacted away): adopt_newest takes the newest as it is",
                _ => "set kafka.state_recovery: newest_signed takes the highest generation's, adopt_newest the newest as it is",
            };
            Err(BusError::Untrusted(format!(
                "module {module}: the agent checkpoint was rolled back: {why}; {what}"
            )))
        }
    }
}

/// The newest checkpoint record is not signed by a listed node (`why`; `body`:
/// what it holds, if anything). What `recovery` takes instead, and whether it
/// is adopted as it is: `best`, the signed checkpoint of the highest generation
/// (`newest_signed`; never when the newest signed one, `signed`, does not
/// decode), or the record itself (`adopt_newest`); without one, the load fails.
fn unsigned_newest(
    module: &str,
    recovery: Option<StateRecovery>,
    why: &str,
    body: Option<Vec<u8>>,
    signed: Option<Result<Checkpoint, String>>,
    best: Option<Checkpoint>,
) -> Result<(Checkpoint, bool), BusError> {
    match (recovery, best, body) {
        // The newest signed one does not decode (a newer version's): taking an
        // older one would handle its commands again.
        (Some(StateRecovery::NewestSigned), _, _) if matches!(signed, Some(Err(_))) => {
            Err(unreadable(signed.and_then(Result::err).unwrap_or_default()))
        }
        (Some(StateRecovery::NewestSigned), Some(c), _) => {
            tracing::error!(module, "kafka.state_recovery newest_signed: the newest agent checkpoint is skipped ({why}); the signed one of the highest generation, {}, is taken and written again (remove the option once started)", c.generation);
            Ok((c, false))
        }
        (Some(StateRecovery::AdoptNewest), _, Some(b)) => {
            tracing::error!(module, "kafka.state_recovery adopt_newest: taking the newest agent checkpoint although no listed node signed it ({why}); it is written again signed (remove the option once started)");
            let mut c: Checkpoint =
                serde_json::from_slice(&b).map_err(|e| unreadable(e.to_string()))?;
            // Its state, offsets and nonces are taken; its record of the
            // deliveries each node decided is not: a node would write an audit
            // row of it, and the other nodes answer waiting requests from it.
            c.last.clear();
            // Nor its record of each node's forwards: an unsigned one could close
            // a node's numbering for good (a start far in the future).
            c.forwards.clear();
            Ok((c, true))
        }
        (recovery, _, _) => {
            let what = match recovery {
                Some(StateRecovery::NewestSigned) if signed.is_some() => "newest_signed finds no signed checkpoint before it as new as this node's journal knows was written: adopt_newest takes the newest as it is",
                Some(StateRecovery::NewestSigned) => "newest_signed finds no signed checkpoint before it",
                Some(StateRecovery::AdoptNewest) => "adopt_newest finds no checkpoint in it to adopt",
                None if signed.is_some() => "an older one is signed, but the newer may be genuine: set kafka.state_recovery",
                None => "none before it is signed: set kafka.state_recovery",
            };
            Err(BusError::Untrusted(format!(
                "module {module}: the newest agent checkpoint is not signed by a node of kafka.state_keys ({why}); {what}"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    /// A decided record over [`LAST_PAYLOAD_MAX`] is not kept whole, but what
    /// the checkpoint's readers need of it is: its digest (the topic check tells
    /// it from another record at its offset by it), and the command's issuer,
    /// nonce, request id, module and action (answers, rows written again). A
    /// small one is kept as it is.
    #[test]
    fn a_large_record_is_kept_as_its_digest_and_its_commands_names() {
        let c = Command {
            issuer: "dashboard".into(),
            nonce: 9,
            request_id: "req-9".into(),
            module: 1,
            action: 2,
            args: [("pad".to_owned(), "x".repeat(LAST_PAYLOAD_MAX))].into(),
            ..Command::default()
        };
        let big = prost::Message::encode_to_vec(&c);
        let (payload, omitted) = LastDecision::keep(&big);
        let o = omitted.clone().expect("omitted");
        assert!(payload.is_empty());
        assert_eq!(o.bytes, big.len() as u64);
        let last = LastDecision {
            position: Position {
                partition: 0,
                offset: 1,
            },
            outcome: "applied".into(),
            code: None,
            payload,
            omitted,
            requester: Requester::default(),
            forwarded_by: None,
        };
        assert_eq!(last.digest(), Some(gw_core::replay::digest(&big)));
        let named = last.command().expect("named");
        assert_eq!(
            (
                named.issuer.as_str(),
                named.nonce,
                named.request_id.as_str()
            ),
            ("dashboard", 9, "req-9")
        );
        assert_eq!((named.module, named.action), (1, 2));
        // As stored and read back.
        let back: LastDecision =
            serde_json::from_slice(&serde_json::to_vec(&last).unwrap()).unwrap();
        assert_eq!(back, last);
        // Junk: its digest, no command.
        let (_, junk) = LastDecision::keep(&vec![0xff; LAST_PAYLOAD_MAX + 1]);
        let junk = LastDecision {
            omitted: junk,
            ..last.clone()
        };
        assert!(junk.command().is_none() && junk.digest().is_some());
        // Small: kept whole.
        let (kept, none) = LastDecision::keep(b"small");
        assert_eq!((kept.as_slice(), none), (&b"small"[..], None));
    }

    #[test]
    fn a_nodes_forwards_are_taken_once_in_order_and_never_after_a_later_start() {
        use super::super::bus::ForwardSeq;
        let f = |epoch, seq| ForwardSeq { epoch, seq };
        let mut w = ForwardWindow::default();
        // Refusals are noted too, as the agent does (each is a decision).
        let take = |w: &mut ForwardWindow, x: ForwardSeq| {
            let r = w.check(x);
            w.note(x);
            r
        };
        let copy = |r: Result<(), Behind>| matches!(r, Err(Behind::Copy(_)));
        let overtaken = |r: Result<(), Behind>| matches!(r, Err(Behind::Overtaken(_)));
        assert!(take(&mut w, f(10, 5)).is_ok());
        assert!(copy(take(&mut w, f(10, 5))));
        // Gaps (other journal records, the other module's forwards) are normal.
        assert!(take(&mut w, f(10, 9)).is_ok());
        // One overtaken is refused (the module's order), and answered; a copy of
        // it after that is a copy.
        assert!(overtaken(take(&mut w, f(10, 7))));
        assert!(copy(take(&mut w, f(10, 7))));
        assert!(copy(take(&mut w, f(10, 9))));
        // Beyond the window: not known to be decided, refused all the same.
        assert!(take(&mut w, f(10, 9 + FORWARD_WINDOW)).is_ok());
        assert!(overtaken(take(&mut w, f(10, 9))));
        assert!(
            overtaken(take(&mut w, f(10, 10))),
            "just inside, never decided"
        );
        assert!(copy(take(&mut w, f(10, 10))));
        // A jump of more than the window forgets the bits (all below are old).
        assert!(take(&mut w, f(10, 10_000)).is_ok());
        assert!(overtaken(take(&mut w, f(10, 9_999))));
        // A later start resets the window; the earlier start is closed for good.
        assert!(take(&mut w, f(11, 1)).is_ok());
        let older = take(&mut w, f(10, 20_000));
        assert!(
            matches!(&older, Err(Behind::Overtaken(why)) if why.contains("later start")),
            "{older:?}"
        );
        assert!(copy(take(&mut w, f(11, 1))));
        assert!(take(&mut w, f(11, 2)).is_ok());
        // Kept in the checkpoint exactly (128 bits as a JSON number).
        w.note(f(11, 2 + FORWARD_WINDOW - 1));
        w.note(f(11, 2));
        let cp = Checkpoint {
            forwards: [("node-a".to_owned(), [(3, w)].into())].into(),
            ..Checkpoint::default()
        };
        let back: Checkpoint = serde_json::from_str(&serde_json::to_string(&cp).unwrap()).unwrap();
        assert_eq!(back, cp);
        assert_eq!(back.forwards["node-a"][&3].seen >> 127, 1);
        // A checkpoint written before forwards were numbered (no `forwards`)
        // reads as none seen.
        let old = serde_json::to_string(&Checkpoint::default()).unwrap();
        assert!(!old.contains("forwards"), "{old}");
        let old: Checkpoint = serde_json::from_str(&old).unwrap();
        assert!(old.forwards.is_empty());
    }

    const M: Module = Module::Mev;
    const T: &str = "control-commands-proto-state-mev";

    fn nonce(n: u64, expires: u64) -> StoredNonce {
        StoredNonce {
            issuer: "dashboard".into(),
            nonce: n,
            expires,
            chain: "a".into(),
            what: None,
        }
    }

    /// Node `me` (key seed 1 for `a`, 2 for `b`) in a cluster of `a` and `b`.
    fn node(me: &str, recovery: Option<StateRecovery>) -> StateSigner {
        let pk = |s: u8| hex::encode(SigningKey::from_bytes(&[s; 32]).verifying_key().as_bytes());
        let keys = [("a".to_owned(), pk(1)), ("b".to_owned(), pk(2))].into();
        let seed = if me == "a" { 1 } else { 2 };
        StateSigner::new(me, SigningKey::from_bytes(&[seed; 32]), &keys, recovery).unwrap()
    }

    /// A record written by `by`.
    fn rec<T: Serialize>(by: &StateSigner, k: &str, v: &T) -> Record {
        (
            k.into(),
            Some(by.seal(T, k, &serde_json::to_vec(v).unwrap())),
        )
    }

    /// A record as a client without a node's key writes it (bare JSON).
    fn forged<T: Serialize>(k: &str, v: &T) -> Record {
        (k.into(), Some(serde_json::to_vec(v).unwrap()))
    }

    fn checkpoint(writer: &str, next: i64) -> Checkpoint {
        let mut c = Checkpoint {
            writer: writer.into(),
            ..Checkpoint::default()
        };
        c.next.insert(0, next);
        c
    }

    fn untrusted(r: Result<Loaded, BusError>) -> String {
        match r {
            Err(BusError::Untrusted(e)) => e,
            o => panic!("{o:?}"),
        }
    }

    /// A checkpoint carries its writer's clock floor; one written before it
    /// existed reads as 0, and a floor of 0 is not written (older nodes read the
    /// record as before).
    #[test]
    fn the_checkpoints_clock_floor_is_optional_on_the_wire() {
        let mut c = checkpoint("a", 7);
        let old = serde_json::to_value(&c).unwrap();
        assert!(old.get("clock_floor").is_none());
        assert_eq!(
            serde_json::from_value::<Checkpoint>(old)
                .unwrap()
                .clock_floor,
            0
        );
        c.clock_floor = 1_750_000_123;
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["clock_floor"], 1_750_000_123);
        assert_eq!(serde_json::from_value::<Checkpoint>(v).unwrap(), c);
    }

    #[test]
    fn the_latest_value_of_each_key_wins_and_tombstones_forget() {
        let (a, b) = (node("a", None), node("b", None));
        let c = checkpoint("a", 7);
        let mut later = checkpoint("b", 9);
        later.recent.push_back(nonce(3, 200));
        let l = fold(
            vec![
                rec(&a, "state", &c),
                rec(&a, "n/dashboard/1", &nonce(1, 200)),
                rec(&a, "n/dashboard/2", &nonce(2, 50)),
                rec(&b, "state", &later),
                ("n/dashboard/1".into(), None),
            ],
            100,
            M,
            T,
            &a,
            0,
        )
        .unwrap();
        assert_eq!(l.checkpoint, Some(later));
        // 1 tombstoned, 2 expired, 3 only in `recent`: written again.
        assert_eq!(l.nonces, vec![nonce(3, 200)]);
        assert_eq!(l.missing, vec![nonce(3, 200)]);
        assert_eq!(l.expired, vec![("n/dashboard/2".to_string(), 50)]);
        assert_eq!((l.recovered, l.untrusted), (false, 0));
    }

    #[test]
    fn an_empty_topic_has_no_checkpoint() {
        let l = fold(Vec::new(), 0, M, T, &node("a", None), 0).unwrap();
        assert!(l.checkpoint.is_none() && l.nonces.is_empty());
    }

    #[test]
    fn an_unreadable_checkpoint_is_an_error_not_a_fresh_start() {
        let a = node("a", None);
        let l = fold(vec![rec(&a, "state", &checkpoint("a", 1))], 0, M, T, &a, 0).unwrap();
        assert_eq!(l.checkpoint, Some(checkpoint("a", 1)));
        let v = a.seal(T, "state", b"[]");
        assert!(matches!(
            fold(vec![("state".into(), Some(v))], 0, M, T, &a, 0),
            Err(BusError::Encode(_))
        ));
    }

    #[test]
    fn nonce_records_no_listed_node_signed_are_skipped() {
        let (a, b) = (node("a", None), node("b", None));
        let mut cp = checkpoint("b", 4);
        cp.recent.push_back(nonce(1, 200));
        // A signed record moved to another key is not that key's either.
        let moved = (
            "n/dashboard/5".to_owned(),
            rec(&b, "n/dashboard/1", &nonce(1, 200)).1,
        );
        for reader in [
            a.clone(),
            node("a", Some(StateRecovery::NewestSigned)),
            node("a", Some(StateRecovery::AdoptNewest)),
        ] {
            let l = fold(
                vec![
                    rec(&b, "n/dashboard/1", &nonce(1, 200)),
                    forged("n/dashboard/2", &nonce(2, 200)),
                    moved.clone(),
                    rec(&b, "state", &cp),
                ],
                100,
                M,
                T,
                &reader,
                0,
            )
            .unwrap();
            assert_eq!(l.checkpoint, Some(cp.clone()));
            assert_eq!(l.nonces, vec![nonce(1, 200)]);
            assert!(l.missing.is_empty() && !l.recovered);
            assert_eq!(l.untrusted, 2);
        }
    }

    #[test]
    fn an_untrusted_newest_checkpoint_stops_the_load_until_the_operator_says_what_to_take() {
        let (a, b) = (node("a", None), node("b", None));
        let genuine = checkpoint("b", 4);
        let mut more = checkpoint("b", 1_000);
        more.state.applied = 999;
        let relabelled = (
            "state".to_owned(),
            Some(a.seal(T, "state", &serde_json::to_vec(&more).unwrap())),
        );
        let other_topic = (
            "state".to_owned(),
            Some(b.seal(
                "elsewhere-state-mev",
                "state",
                &serde_json::to_vec(&more).unwrap(),
            )),
        );
        let stranger = StateSigner::new(
            "b",
            SigningKey::from_bytes(&[9; 32]),
            &BTreeMap::new(),
            None,
        )
        .unwrap();
        let attacks = [
            forged("state", &more),
            relabelled,
            other_topic,
            rec(&stranger, "state", &more),
            ("state".into(), None),
            ("state".into(), Some(b"\xff{".to_vec())),
        ];
        for (i, attack) in attacks.into_iter().enumerate() {
            let records = vec![rec(&b, "state", &genuine), attack];
            // The newer record may be genuine (a node not listed yet, an older
            // version): the older signed one is not taken on its own.
            let e = untrusted(fold(records.clone(), 100, M, T, &a, 0));
            assert!(
                e.contains("module mev") && e.contains("an older one is signed"),
                "{e}"
            );
            let l = fold(
                records.clone(),
                100,
                M,
                T,
                &node("a", Some(StateRecovery::NewestSigned)),
                0,
            )
            .unwrap();
            assert_eq!(l.checkpoint, Some(genuine.clone()));
            assert!(l.recovered);
            let adopt = fold(
                records,
                100,
                M,
                T,
                &node("a", Some(StateRecovery::AdoptNewest)),
                0,
            );
            if i < 4 {
                let l = adopt.unwrap();
                assert_eq!(l.checkpoint, Some(more.clone()), "attack {i}");
                assert!(l.recovered);
            } else {
                // A tombstone or garbage holds nothing to adopt.
                assert!(untrusted(adopt).contains("adopt_newest finds no checkpoint"));
            }
        }
    }

    #[test]
    fn state_written_before_signing_is_adopted_with_its_nonces_and_written_again() {
        let a = node("a", None);
        let mut old = checkpoint("a", 5);
        old.recent.push_back(nonce(4, 200));
        let mut with_last = old.clone();
        with_last.last.insert(
            "a".into(),
            LastDecision {
                position: Position {
                    partition: 0,
                    offset: 4,
                },
                outcome: "applied".into(),
                code: None,
                payload: b"anything".to_vec(),
                requester: gw_core::contract::Requester::default(),
                forwarded_by: None,
                omitted: None,
            },
        );
        // Nor its record of the nodes' forwards (a start far ahead would close
        // node a's numbering for good).
        with_last.forwards.insert(
            "a".into(),
            [(
                0,
                ForwardWindow {
                    epoch: u64::MAX,
                    top: 1,
                    seen: 1,
                },
            )]
            .into(),
        );
        let records = vec![
            forged("state", &with_last),
            forged("n/dashboard/3", &nonce(3, 200)),
        ];
        let e = untrusted(fold(records.clone(), 100, M, T, &a, 0));
        assert!(
            e.contains("not signed") && e.contains("none before it is signed"),
            "{e}"
        );
        let e = untrusted(fold(
            records.clone(),
            100,
            M,
            T,
            &node("a", Some(StateRecovery::NewestSigned)),
            0,
        ));
        assert!(
            e.contains("newest_signed finds no signed checkpoint"),
            "{e}"
        );
        let l = fold(
            records,
            100,
            M,
            T,
            &node("a", Some(StateRecovery::AdoptNewest)),
            0,
        )
        .unwrap();
        // Adopted without its record of each node's last decision (no audit row or
        // answer is made from an unsigned one) nor of its forwards.
        assert_eq!(l.checkpoint, Some(old));
        assert!(l.recovered);
        // Both nonces are remembered and written again, signed.
        assert_eq!(l.nonces, vec![nonce(3, 200), nonce(4, 200)]);
        assert_eq!(l.missing, vec![nonce(3, 200), nonce(4, 200)]);
    }

    /// A genuine checkpoint written again later is a rollback: not taken as the
    /// newest, whether the newer ones are still in the topic or only this node's
    /// journal knows of them (compacted away) — unless the operator says what to
    /// take. Two checkpoints of one generation (a write that timed out and
    /// landed, then made again) are not one.
    #[test]
    fn a_checkpoint_written_again_later_is_a_rollback_not_the_newest() {
        let a = node("a", None);
        let at = |next: i64, generation: u64| Checkpoint {
            generation,
            ..checkpoint("a", next)
        };
        let (one, two) = (at(1, 1), at(2, 2));
        let replayed = vec![
            rec(&a, "state", &one),
            rec(&a, "state", &two),
            rec(&a, "state", &one),
        ];
        let e = untrusted(fold(replayed.clone(), 100, M, T, &a, 0));
        assert!(
            e.contains("rolled back")
                && e.contains("generation 1 by node `a`")
                && e.contains("older than generation 2 (a signed checkpoint before it"),
            "{e}"
        );
        let take = |records: &[Record], recovery, floor| {
            fold(
                records.to_vec(),
                100,
                M,
                T,
                &node("a", Some(recovery)),
                floor,
            )
            .unwrap()
        };
        // newest_signed: the highest generation; adopt_newest: the newest as it
        // is, numbered as the highest (written again one above it).
        let l = take(&replayed, StateRecovery::NewestSigned, 0);
        assert_eq!((l.checkpoint, l.recovered), (Some(two.clone()), true));
        let l = take(&replayed, StateRecovery::AdoptNewest, 0);
        assert_eq!((l.checkpoint, l.recovered), (Some(at(1, 2)), true));

        // Compacted: only the replayed record is left; the journal knows better.
        let compacted = vec![rec(&a, "state", &one)];
        let e = untrusted(fold(compacted.clone(), 100, M, T, &a, 2));
        assert!(
            e.contains("this node's journal knows it was written"),
            "{e}"
        );
        let e = untrusted(fold(
            compacted.clone(),
            100,
            M,
            T,
            &node("a", Some(StateRecovery::NewestSigned)),
            2,
        ));
        assert!(e.contains("compacted away"), "{e}");
        let l = take(&compacted, StateRecovery::AdoptNewest, 2);
        assert_eq!(l.checkpoint, Some(at(1, 2)));
        // At the journal's generation, or above it: the newest.
        for floor in [0, 1] {
            let l = fold(compacted.clone(), 100, M, T, &a, floor).unwrap();
            assert_eq!((l.checkpoint, l.recovered), (Some(one.clone()), false));
        }
        // Not below the journal either when something unsigned is newest.
        let forged_tail = vec![rec(&a, "state", &one), forged("state", &two)];
        let e = untrusted(fold(
            forged_tail,
            100,
            M,
            T,
            &node("a", Some(StateRecovery::NewestSigned)),
            2,
        ));
        assert!(e.contains("as new as this node's journal"), "{e}");

        // One generation twice: the newer of them, no rollback.
        let again = at(3, 2);
        let l = fold(
            vec![rec(&a, "state", &two), rec(&a, "state", &again)],
            100,
            M,
            T,
            &a,
            2,
        )
        .unwrap();
        assert_eq!(l.checkpoint, Some(again));

        // Forged after a replay: newest_signed takes the highest, not the replay.
        let mut both = replayed;
        both.push(forged("state", &at(9, 9)));
        let l = take(&both, StateRecovery::NewestSigned, 0);
        assert_eq!(l.checkpoint, Some(two.clone()));
        // An adopted unsigned checkpoint's own number is not believed (it could
        // be u64::MAX, leaving no number above it).
        let l = take(&both, StateRecovery::AdoptNewest, 0);
        assert_eq!(l.checkpoint.map(|c| c.generation), Some(2));

        // The newest signed one does not decode (a newer version's) and an
        // unsigned one follows: newest_signed takes no older one instead.
        let undecodable: Record = ("state".into(), Some(a.seal(T, "state", b"[]")));
        let records = vec![rec(&a, "state", &one), undecodable, forged("state", &two)];
        let reader = node("a", Some(StateRecovery::NewestSigned));
        assert!(matches!(
            fold(records, 100, M, T, &reader, 0),
            Err(BusError::Encode(_))
        ));
    }

    /// Generations go up from the one before, and start at the clock (in µs): a
    /// numbering begun afresh is above an old one.
    #[test]
    fn a_generation_is_above_the_last_and_at_least_the_clock() {
        let now_us = crate::now_nanos() / 1_000;
        assert!(next_generation(0) >= now_us);
        assert!(next_generation(5) >= now_us);
        let ahead = now_us + 3_600_000_000;
        assert_eq!(next_generation(ahead), ahead + 1);
        assert_eq!(next_generation(u64::MAX), u64::MAX);
    }
}
