//! The management socket between `license-agent-cli` and the agent (seed §2.3 option A,
//! §3.3; DESIGN.md §3.3).
//!
//! Same framing as the validation socket ([`crate::ipc`]): 4-byte big-endian length, UTF-8
//! JSON. Roles come from the peer's uid (SO_PEERCRED): `[management] allowed_uids` may read
//! (`status`, `metrics`, `validate`), `admin_uids` may also act (`rotate`, `invalidate`,
//! `degraded`, `update`). When the agent has a `token_file`, every request must carry its content in
//! `token` (second factor). Every request is audited, refused ones too; an action whose audit
//! record cannot be written is refused.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::stable_codes;

/// Longest `message` of a `bad_request` answer, in bytes: serde's message quotes the request
/// (an unknown op or field by name), so it is cut here and an answer can never outgrow
/// [`crate::ipc::MAX_FRAME_LEN`] by quoting its request.
pub const MAX_BAD_REQUEST_MESSAGE_LEN: usize = 1024;

/// Parses one frame's payload into a request, or the `bad_request` answer to send instead
/// (its message at most [`MAX_BAD_REQUEST_MESSAGE_LEN`] bytes).
pub fn parse_request(payload: &[u8]) -> Result<MgmtRequest, MgmtResponse> {
    serde_json::from_slice::<MgmtRequest>(payload).map_err(|e| {
        let mut message = e.to_string();
        if message.len() > MAX_BAD_REQUEST_MESSAGE_LEN {
            let mut end = MAX_BAD_REQUEST_MESSAGE_LEN - "…".len();
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push('…');
        }
        MgmtResponse::err(MgmtErrorCode::BadRequest, message)
    })
}

/// A management request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum MgmtRequest {
    /// Read: the agent's state.
    Status {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// Read: the metrics file's content.
    Metrics {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// Read: validate a token as a POS application would (audited like one).
    Validate {
        license_token: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// Act: rotate now; answers once the round is over.
    Rotate {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// Act: invalidate a secret version on this machine (its tokens answer `secret_invalidated`).
    Invalidate {
        version: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// Act: `on` forces degraded mode (serve offline, do not contact the server); `off`
    /// forbids it (an overdue rotation with the server unreachable fails validations closed);
    /// `auto` returns to the configured behaviour.
    Degraded {
        mode: DegradedSwitch,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// Act: `hold` stops the agent from staging releases (and withdraws one staged but not
    /// yet taken by the update step); `release` lets it take them again.
    Update {
        action: UpdateSwitch,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateSwitch {
    Hold,
    Release,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DegradedSwitch {
    On,
    Off,
    Auto,
}

impl MgmtRequest {
    /// The op's name, as audited (`mgmt.<name>`).
    pub fn name(&self) -> &'static str {
        match self {
            MgmtRequest::Status { .. } => "status",
            MgmtRequest::Metrics { .. } => "metrics",
            MgmtRequest::Validate { .. } => "validate",
            MgmtRequest::Rotate { .. } => "rotate",
            MgmtRequest::Invalidate { .. } => "invalidate",
            MgmtRequest::Degraded { .. } => "degraded",
            MgmtRequest::Update { .. } => "update",
        }
    }

    /// Whether the op needs the admin role.
    pub fn is_admin(&self) -> bool {
        matches!(
            self,
            MgmtRequest::Rotate { .. }
                | MgmtRequest::Invalidate { .. }
                | MgmtRequest::Degraded { .. }
                | MgmtRequest::Update { .. }
        )
    }

    pub fn token(&self) -> Option<&str> {
        match self {
            MgmtRequest::Status { token }
            | MgmtRequest::Metrics { token }
            | MgmtRequest::Validate { token, .. }
            | MgmtRequest::Rotate { token }
            | MgmtRequest::Invalidate { token, .. }
            | MgmtRequest::Degraded { token, .. }
            | MgmtRequest::Update { token, .. } => token.as_deref(),
        }
    }
}

stable_codes! {
    /// Why the agent did not carry out a management request.
    pub enum MgmtErrorCode {
        /// This uid may not use the socket, may read but not act, or the token is missing or wrong.
        NotAuthorized => "not_authorized",
        /// The request is not JSON, has an unknown op or a bad field.
        BadRequest => "bad_request",
        /// Not allowed in this configuration (e.g. degraded mode forbidden by config).
        Refused => "refused",
        /// The request could not be audited, so it was not carried out.
        AuditUnavailable => "audit_unavailable",
        /// Carried out and failed (e.g. the server could not be reached for a rotation).
        Failed => "failed",
    }
}

/// The answer: `{"ok": true, "result": {...}}` or `{"ok": false, "error": "<code>", "message": "..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MgmtResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Why it failed, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<MgmtErrorCode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl MgmtResponse {
    pub fn ok(result: serde_json::Value) -> Self {
        Self {
            ok: true,
            result: Some(result),
            error: None,
            message: None,
        }
    }

    pub fn err(code: MgmtErrorCode, message: impl Into<String>) -> Self {
        Self {
            ok: false,
            result: None,
            error: Some(code),
            message: Some(message.into()),
        }
    }
}

/// One secret version in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretView {
    pub version: u64,
    /// `active` or `grace`.
    pub state: String,
    pub valid_from: String,
    pub valid_until: String,
    pub grace_until: String,
}

/// `status` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    pub machine_id: String,
    pub client_id: String,
    pub secrets: Vec<SecretView>,
    pub invalidated_versions: Vec<u64>,
    /// `tpm` or `file`.
    pub store: String,
    pub tpm_enabled: bool,
    pub tpm_available: bool,
    pub licenses: usize,
    pub revoked_licenses: usize,
    /// `active` or `inactive`; `forced` when switched on by an administrator.
    pub degraded_mode: String,
    /// `allow` or `deny`, after any administrator override.
    pub degraded_policy: String,
    pub degraded_since: Option<String>,
    pub last_server_contact: Option<String>,
    pub last_rotation: Option<String>,
    pub next_rotation: Option<String>,
    pub consecutive_failures: u32,
    /// How far the system clock is behind the highest time seen (0 normally).
    pub clock_rollback_secs: i64,
    /// The machine certificate (absent from agents older than automatic renewal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateView>,
    /// What the agent trusts of the server (absent from agents older than key rollovers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<TrustView>,
    /// Since when the server refuses this machine as revoked (RFC 3339); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_revoked_since: Option<String>,
    /// The agent's version, `MAJOR.MINOR.PATCH` (absent from agents older than updates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Updates of the agent (absent from agents older than updates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateView>,
    pub extra: BTreeMap<String, String>,
}

/// Updates of the agent, in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateView {
    /// `[update] enabled`.
    pub enabled: bool,
    pub channel: String,
    /// Held by an administrator (`license-agent-cli update hold`): no release is staged.
    pub held: bool,
    /// The version the server offered at the last round, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offered: Option<String>,
    /// The version checked and staged for the update step, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<String>,
    /// How the last update ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<LastUpdateView>,
}

/// The last update's outcome, in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastUpdateView {
    pub version: String,
    pub from_version: String,
    /// `success`, `failed` or `refused`.
    pub outcome: String,
    /// A reason code, empty on success.
    pub reason: String,
    /// RFC 3339.
    pub at: String,
}

/// The server keys and CAs the agent trusts, in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustView {
    /// License signing keys by id (16 hex digits): `trusted` or `retired`.
    pub license_keys: BTreeMap<String, String>,
    /// Pins (`sha256:<base64>`) the server's TLS key may match: the current key, and the next
    /// one while a switch is announced.
    pub server_pins: Vec<String>,
    /// Pins switched away from, refused.
    pub retired_server_pins: Vec<String>,
    /// CA certificates the server's chain may lead to.
    pub cas: Vec<CaView>,
}

/// One trusted CA in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaView {
    pub subject: String,
    /// RFC 3339.
    pub expires_at: String,
}

/// The machine certificate in `status`: times in RFC 3339.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateView {
    pub serial: String,
    pub expires_at: String,
    /// When the agent renews it (at 2/3 of its life); in the past while a renewal is due.
    pub renews_at: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_round_trip() {
        let request = parse_request(br#"{"op":"invalidate","version":3}"#).unwrap();
        assert_eq!(
            request,
            MgmtRequest::Invalidate {
                version: 3,
                token: None
            }
        );
        let json = serde_json::to_vec(&request).unwrap();
        assert_eq!(parse_request(&json).unwrap(), request);
        let refused = parse_request(br#"{"op":"format_disk"}"#).unwrap_err();
        assert_eq!(refused.error, Some(MgmtErrorCode::BadRequest));
    }

    #[test]
    fn a_bad_request_never_outgrows_a_frame_by_quoting_the_request() {
        // serde quotes an unknown op: one of 60 000 characters (é, 2 bytes each, so the cut
        // falls inside a character) must not come back whole.
        let payload = format!(r#"{{"op":"{}"}}"#, "é".repeat(30_000));
        assert!(payload.len() <= crate::ipc::MAX_FRAME_LEN);
        let answer = parse_request(payload.as_bytes()).unwrap_err();
        let message = answer.message.as_deref().unwrap();
        assert!(
            message.len() <= MAX_BAD_REQUEST_MESSAGE_LEN,
            "{}",
            message.len()
        );
        assert!(message.starts_with("unknown variant"), "{message}");
        assert!(serde_json::to_vec(&answer).unwrap().len() < 2 * MAX_BAD_REQUEST_MESSAGE_LEN);
    }
}
