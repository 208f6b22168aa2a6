//! Fuzz target: the bodies of `POST /api/v1/rotate-secret` and `/rotate-secret/ack`
//! (`license_protocol::rotation`), deserialized as the server's JSON extractor does.
//!
//! Checks: only a JSON object is a body; a body that parses writes back to JSON that parses
//! to the same body; the signature check the server runs on it never panics (and a fixed
//! key's signature over another body never verifies).
#![no_main]

use libfuzzer_sys::fuzz_target;
use license_protocol::rotation::{AckRequest, RotateSecretRequest};
use p256::pkcs8::EncodePublicKey as _;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<RotateSecretRequest>(data) {
        assert_eq!(first_byte(data), Some(b'{'), "a body that is not an object");
        let json = serde_json::to_vec(&request).expect("bodies serialize");
        let again: RotateSecretRequest = serde_json::from_slice(&json).expect("reads back");
        assert_eq!(serde_json::to_vec(&again).expect("serializes"), json);
        assert_eq!(again.signing_bytes(), request.signing_bytes());
        let key = p256::SecretKey::from_slice(&[5; 32]).expect("a valid scalar");
        let spki = key.public_key().to_public_key_der().expect("SPKI");
        // The fuzzer cannot sign with this key: a verified body would be a forgery.
        assert!(request.verify(spki.as_bytes()).is_err());
    }
    if let Ok(ack) = serde_json::from_slice::<AckRequest>(data) {
        assert_eq!(first_byte(data), Some(b'{'), "a body that is not an object");
        let json = serde_json::to_vec(&ack).expect("bodies serialize");
        let again: AckRequest = serde_json::from_slice(&json).expect("reads back");
        assert_eq!(again.secret_version, ack.secret_version);
    }
});

fn first_byte(data: &[u8]) -> Option<u8> {
    data.iter().copied().find(|b| !b.is_ascii_whitespace())
}
