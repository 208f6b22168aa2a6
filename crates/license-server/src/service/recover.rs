//! Machine recovery, `POST /api/public/recover`: a machine whose key is gone (its TPM was
//! cleared) gets a new certificate for a new key with the single-use recovery token it was
//! given at enrollment, without an operator re-running the installer.
//!
//! One transaction: spend the token (atomically: of two concurrent requests with one token
//! exactly one proceeds) and store the next one, invalidate the pending secret version, request
//! a rotation, then supersede the machine's certificate, issue one for the CSR's key and audit
//! ([`super::certificates::issue`]).
//! The CSR is checked before the transaction so a bad request never burns a token.
//!
//! Secrets: the new key cannot open what was sealed to the old one, so the machine needs a
//! new version. The acknowledged versions are left as they are (tokens already issued under
//! them keep validating until the next rotation retires them the usual way), a rotation is
//! requested so the agent asks for one at once, and the pending version — issued to the old
//! key and perhaps received by it — is invalidated rather than re-sent to the new key:
//! whoever holds the new key must never obtain a secret that was delivered to the old one.
//! Invalidated, not deleted, so its version number is never issued again.

use std::net::IpAddr;

use license_protocol::enroll::{RecoverRequest, RecoverResponse};
use license_protocol::error::ErrorCode;
use serde_json::json;

use super::certificates::{self, identity_of, Issuance, IssueError};
use super::enroll::RECOVERY_TOKEN_PREFIX;
use super::{credential_hash, new_credential, AppState};
use crate::clock::Timestamp;
use crate::pki::{MachineCsr, MachineKey, PkiError};
use crate::store::audit::{self, NewAuditEvent};
use crate::store::machines::{self, RecoveryProblem};
use crate::store::{secrets, StoreError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecoverError {
    /// Unknown machine, wrong token or spent token: one answer, so the endpoint does not
    /// reveal which machine ids exist. The audit row carries the cause.
    #[error("recovery refused: unknown machine or invalid recovery token")]
    Refused(RecoveryProblem),
    #[error("this machine is revoked; an administrator must restore it before it can recover")]
    MachineRevoked,
    #[error("csr: {0}")]
    Csr(PkiError),
    #[error("another enrollment, renewal or recovery of this machine is in progress; retry")]
    Concurrent,
    #[error("certificate issuance failed")]
    Pki(PkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RecoverError {
    /// Stable code for the JSON error body and the audit trail.
    pub fn code(&self) -> ErrorCode {
        match self {
            RecoverError::Refused(_) => ErrorCode::RecoveryRefused,
            RecoverError::MachineRevoked => ErrorCode::MachineRevoked,
            RecoverError::Csr(_) => ErrorCode::InvalidCsr,
            RecoverError::Concurrent => ErrorCode::ConcurrentEnrollment,
            RecoverError::Pki(_) | RecoverError::Store(_) => ErrorCode::InternalError,
        }
    }
}

impl From<IssueError> for RecoverError {
    fn from(e: IssueError) -> Self {
        match e {
            IssueError::Concurrent | IssueError::PresentedNotActive => RecoverError::Concurrent,
            IssueError::Pki(e) => RecoverError::Pki(e),
            IssueError::Store(e) => RecoverError::Store(e),
        }
    }
}

/// `POST /api/public/recover`.
pub async fn recover(
    state: &AppState,
    req: RecoverRequest,
    remote: IpAddr,
) -> Result<RecoverResponse, RecoverError> {
    let actor = format!("recover:{remote}");
    let machine_id = req.machine_id.to_string();
    let result = recover_inner(state, &req, &machine_id, &actor).await;
    if let Err(e) = &result {
        // Refusals are audited outside the (rolled back) transaction; never the token.
        let details = match e {
            RecoverError::Refused(problem) => json!({"cause": problem.as_str()}),
            _ => json!({}),
        };
        let event = NewAuditEvent::refused(
            &actor,
            "machine.recover",
            Some(&machine_id),
            details,
            e.code().as_str(),
        );
        audit::insert(state.store.pool(), &event).await?;
    }
    result
}

async fn recover_inner(
    state: &AppState,
    req: &RecoverRequest,
    machine_id: &str,
    actor: &str,
) -> Result<RecoverResponse, RecoverError> {
    let csr = MachineCsr::parse_pem(&req.csr).map_err(RecoverError::Csr)?;
    let token_hash = credential_hash(&req.recovery_token);
    let (next_token, next_hash) = new_credential(RECOVERY_TOKEN_PREFIX);
    let now = Timestamp::now();

    let mut tx = state.store.begin_write().await?;
    // First statement is a write: it takes the machine's row lock (SQLite: the write lock),
    // so a concurrent request with the same token waits here and then finds it spent.
    let Some(client_id) =
        machines::consume_recovery_token(&mut tx, machine_id, &token_hash, &next_hash, now).await?
    else {
        tx.rollback().await?;
        return Err(
            match machines::diagnose_recovery(state.store.pool(), machine_id, &token_hash).await? {
                RecoveryProblem::Revoked => RecoverError::MachineRevoked,
                problem => RecoverError::Refused(problem),
            },
        );
    };
    let identity = identity_of(&client_id, machine_id)?;
    let invalidated = secrets::invalidate_pending(&mut tx, machine_id, now).await?;
    machines::set_rotation_requested(&mut tx, machine_id, Some(now)).await?;
    let issuance = Issuance {
        actor,
        action: "machine.recover",
        details: json!({
            "client_id": client_id, "invalidated_pending_versions": invalidated,
            "rotation_requested": true,
        }),
        now,
        presented: None,
    };
    let issued =
        certificates::issue(state, &mut tx, &identity, MachineKey::Csr(&csr), issuance).await?;
    tx.commit().await?;
    state.changes.note_machine_write(machine_id);

    Ok(RecoverResponse {
        client_id: identity.client_id,
        machine_id: identity.machine_id,
        certificate: issued.pem,
        serial: issued.serial,
        expires_at: issued.expires_at.rfc3339(),
        ca_cert: state.keys.ca.cert_pem().to_string(),
        recovery_token: next_token.to_string(),
    })
}
