//! Secret lifecycle and licenses against real server processes: rotation (idempotent retry,
//! implicit and explicit acknowledgement, replay and signature refusals), force rotation and
//! invalidation, license tokens re-issued under each new version, online validation with every
//! reason code, and secrets never leaking into the audit trail, the log or admin output.
//!
//! The machine side is a minimal agent written here from the protocol crate alone, so these
//! tests also show that the wire contract is enough to write a client.
#![allow(clippy::unwrap_used)]

mod common;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use common::{Db, TestServer};
use license_protocol::agent_api::{MachineLicenses, ValidateLicenseResponse};
use license_protocol::identity::MachineId;
use license_protocol::rotation::{
    parse_license_public_key, RotateSecretRequest, RotateSecretResponse, SignatureError,
};
use license_protocol::secret::{self, Secret, SecretDates};
use license_protocol::token;
use p256::pkcs8::DecodePrivateKey as _;
use serde_json::{json, Value};

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Sleeps until the wall clock is past `t` (Unix seconds) by one second.
async fn wait_past(t: i64) {
    while now() <= t + 1 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// A secret delivered to the test machine, opened.
struct Delivered {
    version: u64,
    dates: SecretDates,
    secret: Secret,
    blob: String,
}

/// A minimal agent: the machine's key, its certificate, the pinned license key.
struct Machine {
    key_pem: String,
    http: reqwest::Client,
    url: String,
    id: MachineId,
    secret_key: p256::SecretKey,
    signing: p256::ecdsa::SigningKey,
    license_key: license_protocol::license_keys::TrustedKeys,
}

impl Machine {
    async fn enroll(server: &TestServer, client_id: &str, hardware_id: &str) -> Self {
        let (answer, key_pem) = server
            .enroll_http(&server.new_token(client_id), hardware_id)
            .await;
        Self::from_answer(server, &answer, key_pem)
    }

    /// The machine a bootstrap answer enrolled, with the key its CSR was made for.
    fn from_answer(server: &TestServer, answer: &Value, key_pem: String) -> Self {
        let secret_key = p256::SecretKey::from_pkcs8_pem(&key_pem).unwrap();
        Self {
            http: server.mtls_client(answer["certificate"].as_str().unwrap(), &key_pem),
            key_pem,
            url: server.server.agent_url.clone(),
            id: answer["machine_id"].as_str().unwrap().parse().unwrap(),
            signing: p256::ecdsa::SigningKey::from(&secret_key),
            secret_key,
            license_key: license_protocol::license_keys::TrustedKeys::pinned(
                parse_license_public_key(answer["license_public_key"].as_str().unwrap()).unwrap(),
            ),
        }
    }

    fn id(&self) -> String {
        self.id.to_string()
    }

    fn request(&self, current: u64) -> RotateSecretRequest {
        RotateSecretRequest::new_signed(&self.signing, self.id, current, now())
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

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// Checks the server's signature with the pinned key and opens the secret.
    fn open(&self, resp: &RotateSecretResponse) -> Delivered {
        let blob = resp.verify(&self.license_key, &self.id).unwrap();
        let secret = secret::open(
            &self.secret_key,
            &self.id,
            resp.secret_version,
            &resp.dates(),
            &blob,
        )
        .unwrap();
        Delivered {
            version: resp.secret_version,
            dates: resp.dates(),
            secret,
            blob: resp.new_secret_encrypted.clone(),
        }
    }

    async fn rotate(&self, current: u64) -> Delivered {
        let (status, body) = self
            .post("/api/v1/rotate-secret", &self.request(current))
            .await;
        assert_eq!(status, 200, "{body}");
        self.open(&serde_json::from_value(body).unwrap())
    }

    async fn ack(&self, version: u64) -> (u16, Value) {
        self.post(
            "/api/v1/rotate-secret/ack",
            &json!({"secret_version": version}),
        )
        .await
    }

    /// Rotates from `current` and acknowledges the new version.
    async fn rotate_and_ack(&self, current: u64) -> Delivered {
        let d = self.rotate(current).await;
        let (status, body) = self.ack(d.version).await;
        assert_eq!(status, 200, "{body}");
        d
    }

    async fn status(&self) -> Value {
        let (status, body) = self.get("/api/v1/secret-status").await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn licenses(&self) -> MachineLicenses {
        let (status, body) = self.get("/api/v1/licenses").await;
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
}

fn reason(v: &ValidateLicenseResponse) -> &'static str {
    assert!(!v.valid, "{v:?}");
    v.reason.unwrap().as_str()
}

fn audit(server: &TestServer) -> Vec<Value> {
    server
        .admin_json(&["audit", "list", "--limit", "10000"])
        .as_array()
        .unwrap()
        .clone()
}

fn audited(events: &[Value], action: &str, outcome: &str, reason: Option<&str>) -> bool {
    events.iter().any(|e| {
        e["action"] == action
            && e["outcome"] == outcome
            && reason.is_none_or(|r| e["details"]["reason"] == r)
    })
}

/// No form of any of `secrets` appears in the audit trail, the server log, admin JSON about
/// `machines`, or (SQLite) the database file.
fn assert_never_leaked(server: &TestServer, machines: &[&Machine], secrets: &[&Secret]) {
    let mut haystacks = vec![
        serde_json::to_string(&audit(server)).unwrap(),
        std::fs::read_to_string(server.data_dir().join("serve.stderr")).unwrap(),
        server.admin_json(&["machine", "list"]).to_string(),
        server.admin_json(&["license", "list"]).to_string(),
    ];
    for m in machines {
        haystacks.push(server.admin_json(&["machine", "show", &m.id()]).to_string());
        haystacks.push(
            server
                .admin_json(&["machine", "secrets", &m.id()])
                .to_string(),
        );
    }
    let db_file = server.dir.path().join("license.db");
    let db_bytes = std::fs::read(&db_file).unwrap_or_default();
    for s in secrets {
        let raw = s.expose();
        let forms = [
            hex::encode(raw),
            hex::encode_upper(raw),
            STANDARD.encode(raw),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw),
        ];
        for hay in &haystacks {
            for form in &forms {
                assert!(!hay.contains(form.as_str()), "a secret leaked: {form}");
            }
        }
        assert!(
            !db_bytes.windows(raw.len()).any(|w| w == raw),
            "a plaintext secret is in the database file"
        );
    }
}

async fn first_rotation_ack_and_idempotent_retry(db: Db) {
    let server = TestServer::start(db);
    let client = server.new_client("Acme Retail");
    let m = Machine::enroll(&server, &client, "TILL-1").await;

    // Before any rotation: no secret, no tokens.
    let status = m.status().await;
    assert_eq!(status["current_version"], Value::Null);
    assert_eq!(status["state"], "none");
    assert_eq!(status["pending_version"], Value::Null);
    assert_eq!(status["rotation_requested"], false);
    let licenses = m.licenses().await;
    assert_eq!(licenses.secret_version, None);
    assert!(licenses.tokens.is_empty());

    // First rotation: signed by the pinned key only, sealed to this machine's key.
    let (code, body) = m.post("/api/v1/rotate-secret", &m.request(0)).await;
    assert_eq!(code, 200, "{body}");
    let resp: RotateSecretResponse = serde_json::from_value(body).unwrap();
    let stranger = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng).verifying_key();
    assert_eq!(
        resp.verify(
            &license_protocol::license_keys::TrustedKeys::pinned(stranger),
            &m.id
        )
        .unwrap_err(),
        SignatureError::Invalid
    );
    assert_eq!(
        resp.verify(&m.license_key, &MachineId::new_random())
            .unwrap_err(),
        SignatureError::Invalid
    );
    let first = m.open(&resp);
    assert_eq!(first.version, 1);
    assert_eq!(first.dates.valid_until - first.dates.valid_from, 172_800);
    assert_eq!(first.dates.grace_until - first.dates.valid_until, 604_800);

    // The answer was "lost": a retry gets the same version, dates and secret, sealed afresh.
    let again = m.rotate(0).await;
    assert_eq!(again.version, 1);
    assert_eq!(again.dates, first.dates);
    assert_eq!(again.secret, first.secret);
    assert_ne!(again.blob, first.blob);
    let status = m.status().await;
    assert_eq!(
        (
            status["current_version"].clone(),
            status["pending_version"].clone()
        ),
        (Value::Null, json!(1))
    );

    // Acknowledgement: pending becomes active; acknowledging it again is a no-op.
    let (code, body) = m.ack(1).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        (
            &body["current_version"],
            &body["state"],
            &body["pending_version"]
        ),
        (&json!(1), &json!("active"), &Value::Null)
    );
    assert_eq!(body["valid_until"], first.dates.valid_until);
    assert_eq!(m.ack(1).await.0, 200);
    let (code, body) = m.ack(9).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (409, Some("unknown_version"))
    );

    // Implicit acknowledgement: naming the pending version as current promotes it.
    let second = m.rotate(1).await;
    assert_eq!(second.version, 2);
    assert_ne!(second.secret, first.secret);
    let third = m.rotate(2).await;
    assert_eq!(third.version, 3);
    let status = m.status().await;
    assert_eq!(
        (
            &status["current_version"],
            &status["state"],
            &status["pending_version"]
        ),
        (&json!(2), &json!("active"), &json!(3))
    );
    let secrets = server.admin_json(&["machine", "secrets", &m.id()]);
    let states: Vec<&str> = secrets
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["grace", "active", "pending"]);
    // The superseded version kept its dates.
    assert_eq!(
        secrets[0]["valid_until"],
        json!(rfc3339(first.dates.valid_until))
    );

    // Only the pending or active version can be acknowledged; an unknown current version is refused.
    let (code, body) = m.ack(1).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (409, Some("version_not_pending"))
    );
    let (code, body) = m.post("/api/v1/rotate-secret", &m.request(99)).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (409, Some("unknown_version"))
    );

    let events = audit(&server);
    assert!(audited(&events, "secret.rotate", "success", None));
    assert!(events
        .iter()
        .any(|e| e["action"] == "secret.rotate" && e["details"]["resent"] == true));
    assert!(events
        .iter()
        .any(|e| e["action"] == "secret.rotate" && e["details"]["implicit_ack"] == 2));
    assert!(audited(&events, "secret.ack", "success", None));
    assert!(audited(
        &events,
        "secret.rotate",
        "refused",
        Some("unknown_version")
    ));
    assert!(audited(
        &events,
        "secret.ack",
        "refused",
        Some("version_not_pending")
    ));
    assert_never_leaked(
        &server,
        &[&m],
        &[&first.secret, &second.secret, &third.secret],
    );
}
on_both_databases!(first_rotation_ack_and_idempotent_retry);

async fn concurrent_rotations_share_one_pending_version(db: Db) {
    let server = TestServer::start(db);
    let client = server.new_client("Acme Retail");
    let m = Machine::enroll(&server, &client, "TILL-1").await;
    let requests: Vec<RotateSecretRequest> = (0..8).map(|_| m.request(0)).collect();
    let answers =
        futures_util::future::join_all(requests.iter().map(|r| m.post("/api/v1/rotate-secret", r)))
            .await;
    let delivered: Vec<Delivered> = answers
        .into_iter()
        .map(|(code, body)| {
            assert_eq!(code, 200, "{body}");
            m.open(&serde_json::from_value(body).unwrap())
        })
        .collect();
    assert!(delivered
        .iter()
        .all(|d| d.version == 1 && d.secret == delivered[0].secret));
    let secrets = server.admin_json(&["machine", "secrets", &m.id()]);
    assert_eq!(secrets.as_array().unwrap().len(), 1);
}
on_both_databases!(concurrent_rotations_share_one_pending_version);

fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

async fn rotate_refuses_replays_stale_bad_signatures_and_other_machines(db: Db) {
    let server = TestServer::start(db);
    let client = server.new_client("Acme Retail");
    let a = Machine::enroll(&server, &client, "TILL-A").await;
    let b = Machine::enroll(&server, &client, "TILL-B").await;
    let rotate = "/api/v1/rotate-secret";

    // The same signed request twice: the second is a replay.
    let req = a.request(0);
    assert_eq!(a.post(rotate, &req).await.0, 200);
    let (code, body) = a.post(rotate, &req).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (409, Some("replayed_request"))
    );

    // Too old or too far ahead.
    for skew in [-301 - 60, 301 + 60] {
        let stale = RotateSecretRequest::new_signed(&a.signing, a.id, 0, now() + skew);
        let (code, body) = a.post(rotate, &stale).await;
        assert_eq!((code, body["error"].as_str()), (400, Some("stale_request")));
    }

    // Signed by another key, altered after signing, or not a signature at all.
    let other = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
    let forged = RotateSecretRequest::new_signed(&other, a.id, 0, now());
    let mut altered = a.request(0);
    altered.current_secret_version = 1;
    let mut garbage = a.request(0);
    garbage.signature = "AAAA".into();
    for bad in [forged, altered, garbage] {
        let (code, body) = a.post(rotate, &bad).await;
        assert_eq!((code, body["error"].as_str()), (401, Some("bad_signature")));
    }

    // Machine A asking for machine B's secret, even with B's own signed request.
    let for_b = RotateSecretRequest::new_signed(&a.signing, b.id, 0, now());
    let (code, body) = a.post(rotate, &for_b).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (403, Some("agent_id_mismatch"))
    );
    let (code, body) = a.post(rotate, &b.request(0)).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (403, Some("agent_id_mismatch"))
    );

    // Malformed bodies name the problem.
    let mut bad_nonce = serde_json::to_value(a.request(0)).unwrap();
    bad_nonce["nonce"] = json!("xyz");
    let (code, body) = a.post(rotate, &bad_nonce).await;
    // 400 for bodies that are not JSON, 422 for JSON that is not a request (axum's split).
    assert_eq!(
        (code, body["error"].as_str()),
        (422, Some("invalid_request"))
    );
    assert!(
        body["message"].as_str().unwrap().contains("nonce"),
        "{body}"
    );

    // None of that changed anything: A still has its one pending version, B nothing.
    assert_eq!(a.status().await["pending_version"], 1);
    assert_eq!(b.status().await["pending_version"], Value::Null);
    assert_eq!(a.rotate(0).await.version, 1);

    let events = audit(&server);
    for reason in [
        "replayed_request",
        "stale_request",
        "bad_signature",
        "agent_id_mismatch",
    ] {
        assert!(
            audited(&events, "secret.rotate", "refused", Some(reason)),
            "{reason} not audited"
        );
    }
}
on_both_databases!(rotate_refuses_replays_stale_bad_signatures_and_other_machines);

async fn licenses_follow_rotation_and_validate_online(db: Db) {
    let server = TestServer::start(db);
    let client = server.new_client("Acme Retail");
    let m = Machine::enroll(&server, &client, "TILL-1").await;
    let other = Machine::enroll(&server, &client, "TILL-2").await;

    // Issued before the machine holds a secret: no token yet, from the CLI either.
    let issued = server.admin_json(&[
        "license",
        "issue",
        "--machine",
        &m.id(),
        "--features",
        "pos.sale,pos.refund",
        "--metadata",
        "tier=gold",
        "--expires-in",
        "30d",
    ]);
    let license_id = issued["id"].as_str().unwrap().to_string();
    assert_eq!(issued["token"], Value::Null);
    assert_eq!(issued["state"], "active");
    let early = server.admin(&["license", "token", &license_id]);
    assert_eq!(early.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&early.stderr).contains("no acknowledged secret"));

    // Version 1: one token, readable with the secret, valid online.
    let v1 = m.rotate_and_ack(0).await;
    let fetched = m.licenses().await;
    assert_eq!(fetched.secret_version, Some(1));
    assert_eq!(fetched.tokens.len(), 1);
    let token1 = fetched.tokens[0].token.clone();
    assert_eq!(fetched.tokens[0].secret_version, 1);
    let claims = token::open(
        &token1,
        &m.id,
        |v| (v == 1).then(|| v1.secret.clone()),
        |id| m.license_key.for_token(id),
    )
    .unwrap();
    assert_eq!(claims.features, ["pos.sale", "pos.refund"]);
    assert_eq!(claims.metadata["tier"], "gold");
    assert_eq!(claims.license_id.to_string(), license_id);
    let verdict = m.validate(&token1).await;
    assert!(verdict.valid, "{verdict:?}");
    assert_eq!(verdict.features, ["pos.sale", "pos.refund"]);
    assert_eq!(verdict.license_id, Some(claims.license_id));

    // Version 2: tokens re-issued under it; the version-1 token still validates (grace).
    let v2 = m.rotate_and_ack(1).await;
    let fetched = m.licenses().await;
    assert_eq!(fetched.secret_version, Some(2));
    let token2 = fetched.tokens[0].token.clone();
    assert_eq!(token::decode(&token2).unwrap().0.secret_version, 2);
    assert!(token::open(
        &token2,
        &m.id,
        |_| Some(v1.secret.clone()),
        |id| m.license_key.for_token(id)
    )
    .is_err());
    token::open(
        &token2,
        &m.id,
        |_| Some(v2.secret.clone()),
        |id| m.license_key.for_token(id),
    )
    .unwrap();
    assert!(m.validate(&token1).await.valid);
    assert!(m.validate(&token2).await.valid);
    let printed = server.admin_json(&["license", "token", &license_id]);
    assert_eq!(printed["secret_version"], 2);

    // Invalidating version 1: its tokens fail online, and the agent learns it.
    let invalidated = server.admin_json(&["machine", "invalidate-secret", &m.id(), "1"]);
    assert_eq!(invalidated["state"], "invalidated");
    assert_eq!(reason(&m.validate(&token1).await), "secret_invalidated");
    assert!(m.validate(&token2).await.valid);
    let status = m.status().await;
    assert_eq!(status["invalidated_versions"], json!([1]));
    assert_eq!(
        status["rotation_requested"], false,
        "v1 was not the active version"
    );
    let twice = server.admin(&["machine", "invalidate-secret", &m.id(), "1"]);
    assert_eq!(twice.status.code(), Some(4));
    let unknown = server.admin(&["machine", "invalidate-secret", &m.id(), "7"]);
    assert_eq!(unknown.status.code(), Some(3));

    // Every other refusal, with its reason code.
    assert_eq!(reason(&other.validate(&token2).await), "wrong_machine");
    let mut bytes = STANDARD.decode(&token2).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    assert_eq!(
        reason(&m.validate(&STANDARD.encode(&bytes)).await),
        "bad_signature"
    );
    assert_eq!(reason(&m.validate("not a token").await), "malformed");
    let mut bytes = STANDARD.decode(&token2).unwrap();
    // Secret version 9, which this machine never had (the version's last byte: v1 or v2 header).
    let at = if bytes[3] == 1 { 27 } else { 35 };
    bytes[at] = 9;
    assert_eq!(
        reason(&m.validate(&STANDARD.encode(&bytes)).await),
        "unknown_secret_version"
    );
    let later = server.admin_json(&[
        "license",
        "issue",
        "--machine",
        &m.id(),
        "--features",
        "pos.report",
        "--not-before",
        "2100-01-01T00:00:00Z",
    ]);
    assert_eq!(later["state"], "not_yet_valid");
    let later_token = later["token"]["token"].as_str().unwrap();
    assert_eq!(later["token"]["secret_version"], 2);
    assert_eq!(reason(&m.validate(later_token).await), "not_yet_valid");
    let short = server.admin_json(&[
        "license",
        "issue",
        "--machine",
        &m.id(),
        "--features",
        "pos.trial",
        "--expires-in",
        "2s",
    ]);
    let short_token = short["token"]["token"].as_str().unwrap().to_string();
    assert!(m.validate(&short_token).await.valid);

    // Revocation: listed for the agent, no token any more, refused online.
    let revoked = server.admin_json(&["license", "revoke", &license_id]);
    assert_eq!(revoked["state"], "revoked");
    let fetched = m.licenses().await;
    assert_eq!(fetched.revoked, [claims.license_id]);
    assert!(fetched
        .tokens
        .iter()
        .all(|t| t.license_id != claims.license_id));
    assert_eq!(reason(&m.validate(&token2).await), "revoked");
    assert_eq!(
        server
            .admin(&["license", "revoke", &license_id])
            .status
            .code(),
        Some(4)
    );
    assert_eq!(
        server
            .admin(&["license", "token", &license_id])
            .status
            .code(),
        Some(4)
    );

    // Expiry.
    wait_past(short["expires_at"].as_str().map(parse_rfc3339).unwrap()).await;
    assert_eq!(reason(&m.validate(&short_token).await), "expired");
    let fetched = m.licenses().await;
    let short_id: uuid::Uuid = short["id"].as_str().unwrap().parse().unwrap();
    assert!(fetched.tokens.iter().all(|t| t.license_id != short_id));
    let listed = server.admin_json(&["license", "list", "--machine", &m.id()]);
    let states: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_object().unwrap()["state"].as_str().unwrap())
        .collect();
    assert_eq!(states.len(), 3);
    assert!(states.contains(&"revoked") && states.contains(&"expired"));

    // Bad input to issue is refused, naming the field.
    let bad = server.admin(&[
        "license",
        "issue",
        "--machine",
        &m.id(),
        "--features",
        "has space",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("features"));
    let missing = server.admin(&[
        "license",
        "issue",
        "--machine",
        &MachineId::new_random().to_string(),
        "--features",
        "x",
    ]);
    assert_eq!(missing.status.code(), Some(3));

    let events = audit(&server);
    for action in ["license.issue", "license.revoke", "secret.invalidate"] {
        assert!(audited(&events, action, "success", None), "{action}");
    }
    assert!(audited(
        &events,
        "license.issue",
        "refused",
        Some("invalid_request")
    ));
    assert_never_leaked(&server, &[&m, &other], &[&v1.secret, &v2.secret]);
}
on_both_databases!(licenses_follow_rotation_and_validate_online);

fn parse_rfc3339(s: &str) -> i64 {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap()
        .unix_timestamp()
}

async fn force_rotation_is_seen_until_the_next_ack(db: Db) {
    let server = TestServer::start(db);
    let client = server.new_client("Acme Retail");
    let m = Machine::enroll(&server, &client, "TILL-1").await;
    m.rotate_and_ack(0).await;
    assert_eq!(m.status().await["rotation_requested"], false);

    let machine = server.admin_json(&["machine", "rotate", &m.id()]);
    assert!(machine["rotation_requested_at"].is_string());
    assert_eq!(m.status().await["rotation_requested"], true);
    let v2 = m.rotate(1).await;
    assert_eq!(
        m.status().await["rotation_requested"],
        true,
        "until acknowledged"
    );
    assert_eq!(m.ack(v2.version).await.0, 200);
    let status = m.status().await;
    assert_eq!(status["rotation_requested"], false);
    assert_eq!(status["current_version"], 2);

    // Invalidating the active version leaves the machine without a usable secret: that
    // requests a rotation too, and no token is handed out under it.
    server.admin_json(&[
        "license",
        "issue",
        "--machine",
        &m.id(),
        "--features",
        "pos.sale",
    ]);
    server.admin_json(&["machine", "invalidate-secret", &m.id(), "2"]);
    let status = m.status().await;
    assert_eq!(
        (
            &status["state"],
            &status["rotation_requested"],
            &status["invalidated_versions"]
        ),
        (&json!("invalidated"), &json!(true), &json!([2]))
    );
    assert_eq!(
        m.licenses().await.secret_version,
        Some(1),
        "v1 is still in grace"
    );
    let v3 = m.rotate_and_ack(2).await;
    assert_eq!(v3.version, 3);
    let status = m.status().await;
    assert_eq!(
        (&status["state"], &status["rotation_requested"]),
        (&json!("active"), &json!(false))
    );
    let fetched = m.licenses().await;
    assert_eq!(fetched.secret_version, Some(3));
    assert_eq!(fetched.tokens.len(), 1);

    let events = audit(&server);
    assert!(audited(&events, "machine.rotate", "success", None));
    assert!(events
        .iter()
        .any(|e| e["action"] == "secret.invalidate" && e["details"]["rotation_requested"] == true));
    let unknown = server.admin(&["machine", "rotate", &MachineId::new_random().to_string()]);
    assert_eq!(unknown.status.code(), Some(3));
}
on_both_databases!(force_rotation_is_seen_until_the_next_ack);

/// Finding 4 of the adversarial review: an install token of the client and a till's hardware id
/// (world-readable in `/etc/machine-id`) took the till over, its pending secret re-sealed to the
/// attacker's key. A known machine is re-enrolled only with a signature by its key or with a
/// token an administrator bound to it, and a secret issued to one key never goes to another.
async fn reenrollment_takes_a_machine_over_only_with_its_key_or_a_bound_token(db: Db) {
    let server = TestServer::start(db);
    let client = server.new_client("Takeover");
    let victim = Machine::enroll(&server, &client, "VICTIM-HW").await;
    let machine_id = victim.id();
    let first = victim.rotate_and_ack(0).await;
    let pending = victim.rotate(first.version).await;

    // Another token of the client and the victim's hardware id: refused, unsigned or signed by
    // any key but the victim's, and the victim keeps working.
    let stranger = rcgen::KeyPair::generate().unwrap().serialize_pem();
    for previous in [None, Some(stranger.as_str())] {
        let (status, body, _) = server
            .bootstrap_http(&server.new_token(&client), "VICTIM-HW", previous)
            .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (409, Some("machine_already_enrolled")),
            "{body}"
        );
        assert!(
            body["message"].as_str().unwrap().contains("--machine"),
            "{body}"
        );
        assert!(!body.to_string().contains(&machine_id), "{body}");
    }
    assert_eq!(
        victim.status().await["pending_version"],
        pending.version,
        "victim still served"
    );
    let refused: Vec<Value> = audit(&server)
        .into_iter()
        .filter(|e| e["action"] == "machine.enroll" && e["outcome"] == "refused")
        .collect();
    let causes: Vec<&str> = refused
        .iter()
        .map(|e| e["details"]["cause"].as_str().unwrap())
        .collect();
    assert_eq!(
        causes,
        ["no_previous_key_signature", "bad_previous_key_signature"]
    );
    assert!(refused.iter().all(|e| e["target"] == machine_id.as_str()));

    // The till itself re-enrolls (the installer run again): its current key signs the request.
    let (status, answer, new_key) = server
        .bootstrap_http(
            &server.new_token(&client),
            "VICTIM-HW",
            Some(&victim.key_pem),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["machine_id"], machine_id.as_str());
    let (status, body) = victim.get("/api/v1/secret-status").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("certificate_superseded"))
    );
    let reenrolled = Machine::from_answer(&server, &answer, new_key);
    let event = audit(&server)
        .into_iter()
        .rev()
        .find(|e| e["action"] == "machine.enroll" && e["outcome"] == "success")
        .unwrap();
    assert_eq!(event["details"]["reenrollment"], "previous_key");
    assert_eq!(
        event["details"]["invalidated_pending_versions"],
        json!([pending.version])
    );
    // The version sealed to the old key is not re-sent to the new one: a new version is issued.
    let status = reenrolled.status().await;
    assert_eq!(status["rotation_requested"], true, "{status}");
    assert!(status["pending_version"].is_null(), "{status}");
    let next = reenrolled.rotate(first.version).await;
    assert!(
        next.version > pending.version,
        "{} after {}",
        next.version,
        pending.version
    );
    let (status, body) = reenrolled.ack(pending.version).await;
    assert_eq!(status, 409, "{body}");

    // A wiped till (no key left): an administrator binds a token to the machine, which then
    // re-enrolls it under the hardware id it now reports, without any signature.
    let bound = server.admin_json(&[
        "token",
        "create",
        "--client",
        &client,
        "--machine",
        &machine_id,
    ]);
    assert_eq!(bound["machine_id"], machine_id.as_str());
    let (status, answer, _) = server
        .bootstrap_http(bound["token"].as_str().unwrap(), "NEW-DISK", None)
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["machine_id"], machine_id.as_str());
    let machine = server.admin_json(&["machine", "show", &machine_id]);
    assert_eq!(machine["hardware_id"], "NEW-DISK");
    let event = audit(&server)
        .into_iter()
        .rev()
        .find(|e| e["action"] == "machine.enroll" && e["outcome"] == "success")
        .unwrap();
    assert_eq!(event["details"]["reenrollment"], "bound_token");

    // A bound token cannot move a machine onto another machine's hardware id, nor be made for
    // another client's machine.
    let other = Machine::enroll(&server, &client, "OTHER-HW").await;
    let bound = server.admin_json(&[
        "token",
        "create",
        "--client",
        &client,
        "--machine",
        &machine_id,
    ]);
    let (status, body, _) = server
        .bootstrap_http(bound["token"].as_str().unwrap(), "OTHER-HW", None)
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("machine_already_enrolled")),
        "{body}"
    );
    assert_eq!(
        other.status().await["machine_id"],
        other.id().as_str(),
        "other untouched"
    );
    let stranger_client = server.new_client("Elsewhere");
    let out = server.admin(&[
        "token",
        "create",
        "--client",
        &stranger_client,
        "--machine",
        &machine_id,
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("machine_id") && stderr.contains("another client"),
        "{stderr}"
    );
}
on_both_databases!(reenrollment_takes_a_machine_over_only_with_its_key_or_a_bound_token);

async fn secret_enters_grace_then_expires_and_is_destroyed(db: Db) {
    let server = TestServer::start_with(
        db,
        &["--secret-validity-secs", "2", "--secret-grace-secs", "2"],
    );
    let client = server.new_client("Acme Retail");
    let m = Machine::enroll(&server, &client, "TILL-1").await;
    server.admin_json(&[
        "license",
        "issue",
        "--machine",
        &m.id(),
        "--features",
        "pos.sale",
    ]);
    let v1 = m.rotate_and_ack(0).await;
    assert_eq!(v1.dates.valid_until - v1.dates.valid_from, 2);
    assert_eq!(v1.dates.grace_until - v1.dates.valid_until, 2);
    let token = m.licenses().await.tokens[0].token.clone();

    wait_past(v1.dates.valid_until).await;
    assert_eq!(m.status().await["state"], "grace");
    assert!(m.validate(&token).await.valid, "grace keeps tokens valid");

    wait_past(v1.dates.grace_until).await;
    assert_eq!(reason(&m.validate(&token).await), "expired");
    let fetched = m.licenses().await;
    assert_eq!(fetched.secret_version, None);
    assert!(fetched.tokens.is_empty());
    let secrets = server.admin_json(&["machine", "secrets", &m.id()]);
    assert_eq!(secrets[0]["effective_state"], "expired");

    // Past its grace the secret is gone (DESIGN.md §2): a server's sweep (here the one a
    // replica runs as it starts) destroys it and says so in the audit trail.
    let replica = server.replica();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let secrets = server.admin_json(&["machine", "secrets", &m.id()]);
        if secrets[0]["destroyed"] == true {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not destroyed: {secrets}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(audit(&server)
        .iter()
        .any(|e| e["action"] == "secret.destroyed"
            && e["actor"] == "server"
            && e["target"] == m.id().as_str()
            && e["details"]["versions"] == json!([1])));
    assert_eq!(reason(&m.validate(&token).await), "expired");
    replica.stop();

    // A rotation brings the machine back; its own expired version goes at the next one.
    let v2 = m.rotate_and_ack(1).await;
    assert_eq!(m.licenses().await.tokens.len(), 1);
    wait_past(v2.dates.grace_until).await;
    m.rotate_and_ack(2).await;
    let secrets = server.admin_json(&["machine", "secrets", &m.id()]);
    assert_eq!(secrets[1]["version"], 2);
    assert_eq!(
        secrets[1]["destroyed"], true,
        "destroyed by the rotation: {secrets}"
    );
    assert_eq!(secrets[2]["destroyed"], false);
    assert_eq!(m.licenses().await.tokens.len(), 1);
}
on_both_databases!(secret_enters_grace_then_expires_and_is_destroyed);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_license_and_secret_routes() {
    let server = TestServer::start(Db::Sqlite);
    let client = server.new_client("Acme Retail");
    let m = Machine::enroll(&server, &client, "TILL-1").await;
    let admin_token =
        server.admin_json(&["api-token", "create", "--name", "ops", "--role", "admin"])["token"]
            .as_str()
            .unwrap()
            .to_string();
    let ro_token = server.admin_json(&["api-token", "create", "--name", "viewer"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    let http = server.https_client();
    let base = server.server.admin_url.clone();
    let call = |method: reqwest::Method, path: &str, token: &str, body: Option<Value>| {
        let mut r = http
            .request(method, format!("{base}{path}"))
            .bearer_auth(token);
        if let Some(body) = body {
            r = r.json(&body);
        }
        async move {
            let r = r.send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    use reqwest::Method;
    let id = m.id();

    let (code, body) = call(
        Method::POST,
        "/api/admin/licenses",
        &admin_token,
        Some(json!({"machine_id": id, "features": []})),
    )
    .await;
    assert_eq!(
        (code, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let (code, _) = call(
        Method::POST,
        "/api/admin/licenses",
        &admin_token,
        Some(json!({"machine_id": MachineId::new_random(), "features": ["a"]})),
    )
    .await;
    assert_eq!(code, 404);
    let (code, body) = call(
        Method::POST,
        "/api/admin/licenses",
        &admin_token,
        Some(
            json!({"machine_id": id, "features": ["pos.sale"], "metadata": {"store": "12"},
                    "expires_at": "2100-01-01T00:00:00Z"}),
        ),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["token"], Value::Null);
    let license = body["id"].as_str().unwrap().to_string();
    let (code, _) = call(
        Method::POST,
        "/api/admin/licenses",
        &ro_token,
        Some(json!({})),
    )
    .await;
    assert_eq!(code, 403, "readonly tokens cannot issue");

    let (code, body) = call(
        Method::GET,
        &format!("/api/admin/licenses/{license}/token"),
        &ro_token,
        None,
    )
    .await;
    assert_eq!((code, body["error"].as_str()), (409, Some("conflict")));
    m.rotate_and_ack(0).await;
    let (code, body) = call(
        Method::GET,
        &format!("/api/admin/licenses/{license}/token"),
        &ro_token,
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(m.validate(body["token"].as_str().unwrap()).await.valid);
    let (code, body) = call(
        Method::GET,
        &format!("/api/admin/licenses?machine_id={id}"),
        &ro_token,
        None,
    )
    .await;
    assert_eq!((code, body.as_array().map(Vec::len)), (200, Some(1)));

    let (code, body) = call(
        Method::POST,
        &format!("/api/admin/machines/{id}/rotate"),
        &admin_token,
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(m.status().await["rotation_requested"], true);
    m.rotate_and_ack(1).await;
    let (code, body) = call(
        Method::GET,
        &format!("/api/admin/machines/{id}/secrets"),
        &ro_token,
        None,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(body.as_array().unwrap().len(), 2);
    assert!(body[0].get("secret_enc").is_none());
    let (code, body) = call(
        Method::POST,
        &format!("/api/admin/machines/{id}/secrets/1/invalidate"),
        &admin_token,
        None,
    )
    .await;
    assert_eq!((code, body["state"].as_str()), (200, Some("invalidated")));
    let (code, _) = call(
        Method::POST,
        &format!("/api/admin/machines/{id}/secrets/1/invalidate"),
        &admin_token,
        None,
    )
    .await;
    assert_eq!(code, 409);
    let (code, body) = call(
        Method::POST,
        &format!("/api/admin/licenses/{license}/revoke"),
        &admin_token,
        None,
    )
    .await;
    assert_eq!((code, body["state"].as_str()), (200, Some("revoked")));

    let events = audit(&server);
    for action in [
        "license.issue",
        "machine.rotate",
        "secret.invalidate",
        "license.revoke",
    ] {
        assert!(
            events.iter().any(|e| e["action"] == action
                && e["actor"] == "api:ops"
                && e["outcome"] == "success"),
            "{action}"
        );
    }
}
