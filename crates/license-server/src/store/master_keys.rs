//! The `master_keys` registry (which master key seals new secrets, which ones rows may still
//! be under, check values, never key material) and `master_key_holders` (which keys each
//! serving process holds, refreshed every few seconds). Shared by every replica, so they agree
//! on the current key and a rollover knows who could not yet read under a new one.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row as _};

use super::{opt_ts, ts, AnyExecutor, Backend, Result, StoreError};
use crate::clock::Timestamp;

/// Where a master key is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    /// Generated and registered; nothing is sealed under it yet.
    Staged,
    /// Seals every new secret (exactly one key).
    Current,
    /// Superseded; its rows are being re-encrypted under the current key.
    Previous,
    /// Superseded, no row under it, retained by `--keep-old`.
    Kept,
    /// No row under it; removed from the key sets.
    Retired,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Staged => "staged",
            KeyState::Current => "current",
            KeyState::Previous => "previous",
            KeyState::Kept => "kept",
            KeyState::Retired => "retired",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        match s {
            "staged" => Ok(Self::Staged),
            "current" => Ok(Self::Current),
            "previous" => Ok(Self::Previous),
            "kept" => Ok(Self::Kept),
            "retired" => Ok(Self::Retired),
            other => Err(StoreError::Corrupt(format!("master key state {other:?}"))),
        }
    }
}

/// One registered master key.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct KeyRecord {
    pub id: String,
    /// Truncated SHA-256 of a label and the key; `None` until a server holding it fills it.
    pub check_value: Option<String>,
    pub state: KeyState,
    pub created_at: Timestamp,
    pub activated_at: Option<Timestamp>,
    pub retired_at: Option<Timestamp>,
}

fn key_row(row: &AnyRow) -> Result<KeyRecord> {
    Ok(KeyRecord {
        id: row.try_get("id")?,
        check_value: row.try_get("check_value")?,
        state: KeyState::parse(&row.try_get::<String, _>("state")?)?,
        created_at: ts(row, "created_at")?,
        activated_at: opt_ts(row, "activated_at")?,
        retired_at: opt_ts(row, "retired_at")?,
    })
}

/// Every registered key, oldest first.
pub async fn list<'e>(ex: impl AnyExecutor<'e>) -> Result<Vec<KeyRecord>> {
    sqlx::query(
        "SELECT id, check_value, state, created_at, activated_at, retired_at FROM master_keys \
         ORDER BY created_at, id",
    )
    .fetch_all(ex)
    .await?
    .iter()
    .map(key_row)
    .collect()
}

/// The id of the current key, read inside a sealing transaction. On PostgreSQL the row is
/// share-locked until the transaction ends, so a rollover cannot make another key current
/// (and later retire this one) while a secret sealed under it is still uncommitted; SQLite has
/// one writer at a time, which gives the same.
pub async fn current_for_seal(conn: &mut AnyConnection, backend: Backend) -> Result<String> {
    let sql = match backend {
        Backend::Postgres => "SELECT id FROM master_keys WHERE state = 'current' FOR SHARE",
        Backend::Sqlite => "SELECT id FROM master_keys WHERE state = 'current'",
    };
    let row = sqlx::query(sql).fetch_optional(&mut *conn).await?;
    match row {
        Some(r) => Ok(r.try_get("id")?),
        None => Err(StoreError::Corrupt(
            "no current master key is registered".into(),
        )),
    }
}

/// Records the check value of a key registered without one (the first key, by the
/// migration). Returns false when it already had one.
pub async fn fill_check(conn: &mut AnyConnection, id: &str, check: &str) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE master_keys SET check_value = $2 WHERE id = $1 AND check_value IS NULL",
    )
    .bind(id)
    .bind(check)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Registers a new key as staged ([`StoreError::Conflict`] if another one is staged, or the
/// id exists).
pub async fn stage(conn: &mut AnyConnection, id: &str, check: &str, now: Timestamp) -> Result<()> {
    sqlx::query(
        "INSERT INTO master_keys (id, check_value, state, created_at) VALUES ($1, $2, 'staged', $3)",
    )
    .bind(id)
    .bind(check)
    .bind(now.0)
    .execute(&mut *conn)
    .await
    .map_err(StoreError::classify)?;
    Ok(())
}

/// The staged key `id` becomes current, the current one previous. Returns the ids made
/// previous; false-y (no change) when `id` is not staged.
pub async fn make_current(
    conn: &mut AnyConnection,
    id: &str,
    now: Timestamp,
) -> Result<Option<Vec<String>>> {
    let staged = sqlx::query("SELECT id FROM master_keys WHERE id = $1 AND state = 'staged'")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    if staged.is_none() {
        return Ok(None);
    }
    let previous = sqlx::query(
        "UPDATE master_keys SET state = 'previous' WHERE state = 'current' RETURNING id",
    )
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| Ok(r.try_get("id")?))
    .collect::<Result<Vec<String>>>()?;
    sqlx::query("UPDATE master_keys SET state = 'current', activated_at = $2 WHERE id = $1")
        .bind(id)
        .bind(now.0)
        .execute(&mut *conn)
        .await
        .map_err(StoreError::classify)?;
    Ok(Some(previous))
}

/// Moves a superseded key (previous or kept) to `kept` or `retired`.
pub async fn settle(
    conn: &mut AnyConnection,
    id: &str,
    to: KeyState,
    now: Timestamp,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE master_keys SET state = $2, retired_at = CASE WHEN $2 = 'retired' THEN $3 ELSE retired_at END \
         WHERE id = $1 AND state IN ('previous', 'kept')",
    )
    .bind(id)
    .bind(to.as_str())
    .bind(now.0)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// How many secret rows each key id seals (destroyed rows included: they carry the id of
/// the key their ciphertext was under, and move with the rollover like the others).
pub async fn rows_by_key<'e>(ex: impl AnyExecutor<'e>) -> Result<Vec<(String, i64)>> {
    sqlx::query(
        "SELECT master_key_id, COUNT(*) AS n FROM secrets GROUP BY master_key_id ORDER BY master_key_id",
    )
    .fetch_all(ex)
    .await?
    .iter()
    .map(|r| Ok((r.try_get("master_key_id")?, r.try_get("n")?)))
    .collect()
}

/// A serving process and the keys it holds.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Holder {
    pub holder_id: String,
    pub description: String,
    pub key_ids: Vec<String>,
    pub seen_at: Timestamp,
}

/// Records that `holder_id` holds `key_ids` now; forgets holders silent for a day.
pub async fn heartbeat(
    conn: &mut AnyConnection,
    holder_id: &str,
    description: &str,
    key_ids: &[String],
    now: Timestamp,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO master_key_holders (holder_id, description, key_ids, seen_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (holder_id) DO UPDATE SET key_ids = $3, seen_at = $4",
    )
    .bind(holder_id)
    .bind(description)
    .bind(key_ids.join(","))
    .bind(now.0)
    .execute(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM master_key_holders WHERE seen_at < $1")
        .bind(now.plus_secs(-86_400).0)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A holder stopping cleanly says so.
pub async fn forget_holder(conn: &mut AnyConnection, holder_id: &str) -> Result<()> {
    sqlx::query("DELETE FROM master_key_holders WHERE holder_id = $1")
        .bind(holder_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Holders heard from since `since`.
pub async fn live_holders<'e>(ex: impl AnyExecutor<'e>, since: Timestamp) -> Result<Vec<Holder>> {
    sqlx::query(
        "SELECT holder_id, description, key_ids, seen_at FROM master_key_holders \
         WHERE seen_at >= $1 ORDER BY description",
    )
    .bind(since.0)
    .fetch_all(ex)
    .await?
    .iter()
    .map(|r| {
        let ids: String = r.try_get("key_ids")?;
        Ok(Holder {
            holder_id: r.try_get("holder_id")?,
            description: r.try_get("description")?,
            key_ids: ids
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            seen_at: ts(r, "seen_at")?,
        })
    })
    .collect()
}
