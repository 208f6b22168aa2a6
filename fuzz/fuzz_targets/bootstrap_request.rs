//! Fuzz target: the body of `POST /api/public/bootstrap` (`license_protocol::enroll::
//! BootstrapRequest`), deserialized as the server's JSON extractor does (`serde_json`).
//!
//! Checks: only a JSON object is a body (never an array of the fields); a body that parses
//! writes back to JSON that parses to the same body; what the server computes from it (the
//! re-enrollment message, the signature check) never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use license_protocol::enroll::BootstrapRequest;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = serde_json::from_slice::<BootstrapRequest>(data) else {
        return;
    };
    assert_eq!(first_byte(data), Some(b'{'), "a body that is not an object");
    let json = serde_json::to_vec(&request).expect("bodies serialize");
    let again: BootstrapRequest = serde_json::from_slice(&json).expect("reads back");
    assert_eq!(serde_json::to_vec(&again).expect("serializes"), json);
    let _ = request.reenrollment_message();
    let _ = request.verify_previous_key(&[0x30, 0x00]);
});

fn first_byte(data: &[u8]) -> Option<u8> {
    data.iter().copied().find(|b| !b.is_ascii_whitespace())
}
