//! Fuzz target: the agent's TPM object blobs (`license_agent::platform::tpm`), parsed by the
//! tpm2-tss unmarshaller before the TPM sees them (no TPM needed).
//!
//! Checks: the C unmarshaller never reads out of bounds (AddressSanitizer), input over
//! `MAX_BLOB_LEN` is refused, and a blob that parses encodes back to exactly its bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use license_agent::platform::tpm::{reencode_blob, MAX_BLOB_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(again) = reencode_blob(data) {
        assert!(data.len() <= MAX_BLOB_LEN);
        assert_eq!(again, data, "a blob reads back as other bytes");
    }
});
