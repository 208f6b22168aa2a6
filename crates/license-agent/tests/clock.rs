//! Trusted time for expiry decisions (issue "the fleet lives for ten years", item 5): real
//! server and agent processes whose clocks are moved with libfaketime.
//! - Losing state.json does not reopen a rollback: the audit log's last entry (hash-chained)
//!   and the secrets' server-signed dates keep the floor.
//! - A clock jumped forward neither expires licenses nor destroys secrets while the server can
//!   be reached: the server's time bounds "now", and only its time destroys secrets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{faketime, reason, wait_until, Agent, Server};

const WAIT: Duration = Duration::from_secs(60);

fn env<'a>(pairs: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    pairs.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[test]
fn losing_state_json_does_not_reopen_a_rollback() {
    let root = tempfile::tempdir().unwrap();
    let mut server = Server::start(root.path(), 30 * 86_400, 7 * 86_400);
    let mut agent = Agent::enroll(&server, root.path(), "rollback", 3_600, |_| {});
    let license = server.issue_license(&agent.machine_id, "pos.sale", &["--expires-in", "1d"]);
    agent.start(&[]);
    wait_until("a token", WAIT, || agent.token(&license).is_some());
    let token = agent.token(&license).unwrap();
    assert!(agent.validate(&token).valid);
    assert_eq!(agent.stop().code(), Some(0));

    // Two days later, for real (the server agrees): the license has expired.
    let later = faketime("+2d");
    server.kill();
    server.resume_with_env(&env(&later));
    agent.start(&env(&later));
    wait_until("a round with the server", WAIT, || {
        agent.state()["server_time"].is_i64()
    });
    assert_eq!(reason(&agent.validate(&token)).as_deref(), Some("expired"));
    assert_eq!(agent.stop().code(), Some(0));
    server.kill();

    // The till's clock is set back two days, offline: still expired…
    agent.start(&[]);
    assert_eq!(reason(&agent.validate(&token)).as_deref(), Some("expired"));
    assert_eq!(agent.stop().code(), Some(0));
    // …and still after state.json and its backup are deleted.
    for name in ["state.json", "state.json.bak"] {
        let _ = std::fs::remove_file(agent.dir.join("state").join(name));
    }
    agent.start(&[]);
    assert_eq!(
        reason(&agent.validate(&token)).as_deref(),
        Some("expired"),
        "{}",
        agent.log()
    );
    assert!(
        agent.log().contains("behind the latest time"),
        "{}",
        agent.log()
    );
}

#[test]
fn a_clock_jumped_forward_expires_and_destroys_nothing_while_the_server_answers() {
    let root = tempfile::tempdir().unwrap();
    // Secrets of a day with a day of grace: a month-long jump is far past them.
    let server = Server::start(root.path(), 86_400, 86_400);
    let mut agent = Agent::enroll(&server, root.path(), "jumped", 3_600, |_| {});
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    agent.start(&[]);
    wait_until("a token", WAIT, || agent.token(&license).is_some());
    let token = agent.token(&license).unwrap();
    assert_eq!(agent.stop().code(), Some(0));

    agent.start(&env(&faketime("+30d")));
    wait_until("a round with the server", WAIT, || {
        agent.state()["last_server_contact"].is_i64() && agent.log().contains("ahead of the server")
    });
    // Rounds go on (rotations accepted: their timestamps follow the server's time)…
    let held = agent.newest_version();
    wait_until("another round", WAIT, || {
        agent.newest_version() >= held && agent.token(&license).is_some()
    });
    let token = agent.token(&license).unwrap_or(token);
    let v = agent.validate(&token);
    assert!(v.valid, "{:?}\n{}", reason(&v), agent.log());
    // …and nothing was destroyed by the jumped clock.
    let audit = std::fs::read_to_string(agent.dir.join("log/audit.log")).unwrap();
    assert!(!audit.contains("secret.destroyed"), "{audit}");
    assert_eq!(agent.stop().code(), Some(0));
}
