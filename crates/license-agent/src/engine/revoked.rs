//! A machine the server revoked (issue "hold against a hostile network", finding 10).
//!
//! When the agent API refuses the machine as revoked (403 `machine_revoked`, or
//! `certificate_revoked` for the certificate it presents), that is not a transient failure: the
//! agent records since when (`state.json`, kept across restarts), raises the `machine_revoked`
//! alert once, shows it in `status` and the metrics, and — with `on_machine_revoked = "deny"`,
//! the default — answers every validation `machine_revoked` until the server answers it again
//! (an administrator restored it). With `"grace"` validations go on under the secrets held
//! until their grace ends, as for an unreachable server. Rounds keep polling, so a restore is
//! noticed at the next one.

use license_audit::Outcome;
use license_protocol::error::ErrorCode;

use super::round::RotationError;
use super::server::AgentServer;
use super::Engine;
use crate::alerts::AlertKind;
use crate::audit::agent_event;
use crate::config::RevokedPolicy;
use crate::net::client::ClientError;
use crate::platform::clock::rfc3339;

/// The revocation a failed round reports, if that is what it was.
pub fn revocation(e: &RotationError) -> Option<ErrorCode> {
    match e {
        RotationError::Server(ClientError::Refused {
            status: 403,
            code: Some(code @ (ErrorCode::MachineRevoked | ErrorCode::CertificateRevoked)),
            ..
        }) => Some(*code),
        _ => None,
    }
}

impl<S: AgentServer> Engine<S> {
    /// Fails validations closed while revoked, when the policy says so.
    pub(super) fn apply_revoked_policy(&self) {
        let revoked = self.vault.state.machine_revoked_since.is_some();
        self.validator
            .set_machine_revoked(revoked && self.settings.revoked_policy == RevokedPolicy::Deny);
    }

    /// The server refused the machine as revoked (`code`) at `now`.
    pub(super) async fn machine_revoked(&mut self, code: ErrorCode, now: i64) {
        if self.vault.state.machine_revoked_since.is_some() {
            return;
        }
        self.vault.state.machine_revoked_since = Some(now);
        self.apply_revoked_policy();
        let policy = match self.settings.revoked_policy {
            RevokedPolicy::Deny => "deny",
            RevokedPolicy::Grace => "grace",
        };
        tracing::error!(
            code = code.as_str(),
            policy,
            "the server revoked this machine"
        );
        self.audit()
            .note(
                agent_event("machine.revoked", Outcome::Error)
                    .detail("code", code.as_str())
                    .detail("policy", policy),
            )
            .await;
        let message = match self.settings.revoked_policy {
            RevokedPolicy::Deny => "the server revoked this machine: validations are refused",
            RevokedPolicy::Grace => {
                "the server revoked this machine: validations go on until the secrets' grace ends"
            }
        };
        self.alerts
            .raise(
                AlertKind::MachineRevoked,
                message,
                serde_json::json!({"code": code.as_str(), "since": rfc3339(now), "policy": policy}),
            )
            .await;
        self.persist().await;
    }

    /// The server answered again: the machine is no longer revoked.
    pub(super) async fn machine_restored(&mut self) {
        let Some(since) = self.vault.state.machine_revoked_since.take() else {
            return;
        };
        self.apply_revoked_policy();
        tracing::warn!(since = %rfc3339(since), "the server answers this machine again: revocation lifted");
        self.audit()
            .note(
                agent_event("machine.restored", Outcome::Success)
                    .detail("revoked_since", rfc3339(since)),
            )
            .await;
    }
}
