//! Where a machine's reads go: the read replica (`database_read_url`) when it is fresh enough
//! for them, the primary otherwise.
//!
//! The reads routed here are the ones every agent makes all the time: the certificate and
//! machine check of each request (but a certificate renewal's, which issues a certificate and
//! reads the primary), its secret status (with the update offer) and its licenses, and online
//! license validation. They go to the replica only when it holds
//!
//! - every commit made on the primary up to `read_replica_max_lag_ms` ago, and
//! - every write concerning the machine (or every machine) that this process's change feed
//!   has read, or that this process made itself (`changes::ChangeFeed::last_change`),
//!
//! as the replica's monitor measures it (`store::replica`). So a revocation committed at `C`
//! is seen by every request after `C + read_replica_max_lag_ms`, and by every request after
//! the feed read it (when notified, or every `watch_feed_interval_ms`), whichever comes first; on the process
//! that made it, at once. A replica that fails a read, or does not know what it is asked
//! for (a certificate issued a moment ago), hands the read to the primary. Writes, and every
//! other read, go to the primary.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::AnyPool;

use super::AppState;
use crate::store::replica::ReadReplica;
use crate::store::StoreError;

/// The read replica, if any, and the reads served by each pool.
#[derive(Debug)]
pub struct Reads {
    replica: Option<Arc<ReadReplica>>,
    max_lag: Duration,
    primary_reads: AtomicU64,
    replica_reads: AtomicU64,
}

impl Default for Reads {
    /// No replica: every read on the primary.
    fn default() -> Self {
        Self::new(
            None,
            Duration::from_millis(crate::config::DEFAULT_READ_REPLICA_MAX_LAG_MS),
        )
    }
}

impl Reads {
    pub fn new(replica: Option<ReadReplica>, max_lag: Duration) -> Self {
        Self {
            replica: replica.map(Arc::new),
            max_lag,
            primary_reads: AtomicU64::new(0),
            replica_reads: AtomicU64::new(0),
        }
    }

    /// The replica, when one is configured.
    pub fn replica(&self) -> Option<&Arc<ReadReplica>> {
        self.replica.as_ref()
    }

    /// Routed reads answered so far: (by the primary, by the replica).
    pub fn served(&self) -> (u64, u64) {
        (
            self.primary_reads.load(Ordering::Relaxed),
            self.replica_reads.load(Ordering::Relaxed),
        )
    }
}

/// Whether a replica that holds every commit made before `fresh_as_of` may serve, at `now`, a
/// read of a machine whose last write was seen at `last_change`.
pub fn replica_may_serve(
    fresh_as_of: Option<Instant>,
    last_change: Option<Instant>,
    now: Instant,
    max_lag: Duration,
) -> bool {
    fresh_as_of.is_some_and(|fresh| {
        fresh + max_lag >= now && last_change.is_none_or(|changed| fresh >= changed)
    })
}

/// Runs `read` for `machine_id` on the pool the module docs choose. `Ok(None)` (not found) from
/// the replica, or an error, asks the primary instead: a row may not have reached the replica.
pub async fn for_machine<T, F, Fut>(
    state: &AppState,
    machine_id: &str,
    read: F,
) -> Result<Option<T>, StoreError>
where
    F: Fn(AnyPool) -> Fut,
    Fut: Future<Output = Result<Option<T>, StoreError>>,
{
    let reads = &state.reads;
    if let Some(replica) = &reads.replica {
        let now = Instant::now();
        let last_change = state.changes.last_change(machine_id, now);
        if replica_may_serve(replica.fresh_as_of(), last_change, now, reads.max_lag) {
            match read(replica.store().pool().clone()).await {
                Ok(Some(found)) => {
                    reads.replica_reads.fetch_add(1, Ordering::Relaxed);
                    return Ok(Some(found));
                }
                Ok(None) => {}
                Err(e) => replica.read_failed(&e),
            }
        }
    }
    let answer = read(state.store.pool().clone()).await?;
    reads.primary_reads.fetch_add(1, Ordering::Relaxed);
    Ok(answer)
}

/// [`for_machine`] for a read that always has an answer (an empty list, say).
pub async fn for_machine_always<T, F, Fut>(
    state: &AppState,
    machine_id: &str,
    read: F,
) -> Result<T, StoreError>
where
    F: Fn(AnyPool) -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    for_machine(state, machine_id, |pool| {
        let answer = read(pool);
        async move { answer.await.map(Some) }
    })
    .await?
    .ok_or_else(|| StoreError::Corrupt("a read that always answers answered nothing".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replica_serves_only_what_it_is_known_to_hold() {
        let t0 = Instant::now();
        let lag = Duration::from_millis(1000);
        let ms = Duration::from_millis;
        // Never found fresh: the primary.
        assert!(!replica_may_serve(None, None, t0, lag));
        // Fresh as of 900 ms ago, nothing written for the machine since a minute: the replica.
        assert!(replica_may_serve(Some(t0), None, t0 + ms(900), lag));
        assert!(replica_may_serve(Some(t0), None, t0 + lag, lag));
        // Behind by more than the bound: the primary.
        assert!(!replica_may_serve(Some(t0), None, t0 + ms(1001), lag));
        // A write for the machine the replica may not hold: the primary, however small the lag.
        assert!(!replica_may_serve(
            Some(t0),
            Some(t0 + ms(1)),
            t0 + ms(50),
            lag
        ));
        // The replica has caught up past it: the replica again.
        assert!(replica_may_serve(
            Some(t0 + ms(1)),
            Some(t0 + ms(1)),
            t0 + ms(50),
            lag
        ));
        assert!(replica_may_serve(
            Some(t0 + ms(200)),
            Some(t0 + ms(1)),
            t0 + ms(250),
            lag
        ));
    }
}
