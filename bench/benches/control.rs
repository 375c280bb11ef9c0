//! Control-plane benchmark, every figure with its same-run baseline:
//!
//! 1. Ledger rows/s: the sidecar's ledger shipping sealed rows (the `clickhouse`
//!    crate's RowBinary insert with a dedup token, in MAX_BATCH_ROWS batches) vs a raw
//!    `INSERT ... FORMAT RowBinary` of the same rows from the same client into an
//!    identical table. Also journal commits of rows by one writer and by 16 (group
//!    commit): the durability cost a decision pays before it is applied.
//! 2. Commands/s end to end: distinct signed commands over HTTP/2 + TLS through the
//!    real Envoy running the gw_edge filter to the sidecar (re-verify, replay guard,
//!    in-process bus, agent apply, audited into the real ClickHouse), vs the same
//!    number of commands sent straight to the sidecar (no Envoy). Each phase also
//!    reports the CPU time per command of Envoy, of this process (the sidecar and
//!    the clients) and of ClickHouse, and the machine's busy and stolen shares: on
//!    a shared 2-vCPU machine the rate is bounded by 2 cores ÷ the CPU per command,
//!    and a phase with a large steal share ran on less than 2 cores.
//!
//! `cargo bench -p gw-bench --bench control` (bench/run.sh control). Needs the
//! test venv (ClickHouse, Envoy) and the release filter .wasm.

/// The sidecar binary's allocator (`sidecar/src/main.rs`): the sidecar runs in this process.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use gw_core::ledger::LedgerRow;
use gw_core::Action;
use gw_sidecar::ledger::ship::DecisionRow;
use testkit::clickhouse::ClickHouse;
use testkit::envoy;
use testkit::fixtures::{bearer, command_key, filter_config};

const LEDGER_ROWS: u64 = 10_000;
/// Rounds of the ledger benchmark (raw and ours alternate which goes first).
const LEDGER_ROUNDS: usize = 5;
// Odd, so that the median is one round's value.
const _: () = assert!(LEDGER_ROUNDS % 2 == 1);
const COMMANDS: u64 = 8_000;
const CONCURRENCY: usize = 16;
/// Commands per round of the one-at-a-time measurement: p99 is then the 40th
/// slowest, not a handful of outliers (one batch of `next`).
const SEQUENTIAL: usize = 4000;
const _: () = assert!(SEQUENTIAL as u64 <= COMMANDS);

/// The statements of `sql/11` for a table named `table`.
fn ddl(table: &str) -> Vec<String> {
    let sql =
        std::fs::read_to_string(testkit::workspace_root().join("sql/11_control_decisions.sql"))
            .expect("sql/11");
    gw_sidecar::ledger::migrations::statements(&sql)
        .into_iter()
        .map(|s| s.replace("control_decisions", table))
        .collect()
}

fn row(i: u64) -> LedgerRow {
    testkit::fixtures::ledger_row(i)
}

fn ledger_bench(rt: &tokio::runtime::Runtime, dir: &std::path::Path) {
    use gw_core::ledger::Chain;
    use gw_sidecar::journal::{self, Journal, Options, Sink, Txn};
    use gw_sidecar::ledger::ship::{RowQueue, Shipper};

    let ch = ClickHouse::start(dir);
    let client =
        clickhouse::Client::default().with_url(format!("http://127.0.0.1:{}", ch.http_port));
    // Per round: raw rows/s, ours, ours / raw; journal commits/s by 1 and 16 writers.
    let mut rounds: Vec<[f64; 5]> = Vec::new();
    for round in 0..LEDGER_ROUNDS {
        let ours = format!("ours_{round}");
        let raw = format!("raw_{round}");
        for stmt in ddl(&ours).iter().chain(&ddl(&raw)) {
            ch.query(stmt);
        }
        let opened = Journal::open(&dir.join(format!("journal-{round}")), Options::default())
            .expect("journal");
        let queue = Arc::new(RowQueue::recovered(
            &opened.records,
            Default::default(),
            gw_sidecar::ledger::ship::MEMORY_ROWS,
        ));
        let journal = opened
            .start(
                Some(Chain::new("bench")),
                vec![queue.clone() as Arc<dyn Sink>],
            )
            .expect("start");
        // Durability before apply: one writer, then 16 (group commit).
        let sealed = parking_lot::Mutex::new(Vec::with_capacity(LEDGER_ROWS as usize));
        let one = |i: u64| {
            let c = journal
                .commit_blocking(Txn::of(vec![journal::Entry::row(row(i))]))
                .expect("commit");
            sealed.lock().extend(c.rows);
        };
        let half = LEDGER_ROWS / 2;
        let t = Instant::now();
        for i in 1..=half {
            one(i);
        }
        let seal_one = half as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        std::thread::scope(|sc| {
            for w in 0..CONCURRENCY as u64 {
                let one = &one;
                sc.spawn(move || {
                    let mut i = half + 1 + w;
                    while i <= LEDGER_ROWS {
                        one(i);
                        i += CONCURRENCY as u64;
                    }
                });
            }
        });
        let seal_many = (LEDGER_ROWS - half) as f64 / t.elapsed().as_secs_f64();
        // The same sealed rows, as the raw insert will send them.
        assert_eq!(queue.len() as u64, LEDGER_ROWS);
        let mut shipper = Shipper::new(queue, journal.clone(), client.clone(), &ours, "bench");
        // Steady state: the chain's head in ClickHouse is known (asked once at start).
        rt.block_on(shipper.learn()).expect("learn");
        let mut sealed = sealed.into_inner();
        sealed.sort_by_key(|r| r.seq);
        let raw_rows: Vec<DecisionRow> = sealed.iter().map(|r| DecisionRow::from(&**r)).collect();
        // Raw and ours alternate which goes first.
        let run_raw = || {
            rt.block_on(async {
                let t = Instant::now();
                let mut insert = client.insert::<DecisionRow>(&raw).await.expect("insert");
                for r in &raw_rows {
                    insert.write(r).await.expect("write");
                }
                insert.end().await.expect("end");
                t.elapsed().as_secs_f64()
            })
        };
        let mut run_ours = || {
            rt.block_on(async {
                let t = Instant::now();
                let n = shipper.ship_once().await.expect("ship");
                assert_eq!(n as u64, LEDGER_ROWS);
                t.elapsed().as_secs_f64()
            })
        };
        let (r, o) = if round % 2 == 0 {
            let r = run_raw();
            (r, run_ours())
        } else {
            let o = run_ours();
            (run_raw(), o)
        };
        let rate = |secs: f64| LEDGER_ROWS as f64 / secs;
        rounds.push([rate(r), rate(o), rate(o) / rate(r), seal_one, seal_many]);
        for t in [&ours, &raw] {
            let n = ch.query(&format!("SELECT count() FROM {t}"));
            assert_eq!(n.trim(), LEDGER_ROWS.to_string(), "{t}");
        }
    }
    // Medians over the rounds (one round of ≈ 50–100 ms varies widely on a shared
    // VM: docs/benchmarks.md); the ratio is the median of each round's own ratio,
    // so it need not equal the two medians' quotient.
    let median = |i: usize| {
        let mut v: Vec<f64> = rounds.iter().map(|r| r[i]).collect();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (raw_rate, ..) = median(0);
    let (ship_rate, ..) = median(1);
    let (ratio, lo, hi) = median(2);
    let (seal_one, ..) = median(3);
    let (seal_many, ..) = median(4);
    println!(
        "\n## ledger rows/s ({LEDGER_ROWS} rows per insert, medians of {LEDGER_ROUNDS} alternating rounds, same client, same ClickHouse 26.9)"
    );
    println!("| path | rows/s | vs raw INSERT RowBinary |");
    println!("|---|---:|---:|");
    println!("| raw INSERT ... FORMAT RowBinary | {raw_rate:.0} | 1.00x |");
    println!(
        "| ledger ship (sealed rows, dedup token) | {ship_rate:.0} | {ratio:.2}x (rounds {lo:.2}–{hi:.2}x) |"
    );

    println!(
        "| journal commit, 1 writer (fsync before apply) | {seal_one:.0} | {:.3}x |",
        seal_one / raw_rate
    );
    println!(
        "| journal commit, {CONCURRENCY} writers (group commit) | {seal_many:.0} | {:.3}x |",
        seal_many / raw_rate
    );
}

struct Sent {
    elapsed: Duration,
    latencies: Vec<Duration>,
    failures: usize,
}

/// One request of a phase: a signed command (counted when applied), or a GET of a
/// JWT-only route (counted when answered 200), the floor of a request through Envoy.
#[derive(Clone)]
enum Req {
    Command(Vec<u8>),
    Get,
}

/// `req` stamped and sealed as the edge stamps an admin's token, when `stamped`
/// (a request straight to the sidecar: a signed command needs the stamp). Sealed
/// per request, as the filter seals it.
fn as_the_edge(req: reqwest::RequestBuilder, stamped: bool) -> reqwest::RequestBuilder {
    if !stamped {
        return req;
    }
    let stamp = [
        ("x-gw-verified", "jwt"),
        ("x-gw-sub", "admin-1"),
        ("x-gw-roles", "admin"),
    ];
    testkit::envoy::stamped(req, &stamp)
}

/// Sends `bodies` from `concurrency` clients, client `i` over `clients[i % len]`
/// (a `reqwest::Client` is one HTTP/2 connection per host).
fn fire(
    rt: &tokio::runtime::Runtime,
    clients: &[reqwest::Client],
    url: &str,
    token: &str,
    bodies: Vec<Req>,
    concurrency: usize,
    stamped: bool,
) -> Sent {
    rt.block_on(async {
        let queue = Arc::new(std::sync::Mutex::new(bodies.into_iter()));
        let t = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..concurrency {
            let (queue, client, url, token) = (
                queue.clone(),
                clients[i % clients.len()].clone(),
                url.to_string(),
                token.to_string(),
            );
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut failures = 0;
                loop {
                    let Some(req) = queue.lock().expect("queue").next() else {
                        break;
                    };
                    let s = Instant::now();
                    let (r, command) = match req {
                        Req::Command(body) => (
                            as_the_edge(client.post(&url), stamped)
                                .header("authorization", &token)
                                .header("content-type", "application/x-protobuf")
                                .body(body)
                                .send()
                                .await,
                            true,
                        ),
                        Req::Get => (
                            client
                                .get(&url)
                                .header("authorization", &token)
                                .send()
                                .await,
                            false,
                        ),
                    };
                    let ok = match r {
                        Ok(r) if r.status() == 200 => {
                            let v = r.json::<serde_json::Value>().await;
                            v.is_ok_and(|v| !command || v["applied"] == true)
                        }
                        _ => false,
                    };
                    lat.push(s.elapsed());
                    if !ok {
                        failures += 1;
                    }
                }
                (lat, failures)
            }));
        }
        let mut latencies = Vec::new();
        let mut failures = 0;
        for t in tasks {
            let (l, f) = t.await.expect("task");
            latencies.extend(l);
            failures += f;
        }
        latencies.sort();
        Sent {
            elapsed: t.elapsed(),
            latencies,
            failures,
        }
    })
}

fn commands(first_nonce: u64) -> Vec<Req> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    (first_nonce..first_nonce + COMMANDS)
        .map(|n| {
            let pct = (n % 100).to_string();
            Req::Command(testkit::fixtures::signed_command(
                n,
                Action::Throttle,
                now,
                "dashboard",
                &[("throttle_pct", pct.as_str())],
            ))
        })
        .collect()
}

/// CPU time so far: of the processes asked for (user + system, all threads; `None`
/// when `/proc` did not say) and of the whole machine (busy, steal, all), in clock
/// ticks of `/proc` (USER_HZ, 100 per second on Linux).
#[derive(Clone, Copy, Default)]
struct Cpu {
    procs: [Option<u64>; 3],
    busy: u64,
    steal: u64,
    all: u64,
}

impl Cpu {
    /// `pids`: Envoy, this process (the sidecar and the clients), ClickHouse.
    fn now(pids: [u32; 3]) -> Cpu {
        let mut c = Cpu::default();
        for (slot, pid) in c.procs.iter_mut().zip(pids) {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // utime and stime are fields (14) and (15) of proc(5); counted from the
            // state, the first field after the command name's closing parenthesis,
            // they are the 12th and 13th.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
            *slot = field(11).zip(field(12)).map(|(u, s)| u + s);
        }
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        if let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) {
            // user nice system idle iowait irq softirq steal (guest time is in user).
            let f: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            let all: u64 = f.iter().take(8).sum();
            let idle = f.get(3).unwrap_or(&0) + f.get(4).unwrap_or(&0);
            c.steal = *f.get(7).unwrap_or(&0);
            c.all = all;
            c.busy = all - idle - c.steal;
        }
        c
    }

    /// µs of CPU per command of each process between `self` and `later` (`n/a`
    /// when `/proc` did not say), and the machine's busy and stolen shares (%).
    fn per_command(&self, later: &Cpu, commands: u64) -> ([String; 3], f64, f64) {
        let us = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => format!(
                "{:.0}",
                b.saturating_sub(a) as f64 * 10_000.0 / commands as f64
            ),
            _ => "n/a".into(),
        };
        let all = later.all.saturating_sub(self.all).max(1) as f64;
        (
            [0, 1, 2].map(|i| us(self.procs[i], later.procs[i])),
            later.busy.saturating_sub(self.busy) as f64 * 100.0 / all,
            later.steal.saturating_sub(self.steal) as f64 * 100.0 / all,
        )
    }
}

/// The journal's batches so far, from the sidecar's `/metrics`.
#[derive(Default)]
struct Batches {
    total: u64,
    over_1ms: u64,
    over_2_5ms: u64,
}

impl Batches {
    fn since(&self, before: &Batches) -> Batches {
        Batches {
            total: self.total - before.total,
            over_1ms: self.over_1ms - before.over_1ms,
            over_2_5ms: self.over_2_5ms - before.over_2_5ms,
        }
    }
}

fn journal_batches(rt: &tokio::runtime::Runtime, url: &str) -> Batches {
    let text = rt
        .block_on(async { reqwest::get(url).await?.text().await })
        .expect("the sidecar's /metrics");
    let bucket = |le: &str| -> u64 {
        let key = format!("gw_sidecar_journal_batch_seconds_bucket{{le=\"{le}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in the sidecar's /metrics:\n{text}"))
    };
    let total = bucket("+Inf");
    Batches {
        total,
        over_1ms: total - bucket("0.001"),
        over_2_5ms: total - bucket("0.0025"),
    }
}

fn pct(l: &[Duration], p: f64) -> f64 {
    let i = ((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1));
    l.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// The phase of GETs that measures Envoy's own cost per request.
const FLOOR: &str = "through Envoy, GET /api/modules (JWT only, no command: Envoy's floor)";
/// The same, one request at a time.
const SEQ_FLOOR: &str = "through Envoy, GET /api/modules (no command)";

fn commands_bench(rt: &tokio::runtime::Runtime, dir: &std::path::Path) {
    std::fs::create_dir_all(dir.join("ch")).expect("dir");
    let ch = ClickHouse::start(&dir.join("ch"));
    // The sidecar exactly as gw-sidecar wires it (in-process bus, ClickHouse ledger).
    let pk = hex::encode(command_key().verifying_key().as_bytes());
    std::fs::create_dir_all(dir.join("certs")).expect("dir");
    let certs = envoy::dev_certs(&dir.join("certs"));
    let tls_files = (
        certs.sidecar_cert.display().to_string(),
        certs.sidecar_key.display().to_string(),
        certs.ca.display().to_string(),
    );
    let env = move |k: &str| match k {
        "CTRL_PUBKEY_HEX" => Some(pk.clone()),
        "CTRL_PUBKEY_ID" => Some("op-admin-1".to_string()),
        "GW_EDGE_KEY_HEX" => Some(testkit::fixtures::EDGE_KEY_HEX.to_string()),
        "GW_SIDECAR_TLS_CERT" => Some(tls_files.0.clone()),
        "GW_SIDECAR_TLS_KEY" => Some(tls_files.1.clone()),
        "GW_SIDECAR_CLIENT_CA" => Some(tls_files.2.clone()),
        _ => None,
    };
    let mut cfg = gw_sidecar::config::Config::load(None, &env).expect("config");
    cfg.file.state_dir = dir.join("sidecar");
    cfg.file.clickhouse_url = Some(format!("http://127.0.0.1:{}", ch.http_port));
    cfg.file.max_skew_secs = 120;
    let running = rt.block_on(gw_sidecar::app::start(cfg)).expect("sidecar");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let sidecar_port = listener.local_addr().expect("addr").port();
    rt.spawn(running.serving_task(listener));
    // The ops listener, as an operator scrapes it: the journal's batch times.
    let ops = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let ops_url = format!("http://{}/metrics", ops.local_addr().expect("addr"));
    let ops_router = running.ops_router();
    rt.spawn(async move {
        let _ = axum::serve(ops, ops_router).await;
    });
    let journal = || journal_batches(rt, &ops_url);

    let mut fc = filter_config(65536);
    fc["replay_max_per_issuer"] = serde_json::json!(262_144);
    fc["max_skew_secs"] = serde_json::json!(120);
    let gw = envoy::render_gateway(dir, &fc.to_string(), sidecar_port, &certs);
    let port = gw.port;
    let _envoy = envoy::start_envoy_ready(&gw.config, &gw.admin, dir);
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&certs.ca).expect("ca")).expect("pem");
    let client = || {
        reqwest::Client::builder()
            .add_root_certificate(ca.clone())
            .http2_prior_knowledge()
            .build()
            .expect("client")
    };
    // 16 clients, each with its own connection; and one connection for all.
    let tls: Vec<_> = (0..CONCURRENCY).map(|_| client()).collect();
    let tls_one = &tls[..1];
    // Straight to the sidecar as the edge: mutual TLS with Envoy's certificate,
    // each command stamped and sealed as the edge stamps an admin's token
    // ([`as_the_edge`]).
    let direct: Vec<_> = (0..CONCURRENCY).map(|_| certs.edge_client()).collect();
    let direct_one = &direct[..1];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let token = bearer(&["admin"], now);

    // Warm up both paths (V8 tier-up, connections), then measure alternately.
    let envoy_url = format!("https://localhost:{port}/api/control/commands");
    let direct_url = format!("https://127.0.0.1:{sidecar_port}/api/control/commands");
    // Envoy's floor in this run: the same clients' GET of a JWT-only route through
    // the same listener and filters (nothing journaled or applied).
    let floor_url = format!("https://localhost:{port}/api/modules");
    let mut nonce = 1;
    let next = |n: &mut u64| {
        let b = commands(*n);
        *n += COMMANDS;
        b
    };
    fire(
        rt,
        &tls,
        &envoy_url,
        &token,
        next(&mut nonce)[..200].to_vec(),
        CONCURRENCY,
        false,
    );
    let pids = [_envoy.id(), std::process::id(), ch.process.id()];
    let mut runs = Vec::new();
    // GW_BENCH_SEQ_ONLY: only the one-at-a-time rounds below (a quicker look).
    let loaded_rounds = if std::env::var_os("GW_BENCH_SEQ_ONLY").is_some() {
        0
    } else {
        2
    };
    for round in 0..loaded_rounds {
        for (name, clients, url) in [
            // First: the previous phase's ledger inserts would spill into its
            // sidecar column.
            (FLOOR, &tls[..], &floor_url),
            ("through Envoy (HTTP/2+TLS, gw_edge)", &tls[..], &envoy_url),
            (
                "straight to the sidecar (HTTP/2, mutual TLS)",
                &direct[..],
                &direct_url,
            ),
            ("through Envoy, one connection", tls_one, &envoy_url),
            (
                "straight to the sidecar, one connection",
                direct_one,
                &direct_url,
            ),
        ] {
            // Signed before the phase: the clients' CPU is sending, not signing.
            let bodies = if name == FLOOR {
                vec![Req::Get; COMMANDS as usize]
            } else {
                next(&mut nonce)
            };
            let before = Cpu::now(pids);
            let s = fire(
                rt,
                clients,
                url,
                &token,
                bodies,
                CONCURRENCY,
                url == &direct_url,
            );
            let cpu = before.per_command(&Cpu::now(pids), COMMANDS);
            assert_eq!(s.failures, 0, "{name}: {} requests failed", s.failures);
            runs.push((round, name, s, cpu));
        }
    }
    println!("\n## commands/s end to end ({COMMANDS} distinct signed commands, {CONCURRENCY} concurrent clients each on its own HTTP/2 connection, or all on one; each applied and audited)");
    println!("CPU per command (µs, /proc: 10 ms ticks): of Envoy, of this process (the sidecar and the clients), of ClickHouse; the machine's busy and stolen shares over the phase.");
    println!("The GET row counts requests, not commands: what Envoy, the filter's JWT check and the sidecar's answer cost without a command, with the same clients.");
    println!("| path | round | commands/s | p50 ms | p99 ms | CPU Envoy | CPU sidecar + clients | CPU ClickHouse | busy | steal |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut best = std::collections::BTreeMap::new();
    for (round, name, s, (us, busy, steal)) in &runs {
        let rate = COMMANDS as f64 / s.elapsed.as_secs_f64();
        println!(
            "| {name} | {round} | {rate:.0} | {:.2} | {:.2} | {} | {} | {} | {busy:.0} % | {steal:.0} % |",
            pct(&s.latencies, 0.5),
            pct(&s.latencies, 0.99),
            us[0],
            us[1],
            us[2]
        );
        let e = best.entry(*name).or_insert(0.0f64);
        *e = e.max(rate);
    }
    let via = best
        .get("through Envoy (HTTP/2+TLS, gw_edge)")
        .copied()
        .unwrap_or(0.0);
    let straight = best
        .get("straight to the sidecar (HTTP/2, mutual TLS)")
        .copied()
        .unwrap_or(1.0);
    if loaded_rounds > 0 {
        println!(
            "through Envoy / straight to the sidecar (best rounds): {:.2}x",
            via / straight
        );
    }
    // One command at a time through Envoy: does anything stall the control path?
    // The same straight to the sidecar says where the time goes.
    // GW_BENCH_SEQ_ROUNDS: more rounds, to see whether the latency drifts.
    // Rounds alternate the sidecar's threads (and this process's clients) between
    // the configured short scheduling slice and the kernel's (sidecar/src/sched.rs).
    let rounds: usize = std::env::var("GW_BENCH_SEQ_ROUNDS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(6)
        // Pairs, in the order short, kernel's, kernel's, short, ...: equal arms.
        .next_multiple_of(2);
    let slice_us = slice_us();
    println!(
        "\n## one command at a time (HTTP/2), {SEQUENTIAL} commands per round, {rounds} rounds; half the rounds with {slice_us} µs scheduling slices (sched_slice_us), half with the kernel's, alternating in pairs (0 µs: the kernel's in both)"
    );
    println!("(CPU per command here includes background work — ClickHouse's merges, the ledger's inserts — spread over only {SEQUENTIAL} commands: read it with the busy share.)");
    println!("Journal batches: how many of the round's batches (two per command) took longer than 1 ms and 2.5 ms to write and fdatasync (the sidecar's gw_sidecar_journal_batch_seconds). The GET rows send no command: nothing journaled or applied, the spread of Envoy and the machine alone.");
    println!("| path | round | slice | p50 ms | p99 ms | max ms | p99 / p50 | CPU Envoy | CPU sidecar + client | CPU ClickHouse | busy | steal | journal batches | > 1 ms | > 2.5 ms |");
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    // p99 / p50 per path, with short slices and with the kernel's.
    let mut ratios: std::collections::BTreeMap<(&str, bool), Vec<f64>> = Default::default();
    for round in 0..rounds {
        let short = matches!(round % 4, 0 | 3);
        gw_sidecar::sched::set_process(if short { slice_us } else { 0 }).expect("sched");
        let slice = if short {
            format!("{slice_us} µs")
        } else {
            "kernel's".to_string()
        };
        for (name, client, url) in [
            ("through Envoy", &tls, &envoy_url),
            ("straight to the sidecar", &direct, &direct_url),
            // The floor, one at a time: Envoy's and the machine's own spread.
            (SEQ_FLOOR, &tls, &floor_url),
        ] {
            let bodies = if name == SEQ_FLOOR {
                vec![Req::Get; SEQUENTIAL]
            } else {
                next(&mut nonce)[..SEQUENTIAL].to_vec()
            };
            let before = Cpu::now(pids);
            let batches = journal();
            let s = fire(rt, client, url, &token, bodies, 1, url == &direct_url);
            let (us, busy, steal) = before.per_command(&Cpu::now(pids), SEQUENTIAL as u64);
            let batches = journal().since(&batches);
            assert_eq!(
                s.failures, 0,
                "sequential {name}: {} commands not applied",
                s.failures
            );
            let (p50, p99) = (pct(&s.latencies, 0.5), pct(&s.latencies, 0.99));
            let max = s.latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3);
            ratios.entry((name, short)).or_default().push(p99 / p50);
            println!(
                "| {name} | {round} | {slice} | {p50:.2} | {p99:.2} | {max:.2} | {:.2}x | {} | {} | {} | {busy:.0} % | {steal:.0} % | {} | {} | {} |",
                p99 / p50,
                us[0],
                us[1],
                us[2],
                batches.total,
                batches.over_1ms,
                batches.over_2_5ms,
            );
        }
    }
    gw_sidecar::sched::set_process(slice_us).expect("sched");
    if rounds > 0 {
        println!(
            "\nOne at a time, p99 / p50, median of the rounds ({slice_us} µs slices | the kernel's):"
        );
    }
    for name in ["through Envoy", "straight to the sidecar", SEQ_FLOOR]
        .into_iter()
        .filter(|_| rounds > 0)
    {
        let median = |short: bool| {
            let mut v = ratios.get(&(name, short)).cloned().unwrap_or_default();
            v.sort_by(f64::total_cmp);
            v.get(v.len().saturating_sub(1) / 2)
                .copied()
                .unwrap_or(f64::NAN)
        };
        println!("    {name}: {:.2}x | {:.2}x", median(true), median(false));
    }
    // Where the time goes through Envoy, one at a time: Envoy's own histograms of
    // the whole request and of the sidecar's answer. Envoy reports a histogram's
    // last 5 s flush interval separately: send one at a time for longer than two
    // intervals and read the last one (only these requests are in it).
    let started = std::time::Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(12) {
        for chunk in next(&mut nonce).chunks(100) {
            let s = fire(rt, &tls, &envoy_url, &token, chunk.to_vec(), 1, false);
            assert_eq!(s.failures, 0, "sequential (Envoy's view): not applied");
            sent += chunk.len();
        }
    }
    if let Some((_, stats)) = envoy::admin_get(&gw.admin, "/stats?filter=rq_time$") {
        println!("\nEnvoy's view, one command at a time ({sent} sent for {:.0?}), P50 / P99 of the last 5 s interval (ms):", started.elapsed());
        for l in stats.lines() {
            let interval = |p: &str| {
                l.split_once(&format!(" {p}("))
                    .and_then(|(_, r)| r.split_once(','))
                    .map(|(v, _)| v.to_owned())
            };
            if let (Some(p50), Some(p99)) = (interval("P50"), interval("P99")) {
                let name = l.split(':').next().unwrap_or_default();
                println!("    {name}: {p50} / {p99}");
            }
        }
    }
    // What the ledger cost ClickHouse over the whole run (it shares the machine).
    println!("\nClickHouse over the run (inserts, rows, merges, CPU µs):");
    println!(
        "{}",
        ch.query(
            "SELECT event, value FROM system.events WHERE event IN ('InsertQuery', \
             'InsertedRows', 'Merge', 'OSCPUVirtualTimeMicroseconds') FORMAT TSV"
        )
        .trim_end()
    );
    let rows = ch.query("SELECT count() FROM control_decisions");
    println!("ledger rows in ClickHouse after the run: {}", rows.trim());
}

/// The scheduling slice the sidecar's threads ask for here: `sched_slice_us`'s
/// default unless `GW_BENCH_SLICE_US` says otherwise.
fn slice_us() -> u64 {
    std::env::var("GW_BENCH_SLICE_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(gw_sidecar::sched::DEFAULT_US)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing useful here.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // The runtime as gw-sidecar builds it (its threads ask for the configured
    // scheduling slice); this main thread, which starts Envoy and ClickHouse,
    // keeps the kernel's, as they do in a deployment.
    // GW_BENCH_SLICE_US: another slice (0: the kernel's) for everything but the
    // one-at-a-time rounds, which alternate it with the kernel's.
    gw_sidecar::sched::configure(slice_us());
    let rt = gw_sidecar::sched::runtime(Some(2)).expect("runtime");
    let d = testkit::TempDir::new("bench-control");
    let ledger_dir = d.path().join("ledger");
    std::fs::create_dir_all(&ledger_dir).expect("dir");
    if std::env::var_os("GW_BENCH_SKIP_LEDGER").is_none() {
        ledger_bench(&rt, &ledger_dir);
    }
    if std::env::var_os("GW_BENCH_SKIP_COMMANDS").is_none() {
        let dir = d.path().join("e2e");
        std::fs::create_dir_all(&dir).expect("dir");
        commands_bench(&rt, &dir);
    }
}
