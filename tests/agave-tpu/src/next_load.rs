//! `solana-tpu-client-next` 3.1.14 (Agave's TPU client) as the peer of the parity
//! benchmark (`bench/benches/tpu_parity.rs`): sends the transactions of a file to
//! one pinned leader, the way an RPC node's send-transaction service does, and
//! records when each was handed to the client.
//!
//! ```text
//! next-load --server ADDR --identity-seed HEX64 --txs FILE --submits OUT [--batch 64]
//!           [--pace-us N]
//! ```
//!
//! `FILE`: `u32` little-endian length then the bytes, per transaction. The first
//! transaction goes alone (connection set-up), then, 500 ms later, the rest in
//! batches, or with `--pace-us` one at a time, the next `N` µs after the last was
//! due (as a node sends what it finds, not a backlog). `OUT`: one `u64`
//! little-endian per transaction, Unix nanoseconds when its batch was handed over.
//! Prints `sent` when done; exits when stdin closes.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use solana_keypair::Keypair;
use solana_tpu_client_next::connection_workers_scheduler::{
    BindTarget, ConnectionWorkersSchedulerConfig, Fanout, StakeIdentity,
};
use solana_tpu_client_next::leader_updater::LeaderUpdater;
use solana_tpu_client_next::transaction_batch::TransactionBatch;
use solana_tpu_client_next::ConnectionWorkersScheduler;
use tokio_util::sync::CancellationToken;

struct Pinned(SocketAddr);

#[async_trait::async_trait]
impl LeaderUpdater for Pinned {
    fn next_leaders(&mut self, _lookahead: usize) -> Vec<SocketAddr> {
        vec![self.0]
    }
    async fn stop(&mut self) {}
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn read_txs(path: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let data = std::fs::read(path)?;
    let mut out = Vec::new();
    let mut rest = &data[..];
    while let Some((len, tail)) = rest.split_first_chunk::<4>() {
        let n = u32::from_le_bytes(*len) as usize;
        let tx = tail.get(..n).context("truncated transaction file")?;
        out.push(tx.to_vec());
        rest = &tail[n..];
    }
    Ok(out)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let (mut server, mut seed, mut txs, mut submits, mut batch) = (None, None, None, None, 64usize);
    let mut pace_us: Option<u64> = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--server" => server = Some(value.parse::<SocketAddr>()?),
            "--identity-seed" => seed = Some(value),
            "--txs" => txs = Some(value),
            "--submits" => submits = Some(value),
            "--batch" => batch = value.parse()?,
            "--pace-us" => pace_us = Some(value.parse()?),
            other => bail!("unknown flag {other}"),
        }
    }
    let server = server.context("--server")?;
    let seed = seed.context("--identity-seed")?;
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(seed.get(2 * i..2 * i + 2).context("64 hex digits")?, 16)?;
    }
    let keypair = Keypair::new_from_array(key);
    let txs = read_txs(&txs.context("--txs")?)?;
    let submits = submits.context("--submits")?;

    let (tx_sender, tx_receiver) = tokio::sync::mpsc::channel(1 << 16);
    let (_identity_tx, identity_rx) = tokio::sync::watch::channel(None);
    let cancel = CancellationToken::new();
    let scheduler = ConnectionWorkersScheduler::new(
        Box::new(Pinned(server)),
        tx_receiver,
        identity_rx,
        cancel.clone(),
    );
    let config = ConnectionWorkersSchedulerConfig {
        bind: BindTarget::Address("127.0.0.1:0".parse()?),
        stake_identity: Some(StakeIdentity::new(&keypair)),
        num_connections: 1,
        skip_check_transaction_age: true,
        // Its broadcaster drops a batch when the worker's channel is full: large.
        worker_channel_size: 1 << 16,
        max_reconnect_attempts: 4,
        leaders_fanout: Fanout {
            send: 1,
            connect: 1,
        },
    };
    let run = tokio::spawn(scheduler.run(config));

    let mut times = Vec::with_capacity(txs.len());
    let mut rest = txs.into_iter();
    if let Some(first) = rest.next() {
        times.push(now_ns());
        tx_sender.send(TransactionBatch::new(vec![first])).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rest: Vec<Vec<u8>> = rest.collect();
    if let Some(pace) = pace_us {
        let start = tokio::time::Instant::now();
        for (i, tx) in rest.into_iter().enumerate() {
            let due = Duration::from_micros(pace.saturating_mul(i as u64));
            tokio::time::sleep_until(start + due).await;
            times.push(now_ns());
            tx_sender.send(TransactionBatch::new(vec![tx])).await?;
        }
    } else {
        for chunk in rest.chunks(batch.max(1)) {
            let at = now_ns();
            times.extend(std::iter::repeat_n(at, chunk.len()));
            tx_sender
                .send(TransactionBatch::new(chunk.to_vec()))
                .await?;
        }
    }
    let mut out = Vec::with_capacity(times.len() * 8);
    for t in &times {
        out.extend_from_slice(&t.to_le_bytes());
    }
    std::fs::write(&submits, out)?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "sent")?;
        stdout.flush()?;
    }
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().lock().read_to_end(&mut sink);
    })
    .await?;
    cancel.cancel();
    drop(tx_sender);
    let _ = run.await;
    Ok(())
}
