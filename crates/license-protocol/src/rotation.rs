//! Secret rotation between agent and server (seed §3.2, DESIGN.md §3.1).
//!
//! `POST /api/v1/rotate-secret`: the agent asks for a new secret version. The request is signed
//! by the machine's key (ECDSA P-256, SHA-256, DER) over
//! `"lsa/rotate-request/v1" || agent_id (16) || current_secret_version (u64) || timestamp (i64) || nonce (16)`;
//! the server refuses a timestamp more than [`MAX_CLOCK_SKEW_SECS`] away from its clock and a
//! nonce it has seen. The answer is idempotent: until the agent acknowledges a version
//! (`POST /api/v1/rotate-secret/ack`), every rotate request gets that same pending version
//! back. The answer is signed by the server's license key (Ed25519, pinned by the agent) over
//! `"lsa/rotate-response/v1" || machine_id || secret_version || valid_from || valid_until || grace_until || new_secret_encrypted`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, Verifier as _};
use serde::{Deserialize, Serialize};

use crate::identity::MachineId;
use crate::secret::SecretDates;

/// Largest difference accepted between a rotate request's timestamp and the server's clock.
pub const MAX_CLOCK_SKEW_SECS: i64 = 300;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    #[error("signature is not valid base64 or not well formed")]
    Malformed,
    #[error("signature does not verify")]
    Invalid,
    #[error("the key is not a P-256 key")]
    UnsupportedKey,
}

/// The request nonce, defined with the local socket's wire types (they carry it too).
pub use license_ipc::Nonce;

/// `POST /api/v1/rotate-secret` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct RotateSecretRequest {
    /// The newest version the agent holds durably (0 before the first).
    #[serde(deserialize_with = "crate::whole::u64")]
    pub current_secret_version: u64,
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Uuid))]
    pub agent_id: MachineId,
    /// Unix seconds.
    #[serde(deserialize_with = "crate::whole::i64")]
    pub timestamp: i64,
    pub nonce: Nonce,
    /// base64 of the DER ECDSA signature by the machine key.
    pub signature: String,
}

impl RotateSecretRequest {
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut m = b"lsa/rotate-request/v1".to_vec();
        m.extend_from_slice(self.agent_id.0.as_bytes());
        m.extend_from_slice(&self.current_secret_version.to_be_bytes());
        m.extend_from_slice(&self.timestamp.to_be_bytes());
        m.extend_from_slice(&self.nonce.0);
        m
    }

    /// A request to be signed by a key this crate does not hold (e.g. in a TPM): sign
    /// SHA-256 of [`Self::signing_bytes`] and pass the result to [`Self::set_signature`].
    pub fn unsigned(agent_id: MachineId, current_secret_version: u64, timestamp: i64) -> Self {
        Self {
            current_secret_version,
            agent_id,
            timestamp,
            nonce: Nonce::random(),
            signature: String::new(),
        }
    }

    pub fn set_signature(&mut self, signature: &p256::ecdsa::Signature) {
        self.signature = STANDARD.encode(signature.to_der().as_bytes());
    }

    /// A signed request.
    pub fn new_signed(
        key: &p256::ecdsa::SigningKey,
        agent_id: MachineId,
        current_secret_version: u64,
        timestamp: i64,
    ) -> Self {
        let mut req = Self::unsigned(agent_id, current_secret_version, timestamp);
        let sig: p256::ecdsa::Signature = key.sign(&req.signing_bytes());
        req.set_signature(&sig);
        req
    }

    /// Verifies the signature with the machine's SubjectPublicKeyInfo (from its certificate).
    pub fn verify(&self, spki_der: &[u8]) -> Result<(), SignatureError> {
        use p256::pkcs8::DecodePublicKey as _;
        let key = p256::ecdsa::VerifyingKey::from_public_key_der(spki_der)
            .map_err(|_| SignatureError::UnsupportedKey)?;
        let der = STANDARD
            .decode(&self.signature)
            .map_err(|_| SignatureError::Malformed)?;
        let sig = p256::ecdsa::Signature::from_der(&der).map_err(|_| SignatureError::Malformed)?;
        key.verify(&self.signing_bytes(), &sig)
            .map_err(|_| SignatureError::Invalid)
    }
}

/// `POST /api/v1/rotate-secret` response.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RotateSecretResponse {
    /// base64 of the ECIES blob (see [`crate::secret`]).
    pub new_secret_encrypted: String,
    pub secret_version: u64,
    /// Unix seconds.
    pub valid_from: i64,
    pub valid_until: i64,
    pub grace_until: i64,
    /// base64 of the Ed25519 signature by the license signing key.
    pub signature: String,
}

impl RotateSecretResponse {
    pub fn dates(&self) -> SecretDates {
        SecretDates {
            valid_from: self.valid_from,
            valid_until: self.valid_until,
            grace_until: self.grace_until,
        }
    }

    fn signing_bytes(
        machine_id: &MachineId,
        version: u64,
        dates: &SecretDates,
        blob: &[u8],
    ) -> Vec<u8> {
        let mut m = b"lsa/rotate-response/v1".to_vec();
        m.extend_from_slice(machine_id.0.as_bytes());
        m.extend_from_slice(&version.to_be_bytes());
        m.extend_from_slice(&dates.valid_from.to_be_bytes());
        m.extend_from_slice(&dates.valid_until.to_be_bytes());
        m.extend_from_slice(&dates.grace_until.to_be_bytes());
        m.extend_from_slice(blob);
        m
    }

    /// Server side: the signed answer for a sealed secret.
    pub fn new_signed(
        key: &ed25519_dalek::SigningKey,
        machine_id: &MachineId,
        version: u64,
        dates: SecretDates,
        blob: &[u8],
    ) -> Self {
        let sig = key.sign(&Self::signing_bytes(machine_id, version, &dates, blob));
        Self {
            new_secret_encrypted: STANDARD.encode(blob),
            secret_version: version,
            valid_from: dates.valid_from,
            valid_until: dates.valid_until,
            grace_until: dates.grace_until,
            signature: STANDARD.encode(sig.to_bytes()),
        }
    }

    /// Agent side: checks the server's signature (by any trusted key not retired) and returns
    /// the sealed blob.
    pub fn verify(
        &self,
        keys: &crate::license_keys::TrustedKeys,
        machine_id: &MachineId,
    ) -> Result<Vec<u8>, SignatureError> {
        let blob = STANDARD
            .decode(&self.new_secret_encrypted)
            .map_err(|_| SignatureError::Malformed)?;
        let sig_bytes: [u8; 64] = STANDARD
            .decode(&self.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(SignatureError::Malformed)?;
        let sig = ed25519_dalek::Signature::from_bytes(&sig_bytes);
        let message = Self::signing_bytes(machine_id, self.secret_version, &self.dates(), &blob);
        if !keys
            .usable()
            .any(|k| k.verify_strict(&message, &sig).is_ok())
        {
            return Err(SignatureError::Invalid);
        }
        Ok(blob)
    }
}

/// `POST /api/v1/rotate-secret/ack`: the agent holds `secret_version` durably.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct AckRequest {
    #[serde(deserialize_with = "crate::whole::u64")]
    pub secret_version: u64,
}

/// Parses `ed25519:<base64>` (the pinned license public key).
pub fn parse_license_public_key(s: &str) -> Option<ed25519_dalek::VerifyingKey> {
    let b64 = s.strip_prefix("ed25519:")?;
    let bytes: [u8; 32] = STANDARD.decode(b64).ok()?.try_into().ok()?;
    ed25519_dalek::VerifyingKey::from_bytes(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::license_keys::{AnnouncedKey, KeyState, LicenseKeySet, TrustedKeys};
    use p256::pkcs8::EncodePublicKey as _;

    #[test]
    fn request_signature_round_trip() {
        let key = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
        let spki = key.verifying_key().to_public_key_der().unwrap();
        let req = RotateSecretRequest::new_signed(&key, MachineId::new_random(), 3, 1_700_000_000);
        req.verify(spki.as_bytes()).unwrap();
        let mut replayed_elsewhere = req.clone();
        replayed_elsewhere.current_secret_version = 4;
        assert_eq!(
            replayed_elsewhere.verify(spki.as_bytes()),
            Err(SignatureError::Invalid)
        );
        let other = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
        let other_spki = other.verifying_key().to_public_key_der().unwrap();
        assert_eq!(
            req.verify(other_spki.as_bytes()),
            Err(SignatureError::Invalid)
        );
        let json = serde_json::to_value(&req).unwrap();
        assert_eq!(json["nonce"].as_str().unwrap().len(), 32);
    }

    #[test]
    fn response_signature_round_trip() {
        let server = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let id = MachineId::new_random();
        let dates = SecretDates {
            valid_from: 1,
            valid_until: 2,
            grace_until: 3,
        };
        let resp = RotateSecretResponse::new_signed(&server, &id, 5, dates, b"blob");
        let trusted = TrustedKeys::pinned(server.verifying_key());
        assert_eq!(resp.verify(&trusted, &id).unwrap(), b"blob");
        let mut forged = resp.clone();
        forged.grace_until = 99;
        assert_eq!(forged.verify(&trusted, &id), Err(SignatureError::Invalid));
        assert_eq!(
            resp.verify(&trusted, &MachineId::new_random()),
            Err(SignatureError::Invalid)
        );
        let other = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        assert_eq!(
            resp.verify(&TrustedKeys::pinned(other.verifying_key()), &id),
            Err(SignatureError::Invalid)
        );
        // Signed by a newer key the agent learned: accepted; once that key is retired: not.
        let mut rolled = TrustedKeys::pinned(other.verifying_key());
        let set = |state, at| {
            LicenseKeySet::sign(
                vec![
                    AnnouncedKey::new(&server.verifying_key(), state, 0),
                    AnnouncedKey::new(&other.verifying_key(), KeyState::Previous, 0),
                ],
                at,
                &[&other],
            )
        };
        rolled.accept(&set(KeyState::Current, 1)).unwrap();
        assert_eq!(resp.verify(&rolled, &id).unwrap(), b"blob");
        let mut retired = set(KeyState::Retired, 2);
        retired.keys[1].state = KeyState::Current;
        let retired = LicenseKeySet::sign(retired.keys, 2, &[&other]);
        rolled.accept(&retired).unwrap();
        assert_eq!(resp.verify(&rolled, &id), Err(SignatureError::Invalid));
        let text = format!(
            "ed25519:{}",
            STANDARD.encode(server.verifying_key().to_bytes())
        );
        assert_eq!(
            parse_license_public_key(&text),
            Some(server.verifying_key())
        );
        assert_eq!(parse_license_public_key("ed25519:AAAA"), None);
    }
}

crate::object::objects_only!(RotateSecretRequest, AckRequest);
