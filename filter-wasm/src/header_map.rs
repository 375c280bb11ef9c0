//! The proxy-wasm header-map wire format: `u32 n`, then `n` pairs of `u32` key and
//! value lengths, then each key and value followed by a NUL. Parsing is strict and
//! never panics: host bytes are input too.
//!
//! A value that is not UTF-8 (Envoy's HTTP/1 and HTTP/2 codecs pass obs-text bytes
//! 0x80–0xFF, a `User-Agent: caf\xE9`) is read with each bad sequence replaced by
//! U+FFFD: one such header must not make every request a 503, a header the filter
//! reads (a token) fails its own check, and one it rewrites keeps the rest of its
//! text (a bearer offer next to a bad byte is still found and removed). A key must
//! be UTF-8 (the codecs allow only token characters in names).

use std::borrow::Cow;

/// Serialises pairs for the host.
pub fn serialize(pairs: &[(&str, &str)]) -> Vec<u8> {
    let size = 4 + pairs
        .iter()
        .map(|(k, v)| 8 + k.len() + v.len() + 2)
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

fn u32_at(b: &[u8], at: usize) -> Option<usize> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
}

/// Parses the host's serialised map; `None` when it is malformed.
pub fn parse(b: &[u8]) -> Option<Vec<(String, String)>> {
    let pairs = parse_borrowed(b)?;
    Some(
        pairs
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.into_owned()))
            .collect(),
    )
}

/// [`parse`] without copying (but for a value that is not UTF-8): the pairs
/// borrow from `b`.
pub fn parse_borrowed(b: &[u8]) -> Option<Vec<(&str, Cow<'_, str>)>> {
    if b.is_empty() {
        return Some(Vec::new());
    }
    let n = u32_at(b, 0)?;
    // Each pair needs at least 10 bytes: refuse counts the buffer cannot hold.
    if n > b.len() / 10 {
        return None;
    }
    let mut p = 4 + n * 8;
    let mut take = |len: usize| -> Option<&[u8]> {
        let end = p.checked_add(len)?;
        let s = b.get(p..end)?;
        if *b.get(end)? != 0 {
            return None;
        }
        p = end + 1;
        Some(s)
    };
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let o = 4 + i * 8;
        let (k, v) = (u32_at(b, o)?, u32_at(b, o + 4)?);
        let key = std::str::from_utf8(take(k)?).ok()?;
        let val = String::from_utf8_lossy(take(v)?);
        out.push((key, val));
    }
    Some(out)
}
