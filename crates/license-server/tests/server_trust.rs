//! The CA rollover against real server processes, on SQLite and PostgreSQL, with a second
//! replica on the same data directory: `admin keys rotate-ca` cross-signs a new CA, a machine
//! that trusts only the old CA still verifies the server, reads the signed announcement and
//! accepts the new CA, `retire-ca` is refused while its certificate can still renew, the
//! machine renews under the new CA, and after `retire-ca` its old certificate is refused.
//!
//! The machine side is a minimal agent written from the protocol crate (as in keys.rs).
#![allow(clippy::unwrap_used)]

mod common;

use common::{client_with, tls_config, Db, ServerProcess, TestServer};
use license_protocol::license_keys::TrustedKeys;
use license_protocol::server_trust::{AgentTrust, CaState, ServerTrust};
use serde_json::{json, Value};

/// The subject of the first certificate in `pem`, and the issuer of the one in `leaf`.
fn subject(pem: &str) -> String {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let (_, c) = x509_parser::parse_x509_certificate(&p.contents).unwrap();
    c.subject().to_string()
}

fn issuer(pem: &str) -> String {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let (_, c) = x509_parser::parse_x509_certificate(&p.contents).unwrap();
    c.issuer().to_string()
}

/// An mTLS client that trusts only `ca_pem` (the CA a machine was enrolled with).
fn machine_client(ca_pem: &str, cert: &str, key: &str) -> reqwest::Client {
    client_with(tls_config(ca_pem, Some((cert, key)), true))
}

async fn get(client: &reqwest::Client, url: &str, path: &str) -> Result<(u16, Value), String> {
    let r = client
        .get(format!("{url}{path}"))
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

async fn announcement(client: &reqwest::Client, url: &str) -> ServerTrust {
    let (status, body) = get(client, url, "/api/v1/server-trust").await.unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body).unwrap()
}

async fn ca_rollover(db: Db) {
    let mut server = TestServer::start(db);
    let mut replica = server.replica();
    let pin = server.pin();
    let old_ca = server.ca_pem();
    let (_client, answer, key) = server.enrolled_machine("Shop", "HW-CA-1").await;
    let cert = answer["certificate"].as_str().unwrap().to_string();
    let license_key = license_protocol::rotation::parse_license_public_key(
        answer["license_public_key"].as_str().unwrap(),
    )
    .unwrap();
    let license_keys = TrustedKeys::pinned(license_key);
    let mut trust = AgentTrust::enrolled(pin.parse().unwrap(), &old_ca).unwrap();

    let rolled = server.admin_json(&["keys", "rotate-ca"]);
    assert_eq!(rolled["server_pin"], pin.as_str());
    assert_eq!(rolled["certificates_needing_previous_ca"], 1);
    let new_ca = server.ca_pem();
    assert_ne!(subject(&new_ca), subject(&old_ca));
    // Every serving process picks the rollover up at its restart.
    server.restart(&[]);
    drop(replica);
    replica = server.replica();
    assert_eq!(server.pin(), pin);

    for url in [&server.server.agent_url, &replica.agent_url] {
        // The machine trusts only the old CA: the cross-certificate in the server's chain
        // leads there.
        let old_trusting = machine_client(&old_ca, &cert, &key);
        let (status, body) = get(&old_trusting, url, "/api/v1/secret-status")
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["server_trust"].as_str(),
            Some(announcement(&old_trusting, url).await.digest().as_str()),
            "the status announces the announcement's digest"
        );
        let offered = announcement(&old_trusting, url).await;
        let states: Vec<CaState> = offered.cas.iter().map(|c| c.state).collect();
        assert_eq!(states, [CaState::Current, CaState::Previous]);
        let mut learned = trust.clone();
        learned.accept(&offered, &license_keys).unwrap();
        assert_eq!(learned.cas().len(), 2);
    }
    let offered = announcement(&machine_client(&old_ca, &cert, &key), &replica.agent_url).await;
    trust.accept(&offered, &license_keys).unwrap();

    // Still needed by the machine's certificate: retirement is refused, and audited.
    let refused = server.admin(&["keys", "retire-ca"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("can still renew"));
    let status = server.admin_json(&["keys", "status"]);
    assert_eq!(
        status["previous_ca"]["certificates_needing_it"], 1,
        "{status}"
    );

    // The machine renews with a new key: its certificate comes from the new CA.
    let next_key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&next_key)
        .unwrap()
        .pem()
        .unwrap();
    let r = machine_client(&old_ca, &cert, &key)
        .post(format!("{}/api/v1/renew-certificate", replica.agent_url))
        .json(&json!({ "csr": csr }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let renewed: Value = r.json().await.unwrap();
    let new_cert = renewed["certificate"].as_str().unwrap().to_string();
    let new_key = next_key.serialize_pem();
    assert_eq!(issuer(&new_cert), subject(&new_ca));

    // Nothing needs the old CA now.
    let retired = server.admin_json(&["keys", "retire-ca"]);
    assert_eq!(retired["retired_cas"], 1);
    assert_eq!(retired["certificates_needing_previous_ca"], 0);
    server.restart(&[]);
    drop(replica);
    let replica: ServerProcess = server.replica();
    for url in [&server.server.agent_url, &replica.agent_url] {
        let client = machine_client(&new_ca, &new_cert, &new_key);
        let (status, body) = get(&client, url, "/api/v1/secret-status").await.unwrap();
        assert_eq!(status, 200, "{body}");
        let mut learned = trust.clone();
        learned
            .accept(&announcement(&client, url).await, &license_keys)
            .unwrap();
        assert_eq!(learned.cas().len(), 1, "the old CA dropped");
        // A certificate of the retired CA no longer passes the handshake (the old key is
        // kept by whoever stole it: the server refuses it all the same).
        let stale = machine_client(&new_ca, &cert, &key);
        match get(&stale, url, "/api/v1/secret-status").await {
            Err(_) => {}
            Ok((status, body)) => panic!("the retired CA's certificate got {status}: {body}"),
        }
    }
    let audit = server
        .admin_json(&["audit", "list", "--limit", "1000"])
        .to_string();
    for action in ["keys.rotate_ca", "keys.retire_ca"] {
        assert!(audit.contains(action), "{action} audited");
    }
    assert!(
        audit.contains("refused"),
        "the refused retirement is audited"
    );
}
on_both_databases!(ca_rollover);

/// `admin keys ARGS` killed at `point`: it must not exit successfully.
fn crashed(server: &TestServer, args: &[&str], point: &str) {
    let out = std::process::Command::new(common::SERVER)
        .arg("admin")
        .arg("--data-dir")
        .arg(server.data_dir())
        .args(args)
        .env("LICENSE_SERVER_TEST_CRASH_AT", point)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} at {point} was not killed");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("test crash at {point}")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TLS switch and a CA rollover killed at each step: the next start finishes the step, the
/// server serves the new key (or the chain under the new CA), and a machine enrolled before
/// verifies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollovers_killed_at_every_step_are_finished_by_the_next_start() {
    for point in [
        "rollover.journaled",
        "rollover.half_written",
        "rollover.files_written",
    ] {
        let mut server = TestServer::start(Db::Sqlite);
        let old_pin = server.pin();
        let old_ca = server.ca_pem();
        let (_client, answer, key) = server.enrolled_machine("Shop", "HW-CRASH").await;
        let cert = answer["certificate"].as_str().unwrap().to_string();

        let next_pin = server.admin_json(&["keys", "rotate-tls"])["next_pin"]
            .as_str()
            .unwrap()
            .to_string();
        crashed(&server, &["keys", "switch-tls"], point);
        server.restart(&[]);
        assert_eq!(
            server.pin(),
            next_pin,
            "{point}: the switch finished at start"
        );
        let client = machine_client(&old_ca, &cert, &key);
        let offered = announcement(&client, &server.server.agent_url).await;
        use license_protocol::server_trust::{AnnouncedPin, PinState};
        assert_eq!(
            offered.pins,
            [
                AnnouncedPin::new(next_pin.parse().unwrap(), PinState::Current),
                AnnouncedPin::new(old_pin.parse().unwrap(), PinState::Retired),
            ],
            "{point}"
        );

        crashed(&server, &["keys", "rotate-ca"], point);
        server.restart(&[]);
        let new_ca = server.ca_pem();
        assert_ne!(
            subject(&new_ca),
            subject(&old_ca),
            "{point}: the new CA is current"
        );
        for trusted in [&old_ca, &new_ca] {
            let client = machine_client(trusted, &cert, &key);
            let (status, body) = get(&client, &server.server.agent_url, "/api/v1/secret-status")
                .await
                .unwrap();
            assert_eq!(status, 200, "{point}: {body}");
        }
        let status = server.admin_json(&["keys", "status"]);
        assert!(
            status["previous_ca"]["serial"].is_string(),
            "{point}: {status}"
        );
        assert!(
            status["server_tls"]["next_pin"].is_null(),
            "{point}: {status}"
        );
    }
}
