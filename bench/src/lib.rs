//! Benchmarks live in `benches/`; see docs/benchmarks.md. This library holds what a
//! benchmark must link through the package's own build script.

#![allow(unsafe_code)] // FFI: every unsafe block says why it is sound.

/// tl2cgen's C for one model, compiled statically by build.rs when
/// `GW_MODEL_C_DIR` is set (`bash bench/run.sh models`).
#[cfg(gw_static_model)]
pub mod direct {
    /// tl2cgen's `union Entry` for a double-threshold model.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub union Entry {
        pub missing: i32,
        pub fvalue: f64,
        pub qvalue: i32,
    }
    extern "C" {
        pub fn predict(data: *mut Entry, pred_margin: i32, result: *mut f64);
        pub fn get_num_feature() -> i32;
    }

    /// Scores rows one by one, as the adapter does.
    pub fn score(rows: &[f32], n: usize, out: &mut [f32]) {
        let mut entries = [Entry { fvalue: 0.0 }; 64];
        for (i, row) in rows.chunks_exact(n).enumerate() {
            for (e, v) in entries.iter_mut().zip(row) {
                if v.is_nan() {
                    e.missing = -1;
                } else {
                    e.fvalue = f64::from(*v);
                }
            }
            let mut r = [0.0f64; 1];
            // SAFETY: `entries` holds n ≤ 64 features; one output.
            unsafe { predict(entries.as_mut_ptr(), 0, r.as_mut_ptr()) };
            out[i] = r[0] as f32;
        }
    }
}
