//! Admin API (loopback by default, TLS 1.3): bearer tokens with roles `readonly` (GET) and
//! `admin` (everything). Every mutation is audited with the token's name as actor.

use std::collections::BTreeMap;

use axum::extract::{FromRequestParts, State};
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

use super::error::{ApiFailure, ApiJson, ApiPath, ApiQuery};
use super::refusals::{AdminReadRefusals, AdminWriteRefusals, JsonBodyRefusals};
use crate::clock::Timestamp;
use crate::service::admin::{Admin, AdminError, CreatedInstallToken, PurgeReport};
use crate::service::licenses::{IssuedLicense, LicenseRequest};
use crate::service::releases::{ReleaseAdmin, ReleaseView};
use crate::service::windows_installer::{StubSource, WindowsInstaller};
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
    /// The audit trail's actor for this token (`api:<name>`), the admin API's and the
    /// dashboard's alike.
    pub fn actor(&self) -> String {
        format!("api:{}", self.0.name)
    }
}

/// Middleware: bearer token → [`AdminPrincipal`]; readonly tokens may only GET.
pub async fn authenticate(
    State(state): State<SharedState>,
    mut req: axum::extract::Request,
    next: Next,
) -> Response {
    match principal(&state, req.headers(), req.method()).await {
        Ok(principal) => {
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        Err(refusal) => refusal.into_response(),
    }
}

/// Who a request acts as, from its bearer token, or why it is refused.
async fn principal(
    state: &SharedState,
    headers: &axum::http::HeaderMap,
    method: &Method,
) -> Result<AdminPrincipal, ApiFailure> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token else {
        let message = "missing `Authorization: Bearer <token>`";
        return Err(ApiFailure::refused(ErrorCode::Unauthorized, message));
    };
    let Some(record) =
        admin_tokens::find(state.store.pool(), &credential_hash(token.trim())).await?
    else {
        let message = "unknown or revoked admin token";
        return Err(ApiFailure::refused(ErrorCode::Unauthorized, message));
    };
    if record.role == Role::Readonly && method != Method::GET {
        let message = "this token is readonly";
        return Err(ApiFailure::refused(ErrorCode::Forbidden, message));
    }
    Ok(AdminPrincipal(record))
}

pub fn router() -> OpenApiRouter<SharedState> {
    OpenApiRouter::new()
        .routes(routes!(list_clients, create_client))
        .routes(routes!(list_install_tokens, create_install_token))
        .routes(routes!(create_windows_installer))
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
        .routes(routes!(list_releases))
        .routes(routes!(rollout_release))
        .routes(routes!(pause_release))
        .routes(routes!(resume_release))
        .routes(routes!(withdraw_release))
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

    fn releases(&self) -> ReleaseAdmin<'_> {
        ReleaseAdmin::new(&self.state, self.principal.actor())
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
    /// 1 to 200 characters, not only whitespace, no control characters; unique.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*[^\s\u0000-\u001F\u007F-\u009F][^\u0000-\u001F\u007F-\u009F]*$"
    )]
    pub name: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInstallToken {
    #[schema(format = Uuid)]
    pub client_id: String,
    /// Lifetime in seconds, from a minute to 30 days (default 86400).
    #[serde(default, deserialize_with = "license_protocol::whole::option_u64")]
    #[schema(minimum = 60, maximum = 2592000)]
    pub ttl_secs: Option<u64>,
    /// Bind the token to this machine of the client: it re-enrolls that machine (a wiped or
    /// replaced till) under whatever hardware id it reports.
    pub machine_id: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ClientFilter {
    pub client_id: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CertificateFilter {
    pub client_id: Option<String>,
    pub machine_id: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MachineFilter {
    pub machine_id: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IssueLicense {
    #[schema(format = Uuid)]
    pub machine_id: String,
    /// Features granted, e.g. `["pos.sale", "pos.refund"]`: 1 to 64 distinct names of 1 to 64
    /// characters from `[A-Za-z0-9._:-]`.
    #[schema(schema_with = features_schema)]
    pub features: Vec<String>,
    /// At most 64 entries; keys are names like features, values at most 1024 characters
    /// without control characters.
    #[serde(default)]
    #[schema(schema_with = metadata_schema)]
    pub metadata: BTreeMap<String, String>,
    /// RFC 3339; default now.
    #[schema(format = DateTime)]
    pub not_before: Option<String>,
    /// RFC 3339, in the future and after `not_before`; absent (and no `expires_in_secs`):
    /// does not expire.
    #[schema(format = DateTime)]
    pub expires_at: Option<String>,
    /// Expiry relative to now, instead of `expires_at`.
    #[serde(default, deserialize_with = "license_protocol::whole::option_u64")]
    pub expires_in_secs: Option<u64>,
}

/// A feature or metadata key: what `service::licenses` accepts.
fn license_name_schema() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::String)
        .min_length(Some(1))
        .max_length(Some(crate::service::licenses::MAX_NAME_LEN))
        .pattern(Some("^[A-Za-z0-9._:-]*$"))
        .build()
}

fn features_schema() -> utoipa::openapi::Array {
    utoipa::openapi::ArrayBuilder::new()
        .items(license_name_schema())
        .min_items(Some(1))
        .max_items(Some(crate::service::licenses::MAX_FEATURES))
        .unique_items(true)
        .build()
}

fn metadata_schema() -> utoipa::openapi::Object {
    let value = utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::String)
        .max_length(Some(crate::service::licenses::MAX_METADATA_VALUE_LEN))
        .pattern(Some(r"^[^\u0000-\u001F\u007F-\u009F]*$"));
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::Object)
        .property_names(Some(license_name_schema()))
        .additional_properties(Some(value))
        .max_properties(Some(crate::service::licenses::MAX_METADATA_ENTRIES))
        .build()
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
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Only events with a sequence number above this.
    pub since: Option<i64>,
    pub limit: Option<i64>,
}

#[utoipa::path(get, path = "/api/admin/clients", tag = "admin", security(("bearer" = [])),
    responses(AdminReadRefusals, (status = 200, body = Vec<ClientRecord>)))]
async fn list_clients(call: AdminCall) -> ApiResult<Vec<ClientRecord>> {
    Ok(Json(call.admin().list_clients().await?))
}

#[utoipa::path(post, path = "/api/admin/clients", tag = "admin", security(("bearer" = [])), request_body = CreateClient,
    responses(JsonBodyRefusals, AdminWriteRefusals, (status = 200, body = ClientRecord),
              (status = 400, description = "`invalid_request`: not JSON, or the name is empty, too long or has control characters", body = ApiError),
              (status = 409, description = "`conflict`: a client with this name exists", body = ApiError)))]
async fn create_client(
    call: AdminCall,
    ApiJson(req): ApiJson<CreateClient>,
) -> ApiResult<ClientRecord> {
    Ok(Json(call.admin().create_client(&req.name).await?))
}

#[utoipa::path(get, path = "/api/admin/install-tokens", tag = "admin", security(("bearer" = [])), params(ClientFilter),
    responses(AdminReadRefusals, (status = 200, body = Vec<InstallTokenRecord>)))]
async fn list_install_tokens(
    call: AdminCall,
    ApiQuery(q): ApiQuery<ClientFilter>,
) -> ApiResult<Vec<InstallTokenRecord>> {
    Ok(Json(
        call.admin()
            .list_install_tokens(q.client_id.as_deref())
            .await?,
    ))
}

/// Mint a one-time install token; the response is the only place its value appears.
#[utoipa::path(post, path = "/api/admin/install-tokens", tag = "admin", security(("bearer" = [])), request_body = CreateInstallToken,
    responses(JsonBodyRefusals, AdminWriteRefusals, (status = 200, body = CreatedInstallToken),
              (status = 400, description = "`invalid_request`: not JSON, `client_id` not a UUID, or `ttl_secs` out of range", body = ApiError),
              (status = 404, description = "`not_found`: no such client", body = ApiError)))]
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

/// The media type of a Windows executable.
pub const PE_MEDIA_TYPE: &str = "application/vnd.microsoft.portable-executable";

/// The answer carrying a Windows installer: the file as an attachment named after the client,
/// and the id of the token inside it (`X-Install-Token-Id`), never the token.
pub fn installer_response(installer: WindowsInstaller) -> Response {
    let record = &installer.created.record;
    // A client id is a UUID (checked before the token was minted): safe in a header.
    let disposition = format!(
        "attachment; filename=\"license-agent-installer-{}.exe\"",
        record.client_id
    );
    let id = record.id.clone();
    (
        [
            (header::CONTENT_TYPE, PE_MEDIA_TYPE.to_string()),
            (header::CONTENT_DISPOSITION, disposition),
            (header::HeaderName::from_static("x-install-token-id"), id),
        ],
        installer.exe,
    )
        .into_response()
}

/// Mint a one-time install token into a Windows installer: the Windows agent (`windows_stub`
/// in server.toml) with this server's URL, pin and the token appended. The token appears only
/// inside the file.
#[utoipa::path(post, path = "/api/admin/install-tokens/windows-installer", tag = "admin", security(("bearer" = [])), request_body = CreateInstallToken,
    responses(JsonBodyRefusals, AdminWriteRefusals,
              (status = 200, description = "the installer (`license-agent-installer-<client_id>.exe`)",
               content_type = "application/vnd.microsoft.portable-executable", body = Vec<u8>,
               headers(("Content-Disposition" = String, description = "`attachment; filename=\"license-agent-installer-<client_id>.exe\"`"),
                       ("X-Install-Token-Id" = String, description = "the id of the install token inside the installer"))),
              (status = 400, description = "`invalid_request`: not JSON, `client_id` not a UUID, or `ttl_secs` out of range", body = ApiError),
              (status = 404, description = "`not_found`: no such client", body = ApiError),
              (status = 503, description = "`windows_stub_missing`: the server's Windows agent (`windows_stub`) is missing, unreadable or not a Windows executable; the message names its path. No token is minted", body = ApiError)))]
async fn create_windows_installer(
    call: AdminCall,
    ApiJson(req): ApiJson<CreateInstallToken>,
) -> Result<Response, ApiFailure> {
    let stub = StubSource::configured(&call.state.settings.windows_stub);
    let installer = call
        .admin()
        .create_windows_installer(
            &req.client_id,
            req.ttl_secs,
            req.machine_id.as_deref(),
            &stub,
        )
        .await?;
    Ok(installer_response(installer))
}

#[utoipa::path(get, path = "/api/admin/machines", tag = "admin", security(("bearer" = [])), params(ClientFilter),
    responses(AdminReadRefusals, (status = 200, body = Vec<MachineRecord>)))]
async fn list_machines(
    call: AdminCall,
    ApiQuery(q): ApiQuery<ClientFilter>,
) -> ApiResult<Vec<MachineRecord>> {
    Ok(Json(
        call.admin().list_machines(q.client_id.as_deref()).await?,
    ))
}

#[utoipa::path(get, path = "/api/admin/machines/{id}", tag = "admin", security(("bearer" = [])), params(("id" = uuid::Uuid, Path, description = "machine id")),
    responses(AdminReadRefusals, (status = 200, body = MachineRecord), (status = 400, description = "`invalid_request`: the id is not a UUID", body = ApiError),
              (status = 404, description = "`not_found`: no such machine", body = ApiError)))]
async fn get_machine(call: AdminCall, ApiPath(id): ApiPath<String>) -> ApiResult<MachineRecord> {
    Ok(Json(call.admin().get_machine(&id).await?))
}

#[utoipa::path(delete, path = "/api/admin/machines/{id}", tag = "admin", security(("bearer" = [])), params(("id" = uuid::Uuid, Path, description = "machine id")),
    responses(AdminWriteRefusals, (status = 204, description = "deleted"), (status = 400, description = "`invalid_request`: the id is not a UUID", body = ApiError),
              (status = 404, description = "`not_found`: no such machine", body = ApiError)))]
async fn delete_machine(
    call: AdminCall,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiFailure> {
    call.admin().delete_machine(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Block one machine (its other machines' siblings keep working).
#[utoipa::path(post, path = "/api/admin/machines/{id}/revoke", tag = "admin", security(("bearer" = [])), params(("id" = uuid::Uuid, Path, description = "machine id")),
    responses(AdminWriteRefusals, (status = 200, body = MachineRecord), (status = 400, description = "`invalid_request`: the id is not a UUID", body = ApiError),
              (status = 404, description = "`not_found`: no such machine", body = ApiError)))]
async fn revoke_machine(call: AdminCall, ApiPath(id): ApiPath<String>) -> ApiResult<MachineRecord> {
    Ok(Json(call.admin().revoke_machine(&id).await?))
}

#[utoipa::path(post, path = "/api/admin/machines/{id}/restore", tag = "admin", security(("bearer" = [])), params(("id" = uuid::Uuid, Path, description = "machine id")),
    responses(AdminWriteRefusals, (status = 200, body = MachineRecord), (status = 400, description = "`invalid_request`: the id is not a UUID", body = ApiError),
              (status = 404, description = "`not_found`: no such machine", body = ApiError)))]
async fn restore_machine(
    call: AdminCall,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<MachineRecord> {
    Ok(Json(call.admin().restore_machine(&id).await?))
}

/// Ask the machine to rotate its secret now (seen in its secret status until it acknowledges).
#[utoipa::path(post, path = "/api/admin/machines/{id}/rotate", tag = "admin", security(("bearer" = [])), params(("id" = uuid::Uuid, Path, description = "machine id")),
    responses(AdminWriteRefusals, (status = 200, body = MachineRecord), (status = 400, description = "`invalid_request`: the id is not a UUID", body = ApiError),
              (status = 404, description = "`not_found`: no such machine", body = ApiError)))]
async fn rotate_machine(call: AdminCall, ApiPath(id): ApiPath<String>) -> ApiResult<MachineRecord> {
    Ok(Json(call.admin().request_rotation(&id).await?))
}

/// The machine's secret versions, states and dates (never the secrets).
#[utoipa::path(get, path = "/api/admin/machines/{id}/secrets", tag = "admin", security(("bearer" = [])), params(("id" = uuid::Uuid, Path, description = "machine id")),
    responses(AdminReadRefusals, (status = 200, body = Vec<SecretRecord>), (status = 400, description = "`invalid_request`: the id is not a UUID", body = ApiError),
              (status = 404, description = "`not_found`: no such machine", body = ApiError)))]
async fn list_secrets(
    call: AdminCall,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Vec<SecretRecord>> {
    Ok(Json(call.admin().list_secrets(&id).await?))
}

/// Invalidate one secret version: tokens under it stop validating (`secret_invalidated`).
#[utoipa::path(post, path = "/api/admin/machines/{id}/secrets/{version}/invalidate", tag = "admin", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path, description = "machine id"), ("version" = u64, Path, description = "secret version")),
    responses(AdminWriteRefusals, (status = 200, body = SecretRecord),
              (status = 400, description = "`invalid_request`: the id is not a UUID or the version not a number", body = ApiError),
              (status = 404, description = "`not_found`: no such machine or secret version", body = ApiError),
              (status = 409, description = "`conflict`: the version is already invalidated", body = ApiError)))]
async fn invalidate_secret(
    call: AdminCall,
    ApiPath((id, version)): ApiPath<(String, u64)>,
) -> ApiResult<SecretRecord> {
    Ok(Json(call.admin().invalidate_secret(&id, version).await?))
}

#[utoipa::path(get, path = "/api/admin/licenses", tag = "admin", security(("bearer" = [])), params(MachineFilter),
    responses(AdminReadRefusals, (status = 200, body = Vec<LicenseRecord>)))]
async fn list_licenses(
    call: AdminCall,
    ApiQuery(q): ApiQuery<MachineFilter>,
) -> ApiResult<Vec<LicenseRecord>> {
    Ok(Json(
        call.admin().list_licenses(q.machine_id.as_deref()).await?,
    ))
}

/// Issue a license for one machine; the answer carries its token once the machine holds a secret.
#[utoipa::path(post, path = "/api/admin/licenses", tag = "admin", security(("bearer" = [])), request_body = IssueLicense,
    responses(JsonBodyRefusals, AdminWriteRefusals, (status = 200, body = IssuedLicense),
              (status = 400, description = "`invalid_request`: not JSON, or a field is refused (the message names it): \
                `machine_id` not a UUID, features or metadata malformed, dates unparsable, in the past or out of order, \
                both `expires_at` and `expires_in_secs`", body = ApiError),
              (status = 404, description = "`not_found`: no such machine", body = ApiError),
              (status = 409, description = "`conflict`: the machine is revoked", body = ApiError)))]
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

#[utoipa::path(post, path = "/api/admin/licenses/{id}/revoke", tag = "admin", security(("bearer" = [])), params(("id" = uuid::Uuid, Path, description = "license id")),
    responses(AdminWriteRefusals, (status = 200, body = LicenseRecord), (status = 400, description = "`invalid_request`: the id is not a UUID", body = ApiError),
              (status = 404, description = "`not_found`: no such license", body = ApiError),
              (status = 409, description = "`conflict`: the license is already revoked", body = ApiError)))]
async fn revoke_license(call: AdminCall, ApiPath(id): ApiPath<String>) -> ApiResult<LicenseRecord> {
    Ok(Json(call.admin().revoke_license(&id).await?))
}

/// The license's token under its machine's current secret version (409 before the first rotation).
#[utoipa::path(get, path = "/api/admin/licenses/{id}/token", tag = "admin", security(("bearer" = [])), params(("id" = uuid::Uuid, Path, description = "license id")),
    responses(AdminReadRefusals, (status = 200, body = LicenseToken), (status = 400, description = "`invalid_request`: the id is not a UUID", body = ApiError),
              (status = 404, description = "`not_found`: no such license", body = ApiError),
              (status = 409, description = "`conflict`: the license is revoked, or its machine holds no secret yet", body = ApiError)))]
async fn license_token(call: AdminCall, ApiPath(id): ApiPath<String>) -> ApiResult<LicenseToken> {
    Ok(Json(call.admin().license_token(&id).await?))
}

#[utoipa::path(get, path = "/api/admin/certificates/stats", tag = "admin", security(("bearer" = [])),
    responses(AdminReadRefusals, (status = 200, body = CertificateStats)))]
async fn certificate_stats(call: AdminCall) -> ApiResult<CertificateStats> {
    Ok(Json(call.admin().certificate_stats().await?))
}

#[utoipa::path(get, path = "/api/admin/certificates", tag = "admin", security(("bearer" = [])), params(CertificateFilter),
    responses(AdminReadRefusals, (status = 200, body = Vec<CertificateRecord>)))]
async fn list_certificates(
    call: AdminCall,
    ApiQuery(q): ApiQuery<CertificateFilter>,
) -> ApiResult<Vec<CertificateRecord>> {
    Ok(Json(
        call.admin()
            .list_certificates(q.machine_id.as_deref(), q.client_id.as_deref())
            .await?,
    ))
}

#[utoipa::path(post, path = "/api/admin/certificates/{serial}/revoke", tag = "admin", security(("bearer" = [])), params(("serial" = String, Path, pattern = r"^[0-9A-Fa-f]{1,64}$", description = "certificate serial, hexadecimal")),
    responses(AdminWriteRefusals, (status = 200, body = CertificateRecord), (status = 400, description = "`invalid_request`: the serial is not hexadecimal", body = ApiError),
              (status = 404, description = "`not_found`: no such certificate", body = ApiError),
              (status = 409, description = "`conflict`: the certificate is not active (revoked, superseded or expired)", body = ApiError)))]
async fn revoke_certificate(
    call: AdminCall,
    ApiPath(serial): ApiPath<String>,
) -> ApiResult<CertificateRecord> {
    Ok(Json(call.admin().revoke_certificate(&serial).await?))
}

#[utoipa::path(post, path = "/api/admin/certificates/{serial}/restore", tag = "admin", security(("bearer" = [])), params(("serial" = String, Path, pattern = r"^[0-9A-Fa-f]{1,64}$", description = "certificate serial, hexadecimal")),
    responses(AdminWriteRefusals, (status = 200, body = CertificateRecord), (status = 400, description = "`invalid_request`: the serial is not hexadecimal", body = ApiError),
              (status = 404, description = "`not_found`: no such certificate", body = ApiError),
              (status = 409, description = "`conflict`: the certificate is not revoked, or its machine has another active certificate", body = ApiError)))]
async fn restore_certificate(
    call: AdminCall,
    ApiPath(serial): ApiPath<String>,
) -> ApiResult<CertificateRecord> {
    Ok(Json(call.admin().restore_certificate(&serial).await?))
}

/// Delete revoked, superseded and expired certificates.
#[utoipa::path(post, path = "/api/admin/certificates/purge", tag = "admin", security(("bearer" = [])),
    responses(AdminWriteRefusals, (status = 200, body = PurgeReport)))]
async fn purge_certificates(call: AdminCall) -> ApiResult<PurgeReport> {
    Ok(Json(call.admin().purge_certificates().await?))
}

#[utoipa::path(get, path = "/api/admin/audit", tag = "admin", security(("bearer" = [])), params(AuditQuery),
    responses(AdminReadRefusals, (status = 200, body = Vec<AuditEvent>),
              (status = 400, description = "`invalid_request`: `since` or `limit` is not a 64-bit integer", body = ApiError)))]
async fn audit_events(
    call: AdminCall,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<Vec<AuditEvent>> {
    Ok(Json(
        call.admin()
            .audit_events(q.since.unwrap_or(0), q.limit.unwrap_or(1000))
            .await?,
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReleaseFilter {
    /// Only the releases of this channel.
    #[param(pattern = r"^[a-z0-9-]{1,32}$")]
    pub channel: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    /// Share of the channel's machines offered the release, 0 to 100 (unchanged when absent).
    #[serde(default, deserialize_with = "license_protocol::whole::option_u64")]
    #[schema(minimum = 0, maximum = 100)]
    pub percent: Option<u64>,
    /// Clients whose every machine is offered the release, added to those named before.
    #[serde(default)]
    pub clients: Vec<uuid::Uuid>,
}

/// Every release, newest first, with its rollout and the machines' report counts.
#[utoipa::path(get, path = "/api/admin/releases", tag = "admin", security(("bearer" = [])), params(ReleaseFilter),
    responses(AdminReadRefusals, (status = 200, body = Vec<ReleaseView>),
              (status = 400, description = "`invalid_request`: `channel` is not a channel name", body = ApiError)))]
async fn list_releases(
    call: AdminCall,
    ApiQuery(q): ApiQuery<ReleaseFilter>,
) -> ApiResult<Vec<ReleaseView>> {
    Ok(Json(call.releases().list(q.channel.as_deref()).await?))
}

/// Set a release's percentage and add named clients; refused on a withdrawn release.
#[utoipa::path(post, path = "/api/admin/releases/{release}/rollout", tag = "admin", security(("bearer" = [])),
    params(("release" = String, Path, description = "the release id, or a version exactly one release has")),
    request_body = RolloutRequest,
    responses(JsonBodyRefusals, AdminWriteRefusals, (status = 200, body = ReleaseView),
              (status = 404, description = "`not_found`: no such release or client", body = ApiError),
              (status = 409, description = "`conflict`: the release is withdrawn, or several releases have that version", body = ApiError)))]
async fn rollout_release(
    call: AdminCall,
    ApiPath(release): ApiPath<String>,
    ApiJson(req): ApiJson<RolloutRequest>,
) -> ApiResult<ReleaseView> {
    let percent = req
        .percent
        .map(|p| {
            u8::try_from(p).ok().filter(|p| *p <= 100).ok_or_else(|| {
                crate::service::releases::ReleaseError::InvalidInput {
                    field: "percent",
                    message: "must be 0 to 100".into(),
                }
            })
        })
        .transpose()?;
    Ok(Json(
        call.releases()
            .rollout(&release, percent, &req.clients)
            .await?,
    ))
}

/// Stop offering a release until it is resumed.
#[utoipa::path(post, path = "/api/admin/releases/{release}/pause", tag = "admin", security(("bearer" = [])),
    params(("release" = String, Path, description = "the release id, or a version exactly one release has")),
    responses(AdminWriteRefusals, (status = 200, body = ReleaseView),
              (status = 404, description = "`not_found`: no such release", body = ApiError),
              (status = 409, description = "`conflict`: the release is withdrawn, or several releases have that version", body = ApiError)))]
async fn pause_release(
    call: AdminCall,
    ApiPath(release): ApiPath<String>,
) -> ApiResult<ReleaseView> {
    Ok(Json(call.releases().pause(&release).await?))
}

/// Offer a paused or halted release again (clears a halt).
#[utoipa::path(post, path = "/api/admin/releases/{release}/resume", tag = "admin", security(("bearer" = [])),
    params(("release" = String, Path, description = "the release id, or a version exactly one release has")),
    responses(AdminWriteRefusals, (status = 200, body = ReleaseView),
              (status = 404, description = "`not_found`: no such release", body = ApiError),
              (status = 409, description = "`conflict`: the release is withdrawn, or several releases have that version", body = ApiError)))]
async fn resume_release(
    call: AdminCall,
    ApiPath(release): ApiPath<String>,
) -> ApiResult<ReleaseView> {
    Ok(Json(call.releases().resume(&release).await?))
}

/// Withdraw a release for good: it is neither offered nor downloadable any more.
#[utoipa::path(post, path = "/api/admin/releases/{release}/withdraw", tag = "admin", security(("bearer" = [])),
    params(("release" = String, Path, description = "the release id, or a version exactly one release has")),
    responses(AdminWriteRefusals, (status = 200, body = ReleaseView),
              (status = 404, description = "`not_found`: no such release", body = ApiError),
              (status = 409, description = "`conflict`: the release is already withdrawn, or several releases have that version", body = ApiError)))]
async fn withdraw_release(
    call: AdminCall,
    ApiPath(release): ApiPath<String>,
) -> ApiResult<ReleaseView> {
    Ok(Json(call.releases().withdraw(&release).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_numbers_may_be_written_as_floats() {
        let ttl = |json: &str| {
            serde_json::from_str::<CreateInstallToken>(&format!(
                r#"{{"client_id": "x", "ttl_secs": {json}}}"#
            ))
            .map(|t| t.ttl_secs)
        };
        assert_eq!(ttl("3600").unwrap(), Some(3600));
        assert_eq!(ttl("3600.0").unwrap(), Some(3600));
        assert_eq!(ttl("null").unwrap(), None);
        for refused in ["3600.5", "-1", "-1.0", "1e300", "\"3600\""] {
            assert!(ttl(refused).is_err(), "{refused}");
        }
        let absent: CreateInstallToken = serde_json::from_str(r#"{"client_id": "x"}"#).unwrap();
        assert_eq!(absent.ttl_secs, None);
    }
}
