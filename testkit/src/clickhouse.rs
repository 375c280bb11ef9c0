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
    /// The project's users (`scripts/clickhouse-users.py`), when started with them.
    pub users: Option<Users>,
}

/// A ClickHouse user and its password.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
}

/// The users `scripts/clickhouse-users.py` writes: the administrator and the
/// sidecar's least-privilege user.
#[derive(Debug, Clone)]
pub struct Users {
    /// `gw_admin`.
    pub admin: Credentials,
    /// `gw_sidecar`.
    pub sidecar: Credentials,
    /// The file of the sidecar's password (for `GW_CLICKHOUSE_PASSWORD_FILE`).
    pub sidecar_password_file: std::path::PathBuf,
}

impl Users {
    /// The users of the password files `admin` and `sidecar`.
    pub fn from_files(admin: &Path, sidecar: &Path) -> Users {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap().trim().to_owned();
        Users {
            admin: Credentials {
                user: "gw_admin".into(),
                password: read(admin),
            },
            sidecar: Credentials {
                user: "gw_sidecar".into(),
                password: read(sidecar),
            },
            sidecar_password_file: sidecar.to_path_buf(),
        }
    }

    /// Fresh passwords and the users file, under `dir`.
    fn write(dir: &Path) -> (Users, std::path::PathBuf) {
        std::fs::create_dir_all(dir).unwrap();
        let pw = |name: &str| {
            let p = dir.join(format!("{name}.pw"));
            let mut b = [0u8; 24];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
            std::fs::write(&p, hex::encode(b)).unwrap();
            p
        };
        let admin_file = pw("clickhouse-admin");
        let sidecar_file = pw("clickhouse-sidecar");
        let users = dir.join("users.xml");
        let status = Command::new("python3")
            .arg(workspace_root().join("scripts/clickhouse-users.py"))
            .arg("--admin-password-file")
            .arg(&admin_file)
            .arg("--sidecar-password-file")
            .arg(&sidecar_file)
            .arg("--standalone")
            .arg("-o")
            .arg(&users)
            .status()
            .unwrap();
        assert!(status.success(), "clickhouse-users.py failed");
        (Users::from_files(&admin_file, &sidecar_file), users)
    }
}

/// Sends one query over HTTP as ClickHouse's default user; returns the status and
/// body.
pub fn http_query(port: u16, sql: &str) -> (u16, String) {
    http_query_as(port, sql, None)
}

/// Sends one query over HTTP as `who` (the default user without); returns the
/// status and body.
pub fn http_query_as(port: u16, sql: &str, who: Option<&Credentials>) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let auth = who.map_or(String::new(), |c| {
        format!(
            "X-ClickHouse-User: {}\r\nX-ClickHouse-Key: {}\r\n",
            c.user, c.password
        )
    });
    let req = format!(
        "POST / HTTP/1.1\r\nHost: ch\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n{sql}",
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

    /// Starts ClickHouse with the project's users (`scripts/clickhouse-users.py`):
    /// the default user can do nothing, [`ClickHouse::query`] runs as the
    /// administrator.
    pub fn start_secured(dir: &Path) -> ClickHouse {
        Self::start_secured_with(dir, "")
    }

    /// [`ClickHouse::start_secured`], with `extra` (a `<clickhouse>` users
    /// document: profiles, constraints) merged in from `users.d/`.
    pub fn start_secured_with(dir: &Path, extra: &str) -> ClickHouse {
        let (users, file) = Users::write(&dir.join("clickhouse-users"));
        if !extra.is_empty() {
            let d = dir.join("clickhouse-users/users.d");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("extra.xml"), extra).unwrap();
        }
        Self::start_with_users(dir, &file, users)
    }

    /// Starts ClickHouse with the users file `file` (a `users.d/` beside it is
    /// merged in), whose administrator and sidecar user are `users`.
    pub fn start_with_users(dir: &Path, file: &Path, users: Users) -> ClickHouse {
        let mut ch = Self::launch(
            dir,
            free_port(),
            free_port(),
            Some(file),
            Some(&users.admin),
        );
        ch.users = Some(users);
        ch
    }

    /// Starts ClickHouse on given ports (to restart one over the same data).
    pub fn start_at(dir: &Path, http_port: u16, tcp_port: u16) -> ClickHouse {
        Self::launch(dir, http_port, tcp_port, None, None)
    }

    fn launch(
        dir: &Path,
        http_port: u16,
        tcp_port: u16,
        users: Option<&Path>,
        probe_as: Option<&Credentials>,
    ) -> ClickHouse {
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
        if let Some(u) = users {
            cmd.arg("--users").arg(u);
        }
        let mut process = ProcessGuard::spawn("clickhouse", &mut cmd, &dir.join("clickhouse.log"));
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if http_query_as(http_port, "SELECT 1", probe_as).0 == 200 {
                return ClickHouse {
                    http_port,
                    tcp_port,
                    process,
                    users: None,
                };
            }
            process.assert_running();
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("clickhouse did not answer within 60s:\n{}", process.log());
    }

    /// Runs `sql` (as the administrator when started secured); panics with the
    /// server's answer unless it is 200.
    pub fn query(&self, sql: &str) -> String {
        let (status, body) = self.query_as(sql, self.users.as_ref().map(|u| &u.admin));
        assert_eq!(status, 200, "{sql}: {body}");
        body
    }

    /// Runs `sql` as `who`; the status and the body.
    pub fn query_as(&self, sql: &str, who: Option<&Credentials>) -> (u16, String) {
        http_query_as(self.http_port, sql, who)
    }

    /// The HTTP URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }
}
