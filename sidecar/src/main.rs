//! `gw-sidecar`: serves the control plane behind Envoy.
//! Usage: gw-sidecar [--config FILE]   (env: CTRL_SIGN_SK_HEX, CTRL_PUBKEY_HEX,
//! CTRL_PUBKEY_ID, GW_SIDECAR_LISTEN)

use anyhow::Context;
use gw_core::ControlPolicy;
use gw_sidecar::config::Config;
use gw_sidecar::http::{router, AppState};
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
    let state = AppState::new(policy, replay, cfg.signer, cfg.file.json_issuer.clone());
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
