//! rustls configurations of the three listeners, all on the ring provider.
//!
//! - public: server-authenticated TLS 1.3 or 1.2 (installers on old distributions).
//! - agent: TLS 1.3 only, client certificate mandatory and chained to the internal CA.
//! - admin: TLS 1.3 only, bearer tokens on top.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

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

fn chain_and_key(
    keys: &ServerKeys,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = rustls_pemfile::certs(&mut keys.server_cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Material(e.to_string()))?;
    let key = rustls_pemfile::private_key(&mut keys.server_key_pem.as_bytes())
        .map_err(|e| TlsError::Material(e.to_string()))?
        .ok_or_else(|| TlsError::Material("no private key in server.key".into()))?;
    Ok((chain, key))
}

fn finish(mut config: ServerConfig) -> Arc<ServerConfig> {
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

pub fn public_config(keys: &ServerKeys) -> Result<Arc<ServerConfig>, TlsError> {
    let (chain, key) = chain_and_key(keys)?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(finish(config))
}

pub fn admin_config(keys: &ServerKeys) -> Result<Arc<ServerConfig>, TlsError> {
    let (chain, key) = chain_and_key(keys)?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(finish(config))
}

pub fn agent_config(keys: &ServerKeys) -> Result<Arc<ServerConfig>, TlsError> {
    let (chain, key) = chain_and_key(keys)?;
    let mut roots = RootCertStore::empty();
    for ca in rustls_pemfile::certs(&mut keys.ca.cert_pem().as_bytes()) {
        roots.add(ca.map_err(|e| TlsError::Material(e.to_string()))?)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Material(e.to_string()))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    Ok(finish(config))
}
