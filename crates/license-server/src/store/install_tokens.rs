//! The `install_tokens` table: one-time enrollment credentials, stored as SHA-256 hashes.
//!
//! Consumption is one conditional `UPDATE … RETURNING`, so of two concurrent enrollments with
//! one token exactly one proceeds; [`diagnose`] says afterwards why a token was refused.

use serde::Serialize;
use sqlx::{AnyConnection, Row as _};

use super::{opt_ts, ts, AnyExecutor, Result, StoreError};
use crate::clock::Timestamp;

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct InstallTokenRecord {
    pub id: String,
    pub client_id: String,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub used_at: Option<Timestamp>,
    pub used_by_machine: Option<String>,
    /// The machine this token re-enrolls (a wiped or replaced till); `None` for ordinary
    /// tokens.
    pub machine_id: Option<String>,
}

/// A consumed token: what it enrolls.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub id: String,
    pub client_id: String,
    /// Set when the token is bound to one machine.
    pub machine_id: Option<String>,
}

/// What went wrong with an install token that could not be consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenProblem {
    Unknown,
    AlreadyUsed,
    Expired,
}

pub async fn create(
    conn: &mut AnyConnection,
    id: &str,
    token_hash: &str,
    client_id: &str,
    machine_id: Option<&str>,
    now: Timestamp,
    expires_at: Timestamp,
) -> Result<InstallTokenRecord> {
    sqlx::query(
        "INSERT INTO install_tokens (id, token_hash, client_id, machine_id, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(token_hash)
    .bind(client_id)
    .bind(machine_id)
    .bind(now.0)
    .bind(expires_at.0)
    .execute(&mut *conn)
    .await
    .map_err(StoreError::classify)?;
    Ok(InstallTokenRecord {
        id: id.to_string(),
        client_id: client_id.to_string(),
        created_at: now,
        expires_at,
        used_at: None,
        used_by_machine: None,
        machine_id: machine_id.map(str::to_string),
    })
}

/// Install tokens, of one client or all, oldest first.
pub async fn list<'e>(
    ex: impl AnyExecutor<'e>,
    client_id: Option<&str>,
) -> Result<Vec<InstallTokenRecord>> {
    let rows = sqlx::query(
        "SELECT id, client_id, created_at, expires_at, used_at, used_by_machine, machine_id \
         FROM install_tokens \
         WHERE ($1 IS NULL OR client_id = $1) ORDER BY created_at",
    )
    .bind(client_id)
    .fetch_all(ex)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(InstallTokenRecord {
                id: row.try_get("id")?,
                client_id: row.try_get("client_id")?,
                created_at: ts(row, "created_at")?,
                expires_at: ts(row, "expires_at")?,
                used_at: opt_ts(row, "used_at")?,
                used_by_machine: row.try_get("used_by_machine")?,
                machine_id: row.try_get("machine_id")?,
            })
        })
        .collect()
}

/// Marks an install token used, atomically: of two concurrent requests with one token, exactly
/// one gets it back.
pub async fn consume(
    conn: &mut AnyConnection,
    token_hash: &str,
    now: Timestamp,
) -> Result<Option<Consumed>> {
    let row = sqlx::query(
        "UPDATE install_tokens SET used_at = $1 \
         WHERE token_hash = $2 AND used_at IS NULL AND expires_at > $1 \
         RETURNING id, client_id, machine_id",
    )
    .bind(now.0)
    .bind(token_hash)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|r| {
        Ok(Consumed {
            id: r.try_get("id")?,
            client_id: r.try_get("client_id")?,
            machine_id: r.try_get("machine_id")?,
        })
    })
    .transpose()
}

/// Why a token that [`consume`] refused was refused.
pub async fn diagnose<'e>(
    ex: impl AnyExecutor<'e>,
    token_hash: &str,
    now: Timestamp,
) -> Result<TokenProblem> {
    let row = sqlx::query("SELECT expires_at, used_at FROM install_tokens WHERE token_hash = $1")
        .bind(token_hash)
        .fetch_optional(ex)
        .await?;
    Ok(match row {
        None => TokenProblem::Unknown,
        Some(row) if opt_ts(&row, "used_at")?.is_some() => TokenProblem::AlreadyUsed,
        Some(row) if ts(&row, "expires_at")? <= now => TokenProblem::Expired,
        // Consumed by a concurrent request between the two queries.
        Some(_) => TokenProblem::AlreadyUsed,
    })
}

/// Records which machine a consumed token enrolled.
pub async fn mark_machine(
    conn: &mut AnyConnection,
    token_id: &str,
    machine_id: &str,
) -> Result<()> {
    sqlx::query("UPDATE install_tokens SET used_by_machine = $1 WHERE id = $2")
        .bind(machine_id)
        .bind(token_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
