//! End-to-end harness: a real `license-server` (SQLite, fixed free ports so it can be
//! restarted at the same address), real `license-agent run` daemons enrolled against it, and
//! the real client library on their sockets.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use license_client::{Client, Validation};

#[path = "../tpm_support/mod.rs"]
pub mod tpm_support;

pub mod wine;

/// With `LSA_TEST_TPM=1`, every agent enrolls with `--tpm` on its own swtpm: the lifecycle
/// suite then runs on the TPM backend (machine key, sealed secrets, TPM clock).
pub fn tpm_backend() -> bool {
    std::env::var("LSA_TEST_TPM").is_ok_and(|v| v == "1")
}
use serde_json::Value;

pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits for `cond` (an event, not a duration: the deadline only bounds a hung test).
pub fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for: {what}");
}

pub struct Server {
    pub dir: PathBuf,
    ports: [u16; 3],
    child: Option<Child>,
    pub public_url: String,
    pub pin: String,
    extra: Vec<String>,
}

impl Server {
    /// A server whose secrets are valid `validity` seconds with `grace` more.
    pub fn start(root: &Path, validity: u64, grace: u64) -> Self {
        Self::start_with(root, validity, grace, "")
    }

    /// Like [`Server::start`], with `settings` (TOML lines) appended to its server.toml.
    pub fn start_with(root: &Path, validity: u64, grace: u64, settings: &str) -> Self {
        Self::start_with_init(root, validity, grace, settings, &[])
    }

    /// Like [`Server::start_with`], with more `license-server init` arguments (certificate
    /// names, URLs as machines see them).
    pub fn start_with_init(
        root: &Path,
        validity: u64,
        grace: u64,
        settings: &str,
        init_args: &[&str],
    ) -> Self {
        // Ports are picked free, then bound by the server a moment later: a test running in
        // parallel may take one in between. Then start over with other ports.
        let mut last = String::new();
        for attempt in 0..5 {
            let dir = root.join(if attempt == 0 {
                "server".to_string()
            } else {
                format!("server-{attempt}")
            });
            let mut server = Self::init(dir, validity, grace, settings, init_args);
            match server.try_resume_with_env(&[]) {
                Ok(()) => return server,
                Err(e) if e.contains("Address already in use") => last = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("no free ports after 5 attempts: {last}")
    }

    fn init(dir: PathBuf, validity: u64, grace: u64, settings: &str, init_args: &[&str]) -> Self {
        let ports = [free_port(), free_port(), free_port()];
        let out = Command::new(bin("license-server"))
            .args([
                "init",
                "--dns-name",
                "localhost",
                "--ip",
                "127.0.0.1",
                "--data-dir",
            ])
            .arg(&dir)
            .args(["--public-listen", &format!("127.0.0.1:{}", ports[0])])
            .args(["--agent-listen", &format!("127.0.0.1:{}", ports[1])])
            .args(["--admin-listen", &format!("127.0.0.1:{}", ports[2])])
            .args(init_args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A change for every machine (a key rollover) reaches these few tills within a second
        // instead of being spread over the fleet's minute.
        let settings = if settings.contains("watch_spread_secs") {
            settings.to_string()
        } else {
            format!("watch_spread_secs = 1\n{settings}")
        };
        // Each key set here replaces the line `init` wrote for it.
        let key_of = |line: &str| line.split('=').next().unwrap_or("").trim().to_string();
        let keys: Vec<String> = settings.lines().map(key_of).collect();
        let toml = dir.join("server.toml");
        let mut text: String = std::fs::read_to_string(&toml)
            .unwrap()
            .lines()
            .filter(|line| !keys.contains(&key_of(line)))
            .map(|line| format!("{line}\n"))
            .collect();
        text.push_str(&settings);
        text.push('\n');
        std::fs::write(&toml, text).unwrap();
        let extra = vec![
            "--secret-validity-secs".to_string(),
            validity.to_string(),
            "--secret-grace-secs".to_string(),
            grace.to_string(),
        ];
        Self {
            dir,
            ports,
            child: None,
            public_url: String::new(),
            pin: String::new(),
            extra,
        }
    }

    /// (Re)starts the server process on the same data directory and ports.
    pub fn resume(&mut self) {
        self.resume_with_env(&[]);
    }

    /// Waits for the server process to exit by itself (a test crash point).
    pub fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("server running");
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < end,
                "server did not exit\n{}",
                self.server_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn resume_with_env(&mut self, env: &[(&str, &str)]) {
        if let Err(e) = self.try_resume_with_env(env) {
            panic!("{e}");
        }
    }

    fn try_resume_with_env(&mut self, env: &[(&str, &str)]) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("serve.stderr"))
            .unwrap();
        let mut child = Command::new(bin("license-server"))
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--json")
            .args(&self.extra)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let line = read_line(child.stdout.take().unwrap(), Duration::from_secs(30));
        let Ok(ready) = serde_json::from_str::<Value>(&line) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "server did not start: {line:?}\n{}",
                std::fs::read_to_string(self.dir.join("serve.stderr")).unwrap_or_default()
            ));
        };
        self.public_url = ready["public_url"].as_str().unwrap().to_string();
        self.pin = ready["server_pin"].as_str().unwrap().to_string();
        assert!(
            self.public_url.ends_with(&self.ports[0].to_string())
                || !self.public_url.contains("127.0.0.1"),
            "{}",
            self.public_url
        );
        self.child = Some(child);
        Ok(())
    }

    /// Stops the server (SIGKILL: the agent must cope with it vanishing).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The server's (only, current) master key, read from its data directory: tests decrypt
    /// the server's database with it to look for secrets where they must not be.
    pub fn master_key(&self) -> [u8; 32] {
        use base64::Engine as _;
        let text = std::fs::read_to_string(self.dir.join("master-keys.json")).unwrap();
        let set: Value = serde_json::from_str(&text).unwrap();
        let keys = set["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 1, "one master key in a fresh data directory");
        base64::engine::general_purpose::STANDARD
            .decode(keys[0]["key"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap()
    }

    /// The public, agent and admin listeners' ports on 127.0.0.1.
    pub fn ports(&self) -> [u16; 3] {
        self.ports
    }

    /// The admin listener's URL (admin API, `/metrics`, the dashboard).
    pub fn admin_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports[2])
    }

    /// curl with `args` against this server, trusting its CA: the body of a successful answer.
    pub fn curl(&self, args: &[&str]) -> String {
        let out = Command::new("curl")
            .args(["-fsS", "--cacert"])
            .arg(self.dir.join("ca.pem"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "curl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Signs in to the dashboard with admin API `token`, keeping the session cookie in `jar`
    /// (curl's cookie file) for later `-b jar` requests.
    pub fn dashboard_sign_in(&self, token: &str, jar: &Path) {
        let admin = self.admin_url();
        self.curl(&[
            "-c",
            jar.to_str().unwrap(),
            "-H",
            &format!("Origin: {admin}"),
            "--data-urlencode",
            &format!("token={token}"),
            "-o",
            "/dev/null",
            &format!("{admin}/dashboard/sign-in"),
        ]);
    }

    pub fn admin(&self, args: &[&str]) -> Value {
        self.admin_with_env(args, &[])
    }

    /// Like [`Server::admin`], with extra environment (e.g. [`faketime`]).
    pub fn admin_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Value {
        let out = Command::new(bin("license-server"))
            .arg("admin")
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--json")
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "admin {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn new_client(&self, name: &str) -> String {
        self.admin(&["client", "create", "--name", name])["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn new_token(&self, client: &str) -> String {
        self.admin(&["token", "create", "--client", client])["token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Issues a license for `machine` and returns its id.
    pub fn issue_license(&self, machine: &str, features: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "license",
            "issue",
            "--machine",
            machine,
            "--features",
            features,
        ];
        args.extend_from_slice(extra);
        let out = self.admin(&args);
        out["id"]
            .as_str()
            .or_else(|| out["license"]["id"].as_str())
            .unwrap()
            .to_string()
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.stderr")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read_line(stdout: std::process::ChildStdout, timeout: Duration) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        // Keep draining so the child never blocks on a full pipe.
        let mut sink = String::new();
        while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    rx.recv_timeout(timeout).unwrap_or_default()
}

pub struct Agent {
    /// The agent's own TPM when the suite runs on the TPM backend (outlives agent restarts).
    pub tpm: Option<tpm_support::Swtpm>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub machine_id: String,
    child: Option<Child>,
}

impl Agent {
    /// Enrolls a machine and tunes its config for tests: short rotation interval, socket in
    /// the test directory, root allowed, fast PBKDF2.
    pub fn enroll(
        server: &Server,
        root: &Path,
        name: &str,
        rotation_interval: u64,
        edit: impl FnOnce(&mut toml::Table),
    ) -> Self {
        Self::enroll_with(server, root, name, rotation_interval, &[], edit)
    }

    /// Like [`Agent::enroll`], with extra `license-agent enroll` flags (e.g. `--tpm TCTI`).
    pub fn enroll_with(
        server: &Server,
        root: &Path,
        name: &str,
        rotation_interval: u64,
        extra: &[&str],
        edit: impl FnOnce(&mut toml::Table),
    ) -> Self {
        let dir = root.join(name);
        let tpm = (tpm_backend() && !extra.contains(&"--tpm"))
            .then(|| tpm_support::Swtpm::start(&root.join(format!("{name}-tpm"))));
        let tcti = tpm.as_ref().map(tpm_support::Swtpm::tcti);
        let mut extra = extra.to_vec();
        if let Some(tcti) = &tcti {
            extra.extend_from_slice(&["--tpm", tcti]);
        }
        let client = server.new_client(&format!("client-{name}"));
        let token = server.new_token(&client);
        let config = dir.join("config.toml");
        let out = Command::new(bin("license-agent"))
            .args([
                "enroll",
                "--json",
                "--server",
                &server.public_url,
                "--server-pin",
                &server.pin,
                "--token",
                &token,
            ])
            .args(["--hardware-id", &format!("HW-{name}")])
            .arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--log-dir")
            .arg(dir.join("log"))
            .args(&extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "enroll: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        let socket = dir.join("agent.sock");
        let mut table: toml::Table = std::fs::read_to_string(&config).unwrap().parse().unwrap();
        table["agent"]["rotation_interval"] = toml::Value::Integer(rotation_interval as i64);
        table["agent"]["grace_period"] = toml::Value::Integer(rotation_interval as i64 * 4);
        table["agent"]["poll_interval"] = toml::Value::Integer(1);
        table["tpm"]["pbkdf2_iterations"] = toml::Value::Integer(10_000);
        table["ipc"]["socket"] = toml::Value::String(socket.display().to_string());
        table["management"]["socket"] =
            toml::Value::String(dir.join("mgmt.sock").display().to_string());
        table["ipc"]["allowed_uids"] =
            toml::Value::Array(vec![toml::Value::Integer(i64::from(current_uid()))]);
        edit(&mut table);
        std::fs::write(&config, toml::to_string(&table).unwrap()).unwrap();
        Self {
            tpm,
            dir,
            config,
            socket,
            machine_id: report["machine_id"].as_str().unwrap().to_string(),
            child: None,
        }
    }

    /// Starts `license-agent run` and waits for its ready line.
    pub fn start(&mut self, env: &[(&str, &str)]) {
        self.start_under(&[], env);
    }

    /// Like [`Agent::start`], with the agent run by `wrapper` (e.g. `strace -f …`); the child
    /// is then the wrapper.
    pub fn start_under(&mut self, wrapper: &[&str], env: &[(&str, &str)]) {
        self.start_binary(&bin("license-agent"), wrapper, env);
    }

    /// Like [`Agent::start_under`], running the agent binary at `agent` (e.g. an older build,
    /// for a benchmark's baseline).
    pub fn start_binary(&mut self, agent: &Path, wrapper: &[&str], env: &[(&str, &str)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.stderr"))
            .unwrap();
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(agent);
                c
            }
            None => Command::new(agent),
        };
        let mut child = command
            .args(["run", "--config"])
            .arg(&self.config)
            .env("LICENSE_AGENT_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let line = read_line(child.stdout.take().unwrap(), Duration::from_secs(30));
        assert!(
            line.contains("ready"),
            "agent did not start: {line:?}\n{}",
            self.log()
        );
        self.child = Some(child);
    }

    /// Starts `license-agent run` expecting it to refuse to start; returns its exit status.
    pub fn start_refused(&mut self) -> std::process::ExitStatus {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.stderr"))
            .unwrap();
        Command::new(bin("license-agent"))
            .args(["run", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .status()
            .unwrap()
    }

    /// `license-agent-cli status --json` over the management socket (the test config puts it
    /// at `dir/mgmt.sock`).
    pub fn mgmt_status(&self) -> Value {
        let out = Command::new(bin("license-agent-cli"))
            .arg("--socket")
            .arg(self.dir.join("mgmt.sock"))
            .args(["status", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `license-agent status --json`.
    pub fn status(&self) -> Value {
        let out = Command::new(bin("license-agent"))
            .args(["status", "--json", "--config"])
            .arg(&self.config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Like `start` but for a run expected to end by itself (a test crash point).
    pub fn run_until_exit(
        &mut self,
        env: &[(&str, &str)],
        deadline: Duration,
    ) -> std::process::ExitStatus {
        self.start(env);
        let mut child = self.child.take().unwrap();
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < end, "agent did not exit\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM; the agent must exit 0.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().unwrap()
    }

    /// Sends a signal (`HUP`, `TERM`, …) to the running agent.
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("agent running").id();
        assert!(Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success());
    }

    /// The child's pid: the wrapper's when started by [`Agent::start_under`].
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// Waits for the child to exit (after a signal sent some other way).
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.take().expect("agent running").wait().unwrap()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.stderr")).unwrap_or_default()
    }

    pub fn state(&self) -> Value {
        std::fs::read_to_string(self.dir.join("state/state.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null)
    }

    /// A value from the agent's metrics.prom.
    pub fn metric(&self, name: &str) -> Option<i64> {
        let text = std::fs::read_to_string(self.dir.join("state/metrics.prom")).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
    }

    /// The token file the agent keeps for a license, if any.
    pub fn token(&self, license_id: &str) -> Option<String> {
        std::fs::read_to_string(
            self.dir
                .join("state/tokens")
                .join(format!("{license_id}.token")),
        )
        .ok()
    }

    /// Newest secret version the agent holds (from state.json).
    pub fn newest_version(&self) -> u64 {
        self.state()["secrets"]
            .as_array()
            .and_then(|a| a.last())
            .and_then(|s| s["version"].as_u64())
            .unwrap_or(0)
    }

    pub fn validate(&self, token: &str) -> Validation {
        Client::connect(&self.socket)
            .unwrap()
            .validate_license(token)
            .unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn current_uid() -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}

/// Environment that moves a process's clock `offset` (libfaketime syntax, e.g. `+2d`) ahead,
/// leaving its monotonic clock alone so timers behave.
pub fn faketime(offset: &str) -> [(&'static str, String); 3] {
    let lib = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
    assert!(
        Path::new(lib).exists(),
        "{lib} missing: scripts/test.sh installs Debian's faketime"
    );
    [
        ("LD_PRELOAD", lib.to_string()),
        ("FAKETIME", offset.to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
    ]
}

pub fn reason(v: &Validation) -> Option<String> {
    v.reason.map(|r| r.as_str().to_string())
}
