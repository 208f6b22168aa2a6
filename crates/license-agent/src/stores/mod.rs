//! Where the machine's secrets rest between runs, behind one trait with a file per backend
//! (parsec's `providers/` pattern): [`file`](mod@file) (AES-256-GCM, PBKDF2-derived key), [`tpm`] (sealed
//! by the TPM), and [`fallback`], the one the daemon uses (the TPM's, else the file's).
//!
//! A store holds the whole set of versions and replaces it atomically, so a crash in the
//! middle of a rotation leaves the old set or the new one, never neither.

pub mod fallback;
pub mod file;
pub mod tpm;

use license_protocol::secret::{Secret, SecretDates};

/// One secret version as the agent holds it.
#[derive(Debug, Clone)]
pub struct StoredSecret {
    pub version: u64,
    pub dates: SecretDates,
    pub secret: Secret,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The store exists but does not decrypt or parse: tampered, or its key material changed.
    /// Never "fixed" silently.
    #[error("{path}: {message}")]
    Corrupt { path: String, message: String },
    /// The TPM did not answer: the daemon falls back to the file store.
    #[error("TPM unavailable: {0}")]
    Unavailable(String),
}

/// A secret store backend.
pub trait SecretStore: Send + Sync + std::fmt::Debug {
    /// `file` or `tpm`, for status and metrics.
    fn kind(&self) -> &'static str;
    /// Every stored version (empty before the first rotation).
    fn load(&self) -> Result<Vec<StoredSecret>, StoreError>;
    /// Replaces the stored set, durably and atomically.
    fn save(&self, secrets: &[StoredSecret]) -> Result<(), StoreError>;
    /// The TPM stopped answering: a store that can fall back does so now, keeping `current`.
    fn tpm_lost(&self, _current: &[StoredSecret]) {}
}
