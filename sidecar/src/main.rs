//! `gw-sidecar`: serves the control plane behind Envoy.
//! Usage: gw-sidecar [--config FILE] [--check | --setup-clickhouse]
//!        (env: docs/configuration.md; CTRL_SIGN_SK_HEX, CTRL_PUBKEY_HEX, CTRL_PUBKEY_ID,
//!        GW_SIDECAR_LISTEN, GW_CLICKHOUSE_URL, GW_CLICKHOUSE_USER, GW_CLICKHOUSE_PASSWORD[_FILE],
//!        GW_KAFKA_BROKERS, GW_MODELS_DIR, GW_TPU_IDENTITY_HEX, GW_LEDGER_SK_HEX, GW_LOG, ...)
//!        --setup-clickhouse: create the ClickHouse tables (sql/10..13) as the configured
//!                            user, an administrator, then exit
//!        gw-sidecar --probe HOST:PORT   exit 0 when /healthz on that (plain HTTP) ops
//!                                       listener answers 200 (container health checks)
//!        gw-sidecar --probe-ready HOST:PORT   the same with /readyz: exit 0 when the
//!                                       sidecar takes commands now

#![forbid(unsafe_code)]

use anyhow::Context;
use gw_sidecar::config::Config;

/// mimalloc, not glibc's malloc: the data plane allocates and frees across threads
/// per transaction (streams, answers, futures), where glibc's arenas cost about a
/// tenth of the CPU per transaction (`bench sender`). Agave's validator replaces
/// the system allocator for the same reason (jemalloc). Models (C ABI) allocate
/// with their own and never hand memory over.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, addr] = args.as_slice() {
        if flag == "--probe" {
            return probe(addr, "/healthz");
        }
        if flag == "--probe-ready" {
            return probe(addr, "/readyz");
        }
    }
    let check = args.last().is_some_and(|a| a == "--check");
    let setup = args.last().is_some_and(|a| a == "--setup-clickhouse");
    if check || setup {
        args.pop();
    }
    let path = match args.as_slice() {
        [] => None,
        [flag, p] if flag == "--config" => Some(std::path::PathBuf::from(p)),
        _ => anyhow::bail!(
            "usage: gw-sidecar [--config FILE] [--check | --setup-clickhouse] | --probe HOST:PORT | --probe-ready HOST:PORT"
        ),
    };
    if setup {
        gw_sidecar::telemetry::init(gw_sidecar::telemetry::LogFormat::Text);
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(setup_clickhouse(path.as_deref()));
    }
    let cfg = Config::load(path.as_deref(), &|k| std::env::var(k).ok())?;
    if check {
        return print_check(&cfg);
    }
    gw_sidecar::telemetry::init(cfg.file.log_format);
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    // Before any other thread starts: they inherit it (and the runtime's threads
    // and the sidecar's own take it explicitly).
    gw_sidecar::sched::configure(cfg.sched_slice_us());
    match gw_sidecar::sched::apply_here() {
        Ok(s) => tracing::info!(slice = %s, "scheduling slice"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot set the scheduling slice: the kernel's applies");
        }
    }
    gw_sidecar::sched::runtime(None)
        .context("cannot start the runtime")?
        .block_on(run(cfg))
}

/// `--setup-clickhouse`.
async fn setup_clickhouse(path: Option<&std::path::Path>) -> anyhow::Result<()> {
    let (client, clear) = Config::clickhouse_only(path, &|k| std::env::var(k).ok())?
        .context("--setup-clickhouse needs clickhouse_url (GW_CLICKHOUSE_URL)")?;
    if clear {
        tracing::warn!(
            "ClickHouse over plain HTTP to a host that is not loopback: the administrator's password crosses the network in clear (set clickhouse_tls and an https:// URL)"
        );
    }
    let done = gw_sidecar::ledger::migrations::apply(&client).await?;
    anyhow::ensure!(
        done.existing.is_empty() && done.skipped.is_empty(),
        "this ClickHouse user may not create {:?}: run --setup-clickhouse as an administrator",
        [done.existing, done.skipped].concat()
    );
    println!(
        "clickhouse ready: {} statements applied; grant the sidecar's user SELECT, INSERT on {}",
        done.ran,
        gw_sidecar::ledger::migrations::TABLES.join(", ")
    );
    Ok(())
}

/// `--check`: the one line a person or a script reads; not a log line. Creates
/// nothing: a state key still to be made at the first start is said so.
fn print_check(cfg: &Config) -> anyhow::Result<()> {
    let bus = match &cfg.file.kafka {
        None => "in-process".to_string(),
        Some(k) => {
            let kept = cfg
                .file
                .state_dir
                .join(gw_sidecar::control::state_sign::KEY_FILE);
            let key = if cfg.state_key.is_some() || kept.exists() {
                let signer = cfg.state_signer()?.context("kafka is configured")?;
                format!("state key {}", signer.public_hex())
            } else {
                format!("state key made at the first start in {}", kept.display())
            };
            let trusted = k.state_keys.len().max(1);
            // Later than this after its `ts`, a command reaching its agent is
            // refused `stale`.
            let within = cfg
                .file
                .max_skew_secs
                .saturating_add(cfg.file.agent_dedup_secs);
            format!(
                "kafka {} in {} ({key}, {trusted} node(s) trusted, commands apply within {within} s of their ts)",
                k.brokers,
                k.transport()
            )
        }
    };
    println!(
            "config ok: listen {} ({}), {} command key(s), JSON-route signer {}, bus {}, ledger {}, sender {}, models {}",
            cfg.file.listen,
            cfg.file.tls.as_ref().map_or_else(
                || "INSECURE plain HTTP".to_string(),
                |t| format!("mutual TLS, edge {}", t.edge_identities.join(","))
            ),
            cfg.keyring.len(),
            cfg.signer.as_ref().map_or("none", |(_, id)| id.as_str()),
            bus,
            cfg.file.clickhouse_url.as_deref().map_or_else(
                || "none (not audited)".to_string(),
                |u| format!(
                    "{u} as {} in {}{}",
                    cfg.file.clickhouse_user.as_deref().unwrap_or("default"),
                    cfg.clickhouse_transport(),
                    if cfg.clickhouse_in_clear() {
                        " (not loopback: password and rows readable on the network)"
                    } else {
                        ""
                    }
                )
            ),
            cfg.file.sender.as_ref().map_or_else(
                || "off".to_string(),
                |s| {
                    let routes = match (&s.tpu, &s.relay) {
                        (Some(_), Some(_)) => "tpu+relay",
                        (Some(_), None) => "tpu",
                        _ => "relay",
                    };
                    let ingest = s
                        .strategy
                        .ingest
                        .as_ref()
                        .map_or_else(|| "off".to_string(), |i| i.bind.to_string());
                    format!("{routes} (ingest {ingest})")
                }
            ),
            cfg.file
                .models
                .as_ref()
                .map_or_else(|| "off".to_string(), |m| m.dir.display().to_string()),
        );
    for w in &cfg.warnings {
        println!("warning: {w}");
    }
    Ok(())
}

/// Serves until SIGTERM or Ctrl-C, then stops in order and exits.
async fn run(cfg: Config) -> anyhow::Result<()> {
    let (listen, ops_listen) = (cfg.file.listen, cfg.file.ops_listen);
    let running = gw_sidecar::app::start(cfg).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let ops = match ops_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen on {a} (ops_listen)"))?,
        ),
        None => None,
    };
    tracing::info!(%listen, ops = ?ops_listen, "listening");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ops_task = ops.map(|l| {
        let mut stop = stop_rx.clone();
        tokio::spawn(running.serve_ops(l, async move {
            let _ = stop.wait_for(|s| *s).await;
        }))
    });
    let mut stop = stop_rx.clone();
    let serving = running.serve(listener, async move {
        let _ = stop.wait_for(|s| *s).await;
    });
    tokio::pin!(serving);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch for SIGTERM")?;
    tokio::select! {
        () = &mut serving => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), &mut serving).await;
    // Sends that went out are audited: the ones running end, their rows reach the
    // journal (shipped to ClickHouse by the next start if not by now).
    if let Some(dp) = running.plane() {
        dp.quiesce(std::time::Duration::from_secs(3)).await;
    }
    if let Some(t) = ops_task {
        t.abort();
    }
    if let gw_sidecar::control::bus::Bus::Kafka(k) = running.control().bus() {
        if let Err(e) = k.flush(std::time::Duration::from_secs(5)) {
            tracing::warn!(error = %e, "kafka flush at shutdown");
        }
    }
    // Refusals counted beyond the ledger's budget and not summed yet.
    running.flush_refusals().await;
    // The journal's writer ends after what is queued (detached rows included).
    tokio::task::block_in_place(|| running.stop());
    // Everything durable is already on disk (replay guard, agent state, ledger spool);
    // do not wait for Kafka consumers to leave their groups (they hang while the
    // broker is away): uncommitted deliveries are redelivered and deduplicated.
    std::process::exit(0)
}

/// GET `path` on `addr` over HTTP/1.1; Ok only for a 200 within 2 s.
fn probe(addr: &str, path: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let timeout = std::time::Duration::from_secs(2);
    let sa = addr
        .to_socket_addrs()
        .with_context(|| format!("bad address {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to nothing"))?;
    let mut s = std::net::TcpStream::connect_timeout(&sa, timeout)
        .with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes())?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).context("no answer")?;
    if head.starts_with(b"HTTP/1.1 200") {
        return Ok(());
    }
    // What the sidecar says is wrong (bounded), for the health check's log.
    let mut rest = Vec::new();
    let _ = s.take(16 << 10).read_to_end(&mut rest);
    let body = rest
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(&rest[..0], |i| &rest[i + 4..]);
    anyhow::bail!(
        "{path}: {} {}",
        String::from_utf8_lossy(&head),
        String::from_utf8_lossy(body)
    )
}
