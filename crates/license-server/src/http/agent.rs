//! Agent listener (TLS 1.3, client certificate required): every request is authenticated by
//! its certificate's CN and checked against the database — certificate active and unexpired,
//! machine not revoked — so a revocation takes effect at the next request on every replica.
//!
//! With a read replica (`database_read_url`) the check (but the renewal's), the secret status,
//! the licenses and online validation are read there while it is fresh enough
//! (`service::reads`): a revocation is then in force within `read_replica_max_lag_ms`, or as
//! soon as the change feed read it, whichever comes first.
//!
//! One exception, on `POST /api/v1/renew-certificate` only: a certificate that expired at most
//! `certificate_renew_after_expiry_days` ago may renew itself (a till switched off for months
//! comes back by itself; the TLS handshake accepts such a certificate, see `tls.rs`), and a
//! superseded one may retry a renewal whose answer was lost. Revocation of the machine or of
//! the certificate is checked first and always refuses.
//!
//! Routes: secret rotation and its acknowledgement, secret status, the license key set, the
//! machine's license tokens, online license validation, certificate renewal, health reports,
//! and agent updates: the offer in the secret status, the release binary, the update report.

use std::sync::Arc;

use axum::extract::State;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use license_protocol::agent_api::{
    HealthReport, MachineLicenses, RenewCertificateRequest, RenewCertificateResponse, SecretStatus,
    StatusQuery, ValidateLicenseRequest, ValidateLicenseResponse,
};
use license_protocol::error::{ApiError, ErrorCode};
use license_protocol::identity::MachineIdentity;
use license_protocol::license_keys::LicenseKeySet;
use license_protocol::release::UpdateReport;
use license_protocol::rotation::{AckRequest, RotateSecretRequest, RotateSecretResponse};
use license_protocol::server_trust::ServerTrust;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiFailure, ApiJson, ApiPath, ApiQuery};
use super::listener::{ConnInfo, PeerCertificate};
use super::refusals::{AgentRefusals, JsonBodyRefusals};
use crate::clock::Timestamp;
use crate::service::enroll::PresentedCertificate;
use crate::service::{enroll, licenses, reads, releases, secrets, SharedState};
use crate::store::audit::{self, NewAuditEvent};
use crate::store::certificates::{self, CertState};
use crate::store::machines;

/// The one route that accepts an expired (within the window) or superseded certificate.
pub const RENEW_PATH: &str = "/api/v1/renew-certificate";

/// Largest request body the agent listener reads.
pub const MAX_AGENT_BODY_BYTES: usize = 64 * 1024;

/// The machine a request comes from, after every check passed.
#[derive(Debug, Clone)]
pub struct AuthenticatedMachine {
    pub identity: MachineIdentity,
    pub serial: String,
    pub certificate_expires_at: Timestamp,
    /// The presented certificate (its key verifies rotate requests).
    pub peer: Arc<PeerCertificate>,
    /// The certificate has expired (renewal route only, within the window).
    pub expired_since: Option<Timestamp>,
    /// The certificate is superseded (renewal route only: a retry).
    pub superseded: bool,
}

pub fn router() -> OpenApiRouter<SharedState> {
    OpenApiRouter::new()
        .routes(routes!(rotate_secret))
        .routes(routes!(ack_secret))
        .routes(routes!(secret_status))
        .routes(routes!(license_keys))
        .routes(routes!(server_trust))
        .routes(routes!(machine_licenses))
        .routes(routes!(validate_license))
        .routes(routes!(renew_certificate))
        .routes(routes!(report_health))
        .routes(routes!(release_binary))
        .routes(routes!(update_report))
        .merge(super::watch::router())
}

fn refuse(code: ErrorCode, message: &str) -> Response {
    ApiFailure::refused(code, message).into_response()
}

/// Middleware: turns the connection's certificate into an [`AuthenticatedMachine`] or 403.
pub async fn authenticate(
    State(state): State<SharedState>,
    Extension(conn): Extension<ConnInfo>,
    mut req: axum::extract::Request,
    next: Next,
) -> Response {
    // The one route that accepts an expired or superseded certificate (see the module docs).
    let renewing = req.method() == axum::http::Method::POST && req.uri().path() == RENEW_PATH;
    match authenticated(&state, &conn, renewing).await {
        Ok(machine) => {
            req.extensions_mut().insert(machine);
            next.run(req).await
        }
        Err(refusal) => refusal,
    }
}

/// The machine behind the connection's certificate, after every check, or the refusal.
async fn authenticated(
    state: &SharedState,
    conn: &ConnInfo,
    renewing: bool,
) -> Result<AuthenticatedMachine, Response> {
    let Some(peer) = &conn.peer else {
        return Err(refuse(
            ErrorCode::CertificateRequired,
            "a client certificate is required",
        ));
    };
    let identity = match &peer.identity {
        Ok(identity) => *identity,
        Err(e) => {
            return Err(refuse(
                ErrorCode::BadCertificateCn,
                &format!("certificate CN refused: {e}"),
            ))
        }
    };
    let machine_id = identity.machine_id.to_string();
    let serial = peer.serial.as_str();
    let auth = if renewing {
        // A renewal issues a certificate: checked on the primary, never on a lagging replica.
        certificates::auth(state.store.pool(), serial).await
    } else {
        // On the replica when it is fresh enough; one that does not know the certificate yet
        // (issued a moment ago) hands the check to the primary.
        let read = reads::for_machine(state, &machine_id, |pool| async move {
            certificates::auth(&pool, serial).await
        });
        read.await
    };
    let auth = match auth {
        Ok(Some(auth)) => auth,
        Ok(None) => {
            return Err(refuse(
                ErrorCode::UnknownCertificate,
                "certificate is not known to this server",
            ))
        }
        Err(e) => return Err(ApiFailure::from(e).into_response()),
    };
    // The serial names a certificate; the one presented must be that very certificate (one
    // signed with a stolen CA key under a known serial is not).
    if auth.der != peer.der {
        return Err(refuse(
            ErrorCode::UnknownCertificate,
            "certificate is not the one this server issued under its serial",
        ));
    }
    if auth.machine_id != identity.machine_id.to_string()
        || auth.client_id != identity.client_id.to_string()
    {
        return Err(refuse(
            ErrorCode::BadCertificateCn,
            "certificate CN does not match the certificate's machine",
        ));
    }
    if auth.machine_revoked {
        return Err(refuse(ErrorCode::MachineRevoked, "this machine is revoked"));
    }
    let superseded = match auth.state {
        CertState::Active => false,
        CertState::Revoked => {
            return Err(refuse(
                ErrorCode::CertificateRevoked,
                "this certificate is revoked",
            ))
        }
        // The renewal route decides: only a retry for the current key is answered.
        CertState::Superseded if renewing => true,
        CertState::Superseded => {
            return Err(refuse(
                ErrorCode::CertificateSuperseded,
                "this certificate was replaced by a newer one",
            ))
        }
    };
    let now = Timestamp::now();
    let expired_since = (auth.expires_at <= now).then_some(auth.expires_at);
    if let Some(expired) = expired_since {
        if let Some(message) = expiry_refusal(state, expired, now, renewing) {
            if renewing {
                // A renewal refused for good: worth a line in the trail.
                let actor = format!("machine:{}", identity.machine_id);
                let target = identity.machine_id.to_string();
                let details = serde_json::json!({
                    "presented_serial": peer.serial, "expired_since": expired.rfc3339(),
                });
                let event = NewAuditEvent::refused(
                    &actor,
                    "certificate.renew",
                    Some(&target),
                    details,
                    ErrorCode::CertificateExpired.as_str(),
                );
                if let Err(e) = audit::insert(state.store.pool(), &event).await {
                    return Err(ApiFailure::from(e).into_response());
                }
            }
            return Err(refuse(ErrorCode::CertificateExpired, &message));
        }
    }
    // Seen: written at most once per LAST_SEEN_RESOLUTION_SECS, not on every poll.
    let stale = auth
        .last_seen_at
        .is_none_or(|t| now.0 - t.0 >= machines::LAST_SEEN_RESOLUTION_SECS);
    if stale {
        if let Err(e) = machines::touch_seen(state.store.pool(), &auth.machine_id, now).await {
            tracing::warn!(error = %e, "cannot record when the machine was last seen");
        }
    }
    Ok(AuthenticatedMachine {
        identity,
        serial: peer.serial.clone(),
        certificate_expires_at: auth.expires_at,
        peer: peer.clone(),
        expired_since,
        superseded,
    })
}

/// Why a certificate that expired at `expired` is refused now, or `None` when it may still
/// renew itself (renewal route, within `certificate_renew_after_expiry_days`).
fn expiry_refusal(
    state: &SharedState,
    expired: Timestamp,
    now: Timestamp,
    renewing: bool,
) -> Option<String> {
    let days = state.settings.certificate_renew_after_expiry_days;
    let window = state.settings.renew_after_expiry_secs();
    let recover = "recover the machine with its recovery token (license-agent recover) or \
                   re-enroll it with a new install token";
    if !renewing {
        return Some(if window > 0 {
            format!(
                "this certificate expired on {expired}; renew it (POST {RENEW_PATH}) until {}",
                expired.plus_secs(window)
            )
        } else {
            format!("this certificate expired on {expired}; {recover}")
        });
    }
    if window == 0 {
        return Some(format!(
            "this certificate expired on {expired} and renewal after expiry is disabled \
             (certificate_renew_after_expiry_days = 0); {recover}"
        ));
    }
    let end = expired.plus_secs(window);
    (now > end).then(|| {
        format!(
            "this certificate expired on {expired}; the window for renewing an expired \
             certificate (certificate_renew_after_expiry_days = {days}) ended on {end}; {recover}"
        )
    })
}

/// A new secret version for the calling machine (seed §3.2), or the pending one again.
#[utoipa::path(post, path = "/api/v1/rotate-secret", tag = "agent",
    request_body = RotateSecretRequest,
    responses(JsonBodyRefusals, AgentRefusals, (status = 200, body = RotateSecretResponse),
              (status = 400, description = "`stale_request`, `unsupported_key`, `invalid_request`", body = ApiError),
              (status = 401, description = "`bad_signature`", body = ApiError),
              (status = 403, description = "`agent_id_mismatch` or a refused certificate", body = ApiError),
              (status = 409, description = "`replayed_request`, `unknown_version`", body = ApiError)))]
async fn rotate_secret(
    State(state): State<SharedState>,
    Extension(machine): Extension<AuthenticatedMachine>,
    ApiJson(req): ApiJson<RotateSecretRequest>,
) -> Result<Json<RotateSecretResponse>, ApiFailure> {
    Ok(Json(
        secrets::rotate(&state, &machine.identity, &machine.peer.spki_der, &req).await?,
    ))
}

/// The calling machine holds `secret_version` durably: pending becomes active, the previous
/// active version enters grace. Acknowledging the active version again is a no-op.
#[utoipa::path(post, path = "/api/v1/rotate-secret/ack", tag = "agent",
    request_body = AckRequest,
    responses(JsonBodyRefusals, AgentRefusals,
              (status = 200, description = "the secret status after the acknowledgement", body = SecretStatus),
              (status = 409, description = "`unknown_version`, `version_not_pending`", body = ApiError)))]
async fn ack_secret(
    State(state): State<SharedState>,
    Extension(machine): Extension<AuthenticatedMachine>,
    ApiJson(req): ApiJson<AckRequest>,
) -> Result<Json<SecretStatus>, ApiFailure> {
    Ok(Json(
        secrets::ack(
            &state,
            &machine.identity,
            &req,
            machine.certificate_expires_at,
        )
        .await?,
    ))
}

/// The calling machine's health report: kept as its latest (written only when it changed) and
/// shown to operators (`admin machine show`, the dashboard, `/metrics`).
#[utoipa::path(post, path = "/api/v1/health", tag = "agent",
    request_body = HealthReport,
    responses(JsonBodyRefusals, AgentRefusals,
              (status = 204, description = "report kept")))]
async fn report_health(
    State(state): State<SharedState>,
    Extension(machine): Extension<AuthenticatedMachine>,
    ApiJson(report): ApiJson<HealthReport>,
) -> Result<axum::http::StatusCode, ApiFailure> {
    if !report.is_well_formed() {
        return Err(ApiFailure::new(
            axum::http::StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            format!(
                "agent_version, store and degraded_mode must be printable and at most {} \
                 characters; rotation_failures at most 2147483647, secret_version an int64",
                HealthReport::MAX_FIELD_CHARS
            ),
        ));
    }
    // Re-serialized from the parsed report: only known fields are stored.
    let json = serde_json::to_string(&report).map_err(|e| {
        ApiFailure::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::InternalError,
            format!("health report: {e}"),
        )
    })?;
    let machine_id = machine.identity.machine_id.to_string();
    machines::set_health(state.store.pool(), &machine_id, &json, Timestamp::now()).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// State of the calling machine's secrets: forced rotations and invalidated versions; with
/// the agent's version, channel and architecture, the release offered to it (`update`).
#[utoipa::path(get, path = "/api/v1/secret-status", tag = "agent", params(StatusQuery),
    responses(AgentRefusals, (status = 200, body = SecretStatus),
              (status = 400, description = "`invalid_request`: a query parameter does not parse (the message names it)", body = ApiError)))]
async fn secret_status(
    State(state): State<SharedState>,
    Extension(machine): Extension<AuthenticatedMachine>,
    ApiQuery(query): ApiQuery<StatusQuery>,
) -> Result<Json<SecretStatus>, ApiFailure> {
    releases::check_query(&query)?;
    // Before the reads: a change after this position is replayed to the agent's watch.
    let cursor = state.changes.cursor();
    let machine_id = machine.identity.machine_id.to_string();
    let (app, machine, query) = (&*state, &machine, &query);
    let status = reads::for_machine(app, &machine_id, |pool| async move {
        let status = secrets::status_on(
            app,
            &pool,
            &machine.identity,
            machine.certificate_expires_at,
        );
        let Some(mut status) = status.await? else {
            return Ok(None);
        };
        status.update = releases::offer(app, &pool, &machine.identity, query).await?;
        Ok(Some(status))
    })
    .await?;
    let mut status = status.ok_or_else(|| {
        crate::store::StoreError::Corrupt(format!("machine {machine_id} vanished"))
    })?;
    status.watch_cursor = Some(cursor);
    Ok(Json(status))
}

/// The binary of a release offered to machines, streamed a chunk at a time: check its size
/// and SHA-256 against the offer's signed manifest.
#[utoipa::path(get, path = "/api/v1/releases/{release_id}/binary", tag = "agent",
    params(("release_id" = uuid::Uuid, Path, description = "the manifest's release_id")),
    responses(AgentRefusals,
              (status = 200, description = "the binary, `Content-Length` bytes", content_type = "application/octet-stream", body = Vec<u8>),
              (status = 400, description = "`invalid_request`: the id is not a UUID", body = ApiError),
              (status = 404, description = "`not_found`: no such release, or withdrawn", body = ApiError)))]
async fn release_binary(
    State(state): State<SharedState>,
    Extension(_machine): Extension<AuthenticatedMachine>,
    ApiPath(release_id): ApiPath<uuid::Uuid>,
) -> Result<Response, ApiFailure> {
    use axum::http::header;
    let release = releases::downloadable(&state, &release_id).await?;
    let chunks = release.chunk_count();
    let pool = state.store.pool().clone();
    // One chunk read per step: memory stays flat whatever the binary's size.
    let stream = futures_util::stream::try_unfold(0u64, move |seq| {
        let pool = pool.clone();
        async move {
            if seq >= chunks {
                return Ok(None);
            }
            match crate::store::releases::chunk(&pool, &release_id, seq).await? {
                Some(data) => Ok(Some((axum::body::Bytes::from(data), seq + 1))),
                None => Err(crate::store::StoreError::Corrupt(format!(
                    "release {release_id} lacks chunk {seq}"
                ))),
            }
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, release.size.to_string()),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

/// How the update to a release ended on the calling machine. Kept as the machine's latest
/// report on that release; a release whose failed and refused reports reach its threshold is
/// halted, and a release this machine reported failed or refused is not offered to it again.
#[utoipa::path(post, path = "/api/v1/update-report", tag = "agent",
    request_body = UpdateReport,
    responses(JsonBodyRefusals, AgentRefusals,
              (status = 204, description = "report kept"),
              (status = 404, description = "`not_found`: no such release", body = ApiError)))]
async fn update_report(
    State(state): State<SharedState>,
    Extension(machine): Extension<AuthenticatedMachine>,
    ApiJson(report): ApiJson<UpdateReport>,
) -> Result<axum::http::StatusCode, ApiFailure> {
    releases::report(&state, &machine.identity, &report).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// The server's license keys (current, previous, retired), signed by every key it holds; an
/// agent fetches it when `license_keys` of the secret status is not the digest of its set.
#[utoipa::path(get, path = "/api/v1/license-keys", tag = "agent",
    responses(AgentRefusals, (status = 200, body = LicenseKeySet)))]
async fn license_keys(
    State(state): State<SharedState>,
    Extension(_machine): Extension<AuthenticatedMachine>,
) -> Json<LicenseKeySet> {
    Json(state.keys.license_keys.snapshot().announced.clone())
}

/// The server's TLS keys (current, next, retired pins) and CAs (current with its
/// cross-certificate, previous, retired), signed by its license keys; an agent fetches it when
/// `server_trust` of the secret status is not the digest of what it holds.
#[utoipa::path(get, path = "/api/v1/server-trust", tag = "agent",
    responses(AgentRefusals, (status = 200, body = ServerTrust)))]
async fn server_trust(
    State(state): State<SharedState>,
    Extension(_machine): Extension<AuthenticatedMachine>,
) -> Json<ServerTrust> {
    let license = state.keys.license_keys.snapshot();
    Json(state.keys.trust.sign(&license.keys.signers()))
}

/// The calling machine's license tokens under its newest acknowledged secret version, and
/// the ids of its revoked licenses.
#[utoipa::path(get, path = "/api/v1/licenses", tag = "agent",
    responses(AgentRefusals, (status = 200, body = MachineLicenses)))]
async fn machine_licenses(
    State(state): State<SharedState>,
    Extension(machine): Extension<AuthenticatedMachine>,
) -> Result<Json<MachineLicenses>, ApiFailure> {
    let (app, identity) = (&*state, &machine.identity);
    let machine_id = identity.machine_id.to_string();
    let answer = reads::for_machine_always(app, &machine_id, |pool| async move {
        licenses::machine_licenses(app, &pool, identity).await
    });
    Ok(Json(answer.await?))
}

/// Online validation of a token by the server (seed §2.4); `reason` uses the IPC codes.
#[utoipa::path(post, path = "/api/v1/validate-license", tag = "agent",
    request_body = ValidateLicenseRequest,
    responses(JsonBodyRefusals, AgentRefusals, (status = 200, body = ValidateLicenseResponse)))]
async fn validate_license(
    State(state): State<SharedState>,
    Extension(machine): Extension<AuthenticatedMachine>,
    ApiJson(req): ApiJson<ValidateLicenseRequest>,
) -> Result<Json<ValidateLicenseResponse>, ApiFailure> {
    let (app, identity, token) = (&*state, &machine.identity, req.license_token.as_str());
    let machine_id = identity.machine_id.to_string();
    let answer = reads::for_machine_always(app, &machine_id, |pool| async move {
        licenses::validate(app, &pool, identity, token).await
    });
    Ok(Json(answer.await?))
}

/// A new certificate for the calling machine; the presented one is superseded. Also with a
/// certificate expired at most `certificate_renew_after_expiry_days` ago; with a superseded
/// certificate only as the retry of a renewal whose answer was lost (the CSR is for the key of
/// the machine's active certificate, which is answered again).
#[utoipa::path(post, path = "/api/v1/renew-certificate", tag = "agent",
    request_body = RenewCertificateRequest,
    responses(JsonBodyRefusals, AgentRefusals, (status = 200, body = RenewCertificateResponse),
              (status = 400, description = "`invalid_csr`, `invalid_request`", body = ApiError),
              (status = 403, description = "`machine_revoked`, `certificate_revoked`, \
                `certificate_expired` (past the window, or the window is 0), \
                `certificate_superseded` (not a retry for the current key), or another refused certificate", body = ApiError),
              (status = 409, description = "`concurrent_enrollment`", body = ApiError)))]
async fn renew_certificate(
    State(state): State<SharedState>,
    Extension(machine): Extension<AuthenticatedMachine>,
    ApiJson(req): ApiJson<RenewCertificateRequest>,
) -> Result<Json<RenewCertificateResponse>, ApiFailure> {
    let presented = PresentedCertificate {
        serial: &machine.serial,
        expired_since: machine.expired_since,
        superseded: machine.superseded,
    };
    let renewed = enroll::renew(&state, &machine.identity, presented, &req.csr).await?;
    tracing::info!(
        machine_id = %machine.identity.machine_id, old = %machine.serial, new = %renewed.serial,
        expired_since = ?machine.expired_since.map(Timestamp::rfc3339),
        retry = machine.superseded,
        "certificate renewed"
    );
    Ok(Json(renewed))
}
