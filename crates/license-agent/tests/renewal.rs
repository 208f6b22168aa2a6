//! Machine certificates renew themselves (issue "the fleet lives for ten years"): real server
//! and agent processes, certificates that live 60 s (`certificate_validity_secs`), and real
//! clock jumps with libfaketime where waiting would take days.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::tpm_support::Swtpm;
use common::{bin, faketime, wait_until, Agent, Server};

const WAIT: Duration = Duration::from_secs(90);

/// Certificates of 60 s; secrets that outlast the clock jumps below.
fn server(root: &std::path::Path) -> Server {
    Server::start_with(
        root,
        30 * 86_400,
        7 * 86_400,
        "certificate_validity_secs = 60",
    )
}

fn env<'a>(pairs: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    pairs.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

fn cert(agent: &Agent) -> String {
    std::fs::read_to_string(agent.dir.join("client.pem")).unwrap()
}

fn key(agent: &Agent) -> String {
    std::fs::read_to_string(agent.dir.join("client.key")).unwrap()
}

/// `license-agent server-status` with the identity on disk: the server accepts it.
fn identity_works(agent: &Agent, env: &[(&str, &str)]) -> bool {
    let out = Command::new(bin("license-agent"))
        .args(["server-status", "--json", "--config"])
        .arg(&agent.config)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!("server-status: {}", String::from_utf8_lossy(&out.stderr));
    }
    out.status.success()
}

fn audit(agent: &Agent) -> String {
    std::fs::read_to_string(agent.dir.join("log/audit.log")).unwrap_or_default()
}

/// The agent's audit entries for `event`, parsed.
fn events(agent: &Agent, event: &str) -> Vec<serde_json::Value> {
    audit(agent)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == event)
        .collect()
}

fn server_audit(server: &Server) -> String {
    server
        .admin(&["audit", "list", "--limit", "1000"])
        .to_string()
}

#[test]
fn the_daemon_renews_its_certificate_at_two_thirds_and_keeps_validating() {
    let root = tempfile::tempdir().unwrap();
    let server = server(root.path());
    let mut agent = Agent::enroll(&server, root.path(), "renews", 3_600, |_| {});
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    let (first_cert, first_key) = (cert(&agent), key(&agent));
    agent.start(&[]);
    wait_until("a first token", WAIT, || agent.token(&license).is_some());
    let token = agent.token(&license).unwrap();
    assert!(agent.validate(&token).valid);
    // The metrics file is rewritten at the end of the round that fetched the token.
    let mut expiry = None;
    wait_until("the certificate expiry metric", WAIT, || {
        expiry = agent.metric("license_agent_certificate_expiry_seconds");
        expiry.is_some()
    });
    let expiry = expiry.unwrap();
    assert!((0..=60).contains(&expiry), "{expiry}");

    // 2/3 of 60 s, less the machine's jitter: between 34 and 40 s after issuance.
    wait_until("the certificate to be renewed", WAIT, || {
        cert(&agent) != first_cert
    });
    assert_ne!(key(&agent), first_key, "a fresh key on the file store");
    assert!(!agent.dir.join("client.key.next").exists());
    assert!(identity_works(&agent, &[]));
    wait_until("a second renewal", WAIT, || {
        events(&agent, "certificate.renew")
            .iter()
            .filter(|e| e["outcome"] == "success")
            .count()
            >= 2
    });
    assert!(agent.validate(&token).valid, "validations never noticed");
    assert!(server_audit(&server).contains("certificate.renew"));
    assert_eq!(agent.stop().code(), Some(0));
}

#[test]
fn a_crash_at_any_step_of_a_renewal_leaves_a_working_identity() {
    let root = tempfile::tempdir().unwrap();
    let server = server(root.path());
    let mut agent = Agent::enroll(&server, root.path(), "crashes", 3_600, |_| {});
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    // 50 s ahead, every certificate just issued (60 s) is due for renewal at once.
    let ahead = faketime("+50s");
    for step in [
        "renew_after_key",
        "renew_after_answer",
        "renew_after_cert",
        "renew_after_key_promoted",
    ] {
        let before = cert(&agent);
        let mut crash = env(&ahead);
        crash.push(("LICENSE_AGENT_TEST_CRASH_AT", step));
        let status = agent.run_until_exit(&crash, WAIT);
        assert!(!status.success(), "{step}: the agent should have aborted");
        // Restarted on the real clock: nothing is due but what the crash left half done.
        let restarted = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        agent.start(&[]);
        wait_until(&format!("{step}: the renewal to complete"), WAIT, || {
            cert(&agent) != before
                && !agent.dir.join("client.pem.next").exists()
                && !agent.dir.join("client.key.next").exists()
        });
        wait_until(&format!("{step}: a token"), WAIT, || {
            agent.token(&license).is_some()
        });
        assert!(
            agent.validate(&agent.token(&license).unwrap()).valid,
            "{step}"
        );
        wait_until(&format!("{step}: a round since the restart"), WAIT, || {
            agent.state()["server_time"]
                .as_i64()
                .is_some_and(|t| t >= restarted)
        });
        // The restarted agent's clock is floored by what its audit log saw (50 s ahead), so its
        // 60 s certificates are due again at every round: a renewal may be in flight whenever
        // the identity on disk is read (read again until the server accepts it), and the stop
        // below may cut one off after the server answered, which the next start recovers from
        // (the server renews from the certificate just superseded: the `renew_after_answer`
        // step).
        wait_until_identity_works(&agent, step, &server);
        assert_eq!(agent.stop().code(), Some(0), "{step}");
    }
    // After the last stop, whatever it cut off: the agent comes back with a working identity.
    agent.start(&[]);
    wait_until_identity_works(&agent, "the last restart", &server);
    assert_eq!(agent.stop().code(), Some(0));
}

/// Waits until the server accepts the identity on disk of the running `agent`.
fn wait_until_identity_works(agent: &Agent, step: &str, server: &Server) {
    let deadline = std::time::Instant::now() + WAIT;
    while !identity_works(agent, &[]) {
        assert!(
            std::time::Instant::now() < deadline,
            "{step}: the identity on disk was never accepted\n{}\n{}",
            agent.log(),
            server_audit(server)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_till_off_past_its_certificates_expiry_comes_back_by_itself_unless_revoked() {
    let root = tempfile::tempdir().unwrap();
    let mut server = server(root.path());
    let mut till = Agent::enroll(&server, root.path(), "storeroom", 3_600, |_| {});
    let mut stolen = Agent::enroll(&server, root.path(), "stolen", 3_600, |_| {});
    let license = server.issue_license(&till.machine_id, "pos.sale", &[]);
    for agent in [&mut till, &mut stolen] {
        agent.start(&[]);
        wait_until("a first rotation", WAIT, || agent.newest_version() >= 1);
        assert_eq!(agent.stop().code(), Some(0));
    }
    server.admin(&["machine", "revoke", &stolen.machine_id]);

    // Three days later: both certificates expired long ago.
    let later = faketime("+3d");
    server.kill();
    server.resume_with_env(&env(&later));
    till.start(&env(&later));
    wait_until("the expired certificate to be renewed", WAIT, || {
        events(&till, "certificate.renew")
            .iter()
            .any(|e| e["outcome"] == "success" && e["details"]["was_expired"] == true)
    });
    assert!(identity_works(&till, &env(&later)));
    wait_until("a token under the renewed identity", WAIT, || {
        till.token(&license).is_some()
    });
    assert!(till.validate(&till.token(&license).unwrap()).valid);
    let renewals = server_audit(&server);
    assert!(renewals.contains("certificate.renew"), "{renewals}");

    // A revoked machine's expired certificate and key renew nothing.
    stolen.start(&env(&later));
    wait_until("the refused renewal to be alerted", WAIT, || {
        audit(&stolen).contains("alert.certificate_expired")
    });
    assert!(!identity_works(&stolen, &env(&later)));
    assert!(stolen.log().contains("expired on "), "{}", stolen.log());
}

#[test]
fn a_tpm_machine_renews_with_its_non_exportable_key() {
    let root = tempfile::tempdir().unwrap();
    let server = server(root.path());
    let swtpm = Swtpm::start(&root.path().join("tpm"));
    let tcti = swtpm.tcti();
    let mut agent = Agent::enroll_with(
        &server,
        root.path(),
        "tpm",
        3_600,
        &["--tpm", &tcti],
        |_| {},
    );
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    let (first_cert, tpm_key) = (cert(&agent), key(&agent));
    assert!(tpm_key.starts_with("lsa-tpm-key-v1"));
    // 50 s ahead, the 60 s certificate is due at once.
    agent.start(&env(&faketime("+50s")));
    wait_until("the certificate to be renewed", WAIT, || {
        cert(&agent) != first_cert
    });
    assert_eq!(key(&agent), tpm_key, "the key stays in the TPM");
    assert!(!agent.dir.join("client.key.next").exists());
    wait_until("a token under the renewed identity", WAIT, || {
        agent.token(&license).is_some()
    });
    assert!(agent.validate(&agent.token(&license).unwrap()).valid);
    let renewal = events(&agent, "certificate.renew");
    assert!(
        renewal
            .iter()
            .any(|e| e["outcome"] == "success" && e["details"]["key"] == "kept"),
        "{renewal:?}"
    );
    // The TPM has few object slots and no resource manager here: one user at a time.
    assert_eq!(agent.stop().code(), Some(0));
    assert!(identity_works(&agent, &[]));
}
