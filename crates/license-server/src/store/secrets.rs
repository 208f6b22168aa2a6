//! Queries of the secret lifecycle and of licenses: per-machine secret versions (kept encrypted
//! under the master key), licenses, and the nonces of rotate requests (replay refusal).
//!
//! Like [`super::queries`], one set of SQL for SQLite and PostgreSQL. Reads are generic over
//! the executor so they run on the pool or inside a caller's transaction alike.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{Any, AnyConnection, Executor, Row as _};

use super::StoreError;
use crate::clock::Timestamp;

type Result<T> = std::result::Result<T, StoreError>;

fn ts(row: &AnyRow, col: &str) -> Result<Timestamp> {
    Ok(Timestamp(row.try_get::<i64, _>(col)?))
}

fn opt_ts(row: &AnyRow, col: &str) -> Result<Option<Timestamp>> {
    Ok(row.try_get::<Option<i64>, _>(col)?.map(Timestamp))
}

/// A protocol version number as stored (BIGINT). Versions the database could not hold are
/// versions it does not have.
pub fn version_to_db(version: u64) -> Option<i64> {
    i64::try_from(version).ok()
}

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

/// Lifecycle of a secret version (seed §4.1). `Pending`: issued, not yet acknowledged by the
/// machine; no token is ever issued under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SecretState {
    Pending,
    Active,
    Grace,
    Invalidated,
}

impl SecretState {
    pub fn as_str(self) -> &'static str {
        match self {
            SecretState::Pending => "pending",
            SecretState::Active => "active",
            SecretState::Grace => "grace",
            SecretState::Invalidated => "invalidated",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        match s {
            "pending" => Ok(Self::Pending),
            "active" => Ok(Self::Active),
            "grace" => Ok(Self::Grace),
            "invalidated" => Ok(Self::Invalidated),
            other => Err(StoreError::Corrupt(format!("secret state {other:?}"))),
        }
    }
}

/// What is known of one secret version, without the secret.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SecretRecord {
    pub machine_id: String,
    pub version: u64,
    pub state: SecretState,
    /// As of the query: `pending`, `active`, `grace` (superseded, or past `valid_until`),
    /// `invalidated`, or `expired` (past `grace_until`: tokens under it no longer validate).
    pub effective_state: String,
    pub valid_from: Timestamp,
    pub valid_until: Timestamp,
    pub grace_until: Timestamp,
    pub created_at: Timestamp,
    pub acked_at: Option<Timestamp>,
    pub invalidated_at: Option<Timestamp>,
    /// The secret itself was destroyed, its grace being over; the row stays as history.
    pub destroyed: bool,
}

impl SecretRecord {
    /// A token under this version may validate now: acknowledged, not invalidated, not past
    /// its grace.
    pub fn usable(&self, now: Timestamp) -> bool {
        matches!(self.state, SecretState::Active | SecretState::Grace)
            && now <= self.grace_until
            && !self.destroyed
    }
}

/// A secret row with its ciphertext at rest (never the plaintext). Debug omits the ciphertext.
#[derive(Clone)]
pub struct SealedSecretRow {
    pub record: SecretRecord,
    pub secret_enc: Vec<u8>,
}

impl std::fmt::Debug for SealedSecretRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedSecretRow")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

fn secret_row(row: &AnyRow, now: Timestamp) -> Result<SealedSecretRow> {
    let state = SecretState::parse(&row.try_get::<String, _>("state")?)?;
    let valid_until = ts(row, "valid_until")?;
    let grace_until = ts(row, "grace_until")?;
    let effective_state = match state {
        SecretState::Pending => "pending",
        SecretState::Invalidated => "invalidated",
        SecretState::Active | SecretState::Grace if now > grace_until => "expired",
        SecretState::Active if now <= valid_until => "active",
        SecretState::Active | SecretState::Grace => "grace",
    };
    let version: i64 = row.try_get("version")?;
    let secret_enc: Vec<u8> = row.try_get("secret_enc")?;
    Ok(SealedSecretRow {
        record: SecretRecord {
            machine_id: row.try_get("machine_id")?,
            version: u64::try_from(version)
                .map_err(|_| StoreError::Corrupt(format!("secret version {version}")))?,
            state,
            effective_state: effective_state.to_string(),
            valid_from: ts(row, "valid_from")?,
            valid_until,
            grace_until,
            created_at: ts(row, "created_at")?,
            acked_at: opt_ts(row, "acked_at")?,
            invalidated_at: opt_ts(row, "invalidated_at")?,
            destroyed: secret_enc.is_empty(),
        },
        secret_enc,
    })
}

/// Every secret version of a machine, oldest first.
pub async fn machine_secrets<'e, E: Executor<'e, Database = Any>>(
    ex: E,
    machine_id: &str,
    now: Timestamp,
) -> Result<Vec<SealedSecretRow>> {
    sqlx::query(
        "SELECT machine_id, version, state, secret_enc, valid_from, valid_until, grace_until, \
         created_at, acked_at, invalidated_at FROM secrets WHERE machine_id = $1 ORDER BY version",
    )
    .bind(machine_id)
    .fetch_all(ex)
    .await?
    .iter()
    .map(|r| secret_row(r, now))
    .collect()
}

/// A secret version about to be stored as the machine's pending one.
#[derive(Debug)]
pub struct NewSecret<'a> {
    pub machine_id: &'a str,
    pub version: i64,
    /// Ciphertext under the master key.
    pub secret_enc: &'a [u8],
    pub valid_from: Timestamp,
    pub valid_until: Timestamp,
    pub grace_until: Timestamp,
    pub created_at: Timestamp,
}

pub async fn insert_pending_secret(conn: &mut AnyConnection, s: &NewSecret<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO secrets (machine_id, version, state, secret_enc, valid_from, valid_until, grace_until, created_at) \
         VALUES ($1, $2, 'pending', $3, $4, $5, $6, $7)",
    )
    .bind(s.machine_id)
    .bind(s.version)
    .bind(s.secret_enc.to_vec())
    .bind(s.valid_from.0)
    .bind(s.valid_until.0)
    .bind(s.grace_until.0)
    .bind(s.created_at.0)
    .execute(&mut *conn)
    .await
    .map_err(StoreError::classify)?;
    Ok(())
}

/// Destroys the ciphertext of every acknowledged or invalidated version past its grace (of one
/// machine, or of all): no token under it validates any more, so the server no longer needs
/// it. The row stays, with an empty `secret_enc`. Returns the (machine, version) destroyed.
pub async fn destroy_expired_secrets(
    conn: &mut AnyConnection,
    machine_id: Option<&str>,
    now: Timestamp,
) -> Result<Vec<(String, u64)>> {
    let sql = "UPDATE secrets SET secret_enc = $1 WHERE grace_until < $2 AND state <> 'pending' \
               AND length(secret_enc) > 0 AND ($3 IS NULL OR machine_id = $3) \
               RETURNING machine_id, version";
    let rows = sqlx::query(sql)
        .bind(Vec::<u8>::new())
        .bind(now.0)
        .bind(machine_id)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|r| {
            let version: i64 = r.try_get("version")?;
            let version = u64::try_from(version)
                .map_err(|_| StoreError::Corrupt(format!("secret version {version}")))?;
            Ok((r.try_get("machine_id")?, version))
        })
        .collect()
}

/// Moves the machine's active version (if any) to grace; returns its version.
pub async fn demote_active_secret(
    conn: &mut AnyConnection,
    machine_id: &str,
) -> Result<Option<i64>> {
    let row = sqlx::query(
        "UPDATE secrets SET state = 'grace' WHERE machine_id = $1 AND state = 'active' RETURNING version",
    )
    .bind(machine_id)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|r| Ok(r.try_get("version")?)).transpose()
}

/// Moves a pending version to active. Returns false when that version is not pending.
pub async fn activate_pending_secret(
    conn: &mut AnyConnection,
    machine_id: &str,
    version: i64,
    now: Timestamp,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE secrets SET state = 'active', acked_at = $3 \
         WHERE machine_id = $1 AND version = $2 AND state = 'pending'",
    )
    .bind(machine_id)
    .bind(version)
    .bind(now.0)
    .execute(&mut *conn)
    .await
    .map_err(StoreError::classify)?;
    Ok(done.rows_affected() == 1)
}

/// Invalidates one version. Returns false when it does not exist or is already invalidated.
pub async fn invalidate_secret(
    conn: &mut AnyConnection,
    machine_id: &str,
    version: i64,
    now: Timestamp,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE secrets SET state = 'invalidated', invalidated_at = $3 \
         WHERE machine_id = $1 AND version = $2 AND state <> 'invalidated'",
    )
    .bind(machine_id)
    .bind(version)
    .bind(now.0)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Invalidates the machine's pending version (if any), which was sealed to a key the machine
/// no longer has and must not be re-sent to a new one. Returns the versions invalidated.
pub async fn invalidate_pending_secrets(
    conn: &mut AnyConnection,
    machine_id: &str,
    now: Timestamp,
) -> Result<Vec<i64>> {
    sqlx::query(
        "UPDATE secrets SET state = 'invalidated', invalidated_at = $2 \
         WHERE machine_id = $1 AND state = 'pending' RETURNING version",
    )
    .bind(machine_id)
    .bind(now.0)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| Ok(r.try_get("version")?))
    .collect()
}

// ---------------------------------------------------------------------------------------------
// Machines: rotation requests and the per-machine write lock
// ---------------------------------------------------------------------------------------------

/// Takes the machine's row lock for the rest of the transaction (PostgreSQL; SQLite's write
/// transaction already excludes every other writer), so that two rotations of one machine
/// never interleave. Returns false when there is no such machine.
pub async fn lock_machine(conn: &mut AnyConnection, machine_id: &str) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE machines SET rotation_requested_at = rotation_requested_at WHERE id = $1",
    )
    .bind(machine_id)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Sets (admin force rotation) or clears (acknowledged rotation) the rotation request.
pub async fn set_rotation_requested(
    conn: &mut AnyConnection,
    machine_id: &str,
    at: Option<Timestamp>,
) -> Result<bool> {
    let done = sqlx::query("UPDATE machines SET rotation_requested_at = $1 WHERE id = $2")
        .bind(at.map(|t| t.0))
        .bind(machine_id)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

// ---------------------------------------------------------------------------------------------
// Rotation nonces
// ---------------------------------------------------------------------------------------------

/// Records a rotate request's nonce. Returns false when this machine already used it.
pub async fn insert_rotation_nonce(
    conn: &mut AnyConnection,
    machine_id: &str,
    nonce: &str,
    now: Timestamp,
) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO rotation_nonces (machine_id, nonce, seen_at) VALUES ($1, $2, $3) \
         ON CONFLICT (machine_id, nonce) DO NOTHING",
    )
    .bind(machine_id)
    .bind(nonce)
    .bind(now.0)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Forgets the machine's nonces seen before `before`: requests that old are refused for their
/// timestamp. Per machine, under its lock, so concurrent rotations of different machines never
/// contend (or deadlock) on each other's rows.
pub async fn purge_rotation_nonces(
    conn: &mut AnyConnection,
    machine_id: &str,
    before: Timestamp,
) -> Result<u64> {
    let done = sqlx::query("DELETE FROM rotation_nonces WHERE machine_id = $1 AND seen_at < $2")
        .bind(machine_id)
        .bind(before.0)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected())
}

// ---------------------------------------------------------------------------------------------
// Licenses
// ---------------------------------------------------------------------------------------------

/// A license: what one machine may do, until when.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct LicenseRecord {
    pub id: String,
    pub client_id: String,
    pub machine_id: String,
    pub features: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    pub issued_at: Timestamp,
    pub not_before: Timestamp,
    /// `null`: does not expire.
    pub expires_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
    /// As of the query: `active`, `revoked`, `expired` or `not_yet_valid`.
    pub state: String,
}

impl LicenseRecord {
    pub fn is_current(&self) -> bool {
        self.state == "active" || self.state == "not_yet_valid"
    }
}

const LICENSE_SELECT: &str = "SELECT id, client_id, machine_id, features, metadata, issued_at, \
     not_before, expires_at, revoked_at FROM licenses";

fn license(row: &AnyRow, now: Timestamp) -> Result<LicenseRecord> {
    let features: String = row.try_get("features")?;
    let metadata: String = row.try_get("metadata")?;
    let not_before = ts(row, "not_before")?;
    let expires_at = opt_ts(row, "expires_at")?;
    let revoked_at = opt_ts(row, "revoked_at")?;
    let state = if revoked_at.is_some() {
        "revoked"
    } else if expires_at.is_some_and(|e| e <= now) {
        "expired"
    } else if not_before > now {
        "not_yet_valid"
    } else {
        "active"
    };
    Ok(LicenseRecord {
        id: row.try_get("id")?,
        client_id: row.try_get("client_id")?,
        machine_id: row.try_get("machine_id")?,
        features: serde_json::from_str(&features)
            .map_err(|e| StoreError::Corrupt(format!("license features: {e}")))?,
        metadata: serde_json::from_str(&metadata)
            .map_err(|e| StoreError::Corrupt(format!("license metadata: {e}")))?,
        issued_at: ts(row, "issued_at")?,
        not_before,
        expires_at,
        revoked_at,
        state: state.to_string(),
    })
}

/// A license about to be stored.
#[derive(Debug)]
pub struct NewLicense<'a> {
    pub id: &'a str,
    pub client_id: &'a str,
    pub machine_id: &'a str,
    pub features: &'a [String],
    pub metadata: &'a BTreeMap<String, String>,
    pub issued_at: Timestamp,
    pub not_before: Timestamp,
    pub expires_at: Option<Timestamp>,
}

pub async fn insert_license(conn: &mut AnyConnection, l: &NewLicense<'_>) -> Result<()> {
    let features = serde_json::to_string(l.features)
        .map_err(|e| StoreError::Corrupt(format!("license features: {e}")))?;
    let metadata = serde_json::to_string(l.metadata)
        .map_err(|e| StoreError::Corrupt(format!("license metadata: {e}")))?;
    sqlx::query(
        "INSERT INTO licenses (id, client_id, machine_id, features, metadata, issued_at, not_before, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(l.id)
    .bind(l.client_id)
    .bind(l.machine_id)
    .bind(features)
    .bind(metadata)
    .bind(l.issued_at.0)
    .bind(l.not_before.0)
    .bind(l.expires_at.map(|t| t.0))
    .execute(&mut *conn)
    .await
    .map_err(StoreError::classify)?;
    Ok(())
}

/// Licenses, of one machine or all, oldest first.
pub async fn list_licenses<'e, E: Executor<'e, Database = Any>>(
    ex: E,
    machine_id: Option<&str>,
    now: Timestamp,
) -> Result<Vec<LicenseRecord>> {
    sqlx::query(&format!(
        "{LICENSE_SELECT} WHERE ($1 IS NULL OR machine_id = $1) ORDER BY issued_at, id"
    ))
    .bind(machine_id)
    .fetch_all(ex)
    .await?
    .iter()
    .map(|r| license(r, now))
    .collect()
}

pub async fn get_license<'e, E: Executor<'e, Database = Any>>(
    ex: E,
    id: &str,
    now: Timestamp,
) -> Result<Option<LicenseRecord>> {
    sqlx::query(&format!("{LICENSE_SELECT} WHERE id = $1"))
        .bind(id)
        .fetch_optional(ex)
        .await?
        .as_ref()
        .map(|r| license(r, now))
        .transpose()
}

/// Revokes a license. Returns false when it does not exist or is already revoked.
pub async fn revoke_license(conn: &mut AnyConnection, id: &str, now: Timestamp) -> Result<bool> {
    let done =
        sqlx::query("UPDATE licenses SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(now.0)
            .bind(id)
            .execute(&mut *conn)
            .await?;
    Ok(done.rows_affected() == 1)
}
