//! License tokens, format version 2, version 1 still read (DESIGN.md §2).
//!
//! A token is issued by the server for one machine, **signed** by one of the server's license
//! keys (Ed25519; the agent pins one at enrollment and learns the others from signed key sets,
//! see [`crate::license_keys`]) and **encrypted** under that machine's secret of one version.
//! Holding the secret lets you read a token, not forge one.
//!
//! ```text
//! token   = header (48 bytes; 40 in v1) || body
//! header  = "LSA" || 0x02 || key_id (8) || machine_id (16) || secret_version (u64 BE) || nonce (12)
//!           (v1: "LSA" || 0x01 || machine_id (16) || secret_version (u64 BE) || nonce (12))
//! key     = HKDF-SHA256(salt = "lsa/token/v1", ikm = secret, info = machine_id || secret_version)
//! nonce   = HKDF-SHA256(salt = "lsa/token-nonce/v1", ikm = key, info = SHA-256(claims))[..12]
//! body    = AES-256-GCM(key, nonce, plaintext = signature (64) || claims, aad = header)
//! signature = Ed25519("lsa/license/v1" || header || claims)
//! claims  = UTF-8 JSON, see [`LicenseClaims`]
//! ```
//!
//! The nonce is synthetic (derived from the claims, as in SIV): the same license under the same
//! secret version is always the same token, so tokens do not churn between fetches, and two
//! different claim sets never share a nonce under one key.
//!
//! On the wire (IPC, HTTP) a token is standard base64 of those bytes. The machine id is in
//! clear in the header so that a token for another machine is recognised as such
//! (`wrong_machine`) rather than as a forgery, and the key id so that a token under a retired
//! key is refused as such (`key_retired`) and only one signature is checked. [`seal`] writes
//! v2, [`seal_v1`] v1 (for agents that predate v2, see its docs); [`decode`] and [`open`] read
//! both.

use std::collections::BTreeMap;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::Signer as _;
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use crate::identity::{ClientId, MachineId};
use crate::license_keys::KeyId;
use crate::secret::Secret;

const MAGIC: &[u8; 3] = b"LSA";
pub const FORMAT_V1: u8 = 1;
pub const FORMAT_V2: u8 = 2;
/// Header length of a v1 token.
pub const HEADER_LEN_V1: usize = 3 + 1 + 16 + 8 + 12;
/// Header length of a v2 token (the tokens [`seal`] writes).
pub const HEADER_LEN: usize = 3 + 1 + 8 + 16 + 8 + 12;
const SIGNATURE_LEN: usize = 64;
const TAG_LEN: usize = 16;
/// Largest token accepted (bytes, before base64).
pub const MAX_TOKEN_LEN: usize = 32 * 1024;

/// What a license grants. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LicenseClaims {
    pub license_id: uuid::Uuid,
    pub client_id: ClientId,
    pub machine_id: MachineId,
    pub features: Vec<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub issued_at: i64,
    pub not_before: i64,
    /// `None`: does not expire.
    pub expires_at: Option<i64>,
}

/// Why a token could not be opened. The variants map one to one to IPC reason codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token is for another machine")]
    WrongMachine,
    #[error("no secret of version {0} on this machine")]
    UnknownSecretVersion(u64),
    #[error("token does not decrypt or its signature does not verify")]
    BadSignature,
    #[error("token is signed by a retired license key")]
    KeyRetired,
}

/// The clear header of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenHeader {
    /// The signing key's id; `None` for a v1 token.
    pub key_id: Option<KeyId>,
    pub machine_id: MachineId,
    pub secret_version: u64,
}

impl TokenHeader {
    fn len(&self) -> usize {
        if self.key_id.is_some() {
            HEADER_LEN
        } else {
            HEADER_LEN_V1
        }
    }
}

/// Decodes base64 and reads the header (v1 or v2), without any key.
pub fn decode(token_b64: &str) -> Result<(TokenHeader, Vec<u8>), TokenError> {
    if token_b64.len() > MAX_TOKEN_LEN * 4 / 3 + 4 {
        return Err(TokenError::Malformed);
    }
    let bytes = STANDARD
        .decode(token_b64.trim())
        .map_err(|_| TokenError::Malformed)?;
    if bytes.len() < 4 || &bytes[..3] != MAGIC {
        return Err(TokenError::Malformed);
    }
    let (key_id, rest, header_len) = match bytes[3] {
        FORMAT_V1 => (None, &bytes[4..], HEADER_LEN_V1),
        FORMAT_V2 if bytes.len() >= 12 => {
            let mut id = [0u8; 8];
            id.copy_from_slice(&bytes[4..12]);
            (Some(KeyId(id)), &bytes[12..], HEADER_LEN)
        }
        _ => return Err(TokenError::Malformed),
    };
    if bytes.len() < header_len + SIGNATURE_LEN + TAG_LEN + 2 {
        return Err(TokenError::Malformed);
    }
    let machine_id =
        MachineId(uuid::Uuid::from_slice(&rest[..16]).map_err(|_| TokenError::Malformed)?);
    let secret_version =
        u64::from_be_bytes(rest[16..24].try_into().map_err(|_| TokenError::Malformed)?);
    Ok((
        TokenHeader {
            key_id,
            machine_id,
            secret_version,
        },
        bytes,
    ))
}

fn token_key(secret: &Secret, machine_id: &MachineId, version: u64) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(Some(b"lsa/token/v1"), secret.expose());
    let mut info = machine_id.0.as_bytes().to_vec();
    info.extend_from_slice(&version.to_be_bytes());
    let mut key = Zeroizing::new([0u8; 32]);
    hk.expand(&info, key.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 length");
    key
}

fn signed_message(header: &[u8], claims: &[u8]) -> Vec<u8> {
    [b"lsa/license/v1".as_slice(), header, claims].concat()
}

/// Server side: a token for `claims.machine_id` under `secret` of `version`, base64.
/// The header names the signing key (format v2).
pub fn seal(
    claims: &LicenseClaims,
    secret: &Secret,
    version: u64,
    signing_key: &ed25519_dalek::SigningKey,
) -> String {
    seal_as(FORMAT_V2, claims, secret, version, signing_key)
}

/// Server side: a v1 token (no key id), readable by agents that predate format v2. Only for a
/// server that has never rolled its license key over: such an agent trusts its pinned key
/// alone, and a v2-capable agent checks a v1 token against every key it trusts.
pub fn seal_v1(
    claims: &LicenseClaims,
    secret: &Secret,
    version: u64,
    signing_key: &ed25519_dalek::SigningKey,
) -> String {
    seal_as(FORMAT_V1, claims, secret, version, signing_key)
}

fn seal_as(
    format: u8,
    claims: &LicenseClaims,
    secret: &Secret,
    version: u64,
    signing_key: &ed25519_dalek::SigningKey,
) -> String {
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    header.push(format);
    if format == FORMAT_V2 {
        header.extend_from_slice(&KeyId::of(&signing_key.verifying_key()).0);
    }
    header.extend_from_slice(claims.machine_id.0.as_bytes());
    header.extend_from_slice(&version.to_be_bytes());
    let claims_json = serde_json::to_vec(claims).expect("claims serialize");
    let key = token_key(secret, &claims.machine_id, version);
    let mut nonce = [0u8; 12];
    Hkdf::<Sha256>::new(Some(b"lsa/token-nonce/v1"), key.as_ref())
        .expand(&Sha256::digest(&claims_json), &mut nonce)
        .expect("12 bytes is a valid HKDF-SHA256 length");
    header.extend_from_slice(&nonce);
    let signature = signing_key.sign(&signed_message(&header, &claims_json));
    let plaintext = [signature.to_bytes().as_slice(), &claims_json].concat();
    let body = Aes256Gcm::new_from_slice(key.as_ref())
        .expect("32-byte key")
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &plaintext,
                aad: &header,
            },
        )
        .expect("AES-GCM encryption cannot fail");
    STANDARD.encode([header, body].concat())
}

/// The keys a token's signature is checked against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Candidates {
    /// A signature by one of these makes the token valid.
    pub keys: Vec<ed25519_dalek::VerifyingKey>,
    /// A signature by one of these (and none of `keys`) is refused as [`TokenError::KeyRetired`]
    /// rather than [`TokenError::BadSignature`]: for v1 tokens, which do not name their key.
    /// Checked only after `keys` failed, so it costs a valid token nothing.
    pub retired: Vec<ed25519_dalek::VerifyingKey>,
}

impl From<Vec<ed25519_dalek::VerifyingKey>> for Candidates {
    fn from(keys: Vec<ed25519_dalek::VerifyingKey>) -> Self {
        Self {
            keys,
            retired: Vec::new(),
        }
    }
}

/// Agent side: decrypts with the secret of the header's version and checks the signature by
/// one of the keys `keys_for` gives for the header's key id (`None` for v1; see
/// [`TrustedKeys::for_token`](crate::license_keys::TrustedKeys::for_token)), asked after the
/// machine check and before the secret. Dates, revocation and replay are the caller's checks.
pub fn open(
    token_b64: &str,
    own_machine: &MachineId,
    secret_of: impl FnOnce(u64) -> Option<Secret>,
    keys_for: impl FnOnce(Option<KeyId>) -> Result<Candidates, TokenError>,
) -> Result<LicenseClaims, TokenError> {
    let (header, bytes) = decode(token_b64)?;
    if header.machine_id != *own_machine {
        return Err(TokenError::WrongMachine);
    }
    let candidates = keys_for(header.key_id)?;
    let secret = secret_of(header.secret_version)
        .ok_or(TokenError::UnknownSecretVersion(header.secret_version))?;
    let key = token_key(&secret, own_machine, header.secret_version);
    let (head, body) = bytes.split_at(header.len());
    let plaintext = Zeroizing::new(
        Aes256Gcm::new_from_slice(key.as_ref())
            .expect("32-byte key")
            .decrypt(
                Nonce::from_slice(&head[head.len() - 12..]),
                Payload {
                    msg: body,
                    aad: head,
                },
            )
            .map_err(|_| TokenError::BadSignature)?,
    );
    let (sig, claims_json) = plaintext.split_at(SIGNATURE_LEN);
    let sig =
        ed25519_dalek::Signature::from_bytes(sig.try_into().map_err(|_| TokenError::Malformed)?);
    let message = signed_message(head, claims_json);
    let signed_by = |keys: &[ed25519_dalek::VerifyingKey]| {
        keys.iter().any(|k| k.verify_strict(&message, &sig).is_ok())
    };
    if !signed_by(&candidates.keys) {
        return Err(if signed_by(&candidates.retired) {
            TokenError::KeyRetired
        } else {
            TokenError::BadSignature
        });
    }
    let claims: LicenseClaims =
        serde_json::from_slice(claims_json).map_err(|_| TokenError::Malformed)?;
    if claims.machine_id != *own_machine {
        return Err(TokenError::BadSignature);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(machine_id: MachineId) -> LicenseClaims {
        LicenseClaims {
            license_id: uuid::Uuid::new_v4(),
            client_id: ClientId::new_random(),
            machine_id,
            features: vec!["pos.sale".into(), "pos.refund".into()],
            metadata: BTreeMap::from([("tier".into(), "gold".into())]),
            issued_at: 10,
            not_before: 10,
            expires_at: Some(100),
        }
    }

    /// Keys for a token: exactly `vk`, whatever the header names.
    fn only(
        vk: ed25519_dalek::VerifyingKey,
    ) -> impl FnOnce(Option<KeyId>) -> Result<Candidates, TokenError> {
        move |_| Ok(vec![vk].into())
    }

    #[test]
    fn round_trip_and_every_refusal() {
        let server = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let vk = server.verifying_key();
        let machine = MachineId::new_random();
        let secret = Secret::generate();
        let c = claims(machine);
        let token = seal(&c, &secret, 3, &server);
        let found = |v: u64| (v == 3).then(|| secret.clone());
        let (header, bytes) = decode(&token).unwrap();
        assert_eq!(header.key_id, Some(KeyId::of(&vk)));
        assert_eq!(bytes[3], FORMAT_V2);
        assert_eq!(open(&token, &machine, found, only(vk)).unwrap(), c);
        // The header's key id is what the key choice is asked with.
        let asked = std::cell::Cell::new(None);
        open(&token, &machine, found, |id| {
            asked.set(id);
            Ok(vec![vk].into())
        })
        .unwrap();
        assert_eq!(asked.get(), Some(KeyId::of(&vk)));
        // Stable: the same license under the same version is the same token…
        assert_eq!(seal(&c, &secret, 3, &server), token);
        // …and anything else changes the nonce.
        let mut other_claims = c.clone();
        other_claims.features.push("x".into());
        let other = STANDARD
            .decode(seal(&other_claims, &secret, 3, &server))
            .unwrap();
        assert_ne!(other[36..48], STANDARD.decode(&token).unwrap()[36..48]);
        assert_ne!(seal(&c, &secret, 4, &server), token);

        assert_eq!(
            open("!!", &machine, found, only(vk)),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            open(&STANDARD.encode(b"LSA"), &machine, found, only(vk)),
            Err(TokenError::Malformed)
        );
        let mut v3 = STANDARD.decode(&token).unwrap();
        v3[3] = 3;
        assert_eq!(
            open(&STANDARD.encode(&v3), &machine, found, only(vk)),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            open(&token, &MachineId::new_random(), found, only(vk)),
            Err(TokenError::WrongMachine)
        );
        assert_eq!(
            open(&token, &machine, |_| None, only(vk)),
            Err(TokenError::UnknownSecretVersion(3))
        );
        // The key choice refuses (a retired key): that is the answer.
        assert_eq!(
            open(&token, &machine, found, |_| Err(TokenError::KeyRetired)),
            Err(TokenError::KeyRetired)
        );
        // The right version number but another secret: someone holding a secret cannot forge.
        assert_eq!(
            open(&token, &machine, |_| Some(Secret::generate()), only(vk)),
            Err(TokenError::BadSignature)
        );
        // A forgery by a secret holder: well encrypted, but not signed by the server.
        let forger = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let forged = seal(&c, &secret, 3, &forger);
        assert_eq!(
            open(&forged, &machine, found, only(vk)),
            Err(TokenError::BadSignature)
        );
        // A flipped bit anywhere after the header.
        let mut bytes = STANDARD.decode(&token).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_eq!(
            open(&STANDARD.encode(&bytes), &machine, found, only(vk)),
            Err(TokenError::BadSignature)
        );
        // A header moved to another version (even one the machine holds) fails authentication.
        let mut bytes = STANDARD.decode(&token).unwrap();
        bytes[35] = 4;
        let other = Secret::generate();
        assert_eq!(
            open(
                &STANDARD.encode(&bytes),
                &machine,
                |_| Some(other.clone()),
                only(vk)
            ),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn a_key_id_is_authenticated_and_v1_still_opens() {
        let (a, b) = (
            ed25519_dalek::SigningKey::from_bytes(&[1; 32]),
            ed25519_dalek::SigningKey::from_bytes(&[2; 32]),
        );
        let machine = MachineId::new_random();
        let secret = Secret::generate();
        let c = claims(machine);
        let found = |_: u64| Some(secret.clone());
        // A key id rewritten to another key's: the AEAD refuses the changed header.
        let mut bytes = STANDARD.decode(seal(&c, &secret, 3, &a)).unwrap();
        bytes[4..12].copy_from_slice(&KeyId::of(&b.verifying_key()).0);
        let moved = STANDARD.encode(&bytes);
        assert_eq!(
            open(&moved, &machine, found, |_| Ok(vec![
                a.verifying_key(),
                b.verifying_key()
            ]
            .into())),
            Err(TokenError::BadSignature)
        );
        // A token naming key b, but signed by a (the id does not match the signer).
        assert_eq!(
            open(
                &seal(&c, &secret, 3, &a),
                &machine,
                found,
                only(b.verifying_key())
            ),
            Err(TokenError::BadSignature)
        );
        // Format v1: no key id, 40-byte header; any offered key may have signed it.
        let v1 = seal_v1(&c, &secret, 3, &a);
        let (header, bytes) = decode(&v1).unwrap();
        assert_eq!(
            (header.key_id, bytes.len() + 8),
            (
                None,
                STANDARD.decode(seal(&c, &secret, 3, &a)).unwrap().len()
            )
        );
        let asked = std::cell::Cell::new(Some(KeyId([9; 8])));
        let opened = open(&v1, &machine, found, |id| {
            asked.set(id);
            Ok(vec![b.verifying_key(), a.verifying_key()].into())
        });
        assert_eq!(opened.unwrap(), c);
        assert_eq!(asked.get(), None);
        assert_eq!(
            open(&v1, &machine, found, only(b.verifying_key())),
            Err(TokenError::BadSignature)
        );
        // A v1 token whose signer is among the retired keys offered: key_retired.
        let retired_a = Candidates {
            keys: vec![b.verifying_key()],
            retired: vec![a.verifying_key()],
        };
        assert_eq!(
            open(&v1, &machine, found, |_| Ok(retired_a)),
            Err(TokenError::KeyRetired)
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_tokens_never_panic(s in ".{0,200}") {
            let vk = ed25519_dalek::SigningKey::from_bytes(&[1u8; 32]).verifying_key();
            let _ = open(&s, &MachineId::new_random(), |_| Some(Secret::from_bytes([0; 32])), only(vk));
        }
    }
}
