//! Names the model library a fatal signal struck inside — a segfault or an abort
//! while it loads, or in its `predict` on the hot path — in the list of libraries
//! the sidecar died in, so later starts refuse it (`crashed`) instead of serving it
//! until the next opportunity takes the process down again.
//!
//! A thread inside a library's code ([`Inside`]) notes which one, in a
//! thread-local the signal handler reads: the handler runs on the thread the
//! signal struck, so a crash elsewhere (another thread, the sidecar's own code
//! outside a load) names no library. The list is opened once, when the handler is
//! installed (a crash when no file descriptor is left is still written down); the
//! handler only calls async-signal-safe functions (`write`, `fsync`, `getpid`,
//! `sigaction`, `signal`, `raise`), then gives the signal back to the handler it
//! replaced (the standard library's stack-overflow report, or the default), so the
//! process still dies as it would have, core dump included.
#![allow(unsafe_code)] // signals: every unsafe block says why it is sound.

use std::cell::Cell;
use std::os::fd::IntoRawFd as _;
use std::sync::OnceLock;

thread_local! {
    /// The line naming the library this thread is inside (its path and a newline),
    /// as a pointer and a length; null when outside every library. Constant-
    /// initialised and without a destructor: reading it is a plain thread-local
    /// load, safe in a signal handler.
    static INSIDE: Cell<(*const u8, usize)> = const { Cell::new((std::ptr::null(), 0)) };
}

/// The signals a library's fault or abort ends the process with.
const FATAL: [libc::c_int; 5] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGABRT,
];

/// The list the handler appends to (open for appending), and the actions it
/// replaced (by position in [`FATAL`]).
struct Installed {
    list: libc::c_int,
    previous: [libc::sigaction; FATAL.len()],
}

/// `si_code` of a `SIGBUS` for a memory error the hardware found (action
/// required, action optional): the machine's doing, not the library's.
const BUS_MCEERR: [libc::c_int; 2] = [4, 5];

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Installs the handler once per process: a fatal signal on a thread inside a
/// library appends that library's line to `list`. Later calls change nothing (one
/// state directory per process).
pub fn install(list: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if INSTALLED.get().is_some() {
        return Ok(());
    }
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(list)?;
    crate::durable::sync_parent(list)?;
    // The actions replaced are read, and kept, before the handler is in place: it
    // always finds them.
    // SAFETY: zeroed sigaction structs are valid (no handler, empty mask);
    // sigaction with no new action only reads the current one.
    let mut previous: [libc::sigaction; FATAL.len()] = unsafe { std::mem::zeroed() };
    for (i, sig) in FATAL.into_iter().enumerate() {
        // SAFETY: as above.
        if unsafe { libc::sigaction(sig, std::ptr::null(), &mut previous[i]) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // Kept open for the process's life: the handler writes to it.
    let list = file.into_raw_fd();
    if INSTALLED.set(Installed { list, previous }).is_err() {
        // SAFETY: `list` was just opened here and is owned by no one else.
        unsafe { libc::close(list) };
        return Ok(());
    }
    for sig in FATAL {
        // SAFETY: a zeroed sigaction is valid; `on_fatal` has the SA_SIGINFO
        // signature.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_fatal as *const () as libc::sighandler_t;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut act.sa_mask);
            if libc::sigaction(sig, &act, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Names the library `line` names (its path and a newline) in the list, as a
/// fatal signal inside it would: a library the process is about to end for
/// (hung in its `predict`, [`super::watchdog`]). An error when no list is
/// installed (its start could not open it).
pub fn note(line: &[u8]) -> std::io::Result<()> {
    let Some(installed) = INSTALLED.get() else {
        return Err(std::io::Error::other(
            "no list of crashed libraries is open",
        ));
    };
    // SAFETY: `list` is open for the process's life; `line` is a valid buffer.
    let written = unsafe { libc::write(installed.list, line.as_ptr().cast(), line.len()) };
    if usize::try_from(written).ok() != Some(line.len()) {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fsync(installed.list) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// While alive, this thread is inside the library `line` names (its path and a
/// newline): a fatal signal on it names that library.
pub struct Inside {
    before: (*const u8, usize),
}

impl Inside {
    /// Enters the library named by `line`, which must outlive the guard.
    pub fn enter(line: &[u8]) -> Inside {
        let before = INSIDE.with(|c| c.replace((line.as_ptr(), line.len())));
        Inside { before }
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        INSIDE.with(|c| c.set(self.before));
    }
}

extern "C" fn on_fatal(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: only async-signal-safe calls (errno is this thread's, put back);
    // `line` points at the library's line, alive while the thread is inside it;
    // `info` is the kernel's.
    unsafe {
        let errno = *libc::__errno_location();
        let (line, len) = INSIDE.try_with(Cell::get).unwrap_or((std::ptr::null(), 0));
        // The library's own doing: a fault (the kernel's, si_code > 0, but for a
        // memory error the hardware found), or abort()/raise() in this process;
        // not a signal another process sent.
        let code = if info.is_null() { 0 } else { (*info).si_code };
        let own = info.is_null()
            || (code > 0 && !(sig == libc::SIGBUS && BUS_MCEERR.contains(&code)))
            || (code == libc::SI_TKILL && (*info).si_pid() == libc::getpid());
        let installed = INSTALLED.get();
        if let (Some(installed), false, true) = (installed, line.is_null(), own) {
            let _ = libc::write(installed.list, line.cast(), len);
            let _ = libc::fsync(installed.list);
        }
        // The signal goes back to the handler this one replaced (the default, if
        // it is not known).
        match (installed, FATAL.iter().position(|&s| s == sig)) {
            (Some(installed), Some(i)) => {
                libc::sigaction(sig, &installed.previous[i], std::ptr::null_mut());
            }
            _ => {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        // A fault strikes again when this returns (the instruction runs again);
        // a signal sent by a process (abort() and raise() included) would not:
        // sent again, it is delivered once this returns.
        if info.is_null() || (*info).si_code <= 0 {
            libc::raise(sig);
        }
        *libc::__errno_location() = errno;
    }
}
