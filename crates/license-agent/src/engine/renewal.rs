//! A new certificate for this machine's key (`license-agent renew-cert`, DESIGN.md §3.1):
//! a CSR signed by the key, sent over mTLS with the current certificate. The server supersedes
//! the old certificate as soon as it answers, so the new one is written before returning.

use license_protocol::agent_api::RenewCertificateResponse;

use crate::config::AgentConfig;
use crate::net::client::ClientError;
use crate::net::{agent_client, ConnectError};
use crate::platform::files::{write_atomic, PUBLIC};
use crate::platform::keys::{self, KeyError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RenewalError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("certificate request: {0}")]
    Csr(#[from] rcgen::Error),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Server(#[from] ClientError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// Renews the certificate of the key named by the config; returns what the server issued.
pub async fn renew(config: &AgentConfig) -> Result<RenewCertificateResponse, RenewalError> {
    let path = &config.server.client_cert;
    let key = keys::load(config, None)?;
    let csr = keys::csr_pem(key.clone())?;
    let renewed = agent_client(config, key)?.renew_certificate(csr).await?;
    write_atomic(path, renewed.certificate.as_bytes(), PUBLIC).map_err(|source| {
        RenewalError::Write {
            path: path.display().to_string(),
            source,
        }
    })?;
    Ok(renewed)
}
