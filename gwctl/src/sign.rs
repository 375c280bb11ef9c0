//! `gwctl sign`: build a control command and sign it with the core's signer.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use gw_core::command::sign_command;
use gw_core::{Action, Module, NewCommand, NonceSource};

/// `gwctl sign` arguments.
#[derive(Args)]
pub struct SignArgs {
    /// The signing key file (32 bytes hex), e.g. keys/op-admin-1.sk.hex.
    #[arg(long)]
    key: PathBuf,
    /// The key id written as `pubkey_id`.
    #[arg(long)]
    key_id: String,
    /// Module: arbitrage or mev.
    #[arg(long)]
    module: String,
    /// Action: start, stop, restart, throttle, policy or kill.
    #[arg(long)]
    action: String,
    /// An argument KEY=VALUE (repeatable), e.g. throttle_pct=40, ev_min=0.2, tip_ladder=0.1,0.2.
    #[arg(long = "arg")]
    args: Vec<String>,
    /// The issuer.
    #[arg(long, default_value = "gwctl")]
    issuer: String,
    /// The nonce (default: unix time in nanoseconds, monotonic per issuer in practice).
    #[arg(long)]
    nonce: Option<u64>,
    /// The timestamp, unix seconds (default: now).
    #[arg(long)]
    ts: Option<u64>,
    /// The request id (default: a random UUID).
    #[arg(long)]
    request_id: Option<String>,
    /// Output file, or - for stdout. An existing file is not overwritten (it may
    /// hold a command sent with an unknown outcome: send that file again).
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing `--out` file (written whole beside it, then renamed).
    #[arg(long)]
    force: bool,
}

/// The command to sign, from the arguments (the core's builder checks the args).
fn build(a: &SignArgs) -> Result<NewCommand> {
    let module = Module::parse(&a.module)
        .with_context(|| format!("unknown module `{}` (arbitrage, mev)", a.module))?;
    let action = Action::parse(&a.action).with_context(|| {
        format!(
            "unknown action `{}` (start, stop, restart, throttle, policy, kill)",
            a.action
        )
    })?;
    let mut args = BTreeMap::new();
    for kv in &a.args {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--arg `{kv}` is not KEY=VALUE"))?;
        if args.insert(k.to_owned(), v.to_owned()).is_some() {
            bail!("--arg `{k}` given twice");
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("system clock is before 1970")?;
    let nonce = match a.nonce {
        Some(0) => bail!("--nonce must be non-zero"),
        Some(n) => n,
        None => NonceSource::default()
            .next(u64::try_from(now.as_nanos()).context("clock out of range")?),
    };
    Ok(NewCommand {
        module,
        action,
        args,
        issuer: a.issuer.clone(),
        request_id: a
            .request_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        ts: a.ts.unwrap_or(now.as_secs()),
        nonce,
    })
}

/// `gwctl sign`.
pub fn run(a: &SignArgs) -> Result<()> {
    let sk = crate::keys::read_signing_key(&a.key)?;
    let cmd = build(a)?.build().map_err(|r| anyhow::anyhow!("{r}"))?;
    let body = sign_command(&cmd, &sk, &a.key_id);
    if a.out.as_os_str() == "-" {
        std::io::stdout()
            .write_all(&body)
            .context("cannot write to stdout")?;
    } else {
        // Never over a command that may have been sent: re-signing makes a new
        // nonce and request id, a second command that applies again.
        crate::keys::write_new(&a.out, &body, false, a.force)?;
        eprintln!(
            "signed {}:{} request_id={} nonce={} ({} bytes) -> {}",
            a.module,
            a.action,
            cmd.request_id,
            cmd.nonce,
            body.len(),
            a.out.display()
        );
    }
    Ok(())
}
