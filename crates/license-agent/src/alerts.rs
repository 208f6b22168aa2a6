//! Alerts (seed §7.2): rotation failed 3 times in a row, degraded mode for more than 24 h,
//! TPM unavailable (or cleared), secret expired without replacement, machine certificate
//! expired and not renewed, unauthorized access attempt.
//!
//! Each alert is, at once: an audit entry `alert.<kind>`; an error-priority log record with a
//! structured `alert` field (journald fields `ALERT`, `PRIORITY=3` when the agent runs under
//! systemd's journal, the `alert=<kind>` stderr form otherwise); and, when configured, a JSON
//! POST to a webhook. Webhook deliveries go through a bounded queue to one background worker
//! with bounded retries: raising an alert never waits on the network, and a full queue drops
//! the delivery (the audit entry and log record remain).

use std::time::Duration;

use license_audit::{Event, Outcome};
use license_webhook::{Webhook, WebhookSettings};

use crate::audit::Audit;
use crate::platform::clock::{rfc3339, system_now};

/// Deliveries waiting for the webhook, at most.
const QUEUE: usize = 64;
/// Time allowed for one webhook attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertKind {
    RotationFailed,
    DegradedTooLong,
    TpmUnavailable,
    TpmCleared,
    SecretExpired,
    CertificateExpired,
    UnauthorizedAccess,
    /// The server announced a license key set this agent refused (the old trust is kept).
    LicenseKeysRefused,
    /// The server announced TLS keys or CAs this agent refused (the old trust is kept).
    ServerTrustRefused,
    /// The server refuses this machine (or its certificate) as revoked.
    MachineRevoked,
    /// At start, the audit log no longer matches the anchor the agent saved (entries removed
    /// from its end, replaced, or its files deleted).
    AuditLogTampered,
    /// Half the audit log's kept files rotated away within a day: someone is flushing its
    /// history.
    AuditLogFlooded,
    /// A release the server offered was refused (signature, digest, size, architecture,
    /// downgrade), or an update failed its health check and was rolled back.
    UpdateFailed,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::RotationFailed => "rotation_failed",
            AlertKind::DegradedTooLong => "degraded_too_long",
            AlertKind::TpmUnavailable => "tpm_unavailable",
            AlertKind::TpmCleared => "tpm_cleared",
            AlertKind::SecretExpired => "secret_expired",
            AlertKind::CertificateExpired => "certificate_expired",
            AlertKind::UnauthorizedAccess => "unauthorized_access",
            AlertKind::LicenseKeysRefused => "license_keys_refused",
            AlertKind::ServerTrustRefused => "server_trust_refused",
            AlertKind::MachineRevoked => "machine_revoked",
            AlertKind::UpdateFailed => "update_failed",
            AlertKind::AuditLogTampered => "audit_log_tampered",
            AlertKind::AuditLogFlooded => "audit_log_flooded",
        }
    }
}

/// Raises alerts; cheap to clone.
#[derive(Debug, Clone)]
pub struct Alerts {
    audit: Audit,
    machine_id: String,
    webhook: Option<Webhook>,
}

impl Alerts {
    /// Starts the webhook worker (inside a Tokio runtime) when a URL is given.
    pub fn new(
        audit: Audit,
        machine_id: String,
        webhook_url: Option<String>,
        retries: u32,
    ) -> Self {
        let webhook = webhook_url.map(|url| {
            let settings = WebhookSettings {
                url,
                retries,
                attempt_timeout: ATTEMPT_TIMEOUT,
                queue: QUEUE,
            };
            Webhook::start(settings, crate::net::tls::provider())
        });
        Self {
            audit,
            machine_id,
            webhook,
        }
    }

    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    /// Raises one alert; returns once its audit record is written (never waits on the webhook).
    pub async fn raise(&self, kind: AlertKind, message: &str, details: serde_json::Value) {
        tracing::error!(alert = kind.as_str(), details = %details, "ALERT: {message}");
        crate::platform::host::alert(kind.as_str(), message);
        let mut event = Event::new(format!("alert.{}", kind.as_str()), Outcome::Error)
            .detail("message", message);
        if let serde_json::Value::Object(map) = &details {
            for (k, v) in map {
                event = event.detail(k.clone(), v.clone());
            }
        }
        self.audit.note(event).await;
        if let Some(webhook) = &self.webhook {
            let payload = serde_json::json!({
                "alert": kind.as_str(),
                "message": message,
                "machine_id": self.machine_id,
                "time": rfc3339(system_now()),
                "details": details,
            });
            if !webhook.send(payload) {
                tracing::warn!(
                    alert = kind.as_str(),
                    "webhook queue full or closed; alert not forwarded"
                );
            }
        }
    }
}
