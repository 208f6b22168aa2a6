//! The C ABI on Windows, for real: `validate.exe` (`examples/c/validate.c` linked with mingw
//! against `license_client.dll` through its import library) asks `pipe_echo.exe`
//! (`examples/pipe_echo.rs`, a stand-in agent on a named pipe) for a verdict, both running under
//! wine in a fresh prefix.
//!
//! Runs on Linux. It first runs `scripts/windows/build.sh` (a quick no-op when the artefacts
//! are current; the wine harness is license-agent's `tests/common/wine.rs`), so it needs what that script needs, and wine: Debian's
//! `rustc-web`, `cargo-web`, `rust-web-src`, `mingw-w64` and `wine64` (docs/PROTOCOL.md,
//! "Windows: the named pipe and the DLL"). It never skips: without them it fails and says why.
//! The Windows target directory is `$LSA_WINDOWS_TARGET_DIR`, else `$CARGO_TARGET_DIR/windows`,
//! else `target/windows`.
#![cfg(target_os = "linux")]
// Helpers outside #[test] functions: a panic is the failure report here too.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

#[path = "../../license-agent/tests/common/wine.rs"]
mod wine;

use wine::{build_artefacts, text, windows_target_dir, Running, Wine};

#[test]
fn the_c_example_validates_against_the_pipe_echo_agent_under_wine() {
    let target_dir = windows_target_dir();
    let dist = build_artefacts(&target_dir);
    let wine = Wine::new(&target_dir);
    // The prefix first (validate.exe's usage message will do), and a process keeping it up.
    let keepalive = wine.start(&dist.join("validate.exe"), &[]);
    let pipe = format!(r"\\.\pipe\license-client-c-example-{}", std::process::id());

    let mut echo = Running(
        wine.command(&dist.join("pipe_echo.exe"), &[&pipe])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot run scripts/windows/wine-run (is wine64 installed?)"),
    );
    // Wait for the pipe's line.
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
    drop(keepalive);
    drop(wine);
}
