//! Fuzz target: secret blobs (`license_protocol::secret`): the ECIES delivery blob the agent
//! receives from the server, and the at-rest ciphertext of the agent's file store.
//!
//! Checks: neither parser panics on any bytes; a blob of the wrong size is `Malformed` before
//! any key agreement; the machine's own seal of a secret (32 input bytes) opens to that secret.
#![no_main]

use libfuzzer_sys::fuzz_target;
use license_protocol::identity::MachineId;
use license_protocol::secret::{self, Secret, SecretDates, SecretError, SEALED_LEN};

fuzz_target!(|data: &[u8]| {
    let machine = MachineId(uuid::Uuid::from_bytes(*b"fuzz-machine-id!"));
    let key = p256::SecretKey::from_slice(&[5; 32]).expect("a valid scalar");
    let dates = SecretDates {
        valid_from: 1,
        valid_until: 2,
        grace_until: 3,
    };
    match secret::open(&key, &machine, 3, &dates, data) {
        Ok(_) => {}
        Err(SecretError::Malformed) => {}
        Err(_) => assert_eq!(data.len(), SEALED_LEN, "only a whole blob reaches the key"),
    }
    let _ = secret::decrypt_at_rest(&[6; 32], data, b"aad");

    // Round trip of a secret made of the input, when it is one (32 bytes): sealing costs an
    // ECDH, so not on every input.
    if let Ok(bytes) = <[u8; 32]>::try_from(data) {
        let original = Secret::from_bytes(bytes);
        let blob = secret::seal(&key.public_key(), &machine, 3, &dates, &original);
        assert_eq!(blob.len(), SEALED_LEN);
        let back = secret::open(&key, &machine, 3, &dates, &blob).expect("own blob opens");
        assert!(back == original);
        let at_rest = secret::encrypt_at_rest(&[6; 32], &original, b"aad");
        assert!(secret::decrypt_at_rest(&[6; 32], &at_rest, b"aad").expect("opens") == original);
    }
});
