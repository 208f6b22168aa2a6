//! The commands that talk to the running agent: build the [`MgmtRequest`], send it with
//! [`client::call`], and print the answer for people or, with `--json`, as JSON.
//!
//! The agent decides; the CLI only reports. Its exit code says how it went: see the table in
//! `main.rs`.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use license_ipc::mgmt::{DegradedSwitch, MgmtErrorCode, MgmtRequest, MgmtResponse, StatusView};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::client::{self, ClientError};
use crate::{GlobalArgs, MainError, EXIT_FAILED, EXIT_OK};

/// `degraded on|off|auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DegradedArg {
    On,
    Off,
    Auto,
}

impl From<DegradedArg> for DegradedSwitch {
    fn from(arg: DegradedArg) -> Self {
        match arg {
            DegradedArg::On => DegradedSwitch::On,
            DegradedArg::Off => DegradedSwitch::Off,
            DegradedArg::Auto => DegradedSwitch::Auto,
        }
    }
}

/// `update hold|release`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpdateArg {
    Hold,
    Release,
}

/// One management operation, as asked on the command line.
#[derive(Debug)]
pub enum Op {
    Status,
    Rotate,
    Invalidate(u64),
    Degraded(DegradedArg),
    Update(UpdateArg),
    Metrics,
    /// The file holding the license token.
    Validate(PathBuf),
}

/// `validate`'s result: the validation socket's answer (DESIGN.md §3.2).
#[derive(Debug, Deserialize)]
struct ValidationView {
    valid: bool,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    features: Vec<String>,
    #[serde(default)]
    expires_at: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

/// Runs one operation against the agent and returns the exit code.
pub fn run(global: &GlobalArgs, op: Op) -> Result<u8, MainError> {
    let token = match &global.token_file {
        Some(path) => Some(read_trimmed("token file", path)?),
        None => None,
    };
    let request = match &op {
        Op::Status => MgmtRequest::Status { token },
        Op::Rotate => MgmtRequest::Rotate { token },
        Op::Invalidate(version) => MgmtRequest::Invalidate {
            version: *version,
            token,
        },
        Op::Degraded(mode) => MgmtRequest::Degraded {
            mode: (*mode).into(),
            token,
        },
        Op::Update(action) => MgmtRequest::Update {
            action: match action {
                UpdateArg::Hold => license_ipc::mgmt::UpdateSwitch::Hold,
                UpdateArg::Release => license_ipc::mgmt::UpdateSwitch::Release,
            },
            token,
        },
        Op::Metrics => MgmtRequest::Metrics { token },
        Op::Validate(path) => MgmtRequest::Validate {
            license_token: read_trimmed("license token file", path)?,
            token,
        },
    };
    let name = request.name();
    let answer = client::call(
        &global.socket,
        &request,
        Duration::from_secs(global.timeout),
    )?;
    let result = into_result(name, answer, global.json)?;

    let mut out = io::stdout().lock();
    if global.json && !matches!(op, Op::Validate(_)) {
        writeln!(out, "{result}")?;
        return Ok(EXIT_OK);
    }
    match op {
        Op::Status => {
            let status: StatusView = parse(name, result)?;
            write_status(&mut out, &status)?;
        }
        Op::Rotate => match result.get("version").and_then(Value::as_u64) {
            Some(version) => writeln!(out, "rotated: secret version {version}")?,
            None => writeln!(out, "rotated")?,
        },
        Op::Invalidate(version) => writeln!(out, "secret version {version} invalidated")?,
        Op::Degraded(mode) => write_degraded(&mut out, mode, &result)?,
        Op::Update(UpdateArg::Hold) => writeln!(
            out,
            "updates held: no release will be staged until `update release`"
        )?,
        Op::Update(UpdateArg::Release) => writeln!(out, "updates released")?,
        Op::Metrics => {
            let text = result
                .get("text")
                .and_then(Value::as_str)
                .ok_or_else(|| bad_answer(name, "no `text` in the result"))?;
            out.write_all(text.as_bytes())?;
            if !text.is_empty() && !text.ends_with('\n') {
                writeln!(out)?;
            }
        }
        Op::Validate(_) => {
            let answer: ValidationView = parse(name, result.clone())?;
            if global.json {
                writeln!(out, "{result}")?;
            } else {
                write_validation(&mut out, &answer)?;
            }
            out.flush()?;
            return Ok(if answer.valid { EXIT_OK } else { EXIT_FAILED });
        }
    }
    out.flush()?;
    Ok(EXIT_OK)
}

/// The answer's `result`, or the agent's error (printed as JSON first with `--json`).
fn into_result(op: &'static str, answer: MgmtResponse, json: bool) -> Result<Value, MainError> {
    if answer.ok {
        return answer
            .result
            .ok_or_else(|| bad_answer(op, "`ok` without a `result`"));
    }
    let code = answer.error.unwrap_or(MgmtErrorCode::Failed);
    let message = answer.message.unwrap_or_default();
    if json {
        let mut out = io::stdout().lock();
        writeln!(out, "{}", json!({"error": code, "message": message}))?;
        out.flush()?;
    }
    Err(MainError::Agent {
        op,
        code,
        message: printable(&message),
    })
}

fn parse<T: serde::de::DeserializeOwned>(op: &str, result: Value) -> Result<T, MainError> {
    serde_json::from_value(result).map_err(|e| bad_answer(op, &e.to_string()))
}

fn bad_answer(op: &str, why: &str) -> MainError {
    MainError::Client(ClientError::BadAnswer(format!("{op}: {why}")))
}

/// A file's content without surrounding whitespace; an empty file is a usage error.
fn read_trimmed(what: &'static str, path: &Path) -> Result<String, MainError> {
    let read_err = |source| MainError::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    };
    let text = if path.as_os_str() == "-" {
        let mut text = String::new();
        io::stdin().read_to_string(&mut text).map_err(read_err)?;
        text
    } else {
        std::fs::read_to_string(path).map_err(read_err)?
    };
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(MainError::BadArgument {
            what,
            reason: format!("{} is empty", path.display()),
        });
    }
    Ok(trimmed.to_owned())
}

/// The agent's message, kept to one line of printable characters.
fn printable(message: &str) -> String {
    message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn or_never(value: &Option<String>) -> &str {
    value.as_deref().unwrap_or("never")
}

fn write_status(out: &mut impl Write, s: &StatusView) -> io::Result<()> {
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    writeln!(out, "machine          {}", s.machine_id)?;
    writeln!(out, "client id        {}", s.client_id)?;
    writeln!(
        out,
        "secret store     {} (TPM enabled: {}, available: {})",
        s.store,
        yes_no(s.tpm_enabled),
        yes_no(s.tpm_available)
    )?;
    if s.secrets.is_empty() {
        writeln!(out, "secrets          none")?;
    } else {
        writeln!(out, "secrets")?;
        writeln!(
            out,
            "  {:>7}  {:<7}  {:<25}  {:<25}  GRACE UNTIL",
            "VERSION", "STATE", "VALID FROM", "VALID UNTIL"
        )?;
        for secret in &s.secrets {
            writeln!(
                out,
                "  {:>7}  {:<7}  {:<25}  {:<25}  {}",
                secret.version,
                secret.state,
                secret.valid_from,
                secret.valid_until,
                secret.grace_until
            )?;
        }
    }
    let invalidated = if s.invalidated_versions.is_empty() {
        "none".to_owned()
    } else {
        let versions: Vec<String> = s.invalidated_versions.iter().map(u64::to_string).collect();
        versions.join(", ")
    };
    writeln!(out, "invalidated      {invalidated}")?;
    writeln!(
        out,
        "licenses         {} ({} revoked)",
        s.licenses, s.revoked_licenses
    )?;
    write!(
        out,
        "degraded mode    {} (policy {})",
        s.degraded_mode, s.degraded_policy
    )?;
    match &s.degraded_since {
        Some(since) => writeln!(out, ", since {since}")?,
        None => writeln!(out)?,
    }
    if let Some(since) = &s.machine_revoked_since {
        writeln!(out, "REVOKED          by the server since {since}")?;
    }
    if let Some(version) = &s.agent_version {
        writeln!(out, "agent version    {version}")?;
    }
    if let Some(u) = &s.update {
        let mut line = if !u.enabled {
            "disabled".to_string()
        } else if u.held {
            format!("HELD (channel {})", u.channel)
        } else {
            format!("channel {}", u.channel)
        };
        if let Some(v) = &u.offered {
            line.push_str(&format!(", offered {v}"));
        }
        if let Some(v) = &u.staged {
            line.push_str(&format!(", staged {v} (waiting for the update step)"));
        }
        writeln!(out, "updates          {line}")?;
        if let Some(l) = &u.last {
            let reason = if l.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", l.reason)
            };
            writeln!(
                out,
                "last update      {} from {}: {}{reason} at {}",
                l.version, l.from_version, l.outcome, l.at
            )?;
        }
    }
    writeln!(out, "server contact   {}", or_never(&s.last_server_contact))?;
    writeln!(out, "last rotation    {}", or_never(&s.last_rotation))?;
    writeln!(
        out,
        "next rotation    {}",
        s.next_rotation.as_deref().unwrap_or("-")
    )?;
    writeln!(
        out,
        "failures         {} consecutive",
        s.consecutive_failures
    )?;
    if let Some(c) = &s.certificate {
        writeln!(
            out,
            "certificate      serial {}, expires {}, renews {}",
            c.serial, c.expires_at, c.renews_at
        )?;
    }
    if let Some(t) = &s.trust {
        let keys: Vec<String> = t
            .license_keys
            .iter()
            .map(|(id, state)| format!("{id} ({state})"))
            .collect();
        writeln!(out, "license keys     {}", keys.join(", "))?;
        writeln!(out, "server pins      {}", t.server_pins.join(", "))?;
        if !t.retired_server_pins.is_empty() {
            writeln!(out, "retired pins     {}", t.retired_server_pins.join(", "))?;
        }
        for ca in &t.cas {
            writeln!(
                out,
                "trusted CA       {} (expires {})",
                ca.subject, ca.expires_at
            )?;
        }
    }
    if s.clock_rollback_secs != 0 {
        writeln!(
            out,
            "clock rollback   {} s behind the highest time seen",
            s.clock_rollback_secs
        )?;
    }
    for (key, value) in &s.extra {
        writeln!(out, "{key:<16} {value}")?;
    }
    Ok(())
}

/// `degraded`'s answer: the agent's description of the new state (`{"degraded": "..."}`), or
/// the new mode and policy under the names `status` uses (or short ones).
fn write_degraded(out: &mut impl Write, asked: DegradedArg, result: &Value) -> io::Result<()> {
    let field = |long: &str, short: &str| {
        result
            .get(long)
            .or_else(|| result.get(short))
            .and_then(Value::as_str)
            .map(printable)
    };
    if let Some(state) = result.get("degraded").and_then(Value::as_str) {
        return writeln!(out, "degraded mode: {}", printable(state));
    }
    match (
        field("degraded_mode", "mode"),
        field("degraded_policy", "policy"),
    ) {
        (None, None) => {
            let asked = match asked {
                DegradedArg::On => "on",
                DegradedArg::Off => "off",
                DegradedArg::Auto => "auto",
            };
            writeln!(out, "degraded mode switched {asked}")
        }
        (mode, policy) => writeln!(
            out,
            "degraded mode {} (policy {})",
            mode.as_deref().unwrap_or("?"),
            policy.as_deref().unwrap_or("?")
        ),
    }
}

fn write_validation(out: &mut impl Write, v: &ValidationView) -> io::Result<()> {
    if !v.valid {
        let reason = v.reason.as_deref().unwrap_or("unknown");
        return writeln!(out, "invalid: {}", printable(reason));
    }
    let features = if v.features.is_empty() {
        "(none)".to_owned()
    } else {
        v.features.join(",")
    };
    let expires = v.expires_at.as_deref().unwrap_or("never");
    writeln!(out, "valid: features {features}; expires {expires}")?;
    for (key, value) in &v.metadata {
        writeln!(out, "  {key}: {value}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use license_ipc::mgmt::SecretView;

    fn status() -> StatusView {
        StatusView {
            machine_id: "m-1".into(),
            client_id: "c-1".into(),
            secrets: vec![SecretView {
                version: 3,
                state: "active".into(),
                valid_from: "2026-01-01T00:00:00Z".into(),
                valid_until: "2026-02-01T00:00:00Z".into(),
                grace_until: "2026-02-08T00:00:00Z".into(),
            }],
            invalidated_versions: vec![1, 2],
            store: "file".into(),
            tpm_enabled: false,
            tpm_available: false,
            licenses: 4,
            revoked_licenses: 1,
            degraded_mode: "inactive".into(),
            degraded_policy: "allow".into(),
            degraded_since: None,
            last_server_contact: None,
            last_rotation: Some("2026-01-01T00:00:00Z".into()),
            next_rotation: None,
            consecutive_failures: 0,
            clock_rollback_secs: 0,
            certificate: None,
            trust: None,
            machine_revoked_since: None,
            agent_version: None,
            update: None,
            extra: BTreeMap::new(),
        }
    }

    fn render(s: &StatusView) -> String {
        let mut out = Vec::new();
        write_status(&mut out, s).unwrap_or_else(|e| panic!("{e}"));
        String::from_utf8(out).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn status_block() {
        let text = render(&status());
        assert!(text.contains("machine          m-1"), "{text}");
        assert!(text.contains("invalidated      1, 2"), "{text}");
        assert!(text.contains("server contact   never"), "{text}");
        assert!(!text.contains("clock rollback"), "{text}");
        let mut s = status();
        s.clock_rollback_secs = 90;
        s.degraded_since = Some("2026-01-02T00:00:00Z".into());
        let text = render(&s);
        assert!(text.contains("clock rollback   90 s"), "{text}");
        assert!(text.contains(", since 2026-01-02T00:00:00Z"), "{text}");
    }

    #[test]
    fn messages_stay_on_one_line() {
        assert_eq!(printable("a\nb\x1b[2J"), "a b [2J");
    }
}
