//! Runs the real `license-agent-cli` binary against a fake management agent (a thread on a
//! Unix socket in a temp dir) that checks each request it receives and answers canned results
//! and errors: requests on the wire, human and `--json` output, and every exit code.

// The fake agent listens on a Unix socket.
#![cfg(unix)]
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;

use license_ipc::ipc::{encode_frame, frame_len};
use license_ipc::mgmt::{MgmtRequest, MgmtResponse};
use serde_json::{json, Value};

/// What the fake agent does with a request.
enum Reply {
    Answer(MgmtResponse),
    /// Reads the request and never answers.
    Silence,
    /// Answers bytes that are not a management response.
    Garbage,
}

/// A fake agent listening on `<tempdir>/mgmt.sock`; keeps every request it receives.
struct FakeAgent {
    dir: tempfile::TempDir,
    requests: Arc<Mutex<Vec<Value>>>,
}

impl FakeAgent {
    fn start(handler: impl Fn(&MgmtRequest) -> Reply + Send + 'static) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("mgmt.sock")).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let mut header = [0u8; 4];
                stream.read_exact(&mut header).unwrap();
                let mut payload = vec![0u8; frame_len(header).unwrap()];
                stream.read_exact(&mut payload).unwrap();
                let raw: Value = serde_json::from_slice(&payload).unwrap();
                seen.lock().unwrap().push(raw);
                // The protocol's own parser (deny_unknown_fields) must accept what the CLI sent.
                let request: MgmtRequest = serde_json::from_slice(&payload).unwrap();
                let answer = match handler(&request) {
                    Reply::Answer(a) => serde_json::to_vec(&a).unwrap(),
                    Reply::Silence => {
                        let mut rest = Vec::new();
                        let _ = stream.read_to_end(&mut rest);
                        continue;
                    }
                    Reply::Garbage => b"[1, 2, 3]".to_vec(),
                };
                let _ = stream.write_all(&encode_frame(&answer));
            }
        });
        FakeAgent { dir, requests }
    }

    /// An agent answering `result` to every request.
    fn answering(result: Value) -> Self {
        Self::start(move |_| Reply::Answer(MgmtResponse::ok(result.clone())))
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("mgmt.sock")
    }

    fn file(&self, name: &str, content: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    /// Runs the CLI on this agent's socket.
    fn cli(&self, args: &[&str]) -> Output {
        let socket = self.socket();
        let mut all = vec!["--socket", socket.to_str().unwrap()];
        all.extend_from_slice(args);
        cli(&all)
    }

    fn requests(&self) -> Vec<Value> {
        self.requests.lock().unwrap().clone()
    }

    fn last_request(&self) -> Value {
        self.requests().last().cloned().unwrap()
    }
}

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_license-agent-cli"))
        .env_remove("LICENSE_AGENT_MGMT_SOCKET")
        .env_remove("LICENSE_AGENT_AUDIT_LOG")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn status_result() -> Value {
    json!({
        "machine_id": "pos-042",
        "client_id": "store-7",
        "secrets": [
            {"version": 5, "state": "active", "valid_from": "2026-03-01T00:00:00Z",
             "valid_until": "2026-04-01T00:00:00Z", "grace_until": "2026-04-08T00:00:00Z"},
            {"version": 4, "state": "grace", "valid_from": "2026-02-01T00:00:00Z",
             "valid_until": "2026-03-01T00:00:00Z", "grace_until": "2026-03-08T00:00:00Z"}
        ],
        "invalidated_versions": [2],
        "store": "tpm",
        "tpm_enabled": true,
        "tpm_available": true,
        "licenses": 12,
        "revoked_licenses": 3,
        "degraded_mode": "active",
        "degraded_policy": "allow",
        "degraded_since": "2026-03-05T10:00:00Z",
        "last_server_contact": "2026-03-05T09:59:00Z",
        "last_rotation": "2026-03-01T00:00:00Z",
        "next_rotation": "2026-04-01T00:00:00Z",
        "consecutive_failures": 4,
        "clock_rollback_secs": 120,
        "certificate": {"serial": "0a1b", "expires_at": "2027-03-01T00:00:00Z",
                        "renews_at": "2026-11-01T00:00:00Z"},
        "extra": {}
    })
}

#[test]
fn status_human_and_json() {
    let agent = FakeAgent::answering(status_result());
    let o = agent.cli(&["status"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let out = stdout(&o);
    for expected in [
        "machine          pos-042",
        "client id        store-7",
        "secret store     tpm (TPM enabled: yes, available: yes)",
        "VERSION",
        "active   2026-03-01T00:00:00Z",
        "grace    2026-02-01T00:00:00Z",
        "invalidated      2",
        "licenses         12 (3 revoked)",
        "degraded mode    active (policy allow), since 2026-03-05T10:00:00Z",
        "server contact   2026-03-05T09:59:00Z",
        "last rotation    2026-03-01T00:00:00Z",
        "next rotation    2026-04-01T00:00:00Z",
        "failures         4 consecutive",
        "clock rollback   120 s",
        "certificate      serial 0a1b, expires 2027-03-01T00:00:00Z, renews 2026-11-01T00:00:00Z",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in\n{out}");
    }
    assert_eq!(agent.last_request(), json!({"op": "status"}));

    let o = agent.cli(&["status", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v, status_result());
}

#[test]
fn status_without_rollback_or_contact() {
    let mut result = status_result();
    result["clock_rollback_secs"] = json!(0);
    result["last_server_contact"] = Value::Null;
    result["degraded_since"] = Value::Null;
    let agent = FakeAgent::answering(result);
    let out = stdout(&agent.cli(&["status"]));
    assert!(!out.contains("clock rollback"), "{out}");
    assert!(out.contains("server contact   never"), "{out}");
    assert!(
        out.contains("degraded mode    active (policy allow)\n"),
        "{out}"
    );
}

#[test]
fn token_is_sent_iff_a_token_file_is_given() {
    let agent = FakeAgent::answering(status_result());
    let token = agent.file("mgmt.token", "  s3cret-second-factor \n");
    agent.cli(&["status"]);
    agent.cli(&["--token-file", token.to_str().unwrap(), "status"]);
    // Global options also go after the command.
    agent.cli(&["rotate", "--token-file", token.to_str().unwrap()]);
    let requests = agent.requests();
    assert_eq!(requests.len(), 3);
    assert!(requests[0].get("token").is_none(), "{}", requests[0]);
    assert_eq!(requests[1]["token"], "s3cret-second-factor");
    assert_eq!(
        requests[2],
        json!({"op": "rotate", "token": "s3cret-second-factor"})
    );

    // An unreadable or empty token file is a usage error; nothing is sent.
    let missing = agent.dir.path().join("missing.token");
    let o = agent.cli(&["--token-file", missing.to_str().unwrap(), "status"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(stderr(&o).contains("cannot read token file"), "{o:?}");
    let empty = agent.file("empty.token", " \n");
    let o = agent.cli(&["--token-file", empty.to_str().unwrap(), "status"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert_eq!(agent.requests().len(), 3);
}

#[test]
fn rotate_reports_the_new_version() {
    let agent = FakeAgent::answering(json!({"version": 6}));
    let o = agent.cli(&["rotate"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(stdout(&o), "rotated: secret version 6\n");
    assert_eq!(agent.last_request(), json!({"op": "rotate"}));

    let o = agent.cli(&["--json", "rotate"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&o)).unwrap(),
        json!({"version": 6})
    );
}

#[test]
fn invalidate_sends_the_version() {
    let agent = FakeAgent::answering(json!({"version": 4, "invalidated": true}));
    let o = agent.cli(&["invalidate", "4"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(stdout(&o), "secret version 4 invalidated\n");
    assert_eq!(
        agent.last_request(),
        json!({"op": "invalidate", "version": 4})
    );

    let o = agent.cli(&["invalidate", "4", "--json"]);
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&o)).unwrap(),
        json!({"version": 4, "invalidated": true})
    );
    // Not a version: usage error, nothing sent.
    let before = agent.requests().len();
    assert_eq!(agent.cli(&["invalidate", "four"]).status.code(), Some(2));
    assert_eq!(agent.cli(&["invalidate"]).status.code(), Some(2));
    assert_eq!(agent.requests().len(), before);
}

#[test]
fn degraded_sends_the_mode_and_shows_the_new_state() {
    let agent = FakeAgent::start(|request| {
        let MgmtRequest::Degraded { mode, .. } = request else {
            panic!("{request:?}");
        };
        let (mode, policy) = match mode {
            license_ipc::mgmt::DegradedSwitch::On => ("forced", "allow"),
            license_ipc::mgmt::DegradedSwitch::Off => ("inactive", "deny"),
            license_ipc::mgmt::DegradedSwitch::Auto => ("inactive", "allow"),
        };
        Reply::Answer(MgmtResponse::ok(
            json!({"degraded_mode": mode, "degraded_policy": policy}),
        ))
    });
    for (arg, line) in [
        ("on", "degraded mode forced (policy allow)\n"),
        ("off", "degraded mode inactive (policy deny)\n"),
        ("auto", "degraded mode inactive (policy allow)\n"),
    ] {
        let o = agent.cli(&["degraded", arg]);
        assert_eq!(o.status.code(), Some(0), "{o:?}");
        assert_eq!(stdout(&o), line);
        assert_eq!(agent.last_request(), json!({"op": "degraded", "mode": arg}));
    }
    let o = agent.cli(&["--json", "degraded", "off"]);
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&o)).unwrap(),
        json!({"degraded_mode": "inactive", "degraded_policy": "deny"})
    );
    let before = agent.requests().len();
    assert_eq!(agent.cli(&["degraded", "maybe"]).status.code(), Some(2));
    assert_eq!(agent.requests().len(), before);
}

#[test]
fn degraded_prints_the_agents_description() {
    let agent = FakeAgent::answering(
        json!({"degraded": "forced on: serving offline with the secrets held"}),
    );
    let o = agent.cli(&["degraded", "on"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(
        stdout(&o),
        "degraded mode: forced on: serving offline with the secrets held\n"
    );
    let agent = FakeAgent::answering(json!({}));
    assert_eq!(
        stdout(&agent.cli(&["degraded", "auto"])),
        "degraded mode switched auto\n"
    );
}

#[test]
fn metrics_prints_the_raw_text() {
    let text = "# HELP license_validations_total Validations.\n# TYPE license_validations_total counter\nlicense_validations_total{result=\"valid\"} 7\n";
    let agent = FakeAgent::answering(json!({ "text": text }));
    let o = agent.cli(&["metrics"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(stdout(&o), text);
    assert_eq!(agent.last_request(), json!({"op": "metrics"}));
    let o = agent.cli(&["metrics", "--json"]);
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&o)).unwrap(),
        json!({ "text": text })
    );
}

#[test]
fn validate_valid_and_invalid() {
    let agent = FakeAgent::start(|request| {
        let MgmtRequest::Validate { license_token, .. } = request else {
            panic!("{request:?}");
        };
        Reply::Answer(MgmtResponse::ok(if license_token == "R09PRA==" {
            json!({"valid": true, "expires_at": "2027-01-01T00:00:00Z",
                   "features": ["pos", "loyalty"], "metadata": {"store": "7"}, "nonce": "n"})
        } else {
            json!({"valid": false, "reason": "bad_signature", "nonce": "n"})
        }))
    });
    let good = agent.file("good.token", "R09PRA==\n");
    let bad = agent.file("bad.token", "QkFE\n");

    let o = agent.cli(&["validate", good.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(
        stdout(&o),
        "valid: features pos,loyalty; expires 2027-01-01T00:00:00Z\n  store: 7\n"
    );
    assert_eq!(
        agent.last_request(),
        json!({"op": "validate", "license_token": "R09PRA=="})
    );
    let o = agent.cli(&["--json", "validate", good.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["features"], json!(["pos", "loyalty"]));

    let o = agent.cli(&["validate", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert_eq!(stdout(&o), "invalid: bad_signature\n");
    let o = agent.cli(&["validate", "--json", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["reason"], "bad_signature");

    // No such token file: usage error, nothing sent.
    let before = agent.requests().len();
    let o = agent.cli(&["validate", "/nonexistent/token"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("cannot read license token file"),
        "{o:?}"
    );
    assert_eq!(agent.requests().len(), before);
}

#[test]
fn validate_with_a_management_token_and_from_stdin() {
    let agent = FakeAgent::answering(json!({"valid": false, "reason": "expired", "nonce": "n"}));
    let mgmt_token = agent.file("mgmt.token", "second-factor\n");
    let license = agent.file("license.token", "TElD\n");
    let o = agent.cli(&[
        "validate",
        license.to_str().unwrap(),
        "--token-file",
        mgmt_token.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert_eq!(stdout(&o), "invalid: expired\n");
    assert_eq!(
        agent.last_request(),
        json!({"op": "validate", "license_token": "TElD", "token": "second-factor"})
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_license-agent-cli"))
        .args([
            "--socket",
            agent.socket().to_str().unwrap(),
            "validate",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"  U1RESU4=\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert_eq!(
        agent.last_request(),
        json!({"op": "validate", "license_token": "U1RESU4="})
    );
}

#[test]
fn a_never_expiring_license_without_features() {
    let agent = FakeAgent::answering(
        json!({"valid": true, "expires_at": null, "features": [], "metadata": {}, "nonce": "n"}),
    );
    let token = agent.file("t", "AAAA");
    let o = agent.cli(&["validate", token.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(stdout(&o), "valid: features (none); expires never\n");
}

#[test]
fn agent_errors_map_to_exit_codes() {
    let agent = FakeAgent::start(|request| {
        let (code, message) = match request {
            MgmtRequest::Rotate { .. } => ("not_authorized", "uid 1000 is not an admin"),
            MgmtRequest::Degraded { .. } => ("refused", "degraded mode is forbidden by config"),
            MgmtRequest::Invalidate { .. } => ("audit_unavailable", "audit log not writable"),
            MgmtRequest::Status { .. } => ("failed", "server unreachable\nretry later"),
            _ => ("bad_request", "unknown secret version"),
        };
        let code = serde_json::from_value(serde_json::json!(code)).unwrap();
        Reply::Answer(MgmtResponse::err(code, message))
    });
    for (args, code, exit) in [
        (&["rotate"][..], "not_authorized", 3),
        (&["degraded", "on"][..], "refused", 3),
        (&["invalidate", "9"][..], "audit_unavailable", 3),
        (&["status"][..], "failed", 1),
        (&["metrics"][..], "bad_request", 1),
    ] {
        let o = agent.cli(args);
        assert_eq!(o.status.code(), Some(exit), "{args:?}: {o:?}");
        assert!(stdout(&o).is_empty(), "{o:?}");
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with(&format!("license-agent-cli: {}: {code}: ", args[0])),
            "{err}"
        );

        let mut json_args = vec!["--json"];
        json_args.extend_from_slice(args);
        let o = agent.cli(&json_args);
        assert_eq!(o.status.code(), Some(exit), "{o:?}");
        let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(v["error"], code);
        assert!(v["message"].as_str().unwrap().len() > 3);
    }
    let o = agent.cli(&["rotate"]);
    assert_eq!(
        stderr(&o),
        "license-agent-cli: rotate: not_authorized: uid 1000 is not an admin\n"
    );
}

#[test]
fn unreachable_agent_exits_4() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("mgmt.sock");
    for args in [&["status"][..], &["--json", "rotate"][..]] {
        let mut all = vec!["--socket", missing.to_str().unwrap()];
        all.extend_from_slice(args);
        let o = cli(&all);
        assert_eq!(o.status.code(), Some(4), "{o:?}");
        assert!(stderr(&o).contains("not reachable"), "{o:?}");
    }
    // A socket file nobody listens on: connection refused.
    drop(UnixListener::bind(&missing).unwrap());
    let o = cli(&["--socket", missing.to_str().unwrap(), "status"]);
    assert_eq!(o.status.code(), Some(4), "{o:?}");

    // The socket also comes from the environment.
    let o = Command::new(env!("CARGO_BIN_EXE_license-agent-cli"))
        .env("LICENSE_AGENT_MGMT_SOCKET", dir.path().join("other.sock"))
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4));
    assert!(stderr(&o).contains("other.sock"), "{o:?}");
}

#[test]
fn the_environment_names_the_socket() {
    let agent = FakeAgent::answering(json!({"version": 1}));
    let o = Command::new(env!("CARGO_BIN_EXE_license-agent-cli"))
        .env("LICENSE_AGENT_MGMT_SOCKET", agent.socket())
        .arg("rotate")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(stdout(&o), "rotated: secret version 1\n");
}

#[test]
fn a_silent_agent_times_out_and_a_bad_answer_is_an_error() {
    let agent = FakeAgent::start(|request| match request {
        MgmtRequest::Rotate { .. } => Reply::Silence,
        _ => Reply::Garbage,
    });
    let started = std::time::Instant::now();
    let o = agent.cli(&["--timeout", "1", "rotate"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        stderr(&o).contains("no answer from the agent within 1 s"),
        "{o:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));

    let o = agent.cli(&["status"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(stderr(&o).contains("not a management response"), "{o:?}");
}

#[test]
fn a_result_of_the_wrong_shape_is_an_error() {
    let agent = FakeAgent::answering(json!({"unexpected": true}));
    assert_eq!(agent.cli(&["status"]).status.code(), Some(2));
    assert_eq!(agent.cli(&["metrics"]).status.code(), Some(2));
    // With --json the result is passed through as it is.
    assert_eq!(agent.cli(&["--json", "status"]).status.code(), Some(0));
}

#[test]
fn completions_and_man_page() {
    let o = cli(&["completions", "bash"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(stdout(&o).contains("license-agent-cli"));
    for shell in ["zsh", "fish"] {
        let o = cli(&["completions", shell]);
        assert_eq!(o.status.code(), Some(0), "{shell}");
        assert!(stdout(&o).contains("rotate"), "{shell}");
    }
    assert_eq!(cli(&["completions", "tcsh"]).status.code(), Some(2));

    let o = cli(&["man"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let page = stdout(&o);
    assert!(page.contains(".TH"), "{page}");
    assert!(page.contains("license-agent-cli"));
}

#[test]
fn help_documents_the_exit_codes() {
    let o = cli(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    let help = stdout(&o);
    assert!(help.contains("Exit codes:"), "{help}");
    for code in ["  3  refused by the agent", "  4  the agent is unreachable"] {
        assert!(help.contains(code), "{help}");
    }
    assert!(help.contains("LICENSE_AGENT_MGMT_SOCKET"));
}
