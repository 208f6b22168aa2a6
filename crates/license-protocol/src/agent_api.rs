//! Messages of the agent API (TLS 1.3, client certificate required; DESIGN.md §3.1).

use serde::{Deserialize, Serialize};

use crate::ipc::Reason;

use crate::identity::{ClientId, MachineId};

/// `GET /api/v1/secret-status`: what the server knows of the calling machine's secrets.
/// The agent polls it to learn of forced rotations and invalidated versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SecretStatus {
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Uuid))]
    pub client_id: ClientId,
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Uuid))]
    pub machine_id: MachineId,
    /// The newest acknowledged secret version, `None` until the machine's first rotation.
    pub current_version: Option<u64>,
    /// State of `current_version`: `none`, `active`, `grace` or `invalidated`.
    pub state: String,
    /// Unix seconds; dates of `current_version`.
    #[serde(default)]
    pub valid_until: Option<i64>,
    #[serde(default)]
    pub grace_until: Option<i64>,
    /// A version issued but not yet acknowledged.
    #[serde(default)]
    pub pending_version: Option<u64>,
    /// An administrator asked for a rotation now.
    #[serde(default)]
    pub rotation_requested: bool,
    /// Versions an administrator (or the server) invalidated; the agent drops them.
    #[serde(default)]
    pub invalidated_versions: Vec<u64>,
    /// RFC 3339 expiry of the certificate the request was made with.
    pub certificate_expires_at: String,
    /// The server's clock (Unix seconds) when it answered, authenticated by the pinned TLS
    /// channel: the agent's floor on "now", and the only time it destroys secrets by.
    #[serde(default)]
    pub server_time: Option<i64>,
    /// Digest of the server's license key set ([`LicenseKeySet::digest`](crate::license_keys::LicenseKeySet::digest)):
    /// an agent holding another fetches `GET /api/v1/license-keys`. `None` from older servers.
    #[serde(default)]
    pub license_keys: Option<String>,
    /// Digest of the server's TLS keys and CAs ([`ServerTrust::digest`](crate::server_trust::ServerTrust::digest)):
    /// an agent holding another fetches `GET /api/v1/server-trust`. `None` from older servers.
    #[serde(default)]
    pub server_trust: Option<String>,
    /// A release offered to this machine (asked for with [`StatusQuery`]), absent when none is:
    /// the agent checks it and downloads `GET /api/v1/releases/{release_id}/binary`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<crate::release::UpdateOffer>,
    /// The change feed's position before this status was read (see [`watch`](crate::watch)):
    /// the `since` of the agent's next watch stream. `None` from older servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch_cursor: Option<i64>,
}

/// Query of `GET /api/v1/secret-status`: what the agent runs, so the server can offer it a
/// release. All three or none (older agents send none and are offered nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct StatusQuery {
    /// The agent's version, `MAJOR.MINOR.PATCH`.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", param(value_type = Option<String>, example = "0.1.0"))]
    pub agent_version: Option<crate::release::Version>,
    /// The release channel it follows (`[update] channel`).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", param(value_type = Option<String>, example = "stable"))]
    pub channel: Option<crate::release::Channel>,
    /// Its architecture as Rust names it (`x86_64`, `aarch64`).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", param(max_length = 32, example = "x86_64"))]
    pub arch: Option<String>,
}

/// `GET /api/v1/licenses`: the calling machine's license tokens under its newest acknowledged
/// secret version (re-issued after every rotation), and the ids of its revoked licenses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MachineLicenses {
    /// Version the tokens are encrypted under; `None` before the first rotation (no tokens).
    pub secret_version: Option<u64>,
    pub tokens: Vec<LicenseToken>,
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>))]
    pub revoked: Vec<uuid::Uuid>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LicenseToken {
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Uuid))]
    pub license_id: uuid::Uuid,
    pub secret_version: u64,
    /// The token, base64 (format in PROTOCOL.md).
    pub token: String,
    /// Unix seconds, `None` for a license that does not expire.
    pub expires_at: Option<i64>,
}

/// `POST /api/v1/validate-license`: online validation of a token by the server (seed §2.4).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct ValidateLicenseRequest {
    pub license_token: String,
}

/// The server's verdict; `reason` uses the IPC reason codes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ValidateLicenseResponse {
    pub valid: bool,
    /// The reason code when `valid` is false (the same codes as the agent's validation socket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub reason: Option<Reason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = Uuid))]
    pub license_id: Option<uuid::Uuid>,
    #[serde(default)]
    pub features: Vec<String>,
    /// Unix seconds.
    #[serde(default)]
    pub expires_at: Option<i64>,
}

/// `POST /api/v1/renew-certificate` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct RenewCertificateRequest {
    /// PEM CSR; may be for the same key or a new one.
    #[cfg_attr(feature = "openapi", schema(max_length = 16384))]
    pub csr: String,
}

/// `POST /api/v1/renew-certificate` response. The certificate the request was made with is
/// superseded as soon as this is answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RenewCertificateResponse {
    pub certificate: String,
    pub serial: String,
    pub expires_at: String,
}

/// `POST /api/v1/health`: what an operator needs to know of the machine, sent by the agent
/// after a round with the server when it changed, and at least once a day. Unknown fields are
/// ignored, so a newer agent can report more to an older server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(remote = "Self")]
pub struct HealthReport {
    /// The agent's version (`CARGO_PKG_VERSION`).
    #[cfg_attr(
        feature = "openapi",
        schema(max_length = 64, pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$")
    )]
    pub agent_version: String,
    /// The secret store in use: `tpm` or `file`.
    #[cfg_attr(
        feature = "openapi",
        schema(max_length = 64, pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$")
    )]
    pub store: String,
    /// The configuration asks for the TPM.
    pub tpm_enabled: bool,
    /// The TPM holds the secrets (false with `tpm_enabled`: the fallback is in use).
    pub tpm_available: bool,
    /// Degraded mode: `inactive`, `active` (the server was unreachable with a rotation due) or
    /// `forced` (by an administrator on the till).
    #[cfg_attr(
        feature = "openapi",
        schema(max_length = 64, pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$")
    )]
    pub degraded_mode: String,
    /// Unix seconds; when degraded mode began.
    #[serde(default, deserialize_with = "crate::whole::option_i64")]
    pub degraded_since: Option<i64>,
    /// Unix seconds; the last successful rotation.
    #[serde(default, deserialize_with = "crate::whole::option_i64")]
    pub last_rotation: Option<i64>,
    /// Rotation rounds failed since the last success.
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 2147483647))]
    #[serde(deserialize_with = "crate::whole::u32")]
    pub rotation_failures: u32,
    /// Seconds the system clock was found behind the latest time the machine had seen, at the
    /// agent's last start (`None`: no rollback).
    #[serde(default, deserialize_with = "crate::whole::option_i64")]
    pub clock_rollback_secs: Option<i64>,
    /// The audit log matched the anchor saved by the previous run at the agent's last start.
    pub audit_chain_ok: bool,
    /// Unix seconds; when the machine certificate in use expires.
    #[serde(deserialize_with = "crate::whole::i64")]
    pub certificate_expires_at: i64,
    /// The newest secret version held.
    #[serde(default, deserialize_with = "crate::whole::option_u64")]
    pub secret_version: Option<u64>,
}

impl HealthReport {
    /// Longest accepted text field, in characters (versions and names are short).
    pub const MAX_FIELD_CHARS: usize = 64;

    /// Whether every text field is short and printable and the counts fit the document's integer
    /// types (the server refuses the report otherwise).
    pub fn is_well_formed(&self) -> bool {
        // Versions fit the database's signed 64-bit integers (and the document's int64).
        let version_fits = self.secret_version.is_none_or(|v| i64::try_from(v).is_ok());
        version_fits
            && i32::try_from(self.rotation_failures).is_ok()
            && [&self.agent_version, &self.store, &self.degraded_mode]
                .iter()
                .all(|s| {
                    s.chars().count() <= Self::MAX_FIELD_CHARS && !s.chars().any(char::is_control)
                })
    }
}

crate::object::objects_only!(
    HealthReport,
    ValidateLicenseRequest,
    RenewCertificateRequest
);
