//! The Windows till, end to end, under wine against a real Linux server: the installer EXE
//! (`admin token create --windows-installer`: the agent's own exe with the trailer) run in a
//! fresh wine prefix enrolls with a key made there, installs the `license-agent` service and
//! starts it through wine's service manager; a C program linked to `license_client.dll`
//! validates a license over the named pipe; a replayed nonce and a caller the config does not
//! allow are refused; a forced rotation keeps the old token valid in its grace; a second run
//! of the installer leaves the enrollment alone; a used token and a tampered trailer are
//! refused with a clear message.
//!
//! The Windows artefacts come from `scripts/windows/build.sh` (run here; it is quick when they
//! are current), which needs Debian's rustc-web, cargo-web, rust-web-src and mingw-w64, and
//! wine64 (scripts/test.sh installs them; docs/WINDOWS.md).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::wine::{build_artefacts, windows_target_dir, Wine};
use common::{wait_until, Server};

const PIPE: &str = r"\\.\pipe\license-agent";

#[test]
fn a_windows_till_installs_enrolls_and_validates_under_wine() {
    let target_dir = windows_target_dir();
    let dist = build_artefacts(&target_dir);
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(root.path(), 3600, 600);
    let client = server.new_client("windows-shop");

    // The installer, as the administrator downloads it.
    let installer = root.path().join("license-agent-installer.exe");
    let created = server.admin(&[
        "token",
        "create",
        "--client",
        &client,
        "--windows-installer",
        installer.to_str().unwrap(),
        "--windows-stub",
        dist.join("license-agent.exe").to_str().unwrap(),
    ]);
    assert_eq!(created["windows_installer"], installer.to_str().unwrap());

    eprintln!("installer written; creating the wine prefix");
    let wine = Wine::new(&target_dir);
    // The prefix first (about 10 s), then the process that keeps wine's services alive.
    let keepalive = wine.start(&dist.join("license-agent.exe"), &["--version"]);

    eprintln!("prefix ready; a tampered installer");
    // A tampered trailer is refused before anything is done.
    let mut tampered = std::fs::read(&installer).unwrap();
    let at = tampered.len() - 60;
    tampered[at] ^= 0x20;
    let tampered_exe = root.path().join("tampered.exe");
    std::fs::write(&tampered_exe, &tampered).unwrap();
    let (code, out, err) = wine.run(&tampered_exe, &[]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        err.contains("damaged") && err.contains("download the installer again"),
        "{err}"
    );
    assert!(!wine
        .drive_c("ProgramData/LicenseAgent/config.toml")
        .exists());

    eprintln!("the installer");
    // The installer, run without arguments: every step printed, the service running.
    let started = std::time::Instant::now();
    let (code, out, err) = wine.run(&installer, &[]);
    let install_time = started.elapsed();
    assert_eq!(code, Some(0), "installer: {out}{err}");
    for step in [
        "License Secret Agent installer: server https://",
        "agent installed at C:\\Program Files\\LicenseAgent\\license-agent.exe",
        "generating this machine's key and enrolling",
        "enrolled as machine",
        "service license-agent created",
        "service license-agent running",
    ] {
        assert!(out.contains(step), "missing {step:?} in:\n{out}");
    }
    eprintln!("installer: start to running agent in {install_time:?}");
    let config =
        std::fs::read_to_string(wine.drive_c("ProgramData/LicenseAgent/config.toml")).unwrap();
    let machine = config
        .lines()
        .find_map(|l| l.strip_prefix("id = \""))
        .map(|l| l.trim_end_matches('"').to_string())
        .unwrap();
    assert!(
        config.contains("S-1-5-32-545"),
        "Users may validate:\n{config}"
    );
    // The installed copy carries no token.
    let installed =
        std::fs::read(wine.drive_c("Program Files/LicenseAgent/license-agent.exe")).unwrap();
    assert!(license_protocol::installer::read(&installed).is_err());

    eprintln!("installed; a license");
    // A license, validated by a C program through license_client.dll and the pipe.
    let license = server.issue_license(&machine, "pos,loyalty", &[]);
    let token_file = wine.drive_c(&format!(
        "ProgramData/LicenseAgent/state/tokens/{license}.token"
    ));
    // The agent fetches licenses at its rounds: restart it for one now.
    let agent = dist.join("license-agent.exe");
    for action in ["stop", "start"] {
        let (code, out, err) = wine.run(&agent, &["service", action]);
        assert_eq!(code, Some(0), "service {action}: {out}{err}");
    }
    wait_until(
        "the license token on the till",
        Duration::from_secs(60),
        || token_file.exists(),
    );
    let token = std::fs::read_to_string(&token_file).unwrap();
    let token = token.trim();
    let validate = dist.join("validate.exe");
    let (code, out, err) = wine.run(&validate, &[PIPE, token]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("valid features=pos,loyalty"), "{out}");

    eprintln!("validated; a replay");
    // A nonce seen once is refused the second time.
    let probe = dist.join("pipe_probe.exe");
    let (code, out, err) = wine.run(
        &probe,
        &[PIPE, token, "00112233445566778899aabbccddeeff", "2"],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    let answers: Vec<&str> = out.lines().collect();
    assert_eq!(answers.len(), 2, "{out}");
    assert!(answers[0].contains("\"valid\":true"), "{out}");
    assert!(answers[1].contains("replay"), "{out}");

    eprintln!("replay refused; management and a rotation");
    // Management over its own pipe (the wine user is an administrator), and a rotation: the
    // re-issued token validates, the old one still does in its grace.
    let cli = dist.join("license-agent-cli.exe");
    let (code, out, err) = wine.run(&cli, &["status"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(&machine), "{out}");
    let (code, out, err) = wine.run(&cli, &["rotate"]);
    assert_eq!(code, Some(0), "rotate: {out}{err}");
    wait_until("the re-issued token", Duration::from_secs(60), || {
        std::fs::read_to_string(&token_file).is_ok_and(|t| t.trim() != token)
    });
    let reissued = std::fs::read_to_string(&token_file).unwrap();
    for (which, t) in [("re-issued", reissued.trim()), ("old, in grace", token)] {
        let (code, out, err) = wine.run(&validate, &[PIPE, t]);
        assert_eq!(code, Some(0), "{which}: {out}{err}");
    }

    eprintln!("the installer again");
    // Running the installer again is safe: the token is not used, the service runs.
    let (code, out, err) = wine.run(&installer, &[]);
    assert_eq!(code, Some(0), "second run: {out}{err}");
    assert!(out.contains("already enrolled"), "{out}");
    assert!(out.contains("service license-agent running"), "{out}");

    eprintln!("a caller refused by SID");
    // A caller the config does not allow is refused by its SID.
    let config_path = wine.drive_c("ProgramData/LicenseAgent/config.toml");
    // And the TPM asked for: Windows has none here, the agent falls back to the file store.
    let narrowed = config
        .replace(
            "allowed_groups = [\"S-1-5-32-545\"]",
            "allowed_sids = [\"S-1-5-21-1-2-3-4242\"]",
        )
        .replace("[tpm]\nenabled = false", "[tpm]\nenabled = true");
    assert_ne!(narrowed, config);
    std::fs::write(&config_path, &narrowed).unwrap();
    for action in ["stop", "start"] {
        let (code, out, err) = wine.run(&agent, &["service", action]);
        assert_eq!(code, Some(0), "service {action}: {out}{err}");
    }
    let (code, out, _) = wine.run(&validate, &[PIPE, token]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("invalid reason=not_authorized"), "{out}");
    let audit = std::fs::read_to_string(wine.drive_c("ProgramData/LicenseAgent/log/audit.log"))
        .unwrap_or_default();
    assert!(
        audit.contains("ipc.peer_refused") && audit.contains("\"sid\":\"S-1-"),
        "{audit}"
    );
    assert!(audit.contains("alert.tpm_unavailable"), "{audit}");
    let metrics =
        std::fs::read_to_string(wine.drive_c("ProgramData/LicenseAgent/state/metrics.prom"))
            .unwrap();
    assert!(
        metrics.contains("license_agent_tpm_available 0"),
        "{metrics}"
    );
    std::fs::write(&config_path, &config).unwrap();

    eprintln!("the used token");
    // The used token, in a fresh prefix: refused with the server's reason.
    let second = Wine::new(&target_dir);
    let second_keepalive = second.start(&dist.join("license-agent.exe"), &["--version"]);
    let (code, out, err) = second.run(&installer, &[]);
    assert_eq!(code, Some(3), "{out}{err}");
    assert!(err.contains("token"), "{err}");
    assert!(!second
        .drive_c("ProgramData/LicenseAgent/config.toml")
        .exists());
    drop(second_keepalive);
    drop(second);

    drop(keepalive);
}
