//! `license-agent`: the POS-side agent's command line. `enroll` (first contact, `--tpm` for a
//! TPM-resident key), `run` (the daemon), `status`, `check-config`, `server-status` and
//! `renew-cert`; each is carried out by [`license_agent::commands`], which also documents the
//! exit codes (0 success, 1 runtime, 2 usage or config, 3 refused by the server, 4 already
//! enrolled).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use license_agent::commands::{self, CommandError};
use license_agent::config::{DEFAULT_CONFIG_PATH, DEFAULT_LOG_DIR, DEFAULT_STATE_DIR};
use license_agent::enroll::EnrollOptions;
use license_protocol::pin::CertPin;

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
    /// Works without a running daemon; `license-agent-cli status` asks the running one.
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
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("license-agent: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn dispatch(cli: Cli) -> Result<(), CommandError> {
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
            let opts = |token| EnrollOptions {
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
            };
            commands::enroll(token, opts, json).await
        }
        Command::Run { config } => commands::run(config).await,
        Command::Status { config, json } => commands::status(&config, json),
        Command::CheckConfig { config } => commands::check_config(&config),
        Command::ServerStatus { config, json } => commands::server_status(&config, json).await,
        Command::RenewCert { config, json } => commands::renew_cert(&config, json).await,
    }
}
