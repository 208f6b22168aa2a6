//! Fuzz target: the body of `POST /api/v1/health` (`license_protocol::agent_api::
//! HealthReport`), deserialized as the server's JSON extractor does.
//!
//! Checks: only a JSON object is a body; a report that parses writes back to JSON that parses
//! to an equal report, and whether it is well formed does not change on the way.
#![no_main]

use libfuzzer_sys::fuzz_target;
use license_protocol::agent_api::HealthReport;

fuzz_target!(|data: &[u8]| {
    let Ok(report) = serde_json::from_slice::<HealthReport>(data) else {
        return;
    };
    assert_eq!(first_byte(data), Some(b'{'), "a body that is not an object");
    let json = serde_json::to_vec(&report).expect("reports serialize");
    let again: HealthReport = serde_json::from_slice(&json).expect("reads back");
    assert_eq!(again, report);
    assert_eq!(again.is_well_formed(), report.is_well_formed());
});

fn first_byte(data: &[u8]) -> Option<u8> {
    data.iter().copied().find(|b| !b.is_ascii_whitespace())
}
