//! rustls configurations of the three listeners, all on the ring provider.
//!
//! - public: server-authenticated TLS 1.3 or 1.2 (installers on old distributions).
//! - agent: TLS 1.3 only, client certificate mandatory and chained to the internal CA (the
//!   current one or, during a CA rollover, the previous one).
//! - admin: TLS 1.3 only, bearer tokens on top.
//!
//! All three serve the server certificate through one [`ServerCertResolver`], so a renewed
//! certificate (`service::server_certificate`) reaches new connections on every listener
//! without touching the ones already open.
//!
//! The agent listener's client-certificate check accepts an *expired* certificate that is
//! otherwise valid ([`AllowExpiredClientCerts`]): a till switched off past its certificate's
//! expiry must still reach `POST /api/v1/renew-certificate`. Whether an expired certificate
//! may do anything is decided per request, against the database (`agent::authenticate`):
//! renewal only, within `certificate_renew_after_expiry_days`, never when revoked.

use std::sync::{Arc, PoisonError, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};

use crate::datadir::ServerKeys;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("server certificate or key unusable: {0}")]
    Material(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn chain_of(cert_pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Material(e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::Material("no certificate in server.pem".into()));
    }
    Ok(chain)
}

/// The server certificate all three listeners serve; [`ServerCertResolver::replace`] swaps
/// it for the connections accepted afterwards (the key stays: it is the pinned one).
#[derive(Debug)]
pub struct ServerCertResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServerCertResolver {
    pub fn new(keys: &ServerKeys) -> Result<Self, TlsError> {
        let key: PrivateKeyDer<'static> =
            rustls_pemfile::private_key(&mut keys.server_key_pem.as_bytes())
                .map_err(|e| TlsError::Material(e.to_string()))?
                .ok_or_else(|| TlsError::Material("no private key in server.key".into()))?;
        let signing = provider().key_provider.load_private_key(key)?;
        let certified = CertifiedKey::new(chain_of(&keys.server_cert_pem)?, signing);
        certified.keys_match()?;
        Ok(Self {
            current: RwLock::new(Arc::new(certified)),
        })
    }

    /// Serves `cert_pem` (for the same key) to new connections from now on.
    pub fn replace(&self, cert_pem: &str) -> Result<(), TlsError> {
        let chain = chain_of(cert_pem)?;
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        let certified = CertifiedKey::new(chain, current.key.clone());
        certified.keys_match()?;
        *current = Arc::new(certified);
        Ok(())
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ResolvesServerCert for ServerCertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn finish(mut config: ServerConfig) -> Arc<ServerConfig> {
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

pub fn public_config(cert: &Arc<ServerCertResolver>) -> Result<Arc<ServerConfig>, TlsError> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(cert.clone());
    Ok(finish(config))
}

pub fn admin_config(cert: &Arc<ServerCertResolver>) -> Result<Arc<ServerConfig>, TlsError> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(cert.clone());
    Ok(finish(config))
}

pub fn agent_config(
    keys: &ServerKeys,
    cert: &Arc<ServerCertResolver>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in rustls_pemfile::certs(&mut keys.client_roots_pem().as_bytes()) {
        roots.add(ca.map_err(|e| TlsError::Material(e.to_string()))?)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Material(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(AllowExpiredClientCerts::new(verifier)))
        .with_cert_resolver(cert.clone());
    // A reconnecting agent resumes its session from a ticket (stateless: no memory per
    // machine) instead of a full handshake; its certificate comes back with the session and is
    // checked against the database on every request as after a full handshake.
    config.ticketer =
        rustls::crypto::ring::Ticketer::new().map_err(|e| TlsError::Material(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The webpki client verifier, except that an end-entity certificate past its `notAfter` is
/// verified as of its `notAfter` instead of now: chain to the CA, signatures, key usage and
/// every other check still apply, so only a certificate this CA issued passes, and the TLS
/// handshake still proves possession of its key. Expiry is then enforced per request.
#[derive(Debug)]
pub struct AllowExpiredClientCerts {
    inner: Arc<dyn ClientCertVerifier>,
}

impl AllowExpiredClientCerts {
    pub fn new(inner: Arc<dyn ClientCertVerifier>) -> Self {
        Self { inner }
    }
}

/// `notAfter` of a DER certificate, as rustls time.
fn not_after(der: &[u8]) -> Option<UnixTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        secs,
    )))
}

impl ClientCertVerifier for AllowExpiredClientCerts {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            )) => match not_after(end_entity) {
                Some(at) if at.as_secs() < now.as_secs() => {
                    self.inner.verify_client_cert(end_entity, intermediates, at)
                }
                _ => Err(rustls::Error::InvalidCertificate(CertificateError::Expired)),
            },
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{CertificateAuthority, MachineKey};

    fn verifier(ca: &CertificateAuthority) -> AllowExpiredClientCerts {
        let mut roots = RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut ca.cert_pem().as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .unwrap();
        AllowExpiredClientCerts::new(inner)
    }

    fn machine_cert(ca: &CertificateAuthority) -> CertificateDer<'static> {
        let identity = "550e8400-e29b-41d4-a716-446655440000:6ba7b810-9dad-11d1-80b4-00c04fd430c8"
            .parse()
            .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let issued = ca
            .issue_machine_certificate(
                &identity,
                MachineKey::ServerGenerated(&key),
                time::Duration::days(1),
            )
            .unwrap();
        CertificateDer::from(issued.der)
    }

    fn at_days(days: i64) -> UnixTime {
        let secs = UnixTime::now()
            .as_secs()
            .saturating_add_signed(days * 86_400);
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs))
    }

    #[test]
    fn expired_client_certificate_of_our_ca_passes_the_handshake_check() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let cert = machine_cert(&ca);
        let v = verifier(&ca);
        v.verify_client_cert(&cert, &[], UnixTime::now()).unwrap();
        // A year after its expiry: still chained and signed by the CA, so accepted here.
        v.verify_client_cert(&cert, &[], at_days(365)).unwrap();
        // Not yet valid stays refused.
        assert!(v.verify_client_cert(&cert, &[], at_days(-1)).is_err());
    }

    #[test]
    fn expired_certificate_of_another_ca_is_refused() {
        let ours = CertificateAuthority::generate("ours").unwrap();
        let theirs = CertificateAuthority::generate("theirs").unwrap();
        let cert = machine_cert(&theirs);
        let v = verifier(&ours);
        assert!(v.verify_client_cert(&cert, &[], UnixTime::now()).is_err());
        assert!(v.verify_client_cert(&cert, &[], at_days(365)).is_err());
    }
}
