//! The license signing key rolls over and a retired key's tokens stop validating (issue 9, item
//! 4), end to end: a real server (SQLite) and agent daemon, `admin keys rotate-license` and
//! `admin keys retire-license`, the real client library on the agent's socket.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{bin, reason, wait_until, Agent, Server};
use license_protocol::token;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// The token file for `license` once it differs from `after`.
fn wait_token(agent: &Agent, license: &str, after: Option<&str>) -> String {
    let mut token = None;
    wait_until(&format!("a token for {license}"), WAIT, || {
        token = agent.token(license).filter(|t| Some(t.as_str()) != after);
        token.is_some()
    });
    token.unwrap()
}

/// The key id a token's (v2) header names.
fn key_id_of(token_b64: &str) -> String {
    token::decode(token_b64)
        .unwrap()
        .0
        .key_id
        .expect("a v2 token names its key")
        .to_string()
}

/// The agent's `state/license-keys.json`.
fn trusted(agent: &Agent) -> Value {
    std::fs::read_to_string(agent.dir.join("state/license-keys.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null)
}

fn trusted_state(agent: &Agent, id: &str) -> Option<bool> {
    trusted(agent)["keys"]
        .as_array()?
        .iter()
        .find(|k| k["id"] == id)
        .and_then(|k| k["retired"].as_bool())
}

#[test]
fn a_license_key_rolls_over_and_a_retired_key_s_tokens_answer_key_retired() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(root.path(), 3600, 3600);
    let mut agent = Agent::enroll(&server, root.path(), "pos1", 3600, |_| {});
    let license = server.issue_license(&agent.machine_id, "pos.sale", &["--expires-in", "30d"]);
    agent.start(&[]);

    let status = server.admin(&["keys", "status"]);
    let old_id = status["license_signing_key"]["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(status["license_keys"][0]["state"], "current");
    let old_token = wait_token(&agent, &license, None);
    assert_eq!(
        token::decode(&old_token).unwrap().0.key_id,
        None,
        "v1 (readable by agents older than key rollover) while the server has one key"
    );
    let v = agent.validate(&old_token);
    assert!(v.valid, "{v:?}\n{}", agent.log());
    // The first round learned the server's set (the pinned key, signed by it).
    wait_until("the agent to hold the server's key set", WAIT, || {
        trusted_state(&agent, &old_id) == Some(false)
    });

    // Rollover: a new current key; the old one is previous.
    let rotated = server.admin(&["keys", "rotate-license"]);
    let new_id = rotated["new_key_id"].as_str().unwrap().to_string();
    assert_eq!(rotated["old_key_id"], old_id.as_str());
    assert_ne!(new_id, old_id);
    wait_until("the agent to learn the new key", WAIT, || {
        trusted_state(&agent, &new_id) == Some(false)
    });
    let new_token = wait_token(&agent, &license, Some(&old_token));
    assert_eq!(
        key_id_of(&new_token),
        new_id,
        "tokens re-issued under the new key"
    );
    let v = agent.validate(&new_token);
    assert!(v.valid, "{v:?}\n{}", agent.log());
    assert!(
        agent.validate(&old_token).valid,
        "a previous key's tokens keep validating"
    );

    // The current key cannot be retired.
    let refused = Command::new(bin("license-server"))
        .args(["admin", "--data-dir"])
        .arg(&server.dir)
        .args(["keys", "retire-license", &new_id])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("current"));

    // Retirement: the old key's tokens (v1 here: the retired key is found among the retired
    // ones) answer key_retired once the agent has heard of it.
    let retired = server.admin(&["keys", "retire-license", &old_id]);
    assert_eq!(retired["current"], new_id.as_str());
    wait_until("the old token to answer key_retired", WAIT, || {
        reason(&agent.validate(&old_token)).as_deref() == Some("key_retired")
    });
    assert_eq!(trusted_state(&agent, &old_id), Some(true));
    let v = agent.validate(&new_token);
    assert!(v.valid, "{v:?}\n{}", agent.log());

    // Still so after a restart of the agent (the set is kept in its state directory).
    agent.stop();
    agent.start(&[]);
    assert_eq!(
        reason(&agent.validate(&old_token)).as_deref(),
        Some("key_retired")
    );
    assert!(agent.validate(&new_token).valid);

    // Audited, key ids only; the agent audited what it learned.
    let audit = server.admin(&["audit", "list"]).to_string();
    assert!(audit.contains("keys.rotate_license"), "{audit}");
    assert!(audit.contains("keys.retire_license"), "{audit}");
    let status = server.admin(&["keys", "status"]);
    let states: Vec<(String, String)> = status["license_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["id"].as_str().unwrap().to_string(),
                k["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            (old_id, "retired".to_string()),
            (new_id, "current".to_string())
        ]
    );
    let agent_audit = std::fs::read_to_string(agent.dir.join("log/audit.log")).unwrap_or_default();
    assert!(agent_audit.contains("license.keys"), "{agent_audit}");
}
