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
    /// Windows: install this till from the installer's trailer (server, pin, one-time token):
    /// enroll, install and start the service. What the installer does when run without
    /// arguments.
    #[cfg(windows)]
    Install(InstallArgs),
    /// Windows: the service's own command line (run by the service control manager).
    #[cfg(windows)]
    ServiceRun(ConfigArg),
    /// Windows: the license-agent service.
    #[cfg(windows)]
    #[command(subcommand)]
    Service(ServiceCommand),
}

#[cfg(windows)]
#[derive(Debug, clap::Args)]
struct InstallArgs {
    /// SID of a user allowed to validate licenses on the pipe (repeatable).
    #[arg(long = "allow-sid", value_name = "SID")]
    allowed_sids: Vec<String>,
    /// SID of a group whose members may validate (repeatable) [default: S-1-5-32-545, Users].
    #[arg(long = "allow-group", value_name = "SID")]
    allowed_groups: Vec<String>,
    /// Install and enroll, but leave the service stopped.
    #[arg(long)]
    no_start: bool,
    #[arg(long)]
    json: bool,
}

#[cfg(windows)]
#[derive(Debug, Subcommand)]
enum ServiceCommand {
    /// The service's state.
    Status(Json),
    Start(Json),
    Stop(Json),
    /// Stop and remove the service (the enrollment and files stay).
    Uninstall(Json),
}

#[cfg(windows)]
#[derive(Debug, clap::Args)]
struct Json {
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum UpdateCommand {
    /// The update step (as root, started by license-agent-update.service): install the
    /// release the daemon staged — stop, back up, swap, start, health check, roll back on
    /// failure — or resume one a power cut interrupted.
    Apply(ConfigAndOutput),
}

fn main() -> ExitCode {
    let cli = parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("LICENSE_AGENT_LOG")
        .unwrap_or_else(|_| "warn".into());
    // Under systemd with a journal: native journald records (priority from the level,
    // structured fields such as ALERT); as a Windows service: the service's log file;
    // otherwise plain lines on stderr.
    #[cfg(unix)]
    let journald = std::env::var_os("JOURNAL_STREAM").and_then(|_| tracing_journald::layer().ok());
    #[cfg(windows)]
    let service_log = matches!(cli.command, Command::ServiceRun(_))
        .then(|| {
            let dir = std::path::Path::new(license_agent::config::DEFAULT_LOG_DIR);
            let _ = std::fs::create_dir_all(dir);
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("service.log"))
                .ok()
        })
        .flatten();
    #[cfg(unix)]
    if let Some(journald) = journald {
        use tracing_subscriber::prelude::*;
        tracing_subscriber::registry()
            .with(filter)
            .with(journald)
            .init();
    } else {
        init_stderr(filter);
    }
    #[cfg(windows)]
    if let Some(file) = service_log {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(file))
            .init();
    } else {
        init_stderr(filter);
    }
    #[cfg(windows)]
    if let Command::ServiceRun(c) = cli.command {
        return match commands::service_run(c.config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("license-agent: {e}");
                ExitCode::from(e.exit_code())
            }
        };
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

fn init_stderr(filter: tracing_subscriber::EnvFilter) {
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// The command line; on Windows, the installer run without arguments (double-clicked) installs.
fn parse() -> Cli {
    // A damaged trailer installs too: the install command then says what is wrong with it.
    #[cfg(windows)]
    if std::env::args_os().len() == 1
        && !matches!(
            license_agent::enroll::installer::own_trailer(),
            Err(license_agent::enroll::installer::InstallError::Trailer(
                license_protocol::installer::TrailerError::Missing
            ))
        )
    {
        return Cli {
            command: Command::Install(InstallArgs {
                allowed_sids: Vec::new(),
                allowed_groups: Vec::new(),
                no_start: false,
                json: false,
            }),
        };
    }
    Cli::parse()
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
        #[cfg(windows)]
        Command::Install(a) => {
            let options = license_agent::enroll::installer::InstallOptions {
                allowed_sids: a.allowed_sids,
                allowed_groups: a.allowed_groups,
                no_start: a.no_start,
            };
            commands::install(options, a.json).await
        }
        #[cfg(windows)]
        Command::ServiceRun(c) => commands::service_run(c.config),
        #[cfg(windows)]
        Command::Service(s) => match s {
            ServiceCommand::Status(j) => commands::service("status", j.json),
            ServiceCommand::Start(j) => commands::service("start", j.json),
            ServiceCommand::Stop(j) => commands::service("stop", j.json),
            ServiceCommand::Uninstall(j) => commands::service("uninstall", j.json),
        },
    }
}
