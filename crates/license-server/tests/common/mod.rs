//! Test harness: real `license-server` processes (init + serve on port 0), real databases
//! (a SQLite file, or a fresh PostgreSQL database created and dropped per test), real TLS.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

pub const SERVER: &str = env!("CARGO_BIN_EXE_license-server");

/// `license-agent` is another package's binary, which `cargo test` does not build for this
/// package: `scripts/test.sh` runs `cargo build --workspace --bins` first.
pub fn agent_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("license-agent");
    assert!(
        path.exists(),
        "{} missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// Base URL of the PostgreSQL server tests create their databases on.
pub fn postgres_base() -> String {
    std::env::var("LSA_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

fn psql(sql: &str) {
    let out = Command::new("psql")
        .args([
            &format!("{}/postgres", postgres_base()),
            "-v",
            "ON_ERROR_STOP=1",
            "-qc",
            sql,
        ])
        .output()
        .expect("psql must be installed (the test command installs PostgreSQL)");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A database for one test; a PostgreSQL one is dropped when this is.
pub struct TestDb {
    pub url: String,
    pg_name: Option<String>,
}

impl TestDb {
    pub fn new(db: Db, dir: &Path) -> Self {
        match db {
            Db::Sqlite => Self {
                url: format!("sqlite://{}", dir.join("license.db").display()),
                pg_name: None,
            },
            Db::Postgres => {
                let name = format!("lsa_test_{}", uuid_like());
                psql(&format!("CREATE DATABASE {name}"));
                Self {
                    url: format!("{}/{name}", postgres_base()),
                    pg_name: Some(name),
                }
            }
        }
    }
}

impl TestDb {
    /// A database someone else made and removes (a PostgreSQL cluster of the test's own).
    pub fn existing(url: &str) -> Self {
        Self {
            url: url.to_string(),
            pg_name: None,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = &self.pg_name {
            let _ = Command::new("psql")
                .args([
                    &format!("{}/postgres", postgres_base()),
                    "-qc",
                    &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                ])
                .output();
        }
    }
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:x}_{}", nanos, std::process::id())
}

/// One running `license-server serve` process.
pub struct ServerProcess {
    child: Child,
    pub ready: Value,
    pub public_url: String,
    pub agent_url: String,
    pub admin_url: String,
}

/// libfaketime, preloaded into a server process to run it days or years ahead.
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// Environment running a process `offset` ahead (libfaketime syntax: `+10m`, `+500d`). Only
/// wall-clock time moves; monotonic time (timers, timeouts) stays real.
pub fn faketime(offset: &str) -> Vec<(String, String)> {
    assert!(
        Path::new(LIBFAKETIME).exists(),
        "{LIBFAKETIME} missing: install the Debian package faketime (scripts/test.sh does)"
    );
    vec![
        ("LD_PRELOAD".into(), LIBFAKETIME.into()),
        ("FAKETIME".into(), offset.into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}

impl ServerProcess {
    pub fn spawn(data_dir: &Path, extra: &[&str]) -> Self {
        Self::spawn_env(data_dir, extra, &[])
    }

    /// Like [`ServerProcess::spawn`], with extra environment variables (see [`faketime`]).
    pub fn spawn_env(data_dir: &Path, extra: &[&str], env: &[(String, String)]) -> Self {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("serve.stderr"))
            .unwrap();
        // Every listener on a free loopback port, unless `extra` says otherwise.
        let listens: Vec<&str> = ["--public-listen", "--agent-listen", "--admin-listen"]
            .into_iter()
            .filter(|flag| !extra.contains(flag))
            .flat_map(|flag| [flag, "127.0.0.1:0"])
            .collect();
        let mut child = Command::new(SERVER)
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(listens)
            .arg("--json")
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let ready: Value = serde_json::from_str(&line).unwrap_or_else(|_| {
            let log = std::fs::read_to_string(data_dir.join("serve.stderr")).unwrap_or_default();
            panic!("server did not start: {line:?}\n{log}")
        });
        assert_eq!(ready["event"], "ready");
        let admin_url = format!("https://{}", ready["admin"].as_str().unwrap())
            .replace("127.0.0.1", "localhost");
        Self {
            public_url: ready["public_url"].as_str().unwrap().to_string(),
            agent_url: ready["agent_url"].as_str().unwrap().to_string(),
            admin_url,
            ready,
            child,
        }
    }

    /// The serving process's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops with SIGTERM and waits: the server must drain and exit 0.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A data directory, its database and one running server.
pub struct TestServer {
    pub server: ServerProcess,
    pub db: TestDb,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub fn start(db: Db) -> Self {
        Self::start_with(db, &[])
    }

    pub fn start_with(db: Db, serve_args: &[&str]) -> Self {
        Self::start_configured(db, "", serve_args, &[])
    }

    /// Initializes a data directory, appends `config` (TOML lines) to its `server.toml`, and
    /// starts the server with `serve_args` and the extra environment `env`.
    pub fn start_configured(
        db: Db,
        config: &str,
        serve_args: &[&str],
        env: &[(String, String)],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(db, dir.path());
        Self::start_in(dir, db, config, serve_args, env)
    }

    /// [`TestServer::start_configured`] on the database at `url`, which the caller made (and
    /// removes).
    pub fn start_on(url: &str, config: &str) -> Self {
        Self::start_in(
            tempfile::tempdir().unwrap(),
            TestDb::existing(url),
            config,
            &[],
            &[],
        )
    }

    fn start_in(
        dir: tempfile::TempDir,
        db: TestDb,
        config: &str,
        serve_args: &[&str],
        env: &[(String, String)],
    ) -> Self {
        let data = dir.path().join("srv");
        let out = Command::new(SERVER)
            .args([
                "init",
                "--dns-name",
                "localhost",
                "--ip",
                "127.0.0.1",
                "--database-url",
                &db.url,
                "--data-dir",
            ])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if !config.is_empty() {
            let path = data.join("server.toml");
            set_config_keys(&path, config);
        }
        let server = ServerProcess::spawn_env(&data, serve_args, env);
        Self { server, db, dir }
    }

    /// Stops the server (it must exit 0) and starts it again on the same data directory and
    /// database with the environment `env` (see [`faketime`]).
    pub fn restart(&mut self, env: &[(String, String)]) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.server.child.id().to_string()])
            .status();
        let status = self.server.child.wait().unwrap();
        assert!(status.success(), "server exited with {status}");
        self.server = ServerProcess::spawn_env(&self.data_dir(), &[], env);
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("srv")
    }

    /// Another replica on the same data directory and database.
    pub fn replica(&self) -> ServerProcess {
        ServerProcess::spawn(&self.data_dir(), &[])
    }

    pub fn pin(&self) -> String {
        self.server.ready["server_pin"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("ca.pem")).unwrap()
    }

    /// Runs `license-server admin …` against this server's data directory.
    pub fn admin(&self, args: &[&str]) -> Output {
        Command::new(SERVER)
            .arg("admin")
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs `license-server admin --json …`, asserting success.
    pub fn admin_json(&self, args: &[&str]) -> Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let out = self.admin(&full);
        assert!(
            out.status.success(),
            "admin {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn new_client(&self, name: &str) -> String {
        self.admin_json(&["client", "create", "--name", name])["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn new_token(&self, client_id: &str) -> String {
        self.admin_json(&["token", "create", "--client", client_id])["token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Runs `license-agent enroll` against this server, everything under `machine_dir`
    /// (config at `machine_dir/config.toml`).
    pub fn agent_enroll(
        &self,
        token: &str,
        machine_dir: &Path,
        hardware_id: &str,
        extra: &[&str],
    ) -> Output {
        Command::new(agent_bin())
            .args([
                "enroll",
                "--server",
                &self.server.public_url,
                "--server-pin",
                &self.pin(),
                "--token",
                token,
            ])
            .args(["--hardware-id", hardware_id])
            .arg("--config")
            .arg(machine_dir.join("config.toml"))
            .arg("--state-dir")
            .arg(machine_dir.join("state"))
            .arg("--log-dir")
            .arg(machine_dir.join("log"))
            .args(extra)
            .output()
            .unwrap()
    }

    /// HTTPS client trusting this server's CA (public and admin listeners).
    pub fn https_client(&self) -> reqwest::Client {
        client_with(tls_config(&self.ca_pem(), None, false))
    }

    /// mTLS client for the agent listener with the given certificate and key.
    pub fn mtls_client(&self, cert_pem: &str, key_pem: &str) -> reqwest::Client {
        client_with(tls_config(&self.ca_pem(), Some((cert_pem, key_pem)), true))
    }

    /// Enrolls a machine over HTTP with a fresh key; returns (response, key PEM).
    pub async fn enroll_http(&self, token: &str, hardware_id: &str) -> (Value, String) {
        let (status, answer, key) = self.bootstrap_http(token, hardware_id, None).await;
        assert_eq!(status, 200, "{answer}");
        (answer, key)
    }

    /// `POST /api/public/bootstrap` with a fresh key's CSR, signed by `previous_key` (a PKCS#8
    /// PEM) when given, as `license-agent enroll --force` signs a re-enrollment with the
    /// machine's current key: (status, JSON body, the fresh key's PEM).
    pub async fn bootstrap_http(
        &self,
        token: &str,
        hardware_id: &str,
        previous_key: Option<&str>,
    ) -> (u16, Value, String) {
        use p256::pkcs8::DecodePrivateKey as _;
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let mut request: license_protocol::enroll::BootstrapRequest =
            serde_json::from_value(serde_json::json!({"token": token, "hostname": "pos-test", "hardware_id": hardware_id, "arch": "amd64", "csr": csr}))
                .unwrap();
        if let Some(previous) = previous_key {
            let signing = p256::ecdsa::SigningKey::from_pkcs8_pem(previous).unwrap();
            let signature: p256::ecdsa::Signature =
                p256::ecdsa::signature::Signer::sign(&signing, &request.reenrollment_message());
            request.set_previous_key_signature(&signature);
        }
        let response = self
            .https_client()
            .post(format!("{}/api/public/bootstrap", self.server.public_url))
            .json(&request)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body, key.serialize_pem())
    }

    /// A new client with one enrolled machine: (client_id, bootstrap response, key PEM).
    pub async fn enrolled_machine(
        &self,
        client_name: &str,
        hardware_id: &str,
    ) -> (String, Value, String) {
        let client = self.new_client(client_name);
        let token = self.new_token(&client);
        let (answer, key) = self.enroll_http(&token, hardware_id).await;
        (client, answer, key)
    }

    /// GET /api/v1/secret-status with a machine's certificate: (status, JSON body).
    pub async fn secret_status(&self, url: &str, cert_pem: &str, key_pem: &str) -> (u16, Value) {
        let r = self
            .mtls_client(cert_pem, key_pem)
            .get(format!("{url}/api/v1/secret-status"))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

pub fn tls_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
    tls13_only: bool,
) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let versions: &[&rustls::SupportedProtocolVersion] = if tls13_only {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let certs = rustls_pemfile::certs(&mut cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = rustls_pemfile::private_key(&mut key.as_bytes())
                .unwrap()
                .unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
    }
}

pub fn client_with(config: rustls::ClientConfig) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Sets the `key = value` lines of `config` in the `server.toml` at `path`, replacing the
/// lines `init` wrote for the same keys.
pub fn set_config_keys(path: &Path, config: &str) {
    let key_of = |line: &str| line.split('=').next().unwrap_or("").trim().to_string();
    let keys: Vec<String> = config.lines().map(key_of).collect();
    let mut toml: String = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|line| !keys.contains(&key_of(line)))
        .map(|line| format!("{line}\n"))
        .collect();
    toml.push_str(config);
    toml.push('\n');
    std::fs::write(path, toml).unwrap();
}

/// Runs a test body on SQLite and on PostgreSQL, as two tests.
#[macro_export]
macro_rules! on_both_databases {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::common::Db::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::common::Db::Postgres).await
            }
        }
    };
}

/// The value of the `/metrics` sample whose line starts with `series` (name and labels).
pub fn metric_sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{series} missing in\n{text}"))
        .parse()
        .unwrap()
}
