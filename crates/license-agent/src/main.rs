//! `license-agent`: the POS-side agent. `enroll` (first contact, `--tpm` for a TPM-resident
//! key), `run` (the daemon: secret store, rotation, validation socket), `status`,
//! `check-config`, `server-status` and `renew-cert`.
//!
//! Exit codes: 0 success; 1 runtime failure (network, I/O); 2 bad usage or configuration;
//! 3 refused by the server (token used/expired/unknown, machine revoked, …); 4 already enrolled.

mod access;
mod alerts;
mod audit;
mod clock;
mod config;
mod daemon;
mod enroll;
mod files;
mod hardening;
mod hardware;
mod ipc;
mod keys;
mod metrics;
mod mgmt;
mod net;
mod recovery;
mod rotation;
mod secrets;
mod state;
mod tpm;
mod validator;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use license_protocol::enroll::InstallToken;
use license_protocol::pin::CertPin;

use config::{AgentConfig, DEFAULT_CONFIG_PATH, DEFAULT_LOG_DIR, DEFAULT_STATE_DIR};
use enroll::{EnrollError, EnrollOptions};
use net::client::ClientError;

#[derive(Debug, Parser)]
#[command(
    name = "license-agent",
    version,
    about = "License Secret Agent (POS side)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process; boxing buys nothing
enum Command {
    /// Enroll this machine with a one-time install token; the key is generated locally.
    Enroll {
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
        /// Enroll again even if a config exists (same hardware id → same machine, new certificate).
        #[arg(long)]
        force: bool,
        /// Validation socket for POS applications [default: /run/license-agent/agent.sock].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// UID allowed to validate licenses on the socket (repeatable; the POS application's user).
        #[arg(long = "allow-uid", value_name = "UID")]
        allowed_uids: Vec<u32>,
        /// Make the machine key inside the TPM (non-exportable) reached through this TCTI,
        /// e.g. `device:/dev/tpmrm0`; also enables the TPM secret store.
        #[arg(long, value_name = "TCTI")]
        tpm: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Run the agent: secret store, rotation with the server, validation socket.
    Run {
        #[arg(long, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// What the agent knows (from state.json): secrets, store in use, TPM, server contact.
    /// The management socket and `license-agent-cli` will supersede this.
    Status {
        #[arg(long, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Validate a config file without starting anything.
    CheckConfig {
        #[arg(long, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Ask the server (over mTLS) what it knows of this machine's secrets.
    ServerStatus {
        #[arg(long, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Renew this machine's certificate (same key); the old one stops working at once.
    RenewCert {
        #[arg(long, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Runtime(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    AlreadyEnrolled(String),
}

impl MainError {
    fn exit_code(&self) -> u8 {
        match self {
            MainError::Runtime(_) => 1,
            MainError::Usage(_) => 2,
            MainError::Refused(_) => 3,
            MainError::AlreadyEnrolled(_) => 4,
        }
    }
}

impl From<EnrollError> for MainError {
    fn from(e: EnrollError) -> Self {
        match &e {
            EnrollError::AlreadyEnrolled(_) => MainError::AlreadyEnrolled(e.to_string()),
            EnrollError::Hardware(_) => MainError::Usage(e.to_string()),
            EnrollError::Server(ClientError::Refused { .. }) | EnrollError::BadAnswer(_) => {
                MainError::Refused(e.to_string())
            }
            _ => MainError::Runtime(e.to_string()),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("LICENSE_AGENT_LOG")
        .unwrap_or_else(|_| "warn".into());
    // Under systemd with a journal: native journald records (priority from the level,
    // structured fields such as ALERT); otherwise plain lines on stderr.
    match std::env::var_os("JOURNAL_STREAM").and_then(|_| tracing_journald::layer().ok()) {
        Some(journald) => {
            use tracing_subscriber::prelude::*;
            tracing_subscriber::registry()
                .with(filter)
                .with(journald)
                .init();
        }
        None => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .init(),
    }
    // The daemon serves validations on every core; one-shot commands need one thread.
    let mut builder = if matches!(cli.command, Command::Run { .. }) {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("license-agent: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("license-agent: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn load(path: &std::path::Path) -> Result<AgentConfig, MainError> {
    AgentConfig::load(path).map_err(|e| MainError::Usage(e.to_string()))
}

/// SIGTERM or SIGINT, registered now: a signal that arrives while the daemon is still starting
/// (before the future is first polled) must drain and exit cleanly, not kill the process with
/// the default action and leave TPM objects and state behind.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, MainError> {
    use tokio::signal::unix::{signal, SignalKind};
    let register =
        |kind| signal(kind).map_err(|e| MainError::Runtime(format!("signal handler: {e}")));
    let (mut term, mut int) = (
        register(SignalKind::terminate())?,
        register(SignalKind::interrupt())?,
    );
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

fn print_json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".into())
    );
}

async fn run(cli: Cli) -> Result<(), MainError> {
    match cli.command {
        Command::Enroll {
            server,
            server_pin,
            token,
            config,
            state_dir,
            log_dir,
            hostname,
            hardware_id,
            server_generated_key,
            force,
            socket,
            allowed_uids,
            tpm,
            json,
        } => {
            let token =
                InstallToken::try_from(token).map_err(|e| MainError::Usage(e.to_string()))?;
            if !json {
                eprintln!("Enrolling with {server} (pinned {server_pin})…");
            }
            let report = enroll::enroll(EnrollOptions {
                server,
                pin: server_pin,
                token,
                config_path: config,
                state_dir,
                log_dir,
                hostname,
                hardware_id,
                server_generated_key,
                force,
                socket,
                allowed_uids,
                tpm_tcti: tpm,
            })
            .await?;
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
        }
        Command::Run { config } => {
            let parsed = load(&config)?;
            daemon::run(parsed, config.clone(), shutdown_signal()?)
                .await
                .map_err(|e| MainError::Runtime(e.to_string()))?;
        }
        Command::Status { config, json } => {
            let parsed = load(&config)?;
            let (state, _) = state::StateFile::new(&parsed.agent.state_dir).load_readonly();
            if json {
                print_json(&serde_json::json!({
                    "machine_id": parsed.agent.id,
                    "store": state.store,
                    "tpm_enabled": parsed.tpm.enabled,
                    "tpm_available": state.tpm_available,
                    "secrets": state.secrets,
                    "invalidated_versions": state.invalidated_versions,
                    "last_rotation": state.last_rotation,
                    "next_rotation_due": state.next_rotation_due,
                    "last_server_contact": state.last_server_contact,
                    "consecutive_failures": state.consecutive_failures,
                    "degraded_since": state.degraded_since,
                }));
            } else {
                let t = |v: Option<i64>| v.map_or_else(|| "-".to_string(), validator::rfc3339);
                println!("machine          {}", parsed.agent.id);
                println!(
                    "secret store     {}{}",
                    if state.store.is_empty() {
                        "-"
                    } else {
                        &state.store
                    },
                    if parsed.tpm.enabled && !state.tpm_available {
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
            }
        }
        Command::CheckConfig { config } => {
            let parsed = load(&config)?;
            for (key, path) in [
                ("server.client_cert", &parsed.server.client_cert),
                ("server.client_key", &parsed.server.client_key),
                ("server.ca_cert", &parsed.server.ca_cert),
            ] {
                std::fs::metadata(path)
                    .map_err(|e| MainError::Usage(format!("{key}: {}: {e}", path.display())))?;
            }
            println!(
                "config OK: machine {} of client {}",
                parsed.agent.id, parsed.agent.client_id
            );
        }
        Command::ServerStatus { config, json } => {
            let parsed = load(&config)?;
            let key = keys::load(&parsed, None).map_err(EnrollError::from)?;
            let status = enroll::agent_client(&parsed, key)?
                .secret_status()
                .await
                .map_err(EnrollError::from)?;
            if json {
                print_json(&status);
            } else {
                println!("machine      {}", status.machine_id);
                println!("client       {}", status.client_id);
                println!(
                    "secret       {} (version {})",
                    status.state,
                    status.current_version.map_or("-".into(), |v| v.to_string())
                );
                println!("certificate  expires {}", status.certificate_expires_at);
            }
        }
        Command::RenewCert { config, json } => {
            let parsed = load(&config)?;
            let renewed = enroll::renew(&parsed).await?;
            if json {
                print_json(&renewed);
            } else {
                println!(
                    "Certificate renewed: serial {}, expires {}",
                    renewed.serial, renewed.expires_at
                );
            }
        }
    }
    Ok(())
}
