//! Benchmarks live in `benches/`; see docs/benchmarks.md. This library holds what a
//! benchmark must link through the package's own build script.

#![allow(unsafe_code)] // FFI: every unsafe block says why it is sound.

/// tl2cgen's C for one model, compiled statically by build.rs when
/// `GW_MODEL_C_DIR` is set (`bash bench/run.sh models`).
#[cfg(gw_static_model)]
pub mod direct {
    /// tl2cgen's `union Entry` of a model with `T` thresholds.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub union Entry<T: Copy> {
        pub missing: i32,
        pub fvalue: T,
        pub qvalue: i32,
    }
    extern "C" {
        pub fn gw_f64_predict(data: *mut Entry<f64>, pred_margin: i32, result: *mut f64);
        pub fn gw_f64_get_num_feature() -> i32;
        pub fn gw_f32_predict(data: *mut Entry<f32>, pred_margin: i32, result: *mut f32);
        pub fn gw_f32_get_num_feature() -> i32;
    }

    /// A model's value type: `f64` or `f32`.
    pub trait Value: Copy {
        /// From the row's `f32`.
        fn from_f32(v: f32) -> Self;
        /// To the output's `f32`.
        fn to_f32(self) -> f32;
    }
    impl Value for f64 {
        fn from_f32(v: f32) -> f64 {
            f64::from(v)
        }
        fn to_f32(self) -> f32 {
            self as f32
        }
    }
    impl Value for f32 {
        fn from_f32(v: f32) -> f32 {
            v
        }
        fn to_f32(self) -> f32 {
            self
        }
    }

    /// Scores rows one by one with `predict` (one output), as the adapter does.
    pub fn score<T: Value>(
        predict: unsafe extern "C" fn(*mut Entry<T>, i32, *mut T),
        rows: &[f32],
        n: usize,
        out: &mut [f32],
    ) {
        let mut entries = [Entry {
            fvalue: T::from_f32(0.0),
        }; 64];
        for (i, row) in rows.chunks_exact(n).enumerate() {
            for (e, v) in entries.iter_mut().zip(row) {
                if v.is_nan() {
                    e.missing = -1;
                } else {
                    e.fvalue = T::from_f32(*v);
                }
            }
            let mut r = [T::from_f32(0.0); 1];
            // SAFETY: `entries` holds n ≤ 64 features; the model has one output.
            unsafe { predict(entries.as_mut_ptr(), 0, r.as_mut_ptr()) };
            out[i] = r[0].to_f32();
        }
    }
}
