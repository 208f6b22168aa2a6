//! `license-agent-cli`: local management of the License Secret Agent (DESIGN.md §3.3).
//!
//! Two kinds of commands:
//! - `status`, `rotate`, `invalidate`, `degraded`, `metrics`, `validate` talk to the running
//!   agent over its management socket ([`license_ipc::mgmt`], see [`client`] and
//!   [`mgmt`]); the agent decides by the caller's uid (and the optional token second factor)
//!   what it may do, and audits every request.
//! - `audit verify`, `audit show` read the audit log files directly ([`audit`]), so an auditor
//!   can run them on a copy of the files without the agent.
//!
//! `completions <SHELL>` and `man` print a shell completion script and the man page.
//!
//! Output is for people by default; `--json` gives machine-readable output everywhere (for the
//! agent's commands: the answer's `result` object, or its error object). Errors are one line
//! on stderr, with the agent's error code and message when the agent refused.
//!
//! Exit codes (also in `--help`):
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success (`validate`: the license is valid; `audit verify`: the chain is intact) |
//! | 1 | the command failed (agent error `failed`/`bad_request`), `validate`: the license is invalid, `audit verify`: tampering found |
//! | 2 | usage error, or an I/O or protocol error (unreadable file, no audit log, timeout, bad answer) |
//! | 3 | refused by the agent (`not_authorized`, `refused`, `audit_unavailable`) |
//! | 4 | the agent is unreachable (no socket or pipe at the path, or connection refused) |

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use license_ipc::mgmt::MgmtErrorCode;

mod audit;
mod client;
mod mgmt;
mod paths;

/// Success; `validate`: the license is valid; `audit verify`: the log is intact.
pub const EXIT_OK: u8 = 0;
/// The command failed; `validate`: the license is invalid; `audit verify`: the log was
/// tampered with.
pub const EXIT_FAILED: u8 = 1;
/// `audit verify`: the log was tampered with (same code as [`EXIT_FAILED`]).
pub const EXIT_TAMPERED: u8 = EXIT_FAILED;
/// Usage error, I/O or protocol error (clap also exits with 2 on bad arguments).
pub const EXIT_ERROR: u8 = 2;
/// The agent refused the request (`not_authorized`, `refused`, `audit_unavailable`).
pub const EXIT_REFUSED: u8 = 3;
/// The agent could not be reached (no socket, connection refused).
pub const EXIT_UNREACHABLE: u8 = 4;

/// Default time to wait for the agent's answer, in seconds (`rotate` waits for a whole round).
pub const DEFAULT_TIMEOUT_SECS: u64 = 30;

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success (validate: the license is valid; audit verify: the log is intact)
  1  the command failed; validate: the license is invalid; audit verify: tampering found
  2  usage error, I/O or protocol error (unreadable file, no audit log, timeout, bad answer)
  3  refused by the agent (not_authorized, refused, audit_unavailable)
  4  the agent is unreachable (no socket or pipe at the path, or connection refused)";

/// Local management of the License Secret Agent.
#[derive(Debug, Parser)]
#[command(name = "license-agent-cli", version, about, after_help = EXIT_CODES_HELP)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Options every command accepts, before or after its name.
#[derive(Debug, clap::Args)]
struct GlobalArgs {
    /// The agent's management socket (on Windows, its pipe).
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "LICENSE_AGENT_MGMT_SOCKET",
        default_value = paths::MGMT_SOCKET
    )]
    socket: PathBuf,
    /// File holding the management token (second factor, when the agent is configured with
    /// one); its trimmed content is sent with the request.
    #[arg(long, global = true, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Seconds to wait for the agent's answer (`rotate` waits for a whole rotation round).
    #[arg(long, global = true, value_name = "SECS", default_value_t = DEFAULT_TIMEOUT_SECS,
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    /// Machine-readable output (JSON).
    #[arg(long, global = true)]
    json: bool,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Show the agent's state: secrets, store and TPM, degraded mode, rotation, licenses.
    Status,
    /// Rotate the machine's secret now; waits until the round is over (admin).
    Rotate,
    /// Invalidate a secret version on this machine: its tokens stop validating (admin).
    Invalidate {
        /// The secret version to invalidate.
        #[arg(value_name = "VERSION")]
        version: u64,
    },
    /// Force degraded mode on, forbid it, or return to the configured behaviour (admin).
    Degraded {
        /// `on`: serve offline without contacting the server; `off`: never serve degraded
        /// (validations fail closed when rotation is overdue); `auto`: as configured.
        #[arg(value_enum, value_name = "MODE")]
        mode: mgmt::DegradedArg,
    },
    /// Hold updates of the agent (no release is staged; one staged but not yet installed is
    /// withdrawn) or release them again (admin).
    Update {
        #[arg(value_enum, value_name = "ACTION")]
        action: mgmt::UpdateArg,
    },
    /// Print the agent's metrics (Prometheus text format).
    Metrics,
    /// Validate a license token as a POS application would (exit 0 valid, 1 invalid).
    Validate {
        /// File holding the base64 license token (`-` for stdin).
        // Not `token_file`: that id is the global `--token-file`, and clap would merge the two.
        #[arg(value_name = "TOKEN_FILE")]
        license_token_file: PathBuf,
    },
    /// Read and check the agent's audit log (reads the files, not the agent).
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Print a shell completion script (e.g. `license-agent-cli completions bash`).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum, value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout.
    Man,
}

/// Why a command did not succeed; [`MainError::exit_code`] says how the process ends.
#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error(transparent)]
    Audit(#[from] license_audit::AuditError),
    #[error("no audit log at {0}")]
    NoLog(PathBuf),
    #[error("invalid {what}: {reason}")]
    BadArgument { what: &'static str, reason: String },
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    Client(#[from] client::ClientError),
    /// The agent answered with an error.
    #[error("{op}: {code}: {message}")]
    Agent {
        op: &'static str,
        code: MgmtErrorCode,
        message: String,
    },
    #[error("cannot write the output: {0}")]
    Output(#[from] io::Error),
}

impl MainError {
    fn exit_code(&self) -> u8 {
        match self {
            MainError::Client(e) if e.is_unreachable() => EXIT_UNREACHABLE,
            MainError::Agent { code, .. } => match code {
                MgmtErrorCode::NotAuthorized
                | MgmtErrorCode::Refused
                | MgmtErrorCode::AuditUnavailable => EXIT_REFUSED,
                _ => EXIT_FAILED,
            },
            _ => EXIT_ERROR,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        // The reader went away (`… | head`): nothing left to say to anyone.
        Err(MainError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
            ExitCode::from(EXIT_ERROR)
        }
        Err(e) => {
            eprintln!("license-agent-cli: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Runs one command and returns its exit code.
fn run(cli: Cli) -> Result<u8, MainError> {
    let global = cli.global;
    match cli.command {
        Command::Audit { command } => audit::run(command, global.json),
        Command::Completions { shell } => {
            let mut out = io::stdout().lock();
            clap_complete::generate(shell, &mut Cli::command(), "license-agent-cli", &mut out);
            out.flush()?;
            Ok(EXIT_OK)
        }
        Command::Man => {
            let mut out = io::stdout().lock();
            clap_mangen::Man::new(Cli::command()).render(&mut out)?;
            out.flush()?;
            Ok(EXIT_OK)
        }
        Command::Status => mgmt::run(&global, mgmt::Op::Status),
        Command::Rotate => mgmt::run(&global, mgmt::Op::Rotate),
        Command::Invalidate { version } => mgmt::run(&global, mgmt::Op::Invalidate(version)),
        Command::Degraded { mode } => mgmt::run(&global, mgmt::Op::Degraded(mode)),
        Command::Update { action } => mgmt::run(&global, mgmt::Op::Update(action)),
        Command::Metrics => mgmt::run(&global, mgmt::Op::Metrics),
        Command::Validate { license_token_file } => {
            mgmt::run(&global, mgmt::Op::Validate(license_token_file))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn agent_error_codes_map_to_exit_codes() {
        let agent = |code: &str| MainError::Agent {
            op: "rotate",
            code: serde_json::from_value(serde_json::json!(code)).unwrap(),
            message: String::new(),
        };
        for (code, exit) in [
            ("not_authorized", EXIT_REFUSED),
            ("refused", EXIT_REFUSED),
            ("audit_unavailable", EXIT_REFUSED),
            ("failed", EXIT_FAILED),
            ("bad_request", EXIT_FAILED),
            ("something_new", EXIT_FAILED),
        ] {
            assert_eq!(agent(code).exit_code(), exit, "{code}");
        }
    }
}
