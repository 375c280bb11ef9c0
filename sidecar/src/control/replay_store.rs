//! The authoritative replay guard, persisted to a local file so a restart never
//! re-opens a nonce. Every accepted nonce is durable (written, fsynced, atomically
//! renamed, directory fsynced) before the command is acknowledged.

use std::fs;
use std::path::{Path, PathBuf};

use gw_core::replay::{ReplayGuard, ReplaySnapshot};
use gw_core::{Code, Reject};

/// Why the store cannot be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// File system error.
    #[error("replay state {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file exists but is not a replay snapshot: refuse to start rather than forget nonces.
    #[error("replay state {path} is corrupt ({detail}); refusing to start with an empty guard")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// A replay guard backed by a file.
#[derive(Debug)]
pub struct ReplayStore {
    path: PathBuf,
    guard: ReplayGuard,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl ReplayStore {
    /// Opens `path` (created on first accept) with a window of `window` nonces.
    pub fn open(path: &Path, window: u32) -> Result<ReplayStore, StoreError> {
        let guard = match fs::read(path) {
            Ok(bytes) => {
                let snap: ReplaySnapshot =
                    serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                        path: path.to_path_buf(),
                        detail: e.to_string(),
                    })?;
                ReplayGuard::restore(snap).map_err(|e| StoreError::Corrupt {
                    path: path.to_path_buf(),
                    detail: e.to_string(),
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ReplayGuard::new(window)
                .map_err(|e| StoreError::Corrupt {
                    path: path.to_path_buf(),
                    detail: e.to_string(),
                })?,
            Err(e) => return Err(io(path)(e)),
        };
        Ok(ReplayStore {
            path: path.to_path_buf(),
            guard,
        })
    }

    /// Accepts `(issuer, nonce)` once, durably. On a write failure the nonce is not
    /// accepted (fail closed) and the in-memory state is rolled back.
    pub fn accept(&mut self, issuer: &str, nonce: u64) -> Result<(), Reject> {
        let before = self.guard.clone();
        self.guard.accept(issuer, nonce)?;
        if let Err(e) = self.persist() {
            self.guard = before;
            return Err(Reject::with(Code::ReplayUnavailable, e.to_string()));
        }
        Ok(())
    }

    /// Whether `(issuer, nonce)` would be accepted.
    pub fn check(&self, issuer: &str, nonce: u64) -> Result<(), Reject> {
        self.guard.check(issuer, nonce)
    }

    fn persist(&self) -> Result<(), StoreError> {
        let bytes =
            serde_json::to_vec(&self.guard.snapshot()).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                detail: e.to_string(),
            })?;
        crate::durable::write_atomic(&self.path, &bytes).map_err(io(&self.path))
    }
}

impl super::admission::SeenNonces for ReplayStore {
    fn check(&self, issuer: &str, nonce: u64) -> Result<(), Reject> {
        ReplayStore::check(self, issuer, nonce)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_restart() {
        let d = testkit::TempDir::new("replay-store");
        let p = d.path().join("replay.json");
        let mut s = ReplayStore::open(&p, 64).unwrap();
        s.accept("dashboard", 10).unwrap();
        s.accept("dashboard", 8).unwrap();
        drop(s);
        let mut s = ReplayStore::open(&p, 64).unwrap();
        assert_eq!(s.accept("dashboard", 10).unwrap_err().code, Code::Replay);
        assert_eq!(s.accept("dashboard", 8).unwrap_err().code, Code::Replay);
        s.accept("dashboard", 9).unwrap();
        assert!(!p.with_extension("tmp").exists());
    }

    #[test]
    fn corrupt_state_refuses_to_start() {
        let d = testkit::TempDir::new("replay-corrupt");
        let p = d.path().join("replay.json");
        fs::write(&p, b"{not json").unwrap();
        let err = ReplayStore::open(&p, 64).unwrap_err().to_string();
        assert!(err.contains("corrupt") && err.contains("refusing"), "{err}");
    }

    #[test]
    fn a_failed_write_accepts_nothing() {
        let d = testkit::TempDir::new("replay-readonly");
        let p = d.path().join("missing-dir").join("replay.json");
        let mut s = ReplayStore::open(&p, 64).unwrap();
        assert_eq!(s.accept("x", 1).unwrap_err().code, Code::ReplayUnavailable);
        // Rolled back: once the directory exists the same nonce is still acceptable.
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        s.accept("x", 1).unwrap();
    }
}
