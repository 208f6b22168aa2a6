//! The License Secret Agent's tamper-evident audit log (DESIGN.md §3.4, seed §4.3).
//!
//! One JSON object per line, chained by SHA-256 so that `license-agent-cli audit verify` finds
//! a modified, deleted, reordered, inserted or cut entry:
//!
//! ```text
//! {"seq":1,"time":"2026-04-01T12:00:00.123Z","event":"license.validate","actor":{"uid":1000,"pid":4242},"outcome":"success","details":{"version":3},"prev_hash":"000…000","hash":"9f2c…"}
//! ```
//!
//! - `seq` starts at 1 and grows by one per entry, across rotated files;
//! - `hash = hex(SHA-256(prev_hash as 32 raw bytes || canonical JSON of the entry without
//!   "hash"))`, the canonical JSON being compact with every object's keys sorted (exact
//!   definition: [`Entry::canonical_bytes`]); the first entry's `prev_hash` is
//!   [`GENESIS_HASH`] (64 zeros);
//! - nothing secret goes in `details`.
//!
//! [`AuditLog::append`] returns only once the entry is durable; concurrent appends are written
//! and fsynced together by one writer thread (group commit), so a validation can wait for its
//! record without serialising all validations behind one fsync each. The library uses std
//! threads only; async code calls it from `spawn_blocking`. Files rotate by size
//! (`audit.log` → `audit.log.1` → …) and the chain continues into the new file, whose first
//! entry is an `audit.file_started` marker. [`verify()`] checks everything kept;
//! [`verify_with_anchor`] also detects trailing entries removed, given the last `(seq, hash)`
//! recorded elsewhere (see the [`verify`](mod@verify) module for what is and is not detectable).
//!
//! ```
//! use license_audit::{verify, verify_with_anchor, Actor, AuditLog, Event, LogOptions, Outcome};
//!
//! # fn main() -> Result<(), license_audit::AuditError> {
//! let dir = tempfile::tempdir().expect("temp dir");
//! let log = AuditLog::open(dir.path().join("audit.log"), LogOptions::default())?;
//! let receipt = log.append(
//!     Event::new("license.validate", Outcome::Success)
//!         .actor(Actor::peer(1000, 4242))
//!         .detail("version", 3),
//! )?;
//! assert_eq!(receipt.seq, 1);
//! let anchor = log.head(); // the agent keeps this in state.json
//! drop(log);
//!
//! let report = verify(&dir.path().join("audit.log"))?;
//! assert!(report.is_ok());
//! assert_eq!(report.entries, 1);
//! assert!(verify_with_anchor(dir.path(), &anchor)?.is_ok());
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

mod entry;
mod error;
mod files;
pub mod verify;
mod writer;

pub use entry::{
    format_time, Actor, Entry, Event, Outcome, FILE_STARTED_EVENT, FIRST_SEQ, GENESIS_HASH,
    MAX_ENTRY_BYTES, MAX_EVENT_NAME_BYTES,
};
pub use error::AuditError;
pub use files::{log_files, DEFAULT_FILE_NAME};
pub use verify::{
    parse_line, read_log, verify, verify_with_anchor, Anchor, LineError, LogLine, Tamper,
    TamperKind, VerifyReport,
};
pub use writer::{
    last_entry_time, AuditLog, AuditStats, LogOptions, Receipt, DEFAULT_KEEP_FILES,
    DEFAULT_MAX_BATCH, DEFAULT_MAX_FILE_BYTES, FILE_MODE,
};
