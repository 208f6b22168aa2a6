//! Bootstrap enrollment and per-machine certificate renewal.
//!
//! Enrollment is one transaction: consume the install token (atomically: of two concurrent
//! requests with one token exactly one proceeds), find or create the machine by
//! `(client_id, hardware_id)`, supersede its current certificate, store the new one, audit.
//! If any step fails the token stays unused. The CSR is checked before the transaction so a
//! bad request never burns a token. Every enrollment also mints the machine's recovery token
//! (see [`super::recover`]) in the same transaction, replacing any previous one; only its hash
//! is stored, and it is never logged or audited.

use std::net::IpAddr;

use license_protocol::agent_api::RenewCertificateResponse;
use license_protocol::enroll::{BootstrapRequest, BootstrapResponse};
use license_protocol::identity::{ClientId, MachineId, MachineIdentity};
use serde_json::json;
use time::Duration;

use super::{credential_hash, new_credential, AppState};
use crate::clock::Timestamp;
use crate::pki::{MachineCsr, MachineKey, PkiError};
use crate::store::{self, NewAuditEvent, NewCertificate, Store, StoreError, TokenProblem};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    #[error("install token is unknown")]
    TokenUnknown,
    #[error("install token has already been used")]
    TokenAlreadyUsed,
    #[error("install token has expired")]
    TokenExpired,
    #[error(
        "this machine is revoked; an administrator must restore it before it can enroll again"
    )]
    MachineRevoked,
    #[error("csr: {0}")]
    Csr(PkiError),
    #[error("another enrollment of this machine is in progress; retry")]
    Concurrent,
    #[error("certificate issuance failed")]
    Pki(PkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl EnrollError {
    /// Stable code for the JSON error body and the audit trail.
    pub fn code(&self) -> &'static str {
        match self {
            EnrollError::TokenUnknown => "token_unknown",
            EnrollError::TokenAlreadyUsed => "token_already_used",
            EnrollError::TokenExpired => "token_expired",
            EnrollError::MachineRevoked => "machine_revoked",
            EnrollError::Csr(_) => "invalid_csr",
            EnrollError::Concurrent => "concurrent_enrollment",
            EnrollError::Pki(_) | EnrollError::Store(_) => "internal_error",
        }
    }
}

/// Prefix of recovery tokens, so a leaked one is easy to grep for.
pub const RECOVERY_TOKEN_PREFIX: &str = "lrt_";

pub(super) fn conflict_to_concurrent(e: StoreError) -> EnrollError {
    match e {
        StoreError::Conflict(_) => EnrollError::Concurrent,
        other => EnrollError::Store(other),
    }
}

/// `POST /api/public/bootstrap`.
pub async fn bootstrap(
    state: &AppState,
    req: BootstrapRequest,
    remote: IpAddr,
) -> Result<BootstrapResponse, EnrollError> {
    let actor = format!("bootstrap:{remote}");
    let result = bootstrap_inner(state, &req, &actor).await;
    if let Err(e) = &result {
        // Refusals are audited outside the (rolled back) transaction.
        let details = json!({"hostname": req.hostname.as_str(), "hardware_id": req.hardware_id.as_str(), "reason": e.code()});
        state
            .store
            .audit(&NewAuditEvent {
                at: Timestamp::now(),
                actor: &actor,
                action: "machine.enroll",
                target: None,
                outcome: "refused",
                details,
            })
            .await?;
    }
    result
}

async fn bootstrap_inner(
    state: &AppState,
    req: &BootstrapRequest,
    actor: &str,
) -> Result<BootstrapResponse, EnrollError> {
    let csr = req
        .csr
        .as_deref()
        .map(MachineCsr::parse_pem)
        .transpose()
        .map_err(EnrollError::Csr)?;
    let generated = match csr {
        Some(_) => None,
        None => {
            Some(rcgen::KeyPair::generate().map_err(|e| EnrollError::Pki(PkiError::Generate(e)))?)
        }
    };
    let token_hash = credential_hash(req.token.as_str());
    let now = Timestamp::now();

    let mut tx = state.store.begin_write().await?;
    // First statement is a write, so SQLite takes its write lock here and concurrent
    // enrollments queue (busy_timeout) instead of failing on a lock upgrade.
    let Some((token_id, client_id)) =
        store::consume_install_token(&mut tx, &token_hash, now).await?
    else {
        tx.rollback().await?;
        return Err(
            match state.store.diagnose_install_token(&token_hash, now).await? {
                TokenProblem::Unknown => EnrollError::TokenUnknown,
                TokenProblem::AlreadyUsed => EnrollError::TokenAlreadyUsed,
                TokenProblem::Expired => EnrollError::TokenExpired,
            },
        );
    };
    let (machine_id, revoked) = store::upsert_machine(
        &mut tx,
        &MachineId::new_random().to_string(),
        &client_id,
        req.hostname.as_str(),
        req.hardware_id.as_str(),
        req.arch.as_str(),
        now,
    )
    .await
    .map_err(conflict_to_concurrent)?;
    if revoked {
        tx.rollback().await?;
        return Err(EnrollError::MachineRevoked);
    }
    let identity = identity_of(&client_id, &machine_id)?;
    let (recovery_token, recovery_hash) = new_credential(RECOVERY_TOKEN_PREFIX);
    store::set_recovery_hash(&mut tx, &machine_id, &recovery_hash).await?;
    let superseded = store::supersede_active_certificate(&mut tx, &machine_id, now).await?;
    let key = match (&csr, &generated) {
        (Some(csr), _) => MachineKey::Csr(csr),
        (None, Some(pair)) => MachineKey::ServerGenerated(pair),
        (None, None) => unreachable!("a key is generated whenever no CSR is sent"),
    };
    let issued = state
        .keys
        .ca
        .issue_machine_certificate(
            &identity,
            key,
            Duration::days(state.settings.certificate_validity_days.into()),
        )
        .map_err(EnrollError::Pki)?;
    let key_origin = if csr.is_some() { "csr" } else { "server" };
    store::insert_active_certificate(
        &mut tx,
        &NewCertificate {
            serial: &issued.serial,
            machine_id: &machine_id,
            client_id: &client_id,
            key_origin,
            issued_at: issued.issued_at,
            expires_at: issued.expires_at,
            pem: &issued.pem,
        },
    )
    .await
    .map_err(conflict_to_concurrent)?;
    store::mark_install_token_machine(&mut tx, &token_id, &machine_id).await?;
    store::insert_audit(
        &mut tx,
        &NewAuditEvent {
            at: now,
            actor,
            action: "machine.enroll",
            target: Some(&machine_id),
            outcome: "success",
            details: json!({
                "client_id": client_id, "token_id": token_id, "serial": issued.serial,
                "hostname": req.hostname.as_str(), "hardware_id": req.hardware_id.as_str(),
                "arch": req.arch.as_str(), "key_origin": key_origin, "superseded": superseded,
            }),
        },
    )
    .await?;
    tx.commit().await?;

    let settings = &state.settings;
    Ok(BootstrapResponse {
        client_id: identity.client_id,
        machine_id: identity.machine_id,
        certificate: issued.pem,
        serial: issued.serial,
        private_key: generated.map(|k| k.serialize_pem()),
        recovery_token: Some(recovery_token.to_string()),
        ca_cert: state.keys.ca.cert_pem().to_string(),
        api_url: settings.agent_url.clone(),
        binary_url: format!(
            "{}/downloads/stable/license-agent-linux-{}",
            settings.public_url, req.arch
        ),
        expires_at: issued.expires_at.rfc3339(),
        server_pin: state.keys.server_pin,
        license_public_key: state.keys.license_public_key.clone(),
    })
}

pub(super) fn identity_of(
    client_id: &str,
    machine_id: &str,
) -> Result<MachineIdentity, EnrollError> {
    let parse_err =
        |what: &str| EnrollError::Store(StoreError::Corrupt(format!("{what} is not a UUID")));
    Ok(MachineIdentity {
        client_id: client_id
            .parse::<ClientId>()
            .map_err(|_| parse_err("client id"))?,
        machine_id: machine_id
            .parse::<MachineId>()
            .map_err(|_| parse_err("machine id"))?,
    })
}

/// `POST /api/v1/renew-certificate` for an authenticated machine: a new certificate for the
/// key in `csr_pem`; the one the request was made with is superseded in the same transaction.
pub async fn renew(
    state: &AppState,
    identity: &MachineIdentity,
    csr_pem: &str,
) -> Result<RenewCertificateResponse, EnrollError> {
    let machine_id = identity.machine_id.to_string();
    let client_id = identity.client_id.to_string();
    let actor = format!("machine:{machine_id}");
    let csr = match MachineCsr::parse_pem(csr_pem) {
        Ok(csr) => csr,
        Err(e) => {
            let err = EnrollError::Csr(e);
            audit_refusal(
                &state.store,
                &actor,
                "certificate.renew",
                &machine_id,
                err.code(),
            )
            .await?;
            return Err(err);
        }
    };
    let now = Timestamp::now();
    let mut tx = state.store.begin_write().await?;
    let superseded = store::supersede_active_certificate(&mut tx, &machine_id, now).await?;
    let issued = state
        .keys
        .ca
        .issue_machine_certificate(
            identity,
            MachineKey::Csr(&csr),
            Duration::days(state.settings.certificate_validity_days.into()),
        )
        .map_err(EnrollError::Pki)?;
    store::insert_active_certificate(
        &mut tx,
        &NewCertificate {
            serial: &issued.serial,
            machine_id: &machine_id,
            client_id: &client_id,
            key_origin: "csr",
            issued_at: issued.issued_at,
            expires_at: issued.expires_at,
            pem: &issued.pem,
        },
    )
    .await
    .map_err(conflict_to_concurrent)?;
    store::insert_audit(
        &mut tx,
        &NewAuditEvent {
            at: now,
            actor: &actor,
            action: "certificate.renew",
            target: Some(&machine_id),
            outcome: "success",
            details: json!({"serial": issued.serial, "superseded": superseded}),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(RenewCertificateResponse {
        certificate: issued.pem,
        serial: issued.serial,
        expires_at: issued.expires_at.rfc3339(),
    })
}

async fn audit_refusal(
    store: &Store,
    actor: &str,
    action: &str,
    target: &str,
    reason: &str,
) -> Result<(), StoreError> {
    store
        .audit(&NewAuditEvent {
            at: Timestamp::now(),
            actor,
            action,
            target: Some(target),
            outcome: "refused",
            details: json!({"reason": reason}),
        })
        .await
}
