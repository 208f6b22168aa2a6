//! The `licenses` table: what one machine may do, until when. Tokens are not stored; they
//! are sealed on demand under the machine's current secret version (`service::licenses`).

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row as _};

use super::{find_one, opt_ts, ts, AnyExecutor, Result, StoreError};
use crate::clock::Timestamp;

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

pub async fn insert(conn: &mut AnyConnection, l: &NewLicense<'_>) -> Result<()> {
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
pub async fn list<'e>(
    ex: impl AnyExecutor<'e>,
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

pub async fn get<'e>(
    ex: impl AnyExecutor<'e>,
    id: &str,
    now: Timestamp,
) -> Result<Option<LicenseRecord>> {
    let sql = format!("{LICENSE_SELECT} WHERE id = $1");
    find_one(ex, &sql, id, |r| license(r, now)).await
}

/// Revokes a license. Returns false when it does not exist or is already revoked.
pub async fn revoke(conn: &mut AnyConnection, id: &str, now: Timestamp) -> Result<bool> {
    let done =
        sqlx::query("UPDATE licenses SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(now.0)
            .bind(id)
            .execute(&mut *conn)
            .await?;
    Ok(done.rows_affected() == 1)
}
