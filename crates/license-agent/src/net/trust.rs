//! The server keys and CAs this agent trusts (`license_protocol::server_trust`), kept in
//! `state_dir/server-trust.json`: until the server has announced anything, what enrollment
//! gave (`[server] cert_pin` and `[server] ca_cert`), and again whenever the configured pin is
//! not the one the file started from. The engine follows the server's
//! announcements (`engine::server_trust`); every connection to the agent API is made with the
//! trust held ([`super::AgentApi`]). Public material only.

use std::path::{Path, PathBuf};

use license_protocol::pin::CertPin;
use license_protocol::server_trust::AgentTrust;

use crate::config::AgentConfig;
use crate::platform::files::{write_atomic, PRIVATE};

/// File name inside the state directory.
pub const FILE_NAME: &str = "server-trust.json";

/// Why the trust could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Malformed { path: String, message: String },
}

/// `state_dir/server-trust.json`, with the enrollment trust to start from.
#[derive(Debug, Clone)]
pub struct TrustFile {
    path: PathBuf,
    pin: CertPin,
    ca_cert: PathBuf,
}

impl TrustFile {
    /// `state_dir/server-trust.json`, starting from `pin` and the CA in `ca_cert`.
    pub fn new(state_dir: &Path, pin: CertPin, ca_cert: &Path) -> Self {
        Self {
            path: state_dir.join(FILE_NAME),
            pin,
            ca_cert: ca_cert.to_path_buf(),
        }
    }

    pub fn from_config(config: &AgentConfig) -> Self {
        Self::new(
            &config.agent.state_dir,
            config.server.cert_pin,
            &config.server.ca_cert,
        )
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The trust announced and accepted so far, or enrollment's: when there is no file yet,
    /// and when the file started from another pin than the configured one (the machine was
    /// enrolled again, or `cert_pin` edited: the configuration wins).
    pub fn load(&self) -> Result<AgentTrust, TrustError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return self.enrolled(),
            Err(source) => {
                return Err(TrustError::Io {
                    path: self.path.display().to_string(),
                    source,
                })
            }
        };
        let held: AgentTrust =
            serde_json::from_slice(&bytes).map_err(|e| TrustError::Malformed {
                path: self.path.display().to_string(),
                message: e.to_string(),
            })?;
        if held.enrolled_pin() != Some(self.pin) {
            tracing::warn!(
                path = %self.path.display(),
                configured = %self.pin,
                "the configured server pin is not the one server-trust.json started from; starting over from the configuration"
            );
            return self.enrolled();
        }
        Ok(held)
    }

    /// What enrollment gave: the configured pin and CA.
    pub fn enrolled(&self) -> Result<AgentTrust, TrustError> {
        let pem = std::fs::read_to_string(&self.ca_cert).map_err(|source| TrustError::Io {
            path: self.ca_cert.display().to_string(),
            source,
        })?;
        AgentTrust::enrolled(self.pin, &pem).map_err(|e| TrustError::Malformed {
            path: self.ca_cert.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Writes the trust durably (atomic replace, 0600).
    pub fn save(&self, trust: &AgentTrust) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(trust)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        write_atomic(&self.path, &bytes, PRIVATE)
    }
}
