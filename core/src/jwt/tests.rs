use super::*;
use crate::jwk::{b64url_encode, ed25519_public_jwk};
use serde_json::json;

const NOW: u64 = 1_750_000_000;
const SECRET: &[u8; 32] = b"0123456789abcdef0123456789abcdef";

fn claims(v: Value) -> serde_json::Map<String, Value> {
    v.as_object().unwrap().clone()
}

fn hs_keys() -> JwkSet {
    JwkSet::parse(&format!(
        r#"{{"keys":[{{"kty":"oct","kid":"hs","k":"{}"}}]}}"#,
        b64url_encode(SECRET)
    ))
    .unwrap()
}

fn sign_raw(header: Value, payload: Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let input = format!(
        "{}.{}",
        b64url_encode(header.to_string().as_bytes()),
        b64url_encode(payload.to_string().as_bytes())
    );
    let sig = sign(input.as_bytes());
    format!("{input}.{}", b64url_encode(&sig))
}

fn hs256(input: &[u8], key: &[u8]) -> Vec<u8> {
    let mut m = <Hmac<sha2::Sha256> as hmac::digest::KeyInit>::new_from_slice(key).unwrap();
    m.update(input);
    m.finalize().into_bytes().to_vec()
}

fn good_claims() -> Value {
    json!({"sub": "alice", "iss": "defi-dashboard", "aud": "defi-users", "exp": NOW + 60, "roles": ["admin"]})
}

fn policy() -> JwtPolicy {
    JwtPolicy {
        issuers: vec!["defi-dashboard".into()],
        audiences: vec!["defi-users".into()],
        ..JwtPolicy::default()
    }
}

fn code(token: &str, keys: &JwkSet) -> Code {
    verify_jwt(token, keys, &policy(), NOW).unwrap_err().code
}

#[test]
fn hs256_round_trip() {
    let t = mint_hs256(SECRET, Some("hs"), &claims(good_claims())).unwrap();
    let v = verify_jwt(&t, &hs_keys(), &policy(), NOW).unwrap();
    assert_eq!(v.sub.as_deref(), Some("alice"));
    assert_eq!(v.roles, vec!["admin"]);
    assert_eq!(v.kid.as_deref(), Some("hs"));
    assert_eq!(v.exp, Some(NOW + 60));
}

#[test]
fn hs384_and_hs512() {
    for (alg, tag_len) in [("HS384", 48), ("HS512", 64)] {
        let t = sign_raw(json!({"alg": alg}), good_claims(), |i| {
            let s = match alg {
                "HS384" => {
                    let mut m =
                        <Hmac<sha2::Sha384> as hmac::digest::KeyInit>::new_from_slice(SECRET)
                            .unwrap();
                    m.update(i);
                    m.finalize().into_bytes().to_vec()
                }
                _ => {
                    let mut m =
                        <Hmac<sha2::Sha512> as hmac::digest::KeyInit>::new_from_slice(SECRET)
                            .unwrap();
                    m.update(i);
                    m.finalize().into_bytes().to_vec()
                }
            };
            assert_eq!(s.len(), tag_len);
            s
        });
        assert!(verify_jwt(&t, &hs_keys(), &policy(), NOW).is_ok(), "{alg}");
    }
}

#[test]
fn time_claims() {
    let mk = |c: Value| mint_hs256(SECRET, None, &claims(c)).unwrap();
    let mut c = good_claims();
    c["exp"] = json!(NOW - 31);
    assert_eq!(code(&mk(c.clone()), &hs_keys()), Code::JwtExpired);
    c["exp"] = json!(NOW - 29); // inside the 30 s leeway
    assert!(verify_jwt(&mk(c), &hs_keys(), &policy(), NOW).is_ok());
    let mut c = good_claims();
    c.as_object_mut().unwrap().remove("exp");
    assert_eq!(code(&mk(c.clone()), &hs_keys()), Code::JwtMissingExp);
    let lax = JwtPolicy {
        require_exp: false,
        ..policy()
    };
    assert!(verify_jwt(&mk(c), &hs_keys(), &lax, NOW).is_ok());
    let mut c = good_claims();
    c["nbf"] = json!(NOW + 31);
    assert_eq!(code(&mk(c), &hs_keys()), Code::JwtNotYetValid);
    // Issued a day ahead: not valid yet; within the leeway: fine; a bad `iat`:
    // the claims are wrong.
    let mut c = good_claims();
    c["iat"] = json!(NOW + 86_400);
    let e = verify_jwt(&mk(c), &hs_keys(), &policy(), NOW).unwrap_err();
    assert_eq!(
        (e.code, &*e.detail),
        (
            Code::JwtNotYetValid,
            "token is issued in the future (`iat`)"
        )
    );
    let mut c = good_claims();
    c["iat"] = json!(NOW + 29);
    assert!(verify_jwt(&mk(c), &hs_keys(), &policy(), NOW).is_ok());
    let mut c = good_claims();
    c["iat"] = json!("now");
    assert_eq!(code(&mk(c), &hs_keys()), Code::JwtClaims);
    let mut c = good_claims();
    c["exp"] = json!("tomorrow");
    assert_eq!(code(&mk(c), &hs_keys()), Code::JwtClaims);
    let mut c = good_claims();
    c["exp"] = json!((NOW + 60) as f64 + 0.5);
    assert!(verify_jwt(&mk(c), &hs_keys(), &policy(), NOW).is_ok());
}

#[test]
fn issuer_and_audience() {
    let mk = |c: Value| mint_hs256(SECRET, None, &claims(c)).unwrap();
    let mut c = good_claims();
    c["iss"] = json!("evil");
    assert_eq!(code(&mk(c), &hs_keys()), Code::JwtIssuer);
    let mut c = good_claims();
    c.as_object_mut().unwrap().remove("iss");
    assert_eq!(code(&mk(c), &hs_keys()), Code::JwtIssuer);
    let mut c = good_claims();
    c["aud"] = json!(["other", "defi-users"]);
    assert!(verify_jwt(&mk(c), &hs_keys(), &policy(), NOW).is_ok());
    let mut c = good_claims();
    c["aud"] = json!(["other"]);
    assert_eq!(code(&mk(c), &hs_keys()), Code::JwtAudience);
}

/// A policy naming no issuer or no audience refuses every token: "any" must be
/// said in so many words (`any_issuer`, `any_audience`), and configuration that
/// says neither is refused at load.
#[test]
fn an_empty_issuer_or_audience_list_accepts_nothing_unless_any_is_said() {
    let t = mint_hs256(SECRET, None, &claims(good_claims())).unwrap();
    let no_iss = JwtPolicy {
        issuers: vec![],
        ..policy()
    };
    let no_aud = JwtPolicy {
        audiences: vec![],
        ..policy()
    };
    let e = |p: &JwtPolicy| verify_jwt(&t, &hs_keys(), p, NOW).unwrap_err().code;
    assert_eq!(e(&no_iss), Code::JwtIssuer);
    assert_eq!(e(&no_aud), Code::JwtAudience);
    assert_eq!(e(&JwtPolicy::default()), Code::JwtIssuer);
    let any = |p: JwtPolicy| JwtPolicy {
        any_issuer: p.issuers.is_empty(),
        any_audience: p.audiences.is_empty(),
        ..p
    };
    assert!(verify_jwt(&t, &hs_keys(), &any(no_iss.clone()), NOW).is_ok());
    assert!(verify_jwt(&t, &hs_keys(), &any(no_aud.clone()), NOW).is_ok());
    // Any audience takes a token with none.
    let mut c = good_claims();
    c.as_object_mut().unwrap().remove("aud");
    let bare = mint_hs256(SECRET, None, &claims(c)).unwrap();
    assert_eq!(
        verify_jwt(&bare, &hs_keys(), &policy(), NOW)
            .unwrap_err()
            .code,
        Code::JwtAudience
    );
    assert!(verify_jwt(&bare, &hs_keys(), &any(no_aud.clone()), NOW).is_ok());

    assert_eq!(policy().validate(), Ok(()));
    assert_eq!(any(no_iss.clone()).validate(), Ok(()));
    for (p, says) in [
        (no_iss.clone(), "jwt.policy.issuers is empty"),
        (no_aud.clone(), "jwt.policy.audiences is empty"),
        (JwtPolicy::default(), "jwt.policy.issuers is empty"),
        (
            JwtPolicy {
                any_issuer: true,
                ..policy()
            },
            "jwt.policy.issuers and jwt.policy.any_issuer are both set",
        ),
        (
            JwtPolicy {
                any_audience: true,
                ..policy()
            },
            "jwt.policy.audiences and jwt.policy.any_audience are both set",
        ),
        (
            JwtPolicy {
                audiences: vec![String::new()],
                ..policy()
            },
            "jwt.policy.audiences holds an empty name",
        ),
        (
            JwtPolicy {
                algorithms: vec![],
                ..policy()
            },
            "jwt.policy.algorithms is empty",
        ),
    ] {
        let e = p.validate().unwrap_err();
        assert!(e.starts_with(says), "{e}");
    }
}

#[test]
fn roles_claim_shapes() {
    let mk = |c: Value| mint_hs256(SECRET, None, &claims(c)).unwrap();
    let mut c = good_claims();
    c["roles"] = json!("viewer operator,admin");
    let v = verify_jwt(&mk(c), &hs_keys(), &policy(), NOW).unwrap();
    assert_eq!(v.roles, vec!["viewer", "operator", "admin"]);
    let mut c = good_claims();
    c["realm_access"] = json!({"roles": ["viewer"]});
    let p = JwtPolicy {
        roles_claim: "realm_access.roles".into(),
        ..policy()
    };
    assert_eq!(
        verify_jwt(&mk(c), &hs_keys(), &p, NOW).unwrap().roles,
        vec!["viewer"]
    );
    let mut c = good_claims();
    c["roles"] = json!(7);
    assert_eq!(code(&mk(c), &hs_keys()), Code::JwtClaims);
    let mut c = good_claims();
    c["roles"] = json!(["admin", 1]);
    assert_eq!(code(&mk(c), &hs_keys()), Code::JwtClaims);
    // Roles travel on comma-separated: a name holding a separator would become
    // other roles downstream ("guest,admin" read as guest here, admin there).
    for bad in ["guest,admin", "guest admin", "guest\tadmin", "a\u{7}"] {
        let mut c = good_claims();
        c["roles"] = json!([bad]);
        assert_eq!(code(&mk(c), &hs_keys()), Code::JwtClaims, "{bad:?}");
    }
}

#[test]
fn refuses_none_unknown_and_confused_algorithms() {
    let none = format!(
        "{}.{}.",
        b64url_encode(br#"{"alg":"none"}"#),
        b64url_encode(good_claims().to_string().as_bytes())
    );
    assert_eq!(code(&none, &hs_keys()), Code::JwtAlg);
    let t = sign_raw(json!({"alg": "hs256"}), good_claims(), |i| hs256(i, SECRET));
    assert_eq!(code(&t, &hs_keys()), Code::JwtAlg, "alg is case-sensitive");
    let t = sign_raw(json!({"alg": "RS256"}), good_claims(), |i| hs256(i, SECRET));
    assert_eq!(code(&t, &hs_keys()), Code::JwtAlg);
    let t = sign_raw(json!({"typ": "JWT"}), good_claims(), |i| hs256(i, SECRET));
    assert_eq!(code(&t, &hs_keys()), Code::JwtAlg);

    // Classic confusion: HS256 keyed with the public Ed25519 key bytes.
    let ed = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let pubkey = *ed.verifying_key().as_bytes();
    let okp = JwkSet::parse(&format!(
        r#"{{"keys":[{}]}}"#,
        ed25519_public_jwk("ed", &ed.verifying_key())
    ))
    .unwrap();
    let t = sign_raw(json!({"alg": "HS256", "kid": "ed"}), good_claims(), |i| {
        hs256(i, &pubkey)
    });
    assert_eq!(code(&t, &okp), Code::JwtAlg);
    let t = sign_raw(json!({"alg": "HS256"}), good_claims(), |i| {
        hs256(i, &pubkey)
    });
    assert_eq!(code(&t, &okp), Code::JwtUnknownKey);

    // An algorithm the policy does not allow.
    let only_ed = JwtPolicy {
        algorithms: vec![JwsAlg::EdDSA],
        ..policy()
    };
    let t = mint_hs256(SECRET, None, &claims(good_claims())).unwrap();
    assert_eq!(
        verify_jwt(&t, &hs_keys(), &only_ed, NOW).unwrap_err().code,
        Code::JwtAlg
    );

    // A JWK pinned to another algorithm.
    let pinned = JwkSet::parse(&format!(
        r#"{{"keys":[{{"kty":"oct","alg":"HS512","k":"{}"}}]}}"#,
        b64url_encode(SECRET)
    ))
    .unwrap();
    assert_eq!(code(&t, &pinned), Code::JwtUnknownKey);
}

#[test]
fn es256_and_eddsa() {
    use p256::ecdsa::signature::Signer;
    let es = p256::ecdsa::SigningKey::from_slice(&[5u8; 32]).unwrap();
    let point = es.verifying_key().to_encoded_point(false);
    let ed = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let keys = JwkSet::parse(&format!(
        r#"{{"keys":[{{"kty":"EC","crv":"P-256","kid":"es","x":"{}","y":"{}"}},{}]}}"#,
        b64url_encode(point.x().unwrap()),
        b64url_encode(point.y().unwrap()),
        ed25519_public_jwk("ed", &ed.verifying_key())
    ))
    .unwrap();
    let t = sign_raw(json!({"alg": "ES256", "kid": "es"}), good_claims(), |i| {
        let s: p256::ecdsa::Signature = es.sign(i);
        s.to_bytes().to_vec()
    });
    assert_eq!(
        verify_jwt(&t, &keys, &policy(), NOW)
            .unwrap()
            .kid
            .as_deref(),
        Some("es")
    );
    let t = sign_raw(json!({"alg": "EdDSA"}), good_claims(), |i| {
        ed25519_dalek::Signer::sign(&ed, i).to_bytes().to_vec()
    });
    assert_eq!(
        verify_jwt(&t, &keys, &policy(), NOW)
            .unwrap()
            .kid
            .as_deref(),
        Some("ed")
    );
    // EdDSA header naming the EC key.
    let t = sign_raw(json!({"alg": "EdDSA", "kid": "es"}), good_claims(), |i| {
        ed25519_dalek::Signer::sign(&ed, i).to_bytes().to_vec()
    });
    assert_eq!(code(&t, &keys), Code::JwtAlg);
    // Unknown kid.
    let t = sign_raw(json!({"alg": "EdDSA", "kid": "zz"}), good_claims(), |i| {
        ed25519_dalek::Signer::sign(&ed, i).to_bytes().to_vec()
    });
    assert_eq!(code(&t, &keys), Code::JwtUnknownKey);
    // DER-encoded ECDSA is not JWS.
    let t = sign_raw(json!({"alg": "ES256"}), good_claims(), |i| {
        let s: p256::ecdsa::Signature = es.sign(i);
        s.to_der().as_bytes().to_vec()
    });
    assert_eq!(code(&t, &keys), Code::JwtSignature);
}

#[test]
fn malformed_and_tampered_tokens() {
    let t = mint_hs256(SECRET, None, &claims(good_claims())).unwrap();
    let k = hs_keys();
    assert_eq!(code("abc", &k), Code::JwtMalformed);
    assert_eq!(code("a.b.c.d", &k), Code::JwtMalformed);
    assert_eq!(code(&format!("{t}="), &k), Code::JwtMalformed);
    assert_eq!(code("!!.e30.", &k), Code::JwtMalformed);
    let (head, rest) = t.split_once('.').unwrap();
    let (_, sig) = rest.split_once('.').unwrap();
    let mut c = good_claims();
    c["roles"] = json!(["admin", "root"]);
    let forged = format!("{head}.{}.{sig}", b64url_encode(c.to_string().as_bytes()));
    assert_eq!(code(&forged, &k), Code::JwtSignature);
    let crit = sign_raw(
        json!({"alg": "HS256", "crit": ["b64"], "b64": false}),
        good_claims(),
        |i| hs256(i, SECRET),
    );
    assert_eq!(code(&crit, &k), Code::JwtMalformed);
    let big = "a".repeat(DEFAULT_MAX_TOKEN_BYTES + 1);
    assert_eq!(code(&big, &k), Code::JwtTooLarge);
    let wrong_secret = sign_raw(json!({"alg": "HS256"}), good_claims(), |i| {
        hs256(i, b"another-secret-another-secret-xx")
    });
    assert_eq!(code(&wrong_secret, &k), Code::JwtSignature);
    assert!(mint_hs256(b"short", None, &claims(good_claims())).is_err());
}

proptest::proptest! {
    #[test]
    fn arbitrary_tokens_never_panic(s in "[A-Za-z0-9_.\\-]{0,300}") {
        let _ = verify_jwt(&s, &hs_keys(), &policy(), NOW);
    }
}

/// With two issuers, each key signs for its own: a holder of issuer a's key
/// cannot mint a token in issuer b's name (it would be recorded as b's, and share
/// b's idempotency keys). Keys not pinned, or pinned to an issuer not accepted,
/// are refused when the configuration is read.
#[test]
fn a_key_pinned_to_an_issuer_signs_for_that_issuer_only() {
    const OTHER: &[u8; 32] = b"fedcba9876543210fedcba9876543210";
    let keys = JwkSet::parse(&format!(
        r#"{{"keys":[{{"kty":"oct","kid":"a","k":"{}","iss":"issuer-a"}},
                     {{"kty":"oct","kid":"b","k":"{}","iss":"issuer-b"}}]}}"#,
        b64url_encode(SECRET),
        b64url_encode(OTHER)
    ))
    .unwrap();
    let two = JwtPolicy {
        issuers: vec!["issuer-a".into(), "issuer-b".into()],
        any_audience: true,
        ..JwtPolicy::default()
    };
    assert_eq!(two.validate_keys(&keys), Ok(()));
    let token = |secret: &[u8], kid: &str, iss: &str| {
        let c = claims(json!({"sub": "alice", "iss": iss, "exp": NOW + 60}));
        mint_hs256(secret, Some(kid), &c).unwrap()
    };
    let ok = verify_jwt(&token(SECRET, "a", "issuer-a"), &keys, &two, NOW).unwrap();
    assert_eq!(ok.iss.as_deref(), Some("issuer-a"));
    assert!(verify_jwt(&token(OTHER, "b", "issuer-b"), &keys, &two, NOW).is_ok());
    // Issuer a's key, issuer b's name: refused, with a kid or without one.
    let forged = verify_jwt(&token(SECRET, "a", "issuer-b"), &keys, &two, NOW).unwrap_err();
    assert_eq!(forged.code, Code::JwtIssuer, "{forged}");
    let no_kid = sign_raw(
        json!({"alg": "HS256"}),
        json!({"sub": "alice", "iss": "issuer-b", "exp": NOW + 60}),
        |i| hs256(i, SECRET),
    );
    assert_eq!(
        verify_jwt(&no_kid, &keys, &two, NOW).unwrap_err().code,
        Code::JwtIssuer
    );
    // Configuration: with two issuers every key names its own, an accepted one.
    let unpinned = hs_keys();
    assert!(two
        .validate_keys(&unpinned)
        .unwrap_err()
        .contains("each key names the issuer it signs for"));
    let elsewhere = JwtPolicy {
        issuers: vec!["issuer-a".into()],
        any_audience: true,
        ..JwtPolicy::default()
    };
    assert!(elsewhere
        .validate_keys(&keys)
        .unwrap_err()
        .contains("not in jwt.policy.issuers"));
    // One issuer: a key need not name it.
    assert_eq!(policy().validate_keys(&unpinned), Ok(()));
}

/// A header or payload must be a JSON object whose members each appear once: a
/// header given as an array took `alg` and `kid` from its items, and a payload
/// naming `roles` twice was read by its last while another reader may take
/// the first.
#[test]
fn headers_and_payloads_are_objects_with_each_member_once() {
    let k = hs_keys();
    let raw = |header: &str, payload: &str| {
        let input = format!(
            "{}.{}",
            b64url_encode(header.as_bytes()),
            b64url_encode(payload.as_bytes())
        );
        let sig = hs256(input.as_bytes(), SECRET);
        format!("{input}.{}", b64url_encode(&sig))
    };
    let good = good_claims().to_string();
    assert!(verify_jwt(
        &raw(r#"{"alg":"HS256","kid":"hs"}"#, &good),
        &k,
        &policy(),
        NOW
    )
    .is_ok());
    assert!(verify_jwt(
        &raw(r#"{"alg":"HS256","crit":null}"#, &good),
        &k,
        &policy(),
        NOW
    )
    .is_ok());
    for header in [
        r#"["HS256","hs"]"#,
        r#"["HS256"]"#,
        r#"{"alg":"HS256","alg":"HS256"}"#,
        r#"{"alg":"HS256","kid":"hs","kid":"hs"}"#,
        r#""HS256""#,
    ] {
        assert_eq!(
            code(&raw(header, &good), &k),
            Code::JwtMalformed,
            "{header}"
        );
    }
    let twice = format!(
        r#"{{"sub":"alice","iss":"defi-dashboard","aud":"defi-users","exp":{},"roles":["viewer"],"roles":["admin"]}}"#,
        NOW + 60
    );
    let e = verify_jwt(&raw(r#"{"alg":"HS256"}"#, &twice), &k, &policy(), NOW).unwrap_err();
    assert_eq!(e.code, Code::JwtMalformed, "{e:?}");
    assert_eq!(
        code(&raw(r#"{"alg":"HS256"}"#, "[1,2]"), &k),
        Code::JwtMalformed
    ); // At every depth: a dotted roles claim reads a nested object.
    let nested = JwtPolicy {
        roles_claim: "realm_access.roles".into(),
        ..policy()
    };
    let inner = |roles: &str| {
        format!(
            r#"{{"sub":"alice","iss":"defi-dashboard","aud":"defi-users","exp":{},"realm_access":{roles}}}"#,
            NOW + 60
        )
    };
    let once = raw(r#"{"alg":"HS256"}"#, &inner(r#"{"roles":["admin"]}"#));
    assert_eq!(
        verify_jwt(&once, &k, &nested, NOW).unwrap().roles,
        ["admin"]
    );
    let twice = raw(
        r#"{"alg":"HS256"}"#,
        &inner(r#"{"roles":["viewer"],"roles":["admin"]}"#),
    );
    let e = verify_jwt(&twice, &k, &nested, NOW).unwrap_err();
    assert_eq!(e.code, Code::JwtMalformed, "{e:?}");
    let listed = raw(r#"{"alg":"HS256"}"#, &inner(r#"[{"a":1,"a":2}]"#));
    assert_eq!(
        verify_jwt(&listed, &k, &nested, NOW).unwrap_err().code,
        Code::JwtMalformed
    );
}
