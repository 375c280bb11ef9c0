//! One model library behind the versioned C ABI (`abi/model_abi_v1.h`):
//! [`Model::load`] opens it with `libloading`, checks the ABI version, the table and
//! the feature count, calls `init`, and runs a self-test before the model may
//! serve. The library is unloaded only when the last `Arc<Model>` is dropped, i.e.
//! never while a prediction is still running in it.

#![allow(unsafe_code)] // FFI: every unsafe block says why it is sound.

use std::ffi::{c_char, CStr};
use std::path::{Path, PathBuf};

/// `MODEL_ABI_V1`.
pub const ABI_V1: u32 = 1;
/// The exported symbol.
pub const EXPORT_SYMBOL: &[u8] = b"model_abi_v1_export\0";
/// Rows per prediction call at most.
pub const MAX_ROWS: usize = 65_536;
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

type PredictFn = unsafe extern "C" fn(*const f32, usize, *mut f32) -> i32;

/// Why a library was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LoadError {
    /// Not a loadable shared library (missing, corrupt, wrong architecture).
    #[error("cannot open {0}: {1}")]
    Open(String, String),
    /// No `model_abi_v1_export`.
    #[error("{0} does not export model_abi_v1_export: {1}")]
    Symbol(String, String),
    /// Wrong ABI version or a malformed table.
    #[error("{0}: {1}")]
    Abi(String, String),
    /// Feature count differs from what the host feeds.
    #[error("{path}: the model takes {got} features, the host feeds {want}")]
    Features {
        /// Library.
        path: String,
        /// What the library says.
        got: u32,
        /// What the host expects.
        want: u32,
    },
    /// `init` or the self-test failed.
    #[error("{0}: self-test failed: {1}")]
    SelfTest(String, String),
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
    /// No model is loaded for this module.
    #[error("no model is serving")]
    NoModel,
}

/// A loaded, checked model. Cheap to share (`Arc`); unloaded on the last drop.
pub struct Model {
    /// Model name from the library.
    pub name: String,
    /// Version from the library (the build's git SHA).
    pub version: String,
    /// Features per row.
    pub n_features: u32,
    /// Outputs per row.
    pub n_outputs: u32,
    /// The library file (the link target, not the link).
    pub path: PathBuf,
    predict: PredictFn,
    release: Option<unsafe extern "C" fn()>,
    // Declared last: dropped after `release` ran in `Drop`.
    _lib: libloading::Library,
}

// SAFETY: the ABI requires `predict` to be callable from many threads at once; the
// table's strings were copied; the library handle is only dropped with the model.
unsafe impl Send for Model {}
// SAFETY: as for `Send`: `predict` is thread-safe by the ABI, nothing else is shared.
unsafe impl Sync for Model {}

impl Drop for Model {
    fn drop(&mut self) {
        if let Some(release) = self.release {
            // SAFETY: the last reference is gone, so no predict is running.
            unsafe { release() };
        }
    }
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Model({} {} from {})",
            self.name,
            self.version,
            self.path.display()
        )
    }
}

fn c_string(p: *const c_char, what: &str) -> Result<String, String> {
    if p.is_null() {
        return Err(format!("{what} is null"));
    }
    // SAFETY: the ABI promises a NUL-terminated static string; length bounded below.
    let s = unsafe { CStr::from_ptr(p) };
    let s = s.to_str().map_err(|_| format!("{what} is not UTF-8"))?;
    if s.is_empty() || s.len() > 128 {
        return Err(format!("{what} must be 1..=128 bytes"));
    }
    Ok(s.to_owned())
}

impl Model {
    /// Loads and checks `path` (a link is resolved to its target). `want_features`
    /// is what the host will feed.
    pub fn load(path: &Path, want_features: u32) -> Result<Model, LoadError> {
        let real = std::fs::canonicalize(path)
            .map_err(|e| LoadError::Open(path.display().to_string(), e.to_string()))?;
        let shown = real.display().to_string();
        // SAFETY: loading runs the library's initialisers; only libraries from the
        // configured models directory are loaded (operators' own builds).
        let lib = unsafe { libloading::Library::new(&real) }
            .map_err(|e| LoadError::Open(shown.clone(), e.to_string()))?;
        // SAFETY: the symbol's type is fixed by the ABI header.
        let export: libloading::Symbol<'_, unsafe extern "C" fn() -> *const AbiV1> =
            unsafe { lib.get(EXPORT_SYMBOL) }
                .map_err(|e| LoadError::Symbol(shown.clone(), e.to_string()))?;
        // SAFETY: calling the export is the ABI's entry point.
        let table = unsafe { export() };
        if table.is_null() {
            return Err(LoadError::Abi(
                shown,
                "model_abi_v1_export returned null".into(),
            ));
        }
        // SAFETY: non-null and static per the ABI; the version is checked before any
        // field beyond it is trusted, the size before the rest is read.
        let version_field = unsafe { std::ptr::addr_of!((*table).abi_version).read() };
        if version_field != ABI_V1 {
            return Err(LoadError::Abi(
                shown,
                format!("ABI version {version_field}, this host speaks {ABI_V1}"),
            ));
        }
        // SAFETY: the version said the table is ours; its first two fields are read
        // before anything depends on its size.
        let size = unsafe { std::ptr::addr_of!((*table).struct_size).read() };
        if (size as usize) < std::mem::size_of::<AbiV1>() {
            return Err(LoadError::Abi(
                shown,
                format!("table of {size} bytes is too small"),
            ));
        }
        // SAFETY: non-null, static per the ABI, and at least as large as our struct.
        let t = unsafe { &*table };
        let abi = |m: String| LoadError::Abi(shown.clone(), m);
        let name = c_string(t.name, "name").map_err(abi)?;
        let version = c_string(t.version, "version").map_err(abi)?;
        let predict = t.predict.ok_or_else(|| abi("predict is null".into()))?;
        if t.n_features == 0 || t.n_features > MAX_FEATURES {
            return Err(abi(format!("n_features {} is out of range", t.n_features)));
        }
        if t.n_outputs == 0 || t.n_outputs > MAX_OUTPUTS {
            return Err(abi(format!("n_outputs {} is out of range", t.n_outputs)));
        }
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
                return Err(LoadError::SelfTest(shown, format!("init returned {s}")));
            }
        }
        let (n_features, n_outputs, release) = (t.n_features, t.n_outputs, t.release);
        let model = Model {
            name,
            version,
            n_features,
            n_outputs,
            path: real,
            predict,
            release,
            _lib: lib,
        };
        model
            .self_test()
            .map_err(|e| LoadError::SelfTest(shown, e))?;
        Ok(model)
    }

    /// Rows of zeros, of missing values and of ones must score, finitely.
    fn self_test(&self) -> Result<(), String> {
        let n = self.n_features as usize;
        let mut rows = vec![0.0f32; n];
        rows.extend(std::iter::repeat_n(f32::NAN, n));
        rows.extend(std::iter::repeat_n(1.0f32, n));
        let out = self.predict(&rows).map_err(|e| e.to_string())?;
        if out.iter().all(|v| v.is_finite()) {
            Ok(())
        } else {
            Err(format!("non-finite outputs {out:?}"))
        }
    }

    /// Scores `rows` (row-major, `n_features` per row, NaN = missing).
    pub fn predict(&self, rows: &[f32]) -> Result<Vec<f32>, PredictError> {
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
        let mut out = vec![0.0f32; n_rows * self.n_outputs as usize];
        // SAFETY: `rows` holds n_rows * n_features floats and `out` n_rows *
        // n_outputs, as the ABI requires; predict is thread-safe per the ABI.
        let s = unsafe { (self.predict)(rows.as_ptr(), n_rows, out.as_mut_ptr()) };
        if s != 0 {
            return Err(PredictError::Status(s));
        }
        Ok(out)
    }
}
