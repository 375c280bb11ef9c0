//! The native sidecar behind Envoy, one module per capability, each owning its state
//! and exporting its own router:
//!
//! - [`control`]: admission of signed commands (a pure decision core,
//!   [`control::admission`], and a thin async shell), the command bus, one agent per
//!   module that applies commands, the durable replay guard, the original JSON route
//!   and the edge's decision reports.
//! - [`ledger`]: every decision sealed into a hash chain, spooled to disk, shipped to
//!   ClickHouse; the ledger's query API.
//! - [`models`]: tree models behind the versioned C ABI, hot-swapped; predict and
//!   evaluate.
//! - [`sender`]: Solana transactions over QUIC to the TPU and a relay, hedged; the
//!   hot path; the JSON-RPC endpoint.
//! - [`ops`]: health and Prometheus metrics.
//! - [`sched`]: short scheduling slices for the sidecar's threads.
//!
//! [`app`] builds them from a [`config`] and merges their routers; errors answer
//! through [`error::ApiError`]; logs go through [`telemetry`].

pub mod app;
pub mod config;
pub mod console;
pub mod control;
pub mod durable;
pub mod error;
pub mod journal;
pub mod ledger;
pub mod models;
pub mod ops;
pub mod sched;
pub mod sender;
pub mod serve;
pub mod telemetry;
pub mod tls;

/// Runs `f` on the blocking pool once `turns` has a permit, the permit held by
/// the blocking task itself: a caller that goes away while `f` runs does not
/// free its turn early. Bounds how much blocking work one kind of request takes
/// (the pool is shared with the ledger's shipping). `Err`: the task did not
/// finish.
pub async fn blocking_turn<T: Send + 'static>(
    turns: &std::sync::Arc<tokio::sync::Semaphore>,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let turn = turns
        .clone()
        .acquire_owned()
        .await
        .map_err(|e| e.to_string())?;
    blocking_in(turn, f).await
}

/// [`blocking_turn`] with the turn already taken.
pub async fn blocking_in<T: Send + 'static>(
    turn: tokio::sync::OwnedSemaphorePermit,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        f()
    })
    .await
    .map_err(|e| e.to_string())
}

/// Unix time in nanoseconds (0 before 1970, saturating far in the future).
pub fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Unix time in seconds.
pub fn now_secs() -> u64 {
    now_nanos() / 1_000_000_000
}

/// Whether `n` is 0 (serde's `skip_serializing_if` for counters and optional
/// numbers written only when set).
#[allow(clippy::trivially_copy_pass_by_ref)] // serde passes a reference
pub(crate) fn is_zero(n: &u64) -> bool {
    *n == 0
}
