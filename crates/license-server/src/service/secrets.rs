//! The secret lifecycle, server side: rotation and acknowledgement for an authenticated machine
//! (agent listener), its secret status, and the administrator's forced rotation and
//! invalidation.
//!
//! A rotation is idempotent: while a version is pending (issued, not acknowledged), every
//! rotate request gets that same version back — same secret, same dates, freshly sealed to the
//! machine's key — so a lost answer is re-sent, never replaced. The agent acknowledges once the
//! secret is durable (`/rotate-secret/ack`, or implicitly by naming it as its current version
//! in the next rotate request); then the pending version becomes active and the previous active
//! one enters grace with its dates unchanged. Secrets are stored encrypted under the current
//! master key (AAD = machine id's 16 bytes || version, big-endian; see `keys` for rollover) and
//! exist in clear only inside [`Secret`], which zeroizes itself and never prints.

use license_protocol::agent_api::SecretStatus;
use license_protocol::error::ErrorCode;
use license_protocol::identity::{MachineId, MachineIdentity};
use license_protocol::rotation::{
    AckRequest, RotateSecretRequest, RotateSecretResponse, SignatureError, MAX_CLOCK_SKEW_SECS,
};
use license_protocol::secret::{self, Secret, SecretDates};
use p256::pkcs8::DecodePublicKey as _;
use serde_json::{json, Value};
use sqlx::AnyConnection;

use super::admin::{parse_id, Admin, AdminError};
use super::AppState;
use crate::clock::Timestamp;
use crate::master_keys::MasterKey;
use crate::store::audit::{self, NewAuditEvent};
use crate::store::machines::{self, MachineRecord};
use crate::store::secrets::{
    self as stored, version_to_db, NewSecret, SealedSecretRow, SecretRecord, SecretState,
};
use crate::store::{nonces, StoreError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RotationError {
    #[error("agent_id is not the machine of the presented certificate")]
    AgentIdMismatch,
    #[error("timestamp is more than {MAX_CLOCK_SKEW_SECS} s away from the server's clock")]
    StaleRequest,
    #[error("the request's signature does not verify with the certificate's key")]
    BadSignature,
    #[error("the certificate's key is not a P-256 key; secrets are delivered to P-256 keys only")]
    UnsupportedKey,
    #[error("this request's nonce was already used")]
    Replayed,
    #[error("secret version {0} is unknown to the server")]
    UnknownVersion(u64),
    #[error(
        "secret version {0} is {1}: only the pending or the active version can be acknowledged"
    )]
    NotPending(u64, &'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RotationError {
    /// Stable code for the JSON error body and the audit trail.
    pub fn code(&self) -> ErrorCode {
        match self {
            RotationError::AgentIdMismatch => ErrorCode::AgentIdMismatch,
            RotationError::StaleRequest => ErrorCode::StaleRequest,
            RotationError::BadSignature => ErrorCode::BadSignature,
            RotationError::UnsupportedKey => ErrorCode::UnsupportedKey,
            RotationError::Replayed => ErrorCode::ReplayedRequest,
            RotationError::UnknownVersion(_) => ErrorCode::UnknownVersion,
            RotationError::NotPending(..) => ErrorCode::VersionNotPending,
            RotationError::Store(_) => ErrorCode::InternalError,
        }
    }
}

/// Associated data of a secret encrypted at rest: machine id (16 bytes) || version (u64 BE).
pub fn at_rest_aad(machine_id: &MachineId, version: u64) -> [u8; 24] {
    let mut aad = [0u8; 24];
    aad[..16].copy_from_slice(machine_id.0.as_bytes());
    aad[16..].copy_from_slice(&version.to_be_bytes());
    aad
}

/// Decrypts a stored secret with the master keys held. The row's `master_key_id` names its
/// key, but rows reach here without it (and may be re-encrypted by a rollover between the read
/// and now), so the held keys are tried newest first — at most a few, and AES-GCM tells the
/// right one — then, once, after re-reading the key set. A failure means a corrupt row or a key
/// this data directory lacks; the error names the row, never any key material.
pub fn open_at_rest(
    state: &AppState,
    machine_id: &MachineId,
    row: &SealedSecretRow,
) -> Result<Secret, StoreError> {
    let version = row.record.version;
    let aad = at_rest_aad(machine_id, version);
    let ring = &state.keys.master_keys;
    let attempt = || {
        ring.snapshot()
            .keys()
            .iter()
            .rev()
            .find_map(|k| secret::decrypt_at_rest(k.bytes(), &row.secret_enc, &aad).ok())
    };
    attempt()
        .or_else(|| ring.reload_after_miss().then(attempt).flatten())
        .ok_or_else(|| {
            StoreError::Corrupt(format!(
                "secret version {version} of machine {machine_id} does not decrypt under any master key held ({})",
                ring.snapshot().ids().join(", ")
            ))
        })
}

/// The newest acknowledged version tokens may be issued under (active or grace, not past its
/// grace), with its secret.
pub fn current_secret(
    state: &AppState,
    machine_id: &MachineId,
    rows: &[SealedSecretRow],
    now: Timestamp,
) -> Result<Option<(u64, Secret)>, StoreError> {
    rows.iter()
        .rev()
        .find(|r| r.record.usable(now))
        .map(|r| Ok((r.record.version, open_at_rest(state, machine_id, r)?)))
        .transpose()
}

fn dates_of(record: &SecretRecord) -> SecretDates {
    SecretDates {
        valid_from: record.valid_from.0,
        valid_until: record.valid_until.0,
        grace_until: record.grace_until.0,
    }
}

/// The machine's request, checked before any database work: identity, freshness, signature.
/// Returns the machine's public key, the one the secret is sealed to.
fn check_request(
    identity: &MachineIdentity,
    spki_der: &[u8],
    req: &RotateSecretRequest,
    now: Timestamp,
) -> Result<p256::PublicKey, RotationError> {
    if req.agent_id != identity.machine_id {
        return Err(RotationError::AgentIdMismatch);
    }
    if req.timestamp.abs_diff(now.0) > MAX_CLOCK_SKEW_SECS.unsigned_abs() {
        return Err(RotationError::StaleRequest);
    }
    req.verify(spki_der).map_err(|e| match e {
        SignatureError::UnsupportedKey => RotationError::UnsupportedKey,
        _ => RotationError::BadSignature,
    })?;
    p256::PublicKey::from_public_key_der(spki_der).map_err(|_| RotationError::UnsupportedKey)
}

/// Audits a refusal on its own (outside any transaction, or after its rollback).
async fn audit_refusal(
    state: &AppState,
    actor: &str,
    action: &str,
    target: &str,
    details: Value,
    error: &RotationError,
) -> Result<(), StoreError> {
    let event = NewAuditEvent::refused(actor, action, Some(target), details, error.code().as_str());
    audit::insert(state.store.pool(), &event).await
}

/// Destroys the secrets past their grace (of one machine, or of all) and audits it, inside the
/// caller's transaction. DESIGN.md §2: a version past `grace_until` is gone.
async fn destroy_expired(
    conn: &mut AnyConnection,
    machine_id: Option<&str>,
    now: Timestamp,
) -> Result<usize, StoreError> {
    let destroyed = stored::destroy_expired(conn, machine_id, now).await?;
    let mut by_machine = std::collections::BTreeMap::<&str, Vec<u64>>::new();
    for (machine, version) in &destroyed {
        by_machine.entry(machine).or_default().push(*version);
    }
    for (machine, versions) in &by_machine {
        tracing::info!(machine_id = %machine, ?versions, "secrets past their grace destroyed");
        let details = json!({"versions": versions});
        let event =
            NewAuditEvent::success(now, "server", "secret.destroyed", Some(machine), details);
        audit::insert(&mut *conn, &event).await?;
    }
    Ok(destroyed.len())
}

/// Destroys every machine's secrets past their grace (the server's periodic sweep).
pub async fn sweep_expired(state: &AppState) -> Result<usize, StoreError> {
    let mut tx = state.store.begin_write().await?;
    let destroyed = destroy_expired(&mut tx, None, Timestamp::now()).await?;
    tx.commit().await?;
    Ok(destroyed)
}

/// `POST /api/v1/rotate-secret` for an authenticated machine whose certificate carries
/// `spki_der`.
pub async fn rotate(
    state: &AppState,
    identity: &MachineIdentity,
    spki_der: &[u8],
    req: &RotateSecretRequest,
) -> Result<RotateSecretResponse, RotationError> {
    let machine_id = identity.machine_id.to_string();
    let actor = format!("machine:{machine_id}");
    let details = json!({"current_secret_version": req.current_secret_version, "nonce": req.nonce.to_string()});
    let now = Timestamp::now();
    let recipient = match check_request(identity, spki_der, req, now) {
        Ok(key) => key,
        Err(e) => {
            audit_refusal(state, &actor, "secret.rotate", &machine_id, details, &e).await?;
            return Err(e);
        }
    };

    let mut tx = state.store.begin_write().await?;
    if !machines::lock(&mut tx, &machine_id).await? {
        tx.rollback().await?;
        return Err(StoreError::Corrupt(format!("machine {machine_id} vanished")).into());
    }
    // Before any secret row is touched: the key a new version would be sealed under, locked
    // against a rollover until this transaction ends (`keys::seal_key`).
    let seal_key = super::keys::seal_key(state, &mut tx).await?;
    if !nonces::insert(&mut tx, &machine_id, &req.nonce.to_string(), now).await? {
        tx.rollback().await?;
        let e = RotationError::Replayed;
        audit_refusal(state, &actor, "secret.rotate", &machine_id, details, &e).await?;
        return Err(e);
    }
    // Requests older than the skew window are refused for their timestamp, so their nonces
    // need not be kept; 2× leaves room for the clocks of several replicas.
    nonces::purge(
        &mut tx,
        &machine_id,
        now.plus_secs(-2 * MAX_CLOCK_SKEW_SECS),
    )
    .await?;
    destroy_expired(&mut tx, Some(&machine_id), now).await?;

    let outcome = rotate_in(state, &mut tx, &identity.machine_id, req, &seal_key, now).await;
    let (result, outcome_name, details) = match outcome {
        Ok((version, dates, secret, mut extra)) => {
            let blob = secret::seal(&recipient, &identity.machine_id, version, &dates, &secret);
            let response = RotateSecretResponse::new_signed(
                state.keys.license_keys.snapshot().keys.signing_key(),
                &identity.machine_id,
                version,
                dates,
                &blob,
            );
            extra["current_secret_version"] = json!(req.current_secret_version);
            extra["nonce"] = json!(req.nonce.to_string());
            (Ok(response), "success", extra)
        }
        Err(RotationError::Store(e)) => {
            tx.rollback().await?;
            return Err(e.into());
        }
        // A refusal on the merits happens before any write but the nonce's, and keeps it.
        Err(e) => {
            let mut details = details;
            details["reason"] = json!(e.code());
            (Err(e), "refused", details)
        }
    };
    let event = NewAuditEvent {
        at: now,
        actor: &actor,
        action: "secret.rotate",
        target: Some(&machine_id),
        outcome: outcome_name,
        details,
    };
    audit::insert(&mut *tx, &event).await?;
    tx.commit().await?;
    state.changes.note_machine_write(&machine_id);
    // Test hook: the server dies after committing a version and before answering, as a
    // `kill -9` would; the agent's retry must get the same version back.
    if result.is_ok()
        && std::env::var("LICENSE_SERVER_TEST_CRASH_AT").is_ok_and(|v| v == "rotate_after_commit")
    {
        eprintln!("license-server: test crash after committing a rotation");
        std::process::abort();
    }
    if let Ok(r) = &result {
        tracing::info!(%machine_id, version = r.secret_version, "secret version delivered");
    }
    result
}

/// Inside the rotation transaction: the version to deliver, its dates and its secret, and the
/// audit details (never secret material).
async fn rotate_in(
    state: &AppState,
    conn: &mut AnyConnection,
    machine: &MachineId,
    req: &RotateSecretRequest,
    seal_key: &MasterKey,
    now: Timestamp,
) -> Result<(u64, SecretDates, Secret, Value), RotationError> {
    let machine_id = machine.to_string();
    let rows = stored::of_machine(&mut *conn, &machine_id, now).await?;
    let newest = rows.last().map_or(0, |r| r.record.version);
    if req.current_secret_version > newest {
        return Err(RotationError::UnknownVersion(req.current_secret_version));
    }
    let mut implicit_ack = None;
    if let Some(pending) = rows.iter().find(|r| r.record.state == SecretState::Pending) {
        let version = pending.record.version;
        if req.current_secret_version == version {
            // The agent holds the pending version durably: that is an acknowledgement.
            promote(conn, &machine_id, version, now).await?;
            implicit_ack = Some(version);
        } else {
            // The answer was lost (or not yet acted on): the same version again.
            let secret = open_at_rest(state, machine, pending)?;
            return Ok((
                version,
                dates_of(&pending.record),
                secret,
                json!({"version": version, "resent": true}),
            ));
        }
    }
    let version = newest + 1;
    let db_version = version_to_db(version).ok_or(RotationError::UnknownVersion(version))?;
    let valid_until = now.plus_secs(state.settings.secret_validity_secs);
    let grace_until = valid_until.plus_secs(state.settings.secret_grace_secs);
    let dates = SecretDates {
        valid_from: now.0,
        valid_until: valid_until.0,
        grace_until: grace_until.0,
    };
    let secret = Secret::generate();
    let secret_enc =
        secret::encrypt_at_rest(seal_key.bytes(), &secret, &at_rest_aad(machine, version));
    stored::insert_pending(
        conn,
        &NewSecret {
            machine_id: &machine_id,
            version: db_version,
            secret_enc: &secret_enc,
            master_key_id: &seal_key.id,
            valid_from: now,
            valid_until,
            grace_until,
            created_at: now,
        },
    )
    .await?;
    Ok((
        version,
        dates,
        secret,
        json!({"version": version, "resent": false, "implicit_ack": implicit_ack,
               "valid_until": valid_until.0, "grace_until": grace_until.0}),
    ))
}

/// The pending `version` becomes active, the active one (if any) enters grace, and the
/// machine's rotation request is satisfied. Returns the version that entered grace.
async fn promote(
    conn: &mut AnyConnection,
    machine_id: &str,
    version: u64,
    now: Timestamp,
) -> Result<Option<i64>, RotationError> {
    let db_version = version_to_db(version).ok_or(RotationError::UnknownVersion(version))?;
    // Demote first: at most one active version per machine is a unique index.
    let previous = stored::demote_active(conn, machine_id).await?;
    if !stored::activate_pending(conn, machine_id, db_version, now).await? {
        // Callers hold the machine lock and just read this version as pending.
        return Err(StoreError::Corrupt(format!(
            "secret version {version} of machine {machine_id} is no longer pending"
        ))
        .into());
    }
    machines::set_rotation_requested(conn, machine_id, None).await?;
    Ok(previous)
}

/// `POST /api/v1/rotate-secret/ack`: the machine holds `secret_version` durably.
pub async fn ack(
    state: &AppState,
    identity: &MachineIdentity,
    req: &AckRequest,
    certificate_expires_at: Timestamp,
) -> Result<SecretStatus, RotationError> {
    let machine_id = identity.machine_id.to_string();
    let actor = format!("machine:{machine_id}");
    let version = req.secret_version;
    let now = Timestamp::now();
    let mut tx = state.store.begin_write().await?;
    let result = async {
        if !machines::lock(&mut tx, &machine_id).await? {
            return Err(StoreError::Corrupt(format!("machine {machine_id} vanished")).into());
        }
        let rows = stored::of_machine(&mut *tx, &machine_id, now).await?;
        let row = rows
            .iter()
            .find(|r| r.record.version == version)
            .ok_or(RotationError::UnknownVersion(version))?;
        match row.record.state {
            SecretState::Pending => {
                let previous = promote(&mut tx, &machine_id, version, now).await?;
                Ok(json!({"version": version, "previous_active": previous, "noop": false}))
            }
            SecretState::Active => Ok(json!({"version": version, "noop": true})),
            other => Err(RotationError::NotPending(version, other.as_str())),
        }
    }
    .await;
    match result {
        Ok(details) => {
            let event =
                NewAuditEvent::success(now, &actor, "secret.ack", Some(&machine_id), details);
            audit::insert(&mut *tx, &event).await?;
            tx.commit().await?;
            state.changes.note_machine_write(&machine_id);
        }
        Err(e) => {
            tx.rollback().await?;
            if !matches!(e, RotationError::Store(_)) {
                let details = json!({"version": version});
                audit_refusal(state, &actor, "secret.ack", &machine_id, details, &e).await?;
            }
            return Err(e);
        }
    }
    tracing::info!(%machine_id, version, "secret version acknowledged");
    Ok(status(state, identity, certificate_expires_at).await?)
}

/// The secret status of a machine, read from the primary (after a write of its own).
pub async fn status(
    state: &AppState,
    identity: &MachineIdentity,
    certificate_expires_at: Timestamp,
) -> Result<SecretStatus, StoreError> {
    status_on(state, state.store.pool(), identity, certificate_expires_at)
        .await?
        .ok_or_else(|| StoreError::Corrupt(format!("machine {} vanished", identity.machine_id)))
}

/// `GET /api/v1/secret-status`, read on `pool` (the primary or the read replica, see
/// `service::reads`); `None` when the machine is not there.
pub async fn status_on(
    state: &AppState,
    pool: &sqlx::AnyPool,
    identity: &MachineIdentity,
    certificate_expires_at: Timestamp,
) -> Result<Option<SecretStatus>, StoreError> {
    let machine_id = identity.machine_id.to_string();
    let now = Timestamp::now();
    let Some(machine) = machines::get(pool, &machine_id).await? else {
        return Ok(None);
    };
    let rows = stored::of_machine(pool, &machine_id, now).await?;
    let current = rows
        .iter()
        .rev()
        .map(|r| &r.record)
        .find(|r| r.acked_at.is_some());
    let state_name = match current {
        None => "none",
        Some(r) if r.state == SecretState::Invalidated => "invalidated",
        Some(r) if r.state == SecretState::Grace || now > r.valid_until => "grace",
        Some(_) => "active",
    };
    Ok(Some(SecretStatus {
        client_id: identity.client_id,
        machine_id: identity.machine_id,
        current_version: current.map(|r| r.version),
        state: state_name.to_string(),
        valid_until: current.map(|r| r.valid_until.0),
        grace_until: current.map(|r| r.grace_until.0),
        pending_version: rows
            .iter()
            .find(|r| r.record.state == SecretState::Pending)
            .map(|r| r.record.version),
        rotation_requested: machine.rotation_requested_at.is_some(),
        invalidated_versions: rows
            .iter()
            .filter(|r| r.record.state == SecretState::Invalidated)
            .map(|r| r.record.version)
            .collect(),
        certificate_expires_at: certificate_expires_at.rfc3339(),
        server_time: Some(now.0),
        license_keys: Some(state.keys.license_keys.snapshot().digest.clone()),
        server_trust: Some(state.keys.trust.digest.clone()),
        update: None,
        watch_cursor: None,
    }))
}

// ---------------------------------------------------------------------------------------------
// Administration
// ---------------------------------------------------------------------------------------------

impl Admin<'_> {
    /// The secret versions of a machine (dates and states; never the secrets).
    pub async fn list_secrets(&self, machine_id: &str) -> Result<Vec<SecretRecord>, AdminError> {
        self.get_machine(machine_id).await?;
        Ok(
            stored::of_machine(self.store().pool(), machine_id, Timestamp::now())
                .await?
                .into_iter()
                .map(|r| r.record)
                .collect(),
        )
    }

    /// Asks the machine to rotate now: `rotation_requested` in its secret status until it
    /// acknowledges a new version.
    pub async fn request_rotation(&self, machine_id: &str) -> Result<MachineRecord, AdminError> {
        let mut tx = self.begin().await?;
        let result = async {
            let _: MachineId = parse_id("machine_id", machine_id)?;
            let found =
                machines::set_rotation_requested(&mut tx, machine_id, Some(Timestamp::now()))
                    .await?;
            found
                .then_some(())
                .ok_or_else(|| AdminError::machine_not_found(machine_id))
        }
        .await;
        self.finish(tx, "machine.rotate", Some(machine_id), json!({}), result)
            .await?;
        self.get_machine(machine_id).await
    }

    /// Invalidates one secret version of a machine: tokens under it fail online validation
    /// (`secret_invalidated`) and the agent drops it when it sees it in its secret status.
    /// Invalidating the active or pending version also requests a rotation, so the machine
    /// gets a usable secret again.
    pub async fn invalidate_secret(
        &self,
        machine_id: &str,
        version: u64,
    ) -> Result<SecretRecord, AdminError> {
        let mut tx = self.begin().await?;
        let now = Timestamp::now();
        let result = async {
            let machine: MachineId = parse_id("machine_id", machine_id)?;
            let not_found = || AdminError::NotFound {
                what: "secret version",
                id: format!("{machine}/{version}"),
            };
            if !machines::lock(&mut tx, machine_id).await? {
                return Err(AdminError::machine_not_found(machine_id));
            }
            let db_version = version_to_db(version).ok_or_else(not_found)?;
            let rows = stored::of_machine(&mut *tx, machine_id, now).await?;
            let row = rows
                .iter()
                .find(|r| r.record.version == version)
                .ok_or_else(not_found)?;
            let was = row.record.state;
            if was == SecretState::Invalidated {
                return Err(AdminError::Conflict(format!(
                    "secret version {version} of machine {machine_id} is already invalidated"
                )));
            }
            stored::invalidate(&mut tx, machine_id, db_version, now).await?;
            let rotation_requested = matches!(was, SecretState::Active | SecretState::Pending);
            if rotation_requested {
                machines::set_rotation_requested(&mut tx, machine_id, Some(now)).await?;
            }
            Ok((was, rotation_requested))
        }
        .await;
        let details = match &result {
            Ok((was, rotation_requested)) => {
                json!({"version": version, "was": was.as_str(), "rotation_requested": rotation_requested})
            }
            Err(_) => json!({"version": version}),
        };
        self.finish(tx, "secret.invalidate", Some(machine_id), details, result)
            .await?;
        self.list_secrets(machine_id)
            .await?
            .into_iter()
            .find(|r| r.version == version)
            .ok_or_else(|| AdminError::NotFound {
                what: "secret version",
                id: format!("{machine_id}/{version}"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aad_binds_machine_and_version() {
        let m = MachineId::new_random();
        let a = at_rest_aad(&m, 1);
        assert_eq!(&a[..16], m.0.as_bytes());
        assert_eq!(&a[16..], &1u64.to_be_bytes());
        assert_ne!(a, at_rest_aad(&m, 2));
        assert_ne!(a, at_rest_aad(&MachineId::new_random(), 1));
    }
}
