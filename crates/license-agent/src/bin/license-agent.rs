//! `license-agent`: the POS-side agent's command line. `enroll` (first contact, `--tpm` for a
//! TPM-resident key), `run` (the daemon), `status`, `check-config`, `server-status` and
//! `renew-cert`, `update apply` (the update step); each is carried out by [`license_agent::commands`], which also documents the
//! exit codes (0 success, 1 runtime, 2 usage or config, 3 refused by the server, 4 already
//! enrolled).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use license_agent::commands::{self, CommandError, ConfigAndOutput, ConfigArg, EnrollArgs};

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
enum Command {
    /// Enroll this machine with a one-time install token; the key is generated locally.
    Enroll(Box<EnrollArgs>),
    /// Run the agent: secret store, rotation with the server, validation socket.
    Run(ConfigArg),
    /// What the agent knows (from state.json): secrets, store in use, TPM, server contact.
    /// Works without a running daemon; `license-agent-cli status` asks the running one.
    Status(ConfigAndOutput),
    /// Validate a config file without starting anything.
    CheckConfig(ConfigArg),
    /// Ask the server (over mTLS) what it knows of this machine's secrets.
    ServerStatus(ConfigAndOutput),
    /// Renew this machine's certificate (same key); the old one stops working at once.
    RenewCert(ConfigAndOutput),
    /// Updates of the agent itself.
    #[command(subcommand)]
    Update(UpdateCommand),
}

#[derive(Debug, Subcommand)]
enum UpdateCommand {
    /// The update step (as root, started by license-agent-update.service): install the
    /// release the daemon staged — stop, back up, swap, start, health check, roll back on
    /// failure — or resume one a power cut interrupted.
    Apply(ConfigAndOutput),
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
        Command::Enroll(args) => commands::enroll(*args).await,
        Command::Run(c) => commands::run(c.config).await,
        Command::Status(c) => commands::status(&c.config.config, c.json),
        Command::CheckConfig(c) => commands::check_config(&c.config),
        Command::ServerStatus(c) => commands::server_status(&c.config.config, c.json).await,
        Command::RenewCert(c) => commands::renew_cert(&c.config.config, c.json).await,
        Command::Update(UpdateCommand::Apply(c)) => {
            commands::update_apply(&c.config.config, c.json)
        }
    }
}
