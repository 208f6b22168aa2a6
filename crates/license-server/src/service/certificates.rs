//! Issuing a machine certificate and making it the machine's only active one: the step that
//! bootstrap enrollment, certificate renewal and recovery share.
//!
//! Inside the caller's transaction: supersede the machine's current certificate, have the CA
//! sign one for `key`, store it as active, and append the caller's audit row with the new
//! serial and the number of certificates superseded. At most one active certificate per
//! machine is a unique index, so a concurrent issuance for the same machine that committed
//! first makes this one fail with [`IssueError::Concurrent`] rather than leave two.

use license_protocol::identity::{ClientId, MachineId, MachineIdentity};
use serde_json::{json, Value};
use sqlx::AnyConnection;
use time::Duration;

use super::AppState;
use crate::clock::Timestamp;
use crate::pki::{IssuedCertificate, MachineKey, PkiError};
use crate::store::audit::{self, NewAuditEvent};
use crate::store::certificates::{self, NewCertificate};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// Another issuance for the same machine holds the active slot.
    #[error("another certificate of this machine is being issued")]
    Concurrent,
    /// The certificate a renewal was made with is no longer active (a concurrent renewal
    /// superseded it first, or it was revoked).
    #[error("the certificate this renewal was made with is no longer active")]
    PresentedNotActive,
    #[error("certificate issuance failed")]
    Pki(#[source] PkiError),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for IssueError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(_) => IssueError::Concurrent,
            other => IssueError::Store(other),
        }
    }
}

/// Who asks for the certificate and how the audit row names it.
#[derive(Debug)]
pub struct Issuance<'a> {
    pub actor: &'a str,
    /// `machine.enroll`, `certificate.renew` or `machine.recover`.
    pub action: &'a str,
    /// The caller's audit details; `serial` and `superseded` are added.
    pub details: Value,
    pub now: Timestamp,
    /// Renewal: serial of the certificate the request was made with, which must still be
    /// active; it is superseded first (so of two concurrent renewals one wins).
    pub presented: Option<&'a str>,
}

/// `key_origin` as stored: `csr` (the machine keeps its key) or `server` (generated here).
pub fn key_origin(key: &MachineKey<'_>) -> &'static str {
    match key {
        MachineKey::Csr(_) => "csr",
        MachineKey::ServerGenerated(_) => "server",
    }
}

/// Supersedes the machine's certificate, issues and stores the new one, audits; all in `conn`'s
/// transaction, which the caller commits.
pub async fn issue(
    state: &AppState,
    conn: &mut AnyConnection,
    identity: &MachineIdentity,
    key: MachineKey<'_>,
    issuance: Issuance<'_>,
) -> Result<IssuedCertificate, IssueError> {
    let machine_id = identity.machine_id.to_string();
    let now = issuance.now;
    let mut superseded = 0;
    if let Some(serial) = issuance.presented {
        if !certificates::supersede_serial(conn, serial, now).await? {
            return Err(IssueError::PresentedNotActive);
        }
        superseded += 1;
    }
    superseded += certificates::supersede_active(conn, &machine_id, now).await?;
    let origin = key_origin(&key);
    let issued = state
        .keys
        .ca
        .issue_machine_certificate(
            identity,
            key,
            Duration::seconds(state.settings.certificate_validity_secs),
        )
        .map_err(IssueError::Pki)?;
    certificates::insert_active(
        conn,
        &NewCertificate {
            serial: &issued.serial,
            machine_id: &machine_id,
            client_id: &identity.client_id.to_string(),
            key_origin: origin,
            issued_at: issued.issued_at,
            expires_at: issued.expires_at,
            pem: &issued.pem,
        },
    )
    .await?;
    let mut details = issuance.details;
    details["serial"] = json!(issued.serial);
    details["superseded"] = json!(superseded);
    let event = NewAuditEvent::success(
        now,
        issuance.actor,
        issuance.action,
        Some(&machine_id),
        details,
    );
    audit::insert(&mut *conn, &event)
        .await
        .map_err(IssueError::Store)?;
    Ok(issued)
}

/// The identity of a stored machine, from its two id columns.
pub fn identity_of(client_id: &str, machine_id: &str) -> Result<MachineIdentity, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("{what} is not a UUID"));
    Ok(MachineIdentity {
        client_id: client_id
            .parse::<ClientId>()
            .map_err(|_| corrupt("client id"))?,
        machine_id: machine_id
            .parse::<MachineId>()
            .map_err(|_| corrupt("machine id"))?,
    })
}
