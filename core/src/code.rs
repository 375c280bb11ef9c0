//! Stable, machine-readable rejection codes. They appear in HTTP error bodies, in
//! the audit ledger and in metrics names, so a code is never renamed.

use std::borrow::Cow;
use std::fmt;

/// Why a request or command was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Code {
    // --- signed commands ---
    /// The body is larger than the configured bound.
    TooLarge,
    /// The body is not a well-formed `control.Command`.
    Malformed,
    /// `schema_version` is not one we understand.
    BadSchema,
    /// `sig_alg` is missing or not `ed25519-v1`.
    SigAlg,
    /// `sig` is not 64 bytes.
    BadSigLength,
    /// `pubkey_id` is not in the key ring.
    UnknownKey,
    /// The key's validity window has ended.
    KeyExpired,
    /// The key's validity window has not started.
    KeyNotYetValid,
    /// The signature does not verify.
    BadSignature,
    /// The key may not sign for this issuer, module or action.
    KeyScope,
    /// `ts` is older than the allowed skew.
    Stale,
    /// `ts` is further in the future than the allowed skew.
    Future,
    /// The nonce was seen before, or is older than the replay window.
    Replay,
    /// The nonce is missing (zero).
    BadNonce,
    /// The route's module/action differs from the signed command's.
    RouteMismatch,
    /// `args` are out of range or missing for the action.
    BadArgs,
    /// The route does not accept this HTTP method.
    MethodNotAllowed,
    /// The replay state could not be read or updated: fail closed.
    ReplayUnavailable,
    /// The gateway cannot decide now (not configured, a dependency is down): fail closed.
    Unavailable,
    // --- JWT ---
    /// No bearer token.
    JwtMissing,
    /// The token is not a well-formed JWS compact token.
    JwtMalformed,
    /// The token is larger than the configured bound.
    JwtTooLarge,
    /// The algorithm is not allowed (`none`, unknown, or wrong for the key).
    JwtAlg,
    /// No key matches the token's `kid`/algorithm.
    JwtUnknownKey,
    /// The token's signature does not verify.
    JwtSignature,
    /// `exp` has passed.
    JwtExpired,
    /// `nbf` (or `iat`) is in the future.
    JwtNotYetValid,
    /// `exp` is required but missing.
    JwtMissingExp,
    /// `iss` is not an accepted issuer.
    JwtIssuer,
    /// `aud` does not name an accepted audience.
    JwtAudience,
    /// A claim has the wrong type.
    JwtClaims,
    /// The token is valid but lacks the role the route needs.
    ForbiddenRole,
}

impl Code {
    /// Every code, for exhaustive tests and metric registration.
    pub const ALL: [Code; 32] = [
        Code::TooLarge,
        Code::Malformed,
        Code::BadSchema,
        Code::SigAlg,
        Code::BadSigLength,
        Code::UnknownKey,
        Code::KeyExpired,
        Code::KeyNotYetValid,
        Code::BadSignature,
        Code::KeyScope,
        Code::Stale,
        Code::Future,
        Code::Replay,
        Code::BadNonce,
        Code::RouteMismatch,
        Code::BadArgs,
        Code::MethodNotAllowed,
        Code::ReplayUnavailable,
        Code::Unavailable,
        Code::JwtMissing,
        Code::JwtMalformed,
        Code::JwtTooLarge,
        Code::JwtAlg,
        Code::JwtUnknownKey,
        Code::JwtSignature,
        Code::JwtExpired,
        Code::JwtNotYetValid,
        Code::JwtMissingExp,
        Code::JwtIssuer,
        Code::JwtAudience,
        Code::JwtClaims,
        Code::ForbiddenRole,
    ];

    /// The stable snake_case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Code::TooLarge => "too_large",
            Code::Malformed => "malformed",
            Code::BadSchema => "bad_schema",
            Code::SigAlg => "sig_alg",
            Code::BadSigLength => "bad_sig_length",
            Code::UnknownKey => "unknown_key",
            Code::KeyExpired => "key_expired",
            Code::KeyNotYetValid => "key_not_yet_valid",
            Code::BadSignature => "bad_signature",
            Code::KeyScope => "key_scope",
            Code::Stale => "stale",
            Code::Future => "future",
            Code::Replay => "replay",
            Code::BadNonce => "bad_nonce",
            Code::RouteMismatch => "route_mismatch",
            Code::BadArgs => "bad_args",
            Code::MethodNotAllowed => "method_not_allowed",
            Code::ReplayUnavailable => "replay_unavailable",
            Code::Unavailable => "unavailable",
            Code::JwtMissing => "jwt_missing",
            Code::JwtMalformed => "jwt_malformed",
            Code::JwtTooLarge => "jwt_too_large",
            Code::JwtAlg => "jwt_alg",
            Code::JwtUnknownKey => "jwt_unknown_key",
            Code::JwtSignature => "jwt_signature",
            Code::JwtExpired => "jwt_expired",
            Code::JwtNotYetValid => "jwt_not_yet_valid",
            Code::JwtMissingExp => "jwt_missing_exp",
            Code::JwtIssuer => "jwt_issuer",
            Code::JwtAudience => "jwt_audience",
            Code::JwtClaims => "jwt_claims",
            Code::ForbiddenRole => "forbidden_role",
        }
    }

    /// Parses a stable name back into its code.
    pub fn parse(s: &str) -> Option<Code> {
        Code::ALL.iter().copied().find(|c| c.as_str() == s)
    }

    /// The HTTP status a gateway answers with for this rejection.
    pub const fn http_status(self) -> u16 {
        match self {
            Code::TooLarge => 413,
            Code::Malformed | Code::BadSchema | Code::BadNonce | Code::BadArgs => 400,
            Code::KeyScope | Code::RouteMismatch | Code::ForbiddenRole => 403,
            Code::Replay => 409,
            Code::MethodNotAllowed => 405,
            Code::ReplayUnavailable | Code::Unavailable => 503,
            Code::SigAlg
            | Code::BadSigLength
            | Code::UnknownKey
            | Code::KeyExpired
            | Code::KeyNotYetValid
            | Code::BadSignature
            | Code::Stale
            | Code::Future
            | Code::JwtMissing
            | Code::JwtMalformed
            | Code::JwtTooLarge
            | Code::JwtAlg
            | Code::JwtUnknownKey
            | Code::JwtSignature
            | Code::JwtExpired
            | Code::JwtNotYetValid
            | Code::JwtMissingExp
            | Code::JwtIssuer
            | Code::JwtAudience
            | Code::JwtClaims => 401,
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejection: a stable code plus a human-readable detail that never contains
/// key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct Reject {
    /// The stable code.
    pub code: Code,
    /// What exactly was wrong, for operators.
    pub detail: Cow<'static, str>,
}

impl Reject {
    /// A rejection with a fixed detail.
    pub const fn new(code: Code, detail: &'static str) -> Self {
        Reject {
            code,
            detail: Cow::Borrowed(detail),
        }
    }

    /// A rejection with a formatted detail.
    pub fn with(code: Code, detail: String) -> Self {
        Reject {
            code,
            detail: Cow::Owned(detail),
        }
    }

    /// The JSON error body `{"error": code, "detail": ...}` used by every shell.
    pub fn to_json(&self) -> String {
        serde_json::json!({"error": self.code.as_str(), "detail": self.detail}).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip() {
        let mut names: Vec<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Code::ALL.len());
        for c in Code::ALL {
            assert_eq!(Code::parse(c.as_str()), Some(c));
        }
        assert_eq!(Code::parse("nope"), None);
    }

    #[test]
    fn json_body_has_code_and_detail() {
        let r = Reject::new(Code::Replay, "nonce 7 already seen");
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["error"], "replay");
        assert_eq!(v["detail"], "nonce 7 already seen");
        assert_eq!(Code::Replay.http_status(), 409);
        assert_eq!(Code::TooLarge.http_status(), 413);
    }
}
