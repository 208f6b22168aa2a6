//! What the engine shows of itself: the management `status` view, systemd's one-line
//! `STATUS=`, and the metrics file (seed §7.1, plus the certificate's remaining life).

use std::sync::atomic::Ordering::Relaxed;

use license_protocol::mgmt::{CaView, CertificateView, SecretView, StatusView, TrustView};

use super::decide::{renewal_at, Link, Override, Phase};
use super::server::AgentServer;
use super::Engine;
use crate::config::DegradedPolicy;
use crate::metrics::Snapshot;
use crate::platform::blocking;
use crate::platform::clock::rfc3339;

impl<S: AgentServer> Engine<S> {
    /// One line for systemd's STATUS=.
    pub fn status_line(&self) -> String {
        let newest = self.validator.keyring().newest().map_or_else(
            || "no secret yet".to_string(),
            |(v, _)| format!("secret v{v}"),
        );
        let degraded = match (self.health.overridden, self.health.link) {
            (Override::ForcedOn, _) => "degraded (forced)",
            (_, Link::Degraded { .. }) => "degraded",
            (_, Link::Online) => "online",
        };
        format!(
            "serving; {newest}; store {}; {degraded}",
            self.vault.store.kind()
        )
    }

    /// The management `status` answer.
    pub fn status_view(&self) -> StatusView {
        let now = self.validator.clock.now();
        let keyring = self.validator.keyring();
        let newest = keyring.newest().map(|(v, _)| v);
        let state = &self.vault.state;
        let cert = &self.machine.certificate;
        let secrets = keyring
            .versions()
            .map(|(version, d)| SecretView {
                version,
                state: match Phase::of(version, &d, newest, false, now) {
                    Phase::Active => "active",
                    Phase::Grace | Phase::Gone => "grace",
                }
                .into(),
                valid_from: rfc3339(d.valid_from),
                valid_until: rfc3339(d.valid_until),
                grace_until: rfc3339(d.grace_until),
            })
            .collect();
        let degraded_mode = if self.health.overridden == Override::ForcedOn {
            "forced"
        } else if self.validator.is_degraded() {
            "active"
        } else {
            "inactive"
        };
        StatusView {
            machine_id: self.machine.id.to_string(),
            client_id: self.machine.client_id.to_string(),
            secrets,
            invalidated_versions: state.invalidated_versions.iter().copied().collect(),
            store: self.vault.store.kind().to_string(),
            tpm_enabled: self.tpm.is_some(),
            tpm_available: self.vault.store.kind() == "tpm",
            licenses: state.licenses.len(),
            revoked_licenses: state.revoked_licenses.len(),
            degraded_mode: degraded_mode.into(),
            degraded_policy: match self.validator.degraded_policy() {
                DegradedPolicy::Allow => "allow".into(),
                DegradedPolicy::Deny => "deny".into(),
            },
            degraded_since: self.health.link.degraded_since().map(rfc3339),
            last_server_contact: state.last_server_contact.map(rfc3339),
            last_rotation: state.last_rotation.map(rfc3339),
            next_rotation: state.next_rotation_due.map(rfc3339),
            consecutive_failures: state.consecutive_failures,
            clock_rollback_secs: self.validator.clock.rollback_secs(),
            certificate: Some(CertificateView {
                serial: cert.serial.clone(),
                expires_at: rfc3339(cert.not_after),
                renews_at: rfc3339(renewal_at(
                    cert.not_before,
                    cert.not_after,
                    &self.machine.id,
                )),
            }),
            trust: Some(self.trust_view()),
            machine_revoked_since: state.machine_revoked_since.map(rfc3339),
            agent_version: Some(crate::update::running_version().to_string()),
            update: Some(self.update_view()),
            extra: Default::default(),
        }
    }

    /// The license keys, server pins and CAs trusted.
    fn trust_view(&self) -> TrustView {
        let trust = &self.machine.server_trust;
        let cas = trust
            .ca_ders()
            .iter()
            .filter_map(|der| {
                let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
                Some(CaView {
                    subject: cert.subject().to_string(),
                    expires_at: rfc3339(cert.validity().not_after.timestamp()),
                })
            })
            .collect();
        TrustView {
            license_keys: self
                .machine
                .license_keys
                .states()
                .map(|(id, retired)| {
                    let state = if retired { "retired" } else { "trusted" };
                    (id.to_string(), state.to_string())
                })
                .collect(),
            server_pins: trust.pins().iter().map(ToString::to_string).collect(),
            retired_server_pins: trust
                .retired_pins()
                .iter()
                .map(ToString::to_string)
                .collect(),
            cas,
        }
    }

    /// Everything exported, now.
    fn metrics(&self) -> Snapshot {
        let now = self.validator.clock.now();
        let keyring = self.validator.keyring();
        let newest = keyring.newest().map(|(v, _)| v);
        let invalidated = &self.vault.state.invalidated_versions;
        let (mut active, mut grace) = (0, 0);
        for (version, d) in keyring.versions() {
            match Phase::of(version, &d, newest, invalidated.contains(&version), now) {
                Phase::Active => active += 1,
                Phase::Grace => grace += 1,
                Phase::Gone => {}
            }
        }
        let counters = &self.validator.counters;
        Snapshot {
            secrets_active: active,
            secrets_grace: grace,
            rotations_total: self.health.rotations_total,
            rotations_failed: self.health.rotations_failed,
            validations_total: counters.validations_total.load(Relaxed),
            validations_failed: counters.validations_failed.load(Relaxed),
            degraded_mode: self.validator.is_degraded(),
            tpm_available: self.vault.state.tpm_available,
            last_rotation: self.vault.state.last_rotation.unwrap_or(0),
            certificate_expiry_seconds: self.machine.certificate.not_after - now,
            machine_revoked: self.vault.state.machine_revoked_since.is_some(),
            update_held: self.vault.state.update.held,
            update_staged: self.vault.state.update.staged.is_some(),
            updates_succeeded: self.vault.state.update.succeeded,
            updates_failed: self.vault.state.update.failed,
        }
    }

    /// Rewrites the metrics file (atomically, off the async workers).
    pub(super) async fn write_metrics(&self) {
        let (snapshot, path) = (self.metrics(), self.settings.metrics_file.clone());
        if let Err(e) = blocking::run(move || snapshot.write(&path)).await {
            tracing::warn!(error = %e, path = %self.settings.metrics_file.display(), "cannot write the metrics file");
        }
    }
}
