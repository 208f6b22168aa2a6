//! `license-agent-cli audit …`: verify and display the audit log, reading the files directly.
//!
//! These commands need only read access to the log directory, not the agent: an auditor can
//! run them on a copy of the files.

use std::io::{self, Write};
use std::path::PathBuf;

use clap::{Args, Subcommand};
use license_audit::{read_log, verify, verify_with_anchor, Anchor, LineError, VerifyReport};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::{paths, MainError, EXIT_OK, EXIT_TAMPERED};

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of the log and its rotated files (exit 0 intact, 1 tampered).
    Verify(VerifyArgs),
    /// Print entries, oldest first (with `--json`: one JSON entry per line, as stored).
    Show(ShowArgs),
}

#[derive(Debug, Args)]
pub struct LogArg {
    /// Current log file (rotated files `<log>.1`, `<log>.2`, … are read too), or its directory.
    #[arg(long, value_name = "PATH", env = "LICENSE_AGENT_AUDIT_LOG", default_value_os_t = paths::audit_log())]
    log: PathBuf,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    log: LogArg,
    /// Require the log to reach this seq (instead of the anchor in the agent's state file):
    /// detects trailing entries removed.
    #[arg(long, value_name = "SEQ", requires = "anchor_hash")]
    anchor_seq: Option<u64>,
    /// Hash the entry `--anchor-seq` must have.
    #[arg(long, value_name = "HEX", requires = "anchor_seq")]
    anchor_hash: Option<String>,
    /// The agent's state file, whose `audit_anchor` is checked by default.
    #[arg(long, value_name = "PATH", env = "LICENSE_AGENT_STATE", default_value_os_t = paths::state_file())]
    state: PathBuf,
    /// Check the chain only, not the anchor.
    #[arg(long, conflicts_with_all = ["anchor_seq", "anchor_hash"])]
    no_anchor: bool,
}

/// The anchor in the agent's state file, or why there is none.
fn state_anchor(path: &std::path::Path) -> Result<Anchor, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let state: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let anchor = &state["audit_anchor"];
    match (anchor[0].as_u64(), anchor[1].as_str()) {
        (Some(seq), Some(hash)) => Ok(Anchor {
            seq,
            hash: hash.to_string(),
        }),
        _ => Err(format!("{} holds no audit_anchor", path.display())),
    }
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    #[command(flatten)]
    log: LogArg,
    /// Only entries at or after this time (RFC 3339, e.g. 2026-04-01T00:00:00Z).
    #[arg(long, value_name = "RFC3339")]
    since: Option<String>,
    /// Only entries of this event (e.g. license.validate).
    #[arg(long, value_name = "NAME")]
    event: Option<String>,
}

/// Runs an `audit` command; `json` is the global `--json`.
pub fn run(command: AuditCommand, json: bool) -> Result<u8, MainError> {
    match command {
        AuditCommand::Verify(args) => run_verify(args, json),
        AuditCommand::Show(args) => run_show(args, json),
    }
}

fn run_verify(args: VerifyArgs, json: bool) -> Result<u8, MainError> {
    let path = args.log.log;
    let report = match (args.anchor_seq, args.anchor_hash) {
        (Some(seq), Some(hash)) => verify_with_anchor(&path, &Anchor { seq, hash })?,
        _ if args.no_anchor => verify(&path)?,
        _ => match state_anchor(&args.state) {
            Ok(anchor) => verify_with_anchor(&path, &anchor)?,
            Err(why) => {
                eprintln!(
                    "note: {why}; checking the chain without the anchor (entries removed from the end would go unnoticed)"
                );
                verify(&path)?
            }
        },
    };
    if report.files.is_empty() {
        return Err(MainError::NoLog(path));
    }
    let mut out = io::stdout().lock();
    if json {
        writeln!(out, "{}", verify_json(&report))?;
    } else if let Some(problem) = &report.problem {
        writeln!(out, "audit log TAMPERED at {problem}")?;
    } else {
        writeln!(
            out,
            "audit log OK: {} entries in {} files, last seq {}",
            report.entries,
            report.files.len(),
            report.last.as_ref().map_or(0, |l| l.seq)
        )?;
    }
    Ok(if report.is_ok() {
        EXIT_OK
    } else {
        EXIT_TAMPERED
    })
}

fn verify_json(report: &VerifyReport) -> Value {
    let mut v = json!({
        "status": if report.is_ok() { "ok" } else { "tampered" },
        "entries": report.entries,
        "files": report.files,
        "first_seq": report.first_seq,
        "last_seq": report.last.as_ref().map(|l| l.seq),
        "last_hash": report.last.as_ref().map(|l| l.hash.as_str()),
    });
    if let Some(problem) = &report.problem {
        let mut p = serde_json::to_value(problem).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut p {
            map.insert("reason".into(), Value::from(problem.kind.to_string()));
        }
        v["problem"] = p;
    }
    v
}

fn run_show(args: ShowArgs, json: bool) -> Result<u8, MainError> {
    let since = match &args.since {
        Some(s) => {
            Some(
                OffsetDateTime::parse(s, &Rfc3339).map_err(|e| MainError::BadArgument {
                    what: "--since",
                    reason: format!("{s:?} is not an RFC 3339 time: {e}"),
                })?,
            )
        }
        None => None,
    };
    let path = args.log.log;
    let lines = read_log(&path)?;
    if lines.is_empty() && !path.exists() {
        return Err(MainError::NoLog(path));
    }
    let mut out = io::stdout().lock();
    if !json {
        writeln!(
            out,
            "{:>8}  {:<24}  {:<28}  {:<8}  {:>6}  {:>7}  DETAILS",
            "SEQ", "TIME (UTC)", "EVENT", "OUTCOME", "UID", "PID"
        )?;
    }
    for line in lines {
        let entry = match line.entry {
            Ok(e) => e,
            Err(err) => {
                let why = match err {
                    LineError::Truncated => "cut line".to_owned(),
                    LineError::Invalid(reason) => reason,
                    _ => "unreadable".to_owned(),
                };
                eprintln!(
                    "warning: {}:{}: {why} (run `license-agent-cli audit verify`)",
                    line.file.display(),
                    line.line
                );
                continue;
            }
        };
        if args
            .event
            .as_deref()
            .is_some_and(|name| name != entry.event)
        {
            continue;
        }
        if let Some(since) = since {
            match entry.timestamp() {
                Ok(t) if t >= since => {}
                _ => continue,
            }
        }
        if json {
            let line = serde_json::to_string(&entry).map_err(io::Error::other)?;
            writeln!(out, "{line}")?;
        } else {
            let id = |v: Option<u32>| v.map_or_else(|| "-".to_owned(), |n| n.to_string());
            writeln!(
                out,
                "{:>8}  {:<24}  {:<28}  {:<8}  {:>6}  {:>7}  {}",
                entry.seq,
                entry.time,
                entry.event,
                entry.outcome,
                id(entry.actor.uid),
                id(entry.actor.pid),
                Value::Object(entry.details)
            )?;
        }
    }
    Ok(EXIT_OK)
}
