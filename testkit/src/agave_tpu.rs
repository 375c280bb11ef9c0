//! Agave's QUIC TPU server (`solana-streamer` 3.1, the validator's own code) as a
//! test peer: the `agave-tpu` binary of `tests/agave-tpu/`, built by
//! `scripts/build-agave-tpu.sh` into the cache. Every transaction the server hands
//! to its consumer is read back from the file the binary writes.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;

/// Where `scripts/build-agave-tpu.sh` puts the binary (`$AGAVE_TPU_BIN` overrides).
pub fn binary() -> PathBuf {
    std::env::var_os("AGAVE_TPU_BIN").map_or_else(
        || crate::cache_dir().join("agave-target/release/agave-tpu"),
        PathBuf::from,
    )
}

/// How to start the server. The defaults are a validator's (8 connections per
/// peer, 8 new connections per minute per IP address) with nobody staked.
#[derive(Clone, Debug)]
pub struct AgaveConfig {
    /// Identities with stake, in lamports.
    pub stakes: Vec<([u8; 32], u64)>,
    /// `max_connections_per_peer`.
    pub per_peer: usize,
    /// `max_connections_per_ipaddr_per_min`.
    pub per_ip_per_min: u64,
}

impl Default for AgaveConfig {
    fn default() -> Self {
        Self {
            stakes: Vec::new(),
            per_peer: 8,
            per_ip_per_min: 8,
        }
    }
}

/// A running server; killed when dropped.
pub struct AgaveTpu {
    /// Its `tpu_quic` address.
    pub addr: SocketAddr,
    /// Its identity (the key in its certificate).
    pub identity: [u8; 32],
    out: PathBuf,
    /// (bytes of the file counted, transactions in them) for [`Self::count`].
    cursor: std::sync::Mutex<(u64, usize)>,
    child: Child,
    _stdin: ChildStdin,
    _dir: crate::TempDir,
}

impl AgaveTpu {
    /// Starts the server on a free loopback port with identity `key`.
    pub fn start(config: &AgaveConfig, key: &SigningKey) -> anyhow::Result<AgaveTpu> {
        let bin = binary();
        anyhow::ensure!(
            bin.exists(),
            "{} is missing: run scripts/build-agave-tpu.sh (scripts/test.sh does)",
            bin.display()
        );
        let dir = crate::TempDir::new("agave-tpu");
        let out = dir.path().join("rx.bin");
        let mut cmd = Command::new(&bin);
        cmd.args(["--bind", "127.0.0.1:0", "--out"])
            .arg(&out)
            .args(["--identity-seed", &hex::encode(key.to_bytes())])
            .args(["--max-connections-per-peer", &config.per_peer.to_string()])
            .args([
                "--max-connections-per-ipaddr-per-min",
                &config.per_ip_per_min.to_string(),
            ]);
        for (k, lamports) in &config.stakes {
            cmd.args([
                "--stake",
                &format!("{}={lamports}", bs58::encode(k).into_string()),
            ]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        // Its first line, or an error after 30 s (a stuck binary fails the test).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("agave-tpu printed nothing within 30 s");
        };
        let ready: serde_json::Value = serde_json::from_str(line.trim())
            .map_err(|e| anyhow::anyhow!("agave-tpu did not start ({e}): {line:?}"))?;
        let addr: SocketAddr = ready["addr"].as_str().unwrap_or_default().parse()?;
        let identity: [u8; 32] = bs58::decode(ready["identity"].as_str().unwrap_or_default())
            .into_vec()?
            .try_into()
            .map_err(|_| anyhow::anyhow!("identity is not 32 bytes"))?;
        anyhow::ensure!(
            identity == key.verifying_key().to_bytes(),
            "agave-tpu runs with another identity"
        );
        Ok(AgaveTpu {
            addr,
            identity,
            out,
            cursor: std::sync::Mutex::new((0, 0)),
            child,
            _stdin: stdin,
            _dir: dir,
        })
    }

    /// Every transaction the server has delivered so far, in delivery order.
    pub fn received(&self) -> Vec<Vec<u8>> {
        self.deliveries().into_iter().map(|(_, tx)| tx).collect()
    }

    /// Every delivery so far with its time (Unix nanoseconds, taken by the server
    /// as its batch reached the consumer), in delivery order.
    pub fn deliveries(&self) -> Vec<(u64, Vec<u8>)> {
        let data = std::fs::read(&self.out).unwrap_or_default();
        records(&data)
            .0
            .into_iter()
            .map(|(at, tx)| (at, tx.to_vec()))
            .collect()
    }

    /// Transactions delivered so far. Reads only what was added since the last
    /// call (a benchmark polls this while the server works on the same cores).
    pub fn count(&self) -> usize {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut cursor) = self.cursor.lock() else {
            return 0;
        };
        let (offset, count) = *cursor;
        let mut data = Vec::new();
        if let Ok(mut f) = std::fs::File::open(&self.out) {
            if f.seek(SeekFrom::Start(offset)).is_err() || f.read_to_end(&mut data).is_err() {
                return count;
            }
        }
        let (recs, used) = records(&data);
        let n = count + recs.len();
        *cursor = (offset + used as u64, n);
        n
    }

    /// Waits until at least `n` transactions were delivered or `timeout` passed;
    /// returns the count.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.count();
            if got >= n || Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for AgaveTpu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The complete records of the server's output (`u32` length, `u64` time, bytes),
/// and the bytes they take (a record still being written is left for later).
fn records(data: &[u8]) -> (Vec<(u64, &[u8])>, usize) {
    let (mut out, mut rest) = (Vec::new(), data);
    while let Some((head, tail)) = rest.split_first_chunk::<12>() {
        let n = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let Some(tx) = tail.get(..n) else { break };
        let mut at = [0u8; 8];
        at.copy_from_slice(&head[4..]);
        out.push((u64::from_le_bytes(at), tx));
        rest = &tail[n..];
    }
    (out, data.len() - rest.len())
}
