//! The license keys this agent trusts (`license_protocol::license_keys`): kept in
//! `state_dir/license-keys.json`, loaded at start on top of the key pinned at enrollment, and
//! extended by the key sets the server announces.
//!
//! Each round the secret status carries the digest of the server's set; only when it is not the
//! digest of the set held does the engine fetch the set (one request per rollover), accept it
//! (signed by a key already trusted and not retired, not older than the one held), store it
//! and hand the new trust to the validator, which drops its cache of verified tokens. A refused
//! set is audited and alerted once per digest, and the old trust kept. The set is also fetched
//! when a license token just fetched names a key not held (the server took a new key up
//! between the status and the tokens of one round), so the tokens verify at once. Public keys
//! only: the file holds nothing secret.

use std::path::{Path, PathBuf};

use license_audit::Outcome;
use license_protocol::license_keys::{StoredTrust, TrustedKeys};

use super::server::AgentServer;
use super::Engine;
use crate::alerts::AlertKind;
use crate::audit::agent_event;
use crate::net::client::ClientError;
use crate::platform::blocking;
use crate::platform::files::{write_atomic, PRIVATE};

/// File name of the trusted key set inside the state directory.
pub const FILE_NAME: &str = "license-keys.json";

/// Why the held key set could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustFileError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a license key set: {message}")]
    Malformed { path: String, message: String },
}

/// `state_dir/license-keys.json`.
#[derive(Debug, Clone)]
pub struct TrustFile {
    path: PathBuf,
}

impl TrustFile {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(FILE_NAME),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The trust held: the stored one with the pin added (a pin it lists retired stays
    /// retired), or the pin alone when there is no file yet.
    pub fn load(&self, pinned: ed25519_dalek::VerifyingKey) -> Result<TrustedKeys, TrustFileError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(TrustedKeys::pinned(pinned))
            }
            Err(source) => {
                return Err(TrustFileError::Io {
                    path: self.path.display().to_string(),
                    source,
                })
            }
        };
        let malformed = |message: String| TrustFileError::Malformed {
            path: self.path.display().to_string(),
            message,
        };
        let stored: StoredTrust =
            serde_json::from_slice(&bytes).map_err(|e| malformed(e.to_string()))?;
        Ok(TrustedKeys::from_stored(&stored)
            .map_err(|e| malformed(e.to_string()))?
            .with_pin(pinned))
    }

    /// Writes the trust durably (atomic replace, 0600).
    pub fn save(&self, trusted: &TrustedKeys) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(&trusted.to_stored())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        write_atomic(&self.path, &bytes, PRIVATE)
    }
}

impl<S: AgentServer> Engine<S> {
    /// Follows the server's key set when `announced` (the digest in the secret status) is not
    /// the one held: see the module docs. Only an unreachable or failing server is an error.
    pub(super) async fn follow_license_keys(
        &mut self,
        announced: Option<&str>,
    ) -> Result<(), ClientError> {
        let Some(announced) = announced else {
            return Ok(());
        };
        if self.machine.license_keys.digest() == Some(announced)
            || self.health.refused_key_set.as_deref() == Some(announced)
        {
            return Ok(());
        }
        let set = self.server.license_keys().await?;
        self.take_key_set(&set, announced).await;
        Ok(())
    }

    /// Fetches the server's key set when one of `tokens` (just fetched) names a key this agent
    /// does not know: the server took up a new key after this round's secret status, and
    /// without it the tokens would not verify until the next round.
    pub(super) async fn learn_keys_of(
        &mut self,
        tokens: &[license_protocol::agent_api::LicenseToken],
    ) -> Result<(), ClientError> {
        let known = |id| self.machine.license_keys.states().any(|(k, _)| k == id);
        let unknown = tokens
            .iter()
            .filter_map(|t| license_protocol::token::decode(&t.token).ok())
            .filter_map(|(header, _)| header.key_id)
            .any(|id| !known(id));
        if !unknown {
            return Ok(());
        }
        let set = self.server.license_keys().await?;
        let digest = set.digest();
        if self.machine.license_keys.digest() == Some(digest.as_str())
            || self.health.refused_key_set.as_deref() == Some(digest.as_str())
        {
            return Ok(());
        }
        tracing::info!("a license token names a key this agent does not know: key set fetched");
        self.take_key_set(&set, &digest).await;
        Ok(())
    }

    /// Accepts `set` (see the module docs) or refuses it, audited and alerted either way; a
    /// refused set is not fetched again while the server announces `digest`.
    async fn take_key_set(
        &mut self,
        set: &license_protocol::license_keys::LicenseKeySet,
        digest: &str,
    ) {
        let mut trusted = self.machine.license_keys.clone();
        if let Err(e) = trusted.accept(set) {
            self.health.refused_key_set = Some(digest.to_string());
            tracing::error!(error = %e, "the server's license key set was refused; the keys trusted so far are kept");
            self.audit()
                .note(
                    agent_event("license.keys", Outcome::Error)
                        .detail("reason", e.to_string())
                        .detail("digest", set.digest()),
                )
                .await;
            self.alerts
                .raise(
                    AlertKind::LicenseKeysRefused,
                    "the server announced a license key set this agent refuses",
                    serde_json::json!({"reason": e.to_string()}),
                )
                .await;
            return;
        }
        let file = self.settings.license_keys_file.clone();
        let saving = trusted.clone();
        if let Err(e) = blocking::run(move || file.save(&saving)).await {
            // Held in memory all the same: the next start re-learns it from the pin.
            tracing::error!(error = %e, "cannot write license-keys.json");
        }
        let keys: Vec<serde_json::Value> = trusted
            .states()
            .map(|(id, retired)| {
                serde_json::json!({"id": id.to_string(), "state": if retired { "retired" } else { "trusted" }})
            })
            .collect();
        let announced_states: Vec<serde_json::Value> = set
            .keys
            .iter()
            .map(|k| serde_json::json!({"id": k.id.to_string(), "state": k.state.as_str()}))
            .collect();
        tracing::info!(keys = ?announced_states, "license key set accepted");
        self.audit()
            .note(
                agent_event("license.keys", Outcome::Success)
                    .detail("keys", keys)
                    .detail("announced", announced_states)
                    .detail("issued_at", set.issued_at),
            )
            .await;
        self.health.refused_key_set = None;
        self.validator.set_license_keys(trusted.clone());
        self.machine.license_keys = trusted;
    }
}
