//! Validations per second over the Windows agent's named pipe, under wine, against the same
//! client on a plain named-pipe echo (`pipe_echo.exe`, the floor) in the same run; and the
//! installer's time from start to a running agent.
//!
//! ```sh
//! cargo build --workspace --bins && cargo bench -p license-agent --bench windows_pipe
//! ```
//! A real Linux server; the installer made by `admin token create --windows-installer` from the
//! release build of `scripts/windows/build.sh` (`LSA_WINDOWS_PROFILE=dev` for the unoptimized
//! one); `pipe_load.exe` (license-client's example: persistent connections through the client
//! library, a fresh nonce each) runs against the echo, the agent, the echo again and the agent
//! again, each figure the mean of its two runs.
//!
//! Environment: `BENCH_CLIENTS` (default 4), `BENCH_REQUESTS` per client (default 2000).
#![allow(clippy::unwrap_used, dead_code)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::wine::{build_artefacts, windows_target_dir, Running, Wine};
use common::{wait_until, Server};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `pipe_load` once; validations per second.
fn load(wine: &Wine, dist: &Path, pipe: &str, token: &str, clients: usize, requests: usize) -> f64 {
    let (code, out, err) = wine.run(
        &dist.join("pipe_load.exe"),
        &[pipe, token, &clients.to_string(), &requests.to_string()],
    );
    assert_eq!(code, Some(0), "pipe_load on {pipe}: {out}{err}");
    assert!(
        out.contains(&format!("valid={}", clients * requests)),
        "{out}"
    );
    out.split_whitespace()
        .find_map(|w| w.strip_prefix("per_second="))
        .and_then(|n| n.parse().ok())
        .unwrap()
}

fn main() {
    if std::env::var_os("LSA_WINDOWS_PROFILE").is_none() {
        std::env::set_var("LSA_WINDOWS_PROFILE", "release");
    }
    let (clients, requests) = (env_or("BENCH_CLIENTS", 4), env_or("BENCH_REQUESTS", 2000));
    let target_dir = windows_target_dir();
    let dist = build_artefacts(&target_dir);
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(root.path(), 86_400, 3600);
    let client = server.new_client("bench");
    let installer = root.path().join("installer.exe");
    server.admin(&[
        "token",
        "create",
        "--client",
        &client,
        "--windows-installer",
        installer.to_str().unwrap(),
        "--windows-stub",
        dist.join("license-agent.exe").to_str().unwrap(),
    ]);
    let wine = Wine::new(&target_dir);
    let _keepalive = wine.start(&dist.join("license-agent.exe"), &["--version"]);

    let started = Instant::now();
    let (code, out, err) = wine.run(&installer, &[]);
    let install_time = started.elapsed();
    assert_eq!(code, Some(0), "installer: {out}{err}");
    let machine = out
        .lines()
        .find_map(|l| l.strip_prefix("enrolled as machine "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    let license = server.issue_license(&machine, "pos", &[]);
    let agent = dist.join("license-agent.exe");
    for action in ["stop", "start"] {
        let (code, out, err) = wine.run(&agent, &["service", action]);
        assert_eq!(code, Some(0), "service {action}: {out}{err}");
    }
    let token_file = wine.drive_c(&format!(
        "ProgramData/LicenseAgent/state/tokens/{license}.token"
    ));
    wait_until("the license token", Duration::from_secs(60), || {
        token_file.exists()
    });
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();

    let echo_pipe = r"\\.\pipe\license-agent-bench-echo";
    let mut echo = wine
        .command(&dist.join("pipe_echo.exe"), &[echo_pipe])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::BufRead as _;
        let mut line = String::new();
        std::io::BufReader::new(echo.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("listening"), "{line}");
    }
    let _echo = Running(echo);

    let agent_pipe = r"\\.\pipe\license-agent";
    let mut echo_rates = Vec::new();
    let mut agent_rates = Vec::new();
    for _ in 0..2 {
        echo_rates.push(load(&wine, &dist, echo_pipe, &token, clients, requests));
        agent_rates.push(load(&wine, &dist, agent_pipe, &token, clients, requests));
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (echo, agent) = (mean(&echo_rates), mean(&agent_rates));
    println!(
        "windows pipe under wine ({} build), {clients} clients x {requests} requests:",
        std::env::var("LSA_WINDOWS_PROFILE").unwrap()
    );
    println!("  echo   {echo:>8.0} validations/s  (runs {echo_rates:.0?})");
    println!(
        "  agent  {agent:>8.0} validations/s  (runs {agent_rates:.0?})  {:.3}x echo",
        agent / echo
    );
    println!(
        "installer: start to running agent {:.2} s",
        install_time.as_secs_f64()
    );
}
