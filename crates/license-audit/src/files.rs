//! Where the log lives on disk: the current file and its rotated predecessors.
//!
//! `audit.log` is the file being written; `audit.log.1` is the most recent rotated file,
//! `audit.log.2` the one before it, and so on. Readers go oldest first.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::AuditError;

/// File name used when a directory is given instead of a file.
pub const DEFAULT_FILE_NAME: &str = "audit.log";

/// A directory means `<dir>/audit.log`; anything else is the current log file itself.
pub(crate) fn resolve(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(DEFAULT_FILE_NAME)
    } else {
        path.to_path_buf()
    }
}

/// `audit.log` → `audit.log.<n>`.
pub(crate) fn rotated(current: &Path, n: u32) -> PathBuf {
    let mut name = current.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

pub(crate) fn parent(current: &Path) -> PathBuf {
    match current.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The rotated files that exist, as `(n, path)`, most recent (`n` = 1) first.
pub(crate) fn rotated_files(current: &Path) -> Result<Vec<(u32, PathBuf)>, AuditError> {
    let dir = parent(current);
    let Some(base) = current.file_name().and_then(|n| n.to_str()) else {
        return Err(AuditError::io(
            current,
            "resolve",
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "log path has no UTF-8 file name",
            ),
        ));
    };
    let prefix = format!("{base}.");
    let mut found = Vec::new();
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(AuditError::io(&dir, "read directory", e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| AuditError::io(&dir, "read directory", e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(suffix) = name.strip_prefix(&prefix) else {
            continue;
        };
        if suffix.is_empty() || !suffix.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(n) = suffix.parse::<u32>() {
            if n >= 1 {
                found.push((n, dir.join(name)));
            }
        }
    }
    found.sort_by_key(|(n, _)| *n);
    Ok(found)
}

/// All files of the log, oldest first: `audit.log.N`, …, `audit.log.1`, `audit.log` (those
/// that exist).
pub fn log_files(path: &Path) -> Result<Vec<PathBuf>, AuditError> {
    let current = resolve(path);
    let mut files: Vec<PathBuf> = rotated_files(&current)?
        .into_iter()
        .rev()
        .map(|(_, p)| p)
        .collect();
    match fs::metadata(&current) {
        Ok(_) => files.push(current),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(AuditError::io(&current, "stat", e)),
    }
    Ok(files)
}

/// fsync a directory so that renames and creations in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    // Windows cannot open a directory as a file to sync it; NTFS journals renames.
    if cfg!(windows) {
        return Ok(());
    }
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| AuditError::io(dir, "fsync directory", e))
}

/// Options opening a log file for appending, created `mode` on Unix (on Windows the file
/// inherits the log directory's ACL).
pub(crate) fn append_options(mode: u32) -> fs::OpenOptions {
    let mut options = fs::OpenOptions::new();
    options.create(true).append(true).read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    options
}

/// What tells one file from another that replaced it under the same name: device and inode
/// on Unix; on Windows the creation time (std has no stable file index there).
pub(crate) fn identity(meta: &fs::Metadata) -> (u64, u64) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        (meta.dev(), meta.ino())
    }
    #[cfg(windows)]
    {
        use std::os::windows::fs::MetadataExt as _;
        (0, meta.creation_time())
    }
}
