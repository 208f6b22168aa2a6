//! The rotation engine (seed §2.1 "Rotation Manager", DESIGN.md §4): keeps this machine's
//! secrets fresh, its license tokens current and its state on disk.
//!
//! Every round ([`Engine::tick`]): follow the TPM clock, destroy secrets past their grace or
//! invalidated, alert on a secret expired without replacement, then talk to the server
//! ([`round`]) and settle what the outcome means: back online, or a failure with exponential
//! backoff, alerts, and degraded mode when the server is unreachable and a rotation overdue
//! (ACTIVE and GRACE secrets keep serving until their grace ends, or validations fail closed
//! if the policy forbids it). The engine heals by itself when the server answers again.
//!
//! What to do is decided in [`decide`] (pure, tested with a made-up clock); this module and
//! [`round`] carry it out. Management reaches the engine through its [`control`] channel.
//! Blocking work (TPM commands, fsyncs) runs on the blocking pool.
//!
//! - [`decide`]: pure decisions (what is due, backoff, degraded or not, what to purge)
//! - [`round`]: the rotation and license fetch against an [`server::AgentServer`]
//! - [`control`]: management requests, handled between rounds
//! - [`status`]: the status view, systemd's status line, the metrics file
//! - [`licenses`]: token files for POS applications
//! - [`license_keys`]: the license keys trusted, learned from the server's signed key sets
//! - [`renewal`]: a new certificate for the machine key
//! - [`revoked`]: what a machine the server revoked does
//! - [`state`]: `state.json`, what the agent knows besides the secrets
//! - [`update`]: releases offered by the server, checked and staged for the update step

pub mod control;
pub mod decide;
pub mod license_keys;
pub mod licenses;
pub mod renewal;
pub mod revoked;
pub mod round;
pub mod server;
pub mod server_trust;
pub mod state;
pub mod status;
#[cfg(test)]
mod tests;
pub mod update;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use license_audit::Outcome;
use license_protocol::agent_api::HealthReport;
use license_protocol::identity::{ClientId, MachineId};

use crate::alerts::{AlertKind, Alerts};
use crate::audit::{agent_event, Audit};
use crate::config::{AgentConfig, DegradedPolicy, RevokedPolicy};
use crate::platform::blocking;
use crate::platform::keys::MachineKey;
use crate::platform::tpm::Tpm;
use crate::stores::{SecretStore, StoreError, StoredSecret};
use crate::validation::{Keyring, Validator};
use decide::{Doom, Link, Override};
use round::RotationError;
use server::AgentServer;
use state::{AgentState, StateFile};

/// Test hook: `LICENSE_AGENT_TEST_CRASH_AT=<step>` aborts the process at that step (of a
/// rotation: `after_receive`, `after_store`, `after_ack`; of a renewal: see [`renewal`]), as
/// `kill -9` would, so tests can prove recovery.
const CRASH_ENV: &str = "LICENSE_AGENT_TEST_CRASH_AT";

fn crash_point(step: &str) {
    if std::env::var(CRASH_ENV).is_ok_and(|v| v == step) {
        eprintln!("license-agent: test crash at {step}");
        std::process::abort();
    }
}

/// Who this machine is to the server, and the keys it proves it with.
#[derive(Debug, Clone)]
pub struct Machine {
    pub id: MachineId,
    pub client_id: ClientId,
    /// Signs rotate requests and opens delivered secrets.
    pub key: Arc<dyn MachineKey>,
    /// The server's license keys this machine trusts (the pinned one and those learned since):
    /// they sign rotate answers and tokens.
    pub license_keys: license_protocol::license_keys::TrustedKeys,
    /// The certificate `key` is presented with (renewed by the engine).
    pub certificate: renewal::Certificate,
    /// The server's TLS keys and CAs this machine trusts (enrollment's and what the server
    /// announced since).
    pub server_trust: license_protocol::server_trust::AgentTrust,
}

/// What the engine keeps on disk: the secrets (in their store) and `state.json`.
#[derive(Debug)]
pub struct Vault {
    pub store: Arc<dyn SecretStore>,
    pub state_file: StateFile,
    pub state: AgentState,
}

/// Settings of the engine, from the config (reloadable ones are replaced on SIGHUP).
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub rotation_interval: u64,
    pub poll_interval: u64,
    /// Seconds between rounds while the watch stream is held (`agent.watch_poll_interval`).
    pub watch_poll_interval: u64,
    /// The configured degraded-mode policy (`degraded auto` returns to it).
    pub degraded_policy: DegradedPolicy,
    /// What validations answer while the server refuses this machine as revoked.
    pub revoked_policy: RevokedPolicy,
    pub metrics_file: PathBuf,
    pub tokens_dir: PathBuf,
    /// `state_dir/license-keys.json`: the license keys trusted.
    pub license_keys_file: license_keys::TrustFile,
    /// `state_dir/server-trust.json`: the server keys and CAs trusted.
    pub server_trust_file: crate::net::trust::TrustFile,
    /// The machine's key and certificate files (renewal rewrites them).
    pub identity: renewal::IdentityFiles,
    /// The configuration asks for the TPM (`[tpm] enabled`), whether or not it answered.
    pub tpm_configured: bool,
    /// `[update]`.
    pub update: update::UpdateSettings,
}

impl EngineSettings {
    pub fn from_config(config: &AgentConfig) -> Self {
        Self {
            rotation_interval: config.agent.rotation_interval,
            // Polling less often than rotating would make rotations late.
            poll_interval: config
                .agent
                .poll_interval
                .min(config.agent.rotation_interval.max(1)),
            // Never less often than the rotations either, nor more often than polling.
            watch_poll_interval: config
                .agent
                .watch_poll_interval
                .min(config.agent.rotation_interval.max(1))
                .max(config.agent.poll_interval),
            degraded_policy: config.agent.degraded_mode,
            revoked_policy: config.agent.on_machine_revoked,
            metrics_file: config.agent.metrics_file.clone(),
            tokens_dir: config.agent.state_dir.join("tokens"),
            license_keys_file: license_keys::TrustFile::new(&config.agent.state_dir),
            server_trust_file: crate::net::trust::TrustFile::from_config(config),
            identity: renewal::IdentityFiles::from_config(config),
            tpm_configured: config.tpm.enabled,
            update: update::UpdateSettings::from_config(config),
        }
    }
}

/// How the engine is doing: the states it moves between and what it counts.
#[derive(Debug, Default)]
struct Health {
    link: Link,
    overridden: Override,
    /// The version last reported expired without a replacement (alert once per version).
    expired_alerted: Option<u64>,
    /// The expired certificate's renewal failure was alerted (once until it succeeds).
    certificate_alerted: bool,
    /// When the last renewal succeeded.
    renewed_at: Option<i64>,
    rotations_total: u64,
    rotations_failed: u64,
    /// Digest of a key set refused (not fetched again until the server announces another).
    refused_key_set: Option<String>,
    /// Digest of a server trust announcement refused (likewise).
    refused_server_trust: Option<String>,
    /// The audit log's rotations, for the `audit_log_flooded` alert.
    audit_flood: decide::AuditFloodWatch,
    /// What the daemon found at start: the clock rollback (seconds) and whether the audit log
    /// matched its anchor.
    clock_rollback_secs: Option<i64>,
    audit_chain_broken: bool,
    /// The last health report the server accepted, and when.
    reported: Option<(HealthReport, i64)>,
    /// The release offered at the last round (its version), and the offer itself until the
    /// round is settled.
    offered: Option<String>,
    offer: Option<license_protocol::release::UpdateOffer>,
    /// The watch stream is held: rounds with the server every `watch_poll_interval`.
    watching: bool,
    /// A change was pushed: the next tick talks to the server.
    round_requested: bool,
    /// When the licenses were last fetched while the stream was held (cleared when it is
    /// opened or lost: `decide::licenses_refresh_due`).
    licenses_fetched: Option<i64>,
    /// When a round last reached the server.
    last_server_round: Option<tokio::time::Instant>,
    /// The change feed's position as the last secret status gave it (shared with the
    /// daemon's watch stream).
    watch_cursor: crate::net::watch::WatchCursor,
}

/// Everything the engine is made of.
#[derive(Debug)]
pub struct EngineParts<S> {
    pub server: S,
    pub machine: Machine,
    pub vault: Vault,
    pub validator: Arc<Validator>,
    pub settings: EngineSettings,
    /// The TPM, whose clock backs the rollback guard.
    pub tpm: Option<Arc<Tpm>>,
    pub alerts: Alerts,
}

/// The engine: owns the store, the state file and the server connection.
pub struct Engine<S> {
    server: S,
    machine: Machine,
    vault: Vault,
    validator: Arc<Validator>,
    settings: EngineSettings,
    tpm: Option<Arc<Tpm>>,
    alerts: Alerts,
    health: Health,
}

impl<S> std::fmt::Debug for Engine<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("machine_id", &self.machine.id)
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

impl<S: AgentServer> Engine<S> {
    pub fn new(parts: EngineParts<S>) -> Self {
        let link = Link::from_persisted(parts.vault.state.degraded_since);
        let mut keyring = parts.validator.keyring();
        keyring.set_retired_through(parts.vault.state.retired_through);
        parts.validator.set_keyring(keyring);
        let engine = Self {
            server: parts.server,
            machine: parts.machine,
            vault: parts.vault,
            validator: parts.validator,
            settings: parts.settings,
            tpm: parts.tpm,
            alerts: parts.alerts,
            health: Health {
                link,
                ..Health::default()
            },
        };
        // A till revoked before it stopped stays closed from its first validation.
        engine.apply_revoked_policy();
        engine
    }

    fn audit(&self) -> &Audit {
        self.alerts.audit()
    }

    /// Whether the daemon holds a watch stream (rounds with the server are then spaced by
    /// `watch_poll_interval`).
    pub fn set_watching(&mut self, watching: bool) {
        if self.health.watching != watching {
            // What was pushed while no stream was held is not known: fetch at the next round.
            self.health.licenses_fetched = None;
        }
        self.health.watching = watching;
    }

    /// The watch stream was lost: back to polling, and the next round talks to the server
    /// even if a stream is held again by then, as what was missed may be more than the cursor
    /// replays (a server restarted with new keys or certificates).
    pub fn stream_lost(&mut self) {
        self.set_watching(false);
        self.request_round();
    }

    /// The server pushed a change: the next tick talks to the server whatever the interval.
    pub fn request_round(&mut self) {
        self.health.round_requested = true;
    }

    /// Whether this tick talks to the server: always while polling (no watch stream held);
    /// while one is held, when a change was pushed, the last round failed, a rotation is due,
    /// an update's result is to be reported, or `watch_poll_interval` has passed since the last
    /// round that reached the server.
    /// Local checks (expiry, purges, the audit log's pace) run at every tick either way.
    fn server_round_due(&self) -> bool {
        let rotation_due = decide::rotation_due(
            self.vault.state.next_rotation_due,
            self.validator.keyring().newest().map(|(_, dates)| dates),
            self.validator.clock.now(),
        );
        // What this machine has to tell the server: an update step's result, reports not
        // accepted yet.
        let update_to_report = !self.vault.state.update.unreported.is_empty()
            || self.settings.update.staging.result().exists();
        !self.health.watching
            || self.health.round_requested
            || rotation_due
            || update_to_report
            || self.vault.state.consecutive_failures > 0
            || self.health.last_server_round.is_none_or(|at| {
                at.elapsed() >= Duration::from_secs(self.settings.watch_poll_interval)
            })
    }

    /// The change feed's position the watch stream resumes from.
    pub fn watch_cursor(&self) -> crate::net::watch::WatchCursor {
        self.health.watch_cursor.clone()
    }

    /// The settings the daemon schedules rounds by.
    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    fn link(&self) -> Link {
        self.health.link
    }

    /// Applies what a reloaded config may change while running.
    pub fn reconfigure(&mut self, config: &AgentConfig) {
        // Paths change at the next restart only.
        let fresh = EngineSettings::from_config(config);
        self.settings.rotation_interval = fresh.rotation_interval;
        self.settings.poll_interval = fresh.poll_interval;
        self.settings.watch_poll_interval = fresh.watch_poll_interval;
        self.settings.degraded_policy = fresh.degraded_policy;
        self.settings.revoked_policy = fresh.revoked_policy;
        self.settings.update.enabled = fresh.update.enabled;
        self.settings.update.channel = fresh.update.channel;
        self.set_override(self.health.overridden);
        self.apply_revoked_policy();
    }

    /// An administrator's degraded-mode switch.
    fn set_override(&mut self, chosen: Override) {
        self.health.overridden = chosen;
        self.validator
            .set_degraded_policy(chosen.policy(self.settings.degraded_policy));
        self.validator.set_degraded(chosen.degraded(self.link()));
    }

    /// Feeds the TPM clock to the rollback guard (a TPM that stops answering moves the
    /// secrets to the file store, with an alert).
    async fn follow_tpm_clock(&mut self) {
        let Some(tpm) = self.tpm.clone() else { return };
        let reading = match blocking::run(move || tpm.read_clock()).await {
            Ok(reading) => reading,
            Err(e) => {
                if self.vault.store.kind() == "tpm" {
                    self.alerts
                        .raise(
                            AlertKind::TpmUnavailable,
                            "the TPM stopped answering; secrets move to the encrypted file store",
                            serde_json::json!({"reason": e.to_string()}),
                        )
                        .await;
                    let store = self.vault.store.clone();
                    let current = stored(&self.validator.keyring());
                    blocking::run(move || store.tpm_lost(&current)).await;
                }
                return;
            }
        };
        let clock = &self.validator.clock;
        if let Some(floor) = decide::tpm_time_floor(
            self.vault.state.tpm_clock,
            reading.reset_count,
            reading.clock_ms,
        ) {
            if floor > clock.now() {
                tracing::warn!(
                    floor,
                    "the TPM clock is ahead of the system clock: expiry decisions follow the TPM"
                );
            }
            clock.advance_to(floor);
        }
        self.vault.state.tpm_clock = Some((reading.reset_count, reading.clock_ms, clock.now()));
    }

    /// Alerts once per version when the newest secret has left ACTIVE with nothing newer.
    async fn check_expiry(&mut self) {
        let expired = decide::expired_without_replacement(
            self.validator.keyring().newest(),
            self.vault.state.last_rotation.is_some(),
            self.validator.clock.now(),
        );
        if let Some(version) = expired {
            if self.health.expired_alerted != Some(version) {
                self.health.expired_alerted = Some(version);
                self.alerts
                    .raise(
                        AlertKind::SecretExpired,
                        "the newest secret expired without a replacement",
                        serde_json::json!({"version": version}),
                    )
                    .await;
            }
        }
    }

    /// Records what the daemon found at start, for the health report.
    pub fn set_start_findings(&mut self, clock_rollback_secs: Option<i64>, audit_chain_ok: bool) {
        self.health.clock_rollback_secs = clock_rollback_secs;
        self.health.audit_chain_broken = !audit_chain_ok;
    }

    /// The machine's health as the server's operators see it.
    pub fn health_report(&self) -> HealthReport {
        let view = self.status_view();
        HealthReport {
            agent_version: crate::update::running_version().to_string(),
            store: view.store,
            tpm_enabled: self.settings.tpm_configured,
            tpm_available: view.tpm_available,
            degraded_mode: view.degraded_mode,
            degraded_since: self.health.link.degraded_since(),
            last_rotation: self.vault.state.last_rotation,
            rotation_failures: self.vault.state.consecutive_failures,
            clock_rollback_secs: self.health.clock_rollback_secs,
            audit_chain_ok: !self.health.audit_chain_broken,
            certificate_expires_at: self.machine.certificate.not_after,
            secret_version: self.validator.keyring().newest().map(|(v, _)| v),
        }
    }

    /// Sends the health report after a round with the server when it changed, or a day after
    /// the last one. A failure is logged and retried at the next round: it never fails one.
    async fn report_health(&mut self) {
        let report = self.health_report();
        let now = self.validator.clock.now();
        if !decide::health_report_due(self.health.reported.as_ref(), &report, now) {
            return;
        }
        match self.server.report_health(&report).await {
            Ok(()) => self.health.reported = Some((report, now)),
            Err(e) => tracing::warn!(error = %e, "health report not accepted; retrying next round"),
        }
    }

    /// Alerts when the audit log rotates its history away abnormally fast.
    async fn check_audit_flood(&mut self) {
        let (rotations, keep_files) = self.audit().rotations();
        let now = self.validator.clock.now();
        if let Some(count) = self.health.audit_flood.observe(rotations, keep_files, now) {
            self.alerts
                .raise(
                    AlertKind::AuditLogFlooded,
                    "the audit log is rotating its history away abnormally fast",
                    serde_json::json!({
                        "rotations": count,
                        "window_secs": decide::AUDIT_FLOOD_WINDOW_SECS,
                        "keep_files": keep_files,
                    }),
                )
                .await;
        }
    }

    /// Saves state.json (with the audit anchor and the clock mark) and the metrics file.
    pub async fn persist(&mut self) {
        self.persist_state().await;
        self.write_metrics().await;
    }

    async fn persist_state(&mut self) {
        let head = self.audit().head();
        let keyring = self.validator.keyring();
        let link = self.link();
        let state = &mut self.vault.state;
        state.audit_anchor = Some((head.seq, head.hash));
        state.store = self.vault.store.kind().to_string();
        state.tpm_available = state.store == "tpm";
        state.clock_high_water = self.validator.clock.high_water();
        state.degraded_since = link.degraded_since();
        state.retired_through = keyring.retired_through();
        state.secrets = keyring
            .versions()
            .map(|(version, d)| state::SecretMeta {
                version,
                valid_from: d.valid_from,
                valid_until: d.valid_until,
                grace_until: d.grace_until,
            })
            .collect();
        let (file, snapshot) = (self.vault.state_file.clone(), state.clone());
        if let Err(e) = blocking::run(move || file.save(&snapshot)).await {
            tracing::error!(error = %e, "cannot write state.json");
        }
    }

    /// Replaces the in-memory and stored sets together (store first: durable before used).
    async fn commit_keyring(&mut self, keyring: Keyring) -> Result<(), StoreError> {
        let (store, secrets) = (self.vault.store.clone(), stored(&keyring));
        blocking::run(move || store.save(&secrets)).await?;
        self.validator.set_keyring(keyring);
        Ok(())
    }

    /// Takes the server's clock from an answer: it bounds "now" from both sides (see
    /// [`GuardedClock::attest`](crate::platform::clock::GuardedClock::attest)) and is the time
    /// secrets are destroyed by.
    fn attest(&mut self, server_time: i64) {
        if let Some(ahead) =
            decide::clock_ahead_of_server(crate::platform::clock::system_now(), server_time)
        {
            tracing::warn!(ahead, "the system clock is {ahead} s ahead of the server's; expiry decisions follow the server's");
        }
        self.validator.clock.attest(server_time);
        self.vault.state.server_time = Some(server_time);
    }

    /// Zeroizes and forgets versions the server invalidated, and versions past their grace by
    /// the server's time (see [`decide::doomed`]).
    async fn purge(&mut self) {
        let mut keyring = self.validator.keyring();
        let doomed = decide::doomed(
            keyring.versions(),
            &self.vault.state.invalidated_versions,
            self.validator.clock.attested_now(),
        );
        if doomed.is_empty() {
            return;
        }
        for (version, doom) in &doomed {
            match doom {
                Doom::PastGrace => keyring.retire(*version),
                Doom::Invalidated => {
                    keyring.remove(*version);
                }
            }
        }
        let versions: Vec<u64> = doomed.iter().map(|(v, _)| *v).collect();
        match self.commit_keyring(keyring).await {
            Ok(()) => {
                tracing::info!(?versions, "secrets destroyed (past grace or invalidated)");
                self.audit()
                    .note(
                        agent_event("secret.destroyed", Outcome::Success)
                            .detail("versions", versions),
                    )
                    .await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot rewrite the secret store while destroying secrets")
            }
        }
    }

    /// Invalidates a version on this machine (management); losing the newest secret makes
    /// the next round rotate.
    async fn invalidate(&mut self, version: u64) {
        let newest = self.validator.keyring().newest().map(|(v, _)| v);
        self.vault.state.invalidated_versions.insert(version);
        self.validator
            .set_invalidated(self.vault.state.invalidated_versions.clone());
        self.purge().await;
        if newest == Some(version) {
            self.vault.state.next_rotation_due = Some(self.validator.clock.now());
        }
    }

    /// One round of work; returns how long to wait before the next.
    pub async fn tick(&mut self) -> Duration {
        self.apply_revoked_policy();
        self.follow_tpm_clock().await;
        self.purge().await;
        self.check_expiry().await;
        self.check_audit_flood().await;
        let poll = Duration::from_secs(self.settings.poll_interval);
        if self.health.overridden == Override::ForcedOn {
            self.validator.set_degraded(true);
            // No round with the server, but operators learn that degraded mode was forced.
            self.report_health().await;
            self.persist().await;
            return poll;
        }
        self.renew_if_due().await;
        if !self.server_round_due() {
            self.persist().await;
            return poll;
        }
        let asked = std::mem::take(&mut self.health.round_requested);
        let wait = match self.talk_to_server(asked).await {
            Ok(()) => {
                self.health.last_server_round = Some(tokio::time::Instant::now());
                self.back_online().await;
                let offer = self.health.offer.take();
                self.follow_updates(offer).await;
                self.report_health().await;
                poll
            }
            Err(e) => {
                // What the server asked for is still to be done.
                self.health.round_requested |= asked;
                self.round_failed(e).await
            }
        };
        self.persist().await;
        wait
    }

    async fn back_online(&mut self) {
        self.machine_restored().await;
        if let Link::Degraded { .. } = self.link() {
            tracing::info!("server reachable again: degraded mode ended");
            self.audit()
                .note(agent_event("agent.degraded_mode", Outcome::Success).detail("active", false))
                .await;
        }
        self.health.link = Link::Online;
        self.vault.state.consecutive_failures = 0;
        self.validator
            .set_degraded(self.health.overridden.degraded(Link::Online));
    }

    async fn round_failed(&mut self, e: RotationError) -> Duration {
        let now = self.validator.clock.now();
        let retry_after = e.retry_after();
        if let Some(code) = revoked::revocation(&e) {
            self.machine_revoked(code, now).await;
        }
        self.health.rotations_failed += 1;
        self.audit()
            .note(agent_event("secret.rotate", Outcome::Error).detail("reason", e.to_string()))
            .await;
        self.vault.state.consecutive_failures += 1;
        let failures = self.vault.state.consecutive_failures;
        let overdue = self.vault.state.next_rotation_due.is_none_or(|t| now >= t);
        let after = decide::after_failure(self.link(), failures, e.unreachable(), overdue, now);
        if after.alert_failures {
            self.alerts
                .raise(
                    AlertKind::RotationFailed,
                    &format!("secret rotation failed {failures} times in a row"),
                    serde_json::json!({"failures": failures, "error": e.to_string()}),
                )
                .await;
        } else {
            tracing::warn!(failures, error = %e, "rotation round failed; backing off");
        }
        if after.entered_degraded {
            self.audit()
                .note(agent_event("agent.degraded_mode", Outcome::Success).detail("active", true))
                .await;
        }
        if after.alert_degraded {
            if let Link::Degraded { since, .. } = after.link {
                self.alerts
                    .raise(
                        AlertKind::DegradedTooLong,
                        "degraded mode for more than 24 h",
                        serde_json::json!({"since": since}),
                    )
                    .await;
            }
        }
        self.health.link = after.link;
        self.validator
            .set_degraded(self.health.overridden.degraded(after.link));
        decide::retry_wait(
            failures,
            self.settings.poll_interval,
            retry_after,
            &mut rand::thread_rng(),
        )
    }
}
