//! TLS material for both sides: the certificate pgweir shows clients, and how pgweir checks the
//! certificates of PostgreSQL servers. Built from PEM files when the configuration is loaded, so a
//! reload (SIGHUP or POST /api/reload) picks up rotated files for new connections while existing
//! ones keep the session they negotiated.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

/// The ALPN protocol name PostgreSQL 17 uses, required for direct TLS connections.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

fn provider() -> Arc<CryptoProvider> {
    // Explicit provider: the implicit process-wide one panics if two providers are linked.
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A built rustls configuration plus a digest of the files it came from, so that configurations
/// compare equal exactly when their inputs are the same.
#[derive(Clone)]
pub struct Material<T> {
    pub config: Arc<T>,
    digest: [u8; 32],
}

impl<T> PartialEq for Material<T> {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl<T> std::fmt::Debug for Material<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Material({:02x}{:02x}{:02x}{:02x}…)",
            self.digest[0], self.digest[1], self.digest[2], self.digest[3]
        )
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

fn certs_from_pem(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a valid PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: contains no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The acceptor configuration for client connections: certificate chain and key from PEM files.
/// ALPN is set to "postgresql" so PostgreSQL 17 direct-TLS clients are accepted, and clients
/// offering only some other protocol are refused, as PostgreSQL 17 does.
pub fn acceptor(cert_file: &Path, key_file: &Path) -> Result<Material<rustls::ServerConfig>, String> {
    let cert_pem = read(cert_file, "tls.cert_file")?;
    let key_pem = read(key_file, "tls.key_file")?;
    let certs = certs_from_pem(&cert_pem, cert_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        format!(
            "{}: no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}",
            key_file.display()
        )
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up failed: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!(
                "{} and {} do not form a usable certificate and key: {e}",
                cert_file.display(),
                key_file.display()
            )
        })?;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    let mut digest = Sha256::new();
    digest.update(&cert_pem);
    digest.update(&key_pem);
    Ok(Material {
        config: Arc::new(config),
        digest: digest.finalize().into(),
    })
}

/// How a server's certificate is checked, mirroring libpq's sslmode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerVerify {
    /// Encrypt, accept any certificate (handshake signatures are still checked).
    None,
    /// The chain must lead to the CA file; the host name is not checked.
    Ca,
    /// The chain must lead to the CA file and the certificate must name the host.
    Full,
}

/// The connector configuration for server connections.
pub fn connector(verify: ServerVerify, ca_file: Option<&Path>) -> Result<Material<rustls::ClientConfig>, String> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up failed: {e}"))?;
    let mut digest = Sha256::new();
    digest.update([verify as u8]);
    let verifier: Arc<dyn ServerCertVerifier> = match verify {
        ServerVerify::None => Arc::new(AcceptAnyServerCert {
            algorithms: provider.signature_verification_algorithms,
        }),
        ServerVerify::Ca | ServerVerify::Full => {
            let path = ca_file.ok_or_else(|| "verify-ca and verify-full need server_tls.ca_file".to_owned())?;
            let pem = read(path, "server_tls.ca_file")?;
            digest.update(&pem);
            let mut roots = RootCertStore::empty();
            for cert in certs_from_pem(&pem, path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: unusable CA certificate: {e}", path.display()))?;
            }
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if verify == ServerVerify::Ca {
                Arc::new(IgnoreHostName(webpki))
            } else {
                webpki
            }
        }
    };
    let mut config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // PostgreSQL 17 checks ALPN when a client offers it; older servers ignore it.
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Material {
        config: Arc::new(config),
        digest: digest.finalize().into(),
    })
}

/// sslmode=require: encryption without authentication, as libpq does it. A self-signed
/// PostgreSQL certificate (often marked CA:TRUE, which webpki refuses as a leaf) must work, but
/// the handshake signatures are still verified so the peer holds the certificate's key.
#[derive(Debug)]
struct AcceptAnyServerCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// sslmode=verify-ca: the full webpki chain check, minus the host name.
#[derive(Debug)]
struct IgnoreHostName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for IgnoreHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
