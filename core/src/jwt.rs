//! JWT (JWS compact) verification: HS256/384/512 with `oct` keys, ES256 with P-256
//! keys, EdDSA with Ed25519 keys. The key type must match the algorithm (no
//! algorithm confusion), `alg: none` and unknown algorithms are refused, `crit` is
//! refused (we understand no extension), sizes are bounded.

use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::Value;

use crate::code::{Code, Reject};
use crate::jwk::{b64url_decode_strict, Jwk, JwkSet, KeyMaterial};

/// Default bound on a token's length in bytes.
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 8192;

/// A JWS algorithm we support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
pub enum JwsAlg {
    /// HMAC-SHA256.
    HS256,
    /// HMAC-SHA384.
    HS384,
    /// HMAC-SHA512.
    HS512,
    /// ECDSA P-256 SHA-256.
    ES256,
    /// Ed25519.
    EdDSA,
}

impl JwsAlg {
    /// Every supported algorithm.
    pub const ALL: [JwsAlg; 5] = [
        JwsAlg::HS256,
        JwsAlg::HS384,
        JwsAlg::HS512,
        JwsAlg::ES256,
        JwsAlg::EdDSA,
    ];

    /// The `alg` header value.
    pub const fn as_str(self) -> &'static str {
        match self {
            JwsAlg::HS256 => "HS256",
            JwsAlg::HS384 => "HS384",
            JwsAlg::HS512 => "HS512",
            JwsAlg::ES256 => "ES256",
            JwsAlg::EdDSA => "EdDSA",
        }
    }

    /// Parses an `alg` header value (case-sensitive, as RFC 7515 requires).
    pub fn parse(s: &str) -> Option<JwsAlg> {
        JwsAlg::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// Whether `key` is the right type of key for this algorithm.
    fn fits(self, key: &KeyMaterial) -> bool {
        matches!(
            (self, key),
            (
                JwsAlg::HS256 | JwsAlg::HS384 | JwsAlg::HS512,
                KeyMaterial::Oct(_)
            ) | (JwsAlg::ES256, KeyMaterial::P256(_))
                | (JwsAlg::EdDSA, KeyMaterial::Ed25519(_))
        )
    }
}

/// What a token must satisfy besides its signature.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtPolicy {
    /// Accepted `iss` values. Empty refuses every token unless [`Self::any_issuer`].
    pub issuers: Vec<String>,
    /// Accepted audiences (`aud` must name one). Empty refuses every token unless
    /// [`Self::any_audience`].
    pub audiences: Vec<String>,
    /// Accept a token of any issuer the keys verify (`issuers` empty): for a key
    /// that signs for one issuer only. Off by default, so that a policy that names
    /// no issuer refuses instead of accepting all.
    pub any_issuer: bool,
    /// Accept a token of any audience, or none (`audiences` empty): for an issuer
    /// whose tokens are all meant for this gateway. Off by default: a token the same
    /// issuer minted for another service would otherwise pass here.
    pub any_audience: bool,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, seconds.
    pub leeway_secs: u64,
    /// Refuse tokens without `exp`.
    pub require_exp: bool,
    /// Claim holding the roles: a name or a dotted path (`realm_access.roles`); its
    /// value is a string (roles separated by spaces or commas) or an array of strings.
    pub roles_claim: String,
    /// Bound on the token's length.
    pub max_token_bytes: usize,
    /// Algorithms accepted.
    pub algorithms: Vec<JwsAlg>,
}

impl Default for JwtPolicy {
    fn default() -> Self {
        JwtPolicy {
            issuers: Vec::new(),
            audiences: Vec::new(),
            any_issuer: false,
            any_audience: false,
            leeway_secs: 30,
            require_exp: true,
            roles_claim: "roles".into(),
            max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
            algorithms: JwsAlg::ALL.to_vec(),
        }
    }
}

/// The most skew a policy may tolerate on `exp`, `nbf` and `iat`.
pub const MAX_LEEWAY_SECS: u64 = 300;

impl JwtPolicy {
    /// Checks a policy read from configuration: it must accept some token, and say
    /// which issuers and audiences — or, in so many words, that any will do.
    pub fn validate(&self) -> Result<(), String> {
        if self.algorithms.is_empty() {
            return Err("jwt.policy.algorithms is empty".into());
        }
        if self.max_token_bytes == 0 || self.max_token_bytes > 64 * 1024 {
            return Err("jwt.policy.max_token_bytes must be 1..=65536".into());
        }
        // A typo of a few digits accepted expired and not-yet-valid tokens.
        if self.leeway_secs > MAX_LEEWAY_SECS {
            return Err(format!(
                "jwt.policy.leeway_secs must be 0..={MAX_LEEWAY_SECS}"
            ));
        }
        for (what, flag, list, any) in [
            ("issuers", "any_issuer", &self.issuers, self.any_issuer),
            (
                "audiences",
                "any_audience",
                &self.audiences,
                self.any_audience,
            ),
        ] {
            match (list.is_empty(), any) {
                (true, false) => {
                    return Err(format!(
                        "jwt.policy.{what} is empty: no token would be accepted; list the accepted {what}, or set jwt.policy.{flag} to true to accept any"
                    ))
                }
                (false, true) => {
                    return Err(format!(
                        "jwt.policy.{what} and jwt.policy.{flag} are both set: give one"
                    ))
                }
                _ => {}
            }
            if list.iter().any(String::is_empty) {
                return Err(format!("jwt.policy.{what} holds an empty name"));
            }
        }
        Ok(())
    }

    /// Whether `keys` fit the policy's issuers: with more than one accepted
    /// issuer every key names the one it signs for (`iss` in the JWK) — else a
    /// holder of one issuer's key could sign tokens in another's name, and be
    /// recorded and scoped as the other — and a named issuer is an accepted one.
    pub fn validate_keys(&self, keys: &crate::jwk::JwkSet) -> Result<(), String> {
        let name = |k: &crate::jwk::Jwk| k.kid.clone().unwrap_or_else(|| "(no kid)".into());
        for k in &keys.keys {
            match &k.iss {
                None if self.issuers.len() > 1 => {
                    return Err(format!(
                        "jwt.jwks key {}: with more than one issuer in jwt.policy.issuers, each key names the issuer it signs for (`iss`)",
                        name(k)
                    ))
                }
                Some(i) if !self.any_issuer && !self.issuers.contains(i) => {
                    return Err(format!(
                        "jwt.jwks key {}: its `iss` is not in jwt.policy.issuers",
                        name(k)
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The claims of a verified token that the gateway uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedJwt {
    /// `sub`, if any.
    pub sub: Option<String>,
    /// `iss`, if any.
    pub iss: Option<String>,
    /// `exp`, if any (unix seconds).
    pub exp: Option<u64>,
    /// `nbf`, if any (unix seconds).
    pub nbf: Option<u64>,
    /// `iat`, if any (unix seconds).
    pub iat: Option<u64>,
    /// Roles from the configured claim.
    pub roles: Vec<String>,
    /// `kid` of the key that verified it, if the key had one.
    pub kid: Option<String>,
}

/// A JSON object whose members each appear once, at every depth (RFC 7515
/// §5.2 lets a verifier refuse duplicates: another reader may take the first of
/// two `roles` where this one took the last — a dotted `roles_claim` reads a
/// nested object). Anything but an object is refused: a derived struct also
/// took an array (`["HS256"]`) as a header.
struct UniqueObject(serde_json::Map<String, Value>);

impl<'de> Deserialize<'de> for UniqueObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(UniqueVisitor).and_then(|v| match v {
            Value::Object(m) => Ok(UniqueObject(m)),
            _ => Err(serde::de::Error::custom("not a JSON object")),
        })
    }
}

/// Any JSON value whose objects, at every depth, name each member once.
struct UniqueValue(Value);

impl<'de> Deserialize<'de> for UniqueValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueVisitor).map(UniqueValue)
    }
}

/// Builds a [`Value`], refusing an object that names a member twice.
struct UniqueVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueVisitor {
    type Value = Value;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON whose objects name each member once")
    }
    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }
    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Value, A::Error> {
        let mut v = Vec::new();
        while let Some(UniqueValue(x)) = a.next_element()? {
            v.push(x);
        }
        Ok(Value::Array(v))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Value, A::Error> {
        let mut m = serde_json::Map::new();
        while let Some((k, UniqueValue(v))) = a.next_entry::<String, UniqueValue>()? {
            if m.contains_key(&k) {
                return Err(serde::de::Error::custom("a member appears twice"));
            }
            m.insert(k, v);
        }
        Ok(Value::Object(m))
    }
}

fn err(code: Code, detail: &'static str) -> Reject {
    Reject::new(code, detail)
}

fn verify_signature(alg: JwsAlg, key: &KeyMaterial, input: &[u8], sig: &[u8]) -> bool {
    fn hmac_ok<M: Mac + hmac::digest::KeyInit>(k: &[u8], input: &[u8], sig: &[u8]) -> bool {
        let Ok(mut mac) = <M as hmac::digest::KeyInit>::new_from_slice(k) else {
            return false;
        };
        mac.update(input);
        // Constant-time comparison, and the length must match the MAC size.
        mac.verify_slice(sig).is_ok()
    }
    match (alg, key) {
        (JwsAlg::HS256, KeyMaterial::Oct(k)) => hmac_ok::<Hmac<sha2::Sha256>>(k, input, sig),
        (JwsAlg::HS384, KeyMaterial::Oct(k)) => hmac_ok::<Hmac<sha2::Sha384>>(k, input, sig),
        (JwsAlg::HS512, KeyMaterial::Oct(k)) => hmac_ok::<Hmac<sha2::Sha512>>(k, input, sig),
        (JwsAlg::ES256, KeyMaterial::P256(vk)) => {
            use p256::ecdsa::signature::Verifier;
            match p256::ecdsa::Signature::from_slice(sig) {
                Ok(s) => vk.verify(input, &s).is_ok(),
                Err(_) => false,
            }
        }
        (JwsAlg::EdDSA, KeyMaterial::Ed25519(vk)) => match <&[u8; 64]>::try_from(sig) {
            Ok(s) => vk
                .verify_strict(input, &ed25519_dalek::Signature::from_bytes(s))
                .is_ok(),
            Err(_) => false,
        },
        _ => false,
    }
}

/// Reads a NumericDate claim; `None` when absent.
fn numeric_date(
    claims: &serde_json::Map<String, Value>,
    name: &'static str,
) -> Result<Option<u64>, Reject> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                Ok(Some(u))
            } else if let Some(f) = n.as_f64().filter(|f| f.is_finite() && *f >= 0.0) {
                // Fractional seconds are allowed by RFC 7519; truncate.
                Ok(Some(f as u64))
            } else {
                Err(Reject::with(
                    Code::JwtClaims,
                    format!("`{name}` is not a valid NumericDate"),
                ))
            }
        }
        Some(_) => Err(Reject::with(
            Code::JwtClaims,
            format!("`{name}` is not a number"),
        )),
    }
}

fn opt_string(
    claims: &serde_json::Map<String, Value>,
    name: &'static str,
) -> Result<Option<String>, Reject> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Reject::with(
            Code::JwtClaims,
            format!("`{name}` is not a string"),
        )),
    }
}

fn roles_from(claims: &serde_json::Map<String, Value>, path: &str) -> Result<Vec<String>, Reject> {
    let mut parts = path.split('.');
    let mut cur = parts.next().and_then(|p| claims.get(p));
    for p in parts {
        cur = cur.and_then(|v| v.get(p));
    }
    match cur {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(s
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|r| !r.is_empty())
            .map(str::to_owned)
            .collect()),
        // Role names travel on as a comma-separated list (the stamped header, the
        // ledger's requester): one holding a separator would turn into others.
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v.as_str() {
                Some(r)
                    if r.chars()
                        .any(|c| c == ',' || c.is_whitespace() || c.is_control()) =>
                {
                    Err(err(
                        Code::JwtClaims,
                        "a role name holds a comma, a space or a control character",
                    ))
                }
                Some(r) => Ok(r.to_owned()),
                None => Err(err(Code::JwtClaims, "roles array holds a non-string")),
            })
            .filter(|r| r.as_ref().map_or(true, |r| !r.is_empty()))
            .collect(),
        Some(_) => Err(err(
            Code::JwtClaims,
            "roles claim is neither a string nor an array",
        )),
    }
}

/// Checks `exp`, `nbf` and `iat` at `now` with the policy's leeway (also used on
/// cache hits). A token issued in the future (`iat` beyond the leeway) is not valid
/// yet, like one whose `nbf` lies ahead: a clock that wrong at the issuer is not
/// trusted.
pub fn check_times(
    exp: Option<u64>,
    nbf: Option<u64>,
    iat: Option<u64>,
    policy: &JwtPolicy,
    now: u64,
) -> Result<(), Reject> {
    match exp {
        None if policy.require_exp => return Err(err(Code::JwtMissingExp, "token has no `exp`")),
        Some(e) if now >= e.saturating_add(policy.leeway_secs) => {
            return Err(err(Code::JwtExpired, "token has expired"))
        }
        _ => {}
    }
    if let Some(nbf) = nbf {
        if now.saturating_add(policy.leeway_secs) < nbf {
            return Err(err(Code::JwtNotYetValid, "token is not valid yet (`nbf`)"));
        }
    }
    if let Some(iat) = iat {
        if now.saturating_add(policy.leeway_secs) < iat {
            return Err(err(
                Code::JwtNotYetValid,
                "token is issued in the future (`iat`)",
            ));
        }
    }
    Ok(())
}

/// Verifies a compact JWS token against `keys` and `policy` at `now` (unix seconds).
pub fn verify_jwt(
    token: &str,
    keys: &JwkSet,
    policy: &JwtPolicy,
    now: u64,
) -> Result<VerifiedJwt, Reject> {
    if token.len() > policy.max_token_bytes {
        return Err(Reject::with(
            Code::JwtTooLarge,
            format!(
                "token is {} bytes; the limit is {}",
                token.len(),
                policy.max_token_bytes
            ),
        ));
    }
    let mut segs = token.split('.');
    let (Some(h64), Some(p64), Some(s64), None) =
        (segs.next(), segs.next(), segs.next(), segs.next())
    else {
        return Err(err(
            Code::JwtMalformed,
            "a JWS compact token has three segments",
        ));
    };
    let header_bytes = b64url_decode_strict(h64)
        .map_err(|_| err(Code::JwtMalformed, "header is not base64url"))?;
    let UniqueObject(header) = serde_json::from_slice(&header_bytes).map_err(|_| {
        err(
            Code::JwtMalformed,
            "header is not a JSON object with each member once",
        )
    })?;
    if header.get("crit").is_some_and(|c| !c.is_null()) {
        return Err(err(
            Code::JwtMalformed,
            "`crit` header extensions are not supported",
        ));
    }
    let alg_name = match header.get("alg") {
        Some(Value::String(s)) => s.as_str(),
        _ => return Err(err(Code::JwtAlg, "header has no `alg` string")),
    };
    let alg = JwsAlg::parse(alg_name)
        .filter(|a| policy.algorithms.contains(a))
        .ok_or_else(|| {
            Reject::with(
                Code::JwtAlg,
                format!("algorithm `{}` is not accepted", alg_name.escape_debug()),
            )
        })?;
    let kid = match header.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(err(Code::JwtMalformed, "`kid` is not a string")),
    };

    // Candidate keys: by kid when given, else every key; each must fit the algorithm.
    let by_kid: Vec<&Jwk> = keys
        .keys
        .iter()
        .filter(|k| kid.is_none() || k.kid.as_deref() == kid)
        .collect();
    if by_kid.is_empty() {
        return Err(err(Code::JwtUnknownKey, "no key with the token's `kid`"));
    }
    let candidates: Vec<&Jwk> = by_kid
        .into_iter()
        .filter(|k| alg.fits(&k.key) && k.alg.as_deref().is_none_or(|a| a == alg.as_str()))
        .collect();
    if candidates.is_empty() {
        return Err(if kid.is_some() {
            err(
                Code::JwtAlg,
                "the key named by `kid` is not for this algorithm",
            )
        } else {
            err(Code::JwtUnknownKey, "no key for this algorithm")
        });
    }

    let sig = b64url_decode_strict(s64)
        .map_err(|_| err(Code::JwtMalformed, "signature is not base64url"))?;
    let input = &token.as_bytes()[..h64.len() + 1 + p64.len()];
    let key = candidates
        .into_iter()
        .find(|k| verify_signature(alg, &k.key, input, &sig))
        .ok_or_else(|| err(Code::JwtSignature, "signature does not verify"))?;

    let payload = b64url_decode_strict(p64)
        .map_err(|_| err(Code::JwtMalformed, "payload is not base64url"))?;
    let UniqueObject(claims) = serde_json::from_slice(&payload).map_err(|_| {
        err(
            Code::JwtMalformed,
            "payload is not a JSON object with each member once",
        )
    })?;

    let exp = numeric_date(&claims, "exp")?;
    let nbf = numeric_date(&claims, "nbf")?;
    let iat = numeric_date(&claims, "iat")?;
    check_times(exp, nbf, iat, policy, now)?;
    let iss = opt_string(&claims, "iss")?;
    // An empty list accepts nothing unless the policy says "any" in so many words.
    if !policy.any_issuer && !iss.as_ref().is_some_and(|i| policy.issuers.contains(i)) {
        return Err(err(Code::JwtIssuer, "issuer is not accepted"));
    }
    // A key pinned to an issuer signs for that issuer only.
    if key
        .iss
        .as_ref()
        .is_some_and(|pinned| iss.as_ref() != Some(pinned))
    {
        return Err(err(
            Code::JwtIssuer,
            "the key that verifies this token signs for another issuer",
        ));
    }
    if !policy.any_audience {
        let ok = match claims.get("aud") {
            Some(Value::String(a)) => policy.audiences.contains(a),
            Some(Value::Array(v)) => v.iter().any(|a| {
                a.as_str()
                    .is_some_and(|a| policy.audiences.iter().any(|p| p == a))
            }),
            _ => false,
        };
        if !ok {
            return Err(err(Code::JwtAudience, "audience is not accepted"));
        }
    }
    Ok(VerifiedJwt {
        sub: opt_string(&claims, "sub")?,
        iss,
        exp,
        nbf,
        iat,
        roles: roles_from(&claims, &policy.roles_claim)?,
        kid: key.kid.clone(),
    })
}

/// Mints an HS256 token (for development tokens and tests). `secret` must be at
/// least [`crate::jwk::MIN_HMAC_KEY_BYTES`] long.
pub fn mint_hs256(
    secret: &[u8],
    kid: Option<&str>,
    claims: &serde_json::Map<String, Value>,
) -> Result<String, crate::jwk::KeyError> {
    use crate::jwk::{b64url_encode, KeyError, MIN_HMAC_KEY_BYTES};
    if secret.len() < MIN_HMAC_KEY_BYTES {
        return Err(KeyError::ShortSecret(secret.len()));
    }
    let mut header = serde_json::json!({"alg": "HS256", "typ": "JWT"});
    if let Some(k) = kid {
        header["kid"] = k.into();
    }
    let signing_input = format!(
        "{}.{}",
        b64url_encode(header.to_string().as_bytes()),
        b64url_encode(Value::Object(claims.clone()).to_string().as_bytes())
    );
    let mut mac = <Hmac<sha2::Sha256> as hmac::digest::KeyInit>::new_from_slice(secret)
        .map_err(|_| KeyError::Invalid("HMAC key"))?;
    mac.update(signing_input.as_bytes());
    let sig = mac.finalize().into_bytes();
    Ok(format!("{signing_input}.{}", b64url_encode(&sig)))
}

#[cfg(test)]
mod tests;
