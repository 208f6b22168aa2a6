//! The one verdict on a license token and the one table from failures to reason codes, used by
//! the agent (local validation, DESIGN.md §3.2) and by the server (online validation,
//! `POST /api/v1/validate-license`), so both answer the same token with the same code.
//!
//! Checks, in order: format ([`Reason::Malformed`]), machine ([`Reason::WrongMachine`]), the
//! signing key (retired: [`Reason::KeyRetired`]; unknown: [`Reason::BadSignature`]), the
//! secret version is known ([`Reason::UnknownSecretVersion`]; one destroyed at the end of its
//! grace is [`Reason::Expired`], one destroyed after an invalidation
//! [`Reason::SecretInvalidated`]), decryption and signature ([`Reason::BadSignature`]), the
//! secret's state (invalidated, past its grace), revocation ([`Reason::Revoked`]), the
//! license's own dates ([`Reason::Expired`], then [`Reason::NotYetValid`]).
//!
//! ```
//! use license_protocol::identity::{ClientId, MachineId};
//! use license_protocol::ipc::Reason;
//! use license_protocol::license_keys::TrustedKeys;
//! use license_protocol::secret::Secret;
//! use license_protocol::token::{self, LicenseClaims};
//! use license_protocol::verdict::{verdict, SecretStanding, SecretState};
//!
//! let server = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
//! let machine = MachineId::new_random();
//! let secret = Secret::from_bytes([9; 32]);
//! let claims = LicenseClaims {
//!     license_id: uuid::Uuid::new_v4(),
//!     client_id: ClientId::new_random(),
//!     machine_id: machine,
//!     features: vec!["pos.sale".into()],
//!     metadata: Default::default(),
//!     issued_at: 0,
//!     not_before: 0,
//!     expires_at: None,
//! };
//! let token = token::seal(&claims, &secret, 3, &server);
//! let keys = TrustedKeys::pinned(server.verifying_key());
//! let held = |_| SecretStanding::Held(secret.clone(), SecretState::Usable);
//! let ok = verdict(&token, &machine, &keys, 1_000, held, |_| false).unwrap();
//! assert_eq!((ok.version, ok.claims.features.len()), (3, 1));
//!
//! let gone = |_| SecretStanding::Gone(SecretState::PastGrace);
//! let refused = verdict(&token, &machine, &keys, 1_000, gone, |_| false);
//! assert_eq!(refused.unwrap_err().reason, Reason::Expired);
//! ```

use crate::identity::MachineId;
use crate::ipc::Reason;
use crate::license_keys::TrustedKeys;
use crate::secret::Secret;
use crate::token::{self, LicenseClaims, TokenError};

/// Where a held secret version stands at the time of the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretState {
    /// ACTIVE or GRACE: its tokens validate.
    Usable,
    /// Invalidated by an administrator or the server.
    Invalidated,
    /// Past its `grace_until`.
    PastGrace,
}

impl SecretState {
    /// The state of a version from what its holder knows of it.
    pub fn of(invalidated: bool, grace_until: i64, now: i64) -> Self {
        if invalidated {
            SecretState::Invalidated
        } else if now > grace_until {
            SecretState::PastGrace
        } else {
            SecretState::Usable
        }
    }

    /// The code a token under a version in this state is refused with, if it is.
    pub fn refusal(self) -> Option<Reason> {
        match self {
            SecretState::Usable => None,
            SecretState::Invalidated => Some(Reason::SecretInvalidated),
            SecretState::PastGrace => Some(Reason::Expired),
        }
    }
}

/// What the verifier knows of the token's secret version. `S` is the secret itself (`()` when
/// the caller already has the token's claims and only needs the state).
#[derive(Debug, Clone)]
pub enum SecretStanding<S = Secret> {
    /// Held, in this state.
    Held(S, SecretState),
    /// Held once and destroyed since, in this state (invalidated, or past its grace).
    Gone(SecretState),
    /// Never held by this machine (or, on the server, only pending).
    Unknown,
}

impl<S> SecretStanding<S> {
    /// The secret and its state, or the code the token is refused with.
    pub fn settle(self) -> Result<(S, SecretState), Reason> {
        match self {
            SecretStanding::Held(secret, state) => Ok((secret, state)),
            SecretStanding::Gone(state) => {
                Err(state.refusal().unwrap_or(Reason::UnknownSecretVersion))
            }
            SecretStanding::Unknown => Err(Reason::UnknownSecretVersion),
        }
    }
}

/// A refused token: the code, and the license when the token could be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub license_id: Option<uuid::Uuid>,
}

impl From<Reason> for Refusal {
    fn from(reason: Reason) -> Self {
        Refusal {
            reason,
            license_id: None,
        }
    }
}

/// A token that validated: the secret version it is under and what it grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub version: u64,
    pub claims: LicenseClaims,
}

/// The reason-code table for tokens that cannot be opened.
pub fn reason_of(error: &TokenError) -> Reason {
    match error {
        TokenError::Malformed => Reason::Malformed,
        TokenError::WrongMachine => Reason::WrongMachine,
        TokenError::UnknownSecretVersion(_) => Reason::UnknownSecretVersion,
        TokenError::BadSignature => Reason::BadSignature,
        TokenError::KeyRetired => Reason::KeyRetired,
    }
}

/// The verdict on `token` for `machine` at `now` (Unix seconds): `standing` is asked once for
/// the token's secret version, `revoked` once for its license, both only when the checks
/// before them passed.
pub fn verdict(
    token: &str,
    machine: &MachineId,
    license_keys: &TrustedKeys,
    now: i64,
    standing: impl FnOnce(u64) -> SecretStanding,
    revoked: impl FnOnce(&uuid::Uuid) -> bool,
) -> Result<Verified, Refusal> {
    let mut settled: Option<(u64, Result<SecretState, Reason>)> = None;
    let opened = token::open(
        token,
        machine,
        |version| match standing(version).settle() {
            Ok((secret, state)) => {
                settled = Some((version, Ok(state)));
                Some(secret)
            }
            Err(reason) => {
                settled = Some((version, Err(reason)));
                None
            }
        },
        |key_id| license_keys.for_token(key_id),
    );
    let claims = match (opened, settled) {
        (Ok(claims), _) => claims,
        (Err(TokenError::UnknownSecretVersion(_)), Some((_, Err(reason)))) => {
            return Err(reason.into())
        }
        (Err(e), _) => return Err(reason_of(&e).into()),
    };
    let Some((version, Ok(state))) = settled else {
        // `open` only succeeds after asking for the secret.
        return Err(Reason::Internal.into());
    };
    judge(&claims, state, revoked, now)?;
    Ok(Verified { version, claims })
}

/// The checks after the token is opened, for a caller that already holds its claims (the
/// agent's cache of verified tokens): the secret's state, revocation, the license's dates.
pub fn judge(
    claims: &LicenseClaims,
    state: SecretState,
    revoked: impl FnOnce(&uuid::Uuid) -> bool,
    now: i64,
) -> Result<(), Refusal> {
    let refuse = |reason| {
        Err(Refusal {
            reason,
            license_id: Some(claims.license_id),
        })
    };
    if let Some(reason) = state.refusal() {
        return refuse(reason);
    }
    if revoked(&claims.license_id) {
        return refuse(Reason::Revoked);
    }
    if claims.expires_at.is_some_and(|t| t <= now) {
        return refuse(Reason::Expired);
    }
    if claims.not_before > now {
        return refuse(Reason::NotYetValid);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ClientId;

    struct Case {
        server: ed25519_dalek::SigningKey,
        machine: MachineId,
        secret: Secret,
    }

    fn case() -> Case {
        Case {
            server: ed25519_dalek::SigningKey::from_bytes(&[1; 32]),
            machine: MachineId::new_random(),
            secret: Secret::from_bytes([2; 32]),
        }
    }

    fn token(c: &Case, not_before: i64, expires_at: Option<i64>) -> String {
        let claims = LicenseClaims {
            license_id: uuid::Uuid::new_v4(),
            client_id: ClientId::new_random(),
            machine_id: c.machine,
            features: vec!["f".into()],
            metadata: Default::default(),
            issued_at: 0,
            not_before,
            expires_at,
        };
        token::seal(&claims, &c.secret, 5, &c.server)
    }

    fn reason(
        c: &Case,
        token: &str,
        standing: SecretStanding,
        revoked: bool,
        now: i64,
    ) -> Option<Reason> {
        verdict(
            token,
            &c.machine,
            &TrustedKeys::pinned(c.server.verifying_key()),
            now,
            |v| {
                assert_eq!(v, 5);
                standing
            },
            |_| revoked,
        )
        .err()
        .map(|r| r.reason)
    }

    #[test]
    fn every_code_in_its_place() {
        let c = case();
        let held = |state| SecretStanding::Held(c.secret.clone(), state);
        let good = token(&c, 0, Some(2_000));
        assert_eq!(
            reason(&c, &good, held(SecretState::Usable), false, 1_000),
            None
        );
        assert_eq!(
            reason(&c, "garbage", held(SecretState::Usable), false, 1_000),
            Some(Reason::Malformed)
        );
        let other = Case {
            machine: MachineId::new_random(),
            ..case()
        };
        assert_eq!(
            reason(&other, &good, held(SecretState::Usable), false, 1_000),
            Some(Reason::WrongMachine)
        );
        assert_eq!(
            reason(&c, &good, SecretStanding::Unknown, false, 1_000),
            Some(Reason::UnknownSecretVersion)
        );
        // A secret destroyed at the end of its grace and one still held past it agree.
        assert_eq!(
            reason(
                &c,
                &good,
                SecretStanding::Gone(SecretState::PastGrace),
                false,
                1_000
            ),
            Some(Reason::Expired)
        );
        assert_eq!(
            reason(&c, &good, held(SecretState::PastGrace), false, 1_000),
            Some(Reason::Expired)
        );
        assert_eq!(
            reason(
                &c,
                &good,
                SecretStanding::Gone(SecretState::Invalidated),
                false,
                1_000
            ),
            Some(Reason::SecretInvalidated)
        );
        assert_eq!(
            reason(&c, &good, held(SecretState::Invalidated), false, 1_000),
            Some(Reason::SecretInvalidated)
        );
        let wrong_secret = SecretStanding::Held(Secret::from_bytes([3; 32]), SecretState::Usable);
        assert_eq!(
            reason(&c, &good, wrong_secret, false, 1_000),
            Some(Reason::BadSignature)
        );
        assert_eq!(
            reason(&c, &good, held(SecretState::Usable), true, 1_000),
            Some(Reason::Revoked)
        );
        assert_eq!(
            reason(&c, &good, held(SecretState::Usable), false, 2_000),
            Some(Reason::Expired)
        );
        let later = token(&c, 1_500, None);
        assert_eq!(
            reason(&c, &later, held(SecretState::Usable), false, 1_000),
            Some(Reason::NotYetValid)
        );
    }

    #[test]
    fn refusals_after_opening_name_the_license() {
        let c = case();
        let good = token(&c, 0, None);
        let refusal = verdict(
            &good,
            &c.machine,
            &TrustedKeys::pinned(c.server.verifying_key()),
            0,
            |_| SecretStanding::Held(c.secret.clone(), SecretState::Usable),
            |_| true,
        )
        .unwrap_err();
        assert_eq!(refusal.reason, Reason::Revoked);
        assert!(refusal.license_id.is_some());
    }

    #[test]
    fn a_retired_key_answers_key_retired_and_an_unknown_one_bad_signature() {
        use crate::license_keys::{AnnouncedKey, KeyState, LicenseKeySet};
        let c = case();
        let good = token(&c, 0, None);
        let new = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let held = || SecretStanding::Held(c.secret.clone(), SecretState::Usable);
        let answer = |keys: &TrustedKeys| {
            verdict(&good, &c.machine, keys, 0, |_| held(), |_| false)
                .err()
                .map(|r| r.reason)
        };
        let mut keys = TrustedKeys::pinned(c.server.verifying_key());
        assert_eq!(answer(&keys), None);
        assert_eq!(
            answer(&TrustedKeys::pinned(new.verifying_key())),
            Some(Reason::BadSignature)
        );
        let set = LicenseKeySet::sign(
            vec![
                AnnouncedKey::new(&c.server.verifying_key(), KeyState::Retired, 0),
                AnnouncedKey::new(&new.verifying_key(), KeyState::Current, 0),
            ],
            5,
            &[&c.server, &new],
        );
        keys.accept(&set).unwrap();
        assert_eq!(answer(&keys), Some(Reason::KeyRetired));
    }

    #[test]
    fn state_of_a_version() {
        assert_eq!(SecretState::of(false, 10, 10), SecretState::Usable);
        assert_eq!(SecretState::of(false, 10, 11), SecretState::PastGrace);
        assert_eq!(SecretState::of(true, 10, 0), SecretState::Invalidated);
    }
}
