//! A secret's bytes are locked in RAM while it lives and unlocked when it goes, seen from the
//! kernel's side (`VmLck` in /proc/self/status). Its own test binary: no other test of this
//! process creates secrets meanwhile.
#![allow(clippy::unwrap_used)]

use license_protocol::secret::Secret;

/// Locked memory of this process, in kB.
fn locked_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmLck:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn secrets_are_locked_while_they_live_and_clones_share_the_lock() {
    let before = locked_kb();
    let a = Secret::generate();
    let b = Secret::from_bytes([7; 32]);
    assert!(a.is_locked() && b.is_locked(), "mlock refused here");
    assert_eq!(locked_kb(), before + 8, "one page each");

    let shared = a.clone();
    assert_eq!(locked_kb(), before + 8, "a clone shares its page");
    assert_eq!(shared.expose(), a.expose());
    assert_eq!(b.expose(), &[7; 32]);

    drop(a);
    assert_eq!(locked_kb(), before + 8, "still held by the clone");
    drop(shared);
    drop(b);
    assert_eq!(locked_kb(), before);
}
