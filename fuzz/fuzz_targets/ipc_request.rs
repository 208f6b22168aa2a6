//! Fuzz target: a frame on the agent's validation socket (`license_ipc::ipc`).
//!
//! The first 4 bytes are the frame header, the rest the payload. Checks: the header is read
//! within the limit; a request that parses writes back (as a client would) to the same request;
//! a refusal echoes at most `MAX_ECHOED_NONCE_LEN` bytes of nonce, and its answer fits a frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use license_ipc::ipc::{self, Request, Response, MAX_ECHOED_NONCE_LEN, MAX_FRAME_LEN};

fuzz_target!(|data: &[u8]| {
    if let Some(header) = data.get(..4) {
        let header: [u8; 4] = header.try_into().expect("4 bytes");
        if let Ok(len) = ipc::frame_len(header) {
            assert!((1..=MAX_FRAME_LEN).contains(&len));
        }
    }
    let payload = data.get(4..).unwrap_or_default();
    if payload.len() > MAX_FRAME_LEN {
        return;
    }
    match ipc::parse_request(payload) {
        Ok(Request::ValidateLicense {
            license_token,
            nonce,
        }) => {
            let again = serde_json::json!({
                "op": "validate_license",
                "license_token": license_token,
                "nonce": nonce.to_string(),
            })
            .to_string();
            assert_eq!(
                ipc::parse_request(again.as_bytes()),
                Ok(Request::ValidateLicense {
                    license_token,
                    nonce
                })
            );
        }
        Err((error, nonce)) => {
            assert!(nonce
                .as_ref()
                .is_none_or(|n| n.len() <= MAX_ECHOED_NONCE_LEN));
            let answer = Response::invalid(error.reason(), nonce);
            let json = serde_json::to_vec(&answer).expect("answers serialize");
            assert!(
                json.len() <= MAX_FRAME_LEN,
                "answer of {} bytes",
                json.len()
            );
            assert_eq!(serde_json::from_slice::<Response>(&json).ok(), Some(answer));
        }
    }
});
