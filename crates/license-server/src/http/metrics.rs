//! `GET /metrics` on the admin listener (Prometheus text format, version 0.0.4): requests and
//! their latency per listener and route, what those requests did (enrollments, rotations,
//! renewals, online validations, rate-limit refusals), the database pool, and fleet gauges read
//! from the database at scrape time.
//!
//! Requests are counted by a route layer on each listener ([`track`]), keyed by the route's
//! template (`/api/v1/licenses`, never a concrete id), so the label set stays bounded.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Extension;

use super::error::ApiFailure;
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

/// The request counters of all three listeners; cheap to clone.
#[derive(Debug, Default, Clone)]
pub struct HttpMetrics {
    routes: Arc<Mutex<BTreeMap<(&'static str, String), RouteStats>>>,
}

impl HttpMetrics {
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
) -> Result<Response, ApiFailure> {
    let fleet = fleet::gauges(state.store.pool(), Timestamp::now()).await?;
    let body = render(&metrics.snapshot(), &fleet, pool_state(&state));
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
    fleet: &fleet::Gauges,
    (open, idle, max): (u32, usize, u32),
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
        let text = render(&metrics.snapshot(), &fleet::Gauges::default(), (3, 1, 10));
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
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }
}
