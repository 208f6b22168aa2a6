//! Agent releases against real server processes, on SQLite and PostgreSQL: a release published
//! with the CLI, offered through the secret status of enrolled machines (real mTLS) only as its
//! rollout says, verified along the license key, downloaded byte for byte, halted by failed
//! reports, paused, resumed, re-signed by a release key rotation and withdrawn; the admin API's
//! release routes and their roles.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Db, TestServer};
use license_protocol::license_keys::TrustedKeys;
use license_protocol::release::{ReleaseKeyState, ReleaseTrust, UpdateOffer};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

/// One enrolled machine: its client, certificate and key.
struct Machine {
    client: String,
    cert: String,
    key: String,
}

async fn machines(server: &TestServer, n: usize) -> Vec<Machine> {
    let mut out = Vec::new();
    for i in 0..n {
        let (client, answer, key) = server
            .enrolled_machine(&format!("Shop {i}"), &format!("HW-REL-{i}"))
            .await;
        out.push(Machine {
            client,
            cert: answer["certificate"].as_str().unwrap().to_string(),
            key,
        });
    }
    out
}

const QUERY: &str = "agent_version=1.0.0&channel=stable&arch=x86_64";

/// GET /api/v1/secret-status?`query` as `m`: (status, body).
async fn status(server: &TestServer, m: &Machine, query: &str) -> (u16, Value) {
    let r = server
        .mtls_client(&m.cert, &m.key)
        .get(format!(
            "{}/api/v1/secret-status?{query}",
            server.server.agent_url
        ))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// The release offered to `m` with `query`, if any.
async fn offer(server: &TestServer, m: &Machine, query: &str) -> Option<UpdateOffer> {
    let (code, body) = status(server, m, query).await;
    assert_eq!(code, 200, "{body}");
    body.get("update")
        .map(|u| serde_json::from_value(u.clone()).unwrap())
}

/// How many of `ms` are offered a release with [`QUERY`].
async fn offered(server: &TestServer, ms: &[Machine]) -> usize {
    let mut n = 0;
    for m in ms {
        n += usize::from(offer(server, m, QUERY).await.is_some());
    }
    n
}

async fn report(server: &TestServer, m: &Machine, body: Value) -> u16 {
    server
        .mtls_client(&m.cert, &m.key)
        .post(format!("{}/api/v1/update-report", server.server.agent_url))
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn license_key(server: &TestServer) -> TrustedKeys {
    let set: Value = serde_json::from_slice(
        &std::fs::read(server.data_dir().join("license-keys.json")).unwrap(),
    )
    .unwrap();
    let current = set["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["state"] == "current")
        .unwrap();
    let key = license_protocol::rotation::parse_license_public_key(
        current["public_key"].as_str().unwrap(),
    )
    .unwrap();
    TrustedKeys::pinned(key)
}

fn audit_actions(server: &TestServer) -> Vec<Value> {
    server
        .admin_json(&["audit", "list", "--limit", "10000"])
        .as_array()
        .unwrap()
        .clone()
}

fn admin_fails(server: &TestServer, args: &[&str], code: i32, needle: &str) {
    let out = server.admin(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: {stderr}");
}

async fn a_release_rolls_out_is_verified_downloaded_halted_and_rotated(db: Db) {
    let server = TestServer::start(db);
    let binary: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let file = server.dir.path().join("license-agent");
    std::fs::write(&file, &binary).unwrap();
    let file_arg = file.to_str().unwrap();

    // Refusals name the problem; nothing is stored.
    let empty = server.dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    let empty_arg = empty.to_str().unwrap();
    admin_fails(
        &server,
        &["release", "publish", empty_arg, "--version", "1.2.0"],
        2,
        "is empty",
    );
    admin_fails(
        &server,
        &["release", "publish", file_arg, "--version", "1.2"],
        2,
        "--version",
    );
    admin_fails(
        &server,
        &[
            "release",
            "publish",
            file_arg,
            "--version",
            "1.2.0",
            "--channel",
            "Beta",
        ],
        2,
        "--channel",
    );
    admin_fails(
        &server,
        &[
            "release",
            "publish",
            file_arg,
            "--version",
            "1.2.0",
            "--percent",
            "101",
        ],
        2,
        "--percent",
    );

    let published = server.admin_json(&[
        "release",
        "publish",
        file_arg,
        "--version",
        "1.2.0",
        "--arch",
        "x86_64",
        "--halt-after-failures",
        "3",
    ]);
    let id = published["id"].as_str().unwrap().to_string();
    assert_eq!(published["state"], "active");
    assert_eq!(published["percent"], 0);
    assert_eq!(published["size"], binary.len());
    assert_eq!(published["sha256"], hex::encode(Sha256::digest(&binary)));
    admin_fails(
        &server,
        &[
            "release",
            "publish",
            file_arg,
            "--version",
            "1.2.0",
            "--arch",
            "x86_64",
        ],
        4,
        "already exists",
    );
    let list = server.admin_json(&["release", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(
        list[0]["reports"],
        json!({"success": 0, "failed": 0, "refused": 0})
    );
    assert_eq!(
        server.admin_json(&["release", "show", "1.2.0"])["id"],
        id.as_str()
    );
    assert_eq!(
        server.admin_json(&["release", "show", &id])["version"],
        "1.2.0"
    );
    assert!(server
        .admin_json(&["release", "list", "--channel", "beta"])
        .as_array()
        .unwrap()
        .is_empty());

    let ms = machines(&server, 10).await;
    // 0%: no one. A named client: its machine only.
    assert_eq!(offered(&server, &ms).await, 0);
    server.admin_json(&["release", "rollout", &id, "--clients", &ms[0].client]);
    assert!(offer(&server, &ms[0], QUERY).await.is_some());
    assert_eq!(offered(&server, &ms).await, 1);
    // 100%: everyone; but not without the query, not as a downgrade or the same version, not
    // for another architecture or channel.
    server.admin_json(&["release", "rollout", &id, "--percent", "100"]);
    assert_eq!(offered(&server, &ms).await, 10);
    let m = &ms[1];
    let (_, plain) = status(&server, m, "").await;
    assert!(plain.get("update").is_none(), "{plain}");
    for q in [
        "agent_version=1.2.0&channel=stable&arch=x86_64",
        "agent_version=1.3.0&channel=stable&arch=x86_64",
        "agent_version=1.0.0&channel=stable&arch=aarch64",
        "agent_version=1.0.0&channel=beta&arch=x86_64",
        "agent_version=1.0.0&channel=stable",
    ] {
        assert!(offer(&server, m, q).await.is_none(), "{q}");
    }
    // A malformed query is refused, naming the field.
    let (code, body) = status(&server, m, "agent_version=1.x&channel=stable&arch=x86_64").await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["error"], "invalid_request");
    assert!(
        body["message"].as_str().unwrap().contains("agent_version"),
        "{body}"
    );
    let long_arch = format!("agent_version=1.0.0&channel=stable&arch={}", "a".repeat(33));
    let (code, body) = status(&server, m, &long_arch).await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().starts_with("arch"),
        "{body}"
    );

    // The offer verifies along the license key and describes the file.
    let first = offer(&server, m, QUERY).await.unwrap();
    let license = license_key(&server);
    let mut trust = ReleaseTrust::default();
    trust.verify(&first, &license).unwrap();
    assert_eq!(first.manifest.release_id.to_string(), id);
    assert_eq!(first.manifest.size, binary.len() as u64);
    assert_eq!(first.manifest.sha256, hex::encode(Sha256::digest(&binary)));
    assert_eq!(first.manifest.version.to_string(), "1.2.0");

    // The download is exactly the file.
    let url = format!("{}/api/v1/releases/{id}/binary", server.server.agent_url);
    let r = server
        .mtls_client(&m.cert, &m.key)
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert_eq!(
        r.headers()["content-length"],
        binary.len().to_string().as_str()
    );
    assert!(r.bytes().await.unwrap() == binary);
    let unknown = format!(
        "{}/api/v1/releases/{}/binary",
        server.server.agent_url,
        uuid::Uuid::new_v4()
    );
    let r = server
        .mtls_client(&m.cert, &m.key)
        .get(&unknown)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Reports: malformed and unknown ones refused; a machine that refused the release is not
    // offered it again.
    let bad = json!({"release_id": id, "outcome": "failed", "reason": "Not A Code", "running_version": "1.0.0"});
    assert_eq!(report(&server, &ms[1], bad).await, 400);
    let unknown = json!({"release_id": uuid::Uuid::new_v4(), "outcome": "failed", "reason": "x", "running_version": "1.0.0"});
    assert_eq!(report(&server, &ms[1], unknown).await, 404);
    let ok =
        json!({"release_id": id, "outcome": "success", "reason": "", "running_version": "1.2.0"});
    assert_eq!(report(&server, &ms[0], ok).await, 204);
    let refused = json!({"release_id": id, "outcome": "refused", "reason": "wrong_digest", "running_version": "1.0.0"});
    assert_eq!(report(&server, &ms[1], refused).await, 204);
    assert!(offer(&server, &ms[1], QUERY).await.is_none());
    assert_eq!(offered(&server, &ms).await, 9);
    // Two more failures reach the threshold of 3: the rollout halts, audited.
    for m in &ms[2..4] {
        let failed = json!({"release_id": id, "outcome": "failed", "reason": "health_check_failed", "running_version": "1.0.0"});
        assert_eq!(report(&server, m, failed).await, 204);
    }
    assert_eq!(offered(&server, &ms).await, 0);
    let shown = server.admin_json(&["release", "show", &id]);
    assert_eq!(shown["state"], "halted");
    assert_eq!(
        shown["halted_reason"],
        "3 machines reported a failed update"
    );
    assert_eq!(
        shown["reports"],
        json!({"success": 1, "failed": 2, "refused": 1})
    );
    let events = audit_actions(&server);
    let halt = events
        .iter()
        .find(|e| e["action"] == "release.halt")
        .expect("release.halt audited");
    assert_eq!(halt["actor"], "server");
    assert_eq!(halt["target"], id.as_str());
    let reports = events
        .iter()
        .filter(|e| e["action"] == "release.report")
        .count();
    assert_eq!(reports, 4);
    for action in ["release.publish", "release.rollout"] {
        assert!(events.iter().any(|e| e["action"] == action), "{action}");
    }

    // Resume clears the halt (machines that reported a failure are still not offered it);
    // pause stops it again.
    let resumed = server.admin_json(&["release", "resume", &id]);
    assert_eq!(resumed["state"], "active");
    assert_eq!(resumed["halted_reason"], Value::Null);
    assert_eq!(offered(&server, &ms).await, 7);
    server.admin_json(&["release", "pause", &id]);
    assert_eq!(offered(&server, &ms).await, 0);
    server.admin_json(&["release", "resume", &id]);

    // rotate-key: the offer is re-signed with the new key; the set names the old one retired.
    let rotated = server.admin_json(&["release", "rotate-key"]);
    assert_eq!(rotated["retired_key_id"], first.key_id.to_string());
    assert_eq!(rotated["resigned"], json!([id]));
    let second = offer(&server, &ms[4], QUERY).await.unwrap();
    assert_ne!(second.key_id, first.key_id);
    assert_eq!(
        second.key_id.to_string(),
        rotated["new_key_id"].as_str().unwrap()
    );
    assert_eq!(second.manifest, first.manifest);
    let old = second
        .release_keys
        .keys
        .iter()
        .find(|k| k.id == first.key_id)
        .unwrap();
    assert_eq!(old.state, ReleaseKeyState::Retired);
    assert!(second.release_keys.issued_at >= first.release_keys.issued_at);
    ReleaseTrust::default().verify(&second, &license).unwrap();
    // An agent that verified the old offer takes the new one, and then refuses the old key.
    trust.verify(&second, &license).unwrap();
    assert!(trust.verify(&first, &license).is_err());
    let events = audit_actions(&server);
    assert!(events.iter().any(|e| e["action"] == "release.rotate_key"));
    let key_file = std::fs::read_to_string(server.data_dir().join("release-keys.json")).unwrap();
    assert!(
        !key_file.contains(&first.key_id.to_string()),
        "retired private key kept"
    );

    // The admin API: readonly lists, only admin changes.
    let token = |name: &str, role: &str| {
        server.admin_json(&["api-token", "create", "--name", name, "--role", role])["token"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (viewer, ops) = (token("viewer", "readonly"), token("ops", "admin"));
    let http = server.https_client();
    let admin_url = &server.server.admin_url;
    let listed: Value = http
        .get(format!("{admin_url}/api/admin/releases"))
        .bearer_auth(&viewer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed[0]["id"], id.as_str());
    let r = http
        .post(format!("{admin_url}/api/admin/releases/{id}/pause"))
        .bearer_auth(&viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .post(format!("{admin_url}/api/admin/releases/{id}/rollout"))
        .bearer_auth(&ops)
        .json(&json!({"percent": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(offered(&server, &ms).await, 1, "the named client keeps it");
    // Every field is optional, yet the body must be an object: `[]` is refused.
    let r = http
        .post(format!("{admin_url}/api/admin/releases/{id}/rollout"))
        .bearer_auth(&ops)
        .json(&json!([]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"], "invalid_request", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("JSON object"),
        "{err}"
    );
    let r = http
        .post(format!("{admin_url}/api/admin/releases/{id}/pause"))
        .bearer_auth(&ops)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .post(format!("{admin_url}/api/admin/releases/{id}/resume"))
        .bearer_auth(&ops)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .post(format!("{admin_url}/api/admin/releases/{id}/withdraw"))
        .bearer_auth(&ops)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let withdrawn: Value = r.json().await.unwrap();
    assert_eq!(withdrawn["state"], "withdrawn");
    // Withdrawn is final: no offer, no download, no rollout.
    assert_eq!(offered(&server, &ms).await, 0);
    let r = server
        .mtls_client(&m.cert, &m.key)
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http
        .post(format!("{admin_url}/api/admin/releases/{id}/rollout"))
        .bearer_auth(&ops)
        .json(&json!({"percent": 100}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    admin_fails(&server, &["release", "resume", &id], 4, "withdrawn");
    let events = audit_actions(&server);
    for action in ["release.pause", "release.resume", "release.withdraw"] {
        assert!(
            events
                .iter()
                .any(|e| e["action"] == action && e["actor"] == "api:ops"),
            "{action}"
        );
    }
}

on_both_databases!(a_release_rolls_out_is_verified_downloaded_halted_and_rotated);
