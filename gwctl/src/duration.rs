//! Human durations for flags: `90`, `90s`, `30m`, `1h`, `2d`.

use anyhow::{bail, Context, Result};

/// Parses a duration into seconds.
pub fn parse_secs(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86400),
        Some(_) => (s, 1),
        None => bail!("empty duration"),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("`{s}` is not a duration like 90s, 30m, 1h or 2d"))?;
    n.checked_mul(mult)
        .with_context(|| format!("duration `{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_secs("90").unwrap(), 90);
        assert_eq!(parse_secs("90s").unwrap(), 90);
        assert_eq!(parse_secs("30m").unwrap(), 1800);
        assert_eq!(parse_secs("1h").unwrap(), 3600);
        assert_eq!(parse_secs("2d").unwrap(), 172800);
        assert!(parse_secs("").is_err());
        assert!(parse_secs("h").is_err());
        assert!(parse_secs("1w").is_err());
        assert!(parse_secs("99999999999999999999d").is_err());
    }
}
