//! systemd integration with a real notify socket: READY, STATUS, WATCHDOG at half of
//! `WATCHDOG_USEC`, STOPPING and exit 0 on SIGTERM (also while a round hangs on the server);
//! SIGHUP reloads the config, rejecting a broken one and keeping the running configuration; the
//! unit's syscall filter admits every syscall the agent makes (strace + systemd-analyze); the
//! unit install.sh writes lets the agent reach its server's addresses and no others.
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

/// Syscall names of a systemd filter item (`@group` expanded recursively by systemd-analyze).
fn syscall_set(item: &str, into: &mut std::collections::BTreeSet<String>) {
    if !item.starts_with('@') {
        into.insert(item.to_string());
        return;
    }
    let out = std::process::Command::new("systemd-analyze")
        .args(["syscall-filter", item])
        .output()
        .expect("systemd-analyze (Debian package systemd) must be installed");
    assert!(
        out.status.success(),
        "systemd-analyze syscall-filter {item}"
    );
    for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
        let line = line.trim();
        if !line.is_empty() && !line.starts_with('#') {
            syscall_set(line, into);
        }
    }
}

#[test]
fn the_units_syscall_filter_admits_every_syscall_the_agent_makes() {
    use std::collections::BTreeSet;
    // The unit install.sh writes, merged as systemd does: the first line is an allow-list, each
    // later line removes (`~`) from it or adds to it, in order.
    let unit = unit_for(GIVEN_SERVER, None);
    let mut allowed = BTreeSet::new();
    let mut removed = BTreeSet::new();
    for line in unit
        .lines()
        .filter_map(|l| l.strip_prefix("SystemCallFilter="))
    {
        let mut set = BTreeSet::new();
        let items = line.strip_prefix('~').unwrap_or(line);
        for item in items.split_whitespace() {
            syscall_set(item, &mut set);
        }
        if line.starts_with('~') {
            allowed.retain(|s| !set.contains(s));
            removed.extend(set);
        } else {
            allowed.extend(set);
        }
    }
    assert!(allowed.len() > 100, "the unit has a syscall filter");
    assert!(removed.contains("setuid") && removed.contains("ioprio_set"));
    assert!(!allowed.contains("setuid") && !allowed.contains("mount"));
    // Its socket's group (below) is the one privileged call it makes.
    assert!(allowed.contains("chown"));

    // A day of the agent's life on a TPM, under strace: start, rotation, validations, the
    // management socket, metrics, a reload and a stop.
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(root.path(), 3600, 3600);
    let swtpm = common::tpm_support::Swtpm::start(&root.path().join("tpm"));
    let uid = toml::Value::Integer(i64::from(common::current_uid()));
    let mut agent = Agent::enroll_with(
        &server,
        root.path(),
        "pos1",
        3600,
        &["--tpm", &swtpm.tcti()],
        |t| {
            t["management"]["admin_uids"] = toml::Value::Array(vec![uid]);
            // The validation socket given a group, as install.sh's config does: a chown.
            let ipc = t
                .entry("ipc")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            ipc.as_table_mut().unwrap().insert(
                "socket_group".into(),
                toml::Value::String(primary_gid().to_string()),
            );
        },
    );
    let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
    let trace = root.path().join("strace.txt");
    let trace_arg = trace.display().to_string();
    agent.start_under(&["strace", "-f", "-qq", "-c", "-o", &trace_arg], &[]);
    let pgrep = std::process::Command::new("pgrep")
        .args(["-P", &agent.pid().to_string()])
        .output()
        .unwrap();
    let pid = String::from_utf8_lossy(&pgrep.stdout).trim().to_string();
    assert!(!pid.is_empty(), "the agent runs under strace");
    let kill = |signal: &str| {
        let status = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap();
        assert!(status.success());
    };

    let mut token = None;
    wait_until("a token", WAIT, || {
        token = agent.token(&license);
        token.is_some()
    });
    let token = token.unwrap();
    assert!(agent.validate(&token).valid);
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(common::bin("license-agent-cli"))
            .arg("--socket")
            .arg(agent.dir.join("mgmt.sock"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    cli(&["rotate"]);
    cli(&["status"]);
    cli(&["metrics"]);
    assert!(agent.validate(&token).valid);
    kill("-HUP");
    wait_until("the reload", WAIT, || {
        agent.log().contains("config reloaded")
    });
    kill("-TERM");
    let status = agent.wait();
    assert_eq!(status.code(), Some(0), "{}", agent.log());

    // `strace -c`: one row per syscall, its name last.
    let summary = std::fs::read_to_string(&trace).unwrap();
    let used: BTreeSet<String> = summary
        .lines()
        .filter(|l| !l.starts_with('%') && !l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().last())
        .filter(|name| *name != "total")
        .map(str::to_string)
        .collect();
    for expected in ["prctl", "connect", "accept4", "flock", "rename", "chown"] {
        assert!(used.contains(expected), "{expected} not traced: {used:?}");
    }
    let refused: Vec<_> = used.difference(&allowed).collect();
    assert!(
        refused.is_empty(),
        "syscalls the unit's filter refuses: {refused:?}"
    );
}

/// This process's primary group id.
fn primary_gid() -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    let probe = tempfile::tempfile().unwrap();
    probe.metadata().unwrap().gid()
}

/// The config of an agent whose server is at 192.0.2.10 (agent and public listeners).
const GIVEN_SERVER: &str = "[server]\n\
    url = \"https://192.0.2.10:8444\"\n\
    public_url = \"https://192.0.2.10:8443\"\n";

/// The unit `install.sh --refresh-network` writes for an installed agent whose config.toml is
/// `config` (under a prefix: nothing outside a temp directory changes), with
/// `LICENSE_AGENT_IP_ALLOW` set to `ip_allow`.
fn unit_for(config: &str, ip_allow: Option<&str>) -> String {
    let root = tempfile::tempdir().unwrap();
    let etc = root.path().join("etc/license-agent");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("config.toml"), config).unwrap();
    let mut install = std::process::Command::new("bash");
    install
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../packaging/install.sh"
        ))
        .arg("--refresh-network")
        .env("LICENSE_AGENT_PREFIX", root.path())
        .env_remove("LICENSE_AGENT_IP_ALLOW");
    if let Some(extra) = ip_allow {
        install.env("LICENSE_AGENT_IP_ALLOW", extra);
    }
    let out = install.output().unwrap();
    assert!(
        out.status.success(),
        "install.sh --refresh-network: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(root.path().join("etc/systemd/system/license-agent.service")).unwrap()
}

/// The unit's `IPAddress…=` lines, in order.
fn network_lines(unit: &str) -> Vec<&str> {
    unit.lines()
        .filter(|l| l.starts_with("IPAddress"))
        .collect()
}

#[test]
fn the_unit_lets_the_agent_reach_its_server_and_nothing_else() {
    assert_eq!(
        network_lines(&unit_for(GIVEN_SERVER, None)),
        ["IPAddressDeny=any", "IPAddressAllow=192.0.2.10"]
    );

    // Both listeners, an IPv6 one, and the alert webhook; with addresses in the URLs there is
    // no name to resolve, so no DNS server either. LICENSE_AGENT_IP_ALLOW adds its entries.
    let config = "[server]\nurl = \"https://192.0.2.10:8444\"\n\
        public_url = \"https://[2001:db8::5]:8443/\"\n\n\
        [alerts]\nwebhook_url = \"http://198.51.100.7:9000/hooks/pos\"\n";
    assert_eq!(
        network_lines(&unit_for(config, None)),
        [
            "IPAddressDeny=any",
            "IPAddressAllow=192.0.2.10 198.51.100.7 2001:db8::5"
        ]
    );
    assert_eq!(
        network_lines(&unit_for(config, Some("10.20.0.0/16"))),
        [
            "IPAddressDeny=any",
            "IPAddressAllow=10.20.0.0/16 192.0.2.10 198.51.100.7 2001:db8::5"
        ]
    );

    // A real enrolled agent's config names its server (`localhost` here): the unit allows what
    // that name resolves to and the DNS servers the agent needs to resolve it, nothing else.
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(root.path(), 3600, 3600);
    let agent = Agent::enroll(&server, root.path(), "pos1", 3600, |_| {});
    let config = std::fs::read_to_string(&agent.config).unwrap();
    let table: toml::Table = config.parse().unwrap();
    let url = table["server"]["url"].as_str().unwrap();
    assert!(url.starts_with("https://localhost:"), "{url}");
    let unit = unit_for(&config, None);
    let lines = network_lines(&unit);
    assert_eq!(lines[0], "IPAddressDeny=any");
    let allowed: std::collections::BTreeSet<String> = lines[1]
        .strip_prefix("IPAddressAllow=")
        .unwrap()
        .split(' ')
        .map(str::to_string)
        .collect();
    let mut expected: std::collections::BTreeSet<String> =
        std::net::ToSocketAddrs::to_socket_addrs(&("localhost", 443))
            .unwrap()
            .map(|a| a.ip().to_string())
            .collect();
    assert!(expected.contains("127.0.0.1"));
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    expected.extend(resolv.lines().filter_map(|l| {
        let mut words = l.split_whitespace();
        (words.next() == Some("nameserver"))
            .then(|| words.next())
            .flatten()
            .map(|a| a.split('%').next().unwrap_or(a).to_string())
    }));
    assert_eq!(allowed, expected, "{}", lines[1]);
}

#[test]
fn the_unit_is_rated_low_exposure_by_systemd_analyze_security() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("license-agent.service");
    std::fs::write(&path, unit_for(GIVEN_SERVER, None)).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd) must be installed");
    let report = String::from_utf8_lossy(&out.stdout);
    let level: f64 = report
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for license-agent.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in:\n{report}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    // systemd read the network restriction: an allow list, with the server's address.
    assert!(
        report
            .lines()
            .any(|l| l.contains("IPAddressDeny=")
                && l.contains("allow list with non-localhost entries")),
        "{report}"
    );
    // The agent keeps answering the till under load: a higher priority and CPU share than
    // ordinary services (Nice 0, CPUWeight 100).
    let unit = std::fs::read_to_string(&path).unwrap();
    let value = |key: &str| -> i64 {
        unit.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {key}= in the unit"))
            .parse()
            .unwrap()
    };
    assert!(value("Nice") < 0 && value("CPUWeight") > 100 && value("IOWeight") > 100);
    // What is left is what the agent needs: its server's addresses, the TPM device, the `tss`
    // group, and the real users behind SO_PEERCRED (no PrivateUsers). Without the network
    // restriction the unit rates 1.7.
    assert!(level <= 1.5, "exposure {level}:\n{report}");
}
