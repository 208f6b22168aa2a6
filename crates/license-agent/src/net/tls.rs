//! TLS client configurations that pin the server (DESIGN.md §2).
//!
//! Before enrollment the agent knows only the pin (from the installer), so the pin alone
//! authenticates the server: it names the exact key, which is stronger than any chain. After
//! enrollment the agent also has the CA: then the chain and the host name are checked *and*
//! the pin must match, so a server with a valid chain but another key is refused. The pins and
//! CAs are those the agent trusts now (`trust`): enrollment's, then what the server announced
//! ahead of a TLS key or CA rollover.

use std::path::Path;
use std::sync::Arc;

use license_protocol::pin::CertPin;
use license_protocol::server_trust::AgentTrust;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use crate::platform::keys::{MachineCertResolver, MachineKey};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Material { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The server's key did not match the pin (or any of the pins trusted).
#[derive(thiserror::Error)]
#[error("server key {presented} does not match the pinned key {pinned}")]
pub struct PinMismatch {
    pub presented: String,
    pub pinned: String,
}

/// rustls shows a certificate error's cause with `Debug`: make it the sentence.
impl std::fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Checks the pin (one of the pins trusted), and the chain when a CA is known.
#[derive(Debug)]
pub struct PinnedServerVerifier {
    pins: Vec<CertPin>,
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = CertPin::of_certificate_der(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        // Every pin is compared (in constant time each), whichever matches.
        let matched = self
            .pins
            .iter()
            .fold(false, |any, pin| presented.matches(pin) | any);
        if !matched {
            let pinned: Vec<String> = self.pins.iter().map(ToString::to_string).collect();
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(PinMismatch {
                    presented: presented.to_string(),
                    pinned: pinned.join(" or "),
                })),
            )));
        }
        if let Some(chain) = &self.chain {
            chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn material(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::Material {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// For enrollment: TLS 1.3 or 1.2, server authenticated by its pin alone.
pub fn pin_only(pin: CertPin) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinnedServerVerifier {
        pins: vec![pin],
        chain: None,
        provider: provider.clone(),
    });
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// For the agent API: TLS 1.3 only, chain (to a CA `trust` holds) + host name + pin (one of
/// `trust`'s), and the machine's certificate. The machine's key signs the handshake through
/// [`MachineKey`], so a TPM key (never exported) and a file key take the same path.
pub fn mutual(
    trust: &AgentTrust,
    client_cert: &Path,
    machine_key: Arc<dyn MachineKey>,
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    for der in trust.ca_ders() {
        roots.add(CertificateDer::from(der))?;
    }
    let chain = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Material {
            path: "server trust".into(),
            message: e.to_string(),
        })?;
    let verifier = Arc::new(PinnedServerVerifier {
        pins: trust.pins().to_vec(),
        chain: Some(chain),
        provider: provider.clone(),
    });
    let certs = rustls_pemfile::certs(&mut read(client_cert)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| material(client_cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(material(client_cert, "no certificate in file"));
    }
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(MachineCertResolver::new(certs, machine_key)));
    // HTTP/2 when the server offers it: the watch stream and a round's requests share one
    // connection. Sessions resume from the server's tickets (rustls keeps them in memory).
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
