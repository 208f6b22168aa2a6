//! Where the agent's management socket, audit log and state file are by default: the Linux
//! layout of DESIGN.md §3.3–3.4, or on Windows a named pipe and files under
//! `%ProgramData%\LicenseAgent` (`C:\ProgramData\LicenseAgent` when the variable is unset).
//!
//! They mirror the agent's own defaults (license-agent's `config.rs`); every one can be
//! overridden by a flag or an environment variable.

use std::path::PathBuf;

/// Default path of the agent's management socket (DESIGN.md §3.3).
#[cfg(unix)]
pub const MGMT_SOCKET: &str = "/run/license-agent/mgmt.sock";
/// Default name of the agent's management pipe.
#[cfg(windows)]
pub const MGMT_SOCKET: &str = r"\\.\pipe\license-agent-mgmt";

/// Default path of the current audit log file (DESIGN.md §3.4).
pub fn audit_log() -> PathBuf {
    #[cfg(unix)]
    return PathBuf::from("/var/log/license-agent/audit.log");
    #[cfg(windows)]
    return windows::data_dir().join(r"log\audit.log");
}

/// Where the agent keeps the audit log's anchor (`audit_anchor`): its state file.
pub fn state_file() -> PathBuf {
    #[cfg(unix)]
    return PathBuf::from("/var/lib/license-agent/state.json");
    #[cfg(windows)]
    return windows::data_dir().join(r"state\state.json");
}

#[cfg(windows)]
mod windows {
    use std::path::PathBuf;

    /// `%ProgramData%\LicenseAgent`: the agent's configuration (`config.toml`), state and logs.
    pub fn data_dir() -> PathBuf {
        std::env::var_os("ProgramData")
            .filter(|dir| !dir.is_empty())
            .map_or_else(|| PathBuf::from(r"C:\ProgramData"), PathBuf::from)
            .join("LicenseAgent")
    }
}
