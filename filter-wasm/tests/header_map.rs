//! The proxy-wasm header-map codec: round trips, malformed input, no panics.

use gw_filter::header_map::{parse, serialize};
use proptest::prelude::*;

#[test]
fn round_trip() {
    let pairs = [
        (":path", "/api"),
        ("x", ""),
        ("content-type", "application/json"),
    ];
    let b = serialize(&pairs);
    let back = parse(&b).unwrap();
    assert_eq!(back.len(), 3);
    assert_eq!(back[0], (":path".to_string(), "/api".to_string()));
    assert_eq!(back[1], ("x".to_string(), String::new()));
    assert_eq!(parse(&[]), Some(vec![]));
}

#[test]
fn malformed_is_none() {
    let b = serialize(&[("k", "v")]);
    assert_eq!(parse(&b[..b.len() - 1]), None);
    let mut nul = b.clone();
    let last = nul.len() - 1;
    nul[last] = b'x';
    assert_eq!(parse(&nul), None);
    assert_eq!(parse(&[0xff, 0xff, 0xff, 0xff]), None);
    assert_eq!(parse(&[1, 0]), None);
}

/// A value that is not UTF-8 reads with U+FFFD for its bad bytes (the request
/// goes on, a token so read fails its check, the rest of the value is kept); a
/// key that is not is a malformed map.
#[test]
fn a_value_that_is_not_utf8_is_read_as_a_replacement() {
    let b = serialize(&[("user-agent", "cafe"), ("accept", "*/*")]);
    let at = b.windows(4).position(|w| w == b"cafe").unwrap();
    let mut latin1 = b.clone();
    latin1[at + 3] = 0xE9;
    assert_eq!(
        parse(&latin1),
        Some(vec![
            ("user-agent".into(), "caf\u{FFFD}".into()),
            ("accept".into(), "*/*".into())
        ])
    );
    let key = b.windows(4).position(|w| w == b"user").unwrap();
    let mut bad_key = b;
    bad_key[key] = 0xE9;
    assert_eq!(parse(&bad_key), None);
}

proptest! {
    #[test]
    fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..128)) {
        let _ = parse(&b);
    }
}
