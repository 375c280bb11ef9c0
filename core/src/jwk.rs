//! JSON Web Keys (RFC 7517): `oct` secrets for HMAC, `EC` P-256 and `OKP` Ed25519
//! public keys. Used by the JWT verifier and by the command key ring.

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use serde::Deserialize;

/// base64url that tolerates padding: JWK producers disagree about it.
const B64URL_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decodes base64url with or without padding.
pub fn b64url_decode_lenient(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    B64URL_LENIENT.decode(s)
}

/// Decodes unpadded base64url, as JWS compact segments must be (RFC 7515 §2).
pub fn b64url_decode_strict(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    URL_SAFE_NO_PAD.decode(s)
}

/// Encodes unpadded base64url.
pub fn b64url_encode(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

/// Smallest HMAC secret we accept, in bytes (RFC 7518 §3.2 asks for at least the
/// hash size; we hold every HS variant to 32).
pub const MIN_HMAC_KEY_BYTES: usize = 32;

/// Why a JWK (or hex key) cannot be used. Never contains key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The JSON does not have the JWK shape.
    #[error("invalid JWK: {0}")]
    Json(String),
    /// `kty`/`crv` combination we do not support.
    #[error("unsupported key type {0}")]
    Unsupported(String),
    /// A required member is missing.
    #[error("JWK member `{0}` is missing")]
    Missing(&'static str),
    /// A member is not valid base64url / hex.
    #[error("JWK member `{0}` is not valid base64url/hex")]
    Encoding(&'static str),
    /// Decoded bytes are not a valid key.
    #[error("invalid key bytes: {0}")]
    Invalid(&'static str),
    /// A public key set holds a private key.
    #[error("private key material (`d`) in a public key set")]
    PrivateMaterial,
    /// An HMAC secret shorter than [`MIN_HMAC_KEY_BYTES`].
    #[error("HMAC secret is {0} bytes; at least {MIN_HMAC_KEY_BYTES} are required")]
    ShortSecret(usize),
}

/// The JSON members of a JWK that we read. Its `Debug` names the secret
/// members (`k`, `d`) as present or absent, never their values.
#[derive(Clone, Deserialize)]
pub struct JwkJson {
    /// Key type: `oct`, `EC` or `OKP`.
    pub kty: String,
    /// Key id.
    #[serde(default)]
    pub kid: Option<String>,
    /// Algorithm the key is meant for, if pinned.
    #[serde(default)]
    pub alg: Option<String>,
    /// Curve for `EC`/`OKP`.
    #[serde(default)]
    pub crv: Option<String>,
    /// Public x coordinate / Ed25519 public key.
    #[serde(default)]
    pub x: Option<String>,
    /// Public y coordinate.
    #[serde(default)]
    pub y: Option<String>,
    /// Symmetric secret.
    #[serde(default)]
    pub k: Option<String>,
    /// Private scalar (refused in public sets).
    #[serde(default)]
    pub d: Option<String>,
    /// Intended use (`sig`/`enc`).
    #[serde(default, rename = "use")]
    pub use_: Option<String>,
    /// The issuer this key signs for (not a JWK member of RFC 7517: the
    /// gateway's own, set by the operator): a token it verifies must carry this
    /// `iss`. Needed on every key when more than one issuer is accepted, so that
    /// one issuer's key cannot sign tokens in another's name.
    #[serde(default)]
    pub iss: Option<String>,
}

impl std::fmt::Debug for JwkJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        f.debug_struct("JwkJson")
            .field("kty", &self.kty)
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("crv", &self.crv)
            .field("x", &self.x)
            .field("y", &self.y)
            .field("k", &secret(&self.k))
            .field("d", &secret(&self.d))
            .field("use", &self.use_)
            .field("iss", &self.iss)
            .finish()
    }
}

/// Key material of a parsed JWK.
#[derive(Clone)]
pub enum KeyMaterial {
    /// HMAC secret (never printed).
    Oct(zeroize::Zeroizing<Vec<u8>>),
    /// ECDSA P-256 public key.
    P256(p256::ecdsa::VerifyingKey),
    /// Ed25519 public key.
    Ed25519(ed25519_dalek::VerifyingKey),
}

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyMaterial::Oct(k) => write!(f, "Oct(<{} bytes redacted>)", k.len()),
            KeyMaterial::P256(_) => f.write_str("P256(..)"),
            KeyMaterial::Ed25519(k) => write!(f, "Ed25519({})", hex::encode(k.as_bytes())),
        }
    }
}

/// A parsed, validated JWK.
#[derive(Debug, Clone)]
pub struct Jwk {
    /// Key id, if any.
    pub kid: Option<String>,
    /// Pinned algorithm, if any.
    pub alg: Option<String>,
    /// The issuer it signs for, if pinned ([`JwkJson::iss`]).
    pub iss: Option<String>,
    /// The key.
    pub key: KeyMaterial,
}

fn member<'a>(v: Option<&'a String>, name: &'static str) -> Result<&'a str, KeyError> {
    v.map(String::as_str).ok_or(KeyError::Missing(name))
}

fn decode_member(v: Option<&String>, name: &'static str) -> Result<Vec<u8>, KeyError> {
    b64url_decode_lenient(member(v, name)?).map_err(|_| KeyError::Encoding(name))
}

/// Parses 32 bytes of hex as an Ed25519 public key, refusing weak (small-order) keys.
pub fn ed25519_from_hex(s: &str) -> Result<ed25519_dalek::VerifyingKey, KeyError> {
    let bytes = hex::decode(s.trim()).map_err(|_| KeyError::Encoding("hex"))?;
    ed25519_from_bytes(&bytes)
}

/// Parses a 32-byte Ed25519 secret seed given as hex; the decoded bytes are wiped.
pub fn ed25519_secret_from_hex(s: &str) -> Result<ed25519_dalek::SigningKey, KeyError> {
    let bytes =
        zeroize::Zeroizing::new(hex::decode(s.trim()).map_err(|_| KeyError::Invalid("not hex"))?);
    let seed: &[u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| KeyError::Invalid("Ed25519 secret key must be 32 bytes"))?;
    Ok(ed25519_dalek::SigningKey::from_bytes(seed))
}

/// Why an Ed25519 public key of small order is refused (here and by the edge's tables).
pub(crate) const WEAK_ED25519: &str = "weak (small-order) Ed25519 key";

/// Parses raw bytes as an Ed25519 public key, refusing weak (small-order) keys.
pub fn ed25519_from_bytes(bytes: &[u8]) -> Result<ed25519_dalek::VerifyingKey, KeyError> {
    let arr: [u8; 32] = bytes
        .try_into()
        .map_err(|_| KeyError::Invalid("Ed25519 public key must be 32 bytes"))?;
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&arr)
        .map_err(|_| KeyError::Invalid("not a point on Ed25519"))?;
    // One encoding per key: y ≥ p or a "negative zero" x decode, but no signer
    // produces them (and the edge's table verifier refuses them).
    if vk.to_edwards().compress().to_bytes() != arr {
        return Err(KeyError::Invalid("non-canonical Ed25519 point encoding"));
    }
    if vk.is_weak() {
        return Err(KeyError::Invalid(WEAK_ED25519));
    }
    Ok(vk)
}

impl Jwk {
    /// Parses one JWK object.
    pub fn from_json(j: &JwkJson) -> Result<Jwk, KeyError> {
        if j.use_.as_deref().is_some_and(|u| u != "sig") {
            return Err(KeyError::Unsupported(format!(
                "use={}",
                j.use_.as_deref().unwrap_or_default()
            )));
        }
        let key = match (j.kty.as_str(), j.crv.as_deref()) {
            ("oct", _) => {
                let k = decode_member(j.k.as_ref(), "k")?;
                if k.len() < MIN_HMAC_KEY_BYTES {
                    return Err(KeyError::ShortSecret(k.len()));
                }
                KeyMaterial::Oct(zeroize::Zeroizing::new(k))
            }
            ("EC", Some("P-256")) => {
                if j.d.is_some() {
                    return Err(KeyError::PrivateMaterial);
                }
                let x = decode_member(j.x.as_ref(), "x")?;
                let y = decode_member(j.y.as_ref(), "y")?;
                if x.len() != 32 || y.len() != 32 {
                    return Err(KeyError::Invalid("P-256 coordinates must be 32 bytes"));
                }
                let mut sec1 = Vec::with_capacity(65);
                sec1.push(4);
                sec1.extend_from_slice(&x);
                sec1.extend_from_slice(&y);
                let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
                    .map_err(|_| KeyError::Invalid("not a point on P-256"))?;
                KeyMaterial::P256(vk)
            }
            ("OKP", Some("Ed25519")) => {
                if j.d.is_some() {
                    return Err(KeyError::PrivateMaterial);
                }
                KeyMaterial::Ed25519(ed25519_from_bytes(&decode_member(j.x.as_ref(), "x")?)?)
            }
            (kty, crv) => {
                return Err(KeyError::Unsupported(format!(
                    "kty={kty} crv={}",
                    crv.unwrap_or("-")
                )))
            }
        };
        Ok(Jwk {
            kid: j.kid.clone(),
            alg: j.alg.clone(),
            iss: j.iss.clone(),
            key,
        })
    }

    /// Parses a JWK from JSON text.
    pub fn parse(json: &str) -> Result<Jwk, KeyError> {
        let j: JwkJson = serde_json::from_str(json).map_err(|e| KeyError::Json(e.to_string()))?;
        Jwk::from_json(&j)
    }
}

/// A JWK Set (`{"keys": [...]}`).
#[derive(Debug, Clone, Default)]
pub struct JwkSet {
    /// The keys, in configuration order.
    pub keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct JwkSetJson {
    keys: Vec<JwkJson>,
}

impl JwkSet {
    /// Parses a JWKS document; every key must be valid.
    pub fn parse(json: &str) -> Result<JwkSet, KeyError> {
        let s: JwkSetJson =
            serde_json::from_str(json).map_err(|e| KeyError::Json(e.to_string()))?;
        Self::from_json(&s.keys)
    }

    /// Builds a set from parsed JWK objects.
    pub fn from_json(keys: &[JwkJson]) -> Result<JwkSet, KeyError> {
        let keys = keys.iter().map(Jwk::from_json).collect::<Result<_, _>>()?;
        Ok(JwkSet { keys })
    }
}

/// The public JWK (`OKP`/`Ed25519`) of an Ed25519 key, as JSON text.
pub fn ed25519_public_jwk(kid: &str, vk: &ed25519_dalek::VerifyingKey) -> String {
    serde_json::json!({
        "kty": "OKP",
        "crv": "Ed25519",
        "alg": "EdDSA",
        "use": "sig",
        "kid": kid,
        "x": b64url_encode(vk.as_bytes()),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_seed_from_hex() {
        let sk = ed25519_secret_from_hex(&format!(" {} \n", "07".repeat(32))).unwrap();
        assert_eq!(sk.to_bytes(), [7u8; 32]);
        assert!(ed25519_secret_from_hex("zz").is_err());
        assert!(ed25519_secret_from_hex(&"07".repeat(31)).is_err());
    }

    #[test]
    fn public_keys_must_be_canonical_points_of_large_order() {
        let pk = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]).verifying_key();
        assert!(ed25519_from_bytes(pk.as_bytes()).is_ok());
        // y = p + 1 decodes as y = 1 (the identity) in ed25519-dalek: refused as
        // non-canonical before anything else.
        let mut p_plus_1 = [0xffu8; 32];
        p_plus_1[0] = 0xee;
        p_plus_1[31] = 0x7f;
        let err = ed25519_from_bytes(&p_plus_1).unwrap_err();
        assert_eq!(
            err,
            KeyError::Invalid("non-canonical Ed25519 point encoding")
        );
        // The identity, canonically: weak.
        let mut id = [0u8; 32];
        id[0] = 1;
        assert_eq!(
            ed25519_from_bytes(&id).unwrap_err(),
            KeyError::Invalid("weak (small-order) Ed25519 key")
        );
        // "Negative zero": x = 0 with the sign bit set.
        id[31] = 0x80;
        assert!(ed25519_from_bytes(&id).is_err());
    }

    const SECRET32: &str = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE"; // "0123..." 32 bytes

    #[test]
    fn oct_keys_need_32_bytes() {
        let ok = Jwk::parse(&format!(r#"{{"kty":"oct","k":"{SECRET32}","kid":"a"}}"#)).unwrap();
        assert!(matches!(ok.key, KeyMaterial::Oct(ref k) if k.len() == 32));
        let short = Jwk::parse(r#"{"kty":"oct","k":"c2hvcnQ"}"#).unwrap_err();
        assert_eq!(short, KeyError::ShortSecret(5));
        // The original config's placeholder is not base64url.
        let ph = Jwk::parse(r#"{"kty":"oct","k":"<BASE64_SECRET_PLACEHOLDER>"}"#).unwrap_err();
        assert_eq!(ph, KeyError::Encoding("k"));
    }

    #[test]
    fn okp_round_trip_and_private_refused() {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let json = ed25519_public_jwk("k1", &sk.verifying_key());
        let jwk = Jwk::parse(&json).unwrap();
        assert_eq!(jwk.kid.as_deref(), Some("k1"));
        assert!(matches!(jwk.key, KeyMaterial::Ed25519(vk) if vk == sk.verifying_key()));
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v["d"] = "AAAA".into();
        assert_eq!(
            Jwk::parse(&v.to_string()).unwrap_err(),
            KeyError::PrivateMaterial
        );
    }

    #[test]
    fn weak_and_bad_ed25519_keys_refused() {
        // The identity point is small-order.
        let mut id = [0u8; 32];
        id[0] = 1;
        assert!(matches!(ed25519_from_bytes(&id), Err(KeyError::Invalid(_))));
        assert!(matches!(
            ed25519_from_bytes(&[1u8; 31]),
            Err(KeyError::Invalid(_))
        ));
        assert_eq!(
            ed25519_from_hex("zz").unwrap_err(),
            KeyError::Encoding("hex")
        );
    }

    #[test]
    fn unsupported_types_refused() {
        assert!(matches!(
            Jwk::parse(r#"{"kty":"RSA","n":"AQAB","e":"AQAB"}"#),
            Err(KeyError::Unsupported(_))
        ));
        assert!(matches!(
            Jwk::parse(r#"{"kty":"EC","crv":"P-384","x":"AA","y":"AA"}"#),
            Err(KeyError::Unsupported(_))
        ));
        assert!(matches!(
            Jwk::parse(&format!(r#"{{"kty":"oct","k":"{SECRET32}","use":"enc"}}"#)),
            Err(KeyError::Unsupported(_))
        ));
        assert!(matches!(Jwk::parse("{"), Err(KeyError::Json(_))));
    }

    #[test]
    fn debug_never_prints_secrets() {
        let jwk = Jwk::parse(&format!(r#"{{"kty":"oct","k":"{SECRET32}"}}"#)).unwrap();
        let dbg = format!("{jwk:?}");
        assert!(dbg.contains("redacted"));
        assert!(!dbg.contains("0123"));
        // The JSON form too (held by the filter's and the sidecar's configs).
        let json: JwkJson = serde_json::from_str(&format!(
            r#"{{"kty":"oct","kid":"k1","k":"{SECRET32}","d":"c2VjcmV0LXNjYWxhcg"}}"#
        ))
        .unwrap();
        let dbg = format!("{json:?}");
        assert!(dbg.contains("k1") && dbg.contains("redacted"), "{dbg}");
        assert!(
            !dbg.contains(&SECRET32[..8]) && !dbg.contains("c2VjcmV0"),
            "{dbg}"
        );
    }
}
