//! Stable, machine-readable rejection codes. They appear in HTTP error bodies, in
//! the audit ledger and in metrics names, so a code is never renamed.

use std::borrow::Cow;
use std::fmt;

/// Declares [`Code`] from one table: variant, stable name, HTTP status.
macro_rules! codes {
    ($( $(#[$doc:meta])* $variant:ident => $name:literal, $status:literal; )*) => {
        /// Why a request or command was rejected.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Code {
            $( $(#[$doc])* $variant, )*
        }

        impl Code {
            /// Every code, in declaration order, for exhaustive tests and metric registration.
            pub const ALL: &'static [Code] = &[$(Code::$variant),*];

            /// The stable snake_case name.
            pub const fn as_str(self) -> &'static str {
                match self { $(Code::$variant => $name,)* }
            }

            /// The HTTP status a gateway answers with for this rejection.
            pub const fn http_status(self) -> u16 {
                match self { $(Code::$variant => $status,)* }
            }
        }
    };
}

codes! {
    // --- signed commands ---
    /// The body is larger than the configured bound.
    TooLarge => "too_large", 413;
    /// The body is not a well-formed `control.Command`.
    Malformed => "malformed", 400;
    /// `schema_version` is not one we understand.
    BadSchema => "bad_schema", 400;
    /// `sig_alg` is missing or not `ed25519-v1`.
    SigAlg => "sig_alg", 401;
    /// `sig` is not 64 bytes.
    BadSigLength => "bad_sig_length", 401;
    /// `pubkey_id` is not in the key ring.
    UnknownKey => "unknown_key", 401;
    /// The key's validity window has ended.
    KeyExpired => "key_expired", 401;
    /// The key's validity window has not started.
    KeyNotYetValid => "key_not_yet_valid", 401;
    /// The signature does not verify.
    BadSignature => "bad_signature", 401;
    /// The key may not sign for this issuer, module or action.
    KeyScope => "key_scope", 403;
    /// `ts` is older than the allowed skew.
    Stale => "stale", 401;
    /// `ts` is further in the future than the allowed skew.
    Future => "future", 401;
    /// The nonce was used before by a command of the same issuer that is still fresh.
    Replay => "replay", 409;
    /// The replay guard holds the most fresh nonces it may (per issuer, or issuers):
    /// retry shortly.
    ReplayCapacity => "replay_capacity", 429;
    /// No room for what was offered (the hot path's ring, the sends running at
    /// once, the sidecar's memory of the edge's seals): retry shortly.
    Overloaded => "overloaded", 429;
    /// The nonce is missing (zero).
    BadNonce => "bad_nonce", 400;
    /// The route's module/action differs from the signed command's.
    RouteMismatch => "route_mismatch", 403;
    /// `args` are out of range or missing for the action.
    BadArgs => "bad_args", 400;
    /// The route does not accept this HTTP method.
    MethodNotAllowed => "method_not_allowed", 405;
    /// The body's media type is not one the route accepts.
    UnsupportedMediaType => "unsupported_media_type", 415;
    /// The replay state could not be read or updated: fail closed.
    ReplayUnavailable => "replay_unavailable", 503;
    /// The gateway cannot decide now (not configured, a dependency is down): fail closed.
    Unavailable => "unavailable", 503;
    // --- JWT ---
    /// No bearer token.
    JwtMissing => "jwt_missing", 401;
    /// The token is not a well-formed JWS compact token.
    JwtMalformed => "jwt_malformed", 401;
    /// The token is larger than the configured bound.
    JwtTooLarge => "jwt_too_large", 401;
    /// The algorithm is not allowed (`none`, unknown, or wrong for the key).
    JwtAlg => "jwt_alg", 401;
    /// No key matches the token's `kid`/algorithm.
    JwtUnknownKey => "jwt_unknown_key", 401;
    /// The token's signature does not verify.
    JwtSignature => "jwt_signature", 401;
    /// `exp` has passed.
    JwtExpired => "jwt_expired", 401;
    /// `nbf` (or `iat`) is in the future.
    JwtNotYetValid => "jwt_not_yet_valid", 401;
    /// `exp` is required but missing.
    JwtMissingExp => "jwt_missing_exp", 401;
    /// `iss` is not an accepted issuer.
    JwtIssuer => "jwt_issuer", 401;
    /// `aud` does not name an accepted audience.
    JwtAudience => "jwt_audience", 401;
    /// A claim has the wrong type.
    JwtClaims => "jwt_claims", 401;
    /// The token is valid but lacks the role the route needs.
    ForbiddenRole => "forbidden_role", 403;
    // --- callers of the sidecar ---
    /// The caller presented no client certificate from the gateway's CA.
    Unauthenticated => "unauthenticated", 401;
    /// The caller's certificate is not the edge's: only the edge may call this.
    ForbiddenPeer => "forbidden_peer", 403;
    /// The edge's stamp (`x-gw-*`) has no seal, or one that does not verify
    /// under the edge key, or is stale: the identity it claims is not believed.
    EdgeStampInvalid => "edge_stamp_invalid", 401;
    /// No such route.
    NotFound => "not_found", 404;
    // --- the data plane ---
    /// The gating module's state refuses sends now (stopped, killed).
    ModuleRefused => "module_refused", 409;
    /// Not this send's turn under the module's `throttle_pct`.
    Throttled => "throttled", 429;
    /// The Solana RPC node refused the call (a failed preflight simulation,
    /// `minContextSlot` not reached): its error is passed on.
    NodeRefused => "node_refused", 502;
}

impl Code {
    /// Parses a stable name back into its code.
    pub fn parse(s: &str) -> Option<Code> {
        Code::ALL.iter().copied().find(|c| c.as_str() == s)
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
            assert_eq!(Code::parse(c.as_str()), Some(*c));
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
