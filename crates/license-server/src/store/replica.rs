//! A PostgreSQL read replica (a hot standby of `database_url`) and how fresh it is.
//!
//! In a large fleet most database reads are the per-request certificate check and the agents'
//! status reads; a hot standby can take them, provided it is not behind on what they must see
//! (a revocation is in force within a second). Which reads go there is `service::reads`; this
//! module measures the standby.
//!
//! Freshness is measured on write-ahead log positions, not on clocks. Every [`SAMPLE_INTERVAL`]
//! the [`monitor`] notes the instant `T`, reads the primary's `pg_current_wal_lsn()` (every
//! transaction committed before `T` was written below it, `synchronous_commit` not being `off`:
//! PostgreSQL's default), then the standby's
//! `pg_last_wal_replay_lsn()`. Once the standby has replayed up to the primary's position of
//! `T`, it holds every commit made before `T`: it is *fresh as of* `T`. [`Freshness`] keeps that
//! bookkeeping, without I/O and given its instants, so it is tested with a made-up clock.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::AnyPool;

use super::{Store, StoreError};

/// How often the monitor samples both positions.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(200);
/// A failing replica (reads or samples) is logged at most this often.
pub const LOG_EVERY: Duration = Duration::from_secs(60);
/// Primary positions kept while the replica has not replayed them (about 200 s of samples
/// with writes between each): when the replica is further behind, the oldest are dropped and
/// it is taken as fresh as of a later one once it catches up (later than it is: on the safe side).
const MAX_PENDING: usize = 1024;

/// A position in PostgreSQL's write-ahead log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Parses PostgreSQL's text form of `pg_lsn`: two hexadecimal halves, `16/B374D848`.
    pub fn parse(text: &str) -> Option<Self> {
        let (high, low) = text.trim().split_once('/')?;
        let half = |h: &str| {
            (!h.is_empty() && h.len() <= 8)
                .then(|| u32::from_str_radix(h, 16).ok())
                .flatten()
        };
        Some(Self(u64::from(half(high)?) << 32 | u64::from(half(low)?)))
    }
}

/// What the samples so far say of the replica (module docs).
#[derive(Debug, Default)]
pub struct Freshness {
    /// Primary positions the replica had not replayed when last read, oldest first, each with
    /// the instant sampled; positions grow along the queue.
    pending: VecDeque<(Instant, Lsn)>,
    /// The newest primary sample taken in.
    last_primary: Option<(Instant, Lsn)>,
    /// The replica's replayed position, as last read.
    replayed: Option<Lsn>,
    /// The replica holds every commit made before this instant.
    fresh_as_of: Option<Instant>,
}

impl Freshness {
    /// The primary's position sampled at `at` (`at` noted before the query was sent).
    pub fn primary(&mut self, at: Instant, lsn: Lsn) {
        // Out of order, or a position that went back (another server answers for the primary):
        // not believed, as it could make the replica look fresher than it is. Reads then stay
        // on the primary until its position passes the newest one seen.
        if self
            .last_primary
            .is_some_and(|(last_at, last)| at < last_at || lsn < last)
        {
            return;
        }
        self.last_primary = Some((at, lsn));
        if self.replayed.is_some_and(|replayed| replayed >= lsn) {
            self.fresh_up_to(at);
            return;
        }
        match self.pending.back_mut() {
            // A later instant with the same position says more: replace.
            Some(last) if last.1 == lsn => last.0 = at,
            _ => {
                self.pending.push_back((at, lsn));
                if self.pending.len() > MAX_PENDING {
                    self.pending.pop_front();
                }
            }
        }
    }

    /// The replica's replayed position, as just read.
    pub fn replica(&mut self, replayed: Lsn) {
        if self.replayed.is_some_and(|before| replayed < before) {
            // Replay went back: another server answers (a rebuilt standby). What was known of
            // the old one says nothing of it.
            self.fresh_as_of = None;
        }
        self.replayed = Some(replayed);
        while let Some(&(at, lsn)) = self.pending.front() {
            if lsn > replayed {
                break;
            }
            self.fresh_up_to(at);
            self.pending.pop_front();
        }
    }

    fn fresh_up_to(&mut self, at: Instant) {
        self.fresh_as_of = Some(self.fresh_as_of.map_or(at, |before| before.max(at)));
    }

    /// The replica holds every commit made before this instant; `None`: not known to hold
    /// anything yet.
    pub fn fresh_as_of(&self) -> Option<Instant> {
        self.fresh_as_of
    }

    /// How far behind the replica may be at `now` (`now` minus [`Freshness::fresh_as_of`]):
    /// at least the time since the last sample, and growing while the replica does not replay
    /// or cannot be sampled. `None` before the replica was first found fresh.
    pub fn lag(&self, now: Instant) -> Option<Duration> {
        self.fresh_as_of.map(|at| now.saturating_duration_since(at))
    }
}

/// Logs a recurring failure at most once per [`LOG_EVERY`].
#[derive(Debug, Default)]
struct LogLimit(Mutex<Option<Instant>>);

impl LogLimit {
    fn due(&self, now: Instant) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let due = last.is_none_or(|at| now.duration_since(at) >= LOG_EVERY);
        if due {
            *last = Some(now);
        }
        due
    }
}

/// The read replica of a serving process: its pool and its freshness.
#[derive(Debug)]
pub struct ReadReplica {
    store: Store,
    freshness: Mutex<Freshness>,
    read_failures: LogLimit,
    sample_failures: LogLimit,
}

impl ReadReplica {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            freshness: Mutex::new(Freshness::default()),
            read_failures: LogLimit::default(),
            sample_failures: LogLimit::default(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn freshness(&self) -> std::sync::MutexGuard<'_, Freshness> {
        self.freshness.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// See [`Freshness::fresh_as_of`].
    pub fn fresh_as_of(&self) -> Option<Instant> {
        self.freshness().fresh_as_of()
    }

    /// See [`Freshness::lag`].
    pub fn lag(&self, now: Instant) -> Option<Duration> {
        self.freshness().lag(now)
    }

    /// A read on the replica failed and went to the primary instead: logged once a minute.
    pub fn read_failed(&self, error: &StoreError) {
        if self.read_failures.due(Instant::now()) {
            tracing::warn!(error = %error, "read replica failed; reading from the primary (logged once a minute)");
        }
    }

    /// One sample of both positions (module docs).
    async fn sample(&self, primary: &AnyPool) -> Result<(), SampleError> {
        let at = Instant::now();
        let lsn = position(primary, "SELECT pg_current_wal_lsn()::text", "primary").await?;
        self.freshness().primary(at, lsn);
        let replayed = position(
            self.store.pool(),
            "SELECT pg_last_wal_replay_lsn()::text",
            "replica",
        )
        .await?;
        self.freshness().replica(replayed);
        Ok(())
    }
}

/// Why a sample could not be taken.
#[derive(Debug, thiserror::Error)]
enum SampleError {
    #[error("{which}: {source}")]
    Database {
        which: &'static str,
        source: sqlx::Error,
    },
    #[error("{0} answered no write-ahead log position (is database_read_url a hot standby?)")]
    NoPosition(&'static str),
}

async fn position(pool: &AnyPool, sql: &str, which: &'static str) -> Result<Lsn, SampleError> {
    let text: Option<String> = sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .map_err(|source| SampleError::Database { which, source })?;
    text.as_deref()
        .and_then(Lsn::parse)
        .ok_or(SampleError::NoPosition(which))
}

/// Samples the primary and the replica every [`SAMPLE_INTERVAL`] until dropped (the server
/// aborts it at shutdown). A failed sample leaves the freshness where it was, so the replica
/// ages out of use.
pub async fn monitor(replica: std::sync::Arc<ReadReplica>, primary: AnyPool) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = replica.sample(&primary).await {
            if replica.sample_failures.due(Instant::now()) {
                tracing::warn!(error = %e, "cannot tell how fresh the read replica is; reading from the primary meanwhile (logged once a minute)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn positions_parse_as_postgres_prints_them() {
        assert_eq!(Lsn::parse("0/0"), Some(Lsn(0)));
        assert_eq!(Lsn::parse("16/B374D848"), Some(Lsn(0x16_B374_D848)));
        assert_eq!(Lsn::parse("FFFFFFFF/FFFFFFFF"), Some(Lsn(u64::MAX)));
        assert!(Lsn::parse("0/3") < Lsn::parse("1/0"));
        for bad in ["", "16", "/1", "1/", "x/1", "1/2/3", "123456789/0", "-1/0"] {
            assert_eq!(Lsn::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_replica_is_fresh_as_of_the_primary_position_it_replayed() {
        let t0 = Instant::now();
        let mut f = Freshness::default();
        assert_eq!(f.fresh_as_of(), None);
        assert_eq!(f.lag(t0), None);
        // In step: fresh as of each sample.
        f.primary(t0, Lsn(100));
        f.replica(Lsn(100));
        assert_eq!(f.fresh_as_of(), Some(t0));
        assert_eq!(f.lag(t0 + ms(50)), Some(ms(50)));
        // The primary moves on; the replica follows one sample late.
        f.primary(t0 + ms(200), Lsn(150));
        f.replica(Lsn(120));
        assert_eq!(f.fresh_as_of(), Some(t0), "150 not replayed yet");
        f.primary(t0 + ms(400), Lsn(180));
        f.replica(Lsn(160));
        assert_eq!(f.fresh_as_of(), Some(t0 + ms(200)));
        assert_eq!(f.lag(t0 + ms(400)), Some(ms(200)));
        // Replay paused: the lag grows with time, whatever the primary does.
        for i in 3..=10 {
            f.primary(t0 + ms(200 * i), Lsn(180 + i));
            f.replica(Lsn(160));
        }
        assert_eq!(f.fresh_as_of(), Some(t0 + ms(200)));
        assert_eq!(f.lag(t0 + ms(2000)), Some(ms(1800)));
        // Replay resumes and catches up: fresh as of the newest sample it covers.
        f.replica(Lsn(186));
        assert_eq!(f.fresh_as_of(), Some(t0 + ms(1200)));
        f.replica(Lsn(190));
        assert_eq!(f.fresh_as_of(), Some(t0 + ms(2000)));
    }

    #[test]
    fn a_quiet_primary_keeps_the_replica_fresh_and_samples_stay_few() {
        let t0 = Instant::now();
        let mut f = Freshness::default();
        f.replica(Lsn(500));
        // The replica already replayed what the primary reports: fresh at once.
        f.primary(t0, Lsn(500));
        assert_eq!(f.fresh_as_of(), Some(t0));
        f.replica(Lsn(400));
        assert_eq!(f.fresh_as_of(), None, "replay went back: another server");
        // A paused replica with no writes on the primary: one pending sample, moving forward.
        for i in 1..5000 {
            f.primary(t0 + ms(200 * i), Lsn(500));
        }
        assert_eq!(f.pending.len(), 1);
        f.replica(Lsn(500));
        assert_eq!(f.fresh_as_of(), Some(t0 + ms(200 * 4999)));
        // Far behind under writes: the queue is bounded, and freshness errs on the safe side.
        for i in 0..(MAX_PENDING as u64 + 10) {
            f.primary(t0 + ms(1_000_000 + i), Lsn(1000 + i));
        }
        assert_eq!(f.pending.len(), MAX_PENDING);
        f.replica(Lsn(1005));
        assert_eq!(
            f.fresh_as_of(),
            Some(t0 + ms(200 * 4999)),
            "samples dropped"
        );
        f.replica(Lsn(1020));
        assert_eq!(f.fresh_as_of(), Some(t0 + ms(1_000_020)));
        // A primary position that went back is not believed: it would make the replica look
        // fresh as of an instant it is not.
        f.primary(t0 + ms(3_000_000), Lsn(10));
        f.replica(Lsn(1020));
        assert_eq!(f.fresh_as_of(), Some(t0 + ms(1_000_020)));
    }
}
