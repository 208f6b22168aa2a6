//! Fleet benchmark: thousands of simulated agents (`license-fleet`) against two real
//! `license-server serve` replicas on PostgreSQL behind HAProxy (TCP, TLS passthrough), run
//! with `cargo bench -p license-server --bench fleet` (`BENCH_AGENTS`, default 20000; the
//! other knobs in docs/BENCHMARKS.md "Fleet", among them `BENCH_WATCH_ROUND_SECS` and
//! `BENCH_HEARTBEAT_SECS` to take the rounds or the pings out of the steady window).
//!
//! In one run, so the ratios compare like with like:
//!
//! 1. enrollment of every machine through the real bootstrap (rate reported);
//! 2. **before**: the agent as it was — a new connection with a full mTLS handshake for every
//!    round (secret status + licenses), `BENCH_POLL_AGENTS` (default 2000) agents polling every
//!    10 s for `BENCH_WINDOW_SECS` (default 60); the servers' CPU time per round, scaled to one
//!    round a minute, is the CPU per machine-minute of a fleet polling every 60 s;
//! 3. **now**: every machine connected (one kept HTTP/2 connection each, watch stream held,
//!    rounds every 3600 s at random phases), once every first round is over, the servers' CPU
//!    over the same window per machine-minute, and their resident memory per connected
//!    machine. They connect `BENCH_CONNECT_RATE` (default 300) a second; one process holds
//!    `BENCH_AGENTS_PER_PROCESS` (default 10000) of them under the open-files limit: the bench
//!    runs itself again as worker processes for the others;
//! 4. revocation propagation: `BENCH_REVOKE` (default 100) machines revoked one after the other
//!    through the two replicas' admin APIs while everyone is connected; the time from each
//!    revocation request to its arrival on the machine's watch stream, p50/p99/max;
//! 5. database transactions per round (PostgreSQL's `xact_commit`) in both modes.
//!
//! Nothing asserts on time. The run fails when it is broken: an agent that cannot connect, a
//! revocation that never arrives, a round refused for another reason than a revocation.
//! Without `--bench` (as under `cargo test --benches`) it runs a smoke pass: 40 agents (10 of
//! them in a worker process), 5-second windows, 5 revocations.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use license_fleet::http::Target;
use license_fleet::{process, run_fleet, Enroller, FleetConfig, IdentityCache, Mode, ProfileMix};
use serde_json::Value;

#[macro_use]
mod common;
use common::{env_usize, Result, SERVER};

/// The streams' ping unless `BENCH_HEARTBEAT_SECS` says otherwise: the server's default.
const DEFAULT_HEARTBEAT: u64 = license_server::config::DEFAULT_WATCH_HEARTBEAT_SECS;

/// A child process killed on drop.
struct Proc(Child);

/// Has the kernel kill `command`'s process when the bench dies: a bench stopped by a signal
/// runs no `Drop`, and would leave its replicas, HAProxy and workers on the cores. (The signal
/// follows the thread that spawned the child: every child here is spawned by the main thread.)
#[allow(unsafe_code)]
fn dies_with_bench(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt as _;
    let bench = std::process::id();
    // SAFETY: the closure calls only async-signal-safe functions (prctl, getppid, _exit)
    // between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // The bench died before prctl: no signal will come.
            if u32::try_from(libc::getppid()).ok() != Some(bench) {
                libc::_exit(1);
            }
            Ok(())
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One `serve` process and its listeners.
struct Replica {
    proc: Proc,
    agent: String,
    admin_url: String,
    public_url: String,
}

fn serve(data: &Path, log: &Path) -> Result<Replica> {
    let mut child = dies_with_bench(&mut Command::new(SERVER))
        .arg("serve")
        .arg("--data-dir")
        .arg(data)
        .args([
            "--public-listen",
            "127.0.0.1:0",
            "--agent-listen",
            "127.0.0.1:0",
        ])
        .args(["--admin-listen", "127.0.0.1:0", "--json"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log)?)
        .spawn()?;
    let stdout = child.stdout.take().ok_or("serve: no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let ready: Value = serde_json::from_str(&line).map_err(|_| {
        format!(
            "serve did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        )
    })?;
    let field = |name: &str| ready[name].as_str().unwrap_or_default().to_string();
    Ok(Replica {
        proc: Proc(child),
        agent: field("agent"),
        admin_url: format!("https://{}", field("admin")).replace("127.0.0.1", "localhost"),
        public_url: field("public_url"),
    })
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Connections one HAProxy process holds: two descriptors each (client and replica side)
/// under this machine's open-files limit.
fn haproxy_capacity() -> usize {
    (nofile_limit().saturating_sub(200) / 2).max(100)
}

/// HAProxy in TCP mode (TLS passes through to the replicas, which see the client
/// certificates), round robin, listening on `port`; `name` tells its files apart.
fn haproxy(dir: &Path, name: &str, port: u16, backends: &[&str]) -> Result<Proc> {
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, addr)| format!("    server replica{i} {addr}\n"))
        .collect();
    let config = format!(
        "global\n    maxconn {max}\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    \
         timeout client 1h\n    timeout server 1h\n\nfrontend agents\n    bind 127.0.0.1:{port}\n    \
         maxconn {max}\n    default_backend replicas\n\nbackend replicas\n    balance roundrobin\n{servers}",
        max = haproxy_capacity()
    );
    let path = dir.join(format!("{name}.cfg"));
    std::fs::write(&path, config)?;
    let check = Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&path)
        .output()?;
    ensure!(
        check.status.success(),
        "haproxy -c: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let child = dies_with_bench(&mut Command::new("haproxy"))
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log")))?)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(
            Instant::now() < deadline,
            "haproxy did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Proc(child))
}

/// `psql` on the bench's database: one value.
fn psql(url: &str, sql: &str) -> Result<String> {
    let out = Command::new("psql").args([url, "-Atc", sql]).output()?;
    ensure!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Quiet time before a window whose transactions are counted: PostgreSQL's backends report
/// their counts to `pg_stat_database` at most once a second while busy and after 10 s once
/// idle, so the ramp's transactions would otherwise land in the window.
const STATS_SETTLE: Duration = Duration::from_secs(11);

/// Transactions committed in `db` so far, as `pg_stat_database` has them (see [`STATS_SETTLE`]).
fn transactions(url: &str, db: &str) -> Result<u64> {
    Ok(psql(
        url,
        &format!("SELECT xact_commit FROM pg_stat_database WHERE datname = '{db}'"),
    )?
    .parse()?)
}

/// This process's open-files limit (what its children inherit).
#[allow(unsafe_code)]
fn nofile_limit() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid, initialized struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
    } else {
        1024
    }
}

/// The open-files limit up to its hard limit (every simulated agent holds a socket).
#[allow(unsafe_code)]
fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit with a valid, initialized struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64) * q).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The environment variable that makes this bench a worker: simulated agents in a process of
/// their own (one process holds a connection per agent under the open-files limit, so 20,000
/// agents take two or more). Its value is a [`WorkerSpec`] in JSON.
const WORKER_ENV: &str = "LSA_FLEET_BENCH_WORKER";

/// What a worker runs: the machines `skip..skip + count` of the identity cache, connected
/// (watch mode) to `targets`.
#[derive(serde::Serialize, serde::Deserialize)]
struct WorkerSpec {
    cache: std::path::PathBuf,
    ca_pem: String,
    targets: Vec<std::net::SocketAddr>,
    skip: usize,
    count: usize,
    connect_rate: u32,
    round_secs: u64,
}

/// A worker's counters, one JSON line on its stdout every half second.
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct WorkerStatus {
    connected: usize,
    rounds_ok: u64,
    rotations: u64,
    transport_errors: u64,
    http_errors: u64,
}

impl WorkerStatus {
    fn of(fleet: &license_fleet::Fleet) -> Self {
        let report = fleet.recorder.report();
        Self {
            connected: fleet.connected(),
            rounds_ok: report.rounds_ok,
            rotations: report.rotations,
            transport_errors: report.transport_errors,
            http_errors: report.http_errors,
        }
    }

    fn add(self, other: Self) -> Self {
        Self {
            connected: self.connected + other.connected,
            rounds_ok: self.rounds_ok + other.rounds_ok,
            rotations: self.rotations + other.rotations,
            transport_errors: self.transport_errors + other.transport_errors,
            http_errors: self.http_errors + other.http_errors,
        }
    }
}

/// The connected fleet of step 3 (and the steady state): watch mode, rounds every
/// `round_secs`, each process starting `connect_rate` agents a second.
fn watch_config(targets: Vec<Target>, connect_rate: u32, round_secs: u64) -> FleetConfig {
    FleetConfig {
        targets,
        mode: Mode::Watch,
        poll_interval: Duration::from_secs(60),
        watch_poll_interval: Duration::from_secs(round_secs),
        rotation_interval: None,
        renew_interval: None,
        cache: None,
        connect_rate,
        flap_every: Duration::from_secs(3600),
        mix: ProfileMix::default(),
    }
}

/// The worker's side: runs its agents until its stdin closes, reporting its counters.
async fn worker(spec: WorkerSpec) -> Result<()> {
    raise_nofile();
    let identities: Vec<_> = IdentityCache::new(&spec.cache)
        .load()?
        .into_iter()
        .skip(spec.skip)
        .take(spec.count)
        .collect();
    let targets = spec
        .targets
        .iter()
        .map(|addr| Target::new(*addr, "localhost", &spec.ca_pem))
        .collect::<Result<Vec<_>, _>>()?;
    let fleet = run_fleet(
        identities,
        watch_config(targets, spec.connect_rate, spec.round_secs),
    );
    let (eof_tx, mut eof) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        let _ = eof_tx.send(());
    });
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                println!("{}", serde_json::to_string(&WorkerStatus::of(&fleet))?);
            }
            _ = &mut eof => break,
        }
    }
    fleet.stop().await;
    Ok(())
}

/// Worker processes and the last status each reported; killed on drop.
struct Workers {
    procs: Vec<Proc>,
    latest: Vec<std::sync::Arc<std::sync::Mutex<WorkerStatus>>>,
}

impl Workers {
    fn start(specs: Vec<WorkerSpec>, dir: &Path) -> Result<Self> {
        let (mut procs, mut latest) = (Vec::new(), Vec::new());
        for (i, spec) in specs.into_iter().enumerate() {
            let mut child = dies_with_bench(&mut Command::new(std::env::current_exe()?))
                .env(WORKER_ENV, serde_json::to_string(&spec)?)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(dir.join(format!("worker{i}.log")))?)
                .spawn()?;
            let stdout = child.stdout.take().ok_or("worker: no stdout")?;
            let status = std::sync::Arc::new(std::sync::Mutex::new(WorkerStatus::default()));
            let shared = status.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                    if let Ok(s) = serde_json::from_str(&line) {
                        *shared.lock().unwrap_or_else(|e| e.into_inner()) = s;
                    }
                }
            });
            procs.push(Proc(child));
            latest.push(status);
        }
        Ok(Self { procs, latest })
    }

    /// The sum of every worker's last status.
    fn status(&self) -> WorkerStatus {
        self.latest
            .iter()
            .map(|s| *s.lock().unwrap_or_else(|e| e.into_inner()))
            .fold(WorkerStatus::default(), WorkerStatus::add)
    }

    /// Whether every worker still runs.
    fn alive(&mut self) -> bool {
        self.procs
            .iter_mut()
            .all(|p| matches!(p.0.try_wait(), Ok(None)))
    }
}

struct Settings {
    agents: usize,
    per_process: usize,
    /// Agents started per second in step 3, over all processes.
    connect_rate: u32,
    /// The connected agents' rounds (`BENCH_WATCH_ROUND_SECS`, default 3600, the agent's
    /// `watch_poll_interval`; a day leaves the window with what holding the connections costs
    /// alone).
    round_secs: u64,
    /// The streams' ping (`BENCH_HEARTBEAT_SECS`, default: the server's, 60).
    heartbeat_secs: u64,
    poll_agents: usize,
    window: Duration,
    revoke: usize,
}

async fn bench(s: Settings) -> Result<()> {
    raise_nofile();
    let base = std::env::var("LSA_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let db = format!("lsa_fleet_bench_{}", std::process::id());
    psql(
        &format!("{base}/postgres"),
        &format!("CREATE DATABASE {db}"),
    )?;
    let url = format!("{base}/{db}");
    let result = bench_on(&s, &url, &db).await;
    let _ = psql(
        &format!("{base}/postgres"),
        &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
    );
    result
}

async fn bench_on(s: &Settings, url: &str, db: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("srv");
    let out = Command::new(SERVER)
        .args([
            "init",
            "--dns-name",
            "localhost",
            "--ip",
            "127.0.0.1",
            "--database-url",
            url,
        ])
        .arg("--data-dir")
        .arg(&data)
        .output()?;
    ensure!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let heartbeat = s.heartbeat_secs.to_string();
    let set = [
        ("bootstrap_rate_per_minute", "100000000"),
        ("max_connections_per_address", "0"),
        ("agent_max_connections", "200000"),
        ("agent_max_inflight", "512"),
        ("watch_heartbeat_secs", heartbeat.as_str()),
    ];
    let mut config: String = std::fs::read_to_string(data.join("server.toml"))?
        .lines()
        .filter(|line| {
            !set.iter()
                .any(|(key, _)| line.starts_with(&format!("{key} =")))
        })
        .map(|line| format!("{line}\n"))
        .collect();
    for (key, value) in set {
        config.push_str(&format!("{key} = {value}\n"));
    }
    std::fs::write(data.join("server.toml"), config)?;
    let replicas = [
        serve(&data, &dir.path().join("replica0.log"))?,
        serve(&data, &dir.path().join("replica1.log"))?,
    ];
    let pids: Vec<u32> = replicas.iter().map(|r| r.proc.0.id()).collect();
    println!("replicas: pids {pids:?}");
    // As many load balancers as the connections need (a process holds two descriptors per
    // connection under the open-files limit), agents spread over them as DNS would.
    let balancers = s.agents.div_ceil(haproxy_capacity());
    let mut lbs = Vec::new();
    let mut lb_ports = Vec::new();
    for i in 0..balancers {
        let port = free_port()?;
        lbs.push(haproxy(
            dir.path(),
            &format!("haproxy{i}"),
            port,
            &[&replicas[0].agent, &replicas[1].agent],
        )?);
        lb_ports.push(port);
    }
    let ca = std::fs::read_to_string(data.join("ca.pem"))?;
    let admin_token = {
        let out = Command::new(SERVER)
            .arg("admin")
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--json",
                "api-token",
                "create",
                "--name",
                "bench",
                "--role",
                "admin",
            ])
            .output()?;
        ensure!(
            out.status.success(),
            "api-token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout)?;
        v["token"].as_str().unwrap_or_default().to_string()
    };
    let target_of = |url: &str| -> Result<Target> {
        let addr = url
            .trim_start_matches("https://")
            .replace("localhost", "127.0.0.1")
            .parse()?;
        Ok(Target::new(addr, "localhost", &ca)?)
    };
    let lb: Vec<Target> = lb_ports
        .iter()
        .map(|port| target_of(&format!("127.0.0.1:{port}")))
        .collect::<Result<_>>()?;
    println!(
        "2 replicas on PostgreSQL behind {balancers} HAProxy process(es) (TCP, TLS passthrough)"
    );

    // 1. Enrollment.
    let enroller = Enroller {
        public: target_of(&replicas[0].public_url)?,
        admin: target_of(&replicas[0].admin_url)?,
        admin_token: admin_token.clone(),
    };
    let cache = IdentityCache::new(dir.path().join("machines.jsonl"));
    let started = Instant::now();
    let identities = enroller
        .enroll_many("bench", s.agents, 32, &cache)
        .await
        .map_err(|e| {
            let log = std::fs::read_to_string(dir.path().join("replica0.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            format!(
                "enrollment: {e}\nreplica log (last lines first):\n{}",
                tail.join("\n")
            )
        })?;
    let enroll_secs = started.elapsed().as_secs_f64();
    println!(
        "enrolled {} machines through the bootstrap in {enroll_secs:.1} s ({:.0}/s)",
        identities.len(),
        identities.len() as f64 / enroll_secs
    );

    // 2. Before: a full handshake per round.
    let poll_interval = Duration::from_secs(10);
    let poll_fleet = run_fleet(
        identities[..s.poll_agents].to_vec(),
        FleetConfig {
            targets: lb.clone(),
            mode: Mode::Poll,
            poll_interval,
            watch_poll_interval: Duration::from_secs(900),
            rotation_interval: None,
            renew_interval: None,
            cache: None,
            connect_rate: 100_000,
            flap_every: Duration::from_secs(3600),
            mix: ProfileMix::default(),
        },
    );
    // Every agent's first round (its first rotation: the machines were enrolled just now) is
    // over before the window, which then holds plain rounds only.
    let deadline = Instant::now() + Duration::from_secs(300);
    while poll_fleet.recorder.report().rotations < s.poll_agents as u64 && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(poll_interval.max(STATS_SETTLE)).await;
    poll_fleet.recorder.reset_samples();
    // The ramp (2000 agents starting at once, their first rotations) may shed or cut
    // connections; the window must not.
    let start = poll_fleet.recorder.report();
    let ok_before = start.rounds_ok;
    let (cpu0, tx0) = (process::total_cpu(&pids)?, transactions(url, db)?);
    tokio::time::sleep(s.window).await;
    let (cpu1, tx1) = (process::total_cpu(&pids)?, transactions(url, db)?);
    let poll_report = poll_fleet.stop().await.report();
    let poll_rounds = poll_report.rounds_ok - ok_before;
    ensure!(poll_rounds > 0, "no round in the poll window");
    ensure!(
        poll_report.transport_errors == start.transport_errors
            && poll_report.http_errors == start.http_errors,
        "poll mode, errors in the window: {poll_report}"
    );
    let cpu_per_round = (cpu1 - cpu0).as_secs_f64() * 1000.0 / poll_rounds as f64;
    let poll_tx_per_round = (tx1 - tx0) as f64 / poll_rounds as f64;
    println!(
        "\nbefore: a new connection, full mTLS handshake, per round ({} agents every {:?}):",
        s.poll_agents, poll_interval
    );
    print!("{poll_report}");
    println!(
        "server CPU {cpu_per_round:.3} ms per round = {cpu_per_round:.3} ms per machine-minute at one round a minute; {poll_tx_per_round:.2} database transactions per round"
    );

    // 3. Now: everyone connected, watch streams held. This process holds up to
    // `BENCH_AGENTS_PER_PROCESS` agents (the revoked ones of step 4 among them); worker
    // processes hold the others.
    let rss_idle = process::total_rss(&pids)?;
    let local = s.agents.min(s.per_process);
    // The ramp's rate is shared by the processes (each one's handshakes and first rotations
    // land on the same two cores here).
    let processes = s.agents.div_ceil(s.per_process);
    let rate = (s.connect_rate / processes as u32).max(1);
    let fleet = run_fleet(
        identities[..local].to_vec(),
        watch_config(lb.clone(), rate, s.round_secs),
    );
    let specs = (local..s.agents)
        .step_by(s.per_process)
        .map(|skip| WorkerSpec {
            cache: cache.path().to_path_buf(),
            ca_pem: ca.clone(),
            targets: lb.iter().map(|t| t.addr).collect(),
            skip,
            count: s.per_process.min(s.agents - skip),
            connect_rate: rate,
            round_secs: s.round_secs,
        })
        .collect::<Vec<_>>();
    let worker_count = specs.len();
    let mut workers = Workers::start(specs, dir.path())?;
    let status = |fleet: &license_fleet::Fleet, workers: &Workers| {
        WorkerStatus::of(fleet).add(workers.status())
    };
    let ramp_secs = s.agents as u64 / u64::from(s.connect_rate.max(1));
    let connect_deadline = Instant::now() + Duration::from_secs(120 + 3 * ramp_secs);
    while status(&fleet, &workers).connected < s.agents && Instant::now() < connect_deadline {
        ensure!(workers.alive(), "a worker process ended: see worker*.log");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let connected = status(&fleet, &workers).connected;
    ensure!(
        connected == s.agents,
        "{connected} of {} agents connected: {:?}",
        s.agents,
        status(&fleet, &workers)
    );
    // Every agent's first round is over (those enrolled just now and not polled before: a
    // first rotation), and the ramp's last requests with it; the next rounds come at each
    // agent's own phase.
    let first_rotations = (s.agents - s.poll_agents.min(s.agents)) as u64;
    while status(&fleet, &workers).rotations < first_rotations && Instant::now() < connect_deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(STATS_SETTLE).await;
    let ramp = status(&fleet, &workers);
    ensure!(
        ramp.rotations >= first_rotations,
        "not every agent made its first round (its first rotation): {ramp:?}"
    );
    fleet.recorder.reset_samples();
    let rss_connected = process::total_rss(&pids)?;
    println!("steady window: {:?}", s.window);
    let (cpu0, tx0) = (process::total_cpu(&pids)?, transactions(url, db)?);
    tokio::time::sleep(s.window).await;
    let (cpu1, tx1) = (process::total_cpu(&pids)?, transactions(url, db)?);
    let steady = fleet.recorder.report();
    let steady_all = status(&fleet, &workers);
    let machine_minutes = s.agents as f64 * s.window.as_secs_f64() / 60.0;
    let watch_cpu = (cpu1 - cpu0).as_secs_f64() * 1000.0 / machine_minutes;
    let steady_rounds = steady_all.rounds_ok - ramp.rounds_ok;
    println!(
        "\nnow: {} agents connected (HTTP/2, watch stream, pings every {} s, rounds every {} s at random phases), {local} in this process, {} in {worker_count} worker process(es); this process's agents:",
        s.agents,
        s.heartbeat_secs,
        s.round_secs,
        s.agents - local
    );
    print!("{steady}");
    println!(
        "server CPU {watch_cpu:.4} ms per machine-minute; {steady_rounds} rounds, {} database transactions in the window ({:.2} per round); RSS {:.0} MiB for both replicas, {:.1} KiB per connected machine",
        tx1 - tx0,
        (tx1 - tx0) as f64 / steady_rounds.max(1) as f64,
        rss_connected as f64 / 1_048_576.0,
        rss_connected.saturating_sub(rss_idle) as f64 / s.agents as f64 / 1024.0
    );
    println!(
        "ratio: before / now = {:.1}x less server CPU per machine-minute",
        cpu_per_round / watch_cpu.max(1e-9)
    );

    // 4. Revocations pushed.
    fleet.recorder.reset_samples();
    let http_admin = |r: &Replica| target_of(&r.admin_url);
    let admins = [http_admin(&replicas[0])?, http_admin(&replicas[1])?];
    let mut revoked = Vec::new();
    for (i, identity) in identities[..local].iter().rev().take(s.revoke).enumerate() {
        let at = Instant::now();
        license_fleet::identity::admin_post(
            &admins[i % 2],
            &format!("/api/admin/machines/{}/revoke", identity.machine_id),
            &admin_token,
        )
        .await?;
        revoked.push((identity.machine_id.clone(), at));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let deliveries = fleet.recorder.deliveries();
    let mut latencies = Vec::new();
    for (machine, at) in &revoked {
        let arrived = deliveries
            .iter()
            .find(|d| &d.machine_id == machine && d.kind == "machine_revoked")
            .ok_or_else(|| format!("the revocation of {machine} never arrived"))?;
        latencies.push(arrived.at - *at);
    }
    latencies.sort();
    println!(
        "\n{} revocations through both replicas, {} agents connected: arrival p50 {:?}, p99 {:?}, max {:?}",
        revoked.len(),
        s.agents,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );
    let elsewhere = workers.status();
    drop(workers);
    let end = fleet.stop().await.report();
    ensure!(
        end.http_errors == 0 && elsewhere.http_errors == 0,
        "unexpected HTTP errors while connected: {end}; in the workers: {elsewhere:?}"
    );
    Ok(())
}

fn main() -> Result<()> {
    if let Ok(spec) = std::env::var(WORKER_ENV) {
        let spec: WorkerSpec = serde_json::from_str(&spec)?;
        return tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(worker(spec));
    }
    let full = std::env::args().any(|a| a == "--bench");
    let settings = if full {
        Settings {
            agents: env_usize("BENCH_AGENTS", 20_000)?,
            per_process: env_usize("BENCH_AGENTS_PER_PROCESS", 10_000)?.max(1),
            connect_rate: u32::try_from(env_usize("BENCH_CONNECT_RATE", 300)?.max(1))?,
            round_secs: env_usize("BENCH_WATCH_ROUND_SECS", 3600)?.max(1) as u64,
            heartbeat_secs: env_usize("BENCH_HEARTBEAT_SECS", DEFAULT_HEARTBEAT as usize)? as u64,
            poll_agents: env_usize("BENCH_POLL_AGENTS", 2_000)?,
            window: Duration::from_secs(env_usize("BENCH_WINDOW_SECS", 60)? as u64),
            revoke: env_usize("BENCH_REVOKE", 100)?,
        }
    } else {
        Settings {
            agents: 40,
            // The smoke pass runs a worker process too.
            per_process: 30,
            connect_rate: 300,
            round_secs: 900,
            heartbeat_secs: DEFAULT_HEARTBEAT,
            poll_agents: 20,
            window: Duration::from_secs(5),
            revoke: 5,
        }
    };
    ensure!(
        settings.poll_agents <= settings.agents && settings.revoke <= settings.agents,
        "BENCH_POLL_AGENTS and BENCH_REVOKE must not exceed BENCH_AGENTS"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench(settings))
}
