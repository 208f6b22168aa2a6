//! Throughput benchmark of a real `license-server serve` process (SQLite, all three listeners on
//! loopback), run with `cargo bench -p license-server --bench throughput`.
//!
//! It measures, with a fresh TCP connection and a full TLS 1.3 handshake for every request
//! (client session resumption disabled, one HTTP/1.1 request per connection):
//!
//! 1. enrollments per second: `POST /api/public/bootstrap` with a one-time install token and a
//!    CSR, both prepared before timing so the figure is the server's (token check, CSR check,
//!    certificate issuance, database transaction, audit);
//! 2. agent-API requests per second: `GET /api/v1/secret-status` on the agent listener with a
//!    machine certificate (mutual TLS, certificate chain verification, per-request database
//!    check of the certificate and machine);
//!    run twice: the machines' first requests (each records when its machine was last seen, one
//!    write) and the same again (no write: most polls), checked like the next one;
//! 3. health reports per second: `POST /api/v1/health` with the report each machine already
//!    sent (what a poll with nothing new costs since the fleet-health work); the run fails if
//!    any machine's stored last-seen or health time changed during the timed requests, so "no
//!    write" is checked, not assumed;
//! 4. releases: `secret-status` with the agent's update query while a release is published at
//!    0% (the offer looked for, none made: what every poll costs once releases exist) and at
//!    100% (the signed offer in every answer), then downloads of the release's binary
//!    (`BENCH_RELEASE_MIB`, default 11, the agent's size) with the server's resident memory
//!    sampled meanwhile, and from the download rate the time from publish to 100% of a fleet
//!    of 1,000 machines polling every 60 s;
//! 5. a baseline in the same run: `GET /healthz` on the public listener (server-authenticated
//!    TLS 1.3, one `SELECT 1`), measured before and after the scenarios above.
//!
//! Why: an agent connects rarely and a resumed session hides the handshake cost, so the worst
//! case a fleet imposes is a full handshake per request. Absolute figures swing with the load
//! of a shared machine; the ratio of each scenario to the healthz baseline measured in the same
//! run (the mean of the two baseline runs) is the figure to compare between runs.
//!
//! Client and server share the machine's cores, so every figure includes the client side of
//! the handshakes too. Every request is checked (status 200, and a count of full handshakes
//! equal to the number of requests); nothing here asserts on time.
//!
//! Environment: `BENCH_REQUESTS` (per scenario, default 2000), `BENCH_CONCURRENCY` (requests in
//! flight, default 4), `BENCH_RELEASE_MIB`. Without `--bench` on the command line (as under `cargo test --benches`)
//! it runs a small smoke pass instead (8 requests, concurrency 2).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::{Body as _, Incoming};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::HandshakeKind;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[macro_use]
mod common;
use common::{env_usize, Error, Result, Server, SNI};

/// TLS 1.3 client trusting the server's CA, with the machine's certificate when given; no
/// session resumption (every connection a full handshake), HTTP/1.1.
fn client_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Arc<rustls::ClientConfig>> {
    let mut config = common::client_config(ca_pem, identity)?;
    config.resumption = Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What one request on its own connection returned.
struct Reply {
    status: StatusCode,
    body: Vec<u8>,
    /// The handshake was a full one (not resumed) and negotiated TLS 1.3.
    full_tls13: bool,
}

impl Reply {
    fn ok_empty(self, what: &str) -> Result<bool> {
        ensure!(
            self.status == StatusCode::NO_CONTENT,
            "{what}: HTTP {}: {}",
            self.status,
            String::from_utf8_lossy(&self.body)
        );
        Ok(self.full_tls13)
    }

    fn ok_json(self, what: &str) -> Result<(Value, bool)> {
        ensure!(
            self.status == StatusCode::OK,
            "{what}: HTTP {}: {}",
            self.status,
            String::from_utf8_lossy(&self.body)
        );
        Ok((serde_json::from_slice(&self.body)?, self.full_tls13))
    }
}

/// Opens a new TCP connection to `addr`, performs a TLS handshake with `tls`, sends one
/// HTTP/1.1 request (`Connection: close`) and reads the whole response.
async fn request_on_new_connection(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    method: Method,
    path: &str,
    bearer: Option<&str>,
    json_body: Option<String>,
) -> Result<Reply> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let stream = TlsConnector::from(tls)
        .connect(ServerName::try_from(SNI)?, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let (_, session) = stream.get_ref();
    let full_tls13 = matches!(
        session.handshake_kind(),
        Some(HandshakeKind::Full | HandshakeKind::FullWithHelloRetryRequest)
    ) && session.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);

    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, SNI)
        .header(hyper::header::CONNECTION, "close");
    if let Some(token) = bearer {
        builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    if json_body.is_some() {
        builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let request = builder.body(json_body.unwrap_or_default())?;

    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let exchange = async move {
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = read_body(response.into_body()).await?;
        Ok::<_, Error>((status, body))
    };
    let (exchange, conn) = tokio::join!(exchange, conn);
    let (status, body) = exchange?;
    conn?;
    Ok(Reply {
        status,
        body,
        full_tls13,
    })
}

async fn read_body(mut body: Incoming) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        if let Ok(data) = frame?.into_data() {
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

/// Latencies and wall time of one scenario.
struct Measured {
    name: String,
    requests: usize,
    concurrency: usize,
    wall: Duration,
    latencies: Vec<Duration>,
}

impl Measured {
    fn per_second(&self) -> f64 {
        self.requests as f64 / self.wall.as_secs_f64()
    }

    /// Nearest-rank percentile, in milliseconds.
    fn percentile_ms(&self, p: f64) -> f64 {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        let index = rank.clamp(1, sorted.len()) - 1;
        sorted[index].as_secs_f64() * 1000.0
    }
}

/// Runs `one(i)` for every `i` in `indices` with `concurrency` requests in flight. Each call
/// returns whether its connection made a full TLS 1.3 handshake; the run fails unless all did.
async fn run<F, Fut>(
    name: &str,
    indices: std::ops::Range<usize>,
    concurrency: usize,
    one: F,
) -> Result<Measured>
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<bool>> + Send + 'static,
{
    let requests = indices.len();
    let start_index = indices.start;
    let next = Arc::new(AtomicUsize::new(0));
    let full_handshakes = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.min(requests) {
        let next = next.clone();
        let full_handshakes = full_handshakes.clone();
        let one = one.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    break;
                }
                let t0 = Instant::now();
                if one(start_index + i).await? {
                    full_handshakes.fetch_add(1, Ordering::Relaxed);
                }
                latencies.push(t0.elapsed());
            }
            Ok::<_, Error>(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(requests);
    for worker in workers {
        latencies.extend(worker.await??);
    }
    let wall = started.elapsed();
    let full = full_handshakes.load(Ordering::Relaxed);
    ensure!(
        full == requests && latencies.len() == requests,
        "{name}: {full} full TLS 1.3 handshakes for {requests} requests"
    );
    Ok(Measured {
        name: name.to_string(),
        requests,
        concurrency: concurrency.min(requests),
        wall,
        latencies,
    })
}

struct Enrollment {
    token: String,
    csr: String,
    key_pem: String,
}

fn main() -> Result<()> {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let (default_requests, default_concurrency) = if bench_mode { (2000, 4) } else { (8, 2) };
    let requests = env_usize("BENCH_REQUESTS", default_requests)?;
    let concurrency = env_usize("BENCH_CONCURRENCY", default_concurrency)?;
    let warmup = (requests / 10).clamp(1, 20);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(requests, concurrency, warmup, bench_mode))
}

async fn bench(requests: usize, concurrency: usize, warmup: usize, bench_mode: bool) -> Result<()> {
    let release_size_mib = env_usize("BENCH_RELEASE_MIB", if bench_mode { 11 } else { 1 })?;
    let server = Server::start(&["--bootstrap-rate-per-minute", "1000000"])?;
    let ca_pem = server.ca_pem()?;
    let server_auth = client_config(&ca_pem, None)?;

    // ---- preparation, untimed: a client, an admin API token, install tokens and CSRs ----
    let client_id = server.admin_json(&["client", "create", "--name", "bench"])?["id"]
        .as_str()
        .ok_or("client create: no id")?
        .to_string();
    let api_token =
        server.admin_json(&["api-token", "create", "--name", "bench", "--role", "admin"])?["token"]
            .as_str()
            .ok_or("api-token create: no token")?
            .to_string();
    let enrollments_needed = requests + warmup;
    let tokens = Arc::new(Mutex::new(vec![String::new(); enrollments_needed]));
    {
        let (tokens, tls, admin, api_token, client_id) = (
            tokens.clone(),
            server_auth.clone(),
            server.admin,
            Arc::new(api_token),
            Arc::new(client_id),
        );
        run(
            "mint install tokens",
            0..enrollments_needed,
            concurrency,
            move |i| {
                let (tokens, tls, api_token, client_id) = (
                    tokens.clone(),
                    tls.clone(),
                    api_token.clone(),
                    client_id.clone(),
                );
                async move {
                    let body = json!({ "client_id": client_id.as_str() }).to_string();
                    let reply = request_on_new_connection(
                        admin,
                        tls,
                        Method::POST,
                        "/api/admin/install-tokens",
                        Some(api_token.as_str()),
                        Some(body),
                    )
                    .await?;
                    let (answer, full) = reply.ok_json("install token")?;
                    let token = answer["token"].as_str().ok_or("no token in answer")?;
                    lock(&tokens)?[i] = token.to_string();
                    Ok(full)
                }
            },
        )
        .await?;
    }
    let tokens = std::mem::take(&mut *lock(&tokens)?);
    let enrollments: Arc<Vec<Enrollment>> = Arc::new(
        tokens
            .into_iter()
            .map(|token| {
                let key = rcgen::KeyPair::generate()?;
                let csr = rcgen::CertificateParams::default()
                    .serialize_request(&key)?
                    .pem()?;
                Ok(Enrollment {
                    token,
                    csr,
                    key_pem: key.serialize_pem(),
                })
            })
            .collect::<Result<_>>()?,
    );

    // ---- scenarios ----
    let healthz = {
        let (tls, public) = (server_auth.clone(), server.public);
        move |_i: usize| {
            let tls = tls.clone();
            async move {
                let reply =
                    request_on_new_connection(public, tls, Method::GET, "/healthz", None, None)
                        .await?;
                let (answer, full) = reply.ok_json("healthz")?;
                ensure!(answer["status"] == "ok", "healthz: {answer}");
                Ok(full)
            }
        }
    };

    let certificates = Arc::new(Mutex::new(vec![String::new(); enrollments_needed]));
    let enroll = {
        let (tls, public, enrollments, certificates) = (
            server_auth.clone(),
            server.public,
            enrollments.clone(),
            certificates.clone(),
        );
        move |i: usize| {
            let (tls, enrollments, certificates) =
                (tls.clone(), enrollments.clone(), certificates.clone());
            async move {
                let e = &enrollments[i];
                let body = json!({
                    "token": e.token,
                    "hostname": "bench",
                    "hardware_id": format!("BENCH-{i}"),
                    "arch": "amd64",
                    "csr": e.csr,
                })
                .to_string();
                let reply = request_on_new_connection(
                    public,
                    tls,
                    Method::POST,
                    "/api/public/bootstrap",
                    None,
                    Some(body),
                )
                .await?;
                let (answer, full) = reply.ok_json("bootstrap")?;
                let cert = answer["certificate"]
                    .as_str()
                    .ok_or("bootstrap: no certificate")?;
                lock(&certificates)?[i] = cert.to_string();
                Ok(full)
            }
        }
    };

    let mut results = Vec::new();
    run("warm-up healthz", 0..warmup, concurrency, healthz.clone()).await?;
    results.push(
        run(
            "healthz (baseline, before)",
            0..requests,
            concurrency,
            healthz.clone(),
        )
        .await?,
    );
    run(
        "warm-up enroll",
        requests..requests + warmup,
        concurrency,
        enroll.clone(),
    )
    .await?;
    results.push(run("enroll (POST bootstrap)", 0..requests, concurrency, enroll).await?);

    // Every enrolled machine gets its own mTLS configuration (parsed before timing); the agent
    // requests go round-robin over them.
    let machine_configs: Arc<Vec<Arc<rustls::ClientConfig>>> = Arc::new(
        lock(&certificates)?
            .iter()
            .zip(enrollments.iter())
            .map(|(cert, e)| client_config(&ca_pem, Some((cert, &e.key_pem))))
            .collect::<Result<_>>()?,
    );
    let agent = {
        let (configs, agent) = (machine_configs.clone(), server.agent);
        move |i: usize| {
            let tls = configs[i % configs.len()].clone();
            async move {
                let reply = request_on_new_connection(
                    agent,
                    tls,
                    Method::GET,
                    "/api/v1/secret-status",
                    None,
                    None,
                )
                .await?;
                let (answer, full) = reply.ok_json("secret-status")?;
                ensure!(answer["machine_id"].is_string(), "secret-status: {answer}");
                Ok(full)
            }
        }
    };
    // The machines' first requests: each records when its machine was last seen (one UPDATE,
    // as a machine's first poll in five minutes does).
    results.push(
        run(
            "agent secret-status, first (mTLS)",
            0..requests,
            concurrency,
            agent.clone(),
        )
        .await?,
    );
    // The same machines again within five minutes: what most polls cost, no write.
    let before = machine_times(&server)?;
    results.push(
        run(
            "agent secret-status, again (mTLS)",
            0..requests,
            concurrency,
            agent,
        )
        .await?,
    );
    let after = machine_times(&server)?;
    ensure!(
        before == after,
        "polls within five minutes wrote to the database"
    );

    // ---- releases (docs/OPERATIONS.md "Releasing and rolling out") ----
    // A published release at 0%: polls that name the agent's version look for an offer (one
    // indexed read) and find none — what every poll costs once releases exist.
    let release_bytes = release_size_mib * 1024 * 1024;
    let release_file = server.data.with_file_name("release.bin");
    {
        // Incompressible, deterministic content.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut content = Vec::with_capacity(release_bytes);
        while content.len() < release_bytes {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            content.extend_from_slice(&state.to_le_bytes());
        }
        content.truncate(release_bytes);
        std::fs::write(&release_file, content)?;
    }
    let published = server.admin_json(&[
        "release",
        "publish",
        release_file.to_str().ok_or("a UTF-8 temp path")?,
        "--version",
        "99.0.0",
        "--percent",
        "0",
    ])?;
    let release_id = published["id"]
        .as_str()
        .or_else(|| published["manifest"]["release_id"].as_str())
        .ok_or_else(|| format!("release publish: no id in {published}"))?
        .to_string();
    let poll_with_query = |expect_offer: bool| {
        let (configs, agent) = (machine_configs.clone(), server.agent);
        move |i: usize| {
            let tls = configs[i % configs.len()].clone();
            async move {
                let reply = request_on_new_connection(
                    agent,
                    tls,
                    Method::GET,
                    "/api/v1/secret-status?agent_version=0.1.0&channel=stable&arch=x86_64",
                    None,
                    None,
                )
                .await?;
                let (answer, full) = reply.ok_json("secret-status with the update query")?;
                ensure!(
                    answer["update"].is_object() == expect_offer,
                    "secret-status: offer expected {expect_offer}: {answer}"
                );
                Ok(full)
            }
        }
    };
    results.push(
        run(
            "secret-status + query, none offered",
            0..requests,
            concurrency,
            poll_with_query(false),
        )
        .await?,
    );
    server.admin_json(&["release", "rollout", &release_id, "--percent", "100"])?;
    results.push(
        run(
            "secret-status + query, offered",
            0..requests,
            concurrency,
            poll_with_query(true),
        )
        .await?,
    );
    // Downloads: the binary streamed from the database chunk by chunk. The server's resident
    // memory is sampled while they run: flat means it does not grow with the release's size.
    let downloads = (requests / 50).clamp(4, 64);
    let rss_before = rss_kib(server.child.id())?;
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (sampling, pid) = (sampling.clone(), server.child.id());
        std::thread::spawn(move || {
            let mut peak = 0;
            while sampling.load(Ordering::Relaxed) {
                peak = peak.max(rss_kib(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    let download = {
        let (configs, agent) = (machine_configs.clone(), server.agent);
        let path = format!("/api/v1/releases/{release_id}/binary");
        move |i: usize| {
            let tls = configs[i % configs.len()].clone();
            let path = path.clone();
            async move {
                let reply =
                    request_on_new_connection(agent, tls, Method::GET, &path, None, None).await?;
                ensure!(
                    reply.status == StatusCode::OK && reply.body.len() == release_bytes,
                    "download: HTTP {}, {} bytes",
                    reply.status,
                    reply.body.len()
                );
                Ok(reply.full_tls13)
            }
        }
    };
    let download_run = run(
        &format!("release download ({release_size_mib} MiB)"),
        0..downloads,
        concurrency,
        download,
    )
    .await?;
    sampling.store(false, Ordering::Relaxed);
    let rss_peak = sampler.join().map_err(|_| "the RSS sampler panicked")?;
    let mib_per_s = (downloads * release_size_mib) as f64 / download_run.wall.as_secs_f64();
    let rollout = Some(Rollout {
        size_mib: release_size_mib,
        downloads,
        concurrency: download_run.concurrency,
        mib_per_s,
        seconds_each: download_run.percentile_ms(50.0) / 1000.0,
        rss_growth_kib: rss_peak.saturating_sub(rss_before),
    });

    // The report each machine sends while nothing changes: stored once (warm-up), then nothing.
    let unchanged = serde_json::json!({
        "agent_version": "0.1.0", "store": "file", "tpm_enabled": false, "tpm_available": false,
        "degraded_mode": "inactive", "rotation_failures": 0, "audit_chain_ok": true,
        "certificate_expires_at": 4_000_000_000i64, "secret_version": 1,
    })
    .to_string();
    let health = {
        let (configs, agent) = (machine_configs.clone(), server.agent);
        move |i: usize| {
            let tls = configs[i % configs.len()].clone();
            let report = unchanged.clone();
            async move {
                let reply = request_on_new_connection(
                    agent,
                    tls,
                    Method::POST,
                    "/api/v1/health",
                    None,
                    Some(report),
                )
                .await?;
                reply.ok_empty("health")
            }
        }
    };
    // Every machine's first report (and its last-seen time) is written here.
    run(
        "warm-up health",
        0..machine_configs.len(),
        concurrency,
        health.clone(),
    )
    .await?;
    let before = machine_times(&server)?;
    results.push(
        run(
            "agent health, unchanged (mTLS)",
            0..requests,
            concurrency,
            health,
        )
        .await?,
    );
    let after = machine_times(&server)?;
    ensure!(
        before == after,
        "unchanged health reports wrote to the database"
    );
    results.push(
        run(
            "healthz (baseline, after)",
            0..requests,
            concurrency,
            healthz,
        )
        .await?,
    );

    report(&results, bench_mode);
    if let Some(rollout) = rollout {
        rollout.report();
    }
    drop(server);
    Ok(())
}

/// What the release scenarios measured, and the time to roll a release out to a fleet.
struct Rollout {
    size_mib: usize,
    downloads: usize,
    concurrency: usize,
    mib_per_s: f64,
    seconds_each: f64,
    rss_growth_kib: u64,
}

impl Rollout {
    fn report(&self) {
        println!(
            "release downloads: {} × {} MiB, {} at a time: {:.1} MiB/s served, median {:.2} s each; \
             server RSS grew {} KiB at most while serving them ({} KiB in flight if buffered)",
            self.downloads,
            self.size_mib,
            self.concurrency,
            self.mib_per_s,
            self.seconds_each,
            self.rss_growth_kib,
            self.concurrency * self.size_mib * 1024,
        );
        // A fleet of 1,000 machines polling every 60 s at 100%: each sees the offer within one
        // interval (spread evenly), so the server must serve 1,000 binaries within that minute.
        let (machines, poll) = (1000.0, 60.0);
        let needed = machines * self.size_mib as f64 / poll;
        let serving = machines * self.size_mib as f64 / self.mib_per_s;
        let last = poll.max(serving) + self.seconds_each;
        println!(
            "publish → 100% of {machines} machines at a {poll} s poll: the last machine sees the offer \
             within {poll} s; serving {machines} × {} MiB takes {serving:.0} s at the rate measured \
             ({needed:.1} MiB/s needed to keep up) → every machine has the binary after ≈ {last:.0} s, \
             then its update step (stop, swap, start, one round) — seconds",
            self.size_mib
        );
    }
}

/// The resident set of process `pid`, KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmRSS".into())
}

/// When each machine was last seen and last reported its health, as stored: a poll that
/// wrote would change one of them.
fn machine_times(server: &Server) -> Result<Vec<(Value, Value, Value)>> {
    let list = server.admin_json(&["machine", "list"])?;
    let machines = list.as_array().ok_or("machine list: not an array")?;
    ensure!(!machines.is_empty(), "machine list: empty");
    Ok(machines
        .iter()
        .map(|m| {
            (
                m["id"].clone(),
                m["last_seen_at"].clone(),
                m["health_reported_at"].clone(),
            )
        })
        .collect())
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock().map_err(|_| "a worker panicked".into())
}

fn report(results: &[Measured], bench_mode: bool) {
    let baseline_runs: Vec<f64> = results
        .iter()
        .filter(|m| m.name.starts_with("healthz"))
        .map(Measured::per_second)
        .collect();
    let baseline = baseline_runs.iter().sum::<f64>() / baseline_runs.len().max(1) as f64;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!(
        "license-server throughput{}: {cores} cores, server and client on this machine, \
         new TCP + full TLS 1.3 handshake per request",
        if bench_mode {
            ""
        } else {
            " (smoke run, not a measurement)"
        }
    );
    println!(
        "{:<34} {:>8} {:>5} {:>9} {:>10} {:>9} {:>12}",
        "scenario", "requests", "conc", "req/s", "median ms", "p99 ms", "vs baseline"
    );
    for m in results {
        println!(
            "{:<34} {:>8} {:>5} {:>9.1} {:>10.2} {:>9.2} {:>12.3}",
            m.name,
            m.requests,
            m.concurrency,
            m.per_second(),
            m.percentile_ms(50.0),
            m.percentile_ms(99.0),
            m.per_second() / baseline,
        );
    }
    println!("baseline = mean healthz req/s of the two baseline runs = {baseline:.1}");
    println!(
        "checked: every request answered 200 (health: 204) on a new connection with a full (non-resumed) \
         TLS 1.3 handshake"
    );
}
