//! The hot path the specification means (#19 point 6), same run, one opportunity at
//! a time (latency, not throughput):
//! - **QUIC**: a searcher writes a `hotpath.Opportunity` frame on its stream to the
//!   ingest endpoint; the ingest thread decodes and checks it and pushes it into the
//!   ring; the strategy thread decides and the TPU route sends it;
//! - **direct** (baseline): an in-process producer calls `HotPath::offer` with the
//!   same opportunity (already decoded and checked).
//!
//! Measured from the producer's write / call to the transaction's stream being
//! complete at the TPU receiver on the other end of a warm QUIC connection, p50 / p99 in µs, in
//! interleaved rounds (medians); and the gateway's own "received → send decision"
//! histogram (log₂ µs buckets) for each path.
//!
//! Run with `bash bench/run.sh hotpath`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use gw_core::module_state::{ModuleState, RunState};
use gw_core::Module;
use gw_proto::hotpath;
use gw_sidecar::control::ModuleTable;
use gw_sidecar::sender::ingest;
use gw_sidecar::sender::leaders::{LeaderSource, StaticLeaders};
use gw_sidecar::sender::strategy::{HotPath, Opportunity, SignedTx, StrategyConfig};
use gw_sidecar::sender::tpu::Leader;
use gw_sidecar::sender::{txwire, Sender, SenderConfig};
use serde_json::json;
use testkit::tpu_receiver::{ReceiverConfig, TpuReceiver};

fn key(b: u8) -> SigningKey {
    SigningKey::from_bytes(&[b; 32])
}

fn tx(i: u32) -> Vec<u8> {
    let mut bh = [0u8; 32];
    bh[..4].copy_from_slice(&i.to_le_bytes());
    txwire::example_tx(&key(50), bh, 120)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p) as usize]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// p50 / p99 bucket bounds (µs) of the decision histogram's counts `now - before`.
fn hist_pct(before: &[(u64, u64)], now: &[(u64, u64)]) -> (u64, u64) {
    let d: Vec<(u64, u64)> = now
        .iter()
        .zip(before)
        .map(|((le, n), (_, m))| (*le, n - m))
        .collect();
    let total: u64 = d.iter().map(|x| x.1).sum();
    let at = |p: f64| {
        let want = (total as f64 * p).ceil() as u64;
        let mut acc = 0;
        for (le, n) in &d {
            acc += n;
            if acc >= want.max(1) {
                return *le;
            }
        }
        u64::MAX
    };
    (at(0.5), at(0.99))
}

async fn arrival(rx: &TpuReceiver, n: u64) -> Instant {
    assert_eq!(rx.wait_for(n, Duration::from_secs(5)).await, n, "lost");
    rx.last_at().unwrap()
}

fn main() {
    let per_round: u32 = std::env::var("GW_HOTPATH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let rounds = 5;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _g = rt.enter();
    let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
    let cfg: SenderConfig = serde_json::from_value(json!({
        "tpu": {}, "leaders": {"static": []}, "route_policy": "tpu_first",
    }))
    .unwrap();
    let leaders: Arc<dyn LeaderSource> = Arc::new(StaticLeaders::from_leaders(vec![Leader {
        tpu_quic: rx.addr,
        identity: Some(rx.identity),
    }]));
    let sender = Sender::new(&cfg, &key(2), Some(leaders), None).unwrap();
    let modules = ModuleTable::new();
    modules.set(
        Module::Mev,
        ModuleState {
            state: RunState::Running,
            ..ModuleState::default()
        },
    );
    let allow = bs58::encode(key(30).verifying_key().to_bytes()).into_string();
    let strategy: StrategyConfig = serde_json::from_value(json!({
        "ingest": {"bind": "127.0.0.1:0", "allow": [allow]},
    }))
    .unwrap();
    let hot = Arc::new(
        HotPath::start(
            &strategy,
            sender,
            modules,
            None,
            rt.handle().clone(),
            Some(&key(2)),
        )
        .unwrap(),
    );
    let addr = hot.ingest_addr.unwrap();
    let server = Some(key(2).verifying_key().to_bytes());
    rt.block_on(async {
        let conn = ingest::connect(addr, &key(30), server).await.unwrap();
        let mut stream = conn.open_uni().await.unwrap();
        let mut seq = 0u32;
        let mut count = 0u64;
        // Warm-up: the TPU connection and both paths.
        for _ in 0..50 {
            seq += 1;
            let o = hotpath::Opportunity {
                module: "mev".into(),
                features: vec![],
                ev: Some(1.0),
                txs: vec![tx(seq)],
            };
            stream.write_all(&ingest::frame(&o)).await.unwrap();
            count += 1;
            arrival(&rx, count).await;
        }
        let (mut q50, mut q99, mut d50, mut d99) = (vec![], vec![], vec![], vec![]);
        let (mut qh, mut dh) = (vec![], vec![]);
        for round in 0..rounds {
            for quic_first in [round % 2 == 0, round % 2 != 0] {
                let before = hot.stats.decision_buckets();
                let mut lat = Vec::with_capacity(per_round as usize);
                for _ in 0..per_round {
                    seq += 1;
                    let w = tx(seq);
                    let t0;
                    if quic_first {
                        let o = hotpath::Opportunity {
                            module: "mev".into(),
                            features: vec![],
                            ev: Some(1.0),
                            txs: vec![w],
                        };
                        let f = ingest::frame(&o);
                        t0 = Instant::now();
                        stream.write_all(&f).await.unwrap();
                    } else {
                        let signature = txwire::parse(&w, true).unwrap().signature_b58();
                        t0 = Instant::now();
                        let o = Opportunity {
                            module: Module::Mev,
                            features: vec![],
                            ev: Some(1.0),
                            txs: vec![SignedTx {
                                wire: w.into(),
                                signature,
                            }],
                            received: t0,
                            requester: Default::default(),
                        };
                        // Blocks this (block_on) thread until the ingest thread
                        // answered; the runtime's workers and the hot path's
                        // threads go on meanwhile.
                        assert_eq!(hot.offer(vec![o]), 1);
                    }
                    count += 1;
                    let at = arrival(&rx, count).await;
                    lat.push(at.duration_since(t0).as_secs_f64() * 1e6);
                }
                let h = hist_pct(&before, &hot.stats.decision_buckets());
                let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
                if quic_first {
                    q50.push(p50);
                    q99.push(p99);
                    qh.push(h);
                } else {
                    d50.push(p50);
                    d99.push(p99);
                    dh.push(h);
                }
            }
            println!(
                "  round {round}: QUIC frame → TPU p50 {:.0} p99 {:.0} µs | direct offer → TPU p50 {:.0} p99 {:.0} µs",
                q50.last().unwrap(),
                q99.last().unwrap(),
                d50.last().unwrap(),
                d99.last().unwrap()
            );
        }
        let (a50, a99, b50, b99) = (median(q50), median(q99), median(d50), median(d99));
        println!(
            "hot path, {per_round} opportunities one at a time × {rounds} rounds, medians: \
             QUIC frame → stream complete at the TPU receiver p50 {a50:.0} µs p99 {a99:.0} µs; \
             direct in-process offer p50 {b50:.0} µs p99 {b99:.0} µs; QUIC / direct = {:.2}× / {:.2}×",
            a50 / b50,
            a99 / b99
        );
        let fmt = |v: &[(u64, u64)]| {
            v.iter()
                .map(|(a, b)| format!("≤{a}/≤{b}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "received → send decision (µs, log₂ bucket bounds, p50/p99 per round): QUIC {} | direct {}",
            fmt(&qh),
            fmt(&dh)
        );
        let _ = stream.finish();
    });
}
