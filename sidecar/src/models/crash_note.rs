//! Names the model library a fatal signal struck inside — a segfault or an abort
//! in its `predict`, on the hot path — in the list of libraries the sidecar died
//! in, so the next start refuses it (`crashed`) instead of serving it until the
//! next opportunity takes the process down again.
//!
//! A thread inside a library's code ([`Inside`]) notes which one, in a
//! thread-local the signal handler reads: the handler runs on the thread the
//! signal struck, so a crash elsewhere (another thread, the sidecar's own code)
//! names no library. The handler only calls `open`, `write`, `fsync`, `close` and
//! `sigaction` (async-signal-safe), then gives the signal back to the handler it
//! replaced (the standard library's stack-overflow report, or the default), so the
//! process still dies as it would have, core dump included.
#![allow(unsafe_code)] // signals: every unsafe block says why it is sound.

use std::cell::Cell;
use std::ffi::CString;
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

/// Where the handler appends, and the actions it replaced (by position in
/// [`FATAL`]).
struct Installed {
    list: CString,
    previous: [libc::sigaction; FATAL.len()],
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Installs the handler once per process: a fatal signal on a thread inside a
/// library appends that library's line to `list`. Later calls change nothing (one
/// state directory per process).
pub fn install(list: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let list = CString::new(list.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut result = Ok(());
    INSTALLED.get_or_init(|| {
        // SAFETY: zeroed sigaction structs are valid (no handler, empty mask) and
        // are only filled by sigaction below.
        let mut previous: [libc::sigaction; FATAL.len()] = unsafe { std::mem::zeroed() };
        for (i, sig) in FATAL.into_iter().enumerate() {
            // SAFETY: as above; `on_fatal` has the SA_SIGINFO signature.
            unsafe {
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_fatal as *const () as libc::sighandler_t;
                act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut act.sa_mask);
                if libc::sigaction(sig, &act, &mut previous[i]) != 0 {
                    result = Err(std::io::Error::last_os_error());
                }
            }
        }
        Installed { list, previous }
    });
    result
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
    let Some(installed) = INSTALLED.get() else {
        return;
    };
    let (line, len) = INSIDE.try_with(Cell::get).unwrap_or((std::ptr::null(), 0));
    // SAFETY: only async-signal-safe calls; `line` points at the model's own
    // bytes, alive while its predict (which this thread is inside) runs.
    unsafe {
        if !line.is_null() {
            let fd = libc::open(
                installed.list.as_ptr(),
                libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_CLOEXEC,
                0o600,
            );
            if fd >= 0 {
                let _ = libc::write(fd, line.cast(), len);
                let _ = libc::fsync(fd);
                let _ = libc::close(fd);
            }
        }
        // The signal goes back to the handler this one replaced.
        if let Some(i) = FATAL.iter().position(|&s| s == sig) {
            libc::sigaction(sig, &installed.previous[i], std::ptr::null_mut());
        }
        // A fault strikes again when this returns (the instruction runs again),
        // and abort() raises its signal again; one sent by a process would not:
        // sent again, it is delivered once this returns.
        if info.is_null() || (*info).si_code <= 0 {
            libc::raise(sig);
        }
    }
}
