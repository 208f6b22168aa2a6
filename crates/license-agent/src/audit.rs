//! The agent's side of the audit log (seed §4.3, DESIGN.md §3.4): every validation, rotation,
//! refused peer, alert and state change goes into the hash-chained log of `license-audit`.
//!
//! Validations use [`Audit::durable`]: the answer is sent only once its record is on disk
//! (the log batches concurrent records into one fsync, so throughput holds), and a record that
//! cannot be written turns the answer into `internal`. Background events use [`Audit::note`],
//! which logs a failure instead: there is no caller to refuse. Both wait for the fsync on the
//! blocking pool ([`crate::platform::blocking`]), never on an async worker.

use std::path::Path;
use std::sync::Arc;

use license_audit::{Actor, Anchor, AuditError, AuditLog, Event, LogOptions, Outcome};

use crate::platform::blocking;

#[derive(Debug, Clone)]
pub struct Audit {
    log: Arc<AuditLog>,
    keep_files: u32,
}

impl Audit {
    /// Opens the log with the default file size and retention.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        Self::open_with(path, LogOptions::default())
    }

    pub fn open_with(path: &Path, options: LogOptions) -> Result<Self, AuditError> {
        Ok(Self {
            keep_files: options.keep_files,
            log: Arc::new(AuditLog::open(path, options)?),
        })
    }

    /// Rotations since the log was opened, and how many rotated files it keeps.
    pub fn rotations(&self) -> (u64, u32) {
        (self.log.stats().rotations, self.keep_files)
    }

    /// Appends and waits until the record is durable; the error says why it is not.
    pub async fn durable(&self, event: Event) -> Result<(), AuditError> {
        let log = self.log.clone();
        blocking::run(move || log.append(event)).await.map(|_| ())
    }

    /// Appends a background event and waits for it; a failure is logged (nothing to refuse).
    pub async fn note(&self, event: Event) {
        if let Err(e) = self.durable(event).await {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }

    /// The chain's head, kept in state.json so that truncation of the log's tail is detectable.
    pub fn head(&self) -> Anchor {
        self.log.head()
    }
}

/// An event by the agent itself.
pub fn agent_event(name: &str, outcome: Outcome) -> Event {
    Event::new(name, outcome).actor(Actor::AGENT)
}
