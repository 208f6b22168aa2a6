//! The JSON error body of every server endpoint: a stable machine code and a human sentence.
//!
//! The codes are one enum, [`ErrorCode`], so the server cannot send a misspelt one and a client
//! matches on variants instead of strings. On the wire a code is its snake_case name, exactly
//! as before the enum existed; a code this build does not know reads as
//! [`ErrorCode::Unrecognized`], so an older agent still understands a newer server's answer.

use serde::{Deserialize, Serialize};

use license_ipc::stable_codes;

stable_codes! {
    /// Stable code of a refused request. A code is never renamed or reused for another meaning
    /// (docs/PROTOCOL.md lists which route answers which, with its HTTP status).
    pub enum ErrorCode {
        // --- any route -------------------------------------------------------------------------
        /// Not JSON, a field missing, malformed or unknown (the message names it).
        InvalidRequest => "invalid_request",
        /// The body is not declared as `application/json`.
        UnsupportedMediaType => "unsupported_media_type",
        /// The body is larger than the listener reads.
        BodyTooLarge => "body_too_large",
        /// Something failed inside the server; the details are in its log, never in the answer.
        InternalError => "internal_error",

        // --- enrollment and recovery (public listener) -------------------------------------------
        /// No such install token.
        TokenUnknown => "token_unknown",
        /// The install token was already consumed.
        TokenAlreadyUsed => "token_already_used",
        /// The install token is past its expiry.
        TokenExpired => "token_expired",
        /// The CSR does not parse, is too large, or its signature does not verify.
        InvalidCsr => "invalid_csr",
        /// Another enrollment, renewal or recovery of the same machine is in progress; retry.
        ConcurrentEnrollment => "concurrent_enrollment",
        /// Unknown machine, wrong or spent recovery token: one answer for all of them.
        RecoveryRefused => "recovery_refused",
        /// Too many bootstrap or recovery attempts from one address.
        RateLimited => "rate_limited",
        /// The machine is revoked (enrollment, recovery, or any agent request).
        MachineRevoked => "machine_revoked",
        /// Another machine is enrolled with this hardware id: re-enrolling it takes a signature
        /// by its key or an install token bound to it.
        MachineAlreadyEnrolled => "machine_already_enrolled",

        // --- agent listener: the presented certificate ----------------------------------------
        /// No client certificate was presented.
        CertificateRequired => "certificate_required",
        /// The certificate's CN is not `client_id:machine_id`, or not the certificate's machine.
        BadCertificateCn => "bad_certificate_cn",
        /// The certificate's serial is not known to the server.
        UnknownCertificate => "unknown_certificate",
        /// The certificate was revoked by an administrator.
        CertificateRevoked => "certificate_revoked",
        /// The certificate was replaced by a newer one (renewal, re-enrollment, recovery).
        CertificateSuperseded => "certificate_superseded",
        /// The certificate is past its expiry.
        CertificateExpired => "certificate_expired",
        /// The server is shedding load (HTTP 503): retry after its `Retry-After` seconds.
        ServerBusy => "server_busy",

        // --- agent listener: secret rotation ----------------------------------------------------
        /// `agent_id` is not the machine of the presented certificate.
        AgentIdMismatch => "agent_id_mismatch",
        /// The request's timestamp is too far from the server's clock.
        StaleRequest => "stale_request",
        /// The request's signature is malformed or does not verify.
        BadSignature => "bad_signature",
        /// The certificate's key is not one secrets can be delivered to (P-256).
        UnsupportedKey => "unsupported_key",
        /// The request's nonce was already used.
        ReplayedRequest => "replayed_request",
        /// A secret version the server never issued.
        UnknownVersion => "unknown_version",
        /// A secret version that can no longer be acknowledged.
        VersionNotPending => "version_not_pending",

        // --- admin listener ---------------------------------------------------------------------
        /// Missing, unknown or revoked admin token.
        Unauthorized => "unauthorized",
        /// The admin token's role does not allow this request.
        Forbidden => "forbidden",
        /// The named object (or download) does not exist.
        NotFound => "not_found",
        /// The request contradicts the current state (duplicate, already revoked, …).
        Conflict => "conflict",
        /// The server has no usable Windows agent to build an installer from (missing,
        /// unreadable, or not a Windows executable); the message names its path.
        WindowsStubMissing => "windows_stub_missing",

    }
}

/// In the OpenAPI document a code is a string, one of the codes a server sends (their wire
/// form, as serde writes them; `unrecognized` is never sent).
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for ErrorCode {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some(
                "Stable code of a refused request (docs/PROTOCOL.md lists them).",
            ))
            .enum_values(Some(ErrorCode::SENT.iter().map(|code| code.as_str())))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for ErrorCode {}

/// `{"error": "<code>", "message": "<sentence>"}`. Codes are stable; messages may change and
/// never contain secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiError {
    /// Stable code, e.g. `token_already_used`, `invalid_csr`, `machine_revoked`.
    pub error: ErrorCode,
    /// One human-readable sentence naming the problem.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code but `Unrecognized`, which the server never sends.
    const SENT: [ErrorCode; 32] = [
        ErrorCode::InvalidRequest,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::BodyTooLarge,
        ErrorCode::InternalError,
        ErrorCode::TokenUnknown,
        ErrorCode::TokenAlreadyUsed,
        ErrorCode::TokenExpired,
        ErrorCode::InvalidCsr,
        ErrorCode::ConcurrentEnrollment,
        ErrorCode::RecoveryRefused,
        ErrorCode::RateLimited,
        ErrorCode::MachineRevoked,
        ErrorCode::MachineAlreadyEnrolled,
        ErrorCode::CertificateRequired,
        ErrorCode::BadCertificateCn,
        ErrorCode::UnknownCertificate,
        ErrorCode::CertificateRevoked,
        ErrorCode::CertificateSuperseded,
        ErrorCode::CertificateExpired,
        ErrorCode::ServerBusy,
        ErrorCode::AgentIdMismatch,
        ErrorCode::StaleRequest,
        ErrorCode::BadSignature,
        ErrorCode::UnsupportedKey,
        ErrorCode::ReplayedRequest,
        ErrorCode::UnknownVersion,
        ErrorCode::VersionNotPending,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::WindowsStubMissing,
    ];

    #[test]
    fn wire_form_is_as_str_and_round_trips() {
        for code in SENT {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(code.to_string(), code.as_str());
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
        }
    }

    #[test]
    fn body_is_unchanged_on_the_wire() {
        let body = ApiError {
            error: ErrorCode::TokenAlreadyUsed,
            message: "install token has already been used".into(),
        };
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"error":"token_already_used","message":"install token has already been used"}"#
        );
    }

    #[cfg(feature = "openapi")]
    #[test]
    fn the_openapi_schema_lists_the_codes_as_sent() {
        let schema = serde_json::to_value(<ErrorCode as utoipa::PartialSchema>::schema()).unwrap();
        let listed: Vec<&str> = schema["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let sent: Vec<&str> = SENT.iter().map(|code| code.as_str()).collect();
        assert_eq!(listed, sent);
    }

    #[test]
    fn newer_codes_read_as_unrecognized() {
        let body: ApiError =
            serde_json::from_str(r#"{"error":"some_future_code","message":"x"}"#).unwrap();
        assert_eq!(body.error, ErrorCode::Unrecognized);
    }
}
