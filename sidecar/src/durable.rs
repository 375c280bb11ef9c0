//! Durable small-file writes: write a temporary file, fsync it, rename it over the
//! target, fsync the directory. A crash leaves either the old or the new content.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

/// Replaces `path` with `bytes` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_parent(path)
}

/// Creates `path` holding `bytes`, readable by its owner only (mode 0600), durably
/// and whole: written to a temporary file, synced, then linked in place, so a
/// crash never leaves `path` empty or half-written. Fails with `AlreadyExists`
/// when `path` exists (a secret is never overwritten).
pub fn write_secret_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut suffix = [0u8; 8];
    rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut suffix)
        .map_err(std::io::Error::other)?;
    // A new file of an unguessable name: never one that exists (or a link).
    let tmp = path.with_extension(format!("tmp.{}", u64::from_le_bytes(suffix)));
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let written = opts.open(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    let linked = written.and_then(|()| fs::hard_link(&tmp, path));
    let _ = fs::remove_file(&tmp);
    linked?;
    sync_parent(path)
}

/// Creates `dir` and its missing parents so that they survive a power cut: each
/// directory created is synced into its parent.
pub fn create_dir(dir: &Path) -> std::io::Result<()> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .collect();
    fs::create_dir_all(dir)?;
    missing.iter().try_for_each(|d| sync_parent(d))?;
    // A directory an earlier run made and was stopped before it synced the entry
    // (killed, or the power cut) is synced now: every run syncs `dir`'s own.
    // A parent this user may enter but not read (0711) cannot be opened to sync:
    // as before, the start goes on.
    if missing.is_empty() {
        match sync_parent(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
            r => r?,
        }
    }
    Ok(())
}

/// Makes `path`'s entry in its directory durable (after creating or renaming it).
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_and_leaves_no_temporary() {
        let d = testkit::TempDir::new("durable");
        let p = d.path().join("state.json");
        super::write_atomic(&p, b"one").unwrap();
        super::write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert!(!p.with_extension("tmp").exists());
        assert!(super::write_atomic(&d.path().join("no/such/dir"), b"x").is_err());
    }

    #[test]
    fn a_secret_is_created_whole_owner_only_and_never_overwritten() {
        let d = testkit::TempDir::new("durable-secret");
        let p = d.path().join("state.sk.hex");
        super::write_secret_new(&p, b"one").unwrap();
        let e = super::write_secret_new(&p, b"two").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left");
    }

    #[test]
    fn creates_missing_directories() {
        let d = testkit::TempDir::new("durable-dir");
        let deep = d.path().join("a/b/c");
        super::create_dir(&deep).unwrap();
        assert!(deep.is_dir());
        super::create_dir(&deep).unwrap();
        std::fs::write(d.path().join("file"), b"x").unwrap();
        assert!(super::create_dir(&d.path().join("file/below")).is_err());
    }
}
