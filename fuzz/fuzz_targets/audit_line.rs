//! Fuzz target: one line of the agent's audit log (`license_audit::parse_line`), as
//! `audit verify` and `read_log` read every line.
//!
//! Checks: never panics; an entry that parses writes back (as the writer writes lines) to a
//! line that parses to an equal entry with the same canonical bytes and hash, so that reading
//! a log never changes what its chain covers (floats included).
#![no_main]

use libfuzzer_sys::fuzz_target;
use license_audit::{parse_line, Entry};

fuzz_target!(|data: &[u8]| {
    let Ok(entry) = parse_line(data) else {
        return;
    };
    let line = serde_json::to_string(&entry).expect("entries serialize");
    let again: Entry = parse_line(line.as_bytes())
        .unwrap_or_else(|e| panic!("a parsed entry writes back to a line refused: {e}\n{line}"));
    assert_eq!(again, entry);
    assert_eq!(again.canonical_bytes(), entry.canonical_bytes());
    assert_eq!(again.compute_hash(), entry.compute_hash());
});
