//! The store the daemon uses: the TPM store when the TPM answers, the encrypted file store
//! when it does not (seed §8.1). A TPM failure at any point switches to the file store for
//! good (until restart), with an alert; validations never depend on it since unsealed secrets
//! are already in memory.
//!
//! While the TPM holds the secrets the file store holds none: once the TPM store has them (its
//! first start takes over what the file store held, or a later start after a fallback), the
//! file store's `secret.enc` is removed, so versions destroyed since are not left readable with
//! `secret.key`.

use std::sync::atomic::{AtomicBool, Ordering};

use super::file::FileStore;
use super::tpm::TpmStore;
use super::{SecretStore, StoreError, StoredSecret};

#[derive(Debug)]
pub struct FallbackStore {
    tpm: Option<TpmStore>,
    file: FileStore,
    tpm_ok: AtomicBool,
}

impl FallbackStore {
    pub fn new(tpm: Option<TpmStore>, file: FileStore) -> Self {
        let tpm_ok = AtomicBool::new(tpm.is_some());
        Self { tpm, file, tpm_ok }
    }

    /// Whether the TPM is in use right now.
    pub fn tpm_available(&self) -> bool {
        self.tpm_ok.load(Ordering::Acquire)
    }

    /// Removes the file store's secrets while the TPM holds them (see the module docs).
    fn clear_file_store(&self) {
        if let Err(e) = self.file.clear() {
            tracing::error!(error = %e, "cannot remove the file store the TPM took over from");
        }
    }

    fn fall_back(&self, error: &StoreError) {
        if self.tpm_ok.swap(false, Ordering::AcqRel) {
            tracing::error!(%error, "ALERT: TPM unavailable; falling back to the encrypted file store");
        }
    }
}

impl SecretStore for FallbackStore {
    fn kind(&self) -> &'static str {
        if self.tpm_available() {
            "tpm"
        } else {
            "file"
        }
    }

    fn load(&self) -> Result<Vec<StoredSecret>, StoreError> {
        if let (Some(tpm), true) = (&self.tpm, self.tpm_available()) {
            if !tpm.exists() {
                // First start with a TPM: take over what the file store holds, if anything.
                let existing = self.file.load()?;
                if !existing.is_empty() {
                    if let Err(e) = tpm.save(&existing) {
                        self.fall_back(&e);
                        return Ok(existing);
                    }
                }
                self.clear_file_store();
                return Ok(existing);
            }
            match tpm.load() {
                Ok(secrets) => {
                    self.clear_file_store();
                    return Ok(secrets);
                }
                Err(e @ StoreError::Corrupt { .. }) => return Err(e),
                Err(e) => self.fall_back(&e),
            }
        }
        self.file.load()
    }

    fn tpm_lost(&self, current: &[StoredSecret]) {
        if self.tpm_available() {
            self.fall_back(&StoreError::Unavailable("the TPM stopped answering".into()));
            if let Err(e) = self.file.save(current) {
                tracing::error!(error = %e, "cannot write the fallback store");
            }
        }
    }

    fn save(&self, secrets: &[StoredSecret]) -> Result<(), StoreError> {
        if let (Some(tpm), true) = (&self.tpm, self.tpm_available()) {
            match tpm.save(secrets) {
                Ok(()) => return Ok(()),
                Err(e) => self.fall_back(&e),
            }
        }
        self.file.save(secrets)
    }
}
