//! `license-agent run`: loads keys, state and secrets, opens the validation socket, tells
//! systemd it is ready, and runs the rotation manager until asked to stop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use license_protocol::rotation::parse_license_public_key;

use crate::alerts::{AlertKind, Alerts};
use crate::audit::{agent_event, Audit};
use crate::clock::GuardedClock;
use crate::config::AgentConfig;
use crate::enroll::agent_client;
use crate::ipc::{self, IpcSettings};
use crate::rotation::{RotationManager, RotationSettings};
use crate::secrets::fallback::FallbackStore;
use crate::secrets::file::FileStore;
use crate::secrets::tpm::TpmStore;
use crate::secrets::{SecretStore, StoreError};
use crate::state::{LoadOutcome, StateFile};
use crate::validator::{Keyring, Validator};
use license_audit::Outcome;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    #[error("{key}: {message}")]
    Key { key: &'static str, message: String },
    #[error("secret store: {0}")]
    Store(#[from] StoreError),
    #[error("validation socket {path}: {source}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
    #[error("server client: {0}")]
    Client(String),
    #[error("TPM recovery failed: {0}")]
    Recovery(String),
    #[error("audit log {0}")]
    Audit(String),
}

/// `WATCHDOG_USEC` as sd_watchdog_enabled(3) reads it: the interval, unless `WATCHDOG_PID`
/// names another process.
fn watchdog_usec() -> Option<u64> {
    let usec = std::env::var("WATCHDOG_USEC")
        .ok()?
        .parse::<u64>()
        .ok()
        .filter(|u| *u > 0)?;
    match std::env::var("WATCHDOG_PID").ok().map(|p| p.parse::<u32>()) {
        Some(Ok(pid)) if pid != std::process::id() => None,
        _ => Some(usec),
    }
}

/// SIGHUP: re-reads the config. A config that does not load is rejected and the running one
/// kept; otherwise who may use the sockets, the rotation and poll intervals and the degraded
/// policy change at once, and changes that need a restart (paths, server, TPM) are named.
fn reload(
    path: &std::path::Path,
    current: &mut AgentConfig,
    access: &crate::access::SharedAccess,
    manager: &mut RotationManager,
    audit: &Audit,
) {
    let new = match AgentConfig::load(path) {
        Ok(new) => new,
        Err(e) => {
            tracing::error!(error = %e, "config reload rejected; keeping the running configuration");
            audit.note(
                agent_event("agent.reload", Outcome::Refused).detail("reason", e.to_string()),
            );
            return;
        }
    };
    let mut restart = Vec::new();
    let same = |a: String, b: String| a == b;
    if !same(
        toml::to_string(&current.server).unwrap_or_default(),
        toml::to_string(&new.server).unwrap_or_default(),
    ) {
        restart.push("server");
    }
    if !same(
        toml::to_string(&current.tpm).unwrap_or_default(),
        toml::to_string(&new.tpm).unwrap_or_default(),
    ) {
        restart.push("tpm");
    }
    if current.ipc.socket != new.ipc.socket
        || current.management.socket != new.management.socket
        || current.management.token_file != new.management.token_file
    {
        restart.push("sockets");
    }
    if current.agent.state_dir != new.agent.state_dir
        || current.agent.log_dir != new.agent.log_dir
        || current.audit_log_path() != new.audit_log_path()
        || current.agent.metrics_file != new.agent.metrics_file
    {
        restart.push("paths");
    }
    *access.write().unwrap_or_else(|e| e.into_inner()) = crate::access::Access::from_config(&new);
    manager.reconfigure(&new);
    if !restart.is_empty() {
        tracing::warn!(sections = ?restart, "config reloaded; these changes take effect at the next restart");
    }
    tracing::info!("config reloaded");
    audit.note(agent_event("agent.reload", Outcome::Success).detail(
        "restart_needed",
        restart.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    ));
    *current = new;
}

/// Runs the agent until `shutdown` completes.
pub async fn run(
    config: AgentConfig,
    config_path: std::path::PathBuf,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    // Before any key or secret is read.
    if let Err(e) = crate::hardening::make_non_dumpable() {
        tracing::error!(error = %e, "cannot make the process non-dumpable");
    }
    let machine_id = config.agent.id;
    // Nothing is answered that cannot be audited: no log, no start.
    let audit_path = config.audit_log_path();
    let audit = Audit::open(&audit_path)
        .map_err(|e| DaemonError::Audit(format!("{}: {e}", audit_path.display())))?;
    audit.note(
        agent_event("agent.start", Outcome::Success).detail("version", env!("CARGO_PKG_VERSION")),
    );
    let alerts = Alerts::new(
        audit.clone(),
        machine_id.to_string(),
        config.alerts.webhook_url.clone(),
        config.alerts.webhook_retries,
    );
    // The TPM, when configured and answering; otherwise the file store, with an alert.
    let tpm = if config.tpm.enabled {
        let opened = match crate::tpm::Tpm::open_exclusive(
            &config.tpm.tcti,
            &config.agent.state_dir,
        ) {
            Err(crate::tpm::TpmError::PrimaryMismatch) => {
                alerts.raise(
                    AlertKind::TpmCleared,
                    "the TPM was cleared or replaced (its primary key changed): recovering through the server",
                    serde_json::json!({}),
                );
                match crate::recovery::recover(&config).await {
                    Ok((tpm, serial)) => {
                        audit.note(
                            agent_event("machine.recover", Outcome::Success)
                                .detail("serial", serial.clone()),
                        );
                        tracing::error!(%serial, "ALERT: recovered through the server: new machine key in the TPM, new certificate; a new secret follows at the next rotation");
                        Ok(tpm)
                    }
                    Err(e) => {
                        audit.note(
                            agent_event("machine.recover", Outcome::Error)
                                .detail("reason", e.to_string()),
                        );
                        return Err(DaemonError::Recovery(e.to_string()));
                    }
                }
            }
            other => other,
        };
        match opened {
            Ok(tpm) => {
                tracing::info!(tcti = %config.tpm.tcti, primary = %hex::encode(tpm.primary_name()), "TPM ready");
                Some(tpm)
            }
            Err(e) => {
                alerts.raise(
                    AlertKind::TpmUnavailable,
                    "TPM unavailable; using the encrypted file store",
                    serde_json::json!({"reason": e.to_string(), "tcti": config.tpm.tcti}),
                );
                None
            }
        }
    } else {
        None
    };
    let machine_key = crate::keys::load(&config, tpm.clone()).map_err(|e| DaemonError::Key {
        key: "server.client_key",
        message: e.to_string(),
    })?;
    let key_kind = machine_key.kind();
    let license_key =
        parse_license_public_key(&config.server.license_public_key).ok_or(DaemonError::Key {
            key: "server.license_public_key",
            message: "not an ed25519:<base64> key".into(),
        })?;

    let state_file = StateFile::new(&config.agent.state_dir);
    let (state, outcome) = state_file.load();
    match &outcome {
        LoadOutcome::RecoveredFromBackup { corrupt_kept_at } => {
            tracing::error!(state = %state_file.path().display(), kept = %corrupt_kept_at.display(), "state.json was corrupt; recovered from state.json.bak")
        }
        LoadOutcome::Rebuilt { corrupt_kept_at } => {
            tracing::error!(state = %state_file.path().display(), kept = ?corrupt_kept_at, "state.json and its backup were unusable; rebuilt from the secret store")
        }
        LoadOutcome::Fresh | LoadOutcome::Loaded => {}
    }
    let (clock, rollback) = GuardedClock::new(state.clock_high_water);
    if let Some(secs) = rollback {
        tracing::error!(secs, "ALERT: the system clock is behind the last time seen; expiry decisions keep the later time");
    }
    let clock = Arc::new(clock);

    let file_store = FileStore::open(
        &config.tpm.fallback_encrypted_storage,
        &config.tpm.fallback_key_file,
        config.tpm.pbkdf2_iterations,
        machine_id,
    )?;
    let tpm_store = tpm
        .clone()
        .map(|tpm| TpmStore::new(tpm, &config.tpm.sealed_storage, machine_id));
    let store: Box<dyn SecretStore> = Box::new(FallbackStore::new(tpm_store, file_store));
    let store_kind = store.kind();
    // Secrets live in pages locked in RAM; say so now if this process may not lock memory.
    if !license_protocol::secret::Secret::from_bytes([0; 32]).is_locked() {
        tracing::warn!(
            "cannot lock memory in RAM (RLIMIT_MEMLOCK): secrets may be written to swap"
        );
    }
    let mut keyring = Keyring::default();
    for s in store.load()? {
        keyring.insert(s.version, s.dates, s.secret);
    }

    let validator = Arc::new(Validator::new(
        machine_id,
        license_key,
        clock,
        config.ipc.replay_window,
        config.agent.degraded_mode,
    ));
    validator.set_keyring(keyring);
    validator.set_invalidated(state.invalidated_versions.clone());
    validator.set_revoked(state.revoked_licenses.iter().copied());

    let listener = ipc::bind(&config.ipc.socket).map_err(|source| DaemonError::Socket {
        path: config.ipc.socket.display().to_string(),
        source,
    })?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let access = crate::access::Access::shared(&config);
    let settings = IpcSettings {
        stop: stop_rx.clone(),
        audit: audit.clone(),
        alerts: alerts.clone(),
        audit_validations: !config.agent.danger_unaudited_validations,
        access: access.clone(),
        max_connections: config.ipc.max_connections,
        idle_timeout: Duration::from_secs(config.ipc.idle_timeout),
    };
    let ipc_task = tokio::spawn(ipc::serve(
        listener,
        validator.clone(),
        settings,
        stopped(stop_rx.clone()),
    ));

    let validator_for_mgmt = validator.clone();
    let client = agent_client(&config, machine_key.clone())
        .map_err(|e| DaemonError::Client(e.to_string()))?;
    let mut manager = RotationManager::new(
        machine_id,
        machine_key,
        license_key,
        client,
        store,
        state_file,
        state,
        validator,
        RotationSettings {
            rotation_interval: config.agent.rotation_interval,
            poll_interval: config
                .agent
                .poll_interval
                .min(config.agent.rotation_interval.max(1)),
            tokens_dir: config.agent.state_dir.join("tokens"),
            metrics_file: config.agent.metrics_file.clone(),
            degraded_policy: config.agent.degraded_mode,
            client_id: config.agent.client_id,
        },
        tpm,
        alerts.clone(),
    );
    // The management socket (license-agent-cli); its actions reach the manager by `control`.
    let token = match &config.management.token_file {
        Some(path) => Some(zeroize::Zeroizing::new(
            std::fs::read_to_string(path).map_err(|source| DaemonError::Socket {
                path: path.display().to_string(),
                source,
            })?,
        )),
        None => None,
    };
    let mgmt_listener =
        ipc::bind(&config.management.socket).map_err(|source| DaemonError::Socket {
            path: config.management.socket.display().to_string(),
            source,
        })?;
    let (control_tx, mut control_rx) = tokio::sync::mpsc::channel(8);
    let mgmt_settings = std::sync::Arc::new(crate::mgmt::MgmtSettings {
        access: access.clone(),
        token,
        metrics_file: config.agent.metrics_file.clone(),
        idle_timeout: Duration::from_secs(config.ipc.idle_timeout),
        audit: audit.clone(),
        alerts: alerts.clone(),
        validator: validator_for_mgmt,
        control: control_tx,
    });
    let mgmt_task = tokio::spawn(crate::mgmt::serve(
        mgmt_listener,
        mgmt_settings,
        stopped(stop_rx.clone()),
    ));

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    // systemd's watchdog (WATCHDOG_USEC): pinged at half the interval while the validator's
    // locks can be taken, so a wedged agent gets restarted.
    if let Some(watchdog_usec) = watchdog_usec() {
        let validator = manager.validator.clone();
        let period = Duration::from_micros(watchdog_usec / 2).max(Duration::from_millis(50));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let validator = validator.clone();
                let alive = tokio::task::spawn_blocking(move || validator.responsive())
                    .await
                    .unwrap_or(false);
                if alive {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                }
            }
        });
    }
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|source| DaemonError::Socket {
            path: "SIGHUP".into(),
            source,
        })?;
    let mut config = config;
    tracing::info!(socket = %config.ipc.socket.display(), machine = %machine_id, store = store_kind,
        machine_key = key_kind, "license-agent ready");
    println!(
        "license-agent ready: socket {}",
        config.ipc.socket.display()
    );

    tokio::pin!(shutdown);
    'rounds: loop {
        // A round waiting on a hung server must not hold up a stop (systemd would escalate to
        // SIGKILL). Dropping it at an await point leaves memory as durable as after a failed
        // request: the keyring is only ever replaced together with the store.
        let wait = tokio::select! {
            wait = manager.tick() => wait,
            () = &mut shutdown => break 'rounds,
        };
        let _ = sd_notify::notify(
            false,
            &[sd_notify::NotifyState::Status(&manager.status_line())],
        );
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut shutdown => break 'rounds,
                () = &mut sleep => break,
                Some(request) = control_rx.recv() => manager.control(request).await,
                _ = hangup.recv() => {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
                    reload(&config_path, &mut config, &access, &mut manager, &audit);
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
                }
            }
        }
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    let _ = ipc_task.await;
    let _ = mgmt_task.await;
    let _ = std::fs::remove_file(&config.management.socket);
    audit.note(agent_event("agent.stop", Outcome::Success));
    // Last: the anchor now names the log's true end.
    manager.persist_state();
    let _ = std::fs::remove_file(&config.ipc.socket);
    Ok(())
}
