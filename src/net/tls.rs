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
    /// For the acceptor: `tls-server-end-point` channel-binding data (RFC 5929) of our
    /// certificate, when its signature algorithm names a hash; None disables SCRAM-SHA-256-PLUS.
    pub end_point: Option<Arc<[u8]>>,
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
    let leaf_der = certs.first().map(|c| c.as_ref().to_vec());
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
        end_point: leaf_der.as_deref().and_then(server_end_point).map(Arc::from),
        digest: digest.finalize().into(),
    })
}

/// RFC 5929 `tls-server-end-point`: the certificate hashed with its signature's hash function,
/// SHA-256 when that is MD5 or SHA-1. None for algorithms without one (Ed25519, RSA-PSS with
/// parameters), in which case channel binding is simply not offered, as PostgreSQL does.
pub fn server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    let (0x30, cert, _) = der_tlv(cert_der)? else {
        return None;
    };
    let (0x30, _tbs, rest) = der_tlv(cert)? else {
        return None;
    };
    let (0x30, algorithm, _) = der_tlv(rest)? else {
        return None;
    };
    let (0x06, oid, _) = der_tlv(algorithm)? else {
        return None;
    };
    let bits = match oid {
        [prefix @ .., 4 | 5] if prefix == RSA => 256,
        [prefix @ .., 11] if prefix == RSA => 256,
        [prefix @ .., 12] if prefix == RSA => 384,
        [prefix @ .., 13] if prefix == RSA => 512,
        _ if oid == ECDSA_SHA1 => 256,
        [prefix @ .., 2] if prefix == ECDSA_SHA2 => 256,
        [prefix @ .., 3] if prefix == ECDSA_SHA2 => 384,
        [prefix @ .., 4] if prefix == ECDSA_SHA2 => 512,
        _ => return None,
    };
    Some(match bits {
        256 => Sha256::digest(cert_der).to_vec(),
        384 => sha2::Sha384::digest(cert_der).to_vec(),
        _ => sha2::Sha512::digest(cert_der).to_vec(),
    })
}

/// One DER tag-length-value: (tag, contents, what follows). None when truncated or when the
/// length is not in definite form; lengths are checked against the input, never trusted.
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
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
        end_point: None,
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
