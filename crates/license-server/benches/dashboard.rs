//! How long the dashboard's fleet overview takes to render over 100,000 machines, on SQLite and
//! on PostgreSQL (issue "the vendor's fleet console": under 200 ms on both).
//!
//! Seeds a fresh database per backend through the server's own migrations: 100 clients of
//! 1,000 machines each, every machine with an active certificate and a license expiring
//! anywhere in the next 400 days, `last_seen_at` spread over the last week (a tenth never seen,
//! a hundredth revoked) and a health report (one in fifty degraded, one in a hundred with failed
//! rotations, one in two hundred with a clock rollback). Then renders the overview page with the
//! function the `/dashboard` handler calls (`overview_html`: the fleet gauges, the expiring
//! lists and the troubled machines, then the template), 5 times to warm up and 30 timed, and
//! prints min / median / p95 / max per backend.
//!
//! `cargo bench --bench dashboard` (release build). PostgreSQL: a database is created and
//! dropped on `LSA_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432`); without a
//! server there, its figures are reported as skipped. `LSA_BENCH_KEEP_DB=1` keeps the
//! PostgreSQL database (to look at query plans).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use license_server::clock::Timestamp;
use license_server::http::dashboard::pages::overview_html;
use license_server::http::dashboard::Ctx;
use license_server::store::Store;

const CLIENTS: usize = 100;
const MACHINES_PER_CLIENT: usize = 1_000;
const WARMUP: usize = 5;
const RUNS: usize = 30;
/// Rows per INSERT statement.
const BATCH: usize = 500;

fn uuid(kind: u8, n: usize) -> String {
    format!("{kind:08x}-0000-4000-8000-{n:012x}")
}

fn report(n: usize) -> String {
    let degraded = if n.is_multiple_of(50) {
        "active"
    } else {
        "inactive"
    };
    let failures = if n % 100 == 1 { 3 } else { 0 };
    let rollback = if n % 200 == 2 {
        "3600".to_string()
    } else {
        "null".into()
    };
    // The field order `serde_json` writes a `HealthReport` in (what the server stores).
    format!(
        "{{\"agent_version\":\"0.1.0\",\"store\":\"tpm\",\"tpm_enabled\":true,\"tpm_available\":true,\
         \"degraded_mode\":\"{degraded}\",\"degraded_since\":null,\"last_rotation\":1800000000,\
         \"rotation_failures\":{failures},\"clock_rollback_secs\":{rollback},\"audit_chain_ok\":true,\
         \"certificate_expires_at\":1900000000,\"secret_version\":7}}"
    )
}

async fn exec(store: &Store, sql: &str) {
    sqlx::query(sql).execute(store.pool()).await.unwrap();
}

async fn insert_rows(store: &Store, head: &str, rows: impl Iterator<Item = String>) {
    let rows: Vec<String> = rows.collect();
    for chunk in rows.chunks(BATCH) {
        exec(store, &format!("{head} VALUES {}", chunk.join(", "))).await;
    }
}

async fn seed(store: &Store, now: i64) {
    let total = CLIENTS * MACHINES_PER_CLIENT;
    insert_rows(
        store,
        "INSERT INTO clients (id, name, created_at)",
        (0..CLIENTS).map(|c| format!("('{}', 'Client {c:03}', {now})", uuid(1, c))),
    )
    .await;
    insert_rows(
        store,
        "INSERT INTO machines (id, client_id, hostname, hardware_id, arch, enrolled_at, \
         last_enrolled_at, revoked_at, last_seen_at, health_report, health_reported_at)",
        (0..total).map(|m| {
            let client = uuid(1, m / MACHINES_PER_CLIENT);
            let revoked = if m % 100 == 99 {
                (now - 3600).to_string()
            } else {
                "NULL".into()
            };
            let seen = if m % 10 == 9 {
                "NULL".to_string()
            } else {
                // Spread over the last 7 days.
                (now - (m as i64 * 7919) % (7 * 86_400)).to_string()
            };
            format!(
                "('{}', '{client}', 'pos-{m:06}', 'HW-{m}', 'amd64', {e}, {e}, {revoked}, {seen}, '{}', {e})",
                uuid(2, m),
                report(m),
                e = now - 30 * 86_400,
            )
        }),
    )
    .await;
    insert_rows(
        store,
        "INSERT INTO certificates (serial, machine_id, client_id, state, key_origin, issued_at, \
         expires_at, pem)",
        (0..total).map(|m| {
            format!(
                "('{m:032x}', '{}', '{}', 'active', 'csr', {}, {}, 'x')",
                uuid(2, m),
                uuid(1, m / MACHINES_PER_CLIENT),
                now - 30 * 86_400,
                now + 3600 + (m as i64 * 3331) % (400 * 86_400),
            )
        }),
    )
    .await;
    insert_rows(
        store,
        "INSERT INTO licenses (id, client_id, machine_id, features, metadata, issued_at, \
         not_before, expires_at)",
        (0..total).map(|m| {
            format!(
                "('{}', '{}', '{}', '[\"pos.sale\"]', '{{}}', {n}, {n}, {})",
                uuid(3, m),
                uuid(1, m / MACHINES_PER_CLIENT),
                uuid(2, m),
                now + 3600 + (m as i64 * 4441) % (400 * 86_400),
                n = now - 30 * 86_400,
            )
        }),
    )
    .await;
    // Fresh planner statistics, as a long-running database has.
    exec(store, "ANALYZE").await;
}

fn ctx() -> Ctx {
    Ctx {
        name: "bench".into(),
        role: "readonly",
        can_act: false,
        csrf: "x".repeat(43),
        done: None,
    }
}

async fn measure(label: &str, url: &str) {
    let store = Store::open(url).await.unwrap();
    let now = Timestamp::now();
    let started = Instant::now();
    seed(&store, now.0).await;
    println!(
        "{label}: seeded {} machines (with certificates, licenses, health reports) in {:.1} s",
        CLIENTS * MACHINES_PER_CLIENT,
        started.elapsed().as_secs_f64()
    );
    let mut size = 0;
    for _ in 0..WARMUP {
        size = overview_html(&store, ctx(), now).await.unwrap().len();
    }
    let mut times: Vec<Duration> = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let t = Instant::now();
        let html = overview_html(&store, ctx(), now).await.unwrap();
        times.push(t.elapsed());
        assert!(html.contains("Fleet overview"));
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{label}: overview of {} machines, {RUNS} renders ({size} bytes): min {:.1} ms, median {:.1} ms, p95 {:.1} ms, max {:.1} ms",
        CLIENTS * MACHINES_PER_CLIENT,
        ms(times[0]),
        ms(times[RUNS / 2]),
        ms(times[RUNS * 95 / 100]),
        ms(times[RUNS - 1]),
    );
    store.close().await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` is disabled (`test = false`).
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", dir.path().join("bench.db").display());
    measure("SQLite", &sqlite).await;

    let base = std::env::var("LSA_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    sqlx::any::install_default_drivers();
    let admin = match sqlx::AnyPool::connect(&format!("{base}/postgres")).await {
        Ok(pool) => pool,
        Err(e) => {
            println!("PostgreSQL: skipped (no server at {base}: {e})");
            return;
        }
    };
    let name = format!("lsa_bench_dashboard_{}", std::process::id());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    measure("PostgreSQL", &format!("{base}/{name}")).await;
    if std::env::var_os("LSA_BENCH_KEEP_DB").is_some() {
        println!("PostgreSQL: kept database {name} (LSA_BENCH_KEEP_DB)");
        return;
    }
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
}
