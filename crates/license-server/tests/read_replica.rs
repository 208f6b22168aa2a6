//! Reads from a PostgreSQL read replica, for real: a primary and a hot standby of it
//! (`initdb`, `pg_basebackup -R`, streaming replication) started by the test in a temporary
//! directory, and a real `license-server serve` with `database_url` on the primary and
//! `database_read_url` on the standby. Which pool answered is read from `/metrics`
//! (`license_server_db_reads_total`); what the standby holds, from the standby itself.
//!
//! - With replay running, agent requests are served from the replica.
//! - With replay paused (`pg_wal_replay_pause()`) past `read_replica_max_lag_ms`, the lag shows
//!   in `/metrics`, reads go to the primary, and a machine revoked through the admin API is
//!   refused at its very next request; once replay resumes, reads go back to the replica.
//! - With a bound the paused replica stays within (60 s): a machine whose change the change
//!   feed just pushed (`admin machine rotate`, another process) reads its own status from the
//!   primary — the rotation shows at once — while the other machines read from the replica;
//!   a machine revoked through the server's own admin API is refused at once as well.
//!
//! Both clusters are stopped and their directory removed when the test ends, panics included.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{metric_sample, set_config_keys, TestServer};
use license_protocol::watch::{ChangeKind, EventReader, EventType, WatchEvent};
use serde_json::{json, Value};

/// The newest PostgreSQL's programs, `/usr/lib/postgresql/<major>/bin`.
fn pg_bin() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL installed under /usr/lib/postgresql")
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .expect("initdb under /usr/lib/postgresql/*/bin")
        .1
}

fn running_as_root() -> bool {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A primary and its hot standby, each in a directory of its own, on free ports.
struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    root: bool,
    primary_port: u16,
    standby_port: u16,
}

impl PgCluster {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // PostgreSQL refuses to run as root: as root, the clusters belong to `postgres`.
        let root = running_as_root();
        if root {
            let chown = Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(chown.success());
        }
        let mut cluster = Self {
            dir,
            bin: pg_bin(),
            root,
            primary_port: 0,
            standby_port: 0,
        };
        let primary = cluster.path("primary");
        cluster.run(
            "initdb",
            &["-D", &primary, "-U", "postgres", "-A", "trust", "--no-sync"],
        );
        cluster.primary_port = free_port();
        cluster.configure("primary", cluster.primary_port);
        cluster.run(
            "pg_ctl",
            &[
                "-D",
                &primary,
                "-l",
                &cluster.path("primary.log"),
                "-w",
                "start",
            ],
        );
        cluster.sql(cluster.primary_port, "postgres", "CREATE DATABASE lsa");
        let standby = cluster.path("standby");
        let port = cluster.primary_port.to_string();
        cluster.run(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-D",
                &standby,
                "-R",
                "-X",
                "stream",
                "--no-sync",
                // At once, not after a spread checkpoint (minutes).
                "-c",
                "fast",
            ],
        );
        cluster.standby_port = free_port();
        cluster.configure("standby", cluster.standby_port);
        cluster.run(
            "pg_ctl",
            &[
                "-D",
                &standby,
                "-l",
                &cluster.path("standby.log"),
                "-w",
                "start",
            ],
        );
        assert_eq!(
            cluster.sql(cluster.standby_port, "lsa", "SELECT pg_is_in_recovery()"),
            "t",
            "the standby replays the primary"
        );
        cluster
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Runs one of PostgreSQL's programs (as `postgres` when the test runs as root).
    fn run(&self, program: &str, args: &[&str]) {
        let program = self.bin.join(program);
        let mut command = if self.root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let out = command.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{} {args:?}: {}{}",
            program.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Listens on `port` of loopback only, its socket in the test's directory, streaming WAL
    /// to a standby (the settings a `pg_basebackup` copy keeps; the port is set again after).
    fn configure(&self, node: &str, port: u16) {
        use std::io::Write as _;
        let conf = Path::new(&self.path(node)).join("postgresql.conf");
        let mut file = std::fs::OpenOptions::new().append(true).open(conf).unwrap();
        write!(
            file,
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = replica\nmax_wal_senders = 4\nhot_standby = on\nfsync = off\n",
            self.dir.path().display()
        )
        .unwrap();
    }

    fn url(port: u16) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/lsa")
    }

    /// One statement's answer, unaligned.
    fn sql(&self, port: u16, db: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .arg(format!("postgres://postgres@127.0.0.1:{port}/{db}"))
            .args(["-v", "ON_ERROR_STOP=1", "-Atqc", sql])
            .output()
            .expect("psql installed");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn on_standby(&self, sql: &str) -> String {
        self.sql(self.standby_port, "lsa", sql)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        for node in ["standby", "primary"] {
            let data = self.path(node);
            if Path::new(&data).join("postmaster.pid").exists() {
                let program = self.bin.join("pg_ctl");
                let mut command = if self.root {
                    let mut c = Command::new("runuser");
                    c.args(["-u", "postgres", "--"]).arg(&program);
                    c
                } else {
                    Command::new(&program)
                };
                let _ = command
                    .args(["-D", &data, "-m", "immediate", "-w", "stop"])
                    .output();
            }
        }
        // The directory goes with `self.dir`.
    }
}

/// An enrolled machine, as its agent connects.
struct Machine {
    id: String,
    http: reqwest::Client,
}

impl Machine {
    async fn enroll(server: &TestServer, name: &str) -> Self {
        let (_, answer, key) = server.enrolled_machine(name, &format!("hw-{name}")).await;
        Self {
            id: answer["machine_id"].as_str().unwrap().to_string(),
            http: server.mtls_client(answer["certificate"].as_str().unwrap(), &key),
        }
    }

    /// `GET /api/v1/secret-status`: (status, body).
    async fn status(&self, server: &TestServer) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}/api/v1/secret-status", server.server.agent_url))
            .send()
            .await
            .unwrap();
        let code = r.status().as_u16();
        (code, r.json().await.unwrap_or(Value::Null))
    }
}

/// The admin API of the server under test.
struct AdminApi {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl AdminApi {
    fn new(server: &TestServer) -> Self {
        let created = server.admin_json(&[
            "api-token",
            "create",
            "--name",
            "replica",
            "--role",
            "admin",
        ]);
        Self {
            http: server.https_client(),
            url: server.server.admin_url.clone(),
            token: created["token"].as_str().unwrap().to_string(),
        }
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "POST {path}: {}", r.status());
        r.json().await.unwrap()
    }

    async fn metrics(&self) -> String {
        let r = self
            .http
            .get(format!("{}/metrics", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    }

    /// Routed reads so far: (primary, replica).
    async fn reads(&self) -> (u64, u64) {
        let text = self.metrics().await;
        let count = |pool: &str| {
            metric_sample(
                &text,
                &format!("license_server_db_reads_total{{pool=\"{pool}\"}}"),
            ) as u64
        };
        (count("primary"), count("replica"))
    }

    /// `license_server_db_replica_lag_seconds`.
    async fn lag(&self) -> f64 {
        metric_sample(
            &self.metrics().await,
            "license_server_db_replica_lag_seconds",
        )
    }
}

/// Polls `check` every 100 ms until it holds, for at most `limit`.
async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `(primary, replica)` reads made by `machine`'s secret-status request, and its answer.
async fn status_reads(
    server: &TestServer,
    admin: &AdminApi,
    machine: &Machine,
) -> ((u64, u64), (u16, Value)) {
    let before = admin.reads().await;
    let answer = machine.status(server).await;
    let after = admin.reads().await;
    ((after.0 - before.0, after.1 - before.1), answer)
}

/// Waits until `machine`'s requests are served from the replica again.
async fn until_read_from_replica(server: &TestServer, admin: &AdminApi, machine: &Machine) {
    wait_until(
        Duration::from_secs(20),
        "reads from the replica",
        || async move {
            let ((primary, replica), (code, _)) = status_reads(server, admin, machine).await;
            assert_eq!(code, 200);
            primary == 0 && replica == 2
        },
    )
    .await;
}

/// Pauses replay on the standby, writes on the primary, and waits until the lag is `over`
/// seconds: the replica is then behind by that much.
async fn pause_replay(cluster: &PgCluster, admin: &AdminApi, over: f64) {
    cluster.on_standby("SELECT pg_wal_replay_pause()");
    let name = format!("written while replay is paused ({:?})", Instant::now());
    admin
        .post("/api/admin/clients", json!({ "name": name }))
        .await;
    wait_until(Duration::from_secs(20), "the lag grows", || async move {
        admin.lag().await >= over
    })
    .await;
}

/// The next event of a watch stream that is not a ping.
async fn next_event(response: &mut reqwest::Response, reader: &mut EventReader) -> WatchEvent {
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(10), response.chunk())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .expect("the stream stays open");
        if let Some(event) = reader
            .push(&chunk)
            .unwrap()
            .into_iter()
            .find(|e| e.event != EventType::Ping)
        {
            return event;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reads_use_a_fresh_replica_and_never_miss_a_change() {
    let cluster = PgCluster::start();
    let config = format!(
        "database_read_url = \"{}\"\nread_replica_max_lag_ms = 1000",
        PgCluster::url(cluster.standby_port)
    );
    let mut server = TestServer::start_on(&PgCluster::url(cluster.primary_port), &config);
    let a = Machine::enroll(&server, "a").await;
    let b = Machine::enroll(&server, "b").await;
    let c = Machine::enroll(&server, "c").await;
    let mut admin = AdminApi::new(&server);

    // (a) Replay running: once the replica holds the enrollments, requests read from it —
    // the certificate check and the status, two reads per request.
    // A write the server makes in the background (PostgreSQL's own WAL records included) sends
    // reads to the primary until the replica has replayed it: a batch may meet one, so up to
    // five batches are tried and one must be served by the replica alone.
    until_read_from_replica(&server, &admin, &a).await;
    let mut batches = Vec::new();
    for _ in 0..5 {
        let before = admin.reads().await;
        for _ in 0..10 {
            assert_eq!(a.status(&server).await.0, 200);
        }
        let after = admin.reads().await;
        let batch = (after.0 - before.0, after.1 - before.1, admin.lag().await);
        println!(
            "replay running: 10 requests, {} reads from the primary, {} from the replica, lag {} s",
            batch.0, batch.1, batch.2
        );
        batches.push(batch);
        if batch.0 == 0 && batch.1 >= 10 {
            break;
        }
    }
    let last = batches.last().unwrap();
    assert!(last.0 == 0 && last.1 >= 10, "batches: {batches:?}");
    assert!(admin.lag().await < 1.0);

    // (b) Replay paused past the 1 s bound: the lag shows, and every read goes to the primary.
    pause_replay(&cluster, &admin, 1.2).await;
    let lag = admin.lag().await;
    println!("replay paused: lag gauge {lag} s");
    let (reads, (code, _)) = status_reads(&server, &admin, &b).await;
    assert_eq!((code, reads), (200, (2, 0)), "read from the primary");
    // A machine revoked through the admin API is refused at its very next request.
    admin
        .post(&format!("/api/admin/machines/{}/revoke", a.id), json!({}))
        .await;
    let (reads, (code, body)) = status_reads(&server, &admin, &a).await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(body["error"], "machine_revoked");
    assert_eq!(reads, (1, 0), "the certificate check, on the primary");
    let unrevoked = format!(
        "SELECT revoked_at IS NULL FROM machines WHERE id = '{}'",
        a.id
    );
    assert_eq!(
        cluster.on_standby(&unrevoked),
        "t",
        "the standby has not seen it"
    );
    // Replay resumes: reads go back to the replica, which now refuses the machine itself.
    cluster.on_standby("SELECT pg_wal_replay_resume()");
    until_read_from_replica(&server, &admin, &b).await;
    assert!(admin.lag().await < 1.0);
    assert_eq!(cluster.on_standby(&unrevoked), "f");
    let (s, ad, m) = (&server, &admin, &a);
    wait_until(
        Duration::from_secs(10),
        "the replica refuses",
        || async move {
            let (reads, (code, _)) = status_reads(s, ad, m).await;
            assert_eq!(code, 403);
            reads == (0, 1)
        },
    )
    .await;

    // (c) A bound the paused replica stays within: only the machines with a change it lacks
    // read from the primary.
    set_config_keys(
        &server.data_dir().join("server.toml"),
        "read_replica_max_lag_ms = 60000",
    );
    server.restart(&[]);
    admin.url = server.server.admin_url.clone();
    until_read_from_replica(&server, &admin, &b).await;
    until_read_from_replica(&server, &admin, &c).await;
    pause_replay(&cluster, &admin, 1.2).await;
    let (reads, (code, _)) = status_reads(&server, &admin, &b).await;
    assert_eq!((code, reads), (200, (0, 2)), "within 60 s: the replica");

    // `admin machine rotate` in another process: this server hears of it through its change
    // feed, which pushes it to the machine's watch stream.
    let mut watch = c
        .http
        .get(format!("{}/api/v1/watch", server.server.agent_url))
        .send()
        .await
        .unwrap();
    assert_eq!(watch.status(), 200);
    let mut reader = EventReader::new();
    assert_eq!(
        next_event(&mut watch, &mut reader).await.event,
        EventType::Hello
    );
    let (reads, (_, status)) = status_reads(&server, &admin, &c).await;
    assert_eq!(reads, (0, 2));
    assert_eq!(status["rotation_requested"], false);
    server.admin_json(&["machine", "rotate", &c.id]);
    let change = next_event(&mut watch, &mut reader).await;
    assert_eq!(change.kind, Some(ChangeKind::RotationRequested));
    // The round the change asks for sees it at once, from the primary.
    let (reads, (code, status)) = status_reads(&server, &admin, &c).await;
    assert_eq!(code, 200);
    assert_eq!(status["rotation_requested"], true, "{status}");
    assert_eq!(reads, (2, 0), "the machine's reads go to the primary");
    let requested = format!(
        "SELECT rotation_requested_at IS NOT NULL FROM machines WHERE id = '{}'",
        c.id
    );
    assert_eq!(cluster.on_standby(&requested), "f", "the standby lags");
    // The other machines still read from the replica.
    let (reads, _) = status_reads(&server, &admin, &b).await;
    assert_eq!(reads, (0, 2));
    // A revocation through this server's admin API: refused at once, the replica lagging.
    admin
        .post(&format!("/api/admin/machines/{}/revoke", b.id), json!({}))
        .await;
    let (reads, (code, body)) = status_reads(&server, &admin, &b).await;
    assert_eq!((code, reads), (403, (1, 0)), "{body}");
    assert_eq!(body["error"], "machine_revoked");

    // Replay resumes: once the replica holds the rotation, the machine reads from it again.
    cluster.on_standby("SELECT pg_wal_replay_resume()");
    until_read_from_replica(&server, &admin, &c).await;
    assert_eq!(cluster.on_standby(&requested), "t");
    let (_, (_, status)) = status_reads(&server, &admin, &c).await;
    assert_eq!(status["rotation_requested"], true);
    drop(watch);
    drop(server);
    drop(cluster);
}
