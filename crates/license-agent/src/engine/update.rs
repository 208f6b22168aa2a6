//! The daemon's side of updates (`crate::update` has the whole picture): after each round
//! with the server, collect what the update step left ([`UpdateResult`]: every step audited,
//! the outcome remembered and reported), send reports the server has not accepted yet, then
//! consider the release the secret status offered.
//!
//! A release is staged only when updates are enabled and not held, it was not refused or
//! failed here before, nothing else waits for the update step, its manifest verifies (a
//! release key the license keys vouch for, never seen retired), it is for this architecture
//! and no downgrade (unless marked a rollback), and the binary streamed from the server has
//! the manifest's size and SHA-256. A refusal is audited with its reason code, alerted,
//! reported to the server and remembered, so the release is never downloaded again. A
//! download that fails on the network is simply tried again at the next round.
//!
//! Polls carry the agent's version, channel and architecture in the secret status query:
//! no request is added while nothing is offered.

use license_audit::Outcome;
use license_protocol::agent_api::StatusQuery;
use license_protocol::mgmt::{LastUpdateView, UpdateView};
use license_protocol::release::{self, ReleaseTrust, UpdateOffer, UpdateOutcome, UpdateReport};

use super::server::AgentServer;
use super::state::{LastUpdate, MAX_REMEMBERED};
use super::Engine;
use crate::alerts::AlertKind;
use crate::audit::agent_event;
use crate::net::client::ClientError;
use crate::platform::blocking;
use crate::platform::clock::rfc3339;
use crate::platform::files::{ensure_dir, rename_durable, write_atomic, PRIVATE};
use crate::update::{running_version, Bundle, Staging, UpdateResult, ARCH};

/// File of the release trust inside the state directory (retired release keys; public).
pub const RELEASE_TRUST_FILE: &str = "release-keys.json";

/// Update settings of the engine, from `[update]`.
#[derive(Debug, Clone)]
pub struct UpdateSettings {
    pub enabled: bool,
    pub channel: release::Channel,
    pub staging: Staging,
    pub trust_file: std::path::PathBuf,
}

impl UpdateSettings {
    pub fn from_config(config: &crate::config::AgentConfig) -> Self {
        Self {
            enabled: config.update.enabled,
            channel: config.update.channel.clone(),
            staging: Staging::new(config.update_staging_dir()),
            trust_file: config.agent.state_dir.join(RELEASE_TRUST_FILE),
        }
    }
}

impl<S: AgentServer> Engine<S> {
    /// What the secret status asks with: the agent's version, channel and architecture, or
    /// nothing when updates are off (the server then offers nothing).
    pub(super) fn status_query(&self) -> StatusQuery {
        if !self.settings.update.enabled {
            return StatusQuery::default();
        }
        StatusQuery {
            agent_version: Some(running_version()),
            channel: Some(self.settings.update.channel.clone()),
            arch: Some(ARCH.to_string()),
        }
    }

    /// After a round with the server: the update step's result, pending reports, the offer.
    pub(super) async fn follow_updates(&mut self, offer: Option<UpdateOffer>) {
        self.collect_update_result().await;
        self.send_update_reports().await;
        self.health.offered = offer.as_ref().map(|o| o.manifest.version.to_string());
        if let Some(offer) = offer {
            self.consider(offer).await;
        }
    }

    /// Holds or releases updates (management). Holding withdraws a release staged but not
    /// yet taken by the update step.
    pub(super) async fn hold_updates(&mut self, held: bool) {
        self.vault.state.update.held = held;
        let staging = self.settings.update.staging.clone();
        if held && self.vault.state.update.staged.is_some() {
            let withdrawn = blocking::run(move || {
                let waiting = staging.is_ready();
                if waiting {
                    staging.clear();
                }
                waiting
            })
            .await;
            if withdrawn {
                self.vault.state.update.staged = None;
                tracing::info!("updates held: the staged release was withdrawn");
            }
        }
    }

    /// The `update` part of `status`.
    pub(super) fn update_view(&self) -> UpdateView {
        let state = &self.vault.state.update;
        UpdateView {
            enabled: self.settings.update.enabled,
            channel: self.settings.update.channel.to_string(),
            held: state.held,
            offered: self.health.offered.clone(),
            staged: state.staged.as_ref().map(|(_, v)| v.clone()),
            last: state.last.as_ref().map(|l| LastUpdateView {
                version: l.version.clone(),
                from_version: l.from_version.clone(),
                outcome: l.outcome.clone(),
                reason: l.reason.clone(),
                at: rfc3339(l.at),
            }),
        }
    }

    /// Remembers how an update ended, queues its report and counts it.
    fn remember(
        &mut self,
        release_id: uuid::Uuid,
        version: String,
        outcome: UpdateOutcome,
        reason: &str,
    ) {
        let now = self.validator.clock.now();
        let state = &mut self.vault.state.update;
        if outcome == UpdateOutcome::Success {
            state.succeeded += 1;
        } else {
            state.failed += 1;
            state.refused.retain(|(id, _)| *id != release_id);
            state.refused.push((release_id, reason.to_string()));
            let excess = state.refused.len().saturating_sub(MAX_REMEMBERED);
            state.refused.drain(..excess);
        }
        if !release_id.is_nil() {
            state.unreported.push(UpdateReport {
                release_id,
                outcome,
                reason: reason.to_string(),
                running_version: running_version(),
            });
        }
        state.last = Some(LastUpdate {
            release_id,
            version,
            from_version: running_version().to_string(),
            outcome: outcome.as_str().to_string(),
            reason: reason.to_string(),
            at: now,
        });
    }

    /// Audits, alerts, remembers and reports a refused offer.
    async fn refuse(&mut self, offer: &UpdateOffer, code: &str, detail: String) {
        let m = &offer.manifest;
        tracing::error!(version = %m.version, reason = code, detail = %detail, "release refused");
        self.audit()
            .note(
                agent_event("update.refused", Outcome::Refused)
                    .detail("release_id", m.release_id.to_string())
                    .detail("version", m.version.to_string())
                    .detail("reason", code)
                    .detail("detail", detail.clone()),
            )
            .await;
        self.alerts
            .raise(
                AlertKind::UpdateFailed,
                &format!("release {} refused: {detail}", m.version),
                serde_json::json!({"version": m.version.to_string(), "reason": code}),
            )
            .await;
        self.remember(
            m.release_id,
            m.version.to_string(),
            UpdateOutcome::Refused,
            code,
        );
        self.send_update_reports().await;
    }

    /// Checks, downloads and stages an offered release (see the module docs).
    async fn consider(&mut self, offer: UpdateOffer) {
        let m = offer.manifest.clone();
        let state = &self.vault.state.update;
        if !self.settings.update.enabled
            || state.held
            || state
                .staged
                .as_ref()
                .is_some_and(|(id, _)| *id == m.release_id)
            || state.refused.iter().any(|(id, _)| *id == m.release_id)
        {
            return;
        }
        let staging = self.settings.update.staging.clone();
        let trust_file = self.settings.update.trust_file.clone();
        let (waiting, mut trust) = blocking::run(move || {
            let trust: ReleaseTrust = std::fs::read(&trust_file)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            (staging.is_ready(), trust)
        })
        .await;
        if waiting {
            return;
        }
        let checked = trust
            .verify(&offer, &self.machine.license_keys)
            .and_then(|()| release::applicable(&m, running_version(), ARCH));
        if let Err(e) = checked {
            self.refuse(&offer, e.code(), e.to_string()).await;
            return;
        }
        let staging = self.settings.update.staging.clone();
        let dir = staging.dir().to_path_buf();
        if let Err(e) = blocking::run(move || ensure_dir(&dir, 0o700)).await {
            tracing::error!(error = %e, "cannot create the update staging directory");
            return;
        }
        tracing::info!(version = %m.version, size = m.size, "downloading release");
        let partial = staging.partial();
        let downloaded = self
            .server
            .download_release(m.release_id, &partial, m.size)
            .await;
        let (size, sha256) = match downloaded {
            Ok(got) => got,
            Err(e @ ClientError::Oversized(_)) => {
                let _ = std::fs::remove_file(&partial);
                self.refuse(&offer, "wrong_size", e.to_string()).await;
                return;
            }
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                tracing::warn!(error = %e, version = %m.version, "release download failed; trying again next round");
                return;
            }
        };
        if let Err(e) = release::check_binary(&m, size, &sha256) {
            let _ = std::fs::remove_file(&partial);
            self.refuse(&offer, e.code(), e.to_string()).await;
            return;
        }
        let license_keys = match self.server.license_keys().await {
            Ok(set) => set,
            Err(e) => {
                tracing::warn!(error = %e, "license key set not fetched; staging next round");
                return;
            }
        };
        let bundle = Bundle {
            offer: offer.clone(),
            license_keys,
        };
        let trust_file = self.settings.update.trust_file.clone();
        let staged = blocking::run(move || -> Result<(), String> {
            crate::platform::files::make_executable(&partial).map_err(|e| e.to_string())?;
            rename_durable(&partial, &staging.binary()).map_err(|e| e.to_string())?;
            staging.stage(&bundle).map_err(|e| e.to_string())?;
            let json = serde_json::to_vec_pretty(&trust).expect("trust serializes");
            write_atomic(&trust_file, &json, PRIVATE).map_err(|e| e.to_string())
        })
        .await;
        if let Err(e) = staged {
            tracing::error!(error = %e, "cannot stage the release");
            return;
        }
        self.vault.state.update.staged = Some((m.release_id, m.version.to_string()));
        tracing::info!(version = %m.version, "release checked and staged for the update step");
        self.audit()
            .note(
                agent_event("update.staged", Outcome::Success)
                    .detail("release_id", m.release_id.to_string())
                    .detail("version", m.version.to_string())
                    .detail("sha256", m.sha256.clone())
                    .detail("size", m.size),
            )
            .await;
    }

    /// Audits what the update step left (each step, then the outcome), remembers and
    /// reports it, and removes it.
    async fn collect_update_result(&mut self) {
        let staging = self.settings.update.staging.clone();
        let read = blocking::run(move || staging.read_result()).await;
        let result: UpdateResult = match read {
            Ok(Some(result)) => result,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(error = %e, "the update step's result is unreadable; removed");
                self.settings.update.staging.remove_result();
                return;
            }
        };
        let version = result.version.to_string();
        for step in &result.steps {
            let outcome = if step.detail == "ok" {
                Outcome::Success
            } else {
                Outcome::Error
            };
            self.audit()
                .note(
                    agent_event(&format!("update.{}", step.step), outcome)
                        .detail("release_id", result.release_id.to_string())
                        .detail("version", version.clone())
                        .detail("at", step.at)
                        .detail("detail", step.detail.clone()),
                )
                .await;
        }
        let outcome = match result.outcome {
            UpdateOutcome::Success => Outcome::Success,
            UpdateOutcome::Refused => Outcome::Refused,
            UpdateOutcome::Failed => Outcome::Error,
        };
        self.audit()
            .note(
                agent_event("update.result", outcome)
                    .detail("release_id", result.release_id.to_string())
                    .detail("version", version.clone())
                    .detail("from_version", result.from_version.to_string())
                    .detail("outcome", result.outcome.as_str())
                    .detail("reason", result.reason.clone()),
            )
            .await;
        if result.outcome == UpdateOutcome::Success {
            tracing::info!(version = %version, from = %result.from_version, "updated");
        } else {
            self.alerts
                .raise(
                    AlertKind::UpdateFailed,
                    &format!(
                        "the update to {version} ended {}: {}",
                        result.outcome.as_str(),
                        result.reason
                    ),
                    serde_json::json!({"version": version, "reason": result.reason}),
                )
                .await;
        }
        self.vault.state.update.staged = None;
        self.remember(result.release_id, version, result.outcome, &result.reason);
        if let Some(last) = &mut self.vault.state.update.last {
            last.from_version = result.from_version.to_string();
        }
        // Remembered before the file goes: a crash in between reports it twice, never zero
        // times (the server keeps one report per machine and release).
        self.persist_state().await;
        self.settings.update.staging.remove_result();
    }

    /// Sends the reports the server has not accepted; one it refuses as invalid is dropped.
    async fn send_update_reports(&mut self) {
        let pending = std::mem::take(&mut self.vault.state.update.unreported);
        let mut kept = Vec::new();
        for report in pending {
            match self.server.report_update(&report).await {
                Ok(()) => {}
                Err(ClientError::Refused { status, .. }) if status == 400 || status == 404 => {
                    tracing::warn!(release = %report.release_id, "the server refused an update report; dropped");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "update report not sent; retrying next round");
                    kept.push(report);
                }
            }
        }
        self.vault.state.update.unreported = kept;
    }
}
