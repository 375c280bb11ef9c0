//! A real Kafka-protocol broker: `tansu` 0.6.0, installed once by
//! `scripts/install-tansu.sh` into the cache, in-memory storage.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::tls_front::TlsFront;
use crate::{cache_dir, free_port, wait_tcp, ProcessGuard};

/// The tansu binary; panics with the install command when missing.
pub fn tansu_bin() -> PathBuf {
    let p = cache_dir().join("tansu/bin/tansu");
    assert!(
        p.exists(),
        "{} not found: run `bash scripts/install-tansu.sh` (the README's test command does)",
        p.display()
    );
    p
}

/// A running broker; stopped when dropped.
pub struct Kafka {
    /// Listener port.
    pub port: u16,
    /// The process.
    pub process: ProcessGuard,
}

impl Kafka {
    /// Starts a broker on a free port, logging under `dir`.
    pub fn start(dir: &Path) -> Kafka {
        Self::start_at(dir, free_port())
    }

    /// Starts a broker on `port`.
    pub fn start_at(dir: &Path, port: u16) -> Kafka {
        let url = format!("tcp://127.0.0.1:{port}");
        Self::spawn(dir, port, &url, &url)
    }

    /// Starts a broker listening at `listen` (on `port`) that tells clients to
    /// connect to `advertised`.
    fn spawn(dir: &Path, port: u16, listen: &str, advertised: &str) -> Kafka {
        let mut cmd = Command::new(tansu_bin());
        cmd.args([
            "broker",
            "--listener-url",
            listen,
            "--advertised-listener-url",
            advertised,
            "--storage-engine",
            "memory://tansu/",
        ]);
        let mut process =
            ProcessGuard::spawn("tansu", &mut cmd, &dir.join(format!("tansu-{port}.log")));
        if !wait_tcp(port, Duration::from_secs(30)) {
            process.assert_running();
            panic!("tansu did not listen on {port}:\n{}", process.log());
        }
        Kafka { port, process }
    }

    /// `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// A broker reached over mutual TLS only: tansu listens in plain text on a port
/// no client is told of, and advertises the port of a [`TlsFront`] that checks
/// each client's certificate against the CA and forwards the bytes. What a
/// client sees is a broker with an `SSL` listener that requires client
/// certificates (`ssl.client.auth=required`).
pub struct TlsKafka {
    /// The broker behind the front.
    pub kafka: Kafka,
    /// The front (`bootstrap.servers`, and what the broker advertises).
    pub front: TlsFront,
}

impl TlsKafka {
    /// Starts tansu behind a TLS front serving `cert`/`key` (a certificate for
    /// 127.0.0.1) and accepting clients whose certificate chains to `ca`.
    pub fn start(dir: &Path, ca: &Path, cert: &Path, key: &Path) -> TlsKafka {
        let (inner, port) = (free_port(), free_port());
        let kafka = Kafka::spawn(
            dir,
            inner,
            &format!("tcp://127.0.0.1:{inner}"),
            &format!("tcp://127.0.0.1:{port}"),
        );
        let front = TlsFront::start_at(port, inner, ca, cert, key);
        TlsKafka { kafka, front }
    }

    /// `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.front.port)
    }
}
