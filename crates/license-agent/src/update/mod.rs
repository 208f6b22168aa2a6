//! Updates of the agent itself (seed §8.2, DESIGN.md §4b, docs/OPERATIONS.md "Releasing and
//! rolling out").
//!
//! Two processes share the work, and this module is what they share:
//! - the daemon (unprivileged, sandboxed; `engine::update`) learns of a release in its secret
//!   status, checks the manifest's signature, the architecture and that it is no downgrade,
//!   streams the binary into the [`Staging`] directory while hashing it, checks size and
//!   SHA-256, and stages a [`Bundle`] (the offer and the license key set that vouches for it)
//!   with the binary, writing `ready` last;
//! - the update step (`license-agent update apply`, root, outside the sandbox; [`apply`]),
//!   started by systemd when `ready` appears, checks everything again against trust of its
//!   own (the daemon's user can write the staging directory, so nothing there is believed
//!   unchecked), then stops the agent, backs up its configuration and state, swaps the binary
//!   keeping the previous one, starts it, waits for it to prove itself healthy, and rolls
//!   back if it does not. It leaves an [`UpdateResult`] in the staging directory, which the
//!   daemon audits step by step and reports to the server.
//!
//! Versions: what this binary is comes from [`running_version`].

#[cfg(unix)]
pub mod apply;
#[cfg(windows)]
#[path = "apply_windows.rs"]
pub mod apply;

use std::path::{Path, PathBuf};

use license_protocol::license_keys::LicenseKeySet;
use license_protocol::release::{UpdateOffer, UpdateOutcome, Version};
use serde::{Deserialize, Serialize};

use crate::platform::files::{write_atomic, PUBLIC};

/// Test hook: `LICENSE_AGENT_TEST_VERSION=1.2.3` makes this binary report that version, so
/// tests can publish "newer" and "older" builds of the same binary.
const TEST_VERSION_ENV: &str = "LICENSE_AGENT_TEST_VERSION";

/// The package version, between markers that appear once in the binary: the VM test makes a
/// "newer" release of the very binary it installed by changing these bytes (same length).
static VERSION_MARK: &str = concat!("<lsa-agent-version:", env!("CARGO_PKG_VERSION"), ">");

/// The version this binary is (its package version, or the test hook's).
pub fn running_version() -> Version {
    if let Some(v) = std::env::var(TEST_VERSION_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return v;
    }
    // Read at run time (not folded by the compiler), so the marked bytes are what counts.
    std::hint::black_box(VERSION_MARK)
        .strip_prefix("<lsa-agent-version:")
        .and_then(|v| v.strip_suffix('>'))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            env!("CARGO_PKG_VERSION")
                .parse()
                .expect("the package version is MAJOR.MINOR.PATCH")
        })
}

/// The architecture this binary runs on, as release manifests name it.
pub const ARCH: &str = std::env::consts::ARCH;

/// What the daemon stages beside the binary: the offer it checked and the license key set
/// the update step checks the offer's release keys against.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    pub offer: UpdateOffer,
    pub license_keys: LicenseKeySet,
}

/// One step of an update, as the update step recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepRecord {
    /// `verify`, `stop`, `backup`, `swap`, `start`, `health`, `rollback`, `resume`.
    pub step: String,
    /// Unix seconds.
    pub at: i64,
    /// `ok`, or what went wrong.
    pub detail: String,
}

/// How an update ended, left by the update step for the daemon (`result.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateResult {
    pub release_id: uuid::Uuid,
    pub version: Version,
    /// The version that ran before.
    pub from_version: Version,
    pub outcome: UpdateOutcome,
    /// A reason code (`health_check_failed`, `wrong_digest`, …), empty on success.
    pub reason: String,
    pub steps: Vec<StepRecord>,
}

/// Why the staging directory could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StagingError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Malformed { path: String, message: String },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StagingError + '_ {
    move |source| StagingError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The staging directory (`[update] staging_dir`, default `<state_dir>/updates`), the
/// daemon's: `download.partial` while a binary streams in, `license-agent.new` once it
/// checked, `bundle.json`, then `ready` (what systemd's path unit waits for), and
/// `result.json` from the update step.
#[derive(Debug, Clone)]
pub struct Staging {
    dir: PathBuf,
}

impl Staging {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn partial(&self) -> PathBuf {
        self.dir.join("download.partial")
    }

    pub fn binary(&self) -> PathBuf {
        self.dir.join("license-agent.new")
    }

    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle.json")
    }

    pub fn ready(&self) -> PathBuf {
        self.dir.join("ready")
    }

    pub fn result(&self) -> PathBuf {
        self.dir.join("result.json")
    }

    /// Whether a staged release waits for the update step.
    pub fn is_ready(&self) -> bool {
        self.ready().exists()
    }

    /// Stages `bundle` for the binary already at [`Self::binary`]: the bundle, then `ready`
    /// (holding the release id), each durably.
    pub fn stage(&self, bundle: &Bundle) -> Result<(), StagingError> {
        let json = serde_json::to_vec_pretty(bundle).expect("bundles serialize");
        write_atomic(&self.bundle(), &json, PUBLIC).map_err(io_error(&self.bundle()))?;
        let id = bundle.offer.manifest.release_id.to_string();
        write_atomic(&self.ready(), id.as_bytes(), PUBLIC).map_err(io_error(&self.ready()))
    }

    pub fn read_bundle(&self) -> Result<Bundle, StagingError> {
        read_json(&self.bundle())
    }

    /// Removes what was staged (`ready` first, so the update step never sees half of it).
    pub fn clear(&self) {
        for path in [self.ready(), self.bundle(), self.binary(), self.partial()] {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Written by the update step (root) for the daemon: owned by the staging directory's
    /// owner (the agent's user), whatever the step's umask.
    pub fn write_result(&self, result: &UpdateResult) -> Result<(), StagingError> {
        let json = serde_json::to_vec_pretty(result).expect("results serialize");
        let path = self.result();
        let tmp = self.dir.join(".result.json.tmp");
        write_atomic(&tmp, &json, PUBLIC).map_err(io_error(&tmp))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
            let owner = std::fs::metadata(&self.dir).map_err(io_error(&self.dir))?;
            std::os::unix::fs::chown(&tmp, Some(owner.uid()), Some(owner.gid()))
                .map_err(io_error(&tmp))?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(PUBLIC))
                .map_err(io_error(&tmp))?;
        }
        crate::platform::files::rename_durable(&tmp, &path).map_err(io_error(&path))
    }

    /// The update step's result, when one waits for the daemon.
    pub fn read_result(&self) -> Result<Option<UpdateResult>, StagingError> {
        if !self.result().exists() {
            return Ok(None);
        }
        read_json(&self.result()).map(Some)
    }

    pub fn remove_result(&self) {
        let _ = std::fs::remove_file(self.result());
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StagingError> {
    let bytes = std::fs::read(path).map_err(io_error(path))?;
    serde_json::from_slice(&bytes).map_err(|e| StagingError::Malformed {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}
