//! Agent listener (TLS 1.3, client certificate required): every request is authenticated by
//! its certificate's CN and checked against the database — certificate active and unexpired,
//! machine not revoked — so a revocation takes effect at the next request on every replica.
//!
//! Routes: secret rotation and its acknowledgement, secret status, the machine's license
//! tokens, online license validation, certificate renewal.

use std::sync::Arc;

use axum::extract::State;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use license_protocol::agent_api::{
    MachineLicenses, RenewCertificateRequest, RenewCertificateResponse, SecretStatus,
    ValidateLicenseRequest, ValidateLicenseResponse,
};
use license_protocol::error::{ApiError, ErrorCode};
use license_protocol::identity::MachineIdentity;
use license_protocol::rotation::{AckRequest, RotateSecretRequest, RotateSecretResponse};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiFailure, ApiJson};
use super::listener::{ConnInfo, PeerCertificate};
use crate::clock::Timestamp;
use crate::service::{enroll, licenses, secrets, SharedState};
use crate::store::certificates::{self, CertState};

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
}

pub fn router() -> OpenApiRouter<SharedState> {
    OpenApiRouter::new()
        .routes(routes!(rotate_secret))
        .routes(routes!(ack_secret))
        .routes(routes!(secret_status))
        .routes(routes!(machine_licenses))
        .routes(routes!(validate_license))
        .routes(routes!(renew_certificate))
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
    let Some(peer) = conn.peer else {
        return refuse(
            ErrorCode::CertificateRequired,
            "a client certificate is required",
        );
    };
    let identity = match &peer.identity {
        Ok(identity) => *identity,
        Err(e) => {
            return refuse(
                ErrorCode::BadCertificateCn,
                &format!("certificate CN refused: {e}"),
            )
        }
    };
    let auth = match certificates::auth(state.store.pool(), &peer.serial).await {
        Ok(Some(auth)) => auth,
        Ok(None) => {
            return refuse(
                ErrorCode::UnknownCertificate,
                "certificate is not known to this server",
            )
        }
        Err(e) => return ApiFailure::from(e).into_response(),
    };
    if auth.machine_id != identity.machine_id.to_string()
        || auth.client_id != identity.client_id.to_string()
    {
        return refuse(
            ErrorCode::BadCertificateCn,
            "certificate CN does not match the certificate's machine",
        );
    }
    if auth.machine_revoked {
        return refuse(ErrorCode::MachineRevoked, "this machine is revoked");
    }
    match auth.state {
        CertState::Active => {}
        CertState::Revoked => {
            return refuse(ErrorCode::CertificateRevoked, "this certificate is revoked")
        }
        CertState::Superseded => {
            return refuse(
                ErrorCode::CertificateSuperseded,
                "this certificate was replaced by a newer one",
            )
        }
    }
    if auth.expires_at <= Timestamp::now() {
        return refuse(
            ErrorCode::CertificateExpired,
            "this certificate has expired",
        );
    }
    req.extensions_mut().insert(AuthenticatedMachine {
        identity,
        serial: peer.serial.clone(),
        certificate_expires_at: auth.expires_at,
        peer: peer.clone(),
    });
    next.run(req).await
}

/// A new secret version for the calling machine (seed §3.2), or the pending one again.
#[utoipa::path(post, path = "/api/v1/rotate-secret", tag = "agent",
    request_body = RotateSecretRequest,
    responses((status = 200, body = RotateSecretResponse),
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
    responses((status = 200, description = "the secret status after the acknowledgement", body = SecretStatus),
              (status = 403, body = ApiError),
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

/// State of the calling machine's secrets: forced rotations and invalidated versions.
#[utoipa::path(get, path = "/api/v1/secret-status", tag = "agent",
    responses((status = 200, body = SecretStatus), (status = 403, body = ApiError)))]
async fn secret_status(
    State(state): State<SharedState>,
    Extension(machine): Extension<AuthenticatedMachine>,
) -> Result<Json<SecretStatus>, ApiFailure> {
    Ok(Json(
        secrets::status(&state, &machine.identity, machine.certificate_expires_at).await?,
    ))
}

/// The calling machine's license tokens under its newest acknowledged secret version, and
/// the ids of its revoked licenses.
#[utoipa::path(get, path = "/api/v1/licenses", tag = "agent",
    responses((status = 200, body = MachineLicenses), (status = 403, body = ApiError)))]
async fn machine_licenses(
    State(state): State<SharedState>,
    Extension(machine): Extension<AuthenticatedMachine>,
) -> Result<Json<MachineLicenses>, ApiFailure> {
    Ok(Json(
        licenses::machine_licenses(&state, &machine.identity).await?,
    ))
}

/// Online validation of a token by the server (seed §2.4); `reason` uses the IPC codes.
#[utoipa::path(post, path = "/api/v1/validate-license", tag = "agent",
    request_body = ValidateLicenseRequest,
    responses((status = 200, body = ValidateLicenseResponse), (status = 400, body = ApiError),
              (status = 403, body = ApiError)))]
async fn validate_license(
    State(state): State<SharedState>,
    Extension(machine): Extension<AuthenticatedMachine>,
    ApiJson(req): ApiJson<ValidateLicenseRequest>,
) -> Result<Json<ValidateLicenseResponse>, ApiFailure> {
    Ok(Json(
        licenses::validate(&state, &machine.identity, &req.license_token).await?,
    ))
}

/// A new certificate for the calling machine; the presented one is superseded.
#[utoipa::path(post, path = "/api/v1/renew-certificate", tag = "agent",
    request_body = RenewCertificateRequest,
    responses((status = 200, body = RenewCertificateResponse),
              (status = 400, body = ApiError), (status = 403, body = ApiError)))]
async fn renew_certificate(
    State(state): State<SharedState>,
    Extension(machine): Extension<AuthenticatedMachine>,
    ApiJson(req): ApiJson<RenewCertificateRequest>,
) -> Result<Json<RenewCertificateResponse>, ApiFailure> {
    let renewed = enroll::renew(&state, &machine.identity, &req.csr).await?;
    tracing::info!(machine_id = %machine.identity.machine_id, old = %machine.serial, new = %renewed.serial, "certificate renewed");
    Ok(Json(renewed))
}
