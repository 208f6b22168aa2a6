//! Reading the log back and checking its hash chain.
//!
//! [`verify`] walks every file oldest first and stops at the first entry that breaks the
//! chain. What it can and cannot see:
//!
//! - a modified entry (its `hash` no longer matches its content), a deleted, reordered,
//!   duplicated or inserted entry (the `seq` sequence or the next entry's `prev_hash` breaks,
//!   even when a forged entry carries a correctly recomputed hash), a cut last line, and
//!   leading entries removed from the oldest file (the oldest entry kept must be the genesis
//!   or a rotation marker) are all detected;
//! - removing whole entries at the END of the log leaves a valid shorter chain. Only a copy of
//!   the last `(seq, hash)` kept elsewhere can reveal it: [`verify_with_anchor`] takes that
//!   [`Anchor`] (the agent keeps [`AuditLog::head`](crate::AuditLog::head) in its state file);
//! - deleting whole rotated files from the old end looks like ordinary rotation.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::entry::{Entry, FILE_STARTED_EVENT, FIRST_SEQ, GENESIS_HASH};
use crate::error::AuditError;
use crate::files;

/// A point of the chain recorded outside the log: the last `seq` and its `hash`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Anchor {
    /// Sequence number (0 for an empty log).
    pub seq: u64,
    /// Hash of entry `seq` ([`GENESIS_HASH`] for an empty log).
    pub hash: String,
}

impl Anchor {
    /// The head of an empty log.
    pub fn genesis() -> Self {
        Anchor {
            seq: FIRST_SEQ - 1,
            hash: GENESIS_HASH.to_owned(),
        }
    }
}

/// What is wrong with the first bad entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum TamperKind {
    /// The line is not a valid entry (bad JSON, unknown or missing field, bad time).
    BadEntry {
        /// Parser message.
        reason: String,
    },
    /// The stored `hash` does not match the entry's content: the entry was modified.
    HashMismatch {
        /// Hash written in the entry.
        stored: String,
        /// Hash of its content.
        computed: String,
    },
    /// `prev_hash` is not the hash of the previous entry: an entry was deleted, reordered,
    /// replaced or inserted before this one.
    PrevHashMismatch {
        /// What the previous entry's hash is.
        expected: String,
        /// What this entry says.
        found: String,
    },
    /// `seq` jumps forward: entries are missing before this one.
    SeqGap {
        /// Previous seq + 1.
        expected: u64,
        /// This entry's seq.
        found: u64,
    },
    /// `seq` does not increase: entries were reordered, duplicated or inserted.
    SeqNotIncreasing {
        /// Previous seq + 1.
        expected: u64,
        /// This entry's seq.
        found: u64,
    },
    /// The last line has no newline: cut mid-entry (a torn write or a truncated file).
    TruncatedLine,
    /// The oldest entry kept is neither the chain's genesis nor a rotation marker: leading
    /// entries were removed.
    ChainStartMissing {
        /// Seq of the oldest entry kept.
        first_seq: u64,
    },
    /// The log ends before the anchor: trailing entries were removed.
    EndsBeforeAnchor {
        /// Anchored seq.
        anchor_seq: u64,
        /// Last seq found.
        last_seq: u64,
    },
    /// The entry at the anchor's seq does not have the anchored hash.
    AnchorMismatch {
        /// Anchored seq.
        anchor_seq: u64,
    },
}

impl std::fmt::Display for TamperKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TamperKind::BadEntry { reason } => write!(f, "not a valid entry: {reason}"),
            TamperKind::HashMismatch { .. } => {
                write!(f, "hash does not match the content (entry modified)")
            }
            TamperKind::PrevHashMismatch { .. } => write!(
                f,
                "prev_hash does not match the previous entry (entry deleted, reordered or inserted)"
            ),
            TamperKind::SeqGap { expected, found } => write!(
                f,
                "seq jumps from {} to {found} (entries deleted)",
                expected.saturating_sub(1)
            ),
            TamperKind::SeqNotIncreasing { expected, found } => write!(
                f,
                "seq {found} where {expected} was expected (entries reordered, duplicated or inserted)"
            ),
            TamperKind::TruncatedLine => write!(f, "last line is cut (no newline)"),
            TamperKind::ChainStartMissing { first_seq } => write!(
                f,
                "oldest entry is seq {first_seq} but is neither the genesis nor a rotation marker (leading entries removed)"
            ),
            TamperKind::EndsBeforeAnchor {
                anchor_seq,
                last_seq,
            } => write!(
                f,
                "log ends at seq {last_seq} but the anchor says {anchor_seq} (trailing entries removed)"
            ),
            TamperKind::AnchorMismatch { anchor_seq } => write!(
                f,
                "entry seq {anchor_seq} does not have the anchored hash (entry replaced)"
            ),
        }
    }
}

/// Where the first bad entry is and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tamper {
    /// The file.
    pub file: PathBuf,
    /// 1-based line number in that file.
    pub line: u64,
    /// The entry's seq, when it could be read.
    pub seq: Option<u64>,
    /// What is wrong.
    #[serde(flatten)]
    pub kind: TamperKind,
}

impl std::fmt::Display for Tamper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)?;
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        write!(f, ": {}", self.kind)
    }
}

/// The result of a verification that could read the files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Files read, oldest first.
    pub files: Vec<PathBuf>,
    /// Entries checked and found good (before `problem`, if any).
    pub entries: u64,
    /// Seq of the oldest entry.
    pub first_seq: Option<u64>,
    /// Last good entry.
    pub last: Option<Anchor>,
    /// The first bad entry; `None` when the chain is intact.
    pub problem: Option<Tamper>,
}

impl VerifyReport {
    /// `true` when no tampering was found.
    pub fn is_ok(&self) -> bool {
        self.problem.is_none()
    }
}

/// One line of a log file.
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    /// The file.
    pub file: PathBuf,
    /// 1-based line number.
    pub line: u64,
    /// The entry, or why the line is not one.
    pub entry: Result<Entry, LineError>,
}

/// Why a line is not an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LineError {
    /// The file ends without a newline after this line.
    Truncated,
    /// The line does not parse as an entry.
    Invalid(String),
}

/// Parses one line (without its newline) into an entry, checking the `time` format too (what
/// [`verify`] and [`read_log`] do with every line).
pub fn parse_line(line: &[u8]) -> Result<Entry, String> {
    let entry: Entry = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    entry
        .timestamp()
        .map_err(|e| format!("bad time {:?}: {e}", entry.time))?;
    Ok(entry)
}

/// Splits file content into lines, the last one flagged when it has no newline.
pub(crate) fn split_lines(data: &[u8]) -> impl Iterator<Item = (u64, &[u8], bool)> {
    let complete = data.last().is_none_or(|b| *b == b'\n');
    let body = if complete && !data.is_empty() {
        &data[..data.len() - 1]
    } else {
        data
    };
    let count = if data.is_empty() {
        0
    } else {
        body.split(|b| *b == b'\n').count()
    };
    body.split(|b| *b == b'\n')
        .take(count)
        .enumerate()
        .map(move |(i, l)| (i as u64 + 1, l, !complete && i + 1 == count))
}

/// Reads every line of the log, oldest file first, without checking the chain (for display).
pub fn read_log(path: &Path) -> Result<Vec<LogLine>, AuditError> {
    let mut out = Vec::new();
    for file in files::log_files(path)? {
        let data = read_file(&file)?;
        for (line, bytes, cut) in split_lines(&data) {
            let entry = if cut {
                Err(LineError::Truncated)
            } else {
                parse_line(bytes).map_err(LineError::Invalid)
            };
            out.push(LogLine {
                file: file.clone(),
                line,
                entry,
            });
        }
    }
    Ok(out)
}

fn read_file(file: &Path) -> Result<Vec<u8>, AuditError> {
    match fs::read(file) {
        Ok(d) => Ok(d),
        // Rotated away between listing and reading.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(AuditError::io(file, "read", e)),
    }
}

/// Verifies the whole log at `path` (the current file, or the directory holding
/// `audit.log`), rotated files included. `Err` only when files cannot be read; tampering is
/// reported in [`VerifyReport::problem`].
pub fn verify(path: &Path) -> Result<VerifyReport, AuditError> {
    verify_inner(path, None)
}

/// Like [`verify`], and also checks that the log reaches `anchor` (a `(seq, hash)` recorded
/// elsewhere, e.g. the agent's state file) and that entry `anchor.seq` has `anchor.hash`. This
/// is what detects trailing entries removed. A log longer than the anchor is fine (the anchor
/// is saved after the entries); an anchor older than the oldest file kept is not checked.
pub fn verify_with_anchor(path: &Path, anchor: &Anchor) -> Result<VerifyReport, AuditError> {
    verify_inner(path, Some(anchor))
}

fn verify_inner(path: &Path, anchor: Option<&Anchor>) -> Result<VerifyReport, AuditError> {
    let files = files::log_files(path)?;
    let mut report = VerifyReport {
        files: files.clone(),
        entries: 0,
        first_seq: None,
        last: None,
        problem: None,
    };
    let mut anchor_seen = false;
    let mut last_place: Option<(PathBuf, u64)> = None;
    'files: for file in &files {
        let data = read_file(file)?;
        for (line, bytes, cut) in split_lines(&data) {
            let fail = |seq: Option<u64>, kind: TamperKind| Tamper {
                file: file.clone(),
                line,
                seq,
                kind,
            };
            if cut {
                let seq = parse_line(bytes).ok().map(|e| e.seq);
                report.problem = Some(fail(seq, TamperKind::TruncatedLine));
                break 'files;
            }
            let entry = match parse_line(bytes) {
                Ok(e) => e,
                Err(reason) => {
                    report.problem = Some(fail(None, TamperKind::BadEntry { reason }));
                    break 'files;
                }
            };
            if let Some(kind) = check_entry(&entry, report.last.as_ref()) {
                report.problem = Some(fail(Some(entry.seq), kind));
                break 'files;
            }
            if let Some(a) = anchor {
                if entry.seq == a.seq {
                    anchor_seen = true;
                    if entry.hash != a.hash {
                        report.problem = Some(fail(
                            Some(entry.seq),
                            TamperKind::AnchorMismatch { anchor_seq: a.seq },
                        ));
                        break 'files;
                    }
                }
            }
            report.first_seq.get_or_insert(entry.seq);
            report.entries += 1;
            report.last = Some(Anchor {
                seq: entry.seq,
                hash: entry.hash,
            });
            last_place = Some((file.clone(), line));
        }
    }
    if let (None, Some(a)) = (&report.problem, anchor) {
        let last_seq = report.last.as_ref().map_or(FIRST_SEQ - 1, |l| l.seq);
        if last_seq < a.seq {
            let (file, line) = last_place.unwrap_or_else(|| (files::resolve(path), 0));
            report.problem = Some(Tamper {
                file,
                line,
                seq: report.last.as_ref().map(|l| l.seq),
                kind: TamperKind::EndsBeforeAnchor {
                    anchor_seq: a.seq,
                    last_seq,
                },
            });
        } else if !anchor_seen && a.seq == FIRST_SEQ - 1 && a.hash != GENESIS_HASH {
            report.problem = Some(Tamper {
                file: files::resolve(path),
                line: 0,
                seq: None,
                kind: TamperKind::AnchorMismatch { anchor_seq: a.seq },
            });
        }
    }
    Ok(report)
}

/// Checks one parsed entry against the previous good one (`None` for the oldest entry).
fn check_entry(entry: &Entry, prev: Option<&Anchor>) -> Option<TamperKind> {
    let computed = entry.compute_hash();
    if computed != entry.hash {
        return Some(TamperKind::HashMismatch {
            stored: entry.hash.clone(),
            computed,
        });
    }
    match prev {
        None => {
            let genesis = entry.seq == FIRST_SEQ && entry.prev_hash == GENESIS_HASH;
            let marker = entry.event == FILE_STARTED_EVENT && entry.seq > FIRST_SEQ;
            if genesis || marker {
                None
            } else if entry.seq == FIRST_SEQ {
                Some(TamperKind::PrevHashMismatch {
                    expected: GENESIS_HASH.to_owned(),
                    found: entry.prev_hash.clone(),
                })
            } else {
                Some(TamperKind::ChainStartMissing {
                    first_seq: entry.seq,
                })
            }
        }
        Some(prev) => {
            let expected = prev.seq.saturating_add(1);
            if entry.seq > expected {
                Some(TamperKind::SeqGap {
                    expected,
                    found: entry.seq,
                })
            } else if entry.seq < expected {
                Some(TamperKind::SeqNotIncreasing {
                    expected,
                    found: entry.seq,
                })
            } else if entry.prev_hash != prev.hash {
                Some(TamperKind::PrevHashMismatch {
                    expected: prev.hash.clone(),
                    found: entry.prev_hash.clone(),
                })
            } else {
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_with_floats_read_back_with_the_same_hash() {
        // Every f64 must read back as itself, or an entry whose details hold one fails
        // verification as tampered. serde_json's default float parser is off by one ulp for
        // some inputs; many pseudo-random bit patterns find them.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let x = f64::from_bits(state);
            if !x.is_finite() {
                continue;
            }
            let event = crate::Event::new("x", crate::Outcome::Success).detail("f", x);
            let time = time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
            let entry = Entry::seal(event, 1, time, GENESIS_HASH);
            let line = entry.to_line().unwrap();
            let back = parse_line(line.as_bytes()).unwrap();
            assert_eq!(back.compute_hash(), entry.hash, "{line}");
            assert_eq!(back, entry);
        }
    }

    #[test]
    fn split_lines_flags_a_cut_last_line() {
        let v: Vec<_> = split_lines(b"a\nb\n").collect();
        assert_eq!(v, vec![(1, &b"a"[..], false), (2, &b"b"[..], false)]);
        let v: Vec<_> = split_lines(b"a\nb").collect();
        assert_eq!(v, vec![(1, &b"a"[..], false), (2, &b"b"[..], true)]);
        assert_eq!(split_lines(b"").count(), 0);
        let v: Vec<_> = split_lines(b"\n").collect();
        assert_eq!(v, vec![(1, &b""[..], false)]);
    }

    #[test]
    fn an_empty_log_verifies_and_matches_the_genesis_anchor() {
        let dir = tempfile::tempdir().unwrap();
        let r = verify_with_anchor(dir.path(), &Anchor::genesis()).unwrap();
        assert!(r.is_ok());
        assert_eq!(r.entries, 0);
        let r = verify_with_anchor(
            dir.path(),
            &Anchor {
                seq: 3,
                hash: GENESIS_HASH.into(),
            },
        )
        .unwrap();
        assert!(matches!(
            r.problem.unwrap().kind,
            TamperKind::EndsBeforeAnchor { anchor_seq: 3, .. }
        ));
    }
}
