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
use gw_core::Module;
use rdkafka::admin::{NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use super::bus::{BusError, CloseOffRuntime, KafkaConfig, Position};

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
    /// `applied`, `duplicate` or `rejected`.
    pub outcome: String,
    /// The refusal code (`rejected`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The exact signed bytes.
    #[serde(with = "crate::journal::txn::hex_vec")]
    pub payload: Vec<u8>,
    /// Who sent it.
    pub requester: Requester,
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
    /// Keys of nonce records no longer remembered (to tombstone).
    pub expired: Vec<String>,
}

/// The state topics.
pub struct KafkaState {
    cfg: KafkaConfig,
    producer: FutureProducer,
}

impl KafkaState {
    /// Clients for `cfg` (no broker needed yet).
    pub fn new(cfg: &KafkaConfig) -> Result<KafkaState, BusError> {
        let producer = cfg.producer().create()?;
        Ok(KafkaState {
            cfg: cfg.clone(),
            producer,
        })
    }

    /// The state topic of `m`.
    pub fn topic(&self, m: Module) -> String {
        format!("{}-state-{}", self.cfg.topic, m.as_str())
    }

    /// Creates the state topics (compacted) when missing. Idempotent.
    pub async fn prepare(&self) -> Result<(), BusError> {
        let names: Vec<String> = Module::ALL.iter().map(|m| self.topic(*m)).collect();
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|n| {
                NewTopic::new(n, 1, TopicReplication::Fixed(self.cfg.replication))
                    .set("cleanup.policy", "compact")
            })
            .collect();
        self.cfg.create_topics(&topics).await
    }

    async fn put(&self, m: Module, key: &str, value: Option<&[u8]>) -> Result<(), BusError> {
        let topic = self.topic(m);
        let mut record = FutureRecord::<str, [u8]>::to(&topic).key(key).partition(0);
        if let Some(v) = value {
            record = record.payload(v);
        }
        let wait = Duration::from_millis(self.cfg.message_timeout_ms);
        self.producer
            .send(record, wait)
            .await
            .map(|_| ())
            .map_err(|(e, _)| e.into())
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

    /// Calls `f` with every checkpoint of `m` written from now on (by any node),
    /// forever.
    pub async fn watch(self: Arc<Self>, m: Module, mut f: impl FnMut(Checkpoint) + Send) {
        let topic = self.topic(m);
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
                        match msg.payload().map(serde_json::from_slice::<Checkpoint>) {
                            Some(Ok(cp)) => f(cp),
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "agent checkpoint unreadable");
                            }
                            None => {}
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
    /// remembered at `now`.
    pub async fn load(&self, m: Module, now: u64) -> Result<Loaded, BusError> {
        let client = self.cfg.client();
        let topic = self.topic(m);
        let wait = Duration::from_millis(self.cfg.message_timeout_ms.max(1000));
        let records = tokio::task::spawn_blocking(move || read_all(client, &topic, wait))
            .await
            .map_err(|e| BusError::Encode(format!("state loader: {e}")))??;
        fold(records, now)
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

/// The latest value of every key, read as a checkpoint and nonces. A checkpoint
/// that does not decode is an error (never start over from nothing: the next
/// checkpoint would overwrite every node's progress).
fn fold(records: Vec<Record>, now: u64) -> Result<Loaded, BusError> {
    let mut latest: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
    for (k, v) in records {
        latest.insert(k, v);
    }
    let mut loaded = Loaded::default();
    let mut keys = std::collections::BTreeSet::new();
    for (k, v) in latest {
        let Some(v) = v else { continue };
        if k == STATE_KEY {
            let c = serde_json::from_slice(&v)
                .map_err(|e| BusError::Encode(format!("agent checkpoint unreadable: {e}")))?;
            loaded.checkpoint = Some(c);
            continue;
        }
        match serde_json::from_slice::<StoredNonce>(&v) {
            Ok(n) if n.expires >= now => {
                keys.insert(k);
                loaded.nonces.push(n);
            }
            Ok(_) => loaded.expired.push(k),
            Err(e) => tracing::warn!(key = %k, error = %e, "nonce record unreadable; ignored"),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn nonce(n: u64, expires: u64) -> StoredNonce {
        StoredNonce {
            issuer: "dashboard".into(),
            nonce: n,
            expires,
            chain: "a".into(),
        }
    }

    fn rec<T: Serialize>(k: &str, v: &T) -> Record {
        (k.into(), Some(serde_json::to_vec(v).unwrap()))
    }

    #[test]
    fn the_latest_value_of_each_key_wins_and_tombstones_forget() {
        let mut c = Checkpoint::default();
        c.next.insert(0, 7);
        let mut later = c.clone();
        later.next.insert(0, 9);
        later.recent.push_back(nonce(3, 200));
        let l = fold(
            vec![
                rec("state", &c),
                rec("n/dashboard/1", &nonce(1, 200)),
                rec("n/dashboard/2", &nonce(2, 50)),
                rec("state", &later),
                ("n/dashboard/1".into(), None),
            ],
            100,
        )
        .unwrap();
        assert_eq!(l.checkpoint, Some(later));
        // 1 tombstoned, 2 expired, 3 only in `recent`: written again.
        assert_eq!(l.nonces, vec![nonce(3, 200)]);
        assert_eq!(l.missing, vec![nonce(3, 200)]);
        assert_eq!(l.expired, vec!["n/dashboard/2".to_string()]);
    }

    #[test]
    fn an_empty_topic_has_no_checkpoint() {
        let l = fold(Vec::new(), 0).unwrap();
        assert!(l.checkpoint.is_none() && l.nonces.is_empty());
    }

    #[test]
    fn an_unreadable_checkpoint_is_an_error_not_a_fresh_start() {
        assert!(fold(vec![("state".into(), Some(b"{".to_vec()))], 0).is_err());
    }
}
