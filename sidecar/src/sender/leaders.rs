//! Where the leaders are: a [`LeaderSource`] answers "who leads now and next" from
//! a cached snapshot (never blocking the send path). [`StaticLeaders`] comes from
//! the configuration; [`RpcLeaders`] follows a Solana RPC node (`getSlot`,
//! `getEpochInfo`, `getLeaderSchedule`, `getClusterNodes`) in the background.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::tpu::Leader;
use super::upstream;

/// Slots each leader holds in a row.
pub const SLOTS_PER_LEADER: u64 = 4;
/// Nominal slot time.
pub const SLOT_MS: u64 = 400;

/// The most slots an epoch's leader schedule may index (mainnet's epochs have
/// 432 000): a schedule from the RPC node with an index beyond is refused, which
/// also bounds the schedule kept in memory.
const MAX_EPOCH_SLOTS: u64 = 1 << 20;

/// Who leads now and next.
pub trait LeaderSource: Send + Sync {
    /// Up to `n` distinct leaders, the current one first.
    fn upcoming(&self, n: usize) -> Vec<Leader>;
    /// For logs.
    fn describe(&self) -> String;
}

/// `leaders` in the sender configuration.
#[derive(Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum LeadersConfig {
    /// A fixed list, the current leader first.
    Static(Vec<LeaderEntry>),
    /// Follow a Solana RPC node.
    Rpc {
        /// JSON-RPC URL.
        url: String,
        /// How often the slot is polled, milliseconds.
        #[serde(default = "default_refresh")]
        refresh_ms: u64,
    },
}

impl std::fmt::Debug for LeadersConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeadersConfig::Static(l) => f.debug_tuple("Static").field(l).finish(),
            // The URL without its path and query: a provider's key may be in either.
            LeadersConfig::Rpc { url, refresh_ms } => f
                .debug_struct("Rpc")
                .field("url", &upstream::redact(url))
                .field("refresh_ms", refresh_ms)
                .finish(),
        }
    }
}

fn default_refresh() -> u64 {
    SLOT_MS
}

/// One statically configured leader.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaderEntry {
    /// TPU QUIC address.
    pub tpu_quic: SocketAddr,
    /// Identity (base58), pinned in the TLS handshake when given.
    #[serde(default)]
    pub identity: Option<String>,
}

/// Decodes a base58 Solana public key.
pub fn pubkey_from_b58(s: &str) -> Result<[u8; 32], String> {
    gw_core::txwire::b58_exact::<32>(s.trim()).ok_or_else(|| {
        let shown: String = s.chars().take(64).collect();
        format!("{shown:?} is not a base58 public key (32 bytes)")
    })
}

/// A fixed list.
#[derive(Debug, Clone)]
pub struct StaticLeaders(Vec<Leader>);

impl StaticLeaders {
    /// From configuration entries.
    pub fn new(entries: &[LeaderEntry]) -> Result<Self, String> {
        entries
            .iter()
            .map(|e| {
                Ok(Leader {
                    tpu_quic: e.tpu_quic,
                    identity: e.identity.as_deref().map(pubkey_from_b58).transpose()?,
                })
            })
            .collect::<Result<Vec<_>, String>>()
            .map(StaticLeaders)
    }

    /// From leaders.
    pub fn from_leaders(leaders: Vec<Leader>) -> Self {
        StaticLeaders(leaders)
    }
}

impl LeaderSource for StaticLeaders {
    fn upcoming(&self, n: usize) -> Vec<Leader> {
        self.0.iter().take(n).copied().collect()
    }
    fn describe(&self) -> String {
        format!("{} static leader(s)", self.0.len())
    }
}

/// What the RPC node told us.
#[derive(Debug, Default)]
struct Snapshot {
    /// The slot and when we learned it.
    slot: Option<(u64, Instant)>,
    /// Leader identity by absolute slot.
    schedule: BTreeMap<u64, [u8; 32]>,
    /// Epoch the schedule is for, and its first slot.
    epoch: Option<(u64, u64)>,
    /// TPU QUIC address by identity.
    tpu: HashMap<[u8; 32], SocketAddr>,
    /// When the node list was fetched.
    nodes_at: Option<Instant>,
}

/// Leaders from a Solana RPC node, refreshed in the background.
pub struct RpcLeaders {
    url: String,
    snapshot: Arc<ArcSwap<Snapshot>>,
    task: JoinHandle<()>,
}

impl Drop for RpcLeaders {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RpcLeaders {
    /// Starts following `url`. Must run inside a tokio runtime.
    pub fn start(url: &str, refresh: Duration) -> anyhow::Result<Arc<Self>> {
        let http = super::upstream::client_builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
        let task = tokio::spawn(refresh_loop(
            http,
            url.to_owned(),
            refresh.max(Duration::from_millis(50)),
            snapshot.clone(),
        ));
        Ok(Arc::new(RpcLeaders {
            url: url.to_owned(),
            snapshot,
            task,
        }))
    }

    /// Whether slot, schedule and node list are all known.
    pub fn ready(&self) -> bool {
        let s = self.snapshot.load();
        s.slot.is_some() && !s.schedule.is_empty() && !s.tpu.is_empty()
    }
}

impl LeaderSource for RpcLeaders {
    fn upcoming(&self, n: usize) -> Vec<Leader> {
        let s = self.snapshot.load();
        let Some((slot, at)) = s.slot else {
            return Vec::new();
        };
        // The slot moves on between polls: extrapolate at the nominal slot time.
        let now = slot.saturating_add((at.elapsed().as_millis() as u64) / SLOT_MS);
        let mut out: Vec<Leader> = Vec::new();
        for (_, id) in s.schedule.range(now..) {
            if out.len() >= n {
                break;
            }
            let Some(addr) = s.tpu.get(id) else { continue };
            if out.iter().any(|l| l.tpu_quic == *addr) {
                continue;
            }
            out.push(Leader {
                tpu_quic: *addr,
                identity: Some(*id),
            });
        }
        out
    }
    fn describe(&self) -> String {
        format!("leaders from RPC {}", upstream::redact(&self.url))
    }
}

async fn rpc(
    http: &reqwest::Client,
    url: &str,
    method: &str,
    params: Value,
) -> Result<Value, String> {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    let v = upstream::post_json(http, url, &body, upstream::MAX_SCHEDULE_BYTES)
        .await
        .map_err(|e| format!("{method}: {e}"))?;
    if let Some(e) = v.get("error") {
        return Err(format!("{method}: {e}"));
    }
    v.get("result")
        .cloned()
        .ok_or_else(|| format!("{method}: no result"))
}

async fn refresh_loop(
    http: reqwest::Client,
    url: String,
    every: Duration,
    snapshot: Arc<ArcSwap<Snapshot>>,
) {
    let mut last_err = String::new();
    loop {
        if let Err(e) = refresh_once(&http, &url, &snapshot).await {
            if e != last_err {
                tracing::warn!(url = %upstream::redact(&url), error = %e, "leader schedule");
                last_err = e;
            }
        } else {
            last_err.clear();
        }
        tokio::time::sleep(every).await;
    }
}

async fn refresh_once(
    http: &reqwest::Client,
    url: &str,
    snapshot: &ArcSwap<Snapshot>,
) -> Result<(), String> {
    let cur = snapshot.load();
    let slot = rpc(http, url, "getSlot", json!([{"commitment": "processed"}]))
        .await?
        .as_u64()
        .ok_or("getSlot: not a number")?;
    let mut next = Snapshot {
        slot: Some((slot, Instant::now())),
        schedule: cur.schedule.clone(),
        epoch: cur.epoch,
        tpu: cur.tpu.clone(),
        nodes_at: cur.nodes_at,
    };
    let in_epoch = next.schedule.range(slot..).next().is_some();
    if !in_epoch || next.epoch.is_none() {
        let info = rpc(
            http,
            url,
            "getEpochInfo",
            json!([{"commitment": "processed"}]),
        )
        .await?;
        let epoch = info
            .get("epoch")
            .and_then(Value::as_u64)
            .ok_or("getEpochInfo: epoch")?;
        let index = info
            .get("slotIndex")
            .and_then(Value::as_u64)
            .ok_or("getEpochInfo: slotIndex")?;
        let abs = info
            .get("absoluteSlot")
            .and_then(Value::as_u64)
            .ok_or("getEpochInfo: absoluteSlot")?;
        let first = abs
            .checked_sub(index)
            .ok_or("getEpochInfo: slotIndex > absoluteSlot")?;
        let sched = rpc(http, url, "getLeaderSchedule", json!([abs])).await?;
        let map = sched
            .as_object()
            .ok_or("getLeaderSchedule: not an object")?;
        let mut schedule = BTreeMap::new();
        for (id, slots) in map {
            let key = pubkey_from_b58(id)?;
            for s in slots.as_array().ok_or("getLeaderSchedule: slots")? {
                let i = s
                    .as_u64()
                    .filter(|i| *i < MAX_EPOCH_SLOTS)
                    .ok_or("getLeaderSchedule: a slot index that is not one of an epoch")?;
                let slot = first
                    .checked_add(i)
                    .ok_or("getLeaderSchedule: a slot beyond u64")?;
                schedule.insert(slot, key);
            }
        }
        next.schedule = schedule;
        next.epoch = Some((epoch, first));
    }
    if next
        .nodes_at
        .is_none_or(|t| t.elapsed() > Duration::from_secs(30))
    {
        let nodes = rpc(http, url, "getClusterNodes", json!([])).await?;
        let mut tpu = HashMap::new();
        for n in nodes.as_array().ok_or("getClusterNodes: not an array")? {
            let (Some(id), Some(addr)) = (
                n.get("pubkey").and_then(Value::as_str),
                n.get("tpuQuic").and_then(Value::as_str),
            ) else {
                continue;
            };
            if let (Ok(k), Ok(a)) = (pubkey_from_b58(id), addr.parse::<SocketAddr>()) {
                tpu.insert(k, a);
            }
        }
        next.tpu = tpu;
        next.nodes_at = Some(Instant::now());
    }
    snapshot.store(Arc::new(next));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_leaders_keep_their_order_and_pin_identities() {
        let id = bs58::encode([7u8; 32]).into_string();
        let s = StaticLeaders::new(&[
            LeaderEntry {
                tpu_quic: "127.0.0.1:1".parse().unwrap(),
                identity: Some(id),
            },
            LeaderEntry {
                tpu_quic: "127.0.0.1:2".parse().unwrap(),
                identity: None,
            },
        ])
        .unwrap();
        let u = s.upcoming(5);
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].identity, Some([7u8; 32]));
        assert_eq!(s.upcoming(1).len(), 1);
        assert!(StaticLeaders::new(&[LeaderEntry {
            tpu_quic: "127.0.0.1:1".parse().unwrap(),
            identity: Some("0OIl".into()),
        }])
        .is_err());
    }
}
