//! What the server's benches share: their error type and `ensure!`, counts from the
//! environment, and a `license-server serve` process on a fresh data directory.
#![allow(dead_code)] // each bench uses its part

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `ensure!(condition, "format", args…)`: returns the formatted error unless `condition`.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+).into());
        }
    };
}

pub const SERVER: &str = env!("CARGO_BIN_EXE_license-server");
/// Name the server certificate is issued for (`init --dns-name localhost`).
pub const SNI: &str = "localhost";

/// The count in the environment variable `name`, or `default` when it is not set.
pub fn env_usize(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => Ok(v
            .trim()
            .parse()
            .map_err(|_| format!("{name}={v:?} is not a count"))?),
        Err(_) => Ok(default),
    }
}

/// TLS 1.3 client (ring) trusting the server's CA, with the machine's certificate and key
/// (PEM) when given.
pub fn client_config(ca_pem: &str, identity: Option<(&str, &str)>) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots);
    Ok(match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain =
                rustls_pemfile::certs(&mut cert.as_bytes()).collect::<Result<Vec<_>, _>>()?;
            let key =
                rustls_pemfile::private_key(&mut key.as_bytes())?.ok_or("no private key in PEM")?;
            builder.with_client_auth_cert(chain, key)?
        }
    })
}

/// One `license-server serve` process on a fresh data directory; killed on drop.
pub struct Server {
    pub child: Child,
    pub data: PathBuf,
    pub public: SocketAddr,
    pub agent: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Server {
    /// `init` then `serve` on port 0 everywhere, with `extra` on the `serve` command line;
    /// returns once it printed its ready line.
    pub fn start(extra: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("srv");
        let out = Command::new(SERVER)
            .args(["init", "--dns-name", SNI, "--ip", "127.0.0.1", "--data-dir"])
            .arg(&data)
            .output()?;
        ensure!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let log = std::fs::File::create(dir.path().join("serve.stderr"))?;
        let mut child = Command::new(SERVER)
            .arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--public-listen",
                "127.0.0.1:0",
                "--agent-listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .arg("--json")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("serve: no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let ready: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let log =
                    std::fs::read_to_string(dir.path().join("serve.stderr")).unwrap_or_default();
                return Err(format!("server did not start: {line:?}\n{log}").into());
            }
        };
        let addr = |key: &str| -> Result<SocketAddr> {
            let addr = ready[key]
                .as_str()
                .ok_or_else(|| format!("ready line without {key}: {ready}"))?;
            Ok(addr.parse()?)
        };
        Ok(Self {
            public: addr("public")?,
            agent: addr("agent")?,
            admin: addr("admin")?,
            child,
            data,
            dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails when the server has exited.
    pub fn alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log =
                std::fs::read_to_string(self.dir.path().join("serve.stderr")).unwrap_or_default();
            return Err(format!("license-server exited ({status}):\n{log}").into());
        }
        Ok(())
    }

    /// `license-server admin --json …` on this data directory.
    pub fn admin_json(&self, args: &[&str]) -> Result<Value> {
        let out = Command::new(SERVER)
            .arg("admin")
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--json")
            .args(args)
            .output()?;
        ensure!(
            out.status.success(),
            "admin {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    pub fn ca_pem(&self) -> Result<String> {
        Ok(std::fs::read_to_string(self.data.join("ca.pem"))?)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
