//! The replay guards' durable clock floor.
//!
//! A nonce is remembered until its command's freshness ends, then forgotten: its
//! record may leave the journal (or, on the Kafka bus, be tombstoned in the agent
//! state topic). In memory a guard then judges commands no earlier than just past
//! the latest expiry it forgot ([`gw_core::replay::NonceBook::clock`]), so a wall
//! clock stepped back cannot make a forgotten command fresh again. That time was
//! held in memory only: after a restart whose clock read earlier than a nonce's
//! expiry (stepped back by NTP, a VM restored from a snapshot, a bad RTC) once
//! the nonce's record had gone, the command was fresh and unknown — a replay.
//!
//! The floor is that time made durable, in `{state_dir}/`[`FILE`]. The rule every
//! guard keeps: **a record of a nonce expiring at `e` goes only once the floor is
//! past `e`** ([`ClockFloor::cover`] before it lets the record go). A start reads
//! the floor first and judges commands no earlier than it. The floor is an expiry
//! some guard forgot, plus one — never a clock reading: a clock that jumped ahead
//! and came back holds commands back only as long as the nonces it made the
//! guards forget were fresh, as in memory.
//!
//! Written atomically (a crash leaves the old value or the new one) and only
//! forward; about once per [`STEP`] seconds at most (an agent's snapshot writes
//! it at once), so a guard keeps its records up to about that much longer than
//! it needs. The write (two fsyncs) runs on the caller's thread — the journal's
//! writer thread for the admission guard — at that rate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::journal::Expiring;

/// The floor's file in the state directory.
pub const FILE: &str = "replay-floor";

/// How far behind what the guards forgot the floor may stay before it is written
/// again (seconds of expiries).
pub const STEP: u64 = 10;

/// The floor cannot be read: the start is refused (taken as 0, it would let a
/// clock stepped back replay every command whose nonce was forgotten).
#[derive(Debug, thiserror::Error)]
#[error("the replay guard's clock floor {path} cannot be read: {detail} (a file of this node's state directory; if it was damaged, write into it the current unix time plus the freshness window, which refuses every command signed before now)")]
pub struct FloorError {
    /// The file.
    pub path: PathBuf,
    /// What went wrong.
    pub detail: String,
}

struct Inner {
    path: PathBuf,
    /// The value on disk.
    durable: u64,
    /// The last write's error, logged once until a write succeeds.
    failing: Option<String>,
}

/// The durable clock floor, shared by the node's replay guards (the admission
/// guard and every module's agent).
#[derive(Clone)]
pub struct ClockFloor(Arc<Mutex<Inner>>);

impl std::fmt::Debug for ClockFloor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = self.0.lock();
        f.debug_struct("ClockFloor")
            .field("path", &i.path)
            .field("durable", &i.durable)
            .finish()
    }
}

impl ClockFloor {
    /// The floor kept in `path` (0 when the file does not exist: a node that
    /// never forgot a nonce).
    pub fn open(path: &Path) -> Result<ClockFloor, FloorError> {
        let err = |detail: String| FloorError {
            path: path.to_path_buf(),
            detail,
        };
        let durable = match std::fs::read_to_string(path) {
            Ok(t) => t
                .trim()
                .parse::<u64>()
                .map_err(|e| err(format!("{e} in {:?}", t.escape_debug().to_string())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(err(e.to_string())),
        };
        let now = crate::now_secs();
        if durable > now {
            tracing::warn!(
                floor = durable,
                ahead_secs = durable - now,
                path = %path.display(),
                "the replay guard forgot nonces of commands fresh until after this clock's time (the clock went back, or it was ahead before): commands are judged no earlier than the floor, and those signed now are refused as stale until the clock passes it"
            );
        }
        Ok(ClockFloor(Arc::new(Mutex::new(Inner {
            path: path.to_path_buf(),
            durable,
            failing: None,
        }))))
    }

    /// The floor in `state_dir` ([`FILE`]).
    pub fn in_dir(state_dir: &Path) -> Result<ClockFloor, FloorError> {
        ClockFloor::open(&state_dir.join(FILE))
    }

    /// The floor on disk: no command is judged earlier; every record of a nonce
    /// expiring before it may be gone.
    pub fn get(&self) -> u64 {
        self.0.lock().durable
    }

    /// A guard would let go of records of nonces expiring before `forgot`: makes
    /// the floor `forgot` on disk first, if it is [`STEP`] or more behind (`eager`:
    /// if it is behind at all). Returns the floor on disk after: the guard lets
    /// go only of records expiring before it. A write that fails is logged (once
    /// until one succeeds) and leaves the floor as it was: the guard keeps its
    /// records, and the journal grows, until the disk takes the file again.
    pub fn cover(&self, forgot: u64, eager: bool) -> u64 {
        let mut i = self.0.lock();
        let behind = forgot.saturating_sub(i.durable);
        if behind == 0 || (!eager && behind < STEP) {
            return i.durable;
        }
        match crate::durable::write_atomic(&i.path, format!("{forgot}\n").as_bytes()) {
            Ok(()) => {
                i.durable = forgot;
                if i.failing.take().is_some() {
                    tracing::info!(path = %i.path.display(), floor = forgot, "the replay guard's clock floor is written again");
                }
            }
            Err(e) => {
                let e = e.to_string();
                if i.failing.as_deref() != Some(e.as_str()) {
                    tracing::error!(path = %i.path.display(), error = %e, "the replay guard's clock floor cannot be written: the records of expired nonces are kept (the journal grows) until it can");
                    i.failing = Some(e);
                }
            }
        }
        i.durable
    }

    /// A guard would let go of records of nonces expiring at `latest` or before,
    /// at `now`: [`Self::cover`] past `latest` — eagerly once `latest` is
    /// [`STEP`] seconds old, so a floor left less than a step behind (a quiet
    /// spell after two commands a few seconds apart) does not hold the records
    /// back for good. Written at most about once per step either way.
    pub fn cover_expired(&self, latest: u64, now: u64) -> u64 {
        self.cover(latest.saturating_add(1), now.saturating_sub(latest) >= STEP)
    }

    /// Lets `records` (journal records each holding nonces until an expiry)
    /// forget those that expired before `now`, once the floor is past them
    /// ([`Self::cover`]).
    pub fn expire(&self, records: &mut Expiring, now: u64) {
        if let Some(e) = records.latest_before(now) {
            self.cover_expired(e, now);
        }
        records.expire(now.min(self.get()));
    }
}

/// A floor in a directory of its own (kept while the directory is).
#[cfg(test)]
pub(crate) fn scratch() -> (testkit::TempDir, ClockFloor) {
    let d = testkit::TempDir::new("clock-floor");
    let f = ClockFloor::in_dir(d.path()).expect("a new directory");
    (d, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_zero_and_a_damaged_one_refuses_the_start() {
        let dir = testkit::TempDir::new("clock-floor");
        let f = ClockFloor::in_dir(dir.path()).unwrap();
        assert_eq!(f.get(), 0);
        std::fs::write(dir.path().join(FILE), "12x\n").unwrap();
        let e = ClockFloor::in_dir(dir.path()).unwrap_err();
        assert!(e.to_string().contains("replay-floor"), "{e}");
        std::fs::write(dir.path().join(FILE), "").unwrap();
        assert!(ClockFloor::in_dir(dir.path()).is_err());
    }

    #[test]
    fn covers_in_steps_moves_only_forward_and_survives_a_reopen() {
        let dir = testkit::TempDir::new("clock-floor");
        let f = ClockFloor::in_dir(dir.path()).unwrap();
        assert_eq!(f.cover(1_000, false), 1_000, "the first cover writes");
        assert_eq!(
            f.cover(1_000 + STEP - 1, false),
            1_000,
            "less than a step behind"
        );
        assert_eq!(f.cover(1_000 + STEP - 1, true), 1_000 + STEP - 1, "eager");
        assert_eq!(f.cover(900, true), 1_000 + STEP - 1, "never back");
        assert_eq!(f.cover(2_000, false), 2_000);
        let again = ClockFloor::in_dir(dir.path()).unwrap();
        assert_eq!(again.get(), 2_000);
    }

    #[test]
    fn a_failed_write_keeps_the_floor_where_it_was() {
        let dir = testkit::TempDir::new("clock-floor");
        let f = ClockFloor::in_dir(dir.path()).unwrap();
        assert_eq!(f.cover(1_000, true), 1_000);
        // The temporary file's name taken by a directory: the write fails (for
        // root too, unlike a read-only directory).
        let tmp = dir.path().join(FILE).with_extension("tmp");
        std::fs::create_dir(&tmp).unwrap();
        assert_eq!(f.cover(5_000, true), 1_000);
        assert_eq!(ClockFloor::in_dir(dir.path()).unwrap().get(), 1_000);
        std::fs::remove_dir(&tmp).unwrap();
        assert_eq!(
            f.cover(5_000, true),
            5_000,
            "written once the disk takes it"
        );
    }
}
