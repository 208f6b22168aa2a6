//! The fallback secret store (seed §2.5): one file of AES-256-GCM ciphertexts whose key is
//! derived with PBKDF2-HMAC-SHA256 from 32 bytes of key material kept in a separate file (0600).
//!
//! ```json
//! {"format": 1, "kdf": "pbkdf2-hmac-sha256", "iterations": 210000, "salt": "<b64>",
//!  "secrets": [{"version": 3, "valid_from": …, "valid_until": …, "grace_until": …, "ct": "<b64>"}]}
//! ```
//!
//! Each ciphertext's associated data is `machine_id || version || dates`, so a date or version
//! edited in the file makes that entry fail to decrypt: the store is refused, not trusted.
//! The derived key stays in zeroizing memory for the life of the store.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use license_protocol::identity::MachineId;
use license_protocol::secret::{decrypt_at_rest, encrypt_at_rest, SecretDates};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{SecretStore, StoreError, StoredSecret};
use crate::config::{MAX_PBKDF2_ITERATIONS, MIN_PBKDF2_ITERATIONS};
use crate::platform::files::{write_atomic, PRIVATE};

const FORMAT: u32 = 1;
const KDF: &str = "pbkdf2-hmac-sha256";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    format: u32,
    kdf: String,
    iterations: u32,
    salt: String,
    secrets: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    version: u64,
    valid_from: i64,
    valid_until: i64,
    grace_until: i64,
    ct: String,
}

/// `secret.enc` parsed and checked, nothing decrypted: what [`FileStore::open`] and
/// [`SecretStore::load`] read before any key is derived (public for the fuzz target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreContents {
    /// PBKDF2 iterations, within [`MIN_PBKDF2_ITERATIONS`]..=[`MAX_PBKDF2_ITERATIONS`].
    pub iterations: u32,
    pub salt: [u8; 16],
    pub secrets: Vec<SealedEntry>,
}

/// One version in `secret.enc`: its dates in clear, its secret encrypted at rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedEntry {
    pub version: u64,
    pub dates: SecretDates,
    /// `nonce || AES-256-GCM(secret)`, as `license_protocol::secret::encrypt_at_rest` writes.
    pub ciphertext: Vec<u8>,
}

impl StoreContents {
    /// Parses the file's bytes; the message names what is wrong (the field, for a bad one).
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let file: StoreFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if file.format != FORMAT || file.kdf != KDF {
            return Err("unknown store format".into());
        }
        if !(MIN_PBKDF2_ITERATIONS..=MAX_PBKDF2_ITERATIONS).contains(&file.iterations) {
            return Err(format!(
                "iterations: {} is not between {MIN_PBKDF2_ITERATIONS} and {MAX_PBKDF2_ITERATIONS}",
                file.iterations
            ));
        }
        let salt: [u8; 16] = STANDARD
            .decode(&file.salt)
            .ok()
            .and_then(|s| s.try_into().ok())
            .ok_or("bad salt")?;
        let secrets = file
            .secrets
            .into_iter()
            .map(|e| {
                Ok(SealedEntry {
                    version: e.version,
                    dates: SecretDates {
                        valid_from: e.valid_from,
                        valid_until: e.valid_until,
                        grace_until: e.grace_until,
                    },
                    ciphertext: STANDARD
                        .decode(&e.ct)
                        .map_err(|_| "bad ciphertext encoding".to_string())?,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Self {
            iterations: file.iterations,
            salt,
            secrets,
        })
    }

    /// The file's bytes, as [`SecretStore::save`] writes them.
    pub fn to_bytes(&self) -> Vec<u8> {
        let file = StoreFile {
            format: FORMAT,
            kdf: KDF.into(),
            iterations: self.iterations,
            salt: STANDARD.encode(self.salt),
            secrets: self
                .secrets
                .iter()
                .map(|e| Entry {
                    version: e.version,
                    valid_from: e.dates.valid_from,
                    valid_until: e.dates.valid_until,
                    grace_until: e.dates.grace_until,
                    ct: STANDARD.encode(&e.ciphertext),
                })
                .collect(),
        };
        serde_json::to_vec_pretty(&file).expect("a store file serializes")
    }
}

pub struct FileStore {
    path: PathBuf,
    machine_id: MachineId,
    salt: [u8; 16],
    iterations: u32,
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn corrupt(path: &Path, message: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        path: path.display().to_string(),
        message: message.into(),
    }
}

fn aad(machine_id: &MachineId, version: u64, d: &SecretDates) -> Vec<u8> {
    let mut a = machine_id.0.as_bytes().to_vec();
    for n in [version as i64, d.valid_from, d.valid_until, d.grace_until] {
        a.extend_from_slice(&n.to_be_bytes());
    }
    a
}

impl FileStore {
    /// Opens (or prepares) the store at `path`, creating the key material at `key_file` on
    /// first use. The salt and iteration count come from an existing store.
    pub fn open(
        path: &Path,
        key_file: &Path,
        iterations: u32,
        machine_id: MachineId,
    ) -> Result<Self, StoreError> {
        let material = match std::fs::read(key_file) {
            Ok(bytes) => crate::platform::sealing::unseal(&bytes)
                .map_err(|e| corrupt(key_file, format!("key material cannot be unsealed: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if path.exists() {
                    // A store without its key material can never be read: say so.
                    return Err(corrupt(
                        key_file,
                        "key material is missing but the secret store exists",
                    ));
                }
                let mut fresh = Zeroizing::new(vec![0u8; 32]);
                rand::rngs::OsRng.fill_bytes(&mut fresh);
                let sealed = crate::platform::sealing::seal(&fresh).map_err(io(key_file))?;
                write_atomic(key_file, &sealed, PRIVATE).map_err(io(key_file))?;
                fresh
            }
            Err(e) => return Err(io(key_file)(e)),
        };
        if material.len() != 32 {
            return Err(corrupt(key_file, "key material must be exactly 32 bytes"));
        }
        let (salt, iterations) = match std::fs::read(path) {
            Ok(bytes) => {
                let contents = StoreContents::parse(&bytes).map_err(|e| corrupt(path, e))?;
                (contents.salt, contents.iterations)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut salt = [0u8; 16];
                rand::rngs::OsRng.fill_bytes(&mut salt);
                (salt, iterations)
            }
            Err(e) => return Err(io(path)(e)),
        };
        let mut key = Zeroizing::new([0u8; 32]);
        pbkdf2::pbkdf2_hmac::<sha2::Sha256>(&material, &salt, iterations, key.as_mut());
        Ok(Self {
            path: path.to_path_buf(),
            machine_id,
            salt,
            iterations,
            key,
        })
    }

    /// Removes the store's file (its directory synced): nothing of the secrets it held is left
    /// readable with the key file. A later [`SecretStore::save`] writes it anew.
    pub fn clear(&self) -> Result<(), StoreError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(&self.path)(e)),
        }
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(dir))?;
        }
        Ok(())
    }
}

impl SecretStore for FileStore {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn load(&self) -> Result<Vec<StoredSecret>, StoreError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.path)(e)),
        };
        let contents = StoreContents::parse(&bytes).map_err(|e| corrupt(&self.path, e))?;
        contents
            .secrets
            .into_iter()
            .map(|e| {
                let dates = e.dates;
                let secret = decrypt_at_rest(
                    &self.key,
                    &e.ciphertext,
                    &aad(&self.machine_id, e.version, &dates),
                )
                .map_err(|_| {
                    corrupt(
                        &self.path,
                        format!(
                            "version {} does not decrypt (tampered, or other key material)",
                            e.version
                        ),
                    )
                })?;
                Ok(StoredSecret {
                    version: e.version,
                    dates,
                    secret,
                })
            })
            .collect()
    }

    fn save(&self, secrets: &[StoredSecret]) -> Result<(), StoreError> {
        let contents = StoreContents {
            iterations: self.iterations,
            salt: self.salt,
            secrets: secrets
                .iter()
                .map(|s| SealedEntry {
                    version: s.version,
                    dates: s.dates,
                    ciphertext: encrypt_at_rest(
                        &self.key,
                        &s.secret,
                        &aad(&self.machine_id, s.version, &s.dates),
                    ),
                })
                .collect(),
        };
        let bytes = contents.to_bytes();
        write_atomic(&self.path, &bytes, PRIVATE).map_err(io(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use license_protocol::secret::Secret;

    fn entry(version: u64) -> StoredSecret {
        StoredSecret {
            version,
            dates: SecretDates {
                valid_from: 1,
                valid_until: 2,
                grace_until: 3,
            },
            secret: Secret::generate(),
        }
    }

    #[test]
    fn round_trip_refuses_tampering_and_never_holds_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let (path, key) = (dir.path().join("secret.enc"), dir.path().join("secret.key"));
        let id = MachineId::new_random();
        let store = FileStore::open(&path, &key, 10_000, id).unwrap();
        assert!(store.load().unwrap().is_empty());
        let set = vec![entry(1), entry(2)];
        store.save(&set).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        for s in &set {
            assert!(
                !text.contains(&hex::encode(s.secret.expose()))
                    && !text.contains(&STANDARD.encode(s.secret.expose()))
            );
        }
        // Reopened (salt and iterations from the file), same secrets.
        let again = FileStore::open(&path, &key, 99_999, id).unwrap();
        let loaded = again.load().unwrap();
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded[1].secret, set[1].secret);
        // A date pushed forward in the file is refused.
        std::fs::write(
            &path,
            text.replace("\"grace_until\": 3", "\"grace_until\": 4000000000"),
        )
        .unwrap();
        assert!(matches!(again.load(), Err(StoreError::Corrupt { .. })));
        // Other key material cannot read it.
        std::fs::write(&path, &text).unwrap();
        let other_material = crate::platform::sealing::seal(&[7u8; 32]).unwrap();
        std::fs::write(&key, other_material).unwrap();
        let other = FileStore::open(&path, &key, 10_000, id).unwrap();
        assert!(matches!(other.load(), Err(StoreError::Corrupt { .. })));
        // An iteration count outside the bounds is refused before any key is derived: an
        // edited file cannot make the agent spend hours in PBKDF2 (or none at all).
        for iterations in ["0", "4294967295"] {
            let edited = text.replace(
                "\"iterations\": 10000,",
                &format!("\"iterations\": {iterations},"),
            );
            assert_ne!(edited, text);
            std::fs::write(&path, edited).unwrap();
            let err = FileStore::open(&path, &key, 10_000, id)
                .unwrap_err()
                .to_string();
            assert!(err.contains("iterations"), "{err}");
        }
        std::fs::write(&path, &text).unwrap();
        // Lost key material with an existing store is an error, not a fresh start.
        std::fs::remove_file(&key).unwrap();
        assert!(matches!(
            FileStore::open(&path, &key, 10_000, id),
            Err(StoreError::Corrupt { .. })
        ));
    }
}

#[cfg(test)]
mod contents_tests {
    use super::*;

    #[test]
    fn contents_round_trip() {
        let contents = StoreContents {
            iterations: 210_000,
            salt: [7; 16],
            secrets: vec![SealedEntry {
                version: 3,
                dates: SecretDates {
                    valid_from: 1,
                    valid_until: 2,
                    grace_until: 3,
                },
                ciphertext: vec![1, 2, 3],
            }],
        };
        assert_eq!(StoreContents::parse(&contents.to_bytes()), Ok(contents));
        assert!(StoreContents::parse(b"[]").is_err());
    }
}
