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

/// How far [`RpcLeaders::upcoming`] looks for each leader asked for: 16 leaders'
/// turns (64 slots, ≈ 26 s). Upcoming leaders beyond that are not returned.
const LOOKAHEAD_SLOTS_PER_LEADER: u64 = 16 * SLOTS_PER_LEADER;

/// How many slots before its epoch ends the next epoch's schedule is fetched
/// (≈ 26 s at the nominal slot time): without it, no leader past the epoch's
/// end was known, the last ones of an epoch had no successors to warm, and at
/// the boundary none was known until the new schedule downloaded.
const NEXT_EPOCH_AHEAD: u64 = 64;

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
        /// Whether leaders at addresses that are not public (loopback, private
        /// networks, link-local, shared, documentation ranges) are sent to: a
        /// private cluster's. Off, such a node's `tpuQuic` is left out, as one
        /// that is no address at all (unspecified, multicast, broadcast, port 0)
        /// always is: the RPC node names the addresses the sender's handshakes
        /// go to, and the identity pinned comes from the same answer.
        #[serde(default)]
        private_addrs: bool,
    },
}

impl std::fmt::Debug for LeadersConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeadersConfig::Static(l) => f.debug_tuple("Static").field(l).finish(),
            // The URL without its path and query: a provider's key may be in either.
            LeadersConfig::Rpc {
                url,
                refresh_ms,
                private_addrs,
            } => f
                .debug_struct("Rpc")
                .field("url", &upstream::redact(url))
                .field("refresh_ms", refresh_ms)
                .field("private_addrs", private_addrs)
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

/// What the RPC node told us (cloned at each refresh: the schedule and node
/// list are behind `Arc`s, the rest is small).
#[derive(Debug, Default, Clone)]
struct Snapshot {
    /// The slot and when we learned it.
    slot: Option<(u64, Instant)>,
    /// Leader identity by absolute slot. Shared between snapshots: a refresh
    /// that fetched no schedule (nearly all of them, every `refresh_ms`) copies
    /// a pointer, not the ≈ 432 000 entries of a mainnet epoch (two epochs'
    /// near its end).
    schedule: Arc<BTreeMap<u64, [u8; 32]>>,
    /// Epoch the schedule is for, and its first slot.
    epoch: Option<(u64, u64)>,
    /// Slots in that epoch (`getEpochInfo`'s `slotsInEpoch`; 0: not said).
    slots_in_epoch: u64,
    /// Whether the schedule holds the next epoch's too.
    next_fetched: bool,
    /// TPU QUIC address by identity; shared like the schedule.
    tpu: Arc<HashMap<[u8; 32], SocketAddr>>,
    /// When the node list was fetched.
    nodes_at: Option<Instant>,
    /// When fetching it last failed (asked again `NODES_RETRY` later).
    nodes_failed_at: Option<Instant>,
    /// Nodes of that list whose TPU address was left out (not public).
    nodes_left_out: usize,
    /// When `getEpochInfo` was last asked (asked again `EPOCH_INFO_RETRY` later
    /// while the epoch's length is not known).
    epoch_info_at: Option<Instant>,
    /// When fetching the next epoch's schedule last failed (tried again
    /// `EPOCH_INFO_RETRY` later).
    ahead_failed_at: Option<Instant>,
}

/// How long after an answer that left the epoch's length unknown (a node behind,
/// still in the epoch before) `getEpochInfo` is asked again: until it was, no
/// next epoch's schedule was fetched ahead for the whole epoch.
const EPOCH_INFO_RETRY: Duration = Duration::from_secs(2);

/// How long after a failed `getClusterNodes` it is asked again (the schedule and
/// slot go on being refreshed meanwhile).
const NODES_RETRY: Duration = Duration::from_secs(5);

/// The longest wait between refreshes while they fail (doubling from
/// `refresh_ms`): a node refusing one of the calls had an epoch's schedule
/// downloaded again at every refresh.
const MAX_FAILING_REFRESH: Duration = Duration::from_secs(5);

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
    /// Starts following `url`; leaders at addresses that are not public are
    /// sent to only when `private_addrs`. Must run inside a tokio runtime.
    pub fn start(url: &str, refresh: Duration, private_addrs: bool) -> anyhow::Result<Arc<Self>> {
        let http = super::upstream::client_builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
        let task = tokio::spawn(refresh_loop(
            http,
            url.to_owned(),
            refresh.max(Duration::from_millis(50)),
            private_addrs,
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
        // Within a window: on a cluster of fewer leaders with a TPU address than
        // `n` (a private one, or nodes left out), the search went on to the
        // epoch's end — up to 864 000 slots near it — at every send and prewarm.
        let window = (n.max(1) as u64).saturating_mul(LOOKAHEAD_SLOTS_PER_LEADER);
        let mut out: Vec<Leader> = Vec::new();
        for (_, id) in s.schedule.range(now..now.saturating_add(window)) {
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
    let mut v = upstream::post_json(http, url, &body, upstream::MAX_SCHEDULE_BYTES)
        .await
        .map_err(|e| format!("{method}: {e}"))?;
    if let Some(e) = v.get("error") {
        return Err(format!("{method}: {e}"));
    }
    // Taken, not copied: a schedule's answer holds an epoch's slots.
    v.as_object_mut()
        .and_then(|o| o.remove("result"))
        .ok_or_else(|| format!("{method}: no result"))
}

async fn refresh_loop(
    http: reqwest::Client,
    url: String,
    every: Duration,
    private_addrs: bool,
    snapshot: Arc<ArcSwap<Snapshot>>,
) {
    let mut last_err = String::new();
    let mut wait = every;
    loop {
        // Only a refresh that failed (slot, epoch or schedule) waits longer; one
        // whose next epoch's schedule or node list failed took the slot, and
        // retries those on their own terms.
        let (err, failed) = match refresh_once(&http, &url, private_addrs, &snapshot).await {
            Ok(None) => (None, false),
            Ok(Some(e)) => (Some(e), false),
            Err(e) => (Some(e), true),
        };
        match err {
            Some(e) if e != last_err => {
                tracing::warn!(url = %upstream::redact(&url), error = %e, "leader schedule");
                last_err = e;
            }
            Some(_) => {}
            None => last_err.clear(),
        }
        wait = if failed {
            (wait * 2).min(MAX_FAILING_REFRESH.max(every))
        } else {
            every
        };
        tokio::time::sleep(wait).await;
    }
}

async fn refresh_once(
    http: &reqwest::Client,
    url: &str,
    private_addrs: bool,
    snapshot: &ArcSwap<Snapshot>,
) -> Result<Option<String>, String> {
    // `Err`: the refresh failed (nothing stored); `Ok(Some)`: stored, but the
    // next epoch's schedule or the node list failed.
    let cur = snapshot.load();
    let reported = rpc(http, url, "getSlot", json!([{"commitment": "processed"}]))
        .await?
        .as_u64()
        .ok_or("getSlot: not a number")?;
    // The slot never goes back (within an epoch's length): a node behind the one
    // asked before (a pool of nodes behind one URL, a node catching up) moved the
    // leaders back to ones whose slots had passed. Further back is another
    // cluster's, or a restart's, and is taken.
    let slot = match cur.slot {
        Some((before, at)) if reported < before && before - reported < MAX_EPOCH_SLOTS => {
            (before, at)
        }
        _ => (reported, Instant::now()),
    };
    // Everything else as it was (the schedule and node list shared: pointers).
    let mut next = Snapshot {
        slot: Some(slot),
        ..Snapshot::clone(&cur)
    };
    let slot = slot.0;
    // Into the epoch whose schedule was fetched ahead: it is the current one (the
    // past one's slots are let go); its length is asked for again below (epochs
    // need not all be as long: a cluster's warm-up epochs are not).
    let mut rolled = false;
    if let Some((epoch, first)) = next.epoch {
        let end = first.saturating_add(next.slots_in_epoch);
        if next.next_fetched && slot >= end {
            next.epoch = Some((epoch.saturating_add(1), end));
            next.next_fetched = false;
            next.schedule = Arc::new(next.schedule.range(end..).map(|(k, v)| (*k, *v)).collect());
            rolled = true;
        }
    }
    let unknown = next.epoch.is_none() || next.schedule.range(slot..).next().is_none();
    let length_unknown = next.slots_in_epoch == 0
        && next
            .epoch_info_at
            .is_none_or(|t| t.elapsed() >= EPOCH_INFO_RETRY);
    // Asked again only for the epoch's length, a failure keeps the rest of
    // what this refresh learned (its slot).
    let mut epoch_failed = None;
    let info = if unknown || rolled || length_unknown {
        let info = rpc(
            http,
            url,
            "getEpochInfo",
            json!([{"commitment": "processed"}]),
        )
        .await;
        match info {
            Ok(info) => Some(info),
            Err(e) if !(unknown || rolled) => {
                next.epoch_info_at = Some(Instant::now());
                epoch_failed = Some(e);
                None
            }
            Err(e) => return Err(e),
        }
    } else {
        None
    };
    if let Some(info) = info {
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
        next.epoch_info_at = Some(Instant::now());
        // The schedule fetched ahead stands while the node is in the epoch it
        // was fetched for (or behind it: a node that has not crossed yet);
        // one ahead of it, or none known, brings this epoch's.
        let ours = next.epoch;
        if unknown || ours.is_none_or(|(e, f)| epoch > e || (epoch == e && first != f)) {
            let sched = rpc(http, url, "getLeaderSchedule", json!([abs])).await?;
            next.schedule = Arc::new(schedule_of(&sched, first)?);
            next.epoch = Some((epoch, first));
        }
        // The length of the epoch the schedule is for, as the node says it (not
        // said, beyond what an epoch may hold, or of another epoch: none, and no
        // schedule is fetched ahead: the boundary waits for the new one).
        next.slots_in_epoch = info
            .get("slotsInEpoch")
            .and_then(Value::as_u64)
            .filter(|n| *n <= MAX_EPOCH_SLOTS && next.epoch == Some((epoch, first)))
            .unwrap_or(0);
        next.next_fetched = false;
    }
    let mut ahead_failed = None;
    if let (Some((_, first)), false) = (next.epoch, next.next_fetched) {
        let end = first.saturating_add(next.slots_in_epoch);
        // After a failed fetch (an answer that did not parse, say), not again
        // at every refresh: each may be an epoch's schedule.
        let due = next
            .ahead_failed_at
            .is_none_or(|t| t.elapsed() >= EPOCH_INFO_RETRY);
        if next.slots_in_epoch > 0 && slot.saturating_add(NEXT_EPOCH_AHEAD) >= end && due {
            next.ahead_failed_at = None;
            match rpc(http, url, "getLeaderSchedule", json!([end])).await {
                // Not known yet to the node: asked again at the next refresh.
                Ok(Value::Null) => {}
                Ok(sched) => match schedule_of(&sched, end) {
                    Ok(more) => {
                        let mut both = BTreeMap::clone(&next.schedule);
                        both.extend(more);
                        next.schedule = Arc::new(both);
                        next.next_fetched = true;
                    }
                    Err(e) => ahead_failed = Some(format!("the next epoch's: {e}")),
                },
                Err(e) => ahead_failed = Some(format!("the next epoch's: {e}")),
            }
            if ahead_failed.is_some() {
                next.ahead_failed_at = Some(Instant::now());
            }
        }
    }
    // The node list's failure keeps what this refresh learned (the schedule it
    // fetched was thrown away, and fetched again at the next refresh).
    let mut nodes_failed = None;
    if next
        .nodes_at
        .is_none_or(|t| t.elapsed() > Duration::from_secs(30))
        && next
            .nodes_failed_at
            .is_none_or(|t| t.elapsed() >= NODES_RETRY)
    {
        match rpc(http, url, "getClusterNodes", json!([]))
            .await
            .and_then(|nodes| tpu_of(&nodes, private_addrs))
        {
            Ok((tpu, left_out)) => {
                if left_out > 0 && left_out != cur.nodes_left_out {
                    tracing::warn!(
                        url = %upstream::redact(url),
                        left_out,
                        "getClusterNodes: TPU addresses that are not public left out \
                         (sender.leaders.rpc.private_addrs for a private cluster)"
                    );
                }
                next.nodes_left_out = left_out;
                next.tpu = Arc::new(tpu);
                next.nodes_at = Some(Instant::now());
                next.nodes_failed_at = None;
            }
            Err(e) => {
                next.nodes_failed_at = Some(Instant::now());
                nodes_failed = Some(e);
            }
        }
    }
    snapshot.store(Arc::new(next));
    let failed: Vec<String> = [epoch_failed, ahead_failed, nodes_failed]
        .into_iter()
        .flatten()
        .collect();
    Ok((!failed.is_empty()).then(|| failed.join("; ")))
}

/// The TPU QUIC address of each node of `getClusterNodes`' answer (one without,
/// or not parsed, is left out), and how many were left out for their address
/// (see [`sendable`]).
fn tpu_of(
    nodes: &Value,
    private_addrs: bool,
) -> Result<(HashMap<[u8; 32], SocketAddr>, usize), String> {
    let mut tpu = HashMap::new();
    let mut left_out = 0;
    for n in nodes.as_array().ok_or("getClusterNodes: not an array")? {
        let (Some(id), Some(addr)) = (
            n.get("pubkey").and_then(Value::as_str),
            n.get("tpuQuic").and_then(Value::as_str),
        ) else {
            continue;
        };
        if let (Ok(k), Ok(a)) = (pubkey_from_b58(id), addr.parse::<SocketAddr>()) {
            if sendable(a, private_addrs) {
                tpu.insert(k, a);
            } else {
                left_out += 1;
            }
        }
    }
    Ok((tpu, left_out))
}

/// Whether a leader's TPU address from an RPC node is sent to: never one that is
/// no host's (unspecified, multicast, broadcast, port 0); one that is not public
/// (loopback, private, link-local, shared, benchmarking, documentation,
/// reserved; IPv6 unique-local, link- and site-local, documentation, NAT64,
/// 6to4, IPv4-compatible) only when `private_addrs`.
fn sendable(a: SocketAddr, private_addrs: bool) -> bool {
    use std::net::IpAddr;
    let ip = match a.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let (nowhere, private) = match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            (
                v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast() || a == 0,
                v4.is_loopback()
                    || v4.is_private()
                    || v4.is_link_local()
                    || (a == 100 && (64..128).contains(&b))
                    || (a == 198 && (b == 18 || b == 19))
                    || v4.is_documentation()
                    || (a == 192 && b == 0 && c == 0)
                    || a >= 240,
            )
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            (
                v6.is_unspecified() || v6.is_multicast(),
                v6.is_loopback()
                    || (s[0] & 0xfe00) == 0xfc00
                    || (s[0] & 0xffc0) == 0xfe80
                    || (s[0] & 0xffc0) == 0xfec0
                    || (s[0] == 0x2001 && s[1] == 0x0db8)
                    // Translated or tunnelled IPv4 (NAT64, 6to4), and the
                    // deprecated IPv4-compatible form: not a host's own address.
                    || (s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4])
                    || s[0] == 0x2002
                    || s[0..6] == [0; 6],
            )
        }
    };
    a.port() != 0 && !nowhere && (private_addrs || !private)
}

/// The leaders of `getLeaderSchedule`'s answer `sched` for the epoch starting at
/// slot `first`, by absolute slot; refused whole when an index is none of an
/// epoch's.
fn schedule_of(sched: &Value, first: u64) -> Result<BTreeMap<u64, [u8; 32]>, String> {
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
    Ok(schedule)
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

    /// A Solana RPC node in epoch 7 (432 000 slots from slot 1000) whose one
    /// leader leads every slot, its slot one further at each call; it refuses
    /// `getClusterNodes` while `refuse_nodes`. Its URL, and how many
    /// `getLeaderSchedule` it answered.
    async fn test_node(
        refuse_nodes: Arc<std::sync::atomic::AtomicBool>,
    ) -> (String, Arc<std::sync::atomic::AtomicU64>) {
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        let slot = Arc::new(AtomicU64::new(1010));
        let schedules = Arc::new(AtomicU64::new(0));
        let id = bs58::encode([9u8; 32]).into_string();
        let schedule = json!({ id.clone(): (0..432_000u64).collect::<Vec<_>>() });
        let nodes = json!([{"pubkey": id, "tpuQuic": "127.0.0.1:9"}]);
        let counted = schedules.clone();
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(move |axum::Json(req): axum::Json<Value>| {
                let (schedule, nodes, at) = (schedule.clone(), nodes.clone(), slot.clone());
                let (refuse_nodes, counted) = (refuse_nodes.clone(), counted.clone());
                async move {
                    let now = at.fetch_add(1, Relaxed);
                    let result = match req["method"].as_str().unwrap_or("") {
                        "getSlot" => json!(now),
                        "getEpochInfo" => json!({"epoch": 7, "slotIndex": now - 1000,
                            "absoluteSlot": now, "slotsInEpoch": 432_000}),
                        "getLeaderSchedule" => {
                            counted.fetch_add(1, Relaxed);
                            schedule
                        }
                        "getClusterNodes" if refuse_nodes.load(Relaxed) => {
                            return axum::Json(json!({"jsonrpc": "2.0", "id": req["id"],
                                "error": {"code": -32601, "message": "Method not found"}}));
                        }
                        "getClusterNodes" => nodes,
                        _ => Value::Null,
                    };
                    axum::Json(json!({"jsonrpc": "2.0", "result": result, "id": req["id"]}))
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        (url, schedules)
    }

    /// A refresh that fetched no schedule shares the one it had (a pointer),
    /// as it shares the node list: the slot moves on every refresh, the
    /// schedule once an epoch.
    #[tokio::test]
    async fn refreshes_share_the_schedule_they_did_not_fetch() {
        let (url, _) = test_node(Arc::default()).await;
        let leaders = RpcLeaders::start(&url, Duration::from_millis(50), true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !leaders.ready() {
            assert!(Instant::now() < deadline, "never ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let first = leaders.snapshot.load_full();
        assert_eq!(first.schedule.len(), 432_000);
        // Five refreshes later (each moved the slot, so each stored a snapshot).
        let s0 = first.slot.map(|(s, _)| s).unwrap();
        while leaders.snapshot.load().slot.map(|(s, _)| s).unwrap() < s0 + 5 {
            assert!(Instant::now() < deadline, "no refresh");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let later = leaders.snapshot.load_full();
        assert!(!Arc::ptr_eq(&first, &later), "a new snapshot");
        assert!(Arc::ptr_eq(&first.schedule, &later.schedule));
        assert!(Arc::ptr_eq(&first.tpu, &later.tpu));
        assert_eq!(leaders.upcoming(1).len(), 1);
    }

    /// A node that refuses `getClusterNodes` (providers disable it) keeps the
    /// schedule already fetched: it was thrown away with the failed refresh and
    /// downloaded again at each one (an epoch's, every `refresh_ms`). The node
    /// list is asked again 5 s later; once it answers, the leaders are known.
    #[tokio::test]
    async fn a_refused_node_list_keeps_the_schedule_fetched() {
        use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
        let refuse = Arc::new(AtomicBool::new(true));
        let (url, schedules) = test_node(refuse.clone()).await;
        let leaders = RpcLeaders::start(&url, Duration::from_millis(50), true).unwrap();
        // The schedule fetched and the node list refused, then 3 s more of
        // refreshes (60 at 50 ms).
        let deadline = Instant::now() + Duration::from_secs(20);
        while leaders.snapshot.load().nodes_failed_at.is_none() {
            assert!(Instant::now() < deadline, "the node list never asked");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!leaders.ready());
        assert!(leaders.upcoming(1).is_empty());
        assert_eq!(schedules.load(Relaxed), 1, "the schedule fetched once");
        refuse.store(false, Relaxed);
        let deadline = Instant::now() + Duration::from_secs(12);
        while !leaders.ready() {
            assert!(Instant::now() < deadline, "never ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(leaders.upcoming(1).len(), 1);
        assert_eq!(schedules.load(Relaxed), 1);
    }

    /// The RPC node names the addresses handshakes go to: one that is no host's
    /// is never sent to, one that is not public only for a private cluster.
    #[test]
    fn leaders_at_addresses_that_are_not_public_are_left_out() {
        let never = [
            "0.0.0.0:8009",
            "0.1.2.3:8009",
            "224.0.0.1:8009",
            "255.255.255.255:8009",
            "[::]:8009",
            "[ff02::1]:8009",
            "8.8.8.8:0",
        ];
        let private = [
            "127.0.0.1:8009",
            "10.1.2.3:8009",
            "172.16.0.1:8009",
            "192.168.1.1:8009",
            "169.254.169.254:80",
            "100.64.0.1:8009",
            "198.18.0.1:8009",
            "192.0.2.1:8009",
            "192.0.0.8:8009",
            "240.0.0.1:8009",
            "[::1]:8009",
            "[fd00::1]:8009",
            "[fe80::1]:8009",
            "[2001:db8::1]:8009",
            "[::ffff:10.0.0.1]:8009",
            "[fec0::1]:8009",
            "[64:ff9b::808:808]:8009",
            "[2002:808:808::1]:8009",
            "[::8.8.8.8]:8009",
        ];
        let public = ["8.8.8.8:8009", "145.40.93.1:8009", "[2606:4700::1]:8009"];
        for (list, plain, private_ok) in [
            (&never[..], false, false),
            (&private[..], false, true),
            (&public[..], true, true),
        ] {
            for a in list {
                let a: SocketAddr = a.parse().unwrap();
                assert_eq!(sendable(a, false), plain, "{a}");
                assert_eq!(sendable(a, true), private_ok, "{a} (private_addrs)");
            }
        }
        let id = |b: u8| bs58::encode([b; 32]).into_string();
        let nodes = json!([
            {"pubkey": id(1), "tpuQuic": "8.8.8.8:8009"},
            {"pubkey": id(2), "tpuQuic": "169.254.169.254:80"},
            {"pubkey": id(3), "tpuQuic": "0.0.0.0:8009"},
        ]);
        let (tpu, left_out) = tpu_of(&nodes, false).unwrap();
        assert_eq!((tpu.len(), left_out), (1, 2));
        assert!(tpu.contains_key(&[1; 32]));
        let (tpu, left_out) = tpu_of(&nodes, true).unwrap();
        assert_eq!((tpu.len(), left_out), (2, 1));
    }

    /// Upcoming leaders are looked for within 64 slots per leader asked for: a
    /// leader whose turn is further is not returned (the search went on to the
    /// epoch's end when fewer leaders had a TPU address than asked for).
    #[tokio::test]
    async fn upcoming_leaders_are_looked_for_within_a_window() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let mut schedule: BTreeMap<u64, [u8; 32]> = (1000..1100).map(|s| (s, a)).collect();
        schedule.extend((1100..1200).map(|s| (s, b)));
        let schedule = Arc::new(schedule);
        let with = |tpu: &[[u8; 32]]| Snapshot {
            slot: Some((1000, Instant::now())),
            schedule: schedule.clone(),
            tpu: Arc::new(
                tpu.iter()
                    .map(|k| (*k, SocketAddr::from(([8, 8, 8, k[0]], 8009))))
                    .collect(),
            ),
            ..Snapshot::default()
        };
        let leaders = RpcLeaders {
            url: String::new(),
            snapshot: Arc::new(ArcSwap::from_pointee(with(&[a, b]))),
            task: tokio::spawn(async {}),
        };
        let ids = |n| {
            leaders
                .upcoming(n)
                .iter()
                .map(|l| l.identity)
                .collect::<Vec<_>>()
        };
        // b leads from slot 1100: beyond one leader's window (64 slots), within two's.
        assert_eq!(ids(2), [Some(a), Some(b)]);
        // Only b has an address: not found within one leader's window.
        leaders.snapshot.store(Arc::new(with(&[b])));
        assert_eq!(ids(1), []);
        assert_eq!(ids(2), [Some(b)]);
    }

    /// Without `private_addrs`, a node naming a loopback TPU gives no leader.
    #[tokio::test]
    async fn a_loopback_leader_is_not_sent_to_unless_private_addrs() {
        let (url, _) = test_node(Arc::default()).await;
        let leaders = RpcLeaders::start(&url, Duration::from_millis(50), false).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while leaders.snapshot.load().nodes_at.is_none() {
            assert!(Instant::now() < deadline, "the node list never fetched");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(leaders.upcoming(1).is_empty());
        assert!(!leaders.ready());
        assert_eq!(leaders.snapshot.load().nodes_left_out, 1);
    }
}
