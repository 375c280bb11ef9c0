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

proptest! {
    #[test]
    fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..128)) {
        let _ = parse(&b);
    }
}
