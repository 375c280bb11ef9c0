//! The sender's data plane, same run, ratios against baselines measured here:
//! 1. Transactions/s over one QUIC connection to the local TPU receiver: raw quinn
//!    (open_uni, write, finish, wait for the ACK; ≤ 128 streams in flight) vs our TPU
//!    route (`TpuClient::submit`, per-leader queue and worker) vs the whole hedged
//!    `Sender::send` (target ≥ 0.9× raw).
//! 2. Hedge timing: primary leader silent, relay answering; how late the hedge goes
//!    out relative to `hedge_delay` (p50/p99).
//!
//! Run with `bash bench/run.sh sender`. Profiling aid: `GW_BENCH_HEDGED_ONLY=1`
//! (e.g. under `perf record -e cpu-clock`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use futures_util::stream::{FuturesUnordered, StreamExt};
use gw_sidecar::sender::leaders::{LeaderSource, StaticLeaders};
use gw_sidecar::sender::tpu::{Leader, TpuClient, TpuConfig};
use gw_sidecar::sender::{tls, txwire, SendMeta, Sender, SenderConfig};
use testkit::tpu_receiver::{ReceiverConfig, TpuReceiver};

fn txs(n: usize) -> Vec<Bytes> {
    let k = SigningKey::from_bytes(&[5u8; 32]);
    (0..n)
        .map(|i| {
            let mut bh = [0u8; 32];
            bh[..8].copy_from_slice(&(i as u64).to_le_bytes());
            Bytes::from(txwire::example_tx(&k, bh, 100))
        })
        .collect()
}

async fn raw_quinn(addr: std::net::SocketAddr, txs: &[Bytes]) -> f64 {
    let id = tls::identity_cert(&SigningKey::from_bytes(&[6u8; 32])).unwrap();
    let crypto = tls::client_crypto(&id, None).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap(),
    )));
    let conn = ep.connect(addr, "connect").unwrap().await.unwrap();
    let t = Instant::now();
    let mut inflight = FuturesUnordered::new();
    for w in txs {
        if inflight.len() >= 128 {
            inflight.next().await;
        }
        let conn = conn.clone();
        let w = w.clone();
        inflight.push(async move {
            let mut s = conn.open_uni().await.unwrap();
            s.write_all(&w).await.unwrap();
            s.finish().unwrap();
            s.stopped().await.unwrap();
        });
    }
    while inflight.next().await.is_some() {}
    let r = txs.len() as f64 / t.elapsed().as_secs_f64();
    conn.close(0u32.into(), b"");
    r
}

async fn ours_tpu(addr: std::net::SocketAddr, txs: &[Bytes]) -> f64 {
    let cfg: TpuConfig =
        serde_json::from_value(serde_json::json!({"queue_per_leader": 65536})).unwrap();
    let client = TpuClient::new(cfg, &SigningKey::from_bytes(&[6u8; 32])).unwrap();
    let l = Leader {
        tpu_quic: addr,
        identity: None,
    };
    client.prewarm(&[l]);
    while client.connection(addr).is_none() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    let waits: Vec<_> = txs
        .iter()
        .map(|w| client.submit(&l, w.clone()).unwrap())
        .collect();
    for w in waits {
        w.await.unwrap().unwrap();
    }
    let r = txs.len() as f64 / t.elapsed().as_secs_f64();
    client.close();
    r
}

async fn ours_hedged(addr: std::net::SocketAddr, txs: &[Bytes]) -> f64 {
    let cfg: SenderConfig = serde_json::from_value(serde_json::json!({
        "tpu": {"queue_per_leader": 65536},
        "leaders": {"static": []},
        "adaptive": false,
    }))
    .unwrap();
    let leaders: Arc<dyn LeaderSource> = Arc::new(StaticLeaders::from_leaders(vec![Leader {
        tpu_quic: addr,
        identity: None,
    }]));
    let sender = Sender::new(
        &cfg,
        &SigningKey::from_bytes(&[6u8; 32]),
        Some(leaders),
        None,
    )
    .unwrap();
    sender.refresh_leaders();
    while sender.tpu().unwrap().connection(addr).is_none() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let meta = SendMeta::default();
    let t = Instant::now();
    let mut inflight = FuturesUnordered::new();
    for w in txs {
        if inflight.len() >= 128 {
            inflight.next().await;
        }
        let s = &sender;
        let w = w.clone();
        let meta = &meta;
        inflight.push(async move {
            let out = s.send(w, String::new(), meta).await;
            assert!(out.landed.is_some(), "{out:?}");
        });
    }
    while inflight.next().await.is_some() {}
    let r = txs.len() as f64 / t.elapsed().as_secs_f64();
    sender.tpu().unwrap().close();
    r
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // The receiver is the network peer: its own runtime, like a remote validator.
    let peer_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let rx = peer_rt
        .block_on(async {
            TpuReceiver::start(
                ReceiverConfig {
                    keep: false,
                    ..ReceiverConfig::default()
                },
                &SigningKey::from_bytes(&[1u8; 32]),
            )
        })
        .unwrap();
    rt.block_on(async {
        let txs = txs(50_000);
        // Warm up both paths once.
        raw_quinn(rx.addr, &txs[..2000]).await;
        ours_tpu(rx.addr, &txs[..2000]).await;
        let mut raw = 0f64;
        let mut tpu = 0f64;
        let mut hedged = 0f64;
        if std::env::var_os("GW_BENCH_HEDGED_ONLY").is_some() {
            for _ in 0..10 {
                println!("hedged: {:.0} tx/s", ours_hedged(rx.addr, &txs).await);
            }
            return;
        }
        for _ in 0..5 {
            raw = raw.max(raw_quinn(rx.addr, &txs).await);
            tpu = tpu.max(ours_tpu(rx.addr, &txs).await);
            hedged = hedged.max(ours_hedged(rx.addr, &txs).await);
        }
        println!("\n## transactions/s over one QUIC connection to the local TPU receiver (50 000 × {} bytes, each acknowledged, best of 5 alternating rounds)", txs[0].len());
        println!("| path | tx/s | vs raw quinn |");
        println!("|---|---:|---:|");
        println!("| raw quinn uni streams (baseline) | {raw:.0} | 1.00x |");
        println!("| TPU route (queue + worker, `TpuClient::submit`) | {tpu:.0} | {:.2}x |", tpu / raw);
        println!("| hedged sender (`Sender::send`, TPU only, 128 in flight) | {hedged:.0} | {:.2}x |", hedged / raw);

        // Hedge timing: the leader is silent (no answer, no error), the relay answers.
        let relay = testkit::relay::Relay::start(None);
        let path = testkit::udp_delay::DelayProxy::start(rx.addr, Duration::ZERO);
        path.set_blackhole(true);
        println!("\n## hedge timing: primary silent, relay answering (200 sends each)");
        println!("| hedge_delay | hedge sent after, p50 | p99 | error p50 | error p99 |");
        println!("|---:|---:|---:|---:|---:|");
        for delay_ms in [2u64, 10] {
            let cfg: SenderConfig = serde_json::from_value(serde_json::json!({
                "tpu": {"connect_timeout_ms": 60000},
                "relay": {"url": relay.url},
                "leaders": {"static": []},
                "hedge_delay_ms": delay_ms,
                "adaptive": false,
            }))
            .unwrap();
            let leaders: Arc<dyn LeaderSource> = Arc::new(StaticLeaders::from_leaders(vec![Leader {
                tpu_quic: path.addr,
                identity: None,
            }]));
            let sender = Sender::new(&cfg, &SigningKey::from_bytes(&[6u8; 32]), Some(leaders), None).unwrap();
            let mut after = Vec::new();
            for w in txs.iter().take(200) {
                let out = sender.send(w.clone(), String::new(), &SendMeta::default()).await;
                assert!(out.hedged && out.landed.is_some(), "{out:?}");
                after.push(out.hedged_after.unwrap().as_secs_f64() * 1e3);
            }
            let d = delay_ms as f64;
            let (p50, p99) = (percentile(&mut after, 0.5), percentile(&mut after, 0.99));
            println!("| {delay_ms} ms | {p50:.3} ms | {p99:.3} ms | +{:.3} ms | +{:.3} ms |", p50 - d, p99 - d);
            sender.tpu().unwrap().close();
        }
    });
}
