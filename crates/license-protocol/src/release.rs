//! Agent releases: versions, the signed release manifest, the release keys the license keys
//! vouch for, the rollout decision and the update report (DESIGN.md §4b, docs/PROTOCOL.md
//! "Updates").
//!
//! The server signs each release's [`ReleaseManifest`] with its release key (Ed25519). The
//! agent does not pin the release key itself: the server announces its release keys in a
//! [`ReleaseKeys`] set signed by its license keys, which the agent trusts along the chain that
//! starts at the license key pinned at enrollment. An [`UpdateOffer`] (in the secret status,
//! only when a release is offered to the machine) carries the manifest, its signature and that
//! set, so checking it takes no other request. A release key once seen retired is never
//! trusted again ([`ReleaseTrust`]).
//!
//! ```
//! use license_protocol::license_keys::TrustedKeys;
//! use license_protocol::release::*;
//!
//! let license_key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
//! let release_key = ed25519_dalek::SigningKey::from_bytes(&[2; 32]);
//! let keys = ReleaseKeys::sign(
//!     vec![AnnouncedReleaseKey::new(&release_key.verifying_key(), ReleaseKeyState::Current)],
//!     100,
//!     &[&license_key],
//! );
//! let manifest = ReleaseManifest {
//!     release_id: uuid::Uuid::nil(),
//!     version: "1.2.0".parse().unwrap(),
//!     channel: "stable".parse().unwrap(),
//!     arch: "x86_64".into(),
//!     sha256: "00".repeat(32),
//!     size: 10,
//!     min_version: None,
//!     rollback: false,
//!     published_at: 100,
//! };
//! let offer = UpdateOffer::sign(manifest, &release_key, keys);
//! let mut trust = ReleaseTrust::default();
//! let license = TrustedKeys::pinned(license_key.verifying_key());
//! trust.verify(&offer, &license).unwrap();
//! let own: Version = "1.1.3".parse().unwrap();
//! applicable(&offer.manifest, own, "x86_64").unwrap();
//! assert!(applicable(&offer.manifest, "1.2.0".parse().unwrap(), "x86_64").is_err());
//! ```

use std::collections::BTreeSet;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::Signer as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::license_keys::{public_key_string, sign_with, KeyId, KeySetSignature, TrustedKeys};

/// Domain string of the release key set's signatures (by the license keys).
const KEYS_DOMAIN: &[u8] = b"lsa/release-keys/v1";
/// Domain string of a manifest's signature (by a release key).
const MANIFEST_DOMAIN: &[u8] = b"lsa/release-manifest/v1";

/// A release version, `MAJOR.MINOR.PATCH` (numbers only), ordered numerically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

/// A version that is not `MAJOR.MINOR.PATCH`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a version is MAJOR.MINOR.PATCH, three numbers (e.g. 1.4.2), not {0:?}")]
pub struct VersionError(pub String);

impl std::str::FromStr for Version {
    type Err = VersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || VersionError(s.chars().take(32).collect());
        let mut parts = s.split('.').map(|p| {
            if p.is_empty() || p.len() > 9 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            p.parse::<u32>().map_err(|_| bad())
        });
        let (Some(major), Some(minor), Some(patch), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        Ok(Version {
            major: major?,
            minor: minor?,
            patch: patch?,
        })
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A release channel: 1 to 32 characters among `a-z`, `0-9` and `-` (`stable`, `beta`, …).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Channel(String);

/// A channel name that is not 1–32 of `a-z0-9-`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a channel is 1 to 32 characters among a-z, 0-9 and '-'")]
pub struct ChannelError;

impl Channel {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Channel {
    type Err = ChannelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = (1..=32).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        ok.then(|| Channel(s.to_string())).ok_or(ChannelError)
    }
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Channel {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Channel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// What the server signs for a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ReleaseManifest {
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Uuid))]
    pub release_id: uuid::Uuid,
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "1.4.2"))]
    pub version: Version,
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "stable"))]
    pub channel: Channel,
    /// As Rust names it (`std::env::consts::ARCH`): `x86_64`, `aarch64`, …
    pub arch: String,
    /// Hex SHA-256 of the binary.
    pub sha256: String,
    /// Bytes.
    pub size: u64,
    /// Agents older than this must not take this release.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub min_version: Option<Version>,
    /// The vendor marked it a rollback: agents newer than it take it all the same.
    #[serde(default)]
    pub rollback: bool,
    /// Unix seconds.
    pub published_at: i64,
}

impl ReleaseManifest {
    /// The bytes a release key signs.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut m = MANIFEST_DOMAIN.to_vec();
        // Struct fields serialize in declaration order: the form is canonical.
        m.extend_from_slice(&serde_json::to_vec(self).expect("manifests serialize"));
        m
    }
}

/// Where a release key stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ReleaseKeyState {
    /// Signs manifests.
    Current,
    /// Never trusted again by an agent that has seen it so.
    Retired,
}

/// One key of the release key set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AnnouncedReleaseKey {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub id: KeyId,
    /// `ed25519:<base64>`.
    pub public_key: String,
    pub state: ReleaseKeyState,
}

impl AnnouncedReleaseKey {
    pub fn new(key: &ed25519_dalek::VerifyingKey, state: ReleaseKeyState) -> Self {
        Self {
            id: KeyId::of(key),
            public_key: public_key_string(key),
            state,
        }
    }

    fn verifying_key(&self) -> Option<ed25519_dalek::VerifyingKey> {
        crate::rotation::parse_license_public_key(&self.public_key)
            .filter(|k| KeyId::of(k) == self.id)
    }
}

/// The server's release keys, signed by each of its license keys that is not retired, over
/// `"lsa/release-keys/v1" || JSON([keys, issued_at])`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ReleaseKeys {
    pub keys: Vec<AnnouncedReleaseKey>,
    /// Unix seconds of the last change (a new key, a retirement).
    pub issued_at: i64,
    pub signatures: Vec<KeySetSignature>,
}

impl ReleaseKeys {
    pub fn signed_bytes(keys: &[AnnouncedReleaseKey], issued_at: i64) -> Vec<u8> {
        let mut m = KEYS_DOMAIN.to_vec();
        m.extend_from_slice(&serde_json::to_vec(&(keys, issued_at)).expect("key sets serialize"));
        m
    }

    /// Server side: the set signed by each of `license_keys`.
    pub fn sign(
        keys: Vec<AnnouncedReleaseKey>,
        issued_at: i64,
        license_keys: &[&ed25519_dalek::SigningKey],
    ) -> Self {
        let signatures = sign_with(&Self::signed_bytes(&keys, issued_at), license_keys);
        Self {
            keys,
            issued_at,
            signatures,
        }
    }
}

/// A release offered to a machine (`update` of `GET /api/v1/secret-status`): the manifest,
/// the release key's signature over it and the release keys the license keys vouch for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UpdateOffer {
    pub manifest: ReleaseManifest,
    /// The release key that signed the manifest.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub key_id: KeyId,
    /// base64 of the Ed25519 signature over `"lsa/release-manifest/v1" || JSON(manifest)`.
    pub signature: String,
    pub release_keys: ReleaseKeys,
}

impl UpdateOffer {
    /// Server side: `manifest` signed by `release_key`, with the key set vouching for it.
    pub fn sign(
        manifest: ReleaseManifest,
        release_key: &ed25519_dalek::SigningKey,
        release_keys: ReleaseKeys,
    ) -> Self {
        let signature = STANDARD.encode(release_key.sign(&manifest.signed_bytes()).to_bytes());
        Self {
            key_id: KeyId::of(&release_key.verifying_key()),
            manifest,
            signature,
            release_keys,
        }
    }

    /// The manifest's signature by a release key, base64 (stored by the server).
    pub fn signature_of(
        manifest: &ReleaseManifest,
        release_key: &ed25519_dalek::SigningKey,
    ) -> String {
        STANDARD.encode(release_key.sign(&manifest.signed_bytes()).to_bytes())
    }
}

/// Why an offer or a downloaded binary is refused. The reason codes (`code`) are what the
/// agent audits and reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReleaseError {
    #[error("the release keys are not signed by a license key this agent trusts")]
    KeysUntrusted,
    #[error("the release keys were issued at {offered}, before the ones held (issued at {held})")]
    KeysOlder { offered: i64, held: i64 },
    #[error("the manifest is signed by release key {0}, which is not a current release key")]
    UnknownKey(KeyId),
    #[error("release key {0} is retired")]
    KeyRetired(KeyId),
    #[error("the manifest's signature does not verify")]
    BadSignature,
    #[error("release {offered} is for {arch}, this machine is {own}")]
    WrongArch {
        offered: Version,
        arch: String,
        own: String,
    },
    #[error("release {offered} is not newer than {own} and not marked a rollback")]
    Downgrade { offered: Version, own: Version },
    #[error("release {offered} needs at least version {min} to update from, this is {own}")]
    TooOld {
        offered: Version,
        min: Version,
        own: Version,
    },
    #[error("the download is {got} bytes, the manifest says {expected}")]
    WrongSize { expected: u64, got: u64 },
    #[error("the download's SHA-256 is {got}, the manifest says {expected}")]
    WrongDigest { expected: String, got: String },
}

impl ReleaseError {
    /// A short stable code (audit `reason_code`, the update report, metrics labels).
    pub fn code(&self) -> &'static str {
        match self {
            ReleaseError::KeysUntrusted | ReleaseError::KeysOlder { .. } => "release_keys_refused",
            ReleaseError::UnknownKey(_) | ReleaseError::KeyRetired(_) => "unknown_release_key",
            ReleaseError::BadSignature => "bad_signature",
            ReleaseError::WrongArch { .. } => "wrong_arch",
            ReleaseError::Downgrade { .. } => "downgrade",
            ReleaseError::TooOld { .. } => "too_old",
            ReleaseError::WrongSize { .. } => "wrong_size",
            ReleaseError::WrongDigest { .. } => "wrong_digest",
        }
    }
}

/// The release keys a verifier has learned: those it saw retired (never trusted again) and
/// the date of the newest set it accepted. Public data only (`state_dir/release-keys.json` on
/// an agent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseTrust {
    pub retired: BTreeSet<KeyId>,
    pub issued_at: Option<i64>,
}

impl ReleaseTrust {
    /// Checks `offer`: its release keys vouched for by `license_keys` and not older than those
    /// held, its signer current in them and never seen retired, its signature. On success the
    /// set's retirements are remembered (the caller saves the trust when it changed).
    pub fn verify(
        &mut self,
        offer: &UpdateOffer,
        license_keys: &TrustedKeys,
    ) -> Result<(), ReleaseError> {
        let keys = &offer.release_keys;
        let bytes = ReleaseKeys::signed_bytes(&keys.keys, keys.issued_at);
        if !license_keys.vouches(&bytes, &keys.signatures) {
            return Err(ReleaseError::KeysUntrusted);
        }
        if let Some(held) = self.issued_at {
            if keys.issued_at < held {
                return Err(ReleaseError::KeysOlder {
                    offered: keys.issued_at,
                    held,
                });
            }
        }
        let retired: BTreeSet<KeyId> = keys
            .keys
            .iter()
            .filter(|k| k.state == ReleaseKeyState::Retired)
            .map(|k| k.id)
            .chain(self.retired.iter().copied())
            .collect();
        if retired.contains(&offer.key_id) {
            return Err(ReleaseError::KeyRetired(offer.key_id));
        }
        let signer = keys
            .keys
            .iter()
            .find(|k| k.id == offer.key_id && k.state == ReleaseKeyState::Current)
            .and_then(AnnouncedReleaseKey::verifying_key)
            .ok_or(ReleaseError::UnknownKey(offer.key_id))?;
        let signature = STANDARD
            .decode(&offer.signature)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .ok_or(ReleaseError::BadSignature)?;
        signer
            .verify_strict(
                &offer.manifest.signed_bytes(),
                &ed25519_dalek::Signature::from_bytes(&signature),
            )
            .map_err(|_| ReleaseError::BadSignature)?;
        self.retired = retired;
        self.issued_at = Some(keys.issued_at);
        Ok(())
    }
}

/// Whether a machine running `own` on `arch` may take the release of `manifest`.
pub fn applicable(
    manifest: &ReleaseManifest,
    own: Version,
    arch: &str,
) -> Result<(), ReleaseError> {
    if manifest.arch != arch {
        return Err(ReleaseError::WrongArch {
            offered: manifest.version,
            arch: manifest.arch.clone(),
            own: arch.to_string(),
        });
    }
    if manifest.version == own || (manifest.version < own && !manifest.rollback) {
        return Err(ReleaseError::Downgrade {
            offered: manifest.version,
            own,
        });
    }
    if let Some(min) = manifest.min_version {
        if own < min {
            return Err(ReleaseError::TooOld {
                offered: manifest.version,
                min,
                own,
            });
        }
    }
    Ok(())
}

/// Checks a downloaded binary's length and hex SHA-256 against the manifest.
pub fn check_binary(
    manifest: &ReleaseManifest,
    size: u64,
    sha256: &str,
) -> Result<(), ReleaseError> {
    if size != manifest.size {
        return Err(ReleaseError::WrongSize {
            expected: manifest.size,
            got: size,
        });
    }
    if !sha256.eq_ignore_ascii_case(&manifest.sha256) {
        return Err(ReleaseError::WrongDigest {
            expected: manifest.sha256.clone(),
            got: sha256.to_string(),
        });
    }
    Ok(())
}

/// Hex of bytes (digests).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a machine falls in a release's rollout: 0 to 99, stable for a machine and a release
/// (SHA-256 of both ids), so raising the percentage only adds machines.
pub fn rollout_bucket(release_id: &uuid::Uuid, machine_id: &uuid::Uuid) -> u8 {
    let digest = Sha256::new()
        .chain_update(b"lsa/rollout/v1")
        .chain_update(release_id.as_bytes())
        .chain_update(machine_id.as_bytes())
        .finalize();
    let n = u16::from_be_bytes([digest[0], digest[1]]);
    (n % 100) as u8
}

/// Whether a release rolled out to `percent` of machines and to every machine of `clients`
/// goes to `machine_id` of `client_id`.
pub fn in_rollout(
    release_id: &uuid::Uuid,
    percent: u8,
    clients: &[uuid::Uuid],
    machine_id: &uuid::Uuid,
    client_id: &uuid::Uuid,
) -> bool {
    clients.contains(client_id) || rollout_bucket(release_id, machine_id) < percent.min(100)
}

/// How an update ended on a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum UpdateOutcome {
    /// The new version passed its health check and runs.
    Success,
    /// The new version failed its health check (or could not be installed): the previous one
    /// was restored.
    Failed,
    /// The agent refused the release before installing it (signature, digest, size,
    /// architecture, downgrade).
    Refused,
}

impl UpdateOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateOutcome::Success => "success",
            UpdateOutcome::Failed => "failed",
            UpdateOutcome::Refused => "refused",
        }
    }
}

/// `POST /api/v1/update-report`: how the update to a release ended on the calling machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct UpdateReport {
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Uuid))]
    pub release_id: uuid::Uuid,
    pub outcome: UpdateOutcome,
    /// A reason code (`health_check_failed`, `wrong_digest`, …), empty on success.
    #[cfg_attr(
        feature = "openapi",
        schema(max_length = 64, pattern = r"^[a-z0-9_]*$")
    )]
    #[serde(default)]
    pub reason: String,
    /// The version the machine runs after it.
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "1.4.2"))]
    pub running_version: Version,
}

impl UpdateReport {
    /// Whether the reason is a short code (`[a-z0-9_]`, at most 64).
    pub fn is_well_formed(&self) -> bool {
        self.reason.len() <= 64
            && self
                .reason
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    }
}

crate::object::objects_only!(UpdateReport);

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(version: &str) -> ReleaseManifest {
        ReleaseManifest {
            release_id: uuid::Uuid::from_u128(7),
            version: version.parse().unwrap(),
            channel: "stable".parse().unwrap(),
            arch: "x86_64".into(),
            sha256: "ab".repeat(32),
            size: 3,
            min_version: None,
            rollback: false,
            published_at: 1,
        }
    }

    fn keys(
        license: &ed25519_dalek::SigningKey,
        release: &[(&ed25519_dalek::SigningKey, ReleaseKeyState)],
        at: i64,
    ) -> ReleaseKeys {
        let keys = release
            .iter()
            .map(|(k, s)| AnnouncedReleaseKey::new(&k.verifying_key(), *s))
            .collect();
        ReleaseKeys::sign(keys, at, &[license])
    }

    #[test]
    fn versions_parse_and_order_numerically() {
        let v = |s: &str| s.parse::<Version>().unwrap();
        assert!(v("1.10.0") > v("1.9.9"));
        assert_eq!(v("0.1.0").to_string(), "0.1.0");
        for bad in [
            "",
            "1",
            "1.2",
            "1.2.3.4",
            "1.2.x",
            "1..3",
            "-1.2.3",
            "1.2.3-rc1",
            " 1.2.3",
        ] {
            assert!(bad.parse::<Version>().is_err(), "{bad}");
        }
        assert!("stable".parse::<Channel>().is_ok());
        for bad in ["", "Stable", "a b", &"x".repeat(33)] {
            assert!(bad.parse::<Channel>().is_err(), "{bad}");
        }
    }

    #[test]
    fn offers_verify_only_along_the_license_keys() {
        let license = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let release = ed25519_dalek::SigningKey::from_bytes(&[2; 32]);
        let stranger = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let trusted = TrustedKeys::pinned(license.verifying_key());
        let good = UpdateOffer::sign(
            manifest("1.0.0"),
            &release,
            keys(&license, &[(&release, ReleaseKeyState::Current)], 10),
        );
        ReleaseTrust::default().verify(&good, &trusted).unwrap();

        // A manifest changed after signing.
        let mut tampered = good.clone();
        tampered.manifest.size += 1;
        assert_eq!(
            ReleaseTrust::default().verify(&tampered, &trusted),
            Err(ReleaseError::BadSignature)
        );
        // Release keys vouched for by a stranger's "license key".
        let forged = UpdateOffer::sign(
            manifest("1.0.0"),
            &stranger,
            keys(&stranger, &[(&stranger, ReleaseKeyState::Current)], 10),
        );
        assert_eq!(
            ReleaseTrust::default().verify(&forged, &trusted),
            Err(ReleaseError::KeysUntrusted)
        );
        // Signed by a key the set does not hold.
        let mut other = good.clone();
        other.key_id = KeyId::of(&stranger.verifying_key());
        assert!(matches!(
            ReleaseTrust::default().verify(&other, &trusted),
            Err(ReleaseError::UnknownKey(_))
        ));
    }

    #[test]
    fn a_retired_release_key_stays_retired() {
        let license = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let old = ed25519_dalek::SigningKey::from_bytes(&[2; 32]);
        let new = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
        let trusted = TrustedKeys::pinned(license.verifying_key());
        let mut trust = ReleaseTrust::default();
        let rotated = keys(
            &license,
            &[
                (&old, ReleaseKeyState::Retired),
                (&new, ReleaseKeyState::Current),
            ],
            20,
        );
        trust
            .verify(
                &UpdateOffer::sign(manifest("1.0.0"), &new, rotated),
                &trusted,
            )
            .unwrap();
        // An older set naming the old key current is refused as older...
        let before = keys(&license, &[(&old, ReleaseKeyState::Current)], 10);
        let replayed = UpdateOffer::sign(manifest("1.0.1"), &old, before);
        assert!(matches!(
            trust.verify(&replayed, &trusted),
            Err(ReleaseError::KeysOlder { .. })
        ));
        // ...and a newer one too: retirement is sticky.
        let again = keys(&license, &[(&old, ReleaseKeyState::Current)], 30);
        let replayed = UpdateOffer::sign(manifest("1.0.1"), &old, again);
        assert!(matches!(
            trust.verify(&replayed, &trusted),
            Err(ReleaseError::KeyRetired(_))
        ));
    }

    #[test]
    fn downgrades_other_architectures_and_too_old_agents_are_refused() {
        let own: Version = "1.2.0".parse().unwrap();
        assert!(applicable(&manifest("1.3.0"), own, "x86_64").is_ok());
        assert_eq!(
            applicable(&manifest("1.1.0"), own, "x86_64")
                .unwrap_err()
                .code(),
            "downgrade"
        );
        assert_eq!(
            applicable(&manifest("1.2.0"), own, "x86_64")
                .unwrap_err()
                .code(),
            "downgrade"
        );
        let mut back = manifest("1.1.0");
        back.rollback = true;
        assert!(applicable(&back, own, "x86_64").is_ok());
        assert_eq!(
            applicable(&manifest("1.3.0"), own, "aarch64")
                .unwrap_err()
                .code(),
            "wrong_arch"
        );
        let mut needs = manifest("2.0.0");
        needs.min_version = Some("1.5.0".parse().unwrap());
        assert_eq!(
            applicable(&needs, own, "x86_64").unwrap_err().code(),
            "too_old"
        );
        let m = manifest("1.3.0");
        assert!(check_binary(&m, 3, &"AB".repeat(32)).is_ok());
        assert_eq!(
            check_binary(&m, 4, &m.sha256).unwrap_err().code(),
            "wrong_size"
        );
        assert_eq!(
            check_binary(&m, 3, &"cd".repeat(32)).unwrap_err().code(),
            "wrong_digest"
        );
    }

    #[test]
    fn rollout_is_stable_and_proportional() {
        let release = uuid::Uuid::from_u128(99);
        let machines: Vec<uuid::Uuid> = (0..10_000u128).map(uuid::Uuid::from_u128).collect();
        let client = uuid::Uuid::from_u128(5);
        let count = |p: u8| {
            machines
                .iter()
                .filter(|m| in_rollout(&release, p, &[], m, &client))
                .count()
        };
        assert_eq!(count(0), 0);
        assert_eq!(count(100), 10_000);
        let ten = count(10);
        assert!((850..=1150).contains(&ten), "{ten}");
        // Raising the percentage keeps every machine already in.
        for m in &machines {
            if in_rollout(&release, 10, &[], m, &client) {
                assert!(in_rollout(&release, 50, &[], m, &client));
            }
        }
        // Named clients get it at 0%.
        assert!(in_rollout(&release, 0, &[client], &machines[0], &client));
    }
}
