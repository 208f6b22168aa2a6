//! The license signing keys: the key set kept in the data directory (`license-keys.json`,
//! 0600, replaced atomically) and the ring a running server reads it through.
//!
//! Why a set: the license key rolls over (`admin keys rotate-license`: a new key becomes
//! current and signs new tokens and rotate answers, the old one becomes previous and its
//! tokens keep validating) and a compromised key is retired (`admin keys retire-license`: it
//! signs nothing but the key set any more, and every agent that hears of it refuses its tokens
//! with `key_retired`). The server announces the set signed by every key it holds
//! (`license_protocol::license_keys`); agents fetch it when its digest changes. The retired
//! key's signature is what lets an agent that still trusts only that key (it missed the
//! rotation) learn the new one and the retirement in one step; an agent that already knows the
//! key is retired ignores its signature.
//!
//! A data directory made before rollover existed has a bare `license-signing.key` (PKCS#8): it
//! reads as the one current key, and the first write of the set removes it. Replicas with their
//! own data directories get a copy of `license-keys.json` (docs/OPERATIONS.md); a serving
//! process re-reads the file when it changes. Private key bytes never reach a log, an error,
//! the audit trail or `Debug`: a key is named by its [`KeyId`].

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::pkcs8::DecodePrivateKey as _;
use ed25519_dalek::{SigningKey, VerifyingKey};
use license_protocol::license_keys::{
    public_key_string, AnnouncedKey, KeyId, KeySetError, KeyState, LicenseKeySet, TrustedKeys,
};
use license_protocol::rotation::parse_license_public_key;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::clock::Timestamp;
use crate::key_files::{write_private, FileStamp, Held};

/// File name of the key set inside the data directory.
pub const KEY_SET_FILE: &str = "license-keys.json";
/// File name of the single key of data directories made before rollover existed.
pub const LEGACY_KEY_FILE: &str = "license-signing.key";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LicenseKeyError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Malformed { path: String, message: String },
    #[error("{0}: neither {KEY_SET_FILE} nor {LEGACY_KEY_FILE} exists")]
    Missing(String),
    #[error("no license key {0} in this data directory's key set")]
    Unknown(KeyId),
    #[error("license key {0} is the current key: rotate first (`admin keys rotate-license`), then retire it")]
    RetireCurrent(KeyId),
    #[error("license key {0} is already retired")]
    AlreadyRetired(KeyId),
}

/// One license key. Debug shows its id, state and age only.
#[derive(Clone)]
pub struct LicenseKey {
    pub state: KeyState,
    pub created_at: Timestamp,
    public: VerifyingKey,
    /// The private half (a set read from a file may omit it for a retired key).
    signing: Option<SigningKey>,
}

impl std::fmt::Debug for LicenseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LicenseKey")
            .field("id", &self.id())
            .field("state", &self.state)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

impl LicenseKey {
    /// A new random key, current.
    pub fn generate(created_at: Timestamp) -> Self {
        let signing = SigningKey::generate(&mut rand::rngs::OsRng);
        Self {
            state: KeyState::Current,
            created_at,
            public: signing.verifying_key(),
            signing: Some(signing),
        }
    }

    pub fn id(&self) -> KeyId {
        KeyId::of(&self.public)
    }

    /// The seed of a key just generated (which always holds it).
    fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.signing.as_ref().map_or([0; 32], SigningKey::to_bytes))
    }

    pub fn verifying_key(&self) -> &VerifyingKey {
        &self.public
    }

    /// `ed25519:<base64>`, the form agents pin.
    pub fn public_key(&self) -> String {
        public_key_string(&self.public)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKey {
    id: KeyId,
    state: KeyState,
    created_at: i64,
    public_key: String,
    /// Base64 of the 32-byte Ed25519 seed (may be `null` for a retired key).
    private_key: Option<String>,
}

impl Drop for FileKey {
    fn drop(&mut self) {
        if let Some(k) = &mut self.private_key {
            zeroize::Zeroize::zeroize(k);
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeySetFile {
    format: u32,
    issued_at: i64,
    keys: Vec<FileKey>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LicenseKeyError + '_ {
    move |source| LicenseKeyError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn malformed(path: &Path, message: impl Into<String>) -> LicenseKeyError {
    LicenseKeyError::Malformed {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// The license keys a data directory holds, oldest first, and when the set last changed.
#[derive(Debug, Clone)]
pub struct LicenseKeys {
    keys: Vec<LicenseKey>,
    issued_at: Timestamp,
    /// The private half of the current key (kept beside `keys` so signing never fails).
    signing: SigningKey,
}

impl LicenseKeys {
    /// A set of one new current key (`init`).
    pub fn generate(now: Timestamp) -> Self {
        let key = LicenseKey::generate(now);
        let signing = SigningKey::from_bytes(&key.seed());
        Self {
            keys: vec![key],
            issued_at: now,
            signing,
        }
    }

    pub fn keys(&self) -> &[LicenseKey] {
        &self.keys
    }

    pub fn issued_at(&self) -> Timestamp {
        self.issued_at
    }

    /// The key that signs new tokens and rotate answers.
    pub fn current(&self) -> KeyId {
        KeyId::of(&self.signing.verifying_key())
    }

    /// `ed25519:<base64>` of the current key: what a machine enrolling now pins.
    pub fn current_public_key(&self) -> String {
        public_key_string(&self.signing.verifying_key())
    }

    /// A license token sealed and signed by the current key: format v2 (naming the key) once
    /// the set has more than one key; v1 while it has only ever had one, so that agents older
    /// than license key rollover (which read v1 only, and trust their pinned key only) keep
    /// reading the tokens of a server upgraded before them. Upgrade the fleet before the first
    /// `rotate-license`.
    pub fn seal_token(
        &self,
        claims: &license_protocol::token::LicenseClaims,
        secret: &license_protocol::secret::Secret,
        version: u64,
    ) -> String {
        if self.keys.len() == 1 {
            license_protocol::token::seal_v1(claims, secret, version, &self.signing)
        } else {
            license_protocol::token::seal(claims, secret, version, &self.signing)
        }
    }

    /// The private half of the current key.
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    /// The set as announced to agents, signed by every key held (see the module docs for why
    /// retired keys sign it too).
    pub fn announce(&self) -> LicenseKeySet {
        let keys = self
            .keys
            .iter()
            .map(|k| AnnouncedKey::new(&k.public, k.state, k.created_at.0))
            .collect();
        LicenseKeySet::sign(keys, self.issued_at.0, &self.signers())
    }

    /// Every key held with its private half: what signs the announcements agents check
    /// against their trusted keys (this set, and `server_trust`'s).
    pub fn signers(&self) -> Vec<&SigningKey> {
        self.keys
            .iter()
            .filter_map(|k| k.signing.as_ref())
            .collect()
    }

    fn touch(&mut self, now: Timestamp) {
        self.issued_at = Timestamp(now.0.max(self.issued_at.0 + 1));
    }

    /// A new current key; the current one becomes previous. Returns (new, previous).
    pub fn rotate(&mut self, now: Timestamp) -> (KeyId, KeyId) {
        let previous = self.current();
        for k in &mut self.keys {
            if k.state == KeyState::Current {
                k.state = KeyState::Previous;
            }
        }
        let key = LicenseKey::generate(now);
        let id = key.id();
        self.signing = SigningKey::from_bytes(&key.seed());
        self.keys.push(key);
        self.touch(now);
        (id, previous)
    }

    /// Retires `id` (never the current key): it signs no token or rotate answer any more.
    pub fn retire(&mut self, id: KeyId, now: Timestamp) -> Result<(), LicenseKeyError> {
        let key = self
            .keys
            .iter_mut()
            .find(|k| k.id() == id)
            .ok_or(LicenseKeyError::Unknown(id))?;
        match key.state {
            KeyState::Current => return Err(LicenseKeyError::RetireCurrent(id)),
            KeyState::Retired => return Err(LicenseKeyError::AlreadyRetired(id)),
            KeyState::Previous => {}
        }
        key.state = KeyState::Retired;
        self.touch(now);
        Ok(())
    }

    /// Reads the key set of the data directory `root`: `license-keys.json`, or a legacy
    /// `license-signing.key` as the one current key (created at the file's modification time).
    pub fn load(root: &Path) -> Result<Self, LicenseKeyError> {
        let path = root.join(KEY_SET_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => return Self::parse(&path, &Zeroizing::new(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        let legacy = root.join(LEGACY_KEY_FILE);
        let pem = match std::fs::read_to_string(&legacy) {
            Ok(pem) => Zeroizing::new(pem),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LicenseKeyError::Missing(root.display().to_string()))
            }
            Err(e) => return Err(io_err(&legacy)(e)),
        };
        // The pkcs8 error could describe the key: it is not repeated.
        let signing = SigningKey::from_pkcs8_pem(&pem)
            .map_err(|_| malformed(&legacy, "not an Ed25519 PKCS#8 key"))?;
        let created_at = std::fs::metadata(&legacy)
            .map(|m| Timestamp(m.mtime()))
            .map_err(io_err(&legacy))?;
        Ok(Self {
            keys: vec![LicenseKey {
                state: KeyState::Current,
                created_at,
                public: signing.verifying_key(),
                signing: Some(signing.clone()),
            }],
            issued_at: created_at,
            signing,
        })
    }

    fn parse(path: &Path, bytes: &[u8]) -> Result<Self, LicenseKeyError> {
        // The serde error could quote a fragment of the file: it is not repeated.
        let file: KeySetFile = serde_json::from_slice(bytes)
            .map_err(|_| malformed(path, "not a license key set (JSON, format 1)"))?;
        if file.format != 1 {
            return Err(malformed(path, format!("unknown format {}", file.format)));
        }
        let mut keys: Vec<LicenseKey> = Vec::with_capacity(file.keys.len());
        for k in &file.keys {
            let public = parse_license_public_key(&k.public_key)
                .filter(|p| KeyId::of(p) == k.id)
                .ok_or_else(|| malformed(path, format!("key {} does not match its id", k.id)))?;
            let signing = match &k.private_key {
                None => None,
                Some(b64) => {
                    let raw = Zeroizing::new(STANDARD.decode(b64).map_err(|_| {
                        malformed(path, format!("private key {} is not base64", k.id))
                    })?);
                    let seed: Zeroizing<[u8; 32]> =
                        Zeroizing::new(raw.as_slice().try_into().map_err(|_| {
                            malformed(path, format!("private key {} is not 32 bytes", k.id))
                        })?);
                    let signing = SigningKey::from_bytes(&seed);
                    if signing.verifying_key() != public {
                        return Err(malformed(
                            path,
                            format!("private key {} is not its public key's", k.id),
                        ));
                    }
                    Some(signing)
                }
            };
            if k.state != KeyState::Retired && signing.is_none() {
                return Err(malformed(path, format!("key {} has no private key", k.id)));
            }
            if keys.iter().any(|other| other.id() == k.id) {
                return Err(malformed(path, format!("key {} appears twice", k.id)));
            }
            keys.push(LicenseKey {
                state: k.state,
                created_at: Timestamp(k.created_at),
                public,
                signing,
            });
        }
        let mut current = keys.iter().filter(|k| k.state == KeyState::Current);
        let (Some(current), None) = (current.next(), current.next()) else {
            return Err(malformed(path, "must hold exactly one current key"));
        };
        let Some(signing) = current.signing.clone() else {
            return Err(malformed(path, "the current key has no private key"));
        };
        Ok(Self {
            keys,
            issued_at: Timestamp(file.issued_at),
            signing,
        })
    }

    /// Writes the set to `root/license-keys.json` atomically (a 0600 temporary file in the same
    /// directory, synced, renamed over it, the directory synced), then removes a legacy
    /// `license-signing.key`, whose key the set now carries.
    pub fn write(&self, root: &Path) -> Result<(), LicenseKeyError> {
        let path = root.join(KEY_SET_FILE);
        let file = KeySetFile {
            format: 1,
            issued_at: self.issued_at.0,
            keys: self
                .keys
                .iter()
                .map(|k| FileKey {
                    id: k.id(),
                    state: k.state,
                    created_at: k.created_at.0,
                    public_key: k.public_key(),
                    private_key: k.signing.as_ref().map(|s| STANDARD.encode(s.to_bytes())),
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

/// A key set as a serving process uses it: the keys, the announced (signed) set, its digest
/// and the keys online validation trusts — computed once per change, not per request.
#[derive(Debug)]
pub struct Published {
    pub keys: LicenseKeys,
    pub announced: LicenseKeySet,
    pub digest: String,
    pub trusted: TrustedKeys,
}

impl Published {
    fn of(keys: LicenseKeys) -> Result<Self, KeySetError> {
        let announced = keys.announce();
        let trusted = TrustedKeys::own(&announced)?;
        Ok(Self {
            digest: announced.digest(),
            announced,
            trusted,
            keys,
        })
    }
}

fn stamp_of(root: &Path) -> Option<FileStamp> {
    FileStamp::of(root, KEY_SET_FILE, LEGACY_KEY_FILE)
}

/// The license key set of a running server, re-read when the file changes (a rollover run by
/// the CLI, or an operator copying a new set onto a replica).
pub struct LicenseKeyRing {
    root: PathBuf,
    held: Held<Published>,
}

impl std::fmt::Debug for LicenseKeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LicenseKeyRing")
            .field("root", &self.root)
            .field("digest", &self.snapshot().digest)
            .finish_non_exhaustive()
    }
}

fn published(root: &Path, keys: LicenseKeys) -> Result<Published, LicenseKeyError> {
    Published::of(keys).map_err(|e| malformed(&root.join(KEY_SET_FILE), e.to_string()))
}

impl LicenseKeyRing {
    /// Loads the key set of the data directory `root`.
    pub fn load(root: &Path) -> Result<Self, LicenseKeyError> {
        let stamp = stamp_of(root);
        let held = published(root, LicenseKeys::load(root)?)?;
        Ok(Self {
            root: root.to_path_buf(),
            held: Held::new(held, stamp),
        })
    }

    /// The keys held now.
    pub fn snapshot(&self) -> Arc<Published> {
        self.held.snapshot()
    }

    /// Re-reads the key set if its file changed. Returns whether it did; a file that does not
    /// load leaves the held set in place.
    pub fn reload_if_changed(&self) -> Result<bool, LicenseKeyError> {
        let now = stamp_of(&self.root);
        let changed = self.held.stale(now);
        if changed {
            let held = published(&self.root, LicenseKeys::load(&self.root)?)?;
            self.held.replace(held, now);
        }
        Ok(changed)
    }

    /// Writes `keys` to the data directory and holds them.
    pub fn store(&self, keys: LicenseKeys) -> Result<(), LicenseKeyError> {
        let held = published(&self.root, keys)?;
        held.keys.write(&self.root)?;
        self.held.replace(held, stamp_of(&self.root));
        Ok(())
    }

    pub fn path(&self) -> PathBuf {
        self.root.join(KEY_SET_FILE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::pkcs8::EncodePrivateKey as _;

    #[test]
    fn legacy_key_rotation_retirement_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = SigningKey::generate(&mut rand::rngs::OsRng);
        std::fs::write(
            dir.path().join(LEGACY_KEY_FILE),
            legacy.to_pkcs8_pem(Default::default()).unwrap().as_bytes(),
        )
        .unwrap();
        let mut keys = LicenseKeys::load(dir.path()).unwrap();
        let first = KeyId::of(&legacy.verifying_key());
        assert_eq!(keys.current(), first);
        let (new, previous) = keys.rotate(Timestamp(keys.issued_at().0));
        assert_eq!(previous, first);
        assert!(keys.issued_at().0 > 0);
        assert_eq!(keys.current(), new);
        assert!(matches!(
            keys.retire(new, Timestamp(0)),
            Err(LicenseKeyError::RetireCurrent(_))
        ));
        let before = keys.issued_at();
        keys.retire(first, Timestamp(0)).unwrap();
        assert!(keys.issued_at() > before, "every change moves issued_at on");
        assert!(matches!(
            keys.retire(first, Timestamp(0)),
            Err(LicenseKeyError::AlreadyRetired(_))
        ));
        keys.write(dir.path()).unwrap();
        assert!(!dir.path().join(LEGACY_KEY_FILE).exists());
        let mode = std::fs::metadata(dir.path().join(KEY_SET_FILE))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = LicenseKeys::load(dir.path()).unwrap();
        assert_eq!(again.announce(), keys.announce());
        // Signed by both keys: an agent that pinned the legacy key and missed the rotation
        // learns the new key and the retirement at once.
        let set = again.announce();
        assert_eq!(set.signatures.len(), 2);
        let mut straggler = TrustedKeys::pinned(legacy.verifying_key());
        straggler.accept(&set).unwrap();
        assert_eq!(
            straggler.for_token(Some(first)),
            Err(license_protocol::token::TokenError::KeyRetired)
        );
        let debug = format!("{again:?}");
        assert!(!debug.contains(&STANDARD.encode(again.signing_key().to_bytes())));
    }
}
