//! Load shedding on the agent listener: at most `agent_max_inflight` agent requests are
//! handled at once (certificate check included, so a storm cannot exhaust the database pool);
//! a request that finds no place within [`QUEUE_WAIT`] is answered 503 `server_busy` with a
//! `Retry-After` drawn between half of `agent_retry_after_secs` and all of it, so the agents
//! that were turned away come back spread out instead of together.
//!
//! An agent never stops validating licenses because of it: tokens validate offline, and the
//! agent treats `server_busy` as "not reachable now" (its degraded-mode clock, not a refusal).
//! A watch stream holds its place only while it is being opened.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use license_protocol::error::ErrorCode;
use rand::Rng as _;
use tokio::sync::Semaphore;

use super::error::ApiFailure;
use crate::service::Shedding;

/// How long a request may wait for a place before it is shed.
pub const QUEUE_WAIT: Duration = Duration::from_millis(500);

/// The places of one listener, and how many requests were shed.
#[derive(Debug)]
pub struct Shedder {
    places: Arc<Semaphore>,
    retry_after_secs: u64,
    shed: AtomicU64,
}

impl Shedder {
    pub fn new(settings: Shedding) -> Arc<Self> {
        Arc::new(Self {
            places: Arc::new(Semaphore::new(settings.max_inflight.max(1))),
            retry_after_secs: settings.retry_after_secs.max(1),
            shed: AtomicU64::new(0),
        })
    }

    /// Requests answered 503 so far.
    pub fn shed_total(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }

    /// A `Retry-After` between half of the configured one and all of it.
    fn retry_after(&self) -> u64 {
        let max = self.retry_after_secs;
        rand::thread_rng().gen_range(max.div_ceil(2)..=max)
    }
}

/// Middleware: runs the request in a place, or sheds it.
pub async fn shed(State(shedder): State<Arc<Shedder>>, req: Request, next: Next) -> Response {
    let place = tokio::time::timeout(QUEUE_WAIT, shedder.places.clone().acquire_owned()).await;
    if let Ok(Ok(_place)) = place {
        return next.run(req).await;
    }
    shedder.shed.fetch_add(1, Ordering::Relaxed);
    let retry = shedder.retry_after();
    let mut response = ApiFailure::refused(
        ErrorCode::ServerBusy,
        format!("the server is busy; retry in {retry} seconds"),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_spread_over_the_upper_half() {
        let shedder = Shedder::new(Shedding {
            max_inflight: 1,
            retry_after_secs: 30,
        });
        let drawn: std::collections::BTreeSet<u64> =
            (0..2000).map(|_| shedder.retry_after()).collect();
        assert_eq!(drawn.first(), Some(&15));
        assert_eq!(drawn.last(), Some(&30));
        assert!(drawn.len() > 10, "spread, not one value: {drawn:?}");
    }
}
