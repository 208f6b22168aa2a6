//! Fuzz target: the agent's `config.toml` (`license_agent::config::AgentConfig::parse`).
//!
//! Checks: never panics (also in the error path that quotes the line at fault); a config that
//! parses and passes its checks writes back (`to_toml`) to text that parses and passes them
//! too, and writes the same text again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use license_agent::config::{AgentConfig, MAX_PBKDF2_ITERATIONS, MIN_PBKDF2_ITERATIONS};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = AgentConfig::parse(text) else {
        return;
    };
    let iterations = config.tpm.pbkdf2_iterations;
    assert!((MIN_PBKDF2_ITERATIONS..=MAX_PBKDF2_ITERATIONS).contains(&iterations));
    let written = config.to_toml();
    let again = AgentConfig::parse(&written)
        .unwrap_or_else(|e| panic!("a checked config writes back to one refused: {e}\n{written}"));
    assert_eq!(again.to_toml(), written);
});
