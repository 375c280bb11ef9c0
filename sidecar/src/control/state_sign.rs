//! Signatures on the agents' state records in Kafka ([`super::kafka_state`]).
//!
//! A checkpoint or nonce record in `{topic}-state-{module}` decides what every node
//! believes about a module: how many commands were applied, which delivery was
//! decided, which nonces are used. Anyone who may write to the topic could
//! otherwise forge them. Each node signs what it writes with its own Ed25519 key
//! (the *state key*: `GW_STATE_SK_HEX`, or `{state_dir}/state.sk.hex`, created at
//! the first start), and reads only records signed by a node listed in
//! `kafka.state_keys` (node id → public key; unset: this node alone).
//!
//! A record's value is a JSON envelope, readable with any Kafka tool:
//! `{"writer":"node-a","sig":"<64 bytes hex>","body":{…}}`. The signature covers a
//! domain tag and, each prefixed by its length, the topic, the record key, the
//! writer and the body's exact bytes, so a record cannot be moved to another
//! module, cluster topic or key, nor relabelled to another node.
//!
//! What a signature cannot cover: a tombstone (Kafka's delete has no value), and a
//! genuine record written again later (a replay). Both need write access to the
//! topic; `docs/architecture.md` says what they can do and that Kafka ACLs are
//! still the first line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::Deserialize;

use crate::config::OutOfBounds;

/// Domain tag of every signed state record (version 1 of the envelope).
const DOMAIN: &[u8] = b"gw-kafka-state/1";

/// The file a node keeps its state key in when `GW_STATE_SK_HEX` is not set.
pub const KEY_FILE: &str = "state.sk.hex";

/// Signs this node's state records and verifies every node's.
#[derive(Clone)]
pub struct StateSigner {
    me: String,
    key: SigningKey,
    trusted: BTreeMap<String, VerifyingKey>,
    recovery: Option<StateRecovery>,
}

/// What a load takes when a module's newest checkpoint is not signed by a listed
/// node (`kafka.state_recovery`; unset: nothing, the module's agent waits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateRecovery {
    /// The newest signed checkpoint: the operator judged the newer records forged.
    NewestSigned,
    /// The newest checkpoint as it is, with the nonce records no listed node
    /// signed: records written before they were signed (an upgrade), or by a node
    /// the operator had not listed yet.
    AdoptNewest,
}

impl std::fmt::Debug for StateSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateSigner")
            .field("me", &self.me)
            .field("public_key", &self.public_hex())
            .field("trusted", &self.trusted.keys().collect::<Vec<_>>())
            .field("recovery", &self.recovery)
            .finish()
    }
}

/// A record read back: who signed it and its body, or why it is not trusted.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened<'a> {
    /// Signed by `writer`, a listed node.
    Signed {
        /// The node that wrote it.
        writer: String,
        /// The body's exact bytes.
        body: &'a [u8],
    },
    /// Not signed by a listed node.
    Unverified {
        /// Why (for logs; names the claimed writer, never a key).
        why: String,
        /// The body, when one could be found (an envelope, or a record written
        /// before records were signed), for [`StateRecovery::AdoptNewest`].
        body: Option<&'a [u8]>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    writer: String,
    sig: String,
    #[serde(borrow)]
    body: &'a serde_json::value::RawValue,
}

/// The bytes a signature (or a digest) under `domain` covers: the tag, then each
/// part prefixed by its length, so that no two lists of parts encode alike.
pub(crate) fn message(domain: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = Vec::with_capacity(
        domain.len() + 8 * parts.len() + parts.iter().map(|p| p.len()).sum::<usize>(),
    );
    m.extend_from_slice(domain);
    for p in parts {
        m.extend_from_slice(&(p.len() as u64).to_be_bytes());
        m.extend_from_slice(p);
    }
    m
}

/// The bytes a state record's signature covers.
fn record_message(topic: &str, key: &str, writer: &str, body: &[u8]) -> Vec<u8> {
    message(
        DOMAIN,
        &[topic.as_bytes(), key.as_bytes(), writer.as_bytes(), body],
    )
}

/// The bytes a forward's signature covers: `parts`, then the forwarding node.
fn forward_message(node: &str, parts: &[&[u8]]) -> Vec<u8> {
    let mut all = parts.to_vec();
    all.push(node.as_bytes());
    message(FORWARD_DOMAIN, &all)
}

/// A node id as read from Kafka, for a message: escaped, at most 64 characters
/// (what a writer put there can be anything).
fn shown(id: &str) -> String {
    let mut s: String = id
        .chars()
        .take(64)
        .collect::<String>()
        .escape_debug()
        .to_string();
    if id.chars().nth(64).is_some() {
        s.push('…');
    }
    s
}

/// A signature as hex.
fn parse_sig(h: &str) -> Option<Signature> {
    hex::decode(h)
        .ok()
        .and_then(|b| Signature::from_slice(&b).ok())
}

/// Domain tag of a forwarded command's signature (the command topic's headers).
const FORWARD_DOMAIN: &[u8] = b"gw-kafka-command/2";

impl StateSigner {
    /// This node (`me`, signing with `key`) trusting the nodes of `state_keys`
    /// (node id → public key hex; empty: `me` alone). A non-empty list must name
    /// `me` with `key`'s public key.
    pub fn new(
        me: &str,
        key: SigningKey,
        state_keys: &BTreeMap<String, String>,
        recovery: Option<StateRecovery>,
    ) -> Result<StateSigner, OutOfBounds> {
        let mine = key.verifying_key();
        let mut trusted = parse_keys(state_keys)?;
        match trusted.get(me) {
            None if trusted.is_empty() => {
                trusted.insert(me.to_owned(), mine);
            }
            Some(k) if *k == mine => {}
            Some(_) => {
                return Err(OutOfBounds::new(
                    "kafka.state_keys",
                    format!(
                    "lists node `{me}` with another key than this node's state key (public key {})",
                    hex::encode(mine.as_bytes())
                ),
                ))
            }
            None => {
                return Err(OutOfBounds::new(
                    "kafka.state_keys",
                    format!(
                        "must list this node `{me}` too (its state key's public key is {})",
                        hex::encode(mine.as_bytes())
                    ),
                ))
            }
        }
        Ok(StateSigner {
            me: me.to_owned(),
            key,
            trusted,
            recovery,
        })
    }

    /// This node's id.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// This node's public state key, hex.
    pub fn public_hex(&self) -> String {
        hex::encode(self.key.verifying_key().as_bytes())
    }

    /// `kafka.state_recovery`.
    pub fn recovery(&self) -> Option<StateRecovery> {
        self.recovery
    }

    /// The value of record `key` of state topic `topic` holding `body` (JSON).
    pub fn seal(&self, topic: &str, key: &str, body: &[u8]) -> Vec<u8> {
        let sig = self.key.sign(&record_message(topic, key, &self.me, body));
        let writer = serde_json::Value::from(self.me.as_str()).to_string();
        let mut v = Vec::with_capacity(body.len() + 180);
        v.extend_from_slice(br#"{"writer":"#);
        v.extend_from_slice(writer.as_bytes());
        v.extend_from_slice(br#","sig":""#);
        v.extend_from_slice(hex::encode(sig.to_bytes()).as_bytes());
        v.extend_from_slice(br#"","body":"#);
        v.extend_from_slice(body);
        v.push(b'}');
        v
    }

    /// Reads the value of record `key` of state topic `topic`.
    pub fn open<'a>(&self, topic: &str, key: &str, value: &'a [u8]) -> Opened<'a> {
        let env: Envelope<'a> = match serde_json::from_slice(value) {
            Ok(e) => e,
            Err(_) => {
                // Not an envelope: a record from before records were signed (a
                // JSON object), or anything else.
                let legacy = serde_json::from_slice::<serde::de::IgnoredAny>(value).is_ok()
                    && value.trim_ascii_start().first() == Some(&b'{');
                return Opened::Unverified {
                    why: "not signed (no signature envelope)".into(),
                    body: legacy.then_some(value),
                };
            }
        };
        let body = env.body.get().as_bytes();
        let unverified = |why: String| Opened::Unverified {
            why,
            body: Some(body),
        };
        let Some(vk) = self.trusted.get(&env.writer) else {
            return unverified(format!(
                "signed as node `{}`, which kafka.state_keys does not list",
                shown(&env.writer)
            ));
        };
        let Some(sig) = parse_sig(&env.sig) else {
            return unverified("its signature is not 64 bytes of hex".into());
        };
        if vk
            .verify_strict(&record_message(topic, key, &env.writer, body), &sig)
            .is_err()
        {
            return unverified(format!(
                "its signature does not verify with node `{}`'s key",
                env.writer
            ));
        }
        Opened::Signed {
            writer: env.writer,
            body,
        }
    }
}

impl StateSigner {
    /// This node's signature (hex) of a command it forwards to the command topic:
    /// its `parts` (the record key, the signed command bytes, who sent it), as
    /// forwarded by this node.
    pub fn sign_forward(&self, parts: &[&[u8]]) -> String {
        hex::encode(self.key.sign(&forward_message(&self.me, parts)).to_bytes())
    }

    /// Whether node `node`, listed, signed `sig` (hex) over `parts` forwarded by
    /// it; why not otherwise.
    pub fn verify_forward(&self, node: &str, sig: &str, parts: &[&[u8]]) -> Result<(), String> {
        let Some(vk) = self.trusted.get(node) else {
            return Err(format!(
                "forwarded as node `{}`, which kafka.state_keys does not list",
                shown(node)
            ));
        };
        let Some(sig) = parse_sig(sig) else {
            return Err("its node signature is not 64 bytes of hex".into());
        };
        vk.verify_strict(&forward_message(node, parts), &sig)
            .map_err(|_| format!("its signature does not verify with node `{node}`'s key"))
    }
}

/// `kafka.state_keys`: node id → public key.
pub fn parse_keys(
    state_keys: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, VerifyingKey>, OutOfBounds> {
    state_keys
        .iter()
        .map(|(id, h)| {
            if !crate::config::node_id_ok(id) {
                return Err(OutOfBounds::new(
                    "kafka.state_keys",
                    format!("`{}` is not a node id", id.escape_debug()),
                ));
            }
            gw_core::jwk::ed25519_from_hex(h)
                .map(|k| (id.clone(), k))
                .map_err(|e| OutOfBounds::new("kafka.state_keys", format!("node `{id}`: {e}")))
        })
        .collect()
}

/// Why the state key cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum StateKeyError {
    /// `GW_STATE_SK_HEX` or the key file is not a key.
    #[error("state key {0}: {1}")]
    Invalid(String, String),
    /// The key file cannot be read or created.
    #[error("state key {0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
}

/// The node's state key kept in `{state_dir}/state.sk.hex` (hex seed), created
/// (mode 0600) when missing.
pub fn node_key(state_dir: &Path) -> Result<SigningKey, StateKeyError> {
    let path = state_dir.join(KEY_FILE);
    let read = || -> Result<SigningKey, StateKeyError> {
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(&path).map_err(|e| StateKeyError::Io(path.clone(), e))?,
        );
        gw_core::jwk::ed25519_secret_from_hex(&text)
            .map_err(|e| StateKeyError::Invalid(path.display().to_string(), e.to_string()))
    };
    if path.exists() {
        // The rule every secret file is held to (`--check` and the start).
        if let Some(w) = crate::config::readable_by_others("the state key file", &path) {
            tracing::warn!("{w}");
        }
        return read();
    }
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, seed.as_mut()).map_err(|e| {
        StateKeyError::Invalid(path.display().to_string(), format!("no randomness: {e}"))
    })?;
    let text = zeroize::Zeroizing::new(format!("{}\n", hex::encode(seed.as_ref())));
    crate::durable::create_dir(state_dir).map_err(|e| StateKeyError::Io(state_dir.into(), e))?;
    match crate::durable::write_secret_new(&path, text.as_bytes()) {
        // Another process created it meanwhile: what is on disk is the key.
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(StateKeyError::Io(path.clone(), e)),
    }
    read()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(me: &str, seed: u8, keys: &[(&str, u8)]) -> StateSigner {
        let keys = keys
            .iter()
            .map(|(id, s)| {
                let vk = SigningKey::from_bytes(&[*s; 32]).verifying_key();
                ((*id).to_owned(), hex::encode(vk.as_bytes()))
            })
            .collect();
        StateSigner::new(me, SigningKey::from_bytes(&[seed; 32]), &keys, None).unwrap()
    }

    #[test]
    fn a_record_a_listed_node_sealed_opens_and_nothing_else_does() {
        let a = signer("a", 1, &[("a", 1), ("b", 2)]);
        let b = signer("b", 2, &[("a", 1), ("b", 2)]);
        let body = br#"{"state":{},"writer":"b"}"#;
        let v = b.seal("t-state-mev", "state", body);
        assert_eq!(
            a.open("t-state-mev", "state", &v),
            Opened::Signed {
                writer: "b".into(),
                body
            }
        );
        // Another module, another key: not the record that was signed.
        assert!(matches!(
            a.open("t-state-arbitrage", "state", &v),
            Opened::Unverified { .. }
        ));
        assert!(matches!(
            a.open("t-state-mev", "n/x/1", &v),
            Opened::Unverified { .. }
        ));
        // Relabelled to another listed writer.
        let s = String::from_utf8(v.clone()).unwrap();
        let relabelled = s.replacen(r#""writer":"b""#, r#""writer":"a""#, 1);
        assert!(matches!(
            a.open("t-state-mev", "state", relabelled.as_bytes()),
            Opened::Unverified { .. }
        ));
        // One byte of the body changed.
        let tampered = s.replacen(r#""state":{}"#, r#""state":[]"#, 1);
        match a.open("t-state-mev", "state", tampered.as_bytes()) {
            Opened::Unverified { why, body } => {
                assert!(why.contains("does not verify"), "{why}");
                assert_eq!(body, Some(br#"{"state":[],"writer":"b"}"#.as_slice()));
            }
            o => panic!("{o:?}"),
        }
        // A node not listed, with a well-formed signature of its own.
        let c = signer("c", 3, &[]);
        match a.open(
            "t-state-mev",
            "state",
            &c.seal("t-state-mev", "state", body),
        ) {
            Opened::Unverified { why, .. } => assert!(why.contains("does not list"), "{why}"),
            o => panic!("{o:?}"),
        }
        // A bare JSON record (written before signing) and garbage.
        assert_eq!(
            a.open("t-state-mev", "state", body),
            Opened::Unverified {
                why: "not signed (no signature envelope)".into(),
                body: Some(body)
            }
        );
        assert!(matches!(
            a.open("t-state-mev", "state", b"\xff{"),
            Opened::Unverified { body: None, .. }
        ));
        // An envelope with a field more is not an envelope.
        let extra = s.replacen('{', r#"{"x":1,"#, 1);
        assert!(matches!(
            a.open("t-state-mev", "state", extra.as_bytes()),
            Opened::Unverified { .. }
        ));
    }

    #[test]
    fn a_forwarded_command_verifies_only_as_its_node_signed_it() {
        let a = signer("a", 1, &[("a", 1), ("b", 2)]);
        let b = signer("b", 2, &[("a", 1), ("b", 2)]);
        let parts: [&[u8]; 3] = [b"mev", b"command", b"alice"];
        let sig = b.sign_forward(&parts);
        assert_eq!(a.verify_forward("b", &sig, &parts), Ok(()));
        // As another node, over other parts, or with a part moved across a boundary.
        assert!(a.verify_forward("a", &sig, &parts).is_err());
        assert!(a
            .verify_forward("b", &sig, &[b"mev", b"command", b"mallory"])
            .is_err());
        assert!(a
            .verify_forward("b", &sig, &[b"mev", b"commanda", b"lice"])
            .is_err());
        let e = a.verify_forward("c", &sig, &parts).unwrap_err();
        assert!(e.contains("does not list"), "{e}");
        let e = a.verify_forward("b", "zz", &parts).unwrap_err();
        assert!(e.contains("64 bytes"), "{e}");
        // A state record's signature is not a forward's over the same parts: only
        // the domain tags tell them apart. Record (topic t, key state, writer b,
        // body b) and forward (parts t, state, b; node b) cover the same parts.
        let sig = b.key.sign(&record_message("t", "state", "b", b"b"));
        let same_parts: [&[u8]; 4] = [b"t", b"state", b"b", b"b"];
        assert!(b
            .key
            .verifying_key()
            .verify_strict(&message(DOMAIN, &same_parts), &sig)
            .is_ok());
        let e = a
            .verify_forward("b", &hex::encode(sig.to_bytes()), &same_parts[..3])
            .unwrap_err();
        assert!(e.contains("does not verify"), "{e}");
    }

    #[test]
    fn without_a_list_a_node_trusts_itself_alone_and_a_list_must_name_it_with_its_key() {
        let alone = signer("a", 1, &[]);
        let v = alone.seal("t-state-mev", "state", b"{}");
        assert!(matches!(
            alone.open("t-state-mev", "state", &v),
            Opened::Signed { .. }
        ));
        let other = signer("b", 2, &[]);
        assert!(matches!(
            other.open("t-state-mev", "state", &v),
            Opened::Unverified { .. }
        ));

        let key = |s: u8| hex::encode(SigningKey::from_bytes(&[s; 32]).verifying_key().as_bytes());
        let list = |e: &[(&str, String)]| {
            e.iter()
                .map(|(a, b)| ((*a).to_owned(), b.clone()))
                .collect()
        };
        let me = || SigningKey::from_bytes(&[1; 32]);
        let e = StateSigner::new("a", me(), &list(&[("b", key(2))]), None).unwrap_err();
        assert!(
            e.reason.contains("must list this node `a`") && e.reason.contains(&key(1)),
            "{e}"
        );
        let e = StateSigner::new("a", me(), &list(&[("a", key(2))]), None).unwrap_err();
        assert!(e.reason.contains("another key"), "{e}");
        let e = StateSigner::new("a", me(), &list(&[("a", "zz".into())]), None).unwrap_err();
        assert_eq!(e.key, "kafka.state_keys");
        let e = StateSigner::new("a", me(), &list(&[("a b", key(1))]), None).unwrap_err();
        assert!(e.reason.contains("not a node id"), "{e}");
        // The Debug shows the public key, never the secret.
        let d = format!("{alone:?}");
        assert!(
            d.contains(&key(1)) && !d.contains(&hex::encode([1u8; 32])),
            "{d}"
        );
    }

    #[test]
    fn the_key_file_is_created_once_and_read_back() {
        let dir = testkit::TempDir::new("state-key");
        let k1 = node_key(dir.path()).unwrap();
        let k2 = node_key(dir.path()).unwrap();
        assert_eq!(k1.to_bytes(), k2.to_bytes());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A secret of the wrong length is refused without being echoed.
        let short = "ab".repeat(31);
        std::fs::write(dir.path().join(KEY_FILE), &short).unwrap();
        match node_key(dir.path()) {
            Err(e @ StateKeyError::Invalid(..)) => {
                let e = e.to_string();
                assert!(e.contains("32 bytes") && !e.contains(&short), "{e}");
            }
            o => panic!("{:?}", o.map(|_| ())),
        }
    }
}
