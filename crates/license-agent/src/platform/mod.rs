//! What the machine gives the agent, behind small safe APIs: the TPM, the machine key, process
//! hardening, a clock that never runs backwards, durable file writes, and a way to make
//! blocking calls from async code without stalling a runtime worker.

pub mod blocking;
pub mod clock;
pub mod files;
pub mod hardening;
pub mod host;
pub mod keys;
pub mod local_socket;
pub mod sealing;
#[cfg(unix)]
pub mod tpm;
#[cfg(windows)]
#[path = "tpm_windows.rs"]
pub mod tpm;
#[cfg(windows)]
pub mod windows;
