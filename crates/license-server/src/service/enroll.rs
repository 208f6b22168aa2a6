//! Bootstrap enrollment and per-machine certificate renewal.
//!
//! Renewal (`POST /api/v1/renew-certificate`) is proven by the certificate the request is made
//! with: normally the machine's active one, also after its expiry within
//! `certificate_renew_after_expiry_days` (the listener checks the window). A renewal whose
//! answer was lost (the agent crashed before saving it) is retried with the old, now superseded
//! certificate and the same CSR: when the CSR's key is the key of the machine's active
//! certificate, that certificate is answered again, nothing new is issued.
//!
//! Enrollment is one transaction: consume the install token (atomically: of two concurrent
//! requests with one token exactly one proceeds), find or create the machine by
//! `(client_id, hardware_id)`, then supersede its current certificate, store the new one and
//! audit ([`super::certificates::issue`], which renewal uses too).
//! If any step fails the token stays unused. The CSR is checked before the transaction so a
//! bad request never burns a token. Every enrollment also mints the machine's recovery token
//! (see [`super::recover`]) in the same transaction, replacing any previous one; only its hash
//! is stored, and it is never logged or audited.

use std::net::IpAddr;

use license_protocol::agent_api::RenewCertificateResponse;
use license_protocol::enroll::{BootstrapRequest, BootstrapResponse};
use license_protocol::error::ErrorCode;
use license_protocol::identity::{MachineId, MachineIdentity};
use serde_json::json;

use super::certificates::{self, identity_of, Issuance, IssueError};
use super::{credential_hash, new_credential, AppState};
use crate::clock::Timestamp;
use crate::pki::{MachineCsr, MachineKey, PkiError};
use crate::store::audit::{self, NewAuditEvent};
use crate::store::certificates as certificates_store;
use crate::store::install_tokens::{self, TokenProblem};
use crate::store::{machines, secrets, StoreError};

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
    /// The hardware id is another enrolled machine's, and the request neither is signed by
    /// that machine's key nor uses an install token bound to it.
    #[error(
        "a machine with this hardware id is already enrolled: re-enroll it from that machine \
         (its key signs the request: `license-agent enroll --force`) or with an install token \
         bound to it (`admin token create --client C --machine M`)"
    )]
    AlreadyEnrolled {
        /// The machine that would have been taken over (audit only).
        machine_id: Option<String>,
        /// Why the takeover was refused (audit only).
        cause: &'static str,
    },
    #[error("csr: {0}")]
    Csr(PkiError),
    #[error("another enrollment of this machine is in progress; retry")]
    Concurrent,
    #[error(
        "this certificate was replaced by a newer one, and the CSR is not for the key of the \
         machine's current certificate"
    )]
    CertificateSuperseded,
    #[error("certificate issuance failed")]
    Pki(PkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl EnrollError {
    /// Stable code for the JSON error body and the audit trail.
    pub fn code(&self) -> ErrorCode {
        match self {
            EnrollError::TokenUnknown => ErrorCode::TokenUnknown,
            EnrollError::TokenAlreadyUsed => ErrorCode::TokenAlreadyUsed,
            EnrollError::TokenExpired => ErrorCode::TokenExpired,
            EnrollError::MachineRevoked => ErrorCode::MachineRevoked,
            EnrollError::AlreadyEnrolled { .. } => ErrorCode::MachineAlreadyEnrolled,
            EnrollError::Csr(_) => ErrorCode::InvalidCsr,
            EnrollError::Concurrent => ErrorCode::ConcurrentEnrollment,
            EnrollError::CertificateSuperseded => ErrorCode::CertificateSuperseded,
            EnrollError::Pki(_) | EnrollError::Store(_) => ErrorCode::InternalError,
        }
    }
}

impl From<IssueError> for EnrollError {
    fn from(e: IssueError) -> Self {
        match e {
            IssueError::Concurrent => EnrollError::Concurrent,
            IssueError::PresentedNotActive => EnrollError::CertificateSuperseded,
            IssueError::Pki(e) => EnrollError::Pki(e),
            IssueError::Store(e) => EnrollError::Store(e),
        }
    }
}

/// Prefix of recovery tokens, so a leaked one is easy to grep for.
pub const RECOVERY_TOKEN_PREFIX: &str = "lrt_";

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
        let mut details =
            json!({"hostname": req.hostname.as_str(), "hardware_id": req.hardware_id.as_str()});
        let mut target = None;
        if let EnrollError::AlreadyEnrolled { machine_id, cause } = e {
            details["cause"] = json!(cause);
            target = machine_id.as_deref();
        }
        let event =
            NewAuditEvent::refused(&actor, "machine.enroll", target, details, e.code().as_str());
        audit::insert(state.store.pool(), &event).await?;
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
    let Some(token) = install_tokens::consume(&mut tx, &token_hash, now).await? else {
        tx.rollback().await?;
        return Err(
            match install_tokens::diagnose(state.store.pool(), &token_hash, now).await? {
                TokenProblem::Unknown => EnrollError::TokenUnknown,
                TokenProblem::AlreadyUsed => EnrollError::TokenAlreadyUsed,
                TokenProblem::Expired => EnrollError::TokenExpired,
            },
        );
    };
    let (token_id, client_id) = (token.id, token.client_id);
    let (enrolled, takeover) = match token.machine_id {
        Some(bound) => {
            let enrolled = machines::rebind(
                &mut tx,
                &bound,
                &client_id,
                req.hostname.as_str(),
                req.hardware_id.as_str(),
                req.arch.as_str(),
                now,
            )
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => EnrollError::AlreadyEnrolled {
                    machine_id: None,
                    cause: "bound_token_hardware_id_taken",
                },
                other => EnrollError::Store(other),
            })?
            // The machine was purged since the token was made.
            .ok_or(EnrollError::TokenUnknown)?;
            (enrolled, Takeover::BoundToken)
        }
        None => {
            let enrolled = machines::upsert(
                &mut tx,
                &MachineId::new_random().to_string(),
                &client_id,
                req.hostname.as_str(),
                req.hardware_id.as_str(),
                req.arch.as_str(),
                now,
            )
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => EnrollError::Concurrent,
                other => EnrollError::Store(other),
            })?;
            if enrolled.created {
                (enrolled, Takeover::NewMachine)
            } else {
                if !enrolled.revoked {
                    check_previous_key(&mut tx, req, &enrolled.id).await?;
                }
                (enrolled, Takeover::PreviousKey)
            }
        }
    };
    if enrolled.revoked {
        tx.rollback().await?;
        return Err(EnrollError::MachineRevoked);
    }
    let machine_id = enrolled.id;
    // A secret issued to the previous key is never delivered to the new one: its pending
    // version is invalidated and a rotation requested, as in recovery.
    let mut invalidated = Vec::new();
    if takeover != Takeover::NewMachine {
        invalidated = secrets::invalidate_pending(&mut tx, &machine_id, now).await?;
        machines::set_rotation_requested(&mut tx, &machine_id, Some(now)).await?;
    }
    let identity = identity_of(&client_id, &machine_id)?;
    let (recovery_token, recovery_hash) = new_credential(RECOVERY_TOKEN_PREFIX);
    machines::set_recovery_hash(&mut tx, &machine_id, &recovery_hash).await?;
    install_tokens::mark_machine(&mut tx, &token_id, &machine_id).await?;
    let key = match (&csr, &generated) {
        (Some(csr), _) => MachineKey::Csr(csr),
        (None, Some(pair)) => MachineKey::ServerGenerated(pair),
        (None, None) => unreachable!("a key is generated whenever no CSR is sent"),
    };
    let issuance = Issuance {
        actor,
        action: "machine.enroll",
        details: json!({
            "client_id": client_id, "token_id": token_id, "hostname": req.hostname.as_str(),
            "hardware_id": req.hardware_id.as_str(), "arch": req.arch.as_str(),
            "key_origin": certificates::key_origin(&key),
            "reenrollment": takeover.as_str(), "invalidated_pending_versions": invalidated,
        }),
        now,
        presented: None,
    };
    let issued = certificates::issue(state, &mut tx, &identity, key, issuance).await?;
    tx.commit().await?;
    state.changes.note_machine_write(&machine_id);

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
        license_public_key: state.keys.license_keys.snapshot().keys.current_public_key(),
    })
}

/// How an enrollment came to its machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Takeover {
    /// A hardware id the client had no machine for.
    NewMachine,
    /// A known machine, the request signed by the key of its latest certificate.
    PreviousKey,
    /// A known machine, with an install token an administrator bound to it.
    BoundToken,
}

impl Takeover {
    fn as_str(self) -> &'static str {
        match self {
            Takeover::NewMachine => "new_machine",
            Takeover::PreviousKey => "previous_key",
            Takeover::BoundToken => "bound_token",
        }
    }
}

/// A request for a hardware id the client already has a machine for may take that machine
/// over only with a signature by the key of the machine's latest certificate (not a revoked
/// one): anyone can read a till's hardware id, only the till holds its key.
async fn check_previous_key(
    conn: &mut sqlx::AnyConnection,
    req: &BootstrapRequest,
    machine_id: &str,
) -> Result<(), EnrollError> {
    let refuse = |cause| EnrollError::AlreadyEnrolled {
        machine_id: Some(machine_id.to_string()),
        cause,
    };
    if req.previous_key_signature.is_none() {
        return Err(refuse("no_previous_key_signature"));
    }
    let Some((pem, revoked)) = certificates_store::latest_of(&mut *conn, machine_id).await? else {
        return Err(refuse("no_certificate"));
    };
    if revoked {
        return Err(refuse("previous_certificate_revoked"));
    }
    let spki = crate::pki::spki_der_of_pem(&pem).map_err(EnrollError::Pki)?;
    req.verify_previous_key(&spki)
        .map_err(|_| refuse("bad_previous_key_signature"))
}

/// The certificate a renewal request was made with, as the agent listener found it.
#[derive(Debug, Clone, Copy)]
pub struct PresentedCertificate<'a> {
    pub serial: &'a str,
    /// When it expired, if it has (the listener already refused it past the window).
    pub expired_since: Option<Timestamp>,
    /// It was superseded: only a retry for the key of the machine's active certificate is
    /// answered.
    pub superseded: bool,
}

/// `POST /api/v1/renew-certificate` for an authenticated machine: a new certificate for the
/// key in `csr_pem`; the one the request was made with is superseded in the same transaction.
/// With a superseded certificate, the retry rule of the module documentation applies.
pub async fn renew(
    state: &AppState,
    identity: &MachineIdentity,
    presented: PresentedCertificate<'_>,
    csr_pem: &str,
) -> Result<RenewCertificateResponse, EnrollError> {
    let machine_id = identity.machine_id.to_string();
    let actor = format!("machine:{machine_id}");
    let details = json!({
        "presented_serial": presented.serial,
        "expired_since": presented.expired_since.map(Timestamp::rfc3339),
    });
    let refused = |err: EnrollError| {
        let event = NewAuditEvent::refused(
            &actor,
            "certificate.renew",
            Some(&machine_id),
            details.clone(),
            err.code().as_str(),
        );
        async move {
            audit::insert(state.store.pool(), &event).await?;
            Err::<RenewCertificateResponse, _>(err)
        }
    };
    let csr = match MachineCsr::parse_pem(csr_pem) {
        Ok(csr) => csr,
        Err(e) => return refused(EnrollError::Csr(e)).await,
    };
    if !presented.superseded {
        let issuance = Issuance {
            actor: &actor,
            action: "certificate.renew",
            details: details.clone(),
            now: Timestamp::now(),
            presented: Some(presented.serial),
        };
        let mut tx = state.store.begin_write().await?;
        match certificates::issue(state, &mut tx, identity, MachineKey::Csr(&csr), issuance).await {
            Ok(issued) => {
                tx.commit().await?;
                state
                    .changes
                    .note_machine_write(&identity.machine_id.to_string());
                return Ok(RenewCertificateResponse {
                    certificate: issued.pem,
                    serial: issued.serial,
                    expires_at: issued.expires_at.rfc3339(),
                });
            }
            // Superseded since the listener looked (a concurrent renewal won): a retry.
            Err(IssueError::PresentedNotActive) => tx.rollback().await?,
            Err(e) => return Err(e.into()),
        }
    }
    // A retry: answer the active certificate again if the CSR is for its key.
    let active = certificates_store::active_of(state.store.pool(), &machine_id).await?;
    let same_key = match &active {
        Some(active) => {
            crate::pki::public_key_raw_of_pem(&active.pem).map_err(EnrollError::Pki)?
                == csr.public_key_raw()
        }
        None => false,
    };
    let Some(active) = active.filter(|_| same_key) else {
        return refused(EnrollError::CertificateSuperseded).await;
    };
    let mut details = details;
    details["serial"] = json!(active.serial);
    details["retry"] = json!(true);
    let event = NewAuditEvent::success(
        Timestamp::now(),
        &actor,
        "certificate.renew",
        Some(&machine_id),
        details,
    );
    audit::insert(state.store.pool(), &event).await?;
    Ok(RenewCertificateResponse {
        certificate: active.pem,
        serial: active.serial,
        expires_at: active.expires_at.rfc3339(),
    })
}
