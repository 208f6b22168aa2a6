//! `GET /metrics` on the admin listener against a real server (issue "the vendor's fleet
//! console", item 3): behind an admin API token, Prometheus text that `promtool check metrics`
//! accepts, with the requests just made, the fleet's machines by health and what expires soon.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};

use common::{metric_sample, Db, TestServer};
use serde_json::json;

async fn sql(server: &TestServer, statement: &str) {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&server.db.url).await.unwrap();
    sqlx::query(statement).execute(&pool).await.unwrap();
    pool.close().await;
}

async fn server_metrics(db: Db) {
    let server = TestServer::start_with(db, &["--bootstrap-rate-per-minute", "3"]);
    let client = server.new_client("Metrics");
    let (seen, key) = server.enroll_http(&server.new_token(&client), "SEEN").await;
    let (silent, _) = server
        .enroll_http(&server.new_token(&client), "SILENT")
        .await;
    let (revoked, _) = server
        .enroll_http(&server.new_token(&client), "REVOKED")
        .await;
    server.admin_json(&["machine", "revoke", revoked["machine_id"].as_str().unwrap()]);
    let url = &server.server.agent_url;
    let cert = seen["certificate"].as_str().unwrap();
    assert_eq!(server.secret_status(url, cert, &key).await.0, 200);
    // A report from the machine seen: degraded, running on the TPM fallback, its clock found
    // an hour behind at its last start.
    let report = json!({
        "agent_version": "1", "store": "file", "tpm_enabled": true, "tpm_available": false,
        "degraded_mode": "active", "rotation_failures": 2, "audit_chain_ok": true,
        "certificate_expires_at": 1_900_000_000, "clock_rollback_secs": 3600,
    });
    let r = server
        .mtls_client(cert, &key)
        .post(format!("{url}/api/v1/health"))
        .json(&report)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    // The silent one was last seen two days ago.
    let silent_id = silent["machine_id"].as_str().unwrap();
    sql(
        &server,
        &format!(
            "UPDATE machines SET last_seen_at = {} WHERE id = '{silent_id}'",
            now() - 2 * 86_400
        ),
    )
    .await;
    // A license expiring in three days.
    server.admin_json(&[
        "license",
        "issue",
        "--machine",
        seen["machine_id"].as_str().unwrap(),
        "--features",
        "pos.sale",
        "--expires-in",
        "3d",
    ]);
    // Rate-limited bootstraps (3 a minute here; two enrollments of the five are the tokens'
    // machines above, so a few garbage attempts are enough).
    for _ in 0..4 {
        server
            .https_client()
            .post(format!("{}/api/public/bootstrap", server.server.public_url))
            .json(
                &json!({"token": "lit_nope", "hostname": "x", "hardware_id": "X", "arch": "amd64"}),
            )
            .send()
            .await
            .unwrap();
    }

    let http = server.https_client();
    let metrics_url = format!("{}/metrics", server.server.admin_url);
    assert_eq!(http.get(&metrics_url).send().await.unwrap().status(), 401);
    let token = server.admin_json(&["api-token", "create", "--name", "prometheus"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    let r = http
        .get(&metrics_url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = r.text().await.unwrap();

    assert!(
        metric_sample(
            &text,
            "license_server_enrollments_total{outcome=\"success\"}"
        ) >= 3.0
    );
    assert!(
        metric_sample(&text, "license_server_rate_limited_total") >= 1.0,
        "{text}"
    );
    assert!(
        metric_sample(
            &text,
            "license_server_http_requests_total{listener=\"agent\",route=\"/api/v1/secret-status\",method=\"GET\",status=\"200\"}"
        ) >= 1.0
    );
    for (health, n) in [
        ("seen_last_hour", 1.0),
        ("seen_longer_ago", 1.0),
        ("revoked", 1.0),
        ("degraded", 1.0),
        ("tpm_fallback", 1.0),
        ("rotation_failing", 1.0),
        ("clock_rollback", 1.0),
    ] {
        assert_eq!(
            metric_sample(
                &text,
                &format!("license_server_machines{{health=\"{health}\"}}")
            ),
            n,
            "{health}"
        );
    }
    assert_eq!(
        metric_sample(&text, "license_server_licenses_expiring{within=\"7d\"}"),
        1.0
    );
    assert_eq!(
        metric_sample(&text, "license_server_certificates_expiring{within=\"7d\"}"),
        0.0
    );
    assert!(metric_sample(&text, "license_server_db_pool_max_connections") >= 1.0);

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) must be installed");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
on_both_databases!(server_metrics);

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
