//! Signed agent updates end to end (docs/OPERATIONS.md "Releasing and rolling out"): a real
//! server publishes and rolls out releases, a real agent daemon learns of them on its polls,
//! checks and stages them, and the real update step (`license-agent update apply`, run here
//! as systemd's path unit would run it) installs them, health-checks them and rolls back.
//!
//! Without systemd, the step's `stop_command`/`start_command` are scripts that stop and start
//! the daemon from the installed binary (a pid file). "Versions" are wrappers around this
//! build that set `LICENSE_AGENT_TEST_VERSION`, so each release is a different, executable
//! file; a broken release is a script that exits at start.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{bin, wait_until, Agent, Server};
use serde_json::Value;

/// A machine whose agent runs from `installed` (a wrapper of the given version), started and
/// stopped by scripts as the update step would through systemd.
struct Till {
    agent: Agent,
    installed: PathBuf,
    client_id: String,
}

fn wrapper(path: &Path, version: &str) {
    let script = format!(
        "#!/bin/sh\nLICENSE_AGENT_TEST_VERSION={version} exec {} \"$@\"\n",
        bin("license-agent").display()
    );
    write_executable(path, &script);
}

fn write_executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn till(server: &Server, root: &Path, name: &str) -> Till {
    let dir = root.join(name);
    let installed = dir.join("bin/license-agent");
    let scripts = dir.join("bin");
    let agent = Agent::enroll(server, root, name, 3600, |t| {
        let update = toml::Table::from_iter([
            (
                "binary".to_string(),
                toml::Value::String(installed.display().to_string()),
            ),
            (
                "step_binary".to_string(),
                toml::Value::String(dir.join("bin/license-agent-update").display().to_string()),
            ),
            (
                "work_dir".to_string(),
                toml::Value::String(dir.join("update-work").display().to_string()),
            ),
            ("health_deadline".to_string(), toml::Value::Integer(15)),
            (
                "stop_command".to_string(),
                toml::Value::Array(vec![
                    "sh".into(),
                    scripts.join("stop.sh").display().to_string().into(),
                ]),
            ),
            (
                "start_command".to_string(),
                toml::Value::Array(vec![
                    "sh".into(),
                    scripts.join("start.sh").display().to_string().into(),
                ]),
            ),
        ]);
        t.insert("update".into(), toml::Value::Table(update));
    });
    std::fs::create_dir_all(&scripts).unwrap();
    wrapper(&installed, "1.0.0");
    let pidfile = dir.join("agent.pid");
    write_executable(
        &scripts.join("start.sh"),
        &format!(
            "#!/bin/sh\n# as systemctl start would: nothing if it runs, else the installed binary\n\
             kill -0 $(cat {pidfile} 2>/dev/null) 2>/dev/null && exit 0\n\
             LICENSE_AGENT_LOG=info setsid {installed} run --config {config} \
             >>{dir}/agent.stdout 2>>{dir}/agent.stderr </dev/null &\necho $! > {pidfile}\n",
            installed = installed.display(),
            config = agent.config.display(),
            dir = dir.display(),
            pidfile = pidfile.display(),
        ),
    );
    write_executable(
        &scripts.join("stop.sh"),
        &format!(
            "#!/bin/sh\npid=$(cat {pidfile} 2>/dev/null) || exit 0\nkill -TERM $pid 2>/dev/null || exit 0\n\
             for i in $(seq 1 100); do kill -0 $pid 2>/dev/null || exit 0; sleep 0.1; done\n\
             kill -KILL $pid\n",
            pidfile = pidfile.display()
        ),
    );
    let config: toml::Table = std::fs::read_to_string(&agent.config)
        .unwrap()
        .parse()
        .unwrap();
    let client_id = config["agent"]["client_id"].as_str().unwrap().to_string();
    Till {
        agent,
        installed,
        client_id,
    }
}

impl Till {
    fn start(&self) {
        run(Command::new("sh").arg(self.agent.dir.join("bin/start.sh")));
        wait_until("the agent answers status", Duration::from_secs(30), || {
            self.try_status().is_some()
        });
    }

    fn stop(&self) {
        run(Command::new("sh").arg(self.agent.dir.join("bin/stop.sh")));
    }

    /// `license-agent-cli status --json`, when the agent answers.
    fn try_status(&self) -> Option<Value> {
        let out = Command::new(bin("license-agent-cli"))
            .arg("--socket")
            .arg(self.agent.dir.join("mgmt.sock"))
            .args(["status", "--json"])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    fn status(&self) -> Value {
        self.try_status()
            .unwrap_or_else(|| panic!("no status\n{}", self.agent.log()))
    }

    fn version(&self) -> String {
        self.status()["agent_version"].as_str().unwrap().to_string()
    }

    fn cli(&self, args: &[&str]) -> String {
        run(Command::new(bin("license-agent-cli"))
            .arg("--socket")
            .arg(self.agent.dir.join("mgmt.sock"))
            .args(args))
    }

    fn staged(&self) -> bool {
        self.agent.dir.join("state/updates/ready").exists()
    }

    fn wait_staged(&self) {
        wait_until("a release staged", Duration::from_secs(60), || {
            self.staged()
        });
    }

    /// The update step, as `license-agent-update.service` runs it: the installed binary's
    /// `update apply`, with `env`. Its JSON result and whether it exited 0.
    fn apply(&self, env: &[(&str, &str)]) -> (Option<Value>, std::process::Output) {
        let out = Command::new(&self.installed)
            .args(["update", "apply", "--json", "--config"])
            .arg(&self.agent.config)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (serde_json::from_slice(&out.stdout).ok(), out)
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(self.agent.dir.join("log/audit.log")).unwrap_or_default()
    }
}

impl Drop for Till {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Publishes `file` as `version` (with extra flags); the release id.
fn publish(server: &Server, root: &Path, version: &str, extra: &[&str]) -> String {
    let file = root.join(format!("release-{version}"));
    if !file.exists() {
        wrapper(&file, version);
    }
    let mut args = vec![
        "release",
        "publish",
        file.to_str().unwrap(),
        "--version",
        version,
    ];
    args.extend_from_slice(extra);
    server.admin(&args)["id"].as_str().unwrap().to_string()
}

/// `admin release show`: the release with its state and report counts.
fn release(server: &Server, id: &str) -> Value {
    server.admin(&["release", "show", id])
}

fn count(release: &Value, outcome: &str) -> i64 {
    release["reports"][outcome].as_i64().unwrap()
}

#[test]
fn a_release_rolls_out_installs_itself_and_reports_success() {
    let root = tempfile::tempdir().unwrap();
    let mut server = Server::start(root.path(), 3600, 7200);
    let till = till(&server, root.path(), "till");
    till.start();
    assert_eq!(till.version(), "1.0.0");

    // Published at 0%: not offered, nothing downloaded.
    let id = publish(&server, root.path(), "1.1.0", &["--percent", "0"]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(!till.staged());
    assert!(till.status()["update"]["offered"].is_null());

    // Held by the till's administrator, then rolled out to its client: offered, not staged.
    assert!(till.cli(&["update", "hold"]).contains("held"));
    server.admin(&["release", "rollout", &id, "--clients", &till.client_id]);
    wait_until("the offer seen", Duration::from_secs(30), || {
        till.status()["update"]["offered"] == "1.1.0"
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(!till.staged(), "held");
    assert_eq!(till.status()["update"]["held"], true);

    // The till goes offline during the rollout, and takes the release when it is back.
    till.cli(&["update", "release"]);
    server.kill();
    std::thread::sleep(Duration::from_secs(2));
    assert!(!till.staged());
    server.resume();
    till.wait_staged();
    let status = till.status();
    assert_eq!(status["update"]["staged"], "1.1.0");
    assert!(till.audit().contains("\"update.staged\""));

    // The update step (what the path unit starts).
    let (result, out) = till.apply(&[]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        till.agent.log()
    );
    let result = result.unwrap();
    assert_eq!(result["outcome"], "success");
    let steps: Vec<&str> = result["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        ["verify", "stop", "backup", "swap", "start", "health"]
    );
    assert_eq!(till.version(), "1.1.0", "the new version runs");
    assert!(std::fs::read_to_string(&till.installed)
        .unwrap()
        .contains("LICENSE_AGENT_TEST_VERSION=1.1.0"));
    assert!(!till.staged());

    // The new version audits the steps, reports success, counts it.
    wait_until("success reported", Duration::from_secs(30), || {
        count(&release(&server, &id), "success") == 1
    });
    let audit = till.audit();
    for step in [
        "verify", "stop", "backup", "swap", "start", "health", "result",
    ] {
        assert!(
            audit.contains(&format!("\"update.{step}\"")),
            "update.{step}"
        );
    }
    let last = &till.status()["update"]["last"];
    assert_eq!(
        (last["version"].as_str(), last["outcome"].as_str()),
        (Some("1.1.0"), Some("success"))
    );
    assert_eq!(till.agent.metric("license_agent_updates_total"), Some(1));
    // Nothing newer: nothing offered, nothing downloaded.
    std::thread::sleep(Duration::from_secs(2));
    assert!(till.status()["update"]["offered"].is_null());
    assert!(!till.staged());
}

#[test]
fn a_release_that_fails_its_health_check_is_rolled_back_and_halts_the_rollout() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(root.path(), 3600, 7200);
    let till = till(&server, root.path(), "till");
    till.start();
    // A release that exits at start.
    write_executable(&root.path().join("release-2.0.0"), "#!/bin/sh\nexit 1\n");
    let id = publish(
        &server,
        root.path(),
        "2.0.0",
        &["--percent", "100", "--halt-after-failures", "1"],
    );
    till.wait_staged();
    let (result, out) = till.apply(&[]);
    assert!(!out.status.success(), "a rolled back update exits non-zero");
    let result = result.unwrap();
    assert_eq!(
        (result["outcome"].as_str(), result["reason"].as_str()),
        (Some("failed"), Some("health_check_failed"))
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("ended failed"));
    // The previous version runs again, with its state.
    assert_eq!(till.version(), "1.0.0");
    assert!(std::fs::read_to_string(&till.installed)
        .unwrap()
        .contains("LICENSE_AGENT_TEST_VERSION=1.0.0"));
    // Reported: the rollout halts; the release is never offered to this till again.
    wait_until("the rollout halted", Duration::from_secs(30), || {
        release(&server, &id)["state"] == "halted"
    });
    assert_eq!(count(&release(&server, &id), "failed"), 1);
    let audit = till.audit();
    assert!(audit.contains("\"update.rollback\"") && audit.contains("health_check_failed"));
    assert!(audit.contains("alert.update_failed"));
    assert_eq!(
        till.agent.metric("license_agent_updates_failed_total"),
        Some(1)
    );
    server.admin(&["release", "resume", &id]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !till.staged(),
        "a release that failed here is not taken again"
    );
}

#[test]
fn a_tampered_binary_is_refused_audited_and_reported() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(root.path(), 3600, 7200);
    let till = till(&server, root.path(), "till");
    till.start();
    let id = publish(&server, root.path(), "1.2.0", &["--percent", "0"]);
    // The stored binary changed behind the manifest's back (a compromised database or mirror).
    let db = server.dir.join("license-server.db");
    let db = if db.exists() {
        db
    } else {
        std::fs::read_dir(&server.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "db" || e == "sqlite"))
            .expect("the server's SQLite database")
    };
    run(Command::new("sqlite3").arg(&db).arg(format!(
        "UPDATE release_chunks SET data = CAST(replace(CAST(data AS TEXT), '1.2.0', '6.6.6') AS BLOB) WHERE release_id = '{id}'"
    )));
    server.admin(&["release", "rollout", &id, "--percent", "100"]);
    wait_until("refusal reported", Duration::from_secs(30), || {
        count(&release(&server, &id), "refused") == 1
    });
    assert!(!till.staged());
    let audit = till.audit();
    assert!(audit.contains("\"update.refused\"") && audit.contains("wrong_digest"));
    let last = &till.status()["update"]["last"];
    assert_eq!(
        (last["outcome"].as_str(), last["reason"].as_str()),
        (Some("refused"), Some("wrong_digest"))
    );
    assert_eq!(till.version(), "1.0.0");
}

#[test]
fn a_power_cut_at_any_step_leaves_a_till_that_starts_and_finishes_the_update() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(root.path(), 3600, 7200);
    let till = till(&server, root.path(), "till");
    till.start();
    let steps = [
        "verified",
        "stopped",
        "backed_up",
        "swapping",
        "swap_half",
        "swapped",
        "started",
        "done",
    ];
    for (i, step) in steps.iter().enumerate() {
        let version = format!("1.{}.0", i + 1);
        publish(&server, root.path(), &version, &["--percent", "100"]);
        till.wait_staged();
        let (_, out) = till.apply(&[("LICENSE_AGENT_TEST_CRASH_AT", &format!("update.{step}"))]);
        assert!(!out.status.success(), "{step}: the step was cut");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("test crash"),
            "{step}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The power cut takes the agent too; at boot the machine starts what is installed.
        till.stop();
        let installed = run(Command::new(&till.installed).arg("--version"));
        assert!(
            installed.contains("license-agent"),
            "{step}: a binary that starts"
        );
        till.start();
        // …and the path unit runs the step again (ready is still there), which finishes.
        let (result, out) = till.apply(&[]);
        assert!(
            out.status.success(),
            "{step}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            till.agent.log()
        );
        if *step != "done" {
            let result = result.unwrap();
            assert_eq!(result["outcome"], "success", "{step}");
            assert!(
                result["steps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["step"] == "resume"),
                "{step}: resumed"
            );
        }
        assert_eq!(till.version(), version, "{step}");
        assert!(!till.staged(), "{step}");
    }
}
