//! The agent listener (TLS 1.3, mandatory client certificate, per-request revocation), the
//! admin API, replicas on one PostgreSQL, OpenAPI, install.sh and the CLI's errors — all
//! against real server processes.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;
use std::sync::Arc;

use common::{agent_bin, tls_config, Db, TestServer, SERVER};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_listener_refuses_tls12_and_missing_certificates() {
    let server = TestServer::start(Db::Sqlite);
    let (_, answer, key) = server.enrolled_machine("TLS", "HW-TLS").await;
    let cert = answer["certificate"].as_str().unwrap();
    let addr = server.server.ready["agent"].as_str().unwrap().to_string();

    // TLS 1.2 with a valid certificate: the handshake itself fails.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls12 = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(tls12_roots(&server.ca_pem()))
        .with_client_auth_cert(
            rustls_pemfile::certs(&mut cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap(),
            rustls_pemfile::private_key(&mut key.as_bytes())
                .unwrap()
                .unwrap(),
        )
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let handshake = tokio_rustls::TlsConnector::from(Arc::new(tls12))
        .connect(name, tcp)
        .await;
    let Err(err) = handshake else {
        panic!("TLS 1.2 must be refused")
    };
    let err = err.to_string();
    assert!(err.contains("version") || err.contains("Protocol"), "{err}");

    // TLS 1.3 without a certificate: no answer.
    let anonymous = common::client_with(tls_config(&server.ca_pem(), None, true));
    assert!(anonymous
        .get(format!("{}/api/v1/secret-status", server.server.agent_url))
        .send()
        .await
        .is_err());

    // A certificate from another CA: no answer either.
    let stranger = TestServer::start(Db::Sqlite);
    let (_, foreign, foreign_key) = stranger.enrolled_machine("Elsewhere", "HW-F").await;
    let client = common::client_with(tls_config(
        &server.ca_pem(),
        Some((foreign["certificate"].as_str().unwrap(), &foreign_key)),
        true,
    ));
    assert!(client
        .get(format!("{}/api/v1/secret-status", server.server.agent_url))
        .send()
        .await
        .is_err());

    // The public listener still speaks TLS 1.2 for installers.
    let public12 = common::client_with(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(tls12_roots(&server.ca_pem()))
        .with_no_client_auth(),
    );
    assert_eq!(
        public12
            .get(format!("{}/healthz", server.server.public_url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // And the legitimate machine is served.
    assert_eq!(
        server
            .secret_status(&server.server.agent_url, cert, &key)
            .await
            .0,
        200
    );
}

fn tls12_roots(ca_pem: &str) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    roots
}

/// A client certificate signed by the server's own CA but never issued through enrollment.
fn forge_with_server_ca(server: &TestServer, cn: &str) -> (String, String) {
    forge_with_serial(server, cn, None)
}

/// A certificate for `cn` signed with the server's CA key (stolen), with `serial` when given.
fn forge_with_serial(server: &TestServer, cn: &str, serial: Option<&str>) -> (String, String) {
    let ca_pem = server.ca_pem();
    let ca_key = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(server.data_dir().join("ca.key")).unwrap(),
    )
    .unwrap();
    let ca = rcgen::CertificateParams::from_ca_cert_pem(&ca_pem)
        .unwrap()
        .self_signed(&ca_key)
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    if let Some(serial) = serial {
        let bytes: Vec<u8> = (0..serial.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&serial[i..i + 2], 16).unwrap())
            .collect();
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&bytes));
    }
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_or_unknown_cn_is_refused() {
    let server = TestServer::start(Db::Sqlite);
    let url = &server.server.agent_url;
    for cn in [
        "not-a-machine",
        "550e8400-e29b-41d4-a716-446655440000",
        "x:y",
        "",
    ] {
        let (cert, key) = forge_with_server_ca(&server, cn);
        let (status, body) = server.secret_status(url, &cert, &key).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (403, Some("bad_certificate_cn")),
            "CN {cn:?}"
        );
    }
    let (cert, key) = forge_with_server_ca(
        &server,
        "550e8400-e29b-41d4-a716-446655440000:6ba7b810-9dad-11d1-80b4-00c04fd430c8",
    );
    let (status, body) = server.secret_status(url, &cert, &key).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("unknown_certificate"))
    );

    // With the CA key and a machine's public certificate, a certificate with its CN and serial
    // but another key: refused, and the genuine one still served.
    let (_client, answer, genuine_key) = server.enrolled_machine("Victim", "HW-VICTIM").await;
    let genuine = answer["certificate"].as_str().unwrap();
    let cn = format!(
        "{}:{}",
        answer["client_id"].as_str().unwrap(),
        answer["machine_id"].as_str().unwrap()
    );
    let (forged, forged_key) =
        forge_with_serial(&server, &cn, Some(answer["serial"].as_str().unwrap()));
    let (status, body) = server.secret_status(url, &forged, &forged_key).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("unknown_certificate")),
        "{body}"
    );
    assert_eq!(
        server.secret_status(url, genuine, &genuine_key).await.0,
        200
    );
}

async fn revoking_one_machine_blocks_only_that_machine(db: Db) {
    let server = TestServer::start(db);
    let client = server.new_client("Two Tills");
    let (a, key_a) = server
        .enroll_http(&server.new_token(&client), "TILL-A")
        .await;
    let (b, key_b) = server
        .enroll_http(&server.new_token(&client), "TILL-B")
        .await;
    let (cert_a, cert_b) = (
        a["certificate"].as_str().unwrap(),
        b["certificate"].as_str().unwrap(),
    );
    let url = &server.server.agent_url;
    let machine_a = a["machine_id"].as_str().unwrap();

    let revoked = server.admin_json(&["machine", "revoke", machine_a]);
    assert!(revoked["revoked_at"].is_string());
    let (status, body) = server.secret_status(url, cert_a, &key_a).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("machine_revoked"))
    );
    assert_eq!(server.secret_status(url, cert_b, &key_b).await.0, 200);
    // A revoked machine cannot re-enroll either, and the token survives the refusal.
    let token = server.new_token(&client);
    let (status, body) = post(
        &server,
        json!({"token": token, "hostname": "x", "hardware_id": "TILL-A", "arch": "amd64"}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("machine_revoked"))
    );

    server.admin_json(&["machine", "restore", machine_a]);
    assert_eq!(server.secret_status(url, cert_a, &key_a).await.0, 200);

    // Certificate-level revocation and restoration (seed 004's endpoints).
    let serial_a = a["serial"].as_str().unwrap();
    let cert = server.admin_json(&["cert", "revoke", serial_a]);
    assert_eq!(cert["effective_state"], "revoked");
    let (status, body) = server.secret_status(url, cert_a, &key_a).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("certificate_revoked"))
    );
    let stats = server.admin_json(&["cert", "stats"]);
    assert_eq!(
        (stats["active"].as_i64(), stats["revoked"].as_i64()),
        (Some(1), Some(1))
    );
    server.admin_json(&["cert", "restore", serial_a]);
    assert_eq!(server.secret_status(url, cert_a, &key_a).await.0, 200);

    // Revoking twice, restoring an active one, unknown serials: clear refusals, exit codes 4 and 3.
    server.admin_json(&["cert", "revoke", serial_a]);
    let twice = server.admin(&["cert", "revoke", serial_a]);
    assert_eq!(twice.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&twice.stderr).contains("is revoked, not active"));
    let missing = server.admin(&["cert", "restore", "abcdef"]);
    assert_eq!(missing.status.code(), Some(3));
    // The key of a revoked certificate cannot re-enroll its machine; a token an administrator
    // bound to the machine can.
    let (status, body, _) = server
        .bootstrap_http(&server.new_token(&client), "TILL-A", Some(&key_a))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("machine_already_enrolled"))
    );
    let bound = server.admin_json(&[
        "token",
        "create",
        "--client",
        &client,
        "--machine",
        machine_a,
    ]);
    server
        .enroll_http(bound["token"].as_str().unwrap(), "TILL-A")
        .await;
    // Once the machine has a newer certificate, the old one cannot come back.
    let restore = server.admin(&["cert", "restore", serial_a]);
    assert_eq!(restore.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&restore.stderr).contains("another active certificate"));

    // Purge keeps only usable certificates.
    let purged = server.admin_json(&["cert", "purge"]);
    assert_eq!(purged["purged"], 1);
    assert_eq!(server.admin_json(&["cert", "stats"])["total"], 2);
    assert_eq!(server.secret_status(url, cert_b, &key_b).await.0, 200);
}
on_both_databases!(revoking_one_machine_blocks_only_that_machine);

async fn post(server: &TestServer, body: Value) -> (u16, Value) {
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

/// `POST /api/v1/health`: a machine's report is kept as its latest, written only when it
/// changed; garbage, wrong types and unprintable fields are refused and change nothing.
async fn health_reports_are_kept_and_garbage_refused(db: Db) {
    let server = TestServer::start(db);
    let (_, enrolled, key) = server.enrolled_machine("Health", "HEALTH-HW").await;
    let machine = enrolled["machine_id"].as_str().unwrap();
    let http = server.mtls_client(enrolled["certificate"].as_str().unwrap(), &key);
    let url = format!("{}/api/v1/health", server.server.agent_url);
    let report = json!({
        "agent_version": "1.2.3", "store": "tpm", "tpm_enabled": true, "tpm_available": true,
        "degraded_mode": "inactive", "rotation_failures": 0, "audit_chain_ok": true,
        "certificate_expires_at": 1_900_000_000, "secret_version": 4,
        "from_a_newer_agent": "ignored",
    });
    let send = |body: Value| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    assert_eq!(send(report.clone()).await.0, 204);
    let shown = server.admin_json(&["machine", "show", machine]);
    assert_eq!(shown["health"]["store"], "tpm");
    assert!(
        shown["health"].get("from_a_newer_agent").is_none(),
        "unknown fields not stored"
    );
    assert!(shown["last_seen_at"].is_string());
    let reported_at = shown["health_reported_at"].clone();

    let mut bad_text = report.clone();
    bad_text["agent_version"] = json!("1.0\u{1b}[31m");
    let mut long = report.clone();
    long["store"] = json!("x".repeat(65));
    let mut wrong_type = report.clone();
    wrong_type["rotation_failures"] = json!(-1);
    for (body, status) in [
        (bad_text, 400),
        (long, 400),
        (wrong_type, 422),
        (json!([1, 2]), 422),
    ] {
        let (got, answer) = send(body.clone()).await;
        assert_eq!(got, status, "{body} -> {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
    let raw = http
        .post(&url)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status().as_u16(), 400);
    // Nothing changed, and an identical report writes nothing.
    assert_eq!(send(report).await.0, 204);
    let shown = server.admin_json(&["machine", "show", machine]);
    assert_eq!(shown["health"]["store"], "tpm");
    assert_eq!(shown["health_reported_at"], reported_at);
    // Without a client certificate the route is not reached.
    let anonymous = common::client_with(tls_config(&server.ca_pem(), None, true));
    assert!(anonymous.post(&url).json(&json!({})).send().await.is_err());
}
on_both_databases!(health_reports_are_kept_and_garbage_refused);

async fn renewal_supersedes_the_old_certificate(db: Db) {
    let server = TestServer::start(db);
    let client = server.new_client("Renewal");
    let token = server.new_token(&client);
    let dir = server.dir.path().join("machine");
    let config = dir.join("config.toml");
    let enroll = server.agent_enroll(&token, &dir, "HW-R", &[]);
    assert!(
        enroll.status.success(),
        "{}",
        String::from_utf8_lossy(&enroll.stderr)
    );
    let old_cert = std::fs::read_to_string(dir.join("client.pem")).unwrap();
    let key = std::fs::read_to_string(dir.join("client.key")).unwrap();

    let renew = Command::new(agent_bin())
        .args(["renew-cert", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        renew.status.success(),
        "{}",
        String::from_utf8_lossy(&renew.stderr)
    );
    let renewed: Value = serde_json::from_slice(&renew.stdout).unwrap();
    let new_cert = std::fs::read_to_string(dir.join("client.pem")).unwrap();
    assert_eq!(new_cert, renewed["certificate"].as_str().unwrap());
    // A file-store machine gets a fresh key with its new certificate.
    let new_key = std::fs::read_to_string(dir.join("client.key")).unwrap();
    assert_ne!(new_key, key);

    let url = &server.server.agent_url;
    let (status, body) = server.secret_status(url, &old_cert, &key).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("certificate_superseded"))
    );
    let key = new_key;
    assert_eq!(server.secret_status(url, &new_cert, &key).await.0, 200);
    let status = Command::new(agent_bin())
        .args(["server-status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(status.status.success());

    // A garbage CSR on renewal is refused and the current certificate keeps working.
    let r = server
        .mtls_client(&new_cert, &key)
        .post(format!("{url}/api/v1/renew-certificate"))
        .json(&json!({"csr": "garbage"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_csr");
    assert_eq!(server.secret_status(url, &new_cert, &key).await.0, 200);
}
on_both_databases!(renewal_supersedes_the_old_certificate);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_postgres_see_a_revocation_at_the_next_request() {
    let server = TestServer::start(Db::Postgres);
    let replica = server.replica();
    let client = server.new_client("Fleet");
    let (a, key_a) = server
        .enroll_http(&server.new_token(&client), "FLEET-A")
        .await;
    let (b, key_b) = server
        .enroll_http(&server.new_token(&client), "FLEET-B")
        .await;
    let (cert_a, cert_b) = (
        a["certificate"].as_str().unwrap(),
        b["certificate"].as_str().unwrap(),
    );
    for url in [&server.server.agent_url, &replica.agent_url] {
        assert_eq!(server.secret_status(url, cert_a, &key_a).await.0, 200);
    }

    // Revoke through the first replica's admin API…
    let token = server.admin_json(&["api-token", "create", "--name", "ops", "--role", "admin"])
        ["token"]
        .as_str()
        .unwrap()
        .to_string();
    let http = server.https_client();
    let machine_a = a["machine_id"].as_str().unwrap();
    let r = http
        .post(format!(
            "{}/api/admin/machines/{machine_a}/revoke",
            server.server.admin_url
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // …and the very next request on the other replica is refused (no cache to expire).
    let (status, body) = server
        .secret_status(&replica.agent_url, cert_a, &key_a)
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("machine_revoked"))
    );
    assert_eq!(
        server
            .secret_status(&replica.agent_url, cert_b, &key_b)
            .await
            .0,
        200
    );

    // Restore through the second replica; the first serves A again.
    let r = http
        .post(format!(
            "{}/api/admin/machines/{machine_a}/restore",
            replica.admin_url
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        server
            .secret_status(&server.server.agent_url, cert_a, &key_a)
            .await
            .0,
        200
    );

    // Enrollment works through either replica, and a token is single-use across both.
    let shared = server.new_token(&client);
    let body = json!({"token": shared, "hostname": "x", "hardware_id": "FLEET-C", "arch": "amd64"});
    let (r1, r2) = tokio::join!(
        http.post(format!("{}/api/public/bootstrap", server.server.public_url))
            .json(&body)
            .send(),
        http.post(format!("{}/api/public/bootstrap", replica.public_url))
            .json(&body)
            .send(),
    );
    let mut codes = [r1.unwrap().status().as_u16(), r2.unwrap().status().as_u16()];
    codes.sort_unstable();
    assert_eq!(codes, [200, 410]);
    assert!(replica.stop().success(), "SIGTERM drains and exits 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_enforces_roles_and_audits() {
    let server = TestServer::start(Db::Sqlite);
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
    // One admin API call: (status, JSON body or null).
    let call = |method: reqwest::Method, path: String, token: Option<&str>, body: Option<Value>| {
        let mut req = http.request(method, format!("{}{path}", server.server.admin_url));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    use reqwest::Method;
    let machines = || "/api/admin/machines".to_string();
    let clients = || "/api/admin/clients".to_string();

    assert_eq!(call(Method::GET, machines(), None, None).await.0, 401);
    assert_eq!(
        call(Method::GET, machines(), Some("lat_wrong"), None)
            .await
            .0,
        401
    );
    assert_eq!(
        call(Method::GET, machines(), Some(&ro_token), None).await.0,
        200
    );
    let (status, body) = call(
        Method::POST,
        clients(),
        Some(&ro_token),
        Some(json!({"name": "x"})),
    )
    .await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));

    let (status, client) = call(
        Method::POST,
        clients(),
        Some(&admin_token),
        Some(json!({"name": "Via API"})),
    )
    .await;
    assert_eq!(status, 200);
    let body = json!({"client_id": client["id"], "ttl_secs": 3600});
    let (status, created) = call(
        Method::POST,
        "/api/admin/install-tokens".into(),
        Some(&admin_token),
        Some(body),
    )
    .await;
    assert_eq!(status, 200);
    let token = created["token"].as_str().unwrap();
    assert!(created["install_command"]
        .as_str()
        .unwrap()
        .contains(&server.server.public_url));
    let (answer, _) = server.enroll_http(token, "API-HW").await;
    let machine = answer["machine_id"].as_str().unwrap();

    for (path, expect) in [
        ("/api/admin/clients".to_string(), 200),
        ("/api/admin/install-tokens".to_string(), 200),
        ("/api/admin/certificates".to_string(), 200),
        ("/api/admin/certificates/stats".to_string(), 200),
        ("/api/admin/audit?since=0&limit=50".to_string(), 200),
        (format!("/api/admin/machines/{machine}"), 200),
        (
            "/api/admin/machines/00000000-0000-0000-0000-000000000000".to_string(),
            404,
        ),
        ("/api/admin/machines/not-a-uuid".to_string(), 400),
    ] {
        assert_eq!(
            call(Method::GET, path.clone(), Some(&ro_token), None)
                .await
                .0,
            expect,
            "{path}"
        );
    }
    let duplicate = call(
        Method::POST,
        clients(),
        Some(&admin_token),
        Some(json!({"name": "Via API"})),
    )
    .await;
    assert_eq!(duplicate.0, 409);
    let (status, body) = call(
        Method::POST,
        clients(),
        Some(&admin_token),
        Some(json!({"name": "a\u{7}b"})),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body["message"].as_str().unwrap().starts_with("name:"));
    let deleted = call(
        Method::DELETE,
        format!("/api/admin/machines/{machine}"),
        Some(&admin_token),
        None,
    )
    .await;
    assert_eq!(deleted.0, 204);

    let (_, audit) = call(
        Method::GET,
        "/api/admin/audit".into(),
        Some(&ro_token),
        None,
    )
    .await;
    let events = audit.as_array().unwrap();
    let by = |action: &str, outcome: &str| {
        events
            .iter()
            .any(|e| e["action"] == action && e["actor"] == "api:ops" && e["outcome"] == outcome)
    };
    assert!(by("client.create", "success") && by("client.create", "refused"));
    assert!(by("install_token.create", "success") && by("machine.delete", "success"));
    assert!(
        !audit.to_string().contains(token),
        "tokens never reach the audit trail"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_lists_every_route() {
    let server = TestServer::start(Db::Sqlite);
    let doc: Value = server
        .https_client()
        .get(format!("{}/api/openapi.json", server.server.public_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let routes = [
        ("post", "/api/public/bootstrap"),
        ("post", "/api/public/recover"),
        ("get", "/install.sh"),
        ("get", "/downloads/{channel}/{file}"),
        ("get", "/healthz"),
        ("get", "/api/openapi.json"),
        ("post", "/api/v1/rotate-secret"),
        ("post", "/api/v1/rotate-secret/ack"),
        ("get", "/api/v1/secret-status"),
        ("get", "/api/v1/license-keys"),
        ("get", "/api/v1/server-trust"),
        ("get", "/api/v1/licenses"),
        ("post", "/api/v1/validate-license"),
        ("post", "/api/v1/renew-certificate"),
        ("post", "/api/v1/health"),
        ("get", "/api/v1/releases/{release_id}/binary"),
        ("post", "/api/v1/update-report"),
        ("get", "/api/v1/watch"),
        ("get", "/api/admin/clients"),
        ("post", "/api/admin/clients"),
        ("get", "/api/admin/install-tokens"),
        ("post", "/api/admin/install-tokens"),
        ("post", "/api/admin/install-tokens/windows-installer"),
        ("get", "/api/admin/machines"),
        ("get", "/api/admin/machines/{id}"),
        ("delete", "/api/admin/machines/{id}"),
        ("post", "/api/admin/machines/{id}/revoke"),
        ("post", "/api/admin/machines/{id}/restore"),
        ("post", "/api/admin/machines/{id}/rotate"),
        ("get", "/api/admin/machines/{id}/secrets"),
        (
            "post",
            "/api/admin/machines/{id}/secrets/{version}/invalidate",
        ),
        ("get", "/api/admin/licenses"),
        ("post", "/api/admin/licenses"),
        ("post", "/api/admin/licenses/{id}/revoke"),
        ("get", "/api/admin/licenses/{id}/token"),
        ("get", "/api/admin/certificates/stats"),
        ("get", "/api/admin/certificates"),
        ("post", "/api/admin/certificates/{serial}/revoke"),
        ("post", "/api/admin/certificates/{serial}/restore"),
        ("post", "/api/admin/certificates/purge"),
        ("get", "/api/admin/audit"),
        ("get", "/api/admin/releases"),
        ("post", "/api/admin/releases/{release}/rollout"),
        ("post", "/api/admin/releases/{release}/pause"),
        ("post", "/api/admin/releases/{release}/resume"),
        ("post", "/api/admin/releases/{release}/withdraw"),
    ];
    let paths = doc["paths"].as_object().unwrap();
    for (method, path) in routes {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing from OpenAPI"
        );
    }
    let documented: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(
        documented,
        routes.len(),
        "the document lists a route this test does not know"
    );
    assert!(doc["components"]["schemas"]["BootstrapRequest"].is_object());
    assert!(doc["components"]["schemas"]["RotateSecretRequest"].is_object());
    assert!(doc["components"]["schemas"]["LicenseKeySet"].is_object());
    assert!(doc["components"]["schemas"]["IssuedLicense"].is_object());
    // The CLI prints the same document.
    let out = Command::new(SERVER).arg("openapi").output().unwrap();
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["paths"], doc["paths"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_sh_installs_under_a_prefix() {
    let server = TestServer::start(Db::Sqlite);
    let downloads = server.data_dir().join("downloads/stable");
    std::fs::create_dir_all(&downloads).unwrap();
    std::fs::copy(agent_bin(), downloads.join("license-agent-linux-amd64")).unwrap();
    let client = server.new_client("Installer");
    let token = server.new_token(&client);
    let prefix = server.dir.path().join("root");
    let curl_pin = format!("sha256//{}", server.pin().trim_start_matches("sha256:"));
    let url = format!("{}/install.sh", server.server.public_url);

    // Exactly the seed's one-liner (sudo aside), with the prefix so nothing outside the temp dir changes.
    let run_with = |prefix: &std::path::Path, token: &str, pin: &str, hw: &str| {
        Command::new("bash")
            .args([
                "-o",
                "pipefail",
                "-c",
                &format!("curl -fsSL -k --pinnedpubkey '{pin}' {url} | bash -s -- {token}"),
            ])
            .env("LICENSE_AGENT_PREFIX", prefix)
            .env("LICENSE_AGENT_HARDWARE_ID", hw)
            .output()
            .unwrap()
    };
    let run = |pin: &str, hw: &str| run_with(&prefix, &token, pin, hw);
    let wrong = run(
        "sha256//AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "HW-X",
    );
    assert!(
        !wrong.status.success(),
        "a server failing the pin must be refused"
    );
    assert!(!prefix.join("etc/license-agent/config.toml").exists());

    let out = run(&curl_pin, "INSTALL-HW-1");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("==> enrolling this machine") && stdout.contains("config OK"),
        "{stdout}"
    );

    let bin = prefix.join("usr/bin/license-agent");
    assert_eq!(
        std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let etc = prefix.join("etc/license-agent");
    assert_eq!(
        std::fs::metadata(etc.join("client.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(etc.join("config.toml"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert!(etc.join("client.pem").exists() && etc.join("ca.pem").exists());
    let unit =
        std::fs::read_to_string(prefix.join("etc/systemd/system/license-agent.service")).unwrap();
    assert!(
        unit.contains("Type=notify")
            && unit.contains("ProtectSystem=strict")
            && unit.contains("User=license-agent")
            && unit.contains("WatchdogSec=")
            && unit.contains("ExecReload=/bin/kill -HUP $MAINPID")
    );
    // No network but the server's addresses (this one is at localhost, 127.0.0.1).
    assert!(unit.contains("\nIPAddressDeny=any\n"), "{unit}");
    let allowed = unit
        .lines()
        .find_map(|l| l.strip_prefix("IPAddressAllow="))
        .unwrap();
    assert!(allowed.split(' ').any(|a| a == "127.0.0.1"), "{allowed}");

    // The AppArmor profile it writes passes AppArmor's own parser (as far as a machine without
    // AppArmor in its kernel can check) and lets the agent write wherever the unit does.
    let profile_path = prefix.join("etc/apparmor.d/usr.bin.license-agent");
    let profile = std::fs::read_to_string(&profile_path).unwrap();
    let parser = ["/usr/sbin/apparmor_parser", "/sbin/apparmor_parser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("apparmor_parser");
    let parsed = Command::new(parser)
        .args(["--skip-kernel-load", "--skip-cache"])
        .arg(&profile_path)
        .output()
        .expect("apparmor_parser (Debian package apparmor) must be installed");
    assert!(
        parsed.status.success(),
        "{}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    let writable = unit
        .lines()
        .find_map(|l| l.strip_prefix("ReadWritePaths="))
        .unwrap();
    for dir in writable.split_whitespace() {
        assert!(
            profile.contains(&format!("{dir}/** rw")),
            "{dir} in {profile}"
        );
    }
    // Enforced (it runs so in a real guest: crates/license-agent/tests/vm.rs), no capability
    // granted, and nobody confined reads or traces the agent.
    assert!(
        profile.contains("profile license-agent /usr/bin/license-agent {")
            && !profile.contains("complain")
            && !profile
                .lines()
                .any(|l| l.trim_start().starts_with("capability"))
            && profile.contains("audit deny ptrace (readby, tracedby),")
            && profile.contains("/dev/tpmrm0 rw,"),
        "{profile}"
    );

    let machines = server.admin_json(&["machine", "list"]);
    assert_eq!(machines[0]["hardware_id"], "INSTALL-HW-1");
    let status = Command::new(&bin)
        .args(["server-status", "--json", "--config"])
        .arg(etc.join("config.toml"))
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );

    // Run again on the same till (a new token): the machine's key signs the re-enrollment, the
    // machine is the same. From another root (a wiped disk: no key) with the same hardware id it
    // is refused, and the message says what an administrator does about it.
    let machine_id = machines[0]["id"].as_str().unwrap().to_string();
    let again = run_with(
        &prefix,
        &server.new_token(&client),
        &curl_pin,
        "INSTALL-HW-1",
    );
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.status.success() && stdout.contains("enrolled already"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let machines = server.admin_json(&["machine", "list"]);
    assert_eq!(machines.as_array().unwrap().len(), 1);
    assert_eq!(machines[0]["id"], machine_id.as_str());
    assert_ne!(machines[0]["certificate_serial"], Value::Null);
    let wiped = server.dir.path().join("wiped");
    let takeover = run_with(
        &wiped,
        &server.new_token(&client),
        &curl_pin,
        "INSTALL-HW-1",
    );
    let stderr = String::from_utf8_lossy(&takeover.stderr);
    assert!(
        !takeover.status.success()
            && stderr.contains("machine_already_enrolled")
            && stderr.contains("--machine"),
        "{stderr}"
    );
    let bound = server.admin_json(&[
        "token",
        "create",
        "--client",
        &client,
        "--machine",
        &machine_id,
    ]);
    let rebound = run_with(
        &wiped,
        bound["token"].as_str().unwrap(),
        &curl_pin,
        "INSTALL-HW-1",
    );
    assert!(
        rebound.status.success(),
        "{}",
        String::from_utf8_lossy(&rebound.stderr)
    );
    assert_eq!(
        server.admin_json(&["machine", "list"])[0]["id"],
        machine_id.as_str()
    );

    // Missing downloads are a clear 404, not a crash.
    let r = server
        .https_client()
        .get(format!(
            "{}/downloads/stable/nope",
            server.server.public_url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = server
        .https_client()
        .get(format!(
            "{}/downloads/stable/..%2Fserver.key",
            server.server.public_url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[test]
fn cli_errors_are_one_clear_line_with_documented_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere");
    let out = Command::new(SERVER)
        .arg("serve")
        .arg("--data-dir")
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not initialized: run `license-server init"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let out = Command::new(SERVER)
        .args(["init", "--certificate-validity-days", "0", "--data-dir"])
        .arg(dir.path().join("a"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("certificate_validity_days"));

    let out = Command::new(SERVER)
        .args(["init", "--public-listen", "not-an-address", "--data-dir"])
        .arg(dir.path().join("b"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--public-listen"));

    let data = dir.path().join("srv");
    assert!(Command::new(SERVER)
        .arg("init")
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap()
        .status
        .success());
    let admin = |args: &[&str]| {
        Command::new(SERVER)
            .arg("admin")
            .arg("--data-dir")
            .arg(&data)
            .args(args)
            .output()
            .unwrap()
    };
    assert_eq!(
        admin(&["machine", "revoke", "00000000-0000-0000-0000-000000000000"])
            .status
            .code(),
        Some(3)
    );
    let bad = admin(&["machine", "revoke", "not-a-uuid"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("machine_id"));
    assert!(admin(&["client", "create", "--name", "Dup"])
        .status
        .success());
    let dup = admin(&["client", "create", "--name", "Dup"]);
    assert_eq!(dup.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already exists"));
    let bad_token = admin(&[
        "token",
        "create",
        "--client",
        "00000000-0000-0000-0000-000000000000",
        "--ttl",
        "soon",
    ]);
    assert_eq!(bad_token.status.code(), Some(2));
    // Re-running init never overwrites key material.
    let again = Command::new(SERVER)
        .arg("init")
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(4));
    // Human output is a table; --json is JSON.
    let human = String::from_utf8(admin(&["client", "list"]).stdout).unwrap();
    assert!(human.starts_with("ID") && human.contains("Dup"));
    let json: Value = serde_json::from_slice(&admin(&["--json", "client", "list"]).stdout).unwrap();
    assert_eq!(json[0]["name"], "Dup");
}
