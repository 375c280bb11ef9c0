//! The edge's seal on what it stamped: an HMAC-SHA256, under a key only the edge
//! filter and the sidecar hold, over the stamped headers
//! ([`crate::contract::headers::STAMPED`]), the path the sidecar serves the request
//! at, and the time it stamped them.
//!
//! The sidecar takes requests from Envoy's client certificate only, but that says
//! which hop a request came over, not that the edge filter ran on it: an Envoy whose
//! chain lost the filter, or anyone else holding that certificate, could send any
//! `x-gw-*` identity. With the seal, the sidecar believes an identity only if the
//! filter, holding the key, wrote it in the last [`VALID_SECS`].
//!
//! What the seal does not do: it is not bound to the request's method, query or
//! body, nor used once. Whoever can read the Envoy→sidecar hop (mutual TLS) could
//! send the same identity to the same path again within [`VALID_SECS`] — on the
//! JSON control route, a command the sidecar signs in that identity's name. A
//! signed command's own signature and nonce still bind its body.
//!
//! The header value is `v1.<unix seconds>.<64 hex digits>`.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::contract::headers;

/// How far, in seconds, a seal's time may be from the checker's clock, either way:
/// Envoy holds a request at most its `request_timeout` (30 s) before the upstream
/// sees it, and the two clocks may differ a little.
pub const VALID_SECS: u64 = 60;

/// The version prefix of the header value.
const VERSION: &str = "v1";
/// Domain separation: this key seals stamps ...
const DOMAIN: &[u8] = b"gw-edge-stamp/v1\0";
/// ... and the filter's batches of edge reports, nothing else.
const REPORT_DOMAIN: &[u8] = b"gw-edge-report/v1\0";
/// The key's length, bytes.
pub const KEY_BYTES: usize = 32;

/// The key the filter seals with and the sidecar checks with, kept as HMAC's keyed
/// state (each seal starts from a copy: no key schedule per request). Never printed.
#[derive(Clone)]
pub struct EdgeKey(Hmac<Sha256>);

impl std::fmt::Debug for EdgeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EdgeKey(<secret>)")
    }
}

/// Why a key is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not 64 hex digits.
    #[error("the edge key must be {KEY_BYTES} bytes as {} hex digits", KEY_BYTES * 2)]
    Shape,
    /// Every byte zero: a placeholder, not a key.
    #[error("the edge key is all zeros")]
    Zero,
}

/// Why a seal is refused. The text says what, never the key or the expected value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StampError {
    /// Stamped headers but no seal.
    #[error("the edge's stamp has no seal (x-gw-stamp)")]
    Missing,
    /// A stamped header, or the seal, comes more than once.
    #[error("a header of the edge's stamp comes more than once")]
    Duplicate,
    /// `x-gw-*` headers the edge never sends with this request (a batch of edge
    /// reports carries its seal only).
    #[error("the request carries x-gw-* headers the edge never sends with it")]
    Stray,
    /// Not `v1.<seconds>.<64 hex digits>`.
    #[error("the edge's seal is not v1.<seconds>.<hex>")]
    Malformed,
    /// Sealed more than [`VALID_SECS`] from now, either way.
    #[error("the edge's seal is {0} s from this clock (at most {VALID_SECS} s)")]
    Stale(u64),
    /// The MAC does not verify: another key, or a stamped header changed.
    #[error("the edge's seal does not verify: another key, or a stamped header changed")]
    Mismatch,
}

impl EdgeKey {
    /// The key from its 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(s: &str) -> Result<EdgeKey, KeyError> {
        let mut key = Zeroizing::new([0u8; KEY_BYTES]);
        hex::decode_to_slice(s.trim(), &mut key[..]).map_err(|_| KeyError::Shape)?;
        if key.iter().all(|b| *b == 0) {
            return Err(KeyError::Zero);
        }
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(&key[..]).map_err(|_| KeyError::Shape)?;
        Ok(EdgeKey(mac))
    }

    /// The MAC over a report batch's `body`, sealed at `ts`.
    fn report_mac(&self, ts: u64, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.0.clone();
        mac.update(REPORT_DOMAIN);
        mac.update(&ts.to_be_bytes());
        mac.update(&(body.len() as u64).to_be_bytes());
        mac.update(body);
        mac
    }

    /// The seal's header value over a batch of edge reports (the body the filter
    /// posts to [`crate::contract::EDGE_DECISIONS_PATH`]), at `ts`.
    pub fn seal_report(&self, ts: u64, body: &[u8]) -> String {
        header_value(ts, self.report_mac(ts, body))
    }

    /// Checks a report batch's seal, as [`EdgeKey::check`] a stamp's.
    pub fn check_report(
        &self,
        seal: Option<&str>,
        now: u64,
        body: &[u8],
    ) -> Result<(), StampError> {
        let (ts, tag) = parse(seal, now)?;
        self.report_mac(ts, body)
            .verify_slice(&tag)
            .map_err(|_| StampError::Mismatch)
    }

    /// The MAC over the stamped headers read through `get` (by lowercase name) of
    /// a request to `path` (the sidecar's, without the query), sealed at `ts`.
    fn mac<'a>(&self, ts: u64, path: &str, get: impl Fn(&str) -> Option<&'a str>) -> Hmac<Sha256> {
        let mut mac = self.0.clone();
        mac.update(DOMAIN);
        mac.update(&ts.to_be_bytes());
        mac.update(&(path.len() as u64).to_be_bytes());
        mac.update(path.as_bytes());
        // Each header in the contract's order: absent, or present with its length
        // and bytes (so no two stamps write the same input).
        for name in headers::STAMPED {
            match get(name) {
                None => mac.update(&[0]),
                Some(v) => {
                    mac.update(&[1]);
                    mac.update(&(v.len() as u64).to_be_bytes());
                    mac.update(v.as_bytes());
                }
            }
        }
        mac
    }

    /// The seal's header value over the headers `get` reads of a request to
    /// `path` (the path the sidecar serves it at, without the query), at `ts`
    /// (unix seconds).
    pub fn seal<'a>(&self, ts: u64, path: &str, get: impl Fn(&str) -> Option<&'a str>) -> String {
        header_value(ts, self.mac(ts, path, get))
    }

    /// Checks `seal` (the header value) over the headers `get` reads of a request
    /// to `path` (without the query), at `now` (unix seconds). The MAC is compared
    /// in constant time.
    pub fn check<'a>(
        &self,
        seal: Option<&str>,
        now: u64,
        path: &str,
        get: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<(), StampError> {
        let (ts, tag) = parse(seal, now)?;
        self.mac(ts, path, get)
            .verify_slice(&tag)
            .map_err(|_| StampError::Mismatch)
    }
}

/// The header value of a seal made at `ts` with `mac`: `v1.<ts>.<hex>`.
fn header_value(ts: u64, mac: Hmac<Sha256>) -> String {
    format!(
        "{VERSION}.{ts}.{}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// Whether `seal` has the shape of one and a time within [`VALID_SECS`] of `now`
/// (what can be checked before reading what it seals).
pub fn timely(seal: Option<&str>, now: u64) -> Result<(), StampError> {
    parse(seal, now).map(|_| ())
}

/// A seal's time and MAC, once its shape and its time (within [`VALID_SECS`] of
/// `now`) are right.
fn parse(seal: Option<&str>, now: u64) -> Result<(u64, [u8; 32]), StampError> {
    let seal = seal.ok_or(StampError::Missing)?;
    let mut parts = seal.split('.');
    let (Some(VERSION), Some(ts), Some(tag_hex), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(StampError::Malformed);
    };
    // Digits only: `parse` alone would take a leading '+'.
    if ts.is_empty() || ts.len() > 20 || !ts.bytes().all(|b| b.is_ascii_digit()) {
        return Err(StampError::Malformed);
    }
    let ts: u64 = ts.parse().map_err(|_| StampError::Malformed)?;
    let mut tag = [0u8; 32];
    hex::decode_to_slice(tag_hex, &mut tag).map_err(|_| StampError::Malformed)?;
    let off = now.abs_diff(ts);
    if off > VALID_SECS {
        return Err(StampError::Stale(off));
    }
    Ok((ts, tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;
    const PATH: &str = "/api/modules";

    fn key(b: u8) -> EdgeKey {
        EdgeKey::from_hex(&hex::encode([b; 32])).unwrap()
    }

    fn stamped() -> Vec<(&'static str, &'static str)> {
        vec![
            (headers::SUB, "alice"),
            (headers::ROLES, "admin"),
            (headers::TOKEN_ISSUER, "defi-dashboard"),
            (headers::VERIFIED, "jwt"),
        ]
    }

    fn getter<'a>(h: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> + 'a {
        move |n| h.iter().find(|(k, _)| *k == n).map(|(_, v)| *v)
    }

    #[test]
    fn a_seal_checks_under_its_key_within_its_window_only() {
        let h = stamped();
        let seal = key(7).seal(NOW, PATH, getter(&h));
        assert!(seal.starts_with(&format!("v1.{NOW}.")));
        assert_eq!(seal.len(), "v1.".len() + 10 + 1 + 64);
        assert_eq!(key(7).check(Some(&seal), NOW, PATH, getter(&h)), Ok(()));
        assert_eq!(
            key(7).check(Some(&seal), NOW + VALID_SECS, PATH, getter(&h)),
            Ok(())
        );
        assert_eq!(
            key(7).check(Some(&seal), NOW - VALID_SECS, PATH, getter(&h)),
            Ok(())
        );
        assert_eq!(
            key(7).check(Some(&seal), NOW + VALID_SECS + 1, PATH, getter(&h)),
            Err(StampError::Stale(VALID_SECS + 1))
        );
        assert_eq!(
            key(7).check(Some(&seal), NOW - VALID_SECS - 1, PATH, getter(&h)),
            Err(StampError::Stale(VALID_SECS + 1))
        );
        assert_eq!(
            key(8).check(Some(&seal), NOW, PATH, getter(&h)),
            Err(StampError::Mismatch)
        );
        // Another path: a seal of a read is no seal of a control route.
        assert_eq!(
            key(7).check(Some(&seal), NOW, "/api/control/module/mev:stop", getter(&h)),
            Err(StampError::Mismatch)
        );
        assert_eq!(
            key(7).check(None, NOW, PATH, getter(&h)),
            Err(StampError::Missing)
        );
    }

    #[test]
    fn every_stamped_header_is_sealed_and_absent_differs_from_empty() {
        let h = stamped();
        let seal = key(7).seal(NOW, PATH, getter(&h));
        for name in headers::STAMPED {
            // Changed, added, or removed: each is refused.
            let mut changed: Vec<(&str, &str)> =
                h.iter().copied().filter(|(k, _)| *k != name).collect();
            changed.push((name, "admin2"));
            assert_eq!(
                key(7).check(Some(&seal), NOW, PATH, getter(&changed)),
                Err(StampError::Mismatch),
                "{name} changed or added"
            );
            let mut empty: Vec<(&str, &str)> =
                h.iter().copied().filter(|(k, _)| *k != name).collect();
            empty.push((name, ""));
            assert_eq!(
                key(7).check(Some(&seal), NOW, PATH, getter(&empty)),
                Err(StampError::Mismatch),
                "{name} empty"
            );
            if h.iter().any(|(k, _)| *k == name) {
                let removed: Vec<(&str, &str)> =
                    h.iter().copied().filter(|(k, _)| *k != name).collect();
                assert_eq!(
                    key(7).check(Some(&seal), NOW, PATH, getter(&removed)),
                    Err(StampError::Mismatch),
                    "{name} removed"
                );
            }
        }
        // Another time under the same MAC.
        let moved = seal.replacen(&NOW.to_string(), &(NOW + 1).to_string(), 1);
        assert_eq!(
            key(7).check(Some(&moved), NOW, PATH, getter(&h)),
            Err(StampError::Mismatch)
        );
    }

    #[test]
    fn malformed_seals_and_keys_are_refused() {
        let h = stamped();
        let good = key(7).seal(NOW, PATH, getter(&h));
        let tag = good.rsplit('.').next().unwrap().to_owned();
        for bad in [
            String::new(),
            "v1".into(),
            format!("v2.{NOW}.{tag}"),
            format!("v1.+{NOW}.{tag}"),
            format!("v1..{tag}"),
            format!("v1.{NOW}.{}", &tag[..62]),
            format!("v1.{NOW}.{tag}00"),
            format!("v1.{NOW}.{tag}.x"),
            format!("v1.99999999999999999999999.{tag}"),
            format!("v1.{NOW}.{}", "zz".repeat(32)),
        ] {
            assert_eq!(
                key(7).check(Some(&bad), NOW, PATH, getter(&h)),
                Err(StampError::Malformed),
                "{bad:?}"
            );
        }
        assert_eq!(EdgeKey::from_hex("00").unwrap_err(), KeyError::Shape);
        assert_eq!(
            EdgeKey::from_hex(&"0".repeat(64)).unwrap_err(),
            KeyError::Zero
        );
        assert_eq!(
            EdgeKey::from_hex(&"g".repeat(64)).unwrap_err(),
            KeyError::Shape
        );
        assert!(EdgeKey::from_hex(&format!(" {}\n", "ab".repeat(32))).is_ok());
        assert_eq!(format!("{:?}", key(7)), "EdgeKey(<secret>)");
    }

    #[test]
    fn a_report_batch_is_sealed_with_its_body_and_apart_from_stamps() {
        let body = br#"[{"decision":"rejected"}]"#;
        let seal = key(7).seal_report(NOW, body);
        assert_eq!(key(7).check_report(Some(&seal), NOW + 30, body), Ok(()));
        assert_eq!(
            key(7).check_report(Some(&seal), NOW, br#"[{"decision":"rejectes"}]"#),
            Err(StampError::Mismatch)
        );
        assert_eq!(
            key(8).check_report(Some(&seal), NOW, body),
            Err(StampError::Mismatch)
        );
        assert_eq!(
            key(7).check_report(Some(&seal), NOW + VALID_SECS + 1, body),
            Err(StampError::Stale(VALID_SECS + 1))
        );
        assert_eq!(
            key(7).check_report(None, NOW, body),
            Err(StampError::Missing)
        );
        // A stamp's seal is no report's, nor the other way round.
        let none = |_: &str| None;
        let stamp = key(7).seal(NOW, PATH, none);
        assert_eq!(
            key(7).check_report(Some(&stamp), NOW, b""),
            Err(StampError::Mismatch)
        );
        let report = key(7).seal_report(NOW, b"");
        assert_eq!(
            key(7).check(Some(&report), NOW, PATH, none),
            Err(StampError::Mismatch)
        );
    }

    #[test]
    fn the_seal_matches_an_independent_implementation_of_the_documented_input() {
        // Python's hmac over the layout in docs/architecture.md: DOMAIN, ts as 8
        // bytes big-endian, the path's length as 8 bytes big-endian and its bytes,
        // then per STAMPED header 0 (absent) or 1, its length as 8 bytes
        // big-endian, its bytes. Key = 32 bytes of 7, ts = 1 800 000 000, path
        // `/api/modules`, roles `viewer`, verified `jwt`.
        let h = [(headers::ROLES, "viewer"), (headers::VERIFIED, "jwt")];
        assert_eq!(
            key(7).seal(NOW, PATH, getter(&h)),
            format!("v1.{NOW}.ad679356760bdf1f98b4ffb84af571a98da7c2a1b50daa76d7bb795d057a8ffd")
        );
    }
}
