//! `gw-sidecar`: serves the control plane behind Envoy.
//! Usage: gw-sidecar [--config FILE]   (env: CTRL_SIGN_SK_HEX, CTRL_PUBKEY_HEX,
//! CTRL_PUBKEY_ID, GW_SIDECAR_LISTEN, GW_CLICKHOUSE_URL, GW_KAFKA_BROKERS)

use anyhow::Context;
use gw_sidecar::config::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = match args.as_slice() {
        [] => None,
        [flag, p] if flag == "--config" => Some(std::path::PathBuf::from(p)),
        _ => anyhow::bail!("usage: gw-sidecar [--config FILE]"),
    };
    let cfg = Config::load(path.as_deref(), &|k| std::env::var(k).ok())?;
    let listen = cfg.file.listen;
    let running = gw_sidecar::app::start(cfg).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!("gw-sidecar: listening on {listen} (HTTP/1.1 and h2c)");
    axum::serve(listener, running.router())
        .with_graceful_shutdown(async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            eprintln!("gw-sidecar: shutting down");
        })
        .await
        .context("server failed")?;
    if let gw_sidecar::bus::Bus::Kafka(k) = &running.state.bus {
        if let Err(e) = k.flush(std::time::Duration::from_secs(5)) {
            eprintln!("gw-sidecar: kafka flush at shutdown: {e}");
        }
    }
    Ok(())
}
