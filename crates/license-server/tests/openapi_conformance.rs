//! The served OpenAPI document against what a real server answers: schemathesis (PyPI)
//! generates requests from `/api/openapi.json` — valid ones, and ones the document forbids —
//! sends them to the public listener, the agent listener (with an enrolled machine's
//! certificate) and the admin listener (with an admin token), and checks every answer with all
//! its default checks: no server error, every status and content type
//! documented, every body matching its schema, forbidden requests refused, allowed ones not
//! refused as malformed. Its settings, and the few exceptions with their reasons, are in
//! `tests/schemathesis.toml`.
//!
//! schemathesis runs from a virtualenv under the target directory, which `scripts/test.sh`
//! creates; when it is missing this test creates it (`python3 -m venv`, then `pip install` of
//! `tests/schemathesis.requirements.txt`), and fails if it cannot. `LSA_SCHEMATHESIS` names
//! another schemathesis executable. About 30 s on two cores (plus about 20 s for the install).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::{Db, TestServer};

/// Test cases per operation and phase: enough to find an undocumented answer, few enough that
/// the two runs take well under a minute.
const MAX_EXAMPLES: &str = "25";

const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schemathesis.toml");
const REQUIREMENTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/schemathesis.requirements.txt"
);

/// The schemathesis executable: `LSA_SCHEMATHESIS`, or the one in the target directory's
/// virtualenv, installed there first if missing.
fn schemathesis() -> PathBuf {
    if let Some(path) = std::env::var_os("LSA_SCHEMATHESIS") {
        return PathBuf::from(path);
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("schemathesis-venv");
    let exe = venv.join("bin/schemathesis");
    if exe.exists() {
        return exe;
    }
    eprintln!(
        "installing schemathesis into {} (scripts/test.sh does it before the tests)",
        venv.display()
    );
    let run = |command: &mut Command| {
        let out = command
            .output()
            .unwrap_or_else(|e| panic!("{command:?}: {e}"));
        assert!(
            out.status.success(),
            "{command:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--requirement",
        REQUIREMENTS,
    ]));
    assert!(exe.exists(), "{} missing after pip install", exe.display());
    exe
}

/// Runs schemathesis over the operations tagged `tag`, sending them to `base_url` with the
/// extra arguments `extra`; returns its output after asserting it found nothing and tested
/// `operations` operations.
fn conformance_run(
    schemathesis: &Path,
    server: &TestServer,
    tag: &str,
    base_url: &str,
    extra: &[&str],
    operations: usize,
) -> String {
    let started = Instant::now();
    let schema = format!("{}/api/openapi.json", server.server.public_url);
    let ca = server.data_dir().join("ca.pem");
    let mut command = Command::new(schemathesis);
    command
        .args(["--config-file", CONFIG, "--no-color", "run", &schema])
        .args(["--url", base_url, "--include-tag", tag])
        .arg("--tls-verify")
        .arg(&ca)
        .args(["--max-examples", MAX_EXAMPLES])
        .args(extra);
    // Reports and caches go to the test's own directory.
    let out = command.current_dir(server.dir.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let summary = stdout
        .find("= SUMMARY =")
        .map(|at| &stdout[stdout[..at].rfind('\n').map_or(0, |n| n + 1)..])
        .unwrap_or(&stdout);
    eprintln!(
        "schemathesis, {tag} API ({:.1} s):\n{summary}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success(),
        "schemathesis found failures in the {tag} API:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains(&format!("Tested: {operations}\n")),
        "schemathesis did not test the {operations} operations of the {tag} API:\n{stdout}"
    );
    assert!(
        summary.contains(" passed") && !summary.contains("failure") && !summary.contains("error"),
        "{summary}"
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_agent_and_admin_apis_answer_as_their_openapi_document_says() {
    let schemathesis = schemathesis();
    // Bootstrap and recovery past their per-address quota answer 429 before any other check;
    // a high quota lets the generated requests reach the code behind it.
    let server =
        TestServer::start_configured(Db::Sqlite, "bootstrap_rate_per_minute = 100000", &[], &[]);
    // Records for the lists to answer with, so their schemas are checked on real rows: a
    // client with an unused install token, an enrolled machine, its certificate, a license, a
    // release.
    let (client, enrolled, key) = server.enrolled_machine("Conformance", "HW-OPENAPI-1").await;
    server.new_token(&client);
    let cert_file = server.dir.path().join("machine.pem");
    let key_file = server.dir.path().join("machine.key");
    std::fs::write(&cert_file, enrolled["certificate"].as_str().unwrap()).unwrap();
    std::fs::write(&key_file, &key).unwrap();
    let machine = enrolled["machine_id"].as_str().unwrap();
    server.admin_json(&[
        "license",
        "issue",
        "--machine",
        machine,
        "--features",
        "pos.sale,pos.refund",
        "--expires-in",
        "30d",
    ]);
    // A release, so the release list has a row and the binary route something to serve.
    let binary = server.dir.path().join("license-agent");
    std::fs::write(&binary, b"#!/bin/sh\nexit 0\n").unwrap();
    server.admin_json(&[
        "release",
        "publish",
        binary.to_str().unwrap(),
        "--version",
        "1.0.0",
        "--percent",
        "100",
    ]);
    // A Windows agent (a minimal PE header), so the installer route answers with installers.
    let mut stub = vec![0u8; 0x200];
    stub[..2].copy_from_slice(b"MZ");
    stub[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
    stub[0x80..0x84].copy_from_slice(b"PE\0\0");
    stub[0x98..0x9a].copy_from_slice(&0x20bu16.to_le_bytes());
    let windows = server.data_dir().join("windows");
    std::fs::create_dir_all(&windows).unwrap();
    std::fs::write(windows.join("license-agent.exe"), stub).unwrap();
    let token = server.admin_json(&[
        "api-token",
        "create",
        "--name",
        "schemathesis",
        "--role",
        "admin",
    ])["token"]
        .as_str()
        .unwrap()
        .to_string();

    conformance_run(
        &schemathesis,
        &server,
        "public",
        &server.server.public_url,
        &[],
        6,
    );
    // Before the admin run, which revokes and deletes machines.
    conformance_run(
        &schemathesis,
        &server,
        "agent",
        &server.server.agent_url,
        &[
            "--request-cert",
            cert_file.to_str().unwrap(),
            "--request-cert-key",
            key_file.to_str().unwrap(),
            // The watch stream never ends by itself (that is its point): its answers are
            // checked by tests/fleet_push.rs (events, content type, a bad `since`, a revoked
            // machine) instead of by a client that waits for the end of every answer.
            "--exclude-operation-id",
            "watch",
        ],
        11,
    );
    let bearer = format!("Authorization: Bearer {token}");
    conformance_run(
        &schemathesis,
        &server,
        "admin",
        &server.server.admin_url,
        &["--header", &bearer],
        28,
    );
    // Whatever it sent, the server is still serving.
    let health = server
        .https_client()
        .get(format!("{}/healthz", server.server.public_url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}
