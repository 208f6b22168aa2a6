//! Fleet alerts against real server processes (issue 11, item 2): machines not seen for a day
//! and certificates expiring without renewal reach the operator's webhook once, also with two
//! replicas checking the same database, and are resolved when the machine comes back and
//! renews. libfaketime runs the servers two days ahead.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{faketime, Db, ServerProcess, TestServer};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A webhook receiver: every JSON body POSTed to it, answered 204.
struct Hook {
    url: String,
    received: Arc<Mutex<Vec<Value>>>,
}

impl Hook {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let received = Arc::new(Mutex::new(Vec::new()));
        let bodies = received.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let bodies = bodies.clone();
                tokio::spawn(async move {
                    let mut data = Vec::new();
                    let mut buf = [0u8; 4096];
                    let body = loop {
                        let n = stream.read(&mut buf).await.unwrap();
                        assert!(n > 0, "request cut short");
                        data.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&data).to_string();
                        let Some(end) = text.find("\r\n\r\n") else {
                            continue;
                        };
                        let length: usize = text[..end]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse().unwrap())
                            })
                            .unwrap();
                        if data.len() >= end + 4 + length {
                            break data[end + 4..end + 4 + length].to_vec();
                        }
                    };
                    bodies
                        .lock()
                        .unwrap()
                        .push(serde_json::from_slice(&body).unwrap());
                    let answer = b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n";
                    stream.write_all(answer).await.unwrap();
                });
            }
        });
        Self { url, received }
    }

    /// Machine ids `field` (`raised` or `resolved`) lists in the `event` payloads so far, in
    /// order of arrival, repeats included.
    fn machines(&self, event: &str, field: &str) -> Vec<String> {
        let received = self.received.lock().unwrap();
        received
            .iter()
            .filter(|p| p["event"] == event)
            .flat_map(|p| p[field].as_array().unwrap().clone())
            .map(|id| id.as_str().unwrap().to_string())
            .collect()
    }

    async fn wait_for(&self, event: &str, field: &str, machines: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let seen = self.machines(event, field);
            if machines.iter().all(|m| seen.iter().any(|s| s == m)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{event} {field} {machines:?} never arrived: {:?}",
                self.received.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn webhook_hears_of_unseen_machines_and_unrenewed_certificates_once(db: Db) {
    let hook = Hook::start().await;
    // Certificates living three days, an alert two days before expiry, a check every second.
    let config = format!(
        "certificate_validity_secs = 259200\ncertificate_expiry_alert_days = 2\n\
         fleet_check_interval_secs = 1\nfleet_webhook_url = \"{}\"",
        hook.url
    );
    let mut server = TestServer::start_configured(db, &config, &[], &[]);
    let (_, a, _) = server.enrolled_machine("Shop A", "HW-FLEET-A").await;
    let (_, b, b_key) = server.enrolled_machine("Shop B", "HW-FLEET-B").await;
    let (a, b_cert) = (
        a["machine_id"].as_str().unwrap().to_string(),
        b["certificate"].as_str().unwrap().to_string(),
    );
    let b = b["machine_id"].as_str().unwrap().to_string();

    // Just enrolled, three days left on each certificate: nothing to report.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        hook.received.lock().unwrap().is_empty(),
        "{:?}",
        hook.received.lock().unwrap()
    );

    // Two days later, on two replicas: neither machine was seen for a day, and each
    // certificate has a day left. Each is reported once per condition.
    let later = faketime("+2d");
    server.restart(&later);
    let replica = ServerProcess::spawn_env(&server.data_dir(), &[], &later);
    hook.wait_for("fleet.machine_unseen", "raised", &[&a, &b])
        .await;
    hook.wait_for("fleet.certificate_expiring", "raised", &[&a, &b])
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for event in ["fleet.machine_unseen", "fleet.certificate_expiring"] {
        let mut raised = hook.machines(event, "raised");
        raised.sort();
        let mut expected = vec![a.clone(), b.clone()];
        expected.sort();
        assert_eq!(raised, expected);
    }
    let payload = hook.received.lock().unwrap()[0].clone();
    assert_eq!(payload["source"], "license-server");
    assert!(payload["raised_count"].as_u64().unwrap() >= 1, "{payload}");

    // B comes back (a request on the agent listener) and renews its certificate: both its
    // alerts are resolved; A's stay raised.
    let url = server.server.agent_url.clone();
    assert_eq!(server.secret_status(&url, &b_cert, &b_key).await.0, 200);
    let new_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&new_key)
        .unwrap()
        .pem()
        .unwrap();
    let renewed = server
        .mtls_client(&b_cert, &b_key)
        .post(format!("{url}/api/v1/renew-certificate"))
        .json(&json!({ "csr": csr }))
        .send()
        .await
        .unwrap();
    assert_eq!(renewed.status(), 200);
    hook.wait_for("fleet.machine_unseen", "resolved", &[&b])
        .await;
    hook.wait_for("fleet.certificate_expiring", "resolved", &[&b])
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for event in ["fleet.machine_unseen", "fleet.certificate_expiring"] {
        assert_eq!(hook.machines(event, "resolved"), vec![b.clone()]);
    }

    // The same changes are in the server's audit trail.
    let audit = server.admin_json(&["audit", "list", "--limit", "10000"]);
    let fleet: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "fleet.machine_unseen")
        .collect();
    assert!(
        fleet.iter().any(|e| e["details"]["resolved"] == json!([b])),
        "{fleet:?}"
    );
    drop(replica);
}
on_both_databases!(webhook_hears_of_unseen_machines_and_unrenewed_certificates_once);
