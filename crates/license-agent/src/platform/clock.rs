//! Time for expiry decisions that never runs backwards (DESIGN.md §2: clock rollback is a
//! classic POS attack to stretch a license or a grace period).
//!
//! The guard keeps a high-water mark of the wall clock, persisted in state.json and started
//! from the latest time the machine has seen attested (see the daemon): "now" for every expiry
//! decision is the later of the system clock and that mark, so setting the clock back changes
//! nothing.
//!
//! Once the server has told its time in this run ([`GuardedClock::attest`], over the pinned
//! TLS channel), the system clock is also bounded from above: "now" is at most the server's
//! time plus the (monotonic) time elapsed since, plus [`MAX_SKEW_SECS`], and the mark is
//! pulled back into that window. A clock jumped forward (bad RTC, spoofed NTP) therefore
//! expires nothing early while the server can be reached, and its damage to the mark is undone
//! at the next contact. Offline, only the floor holds.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// How far ahead of the server's time "now" may run (ordinary clock drift); well inside the
/// server's own tolerance for a rotate request's timestamp (300 s).
pub const MAX_SKEW_SECS: i64 = 60;

#[derive(Debug)]
pub struct GuardedClock {
    high_water: AtomicI64,
    /// The server's time at the last contact of this run, and when it was read.
    attested: Mutex<Option<(i64, Instant)>>,
}

/// The system clock in Unix seconds (unguarded: for expiry decisions use [`GuardedClock`]).
pub fn system_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl GuardedClock {
    /// Starts from a persisted mark; reports a rollback when the system clock is behind it.
    pub fn new(persisted_high_water: i64) -> (Self, Option<i64>) {
        let now = system_now();
        let rollback = (now + 1 < persisted_high_water).then_some(persisted_high_water - now);
        (
            Self {
                high_water: AtomicI64::new(now.max(persisted_high_water)),
                attested: Mutex::new(None),
            },
            rollback,
        )
    }

    /// Unix seconds, never earlier than any value returned before (or persisted), never later
    /// than attested time allows.
    pub fn now(&self) -> i64 {
        self.now_with(system_now())
    }

    fn now_with(&self, system: i64) -> i64 {
        let bounded = match self.attested_now() {
            Some(attested) => system.min(attested + MAX_SKEW_SECS),
            None => system,
        };
        let previous = self.high_water.fetch_max(bounded, Ordering::AcqRel);
        previous.max(bounded)
    }

    /// Raises the mark to `t` (from an independent time source such as the TPM clock), within
    /// what attested time allows.
    pub fn advance_to(&self, t: i64) {
        let t = match self.attested_now() {
            Some(attested) => t.min(attested + MAX_SKEW_SECS),
            None => t,
        };
        self.high_water.fetch_max(t, Ordering::AcqRel);
    }

    /// The server's time `server_time`, just read: the mark is brought into
    /// `[server_time, server_time + MAX_SKEW_SECS]` and bounds "now" from then on.
    pub fn attest(&self, server_time: i64) {
        *self.attested.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((server_time, Instant::now()));
        let _ = self
            .high_water
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |mark| {
                Some(mark.clamp(server_time, server_time + MAX_SKEW_SECS))
            });
    }

    /// The server's time now, as far as the last attestation tells (its time then plus the
    /// monotonic time elapsed since); `None` before any in this run.
    pub fn attested_now(&self) -> Option<i64> {
        self.attested
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|(t, at)| t + i64::try_from(at.elapsed().as_secs()).unwrap_or(i64::MAX / 4))
    }

    /// The mark to persist.
    pub fn high_water(&self) -> i64 {
        self.high_water.load(Ordering::Acquire)
    }

    /// How far the system clock is behind the mark right now (0 when it is not).
    pub fn rollback_secs(&self) -> i64 {
        (self.high_water() - system_now()).max(0)
    }
}

/// Unix seconds as RFC 3339 (the number itself if out of range).
pub fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attested_time_bounds_a_clock_jumped_forward_and_lifts_one_set_back() {
        let now = system_now();
        // The mark was poisoned by a jump of a year.
        let (clock, _) = GuardedClock::new(now + 365 * 86_400);
        assert!(clock.now() > now + 364 * 86_400);
        clock.attest(now);
        let t = clock.now_with(now + 365 * 86_400);
        assert!((now..=now + MAX_SKEW_SECS + 5).contains(&t), "{t}");
        assert!(
            clock.high_water() <= now + MAX_SKEW_SECS + 5,
            "the mark is pulled back"
        );
        // A clock set back is lifted to the server's time.
        clock.attest(now + 1_000);
        assert!(clock.now_with(now - 86_400) >= now + 1_000);
        assert!(clock.attested_now().unwrap() >= now + 1_000);
    }

    #[test]
    fn never_runs_backwards() {
        let future = system_now() + 3600;
        let (clock, rollback) = GuardedClock::new(future);
        assert!(rollback.unwrap() >= 3599);
        assert_eq!(clock.now(), future);
        assert!(clock.rollback_secs() > 0);
        let (clock, rollback) = GuardedClock::new(0);
        assert!(rollback.is_none());
        let a = clock.now();
        assert!(clock.now() >= a);
    }
}
