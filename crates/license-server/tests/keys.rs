//! The server's keys against real server processes: the online master key rollover
//! (`admin keys rotate-master`) with machines holding secrets and licenses, killed at every
//! step and run again, with two replicas on PostgreSQL; the license key rollover and
//! retirement (`admin keys rotate-license`, `retire-license`) with the replica copy ceremony;
//! and `admin keys status`.
//!
//! The machine side is a minimal agent written from the protocol crate (as in secrets.rs).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{Db, ServerProcess, TestServer, SERVER};
use license_protocol::agent_api::{MachineLicenses, ValidateLicenseResponse};
use license_protocol::identity::MachineId;
use license_protocol::license_keys::{KeyId, LicenseKeySet, TrustedKeys};
use license_protocol::rotation::{RotateSecretRequest, RotateSecretResponse};
use license_protocol::token;
use serde_json::{json, Value};

fn parse_rfc3339(v: &Value) -> i64 {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap()
        .unix_timestamp()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A minimal agent: its key, its certificate, and the agent URL it talks to.
struct Machine {
    answer: Value,
    key_pem: String,
    http: reqwest::Client,
    url: String,
    id: MachineId,
    signing: p256::ecdsa::SigningKey,
}

impl Machine {
    async fn enroll(server: &TestServer, client_id: &str, hardware_id: &str) -> Self {
        use p256::pkcs8::DecodePrivateKey as _;
        let (answer, key_pem) = server
            .enroll_http(&server.new_token(client_id), hardware_id)
            .await;
        let secret_key = p256::SecretKey::from_pkcs8_pem(&key_pem).unwrap();
        Self {
            http: server.mtls_client(answer["certificate"].as_str().unwrap(), &key_pem),
            url: server.server.agent_url.clone(),
            id: answer["machine_id"].as_str().unwrap().parse().unwrap(),
            signing: p256::ecdsa::SigningKey::from(&secret_key),
            answer,
            key_pem,
        }
    }

    /// The same machine talking to another replica.
    fn at(&self, agent_url: &str) -> Self {
        use p256::pkcs8::DecodePrivateKey as _;
        let secret_key = p256::SecretKey::from_pkcs8_pem(&self.key_pem).unwrap();
        Self {
            answer: self.answer.clone(),
            key_pem: self.key_pem.clone(),
            http: self.http.clone(),
            url: agent_url.to_string(),
            id: self.id,
            signing: p256::ecdsa::SigningKey::from(&secret_key),
        }
    }

    fn id(&self) -> String {
        self.id.to_string()
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

    /// Rotates from `current` and acknowledges the new version; returns it.
    async fn rotate_and_ack(&self, current: u64) -> u64 {
        let req = RotateSecretRequest::new_signed(&self.signing, self.id, current, now());
        let (status, body) = self.post("/api/v1/rotate-secret", &req).await;
        assert_eq!(status, 200, "{body}");
        let resp: RotateSecretResponse = serde_json::from_value(body).unwrap();
        let (status, body) = self
            .post(
                "/api/v1/rotate-secret/ack",
                &json!({"secret_version": resp.secret_version}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        resp.secret_version
    }

    /// Fetches the machine's license tokens (issued under its current secret).
    async fn licenses(&self) -> MachineLicenses {
        let r = self
            .http
            .get(format!("{}/api/v1/licenses", self.url))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(status, 200, "{body}");
        serde_json::from_value(body).unwrap()
    }

    async fn validate(&self, token: &str) -> ValidateLicenseResponse {
        let (status, body) = self
            .post("/api/v1/validate-license", &json!({"license_token": token}))
            .await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_value(body).unwrap()
    }

    /// `GET /api/v1/license-keys`.
    async fn license_keys(&self) -> LicenseKeySet {
        let r = self
            .http
            .get(format!("{}/api/v1/license-keys", self.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        r.json().await.unwrap()
    }

    /// The key set digest the secret status announces.
    async fn announced_digest(&self) -> String {
        let r = self
            .http
            .get(format!("{}/api/v1/secret-status", self.url))
            .send()
            .await
            .unwrap();
        let body: Value = r.json().await.unwrap();
        body["license_keys"].as_str().unwrap().to_string()
    }

    /// A token under its current secret: valid online.
    async fn token_validates(&self) -> String {
        let fetched = self.licenses().await;
        assert_eq!(fetched.tokens.len(), 1, "{fetched:?}");
        let token = fetched.tokens[0].token.clone();
        let verdict = self.validate(&token).await;
        assert!(verdict.valid, "{verdict:?}");
        token
    }
}

/// `count` machines of one client, each with two secret versions (v1 in grace, v2 active) and
/// one license.
async fn machines_with_secrets(server: &TestServer, count: usize) -> Vec<Machine> {
    let client = server.new_client("Acme Retail");
    let mut machines = Vec::new();
    for i in 0..count {
        let m = Machine::enroll(server, &client, &format!("TILL-{i}")).await;
        assert_eq!(m.rotate_and_ack(0).await, 1);
        assert_eq!(m.rotate_and_ack(1).await, 2);
        server.admin_json(&[
            "license",
            "issue",
            "--machine",
            &m.id(),
            "--features",
            "pos.sale",
        ]);
        machines.push(m);
    }
    machines
}

fn admin_in(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(SERVER)
        .arg("admin")
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn rotate_master(server: &TestServer, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut args = vec!["--json", "keys", "rotate-master"];
    args.extend_from_slice(extra);
    admin_in(&server.data_dir(), &args, env)
}

fn report_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "rotate-master: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn key_status(server: &TestServer) -> Value {
    server.admin_json(&["keys", "status"])
}

/// (state, rows) of master key `id` in `keys status`.
fn master_key(status: &Value, id: &str) -> (String, i64) {
    let k = status["master_keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id)
        .unwrap_or_else(|| panic!("no master key {id} in {status}"));
    (
        k["state"].as_str().unwrap().to_string(),
        k["rows"].as_i64().unwrap(),
    )
}

/// The ids in a data directory's key set file, and its raw text.
fn key_file(data_dir: &Path) -> (Vec<String>, String) {
    let text = std::fs::read_to_string(data_dir.join("master-keys.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let ids = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_string())
        .collect();
    (ids, text)
}

/// Every key's base64 in the key set file.
fn key_material(data_dir: &Path) -> Vec<String> {
    let (_, text) = key_file(data_dir);
    let v: Value = serde_json::from_str(&text).unwrap();
    v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key"].as_str().unwrap().to_string())
        .collect()
}

fn audit(server: &TestServer) -> Vec<Value> {
    server
        .admin_json(&["audit", "list", "--limit", "10000"])
        .as_array()
        .unwrap()
        .clone()
}

async fn rotate_master_reencrypts_every_secret_online(db: Db) {
    let server = TestServer::start(db);
    let machines = machines_with_secrets(&server, 3).await;
    let mut old_tokens = Vec::new();
    for m in &machines {
        old_tokens.push(m.token_validates().await);
    }
    let before = key_status(&server);
    assert_eq!(master_key(&before, "k1"), ("current".into(), 6));
    let k1_material = key_material(&server.data_dir());
    assert_eq!(k1_material.len(), 1);

    let out = rotate_master(&server, &["--batch-size", "4"], &[]);
    let report = report_of(&out);
    assert_eq!(report["new_key_id"], "k2");
    assert_eq!(report["old_key_ids"], json!(["k1"]));
    assert_eq!(report["reencrypted"], 6);
    assert_eq!(report["rows_under_new_key"], 6);
    assert_eq!(report["retired"], json!(["k1"]));
    assert_eq!(report["resumed"], false);
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(progress.contains("\"event\":\"batch\""), "{progress}");

    // No row under the old key; the old key is gone from the data directory.
    let after = key_status(&server);
    assert_eq!(master_key(&after, "k1"), ("retired".into(), 0));
    assert_eq!(master_key(&after, "k2"), ("current".into(), 6));
    assert_eq!(key_file(&server.data_dir()).0, ["k2"]);
    assert!(!server.data_dir().join("master.key").exists());
    let k2_material = key_material(&server.data_dir());

    // The running server reads the re-encrypted secrets: validation and token issuance go on,
    // and new versions are sealed under the new key.
    for (m, token) in machines.iter().zip(&old_tokens) {
        assert!(m.validate(token).await.valid);
        m.token_validates().await;
    }
    assert_eq!(machines[0].rotate_and_ack(2).await, 3);
    machines[0].token_validates().await;
    assert_eq!(
        master_key(&key_status(&server), "k2"),
        ("current".into(), 7)
    );

    // Audited, with ids and counts, never key bytes (nor in any output or log).
    let events = audit(&server);
    let done = events
        .iter()
        .find(|e| e["action"] == "keys.rotate_master" && e["details"]["phase"] == "completed")
        .expect("keys.rotate_master audited");
    assert_eq!(done["outcome"], "success");
    assert_eq!(done["details"]["old_key_ids"], json!(["k1"]));
    assert_eq!(done["details"]["new_key_id"], "k2");
    assert_eq!(done["details"]["reencrypted"], 6);
    assert!(events
        .iter()
        .any(|e| e["action"] == "keys.rotate_master" && e["details"]["phase"] == "staged"));
    let haystacks = [
        serde_json::to_string(&events).unwrap(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        progress.to_string(),
        std::fs::read_to_string(server.data_dir().join("serve.stderr")).unwrap(),
        after.to_string(),
    ];
    for material in k1_material.iter().chain(&k2_material) {
        for h in &haystacks {
            assert!(!h.contains(material.as_str()), "key material leaked");
        }
    }

    // Human output of a second rollover.
    let out = server.admin(&["keys", "rotate-master"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Staged master key k3"), "{text}");
    assert!(text.contains("k3 is current"), "{text}");
    assert!(text.contains("re-encrypted 7/7 secrets"), "{text}");
    assert!(text.contains("retired k2"), "{text}");
    for m in &machines {
        m.token_validates().await;
    }
}
on_both_databases!(rotate_master_reencrypts_every_secret_online);

async fn rotate_master_killed_at_each_step_finishes_when_run_again(db: Db) {
    let server = TestServer::start(db);
    let machines = machines_with_secrets(&server, 4).await;
    let tokens: Vec<String> = {
        let mut t = Vec::new();
        for m in &machines {
            t.push(m.token_validates().await);
        }
        t
    };
    let steps = [
        "master_after_key_file",
        "master_after_stage",
        "master_after_switch",
        "master_after_batch",
    ];
    for (i, step) in steps.iter().enumerate() {
        let old = format!("k{}", i + 1);
        let new = format!("k{}", i + 2);
        let crashed = rotate_master(
            &server,
            &["--batch-size", "3"],
            &[("LICENSE_SERVER_TEST_CRASH_AT", step)],
        );
        assert!(
            !crashed.status.success(),
            "{step}: the test hook must abort"
        );
        let stderr = String::from_utf8_lossy(&crashed.stderr);
        assert!(stderr.contains("test crash at"), "{step}: {stderr}");

        // Serving never stops: every machine's secrets stay readable, whatever key they are
        // under, and a rotation in the middle of it works.
        for (m, token) in machines.iter().zip(&tokens) {
            assert!(m.validate(token).await.valid, "{step}");
            m.token_validates().await;
        }
        let status = key_status(&server);
        if *step == "master_after_batch" {
            assert_eq!(master_key(&status, &old), ("previous".into(), 5));
            assert_eq!(master_key(&status, &new), ("current".into(), 3));
        }

        let report = report_of(&rotate_master(&server, &["--batch-size", "3"], &[]));
        assert_eq!(report["new_key_id"], new.as_str(), "{step}");
        assert_eq!(report["retired"], json!([old]), "{step}");
        assert_eq!(
            report["resumed"],
            !matches!(*step, "master_after_key_file"),
            "{step}"
        );
        let status = key_status(&server);
        assert_eq!(master_key(&status, &old), ("retired".into(), 0), "{step}");
        assert_eq!(master_key(&status, &new), ("current".into(), 8), "{step}");
        assert_eq!(
            key_file(&server.data_dir()).0,
            std::slice::from_ref(&new),
            "{step}"
        );
        for m in &machines {
            m.token_validates().await;
        }
    }

    // --keep-old keeps the old key in the set; the next rollover retires it.
    let report = report_of(&rotate_master(&server, &["--keep-old"], &[]));
    assert_eq!(report["kept"], json!(["k5"]));
    assert_eq!(key_file(&server.data_dir()).0, ["k5", "k6"]);
    assert_eq!(master_key(&key_status(&server), "k5"), ("kept".into(), 0));
    let report = report_of(&rotate_master(&server, &[], &[]));
    assert_eq!(report["retired"], json!(["k5", "k6"]));
    assert_eq!(key_file(&server.data_dir()).0, ["k7"]);
    for (m, token) in machines.iter().zip(&tokens) {
        assert!(m.validate(token).await.valid);
    }
}
on_both_databases!(rotate_master_killed_at_each_step_finishes_when_run_again);

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else if entry.file_name() != "serve.stderr" {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..100 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_postgres_keep_serving_through_the_rollover() {
    let server = TestServer::start(Db::Postgres);
    // Replica B: its own copy of the data directory, the same database.
    let b_dir: PathBuf = server.dir.path().join("srv-b");
    copy_dir(&server.data_dir(), &b_dir);
    let stale_dir: PathBuf = server.dir.path().join("srv-stale");
    copy_dir(&server.data_dir(), &stale_dir);
    let b = ServerProcess::spawn(&b_dir, &[]);
    let machines = machines_with_secrets(&server, 2).await;
    let on_b: Vec<Machine> = machines.iter().map(|m| m.at(&b.agent_url)).collect();
    let mut tokens = Vec::new();
    for m in &on_b {
        tokens.push(m.token_validates().await);
    }
    // Both serving processes report their keys.
    let status = key_status(&server);
    assert_eq!(status["serving_processes"].as_array().unwrap().len(), 2);

    // B does not hold the new key: the rollover stages it and stops before using it.
    let out = rotate_master(&server, &["--wait", "5s"], &[]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("do not hold it yet"), "{stderr}");
    assert!(stderr.contains(&b_dir.display().to_string()), "{stderr}");
    let status = key_status(&server);
    assert_eq!(master_key(&status, "k2"), ("staged".into(), 0));
    assert_eq!(master_key(&status, "k1"), ("current".into(), 4));
    for (m, token) in on_b.iter().zip(&tokens) {
        assert!(m.validate(token).await.valid);
    }

    // The ceremony: copy the key set to B, run the command again.
    std::fs::copy(
        server.data_dir().join("master-keys.json"),
        b_dir.join("master-keys.json"),
    )
    .unwrap();
    let report = report_of(&rotate_master(&server, &["--wait", "30s"], &[]));
    assert_eq!(report["new_key_id"], "k2");
    assert_eq!(report["reencrypted"], 4);
    assert_eq!(report["retired"], json!(["k1"]));
    let status = key_status(&server);
    assert_eq!(master_key(&status, "k1"), ("retired".into(), 0));
    assert_eq!(master_key(&status, "k2"), ("current".into(), 4));

    // B serves the re-encrypted secrets: validations, tokens, and a rotation sealed under k2.
    for (m, token) in on_b.iter().zip(&tokens) {
        assert!(m.validate(token).await.valid);
        m.token_validates().await;
    }
    assert_eq!(on_b[0].rotate_and_ack(2).await, 3);
    let token = on_b[0].token_validates().await;
    assert!(
        machines[0].validate(&token).await.valid,
        "A reads B's new secret"
    );
    machines[1].token_validates().await;
    assert_eq!(
        master_key(&key_status(&server), "k2"),
        ("current".into(), 5)
    );

    // B drops the retired key from its own key set by itself.
    wait_until("replica B to drop k1", || key_file(&b_dir).0 == ["k2"]).await;

    // A replica started from a data directory without the current key refuses to start.
    let out = Command::new(SERVER)
        .args(["serve", "--data-dir"])
        .arg(&stale_dir)
        .args([
            "--public-listen",
            "127.0.0.1:0",
            "--agent-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("master key k2"), "{stderr}");
    assert!(b.stop().success());
}

async fn keys_status_names_every_key(db: Db) {
    let server = TestServer::start(db);
    let machines = machines_with_secrets(&server, 2).await;
    let status = key_status(&server);
    assert_eq!(status["ca"]["active_machine_certificates"], 2);
    assert!(parse_rfc3339(&status["ca"]["not_after"]) > now() + 10 * 365 * 86_400);
    assert_eq!(status["server_tls"]["pin"], server.pin().as_str());
    let renews = parse_rfc3339(&status["server_tls"]["renews_at"]);
    assert!(renews > now() && renews < parse_rfc3339(&status["server_tls"]["not_after"]));
    let license_key = machines[0].answer["license_public_key"].as_str().unwrap();
    assert_eq!(status["license_signing_key"]["public_key"], license_key);
    assert!(parse_rfc3339(&status["license_signing_key"]["created_at"]) <= now());
    assert_eq!(master_key(&status, "k1"), ("current".into(), 4));

    let out = server.admin(&["keys", "status"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "CA certificate",
        status["ca"]["serial"].as_str().unwrap(),
        "2 active machine certificates",
        "Server TLS certificate",
        &server.pin(),
        "renews at",
        "License signing key",
        license_key,
        "Master keys",
        "k1",
        "current",
        "Serving processes",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    for material in key_material(&server.data_dir()) {
        assert!(!text.contains(material.as_str()));
        assert!(!status.to_string().contains(material.as_str()));
    }
}
on_both_databases!(keys_status_names_every_key);

/// The key id a token names.
fn key_id_of(token_b64: &str) -> String {
    token::decode(token_b64)
        .unwrap()
        .0
        .key_id
        .expect("a v2 token")
        .to_string()
}

/// Waits until the machine's replica announces `digest` (it re-reads its key set file).
async fn wait_for_set(m: &Machine, digest: &str) {
    for _ in 0..100 {
        if m.announced_digest().await == digest {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out waiting for {} to announce {digest}", m.url);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn license_key_rollover_and_retirement_across_two_replicas_on_postgres() {
    let server = TestServer::start(Db::Postgres);
    let b_dir: PathBuf = server.dir.path().join("srv-b");
    copy_dir(&server.data_dir(), &b_dir);
    let b = ServerProcess::spawn(&b_dir, &[]);
    let machines = machines_with_secrets(&server, 1).await;
    let on_a = &machines[0];
    let on_b = on_a.at(&b.agent_url);
    let pinned = license_protocol::rotation::parse_license_public_key(
        on_a.answer["license_public_key"].as_str().unwrap(),
    )
    .unwrap();
    let old_id = KeyId::of(&pinned).to_string();
    let old_token = on_a.token_validates().await;
    assert_eq!(
        token::decode(&old_token).unwrap().0.key_id,
        None,
        "v1 (readable by older agents) while the server has only one key"
    );
    assert_eq!(on_a.announced_digest().await, on_b.announced_digest().await);
    // An agent holding only its pin accepts the set as announced.
    let mut agent = TrustedKeys::pinned(pinned);
    agent.accept(&on_a.license_keys().await).unwrap();

    // Rollover on A; the ceremony copies the key set to B.
    let out = admin_in(
        &server.data_dir(),
        &["--json", "keys", "rotate-license"],
        &[],
    );
    let report = report_of(&out);
    let new_id = report["new_key_id"].as_str().unwrap().to_string();
    assert_eq!(report["old_key_id"], old_id.as_str());
    let digest = report["digest"].as_str().unwrap().to_string();
    wait_for_set(on_a, &digest).await;
    std::fs::copy(
        server.data_dir().join("license-keys.json"),
        b_dir.join("license-keys.json"),
    )
    .unwrap();
    wait_for_set(&on_b, &digest).await;
    let set = on_b.license_keys().await;
    assert_eq!(set.digest(), digest);
    assert_eq!(
        set.signatures.len(),
        2,
        "signed by the old key and the new one"
    );
    agent.accept(&set).unwrap();

    // Both replicas issue tokens under the new key; both validate old and new tokens; a
    // rotation answer (signed by the new key) verifies with the agent's learned trust.
    let new_token = on_b.token_validates().await;
    assert_eq!(key_id_of(&new_token), new_id);
    assert_eq!(key_id_of(&on_a.token_validates().await), new_id);
    for m in [on_a, &on_b] {
        assert!(
            m.validate(&old_token).await.valid,
            "previous key on {}",
            m.url
        );
        assert!(m.validate(&new_token).await.valid);
    }
    let req = RotateSecretRequest::new_signed(&on_b.signing, on_b.id, 2, now());
    let (status, body) = on_b.post("/api/v1/rotate-secret", &req).await;
    assert_eq!(status, 200, "{body}");
    let resp: RotateSecretResponse = serde_json::from_value(body).unwrap();
    resp.verify(&agent, &on_b.id).unwrap();
    assert!(resp.verify(&TrustedKeys::pinned(pinned), &on_b.id).is_err());

    // Refusals: the current key, an unknown key, not a key id.
    let out = admin_in(
        &server.data_dir(),
        &["keys", "retire-license", &new_id],
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = admin_in(
        &server.data_dir(),
        &["keys", "retire-license", "0011223344556677"],
        &[],
    );
    assert_eq!(out.status.code(), Some(3));
    let out = admin_in(&server.data_dir(), &["keys", "retire-license", "k1"], &[]);
    assert_eq!(out.status.code(), Some(2));

    // Retirement on A, copied to B: the old token answers key_retired on both.
    let report = report_of(&admin_in(
        &server.data_dir(),
        &["--json", "keys", "retire-license", &old_id],
        &[],
    ));
    let digest = report["digest"].as_str().unwrap().to_string();
    std::fs::copy(
        server.data_dir().join("license-keys.json"),
        b_dir.join("license-keys.json"),
    )
    .unwrap();
    wait_for_set(on_a, &digest).await;
    wait_for_set(&on_b, &digest).await;
    for m in [on_a, &on_b] {
        let verdict = m.validate(&old_token).await;
        assert!(!verdict.valid);
        assert_eq!(
            verdict.reason.map(|r| r.as_str().to_string()).as_deref(),
            Some("key_retired"),
            "on {}",
            m.url
        );
        assert!(m.validate(&new_token).await.valid);
    }
    // A straggler that trusts only the retired key follows in one step (the retired key still
    // signs the set); the agent that followed all along refuses the retired key from now on.
    let set = on_b.license_keys().await;
    let mut straggler = TrustedKeys::pinned(pinned);
    straggler.accept(&set).unwrap();
    agent.accept(&set).unwrap();
    for trust in [&straggler, &agent] {
        assert_eq!(
            trust.for_token(Some(old_id.parse().unwrap())),
            Err(token::TokenError::KeyRetired)
        );
    }

    // Audited with key ids only; the status lists both keys.
    let events = audit(&server);
    let of = |action: &str| events.iter().filter(|e| e["action"] == action).count();
    assert_eq!(of("keys.rotate_license"), 1);
    assert_eq!(of("keys.retire_license"), 3, "the two refusals too");
    let text = serde_json::to_string(&events).unwrap();
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(server.data_dir().join("license-keys.json")).unwrap(),
    )
    .unwrap();
    for k in file["keys"].as_array().unwrap() {
        let private = k["private_key"].as_str().unwrap();
        assert!(!text.contains(private));
    }
    let status = key_status(&server);
    let states: Vec<(&str, &str)> = status["license_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k["id"].as_str().unwrap(), k["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [(old_id.as_str(), "retired"), (new_id.as_str(), "current")]
    );
    assert!(b.stop().success());
}
