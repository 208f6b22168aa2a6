//! Fuzz target: the Windows installer's trailer as the installer reads it from the end of its
//! own file (`license_protocol::installer::read`), and the server's `append` to a stub.
//!
//! Checks: never panics; a trailer that reads gives back a stub that is a prefix of the input
//! and a payload whose re-encoding reads back the same; appending to any input either refuses
//! or produces a file whose trailer reads back the payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use license_protocol::installer::{append, read};

fuzz_target!(|data: &[u8]| {
    if let Ok(found) = read(data) {
        assert!(data.starts_with(found.stub));
        let again = found.payload.encode();
        let mut file = found.stub.to_vec();
        file.extend_from_slice(&again);
        assert_eq!(read(&file).unwrap().payload, found.payload);
        if let Ok(tagged) = append(found.stub, &found.payload) {
            assert_eq!(read(&tagged).unwrap().payload, found.payload);
        }
    }
});
