//! The 16-byte request nonce, written as 32 lowercase hex characters.
//!
//! A client sends a fresh one with every validation request and accepts only the answer that
//! echoes it; the agent refuses one it has seen ([`crate::ipc::Reason::ReplayedNonce`]). The
//! server's rotate-secret request carries the same type, which `license-protocol` re-exports as
//! `license_protocol::rotation::Nonce`.

use serde::{Deserialize, Serialize};

/// A 16-byte random nonce, written as 32 lowercase hex characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(try_from = "String", into = "String")]
#[cfg_attr(
    feature = "openapi",
    schema(
        value_type = String,
        pattern = r"^[0-9A-Fa-f]{32}$",
        example = "00112233445566778899aabbccddeeff"
    )
)]
pub struct Nonce(pub [u8; 16]);

impl Nonce {
    /// 16 bytes from the operating system's generator.
    ///
    /// # Panics
    ///
    /// When the operating system has no random bytes to give (as `rand::rngs::OsRng` does).
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        if let Err(e) = getrandom::getrandom(&mut b) {
            panic!("the operating system's random generator failed: {e}");
        }
        Self(b)
    }
}

impl TryFrom<String> for Nonce {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bytes = hex::decode(&s).map_err(|_| "nonce must be 32 hex characters".to_string())?;
        let array: [u8; 16] = bytes
            .try_into()
            .map_err(|_| "nonce must be 32 hex characters".to_string())?;
        Ok(Self(array))
    }
}

impl From<Nonce> for String {
    fn from(n: Nonce) -> String {
        hex::encode(n.0)
    }
}

impl std::fmt::Display for Nonce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_refusals() {
        let n = Nonce([0xab; 16]);
        let json = serde_json::to_string(&n).unwrap();
        assert_eq!(json, format!("\"{}\"", "ab".repeat(16)));
        assert_eq!(serde_json::from_str::<Nonce>(&json).unwrap(), n);
        assert_eq!(n.to_string(), "ab".repeat(16));
        for bad in [
            "\"short\"",
            "\"zz112233445566778899aabbccddeeff\"",
            "\"00112233445566778899aabbccddeeff00\"",
            "5",
        ] {
            assert!(serde_json::from_str::<Nonce>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn random_nonces_differ() {
        assert_ne!(Nonce::random(), Nonce::random());
    }
}
