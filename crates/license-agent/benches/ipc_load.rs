//! Load generator for the validation socket (issue: secret lifecycle, performance).
//!
//! N clients on persistent connections send framed `validate_license` requests (fresh nonce
//! each) to a real `license-agent run`, and the same load goes, in the same run, to a trivial
//! echo server on a Unix socket with identical framing (a separate process, the floor). It
//! prints validations per second with p50/p99 latency for repeated (cached) and distinct
//! (uncached) tokens, and each figure's ratio to the echo floor.
//!
//! ```sh
//! cargo build --release --workspace --bins && cargo bench -p license-agent --bench ipc_load
//! ```
//! A second agent with `danger_unaudited_validations` runs the same load in the same run, so
//! the cost of the durable audit (each answer waits for its record's fsync, batched across
//! concurrent requests) is reported as a ratio.
//!
//! Environment: `BENCH_CLIENTS` (default 4), `BENCH_REQUESTS` per client (default 5000).
//! `BENCH_BASELINE_AGENT=/path/to/license-agent` (an older build) runs the same audited load on
//! that binary too, in the same run (this build, the old one, the old one, this build; each
//! figure the mean of its two runs), and reports this build's figures as ratios to it.
#![allow(clippy::unwrap_used, dead_code)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{wait_until, Agent, Server};
use license_protocol::rotation::Nonce;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `--echo-server PATH`: the floor. Echoes each frame back, on a multi-threaded runtime like
/// the agent's.
fn echo_server(path: &Path) -> ! {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        println!("echo ready");
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut header = [0u8; 4];
                while s.read_exact(&mut header).await.is_ok() {
                    let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
                    if s.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let mut frame = header.to_vec();
                    frame.extend_from_slice(&body);
                    if s.write_all(&frame).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    std::process::exit(0)
}

/// One client: a persistent connection, `tokens.len()` requests; returns latencies in µs.
fn client(socket: PathBuf, tokens: Vec<String>) -> Vec<u64> {
    let mut s = UnixStream::connect(&socket).unwrap();
    let mut latencies = Vec::with_capacity(tokens.len());
    let mut header = [0u8; 4];
    for token in tokens {
        let nonce = Nonce::random().to_string();
        let start = Instant::now();
        let req =
            serde_json::json!({"op": "validate_license", "license_token": token, "nonce": nonce});
        let payload = serde_json::to_vec(&req).unwrap();
        s.write_all(&[(payload.len() as u32).to_be_bytes().as_slice(), &payload].concat())
            .unwrap();
        s.read_exact(&mut header).unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
        s.read_exact(&mut body).unwrap();
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
        // Both the agent and the echo answer carry the nonce; the agent must say valid.
        assert_eq!(answer["nonce"], nonce.as_str());
        assert!(
            answer["valid"] == true || answer["op"] == "validate_license",
            "{answer}"
        );
        latencies.push(start.elapsed().as_micros() as u64);
    }
    latencies
}

struct Figures {
    rate: f64,
    p50: f64,
    p99: f64,
}

impl Figures {
    /// Two measurements of the same thing: mean rate and median, the worse p99.
    fn mean(&self, other: &Figures) -> Figures {
        Figures {
            rate: (self.rate + other.rate) / 2.0,
            p50: (self.p50 + other.p50) / 2.0,
            p99: self.p99.max(other.p99),
        }
    }
}

fn run(socket: &Path, per_client: Vec<Vec<String>>) -> Figures {
    let start = Instant::now();
    let handles: Vec<_> = per_client
        .into_iter()
        .map(|t| {
            let socket = socket.to_path_buf();
            std::thread::spawn(move || client(socket, t))
        })
        .collect();
    let mut all: Vec<u64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64 / 1000.0;
    Figures {
        rate: all.len() as f64 / elapsed,
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--echo-server") {
        echo_server(Path::new(&args[i + 1]));
    }
    let bench_mode = args.iter().any(|a| a == "--bench");
    let clients = env_or("BENCH_CLIENTS", 4);
    let requests = env_or("BENCH_REQUESTS", if bench_mode { 5000 } else { 50 });

    let root = tempfile::tempdir().unwrap();
    let server = Server::start(root.path(), 3600, 3600);
    let (agent, token) = bench_agent(&server, root.path(), "bench", false, None);
    // The same, with validations not audited: what the durable audit costs.
    let (bare, bare_token) = bench_agent(&server, root.path(), "bench-unaudited", true, None);
    // The same audited load on an older build, when one is given.
    let baseline = std::env::var_os("BENCH_BASELINE_AGENT").map(|path| {
        let (old, old_token) = bench_agent(
            &server,
            root.path(),
            "bench-baseline",
            false,
            Some(Path::new(&path)),
        );
        let old_distinct = mint(&server, &old, &old_token, clients * requests);
        (old, old_token, old_distinct)
    });

    // Distinct tokens, minted with the server's own keys (a fixture: the agent cannot tell).
    let distinct = mint(&server, &agent, &token, clients * requests);
    let bare_distinct = mint(&server, &bare, &bare_token, clients * requests);

    let echo_socket = root.path().join("echo.sock");
    let mut echo: Child = Command::new(std::env::current_exe().unwrap())
        .arg("--echo-server")
        .arg(&echo_socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("echo server", Duration::from_secs(10), || {
        echo_socket.exists()
    });

    let same = |n: usize| vec![vec![token.clone(); n]; clients];
    // Warm-up, untimed.
    run(&echo_socket, vec![vec![token.clone(); 200]; clients]);
    run(&agent.socket, vec![vec![token.clone(); 200]; clients]);
    run(&bare.socket, vec![vec![bare_token.clone(); 200]; clients]);

    let floor = run(&echo_socket, same(requests));
    let bare_cached = run(
        &bare.socket,
        vec![vec![bare_token.clone(); requests]; clients],
    );
    let bare_uncached = run(
        &bare.socket,
        bare_distinct
            .chunks(requests)
            .map(<[String]>::to_vec)
            .collect(),
    );
    // The audited figures of one agent: (cached, uncached). Distinct tokens are used once
    // each (a second pass would hit the cache), so a repeated measurement gets the halves.
    let audited = |socket: &Path, token: &str, distinct: &[String]| {
        let cached = run(socket, vec![vec![token.to_string(); requests]; clients]);
        let uncached = run(
            socket,
            distinct
                .chunks(distinct.len() / clients)
                .map(<[String]>::to_vec)
                .collect(),
        );
        (cached, uncached)
    };
    let ((cached, uncached), old_figures) = match &baseline {
        None => (audited(&agent.socket, &token, &distinct), None),
        Some((old, old_token, old_distinct)) => {
            // Against an older build, in the order this, old, old, this: a disk or machine
            // that drifts during the run weighs on both builds alike.
            run(&old.socket, vec![vec![old_token.clone(); 200]; clients]);
            let (new_half, old_half) = (distinct.len() / 2, old_distinct.len() / 2);
            let new_1 = audited(&agent.socket, &token, &distinct[..new_half]);
            let old_1 = audited(&old.socket, old_token, &old_distinct[..old_half]);
            let old_2 = audited(&old.socket, old_token, &old_distinct[old_half..]);
            let new_2 = audited(&agent.socket, &token, &distinct[new_half..]);
            (
                (new_1.0.mean(&new_2.0), new_1.1.mean(&new_2.1)),
                Some((old_1.0.mean(&old_2.0), old_1.1.mean(&old_2.1))),
            )
        }
    };
    let floor_after = run(&echo_socket, same(requests));
    let _ = echo.kill();
    let _ = echo.wait();

    let base = (floor.rate + floor_after.rate) / 2.0;
    println!("validation socket load: {clients} clients on persistent connections, {requests} requests each, 2 cores shared by clients and servers");
    println!(
        "{:<34} {:>10} {:>9} {:>9} {:>9}",
        "scenario", "req/s", "p50 ms", "p99 ms", "vs echo"
    );
    for (name, f) in [
        ("echo floor (before)", &floor),
        ("no audit, repeated token (cached)", &bare_cached),
        ("no audit, distinct tokens", &bare_uncached),
        ("audited, repeated token (cached)", &cached),
        ("audited, distinct tokens", &uncached),
        ("echo floor (after)", &floor_after),
    ] {
        println!(
            "{name:<34} {:>10.0} {:>9.3} {:>9.3} {:>9.3}",
            f.rate,
            f.p50,
            f.p99,
            f.rate / base
        );
    }
    if let Some((old_cached, old_uncached)) = &old_figures {
        for (name, f) in [
            ("baseline build, cached", old_cached),
            ("baseline build, distinct tokens", old_uncached),
        ] {
            println!(
                "{name:<34} {:>10.0} {:>9.3} {:>9.3} {:>9.3}",
                f.rate,
                f.p50,
                f.p99,
                f.rate / base
            );
        }
        println!(
            "this build vs the baseline build (audited, each measured twice: this, old, old, this): cached {:.2}x, uncached {:.2}x",
            cached.rate / old_cached.rate,
            uncached.rate / old_uncached.rate
        );
    }
    println!("echo floor = mean of the two echo runs = {base:.0} req/s; every agent answer was checked valid with its nonce echoed");
    println!(
        "durable audit (record fsynced before each answer, group commit): cached {:.2}x and uncached {:.2}x the unaudited throughput",
        cached.rate / bare_cached.rate,
        uncached.rate / bare_uncached.rate
    );
}

/// An enrolled, running agent (`binary`: another build's) with a license, and its token.
fn bench_agent(
    server: &Server,
    root: &Path,
    name: &str,
    unaudited: bool,
    binary: Option<&Path>,
) -> (Agent, String) {
    let mut agent = Agent::enroll(server, root, name, 3600, |t| {
        t["ipc"]["replay_window"] = toml::Value::Integer(600);
        if unaudited {
            let agent = t["agent"].as_table_mut().unwrap();
            agent.insert(
                "danger_unaudited_validations".into(),
                toml::Value::Boolean(true),
            );
        }
    });
    let license = server.issue_license(&agent.machine_id, "pos.sale,pos.refund", &[]);
    match binary {
        Some(binary) => agent.start_binary(binary, &[], &[]),
        None => agent.start(&[]),
    }
    let mut token = None;
    wait_until(&format!("{name}'s token"), Duration::from_secs(60), || {
        token = agent.token(&license);
        token.is_some()
    });
    (agent, token.unwrap())
}

/// `n` valid tokens for distinct licenses of the agent's machine under its newest version.
fn mint(server: &Server, agent: &Agent, token: &str, n: usize) -> Vec<String> {
    use base64::Engine as _;
    // The current license key of the server's key set (license-keys.json).
    let set: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(server.dir.join("license-keys.json")).unwrap(),
    )
    .unwrap();
    let current = set["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["state"] == "current")
        .unwrap();
    let seed: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(current["private_key"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
    let machine: license_protocol::identity::MachineId = agent.machine_id.parse().unwrap();
    let (header, _) = license_protocol::token::decode(token).unwrap();
    let master = server.master_key();
    let out = Command::new("sqlite3")
        .arg(server.dir.join("license.db"))
        .arg(format!(
            "SELECT hex(secret_enc) FROM secrets WHERE machine_id = '{}' AND version = {}",
            agent.machine_id, header.secret_version
        ))
        .output()
        .unwrap();
    let blob = hex::decode(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    let mut aad = machine.0.as_bytes().to_vec();
    aad.extend_from_slice(&header.secret_version.to_be_bytes());
    let secret = license_protocol::secret::decrypt_at_rest(&master, &blob, &aad).unwrap();
    let claims = license_protocol::token::open(
        token,
        &machine,
        |_| Some(secret.clone()),
        |_| Ok(vec![signing.verifying_key()].into()),
    )
    .unwrap();
    (0..n)
        .map(|_| {
            let mut c = claims.clone();
            c.license_id = uuid::Uuid::new_v4();
            // In the format the server wrote the agent's own token in (an older agent reads v1).
            if header.key_id.is_some() {
                license_protocol::token::seal(&c, &secret, header.secret_version, &signing)
            } else {
                license_protocol::token::seal_v1(&c, &secret, header.secret_version, &signing)
            }
        })
        .collect()
}
