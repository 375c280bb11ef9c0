//! `gwctl`: the operator CLI of the edge gateway.
//!
//! Exit codes: 0 success; 1 a verdict that is "no" (a rejected command, a non-2xx
//! HTTP answer, a command its module refused to apply); 2 an error (bad arguments,
//! unreadable file, network failure), printed as one line on stderr; 3 (`send`) a
//! command accepted but not applied yet, or a 5xx (not known to be accepted) —
//! send the same file again later, never sign it again. `send`
//! exits 0 for a command applied, also when an earlier send of the same bytes
//! applied it (`409 replay` with `"applied": true`).

#![forbid(unsafe_code)]

mod duration;
mod keys;
mod ledger;
mod send;
mod sign;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "gwctl", version, about = "Operator CLI of the edge gateway")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate an Ed25519 command-signing key: DIR/ID.sk.hex, DIR/ID.pk.hex, DIR/ID.jwk.json.
    Keygen {
        /// Key id (the commands' `pubkey_id`).
        #[arg(long)]
        id: String,
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Build and sign a control command; write its protobuf bytes.
    Sign(sign::SignArgs),
    /// Verify a signed command file offline. Prints `ok` or the rejection code.
    Verify(verify::VerifyArgs),
    /// Mint a development HS256 JWT.
    Jwt(keys::JwtArgs),
    /// POST a signed command over HTTP/3 (or HTTP/2 with --http2); print status and body.
    Send(send::SendArgs),
    /// Audit ledger tools.
    #[command(subcommand)]
    Ledger(LedgerCmd),
}

#[derive(Subcommand)]
enum LedgerCmd {
    /// Verify the hash chain of the decisions stored in ClickHouse: `ok N rows` or where it breaks.
    Verify(ledger::VerifyArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Keygen { id, out, force } => {
            keys::keygen(&id, &out, force).map(|()| ExitCode::SUCCESS)
        }
        Cmd::Sign(a) => sign::run(&a).map(|()| ExitCode::SUCCESS),
        Cmd::Verify(a) => verify::run(&a),
        Cmd::Jwt(a) => keys::jwt(&a).map(|()| ExitCode::SUCCESS),
        Cmd::Send(a) => send::run(&a),
        Cmd::Ledger(LedgerCmd::Verify(a)) => ledger::verify(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line: the chain of causes joined.
            eprintln!("gwctl: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
