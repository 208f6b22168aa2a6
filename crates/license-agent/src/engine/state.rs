//! `state.json` (seed §4.4): what the agent knows besides the secrets themselves — never a
//! secret byte. Written atomically (temp, fsync, rename, fsync dir) with the previous copy
//! kept as `state.json.bak`. A corrupt file is recovered from the backup or, failing that,
//! rebuilt from the secret store; the corrupt copy is kept aside and the event reported —
//! never silently reset.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::platform::files::{write_atomic, PRIVATE};

const FORMAT: u32 = 1;

/// Non-secret metadata of one secret version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretMeta {
    pub version: u64,
    pub valid_from: i64,
    pub valid_until: i64,
    pub grace_until: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentState {
    pub format: u32,
    /// Versions held, oldest first (mirror of the secret store's metadata).
    pub secrets: Vec<SecretMeta>,
    /// Versions the server invalidated: their tokens answer `secret_invalidated`.
    pub invalidated_versions: BTreeSet<u64>,
    pub revoked_licenses: BTreeSet<uuid::Uuid>,
    /// Licenses whose tokens were last fetched, with the version they are under.
    pub licenses: Vec<(uuid::Uuid, u64)>,
    pub last_rotation: Option<i64>,
    pub next_rotation_due: Option<i64>,
    pub last_server_contact: Option<i64>,
    pub consecutive_failures: u32,
    pub degraded_since: Option<i64>,
    /// Clock-rollback guard mark (Unix seconds).
    pub clock_high_water: i64,
    /// Where the secrets rest now: `tpm` or `file`.
    #[serde(default)]
    pub store: String,
    #[serde(default)]
    pub tpm_available: bool,
    /// Last TPM clock reading `(reset_count, clock_ms, guarded wall time)`: while the TPM's
    /// reset count is unchanged, wall time cannot be earlier than that reading plus the TPM
    /// clock's advance.
    #[serde(default)]
    pub tpm_clock: Option<(u32, u64, i64)>,
    /// Last `(seq, hash)` of the audit log: `license-agent-cli audit verify --anchor-seq …
    /// --anchor-hash …` detects entries removed from the log's end.
    #[serde(default)]
    pub audit_anchor: Option<(u64, String)>,
    /// Highest secret version destroyed at the end of its grace: tokens under it answer
    /// `expired` (as online validation does), not `unknown_secret_version`.
    #[serde(default)]
    pub retired_through: u64,
    /// The server's clock at the last contact (Unix seconds): a floor for "now" after a
    /// restart, beside the high-water mark.
    #[serde(default)]
    pub server_time: Option<i64>,
    /// Since when the server refuses this machine as revoked (Unix seconds); cleared when it
    /// answers again. Kept across restarts, so a revoked till stays closed while offline.
    #[serde(default)]
    pub machine_revoked_since: Option<i64>,
    /// Updates of the agent (see `engine::update`).
    #[serde(default)]
    pub update: UpdateState,
}

/// What the agent remembers of its updates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateState {
    /// Held by an administrator: no release is staged.
    #[serde(default)]
    pub held: bool,
    /// The release checked and staged for the update step, and its version.
    #[serde(default)]
    pub staged: Option<(uuid::Uuid, String)>,
    /// Releases refused or failed here, with the reason code: never staged again (the last
    /// [`MAX_REMEMBERED`] kept).
    #[serde(default)]
    pub refused: Vec<(uuid::Uuid, String)>,
    /// How the last update ended.
    #[serde(default)]
    pub last: Option<LastUpdate>,
    /// Reports the server has not accepted yet (sent again each round).
    #[serde(default)]
    pub unreported: Vec<license_protocol::release::UpdateReport>,
    /// Updates completed to a new version, and updates failed or refused, on this machine.
    #[serde(default)]
    pub succeeded: u64,
    #[serde(default)]
    pub failed: u64,
}

/// Releases remembered as refused.
pub const MAX_REMEMBERED: usize = 16;

/// The last update's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LastUpdate {
    pub release_id: uuid::Uuid,
    pub version: String,
    pub from_version: String,
    /// `success`, `failed` or `refused`.
    pub outcome: String,
    pub reason: String,
    /// Unix seconds.
    pub at: i64,
}

/// How a load went, for the log and the audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadOutcome {
    Fresh,
    Loaded,
    RecoveredFromBackup { corrupt_kept_at: PathBuf },
    Rebuilt { corrupt_kept_at: Option<PathBuf> },
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct StateError {
    path: String,
    source: std::io::Error,
}

#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("state.json"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn backup(&self) -> PathBuf {
        self.path.with_extension("json.bak")
    }

    fn parse(path: &Path) -> Option<Result<AgentState, String>> {
        match std::fs::read(path) {
            Ok(bytes) => Some(
                serde_json::from_slice::<AgentState>(&bytes)
                    .map_err(|e| e.to_string())
                    .and_then(|s| {
                        if s.format == FORMAT {
                            Ok(s)
                        } else {
                            Err(format!("unknown format {}", s.format))
                        }
                    }),
            ),
            Err(_) => None,
        }
    }

    fn keep_aside(&self, path: &Path) -> PathBuf {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let aside = path.with_extension(format!("corrupt-{stamp}"));
        let _ = std::fs::rename(path, &aside);
        aside
    }

    /// Reads the state without recovering anything (for `status`, while the daemon owns it).
    pub fn load_readonly(&self) -> (AgentState, bool) {
        match Self::parse(&self.path).or_else(|| Self::parse(&self.backup())) {
            Some(Ok(state)) => (state, true),
            _ => (AgentState::default(), false),
        }
    }

    /// Loads the state, recovering as described in the module docs.
    pub fn load(&self) -> (AgentState, LoadOutcome) {
        match Self::parse(&self.path) {
            Some(Ok(state)) => (state, LoadOutcome::Loaded),
            primary => {
                let corrupt = matches!(primary, Some(Err(_))).then(|| self.keep_aside(&self.path));
                match (Self::parse(&self.backup()), corrupt) {
                    (Some(Ok(state)), Some(aside)) => (
                        state,
                        LoadOutcome::RecoveredFromBackup {
                            corrupt_kept_at: aside,
                        },
                    ),
                    // No state.json but a good backup: a crash between the two renames of save().
                    (Some(Ok(state)), None) => (state, LoadOutcome::Loaded),
                    (_, None) if !self.backup().exists() => (
                        AgentState {
                            format: FORMAT,
                            ..Default::default()
                        },
                        LoadOutcome::Fresh,
                    ),
                    (_, corrupt) => (
                        AgentState {
                            format: FORMAT,
                            ..Default::default()
                        },
                        LoadOutcome::Rebuilt {
                            corrupt_kept_at: corrupt,
                        },
                    ),
                }
            }
        }
    }

    /// Writes the state durably; the previous copy becomes the backup.
    pub fn save(&self, state: &AgentState) -> Result<(), StateError> {
        let mut state = state.clone();
        state.format = FORMAT;
        let bytes = serde_json::to_vec_pretty(&state).expect("state serializes");
        if self.path.exists() {
            let _ = std::fs::copy(&self.path, self.backup());
        }
        write_atomic(&self.path, &bytes, PRIVATE).map_err(|source| StateError {
            path: self.path.display().to_string(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_recovers_and_never_silently_resets() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path());
        assert_eq!(file.load().1, LoadOutcome::Fresh);
        let mut s = AgentState {
            format: FORMAT,
            clock_high_water: 42,
            ..Default::default()
        };
        file.save(&s).unwrap();
        s.clock_high_water = 43;
        file.save(&s).unwrap();
        assert_eq!(file.load(), (s.clone(), LoadOutcome::Loaded));

        std::fs::write(file.path(), b"{ half a file").unwrap();
        let (recovered, outcome) = file.load();
        assert_eq!(
            recovered.clock_high_water, 42,
            "the backup holds the previous state"
        );
        assert!(
            matches!(outcome, LoadOutcome::RecoveredFromBackup { ref corrupt_kept_at } if corrupt_kept_at.exists())
        );

        std::fs::write(file.path(), b"garbage").unwrap();
        std::fs::write(dir.path().join("state.json.bak"), b"garbage").unwrap();
        let (rebuilt, outcome) = file.load();
        assert_eq!(rebuilt.clock_high_water, 0);
        assert!(matches!(
            outcome,
            LoadOutcome::Rebuilt {
                corrupt_kept_at: Some(_)
            }
        ));
    }
}
