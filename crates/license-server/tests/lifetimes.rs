//! Certificates that renew by themselves (issue 9), against real server processes over real
//! TLS, with libfaketime moving the server's wall clock (its timers stay real):
//!
//! - a machine certificate that expired may renew itself on `POST /api/v1/renew-certificate`
//!   only, within `certificate_renew_after_expiry_days`, never when the machine or the
//!   certificate is revoked; every other route refuses it (`certificate_expired`);
//! - a renewal whose answer was lost is retried with the old, superseded certificate and the
//!   same CSR, and gets the machine's active certificate again (same serial);
//! - the server's own TLS certificate renews itself with the same key (the agents' pin holds),
//!   at start and while serving, and connections already open survive the swap.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{faketime, Db, TestServer};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use license_protocol::pin::CertPin;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::{json, Value};

/// Machine certificates living one minute, so that a server run 10 minutes ahead sees them
/// expired.
const SHORT_CERTS: &str = "certificate_validity_secs = 60";

fn csr_of(key: &rcgen::KeyPair) -> String {
    rcgen::CertificateParams::default()
        .serialize_request(key)
        .unwrap()
        .pem()
        .unwrap()
}

/// One request on the agent listener with a machine's certificate: (status, JSON body).
async fn agent_call(
    server: &TestServer,
    (cert, key): (&str, &str),
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let client = server.mtls_client(cert, key);
    let url = format!("{}{path}", server.server.agent_url);
    let request = match method {
        "GET" => client.get(url),
        _ => client.post(url).json(&body.unwrap_or(json!({}))),
    };
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn renew(server: &TestServer, identity: (&str, &str), csr: &str) -> (u16, Value) {
    agent_call(
        server,
        identity,
        "POST",
        "/api/v1/renew-certificate",
        Some(json!({ "csr": csr })),
    )
    .await
}

fn error_of(answer: &(u16, Value)) -> (u16, Option<&str>) {
    (answer.0, answer.1["error"].as_str())
}

/// The `certificate.renew` audit rows, oldest first.
fn renew_audit(server: &TestServer) -> Vec<Value> {
    let audit = server.admin_json(&["audit", "list", "--limit", "10000"]);
    audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "certificate.renew")
        .cloned()
        .collect()
}

/// Every route but renewal refuses the expired certificate, naming when it expired.
async fn assert_expired_everywhere_but_renewal(server: &TestServer, identity: (&str, &str)) {
    for (method, path) in [
        ("GET", "/api/v1/secret-status"),
        ("GET", "/api/v1/licenses"),
        ("POST", "/api/v1/rotate-secret"),
        ("POST", "/api/v1/rotate-secret/ack"),
        ("POST", "/api/v1/validate-license"),
    ] {
        let answer = agent_call(server, identity, method, path, None).await;
        assert_eq!(
            error_of(&answer),
            (403, Some("certificate_expired")),
            "{method} {path}: {}",
            answer.1
        );
        assert!(
            answer.1["message"].as_str().unwrap().contains("expired on"),
            "{}",
            answer.1
        );
    }
}

async fn expired_certificate_renews_within_the_window(db: Db) {
    let mut server = TestServer::start_configured(db, SHORT_CERTS, &[], &[]);
    let (_, machine, key) = server.enrolled_machine("expiry", "hw-expiry").await;
    let cert = machine["certificate"].as_str().unwrap().to_string();
    let old_serial = machine["serial"].as_str().unwrap().to_string();
    let url = server.server.agent_url.clone();
    assert_eq!(server.secret_status(&url, &cert, &key).await.0, 200);

    // Ten minutes later (the till was off): the handshake still completes, every route but
    // renewal refuses the certificate, and renewal works, proven by the old key.
    server.restart(&faketime("+10m"));
    assert_expired_everywhere_but_renewal(&server, (&cert, &key)).await;
    let next_key = rcgen::KeyPair::generate().unwrap();
    let answer = renew(&server, (&cert, &key), &csr_of(&next_key)).await;
    assert_eq!(answer.0, 200, "{}", answer.1);
    let new_cert = answer.1["certificate"].as_str().unwrap();
    assert_ne!(answer.1["serial"].as_str().unwrap(), old_serial);
    let url = server.server.agent_url.clone();
    let next_key = next_key.serialize_pem();
    assert_eq!(server.secret_status(&url, new_cert, &next_key).await.0, 200);
    // The old certificate is superseded now.
    let (status, body) = server.secret_status(&url, &cert, &key).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("certificate_superseded"))
    );

    let audit = renew_audit(&server);
    let last = audit.last().unwrap();
    assert_eq!(last["outcome"], "success", "{last}");
    assert_eq!(last["details"]["presented_serial"], old_serial.as_str());
    assert!(last["details"]["expired_since"].is_string(), "{last}");
}
on_both_databases!(expired_certificate_renews_within_the_window);

/// Past `certificate_renew_after_expiry_days`, or with it at 0, renewal is refused and the
/// answer says why and what to do instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificate_past_the_window_is_refused() {
    let config = format!("{SHORT_CERTS}\ncertificate_renew_after_expiry_days = 1");
    let mut server = TestServer::start_configured(Db::Sqlite, &config, &[], &[]);
    let (_, machine, key) = server.enrolled_machine("late", "hw-late").await;
    let cert = machine["certificate"].as_str().unwrap().to_string();
    let csr = csr_of(&rcgen::KeyPair::generate().unwrap());

    server.restart(&faketime("+2d"));
    let answer = renew(&server, (&cert, &key), &csr).await;
    assert_eq!(error_of(&answer), (403, Some("certificate_expired")));
    let message = answer.1["message"].as_str().unwrap();
    for part in [
        "expired on",
        "certificate_renew_after_expiry_days = 1",
        "ended on",
        "recovery token",
    ] {
        assert!(message.contains(part), "{part}: {message}");
    }
    let audit = renew_audit(&server);
    let last = audit.last().unwrap();
    assert_eq!(
        (last["outcome"].as_str(), last["details"]["reason"].as_str()),
        (Some("refused"), Some("certificate_expired")),
        "{last}"
    );

    // Renewal after expiry switched off: refused at once, naming the key.
    common::set_config_keys(
        &server.data_dir().join("server.toml"),
        "certificate_renew_after_expiry_days = 0",
    );
    server.restart(&faketime("+10m"));
    let answer = renew(&server, (&cert, &key), &csr).await;
    assert_eq!(error_of(&answer), (403, Some("certificate_expired")));
    let message = answer.1["message"].as_str().unwrap();
    assert!(
        message.contains("certificate_renew_after_expiry_days = 0") && message.contains("disabled"),
        "{message}"
    );
}

/// Revocation is checked before the window: a revoked machine, or a revoked certificate,
/// never renews.
async fn revoked_never_renews_within_the_window(db: Db) {
    let mut server = TestServer::start_configured(db, SHORT_CERTS, &[], &[]);
    let (_, revoked_machine, key_a) = server.enrolled_machine("rev-a", "hw-rev-a").await;
    let (_, revoked_cert, key_b) = server.enrolled_machine("rev-b", "hw-rev-b").await;
    let machine_id = revoked_machine["machine_id"].as_str().unwrap();
    server.admin_json(&["machine", "revoke", machine_id]);
    let serial = revoked_cert["serial"].as_str().unwrap();
    server.admin_json(&["cert", "revoke", serial]);
    let cert_a = revoked_machine["certificate"].as_str().unwrap();
    let cert_b = revoked_cert["certificate"].as_str().unwrap();
    let csr = csr_of(&rcgen::KeyPair::generate().unwrap());

    server.restart(&faketime("+10m"));
    let answer = renew(&server, (cert_a, &key_a), &csr).await;
    assert_eq!(error_of(&answer), (403, Some("machine_revoked")));
    let answer = renew(&server, (cert_b, &key_b), &csr).await;
    assert_eq!(error_of(&answer), (403, Some("certificate_revoked")));
    let certs = server.admin_json(&["cert", "list", "--machine", machine_id]);
    assert_eq!(certs.as_array().unwrap().len(), 1, "nothing was issued");
}
on_both_databases!(revoked_never_renews_within_the_window);

/// The agent wrote its next key, asked for renewal, and crashed before saving the answer: it
/// retries with the old (now superseded) certificate and the same CSR, and gets the active
/// certificate again. Another key is refused; so is any other use of the old certificate.
/// The same holds once both certificates have expired.
async fn superseded_certificate_retries_renewal_with_the_same_key(db: Db) {
    let mut server = TestServer::start_configured(db, SHORT_CERTS, &[], &[]);
    let (_, machine, key) = server.enrolled_machine("retry", "hw-retry").await;
    let old = machine["certificate"].as_str().unwrap().to_string();
    let next_key = rcgen::KeyPair::generate().unwrap();
    let csr = csr_of(&next_key);

    let first = renew(&server, (&old, &key), &csr).await;
    assert_eq!(first.0, 200, "{}", first.1);
    let retry = renew(&server, (&old, &key), &csr).await;
    assert_eq!(retry.0, 200, "{}", retry.1);
    assert_eq!(retry.1["serial"], first.1["serial"], "no new issuance");
    assert_eq!(retry.1["certificate"], first.1["certificate"]);
    assert_eq!(retry.1["expires_at"], first.1["expires_at"]);

    let other = csr_of(&rcgen::KeyPair::generate().unwrap());
    let answer = renew(&server, (&old, &key), &other).await;
    assert_eq!(error_of(&answer), (403, Some("certificate_superseded")));
    let url = server.server.agent_url.clone();
    let (status, body) = server.secret_status(&url, &old, &key).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("certificate_superseded"))
    );

    let machine_id = machine["machine_id"].as_str().unwrap();
    let certs = server.admin_json(&["cert", "list", "--machine", machine_id]);
    assert_eq!(
        certs.as_array().unwrap().len(),
        2,
        "the retry issued nothing"
    );
    let audit = renew_audit(&server);
    assert!(
        audit.iter().any(|e| e["outcome"] == "success"
            && e["details"]["retry"] == true
            && e["details"]["serial"] == first.1["serial"]),
        "{audit:?}"
    );

    // Both certificates expired (off for ten minutes): the retry still answers the active
    // certificate, which then renews itself within the window.
    server.restart(&faketime("+10m"));
    let retry = renew(&server, (&old, &key), &csr).await;
    assert_eq!(retry.0, 200, "{}", retry.1);
    assert_eq!(retry.1["serial"], first.1["serial"]);
    let answer = renew(&server, (&old, &key), &other).await;
    assert_eq!(error_of(&answer), (403, Some("certificate_superseded")));
    let active = first.1["certificate"].as_str().unwrap();
    let next_key = next_key.serialize_pem();
    let renewed = renew(&server, (active, &next_key), &csr).await;
    assert_eq!(renewed.0, 200, "{}", renewed.1);
    assert_ne!(renewed.1["serial"], first.1["serial"]);
}
on_both_databases!(superseded_certificate_retries_renewal_with_the_same_key);

// ---- the server's own TLS certificate -------------------------------------------------------

/// Accepts any server certificate (the server runs years ahead of this test's clock) and
/// records each one it is shown; signatures are still checked.
#[derive(Debug, Default)]
struct Recorder {
    seen: Mutex<Vec<Vec<u8>>>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.seen.lock().unwrap().push(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

fn algorithms() -> rustls::crypto::WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

fn recording_tls(recorder: &Arc<Recorder>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Opens a TLS connection to `addr` and returns the certificate it served.
async fn served_certificate(addr: &str) -> Vec<u8> {
    let recorder = Arc::new(Recorder::default());
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    // The agent listener wants a client certificate: the handshake may fail after the server
    // certificate was seen, which is all this needs.
    let _ = tokio_rustls::TlsConnector::from(recording_tls(&recorder))
        .connect(name, tcp)
        .await;
    let seen = recorder.seen.lock().unwrap();
    seen.first().expect("the server sent a certificate").clone()
}

/// The certificate of all three listeners, which must be the same.
async fn served_everywhere(server: &TestServer) -> Vec<u8> {
    let ready = &server.server.ready;
    let public = served_certificate(ready["public"].as_str().unwrap()).await;
    let agent = served_certificate(ready["agent"].as_str().unwrap()).await;
    let admin = served_certificate(ready["admin"].as_str().unwrap()).await;
    assert!(
        public == agent && agent == admin,
        "one certificate on all listeners"
    );
    public
}

struct Facts {
    serial: String,
    not_before: i64,
    not_after: i64,
    pin: String,
}

fn facts(der: &[u8]) -> Facts {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    Facts {
        serial: hex::encode(cert.raw_serial()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        pin: CertPin::of_certificate_der(der).unwrap().to_string(),
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn pem_der(pem: &str) -> Vec<u8> {
    ::pem::parse(pem).unwrap().contents().to_vec()
}

/// Started 500 days ahead (past 2/3 of 730 days), the server renews its certificate before
/// serving: same key, so the pin holds; written to the data directory; audited. With the
/// lifetime set to 30 days, the next renewal comes 20 days later; a long-expired certificate
/// renews too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_certificate_renews_itself_at_start() {
    let config = "server_certificate_validity_days = 30";
    let mut server = TestServer::start_configured(Db::Sqlite, config, &[], &[]);
    let pin = server.pin();
    let pem_path = server.data_dir().join("server.pem");
    let initial = facts(&pem_der(&std::fs::read_to_string(&pem_path).unwrap()));
    assert_eq!(initial.pin, pin);
    let served = facts(&served_everywhere(&server).await);
    assert_eq!(served.serial, initial.serial, "not due yet: unchanged");

    let day = 86_400;
    let mut previous = initial.serial.clone();
    for (offset, days_ahead) in [("+500d", 500), ("+521d", 521), ("+2000d", 2000)] {
        server.restart(&faketime(offset));
        let served = facts(&served_everywhere(&server).await);
        assert_ne!(served.serial, previous, "{offset}: renewed");
        assert_eq!(served.pin, pin, "{offset}: same key, same pin");
        let fake_now = now() + days_ahead * day;
        assert!(
            (served.not_before - (fake_now - 300)).abs() < 120,
            "{offset}: fresh"
        );
        assert_eq!(served.not_after - served.not_before, 30 * day + 300);
        let on_disk = facts(&pem_der(&std::fs::read_to_string(&pem_path).unwrap()));
        assert_eq!(
            on_disk.serial, served.serial,
            "{offset}: written to server.pem"
        );
        assert_eq!(server.server.ready["server_pin"], pin.as_str());
        previous = served.serial;
    }

    // Not due: a restart at the same offset serves the same certificate.
    server.restart(&faketime("+2000d"));
    assert_eq!(facts(&served_everywhere(&server).await).serial, previous);

    let audit = server.admin_json(&["audit", "list", "--limit", "10000"]);
    let renewals: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "server.certificate_renew")
        .collect();
    assert_eq!(renewals.len(), 3, "{renewals:?}");
    assert_eq!(
        renewals[0]["details"]["old_serial"],
        initial.serial.as_str()
    );
    assert_eq!(renewals[2]["details"]["serial"], previous.as_str());
    assert_eq!(renewals[2]["details"]["expired"], true);
    assert_eq!(renewals[0]["details"]["server_pin"], pin.as_str());
}

/// One HTTP/1.1 GET on an open connection: the status, after reading the whole body.
async fn get_on(sender: &mut hyper::client::conn::http1::SendRequest<String>, path: &str) -> u16 {
    let request = hyper::Request::get(path)
        .header("host", "localhost")
        .body(String::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let mut body: Incoming = response.into_body();
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        frame.unwrap();
    }
    status
}

/// While serving, the periodic check renews the certificate once it is due (the server's
/// clock jumps 500 days ahead through a libfaketime timestamp file): new connections get the
/// new certificate, same pin; a connection opened before keeps working on the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_certificate_swaps_while_serving_and_open_connections_survive() {
    let dir = tempfile::tempdir().unwrap();
    let clock = dir.path().join("faketime");
    std::fs::write(&clock, "+0d\n").unwrap();
    let mut env = faketime("+0d");
    env.retain(|(k, _)| k != "FAKETIME");
    env.push((
        "FAKETIME_TIMESTAMP_FILE".into(),
        clock.display().to_string(),
    ));
    env.push(("FAKETIME_CACHE_DURATION".into(), "1".into()));
    let server = TestServer::start_configured(
        Db::Sqlite,
        "server_certificate_check_interval_secs = 1",
        &[],
        &env,
    );
    let pin = server.pin();
    let before = facts(&served_everywhere(&server).await);

    // A connection opened now, on the public listener.
    let recorder = Arc::new(Recorder::default());
    let addr = server.server.ready["public"].as_str().unwrap().to_string();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(recording_tls(&recorder))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    assert_eq!(get_on(&mut sender, "/api/openapi.json").await, 200);

    std::fs::write(&clock, "+500d\n").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let after = loop {
        let served = facts(&served_certificate(&addr).await);
        if served.serial != before.serial {
            break served;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the certificate was not renewed while serving"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(after.pin, pin);
    assert!(
        after.not_before > now() + 400 * 86_400,
        "issued on the server's (fake) clock"
    );
    assert_eq!(
        facts(&served_everywhere(&server).await).serial,
        after.serial,
        "all three listeners serve the new certificate"
    );

    // The connection opened before the swap still works, and never saw a second handshake.
    assert_eq!(get_on(&mut sender, "/api/openapi.json").await, 200);
    let seen = recorder.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(facts(&seen[0]).serial, before.serial);
    let status = server.server.stop();
    assert!(status.success());
}
