//! Machine recovery after its TPM is cleared, against real server processes: the recovery
//! token from enrollment buys one new certificate for a new key (and the next token), the old
//! certificate stops working, refusals do not reveal which machines exist, one token wins one
//! race, and the machine's next rotation delivers a new secret to the new key — never the
//! pending one sealed to the old key. The token never appears in audit, log or admin output.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Db, TestServer};
use license_protocol::identity::MachineId;
use license_protocol::rotation::{
    parse_license_public_key, RotateSecretRequest, RotateSecretResponse,
};
use license_protocol::secret::{self, Secret};
use p256::pkcs8::DecodePrivateKey as _;
use serde_json::{json, Value};

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A fresh P-256 key and a CSR for it: (CSR PEM, key PEM).
fn fresh_key() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    (csr, key.serialize_pem())
}

async fn post_recover(server: &TestServer, body: &Value) -> (u16, Value) {
    let r = server
        .https_client()
        .post(format!("{}/api/public/recover", server.server.public_url))
        .json(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Recovers `machine_id` with `token` and a new key; asserts 200. Returns (answer, key PEM).
async fn recover_ok(server: &TestServer, machine_id: &str, token: &str) -> (Value, String) {
    let (csr, key) = fresh_key();
    let (status, body) = post_recover(
        server,
        &json!({"machine_id": machine_id, "recovery_token": token, "csr": csr}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    (body, key)
}

fn audit(server: &TestServer) -> Vec<Value> {
    server
        .admin_json(&["audit", "list", "--limit", "10000"])
        .as_array()
        .unwrap()
        .clone()
}

fn refusals(events: &[Value], cause: &str) -> usize {
    events
        .iter()
        .filter(|e| {
            e["action"] == "machine.recover"
                && e["outcome"] == "refused"
                && e["details"]["cause"] == cause
        })
        .count()
}

fn token_of(v: &Value) -> String {
    let t = v["recovery_token"].as_str().expect("a recovery token");
    assert!(t.starts_with("lrt_"), "{t}");
    t.to_string()
}

/// None of `tokens` appears in the audit trail, the server log, admin JSON about the machine,
/// or (SQLite) the database file, which holds only their hashes.
fn assert_tokens_never_shown(server: &TestServer, machine_id: &str, tokens: &[String]) {
    let haystacks = [
        serde_json::to_string(&audit(server)).unwrap(),
        std::fs::read_to_string(server.data_dir().join("serve.stderr")).unwrap(),
        server.admin_json(&["machine", "list"]).to_string(),
        server
            .admin_json(&["machine", "show", machine_id])
            .to_string(),
        server
            .admin_json(&["cert", "list", "--machine", machine_id])
            .to_string(),
        String::from_utf8_lossy(
            &std::fs::read(server.dir.path().join("license.db")).unwrap_or_default(),
        )
        .into_owned(),
    ];
    for token in tokens {
        for hay in &haystacks {
            assert!(!hay.contains(token.as_str()), "a recovery token leaked");
        }
    }
}

async fn bootstrap_returns_a_recovery_token_per_enrollment(db: Db) {
    let server = TestServer::start(db);
    let client = server.new_client("Tokens");
    // CSR mode.
    let (first, first_key) = server.enroll_http(&server.new_token(&client), "HW-1").await;
    let first_token = token_of(&first);
    let machine = first["machine_id"].as_str().unwrap().to_string();
    // Server-key mode.
    let r = server
        .https_client()
        .post(format!("{}/api/public/bootstrap", server.server.public_url))
        .json(&json!({"token": server.new_token(&client), "hostname": "seed", "hardware_id": "HW-2", "arch": "amd64"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seed: Value = r.json().await.unwrap();
    let seed_token = token_of(&seed);
    // Re-enrollment mints a new token and voids the previous one.
    let (status, again, _) = server
        .bootstrap_http(&server.new_token(&client), "HW-1", Some(&first_key))
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["machine_id"], machine.as_str());
    let again_token = token_of(&again);
    assert_ne!(again_token, first_token);
    let (csr, _) = fresh_key();
    let (status, body) = post_recover(
        &server,
        &json!({"machine_id": machine, "recovery_token": first_token, "csr": csr}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("recovery_refused"))
    );
    recover_ok(&server, &machine, &again_token).await;
    assert_tokens_never_shown(&server, &machine, &[first_token, seed_token, again_token]);
}
on_both_databases!(bootstrap_returns_a_recovery_token_per_enrollment);

async fn recover_with_a_new_key(db: Db) {
    let server = TestServer::start(db);
    let (client, enrolled, old_key) = server.enrolled_machine("Recover", "TILL-1").await;
    let machine = enrolled["machine_id"].as_str().unwrap().to_string();
    let old_cert = enrolled["certificate"].as_str().unwrap().to_string();
    let token = token_of(&enrolled);

    let (answer, new_key) = recover_ok(&server, &machine, &token).await;
    assert_eq!(answer["machine_id"], machine.as_str());
    assert_eq!(answer["client_id"], client.as_str());
    assert_eq!(answer["ca_cert"].as_str().unwrap(), server.ca_pem());
    let next_token = token_of(&answer);
    assert_ne!(next_token, token);
    let new_cert = answer["certificate"].as_str().unwrap().to_string();

    // The new certificate works; the old one is superseded.
    let url = &server.server.agent_url;
    let (status, body) = server.secret_status(url, &new_cert, &new_key).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["machine_id"], machine.as_str());
    assert_eq!(body["rotation_requested"], true);
    let (status, body) = server.secret_status(url, &old_cert, &old_key).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("certificate_superseded"))
    );
    let shown = server.admin_json(&["machine", "show", &machine]);
    assert_eq!(shown["certificate_serial"], answer["serial"]);
    assert!(shown["recovered_at"].is_string(), "{shown}");
    let events = audit(&server);
    let recovered = events
        .iter()
        .find(|e| e["action"] == "machine.recover" && e["outcome"] == "success")
        .expect("machine.recover audited");
    assert_eq!(recovered["target"], machine.as_str());
    assert_eq!(recovered["details"]["serial"], answer["serial"]);
    assert_eq!(recovered["details"]["superseded"], 1);

    // Single use: the spent token is refused, the new one works once.
    let (csr, _) = fresh_key();
    let (status, body) = post_recover(
        &server,
        &json!({"machine_id": machine, "recovery_token": token, "csr": csr}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("recovery_refused"))
    );
    let (again, _) = recover_ok(&server, &machine, &next_token).await;
    let (csr, _) = fresh_key();
    let (status, _) = post_recover(
        &server,
        &json!({"machine_id": machine, "recovery_token": next_token, "csr": csr}),
    )
    .await;
    assert_eq!(status, 401);
    let (status, body) = server.secret_status(url, &new_cert, &new_key).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("certificate_superseded"))
    );
    assert_eq!(refusals(&audit(&server), "token_mismatch"), 2);
    assert_tokens_never_shown(&server, &machine, &[token, next_token, token_of(&again)]);
}
on_both_databases!(recover_with_a_new_key);

async fn refusals_reveal_nothing(db: Db) {
    let server = TestServer::start(db);
    let (_, enrolled, _) = server.enrolled_machine("Refusals", "TILL-1").await;
    let machine = enrolled["machine_id"].as_str().unwrap().to_string();
    let token = token_of(&enrolled);
    let (csr, _) = fresh_key();

    // Wrong token and unknown machine: the same status, code and message.
    let (s1, wrong) = post_recover(
        &server,
        &json!({"machine_id": machine, "recovery_token": "lrt_wrong", "csr": csr}),
    )
    .await;
    let (s2, unknown) = post_recover(
        &server,
        &json!({"machine_id": MachineId::new_random().to_string(), "recovery_token": token, "csr": csr}),
    )
    .await;
    assert_eq!((s1, s2), (401, 401));
    assert_eq!(wrong["error"], "recovery_refused");
    assert_eq!(wrong, unknown);

    // A bad CSR is refused before the token is touched; malformed requests likewise.
    let (status, body) = post_recover(
        &server,
        &json!({"machine_id": machine, "recovery_token": token, "csr": "not a csr"}),
    )
    .await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_csr")));
    let (status, body) = post_recover(
        &server,
        &json!({"machine_id": "not-a-uuid", "recovery_token": token, "csr": csr}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (422, Some("invalid_request"))
    );

    // Revoked: 403 for the holder of the token only; the token survives the refusal.
    server.admin_json(&["machine", "revoke", &machine]);
    let (status, body) = post_recover(
        &server,
        &json!({"machine_id": machine, "recovery_token": token, "csr": csr}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("machine_revoked"))
    );
    let (status, body) = post_recover(
        &server,
        &json!({"machine_id": machine, "recovery_token": "lrt_wrong", "csr": csr}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("recovery_refused"))
    );
    server.admin_json(&["machine", "restore", &machine]);
    recover_ok(&server, &machine, &token).await;

    let events = audit(&server);
    assert_eq!(refusals(&events, "token_mismatch"), 2);
    assert_eq!(refusals(&events, "unknown_machine"), 1);
    let reasons: Vec<&Value> = events
        .iter()
        .filter(|e| e["action"] == "machine.recover" && e["outcome"] == "refused")
        .map(|e| &e["details"]["reason"])
        .collect();
    for code in ["recovery_refused", "invalid_csr", "machine_revoked"] {
        assert!(reasons.iter().any(|r| *r == code), "{code}: {reasons:?}");
    }
    assert_tokens_never_shown(&server, &machine, &[token]);
}
on_both_databases!(refusals_reveal_nothing);

async fn concurrent_recovers_with_one_token(db: Db) {
    let server = TestServer::start(db);
    let (_, enrolled, _) = server.enrolled_machine("Race", "TILL-1").await;
    let machine = enrolled["machine_id"].as_str().unwrap().to_string();
    let mut token = token_of(&enrolled);
    for round in 0..3 {
        let bodies: Vec<Value> = (0..6)
            .map(|_| json!({"machine_id": machine, "recovery_token": token, "csr": fresh_key().0}))
            .collect();
        let results =
            futures_util::future::join_all(bodies.iter().map(|b| post_recover(&server, b))).await;
        let winners: Vec<&Value> = results
            .iter()
            .filter(|(s, _)| *s == 200)
            .map(|(_, b)| b)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        assert!(
            results
                .iter()
                .all(|(s, b)| *s == 200 || (*s == 401 && b["error"] == "recovery_refused")),
            "{results:?}"
        );
        token = token_of(winners[0]);
    }
    let certs = server.admin_json(&["cert", "list", "--machine", &machine]);
    let active = certs
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["effective_state"] == "active")
        .count();
    assert_eq!(active, 1, "{certs}");
    assert_eq!(certs.as_array().unwrap().len(), 4);
}
on_both_databases!(concurrent_recovers_with_one_token);

/// The test machine's side of a rotation, with one key.
struct Keyed {
    http: reqwest::Client,
    url: String,
    id: MachineId,
    secret_key: p256::SecretKey,
    license_key: license_protocol::license_keys::TrustedKeys,
}

impl Keyed {
    fn new(server: &TestServer, answer: &Value, key_pem: &str, license_key: &str) -> Self {
        Self {
            http: server.mtls_client(answer["certificate"].as_str().unwrap(), key_pem),
            url: server.server.agent_url.clone(),
            id: answer["machine_id"].as_str().unwrap().parse().unwrap(),
            secret_key: p256::SecretKey::from_pkcs8_pem(key_pem).unwrap(),
            license_key: license_protocol::license_keys::TrustedKeys::pinned(
                parse_license_public_key(license_key).unwrap(),
            ),
        }
    }

    async fn post(&self, path: &str, body: &impl serde::Serialize) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn rotate_raw(&self, current: u64) -> (u16, Value) {
        let signing = p256::ecdsa::SigningKey::from(&self.secret_key);
        let req = RotateSecretRequest::new_signed(&signing, self.id, current, now());
        self.post("/api/v1/rotate-secret", &req).await
    }

    /// Rotates from `current`; returns the version and the opened secret.
    async fn rotate(&self, current: u64) -> (u64, Secret) {
        let (status, body) = self.rotate_raw(current).await;
        assert_eq!(status, 200, "{body}");
        let resp: RotateSecretResponse = serde_json::from_value(body).unwrap();
        let blob = resp.verify(&self.license_key, &self.id).unwrap();
        let secret = secret::open(
            &self.secret_key,
            &self.id,
            resp.secret_version,
            &resp.dates(),
            &blob,
        )
        .unwrap();
        (resp.secret_version, secret)
    }

    async fn ack(&self, version: u64) -> Value {
        let (status, body) = self
            .post(
                "/api/v1/rotate-secret/ack",
                &json!({"secret_version": version}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn status(&self) -> Value {
        let r = self
            .http
            .get(format!("{}/api/v1/secret-status", self.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }
}

async fn rotation_after_recovery_reaches_the_new_key(db: Db) {
    let server = TestServer::start(db);
    let (_, enrolled, old_key) = server.enrolled_machine("Secrets", "TILL-1").await;
    let machine = enrolled["machine_id"].as_str().unwrap().to_string();
    let license_key = enrolled["license_public_key"].as_str().unwrap();
    let old = Keyed::new(&server, &enrolled, &old_key, license_key);
    // Version 1 acknowledged; version 2 delivered to the old key but never acknowledged
    // (the TPM was cleared in between).
    let (v1, _) = old.rotate(0).await;
    old.ack(v1).await;
    let (v2, pending_secret) = old.rotate(v1).await;
    assert_eq!((v1, v2), (1, 2));

    let (answer, new_key) = recover_ok(&server, &machine, &token_of(&enrolled)).await;
    let new = Keyed::new(&server, &answer, &new_key, license_key);
    let status = new.status().await;
    assert_eq!(status["rotation_requested"], true, "{status}");
    assert_eq!(status["current_version"], 1);
    assert_eq!(status["pending_version"], Value::Null);
    assert_eq!(status["invalidated_versions"], json!([2]));
    let events = audit(&server);
    let recovered = events
        .iter()
        .find(|e| e["action"] == "machine.recover" && e["outcome"] == "success")
        .unwrap();
    assert_eq!(
        recovered["details"]["invalidated_pending_versions"],
        json!([2])
    );

    // The old key can no longer ask (its certificate is superseded).
    let (status, body) = old.rotate_raw(v1).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("certificate_superseded"))
    );

    // The agent lost its secrets with the TPM: it rotates from nothing and gets a new
    // version, never the one sealed to the old key, and opens it with the new key.
    let (v3, fresh) = new.rotate(0).await;
    assert_eq!(v3, 3);
    assert_ne!(fresh.expose(), pending_secret.expose());
    let (again, same) = new.rotate(0).await;
    assert_eq!((again, same.expose()), (v3, fresh.expose()));
    let status = new.ack(v3).await;
    assert_eq!(status["current_version"], 3);
    assert_eq!(status["rotation_requested"], false);
    let secrets = server.admin_json(&["machine", "secrets", &machine]);
    let states: Vec<&str> = secrets
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["grace", "invalidated", "active"]);
}
on_both_databases!(rotation_after_recovery_reaches_the_new_key);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_shares_the_bootstrap_rate_limit() {
    let server = TestServer::start_with(Db::Sqlite, &["--bootstrap-rate-per-minute", "3"]);
    let (_, enrolled, _) = server.enrolled_machine("Limited", "TILL-1").await;
    let machine = enrolled["machine_id"].as_str().unwrap().to_string();
    let body = json!({"machine_id": machine, "recovery_token": "lrt_guess", "csr": fresh_key().0});
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(post_recover(&server, &body).await);
    }
    // One bootstrap and two guesses use the quota of three; the third guess is refused.
    let codes: Vec<u16> = statuses.iter().map(|(s, _)| *s).collect();
    assert_eq!(codes, [401, 401, 429], "{statuses:?}");
    assert_eq!(statuses[2].1["error"], "rate_limited");
}
