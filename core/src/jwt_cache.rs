//! A bounded cache of verified JWTs, so the common path does not redo signature
//! math. Entries are keyed by the whole token (signature included), so a hit means
//! "these exact bytes verified before"; times are re-checked on every hit.

use std::collections::HashMap;

use crate::code::Reject;
use crate::jwk::JwkSet;
use crate::jwt::{check_times, verify_jwt, JwtPolicy, VerifiedJwt};

/// Verified tokens, at most `capacity` of them.
#[derive(Debug)]
pub struct JwtCache {
    map: HashMap<String, VerifiedJwt>,
    capacity: usize,
    hits: u64,
    misses: u64,
}

impl JwtCache {
    /// A cache holding at most `capacity` tokens (0 disables caching).
    pub fn new(capacity: usize) -> Self {
        JwtCache {
            map: HashMap::with_capacity(capacity.min(4096)),
            capacity,
            hits: 0,
            misses: 0,
        }
    }

    /// Verifies `token`, from the cache when it verified before and is still in time.
    pub fn verify(
        &mut self,
        token: &str,
        keys: &JwkSet,
        policy: &JwtPolicy,
        now: u64,
    ) -> Result<VerifiedJwt, Reject> {
        if let Some(v) = self.map.get(token) {
            self.hits += 1;
            return match check_times(v.exp, v.nbf, v.iat, policy, now) {
                Ok(()) => Ok(v.clone()),
                Err(e) => {
                    self.map.remove(token);
                    Err(e)
                }
            };
        }
        self.misses += 1;
        let v = verify_jwt(token, keys, policy, now)?;
        if self.capacity > 0 {
            if self.map.len() >= self.capacity {
                self.evict(policy, now);
            }
            self.map.insert(token.to_owned(), v.clone());
        }
        Ok(v)
    }

    /// Drops expired entries; if the cache is still full, drops everything (bounded
    /// memory matters more than hit rate under a flood of distinct valid tokens).
    fn evict(&mut self, policy: &JwtPolicy, now: u64) {
        self.map
            .retain(|_, v| check_times(v.exp, v.nbf, v.iat, policy, now).is_ok());
        if self.map.len() >= self.capacity {
            self.map.clear();
        }
    }

    /// Number of cached tokens.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// (hits, misses) so far.
    pub fn stats(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::code::Code;
    use crate::jwk::b64url_encode;
    use crate::jwt::mint_hs256;
    use serde_json::json;

    const SECRET: &[u8; 32] = b"0123456789abcdef0123456789abcdef";

    fn keys() -> JwkSet {
        JwkSet::parse(&format!(
            r#"{{"keys":[{{"kty":"oct","k":"{}"}}]}}"#,
            b64url_encode(SECRET)
        ))
        .unwrap()
    }

    /// The tokens here name no issuer or audience.
    fn any() -> JwtPolicy {
        JwtPolicy {
            any_issuer: true,
            any_audience: true,
            ..JwtPolicy::default()
        }
    }

    fn token(exp: u64, sub: &str) -> String {
        mint_hs256(
            SECRET,
            None,
            json!({"sub": sub, "exp": exp}).as_object().unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn hits_until_expiry_and_bounded() {
        let p = JwtPolicy {
            leeway_secs: 0,
            ..any()
        };
        let mut c = JwtCache::new(2);
        let t = token(100, "a");
        assert!(c.verify(&t, &keys(), &p, 10).is_ok());
        assert!(c.verify(&t, &keys(), &p, 20).is_ok());
        assert_eq!(c.stats(), (1, 1));
        // Expired on a hit: rejected and dropped.
        assert_eq!(
            c.verify(&t, &keys(), &p, 100).unwrap_err().code,
            Code::JwtExpired
        );
        assert!(c.is_empty());
        for i in 0..10 {
            assert!(c
                .verify(&token(100, &format!("u{i}")), &keys(), &p, 10)
                .is_ok());
            assert!(c.len() <= 2);
        }
    }

    #[test]
    fn failures_are_not_cached_and_tampering_misses() {
        let p = any();
        let mut c = JwtCache::new(8);
        let t = token(1000, "a");
        assert!(c.verify(&t, &keys(), &p, 10).is_ok());
        let mut bad = t.clone();
        bad.pop();
        bad.push(if t.ends_with('A') { 'B' } else { 'A' });
        assert_eq!(
            c.verify(&bad, &keys(), &p, 10).unwrap_err().code,
            Code::JwtSignature
        );
        assert_eq!(c.len(), 1);
        let off = JwtCache::new(0);
        assert!(off.is_empty());
    }
}
