//! What a run measured: every request's latency per route, what went wrong, and every change
//! the watch streams delivered with the time it arrived.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Counters of a run.
#[derive(Debug, Default)]
pub struct Counters {
    /// Rounds that got every answer they asked for.
    pub rounds_ok: AtomicU64,
    /// Rounds that failed (transport, shed, refused).
    pub rounds_failed: AtomicU64,
    /// Answers 503 `server_busy`.
    pub shed: AtomicU64,
    /// Answers 403 (a revoked machine or certificate).
    pub refused: AtomicU64,
    /// Other non-2xx answers.
    pub http_errors: AtomicU64,
    /// Connections that could not be made or broke.
    pub transport_errors: AtomicU64,
    /// TLS connections made.
    pub connections: AtomicU64,
    /// Watch streams opened.
    pub watches: AtomicU64,
    /// Rotations acknowledged.
    pub rotations: AtomicU64,
    /// Machine certificates renewed.
    pub renewals: AtomicU64,
    /// Renewed identities the cache could not take (the next run would use superseded ones).
    pub cache_errors: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// One change a watch stream delivered.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub machine_id: String,
    pub kind: String,
    pub at: Instant,
}

/// Shared by every simulated agent of a run.
#[derive(Debug, Default)]
pub struct Recorder {
    latencies: Mutex<BTreeMap<&'static str, Vec<u32>>>,
    delivered: Mutex<Vec<Delivered>>,
    pub counters: Counters,
}

impl Recorder {
    /// `route` answered after `latency`.
    pub fn latency(&self, route: &'static str, latency: Duration) {
        let micros = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
        self.latencies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(route)
            .or_default()
            .push(micros);
    }

    pub fn delivered(&self, machine_id: &str, kind: &str) {
        self.delivered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Delivered {
                machine_id: machine_id.to_string(),
                kind: kind.to_string(),
                at: Instant::now(),
            });
    }

    /// The changes delivered so far.
    pub fn deliveries(&self) -> Vec<Delivered> {
        self.delivered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Forgets the latencies and deliveries recorded so far (counters stay).
    pub fn reset_samples(&self) {
        self.latencies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.delivered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// The report of what was recorded.
    pub fn report(&self) -> Report {
        let latencies = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        let routes = latencies
            .iter()
            .map(|(route, samples)| (route.to_string(), Percentiles::of(samples)))
            .collect();
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut changes: BTreeMap<String, u64> = BTreeMap::new();
        for d in self
            .delivered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            *changes.entry(d.kind.clone()).or_default() += 1;
        }
        Report {
            routes,
            rounds_ok: get(&c.rounds_ok),
            rounds_failed: get(&c.rounds_failed),
            shed: get(&c.shed),
            refused: get(&c.refused),
            http_errors: get(&c.http_errors),
            transport_errors: get(&c.transport_errors),
            connections: get(&c.connections),
            watches: get(&c.watches),
            rotations: get(&c.rotations),
            renewals: get(&c.renewals),
            cache_errors: get(&c.cache_errors),
            changes,
        }
    }
}

/// Latency percentiles of one route, milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(samples: &[u32]) -> Self {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let at = |q: f64| -> f64 {
            if sorted.is_empty() {
                return 0.0;
            }
            let rank = ((sorted.len() as f64) * q).ceil() as usize;
            f64::from(sorted[rank.clamp(1, sorted.len()) - 1]) / 1000.0
        };
        Self {
            count: sorted.len(),
            p50_ms: at(0.50),
            p90_ms: at(0.90),
            p99_ms: at(0.99),
            max_ms: sorted.last().map_or(0.0, |m| f64::from(*m) / 1000.0),
        }
    }
}

/// What a run measured, for humans ([`std::fmt::Display`]) and scripts (JSON).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub routes: BTreeMap<String, Percentiles>,
    pub rounds_ok: u64,
    pub rounds_failed: u64,
    pub shed: u64,
    pub refused: u64,
    pub http_errors: u64,
    pub transport_errors: u64,
    pub connections: u64,
    pub watches: u64,
    pub rotations: u64,
    pub renewals: u64,
    pub cache_errors: u64,
    /// Changes delivered by the watch streams, by kind.
    pub changes: BTreeMap<String, u64>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "rounds {} ok, {} failed; shed {}, refused {}, other HTTP errors {}, transport errors {}",
            self.rounds_ok,
            self.rounds_failed,
            self.shed,
            self.refused,
            self.http_errors,
            self.transport_errors
        )?;
        writeln!(
            f,
            "connections {}, watch streams {}, rotations {}, renewals {} ({} not cached), changes delivered {:?}",
            self.connections, self.watches, self.rotations, self.renewals, self.cache_errors, self.changes
        )?;
        writeln!(
            f,
            "{:<28} {:>8} {:>9} {:>9} {:>9} {:>9}",
            "route", "count", "p50 ms", "p90 ms", "p99 ms", "max ms"
        )?;
        for (route, p) in &self.routes {
            writeln!(
                f,
                "{route:<28} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                p.count, p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<u32> = (1..=100).map(|ms| ms * 1000).collect();
        let p = Percentiles::of(&samples);
        assert_eq!(
            (p.count, p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms),
            (100, 50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(Percentiles::of(&[]).p99_ms, 0.0);
        assert_eq!(Percentiles::of(&[7000]).p50_ms, 7.0);
    }

    #[test]
    fn the_report_counts_what_was_recorded() {
        let recorder = Recorder::default();
        recorder.latency("secret-status", Duration::from_millis(3));
        recorder.delivered("m", "machine_revoked");
        Counters::add(&recorder.counters.shed);
        let report = recorder.report();
        assert_eq!(report.routes["secret-status"].count, 1);
        assert_eq!(report.changes["machine_revoked"], 1);
        assert_eq!(report.shed, 1);
        assert!(report.to_string().contains("secret-status"));
        recorder.reset_samples();
        assert!(recorder.report().routes.is_empty());
    }
}
