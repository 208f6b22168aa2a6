//! Server pins: `sha256:<base64 of the SHA-256 of the SubjectPublicKeyInfo>`.
//!
//! The agent pins the server's public key (DESIGN.md §2). A pin on the SPKI rather than on the
//! whole certificate survives certificate renewal with the same key. The same hash, written
//! `sha256//<base64>`, is what `curl --pinnedpubkey` takes, so one value serves both the
//! install one-liner and the agent.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sha2::{Digest, Sha256};

/// Why a pin was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PinError {
    #[error("pin must start with `sha256:`")]
    BadPrefix,
    #[error("pin is not base64 of a 32-byte SHA-256 digest")]
    BadDigest,
    #[error("certificate could not be parsed")]
    BadCertificate,
}

/// A SHA-256 pin of a SubjectPublicKeyInfo.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CertPin([u8; 32]);

impl CertPin {
    /// The pin of a DER-encoded SubjectPublicKeyInfo.
    pub fn of_spki_der(spki: &[u8]) -> Self {
        Self(Sha256::digest(spki).into())
    }

    /// The pin of the public key in a DER-encoded X.509 certificate.
    pub fn of_certificate_der(cert: &[u8]) -> Result<Self, PinError> {
        let (rest, cert) =
            x509_parser::parse_x509_certificate(cert).map_err(|_| PinError::BadCertificate)?;
        if !rest.is_empty() {
            return Err(PinError::BadCertificate);
        }
        Ok(Self::of_spki_der(cert.public_key().raw))
    }

    /// Compares in constant time, so a pin check leaks nothing about how close a key came.
    pub fn matches(&self, other: &CertPin) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    /// The form `curl --pinnedpubkey` takes: `sha256//<base64>`.
    pub fn curl_form(&self) -> String {
        format!("sha256//{}", STANDARD.encode(self.0))
    }
}

impl fmt::Display for CertPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", STANDARD.encode(self.0))
    }
}

impl fmt::Debug for CertPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertPin({self})")
    }
}

impl FromStr for CertPin {
    type Err = PinError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b64 = s.strip_prefix("sha256:").ok_or(PinError::BadPrefix)?;
        let bytes = STANDARD.decode(b64).map_err(|_| PinError::BadDigest)?;
        let digest: [u8; 32] = bytes.try_into().map_err(|_| PinError::BadDigest)?;
        Ok(Self(digest))
    }
}

impl serde::Serialize for CertPin {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for CertPin {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_compares() {
        let pin = CertPin::of_spki_der(b"spki");
        let parsed: CertPin = pin.to_string().parse().unwrap();
        assert!(pin.matches(&parsed));
        assert!(!pin.matches(&CertPin::of_spki_der(b"other")));
        assert!(pin.curl_form().starts_with("sha256//"));
    }

    #[test]
    fn refuses_bad_pins() {
        assert_eq!("md5:abc".parse::<CertPin>(), Err(PinError::BadPrefix));
        assert_eq!("sha256:!!".parse::<CertPin>(), Err(PinError::BadDigest));
        assert_eq!("sha256:AAAA".parse::<CertPin>(), Err(PinError::BadDigest));
    }
}

#[cfg(test)]
mod robustness {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn pin_parser_never_panics(s in ".{0,80}") {
            let _ = s.parse::<CertPin>();
        }

        #[test]
        fn certificate_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = CertPin::of_certificate_der(&bytes);
        }
    }
}
