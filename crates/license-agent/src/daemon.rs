//! `license-agent run`: opens the audit log, the TPM (recovering through the server if it was
//! cleared), the machine key, the state and the secret store; starts the validation and
//! management sockets; tells systemd it is ready; then runs the engine's rounds until asked to
//! stop, handling management requests and SIGHUP reloads between them.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use license_audit::Outcome;
use license_protocol::license_keys::TrustedKeys;
use license_protocol::rotation::parse_license_public_key;
use rand::Rng as _;
use tokio::sync::watch;

use crate::access::{Access, SharedAccess};
use crate::alerts::{AlertKind, Alerts};
use crate::audit::{agent_event, Audit};
use crate::config::AgentConfig;
use crate::engine::control::{self, ControlReceiver};
use crate::engine::license_keys::TrustFile;
use crate::engine::renewal::{Certificate, IdentityFiles, RenewalError, Settled};
use crate::engine::server::AgentServer;
use crate::engine::state::{AgentState, LoadOutcome, StateFile};
use crate::engine::{Engine, EngineParts, EngineSettings, Machine, Vault};
use crate::net::watch::Signal;
use crate::net::AgentApi;
use crate::platform::blocking;
use crate::platform::clock::GuardedClock;
use crate::platform::host;
use crate::platform::local_socket::BindOptions;
use crate::platform::tpm::{Tpm, TpmError};
use crate::sockets::listener::{Limits, Listener};
use crate::sockets::management::{self, ManagementSocket};
use crate::sockets::validation::ValidationSocket;
use crate::stores::fallback::FallbackStore;
use crate::stores::file::FileStore;
use crate::stores::tpm::TpmStore;
use crate::stores::{SecretStore, StoreError};
use crate::validation::{Keyring, Validator};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    #[error("{key}: {message}")]
    Key { key: &'static str, message: String },
    #[error("secret store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("server client: {0}")]
    Client(#[from] crate::net::ConnectError),
    #[error("TPM recovery failed: {0}")]
    Recovery(#[from] crate::enroll::recovery::RecoveryError),
    #[error("machine certificate: {0}")]
    Certificate(#[from] RenewalError),
    #[error("audit log {path}: {source}")]
    Audit {
        path: String,
        source: license_audit::AuditError,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError + '_ {
    move |source| DaemonError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// systemd's watchdog: pinged at half the interval while the validator's locks can be taken,
/// so a wedged agent gets restarted.
fn start_watchdog(validator: Arc<Validator>) {
    let Some(usec) = host::watchdog_usec() else {
        return;
    };
    let period = Duration::from_micros(usec / 2).max(Duration::from_millis(50));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let validator = validator.clone();
            let alive = tokio::task::spawn_blocking(move || validator.responsive())
                .await
                .unwrap_or(false);
            if alive {
                host::watchdog();
            }
        }
    });
}

/// The sections of the config that changed and only take effect at the next restart.
fn restart_needed(current: &AgentConfig, new: &AgentConfig) -> Vec<&'static str> {
    fn toml_of(section: &impl serde::Serialize) -> String {
        toml::to_string(section).unwrap_or_default()
    }
    let mut restart = Vec::new();
    if toml_of(&current.server) != toml_of(&new.server) {
        restart.push("server");
    }
    if toml_of(&current.tpm) != toml_of(&new.tpm) {
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
    restart
}

/// SIGHUP: re-reads the config. A config that does not load is rejected and the running one
/// kept; otherwise who may use the sockets, the rotation and poll intervals and the degraded
/// policy change at once, and changes that need a restart (paths, server, TPM) are named.
async fn reload<S: AgentServer>(
    path: &Path,
    current: &mut AgentConfig,
    access: &SharedAccess,
    engine: &mut Engine<S>,
    audit: &Audit,
) {
    let new = match AgentConfig::load(path) {
        Ok(new) => new,
        Err(e) => {
            tracing::error!(error = %e, "config reload rejected; keeping the running configuration");
            audit
                .note(agent_event("agent.reload", Outcome::Refused).detail("reason", e.to_string()))
                .await;
            return;
        }
    };
    let restart = restart_needed(current, &new);
    Access::replace(access, &new);
    engine.reconfigure(&new);
    if !restart.is_empty() {
        tracing::warn!(sections = ?restart, "config reloaded; these changes take effect at the next restart");
    }
    tracing::info!("config reloaded");
    audit
        .note(agent_event("agent.reload", Outcome::Success).detail("restart_needed", restart))
        .await;
    *current = new;
}

/// The TPM when configured and answering (re-keyed through the server if it was cleared);
/// otherwise `None`, with an alert, and the file store serves.
async fn open_tpm(config: &AgentConfig, alerts: &Alerts) -> Result<Option<Arc<Tpm>>, DaemonError> {
    if !config.tpm.enabled {
        return Ok(None);
    }
    let audit = alerts.audit();
    let opened = match Tpm::open_exclusive(&config.tpm.tcti, &config.agent.state_dir) {
        Err(TpmError::PrimaryMismatch) => {
            alerts
                .raise(
                    AlertKind::TpmCleared,
                    "the TPM was cleared or replaced (its primary key changed): recovering through the server",
                    serde_json::json!({}),
                )
                .await;
            match crate::enroll::recovery::recover(config).await {
                Ok((tpm, serial)) => {
                    audit
                        .note(
                            agent_event("machine.recover", Outcome::Success)
                                .detail("serial", serial.clone()),
                        )
                        .await;
                    tracing::error!(%serial, "ALERT: recovered through the server: new machine key in the TPM, new certificate; a new secret follows at the next rotation");
                    Ok(tpm)
                }
                Err(e) => {
                    audit
                        .note(
                            agent_event("machine.recover", Outcome::Error)
                                .detail("reason", e.to_string()),
                        )
                        .await;
                    return Err(e.into());
                }
            }
        }
        other => other,
    };
    match opened {
        Ok(tpm) => {
            tracing::info!(tcti = %config.tpm.tcti, primary = %hex::encode(tpm.primary_name()), "TPM ready");
            Ok(Some(tpm))
        }
        Err(e) => {
            alerts
                .raise(
                    AlertKind::TpmUnavailable,
                    "TPM unavailable; using the encrypted file store",
                    serde_json::json!({"reason": e.to_string(), "tcti": config.tpm.tcti}),
                )
                .await;
            Ok(None)
        }
    }
}

/// `state.json`, recovered or rebuilt when it is corrupt (said in the log, never silently).
fn load_state(config: &AgentConfig) -> (StateFile, AgentState) {
    let file = StateFile::new(&config.agent.state_dir);
    let (state, outcome) = file.load();
    match &outcome {
        LoadOutcome::RecoveredFromBackup { corrupt_kept_at } => {
            tracing::error!(state = %file.path().display(), kept = %corrupt_kept_at.display(), "state.json was corrupt; recovered from state.json.bak")
        }
        LoadOutcome::Rebuilt { corrupt_kept_at } => {
            tracing::error!(state = %file.path().display(), kept = ?corrupt_kept_at, "state.json and its backup were unusable; rebuilt from the secret store")
        }
        LoadOutcome::Fresh | LoadOutcome::Loaded => {}
    }
    (file, state)
}

/// Checks the audit log against the anchor the last run saved (its last `(seq, hash)` in
/// state.json): a log cut short, an entry replaced, or files removed since show here, and raise
/// the `audit_log_tampered` alert. The agent starts all the same: the alert and its own audit
/// record are the evidence, and refusing to start would only stop the tills.
/// Checks the audit log against the anchor the previous run saved; false (and an alert) when
/// it does not reach it or differs.
async fn check_audit_anchor(path: &std::path::Path, state: &AgentState, alerts: &Alerts) -> bool {
    let Some((seq, hash)) = state.audit_anchor.clone() else {
        return true;
    };
    let anchor = license_audit::Anchor { seq, hash };
    let checked = {
        let path = path.to_path_buf();
        blocking::run(move || license_audit::verify_with_anchor(&path, &anchor)).await
    };
    let problem = match checked {
        Ok(report) => match report.problem {
            Some(problem) => problem.to_string(),
            None => return true,
        },
        Err(e) => e.to_string(),
    };
    tracing::error!(%problem, "the audit log does not match its anchor in state.json");
    alerts
        .raise(
            AlertKind::AuditLogTampered,
            "the audit log does not match the anchor saved by the last run",
            serde_json::json!({"problem": problem, "anchor_seq": seq}),
        )
        .await;
    false
}

/// The clock for expiry decisions, never earlier than the latest time this machine has seen
/// attested: the high-water mark and the server's last time (state.json), the audit log's
/// last entry, the newest secret's `valid_from` (signed by the server). Losing state.json
/// therefore does not reopen a rollback.
/// Also returns the rollback found (seconds), if any.
fn guarded_clock(
    state: &AgentState,
    audit_floor: Option<i64>,
    keyring: &Keyring,
) -> (GuardedClock, Option<i64>) {
    let floor = [
        Some(state.clock_high_water),
        state.server_time,
        audit_floor,
        keyring.versions().map(|(_, d)| d.valid_from).max(),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(0);
    let (clock, rollback) = GuardedClock::new(floor);
    if let Some(secs) = rollback {
        tracing::error!(secs, "ALERT: the system clock is behind the latest time this machine has seen (by {secs} s); expiry decisions keep the later time");
    }
    (clock, rollback)
}

/// The secret store: the TPM's when there is one, the encrypted file otherwise.
fn open_store(
    config: &AgentConfig,
    tpm: Option<Arc<Tpm>>,
) -> Result<Arc<dyn SecretStore>, DaemonError> {
    let machine_id = config.agent.id;
    let file = FileStore::open(
        &config.tpm.fallback_encrypted_storage,
        &config.tpm.fallback_key_file,
        config.tpm.pbkdf2_iterations,
        machine_id,
    )?;
    let tpm = tpm.map(|tpm| TpmStore::new(tpm, &config.tpm.sealed_storage, machine_id));
    Ok(Arc::new(FallbackStore::new(tpm, file)))
}

/// The validation socket and the management socket, serving until `stop`.
struct Sockets {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    control: ControlReceiver,
}

fn start_sockets(
    config: &AgentConfig,
    validator: &Arc<Validator>,
    alerts: &Alerts,
    access: &SharedAccess,
    stop: &watch::Receiver<bool>,
) -> Result<Sockets, DaemonError> {
    let idle_timeout = Duration::from_secs(config.ipc.idle_timeout);
    let mut allowed = config.ipc.allowed_sids.clone();
    allowed.extend(config.ipc.allowed_groups.iter().cloned());
    let options = BindOptions {
        mode: config.ipc.socket_mode.0,
        gid: crate::platform::files::socket_gid(&config.ipc)?,
        sids: Some(allowed),
    };
    let validation =
        Listener::bind(&config.ipc.socket, &options).map_err(io_error(&config.ipc.socket))?;
    let validation_task = tokio::spawn(validation.serve(
        Arc::new(ValidationSocket {
            validator: validator.clone(),
            audit: alerts.audit().clone(),
            alerts: alerts.clone(),
            audit_validations: !config.agent.danger_unaudited_validations,
            access: access.clone(),
            refusals: Default::default(),
        }),
        Limits {
            max_connections: config.ipc.max_connections,
            // Half the slots for one uid: a flood from one user leaves the POS application
            // (another uid) the other half.
            max_per_uid: (config.ipc.max_connections / 2).max(1),
            reserved: 0,
            idle_timeout,
        },
        stop.clone(),
    ));
    let token = match &config.management.token_file {
        Some(path) => Some(zeroize::Zeroizing::new(
            std::fs::read_to_string(path).map_err(io_error(path))?,
        )),
        None => None,
    };
    let (control, control_rx) = control::channel();
    // Anyone may connect: roles are decided per peer, and a peer without one gets one answer
    // and is closed (root must reach it whatever the file's owner and group).
    let anyone = BindOptions {
        mode: 0o666,
        gid: None,
        sids: None,
    };
    let mgmt = Listener::bind(&config.management.socket, &anyone)
        .map_err(io_error(&config.management.socket))?;
    let mgmt_task = tokio::spawn(mgmt.serve(
        Arc::new(ManagementSocket {
            access: access.clone(),
            token,
            metrics_file: config.agent.metrics_file.clone(),
            audit: alerts.audit().clone(),
            alerts: alerts.clone(),
            validator: validator.clone(),
            control,
        }),
        Limits {
            max_connections: management::MAX_CONNECTIONS,
            max_per_uid: management::MAX_CONNECTIONS_PER_UID,
            reserved: management::RESERVED_FOR_ADMINS,
            idle_timeout,
        },
        stop.clone(),
    ));
    Ok(Sockets {
        tasks: vec![validation_task, mgmt_task],
        control: control_rx,
    })
}

/// What a watch stream signal does to the round scheduled at `deadline`: the new time of the
/// next round, if it moves.
fn next_round<S: AgentServer>(
    signal: Signal,
    engine: &mut Engine<S>,
    deadline: tokio::time::Instant,
) -> Option<tokio::time::Instant> {
    let now = tokio::time::Instant::now();
    match signal {
        Signal::Connected => {
            engine.set_watching(true);
            None
        }
        // Back to polling (`Engine::stream_lost`), the round at a random point of the next
        // poll interval: a fleet that lost its streams together does not come back together.
        Signal::Lost => {
            engine.stream_lost();
            let interval = engine.settings().poll_interval.saturating_mul(1_000);
            let poll = now + Duration::from_millis(rand::thread_rng().gen_range(0..=interval));
            (poll < deadline).then_some(poll)
        }
        Signal::Round { delay, .. } => {
            engine.request_round();
            (now + delay < deadline).then_some(now + delay)
        }
    }
}

/// Runs the agent until `shutdown` completes.
pub async fn run(
    config: AgentConfig,
    config_path: PathBuf,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    // Before any key or secret is read.
    if let Err(e) = crate::platform::hardening::make_non_dumpable() {
        tracing::error!(error = %e, "cannot make the process non-dumpable");
    }
    let machine_id = config.agent.id;
    // Nothing is answered that cannot be audited: no log, no start.
    let audit_path = config.audit_log_path();
    // Read before this run writes to it: the last time the log saw is a floor for "now".
    let audit_floor = license_audit::last_entry_time(&audit_path).ok().flatten();
    let options = license_audit::LogOptions {
        max_file_bytes: config.agent.audit_max_file_bytes,
        keep_files: config.agent.audit_keep_files,
        ..license_audit::LogOptions::default()
    };
    let audit = Audit::open_with(&audit_path, options).map_err(|source| DaemonError::Audit {
        path: audit_path.display().to_string(),
        source,
    })?;
    audit
        .note(
            agent_event("agent.start", Outcome::Success)
                .detail("version", env!("CARGO_PKG_VERSION")),
        )
        .await;
    let alerts = Alerts::new(
        audit.clone(),
        machine_id.to_string(),
        config.alerts.webhook_url.clone(),
        config.alerts.webhook_retries,
    );
    let tpm = open_tpm(&config, &alerts).await?;
    let identity = IdentityFiles::from_config(&config);
    if let Settled::Promoted { serial } = identity.settle()? {
        tracing::warn!(%serial, "finished a certificate renewal interrupted by a crash");
    }
    let certificate = Certificate::read(&config.server.client_cert)?;
    let machine_key =
        crate::platform::keys::load(&config, tpm.clone()).map_err(|e| DaemonError::Key {
            key: "server.client_key",
            message: e.to_string(),
        })?;
    let license_key =
        parse_license_public_key(&config.server.license_public_key).ok_or(DaemonError::Key {
            key: "server.license_public_key",
            message: "not an ed25519:<base64> key".into(),
        })?;
    let (state_file, state) = load_state(&config);
    let audit_chain_ok = check_audit_anchor(&audit_path, &state, &alerts).await;
    let store = open_store(&config, tpm.clone())?;
    // Secrets live in pages locked in RAM; say so now if this process may not lock memory.
    if !license_protocol::secret::Secret::from_bytes([0; 32]).is_locked() {
        tracing::warn!(
            "cannot lock memory in RAM (RLIMIT_MEMLOCK): secrets may be written to swap"
        );
    }
    let mut keyring = Keyring::default();
    let loading = store.clone();
    for s in blocking::run(move || loading.load()).await? {
        keyring.insert(s.version, s.dates, s.secret);
    }
    let (clock, clock_rollback) = guarded_clock(&state, audit_floor, &keyring);
    let trust_file = TrustFile::new(&config.agent.state_dir);
    let license_keys = trust_file.load(license_key).unwrap_or_else(|e| {
        // Public keys only: starting again from the pin loses nothing the server cannot resend.
        tracing::error!(error = %e, "license-keys.json is unusable; trusting the pinned key and re-learning the set");
        TrustedKeys::pinned(license_key)
    });
    let validator = Arc::new(Validator::new(
        machine_id,
        license_keys.clone(),
        Arc::new(clock),
        config.ipc.replay_window,
        config.agent.degraded_mode,
    ));
    validator.set_keyring(keyring);
    validator.set_invalidated(state.invalidated_versions.clone());
    validator.set_revoked(state.revoked_licenses.iter().copied());

    let server = AgentApi::connect(&config, machine_key.clone())?;
    let connection = server.connection();
    let (stop_tx, stop_rx) = watch::channel(false);
    let access = Access::shared(&config);
    let sockets = start_sockets(&config, &validator, &alerts, &access, &stop_rx)?;
    let store_kind = store.kind();
    let machine = Machine {
        id: machine_id,
        client_id: config.agent.client_id,
        key: machine_key.clone(),
        license_keys,
        certificate,
        server_trust: server.trust(),
    };
    let mut engine = Engine::new(EngineParts {
        server,
        machine,
        vault: Vault {
            store,
            state_file,
            state,
        },
        validator: validator.clone(),
        settings: EngineSettings::from_config(&config),
        tpm,
        alerts,
    });
    engine.set_start_findings(clock_rollback, audit_chain_ok);

    host::ready();
    start_watchdog(validator);
    let mut reloads = host::Reloads::listen().map_err(io_error(Path::new("SIGHUP")))?;
    tracing::info!(socket = %config.ipc.socket.display(), machine = %machine_id, store = store_kind,
        machine_key = machine_key.kind(), "license-agent ready");
    println!(
        "license-agent ready: socket {}",
        config.ipc.socket.display()
    );

    let mut config = config;
    let mut control = sockets.control;
    // The watch stream: changes pushed by the server bring the next round forward.
    let (watch_tx, mut watch_rx) = tokio::sync::mpsc::channel(16);
    let watcher = config.agent.watch.then(|| {
        tokio::spawn(crate::net::watch::hold(
            connection,
            engine.watch_cursor(),
            watch_tx,
        ))
    });
    tokio::pin!(shutdown);
    'rounds: loop {
        // A round waiting on a hung server must not hold up a stop (systemd would escalate to
        // SIGKILL). Dropping it at an await point leaves memory as durable as after a failed
        // request: the keyring is only ever replaced together with the store.
        let wait = tokio::select! {
            wait = engine.tick() => wait,
            () = &mut shutdown => break 'rounds,
        };
        host::status(&engine.status_line());
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut shutdown => break 'rounds,
                () = &mut sleep => break,
                Some(signal) = watch_rx.recv() => {
                    if let Some(at) = next_round(signal, &mut engine, sleep.deadline()) {
                        sleep.as_mut().reset(at);
                    }
                }
                Some(request) = control.recv() => engine.control(request).await,
                () = reloads.recv() => {
                    host::reloading();
                    reload(&config_path, &mut config, &access, &mut engine, &audit).await;
                    host::reloaded();
                }
            }
        }
    }
    host::stopping();
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    let _ = stop_tx.send(true);
    for task in sockets.tasks {
        let _ = task.await;
    }
    audit
        .note(agent_event("agent.stop", Outcome::Success))
        .await;
    // Last: the anchor now names the log's true end.
    engine.persist().await;
    Ok(())
}
