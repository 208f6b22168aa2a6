//! License signing keys: their ids, the key set the server announces, and the keys an agent
//! trusts (DESIGN.md §2, docs/PROTOCOL.md "License signing keys").
//!
//! Why a set: the license key rolls over (`admin keys rotate-license`) and a compromised one
//! can be retired (`admin keys retire-license`). Tokens name the key that signed them
//! ([`KeyId`] in the v2 header), so an agent holding several keys needs one signature check,
//! and a token under a retired key is refused as such ([`TokenError::KeyRetired`]).
//!
//! The server announces its keys as a [`LicenseKeySet`] (`GET /api/v1/license-keys`), signed
//! by every key it holds that is not retired. An agent starts from the key it pinned at
//! enrollment and accepts a set only when a key it already trusts (and has not seen retired)
//! signed it, and the set is not older than the last one it accepted ([`TrustedKeys::accept`]):
//! trust only ever extends along a chain of signatures from the pin. Retirement is sticky: a
//! key once seen retired stays retired whatever a later set says.
//!
//! ```
//! use license_protocol::license_keys::{AnnouncedKey, KeyState, LicenseKeySet, TrustedKeys};
//!
//! let old = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
//! let new = ed25519_dalek::SigningKey::from_bytes(&[2; 32]);
//! let mut trusted = TrustedKeys::pinned(old.verifying_key());
//! let set = LicenseKeySet::sign(
//!     vec![
//!         AnnouncedKey::new(&old.verifying_key(), KeyState::Previous, 10),
//!         AnnouncedKey::new(&new.verifying_key(), KeyState::Current, 20),
//!     ],
//!     20,
//!     &[&old, &new],
//! );
//! trusted.accept(&set).unwrap();
//! assert_eq!(trusted.digest(), Some(set.digest().as_str()));
//! assert!(trusted.for_token(Some(set.keys[1].id)).is_ok());
//! ```

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::Signer as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::token::{Candidates, TokenError};

/// Domain string of a key set's signature.
const SET_DOMAIN: &[u8] = b"lsa/license-key-set/v1";

/// Names a license signing key: the first 8 bytes of SHA-256 of its Ed25519 public key.
/// 16 hex digits on the wire.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    /// The id of `key`.
    pub fn of(key: &ed25519_dalek::VerifyingKey) -> Self {
        let digest = Sha256::digest(key.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        KeyId(id)
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// A key id that is not 16 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a license key id is 16 hex digits")]
pub struct KeyIdError;

impl std::str::FromStr for KeyId {
    type Err = KeyIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        if bytes.len() != 16 {
            return Err(KeyIdError);
        }
        let digit = |c: u8| -> Result<u8, KeyIdError> {
            match c {
                b'0'..=b'9' => Ok(c - b'0'),
                b'a'..=b'f' => Ok(c - b'a' + 10),
                b'A'..=b'F' => Ok(c - b'A' + 10),
                _ => Err(KeyIdError),
            }
        };
        let mut id = [0u8; 8];
        for (i, pair) in bytes.chunks(2).enumerate() {
            id[i] = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Ok(KeyId(id))
    }
}

impl Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `ed25519:<base64 of the 32-byte public key>`, the form the agent pins.
pub fn public_key_string(key: &ed25519_dalek::VerifyingKey) -> String {
    format!("ed25519:{}", STANDARD.encode(key.to_bytes()))
}

/// Where a license key stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Signs new tokens and rotate answers.
    Current,
    /// Signed tokens still in use; they keep validating.
    Previous,
    /// Its tokens stop validating on every agent that has heard of it.
    Retired,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Current => "current",
            KeyState::Previous => "previous",
            KeyState::Retired => "retired",
        }
    }
}

/// One key of an announced set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AnnouncedKey {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub id: KeyId,
    /// `ed25519:<base64>`.
    pub public_key: String,
    pub state: KeyState,
    /// Unix seconds.
    pub created_at: i64,
}

impl AnnouncedKey {
    pub fn new(key: &ed25519_dalek::VerifyingKey, state: KeyState, created_at: i64) -> Self {
        Self {
            id: KeyId::of(key),
            public_key: public_key_string(key),
            state,
            created_at,
        }
    }

    /// The public key, when it parses and its id is the announced one.
    fn verifying_key(&self) -> Option<ed25519_dalek::VerifyingKey> {
        crate::rotation::parse_license_public_key(&self.public_key)
            .filter(|k| KeyId::of(k) == self.id)
    }
}

/// One signature over a set, by the key `key_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct KeySetSignature {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub key_id: KeyId,
    /// base64 of the Ed25519 signature.
    pub signature: String,
}

/// `GET /api/v1/license-keys`: the server's license keys, signed by each of them that is not
/// retired, over `"lsa/license-key-set/v1" || JSON([keys, issued_at])`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LicenseKeySet {
    pub keys: Vec<AnnouncedKey>,
    /// Unix seconds of the last change of the set; an agent never goes back to an older one.
    pub issued_at: i64,
    pub signatures: Vec<KeySetSignature>,
}

/// Why a key set is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeySetError {
    #[error("key {0} is malformed or its id is not its public key's")]
    BadKey(KeyId),
    #[error("key {0} appears twice")]
    Duplicate(KeyId),
    #[error("the set has no current key, or more than one")]
    NoCurrentKey,
    #[error("no valid signature by a key this agent trusts")]
    Untrusted,
    #[error("the set was issued at {offered}, before the one held (issued at {held})")]
    Older { offered: i64, held: i64 },
}

impl LicenseKeySet {
    /// The bytes the signatures cover.
    pub fn signed_bytes(keys: &[AnnouncedKey], issued_at: i64) -> Vec<u8> {
        let mut m = SET_DOMAIN.to_vec();
        // Struct fields serialize in declaration order: the form is canonical.
        m.extend_from_slice(&serde_json::to_vec(&(keys, issued_at)).expect("key sets serialize"));
        m
    }

    /// Server side: the set signed by each of `signers`.
    pub fn sign(
        keys: Vec<AnnouncedKey>,
        issued_at: i64,
        signers: &[&ed25519_dalek::SigningKey],
    ) -> Self {
        let signatures = sign_with(&Self::signed_bytes(&keys, issued_at), signers);
        Self {
            keys,
            issued_at,
            signatures,
        }
    }

    /// Hex SHA-256 of the signed bytes: what `GET /api/v1/secret-status` announces, so an
    /// agent fetches the set only when it changed.
    pub fn digest(&self) -> String {
        Sha256::digest(Self::signed_bytes(&self.keys, self.issued_at))
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The keys, parsed and checked: ids match their public keys, no duplicate, one current.
    fn parsed(
        &self,
    ) -> Result<BTreeMap<KeyId, (ed25519_dalek::VerifyingKey, KeyState)>, KeySetError> {
        let mut keys = BTreeMap::new();
        for k in &self.keys {
            let vk = k.verifying_key().ok_or(KeySetError::BadKey(k.id))?;
            if keys.insert(k.id, (vk, k.state)).is_some() {
                return Err(KeySetError::Duplicate(k.id));
            }
        }
        if keys
            .values()
            .filter(|(_, s)| *s == KeyState::Current)
            .count()
            != 1
        {
            return Err(KeySetError::NoCurrentKey);
        }
        Ok(keys)
    }
}

/// One signature over `bytes` by each of `signers`.
pub fn sign_with(bytes: &[u8], signers: &[&ed25519_dalek::SigningKey]) -> Vec<KeySetSignature> {
    signers
        .iter()
        .map(|k| KeySetSignature {
            key_id: KeyId::of(&k.verifying_key()),
            signature: STANDARD.encode(k.sign(bytes).to_bytes()),
        })
        .collect()
}

/// Whether one of `signatures` is `key`'s (named `id`) over `bytes`.
fn signed_by(
    bytes: &[u8],
    signatures: &[KeySetSignature],
    id: KeyId,
    key: &ed25519_dalek::VerifyingKey,
) -> bool {
    signatures.iter().filter(|s| s.key_id == id).any(|s| {
        let Some(sig) = STANDARD
            .decode(&s.signature)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
        else {
            return false;
        };
        key.verify_strict(bytes, &ed25519_dalek::Signature::from_bytes(&sig))
            .is_ok()
    })
}

/// One trusted key.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Trusted {
    key: ed25519_dalek::VerifyingKey,
    retired: bool,
}

/// The license keys a verifier trusts: on an agent, the pinned key and what signed sets added
/// to it; on the server, its own set. Public keys only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: BTreeMap<KeyId, Trusted>,
    /// `issued_at` of the last accepted set.
    issued_at: Option<i64>,
    /// Digest of the last accepted set.
    digest: Option<String>,
}

/// What a stored [`TrustedKeys`] looks like (`state_dir/license-keys.json` on an agent).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredTrust {
    pub keys: Vec<StoredKey>,
    pub issued_at: Option<i64>,
    pub digest: Option<String>,
}

/// One key of a [`StoredTrust`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredKey {
    pub id: KeyId,
    pub public_key: String,
    pub retired: bool,
}

impl TrustedKeys {
    /// Only the key pinned at enrollment.
    pub fn pinned(key: ed25519_dalek::VerifyingKey) -> Self {
        Self {
            keys: BTreeMap::from([(
                KeyId::of(&key),
                Trusted {
                    key,
                    retired: false,
                },
            )]),
            issued_at: None,
            digest: None,
        }
    }

    /// Server side: the keys of its own set, trusted as they are (no signature checked).
    pub fn own(set: &LicenseKeySet) -> Result<Self, KeySetError> {
        let keys = set
            .parsed()?
            .into_iter()
            .map(|(id, (key, state))| {
                (
                    id,
                    Trusted {
                        key,
                        retired: state == KeyState::Retired,
                    },
                )
            })
            .collect();
        Ok(Self {
            keys,
            issued_at: Some(set.issued_at),
            digest: Some(set.digest()),
        })
    }

    /// Accepts `set` when a trusted key that is not retired signed it and it is not older than
    /// the last accepted: its keys become the trusted ones (a key seen retired stays retired,
    /// and is remembered even when the set no longer lists it). On refusal nothing changes.
    pub fn accept(&mut self, set: &LicenseKeySet) -> Result<(), KeySetError> {
        let parsed = set.parsed()?;
        if let Some(held) = self.issued_at {
            if set.issued_at < held {
                return Err(KeySetError::Older {
                    offered: set.issued_at,
                    held,
                });
            }
        }
        if !self.vouches(
            &LicenseKeySet::signed_bytes(&set.keys, set.issued_at),
            &set.signatures,
        ) {
            return Err(KeySetError::Untrusted);
        }
        let mut keys: BTreeMap<KeyId, Trusted> = self
            .keys
            .iter()
            .filter(|(_, t)| t.retired)
            .map(|(id, t)| (*id, t.clone()))
            .collect();
        for (id, (key, state)) in parsed {
            let retired = state == KeyState::Retired || keys.get(&id).is_some_and(|t| t.retired);
            keys.insert(id, Trusted { key, retired });
        }
        self.keys = keys;
        self.issued_at = Some(set.issued_at);
        self.digest = Some(set.digest());
        Ok(())
    }

    /// Whether a trusted key that is not retired made one of `signatures` over `bytes`: how
    /// other announcements (`server_trust`) ride on the license keys' chain of trust.
    pub fn vouches(&self, bytes: &[u8], signatures: &[KeySetSignature]) -> bool {
        self.keys
            .iter()
            .any(|(id, t)| !t.retired && signed_by(bytes, signatures, *id, &t.key))
    }

    /// Adds `key` (the pin, on top of a stored trust) unless it is already known.
    pub fn with_pin(mut self, key: ed25519_dalek::VerifyingKey) -> Self {
        self.keys.entry(KeyId::of(&key)).or_insert(Trusted {
            key,
            retired: false,
        });
        self
    }

    /// Digest of the last accepted set (`None` while only the pin is trusted).
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// The keys by id, with whether each is retired.
    pub fn states(&self) -> impl Iterator<Item = (KeyId, bool)> + '_ {
        self.keys.iter().map(|(id, t)| (*id, t.retired))
    }

    /// Keys a token's signature may be by: for a v2 token (`Some(id)`) that key — refused as
    /// retired, or as a bad signature when unknown; for a v1 token every key not retired (and
    /// the retired ones, so that a v1 token under one answers `key_retired`).
    pub fn for_token(&self, id: Option<KeyId>) -> Result<Candidates, TokenError> {
        match id {
            Some(id) => match self.keys.get(&id) {
                Some(t) if t.retired => Err(TokenError::KeyRetired),
                Some(t) => Ok(vec![t.key].into()),
                None => Err(TokenError::BadSignature),
            },
            None => Ok(Candidates {
                keys: self.usable().copied().collect(),
                retired: self
                    .keys
                    .values()
                    .filter(|t| t.retired)
                    .map(|t| t.key)
                    .collect(),
            }),
        }
    }

    /// Keys not retired.
    pub fn usable(&self) -> impl Iterator<Item = &ed25519_dalek::VerifyingKey> + '_ {
        self.keys.values().filter(|t| !t.retired).map(|t| &t.key)
    }

    /// The form kept on disk.
    pub fn to_stored(&self) -> StoredTrust {
        StoredTrust {
            keys: self
                .keys
                .iter()
                .map(|(id, t)| StoredKey {
                    id: *id,
                    public_key: public_key_string(&t.key),
                    retired: t.retired,
                })
                .collect(),
            issued_at: self.issued_at,
            digest: self.digest.clone(),
        }
    }

    /// Back from the form kept on disk (written by this agent, so not signature-checked; ids
    /// are checked against their keys).
    pub fn from_stored(stored: &StoredTrust) -> Result<Self, KeySetError> {
        let mut keys = BTreeMap::new();
        for k in &stored.keys {
            let key = crate::rotation::parse_license_public_key(&k.public_key)
                .filter(|vk| KeyId::of(vk) == k.id)
                .ok_or(KeySetError::BadKey(k.id))?;
            keys.insert(
                k.id,
                Trusted {
                    key,
                    retired: k.retired,
                },
            );
        }
        Ok(Self {
            keys,
            issued_at: stored.issued_at,
            digest: stored.digest.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[n; 32])
    }

    fn announced(k: &ed25519_dalek::SigningKey, state: KeyState) -> AnnouncedKey {
        AnnouncedKey::new(&k.verifying_key(), state, 1)
    }

    #[test]
    fn key_ids_are_hex_and_round_trip() {
        let id = KeyId::of(&key(1).verifying_key());
        let text = id.to_string();
        assert_eq!(text.len(), 16);
        assert_eq!(text.parse::<KeyId>(), Ok(id));
        assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{text}\""));
        assert!("xyz".parse::<KeyId>().is_err());
        assert!("00112233445566zz".parse::<KeyId>().is_err());
    }

    #[test]
    fn accept_extends_trust_only_from_a_trusted_signature() {
        let (a, b, c) = (key(1), key(2), key(3));
        let mut trusted = TrustedKeys::pinned(a.verifying_key());
        // Signed by a key the agent does not trust: refused, nothing changes.
        let by_b_only = LicenseKeySet::sign(
            vec![
                announced(&a, KeyState::Previous),
                announced(&b, KeyState::Current),
            ],
            10,
            &[&b],
        );
        assert_eq!(trusted.accept(&by_b_only), Err(KeySetError::Untrusted));
        assert_eq!(trusted.digest(), None);
        // A signature under a trusted id but over other bytes is no signature.
        let mut tampered = by_b_only.clone();
        tampered.signatures =
            LicenseKeySet::sign(vec![announced(&a, KeyState::Current)], 10, &[&a]).signatures;
        assert_eq!(trusted.accept(&tampered), Err(KeySetError::Untrusted));

        let rolled = LicenseKeySet::sign(
            vec![
                announced(&a, KeyState::Previous),
                announced(&b, KeyState::Current),
            ],
            10,
            &[&a, &b],
        );
        trusted.accept(&rolled).unwrap();
        assert_eq!(trusted.digest(), Some(rolled.digest().as_str()));
        assert_eq!(trusted.usable().count(), 2);

        // Older than the one held: refused (no replay of an older set).
        let older = LicenseKeySet::sign(vec![announced(&a, KeyState::Current)], 9, &[&a]);
        assert!(matches!(
            trusted.accept(&older),
            Err(KeySetError::Older {
                offered: 9,
                held: 10
            })
        ));

        // a retired; c added, signed by b alone.
        let retired = LicenseKeySet::sign(
            vec![
                announced(&a, KeyState::Retired),
                announced(&b, KeyState::Previous),
                announced(&c, KeyState::Current),
            ],
            20,
            &[&b, &c],
        );
        trusted.accept(&retired).unwrap();
        let a_id = KeyId::of(&a.verifying_key());
        assert_eq!(trusted.for_token(Some(a_id)), Err(TokenError::KeyRetired));
        let v1 = trusted.for_token(None).unwrap();
        assert_eq!((v1.keys.len(), v1.retired.len()), (2, 1));

        // Sticky: a later set saying a is current again (signed by a, and by b) changes
        // nothing for a; a signature by a retired key alone does not vouch.
        let revived_by_a = LicenseKeySet::sign(
            vec![
                announced(&a, KeyState::Current),
                announced(&b, KeyState::Previous),
            ],
            30,
            &[&a],
        );
        assert_eq!(trusted.accept(&revived_by_a), Err(KeySetError::Untrusted));
        let revived = LicenseKeySet::sign(
            vec![
                announced(&a, KeyState::Current),
                announced(&b, KeyState::Previous),
            ],
            30,
            &[&a, &b],
        );
        trusted.accept(&revived).unwrap();
        assert_eq!(trusted.for_token(Some(a_id)), Err(TokenError::KeyRetired));
        // A set that no longer lists a still leaves it retired.
        let dropped = LicenseKeySet::sign(vec![announced(&b, KeyState::Current)], 40, &[&b]);
        trusted.accept(&dropped).unwrap();
        assert_eq!(trusted.for_token(Some(a_id)), Err(TokenError::KeyRetired));
        // And the unknown key is a bad signature.
        assert_eq!(
            trusted.for_token(Some(KeyId([0; 8]))),
            Err(TokenError::BadSignature)
        );

        // What is stored reads back the same.
        let stored = serde_json::to_string(&trusted.to_stored()).unwrap();
        let back = TrustedKeys::from_stored(&serde_json::from_str(&stored).unwrap()).unwrap();
        assert_eq!(back, trusted);
    }

    #[test]
    fn malformed_sets_are_refused() {
        let (a, b) = (key(1), key(2));
        let mut trusted = TrustedKeys::pinned(a.verifying_key());
        let mut lying = announced(&b, KeyState::Current);
        lying.id = KeyId::of(&a.verifying_key());
        let bad = LicenseKeySet::sign(vec![lying], 1, &[&a]);
        assert!(matches!(trusted.accept(&bad), Err(KeySetError::BadKey(_))));
        let two_current = LicenseKeySet::sign(
            vec![
                announced(&a, KeyState::Current),
                announced(&b, KeyState::Current),
            ],
            1,
            &[&a],
        );
        assert_eq!(trusted.accept(&two_current), Err(KeySetError::NoCurrentKey));
    }
}
