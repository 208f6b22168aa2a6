//! Public listener: bootstrap enrollment, machine recovery, `install.sh`, agent downloads, health, OpenAPI.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use license_protocol::enroll::{
    BootstrapRequest, BootstrapResponse, RecoverRequest, RecoverResponse,
};
use license_protocol::error::{ApiError, ErrorCode};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiFailure, ApiJson, ApiPath};
use super::listener::ConnInfo;
use super::refusals::{InternalRefusal, JsonBodyRefusals};
use crate::service::{enroll, recover, SharedState};

/// Largest request body the public listener reads.
pub const MAX_PUBLIC_BODY_BYTES: usize = 64 * 1024;

/// The installer lives with the packaging it installs (`packaging/install.sh`).
const INSTALL_SH: &str = include_str!("../../../../packaging/install.sh");

/// Per-address limiter on bootstrap and recovery requests (one quota for both), keyed by
/// [`rate_key`].
pub type BootstrapLimiter = Arc<DefaultKeyedRateLimiter<IpAddr>>;

/// Whom a quota belongs to: an IPv4 address, or an IPv6 /64 — the prefix one subscriber
/// holds, so that walking through its 2^64 addresses earns no extra quota. An IPv4-mapped
/// IPv6 address counts as its IPv4 address.
pub fn rate_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !u128::from(u64::MAX),
            )),
        },
    }
}

pub fn bootstrap_limiter(per_minute: u32) -> BootstrapLimiter {
    let per_minute = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
    Arc::new(RateLimiter::keyed(Quota::per_minute(per_minute)))
}

/// Paths that present a credential to the public listener, limited per IP.
const RATE_LIMITED_PATHS: [&str; 2] = ["/api/public/bootstrap", "/api/public/recover"];

/// Refuses a bootstrap or recovery request beyond the caller's IP quota with 429.
pub async fn rate_limit(
    Extension(limiter): Extension<BootstrapLimiter>,
    Extension(conn): Extension<ConnInfo>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    if RATE_LIMITED_PATHS.contains(&req.uri().path())
        && limiter.check_key(&rate_key(conn.remote.ip())).is_err()
    {
        let message = "too many enrollment attempts from this address; retry in a minute";
        let mut response = ApiFailure::refused(ErrorCode::RateLimited, message).into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("60"));
        return response;
    }
    next.run(req).await
}

pub fn router() -> OpenApiRouter<SharedState> {
    OpenApiRouter::new()
        .routes(routes!(bootstrap))
        .routes(routes!(recover))
        .routes(routes!(install_sh))
        .routes(routes!(download))
        .routes(routes!(healthz))
        .routes(routes!(openapi_json))
}

/// Enroll a machine with a one-time install token.
#[utoipa::path(post, path = "/api/public/bootstrap", tag = "public",
    request_body = BootstrapRequest,
    responses(
        JsonBodyRefusals, InternalRefusal,
        (status = 200, body = BootstrapResponse),
        (status = 400, description = "`invalid_csr`, or `invalid_request`: not JSON", body = ApiError),
        (status = 401, description = "`token_unknown`", body = ApiError),
        (status = 403, description = "`machine_revoked`", body = ApiError),
        (status = 409, description = "`concurrent_enrollment`: another enrollment of the same machine is in progress; `machine_already_enrolled`: the hardware id is an enrolled machine's and the request is neither signed by its key nor made with a token bound to it", body = ApiError),
        (status = 410, description = "`token_already_used` or `token_expired`", body = ApiError),
        (status = 429, description = "`rate_limited` (with `Retry-After`)", body = ApiError),
    ))]
async fn bootstrap(
    State(state): State<SharedState>,
    Extension(conn): Extension<ConnInfo>,
    ApiJson(req): ApiJson<BootstrapRequest>,
) -> Result<Json<BootstrapResponse>, ApiFailure> {
    let response = enroll::bootstrap(&state, req, conn.remote.ip()).await?;
    tracing::info!(machine_id = %response.machine_id, client_id = %response.client_id, serial = %response.serial, "machine enrolled");
    Ok(Json(response))
}

/// A machine whose key is gone (TPM cleared) gets a certificate for a new key with its
/// single-use recovery token, and the next token.
#[utoipa::path(post, path = "/api/public/recover", tag = "public",
    request_body = RecoverRequest,
    responses(
        JsonBodyRefusals, InternalRefusal,
        (status = 200, body = RecoverResponse),
        (status = 400, description = "`invalid_csr`, or `invalid_request`: not JSON", body = ApiError),
        (status = 401, description = "`recovery_refused`: unknown machine, wrong or spent token", body = ApiError),
        (status = 403, description = "`machine_revoked`", body = ApiError),
        (status = 409, description = "`concurrent_enrollment`: an enrollment or renewal of the same machine is in progress", body = ApiError),
        (status = 429, description = "`rate_limited` (with `Retry-After`)", body = ApiError),
    ))]
async fn recover(
    State(state): State<SharedState>,
    Extension(conn): Extension<ConnInfo>,
    ApiJson(req): ApiJson<RecoverRequest>,
) -> Result<Json<RecoverResponse>, ApiFailure> {
    let response = recover::recover(&state, req, conn.remote.ip()).await?;
    tracing::info!(machine_id = %response.machine_id, client_id = %response.client_id, serial = %response.serial, "machine recovered");
    Ok(Json(response))
}

/// The Linux installer: `curl -fsSL -k --pinnedpubkey PIN URL/install.sh | sudo bash -s -- TOKEN`.
#[utoipa::path(get, path = "/install.sh", tag = "public",
    responses((status = 200, description = "shell script", content_type = "text/x-shellscript", body = String)))]
async fn install_sh(State(state): State<SharedState>) -> impl IntoResponse {
    let script = INSTALL_SH
        .replace("@PUBLIC_URL@", &state.settings.public_url)
        .replace("@SERVER_PIN@", &state.keys.server_pin.to_string())
        .replace("@CURL_PIN@", &state.keys.server_pin.curl_form());
    (
        [(header::CONTENT_TYPE, "text/x-shellscript; charset=utf-8")],
        script,
    )
}

fn safe_component(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Agent binaries, from `DATA_DIR/downloads/<channel>/<file>`.
#[utoipa::path(get, path = "/downloads/{channel}/{file}", tag = "public",
    params(("channel" = String, Path, description = "release channel, e.g. stable"),
           ("file" = String, Path, description = "e.g. license-agent-linux-amd64")),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>),
              (status = 400, description = "`invalid_request`: a path segment is not UTF-8", body = ApiError),
              (status = 404, description = "`not_found`", body = ApiError)))]
async fn download(
    State(state): State<SharedState>,
    ApiPath((channel, file)): ApiPath<(String, String)>,
) -> Result<Response, ApiFailure> {
    let not_found =
        || ApiFailure::refused(ErrorCode::NotFound, format!("no download {channel}/{file}"));
    if !safe_component(&channel) || !safe_component(&file) {
        return Err(not_found());
    }
    let path = state.settings.downloads_dir.join(&channel).join(&file);
    // Streamed in chunks: a download holds one chunk in memory, not the file, however many
    // clients ask at once (and one that stops reading is cut off by the listener).
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| not_found())?;
    let meta = file.metadata().await.map_err(|_| not_found())?;
    if !meta.is_file() {
        return Err(not_found());
    }
    let body =
        axum::body::Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, meta.len().to_string()),
        ],
        body,
    )
        .into_response())
}

#[derive(serde::Serialize, utoipa::ToSchema)]
struct Health {
    status: &'static str,
    database: &'static str,
}

/// Liveness and database reachability.
#[utoipa::path(get, path = "/healthz", tag = "public",
    responses((status = 200, body = Health), (status = 503, body = Health)))]
async fn healthz(State(state): State<SharedState>) -> (StatusCode, Json<Health>) {
    match sqlx::query("SELECT 1").execute(state.store.pool()).await {
        Ok(_) => (
            StatusCode::OK,
            Json(Health {
                status: "ok",
                database: "ok",
            }),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                status: "degraded",
                database: "unreachable",
            }),
        ),
    }
}

/// The OpenAPI document of all three listeners.
#[utoipa::path(get, path = "/api/openapi.json", tag = "public",
    responses((status = 200, content_type = "application/json", body = Object)))]
async fn openapi_json(Extension(doc): Extension<super::OpenApiDocument>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        doc.0.as_ref().clone(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_are_per_ipv4_address_and_per_ipv6_slash_64() {
        let key = |s: &str| rate_key(s.parse().unwrap());
        assert_eq!(key("203.0.113.7"), key("203.0.113.7"));
        assert_ne!(key("203.0.113.7"), key("203.0.113.8"));
        assert_eq!(
            key("2001:db8:1:2::1"),
            key("2001:db8:1:2:ffff:ffff:ffff:ffff")
        );
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:203.0.113.7"), key("203.0.113.7"));
    }
}
