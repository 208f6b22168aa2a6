//! Runs the Python client of docs/PROTOCOL.md (validation socket, example client), extracted from the document itself, against the
//! fake agent: the protocol description is enough to write a working client, and the document's
//! example stays true.

// The fake agent (tests/common) listens on a Unix socket; the pipe transport has its own
// tests (src/transport/windows.rs) and the Windows C example tests/windows_c_example.rs.
#![cfg(unix)]

mod common;

use std::path::Path;
use std::process::Command;

use common::FakeAgent;

/// The first ```python block of docs/PROTOCOL.md.
fn python_example() -> String {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/PROTOCOL.md");
    let text = std::fs::read_to_string(&doc)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", doc.display()));
    let start = text
        .find("```python\n")
        .expect("no ```python block in docs/PROTOCOL.md")
        + 10;
    let len = text[start..]
        .find("```")
        .expect("unterminated python block");
    text[start..start + len].to_string()
}

#[test]
fn the_documented_python_client_works_against_the_agent_protocol() {
    let agent = FakeAgent::start();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("validate.py");
    std::fs::write(&script, python_example()).unwrap();
    let socket = agent.socket().to_str().unwrap();
    let run = |token: &str| {
        let out = Command::new("python3")
            .arg(&script)
            .args([socket, token])
            .output()
            .expect("python3 is needed to check docs/PROTOCOL.md's example");
        (
            out.status.code(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };

    let (code, stdout, stderr) = run("good");
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stdout,
        "valid features=pos,loyalty expires_at=2030-01-01T00:00:00Z\n"
    );
    let (code, stdout, _) = run("perpetual");
    assert_eq!(
        (code, stdout.as_str()),
        (Some(0), "valid features=pos expires_at=never\n")
    );
    let (code, stdout, stderr) = run("revoked");
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stdout, "invalid reason=revoked\n");

    // No verdict: exit 2 with a message, never "valid".
    for (token, message) in [
        ("wrong-nonce", "nonce"),
        ("wrong-nonce-invalid", "nonce"),
        ("oversized", "frame length 65537"),
        ("close-mid-frame", "closed"),
        ("garbage", "error"),
        ("empty-frame", "frame length 0"),
    ] {
        let (code, stdout, stderr) = run(token);
        assert_eq!(code, Some(2), "{token}: {stdout}{stderr}");
        assert_eq!(stdout, "", "{token}");
        assert!(stderr.contains(message), "{token}: {stderr}");
    }

    let refusing = FakeAgent::start_refusing();
    let out = Command::new("python3")
        .arg(&script)
        .args([refusing.socket().to_str().unwrap(), "good"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(out.stdout, b"invalid reason=not_authorized\n");

    // Every request the script sent passed the protocol's own parser (or it would have been
    // refused as bad_request), each with a fresh nonce.
    let nonces = agent.nonces();
    assert_eq!(nonces.len(), 9);
    assert_eq!(common::distinct(&nonces), 9);
}
