//! `GET /api/v1/watch`: the change stream a connected agent holds (protocol in
//! `license_protocol::watch`, feed in `service::changes`).
//!
//! The request is authenticated like any other agent request (certificate and machine checked
//! against the database), then the stream costs no database access at all: `hello`, what the
//! agent missed since its cursor (or `resync`), then the feed's changes for this machine as
//! they come, a `ping` every `watch_heartbeat_secs`, and the end after `watch_max_secs` (± a
//! tenth, so streams opened together do not all reconnect together), when the agent
//! reconnects and is checked again. A machine holds at most [`MAX_STREAMS_PER_MACHINE`]
//! streams on one process (more: 429 `rate_limited`). A revocation of the machine (or of a
//! certificate of it) ends the stream after its event: the agent's next request is checked
//! again. A stream that falls behind the feed is told to `resync`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use license_protocol::error::ErrorCode;
use license_protocol::watch::{ChangeKind, EventType, WatchEvent, WatchQuery};
use rand::Rng as _;
use tokio::sync::broadcast;
use tokio::time::{interval_at, sleep, Instant, Interval, MissedTickBehavior, Sleep};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::agent::AuthenticatedMachine;
use super::error::{ApiFailure, ApiQuery};
use super::refusals::AgentRefusals;
use crate::clock::Timestamp;
use crate::service::changes::{Backlog, Change, ChangeFeed, StreamPlace, MAX_STREAMS_PER_MACHINE};
use crate::service::{SharedState, WatchSettings};

pub fn router() -> OpenApiRouter<SharedState> {
    OpenApiRouter::new().routes(routes!(watch))
}

/// The change stream of the calling machine (server-sent events, one JSON `WatchEvent` per
/// `data:` line): `hello`, then `change`, `resync` and `ping` events until the server ends it.
#[utoipa::path(get, path = "/api/v1/watch", tag = "agent", params(WatchQuery),
    responses(AgentRefusals,
              (status = 200, description = "`text/event-stream`: one `data: <WatchEvent JSON>` line per event", content_type = "text/event-stream", body = WatchEvent),
              (status = 400, description = "`invalid_request`: `since` does not parse", body = license_protocol::error::ApiError),
              (status = 429, description = "`rate_limited`: the machine already holds 4 streams on this server", body = license_protocol::error::ApiError)))]
async fn watch(
    State(state): State<SharedState>,
    Extension(machine): Extension<AuthenticatedMachine>,
    ApiQuery(query): ApiQuery<WatchQuery>,
) -> Response {
    let machine_id = machine.identity.machine_id.to_string();
    let Some(place) = state.changes.take_place(&machine_id) else {
        return ApiFailure::refused(
            ErrorCode::RateLimited,
            format!(
                "machine {machine_id} already holds {MAX_STREAMS_PER_MACHINE} watch streams on this server; close one first"
            ),
        )
        .into_response();
    };
    let (changes, backlog) = state.changes.subscribe(&machine_id, query.since);
    let stream = Stream::new(
        machine_id,
        state.changes.clone(),
        state.settings.watch,
        changes,
        backlog,
        place,
    );
    let body = Body::from_stream(futures_util::stream::unfold(stream, |mut stream| async {
        let event = stream.next().await?;
        Some((Ok::<_, Infallible>(event), stream))
    }));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-store"),
            // Proxies that buffer answers (nginx) pass this one through as it comes.
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        body,
    )
        .into_response()
}

/// How the heartbeats of every stream on a process line up: on whole seconds of one clock, so
/// the pings due in the same second are sent in one wake-up of the runtime rather than one
/// each (a process holding 20,000 streams would otherwise wake every 1.5 ms to ping one).
const PING_GRID: Duration = Duration::from_secs(1);

/// The first instant on the [`PING_GRID`] at or after `at`.
fn on_grid(at: Instant) -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    let since = at.saturating_duration_since(origin).as_nanos();
    let grid = PING_GRID.as_nanos();
    let steps = since.div_ceil(grid);
    origin + Duration::from_nanos(u64::try_from(steps * grid).unwrap_or(u64::MAX))
}

/// One machine's stream: the response body itself, polled by the connection that carries it
/// (no task or channel of its own; dropped when the agent goes away).
struct Stream {
    machine: String,
    feed: Arc<ChangeFeed>,
    settings: WatchSettings,
    changes: broadcast::Receiver<Change>,
    /// Events due before anything else (`hello`, then the backlog).
    queued: VecDeque<Bytes>,
    /// The stream ends once `queued` is written (a revocation of its machine was in it).
    ending: bool,
    end: Pin<Box<Sleep>>,
    heartbeat: Interval,
    /// Given back when the stream ends.
    _place: StreamPlace,
}

impl Stream {
    fn new(
        machine: String,
        feed: Arc<ChangeFeed>,
        settings: WatchSettings,
        changes: broadcast::Receiver<Change>,
        backlog: Backlog,
        place: StreamPlace,
    ) -> Self {
        let max = settings.max_secs;
        let lifetime = rand::thread_rng().gen_range(max - max / 10..=max + max / 10);
        let every = Duration::from_secs(settings.heartbeat_secs);
        let mut heartbeat = interval_at(on_grid(Instant::now() + every), every);
        // A late tick (a busy process) keeps the grid rather than bursting to catch up.
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut stream = Self {
            machine,
            feed,
            settings,
            changes,
            queued: VecDeque::new(),
            ending: false,
            end: Box::pin(sleep(Duration::from_secs(lifetime))),
            heartbeat,
            _place: place,
        };
        let hello = stream.event(EventType::Hello, None, 0);
        stream.queued.push_back(hello);
        match backlog {
            Backlog::Resync => {
                let resync = stream.event(EventType::Resync, None, stream.settings.spread_secs);
                stream.queued.push_back(resync);
            }
            Backlog::Replay(missed) => {
                for change in &missed {
                    if !stream.ending {
                        let event = stream.change(change);
                        stream.queued.push_back(event);
                    }
                }
            }
        }
        stream
    }

    /// One event on the wire.
    fn event(&self, event: EventType, kind: Option<ChangeKind>, spread_secs: u32) -> Bytes {
        let heartbeat_secs = (event == EventType::Hello).then_some(self.settings.heartbeat_secs);
        Bytes::from(
            WatchEvent {
                event,
                cursor: self.feed.cursor(),
                kind,
                spread_secs,
                server_time: Timestamp::now().0,
                heartbeat_secs,
            }
            .to_sse(),
        )
    }

    /// A change's event; a revocation of this machine (or of a certificate of it) ends the
    /// stream after it, as the agent's next request is refused.
    fn change(&mut self, change: &Change) -> Bytes {
        let spread = if change.machine.is_some() {
            0
        } else {
            self.settings.spread_secs
        };
        self.ending |= change.machine.is_some()
            && matches!(
                change.kind,
                ChangeKind::MachineRevoked | ChangeKind::CertificateRevoked
            );
        self.event(EventType::Change, Some(change.kind), spread)
    }

    /// The next event, or `None` when the stream ends.
    async fn next(&mut self) -> Option<Bytes> {
        if let Some(queued) = self.queued.pop_front() {
            return Some(queued);
        }
        loop {
            if self.ending {
                return None;
            }
            tokio::select! {
                () = &mut self.end => return None,
                _ = self.heartbeat.tick() => return Some(self.event(EventType::Ping, None, 0)),
                received = self.changes.recv() => match received {
                    Ok(change) if change.concerns(&self.machine) => return Some(self.change(&change)),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        return Some(self.event(EventType::Resync, None, self.settings.spread_secs));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            }
        }
    }
}
