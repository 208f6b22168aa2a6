//! The writer: one thread owns the file, batches concurrent appends into one write + fsync
//! (group commit), rotates by size, and recovers after I/O errors.
//!
//! Callers send their event through a channel and wait on a private reply channel. The thread
//! takes every request already queued (up to [`LogOptions::max_batch`]), seals them into
//! entries, writes them with one `write` and one `fdatasync`, then answers each caller. While
//! it waits for the disk, new requests queue up and form the next batch, so the number of
//! fsyncs follows the disk's speed, not the number of callers.
//!
//! On a write or fsync error nothing of the batch counts: the file is cut back to its last
//! committed length, every caller of the batch gets the error, the handle is dropped, and the
//! next batch reopens the file and checks that its last entry is still the chain head this
//! writer committed. So a full disk refuses actions while it lasts and the log resumes, chain
//! intact, once space returns.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use time::OffsetDateTime;

use crate::entry::{Entry, Event, Outcome, FILE_STARTED_EVENT, MAX_ENTRY_BYTES};
use crate::error::AuditError;
use crate::files;
use crate::verify::{parse_line, split_lines, Anchor};

/// Default size at which the current file is rotated: 8 MiB.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;
/// Default number of rotated files kept (`audit.log.1` … `audit.log.7`).
pub const DEFAULT_KEEP_FILES: u32 = 7;
/// Default largest number of entries committed by one write + fsync.
pub const DEFAULT_MAX_BATCH: usize = 1024;
/// Mode of the files the writer creates (owner read/write, group read; seed §4.3).
pub const FILE_MODE: u32 = 0o640;

/// How the log is kept on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogOptions {
    /// Once the current file has reached this size, the next append first rotates it.
    pub max_file_bytes: u64,
    /// Rotated files kept; the oldest beyond this is deleted. 0 keeps none.
    pub keep_files: u32,
    /// Largest number of entries written by one write + fsync.
    pub max_batch: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            keep_files: DEFAULT_KEEP_FILES,
            max_batch: DEFAULT_MAX_BATCH,
        }
    }
}

/// Proof that an entry is durable: its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The entry's seq.
    pub seq: u64,
    /// The entry's hash.
    pub hash: String,
    /// The entry's time, as written.
    pub time: String,
}

/// Counters of the writer since [`AuditLog::open`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Entries made durable (rotation markers included).
    pub entries: u64,
    /// Batches committed, i.e. successful write + fsync pairs.
    pub batches: u64,
    /// Batches that failed (every caller got an error).
    pub failed_batches: u64,
    /// Rotations done.
    pub rotations: u64,
}

#[derive(Debug, Default)]
struct Shared {
    entries: AtomicU64,
    batches: AtomicU64,
    failed_batches: AtomicU64,
    rotations: AtomicU64,
    head: Mutex<Option<Anchor>>,
}

type Reply = mpsc::SyncSender<Result<Receipt, AuditError>>;

struct Request {
    event: Event,
    reply: Reply,
}

/// The audit log, open for appending. Share it (`Arc<AuditLog>`) between threads; dropping it
/// stops the writer thread after the queued appends are done.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    tx: Option<mpsc::Sender<Request>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl AuditLog {
    /// Opens (or creates) the log whose current file is `path` (a directory means
    /// `<dir>/audit.log`; the directory must exist) and resumes its chain from the last entry
    /// of the current file, or of `audit.log.1` when the current file is empty or missing.
    /// That last line is checked (complete, valid, its hash matching its content): a corrupt
    /// tail is [`AuditError::CorruptTail`], never silently cut.
    pub fn open(path: impl AsRef<Path>, options: LogOptions) -> Result<Self, AuditError> {
        if options.max_file_bytes == 0 || options.max_batch == 0 {
            return Err(AuditError::InvalidOptions {
                reason: "max_file_bytes and max_batch must be at least 1".into(),
            });
        }
        let path = files::resolve(path.as_ref());
        let shared = Arc::new(Shared::default());
        let mut writer = Writer {
            path: path.clone(),
            dir: files::parent(&path),
            options,
            file: None,
            identity: None,
            len: 0,
            head: Anchor::genesis(),
            last_time: OffsetDateTime::UNIX_EPOCH,
            shared: Arc::clone(&shared),
        };
        let (file, identity, len, head) = writer.resume(None)?;
        writer.last_time = last_entry_time(&path)?
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        writer.file = Some(file);
        writer.identity = Some(identity);
        writer.len = len;
        writer.head = head.clone();
        set_head(&shared, head);
        let (tx, rx) = mpsc::channel::<Request>();
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| AuditError::io(&path, "spawn writer thread", e))?;
        Ok(AuditLog {
            path,
            tx: Some(tx),
            shared,
            thread: Some(thread),
        })
    }

    /// Appends `event` and returns once its entry is durable (written and fsynced, in a batch
    /// with the other appends queued at the same time). An error means the entry is NOT in
    /// the log: refuse the audited action.
    pub fn append(&self, event: Event) -> Result<Receipt, AuditError> {
        event.check()?;
        let (reply, answer) = mpsc::sync_channel(1);
        let tx = self.tx.as_ref().ok_or(AuditError::WriterGone)?;
        tx.send(Request { event, reply })
            .map_err(|_| AuditError::WriterGone)?;
        answer.recv().map_err(|_| AuditError::WriterGone)?
    }

    /// The last durable entry, `(0, GENESIS_HASH)` for an empty log. Keep it outside the log
    /// (the agent's state file) for [`verify_with_anchor`](crate::verify_with_anchor).
    pub fn head(&self) -> Anchor {
        match self.shared.head.lock() {
            Ok(h) => h.clone().unwrap_or_else(Anchor::genesis),
            Err(poisoned) => poisoned
                .into_inner()
                .clone()
                .unwrap_or_else(Anchor::genesis),
        }
    }

    /// The current file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Counters since open.
    pub fn stats(&self) -> AuditStats {
        AuditStats {
            entries: self.shared.entries.load(Ordering::Relaxed),
            batches: self.shared.batches.load(Ordering::Relaxed),
            failed_batches: self.shared.failed_batches.load(Ordering::Relaxed),
            rotations: self.shared.rotations.load(Ordering::Relaxed),
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn set_head(shared: &Shared, head: Anchor) {
    match shared.head.lock() {
        Ok(mut h) => *h = Some(head),
        Err(poisoned) => *poisoned.into_inner() = Some(head),
    }
}

/// `(device, inode)` of an open file, to recognise it after reopening the path.
type Identity = (u64, u64);

struct Writer {
    path: PathBuf,
    dir: PathBuf,
    options: LogOptions,
    /// `None` after an error or a failed rotation: the next batch reopens the path.
    file: Option<File>,
    identity: Option<Identity>,
    /// Committed length of the current file.
    len: u64,
    /// Last committed entry.
    head: Anchor,
    /// Time of the last committed entry: entries never go back in time, so the log's last
    /// entry is the latest time it has seen (a floor for a clock that was set back).
    last_time: OffsetDateTime,
    shared: Arc<Shared>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Request>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < self.options.max_batch {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
    }

    fn commit(&mut self, batch: Vec<Request>) {
        if let Err(e) = self.prepare() {
            self.shared.failed_batches.fetch_add(1, Ordering::Relaxed);
            fail_all(batch, &e);
            return;
        }
        // Never earlier than the last entry, even if the system clock was set back.
        let now = OffsetDateTime::now_utc().max(self.last_time);
        let mut head = self.head.clone();
        let mut buf = Vec::with_capacity(batch.len() * 256);
        let mut marker = 0;
        if self.len == 0 && head.seq > 0 {
            let event = Event::new(FILE_STARTED_EVENT, Outcome::Success)
                .detail("reason", "rotation")
                .detail("previous_seq", head.seq);
            if push_entry(&mut buf, event, &mut head, now).is_ok() {
                marker = 1;
            }
        }
        let mut pending: Vec<(Reply, Result<Receipt, AuditError>)> =
            Vec::with_capacity(batch.len());
        for Request { event, reply } in batch {
            let result = push_entry(&mut buf, event, &mut head, now);
            pending.push((reply, result));
        }
        if pending.iter().all(|(_, r)| r.is_err()) {
            // Nothing to write (every event was refused); the marker waits for the next batch.
            for (reply, result) in pending {
                let _ = reply.send(result);
            }
            return;
        }
        match self.write_and_sync(&buf) {
            Ok(()) => {
                self.len += buf.len() as u64;
                self.last_time = now;
                self.head = head.clone();
                set_head(&self.shared, head);
                let written = pending.iter().filter(|(_, r)| r.is_ok()).count() + marker;
                self.shared
                    .entries
                    .fetch_add(written as u64, Ordering::Relaxed);
                self.shared.batches.fetch_add(1, Ordering::Relaxed);
                for (reply, result) in pending {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                self.roll_back();
                self.shared.failed_batches.fetch_add(1, Ordering::Relaxed);
                for (reply, result) in pending {
                    let _ = reply.send(result.and(Err(duplicate(&e))));
                }
            }
        }
    }

    /// Makes sure there is an open file with room (rotating if needed).
    fn prepare(&mut self) -> Result<(), AuditError> {
        if self.file.is_none() {
            self.reopen()?;
        }
        if self.len >= self.options.max_file_bytes {
            if let Err(e) = self.rotate() {
                // Keep logging into whatever file is there rather than refuse every action
                // because an old file could not be moved; retried at the next batch.
                if self.file.is_none() {
                    self.reopen().map_err(|_| e)?;
                }
            }
        }
        Ok(())
    }

    fn write_and_sync(&mut self, buf: &[u8]) -> Result<(), AuditError> {
        let file = self.file.as_mut().ok_or(AuditError::WriterGone)?;
        file.write_all(buf)
            .map_err(|e| AuditError::io(&self.path, "write", e))?;
        file.sync_data()
            .map_err(|e| AuditError::io(&self.path, "fsync", e))
    }

    /// After a failed write or fsync: cut what may have been written, drop the handle.
    fn roll_back(&mut self) {
        if let Some(file) = self.file.take() {
            let _ = file.set_len(self.len).and_then(|()| file.sync_all());
        }
    }

    /// Reopens the path after an error or rotation and checks the head is still ours.
    fn reopen(&mut self) -> Result<(), AuditError> {
        let (file, identity, len, head) = self.resume(Some(self.len))?;
        // With keep_files = 0 a rotation leaves no file to resume from: an empty log is then
        // the expected state, and the rotation marker written next continues the chain.
        let rotated_away = self.options.keep_files == 0 && len == 0 && head == Anchor::genesis();
        if head != self.head && !rotated_away {
            return Err(AuditError::ChainMismatch {
                path: self.path.clone(),
                expected_seq: self.head.seq,
                found_seq: head.seq,
            });
        }
        self.file = Some(file);
        self.identity = Some(identity);
        self.len = len;
        Ok(())
    }

    /// Opens the current file and finds the chain head. `committed` is the length this writer
    /// last committed to the same file: a cut line beyond it is our own failed write, removed.
    fn resume(&self, committed: Option<u64>) -> Result<(File, Identity, u64, Anchor), AuditError> {
        let existed = self.path.exists();
        let file = files::append_options(FILE_MODE)
            .open(&self.path)
            .map_err(|e| AuditError::io(&self.path, "open", e))?;
        if !existed {
            files::sync_dir(&self.dir)?;
        }
        let meta = file
            .metadata()
            .map_err(|e| AuditError::io(&self.path, "stat", e))?;
        if !meta.is_file() {
            return Err(AuditError::io(
                &self.path,
                "open",
                io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
            ));
        }
        let identity = files::identity(&meta);
        let mut data = fs::read(&self.path).map_err(|e| AuditError::io(&self.path, "read", e))?;
        if let (Some(committed), Some(last)) = (committed, data.last()) {
            let ours = self.identity == Some(identity);
            if *last != b'\n' && ours && (data.len() as u64) > committed {
                let cut = usize::try_from(committed).unwrap_or(data.len());
                if data
                    .get(..cut)
                    .is_some_and(|d| d.is_empty() || d.ends_with(b"\n"))
                {
                    file.set_len(committed)
                        .and_then(|()| file.sync_all())
                        .map_err(|e| AuditError::io(&self.path, "truncate", e))?;
                    data.truncate(cut);
                }
            }
        }
        let len = data.len() as u64;
        let head = match last_entry(&self.path, &data)? {
            Some(entry) => Anchor {
                seq: entry.seq,
                hash: entry.hash,
            },
            None => self.head_of_rotated()?,
        };
        Ok((file, identity, len, head))
    }

    /// Chain head when the current file is empty: the last entry of `audit.log.1`.
    fn head_of_rotated(&self) -> Result<Anchor, AuditError> {
        let previous = files::rotated(&self.path, 1);
        match fs::read(&previous) {
            Ok(data) => Ok(last_entry(&previous, &data)?
                .map(|e| Anchor {
                    seq: e.seq,
                    hash: e.hash,
                })
                .unwrap_or_else(Anchor::genesis)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Anchor::genesis()),
            Err(e) => Err(AuditError::io(&previous, "read", e)),
        }
    }

    /// `audit.log.{keep-1}` → `.keep`, …, `audit.log` → `.1`, then a new `audit.log`.
    fn rotate(&mut self) -> Result<(), AuditError> {
        let keep = self.options.keep_files;
        self.file = None;
        if keep == 0 {
            remove_if_exists(&self.path)?;
        } else {
            remove_if_exists(&files::rotated(&self.path, keep))?;
            for n in (1..keep).rev() {
                rename_if_exists(
                    &files::rotated(&self.path, n),
                    &files::rotated(&self.path, n + 1),
                )?;
            }
            rename_if_exists(&self.path, &files::rotated(&self.path, 1))?;
        }
        files::sync_dir(&self.dir)?;
        self.shared.rotations.fetch_add(1, Ordering::Relaxed);
        let file = files::append_options(FILE_MODE)
            .open(&self.path)
            .map_err(|e| AuditError::io(&self.path, "open", e))?;
        files::sync_dir(&self.dir)?;
        let meta = file
            .metadata()
            .map_err(|e| AuditError::io(&self.path, "stat", e))?;
        self.identity = Some(files::identity(&meta));
        self.len = meta.len();
        self.file = Some(file);
        Ok(())
    }
}

/// Seals `event` after `head`, appends its line to `buf` and advances `head`.
fn push_entry(
    buf: &mut Vec<u8>,
    event: Event,
    head: &mut Anchor,
    now: OffsetDateTime,
) -> Result<Receipt, AuditError> {
    let seq = head.seq + 1;
    let entry = Entry::seal(event, seq, now, &head.hash);
    let line = entry.to_line()?;
    if line.len() + 1 > MAX_ENTRY_BYTES {
        return Err(AuditError::InvalidEvent {
            reason: format!(
                "entry is {} bytes, the limit is {MAX_ENTRY_BYTES}",
                line.len() + 1
            ),
        });
    }
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    head.seq = seq;
    head.hash = entry.hash.clone();
    Ok(Receipt {
        seq,
        hash: entry.hash,
        time: entry.time,
    })
}

/// The last entry of a file's content, checked; `None` if the file is empty.
fn last_entry(path: &Path, data: &[u8]) -> Result<Option<Entry>, AuditError> {
    let Some((line, bytes, cut)) = split_lines(data).last() else {
        return Ok(None);
    };
    let corrupt = |reason: String| AuditError::CorruptTail {
        path: path.to_path_buf(),
        line,
        reason,
    };
    if cut {
        return Err(corrupt("last line is cut (no newline)".into()));
    }
    let entry = parse_line(bytes).map_err(corrupt)?;
    if entry.compute_hash() != entry.hash {
        return Err(corrupt("hash does not match the content".into()));
    }
    Ok(Some(entry))
}

/// Unix time (seconds) of the log's last entry — of the current file, or of `audit.log.1` when
/// the current one is empty or missing — `None` for an empty log. A floor for a clock that
/// must not run backwards, kept where it cannot be changed unnoticed (the hash chain); the tail
/// is checked as [`AuditLog::open`] checks it.
pub fn last_entry_time(path: impl AsRef<Path>) -> Result<Option<i64>, AuditError> {
    let path = files::resolve(path.as_ref());
    for candidate in [path.clone(), files::rotated(&path, 1)] {
        let data = match fs::read(&candidate) {
            Ok(data) => data,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(AuditError::io(&candidate, "read", e)),
        };
        if let Some(entry) = last_entry(&candidate, &data)? {
            let time =
                OffsetDateTime::parse(&entry.time, &time::format_description::well_known::Rfc3339)
                    .ok()
                    .map(OffsetDateTime::unix_timestamp);
            return Ok(time);
        }
    }
    Ok(None)
}

fn remove_if_exists(path: &Path) -> Result<(), AuditError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(AuditError::io(path, "remove", e)),
        _ => Ok(()),
    }
}

fn rename_if_exists(from: &Path, to: &Path) -> Result<(), AuditError> {
    match fs::rename(from, to) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(AuditError::io(from, "rename", e)),
        _ => Ok(()),
    }
}

fn fail_all(batch: Vec<Request>, e: &AuditError) {
    for r in batch {
        let _ = r.reply.send(Err(duplicate(e)));
    }
}

/// A copy of an error for each caller of a failed batch (`io::Error` is not `Clone`).
fn duplicate(e: &AuditError) -> AuditError {
    match e {
        AuditError::Io { path, op, source } => AuditError::Io {
            path: path.clone(),
            op,
            source: match source.raw_os_error() {
                Some(code) => io::Error::from_raw_os_error(code),
                None => io::Error::new(source.kind(), source.to_string()),
            },
        },
        AuditError::CorruptTail { path, line, reason } => AuditError::CorruptTail {
            path: path.clone(),
            line: *line,
            reason: reason.clone(),
        },
        AuditError::ChainMismatch {
            path,
            expected_seq,
            found_seq,
        } => AuditError::ChainMismatch {
            path: path.clone(),
            expected_seq: *expected_seq,
            found_seq: *found_seq,
        },
        AuditError::InvalidEvent { reason } => AuditError::InvalidEvent {
            reason: reason.clone(),
        },
        AuditError::InvalidOptions { reason } => AuditError::InvalidOptions {
            reason: reason.clone(),
        },
        AuditError::WriterGone => AuditError::WriterGone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer_after(path: &Path, log: &AuditLog) -> Writer {
        let meta = fs::metadata(path).unwrap();
        Writer {
            path: path.to_path_buf(),
            dir: files::parent(path),
            options: LogOptions::default(),
            file: None,
            identity: Some(files::identity(&meta)),
            len: meta.len(),
            head: log.head(),
            last_time: OffsetDateTime::UNIX_EPOCH,
            shared: Arc::new(Shared::default()),
        }
    }

    fn event() -> Event {
        Event::new("test.event", Outcome::Success)
    }

    #[test]
    fn entries_never_go_back_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        // The last entry was written while the clock said tomorrow.
        let tomorrow = OffsetDateTime::now_utc() + time::Duration::days(1);
        let entry = Entry::seal(event(), 1, tomorrow, &Anchor::genesis().hash);
        fs::write(&path, format!("{}\n", entry.to_line().unwrap())).unwrap();
        let log = AuditLog::open(&path, LogOptions::default()).unwrap();
        log.append(event()).unwrap();
        drop(log);
        let last = last_entry_time(&path).unwrap().unwrap();
        assert!(
            last >= tomorrow.unix_timestamp(),
            "stamped no earlier than the previous"
        );
        let report = crate::verify(&path).unwrap();
        assert!(
            report.problem.is_none() && report.entries == 2,
            "{report:?}"
        );
    }

    #[test]
    fn last_entry_time_is_the_newest_entry_s_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        assert_eq!(last_entry_time(&path).unwrap(), None);
        let before = OffsetDateTime::now_utc().unix_timestamp();
        let log = AuditLog::open(&path, LogOptions::default()).unwrap();
        log.append(event()).unwrap();
        drop(log);
        let t = last_entry_time(&path).unwrap().unwrap();
        assert!((before..=before + 5).contains(&t), "{t} vs {before}");
        // A forged tail is refused, not read.
        let mut data = fs::read(&path).unwrap();
        let n = data.len();
        data[n - 5] ^= 1;
        fs::write(&path, data).unwrap();
        assert!(last_entry_time(&path).is_err());
    }

    #[test]
    fn reopening_cuts_our_own_torn_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, LogOptions::default()).unwrap();
        log.append(event()).unwrap();
        let mut w = writer_after(&path, &log);
        drop(log);
        // A write that failed half-way and could not be rolled back.
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":2,\"ti").unwrap();
        drop(f);
        w.reopen().unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), w.len);
        assert!(crate::verify(&path).unwrap().is_ok());
    }

    #[test]
    fn a_torn_line_in_another_file_is_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, LogOptions::default()).unwrap();
        log.append(event()).unwrap();
        let mut w = writer_after(&path, &log);
        drop(log);
        w.identity = Some((0, 0));
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":2").unwrap();
        drop(f);
        assert!(matches!(
            w.reopen(),
            Err(AuditError::CorruptTail { line: 2, .. })
        ));
    }

    #[test]
    fn reopening_refuses_a_head_that_moved() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, LogOptions::default()).unwrap();
        log.append(event()).unwrap();
        log.append(event()).unwrap();
        let mut w = writer_after(&path, &log);
        drop(log);
        // Someone removes the last entry while the writer is between two batches.
        let text = fs::read_to_string(&path).unwrap();
        let first = text.lines().next().unwrap().to_owned() + "\n";
        fs::write(&path, first).unwrap();
        assert!(matches!(
            w.reopen(),
            Err(AuditError::ChainMismatch {
                expected_seq: 2,
                found_seq: 1,
                ..
            })
        ));
    }

    #[test]
    fn an_oversized_event_is_refused_without_consuming_a_seq() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), LogOptions::default()).unwrap();
        let big = event().detail("blob", "x".repeat(MAX_ENTRY_BYTES));
        assert!(matches!(
            log.append(big),
            Err(AuditError::InvalidEvent { .. })
        ));
        assert!(matches!(
            log.append(Event::new("bad name", Outcome::Error)),
            Err(AuditError::InvalidEvent { .. })
        ));
        assert_eq!(log.append(event()).unwrap().seq, 1);
        assert_eq!(log.stats().entries, 1);
    }

    #[test]
    fn options_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let bad = LogOptions {
            max_batch: 0,
            ..LogOptions::default()
        };
        assert!(matches!(
            AuditLog::open(dir.path(), bad),
            Err(AuditError::InvalidOptions { .. })
        ));
    }

    #[test]
    fn keep_files_zero_rotates_into_nothing_and_continues() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let options = LogOptions {
            max_file_bytes: 300,
            keep_files: 0,
            ..LogOptions::default()
        };
        let log = AuditLog::open(&path, options).unwrap();
        for _ in 0..6 {
            log.append(event()).unwrap();
        }
        assert!(log.stats().rotations > 0);
        drop(log);
        let report = crate::verify(&path).unwrap();
        assert!(report.is_ok(), "{:?}", report.problem);
        assert_eq!(report.files.len(), 1);
        assert!(report.first_seq.unwrap() > 1);
    }
}
