//! Changes pushed to connected agents, and storms shed: real server processes (two replicas
//! on PostgreSQL, or one on SQLite), machines enrolled through the real bootstrap, each
//! simulated agent on its own mTLS HTTP/2 connection holding `GET /api/v1/watch`.
//!
//! - A change for every machine made by `admin` (another process) and one revocation per
//!   machine made through either replica's admin API reach every agent, whichever replica it
//!   is connected to, within a second at p99; a revoked machine's stream ends and its next
//!   request is refused.
//! - A reconnecting agent replays what it missed from its cursor, on the other replica; a
//!   machine holds at most 4 streams on one process.
//! - A storm of agents all asking at once on a server allowed 4 requests at a time is answered
//!   503 `server_busy` with `Retry-After`, and every agent that comes back after it is served.
//! - `/metrics` counts each replica's open streams and every request shed.
//! - On PostgreSQL the change feed listens for new audit rows (`LISTEN lsa_audit`): quiet, it
//!   hardly reads; a change by the admin CLI is heard within a second, also after its
//!   listening connection was killed. On SQLite it reads every `watch_feed_interval_ms`. A
//!   stream's `hello` names its ping interval.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{tls_config, Db, ServerProcess, TestServer};
use license_protocol::watch::{ChangeKind, EventReader, EventType, WatchEvent};
use serde_json::{json, Value};

/// One enrolled machine, as the simulated agent holds it.
#[derive(Clone)]
struct Machine {
    id: String,
    http: reqwest::Client,
}

/// An mTLS client speaking HTTP/2 (ALPN) with the machine's certificate.
fn h2_client(server: &TestServer, cert: &str, key: &str) -> reqwest::Client {
    let mut config = tls_config(&server.ca_pem(), Some((cert, key)), true);
    config.alpn_protocols = vec![b"h2".to_vec()];
    reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// One sample of `GET /metrics` on the admin listener at `admin_url`.
async fn metric(server: &TestServer, admin_url: &str, token: &str, name: &str) -> f64 {
    let text = server
        .https_client()
        .get(format!("{admin_url}/metrics"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    common::metric_sample(&text, name)
}

fn admin_token(server: &TestServer) -> String {
    server.admin_json(&["api-token", "create", "--name", "fleet", "--role", "admin"])["token"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `n` machines of one client, enrolled through the public bootstrap, 16 at a time.
async fn enroll(server: &Arc<TestServer>, n: usize) -> Vec<Machine> {
    let client = server.new_client("fleet");
    let admin = admin_token(server);
    let http = server.https_client();
    let gate = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (server, client, admin, http, gate) = (
            server.clone(),
            client.clone(),
            admin.clone(),
            http.clone(),
            gate.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _turn = gate.acquire().await.unwrap();
            let token: Value = http
                .post(format!(
                    "{}/api/admin/install-tokens",
                    server.server.admin_url
                ))
                .bearer_auth(&admin)
                .json(&json!({"client_id": client}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let token = token["token"].as_str().unwrap();
            let (answer, key) = server.enroll_http(token, &format!("hw-{i:05}")).await;
            let cert = answer["certificate"].as_str().unwrap();
            Machine {
                id: answer["machine_id"].as_str().unwrap().to_string(),
                http: h2_client(&server, cert, &key),
            }
        }));
    }
    let mut machines = Vec::new();
    for task in tasks {
        machines.push(task.await.unwrap());
    }
    machines
}

/// An open watch stream, read event by event.
struct Watch {
    response: reqwest::Response,
    reader: EventReader,
    ready: std::collections::VecDeque<WatchEvent>,
}

impl Watch {
    async fn open(machine: &Machine, agent_url: &str, since: Option<i64>) -> Self {
        let mut request = machine.http.get(format!("{agent_url}/api/v1/watch"));
        if let Some(since) = since {
            request = request.query(&[("since", since)]);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), reqwest::Version::HTTP_2, "HTTP/2");
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "server-sent events"
        );
        Self {
            response,
            reader: EventReader::new(),
            ready: Default::default(),
        }
    }

    /// The next event, `None` when the server ended the stream.
    async fn next(&mut self) -> Option<WatchEvent> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(event);
            }
            let chunk = tokio::time::timeout(Duration::from_secs(60), self.response.chunk())
                .await
                .expect("an event or a ping within a minute")
                .unwrap()?;
            self.ready.extend(self.reader.push(&chunk).unwrap());
        }
    }

    /// The next `change` event and when it arrived; pings are skipped.
    async fn next_change(&mut self) -> Option<(WatchEvent, Instant)> {
        loop {
            let event = self.next().await?;
            if event.event == EventType::Change {
                return Some((event, Instant::now()));
            }
        }
    }
}

fn p99(mut latencies: Vec<Duration>) -> Duration {
    latencies.sort();
    latencies[(latencies.len() * 99).div_ceil(100) - 1]
}

const FLEET_CONFIG: &str = "bootstrap_rate_per_minute = 100000\nmax_connections_per_address = 0";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_reach_every_connected_agent_within_a_second_on_both_replicas() {
    const AGENTS: usize = 100;
    let server = Arc::new(TestServer::start_configured(
        Db::Postgres,
        FLEET_CONFIG,
        &[],
        &[],
    ));
    let replica = ServerProcess::spawn(&server.data_dir(), &[]);
    let machines = enroll(&server, AGENTS).await;
    let urls = [server.server.agent_url.clone(), replica.agent_url.clone()];

    // Every agent opens its stream, half on each replica, and hears `hello`.
    let mut watches = Vec::new();
    for (i, machine) in machines.iter().enumerate() {
        let mut watch = Watch::open(machine, &urls[i % 2], None).await;
        let hello = watch.next().await.unwrap();
        assert_eq!(hello.event, EventType::Hello);
        watches.push(watch);
    }

    // Each replica counts the streams it holds.
    let admin = admin_token(&server);
    let admin_urls = [server.server.admin_url.clone(), replica.admin_url.clone()];
    for url in &admin_urls {
        let open = metric(&server, url, &admin, "license_server_watch_streams").await;
        assert_eq!(open, (AGENTS / 2) as f64, "streams open on {url}");
    }

    // 1. A change for every machine, made by another process (`admin`, the CLI).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut readers = Vec::new();
    for (i, mut watch) in watches.into_iter().enumerate() {
        let tx = tx.clone();
        readers.push(tokio::spawn(async move {
            let (event, at) = watch.next_change().await.unwrap();
            tx.send((i, event, at)).unwrap();
            watch
        }));
    }
    let made = Instant::now();
    let rotated = server.admin_json(&["keys", "rotate-license"]);
    assert!(rotated["new_key_id"].is_string(), "{rotated}");
    let mut latencies = Vec::new();
    for _ in 0..AGENTS {
        let (_, event, at) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("every agent hears of the key rotation")
            .unwrap();
        assert_eq!(event.kind, Some(ChangeKind::KeysChanged));
        assert_eq!(event.spread_secs, 60, "a change for everyone is spread");
        latencies.push(at - made);
    }
    let keys_p99 = p99(latencies);
    println!("key rotation (admin CLI) reached {AGENTS} agents: p99 {keys_p99:?}");
    assert!(keys_p99 <= Duration::from_secs(1), "p99 {keys_p99:?}");
    let mut watches = Vec::new();
    for reader in readers {
        watches.push(reader.await.unwrap());
    }

    // 2. Every machine revoked, one at a time through either replica's admin API: each agent
    // hears of its own revocation, then its stream ends.
    let http = server.https_client();
    let mut readers = Vec::new();
    for mut watch in watches {
        readers.push(tokio::spawn(async move {
            let change = watch.next_change().await;
            let ended = watch.next().await.is_none();
            (change, ended)
        }));
    }
    let mut revoked_at = Vec::new();
    for (i, machine) in machines.iter().enumerate() {
        revoked_at.push(Instant::now());
        let r = http
            .post(format!(
                "{}/api/admin/machines/{}/revoke",
                admin_urls[(i / 2) % 2],
                machine.id
            ))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let mut latencies = Vec::new();
    for (i, reader) in readers.into_iter().enumerate() {
        let (change, ended) = reader.await.unwrap();
        let (event, at) = change.expect("the revocation arrives");
        assert_eq!(event.kind, Some(ChangeKind::MachineRevoked));
        assert_eq!(
            event.spread_secs, 0,
            "a machine's own change is not delayed"
        );
        assert!(ended, "a revoked machine's stream ends");
        latencies.push(at - revoked_at[i]);
    }
    let revoke_p99 = p99(latencies);
    println!("revocations reached {AGENTS} agents across 2 replicas: p99 {revoke_p99:?}");
    assert!(revoke_p99 <= Duration::from_secs(1), "p99 {revoke_p99:?}");

    // The revoked machine cannot open a stream again, on either replica.
    for url in &urls {
        let r = machines[0]
            .http
            .get(format!("{url}/api/v1/watch"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "machine_revoked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reconnecting_agent_gets_what_it_missed_from_its_cursor_on_another_replica() {
    let server = Arc::new(TestServer::start_configured(
        Db::Postgres,
        FLEET_CONFIG,
        &[],
        &[],
    ));
    let replica = ServerProcess::spawn(&server.data_dir(), &[]);
    let machines = enroll(&server, 2).await;
    let (a, b) = (&machines[0], &machines[1]);

    // The cursor comes with the secret status, before anything is read.
    let status: Value = a
        .http
        .get(format!("{}/api/v1/secret-status", server.server.agent_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let cursor = status["watch_cursor"].as_i64().expect("watch_cursor");

    // While `a` is not connected: a rotation is requested for it and one for `b`.
    for id in [&a.id, &b.id] {
        server.admin_json(&["machine", "rotate", id]);
    }
    // Within the feed's read interval every replica has seen them.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut watch = Watch::open(a, &replica.agent_url, Some(cursor)).await;
    assert_eq!(watch.next().await.unwrap().event, EventType::Hello);
    let missed = watch.next().await.unwrap();
    assert_eq!(missed.event, EventType::Change);
    assert_eq!(missed.kind, Some(ChangeKind::RotationRequested));
    assert!(missed.cursor > cursor);

    // From the new cursor nothing is replayed; an unknown old one asks for a resync.
    let mut again = Watch::open(a, &replica.agent_url, Some(missed.cursor)).await;
    assert_eq!(again.next().await.unwrap().event, EventType::Hello);
    let mut stale = Watch::open(a, &replica.agent_url, Some(-5)).await;
    assert_eq!(stale.next().await.unwrap().event, EventType::Hello);
    let resync = stale.next().await.unwrap();
    assert_eq!(resync.event, EventType::Resync);
    assert_eq!(resync.spread_secs, 60);

    // Garbage for a cursor is a named refusal.
    let r = a
        .http
        .get(format!(
            "{}/api/v1/watch?since=yesterday",
            replica.agent_url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("since"),
        "{body}"
    );

    // `a` holds three streams on the replica; a fourth is its last.
    let fourth = Watch::open(a, &replica.agent_url, None).await;
    let open = |m: &Machine, url: &str| {
        let request = m.http.get(format!("{url}/api/v1/watch"));
        async move { request.send().await.unwrap() }
    };
    let refused = open(a, &replica.agent_url).await;
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited", "{body}");
    // Another machine, and the same machine on the other replica, are not held back.
    assert_eq!(open(b, &replica.agent_url).await.status(), 200);
    assert_eq!(open(a, &server.server.agent_url).await.status(), 200);
    // A stream that ends gives its place back.
    drop(fourth);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = open(a, &replica.agent_url).await;
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 429);
        assert!(Instant::now() < deadline, "the place was never given back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((watch, again, stale));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_storm_is_shed_with_retry_after_and_drains() {
    const AGENTS: usize = 1000;
    let server = Arc::new(TestServer::start_configured(
        Db::Sqlite,
        &format!("{FLEET_CONFIG}\nagent_max_inflight = 4\nagent_retry_after_secs = 4"),
        &[],
        &[],
    ));
    let machines = enroll(&server, AGENTS).await;
    let url = server.server.agent_url.clone();
    // All at once (as after an outage): each asks for its status until it is served,
    // waiting what `Retry-After` says between attempts.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for machine in machines {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut shed = Vec::new();
            loop {
                let sent = machine
                    .http
                    .get(format!("{url}/api/v1/secret-status"))
                    .send()
                    .await;
                // A handshake cut off for newer ones (the listener bounds handshakes in
                // progress) is retried as an agent retries an unreachable server.
                let Ok(r) = sent else {
                    let wait = 1_000 + rand::random::<u64>() % 2_000;
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    continue;
                };
                match r.status().as_u16() {
                    200 => return shed,
                    503 => {
                        let retry: u64 = r.headers()["retry-after"]
                            .to_str()
                            .unwrap()
                            .parse()
                            .unwrap();
                        let body: Value = r.json().await.unwrap();
                        assert_eq!(body["error"], "server_busy");
                        shed.push(retry);
                        tokio::time::sleep(Duration::from_secs(retry)).await;
                    }
                    other => panic!("a storm answer must be 200 or 503, got {other}"),
                }
            }
        }));
    }
    let mut shed = Vec::new();
    for task in tasks {
        shed.extend(
            tokio::time::timeout(Duration::from_secs(120), task)
                .await
                .expect("the storm drains")
                .unwrap(),
        );
    }
    println!(
        "{AGENTS} agents served in {:?}; {} answers shed",
        started.elapsed(),
        shed.len()
    );
    assert!(!shed.is_empty(), "4 places cannot take {AGENTS} at once");
    assert!(
        shed.iter().all(|s| (2..=4).contains(s)),
        "Retry-After in [2, 4]"
    );
    let distinct: std::collections::BTreeSet<_> = shed.iter().collect();
    assert!(distinct.len() > 1, "Retry-After is spread");
    // Every 503 counted for the operator.
    let token = admin_token(&server);
    let counted = metric(
        &server,
        &server.server.admin_url,
        &token,
        "license_server_agent_shed_total",
    )
    .await;
    assert_eq!(counted, shed.len() as f64);
}

/// `GET /metrics` of `server`'s admin listener, one sample.
async fn own_metric(server: &TestServer, token: &str, name: &str) -> f64 {
    metric(server, &server.server.admin_url, token, name).await
}

/// Polls `check` every 100 ms until it holds, for at most 10 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "not within 10 s: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A forced rotation of `machine` made by `admin` (another process), and how long after the
/// command returned its change arrived on `watch`.
async fn rotation_heard(server: &TestServer, machine: &Machine, watch: &mut Watch) -> Duration {
    server.admin_json(&["machine", "rotate", &machine.id]);
    let made = Instant::now();
    let (event, at) = tokio::time::timeout(Duration::from_secs(10), watch.next_change())
        .await
        .expect("the rotation arrives")
        .expect("the stream stays open");
    assert_eq!(event.kind, Some(ChangeKind::RotationRequested));
    at - made
}

/// On PostgreSQL the change feed listens (`LISTEN lsa_audit`): quiet, it reads the audit trail
/// every 5 s rather than every `watch_feed_interval_ms`; a change committed by another process
/// is heard at once; when its listening connection is killed, it listens again and hears the
/// next one. The stream's `hello` names its ping interval, and the pings follow it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_change_feed_listens_on_postgresql_and_survives_a_dropped_connection() {
    let config = format!("{FLEET_CONFIG}\nwatch_heartbeat_secs = 2\nwatch_feed_interval_ms = 100");
    let server = Arc::new(TestServer::start_configured(
        Db::Postgres,
        &config,
        &[],
        &[],
    ));
    let machines = enroll(&server, 1).await;
    let token = admin_token(&server);
    let listening = "license_server_change_feed_listening";
    let reads = "license_server_change_feed_reads_total";
    eventually("the feed listens", || async {
        own_metric(&server, &token, listening).await == 1.0
    })
    .await;

    // Quiet: no read for notifications, one every 5 s (polling every 100 ms would be 30).
    let before = own_metric(&server, &token, reads).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let quiet = own_metric(&server, &token, reads).await - before;
    println!("reads of the audit trail in 3 quiet seconds: {quiet}");
    assert!(quiet <= 2.0, "{quiet} reads in 3 quiet seconds");

    let mut watch = Watch::open(&machines[0], &server.server.agent_url, None).await;
    let hello = watch.next().await.unwrap();
    assert_eq!(hello.event, EventType::Hello);
    assert_eq!(
        hello.heartbeat_secs,
        Some(2),
        "hello names the ping interval"
    );
    let ping = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("a ping within two intervals")
        .unwrap();
    assert_eq!(ping.event, EventType::Ping);
    assert_eq!(ping.heartbeat_secs, None, "only hello names it");

    let latency = rotation_heard(&server, &machines[0], &mut watch).await;
    println!("a rotation by the admin CLI heard after {latency:?}");
    assert!(latency <= Duration::from_secs(1), "{latency:?}");

    // The listening connection dies (a database restart, a proxy cutting it): the feed
    // connects and listens again, and hears the next change at once.
    let listener = listening_backend(&server.db.url).expect("a listening connection");
    psql_on(
        &server.db.url,
        &format!("SELECT pg_terminate_backend({listener})"),
    );
    eventually("a new listening connection", || async {
        listening_backend(&server.db.url).is_some_and(|pid| pid != listener)
    })
    .await;
    assert_eq!(own_metric(&server, &token, listening).await, 1.0);
    let latency = rotation_heard(&server, &machines[0], &mut watch).await;
    println!("listening again, a rotation heard after {latency:?}");
    assert!(latency <= Duration::from_secs(1), "{latency:?}");
}

/// `sql`'s single value, run by `psql` on the database at `url`.
fn psql_on(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-tAc", sql])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The server process of the connection listening on the database at `url`, if any.
fn listening_backend(url: &str) -> Option<u32> {
    psql_on(
        url,
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
         AND pid <> pg_backend_pid() AND query ILIKE 'LISTEN %'",
    )
    .lines()
    .next()
    .and_then(|pid| pid.parse().ok())
}

/// On SQLite there is nothing to listen to: the feed reads the trail every
/// `watch_feed_interval_ms`, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_the_change_feed_reads_every_interval() {
    let server = TestServer::start_configured(Db::Sqlite, "watch_feed_interval_ms = 100", &[], &[]);
    let token = admin_token(&server);
    let reads = "license_server_change_feed_reads_total";
    let before = own_metric(&server, &token, reads).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let polled = own_metric(&server, &token, reads).await - before;
    assert!(polled >= 5.0, "{polled} reads in 2 s at 100 ms");
    assert_eq!(
        own_metric(&server, &token, "license_server_change_feed_listening").await,
        0.0
    );
}
