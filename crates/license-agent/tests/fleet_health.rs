//! Fleet health reports (issue "the vendor's fleet console", item 2) with real processes: agents
//! report their health after their rounds, the server keeps each machine's latest report and
//! when it was last seen, and shows them in `admin machine list/show`, in `/metrics` and on the
//! dashboard's overview — without a database write on every poll when nothing changed.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{bin, wait_until, Agent, Server};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn the_server_keeps_each_machines_latest_health_report() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(root.path(), 3600, 3600);
    let mut healthy = Agent::enroll(&server, root.path(), "healthy", 3600, |_| {});
    // The TPM asked for and not there: the agent runs on its encrypted file store.
    let mut fallback = Agent::enroll(&server, root.path(), "fallback", 3600, |t| {
        t["tpm"]["enabled"] = toml::Value::Boolean(true);
        t["tpm"]["tcti"] = toml::Value::String("swtpm:host=127.0.0.1,port=9".into());
    });
    let mut forced = Agent::enroll(&server, root.path(), "forced", 3600, |_| {});
    let mut off = Agent::enroll(&server, root.path(), "off", 3600, |_| {});
    for agent in [&mut healthy, &mut fallback, &mut forced, &mut off] {
        agent.start(&[]);
    }
    let show = |agent: &Agent| server.admin(&["machine", "show", &agent.machine_id]);
    let reported = |agent: &Agent| {
        let machine = show(agent);
        (!machine["health"].is_null() && !machine["health"]["secret_version"].is_null())
            .then_some(machine)
    };
    wait_until("every machine reported", WAIT, || {
        [&healthy, &fallback, &forced, &off]
            .iter()
            .all(|a| reported(a).is_some())
    });

    // An administrator on the till forces degraded mode: the next report says so.
    let out = Command::new(bin("license-agent-cli"))
        .arg("--socket")
        .arg(forced.dir.join("mgmt.sock"))
        .args(["degraded", "on"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("the forced degraded mode reported", WAIT, || {
        show(&forced)["health"]["degraded_mode"] == "forced"
    });
    let last_report = reported(&off).unwrap();
    off.stop();

    let machine = reported(&healthy).unwrap();
    let health = &machine["health"];
    assert_eq!(health["agent_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(health["store"], "file");
    assert_eq!(health["tpm_enabled"], false);
    assert_eq!(health["degraded_mode"], "inactive");
    assert_eq!(health["rotation_failures"], 0);
    assert_eq!(health["audit_chain_ok"], true);
    assert!(health["clock_rollback_secs"].is_null());
    assert!(health["secret_version"].as_u64().unwrap() >= 1);
    let expires = health["certificate_expires_at"].as_i64().unwrap();
    assert!(expires > now(), "{health}");
    assert!(machine["last_seen_at"].is_string(), "{machine}");

    let machine = reported(&fallback).unwrap();
    assert_eq!(
        (
            &machine["health"]["tpm_enabled"],
            &machine["health"]["tpm_available"],
            &machine["health"]["store"]
        ),
        (
            &Value::Bool(true),
            &Value::Bool(false),
            &Value::from("file")
        )
    );

    // The switched-off machine keeps its last report and when it was last seen.
    let kept = show(&off);
    assert_eq!(kept["health"], last_report["health"]);
    assert_eq!(kept["last_seen_at"], last_report["last_seen_at"]);

    // The human listing says what is wrong with each.
    let out = Command::new(bin("license-server"))
        .arg("admin")
        .arg("--data-dir")
        .arg(&server.dir)
        .args(["machine", "list"])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    let line_of = |agent: &Agent| {
        listing
            .lines()
            .find(|l| l.contains(&agent.machine_id))
            .unwrap_or_else(|| panic!("{listing}"))
            .to_string()
    };
    assert!(
        listing.contains("LAST SEEN") && listing.contains("HEALTH"),
        "{listing}"
    );
    assert!(line_of(&healthy).trim_end().ends_with(" ok"), "{listing}");
    assert!(line_of(&fallback).contains("tpm_fallback"), "{listing}");
    assert!(line_of(&forced).contains("degraded"), "{listing}");

    // Prometheus and the dashboard's overview count each as it is.
    let token = server.admin(&[
        "api-token",
        "create",
        "--name",
        "fleet",
        "--role",
        "readonly",
    ])["token"]
        .as_str()
        .unwrap()
        .to_string();
    let admin = server.admin_url();
    let curl = |args: &[&str]| server.curl(args);
    let bearer = format!("Authorization: Bearer {token}");
    let metrics = curl(&["-H", &bearer, &format!("{admin}/metrics")]);
    for line in [
        "license_server_machines{health=\"seen_last_hour\"} 4",
        "license_server_machines{health=\"degraded\"} 1",
        "license_server_machines{health=\"tpm_fallback\"} 1",
        "license_server_machines{health=\"rotation_failing\"} 0",
        "license_server_machines{health=\"revoked\"} 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in:\n{metrics}"
        );
    }
    let jar = root.path().join("cookies");
    server.dashboard_sign_in(&token, &jar);
    let jar = jar.to_str().unwrap();
    let overview = curl(&["-b", jar, &format!("{admin}/dashboard")]);
    for card in [
        "id=\"seen-hour\">4<",
        "id=\"degraded\">1<",
        "id=\"tpm-fallback\">1<",
        "id=\"revoked\">0<",
    ] {
        assert!(
            overview.contains(card),
            "{card} not in the overview:\n{overview}"
        );
    }

    // Polls with nothing new write nothing: neither the report's time nor the last-seen time
    // moves over several rounds (one a second here).
    let before = show(&healthy);
    std::thread::sleep(Duration::from_secs(4));
    let after = show(&healthy);
    assert_eq!(before["health_reported_at"], after["health_reported_at"]);
    assert_eq!(before["last_seen_at"], after["last_seen_at"]);
    assert!(healthy
        .log()
        .lines()
        .all(|l| !l.contains("health report not accepted")));
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
