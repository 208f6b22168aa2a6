//! Time for expiry decisions that never runs backwards (DESIGN.md §2: clock rollback is a
//! classic POS attack to stretch a license or a grace period).
//!
//! The guard keeps a high-water mark of the wall clock, persisted in state.json: "now" for
//! every expiry decision is the later of the system clock and that mark. Setting the clock
//! back therefore changes nothing; setting it forward only makes things expire sooner.

use std::sync::atomic::{AtomicI64, Ordering};

#[derive(Debug)]
pub struct GuardedClock {
    high_water: AtomicI64,
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
            },
            rollback,
        )
    }

    /// Unix seconds, never earlier than any value returned before (or persisted).
    pub fn now(&self) -> i64 {
        let system = system_now();
        let previous = self.high_water.fetch_max(system, Ordering::AcqRel);
        previous.max(system)
    }

    /// Raises the mark to `t` (from an independent time source such as the TPM clock).
    pub fn advance_to(&self, t: i64) {
        self.high_water.fetch_max(t, Ordering::AcqRel);
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
