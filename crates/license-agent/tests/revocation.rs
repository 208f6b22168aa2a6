//! A machine the server revoked fails closed (issue "hold against a hostile network", finding
//! 10): real server and agent daemons. With the default policy every validation answers
//! `machine_revoked` from the round that hears of it, also after a restart while the server is
//! away, and the machine is shown revoked in status and the metrics with an alert; a restore
//! lifts it at the next round. With `on_machine_revoked = "grace"` validations go on.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{reason, wait_until, Agent, Server};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn status(agent: &Agent) -> Value {
    agent.mgmt_status()
}

fn token(agent: &Agent, license: &str) -> String {
    let mut token = None;
    wait_until("a token", WAIT, || {
        token = agent.token(license);
        token.is_some()
    });
    token.unwrap()
}

fn audit(agent: &Agent) -> String {
    std::fs::read_to_string(agent.dir.join("log/audit.log")).unwrap_or_default()
}

#[test]
fn a_revoked_machine_fails_closed_until_restored() {
    let root = tempfile::tempdir().unwrap();
    let mut server = Server::start(root.path(), 3600, 3600);
    let mut strict = Agent::enroll(&server, root.path(), "strict", 3600, |_| {});
    let mut lenient = Agent::enroll(&server, root.path(), "lenient", 3600, |t| {
        t["agent"]["on_machine_revoked"] = toml::Value::String("grace".into());
    });
    let licenses: Vec<String> = [&strict, &lenient]
        .iter()
        .map(|a| server.issue_license(&a.machine_id, "pos.sale", &[]))
        .collect();
    strict.start(&[]);
    lenient.start(&[]);
    let tokens = [token(&strict, &licenses[0]), token(&lenient, &licenses[1])];
    assert!(strict.validate(&tokens[0]).valid);
    assert!(lenient.validate(&tokens[1]).valid);
    assert!(status(&strict)["machine_revoked_since"].is_null());
    assert_eq!(strict.metric("license_agent_machine_revoked"), Some(0));
    // The validation's audit record names the license, its secret version and the verdict,
    // never the token.
    let record: Value = audit(&strict)
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["event"] == "license.validate")
        .unwrap();
    assert_eq!(record["outcome"], "success", "{record}");
    assert_eq!(
        record["details"]["license_id"],
        licenses[0].as_str(),
        "{record}"
    );
    assert_eq!(
        record["details"]["secret_version"].as_u64(),
        Some(strict.newest_version()),
        "{record}"
    );
    assert!(!audit(&strict).contains(&tokens[0]));

    for agent in [&strict, &lenient] {
        server.admin(&["machine", "revoke", &agent.machine_id]);
    }
    wait_until("the strict till to fail closed", WAIT, || {
        reason(&strict.validate(&tokens[0])).as_deref() == Some("machine_revoked")
    });
    let refused: Value = audit(&strict)
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["event"] == "license.validate")
        .unwrap();
    assert_eq!(refused["outcome"], "refused", "{refused}");
    assert_eq!(refused["details"]["reason"], "machine_revoked", "{refused}");
    assert!(refused["details"]["secret_version"].is_u64(), "{refused}");
    wait_until("the lenient till to see the revocation", WAIT, || {
        status(&lenient)["machine_revoked_since"].is_string()
    });
    assert!(
        lenient.validate(&tokens[1]).valid,
        "grace: validations go on"
    );
    for agent in [&strict, &lenient] {
        assert!(status(agent)["machine_revoked_since"].is_string());
        wait_until("the metric", WAIT, || {
            agent.metric("license_agent_machine_revoked") == Some(1)
        });
        let log = audit(agent);
        assert_eq!(log.matches("\"alert.machine_revoked\"").count(), 1, "{log}");
        assert!(log.contains("machine.revoked"));
    }
    // Several rounds later: still one alert.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        audit(&strict).matches("\"alert.machine_revoked\"").count(),
        1
    );

    // Restarted while the server is away: still closed (kept in state.json).
    server.kill();
    assert_eq!(strict.stop().code(), Some(0));
    strict.start(&[]);
    assert_eq!(
        reason(&strict.validate(&tokens[0])).as_deref(),
        Some("machine_revoked")
    );

    // Restored: the next round lifts it.
    server.resume();
    server.admin(&["machine", "restore", &strict.machine_id]);
    wait_until("the strict till to validate again", WAIT, || {
        strict.validate(&tokens[0]).valid
    });
    assert!(status(&strict)["machine_revoked_since"].is_null());
    wait_until("the metric back to 0", WAIT, || {
        strict.metric("license_agent_machine_revoked") == Some(0)
    });
    assert!(audit(&strict).contains("machine.restored"));
}
