//! `license-fleet` as an operator runs it (docs/FLEET.md), against a real `license-server`
//! (SQLite, the workspace's debug build): `enroll` through the real bootstrap into the cache,
//! `run` in both modes with renewals, the JSON report, the cache reused by a second run, and
//! named errors for bad flags and a cache too small.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

const FLEET: &str = env!("CARGO_BIN_EXE_license-fleet");

/// The server binary of the same build (`cargo test --workspace` builds it).
fn server_bin() -> PathBuf {
    let bin = Path::new(FLEET).with_file_name("license-server");
    assert!(
        bin.exists(),
        "{} missing: run the tests with `cargo test --workspace`",
        bin.display()
    );
    bin
}

/// A `license-server serve` on temporary ports; killed on drop.
struct Server {
    child: Child,
    data: PathBuf,
    ready: Value,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(dir: &Path) -> Self {
        let data = dir.join("srv");
        let init = Command::new(server_bin())
            .args(["init", "--dns-name", "localhost", "--ip", "127.0.0.1"])
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        assert!(init.status.success(), "{}", stderr(&init));
        let mut child = Command::new(server_bin())
            .arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--public-listen",
                "127.0.0.1:0",
                "--agent-listen",
                "127.0.0.1:0",
            ])
            .args(["--admin-listen", "127.0.0.1:0", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let ready: Value = serde_json::from_str(&line).unwrap();
        Self { child, data, ready }
    }

    fn url(&self, listener: &str) -> String {
        format!("https://{}", self.ready[listener].as_str().unwrap())
            .replace("127.0.0.1", "localhost")
    }

    fn admin_token(&self) -> String {
        let out = Command::new(server_bin())
            .arg("admin")
            .arg("--data-dir")
            .arg(&self.data)
            .args([
                "--json",
                "api-token",
                "create",
                "--name",
                "fleet",
                "--role",
                "admin",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["token"].as_str().unwrap().to_string()
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn fleet(args: &[&str]) -> Output {
    Command::new(FLEET).args(args).output().unwrap()
}

fn json(out: &Output) -> Value {
    assert!(out.status.success(), "{}", stderr(out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn enroll_then_run_in_both_modes_with_renewals() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let ca = server.data.join("ca.pem");
    let ca = ca.to_str().unwrap();
    let cache = dir.path().join("machines.jsonl");
    let cache = cache.to_str().unwrap();
    let token = server.admin_token();
    let enrolled = json(
        &Command::new(FLEET)
            .args(["enroll", "--public-url"])
            .arg(server.ready["public_url"].as_str().unwrap())
            .args(["--admin-url", &server.url("admin"), "--ca", ca])
            .args(["--count", "4", "--cache", cache, "--json"])
            .env("LSA_ADMIN_TOKEN", &token)
            .output()
            .unwrap(),
    );
    assert_eq!(
        (enrolled["held"].as_u64(), enrolled["enrolled"].as_u64()),
        (Some(0), Some(4))
    );
    let before = std::fs::read_to_string(cache).unwrap();

    let pid = server.child.id().to_string();
    let agent_url = server.url("agent");
    let run = |mode: &str, extra: &[&str]| {
        let mut args = vec![
            "run",
            "--agent-url",
            &agent_url,
            "--ca",
            ca,
            "--cache",
            cache,
            "--mode",
            mode,
            "--duration",
            "5s",
            "--poll-interval",
            "1s",
            "--renew-interval",
            "2s",
            "--server-pid",
            &pid,
            "--json",
        ];
        args.extend_from_slice(extra);
        json(&fleet(&args))
    };
    // Watch mode: every machine connected, renewing every 2 s.
    let watch = run("watch", &[]);
    let report = &watch["report"];
    assert_eq!(watch["machines"], 4, "{watch}");
    assert_eq!(watch["connected_at_end"], 4, "{watch}");
    assert!(
        report["rotations"].as_u64().unwrap() >= 4,
        "first secrets: {watch}"
    );
    assert!(report["renewals"].as_u64().unwrap() >= 4, "{watch}");
    assert_eq!(report["cache_errors"], 0, "{watch}");
    assert_eq!(report["refused"], 0, "{watch}");
    assert_eq!(report["http_errors"], 0, "{watch}");
    assert!(
        watch["server_cpu_seconds"].as_f64().unwrap() > 0.0,
        "{watch}"
    );
    // The renewed identities are in the cache: a second run (poll mode, two machines after
    // the first two) goes on with them and renews again.
    let after = std::fs::read_to_string(cache).unwrap();
    assert!(
        after.len() > before.len() && after.starts_with(&before),
        "appended"
    );
    let poll = run("poll", &["--skip", "2", "--count", "2"]);
    let report = &poll["report"];
    assert_eq!(poll["machines"], 2, "{poll}");
    assert!(report["rounds_ok"].as_u64().unwrap() >= 4, "{poll}");
    assert!(report["renewals"].as_u64().unwrap() >= 2, "{poll}");
    assert_eq!(
        report["refused"], 0,
        "the renewed certificates are used: {poll}"
    );
}

#[test]
fn bad_flags_and_a_small_cache_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("machines.jsonl");
    std::fs::write(&cache, "").unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "").unwrap();
    let base = |extra: &[&str]| {
        let mut args = vec!["run", "--agent-url", "https://localhost:1"];
        args.extend([
            "--ca",
            ca.to_str().unwrap(),
            "--cache",
            cache.to_str().unwrap(),
        ]);
        args.extend_from_slice(extra);
        fleet(&args)
    };
    for (extra, named) in [
        (&["--skip", "3"][..], "--skip 3"),
        (&["--count", "2"][..], "--count 2"),
        (&["--duration", "3 days"][..], "3 days"),
        (&["--mix", "online=50"][..], "100"),
        (&["--mode", "push"][..], "push"),
    ] {
        let out = base(extra);
        assert!(!out.status.success(), "{extra:?} accepted");
        assert!(stderr(&out).contains(named), "{extra:?}: {}", stderr(&out));
    }
}
