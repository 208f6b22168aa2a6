//! The update step (`license-agent update apply`): runs as root outside the daemon's sandbox,
//! started by systemd's `license-agent-update.path` when the daemon stages a release, and at
//! boot while an update is unfinished.
//!
//! Steps, each recorded in a journal (`<work_dir>/journal.json`, root's only) before the next
//! begins, so a power cut anywhere resumes where it stopped:
//! 1. **verify**: copy the staged binary into the work directory and check it there (size,
//!    SHA-256), the manifest's signature by a release key the license keys vouch for —
//!    against trust kept in the work directory, starting from the license key pinned in the
//!    configuration — the architecture and that it is no downgrade. Nothing the daemon's user
//!    could have written is believed unchecked.
//! 2. **stop** the agent (`[update] stop_command`).
//! 3. **backup** the configuration file and the state directory into `<work_dir>/backup`.
//! 4. **swap**: keep the installed binary as `<work_dir>/previous`, then rename the new one
//!    over it (a rename: the path holds the old or the new binary, never neither).
//! 5. **start** the agent (`[update] start_command`).
//! 6. **health**: within `[update] health_deadline`, the agent must answer `status` on its
//!    management socket with the new version and a round with the server finished since it
//!    started.
//!
//! On failure at 5 or 6, **rollback**: stop, put the previous binary back, restore the backup,
//! start. The [`UpdateResult`] (every step with its time) is left in the staging directory
//! for the daemon to audit and report, and the staging directory is cleared.
//!
//! What to do next is decided from the journal alone ([`Journal::step`]); the machine is
//! reached through [`Host`], so the whole sequence, resumptions included, is tested with a
//! fake host and real files.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use license_protocol::license_keys::{KeySetError, StoredTrust, TrustedKeys};
use license_protocol::release::{self, ReleaseTrust, UpdateOutcome, Version};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{running_version, Staging, StagingError, StepRecord, UpdateResult, ARCH};
use crate::platform::files::{ensure_dir, rename_durable, write_atomic, PRIVATE};

/// Test hook, as the engine's: `LICENSE_AGENT_TEST_CRASH_AT=update.<step>` aborts the update
/// step right after that step is journaled (`update.verified`, `update.stopped`,
/// `update.backed_up`, `update.swapping`, `update.swap_half`, `update.swapped`,
/// `update.started`, `update.rolling_back`, `update.done`), as a power cut would.
const CRASH_ENV: &str = "LICENSE_AGENT_TEST_CRASH_AT";

fn crash_point(step: &str) {
    if std::env::var(CRASH_ENV).is_ok_and(|v| v == format!("update.{step}")) {
        eprintln!("license-agent: test crash at update.{step}");
        std::process::abort();
    }
}

/// Where the update step works and what it checks against.
#[derive(Debug, Clone)]
pub struct Plan {
    pub staging: Staging,
    /// Root's only: journal, candidate binary, backup, previous binary, trust.
    pub work_dir: PathBuf,
    /// The installed agent binary.
    pub binary: PathBuf,
    /// The update step's own copy, refreshed after a successful update when it exists.
    pub step_binary: PathBuf,
    pub config_file: PathBuf,
    pub state_dir: PathBuf,
    /// `[server] license_public_key`: where the step's trust starts.
    pub license_pin: ed25519_dalek::VerifyingKey,
    pub health_deadline: Duration,
}

impl Plan {
    fn journal(&self) -> PathBuf {
        self.work_dir.join("journal.json")
    }
    fn candidate(&self) -> PathBuf {
        self.work_dir.join("candidate")
    }
    fn previous(&self) -> PathBuf {
        self.work_dir.join("previous")
    }
    fn backup(&self) -> PathBuf {
        self.work_dir.join("backup")
    }
    fn license_keys(&self) -> PathBuf {
        self.work_dir.join("license-keys.json")
    }
    fn release_keys(&self) -> PathBuf {
        self.work_dir.join("release-keys.json")
    }
}

/// What the update step needs from the machine.
pub trait Host {
    /// Stops the agent (waits until it has).
    fn stop(&mut self) -> Result<(), String>;
    /// Starts the agent.
    fn start(&mut self) -> Result<(), String>;
    /// `Ok` once the running agent is `version` and finished a round with the server at or
    /// after `since` (Unix seconds); otherwise why not yet.
    fn probe(&mut self, version: Version, since: i64) -> Result<(), String>;
    /// Unix seconds.
    fn now(&self) -> i64;
    /// Pauses between two probes.
    fn pause(&mut self);
}

/// Where an update stands (the journal's `step`): the last step completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Verified,
    Stopped,
    BackedUp,
    /// The previous binary may or may not be kept yet, the new one may or may not be in place.
    Swapping,
    Swapped,
    Started,
    RollingBack,
    Done,
}

/// `<work_dir>/journal.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    pub release_id: uuid::Uuid,
    pub version: Version,
    pub from_version: Version,
    /// Hex SHA-256 of the new binary (the candidate).
    pub sha256: String,
    /// Hex SHA-256 of the installed binary when the swap began.
    pub previous_sha256: Option<String>,
    pub step: Step,
    /// When the new version was started (the health check counts from there).
    pub started_at: Option<i64>,
    pub outcome: Option<UpdateOutcome>,
    pub reason: String,
    pub steps: Vec<StepRecord>,
}

impl Journal {
    fn record(&mut self, step: &str, at: i64, detail: impl Into<String>) {
        self.steps.push(StepRecord {
            step: step.into(),
            at,
            detail: detail.into(),
        });
    }

    fn result(&self) -> UpdateResult {
        UpdateResult {
            release_id: self.release_id,
            version: self.version,
            from_version: self.from_version,
            outcome: self.outcome.unwrap_or(UpdateOutcome::Failed),
            reason: self.reason.clone(),
            steps: self.steps.clone(),
        }
    }
}

/// Why the update step could not go on (the journal is kept; the next run resumes).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Malformed { path: String, message: String },
    #[error(transparent)]
    Staging(#[from] StagingError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ApplyError + '_ {
    move |source| ApplyError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A refusal at the verify step: a reason code and what was wrong.
struct Refusal {
    code: &'static str,
    detail: String,
}

impl From<release::ReleaseError> for Refusal {
    fn from(e: release::ReleaseError) -> Self {
        Refusal {
            code: e.code(),
            detail: e.to_string(),
        }
    }
}

/// Runs the update step: resumes an unfinished update, or installs the staged release.
/// `Ok(None)` when there was nothing to do.
pub fn apply(plan: &Plan, host: &mut impl Host) -> Result<Option<UpdateResult>, ApplyError> {
    ensure_dir(&plan.work_dir, 0o700).map_err(io(&plan.work_dir))?;
    let mut journal = match load_journal(plan)? {
        Some(mut journal) => {
            if journal.step != Step::Done {
                let at = host.now();
                journal.record("resume", at, format!("after {:?}", journal.step));
                match journal.step {
                    // The machine started the agent at boot: stop it again before the backup
                    // is redone or the swap finished (the backup then holds what it wrote).
                    Step::Verified | Step::Stopped | Step::BackedUp | Step::Swapping => {
                        if let Err(e) = host.stop() {
                            journal.record("stop", at, e);
                        }
                        if journal.step != Step::Swapping {
                            journal.step = Step::Stopped;
                        }
                    }
                    // The new version was started at boot and made its first round then,
                    // before this step could count it (while its watch stream is held it
                    // makes the next one an hour later): stopped, and started again by the
                    // step, its health counting from that start.
                    Step::Swapped | Step::Started => {
                        if let Err(e) = host.stop() {
                            journal.record("stop", at, e);
                        }
                        journal.step = Step::Swapped;
                    }
                    Step::RollingBack | Step::Done => {}
                }
                tracing::warn!(step = ?journal.step, "resuming an unfinished update");
            }
            journal
        }
        None => {
            if !plan.staging.is_ready() {
                return Ok(None);
            }
            match verify(plan, host.now()) {
                Ok(journal) => journal,
                Err(refused) => {
                    let result = refused.result();
                    let detail = result.steps.last().map_or("", |s| s.detail.as_str());
                    tracing::error!(reason = %result.reason, detail, "staged release refused");
                    plan.staging.write_result(&result)?;
                    plan.staging.clear();
                    let _ = std::fs::remove_file(plan.candidate());
                    return Ok(Some(result));
                }
            }
        }
    };
    save_journal(plan, &journal)?;
    crash_point("verified");
    loop {
        let now = host.now();
        journal.step = match journal.step {
            Step::Verified => match host.stop() {
                Ok(()) => {
                    journal.record("stop", now, "ok");
                    Step::Stopped
                }
                Err(e) => {
                    // Nothing changed: start the old one again.
                    journal.record("stop", now, e);
                    let _ = host.start();
                    journal.outcome = Some(UpdateOutcome::Failed);
                    journal.reason = "stop_failed".into();
                    Step::Done
                }
            },
            Step::Stopped => {
                backup(plan)?;
                journal.record("backup", now, "ok");
                Step::BackedUp
            }
            Step::BackedUp => {
                journal.previous_sha256 = Some(digest_of(&plan.binary)?.1);
                journal.step = Step::Swapping;
                save_journal(plan, &journal)?;
                crash_point("swapping");
                swap(plan, &journal)?;
                journal.record("swap", now, "ok");
                Step::Swapped
            }
            Step::Swapping => {
                swap(plan, &journal)?;
                journal.record("swap", now, "ok");
                Step::Swapped
            }
            Step::Swapped => {
                journal.started_at = Some(now);
                match host.start() {
                    Ok(()) => {
                        journal.record("start", now, "ok");
                        Step::Started
                    }
                    Err(e) => {
                        journal.record("start", now, e);
                        journal.reason = "start_failed".into();
                        Step::RollingBack
                    }
                }
            }
            Step::Started => {
                let since = journal.started_at.unwrap_or(now);
                match health(plan, host, journal.version, since) {
                    Ok(()) => {
                        journal.record("health", host.now(), "ok");
                        journal.outcome = Some(UpdateOutcome::Success);
                        if plan.step_binary.exists() && plan.step_binary != plan.binary {
                            // The next update runs this version's step.
                            restore_file(&plan.binary, &plan.step_binary)?;
                        }
                        Step::Done
                    }
                    Err(why) => {
                        journal.record("health", host.now(), why);
                        journal.reason = "health_check_failed".into();
                        Step::RollingBack
                    }
                }
            }
            Step::RollingBack => {
                rollback(plan, host, &mut journal)?;
                journal.outcome = Some(UpdateOutcome::Failed);
                Step::Done
            }
            Step::Done => break,
        };
        save_journal(plan, &journal)?;
        crash_point(match journal.step {
            Step::Verified => "verified",
            Step::Stopped => "stopped",
            Step::BackedUp => "backed_up",
            Step::Swapping => "swapping",
            Step::Swapped => "swapped",
            Step::Started => "started",
            Step::RollingBack => "rolling_back",
            Step::Done => "done",
        });
    }
    // Done: the result for the daemon, then the staging directory cleared (its `ready` last
    // read by systemd), then the journal.
    let result = journal.result();
    plan.staging.write_result(&result)?;
    plan.staging.clear();
    let _ = std::fs::remove_file(plan.candidate());
    std::fs::remove_file(plan.journal()).map_err(io(&plan.journal()))?;
    tracing::info!(version = %result.version, outcome = result.outcome.as_str(), reason = %result.reason, "update finished");
    Ok(Some(result))
}

fn load_journal(plan: &Plan) -> Result<Option<Journal>, ApplyError> {
    let path = plan.journal();
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ApplyError::Malformed {
                path: path.display().to_string(),
                message: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&path)(e)),
    }
}

fn save_journal(plan: &Plan, journal: &Journal) -> Result<(), ApplyError> {
    let json = serde_json::to_vec_pretty(journal).expect("journals serialize");
    write_atomic(&plan.journal(), &json, PRIVATE).map_err(io(&plan.journal()))
}

/// Copies `from` to `to` (created with `mode`), durably; answers the size and hex SHA-256 of
/// what was copied. Streams: memory is flat whatever the size.
fn copy_hashing(from: &Path, to: &Path, mode: u32) -> Result<(u64, String), ApplyError> {
    let tmp = to.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut output = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    let digest = hash_into(from, &mut output, &tmp)?;
    output.sync_all().map_err(io(&tmp))?;
    // The mode again: the umask may have narrowed it.
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    rename_durable(&tmp, to).map_err(io(to))?;
    Ok(digest)
}

/// Size and hex SHA-256 of a file.
fn digest_of(path: &Path) -> Result<(u64, String), ApplyError> {
    hash_into(path, &mut std::io::sink(), path)
}

/// Streams the file at `from` into `output` (named `to` in errors), 64 KiB at a time, hashing
/// it: its size and hex SHA-256. Memory is flat whatever the size.
fn hash_into(from: &Path, output: &mut impl Write, to: &Path) -> Result<(u64, String), ApplyError> {
    let mut input = File::open(from).map_err(io(from))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = input.read(&mut buffer).map_err(io(from))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        output.write_all(&buffer[..n]).map_err(io(to))?;
        size += n as u64;
    }
    Ok((size, release::hex(&hasher.finalize())))
}

/// Step 1. On refusal, the journal to report it with (outcome `refused`, the reason code, the
/// detail in its `verify` step).
fn verify(plan: &Plan, now: i64) -> Result<Journal, Box<Journal>> {
    let bundle = plan.staging.read_bundle();
    let placeholder = |refusal: Refusal| {
        let mut journal = Journal {
            release_id: uuid::Uuid::nil(),
            version: running_version(),
            from_version: running_version(),
            sha256: String::new(),
            previous_sha256: None,
            step: Step::Done,
            started_at: None,
            outcome: Some(UpdateOutcome::Refused),
            reason: refusal.code.into(),
            steps: Vec::new(),
        };
        journal.record("verify", now, refusal.detail);
        Box::new(journal)
    };
    let bundle = bundle.map_err(|e| {
        placeholder(Refusal {
            code: "malformed_bundle",
            detail: e.to_string(),
        })
    })?;
    let manifest = &bundle.offer.manifest;
    let mut journal = Journal {
        release_id: manifest.release_id,
        version: manifest.version,
        from_version: running_version(),
        sha256: manifest.sha256.clone(),
        previous_sha256: None,
        step: Step::Verified,
        started_at: None,
        outcome: None,
        reason: String::new(),
        steps: Vec::new(),
    };
    let checked = (|| -> Result<(), Refusal> {
        let unreadable = |e: ApplyError| Refusal {
            code: "unreadable_binary",
            detail: e.to_string(),
        };
        let (size, sha256) =
            copy_hashing(&plan.staging.binary(), &plan.candidate(), 0o700).map_err(unreadable)?;
        let license = license_trust(plan, &bundle.license_keys);
        let mut trust = read_or_default::<ReleaseTrust>(&plan.release_keys());
        trust.verify(&bundle.offer, &license)?;
        release::applicable(manifest, running_version(), ARCH)?;
        release::check_binary(manifest, size, &sha256)?;
        let json = serde_json::to_vec_pretty(&trust).expect("trust serializes");
        write_atomic(&plan.release_keys(), &json, PRIVATE).map_err(|e| Refusal {
            code: "unreadable_binary",
            detail: format!("{}: {e}", plan.release_keys().display()),
        })?;
        Ok(())
    })();
    match checked {
        Ok(()) => {
            journal.record("verify", now, "ok");
            Ok(journal)
        }
        Err(refusal) => {
            journal.step = Step::Done;
            journal.outcome = Some(UpdateOutcome::Refused);
            journal.reason = refusal.code.into();
            journal.record("verify", now, refusal.detail);
            Err(Box::new(journal))
        }
    }
}

/// The license keys the step trusts: the configured pin, what it accepted before (kept in
/// its work directory), and `offered` when a key it trusts signed it.
fn license_trust(
    plan: &Plan,
    offered: &license_protocol::license_keys::LicenseKeySet,
) -> TrustedKeys {
    let held = std::fs::read(plan.license_keys())
        .ok()
        .and_then(|b| serde_json::from_slice::<StoredTrust>(&b).ok())
        .and_then(|s| TrustedKeys::from_stored(&s).ok());
    let mut trust = match held {
        Some(held) => held.with_pin(plan.license_pin),
        None => TrustedKeys::pinned(plan.license_pin),
    };
    match trust.accept(offered) {
        Ok(()) => {
            let json = serde_json::to_vec_pretty(&trust.to_stored()).expect("trust serializes");
            if let Err(e) = write_atomic(&plan.license_keys(), &json, PRIVATE) {
                tracing::warn!(error = %e, "cannot keep the license keys learned");
            }
        }
        Err(KeySetError::Older { .. }) => {}
        Err(e) => {
            tracing::warn!(error = %e, "the staged license key set was refused; the keys held are used")
        }
    }
    trust
}

fn read_or_default<T: serde::de::DeserializeOwned + Default>(path: &Path) -> T {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Copies `from` over `to` keeping `from`'s mode and owner, durably (temp file and rename).
fn restore_file(from: &Path, to: &Path) -> Result<(), ApplyError> {
    let meta = std::fs::metadata(from).map_err(io(from))?;
    let tmp = to.with_file_name(format!(
        ".{}.update-tmp",
        to.file_name().unwrap_or_default().to_string_lossy()
    ));
    copy_hashing(from, &tmp, meta.mode() & 0o7777)?;
    std::os::unix::fs::chown(&tmp, Some(meta.uid()), Some(meta.gid())).map_err(io(&tmp))?;
    rename_durable(&tmp, to).map_err(io(to))
}

/// Copies the regular files and directories under `from` into `to` (created), keeping modes
/// and owners, skipping `skip` (the staging directory) and anything else (sockets).
fn copy_tree(from: &Path, to: &Path, skip: &Path) -> Result<(), ApplyError> {
    let meta = std::fs::metadata(from).map_err(io(from))?;
    ensure_dir(to, 0o700).map_err(io(to))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(io(to))?;
    std::os::unix::fs::chown(to, Some(meta.uid()), Some(meta.gid())).map_err(io(to))?;
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let path = entry.path();
        if path == skip {
            continue;
        }
        let kind = entry.file_type().map_err(io(&path))?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&path, &target, skip)?;
        } else if kind.is_file() {
            restore_file(&path, &target)?;
        }
    }
    Ok(())
}

/// Step 3: `<work_dir>/backup/config` and `<work_dir>/backup/state/`, made afresh.
fn backup(plan: &Plan) -> Result<(), ApplyError> {
    let dir = plan.backup();
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    ensure_dir(&dir, 0o700).map_err(io(&dir))?;
    restore_file(&plan.config_file, &dir.join("config"))?;
    copy_tree(&plan.state_dir, &dir.join("state"), plan.staging.dir())
}

/// Step 4: the installed binary kept as `previous` (unless that was done before a power
/// cut: the installed one is then already the new one or still the old one, which the
/// journal's digests tell apart), then the candidate renamed over the installed one.
fn swap(plan: &Plan, journal: &Journal) -> Result<(), ApplyError> {
    let installed = digest_of(&plan.binary).ok().map(|(_, d)| d);
    if installed.as_deref() == Some(journal.sha256.as_str()) {
        return Ok(());
    }
    let kept = digest_of(&plan.previous()).ok().map(|(_, d)| d);
    if kept.is_none() || kept != journal.previous_sha256 {
        restore_file(&plan.binary, &plan.previous())?;
    }
    crash_point("swap_half");
    let meta = std::fs::metadata(&plan.binary).map_err(io(&plan.binary))?;
    let tmp = plan.binary.with_file_name(".license-agent.update-tmp");
    copy_hashing(&plan.candidate(), &tmp, 0o755)?;
    std::os::unix::fs::chown(&tmp, Some(meta.uid()), Some(meta.gid())).map_err(io(&tmp))?;
    rename_durable(&tmp, &plan.binary).map_err(io(&plan.binary))
}

/// Step 6: probes until the deadline.
fn health(plan: &Plan, host: &mut impl Host, version: Version, since: i64) -> Result<(), String> {
    let deadline = since.saturating_add(plan.health_deadline.as_secs() as i64);
    loop {
        let last = match host.probe(version, since) {
            Ok(()) => return Ok(()),
            Err(why) => why,
        };
        if host.now() >= deadline {
            return Err(format!(
                "not healthy within {} s: {last}",
                plan.health_deadline.as_secs()
            ));
        }
        host.pause();
    }
}

/// Stop, previous binary back, backup restored, start.
fn rollback(plan: &Plan, host: &mut impl Host, journal: &mut Journal) -> Result<(), ApplyError> {
    if let Err(e) = host.stop() {
        tracing::warn!(error = %e, "stopping the failed version");
    }
    let installed = digest_of(&plan.binary).ok().map(|(_, d)| d);
    if installed != journal.previous_sha256 && plan.previous().exists() {
        restore_file(&plan.previous(), &plan.binary)?;
    }
    let backup = plan.backup();
    if backup.join("config").exists() {
        restore_file(&backup.join("config"), &plan.config_file)?;
    }
    if backup.join("state").is_dir() {
        copy_tree(&backup.join("state"), &plan.state_dir, plan.staging.dir())?;
    }
    let now = host.now();
    let detail = match host.start() {
        // The previous version proves itself as the new one had to (recorded, not retried).
        Ok(()) => match health(plan, host, journal.from_version, now) {
            Ok(()) => "ok".to_string(),
            Err(why) => format!("restored; the previous version: {why}"),
        },
        Err(e) => format!("restored; start: {e}"),
    };
    journal.record("rollback", now, detail);
    Ok(())
}

/// The real machine: the configured commands, the management socket, the wall clock.
#[derive(Debug)]
pub struct SystemHost {
    pub stop_command: Vec<String>,
    pub start_command: Vec<String>,
    pub mgmt_socket: PathBuf,
    pub mgmt_token: Option<String>,
}

fn run(command: &[String]) -> Result<(), String> {
    let (program, args) = command.split_first().ok_or("no command configured")?;
    let status = std::process::Command::new(program)
        .args(args)
        .status()
        .map_err(|e| format!("{program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{} exited with {status}", command.join(" ")))
    }
}

impl Host for SystemHost {
    fn stop(&mut self) -> Result<(), String> {
        run(&self.stop_command)
    }

    fn start(&mut self) -> Result<(), String> {
        run(&self.start_command)
    }

    fn probe(&mut self, version: Version, since: i64) -> Result<(), String> {
        let view = mgmt_status(&self.mgmt_socket, self.mgmt_token.clone())?;
        let running = view.agent_version.as_deref().unwrap_or("unknown");
        if running != version.to_string() {
            return Err(format!("the agent runs version {running}"));
        }
        let contact = view
            .last_server_contact
            .as_deref()
            .and_then(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
            })
            .map(time::OffsetDateTime::unix_timestamp);
        match contact {
            Some(at) if at >= since && view.consecutive_failures == 0 => Ok(()),
            _ => Err("no round with the server finished since it started".into()),
        }
    }

    fn now(&self) -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    fn pause(&mut self) {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// One `status` request on the management socket.
fn mgmt_status(
    socket: &Path,
    token: Option<String>,
) -> Result<license_protocol::mgmt::StatusView, String> {
    use license_protocol::ipc::{encode_frame, frame_len};
    use license_protocol::mgmt::{MgmtRequest, MgmtResponse};
    let fail = |e: std::io::Error| format!("management socket {}: {e}", socket.display());
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(fail)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(fail)?;
    let request = serde_json::to_vec(&MgmtRequest::Status { token }).expect("requests serialize");
    stream.write_all(&encode_frame(&request)).map_err(fail)?;
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).map_err(fail)?;
    let mut answer = vec![0u8; frame_len(header).map_err(|e| e.to_string())?];
    stream.read_exact(&mut answer).map_err(fail)?;
    let answer: MgmtResponse = serde_json::from_slice(&answer).map_err(|e| e.to_string())?;
    match (answer.ok, answer.result) {
        (true, Some(result)) => serde_json::from_value(result).map_err(|e| e.to_string()),
        _ => Err(format!(
            "status refused: {}",
            answer.message.unwrap_or_default()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::Bundle;
    use license_protocol::license_keys::{AnnouncedKey, KeyState, LicenseKeySet};
    use license_protocol::release::{
        AnnouncedReleaseKey, ReleaseKeyState, ReleaseKeys, ReleaseManifest, UpdateOffer,
    };

    /// A machine where the agent runs `binary`; `healthy` says whether the new one proves
    /// itself, `running` which binary content runs (what start saw).
    struct FakeHost {
        binary: PathBuf,
        healthy: bool,
        now: i64,
        running: Option<Vec<u8>>,
        /// When the running agent started: it makes its one round with the server then (a
        /// real one holding its watch stream makes the next an hour later).
        started_at: i64,
        log: Vec<String>,
    }

    impl Host for FakeHost {
        fn stop(&mut self) -> Result<(), String> {
            self.running = None;
            self.log.push("stop".into());
            Ok(())
        }
        fn start(&mut self) -> Result<(), String> {
            // As `systemctl start`: nothing for an agent already running.
            if self.running.is_some() {
                self.log.push("start".into());
                return Ok(());
            }
            self.running = Some(std::fs::read(&self.binary).map_err(|e| e.to_string())?);
            self.started_at = self.now;
            self.log.push("start".into());
            Ok(())
        }
        fn probe(&mut self, version: Version, since: i64) -> Result<(), String> {
            let old = version == running_version();
            if self.started_at < since {
                return Err("no round with the server finished since it started".into());
            }
            match (&self.running, self.healthy) {
                (Some(b), true) if b == b"NEW" && !old => Ok(()),
                (Some(b), _) if b == b"OLD" && old => Ok(()),
                _ => Err("not the version asked for".into()),
            }
        }
        fn now(&self) -> i64 {
            self.now
        }
        fn pause(&mut self) {
            self.now += 10;
        }
    }

    struct Machine {
        _dir: tempfile::TempDir,
        plan: Plan,
        host: FakeHost,
        license: ed25519_dalek::SigningKey,
    }

    fn machine() -> Machine {
        let dir = tempfile::tempdir().expect("dir");
        let root = dir.path();
        let state_dir = root.join("state");
        std::fs::create_dir_all(state_dir.join("tokens")).expect("state");
        std::fs::write(state_dir.join("state.json"), "before").expect("state");
        std::fs::write(state_dir.join("tokens/t1"), "token").expect("token");
        std::fs::write(root.join("config.toml"), "config before").expect("config");
        std::fs::write(root.join("license-agent"), "OLD").expect("binary");
        std::fs::write(root.join("license-agent-update"), "OLD").expect("step binary");
        let license = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let plan = Plan {
            staging: Staging::new(state_dir.join("updates")),
            work_dir: root.join("work"),
            binary: root.join("license-agent"),
            step_binary: root.join("license-agent-update"),
            config_file: root.join("config.toml"),
            state_dir,
            license_pin: license.verifying_key(),
            health_deadline: Duration::from_secs(60),
        };
        let host = FakeHost {
            binary: plan.binary.clone(),
            healthy: true,
            now: 1_000,
            running: Some(b"OLD".to_vec()),
            started_at: 0,
            log: Vec::new(),
        };
        Machine {
            _dir: dir,
            plan,
            host,
            license,
        }
    }

    /// Stages `served` as the binary of a release of `content`, vouched for by `signer`.
    fn stage(m: &Machine, content: &[u8], served: &[u8], signer: &ed25519_dalek::SigningKey) {
        let release_key = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
        let manifest = ReleaseManifest {
            release_id: uuid::Uuid::new_v4(),
            version: "99.1.0".parse().expect("version"),
            channel: "stable".parse().expect("channel"),
            arch: ARCH.into(),
            sha256: release::hex(&Sha256::digest(content)),
            size: content.len() as u64,
            min_version: None,
            rollback: false,
            published_at: 1,
        };
        let keys = ReleaseKeys::sign(
            vec![AnnouncedReleaseKey::new(
                &release_key.verifying_key(),
                ReleaseKeyState::Current,
            )],
            5,
            &[signer],
        );
        let license_keys = LicenseKeySet::sign(
            vec![AnnouncedKey::new(
                &signer.verifying_key(),
                KeyState::Current,
                1,
            )],
            1,
            &[signer],
        );
        std::fs::create_dir_all(m.plan.staging.dir()).expect("staging");
        std::fs::write(m.plan.staging.binary(), served).expect("binary");
        m.plan
            .staging
            .stage(&Bundle {
                offer: UpdateOffer::sign(manifest, &release_key, keys),
                license_keys,
            })
            .expect("staged");
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).expect("read")
    }

    #[test]
    fn nothing_staged_is_nothing_to_do() {
        let mut m = machine();
        assert_eq!(apply(&m.plan, &mut m.host).expect("apply"), None);
        assert!(m.host.log.is_empty());
    }

    #[test]
    fn a_healthy_release_is_installed_and_the_previous_binary_kept() {
        let mut m = machine();
        let license = m.license.clone();
        stage(&m, b"NEW", b"NEW", &license);
        let result = apply(&m.plan, &mut m.host)
            .expect("apply")
            .expect("a result");
        assert_eq!(result.outcome, UpdateOutcome::Success, "{result:?}");
        assert_eq!(read(&m.plan.binary), "NEW");
        assert_eq!(read(&m.plan.previous()), "OLD");
        assert_eq!(
            read(&m.plan.step_binary),
            "NEW",
            "the step's copy refreshed"
        );
        assert_eq!(m.host.log, ["stop", "start"]);
        let steps: Vec<&str> = result.steps.iter().map(|s| s.step.as_str()).collect();
        assert_eq!(
            steps,
            ["verify", "stop", "backup", "swap", "start", "health"]
        );
        // Left for the daemon; nothing else staged; no journal.
        assert_eq!(m.plan.staging.read_result().expect("result"), Some(result));
        assert!(!m.plan.staging.is_ready() && !m.plan.staging.binary().exists());
        assert!(!m.plan.journal().exists() && !m.plan.candidate().exists());
        assert_eq!(
            read(&m.plan.backup().join("state/state.json")),
            "before",
            "backed up"
        );
        assert!(
            !m.plan.backup().join("state/updates").exists(),
            "the staging directory is not backed up"
        );
    }

    #[test]
    fn an_unhealthy_release_is_rolled_back_with_the_backup() {
        let mut m = machine();
        m.host.healthy = false;
        let license = m.license.clone();
        stage(&m, b"NEW", b"NEW", &license);
        // The new version writes its state before failing its health check.
        struct Scribbler<'a>(&'a mut FakeHost, PathBuf);
        impl Host for Scribbler<'_> {
            fn stop(&mut self) -> Result<(), String> {
                self.0.stop()
            }
            fn start(&mut self) -> Result<(), String> {
                self.0.start()?;
                if self.0.running.as_deref() == Some(b"NEW") {
                    std::fs::write(&self.1, "written by the new version").expect("state");
                }
                Ok(())
            }
            fn probe(&mut self, v: Version, s: i64) -> Result<(), String> {
                self.0.probe(v, s)
            }
            fn now(&self) -> i64 {
                self.0.now()
            }
            fn pause(&mut self) {
                self.0.pause()
            }
        }
        let state = m.plan.state_dir.join("state.json");
        let result = apply(&m.plan, &mut Scribbler(&mut m.host, state.clone()))
            .expect("apply")
            .expect("a result");
        assert_eq!(result.outcome, UpdateOutcome::Failed);
        assert_eq!(result.reason, "health_check_failed");
        assert_eq!(read(&m.plan.binary), "OLD", "previous binary back");
        assert_eq!(read(&state), "before", "state restored");
        assert_eq!(read(&m.plan.config_file), "config before");
        assert_eq!(
            m.host.running.as_deref(),
            Some(&b"OLD"[..]),
            "the old one runs"
        );
        let health = result
            .steps
            .iter()
            .find(|s| s.step == "health")
            .expect("health");
        assert!(health.detail.contains("within 60 s"), "{}", health.detail);
        assert_eq!(
            result.steps.last().map(|s| s.step.as_str()),
            Some("rollback")
        );
    }

    #[test]
    fn what_the_daemons_user_could_write_is_checked_again() {
        // A binary swapped after the daemon checked it.
        let mut m = machine();
        let license = m.license.clone();
        stage(&m, b"NEW", b"EVIL", &license);
        let result = apply(&m.plan, &mut m.host)
            .expect("apply")
            .expect("a result");
        assert_eq!(
            (result.outcome, result.reason.as_str()),
            (UpdateOutcome::Refused, "wrong_size")
        );
        assert_eq!(read(&m.plan.binary), "OLD");
        assert!(m.host.log.is_empty(), "the agent was never stopped");
        assert!(!m.plan.staging.is_ready());

        // A bundle vouched for by a key the configuration does not pin.
        let mut m = machine();
        let stranger = ed25519_dalek::SigningKey::from_bytes(&[66; 32]);
        stage(&m, b"EVIL", b"EVIL", &stranger);
        let result = apply(&m.plan, &mut m.host)
            .expect("apply")
            .expect("a result");
        assert_eq!(
            (result.outcome, result.reason.as_str()),
            (UpdateOutcome::Refused, "release_keys_refused")
        );
        assert_eq!(read(&m.plan.binary), "OLD");

        // Garbage instead of a bundle.
        let mut m = machine();
        std::fs::create_dir_all(m.plan.staging.dir()).expect("dir");
        std::fs::write(m.plan.staging.bundle(), "{").expect("bundle");
        std::fs::write(m.plan.staging.ready(), "x").expect("ready");
        let result = apply(&m.plan, &mut m.host)
            .expect("apply")
            .expect("a result");
        assert_eq!(result.reason, "malformed_bundle");
        assert_eq!(read(&m.plan.binary), "OLD");
    }

    #[test]
    fn an_interrupted_update_resumes_from_its_journal_at_every_step() {
        // The journal as a power cut would leave it after each step (the files as they were
        // then); the next run must end with the new binary running, or the old one.
        for step in [
            Step::Verified,
            Step::Stopped,
            Step::BackedUp,
            Step::Swapping,
            Step::Swapped,
            Step::Started,
            Step::RollingBack,
            Step::Done,
        ] {
            let mut m = machine();
            let license = m.license.clone();
            stage(&m, b"NEW", b"NEW", &license);
            ensure_dir(&m.plan.work_dir, 0o700).expect("work dir");
            let mut journal = verify(&m.plan, 1_000)
                .map_err(|_| "refused")
                .expect("verified");
            if step >= Step::BackedUp {
                backup(&m.plan).expect("backup");
            }
            if step >= Step::Swapping {
                journal.previous_sha256 = Some(digest_of(&m.plan.binary).expect("sha").1);
            }
            if step == Step::Swapping {
                // Cut between keeping the previous binary and the rename.
                restore_file(&m.plan.binary, &m.plan.previous()).expect("kept");
            }
            if step >= Step::Swapped && step != Step::RollingBack {
                swap(&m.plan, &journal).expect("swap");
            }
            if step == Step::RollingBack {
                swap(&m.plan, &journal).expect("swap");
                journal.reason = "health_check_failed".into();
            }
            if step == Step::Done {
                journal.outcome = Some(UpdateOutcome::Success);
            }
            journal.step = step;
            save_journal(&m.plan, &journal).expect("journal");
            // What boot does: the machine starts whatever is installed.
            m.host.running = None;
            m.host.start().expect("boot");
            // The boot takes a while before the step runs.
            m.host.now += 5;
            assert!(
                matches!(m.host.running.as_deref(), Some(b"OLD") | Some(b"NEW")),
                "{step:?}: a binary starts"
            );

            let result = apply(&m.plan, &mut m.host)
                .expect("apply")
                .expect("a result");
            let expected = match step {
                Step::RollingBack => (UpdateOutcome::Failed, "OLD"),
                _ => (UpdateOutcome::Success, "NEW"),
            };
            assert_eq!(
                (result.outcome, read(&m.plan.binary).as_str()),
                expected,
                "{step:?}"
            );
            if step != Step::Done {
                assert!(
                    result.steps.iter().any(|s| s.step == "resume"),
                    "{step:?}: resumption recorded"
                );
            }
            assert!(!m.plan.journal().exists(), "{step:?}");
            assert!(!m.plan.staging.is_ready(), "{step:?}");
            assert_eq!(
                read(&m.plan.previous()),
                "OLD",
                "{step:?}: the kept binary is the old one"
            );
        }
    }
}
