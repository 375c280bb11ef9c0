//! The proxy-wasm header-map wire format: `u32 n`, then `n` pairs of `u32` key and
//! value lengths, then each key and value followed by a NUL. Parsing is strict and
//! never panics: host bytes are input too.

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
    if b.is_empty() {
        return Some(Vec::new());
    }
    let n = u32_at(b, 0)?;
    // Each pair needs at least 10 bytes: refuse counts the buffer cannot hold.
    if n > b.len() / 10 {
        return None;
    }
    let mut sizes = Vec::with_capacity(n);
    for i in 0..n {
        let o = 4 + i * 8;
        sizes.push((u32_at(b, o)?, u32_at(b, o + 4)?));
    }
    let mut p = 4 + n * 8;
    let mut out = Vec::with_capacity(n);
    let mut take = |len: usize| -> Option<String> {
        let end = p.checked_add(len)?;
        let s = std::str::from_utf8(b.get(p..end)?).ok()?.to_owned();
        if *b.get(end)? != 0 {
            return None;
        }
        p = end + 1;
        Some(s)
    };
    for (k, v) in sizes {
        let key = take(k)?;
        let val = take(v)?;
        out.push((key, val));
    }
    Some(out)
}
