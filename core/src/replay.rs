//! Per-issuer replay protection as a pure state machine.
//!
//! A nonce is accepted once: either above the issuer's high-water mark, or inside a
//! bounded window below it and not seen before. The state serialises (serde for the
//! sidecar's persisted file, a compact byte form for proxy-wasm shared data).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::code::{Code, Reject};

/// Default out-of-order window, in nonces.
pub const DEFAULT_WINDOW: u32 = 1024;
/// Largest window we accept (8 KiB of bitmap per issuer).
pub const MAX_WINDOW: u32 = 65536;

/// Why a window size is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("replay window must be a multiple of 64 between 64 and {MAX_WINDOW}, got {0}")]
pub struct BadWindow(pub u32);

fn check_window(window: u32) -> Result<usize, BadWindow> {
    if !(64..=MAX_WINDOW).contains(&window) || !window.is_multiple_of(64) {
        return Err(BadWindow(window));
    }
    Ok((window / 64) as usize)
}

/// One issuer's nonce state: the highest nonce accepted and a bitmap of the
/// `window` nonces at and below it (bit `d` = nonce `high - d`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NonceWindow {
    high: u64,
    bits: Vec<u64>,
}

impl NonceWindow {
    /// An empty window of `window` nonces (a multiple of 64).
    pub fn new(window: u32) -> Result<Self, BadWindow> {
        Ok(NonceWindow {
            high: 0,
            bits: vec![0; check_window(window)?],
        })
    }

    /// The highest nonce accepted so far (0 when none).
    pub fn high(&self) -> u64 {
        self.high
    }

    fn width(&self) -> u64 {
        self.bits.len() as u64 * 64
    }

    /// Whether `nonce` would be accepted, without recording it.
    pub fn check(&self, nonce: u64) -> Result<(), Reject> {
        if nonce == 0 {
            return Err(Reject::new(Code::BadNonce, "nonce must be non-zero"));
        }
        if nonce > self.high {
            return Ok(());
        }
        let d = self.high - nonce;
        if d >= self.width() {
            return Err(Reject::with(
                Code::Replay,
                format!(
                    "nonce {nonce} is older than the replay window ({} below {})",
                    self.width(),
                    self.high
                ),
            ));
        }
        if self.bits[(d / 64) as usize] & (1u64 << (d % 64)) != 0 {
            return Err(Reject::with(
                Code::Replay,
                format!("nonce {nonce} was already used"),
            ));
        }
        Ok(())
    }

    /// Accepts `nonce` once, recording it; a second call with it fails with `replay`.
    pub fn accept(&mut self, nonce: u64) -> Result<(), Reject> {
        self.check(nonce)?;
        if nonce > self.high {
            self.shift(nonce - self.high);
            self.high = nonce;
            self.bits[0] |= 1;
        } else {
            let d = self.high - nonce;
            self.bits[(d / 64) as usize] |= 1u64 << (d % 64);
        }
        Ok(())
    }

    /// Moves every bit `s` positions towards older nonces.
    fn shift(&mut self, s: u64) {
        if s >= self.width() {
            self.bits.iter_mut().for_each(|w| *w = 0);
            return;
        }
        let words = (s / 64) as usize;
        let bits = (s % 64) as u32;
        let n = self.bits.len();
        for i in (0..n).rev() {
            let src = i.checked_sub(words);
            let hi = src.map_or(0, |j| self.bits[j] << bits);
            let lo = match (bits, src.and_then(|j| j.checked_sub(1))) {
                (0, _) | (_, None) => 0,
                (b, Some(j)) => self.bits[j] >> (64 - b),
            };
            self.bits[i] = hi | lo;
        }
    }

    /// Compact form: `high` (8 bytes LE) then the bitmap words (8 bytes LE each).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.bits.len() * 8);
        out.extend_from_slice(&self.high.to_le_bytes());
        for w in &self.bits {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Parses [`NonceWindow::to_bytes`] output of any valid window size.
    pub fn from_bytes_any(bytes: &[u8]) -> Option<Self> {
        let words = bytes.len().checked_sub(8)? / 8;
        let window = u32::try_from(words * 64).ok()?;
        Self::from_bytes(bytes, window)
    }

    /// The window size in nonces.
    pub fn window(&self) -> u32 {
        (self.bits.len() * 64) as u32
    }

    /// Parses [`NonceWindow::to_bytes`] output for a window of `window` nonces.
    /// Returns `None` when the bytes do not have that shape.
    pub fn from_bytes(bytes: &[u8], window: u32) -> Option<Self> {
        let words = check_window(window).ok()?;
        if bytes.len() != 8 + words * 8 {
            return None;
        }
        let mut chunks = bytes.chunks_exact(8).map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_le_bytes(a)
        });
        let high = chunks.next()?;
        Some(NonceWindow {
            high,
            bits: chunks.collect(),
        })
    }
}

/// The replay state of every issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayGuard {
    window: u32,
    issuers: BTreeMap<String, NonceWindow>,
}

/// A serialisable copy of a [`ReplayGuard`], for persistence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplaySnapshot {
    /// Window size in nonces.
    pub window: u32,
    /// Per-issuer state.
    pub issuers: BTreeMap<String, NonceWindow>,
}

impl ReplayGuard {
    /// An empty guard with a window of `window` nonces per issuer.
    pub fn new(window: u32) -> Result<Self, BadWindow> {
        check_window(window)?;
        Ok(ReplayGuard {
            window,
            issuers: BTreeMap::new(),
        })
    }

    /// Whether `(issuer, nonce)` would be accepted, without recording it.
    pub fn check(&self, issuer: &str, nonce: u64) -> Result<(), Reject> {
        match self.issuers.get(issuer) {
            Some(w) => w.check(nonce),
            None if nonce == 0 => Err(Reject::new(Code::BadNonce, "nonce must be non-zero")),
            None => Ok(()),
        }
    }

    /// Accepts `(issuer, nonce)` once.
    pub fn accept(&mut self, issuer: &str, nonce: u64) -> Result<(), Reject> {
        if let Some(w) = self.issuers.get_mut(issuer) {
            return w.accept(nonce);
        }
        // The window size was validated in `new`/`restore`.
        let mut w = NonceWindow::new(self.window)
            .map_err(|e| Reject::with(Code::Malformed, e.to_string()))?;
        w.accept(nonce)?;
        self.issuers.insert(issuer.to_owned(), w);
        Ok(())
    }

    /// A copy of the state for persistence.
    pub fn snapshot(&self) -> ReplaySnapshot {
        ReplaySnapshot {
            window: self.window,
            issuers: self.issuers.clone(),
        }
    }

    /// Rebuilds a guard from a snapshot, checking its shape.
    pub fn restore(snap: ReplaySnapshot) -> Result<Self, BadWindow> {
        let words = check_window(snap.window)?;
        if snap.issuers.values().any(|w| w.bits.len() != words) {
            return Err(BadWindow(snap.window));
        }
        Ok(ReplayGuard {
            window: snap.window,
            issuers: snap.issuers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn accepts_once_in_and_out_of_order() {
        let mut w = NonceWindow::new(128).unwrap();
        assert_eq!(w.check(0).unwrap_err().code, Code::BadNonce);
        w.accept(10).unwrap();
        assert_eq!(w.accept(10).unwrap_err().code, Code::Replay);
        w.accept(7).unwrap();
        assert_eq!(w.accept(7).unwrap_err().code, Code::Replay);
        w.accept(200).unwrap();
        // 10 is now 190 below the high-water mark: outside a 128 window.
        assert_eq!(w.accept(10).unwrap_err().code, Code::Replay);
        assert_eq!(w.accept(8).unwrap_err().code, Code::Replay);
        // 73 = 200 - 127: the oldest slot still inside the window.
        w.accept(73).unwrap();
        assert_eq!(w.accept(72).unwrap_err().code, Code::Replay);
        assert_eq!(w.high(), 200);
    }

    #[test]
    fn huge_jumps_clear_the_window() {
        let mut w = NonceWindow::new(64).unwrap();
        w.accept(5).unwrap();
        w.accept(u64::MAX).unwrap();
        assert_eq!(w.accept(u64::MAX).unwrap_err().code, Code::Replay);
        w.accept(u64::MAX - 63).unwrap();
        assert_eq!(w.accept(u64::MAX - 64).unwrap_err().code, Code::Replay);
    }

    #[test]
    fn bad_windows_are_refused() {
        for bad in [0, 63, 65, MAX_WINDOW + 64] {
            assert_eq!(NonceWindow::new(bad), Err(BadWindow(bad)));
            assert!(ReplayGuard::new(bad).is_err());
        }
    }

    #[test]
    fn bytes_round_trip_and_reject_wrong_shapes() {
        let mut w = NonceWindow::new(128).unwrap();
        for n in [3, 90, 64, 1000, 999] {
            w.accept(n).unwrap();
        }
        let b = w.to_bytes();
        assert_eq!(NonceWindow::from_bytes(&b, 128), Some(w.clone()));
        assert_eq!(NonceWindow::from_bytes(&b, 64), None);
        assert_eq!(NonceWindow::from_bytes(&b[..b.len() - 1], 128), None);
        assert_eq!(NonceWindow::from_bytes_any(&b), Some(w.clone()));
        assert_eq!(NonceWindow::from_bytes_any(&b).unwrap().window(), 128);
        assert_eq!(NonceWindow::from_bytes_any(&b[..8]), None);
        assert_eq!(NonceWindow::from_bytes_any(&b[..b.len() - 1]), None);
        assert_eq!(NonceWindow::from_bytes_any(&[]), None);
    }

    #[test]
    fn guard_is_per_issuer_and_survives_snapshot() {
        let mut g = ReplayGuard::new(64).unwrap();
        g.accept("alice", 1).unwrap();
        g.accept("bob", 1).unwrap();
        assert_eq!(g.accept("alice", 1).unwrap_err().code, Code::Replay);
        let json = serde_json::to_string(&g.snapshot()).unwrap();
        let mut g2 = ReplayGuard::restore(serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(g2.accept("bob", 1).unwrap_err().code, Code::Replay);
        g2.accept("bob", 2).unwrap();
        assert_eq!(g2.check("carol", 0).unwrap_err().code, Code::BadNonce);
    }

    #[test]
    fn restore_rejects_inconsistent_snapshot() {
        let mut g = ReplayGuard::new(128).unwrap();
        g.accept("a", 1).unwrap();
        let mut snap = g.snapshot();
        snap.window = 64;
        assert!(ReplayGuard::restore(snap).is_err());
    }

    proptest! {
        // Against a model: a set of every accepted nonce and the running maximum.
        #[test]
        fn matches_reference_model(nonces in proptest::collection::vec(1u64..400, 1..300)) {
            let window = 64u64;
            let mut w = NonceWindow::new(window as u32).unwrap();
            let mut seen = BTreeSet::new();
            let mut high = 0u64;
            for n in nonces {
                let expect_ok = !seen.contains(&n) && (n > high || high - n < window);
                let got = w.accept(n);
                prop_assert_eq!(got.is_ok(), expect_ok, "nonce {} high {}", n, high);
                if expect_ok {
                    seen.insert(n);
                    high = high.max(n);
                }
            }
        }
    }
}
