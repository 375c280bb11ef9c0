//! One model library behind the versioned C ABI (`abi/model_abi_v2.h`, and v1
//! from `abi/model_abi_v1.h`): [`Model::load`] opens it with `libloading`, checks
//! the table and the feature count, calls `init`, and scores the library's golden
//! vectors — rows and the training library's own outputs, embedded by the build —
//! before the model may serve. The library is unloaded only when the last
//! `Arc<Model>` is dropped, i.e. never while a prediction is still running in it.

#![allow(unsafe_code)] // FFI: every unsafe block says why it is sound.

use std::ffi::{c_char, CStr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

/// `MODEL_ABI_V1`.
pub const ABI_V1: u32 = 1;
/// `MODEL_ABI_V2`.
pub const ABI_V2: u32 = 2;
/// The v2 export symbol.
pub const EXPORT_SYMBOL_V2: &[u8] = b"model_abi_v2_export\0";
/// The v1 export symbol.
pub const EXPORT_SYMBOL_V1: &[u8] = b"model_abi_v1_export\0";
/// Rows per prediction call at most.
pub const MAX_ROWS: usize = 65_536;

/// Most rows of one call into a library when a batch is scored
/// ([`Model::predict`]): each call is timed by the watchdog on its own.
pub const CHUNK_ROWS: usize = 1024;
/// Golden rows a library may carry at most.
pub const MAX_GOLDEN: u32 = 4096;
/// Golden tolerance: `|served − reference| ≤ GOLDEN_RTOL · max(|reference|,
/// GOLDEN_FLOOR, scale)`, where `scale` is the golden row's `golden_scales` entry:
/// |base score| + Σ|leaf value| over the leaves it reaches. A float32 model's
/// rounding error grows with the numbers it adds up, not with their sum (an
/// XGBoost regressor with base score 118.7 reaching 1.008: XGBoost's float32 order
/// and tl2cgen's differ by 3e-5). Applied to float32 models only; for them a
/// postprocessed output (sigmoid, softmax: slope at most 1) gets the same allowance
/// as its margin.
pub const GOLDEN_RTOL: f64 = 1e-5;
/// See [`GOLDEN_RTOL`]: values below this magnitude are compared at 1e-6 absolute.
pub const GOLDEN_FLOOR: f64 = 0.1;
/// `MODEL_PREDICT_MARGIN`.
const PREDICT_MARGIN: u32 = 1;
const MAX_FEATURES: u32 = 4096;
const MAX_OUTPUTS: u32 = 256;

/// `struct model_abi_v1` (abi/model_abi_v1.h).
#[repr(C)]
struct AbiV1 {
    abi_version: u32,
    struct_size: u32,
    name: *const c_char,
    version: *const c_char,
    n_features: u32,
    n_outputs: u32,
    init: Option<unsafe extern "C" fn() -> i32>,
    predict: Option<unsafe extern "C" fn(*const f32, usize, *mut f32) -> i32>,
    release: Option<unsafe extern "C" fn()>,
}

/// `struct model_abi_v2` (abi/model_abi_v2.h).
#[repr(C)]
struct AbiV2 {
    abi_version: u32,
    struct_size: u32,
    name: *const c_char,
    version: *const c_char,
    n_features: u32,
    n_outputs: u32,
    n_targets: u32,
    max_n_class: u32,
    leaf_type: *const c_char,
    postprocessor: *const c_char,
    trainer: *const c_char,
    init: Option<unsafe extern "C" fn() -> i32>,
    predict: Option<PredictV2>,
    release: Option<unsafe extern "C" fn()>,
    n_golden: u32,
    golden_rows: *const f32,
    golden_outputs: *const f64,
    golden_margins: *const f64,
    golden_scales: *const f64,
}

type PredictV1 = unsafe extern "C" fn(*const f32, usize, *mut f32) -> i32;
type PredictV2 = unsafe extern "C" fn(*const f32, usize, u32, *mut f32) -> i32;

#[derive(Clone, Copy)]
enum PredictFn {
    V1(PredictV1),
    V2(PredictV2),
}

/// Why a library was refused. [`LoadError::reason`] is the stable label of
/// `gw_sidecar_model_rejected_total{reason}`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LoadError {
    /// Not a loadable shared library (missing, corrupt, wrong architecture).
    #[error("cannot open {0}: {1}")]
    Open(String, String),
    /// Not loaded, its code never run: outside the models directory, not a
    /// regular file, owned by neither root nor the sidecar's user, or writable by
    /// group or others ([`trusted`]).
    #[error("{0} is not trusted: {1}")]
    Untrusted(String, String),
    /// Not loaded, its code never run: `models.allowed_sha256` is set and does
    /// not list the file's SHA-256.
    #[error("{0}: sha256 {1} is not in models.allowed_sha256")]
    NotAllowed(String, String),
    /// Neither `model_abi_v2_export` nor `model_abi_v1_export`.
    #[error("{0} exports neither model_abi_v2_export nor model_abi_v1_export: {1}")]
    Symbol(String, String),
    /// Unknown ABI version or a malformed table.
    #[error("{0}: {1}")]
    Abi(String, String),
    /// Feature count differs from what the module's configuration says.
    #[error("{path}: the model takes {got} features, the module is configured for {want}")]
    Features {
        /// Library.
        path: String,
        /// What the library says.
        got: u32,
        /// What the module's configuration says.
        want: u32,
    },
    /// `init` failed.
    #[error("{0}: init returned {1}")]
    Init(String, i32),
    /// Scoring the check rows failed or gave non-finite outputs.
    #[error("{0}: self-test failed: {1}")]
    SelfTest(String, String),
    /// The library carries no golden vectors (a v1 library, or none embedded) and
    /// unverified models are not allowed.
    #[error(
        "{0}: no golden vectors (build it with abi/build_model.py, or set models.allow_unverified)"
    )]
    GoldenMissing(String),
    /// The library's answers differ from the training library's own.
    #[error("{0}: golden vectors differ: {1}")]
    GoldenMismatch(String, String),
    /// Opening and checking it (`init`, the self-test, the golden rows) did not end
    /// within `models.load_timeout_ms`: it is never served (its thread is left
    /// behind, stuck in the library).
    #[error("{0}: not loaded and checked within {1} ms (init or predict hangs)")]
    Timeout(String, u64),
    /// The sidecar died inside this library, loading it or in its `predict` (the
    /// list of libraries it died in names it): it is not opened again.
    #[error(
        "{0}: the sidecar died inside it (loading it or in its predict); not opened again: install a fixed build under another name"
    )]
    Crashed(String),
    /// The loader of an earlier library timed out and is still inside it: no
    /// other library is opened until it returns (or the sidecar restarts).
    #[error(
        "{0}: not opened: the loader of {1} timed out and is still inside it (tried again at each look; restart the sidecar if it never returns)"
    )]
    LoaderStuck(String, String),
    /// The C library loader still holds a library loaded before from this path,
    /// and would hand it back instead of loading the file: a model swapped out a
    /// moment ago whose `release` still runs (its `init` would run again before
    /// its teardown ends), or an older file at this path (replaced since) that a
    /// model still uses (its code would serve under the new file's SHA-256).
    /// Tried again at each look, until it is let go.
    #[error("{0}: not opened yet: {1}; tried again at the next look")]
    StillMapped(String, String),
}

impl LoadError {
    /// Every reason label, in the order of the checks.
    pub const REASONS: [&'static str; 14] = [
        "open",
        "untrusted",
        "not_allowed",
        "symbol",
        "abi",
        "features",
        "init",
        "self_test",
        "golden_missing",
        "golden_mismatch",
        "timeout",
        "crashed",
        "loader_stuck",
        "still_mapped",
    ];

    /// The stable reason label (one of [`LoadError::REASONS`]).
    pub fn reason(&self) -> &'static str {
        match self {
            LoadError::Open(..) => "open",
            LoadError::Untrusted(..) => "untrusted",
            LoadError::NotAllowed(..) => "not_allowed",
            LoadError::Symbol(..) => "symbol",
            LoadError::Abi(..) => "abi",
            LoadError::Features { .. } => "features",
            LoadError::Init(..) => "init",
            LoadError::SelfTest(..) => "self_test",
            LoadError::GoldenMissing(..) => "golden_missing",
            LoadError::GoldenMismatch(..) => "golden_mismatch",
            LoadError::Timeout(..) => "timeout",
            LoadError::Crashed(..) => "crashed",
            LoadError::LoaderStuck(..) => "loader_stuck",
            LoadError::StillMapped(..) => "still_mapped",
        }
    }

    /// Whether the same library is tried again at the next look (what kept it
    /// out passes), rather than refused until its link changes.
    pub fn retried(&self) -> bool {
        matches!(
            self,
            LoadError::LoaderStuck(..) | LoadError::StillMapped(..)
        )
    }
}

/// Why a prediction failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PredictError {
    /// Rows do not match the model's shape or are too many.
    #[error("{0}")]
    Shape(String),
    /// The library returned an error status.
    #[error("the model returned status {0}")]
    Status(i32),
    /// Margins were asked of a v1 library, which only answers postprocessed outputs.
    #[error("this model (ABI v1) has no margin output")]
    NoMargin,
    /// No model is loaded for this module.
    #[error("no model is serving")]
    NoModel,
}

/// What the host checks before a library may serve.
#[derive(Debug, Clone, Default)]
pub struct LoadPolicy {
    /// Serve libraries without golden vectors (v1 libraries) after the finite-output
    /// self-test only.
    pub allow_unverified: bool,
    /// When set, only a file whose SHA-256 (lowercase hex) is listed is opened;
    /// any other is refused before its code runs (`not_allowed`).
    pub allowed_sha256: Option<Arc<std::collections::BTreeSet<String>>>,
}

/// The golden check a model passed.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GoldenCheck {
    /// Rows scored.
    pub rows: u32,
    /// Whether margins were checked too.
    pub margins: bool,
    /// Largest `|served − reference| / max(|reference|, GOLDEN_FLOOR, scale)`.
    pub worst: f64,
}

/// A loaded, checked model. Cheap to share (`Arc`); unloaded on the last drop.
/// Serializes as what `GET /api/models` shows of it.
#[derive(Serialize)]
pub struct Model {
    /// Model name from the library.
    pub name: String,
    /// Version from the library (the build's git SHA).
    pub version: String,
    /// ABI version of the library (1 or 2).
    pub abi: u32,
    /// Features per row.
    pub n_features: u32,
    /// Outputs per row (`n_targets × max_n_class`).
    pub n_outputs: u32,
    /// Targets (v2; 1 for v1).
    pub n_targets: u32,
    /// Classes of the widest target (v2; `n_outputs` for v1).
    pub max_n_class: u32,
    /// `float32` or `float64` (v2; `unknown` for v1).
    pub leaf_type: String,
    /// The postprocessing applied unless margins are asked for (v2).
    pub postprocessor: String,
    /// Training library, version and objective (v2).
    pub trainer: String,
    /// The golden check passed, if the library carried golden vectors.
    pub golden: Option<GoldenCheck>,
    /// The library file (the link target, not the link).
    #[serde(serialize_with = "lossy_path")]
    pub path: PathBuf,
    /// SHA-256 of the library file as loaded (hex): which build this is, whatever
    /// name and version it gives itself.
    pub sha256: String,
    /// `name@version#` and the SHA-256's first 12 hex digits: what a send's audit
    /// row names as its scorer (`tx_sends.scored_by`).
    #[serde(skip)]
    pub label: Arc<str>,
    /// The file read for the SHA-256: device and inode.
    #[serde(skip)]
    pub file: (u64, u64),
    /// `path` and a newline: what a crash inside the library writes to the list
    /// of libraries the sidecar died in (`crash_note`).
    #[serde(skip)]
    crash_line: Box<[u8]>,
    #[serde(skip)]
    predict: PredictFn,
    #[serde(skip)]
    release: Option<unsafe extern "C" fn()>,
    // Closed in `Drop`, after `release` ran.
    #[serde(skip)]
    lib: std::mem::ManuallyDrop<libloading::Library>,
    /// The sealed copy the library was loaded from; let go after the library is
    /// closed (declared after `lib`).
    #[serde(skip)]
    _image: Image,
    // Declared after `lib`: the file leaves `OPEN` once the library is closed.
    #[serde(skip)]
    _open: Open,
    /// The file it was read from, held open while the model lives: its inode
    /// number (`file`, which the host finds live models by) cannot be given to
    /// another file meanwhile — on ext4 or XFS a file created after this one
    /// was removed often gets it at once, and a load of that file was answered
    /// with this model.
    #[serde(skip)]
    _origin: std::fs::File,
}

/// A library's bytes, as hashed, in a sealed memory file (`memfd`: no write,
/// grow or shrink is possible any more, by anyone) that the loader maps the
/// library from. Loaded from its own path, the code that ran was whatever the
/// file held when the loader read it — a file renamed over it after the hash
/// was taken, or one written over in place (`cp` over a library keeps its inode)
/// while it serves, whose pages the mapping then follows: code that no check
/// had seen, under the checked SHA-256, without a swap or a row.
struct Image {
    /// `None` once let go.
    file: Option<std::fs::File>,
    /// `/proc/self/fd/<n>`: the name the loader knows it by.
    path: PathBuf,
}

/// Flags of `memfd_create`: close on exec, sealable, and (Linux 6.3 and later)
/// executable — without it a host with `vm.memfd_noexec = 1` makes the file
/// unmappable as code.
const MFD_EXEC: libc::c_uint = 0x10;

impl Image {
    /// Copies `from` into a new sealed memory file named after `real`, hashing
    /// the bytes as they are copied: the image and their SHA-256 (hex).
    fn copy(from: &mut std::fs::File, real: &Path) -> std::io::Result<(Image, String)> {
        use sha2::Digest as _;
        use std::io::Write as _;
        use std::os::fd::FromRawFd as _;
        let name = real.file_name().map_or_else(Vec::new, |n| {
            n.as_encoded_bytes()
                .iter()
                .copied()
                .filter(|b| *b != 0)
                .take(200)
                .collect()
        });
        let name = std::ffi::CString::new([b"gw-model:".as_slice(), &name].concat())
            .map_err(std::io::Error::other)?;
        let base = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        // SAFETY: `name` is a NUL-terminated string that outlives the call.
        let mut fd = unsafe { libc::memfd_create(name.as_ptr(), base | MFD_EXEC) };
        if fd < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
            // A kernel before 6.3 knows no MFD_EXEC (its memory files are
            // executable).
            // SAFETY: as above.
            fd = unsafe { libc::memfd_create(name.as_ptr(), base) };
        }
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor just created, owned by nothing else.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        struct Tee<'a>(&'a std::fs::File, sha2::Sha256);
        impl std::io::Write for Tee<'_> {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let n = self.0.write(buf)?;
                self.1.update(&buf[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut tee = Tee(&file, sha2::Sha256::new());
        std::io::copy(from, &mut tee)?;
        tee.flush()?;
        let sha256 = hex::encode(tee.1.finalize());
        let seals =
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a descriptor this owns; no mapping of it exists yet.
        if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let path = PathBuf::from(format!("/proc/self/fd/{fd}"));
        let file = Some(file);
        Ok((Image { file, path }, sha256))
    }

    /// Whether the loader holds a library under this image's name.
    fn held(&self) -> bool {
        // SAFETY: with RTLD_NOLOAD the loader opens nothing and runs no code: it
        // hands back a library it holds (one reference more, given back at once
        // as the handle drops), or nothing.
        unsafe {
            libloading::os::unix::Library::open(
                Some(&self.path),
                libc::RTLD_NOW | libc::RTLD_NOLOAD,
            )
        }
        .is_ok()
    }
}

impl Drop for Image {
    /// The loader knows a library by its descriptor's number: one it did not
    /// unload when closed (marked `NODELETE`, say) would be handed back to a
    /// later load whose image got the number again. The descriptor of such a
    /// library is kept for the process's life; any other is let go. (On every
    /// path: a model dropped, or a load refused after the library was opened.)
    fn drop(&mut self) {
        if self.held() {
            std::mem::forget(self.file.take());
        }
    }
}

/// The files (device, inode) the C library's loader holds for a model: from
/// before the library is opened until it is closed, so a model being dropped
/// (its `release` running, or the loader closing it) is here. glibc would hand
/// such a library back to another load of the file, `init` and all.
static OPEN: parking_lot::Mutex<Vec<(u64, u64)>> = parking_lot::Mutex::new(Vec::new());

/// A file in [`OPEN`] while this lives.
struct Open((u64, u64));

impl Open {
    /// `file`, now in [`OPEN`]; why not when it is there already (a model of it
    /// is alive, or being dropped).
    fn claim(file: (u64, u64)) -> Result<Open, String> {
        let mut open = OPEN.lock();
        if open.contains(&file) {
            return Err(held_file());
        }
        open.push(file);
        Ok(Open(file))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let mut open = OPEN.lock();
        if let Some(i) = open.iter().position(|f| *f == self.0) {
            open.swap_remove(i);
        }
    }
}

/// `path`'s bytes and a newline: a line of the crash marker and of the list of
/// libraries the sidecar died inside.
pub(super) fn path_line(path: &Path) -> Vec<u8> {
    let mut line = path.as_os_str().as_encoded_bytes().to_vec();
    line.push(b'\n');
    line
}

fn held_file() -> String {
    "a model loaded from this file before is still open (being released, or loaded by another caller)".into()
}

fn lossy_path<S: serde::Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&p.to_string_lossy())
}

// SAFETY: the ABI requires `predict` to be callable from many threads at once; the
// table's strings and golden vectors were copied; the library handle is only
// dropped with the model.
unsafe impl Send for Model {}
// SAFETY: as for `Send`: `predict` is thread-safe by the ABI, nothing else is shared.
unsafe impl Sync for Model {}

/// What follows the outputs a load's checks give a library ([`CANARIES`] of them).
const CANARY: f32 = -1.234_567_8e-33;
/// How many.
const CANARIES: usize = 64;

impl Drop for Model {
    fn drop(&mut self) {
        // Its code runs: `release`, then its finalisers as it is closed. A crash
        // in there names it, as one in its `predict` does.
        let _inside = super::crash_note::Inside::enter(&self.crash_line);
        if let Some(release) = self.release {
            // SAFETY: the last reference is gone, so no predict is running.
            unsafe { release() };
        }
        // SAFETY: never used again; no function of it is referenced any more.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.lib) };
        // Then `_image` (a field): let go, or kept while the loader holds it.
    }
}

/// Why a load of the file `file` (device, inode) would wait, if it would: a
/// model of that file is still open ([`OPEN`]: in use, or its `release`
/// running). Each load maps a copy of its own ([`Image`]), so the loader never
/// hands an older library back; a file's next model still waits for the one
/// before it to be let go, so that a library's `init` and the `release` of its
/// predecessor never run at once (a library may keep state outside its
/// process's memory).
pub(super) fn still_mapped(file: (u64, u64)) -> Option<String> {
    OPEN.lock().contains(&file).then(held_file)
}

/// Whether a model of the file at `path` is open: serving, held by a caller, or
/// being released (its `release` and close not finished).
pub fn is_open(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).is_ok_and(|m| still_mapped((m.dev(), m.ino())).is_some())
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Model({} {} v{} from {})",
            self.name,
            self.version,
            self.abi,
            self.path.display()
        )
    }
}

fn c_string(p: *const c_char, what: &str) -> Result<String, String> {
    if p.is_null() {
        return Err(format!("{what} is null"));
    }
    // SAFETY: the ABI promises a NUL-terminated static string (read to its NUL; the
    // length is checked after).
    let s = unsafe { CStr::from_ptr(p) };
    let s = s.to_str().map_err(|_| format!("{what} is not UTF-8"))?;
    if s.is_empty() || s.len() > 128 {
        return Err(format!("{what} must be 1..=128 bytes"));
    }
    Ok(s.to_owned())
}

/// Golden vectors copied out of a library.
struct Golden {
    rows: Vec<f32>,
    outputs: Vec<f64>,
    margins: Option<Vec<f64>>,
    /// One per row (zeros when the library has none).
    scales: Vec<f64>,
}

/// What a library's table says, copied out of it.
struct Table {
    abi: u32,
    name: String,
    version: String,
    n_features: u32,
    n_outputs: u32,
    n_targets: u32,
    max_n_class: u32,
    leaf_type: String,
    postprocessor: String,
    trainer: String,
    init: Option<unsafe extern "C" fn() -> i32>,
    predict: PredictFn,
    release: Option<unsafe extern "C" fn()>,
    golden: Option<Golden>,
}

/// Why a table could not be read.
enum TableError {
    /// Neither export symbol.
    NoSymbol(String),
    /// A table that is not ours or is malformed.
    Abi(String),
}

/// Reads the table behind the library's export: v2 if it has one, else v1.
fn read_table(lib: &libloading::Library) -> Result<Table, TableError> {
    // SAFETY: the symbol's type is fixed by the ABI header.
    let v2 = unsafe { lib.get::<unsafe extern "C" fn() -> *const AbiV2>(EXPORT_SYMBOL_V2) };
    if let Ok(export) = v2 {
        // SAFETY: calling the export is the ABI's entry point.
        let table = unsafe { export() };
        return read_v2(table).map_err(TableError::Abi);
    }
    // SAFETY: as above, for the v1 symbol.
    let v1 = unsafe { lib.get::<unsafe extern "C" fn() -> *const AbiV1>(EXPORT_SYMBOL_V1) };
    match v1 {
        // SAFETY: calling the export is the ABI's entry point.
        Ok(export) => read_v1(unsafe { export() }).map_err(TableError::Abi),
        Err(e) => Err(TableError::NoSymbol(e.to_string())),
    }
}

/// The `abi_version` and `struct_size` of a table, read before anything else.
///
/// # Safety
/// `table` is non-null and points at a table that starts with those two fields.
unsafe fn head<T>(table: *const T) -> (u32, u32) {
    let p = table.cast::<u32>();
    // SAFETY: every table starts with two u32 fields (caller's contract).
    unsafe { (p.read(), p.add(1).read()) }
}

/// The table behind `table` once it is known to be of version `want` and at least
/// as large as `T`.
fn checked<'a, T>(table: *const T, want: u32) -> Result<&'a T, String> {
    if table.is_null() {
        return Err("the export returned null".into());
    }
    if !table.is_aligned() {
        return Err("the export returned a table not aligned for its type".into());
    }
    // SAFETY: non-null and static per the ABI; every table starts with the two
    // u32 fields read here, before anything depends on the version or the size.
    let (version, size) = unsafe { head(table) };
    if version != want {
        return Err(format!(
            "ABI version {version} in the {} table, this host speaks {ABI_V1} and {ABI_V2}",
            if want == ABI_V2 { "v2" } else { "v1" }
        ));
    }
    let need = std::mem::size_of::<T>();
    if (size as usize) < need {
        return Err(format!("table of {size} bytes is too small ({need})"));
    }
    // SAFETY: non-null, static per the ABI, of our version and at least our size.
    Ok(unsafe { &*table })
}

fn read_v2(table: *const AbiV2) -> Result<Table, String> {
    let t = checked(table, ABI_V2)?;
    shape(t.n_features, t.n_outputs)?;
    if t.n_targets == 0
        || t.max_n_class == 0
        || t.n_targets.checked_mul(t.max_n_class) != Some(t.n_outputs)
    {
        return Err(format!(
            "n_outputs {} is not n_targets {} × max_n_class {}",
            t.n_outputs, t.n_targets, t.max_n_class
        ));
    }
    let golden = if t.n_golden == 0 {
        None
    } else {
        if t.n_golden > MAX_GOLDEN {
            return Err(format!("{} golden rows; at most {MAX_GOLDEN}", t.n_golden));
        }
        if t.golden_rows.is_null() || t.golden_outputs.is_null() {
            return Err("n_golden > 0 with null golden_rows or golden_outputs".into());
        }
        // Read as slices of their types below: a pointer not aligned for its
        // type is refused before (reading it would be undefined behaviour).
        let aligned = t.golden_rows.is_aligned()
            && t.golden_outputs.is_aligned()
            && (t.golden_margins.is_null() || t.golden_margins.is_aligned())
            && (t.golden_scales.is_null() || t.golden_scales.is_aligned());
        if !aligned {
            return Err("a golden array is not aligned for its element type".into());
        }
        let n = t.n_golden as usize;
        let (fi, fo) = (t.n_features as usize, t.n_outputs as usize);
        // SAFETY: the ABI says golden_rows holds n_golden × n_features floats,
        // golden_outputs / golden_margins n_golden × n_outputs doubles and
        // golden_scales n_golden doubles, static; all counts are bounded above.
        let (rows, outputs, margins, scales) = unsafe {
            (
                std::slice::from_raw_parts(t.golden_rows, n * fi).to_vec(),
                std::slice::from_raw_parts(t.golden_outputs, n * fo).to_vec(),
                (!t.golden_margins.is_null())
                    .then(|| std::slice::from_raw_parts(t.golden_margins, n * fo).to_vec()),
                if t.golden_scales.is_null() {
                    vec![0.0; n]
                } else {
                    std::slice::from_raw_parts(t.golden_scales, n).to_vec()
                },
            )
        };
        if scales.iter().any(|s| !(s.is_finite() && *s >= 0.0)) {
            return Err("golden_scales holds a negative or non-finite value".into());
        }
        Some(Golden {
            rows,
            outputs,
            margins,
            scales,
        })
    };
    let leaf_type = c_string(t.leaf_type, "leaf_type")?;
    if leaf_type != "float32" && leaf_type != "float64" {
        return Err(format!(
            "leaf_type {leaf_type:?} is neither float32 nor float64"
        ));
    }
    Ok(Table {
        abi: ABI_V2,
        name: c_string(t.name, "name")?,
        version: c_string(t.version, "version")?,
        n_features: t.n_features,
        n_outputs: t.n_outputs,
        n_targets: t.n_targets,
        max_n_class: t.max_n_class,
        leaf_type,
        postprocessor: c_string(t.postprocessor, "postprocessor")?,
        trainer: c_string(t.trainer, "trainer")?,
        init: t.init,
        predict: PredictFn::V2(t.predict.ok_or("predict is null")?),
        release: t.release,
        golden,
    })
}

fn read_v1(table: *const AbiV1) -> Result<Table, String> {
    let t = checked(table, ABI_V1)?;
    shape(t.n_features, t.n_outputs)?;
    Ok(Table {
        abi: ABI_V1,
        name: c_string(t.name, "name")?,
        version: c_string(t.version, "version")?,
        n_features: t.n_features,
        n_outputs: t.n_outputs,
        n_targets: 1,
        max_n_class: t.n_outputs,
        leaf_type: "unknown".into(),
        postprocessor: "unknown".into(),
        trainer: "unknown".into(),
        init: t.init,
        predict: PredictFn::V1(t.predict.ok_or("predict is null")?),
        release: t.release,
        golden: None,
    })
}

fn shape(n_features: u32, n_outputs: u32) -> Result<(), String> {
    if n_features == 0 || n_features > MAX_FEATURES {
        return Err(format!("n_features {n_features} is out of range"));
    }
    if n_outputs == 0 || n_outputs > MAX_OUTPUTS {
        return Err(format!("n_outputs {n_outputs} is out of range"));
    }
    Ok(())
}

/// Compares `got` with the training library's `want` (`n_outputs` per row, one
/// `scales` entry per row): the largest scaled difference, or the first value out
/// of tolerance.
fn compare(
    got: &[f32],
    want: &[f64],
    scales: &[f64],
    n_outputs: usize,
    what: &str,
) -> Result<f64, String> {
    let mut worst = 0.0f64;
    let mut bad = None;
    let mut n_bad = 0usize;
    if got.len() != want.len() || want.len() != scales.len() * n_outputs {
        return Err(format!(
            "{what}: {} answers for {} references",
            got.len(),
            want.len()
        ));
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let scale = w.abs().max(GOLDEN_FLOOR).max(scales[i / n_outputs]);
        let d = (f64::from(*g) - w).abs() / scale;
        // NaN on either side is out of tolerance too.
        if d.is_nan() || d > GOLDEN_RTOL {
            n_bad += 1;
            bad.get_or_insert((i, *g, *w));
        } else {
            worst = worst.max(d);
        }
    }
    match bad {
        None => Ok(worst),
        Some((i, g, w)) => Err(format!(
            "row {} {what} {}: the library answers {g}, the training library {w} \
             ({n_bad} of {} values differ by more than {GOLDEN_RTOL:e} relative)",
            i / n_outputs,
            i % n_outputs,
            got.len()
        )),
    }
}

/// Whether the library at `real` (a canonical path: no links) may be loaded:
/// whoever else could have written it, or put another file at its path, would
/// choose code that runs inside the sidecar, which holds the TPU identity and the
/// command and ledger keys. The file: a regular file owned by root or by the
/// sidecar's own user, writable by neither group nor others; so is its directory
/// (the models directory: in a sticky one others could still add a link or the
/// file a dangling link names). Each directory above: owned by root or that user,
/// and writable by no one else unless sticky (`/tmp`: others may not rename what
/// they do not own). `Err`: why not.
pub fn trusted(real: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let owner = |what: &Path, m: &std::fs::Metadata| {
        if m.uid() == 0 || m.uid() == me {
            Ok(())
        } else {
            Err(format!(
                "{} is owned by uid {}, neither root nor the sidecar's user (uid {me})",
                what.display(),
                m.uid()
            ))
        }
    };
    let m = std::fs::symlink_metadata(real).map_err(|e| e.to_string())?;
    if !m.file_type().is_file() {
        return Err("not a regular file".into());
    }
    owner(real, &m)?;
    if m.mode() & 0o022 != 0 {
        return Err(format!(
            "writable by group or others (mode {:o}): chmod go-w",
            m.mode() & 0o7777
        ));
    }
    for (i, dir) in real.ancestors().skip(1).enumerate() {
        let d = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        owner(dir, &d)?;
        let sticky_ok = i > 0 && d.mode() & 0o1000 != 0;
        if d.mode() & 0o022 != 0 && !sticky_ok {
            return Err(format!(
                "its directory {} is writable by group or others (mode {:o}): another file could be put at its path",
                dir.display(),
                d.mode() & 0o7777
            ));
        }
    }
    Ok(())
}

impl Model {
    /// Loads and checks `path` (a link is resolved to its target) for a module
    /// configured for `want_features`.
    pub fn load(path: &Path, want_features: u32, policy: LoadPolicy) -> Result<Model, LoadError> {
        // A library refused after its `init` ran is let go here.
        Model::load_or_refused(path, want_features, policy).map_err(|(e, _refused)| e)
    }

    /// [`Model::load`]; a library refused after its `init` ran comes back with
    /// the refusal, for the caller to let go after answering (its `release`
    /// runs then, and may take any time).
    pub(super) fn load_or_refused(
        path: &Path,
        want_features: u32,
        policy: LoadPolicy,
    ) -> Result<Model, (LoadError, Option<Box<Model>>)> {
        let allow_unverified = policy.allow_unverified;
        let (mut model, golden) =
            Model::open_and_init(path, want_features, policy).map_err(|e| (e, None))?;
        let shown = model.path.display().to_string();
        if let Err(e) = model.self_test() {
            return Err((LoadError::SelfTest(shown, e), Some(Box::new(model))));
        }
        match golden {
            Some(g) => match model.golden_check(&g) {
                Ok(check) => model.golden = Some(check),
                Err(e) => return Err((LoadError::GoldenMismatch(shown, e), Some(Box::new(model)))),
            },
            None if allow_unverified => {}
            None => return Err((LoadError::GoldenMissing(shown), Some(Box::new(model)))),
        }
        Ok(model)
    }

    /// The library at `path` opened, checked against the policy and the ABI,
    /// and its `init` run; its golden vectors, if it has them.
    fn open_and_init(
        path: &Path,
        want_features: u32,
        policy: LoadPolicy,
    ) -> Result<(Model, Option<Golden>), LoadError> {
        let real = std::fs::canonicalize(path)
            .map_err(|e| LoadError::Open(path.display().to_string(), e.to_string()))?;
        let shown = real.display().to_string();
        trusted(&real).map_err(|why| LoadError::Untrusted(shown.clone(), why))?;
        let crash_line = path_line(&real).into_boxed_slice();
        // Read after the check; only root or the sidecar's user could change it
        // before it is loaded. The file read is the one the model is known by,
        // hashed as it is read (a file of any size takes no memory).
        let open = |e: std::io::Error| LoadError::Open(shown.clone(), e.to_string());
        let mut f = std::fs::File::open(&real).map_err(open)?;
        let file = file_id(&f.metadata().map_err(open)?);
        // Before it is read: a library the loader would hand back instead of this
        // file waits (its model's teardown, an older file at this path), and no
        // other load of this file starts until this one's model is closed.
        let still = |why| LoadError::StillMapped(shown.clone(), why);
        let opened = Open::claim(file).map_err(still)?;
        // The bytes hashed are the bytes loaded (`Image`).
        let (image, sha256) = Image::copy(&mut f, &real).map_err(|e| {
            let hint = if e.raw_os_error() == Some(libc::EACCES) {
                " (vm.memfd_noexec = 2 forbids executable memory files, which the sidecar loads libraries from)"
            } else {
                ""
            };
            LoadError::Open(shown.clone(), format!("{e}{hint}"))
        })?;
        // Never the case (a library the loader kept has its descriptor kept, so
        // no image gets its number): the loader would hand that library back.
        if image.held() {
            return Err(still(
                "the C library's loader holds a library under this image's name".into(),
            ));
        }
        if let Some(allowed) = &policy.allowed_sha256 {
            if !allowed.contains(&sha256) {
                return Err(LoadError::NotAllowed(shown, sha256));
            }
        }
        // From here the library's code runs (its initialisers, `init`, the checks,
        // its finalisers if it is refused): a fatal signal in there names it. The
        // line outlives the guard.
        let loading = crash_line.clone();
        let _inside = super::crash_note::Inside::enter(&loading);
        // SAFETY: loading runs the library's initialisers. Only a regular file that
        // no one but root and the sidecar's own user could have written, or put
        // at its path, is loaded (`trusted`), from the models directory
        // (`ModelHost`): operators' own builds; whoever could write such a file
        // could run code as the sidecar anyway.
        // Every symbol bound now (RTLD_NOW), not at its first call: a library
        // that needs one this process lacks is refused here (`open`), not ended
        // by the loader (`_exit(127)`, no fatal signal to name it) on the hot
        // path, at a call no check made.
        let lib = unsafe {
            libloading::os::unix::Library::open(
                Some(&image.path),
                libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL,
            )
        }
        .map(libloading::Library::from)
        .map_err(|e| LoadError::Open(shown.clone(), e.to_string()))?;
        let t = read_table(&lib).map_err(|e| match e {
            TableError::NoSymbol(e) => LoadError::Symbol(shown.clone(), e),
            TableError::Abi(e) => LoadError::Abi(shown.clone(), e),
        })?;
        if t.n_features != want_features {
            return Err(LoadError::Features {
                path: shown,
                got: t.n_features,
                want: want_features,
            });
        }
        if let Some(init) = t.init {
            // SAFETY: called once, before any predict, per the ABI.
            let s = unsafe { init() };
            if s != 0 {
                return Err(LoadError::Init(shown, s));
            }
        }
        let golden = t.golden;
        let model = Model {
            crash_line,
            label: format!("{}@{}#{}", t.name, t.version, &sha256[..12]).into(),
            sha256,
            file,
            name: t.name,
            version: t.version,
            abi: t.abi,
            n_features: t.n_features,
            n_outputs: t.n_outputs,
            n_targets: t.n_targets,
            max_n_class: t.max_n_class,
            leaf_type: t.leaf_type,
            postprocessor: t.postprocessor,
            trainer: t.trainer,
            golden: None,
            path: real,
            predict: t.predict,
            release: t.release,
            lib: std::mem::ManuallyDrop::new(lib),
            _image: image,
            _open: opened,
            _origin: f,
        };
        Ok((model, golden))
    }

    /// Rows of zeros, of missing values and of ones must score, finitely.
    fn self_test(&self) -> Result<(), String> {
        let n = self.n_features as usize;
        let mut rows = vec![0.0f32; n];
        rows.extend(std::iter::repeat_n(f32::NAN, n));
        rows.extend(std::iter::repeat_n(1.0f32, n));
        let out = self.checked(&rows, false)?;
        if out.iter().all(|v| v.is_finite()) {
            Ok(())
        } else {
            Err(format!("non-finite outputs {out:?}"))
        }
    }

    /// Scores the golden rows (and margins, when the library has them) and compares
    /// them with the training library's own answers.
    fn golden_check(&self, g: &Golden) -> Result<GoldenCheck, String> {
        let n_outputs = self.n_outputs as usize;
        // The scale term is for float32 arithmetic only: a float64 model is held
        // to 1e-5 of each value.
        let zeros;
        let scales = if self.leaf_type == "float32" {
            &g.scales
        } else {
            zeros = vec![0.0; g.scales.len()];
            &zeros
        };
        let out = self.checked(&g.rows, false)?;
        let mut worst = compare(&out, &g.outputs, scales, n_outputs, "output")?;
        if let Some(margins) = &g.margins {
            let m = self.checked(&g.rows, true)?;
            worst = worst.max(compare(&m, margins, scales, n_outputs, "margin")?);
        }
        Ok(GoldenCheck {
            rows: (g.rows.len() / self.n_features as usize) as u32,
            margins: g.margins.is_some(),
            worst,
        })
    }

    /// Scores `rows` (row-major, `n_features` per row, NaN = missing): the model's
    /// postprocessed outputs, `n_outputs` per row.
    pub fn predict(&self, rows: &[f32]) -> Result<Vec<f32>, PredictError> {
        self.call(rows, false)
    }

    /// Like [`Model::predict`], but the raw sums of the trees (no postprocessing);
    /// v1 libraries have none.
    pub fn predict_margin(&self, rows: &[f32]) -> Result<Vec<f32>, PredictError> {
        self.call(rows, true)
    }

    /// Scored in calls of at most [`CHUNK_ROWS`] rows each: the watchdog
    /// (`models.predict_timeout_ms`) times one call into the library, and a
    /// request of many rows is no call that long.
    fn call(&self, rows: &[f32], margin: bool) -> Result<Vec<f32>, PredictError> {
        let (n, outs) = (self.n_features as usize, self.n_outputs as usize);
        let mut out = vec![0.0f32; self.rows_in(rows)? * outs];
        if rows.is_empty() {
            // No row: the library is still asked (a v1 library has no margins).
            self.predict_into(rows, &mut out, margin)?;
        }
        for (r, o) in rows
            .chunks(CHUNK_ROWS * n.max(1))
            .zip(out.chunks_mut(CHUNK_ROWS * outs.max(1)))
        {
            self.predict_into(r, o, margin)?;
        }
        Ok(out)
    }

    /// A load-time check's call (the self-test, the golden rows): not watched —
    /// a library that hangs there is refused `timeout` by the load's own
    /// deadline (`models.load_timeout_ms`) while the model before it serves.
    fn checked(&self, rows: &[f32], margin: bool) -> Result<Vec<f32>, String> {
        let n = self.rows_in(rows).map_err(|e| e.to_string())? * self.n_outputs as usize;
        // Followed by values no model writes: a library that writes a little
        // past what it was given (into them, within 64 values) is refused
        // before it serves, where it would write into the hot path's memory.
        let mut out = vec![CANARY; n + CANARIES];
        self.call_into(rows, &mut out[..n], margin, false)
            .map_err(|e| e.to_string())?;
        if out[n..].iter().any(|v| v.to_bits() != CANARY.to_bits()) {
            return Err(format!(
                "the library wrote past the {n} outputs it was given"
            ));
        }
        out.truncate(n);
        Ok(out)
    }

    /// Whole rows in `rows`, at most [`MAX_ROWS`].
    fn rows_in(&self, rows: &[f32]) -> Result<usize, PredictError> {
        let n = self.n_features as usize;
        if !rows.len().is_multiple_of(n) {
            return Err(PredictError::Shape(format!(
                "{} values are not whole rows of {n} features",
                rows.len()
            )));
        }
        let n_rows = rows.len() / n;
        if n_rows > MAX_ROWS {
            return Err(PredictError::Shape(format!(
                "{n_rows} rows; at most {MAX_ROWS} per call"
            )));
        }
        Ok(n_rows)
    }

    /// Scores `rows` into `out`, which must hold exactly `n_outputs` per row;
    /// margins (no postprocessing) when `margin`.
    pub fn predict_into(
        &self,
        rows: &[f32],
        out: &mut [f32],
        margin: bool,
    ) -> Result<(), PredictError> {
        self.call_into(rows, out, margin, true)
    }

    /// [`Self::predict_into`], timed by the watchdog when `watched`.
    fn call_into(
        &self,
        rows: &[f32],
        out: &mut [f32],
        margin: bool,
        watched: bool,
    ) -> Result<(), PredictError> {
        let n_rows = self.rows_in(rows)?;
        if out.len() != n_rows * self.n_outputs as usize {
            return Err(PredictError::Shape(format!(
                "{} output slots for {n_rows} rows of {} outputs",
                out.len(),
                self.n_outputs
            )));
        }
        // A fatal signal in there names this library (refused at the next start),
        // and so does staying in there too long (`models.predict_timeout_ms`).
        let _inside = super::crash_note::Inside::enter(&self.crash_line);
        let _watched = watched.then(|| super::watchdog::Watched::enter(&self.crash_line));
        // SAFETY: `rows` holds n_rows * n_features floats and `out` n_rows *
        // n_outputs, as the ABI requires; predict is thread-safe per the ABI.
        let s = unsafe {
            match (self.predict, margin) {
                (PredictFn::V2(f), m) => f(
                    rows.as_ptr(),
                    n_rows,
                    if m { PREDICT_MARGIN } else { 0 },
                    out.as_mut_ptr(),
                ),
                (PredictFn::V1(f), false) => f(rows.as_ptr(), n_rows, out.as_mut_ptr()),
                (PredictFn::V1(_), true) => return Err(PredictError::NoMargin),
            }
        };
        if s != 0 {
            return Err(PredictError::Status(s));
        }
        Ok(())
    }
}

/// What a file is known by, whatever its path: its device and inode.
pub(crate) fn file_id(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt as _;
    (m.dev(), m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_one_of_the_listed_reasons() {
        let p = String::from("x");
        let all = [
            LoadError::Open(p.clone(), p.clone()),
            LoadError::Untrusted(p.clone(), p.clone()),
            LoadError::NotAllowed(p.clone(), p.clone()),
            LoadError::Symbol(p.clone(), p.clone()),
            LoadError::Abi(p.clone(), p.clone()),
            LoadError::Features {
                path: p.clone(),
                got: 1,
                want: 2,
            },
            LoadError::Init(p.clone(), 2),
            LoadError::SelfTest(p.clone(), p.clone()),
            LoadError::GoldenMissing(p.clone()),
            LoadError::GoldenMismatch(p.clone(), p.clone()),
            LoadError::Timeout(p.clone(), 1),
            LoadError::Crashed(p.clone()),
            LoadError::LoaderStuck(p.clone(), p.clone()),
            LoadError::StillMapped(p.clone(), p),
        ];
        let reasons: Vec<&str> = all.iter().map(LoadError::reason).collect();
        assert_eq!(reasons, LoadError::REASONS);
    }

    #[test]
    fn the_tolerance_is_relative_with_a_floor_and_the_rows_scale() {
        // Relative 1e-5 above 0.1.
        assert!(compare(&[100.0009], &[100.0], &[0.0], 1, "output").is_ok());
        assert!(compare(&[100.002], &[100.0], &[0.0], 1, "output").is_err());
        // 1e-6 absolute below 0.1.
        assert!(compare(&[0.000_000_5], &[0.0], &[0.0], 1, "output").is_ok());
        assert!(compare(&[0.000_002], &[0.0], &[0.0], 1, "output").is_err());
        // A float32 sum of large leaves: 1e-5 of its magnitude.
        assert!(compare(&[1.007_865_9], &[1.007_898_8], &[250.0], 1, "output").is_ok());
        assert!(compare(&[1.007_865_9], &[1.007_898_8], &[0.0], 1, "output").is_err());
        // NaN never matches; lengths must agree.
        let e = compare(&[f32::NAN], &[1.0], &[0.0], 1, "margin").unwrap_err();
        assert!(e.contains("row 0 margin 0"), "{e}");
        assert!(compare(&[1.0, 2.0], &[1.0], &[0.0], 1, "output").is_err());
    }
}
