//! The command key ring: `pubkey_id` → Ed25519 public key, with a validity window
//! and the issuers, modules and actions the key may sign for.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

use crate::code::{Code, Reject};
use crate::edverify::PrecomputedKey;
use crate::jwk::{ed25519_from_hex, Jwk, JwkJson, KeyError, KeyMaterial};
use crate::names::{Action, Module};
use crate::sigmemo::SigMemo;

/// One key as written in configuration. Scope lists that are absent allow anything;
/// a present list (even empty) allows only what it names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The `pubkey_id` commands name.
    pub id: String,
    /// The public key as 64 hex characters (or give `jwk`).
    #[serde(default)]
    pub public_key_hex: Option<String>,
    /// The public key as a JWK `OKP`/`Ed25519` (or give `public_key_hex`).
    #[serde(default)]
    pub jwk: Option<JwkJson>,
    /// Unix seconds before which the key is not valid.
    #[serde(default)]
    pub not_before: Option<u64>,
    /// Unix seconds after which the key is not valid.
    #[serde(default)]
    pub not_after: Option<u64>,
    /// Issuers this key may sign for.
    #[serde(default)]
    pub issuers: Option<Vec<String>>,
    /// Modules (`arbitrage`, `mev`) this key may command.
    #[serde(default)]
    pub modules: Option<Vec<String>>,
    /// Actions (`start`, `stop`, `restart`, `throttle`, `policy`, `kill`) this key may sign.
    #[serde(default)]
    pub actions: Option<Vec<String>>,
}

/// The key ring as written in configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRingConfig {
    /// The keys.
    pub keys: Vec<KeyConfig>,
}

/// Why a key ring configuration cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyRingError {
    /// A key's material is invalid.
    #[error("key `{id}`: {source}")]
    Key {
        /// The key id.
        id: String,
        /// What is wrong.
        source: KeyError,
    },
    /// A key gives both or neither of `public_key_hex` and `jwk`, or a JWK that is not Ed25519.
    #[error("key `{0}`: give exactly one Ed25519 public key (`public_key_hex` or an OKP `jwk`)")]
    KeySource(String),
    /// Two keys share an id.
    #[error("duplicate key id `{0}`")]
    Duplicate(String),
    /// Two ids share a public key: a command's key id is not signed, so a command
    /// signed by that key could be relabelled to either id (and its scope, window
    /// and ledger attribution).
    #[error("keys `{0}` and `{1}` are the same public key: give each key one id")]
    SharedKey(String, String),
    /// An empty key id.
    #[error("a key has an empty id")]
    EmptyId,
    /// A scope names an unknown module or action.
    #[error("key `{0}`: unknown {1} `{2}`")]
    UnknownName(String, &'static str, String),
    /// `not_before` after `not_after`.
    #[error("key `{0}`: not_before is after not_after")]
    Window(String),
    /// The JSON does not parse.
    #[error("key ring JSON: {0}")]
    Json(String),
    /// More keys than a ring with tables holds (each key's table costs memory per VM).
    #[error("{0} command keys: at most {MAX_TABLE_KEYS} when verifying with tables (each key's table is built in every VM)")]
    TooManyKeys(usize),
}

/// Most keys a ring verifying with tables holds (command keys are operators' keys:
/// a handful, two during a rotation); bounds the tables' memory per wasm VM.
pub const MAX_TABLE_KEYS: usize = 16;

/// A validated Ed25519 command key.
#[derive(Debug, Clone)]
pub struct CommandKey {
    /// The `pubkey_id`.
    pub id: String,
    key: ed25519_dalek::VerifyingKey,
    /// The key's fixed-base table, when the ring precomputes (the edge does).
    tables: Option<PrecomputedKey>,
    not_before: Option<u64>,
    not_after: Option<u64>,
    issuers: Option<Vec<String>>,
    modules: Option<Vec<Module>>,
    actions: Option<Vec<Action>>,
}

impl CommandKey {
    /// A key with no validity window and no scope limits.
    pub fn unrestricted(id: impl Into<String>, key: ed25519_dalek::VerifyingKey) -> Self {
        CommandKey {
            id: id.into(),
            key,
            tables: None,
            not_before: None,
            not_after: None,
            issuers: None,
            modules: None,
            actions: None,
        }
    }

    fn from_config(c: &KeyConfig) -> Result<Self, KeyRingError> {
        if c.id.is_empty() {
            return Err(KeyRingError::EmptyId);
        }
        let key_err = |source| KeyRingError::Key {
            id: c.id.clone(),
            source,
        };
        let key = match (&c.public_key_hex, &c.jwk) {
            // The examples' placeholder, named as such.
            (Some(h), None) if h.starts_with("REPLACE") => {
                return Err(key_err(KeyError::Invalid(
                    "public_key_hex is the example's placeholder: put the key's public key there",
                )))
            }
            (Some(h), None) => ed25519_from_hex(h).map_err(key_err)?,
            (None, Some(j)) => match Jwk::from_json(j).map_err(key_err)?.key {
                KeyMaterial::Ed25519(k) => k,
                _ => return Err(KeyRingError::KeySource(c.id.clone())),
            },
            _ => return Err(KeyRingError::KeySource(c.id.clone())),
        };
        if let (Some(a), Some(b)) = (c.not_before, c.not_after) {
            if a > b {
                return Err(KeyRingError::Window(c.id.clone()));
            }
        }
        let modules = c
            .modules
            .as_ref()
            .map(|v| {
                v.iter()
                    .map(|m| {
                        Module::parse(m).ok_or_else(|| {
                            KeyRingError::UnknownName(c.id.clone(), "module", m.clone())
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        let actions = c
            .actions
            .as_ref()
            .map(|v| {
                v.iter()
                    .map(|a| {
                        Action::parse(a).ok_or_else(|| {
                            KeyRingError::UnknownName(c.id.clone(), "action", a.clone())
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        Ok(CommandKey {
            id: c.id.clone(),
            key,
            tables: None,
            not_before: c.not_before,
            not_after: c.not_after,
            issuers: c.issuers.clone(),
            modules,
            actions,
        })
    }

    /// The public key.
    pub fn key(&self) -> &ed25519_dalek::VerifyingKey {
        &self.key
    }

    /// Whether this key verifies with a precomputed table.
    pub fn is_precomputed(&self) -> bool {
        self.tables.is_some()
    }

    fn precompute(&mut self) -> Result<(), KeyRingError> {
        let t = PrecomputedKey::new(self.key.as_bytes()).map_err(|source| KeyRingError::Key {
            id: self.id.clone(),
            source,
        })?;
        self.tables = Some(t);
        Ok(())
    }

    /// Strict Ed25519 verification of `signature` over `message` (the rules of
    /// `ed25519_dalek::VerifyingKey::verify_strict`), with the key's table when
    /// the ring precomputes, else with `ed25519-dalek`.
    pub fn verify_strict(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        match &self.tables {
            Some(t) => t.verify_strict(message, signature),
            None => self
                .key
                .verify_strict(message, &ed25519_dalek::Signature::from_bytes(signature))
                .is_ok(),
        }
    }

    /// Checks the validity window at `now` (unix seconds).
    pub fn check_validity(&self, now: u64) -> Result<(), Reject> {
        if self.not_before.is_some_and(|nb| now < nb) {
            return Err(Reject::with(
                Code::KeyNotYetValid,
                format!("key `{}` is not valid yet", self.id),
            ));
        }
        if self.not_after.is_some_and(|na| now > na) {
            return Err(Reject::with(
                Code::KeyExpired,
                format!("key `{}` has expired", self.id),
            ));
        }
        Ok(())
    }

    /// Checks that the key was valid at some moment of `from..=to` (the moments a
    /// command now on the bus could have been admitted at).
    pub fn check_validity_within(&self, from: u64, to: u64) -> Result<(), Reject> {
        if self.not_before.is_some_and(|nb| to < nb) {
            return Err(Reject::with(
                Code::KeyNotYetValid,
                format!(
                    "key `{}` was not valid yet when the command was admitted",
                    self.id
                ),
            ));
        }
        if self.not_after.is_some_and(|na| from > na) {
            return Err(Reject::with(
                Code::KeyExpired,
                format!(
                    "key `{}` had expired before the command could be admitted",
                    self.id
                ),
            ));
        }
        Ok(())
    }

    /// Checks that the key may sign `action` on `module` for `issuer`.
    pub fn check_scope(&self, issuer: &str, module: Module, action: Action) -> Result<(), Reject> {
        if let Some(list) = &self.issuers {
            if !list.iter().any(|i| i == issuer) {
                return Err(Reject::with(
                    Code::KeyScope,
                    format!("key `{}` may not sign for issuer `{issuer}`", self.id),
                ));
            }
        }
        if self.modules.as_ref().is_some_and(|m| !m.contains(&module)) {
            return Err(Reject::with(
                Code::KeyScope,
                format!(
                    "key `{}` may not command module `{}`",
                    self.id,
                    module.as_str()
                ),
            ));
        }
        if self.actions.as_ref().is_some_and(|a| !a.contains(&action)) {
            return Err(Reject::with(
                Code::KeyScope,
                format!(
                    "key `{}` may not sign action `{}`",
                    self.id,
                    action.as_str()
                ),
            ));
        }
        Ok(())
    }
}

/// All command keys, by `pubkey_id`.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    keys: BTreeMap<String, CommandKey>,
    precompute: bool,
    /// Signatures already verified in this process, shared by the ring's clones.
    memo: Option<Arc<SigMemo>>,
}

impl KeyRing {
    /// An empty key ring.
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates a configuration into a key ring.
    pub fn from_config(cfg: &KeyRingConfig) -> Result<Self, KeyRingError> {
        let mut ring = KeyRing::new();
        for c in &cfg.keys {
            ring.insert(CommandKey::from_config(c)?)?;
        }
        Ok(ring)
    }

    /// Parses and validates a JSON configuration.
    pub fn from_json(json: &str) -> Result<Self, KeyRingError> {
        let cfg: KeyRingConfig =
            serde_json::from_str(json).map_err(|e| KeyRingError::Json(e.to_string()))?;
        Self::from_config(&cfg)
    }

    /// Verifies with per-key fixed-base tables from now on (one table per key, plus
    /// one for the base point per process): every key now in the ring and every key
    /// added later. The edge filter uses this; see [`crate::edverify`] for why.
    pub fn precompute_tables(&mut self) -> Result<(), KeyRingError> {
        if self.keys.len() > MAX_TABLE_KEYS {
            return Err(KeyRingError::TooManyKeys(self.keys.len()));
        }
        self.precompute = true;
        crate::edverify::warm_up();
        for k in self.keys.values_mut() {
            k.precompute()?;
        }
        Ok(())
    }

    /// Remembers the newest `capacity` signatures that verified, in one memo shared
    /// by the clones of this ring made from now on, so the same bytes under the same
    /// key are verified once per process (the sidecar: admission, then the agent).
    /// See [`crate::sigmemo`]. Returns the memo (for its counts).
    pub fn remember_verified(&mut self, capacity: usize) -> Arc<SigMemo> {
        let m = Arc::new(SigMemo::new(capacity));
        self.memo = Some(m.clone());
        m
    }

    /// The ring's memo, when it keeps one.
    pub fn memo(&self) -> Option<&Arc<SigMemo>> {
        self.memo.as_ref()
    }

    /// The first of `messages` that `signature` verifies over under `key` (one of
    /// this ring's keys; strict Ed25519), through the ring's memo when it keeps
    /// one; `None` when none does.
    pub fn first_verified(
        &self,
        key: &CommandKey,
        messages: &[&[u8]],
        signature: &[u8; 64],
    ) -> Option<usize> {
        match &self.memo {
            Some(m) => m.first_verified(key, messages, signature),
            None => messages
                .iter()
                .position(|m| key.verify_strict(m, signature)),
        }
    }

    /// `Err` when a key other than `id` is `key`.
    fn unshared(&self, id: &str, key: &ed25519_dalek::VerifyingKey) -> Result<(), KeyRingError> {
        match self
            .keys
            .values()
            .find(|k| k.id != id && k.key.as_bytes() == key.as_bytes())
        {
            Some(other) => Err(KeyRingError::SharedKey(other.id.clone(), id.to_owned())),
            None => Ok(()),
        }
    }

    /// Adds a key; ids and public keys must be unique.
    pub fn insert(&mut self, mut key: CommandKey) -> Result<(), KeyRingError> {
        if key.id.is_empty() {
            return Err(KeyRingError::EmptyId);
        }
        if self.keys.contains_key(&key.id) {
            return Err(KeyRingError::Duplicate(key.id));
        }
        self.unshared(&key.id, &key.key)?;
        if self.precompute && self.keys.len() >= MAX_TABLE_KEYS {
            return Err(KeyRingError::TooManyKeys(self.keys.len() + 1));
        }
        if self.precompute {
            key.precompute()?;
        }
        self.keys.insert(key.id.clone(), key);
        Ok(())
    }

    /// Replaces the public key of `id`, keeping its window and scope; `Ok(false)`
    /// if there is no such key.
    pub fn set_public_key(
        &mut self,
        id: &str,
        key: ed25519_dalek::VerifyingKey,
    ) -> Result<bool, KeyRingError> {
        let Some(old) = self.keys.get(id) else {
            return Ok(false);
        };
        self.unshared(id, &key)?;
        // Build the replacement whole, so a key never sits beside another key's table.
        let mut new = CommandKey {
            key,
            tables: None,
            ..old.clone()
        };
        if self.precompute {
            new.precompute()?;
        }
        self.keys.insert(id.to_owned(), new);
        Ok(true)
    }

    /// Looks up a key by `pubkey_id`.
    pub fn get(&self, id: &str) -> Option<&CommandKey> {
        self.keys.get(id)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the ring holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pk_hex(seed: u8) -> String {
        hex::encode(
            ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
                .verifying_key()
                .as_bytes(),
        )
    }

    #[test]
    fn parses_scopes_and_windows() {
        let json = format!(
            r#"{{"keys":[{{"id":"op-admin-1","public_key_hex":"{}","not_before":100,"not_after":200,
                "issuers":["dashboard"],"modules":["mev"],"actions":["throttle","policy"]}}]}}"#,
            pk_hex(1)
        );
        let ring = KeyRing::from_json(&json).unwrap();
        let k = ring.get("op-admin-1").unwrap();
        assert_eq!(k.check_validity(99).unwrap_err().code, Code::KeyNotYetValid);
        assert!(k.check_validity(150).is_ok());
        assert_eq!(k.check_validity(201).unwrap_err().code, Code::KeyExpired);
        assert!(k
            .check_scope("dashboard", Module::Mev, Action::Throttle)
            .is_ok());
        for (i, m, a) in [
            ("ops", Module::Mev, Action::Throttle),
            ("dashboard", Module::Arbitrage, Action::Throttle),
            ("dashboard", Module::Mev, Action::Kill),
        ] {
            assert_eq!(k.check_scope(i, m, a).unwrap_err().code, Code::KeyScope);
        }
    }

    /// A command's key id is not signed: one public key under two ids would let
    /// its commands be relabelled to the id with the wider scope or window.
    #[test]
    fn one_public_key_has_one_id() {
        let json = format!(
            r#"{{"keys":[{{"id":"a","public_key_hex":"{0}","modules":["mev"]}},{{"id":"b","public_key_hex":"{0}"}}]}}"#,
            pk_hex(1)
        );
        let err = KeyRing::from_json(&json).unwrap_err();
        assert_eq!(err, KeyRingError::SharedKey("a".into(), "b".into()));
        // Nor by replacing a key's material with another id's.
        let json = format!(
            r#"{{"keys":[{{"id":"a","public_key_hex":"{}"}},{{"id":"b","public_key_hex":"{}"}}]}}"#,
            pk_hex(1),
            pk_hex(2)
        );
        let mut ring = KeyRing::from_json(&json).unwrap();
        let a = *ring.get("a").unwrap().key();
        assert_eq!(
            ring.set_public_key("b", a),
            Err(KeyRingError::SharedKey("a".into(), "b".into()))
        );
        // Its own key again is no conflict.
        assert_eq!(ring.set_public_key("a", a), Ok(true));
    }

    #[test]
    fn jwk_keys_are_accepted() {
        let vk = ed25519_dalek::SigningKey::from_bytes(&[3; 32]).verifying_key();
        let jwk = crate::jwk::ed25519_public_jwk("k", &vk);
        let json = format!(r#"{{"keys":[{{"id":"k","jwk":{jwk}}}]}}"#);
        let ring = KeyRing::from_json(&json).unwrap();
        assert_eq!(*ring.get("k").unwrap().key(), vk);
    }

    #[test]
    fn a_ring_with_tables_holds_at_most_max_table_keys() {
        let key = |i: usize| {
            let vk = ed25519_dalek::SigningKey::from_bytes(&[i as u8; 32]).verifying_key();
            CommandKey::unrestricted(format!("k{i}"), vk)
        };
        let mut ring = KeyRing::new();
        for i in 1..=MAX_TABLE_KEYS + 1 {
            ring.insert(key(i)).unwrap();
        }
        let err = ring.precompute_tables().unwrap_err();
        assert_eq!(err, KeyRingError::TooManyKeys(MAX_TABLE_KEYS + 1));
        assert!(
            err.to_string()
                .contains(&format!("at most {MAX_TABLE_KEYS} ")),
            "{err}"
        );

        let mut ring = KeyRing::new();
        for i in 1..=MAX_TABLE_KEYS {
            ring.insert(key(i)).unwrap();
        }
        ring.precompute_tables().unwrap();
        let over = key(MAX_TABLE_KEYS + 1);
        assert_eq!(
            ring.insert(over).unwrap_err(),
            KeyRingError::TooManyKeys(MAX_TABLE_KEYS + 1)
        );
        assert_eq!(ring.len(), MAX_TABLE_KEYS);
    }

    #[test]
    fn tables_follow_every_key_in_a_precomputing_ring() {
        use ed25519_dalek::Signer;
        let sk = |seed: u8| ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let json = format!(
            r#"{{"keys":[{{"id":"a","public_key_hex":"{}"}}]}}"#,
            pk_hex(1)
        );
        let mut ring = KeyRing::from_json(&json).unwrap();
        assert!(!ring.get("a").unwrap().is_precomputed());
        let msg = b"payload";
        let sig1 = sk(1).sign(msg).to_bytes();
        assert!(ring.get("a").unwrap().verify_strict(msg, &sig1));

        ring.precompute_tables().unwrap();
        assert!(ring.get("a").unwrap().is_precomputed());
        assert!(ring.get("a").unwrap().verify_strict(msg, &sig1));
        ring.insert(CommandKey::unrestricted("b", sk(2).verifying_key()))
            .unwrap();
        let b = ring.get("b").unwrap();
        assert!(b.is_precomputed());
        assert!(b.verify_strict(msg, &sk(2).sign(msg).to_bytes()));
        assert!(!b.verify_strict(msg, &sig1));

        // A replaced key gets a new table: the old key's signatures stop verifying.
        assert!(ring.set_public_key("a", sk(3).verifying_key()).unwrap());
        let a = ring.get("a").unwrap();
        assert!(a.is_precomputed());
        assert!(!a.verify_strict(msg, &sig1));
        assert!(a.verify_strict(msg, &sk(3).sign(msg).to_bytes()));
        assert!(!ring.set_public_key("zz", sk(3).verifying_key()).unwrap());
    }

    #[test]
    fn config_errors_are_clear() {
        let pk = pk_hex(2);
        let cases = [
            (r#"{"keys":[{"id":"a"}]}"#.to_string(), "exactly one"),
            (
                format!(
                    r#"{{"keys":[{{"id":"a","public_key_hex":"{pk}"}},{{"id":"a","public_key_hex":"{pk}"}}]}}"#
                ),
                "duplicate",
            ),
            (
                format!(r#"{{"keys":[{{"id":"","public_key_hex":"{pk}"}}]}}"#),
                "empty id",
            ),
            (
                format!(r#"{{"keys":[{{"id":"a","public_key_hex":"{pk}","modules":["hft"]}}]}}"#),
                "unknown module `hft`",
            ),
            (
                format!(
                    r#"{{"keys":[{{"id":"a","public_key_hex":"{pk}","not_before":5,"not_after":4}}]}}"#
                ),
                "not_before",
            ),
            (
                r#"{"keys":[{"id":"a","public_key_hex":"abcd"}]}"#.to_string(),
                "32 bytes",
            ),
            (
                format!(r#"{{"keys":[{{"id":"a","public_key_hex":"{pk}","extra":1}}]}}"#),
                "unknown field",
            ),
        ];
        for (json, want) in cases {
            let err = KeyRing::from_json(&json).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should mention {want}");
        }
    }
}
