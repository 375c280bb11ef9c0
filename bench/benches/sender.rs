//! The sender's data plane, same run, ratios against baselines measured here:
//! 1. Transactions/s over one QUIC connection to the local TPU receiver: raw quinn
//!    (open_uni, write, finish, wait for the ACK; ≤ 128 streams in flight) vs our TPU
//!    route (all queued at once with `TpuClient::submit`: per-leader queue and
//!    worker; and one at a time, 128 outstanding, with `TpuClient::send`, as the
//!    hedged send uses it) vs the whole hedged `Sender::send` (target ≥ 0.9× raw),
//!    TPU only and with a relay configured (the hedge armed for every send). Two raw
//!    baselines: quinn's defaults (round-robin between streams) and streams sent
//!    whole (`send_fairness(false)`, the route's setting). Rounds alternate the
//!    paths; each ratio is against the raw run of its own round (each round starting
//!    at another path), and the table gives medians (`GW_BENCH_SENDER_ROUNDS`,
//!    default 10); each round's rates are printed too. Also the process's CPU time
//!    per transaction (the receiver's included: the same for every path). The
//!    binary uses the sidecar's allocator (mimalloc).
//!
//!    Every path runs in a task on the runtime's two workers, as gw-sidecar's sends
//!    do (a task per request). `GW_BENCH_SENDER_ON_MAIN=1` runs them from the main
//!    thread (`block_on`, how this benchmark ran before 2026-12-04, night): a third
//!    thread on the two cores, where raw quinn's rate jumps between ≈ 130 k, 340 k
//!    and 560 k tx/s from one connection to the next.
//! 2. Hedge timing: primary leader silent, relay answering; how late the hedge goes
//!    out relative to `hedge_delay` (p50/p99).
//!
//! 3. What one clock read costs, `std::time::Instant` vs `quanta::Instant`.
//!
//! Run with `bash bench/run.sh sender`. Profiling aid: `GW_BENCH_ONLY=<path's row,
//! from 0>` runs that path alone, 20 times (e.g. under `perf record -e cpu-clock`).
//! A/B aid: `GW_BENCH_PATHS=0,3,4` alternates only those rows, 40 rounds, and prints
//! each one's median.

/// The sidecar binary's allocator (`sidecar/src/main.rs`), for raw quinn too.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

/// `whole`: streams sent one after another (`send_fairness(false)`, as the TPU
/// route and Agave's clients send them); otherwise quinn's default round-robin.
async fn raw_quinn(addr: std::net::SocketAddr, txs: &[Bytes], whole: bool) -> f64 {
    let id = tls::identity_cert(&SigningKey::from_bytes(&[6u8; 32])).unwrap();
    let crypto = tls::client_crypto(&id, None).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap(),
    ));
    if whole {
        let mut t = quinn::TransportConfig::default();
        t.send_fairness(false);
        cfg.transport_config(Arc::new(t));
    }
    ep.set_default_client_config(cfg);
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

/// A TPU client connected to the receiver at `addr`, and that leader.
async fn connected_client(addr: std::net::SocketAddr) -> (Arc<TpuClient>, Leader) {
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
    (client, l)
}

async fn ours_tpu(addr: std::net::SocketAddr, txs: &[Bytes]) -> f64 {
    let (client, l) = connected_client(addr).await;
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

/// One at a time with `TpuClient::send`, `window` outstanding (on this task when
/// the connection is up and a stream free, as `Sender::send` sends).
async fn ours_tpu_send(addr: std::net::SocketAddr, txs: &[Bytes], window: usize) -> f64 {
    let (client, l) = connected_client(addr).await;
    let t = Instant::now();
    let mut inflight = FuturesUnordered::new();
    for w in txs {
        if inflight.len() >= window {
            inflight.next().await;
        }
        inflight.push(client.send(&l, w.clone()).unwrap());
    }
    while let Some(r) = inflight.next().await {
        r.unwrap().unwrap();
    }
    let r = txs.len() as f64 / t.elapsed().as_secs_f64();
    client.close();
    r
}

/// A sender for `cfg` whose one leader is the TPU at `addr`.
fn one_leader_sender(cfg: &SenderConfig, addr: std::net::SocketAddr) -> Arc<Sender> {
    let leaders: Arc<dyn LeaderSource> = Arc::new(StaticLeaders::from_leaders(vec![Leader {
        tpu_quic: addr,
        identity: None,
    }]));
    Sender::new(
        cfg,
        &SigningKey::from_bytes(&[6u8; 32]),
        Some(leaders),
        None,
    )
    .unwrap()
}

/// `window`: sends the caller keeps outstanding (the route keeps at most 128
/// streams in flight either way; the rest wait in the leader's queue).
async fn ours_hedged(
    addr: std::net::SocketAddr,
    txs: &[Bytes],
    relay: Option<&str>,
    window: usize,
) -> f64 {
    let mut cfg = serde_json::json!({
        "tpu": {"queue_per_leader": 65536},
        "leaders": {"static": []},
        "adaptive": false,
    });
    if let Some(url) = relay {
        cfg["relay"] = serde_json::json!({ "url": url });
    }
    let cfg: SenderConfig = serde_json::from_value(cfg).unwrap();
    let sender = one_leader_sender(&cfg, addr);
    sender.refresh_leaders();
    while sender.tpu().unwrap().connection(addr).is_none() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let meta = SendMeta::default();
    let t = Instant::now();
    let mut inflight = FuturesUnordered::new();
    for w in txs {
        if inflight.len() >= window {
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

/// The process's CPU time (user + system) in clock ticks of 10 ms.
fn cpu_ticks() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return 0;
    };
    // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
    let rest = s.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split(' ').collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    tick(11) + tick(12)
}

/// The `p` quantile, interpolated between neighbours (the median of an even
/// count is the mean of the middle two).
fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let x = (v.len() as f64 - 1.0) * p;
    let (lo, hi) = (x.floor() as usize, x.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (x - lo as f64)
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
    let rx_addr = rx.addr;
    let driver = async move {
        let txs = txs(50_000);
        let relay = testkit::relay::Relay::start(None);
        // Warm up both paths once.
        raw_quinn(rx_addr, &txs[..2000], false).await;
        ours_tpu(rx_addr, &txs[..2000]).await;
        // Sends a hedged-sender run keeps outstanding (`GW_BENCH_SENDER_WINDOW` for
        // experiments; 1 024 changed little on 2026-12-02, `docs/benchmarks.md`).
        let window: usize = std::env::var("GW_BENCH_SENDER_WINDOW")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(128)
            .max(1);
        let run = |i: usize| {
            let (txs, relay) = (&txs, &relay.url);
            async move {
                match i {
                    0 => raw_quinn(rx_addr, txs, false).await,
                    1 => raw_quinn(rx_addr, txs, true).await,
                    2 => ours_tpu(rx_addr, txs).await,
                    3 => ours_tpu_send(rx_addr, txs, window).await,
                    4 => ours_hedged(rx_addr, txs, None, window).await,
                    _ => ours_hedged(rx_addr, txs, Some(relay), window).await,
                }
            }
        };
        // Only some paths, alternating, 40 rounds (A/B experiments: the rounds of
        // one run are what can be compared on this VM).
        if let Ok(list) = std::env::var("GW_BENCH_PATHS") {
            let paths: Vec<usize> = list
                .split(',')
                .filter_map(|p| p.trim().parse().ok())
                .collect();
            let mut rates = vec![Vec::new(); paths.len()];
            for n in 0..40 {
                for k in 0..paths.len() {
                    let j = (k + n) % paths.len();
                    rates[j].push(run(paths[j]).await);
                }
            }
            for (p, r) in paths.iter().zip(&mut rates) {
                println!(
                    "path {p}: median {:.0} tx/s over 40 rounds",
                    percentile(r, 0.5)
                );
            }
            return;
        }
        if let Some(only) = std::env::var("GW_BENCH_ONLY")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
        {
            for _ in 0..20 {
                println!("path {only}: {:.0} tx/s", run(only).await);
            }
            return;
        }
        let rounds: usize = std::env::var("GW_BENCH_SENDER_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10)
            .max(1);
        const PATHS: [&str; 6] = [
            "raw quinn uni streams (baseline, quinn's defaults)",
            "raw quinn, streams sent whole (the route's transport setting)",
            "TPU route, all queued at once (queue + worker, `TpuClient::submit`)",
            "TPU route, one at a time (`TpuClient::send`, 128 outstanding)",
            "sender (`Sender::send`, TPU only: nothing to hedge to; 128 sends outstanding)",
            "hedged sender with a relay configured (hedge armed, 128 outstanding)",
        ];
        let mut rate = vec![Vec::new(); PATHS.len()];
        let mut ratio = vec![Vec::new(); PATHS.len()];
        let mut same = vec![Vec::new(); PATHS.len()];
        let mut cpu = [0u64; PATHS.len()];
        for n in 0..rounds {
            let mut round = [0f64; PATHS.len()];
            // Each round starts at another path: a drift of the shared VM within a
            // round does not always favour the same one.
            for k in 0..PATHS.len() {
                let i = (k + n) % PATHS.len();
                let c0 = cpu_ticks();
                round[i] = run(i).await;
                cpu[i] += cpu_ticks() - c0;
            }
            println!(
                "round {n}: {} tx/s",
                round
                    .iter()
                    .map(|r| format!("{r:.0}"))
                    .collect::<Vec<_>>()
                    .join(" / ")
            );
            for i in 0..PATHS.len() {
                rate[i].push(round[i]);
                ratio[i].push(round[i] / round[0]);
                same[i].push(round[i] / round[1]);
            }
        }
        println!("\n## transactions/s over one QUIC connection to the local TPU receiver (50 000 × {} bytes, each acknowledged; {rounds} alternating rounds, medians)", txs[0].len());
        println!("| path | tx/s | vs raw quinn (same round) | range | vs raw, streams whole | CPU µs/tx |");
        println!("|---|---:|---:|---:|---:|---:|");
        for i in 0..PATHS.len() {
            let med = percentile(&mut rate[i], 0.5);
            let r = percentile(&mut ratio[i], 0.5);
            let (lo, hi) = (ratio[i][0], ratio[i][ratio[i].len() - 1]);
            let w = percentile(&mut same[i], 0.5);
            let us = cpu[i] as f64 * 10_000.0 / (rounds * txs.len()) as f64;
            println!(
                "| {} | {med:.0} | {r:.2}x | {lo:.2}–{hi:.2} | {w:.2}x | {us:.2} |",
                PATHS[i]
            );
        }

        // What a clock read costs: the one-route send reads the CPU's counter
        // (`quanta`) instead of the system's monotonic clock.
        let per_read = |f: &dyn Fn()| {
            let t = Instant::now();
            for _ in 0..5_000_000 {
                f();
            }
            t.elapsed().as_secs_f64() * 1e9 / 5e6
        };
        let _ = quanta::Instant::now();
        let std_ns = per_read(&|| {
            std::hint::black_box(Instant::now());
        });
        let quanta_ns = per_read(&|| {
            std::hint::black_box(quanta::Instant::now());
        });
        println!(
            "\n## a clock read: std::time::Instant {std_ns:.1} ns, quanta::Instant {quanta_ns:.1} ns ({:.2}x)",
            quanta_ns / std_ns
        );

        // Hedge timing: the leader is silent (no answer, no error), the relay answers.
        let path = testkit::udp_delay::DelayProxy::start(rx_addr, Duration::ZERO);
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
            let sender = one_leader_sender(&cfg, path.addr);
            let mut after = Vec::new();
            for w in txs.iter().take(200) {
                let out = sender
                    .send(w.clone(), String::new(), &SendMeta::default())
                    .await;
                assert!(out.hedged && out.landed.is_some(), "{out:?}");
                after.push(out.hedged_after.unwrap().as_secs_f64() * 1e3);
            }
            let d = delay_ms as f64;
            let (p50, p99) = (percentile(&mut after, 0.5), percentile(&mut after, 0.99));
            println!(
                "| {delay_ms} ms | {p50:.3} ms | {p99:.3} ms | +{:.3} ms | +{:.3} ms |",
                p50 - d,
                p99 - d
            );
            sender.tpu().unwrap().close();
        }
    };
    if std::env::var_os("GW_BENCH_SENDER_ON_MAIN").is_some() {
        rt.block_on(driver);
    } else {
        rt.block_on(rt.spawn(driver)).unwrap();
    }
    drop(rx);
}
