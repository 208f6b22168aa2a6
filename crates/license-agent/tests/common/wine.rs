//! Windows binaries under wine for the tests and benches: the artefacts of
//! `scripts/windows/build.sh`, a wine prefix of one's own, children killed on drop. Shared by
//! license-agent's tests and bench and license-client's `tests/windows_c_example.rs`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn windows_target_dir() -> PathBuf {
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
pub fn clean(command: &mut Command) -> &mut Command {
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

pub fn build_artefacts(target_dir: &Path) -> PathBuf {
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
pub struct Wine {
    pub prefix: PathBuf,
    _dir: tempfile::TempDir,
}

impl Wine {
    pub fn new(target_dir: &Path) -> Self {
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

    pub fn command(&self, exe: &Path, args: &[&str]) -> Command {
        let mut command = Command::new(workspace_root().join("scripts/windows/wine-run"));
        clean(&mut command)
            .arg(exe)
            .args(args)
            .env("WINEPREFIX", &self.prefix)
            .env("WINEDEBUG", "-all");
        command
    }

    pub fn run(&self, exe: &Path, args: &[&str]) -> (Option<i32>, String, String) {
        text(&self.command(exe, args).output().unwrap())
    }

    /// Creates the prefix by running `exe args` once (whatever its exit), and starts `cmd.exe`
    /// to keep it alive
    /// (wine stops its services when the prefix's last ordinary process exits). Wine 8's first
    /// program in a fresh prefix now and then never returns (its `start.exe` waits on a child
    /// that has exited): such a first start is killed, the prefix reset, and tried again.
    pub fn start(&self, exe: &Path, args: &[&str]) -> Running {
        for attempt in 1..=3 {
            let mut child = self
                .command(exe, args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
            let status = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break Some(status);
                }
                if std::time::Instant::now() > deadline {
                    break None;
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            };
            match status {
                // Any exit will do: the prefix is made (a usage message is fine).
                Some(_) => {
                    return Running(
                        self.command(Path::new("cmd.exe"), &[])
                            .stdin(std::process::Stdio::piped())
                            .stdout(std::process::Stdio::null())
                            .stderr(std::process::Stdio::null())
                            .spawn()
                            .unwrap(),
                    );
                }
                None => {
                    eprintln!("wine's first start hung (attempt {attempt}); resetting the prefix");
                    let _ = child.kill();
                    let _ = child.wait();
                    self.kill_all();
                }
            }
        }
        panic!("wine never started {} in a fresh prefix", exe.display());
    }

    /// Ends every wine process of the prefix.
    pub fn kill_all(&self) {
        for flag in ["-k", "-w"] {
            let _ = Command::new("/usr/lib/wine/wineserver")
                .arg(flag)
                .env("WINEPREFIX", &self.prefix)
                .status();
        }
    }

    /// `C:\…` of the prefix as a Linux path.
    pub fn drive_c(&self, rest: &str) -> PathBuf {
        self.prefix.join("drive_c").join(rest)
    }
}

impl Drop for Wine {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// A child process killed on drop.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn text(output: &Output) -> (Option<i32>, String, String) {
    let lf = |bytes: &[u8]| String::from_utf8_lossy(bytes).replace("\r\n", "\n");
    (output.status.code(), lf(&output.stdout), lf(&output.stderr))
}
