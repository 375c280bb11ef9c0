//! The command bus between admission (HTTP) and the module agents.
//!
//! Two implementations with the same semantics: one topic of exact signed command
//! bytes keyed by module, read by one consumer group per module
//! (`ctrl-proto-{module}`), each delivery committed only after the agent applied and
//! audited it (at-least-once; the agents drop duplicates by nonce).
//! - [`Bus::kafka`]: `rdkafka`, idempotent producer with `acks=all`; the topic is
//!   created when missing.
//! - [`Bus::in_process`]: the embedded default when no brokers are configured.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gw_core::contract::Requester;
use gw_core::Module;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
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
    /// Partitions when the sidecar creates the topic.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor when the sidecar creates the topic.
    #[serde(default = "default_replication")]
    pub replication: i32,
    /// How long a publish may wait for `acks=all` before the request gets 503.
    #[serde(default = "default_message_timeout")]
    pub message_timeout_ms: u64,
    /// Consumer group session timeout (tansu wants ≥ 6000 with several members).
    #[serde(default = "default_session_timeout")]
    pub session_timeout_ms: u64,
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
fn default_session_timeout() -> u64 {
    6000
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
        }
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
    /// The idempotent producer failed fatally (a fresh one serves the next request).
    #[error("kafka producer failed ({code}): {reason}")]
    ProducerFailed {
        /// librdkafka's code.
        code: RDKafkaErrorCode,
        /// Its reason.
        reason: String,
    },
}

/// Where a published command landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Position {
    /// Partition.
    pub partition: i32,
    /// Offset in the partition.
    pub offset: i64,
}

/// One command read by a module's consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message key (the module name the publisher gave).
    pub key: Vec<u8>,
    /// The exact signed bytes.
    pub payload: Vec<u8>,
    /// Who sent it, as the edge verified it (Kafka headers `gw-requester*`).
    pub requester: Requester,
    /// Where it was read.
    pub position: Position,
}

/// Kafka header names carrying the requester.
const H_SUB: &str = "gw-requester";
const H_ROLES: &str = "gw-requester-roles";
const H_ISS: &str = "gw-token-issuer";

fn requester_headers(r: &Requester) -> OwnedHeaders {
    let mut h = OwnedHeaders::new();
    for (key, v) in [
        (H_SUB, &r.sub),
        (H_ROLES, &r.roles),
        (H_ISS, &r.token_issuer),
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

fn requester_of(m: &impl Message) -> Requester {
    let mut r = Requester::default();
    if let Some(h) = m.headers() {
        for i in 0..h.count() {
            let hd = h.get(i);
            let v = String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned();
            match hd.key {
                H_SUB => r.sub = v,
                H_ROLES => r.roles = v,
                H_ISS => r.token_issuer = v,
                _ => {}
            }
        }
    }
    r
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
    /// The embedded bus.
    pub fn in_process() -> Bus {
        // Every module's group exists from the start, so nothing is trimmed before
        // a group that has not read yet got to it.
        let log = Log {
            committed: Module::ALL.iter().map(|m| (group_name(*m), 0)).collect(),
            ..Log::default()
        };
        Bus::InProcess(Arc::new(InProcess {
            log: Mutex::new(log),
            grew: Notify::new(),
        }))
    }

    /// A Kafka bus. Creating the clients does not need a broker; [`Bus::prepare`]
    /// creates the topic once one answers.
    pub fn kafka(cfg: KafkaConfig) -> Result<Bus, BusError> {
        let producer = Mutex::new(Arc::new(KafkaBus::producer(&cfg)?));
        Ok(Bus::Kafka(Arc::new(KafkaBus { cfg, producer })))
    }

    /// A line for logs.
    pub fn describe(&self) -> String {
        match self {
            Bus::InProcess(_) => "in-process bus".into(),
            Bus::Kafka(k) => format!("kafka {} topic {}", k.cfg.brokers, k.cfg.topic),
        }
    }

    /// Makes the bus ready (creates the Kafka topic if missing). Idempotent.
    pub async fn prepare(&self) -> Result<(), BusError> {
        match self {
            Bus::InProcess(_) => Ok(()),
            Bus::Kafka(k) => k.create_topic().await,
        }
    }

    /// Publishes the exact signed bytes keyed by module, with who sent them;
    /// returns once the bus holds them (Kafka: acknowledged by all in-sync replicas).
    pub async fn publish(
        &self,
        module: Module,
        payload: &[u8],
        requester: &Requester,
    ) -> Result<Position, BusError> {
        match self {
            Bus::InProcess(b) => Ok(b.publish(module.as_str().as_bytes(), payload, requester)),
            Bus::Kafka(k) => {
                k.publish(module.as_str().as_bytes(), payload, requester)
                    .await
            }
        }
    }

    /// A consumer in group `ctrl-proto-{module}`, starting at the group's committed
    /// position (or the beginning).
    pub fn consumer(&self, module: Module) -> Result<BusConsumer, BusError> {
        let group = group_name(module);
        match self {
            Bus::InProcess(b) => Ok(BusConsumer::InProcess {
                bus: b.clone(),
                next: b.committed(&group),
                group,
            }),
            Bus::Kafka(k) => {
                let c: StreamConsumer = ClientConfig::new()
                    .set("bootstrap.servers", &k.cfg.brokers)
                    .set("group.id", &group)
                    .set("enable.auto.commit", "false")
                    .set("enable.auto.offset.store", "false")
                    .set("auto.offset.reset", "earliest")
                    .set("session.timeout.ms", k.cfg.session_timeout_ms.to_string())
                    .create()?;
                c.subscribe(&[&k.cfg.topic])?;
                Ok(BusConsumer::Kafka {
                    consumer: CloseOffRuntime(Some(Arc::new(c))),
                    topic: k.cfg.topic.clone(),
                })
            }
        }
    }
}

/// The consumer group of a module's agents.
pub fn group_name(module: Module) -> String {
    format!("ctrl-proto-{}", module.as_str())
}

/// The Kafka side.
pub struct KafkaBus {
    cfg: KafkaConfig,
    /// Replaced when the idempotent producer fails fatally.
    producer: Mutex<Arc<FutureProducer>>,
}

impl KafkaBus {
    fn producer(cfg: &KafkaConfig) -> Result<FutureProducer, BusError> {
        Ok(ClientConfig::new()
            .set("bootstrap.servers", &cfg.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "0")
            .set("message.timeout.ms", cfg.message_timeout_ms.to_string())
            .create()?)
    }

    fn current(&self) -> Arc<FutureProducer> {
        self.producer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    async fn create_topic(&self) -> Result<(), BusError> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.cfg.brokers)
            .create()?;
        let topic = NewTopic::new(
            &self.cfg.topic,
            self.cfg.partitions,
            TopicReplication::Fixed(self.cfg.replication),
        );
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(5)));
        for result in admin.create_topics([&topic], &opts).await? {
            match result {
                Ok(_) => {}
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(BusError::CreateTopic { topic, code }),
            }
        }
        Ok(())
    }

    async fn publish(
        &self,
        key: &[u8],
        payload: &[u8],
        requester: &Requester,
    ) -> Result<Position, BusError> {
        let mut created = false;
        loop {
            let producer = self.current();
            let record = FutureRecord::to(&self.cfg.topic)
                .key(key)
                .payload(payload)
                .headers(requester_headers(requester));
            let wait = Duration::from_millis(self.cfg.message_timeout_ms);
            let sent = producer.send(record, wait).await;
            if let Some((code, reason)) = producer.client().fatal_error() {
                // An idempotent producer that failed fatally cannot send again: the
                // next request gets a fresh one. This request fails (it may not have
                // been written, and is not retried here).
                tracing::error!(%code, %reason, "kafka producer failed fatally; recreating it");
                let fresh = Arc::new(Self::producer(&self.cfg)?);
                *self
                    .producer
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
                return Err(BusError::ProducerFailed { code, reason });
            }
            match sent {
                Ok(d) => {
                    return Ok(Position {
                        partition: d.partition,
                        offset: d.offset,
                    })
                }
                // A broker that lost the topic (or never had it): create it once, retry.
                Err((
                    KafkaError::MessageProduction(
                        RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic,
                    ),
                    _,
                )) if !created => {
                    created = true;
                    self.create_topic().await?;
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }

    /// Waits for every queued message (shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<(), BusError> {
        self.current().flush(timeout).map_err(Into::into)
    }
}

/// The embedded bus: one ordered log (a one-partition topic) with a committed
/// position per consumer group. Entries every group has committed are dropped.
pub struct InProcess {
    log: Mutex<Log>,
    grew: Notify,
}

#[derive(Default)]
struct Log {
    base: i64,
    entries: VecDeque<(Vec<u8>, Vec<u8>, Requester)>,
    committed: BTreeMap<String, i64>,
}

impl InProcess {
    fn publish(&self, key: &[u8], payload: &[u8], requester: &Requester) -> Position {
        let offset = {
            let mut log = self
                .log
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            log.entries
                .push_back((key.to_vec(), payload.to_vec(), requester.clone()));
            log.base + log.entries.len() as i64 - 1
        };
        self.grew.notify_waiters();
        Position {
            partition: 0,
            offset,
        }
    }

    fn committed(&self, group: &str) -> i64 {
        let mut log = self
            .log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let base = log.base;
        *log.committed.entry(group.to_owned()).or_insert(base)
    }

    fn read(&self, offset: i64) -> Option<Delivery> {
        let log = self
            .log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let i = usize::try_from(offset - log.base).ok()?;
        log.entries.get(i).map(|(k, p, r)| Delivery {
            key: k.clone(),
            payload: p.clone(),
            requester: r.clone(),
            position: Position {
                partition: 0,
                offset,
            },
        })
    }

    fn commit(&self, group: &str, next: i64) {
        let mut log = self
            .log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let c = log.committed.entry(group.to_owned()).or_insert(next);
        *c = (*c).max(next);
        let low = log.committed.values().copied().min().unwrap_or(next);
        while log.base < low && log.entries.pop_front().is_some() {
            log.base += 1;
        }
    }

    /// Messages not yet committed by the slowest group.
    pub fn retained(&self) -> usize {
        self.log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entries
            .len()
    }
}

/// A module's consumer.
pub enum BusConsumer {
    /// Embedded.
    InProcess {
        /// The bus.
        bus: Arc<InProcess>,
        /// Group name.
        group: String,
        /// Next offset to read.
        next: i64,
    },
    /// Kafka.
    Kafka {
        /// The consumer (shared with blocking commits).
        consumer: CloseOffRuntime,
        /// Topic.
        topic: String,
    },
}

/// A Kafka consumer whose drop runs on its own thread: closing a consumer waits for
/// the group coordinator, which never answers while the broker is down, and must
/// not hold up a tokio runtime (or a process) that is shutting down.
pub struct CloseOffRuntime(Option<Arc<StreamConsumer>>);

impl std::ops::Deref for CloseOffRuntime {
    type Target = Arc<StreamConsumer>;
    fn deref(&self) -> &Self::Target {
        // Only `drop` takes the consumer out.
        self.0
            .as_ref()
            .unwrap_or_else(|| unreachable!("consumer taken before drop"))
    }
}

impl Drop for CloseOffRuntime {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            std::thread::spawn(move || drop(c));
        }
    }
}

impl BusConsumer {
    /// The next delivery (waits for one).
    pub async fn next(&mut self) -> Result<Delivery, BusError> {
        match self {
            BusConsumer::InProcess { bus, next, .. } => loop {
                let grew = bus.grew.notified();
                if let Some(d) = bus.read(*next) {
                    *next += 1;
                    return Ok(d);
                }
                grew.await;
            },
            BusConsumer::Kafka { consumer, .. } => {
                let m = consumer.recv().await?;
                Ok(Delivery {
                    key: m.key().unwrap_or_default().to_vec(),
                    payload: m.payload().unwrap_or_default().to_vec(),
                    requester: requester_of(&m),
                    position: Position {
                        partition: m.partition(),
                        offset: m.offset(),
                    },
                })
            }
        }
    }

    /// Commits `d` (and everything before it in its partition) for this group
    /// (Kafka: sent asynchronously, never blocks).
    pub async fn commit(&self, d: &Delivery) -> Result<(), BusError> {
        match self {
            BusConsumer::InProcess { bus, group, .. } => {
                bus.commit(group, d.position.offset + 1);
                Ok(())
            }
            BusConsumer::Kafka { consumer, topic } => {
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
    use super::*;

    #[tokio::test]
    async fn in_process_bus_delivers_in_order_to_every_group_and_resumes_at_commit() {
        let bus = Bus::in_process();
        let mut mev = bus.consumer(Module::Mev).unwrap();
        for i in 0..3u8 {
            bus.publish(Module::Mev, &[i], &Requester::default())
                .await
                .unwrap();
        }
        let a = mev.next().await.unwrap();
        assert_eq!(
            (a.payload.clone(), a.key.clone()),
            (vec![0], b"mev".to_vec())
        );
        mev.commit(&a).await.unwrap();
        let b = mev.next().await.unwrap();
        assert_eq!(b.payload, vec![1]);
        // Not committed: a new consumer of the group starts again at `b`.
        let mut again = bus.consumer(Module::Mev).unwrap();
        assert_eq!(again.next().await.unwrap().position.offset, 1);
        // Another group reads from the start; the log keeps what it has not committed.
        let mut arb = bus.consumer(Module::Arbitrage).unwrap();
        let first = arb.next().await.unwrap();
        assert_eq!(first.position.offset, 0);
        let Bus::InProcess(inner) = &bus else {
            unreachable!()
        };
        assert_eq!(inner.retained(), 3, "arbitrage has not committed offset 0");
        arb.commit(&first).await.unwrap();
        assert_eq!(inner.retained(), 2, "every group committed offset 0");
        let waiter = tokio::spawn(async move { mev.next().await.map(|d| d.payload) });
        bus.publish(Module::Mev, &[9], &Requester::default())
            .await
            .unwrap();
        assert_eq!(waiter.await.unwrap().unwrap(), vec![2]);
    }
}
