//! systemd integration with a real notify socket: READY, STATUS, WATCHDOG at half of
//! `WATCHDOG_USEC`, STOPPING and exit 0 on SIGTERM; SIGHUP reloads the config, rejecting a
//! broken one and keeping the running configuration.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{reason, wait_until, Agent, Server};

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn notify_socket_gets_ready_status_watchdog_and_stopping() {
    let root = tempfile::tempdir().unwrap();
    let notify = root.path().join("notify.sock");
    let socket = UnixDatagram::bind(&notify).unwrap();
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            sink.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    });
    let server = Server::start(root.path(), 3600, 3600);
    let mut agent = Agent::enroll(&server, root.path(), "pos1", 3600, |_| {});
    let path = notify.display().to_string();
    agent.start(&[
        ("NOTIFY_SOCKET", path.as_str()),
        ("WATCHDOG_USEC", "200000"),
    ]);
    let count = |needle: &str| {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|m| m.contains(needle))
            .count()
    };
    wait_until("READY=1", WAIT, || count("READY=1") >= 1);
    wait_until("a STATUS line", WAIT, || {
        count("STATUS=serving; secret v1") >= 1
    });
    wait_until("watchdog pings", WAIT, || count("WATCHDOG=1") >= 5);
    assert_eq!(agent.stop().code(), Some(0));
    assert!(count("STOPPING=1") >= 1);
}

#[test]
fn sighup_applies_a_valid_config_and_rejects_a_broken_one() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(root.path(), 3600, 3600);
    let mut agent = Agent::enroll(&server, root.path(), "pos1", 3600, |_| {});
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    agent.start(&[]);
    wait_until("a token", WAIT, || agent.token(&license).is_some());
    let token = agent.token(&license).unwrap();
    assert!(agent.validate(&token).valid);
    let original = std::fs::read_to_string(&agent.config).unwrap();
    let uid = common::current_uid();

    // Only uid 4242 may validate now.
    let restricted = original.replace(&format!("allowed_uids = [{uid}]"), "allowed_uids = [4242]");
    assert_ne!(restricted, original);
    std::fs::write(&agent.config, &restricted).unwrap();
    agent.signal("HUP");
    wait_until("the new access list", WAIT, || {
        reason(&agent.validate(&token)).as_deref() == Some("not_authorized")
    });

    // A broken config is rejected and the running one kept.
    std::fs::write(&agent.config, "[agent]\nthis is not toml").unwrap();
    agent.signal("HUP");
    wait_until("the rejection", WAIT, || {
        agent.log().contains("config reload rejected")
    });
    assert_eq!(
        reason(&agent.validate(&token)).as_deref(),
        Some("not_authorized")
    );
    assert!(agent.is_running());

    std::fs::write(&agent.config, &original).unwrap();
    agent.signal("HUP");
    wait_until("access restored", WAIT, || agent.validate(&token).valid);
}

#[test]
fn sigterm_while_a_round_hangs_on_the_server_drains_and_exits_0() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(root.path(), 3600, 3600);
    // A server that accepts connections and never answers: the first round hangs in the TLS
    // handshake until the request timeout (30 s), while the agent already serves its socket.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "https://127.0.0.1:{}",
        black_hole.local_addr().unwrap().port()
    );
    let mut agent = Agent::enroll(&server, root.path(), "pos1", 3600, |config| {
        config["server"]["url"] = toml::Value::String(url.clone());
    });
    agent.start(&[]);
    std::thread::sleep(Duration::from_millis(300));

    // The signal is handled (not the default action, which kills the process) and does not
    // wait for the hung round.
    let status = agent.stop();
    assert_eq!(status.code(), Some(0), "{status:?}\n{}", agent.log());
    let audit = std::fs::read_to_string(agent.dir.join("log/audit.log")).unwrap();
    let last = audit.lines().last().unwrap_or_default();
    assert!(last.contains("\"agent.stop\""), "last audit entry: {last}");
    drop(black_hole);
}
