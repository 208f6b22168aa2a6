//! The engine against a scripted server: rounds, rotation, degraded mode and healing, refused
//! answers, management control — real stores, state file and audit log in a temp dir, no
//! network.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use license_protocol::agent_api::{
    HealthReport, MachineLicenses, RenewCertificateResponse, SecretStatus, StatusQuery,
};
use license_protocol::identity::{ClientId, MachineId, MachineIdentity};
use license_protocol::ipc::{Reason, Response};
use license_protocol::license_keys::{AnnouncedKey, KeyId, KeyState, LicenseKeySet, TrustedKeys};
use license_protocol::mgmt::DegradedSwitch;
use license_protocol::release::{UpdateOffer, UpdateReport};
use license_protocol::rotation::{RotateSecretRequest, RotateSecretResponse};
use license_protocol::secret::{self, Secret, SecretDates};
use license_protocol::server_trust::{AgentTrust, ServerTrust};

use super::control::{self, ControlError};
use super::decide::Link;
use super::renewal::{Certificate, IdentityFiles};
use super::*;
use crate::net::client::ClientError;
use crate::platform::clock::{rfc3339, GuardedClock};
use crate::platform::keys::FileMachineKey;
use crate::stores::file::FileStore;

/// A CA the scripted server signs machine certificates with.
struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca")
    }
}

impl Ca {
    fn new() -> Self {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("CA");
        Self { cert, key }
    }

    /// A certificate for the key in `csr`, CN `identity`, valid `[from, until]` (Unix seconds).
    fn issue(&self, csr: &str, identity: &MachineIdentity, from: i64, until: i64) -> String {
        let mut request = rcgen::CertificateSigningRequestParams::from_pem(csr).expect("a CSR");
        let time = |t| time::OffsetDateTime::from_unix_timestamp(t).expect("a time");
        request.params.not_before = time(from);
        request.params.not_after = time(until);
        request
            .params
            .distinguished_name
            .push(rcgen::DnType::CommonName, identity.to_string());
        request
            .signed_by(&self.cert, &self.key)
            .expect("signed")
            .pem()
    }
}

/// What the scripted server does.
#[derive(Debug)]
struct Script {
    /// The license key it signs rotate answers with (the current one).
    license: Mutex<ed25519_dalek::SigningKey>,
    /// The license key set it announces (none: an older server).
    key_set: Mutex<Option<LicenseKeySet>>,
    /// `GET /api/v1/license-keys` calls.
    key_set_fetches: AtomicU64,
    /// `GET /api/v1/licenses` calls, and the tokens they answer.
    license_fetches: AtomicU64,
    tokens: Mutex<Vec<license_protocol::agent_api::LicenseToken>>,
    /// The secret status leaves the key set out (a server that took a new key up after it
    /// answered the status and before the tokens).
    status_lags: AtomicBool,
    /// The server trust it announces (none: an older server), its fetches, and the trusts the
    /// engine adopted.
    trust: Mutex<Option<ServerTrust>>,
    trust_fetches: AtomicU64,
    adopted: Mutex<Vec<AgentTrust>>,
    machine: MachineId,
    /// The key of the certificate presented: secrets are sealed to it.
    machine_key: Mutex<p256::PublicKey>,
    reachable: AtomicBool,
    /// Answer every call with this refusal.
    refuse: AtomicBool,
    /// Sign rotate answers with another key (a server failing the pin).
    forge: AtomicBool,
    /// The newest acknowledged version; rotations offer the next.
    version: AtomicU64,
    acks: Mutex<Vec<u64>>,
    ca: Ca,
    identity: MachineIdentity,
    /// Life of the certificates it issues, seconds.
    certificate_life: i64,
    /// The CSRs it was sent, in order.
    csrs: Mutex<Vec<String>>,
    reconnects: AtomicU64,
    /// The server's clock, as an offset from this machine's (seconds).
    clock_offset: std::sync::atomic::AtomicI64,
    /// The health reports it received, in order.
    health_reports: Mutex<Vec<HealthReport>>,
    /// The release it offers to a query naming a version, the bytes it serves for it, the
    /// downloads asked and the update reports received.
    offer: Mutex<Option<UpdateOffer>>,
    binary: Mutex<Vec<u8>>,
    downloads: AtomicU64,
    update_reports: Mutex<Vec<UpdateReport>>,
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
    async fn secret_status(&self, query: &StatusQuery) -> Result<SecretStatus, ClientError> {
        self.gate()?;
        let current = self.version.load(Ordering::SeqCst);
        let offer = query
            .agent_version
            .and(self.offer.lock().expect("offer").clone());
        Ok(serde_json::from_value(serde_json::json!({
            "update": offer,
            "client_id": ClientId::new_random().to_string(),
            "machine_id": self.machine.to_string(),
            "current_version": (current > 0).then_some(current),
            "state": "active",
            "certificate_expires_at": "2030-01-01T00:00:00Z",
            "server_time": crate::platform::clock::system_now()
                + self.clock_offset.load(Ordering::SeqCst),
            "license_keys": self.key_set.lock().expect("set").as_ref()
                .filter(|_| !self.status_lags.load(Ordering::SeqCst))
                .map(LicenseKeySet::digest),
            "server_trust": self.trust.lock().expect("trust").as_ref().map(ServerTrust::digest),
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
        let recipient = *self.machine_key.lock().expect("key");
        let blob = secret::seal(
            &recipient,
            &self.machine,
            version,
            &dates,
            &Secret::generate(),
        );
        let signer = if self.forge.load(Ordering::SeqCst) {
            ed25519_dalek::SigningKey::from_bytes(&[9; 32])
        } else {
            self.license.lock().expect("key").clone()
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
        self.license_fetches.fetch_add(1, Ordering::SeqCst);
        Ok(MachineLicenses {
            secret_version: Some(self.version.load(Ordering::SeqCst)),
            tokens: self.tokens.lock().expect("tokens").clone(),
            revoked: Vec::new(),
        })
    }

    async fn report_health(&self, report: &HealthReport) -> Result<(), ClientError> {
        self.gate()?;
        self.health_reports
            .lock()
            .expect("reports")
            .push(report.clone());
        Ok(())
    }

    async fn license_keys(&self) -> Result<LicenseKeySet, ClientError> {
        self.gate()?;
        self.key_set_fetches.fetch_add(1, Ordering::SeqCst);
        self.key_set
            .lock()
            .expect("set")
            .clone()
            .ok_or_else(|| ClientError::Refused {
                status: 404,
                code: None,
                message: "no such route".into(),
            })
    }

    async fn renew_certificate(
        &self,
        csr: String,
    ) -> Result<RenewCertificateResponse, ClientError> {
        self.gate()?;
        self.csrs.lock().expect("csrs").push(csr.clone());
        let now = crate::platform::clock::system_now();
        let certificate = self
            .ca
            .issue(&csr, &self.identity, now - 1, now + self.certificate_life);
        Ok(RenewCertificateResponse {
            certificate,
            serial: "renewed".into(),
            expires_at: String::new(),
        })
    }

    async fn server_trust(&self) -> Result<ServerTrust, ClientError> {
        self.gate()?;
        self.trust_fetches.fetch_add(1, Ordering::SeqCst);
        self.trust
            .lock()
            .expect("trust")
            .clone()
            .ok_or_else(|| ClientError::Refused {
                status: 404,
                code: None,
                message: "no such route".into(),
            })
    }

    fn adopt_trust(
        &self,
        trust: AgentTrust,
        _key: Arc<dyn MachineKey>,
    ) -> Result<(), crate::net::ConnectError> {
        self.adopted.lock().expect("adopted").push(trust);
        Ok(())
    }

    fn reconnect(&self, key: Arc<dyn MachineKey>) -> Result<(), crate::net::ConnectError> {
        *self.machine_key.lock().expect("key") = key.public_key();
        self.reconnects.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn download_release(
        &self,
        _release_id: uuid::Uuid,
        dest: &std::path::Path,
        max: u64,
    ) -> Result<(u64, String), ClientError> {
        use sha2::Digest as _;
        self.gate()?;
        self.downloads.fetch_add(1, Ordering::SeqCst);
        let bytes = self.binary.lock().expect("binary").clone();
        if bytes.len() as u64 > max {
            return Err(ClientError::Oversized(max));
        }
        std::fs::write(dest, &bytes).expect("download written");
        Ok((
            bytes.len() as u64,
            license_protocol::release::hex(&sha2::Sha256::digest(&bytes)),
        ))
    }

    async fn report_update(&self, report: &UpdateReport) -> Result<(), ClientError> {
        self.gate()?;
        self.update_reports
            .lock()
            .expect("reports")
            .push(report.clone());
        Ok(())
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    script: Arc<Script>,
    engine: Engine<Arc<Script>>,
}

fn fixture(policy: DegradedPolicy) -> Fixture {
    let now = crate::platform::clock::system_now();
    // A year-long certificate issued an hour ago: renewal is months away.
    fixture_with(policy, now - 3_600, now + 365 * 86_400)
}

/// A fixture whose machine certificate is valid over `[from, until]`.
fn fixture_with(policy: DegradedPolicy, from: i64, until: i64) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let machine = MachineId::new_random();
    let client_id = ClientId::new_random();
    let identity = MachineIdentity {
        client_id,
        machine_id: machine,
    };
    let key = FileMachineKey::generate();
    let license = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let ca = Ca::new();
    let files = IdentityFiles {
        cert: dir.path().join("client.pem"),
        key: dir.path().join("client.key"),
    };
    std::fs::write(&files.key, key.to_pem().as_bytes()).expect("key");
    let key: Arc<dyn MachineKey> = Arc::new(key);
    let csr = crate::platform::keys::csr_pem(key.clone()).expect("CSR");
    std::fs::write(&files.cert, ca.issue(&csr, &identity, from, until)).expect("cert");
    let certificate = Certificate::read(&files.cert).expect("cert");
    let script = Arc::new(Script {
        license: Mutex::new(license.clone()),
        key_set: Mutex::default(),
        key_set_fetches: AtomicU64::new(0),
        license_fetches: AtomicU64::new(0),
        tokens: Mutex::default(),
        status_lags: AtomicBool::new(false),
        trust: Mutex::default(),
        trust_fetches: AtomicU64::new(0),
        adopted: Mutex::default(),
        machine,
        machine_key: Mutex::new(key.public_key()),
        reachable: AtomicBool::new(true),
        refuse: AtomicBool::new(false),
        forge: AtomicBool::new(false),
        version: AtomicU64::new(0),
        acks: Mutex::default(),
        ca,
        identity,
        certificate_life: 3_600,
        csrs: Mutex::default(),
        reconnects: AtomicU64::new(0),
        health_reports: Mutex::new(Vec::new()),
        clock_offset: std::sync::atomic::AtomicI64::new(0),
        offer: Mutex::default(),
        binary: Mutex::default(),
        downloads: AtomicU64::new(0),
        update_reports: Mutex::default(),
    });
    let ca_pem = script.ca.cert.pem();
    let pin = license_protocol::pin::CertPin::of_spki_der(b"the server's key");
    let audit = Audit::open(&dir.path().join("audit.log")).expect("audit log");
    let alerts = Alerts::new(audit, machine.to_string(), None, 0);
    let store = FileStore::open(
        &dir.path().join("secret.enc"),
        &dir.path().join("secret.key"),
        10_000,
        machine,
    )
    .expect("file store");
    let (clock, _) = GuardedClock::new(0);
    let validator = Arc::new(Validator::new(
        machine,
        TrustedKeys::pinned(license.verifying_key()),
        Arc::new(clock),
        600,
        policy,
    ));
    let engine = Engine::new(EngineParts {
        server: script.clone(),
        machine: Machine {
            id: machine,
            client_id,
            key,
            license_keys: TrustedKeys::pinned(license.verifying_key()),
            certificate,
            server_trust: AgentTrust::enrolled(pin, &ca_pem).expect("CA"),
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
            watch_poll_interval: 900,
            degraded_policy: policy,
            revoked_policy: crate::config::RevokedPolicy::Deny,
            metrics_file: dir.path().join("metrics.prom"),
            tokens_dir: dir.path().join("tokens"),
            license_keys_file: super::license_keys::TrustFile::new(dir.path()),
            server_trust_file: crate::net::trust::TrustFile::new(
                dir.path(),
                pin,
                &dir.path().join("ca.pem"),
            ),
            identity: files,
            tpm_configured: false,
            update: super::update::UpdateSettings {
                enabled: true,
                channel: "stable".parse().expect("channel"),
                staging: crate::update::Staging::new(dir.path().join("updates")),
                trust_file: dir.path().join("release-keys.json"),
            },
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
async fn while_the_stream_is_held_licenses_are_fetched_only_when_they_may_have_changed() {
    let mut f = fixture(DegradedPolicy::Allow);
    let fetched = |f: &Fixture| f.script.license_fetches.load(Ordering::SeqCst);
    // A round the stream did not ask for, `watch_poll_interval` after the last one.
    let quiet_round = |f: &mut Fixture| f.engine.health.last_server_round = None;
    // Polling: every round fetches.
    f.engine.tick().await;
    f.engine.tick().await;
    assert_eq!(fetched(&f), 2);
    // The stream held: the first round after it opened fetches, a quiet one does not.
    f.engine.set_watching(true);
    quiet_round(&mut f);
    f.engine.tick().await;
    assert_eq!(fetched(&f), 3);
    quiet_round(&mut f);
    f.engine.tick().await;
    assert_eq!(fetched(&f), 3, "a quiet round fetches nothing");
    // A change pushed: fetched.
    f.engine.request_round();
    f.engine.tick().await;
    assert_eq!(fetched(&f), 4);
    // Asked while the server cannot be reached: still asked once it can.
    f.script.reachable.store(false, Ordering::SeqCst);
    f.engine.request_round();
    f.engine.tick().await;
    f.script.reachable.store(true, Ordering::SeqCst);
    f.engine.tick().await;
    assert_eq!(fetched(&f), 5);
    // A rotation: the tokens follow the newest version.
    f.engine.vault.state.next_rotation_due = Some(f.engine.validator.clock.now());
    f.engine.tick().await;
    assert_eq!(newest(&f), Some(2));
    assert_eq!(fetched(&f), 6);
    // A tick soon after a round talks to no one.
    f.engine.tick().await;
    assert_eq!(fetched(&f), 6);
    // The stream lost and opened again before the next tick: what was pushed meanwhile is
    // unknown (and a restarted server may serve keys the cursor does not replay), so that
    // tick is a round with the server, and fetches.
    f.engine.stream_lost();
    f.engine.set_watching(true);
    f.engine.tick().await;
    assert_eq!(fetched(&f), 7);
}

#[tokio::test]
async fn unreachable_and_overdue_is_degraded_mode_and_the_engine_heals() {
    let mut f = fixture(DegradedPolicy::Allow);
    f.engine.tick().await;
    f.script.reachable.store(false, Ordering::SeqCst);
    // Reachable or not, nothing is overdue yet: still online.
    let wait = f.engine.tick().await;
    // Backoff after one failure: 2 s, drawn between half of it and all of it (at least 1 s).
    assert!(
        (Duration::from_secs(1)..=Duration::from_secs(2)).contains(&wait),
        "backoff after one failure: {wait:?}"
    );
    assert_eq!(f.engine.link(), Link::Online);
    f.engine.vault.state.next_rotation_due = Some(0);
    let wait = f.engine.tick().await;
    assert!(
        (Duration::from_secs(2)..=Duration::from_secs(4)).contains(&wait),
        "backoff after two failures: {wait:?}"
    );
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

fn current_spki(f: &Fixture) -> Vec<u8> {
    Certificate::read(&f.engine.settings.identity.cert)
        .expect("cert")
        .spki
}

#[tokio::test]
async fn the_certificate_renews_at_two_thirds_with_a_fresh_key() {
    let now = crate::platform::clock::system_now();
    // Two thirds of a 300 s life is behind us: due.
    let mut f = fixture_with(DegradedPolicy::Allow, now - 250, now + 50);
    let old_key = std::fs::read(&f.engine.settings.identity.key).expect("key");
    let old = f.engine.machine.certificate.clone();
    f.engine.tick().await;
    assert_eq!(f.script.csrs.lock().expect("csrs").len(), 1);
    assert_eq!(f.script.reconnects.load(Ordering::SeqCst), 1);
    let renewed = &f.engine.machine.certificate;
    assert!(renewed.not_after > old.not_after && renewed.spki != old.spki);
    assert_eq!(current_spki(&f), renewed.spki, "on disk");
    assert_ne!(
        std::fs::read(&f.engine.settings.identity.key).expect("key"),
        old_key,
        "file-store machines get a fresh key"
    );
    assert!(!f.engine.settings.identity.pending());
    assert!(audit_text(&f).contains("certificate.renew"));
    let status = f.engine.status_view();
    let view = status.certificate.expect("certificate in status");
    assert_eq!(view.expires_at, rfc3339(renewed.not_after));
    let metrics = std::fs::read_to_string(f.dir.path().join("metrics.prom")).expect("metrics");
    assert!(
        metrics.contains("license_agent_certificate_expiry_seconds 3"),
        "{metrics}"
    );
    // Not due again for a long while.
    f.engine.tick().await;
    assert_eq!(f.script.csrs.lock().expect("csrs").len(), 1);
}

#[tokio::test]
async fn an_interrupted_renewal_retries_with_the_same_key() {
    let now = crate::platform::clock::system_now();
    let mut f = fixture_with(DegradedPolicy::Allow, now - 250, now + 50);
    f.script.reachable.store(false, Ordering::SeqCst);
    f.engine.tick().await;
    // The next key was written before asking; the old identity still stands.
    assert!(f.engine.settings.identity.pending());
    let pending = std::fs::read_to_string(f.engine.settings.identity.next_key()).expect("next");
    assert_eq!(f.engine.machine.certificate.not_after, now + 50);
    assert!(audit_text(&f).contains("certificate.renew"));

    f.script.reachable.store(true, Ordering::SeqCst);
    f.engine.tick().await;
    assert!(!f.engine.settings.identity.pending());
    assert_eq!(
        std::fs::read_to_string(&f.engine.settings.identity.key).expect("key"),
        pending,
        "the key made before the failure is the one renewed"
    );
    assert_eq!(current_spki(&f), f.engine.machine.certificate.spki);
}

#[tokio::test]
async fn an_expired_certificate_is_renewed_with_and_a_failure_alerted_once() {
    let now = crate::platform::clock::system_now();
    // A till switched off past its certificate's expiry.
    let mut f = fixture_with(DegradedPolicy::Allow, now - 1_000, now - 100);
    f.script.refuse.store(true, Ordering::SeqCst);
    f.engine.tick().await;
    f.engine.tick().await;
    let alerts = audit_text(&f).matches("alert.certificate_expired").count();
    assert_eq!(alerts, 1, "alerted once while it keeps failing");
    assert!(audit_text(&f).contains("expired on "));
    f.script.refuse.store(false, Ordering::SeqCst);
    f.engine.tick().await;
    assert!(f.engine.machine.certificate.not_after > now);
    assert_eq!(
        newest(&f),
        Some(1),
        "and the round goes on with the new identity"
    );
}

#[tokio::test]
async fn a_clock_jumped_forward_destroys_no_secret_until_the_server_agrees() {
    let mut f = fixture(DegradedPolicy::Allow);
    let now = crate::platform::clock::system_now();
    // The server's clock is a day behind this one (this one jumped forward).
    f.script.clock_offset.store(-86_400, Ordering::SeqCst);
    f.engine.tick().await;
    // A version this clock says is past its grace.
    let mut ring = f.engine.validator.keyring();
    let dates = SecretDates {
        valid_from: now - 1_000,
        valid_until: now - 500,
        grace_until: now - 10,
    };
    ring.insert(0, dates, Secret::generate());
    f.engine.commit_keyring(ring).await.expect("stored");
    f.engine.tick().await;
    f.engine.tick().await;
    let held = |f: &Fixture| f.engine.validator.keyring().get(0).is_some();
    assert!(held(&f), "destroyed by an unattested clock");
    assert!(!audit_text(&f).contains("secret.destroyed"));
    // The server's time passes its grace: now it goes.
    f.script.clock_offset.store(0, Ordering::SeqCst);
    f.engine.tick().await;
    f.engine.tick().await;
    assert!(!held(&f));
    assert!(audit_text(&f).contains("secret.destroyed"));
    assert!(f.engine.validator.keyring().retired(0));
}

#[tokio::test]
async fn the_server_s_time_raises_the_floor_of_now() {
    let mut f = fixture(DegradedPolicy::Allow);
    f.script.clock_offset.store(3_600, Ordering::SeqCst);
    f.engine.tick().await;
    let now = crate::platform::clock::system_now();
    assert!(
        f.engine.validator.clock.now() >= now + 3_590,
        "a clock set back is caught up"
    );
    let (state, _) = StateFile::new(f.dir.path()).load();
    assert!(state.server_time.expect("persisted") >= now + 3_590);
}

/// A token for this machine under its newest secret, signed by `key`.
fn mint(f: &Fixture, key: &ed25519_dalek::SigningKey) -> String {
    let keyring = f.engine.validator.keyring();
    let (version, _) = keyring.newest().expect("a secret");
    let (_, secret) = keyring.get(version).expect("held");
    let claims = license_protocol::token::LicenseClaims {
        license_id: uuid::Uuid::new_v4(),
        client_id: ClientId::new_random(),
        machine_id: f.script.machine,
        features: vec!["pos.sale".into()],
        metadata: Default::default(),
        issued_at: 0,
        not_before: 0,
        expires_at: None,
    };
    license_protocol::token::seal(&claims, secret, version, key)
}

fn verdict_on(f: &Fixture, token: &str) -> Option<Reason> {
    match f
        .engine
        .validator
        .validate(token, license_protocol::rotation::Nonce::random())
    {
        Response::Valid(_) => None,
        Response::Invalid(i) => Some(i.reason),
    }
}

/// The scripted server's key set: `keys` with their states, signed by `signers`; `current`
/// signs rotate answers from now on.
fn announce(
    f: &Fixture,
    keys: &[(&ed25519_dalek::SigningKey, KeyState)],
    issued_at: i64,
    signers: &[&ed25519_dalek::SigningKey],
    current: &ed25519_dalek::SigningKey,
) {
    let announced = keys
        .iter()
        .map(|(k, state)| AnnouncedKey::new(&k.verifying_key(), *state, 0))
        .collect();
    *f.script.key_set.lock().expect("set") =
        Some(LicenseKeySet::sign(announced, issued_at, signers));
    *f.script.license.lock().expect("key") = current.clone();
}

fn fetches(f: &Fixture) -> u64 {
    f.script.key_set_fetches.load(Ordering::SeqCst)
}

#[tokio::test]
async fn a_license_key_rollover_is_learned_once_and_a_retirement_refuses_old_tokens() {
    let mut f = fixture(DegradedPolicy::Allow);
    let old = f.script.license.lock().expect("key").clone();
    let new = ed25519_dalek::SigningKey::from_bytes(&[6; 32]);
    // An older server announces no set: nothing is fetched.
    f.engine.tick().await;
    assert_eq!(fetches(&f), 0);
    let old_token = mint(&f, &old);
    let new_token = mint(&f, &new);
    assert_eq!(verdict_on(&f, &old_token), None);
    assert_eq!(
        verdict_on(&f, &new_token),
        Some(Reason::BadSignature),
        "a key not heard of yet"
    );

    // Rollover: the new key is current, the old one previous.
    announce(
        &f,
        &[(&old, KeyState::Previous), (&new, KeyState::Current)],
        100,
        &[&old, &new],
        &new,
    );
    f.engine.tick().await;
    assert_eq!(fetches(&f), 1);
    assert_eq!(verdict_on(&f, &new_token), None);
    assert_eq!(
        verdict_on(&f, &old_token),
        None,
        "previous keys keep validating"
    );
    let file = f.dir.path().join("license-keys.json");
    assert!(file.exists());
    // The digest is unchanged: no further fetch, round after round.
    f.engine.tick().await;
    f.engine.tick().await;
    assert_eq!(fetches(&f), 1);
    // Rotate answers are now signed by the new key, and accepted.
    let before = newest(&f).expect("a version");
    f.engine.rotate().await.expect("rotation under the new key");
    assert_eq!(newest(&f), Some(before + 1));

    // Retirement of the old key: its tokens answer key_retired, even cached ones.
    let old_token = mint(&f, &old);
    let new_token = mint(&f, &new);
    assert_eq!(verdict_on(&f, &old_token), None);
    announce(
        &f,
        &[(&old, KeyState::Retired), (&new, KeyState::Current)],
        200,
        &[&new],
        &new,
    );
    f.engine.tick().await;
    assert_eq!(fetches(&f), 2);
    assert_eq!(verdict_on(&f, &old_token), Some(Reason::KeyRetired));
    assert_eq!(verdict_on(&f, &new_token), None);
    let audit = audit_text(&f);
    assert!(
        audit.contains("license.keys") && audit.contains("retired"),
        "{audit}"
    );

    // After a restart, from the pin (the old key) and the file: still retired.
    let trusted = super::license_keys::TrustFile::new(f.dir.path())
        .load(old.verifying_key())
        .expect("file");
    assert_eq!(
        trusted.for_token(Some(KeyId::of(&old.verifying_key()))),
        Err(license_protocol::token::TokenError::KeyRetired)
    );
    assert!(trusted
        .for_token(Some(KeyId::of(&new.verifying_key())))
        .is_ok());
}

#[tokio::test]
async fn a_token_under_a_key_not_held_brings_the_key_set_in_the_same_round() {
    let mut f = fixture(DegradedPolicy::Allow);
    let old = f.script.license.lock().expect("key").clone();
    let new = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    f.engine.tick().await;
    // The server takes the new key up between the status (which still names the old set)
    // and the tokens (signed by the new key).
    announce(
        &f,
        &[(&old, KeyState::Previous), (&new, KeyState::Current)],
        100,
        &[&old, &new],
        &new,
    );
    f.script.status_lags.store(true, Ordering::SeqCst);
    let token = mint(&f, &new);
    *f.script.tokens.lock().expect("tokens") = vec![license_protocol::agent_api::LicenseToken {
        license_id: uuid::Uuid::new_v4(),
        secret_version: newest(&f).expect("a secret"),
        token: token.clone(),
        expires_at: None,
    }];
    assert_eq!(verdict_on(&f, &token), Some(Reason::BadSignature));
    f.engine.tick().await;
    assert_eq!(fetches(&f), 1, "fetched for the token");
    assert_eq!(verdict_on(&f, &token), None, "valid after this round");
    // Tokens under keys held fetch nothing more.
    f.engine.tick().await;
    assert_eq!(fetches(&f), 1);
    // A server that serves a token under a key its own set lacks: fetched, nothing learned,
    // nothing refused, and the round carries on.
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[8; 32]);
    f.script.tokens.lock().expect("tokens")[0].token = mint(&f, &stranger);
    f.engine.tick().await;
    assert_eq!(fetches(&f), 2);
    assert_eq!(verdict_on(&f, &token), None);
    assert!(!audit_text(&f).contains("alert.license_keys_refused"));
}

#[tokio::test]
async fn a_key_set_not_signed_by_a_trusted_key_is_refused_once_and_the_old_trust_kept() {
    let mut f = fixture(DegradedPolicy::Allow);
    let old = f.script.license.lock().expect("key").clone();
    let intruder = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    f.engine.tick().await;
    // The set names the intruder current and is signed by it alone; rotate answers stay
    // signed by the old key.
    announce(
        &f,
        &[(&old, KeyState::Retired), (&intruder, KeyState::Current)],
        100,
        &[&intruder],
        &old,
    );
    f.engine.tick().await;
    f.engine.tick().await;
    assert_eq!(fetches(&f), 1, "a refused set is not fetched again");
    assert_eq!(
        audit_text(&f).matches("alert.license_keys_refused").count(),
        1
    );
    assert_eq!(verdict_on(&f, &mint(&f, &old)), None, "old trust kept");
    assert_eq!(
        verdict_on(&f, &mint(&f, &intruder)),
        Some(Reason::BadSignature)
    );
    assert!(!f.dir.path().join("license-keys.json").exists());
    assert_eq!(
        f.engine.vault.state.consecutive_failures, 0,
        "the round went on"
    );
}

#[tokio::test]
async fn a_server_trust_announcement_is_refused_once_unless_signed_then_adopted_and_kept() {
    use license_protocol::server_trust::{AnnouncedCa, AnnouncedPin, PinState};
    let mut f = fixture(DegradedPolicy::Allow);
    let license = f.script.license.lock().expect("key").clone();
    let ca_pem = f.script.ca.cert.pem();
    let current = f.engine.machine.server_trust.pins()[0];
    let next = license_protocol::pin::CertPin::of_spki_der(b"the next key");
    let pins = vec![
        AnnouncedPin::new(current, PinState::Current),
        AnnouncedPin::new(next, PinState::Next),
    ];
    let cas = vec![AnnouncedCa::current(&ca_pem)];
    let fetched = |f: &Fixture| f.script.trust_fetches.load(Ordering::SeqCst);

    // Signed by a key the agent does not trust: refused, alerted once, not fetched again.
    let intruder = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    *f.script.trust.lock().expect("trust") = Some(ServerTrust::sign(
        pins.clone(),
        cas.clone(),
        10,
        &[&intruder],
    ));
    f.engine.tick().await;
    f.engine.tick().await;
    assert_eq!(fetched(&f), 1);
    assert_eq!(
        audit_text(&f).matches("alert.server_trust_refused").count(),
        1
    );
    assert_eq!(f.engine.machine.server_trust.pins(), &[current]);
    assert!(f.script.adopted.lock().expect("adopted").is_empty());
    assert_eq!(
        f.engine.vault.state.consecutive_failures, 0,
        "the round went on"
    );

    // Signed by the license key: adopted (the connection remade with it) and kept on disk.
    let signed = ServerTrust::sign(pins, cas, 20, &[&license]);
    *f.script.trust.lock().expect("trust") = Some(signed.clone());
    f.engine.tick().await;
    f.engine.tick().await;
    assert_eq!(fetched(&f), 2, "fetched once per announced digest");
    assert_eq!(f.engine.machine.server_trust.pins(), &[current, next]);
    let adopted = f.script.adopted.lock().expect("adopted").clone();
    assert_eq!(adopted.len(), 1);
    assert_eq!(adopted[0].digest(), Some(signed.digest().as_str()));
    let on_disk = f
        .engine
        .settings
        .server_trust_file
        .load()
        .expect("trust file");
    assert_eq!(on_disk, f.engine.machine.server_trust);
    assert!(audit_text(&f).contains("server.trust"));
}

// ---------------------------------------------------------------------------------------------
// Updates
// ---------------------------------------------------------------------------------------------

/// A release of `bytes` at `version`, signed by a release key the script's license key
/// vouches for (or by `forger`'s when given).
fn release_offer(
    f: &Fixture,
    version: &str,
    bytes: &[u8],
    forger: Option<&ed25519_dalek::SigningKey>,
) -> UpdateOffer {
    use license_protocol::release::*;
    use sha2::Digest as _;
    let license = f.script.license.lock().expect("license").clone();
    let release_key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let keys = ReleaseKeys::sign(
        vec![AnnouncedReleaseKey::new(
            &release_key.verifying_key(),
            ReleaseKeyState::Current,
        )],
        10,
        &[forger.unwrap_or(&license)],
    );
    let manifest = ReleaseManifest {
        release_id: uuid::Uuid::new_v4(),
        version: version.parse().expect("version"),
        channel: "stable".parse().expect("channel"),
        arch: crate::update::ARCH.into(),
        sha256: hex(&sha2::Sha256::digest(bytes)),
        size: bytes.len() as u64,
        min_version: None,
        rollback: false,
        published_at: 1,
    };
    UpdateOffer::sign(manifest, &release_key, keys)
}

fn offer(f: &Fixture, offer: UpdateOffer, served: &[u8]) {
    // The key set the update step is given to check the release keys with.
    let license = f.script.license.lock().expect("license").clone();
    *f.script.key_set.lock().expect("set") = Some(LicenseKeySet::sign(
        vec![AnnouncedKey::new(
            &license.verifying_key(),
            KeyState::Current,
            1,
        )],
        1,
        &[&license],
    ));
    *f.script.offer.lock().expect("offer") = Some(offer);
    *f.script.binary.lock().expect("binary") = served.to_vec();
}

#[tokio::test]
async fn an_offered_release_is_checked_downloaded_and_staged_once() {
    let mut f = fixture(DegradedPolicy::Allow);
    let bytes = b"#!/bin/sh\necho new agent\n".repeat(1000);
    let release = release_offer(&f, "99.0.0", &bytes, None);
    offer(&f, release.clone(), &bytes);
    f.engine.tick().await;
    let staging = f.engine.settings.update.staging.clone();
    assert!(staging.is_ready());
    assert_eq!(std::fs::read(staging.binary()).expect("binary"), bytes);
    let bundle = staging.read_bundle().expect("bundle");
    assert_eq!(bundle.offer, release);
    assert_eq!(
        f.engine
            .status_view()
            .update
            .expect("update")
            .staged
            .as_deref(),
        Some("99.0.0")
    );
    assert!(audit_text(&f).contains("update.staged"));
    // The next rounds do not download it again.
    f.engine.tick().await;
    assert_eq!(f.script.downloads.load(Ordering::SeqCst), 1);
    assert!(f.script.update_reports.lock().expect("reports").is_empty());
}

#[tokio::test]
async fn tampered_forged_foreign_and_older_releases_are_refused_audited_and_reported() {
    use license_protocol::release::UpdateOutcome;
    let bytes = b"the real binary".to_vec();
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    /// An offer and the bytes served for it.
    type Case<'a> = Box<dyn Fn(&Fixture) -> (UpdateOffer, Vec<u8>) + 'a>;
    let cases: Vec<(&str, Case)> = vec![
        (
            "wrong_digest",
            Box::new(|f| {
                let mut served = bytes.clone();
                served[0] ^= 1;
                (release_offer(f, "99.0.0", &bytes, None), served)
            }),
        ),
        (
            "wrong_size",
            Box::new(|f| {
                let mut served = bytes.clone();
                served.push(0);
                (release_offer(f, "99.0.0", &bytes, None), served)
            }),
        ),
        (
            "release_keys_refused",
            Box::new(|f| {
                (
                    release_offer(f, "99.0.0", &bytes, Some(&stranger)),
                    bytes.clone(),
                )
            }),
        ),
        (
            "bad_signature",
            Box::new(|f| {
                // Changed after signing.
                let mut o = release_offer(f, "99.0.0", &bytes, None);
                o.manifest.published_at += 1;
                (o, bytes.clone())
            }),
        ),
        (
            "wrong_arch",
            Box::new(|f| {
                let mut o = release_offer(f, "99.0.0", &bytes, None);
                o.manifest.arch = "sparc64".into();
                let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
                o.signature = UpdateOffer::signature_of(&o.manifest, &key);
                (o, bytes.clone())
            }),
        ),
        (
            "downgrade",
            Box::new(|f| (release_offer(f, "0.0.1", &bytes, None), bytes.clone())),
        ),
    ];
    for (reason, make) in cases {
        let mut f = fixture(DegradedPolicy::Allow);
        let (release, served) = make(&f);
        offer(&f, release.clone(), &served);
        f.engine.tick().await;
        let staging = f.engine.settings.update.staging.clone();
        assert!(!staging.is_ready(), "{reason}: nothing staged");
        assert!(
            !staging.binary().exists() && !staging.partial().exists(),
            "{reason}"
        );
        let reports = f.script.update_reports.lock().expect("reports").clone();
        assert_eq!(reports.len(), 1, "{reason}");
        assert_eq!(reports[0].outcome, UpdateOutcome::Refused, "{reason}");
        assert_eq!(reports[0].reason, reason);
        assert_eq!(reports[0].release_id, release.manifest.release_id);
        let audit = audit_text(&f);
        assert!(
            audit.contains("update.refused") && audit.contains(reason),
            "{reason}: audited"
        );
        assert!(audit.contains("alert.update_failed"), "{reason}: alerted");
        // Never downloaded nor reported again.
        let downloads = f.script.downloads.load(Ordering::SeqCst);
        f.engine.tick().await;
        assert_eq!(
            f.script.downloads.load(Ordering::SeqCst),
            downloads,
            "{reason}"
        );
        assert_eq!(f.script.update_reports.lock().expect("reports").len(), 1);
        let last = f
            .engine
            .status_view()
            .update
            .expect("update")
            .last
            .expect("last");
        assert_eq!(
            (last.outcome.as_str(), last.reason.as_str()),
            ("refused", reason)
        );
    }
}

#[tokio::test]
async fn held_updates_stage_nothing_and_withdraw_a_staged_release() {
    let mut f = fixture(DegradedPolicy::Allow);
    let bytes = b"new".to_vec();
    offer(&f, release_offer(&f, "99.0.0", &bytes, None), &bytes);
    f.engine.tick().await;
    let staging = f.engine.settings.update.staging.clone();
    assert!(staging.is_ready());
    f.engine.hold_updates(true).await;
    assert!(!staging.is_ready(), "withdrawn");
    f.engine.tick().await;
    assert!(!staging.is_ready(), "held: nothing staged");
    let view = f.engine.status_view().update.expect("update");
    assert!(view.held);
    assert_eq!(view.offered.as_deref(), Some("99.0.0"));
    assert!(std::fs::read_to_string(&f.engine.settings.metrics_file)
        .expect("metrics")
        .contains("license_agent_update_held 1"));
    f.engine.hold_updates(false).await;
    f.engine.tick().await;
    assert!(staging.is_ready(), "released: staged again");
}

#[tokio::test]
async fn the_update_steps_result_is_audited_step_by_step_and_reported() {
    use crate::update::{StepRecord, UpdateResult};
    use license_protocol::release::UpdateOutcome;
    let mut f = fixture(DegradedPolicy::Allow);
    let staging = f.engine.settings.update.staging.clone();
    std::fs::create_dir_all(staging.dir()).expect("dir");
    let id = uuid::Uuid::new_v4();
    let step = |name: &str, detail: &str| StepRecord {
        step: name.into(),
        at: 1_700_000_000,
        detail: detail.into(),
    };
    staging
        .write_result(&UpdateResult {
            release_id: id,
            version: "99.0.0".parse().expect("version"),
            from_version: "0.1.0".parse().expect("version"),
            outcome: UpdateOutcome::Failed,
            reason: "health_check_failed".into(),
            steps: vec![
                step("verify", "ok"),
                step("stop", "ok"),
                step("backup", "ok"),
                step("swap", "ok"),
                step("start", "ok"),
                step("health", "not healthy within 120 s"),
                step("rollback", "ok"),
            ],
        })
        .expect("result");
    f.engine.tick().await;
    assert!(!staging.result().exists(), "collected");
    let audit = audit_text(&f);
    for name in [
        "verify", "stop", "backup", "swap", "start", "health", "rollback", "result",
    ] {
        assert!(
            audit.contains(&format!("\"update.{name}\"")),
            "update.{name}"
        );
    }
    assert!(audit.contains("alert.update_failed"));
    let reports = f.script.update_reports.lock().expect("reports").clone();
    assert_eq!(reports.len(), 1);
    assert_eq!(
        (
            reports[0].release_id,
            reports[0].outcome,
            reports[0].reason.as_str()
        ),
        (id, UpdateOutcome::Failed, "health_check_failed")
    );
    // A report the server did not take is sent again at the next round.
    assert!(f.engine.vault.state.update.unreported.is_empty());
    assert_eq!(f.engine.vault.state.update.failed, 1);
}
