//! `/etc/license-agent/config.toml`: the agent's configuration (seed §4.2, DESIGN.md §3.4).
//!
//! Parsed into typed values with unknown keys refused; cross-field checks live in
//! [`AgentConfig::check`], and every error names the key at fault. `license-agent enroll`
//! writes this file; `license-agent check-config` validates it without starting anything.

use std::path::{Path, PathBuf};

use license_protocol::identity::{ClientId, MachineId};
use license_protocol::pin::CertPin;
use serde::{Deserialize, Serialize};

/// Seed §4.2: rotate every 24 h.
pub const DEFAULT_ROTATION_INTERVAL_SECS: u64 = 86_400;
/// Seed §4.2: 7 days of grace.
pub const DEFAULT_GRACE_PERIOD_SECS: u64 = 604_800;
/// Shortest rotation interval accepted (tests use a few seconds).
pub const MIN_ROTATION_INTERVAL_SECS: u64 = 1;
pub use paths::*;

/// Where things live unless the config says otherwise: the Linux layout (FHS, systemd's
/// `/run`)…
#[cfg(unix)]
mod paths {
    pub const DEFAULT_CONFIG_PATH: &str = "/etc/license-agent/config.toml";
    pub const DEFAULT_STATE_DIR: &str = "/var/lib/license-agent";
    pub const DEFAULT_LOG_DIR: &str = "/var/log/license-agent";
    /// The update step's directory (root only).
    pub const DEFAULT_UPDATE_WORK_DIR: &str = "/var/lib/license-agent-update";
    /// The agent binary the update step replaces.
    pub const DEFAULT_AGENT_BINARY: &str = "/usr/bin/license-agent";
    /// The update step's own copy of the binary.
    pub const DEFAULT_UPDATE_STEP_BINARY: &str = "/usr/lib/license-agent/license-agent-update";
    pub const DEFAULT_MGMT_SOCKET: &str = "/run/license-agent/mgmt.sock";
    pub const DEFAULT_SOCKET: &str = "/run/license-agent/agent.sock";
}

/// …and the Windows one: `%ProgramData%\LicenseAgent` (SYSTEM and Administrators only), the
/// binary in `%ProgramFiles%\LicenseAgent`, named pipes for the sockets.
#[cfg(windows)]
mod paths {
    pub const DEFAULT_CONFIG_PATH: &str = r"C:\ProgramData\LicenseAgent\config.toml";
    pub const DEFAULT_STATE_DIR: &str = r"C:\ProgramData\LicenseAgent\state";
    pub const DEFAULT_LOG_DIR: &str = r"C:\ProgramData\LicenseAgent\log";
    pub const DEFAULT_UPDATE_WORK_DIR: &str = r"C:\ProgramData\LicenseAgent\update";
    pub const DEFAULT_AGENT_BINARY: &str = r"C:\Program Files\LicenseAgent\license-agent.exe";
    pub const DEFAULT_UPDATE_STEP_BINARY: &str =
        r"C:\Program Files\LicenseAgent\license-agent-update.exe";
    pub const DEFAULT_MGMT_SOCKET: &str = r"\\.\pipe\license-agent-mgmt";
    pub const DEFAULT_SOCKET: &str = r"\\.\pipe\license-agent";
}

/// Seconds between checks with the server (forced rotation, invalidation, revocation).
pub const DEFAULT_POLL_INTERVAL_SECS: u64 = 60;
/// While the watch stream is held (changes are pushed), the agent still makes a round this
/// often (seconds): the fallback for anything the stream could not say.
pub const DEFAULT_WATCH_POLL_INTERVAL_SECS: u64 = 3600;
/// The kernel's TPM resource manager.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";
/// Connections served at once on the validation socket.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// A connection idle this long (no complete frame) is closed.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 30;
/// How long a validation nonce is remembered, to refuse replays.
pub const DEFAULT_REPLAY_WINDOW_SECS: u64 = 600;
/// PBKDF2-HMAC-SHA256 iterations deriving the file store's key.
pub const DEFAULT_PBKDF2_ITERATIONS: u32 = 210_000;
/// Fewest PBKDF2 iterations accepted, in `tpm.pbkdf2_iterations` and in `secret.enc`.
pub const MIN_PBKDF2_ITERATIONS: u32 = 10_000;
/// Most PBKDF2 iterations accepted, in `tpm.pbkdf2_iterations` and in `secret.enc`: about five
/// seconds of a till's CPU at every start; more would let an edited file stall the agent.
pub const MAX_PBKDF2_ITERATIONS: u32 = 10_000_000;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub server: ServerSection,
    pub agent: AgentSection,
    #[serde(default)]
    pub tpm: TpmSection,
    #[serde(default)]
    pub management: ManagementSection,
    #[serde(default)]
    pub ipc: IpcSection,
    #[serde(default)]
    pub alerts: AlertsSection,
    #[serde(default)]
    pub update: UpdateSection,
}

/// Updates of the agent itself (seed §8.2, docs/OPERATIONS.md "Releasing and rolling out"):
/// the daemon learns of releases, checks and stages them; `license-agent update apply`, run
/// as root outside the daemon's sandbox, installs them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateSection {
    /// Take releases the server offers (`false`: never download one). Linux only for now:
    /// `false` by default on Windows, where `true` is refused (releases are Linux binaries).
    #[serde(default = "default_update_enabled")]
    pub enabled: bool,
    /// The release channel followed.
    #[serde(default = "default_channel")]
    pub channel: license_protocol::release::Channel,
    /// Where the daemon stages a checked release (default `<state_dir>/updates`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging_dir: Option<PathBuf>,
    /// The update step's own directory, root's only: journal, backup, previous binary.
    #[serde(default = "default_update_work_dir")]
    pub work_dir: PathBuf,
    /// The agent binary the update step replaces.
    #[serde(default = "default_agent_binary")]
    pub binary: PathBuf,
    /// The update step's own copy of the binary (outside the daemon's AppArmor profile),
    /// refreshed after each successful update when it exists.
    #[serde(default = "default_step_binary")]
    pub step_binary: PathBuf,
    /// Seconds the new version has to answer `status` with its version and finish a round
    /// with the server, or it is rolled back.
    #[serde(default = "default_health_deadline")]
    pub health_deadline: u64,
    /// How the update step stops and starts the agent.
    #[serde(default = "default_stop_command")]
    pub stop_command: Vec<String>,
    #[serde(default = "default_start_command")]
    pub start_command: Vec<String>,
}

impl Default for UpdateSection {
    fn default() -> Self {
        Self {
            enabled: default_update_enabled(),
            channel: default_channel(),
            staging_dir: None,
            work_dir: default_update_work_dir(),
            binary: default_agent_binary(),
            step_binary: default_step_binary(),
            health_deadline: default_health_deadline(),
            stop_command: default_stop_command(),
            start_command: default_start_command(),
        }
    }
}

fn default_update_enabled() -> bool {
    cfg!(unix)
}
fn default_channel() -> license_protocol::release::Channel {
    "stable".parse().expect("a valid channel")
}
fn default_update_work_dir() -> PathBuf {
    DEFAULT_UPDATE_WORK_DIR.into()
}
fn default_agent_binary() -> PathBuf {
    DEFAULT_AGENT_BINARY.into()
}
fn default_step_binary() -> PathBuf {
    DEFAULT_UPDATE_STEP_BINARY.into()
}
fn default_health_deadline() -> u64 {
    120
}
fn default_stop_command() -> Vec<String> {
    ["systemctl", "stop", "license-agent.service"]
        .map(String::from)
        .to_vec()
}
fn default_start_command() -> Vec<String> {
    ["systemctl", "start", "license-agent.service"]
        .map(String::from)
        .to_vec()
}

/// Where alerts go besides the audit log and the journal (seed §7.2).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsSection {
    /// Optional webhook (`http://` or `https://`) receiving each alert as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    #[serde(default = "default_webhook_retries")]
    pub webhook_retries: u32,
}

impl Default for AlertsSection {
    fn default() -> Self {
        Self {
            webhook_url: None,
            webhook_retries: default_webhook_retries(),
        }
    }
}

fn default_webhook_retries() -> u32 {
    3
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Agent API base URL (mTLS), e.g. `https://licenses.example.com:8444`.
    pub url: String,
    /// Public base URL (enrollment, downloads).
    pub public_url: String,
    /// Pin of the server's TLS key, `sha256:<base64>`.
    pub cert_pin: CertPin,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// The server's CA certificate (chain check on top of the pin).
    pub ca_cert: PathBuf,
    /// License signing public key pinned at enrollment, `ed25519:<base64>`.
    pub license_public_key: String,
    /// Single-use credential (0600) that lets the agent re-key through the server when its TPM
    /// was cleared; renewed by each recovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// This machine's id (the `machine_id` of its certificate CN).
    pub id: MachineId,
    pub client_id: ClientId,
    #[serde(default = "default_rotation")]
    pub rotation_interval: u64,
    #[serde(default = "default_grace")]
    pub grace_period: u64,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_log_dir")]
    pub log_dir: PathBuf,
    /// Seconds between checks with the server for forced rotations, invalidated versions and
    /// revoked licenses.
    #[serde(default = "default_poll_interval")]
    pub poll_interval: u64,
    /// Hold a watch stream with the server (`GET /api/v1/watch`): revocations, forced
    /// rotations, key rollovers and update announcements arrive within a second, and rounds
    /// are made every `watch_poll_interval` instead of every `poll_interval` while it is held.
    #[serde(default = "default_true")]
    pub watch: bool,
    /// Seconds between rounds while the watch stream is held.
    #[serde(default = "default_watch_poll_interval")]
    pub watch_poll_interval: u64,
    /// The tamper-evident audit log (default: `log_dir/audit.log`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_log: Option<PathBuf>,
    /// Size at which the audit log's current file is rotated (bytes, default 8 MiB).
    #[serde(default = "default_audit_max_file_bytes")]
    pub audit_max_file_bytes: u64,
    /// Rotated audit files kept (`audit.log.1` …, default 7); older ones are deleted. Half of
    /// them rotated away within a day raises the `audit_log_flooded` alert.
    #[serde(default = "default_audit_keep_files")]
    pub audit_keep_files: u32,
    /// For benchmarks only: answer validations without auditing them. Everything else is
    /// still audited.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub danger_unaudited_validations: bool,
    /// Prometheus textfile (node_exporter format) rewritten after every round.
    #[serde(default = "default_metrics_file")]
    pub metrics_file: PathBuf,
    /// `allow`: keep validating with ACTIVE/GRACE secrets while the server is unreachable and
    /// rotation is overdue (until their grace ends); `deny`: fail closed instead.
    #[serde(default)]
    pub degraded_mode: DegradedPolicy,
    /// When the server refuses this machine as revoked: `deny` validations at once (answer
    /// `machine_revoked`) until it is restored; `grace`: keep validating with the secrets held
    /// until their grace ends.
    #[serde(default)]
    pub on_machine_revoked: RevokedPolicy,
}

/// What a revoked machine's validations answer (`[agent] on_machine_revoked`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RevokedPolicy {
    #[default]
    Deny,
    Grace,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DegradedPolicy {
    #[default]
    Allow,
    Deny,
}

/// The validation socket for POS applications (DESIGN.md §3.2).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpcSection {
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Peers whose uid is listed may validate…
    #[serde(default)]
    pub allowed_uids: Vec<u32>,
    /// …and so may peers whose primary gid is listed.
    #[serde(default)]
    pub allowed_gids: Vec<u32>,
    /// Windows: users allowed to validate, by SID (`S-1-5-21-…`)…
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_sids: Vec<String>,
    /// …and members of these groups (SIDs, e.g. `S-1-5-32-545` for BUILTIN\Users), as their
    /// access token says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_groups: Vec<String>,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: u64,
    #[serde(default = "default_replay_window")]
    pub replay_window: u64,
    /// Mode of the socket file, an octal string (default `"0660"`): only the agent's user and
    /// the socket's group can connect at all; the allow-lists then decide per peer.
    #[serde(default)]
    pub socket_mode: SocketMode,
    /// Group of the socket file, a name or a number (default: the agent's primary group). The
    /// POS applications' users are its members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
}

/// Whether `s` reads as a SID in string form: `S-1-<authority>-<sub>…`, decimal numbers.
pub fn is_sid(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("S-1-") else {
        return false;
    };
    let parts: Vec<&str> = rest.split('-').collect();
    (1..=16).contains(&parts.len())
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit()))
}

impl AgentConfig {
    /// Keys of the other platform are refused, naming the key to use instead: a uid means
    /// nothing to Windows, nor a SID to Linux.
    fn check_platform_keys(&self) -> Result<(), ConfigError> {
        let sids = [
            ("ipc.allowed_sids", &self.ipc.allowed_sids),
            ("ipc.allowed_groups", &self.ipc.allowed_groups),
            ("management.allowed_sids", &self.management.allowed_sids),
            ("management.admin_sids", &self.management.admin_sids),
        ];
        if cfg!(windows) {
            if self.update.enabled {
                return Err(invalid(
                    "update.enabled",
                    "agent updates are not supported on Windows yet (the releases are Linux binaries)",
                ));
            }
            let unix = [
                (
                    "ipc.allowed_uids",
                    !self.ipc.allowed_uids.is_empty(),
                    "ipc.allowed_sids",
                ),
                (
                    "ipc.allowed_gids",
                    !self.ipc.allowed_gids.is_empty(),
                    "ipc.allowed_groups",
                ),
                (
                    "ipc.socket_group",
                    self.ipc.socket_group.is_some(),
                    "ipc.allowed_groups",
                ),
                (
                    "management.allowed_uids",
                    !self.management.allowed_uids.is_empty(),
                    "management.allowed_sids",
                ),
                (
                    "management.admin_uids",
                    !self.management.admin_uids.is_empty(),
                    "management.admin_sids",
                ),
            ];
            for (key, set, instead) in unix {
                if set {
                    return Err(invalid(
                        key,
                        format!("is a Linux setting; on Windows use {instead}"),
                    ));
                }
            }
            for (key, list) in sids {
                if let Some(bad) = list.iter().find(|s| !is_sid(s)) {
                    return Err(invalid(key, format!("{bad:?} is not a SID (S-1-…)")));
                }
            }
        } else {
            for (key, list) in sids {
                if !list.is_empty() {
                    return Err(invalid(
                        key,
                        "is a Windows setting; on Linux use the *_uids/*_gids keys",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Permission bits of a socket file, written in config files as an octal string (`"0660"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketMode(pub u32);

impl SocketMode {
    /// The validation socket's default: owner and group.
    pub const DEFAULT: SocketMode = SocketMode(0o660);
}

impl Default for SocketMode {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl std::str::FromStr for SocketMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let digits = s.strip_prefix("0o").unwrap_or(s);
        match u32::from_str_radix(digits, 8) {
            Ok(mode) if !digits.is_empty() && mode <= 0o777 => Ok(SocketMode(mode)),
            _ => Err(format!(
                "`{s}` is not a permission mode: an octal string from \"0000\" to \"0777\", e.g. \"0660\""
            )),
        }
    }
}

impl Serialize for SocketMode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{:04o}", self.0))
    }
}

impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Default for IpcSection {
    fn default() -> Self {
        Self {
            socket: default_socket(),
            socket_mode: SocketMode::DEFAULT,
            socket_group: None,
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            allowed_sids: Vec::new(),
            allowed_groups: Vec::new(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT_SECS,
            replay_window: DEFAULT_REPLAY_WINDOW_SECS,
        }
    }
}

fn default_audit_max_file_bytes() -> u64 {
    license_audit::DEFAULT_MAX_FILE_BYTES
}
fn default_audit_keep_files() -> u32 {
    license_audit::DEFAULT_KEEP_FILES
}
fn default_metrics_file() -> PathBuf {
    Path::new(DEFAULT_STATE_DIR).join("metrics.prom")
}
fn default_true() -> bool {
    true
}
fn default_watch_poll_interval() -> u64 {
    DEFAULT_WATCH_POLL_INTERVAL_SECS
}
fn default_poll_interval() -> u64 {
    DEFAULT_POLL_INTERVAL_SECS
}
fn default_socket() -> PathBuf {
    DEFAULT_SOCKET.into()
}
fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn default_idle_timeout() -> u64 {
    DEFAULT_IDLE_TIMEOUT_SECS
}
fn default_replay_window() -> u64 {
    DEFAULT_REPLAY_WINDOW_SECS
}
fn default_key_file() -> PathBuf {
    Path::new(DEFAULT_STATE_DIR).join("secret.key")
}
fn default_tcti() -> String {
    DEFAULT_TCTI.into()
}
fn default_sealed() -> PathBuf {
    Path::new(DEFAULT_STATE_DIR).join("secrets.tpm.json")
}
fn default_iterations() -> u32 {
    DEFAULT_PBKDF2_ITERATIONS
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmSection {
    #[serde(default)]
    pub enabled: bool,
    /// Encrypted-file store used when there is no TPM.
    #[serde(default = "default_fallback")]
    pub fallback_encrypted_storage: PathBuf,
    /// Key material (32 random bytes, 0600) the file store's key is derived from with
    /// PBKDF2-HMAC-SHA256; kept apart from the store itself.
    #[serde(default = "default_key_file")]
    pub fallback_key_file: PathBuf,
    #[serde(default = "default_iterations")]
    pub pbkdf2_iterations: u32,
    /// How to reach the TPM: `device:/dev/tpmrm0` (the kernel resource manager), `tabrmd`,
    /// or `swtpm:host=…,port=…`.
    #[serde(default = "default_tcti")]
    pub tcti: String,
    /// Where the TPM-sealed secret blobs are kept.
    #[serde(default = "default_sealed")]
    pub sealed_storage: PathBuf,
}

impl Default for TpmSection {
    fn default() -> Self {
        Self {
            enabled: false,
            fallback_encrypted_storage: default_fallback(),
            fallback_key_file: default_key_file(),
            pbkdf2_iterations: DEFAULT_PBKDF2_ITERATIONS,
            tcti: default_tcti(),
            sealed_storage: default_sealed(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagementSection {
    /// UIDs allowed to read status through the management interface.
    #[serde(default)]
    pub allowed_uids: Vec<u32>,
    /// UIDs allowed to act (rotate, invalidate, degraded mode); they may read too.
    #[serde(default)]
    pub admin_uids: Vec<u32>,
    /// Windows: SIDs allowed to read status (users or groups of the caller's token).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_sids: Vec<String>,
    /// Windows: SIDs allowed to act (users or groups; default: SYSTEM and Administrators).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admin_sids: Vec<String>,
    #[serde(default = "default_mgmt_socket")]
    pub socket: PathBuf,
    /// Optional second factor: requests must carry this file's content (0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

impl Default for ManagementSection {
    fn default() -> Self {
        Self {
            allowed_uids: Vec::new(),
            admin_uids: Vec::new(),
            allowed_sids: Vec::new(),
            admin_sids: Vec::new(),
            socket: default_mgmt_socket(),
            token_file: None,
        }
    }
}

fn default_mgmt_socket() -> PathBuf {
    DEFAULT_MGMT_SOCKET.into()
}

fn default_rotation() -> u64 {
    DEFAULT_ROTATION_INTERVAL_SECS
}
fn default_grace() -> u64 {
    DEFAULT_GRACE_PERIOD_SECS
}
fn default_state_dir() -> PathBuf {
    DEFAULT_STATE_DIR.into()
}
fn default_log_dir() -> PathBuf {
    DEFAULT_LOG_DIR.into()
}
fn default_fallback() -> PathBuf {
    Path::new(DEFAULT_STATE_DIR).join("secret.enc")
}

impl AgentConfig {
    /// Where the daemon stages a checked release for the update step.
    pub fn update_staging_dir(&self) -> PathBuf {
        self.update
            .staging_dir
            .clone()
            .unwrap_or_else(|| self.agent.state_dir.join("updates"))
    }

    pub fn audit_log_path(&self) -> PathBuf {
        self.agent
            .audit_log
            .clone()
            .unwrap_or_else(|| self.agent.log_dir.join("audit.log"))
    }

    /// Reads, parses and checks a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| {
            // toml's message plus the key path it points at, on one line.
            let message = e.message().to_string();
            let key = e
                .span()
                .map(|span| {
                    // The whole line the error points into: it starts with the key.
                    let start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
                    let end = text[span.start..]
                        .find('\n')
                        .map_or(text.len(), |i| span.start + i);
                    text[start..end].trim().to_string()
                })
                .unwrap_or_default();
            ConfigError::Parse {
                path: "<config>".into(),
                message: if key.is_empty() {
                    message
                } else {
                    format!("{message} (at `{key}`)")
                },
            }
        })?;
        config.check()?;
        Ok(config)
    }

    /// Cross-field checks.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.check_platform_keys()?;
        for (key, url) in [
            ("server.url", &self.server.url),
            ("server.public_url", &self.server.public_url),
        ] {
            if !url.starts_with("https://") {
                return Err(invalid(key, "must be an https:// URL"));
            }
        }
        if !self.server.license_public_key.starts_with("ed25519:") {
            return Err(invalid(
                "server.license_public_key",
                "must be `ed25519:<base64>`",
            ));
        }
        if self.agent.rotation_interval < MIN_ROTATION_INTERVAL_SECS {
            return Err(invalid(
                "agent.rotation_interval",
                "must be at least 1 second",
            ));
        }
        if self.agent.grace_period < self.agent.rotation_interval {
            return Err(invalid(
                "agent.grace_period",
                "must be at least agent.rotation_interval",
            ));
        }
        // Room for a few of the largest entries per file.
        let min_audit_file = 4 * license_audit::MAX_ENTRY_BYTES as u64;
        if self.agent.audit_max_file_bytes < min_audit_file {
            return Err(invalid(
                "agent.audit_max_file_bytes",
                format!("must be at least {min_audit_file} bytes"),
            ));
        }
        let positive = [
            ("agent.poll_interval", self.agent.poll_interval),
            ("agent.watch_poll_interval", self.agent.watch_poll_interval),
            (
                "agent.audit_keep_files",
                u64::from(self.agent.audit_keep_files),
            ),
            ("ipc.max_connections", self.ipc.max_connections as u64),
            ("ipc.idle_timeout", self.ipc.idle_timeout),
            ("ipc.replay_window", self.ipc.replay_window),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if let Some(url) = &self.alerts.webhook_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid(
                    "alerts.webhook_url",
                    "must be an http:// or https:// URL",
                ));
            }
        }
        if self.alerts.webhook_retries > 10 {
            return Err(invalid("alerts.webhook_retries", "must be at most 10"));
        }
        if !(MIN_PBKDF2_ITERATIONS..=MAX_PBKDF2_ITERATIONS).contains(&self.tpm.pbkdf2_iterations) {
            return Err(invalid(
                "tpm.pbkdf2_iterations",
                format!("must be between {MIN_PBKDF2_ITERATIONS} and {MAX_PBKDF2_ITERATIONS}"),
            ));
        }
        if self.tpm.fallback_key_file == self.tpm.fallback_encrypted_storage {
            return Err(invalid(
                "tpm.fallback_key_file",
                "must not be the store itself",
            ));
        }
        if !(10..=3600).contains(&self.update.health_deadline) {
            return Err(invalid(
                "update.health_deadline",
                "must be between 10 and 3600 seconds",
            ));
        }
        for (key, command) in [
            ("update.stop_command", &self.update.stop_command),
            ("update.start_command", &self.update.start_command),
        ] {
            if command.first().is_none_or(String::is_empty) {
                return Err(invalid(key, "must name a program"));
            }
        }
        if self.update.work_dir.starts_with(&self.agent.state_dir)
            || self.update.work_dir == self.update_staging_dir()
        {
            return Err(invalid(
                "update.work_dir",
                "must be outside agent.state_dir (the agent's user must not write it)",
            ));
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_modes_are_octal_strings() {
        assert_eq!("0660".parse(), Ok(SocketMode(0o660)));
        assert_eq!("666".parse(), Ok(SocketMode(0o666)));
        assert_eq!("0o600".parse(), Ok(SocketMode(0o600)));
        for bad in ["", "0999", "1777", "rw-rw----", "-1"] {
            let err = bad.parse::<SocketMode>().unwrap_err();
            assert!(err.contains("octal"), "{bad}: {err}");
        }
        let ipc = IpcSection::default();
        let text = toml::to_string(&ipc).unwrap();
        assert!(text.contains("socket_mode = \"0660\""), "{text}");
        let back: IpcSection = toml::from_str(&text).unwrap();
        assert_eq!(back.socket_mode, SocketMode::DEFAULT);
    }

    fn sample() -> String {
        r#"
[server]
url = "https://licenses.example.com:8444"
public_url = "https://licenses.example.com:8443"
cert_pin = "sha256:2xIQ3lut/L8NGd7F/8syU3WXxlTuAQUnaStYs3gYVPY="
client_cert = "/etc/license-agent/client.pem"
client_key = "/etc/license-agent/client.key"
ca_cert = "/etc/license-agent/ca.pem"
license_public_key = "ed25519:5mbwf7fXeAluHs6hVQhV6ddRy19ASl7fyPAaNGF5u1g="

[agent]
id = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
client_id = "550e8400-e29b-41d4-a716-446655440000"
rotation_interval = 86400
grace_period = 604800

[tpm]
enabled = false
fallback_encrypted_storage = "/var/lib/license-agent/secret.enc"

[management]
allowed_uids = [1000, 1001]
"#
        .to_string()
    }

    #[test]
    fn sids_are_recognised() {
        assert!(is_sid("S-1-5-32-545"));
        assert!(is_sid("S-1-5-21-3623811015-3361044348-30300820-1013"));
        for bad in [
            "",
            "S-1-",
            "S-1-5-",
            "S-1-5-x",
            "s-1-5-18",
            "S-2-5-18",
            "S-1-5-18-",
        ] {
            assert!(!is_sid(bad), "{bad}");
        }
    }

    /// Each system refuses the other's keys, naming the one to use.
    #[test]
    fn the_other_systems_keys_are_refused() {
        let with = |extra: &str| {
            let mut text = sample()
                .replace("[management]\nallowed_uids = [1000, 1001]\n", "")
                .replace("[tpm]", "[update]\nenabled = false\n\n[tpm]");
            text.push_str(extra);
            AgentConfig::parse(&text)
        };
        if cfg!(windows) {
            let c = with("[ipc]\nallowed_sids = [\"S-1-5-21-1-2-3-1001\"]\nallowed_groups = [\"S-1-5-32-545\"]\n").unwrap();
            assert_eq!(c.ipc.allowed_groups, ["S-1-5-32-545"]);
            let err = with("[ipc]\nallowed_uids = [1000]\n")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("ipc.allowed_uids") && err.contains("ipc.allowed_sids"),
                "{err}"
            );
            let err = with("[ipc]\nallowed_groups = [\"Users\"]\n")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("ipc.allowed_groups") && err.contains("not a SID"),
                "{err}"
            );
            let updates = sample()
                .replace("[management]\nallowed_uids = [1000, 1001]\n", "")
                .replace("[tpm]", "[update]\nenabled = true\n\n[tpm]");
            let err = AgentConfig::parse(&updates).unwrap_err().to_string();
            assert!(err.contains("update.enabled"), "{err}");
        } else {
            assert!(with("[ipc]\nallowed_uids = [1000]\n").is_ok());
            let err = with("[ipc]\nallowed_sids = [\"S-1-5-21-1-2-3-1001\"]\n")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("ipc.allowed_sids") && err.contains("Windows setting"),
                "{err}"
            );
        }
    }

    // A Linux config (uids, the Linux example): Windows refuses its keys, see above.
    #[cfg(unix)]
    #[test]
    fn parses_the_seed_keys() {
        let c = AgentConfig::parse(&sample()).unwrap();
        assert_eq!(c.agent.rotation_interval, 86_400);
        assert_eq!(c.management.allowed_uids, vec![1000, 1001]);
        let again = AgentConfig::parse(&c.to_toml()).unwrap();
        assert_eq!(again.agent.id, c.agent.id);
    }

    // A Linux config (uids, the Linux example): Windows refuses its keys, see below.
    #[cfg(unix)]
    #[test]
    fn shipped_example_parses() {
        let example = include_str!("../../../packaging/agent-config.example.toml");
        let c = AgentConfig::parse(example).unwrap();
        assert_eq!(c.agent.grace_period, DEFAULT_GRACE_PERIOD_SECS);
    }

    // A Linux config (uids, the Linux example): Windows refuses its keys, see below.
    #[cfg(unix)]
    #[test]
    fn errors_name_the_key() {
        let cases = [
            (sample().replace("[tpm]", "[tpm]\nbogus = 1"), "bogus"),
            (sample().replace("sha256:2x", "md5:2x"), "cert_pin"),
            (
                sample().replace("rotation_interval = 86400", "rotation_interval = \"daily\""),
                "rotation_interval",
            ),
            (
                sample().replace("grace_period = 604800", "grace_period = 10"),
                "agent.grace_period",
            ),
            (
                sample().replace("https://licenses.example.com:8444", "http://x"),
                "server.url",
            ),
            (sample().replace("id = \"6ba7", "id = \"zz"), "id"),
            (
                format!("{}\n[ipc]\nidle_timeout = 0\n", sample()),
                "ipc.idle_timeout",
            ),
            (format!("{}\n[ipc]\nsocket = 5\n", sample()), "socket"),
            (
                sample().replace("enabled = false", "enabled = false\npbkdf2_iterations = 5"),
                "tpm.pbkdf2_iterations",
            ),
            (
                sample().replace(
                    "enabled = false",
                    "enabled = false\npbkdf2_iterations = 4000000000",
                ),
                "tpm.pbkdf2_iterations",
            ),
        ];
        for (text, key) in cases {
            let err = AgentConfig::parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }
}
