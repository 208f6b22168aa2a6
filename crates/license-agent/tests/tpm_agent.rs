//! The agent on a TPM (swtpm per test): machine key made and kept in the TPM (CSR, mTLS
//! handshakes and secret decryption all go through it), secrets sealed by the TPM, the TPM
//! clock behind the rollback guard, fallback when the TPM stops answering, and a tampered
//! sealed blob refused.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::tpm_support::Swtpm;
use common::{reason, wait_until, Agent, Server};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

fn wait_token(agent: &Agent, license: &str, after: Option<&str>) -> String {
    let mut token = None;
    wait_until(&format!("a token for {license}"), WAIT, || {
        token = agent.token(license).filter(|t| Some(t.as_str()) != after);
        token.is_some()
    });
    token.unwrap()
}

fn tpm_agent(server: &Server, root: &std::path::Path, swtpm: &Swtpm) -> Agent {
    let tcti = swtpm.tcti();
    let agent = Agent::enroll_with(server, root, "pos1", 3600, &["--tpm", &tcti], |_| {});
    let key_file = std::fs::read_to_string(agent.dir.join("client.key")).unwrap();
    assert!(
        key_file.starts_with("lsa-tpm-key-v1"),
        "the machine key is a TPM blob, not a private key"
    );
    assert!(!key_file.contains("PRIVATE KEY"));
    agent
}

#[test]
fn agent_on_tpm_enrolls_rotates_and_validates() {
    let root = tempfile::tempdir().unwrap();
    let swtpm = Swtpm::start(&root.path().join("tpm"));
    let server = Server::start(root.path(), 3600, 3600);
    let mut agent = tpm_agent(&server, root.path(), &swtpm);
    let certs = server.admin(&["cert", "list", "--machine", &agent.machine_id]);
    assert_eq!(
        certs[0]["key_origin"], "csr",
        "the CSR came from the TPM key"
    );
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    agent.start(&[]);

    // mTLS signed by the TPM, the secret decrypted by the TPM and sealed in it.
    let first = wait_token(&agent, &license, None);
    assert!(agent.validate(&first).valid, "{}", agent.log());
    let status = agent.status();
    assert_eq!(
        (status["store"].clone(), status["tpm_available"].clone()),
        (json!("tpm"), json!(true))
    );
    assert!(agent.dir.join("state/secrets.tpm.json").exists());
    assert!(
        !agent.dir.join("state/secret.enc").exists(),
        "nothing in the file store while the TPM serves"
    );

    server.admin(&["machine", "rotate", &agent.machine_id]);
    let second = wait_token(&agent, &license, Some(&first));
    assert!(agent.validate(&second).valid && agent.validate(&first).valid);

    // After a restart the sealed secrets come back from the TPM.
    assert_eq!(agent.stop().code(), Some(0));
    agent.start(&[]);
    assert!(
        agent.validate(&first).valid && agent.validate(&second).valid,
        "{}",
        agent.log()
    );
    assert!(agent.log().contains("TPM ready"));
}

#[test]
fn stopping_the_tpm_falls_back_with_an_alert_and_validations_continue() {
    let root = tempfile::tempdir().unwrap();
    let swtpm = Swtpm::start(&root.path().join("tpm"));
    let server = Server::start(root.path(), 3600, 3600);
    let mut agent = tpm_agent(&server, root.path(), &swtpm);
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    agent.start(&[]);
    let token = wait_token(&agent, &license, None);
    assert!(agent.validate(&token).valid);
    wait_until("tpm_available 1", WAIT, || {
        agent.metric("license_agent_tpm_available") == Some(1)
    });

    swtpm.stop();
    wait_until("the fallback", WAIT, || agent.status()["store"] == "file");
    assert_eq!(agent.status()["tpm_available"], false);
    wait_until("tpm_available 0", WAIT, || {
        agent.metric("license_agent_tpm_available") == Some(0)
    });
    assert!(
        agent.log().contains("ALERT: the TPM stopped answering"),
        "{}",
        agent.log()
    );
    assert!(agent
        .log()
        .contains("falling back to the encrypted file store"));
    assert!(
        agent.dir.join("state/secret.enc").exists(),
        "secrets moved to the file store"
    );
    assert!(
        agent.validate(&token).valid,
        "validations keep working without the TPM"
    );
}

#[test]
fn tampered_sealed_blob_is_refused_at_start() {
    let root = tempfile::tempdir().unwrap();
    let swtpm = Swtpm::start(&root.path().join("tpm"));
    let server = Server::start(root.path(), 3600, 3600);
    let mut agent = tpm_agent(&server, root.path(), &swtpm);
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    agent.start(&[]);
    wait_token(&agent, &license, None);
    agent.stop();

    // Push a secret's grace date forward in the clear metadata: the sealed copy disagrees.
    let path = agent.dir.join("state/secrets.tpm.json");
    let mut store: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    store["secrets"][0]["grace_until"] = json!(4_000_000_000i64);
    std::fs::write(&path, serde_json::to_vec(&store).unwrap()).unwrap();
    let status = agent.start_refused();
    assert!(!status.success());
    assert!(
        agent
            .log()
            .contains("metadata differs from the sealed copy"),
        "{}",
        agent.log()
    );
}

#[test]
fn the_tpm_clock_keeps_expiry_from_moving_back() {
    let root = tempfile::tempdir().unwrap();
    let swtpm = Swtpm::start(&root.path().join("tpm"));
    let mut server = Server::start(root.path(), 86_400, 86_400);
    let mut agent = tpm_agent(&server, root.path(), &swtpm);
    let license = server.issue_license(&agent.machine_id, "pos.sale", &["--expires-in", "2h"]);
    agent.start(&[]);
    let token = wait_token(&agent, &license, None);
    wait_until("a TPM clock reading", WAIT, || {
        !agent.state()["tpm_clock"].is_null()
    });
    agent.stop();

    // The system clock has been set back three hours since the last TPM reading: that reading
    // was taken at a wall time three hours later than what the system says now. The persisted
    // high-water mark is left alone, and the till is offline (the server's time would settle
    // it otherwise): only the TPM's clock can catch this.
    server.kill();
    let state_path = agent.dir.join("state/state.json");
    let mut state: Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    let reading = state["tpm_clock"].clone();
    let (reset, clock_ms, wall) = (
        reading[0].clone(),
        reading[1].clone(),
        reading[2].as_i64().unwrap(),
    );
    state["tpm_clock"] = json!([reset, clock_ms, wall + 3 * 3600]);
    std::fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();
    agent.start(&[]);
    wait_until("expiry judged by the TPM clock", WAIT, || {
        reason(&agent.validate(&token)).as_deref() == Some("expired")
    });
    assert!(agent
        .log()
        .contains("the TPM clock is ahead of the system clock"));
}

#[test]
fn a_cleared_tpm_is_recovered_through_the_server() {
    let root = tempfile::tempdir().unwrap();
    let old_tpm = Swtpm::start(&root.path().join("tpm-old"));
    let server = Server::start(root.path(), 3600, 3600);
    let mut agent = tpm_agent(&server, root.path(), &old_tpm);
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    agent.start(&[]);
    let before = wait_token(&agent, &license, None);
    assert!(agent.validate(&before).valid);
    agent.stop();
    let old_cert = std::fs::read_to_string(agent.dir.join("client.pem")).unwrap();
    let old_key = std::fs::read_to_string(agent.dir.join("client.key")).unwrap();
    let old_token = std::fs::read_to_string(agent.dir.join("recovery.token")).unwrap();
    old_tpm.stop();

    // The machine now has a cleared TPM (a freshly manufactured one at the same place).
    let new_tpm = Swtpm::start(&root.path().join("tpm-new"));
    let text = std::fs::read_to_string(&agent.config).unwrap();
    let tcti_line = text
        .lines()
        .find(|l| l.starts_with("tcti"))
        .unwrap()
        .to_string();
    std::fs::write(
        &agent.config,
        text.replace(&tcti_line, &format!("tcti = \"{}\"", new_tpm.tcti())),
    )
    .unwrap();

    // No operator: the agent notices, re-keys through the server, and serves again.
    agent.start(&[]);
    assert!(
        agent.log().contains("recovering through the server"),
        "{}",
        agent.log()
    );
    assert!(agent.log().contains("recovered through the server"));
    let after = wait_token(&agent, &license, Some(&before));
    assert!(agent.validate(&after).valid, "{}", agent.log());
    assert_ne!(
        std::fs::read_to_string(agent.dir.join("client.pem")).unwrap(),
        old_cert
    );
    assert_ne!(
        std::fs::read_to_string(agent.dir.join("client.key")).unwrap(),
        old_key
    );
    assert_ne!(
        std::fs::read_to_string(agent.dir.join("recovery.token")).unwrap(),
        old_token,
        "the token is single use"
    );
    let audit = server.admin(&["audit", "list", "--limit", "1000"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "machine.recover" && e["outcome"] == "success"),
        "the server audits the recovery"
    );
    assert!(
        !audit.to_string().contains(old_token.trim()),
        "recovery tokens never reach the audit trail"
    );
}
