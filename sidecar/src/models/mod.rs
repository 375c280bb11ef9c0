//! Tree models behind the versioned C ABI: one checked library ([`library`]), the
//! per-module slots that swap them in ([`host`]), and the API that scores with them
//! ([`api`]: `GET /api/models`, `POST /api/models/{module}/predict`,
//! `POST /api/modules/{module}/evaluate`). A library that crashes the process,
//! or hangs in its `predict` ([`watchdog`]), is refused at the next start.

pub mod api;
mod crash_note;
pub mod host;
pub mod library;
pub mod watchdog;

pub use host::{ModelHost, ModelView, SlotView, SwapEvent};
pub use library::{
    GoldenCheck, LoadError, LoadPolicy, Model, PredictError, ABI_V1, ABI_V2, GOLDEN_FLOOR,
    GOLDEN_RTOL, MAX_ROWS,
};

/// A feature as a model takes it: a missing value (`null`), and one that is not
/// finite (JSON's `1e39` reads as an `f32` infinity; a frame may hold NaN or an
/// infinity), is missing (NaN) — on every way in (`/predict`, `/evaluate`,
/// `POST /api/opportunities`, the QUIC ingest), so that an opportunity scores
/// the same whichever way it came.
pub fn feature(v: Option<f32>) -> f32 {
    v.filter(|f| f.is_finite()).unwrap_or(f32::NAN)
}
