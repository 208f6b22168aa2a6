//! The update step on Windows: not there yet. The daemon never stages a release on Windows
//! (`update.enabled` is refused there, see [`crate::config`]), and `license-agent update apply`
//! says so instead of doing anything. The Linux step is `update/apply.rs`.

use std::path::PathBuf;
use std::time::Duration;

use super::{Staging, UpdateResult};

/// What the step would work on (the Linux step's plan, for the same command line).
#[derive(Debug)]
pub struct Plan {
    pub staging: Staging,
    pub work_dir: PathBuf,
    pub binary: PathBuf,
    pub step_binary: PathBuf,
    pub config_file: PathBuf,
    pub state_dir: PathBuf,
    pub license_pin: ed25519_dalek::VerifyingKey,
    pub health_deadline: Duration,
}

/// How the step would stop and start the agent.
#[derive(Debug)]
pub struct SystemHost {
    pub stop_command: Vec<String>,
    pub start_command: Vec<String>,
    pub mgmt_socket: PathBuf,
    pub mgmt_token: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    #[error("agent updates are not supported on Windows yet: install the new release with its installer")]
    Unsupported,
}

/// Always [`ApplyError::Unsupported`].
pub fn apply(_plan: &Plan, _host: &mut SystemHost) -> Result<Option<UpdateResult>, ApplyError> {
    Err(ApplyError::Unsupported)
}
