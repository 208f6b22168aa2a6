//! Server CPU per full mutual-TLS handshake: the agent listener of a real `license-server
//! serve` against nginx + OpenSSL serving a static 200 with the same certificates, run with
//! `cargo bench -p license-server --bench handshake`.
//!
//! Why: the fleet-scale issue bounds what a fleet's reconnections cost the server — CPU per full
//! mTLS handshake at most 0.7 × nginx's with the same certificate and CA, measured with
//! `openssl s_time -new`. A ratio of two servers measured in one run on one machine is what
//! can be compared between runs; absolute figures swing with the machine's load.
//!
//! One run:
//!
//! 1. `license-server init` and `serve` (SQLite, all listeners on loopback), then one machine
//!    enrolled through the real bootstrap (`POST /api/public/bootstrap` with an install token
//!    and a CSR): its certificate and key are the client's identity.
//! 2. nginx in the foreground (`daemon off`, one worker) on a temporary configuration: TLS 1.3
//!    only, the data directory's `server.pem` and `server.key` (what the agent listener
//!    serves), `ssl_verify_client on` with `ca.pem` (what the agent listener trusts),
//!    `return 200`.
//! 3. Checks before timing: both answer 200 to the machine's certificate; without a client
//!    certificate nginx answers 400 and the agent listener refuses the handshake; both serve
//!    the same certificate chain. Then s_time itself, with one request per connection (`-www`,
//!    1 s against each): the agent listener must count exactly as many full handshakes (none
//!    refused, aborted or resumed) and as many 200 answers to `GET /api/v1/secret-status` (so
//!    s_time's certificate passes the chain check and the per-request database check), and
//!    nginx must log as many `200 SUCCESS TLSv1.3` (status, `$ssl_client_verify`, protocol).
//! 4. The timed runs: `openssl s_time -new -connect 127.0.0.1:PORT -cert C -key K -CAfile CA
//!    -time T` (no request: handshakes only) against each server in turn,
//!    `BENCH_HANDSHAKE_ROUNDS` times each (the order alternating per round), while each
//!    server's CPU (utime + stime from `/proc/PID/stat`; nginx: master and workers) is read
//!    before and after; CPU per handshake is that difference over the handshakes s_time
//!    reports ("N connections in …").
//!
//! Every timed run is checked, never timed: s_time must report handshakes, no error and no
//! resumed session; no process may have died or been replaced; and the agent listener's own
//! count (`license_server_tls_handshakes_total` on the admin listener's `/metrics`) must have
//! grown by exactly as many handshakes, none refused (a certificate that failed verification
//! would be), resumed, timed out or cut off. s_time closes each connection with a reset
//! (`SO_LINGER` 0) as soon as it has sent its last handshake message; when the reset overtakes
//! the server's session tickets the server counts that handshake as `aborted` rather than
//! `full`, while a certificate that failed verification would be counted `refused`: so the
//! check is full + aborted, and the table shows the aborted ones. The ratio is printed, never
//! asserted.
//!
//! Needs `nginx` and `openssl` on the PATH (or in /usr/sbin). Environment:
//! `BENCH_HANDSHAKE_SECS` (s_time's `-time`, default 5), `BENCH_HANDSHAKE_ROUNDS` (runs per
//! server, default 3, at least 2). Without `--bench` on the command line (as under
//! `cargo test --benches`) it does a smoke pass: 1 s runs, 2 rounds, every check made.

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};

#[macro_use]
mod common;
use common::{env_usize, Result, Server, SNI};

/// The listener whose handshakes are measured, as `/metrics` labels it.
const AGENT_LISTENER: &str = "agent";

fn env_count(name: &str, default: u64, min: u64) -> Result<u64> {
    let n = env_usize(name, usize::try_from(default)?)? as u64;
    ensure!(n >= min, "{name} must be at least {min}");
    Ok(n)
}

/// A program on the PATH, or in /usr/sbin (nginx, when root's PATH is not the shell's).
fn program(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            format!("{name} not found (Debian: apt-get install nginx-light openssl)").into()
        })
}

/// Clock ticks per second of `/proc/PID/stat` times.
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// (parent pid, utime + stime in ticks) of a process, from `/proc/PID/stat`.
fn proc_stat(pid: u32) -> Option<(u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything; the fields follow the last ')'.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    // After the name: state (3), ppid (4), …, utime (14), stime (15), numbered as in proc(5).
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// The children of `parent` (nginx's workers), by pid.
fn children(parent: u32) -> BTreeSet<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| proc_stat(*pid).is_some_and(|(ppid, _)| ppid == parent))
        .collect()
}

/// nginx in the foreground with one worker, on its own configuration; stopped on drop.
struct Nginx {
    master: Child,
    port: u16,
    dir: PathBuf,
}

impl Nginx {
    /// Serves `return 200` on a free loopback port over TLS 1.3 with `cert`/`key`, requiring a
    /// client certificate chained to `client_ca`.
    fn start(nginx: &Path, dir: &Path, cert: &Path, key: &Path, client_ca: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        // A free port: the kernel picks one, nginx binds it right after.
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let d = dir.display();
        let config = format!(
            "daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log notice;
events {{ worker_connections 1024; }}
http {{
    # Written only by the check with requests; the timed runs make none.
    log_format checked '$status $ssl_client_verify $ssl_protocol';
    access_log {d}/access.log checked;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_protocols TLSv1.3;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        location / {{ return 200 \"ok\\n\"; }}
    }}
}}
",
            cert = cert.display(),
            key = key.display(),
            ca = client_ca.display(),
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config)?;
        let master = Command::new(nginx)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("nginx.stderr"))?)
            .spawn()?;
        let mut nginx = Self {
            master,
            port,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            nginx.alive()?;
            if TcpStream::connect(("127.0.0.1", port)).is_ok() && !nginx.workers().is_empty() {
                return Ok(nginx);
            }
            ensure!(
                Instant::now() < deadline,
                "nginx does not answer on port {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The access log's lines so far (`$status $ssl_client_verify $ssl_protocol`).
    fn access_log(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn workers(&self) -> BTreeSet<u32> {
        children(self.master.id())
    }

    /// Fails when the master has exited.
    fn alive(&mut self) -> Result<()> {
        if let Some(status) = self.master.try_wait()? {
            let log = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            return Err(format!(
                "nginx exited ({status}):\n{}{}",
                log("nginx.stderr"),
                log("error.log")
            )
            .into());
        }
        Ok(())
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers and exits. Should it not, SIGKILL to the
        // master and to the workers it had (a killed master leaves them running).
        let workers = self.workers();
        let signal = |sig: &str, pid: u32| {
            let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
        };
        signal("-TERM", self.master.id());
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.master.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(self.master.try_wait(), Ok(None)) {
            let _ = self.master.kill();
            let _ = self.master.wait();
            for worker in workers {
                signal("-KILL", worker);
            }
        }
    }
}

/// TLS 1.3 client trusting the server's CA, with the machine's certificate when given.
fn client_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Arc<rustls::ClientConfig>> {
    Ok(Arc::new(common::client_config(ca_pem, identity)?))
}

/// What one HTTPS request returned, and the certificate chain the server presented.
struct Reply {
    status: u16,
    body: String,
    chain: Vec<CertificateDer<'static>>,
}

/// One HTTP/1.1 request (`Connection: close`) on a new TLS connection; blocking.
fn https(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    request_line: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Result<Reply> {
    let conn = rustls::ClientConnection::new(tls.clone(), ServerName::try_from(SNI)?)?;
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    let mut request = format!("{request_line} HTTP/1.1\r\nHost: {SNI}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body.unwrap_or_default());
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        // A peer closing without close_notify after its whole answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e.into()),
    }
    let chain = stream
        .conn
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no HTTP status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok(Reply {
        status,
        body,
        chain,
    })
}

/// The admin listener's `/metrics` text.
fn scrape(server: &Server, tls: &Arc<rustls::ClientConfig>, token: &str) -> Result<String> {
    let bearer = format!("Bearer {token}");
    let reply = https(
        server.admin,
        tls,
        "GET /metrics",
        &[("Authorization", &bearer)],
        None,
    )?;
    ensure!(reply.status == 200, "/metrics: HTTP {}", reply.status);
    Ok(reply.body)
}

/// The value of the sample `series` (name and labels, exactly as exposed); 0 when absent.
fn sample(metrics: &str, series: &str) -> Result<u64> {
    match metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
    {
        Some(n) => Ok(n.trim().parse()?),
        None => Ok(0),
    }
}

/// The agent listener's handshakes by outcome, as the server counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Handshakes {
    full: u64,
    resumed: u64,
    refused: u64,
    aborted: u64,
    /// Timed out or cut off.
    other: u64,
}

impl Handshakes {
    fn of(metrics: &str) -> Result<Self> {
        let n = |outcome: &str| {
            sample(
                metrics,
                &format!(
                    "license_server_tls_handshakes_total{{listener=\"{AGENT_LISTENER}\",outcome=\"{outcome}\"}}"
                ),
            )
        };
        ensure!(
            metrics.contains("license_server_tls_handshakes_total{"),
            "no handshake counters in /metrics"
        );
        Ok(Self {
            full: n("full")?,
            resumed: n("resumed")?,
            refused: n("refused")?,
            aborted: n("aborted")?,
            other: n("timed_out")? + n("cut_off")?,
        })
    }

    fn since(self, before: Self) -> Self {
        Self {
            full: self.full - before.full,
            resumed: self.resumed - before.resumed,
            refused: self.refused - before.refused,
            aborted: self.aborted - before.aborted,
            other: self.other - before.other,
        }
    }
}

/// `GET /api/v1/secret-status` answered 200 on the agent listener, as the server counts them.
fn secret_status_answered(metrics: &str) -> Result<u64> {
    sample(
        metrics,
        "license_server_http_requests_total{listener=\"agent\",route=\"/api/v1/secret-status\",method=\"GET\",status=\"200\"}",
    )
}

/// The two servers measured.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Nginx,
    Server,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Self::Nginx => "nginx",
            Self::Server => "license-server",
        }
    }
}

/// One s_time run against one server.
struct Run {
    round: u64,
    target: Target,
    handshakes: u64,
    /// On the agent listener: handshakes the server counted as aborted by the client's reset.
    aborted: Option<u64>,
    wall: Duration,
    cpu_secs: f64,
}

impl Run {
    fn micros_per_handshake(&self) -> f64 {
        self.cpu_secs * 1e6 / self.handshakes as f64
    }
}

/// The client's files, as s_time takes them.
struct Identity {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

/// Runs `openssl s_time -new` against `addr` for `secs` seconds, with one HTTP/1.0 `GET` of
/// `www` per connection when given: the handshakes it reports.
fn s_time(
    openssl: &Path,
    addr: SocketAddr,
    id: &Identity,
    secs: u64,
    www: Option<&str>,
) -> Result<u64> {
    let mut command = Command::new(openssl);
    command
        .args(["s_time", "-new", "-connect", &addr.to_string()])
        .arg("-cert")
        .arg(&id.cert)
        .arg("-key")
        .arg(&id.key)
        .arg("-CAfile")
        .arg(&id.ca)
        .args(["-time", &secs.to_string()]);
    if let Some(path) = www {
        command.args(["-www", path]);
    }
    let out = command.stdin(Stdio::null()).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "s_time against {addr}: {}\n{stdout}\n{stderr}",
        out.status
    );
    ensure!(
        !stderr.contains("ERROR") && !stdout.contains("ERROR"),
        "s_time against {addr} reported an error:\n{stdout}\n{stderr}"
    );
    // One character per connection ('*' for TLS 1.3), 'r' for a resumed session: -new must
    // never make one.
    let progress: String = stdout
        .lines()
        .filter(|l| !l.is_empty() && !l.contains(' '))
        .collect();
    ensure!(
        !progress.contains('r'),
        "s_time against {addr} resumed a session"
    );
    let handshakes: u64 = stdout
        .lines()
        .find(|l| l.contains(" connections in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("no \"connections in\" line from s_time:\n{stdout}"))?;
    ensure!(
        handshakes > 0,
        "s_time against {addr}: 0 handshakes\n{stdout}"
    );
    ensure!(
        progress.len() as u64 == handshakes,
        "s_time against {addr}: {} connections shown for {handshakes} reported",
        progress.len()
    );
    Ok(handshakes)
}

fn main() -> Result<()> {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let secs = env_count("BENCH_HANDSHAKE_SECS", if bench_mode { 5 } else { 1 }, 1)?;
    let rounds = env_count("BENCH_HANDSHAKE_ROUNDS", if bench_mode { 3 } else { 2 }, 2)?;
    let tools = Tools {
        openssl: program("openssl")?,
        nginx: program("nginx")?,
    };

    let mut server = Server::start(&[])?;
    let ca_pem = std::fs::read_to_string(server.data.join("ca.pem"))?;
    let server_auth = client_config(&ca_pem, None)?;
    let metrics_token = server.admin_json(&[
        "api-token",
        "create",
        "--name",
        "handshake-bench",
        "--role",
        "readonly",
    ])?["token"]
        .as_str()
        .ok_or("api-token create: no token")?
        .to_string();
    let (id, machine) = enroll(&server, &server_auth, &ca_pem)?;

    // nginx on what the agent listener serves and trusts.
    let mut nginx = Nginx::start(
        &tools.nginx,
        &server.dir.path().join("nginx"),
        &server.data.join("server.pem"),
        &server.data.join("server.key"),
        &server.data.join("ca.pem"),
    )?;
    let admin = Admin {
        tls: server_auth.clone(),
        token: metrics_token,
    };
    check_setup(&server, &nginx, &machine, &server_auth)?;
    check_with_requests(&tools, &server, &nginx, &admin, &id)?;

    let mut runs = Vec::new();
    for round in 1..=rounds {
        let order = if round % 2 == 1 {
            [Target::Nginx, Target::Server]
        } else {
            [Target::Server, Target::Nginx]
        };
        for target in order {
            runs.push(measure(
                &tools,
                &mut server,
                &mut nginx,
                &admin,
                &id,
                round,
                target,
                secs,
            )?);
        }
    }
    report(&tools, &runs, secs, rounds)?;
    if !bench_mode {
        println!("(smoke pass: figures mean nothing; run with `cargo bench --bench handshake`)");
    }
    Ok(())
}

/// The programs the bench runs besides the server.
struct Tools {
    openssl: PathBuf,
    nginx: PathBuf,
}

/// How to read the server's `/metrics`.
struct Admin {
    tls: Arc<rustls::ClientConfig>,
    token: String,
}

impl Admin {
    fn metrics(&self, server: &Server) -> Result<String> {
        scrape(server, &self.tls, &self.token)
    }
}

/// Enrolls one machine through `POST /api/public/bootstrap` (an install token, a fresh P-256
/// key's CSR): its certificate and key written for s_time, and a client configuration.
fn enroll(
    server: &Server,
    server_auth: &Arc<rustls::ClientConfig>,
    ca_pem: &str,
) -> Result<(Identity, Arc<rustls::ClientConfig>)> {
    let client_id = server.admin_json(&["client", "create", "--name", "handshake-bench"])?["id"]
        .as_str()
        .ok_or("client create: no id")?
        .to_string();
    let install_token = server.admin_json(&["token", "create", "--client", &client_id])?["token"]
        .as_str()
        .ok_or("token create: no token")?
        .to_string();
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)?
        .pem()?;
    let body = json!({
        "token": install_token,
        "hostname": "handshake-bench",
        "hardware_id": "HANDSHAKE-BENCH-1",
        "arch": "amd64",
        "csr": csr,
    })
    .to_string();
    let enrolled = https(
        server.public,
        server_auth,
        "POST /api/public/bootstrap",
        &[],
        Some(&body),
    )?;
    ensure!(
        enrolled.status == 200,
        "bootstrap: HTTP {}: {}",
        enrolled.status,
        enrolled.body
    );
    let answer: Value = serde_json::from_str(&enrolled.body)?;
    let cert_pem = answer["certificate"]
        .as_str()
        .ok_or("bootstrap: no certificate")?;
    let key_pem = key.serialize_pem();
    let dir = server.dir.path().join("machine");
    std::fs::create_dir_all(&dir)?;
    let id = Identity {
        cert: dir.join("machine.pem"),
        key: dir.join("machine.key"),
        ca: server.data.join("ca.pem"),
    };
    std::fs::write(&id.cert, cert_pem)?;
    std::fs::write(&id.key, &key_pem)?;
    Ok((id, client_config(ca_pem, Some((cert_pem, &key_pem)))?))
}

/// Both servers answer the machine, refuse a client without a certificate, and present the
/// same certificate chain.
fn check_setup(
    server: &Server,
    nginx: &Nginx,
    machine: &Arc<rustls::ClientConfig>,
    anonymous: &Arc<rustls::ClientConfig>,
) -> Result<()> {
    let ours = https(
        server.agent,
        machine,
        "GET /api/v1/secret-status",
        &[],
        None,
    )?;
    ensure!(
        ours.status == 200,
        "agent listener: HTTP {}: {}",
        ours.status,
        ours.body
    );
    ensure!(
        https(
            server.agent,
            anonymous,
            "GET /api/v1/secret-status",
            &[],
            None
        )
        .is_err(),
        "the agent listener answered without a client certificate"
    );
    let theirs = https(nginx.addr(), machine, "GET /", &[], None)?;
    ensure!(
        theirs.status == 200 && theirs.body == "ok\n",
        "nginx: HTTP {}: {:?}",
        theirs.status,
        theirs.body
    );
    let refused = https(nginx.addr(), anonymous, "GET /", &[], None)?;
    ensure!(
        refused.status == 400,
        "nginx answered HTTP {} without a client certificate (ssl_verify_client off?)",
        refused.status
    );
    ensure!(
        !ours.chain.is_empty() && ours.chain == theirs.chain,
        "nginx and the agent listener serve different certificate chains"
    );
    Ok(())
}

/// s_time's own connections, with one request each (`-www`), are full handshakes each server
/// accepts: the agent listener counts as many full handshakes and 200 answers to
/// `secret-status` (so the request passed the per-request database check too), nginx logs as
/// many 200s with a verified client certificate over TLS 1.3. The timed runs, without
/// requests, cannot be checked this closely (s_time resets each connection right after its
/// last handshake message), so this check runs first with the same client.
fn check_with_requests(
    tools: &Tools,
    server: &Server,
    nginx: &Nginx,
    admin: &Admin,
    id: &Identity,
) -> Result<()> {
    let before = admin.metrics(server)?;
    let n = s_time(
        &tools.openssl,
        server.agent,
        id,
        1,
        Some("/api/v1/secret-status"),
    )?;
    let after = admin.metrics(server)?;
    let handshakes = Handshakes::of(&after)?.since(Handshakes::of(&before)?);
    let answered = secret_status_answered(&after)? - secret_status_answered(&before)?;
    ensure!(
        handshakes
            == Handshakes {
                full: n,
                resumed: 0,
                refused: 0,
                aborted: 0,
                other: 0
            }
            && answered == n,
        "s_time -www made {n} connections; the agent listener counted {handshakes:?} and \
         {answered} answers to secret-status"
    );

    let logged = nginx.access_log().len();
    let n = s_time(&tools.openssl, nginx.addr(), id, 1, Some("/"))?;
    let lines = nginx.access_log();
    let new = lines.get(logged..).unwrap_or_default();
    ensure!(
        new.len() as u64 == n && new.iter().all(|l| l == "200 SUCCESS TLSv1.3"),
        "s_time -www made {n} connections to nginx; its access log has {} new lines: {:?}",
        new.len(),
        new.iter().take(3).collect::<Vec<_>>()
    );
    Ok(())
}

/// One timed s_time run against `target`, with that server's CPU read around it.
#[allow(clippy::too_many_arguments)]
fn measure(
    tools: &Tools,
    server: &mut Server,
    nginx: &mut Nginx,
    admin: &Admin,
    id: &Identity,
    round: u64,
    target: Target,
    secs: u64,
) -> Result<Run> {
    let (addr, pids) = match target {
        Target::Nginx => {
            let workers = nginx.workers();
            ensure!(!workers.is_empty(), "nginx has no worker");
            let mut pids = vec![nginx.master.id()];
            pids.extend(workers);
            (nginx.addr(), pids)
        }
        Target::Server => (server.agent, vec![server.pid()]),
    };
    let counted_before = match target {
        Target::Server => Some(Handshakes::of(&admin.metrics(server)?)?),
        Target::Nginx => None,
    };
    let cpu = |pids: &[u32]| -> Result<u64> {
        pids.iter()
            .map(|pid| {
                proc_stat(*pid)
                    .map(|(_, ticks)| ticks)
                    .ok_or_else(|| format!("process {pid} is gone").into())
            })
            .sum()
    };
    let cpu_before = cpu(&pids)?;
    let started = Instant::now();
    let handshakes = s_time(&tools.openssl, addr, id, secs, None)?;
    let wall = started.elapsed();
    let cpu_after = cpu(&pids)?;
    server.alive()?;
    nginx.alive()?;
    let mut aborted = None;
    match counted_before {
        None => {
            let mut now = vec![nginx.master.id()];
            now.extend(nginx.workers());
            ensure!(
                now == pids,
                "nginx's workers changed during the run: {pids:?} → {now:?}"
            );
        }
        Some(before) => {
            // The last connection may still be finishing when s_time exits.
            let deadline = Instant::now() + Duration::from_secs(5);
            let counted = loop {
                let counted = Handshakes::of(&admin.metrics(server)?)?.since(before);
                if counted.full + counted.aborted >= handshakes || Instant::now() >= deadline {
                    break counted;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            // s_time resets each connection as soon as it has sent its last handshake message;
            // when the reset overtakes the server's session tickets, the handshake is counted
            // as aborted. A certificate the server refused would be counted as refused.
            ensure!(
                counted.full > 0
                    && counted.full + counted.aborted == handshakes
                    && counted.resumed == 0
                    && counted.refused == 0
                    && counted.other == 0,
                "s_time reported {handshakes} handshakes; the agent listener counted {counted:?}"
            );
            aborted = Some(counted.aborted);
        }
    }
    Ok(Run {
        round,
        target,
        handshakes,
        aborted,
        wall,
        cpu_secs: (cpu_after - cpu_before) as f64 / clock_ticks(),
    })
}

/// The table, the figures over all runs and the ratio.
fn report(tools: &Tools, runs: &[Run], secs: u64, rounds: u64) -> Result<()> {
    let version = |program: &Path, arg: &str| -> Result<String> {
        let out = Command::new(program).arg(arg).output()?;
        let text = [out.stdout, out.stderr].concat();
        Ok(String::from_utf8_lossy(&text).trim().to_string())
    };
    let nginx_version = version(&tools.nginx, "-v")?;
    let openssl_version = version(&tools.openssl, "version")?;
    println!(
        "full mTLS handshakes, TLS 1.3, `openssl s_time -new -time {secs}` ({openssl_version}), \
         {rounds} runs per server, alternating"
    );
    println!(
        "{:<5} {:<16} {:>10} {:>8} {:>12} {:>8} {:>17}",
        "round", "server", "handshakes", "aborted", "handshakes/s", "cpu s", "cpu µs/handshake"
    );
    for run in runs {
        println!(
            "{:<5} {:<16} {:>10} {:>8} {:>12.1} {:>8.2} {:>17.1}",
            run.round,
            run.target.name(),
            run.handshakes,
            run.aborted
                .map_or_else(|| "-".to_string(), |n| n.to_string()),
            run.handshakes as f64 / run.wall.as_secs_f64(),
            run.cpu_secs,
            run.micros_per_handshake()
        );
    }
    let per_handshake = |target: Target| {
        let (cpu, n) = runs
            .iter()
            .filter(|r| r.target == target)
            .fold((0.0, 0), |(cpu, n), r| (cpu + r.cpu_secs, n + r.handshakes));
        cpu * 1e6 / n as f64
    };
    let theirs = per_handshake(Target::Nginx);
    let ours = per_handshake(Target::Server);
    let by_round: Vec<String> = (1..=rounds)
        .filter_map(|round| {
            let of = |t: Target| {
                runs.iter()
                    .find(|r| r.round == round && r.target == t)
                    .map(Run::micros_per_handshake)
            };
            Some(format!("{:.3}", of(Target::Server)? / of(Target::Nginx)?))
        })
        .collect();
    println!("{nginx_version}, master + worker, all runs: {theirs:.1} µs CPU per handshake");
    println!("license-server agent listener, all runs: {ours:.1} µs CPU per handshake");
    println!(
        "ratio license-server / nginx: {:.3} (by round: {})",
        ours / theirs,
        by_round.join(", ")
    );
    println!(
        "checked: with a request per connection, s_time's handshakes are full and accepted by \
         both (the server's counters, nginx's log); in the timed runs s_time reported no \
         error and no resumed session, the agent listener refused none and counted each as \
         full or aborted by the client's reset; same certificate chain; no process died"
    );
    Ok(())
}
