//! A hostile network against real server processes (issue "hold against a hostile network",
//! findings 1 and 2): clients that request the agent binary and stop reading, and floods of
//! idle TCP connections from one address and from many; and the kernel's watch (TCP
//! keepalive) on every agent connection, for peers that vanish without a word. A legitimate
//! client is served throughout.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Db, TestServer};

/// Opens `n` connections from `source` to `port` and holds them: `idle` (TCP only) or
/// `download` (TLS, one request for /downloads/stable/big, never read). Prints `ready`.
const FLOODER: &str = r#"
import resource, socket, ssl, sys, time
mode, port, source, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 64, n + 64))
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
held = []
for _ in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    if mode == "download":
        s = ctx.wrap_socket(s, server_hostname="localhost")
        s.sendall(b"GET /downloads/stable/big HTTP/1.1\r\nHost: localhost\r\n\r\n")
    held.append(s)
print("ready", flush=True)
time.sleep(600)
"#;

struct Flooder(Child);

impl Flooder {
    fn start(mode: &str, port: u16, source: &str, n: usize) -> Self {
        let mut child = Command::new("python3")
            .args([
                "-c",
                FLOODER,
                mode,
                &port.to_string(),
                source,
                &n.to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the flooder did not start");
        Self(child)
    }
}

impl Drop for Flooder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Established connections of the server's `port` with peers at `peer`.
/// `ss`'s lines for the established TCP connections `filter` selects, with their timers.
fn ss(filter: &str) -> String {
    let out = Command::new("ss")
        .args(["-Htno", "state", "established"])
        .arg(format!("( {filter} )"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn established(port: u16, peer: &str) -> usize {
    ss(&format!("sport = :{port} and dst {peer}"))
        .lines()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_stream_and_readers_that_stop_are_cut_off() {
    let server = TestServer::start_configured(Db::Sqlite, "write_stall_timeout_secs = 2", &[], &[]);
    let stable = server.data_dir().join("downloads/stable");
    std::fs::create_dir_all(&stable).unwrap();
    let size = 32 * 1024 * 1024;
    std::fs::write(stable.join("big"), vec![0x5a; size]).unwrap();
    let port = port_of(&server.server.public_url);
    let pid = server.server.pid();
    let before = rss_kib(pid);

    // 30 clients ask for 32 MiB each and read nothing.
    let flood = Flooder::start("download", port, "127.0.0.2", 30);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = rss_kib(pid);
    assert!(
        during < before + 100 * 1024,
        "the server grew from {before} KiB to {during} KiB holding 30 unread downloads"
    );

    // A legitimate client is served, the whole file included.
    let client = server.https_client();
    let health = client
        .get(format!("{}/healthz", server.server.public_url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let download = client
        .get(format!("{}/downloads/stable/big", server.server.public_url))
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), 200);
    assert_eq!(download.bytes().await.unwrap().len(), size);

    // The readers that stopped are cut off once their writes stall for 2 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    while established(port, "127.0.0.2") > 0 {
        assert!(
            Instant::now() < deadline,
            "{} stalled connections still open",
            established(port, "127.0.0.2")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(flood);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_one_address_do_not_starve_the_agent_listener() {
    let server = TestServer::start(Db::Sqlite);
    let (_client, answer, key) = server.enrolled_machine("Shop", "HW-FLOOD").await;
    let cert = answer["certificate"].as_str().unwrap().to_string();
    let url = server.server.agent_url.clone();

    // 1100 idle TCP connections from one address: more than a listener's 1024 slots.
    let flood = Flooder::start("idle", port_of(&url), "127.0.0.2", 1100);
    // The server closes every connection beyond the address's cap as it accepts it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while established(port_of(&url), "127.0.0.2") > 64 {
        assert!(
            Instant::now() < deadline,
            "{} connections held by one address (max_connections_per_address is 64)",
            established(port_of(&url), "127.0.0.2")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for _ in 0..5 {
        let (status, body) = server.secret_status(&url, &cert, &key).await;
        assert_eq!(status, 200, "{body}");
    }
    drop(flood);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_many_addresses_do_not_starve_the_agent_listener() {
    let server = TestServer::start(Db::Sqlite);
    let (_client, answer, key) = server.enrolled_machine("Shop", "HW-MANY").await;
    let cert = answer["certificate"].as_str().unwrap().to_string();
    let url = server.server.agent_url.clone();

    // 20 addresses, 60 idle TCP connections each: within each address's cap of 64, and 1200
    // in all, more than a listener's 1024 connections. None ever starts its TLS handshake.
    let floods: Vec<Flooder> = (10..30)
        .map(|host| Flooder::start("idle", port_of(&url), &format!("127.0.0.{host}"), 60))
        .collect();
    // Well within the 10 s handshake timeout, which would otherwise free the slots.
    for _ in 0..5 {
        let (status, body) = server.secret_status(&url, &cert, &key).await;
        assert_eq!(status, 200, "{body}");
    }
    drop(floods);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kernel_watches_every_agent_connection_for_a_vanished_peer() {
    let server = TestServer::start(Db::Sqlite);
    let (_client, answer, key) = server.enrolled_machine("Shop", "HW-KEEP").await;
    let cert = answer["certificate"].as_str().unwrap().to_string();
    let url = server.server.agent_url.clone();
    let port = port_of(&url);

    // A peer that connected and says nothing: the server's end of it carries TCP keepalive
    // (first probe after 120 s idle), so a peer that vanished without a FIN is found by the
    // kernel; without it, an idle connection has no timer at all.
    let peer = Flooder::start("idle", port, "127.0.0.41", 1);
    let line = ss(&format!("sport = :{port} and dst 127.0.0.41"));
    let timer = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("timer:(keepalive,"))
        .unwrap_or_else(|| panic!("no keepalive timer on the server's end: {line:?}"));
    assert!(
        timer.starts_with("1min") || timer.starts_with("2min,") || !timer.contains("min"),
        "first probe within 120 s: {line:?}"
    );
    // The server's end only: the peer's own socket has none.
    let peer_side = ss(&format!("dport = :{port} and src 127.0.0.41"));
    assert!(
        !peer_side.is_empty() && !peer_side.contains("keepalive"),
        "the flooder set no keepalive of its own: {peer_side:?}"
    );
    let (status, body) = server.secret_status(&url, &cert, &key).await;
    assert_eq!(status, 200, "{body}");
    drop(peer);
}
