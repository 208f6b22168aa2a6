//! The Rust client against a fake agent: verdicts, several requests per connection, fresh
//! nonces, and every way an answer can be refused (wrong nonce, oversized, truncated, malformed,
//! missing socket, timeout).

// The fake agent (tests/common) listens on a Unix socket; the pipe transport has its own
// tests (src/transport/windows.rs) and the Windows C example tests/windows_c_example.rs.
#![cfg(unix)]

mod common;

use std::time::Duration;

use common::FakeAgent;
use license_client::{Client, ClientConfig, ClientError, Reason, MAX_FRAME_LEN};

#[test]
fn a_valid_license_has_its_features_expiry_and_metadata() {
    let agent = FakeAgent::start();
    let mut client = Client::connect(agent.socket()).unwrap();
    let v = client.validate_license("good").unwrap();
    assert!(v.is_valid());
    assert_eq!(v.reason, None);
    assert_eq!(v.features, ["pos", "loyalty"]);
    assert!(v.has_feature("loyalty"));
    assert!(!v.has_feature("fuel"));
    assert_eq!(v.expires_at.as_deref(), Some("2030-01-01T00:00:00Z"));
    assert_eq!(v.metadata("site"), Some("Lyon 3"));
    assert_eq!(v.metadata("nope"), None);
}

#[test]
fn a_revoked_license_is_an_answer_not_an_error() {
    let agent = FakeAgent::start();
    let mut client = Client::connect(agent.socket()).unwrap();
    let v = client.validate_license("revoked").unwrap();
    assert!(!v.is_valid());
    assert_eq!(v.reason, Some(Reason::Revoked));
    assert!(!v.has_feature("pos"));
    assert!(v.features.is_empty() && v.metadata.is_empty() && v.expires_at.is_none());
}

#[test]
fn one_connection_carries_many_requests_each_with_a_fresh_nonce() {
    let agent = FakeAgent::start();
    let mut client = Client::connect(agent.socket()).unwrap();
    for _ in 0..5 {
        assert!(client.validate_license("good").unwrap().is_valid());
        let refused = client.validate_license("revoked").unwrap();
        assert_eq!(refused.reason, Some(Reason::Revoked));
        let perpetual = client.validate_license("perpetual").unwrap();
        assert!(perpetual.is_valid() && perpetual.expires_at.is_none());
    }
    let nonces = agent.nonces();
    assert_eq!(nonces.len(), 15);
    assert_eq!(
        common::distinct(&nonces),
        15,
        "a nonce was reused: {nonces:?}"
    );
    for n in &nonces {
        assert_eq!(n.len(), 32);
        assert!(n.bytes().all(|b| b.is_ascii_hexdigit()), "{n}");
    }
}

#[test]
fn an_answer_with_another_nonce_is_refused_and_closes_the_connection() {
    let agent = FakeAgent::start();
    for token in ["wrong-nonce", "wrong-nonce-invalid"] {
        let mut client = Client::connect(agent.socket()).unwrap();
        let err = client.validate_license(token).unwrap_err();
        assert!(
            matches!(err, ClientError::NonceMismatch),
            "{token}: {err:?}"
        );
        // The stream may be out of step with the agent now: it is not reused.
        assert!(matches!(
            client.validate_license("good"),
            Err(ClientError::Closed)
        ));
    }
}

#[test]
fn an_oversized_frame_is_refused_from_its_header() {
    let agent = FakeAgent::start();
    let mut client = Client::connect(agent.socket()).unwrap();
    // The fake agent sends only the header and keeps the connection open: a client that tried
    // to read the payload would hang until its timeout instead.
    let err = client.validate_license("oversized").unwrap_err();
    assert!(
        matches!(err, ClientError::FrameTooLarge(n) if n == MAX_FRAME_LEN + 1),
        "{err:?}"
    );
    assert!(err.to_string().contains("65537"), "{err}");
}

#[test]
fn a_frame_of_exactly_the_limit_is_accepted() {
    let agent = FakeAgent::start();
    let mut client = Client::connect(agent.socket()).unwrap();
    let v = client.validate_license("max-frame").unwrap();
    assert!(v.is_valid());
    assert!(v.metadata("pad").is_some());
    assert!(client.validate_license("good").unwrap().is_valid());
}

#[test]
fn a_connection_closed_before_or_during_the_answer_is_closed() {
    let agent = FakeAgent::start();
    for token in ["close-mid-frame", "close"] {
        let mut client = Client::connect(agent.socket()).unwrap();
        let err = client.validate_license(token).unwrap_err();
        assert!(matches!(err, ClientError::Closed), "{token}: {err:?}");
    }
}

#[test]
fn answers_that_are_not_answers_are_malformed() {
    let agent = FakeAgent::start();
    for token in ["garbage", "empty-frame", "lying-flag"] {
        let mut client = Client::connect(agent.socket()).unwrap();
        let err = client.validate_license(token).unwrap_err();
        assert!(matches!(err, ClientError::Malformed(_)), "{token}: {err:?}");
    }
}

#[test]
fn a_missing_socket_is_a_clear_connect_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-agent.sock");
    let err = Client::connect(&path).unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("no-agent.sock"), "{message}");
    assert!(message.contains("cannot connect"), "{message}");
}

#[test]
fn an_agent_that_never_answers_is_a_timeout() {
    let agent = FakeAgent::start();
    let config = ClientConfig::new(agent.socket()).with_timeout(Duration::from_millis(100));
    let mut client = Client::connect_with(&config).unwrap();
    let err = client.validate_license("silent").unwrap_err();
    assert!(matches!(err, ClientError::Timeout), "{err:?}");
}

#[test]
fn a_request_over_the_frame_limit_is_not_sent() {
    let agent = FakeAgent::start();
    let mut client = Client::connect(agent.socket()).unwrap();
    let huge = "A".repeat(MAX_FRAME_LEN);
    let err = client.validate_license(&huge).unwrap_err();
    assert!(matches!(err, ClientError::RequestTooLarge(_)), "{err:?}");
    // Nothing was sent, so the connection is still in step.
    assert!(client.validate_license("good").unwrap().is_valid());
    assert_eq!(agent.nonces().len(), 1);
}

#[test]
fn the_defaults_are_the_documented_ones() {
    let config = ClientConfig::default();
    assert_eq!(
        config.socket_path.to_str(),
        Some("/run/license-agent/agent.sock")
    );
    assert_eq!(config.read_timeout, Duration::from_secs(5));
    assert_eq!(config.write_timeout, Duration::from_secs(5));
    assert_eq!(
        license_client::DEFAULT_SOCKET_PATH,
        "/run/license-agent/agent.sock"
    );
}

#[test]
fn a_refused_peer_gets_not_authorized_even_if_the_agent_closed_first() {
    let agent = FakeAgent::start_refusing();
    for _ in 0..3 {
        let mut client = Client::connect(agent.socket()).unwrap();
        // The agent may have closed before the request is written (the write fails) or after
        // (the answer is read normally): either way the refusal is the verdict.
        let v = client.validate_license("good").unwrap();
        assert!(!v.is_valid());
        assert_eq!(v.reason, Some(Reason::NotAuthorized));
        assert!(matches!(
            client.validate_license("good"),
            Err(ClientError::Closed)
        ));
    }
}
