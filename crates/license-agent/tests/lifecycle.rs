//! The secret lifecycle end to end: a real server, real agent daemons, the real client
//! library. Intervals are seconds; every wait is for an event, bounded only so a broken
//! build fails instead of hanging.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use common::{bin, faketime, reason, wait_until, Agent, Server};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

/// The token file for `license` once the agent has one under a version > `after`.
fn wait_token(agent: &Agent, license: &str, after: Option<&str>) -> String {
    let mut token = None;
    wait_until(&format!("a token for {license}"), WAIT, || {
        token = agent.token(license).filter(|t| Some(t.as_str()) != after);
        token.is_some()
    });
    token.unwrap()
}

fn server_status(agent: &Agent) -> Value {
    let out = Command::new(bin("license-agent"))
        .args(["server-status", "--json", "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn rotation_keeps_old_tokens_valid_through_grace_then_they_end() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(root.path(), 6, 6);
    let mut agent = Agent::enroll(&server, root.path(), "pos1", 3600, |_| {});
    let license = server.issue_license(
        &agent.machine_id,
        "pos.sale,pos.refund",
        &["--expires-in", "30d", "--metadata", "tier=gold"],
    );
    agent.start(&[]);

    let first = wait_token(&agent, &license, None);
    let v = agent.validate(&first);
    assert!(v.valid, "{v:?}\n{}", agent.log());
    assert_eq!(v.features, ["pos.sale", "pos.refund"]);
    assert_eq!(v.metadata.get("tier").map(String::as_str), Some("gold"));
    assert!(v.expires_at.is_some());

    // A forced rotation: new version, token re-issued, the old one still valid in grace.
    let before = agent.newest_version();
    server.admin(&["machine", "rotate", &agent.machine_id]);
    let second = wait_token(&agent, &license, Some(&first));
    assert!(agent.newest_version() > before);
    assert!(agent.validate(&second).valid);
    assert!(
        agent.validate(&first).valid,
        "old token must stay valid during grace\n{}",
        agent.log()
    );
    // The metrics file follows: one ACTIVE secret, at least one in GRACE, rotations and
    // validations counted (it is rewritten after every round).
    wait_until("metrics after the rotation", WAIT, || {
        agent.metric("license_agent_secrets_active") == Some(1)
            && agent.metric("license_agent_secrets_grace").unwrap_or(0) >= 1
            && agent.metric("license_agent_rotations_total").unwrap_or(0) >= 2
            && agent.metric("license_agent_validations_total").unwrap_or(0) >= 3
    });
    assert!(agent.metric("license_agent_last_rotation").unwrap_or(0) > 0);
    let promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(agent.dir.join("state/metrics.prom")).unwrap())
        .output()
        .expect("promtool is needed (scripts/test.sh installs Debian's prometheus)");
    assert!(
        promtool.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&promtool.stdout),
        String::from_utf8_lossy(&promtool.stderr)
    );

    // Once the first version's grace is over, its token ends.
    wait_until("the old token to stop validating", WAIT, || {
        let v = agent.validate(&first);
        !v.valid
            && matches!(
                reason(&v).as_deref(),
                Some("unknown_secret_version" | "expired")
            )
    });
    // …while the agent keeps rotating and the current token keeps working.
    wait_until("a current token to validate", WAIT, || {
        agent
            .token(&license)
            .is_some_and(|t| agent.validate(&t).valid)
    });
    assert_eq!(agent.stop().code(), Some(0), "SIGTERM exits 0");
    assert!(!agent.socket.exists(), "socket removed at shutdown");
}

#[test]
fn degraded_mode_keeps_serving_until_grace_then_heals() {
    let root = tempfile::tempdir().unwrap();
    let mut server = Server::start(root.path(), 3, 12);
    let mut agent = Agent::enroll(&server, root.path(), "pos1", 2, |_| {});
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    agent.start(&[]);
    let token = wait_token(&agent, &license, None);
    assert!(agent.validate(&token).valid);

    server.kill();
    wait_until("degraded mode", WAIT, || {
        !agent.state()["degraded_since"].is_null()
    });
    wait_until("the degraded-mode metric", WAIT, || {
        agent.metric("license_agent_degraded_mode") == Some(1)
    });
    assert!(agent.metric("license_agent_rotations_failed").unwrap_or(0) >= 1);
    let v = agent.validate(&token);
    assert!(
        v.valid,
        "degraded mode keeps validating with ACTIVE/GRACE secrets: {v:?}"
    );
    wait_until("the token to fail once its grace is over", WAIT, || {
        !agent.validate(&token).valid
    });

    server.resume();
    wait_until("the agent to heal", WAIT, || {
        agent.state()["degraded_since"].is_null()
    });
    wait_until("the degraded-mode metric back to 0", WAIT, || {
        agent.metric("license_agent_degraded_mode") == Some(0)
    });
    wait_until("a fresh token to validate", WAIT, || {
        agent
            .token(&license)
            .is_some_and(|t| agent.validate(&t).valid)
    });
    assert!(agent.log().contains("degraded mode ended"));
}

#[test]
fn degraded_mode_forbidden_fails_closed() {
    let root = tempfile::tempdir().unwrap();
    let mut server = Server::start(root.path(), 3, 30);
    let mut agent = Agent::enroll(&server, root.path(), "pos1", 2, |t| {
        t["agent"]["degraded_mode"] = toml::Value::String("deny".into());
    });
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    agent.start(&[]);
    let token = wait_token(&agent, &license, None);
    assert!(agent.validate(&token).valid);
    server.kill();
    wait_until("degraded_mode_disabled answers", WAIT, || {
        reason(&agent.validate(&token)).as_deref() == Some("degraded_mode_disabled")
    });
    server.resume();
    wait_until("service back once the server is", WAIT, || {
        agent
            .token(&license)
            .is_some_and(|t| agent.validate(&t).valid)
    });
}

#[test]
fn kill_at_each_rotation_step_keeps_old_or_new_and_converges() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(root.path(), 3600, 3600);
    let mut agent = Agent::enroll(&server, root.path(), "pos1", 3600, |_| {});
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    agent.start(&[]);
    let mut token = wait_token(&agent, &license, None);
    agent.stop();

    for step in ["after_receive", "after_store", "after_ack"] {
        server.admin(&["machine", "rotate", &agent.machine_id]);
        let status = agent.run_until_exit(&[("LICENSE_AGENT_TEST_CRASH_AT", step)], WAIT);
        assert!(
            !status.success(),
            "{step}: the crash point must end the process"
        );
        assert!(agent.log().contains(&format!("test crash at {step}")));

        agent.start(&[]);
        // Never neither: the token held before the crash validates at once.
        let v = agent.validate(&token);
        assert!(
            v.valid,
            "{step}: old token after restart: {v:?}\n{}",
            agent.log()
        );
        // And the agent converges with the server: same version, nothing pending. (The
        // server's own view: asking through the agent would load the machine key a second
        // time, which a TPM without a resource manager, as in the TPM-backed run, cannot hold.)
        wait_until(&format!("{step}: convergence"), WAIT, || {
            let secrets = server.admin(&["machine", "secrets", &agent.machine_id]);
            let states: Vec<(u64, String)> = secrets
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r["version"].as_u64().unwrap(),
                        r["state"].as_str().unwrap().to_string(),
                    )
                })
                .collect();
            let active = states
                .iter()
                .find(|(_, state)| state == "active")
                .map(|(v, _)| *v);
            !states.iter().any(|(_, state)| state == "pending")
                && active == Some(agent.newest_version())
        });
        let newest = wait_token(&agent, &license, None);
        assert!(agent.validate(&newest).valid);
        token = newest;
        agent.stop();
    }
}

#[test]
fn server_killed_between_commit_and_answer_resends_the_same_version() {
    let root = tempfile::tempdir().unwrap();
    let mut server = Server::start(root.path(), 3600, 3600);
    let mut agent = Agent::enroll(&server, root.path(), "pos1", 3600, |_| {});
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    agent.start(&[]);
    let first = wait_token(&agent, &license, None);
    assert_eq!(agent.newest_version(), 1);

    // The next rotation kills the server right after it commits version 2.
    server.kill();
    server.resume_with_env(&[("LICENSE_SERVER_TEST_CRASH_AT", "rotate_after_commit")]);
    server.admin(&["machine", "rotate", &agent.machine_id]);
    let status = server.wait_exit(WAIT);
    assert!(!status.success());
    assert!(server
        .server_log()
        .contains("test crash after committing a rotation"));
    assert_eq!(agent.newest_version(), 1, "the answer never arrived");
    assert!(agent.validate(&first).valid);

    server.resume();
    wait_until("the retry to deliver version 2", WAIT, || {
        agent.newest_version() == 2
    });
    let audit = server.admin(&["audit", "list", "--limit", "1000"]);
    let rotations: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "secret.rotate")
        .collect();
    assert!(
        rotations
            .iter()
            .any(|e| e["details"]["version"] == 2 && e["details"]["resent"] == true),
        "the retry got the committed version 2 again, not a new one: {rotations:?}"
    );
    assert!(!rotations.iter().any(|e| e["details"]["version"] == 3));
    let second = wait_token(&agent, &license, Some(&first));
    assert!(agent.validate(&second).valid && agent.validate(&first).valid);
}

fn raw_call(socket: &std::path::Path, payload: &[u8]) -> Option<Value> {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&(payload.len() as u32).to_be_bytes()).unwrap();
    s.write_all(payload).unwrap();
    read_answer(&mut s)
}

fn read_answer(s: &mut UnixStream) -> Option<Value> {
    let mut header = [0u8; 4];
    s.read_exact(&mut header).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
    s.read_exact(&mut body).ok()?;
    serde_json::from_slice(&body).ok()
}

#[test]
fn ipc_refuses_replays_bad_frames_strangers_and_other_machines_tokens() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(root.path(), 3600, 3600);
    // A socket directory others can reach: access is decided by SO_PEERCRED, not the path.
    let public_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        public_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let socket = public_dir.path().join("agent.sock");
    let mut agent = Agent::enroll(&server, root.path(), "pos1", 3600, |t| {
        t["ipc"]["socket"] = toml::Value::String(socket.display().to_string());
        // Open to every local user, so the per-peer check below is what refuses.
        t["ipc"]["socket_mode"] = toml::Value::String("0666".into());
    });
    agent.socket = socket.clone();
    let mut other = Agent::enroll(&server, root.path(), "pos2", 3600, |_| {});
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    let other_license = server.issue_license(&other.machine_id, "pos.sale", &[]);
    agent.start(&[]);
    other.start(&[]);
    let token = wait_token(&agent, &license, None);
    let foreign = wait_token(&other, &other_license, None);

    // Replayed nonce.
    let request = json!({"op": "validate_license", "license_token": token, "nonce": "00112233445566778899aabbccddeeff"});
    let first = raw_call(&socket, request.to_string().as_bytes()).unwrap();
    assert_eq!(first["valid"], true, "{first}");
    assert_eq!(first["nonce"], "00112233445566778899aabbccddeeff");
    let again = raw_call(&socket, request.to_string().as_bytes()).unwrap();
    assert_eq!(
        (again["valid"].clone(), again["reason"].clone()),
        (json!(false), json!("replayed_nonce"))
    );

    // Another machine's token; a forged one; revocation.
    assert_eq!(
        reason(&agent.validate(&foreign)).as_deref(),
        Some("wrong_machine")
    );
    let mut forged = base64_flip_last(&token);
    assert_eq!(
        reason(&agent.validate(&forged)).as_deref(),
        Some("bad_signature")
    );
    forged.push('!');
    assert_eq!(
        reason(&agent.validate(&forged)).as_deref(),
        Some("malformed")
    );

    // Bad frames: each answered (or closed) and the daemon keeps serving.
    let nonce = "ffeeddccbbaa99887766554433221100";
    for (payload, expected) in [
        (b"not json".to_vec(), "bad_request"),
        (
            json!({"op": "format_disk", "nonce": nonce})
                .to_string()
                .into_bytes(),
            "unknown_op",
        ),
        (
            json!({"op": "validate_license", "license_token": 42, "nonce": nonce})
                .to_string()
                .into_bytes(),
            "bad_request",
        ),
        (
            json!({"op": "validate_license", "license_token": token})
                .to_string()
                .into_bytes(),
            "bad_request",
        ),
    ] {
        let answer = raw_call(&socket, &payload).unwrap();
        assert_eq!(
            answer["reason"],
            expected,
            "{}",
            String::from_utf8_lossy(&payload)
        );
    }
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&(1u32 << 20).to_be_bytes()).unwrap();
    assert_eq!(read_answer(&mut s).unwrap()["reason"], "frame_too_large");
    assert!(
        read_answer(&mut s).is_none(),
        "connection closed after an oversized frame"
    );
    let mut s = UnixStream::connect(&socket).unwrap();
    s.write_all(&100u32.to_be_bytes()).unwrap();
    s.write_all(b"{\"op\":").unwrap();
    drop(s); // truncated frame, then gone
             // Several requests on one connection still work.
    let mut client = license_client::Client::connect(&socket).unwrap();
    for _ in 0..3 {
        assert!(client.validate_license(&token).unwrap().valid);
    }

    // A peer whose uid is not whitelisted (nobody) is refused; others are still served.
    let script = format!(
        "import json,socket,struct\ns=socket.socket(socket.AF_UNIX)\ns.connect({:?})\n\
         p=json.dumps({{'op':'validate_license','license_token':{:?},'nonce':'0123456789abcdef0123456789abcdef'}}).encode()\n\
         try:\n    s.sendall(struct.pack('>I',len(p))+p)\nexcept BrokenPipeError:\n    pass\n\
         n=struct.unpack('>I',s.recv(4))[0]\nprint(s.recv(n).decode())",
        socket.display().to_string(),
        token
    );
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            &script,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["reason"], "not_authorized", "{answer}");
    assert!(agent.log().contains("peer refused"));
    assert!(agent.validate(&token).valid);

    // Every answer above is in the hash-chained audit log, the refused stranger too.
    let log = agent.dir.join("log/audit.log");
    let cli = |args: &[&str]| {
        Command::new(bin("license-agent-cli"))
            .args(args)
            .arg("--log")
            .arg(&log)
            .output()
            .unwrap()
    };
    let verify = cli(&["audit", "verify", "--json"]);
    assert_eq!(
        verify.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let shown = cli(&["audit", "show", "--json", "--event", "license.validate"]);
    let validations: Vec<Value> = String::from_utf8_lossy(&shown.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        validations.len() >= 10,
        "{} validations audited",
        validations.len()
    );
    assert!(validations
        .iter()
        .any(|e| e["outcome"] == "refused" && e["details"]["reason"] == "replayed_nonce"));
    assert!(validations.iter().all(|e| e["actor"]["uid"] == 0));
    let refused = cli(&["audit", "show", "--json", "--event", "ipc.peer_refused"]);
    assert!(
        String::from_utf8_lossy(&refused.stdout).contains("65534"),
        "the refused peer is audited"
    );

    server.admin(&["license", "revoke", &license]);
    wait_until("the revocation to reach the agent", WAIT, || {
        reason(&agent.validate(&token)).as_deref() == Some("revoked")
    });
    assert!(agent.is_running() && other.is_running());
}

#[test]
fn a_validation_is_not_answered_until_its_audit_record_is_durable() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(root.path(), 3600, 3600);
    // The audit log on a tiny filesystem of its own, so the test can fill it.
    let disk = root.path().join("auditfs");
    std::fs::create_dir(&disk).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "mounting a tmpfs needs root (scripts/test.sh runs as root)"
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(disk.clone());
    let log = disk.join("audit.log");
    let mut agent = Agent::enroll(&server, root.path(), "pos1", 3600, |t| {
        let agent = t["agent"].as_table_mut().unwrap();
        agent.insert(
            "audit_log".into(),
            toml::Value::String(log.display().to_string()),
        );
    });
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    agent.start(&[]);
    let token = wait_token(&agent, &license, None);
    assert!(agent.validate(&token).valid);

    // Disk full: the agent does not answer "valid" without a durable record.
    let filler = disk.join("filler");
    let _ = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", filler.display()))
        .args(["bs=4k", "count=1000"])
        .output();
    // Records still fit in the slack of the log's last page for a while; once they stop
    // fitting, every answer is `internal`, never an unaudited "valid".
    let mut answers = Vec::new();
    for _ in 0..200 {
        let v = agent.validate(&token);
        let refused = reason(&v).as_deref() == Some("internal");
        answers.push(refused);
        if refused {
            break;
        }
    }
    assert_eq!(
        answers.last(),
        Some(&true),
        "the disk never filled: {} answers",
        answers.len()
    );
    for _ in 0..5 {
        assert_eq!(reason(&agent.validate(&token)).as_deref(), Some("internal"));
    }
    assert!(agent
        .log()
        .contains("its audit record could not be written"));

    // Space back: service back, and the chain is intact.
    std::fs::remove_file(&filler).unwrap();
    wait_until("validations answered again", WAIT, || {
        agent.validate(&token).valid
    });
    let verify = Command::new(bin("license-agent-cli"))
        .args(["audit", "verify", "--log"])
        .arg(&log)
        .output()
        .unwrap();
    assert_eq!(
        verify.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    agent.stop();

    // The anchor kept in state.json matches the log's end: removing trailing entries shows.
    let anchor = agent.state()["audit_anchor"].clone();
    let (seq, hash) = (
        anchor[0].as_u64().unwrap(),
        anchor[1].as_str().unwrap().to_string(),
    );
    let check = |log: &std::path::Path| {
        Command::new(bin("license-agent-cli"))
            .args([
                "audit",
                "verify",
                "--anchor-seq",
                &seq.to_string(),
                "--anchor-hash",
                &hash,
                "--log",
            ])
            .arg(log)
            .output()
            .unwrap()
    };
    assert_eq!(
        check(&log).status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&check(&log).stdout)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let kept: Vec<&str> = text.lines().collect();
    std::fs::write(&log, kept[..kept.len() - 2].join("\n") + "\n").unwrap();
    let truncated = check(&log);
    assert_eq!(
        truncated.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&truncated.stdout)
    );
}

fn base64_flip_last(token: &str) -> String {
    use base64::Engine as _;
    let mut bytes = base64::engine::general_purpose::STANDARD
        .decode(token)
        .unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn a_server_failing_the_pin_is_refused_and_the_old_secret_kept() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(root.path(), 3, 60);
    let mut agent = Agent::enroll(&server, root.path(), "pos1", 2, |_| {});
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    agent.start(&[]);
    let token = wait_token(&agent, &license, None);
    agent.stop();
    let held = agent.newest_version();

    // Same server, same chain, but the agent now pins another key.
    let text = std::fs::read_to_string(&agent.config).unwrap();
    let pin = text
        .lines()
        .find(|l| l.starts_with("cert_pin"))
        .unwrap()
        .to_string();
    std::fs::write(
        &agent.config,
        text.replace(
            &pin,
            "cert_pin = \"sha256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"",
        ),
    )
    .unwrap();
    agent.start(&[]);
    wait_until("rotation failures", WAIT, || {
        agent.state()["consecutive_failures"].as_u64().unwrap_or(0) >= 1
    });
    assert!(
        agent.log().contains("does not match the pinned key"),
        "{}",
        agent.log()
    );
    assert_eq!(
        agent.newest_version(),
        held,
        "no secret accepted from a server failing the pin"
    );
    assert!(agent.validate(&token).valid, "the old secret still serves");
}

#[test]
fn clock_moved_back_does_not_move_expiry_back() {
    let root = tempfile::tempdir().unwrap();
    // Secrets live days, so only the license's own expiry is at stake.
    let server = Server::start(root.path(), 86_400, 86_400);
    let mut agent = Agent::enroll(&server, root.path(), "pos1", 3600, |_| {});
    let license = server.issue_license(&agent.machine_id, "pos.sale", &["--expires-in", "3s"]);
    agent.start(&[]);
    let token = wait_token(&agent, &license, None);
    wait_until("the license to expire", WAIT, || {
        reason(&agent.validate(&token)).as_deref() == Some("expired")
    });
    agent.stop();

    // The till's clock is set back an hour: expiry decisions keep the later time it has seen
    // (and the server's time, once it answers, agrees).
    let back = faketime("-1h");
    let env: Vec<(&str, &str)> = back.iter().map(|(k, v)| (*k, v.as_str())).collect();
    agent.start(&env);
    assert_eq!(reason(&agent.validate(&token)).as_deref(), Some("expired"));
    wait_until("a round with the server", WAIT, || {
        agent.state()["server_time"].is_i64()
    });
    assert_eq!(reason(&agent.validate(&token)).as_deref(), Some("expired"));
    assert!(
        agent.log().contains("system clock is behind"),
        "{}",
        agent.log()
    );
}

#[test]
fn corrupt_state_is_recovered_and_secrets_never_leak() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(root.path(), 3600, 3600);
    let mut agent = Agent::enroll(&server, root.path(), "pos1", 3600, |_| {});
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    agent.start(&[]);
    let token = wait_token(&agent, &license, None);
    agent.stop();

    std::fs::write(agent.dir.join("state/state.json"), b"{ torn write").unwrap();
    agent.start(&[]);
    assert!(agent.validate(&token).valid);
    assert!(
        agent.log().contains("recovered from state.json.bak"),
        "{}",
        agent.log()
    );
    let kept: Vec<_> = std::fs::read_dir(agent.dir.join("state"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        kept.iter().any(|n| n.contains("corrupt")),
        "the corrupt copy is kept aside: {kept:?}"
    );
    agent.stop();

    // The secret, recovered here from the server's database with its master key, appears in
    // no file, log or answer on the machine or the server.
    let secrets = server_secrets(&server, &agent.machine_id);
    assert!(!secrets.is_empty());
    let mut haystack = String::new();
    for dir in [&agent.dir, &server.dir] {
        for entry in walk(dir) {
            if entry
                .extension()
                .is_some_and(|e| e == "db" || e == "db-wal" || e == "db-shm")
            {
                continue; // ciphertext under the master key by design
            }
            haystack.push_str(&String::from_utf8_lossy(
                &std::fs::read(&entry).unwrap_or_default(),
            ));
        }
    }
    haystack.push_str(
        &server
            .admin(&["audit", "list", "--limit", "10000"])
            .to_string(),
    );
    haystack.push_str(&server_status(&agent).to_string());
    for secret in &secrets {
        use base64::Engine as _;
        for needle in [
            hex::encode(secret),
            base64::engine::general_purpose::STANDARD.encode(secret),
        ] {
            assert!(!haystack.contains(&needle), "secret bytes found");
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else if path.is_file() {
            out.push(path);
        }
    }
    out
}

/// Every secret of `machine`, decrypted from the server database with the master key.
fn server_secrets(server: &Server, machine: &str) -> Vec<Vec<u8>> {
    let master = server.master_key();
    let db = server.dir.join("license.db");
    let out = Command::new("sqlite3")
        .arg(&db)
        .arg(format!(
            "SELECT version, hex(secret_enc) FROM secrets WHERE machine_id = '{machine}'"
        ))
        .output();
    let out = match out {
        Ok(out) if out.status.success() => String::from_utf8(out.stdout).unwrap(),
        _ => panic!("sqlite3 is needed to read the server database (scripts/test.sh installs it)"),
    };
    let id: uuid::Uuid = machine.parse().unwrap();
    out.lines()
        .map(|line| {
            let (version, blob) = line.split_once('|').unwrap();
            let version: u64 = version.parse().unwrap();
            let mut aad = id.as_bytes().to_vec();
            aad.extend_from_slice(&version.to_be_bytes());
            let secret = license_protocol::secret::decrypt_at_rest(
                &master,
                &hex::decode(blob).unwrap(),
                &aad,
            )
            .unwrap();
            secret.expose().to_vec()
        })
        .collect()
}
