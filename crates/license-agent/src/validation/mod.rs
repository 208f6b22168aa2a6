//! Where a validation is answered: the agent's hot path (DESIGN.md §2, §3.2).
//!
//! Checks, in order: replayed nonce ([`replay`]); degraded mode forbidden; then the one verdict
//! shared with the server (`license_protocol::verdict`): token format, machine, secret version
//! held ([`keyring`]; invalidated or past its grace), decryption and server signature,
//! revocation ([`revocations`]), the license's dates against the guarded clock. The server's
//! signature is checked against the license keys trusted (the key the token names; a retired
//! one answers `key_retired`). A token that validated once is remembered by its SHA-256, so a POS validating the same token again skips
//! decoding and decryption: only the checks that can change run again. Secrets sit in memory
//! in locked, zeroizing pages behind a lock; nothing here touches disk or the network.

pub mod keyring;
pub mod replay;
pub mod revocations;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use license_protocol::identity::MachineId;
use license_protocol::ipc::{Reason, Response, ValidAnswer};
use license_protocol::license_keys::TrustedKeys;
use license_protocol::rotation::Nonce;
use license_protocol::secret::Secret;
use license_protocol::token::LicenseClaims;
use license_protocol::verdict::{self, Refusal, SecretStanding, SecretState};
use sha2::{Digest as _, Sha256};

pub use keyring::Keyring;
use replay::ReplayWindow;
use revocations::Revocations;

use crate::config::DegradedPolicy;
use crate::platform::clock::{rfc3339, GuardedClock};

/// Verified tokens remembered at most (the cache is cleared, not grown, past this).
const MAX_CACHED_TOKENS: usize = 10_000;

/// A verified token: the secret version it is under and its claims.
type Verified = (u64, Arc<LicenseClaims>);

/// What a validation was about, for its audit record (never the token itself): the license and
/// the secret version, as far as they could be read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Subject {
    pub license_id: Option<uuid::Uuid>,
    pub secret_version: Option<u64>,
}

impl Subject {
    /// A refused token: the license named by the refusal, the version from the clear header.
    fn refused(license_token: &str, license_id: Option<uuid::Uuid>) -> Self {
        Self {
            license_id,
            secret_version: license_protocol::token::decode(license_token)
                .ok()
                .map(|(header, _)| header.secret_version),
        }
    }
}

/// Counters exported as metrics.
#[derive(Debug, Default)]
pub struct Counters {
    pub validations_total: AtomicU64,
    pub validations_failed: AtomicU64,
}

/// Everything a validation reads.
#[derive(Debug)]
pub struct Validator {
    machine_id: MachineId,
    license_keys: RwLock<Arc<TrustedKeys>>,
    pub clock: Arc<GuardedClock>,
    keyring: RwLock<Keyring>,
    invalidated: RwLock<BTreeSet<u64>>,
    revocations: RwLock<Revocations>,
    /// Verified tokens by SHA-256: the secret version they are under and their claims.
    cache: Mutex<HashMap<[u8; 32], Verified>>,
    replay: Mutex<ReplayWindow>,
    replay_window_secs: i64,
    degraded: AtomicBool,
    /// Whether degraded mode is forbidden (validations fail closed while degraded).
    deny_degraded: AtomicBool,
    /// The server revoked this machine and the policy fails closed.
    machine_revoked: AtomicBool,
    pub counters: Counters,
}

impl Validator {
    pub fn new(
        machine_id: MachineId,
        license_keys: TrustedKeys,
        clock: Arc<GuardedClock>,
        replay_window_secs: u64,
        degraded_policy: DegradedPolicy,
    ) -> Self {
        Self {
            machine_id,
            license_keys: RwLock::new(Arc::new(license_keys)),
            clock,
            keyring: RwLock::default(),
            invalidated: RwLock::default(),
            revocations: RwLock::default(),
            cache: Mutex::default(),
            replay: Mutex::default(),
            replay_window_secs: i64::try_from(replay_window_secs).unwrap_or(i64::MAX),
            degraded: AtomicBool::new(false),
            deny_degraded: AtomicBool::new(degraded_policy == DegradedPolicy::Deny),
            machine_revoked: AtomicBool::new(false),
            counters: Counters::default(),
        }
    }

    fn drop_cache(&self) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Replaces the keyring (rotation, purge, invalidation); cached verdicts are dropped.
    pub fn set_keyring(&self, keyring: Keyring) {
        *self.keyring.write().unwrap_or_else(|e| e.into_inner()) = keyring;
        self.drop_cache();
    }

    pub fn keyring(&self) -> Keyring {
        self.keyring
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the license keys trusted (a key set learned); cached verdicts are dropped, so
    /// a token under a key just retired is refused at once.
    pub fn set_license_keys(&self, keys: TrustedKeys) {
        *self.license_keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        self.drop_cache();
    }

    pub fn set_invalidated(&self, versions: BTreeSet<u64>) {
        *self.invalidated.write().unwrap_or_else(|e| e.into_inner()) = versions;
        self.drop_cache();
    }

    pub fn set_revoked(&self, ids: impl IntoIterator<Item = uuid::Uuid>) {
        let new = Revocations::new(ids);
        let mut revocations = self.revocations.write().unwrap_or_else(|e| e.into_inner());
        if *revocations != new {
            *revocations = new;
            drop(revocations);
            self.drop_cache();
        }
    }

    pub fn set_degraded(&self, degraded: bool) {
        self.degraded.store(degraded, Ordering::Release);
    }

    /// Takes every lock of the hot path once: true when none is wedged (systemd watchdog).
    pub fn responsive(&self) -> bool {
        let _keyring = self.keyring.read().unwrap_or_else(|e| e.into_inner());
        let _keys = self.license_keys.read().unwrap_or_else(|e| e.into_inner());
        let _invalidated = self.invalidated.read().unwrap_or_else(|e| e.into_inner());
        let _revoked = self.revocations.read().unwrap_or_else(|e| e.into_inner());
        drop(self.cache.lock().unwrap_or_else(|e| e.into_inner()));
        drop(self.replay.lock().unwrap_or_else(|e| e.into_inner()));
        true
    }

    /// The degraded-mode policy in force (config, or an administrator's override).
    pub fn set_degraded_policy(&self, policy: DegradedPolicy) {
        self.deny_degraded
            .store(policy == DegradedPolicy::Deny, Ordering::Release);
    }

    pub fn degraded_policy(&self) -> DegradedPolicy {
        if self.deny_degraded.load(Ordering::Acquire) {
            DegradedPolicy::Deny
        } else {
            DegradedPolicy::Allow
        }
    }

    /// Fails every validation closed (`machine_revoked`) while `denied`: the server revoked
    /// this machine and the policy says so (`engine`).
    pub fn set_machine_revoked(&self, denied: bool) {
        self.machine_revoked.store(denied, Ordering::Release);
    }

    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// Answers one `validate_license` request.
    pub fn validate(&self, license_token: &str, nonce: Nonce) -> Response {
        self.validate_with_subject(license_token, nonce).0
    }

    /// [`Validator::validate`], with what the validation was about (for its audit record).
    pub fn validate_with_subject(&self, license_token: &str, nonce: Nonce) -> (Response, Subject) {
        self.counters
            .validations_total
            .fetch_add(1, Ordering::Relaxed);
        let (answer, subject) = self.check(license_token, nonce);
        if matches!(answer, Response::Invalid(_)) {
            self.counters
                .validations_failed
                .fetch_add(1, Ordering::Relaxed);
        }
        (answer, subject)
    }

    /// What this machine knows of a secret version now; `take` picks what of the secret the
    /// caller needs (nothing, for a token already verified: no clone on the cached path).
    fn standing<S>(
        &self,
        version: u64,
        now: i64,
        take: impl FnOnce(&Secret) -> S,
    ) -> SecretStanding<S> {
        let invalidated = self
            .invalidated
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&version);
        let keyring = self.keyring.read().unwrap_or_else(|e| e.into_inner());
        match keyring.get(version) {
            Some((dates, secret)) => SecretStanding::Held(
                take(secret),
                SecretState::of(invalidated, dates.grace_until, now),
            ),
            None if invalidated => SecretStanding::Gone(SecretState::Invalidated),
            None if keyring.retired(version) => SecretStanding::Gone(SecretState::PastGrace),
            None => SecretStanding::Unknown,
        }
    }

    fn is_revoked(&self, license: &uuid::Uuid) -> bool {
        self.revocations
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_revoked(license)
    }

    /// The verdict, from the cache of verified tokens when the token was seen before.
    fn verdict(&self, license_token: &str, now: i64) -> Result<Verified, Refusal> {
        let key: [u8; 32] = Sha256::digest(license_token.as_bytes()).into();
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        if let Some((version, claims)) = cached {
            let ((), state) = self.standing(version, now, |_| ()).settle()?;
            verdict::judge(&claims, state, |id| self.is_revoked(id), now)?;
            return Ok((version, claims));
        }
        let license_keys = self
            .license_keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let verified = verdict::verdict(
            license_token,
            &self.machine_id,
            &license_keys,
            now,
            |version| self.standing(version, now, Secret::clone),
            |id| self.is_revoked(id),
        )?;
        let claims = Arc::new(verified.claims);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHED_TOKENS {
            cache.clear();
        }
        cache.insert(key, (verified.version, claims.clone()));
        Ok((verified.version, claims))
    }

    fn check(&self, license_token: &str, nonce: Nonce) -> (Response, Subject) {
        let now = self.clock.now();
        let echo = Some(nonce.to_string());
        let before = if !self
            .replay
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(nonce.0, now, self.replay_window_secs)
        {
            Some(Reason::ReplayedNonce)
        } else if self.machine_revoked.load(Ordering::Acquire) {
            Some(Reason::MachineRevoked)
        } else if self.deny_degraded.load(Ordering::Acquire) && self.is_degraded() {
            Some(Reason::DegradedModeDisabled)
        } else {
            None
        };
        if let Some(reason) = before {
            let subject = Subject::refused(license_token, None);
            return (Response::invalid(reason, echo), subject);
        }
        match self.verdict(license_token, now) {
            Ok((version, claims)) => (
                Response::Valid(ValidAnswer {
                    valid: true,
                    expires_at: claims.expires_at.map(rfc3339),
                    features: claims.features.clone(),
                    metadata: claims.metadata.clone(),
                    nonce: nonce.to_string(),
                }),
                Subject {
                    license_id: Some(claims.license_id),
                    secret_version: Some(version),
                },
            ),
            Err(refusal) => (
                Response::invalid(refusal.reason, echo),
                Subject::refused(license_token, refusal.license_id),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use license_protocol::identity::ClientId;
    use license_protocol::secret::{Secret, SecretDates};
    use license_protocol::token;
    use std::collections::BTreeMap;

    struct Fixture {
        server: ed25519_dalek::SigningKey,
        machine: MachineId,
        secret: Secret,
        v: Validator,
    }

    fn fixture(policy: DegradedPolicy) -> Fixture {
        let server = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let machine = MachineId::new_random();
        let secret = Secret::generate();
        let (clock, _) = GuardedClock::new(0);
        let v = Validator::new(
            machine,
            TrustedKeys::pinned(server.verifying_key()),
            Arc::new(clock),
            600,
            policy,
        );
        let mut ring = Keyring::default();
        let now = v.clock.now();
        ring.insert(
            1,
            SecretDates {
                valid_from: now - 10,
                valid_until: now + 100,
                grace_until: now + 1000,
            },
            secret.clone(),
        );
        v.set_keyring(ring);
        Fixture {
            server,
            machine,
            secret,
            v,
        }
    }

    fn token(f: &Fixture, expires_at: Option<i64>, not_before: i64) -> (String, uuid::Uuid) {
        let claims = LicenseClaims {
            license_id: uuid::Uuid::new_v4(),
            client_id: ClientId::new_random(),
            machine_id: f.machine,
            features: vec!["sale".into()],
            metadata: BTreeMap::new(),
            issued_at: 0,
            not_before,
            expires_at,
        };
        (
            token::seal(&claims, &f.secret, 1, &f.server),
            claims.license_id,
        )
    }

    fn reason(r: Response) -> Option<Reason> {
        match r {
            Response::Invalid(i) => Some(i.reason),
            Response::Valid(_) => None,
        }
    }

    #[test]
    fn each_reason_in_turn() {
        let f = fixture(DegradedPolicy::Allow);
        let now = f.v.clock.now();
        let (good, id) = token(&f, Some(now + 3600), 0);
        assert_eq!(reason(f.v.validate(&good, Nonce::random())), None);
        // Cached path gives the same answer.
        assert_eq!(reason(f.v.validate(&good, Nonce::random())), None);
        let n = Nonce::random();
        assert_eq!(reason(f.v.validate(&good, n)), None);
        assert_eq!(reason(f.v.validate(&good, n)), Some(Reason::ReplayedNonce));
        assert_eq!(
            reason(f.v.validate("nope", Nonce::random())),
            Some(Reason::Malformed)
        );
        assert_eq!(
            reason(f.v.validate(&token(&f, Some(now - 1), 0).0, Nonce::random())),
            Some(Reason::Expired)
        );
        assert_eq!(
            reason(f.v.validate(&token(&f, None, now + 60).0, Nonce::random())),
            Some(Reason::NotYetValid)
        );
        f.v.set_revoked([id]);
        assert_eq!(
            reason(f.v.validate(&good, Nonce::random())),
            Some(Reason::Revoked)
        );
        f.v.set_revoked([]);
        f.v.set_invalidated(BTreeSet::from([1]));
        assert_eq!(
            reason(f.v.validate(&good, Nonce::random())),
            Some(Reason::SecretInvalidated)
        );
        f.v.set_invalidated(BTreeSet::new());
        f.v.set_keyring(Keyring::default());
        assert_eq!(
            reason(f.v.validate(&good, Nonce::random())),
            Some(Reason::UnknownSecretVersion)
        );
        assert_eq!(f.v.counters.validations_total.load(Ordering::Relaxed), 10);
        assert_eq!(f.v.counters.validations_failed.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn degraded_mode_policy() {
        let f = fixture(DegradedPolicy::Deny);
        let (good, _) = token(&f, None, 0);
        f.v.set_degraded(true);
        assert_eq!(
            reason(f.v.validate(&good, Nonce::random())),
            Some(Reason::DegradedModeDisabled)
        );
        f.v.set_degraded(false);
        assert_eq!(reason(f.v.validate(&good, Nonce::random())), None);
        let f = fixture(DegradedPolicy::Allow);
        let (good, _) = token(&f, None, 0);
        f.v.set_degraded(true);
        assert_eq!(reason(f.v.validate(&good, Nonce::random())), None);
    }

    #[test]
    fn a_secret_past_its_grace_answers_expired_held_or_destroyed() {
        let f = fixture(DegradedPolicy::Allow);
        let (good, _) = token(&f, None, 0);
        let now = f.v.clock.now();
        let mut ring = Keyring::default();
        let past = SecretDates {
            valid_from: now - 100,
            valid_until: now - 50,
            grace_until: now - 1,
        };
        ring.insert(1, past, f.secret.clone());
        f.v.set_keyring(ring.clone());
        assert_eq!(
            reason(f.v.validate(&good, Nonce::random())),
            Some(Reason::Expired)
        );
        ring.retire(1);
        f.v.set_keyring(ring);
        assert_eq!(
            reason(f.v.validate(&good, Nonce::random())),
            Some(Reason::Expired)
        );
    }
}
