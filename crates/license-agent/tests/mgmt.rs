//! The management interface end to end: a real agent, the real `license-agent-cli`, roles by
//! uid (other users through `setpriv`), the token second factor, every request audited, and
//! admin actions refused when they cannot be audited.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{bin, wait_until, Agent, Server};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
const READER: u32 = 65534; // nobody
const STRANGER: u32 = 4242;

/// A directory everyone can traverse, for sockets other uids must reach.
fn public_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    dir
}

fn cli(socket: &Path, uid: u32, args: &[&str]) -> Output {
    let mut cmd = if uid == 0 {
        Command::new(bin("license-agent-cli"))
    } else {
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
        ])
        .arg(bin("license-agent-cli"));
        c
    };
    cmd.arg("--socket").arg(socket).args(args).output().unwrap()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "not JSON: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn audit_events(agent: &Agent, event: &str) -> Vec<Value> {
    let out = Command::new(bin("license-agent-cli"))
        .args(["audit", "show", "--json", "--event", event, "--log"])
        .arg(agent.dir.join("log/audit.log"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn managed_agent(
    server: &Server,
    root: &Path,
    socket: &Path,
    extra: impl FnOnce(&mut toml::Table),
) -> Agent {
    let socket = socket.display().to_string();
    Agent::enroll(server, root, "pos1", 3600, move |t| {
        let m = t["management"].as_table_mut().unwrap();
        m.insert("socket".into(), toml::Value::String(socket));
        m.insert(
            "allowed_uids".into(),
            toml::Value::Array(vec![toml::Value::Integer(READER.into())]),
        );
        m.insert(
            "admin_uids".into(),
            toml::Value::Array(vec![toml::Value::Integer(0)]),
        );
        extra(t);
    })
}

#[test]
fn roles_commands_and_their_audit() {
    let root = tempfile::tempdir().unwrap();
    let public = public_dir();
    let socket = public.path().join("mgmt.sock");
    let server = Server::start(root.path(), 3600, 3600);
    let mut agent = managed_agent(&server, root.path(), &socket, |_| {});
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    agent.start(&[]);
    wait_until("a token", WAIT, || agent.token(&license).is_some());

    // Read role: status (human and JSON), metrics.
    let status = cli(&socket, READER, &["status"]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(String::from_utf8_lossy(&status.stdout).contains(&agent.machine_id));
    let view = json(&cli(&socket, READER, &["--json", "status"]));
    assert_eq!(view["machine_id"], agent.machine_id.as_str());
    assert_eq!(view["store"], "file");
    assert_eq!(view["secrets"][0]["state"], "active");
    let metrics = cli(&socket, READER, &["metrics"]);
    assert!(String::from_utf8_lossy(&metrics.stdout).contains("license_agent_validations_total"));

    // Read role may not act; a stranger may not even read.
    let refused = cli(&socket, READER, &["rotate"]);
    assert_eq!(
        refused.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not_authorized"));
    assert_eq!(cli(&socket, STRANGER, &["status"]).status.code(), Some(3));

    // Admin role: rotate, invalidate, validate, degraded switch.
    let before = agent.newest_version();
    let rotated = json(&cli(&socket, 0, &["--json", "rotate"]));
    assert_eq!(rotated["version"].as_u64(), Some(before + 1));
    let token_file = root.path().join("token.txt");
    wait_until("the re-issued token", WAIT, || {
        agent
            .token(&license)
            .is_some_and(|t| agent.validate(&t).valid)
    });
    std::fs::write(&token_file, agent.token(&license).unwrap()).unwrap();
    let valid = cli(&socket, 0, &["validate", token_file.to_str().unwrap()]);
    assert_eq!(
        valid.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&valid.stdout)
    );
    let invalidated = cli(&socket, 0, &["invalidate", &(before + 1).to_string()]);
    assert!(
        invalidated.status.success(),
        "{}",
        String::from_utf8_lossy(&invalidated.stderr)
    );
    let invalid = cli(
        &socket,
        0,
        &["--json", "validate", token_file.to_str().unwrap()],
    );
    assert_eq!(invalid.status.code(), Some(1));
    assert_eq!(json(&invalid)["reason"], "secret_invalidated");
    let forced = json(&cli(&socket, 0, &["--json", "degraded", "on"]));
    assert!(
        forced["degraded"].as_str().unwrap().starts_with("forced"),
        "{forced}"
    );
    assert_eq!(
        json(&cli(&socket, READER, &["--json", "status"]))["degraded_mode"],
        "forced"
    );
    cli(&socket, 0, &["degraded", "auto"]);
    assert_eq!(
        json(&cli(&socket, READER, &["--json", "status"]))["degraded_mode"],
        "inactive"
    );

    // Everything above is in the audit log, refusals included, with the peer's uid.
    let rotates = audit_events(&agent, "mgmt.rotate");
    assert!(rotates
        .iter()
        .any(|e| e["outcome"] == "refused" && e["actor"]["uid"] == READER));
    assert!(rotates
        .iter()
        .any(|e| e["outcome"] == "success" && e["actor"]["uid"] == 0));
    assert!(audit_events(&agent, "mgmt.status")
        .iter()
        .any(|e| e["outcome"] == "refused" && e["actor"]["uid"] == STRANGER));
    assert!(
        !audit_events(&agent, "mgmt.invalidate").is_empty()
            && !audit_events(&agent, "mgmt.degraded").is_empty()
    );
    let verify = Command::new(bin("license-agent-cli"))
        .args(["audit", "verify", "--log"])
        .arg(agent.dir.join("log/audit.log"))
        .output()
        .unwrap();
    assert_eq!(verify.status.code(), Some(0));
}

#[test]
fn token_second_factor_and_degraded_mode_forbidden_by_config() {
    let root = tempfile::tempdir().unwrap();
    let public = public_dir();
    let socket = public.path().join("mgmt.sock");
    let server = Server::start(root.path(), 3600, 3600);
    let secret = root.path().join("mgmt.token");
    std::fs::write(&secret, "s3cond-factor\n").unwrap();
    let secret_path = secret.display().to_string();
    let mut agent = managed_agent(&server, root.path(), &socket, move |t| {
        t["management"]
            .as_table_mut()
            .unwrap()
            .insert("token_file".into(), toml::Value::String(secret_path));
        t["agent"]["degraded_mode"] = toml::Value::String("deny".into());
    });
    agent.start(&[]);
    let without = cli(&socket, 0, &["status"]);
    assert_eq!(without.status.code(), Some(3));
    let wrong = root.path().join("wrong.token");
    std::fs::write(&wrong, "guess").unwrap();
    assert_eq!(
        cli(
            &socket,
            0,
            &["--token-file", wrong.to_str().unwrap(), "status"]
        )
        .status
        .code(),
        Some(3)
    );
    let with = cli(
        &socket,
        0,
        &["--token-file", secret.to_str().unwrap(), "status"],
    );
    assert!(
        with.status.success(),
        "{}",
        String::from_utf8_lossy(&with.stderr)
    );
    let on = cli(
        &socket,
        0,
        &["--token-file", secret.to_str().unwrap(), "degraded", "on"],
    );
    assert_eq!(on.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&on.stderr).contains("forbids degraded mode"));
    assert!(!audit_events(&agent, "mgmt.status").is_empty());
}

#[test]
fn admin_actions_are_refused_while_they_cannot_be_audited() {
    let root = tempfile::tempdir().unwrap();
    let public = public_dir();
    let socket = public.path().join("mgmt.sock");
    let server = Server::start(root.path(), 3600, 3600);
    let disk = root.path().join("auditfs");
    std::fs::create_dir(&disk).unwrap();
    assert!(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&disk)
        .status()
        .unwrap()
        .success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(disk.clone());
    let log = disk.join("audit.log").display().to_string();
    let mut agent = managed_agent(&server, root.path(), &socket, move |t| {
        t["agent"]
            .as_table_mut()
            .unwrap()
            .insert("audit_log".into(), toml::Value::String(log));
    });
    agent.start(&[]);
    assert!(cli(&socket, 0, &["rotate"]).status.success());

    let filler = disk.join("filler");
    let _ = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", filler.display()))
        .args(["bs=4k", "count=1000"])
        .output();
    // Once records stop fitting (page slack), the action is refused, not done unaudited.
    let before = agent.newest_version();
    let mut refused = None;
    for _ in 0..200 {
        let out = cli(&socket, 0, &["rotate"]);
        if out.status.code() == Some(3) {
            refused = Some(out);
            break;
        }
    }
    let refused = refused.expect("the audit disk never filled");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("audit_unavailable"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let after_refusal = agent.newest_version();
    assert_eq!(cli(&socket, 0, &["rotate"]).status.code(), Some(3));
    assert_eq!(
        agent.newest_version(),
        after_refusal,
        "no rotation happened unaudited"
    );
    assert!(after_refusal >= before);

    std::fs::remove_file(&filler).unwrap();
    wait_until("admin actions accepted again", WAIT, || {
        cli(&socket, 0, &["rotate"]).status.success()
    });
    let verify = Command::new(bin("license-agent-cli"))
        .args(["audit", "verify", "--log"])
        .arg(disk.join("audit.log"))
        .output()
        .unwrap();
    assert_eq!(
        verify.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

/// A Python `script` run as `uid` (the system's Python: another user cannot reach root's, e.g.
/// pyenv shims) with `args`, stdin and stdout piped; killed when the returned guard drops,
/// however the test ends.
fn python_as(
    uid: u32,
    script: &str,
    args: &[&std::ffi::OsStr],
) -> (Killed, std::process::ChildStdin, std::process::ChildStdout) {
    python_as_member(uid, None, script, args)
}

/// [`python_as`], with `group` as the process's one supplementary group.
fn python_as_member(
    uid: u32,
    group: Option<u32>,
    script: &str,
    args: &[&std::ffi::OsStr],
) -> (Killed, std::process::ChildStdin, std::process::ChildStdout) {
    let groups = match group {
        Some(gid) => format!("--groups={gid}"),
        None => "--clear-groups".to_string(),
    };
    let mut child = Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            &groups,
            "/usr/bin/python3",
            "-c",
            script,
        ])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (stdin, stdout) = (child.stdin.take().unwrap(), child.stdout.take().unwrap());
    (Killed(child), stdin, stdout)
}

/// Kills its process on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Holds `n` connections to `socket` (as the running uid) and reconnects whenever the agent
/// closes one: `knock` sends an empty frame on each every second, `silent` sends nothing — the
/// lock-out attempts of the adversarial review.
const LOCKER: &str = r#"
import socket, sys, time
path, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def connect():
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    except OSError:
        return None
    if mode == "silent":
        s.setblocking(False)
    return s
held = [connect() for _ in range(n)]
print("ready", flush=True)
while True:
    for i, s in enumerate(held):
        try:
            if s is None:
                raise OSError
            if mode == "knock":
                s.sendall(b"\0\0\0\0")
            elif s.recv(65536) == b"":
                raise OSError
        except BlockingIOError:
            pass
        except OSError:
            held[i] = connect()
    time.sleep(1 if mode == "knock" else 0.1)
"#;

#[test]
fn a_local_user_cannot_lock_root_out_of_the_management_socket() {
    use std::io::BufRead as _;
    let root = tempfile::tempdir().unwrap();
    let public = public_dir();
    let socket = public.path().join("mgmt.sock");
    let server = Server::start(root.path(), 3600, 3600);
    let mut agent = managed_agent(&server, root.path(), &socket, |_| {});
    agent.start(&[]);

    // A stranger holds every slot the socket has, sending empty frames to stay alive.
    let (_locker, _stdin, stdout) = python_as(
        STRANGER,
        LOCKER,
        &[socket.as_os_str(), "16".as_ref(), "knock".as_ref()],
    );
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    std::thread::sleep(Duration::from_secs(3));

    // Root and the reader still get in, every time.
    for _ in 0..5 {
        let status = cli(&socket, 0, &["--json", "status"]);
        assert!(
            status.status.success(),
            "root locked out: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        assert!(cli(&socket, READER, &["status"]).status.success());
        std::thread::sleep(Duration::from_millis(300));
    }
    // The stranger's connections are refused, audited, and closed.
    let refused = audit_events(&agent, "mgmt.connect");
    assert!(
        refused.iter().any(|e| e["actor"]["uid"] == STRANGER),
        "{refused:?}"
    );
}

#[test]
fn users_together_cannot_lock_root_out_of_the_management_socket() {
    use std::io::BufRead as _;
    let root = tempfile::tempdir().unwrap();
    let public = public_dir();
    let socket = public.path().join("mgmt.sock");
    let server = Server::start(root.path(), 3600, 3600);
    let mut agent = managed_agent(&server, root.path(), &socket, |_| {});
    agent.start(&[]);

    // Four users, each at its own cap of four connections, silent: the socket's 16 slots.
    let lockers: Vec<_> = (0..4)
        .map(|n| {
            let (locker, stdin, stdout) = python_as(
                STRANGER + n,
                LOCKER,
                &[socket.as_os_str(), "4".as_ref(), "silent".as_ref()],
            );
            let mut line = String::new();
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .unwrap();
            assert_eq!(line.trim(), "ready");
            (locker, stdin)
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));

    // Root (in admin_uids) still gets in, every time.
    for _ in 0..5 {
        let status = cli(&socket, 0, &["--json", "status"]);
        assert!(
            status.status.success(),
            "root locked out: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(lockers);
}

/// Entries cut from the end of the audit log: `audit verify` catches it by default (from the
/// anchor in state.json), and so does the agent at its next start (`audit_log_tampered`).
#[test]
fn entries_cut_from_the_end_of_the_audit_log_are_caught() {
    let root = tempfile::tempdir().unwrap();
    let public = public_dir();
    let socket = public.path().join("mgmt.sock");
    let server = Server::start(root.path(), 3600, 3600);
    let mut agent = managed_agent(&server, root.path(), &socket, |_| {});
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    agent.start(&[]);
    wait_until("a token", WAIT, || agent.token(&license).is_some());
    let token = agent.token(&license).unwrap();
    for _ in 0..5 {
        assert!(agent.validate(&token).valid);
    }
    assert_eq!(agent.stop().code(), Some(0));

    let log = agent.dir.join("log/audit.log");
    let state = agent.dir.join("state/state.json");
    let verify = |extra: &[&str]| {
        Command::new(bin("license-agent-cli"))
            .args(["audit", "verify", "--log"])
            .arg(&log)
            .arg("--state")
            .arg(&state)
            .args(extra)
            .output()
            .unwrap()
    };
    let intact = verify(&[]);
    assert_eq!(
        intact.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&intact.stdout)
    );

    // Cut every entry from the anchor on: the chain that is left is intact.
    let anchor = agent.state()["audit_anchor"][0].as_u64().unwrap();
    let kept: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|e| e["seq"].as_u64())
                .is_some_and(|seq| seq < anchor)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&log, kept.concat()).unwrap();
    let cut = verify(&[]);
    assert_eq!(
        cut.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&cut.stdout)
    );
    assert!(String::from_utf8_lossy(&cut.stdout).contains("removed"));
    assert_eq!(
        verify(&["--no-anchor"]).status.code(),
        Some(0),
        "the chain alone cannot tell"
    );

    agent.start(&[]);
    wait_until("the tamper alert", WAIT, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("\"alert.audit_log_tampered\"")
    });
}

/// An agent whose validation socket is at `socket` (in a directory every uid can reach), with
/// `allowed_uids` when given.
fn agent_on_socket(server: &Server, root: &Path, socket: &Path, allowed: Option<&[u32]>) -> Agent {
    let ipc_socket = socket.display().to_string();
    let allowed: Option<Vec<toml::Value>> = allowed.map(|uids| {
        uids.iter()
            .map(|&u| toml::Value::Integer(u.into()))
            .collect()
    });
    let mut agent = Agent::enroll(server, root, "pos1", 3600, move |t| {
        t["ipc"]["socket"] = toml::Value::String(ipc_socket);
        // Open to every local user: these tests exercise the per-peer defences behind the mode.
        t["ipc"]["socket_mode"] = toml::Value::String("0666".into());
        if let Some(uids) = allowed {
            t["ipc"]["allowed_uids"] = toml::Value::Array(uids);
        }
    });
    agent.socket = socket.to_path_buf();
    agent
}

/// Holds one connection to the validation socket and sends a request each time a line arrives
/// on stdin, printing the answer's reason (or `closed`).
const HOLDER: &str = r#"
import json, os, socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
print("ready", flush=True)
for _ in sys.stdin:
    body = json.dumps({"op": "validate_license", "license_token": "bm90LWEtdG9rZW4=",
                       "nonce": os.urandom(16).hex()}).encode()
    try:
        s.sendall(struct.pack(">I", len(body)) + body)
        head = s.recv(4)
        if len(head) < 4:
            raise OSError
        (n,) = struct.unpack(">I", head)
        data = b""
        while len(data) < n:
            data += s.recv(n - len(data))
        print(json.loads(data).get("reason"), flush=True)
    except OSError:
        print("closed", flush=True)
"#;

/// A uid removed from `ipc.allowed_uids` by a reload loses the connection it holds open.
#[test]
fn a_reload_that_removes_a_uid_closes_its_open_validation_session() {
    use std::io::{BufRead as _, Write as _};
    let root = tempfile::tempdir().unwrap();
    let public = public_dir();
    let socket = public.path().join("agent.sock");
    let server = Server::start(root.path(), 3600, 3600);
    let mut agent = agent_on_socket(&server, root.path(), &socket, Some(&[0, STRANGER]));
    agent.start(&[]);

    let (_holder, mut input, stdout) = python_as(STRANGER, HOLDER, &[socket.as_os_str()]);
    let mut output = std::io::BufReader::new(stdout);
    let mut ready = String::new();
    output.read_line(&mut ready).unwrap();
    assert_eq!(ready.trim(), "ready");
    let mut ask = || {
        writeln!(input).unwrap();
        let mut line = String::new();
        output.read_line(&mut line).unwrap();
        line.trim().to_string()
    };
    assert_eq!(ask(), "malformed", "allowed: the token itself is judged");

    // The uid is removed from the allow-list and the agent reloads.
    let text = std::fs::read_to_string(&agent.config).unwrap();
    let mut table: toml::Table = text.parse().unwrap();
    table["ipc"]["allowed_uids"] = toml::Value::Array(vec![toml::Value::Integer(0)]);
    std::fs::write(&agent.config, toml::to_string(&table).unwrap()).unwrap();
    agent.signal("HUP");
    wait_until("the reload", WAIT, || agent.log().contains("reload"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ask(), "not_authorized", "the open session loses its access");
    assert_eq!(ask(), "closed");
}

/// Connects to the validation socket `n` times, one request each, as fast as it can.
const KNOCKER: &str = r#"
import json, os, socket, struct, sys
path, n = sys.argv[1], int(sys.argv[2])
served = 0  # answers other than not_authorized (a closed connection is a refusal too)
for _ in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    body = json.dumps({"op": "validate_license", "license_token": "x", "nonce": os.urandom(16).hex()}).encode()
    try:
        s.sendall(struct.pack(">I", len(body)) + body)
        head = s.recv(4)
        if len(head) == 4:
            (k,) = struct.unpack(">I", head)
            if json.loads(s.recv(k)).get("reason") != "not_authorized":
                served += 1
    except OSError:
        pass
    s.close()
print(served, flush=True)
"#;

/// A local user knocking on the validation socket over and over costs one audit record and one
/// alert a minute, not two fsynced records per connection; the POS application is served.
#[test]
fn refused_peers_are_recorded_once_a_minute_and_the_pos_application_served() {
    use std::io::BufRead as _;
    let root = tempfile::tempdir().unwrap();
    let public = public_dir();
    let socket = public.path().join("agent.sock");
    let server = Server::start(root.path(), 3600, 3600);
    let mut agent = agent_on_socket(&server, root.path(), &socket, None);
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    agent.start(&[]);
    wait_until("a token", WAIT, || agent.token(&license).is_some());
    let token = agent.token(&license).unwrap();

    let (_knocker, _stdin, stdout) =
        python_as(STRANGER, KNOCKER, &[socket.as_os_str(), "300".as_ref()]);
    for _ in 0..50 {
        assert!(agent.validate(&token).valid);
    }
    let mut served = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut served)
        .unwrap();
    assert_eq!(served.trim(), "0", "every knock refused");

    let audit = std::fs::read_to_string(agent.dir.join("log/audit.log")).unwrap();
    let entries: Vec<Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    let refusals = entries
        .iter()
        .filter(|e| e["event"] == "ipc.peer_refused" && e["actor"]["uid"] == STRANGER)
        .count();
    let alerts = entries
        .iter()
        .filter(|e| e["event"] == "alert.unauthorized_access" && e["details"]["uid"] == STRANGER)
        .count();
    assert_eq!(
        (refusals, alerts),
        (1, 1),
        "one record and one alert for 300 refusals"
    );
}

/// Tries one validation and prints its reason, `valid`, or the connect error's name.
const ONE_VALIDATION: &str = r#"
import json, os, socket, struct, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(type(e).__name__, flush=True)
    sys.exit(0)
body = json.dumps({"op": "validate_license", "license_token": sys.argv[2],
                   "nonce": os.urandom(16).hex()}).encode()
s.sendall(struct.pack(">I", len(body)) + body)
(n,) = struct.unpack(">I", s.recv(4))
answer = json.loads(s.recv(n))
print("valid" if answer.get("valid") else answer.get("reason"), flush=True)
"#;

/// Finding 6: the validation socket was 0666, so any local user could knock (and cost audit
/// records). It is 0660 with a group: other users cannot even connect, members of the group can
/// and are then checked against the allow-lists.
#[test]
fn validation_socket_admits_only_its_group() {
    use std::io::BufRead as _;
    use std::os::unix::fs::MetadataExt as _;
    let root = tempfile::tempdir().unwrap();
    let public = public_dir();
    let socket = public.path().join("agent.sock");
    let server = Server::start(root.path(), 3600, 3600);
    let socket_text = socket.display().to_string();
    let mut agent = Agent::enroll(&server, root.path(), "pos1", 3600, move |t| {
        t["ipc"]["socket"] = toml::Value::String(socket_text);
        let ipc = t["ipc"].as_table_mut().unwrap();
        ipc.insert(
            "socket_group".into(),
            toml::Value::String(STRANGER.to_string()),
        );
        t["ipc"]["allowed_uids"] = toml::Value::Array(vec![
            toml::Value::Integer(0),
            toml::Value::Integer(READER.into()),
        ]);
    });
    agent.socket = socket.clone();
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    agent.start(&[]);
    wait_until("a token", WAIT, || agent.token(&license).is_some());
    let token = agent.token(&license).unwrap();

    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, STRANGER));
    let attempt = |uid: u32, group: Option<u32>| {
        let (_child, _stdin, stdout) = python_as_member(
            uid,
            group,
            ONE_VALIDATION,
            &[socket.as_os_str(), token.as_ref()],
        );
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        line.trim().to_string()
    };
    // Allowed by uid but not in the group: the kernel refuses the connection.
    assert_eq!(attempt(READER, None), "PermissionError");
    // In the group and allowed: served.
    assert_eq!(attempt(READER, Some(STRANGER)), "valid");
    // In the group but not allowed: refused by the per-peer check.
    assert_eq!(attempt(STRANGER, Some(STRANGER)), "not_authorized");
    assert!(
        agent.validate(&token).valid,
        "the agent's own user still served"
    );

    // A group that does not exist is named at start.
    agent.stop();
    let mut table: toml::Table = std::fs::read_to_string(&agent.config)
        .unwrap()
        .parse()
        .unwrap();
    table["ipc"]
        .as_table_mut()
        .unwrap()
        .insert("socket_group".into(), "no-such-group-here".into());
    std::fs::write(&agent.config, toml::to_string(&table).unwrap()).unwrap();
    let out = Command::new(bin("license-agent"))
        .args(["check-config", "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("ipc.socket_group")
            && stderr.contains("no-such-group-here"),
        "{stderr}"
    );
}
