//! The TPU route and `/api/rpc` against Agave's own QUIC TPU server
//! (`solana-streamer` 3.1.14, started as a validator starts it: stake-weighted QoS,
//! 8 connections per peer, 8 new connections per minute per IP address; see
//! `tests/agave-tpu/`). What the server hands to its consumer must be exactly what
//! was sent, unstaked and staked, within the server's stream limits; and a server
//! whose per-IP budget is spent must not see a reconnect storm.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use ed25519_dalek::SigningKey;
use gw_sidecar::sender::tpu::{Leader, TpuClient, TpuConfig, TpuError, CLOSE_REASONS};
use gw_sidecar::sender::txwire;
use serde_json::json;
use testkit::agave_tpu::{AgaveConfig, AgaveTpu};
use testkit::rpc_node::RpcNode;
use testkit::udp_delay::DelayProxy;

mod common;

/// One test at a time: each runs its own Agave server, and the staked test's
/// 20 000 transactions would squeeze the hygiene test's timing on 2 cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn key(b: u8) -> SigningKey {
    SigningKey::from_bytes(&[b; 32])
}

/// A signed transaction, distinct for each `i`, `pad` bytes of instruction data.
fn tx(i: u32, pad: usize) -> Bytes {
    let mut bh = [0u8; 32];
    bh[..4].copy_from_slice(&i.to_le_bytes());
    Bytes::from(txwire::example_tx(&key(50), bh, pad))
}

fn closes(client: &TpuClient, reason: &str) -> u64 {
    let i = CLOSE_REASONS.iter().position(|r| *r == reason).unwrap();
    client.stats.closes[i].load(Ordering::Relaxed)
}

/// The close reasons by which Agave refuses or punishes a peer.
const AGAVE_REFUSALS: [&str; 5] = [
    "dropped",
    "disallowed",
    "exceed_max_stream_count",
    "too_many",
    "invalid_stream",
];

fn sorted(mut v: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    v.sort();
    v
}

/// `submit` tried until the per-leader queue (bounded) has room.
async fn with_room<T>(mut submit: impl FnMut() -> Result<T, TpuError>) -> T {
    loop {
        match submit() {
            Ok(t) => return t,
            Err(TpuError::QueueFull(_)) => tokio::time::sleep(Duration::from_millis(1)).await,
            Err(e) => panic!("submit: {e}"),
        }
    }
}

/// Sends `n` transactions of varied sizes through `client` (one at a time, or in
/// batches of `batch` with `submit_batch` when `batch` > 1), waits for every
/// acknowledgement and for the server to deliver them all; returns the rate
/// (tx/s) from the first submit to the last delivery.
async fn send_and_check(
    client: &TpuClient,
    agave: &AgaveTpu,
    first: u32,
    n: u32,
    batch: usize,
) -> f64 {
    let leader = Leader {
        tpu_quic: agave.addr,
        identity: Some(agave.identity),
    };
    let before = agave.received().len();
    let start = Instant::now();
    let wires: Vec<Bytes> = (first..first + n)
        .map(|i| tx(i, (i as usize * 37) % 1000))
        .collect();
    let sent: Vec<Vec<u8>> = wires.iter().map(|w| w.to_vec()).collect();
    if batch <= 1 {
        let mut acks = Vec::with_capacity(n as usize);
        for w in &wires {
            acks.push(with_room(|| client.submit(&leader, w.clone())).await);
        }
        for (k, a) in acks.into_iter().enumerate() {
            assert_eq!(a.await.unwrap(), Ok(()), "transaction {k} not acknowledged");
        }
    } else {
        let mut acks = Vec::new();
        for chunk in wires.chunks(batch) {
            acks.push(with_room(|| client.submit_batch(&leader, chunk.to_vec())).await);
        }
        for (k, a) in acks.into_iter().enumerate() {
            let answers = a.await.unwrap();
            assert_eq!(answers.len(), wires.chunks(batch).nth(k).unwrap().len());
            assert!(
                answers.iter().all(Result::is_ok),
                "batch {k} not acknowledged: {answers:?}"
            );
        }
    }
    let want = before + n as usize;
    assert_eq!(
        agave.wait_for(want, Duration::from_secs(60)).await,
        want,
        "the server delivered fewer transactions than it acknowledged"
    );
    let rate = f64::from(n) / start.elapsed().as_secs_f64();
    let got = agave.received().split_off(before);
    assert_eq!(
        sorted(got),
        sorted(sent),
        "delivered byte-identical, once each"
    );
    for r in AGAVE_REFUSALS {
        assert_eq!(closes(client, r), 0, "the server closed a connection: {r}");
    }
    assert_eq!(client.stats.failed.load(Ordering::Relaxed), 0);
    rate
}

#[test]
fn agave_delivers_the_tpu_routes_transactions_unstaked_and_staked() {
    let _serial = serial();
    rt().block_on(async {
        // Unstaked: the server throttles our streams (its unstaked QoS); every
        // transaction still arrives, on one connection, with no close.
        let agave = AgaveTpu::start(&AgaveConfig::default(), &key(1)).unwrap();
        let client = TpuClient::new(TpuConfig::default(), &key(2)).unwrap();
        let unstaked = send_and_check(&client, &agave, 0, 600, 1).await;
        assert_eq!(client.stats.connects.load(Ordering::Relaxed), 1);
        drop(agave);

        // Staked: the server reads our identity from the client certificate and
        // gives the connection its stake's share of streams.
        let staked_cfg = AgaveConfig {
            stakes: vec![(key(2).verifying_key().to_bytes(), 1_000_000_000_000_000)],
            ..AgaveConfig::default()
        };
        let agave = AgaveTpu::start(&staked_cfg, &key(1)).unwrap();
        let client = TpuClient::new(TpuConfig::default(), &key(2)).unwrap();
        let staked = send_and_check(&client, &agave, 100_000, 20_000, 1).await;
        // The same in batches of 64 (as solana-tpu-client-next sends them).
        let batched = send_and_check(&client, &agave, 200_000, 20_000, 64).await;
        assert_eq!(client.stats.connects.load(Ordering::Relaxed), 1);
        assert_eq!(client.stats.delivered.load(Ordering::Relaxed), 40_000);
        println!(
            "agave delivered: unstaked {unstaked:.0} tx/s (600), staked {staked:.0} tx/s \
             (20 000), staked in batches of 64 {batched:.0} tx/s (20 000)"
        );
        assert!(
            staked > 5.0 * unstaked,
            "staked {staked:.0} tx/s is not well above unstaked {unstaked:.0} tx/s: \
             the server did not classify the connection by its stake"
        );
    });
}

#[test]
fn agave_refuses_another_identity_and_the_route_never_sends_to_it() {
    let _serial = serial();
    rt().block_on(async {
        let agave = AgaveTpu::start(&AgaveConfig::default(), &key(1)).unwrap();
        let client = TpuClient::new(TpuConfig::default(), &key(2)).unwrap();
        let wrong = Leader {
            tpu_quic: agave.addr,
            identity: Some(key(9).verifying_key().to_bytes()),
        };
        let r = client.submit(&wrong, tx(1, 0)).unwrap().await.unwrap();
        assert!(
            matches!(r, Err(TpuError::Unreachable(..))),
            "a leader with another identity: {r:?}"
        );
        // A batch to it: each transaction answered unreachable.
        let rs = client
            .submit_batch(&wrong, vec![tx(2, 0), tx(3, 0)])
            .unwrap()
            .await
            .unwrap();
        assert_eq!(rs.len(), 2);
        assert!(
            rs.iter()
                .all(|r| matches!(r, Err(TpuError::Unreachable(..)))),
            "{rs:?}"
        );
        // A batch larger than the streams in flight allowed is refused whole.
        let max = TpuConfig::default().max_streams;
        assert!(matches!(
            client.submit_batch(&wrong, (0..=max as u32).map(|i| tx(i, 0)).collect()),
            Err(TpuError::BatchTooLarge(n, m)) if n == max + 1 && m == max
        ));
        assert_eq!(
            client
                .stats
                .batch_too_large
                .load(std::sync::atomic::Ordering::Relaxed),
            max as u64 + 1,
            "counted, as `gw_sender_tpu_total{{event=\"batch_too_large\"}}`"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(agave.received().is_empty());
    });
}

fn send_request(w: &[u8], opts: serde_json::Value) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(w);
    let mut o = json!({"encoding": "base64"});
    for (k, v) in opts.as_object().unwrap() {
        o[k] = v.clone();
    }
    serde_json::to_vec(
        &json!({"jsonrpc": "2.0", "id": 1, "method": "sendTransaction", "params": [b64, o]}),
    )
    .unwrap()
}

/// `/api/rpc` of a running sidecar, over its HTTPS listener (HTTP/2, mutual TLS as
/// from Envoy): `sendTransaction` with Solana's preflight against the RPC node, then
/// the TPU route to Agave's server, which delivers each transaction byte-identical;
/// with `maxRetries` the rebroadcasts arrive too.
#[test]
fn json_rpc_send_transaction_over_https_reaches_agave_byte_identical_with_its_retries() {
    let _serial = serial();
    let node = RpcNode::start(2000);
    let d = testkit::TempDir::new("agave-rpc");
    let agave = AgaveTpu::start(&AgaveConfig::default(), &key(1)).unwrap();
    let mut cfg = common::config(&d.path().join("state"), true);
    cfg.file.sender = Some(
        serde_json::from_value(json!({
            "tpu": {},
            "leaders": {"static": [{
                "tpu_quic": agave.addr.to_string(),
                "identity": bs58::encode(agave.identity).into_string(),
            }]},
            "route_policy": "tpu_first",
            "adaptive": false,
            "rpc_node": {"url": node.url, "timeout_ms": 1000, "rebroadcast_ms": 100,
                         "max_age_secs": 30},
        }))
        .unwrap(),
    );
    cfg.tpu_identity = Some(key(2));
    let s = common::serve(cfg);
    // JSON-RPC sends are gated by the arbitrage module: start it, signed.
    let (status, r) = s.post_json("/api/control/module/arbitrage:start", &json!({}));
    assert_eq!((status, &r["applied"]), (200, &json!(true)), "{r}");
    let rpc = |w: &[u8], opts: serde_json::Value| {
        let body: serde_json::Value = serde_json::from_slice(&send_request(w, opts)).unwrap();
        let (status, r) = s.post_json("/api/rpc", &body);
        assert_eq!(status, 200, "JSON-RPC answers HTTP 200: {r}");
        r
    };
    let wait = |n: usize| s.rt.block_on(agave.wait_for(n, Duration::from_secs(20)));

    // 50 transactions, one copy each (maxRetries 0), after a passing preflight.
    let mut sent = Vec::new();
    for i in 0..50u32 {
        let w = tx(7_000 + i, (i as usize * 13) % 900);
        let sig = txwire::parse(&w, true).unwrap().signature_b58();
        let r = rpc(&w, json!({"maxRetries": 0}));
        assert_eq!(r["result"], sig, "{r}");
        sent.push(w.to_vec());
    }
    assert_eq!(wait(50), 50);
    assert_eq!(sorted(agave.received()), sorted(sent.clone()));

    // maxRetries 2: the first send and two rebroadcasts reach the server, each
    // byte-identical (deduplication is the validator's sigverify stage).
    let w = tx(9_999, 100);
    let r = rpc(&w, json!({"skipPreflight": true, "maxRetries": 2}));
    assert!(r["result"].is_string(), "{r}");
    assert_eq!(wait(53), 53);
    std::thread::sleep(Duration::from_millis(500));
    let copies = agave.received().iter().filter(|r| **r == w[..]).count();
    assert_eq!(copies, 3, "one send and two retries");
}

#[test]
fn a_spent_per_ip_budget_brings_no_reconnect_storm_and_nothing_is_lost_once_it_frees() {
    let _serial = serial();
    rt().block_on(async {
        let agave = AgaveTpu::start(&AgaveConfig::default(), &key(1)).unwrap();
        let direct = Leader {
            tpu_quic: agave.addr,
            identity: Some(agave.identity),
        };
        // Eight other peers on this address spend its budget (8 per minute); the
        // server then completes each new handshake and closes it: 2 "disallowed".
        let neighbours: Vec<_> = (0..8)
            .map(|i| TpuClient::new(TpuConfig::default(), &key(70 + i)).unwrap())
            .collect();
        for n in &neighbours {
            n.prewarm(&[direct]);
        }
        let start = Instant::now();
        while neighbours
            .iter()
            .any(|n| n.connection(agave.addr).is_none())
        {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "neighbours connect"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // They leave: their connections would otherwise fill the 8 slots the server
        // gives one unstaked address (it would close ours with 4 "too_many").
        for n in &neighbours {
            n.close();
        }
        drop(neighbours);

        // Our route reaches the server through a relay that counts handshakes the
        // way the server's network sees them.
        let path = DelayProxy::start(agave.addr, Duration::ZERO);
        let leader = Leader {
            tpu_quic: path.addr,
            identity: Some(agave.identity),
        };
        let client = TpuClient::new(TpuConfig::default(), &key(2)).unwrap();
        let t0 = Instant::now();
        client.prewarm(&[leader]);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            path.handshakes_since(t0),
            1,
            "a refusing leader is not retried while there is nothing to send"
        );
        assert_eq!(
            closes(&client, "disallowed"),
            1,
            "Agave refused with code 2"
        );

        // Work queued all the time for 10 s: a handful of handshakes, and every
        // transaction answered (so the sender can hedge it), none left hanging.
        let t1 = Instant::now();
        let mut i = 0;
        let (mut refused, mut delivered) = (0, Vec::new());
        while t1.elapsed() < Duration::from_secs(10) {
            i += 1;
            let w = tx(i, 0);
            let d = client.submit(&leader, w.clone()).unwrap();
            match tokio::time::timeout(Duration::from_secs(3), d).await {
                Ok(Ok(Err(
                    TpuError::Unreachable(..) | TpuError::Stream(..) | TpuError::Unread(..),
                ))) => refused += 1,
                Ok(Ok(Ok(()))) => delivered.push(w.to_vec()),
                other => panic!("transaction {i}: {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let during = path.handshakes_since(t1);
        println!(
            "agave per-IP budget spent: 1 handshake in 3 s of pre-warm, {during} in 10 s with \
             work queued ({refused} answered refused, {} delivered)",
            delivered.len()
        );
        assert!(
            (1..=5).contains(&during),
            "{during} handshakes in 10 s with work queued (≤ 5)"
        );
        assert!(
            refused >= 50,
            "{refused} transactions answered while refused"
        );
        let reasons: Vec<String> = CLOSE_REASONS
            .iter()
            .map(|r| format!("{r}={}", closes(&client, r)))
            .collect();
        println!("closes so far: {}", reasons.join(" "));

        // The budget frees (one connection per 7.5 s): the route gets through and
        // from then on every transaction arrives, byte-identical.
        let deadline = Instant::now() + Duration::from_secs(70);
        loop {
            i += 1;
            let w = tx(i, 0);
            let d = client.submit(&leader, w.clone()).unwrap();
            if let Ok(Ok(Ok(()))) = tokio::time::timeout(Duration::from_secs(3), d).await {
                delivered.push(w.to_vec());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the budget freed, the route did not reconnect"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut pending = Vec::new();
        for k in 0..200 {
            let w = tx(1_000_000 + k, 0);
            pending.push(client.submit(&leader, w.clone()).unwrap());
            delivered.push(w.to_vec());
        }
        for p in pending {
            assert_eq!(p.await.unwrap(), Ok(()));
        }
        let n = delivered.len();
        assert_eq!(agave.wait_for(n, Duration::from_secs(20)).await, n);
        assert_eq!(
            sorted(agave.received()),
            sorted(delivered),
            "nothing lost, nothing changed"
        );
        println!("… then {n} transactions delivered once the budget freed");
    });
}
