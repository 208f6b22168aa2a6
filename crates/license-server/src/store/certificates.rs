//! The `certificates` table: every machine certificate the CA issued, with its lifecycle
//! (`active`, `revoked`, `superseded`). A unique index allows one active row per machine.
//!
//! [`auth`] is the agent listener's per-request check; [`supersede_active`] and
//! [`insert_active`] are the two steps of issuing a new certificate, run inside the caller's
//! transaction by `service::certificates`.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row as _};

use super::{find_one, opt_ts, ts, AnyExecutor, Result, StoreError};
use crate::clock::Timestamp;

/// Lifecycle of a certificate row. "Active" in the product sense also requires `expires_at`
/// in the future; see [`CertificateRecord::effective_state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CertState {
    Active,
    Revoked,
    Superseded,
}

impl CertState {
    fn parse(s: &str) -> Result<Self> {
        match s {
            "active" => Ok(Self::Active),
            "revoked" => Ok(Self::Revoked),
            "superseded" => Ok(Self::Superseded),
            other => Err(StoreError::Corrupt(format!("certificate state {other:?}"))),
        }
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CertificateRecord {
    pub serial: String,
    pub machine_id: String,
    pub client_id: String,
    pub state: CertState,
    /// `active`, `revoked`, `superseded` or `expired` as of the query.
    pub effective_state: String,
    /// `csr` (the machine kept its key) or `server` (server-generated key).
    pub key_origin: String,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
    pub superseded_at: Option<Timestamp>,
}

#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct CertificateStats {
    pub total: i64,
    pub active: i64,
    pub expired: i64,
    pub revoked: i64,
    pub superseded: i64,
    /// Active certificates expiring within 30 days.
    pub expiring_soon: i64,
}

/// What the agent listener needs to decide, on every request, whether a certificate may act.
#[derive(Debug, Clone)]
pub struct CertificateAuth {
    pub machine_id: String,
    pub client_id: String,
    pub state: CertState,
    pub expires_at: Timestamp,
    pub machine_revoked: bool,
    /// The machine's `last_seen_at`.
    pub last_seen_at: Option<Timestamp>,
    /// The certificate as issued (DER): the one presented must be exactly it, not another
    /// with the same serial.
    pub der: Vec<u8>,
}

/// A certificate about to be stored as the machine's active one.
#[derive(Debug)]
pub struct NewCertificate<'a> {
    pub serial: &'a str,
    pub machine_id: &'a str,
    pub client_id: &'a str,
    pub key_origin: &'a str,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
    pub pem: &'a str,
}

const CERT_SELECT: &str =
    "SELECT serial, machine_id, client_id, state, key_origin, issued_at, expires_at, \
     revoked_at, superseded_at FROM certificates";

fn certificate(row: &AnyRow, now: Timestamp) -> Result<CertificateRecord> {
    let state = CertState::parse(&row.try_get::<String, _>("state")?)?;
    let expires_at = ts(row, "expires_at")?;
    let effective_state = match state {
        CertState::Active if expires_at <= now => "expired",
        CertState::Active => "active",
        CertState::Revoked => "revoked",
        CertState::Superseded => "superseded",
    };
    Ok(CertificateRecord {
        serial: row.try_get("serial")?,
        machine_id: row.try_get("machine_id")?,
        client_id: row.try_get("client_id")?,
        state,
        effective_state: effective_state.to_string(),
        key_origin: row.try_get("key_origin")?,
        issued_at: ts(row, "issued_at")?,
        expires_at,
        revoked_at: opt_ts(row, "revoked_at")?,
        superseded_at: opt_ts(row, "superseded_at")?,
    })
}

/// The per-request check of the agent listener: one indexed lookup, no cache, so that a
/// revocation is seen by every replica at the next request.
pub async fn auth<'e>(ex: impl AnyExecutor<'e>, serial: &str) -> Result<Option<CertificateAuth>> {
    let sql = "SELECT c.machine_id, c.client_id, c.state, c.expires_at, c.pem, m.revoked_at, \
               m.last_seen_at \
               FROM certificates c JOIN machines m ON m.id = c.machine_id WHERE c.serial = $1";
    find_one(ex, sql, serial, |row| {
        let pem: String = row.try_get("pem")?;
        Ok(CertificateAuth {
            machine_id: row.try_get("machine_id")?,
            client_id: row.try_get("client_id")?,
            state: CertState::parse(&row.try_get::<String, _>("state")?)?,
            expires_at: ts(row, "expires_at")?,
            machine_revoked: opt_ts(row, "revoked_at")?.is_some(),
            last_seen_at: opt_ts(row, "last_seen_at")?,
            der: crate::datadir::pem_first_der(&pem).ok_or_else(|| {
                StoreError::Corrupt(format!("certificate {serial} is not stored as PEM"))
            })?,
        })
    })
    .await
}

pub async fn stats<'e>(ex: impl AnyExecutor<'e>, now: Timestamp) -> Result<CertificateStats> {
    let row = sqlx::query(
        "SELECT COUNT(*) AS total, \
           COALESCE(SUM(CASE WHEN state = 'active' AND expires_at > $1 THEN 1 ELSE 0 END), 0) AS active, \
           COALESCE(SUM(CASE WHEN state = 'active' AND expires_at <= $1 THEN 1 ELSE 0 END), 0) AS expired, \
           COALESCE(SUM(CASE WHEN state = 'revoked' THEN 1 ELSE 0 END), 0) AS revoked, \
           COALESCE(SUM(CASE WHEN state = 'superseded' THEN 1 ELSE 0 END), 0) AS superseded, \
           COALESCE(SUM(CASE WHEN state = 'active' AND expires_at > $1 AND expires_at <= $2 THEN 1 ELSE 0 END), 0) AS expiring_soon \
         FROM certificates",
    )
    .bind(now.0)
    .bind(now.plus_secs(30 * 86_400).0)
    .fetch_one(ex)
    .await?;
    // SUM over an integer CASE is BIGINT on PostgreSQL and INTEGER on SQLite: both i64.
    let get = |c: &str| -> Result<i64> { Ok(row.try_get::<i64, _>(c)?) };
    Ok(CertificateStats {
        total: get("total")?,
        active: get("active")?,
        expired: get("expired")?,
        revoked: get("revoked")?,
        superseded: get("superseded")?,
        expiring_soon: get("expiring_soon")?,
    })
}

/// Certificates, of one machine and/or client or all, in issuance order.
pub async fn list<'e>(
    ex: impl AnyExecutor<'e>,
    machine_id: Option<&str>,
    client_id: Option<&str>,
    now: Timestamp,
) -> Result<Vec<CertificateRecord>> {
    let rows = sqlx::query(&format!(
        "{CERT_SELECT} WHERE ($1 IS NULL OR machine_id = $1) AND ($2 IS NULL OR client_id = $2) \
         ORDER BY issued_at, serial"
    ))
    .bind(machine_id)
    .bind(client_id)
    .fetch_all(ex)
    .await?;
    rows.iter().map(|r| certificate(r, now)).collect()
}

pub async fn get<'e>(
    ex: impl AnyExecutor<'e>,
    serial: &str,
    now: Timestamp,
) -> Result<Option<CertificateRecord>> {
    let sql = format!("{CERT_SELECT} WHERE serial = $1");
    find_one(ex, &sql, serial, |r| certificate(r, now)).await
}

/// Moves an active certificate to revoked. Returns false when it was not active.
pub async fn revoke(conn: &mut AnyConnection, serial: &str, now: Timestamp) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE certificates SET state = 'revoked', revoked_at = $1 WHERE serial = $2 AND state = 'active'",
    )
    .bind(now.0)
    .bind(serial)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Moves a revoked certificate back to active. The unique index refuses it (Conflict) when
/// the machine has been issued another certificate since.
pub async fn restore(conn: &mut AnyConnection, serial: &str) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE certificates SET state = 'active', revoked_at = NULL WHERE serial = $1 AND state = 'revoked'",
    )
    .bind(serial)
    .execute(&mut *conn)
    .await
    .map_err(StoreError::classify)?;
    Ok(done.rows_affected() == 1)
}

/// Deletes revoked, superseded and expired certificates; keeps every usable one.
pub async fn purge(conn: &mut AnyConnection, now: Timestamp) -> Result<u64> {
    let done = sqlx::query("DELETE FROM certificates WHERE state <> 'active' OR expires_at <= $1")
        .bind(now.0)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected())
}

/// The machine's active certificate (expired or not), for a renewal retry to answer with.
#[derive(Debug, Clone)]
pub struct ActiveCertificate {
    pub serial: String,
    pub expires_at: Timestamp,
    pub pem: String,
}

/// The machine's one active certificate, if it has one.
pub async fn active_of<'e>(
    ex: impl AnyExecutor<'e>,
    machine_id: &str,
) -> Result<Option<ActiveCertificate>> {
    let sql = "SELECT serial, expires_at, pem FROM certificates \
               WHERE machine_id = $1 AND state = 'active'";
    find_one(ex, sql, machine_id, |row| {
        Ok(ActiveCertificate {
            serial: row.try_get("serial")?,
            expires_at: ts(row, "expires_at")?,
            pem: row.try_get("pem")?,
        })
    })
    .await
}

/// The machine's latest certificate (its active one, else the last issued) and whether it was
/// revoked: the key a re-enrollment must prove it holds.
pub async fn latest_of<'e>(
    ex: impl AnyExecutor<'e>,
    machine_id: &str,
) -> Result<Option<(String, bool)>> {
    let sql = "SELECT pem, state FROM certificates WHERE machine_id = $1 \
               ORDER BY CASE WHEN state = 'active' THEN 0 ELSE 1 END, issued_at DESC LIMIT 1";
    find_one(ex, sql, machine_id, |row| {
        let state: String = row.try_get("state")?;
        Ok((row.try_get("pem")?, state == "revoked"))
    })
    .await
}

/// The PEM of every active certificate that expires after `after` (for `keys retire-ca`: a
/// certificate expired before that can no longer be renewed, so it needs no CA).
pub async fn active_pems<'e>(ex: impl AnyExecutor<'e>, after: Timestamp) -> Result<Vec<String>> {
    let rows =
        sqlx::query("SELECT pem FROM certificates WHERE state = 'active' AND expires_at > $1")
            .bind(after.0)
            .fetch_all(ex)
            .await?;
    rows.iter()
        .map(|row| Ok(row.try_get::<String, _>("pem")?))
        .collect()
}

/// Supersedes one certificate if it is still active. Returns false when it no longer was (a
/// concurrent renewal superseded it first, or it was revoked): on PostgreSQL the row lock makes
/// the second of two concurrent renewals wait and then see it superseded.
pub async fn supersede_serial(
    conn: &mut AnyConnection,
    serial: &str,
    now: Timestamp,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE certificates SET state = 'superseded', superseded_at = $1 WHERE serial = $2 AND state = 'active'",
    )
    .bind(now.0)
    .bind(serial)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Supersedes the machine's current certificate (if any). Returns how many rows moved.
pub async fn supersede_active(
    conn: &mut AnyConnection,
    machine_id: &str,
    now: Timestamp,
) -> Result<u64> {
    let done = sqlx::query(
        "UPDATE certificates SET state = 'superseded', superseded_at = $1 WHERE machine_id = $2 AND state = 'active'",
    )
    .bind(now.0)
    .bind(machine_id)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}

/// Stores `cert` as the machine's active certificate. While another is active (a concurrent
/// issuance committed first) the unique index refuses it: [`StoreError::Conflict`].
pub async fn insert_active(conn: &mut AnyConnection, cert: &NewCertificate<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO certificates (serial, machine_id, client_id, state, key_origin, issued_at, expires_at, pem) \
         VALUES ($1, $2, $3, 'active', $4, $5, $6, $7)",
    )
    .bind(cert.serial)
    .bind(cert.machine_id)
    .bind(cert.client_id)
    .bind(cert.key_origin)
    .bind(cert.issued_at.0)
    .bind(cert.expires_at.0)
    .bind(cert.pem)
    .execute(&mut *conn)
    .await
    .map_err(StoreError::classify)?;
    Ok(())
}
