//! The command bus between admission (HTTP) and the module agents.
//!
//! Two implementations with the same semantics: one topic of exact signed command
//! bytes keyed by module, read by one consumer group per module
//! (`ctrl-proto-{module}`), each delivery committed only after the agent applied and
//! audited it (at-least-once; the agents drop duplicates by nonce). Admission does
//! not publish itself: its journal transaction holds the command
//! ([`crate::journal::txn::PublishEntry`]) with its ledger rows and its nonce, so a
//! command is accepted and on its way in one durable step, or not at all.
//! - [`Bus::in_process`], the embedded default: the journal *is* the log; a
//!   command's offset is its record's LSN, and an agent's consumed offset is in its
//!   own journal transaction. Crash-safe like Kafka: what was accepted is delivered
//!   after a restart, again if it was not committed.
//! - [`Bus::kafka`]: `rdkafka`, idempotent producer with `acks=all`; the topic is
//!   created when missing. Journalled commands are forwarded to the topic in order
//!   (an outbox, forwarded by [`KafkaBus`]'s own task); one not yet forwarded at a crash is forwarded after
//!   the restart. The agents keep module state in Kafka too
//!   ([`super::kafka_state`]), so any node's agent can take a module over.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gw_core::contract::Requester;
use gw_core::Module;

use super::kafka_state::KafkaState;
use super::state_sign::StateSigner;
use crate::journal::txn::PublishEntry;
use crate::journal::{self, Journal, Lsn, Sink, Txn};
use crate::ops::metrics::GroupMetrics;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::Deserialize;
use tokio::sync::Notify;

/// The original topic name.
pub const DEFAULT_TOPIC: &str = "control-commands-proto";

/// Kafka settings (`kafka` in the sidecar's config file).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`, e.g. `127.0.0.1:9092`.
    pub brokers: String,
    /// Topic of signed command bytes.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// The command topic's partitions: the sidecar creates the topic with this
    /// many, and forwards each module's commands to one of them (the same on
    /// every node: give every node the same value, at most the topic's count).
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor when the sidecar creates the topic.
    #[serde(default = "default_replication")]
    pub replication: i32,
    /// How long the forwarder's send of a command waits for `acks=all` before it
    /// is tried again (requests do not wait for it).
    #[serde(default = "default_message_timeout")]
    pub message_timeout_ms: u64,
    /// Consumer group session timeout (tansu wants ≥ 6000 with several members).
    #[serde(default = "default_session_timeout")]
    pub session_timeout_ms: u64,
    /// How long an agent's consumer may go without polling before librdkafka
    /// takes it out of the group (`max.poll.interval.ms`; at least
    /// `session_timeout_ms`). An agent retrying a delivery goes back to poll
    /// after half of it, so that a rebalance is served, not missed.
    #[serde(default = "default_max_poll_interval")]
    pub max_poll_interval_ms: u64,
    /// Records per produce batch (`batch.num.messages`). 1 by default: a consumer
    /// then resumes at any committed offset even on a broker that serves fetches
    /// only from a batch's first offset (tansu 0.6.0 returns nothing for an offset
    /// inside a batch, then the next batch: the rest of the batch is skipped).
    /// Apache Kafka serves the whole batch; raise it there for throughput.
    #[serde(default = "default_batch_messages")]
    pub batch_messages: u32,
    /// librdkafka debug contexts for every client (e.g. `cgrp,fetch`), logged at
    /// debug level under `librdkafka`.
    #[serde(default)]
    pub debug: Option<String>,
    /// The nodes whose module state records (`{topic}-state-*`) and forwarded
    /// commands are trusted: node id → the Ed25519 public key (hex) of its state
    /// key. Empty: this node alone. Every node of a cluster lists every node,
    /// itself included.
    #[serde(default)]
    pub state_keys: std::collections::BTreeMap<String, String>,
    /// What a load takes when a module's newest checkpoint is not signed by a
    /// listed node (unset: nothing; the module's agent waits). The node then writes
    /// what it took again, signed. Remove it once the node has started.
    #[serde(default)]
    pub state_recovery: Option<super::state_sign::StateRecovery>,
    /// Apply commands on the command topic that no gateway node of
    /// `kafka.state_keys` forwarded (published there by another client, e.g. the
    /// original Python API), audited without a requester. Off: they are refused
    /// (`forbidden_peer`), each with its audit row.
    #[serde(default)]
    pub accept_unforwarded: bool,
    /// TLS to the brokers (`security.protocol=ssl`), for every client the sidecar
    /// makes. Unset: plain text.
    #[serde(default)]
    pub tls: Option<crate::tls::ClientTls>,
    /// Commands accepted and not yet taken by the broker, at most (each kept in
    /// memory until it is): beyond it a command is refused 503 `unavailable`
    /// (send the same bytes again later).
    #[serde(default = "default_max_outbox_commands")]
    pub max_outbox_commands: u64,
    /// The same bound in bytes of signed commands.
    #[serde(default = "default_max_outbox_bytes")]
    pub max_outbox_bytes: u64,
}

fn default_max_outbox_commands() -> u64 {
    10_000
}
fn default_max_outbox_bytes() -> u64 {
    64 << 20
}

fn default_topic() -> String {
    DEFAULT_TOPIC.into()
}
fn default_partitions() -> i32 {
    1
}
fn default_replication() -> i32 {
    1
}
fn default_message_timeout() -> u64 {
    5000
}
fn default_batch_messages() -> u32 {
    1
}
fn default_session_timeout() -> u64 {
    6000
}
fn default_max_poll_interval() -> u64 {
    300_000
}

impl KafkaConfig {
    /// Defaults for `brokers`.
    pub fn with_brokers(brokers: &str) -> KafkaConfig {
        KafkaConfig {
            brokers: brokers.into(),
            topic: default_topic(),
            partitions: default_partitions(),
            replication: default_replication(),
            message_timeout_ms: default_message_timeout(),
            session_timeout_ms: default_session_timeout(),
            max_poll_interval_ms: default_max_poll_interval(),
            batch_messages: default_batch_messages(),
            debug: None,
            state_keys: std::collections::BTreeMap::new(),
            state_recovery: None,
            accept_unforwarded: false,
            tls: None,
            max_outbox_commands: default_max_outbox_commands(),
            max_outbox_bytes: default_max_outbox_bytes(),
        }
    }

    /// How the clients reach the brokers, for a person: `plain text`, `TLS`, or
    /// `mutual TLS`.
    pub fn transport(&self) -> &'static str {
        crate::tls::ClientTls::transport(self.tls.as_ref())
    }

    /// An idempotent producer's configuration (`acks=all`, no linger).
    pub fn producer(&self) -> ClientConfig {
        let mut c = self.client();
        c.set("enable.idempotence", "true")
            .set("message.max.bytes", MESSAGE_MAX_BYTES.to_string())
            .set("acks", "all")
            .set("linger.ms", "0")
            .set("batch.num.messages", self.batch_messages.max(1).to_string())
            .set("message.timeout.ms", self.message_timeout_ms.to_string());
        c
    }

    /// Creates `topics`; one that exists already is fine.
    pub async fn create_topics(&self, topics: &[NewTopic<'_>]) -> Result<(), BusError> {
        let admin: AdminClient<DefaultClientContext> = self.client().create()?;
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(5)));
        for result in admin.create_topics(topics, &opts).await? {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(BusError::CreateTopic { topic, code }),
            }
        }
        Ok(())
    }

    /// A client configuration for the brokers (with `debug` when set).
    pub fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        if let Some(t) = &self.tls {
            c.set("security.protocol", "ssl")
                .set("ssl.ca.location", t.ca.display().to_string())
                // The broker's certificate must name the host dialled.
                .set("ssl.endpoint.identification.algorithm", "https");
            if let (Some(cert), Some(key)) = (&t.cert, &t.key) {
                c.set("ssl.certificate.location", cert.display().to_string())
                    .set("ssl.key.location", key.display().to_string());
            }
        }
        if let Some(d) = &self.debug {
            c.set("debug", d);
        }
        c
    }
}

/// Why the bus failed; every variant means "nothing was published / read".
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Kafka refused or timed out.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The broker refused to create the topic.
    #[error("kafka: create topic {topic}: {code}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// The broker's answer.
        code: RDKafkaErrorCode,
    },
    /// A record could not be encoded or read (agent state).
    #[error("kafka: {0}")]
    Encode(String),
    /// The agent state in Kafka is not signed by a node of `kafka.state_keys`.
    #[error("kafka: {0}")]
    Untrusted(String),
    /// The idempotent producer failed fatally (a fresh one serves the next request).
    #[error("kafka producer failed ({code}): {reason}")]
    ProducerFailed {
        /// librdkafka's code.
        code: RDKafkaErrorCode,
        /// Its reason.
        reason: String,
    },
}

pub use crate::journal::txn::Position;

/// One command read by a module's consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message key (the module name the publisher gave).
    pub key: Vec<u8>,
    /// The exact signed bytes.
    pub payload: Vec<u8>,
    /// Who sent it, as the edge verified it (Kafka headers `gw-requester*`;
    /// empty when [`Origin::Unverified`]).
    pub requester: Requester,
    /// Where it was read.
    pub position: Position,
    /// Who put it on the bus.
    pub origin: Origin,
}

/// Who put a delivery on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// This node's journal (the embedded bus), or a decision written again from
    /// the module's checkpoint.
    Local,
    /// A gateway node of `kafka.state_keys`, which admitted it: its signature over
    /// the topic, the record key, the command, the requester and the forward's
    /// place in the node's sequence (headers `gw-node`, `gw-node-seq`,
    /// `gw-node-sig`) verifies.
    Node {
        /// The node.
        node: String,
        /// Where this forward is in the node's sequence.
        forward: ForwardSeq,
    },
    /// Not forwarded by a listed node (published to the command topic some other
    /// way): refused by the agent unless `accepted` (`kafka.accept_unforwarded`).
    Unverified {
        /// Why.
        why: String,
        /// `kafka.accept_unforwarded`.
        accepted: bool,
    },
}

/// Where one forward is in its node's sequence: `epoch` is the start of the node
/// that accepted the command (fixed while it runs, grows with each start:
/// [`forward_epoch`]), `seq` the command's journal LSN. A command keeps its number
/// wherever it is sent again — a send that failed, or one whose `forwarded` mark a
/// crash lost — and a node hands its records to its idempotent producer in journal
/// order, so they reach a partition in number order. Agents apply a node's
/// forwards only in that order ([`super::kafka_state::ForwardWindow`]): a second
/// copy of a record that reached the topic, however late and whether or not its
/// nonce is still remembered, and a record that a later one overtook, are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, Deserialize)]
pub struct ForwardSeq {
    /// The accepting start (µs since the epoch, or one more than the last start's).
    pub epoch: u64,
    /// The command's journal LSN.
    pub seq: u64,
}

impl ForwardSeq {
    /// `{epoch}.{seq}`, as in the header.
    fn header(self) -> String {
        format!("{}.{}", self.epoch, self.seq)
    }

    fn parse(h: &str) -> Option<ForwardSeq> {
        let (e, s) = h.split_once('.')?;
        Some(ForwardSeq {
            epoch: gw_core::contract::decimal_u64(e)?,
            seq: gw_core::contract::decimal_u64(s)?,
        })
    }
}

/// The file in the state directory holding the last start's forward epoch.
pub const EPOCH_FILE: &str = "forward.epoch";

/// This start's forward epoch: the time in µs, or one more than the last start's
/// when the clock went back (kept in `{state_dir}/forward.epoch`, written before
/// the node forwards anything). Other nodes refuse forwards from an epoch older
/// than one they saw from this node, so it must never go back.
pub fn forward_epoch(state_dir: &std::path::Path) -> std::io::Result<u64> {
    let path = state_dir.join(EPOCH_FILE);
    let last = match std::fs::read_to_string(&path) {
        Ok(t) => t.trim().parse::<u64>().map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let epoch = now.max(last.saturating_add(1));
    crate::durable::write_atomic(&path, epoch.to_string().as_bytes())?;
    Ok(epoch)
}

/// Kafka header names carrying the requester.
const H_SUB: &str = "gw-requester";
const H_ROLES: &str = "gw-requester-roles";
const H_ISS: &str = "gw-token-issuer";
/// Kafka header names of the forwarding node and its signature.
const H_NODE: &str = "gw-node";
const H_NODE_SIG: &str = "gw-node-sig";
const H_NODE_SEQ: &str = "gw-node-seq";

/// What a forwarding node signs: the topic and partition, the record key, the
/// command, who sent it, and the forward's place in the node's sequence.
fn forward_parts<'a>(
    topic: &'a str,
    partition: &'a str,
    key: &'a [u8],
    payload: &'a [u8],
    r: &'a Requester,
    seq: &'a str,
) -> [&'a [u8]; 8] {
    [
        topic.as_bytes(),
        partition.as_bytes(),
        key,
        payload,
        r.sub.as_bytes(),
        r.roles.as_bytes(),
        r.token_issuer.as_bytes(),
        seq.as_bytes(),
    ]
}

/// The partition of the command topic a node forwards a command keyed `key`
/// to, of `partitions` (`kafka.partitions`): CRC-32 of the key, as librdkafka's
/// default partitioner picks. Chosen (and signed) by the node, so that a copy
/// put in another partition does not verify.
pub fn partition_of(key: &[u8], partitions: i32) -> i32 {
    let n = u32::try_from(partitions.max(1)).unwrap_or(1);
    i32::try_from(crc32fast::hash(key) % n).unwrap_or(0)
}

/// The producer's `message.max.bytes` (librdkafka's default, under a broker's
/// default of 1 048 588), set so that [`MAX_COMMAND_BYTES`] is judged against
/// what is in force.
pub const MESSAGE_MAX_BYTES: usize = 1_000_000;

/// The largest command body the sidecar takes on the Kafka bus
/// (`max_body_bytes` is refused above it): with its headers (the requester's
/// fields from a token of at most 64 KiB, the node's signature) and the
/// record's framing it fits [`MESSAGE_MAX_BYTES`]. A record the producer
/// refuses for its size would be retried forever at the head of the outbox,
/// holding every command after it.
pub const MAX_COMMAND_BYTES: usize = 896 << 10;

/// The headers of a command this node forwards to partition `partition` of the
/// command topic `topic` as its forward `seq`: who sent it (`gw-requester*`)
/// and this node's signature over them, the topic, the partition, the key, the
/// command and `seq` (`gw-node`, `gw-node-seq`, `gw-node-sig`).
pub fn forward_headers(
    signer: &StateSigner,
    topic: &str,
    partition: i32,
    key: &[u8],
    payload: &[u8],
    r: &Requester,
    seq: ForwardSeq,
) -> OwnedHeaders {
    let seq = seq.header();
    let partition = partition.to_string();
    let sig = signer.sign_forward(&forward_parts(topic, &partition, key, payload, r, &seq));
    let mut h = OwnedHeaders::new();
    for (key, v) in [
        (H_SUB, r.sub.as_str()),
        (H_ROLES, r.roles.as_str()),
        (H_ISS, r.token_issuer.as_str()),
        (H_NODE, signer.me()),
        (H_NODE_SEQ, seq.as_str()),
        (H_NODE_SIG, sig.as_str()),
    ] {
        if !v.is_empty() {
            h = h.insert(Header {
                key,
                value: Some(v.as_bytes()),
            });
        }
    }
    h
}

/// Who put `m` on the command topic, and who sent it (empty unless a listed node
/// forwarded it).
fn origin_of(m: &impl Message, signer: &StateSigner, accept: bool) -> (Origin, Requester) {
    let requester = requester_of(m);
    let verdict = match (
        last_header(m, H_NODE),
        last_header(m, H_NODE_SIG),
        last_header(m, H_NODE_SEQ),
    ) {
        (Some(node), Some(sig), Some(seq)) => signer
            .verify_forward(
                &node,
                &sig,
                &forward_parts(
                    m.topic(),
                    &m.partition().to_string(),
                    m.key().unwrap_or_default(),
                    m.payload().unwrap_or_default(),
                    &requester,
                    &seq,
                ),
            )
            .and_then(|()| {
                ForwardSeq::parse(&seq)
                    .ok_or_else(|| "its forward sequence is not EPOCH.SEQ".to_owned())
            })
            .map(|forward| (node, forward)),
        (Some(_), Some(_), None) => {
            Err("no forward sequence (forwarded by a node before 2026-12-05?)".to_owned())
        }
        _ => Err("no gateway node's signature (not forwarded by a node)".to_owned()),
    };
    match verdict {
        Ok((node, forward)) => (Origin::Node { node, forward }, requester),
        Err(why) => (
            Origin::Unverified {
                why,
                accepted: accept,
            },
            Requester::default(),
        ),
    }
}

/// The value of `m`'s last header `name` (one without a value: empty).
fn last_header(m: &impl Message, name: &str) -> Option<String> {
    m.headers().and_then(|h| {
        h.iter()
            .filter(|hd| hd.key == name)
            .last()
            .map(|hd| String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned())
    })
}

fn requester_of(m: &impl Message) -> Requester {
    let get = |name| last_header(m, name).unwrap_or_default();
    Requester {
        sub: get(H_SUB),
        roles: get(H_ROLES),
        token_issuer: get(H_ISS),
    }
}

/// The bus (cheap to clone).
#[derive(Clone)]
pub enum Bus {
    /// Embedded, in-process.
    InProcess(Arc<InProcess>),
    /// Kafka through `rdkafka`.
    Kafka(Arc<KafkaBus>),
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe().as_str())
    }
}

impl Bus {
    /// The embedded bus over the journal: `records` are what the journal recovered
    /// (commands not yet consumed are delivered again; each module's consumed
    /// position is in its agent's records).
    pub fn in_process(records: &[(Lsn, Txn)]) -> Bus {
        let b = InProcess::default();
        let next = consumed_positions(records);
        {
            let mut log = lock(&b.log);
            for m in Module::ALL {
                log.next.insert(m, next.get(&m).copied().unwrap_or(0));
            }
        }
        for (lsn, t) in records {
            b.committed(*lsn, t);
        }
        Bus::InProcess(Arc::new(b))
    }

    /// A Kafka bus; `records` are what the journal recovered (commands accepted but
    /// not yet forwarded are forwarded first). Creating the clients does not need a
    /// broker; [`Bus::prepare`] creates the topic once one answers.
    /// `epoch` is this start's forward epoch ([`forward_epoch`]).
    pub fn kafka(
        cfg: KafkaConfig,
        signer: super::state_sign::StateSigner,
        epoch: u64,
        records: &[(Lsn, Txn)],
    ) -> Result<Bus, BusError> {
        let producer = ProducerSlot::new(&cfg)?;
        let outbox = Outbox::default();
        let mut forwarded = std::collections::BTreeSet::new();
        for (_, t) in records {
            for e in &t.entries {
                if let journal::Entry::Forwarded { lsn } = e {
                    forwarded.insert(*lsn);
                }
            }
        }
        for (lsn, t) in records {
            if !forwarded.contains(lsn) {
                outbox.committed(*lsn, t);
            }
        }
        Ok(Bus::Kafka(Arc::new(KafkaBus {
            state: Arc::new(KafkaState::new(&cfg, signer)?),
            cfg,
            producer,
            outbox: Arc::new(outbox),
            epoch,
        })))
    }

    /// Kafka bus: the gauge of commands journalled and not yet on the topic
    /// (`gw_sidecar_kafka_outbox_commands`).
    pub fn outbox_gauge(&self) -> Option<prometheus_client::metrics::gauge::Gauge> {
        match self {
            Bus::InProcess(_) => None,
            Bus::Kafka(k) => Some(k.outbox.waiting.clone()),
        }
    }

    /// Kafka bus: this start's forward epoch, which the commands it accepts are
    /// journalled with ([`PublishEntry::forward_epoch`]).
    pub fn forward_epoch(&self) -> Option<u64> {
        match self {
            Bus::InProcess(_) => None,
            Bus::Kafka(k) => Some(k.epoch),
        }
    }

    /// Kafka bus: why no more commands are accepted now — the broker has not
    /// taken `kafka.max_outbox_commands` (or `max_outbox_bytes`) of those
    /// accepted before — if it has not.
    pub fn outbox_full(&self) -> Option<String> {
        let Bus::Kafka(k) = self else {
            return None;
        };
        let (n, bytes) = k.outbox.size();
        (n >= k.cfg.max_outbox_commands || bytes >= k.cfg.max_outbox_bytes).then(|| {
            format!(
                "the Kafka broker has not taken the {n} commands ({bytes} bytes) accepted before (kafka.max_outbox_commands {}, max_outbox_bytes {})",
                k.cfg.max_outbox_commands, k.cfg.max_outbox_bytes
            )
        })
    }

    /// The journal sink that feeds the bus: the embedded log, or Kafka's outbox.
    pub fn sink(&self) -> Arc<dyn Sink> {
        match self {
            Bus::InProcess(b) => b.clone(),
            Bus::Kafka(k) => k.outbox.clone(),
        }
    }

    /// Kafka: forwards the journal's commands to the topic, in order, for as long
    /// as it runs (the embedded bus needs nothing).
    pub fn start(&self, journal: &Journal) -> Option<tokio::task::JoinHandle<()>> {
        match self {
            Bus::InProcess(b) => {
                b.set_journal(journal.clone());
                None
            }
            Bus::Kafka(k) => Some(tokio::spawn(k.clone().forward(journal.clone()))),
        }
    }

    /// A line for logs.
    pub fn describe(&self) -> String {
        match self {
            Bus::InProcess(_) => "in-process bus".into(),
            Bus::Kafka(k) => format!(
                "kafka {} ({}) topic {}",
                k.cfg.brokers,
                k.cfg.transport(),
                k.cfg.topic
            ),
        }
    }

    /// Makes the bus ready (creates the Kafka topics if missing). Idempotent.
    pub async fn prepare(&self) -> Result<(), BusError> {
        match self {
            Bus::InProcess(_) => Ok(()),
            Bus::Kafka(k) => {
                k.create_topic().await?;
                k.state.prepare().await
            }
        }
    }

    /// Where agents keep module state (Kafka; the embedded bus keeps it in the
    /// journal).
    pub fn agent_state(&self) -> Option<Arc<KafkaState>> {
        match self {
            Bus::InProcess(_) => None,
            Bus::Kafka(k) => Some(k.state.clone()),
        }
    }

    /// A consumer in group `ctrl-proto-{module}`, starting at the group's committed
    /// position (or the beginning). `metrics` shows how many partitions of the
    /// module's commands it consumes (the embedded bus: its one; Kafka: what the
    /// group assigned it, 0 on a standby node — and on every node while the group
    /// has not assigned the partition to anyone) and counts the group's rebalances.
    pub fn consumer(&self, module: Module, metrics: GroupMetrics) -> Result<BusConsumer, BusError> {
        let GroupMetrics { held, rebalances } = metrics;
        let group = group_name(module);
        match self {
            Bus::InProcess(b) => {
                held.set(1);
                Ok(BusConsumer::InProcess {
                    bus: b.clone(),
                    next: b.next_for(module),
                    module,
                })
            }
            Bus::Kafka(k) => {
                held.set(0);
                let assigned = Arc::new(AtomicBool::new(false));
                let c: StreamConsumer<AssignWatch> = k
                    .cfg
                    .client()
                    .set("group.id", &group)
                    .set("enable.auto.commit", "false")
                    .set("enable.auto.offset.store", "false")
                    .set("auto.offset.reset", "earliest")
                    .set("session.timeout.ms", k.cfg.session_timeout_ms.to_string())
                    .set(
                        "max.poll.interval.ms",
                        k.cfg
                            .max_poll_interval_ms
                            .max(k.cfg.session_timeout_ms)
                            .to_string(),
                    )
                    .create_with_context(AssignWatch {
                        module,
                        assigned: assigned.clone(),
                        held,
                        rebalances,
                    })?;
                c.subscribe(&[&k.cfg.topic])?;
                Ok(BusConsumer::Kafka {
                    consumer: CloseOffRuntime::new(c),
                    topic: k.cfg.topic.clone(),
                    polled_at: Instant::now(),
                    max_unpolled: Duration::from_millis(
                        k.cfg.max_poll_interval_ms.max(k.cfg.session_timeout_ms) / 2,
                    ),
                    assigned,
                    signer: k.state.shared_signer(),
                    accept_unforwarded: k.cfg.accept_unforwarded,
                })
            }
        }
    }
}

/// Raises a flag when the group assigns the consumer partitions (the agent then
/// loads the module's state again: another node may have moved it on), and keeps
/// the count of partitions held in a gauge (the group's rebalances are rare: each
/// is logged).
pub struct AssignWatch {
    module: Module,
    assigned: Arc<AtomicBool>,
    held: Gauge,
    rebalances: Counter,
}

impl ClientContext for AssignWatch {}

impl ConsumerContext for AssignWatch {
    /// Called after the client assigned or revoked: the gauge is read from the
    /// consumer's assignment itself (right under eager and cooperative
    /// rebalancing alike, and after a failed rebalance, which unassigns).
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let held = consumer.assignment().map_or(0, |t| t.count());
        self.held.set(i64::try_from(held).unwrap_or(i64::MAX));
        let module = self.module.as_str();
        match rebalance {
            Rebalance::Assign(tpl) => {
                self.rebalances.inc();
                tracing::info!(
                    module,
                    partitions = held,
                    "consumer group rebalanced: this node's agent holds {held} command partition(s)"
                );
                if tpl.count() > 0 {
                    self.assigned.store(true, Ordering::SeqCst);
                }
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(
                    module,
                    revoked = tpl.count(),
                    "command partitions revoked from this node's agent"
                );
            }
            // The client library logs the error itself.
            Rebalance::Error(_) => {}
        }
    }
}

/// How long a Kafka consumer's `recv` waits before it polls again.
const REPOLL: Duration = Duration::from_secs(1);

/// The consumer group of a module's agents.
pub fn group_name(module: Module) -> String {
    format!("ctrl-proto-{}", module.as_str())
}

/// The Kafka side.
pub struct KafkaBus {
    cfg: KafkaConfig,
    /// The agents' state topics.
    state: Arc<KafkaState>,
    /// Replaced when the idempotent producer fails fatally.
    producer: ProducerSlot,
    /// Journalled commands not yet on the topic.
    outbox: Arc<Outbox>,
    /// This start's forward epoch ([`forward_epoch`]).
    epoch: u64,
}

/// Failed sends in a row after which the producer is recreated.
const RECREATE_AFTER_FAILURES: u32 = 3;

/// An idempotent producer, replaced by a fresh one when it cannot go on: it
/// failed fatally (an idempotent producer that did never sends again), or it
/// keeps failing (it may hold state a broker that restarted without its log no
/// longer knows, and answers UNKNOWN_PRODUCER_ID to forever). The command
/// forwarder and the agents' state records each have one.
pub(crate) struct ProducerSlot {
    cfg: KafkaConfig,
    current: Mutex<Arc<FutureProducer>>,
    /// Failed sends (or windows) in a row, per topic: the commands' and each
    /// module's state topic share the producer, and one that goes on failing is
    /// not reset by another's successes.
    failures: FailureCounts,
}

/// Failures in a row, per topic.
#[derive(Default)]
struct FailureCounts(Mutex<std::collections::HashMap<String, u32>>);

impl FailureCounts {
    fn succeeded(&self, topic: &str) {
        lock(&self.0).remove(topic);
    }

    /// One more failure on `topic`: `true` when it is time to start afresh (once
    /// when failures start, then every few).
    fn failed(&self, topic: &str) -> bool {
        let mut m = lock(&self.0);
        let n = m.entry(topic.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        *n == RECREATE_AFTER_FAILURES || n.is_multiple_of(4 * RECREATE_AFTER_FAILURES)
    }
}

impl ProducerSlot {
    pub(crate) fn new(cfg: &KafkaConfig) -> Result<ProducerSlot, BusError> {
        Ok(ProducerSlot {
            cfg: cfg.clone(),
            current: Mutex::new(Arc::new(cfg.producer().create()?)),
            failures: FailureCounts::default(),
        })
    }

    /// The producer for the next sends.
    pub(crate) fn current(&self) -> Arc<FutureProducer> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A fresh producer for the next sends.
    pub(crate) fn replace(&self) -> Result<(), BusError> {
        let fresh = Arc::new(self.cfg.producer().create()?);
        *self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
        Ok(())
    }

    /// A send (or window) to `topic` went through.
    pub(crate) fn succeeded(&self, topic: &str) {
        self.failures.succeeded(topic);
    }

    /// After a failed send: `Ok(true)` when the producer was replaced because it
    /// failed fatally.
    pub(crate) fn replace_if_fatal(&self, what: &str) -> Result<bool, BusError> {
        let Some((code, reason)) = self.current().client().fatal_error() else {
            return Ok(false);
        };
        tracing::error!(%code, %reason, producer = what, "kafka producer failed fatally; recreating it");
        self.replace()?;
        Ok(true)
    }

    /// After a failed send to `topic` that was not fatal: `true` when it is time
    /// to start afresh (once when its failures start, then every few).
    pub(crate) fn keeps_failing(&self, topic: &str) -> bool {
        self.failures.failed(topic)
    }
}

/// Journalled commands waiting to be forwarded to Kafka, in journal order.
#[derive(Default)]
pub struct Outbox {
    queue: Mutex<Queued>,
    grew: Notify,
    /// `gw_sidecar_kafka_outbox_commands`: the queue's length.
    waiting: prometheus_client::metrics::gauge::Gauge,
}

/// The outbox's commands, in journal order, and their bytes.
#[derive(Default)]
struct Queued {
    commands: VecDeque<(Lsn, PublishEntry)>,
    bytes: u64,
}

impl Outbox {
    /// Takes the first `n` commands off the queue (the broker took them).
    fn forwarded(&self, n: usize) {
        let mut q = lock(&self.queue);
        for _ in 0..n {
            if let Some((_, p)) = q.commands.pop_front() {
                q.bytes -= p.payload.len() as u64;
            }
        }
        self.waiting
            .set(i64::try_from(q.commands.len()).unwrap_or(i64::MAX));
    }

    /// The commands queued, and their bytes.
    fn size(&self) -> (u64, u64) {
        let q = lock(&self.queue);
        (q.commands.len() as u64, q.bytes)
    }
}

impl Sink for Outbox {
    fn committed(&self, lsn: Lsn, txn: &Txn) {
        let mut q = lock(&self.queue);
        for e in &txn.entries {
            if let journal::Entry::Publish(p) = e {
                q.bytes += p.payload.len() as u64;
                q.commands.push_back((lsn, p.clone()));
            }
        }
        self.waiting
            .set(i64::try_from(q.commands.len()).unwrap_or(i64::MAX));
        drop(q);
        self.grew.notify_one();
    }

    /// The oldest command not yet forwarded, as the writer sees it after each
    /// batch (the forwarder's own hold lags).
    fn hold(&self) -> Lsn {
        lock(&self.queue)
            .commands
            .front()
            .map_or(Lsn::MAX, |(l, _)| *l)
    }
}

/// The journal hold of commands not yet forwarded or consumed.
const BUS_HOLD: &str = "bus";

/// How many commands the forwarder sends before it waits for their acks.
const FORWARD_WINDOW: usize = 64;

impl KafkaBus {
    async fn create_topic(&self) -> Result<(), BusError> {
        self.cfg
            .create_topics(&[NewTopic::new(
                &self.cfg.topic,
                self.cfg.partitions,
                TopicReplication::Fixed(self.cfg.replication),
            )])
            .await
    }

    /// Hands the command journalled at `lsn` to `producer` as this node's forward
    /// `lsn` (not waiting for the broker). The same command always goes out with the
    /// same number, at every attempt and after a restart, so a second copy of one
    /// that reached the topic is known as one by the agents.
    fn hand_over(
        &self,
        producer: &FutureProducer,
        lsn: Lsn,
        p: &PublishEntry,
    ) -> Result<rdkafka::producer::DeliveryFuture, KafkaError> {
        let key = p.module.as_str().as_bytes();
        // Every node spreads the modules over the same partitions:
        // `kafka.partitions`, not what a broker said when it last asked.
        let partition = partition_of(key, self.cfg.partitions);
        let seq = ForwardSeq {
            epoch: p.forward_epoch.unwrap_or(self.epoch),
            seq: lsn,
        };
        let record = FutureRecord::to(&self.cfg.topic)
            .partition(partition)
            .key(key)
            .payload(&p.payload)
            .headers(forward_headers(
                self.state.signer(),
                &self.cfg.topic,
                partition,
                key,
                &p.payload,
                &p.requester,
                seq,
            ));
        producer.send_result(record).map_err(|(e, _)| e)
    }

    /// Sends `window` (the outbox's oldest commands, in journal order) and says
    /// how many of its first ones the broker took, and the first failure, if any.
    /// Commands are handed to the one idempotent producer in journal order, and
    /// none after one it refused, so a module's commands reach its partition in
    /// journal order; the next window starts from the first that failed.
    async fn send_window(&self, window: &[(Lsn, PublishEntry)]) -> (usize, Option<KafkaError>) {
        let producer = self.producer.current();
        let mut deliveries = Vec::with_capacity(window.len());
        let mut refused = None;
        for (lsn, p) in window {
            match self.hand_over(&producer, *lsn, p) {
                Ok(d) => deliveries.push(d),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        let results = futures_util::future::join_all(deliveries).await;
        let mut taken = 0;
        let mut failed = None;
        for r in results {
            match r {
                Ok(Ok(_)) if failed.is_none() => taken += 1,
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    failed.get_or_insert(e);
                }
                Err(_) => {
                    failed.get_or_insert(KafkaError::Canceled);
                }
            }
        }
        (taken, failed.or(refused))
    }

    /// After a window that failed with `e`: a fresh producer when the one in use
    /// cannot go on, and the topic created when the broker does not have it.
    async fn after_failure(&self, e: &KafkaError) -> Result<(), BusError> {
        if self.producer.replace_if_fatal("commands")? {
            return Ok(());
        }
        match e {
            // A broker that lost the topic (or never had it). A producer that met
            // the broker before the topic existed may be unknown to the new
            // partitions (tansu answers its sends with UNKNOWN_PRODUCER_ID): start
            // afresh.
            KafkaError::MessageProduction(
                RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic,
            ) => {
                self.create_topic().await?;
                self.producer.replace()
            }
            // A full local queue: wait for it to drain.
            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => Ok(()),
            _ => {
                // A producer that keeps failing may hold state the broker no longer
                // knows (a broker that restarted without its log answers every
                // send with UNKNOWN_PRODUCER_ID): start afresh, once when failures
                // start, then every few windows.
                if self.producer.keeps_failing(&self.cfg.topic) {
                    tracing::warn!(error = %e, "kafka producer keeps failing; recreating it");
                    if let Err(e) = self.create_topic().await {
                        tracing::debug!(error = %e, "topic not created");
                    }
                    self.producer.replace()?;
                }
                Ok(())
            }
        }
    }

    /// Forwards the outbox to the topic forever, in journal order, a window of up
    /// to [`FORWARD_WINDOW`] in flight at a time; what the broker took is marked
    /// in the journal so a restart does not send it again. A command whose mark
    /// was lost (a crash just after the broker took it) is sent again after the
    /// restart with the same number, and the agents refuse that copy.
    async fn forward(self: Arc<Self>, journal: Journal) {
        let mut last_err = String::new();
        loop {
            let woke = self.outbox.grew.notified();
            let window: Vec<(Lsn, PublishEntry)> = {
                let q = &lock(&self.outbox.queue).commands;
                journal.hold(BUS_HOLD, q.front().map_or(Lsn::MAX, |(l, _)| *l));
                q.iter().take(FORWARD_WINDOW).cloned().collect()
            };
            if window.is_empty() {
                woke.await;
                continue;
            }
            let (taken, failed) = self.send_window(&window).await;
            if taken > 0 {
                self.outbox.forwarded(taken);
                journal.commit_detached(Txn::of(
                    window[..taken]
                        .iter()
                        .map(|(lsn, _)| journal::Entry::Forwarded { lsn: *lsn })
                        .collect(),
                ));
            }
            match failed {
                None => {
                    self.producer.succeeded(&self.cfg.topic);
                    last_err.clear();
                }
                Some(e) => {
                    let shown = e.to_string();
                    if shown != last_err {
                        tracing::warn!(error = %shown, forwarded = taken, "commands wait in the journal for Kafka");
                        last_err = shown;
                    }
                    if let Err(e) = self.after_failure(&e).await {
                        tracing::warn!(error = %e, "kafka producer not recreated");
                    }
                    if taken == 0 {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            }
        }
    }

    /// Waits for every queued message (shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<(), BusError> {
        self.producer.current().flush(timeout).map_err(Into::into)
    }
}

/// The embedded bus: the journal's commands, per module in journal order, from
/// each module's consumed position on.
#[derive(Default)]
pub struct InProcess {
    log: Mutex<Log>,
    grew: Notify,
    journal: Mutex<Option<Journal>>,
}

#[derive(Default)]
struct Log {
    /// Commands not yet consumed, per module.
    queues: BTreeMap<Module, VecDeque<(Lsn, PublishEntry)>>,
    /// Each module's next offset to consume.
    next: BTreeMap<Module, Lsn>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Each module's next offset to consume, from its agent's recovered records.
fn consumed_positions(records: &[(Lsn, Txn)]) -> BTreeMap<Module, Lsn> {
    let mut next = BTreeMap::new();
    for (_, t) in records {
        for e in &t.entries {
            let (m, n) = match e {
                journal::Entry::Agent(a) => match a.offset {
                    Some(o) => (a.module, o + 1),
                    None => continue,
                },
                journal::Entry::Snapshot(s) => match s.next_offset {
                    Some(n) => (s.module, n),
                    None => continue,
                },
                _ => continue,
            };
            let v = next.entry(m).or_insert(0);
            *v = (*v).max(n);
        }
    }
    next
}

impl Sink for InProcess {
    fn committed(&self, lsn: Lsn, txn: &Txn) {
        let mut log = lock(&self.log);
        let mut grew = false;
        for e in &txn.entries {
            if let journal::Entry::Publish(p) = e {
                if lsn >= log.next.get(&p.module).copied().unwrap_or(0) {
                    log.queues
                        .entry(p.module)
                        .or_default()
                        .push_back((lsn, p.clone()));
                    grew = true;
                }
            }
        }
        drop(log);
        if grew {
            self.grew.notify_waiters();
        }
    }

    /// The oldest command not yet consumed, as the writer sees it after each batch
    /// (the hold set as agents consume lags a command published into an empty
    /// queue).
    fn hold(&self) -> Lsn {
        lock(&self.log)
            .queues
            .values()
            .filter_map(|q| q.front().map(|(l, _)| *l))
            .min()
            .unwrap_or(Lsn::MAX)
    }
}

impl InProcess {
    fn set_journal(&self, j: Journal) {
        *lock(&self.journal) = Some(j);
        self.release();
    }

    fn next_for(&self, m: Module) -> Lsn {
        lock(&self.log).next.get(&m).copied().unwrap_or(0)
    }

    fn read(&self, m: Module, from: Lsn) -> Option<Delivery> {
        let log = lock(&self.log);
        let (lsn, p) = log.queues.get(&m)?.iter().find(|(l, _)| *l >= from)?;
        Some(Delivery {
            key: p.module.as_str().as_bytes().to_vec(),
            payload: p.payload.clone(),
            requester: p.requester.clone(),
            position: Position {
                partition: 0,
                offset: i64::try_from(*lsn).unwrap_or(i64::MAX),
            },
            origin: Origin::Local,
        })
    }

    /// Module `m` consumed everything before `next` (its agent's journal record
    /// says so): drop it, and let the journal drop it too.
    fn commit(&self, m: Module, next: Lsn) {
        let mut log = lock(&self.log);
        let n = log.next.entry(m).or_insert(0);
        *n = (*n).max(next);
        if let Some(q) = log.queues.get_mut(&m) {
            while q.front().is_some_and(|(l, _)| *l < next) {
                q.pop_front();
            }
        }
        drop(log);
        self.release();
    }

    fn release(&self) {
        // Set under the log's lock: two agents releasing at once cannot set an
        // older hold after a newer one.
        let log = lock(&self.log);
        let low = log
            .queues
            .values()
            .filter_map(|q| q.front().map(|(l, _)| *l))
            .min()
            .unwrap_or(Lsn::MAX);
        if let Some(j) = lock(&self.journal).as_ref() {
            j.hold(BUS_HOLD, low);
        }
        drop(log);
    }

    /// Commands not yet consumed (every module).
    pub fn retained(&self) -> usize {
        lock(&self.log).queues.values().map(VecDeque::len).sum()
    }
}

/// A module's consumer.
pub enum BusConsumer {
    /// Embedded.
    InProcess {
        /// The bus.
        bus: Arc<InProcess>,
        /// The module.
        module: Module,
        /// Next offset to read.
        next: Lsn,
    },
    /// Kafka.
    Kafka {
        /// The consumer (shared with blocking commits).
        consumer: CloseOffRuntime<StreamConsumer<AssignWatch>>,
        /// Topic.
        topic: String,
        /// When [`BusConsumer::next`] last returned (librdkafka serves a
        /// rebalance, and counts the application alive, only while polled).
        polled_at: Instant,
        /// Half of `max.poll.interval.ms`: see [`BusConsumer::poll_overdue`].
        max_unpolled: Duration,
        /// Set when partitions were assigned since the last look.
        assigned: Arc<AtomicBool>,
        /// Verifies the forwarding node's signature.
        signer: Arc<StateSigner>,
        /// `kafka.accept_unforwarded`.
        accept_unforwarded: bool,
    },
}

/// A Kafka consumer whose drop runs on its own thread: closing a consumer waits for
/// the group coordinator, which never answers while the broker is down, and must
/// not hold up a tokio runtime (or a process) that is shutting down.
pub struct CloseOffRuntime<C: Send + Sync + 'static>(Option<Arc<C>>);

impl<C: Send + Sync + 'static> CloseOffRuntime<C> {
    /// Owns `c` until dropped.
    pub fn new(c: C) -> Self {
        CloseOffRuntime(Some(Arc::new(c)))
    }
}

impl<C: Send + Sync + 'static> std::ops::Deref for CloseOffRuntime<C> {
    type Target = Arc<C>;
    fn deref(&self) -> &Self::Target {
        // Only `drop` takes the consumer out.
        self.0
            .as_ref()
            .unwrap_or_else(|| unreachable!("consumer taken before drop"))
    }
}

impl<C: Send + Sync + 'static> Drop for CloseOffRuntime<C> {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            std::thread::spawn(move || drop(c));
        }
    }
}

impl BusConsumer {
    /// Whether partitions were assigned since the last call (Kafka).
    pub fn take_assigned(&self) -> bool {
        match self {
            BusConsumer::InProcess { .. } => false,
            BusConsumer::Kafka { assigned, .. } => assigned.swap(false, Ordering::SeqCst),
        }
    }

    /// Whether `d`'s partition is still assigned to this consumer (always, for
    /// the embedded bus). Not when librdkafka found the assignment lost (the
    /// consumer left the group for not polling within `max.poll.interval.ms`,
    /// or its session ended): the partition may be another node's already,
    /// though the revocation is only handed over at the next poll and the
    /// assignment still lists it until then.
    pub fn owns(&self, d: &Delivery) -> bool {
        match self {
            BusConsumer::InProcess { .. } => true,
            BusConsumer::Kafka {
                consumer, topic, ..
            } => {
                !consumer.assignment_lost()
                    && consumer
                        .assignment()
                        .is_ok_and(|a| a.find_partition(topic, d.position.partition).is_some())
            }
        }
    }

    /// Kafka: whether the consumer went unpolled for half of
    /// `max.poll.interval.ms` (an agent retrying a delivery): it must poll before
    /// it writes again, or librdkafka takes it out of the group while it still
    /// believes it owns the partition. Never on the embedded bus.
    pub fn poll_overdue(&self) -> bool {
        match self {
            BusConsumer::InProcess { .. } => false,
            BusConsumer::Kafka {
                polled_at,
                max_unpolled,
                ..
            } => polled_at.elapsed() >= *max_unpolled,
        }
    }

    /// The next delivery (waits for one).
    pub async fn next(&mut self) -> Result<Delivery, BusError> {
        match self {
            BusConsumer::InProcess { bus, module, next } => loop {
                let grew = bus.grew.notified();
                if let Some(d) = bus.read(*module, *next) {
                    *next = u64::try_from(d.position.offset).unwrap_or(0) + 1;
                    return Ok(d);
                }
                grew.await;
            },
            BusConsumer::Kafka {
                consumer,
                signer,
                accept_unforwarded,
                polled_at,
                ..
            } => {
                // Polled again every second: after a rebalance a message can sit in
                // the consumer's queue without waking a pending `recv` (seen with
                // two group members: an assigned partition that never delivered).
                let m = loop {
                    let m = tokio::time::timeout(REPOLL, consumer.recv()).await;
                    *polled_at = Instant::now();
                    if let Ok(m) = m {
                        break m?;
                    }
                };
                let (origin, requester) = origin_of(&m, signer, *accept_unforwarded);
                Ok(Delivery {
                    key: m.key().unwrap_or_default().to_vec(),
                    payload: m.payload().unwrap_or_default().to_vec(),
                    requester,
                    position: Position {
                        partition: m.partition(),
                        offset: m.offset(),
                    },
                    origin,
                })
            }
        }
    }

    /// The next delivery if one is ready now and its command is at most
    /// `max_bytes` (the embedded bus; always `None` on Kafka, whose agents take one
    /// delivery at a time). One that is larger stays for the next read.
    pub fn ready(&mut self, max_bytes: usize) -> Option<Delivery> {
        match self {
            BusConsumer::InProcess { bus, module, next } => {
                let d = bus
                    .read(*module, *next)
                    .filter(|d| d.payload.len() <= max_bytes)?;
                *next = u64::try_from(d.position.offset).unwrap_or(0) + 1;
                Some(d)
            }
            BusConsumer::Kafka { .. } => None,
        }
    }

    /// Kafka: reads `partition` again from `offset` (what was fetched beyond it
    /// is not delivered). Nothing on the embedded bus, whose agents start at the
    /// offset they journalled.
    pub fn rewind(&self, partition: i32, offset: i64) -> Result<(), BusError> {
        match self {
            BusConsumer::InProcess { .. } => Ok(()),
            BusConsumer::Kafka {
                consumer, topic, ..
            } => {
                consumer.seek(
                    topic,
                    partition,
                    Offset::Offset(offset),
                    Duration::from_secs(1),
                )?;
                Ok(())
            }
        }
    }

    /// Commits `d` (and everything before it in its partition) for this group
    /// (Kafka: sent asynchronously, never blocks).
    pub async fn commit(&self, d: &Delivery) -> Result<(), BusError> {
        match self {
            BusConsumer::InProcess { bus, module, .. } => {
                bus.commit(*module, u64::try_from(d.position.offset).unwrap_or(0) + 1);
                Ok(())
            }
            BusConsumer::Kafka {
                consumer, topic, ..
            } => {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(
                    topic,
                    d.position.partition,
                    Offset::Offset(d.position.offset + 1),
                )?;
                // Asynchronous: a synchronous commit waits without limit for a
                // broker that may be gone (and would hold a thread and shutdown
                // with it). The agent already applied and persisted this delivery,
                // so a commit lost to a crash only means a redelivery, which the
                // agent drops by nonce.
                consumer.commit(&tpl, CommitMode::Async)?;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// The producer is shared by the commands' topic and every module's state
    /// topic: a topic that keeps failing reaches the count that recreates the
    /// producer however often the others succeed in between.
    #[test]
    fn a_topic_that_keeps_failing_is_counted_apart_from_the_others() {
        let counts = super::FailureCounts::default();
        let n = super::RECREATE_AFTER_FAILURES;
        let mut recreated = 0;
        for _ in 0..(4 * n) {
            recreated += u32::from(counts.failed("state-mev"));
            counts.succeeded("commands");
            counts.succeeded("state-arbitrage");
        }
        assert_eq!(
            recreated,
            2,
            "once when failures start, then every {}",
            4 * n
        );
        counts.succeeded("state-mev");
        let first: Vec<bool> = (0..n).map(|_| counts.failed("state-mev")).collect();
        assert_eq!(first.iter().filter(|b| **b).count(), 1);
        assert!(first[n as usize - 1], "counted from the last success");
    }

    use super::*;
    use crate::journal::txn::AgentEntry;
    use crate::journal::Options;

    #[test]
    fn a_forward_verifies_only_with_the_topic_command_and_requester_its_node_signed() {
        use rdkafka::message::{OwnedMessage, Timestamp};

        let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        let signer =
            StateSigner::new("node-a", key, &std::collections::BTreeMap::new(), None).unwrap();
        let alice = Requester {
            sub: "alice".into(),
            roles: "admin".into(),
            token_issuer: "https://idp".into(),
        };
        let msg = |topic: &str, payload: &[u8], headers: OwnedHeaders| {
            OwnedMessage::new(
                Some(payload.to_vec()),
                Some(b"mev".to_vec()),
                topic.into(),
                Timestamp::NotAvailable,
                0,
                7,
                Some(headers),
            )
        };
        let seq = ForwardSeq { epoch: 7, seq: 3 };
        let genuine = forward_headers(&signer, "cmds", 0, b"mev", b"cmd", &alice, seq);
        assert_eq!(
            origin_of(&msg("cmds", b"cmd", genuine.clone()), &signer, false),
            (
                Origin::Node {
                    node: "node-a".into(),
                    forward: seq
                },
                alice.clone()
            )
        );
        let refused = |m: OwnedMessage, accept: bool| {
            let (o, r) = origin_of(&m, &signer, accept);
            assert_eq!(r, Requester::default(), "the claimed requester is dropped");
            match o {
                Origin::Unverified { why, accepted } => {
                    assert_eq!(accepted, accept);
                    why
                }
                o => panic!("{o:?}"),
            }
        };
        // Another topic, another command, another partition.
        refused(msg("elsewhere", b"cmd", genuine.clone()), false);
        let moved = OwnedMessage::new(
            Some(b"cmd".to_vec()),
            Some(b"mev".to_vec()),
            "cmds".into(),
            Timestamp::NotAvailable,
            1,
            7,
            Some(genuine.clone()),
        );
        refused(moved, false);
        refused(msg("cmds", b"other", genuine.clone()), true);
        // A second `gw-requester` (the last one counts) or another requester.
        let appended = genuine.clone().insert(Header {
            key: H_SUB,
            value: Some("mallory"),
        });
        refused(msg("cmds", b"cmd", appended), false);
        let mallory = Requester {
            sub: "mallory".into(),
            ..alice.clone()
        };
        let mut swapped = OwnedHeaders::new();
        for h in genuine.iter() {
            let value = if h.key == H_SUB {
                Some(b"mallory".as_slice())
            } else {
                h.value
            };
            swapped = swapped.insert(Header { key: h.key, value });
        }
        assert_eq!(requester_of(&msg("cmds", b"cmd", swapped.clone())), mallory);
        refused(msg("cmds", b"cmd", swapped), false);
        // Another place in the node's sequence (a later number on an old
        // forward), or none.
        let renumbered = genuine.clone().insert(Header {
            key: H_NODE_SEQ,
            value: Some("7.900"),
        });
        refused(msg("cmds", b"cmd", renumbered), false);
        let mut unnumbered = OwnedHeaders::new();
        for h in genuine.iter().filter(|h| h.key != H_NODE_SEQ) {
            unnumbered = unnumbered.insert(Header {
                key: h.key,
                value: h.value,
            });
        }
        let why = refused(msg("cmds", b"cmd", unnumbered), false);
        assert!(why.contains("no forward sequence"), "{why}");
        // No node headers, or a node header without a value.
        let why = refused(msg("cmds", b"cmd", OwnedHeaders::new()), false);
        assert!(why.contains("no gateway node"), "{why}");
        let sig = last_header(&msg("cmds", b"cmd", genuine), H_NODE_SIG).unwrap();
        let empty = OwnedHeaders::new()
            .insert(Header::<&[u8]> {
                key: H_NODE,
                value: None,
            })
            .insert(Header {
                key: H_NODE_SIG,
                value: Some(sig.as_str()),
            })
            .insert(Header {
                key: H_NODE_SEQ,
                value: Some("7.3"),
            });
        let why = refused(msg("cmds", b"cmd", empty), false);
        assert!(why.contains("does not list"), "{why}");
    }

    #[test]
    fn a_modules_commands_go_to_one_partition_as_librdkafka_would_put_them() {
        // librdkafka's `consistent_random`: CRC-32 (IEEE) of the key modulo the
        // partitions (the check value of CRC-32 over "123456789" is cbf43926).
        assert_eq!(crc32fast::hash(b"123456789"), 0xcbf4_3926);
        for key in [b"mev".as_slice(), b"arbitrage"] {
            assert_eq!(partition_of(key, 1), 0);
            let n = 7;
            assert_eq!(
                partition_of(key, n),
                i32::try_from(crc32fast::hash(key) % 7).unwrap()
            );
        }
        assert_eq!(partition_of(b"mev", 0), 0, "never out of range");
    }

    #[test]
    fn a_forward_sequence_header_is_two_decimal_numbers() {
        assert_eq!(
            ForwardSeq::parse("1764900000000000.42"),
            Some(ForwardSeq {
                epoch: 1_764_900_000_000_000,
                seq: 42
            })
        );
        for bad in [
            "",
            ".",
            "1.",
            ".1",
            "1.2.3",
            "+1.2",
            "1.-2",
            " 1.2",
            "0x1.2",
            "99999999999999999999.1",
            "1.2 ",
        ] {
            assert_eq!(ForwardSeq::parse(bad), None, "{bad:?}");
        }
        let f = ForwardSeq { epoch: 9, seq: 1 };
        assert_eq!(ForwardSeq::parse(&f.header()), Some(f));
    }

    #[test]
    fn each_start_forwards_from_a_later_epoch_even_when_the_clock_went_back() {
        let dir = std::env::temp_dir().join(format!("gw-epoch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = forward_epoch(&dir).unwrap();
        let second = forward_epoch(&dir).unwrap();
        assert!(second > first);
        // A clock far behind the last start's epoch: one more than it.
        let ahead = u64::MAX / 2;
        std::fs::write(dir.join(EPOCH_FILE), ahead.to_string()).unwrap();
        assert_eq!(forward_epoch(&dir).unwrap(), ahead + 1);
        assert_eq!(
            std::fs::read_to_string(dir.join(EPOCH_FILE)).unwrap(),
            (ahead + 1).to_string()
        );
        // A file that is not a number stops the start rather than guess.
        std::fs::write(dir.join(EPOCH_FILE), "garbage").unwrap();
        assert!(forward_epoch(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn publish(m: Module, payload: u8) -> Txn {
        Txn::of(vec![journal::Entry::Publish(PublishEntry {
            module: m,
            payload: vec![payload],
            requester: Requester::default(),
            forward_epoch: None,
        })])
    }

    fn consumed(m: Module, offset: i64) -> Txn {
        Txn::of(vec![journal::Entry::Agent(AgentEntry {
            refused: None,
            module: m,
            kafka: None,
            offset: Some(u64::try_from(offset).unwrap()),
            state: None,
            applied: None,
            generation: None,
        })])
    }

    /// The embedded bus delivers the journal's commands per module in order, and
    /// after a restart delivers again exactly what was not consumed.
    #[tokio::test]
    async fn the_embedded_bus_resumes_after_the_last_consumed_command() {
        let d = testkit::TempDir::new("bus-journal");
        let opened = Journal::open(d.path(), Options::default()).unwrap();
        let bus = Bus::in_process(&opened.records);
        let j = opened.start(None, vec![bus.sink()]).unwrap();
        bus.start(&j);
        let mut mev = bus.consumer(Module::Mev, GroupMetrics::default()).unwrap();
        let mut arb = bus
            .consumer(Module::Arbitrage, GroupMetrics::default())
            .unwrap();
        for (m, p) in [(Module::Mev, 0), (Module::Arbitrage, 1), (Module::Mev, 2)] {
            j.commit(publish(m, p)).await.unwrap();
        }
        let a = mev.next().await.unwrap();
        assert_eq!(
            (a.payload.clone(), a.key.clone()),
            (vec![0], b"mev".to_vec())
        );
        j.commit(consumed(Module::Mev, a.position.offset))
            .await
            .unwrap();
        mev.commit(&a).await.unwrap();
        let b = mev.next().await.unwrap();
        assert_eq!(b.payload, vec![2]);
        assert_eq!(arb.next().await.unwrap().payload, vec![1]);
        let Bus::InProcess(inner) = &bus else {
            unreachable!()
        };
        assert_eq!(
            inner.retained(),
            2,
            "mev's second and arbitrage's first are not consumed"
        );
        // A journal has one writer: the old one ends before the directory reopens.
        j.stop();
        drop((mev, arb, bus, j));

        // Restart: mev's first is consumed; its second and arbitrage's come again.
        let opened = Journal::open(d.path(), Options::default()).unwrap();
        let bus = Bus::in_process(&opened.records);
        let j = opened.start(None, vec![bus.sink()]).unwrap();
        bus.start(&j);
        let mut mev = bus.consumer(Module::Mev, GroupMetrics::default()).unwrap();
        let mut arb = bus
            .consumer(Module::Arbitrage, GroupMetrics::default())
            .unwrap();
        assert_eq!(mev.next().await.unwrap().payload, vec![2]);
        assert_eq!(arb.next().await.unwrap().payload, vec![1]);
        // A new command reaches a waiting consumer.
        let waiter = tokio::spawn(async move { mev.next().await.map(|d| d.payload) });
        j.commit(publish(Module::Mev, 9)).await.unwrap();
        assert_eq!(waiter.await.unwrap().unwrap(), vec![9]);
    }
}
