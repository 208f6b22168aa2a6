//! The C ABI on Windows, for real: `validate.exe` (`examples/c/validate.c` linked with mingw
//! against `license_client.dll` through its import library) asks `pipe_echo.exe`
//! (`examples/pipe_echo.rs`, a stand-in agent on a named pipe) for a verdict, both running under
//! wine in a fresh prefix.
//!
//! Runs on Linux. It first runs `scripts/windows/build.sh license-client` (a quick no-op when
//! the artefacts are current), so it needs what that script needs, and wine: Debian's
//! `rustc-web`, `cargo-web`, `rust-web-src`, `mingw-w64` and `wine64` (docs/PROTOCOL.md,
//! "Windows: the named pipe and the DLL"). It never skips: without them it fails and says why.
//! The Windows target directory is `$LSA_WINDOWS_TARGET_DIR`, else `$CARGO_TARGET_DIR/windows`,
//! else `target/windows`.
#![cfg(target_os = "linux")]
// Helpers outside #[test] functions: a panic is the failure report here too.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

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

/// The environment of this test process minus what cargo and rustup set for it, which must
/// not reach the Windows build (another toolchain) or wine.
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

/// Builds (or brings up to date) the Windows artefacts; returns the `dist` directory.
fn build_artefacts(target_dir: &Path) -> PathBuf {
    let script = workspace_root().join("scripts/windows/build.sh");
    let output = clean(&mut Command::new("bash"))
        .arg(&script)
        .arg("license-client")
        .env("LSA_WINDOWS_TARGET_DIR", target_dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "{} failed ({}); it needs Debian's rustc-web, cargo-web, rust-web-src and mingw-w64:\n{}{}",
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let dist = target_dir.join("dist");
    for artefact in [
        "license_client.dll",
        "liblicense_client.dll.a",
        "license_client.h",
        "validate.exe",
        "pipe_echo.exe",
    ] {
        assert!(
            dist.join(artefact).is_file(),
            "build.sh did not produce {}",
            dist.join(artefact).display()
        );
    }
    dist
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
            .prefix("wine-c-example-")
            .tempdir_in(target_dir)
            .unwrap();
        Self {
            // scripts/windows/wine-run creates the prefix (and installs the test-only
            // bcryptprimitives.dll) on first use.
            prefix: dir.path().join("prefix"),
            _dir: dir,
        }
    }

    /// `scripts/windows/wine-run exe args…` in this prefix.
    fn command(&self, exe: &Path, args: &[&str]) -> Command {
        let mut command = Command::new(workspace_root().join("scripts/windows/wine-run"));
        clean(&mut command)
            .arg(exe)
            .args(args)
            .env("WINEPREFIX", &self.prefix)
            .env("WINEDEBUG", "-all");
        command
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
    // msvcrt writes text-mode "\r\n" line ends.
    let lf = |bytes: &[u8]| String::from_utf8_lossy(bytes).replace("\r\n", "\n");
    (output.status.code(), lf(&output.stdout), lf(&output.stderr))
}

#[test]
fn the_c_example_validates_against_the_pipe_echo_agent_under_wine() {
    let target_dir = windows_target_dir();
    let dist = build_artefacts(&target_dir);
    let wine = Wine::new(&target_dir);
    let pipe = format!(r"\\.\pipe\license-client-c-example-{}", std::process::id());

    let mut echo = Running(
        wine.command(&dist.join("pipe_echo.exe"), &[&pipe])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot run scripts/windows/wine-run (is wine64 installed?)"),
    );
    // The first wine process creates the prefix (about 10 s): wait for the pipe's line.
    let stdout = echo.0.stdout.take().unwrap();
    let (line_tx, line_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = line_tx.send(line);
    });
    let line = line_rx
        .recv_timeout(Duration::from_secs(180))
        .expect("pipe_echo.exe did not start listening within 180 s");
    assert_eq!(line.trim_end(), format!("listening on {pipe}"));

    let validate = dist.join("validate.exe");
    let (code, stdout, stderr) = text(&wine.command(&validate, &[&pipe, "good"]).output().unwrap());
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert_eq!(
        stdout,
        "valid features=pos,loyalty expires_at=2030-01-01T00:00:00Z\n"
    );

    // No pipe of that name: no verdict, exit code 2, the name in the message.
    let missing = format!(r"{pipe}-missing");
    let (code, stdout, stderr) = text(
        &wine
            .command(&validate, &[&missing, "good"])
            .output()
            .unwrap(),
    );
    assert_eq!(code, Some(2), "stdout: {stdout}\nstderr: {stderr}");
    assert_eq!(stdout, "");
    assert!(stderr.starts_with("error: connect: "), "{stderr}");
    assert!(stderr.contains(&missing), "{stderr}");

    drop(echo);
    drop(wine);
}
