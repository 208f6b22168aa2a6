//! Alerts (seed §7.2) end to end: each condition provoked against a real agent and seen in the
//! audit log, in the log record's structured `alert` field, and at a webhook.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{bin, wait_until, Agent, Server};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// A webhook receiver: records every JSON body POSTed to it, answers 200.
fn webhook() -> (String, Arc<Mutex<Vec<Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; length];
            if reader.read_exact(&mut body).is_ok() {
                if let Ok(json) = serde_json::from_slice(&body) {
                    sink.lock().unwrap().push(json);
                }
            }
            let _ = reader
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (url, seen)
}

fn audited(agent: &Agent, event: &str) -> bool {
    let out = Command::new(bin("license-agent-cli"))
        .args(["audit", "show", "--json", "--event", event, "--log"])
        .arg(agent.dir.join("log/audit.log"))
        .output()
        .unwrap();
    !out.stdout.is_empty()
}

#[test]
fn each_alert_reaches_the_audit_log_the_journal_form_and_the_webhook() {
    let root = tempfile::tempdir().unwrap();
    let public = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        public.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let socket = public.path().join("agent.sock");
    let (url, seen) = webhook();
    let mut server = Server::start(root.path(), 4, 600);
    let socket_text = socket.display().to_string();
    let mut agent = Agent::enroll(&server, root.path(), "pos1", 3600, move |t| {
        t["ipc"]["socket"] = toml::Value::String(socket_text);
        // Open to every local user, so the per-peer check is what refuses (and alerts).
        t["ipc"]["socket_mode"] = toml::Value::String("0666".into());
        let mut alerts = toml::Table::new();
        alerts.insert("webhook_url".into(), toml::Value::String(url));
        t.insert("alerts".into(), toml::Value::Table(alerts));
    });
    agent.socket = socket.clone();
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    agent.start(&[]);
    wait_until("a token", WAIT, || agent.token(&license).is_some());
    let got = |kind: &str| seen.lock().unwrap().iter().any(|a| a["alert"] == kind);

    // Unauthorized access attempt: a peer whose uid is not allowed.
    let script = format!(
        "import socket\ns=socket.socket(socket.AF_UNIX)\ns.connect({:?})\ns.recv(64)",
        socket.display().to_string()
    );
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            &script,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("unauthorized_access at the webhook", WAIT, || {
        got("unauthorized_access")
    });
    let alert = seen
        .lock()
        .unwrap()
        .iter()
        .find(|a| a["alert"] == "unauthorized_access")
        .cloned()
        .unwrap();
    assert_eq!(alert["machine_id"], agent.machine_id.as_str());
    assert_eq!(alert["details"]["uid"], 65534);
    assert!(audited(&agent, "alert.unauthorized_access"));
    assert!(
        agent.log().contains("alert=") && agent.log().contains("unauthorized_access"),
        "structured field in the log record"
    );

    // Rotation failing more than three times in a row, then the secret expiring unreplaced
    // (the server issues 4-second secrets and is gone).
    server.kill();
    wait_until("rotation_failed at the webhook", WAIT, || {
        got("rotation_failed")
    });
    assert!(audited(&agent, "alert.rotation_failed"));
    wait_until("secret_expired at the webhook", WAIT, || {
        got("secret_expired")
    });
    assert!(audited(&agent, "alert.secret_expired"));
    // Alerts never held a validation up: the agent still answers.
    let token = agent.token(&license).unwrap();
    assert!(
        agent.validate(&token).valid,
        "still in grace, degraded mode"
    );
}

#[test]
fn an_unreachable_webhook_never_blocks_validations() {
    let root = tempfile::tempdir().unwrap();
    // Accepts connections and never answers.
    let black_hole = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", black_hole.local_addr().unwrap());
    let server = Server::start(root.path(), 3600, 3600);
    let public = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        public.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mgmt = public.path().join("mgmt.sock");
    let mgmt_text = mgmt.display().to_string();
    let mut agent = Agent::enroll(&server, root.path(), "pos1", 3600, move |t| {
        t["management"]["socket"] = toml::Value::String(mgmt_text);
        let mut alerts = toml::Table::new();
        alerts.insert("webhook_url".into(), toml::Value::String(url));
        t.insert("alerts".into(), toml::Value::Table(alerts));
    });
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    agent.start(&[]);
    wait_until("a token", WAIT, || agent.token(&license).is_some());
    let token = agent.token(&license).unwrap();
    // Raise alerts (unauthorized management requests from a stranger uid) while the webhook
    // hangs, and keep validating: every answer comes back.
    for _ in 0..5 {
        let _ = Command::new("setpriv")
            .args(["--reuid=4242", "--regid=4242", "--clear-groups"])
            .arg(bin("license-agent-cli"))
            .arg("--socket")
            .arg(&mgmt)
            .arg("status")
            .output();
        assert!(agent.validate(&token).valid);
    }
    assert!(audited(&agent, "alert.unauthorized_access"));
    drop(black_hole);
}

#[test]
fn degraded_mode_for_more_than_a_day_is_alerted() {
    let root = tempfile::tempdir().unwrap();
    let (url, seen) = webhook();
    let mut server = Server::start(root.path(), 3 * 86_400, 3 * 86_400);
    let mut agent = Agent::enroll(&server, root.path(), "pos1", 2, move |t| {
        let mut alerts = toml::Table::new();
        alerts.insert("webhook_url".into(), toml::Value::String(url));
        t.insert("alerts".into(), toml::Value::Table(alerts));
    });
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    agent.start(&[]);
    wait_until("a token", WAIT, || agent.token(&license).is_some());
    server.kill();
    wait_until("degraded mode", WAIT, || {
        !agent.state()["degraded_since"].is_null()
    });
    agent.stop();

    // The machine has been offline since 25 hours ago (as its persisted state says).
    let path = agent.dir.join("state/state.json");
    let mut state: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    state["degraded_since"] = serde_json::json!(now - 25 * 3600);
    std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
    agent.start(&[]);
    wait_until("degraded_too_long at the webhook", WAIT, || {
        seen.lock()
            .unwrap()
            .iter()
            .any(|a| a["alert"] == "degraded_too_long")
    });
    assert!(audited(&agent, "alert.degraded_too_long"));
    assert!(
        agent.validate(&agent.token(&license).unwrap()).valid,
        "still serving in degraded mode"
    );
}

/// Finding 6: the audit log's whole history could be flushed by a flood of records without
/// anyone noticing. Half the kept files rotated away within a day raises `audit_log_flooded`
/// (here with 64 KiB files, so a few hundred validations do it); an ordinary pace does not.
#[test]
fn an_audit_log_rotating_abnormally_fast_raises_an_alert() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(root.path(), 3600, 3600);
    let mut agent = Agent::enroll(&server, root.path(), "pos1", 3600, |t| {
        t["agent"]["audit_max_file_bytes"] = toml::Value::Integer(65_536);
        t["agent"]["audit_keep_files"] = toml::Value::Integer(7);
    });
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    agent.start(&[]);
    wait_until("a token", WAIT, || agent.token(&license).is_some());
    let token = agent.token(&license).unwrap();
    for _ in 0..20 {
        assert!(agent.validate(&token).valid);
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !audited(&agent, "alert.audit_log_flooded"),
        "not at an ordinary pace"
    );

    let mut validations = 0;
    wait_until("audit_log_flooded", WAIT, || {
        for _ in 0..100 {
            assert!(agent.validate(&token).valid);
        }
        validations += 100;
        audited(&agent, "alert.audit_log_flooded")
    });
    let rotated = (1..=7)
        .filter(|n| agent.dir.join(format!("log/audit.log.{n}")).exists())
        .count();
    assert!(
        rotated >= 4,
        "{rotated} rotated files after {validations} validations"
    );
    assert!(agent.log().contains("audit_log_flooded"));
}
