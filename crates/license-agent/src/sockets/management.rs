//! The management socket (seed §2.3 option A, §3.3; DESIGN.md §3.3): the peer's role from its
//! uid (`[management] allowed_uids` read, `admin_uids` act) → optional token second factor →
//! audit → the request, carried out by the engine through its [`ControlHandle`].
//!
//! Every request is audited, refused ones too. The audit record of an authorized request is
//! made durable before the request is carried out: an action that cannot be audited is
//! refused (`audit_unavailable`).

use std::path::PathBuf;
use std::sync::Arc;

use license_audit::{Actor, Event, Outcome};
use license_protocol::mgmt::{MgmtErrorCode, MgmtRequest, MgmtResponse};
use license_protocol::rotation::Nonce;
use zeroize::Zeroizing;

use super::listener::{Connection, Frame, Handler};
use super::validation::audited;
use crate::access::{Access, Peer, Role, SharedAccess};
use crate::alerts::{AlertKind, Alerts};
use crate::audit::Audit;
use crate::engine::control::{ControlError, ControlHandle};
use crate::validation::Validator;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Connections one uid may hold at once: no user can lock the others (root) out.
pub const MAX_CONNECTIONS_PER_UID: usize = 4;
/// Connections, out of [`MAX_CONNECTIONS`], only uids in `[management] admin_uids` may take:
/// however many users hold the others, root gets in.
pub const RESERVED_FOR_ADMINS: usize = MAX_CONNECTIONS_PER_UID;

/// The management socket's connections.
#[derive(Debug)]
pub struct ManagementSocket {
    /// Roles by uid (reloadable).
    pub access: SharedAccess,
    /// The second factor, when configured.
    pub token: Option<Zeroizing<String>>,
    pub metrics_file: PathBuf,
    pub audit: Audit,
    pub alerts: Alerts,
    pub validator: Arc<Validator>,
    pub control: ControlHandle,
}

/// Compares without stopping at the first difference.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Handler for ManagementSocket {
    const NAME: &'static str = "management";

    fn privileged(&self, peer: &Peer) -> bool {
        Access::current(&self.access).role(peer) == Role::Admin
    }

    async fn connection(self: Arc<Self>, mut conn: Connection, peer: Peer) -> std::io::Result<()> {
        let actor = peer.actor();
        // Decided again for every request: a reload that takes a uid's role away applies to
        // the connections it holds too.
        let role_now = || Access::current(&self.access).role(&peer);
        loop {
            let payload = match conn.read_frame().await? {
                Frame::Payload(payload) => payload,
                Frame::Closed | Frame::TooLarge => return Ok(()),
                Frame::Empty => {
                    conn.send(&MgmtResponse::err(
                        MgmtErrorCode::BadRequest,
                        "empty frame: a request is a JSON object",
                    ))
                    .await?;
                    if role_now() == Role::None {
                        self.refused_peer(actor).await;
                        return Ok(());
                    }
                    continue;
                }
            };
            let role = role_now();
            let response = match license_protocol::mgmt::parse_request(&payload) {
                Ok(request) => self.handle(actor, role, request).await,
                Err(bad_request) => {
                    self.audit
                        .note(Event::new("mgmt.bad_request", Outcome::Refused).actor(actor))
                        .await;
                    bad_request
                }
            };
            conn.send(&response).await?;
            // A peer with no role got its one answer (audited, alerted): it is not kept.
            if role == Role::None {
                return Ok(());
            }
        }
    }
}

/// Why a request is refused before it is carried out.
fn refusal(role: Role, request: &MgmtRequest, token: Option<&str>) -> Option<&'static str> {
    if role == Role::None {
        Some("this uid may not use the management interface")
    } else if request.is_admin() && role != Role::Admin {
        Some("this uid may read but not act (not in [management] admin_uids)")
    } else if token.is_some_and(|t| {
        !request
            .token()
            .is_some_and(|given| same(given.trim(), t.trim()))
    }) {
        Some("missing or wrong management token")
    } else {
        None
    }
}

impl ManagementSocket {
    /// A peer with no role that sent no request: audited (and alerted) before it is closed.
    async fn refused_peer(&self, actor: Actor) {
        let message = "this uid may not use the management interface";
        self.alerts
            .raise(
                AlertKind::UnauthorizedAccess,
                &format!("management connection refused: {message}"),
                serde_json::json!({"uid": actor.uid}),
            )
            .await;
        self.audit
            .note(
                Event::new("mgmt.connect", Outcome::Refused)
                    .actor(actor)
                    .detail("reason", message),
            )
            .await;
    }

    async fn handle(&self, actor: Actor, role: Role, request: MgmtRequest) -> MgmtResponse {
        let name = format!("mgmt.{}", request.name());
        if let Some(message) = refusal(role, &request, self.token.as_deref().map(String::as_str)) {
            self.alerts
                .raise(
                    AlertKind::UnauthorizedAccess,
                    &format!("management request refused: {message}"),
                    serde_json::json!({"uid": actor.uid, "op": request.name()}),
                )
                .await;
            self.audit
                .note(
                    Event::new(&name, Outcome::Refused)
                        .actor(actor)
                        .detail("reason", message),
                )
                .await;
            return MgmtResponse::err(MgmtErrorCode::NotAuthorized, message);
        }
        let mut record = Event::new(&name, Outcome::Success).actor(actor);
        match &request {
            MgmtRequest::Invalidate { version, .. } => record = record.detail("version", *version),
            MgmtRequest::Degraded { mode, .. } => {
                record = record.detail("mode", format!("{mode:?}").to_lowercase())
            }
            MgmtRequest::Update { action, .. } => {
                record = record.detail("action", format!("{action:?}").to_lowercase())
            }
            _ => {}
        }
        if let Err(e) = self.audit.durable(record).await {
            tracing::error!(error = %e, op = request.name(), "management request refused: it cannot be audited");
            return MgmtResponse::err(
                MgmtErrorCode::AuditUnavailable,
                "the request cannot be audited, so it is refused",
            );
        }
        match self.perform(actor, request).await {
            Ok(value) => MgmtResponse::ok(value),
            Err(e) => {
                self.audit
                    .note(
                        Event::new(&name, Outcome::Error)
                            .actor(actor)
                            .detail("reason", e.to_string()),
                    )
                    .await;
                MgmtResponse::err(e.code(), e.to_string())
            }
        }
    }

    async fn perform(
        &self,
        actor: Actor,
        request: MgmtRequest,
    ) -> Result<serde_json::Value, ControlError> {
        fn to_json(value: &impl serde::Serialize) -> serde_json::Value {
            serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
        }
        Ok(match request {
            MgmtRequest::Status { .. } => to_json(&self.control.status().await?),
            MgmtRequest::Metrics { .. } => {
                let text = tokio::fs::read_to_string(&self.metrics_file)
                    .await
                    .unwrap_or_default();
                serde_json::json!({ "text": text })
            }
            MgmtRequest::Validate { license_token, .. } => {
                let answer = self
                    .validator
                    .validate_with_subject(&license_token, Nonce::random());
                to_json(&audited(&self.audit, actor, answer).await)
            }
            MgmtRequest::Rotate { .. } => {
                serde_json::json!({ "version": self.control.rotate().await? })
            }
            MgmtRequest::Invalidate { version, .. } => {
                self.control.invalidate(version).await?;
                serde_json::json!({ "version": version, "invalidated": true })
            }
            MgmtRequest::Degraded { mode, .. } => {
                serde_json::json!({ "degraded": self.control.degraded(mode).await? })
            }
            MgmtRequest::Update { action, .. } => {
                let held = action == license_protocol::mgmt::UpdateSwitch::Hold;
                serde_json::json!({ "held": self.control.hold_updates(held).await? })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_by_role_and_token() {
        let status = MgmtRequest::Status { token: None };
        let rotate = MgmtRequest::Rotate {
            token: Some("s3cret".into()),
        };
        assert!(refusal(Role::None, &status, None).is_some());
        assert_eq!(refusal(Role::Reader, &status, None), None);
        assert!(refusal(Role::Reader, &rotate, None).is_some());
        assert_eq!(refusal(Role::Admin, &rotate, Some("s3cret\n")), None);
        assert!(refusal(Role::Admin, &rotate, Some("other")).is_some());
        assert!(refusal(Role::Admin, &status, Some("s3cret")).is_some());
    }
}
