//! The hub's optional TLS listener: rustls with a certificate chain and key read from PEM files.
//! A clinic LAN has no public CA, so the certificate is usually the clinic's own (self-signed or
//! from a private CA); devices pin it with `sync.hub_ca` (`docs/HUB.md`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::HubError;

/// Where the listener's certificate and key come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the hub's certificate first, then any intermediates.
    pub certificate: PathBuf,
    /// PEM: its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

fn tls_error(path: &Path, message: impl std::fmt::Display) -> HubError {
    HubError::Tls {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// A rustls server configuration for `files`, with HTTP/1.1 offered by ALPN. Every problem names
/// the file and what was expected.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, HubError> {
    let certificates = CertificateDer::pem_file_iter(&files.certificate)
        .map_err(|e| tls_error(&files.certificate, format!("cannot read certificates: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            tls_error(
                &files.certificate,
                format!("not a PEM certificate chain: {e}"),
            )
        })?;
    if certificates.is_empty() {
        return Err(tls_error(
            &files.certificate,
            "no CERTIFICATE block: expected the hub's certificate in PEM",
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        tls_error(
            &files.key,
            format!("expected a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(&files.certificate, e))?
        .with_no_client_auth()
        .with_single_cert(certificates, key)
        .map_err(|e| {
            tls_error(
                &files.key,
                format!("the key does not fit the certificate or is unsupported: {e}"),
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
