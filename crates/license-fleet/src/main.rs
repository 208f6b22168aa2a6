//! `license-fleet`: the fleet simulator's command line.
//!
//! ```text
//! license-fleet enroll --public-url https://licenses.example:8443 --admin-url https://localhost:8445 \
//!     --ca ca.pem --count 20000 --cache machines.jsonl          # admin token in LSA_ADMIN_TOKEN
//! license-fleet run --agent-url https://licenses.example:8444 --ca ca.pem --cache machines.jsonl \
//!     --mode watch --duration 300s --mix online=95,flapping=5 --server-pid 1234 [--json]
//! ```
//!
//! `enroll` adds machines to the cache until it holds `--count` (enrolled through the real
//! bootstrap); `run` starts one simulated agent per cached machine (the first `--count`) for
//! `--duration`, then prints what it measured, with the server processes' CPU time and memory
//! when their pids are given.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use license_fleet::http::Target;
use license_fleet::{process, run_fleet, Enroller, FleetConfig, IdentityCache, Mode, ProfileMix};

#[derive(Debug, Parser)]
#[command(
    name = "license-fleet",
    version,
    about = "Fleet simulator: simulated agents against real license servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll machines through the real bootstrap until the cache holds COUNT.
    Enroll {
        /// The server's public listener (bootstrap).
        #[arg(long)]
        public_url: String,
        /// The server's admin listener (install tokens).
        #[arg(long)]
        admin_url: String,
        /// An admin API token (role admin).
        #[arg(long, env = "LSA_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: String,
        /// The server's CA certificate (PEM).
        #[arg(long)]
        ca: std::path::PathBuf,
        #[arg(long)]
        count: usize,
        /// The identity cache (JSON lines, written 0600).
        #[arg(long)]
        cache: std::path::PathBuf,
        /// Enrollments in flight at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long)]
        json: bool,
    },
    /// Run one simulated agent per cached machine.
    Run {
        /// The agent listener or the load balancer in front of it (repeat: round robin).
        #[arg(long = "agent-url", required = true)]
        agent_urls: Vec<String>,
        #[arg(long)]
        ca: std::path::PathBuf,
        #[arg(long)]
        cache: std::path::PathBuf,
        /// The first COUNT machines of the cache (default: all), after SKIP.
        #[arg(long)]
        count: Option<usize>,
        /// Leave out the first SKIP machines of the cache: one process holds a connection per
        /// agent under its open-files limit, so a larger fleet is split over several processes.
        #[arg(long, default_value_t = 0)]
        skip: usize,
        /// `watch` (kept HTTP/2 connection, pushed changes) or `poll` (a new connection per round).
        #[arg(long, default_value = "watch")]
        mode: Mode,
        #[arg(long, default_value = "60s", value_parser = duration)]
        duration: Duration,
        #[arg(long, default_value = "60s", value_parser = duration)]
        poll_interval: Duration,
        #[arg(long, default_value = "3600s", value_parser = duration)]
        watch_poll_interval: Duration,
        /// Rotate on this schedule too (default: only when the server asks).
        #[arg(long, value_parser = duration)]
        rotation_interval: Option<Duration>,
        /// Renew each machine's certificate on this schedule (a new key; the renewed identity
        /// is appended to the cache, which reads a machine's last). Default: never.
        #[arg(long, value_parser = duration)]
        renew_interval: Option<Duration>,
        /// Agents started per second while the fleet ramps up.
        #[arg(long, default_value_t = 500)]
        connect_rate: u32,
        /// How often a flapping agent drops its connection.
        #[arg(long, default_value = "30s", value_parser = duration)]
        flap_every: Duration,
        /// `online=90,flapping=5,offline=3,revoked=2` (percent; revoked machines must have
        /// been revoked on the server: they are the first ones of the cache).
        #[arg(long, default_value = "online=100")]
        mix: ProfileMix,
        /// Server processes to measure (CPU time, resident memory).
        #[arg(long = "server-pid")]
        server_pids: Vec<u32>,
        #[arg(long)]
        json: bool,
    },
}

/// `30s`, `5m`, `2h`, `500ms`, or plain seconds.
fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |at| s.split_at(at));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration such as 30s, 5m, 2h or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        other => Err(format!("{s:?}: unknown unit {other:?} (ms, s, m, h)")),
    }
}

/// `https://host:port` as a target checked against `ca_pem`.
async fn target(url: &str, ca_pem: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("{url}: expected https://host:port"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, _) = authority
        .rsplit_once(':')
        .ok_or_else(|| format!("{url}: the port is missing"))?;
    let addr: SocketAddr = tokio::net::lookup_host(authority)
        .await
        .map_err(|e| format!("{url}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url}: no address"))?;
    Target::new(addr, host.trim_matches(['[', ']']), ca_pem).map_err(|e| format!("{url}: {e}"))
}

fn read(path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

async fn main_inner(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Enroll {
            public_url,
            admin_url,
            admin_token,
            ca,
            count,
            cache,
            concurrency,
            json,
        } => {
            let ca = read(&ca)?;
            let cache = IdentityCache::new(cache);
            let held = cache.load().map_err(|e| e.to_string())?.len();
            let enroller = Enroller {
                public: target(&public_url, &ca).await?,
                admin: target(&admin_url, &ca).await?,
                admin_token,
            };
            let started = Instant::now();
            let missing = count.saturating_sub(held);
            if missing > 0 {
                let prefix = format!("{:08x}", rand::random::<u32>());
                enroller
                    .enroll_many(&prefix, missing, concurrency, &cache)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            let elapsed = started.elapsed();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"cache": cache.path(), "held": held, "enrolled": missing,
                                       "seconds": elapsed.as_secs_f64()})
                );
            } else {
                println!(
                    "{} held, {missing} enrolled in {:.1} s: {}",
                    held,
                    elapsed.as_secs_f64(),
                    cache.path().display()
                );
            }
            Ok(())
        }
        Command::Run {
            agent_urls,
            ca,
            cache,
            count,
            skip,
            mode,
            duration,
            poll_interval,
            watch_poll_interval,
            rotation_interval,
            renew_interval,
            connect_rate,
            flap_every,
            mix,
            server_pids,
            json,
        } => {
            let ca = read(&ca)?;
            let cache = IdentityCache::new(cache);
            let mut identities = cache.load().map_err(|e| e.to_string())?;
            if skip > identities.len() {
                return Err(format!(
                    "--skip {skip}: the cache holds {} machines",
                    identities.len()
                ));
            }
            identities.drain(..skip);
            if let Some(count) = count {
                if count > identities.len() {
                    return Err(format!(
                        "--count {count}: the cache holds {} machines after --skip {skip}; enroll more first",
                        identities.len()
                    ));
                }
                identities.truncate(count);
            }
            let machines = identities.len();
            let mut targets = Vec::new();
            for url in &agent_urls {
                targets.push(target(url, &ca).await?);
            }
            let cpu_before = process::total_cpu(&server_pids).map_err(|e| e.to_string())?;
            let rss_before = process::total_rss(&server_pids).map_err(|e| e.to_string())?;
            let started = Instant::now();
            let fleet = run_fleet(
                identities,
                FleetConfig {
                    targets,
                    mode,
                    poll_interval,
                    watch_poll_interval,
                    rotation_interval,
                    renew_interval,
                    cache: Some(cache),
                    connect_rate,
                    flap_every,
                    mix,
                },
            );
            tokio::time::sleep(duration).await;
            let connected = fleet.connected();
            let rss_after = process::total_rss(&server_pids).map_err(|e| e.to_string())?;
            let cpu = process::total_cpu(&server_pids).map_err(|e| e.to_string())? - cpu_before;
            let elapsed = started.elapsed();
            let report = fleet.stop().await.report();
            let machine_minutes = machines as f64 * elapsed.as_secs_f64() / 60.0;
            let cpu_ms_per_machine_minute = cpu.as_secs_f64() * 1000.0 / machine_minutes.max(1e-9);
            let rss_per_connected = if connected > 0 {
                rss_after.saturating_sub(rss_before) as f64 / connected as f64
            } else {
                0.0
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "machines": machines, "mode": mode, "seconds": elapsed.as_secs_f64(),
                        "connected_at_end": connected,
                        "server_cpu_seconds": cpu.as_secs_f64(),
                        "server_cpu_ms_per_machine_minute": cpu_ms_per_machine_minute,
                        "server_rss_bytes": rss_after,
                        "server_rss_bytes_per_connected_machine": rss_per_connected,
                        "report": report,
                    })
                );
            } else {
                println!(
                    "{machines} machines, {mode:?} mode, {:.0} s; {connected} watch streams open at the end",
                    elapsed.as_secs_f64()
                );
                if !server_pids.is_empty() {
                    println!(
                        "server CPU {:.2} s: {cpu_ms_per_machine_minute:.3} ms per machine-minute; RSS {:.1} MiB ({:.1} KiB more per connected machine)",
                        cpu.as_secs_f64(),
                        rss_after as f64 / 1_048_576.0,
                        rss_per_connected / 1024.0
                    );
                }
                print!("{report}");
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("license-fleet: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(main_inner(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("license-fleet: {e}");
            ExitCode::from(1)
        }
    }
}
