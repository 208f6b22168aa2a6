//! The rotation manager (seed §2.1 "Rotation Manager", DESIGN.md §4).
//!
//! Every tick it talks to the server: secret status (forced rotations, invalidated
//! versions), rotation when due, license tokens and revocations. A rotation is:
//!
//! 1. ask (`rotate-secret`, signed by the machine key), check the server's signature against
//!    the pinned license key and decrypt with the machine key — a bad signature or a server
//!    failing the pin is refused and the old secrets kept;
//! 2. store the new set durably (atomic replace) — from here the new secret serves;
//! 3. acknowledge; 4. fetch the tokens re-issued under the new version.
//!
//! A crash between any two steps leaves the old or the new set on disk, and the server's
//! idempotent answers (same pending version until acknowledged; acknowledged implicitly by
//! the next request naming it) make the agent converge. Failures back off exponentially;
//! an overdue rotation with the server unreachable is degraded mode: ACTIVE and GRACE secrets
//! keep serving until their grace ends (or validations fail closed if the config forbids it),
//! and the agent heals by itself when the server answers again.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use license_protocol::identity::MachineId;
use license_protocol::rotation::RotateSecretRequest;
use license_protocol::secret;
use rand::Rng as _;
use sha2::{Digest as _, Sha256};

use crate::alerts::{AlertKind, Alerts};
use crate::audit::{agent_event, Audit};
use crate::config::DegradedPolicy;
use crate::keys::{Ecdh, MachineKey};
use crate::net::client::{ClientError, ServerClient};
use crate::secrets::{SecretStore, StoreError, StoredSecret};
use crate::state::{AgentState, SecretMeta, StateFile};
use crate::validator::{Keyring, Validator};
use license_audit::Outcome;

/// Failures in a row after which an alert is raised (seed §7.2).
pub const ALERT_AFTER_FAILURES: u32 = 3;
/// Degraded mode lasting this long raises an alert (seed §7.2).
pub const DEGRADED_ALERT_SECS: i64 = 24 * 3600;
/// Longest wait between attempts after failures.
pub const MAX_BACKOFF_SECS: u64 = 300;

/// Test hook: `LICENSE_AGENT_TEST_CRASH_AT=after_receive|after_store|after_ack` aborts the
/// process at that step of a rotation, as `kill -9` would, so tests can prove recovery.
const CRASH_ENV: &str = "LICENSE_AGENT_TEST_CRASH_AT";

fn crash_point(step: &str) {
    if std::env::var(CRASH_ENV).is_ok_and(|v| v == step) {
        eprintln!("license-agent: test crash at {step}");
        std::process::abort();
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RotationError {
    #[error(transparent)]
    Server(#[from] ClientError),
    #[error("rotation answer refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RotationError {
    /// Whether this failure means "the server could not be reached" (degraded mode) rather
    /// than "the server answered something wrong".
    fn unreachable(&self) -> bool {
        matches!(self, RotationError::Server(ClientError::Transport(_)))
    }
}

/// Settings of the manager, from the config.
#[derive(Debug, Clone)]
pub struct RotationSettings {
    pub rotation_interval: u64,
    /// The configured degraded-mode policy (`degraded auto` returns to it).
    pub degraded_policy: crate::config::DegradedPolicy,
    pub client_id: license_protocol::identity::ClientId,
    pub metrics_file: PathBuf,
    pub poll_interval: u64,
    pub tokens_dir: PathBuf,
}

/// Owns the store, the state file and the server connection.
pub struct RotationManager {
    pub machine_id: MachineId,
    pub machine_key: Arc<dyn MachineKey>,
    pub license_key: ed25519_dalek::VerifyingKey,
    pub client: ServerClient,
    pub store: Box<dyn SecretStore>,
    pub state_file: StateFile,
    pub state: AgentState,
    pub validator: Arc<Validator>,
    pub settings: RotationSettings,
    /// The TPM, whose clock backs the rollback guard.
    tpm: Option<Arc<crate::tpm::Tpm>>,
    audit: Audit,
    alerts: Alerts,
    /// The version last reported expired without a replacement (alert once per version).
    expired_alerted: Option<u64>,
    /// Degraded mode switched on by an administrator: serve offline, do not contact the server.
    forced_degraded: bool,
    degraded_alerted: bool,
    rotations_total: u64,
    rotations_failed: u64,
}

impl std::fmt::Debug for RotationManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RotationManager")
            .field("machine_id", &self.machine_id)
            .finish_non_exhaustive()
    }
}

/// The keyring as the set a store saves.
fn stored(keyring: &Keyring) -> Vec<StoredSecret> {
    keyring
        .entries()
        .map(|(version, dates, secret)| StoredSecret {
            version,
            dates: *dates,
            secret: secret.clone(),
        })
        .collect()
}

fn metas(keyring: &Keyring) -> Vec<SecretMeta> {
    keyring
        .versions()
        .map(|(version, d)| SecretMeta {
            version,
            valid_from: d.valid_from,
            valid_until: d.valid_until,
            grace_until: d.grace_until,
        })
        .collect()
}

impl RotationManager {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        machine_id: MachineId,
        machine_key: Arc<dyn MachineKey>,
        license_key: ed25519_dalek::VerifyingKey,
        client: ServerClient,
        store: Box<dyn SecretStore>,
        state_file: StateFile,
        state: AgentState,
        validator: Arc<Validator>,
        settings: RotationSettings,
        tpm: Option<Arc<crate::tpm::Tpm>>,
        alerts: Alerts,
    ) -> Self {
        Self {
            machine_id,
            machine_key,
            license_key,
            client,
            store,
            state_file,
            state,
            validator,
            settings,
            tpm,
            audit: alerts.audit().clone(),
            alerts,
            expired_alerted: None,
            forced_degraded: false,
            degraded_alerted: false,
            rotations_total: 0,
            rotations_failed: 0,
        }
    }

    /// Feeds the TPM clock to the rollback guard: while the TPM has not been reset, wall time
    /// cannot be earlier than the last reading plus how far the TPM clock has advanced since.
    fn follow_tpm_clock(&mut self) {
        let Some(tpm) = &self.tpm else { return };
        let reading = match tpm.read_clock() {
            Ok(reading) => reading,
            Err(e) => {
                if self.store.kind() == "tpm" {
                    self.alerts.raise(
                        AlertKind::TpmUnavailable,
                        "the TPM stopped answering; secrets move to the encrypted file store",
                        serde_json::json!({"reason": e.to_string()}),
                    );
                    self.store.tpm_lost(&stored(&self.validator.keyring()));
                }
                return;
            }
        };
        if let Some((reset, clock_ms, wall)) = self.state.tpm_clock {
            if reset == reading.reset_count && reading.clock_ms >= clock_ms {
                let floor = wall + i64::try_from((reading.clock_ms - clock_ms) / 1000).unwrap_or(0);
                if floor > self.validator.clock.now() {
                    tracing::warn!(floor, "the TPM clock is ahead of the system clock: expiry decisions follow the TPM");
                }
                self.validator.clock.advance_to(floor);
            }
        }
        self.state.tpm_clock = Some((
            reading.reset_count,
            reading.clock_ms,
            self.validator.clock.now(),
        ));
    }

    /// Applies what a reloaded config may change while running.
    pub fn reconfigure(&mut self, config: &crate::config::AgentConfig) {
        self.settings.rotation_interval = config.agent.rotation_interval;
        self.settings.poll_interval = config
            .agent
            .poll_interval
            .min(config.agent.rotation_interval.max(1));
        self.settings.degraded_policy = config.agent.degraded_mode;
        if !self.forced_degraded {
            self.validator
                .set_degraded_policy(config.agent.degraded_mode);
        }
    }

    /// One line for systemd's STATUS=.
    pub fn status_line(&self) -> String {
        let newest = self.validator.keyring().newest().map_or_else(
            || "no secret yet".to_string(),
            |(v, _)| format!("secret v{v}"),
        );
        let degraded = if self.forced_degraded {
            "degraded (forced)"
        } else if self.validator.is_degraded() {
            "degraded"
        } else {
            "online"
        };
        format!("serving; {newest}; store {}; {degraded}", self.store.kind())
    }

    /// Carries out a management request.
    pub async fn control(&mut self, request: crate::mgmt::Control) {
        use crate::mgmt::Control;
        use license_protocol::mgmt::DegradedSwitch;
        match request {
            Control::Status(reply) => {
                let _ = reply.send(self.status_view());
            }
            Control::Rotate(reply) => {
                let result = match self.rotate().await {
                    Ok(version) => {
                        if let Err(e) = self.refresh_licenses().await {
                            tracing::warn!(error = %e, "tokens not refreshed after a requested rotation");
                        }
                        Ok(version)
                    }
                    Err(e) => Err(e.to_string()),
                };
                self.persist_state();
                self.write_metrics();
                let _ = reply.send(result);
            }
            Control::Invalidate(version, reply) => {
                let newest = self.validator.keyring().newest().map(|(v, _)| v);
                self.state.invalidated_versions.insert(version);
                self.validator
                    .set_invalidated(self.state.invalidated_versions.clone());
                self.purge();
                if newest == Some(version) {
                    // The active secret is gone: get a new one at the next round.
                    self.state.next_rotation_due = Some(self.validator.clock.now());
                }
                self.persist_state();
                self.write_metrics();
                let _ = reply.send(Ok(()));
            }
            Control::Degraded(switch, reply) => {
                let result = match switch {
                    DegradedSwitch::On if self.settings.degraded_policy == DegradedPolicy::Deny => Err(
                        "the configuration forbids degraded mode (agent.degraded_mode = \"deny\")".to_string(),
                    ),
                    DegradedSwitch::On => {
                        self.forced_degraded = true;
                        self.validator.set_degraded_policy(DegradedPolicy::Allow);
                        Ok("forced on: serving offline with the secrets held".to_string())
                    }
                    DegradedSwitch::Off => {
                        self.forced_degraded = false;
                        self.validator.set_degraded_policy(DegradedPolicy::Deny);
                        Ok("forbidden: an overdue rotation with the server unreachable fails validations".to_string())
                    }
                    DegradedSwitch::Auto => {
                        self.forced_degraded = false;
                        self.validator.set_degraded_policy(self.settings.degraded_policy);
                        Ok("automatic, as configured".to_string())
                    }
                };
                if result.is_ok() {
                    self.validator
                        .set_degraded(self.forced_degraded || self.state.degraded_since.is_some());
                    self.write_metrics();
                }
                let _ = reply.send(result);
            }
        }
    }

    fn status_view(&self) -> license_protocol::mgmt::StatusView {
        use crate::validator::rfc3339;
        let now = self.validator.clock.now();
        let keyring = self.validator.keyring();
        let newest = keyring.newest().map(|(v, _)| v);
        let secrets = keyring
            .versions()
            .map(|(version, d)| license_protocol::mgmt::SecretView {
                version,
                state: if Some(version) == newest && now <= d.valid_until {
                    "active"
                } else {
                    "grace"
                }
                .into(),
                valid_from: rfc3339(d.valid_from),
                valid_until: rfc3339(d.valid_until),
                grace_until: rfc3339(d.grace_until),
            })
            .collect();
        let degraded_mode = if self.forced_degraded {
            "forced"
        } else if self.validator.is_degraded() {
            "active"
        } else {
            "inactive"
        };
        license_protocol::mgmt::StatusView {
            machine_id: self.machine_id.to_string(),
            client_id: self.settings.client_id.to_string(),
            secrets,
            invalidated_versions: self.state.invalidated_versions.iter().copied().collect(),
            store: self.store.kind().to_string(),
            tpm_enabled: self.tpm.is_some(),
            tpm_available: self.store.kind() == "tpm",
            licenses: self.state.licenses.len(),
            revoked_licenses: self.state.revoked_licenses.len(),
            degraded_mode: degraded_mode.into(),
            degraded_policy: match self.validator.degraded_policy() {
                DegradedPolicy::Allow => "allow".into(),
                DegradedPolicy::Deny => "deny".into(),
            },
            degraded_since: self.state.degraded_since.map(rfc3339),
            last_server_contact: self.state.last_server_contact.map(rfc3339),
            last_rotation: self.state.last_rotation.map(rfc3339),
            next_rotation: self.state.next_rotation_due.map(rfc3339),
            consecutive_failures: self.state.consecutive_failures,
            clock_rollback_secs: self.validator.clock.rollback_secs(),
            extra: Default::default(),
        }
    }

    /// Alerts once per version when the newest secret has left ACTIVE with nothing newer.
    fn check_expiry(&mut self) {
        let now = self.validator.clock.now();
        let newest = self.validator.keyring().newest();
        let expired = match newest {
            Some((version, d)) if now > d.valid_until => Some(version),
            // Every secret gone (past grace or invalidated) after having had one.
            None if self.state.last_rotation.is_some() => Some(0),
            _ => None,
        };
        if let Some(version) = expired {
            if self.expired_alerted != Some(version) {
                self.expired_alerted = Some(version);
                self.alerts.raise(
                    AlertKind::SecretExpired,
                    "the newest secret expired without a replacement",
                    serde_json::json!({"version": version}),
                );
            }
        }
    }

    /// Saves state.json (with the audit anchor and the clock mark).
    pub fn persist_state(&mut self) {
        let head = self.audit.head();
        self.state.audit_anchor = Some((head.seq, head.hash));
        self.state.store = self.store.kind().to_string();
        self.state.tpm_available = self.state.store == "tpm";
        self.state.clock_high_water = self.validator.clock.high_water();
        self.state.secrets = metas(&self.validator.keyring());
        if let Err(e) = self.state_file.save(&self.state) {
            tracing::error!(error = %e, "cannot write state.json");
        }
    }

    /// Replaces the in-memory and stored sets together (store first: durable before used).
    fn commit_keyring(&mut self, keyring: Keyring) -> Result<(), StoreError> {
        self.store.save(&stored(&keyring))?;
        self.validator.set_keyring(keyring);
        Ok(())
    }

    /// Zeroizes and forgets versions past their grace and versions the server invalidated.
    fn purge(&mut self) {
        let now = self.validator.clock.now();
        let mut keyring = self.validator.keyring();
        let doomed: Vec<u64> = keyring
            .versions()
            .filter(|(v, d)| now > d.grace_until || self.state.invalidated_versions.contains(v))
            .map(|(v, _)| v)
            .collect();
        if doomed.is_empty() {
            return;
        }
        for v in &doomed {
            keyring.remove(*v);
        }
        match self.commit_keyring(keyring) {
            Ok(()) => {
                tracing::info!(versions = ?doomed, "secrets destroyed (past grace or invalidated)");
                self.audit.note(
                    agent_event("secret.destroyed", Outcome::Success)
                        .detail("versions", doomed.clone()),
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot rewrite the secret store while destroying secrets")
            }
        }
    }

    fn schedule_next(&mut self, now: i64) {
        let interval = self.settings.rotation_interval as i64;
        let jitter = if interval >= 10 {
            rand::thread_rng().gen_range(-(interval / 10)..=interval / 10)
        } else {
            0
        };
        self.state.next_rotation_due = Some(now + interval + jitter);
    }

    /// One rotation, steps 1 to 4 of the module docs.
    pub async fn rotate(&mut self) -> Result<u64, RotationError> {
        let now = self.validator.clock.now();
        let keyring = self.validator.keyring();
        let current = keyring.newest().map_or(0, |(v, _)| v);
        let mut request = RotateSecretRequest::unsigned(self.machine_id, current, now);
        let digest: [u8; 32] = Sha256::digest(request.signing_bytes()).into();
        let signature = self
            .machine_key
            .sign_digest(&digest)
            .map_err(|e| RotationError::Refused(format!("signing the request: {e}")))?;
        request.set_signature(&signature);
        let answer = self.client.rotate_secret(&request).await?;
        let blob = answer
            .verify(&self.license_key, &self.machine_id)
            .map_err(|e| RotationError::Refused(format!("server signature: {e}")))?;
        let version = answer.secret_version;
        if version < current {
            return Err(RotationError::Refused(format!(
                "server offered version {version}, older than held {current}"
            )));
        }
        if version > current {
            let dates = answer.dates();
            let secret = secret::open(
                &Ecdh(self.machine_key.as_ref()),
                &self.machine_id,
                version,
                &dates,
                &blob,
            )
            .map_err(|e| RotationError::Refused(format!("secret: {e}")))?;
            crash_point("after_receive");
            let mut keyring = keyring;
            keyring.insert(version, dates, secret);
            self.commit_keyring(keyring)?;
            self.persist_state();
            crash_point("after_store");
            tracing::info!(version, "new secret stored");
        }
        self.client.ack_secret(version).await?;
        crash_point("after_ack");
        self.rotations_total += 1;
        self.audit.note(
            agent_event("secret.rotate", Outcome::Success)
                .detail("version", version)
                .detail("previous", current),
        );
        self.state.last_rotation = Some(now);
        self.schedule_next(now);
        Ok(version)
    }

    async fn refresh_licenses(&mut self) -> Result<(), RotationError> {
        let licenses = self.client.licenses().await?;
        std::fs::create_dir_all(&self.settings.tokens_dir).map_err(|source| StoreError::Io {
            path: self.settings.tokens_dir.display().to_string(),
            source,
        })?;
        let mut keep = BTreeSet::new();
        for t in &licenses.tokens {
            let name = format!("{}.token", t.license_id);
            let path = self.settings.tokens_dir.join(&name);
            if std::fs::read_to_string(&path).ok().as_deref() != Some(t.token.as_str()) {
                crate::files::write_atomic(&path, t.token.as_bytes(), crate::files::PUBLIC)
                    .map_err(|source| StoreError::Io {
                        path: path.display().to_string(),
                        source,
                    })?;
            }
            keep.insert(name);
        }
        if let Ok(entries) = std::fs::read_dir(&self.settings.tokens_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if name.ends_with(".token") && !keep.contains(&name) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        self.state.licenses = licenses
            .tokens
            .iter()
            .map(|t| (t.license_id, t.secret_version))
            .collect();
        let revoked: BTreeSet<uuid::Uuid> = licenses.revoked.iter().copied().collect();
        if revoked != self.state.revoked_licenses {
            let ids: Vec<String> = revoked.iter().map(ToString::to_string).collect();
            self.audit
                .note(agent_event("license.revocations", Outcome::Success).detail("revoked", ids));
        }
        self.state.revoked_licenses = revoked;
        self.validator.set_revoked(licenses.revoked);
        Ok(())
    }

    async fn talk_to_server(&mut self) -> Result<(), RotationError> {
        let status = self.client.secret_status().await?;
        let now = self.validator.clock.now();
        self.state.last_server_contact = Some(now);
        let invalidated: BTreeSet<u64> = status.invalidated_versions.iter().copied().collect();
        if invalidated != self.state.invalidated_versions {
            tracing::warn!(versions = ?invalidated, "server invalidated secret versions");
            self.audit.note(
                agent_event("secret.invalidated", Outcome::Success)
                    .detail("versions", invalidated.iter().copied().collect::<Vec<_>>()),
            );
            self.state.invalidated_versions = invalidated.clone();
            self.validator.set_invalidated(invalidated);
            self.purge();
        }
        let keyring = self.validator.keyring();
        // Due on our own schedule, or when the newest secret is about to leave ACTIVE (the
        // server's validity may be shorter than our interval): within a tenth of its life.
        let expiring = keyring.newest().is_some_and(|(_, d)| {
            d.valid_until - now <= ((d.valid_until - d.valid_from) / 10).max(1)
        });
        let due = self.state.next_rotation_due.is_none_or(|t| now >= t) || expiring;
        let server_ahead = status
            .current_version
            .is_some_and(|v| keyring.newest().is_none_or(|(held, _)| v > held));
        if keyring.newest().is_none()
            || due
            || status.rotation_requested
            || status.pending_version.is_some()
            || server_ahead
        {
            let version = self.rotate().await?;
            tracing::info!(version, "rotation complete");
        }
        self.refresh_licenses().await
    }

    /// One round of work; returns how long to wait before the next.
    pub async fn tick(&mut self) -> Duration {
        self.follow_tpm_clock();
        self.purge();
        self.check_expiry();
        if self.forced_degraded {
            self.validator.set_degraded(true);
            self.persist_state();
            self.write_metrics();
            return Duration::from_secs(self.settings.poll_interval);
        }
        let result = self.talk_to_server().await;
        let now = self.validator.clock.now();
        let wait = match result {
            Ok(()) => {
                if self.state.degraded_since.take().is_some() {
                    tracing::info!("server reachable again: degraded mode ended");
                    self.audit.note(
                        agent_event("agent.degraded_mode", Outcome::Success)
                            .detail("active", false),
                    );
                }
                self.degraded_alerted = false;
                self.state.consecutive_failures = 0;
                self.validator.set_degraded(false);
                Duration::from_secs(self.settings.poll_interval)
            }
            Err(e) => {
                self.rotations_failed += 1;
                self.audit.note(
                    agent_event("secret.rotate", Outcome::Error).detail("reason", e.to_string()),
                );
                self.state.consecutive_failures += 1;
                let failures = self.state.consecutive_failures;
                if failures >= ALERT_AFTER_FAILURES {
                    self.alerts.raise(
                        AlertKind::RotationFailed,
                        &format!("secret rotation failed {failures} times in a row"),
                        serde_json::json!({"failures": failures, "error": e.to_string()}),
                    );
                } else {
                    tracing::warn!(failures, error = %e, "rotation round failed; backing off");
                }
                let overdue = self.state.next_rotation_due.is_none_or(|t| now >= t);
                if e.unreachable() && overdue {
                    if self.state.degraded_since.is_none() {
                        self.audit.note(
                            agent_event("agent.degraded_mode", Outcome::Success)
                                .detail("active", true),
                        );
                    }
                    let since = *self.state.degraded_since.get_or_insert(now);
                    self.validator.set_degraded(true);
                    if now - since >= DEGRADED_ALERT_SECS && !self.degraded_alerted {
                        self.degraded_alerted = true;
                        self.alerts.raise(
                            AlertKind::DegradedTooLong,
                            "degraded mode for more than 24 h",
                            serde_json::json!({"since": since}),
                        );
                    }
                }
                let backoff = 1u64 << failures.min(16);
                Duration::from_secs(
                    backoff
                        .min(MAX_BACKOFF_SECS)
                        .min(self.settings.poll_interval.max(1) * 4)
                        .max(1),
                )
            }
        };
        self.persist_state();
        self.write_metrics();
        wait
    }

    fn write_metrics(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.validator.clock.now();
        let keyring = self.validator.keyring();
        let newest = keyring.newest().map(|(v, _)| v);
        let (mut active, mut grace) = (0, 0);
        for (version, d) in keyring.versions() {
            if now > d.grace_until || self.state.invalidated_versions.contains(&version) {
                continue;
            }
            if Some(version) == newest && now <= d.valid_until {
                active += 1;
            } else {
                grace += 1;
            }
        }
        let counters = &self.validator.counters;
        let snapshot = crate::metrics::Snapshot {
            secrets_active: active,
            secrets_grace: grace,
            rotations_total: self.rotations_total,
            rotations_failed: self.rotations_failed,
            validations_total: counters.validations_total.load(Relaxed),
            validations_failed: counters.validations_failed.load(Relaxed),
            degraded_mode: self.validator.is_degraded(),
            tpm_available: self.state.tpm_available,
            last_rotation: self.state.last_rotation.unwrap_or(0),
        };
        if let Err(e) = snapshot.write(&self.settings.metrics_file) {
            tracing::warn!(error = %e, path = %self.settings.metrics_file.display(), "cannot write the metrics file");
        }
    }
}
