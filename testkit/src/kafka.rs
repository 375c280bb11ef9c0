//! A real Kafka-protocol broker: `tansu` 0.6.0, installed once by
//! `scripts/install-tansu.sh` into the cache, in-memory storage.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

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
        let mut cmd = Command::new(tansu_bin());
        cmd.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
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
