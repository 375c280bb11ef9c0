//! A local TPU to send to when there is no validator: the protocol-enforcing test
//! receiver (ALPN `solana-tpu`, Ed25519 client certificate, unidirectional streams of
//! at most 1232 bytes, 128 at once). Prints one line per transaction received.
//!
//! Usage: `gw-tpu-sink [ADDR] [IDENTITY_SEED_HEX]`   (default 127.0.0.1:8009; the seed
//! else from `GW_TPU_SINK_IDENTITY_HEX`, else from the file `GW_TPU_SINK_IDENTITY_FILE`
//! names, else a fresh key)

use std::time::Duration;

use ed25519_dalek::SigningKey;
use testkit::tpu_receiver::{first_signature, ReceiverConfig, TpuReceiver};

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8009".into());
    let listen = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("gw-tpu-sink: `{addr}` is not an address: {e}");
            std::process::exit(2);
        }
    };
    if std::env::var_os("GW_TPU_SINK_IDENTITY_HEX").is_some()
        && std::env::var_os("GW_TPU_SINK_IDENTITY_FILE").is_some()
    {
        eprintln!(
            "gw-tpu-sink: set GW_TPU_SINK_IDENTITY_HEX or GW_TPU_SINK_IDENTITY_FILE, not both"
        );
        std::process::exit(2);
    }
    let from_file = || {
        let path = std::env::var("GW_TPU_SINK_IDENTITY_FILE").ok()?;
        match std::fs::read_to_string(&path) {
            Ok(s) => Some(s.trim().to_owned()),
            Err(e) => {
                eprintln!("gw-tpu-sink: GW_TPU_SINK_IDENTITY_FILE {path}: {e}");
                std::process::exit(2);
            }
        }
    };
    let key = match args
        .next()
        .or_else(|| std::env::var("GW_TPU_SINK_IDENTITY_HEX").ok())
        .or_else(from_file)
    {
        Some(h) => match gw_core::jwk::ed25519_secret_from_hex(&h) {
            Ok(k) => k,
            Err(e) => {
                eprintln!("gw-tpu-sink: identity: {e}");
                std::process::exit(2);
            }
        },
        None => {
            let mut seed = [0u8; 32];
            if let Err(e) = rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut seed) {
                eprintln!("gw-tpu-sink: no randomness: {e}");
                std::process::exit(1);
            }
            SigningKey::from_bytes(&seed)
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gw-tpu-sink: {e}");
            std::process::exit(1);
        }
    };
    rt.block_on(async {
        let cfg = ReceiverConfig {
            listen,
            ..ReceiverConfig::default()
        };
        let rx = match TpuReceiver::start(cfg, &key) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("gw-tpu-sink: cannot listen on {listen}: {e}");
                std::process::exit(1);
            }
        };
        println!(
            "gw-tpu-sink: listening on {} (udp), identity {}",
            rx.addr,
            bs58::encode(rx.identity).into_string()
        );
        let mut seen = 0usize;
        loop {
            rx.wait_for(seen as u64 + 1, Duration::from_secs(3600))
                .await;
            let got = rx.received();
            for r in got.iter().skip(seen) {
                let sig = first_signature(&r.bytes).map_or_else(
                    || "<not a transaction>".into(),
                    |s| bs58::encode(s).into_string(),
                );
                println!(
                    "tx {sig} {} bytes from {}",
                    r.bytes.len(),
                    bs58::encode(r.peer).into_string()
                );
            }
            seen = got.len();
        }
    });
}
