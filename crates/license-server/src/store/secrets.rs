//! The `secrets` table: each machine's secret versions, kept encrypted under a master key
//! (named per row by `master_key_id`), with their lifecycle (`pending` → `active` → `grace`, or
//! `invalidated`) and dates. A version's ciphertext is destroyed once it is past its grace; the
//! row stays as history. A master key rollover re-encrypts rows in batches (`under_other_key`,
//! `reseal`).

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row as _};

use super::{opt_ts, ts, AnyExecutor, Result, StoreError};
use crate::clock::Timestamp;

/// A protocol version number as stored (BIGINT). Versions the database could not hold are
/// versions it does not have.
pub fn version_to_db(version: u64) -> Option<i64> {
    i64::try_from(version).ok()
}

/// The `version` column of a row, as the protocol's number.
fn version_of(row: &AnyRow) -> Result<u64> {
    let version: i64 = row.try_get("version")?;
    u64::try_from(version).map_err(|_| StoreError::Corrupt(format!("secret version {version}")))
}

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
    let secret_enc: Vec<u8> = row.try_get("secret_enc")?;
    Ok(SealedSecretRow {
        record: SecretRecord {
            machine_id: row.try_get("machine_id")?,
            version: version_of(row)?,
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
pub async fn of_machine<'e>(
    ex: impl AnyExecutor<'e>,
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
    /// Ciphertext under the master key `master_key_id`.
    pub secret_enc: &'a [u8],
    pub master_key_id: &'a str,
    pub valid_from: Timestamp,
    pub valid_until: Timestamp,
    pub grace_until: Timestamp,
    pub created_at: Timestamp,
}

pub async fn insert_pending(conn: &mut AnyConnection, s: &NewSecret<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO secrets (machine_id, version, state, secret_enc, valid_from, valid_until, grace_until, created_at, master_key_id) \
         VALUES ($1, $2, 'pending', $3, $4, $5, $6, $7, $8)",
    )
    .bind(s.machine_id)
    .bind(s.version)
    .bind(s.secret_enc.to_vec())
    .bind(s.valid_from.0)
    .bind(s.valid_until.0)
    .bind(s.grace_until.0)
    .bind(s.created_at.0)
    .bind(s.master_key_id)
    .execute(&mut *conn)
    .await
    .map_err(StoreError::classify)?;
    Ok(())
}

/// Destroys the ciphertext of every acknowledged or invalidated version past its grace (of one
/// machine, or of all): no token under it validates any more, so the server no longer needs
/// it. The row stays, with an empty `secret_enc`. Returns the (machine, version) destroyed.
pub async fn destroy_expired(
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
        .map(|r| Ok((r.try_get("machine_id")?, version_of(r)?)))
        .collect()
}

/// Moves the machine's active version (if any) to grace; returns its version.
pub async fn demote_active(conn: &mut AnyConnection, machine_id: &str) -> Result<Option<i64>> {
    let row = sqlx::query(
        "UPDATE secrets SET state = 'grace' WHERE machine_id = $1 AND state = 'active' RETURNING version",
    )
    .bind(machine_id)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|r| Ok(r.try_get("version")?)).transpose()
}

/// One state change of one version: `sql` binds `$1` machine, `$2` version, `$3` now.
/// Returns false when the version is not in a state the change applies to.
async fn change_version(
    conn: &mut AnyConnection,
    sql: &'static str,
    machine_id: &str,
    version: i64,
    now: Timestamp,
) -> Result<bool> {
    let done = sqlx::query(sql)
        .bind(machine_id)
        .bind(version)
        .bind(now.0)
        .execute(&mut *conn)
        .await
        .map_err(StoreError::classify)?;
    Ok(done.rows_affected() == 1)
}

/// Moves a pending version to active (at most one active version per machine is a unique
/// index: [`StoreError::Conflict`]). Returns false when that version is not pending.
pub async fn activate_pending(
    conn: &mut AnyConnection,
    machine_id: &str,
    version: i64,
    now: Timestamp,
) -> Result<bool> {
    let sql = "UPDATE secrets SET state = 'active', acked_at = $3 \
               WHERE machine_id = $1 AND version = $2 AND state = 'pending'";
    change_version(conn, sql, machine_id, version, now).await
}

/// Invalidates one version. Returns false when it does not exist or is already invalidated.
pub async fn invalidate(
    conn: &mut AnyConnection,
    machine_id: &str,
    version: i64,
    now: Timestamp,
) -> Result<bool> {
    let sql = "UPDATE secrets SET state = 'invalidated', invalidated_at = $3 \
               WHERE machine_id = $1 AND version = $2 AND state <> 'invalidated'";
    change_version(conn, sql, machine_id, version, now).await
}

/// Invalidates the machine's pending version (if any), which was sealed to a key the machine
/// no longer has and must not be re-sent to a new one. Returns the versions invalidated.
pub async fn invalidate_pending(
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

/// One stored ciphertext and the key it is under, for a master key rollover. Debug omits the
/// ciphertext.
pub struct KeyedCiphertext {
    pub machine_id: String,
    pub version: u64,
    pub master_key_id: String,
    pub secret_enc: Vec<u8>,
}

impl std::fmt::Debug for KeyedCiphertext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedCiphertext")
            .field("machine_id", &self.machine_id)
            .field("version", &self.version)
            .field("master_key_id", &self.master_key_id)
            .finish_non_exhaustive()
    }
}

/// Destroyed rows (no ciphertext) not yet under `key_id` are moved to it: there is nothing to
/// re-encrypt. Also the first write of a rollover batch, so that on SQLite the batch holds the
/// write lock before it reads. Returns how many rows moved.
pub async fn rekey_destroyed(conn: &mut AnyConnection, key_id: &str) -> Result<u64> {
    let done = sqlx::query(
        "UPDATE secrets SET master_key_id = $1 WHERE master_key_id <> $1 AND length(secret_enc) = 0",
    )
    .bind(key_id)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}

/// Up to `limit` rows with a ciphertext under another key than `key_id`.
pub async fn under_other_key(
    conn: &mut AnyConnection,
    key_id: &str,
    limit: i64,
) -> Result<Vec<KeyedCiphertext>> {
    sqlx::query(
        "SELECT machine_id, version, master_key_id, secret_enc FROM secrets \
         WHERE master_key_id <> $1 AND length(secret_enc) > 0 ORDER BY machine_id, version LIMIT $2",
    )
    .bind(key_id)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| {
        Ok(KeyedCiphertext {
            machine_id: r.try_get("machine_id")?,
            version: version_of(r)?,
            master_key_id: r.try_get("master_key_id")?,
            secret_enc: r.try_get("secret_enc")?,
        })
    })
    .collect()
}

/// How many rows are under another key than `key_id`.
pub async fn count_under_other_key<'e>(ex: impl AnyExecutor<'e>, key_id: &str) -> Result<i64> {
    let row = sqlx::query("SELECT COUNT(*) AS n FROM secrets WHERE master_key_id <> $1")
        .bind(key_id)
        .fetch_one(ex)
        .await?;
    Ok(row.try_get("n")?)
}

/// Replaces one row's ciphertext, if it is still the one read under `old_key_id` (a row
/// destroyed meanwhile is left alone). Returns whether it changed.
pub async fn reseal(
    conn: &mut AnyConnection,
    row: &KeyedCiphertext,
    new_key_id: &str,
    secret_enc: &[u8],
) -> Result<bool> {
    let version = version_to_db(row.version)
        .ok_or_else(|| StoreError::Corrupt(format!("secret version {}", row.version)))?;
    let done = sqlx::query(
        "UPDATE secrets SET secret_enc = $1, master_key_id = $2 \
         WHERE machine_id = $3 AND version = $4 AND master_key_id = $5 AND secret_enc = $6",
    )
    .bind(secret_enc.to_vec())
    .bind(new_key_id)
    .bind(&row.machine_id)
    .bind(version)
    .bind(&row.master_key_id)
    .bind(row.secret_enc.clone())
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}
