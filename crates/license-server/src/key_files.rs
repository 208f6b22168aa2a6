//! The data directory's key files (`master-keys.json`, `license-keys.json`, `server-trust.json`,
//! the CA and TLS keys): written atomically at mode 0600 (replacing the legacy single-key file they succeed), and stamped so a
//! serving process notices when the CLI or an operator replaced one.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// Replaces `root/name` with `text` atomically at `mode`: a temporary file in the same
/// directory, synced, renamed over it, the directory synced. A crash leaves the old or the new
/// contents, never a torn file. The error names the path that failed.
pub fn replace(
    root: &Path,
    name: &str,
    text: &[u8],
    mode: u32,
) -> Result<(), (PathBuf, std::io::Error)> {
    let failed = |path: &Path| {
        let path = path.to_path_buf();
        move |e| (path, e)
    };
    let path = root.join(name);
    let tmp = root.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(failed(&tmp))?;
    f.write_all(text)
        .and_then(|()| f.sync_all())
        .map_err(failed(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(failed(&path))?;
    std::fs::File::open(root)
        .and_then(|dir| dir.sync_all())
        .map_err(failed(root))
}

/// Writes `text` to `root/name` atomically at mode 0600 ([`replace`]), then removes
/// `root/legacy`, whose key the new file now carries.
pub fn write_private(
    root: &Path,
    name: &str,
    legacy: &str,
    text: &[u8],
) -> Result<(), (PathBuf, std::io::Error)> {
    replace(root, name, text, 0o600)?;
    let legacy = root.join(legacy);
    match std::fs::remove_file(&legacy) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err((legacy, e)),
    }
    std::fs::File::open(root)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| (root.to_path_buf(), e))
}

/// What identifies one version of a key-set file on disk, to notice a replacement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    ino: u64,
    mtime_ns: i128,
    len: u64,
}

impl FileStamp {
    /// The stamp of `root/name`, or of `root/legacy` while only that exists.
    pub fn of(root: &Path, name: &str, legacy: &str) -> Option<Self> {
        let m = std::fs::metadata(root.join(name))
            .or_else(|_| std::fs::metadata(root.join(legacy)))
            .ok()?;
        Some(Self {
            ino: m.ino(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            len: m.len(),
        })
    }
}

/// A key set as a serving process holds it: the value, and the stamp of the file it was read
/// from, so a replaced file is noticed and re-read.
#[derive(Debug)]
pub struct Held<T> {
    value: std::sync::RwLock<std::sync::Arc<T>>,
    stamp: std::sync::Mutex<Option<FileStamp>>,
}

impl<T> Held<T> {
    pub fn new(value: T, stamp: Option<FileStamp>) -> Self {
        Self {
            value: std::sync::RwLock::new(std::sync::Arc::new(value)),
            stamp: std::sync::Mutex::new(stamp),
        }
    }

    /// The value held now.
    pub fn snapshot(&self) -> std::sync::Arc<T> {
        self.value.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether the file's stamp is no longer the one the held value was read under.
    pub fn stale(&self, now: Option<FileStamp>) -> bool {
        *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) != now
    }

    /// Holds `value`, read (or written) under `stamp`.
    pub fn replace(&self, value: T, stamp: Option<FileStamp>) {
        *self.value.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(value);
        *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = stamp;
    }
}
