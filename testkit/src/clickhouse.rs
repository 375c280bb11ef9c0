//! A real ClickHouse (26.9, PyPI `chdb-core`) started by `scripts/clickhouse-server.py`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{free_port, venv_bin, workspace_root, ProcessGuard};

/// A running ClickHouse; stopped when dropped.
pub struct ClickHouse {
    /// HTTP port.
    pub http_port: u16,
    /// Native protocol port.
    pub tcp_port: u16,
    /// The process.
    pub process: ProcessGuard,
}

/// Sends one query over HTTP; returns the status and body.
pub fn http_query(port: u16, sql: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let req = format!(
        "POST / HTTP/1.1\r\nHost: ch\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{sql}",
        sql.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    // Chunked bodies: keep only the payload lines (queries here return small text).
    let body = if buf
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body.split("\r\n")
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, l)| l)
            .collect()
    } else {
        body
    };
    (status, body)
}

impl ClickHouse {
    /// Starts ClickHouse with its data under `dir`; waits for `/ping`.
    pub fn start(dir: &Path) -> ClickHouse {
        Self::start_at(dir, free_port(), free_port())
    }

    /// Starts ClickHouse on given ports (to restart one over the same data).
    pub fn start_at(dir: &Path, http_port: u16, tcp_port: u16) -> ClickHouse {
        let mut cmd = Command::new(venv_bin("python"));
        cmd.arg(workspace_root().join("scripts/clickhouse-server.py"))
            .args([
                "--http-port",
                &http_port.to_string(),
                "--tcp-port",
                &tcp_port.to_string(),
            ])
            .arg("--data")
            .arg(dir.join("clickhouse"));
        let mut process = ProcessGuard::spawn("clickhouse", &mut cmd, &dir.join("clickhouse.log"));
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if http_query(http_port, "SELECT 1").0 == 200 {
                return ClickHouse {
                    http_port,
                    tcp_port,
                    process,
                };
            }
            process.assert_running();
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("clickhouse did not answer within 60s:\n{}", process.log());
    }

    /// Runs `sql`; panics with the server's answer unless it is 200.
    pub fn query(&self, sql: &str) -> String {
        let (status, body) = http_query(self.http_port, sql);
        assert_eq!(status, 200, "{sql}: {body}");
        body
    }
}
