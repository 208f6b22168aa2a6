//! Fuzz target: the agent's fallback secret store file, `secret.enc`
//! (`license_agent::stores::file::StoreContents`), read before any key is derived.
//!
//! Checks: contents that parse have an iteration count within the bounds (an edited file must
//! not stall the agent in PBKDF2), and write back to bytes that parse to the same contents.
#![no_main]

use libfuzzer_sys::fuzz_target;
use license_agent::config::{MAX_PBKDF2_ITERATIONS, MIN_PBKDF2_ITERATIONS};
use license_agent::stores::file::StoreContents;

fuzz_target!(|data: &[u8]| {
    if let Ok(contents) = StoreContents::parse(data) {
        assert!((MIN_PBKDF2_ITERATIONS..=MAX_PBKDF2_ITERATIONS).contains(&contents.iterations));
        let bytes = contents.to_bytes();
        assert_eq!(StoreContents::parse(&bytes), Ok(contents));
    }
});
