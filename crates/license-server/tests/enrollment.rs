//! Enrollment end to end, against real server processes, on SQLite and PostgreSQL:
//! bootstrap (CSR and server-key modes), token rules, concurrency, bad input, the machine's
//! certificate checked with a real X.509 parser.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::{agent_bin, Db, TestServer};
use serde_json::{json, Value};
use x509_parser::prelude::*;

fn der(pem_text: &str) -> Vec<u8> {
    ::pem::parse(pem_text).unwrap().contents().to_vec()
}

/// Checks a machine certificate: CN, chain to the CA, validity window, client-auth only.
fn assert_machine_certificate(cert_pem: &str, ca_pem: &str, client_id: &str, machine_id: &str) {
    let cert_der = der(cert_pem);
    let ca_der = der(ca_pem);
    let (_, cert) = parse_x509_certificate(&cert_der).unwrap();
    let (_, ca) = parse_x509_certificate(&ca_der).unwrap();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap();
    assert_eq!(cn, format!("{client_id}:{machine_id}"));
    assert_eq!(cert.issuer(), ca.subject());
    cert.verify_signature(Some(ca.public_key()))
        .expect("signed by the CA");
    let now = ASN1Time::now();
    assert!(cert.validity().not_before <= now && now < cert.validity().not_after);
    let days = (cert.validity().not_after.timestamp() - now.timestamp()) / 86_400;
    assert!((364..=365).contains(&days), "validity {days} days");
    assert!(!cert.is_ca());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
}

async fn post_bootstrap(server: &TestServer, body: Value) -> (u16, Value) {
    let r = server
        .https_client()
        .post(format!("{}/api/public/bootstrap", server.server.public_url))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn csr_for(key: &rcgen::KeyPair) -> String {
    rcgen::CertificateParams::default()
        .serialize_request(key)
        .unwrap()
        .pem()
        .unwrap()
}

async fn enroll_with_agent_binary(db: Db) {
    let server = TestServer::start(db);
    let client = server.new_client("Acme Retail");
    let token = server.new_token(&client);
    let machine_dir = server.dir.path().join("machine");
    let config = machine_dir.join("config.toml");
    let out = server.agent_enroll(
        &token,
        &machine_dir,
        "4C4C4544-0044-4810-8031-B3C04F4A5331",
        &["--json", "--hostname", "POS-001"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["client_id"], client.as_str());
    assert_eq!(report["key_origin"], "local");
    let machine_id = report["machine_id"].as_str().unwrap();

    // Key stays on the machine, 0600; the certificate is this machine's, from the CA.
    use std::os::unix::fs::PermissionsExt as _;
    let key_path = machine_dir.join("client.key");
    assert_eq!(
        std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let cert_pem = std::fs::read_to_string(machine_dir.join("client.pem")).unwrap();
    assert_machine_certificate(&cert_pem, &server.ca_pem(), &client, machine_id);
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&key_path).unwrap()).unwrap();
    let cert_der = der(&cert_pem);
    let (_, cert) = parse_x509_certificate(&cert_der).unwrap();
    assert_eq!(cert.public_key().raw, key.public_key_der());
    let stored = server.admin_json(&["cert", "list", "--machine", machine_id]);
    assert_eq!(stored[0]["key_origin"], "csr");

    // The written config is valid and the agent reaches the mTLS API with it.
    let check = Command::new(agent_bin())
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let status = Command::new(agent_bin())
        .args(["server-status", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["machine_id"], machine_id);
    assert_eq!(status["state"], "none");

    // Machine list and audit show the enrollment.
    let machines = server.admin_json(&["machine", "list"]);
    assert_eq!(machines[0]["hostname"], "POS-001");
    assert_eq!(
        machines[0]["hardware_id"],
        "4C4C4544-0044-4810-8031-B3C04F4A5331"
    );
    let audit = server.admin_json(&["audit", "list"]);
    assert!(audit
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["action"] == "machine.enroll" && e["outcome"] == "success"));
    // The token itself is nowhere in the audit trail.
    assert!(!audit.to_string().contains(&token));

    // A second enrollment with the used token is refused, with the agent's exit code 3.
    let again = server.agent_enroll(&token, &server.dir.path().join("other"), "other", &[]);
    assert_eq!(again.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&again.stderr).contains("token_already_used"));
}
on_both_databases!(enroll_with_agent_binary);

async fn server_generated_key_mode(db: Db) {
    let server = TestServer::start(db);
    let client = server.new_client("Seed Mode");
    let token = server.new_token(&client);
    let (status, body) = post_bootstrap(
        &server,
        json!({"token": token, "hostname": "win-pos", "hardware_id": "HW-1", "arch": "amd64"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let key_pem = body["private_key"]
        .as_str()
        .expect("private_key in seed mode");
    let cert_pem = body["certificate"].as_str().unwrap();
    assert_machine_certificate(
        cert_pem,
        body["ca_cert"].as_str().unwrap(),
        &client,
        body["machine_id"].as_str().unwrap(),
    );
    assert_eq!(body["server_pin"], server.pin());
    assert!(body["license_public_key"]
        .as_str()
        .unwrap()
        .starts_with("ed25519:"));
    assert!(body["binary_url"]
        .as_str()
        .unwrap()
        .ends_with("/downloads/stable/license-agent-linux-amd64"));
    assert_eq!(body["api_url"], server.server.agent_url.as_str());
    // The returned key works for mTLS.
    let (code, _) = server
        .secret_status(&server.server.agent_url, cert_pem, key_pem)
        .await;
    assert_eq!(code, 200);
    // CSR mode never returns a private key.
    let token = server.new_token(&client);
    let (answer, _) = server.enroll_http(&token, "HW-2").await;
    assert!(answer.get("private_key").is_none());
}
on_both_databases!(server_generated_key_mode);

async fn token_rules(db: Db) {
    let server = TestServer::start(db);
    let client = server.new_client("Tokens");
    let body = |token: &str| json!({"token": token, "hostname": "pos", "hardware_id": "HW-T", "arch": "amd64"});

    let (status, err) = post_bootstrap(&server, body("lit_unknown")).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (401, Some("token_unknown"))
    );

    let token = server.new_token(&client);
    assert_eq!(post_bootstrap(&server, body(&token)).await.0, 200);
    let (status, err) = post_bootstrap(&server, body(&token)).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (410, Some("token_already_used"))
    );
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("already been used"));

    // Expire a token by moving its expiry into the past in the database itself.
    let expired = server.new_token(&client);
    let tokens = server.admin_json(&["token", "list", "--client", &client]);
    let id = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["used_at"].is_null())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    sql(
        &server,
        &format!("UPDATE install_tokens SET expires_at = 1 WHERE id = '{id}'"),
    )
    .await;
    let (status, err) = post_bootstrap(&server, body(&expired)).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (410, Some("token_expired"))
    );

    // Tokens are stored hashed only.
    let dump = sql_dump_tokens(&server).await;
    assert!(!dump.contains(&token) && !dump.contains(&expired));

    // Default lifetime 24 h; --ttl is honoured.
    let created = server.admin_json(&["token", "create", "--client", &client, "--ttl", "2h"]);
    let created_at = ::time::OffsetDateTime::parse(
        created["created_at"].as_str().unwrap(),
        &::time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let expires_at = ::time::OffsetDateTime::parse(
        created["expires_at"].as_str().unwrap(),
        &::time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!((expires_at - created_at).whole_seconds(), 7200);
    assert!(created["install_command"]
        .as_str()
        .unwrap()
        .contains("--pinnedpubkey 'sha256//"));
}
on_both_databases!(token_rules);

async fn sql(server: &TestServer, statement: &str) {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&server.db.url).await.unwrap();
    sqlx::query(statement).execute(&pool).await.unwrap();
    pool.close().await;
}

async fn sql_dump_tokens(server: &TestServer) -> String {
    use sqlx::Row as _;
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&server.db.url).await.unwrap();
    let rows = sqlx::query("SELECT token_hash FROM install_tokens")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    rows.iter()
        .map(|r| r.get::<String, _>(0))
        .collect::<Vec<_>>()
        .join(",")
}

async fn concurrent_double_use(db: Db) {
    let server = TestServer::start(db);
    let client = server.new_client("Race");
    for round in 0..3 {
        let token = server.new_token(&client);
        let requests = (0..8).map(|i| {
            let body = json!({"token": token, "hostname": "pos", "hardware_id": format!("HW-{round}-{i}"), "arch": "amd64"});
            post_bootstrap(&server, body)
        });
        let results = futures_util::future::join_all(requests).await;
        let ok = results.iter().filter(|(s, _)| *s == 200).count();
        assert_eq!(ok, 1, "round {round}: {results:?}");
        assert!(
            results
                .iter()
                .all(|(s, b)| *s == 200 || (*s == 410 && b["error"] == "token_already_used")),
            "{results:?}"
        );
    }
    assert_eq!(
        server
            .admin_json(&["machine", "list"])
            .as_array()
            .unwrap()
            .len(),
        3
    );
}
on_both_databases!(concurrent_double_use);

async fn re_enrollment_reuses_machine(db: Db) {
    let server = TestServer::start(db);
    let client = server.new_client("Reinstall");
    let (first, key1) = server
        .enroll_http(&server.new_token(&client), "SAME-HW")
        .await;
    // Re-enrolling takes the machine's current key (the installer run again on the till).
    let (status, second, key2) = server
        .bootstrap_http(&server.new_token(&client), "SAME-HW", Some(&key1))
        .await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(first["machine_id"], second["machine_id"]);
    assert_ne!(first["serial"], second["serial"]);
    let machine = first["machine_id"].as_str().unwrap();
    let certs = server.admin_json(&["cert", "list", "--machine", machine]);
    let state_of = |serial: &Value| {
        certs
            .as_array()
            .unwrap()
            .iter()
            .find(|c| &c["serial"] == serial)
            .unwrap()["effective_state"]
            .clone()
    };
    assert_eq!(certs.as_array().unwrap().len(), 2);
    assert_eq!(state_of(&first["serial"]), "superseded");
    assert_eq!(state_of(&second["serial"]), "active");
    let url = &server.server.agent_url;
    let (old, body) = server
        .secret_status(url, first["certificate"].as_str().unwrap(), &key1)
        .await;
    assert_eq!(
        (old, body["error"].as_str()),
        (403, Some("certificate_superseded"))
    );
    assert_eq!(
        server
            .secret_status(url, second["certificate"].as_str().unwrap(), &key2)
            .await
            .0,
        200
    );

    // The same hardware id under another client is another machine.
    let other = server.new_client("Other");
    let (third, _) = server
        .enroll_http(&server.new_token(&other), "SAME-HW")
        .await;
    assert_ne!(third["machine_id"], first["machine_id"]);
}
on_both_databases!(re_enrollment_reuses_machine);

async fn one_active_certificate_enforced_by_database(db: Db) {
    let server = TestServer::start(db);
    let (_, answer, _) = server.enrolled_machine("Constraint", "HW-C").await;
    let machine = answer["machine_id"].as_str().unwrap();
    let client = answer["client_id"].as_str().unwrap();
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&server.db.url).await.unwrap();
    let insert = format!(
        "INSERT INTO certificates (serial, machine_id, client_id, state, key_origin, issued_at, expires_at, pem) \
         VALUES ('0badc0de', '{machine}', '{client}', 'active', 'csr', 0, 99999999999, 'x')"
    );
    let err = sqlx::query(&insert).execute(&pool).await.unwrap_err();
    assert!(
        err.as_database_error().unwrap().is_unique_violation(),
        "{err}"
    );
    // A superseded row for the same machine is fine.
    sqlx::query(&insert.replace("'active'", "'superseded'"))
        .execute(&pool)
        .await
        .unwrap();
    // The audit trail is append-only in the database itself.
    assert!(sqlx::query("UPDATE audit_events SET outcome = 'x'")
        .execute(&pool)
        .await
        .is_err());
    assert!(sqlx::query("DELETE FROM audit_events")
        .execute(&pool)
        .await
        .is_err());
    pool.close().await;
}
on_both_databases!(one_active_certificate_enforced_by_database);

async fn bad_input_is_refused_and_server_stays_healthy(db: Db) {
    let server = TestServer::start(db);
    let client = server.new_client("Bad Input");
    let token = server.new_token(&client);
    let http = server.https_client();
    let url = format!("{}/api/public/bootstrap", server.server.public_url);
    let key = rcgen::KeyPair::generate().unwrap();
    let good = json!({"token": token, "hostname": "pos", "hardware_id": "HW-B", "arch": "amd64", "csr": csr_for(&key)});

    // Not JSON at all.
    let r = http
        .post(&url)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_request");
    // Oversized body.
    let r = http
        .post(&url)
        .header("content-type", "application/json")
        .body(vec![b' '; 200 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "body_too_large");
    // JSON, but not an object (serde would read a struct from an array).
    for body in ["[]", " [1, 2]", "\"token\"", "null"] {
        let r = http
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422, "{body}");
        let err = r.json::<Value>().await.unwrap();
        assert_eq!(err["error"], "invalid_request", "{body}: {err}");
    }

    // Field-level problems name the field.
    let mutate = |field: &str, value: Value| {
        let mut b = good.clone();
        b[field] = value;
        b
    };
    for (body, needle) in [
        (
            mutate("hostname", json!("pos\u{0}01")),
            "hostname contains a control character",
        ),
        (
            mutate("hostname", json!("h".repeat(300))),
            "hostname is longer",
        ),
        (
            mutate("hardware_id", json!("HW\n1")),
            "hardware_id contains a control character",
        ),
        (
            mutate("hardware_id", json!("x".repeat(129))),
            "hardware_id is longer",
        ),
        (mutate("arch", json!("sparc64")), "arch must be one of"),
        (mutate("hostname", json!(42)), "hostname"),
        (mutate("surprise", json!(1)), "unknown field `surprise`"),
    ] {
        let (status, err) = post_bootstrap(&server, body).await;
        assert!(status == 400 || status == 422, "{needle}: {status}");
        assert!(
            err["message"].as_str().unwrap().contains(needle),
            "{needle}: {err}"
        );
    }

    // A garbage CSR, and a CSR whose signature does not match its key.
    let (status, err) = post_bootstrap(
        &server,
        mutate(
            "csr",
            json!("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"),
        ),
    )
    .await;
    assert_eq!((status, err["error"].as_str()), (400, Some("invalid_csr")));
    let mut csr_der = der(&csr_for(&key));
    let last = csr_der.len() - 5;
    csr_der[last] ^= 0xff; // inside the signature
    let forged = ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", csr_der));
    let (status, err) = post_bootstrap(&server, mutate("csr", json!(forged))).await;
    assert_eq!((status, err["error"].as_str()), (400, Some("invalid_csr")));
    let (status, _) = post_bootstrap(&server, mutate("csr", json!("A".repeat(17 * 1024)))).await;
    assert_eq!(status, 400);

    // None of that burnt the token, and the server is healthy.
    assert_eq!(post_bootstrap(&server, good).await.0, 200);
    let health: Value = http
        .get(format!("{}/healthz", server.server.public_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let audit = server.admin_json(&["audit", "list", "--limit", "1000"]);
    let refused = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "machine.enroll" && e["outcome"] == "refused")
        .count();
    assert!(refused >= 3, "refused enrollments are audited");
}
on_both_databases!(bad_input_is_refused_and_server_stays_healthy);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_is_rate_limited_per_ip() {
    let server = TestServer::start_with(Db::Sqlite, &["--bootstrap-rate-per-minute", "3"]);
    let body =
        json!({"token": "lit_nope", "hostname": "pos", "hardware_id": "HW", "arch": "amd64"});
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(post_bootstrap(&server, body.clone()).await);
    }
    assert_eq!(
        statuses.iter().filter(|(s, _)| *s == 401).count(),
        3,
        "{statuses:?}"
    );
    let (status, err) = &statuses[4];
    assert_eq!(
        (*status, err["error"].as_str()),
        (429, Some("rate_limited"))
    );
    // Other routes are not limited.
    let r = server
        .https_client()
        .get(format!("{}/healthz", server.server.public_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Adds `addr` to the loopback interface (the tests run as root), removed again on drop.
struct LoopbackAddr(&'static str);

impl LoopbackAddr {
    fn add(addr: &'static str) -> Self {
        let out = std::process::Command::new("ip")
            .args(["-6", "addr", "add", &format!("{addr}/128"), "dev", "lo"])
            .output()
            .unwrap();
        assert!(
            out.status.success() || String::from_utf8_lossy(&out.stderr).contains("exists"),
            "ip addr add {addr}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(addr)
    }
}

impl Drop for LoopbackAddr {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["-6", "addr", "del", &format!("{}/128", self.0), "dev", "lo"])
            .output();
    }
}

/// A /64 is one subscriber: its addresses share one bootstrap quota; another /64 has its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_quota_is_per_ipv6_slash_64() {
    let sources = [
        LoopbackAddr::add("fd00:51:64::a"),
        LoopbackAddr::add("fd00:51:64::b"),
        LoopbackAddr::add("fd00:51:65::a"),
    ];
    let server = TestServer::start_with(
        Db::Sqlite,
        &[
            "--bootstrap-rate-per-minute",
            "3",
            "--public-listen",
            "[::]:0",
        ],
    );
    let port: u16 = server.server.ready["public"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let target: std::net::SocketAddr = format!("[fd00:51:64::a]:{port}").parse().unwrap();
    let from = |source: &str| {
        reqwest::Client::builder()
            .use_preconfigured_tls(common::tls_config(&server.ca_pem(), None, false))
            .local_address(source.parse::<std::net::IpAddr>().unwrap())
            .resolve("localhost", target)
            .build()
            .unwrap()
    };
    let body =
        json!({"token": "lit_nope", "hostname": "pos", "hardware_id": "HW", "arch": "amd64"});
    let post = |client: reqwest::Client| {
        let body = body.clone();
        async move {
            client
                .post(format!("https://localhost:{port}/api/public/bootstrap"))
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // Three from one address of the /64, then one from another address of it: refused.
    for _ in 0..3 {
        assert_eq!(post(from(sources[0].0)).await, 401);
    }
    assert_eq!(post(from(sources[1].0)).await, 429, "same /64, same quota");
    // Another /64 has a quota of its own.
    assert_eq!(post(from(sources[2].0)).await, 401);
}
