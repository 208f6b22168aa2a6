//! Integration tests of the audit log: a clean chain verifies, every kind of tampering is found
//! at the right entry, the chain survives rotation, restarts, concurrency and a full disk.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use license_audit::{
    verify, verify_with_anchor, Actor, AuditError, AuditLog, Entry, Event, LogOptions, Outcome,
    TamperKind, FILE_STARTED_EVENT,
};

fn event(i: u64) -> Event {
    Event::new("license.validate", Outcome::Success)
        .actor(Actor::peer(1000, 4242))
        .detail("n", i)
}

/// A log of `n` entries in `dir`, returning the current file's path.
fn write_log(dir: &Path, n: u64) -> PathBuf {
    let path = dir.join("audit.log");
    let log = AuditLog::open(&path, LogOptions::default()).unwrap();
    for i in 1..=n {
        assert_eq!(log.append(event(i)).unwrap().seq, i);
    }
    path
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn problem(path: &Path) -> license_audit::Tamper {
    let report = verify(path).unwrap();
    report.problem.expect("tampering must be detected")
}

#[test]
fn a_clean_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(dir.path(), 10);
    let report = verify(&path).unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.entries, 10);
    assert_eq!(report.files, vec![path.clone()]);
    assert_eq!(report.first_seq, Some(1));
    assert_eq!(report.last.unwrap().seq, 10);
    // The directory can be given instead of the file.
    assert!(verify(dir.path()).unwrap().is_ok());
}

#[test]
fn a_modified_field_is_found_at_its_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(dir.path(), 5);
    let mut l = lines(&path);
    l[2] = l[2].replace("\"outcome\":\"success\"", "\"outcome\":\"refused\"");
    write_lines(&path, &l);
    let p = problem(&path);
    assert_eq!((p.line, p.seq), (3, Some(3)));
    assert!(matches!(p.kind, TamperKind::HashMismatch { .. }), "{p}");
    assert_eq!(p.file, path);
}

#[test]
fn a_deleted_line_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(dir.path(), 5);
    let mut l = lines(&path);
    l.remove(1);
    write_lines(&path, &l);
    let p = problem(&path);
    assert_eq!((p.line, p.seq), (2, Some(3)));
    assert_eq!(
        p.kind,
        TamperKind::SeqGap {
            expected: 2,
            found: 3
        }
    );
}

#[test]
fn swapped_lines_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(dir.path(), 5);
    let mut l = lines(&path);
    l.swap(1, 2);
    write_lines(&path, &l);
    let p = problem(&path);
    assert_eq!((p.line, p.seq), (2, Some(3)));
    assert!(matches!(p.kind, TamperKind::SeqGap { .. }), "{p}");
}

#[test]
fn an_inserted_line_with_a_recomputed_hash_is_found_at_the_next_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(dir.path(), 5);
    let mut l = lines(&path);
    // Forge entry 3 chained on entry 2 with a valid hash, insert it before the real entry 3.
    let real2: Entry = serde_json::from_str(&l[1]).unwrap();
    let mut forged: Entry = serde_json::from_str(&l[2]).unwrap();
    forged.details.insert("forged".into(), true.into());
    forged.prev_hash = real2.hash.clone();
    forged.hash = forged.compute_hash();
    l.insert(2, serde_json::to_string(&forged).unwrap());
    write_lines(&path, &l);
    let p = problem(&path);
    assert_eq!((p.line, p.seq), (4, Some(3)), "{p}");
    assert!(matches!(p.kind, TamperKind::SeqNotIncreasing { .. }), "{p}");
}

#[test]
fn a_replaced_line_with_a_recomputed_hash_is_found_at_the_next_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(dir.path(), 5);
    let mut l = lines(&path);
    let mut forged: Entry = serde_json::from_str(&l[2]).unwrap();
    forged.outcome = "refused".into();
    forged.hash = forged.compute_hash();
    l[2] = serde_json::to_string(&forged).unwrap();
    write_lines(&path, &l);
    let p = problem(&path);
    assert_eq!((p.line, p.seq), (4, Some(4)), "{p}");
    assert!(matches!(p.kind, TamperKind::PrevHashMismatch { .. }), "{p}");
}

#[test]
fn a_cut_last_line_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(dir.path(), 4);
    let data = fs::read(&path).unwrap();
    fs::write(&path, &data[..data.len() - 20]).unwrap();
    let p = problem(&path);
    assert_eq!(p.line, 4);
    assert_eq!(p.kind, TamperKind::TruncatedLine);
    // And the writer refuses to resume over it, naming the line.
    match AuditLog::open(&path, LogOptions::default()) {
        Err(AuditError::CorruptTail { line, .. }) => assert_eq!(line, 4),
        other => panic!("expected CorruptTail, got {other:?}"),
    }
}

#[test]
fn removed_trailing_entries_need_the_anchor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path, LogOptions::default()).unwrap();
    for i in 1..=5 {
        log.append(event(i)).unwrap();
    }
    let anchor = log.head();
    assert_eq!(anchor.seq, 5);
    drop(log);
    assert!(verify_with_anchor(&path, &anchor).unwrap().is_ok());
    let mut l = lines(&path);
    l.truncate(3);
    write_lines(&path, &l);
    // Plain verify cannot tell: the shorter chain is valid.
    assert!(verify(&path).unwrap().is_ok());
    let p = verify_with_anchor(&path, &anchor).unwrap().problem.unwrap();
    assert_eq!(
        p.kind,
        TamperKind::EndsBeforeAnchor {
            anchor_seq: 5,
            last_seq: 3
        }
    );
    // An anchor whose hash is not the entry's is a replaced entry.
    let mut wrong = anchor.clone();
    wrong.seq = 2;
    let p = verify_with_anchor(&path, &wrong).unwrap().problem.unwrap();
    assert_eq!(p.kind, TamperKind::AnchorMismatch { anchor_seq: 2 });
}

#[test]
fn removed_leading_entries_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(dir.path(), 5);
    let mut l = lines(&path);
    l.drain(..2);
    write_lines(&path, &l);
    let p = problem(&path);
    assert_eq!((p.line, p.seq), (1, Some(3)));
    assert_eq!(p.kind, TamperKind::ChainStartMissing { first_seq: 3 });
}

#[test]
fn the_chain_survives_rotation_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let options = LogOptions {
        max_file_bytes: 1024,
        keep_files: 3,
        ..LogOptions::default()
    };
    let mut total = 0;
    for _restart in 0..3 {
        let log = AuditLog::open(&path, options.clone()).unwrap();
        let head = log.head();
        assert_eq!(head.seq, total, "the chain resumes where it stopped");
        for _ in 0..8 {
            let r = log.append(event(0)).unwrap();
            total = r.seq;
        }
    }
    let report = verify(&path).unwrap();
    assert!(report.is_ok(), "{:?}", report.problem);
    assert!(report.files.len() == 4, "files {:?}", report.files);
    assert_eq!(report.last.as_ref().unwrap().seq, total);
    // Older files were deleted: the oldest kept starts with a rotation marker.
    let oldest = lines(&report.files[0]);
    let first: Entry = serde_json::from_str(&oldest[0]).unwrap();
    assert_eq!(first.event, FILE_STARTED_EVENT);
    assert!(first.seq > 1);
    assert!(!dir.path().join("audit.log.4").exists());
    // Each rotated file is at least max_file_bytes and the chain continues into the next.
    for f in &report.files[..3] {
        assert!(fs::metadata(f).unwrap().len() >= 1024);
    }
    let last_of_1: Entry =
        serde_json::from_str(lines(&dir.path().join("audit.log.1")).last().unwrap()).unwrap();
    let first_of_current: Entry = serde_json::from_str(&lines(&path)[0]).unwrap();
    assert_eq!(first_of_current.prev_hash, last_of_1.hash);
    assert_eq!(first_of_current.seq, last_of_1.seq + 1);

    // Deleting a middle rotated file breaks the chain at the next file's first line.
    fs::remove_file(dir.path().join("audit.log.2")).unwrap();
    let p = problem(&path);
    assert_eq!(p.file, dir.path().join("audit.log.1"));
    assert_eq!(p.line, 1);
    assert!(matches!(p.kind, TamperKind::SeqGap { .. }), "{p}");
}

#[test]
fn a_restart_after_the_current_file_was_rotated_continues_from_the_previous_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(dir.path(), 3);
    fs::rename(&path, dir.path().join("audit.log.1")).unwrap();
    let log = AuditLog::open(&path, LogOptions::default()).unwrap();
    assert_eq!(log.head().seq, 3);
    assert_eq!(log.append(event(4)).unwrap().seq, 5, "marker is seq 4");
    drop(log);
    assert!(verify(&path).unwrap().is_ok());
}

#[test]
fn concurrent_appends_make_a_gap_free_chain_with_fewer_fsyncs() {
    const THREADS: u64 = 8;
    const PER_THREAD: u64 = 500;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = Arc::new(AuditLog::open(&path, LogOptions::default()).unwrap());
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut seqs = Vec::new();
                for i in 0..PER_THREAD {
                    seqs.push(log.append(event(t * 1000 + i)).unwrap().seq);
                }
                seqs
            })
        })
        .collect();
    let mut seqs: Vec<u64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=THREADS * PER_THREAD).collect::<Vec<_>>());
    let stats = log.stats();
    assert_eq!(stats.entries, THREADS * PER_THREAD);
    assert!(
        stats.batches < stats.entries,
        "group commit: {} batches for {} entries",
        stats.batches,
        stats.entries
    );
    drop(log);
    let report = verify(&path).unwrap();
    assert!(report.is_ok());
    assert_eq!(report.entries, THREADS * PER_THREAD);
}

/// Mounts a tmpfs of `size` on `dir`; `false` when this environment cannot (not root).
fn mount_tmpfs(dir: &Path, size: &str) -> bool {
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn umount(dir: &Path) {
    let _ = Command::new("umount").arg(dir).status();
}

#[test]
fn a_full_disk_refuses_appends_and_the_log_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    // The test command runs as root (it installs packages); a full disk is only faithful on
    // a real small filesystem, so not being able to make one is a failure, not a skip.
    assert!(
        mount_tmpfs(&mnt, "64k"),
        "cannot mount a 64 KiB tmpfs at {}: this test needs root (scripts/test.sh runs as root)",
        mnt.display()
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            umount(&self.0);
        }
    }
    let _guard = Unmount(mnt.clone());
    let path = mnt.join("audit.log");
    let log = AuditLog::open(&path, LogOptions::default()).unwrap();
    log.append(event(0)).unwrap();
    // Fill the rest of the file system with a ballast file.
    let ballast = mnt.join("ballast");
    let mut filled = fs::File::create(&ballast).unwrap();
    let chunk = vec![0u8; 4096];
    while std::io::Write::write_all(&mut filled, &chunk).is_ok() {}
    drop(filled);

    let mut refused = 0;
    let mut last_ok = log.head().seq;
    for i in 0..200 {
        match log.append(event(i).detail("pad", "x".repeat(1000))) {
            Ok(r) => last_ok = r.seq,
            Err(AuditError::Io { .. }) => refused += 1,
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(refused > 0, "the disk never filled");
    assert!(log.stats().failed_batches > 0);
    assert!(
        verify(&path).unwrap().is_ok(),
        "a failed write leaves no trace"
    );

    // Space returns.
    fs::remove_file(&ballast).unwrap();
    let r = log.append(event(999)).unwrap();
    assert_eq!(r.seq, last_ok + 1, "the chain continues without a gap");
    drop(log);
    let report = verify(&path).unwrap();
    assert!(report.is_ok(), "{:?}", report.problem);
    assert_eq!(report.last.unwrap().seq, last_ok + 1);
}
