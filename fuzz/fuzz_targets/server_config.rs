//! Fuzz target: the server's `server.toml` (`license_server::config::ServerConfig::parse`).
//!
//! Checks: never panics; a config that parses and passes its checks has a host and URLs that
//! are names, not text (nothing a shell, a URL or a certificate could read as more), and writes
//! back (`to_toml`) to text that parses to the same config.
#![no_main]

use libfuzzer_sys::fuzz_target;
use license_server::config::ServerConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = ServerConfig::parse(text) else {
        return;
    };
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-_:[]/".contains(&b))
    };
    assert!(plain(&config.public_host), "{:?}", config.public_host);
    for url in [&config.public_url, &config.agent_url]
        .into_iter()
        .flatten()
    {
        assert!(url.starts_with("https://") && plain(url), "{url:?}");
        assert!(!url["https://".len()..].contains('/'), "{url:?}");
    }
    let written = config.to_toml();
    let again = ServerConfig::parse(&written)
        .unwrap_or_else(|e| panic!("a checked config writes back to one refused: {e}\n{written}"));
    assert_eq!(again.to_toml(), written);
});
