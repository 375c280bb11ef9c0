//! A disk that fails and loses power, for tests: a flat in-memory filesystem
//! served to the kernel over FUSE (the `fuser` crate, mounted without libfuse;
//! needs root or CAP_SYS_ADMIN and `/dev/fuse`). A process using it goes through
//! the kernel's real system calls — `write`, `fdatasync`, `ftruncate`, `rename`,
//! a directory's `fsync` — and gets the kernel's real errors back.
//!
//! - [`FaultFs::fail_syncs`]: from now on `fsync`/`fdatasync` (files and the
//!   directory) answer `EIO`, as a device whose writes stopped reaching the media;
//!   writes still land in "the page cache" (they read back) but are not durable.
//! - [`FaultFs::fail_syncs_after_writeback`]: syncs answer `EIO` as above, yet
//!   every write already reached the media (the kernel's flusher wrote it back
//!   before the device failed): a write over a file's durable bytes is durable at
//!   once; a size change (a truncation, bytes past the durable end) is not.
//! - [`FaultFs::fail_all`]: every change (write, truncate, create, rename, unlink,
//!   sync) answers `EIO`.
//! - [`FaultFs::fail_dir_syncs`]: the directory's `fsync` answers `EIO`, files'
//!   syncs succeed (a creation, removal or rename is not made durable).
//! - [`FaultFs::tear_next_write`]: the next write lands its first half only and
//!   answers `EIO`, as a write cut short.
//! - [`FaultFs::power_cut`]: every file goes back to what its last successful sync
//!   made durable, and the directory to its last synced listing (a file never
//!   synced into it is gone; one removed since is back), as after a power loss.
//!   Stop the process using it first (`kill -9`).
//!
//! Only what the sidecar's journal and ledger directory use is served: one flat directory of regular
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
    Writeback,
    FailAll,
    TearNextWrite,
    FailDirSyncs,
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
    changes_failed: u64,
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
            changes_failed: 0,
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

    /// Syncs fail with `EIO` from now on, yet a write over a file's durable bytes
    /// is durable at once (written back before the failure); size changes are not.
    pub fn fail_syncs_after_writeback(&self) {
        self.set(Mode::Writeback);
    }

    /// The directory's syncs fail with `EIO` from now on (files' syncs succeed):
    /// a creation, removal or rename is then not durable.
    pub fn fail_dir_syncs(&self) {
        self.set(Mode::FailDirSyncs);
    }

    /// Every change fails with `EIO` from now on.
    pub fn fail_all(&self) {
        self.set(Mode::FailAll);
    }

    /// The next write lands only its first half and answers `EIO` (a write cut
    /// short, as by a full device or a crash); the device works again after it.
    pub fn tear_next_write(&self) {
        self.set(Mode::TearNextWrite);
    }

    /// The device works again.
    pub fn heal(&self) {
        self.set(Mode::Healthy);
    }

    /// Syncs answered `EIO` so far.
    pub fn syncs_failed(&self) -> u64 {
        self.state.lock().map_or(0, |s| s.syncs_failed)
    }

    /// Changes (writes, truncations, creations, renames, removals) answered `EIO`
    /// so far.
    pub fn changes_failed(&self) -> u64 {
        self.state.lock().map_or(0, |s| s.changes_failed)
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

/// An errno.
type Errno = i32;

impl State {
    fn attr_of(&self, ino: u64) -> Result<FileAttr, Errno> {
        if ino == ROOT {
            return Ok(attr(ROOT, 0));
        }
        self.files
            .get(&ino)
            .map(|f| attr(ino, f.data.len() as u64))
            .ok_or(ENOENT)
    }

    /// `EIO` (counted) while every change fails.
    fn change(&mut self) -> Result<(), Errno> {
        if self.mode == Mode::FailAll {
            self.changes_failed += 1;
            Err(EIO)
        } else {
            Ok(())
        }
    }

    /// `EIO` (counted) while syncs fail.
    fn sync(&mut self) -> Result<(), Errno> {
        if matches!(self.mode, Mode::Healthy | Mode::FailDirSyncs) {
            Ok(())
        } else {
            self.syncs_failed += 1;
            Err(EIO)
        }
    }

    fn file(&mut self, ino: u64) -> Result<&mut File, Errno> {
        self.files.get_mut(&ino).ok_or(ENOENT)
    }

    /// Forgets file `ino` unless the durable listing still names it (a power cut
    /// before the directory's next sync brings it back).
    fn release_ino(&mut self, ino: u64) {
        if !self.durable_names.values().any(|&i| i == ino) {
            self.files.remove(&ino);
        }
    }

    fn lookup(&self, parent: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        let ino = self.names.get(&entry(parent, name)?).ok_or(ENOENT)?;
        self.attr_of(*ino)
    }

    fn truncate(&mut self, ino: u64, size: Option<u64>) -> Result<FileAttr, Errno> {
        if let Some(len) = size {
            self.change()?;
            let len = usize::try_from(len).map_err(|_| EIO)?;
            self.file(ino)?.data.resize(len, 0);
        }
        self.attr_of(ino)
    }

    fn create(&mut self, parent: u64, name: &OsStr, flags: i32) -> Result<FileAttr, Errno> {
        let name = entry(parent, name)?;
        self.change()?;
        let ino = match self.names.get(&name) {
            Some(_) if flags & O_EXCL != 0 => return Err(EEXIST),
            Some(&ino) => ino,
            None => {
                let ino = self.next_ino;
                self.next_ino += 1;
                self.names.insert(name, ino);
                self.files.insert(ino, File::default());
                ino
            }
        };
        if flags & O_TRUNC != 0 {
            self.file(ino)?.data.clear();
        }
        self.attr_of(ino)
    }

    fn read(&mut self, ino: u64, offset: i64, size: u32) -> Result<Vec<u8>, Errno> {
        let data = &self.file(ino)?.data;
        let from = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(data.len());
        let to = from.saturating_add(size as usize).min(data.len());
        Ok(data[from..to].to_vec())
    }

    fn write(&mut self, ino: u64, offset: i64, bytes: &[u8]) -> Result<u32, Errno> {
        self.change()?;
        let torn = self.mode == Mode::TearNextWrite;
        let bytes = if torn {
            self.mode = Mode::Healthy;
            self.changes_failed += 1;
            &bytes[..bytes.len() / 2]
        } else {
            bytes
        };
        let at = usize::try_from(offset).map_err(|_| EIO)?;
        let writeback = self.mode == Mode::Writeback;
        let f = self.file(ino)?;
        let end = at + bytes.len();
        if f.data.len() < end {
            f.data.resize(end, 0);
        }
        f.data[at..end].copy_from_slice(bytes);
        if writeback && at < f.durable.len() {
            let to = end.min(f.durable.len());
            f.durable[at..to].copy_from_slice(&bytes[..to - at]);
        }
        if torn {
            return Err(EIO);
        }
        u32::try_from(bytes.len()).map_err(|_| EIO)
    }

    fn fsync(&mut self, ino: u64) -> Result<(), Errno> {
        self.sync()?;
        let f = self.file(ino)?;
        f.durable = f.data.clone();
        Ok(())
    }

    fn fsyncdir(&mut self) -> Result<(), Errno> {
        if self.mode == Mode::FailDirSyncs {
            self.syncs_failed += 1;
            return Err(EIO);
        }
        self.sync()?;
        self.durable_names = self.names.clone();
        Ok(())
    }

    fn unlink(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let name = entry(parent, name)?;
        self.change()?;
        let ino = self.names.remove(&name).ok_or(ENOENT)?;
        self.release_ino(ino);
        Ok(())
    }

    fn rename(
        &mut self,
        (parent, name): (u64, &OsStr),
        (newparent, newname): (u64, &OsStr),
    ) -> Result<(), Errno> {
        let (from, to) = (entry(parent, name)?, entry(newparent, newname)?);
        self.change()?;
        let ino = self.names.remove(&from).ok_or(ENOENT)?;
        if let Some(old) = self.names.insert(to, ino) {
            self.release_ino(old);
        }
        Ok(())
    }

    fn listing(&self, ino: u64) -> Result<Vec<(u64, FileType, String)>, Errno> {
        if ino != ROOT {
            return Err(ENOENT);
        }
        let mut entries = vec![
            (ROOT, FileType::Directory, ".".to_owned()),
            (ROOT, FileType::Directory, "..".to_owned()),
        ];
        entries.extend(
            self.names
                .iter()
                .map(|(n, &i)| (i, FileType::RegularFile, n.clone())),
        );
        Ok(entries)
    }
}

/// A name in the one directory (`EPERM` elsewhere, or for a name that is not UTF-8).
fn entry(parent: u64, name: &OsStr) -> Result<String, Errno> {
    match name.to_str() {
        Some(n) if parent == ROOT => Ok(n.to_owned()),
        _ => Err(EPERM),
    }
}

impl Served {
    fn run<T>(&self, f: impl FnOnce(&mut State) -> Result<T, Errno>) -> Result<T, Errno> {
        let mut s = self.0.lock().map_err(|_| EIO)?;
        f(&mut s)
    }
}

fn empty(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn attr_reply(reply: ReplyAttr, r: Result<FileAttr, Errno>) {
    match r {
        Ok(a) => reply.attr(&TTL, &a),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for Served {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        match self.run(|s| s.lookup(parent, name)) {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        attr_reply(reply, self.run(|s| s.attr_of(ino)));
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
        attr_reply(reply, self.run(|s| s.truncate(ino, size)));
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
        match self.run(|s| s.create(parent, name, flags)) {
            Ok(a) => reply.created(&TTL, &a, 0, 0, 0),
            Err(e) => reply.error(e),
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
        match self.run(|s| s.read(ino, offset, size)) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
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
        match self.run(|s| s.write(ino, offset, data)) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
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
        empty(reply, self.run(|s| s.fsync(ino)));
    }

    fn fsyncdir(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.run(State::fsyncdir));
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.run(|s| s.unlink(parent, name)));
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
        empty(
            reply,
            self.run(|s| s.rename((parent, name), (newparent, newname))),
        );
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.run(|s| s.listing(ino)) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        let skip = usize::try_from(offset).unwrap_or(0);
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(skip) {
            if reply.add(ino, i as i64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}
