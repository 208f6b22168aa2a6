//! The server's TLS key and its CA roll over with no till touched (issue "the fleet lives for
//! ten years", item 4): real server (SQLite) and agent daemons, `admin keys rotate-tls` /
//! `switch-tls` / `rotate-ca` / `retire-ca`, serving processes restarted after each step as
//! the ceremony says, and a POS client validating throughout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{bin, wait_until, Agent, Server};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);

fn status(agent: &Agent) -> Value {
    agent.mgmt_status()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn pins(agent: &Agent) -> Vec<String> {
    strings(&status(agent)["trust"]["server_pins"])
}

fn retired_pins(agent: &Agent) -> Vec<String> {
    strings(&status(agent)["trust"]["retired_server_pins"])
}

fn trusted_cas(agent: &Agent) -> Vec<String> {
    status(agent)["trust"]["cas"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["subject"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `admin ARGS`, expected to be refused: its stderr.
fn admin_refused(server: &Server, args: &[&str]) -> String {
    let out = Command::new(bin("license-server"))
        .arg("admin")
        .arg("--data-dir")
        .arg(&server.dir)
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "admin {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The subject CN of the CA that issued the certificate in `pem_path`.
fn issuer_of(pem_path: &Path) -> String {
    let pem = std::fs::read_to_string(pem_path).unwrap();
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&parsed.contents).unwrap();
    cert.issuer().to_string()
}

fn subject_of(pem: &str) -> String {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&parsed.contents).unwrap();
    cert.subject().to_string()
}

/// The token for `license`, once the agent has one, validated.
fn validates(agent: &Agent, license: &str, step: &str) {
    let mut token = None;
    wait_until(&format!("{step}: a token"), WAIT, || {
        token = agent.token(license);
        token.is_some()
    });
    let v = agent.validate(&token.unwrap());
    assert!(v.valid, "{step}: {v:?}\n{}", agent.log());
}

/// Whether a round at or after `since` (Unix seconds) reached the server.
fn round_since(agent: &Agent, since: i64) -> bool {
    agent.state()["last_server_contact"]
        .as_i64()
        .is_some_and(|t| t >= since)
}

fn now() -> i64 {
    license_agent::platform::clock::system_now()
}

#[test]
fn the_tls_key_is_announced_switched_and_the_old_key_refused() {
    let root = tempfile::tempdir().unwrap();
    let mut server = Server::start(root.path(), 3600, 3600);
    let old_pin = server.pin.clone();
    let mut agent = Agent::enroll(&server, root.path(), "pos1", 3600, |_| {});
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    agent.start(&[]);
    validates(&agent, &license, "enrolled");
    wait_until("the enrollment trust", WAIT, || {
        pins(&agent) == [old_pin.clone()]
    });

    // Step 1: the next key is announced; agents accept either from then on.
    let staged = server.admin(&["keys", "rotate-tls"]);
    let next_pin = staged["next_pin"].as_str().unwrap().to_string();
    assert_eq!(staged["server_pin"], old_pin.as_str());
    assert_eq!(
        server.admin(&["keys", "status"])["server_tls"]["next_pin"],
        next_pin.as_str()
    );
    let refused = admin_refused(&server, &["keys", "rotate-tls"]);
    assert!(refused.contains("already announced"), "{refused}");
    // The running process pushes the change (the agent's cursor moves past it) but serves the
    // announcement only once restarted: the agent must still learn it after the restart,
    // though its cursor replays nothing.
    wait_until("the change pushed", WAIT, || {
        agent.log().contains("keys_changed")
    });
    server.kill();
    server.resume();
    assert_eq!(server.pin, old_pin, "still served until the switch");
    wait_until("the agent to accept the next key", WAIT, || {
        pins(&agent) == [old_pin.clone(), next_pin.clone()]
    });
    let trust_file: Value = serde_json::from_str(
        &std::fs::read_to_string(agent.dir.join("state/server-trust.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        strings(&trust_file["pins"]),
        [old_pin.clone(), next_pin.clone()]
    );

    // Keep the old key's files: a server with them plays the impostor later.
    let old_key = std::fs::read(server.dir.join("server.key")).unwrap();
    let old_cert = std::fs::read(server.dir.join("server.pem")).unwrap();

    // Step 2: the switch. The next start serves the new key.
    let switched = server.admin(&["keys", "switch-tls"]);
    assert_eq!(switched["server_pin"], next_pin.as_str());
    assert_eq!(
        strings(&switched["retired_pins"]),
        std::slice::from_ref(&old_pin)
    );
    server.kill();
    server.resume();
    assert_eq!(server.pin, next_pin);
    wait_until("the agent to retire the old key", WAIT, || {
        pins(&agent) == [next_pin.clone()] && retired_pins(&agent) == [old_pin.clone()]
    });
    let since = now();
    wait_until("a round with the new key", WAIT, || {
        round_since(&agent, since)
    });
    validates(&agent, &license, "after the switch");
    let audit = server
        .admin(&["audit", "list", "--limit", "1000"])
        .to_string();
    for action in ["keys.rotate_tls", "keys.switch_tls"] {
        assert!(audit.contains(action), "{action} audited: {audit}");
    }
    assert!(audit.contains(&next_pin), "{audit}");

    // The old key is refused from now on: the server comes back with it (its data directory
    // as before the switch, as an impostor holding the old key would be).
    server.kill();
    let files = ["server.key", "server.pem", "server-trust.json"];
    let new_files: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(server.dir.join(f)).unwrap())
        .collect();
    std::fs::write(server.dir.join("server.key"), &old_key).unwrap();
    std::fs::write(server.dir.join("server.pem"), &old_cert).unwrap();
    std::fs::remove_file(server.dir.join("server-trust.json")).unwrap();
    server.resume();
    assert_eq!(server.pin, old_pin);
    let deadline = std::time::Instant::now() + WAIT;
    while !agent.log().contains("does not match the pinned key") {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not refuse the old key:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // (Compared with the last contact as it stands, not with the clock: a round with the real
    // server may have ended within the second before the impostor came up.)
    let contact = agent.state()["last_server_contact"].clone();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        agent.state()["last_server_contact"],
        contact,
        "no round with the old key"
    );
    validates(&agent, &license, "while the impostor answers");

    // The real server back: the agent carries on by itself.
    server.kill();
    for (f, bytes) in files.iter().zip(&new_files) {
        std::fs::write(server.dir.join(f), bytes).unwrap();
    }
    server.resume();
    assert_eq!(server.pin, next_pin);
    let since = now();
    wait_until("a round with the real server", WAIT, || {
        round_since(&agent, since)
    });
    validates(&agent, &license, "back with the real server");
}

#[test]
fn the_ca_rolls_over_machines_move_at_renewal_and_the_old_ca_retires() {
    let root = tempfile::tempdir().unwrap();
    // Machine certificates of 60 s: agents renew within a minute.
    let mut server = Server::start_with(
        root.path(),
        30 * 86_400,
        7 * 86_400,
        "certificate_validity_secs = 60",
    );
    let pin = server.pin.clone();
    let old_ca = std::fs::read_to_string(server.dir.join("ca.pem")).unwrap();
    // This test counts rounds with the server: one a second even while the watch stream is
    // held (a held stream spaces them by watch_poll_interval otherwise).
    let every_second = |t: &mut toml::Table| {
        t["agent"]["watch_poll_interval"] = toml::Value::Integer(1);
    };
    let mut online = Agent::enroll(&server, root.path(), "online", 3600, every_second);
    let mut sleeper = Agent::enroll(&server, root.path(), "sleeper", 3600, every_second);
    let licenses: Vec<String> = [&online, &sleeper]
        .iter()
        .map(|a| server.issue_license(&a.machine_id, "pos.sale", &[]))
        .collect();
    online.start(&[]);
    sleeper.start(&[]);
    validates(&online, &licenses[0], "enrolled");
    validates(&sleeper, &licenses[1], "enrolled");
    // The sleeper is switched off before the rollover and hears nothing of it.
    assert_eq!(sleeper.stop().code(), Some(0));

    let rolled = server.admin(&["keys", "rotate-ca"]);
    assert_eq!(rolled["server_pin"], pin.as_str(), "the TLS key stays");
    assert!(rolled["previous_ca_serial"].is_string(), "{rolled}");
    let refused = admin_refused(&server, &["keys", "rotate-ca"]);
    assert!(refused.contains("retire it"), "{refused}");
    let new_ca = std::fs::read_to_string(server.dir.join("ca.pem")).unwrap();
    assert_ne!(new_ca, old_ca);
    let served = std::fs::read_to_string(server.dir.join("server.pem")).unwrap();
    assert_eq!(
        served.matches("BEGIN CERTIFICATE").count(),
        2,
        "the leaf, then the new CA cross-signed by the old"
    );
    server.kill();
    server.resume();
    assert_eq!(server.pin, pin);

    // The online till learns the new CA (cross-signed by the one it holds), keeps working,
    // and moves to it at its next renewal.
    wait_until("the online till to trust both CAs", WAIT, || {
        trusted_cas(&online).len() == 2
    });
    let status = server.admin(&["keys", "status"]);
    assert!(
        status["previous_ca"]["certificates_needing_it"].as_u64() >= Some(1),
        "{status}"
    );
    wait_until("the online till to renew under the new CA", WAIT, || {
        issuer_of(&online.dir.join("client.pem")) == subject_of(&new_ca)
    });
    validates(&online, &licenses[0], "renewed under the new CA");

    // Retiring the old CA is refused while the sleeper's certificate (old CA) can still renew.
    let refused = admin_refused(&server, &["keys", "retire-ca"]);
    assert!(refused.contains("can still renew"), "{refused}");

    // The sleeper comes back (its certificate from the old CA, only the old CA known): the
    // server's chain leads to the old CA through the cross-certificate, so it connects,
    // renews under the new CA and learns the new CA.
    sleeper.start(&[]);
    wait_until("the sleeper to renew under the new CA", WAIT, || {
        issuer_of(&sleeper.dir.join("client.pem")) == subject_of(&new_ca)
    });
    wait_until("the sleeper to trust both CAs", WAIT, || {
        trusted_cas(&sleeper).len() == 2
    });
    validates(&sleeper, &licenses[1], "the sleeper back");

    // Nothing needs the old CA any more: it retires, the server drops the cross-certificate,
    // and the tills drop the old CA.
    let retired = server.admin(&["keys", "retire-ca"]);
    assert_eq!(retired["retired_cas"], 1);
    assert!(retired["previous_ca_serial"].is_null());
    let served = std::fs::read_to_string(server.dir.join("server.pem")).unwrap();
    assert_eq!(served.matches("BEGIN CERTIFICATE").count(), 1);
    server.kill();
    server.resume();
    for (agent, license) in [(&online, &licenses[0]), (&sleeper, &licenses[1])] {
        wait_until("the till to drop the old CA", WAIT, || {
            trusted_cas(agent) == [subject_of(&new_ca)]
        });
        let since = now();
        wait_until("a round after the retirement", WAIT, || {
            round_since(agent, since)
        });
        validates(agent, license, "after the retirement");
    }
    let audit = server
        .admin(&["audit", "list", "--limit", "1000"])
        .to_string();
    for action in ["keys.rotate_ca", "keys.retire_ca"] {
        assert!(audit.contains(action), "{action} audited");
    }
}
