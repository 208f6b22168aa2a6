//! The master keys that encrypt machine secrets at rest: the key set kept in the data
//! directory (`master-keys.json`, 0600, replaced atomically) and the ring a running server
//! reads it through.
//!
//! Why a set and not one key: a master key rolls over online (`admin keys rotate-master`), so
//! for a while rows sealed under the previous key and rows sealed under the new one coexist,
//! and every replica must read both. Which key seals new secrets is decided by the database's
//! registry (`store::master_keys`), not by this file, so all replicas agree on it; this file
//! only holds key material, by id. A data directory made before rollover existed has a bare
//! `master.key` (32 bytes): it reads as key `k1`, and the first rewrite of the set removes it.
//!
//! Key bytes never reach a log, an error, the audit trail or `Debug`; a key is identified by its
//! id and its check value (a truncated SHA-256 of a fixed label and the key).

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use crate::clock::Timestamp;
use crate::key_files::{write_private, FileStamp, Held};

/// File name of the key set inside the data directory.
pub const KEY_SET_FILE: &str = "master-keys.json";
/// File name of the single key of data directories made before rollover existed.
pub const LEGACY_KEY_FILE: &str = "master.key";
/// Id of the first master key (and of a legacy `master.key`).
pub const FIRST_KEY_ID: &str = "k1";
/// A read that finds no key for a row re-reads the key set at most this often.
const MISS_RELOAD_INTERVAL: Duration = Duration::from_secs(1);
/// Label hashed with a key into its check value.
const CHECK_LABEL: &[u8] = b"license-secret-agent master key check v1";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MasterKeyError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Malformed { path: String, message: String },
    #[error("{0}: neither {KEY_SET_FILE} nor {LEGACY_KEY_FILE} exists")]
    Missing(String),
}

/// One master key. Debug shows its id and check value only.
#[derive(Clone)]
pub struct MasterKey {
    pub id: String,
    pub created_at: Timestamp,
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .field("created_at", &self.created_at)
            .field("check_value", &self.check_value())
            .finish_non_exhaustive()
    }
}

impl MasterKey {
    /// A new random key.
    pub fn generate(id: impl Into<String>, created_at: Timestamp) -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(key.as_mut());
        Self {
            id: id.into(),
            created_at,
            key,
        }
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.key
    }

    /// 16 hex digits of SHA-256(label || key): names the key without revealing it.
    pub fn check_value(&self) -> String {
        let mut h = Sha256::new();
        h.update(CHECK_LABEL);
        h.update(self.key.as_ref());
        hex::encode(&h.finalize()[..8])
    }
}

/// The ordinal of an id `kN`, for choosing the next one.
pub fn ordinal(id: &str) -> Option<u64> {
    id.strip_prefix('k')?.parse().ok()
}

/// The keys a data directory holds, oldest first.
#[derive(Debug, Clone, Default)]
pub struct MasterKeySet {
    keys: Vec<MasterKey>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKey {
    id: String,
    created_at: i64,
    /// Base64 of the 32 key bytes.
    key: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeySetFile {
    format: u32,
    keys: Vec<FileKey>,
}

impl Drop for FileKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.key);
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> MasterKeyError + '_ {
    move |source| MasterKeyError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn malformed(path: &Path, message: impl Into<String>) -> MasterKeyError {
    MasterKeyError::Malformed {
        path: path.display().to_string(),
        message: message.into(),
    }
}

impl MasterKeySet {
    pub fn new(keys: Vec<MasterKey>) -> Self {
        Self { keys }
    }

    pub fn keys(&self) -> &[MasterKey] {
        &self.keys
    }

    pub fn get(&self, id: &str) -> Option<&MasterKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    pub fn ids(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.id.clone()).collect()
    }

    pub fn insert(&mut self, key: MasterKey) {
        self.keys.retain(|k| k.id != key.id);
        self.keys.push(key);
    }

    /// Removes the key `id`; true if it was there.
    pub fn remove(&mut self, id: &str) -> bool {
        let before = self.keys.len();
        self.keys.retain(|k| k.id != id);
        self.keys.len() != before
    }

    /// Reads the key set of the data directory `root`: `master-keys.json`, or a legacy
    /// `master.key` as key `k1` (created at the file's modification time).
    pub fn load(root: &Path) -> Result<Self, MasterKeyError> {
        let path = root.join(KEY_SET_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => return Self::parse(&path, &Zeroizing::new(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        let legacy = root.join(LEGACY_KEY_FILE);
        let bytes = match std::fs::read(&legacy) {
            Ok(bytes) => Zeroizing::new(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(MasterKeyError::Missing(root.display().to_string()))
            }
            Err(e) => return Err(io_err(&legacy)(e)),
        };
        let key: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| malformed(&legacy, "must be exactly 32 bytes"))?;
        let created_at = std::fs::metadata(&legacy)
            .map(|m| Timestamp(m.mtime()))
            .map_err(io_err(&legacy))?;
        Ok(Self {
            keys: vec![MasterKey {
                id: FIRST_KEY_ID.into(),
                created_at,
                key: Zeroizing::new(key),
            }],
        })
    }

    fn parse(path: &Path, bytes: &[u8]) -> Result<Self, MasterKeyError> {
        // The serde error could quote a fragment of the file: it is not repeated.
        let file: KeySetFile = serde_json::from_slice(bytes)
            .map_err(|_| malformed(path, "not a master key set (JSON, format 1)"))?;
        if file.format != 1 {
            return Err(malformed(path, format!("unknown format {}", file.format)));
        }
        let mut keys = Vec::with_capacity(file.keys.len());
        for k in &file.keys {
            if k.id.is_empty() || !k.id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(malformed(path, "a key id is not alphanumeric"));
            }
            if keys.iter().any(|other: &MasterKey| other.id == k.id) {
                return Err(malformed(path, format!("key {} appears twice", k.id)));
            }
            let raw = Zeroizing::new(
                STANDARD
                    .decode(&k.key)
                    .map_err(|_| malformed(path, format!("key {} is not base64", k.id)))?,
            );
            let key: [u8; 32] = raw
                .as_slice()
                .try_into()
                .map_err(|_| malformed(path, format!("key {} is not 32 bytes", k.id)))?;
            keys.push(MasterKey {
                id: k.id.clone(),
                created_at: Timestamp(k.created_at),
                key: Zeroizing::new(key),
            });
        }
        if keys.is_empty() {
            return Err(malformed(path, "holds no key"));
        }
        Ok(Self { keys })
    }

    /// Writes the set to `root/master-keys.json` atomically (a 0600 temporary file in the same
    /// directory, synced, renamed over it, the directory synced), then removes a legacy
    /// `master.key`, whose key the set now carries or has retired.
    pub fn write(&self, root: &Path) -> Result<(), MasterKeyError> {
        let path = root.join(KEY_SET_FILE);
        let file = KeySetFile {
            format: 1,
            keys: self
                .keys
                .iter()
                .map(|k| FileKey {
                    id: k.id.clone(),
                    created_at: k.created_at.0,
                    key: STANDARD.encode(k.key.as_ref()),
                })
                .collect(),
        };
        let mut text = Zeroizing::new(
            serde_json::to_string_pretty(&file)
                .map_err(|_| malformed(&path, "cannot serialize"))?,
        );
        text.push('\n');
        write_private(root, KEY_SET_FILE, LEGACY_KEY_FILE, text.as_bytes())
            .map_err(|(path, e)| io_err(&path)(e))
    }
}

fn stamp_of(root: &Path) -> Option<FileStamp> {
    FileStamp::of(root, KEY_SET_FILE, LEGACY_KEY_FILE)
}

/// The key set of a running server, re-read when the file changes (a rollover run by the CLI,
/// or an operator copying a new set onto a replica).
pub struct MasterKeyRing {
    root: PathBuf,
    set: Held<MasterKeySet>,
    last_miss_reload: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for MasterKeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKeyRing")
            .field("root", &self.root)
            .field("ids", &self.snapshot().ids())
            .finish_non_exhaustive()
    }
}

impl MasterKeyRing {
    /// Loads the key set of the data directory `root`.
    pub fn load(root: &Path) -> Result<Self, MasterKeyError> {
        let stamp = stamp_of(root);
        let set = MasterKeySet::load(root)?;
        Ok(Self {
            root: root.to_path_buf(),
            set: Held::new(set, stamp),
            last_miss_reload: Mutex::new(None),
        })
    }

    /// The keys held now.
    pub fn snapshot(&self) -> Arc<MasterKeySet> {
        self.set.snapshot()
    }

    /// The key `id`, re-reading the key set (at most once a second) when it is not held: a
    /// rollover elsewhere may have put rows under a key this process has not loaded yet.
    pub fn get(&self, id: &str) -> Option<MasterKey> {
        if let Some(k) = self.snapshot().get(id) {
            return Some(k.clone());
        }
        self.reload_after_miss();
        self.snapshot().get(id).cloned()
    }

    /// After a read found no usable key: re-reads the key set, at most once a second (so a
    /// flood of bad rows cannot turn into a flood of file reads). Returns whether it re-read.
    pub fn reload_after_miss(&self) -> bool {
        let due = {
            let mut last = match self.last_miss_reload.lock() {
                Ok(l) => l,
                Err(poisoned) => poisoned.into_inner(),
            };
            let due = last.is_none_or(|t| t.elapsed() >= MISS_RELOAD_INTERVAL);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due {
            if let Err(e) = self.reload() {
                tracing::warn!(error = %e, "could not re-read the master key set");
            }
        }
        due
    }

    /// Re-reads the key set if its file changed. Returns whether it did; a file that does not
    /// load leaves the held set in place.
    pub fn reload_if_changed(&self) -> Result<bool, MasterKeyError> {
        let changed = self.set.stale(stamp_of(&self.root));
        if changed {
            self.reload()?;
        }
        Ok(changed)
    }

    /// Re-reads the key set now.
    pub fn reload(&self) -> Result<(), MasterKeyError> {
        let stamp = stamp_of(&self.root);
        let set = MasterKeySet::load(&self.root)?;
        self.set.replace(set, stamp);
        Ok(())
    }

    /// Writes `set` to the data directory and holds it.
    pub fn store(&self, set: MasterKeySet) -> Result<(), MasterKeyError> {
        set.write(&self.root)?;
        self.set.replace(set, stamp_of(&self.root));
        Ok(())
    }

    pub fn path(&self) -> PathBuf {
        self.root.join(KEY_SET_FILE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_round_trips_at_0600_and_replaces_the_legacy_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LEGACY_KEY_FILE), [7u8; 32]).unwrap();
        let mut set = MasterKeySet::load(dir.path()).unwrap();
        assert_eq!(set.ids(), ["k1"]);
        assert_eq!(set.get("k1").unwrap().bytes(), &[7u8; 32]);
        set.insert(MasterKey::generate("k2", Timestamp(5)));
        set.write(dir.path()).unwrap();
        assert!(!dir.path().join(LEGACY_KEY_FILE).exists());
        let mode = std::fs::metadata(dir.path().join(KEY_SET_FILE))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = MasterKeySet::load(dir.path()).unwrap();
        assert_eq!(again.ids(), ["k1", "k2"]);
        assert_eq!(
            again.get("k2").unwrap().check_value(),
            set.get("k2").unwrap().check_value()
        );
    }

    #[test]
    fn debug_and_errors_show_no_key_bytes() {
        let key = MasterKey::generate("k3", Timestamp(1));
        let b64 = STANDARD.encode(key.bytes());
        let debug = format!("{:?}", MasterKeySet::new(vec![key.clone()]));
        assert!(debug.contains("k3") && !debug.contains(&b64), "{debug}");
        assert!(!debug.contains(&hex::encode(key.bytes())));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(KEY_SET_FILE),
            format!("{{\"format\":1,\"keys\":[{{\"id\":\"k1\",\"created_at\":0,\"key\":\"{b64}\",\"x\":1}}]}}"),
        )
        .unwrap();
        let e = MasterKeySet::load(dir.path()).unwrap_err().to_string();
        assert!(!e.contains(&b64), "{e}");
    }

    #[test]
    fn ordinals() {
        assert_eq!(ordinal("k12"), Some(12));
        assert_eq!(ordinal("x1"), None);
    }
}
