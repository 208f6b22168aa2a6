//! The `license-agent` commands behind the command line: what each does and prints (human
//! text, or JSON with `--json`), and the exit code each failure maps to.
//!
//! Exit codes: 0 success; 1 runtime failure (network, I/O; an update refused or rolled back);
//! 2 bad usage or configuration;
//! 3 refused by the server (token used/expired/unknown, machine revoked, …); 4 already enrolled.

use std::path::{Path, PathBuf};

use license_protocol::enroll::{FieldError, InstallToken};
use license_protocol::identity::MachineIdentity;

use crate::config::{
    AgentConfig, ConfigError, DEFAULT_CONFIG_PATH, DEFAULT_LOG_DIR, DEFAULT_STATE_DIR,
};
use crate::daemon::{self, DaemonError};
use crate::engine::renewal::{self, IdentityFiles, RenewalError};
use crate::engine::state::StateFile;
use crate::enroll::{self, EnrollError, EnrollOptions};
use crate::net::client::ClientError;
use crate::net::{agent_client, AgentApi, ConnectError};
use crate::platform::clock::rfc3339;
use crate::platform::keys::{self, KeyError};
use license_protocol::pin::CertPin;

/// Why a command failed; [`CommandError::exit_code`] says how the process exits.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{key}: {path}: {source}")]
    MissingFile {
        key: &'static str,
        path: String,
        source: std::io::Error,
    },
    /// The install token given is not one (the message names the field).
    #[error(transparent)]
    Token(#[from] FieldError),
    #[error(transparent)]
    Enroll(#[from] EnrollError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Server(#[from] ClientError),
    #[error(transparent)]
    Renewal(#[from] RenewalError),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error("update step: {0}")]
    Update(#[from] crate::update::apply::ApplyError),
    /// Windows: the installer could not finish (the message says which step).
    #[cfg(windows)]
    #[error(transparent)]
    Install(#[from] crate::enroll::installer::InstallError),
    /// Windows: the service control manager refused or timed out.
    #[cfg(windows)]
    #[error(transparent)]
    Service(#[from] crate::platform::windows::service::ServiceError),
    /// The update step ran and the release was refused or rolled back.
    #[error("the update to {version} ended {outcome} ({reason}); the previous version runs")]
    UpdateNotApplied {
        version: String,
        outcome: &'static str,
        reason: String,
    },
}

impl CommandError {
    pub fn exit_code(&self) -> u8 {
        const RUNTIME: u8 = 1;
        const USAGE: u8 = 2;
        const REFUSED: u8 = 3;
        const ALREADY_ENROLLED: u8 = 4;
        match self {
            CommandError::Config(_) | CommandError::MissingFile { .. } | CommandError::Token(_) => {
                USAGE
            }
            CommandError::Enroll(EnrollError::AlreadyEnrolled(_)) => ALREADY_ENROLLED,
            CommandError::Enroll(EnrollError::Hardware(_)) => USAGE,
            CommandError::Enroll(
                EnrollError::Server(ClientError::Refused { .. }) | EnrollError::BadAnswer(_),
            )
            | CommandError::Server(ClientError::Refused { .. })
            | CommandError::Renewal(RenewalError::Server(ClientError::Refused { .. })) => REFUSED,
            #[cfg(windows)]
            CommandError::Install(e) => {
                use crate::enroll::installer::InstallError;
                match e {
                    InstallError::Trailer(_) => USAGE,
                    InstallError::Enroll(
                        EnrollError::Server(ClientError::Refused { .. })
                        | EnrollError::BadAnswer(_),
                    ) => REFUSED,
                    _ => RUNTIME,
                }
            }
            _ => RUNTIME,
        }
    }
}

fn load(path: &Path) -> Result<AgentConfig, CommandError> {
    Ok(AgentConfig::load(path)?)
}

fn print_json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".into())
    );
}

/// `--config PATH`.
#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
}

/// `--config PATH` and `--json`.
#[derive(Debug, clap::Args)]
pub struct ConfigAndOutput {
    #[command(flatten)]
    pub config: ConfigArg,
    #[arg(long)]
    pub json: bool,
}

/// `license-agent enroll`.
#[derive(Debug, clap::Args)]
pub struct EnrollArgs {
    /// Public URL of the license server, e.g. `https://licenses.example.com:8443`
    #[arg(long, value_name = "URL")]
    server: String,
    /// Pin of the server's key, `sha256:<base64>` (printed by `license-server init`).
    #[arg(long, value_name = "PIN")]
    server_pin: CertPin,
    /// The install token (or set LICENSE_AGENT_TOKEN so it stays out of `ps`).
    #[arg(long, env = "LICENSE_AGENT_TOKEN", hide_env_values = true)]
    token: String,
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[arg(long, value_name = "DIR", default_value = DEFAULT_LOG_DIR)]
    log_dir: PathBuf,
    /// Override the detected hostname.
    #[arg(long)]
    hostname: Option<String>,
    /// Override the detected hardware id (DMI product UUID or /etc/machine-id).
    #[arg(long)]
    hardware_id: Option<String>,
    /// Let the server generate the key pair (seed mode) instead of sending a CSR.
    #[arg(long)]
    server_generated_key: bool,
    /// Enroll again even if a config exists (same hardware id → same machine, new key and
    /// certificate; the machine's current key, when still usable, signs the request).
    #[arg(long)]
    force: bool,
    /// Validation socket for POS applications [default: /run/license-agent/agent.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// UID allowed to validate licenses on the socket (repeatable; the POS application's user).
    #[arg(long = "allow-uid", value_name = "UID")]
    allowed_uids: Vec<u32>,
    /// Group of the validation socket file (name or number), whose members may connect (the
    /// socket is 0660) [default: the agent's primary group].
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Windows: SID of a user allowed to validate licenses on the pipe (repeatable).
    #[arg(long = "allow-sid", value_name = "SID")]
    allowed_sids: Vec<String>,
    /// Windows: SID of a group whose members may validate licenses on the pipe (repeatable;
    /// e.g. S-1-5-32-545, BUILTIN\Users).
    #[arg(long = "allow-group", value_name = "SID")]
    allowed_groups: Vec<String>,
    /// Make the machine key inside the TPM (non-exportable) reached through this TCTI,
    /// e.g. `device:/dev/tpmrm0`; also enables the TPM secret store.
    #[arg(long, value_name = "TCTI")]
    tpm: Option<String>,
    #[arg(long)]
    json: bool,
}

impl EnrollArgs {
    fn options(self, token: InstallToken) -> EnrollOptions {
        EnrollOptions {
            server: self.server,
            pin: self.server_pin,
            token,
            config_path: self.config,
            state_dir: self.state_dir,
            log_dir: self.log_dir,
            hostname: self.hostname,
            hardware_id: self.hardware_id,
            server_generated_key: self.server_generated_key,
            force: self.force,
            socket: self.socket,
            allowed_uids: self.allowed_uids,
            socket_group: self.socket_group,
            allowed_sids: self.allowed_sids,
            allowed_groups: self.allowed_groups,
            tpm_tcti: self.tpm,
        }
    }
}

/// `enroll`: the token is parsed here so a bad one is a usage error, not a server refusal.
pub async fn enroll(mut args: EnrollArgs) -> Result<(), CommandError> {
    let token = InstallToken::try_from(std::mem::take(&mut args.token))?;
    let json = args.json;
    let opts = args.options(token);
    if !json {
        eprintln!("Enrolling with {} (pinned {})…", opts.server, opts.pin);
    }
    let report = enroll::enroll(opts).await?;
    if json {
        print_json(&report);
    } else {
        println!(
            "Enrolled machine {} (client {})",
            report.machine_id, report.client_id
        );
        println!(
            "  certificate  serial {} (key generated {}), expires {}",
            report.serial, report.key_origin, report.certificate_expires_at
        );
        println!("  agent API    {}", report.api_url);
        println!("  config       {}", report.config.display());
    }
    Ok(())
}

/// `run`: the daemon, until SIGTERM or SIGINT.
pub async fn run(config_path: PathBuf) -> Result<(), CommandError> {
    let config = load(&config_path)?;
    let shutdown = crate::platform::host::shutdown_requested().map_err(CommandError::Signal)?;
    daemon::run(config, config_path, shutdown).await?;
    Ok(())
}

/// `status`: what `state.json` says (no daemon needed).
pub fn status(config_path: &Path, json: bool) -> Result<(), CommandError> {
    let config = load(config_path)?;
    let (state, _) = StateFile::new(&config.agent.state_dir).load_readonly();
    if json {
        print_json(&serde_json::json!({
            "machine_id": config.agent.id,
            "store": state.store,
            "tpm_enabled": config.tpm.enabled,
            "tpm_available": state.tpm_available,
            "secrets": state.secrets,
            "invalidated_versions": state.invalidated_versions,
            "last_rotation": state.last_rotation,
            "next_rotation_due": state.next_rotation_due,
            "last_server_contact": state.last_server_contact,
            "consecutive_failures": state.consecutive_failures,
            "degraded_since": state.degraded_since,
        }));
        return Ok(());
    }
    let t = |v: Option<i64>| v.map_or_else(|| "-".to_string(), rfc3339);
    println!("machine          {}", config.agent.id);
    println!(
        "secret store     {}{}",
        if state.store.is_empty() {
            "-"
        } else {
            &state.store
        },
        if config.tpm.enabled && !state.tpm_available {
            " (TPM configured but unavailable: fallback)"
        } else {
            ""
        }
    );
    for s in &state.secrets {
        println!(
            "secret v{:<6}  valid {} .. {}, grace until {}",
            s.version,
            t(Some(s.valid_from)),
            t(Some(s.valid_until)),
            t(Some(s.grace_until))
        );
    }
    println!("last rotation    {}", t(state.last_rotation));
    println!("next rotation    {}", t(state.next_rotation_due));
    println!("server contact   {}", t(state.last_server_contact));
    println!("degraded since   {}", t(state.degraded_since));
    Ok(())
}

/// `check-config`: parses the config and checks the files it names exist.
pub fn check_config(config_path: &Path) -> Result<(), CommandError> {
    let config = load(config_path)?;
    for (key, path) in [
        ("server.client_cert", &config.server.client_cert),
        ("server.client_key", &config.server.client_key),
        ("server.ca_cert", &config.server.ca_cert),
    ] {
        std::fs::metadata(path).map_err(|source| CommandError::MissingFile {
            key,
            path: path.display().to_string(),
            source,
        })?;
    }
    crate::platform::files::socket_gid(&config.ipc)?;
    println!(
        "config OK: machine {} of client {}",
        config.agent.id, config.agent.client_id
    );
    Ok(())
}

/// `server-status`: what the server knows of this machine's secrets (over mTLS).
pub async fn server_status(config_path: &Path, json: bool) -> Result<(), CommandError> {
    let config = load(config_path)?;
    let key = keys::load(&config, None)?;
    let status = agent_client(&config, key)?
        .secret_status(&Default::default())
        .await?;
    if json {
        print_json(&status);
        return Ok(());
    }
    println!("machine      {}", status.machine_id);
    println!("client       {}", status.client_id);
    println!(
        "secret       {} (version {})",
        status.state,
        status.current_version.map_or("-".into(), |v| v.to_string())
    );
    println!("certificate  expires {}", status.certificate_expires_at);
    Ok(())
}

/// `renew-cert`: a new certificate now (with a new key on the file store, the same key in the
/// TPM), as the daemon does by itself at 2/3 of the certificate's life.
pub async fn renew_cert(config_path: &Path, json: bool) -> Result<(), CommandError> {
    let config = load(config_path)?;
    let files = IdentityFiles::from_config(&config);
    files.settle()?;
    let key = keys::load(&config, None)?;
    let api = AgentApi::connect(&config, key.clone())?;
    let identity = MachineIdentity {
        client_id: config.agent.client_id,
        machine_id: config.agent.id,
    };
    let renewed = renewal::renew(&files, &identity, key, &api).await?;
    if json {
        print_json(&renewed.response);
    } else {
        println!(
            "Certificate renewed: serial {}, expires {}",
            renewed.response.serial, renewed.response.expires_at
        );
    }
    Ok(())
}

/// `update apply`: the update step (root, outside the daemon's sandbox; started by
/// `license-agent-update.service`): resumes an unfinished update or installs the staged
/// release (`crate::update::apply`). Prints each step, or the result as JSON.
pub fn update_apply(config_path: &Path, json: bool) -> Result<(), CommandError> {
    use crate::update::apply::{apply, Plan, SystemHost};
    let config = load(config_path)?;
    let license_pin =
        license_protocol::rotation::parse_license_public_key(&config.server.license_public_key)
            .ok_or(ConfigError::Invalid {
                key: "server.license_public_key",
                message: "must be `ed25519:<base64>` of 32 bytes".into(),
            })?;
    let plan = Plan {
        staging: crate::update::Staging::new(config.update_staging_dir()),
        work_dir: config.update.work_dir.clone(),
        binary: config.update.binary.clone(),
        step_binary: config.update.step_binary.clone(),
        config_file: config_path.to_path_buf(),
        state_dir: config.agent.state_dir.clone(),
        license_pin,
        health_deadline: std::time::Duration::from_secs(config.update.health_deadline),
    };
    let mgmt_token = match &config.management.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|source| CommandError::MissingFile {
                    key: "management.token_file",
                    path: path.display().to_string(),
                    source,
                })?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let mut host = SystemHost {
        stop_command: config.update.stop_command.clone(),
        start_command: config.update.start_command.clone(),
        mgmt_socket: config.management.socket.clone(),
        mgmt_token,
    };
    let Some(result) = apply(&plan, &mut host)? else {
        if json {
            print_json(&serde_json::Value::Null);
        } else {
            println!("no update staged");
        }
        return Ok(());
    };
    if json {
        print_json(&result);
    } else {
        for step in &result.steps {
            println!("{:<8} {}  {}", step.step, rfc3339(step.at), step.detail);
        }
        println!(
            "update to {} (from {}): {}{}",
            result.version,
            result.from_version,
            result.outcome.as_str(),
            if result.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", result.reason)
            }
        );
    }
    if result.outcome == license_protocol::release::UpdateOutcome::Success {
        Ok(())
    } else {
        Err(CommandError::UpdateNotApplied {
            version: result.version.to_string(),
            outcome: result.outcome.as_str(),
            reason: result.reason,
        })
    }
}

// --- Windows ---------------------------------------------------------------------------------

/// `install` (Windows): the installer flow of `crate::enroll::installer`, step by step, or its
/// report as JSON.
#[cfg(windows)]
pub async fn install(
    options: crate::enroll::installer::InstallOptions,
    json: bool,
) -> Result<(), CommandError> {
    let report = crate::enroll::installer::install(options).await?;
    if json {
        print_json(&report);
    } else {
        println!(
            "License Secret Agent is installed: machine {}, service {}",
            report.machine_id, report.service_state
        );
    }
    Ok(())
}

/// `service-run` (Windows): hands the process to the service control manager, which runs the
/// daemon on its own thread until the service is stopped.
#[cfg(windows)]
pub fn service_run(config_path: PathBuf) -> Result<(), CommandError> {
    use crate::platform::windows::service;
    service::run_dispatcher(move || {
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the async runtime");
                return 1;
            }
        };
        match runtime.block_on(run(config_path)) {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(error = %e, "the agent stopped on an error");
                e.exit_code()
            }
        }
    })?;
    Ok(())
}

/// `service status|start|stop|uninstall` (Windows).
#[cfg(windows)]
pub fn service(action: &str, json: bool) -> Result<(), CommandError> {
    use crate::platform::windows::service;
    let wait = std::time::Duration::from_secs(60);
    match action {
        "start" => service::start(wait)?,
        "stop" => service::stop(wait)?,
        "uninstall" => service::uninstall(wait)?,
        _ => {}
    }
    let state = service::query().map_or("not installed", service::state_name);
    if json {
        print_json(&serde_json::json!({"service": service::SERVICE_NAME, "state": state}));
    } else {
        println!("service {}: {state}", service::SERVICE_NAME);
    }
    Ok(())
}
