//! `metrics.prom` (seed §7.1): the agent's metrics in node_exporter textfile format, with the
//! seed's names exactly (and the certificate's remaining life beside them), HELP and TYPE
//! lines, rewritten atomically after every round so a scraper never reads half a file.

use std::fmt::Write as _;
use std::path::Path;

use crate::platform::files::{write_atomic, PUBLIC};

/// One snapshot of everything exported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub secrets_active: u64,
    pub secrets_grace: u64,
    pub rotations_total: u64,
    pub rotations_failed: u64,
    pub validations_total: u64,
    pub validations_failed: u64,
    pub degraded_mode: bool,
    pub tpm_available: bool,
    /// Unix seconds of the last successful rotation (0: none yet).
    pub last_rotation: i64,
    /// Seconds until the machine certificate expires (negative once it has).
    pub certificate_expiry_seconds: i64,
    /// The server refuses this machine as revoked.
    pub machine_revoked: bool,
    /// Updates held by an administrator.
    pub update_held: bool,
    /// A checked release waits for the update step.
    pub update_staged: bool,
    /// Updates completed on this machine, and updates failed or refused.
    pub updates_succeeded: u64,
    pub updates_failed: u64,
}

impl Snapshot {
    pub fn render(&self) -> String {
        let metrics: [(&str, &str, &str, i64); 15] = [
            (
                "license_agent_secrets_active",
                "gauge",
                "Secrets in the ACTIVE state.",
                self.secrets_active as i64,
            ),
            (
                "license_agent_secrets_grace",
                "gauge",
                "Secrets in the GRACE state.",
                self.secrets_grace as i64,
            ),
            (
                "license_agent_rotations_total",
                "counter",
                "Secret rotations completed.",
                self.rotations_total as i64,
            ),
            (
                "license_agent_rotations_failed",
                // A count since start; `untyped` because the seed fixes the name and a
                // counter's name must end in `_total` (promtool).
                "untyped",
                "Secret rotation rounds that failed since the agent started.",
                self.rotations_failed as i64,
            ),
            (
                "license_agent_validations_total",
                "counter",
                "License validations answered.",
                self.validations_total as i64,
            ),
            (
                "license_agent_validations_failed",
                // A count since start; `untyped` because the seed fixes the name and a
                // counter's name must end in `_total` (promtool).
                "untyped",
                "License validations answered invalid since the agent started.",
                self.validations_failed as i64,
            ),
            (
                "license_agent_degraded_mode",
                "gauge",
                "1 while in degraded mode (server unreachable, rotation overdue).",
                i64::from(self.degraded_mode),
            ),
            (
                "license_agent_tpm_available",
                "gauge",
                "1 when secrets are kept by the TPM, 0 on the file fallback.",
                i64::from(self.tpm_available),
            ),
            (
                "license_agent_last_rotation",
                "gauge",
                "Unix time of the last successful rotation.",
                self.last_rotation,
            ),
            (
                "license_agent_certificate_expiry_seconds",
                "gauge",
                "Seconds until the machine certificate expires (renewed at 2/3 of its life).",
                self.certificate_expiry_seconds,
            ),
            (
                "license_agent_machine_revoked",
                "gauge",
                "1 while the server refuses this machine as revoked.",
                i64::from(self.machine_revoked),
            ),
            (
                "license_agent_update_held",
                "gauge",
                "1 while updates are held by an administrator.",
                i64::from(self.update_held),
            ),
            (
                "license_agent_update_staged",
                "gauge",
                "1 while a checked release waits for the update step.",
                i64::from(self.update_staged),
            ),
            (
                "license_agent_updates_total",
                "counter",
                "Updates to a new version completed on this machine.",
                self.updates_succeeded as i64,
            ),
            (
                "license_agent_updates_failed_total",
                "counter",
                "Updates refused (signature, digest, architecture, downgrade) or rolled back.",
                self.updates_failed as i64,
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in metrics {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        out
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        write_atomic(path, self.render().as_bytes(), PUBLIC)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_seed_metric_with_help_and_type() {
        let text = Snapshot {
            secrets_active: 1,
            tpm_available: true,
            last_rotation: 42,
            ..Default::default()
        }
        .render();
        for name in [
            "license_agent_secrets_active",
            "license_agent_secrets_grace",
            "license_agent_rotations_total",
            "license_agent_rotations_failed",
            "license_agent_validations_total",
            "license_agent_validations_failed",
            "license_agent_degraded_mode",
            "license_agent_tpm_available",
            "license_agent_last_rotation",
            "license_agent_certificate_expiry_seconds",
            "license_agent_machine_revoked",
            "license_agent_update_held",
            "license_agent_update_staged",
            "license_agent_updates_total",
            "license_agent_updates_failed_total",
        ] {
            assert!(
                text.contains(&format!("# HELP {name} "))
                    && text.contains(&format!("# TYPE {name} ")),
                "{name}"
            );
        }
        assert!(text.contains("license_agent_secrets_active 1\n"));
        assert!(text.contains("license_agent_tpm_available 1\n"));
        assert!(text.contains("license_agent_last_rotation 42\n"));
        assert_eq!(text.lines().count(), 45);
    }
}
