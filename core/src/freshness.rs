//! Freshness: a command's `ts` must lie within ±`max_skew` of the verifier's clock.

use crate::code::{Code, Reject};

/// Default allowed clock skew, in seconds.
pub const DEFAULT_MAX_SKEW_SECS: u64 = 30;

/// The widest `max_skew_secs` a configuration may set: a typo must not quietly
/// open the window a signed command may be replayed in, or keep nonces for
/// hours. 1..=this.
pub const MAX_SKEW_LIMIT_SECS: u64 = 600;

/// Whether `max_skew_secs` is within 1..=[`MAX_SKEW_LIMIT_SECS`].
pub fn validate_max_skew(secs: u64) -> Result<(), String> {
    if (1..=MAX_SKEW_LIMIT_SECS).contains(&secs) {
        Ok(())
    } else {
        Err(format!(
            "max_skew_secs must be 1..={MAX_SKEW_LIMIT_SECS} (seconds a command's ts may be off the clock), not {secs}"
        ))
    }
}

/// Checks `ts` (unix seconds) against `now` with the allowed skew.
pub fn check_freshness(ts: u64, now: u64, max_skew: u64) -> Result<(), Reject> {
    if ts.saturating_add(max_skew) < now {
        return Err(Reject::with(
            Code::Stale,
            format!(
                "command ts {ts} is {}s old (max skew {max_skew}s)",
                now - ts
            ),
        ));
    }
    if ts > now.saturating_add(max_skew) {
        return Err(Reject::with(
            Code::Future,
            format!(
                "command ts {ts} is {}s in the future (max skew {max_skew}s)",
                ts - now
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_edges() {
        assert!(check_freshness(1000, 1000, 30).is_ok());
        assert!(check_freshness(970, 1000, 30).is_ok());
        assert!(check_freshness(1030, 1000, 30).is_ok());
        assert_eq!(
            check_freshness(969, 1000, 30).unwrap_err().code,
            Code::Stale
        );
        assert_eq!(
            check_freshness(1031, 1000, 30).unwrap_err().code,
            Code::Future
        );
        assert_eq!(
            check_freshness(0, u64::MAX, 30).unwrap_err().code,
            Code::Stale
        );
        assert_eq!(
            check_freshness(u64::MAX, 0, 30).unwrap_err().code,
            Code::Future
        );
        assert!(check_freshness(u64::MAX, u64::MAX, u64::MAX).is_ok());
    }
}
