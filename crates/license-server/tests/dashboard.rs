//! The dashboard in a real browser (issue "the vendor's fleet console", item 1): Debian's
//! `chromium`, driven by `playwright-core` from npm (`tests/dashboard/dashboard.mjs`), against a
//! real `license-server` with a really enrolled machine. The browser signs in, reads the
//! overview, opens the machine and its certificates, issues a license, revokes the machine,
//! creates an install token and reads its one-liner, filters the audit trail, signs out, and
//! checks that a readonly session sees no action and that POSTs without the CSRF token (or from
//! a readonly session) are refused with 403. This side then checks what the server did: the
//! revoked machine is refused on the agent API, the license exists, the token from the page
//! enrolls a machine, and the audit trail names the admin token as the API does.
//!
//! A screenshot of each page is kept in `target/tmp/dashboard-screenshots/`. The test fails (it
//! does not skip) when chromium, node or npm is missing: `scripts/test.sh` installs them.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Db, TestServer};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";

fn driver_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dashboard")
}

fn require(program: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{program} is required by the dashboard browser test: run scripts/test.sh, which installs it"
    );
}

/// `npm ci` in the driver's directory, unless the locked playwright-core is already there.
fn install_driver() {
    let dir = driver_dir();
    let installed = dir.join("node_modules/playwright-core/package.json");
    let locked: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("package-lock.json")).unwrap())
            .unwrap();
    let wanted = locked["packages"]["node_modules/playwright-core"]["version"].clone();
    let have = std::fs::read_to_string(&installed)
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .map(|p| p["version"].clone());
    if have.as_ref() == Some(&wanted) {
        return;
    }
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "npm ci: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn report_health(server: &TestServer, cert: &str, key: &str) {
    let report = json!({
        "agent_version": "0.1.0", "store": "tpm", "tpm_enabled": true, "tpm_available": true,
        "degraded_mode": "inactive", "rotation_failures": 2, "clock_rollback_secs": 120,
        "audit_chain_ok": true, "certificate_expires_at": 1_900_000_000,
    });
    let r = server
        .mtls_client(cert, key)
        .post(format!("{}/api/v1/health", server.server.agent_url))
        .json(&report)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_chromium() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is required by the dashboard browser test: run scripts/test.sh, which installs Debian's chromium"
    );
    require("node");
    require("npm");
    install_driver();

    let server = TestServer::start(Db::Sqlite);
    let token = |name: &str, role: &str| {
        server.admin_json(&["api-token", "create", "--name", name, "--role", role])["token"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (admin_token, readonly_token) = (token("ops", "admin"), token("viewer", "readonly"));
    let (client_id, machine, key) = server.enrolled_machine("Acme Bakeries", "HW-1").await;
    let machine_id = machine["machine_id"].as_str().unwrap().to_string();
    let cert = machine["certificate"].as_str().unwrap().to_string();
    let url = server.server.agent_url.clone();
    assert_eq!(server.secret_status(&url, &cert, &key).await.0, 200);
    report_health(&server, &cert, &key).await;
    let certs = server.admin_json(&["cert", "list", "--machine", &machine_id]);
    let serial = certs[0]["serial"].as_str().unwrap().to_string();

    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let started = std::time::Instant::now();
    let out = Command::new("node")
        .arg(driver_dir().join("dashboard.mjs"))
        .current_dir(driver_dir())
        .env("DASHBOARD_URL", &server.server.admin_url)
        .env("ADMIN_TOKEN", &admin_token)
        .env("READONLY_TOKEN", &readonly_token)
        .env("MACHINE_ID", &machine_id)
        .env("CLIENT_NAME", "Acme Bakeries")
        .env("CERT_SERIAL", &serial)
        .env("SCREENSHOT_DIR", &shots)
        .env("CHROMIUM", CHROMIUM)
        .output()
        .unwrap();
    let log = std::fs::read_to_string(server.data_dir().join("serve.stderr")).unwrap_or_default();
    assert!(
        out.status.success(),
        "browser run failed:\n{}\n{}\nserver log:\n{log}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("browser run: {:?}", started.elapsed());
    let seen: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
    assert_eq!(seen["forged_status"], 403);
    assert_eq!(seen["readonly_status"], 403);

    // Revoked from the dashboard: refused on the agent API.
    let (status, body) = server.secret_status(&url, &cert, &key).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("machine_revoked"))
    );

    // The license issued in the browser.
    let licenses = server.admin_json(&["license", "list", "--machine", &machine_id]);
    assert_eq!(licenses.as_array().unwrap().len(), 1);
    assert_eq!(licenses[0]["features"], json!(["pos.sale", "pos.refund"]));
    assert_eq!(licenses[0]["state"], "active");

    // The install token shown once on the page, in the CLI's one-liner, enrolls a new machine
    // of the client.
    let install_token = seen["install_token"].as_str().unwrap();
    let command = seen["install_command"].as_str().unwrap();
    assert!(command.starts_with("curl -fsSL -k --pinnedpubkey 'sha256//"));
    assert!(command.contains(&format!("{}/install.sh", server.server.public_url)));
    // Run as an operator pastes it on a till (sudo aside, as root already, and under a prefix
    // so nothing outside the test's directory changes): install.sh downloads the agent and
    // enrolls the machine.
    assert!(command.ends_with(&format!("| sudo bash -s -- {install_token}")));
    let command = command.replace("| sudo bash", "| bash");
    let downloads = server.data_dir().join("downloads/stable");
    std::fs::create_dir_all(&downloads).unwrap();
    std::fs::copy(
        common::agent_bin(),
        downloads.join("license-agent-linux-amd64"),
    )
    .unwrap();
    let installed = Command::new("bash")
        .args(["-o", "pipefail", "-c", &command])
        .env("LICENSE_AGENT_PREFIX", server.dir.path().join("till"))
        .env("LICENSE_AGENT_HARDWARE_ID", "HW-2")
        .output()
        .unwrap();
    assert!(
        installed.status.success(),
        "the page's one-liner failed:\n{}\n{}",
        String::from_utf8_lossy(&installed.stdout),
        String::from_utf8_lossy(&installed.stderr)
    );
    let machines = server.admin_json(&["machine", "list", "--client", &client_id]);
    assert!(
        machines
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["hardware_id"] == "HW-2"),
        "{machines}"
    );

    // Audited as the admin API audits: actor `api:<token name>`; sign-ins too. Nothing secret
    // in the trail or the log.
    let audit = server.admin_json(&["audit", "list", "--limit", "1000"]);
    let events = audit.as_array().unwrap();
    let by = |action: &str| {
        events
            .iter()
            .filter(|e| e["action"] == action && e["outcome"] == "success")
            .map(|e| e["actor"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(by("machine.revoke"), ["api:ops"]);
    assert_eq!(by("license.issue"), ["api:ops"]);
    assert_eq!(by("install_token.create")[1..], ["api:ops"]);
    assert_eq!(by("dashboard.sign_in"), ["api:ops", "api:viewer"]);
    assert_eq!(by("dashboard.sign_out"), ["api:ops"]);
    assert!(events
        .iter()
        .any(|e| e["action"] == "dashboard.sign_in" && e["outcome"] == "refused"));
    let trail = audit.to_string();
    for secret in [admin_token.as_str(), readonly_token.as_str(), install_token] {
        assert!(!trail.contains(secret));
        assert!(!log.contains(secret));
    }

    for page in [
        "01-sign-in",
        "02-overview",
        "03-clients",
        "04-client",
        "05-machine",
        "06-machine-revoked",
        "07-install-token",
        "08-audit",
        "09-machine-readonly",
    ] {
        let path = shots.join(format!("{page}.png"));
        assert!(
            std::fs::metadata(&path).is_ok_and(|m| m.len() > 1000),
            "{} missing",
            path.display()
        );
    }
}

/// The session cookie a sign-in answer sets (`name=value`).
fn session_cookie(response: &reqwest::Response) -> String {
    let set = response
        .headers()
        .get("set-cookie")
        .expect("sign-in sets a cookie")
        .to_str()
        .unwrap();
    set.split(';').next().unwrap().to_string()
}

/// The CSRF token in a page's forms.
fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").unwrap() + "name=\"csrf\" value=\"".len();
    html[at..].split('"').next().unwrap().to_string()
}

/// Every page and the audit filters, over plain HTTPS on both databases (no browser): the
/// queries behind them run on SQLite and PostgreSQL alike; revoking the admin token ends its
/// session; a session-less POST or one from another origin is refused; sign-in attempts are
/// rate-limited.
async fn pages_on(db: Db) {
    let server = TestServer::start(db);
    let admin_token =
        server.admin_json(&["api-token", "create", "--name", "ops", "--role", "admin"])["token"]
            .as_str()
            .unwrap()
            .to_string();
    let (client_id, machine, key) = server.enrolled_machine("Acme", "HW-1").await;
    let machine_id = machine["machine_id"].as_str().unwrap();
    report_health(&server, machine["certificate"].as_str().unwrap(), &key).await;
    let base = &server.server.admin_url;
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(common::tls_config(&server.ca_pem(), None, false))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    // Without a session: pages redirect to the sign-in form, POSTs are refused.
    let r = http.get(format!("{base}/dashboard")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/dashboard/sign-in");
    let r = http
        .post(format!("{base}/dashboard/machines/{machine_id}/revoke"))
        .form(&[("csrf", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // The admin API still wants its bearer token everywhere else.
    let r = http
        .get(format!("{base}/api/admin/clients"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let r = http
        .post(format!("{base}/dashboard/sign-in"))
        .form(&[("token", admin_token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cookie = session_cookie(&r);
    let get = |path: String| {
        let http = http.clone();
        let cookie = cookie.clone();
        async move {
            let r = http
                .get(path)
                .header("cookie", cookie)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let csp = r.headers()["content-security-policy"]
                .to_str()
                .unwrap()
                .to_string();
            assert!(csp.contains("default-src 'none'"));
            (status, r.text().await.unwrap())
        }
    };
    for path in [
        "/dashboard".to_string(),
        "/dashboard/clients".into(),
        format!("/dashboard/clients/{client_id}"),
        format!("/dashboard/machines/{machine_id}"),
        "/dashboard/install-tokens".into(),
        format!("/dashboard/install-tokens?client_id={client_id}"),
        "/dashboard/audit".into(),
        "/dashboard/audit?actor=api%3Aops&action=dashboard.sign_in&target=".into(),
        format!("/dashboard/audit?target={machine_id}&before=1000"),
        "/dashboard/assets/style.css".into(),
    ] {
        let (status, body) = get(format!("{base}{path}")).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (_, overview) = get(format!("{base}/dashboard")).await;
    assert!(
        overview.contains(r#"id="clock-rollbacks">1<"#),
        "{overview}"
    );
    let (_, audit) = get(format!(
        "{base}/dashboard/audit?actor=api%3Aops&action=dashboard.sign_in"
    ))
    .await;
    assert_eq!(
        audit.matches("<td>dashboard.sign_in</td>").count(),
        1,
        "{audit}"
    );
    let (status, _) = get(format!("{base}/dashboard/machines/not-a-uuid")).await;
    assert_eq!(status, 400);

    // An action with the page's CSRF token works; with a cross-site Origin it does not.
    let (_, page) = get(format!("{base}/dashboard/machines/{machine_id}")).await;
    let csrf = csrf_of(&page);
    let post = |path: String, origin: Option<&'static str>| {
        let mut req = http
            .post(format!("{base}{path}"))
            .header("cookie", cookie.clone())
            .form(&[("csrf", csrf.as_str())]);
        if let Some(origin) = origin {
            req = req.header("origin", origin);
        }
        req.send()
    };
    let r = post(
        format!("/dashboard/machines/{machine_id}/rotate"),
        Some("https://evil.example"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    let r = post(format!("/dashboard/machines/{machine_id}/rotate"), None)
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let shown = server.admin_json(&["machine", "show", machine_id]);
    assert!(shown["rotation_requested_at"].is_string());

    // Revoking the admin token ends its session at once.
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&server.db.url).await.unwrap();
    sqlx::query("UPDATE admin_tokens SET revoked_at = 1")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let r = http
        .get(format!("{base}/dashboard"))
        .header("cookie", cookie.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);

    // Sign-in attempts are limited per address (10 a minute by default, the one above
    // included): wrong tokens get 401 until the quota is spent, then 429.
    let mut statuses = Vec::new();
    for _ in 0..11 {
        let r = http
            .post(format!("{base}/dashboard/sign-in"))
            .form(&[("token", "lat_wrong")])
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses[0], 401);
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
}

on_both_databases!(pages_on);
