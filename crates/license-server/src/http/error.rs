//! The one place where internal errors become HTTP statuses and stable JSON error codes: each
//! service error names its [`ErrorCode`], and [`status_of`] gives every code its status.
//! Internal details (database messages) are logged, never sent.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use license_protocol::error::{ApiError, ErrorCode};

use crate::service::admin::AdminError;
use crate::service::enroll::EnrollError;
use crate::service::recover::RecoverError;
use crate::service::releases::ReleaseError;
use crate::service::secrets::RotationError;
use crate::store::StoreError;

/// The HTTP status of each code. `invalid_request` is 400 here; a JSON body that parses but
/// does not fit its type is 422 (axum's status, kept by [`ApiJson`]).
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidRequest | ErrorCode::InvalidCsr => StatusCode::BAD_REQUEST,
        ErrorCode::StaleRequest | ErrorCode::UnsupportedKey => StatusCode::BAD_REQUEST,
        ErrorCode::TokenUnknown | ErrorCode::RecoveryRefused => StatusCode::UNAUTHORIZED,
        ErrorCode::CertificateRequired | ErrorCode::BadSignature => StatusCode::UNAUTHORIZED,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::MachineRevoked | ErrorCode::AgentIdMismatch | ErrorCode::Forbidden => {
            StatusCode::FORBIDDEN
        }
        ErrorCode::BadCertificateCn
        | ErrorCode::UnknownCertificate
        | ErrorCode::CertificateRevoked
        | ErrorCode::CertificateSuperseded
        | ErrorCode::CertificateExpired => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::ConcurrentEnrollment | ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::MachineAlreadyEnrolled => StatusCode::CONFLICT,
        ErrorCode::ReplayedRequest | ErrorCode::UnknownVersion => StatusCode::CONFLICT,
        ErrorCode::VersionNotPending => StatusCode::CONFLICT,
        ErrorCode::TokenAlreadyUsed | ErrorCode::TokenExpired => StatusCode::GONE,
        ErrorCode::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::WindowsStubMissing | ErrorCode::ServerBusy => StatusCode::SERVICE_UNAVAILABLE,
        // Unrecognized is never sent; should it ever be, it is the server's fault.
        ErrorCode::InternalError | ErrorCode::Unrecognized => StatusCode::INTERNAL_SERVER_ERROR,
        // ErrorCode is non_exhaustive: a code added to the protocol before the server maps it.
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An error answer: status, stable code, one sentence.
#[derive(Debug)]
pub struct ApiFailure {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
}

impl ApiFailure {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// A refusal with its code's status ([`status_of`]).
    pub fn refused(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(status_of(code), code, message)
    }

    /// A service error: its code and sentence, unless it is internal, in which case the
    /// details go to the log and the caller learns only that it failed.
    fn from_service(code: ErrorCode, e: &dyn std::fmt::Display) -> Self {
        if code == ErrorCode::InternalError {
            tracing::error!(error = %e, "internal error");
            return Self::refused(
                ErrorCode::InternalError,
                "internal error; see the server log",
            );
        }
        Self::refused(code, e.to_string())
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ApiError {
                error: self.code,
                message: self.message,
            }),
        )
            .into_response()
    }
}

impl From<StoreError> for ApiFailure {
    fn from(e: StoreError) -> Self {
        Self::from_service(ErrorCode::InternalError, &e)
    }
}

/// Each service error names its own code (`code()`); the answer follows from it.
macro_rules! from_service_errors {
    ($($error:ty),+) => {$(
        impl From<$error> for ApiFailure {
            fn from(e: $error) -> Self {
                Self::from_service(e.code(), &e)
            }
        }
    )+};
}

from_service_errors!(
    EnrollError,
    RecoverError,
    AdminError,
    RotationError,
    ReleaseError
);

/// Bodies up to this size are read and discarded before a 413 answer, so a client still
/// writing its body gets the JSON error instead of a broken pipe; larger ones are cut off.
const DRAIN_BEFORE_413_BYTES: usize = 1024 * 1024;

/// Middleware: refuses a request whose declared `Content-Length` exceeds `limit` with a JSON
/// 413, then reads the whole body (at most `limit` bytes; 413 past it) before the request goes
/// on. Whatever answers it then — its route, or a refusal that never looks at the body (rate
/// limit, admin token, machine certificate, content type, 405) — leaves nothing unread on the
/// connection, which hyper would otherwise close under a client that may be reusing it.
pub async fn refuse_oversized(
    axum::extract::State(limit): axum::extract::State<usize>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(len) if len > limit as u64 => {
            if len <= DRAIN_BEFORE_413_BYTES as u64 {
                let _ = axum::body::to_bytes(req.into_body(), DRAIN_BEFORE_413_BYTES).await;
            }
            let message = format!("request body is larger than {limit} bytes");
            ApiFailure::refused(ErrorCode::BodyTooLarge, message).into_response()
        }
        _ => {
            let (parts, body) = req.into_parts();
            match axum::body::to_bytes(body, limit).await {
                Ok(body) => {
                    next.run(axum::extract::Request::from_parts(parts, body.into()))
                        .await
                }
                Err(e) => {
                    if e.into_inner().is::<http_body_util::LengthLimitError>() {
                        let message = format!("request body is larger than {limit} bytes");
                        ApiFailure::refused(ErrorCode::BodyTooLarge, message).into_response()
                    } else {
                        let message = "the request body could not be read";
                        ApiFailure::refused(ErrorCode::InvalidRequest, message).into_response()
                    }
                }
            }
        }
    }
}

/// `Json<T>` whose rejections are JSON errors naming the problem (body too large, not JSON,
/// not an object, a field missing or malformed) instead of axum's plain-text ones.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiFailure;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let failure = |status: StatusCode, message: String| {
            let code = match status {
                StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::BodyTooLarge,
                StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
                _ => ErrorCode::InvalidRequest,
            };
            ApiFailure::new(status, code, message)
        };
        // Every request body of this API is an object: serde would also read a struct whose
        // fields are all optional from an array (`[]`).
        let (parts, body) = req.into_parts();
        let bytes = axum::body::Bytes::from_request(
            axum::extract::Request::from_parts(parts.clone(), body),
            state,
        )
        .await
        .map_err(|rejection| failure(rejection.status(), rejection.body_text()))?;
        let object = bytes
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_none_or(|b| *b == b'{');
        let req = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) if object => Ok(Self(value)),
            // Not JSON, not of the content type, or an object that does not fit: said as such
            // (body_text() carries serde's message, which names the field and position).
            Err(rejection) if object || rejection.status() != StatusCode::UNPROCESSABLE_ENTITY => {
                Err(failure(rejection.status(), rejection.body_text()))
            }
            _ => Err(failure(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Failed to deserialize the JSON body: the body must be a JSON object".into(),
            )),
        }
    }
}

/// A rejection of axum's path or query extractor as a JSON error: `invalid_request` with its
/// status (400), or `internal_error` for a route whose parameters do not match its path.
fn parameter_failure(status: StatusCode, text: String) -> ApiFailure {
    if status.is_client_error() {
        ApiFailure::new(status, ErrorCode::InvalidRequest, text)
    } else {
        tracing::error!(error = %text, "route parameters do not match the route");
        ApiFailure::refused(
            ErrorCode::InternalError,
            "internal error; see the server log",
        )
    }
}

/// `Path<T>` whose rejections (a segment that does not parse as `T`) are JSON errors instead of
/// axum's plain-text ones.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    Path<T>: FromRequestParts<S, Rejection = PathRejection>,
    S: Send + Sync,
{
    type Rejection = ApiFailure;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(parameter_failure(rejection.status(), rejection.body_text())),
        }
    }
}

/// `Query<T>` whose rejections (a parameter that does not parse) are JSON errors instead of
/// axum's plain-text ones.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    Query<T>: FromRequestParts<S, Rejection = QueryRejection>,
    S: Send + Sync,
{
    type Rejection = ApiFailure;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(parameter_failure(rejection.status(), rejection.body_text())),
        }
    }
}
