//! TLS for the Solana TPU: both ends present self-signed certificates whose only
//! meaning is the Ed25519 key inside (the validator or client identity).
//!
//! - [`identity_cert`] makes the client certificate from an identity key, as Solana
//!   clients do (the validator reads the key to look up stake).
//! - [`LeaderVerifier`] (client side) checks the handshake signature and, when the
//!   leader's identity is known (from `getClusterNodes` or the static list), that the
//!   certificate carries exactly that key: a TPU address that answers with another
//!   key is refused. Without a known identity the certificate is accepted, as Solana
//!   clients do (there is no CA for validators).
//! - [`PeerKeyVerifier`] (server side, the local receiver) requires a client
//!   certificate holding an Ed25519 key and checks the handshake signature.

use std::sync::Arc;

use ed25519_dalek::SigningKey;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// The ALPN protocol id of the TPU.
pub const ALPN_TPU: &[u8] = b"solana-tpu";

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): the 32-byte key follows.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// DER prefix of an Ed25519 PKCS#8 v1 private key: the 32-byte seed follows.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// A self-signed certificate (CN "Solana node") for `key`, and the key as PKCS#8.
pub fn identity_cert(
    key: &SigningKey,
) -> anyhow::Result<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
    let mut pkcs8 = Vec::with_capacity(48);
    pkcs8.extend_from_slice(&ED25519_PKCS8_PREFIX);
    pkcs8.extend_from_slice(key.as_bytes());
    let der = PrivatePkcs8KeyDer::from(pkcs8);
    let kp = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)
        .map_err(|e| anyhow::anyhow!("identity key: {e}"))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| anyhow::anyhow!("identity certificate: {e}"))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Solana node");
    let cert = params
        .self_signed(&kp)
        .map_err(|e| anyhow::anyhow!("identity certificate: {e}"))?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(der)))
}

/// The Ed25519 public key a certificate carries, if it is a well-formed X.509
/// certificate with an Ed25519 subject key.
pub fn ed25519_key_of(cert: &CertificateDer<'_>) -> Option<[u8; 32]> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    let spki = ee.subject_public_key_info();
    let der: &[u8] = spki.as_ref();
    let key = der.strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    key.try_into().ok()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn ed25519_only() -> Vec<SignatureScheme> {
    vec![SignatureScheme::ED25519]
}

/// QUIC is TLS 1.3 only: a TLS 1.2 signature is never acceptable.
fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

fn check_tls13(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

/// Client side: accepts the leader's self-signed certificate, pinned to its identity
/// key when known.
#[derive(Debug)]
pub struct LeaderVerifier {
    expected: Option<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl LeaderVerifier {
    /// `expected`: the leader's identity key, when known.
    pub fn new(expected: Option<[u8; 32]>) -> Arc<Self> {
        Arc::new(LeaderVerifier {
            expected,
            provider: provider(),
        })
    }
}

impl ServerCertVerifier for LeaderVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let key = ed25519_key_of(end_entity).ok_or(rustls::Error::InvalidCertificate(
            rustls::CertificateError::BadEncoding,
        ))?;
        match self.expected {
            Some(want) if want != key => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        check_tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ed25519_only()
    }
}

/// Server side (the local receiver, the ingest endpoint): a client certificate
/// with an Ed25519 key is mandatory, its handshake signature must verify, and with
/// an allow-list the key must be on it.
#[derive(Debug)]
pub struct PeerKeyVerifier {
    provider: Arc<CryptoProvider>,
    allow: Option<Vec<[u8; 32]>>,
}

impl PeerKeyVerifier {
    /// A verifier requiring an Ed25519 client certificate.
    pub fn new() -> Arc<Self> {
        Self::allowing(None)
    }

    /// [`Self::new`], and with `Some(keys)` only those keys.
    pub fn allowing(allow: Option<Vec<[u8; 32]>>) -> Arc<Self> {
        Arc::new(PeerKeyVerifier {
            provider: provider(),
            allow,
        })
    }
}

impl ClientCertVerifier for PeerKeyVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let key = ed25519_key_of(end_entity).ok_or(rustls::Error::InvalidCertificate(
            rustls::CertificateError::BadEncoding,
        ))?;
        match &self.allow {
            // Not secret: a plain comparison of public keys.
            Some(keys) if !keys.contains(&key) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(ClientCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        check_tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ed25519_only()
    }
}

/// A rustls client configuration for one leader: TLS 1.3, ALPN `solana-tpu`, our
/// identity certificate, the leader pinned when its key is known.
pub fn client_crypto(
    identity: &(CertificateDer<'static>, PrivateKeyDer<'static>),
    leader_key: Option<[u8; 32]>,
) -> anyhow::Result<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(LeaderVerifier::new(leader_key))
        .with_client_auth_cert(vec![identity.0.clone()], identity.1.clone_key())?;
    cfg.alpn_protocols = vec![ALPN_TPU.to_vec()];
    Ok(cfg)
}

/// A rustls server configuration for a TPU receiver: TLS 1.3, ALPN `solana-tpu` only,
/// mandatory Ed25519 client certificate.
pub fn server_crypto(
    identity: &(CertificateDer<'static>, PrivateKeyDer<'static>),
) -> anyhow::Result<rustls::ServerConfig> {
    server_crypto_allow(identity, ALPN_TPU, None)
}

/// [`server_crypto`] with another ALPN id and, with `Some(keys)`, only clients
/// whose certificate carries one of those Ed25519 keys.
pub fn server_crypto_allow(
    identity: &(CertificateDer<'static>, PrivateKeyDer<'static>),
    alpn: &[u8],
    allow: Option<Vec<[u8; 32]>>,
) -> anyhow::Result<rustls::ServerConfig> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(PeerKeyVerifier::allowing(allow))
        .with_single_cert(vec![identity.0.clone()], identity.1.clone_key())?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_certificate_carries_the_identity_key() {
        let sk = SigningKey::from_bytes(&[7u8; 32]);
        let (cert, _) = identity_cert(&sk).unwrap();
        assert_eq!(ed25519_key_of(&cert), Some(sk.verifying_key().to_bytes()));
        assert_eq!(
            ed25519_key_of(&CertificateDer::from(vec![0x30, 0x00])),
            None
        );
    }

    #[test]
    fn a_pinned_leader_with_another_key_is_refused() {
        let (cert, _) = identity_cert(&SigningKey::from_bytes(&[1u8; 32])).unwrap();
        let other = SigningKey::from_bytes(&[2u8; 32])
            .verifying_key()
            .to_bytes();
        let name = ServerName::try_from("connect").unwrap();
        let v = LeaderVerifier::new(Some(other));
        assert!(v
            .verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
            .is_err());
        let own = ed25519_key_of(&cert);
        assert!(LeaderVerifier::new(own)
            .verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
            .is_ok());
        assert!(LeaderVerifier::new(None)
            .verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
            .is_ok());
    }
}
