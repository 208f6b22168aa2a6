//! The private release keys: `release-keys.json` in the publishing host's data directory
//! (0600, replaced atomically), holding the Ed25519 key that signs release manifests.
//!
//! Why apart from the database: the public halves live in the `release_keys` table, so every
//! replica announces them, but only the host that publishes needs a private key. The file holds
//! the key the database names current, and during `admin release rotate-key` also the new one
//! (written before the database switches to it, so a crash between the two leaves a file that
//! still holds the current key); once the database has switched, the file keeps only the new
//! key: a retired key's private half is kept nowhere. Private key bytes never reach a log, an
//! error, the audit trail or `Debug`: a key is named by its [`KeyId`].

use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::SigningKey;
use license_protocol::license_keys::{public_key_string, KeyId};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::clock::Timestamp;
use crate::key_files::replace;

/// File name of the release keys inside the data directory.
pub const RELEASE_KEYS_FILE: &str = "release-keys.json";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReleaseKeyFileError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Malformed { path: String, message: String },
}

/// One private release key. Debug shows its id and age only.
#[derive(Clone)]
pub struct ReleaseKey {
    pub created_at: Timestamp,
    signing: SigningKey,
}

impl std::fmt::Debug for ReleaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReleaseKey")
            .field("id", &self.id())
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

impl ReleaseKey {
    /// A new random key.
    pub fn generate(created_at: Timestamp) -> Self {
        Self {
            created_at,
            signing: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    pub fn id(&self) -> KeyId {
        KeyId::of(&self.signing.verifying_key())
    }

    /// `ed25519:<base64>`.
    pub fn public_key(&self) -> String {
        public_key_string(&self.signing.verifying_key())
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKey {
    id: KeyId,
    created_at: i64,
    public_key: String,
    /// Base64 of the 32-byte Ed25519 seed.
    private_key: String,
}

impl Drop for FileKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.private_key);
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    format: u32,
    keys: Vec<FileKey>,
}

fn malformed(path: &Path, message: impl Into<String>) -> ReleaseKeyFileError {
    ReleaseKeyFileError::Malformed {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// The private release keys a data directory holds (usually one).
#[derive(Debug, Clone, Default)]
pub struct ReleaseKeyFile {
    pub keys: Vec<ReleaseKey>,
}

impl ReleaseKeyFile {
    /// The keys of `root/release-keys.json`, `None` when the file does not exist (a data
    /// directory made before releases, or a replica that does not publish).
    pub fn load(root: &Path) -> Result<Option<Self>, ReleaseKeyFileError> {
        let path = root.join(RELEASE_KEYS_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => Zeroizing::new(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ReleaseKeyFileError::Io {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        // The serde error could quote a fragment of the file: it is not repeated.
        let file: KeysFile = serde_json::from_slice(&bytes)
            .map_err(|_| malformed(&path, "not a release key file (JSON, format 1)"))?;
        if file.format != 1 {
            return Err(malformed(&path, format!("unknown format {}", file.format)));
        }
        let mut keys = Vec::with_capacity(file.keys.len());
        for k in &file.keys {
            let raw =
                Zeroizing::new(STANDARD.decode(&k.private_key).map_err(|_| {
                    malformed(&path, format!("private key {} is not base64", k.id))
                })?);
            let seed: Zeroizing<[u8; 32]> =
                Zeroizing::new(raw.as_slice().try_into().map_err(|_| {
                    malformed(&path, format!("private key {} is not 32 bytes", k.id))
                })?);
            let signing = SigningKey::from_bytes(&seed);
            if KeyId::of(&signing.verifying_key()) != k.id
                || public_key_string(&signing.verifying_key()) != k.public_key
            {
                return Err(malformed(
                    &path,
                    format!("private key {} does not match its id", k.id),
                ));
            }
            keys.push(ReleaseKey {
                created_at: Timestamp(k.created_at),
                signing,
            });
        }
        Ok(Some(Self { keys }))
    }

    /// The key of id `id`, if held.
    pub fn get(&self, id: KeyId) -> Option<&ReleaseKey> {
        self.keys.iter().find(|k| k.id() == id)
    }

    /// The newest key held.
    pub fn newest(&self) -> Option<&ReleaseKey> {
        self.keys.iter().max_by_key(|k| k.created_at)
    }

    /// Writes the keys to `root/release-keys.json` atomically at mode 0600.
    pub fn write(&self, root: &Path) -> Result<(), ReleaseKeyFileError> {
        let path = root.join(RELEASE_KEYS_FILE);
        let file = KeysFile {
            format: 1,
            keys: self
                .keys
                .iter()
                .map(|k| FileKey {
                    id: k.id(),
                    created_at: k.created_at.0,
                    public_key: k.public_key(),
                    private_key: STANDARD.encode(k.signing.to_bytes()),
                })
                .collect(),
        };
        let mut text = Zeroizing::new(
            serde_json::to_string_pretty(&file)
                .map_err(|_| malformed(&path, "cannot serialize"))?,
        );
        text.push('\n');
        replace(root, RELEASE_KEYS_FILE, text.as_bytes(), 0o600).map_err(|(path, source)| {
            ReleaseKeyFileError::Io {
                path: path.display().to_string(),
                source,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn keys_round_trip_through_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ReleaseKeyFile::load(dir.path()).unwrap().is_none());
        let key = ReleaseKey::generate(Timestamp(5));
        let file = ReleaseKeyFile {
            keys: vec![key.clone()],
        };
        file.write(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(RELEASE_KEYS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let read = ReleaseKeyFile::load(dir.path()).unwrap().unwrap();
        assert_eq!(read.newest().unwrap().id(), key.id());
        assert!(!format!("{read:?}").contains(&STANDARD.encode(key.signing.to_bytes())));
        std::fs::write(dir.path().join(RELEASE_KEYS_FILE), "{").unwrap();
        let err = ReleaseKeyFile::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a release key file"), "{err}");
    }
}
