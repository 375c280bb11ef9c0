//! Agave's QUIC TPU server as a test peer.
//!
//! Starts `solana-streamer`'s stake-weighted QoS server (the code a validator
//! runs for its `tpu_quic` port) with a validator's limits, and writes every
//! transaction it delivers to its consumer to a file: `u32` little-endian
//! length, `u64` little-endian delivery time (Unix nanoseconds, the batch's), then
//! the bytes, flushed whenever the consumer catches up. This is
//! the server's output, after its stream limits and its packet batcher, so a
//! test that reads the file sees what a validator's banking stage would see.
//!
//! ```text
//! agave-tpu --bind 127.0.0.1:0 --out rx.bin [--identity-seed HEX64]
//!           [--stake BASE58=LAMPORTS]... [--max-connections-per-peer 8]
//!           [--max-connections-per-ipaddr-per-min 8]
//! ```
//!
//! The first stdout line is JSON: `{"addr":"127.0.0.1:port","identity":"…"}`.
//! The server exits when stdin closes, so it never outlives its test.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::num::NonZeroUsize;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context};
use solana_keypair::Keypair;
use solana_pubkey::Pubkey;
use solana_signer::Signer;
use solana_streamer::nonblocking::quic::{spawn_server_with_cancel, SpawnNonBlockingServerResult};
use solana_streamer::nonblocking::swqos::SwQosConfig;
use solana_streamer::quic::QuicStreamerConfig;
use solana_streamer::streamer::StakedNodes;
use tokio_util::sync::CancellationToken;

struct Args {
    bind: SocketAddr,
    out: String,
    seed: Option<[u8; 32]>,
    stakes: HashMap<Pubkey, u64>,
    per_peer: usize,
    per_ip_per_min: u64,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        bind: "127.0.0.1:0".parse()?,
        out: String::new(),
        seed: None,
        stakes: HashMap::new(),
        // A validator's defaults (agave-validator 3.1: --tpu-max-connections-per-peer,
        // --tpu-max-connections-per-ipaddr-per-minute).
        per_peer: 8,
        per_ip_per_min: 8,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--bind" => args.bind = value.parse()?,
            "--out" => args.out = value,
            "--identity-seed" => {
                let bytes = decode_hex(&value).context("--identity-seed: 64 hex digits")?;
                args.seed = Some(bytes);
            }
            "--stake" => {
                let (key, lamports) = value.split_once('=').context("--stake KEY=LAMPORTS")?;
                let key = Pubkey::from_str(key).map_err(|e| anyhow::anyhow!("--stake key: {e}"))?;
                args.stakes.insert(key, lamports.parse()?);
            }
            "--max-connections-per-peer" => args.per_peer = value.parse()?,
            "--max-connections-per-ipaddr-per-min" => args.per_ip_per_min = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    if args.out.is_empty() {
        bail!("--out FILE is required");
    }
    Ok(args)
}

fn decode_hex(s: &str) -> anyhow::Result<[u8; 32]> {
    if s.len() != 64 {
        bail!("expected 64 hex digits, got {}", s.len());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)?;
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let keypair = match args.seed {
        Some(seed) => Keypair::new_from_array(seed),
        None => Keypair::new(),
    };
    let socket = UdpSocket::bind(args.bind)?;
    let addr = socket.local_addr()?;
    let staked_nodes = Arc::new(RwLock::new(StakedNodes::new(
        Arc::new(args.stakes),
        HashMap::new(),
    )));
    let (sender, receiver) = crossbeam_channel::bounded(1024);
    let cancel = CancellationToken::new();
    let config = QuicStreamerConfig {
        max_connections_per_peer: args.per_peer,
        max_connections_per_ipaddr_per_min: args.per_ip_per_min,
        num_threads: NonZeroUsize::new(2).context("non-zero")?,
        accumulator_channel_size: 100_000,
        ..QuicStreamerConfig::default()
    };
    let SpawnNonBlockingServerResult { thread, .. } = {
        let _guard = runtime.enter();
        spawn_server_with_cancel(
            "agave_tpu_peer",
            [socket],
            &keypair,
            sender,
            staked_nodes,
            config,
            SwQosConfig::default(),
            cancel.clone(),
        )?
    };

    let mut out = std::io::BufWriter::new(std::fs::File::create(&args.out)?);
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(
            stdout,
            r#"{{"addr":"{addr}","identity":"{}"}}"#,
            keypair.pubkey()
        )?;
        stdout.flush()?;
    }
    // Stdin closing (the test ended or died) stops the server.
    std::thread::spawn({
        let cancel = cancel.clone();
        move || {
            let mut sink = Vec::new();
            let _ = std::io::stdin().lock().read_to_end(&mut sink);
            cancel.cancel();
        }
    });
    while !cancel.is_cancelled() {
        let batch = match receiver.recv_timeout(Duration::from_millis(100)) {
            Ok(batch) => batch,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        };
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        for packet in batch.iter() {
            let packet = packet.to_bytes_packet();
            let bytes = packet.buffer();
            out.write_all(&(bytes.len() as u32).to_le_bytes())?;
            out.write_all(&at.to_le_bytes())?;
            out.write_all(bytes)?;
        }
        if receiver.is_empty() {
            out.flush()?;
        }
    }
    out.flush()?;
    cancel.cancel();
    let _ = runtime.block_on(thread);
    Ok(())
}
