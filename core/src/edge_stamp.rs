//! The edge's seal on what it stamped: an HMAC-SHA256, under a key only the edge
//! filter and the sidecar hold, over the stamped headers
//! ([`crate::contract::headers::STAMPED`]), the request's method, the path the
//! sidecar serves it at, the time it stamped them and a nonce.
//!
//! The sidecar takes requests from Envoy's client certificate only, but that says
//! which hop a request came over, not that the edge filter ran on it: an Envoy whose
//! chain lost the filter, or anyone else holding that certificate, could send any
//! `x-gw-*` identity. With the seal, the sidecar believes an identity only if the
//! filter, holding the key, wrote it in the last [`VALID_SECS`] for this method and
//! path, and only once: the sidecar remembers each seal's nonce while its time is
//! within the window ([`Seen`]) and refuses it a second time, and a seal made
//! before the sidecar started.
//!
//! What the seal does not do: it is not bound to the request's query or body. A
//! request the hop changed in flight (which takes breaking its mutual TLS, not
//! reading it) could carry another body under the same seal once; a signed
//! command's own signature and nonce still bind its body.
//!
//! The header value is `v2.<unix seconds>.<32 hex digits: nonce>.<64 hex digits>`.

use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::contract::headers;

/// How far, in seconds, a seal's time may be from the checker's clock, either way:
/// Envoy holds a request at most its `request_timeout` (30 s) before the upstream
/// sees it, and the two clocks may differ a little.
pub const VALID_SECS: u64 = 60;

/// The version prefix of the header value.
const VERSION: &str = "v2";
/// Domain separation: this key seals stamps ...
const DOMAIN: &[u8] = b"gw-edge-stamp/v2\0";
/// ... and the filter's batches of edge reports, nothing else.
const REPORT_DOMAIN: &[u8] = b"gw-edge-report/v2\0";
/// The key's length, bytes.
pub const KEY_BYTES: usize = 32;
/// A seal's nonce length, bytes.
pub const NONCE_BYTES: usize = 16;

/// A seal's nonce: unique per seal under a key.
pub type Nonce = [u8; NONCE_BYTES];

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
    /// Not `v2.<seconds>.<32 hex digits>.<64 hex digits>`.
    #[error("the edge's seal is not v2.<seconds>.<nonce>.<hex> (an older filter?)")]
    Malformed,
    /// Sealed more than [`VALID_SECS`] from now, either way.
    #[error("the edge's seal is {0} s from this clock (at most {VALID_SECS} s)")]
    Stale(u64),
    /// The MAC does not verify: another key, or a stamped header, the method or
    /// the path changed.
    #[error("the edge's seal does not verify: another key, or what it seals changed")]
    Mismatch,
    /// The seal came before: each is good once.
    #[error("the edge's seal was used before (each is good once)")]
    Reused,
    /// Made before the second the checker started in, which cannot know whether
    /// it was used: a new seal is good.
    #[error("the edge's seal was made before this sidecar started: send the request again")]
    BeforeStart,
    /// The checker remembers as many seals as it may ([`Seen`]).
    #[error("the sidecar remembers as many of the edge's seals as it may: retry shortly")]
    NoRoom,
}

/// What a stamp's seal binds besides the stamped headers: the request's method
/// and the path the sidecar serves it at, without the query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    /// The HTTP method, as sent (`GET`, `POST`).
    pub method: &'a str,
    /// The sidecar's path, without the query.
    pub path: &'a str,
}

/// A seal that verified: when it was made, and its nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    /// Unix seconds.
    pub ts: u64,
    /// Unique per seal ([`Nonces`]).
    pub nonce: Nonce,
}

/// A sealer's nonces: its random origin, then a counter (unique per seal as long
/// as no two sealers draw the same origin).
#[derive(Debug)]
pub struct Nonces {
    origin: u64,
    next: Cell<u64>,
}

impl Nonces {
    /// Nonces starting from `origin` (random per sealer: per VM in the filter).
    pub fn new(origin: u64) -> Nonces {
        Nonces {
            origin,
            next: Cell::new(0),
        }
    }

    /// The next nonce.
    pub fn next(&self) -> Nonce {
        let n = self.next.get();
        self.next.set(n.wrapping_add(1));
        let mut out = [0u8; NONCE_BYTES];
        out[..8].copy_from_slice(&self.origin.to_be_bytes());
        out[8..].copy_from_slice(&n.to_be_bytes());
        out
    }
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

    /// A MAC under `domain` begun with the seal's time and nonce.
    fn begin(&self, domain: &[u8], ts: u64, nonce: &Nonce) -> Hmac<Sha256> {
        let mut mac = self.0.clone();
        mac.update(domain);
        mac.update(&ts.to_be_bytes());
        mac.update(nonce);
        mac
    }

    /// The MAC over a report batch's `body`, sealed at `ts` with `nonce`.
    fn report_mac(&self, ts: u64, nonce: &Nonce, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.begin(REPORT_DOMAIN, ts, nonce);
        put(&mut mac, body);
        mac
    }

    /// The seal's header value over a batch of edge reports (the body the filter
    /// posts to [`crate::contract::EDGE_DECISIONS_PATH`]), at `ts` with `nonce`.
    pub fn seal_report(&self, ts: u64, nonce: &Nonce, body: &[u8]) -> String {
        header_value(ts, nonce, self.report_mac(ts, nonce, body))
    }

    /// Checks a report batch's seal, as [`EdgeKey::check`] a stamp's.
    pub fn check_report(
        &self,
        seal: Option<&str>,
        now: u64,
        body: &[u8],
    ) -> Result<Sealed, StampError> {
        let (sealed, tag) = parse(seal, now)?;
        self.report_mac(sealed.ts, &sealed.nonce, body)
            .verify_slice(&tag)
            .map_err(|_| StampError::Mismatch)?;
        Ok(sealed)
    }

    /// The MAC over the stamped headers read through `get` (by lowercase name) of
    /// a request to `target`, sealed at `ts` with `nonce`.
    fn mac<'a>(
        &self,
        ts: u64,
        nonce: &Nonce,
        target: Target<'_>,
        get: impl Fn(&str) -> Option<&'a str>,
    ) -> Hmac<Sha256> {
        let mut mac = self.begin(DOMAIN, ts, nonce);
        put(&mut mac, sealed_method(target.method).as_bytes());
        put(&mut mac, target.path.as_bytes());
        // Each header in the contract's order: absent, or present with its length
        // and bytes (so no two stamps write the same input).
        for name in headers::STAMPED {
            match get(name) {
                None => mac.update(&[0]),
                Some(v) => {
                    mac.update(&[1]);
                    put(&mut mac, v.as_bytes());
                }
            }
        }
        mac
    }

    /// The seal's header value over the headers `get` reads of a request to
    /// `target`, at `ts` (unix seconds) with `nonce` (a new one per seal).
    pub fn seal<'a>(
        &self,
        ts: u64,
        nonce: &Nonce,
        target: Target<'_>,
        get: impl Fn(&str) -> Option<&'a str>,
    ) -> String {
        header_value(ts, nonce, self.mac(ts, nonce, target, get))
    }

    /// Checks `seal` (the header value) over the headers `get` reads of a request
    /// to `target`, at `now` (unix seconds). The MAC is compared in constant time.
    /// That it is used once is [`Seen`]'s to say.
    pub fn check<'a>(
        &self,
        seal: Option<&str>,
        now: u64,
        target: Target<'_>,
        get: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<Sealed, StampError> {
        let (sealed, tag) = parse(seal, now)?;
        self.mac(sealed.ts, &sealed.nonce, target, get)
            .verify_slice(&tag)
            .map_err(|_| StampError::Mismatch)?;
        Ok(sealed)
    }
}

/// The method as sealed: a WebSocket's opening is a `GET` over HTTP/1.1 and a
/// `CONNECT` over HTTP/2 (RFC 8441), and Envoy turns one into the other between
/// its hops (a client's `GET` reaches the sidecar as a `CONNECT`): both are sealed
/// as `GET`. Every other method as it is.
fn sealed_method(method: &str) -> &str {
    if method == "CONNECT" {
        "GET"
    } else {
        method
    }
}

/// `bytes` into `mac`, after their length as 8 bytes big-endian.
fn put(mac: &mut Hmac<Sha256>, bytes: &[u8]) {
    mac.update(&(bytes.len() as u64).to_be_bytes());
    mac.update(bytes);
}

/// The header value of a seal made at `ts` with `nonce` and `mac`.
fn header_value(ts: u64, nonce: &Nonce, mac: Hmac<Sha256>) -> String {
    format!(
        "{VERSION}.{ts}.{}.{}",
        hex::encode(nonce),
        hex::encode(mac.finalize().into_bytes())
    )
}

/// Whether `seal` has the shape of one and a time within [`VALID_SECS`] of `now`
/// (what can be checked before reading what it seals).
pub fn timely(seal: Option<&str>, now: u64) -> Result<(), StampError> {
    parse(seal, now).map(|_| ())
}

/// A seal's time, nonce and MAC, once its shape and its time (within
/// [`VALID_SECS`] of `now`) are right.
fn parse(seal: Option<&str>, now: u64) -> Result<(Sealed, [u8; 32]), StampError> {
    let seal = seal.ok_or(StampError::Missing)?;
    let mut parts = seal.split('.');
    let (Some(VERSION), Some(ts), Some(nonce_hex), Some(tag_hex), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(StampError::Malformed);
    };
    let ts = crate::contract::decimal_u64(ts).ok_or(StampError::Malformed)?;
    let mut nonce = [0u8; NONCE_BYTES];
    hex::decode_to_slice(nonce_hex, &mut nonce).map_err(|_| StampError::Malformed)?;
    let mut tag = [0u8; 32];
    hex::decode_to_slice(tag_hex, &mut tag).map_err(|_| StampError::Malformed)?;
    let off = now.abs_diff(ts);
    if off > VALID_SECS {
        return Err(StampError::Stale(off));
    }
    Ok((Sealed { ts, nonce }, tag))
}

/// The seals a checker has believed while they are within [`VALID_SECS`] of its
/// clock (after that, [`EdgeKey::check`] refuses them as stale), at most a bound
/// of them: each seal is believed once.
///
/// Its clock is the latest it was told: a seal is forgotten once it is stale at
/// that time, and from then on refused as stale whatever time a caller that
/// read the clock earlier (or a clock stepped back) says.
#[derive(Debug)]
pub struct Seen {
    /// Nonces by the seal's time.
    by_ts: BTreeMap<u64, HashSet<Nonce>>,
    len: usize,
    max: usize,
    /// Seals made before it are refused (`None`: no longer).
    since: Option<u64>,
    /// The latest time [`Seen::first_use`] was given.
    high: u64,
}

impl Seen {
    /// Remembers at most `max` seals; refuses those made before `since` (unix
    /// seconds: the second the checker started in, not knowing which seals its
    /// predecessor believed) until [`Seen::forget_start`]. (A seal of that very
    /// second is believed: the seal's time has no finer grain, and refusing
    /// the first second's new seals would refuse every request sent right
    /// after a start.)
    pub fn new(since: u64, max: usize) -> Seen {
        Seen {
            by_ts: BTreeMap::new(),
            len: 0,
            max,
            since: Some(since),
            high: 0,
        }
    }

    /// Seals made before the start are refused no more (once every one of them
    /// is stale: the checker says when, by its own monotonic clock, so that a
    /// wall clock stepped back does not refuse new seals).
    pub fn forget_start(&mut self) {
        self.since = None;
    }

    /// The seals remembered now.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `sealed` (a seal that verified at `now`) is used now: `Ok` the first
    /// time; refused when it is stale at the latest time this was given, came
    /// before, was made before [`Seen::new`]'s `since`, or there is no
    /// room. Seals past their window are forgotten first.
    pub fn first_use(&mut self, sealed: Sealed, now: u64) -> Result<(), StampError> {
        self.high = self.high.max(now);
        while let Some(entry) = self.by_ts.first_entry() {
            if entry.key().saturating_add(VALID_SECS) >= self.high {
                break;
            }
            self.len -= entry.remove().len();
        }
        // Forgotten, or as good as: stale at the latest time.
        if sealed.ts.saturating_add(VALID_SECS) < self.high {
            return Err(StampError::Stale(self.high - sealed.ts));
        }
        if self.since.is_some_and(|since| sealed.ts < since) {
            return Err(StampError::BeforeStart);
        }
        if self
            .by_ts
            .get(&sealed.ts)
            .is_some_and(|b| b.contains(&sealed.nonce))
        {
            return Err(StampError::Reused);
        }
        if self.len >= self.max {
            return Err(StampError::NoRoom);
        }
        self.by_ts
            .entry(sealed.ts)
            .or_default()
            .insert(sealed.nonce);
        self.len += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;
    const PATH: &str = "/api/modules";
    const GET: Target<'static> = Target {
        method: "GET",
        path: PATH,
    };
    const N: Nonce = [9; NONCE_BYTES];

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
        let seal = key(7).seal(NOW, &N, GET, getter(&h));
        assert!(seal.starts_with(&format!("v2.{NOW}.{}.", hex::encode(N))));
        assert_eq!(seal.len(), "v2.".len() + 10 + 1 + 32 + 1 + 64);
        let ok = Ok(Sealed { ts: NOW, nonce: N });
        assert_eq!(key(7).check(Some(&seal), NOW, GET, getter(&h)), ok);
        assert_eq!(
            key(7).check(Some(&seal), NOW + VALID_SECS, GET, getter(&h)),
            ok
        );
        assert_eq!(
            key(7).check(Some(&seal), NOW - VALID_SECS, GET, getter(&h)),
            ok
        );
        assert_eq!(
            key(7).check(Some(&seal), NOW + VALID_SECS + 1, GET, getter(&h)),
            Err(StampError::Stale(VALID_SECS + 1))
        );
        assert_eq!(
            key(7).check(Some(&seal), NOW - VALID_SECS - 1, GET, getter(&h)),
            Err(StampError::Stale(VALID_SECS + 1))
        );
        assert_eq!(
            key(8).check(Some(&seal), NOW, GET, getter(&h)),
            Err(StampError::Mismatch)
        );
        // Another path, or another method: a seal of a read is no seal of a
        // control route.
        let other_path = Target {
            method: "GET",
            path: "/api/control/module/mev:stop",
        };
        let post = Target {
            method: "POST",
            path: PATH,
        };
        for target in [other_path, post] {
            assert_eq!(
                key(7).check(Some(&seal), NOW, target, getter(&h)),
                Err(StampError::Mismatch),
                "{target:?}"
            );
        }
        // A WebSocket's opening, a GET on one hop and an HTTP/2 CONNECT on the
        // next: one seal.
        let connect = Target {
            method: "CONNECT",
            path: PATH,
        };
        assert_eq!(key(7).check(Some(&seal), NOW, connect, getter(&h)), ok);
        // Another nonce under the same MAC.
        let renonced = seal.replacen(&hex::encode(N), &hex::encode([8u8; NONCE_BYTES]), 1);
        assert_eq!(
            key(7).check(Some(&renonced), NOW, GET, getter(&h)),
            Err(StampError::Mismatch)
        );
        assert_eq!(
            key(7).check(None, NOW, GET, getter(&h)),
            Err(StampError::Missing)
        );
    }

    #[test]
    fn every_stamped_header_is_sealed_and_absent_differs_from_empty() {
        let h = stamped();
        let seal = key(7).seal(NOW, &N, GET, getter(&h));
        for name in headers::STAMPED {
            // Changed, added, or removed: each is refused.
            let mut changed: Vec<(&str, &str)> =
                h.iter().copied().filter(|(k, _)| *k != name).collect();
            changed.push((name, "admin2"));
            assert_eq!(
                key(7).check(Some(&seal), NOW, GET, getter(&changed)),
                Err(StampError::Mismatch),
                "{name} changed or added"
            );
            let mut empty: Vec<(&str, &str)> =
                h.iter().copied().filter(|(k, _)| *k != name).collect();
            empty.push((name, ""));
            assert_eq!(
                key(7).check(Some(&seal), NOW, GET, getter(&empty)),
                Err(StampError::Mismatch),
                "{name} empty"
            );
            if h.iter().any(|(k, _)| *k == name) {
                let removed: Vec<(&str, &str)> =
                    h.iter().copied().filter(|(k, _)| *k != name).collect();
                assert_eq!(
                    key(7).check(Some(&seal), NOW, GET, getter(&removed)),
                    Err(StampError::Mismatch),
                    "{name} removed"
                );
            }
        }
        // Another time under the same MAC.
        let moved = seal.replacen(&NOW.to_string(), &(NOW + 1).to_string(), 1);
        assert_eq!(
            key(7).check(Some(&moved), NOW, GET, getter(&h)),
            Err(StampError::Mismatch)
        );
    }

    #[test]
    fn malformed_seals_and_keys_are_refused() {
        let h = stamped();
        let good = key(7).seal(NOW, &N, GET, getter(&h));
        let tag = good.rsplit('.').next().unwrap().to_owned();
        let n = hex::encode(N);
        for bad in [
            String::new(),
            "v2".into(),
            // The version before: no nonce.
            format!("v1.{NOW}.{tag}"),
            format!("v1.{NOW}.{n}.{tag}"),
            format!("v2.{NOW}.{tag}"),
            format!("v2.+{NOW}.{n}.{tag}"),
            format!("v2..{n}.{tag}"),
            format!("v2.{NOW}..{tag}"),
            format!("v2.{NOW}.{}.{tag}", &n[..30]),
            format!("v2.{NOW}.{n}00.{tag}"),
            format!("v2.{NOW}.{n}.{}", &tag[..62]),
            format!("v2.{NOW}.{n}.{tag}00"),
            format!("v2.{NOW}.{n}.{tag}.x"),
            format!("v2.99999999999999999999999.{n}.{tag}"),
            format!("v2.{NOW}.{n}.{}", "zz".repeat(32)),
            format!("v2.{NOW}.{}.{tag}", "zz".repeat(16)),
        ] {
            assert_eq!(
                key(7).check(Some(&bad), NOW, GET, getter(&h)),
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
        let seal = key(7).seal_report(NOW, &N, body);
        assert_eq!(
            key(7).check_report(Some(&seal), NOW + 30, body),
            Ok(Sealed { ts: NOW, nonce: N })
        );
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
        let stamp = key(7).seal(NOW, &N, GET, none);
        assert_eq!(
            key(7).check_report(Some(&stamp), NOW, b""),
            Err(StampError::Mismatch)
        );
        let report = key(7).seal_report(NOW, &N, b"");
        assert_eq!(
            key(7).check(Some(&report), NOW, GET, none),
            Err(StampError::Mismatch)
        );
    }

    #[test]
    fn the_seal_matches_an_independent_implementation_of_the_documented_input() {
        // Python's hmac over the layout in docs/architecture.md: DOMAIN, ts as 8
        // bytes big-endian, the 16-byte nonce, the method's then the path's
        // length as 8 bytes big-endian and its bytes, then per STAMPED header 0
        // (absent) or 1, its length as 8 bytes big-endian, its bytes. Key = 32
        // bytes of 7, ts = 1 800 000 000, nonce 16 bytes of 9, `GET`,
        // `/api/modules`, roles `viewer`, verified `jwt`.
        let h = [(headers::ROLES, "viewer"), (headers::VERIFIED, "jwt")];
        let n = hex::encode(N);
        assert_eq!(
            key(7).seal(NOW, &N, GET, getter(&h)),
            format!(
                "v2.{NOW}.{n}.cf430c3cb7cce1dbdf643fe767e48277ff2ca0e573b099808511f80e1f45f011"
            )
        );
        // A report batch: the report domain, ts, nonce, the body's length and
        // bytes (`[]`).
        assert_eq!(
            key(7).seal_report(NOW, &N, b"[]"),
            format!(
                "v2.{NOW}.{n}.0e303c96c548c22d504a75a7586bd9d0059f5dc78fc0149b14c8f53155a24299"
            )
        );
    }

    #[test]
    fn nonces_are_unique_per_sealer_and_start_with_its_origin() {
        let a = Nonces::new(0x0102_0304_0506_0708);
        let first = a.next();
        assert_eq!(&first[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        let all: HashSet<Nonce> = std::iter::once(first)
            .chain((0..999).map(|_| a.next()))
            .collect();
        assert_eq!(all.len(), 1000);
        assert_ne!(Nonces::new(1).next(), Nonces::new(2).next());
    }

    fn sealed(ts: u64, n: u8) -> Sealed {
        Sealed {
            ts,
            nonce: [n; NONCE_BYTES],
        }
    }

    #[test]
    fn a_seal_is_believed_once_and_forgotten_only_once_it_is_stale() {
        let mut seen = Seen::new(NOW - 1, 100);
        assert_eq!(seen.first_use(sealed(NOW, 1), NOW), Ok(()));
        assert_eq!(
            seen.first_use(sealed(NOW, 1), NOW + 1),
            Err(StampError::Reused)
        );
        // Another nonce, or the same nonce at another time (another seal).
        assert_eq!(seen.first_use(sealed(NOW, 2), NOW + 1), Ok(()));
        assert_eq!(seen.first_use(sealed(NOW + 1, 1), NOW + 1), Ok(()));
        assert_eq!(seen.len(), 3);
        // Still remembered at the last second its seal is timely ...
        assert_eq!(
            seen.first_use(sealed(NOW, 1), NOW + VALID_SECS),
            Err(StampError::Reused)
        );
        assert_eq!(seen.len(), 3);
        // ... forgotten after it, when the check would call it stale.
        assert_eq!(
            seen.first_use(sealed(NOW + 2, 3), NOW + VALID_SECS + 1),
            Ok(())
        );
        assert_eq!(seen.len(), 2);
        // Once forgotten, refused as stale even by a caller whose clock was
        // read before (a slow body) or stepped back: it would be believed again.
        assert_eq!(
            seen.first_use(sealed(NOW, 1), NOW + 30),
            Err(StampError::Stale(VALID_SECS + 1))
        );
        // Made before the second the checker started in; then, once told to,
        // no longer refused for that.
        let mut fresh = Seen::new(NOW, 100);
        assert_eq!(
            fresh.first_use(sealed(NOW - 1, 1), NOW),
            Err(StampError::BeforeStart)
        );
        assert_eq!(fresh.first_use(sealed(NOW, 1), NOW), Ok(()));
        fresh.forget_start();
        assert_eq!(fresh.first_use(sealed(NOW - 1, 1), NOW + 1), Ok(()));
    }

    #[test]
    fn a_full_memory_refuses_new_seals_until_old_ones_go_stale() {
        let mut seen = Seen::new(NOW - 1, 3);
        for n in 0..3 {
            assert_eq!(seen.first_use(sealed(NOW, n), NOW), Ok(()));
        }
        assert_eq!(seen.first_use(sealed(NOW, 9), NOW), Err(StampError::NoRoom));
        // A seal it holds is still refused as used, not as no room.
        assert_eq!(seen.first_use(sealed(NOW, 0), NOW), Err(StampError::Reused));
        assert_eq!(
            seen.first_use(sealed(NOW + VALID_SECS + 1, 9), NOW + VALID_SECS + 1),
            Ok(())
        );
        assert_eq!(seen.len(), 1);
        assert!(!seen.is_empty());
    }
}
