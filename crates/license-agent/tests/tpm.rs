//! The agent's TPM module against a real TPM 2.0 (a private swtpm per test): sealing, the
//! primary-key check, tamper and cross-TPM refusal, the machine key (ECDSA, ECDH, secret
//! delivery), the TPM clock, and handle hygiene over many calls.
//!
//! swtpm must be installed; without it these tests fail (they do not skip).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod tpm_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use license_protocol::identity::MachineId;
use license_protocol::secret::{self, Secret, SecretDates};
use p256::ecdsa::signature::hazmat::PrehashVerifier as _;
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

use license_agent::platform::tpm::{self, Tpm, TpmError, MAX_SEAL_LEN, PRIMARY_NAME_FILE};
use tpm_support::Swtpm;

/// A test's directories: `tpm/` (swtpm state) and `agent/` (the agent's state_dir).
struct Fixture {
    dir: TempDir,
    agent: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        std::fs::create_dir(&agent).unwrap();
        Fixture { dir, agent }
    }
    fn tpm_state(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn agent(&self) -> &Path {
        &self.agent
    }
}

fn open(swtpm: &Swtpm, state_dir: &Path) -> Arc<Tpm> {
    Tpm::open(&swtpm.tcti(), state_dir).unwrap()
}

#[test]
fn seal_unseal_round_trip() {
    let fx = Fixture::new();
    let swtpm = Swtpm::start(&fx.tpm_state("tpm"));
    let tpm = open(&swtpm, fx.agent());
    assert!(
        fx.agent().join(PRIMARY_NAME_FILE).exists(),
        "primary Name recorded on first use"
    );

    for data in [
        vec![7u8],
        vec![0x5a; 32],
        (0..MAX_SEAL_LEN as u8).collect::<Vec<u8>>(),
    ] {
        let blob = tpm.seal(&data).unwrap();
        assert_eq!(tpm.unseal(&blob).unwrap().as_slice(), data.as_slice());
    }
    // The blob does not carry the data in clear.
    let blob = tpm.seal(&[0x5a; 32]).unwrap();
    assert!(!blob.windows(8).any(|w| w == [0x5a; 8]));
    assert!(matches!(tpm.seal(&[]), Err(TpmError::SealSize(0))));
    assert!(matches!(
        tpm.seal(&[0; MAX_SEAL_LEN + 1]),
        Err(TpmError::SealSize(_))
    ));
}

#[test]
fn restarted_tpm_with_same_state_unseals_and_primary_matches() {
    let fx = Fixture::new();
    let swtpm = Swtpm::start(&fx.tpm_state("tpm"));
    let tpm = open(&swtpm, fx.agent());
    let blob = tpm.seal(b"survives a reboot").unwrap();
    let key_blob = tpm.create_machine_key().unwrap();
    let public = tpm.machine_key(&key_blob).unwrap().public_key();
    let before = tpm.read_clock().unwrap();
    drop(tpm);
    swtpm.stop();

    let swtpm = Swtpm::start(&fx.tpm_state("tpm"));
    let tpm = open(&swtpm, fx.agent());
    assert_eq!(tpm.unseal(&blob).unwrap().as_slice(), b"survives a reboot");
    assert_eq!(tpm.machine_key(&key_blob).unwrap().public_key(), public);
    let after = tpm.read_clock().unwrap();
    assert!(
        after.reset_count > before.reset_count,
        "{before:?} then {after:?}"
    );
    // Without an orderly TPM2_Shutdown the clock may lose its last unsaved milliseconds; the
    // TPM then says so with `safe = NO`. It never goes back while claiming to be safe.
    assert!(
        after.clock_ms >= before.clock_ms || !after.safe,
        "{before:?} then {after:?}"
    );
}

#[test]
fn fresh_tpm_with_old_state_dir_is_primary_mismatch() {
    let fx = Fixture::new();
    let swtpm = Swtpm::start(&fx.tpm_state("tpm"));
    drop(open(&swtpm, fx.agent()));
    swtpm.stop();

    // A new TPM state = a cleared or replaced TPM: new owner seed, new primary.
    let cleared = Swtpm::start(&fx.tpm_state("tpm-cleared"));
    let err = Tpm::open(&cleared.tcti(), fx.agent()).unwrap_err();
    assert!(matches!(err, TpmError::PrimaryMismatch), "{err:?}");
    assert!(err.to_string().contains("cleared or replaced"));
}

#[test]
fn tampered_blobs_are_refused() {
    let fx = Fixture::new();
    let swtpm = Swtpm::start(&fx.tpm_state("tpm"));
    let tpm = open(&swtpm, fx.agent());
    let blob = tpm.seal(&[0x42; 32]).unwrap();
    // Layout: version, kind, TPM2B_PUBLIC (u16 size + area), TPM2B_PRIVATE (u16 size + area).
    let public_len = usize::from(u16::from_be_bytes([blob[2], blob[3]]));
    let private_start = 2 + 2 + public_len;
    assert_eq!(
        usize::from(u16::from_be_bytes([
            blob[private_start],
            blob[private_start + 1]
        ])),
        blob.len() - private_start - 2
    );

    let refused = |bad: &[u8], what: &str| {
        let err = tpm.unseal(bad).unwrap_err();
        assert!(
            matches!(err, TpmError::Tampered | TpmError::BadBlob),
            "{what}: {err:?}"
        );
        err
    };
    // Every byte of the private part (integrity HMAC, IV, encrypted sensitive area).
    for i in private_start + 2..blob.len() {
        let mut bad = blob.clone();
        bad[i] ^= 0x01;
        refused(&bad, &format!("private byte {i}"));
    }
    // The public part: the unique field (its last bytes) is bound by the private's integrity.
    let mut bad = blob.clone();
    bad[private_start - 1] ^= 0x80;
    assert!(matches!(refused(&bad, "public unique"), TpmError::Tampered));
    // Attributes (after type and nameAlg): refused before the TPM sees it.
    let mut bad = blob.clone();
    bad[4 + 4 + 3] ^= 0x40;
    refused(&bad, "public attributes");
    // Framing.
    assert!(matches!(
        tpm.unseal(&blob[..blob.len() - 1]),
        Err(TpmError::BadBlob)
    ));
    assert!(matches!(
        tpm.unseal(&[blob.as_slice(), &[0]].concat()),
        Err(TpmError::BadBlob)
    ));
    let mut bad = blob.clone();
    bad[0] = 2;
    assert!(matches!(tpm.unseal(&bad), Err(TpmError::BadBlob)));
    assert!(matches!(tpm.unseal(&[]), Err(TpmError::BadBlob)));
    // A machine key is not a sealed object, and the reverse.
    let key_blob = tpm.create_machine_key().unwrap();
    assert!(matches!(tpm.unseal(&key_blob), Err(TpmError::BadBlob)));
    assert!(matches!(tpm.machine_key(&blob), Err(TpmError::BadBlob)));
    // Still healthy (no handle leaked by the failures).
    assert_eq!(tpm.unseal(&blob).unwrap().as_slice(), &[0x42; 32]);
}

#[test]
fn blob_from_another_tpm_is_refused() {
    let fx = Fixture::new();
    let (a, b) = (
        Swtpm::start(&fx.tpm_state("a")),
        Swtpm::start(&fx.tpm_state("b")),
    );
    let dir_b = fx.dir.path().join("agent-b");
    std::fs::create_dir(&dir_b).unwrap();
    let (tpm_a, tpm_b) = (open(&a, fx.agent()), open(&b, &dir_b));
    assert_ne!(tpm_a.primary_name(), tpm_b.primary_name());

    let sealed = tpm_a.seal(b"machine A only").unwrap();
    let err = tpm_b.unseal(&sealed).unwrap_err();
    assert!(matches!(err, TpmError::Tampered), "{err:?}");
    let key = tpm_a.create_machine_key().unwrap();
    let err = tpm_b.machine_key(&key).unwrap_err();
    assert!(matches!(err, TpmError::Tampered), "{err:?}");
    assert_eq!(tpm_a.unseal(&sealed).unwrap().as_slice(), b"machine A only");
}

#[test]
fn machine_key_signature_verifies() {
    let fx = Fixture::new();
    let swtpm = Swtpm::start(&fx.tpm_state("tpm"));
    let tpm = open(&swtpm, fx.agent());
    let key = tpm.machine_key(&tpm.create_machine_key().unwrap()).unwrap();
    let verifying = p256::ecdsa::VerifyingKey::from(key.public_key());

    let digest: [u8; 32] = Sha256::digest(b"rotate-secret request").into();
    let sig = key.sign_digest(&digest).unwrap();
    verifying.verify_prehash(&digest, &sig).unwrap();
    let mut other = digest;
    other[0] ^= 1;
    assert!(verifying.verify_prehash(&other, &sig).is_err());
    // Two keys are different keys; Debug shows only the public key.
    let key2 = tpm.machine_key(&tpm.create_machine_key().unwrap()).unwrap();
    assert_ne!(key.public_key(), key2.public_key());
    assert!(format!("{key:?}").starts_with("TpmMachineKey { public_key: "));
}

#[test]
fn machine_key_ecdh_matches_software() {
    let fx = Fixture::new();
    let swtpm = Swtpm::start(&fx.tpm_state("tpm"));
    let tpm = open(&swtpm, fx.agent());
    let key = tpm.machine_key(&tpm.create_machine_key().unwrap()).unwrap();

    let soft = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let z_tpm = key.ecdh(&soft.public_key()).unwrap();
    let z_soft = p256::ecdh::diffie_hellman(soft.to_nonzero_scalar(), key.public_key().as_affine());
    assert_eq!(z_tpm.as_slice(), z_soft.raw_secret_bytes().as_slice());
}

#[test]
fn secret_delivery_opens_with_tpm_key() {
    let fx = Fixture::new();
    let swtpm = Swtpm::start(&fx.tpm_state("tpm"));
    let tpm = open(&swtpm, fx.agent());
    let key = tpm.machine_key(&tpm.create_machine_key().unwrap()).unwrap();

    let machine = MachineId::new_random();
    let dates = SecretDates {
        valid_from: 1_000,
        valid_until: 2_000,
        grace_until: 3_000,
    };
    let secret = Secret::generate();
    let sealed = secret::seal(&key.public_key(), &machine, 7, &dates, &secret);
    let opened = secret::open(&key, &machine, 7, &dates, &sealed).unwrap();
    assert_eq!(opened.expose(), secret.expose());
    // Sealed to another key: the TPM's ECDH gives another z, the AEAD refuses.
    let other = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let sealed = secret::seal(&other.public_key(), &machine, 7, &dates, &secret);
    assert!(secret::open(&key, &machine, 7, &dates, &sealed).is_err());
}

#[test]
fn read_clock_advances_within_one_boot() {
    let fx = Fixture::new();
    let swtpm = Swtpm::start(&fx.tpm_state("tpm"));
    let tpm = open(&swtpm, fx.agent());
    let first = tpm.read_clock().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let second = tpm.read_clock().unwrap();
    assert!(
        second.clock_ms > first.clock_ms,
        "{first:?} then {second:?}"
    );
    assert_eq!(second.reset_count, first.reset_count);
    assert_eq!(second.restart_count, first.restart_count);
}

#[test]
fn many_operations_flush_their_handles() {
    // swtpm has 3 transient object slots: one leaked handle per call would fail within a few.
    let fx = Fixture::new();
    let swtpm = Swtpm::start(&fx.tpm_state("tpm"));
    let tpm = open(&swtpm, fx.agent());
    let sealed = tpm.seal(&[1; 32]).unwrap();
    let key = tpm.machine_key(&tpm.create_machine_key().unwrap()).unwrap();
    let peer = p256::SecretKey::random(&mut rand::rngs::OsRng).public_key();
    for i in 0..40 {
        assert_eq!(
            tpm.unseal(&sealed).unwrap().as_slice(),
            &[1; 32],
            "unseal {i}"
        );
        key.sign_digest(&[i as u8; 32]).unwrap();
        key.ecdh(&peer).unwrap();
        let _ = tpm.unseal(&[0; 8]);
        tpm.read_clock().unwrap();
    }
    // And a second connection after the first closes finds the TPM as clean.
    drop(key);
    drop(tpm);
    let tpm = open(&swtpm, fx.agent());
    for _ in 0..10 {
        tpm.unseal(&sealed).unwrap();
    }
}

#[test]
fn shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tpm>();
    assert_send_sync::<tpm::TpmMachineKey>();

    let fx = Fixture::new();
    let swtpm = Swtpm::start(&fx.tpm_state("tpm"));
    let tpm = open(&swtpm, fx.agent());
    let key = Arc::new(tpm.machine_key(&tpm.create_machine_key().unwrap()).unwrap());
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let (tpm, key) = (Arc::clone(&tpm), Arc::clone(&key));
            std::thread::spawn(move || {
                for i in 0..5u8 {
                    let data = [t, i];
                    assert_eq!(
                        tpm.unseal(&tpm.seal(&data).unwrap()).unwrap().as_slice(),
                        &data
                    );
                    key.sign_digest(&[t; 32]).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn unreachable_tpm_is_unavailable() {
    let fx = Fixture::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = Tpm::open(&format!("swtpm:host=127.0.0.1,port={port}"), fx.agent()).unwrap_err();
    assert!(matches!(err, TpmError::Unavailable(_)), "{err:?}");
    let err = Tpm::open("no-such-tcti", fx.agent()).unwrap_err();
    assert!(matches!(err, TpmError::Unavailable(_)), "{err:?}");
    assert!(!fx.agent().join(PRIMARY_NAME_FILE).exists());
}

/// Not a benchmark, no assertion on time: prints what an unseal and a signature cost on swtpm
/// (`cargo test -p license-agent --test tpm -- --nocapture costs`).
#[test]
fn costs() {
    let fx = Fixture::new();
    let swtpm = Swtpm::start(&fx.tpm_state("tpm"));
    let started = Instant::now();
    let tpm = open(&swtpm, fx.agent());
    let open_cost = started.elapsed();
    let sealed = tpm.seal(&[9; 32]).unwrap();
    let key = tpm.machine_key(&tpm.create_machine_key().unwrap()).unwrap();
    let peer = p256::SecretKey::random(&mut rand::rngs::OsRng).public_key();
    const N: u32 = 50;
    let time = |f: &dyn Fn()| {
        f();
        let t = Instant::now();
        for _ in 0..N {
            f();
        }
        t.elapsed() / N
    };
    let unseal = time(&|| drop(tpm.unseal(&sealed).unwrap()));
    let sign = time(&|| {
        key.sign_digest(&[3; 32]).unwrap();
    });
    let ecdh = time(&|| drop(key.ecdh(&peer).unwrap()));
    let clock = time(&|| {
        tpm.read_clock().unwrap();
    });
    println!(
        "swtpm costs: open (primary) {open_cost:?}, unseal {unseal:?}, sign {sign:?}, \
         ecdh {ecdh:?}, read_clock {clock:?} (each incl. load + flush where needed)"
    );
}

/// Fills every free transient-object slot of `swtpm` the way a process killed mid-operation
/// does: tpm2-tools, on a TPM without a resource manager, leaves the primary it creates loaded.
fn fill_object_slots(swtpm: &Swtpm, scratch: &Path) -> usize {
    let mut filled = 0;
    loop {
        let out = std::process::Command::new("tpm2_createprimary")
            .args(["-T", &swtpm.tcti(), "-C", "o", "-c"])
            .arg(scratch.join(format!("leftover{filled}.ctx")))
            .output()
            .expect("tpm2_createprimary (Debian package tpm2-tools) must be installed");
        if !out.status.success() {
            return filled;
        }
        filled += 1;
        assert!(filled < 64, "swtpm never ran out of object slots");
    }
}

#[test]
fn leftover_objects_are_flushed_only_by_the_holder_of_the_tpm_lock() {
    let fx = Fixture::new();
    let swtpm = Swtpm::start(&fx.tpm_state("tpm"));
    let blob = open(&swtpm, fx.agent()).seal(b"leftovers").unwrap();

    // Nothing holds the lock: a one-shot open cleans up what a dead process left and works.
    assert!(fill_object_slots(&swtpm, fx.dir.path()) >= 2);
    let one_shot = open(&swtpm, fx.agent());
    assert_eq!(one_shot.unseal(&blob).unwrap().as_slice(), b"leftovers");

    // The daemon's open waits while a one-shot command holds the lock, then takes it.
    let (tcti, state) = (swtpm.tcti(), fx.agent().to_owned());
    let daemon = std::thread::spawn(move || Tpm::open_exclusive(&tcti, &state));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!daemon.is_finished(), "open_exclusive waits for the lock");
    drop(one_shot);
    let daemon = daemon.join().unwrap().unwrap();

    // While the daemon holds it, a one-shot command must not flush (the daemon's objects look
    // like leftovers): with the slots full it fails rather than pull them from under the daemon.
    fill_object_slots(&swtpm, fx.dir.path());
    let err = Tpm::open(&swtpm.tcti(), fx.agent()).unwrap_err();
    assert!(matches!(err, TpmError::Esys(_)), "{err}");
    // Once the daemon is gone the next open cleans up again.
    drop(daemon);
    assert_eq!(
        open(&swtpm, fx.agent()).unseal(&blob).unwrap().as_slice(),
        b"leftovers"
    );
}

/// When the TPM takes over the secrets the file store held, the file store keeps none: its
/// `secret.enc` would otherwise keep versions destroyed later readable with `secret.key`.
#[test]
fn the_tpm_taking_over_leaves_no_secret_in_the_file_store() {
    use license_agent::stores::fallback::FallbackStore;
    use license_agent::stores::file::FileStore;
    use license_agent::stores::tpm::TpmStore;
    use license_agent::stores::{SecretStore as _, StoredSecret};

    let fx = Fixture::new();
    let swtpm = Swtpm::start(&fx.tpm_state("tpm"));
    let machine = MachineId::new_random();
    let (enc, key) = (fx.agent().join("secret.enc"), fx.agent().join("secret.key"));
    let secrets = |versions: &[u64]| -> Vec<StoredSecret> {
        versions
            .iter()
            .map(|&version| StoredSecret {
                version,
                dates: SecretDates {
                    valid_from: 1,
                    valid_until: 2,
                    grace_until: 3,
                },
                secret: Secret::from_bytes([version as u8; 32]),
            })
            .collect()
    };
    // A till that ran on the file store (no TPM then).
    let file = FileStore::open(&enc, &key, 10_000, machine).unwrap();
    file.save(&secrets(&[1, 2])).unwrap();
    assert!(enc.exists());

    // Its next start finds a TPM: the secrets move into it, and secret.enc goes.
    let tpm = open(&swtpm, fx.agent());
    let store = FallbackStore::new(
        Some(TpmStore::new(
            tpm.clone(),
            &fx.agent().join("sealed.json"),
            machine,
        )),
        FileStore::open(&enc, &key, 10_000, machine).unwrap(),
    );
    let loaded = store.load().unwrap();
    assert_eq!(loaded.iter().map(|s| s.version).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(store.kind(), "tpm");
    assert!(
        !enc.exists(),
        "secret.enc left behind after the TPM took over"
    );
    // Version 1 destroyed later: nothing readable with secret.key holds it.
    store.save(&secrets(&[2])).unwrap();
    let leftover = FileStore::open(&enc, &key, 10_000, machine).unwrap();
    assert!(leftover.load().unwrap().is_empty());
    // And a later start (the TPM store exists) reads it from the TPM.
    let again = FallbackStore::new(
        Some(TpmStore::new(tpm, &fx.agent().join("sealed.json"), machine)),
        FileStore::open(&enc, &key, 10_000, machine).unwrap(),
    );
    assert_eq!(again.load().unwrap().len(), 1);
}
