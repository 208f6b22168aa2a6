//! The TPM secret store (seed §2.5, §4.1): each secret version is sealed by the TPM under its
//! primary storage key; the sealed blobs (useless without that TPM) live in one JSON file in
//! the state directory, replaced atomically like the file store.
//!
//! What is sealed is `machine_id (16) || version (8) || valid_from (8) || valid_until (8) ||
//! grace_until (8) || secret (32)`: the metadata written next to each blob in clear is checked
//! against the sealed copy at load, so a date edited in the file is refused, not trusted.
//!
//! Metadata lives in this file and in state.json rather than in a TPM NV index: NV space is
//! small and wears with every write (a rotation a day for years), and sealing the metadata
//! with the secret already makes it tamper-evident. Blobs sealed once are cached so a rewrite
//! of the set only seals the new version.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use license_protocol::identity::MachineId;
use license_protocol::secret::{Secret, SecretDates};
use serde::{Deserialize, Serialize};

use super::{SecretStore, StoreError, StoredSecret};
use crate::platform::files::{write_atomic, PRIVATE};
use crate::platform::tpm::{Tpm, TpmError};

const FORMAT: u32 = 1;
const PAYLOAD_LEN: usize = 16 + 8 * 4 + 32;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    format: u32,
    secrets: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    version: u64,
    valid_from: i64,
    valid_until: i64,
    grace_until: i64,
    /// base64 of the TPM's sealed blob.
    blob: String,
}

pub struct TpmStore {
    tpm: Arc<Tpm>,
    path: PathBuf,
    machine_id: MachineId,
    sealed: Mutex<HashMap<u64, String>>,
}

impl std::fmt::Debug for TpmStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn payload(
    machine_id: &MachineId,
    version: u64,
    d: &SecretDates,
    secret: &Secret,
) -> zeroize::Zeroizing<Vec<u8>> {
    let mut p = zeroize::Zeroizing::new(Vec::with_capacity(PAYLOAD_LEN));
    p.extend_from_slice(machine_id.0.as_bytes());
    p.extend_from_slice(&version.to_be_bytes());
    for t in [d.valid_from, d.valid_until, d.grace_until] {
        p.extend_from_slice(&t.to_be_bytes());
    }
    p.extend_from_slice(secret.expose());
    p
}

impl TpmStore {
    pub fn new(tpm: Arc<Tpm>, path: &Path, machine_id: MachineId) -> Self {
        Self {
            tpm,
            path: path.to_path_buf(),
            machine_id,
            sealed: Mutex::default(),
        }
    }

    fn corrupt(&self, message: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: self.path.display().to_string(),
            message: message.into(),
        }
    }

    /// Whether a store file exists (to migrate from the file store on first TPM use).
    pub fn exists(&self) -> bool {
        self.path.exists()
    }
}

impl SecretStore for TpmStore {
    fn kind(&self) -> &'static str {
        "tpm"
    }

    fn load(&self) -> Result<Vec<StoredSecret>, StoreError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StoreError::Io {
                    path: self.path.display().to_string(),
                    source,
                })
            }
        };
        let file: StoreFile =
            serde_json::from_slice(&bytes).map_err(|e| self.corrupt(e.to_string()))?;
        if file.format != FORMAT {
            return Err(self.corrupt("unknown store format"));
        }
        let mut sealed = self.sealed.lock().unwrap_or_else(|e| e.into_inner());
        file.secrets
            .iter()
            .map(|e| {
                let blob = STANDARD
                    .decode(&e.blob)
                    .map_err(|_| self.corrupt("bad blob encoding"))?;
                let plain = self.tpm.unseal(&blob).map_err(|err| match err {
                    TpmError::Unavailable(m) | TpmError::Esys(m) => StoreError::Unavailable(m),
                    err => self.corrupt(format!("version {} does not unseal: {err}", e.version)),
                })?;
                let dates = SecretDates {
                    valid_from: e.valid_from,
                    valid_until: e.valid_until,
                    grace_until: e.grace_until,
                };
                if plain.len() != PAYLOAD_LEN {
                    return Err(self.corrupt(format!(
                        "version {}: sealed payload has the wrong size",
                        e.version
                    )));
                }
                let secret = Secret::try_from_slice(&plain[PAYLOAD_LEN - 32..])
                    .ok_or_else(|| self.corrupt("bad secret"))?;
                if *payload(&self.machine_id, e.version, &dates, &secret) != *plain {
                    return Err(self.corrupt(format!(
                        "version {}: metadata differs from the sealed copy",
                        e.version
                    )));
                }
                sealed.insert(e.version, e.blob.clone());
                Ok(StoredSecret {
                    version: e.version,
                    dates,
                    secret,
                })
            })
            .collect()
    }

    fn save(&self, secrets: &[StoredSecret]) -> Result<(), StoreError> {
        let mut sealed = self.sealed.lock().unwrap_or_else(|e| e.into_inner());
        let mut entries = Vec::with_capacity(secrets.len());
        for s in secrets {
            let blob = match sealed.get(&s.version) {
                Some(blob) => blob.clone(),
                None => {
                    let blob = self
                        .tpm
                        .seal(&payload(&self.machine_id, s.version, &s.dates, &s.secret))
                        .map_err(|e| {
                            StoreError::Unavailable(format!("sealing version {}: {e}", s.version))
                        })?;
                    STANDARD.encode(blob)
                }
            };
            entries.push(Entry {
                version: s.version,
                valid_from: s.dates.valid_from,
                valid_until: s.dates.valid_until,
                grace_until: s.dates.grace_until,
                blob,
            });
        }
        let file = StoreFile {
            format: FORMAT,
            secrets: entries,
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| self.corrupt(e.to_string()))?;
        write_atomic(&self.path, &bytes, PRIVATE).map_err(|source| StoreError::Io {
            path: self.path.display().to_string(),
            source,
        })?;
        sealed.retain(|v, _| secrets.iter().any(|s| s.version == *v));
        for e in &file.secrets {
            sealed.insert(e.version, e.blob.clone());
        }
        Ok(())
    }
}
