//! TLS files: PEM certificates and keys, and [`ClientTls`], the TLS the sidecar
//! speaks to the services it dials (Kafka's brokers, ClickHouse): the CA their
//! certificates chain to, their name checked against the address dialled, and
//! the node's own certificate for mutual TLS.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("tls: {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file holds no usable certificate or key.
    #[error("tls: {path}: {detail}")]
    Content {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Rustls(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn content(path: &Path, detail: impl ToString) -> TlsError {
    TlsError::Content {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

/// The PEM certificates in `path` (at least one).
pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| content(path, e))?;
    if certs.is_empty() {
        return Err(content(path, "no certificate"));
    }
    Ok(certs)
}

/// The PEM private key in `path` (its bytes are never put in an error).
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = zeroize::Zeroizing::new(read(path)?);
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| content(path, e))?
        .ok_or_else(|| content(path, "no private key"))
}

/// The certificates of `path` as roots.
pub fn roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in certs(path)? {
        roots.add(ca).map_err(|e| content(path, e))?;
    }
    Ok(roots)
}

/// TLS to a service the sidecar dials (`kafka.tls`, `clickhouse_tls`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// PEM CA certificates the service's certificates chain to (its name is
    /// checked against the host dialled).
    pub ca: PathBuf,
    /// PEM client certificate chain (with `key`): mutual TLS.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its PEM private key.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

impl ClientTls {
    /// What can be checked when the configuration loads, `what` naming it in the
    /// error: `cert` and `key` together, every file readable.
    pub fn check(&self, what: &'static str) -> Result<(), crate::config::ConfigError> {
        if self.cert.is_some() != self.key.is_some() {
            return Err(crate::config::OutOfBounds::new(
                what,
                "cert and key go together (mutual TLS) or are both left out",
            )
            .into());
        }
        for p in std::iter::once(&self.ca).chain(&self.cert).chain(&self.key) {
            std::fs::metadata(p).map_err(|e| crate::config::ConfigError::Read(p.clone(), e))?;
        }
        Ok(())
    }

    /// How a connection with `tls` travels, for logs and `--check`.
    pub fn transport(tls: Option<&ClientTls>) -> &'static str {
        match tls {
            None => "plain text",
            Some(t) if t.cert.is_some() => "mutual TLS",
            Some(_) => "TLS",
        }
    }

    /// A rustls client (TLS 1.2+, ring): servers chaining to `ca` only, with the
    /// client certificate when set.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Rustls(e.to_string()))?
            .with_root_certificates(roots(&self.ca)?);
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(certs(cert)?, private_key(key)?)
                .map_err(|e| TlsError::Rustls(e.to_string())),
            _ => Ok(builder.with_no_client_auth()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_pem_says_which_file_and_what_is_missing() {
        let d = std::env::temp_dir().join(format!("gw-tls-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let empty = d.join("empty.pem");
        std::fs::write(&empty, "not pem\n").unwrap();
        let t = ClientTls {
            ca: empty.clone(),
            cert: None,
            key: None,
        };
        match t.client_config() {
            Err(TlsError::Content { path, detail }) => {
                assert_eq!((path, detail.as_str()), (empty.clone(), "no certificate"));
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        match private_key(&empty) {
            Err(TlsError::Content { detail, .. }) => assert_eq!(detail, "no private key"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        match certs(&d.join("missing.pem")) {
            Err(TlsError::Read { path, .. }) => assert_eq!(path, d.join("missing.pem")),
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
