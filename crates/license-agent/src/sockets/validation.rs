//! The validation socket for POS applications (DESIGN.md §3.2): the peer's uid/gid checked
//! against `[ipc] allowed_uids`/`allowed_gids` → each frame parsed into a request → the
//! [`Validator`] → the answer made durable in the audit log → the framed answer. A connection
//! carries any number of requests.
//!
//! A frame over 64 KiB is answered `frame_too_large` and the connection closed (it cannot be
//! resynchronised); bad JSON and unknown ops are answered and the connection kept. Limits,
//! timeouts and the drain are the [`listener`](super::listener)'s.

use std::sync::Arc;

use license_audit::{Actor, Event, Outcome};
use license_protocol::ipc::{parse_request, Reason, Request, Response};

use super::listener::{Connection, Frame, Handler};
use crate::access::{Access, Peer, SharedAccess};
use crate::alerts::{AlertKind, Alerts};
use crate::audit::Audit;
use crate::validation::{Subject, Validator};

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
}

impl Handler for ValidationSocket {
    const NAME: &'static str = "validation";

    async fn connection(self: Arc<Self>, mut conn: Connection, peer: Peer) -> std::io::Result<()> {
        let actor = peer.actor();
        if !Access::current(&self.access).may_validate(&peer) {
            self.alerts
                .raise(
                    AlertKind::UnauthorizedAccess,
                    "validation socket: peer refused (not in ipc.allowed_uids/allowed_gids)",
                    serde_json::json!({"uid": peer.uid, "gid": peer.gid, "pid": peer.pid}),
                )
                .await;
            let event = Event::new("ipc.peer_refused", Outcome::Refused)
                .actor(actor)
                .detail("gid", peer.gid);
            let _ = self.audit.durable(event).await;
            return conn
                .send(&Response::invalid(Reason::NotAuthorized, None))
                .await;
        }
        loop {
            let payload = match conn.read_frame().await? {
                // Access is decided again for every request: a uid removed from the allow-lists
                // by a reload loses the connections it holds at their next request.
                Frame::Payload(_) if !Access::current(&self.access).may_validate(&peer) => {
                    let event = Event::new("ipc.peer_refused", Outcome::Refused)
                        .actor(actor)
                        .detail("gid", peer.gid)
                        .detail("reason", "access withdrawn by a reload");
                    let _ = self.audit.durable(event).await;
                    return conn
                        .send(&Response::invalid(Reason::NotAuthorized, None))
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
