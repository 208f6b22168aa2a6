//! The agent's side of the watch stream (`GET /api/v1/watch`, `license_protocol::watch`): one
//! long-lived request on the agent's mTLS connection through which the server pushes what must
//! not wait for the next poll.
//!
//! [`hold`] keeps the stream open for the daemon's lifetime and turns its events into
//! [`Signal`]s: `Connected` once an event arrived (the daemon then spaces its rounds by
//! `watch_poll_interval`), `Round` for a change or a resync (after the random delay up to the
//! event's `spread_secs`), `Lost` when it cannot be reopened (back to `poll_interval`). A
//! stream the server ends is reopened at once from the last cursor, so nothing committed in
//! between is missed; a failed one is retried with jittered exponential backoff, or after the
//! server's `Retry-After`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use license_protocol::watch::{ChangeKind, EventReader, WatchEvent};
use rand::Rng as _;
use tokio::sync::mpsc;

use super::client::{ClientError, ServerClient};

/// Silence after which a stream is taken for dead when the server does not say how often it
/// pings (older servers ping every 30 s).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(95);

/// Silence after which a stream is taken for dead: three pings missed and five seconds more,
/// for the server's ping interval as its `hello` gave it.
pub fn idle_timeout(heartbeat_secs: Option<u64>) -> Duration {
    heartbeat_secs.map_or(IDLE_TIMEOUT, |secs| {
        Duration::from_secs(secs.clamp(1, 3600) * 3 + 5)
    })
}
/// A stream the server ends sooner than this counts as a failure (no tight reconnect loop).
pub const MIN_STREAM: Duration = Duration::from_secs(5);
/// Longest wait between two attempts to reopen the stream.
pub const MAX_RETRY: Duration = Duration::from_secs(600);

/// The change feed's position: the last cursor heard (from the stream or a secret status).
#[derive(Debug, Clone)]
pub struct WatchCursor(Arc<AtomicI64>);

impl Default for WatchCursor {
    fn default() -> Self {
        Self(Arc::new(AtomicI64::new(i64::MIN)))
    }
}

impl WatchCursor {
    /// Moves the position forward (never back).
    pub fn advance(&self, cursor: i64) {
        self.0.fetch_max(cursor, Ordering::Relaxed);
    }

    pub fn get(&self) -> Option<i64> {
        let at = self.0.load(Ordering::Relaxed);
        (at != i64::MIN).then_some(at)
    }
}

/// An open stream: its events as they arrive.
#[derive(Debug)]
pub struct WatchStream {
    response: reqwest::Response,
    reader: EventReader,
    ready: std::collections::VecDeque<WatchEvent>,
}

impl WatchStream {
    pub(super) fn new(response: reqwest::Response) -> Self {
        Self {
            response,
            reader: EventReader::new(),
            ready: std::collections::VecDeque::new(),
        }
    }

    /// The next event; `None` when the server ended the stream. Silence longer than `idle`
    /// is an error.
    pub async fn next(&mut self, idle: Duration) -> Result<Option<WatchEvent>, ClientError> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Ok(Some(event));
            }
            let chunk = tokio::time::timeout(idle, self.response.chunk())
                .await
                .map_err(|_| ClientError::Transport("the watch stream went silent".into()))?
                .map_err(|e| ClientError::Transport(e.to_string()))?;
            let Some(chunk) = chunk else {
                return Ok(None);
            };
            let events = self
                .reader
                .push(&chunk)
                .map_err(|e| ClientError::BadResponse(e.to_string()))?;
            self.ready.extend(events);
        }
    }
}

/// What the stream tells the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The stream is held.
    Connected,
    /// The stream could not be reopened.
    Lost,
    /// Make a round after `delay` (a change, or a resync).
    Round {
        delay: Duration,
        kind: Option<ChangeKind>,
    },
}

/// The wait before reopening after `failures` failed attempts in a row: 1 s doubling to
/// [`MAX_RETRY`], drawn between half of it and all of it, never less than `retry_after`.
pub fn reopen_wait(failures: u32, retry_after: Option<u64>, rng: &mut impl rand::Rng) -> Duration {
    let max = u64::try_from(MAX_RETRY.as_millis()).unwrap_or(u64::MAX);
    let base = (1_000u64 << failures.min(20)).min(max);
    let jittered = rng.gen_range(base / 2..=base);
    Duration::from_millis(jittered.max(retry_after.unwrap_or(0).saturating_mul(1_000)))
}

/// Where [`hold`] gets the connection to use (the current identity's, after a renewal).
pub trait Connection: Send + Sync + 'static {
    fn current(&self) -> ServerClient;
}

/// Holds the watch stream until `signals` is closed (the daemon stopped).
pub async fn hold(connection: impl Connection, cursor: WatchCursor, signals: mpsc::Sender<Signal>) {
    let mut failures = 0u32;
    let mut held = false;
    loop {
        let opened = std::time::Instant::now();
        let mut idle = IDLE_TIMEOUT;
        let outcome = match connection.current().watch(cursor.get()).await {
            Ok(mut stream) => loop {
                match stream.next(idle).await {
                    Ok(Some(event)) => {
                        if event.heartbeat_secs.is_some() {
                            idle = idle_timeout(event.heartbeat_secs);
                        }
                        cursor.advance(event.cursor);
                        if !held {
                            held = true;
                            if signals.send(Signal::Connected).await.is_err() {
                                return;
                            }
                        }
                        failures = 0;
                        if event.asks_for_round() {
                            let spread = u64::from(event.spread_secs) * 1_000;
                            let delay =
                                Duration::from_millis(rand::thread_rng().gen_range(0..=spread));
                            tracing::info!(event = ?event.event, kind = event.kind.map(ChangeKind::as_str),
                                delay_ms = delay.as_millis() as u64, "the server announced a change");
                            let round = Signal::Round {
                                delay,
                                kind: event.kind,
                            };
                            if signals.send(round).await.is_err() {
                                return;
                            }
                        }
                    }
                    // Ended by the server: reopened at once, unless it ends them as soon
                    // as they open.
                    Ok(None) if opened.elapsed() >= MIN_STREAM => break None,
                    Ok(None) => {
                        break Some(ClientError::Transport(
                            "the watch stream ended at once".into(),
                        ))
                    }
                    Err(e) => break Some(e),
                }
            },
            Err(e) => Some(e),
        };
        let Some(error) = outcome else {
            continue;
        };
        failures += 1;
        tracing::debug!(error = %error, failures, "watch stream lost");
        if held || failures == 1 {
            held = false;
            if signals.send(Signal::Lost).await.is_err() {
                return;
            }
        }
        let retry_after = match error {
            ClientError::Busy { retry_after_secs } => retry_after_secs,
            _ => None,
        };
        let wait = reopen_wait(failures, retry_after, &mut rand::thread_rng());
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = signals.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_dead_after_three_missed_pings() {
        assert_eq!(idle_timeout(None), IDLE_TIMEOUT);
        assert_eq!(idle_timeout(Some(30)), Duration::from_secs(95));
        assert_eq!(idle_timeout(Some(120)), Duration::from_secs(365));
        assert_eq!(idle_timeout(Some(0)), Duration::from_secs(8));
    }

    #[test]
    fn the_cursor_only_moves_forward() {
        let cursor = WatchCursor::default();
        assert_eq!(cursor.get(), None);
        cursor.advance(5);
        cursor.advance(3);
        assert_eq!(cursor.clone().get(), Some(5));
    }

    #[test]
    fn reopening_backs_off_with_jitter_and_honours_retry_after() {
        let mut rng = rand::thread_rng();
        let first = reopen_wait(0, None, &mut rng);
        assert!(first >= Duration::from_millis(500) && first <= Duration::from_secs(1));
        let late: std::collections::BTreeSet<u128> = (0..200)
            .map(|_| reopen_wait(30, None, &mut rng).as_millis())
            .collect();
        assert!(*late.last().unwrap() <= MAX_RETRY.as_millis());
        assert!(*late.first().unwrap() >= MAX_RETRY.as_millis() / 2);
        assert!(late.len() > 20, "spread");
        assert!(reopen_wait(0, Some(40), &mut rng) >= Duration::from_secs(40));
    }
}
