//! Fuzz target: a request on the agent's management socket (`license_ipc::mgmt`).
//!
//! Checks: a request that parses writes back to the same request; a refusal is `bad_request`
//! with a message of at most `MAX_BAD_REQUEST_MESSAGE_LEN` bytes, and its answer fits a frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use license_ipc::ipc::MAX_FRAME_LEN;
use license_ipc::mgmt::{self, MgmtErrorCode, MgmtResponse, MAX_BAD_REQUEST_MESSAGE_LEN};

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_FRAME_LEN {
        return;
    }
    match mgmt::parse_request(data) {
        Ok(request) => {
            let json = serde_json::to_vec(&request).expect("requests serialize");
            assert_eq!(mgmt::parse_request(&json).ok(), Some(request.clone()));
            // Every request has a name and a role, whatever its fields.
            let _ = (request.name(), request.is_admin(), request.token());
        }
        Err(answer) => {
            assert_eq!(answer.error, Some(MgmtErrorCode::BadRequest));
            let message = answer.message.as_deref().unwrap_or_default();
            assert!(message.len() <= MAX_BAD_REQUEST_MESSAGE_LEN);
            let json = serde_json::to_vec(&answer).expect("answers serialize");
            assert!(
                json.len() <= MAX_FRAME_LEN,
                "answer of {} bytes",
                json.len()
            );
            assert_eq!(
                serde_json::from_slice::<MgmtResponse>(&json).ok(),
                Some(answer)
            );
        }
    }
});
