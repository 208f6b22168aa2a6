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

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{wait_until, Server};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn windows_target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LSA_WINDOWS_TARGET_DIR") {
        return dir.into();
    }
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => Path::new(&dir).join("windows"),
        None => workspace_root().join("target/windows"),
    }
}

/// This process's environment minus what cargo and rustup set, which must reach neither the
/// Windows build (another toolchain) nor wine.
fn clean(command: &mut Command) -> &mut Command {
    for var in [
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "LD_LIBRARY_PATH",
    ] {
        command.env_remove(var);
    }
    command
}

fn build_artefacts(target_dir: &Path) -> PathBuf {
    let script = workspace_root().join("scripts/windows/build.sh");
    let output = clean(&mut Command::new("bash"))
        .arg(&script)
        .env("LSA_WINDOWS_TARGET_DIR", target_dir)
        // What scripts/test.sh built (quicker to build than release) unless told otherwise.
        .env(
            "LSA_WINDOWS_PROFILE",
            std::env::var("LSA_WINDOWS_PROFILE").unwrap_or_else(|_| "dev".into()),
        )
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "{} failed ({}):\n{}{}",
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    target_dir.join("dist")
}

/// A wine prefix of this test's own; every wine process in it is ended on drop.
struct Wine {
    prefix: PathBuf,
    _dir: tempfile::TempDir,
}

impl Wine {
    fn new(target_dir: &Path) -> Self {
        std::fs::create_dir_all(target_dir).unwrap();
        let dir = tempfile::Builder::new()
            .prefix("wine-till-")
            .tempdir_in(target_dir)
            .unwrap();
        Self {
            prefix: dir.path().join("prefix"),
            _dir: dir,
        }
    }

    fn command(&self, exe: &Path, args: &[&str]) -> Command {
        let mut command = Command::new(workspace_root().join("scripts/windows/wine-run"));
        clean(&mut command)
            .arg(exe)
            .args(args)
            .env("WINEPREFIX", &self.prefix)
            .env("WINEDEBUG", "-all");
        command
    }

    fn run(&self, exe: &Path, args: &[&str]) -> (Option<i32>, String, String) {
        text(&self.command(exe, args).output().unwrap())
    }

    /// `C:\…` of the prefix as a Linux path.
    fn drive_c(&self, rest: &str) -> PathBuf {
        self.prefix.join("drive_c").join(rest)
    }
}

impl Drop for Wine {
    fn drop(&mut self) {
        for flag in ["-k", "-w"] {
            let _ = Command::new("/usr/lib/wine/wineserver")
                .arg(flag)
                .env("WINEPREFIX", &self.prefix)
                .status();
        }
    }
}

/// A child process killed on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn text(output: &Output) -> (Option<i32>, String, String) {
    let lf = |bytes: &[u8]| String::from_utf8_lossy(bytes).replace("\r\n", "\n");
    (output.status.code(), lf(&output.stdout), lf(&output.stderr))
}

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
    let (code, out, err) = wine.run(&dist.join("license-agent.exe"), &["--version"]);
    assert_eq!(code, Some(0), "{out}{err}");
    // wine stops its services when the prefix's last ordinary process exits: one stays.
    let keepalive = Running(
        wine.command(Path::new("cmd.exe"), &[])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

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
    let (code, out, err) = second.run(&installer, &[]);
    assert_eq!(code, Some(3), "{out}{err}");
    assert!(err.contains("token"), "{err}");
    assert!(!second
        .drive_c("ProgramData/LicenseAgent/config.toml")
        .exists());
    drop(second);

    drop(keepalive);
}
