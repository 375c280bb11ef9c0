//! A disk that fails and loses power, for tests: a flat in-memory filesystem
//! served to the kernel over FUSE (the `fuser` crate, mounted without libfuse;
//! needs root or CAP_SYS_ADMIN and `/dev/fuse`). A process using it goes through
//! the kernel's real system calls — `write`, `fdatasync`, `ftruncate`, `rename`,
//! a directory's `fsync` — and gets the kernel's real errors back.
//!
//! - [`FaultFs::fail_syncs`]: from now on `fsync`/`fdatasync` (files and the
//!   directory) answer `EIO`, as a device whose writes stopped reaching the media;
//!   writes still land in "the page cache" (they read back) but are not durable.
//! - [`FaultFs::fail_all`]: every change (write, truncate, create, rename, unlink,
//!   sync) answers `EIO`.
//! - [`FaultFs::power_cut`]: every file goes back to what its last successful sync
//!   made durable, and the directory to its last synced listing (a file never
//!   synced into it is gone; one removed since is back), as after a power loss.
//!   Stop the process using it first (`kill -9`).
//!
//! Only what the sidecar's journal uses is served: one flat directory of regular
//! files. Everything else answers `ENOSYS`/`EPERM`.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyWrite, Request, TimeOrNow,
};
use libc::{EEXIST, EIO, ENOENT, EPERM, O_EXCL, O_TRUNC};

const ROOT: u64 = 1;
/// Attributes are not cached by the kernel: sizes change under truncation.
const TTL: Duration = Duration::ZERO;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Healthy,
    FailSyncs,
    FailAll,
}

#[derive(Default)]
struct File {
    data: Vec<u8>,
    durable: Vec<u8>,
}

struct State {
    mode: Mode,
    next_ino: u64,
    names: BTreeMap<String, u64>,
    files: HashMap<u64, File>,
    /// The listing as of the directory's last successful sync.
    durable_names: BTreeMap<String, u64>,
    syncs_failed: u64,
}

/// A mounted [`FaultFs`]: unmounted when dropped.
pub struct FaultFs {
    state: Arc<Mutex<State>>,
    at: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl FaultFs {
    /// Mounts an empty filesystem at `at` (created if missing).
    pub fn mount(at: &Path) -> std::io::Result<FaultFs> {
        std::fs::create_dir_all(at)?;
        let state = Arc::new(Mutex::new(State {
            mode: Mode::Healthy,
            next_ino: ROOT + 1,
            names: BTreeMap::new(),
            files: HashMap::new(),
            durable_names: BTreeMap::new(),
            syncs_failed: 0,
        }));
        let session = fuser::spawn_mount2(
            Served(state.clone()),
            at,
            &[
                MountOption::FSName("gw-faultfs".into()),
                MountOption::RW,
                MountOption::DefaultPermissions,
            ],
        )?;
        Ok(FaultFs {
            state,
            at: at.to_path_buf(),
            session: Some(session),
        })
    }

    fn set(&self, mode: Mode) {
        if let Ok(mut s) = self.state.lock() {
            s.mode = mode;
        }
    }

    /// Syncs fail with `EIO` from now on (writes still succeed, not durably).
    pub fn fail_syncs(&self) {
        self.set(Mode::FailSyncs);
    }

    /// Every change fails with `EIO` from now on.
    pub fn fail_all(&self) {
        self.set(Mode::FailAll);
    }

    /// The device works again.
    pub fn heal(&self) {
        self.set(Mode::Healthy);
    }

    /// Syncs answered `EIO` so far.
    pub fn syncs_failed(&self) -> u64 {
        self.state.lock().map_or(0, |s| s.syncs_failed)
    }

    /// Back to what was durable: see the module's documentation.
    pub fn power_cut(&self) {
        let Ok(mut s) = self.state.lock() else { return };
        let s = &mut *s;
        s.names = s.durable_names.clone();
        let live: std::collections::HashSet<u64> = s.names.values().copied().collect();
        s.files.retain(|ino, _| live.contains(ino));
        for f in s.files.values_mut() {
            f.data = f.durable.clone();
        }
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        // Lazily, in case a process still has a file open.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.at)
            .status();
        drop(self.session.take());
    }
}

struct Served(Arc<Mutex<State>>);

fn attr(ino: u64, size: u64) -> FileAttr {
    let now = SystemTime::now();
    FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind: if ino == ROOT {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: if ino == ROOT { 0o755 } else { 0o644 },
        nlink: if ino == ROOT { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl State {
    fn attr_of(&self, ino: u64) -> Option<FileAttr> {
        if ino == ROOT {
            return Some(attr(ROOT, 0));
        }
        self.files.get(&ino).map(|f| attr(ino, f.data.len() as u64))
    }

    fn refuse_change(&self) -> bool {
        self.mode == Mode::FailAll
    }

    fn sync_fails(&mut self) -> bool {
        if self.mode == Mode::Healthy {
            false
        } else {
            self.syncs_failed += 1;
            true
        }
    }
}

fn name_of(name: &OsStr) -> Option<String> {
    name.to_str().map(str::to_owned)
}

impl Filesystem for Served {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let Ok(s) = self.0.lock() else {
            return reply.error(EIO);
        };
        let found = (parent == ROOT)
            .then(|| name_of(name))
            .flatten()
            .and_then(|n| s.names.get(&n).copied())
            .and_then(|ino| s.attr_of(ino));
        match found {
            Some(a) => reply.entry(&TTL, &a, 0),
            None => reply.error(ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        let Ok(s) = self.0.lock() else {
            return reply.error(EIO);
        };
        match s.attr_of(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(ENOENT),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let Ok(mut s) = self.0.lock() else {
            return reply.error(EIO);
        };
        if let Some(len) = size {
            if s.refuse_change() {
                return reply.error(EIO);
            }
            let Some(f) = s.files.get_mut(&ino) else {
                return reply.error(ENOENT);
            };
            let Ok(len) = usize::try_from(len) else {
                return reply.error(EIO);
            };
            f.data.resize(len, 0);
        }
        match s.attr_of(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(ENOENT),
        }
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let Ok(mut s) = self.0.lock() else {
            return reply.error(EIO);
        };
        let Some(name) = (parent == ROOT).then(|| name_of(name)).flatten() else {
            return reply.error(EPERM);
        };
        if s.refuse_change() {
            return reply.error(EIO);
        }
        let ino = match s.names.get(&name) {
            Some(_) if flags & O_EXCL != 0 => return reply.error(EEXIST),
            Some(&ino) => ino,
            None => {
                let ino = s.next_ino;
                s.next_ino += 1;
                s.names.insert(name, ino);
                s.files.insert(ino, File::default());
                ino
            }
        };
        if flags & O_TRUNC != 0 {
            if let Some(f) = s.files.get_mut(&ino) {
                f.data.clear();
            }
        }
        match s.attr_of(ino) {
            Some(a) => reply.created(&TTL, &a, 0, 0, 0),
            None => reply.error(ENOENT),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Ok(s) = self.0.lock() else {
            return reply.error(EIO);
        };
        let Some(f) = s.files.get(&ino) else {
            return reply.error(ENOENT);
        };
        let from = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(f.data.len());
        let to = from.saturating_add(size as usize).min(f.data.len());
        reply.data(&f.data[from..to]);
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let Ok(mut s) = self.0.lock() else {
            return reply.error(EIO);
        };
        if s.refuse_change() {
            return reply.error(EIO);
        }
        let Some(f) = s.files.get_mut(&ino) else {
            return reply.error(ENOENT);
        };
        let Ok(at) = usize::try_from(offset) else {
            return reply.error(EIO);
        };
        let end = at + data.len();
        if f.data.len() < end {
            f.data.resize(end, 0);
        }
        f.data[at..end].copy_from_slice(data);
        reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX));
    }

    fn flush(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _lock_owner: u64,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Ok(mut s) = self.0.lock() else {
            return reply.error(EIO);
        };
        if s.sync_fails() {
            return reply.error(EIO);
        }
        match s.files.get_mut(&ino) {
            Some(f) => {
                f.durable = f.data.clone();
                reply.ok();
            }
            None => reply.error(ENOENT),
        }
    }

    fn fsyncdir(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Ok(mut s) = self.0.lock() else {
            return reply.error(EIO);
        };
        if s.sync_fails() {
            return reply.error(EIO);
        }
        s.durable_names = s.names.clone();
        reply.ok();
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let Ok(mut s) = self.0.lock() else {
            return reply.error(EIO);
        };
        if s.refuse_change() {
            return reply.error(EIO);
        }
        let Some(name) = (parent == ROOT).then(|| name_of(name)).flatten() else {
            return reply.error(ENOENT);
        };
        match s.names.remove(&name) {
            Some(ino) => {
                // Kept while the durable listing still names it (a power cut
                // before the directory's next sync brings it back).
                if !s.durable_names.values().any(|&i| i == ino) {
                    s.files.remove(&ino);
                }
                reply.ok();
            }
            None => reply.error(ENOENT),
        }
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        _flags: u32,
        reply: ReplyEmpty,
    ) {
        let Ok(mut s) = self.0.lock() else {
            return reply.error(EIO);
        };
        if s.refuse_change() {
            return reply.error(EIO);
        }
        let (Some(from), Some(to)) = (
            (parent == ROOT).then(|| name_of(name)).flatten(),
            (newparent == ROOT).then(|| name_of(newname)).flatten(),
        ) else {
            return reply.error(EPERM);
        };
        let Some(ino) = s.names.remove(&from) else {
            return reply.error(ENOENT);
        };
        if let Some(old) = s.names.insert(to, ino) {
            if !s.durable_names.values().any(|&i| i == old) {
                s.files.remove(&old);
            }
        }
        reply.ok();
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return reply.error(ENOENT);
        }
        let Ok(s) = self.0.lock() else {
            return reply.error(EIO);
        };
        let mut entries = vec![
            (ROOT, FileType::Directory, ".".to_owned()),
            (ROOT, FileType::Directory, "..".to_owned()),
        ];
        entries.extend(
            s.names
                .iter()
                .map(|(n, &i)| (i, FileType::RegularFile, n.clone())),
        );
        let skip = usize::try_from(offset).unwrap_or(0);
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(skip) {
            if reply.add(ino, i as i64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}
