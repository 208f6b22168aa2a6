//! The validation socket for POS applications (DESIGN.md §3.2): the peer's uid/gid checked
//! against `[ipc] allowed_uids`/`allowed_gids` → each frame parsed into a request → the
//! [`Validator`] → the answer made durable in the audit log → the framed answer. A connection
//! carries any number of requests.
//!
//! A frame over 64 KiB is answered `frame_too_large` and the connection closed (it cannot be
//! resynchronised); bad JSON and unknown ops are answered and the connection kept. Limits,
//! timeouts and the drain are the [`listener`](super::listener)'s.
//!
//! A refused peer is answered `not_authorized` and closed. Refusals are recorded per uid and
//! [`REFUSAL_WINDOW`]: the first of a window raises the alert and writes the audit entry (with
//! how many were only counted in the window before), the others are counted — so a local user
//! flooding the socket costs one record a minute, not two per connection, and cannot flush the
//! audit log's history with refusals.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use license_audit::{Actor, Event, Outcome};
use license_protocol::ipc::{parse_request, Reason, Request, Response};

use super::listener::{Connection, Frame, Handler};
use crate::access::{Access, Peer, Principal, SharedAccess};
use crate::alerts::{AlertKind, Alerts};
use crate::audit::Audit;
use crate::validation::{Subject, Validator};

/// How long the refusals of one uid are coalesced into one record.
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(60);

/// Refused peers by uid: when the current window started and how many were only counted.
#[derive(Debug, Default)]
pub struct Refusals(Mutex<HashMap<Principal, (Instant, u64)>>);

impl Refusals {
    /// `Some(counted)` when this refusal opens a new window and is to be recorded (`counted`:
    /// the refusals only counted in the window before); `None` when it is only counted.
    pub fn note(&self, user: &Principal, now: Instant) -> Option<u64> {
        let mut windows = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if windows.len() > 4096 {
            windows.clear(); // uids are few; a map this large is garbage
        }
        match windows.get_mut(user) {
            Some((started, counted)) if now.duration_since(*started) < REFUSAL_WINDOW => {
                *counted += 1;
                None
            }
            Some(window) => {
                let counted = window.1;
                *window = (now, 0);
                Some(counted)
            }
            None => {
                windows.insert(user.clone(), (now, 0));
                Some(0)
            }
        }
    }
}

/// The validation socket's connections.
#[derive(Debug)]
pub struct ValidationSocket {
    pub validator: Arc<Validator>,
    /// Where every validation (unless `audit_validations` is off) and refused peer is recorded.
    pub audit: Audit,
    pub alerts: Alerts,
    pub audit_validations: bool,
    /// Who may connect (reloadable).
    pub access: SharedAccess,
    /// Refused peers, coalesced per uid.
    pub refusals: Refusals,
}

impl ValidationSocket {
    /// Answers a refused peer `not_authorized` (the connection then ends), recording the
    /// refusal when it opens a new window (see the module docs). The record is not waited
    /// for: nothing is validated for this peer.
    async fn refuse(&self, mut conn: Connection, peer: &Peer, why: &str) -> std::io::Result<()> {
        if let Some(counted) = self.refusals.note(&peer.user, Instant::now()) {
            let mut details = peer.details();
            details["refused_before_in_window"] = counted.into();
            self.alerts
                .raise(
                    AlertKind::UnauthorizedAccess,
                    &format!("validation socket: peer refused ({why})"),
                    details.clone(),
                )
                .await;
            // uid and pid are the actor; the rest (gid, or the SID) goes with the reason.
            let mut event = Event::new("ipc.peer_refused", Outcome::Refused).actor(peer.actor());
            for (key, value) in details.as_object().into_iter().flatten() {
                if !["uid", "pid", "refused_before_in_window"].contains(&key.as_str()) {
                    event = event.detail(key.clone(), value.clone());
                }
            }
            self.audit
                .note(
                    event
                        .detail("reason", why)
                        .detail("refused_before_in_window", counted),
                )
                .await;
        }
        conn.send(&Response::invalid(Reason::NotAuthorized, None))
            .await
    }
}

impl Handler for ValidationSocket {
    const NAME: &'static str = "validation";

    async fn connection(self: Arc<Self>, mut conn: Connection, peer: Peer) -> std::io::Result<()> {
        let actor = peer.actor();
        if !Access::current(&self.access).may_validate(&peer) {
            return self
                .refuse(conn, &peer, "not in ipc.allowed_uids/allowed_gids")
                .await;
        }
        loop {
            let payload = match conn.read_frame().await? {
                // Access is decided again for every request: a uid removed from the allow-lists
                // by a reload loses the connections it holds at their next request.
                Frame::Payload(_) if !Access::current(&self.access).may_validate(&peer) => {
                    return self
                        .refuse(conn, &peer, "access withdrawn by a reload")
                        .await;
                }
                Frame::Payload(payload) => payload,
                Frame::Closed => return Ok(()),
                Frame::TooLarge => {
                    return conn
                        .send(&Response::invalid(Reason::FrameTooLarge, None))
                        .await
                }
                Frame::Empty => {
                    conn.send(&Response::invalid(Reason::BadRequest, None))
                        .await?;
                    continue;
                }
            };
            let response = match parse_request(&payload) {
                Ok(Request::ValidateLicense {
                    license_token,
                    nonce,
                }) => self.validator.validate_with_subject(&license_token, nonce),
                Err((error, nonce)) => {
                    (Response::invalid(error.reason(), nonce), Subject::default())
                }
            };
            let response = if self.audit_validations {
                audited(&self.audit, actor, response).await
            } else {
                response.0
            };
            conn.send(&response).await?;
        }
    }
}

/// Records the answer durably before it is sent (also used by the management `validate`); an
/// answer that cannot be recorded is not given (`internal` instead). The record names the
/// license and the secret version when they could be read, and the verdict; never the token.
pub async fn audited(
    audit: &Audit,
    actor: Actor,
    (response, subject): (Response, Subject),
) -> Response {
    // The verdict: the outcome, and the reason of a refusal.
    let mut event = match &response {
        Response::Valid(_) => Event::new("license.validate", Outcome::Success),
        Response::Invalid(refusal) => Event::new("license.validate", Outcome::Refused)
            .detail("reason", refusal.reason.as_str()),
    }
    .actor(actor);
    if let Some(id) = subject.license_id {
        event = event.detail("license_id", id.to_string());
    }
    if let Some(version) = subject.secret_version {
        event = event.detail("secret_version", version);
    }
    match audit.durable(event).await {
        Ok(()) => response,
        Err(e) => {
            tracing::error!(error = %e, "validation not answered: its audit record could not be written");
            Response::invalid(Reason::Internal, response.nonce().map(str::to_string))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_recorded_once_per_uid_and_window() {
        let refusals = Refusals::default();
        let t0 = Instant::now();
        assert_eq!(refusals.note(&Principal::Uid(1000), t0), Some(0));
        for i in 1..=50 {
            assert_eq!(
                refusals.note(&Principal::Uid(1000), t0 + Duration::from_millis(i)),
                None
            );
        }
        assert_eq!(
            refusals.note(&Principal::Uid(2000), t0),
            Some(0),
            "another uid has its own window"
        );
        assert_eq!(
            refusals.note(&Principal::Uid(1000), t0 + REFUSAL_WINDOW),
            Some(50),
            "the next window's record counts the ones only counted"
        );
        assert_eq!(
            refusals.note(&Principal::Uid(1000), t0 + REFUSAL_WINDOW),
            None
        );
    }
}
