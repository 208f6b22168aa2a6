//! `GET /metrics` on the admin listener (Prometheus text format, version 0.0.4): requests and
//! their latency per listener and route, what those requests did (enrollments, rotations,
//! renewals, online validations, rate-limit refusals), the database pool, the routed reads by
//! the pool that answered them and the read replica's lag (`service::reads`), the agent
//! listener's load (open watch streams, requests shed), and fleet gauges read from the
//! database at scrape time.
//!
//! Requests are counted by a route layer on each listener ([`track`]), keyed by the route's
//! template (`/api/v1/licenses`, never a concrete id), so the label set stays bounded. TLS
//! handshakes are counted by the accept loop ([`HandshakeCounts`]): refused handshakes on the
//! agent listener are machines whose certificate no longer chains, or scanners.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Extension;

use super::error::ApiFailure;
use super::shed::Shedder;
use crate::clock::Timestamp;
use crate::service::SharedState;
use crate::store::fleet;

/// Upper bounds (seconds) of the latency histogram's buckets.
const BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// Counts and latencies of one route on one listener.
#[derive(Debug, Default, Clone)]
struct RouteStats {
    /// Requests by (method, status).
    by_status: BTreeMap<(String, u16), u64>,
    /// Cumulative bucket counts, then the total count and sum.
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum_secs: f64,
}

/// How a TLS handshake ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeOutcome {
    /// Completed with a full handshake (certificates exchanged and verified).
    Full,
    /// Completed by resuming a session from a ticket.
    Resumed,
    /// Refused by the TLS layer: a client certificate that does not verify, a protocol error.
    Refused,
    /// Broken off by the peer (closed or reset mid-handshake, or it stopped reading). A client
    /// that resets the connection as soon as it has sent its last handshake message (`openssl
    /// s_time` does) lands here even though its certificate was verified.
    Aborted,
    /// Not finished within the handshake timeout.
    TimedOut,
    /// Cut off for a newer connection while all handshake places were taken.
    CutOff,
}

impl HandshakeOutcome {
    const ALL: [Self; 6] = [
        Self::Full,
        Self::Resumed,
        Self::Refused,
        Self::Aborted,
        Self::TimedOut,
        Self::CutOff,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Resumed => "resumed",
            Self::Refused => "refused",
            Self::Aborted => "aborted",
            Self::TimedOut => "timed_out",
            Self::CutOff => "cut_off",
        }
    }
}

/// The TLS handshakes of one listener, by outcome; one atomic increment per handshake.
#[derive(Debug, Default)]
pub struct HandshakeCounts {
    counts: [AtomicU64; HandshakeOutcome::ALL.len()],
}

impl HandshakeCounts {
    pub fn count(&self, outcome: HandshakeOutcome) {
        self.counts[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> [u64; HandshakeOutcome::ALL.len()] {
        std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed))
    }
}

/// The request and handshake counters of all three listeners; cheap to clone.
#[derive(Debug, Default, Clone)]
pub struct HttpMetrics {
    routes: Arc<Mutex<BTreeMap<(&'static str, String), RouteStats>>>,
    handshakes: Arc<Mutex<BTreeMap<&'static str, Arc<HandshakeCounts>>>>,
}

/// Handshake counts by listener, as [`HttpMetrics::handshake_snapshot`] reads them.
type HandshakeSnapshot = BTreeMap<&'static str, [u64; HandshakeOutcome::ALL.len()]>;

impl HttpMetrics {
    /// The handshake counters of `listener`, for its accept loop.
    pub fn handshakes(&self, listener: &'static str) -> Arc<HandshakeCounts> {
        self.handshakes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(listener)
            .or_default()
            .clone()
    }

    fn handshake_snapshot(&self) -> HandshakeSnapshot {
        self.handshakes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(listener, counts)| (*listener, counts.snapshot()))
            .collect()
    }

    fn record(&self, listener: &'static str, route: &str, method: &str, status: u16, secs: f64) {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let stats = routes.entry((listener, route.to_string())).or_default();
        *stats
            .by_status
            .entry((method.to_string(), status))
            .or_default() += 1;
        for (bucket, bound) in stats.buckets.iter_mut().zip(BUCKETS) {
            if secs <= bound {
                *bucket += 1;
            }
        }
        stats.count += 1;
        stats.sum_secs += secs;
    }

    fn snapshot(&self) -> BTreeMap<(&'static str, String), RouteStats> {
        self.routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Route layer: times each request of `listener` and counts it under its route template.
pub async fn track(
    State((metrics, listener)): State<(HttpMetrics, &'static str)>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = request.method().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let secs = started.elapsed().as_secs_f64();
    metrics.record(listener, &route, &method, response.status().as_u16(), secs);
    response
}

/// `GET /metrics`: the exposition, text format 0.0.4.
pub async fn serve(
    State(state): State<SharedState>,
    Extension(metrics): Extension<HttpMetrics>,
    Extension(shedder): Extension<Arc<Shedder>>,
) -> Result<Response, ApiFailure> {
    let fleet = fleet::gauges(state.store.pool(), Timestamp::now()).await?;
    let load = AgentLoad {
        watch_streams: state.changes.streams(),
        feed_reads: state.changes.reads(),
        feed_listening: state.changes.listening(),
        shed: shedder.shed_total(),
    };
    let body = render(
        &metrics.snapshot(),
        &metrics.handshake_snapshot(),
        &fleet,
        pool_state(&state),
        read_stats(&state),
        load,
    );
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response())
}

/// Connections of the database pool: (open, idle, maximum).
fn pool_state(state: &SharedState) -> (u32, usize, u32) {
    let pool = state.store.pool();
    (
        pool.size(),
        pool.num_idle(),
        pool.options().get_max_connections(),
    )
}

/// The routed reads and the read replica, as exposed.
#[derive(Debug, Clone, Copy, Default)]
struct ReadStats {
    primary: u64,
    replica: u64,
    /// `None` without a replica; `Some(None)` while it was never found fresh.
    lag: Option<Option<std::time::Duration>>,
}

fn read_stats(state: &SharedState) -> ReadStats {
    let (primary, replica) = state.reads.served();
    ReadStats {
        primary,
        replica,
        lag: state
            .reads
            .replica()
            .map(|replica| replica.lag(Instant::now())),
    }
}

/// The agent listener's load, as exposed.
#[derive(Debug, Clone, Copy, Default)]
struct AgentLoad {
    watch_streams: usize,
    feed_reads: u64,
    feed_listening: bool,
    shed: u64,
}

/// One family's HELP and TYPE lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Sums the requests to `route` (on any listener) answered with a status `matching`.
fn outcomes(
    routes: &BTreeMap<(&'static str, String), RouteStats>,
    route: &str,
    matching: impl Fn(u16) -> bool,
) -> u64 {
    routes
        .iter()
        .filter(|((_, r), _)| r == route)
        .flat_map(|(_, stats)| stats.by_status.iter())
        .filter(|((_, status), _)| matching(*status))
        .map(|(_, n)| n)
        .sum()
}

fn render(
    routes: &BTreeMap<(&'static str, String), RouteStats>,
    handshakes: &HandshakeSnapshot,
    fleet: &fleet::Gauges,
    (open, idle, max): (u32, usize, u32),
    reads: ReadStats,
    load: AgentLoad,
) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "license_server_http_requests_total",
        "counter",
        "Requests answered, by listener, route template, method and status.",
    );
    for ((listener, route), stats) in routes {
        for ((method, status), n) in &stats.by_status {
            let _ = writeln!(
                out,
                "license_server_http_requests_total{{listener=\"{listener}\",route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {n}"
            );
        }
    }
    family(
        &mut out,
        "license_server_http_request_duration_seconds",
        "histogram",
        "Time from the request reaching its route to the response, by listener and route.",
    );
    for ((listener, route), stats) in routes {
        let labels = format!("listener=\"{listener}\",route=\"{route}\"");
        for (bound, n) in BUCKETS.iter().zip(stats.buckets) {
            let _ = writeln!(
                out,
                "license_server_http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "license_server_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
            stats.count
        );
        let _ = writeln!(
            out,
            "license_server_http_request_duration_seconds_sum{{{labels}}} {}",
            stats.sum_secs
        );
        let _ = writeln!(
            out,
            "license_server_http_request_duration_seconds_count{{{labels}}} {}",
            stats.count
        );
    }
    family(
        &mut out,
        "license_server_tls_handshakes_total",
        "counter",
        "TLS handshakes, by listener and outcome (full, resumed, refused, aborted, timed_out, \
         cut_off).",
    );
    for (listener, counts) in handshakes {
        for (outcome, n) in HandshakeOutcome::ALL.iter().zip(counts) {
            let _ = writeln!(
                out,
                "license_server_tls_handshakes_total{{listener=\"{listener}\",outcome=\"{}\"}} {n}",
                outcome.label()
            );
        }
    }
    let ok = |s: u16| (200..300).contains(&s);
    let refused = |s: u16| (400..500).contains(&s);
    for (name, help, route) in [
        (
            "license_server_enrollments_total",
            "Bootstrap enrollments, by outcome.",
            "/api/public/bootstrap",
        ),
        (
            "license_server_recoveries_total",
            "Machine recoveries with a recovery token, by outcome.",
            "/api/public/recover",
        ),
        (
            "license_server_rotations_total",
            "Secret rotations answered to machines, by outcome.",
            "/api/v1/rotate-secret",
        ),
        (
            "license_server_renewals_total",
            "Machine certificate renewals, by outcome.",
            "/api/v1/renew-certificate",
        ),
        (
            "license_server_online_validations_total",
            "Online license validations (POST /api/v1/validate-license), by outcome.",
            "/api/v1/validate-license",
        ),
    ] {
        family(&mut out, name, "counter", help);
        let _ = writeln!(
            out,
            "{name}{{outcome=\"success\"}} {}",
            outcomes(routes, route, ok)
        );
        let _ = writeln!(
            out,
            "{name}{{outcome=\"refused\"}} {}",
            outcomes(routes, route, refused)
        );
    }
    family(
        &mut out,
        "license_server_rate_limited_total",
        "counter",
        "Requests refused with 429 (bootstrap and recovery rate limit).",
    );
    let limited: u64 = routes
        .values()
        .flat_map(|s| s.by_status.iter())
        .filter(|((_, status), _)| *status == 429)
        .map(|(_, n)| n)
        .sum();
    let _ = writeln!(out, "license_server_rate_limited_total {limited}");
    family(
        &mut out,
        "license_server_agent_shed_total",
        "counter",
        "Agent requests answered 503 server_busy with Retry-After: no place free among \
         agent_max_inflight within the queue wait.",
    );
    let _ = writeln!(out, "license_server_agent_shed_total {}", load.shed);
    family(
        &mut out,
        "license_server_watch_streams",
        "gauge",
        "Watch streams (GET /api/v1/watch) open on this process.",
    );
    let _ = writeln!(out, "license_server_watch_streams {}", load.watch_streams);
    family(
        &mut out,
        "license_server_change_feed_reads_total",
        "counter",
        "Reads of the audit trail by the change feed behind the watch streams.",
    );
    let _ = writeln!(
        out,
        "license_server_change_feed_reads_total {}",
        load.feed_reads
    );
    family(
        &mut out,
        "license_server_change_feed_listening",
        "gauge",
        "1 while the change feed hears PostgreSQL's notifications of new audit rows (it then \
         reads the trail when told, and every 5 s); 0 while it reads it every \
         watch_feed_interval_ms (SQLite, or the listening connection is down).",
    );
    let _ = writeln!(
        out,
        "license_server_change_feed_listening {}",
        u8::from(load.feed_listening)
    );

    family(
        &mut out,
        "license_server_db_pool_connections",
        "gauge",
        "Database pool connections, by state.",
    );
    let in_use = (open as usize).saturating_sub(idle);
    let _ = writeln!(
        out,
        "license_server_db_pool_connections{{state=\"idle\"}} {idle}"
    );
    let _ = writeln!(
        out,
        "license_server_db_pool_connections{{state=\"in_use\"}} {in_use}"
    );
    family(
        &mut out,
        "license_server_db_pool_max_connections",
        "gauge",
        "Largest number of connections the database pool opens.",
    );
    let _ = writeln!(out, "license_server_db_pool_max_connections {max}");
    family(
        &mut out,
        "license_server_db_reads_total",
        "counter",
        "Routed reads (certificate check, secret status, licenses, online validation), by the \
         pool that answered them.",
    );
    for (pool, n) in [("primary", reads.primary), ("replica", reads.replica)] {
        let _ = writeln!(out, "license_server_db_reads_total{{pool=\"{pool}\"}} {n}");
    }
    if let Some(lag) = reads.lag {
        family(
            &mut out,
            "license_server_db_replica_lag_seconds",
            "gauge",
            "How far the read replica may be behind the primary: time since the newest instant \
             it is known to hold every commit from (+Inf until first measured).",
        );
        match lag {
            Some(lag) => {
                let secs = lag.as_secs_f64();
                let _ = writeln!(out, "license_server_db_replica_lag_seconds {secs:.3}");
            }
            None => {
                let _ = writeln!(out, "license_server_db_replica_lag_seconds +Inf");
            }
        }
    }

    family(
        &mut out,
        "license_server_machines",
        "gauge",
        "Enrolled machines by health: last seen within an hour, a day, longer ago or never; \
         revoked; reporting degraded mode, the TPM fallback, failing rotations, a clock rollback.",
    );
    for (health, n) in [
        ("seen_last_hour", fleet.seen_last_hour),
        ("seen_last_day", fleet.seen_last_day),
        ("seen_longer_ago", fleet.seen_longer_ago),
        ("never_seen", fleet.never_seen),
        ("revoked", fleet.revoked),
        ("degraded", fleet.degraded),
        ("tpm_fallback", fleet.tpm_fallback),
        ("rotation_failing", fleet.rotation_failing),
        ("clock_rollback", fleet.clock_rollbacks),
    ] {
        let _ = writeln!(out, "license_server_machines{{health=\"{health}\"}} {n}");
    }
    for (name, help, counts) in [
        (
            "license_server_certificates_expiring",
            "Active machine certificates expiring within the window (not yet expired).",
            [fleet.certificates_7d, fleet.certificates_30d],
        ),
        (
            "license_server_licenses_expiring",
            "Unrevoked licenses expiring within the window (not yet expired).",
            [fleet.licenses_7d, fleet.licenses_30d],
        ),
    ] {
        family(&mut out, name, "gauge", help);
        for (window, n) in ["7d", "30d"].into_iter().zip(counts) {
            let _ = writeln!(out, "{name}{{within=\"{window}\"}} {n}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_outcomes_sum_by_route() {
        let metrics = HttpMetrics::default();
        metrics.record("public", "/api/public/bootstrap", "POST", 200, 0.004);
        metrics.record("public", "/api/public/bootstrap", "POST", 200, 0.3);
        metrics.record("public", "/api/public/bootstrap", "POST", 429, 0.001);
        metrics.record("agent", "/api/v1/rotate-secret", "POST", 409, 7.0);
        let reads = ReadStats {
            primary: 4,
            replica: 9,
            lag: Some(Some(std::time::Duration::from_millis(1250))),
        };
        let text = render(
            &metrics.snapshot(),
            &metrics.handshake_snapshot(),
            &fleet::Gauges::default(),
            (3, 1, 10),
            reads,
            AgentLoad {
                watch_streams: 7,
                feed_reads: 12,
                feed_listening: true,
                shed: 5,
            },
        );
        for line in [
            "license_server_http_request_duration_seconds_bucket{listener=\"public\",route=\"/api/public/bootstrap\",le=\"0.005\"} 2",
            "license_server_http_request_duration_seconds_bucket{listener=\"public\",route=\"/api/public/bootstrap\",le=\"0.25\"} 2",
            "license_server_http_request_duration_seconds_bucket{listener=\"public\",route=\"/api/public/bootstrap\",le=\"0.5\"} 3",
            "license_server_http_request_duration_seconds_bucket{listener=\"agent\",route=\"/api/v1/rotate-secret\",le=\"5\"} 0",
            "license_server_http_request_duration_seconds_bucket{listener=\"agent\",route=\"/api/v1/rotate-secret\",le=\"+Inf\"} 1",
            "license_server_enrollments_total{outcome=\"success\"} 2",
            "license_server_enrollments_total{outcome=\"refused\"} 1",
            "license_server_rotations_total{outcome=\"refused\"} 1",
            "license_server_rate_limited_total 1",
            "license_server_db_pool_connections{state=\"in_use\"} 2",
            "license_server_db_reads_total{pool=\"primary\"} 4",
            "license_server_db_reads_total{pool=\"replica\"} 9",
            "license_server_db_replica_lag_seconds 1.250",
            "license_server_agent_shed_total 5",
            "license_server_watch_streams 7",
            "license_server_change_feed_reads_total 12",
            "license_server_change_feed_listening 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        let unmeasured = ReadStats {
            lag: Some(None),
            ..ReadStats::default()
        };
        let text = render(
            &metrics.snapshot(),
            &Default::default(),
            &Default::default(),
            (0, 0, 1),
            unmeasured,
            AgentLoad::default(),
        );
        assert!(text.contains("license_server_db_replica_lag_seconds +Inf\n"));
        let text = render(
            &metrics.snapshot(),
            &Default::default(),
            &Default::default(),
            (0, 0, 1),
            ReadStats::default(),
            AgentLoad::default(),
        );
        assert!(!text.contains("replica_lag"), "no replica, no lag");
    }

    #[test]
    fn handshakes_are_counted_per_listener_and_outcome() {
        let metrics = HttpMetrics::default();
        let agent = metrics.handshakes("agent");
        agent.count(HandshakeOutcome::Full);
        agent.count(HandshakeOutcome::Full);
        agent.count(HandshakeOutcome::Refused);
        // The same listener's counters, wherever they are asked for.
        metrics.handshakes("agent").count(HandshakeOutcome::Resumed);
        metrics
            .handshakes("admin")
            .count(HandshakeOutcome::TimedOut);
        let text = render(
            &metrics.snapshot(),
            &metrics.handshake_snapshot(),
            &fleet::Gauges::default(),
            (3, 1, 10),
            ReadStats::default(),
            AgentLoad::default(),
        );
        for line in [
            "license_server_tls_handshakes_total{listener=\"agent\",outcome=\"full\"} 2",
            "license_server_tls_handshakes_total{listener=\"agent\",outcome=\"resumed\"} 1",
            "license_server_tls_handshakes_total{listener=\"agent\",outcome=\"refused\"} 1",
            "license_server_tls_handshakes_total{listener=\"agent\",outcome=\"aborted\"} 0",
            "license_server_tls_handshakes_total{listener=\"agent\",outcome=\"cut_off\"} 0",
            "license_server_tls_handshakes_total{listener=\"admin\",outcome=\"timed_out\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }
}
