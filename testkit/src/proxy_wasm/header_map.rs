//! The host's side of the proxy-wasm header-map encoding: `u32 n`, `n` pairs of
//! `u32` key and value lengths, then each key and value followed by a NUL.

fn u32_le(n: usize) -> [u8; 4] {
    u32::try_from(n).expect("header map fits u32").to_le_bytes()
}

/// Encodes pairs for the guest.
pub fn serialize(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = u32_le(pairs.len()).to_vec();
    for (k, v) in pairs {
        out.extend_from_slice(&u32_le(k.len()));
        out.extend_from_slice(&u32_le(v.len()));
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Decodes what the guest sent; `None` when it is malformed.
pub fn parse(b: &[u8]) -> Option<Vec<(String, String)>> {
    if b.is_empty() {
        return Some(Vec::new());
    }
    let word = |at: usize| -> Option<usize> {
        Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
    };
    let n = word(0)?;
    let mut sizes = Vec::with_capacity(n.min(1024));
    for i in 0..n {
        sizes.push((word(4 + i * 8)?, word(8 + i * 8)?));
    }
    let mut p = 4 + n * 8;
    let mut field = |len: usize| -> Option<String> {
        let s = String::from_utf8(b.get(p..p + len)?.to_vec()).ok()?;
        (*b.get(p + len)? == 0).then_some(())?;
        p += len + 1;
        Some(s)
    };
    sizes
        .into_iter()
        .map(|(k, v)| Some((field(k)?, field(v)?)))
        .collect()
}
