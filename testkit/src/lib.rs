//! Helpers for integration tests that run real components (Python reference
//! implementations, Envoy, ...): where things are, free ports, and child processes
//! that are always stopped, even when a test panics.

#![forbid(unsafe_code)]

use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod agave_tpu;
pub mod clickhouse;
pub mod echo;
pub mod envoy;
pub mod faultfs;
pub mod fixtures;
pub mod http_thread;
pub mod kafka;
#[cfg(feature = "proxy-wasm-host")]
pub mod proxy_wasm;
pub mod relay;
pub mod rpc_node;
pub mod tls_front;
pub mod tpu_receiver;
pub mod udp_delay;

/// The workspace root (the directory holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit lives one level below the root")
        .to_path_buf()
}

/// The project's cache directory (`$GW_CACHE`, default `~/.cache/edge-gw`).
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("GW_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"),
        PathBuf::from,
    );
    base.join("edge-gw")
}

/// A program inside the cached test venv (`$GW_VENV/bin/NAME`). Panics with the
/// set-up command when the venv is missing: tests never silently skip.
pub fn venv_bin(name: &str) -> PathBuf {
    in_venv("GW_VENV", "venv", name)
}

/// `$VAR/bin/NAME`, or `<cache>/<default>/bin/NAME`; panics when it is missing.
fn in_venv(var: &str, default: &str, name: &str) -> PathBuf {
    let venv = std::env::var_os(var).map_or_else(|| cache_dir().join(default), PathBuf::from);
    let p = venv.join("bin").join(name);
    assert!(
        p.exists(),
        "{} not found: run `bash scripts/setup-venv.sh` (or the README's test command) first",
        p.display()
    );
    p
}

/// The venv's Python interpreter.
pub fn python() -> PathBuf {
    venv_bin("python")
}

/// The model toolchain venv's Python (`$GW_MODELS_VENV`, abi/requirements.txt:
/// LightGBM, XGBoost, scikit-learn, Treelite, tl2cgen). Panics with the set-up
/// command when it is missing.
pub fn models_python() -> PathBuf {
    in_venv("GW_MODELS_VENV", "venv-models", "python")
}

/// Runs the venv's Python with `args`, feeding `stdin`; panics with its stderr on failure.
pub fn run_python(args: &[&str], stdin: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new(python())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    let out = child.wait_with_output().expect("python output");
    assert!(
        out.status.success(),
        "python {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A port that is free for both TCP and UDP on 127.0.0.1 at the time of asking.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Below the kernel's ephemeral range: an outgoing connection of a test running
    // alongside never takes a port between its being chosen here and its server
    // binding it. Each process walks the range from its own starting point, and
    // never hands out a port twice.
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<u32>().ok())
        })
        .unwrap_or(32_768);
    const LOW: u32 = 10_000;
    if ephemeral_low > LOW + 1_000 {
        let span = ephemeral_low - LOW;
        let start = std::process::id().wrapping_mul(7_919) % span;
        for _ in 0..span {
            let i = NEXT.fetch_add(1, Ordering::Relaxed);
            let Ok(port) = u16::try_from(LOW + (start + i) % span) else {
                continue;
            };
            if TcpListener::bind(("127.0.0.1", port)).is_ok()
                && UdpSocket::bind(("127.0.0.1", port)).is_ok()
            {
                return port;
            }
        }
    }
    for _ in 0..100 {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let port = tcp.local_addr().expect("addr").port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both TCP and UDP");
}

/// Waits until something accepts TCP connections on `127.0.0.1:port`.
pub fn wait_tcp(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A child process that is killed (and reaped) when dropped.
pub struct ProcessGuard {
    name: String,
    child: Option<Child>,
    log: Option<PathBuf>,
}

impl ProcessGuard {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> ProcessGuard {
        let f = std::fs::File::create(log).expect("create log");
        let f2 = f.try_clone().expect("clone log");
        let child = cmd
            .stdout(Stdio::from(f))
            .stderr(Stdio::from(f2))
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        ProcessGuard {
            name: name.into(),
            child: Some(child),
            log: Some(log.to_path_buf()),
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The log's contents so far (for assertion messages).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Panics with the log if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                panic!("{} exited with {status}:\n{}", self.name, self.log());
            }
        }
    }

    /// Sends `signal` (a name: `STOP`, `CONT`, `KILL`, …) with `kill(1)`: `STOP`
    /// freezes the process — a broker or a database that stops answering, its data
    /// intact — until `CONT`.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.id().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal} {} ({})", self.id(), self.name);
    }

    /// Waits up to `timeout` for the process to exit on its own; its status, or
    /// `None` while it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        let c = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the process now.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A fresh temporary directory under the system temp dir, removed on drop (kept
/// when the test fails, or with `GW_KEEP_TMP`).
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/gw-<prefix>-<pid>-<n>`.
    pub fn new(prefix: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "gw-{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    /// Removes the directory, unless `GW_KEEP_TMP` is set (for debugging) or the
    /// test is failing: then its logs stay for whoever reads the failure, and the
    /// path is printed.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test failed: its files stay in {}", self.0.display());
        } else if std::env::var_os("GW_KEEP_TMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The cargo target directory (`$CARGO_TARGET_DIR`, default `<root>/target`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

/// The built edge filter (`wasm32-wasip1`, release). Panics with the build command
/// when it is missing or older than its sources, so a test never runs stale code.
pub fn filter_wasm() -> PathBuf {
    let p = target_dir().join("wasm32-wasip1/release/gw_filter.wasm");
    let hint = "build it: cargo build --release --target wasm32-wasip1 -p gw-filter (scripts/test.sh does)";
    let built = std::fs::metadata(&p)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("{} is missing; {hint}", p.display()));
    // Cargo's dep-info lists exactly the sources the artifact was built from.
    let dep_info = p.with_extension("d");
    let deps = std::fs::read_to_string(&dep_info).unwrap_or_default();
    let sources = deps.split_once(':').map_or("", |(_, d)| d);
    for src in sources
        .split_whitespace()
        .filter(|s| s.ends_with(".rs") || s.ends_with(".proto"))
    {
        let changed = std::fs::metadata(src)
            .and_then(|m| m.modified())
            .map_or(true, |t| t > built);
        assert!(!changed, "{} is older than {src}; {hint}", p.display());
    }
    p
}

/// The `gwctl` binary built by this `cargo test` run (debug profile). Packages other
/// than gwctl cannot name it with `CARGO_BIN_EXE_*`; `cargo test --workspace` builds it.
pub fn gwctl_bin() -> PathBuf {
    let p = target_dir().join("debug/gwctl");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p gwctl` or the workspace tests",
        p.display()
    );
    p
}
