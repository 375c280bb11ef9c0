//! `gwctl ledger verify`: walks every hash chain of `control_decisions` as stored in
//! ClickHouse (one per gateway node); a removed, altered or reordered row is
//! reported with its chain and `seq`.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use gw_core::ledger::{by_chain, verify_chain, LedgerRow};

/// `gwctl ledger verify` arguments.
#[derive(Args)]
pub struct VerifyArgs {
    /// ClickHouse HTTP URL.
    #[arg(long, default_value = "http://127.0.0.1:8123")]
    clickhouse: String,
    /// Table holding the decisions.
    #[arg(long, default_value = "control_decisions")]
    table: String,
}

/// `gwctl ledger verify`.
pub fn verify(a: &VerifyArgs) -> Result<ExitCode> {
    if !a
        .table
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        anyhow::bail!("--table `{}` is not a plain table name", a.table);
    }
    let sql = format!(
        "SELECT * FROM {} ORDER BY chain_id, seq FORMAT JSONEachRow",
        a.table
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let body = rt.block_on(async {
        let resp = reqwest::Client::new()
            .post(&a.clickhouse)
            .body(sql)
            .send()
            .await
            .with_context(|| format!("cannot reach ClickHouse at {}", a.clickhouse))?;
        let status = resp.status();
        let text = resp.text().await.context("ClickHouse answer")?;
        anyhow::ensure!(
            status.is_success(),
            "ClickHouse answered {status}: {}",
            text.trim()
        );
        Ok::<_, anyhow::Error>(text)
    })?;
    let rows: Vec<LedgerRow> = body
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("row {} is not a ledger row", i + 1))
        })
        .collect::<Result<_>>()?;
    let total = rows.len();
    let mut broken = false;
    let chains = by_chain(rows);
    for (chain, rows) in &chains {
        match verify_chain(rows) {
            Ok(n) if chains.len() > 1 => println!("chain {chain}: ok {n} rows"),
            Ok(_) => {}
            Err(e) => {
                println!("broken: chain {chain}: {e}");
                broken = true;
            }
        }
    }
    if broken {
        return Ok(ExitCode::from(1));
    }
    println!("ok {total} rows");
    Ok(ExitCode::SUCCESS)
}
