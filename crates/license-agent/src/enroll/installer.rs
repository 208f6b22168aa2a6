//! The Windows installer: `license-agent.exe` with the server's trailer appended
//! (`license_protocol::installer`), run once as Administrator on the till. Each step is printed
//! (and appended to `%ProgramData%\LicenseAgent\log\install.log`):
//!
//! 1. read the trailer from its own file (server, pin, one-time token);
//! 2. make `%ProgramData%\LicenseAgent` (SYSTEM and Administrators only) and copy the agent,
//!    without the trailer, to `%ProgramFiles%\LicenseAgent\license-agent.exe`;
//! 3. enroll with a key generated here (CSR mode), unless the machine already is;
//! 4. install (or update) the `license-agent` service with its recovery actions, start it and
//!    wait until it runs.
//!
//! Running it again on an enrolled machine is safe: the token is not used, the binary and the
//! service are brought up to date, and the service is started.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use license_protocol::installer::{self, InstallerPayload, TrailerError};

use super::{EnrollError, EnrollOptions, EnrollReport};
use crate::config::{AgentConfig, DEFAULT_CONFIG_PATH, DEFAULT_LOG_DIR, DEFAULT_STATE_DIR};
use crate::platform::files::{ensure_dir, write_atomic};
use crate::platform::windows::service::{self, ServiceError};

/// BUILTIN\Users: who may validate licenses unless the installer is told otherwise.
pub const DEFAULT_ALLOWED_GROUP: &str = "S-1-5-32-545";
/// How long the installer waits for the service to run.
const START_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InstallError {
    #[error("reading this installer ({path}): {source}")]
    ReadSelf {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Trailer(#[from] TrailerError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Enroll(#[from] EnrollError),
    #[error("{0} (run the installer as Administrator)")]
    Service(#[from] ServiceError),
}

/// What the installer may be told on its command line.
#[derive(Debug, Clone, Default)]
pub struct InstallOptions {
    /// SIDs of users allowed to validate (default: none besides the groups).
    pub allowed_sids: Vec<String>,
    /// SIDs of groups allowed to validate (default: [`DEFAULT_ALLOWED_GROUP`]).
    pub allowed_groups: Vec<String>,
    /// Leave the service stopped.
    pub no_start: bool,
}

/// What the installer did.
#[derive(Debug, serde::Serialize)]
pub struct InstallReport {
    pub server: String,
    pub binary: PathBuf,
    pub config: PathBuf,
    /// `None` when the machine was already enrolled (the token was not used).
    pub enrolled: Option<EnrollReport>,
    pub machine_id: String,
    pub service_created: bool,
    pub service_state: &'static str,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> InstallError + 'a {
    move |source| InstallError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// Prints a step and appends it to the install log.
struct Steps {
    log: Option<std::fs::File>,
}

impl Steps {
    fn say(&mut self, line: &str) {
        println!("{line}");
        if let Some(log) = &mut self.log {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let _ = writeln!(log, "{} {line}", crate::platform::clock::rfc3339(now));
        }
    }
}

/// The trailer of the running executable, and its bytes without it.
pub fn own_trailer() -> Result<(InstallerPayload, Vec<u8>), InstallError> {
    let exe = std::env::current_exe().map_err(|source| InstallError::ReadSelf {
        path: "<current exe>".into(),
        source,
    })?;
    let bytes = std::fs::read(&exe).map_err(|source| InstallError::ReadSelf {
        path: exe.display().to_string(),
        source,
    })?;
    let found = installer::read(&bytes)?;
    let payload = found.payload.clone();
    let stub = found.stub.to_vec();
    Ok((payload, stub))
}

/// Installs this till (see the module docs).
pub async fn install(options: InstallOptions) -> Result<InstallReport, InstallError> {
    let (payload, stub) = own_trailer()?;
    let config_path = PathBuf::from(DEFAULT_CONFIG_PATH);
    let data_dir = config_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    ensure_dir(&data_dir, 0o700).map_err(io("creating", &data_dir))?;
    let log_dir = PathBuf::from(DEFAULT_LOG_DIR);
    ensure_dir(&log_dir, 0o700).map_err(io("creating", &log_dir))?;
    let mut steps = Steps {
        log: std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_dir.join("install.log"))
            .ok(),
    };
    steps.say(&format!(
        "License Secret Agent installer: server {} (pinned {})",
        payload.server, payload.pin
    ));

    // The binary, without the trailer: the token never rests on the till.
    let program_dir = service::program_dir();
    let binary = program_dir.join("license-agent.exe");
    ensure_dir(&program_dir, 0o755).map_err(io("creating", &program_dir))?;
    if service::is_running() {
        steps.say("stopping the running agent to replace its binary");
        service::stop(START_WAIT)?;
    }
    write_atomic(&binary, &stub, 0o755).map_err(io("writing", &binary))?;
    steps.say(&format!("agent installed at {}", binary.display()));

    let enrolled = if config_path.exists() {
        steps.say(&format!(
            "already enrolled ({}): the install token is not used",
            config_path.display()
        ));
        None
    } else {
        steps.say("generating this machine's key and enrolling…");
        let mut allowed_groups = options.allowed_groups.clone();
        if allowed_groups.is_empty() && options.allowed_sids.is_empty() {
            allowed_groups.push(DEFAULT_ALLOWED_GROUP.into());
        }
        let report = super::enroll(EnrollOptions {
            server: payload.server.clone(),
            pin: payload.pin,
            token: payload.token.clone(),
            config_path: config_path.clone(),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            log_dir: log_dir.clone(),
            hostname: None,
            hardware_id: None,
            server_generated_key: false,
            force: false,
            socket: None,
            allowed_uids: Vec::new(),
            socket_group: None,
            allowed_sids: options.allowed_sids.clone(),
            allowed_groups,
            tpm_tcti: None,
        })
        .await?;
        steps.say(&format!(
            "enrolled as machine {} (client {}), certificate serial {} until {}",
            report.machine_id, report.client_id, report.serial, report.certificate_expires_at
        ));
        Some(report)
    };
    let config = AgentConfig::load(&config_path).map_err(|e| InstallError::Io {
        what: "reading",
        path: config_path.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })?;

    let created = service::install(&binary, &config_path)?;
    steps.say(if created {
        "service license-agent created (automatic start, restarts on failure)"
    } else {
        "service license-agent updated"
    });
    let state = if options.no_start {
        "stopped"
    } else {
        service::start(START_WAIT)?;
        "running"
    };
    steps.say(&format!("service license-agent {state}"));
    Ok(InstallReport {
        server: payload.server,
        binary,
        config: config_path,
        enrolled,
        machine_id: config.agent.id.to_string(),
        service_created: created,
        service_state: state,
    })
}
