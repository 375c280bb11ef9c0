//! JWT parsing and verification. The first byte picks the mode: even → the rest is
//! a token as received (header, algorithm and key selection, base64url, the
//! signature check); odd → the rest is a claims payload, signed HS256 with the fuzz
//! key, so the claim checks (times, issuer, audience, roles) after the signature
//! are reached too.
#![no_main]

use gw_core::jwk::JwkSet;
use gw_core::jwt::{mint_hs256, verify_jwt, JwtPolicy};
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"fuzz-secret-fuzz-secret-fuzz-secret!";
const NOW: u64 = 1_750_000_000;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let jwks = format!(
        r#"{{"keys":[{{"kty":"oct","alg":"HS256","kid":"k1","k":"{}"}}]}}"#,
        gw_core::jwk::b64url_encode(SECRET)
    );
    let Ok(keys) = JwkSet::parse(&jwks) else {
        return;
    };
    let policy = JwtPolicy {
        issuers: vec!["fuzz".into()],
        audiences: vec!["gw".into()],
        ..JwtPolicy::default()
    };
    let token = if mode & 1 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let Ok(claims) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(rest)
        else {
            return;
        };
        let Ok(t) = mint_hs256(SECRET, Some("k1"), &claims) else {
            return;
        };
        t
    };
    let _ = verify_jwt(&token, &keys, &policy, NOW);
    // The JWKS parser on the raw input too.
    let _ = JwkSet::parse(&String::from_utf8_lossy(rest));
});
