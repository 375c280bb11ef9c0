//! `gwctl verify`: offline verification of a signed command file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use gw_core::freshness::{check_freshness, DEFAULT_MAX_SKEW_SECS};
use gw_core::jwk::ed25519_from_hex;
use gw_core::keyring::CommandKey;
use gw_core::{verify_command, KeyRing};

/// `gwctl verify` arguments.
#[derive(Args)]
pub struct VerifyArgs {
    /// A trusted key ID=PUBHEX (repeatable).
    #[arg(long = "key")]
    keys: Vec<String>,
    /// A key ring JSON file (as the filter and sidecar use).
    #[arg(long)]
    keyring: Option<PathBuf>,
    /// Also check freshness and the key's validity window at this time: unix seconds, or `now`.
    #[arg(long)]
    now: Option<String>,
    /// Allowed clock skew for --now, seconds.
    #[arg(long, default_value_t = DEFAULT_MAX_SKEW_SECS)]
    max_skew: u64,
    /// The signed command file.
    file: PathBuf,
}

fn keyring(a: &VerifyArgs) -> Result<KeyRing> {
    let mut ring = match &a.keyring {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            KeyRing::from_json(&text).with_context(|| format!("key ring {}", p.display()))?
        }
        None => KeyRing::new(),
    };
    for k in &a.keys {
        let (id, hex) = k
            .split_once('=')
            .with_context(|| format!("--key `{k}` is not ID=PUBHEX"))?;
        let vk = ed25519_from_hex(hex).with_context(|| format!("--key {id}"))?;
        ring.insert(CommandKey::unrestricted(id, vk))?;
    }
    anyhow::ensure!(
        !ring.is_empty(),
        "give at least one --key ID=PUBHEX or --keyring FILE"
    );
    Ok(ring)
}

/// `gwctl verify`.
pub fn run(a: &VerifyArgs) -> Result<ExitCode> {
    let ring = keyring(a)?;
    let body =
        std::fs::read(&a.file).with_context(|| format!("cannot read {}", a.file.display()))?;
    let now = match a.now.as_deref() {
        None => None,
        Some("now") => Some(crate::keys::now_secs()?),
        Some(s) => Some(
            s.parse()
                .with_context(|| format!("--now `{s}` is not unix seconds or `now`"))?,
        ),
    };
    let verdict = verify_command(&body, &ring, now).and_then(|v| {
        if let Some(now) = now {
            check_freshness(v.command.ts, now, a.max_skew)?;
        }
        Ok(v)
    });
    match verdict {
        Ok(v) => {
            let c = &v.command;
            println!("ok");
            eprintln!(
                "{}:{} issuer={} pubkey_id={} request_id={} nonce={} ts={} args={:?}",
                v.module.as_str(),
                v.action.as_str(),
                c.issuer,
                c.pubkey_id,
                c.request_id,
                c.nonce,
                c.ts,
                c.args
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(r) => {
            println!("{}", r.code);
            eprintln!("{}", r.detail);
            Ok(ExitCode::from(1))
        }
    }
}
