//! Admin API (loopback by default, TLS 1.3): bearer tokens with roles `readonly` (GET) and
//! `admin` (everything). Every mutation is audited with the token's name as actor.

use std::collections::BTreeMap;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use license_protocol::agent_api::LicenseToken;
use license_protocol::error::{ApiError, ErrorCode};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiFailure, ApiJson};
use crate::clock::Timestamp;
use crate::service::admin::{Admin, AdminError, CreatedInstallToken, PurgeReport};
use crate::service::licenses::{IssuedLicense, LicenseRequest};
use crate::service::{credential_hash, SharedState};
use crate::store::admin_tokens::{self, AdminTokenRecord, Role};
use crate::store::audit::AuditEvent;
use crate::store::certificates::{CertificateRecord, CertificateStats};
use crate::store::clients::ClientRecord;
use crate::store::install_tokens::InstallTokenRecord;
use crate::store::licenses::LicenseRecord;
use crate::store::machines::MachineRecord;
use crate::store::secrets::SecretRecord;

/// The authenticated caller of an admin request.
#[derive(Debug, Clone)]
pub struct AdminPrincipal(pub AdminTokenRecord);

impl AdminPrincipal {
    fn actor(&self) -> String {
        format!("api:{}", self.0.name)
    }
}

/// Middleware: bearer token → [`AdminPrincipal`]; readonly tokens may only GET.
pub async fn authenticate(
    State(state): State<SharedState>,
    mut req: axum::extract::Request,
    next: Next,
) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token else {
        let message = "missing `Authorization: Bearer <token>`";
        return ApiFailure::refused(ErrorCode::Unauthorized, message).into_response();
    };
    let record = match admin_tokens::find(state.store.pool(), &credential_hash(token.trim())).await
    {
        Ok(Some(record)) => record,
        Ok(None) => {
            let message = "unknown or revoked admin token";
            return ApiFailure::refused(ErrorCode::Unauthorized, message).into_response();
        }
        Err(e) => return ApiFailure::from(e).into_response(),
    };
    if record.role == Role::Readonly && req.method() != Method::GET {
        let message = "this token is readonly";
        return ApiFailure::refused(ErrorCode::Forbidden, message).into_response();
    }
    req.extensions_mut().insert(AdminPrincipal(record));
    next.run(req).await
}

pub fn router() -> OpenApiRouter<SharedState> {
    OpenApiRouter::new()
        .routes(routes!(list_clients, create_client))
        .routes(routes!(list_install_tokens, create_install_token))
        .routes(routes!(list_machines))
        .routes(routes!(get_machine, delete_machine))
        .routes(routes!(revoke_machine))
        .routes(routes!(restore_machine))
        .routes(routes!(rotate_machine))
        .routes(routes!(list_secrets))
        .routes(routes!(invalidate_secret))
        .routes(routes!(list_licenses, issue_license))
        .routes(routes!(revoke_license))
        .routes(routes!(license_token))
        .routes(routes!(certificate_stats))
        .routes(routes!(list_certificates))
        .routes(routes!(revoke_certificate))
        .routes(routes!(restore_certificate))
        .routes(routes!(purge_certificates))
        .routes(routes!(audit_events))
}

type ApiResult<T> = Result<Json<T>, ApiFailure>;

/// Extractor: the administrator a request acts as (the principal [`authenticate`] found), with
/// the server's state.
#[derive(Debug)]
pub struct AdminCall {
    state: SharedState,
    principal: AdminPrincipal,
}

impl AdminCall {
    fn admin(&self) -> Admin<'_> {
        Admin::new(&self.state, self.principal.actor())
    }
}

impl FromRequestParts<SharedState> for AdminCall {
    type Rejection = ApiFailure;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        // `authenticate` runs before every admin route; without it this is a server bug.
        let principal = parts
            .extensions
            .get::<AdminPrincipal>()
            .cloned()
            .ok_or_else(|| {
                ApiFailure::refused(
                    ErrorCode::InternalError,
                    "admin request without a principal",
                )
            })?;
        Ok(Self {
            state: state.clone(),
            principal,
        })
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateClient {
    pub name: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInstallToken {
    pub client_id: String,
    /// Lifetime in seconds (default 86400, at most 30 days).
    pub ttl_secs: Option<u64>,
    /// Bind the token to this machine of the client: it re-enrolls that machine (a wiped or
    /// replaced till) under whatever hardware id it reports.
    pub machine_id: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ClientFilter {
    pub client_id: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct CertificateFilter {
    pub client_id: Option<String>,
    pub machine_id: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct MachineFilter {
    pub machine_id: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IssueLicense {
    pub machine_id: String,
    /// Features granted, e.g. `["pos.sale", "pos.refund"]`.
    pub features: Vec<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// RFC 3339; default now.
    pub not_before: Option<String>,
    /// RFC 3339; absent (and no `expires_in_secs`): does not expire.
    pub expires_at: Option<String>,
    /// Expiry relative to now, instead of `expires_at`.
    pub expires_in_secs: Option<u64>,
}

fn time_field(field: &'static str, value: Option<&str>) -> Result<Option<Timestamp>, ApiFailure> {
    value
        .map(|v| {
            Timestamp::parse_rfc3339(v)
                .map_err(|message| AdminError::InvalidInput { field, message }.into())
        })
        .transpose()
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct AuditQuery {
    /// Only events with a sequence number above this.
    pub since: Option<i64>,
    pub limit: Option<i64>,
}

#[utoipa::path(get, path = "/api/admin/clients", tag = "admin", security(("bearer" = [])),
    responses((status = 200, body = Vec<ClientRecord>), (status = 401, body = ApiError)))]
async fn list_clients(call: AdminCall) -> ApiResult<Vec<ClientRecord>> {
    Ok(Json(call.admin().list_clients().await?))
}

#[utoipa::path(post, path = "/api/admin/clients", tag = "admin", security(("bearer" = [])), request_body = CreateClient,
    responses((status = 200, body = ClientRecord), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
async fn create_client(
    call: AdminCall,
    ApiJson(req): ApiJson<CreateClient>,
) -> ApiResult<ClientRecord> {
    Ok(Json(call.admin().create_client(&req.name).await?))
}

#[utoipa::path(get, path = "/api/admin/install-tokens", tag = "admin", security(("bearer" = [])), params(ClientFilter),
    responses((status = 200, body = Vec<InstallTokenRecord>)))]
async fn list_install_tokens(
    call: AdminCall,
    Query(q): Query<ClientFilter>,
) -> ApiResult<Vec<InstallTokenRecord>> {
    Ok(Json(
        call.admin()
            .list_install_tokens(q.client_id.as_deref())
            .await?,
    ))
}

/// Mint a one-time install token; the response is the only place its value appears.
#[utoipa::path(post, path = "/api/admin/install-tokens", tag = "admin", security(("bearer" = [])), request_body = CreateInstallToken,
    responses((status = 200, body = CreatedInstallToken), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
async fn create_install_token(
    call: AdminCall,
    ApiJson(req): ApiJson<CreateInstallToken>,
) -> ApiResult<CreatedInstallToken> {
    Ok(Json(
        call.admin()
            .create_install_token(&req.client_id, req.ttl_secs, req.machine_id.as_deref())
            .await?,
    ))
}

#[utoipa::path(get, path = "/api/admin/machines", tag = "admin", security(("bearer" = [])), params(ClientFilter),
    responses((status = 200, body = Vec<MachineRecord>)))]
async fn list_machines(
    call: AdminCall,
    Query(q): Query<ClientFilter>,
) -> ApiResult<Vec<MachineRecord>> {
    Ok(Json(
        call.admin().list_machines(q.client_id.as_deref()).await?,
    ))
}

#[utoipa::path(get, path = "/api/admin/machines/{id}", tag = "admin", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = MachineRecord), (status = 404, body = ApiError)))]
async fn get_machine(call: AdminCall, Path(id): Path<String>) -> ApiResult<MachineRecord> {
    Ok(Json(call.admin().get_machine(&id).await?))
}

#[utoipa::path(delete, path = "/api/admin/machines/{id}", tag = "admin", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ApiError)))]
async fn delete_machine(call: AdminCall, Path(id): Path<String>) -> Result<StatusCode, ApiFailure> {
    call.admin().delete_machine(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Block one machine (its other machines' siblings keep working).
#[utoipa::path(post, path = "/api/admin/machines/{id}/revoke", tag = "admin", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = MachineRecord), (status = 404, body = ApiError)))]
async fn revoke_machine(call: AdminCall, Path(id): Path<String>) -> ApiResult<MachineRecord> {
    Ok(Json(call.admin().revoke_machine(&id).await?))
}

#[utoipa::path(post, path = "/api/admin/machines/{id}/restore", tag = "admin", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = MachineRecord), (status = 404, body = ApiError)))]
async fn restore_machine(call: AdminCall, Path(id): Path<String>) -> ApiResult<MachineRecord> {
    Ok(Json(call.admin().restore_machine(&id).await?))
}

/// Ask the machine to rotate its secret now (seen in its secret status until it acknowledges).
#[utoipa::path(post, path = "/api/admin/machines/{id}/rotate", tag = "admin", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = MachineRecord), (status = 404, body = ApiError)))]
async fn rotate_machine(call: AdminCall, Path(id): Path<String>) -> ApiResult<MachineRecord> {
    Ok(Json(call.admin().request_rotation(&id).await?))
}

/// The machine's secret versions, states and dates (never the secrets).
#[utoipa::path(get, path = "/api/admin/machines/{id}/secrets", tag = "admin", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = Vec<SecretRecord>), (status = 404, body = ApiError)))]
async fn list_secrets(call: AdminCall, Path(id): Path<String>) -> ApiResult<Vec<SecretRecord>> {
    Ok(Json(call.admin().list_secrets(&id).await?))
}

/// Invalidate one secret version: tokens under it stop validating (`secret_invalidated`).
#[utoipa::path(post, path = "/api/admin/machines/{id}/secrets/{version}/invalidate", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path), ("version" = u64, Path)),
    responses((status = 200, body = SecretRecord), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn invalidate_secret(
    call: AdminCall,
    Path((id, version)): Path<(String, u64)>,
) -> ApiResult<SecretRecord> {
    Ok(Json(call.admin().invalidate_secret(&id, version).await?))
}

#[utoipa::path(get, path = "/api/admin/licenses", tag = "admin", security(("bearer" = [])), params(MachineFilter),
    responses((status = 200, body = Vec<LicenseRecord>)))]
async fn list_licenses(
    call: AdminCall,
    Query(q): Query<MachineFilter>,
) -> ApiResult<Vec<LicenseRecord>> {
    Ok(Json(
        call.admin().list_licenses(q.machine_id.as_deref()).await?,
    ))
}

/// Issue a license for one machine; the answer carries its token once the machine holds a secret.
#[utoipa::path(post, path = "/api/admin/licenses", tag = "admin", security(("bearer" = [])), request_body = IssueLicense,
    responses((status = 200, body = IssuedLicense), (status = 400, body = ApiError), (status = 404, body = ApiError),
              (status = 409, body = ApiError)))]
async fn issue_license(
    call: AdminCall,
    ApiJson(req): ApiJson<IssueLicense>,
) -> ApiResult<IssuedLicense> {
    let expires_at = match (
        time_field("expires_at", req.expires_at.as_deref())?,
        req.expires_in_secs,
    ) {
        (Some(_), Some(_)) => {
            return Err(AdminError::InvalidInput {
                field: "expires_in_secs",
                message: "give expires_at or expires_in_secs, not both".into(),
            }
            .into())
        }
        (Some(at), None) => Some(at),
        (None, Some(secs)) => {
            Some(Timestamp::now().plus_secs(i64::try_from(secs).unwrap_or(i64::MAX)))
        }
        (None, None) => None,
    };
    let request = LicenseRequest {
        machine_id: req.machine_id,
        features: req.features,
        metadata: req.metadata,
        not_before: time_field("not_before", req.not_before.as_deref())?,
        expires_at,
    };
    Ok(Json(call.admin().issue_license(&request).await?))
}

#[utoipa::path(post, path = "/api/admin/licenses/{id}/revoke", tag = "admin", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = LicenseRecord), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn revoke_license(call: AdminCall, Path(id): Path<String>) -> ApiResult<LicenseRecord> {
    Ok(Json(call.admin().revoke_license(&id).await?))
}

/// The license's token under its machine's current secret version (409 before the first rotation).
#[utoipa::path(get, path = "/api/admin/licenses/{id}/token", tag = "admin", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = LicenseToken), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn license_token(call: AdminCall, Path(id): Path<String>) -> ApiResult<LicenseToken> {
    Ok(Json(call.admin().license_token(&id).await?))
}

#[utoipa::path(get, path = "/api/admin/certificates/stats", tag = "admin", security(("bearer" = [])),
    responses((status = 200, body = CertificateStats)))]
async fn certificate_stats(call: AdminCall) -> ApiResult<CertificateStats> {
    Ok(Json(call.admin().certificate_stats().await?))
}

#[utoipa::path(get, path = "/api/admin/certificates", tag = "admin", security(("bearer" = [])), params(CertificateFilter),
    responses((status = 200, body = Vec<CertificateRecord>)))]
async fn list_certificates(
    call: AdminCall,
    Query(q): Query<CertificateFilter>,
) -> ApiResult<Vec<CertificateRecord>> {
    Ok(Json(
        call.admin()
            .list_certificates(q.machine_id.as_deref(), q.client_id.as_deref())
            .await?,
    ))
}

#[utoipa::path(post, path = "/api/admin/certificates/{serial}/revoke", tag = "admin", security(("bearer" = [])), params(("serial" = String, Path)),
    responses((status = 200, body = CertificateRecord), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn revoke_certificate(
    call: AdminCall,
    Path(serial): Path<String>,
) -> ApiResult<CertificateRecord> {
    Ok(Json(call.admin().revoke_certificate(&serial).await?))
}

#[utoipa::path(post, path = "/api/admin/certificates/{serial}/restore", tag = "admin", security(("bearer" = [])), params(("serial" = String, Path)),
    responses((status = 200, body = CertificateRecord), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn restore_certificate(
    call: AdminCall,
    Path(serial): Path<String>,
) -> ApiResult<CertificateRecord> {
    Ok(Json(call.admin().restore_certificate(&serial).await?))
}

/// Delete revoked, superseded and expired certificates.
#[utoipa::path(post, path = "/api/admin/certificates/purge", tag = "admin", security(("bearer" = [])),
    responses((status = 200, body = PurgeReport)))]
async fn purge_certificates(call: AdminCall) -> ApiResult<PurgeReport> {
    Ok(Json(call.admin().purge_certificates().await?))
}

#[utoipa::path(get, path = "/api/admin/audit", tag = "admin", security(("bearer" = [])), params(AuditQuery),
    responses((status = 200, body = Vec<AuditEvent>)))]
async fn audit_events(call: AdminCall, Query(q): Query<AuditQuery>) -> ApiResult<Vec<AuditEvent>> {
    Ok(Json(
        call.admin()
            .audit_events(q.since.unwrap_or(0), q.limit.unwrap_or(1000))
            .await?,
    ))
}
