//! License validation: the agent's hot path (DESIGN.md §2, §3.2).
//!
//! Checks, in order: replayed nonce; degraded mode forbidden; token header (malformed, wrong
//! machine); secret version (invalidated, unknown or past its grace); decryption and server
//! signature (cached by token hash after the first success, so a POS validating the same
//! token again does not pay for them); revocation; validity dates against the guarded clock.
//! Secrets sit in memory in zeroizing buffers behind a lock; nothing here touches disk or the
//! network.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use license_protocol::identity::MachineId;
use license_protocol::ipc::{Reason, Response, ValidAnswer};
use license_protocol::rotation::Nonce;
use license_protocol::secret::{Secret, SecretDates};
use license_protocol::token::{self, LicenseClaims, TokenError};
use sha2::{Digest as _, Sha256};

use crate::clock::GuardedClock;
use crate::config::DegradedPolicy;

/// Verified tokens remembered at most (the cache is cleared, not grown, past this).
const MAX_CACHED_TOKENS: usize = 10_000;
/// Nonces remembered at most; past this the oldest are forgotten first.
const MAX_REMEMBERED_NONCES: usize = 1_000_000;

/// The secret versions held in memory.
#[derive(Debug, Default, Clone)]
pub struct Keyring {
    versions: BTreeMap<u64, (SecretDates, Secret)>,
}

impl Keyring {
    pub fn insert(&mut self, version: u64, dates: SecretDates, secret: Secret) {
        self.versions.insert(version, (dates, secret));
    }

    pub fn remove(&mut self, version: u64) -> bool {
        self.versions.remove(&version).is_some()
    }

    pub fn newest(&self) -> Option<(u64, SecretDates)> {
        self.versions.iter().next_back().map(|(v, (d, _))| (*v, *d))
    }

    pub fn versions(&self) -> impl Iterator<Item = (u64, SecretDates)> + '_ {
        self.versions.iter().map(|(v, (d, _))| (*v, *d))
    }

    pub fn entries(&self) -> impl Iterator<Item = (u64, &SecretDates, &Secret)> {
        self.versions.iter().map(|(v, (d, s))| (*v, d, s))
    }

    fn get(&self, version: u64) -> Option<&(SecretDates, Secret)> {
        self.versions.get(&version)
    }
}

/// Nonces seen within the replay window.
#[derive(Debug, Default)]
struct ReplayWindow {
    seen: HashSet<[u8; 16]>,
    order: VecDeque<(i64, [u8; 16])>,
}

impl ReplayWindow {
    /// Records a nonce; false when it was seen within the window.
    fn record(&mut self, nonce: [u8; 16], now: i64, window: i64) -> bool {
        while let Some(&(at, old)) = self.order.front() {
            if at + window > now && self.order.len() < MAX_REMEMBERED_NONCES {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&old);
        }
        if !self.seen.insert(nonce) {
            return false;
        }
        self.order.push_back((now, nonce));
        true
    }
}

/// A verified token: the secret version it is under and its claims.
type Verified = (u64, Arc<LicenseClaims>);

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
    license_key: ed25519_dalek::VerifyingKey,
    pub clock: Arc<GuardedClock>,
    keyring: RwLock<Keyring>,
    invalidated: RwLock<BTreeSet<u64>>,
    revoked: RwLock<HashSet<uuid::Uuid>>,
    /// Verified tokens by SHA-256: the secret version they are under and their claims.
    cache: Mutex<HashMap<[u8; 32], Verified>>,
    replay: Mutex<ReplayWindow>,
    replay_window_secs: i64,
    degraded: AtomicBool,
    degraded_policy: std::sync::atomic::AtomicBool,
    pub counters: Counters,
}

/// Unix seconds as RFC 3339 (the number itself if out of range).
pub fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

impl Validator {
    pub fn new(
        machine_id: MachineId,
        license_key: ed25519_dalek::VerifyingKey,
        clock: Arc<GuardedClock>,
        replay_window_secs: u64,
        degraded_policy: DegradedPolicy,
    ) -> Self {
        Self {
            machine_id,
            license_key,
            clock,
            keyring: RwLock::default(),
            invalidated: RwLock::default(),
            revoked: RwLock::default(),
            cache: Mutex::default(),
            replay: Mutex::default(),
            replay_window_secs: i64::try_from(replay_window_secs).unwrap_or(i64::MAX),
            degraded: AtomicBool::new(false),
            degraded_policy: AtomicBool::new(degraded_policy == DegradedPolicy::Deny),
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

    pub fn set_invalidated(&self, versions: BTreeSet<u64>) {
        *self.invalidated.write().unwrap_or_else(|e| e.into_inner()) = versions;
        self.drop_cache();
    }

    pub fn set_revoked(&self, ids: impl IntoIterator<Item = uuid::Uuid>) {
        let ids: HashSet<_> = ids.into_iter().collect();
        let mut revoked = self.revoked.write().unwrap_or_else(|e| e.into_inner());
        if *revoked != ids {
            *revoked = ids;
            drop(revoked);
            self.drop_cache();
        }
    }

    pub fn set_degraded(&self, degraded: bool) {
        self.degraded.store(degraded, Ordering::Release);
    }

    /// Takes every lock of the hot path once: true when none is wedged (systemd watchdog).
    pub fn responsive(&self) -> bool {
        let _keyring = self.keyring.read().unwrap_or_else(|e| e.into_inner());
        let _invalidated = self.invalidated.read().unwrap_or_else(|e| e.into_inner());
        let _revoked = self.revoked.read().unwrap_or_else(|e| e.into_inner());
        drop(self.cache.lock().unwrap_or_else(|e| e.into_inner()));
        drop(self.replay.lock().unwrap_or_else(|e| e.into_inner()));
        true
    }

    /// Runtime override of the degraded-mode policy (management `degraded off|auto`).
    pub fn set_degraded_policy(&self, policy: DegradedPolicy) {
        self.degraded_policy
            .store(policy == DegradedPolicy::Deny, Ordering::Release);
    }

    pub fn degraded_policy(&self) -> DegradedPolicy {
        if self.degraded_policy.load(Ordering::Acquire) {
            DegradedPolicy::Deny
        } else {
            DegradedPolicy::Allow
        }
    }

    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// Answers one `validate_license` request.
    pub fn validate(&self, license_token: &str, nonce: Nonce) -> Response {
        self.counters
            .validations_total
            .fetch_add(1, Ordering::Relaxed);
        let answer = self.check(license_token, nonce);
        if matches!(answer, Response::Invalid(_)) {
            self.counters
                .validations_failed
                .fetch_add(1, Ordering::Relaxed);
        }
        answer
    }

    fn check(&self, license_token: &str, nonce: Nonce) -> Response {
        let now = self.clock.now();
        let echo = Some(nonce.to_string());
        let refuse = |reason| Response::invalid(reason, echo.clone());
        if !self
            .replay
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(nonce.0, now, self.replay_window_secs)
        {
            return refuse(Reason::ReplayedNonce);
        }
        if self.degraded_policy.load(Ordering::Acquire) && self.is_degraded() {
            return refuse(Reason::DegradedModeDisabled);
        }
        // A token verified before skips decoding and decryption: only the checks that can
        // change (secret version still held, not invalidated) run again.
        let key: [u8; 32] = Sha256::digest(license_token.as_bytes()).into();
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        let version = match &cached {
            Some((version, _)) => *version,
            None => {
                let header = match token::decode(license_token) {
                    Ok((header, _)) => header,
                    Err(_) => return refuse(Reason::Malformed),
                };
                if header.machine_id != self.machine_id {
                    return refuse(Reason::WrongMachine);
                }
                header.secret_version
            }
        };
        if self
            .invalidated
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&version)
        {
            return refuse(Reason::SecretInvalidated);
        }
        let secret = {
            let keyring = self.keyring.read().unwrap_or_else(|e| e.into_inner());
            match keyring.get(version) {
                Some((dates, _)) if now > dates.grace_until => {
                    return refuse(Reason::UnknownSecretVersion)
                }
                // The secret itself is only needed to open a token not seen before.
                Some((_, secret)) => cached.is_none().then(|| secret.clone()),
                None => return refuse(Reason::UnknownSecretVersion),
            }
        };
        let claims = match (cached, secret) {
            (Some((_, claims)), _) => claims,
            (None, secret) => match token::open(
                license_token,
                &self.machine_id,
                |_| secret,
                &self.license_key,
            ) {
                Ok(claims) => {
                    let claims = Arc::new(claims);
                    let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                    if cache.len() >= MAX_CACHED_TOKENS {
                        cache.clear();
                    }
                    cache.insert(key, (version, claims.clone()));
                    claims
                }
                Err(TokenError::Malformed) => return refuse(Reason::Malformed),
                Err(TokenError::WrongMachine) => return refuse(Reason::WrongMachine),
                Err(TokenError::UnknownSecretVersion(_)) => {
                    return refuse(Reason::UnknownSecretVersion)
                }
                Err(_) => return refuse(Reason::BadSignature),
            },
        };
        if self
            .revoked
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&claims.license_id)
        {
            return refuse(Reason::Revoked);
        }
        if claims.not_before > now {
            return refuse(Reason::NotYetValid);
        }
        if claims.expires_at.is_some_and(|t| t <= now) {
            return refuse(Reason::Expired);
        }
        Response::Valid(ValidAnswer {
            valid: true,
            expires_at: claims.expires_at.map(rfc3339),
            features: claims.features.clone(),
            metadata: claims.metadata.clone(),
            nonce: nonce.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use license_protocol::identity::ClientId;

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
            server.verifying_key(),
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
    fn replay_window_forgets_old_nonces() {
        let mut w = ReplayWindow::default();
        assert!(w.record([1; 16], 100, 10));
        assert!(!w.record([1; 16], 105, 10));
        assert!(w.record([1; 16], 111, 10));
    }
}
