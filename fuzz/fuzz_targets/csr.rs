//! Fuzz target: a certificate signing request as the server reads it at enrollment and
//! recovery (`license_server::pki::MachineCsr::parse_pem`).
//!
//! Checks: never panics; input over `MAX_CSR_LEN` is refused; a CSR that parses has passed
//! its self-signature check and has a public key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use license_protocol::enroll::MAX_CSR_LEN;
use license_server::pki::MachineCsr;

fuzz_target!(|data: &[u8]| {
    let Ok(pem) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(csr) = MachineCsr::parse_pem(pem) {
        assert!(pem.len() <= MAX_CSR_LEN);
        assert!(!csr.public_key_raw().is_empty());
    }
});
