//! Fuzz target: the body of `POST /api/public/recover` (`license_protocol::enroll::
//! RecoverRequest`), deserialized as the server's JSON extractor does, and its CSR read as the
//! server reads it (`license_server::pki::MachineCsr`).
//!
//! Checks: only a JSON object is a body; a body that parses writes back to JSON that parses
//! to the same body; the CSR parser never panics on what a body carries.
#![no_main]

use libfuzzer_sys::fuzz_target;
use license_protocol::enroll::RecoverRequest;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = serde_json::from_slice::<RecoverRequest>(data) else {
        return;
    };
    assert_eq!(first_byte(data), Some(b'{'), "a body that is not an object");
    let json = serde_json::to_vec(&request).expect("bodies serialize");
    let again: RecoverRequest = serde_json::from_slice(&json).expect("reads back");
    assert_eq!(serde_json::to_vec(&again).expect("serializes"), json);
    let _ = license_server::pki::MachineCsr::parse_pem(&request.csr);
});

fn first_byte(data: &[u8]) -> Option<u8> {
    data.iter().copied().find(|b| !b.is_ascii_whitespace())
}
