//! The management socket (seed §2.3 option A, §3.3; DESIGN.md §3.3): accept → peer uid from
//! SO_PEERCRED → role (`[management] allowed_uids` read, `admin_uids` act) → optional token
//! second factor → audit → the request.
//!
//! Every request is audited, refused ones too. The audit record of an authorized request is
//! made durable before the request is carried out: an action that cannot be audited is
//! refused (`audit_unavailable`). Actions reach the rotation manager through [`Control`], so
//! all state changes happen in one place.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use license_audit::{Actor, Event, Outcome};
use license_protocol::mgmt::{DegradedSwitch, MgmtRequest, MgmtResponse, StatusView};
use license_protocol::rotation::Nonce;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use zeroize::Zeroizing;

use crate::audit::Audit;
use crate::ipc::{audit_answer, read_frame, send_json, Frame};
use crate::validator::Validator;

/// Requests the management socket hands to the rotation manager.
#[derive(Debug)]
pub enum Control {
    Status(oneshot::Sender<StatusView>),
    Rotate(oneshot::Sender<Result<u64, String>>),
    Invalidate(u64, oneshot::Sender<Result<(), String>>),
    /// `Err` is a refusal (e.g. degraded mode forbidden by config).
    Degraded(DegradedSwitch, oneshot::Sender<Result<String, String>>),
}

#[derive(Debug)]
pub struct MgmtSettings {
    /// Roles by uid (reloadable).
    pub access: crate::access::SharedAccess,
    /// The second factor, when configured.
    pub token: Option<Zeroizing<String>>,
    pub metrics_file: PathBuf,
    pub idle_timeout: Duration,
    pub audit: Audit,
    pub alerts: crate::alerts::Alerts,
    pub validator: Arc<Validator>,
    pub control: mpsc::Sender<Control>,
}

/// Connections served at once.
const MAX_CONNECTIONS: usize = 16;

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

pub async fn serve(
    listener: UnixListener,
    settings: Arc<MgmtSettings>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let settings = settings.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = connection(stream, &settings).await {
                tracing::debug!(error = %e, "management connection ended");
            }
        });
    }
}

async fn connection(mut stream: UnixStream, s: &MgmtSettings) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let actor = Actor::peer(cred.uid(), cred.pid().map_or(0, i32::unsigned_abs));
    let access = crate::access::Access::current(&s.access);
    let admin = access.mgmt_admins.contains(&cred.uid());
    let reader = admin || access.mgmt_readers.contains(&cred.uid());
    loop {
        let payload = match read_frame(&mut stream, s.idle_timeout).await? {
            Frame::Payload(payload) => payload,
            Frame::Closed | Frame::TooLarge => return Ok(()),
            Frame::Empty => continue,
        };
        let request: MgmtRequest = match serde_json::from_slice(&payload) {
            Ok(request) => request,
            Err(e) => {
                s.audit
                    .note(Event::new("mgmt.bad_request", Outcome::Refused).actor(actor));
                send_json(
                    &mut stream,
                    &MgmtResponse::err("bad_request", e.to_string()),
                )
                .await?;
                continue;
            }
        };
        let response = handle(s, actor, reader, admin, request).await;
        send_json(&mut stream, &response).await?;
    }
}

async fn handle(
    s: &MgmtSettings,
    actor: Actor,
    reader: bool,
    admin: bool,
    request: MgmtRequest,
) -> MgmtResponse {
    let name = format!("mgmt.{}", request.name());
    let refusal = if !reader {
        Some("this uid may not use the management interface")
    } else if request.is_admin() && !admin {
        Some("this uid may read but not act (not in [management] admin_uids)")
    } else if s.token.as_ref().is_some_and(|t| {
        !request
            .token()
            .is_some_and(|given| same(given.trim(), t.trim()))
    }) {
        Some("missing or wrong management token")
    } else {
        None
    };
    if let Some(message) = refusal {
        s.alerts.raise(
            crate::alerts::AlertKind::UnauthorizedAccess,
            &format!("management request refused: {message}"),
            serde_json::json!({"uid": actor.uid, "op": request.name()}),
        );
        s.audit.note(
            Event::new(&name, Outcome::Refused)
                .actor(actor)
                .detail("reason", message),
        );
        return MgmtResponse::err("not_authorized", message);
    }
    let mut record = Event::new(&name, Outcome::Success).actor(actor);
    match &request {
        MgmtRequest::Invalidate { version, .. } => record = record.detail("version", *version),
        MgmtRequest::Degraded { mode, .. } => {
            record = record.detail("mode", format!("{mode:?}").to_lowercase())
        }
        _ => {}
    }
    if let Err(e) = s.audit.durable(record).await {
        tracing::error!(error = %e, op = request.name(), "management request refused: it cannot be audited");
        return MgmtResponse::err(
            "audit_unavailable",
            "the request cannot be audited, so it is refused",
        );
    }
    let result = perform(s, actor, request).await;
    if let Err((_, message)) = &result {
        s.audit.note(
            Event::new(&name, Outcome::Error)
                .actor(actor)
                .detail("reason", message.clone()),
        );
    }
    match result {
        Ok(value) => MgmtResponse::ok(value),
        Err((code, message)) => MgmtResponse::err(code, message),
    }
}

type Performed = Result<serde_json::Value, (&'static str, String)>;

fn to_json(value: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

async fn ask<T>(
    s: &MgmtSettings,
    make: impl FnOnce(oneshot::Sender<T>) -> Control,
) -> Result<T, (&'static str, String)> {
    let (tx, rx) = oneshot::channel();
    s.control
        .send(make(tx))
        .await
        .map_err(|_| ("failed", "the agent is stopping".to_string()))?;
    rx.await
        .map_err(|_| ("failed", "the agent is stopping".to_string()))
}

async fn perform(s: &MgmtSettings, actor: Actor, request: MgmtRequest) -> Performed {
    match request {
        MgmtRequest::Status { .. } => Ok(to_json(&ask(s, Control::Status).await?)),
        MgmtRequest::Metrics { .. } => {
            let text = std::fs::read_to_string(&s.metrics_file).unwrap_or_default();
            Ok(serde_json::json!({ "text": text }))
        }
        MgmtRequest::Validate { license_token, .. } => {
            let answer = s.validator.validate(&license_token, Nonce::random());
            Ok(to_json(&audit_answer(&s.audit, actor, answer).await))
        }
        MgmtRequest::Rotate { .. } => {
            let version = ask(s, Control::Rotate).await?.map_err(|e| ("failed", e))?;
            Ok(serde_json::json!({ "version": version }))
        }
        MgmtRequest::Invalidate { version, .. } => {
            ask(s, |tx| Control::Invalidate(version, tx))
                .await?
                .map_err(|e| ("failed", e))?;
            Ok(serde_json::json!({ "version": version, "invalidated": true }))
        }
        MgmtRequest::Degraded { mode, .. } => {
            let state = ask(s, |tx| Control::Degraded(mode, tx))
                .await?
                .map_err(|e| ("refused", e))?;
            Ok(serde_json::json!({ "degraded": state }))
        }
    }
}
