//! `gw-sidecar`: serves the control plane behind Envoy.
//! Usage: gw-sidecar [--config FILE]   (env: CTRL_SIGN_SK_HEX, CTRL_PUBKEY_HEX,
//! CTRL_PUBKEY_ID, GW_SIDECAR_LISTEN)

use anyhow::Context;
use gw_core::ControlPolicy;
use gw_sidecar::config::Config;
use gw_sidecar::http::{flush_ledger, router, AppState};
use gw_sidecar::ledger_sink::Ledger;
use gw_sidecar::replay_store::ReplayStore;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = match args.as_slice() {
        [] => None,
        [flag, p] if flag == "--config" => Some(std::path::PathBuf::from(p)),
        _ => anyhow::bail!("usage: gw-sidecar [--config FILE]"),
    };
    let cfg = Config::load(path.as_deref(), &|k| std::env::var(k).ok())?;
    std::fs::create_dir_all(&cfg.file.state_dir)
        .with_context(|| format!("cannot create state dir {}", cfg.file.state_dir.display()))?;
    let replay = ReplayStore::open(
        &cfg.file.state_dir.join("replay.json"),
        cfg.file.replay_window,
    )?;
    let policy = ControlPolicy {
        keyring: cfg.keyring,
        max_skew: cfg.file.max_skew_secs,
        max_body: cfg.file.max_body_bytes,
    };
    let ch = cfg
        .file
        .clickhouse_url
        .as_ref()
        .map(|u| clickhouse::Client::default().with_url(u.clone()));
    let ledger = match &ch {
        Some(client) => Some(Ledger::open(
            &cfg.file.state_dir.join("ledger"),
            client.clone(),
            "control_decisions",
        )?),
        None => {
            eprintln!(
                "gw-sidecar: no clickhouse_url: decisions are NOT audited (development only)"
            );
            None
        }
    };
    let state = AppState::with_ledger(
        policy,
        replay,
        cfg.signer,
        cfg.file.json_issuer.clone(),
        ledger,
    );
    if let Some(client) = ch {
        // Ship the spool in order; rows wait there while ClickHouse is away.
        let st = state.clone();
        tokio::spawn(async move {
            let mut migrated = false;
            let mut last_err = String::new();
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                if !migrated {
                    match gw_sidecar::migrations::apply(&client).await {
                        Ok(()) => migrated = true,
                        Err(e) => {
                            if e != last_err {
                                eprintln!("gw-sidecar: ledger migrations pending: {e}");
                                last_err = e;
                            }
                            continue;
                        }
                    }
                }
                match flush_ledger(&st, &client, "control_decisions").await {
                    Ok(_) => last_err.clear(),
                    Err(e) if e != last_err => {
                        eprintln!("gw-sidecar: ledger rows kept in the spool: {e}");
                        last_err = e;
                    }
                    Err(_) => {}
                }
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(cfg.file.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.file.listen))?;
    eprintln!(
        "gw-sidecar: listening on {} (HTTP/1.1 and h2c)",
        cfg.file.listen
    );
    axum::serve(listener, router(state, cfg.file.max_body_bytes))
        .with_graceful_shutdown(async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            eprintln!("gw-sidecar: shutting down");
        })
        .await
        .context("server failed")
}
