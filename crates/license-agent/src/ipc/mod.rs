//! The validation socket for POS applications (DESIGN.md §3.2): accept → peer credentials
//! checked against the uid/gid whitelist (SO_PEERCRED) → frames read with limits → the
//! validator → framed answers. A connection carries any number of requests.
//!
//! Misbehaving peers get a clear error answer or a close and never disturb other
//! connections: frames over 64 KiB are answered `frame_too_large` and the connection closed
//! (it cannot be resynchronised), bad JSON and unknown ops are answered and the connection
//! kept, a peer silent for `idle_timeout` is closed, and connections beyond
//! `max_connections` are refused at accept.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use license_protocol::ipc::{
    encode_frame, frame_len, parse_request, FrameError, Reason, Request, Response,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::audit::Audit;
use crate::validator::Validator;
use license_audit::{Actor, Event, Outcome};

/// Who may use the socket, and how.
#[derive(Debug, Clone)]
pub struct IpcSettings {
    /// Where every validation (unless `audit_validations` is off) and refused peer is recorded.
    pub audit: Audit,
    pub alerts: crate::alerts::Alerts,
    pub audit_validations: bool,
    /// Who may connect (reloadable).
    pub access: crate::access::SharedAccess,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    /// Set at shutdown: connections finish the request in hand and close.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

/// Time in-flight requests get to finish at shutdown.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the socket, replacing a stale socket file; the file is 0666 because access is
/// decided per connection from the peer's credentials, not by file permissions.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is served by another process", path.display()),
            ))
        }
        Err(_) if path.exists() => std::fs::remove_file(path)?,
        Err(_) => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: UnixListener,
    validator: Arc<Validator>,
    settings: IpcSettings,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let settings = Arc::new(settings);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed on the validation socket");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!("validation socket: connection limit reached; closing a new connection");
            continue;
        };
        let (validator, settings) = (validator.clone(), settings.clone());
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = connection(stream, &validator, &settings).await {
                tracing::debug!(error = %e, "validation connection ended");
            }
        });
    }
    drop(listener);
    // Drain: every connection finishes the request in hand, then returns its slot.
    let all = u32::try_from(settings.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN_TIMEOUT, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("drain timeout: closing the remaining validation connections");
    }
}

/// Records the answer durably before it is sent (also used by the management `validate`); an answer that cannot be recorded is not
/// given (`internal` instead).
pub(crate) async fn audited(settings: &IpcSettings, actor: Actor, response: Response) -> Response {
    audit_answer(&settings.audit, actor, response).await
}

/// See [`audited`].
pub(crate) async fn audit_answer(audit: &Audit, actor: Actor, response: Response) -> Response {
    let event = match &response {
        Response::Valid(_) => Event::new("license.validate", Outcome::Success),
        Response::Invalid(refusal) => Event::new("license.validate", Outcome::Refused)
            .detail("reason", refusal.reason.as_str()),
    }
    .actor(actor);
    match audit.durable(event).await {
        Ok(()) => response,
        Err(e) => {
            tracing::error!(error = %e, "validation not answered: its audit record could not be written");
            Response::invalid(Reason::Internal, response.nonce().map(str::to_string))
        }
    }
}

/// One frame read from a local socket, or why there is none.
pub(crate) enum Frame {
    Payload(Vec<u8>),
    /// End of stream, or the peer was idle (or too slow) past the timeout.
    Closed,
    /// The header announced more than the limit; the stream cannot be resynchronised.
    TooLarge,
    Empty,
}

/// Reads one length-prefixed frame, each part within `idle`.
pub(crate) async fn read_frame(stream: &mut UnixStream, idle: Duration) -> std::io::Result<Frame> {
    let mut header = [0u8; 4];
    match tokio::time::timeout(idle, stream.read_exact(&mut header)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Frame::Closed),
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(Frame::Closed),
    }
    let len = match frame_len(header) {
        Ok(len) => len,
        Err(FrameError::TooLarge(_)) => return Ok(Frame::TooLarge),
        Err(_) => return Ok(Frame::Empty),
    };
    let mut payload = vec![0u8; len];
    match tokio::time::timeout(idle, stream.read_exact(&mut payload)).await {
        Ok(Ok(_)) => Ok(Frame::Payload(payload)),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(Frame::Closed),
        Ok(Err(e)) => Err(e),
        Err(_) => Ok(Frame::Closed),
    }
}

/// Writes one JSON frame.
pub(crate) async fn send_json(
    stream: &mut UnixStream,
    value: &impl serde::Serialize,
) -> std::io::Result<()> {
    let json = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    stream.write_all(&encode_frame(&json)).await
}

async fn send(stream: &mut UnixStream, response: &Response) -> std::io::Result<()> {
    send_json(stream, response).await
}

async fn connection(
    mut stream: UnixStream,
    validator: &Validator,
    settings: &IpcSettings,
) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let actor = Actor::peer(cred.uid(), cred.pid().map_or(0, i32::unsigned_abs));
    let allowed = {
        let access = crate::access::Access::current(&settings.access);
        access.ipc_uids.contains(&cred.uid()) || access.ipc_gids.contains(&cred.gid())
    };
    if !allowed {
        settings.alerts.raise(
            crate::alerts::AlertKind::UnauthorizedAccess,
            "validation socket: peer refused (not in ipc.allowed_uids/allowed_gids)",
            serde_json::json!({"uid": cred.uid(), "gid": cred.gid(), "pid": cred.pid()}),
        );
        let event = Event::new("ipc.peer_refused", Outcome::Refused)
            .actor(actor)
            .detail("gid", cred.gid());
        let _ = settings.audit.durable(event).await;
        send(&mut stream, &Response::invalid(Reason::NotAuthorized, None)).await?;
        return Ok(());
    }
    loop {
        let mut stop = settings.stop.clone();
        let frame = tokio::select! {
            frame = read_frame(&mut stream, settings.idle_timeout) => frame?,
            _ = stop.wait_for(|stopping| *stopping) => return Ok(()),
        };
        let payload = match frame {
            Frame::Payload(payload) => payload,
            Frame::Closed => return Ok(()),
            Frame::TooLarge => {
                send(&mut stream, &Response::invalid(Reason::FrameTooLarge, None)).await?;
                return Ok(());
            }
            Frame::Empty => {
                send(&mut stream, &Response::invalid(Reason::BadRequest, None)).await?;
                continue;
            }
        };
        let response = match parse_request(&payload) {
            Ok(Request::ValidateLicense {
                license_token,
                nonce,
            }) => validator.validate(&license_token, nonce),
            Err((error, nonce)) => Response::invalid(error.reason(), nonce),
        };
        let response = if settings.audit_validations {
            audited(settings, actor, response).await
        } else {
            response
        };
        send(&mut stream, &response).await?;
    }
}
