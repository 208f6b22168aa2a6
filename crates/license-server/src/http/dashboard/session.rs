//! Dashboard sessions and CSRF tokens, in memory.
//!
//! Signing in exchanges an admin API token for a session: a random id (the cookie's value) and
//! a random CSRF token (a hidden field of every form). The table holds the SHA-256 of each
//! session id, never the id itself, and the hash of the admin token the session was opened with
//! (each request looks that token up again, so revoking it ends its sessions). Sessions live in
//! this process's memory only: a restart signs everyone out, and with several replicas a load
//! balancer must keep an administrator on one replica (the admin listener is loopback by
//! default, so there is usually one).
//!
//! Everything here is decided from the `now` the caller passes, so tests drive the clock.

use std::collections::HashMap;
use std::sync::Mutex;

use subtle::ConstantTimeEq as _;
use zeroize::Zeroizing;

use crate::clock::Timestamp;
use crate::service::{credential_hash, new_credential};
use crate::store::admin_tokens::Role;

/// Name of the session cookie. The `__Host-` prefix makes browsers refuse it unless it is
/// `Secure`, has `Path=/` and no `Domain`, so no other host or path can plant one.
pub const COOKIE_NAME: &str = "__Host-lsa_dashboard";

/// Why a session or an action was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    #[error("not signed in")]
    Unknown,
    #[error("the session expired (idle too long or past its lifetime); sign in again")]
    Expired,
    #[error("the form's CSRF token is missing or wrong")]
    CsrfMismatch,
}

/// Session limits, from the server configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionPolicy {
    /// A session ends this long after sign-in, however busy, seconds.
    pub lifetime_secs: i64,
    /// A session ends after this long without a request, seconds.
    pub idle_secs: i64,
    /// Most sessions held at once; signing in beyond it ends the least recently used one.
    pub max_sessions: usize,
}

/// Whether a session may still be used at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Idle,
    PastLifetime,
}

/// The expiry decision, on its own: alive until `idle_secs` without use and until
/// `lifetime_secs` after sign-in, both bounds exclusive.
pub fn liveness(
    policy: &SessionPolicy,
    created_at: Timestamp,
    last_used_at: Timestamp,
    now: Timestamp,
) -> Liveness {
    if now.0 >= created_at.0.saturating_add(policy.lifetime_secs) {
        Liveness::PastLifetime
    } else if now.0 >= last_used_at.0.saturating_add(policy.idle_secs) {
        Liveness::Idle
    } else {
        Liveness::Alive
    }
}

/// Constant-time equality of a presented CSRF token with the session's.
pub fn csrf_matches(expected: &str, presented: &str) -> bool {
    // Lengths are not secret (every token has the same one); contents are compared in
    // constant time.
    expected.len() == presented.len() && bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
}

/// One signed-in administrator.
#[derive(Clone)]
struct Session {
    /// SHA-256 of the admin API token signed in with (looked up on every request).
    token_hash: String,
    csrf: Zeroizing<String>,
    created_at: Timestamp,
    last_used_at: Timestamp,
}

/// What a request learns of its session.
#[derive(Clone)]
pub struct SessionView {
    /// SHA-256 of the admin API token the session was opened with.
    pub token_hash: String,
    /// The CSRF token every form of this session carries.
    pub csrf: Zeroizing<String>,
    /// SHA-256 of the session id (the key to end it with).
    pub key: String,
}

impl std::fmt::Debug for SessionView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionView").finish_non_exhaustive()
    }
}

/// A session just opened: the cookie value, to be sent once in `Set-Cookie`.
pub struct NewSession {
    pub id: Zeroizing<String>,
}

impl std::fmt::Debug for NewSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSession").finish_non_exhaustive()
    }
}

/// The sessions of this process, bounded by [`SessionPolicy::max_sessions`].
pub struct SessionStore {
    policy: SessionPolicy,
    sessions: Mutex<HashMap<String, Session>>,
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore")
            .field("policy", &self.policy)
            .field("sessions", &self.len())
            .finish()
    }
}

impl SessionStore {
    pub fn new(policy: SessionPolicy) -> Self {
        Self {
            policy,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    pub fn policy(&self) -> &SessionPolicy {
        &self.policy
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // A panic while holding the lock leaves a consistent map (every change is one insert
        // or remove), so a poisoned lock is still usable.
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Opens a session for the admin token whose hash is `token_hash`. Expired sessions are
    /// dropped first; when the table is still full, the least recently used session ends.
    pub fn open(&self, token_hash: &str, now: Timestamp) -> NewSession {
        let (id, key) = new_credential("lsd_");
        let (csrf, _) = new_credential("");
        let mut sessions = self.lock();
        sessions.retain(|_, s| {
            liveness(&self.policy, s.created_at, s.last_used_at, now) == Liveness::Alive
        });
        while sessions.len() >= self.policy.max_sessions.max(1) {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, s)| s.last_used_at)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => sessions.remove(&k),
                None => break,
            };
        }
        sessions.insert(
            key,
            Session {
                token_hash: token_hash.to_string(),
                csrf,
                created_at: now,
                last_used_at: now,
            },
        );
        NewSession { id }
    }

    /// The session whose id is `id` (the cookie's value), marked used at `now`. An expired
    /// session is removed and refused.
    pub fn touch(&self, id: &str, now: Timestamp) -> Result<SessionView, SessionError> {
        let key = credential_hash(id);
        let mut sessions = self.lock();
        let session = sessions.get_mut(&key).ok_or(SessionError::Unknown)?;
        if liveness(&self.policy, session.created_at, session.last_used_at, now) != Liveness::Alive
        {
            sessions.remove(&key);
            return Err(SessionError::Expired);
        }
        session.last_used_at = now;
        Ok(SessionView {
            token_hash: session.token_hash.clone(),
            csrf: session.csrf.clone(),
            key,
        })
    }

    /// Ends the session with this key ([`SessionView::key`]); signing out.
    pub fn close(&self, key: &str) {
        self.lock().remove(key);
    }
}

/// Checks the CSRF token a form presented against its session's.
pub fn check_csrf(session: &SessionView, presented: &str) -> Result<(), SessionError> {
    if csrf_matches(&session.csrf, presented) {
        Ok(())
    } else {
        Err(SessionError::CsrfMismatch)
    }
}

/// The session cookie's value in a `Cookie` request header, if any.
pub fn cookie_value(header: &str) -> Option<&str> {
    header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value.trim())
}

/// `Set-Cookie` for a new session: HttpOnly (no script reads it), Secure (HTTPS only; browsers
/// treat `localhost` as secure too), SameSite=Strict (never sent on a cross-site request),
/// expiring with the session's lifetime.
pub fn set_cookie(id: &str, policy: &SessionPolicy) -> String {
    format!(
        "{COOKIE_NAME}={id}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={}",
        policy.lifetime_secs
    )
}

/// `Set-Cookie` that removes the session cookie (signing out).
pub fn clear_cookie() -> String {
    format!("{COOKIE_NAME}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// What a role may do in the dashboard: `readonly` sees every page and no action.
pub fn may_act(role: Role) -> bool {
    role == Role::Admin
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: SessionPolicy = SessionPolicy {
        lifetime_secs: 8 * 3600,
        idle_secs: 1800,
        max_sessions: 3,
    };

    /// A fake clock: the tests move `now` by hand.
    fn at(secs: i64) -> Timestamp {
        Timestamp(1_800_000_000 + secs)
    }

    #[test]
    fn idle_and_lifetime_bounds_are_exclusive() {
        assert_eq!(liveness(&POLICY, at(0), at(0), at(1799)), Liveness::Alive);
        assert_eq!(liveness(&POLICY, at(0), at(0), at(1800)), Liveness::Idle);
        // Kept busy, it still ends at its lifetime.
        let end = 8 * 3600;
        assert_eq!(
            liveness(&POLICY, at(0), at(end - 1), at(end - 1)),
            Liveness::Alive
        );
        assert_eq!(
            liveness(&POLICY, at(0), at(end - 1), at(end)),
            Liveness::PastLifetime
        );
    }

    #[test]
    fn a_session_expires_when_idle_and_at_its_lifetime_with_a_fake_clock() {
        let store = SessionStore::new(POLICY);
        let s = store.open("hash", at(0));
        // Used every 20 minutes: stays alive until its lifetime.
        let mut t = 0;
        while t + 1200 < 8 * 3600 {
            t += 1200;
            let view = store.touch(&s.id, at(t)).unwrap();
            assert_eq!(view.token_hash, "hash");
        }
        assert_eq!(
            store.touch(&s.id, at(8 * 3600)).unwrap_err(),
            SessionError::Expired
        );
        // Removed: now unknown.
        assert_eq!(
            store.touch(&s.id, at(8 * 3600)).unwrap_err(),
            SessionError::Unknown
        );
        let idle = store.open("hash", at(0));
        assert_eq!(
            store.touch(&idle.id, at(1800)).unwrap_err(),
            SessionError::Expired
        );
    }

    #[test]
    fn unknown_ids_and_sign_out() {
        let store = SessionStore::new(POLICY);
        assert_eq!(
            store.touch("lsd_forged", at(0)).unwrap_err(),
            SessionError::Unknown
        );
        let s = store.open("hash", at(0));
        let view = store.touch(&s.id, at(1)).unwrap();
        store.close(&view.key);
        assert_eq!(
            store.touch(&s.id, at(2)).unwrap_err(),
            SessionError::Unknown
        );
        // The table is keyed by the id's hash, not the id.
        assert_ne!(view.key, *s.id);
    }

    #[test]
    fn the_table_is_bounded_and_evicts_the_least_recently_used() {
        let store = SessionStore::new(POLICY);
        let a = store.open("a", at(0));
        let b = store.open("b", at(1));
        let c = store.open("c", at(2));
        store.touch(&a.id, at(3)).unwrap();
        let d = store.open("d", at(4));
        assert_eq!(store.len(), 3);
        assert_eq!(
            store.touch(&b.id, at(5)).unwrap_err(),
            SessionError::Unknown
        );
        for s in [&a, &c, &d] {
            store.touch(&s.id, at(5)).unwrap();
        }
        // Expired sessions go first, before any live one is evicted.
        let e = store.open("e", at(5 + 1800 + 10));
        assert_eq!(store.len(), 1);
        store.touch(&e.id, at(5 + 1800 + 11)).unwrap();
    }

    #[test]
    fn csrf_tokens_compare_in_constant_time_and_differ_per_session() {
        let store = SessionStore::new(POLICY);
        let one = store.touch(&store.open("h", at(0)).id, at(0)).unwrap();
        let two = store.touch(&store.open("h", at(0)).id, at(0)).unwrap();
        assert_ne!(*one.csrf, *two.csrf);
        assert!(check_csrf(&one, &one.csrf).is_ok());
        assert_eq!(
            check_csrf(&one, &two.csrf).unwrap_err(),
            SessionError::CsrfMismatch
        );
        assert_eq!(
            check_csrf(&one, "").unwrap_err(),
            SessionError::CsrfMismatch
        );
        let mut flipped = one.csrf.to_string();
        flipped.pop();
        flipped.push('#');
        assert!(!csrf_matches(&one.csrf, &flipped));
        assert!(csrf_matches("abc", "abc"));
        assert!(!csrf_matches("abc", "abcd"));
    }

    #[test]
    fn cookies_are_parsed_and_set_with_every_attribute() {
        assert_eq!(
            cookie_value(&format!("a=1; {COOKIE_NAME}=lsd_x ; b=2")),
            Some("lsd_x")
        );
        assert_eq!(cookie_value("lsa_dashboard=lsd_x"), None);
        assert_eq!(cookie_value(""), None);
        let set = set_cookie("lsd_x", &POLICY);
        for attribute in [
            "Secure",
            "HttpOnly",
            "SameSite=Strict",
            "Path=/",
            "Max-Age=28800",
        ] {
            assert!(set.contains(attribute), "{set}");
        }
        assert!(clear_cookie().contains("Max-Age=0"));
    }

    #[test]
    fn debug_output_holds_no_secret() {
        let store = SessionStore::new(POLICY);
        let s = store.open("the-token-hash", at(0));
        let view = store.touch(&s.id, at(0)).unwrap();
        let printed = format!("{s:?} {view:?} {store:?}");
        assert!(!printed.contains(s.id.as_str()));
        assert!(!printed.contains(view.csrf.as_str()));
        assert!(!printed.contains("the-token-hash"));
    }

    #[test]
    fn only_admins_act() {
        assert!(may_act(Role::Admin));
        assert!(!may_act(Role::Readonly));
    }
}
