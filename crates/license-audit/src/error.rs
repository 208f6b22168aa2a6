//! Errors of the audit log library.
//!
//! One enum for the library: a caller mostly needs to know "the record is not durable, refuse
//! the action" (every variant returned by `append`) or "the log cannot be read".

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong opening, appending to or reading the audit log.
///
/// A failed `append` means the record is NOT durable: the caller must refuse the action.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// An I/O operation on a log file or its directory failed (disk full, permissions, …).
    #[error("audit log I/O error on {path}: {op}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done (`"write"`, `"fsync"`, `"rename"`, …).
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The last line of the current file (read when opening or reopening) is not a valid entry:
    /// the log is not resumed over it. Run `license-agent-cli audit verify`.
    #[error("audit log {path} line {line}: {reason}; refusing to continue the chain")]
    CorruptTail {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The chain head found on disk is not the one this process last wrote: entries were
    /// removed or replaced behind its back while it was running.
    #[error("audit log {path} changed behind the writer: expected last seq {expected_seq}, found {found_seq}")]
    ChainMismatch {
        /// The file.
        path: PathBuf,
        /// Last seq this writer committed.
        expected_seq: u64,
        /// Last seq found on disk.
        found_seq: u64,
    },
    /// The event cannot be recorded as given (bad name, too large).
    #[error("invalid audit event: {reason}")]
    InvalidEvent {
        /// Why.
        reason: String,
    },
    /// Invalid [`LogOptions`](crate::LogOptions).
    #[error("invalid audit log options: {reason}")]
    InvalidOptions {
        /// Why.
        reason: String,
    },
    /// The writer thread is gone (it could not be started, or stopped): nothing can be appended.
    #[error("audit log writer is not running")]
    WriterGone,
}

impl AuditError {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: io::Error) -> Self {
        AuditError::Io {
            path: path.into(),
            op,
            source,
        }
    }
}
