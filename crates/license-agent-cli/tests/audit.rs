//! Runs the real `license-agent-cli` binary on audit logs written by the library: output,
//! `--json` and exit codes of `audit verify` and `audit show`.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use license_audit::{Actor, AuditLog, Event, LogOptions, Outcome};
use serde_json::Value;

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_license-agent-cli"))
        .env_remove("LICENSE_AGENT_AUDIT_LOG")
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// A log with 3 validations and 1 rotation request; returns (path, last hash).
fn write_log(dir: &Path) -> (PathBuf, String) {
    let path = dir.join("audit.log");
    let log = AuditLog::open(&path, LogOptions::default()).unwrap();
    for i in 0..3 {
        log.append(
            Event::new("license.validate", Outcome::Success)
                .actor(Actor::peer(1000, 4242))
                .detail("version", i),
        )
        .unwrap();
    }
    let r = log
        .append(Event::new("mgmt.rotate", Outcome::Refused).actor(Actor::peer(1001, 7)))
        .unwrap();
    (path, r.hash)
}

#[test]
fn verify_reports_an_intact_log() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = write_log(dir.path());
    let o = cli(&["audit", "verify", "--log", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(
        stdout(&o).trim(),
        "audit log OK: 4 entries in 1 files, last seq 4"
    );

    let o = cli(&["audit", "verify", "--json", "--log", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["entries"], 4);
    assert_eq!(v["last_seq"], 4);
}

#[test]
fn verify_reports_tampering_with_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = write_log(dir.path());
    let text = fs::read_to_string(&path).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    let modified = lines[2].replace("\"version\":2", "\"version\":9");
    lines[2] = &modified;
    fs::write(&path, lines.join("\n") + "\n").unwrap();

    let o = cli(&["audit", "verify", "--log", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let out = stdout(&o);
    assert!(
        out.starts_with(&format!(
            "audit log TAMPERED at {}:3 (seq 3): ",
            path.display()
        )),
        "{out}"
    );
    assert!(out.contains("modified"), "{out}");

    let o = cli(&["audit", "verify", "--json", "--log", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["status"], "tampered");
    assert_eq!(v["problem"]["line"], 3);
    assert_eq!(v["problem"]["seq"], 3);
    assert_eq!(v["problem"]["kind"], "hash_mismatch");
}

#[test]
fn verify_with_an_anchor_finds_removed_trailing_entries() {
    let dir = tempfile::tempdir().unwrap();
    let (path, last_hash) = write_log(dir.path());
    let log = path.to_str().unwrap();
    let anchor = ["--anchor-seq", "4", "--anchor-hash", &last_hash];
    let mut args = vec!["audit", "verify", "--log", log];
    args.extend(anchor);
    assert_eq!(cli(&args).status.code(), Some(0));

    let text = fs::read_to_string(&path).unwrap();
    let kept: Vec<&str> = text.lines().take(3).collect();
    fs::write(&path, kept.join("\n") + "\n").unwrap();
    assert_eq!(
        cli(&["audit", "verify", "--log", log]).status.code(),
        Some(0)
    );
    let o = cli(&args);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("trailing entries removed"), "{o:?}");
    // --anchor-seq alone is a usage error.
    assert_eq!(
        cli(&["audit", "verify", "--log", log, "--anchor-seq", "4"])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn verify_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing/audit.log");
    let o = cli(&["audit", "verify", "--log", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no audit log"));
    assert_eq!(cli(&["audit", "verify", "--nope"]).status.code(), Some(2));
    assert_eq!(cli(&["audit"]).status.code(), Some(2));
}

#[test]
fn show_prints_a_table_and_filters() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = write_log(dir.path());
    let log = path.to_str().unwrap();

    let o = cli(&["audit", "show", "--log", log]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let out = stdout(&o);
    let rows: Vec<&str> = out.lines().collect();
    assert_eq!(rows.len(), 5, "{out}");
    assert!(rows[0].contains("SEQ") && rows[0].contains("EVENT"));
    assert!(rows[4].contains("mgmt.rotate") && rows[4].contains("refused"));
    assert!(rows[1].contains("{\"version\":0}"), "{out}");

    let o = cli(&[
        "audit",
        "show",
        "--log",
        log,
        "--event",
        "mgmt.rotate",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0));
    let entries: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["seq"], 4);
    assert_eq!(entries[0]["actor"]["uid"], 1001);

    let o = cli(&[
        "audit",
        "show",
        "--log",
        log,
        "--since",
        "2999-01-01T00:00:00Z",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).is_empty());
    let o = cli(&[
        "audit",
        "show",
        "--log",
        log,
        "--since",
        "2000-01-01T00:00:00Z",
        "--json",
    ]);
    assert_eq!(stdout(&o).lines().count(), 4);

    let o = cli(&["audit", "show", "--log", log, "--since", "yesterday"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn show_warns_about_unreadable_lines_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = write_log(dir.path());
    let mut text = fs::read_to_string(&path).unwrap();
    text.insert_str(0, "not json\n");
    fs::write(&path, text).unwrap();
    let o = cli(&[
        "audit",
        "show",
        "--json",
        "--log",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(stdout(&o).lines().count(), 4);
    assert!(String::from_utf8_lossy(&o.stderr).contains(":1:"));
}
