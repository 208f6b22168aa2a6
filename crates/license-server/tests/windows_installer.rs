//! Windows installers (issue #14, "EXE = stub + token") from a real server: the CLI
//! (`admin token create --windows-installer`), the admin API
//! (`POST /api/admin/install-tokens/windows-installer`) and the dashboard's button each write
//! the Windows agent with a trailer that reads back to the server's public URL, its pin and a
//! fresh single-use token that enrolls a machine; a missing, unreadable or foreign stub is
//! refused naming its path and where it was set, and mints no token.
//!
//! The stub is a synthetic PE header (what `license_protocol::installer::append` checks), so
//! the test needs no Windows toolchain.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use common::{tls_config, Db, TestServer};
use license_protocol::installer;
use serde_json::Value;

/// A minimal PE32+ file: MZ, e_lfanew, the PE signature, the optional header's magic and 16
/// empty data directories, then `body` bytes.
fn pe(body: usize) -> Vec<u8> {
    let mut f = vec![0u8; 0x200 + body];
    f[..2].copy_from_slice(b"MZ");
    f[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
    f[0x80..0x84].copy_from_slice(b"PE\0\0");
    let optional = 0x80 + 24;
    f[optional..optional + 2].copy_from_slice(&0x20bu16.to_le_bytes());
    f[optional + 108..optional + 112].copy_from_slice(&16u32.to_le_bytes());
    for (i, b) in f[0x200..].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    f
}

fn default_stub(server: &TestServer) -> PathBuf {
    server.data_dir().join("windows/license-agent.exe")
}

fn put_stub(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn tokens(server: &TestServer, client: &str) -> Vec<Value> {
    server
        .admin_json(&["token", "list", "--client", client])
        .as_array()
        .unwrap()
        .clone()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The trailer of `file`, checked against the server: (token, stub bytes).
fn read_back(server: &TestServer, file: &[u8]) -> (String, Vec<u8>) {
    let read = installer::read(file).unwrap();
    assert_eq!(read.payload.server, server.server.public_url);
    assert_eq!(read.payload.pin.to_string(), server.pin());
    let token = serde_json::to_value(&read.payload.token).unwrap();
    let token = token.as_str().unwrap().to_string();
    assert!(token.starts_with("lit_"), "not an install token");
    (token, read.stub.to_vec())
}

fn refused_creations(server: &TestServer) -> Vec<Value> {
    server
        .admin_json(&["audit", "list"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "install_token.create" && e["outcome"] == "refused")
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_writes_an_installer_whose_token_enrolls() {
    // The CLI names the public URL from server.toml, without asking the running server: the
    // public listener gets a fixed port there, so the two agree.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let server = TestServer::start_configured(
        Db::Sqlite,
        &format!("public_listen = \"{listen}\""),
        &["--public-listen", &listen],
        &[],
    );
    assert_eq!(
        server.server.public_url,
        format!("https://localhost:{port}")
    );
    let client = server.new_client("Windows Tills");
    let stub = pe(4000);
    put_stub(&default_stub(&server), &stub);
    let out_dir = server.dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("till.exe");

    let run = server.admin(&[
        "token",
        "create",
        "--client",
        &client,
        "--windows-installer",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout).to_string();
    let stderr = String::from_utf8_lossy(&run.stderr).to_string();
    assert!(run.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains(out.to_str().unwrap()), "{stdout}");
    assert!(stdout.contains("single use"), "{stdout}");
    assert!(
        !stdout.contains("lit_") && !stderr.contains("lit_"),
        "{stdout}\n{stderr}"
    );
    // Written whole and private; no temporary file left beside it.
    assert_eq!(files_in(&out_dir), ["till.exe"]);
    let mode = std::fs::metadata(&out).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");

    let file = std::fs::read(&out).unwrap();
    let (token, read_stub) = read_back(&server, &file);
    assert_eq!(read_stub, stub, "the stub is carried unchanged");
    let listed = tokens(&server, &client);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let id = listed[0]["id"].as_str().unwrap();
    assert!(stdout.contains(id), "the token id is printed: {stdout}");
    assert!(listed[0]["used_at"].is_null());

    // The token in the file is a real one: it enrolls a machine, once.
    let (status, body, _) = server.bootstrap_http(&token, "HW-WIN-1", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(!tokens(&server, &client)[0]["used_at"].is_null());
    let (status, body, _) = server.bootstrap_http(&token, "HW-WIN-2", None).await;
    assert_eq!(status, 410, "{body}");

    // --json, another stub named on the command line, a lifetime: the path, never the token.
    let other = server.dir.path().join("agent-2.exe");
    put_stub(&other, &pe(10));
    let out2 = out_dir.join("second.exe");
    let report = server.admin_json(&[
        "token",
        "create",
        "--client",
        &client,
        "--ttl",
        "2h",
        "--windows-installer",
        out2.to_str().unwrap(),
        "--windows-stub",
        other.to_str().unwrap(),
    ]);
    assert_eq!(report["windows_installer"], out2.to_str().unwrap());
    assert_eq!(report["client_id"], client.as_str());
    assert_eq!(report["server"], server.server.public_url.as_str());
    assert!(report.get("token").is_none() && report.get("install_command").is_none());
    assert!(!report.to_string().contains("lit_"), "{report}");
    let (_, read_stub) = read_back(&server, &std::fs::read(&out2).unwrap());
    assert_eq!(read_stub, pe(10));
    let listed = tokens(&server, &client);
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().any(|t| t["id"] == report["id"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_refuses_an_unusable_stub_and_mints_nothing() {
    let server = TestServer::start(Db::Sqlite);
    let client = server.new_client("Windows Tills");
    let out_dir = server.dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("till.exe");
    let create = |extra: &[&str]| {
        let mut args = vec![
            "token",
            "create",
            "--client",
            &client,
            "--windows-installer",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let run = server.admin(&args);
        (
            run.status.code(),
            String::from_utf8_lossy(&run.stderr).to_string(),
        )
    };

    // No stub at the default place: named with the configuration key.
    let default = default_stub(&server);
    let (code, stderr) = create(&[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("windows_stub"), "{stderr}");
    assert!(stderr.contains(default.to_str().unwrap()), "{stderr}");

    // A stub named on the command line: named with the flag.
    let missing = server.dir.path().join("nowhere/license-agent.exe");
    let (code, stderr) = create(&["--windows-stub", missing.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--windows-stub"), "{stderr}");
    assert!(stderr.contains(missing.to_str().unwrap()), "{stderr}");

    // Not a Windows executable; a directory; an installer already carrying a token.
    let text = server.dir.path().join("agent.txt");
    std::fs::write(&text, "#!/bin/sh\n").unwrap();
    let (code, stderr) = create(&["--windows-stub", text.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("not a Windows executable"), "{stderr}");
    let (code, stderr) = create(&["--windows-stub", out_dir.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("not a regular file"), "{stderr}");
    let stub = server.dir.path().join("agent.exe");
    put_stub(&stub, &pe(100));
    let tagged_out = server.dir.path().join("tagged.exe");
    let made = server.admin(&[
        "token",
        "create",
        "--client",
        &client,
        "--windows-installer",
        tagged_out.to_str().unwrap(),
        "--windows-stub",
        stub.to_str().unwrap(),
    ]);
    assert!(made.status.success());
    let (code, stderr) = create(&["--windows-stub", tagged_out.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("already carries"), "{stderr}");

    // An unwritable destination is found before the token is minted.
    let nowhere = server.dir.path().join("no-such-dir/till.exe");
    let run = server.admin(&[
        "token",
        "create",
        "--client",
        &client,
        "--windows-installer",
        nowhere.to_str().unwrap(),
        "--windows-stub",
        stub.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("--windows-installer"), "{stderr}");

    // --windows-stub alone is a usage error.
    let run = server.admin(&[
        "token",
        "create",
        "--client",
        &client,
        "--windows-stub",
        stub.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(2));

    // Only the one good installer minted a token; nothing else was written; every refusal
    // is in the audit trail.
    assert_eq!(tokens(&server, &client).len(), 1);
    assert!(files_in(&out_dir).is_empty(), "{:?}", files_in(&out_dir));
    let refused = refused_creations(&server);
    assert_eq!(refused.len(), 5, "{refused:?}");
    assert!(refused
        .iter()
        .all(|e| e["details"]["reason"] == "windows_stub_missing"));
}

/// An admin API client: (bearer header value, HTTPS client).
fn api_token(server: &TestServer, role: &str) -> String {
    let name = format!("installer-{role}");
    let token = server.admin_json(&["api-token", "create", "--name", &name, "--role", role]);
    format!("Bearer {}", token["token"].as_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_answers_with_the_installer() {
    // The stub's place comes from server.toml here (relative to the data directory).
    let server =
        TestServer::start_configured(Db::Sqlite, "windows_stub = \"stubs/agent.exe\"", &[], &[]);
    let client = server.new_client("Windows Tills");
    let (admin, readonly) = (api_token(&server, "admin"), api_token(&server, "readonly"));
    let http = server.https_client();
    let url = format!(
        "{}/api/admin/install-tokens/windows-installer",
        server.server.admin_url
    );
    let body = serde_json::json!({"client_id": client, "ttl_secs": 3600});
    let post = |bearer: &str| {
        http.post(&url)
            .header("Authorization", bearer)
            .json(&body)
            .send()
    };

    let r = post(&readonly).await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "forbidden");

    // No stub yet: 503 naming the configured path, no token.
    let stub_path = server.data_dir().join("stubs/agent.exe");
    let r = post(&admin).await.unwrap();
    assert_eq!(r.status(), 503);
    let error: Value = r.json().await.unwrap();
    assert_eq!(error["error"], "windows_stub_missing", "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains(stub_path.to_str().unwrap()), "{message}");
    assert!(message.contains("windows_stub"), "{message}");
    assert!(tokens(&server, &client).is_empty());

    put_stub(&stub_path, &pe(1000));
    let r = post(&admin).await.unwrap();
    assert_eq!(r.status(), 200);
    let header = |name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    assert_eq!(
        header("content-type"),
        "application/vnd.microsoft.portable-executable"
    );
    assert_eq!(
        header("content-disposition"),
        format!("attachment; filename=\"license-agent-installer-{client}.exe\"")
    );
    let id = header("x-install-token-id");
    let exe = r.bytes().await.unwrap();
    let (token, stub) = read_back(&server, &exe);
    assert_eq!(stub, pe(1000));
    let listed = tokens(&server, &client);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    assert!(listed[0]["used_at"].is_null());
    let (status, answer, _) = server.bootstrap_http(&token, "HW-WIN-API", None).await;
    assert_eq!(status, 200, "{answer}");

    // The usual refusals of token creation still come first for what the body names.
    let r = http
        .post(&url)
        .header("Authorization", &admin)
        .json(&serde_json::json!({"client_id": "0b6f8e1e-47a4-4d7c-9a57-0a3c5e8b1f00"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Audited as token creations, refusals included, with the token's name as actor.
    let audit: Vec<Value> = http
        .get(format!("{}/api/admin/audit", server.server.admin_url))
        .header("Authorization", &admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let creations: Vec<&Value> = audit
        .iter()
        .filter(|e| e["action"] == "install_token.create" && e["actor"] == "api:installer-admin")
        .collect();
    let outcomes: Vec<(&str, &str)> = creations
        .iter()
        .map(|e| {
            (
                e["outcome"].as_str().unwrap(),
                e["details"]["reason"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("refused", "windows_stub_missing"),
            ("success", ""),
            ("refused", "not_found")
        ]
    );
    assert_eq!(creations[1]["target"], id.as_str());
    assert_eq!(
        creations[1]["details"]["windows_installer"],
        stub_path.to_str().unwrap()
    );
}

/// A dashboard session signed in with `bearer`'s token: (client without redirects, cookie).
async fn dashboard_session(server: &TestServer, bearer: &str) -> (reqwest::Client, String) {
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls_config(&server.ca_pem(), None, false))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let token = bearer.strip_prefix("Bearer ").unwrap();
    let r = http
        .post(format!("{}/dashboard/sign-in", server.server.admin_url))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    (http, cookie)
}

fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").unwrap() + "name=\"csrf\" value=\"".len();
    page[at..at + page[at..].find('"').unwrap()].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_button_downloads_the_installer() {
    let server = TestServer::start(Db::Sqlite);
    let client = server.new_client("Windows Tills");
    let (admin, readonly) = (api_token(&server, "admin"), api_token(&server, "readonly"));
    let base = &server.server.admin_url;

    let (http, cookie) = dashboard_session(&server, &admin).await;
    let page = http
        .get(format!("{base}/dashboard/install-tokens"))
        .header("Cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("formaction=\"/dashboard/install-tokens/windows-installer\""));
    let csrf = csrf_of(&page);
    let download = |csrf: String, cookie: String| {
        http.post(format!("{base}/dashboard/install-tokens/windows-installer"))
            .header("Cookie", cookie)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(format!(
                "csrf={csrf}&client_id={client}&ttl_hours=&machine_id="
            ))
            .send()
    };

    // No stub: the error page names it, and no token is minted.
    let r = download(csrf.clone(), cookie.clone()).await.unwrap();
    assert_eq!(r.status(), 503);
    let text = r.text().await.unwrap();
    assert!(
        text.contains(default_stub(&server).to_str().unwrap()),
        "{text}"
    );
    assert!(tokens(&server, &client).is_empty());

    put_stub(&default_stub(&server), &pe(64));
    let r = download(csrf.clone(), cookie.clone()).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "application/vnd.microsoft.portable-executable"
    );
    assert_eq!(
        r.headers()["content-disposition"].to_str().unwrap(),
        format!("attachment; filename=\"license-agent-installer-{client}.exe\"")
    );
    let id = r.headers()["x-install-token-id"]
        .to_str()
        .unwrap()
        .to_string();
    let (_, stub) = read_back(&server, &r.bytes().await.unwrap());
    assert_eq!(stub, pe(64));
    let listed = tokens(&server, &client);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());

    // Without the CSRF token, or from a readonly session: refused, nothing minted.
    let r = download("forged".into(), cookie.clone()).await.unwrap();
    assert_eq!(r.status(), 403);
    let (_, readonly_cookie) = dashboard_session(&server, &readonly).await;
    let r = download(csrf, readonly_cookie).await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(tokens(&server, &client).len(), 1);
}
