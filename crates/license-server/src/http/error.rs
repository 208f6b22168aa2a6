//! The one place where internal errors become HTTP statuses and stable JSON error codes.
//! Internal details (database messages) are logged, never sent.

use axum::extract::rejection::JsonRejection;
use axum::extract::FromRequest;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use license_protocol::error::ApiError;

use crate::service::admin::AdminError;
use crate::service::enroll::EnrollError;
use crate::service::recover::RecoverError;
use crate::service::secrets::RotationError;

/// An error answer: status, stable code, one sentence.
#[derive(Debug)]
pub struct ApiFailure {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiFailure {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn internal(e: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal error; see the server log",
        )
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ApiError {
                error: self.code.to_string(),
                message: self.message,
            }),
        )
            .into_response()
    }
}

impl From<EnrollError> for ApiFailure {
    fn from(e: EnrollError) -> Self {
        let status = match &e {
            EnrollError::TokenUnknown => StatusCode::UNAUTHORIZED,
            EnrollError::TokenAlreadyUsed | EnrollError::TokenExpired => StatusCode::GONE,
            EnrollError::MachineRevoked => StatusCode::FORBIDDEN,
            EnrollError::Csr(_) => StatusCode::BAD_REQUEST,
            EnrollError::Concurrent => StatusCode::CONFLICT,
            EnrollError::Pki(_) | EnrollError::Store(_) => return Self::internal(&e),
        };
        Self::new(status, e.code(), e.to_string())
    }
}

impl From<RecoverError> for ApiFailure {
    fn from(e: RecoverError) -> Self {
        let status = match &e {
            RecoverError::Refused(_) => StatusCode::UNAUTHORIZED,
            RecoverError::MachineRevoked => StatusCode::FORBIDDEN,
            RecoverError::Csr(_) => StatusCode::BAD_REQUEST,
            RecoverError::Concurrent => StatusCode::CONFLICT,
            RecoverError::Pki(_) | RecoverError::Store(_) => return Self::internal(&e),
        };
        Self::new(status, e.code(), e.to_string())
    }
}

impl From<crate::store::StoreError> for ApiFailure {
    fn from(e: crate::store::StoreError) -> Self {
        Self::internal(&e)
    }
}

impl From<AdminError> for ApiFailure {
    fn from(e: AdminError) -> Self {
        let status = match &e {
            AdminError::NotFound { .. } => StatusCode::NOT_FOUND,
            AdminError::InvalidInput { .. } => StatusCode::BAD_REQUEST,
            AdminError::Conflict(_) => StatusCode::CONFLICT,
            AdminError::Store(_) => return Self::internal(&e),
        };
        Self::new(status, e.code(), e.to_string())
    }
}

impl From<RotationError> for ApiFailure {
    fn from(e: RotationError) -> Self {
        let status = match &e {
            RotationError::AgentIdMismatch => StatusCode::FORBIDDEN,
            RotationError::StaleRequest | RotationError::UnsupportedKey => StatusCode::BAD_REQUEST,
            RotationError::BadSignature => StatusCode::UNAUTHORIZED,
            RotationError::Replayed
            | RotationError::UnknownVersion(_)
            | RotationError::NotPending(..) => StatusCode::CONFLICT,
            RotationError::Store(_) => return Self::internal(&e),
        };
        Self::new(status, e.code(), e.to_string())
    }
}

/// Bodies up to this size are read and discarded before a 413 answer, so a client still
/// writing its body gets the JSON error instead of a broken pipe; larger ones are cut off.
const DRAIN_BEFORE_413_BYTES: usize = 1024 * 1024;

/// Middleware: refuses a request whose declared `Content-Length` exceeds `limit` with a JSON
/// 413. (Bodies without a length are bounded by `DefaultBodyLimit` as they are read.)
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
            ApiFailure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body is larger than {limit} bytes"),
            )
            .into_response()
        }
        _ => next.run(req).await,
    }
}

/// `Json<T>` whose rejections are JSON errors naming the problem (body too large, not JSON,
/// a field missing or malformed) instead of axum's plain-text ones.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiFailure;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => {
                let status = rejection.status();
                let code = match status {
                    StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
                    _ => "invalid_request",
                };
                // body_text() carries serde's message, which names the field and position.
                Err(ApiFailure::new(status, code, rejection.body_text()))
            }
        }
    }
}
