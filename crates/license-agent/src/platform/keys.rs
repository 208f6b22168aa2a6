//! The machine's own key pair: the key behind its mTLS certificate, the key its rotate
//! requests are signed with, and the key its secrets are encrypted to (DESIGN.md §2).
//!
//! One trait, two homes: a P-256 key in a 0600 PKCS#8 file, or a non-exportable key inside
//! the TPM. Everything that uses the key — the TLS client ([`TlsSigner`]), rotation
//! ([`MachineKey::sign_digest`], [`Ecdh`]) and enrollment's CSR ([`csr_pem`]) — goes through
//! the trait, so both homes share one code path.

use std::sync::Arc;

use license_protocol::secret::{EcdhKey, SecretError};
use p256::elliptic_curve::sec1::ToEncodedPoint as _;
use p256::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use rustls::pki_types::CertificateDer;
use rustls::{SignatureAlgorithm, SignatureScheme};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use super::blocking::in_place;
use super::tpm::{Tpm, TpmMachineKey};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("machine key operation failed: {0}")]
    Operation(String),
}

/// A P-256 machine key, wherever it lives.
pub trait MachineKey: Send + Sync + std::fmt::Debug {
    /// `file` or `tpm`.
    fn kind(&self) -> &'static str;
    fn public_key(&self) -> p256::PublicKey;
    /// ECDSA over a SHA-256 digest the caller computed.
    fn sign_digest(&self, digest: &[u8; 32]) -> Result<p256::ecdsa::Signature, KeyError>;
    /// ECDH: the x-coordinate of the shared point.
    fn ecdh(&self, peer: &p256::PublicKey) -> Result<Zeroizing<[u8; 32]>, KeyError>;
}

/// A key in a PKCS#8 PEM file (0600). Zeroized on drop.
pub struct FileMachineKey(p256::SecretKey);

impl std::fmt::Debug for FileMachineKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileMachineKey(<redacted>)")
    }
}

impl FileMachineKey {
    pub fn generate() -> Self {
        Self(p256::SecretKey::random(&mut rand::rngs::OsRng))
    }

    pub fn from_pem(pem: &str) -> Option<Self> {
        p256::SecretKey::from_pkcs8_pem(pem).ok().map(Self)
    }

    pub fn to_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(
            self.0
                .to_pkcs8_pem(Default::default())
                .map(|pem| pem.to_string())
                .unwrap_or_default(),
        )
    }
}

impl MachineKey for FileMachineKey {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn public_key(&self) -> p256::PublicKey {
        self.0.public_key()
    }

    fn sign_digest(&self, digest: &[u8; 32]) -> Result<p256::ecdsa::Signature, KeyError> {
        use p256::ecdsa::signature::hazmat::PrehashSigner as _;
        p256::ecdsa::SigningKey::from(&self.0)
            .sign_prehash(digest)
            .map_err(|e| KeyError::Operation(e.to_string()))
    }

    fn ecdh(&self, peer: &p256::PublicKey) -> Result<Zeroizing<[u8; 32]>, KeyError> {
        EcdhKey::diffie_hellman(&self.0, peer).map_err(|e| KeyError::Operation(e.to_string()))
    }
}

/// First line of a key file whose key lives in the TPM (the rest: base64 of the TPM blob).
const TPM_KEY_MAGIC: &str = "lsa-tpm-key-v1";

/// The contents of a key file for a TPM-resident key: only the TPM that made the blob can use it.
pub fn tpm_key_file(blob: &[u8]) -> Zeroizing<String> {
    use base64::Engine as _;
    Zeroizing::new(format!(
        "{TPM_KEY_MAGIC}\n{}\n",
        base64::engine::general_purpose::STANDARD.encode(blob)
    ))
}

/// The machine key named by the config's `server.client_key`: a PEM file key, or a TPM key
/// (then `tpm` is used, or the TPM named by `[tpm] tcti` is opened).
pub fn load(
    config: &crate::config::AgentConfig,
    tpm: Option<Arc<Tpm>>,
) -> Result<Arc<dyn MachineKey>, KeyError> {
    let path = &config.server.client_key;
    let err = |message: String| KeyError::File {
        path: path.display().to_string(),
        message,
    };
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?);
    let Some(b64) = text.strip_prefix(TPM_KEY_MAGIC) else {
        return Ok(Arc::new(
            FileMachineKey::from_pem(&text)
                .ok_or_else(|| err("not a P-256 PKCS#8 private key".into()))?,
        ));
    };
    use base64::Engine as _;
    let blob = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| err("bad TPM key blob".into()))?;
    let tpm = match tpm {
        Some(tpm) => tpm,
        None => Tpm::open(&config.tpm.tcti, &config.agent.state_dir).map_err(|e| {
            err(format!(
                "the machine key is in the TPM, which is unavailable: {e}"
            ))
        })?,
    };
    Ok(Arc::new(
        tpm.machine_key(&blob)
            .map_err(|e| err(format!("TPM key: {e}")))?,
    ))
}

impl MachineKey for TpmMachineKey {
    fn kind(&self) -> &'static str {
        "tpm"
    }

    fn public_key(&self) -> p256::PublicKey {
        TpmMachineKey::public_key(self)
    }

    // TPM commands block for milliseconds; callers such as the TLS handshake cannot await.
    fn sign_digest(&self, digest: &[u8; 32]) -> Result<p256::ecdsa::Signature, KeyError> {
        in_place(|| TpmMachineKey::sign_digest(self, digest))
            .map_err(|e| KeyError::Operation(e.to_string()))
    }

    fn ecdh(&self, peer: &p256::PublicKey) -> Result<Zeroizing<[u8; 32]>, KeyError> {
        in_place(|| TpmMachineKey::ecdh(self, peer)).map_err(|e| KeyError::Operation(e.to_string()))
    }
}

/// [`EcdhKey`] (what secret delivery needs) for any machine key.
#[derive(Debug)]
pub struct Ecdh<'a>(pub &'a dyn MachineKey);

impl EcdhKey for Ecdh<'_> {
    fn public_key(&self) -> p256::PublicKey {
        self.0.public_key()
    }

    fn diffie_hellman(&self, peer: &p256::PublicKey) -> Result<Zeroizing<[u8; 32]>, SecretError> {
        self.0
            .ecdh(peer)
            .map_err(|e| SecretError::KeyAgreement(e.to_string()))
    }
}

/// Signs `message` (SHA-256 then ECDSA) and returns the DER signature.
pub fn sign_der(key: &dyn MachineKey, message: &[u8]) -> Result<Vec<u8>, KeyError> {
    let digest: [u8; 32] = Sha256::digest(message).into();
    Ok(key.sign_digest(&digest)?.to_der().as_bytes().to_vec())
}

/// rustls signing through a machine key (ECDSA P-256 SHA-256 only).
#[derive(Debug)]
pub struct TlsSigner(pub Arc<dyn MachineKey>);

impl rustls::sign::SigningKey for TlsSigner {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
        offered
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| Box::new(TlsSigner(self.0.clone())) as Box<dyn rustls::sign::Signer>)
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

impl rustls::sign::Signer for TlsSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        sign_der(self.0.as_ref(), message).map_err(|e| rustls::Error::General(e.to_string()))
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

/// Always presents the machine certificate, signed through the machine key.
#[derive(Debug)]
pub struct MachineCertResolver(pub Arc<rustls::sign::CertifiedKey>);

impl MachineCertResolver {
    pub fn new(chain: Vec<CertificateDer<'static>>, key: Arc<dyn MachineKey>) -> Self {
        Self(Arc::new(rustls::sign::CertifiedKey::new(
            chain,
            Arc::new(TlsSigner(key)),
        )))
    }
}

impl rustls::client::ResolvesClientCert for MachineCertResolver {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        schemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        schemes
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// rcgen's view of a key it cannot see: enough to sign a CSR.
struct RemoteKey {
    key: Arc<dyn MachineKey>,
    public_raw: Vec<u8>,
}

impl rcgen::RemoteKeyPair for RemoteKey {
    fn public_key(&self) -> &[u8] {
        &self.public_raw
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        sign_der(self.key.as_ref(), msg).map_err(|_| rcgen::Error::RemoteKeyError)
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// A PEM CSR for the machine key (its subject is set by the server, not here).
pub fn csr_pem(key: Arc<dyn MachineKey>) -> Result<String, rcgen::Error> {
    let public_raw = key.public_key().to_encoded_point(false).as_bytes().to_vec();
    let pair = rcgen::KeyPair::from_remote(Box::new(RemoteKey { key, public_raw }))?;
    rcgen::CertificateParams::default()
        .serialize_request(&pair)?
        .pem()
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Verifier as _;

    #[test]
    fn file_key_signs_agrees_and_makes_a_valid_csr() {
        let key = Arc::new(FileMachineKey::generate());
        let sig = key.sign_digest(&Sha256::digest(b"hello").into()).unwrap();
        let vk = p256::ecdsa::VerifyingKey::from(key.public_key());
        vk.verify(b"hello", &sig).unwrap();

        let peer = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let ours = key.ecdh(&peer.public_key()).unwrap();
        let theirs = EcdhKey::diffie_hellman(&peer, &key.public_key()).unwrap();
        assert_eq!(*ours, *theirs);

        let csr = csr_pem(key.clone()).unwrap();
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        let raw = key.public_key().to_encoded_point(false).as_bytes().to_vec();
        assert_eq!(
            rcgen::PublicKeyData::der_bytes(&parsed.public_key),
            raw.as_slice()
        );
        assert_eq!(
            format!("{:?}", FileMachineKey::generate()),
            "FileMachineKey(<redacted>)"
        );
    }
}
