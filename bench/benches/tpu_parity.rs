//! Parity with Agave's TPU client (#19 point 3): our TPU route (`TpuClient`) and
//! `solana-tpu-client-next` 3.1.14 (`tests/agave-tpu`'s `next-load`) send the same
//! transactions to the same Agave TPU server (`solana-streamer` 3.1.14, a
//! validator's limits), in interleaved rounds, with the same identity and stake.
//! Both clients run as processes of their own with the same protocol: ours is this
//! binary started again with `GW_PARITY_CHILD=ours`.
//!
//! Per round: delivered tx/s = transactions / (the server's last delivery − the
//! first submit after warm-up), and the latency of each transaction from its
//! submit to the server handing it to its consumer (the server's clock; both
//! processes on this machine). Medians over rounds; the ratio is ours / theirs.
//!
//! Two loads, staked: all of a round queued at once (the rate, and latencies that
//! are mostly queueing), and paced, one transaction every `GW_PARITY_PACE_US` µs
//! (1 000), as a node sends what it finds: latencies that are the path's own.
//! Paced, ours sends each as gw-sidecar does: `TpuClient::send` (on the sending
//! task when the connection is up and a stream free) in a task of its own per
//! transaction; `GW_PARITY_PACED_API=submit` queues each to the leader's worker
//! instead.
//!
//! Run with `bash bench/run.sh parity` (it builds both Agave binaries). Rounds:
//! `GW_PARITY_ROUNDS` (default 3 each), staked round size `GW_PARITY_TXS` (50 000),
//! paced round size `GW_PARITY_PACED_TXS` (10 000), loads `GW_PARITY_LOADS`
//! (`staked,paced,unstaked`), our client's scheduling slice `GW_PARITY_SLICE_US`
//! (µs; 0, the kernel's, as gw-sidecar keeps it with a sender). Agave's server
//! allows 8 new connections per minute from one IP, so every 3 rounds start a
//! server of their own.
//! Profiling aid: `GW_PARITY_PROFILE=1` runs only our client, in this process.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use gw_sidecar::sender::tpu::{
    Leader, TpuClient, TpuConfig, TpuError, STAKED_STREAMS_MAX, UNSTAKED_STREAMS,
};
use gw_sidecar::sender::txwire;
use testkit::agave_tpu::{AgaveConfig, AgaveTpu};

/// The environment variable `key` parsed, or `default` when unset or unparsable.
fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// `n` distinct signed transactions of `pad` bytes of data, tagged by `round`.
fn txs(round: u32, n: usize, pad: usize) -> Vec<Bytes> {
    let k = SigningKey::from_bytes(&[5u8; 32]);
    (0..n)
        .map(|i| {
            let mut bh = [0u8; 32];
            bh[..4].copy_from_slice(&round.to_le_bytes());
            bh[4..12].copy_from_slice(&(i as u64).to_le_bytes());
            Bytes::from(txwire::example_tx(&k, bh, pad))
        })
        .collect()
}

struct Round {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// The client's CPU time (user + system) per transaction, µs.
    cpu_us: f64,
    /// How long the client took to take the round's transactions after the
    /// warm-up (last submit − first), ms: a client whose submit call waits spreads
    /// its submit times, and each latency then starts later.
    span_ms: f64,
    /// p50 and p99 counted from the round's first submit for every transaction
    /// (the time a queued load meant to send them all), ms.
    p50_start_ms: f64,
    p99_start_ms: f64,
}

impl Round {
    /// The round as printed; `queued`: with the figures from the round's start.
    fn line(&self, queued: bool) -> String {
        let mut out = format!(
            "{:.0} tx/s p50 {:.2} p99 {:.2} ms cpu {:.1} µs/tx",
            self.rate, self.p50_ms, self.p99_ms, self.cpu_us
        );
        if queued {
            out += &format!(
                ", submits over {:.1} ms, p50 / p99 from the start {:.2} / {:.2} ms",
                self.span_ms, self.p50_start_ms, self.p99_start_ms
            );
        }
        out
    }
}

/// User + system CPU time of process `pid` so far, µs (Linux `/proc`).
fn cpu_us(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 14th
    // field of the line, stime the 15th, in clock ticks (100 per second here).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) * 10_000.0
}

/// Matches what the server delivered since `before` with the submit times, by bytes.
async fn measure(agave: &AgaveTpu, before: usize, sent: &[Bytes], submits: &[u64]) -> Round {
    let n = sent.len();
    let got = agave.wait_for(before + n, Duration::from_secs(120)).await;
    assert_eq!(
        got,
        before + n,
        "the server delivered {} of {n}",
        got - before
    );
    let submitted: HashMap<&[u8], u64> = sent
        .iter()
        .map(|t| &t[..])
        .zip(submits.iter().copied())
        .collect();
    let deliveries = agave.deliveries();
    let mut lat: Vec<u64> = Vec::with_capacity(n);
    let mut last = 0;
    for (at, tx) in &deliveries[before..] {
        let sub = submitted
            .get(&tx[..])
            .expect("a transaction that was not sent arrived");
        lat.push(at.saturating_sub(*sub));
        last = last.max(*at);
    }
    // The first transaction is the warm-up (connection set-up) for both clients.
    let first = submits[1];
    let mut from_start: Vec<u64> = deliveries[before..]
        .iter()
        .map(|(at, _)| at.saturating_sub(first))
        .collect();
    lat.sort_unstable();
    from_start.sort_unstable();
    let pct = |l: &[u64], p: f64| l[((l.len() - 1) as f64 * p) as usize] as f64 / 1e6;
    Round {
        rate: (n - 1) as f64 / ((last - first) as f64 / 1e9),
        p50_ms: pct(&lat, 0.5),
        p99_ms: pct(&lat, 0.99),
        cpu_us: 0.0,
        span_ms: submits[n - 1].saturating_sub(first) as f64 / 1e6,
        p50_start_ms: pct(&from_start, 0.5),
        p99_start_ms: pct(&from_start, 0.99),
    }
}

/// Transactions per submitted batch, as `next-load` sends them (its default).
const BATCH: usize = 64;

/// Our client sends `sent` to `leader` the way `next-load` does (the first alone,
/// 500 ms, then the rest in batches of [`BATCH`] with `submit_batch`; one at a
/// time with `GW_PARITY_BATCH=1`, or one every `pace` µs); returns each one's
/// submit time and the acknowledgements to wait for.
async fn our_submits(
    client: &TpuClient,
    leader: &Leader,
    sent: &[Bytes],
    pace: Option<u64>,
) -> (Vec<u64>, Vec<Ack>) {
    let batch: usize = env_or("GW_PARITY_BATCH", BATCH);
    let paced_queued = std::env::var("GW_PARITY_PACED_API").is_ok_and(|v| v == "submit");
    let mut submits = Vec::with_capacity(sent.len());
    submits.push(now_ns());
    client
        .submit(leader, sent[0].clone())
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut acks = Vec::with_capacity(sent.len());
    if let Some(pace) = pace {
        let start = tokio::time::Instant::now();
        for (i, w) in sent[1..].iter().enumerate() {
            let due = Duration::from_micros(pace.saturating_mul(i as u64));
            tokio::time::sleep_until(start + due).await;
            submits.push(now_ns());
            if paced_queued {
                acks.push(Ack::One(client.submit(leader, w.clone()).unwrap()));
            } else {
                // As gw-sidecar sends one: `Sender::send` in a task of its own
                // (the strategy thread spawns one per transaction, the RPC handler
                // is one), through `TpuClient::send`.
                let d = client.send(leader, w.clone()).unwrap();
                acks.push(Ack::Task(tokio::spawn(d)));
            }
        }
        return (submits, acks);
    }
    if batch <= 1 {
        for w in &sent[1..] {
            submits.push(now_ns());
            loop {
                match client.submit(leader, w.clone()) {
                    Ok(d) => break acks.push(Ack::One(d)),
                    Err(TpuError::QueueFull(_)) => tokio::task::yield_now().await,
                    Err(e) => panic!("{e}"),
                }
            }
        }
        return (submits, acks);
    }
    for chunk in sent[1..].chunks(batch) {
        let at = now_ns();
        submits.extend(std::iter::repeat_n(at, chunk.len()));
        loop {
            match client.submit_batch(leader, chunk.to_vec()) {
                Ok(d) => break acks.push(Ack::Batch(d)),
                Err(TpuError::QueueFull(_)) => tokio::task::yield_now().await,
                Err(e) => panic!("{e}"),
            }
        }
    }
    (submits, acks)
}

/// What `our_submits` waits for.
enum Ack {
    One(gw_sidecar::sender::tpu::Delivery),
    Task(
        tokio::task::JoinHandle<<gw_sidecar::sender::tpu::Delivery as std::future::Future>::Output>,
    ),
    Batch(gw_sidecar::sender::tpu::BatchDelivery),
}

impl Ack {
    /// Panics unless every transaction was acknowledged.
    async fn expect_ok(self) {
        match self {
            Ack::One(d) => d.await.unwrap().unwrap(),
            Ack::Task(t) => t.await.unwrap().unwrap().unwrap(),
            Ack::Batch(d) => {
                for r in d.await.unwrap() {
                    r.unwrap();
                }
            }
        }
    }
}

/// Our client's configuration for an identity granted `streams` streams (what a
/// staked or unstaked operator sets `max_streams` to; `GW_PARITY_STREAMS` overrides).
fn our_config(streams: usize) -> TpuConfig {
    TpuConfig {
        queue_per_leader: 1 << 16,
        max_streams: env_or("GW_PARITY_STREAMS", streams),
        ..TpuConfig::default()
    }
}

/// `GW_PARITY_CHILD=ours`: this binary as a client process of its own, with
/// `next-load`'s arguments and protocol, so both clients run alike.
async fn child_main() {
    let mut args = std::env::args().skip(1);
    let (mut server, mut seed, mut pin, mut txf, mut subf) = (None, None, None, None, None);
    let mut streams = UNSTAKED_STREAMS;
    let mut pace = None;
    while let Some(flag) = args.next() {
        let v = args.next();
        match flag.as_str() {
            "--server" => server = v.and_then(|v| v.parse::<std::net::SocketAddr>().ok()),
            "--identity-seed" => seed = v,
            "--server-identity" => pin = v,
            "--txs" => txf = v,
            "--submits" => subf = v,
            "--max-streams" => streams = v.and_then(|v| v.parse().ok()).unwrap_or(streams),
            "--pace-us" => pace = v.and_then(|v| v.parse().ok()),
            _ => {}
        }
    }
    let seed: [u8; 32] = hex::decode(seed.unwrap()).unwrap().try_into().unwrap();
    let pin: [u8; 32] = hex::decode(pin.unwrap()).unwrap().try_into().unwrap();
    let data = std::fs::read(txf.unwrap()).unwrap();
    let mut sent = Vec::new();
    let mut rest = &data[..];
    while let Some((len, tail)) = rest.split_first_chunk::<4>() {
        let n = u32::from_le_bytes(*len) as usize;
        sent.push(Bytes::copy_from_slice(&tail[..n]));
        rest = &tail[n..];
    }
    let client = TpuClient::new(our_config(streams), &SigningKey::from_bytes(&seed)).unwrap();
    let leader = Leader {
        tpu_quic: server.unwrap(),
        identity: Some(pin),
    };
    let (submits, acks) = our_submits(&client, &leader, &sent, pace).await;
    let out: Vec<u8> = submits.iter().flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(subf.unwrap(), out).unwrap();
    println!("sent");
    std::io::stdout().flush().unwrap();
    for a in acks {
        a.expect_ok().await;
    }
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    })
    .await
    .unwrap();
}

/// Our client in this process (with the benchmark's threads beside it).
async fn ours_inproc(agave: &AgaveTpu, key: &SigningKey, sent: &[Bytes]) -> Round {
    let before = agave.received().len();
    let cpu0 = cpu_us("self");
    let client = TpuClient::new(our_config(STAKED_STREAMS_MAX), key).unwrap();
    let leader = Leader {
        tpu_quic: agave.addr,
        identity: Some(agave.identity),
    };
    let (submits, acks) = our_submits(&client, &leader, sent, None).await;
    for a in acks {
        a.expect_ok().await;
    }
    // Before this process parses the server's output (as it does for theirs).
    let cpu = (cpu_us("self") - cpu0) / sent.len() as f64;
    let mut r = measure(agave, before, sent, &submits).await;
    client.close();
    r.cpu_us = cpu;
    r
}

/// `--pace-us` and its value, when paced.
fn pace_args(pace: Option<u64>) -> Vec<String> {
    pace.map(|p| vec!["--pace-us".to_owned(), p.to_string()])
        .unwrap_or_default()
}

/// Our client as a process of its own (this binary, `GW_PARITY_CHILD=ours`),
/// configured for `streams` streams per connection.
async fn ours(
    agave: &AgaveTpu,
    key: &SigningKey,
    sent: &[Bytes],
    streams: usize,
    pace: Option<u64>,
) -> Round {
    let me = std::env::current_exe().unwrap();
    let pin = hex::encode(agave.identity);
    let streams = streams.to_string();
    let mut extra = vec!["--server-identity", &pin, "--max-streams", &streams];
    let paced = pace_args(pace);
    extra.extend(paced.iter().map(String::as_str));
    process_client(
        agave,
        key,
        sent,
        &me,
        &[("GW_PARITY_CHILD", "ours")],
        &extra,
    )
    .await
}

/// `solana-tpu-client-next` (`next-load`).
async fn theirs(agave: &AgaveTpu, key: &SigningKey, sent: &[Bytes], pace: Option<u64>) -> Round {
    let bin = testkit::agave_tpu::binary().with_file_name("next-load");
    let paced = pace_args(pace);
    let extra: Vec<&str> = paced.iter().map(String::as_str).collect();
    process_client(agave, key, sent, &bin, &[], &extra).await
}

/// Runs a client process with `next-load`'s protocol and measures its round.
async fn process_client(
    agave: &AgaveTpu,
    key: &SigningKey,
    sent: &[Bytes],
    bin: &std::path::Path,
    env: &[(&str, &str)],
    extra: &[&str],
) -> Round {
    let before = agave.received().len();
    let dir = testkit::TempDir::new("parity");
    let (txf, subf) = (dir.path().join("txs.bin"), dir.path().join("submits.bin"));
    let mut buf = Vec::new();
    for t in sent {
        buf.extend_from_slice(&(t.len() as u32).to_le_bytes());
        buf.extend_from_slice(t);
    }
    std::fs::write(&txf, buf).unwrap();
    let mut child = Command::new(bin)
        .envs(env.iter().copied())
        .args(extra)
        .args(["--server", &agave.addr.to_string()])
        .args(["--identity-seed", &hex::encode(key.to_bytes())])
        .arg("--txs")
        .arg(&txf)
        .arg("--submits")
        .arg(&subf)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (bash bench/run.sh parity builds it)",
                bin.display()
            )
        });
    let stdin = child.stdin.take().unwrap();
    let mut line = String::new();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    assert_eq!(line.trim(), "sent");
    let submits: Vec<u64> = std::fs::read(&subf)
        .unwrap()
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(submits.len(), sent.len());
    let mut r = measure(agave, before, sent, &submits).await;
    r.cpu_us = cpu_us(&child.id().to_string()) / sent.len() as f64;
    drop(stdin);
    let _ = child.wait();
    r
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn compare(
    label: &str,
    config: &AgaveConfig,
    key: &SigningKey,
    n: usize,
    rounds: u32,
    streams: usize,
    pace: Option<u64>,
) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let mut agave = None;
    for r in 0..rounds {
        // Agave allows 8 new connections per minute per IP: a new server every
        // 3 rounds (6 connections).
        if r % 3 == 0 {
            agave = None; // the old server goes before the new one starts
        }
        let agave = &*agave.get_or_insert_with(|| {
            AgaveTpu::start(config, &SigningKey::from_bytes(&[1u8; 32])).unwrap()
        });
        // Interleaved, and alternating who goes first.
        // Paced rounds send other transactions than the queued ones.
        let tag = 2 * r + if pace.is_some() { 1_000 } else { 0 };
        let (x, y) = (txs(tag, n, 200), txs(tag + 1, n, 200));
        if r % 2 == 0 {
            a.push(ours(agave, key, &x, streams, pace).await);
            b.push(theirs(agave, key, &y, pace).await);
        } else {
            b.push(theirs(agave, key, &y, pace).await);
            a.push(ours(agave, key, &x, streams, pace).await);
        }
        let (l, m) = (a.last().unwrap(), b.last().unwrap());
        let queued = pace.is_none();
        println!(
            "  {label} round {r}: ours {} | tpu-client-next {}",
            l.line(queued),
            m.line(queued)
        );
        std::io::stdout().flush().unwrap();
    }
    let med = |v: &[Round], f: fn(&Round) -> f64| median(v.iter().map(f).collect());
    let (ra, rb) = (med(&a, |r| r.rate), med(&b, |r| r.rate));
    let queued = if pace.is_none() {
        format!(
            "; from the round's start p50 {:.2} vs {:.2} ms, p99 {:.2} vs {:.2} ms (submits over {:.1} vs {:.1} ms)",
            med(&a, |r| r.p50_start_ms),
            med(&b, |r| r.p50_start_ms),
            med(&a, |r| r.p99_start_ms),
            med(&b, |r| r.p99_start_ms),
            med(&a, |r| r.span_ms),
            med(&b, |r| r.span_ms),
        )
    } else {
        String::new()
    };
    println!(
        "{label}: {n} tx per round, {rounds} rounds each, medians: ours {ra:.0} tx/s vs tpu-client-next {rb:.0} tx/s = {:.2}×; \
         p50 {:.2} vs {:.2} ms; p99 {:.2} vs {:.2} ms from each submit{queued}; client CPU {:.1} vs {:.1} µs/tx",
        ra / rb,
        med(&a, |r| r.p50_ms),
        med(&b, |r| r.p50_ms),
        med(&a, |r| r.p99_ms),
        med(&b, |r| r.p99_ms),
        med(&a, |r| r.cpu_us),
        med(&b, |r| r.cpu_us),
    );
}

fn main() {
    let rounds: u32 = env_or("GW_PARITY_ROUNDS", 3);
    let staked_n: usize = env_or("GW_PARITY_TXS", 50_000);
    let pace_us: u64 = env_or("GW_PARITY_PACE_US", 1_000);
    let paced_n: usize = env_or("GW_PARITY_PACED_TXS", 10_000);
    if std::env::var("GW_PARITY_CHILD").as_deref() == Ok("ours") {
        // As gw-sidecar runs it: with a sender configured its threads keep the
        // kernel's scheduling slice unless `sched_slice_us` asks for another
        // (GW_PARITY_SLICE_US, µs: the data plane with short slices).
        gw_sidecar::sched::configure(env_or("GW_PARITY_SLICE_US", 0));
        let rt = gw_sidecar::sched::runtime(Some(2)).unwrap();
        // This thread runs the submitting loop: as gw-sidecar's main thread, it asks too.
        let _ = gw_sidecar::sched::apply_here();
        rt.block_on(child_main());
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let key = SigningKey::from_bytes(&[2u8; 32]);
    rt.block_on(async {
        if std::env::var_os("GW_PARITY_PROFILE").is_some() {
            // Profiling aid: only our client, staked, five rounds of the same
            // transactions (run under `perf record -g`).
            let staked = AgaveConfig {
                stakes: vec![(key.verifying_key().to_bytes(), 1_000_000_000_000_000)],
                ..AgaveConfig::default()
            };
            let agave = AgaveTpu::start(&staked, &SigningKey::from_bytes(&[1u8; 32])).unwrap();
            let x = txs(0, staked_n, 200);
            for _ in 0..5 {
                let r = ours_inproc(&agave, &key, &x).await;
                println!("ours {:.0} tx/s, cpu {:.1} µs/tx", r.rate, r.cpu_us);
            }
            return;
        }
        let staked = AgaveConfig {
            stakes: vec![(key.verifying_key().to_bytes(), 1_000_000_000_000_000)],
            ..AgaveConfig::default()
        };
        // GW_PARITY_LOADS: which loads to run (default all three).
        let loads =
            std::env::var("GW_PARITY_LOADS").unwrap_or_else(|_| "staked,paced,unstaked".to_owned());
        let run = |l: &str| loads.split(',').any(|x| x.trim() == l);
        if run("staked") {
            compare(
                "staked",
                &staked,
                &key,
                staked_n,
                rounds,
                STAKED_STREAMS_MAX,
                None,
            )
            .await;
        }
        if run("paced") {
            let paced = format!("staked, one every {pace_us} µs");
            compare(
                &paced,
                &staked,
                &key,
                paced_n,
                rounds,
                STAKED_STREAMS_MAX,
                Some(pace_us),
            )
            .await;
        }
        if run("unstaked") {
            let unstaked = AgaveConfig::default();
            compare(
                "unstaked",
                &unstaked,
                &key,
                1_000,
                rounds,
                UNSTAKED_STREAMS,
                None,
            )
            .await;
        }
    });
}
