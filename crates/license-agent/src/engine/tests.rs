//! The engine against a scripted server: rounds, rotation, degraded mode and healing, refused
//! answers, management control — real stores, state file and audit log in a temp dir, no
//! network.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use license_protocol::agent_api::{MachineLicenses, SecretStatus};
use license_protocol::identity::{ClientId, MachineId};
use license_protocol::mgmt::DegradedSwitch;
use license_protocol::rotation::{RotateSecretRequest, RotateSecretResponse};
use license_protocol::secret::{self, Secret, SecretDates};

use super::control::{self, ControlError};
use super::decide::Link;
use super::*;
use crate::net::client::ClientError;
use crate::platform::clock::GuardedClock;
use crate::platform::keys::FileMachineKey;
use crate::stores::file::FileStore;

/// What the scripted server does.
#[derive(Debug)]
struct Script {
    license: ed25519_dalek::SigningKey,
    machine: MachineId,
    machine_key: p256::PublicKey,
    reachable: AtomicBool,
    /// Answer every call with this refusal.
    refuse: AtomicBool,
    /// Sign rotate answers with another key (a server failing the pin).
    forge: AtomicBool,
    /// The newest acknowledged version; rotations offer the next.
    version: AtomicU64,
    acks: Mutex<Vec<u64>>,
}

impl Script {
    fn gate(&self) -> Result<(), ClientError> {
        if !self.reachable.load(Ordering::SeqCst) {
            return Err(ClientError::Transport("connection refused".into()));
        }
        if self.refuse.load(Ordering::SeqCst) {
            return Err(ClientError::Refused {
                status: 500,
                code: None,
                message: "scripted failure".into(),
            });
        }
        Ok(())
    }
}

impl AgentServer for Arc<Script> {
    async fn secret_status(&self) -> Result<SecretStatus, ClientError> {
        self.gate()?;
        let current = self.version.load(Ordering::SeqCst);
        Ok(serde_json::from_value(serde_json::json!({
            "client_id": ClientId::new_random().to_string(),
            "machine_id": self.machine.to_string(),
            "current_version": (current > 0).then_some(current),
            "state": "active",
            "certificate_expires_at": "2030-01-01T00:00:00Z",
        }))
        .expect("a status"))
    }

    async fn rotate_secret(
        &self,
        request: &RotateSecretRequest,
    ) -> Result<RotateSecretResponse, ClientError> {
        self.gate()?;
        // As the real server: the next version after the newest it issued.
        let version = request
            .current_secret_version
            .max(self.version.load(Ordering::SeqCst))
            + 1;
        let now = crate::platform::clock::system_now();
        let dates = SecretDates {
            valid_from: now,
            valid_until: now + 3_600,
            grace_until: now + 7_200,
        };
        let blob = secret::seal(
            &self.machine_key,
            &self.machine,
            version,
            &dates,
            &Secret::generate(),
        );
        let signer = if self.forge.load(Ordering::SeqCst) {
            ed25519_dalek::SigningKey::from_bytes(&[9; 32])
        } else {
            self.license.clone()
        };
        Ok(RotateSecretResponse::new_signed(
            &signer,
            &self.machine,
            version,
            dates,
            &blob,
        ))
    }

    async fn ack_secret(&self, version: u64) -> Result<(), ClientError> {
        self.gate()?;
        self.version.store(version, Ordering::SeqCst);
        self.acks.lock().expect("acks").push(version);
        Ok(())
    }

    async fn licenses(&self) -> Result<MachineLicenses, ClientError> {
        self.gate()?;
        Ok(MachineLicenses {
            secret_version: Some(self.version.load(Ordering::SeqCst)),
            tokens: Vec::new(),
            revoked: Vec::new(),
        })
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    script: Arc<Script>,
    engine: Engine<Arc<Script>>,
}

fn fixture(policy: DegradedPolicy) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let machine = MachineId::new_random();
    let key = FileMachineKey::generate();
    let license = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let script = Arc::new(Script {
        license: license.clone(),
        machine,
        machine_key: key.public_key(),
        reachable: AtomicBool::new(true),
        refuse: AtomicBool::new(false),
        forge: AtomicBool::new(false),
        version: AtomicU64::new(0),
        acks: Mutex::default(),
    });
    let audit = Audit::open(&dir.path().join("audit.log")).expect("audit log");
    let alerts = Alerts::new(audit, machine.to_string(), None, 0);
    let store = FileStore::open(
        &dir.path().join("secret.enc"),
        &dir.path().join("secret.key"),
        1_000,
        machine,
    )
    .expect("file store");
    let (clock, _) = GuardedClock::new(0);
    let validator = Arc::new(Validator::new(
        machine,
        license.verifying_key(),
        Arc::new(clock),
        600,
        policy,
    ));
    let engine = Engine::new(EngineParts {
        server: script.clone(),
        machine: Machine {
            id: machine,
            client_id: ClientId::new_random(),
            key: Arc::new(key),
            license_key: license.verifying_key(),
        },
        vault: Vault {
            store: Arc::new(store),
            state_file: StateFile::new(dir.path()),
            state: AgentState::default(),
        },
        validator,
        settings: EngineSettings {
            rotation_interval: 3_600,
            poll_interval: 60,
            degraded_policy: policy,
            metrics_file: dir.path().join("metrics.prom"),
            tokens_dir: dir.path().join("tokens"),
        },
        tpm: None,
        alerts,
    });
    Fixture {
        dir,
        script,
        engine,
    }
}

fn newest(f: &Fixture) -> Option<u64> {
    f.engine.validator.keyring().newest().map(|(v, _)| v)
}

fn audit_text(f: &Fixture) -> String {
    std::fs::read_to_string(f.dir.path().join("audit.log")).expect("audit log")
}

#[tokio::test]
async fn a_first_round_rotates_stores_acknowledges_and_schedules() {
    let mut f = fixture(DegradedPolicy::Allow);
    let wait = f.engine.tick().await;
    assert_eq!(wait, Duration::from_secs(60));
    assert_eq!(newest(&f), Some(1));
    assert_eq!(*f.script.acks.lock().expect("acks"), [1]);
    // Durable: the store and state.json hold it.
    let stored = f.engine.vault.store.load().expect("store");
    assert_eq!(stored.iter().map(|s| s.version).collect::<Vec<_>>(), [1]);
    let (state, _) = StateFile::new(f.dir.path()).load();
    assert_eq!(state.secrets.len(), 1);
    let now = f.engine.validator.clock.now();
    let due = state.next_rotation_due.expect("scheduled");
    assert!(
        (now + 3_240 - 5..=now + 3_960).contains(&due),
        "{due} vs {now}"
    );
    // Not due yet: the next round only polls.
    f.engine.tick().await;
    assert_eq!(newest(&f), Some(1));
    assert!(audit_text(&f).contains("secret.rotate"));
}

#[tokio::test]
async fn unreachable_and_overdue_is_degraded_mode_and_the_engine_heals() {
    let mut f = fixture(DegradedPolicy::Allow);
    f.engine.tick().await;
    f.script.reachable.store(false, Ordering::SeqCst);
    // Reachable or not, nothing is overdue yet: still online.
    let wait = f.engine.tick().await;
    assert_eq!(wait, Duration::from_secs(2), "backoff after one failure");
    assert_eq!(f.engine.link(), Link::Online);
    f.engine.vault.state.next_rotation_due = Some(0);
    let wait = f.engine.tick().await;
    assert_eq!(wait, Duration::from_secs(4));
    assert!(matches!(f.engine.link(), Link::Degraded { .. }));
    assert!(f.engine.validator.is_degraded());
    assert!(f.engine.status_line().ends_with("; degraded"));
    let (state, _) = StateFile::new(f.dir.path()).load();
    assert!(state.degraded_since.is_some(), "persisted");
    f.engine.tick().await;
    assert!(
        audit_text(&f).contains("alert.rotation_failed"),
        "third failure in a row"
    );

    f.script.reachable.store(true, Ordering::SeqCst);
    assert_eq!(f.engine.tick().await, Duration::from_secs(60));
    assert_eq!(f.engine.link(), Link::Online);
    assert!(!f.engine.validator.is_degraded());
    assert_eq!(newest(&f), Some(2), "the overdue rotation happened");
    assert_eq!(f.engine.vault.state.consecutive_failures, 0);
}

#[tokio::test]
async fn a_server_answering_wrong_is_a_failure_not_degraded_mode() {
    let mut f = fixture(DegradedPolicy::Allow);
    f.engine.tick().await;
    f.engine.vault.state.next_rotation_due = Some(0);
    f.script.refuse.store(true, Ordering::SeqCst);
    f.engine.tick().await;
    assert_eq!(f.engine.link(), Link::Online);
    assert!(!f.engine.validator.is_degraded());
    assert_eq!(f.engine.vault.state.consecutive_failures, 1);
}

#[tokio::test]
async fn a_forged_rotation_answer_keeps_the_secrets_held() {
    let mut f = fixture(DegradedPolicy::Allow);
    f.engine.tick().await;
    f.script.forge.store(true, Ordering::SeqCst);
    let error = f.engine.rotate().await.expect_err("forged");
    assert!(
        matches!(error, RotationError::ServerSignature(_)),
        "{error}"
    );
    assert_eq!(newest(&f), Some(1));
    assert_eq!(*f.script.acks.lock().expect("acks"), [1]);
}

#[tokio::test]
async fn management_controls_go_through_the_engine() {
    let mut f = fixture(DegradedPolicy::Deny);
    f.engine.tick().await;
    let (handle, mut rx) = control::channel();

    let ask = tokio::spawn(async move {
        let refused = handle.degraded(DegradedSwitch::On).await;
        let off = handle.degraded(DegradedSwitch::Off).await;
        let invalidated = handle.invalidate(1).await;
        let status = handle.status().await;
        (refused, off, invalidated, status)
    });
    for _ in 0..4 {
        let request = rx.recv().await.expect("a request");
        f.engine.control(request).await;
    }
    let (refused, off, invalidated, status) = ask.await.expect("asked");
    assert!(matches!(refused, Err(ControlError::Refused(_))));
    assert_eq!(off.expect("off").split(':').next(), Some("forbidden"));
    invalidated.expect("invalidated");
    let status = status.expect("status");
    assert_eq!(status.invalidated_versions, [1]);
    assert!(
        status.secrets.is_empty(),
        "the invalidated secret is destroyed"
    );
    assert_eq!(status.degraded_policy, "deny");
    // Losing the newest secret makes the next round rotate.
    f.engine.tick().await;
    assert_eq!(newest(&f), Some(2));
}
