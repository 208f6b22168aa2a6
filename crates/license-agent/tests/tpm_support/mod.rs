//! A private `swtpm` per test: fresh or reused state directory, free TCP ports, stopped on drop.
//!
//! Why: the TPM tests need a real TPM 2.0 that each test can clear, restart with the same state,
//! or duplicate, without touching the machine's TPM. swtpm (Debian package `swtpm`) is that TPM;
//! its absence fails the tests loudly instead of skipping them.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// swtpm control-channel command `CMD_SHUTDOWN` (swtpm's `tpm_ioctl.h`): save state and exit.
const CMD_SHUTDOWN: u32 = 3;
/// Bounds a hung swtpm start, not a measured duration.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// A running swtpm serving one TPM state directory.
pub struct Swtpm {
    child: Option<Child>,
    state: PathBuf,
    port: u16,
}

impl Swtpm {
    /// Starts swtpm on `state` (created if missing: a new directory is a freshly manufactured TPM
    /// with its own seeds; an existing one is the same TPM after a power cycle).
    pub fn start(state: &Path) -> Swtpm {
        std::fs::create_dir_all(state).unwrap();
        let mut last_err = String::new();
        for _ in 0..20 {
            let port = free_port_pair();
            let mut child = match Command::new("swtpm")
                .args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", state.display()))
                .args([
                    "--server",
                    &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                ])
                .args([
                    "--ctrl",
                    &format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1),
                ])
                .args(["--flags", "not-need-init,startup-clear"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
            {
                Ok(child) => child,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                    "`swtpm` not found in PATH: the TPM tests need it (Debian/Ubuntu: \
                     `apt-get install swtpm swtpm-tools`)"
                ),
                Err(e) => panic!("cannot start swtpm: {e}"),
            };
            let end = Instant::now() + START_DEADLINE;
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    let mut stderr = String::new();
                    if let Some(mut err) = child.stderr.take() {
                        let _ = err.read_to_string(&mut stderr);
                    }
                    // Most likely a port taken between probing and binding: try other ports.
                    last_err = format!("swtpm exited with {status}: {stderr}");
                    break;
                }
                // Both ports answer and our swtpm is still the one alive: another process may
                // have bound one of the probed ports in between.
                if TcpStream::connect(("127.0.0.1", port + 1)).is_ok()
                    && TcpStream::connect(("127.0.0.1", port)).is_ok()
                    && child.try_wait().unwrap().is_none()
                {
                    return Swtpm {
                        child: Some(child),
                        state: state.to_owned(),
                        port,
                    };
                }
                assert!(
                    Instant::now() < end,
                    "swtpm did not open its control port in time"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("could not start swtpm: {last_err}");
    }

    /// TCTI configuration string for [`tpm::Tpm::open`].
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// Stops swtpm cleanly (state saved), as a power-off would.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(mut ctrl) = TcpStream::connect(("127.0.0.1", self.port + 1)) {
            let _ = ctrl.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = ctrl.write_all(&CMD_SHUTDOWN.to_be_bytes());
            let mut answer = [0u8; 4];
            let _ = ctrl.read_exact(&mut answer);
        }
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A port `p` with `p + 1` also free (swtpm's TCTI expects the control port right after).
fn free_port_pair() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}
