//! The `machines` table: one row per enrolled POS machine, found again by
//! `(client_id, hardware_id)` when it re-enrolls, with its revocation, its recovery token's hash,
//! its rotation request, and the row lock that serializes everything done to one machine.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{Any, AnyConnection, Row as _};

use super::{find_one, opt_ts, ts, AnyExecutor, Result, StoreError};
use crate::clock::Timestamp;

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MachineRecord {
    pub id: String,
    pub client_id: String,
    pub hostname: String,
    pub hardware_id: String,
    pub arch: String,
    pub enrolled_at: Timestamp,
    pub last_enrolled_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
    /// Serial of the machine's current certificate (`state = active`), expired or not.
    pub certificate_serial: Option<String>,
    pub certificate_expires_at: Option<Timestamp>,
    /// An administrator asked for a secret rotation (cleared by the next acknowledged one).
    pub rotation_requested_at: Option<Timestamp>,
    /// When the machine last recovered with its recovery token (new key, new certificate).
    pub recovered_at: Option<Timestamp>,
    /// When the machine last made a request to the agent listener (to within
    /// [`LAST_SEEN_RESOLUTION_SECS`]).
    pub last_seen_at: Option<Timestamp>,
    /// The machine's latest health report (`POST /api/v1/health`), as it sent it.
    #[schema(value_type = Option<Object>)]
    pub health: Option<serde_json::Value>,
    /// When that report last changed.
    pub health_reported_at: Option<Timestamp>,
}

impl MachineRecord {
    /// The problems the latest health report shows, comma-separated (`ok` when none, `-`
    /// without a report): `degraded`, `tpm_fallback` (TPM configured, file store in use),
    /// `rotation_failures=N`, `clock_rollback`, `audit_chain_broken`.
    pub fn health_summary(&self) -> String {
        let Some(report) = &self.health else {
            return "-".into();
        };
        let mut problems = Vec::new();
        if report["degraded_mode"]
            .as_str()
            .is_some_and(|m| m != "inactive")
        {
            problems.push("degraded".to_string());
        }
        if report["tpm_enabled"] == true && report["tpm_available"] == false {
            problems.push("tpm_fallback".into());
        }
        if let Some(n) = report["rotation_failures"].as_u64().filter(|n| *n > 0) {
            problems.push(format!("rotation_failures={n}"));
        }
        if !report["clock_rollback_secs"].is_null() {
            problems.push("clock_rollback".into());
        }
        if report["audit_chain_ok"] == false {
            problems.push("audit_chain_broken".into());
        }
        if problems.is_empty() {
            "ok".into()
        } else {
            problems.join(",")
        }
    }
}

/// `last_seen_at` is written when it is older than this: a machine polling every minute costs
/// one write in five minutes, not one per poll.
pub const LAST_SEEN_RESOLUTION_SECS: i64 = 300;

/// Why a recovery token could not be consumed. Only the holder of the machine's current
/// token learns that the machine is revoked; every other case is one answer on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryProblem {
    UnknownMachine,
    /// The machine has no recovery token (enrolled before recovery existed).
    NoToken,
    /// Not the machine's current token: wrong, or already spent.
    TokenMismatch,
    Revoked,
}

impl RecoveryProblem {
    /// For the audit trail (never sent to the caller).
    pub fn as_str(self) -> &'static str {
        match self {
            RecoveryProblem::UnknownMachine => "unknown_machine",
            RecoveryProblem::NoToken => "no_recovery_token",
            RecoveryProblem::TokenMismatch => "token_mismatch",
            RecoveryProblem::Revoked => "machine_revoked",
        }
    }
}

const MACHINE_SELECT: &str =
    "SELECT m.id, m.client_id, m.hostname, m.hardware_id, m.arch, m.enrolled_at, \
     m.last_enrolled_at, m.revoked_at, m.rotation_requested_at, m.recovered_at, m.last_seen_at, \
     m.health_report, m.health_reported_at, c.serial AS cert_serial, c.expires_at AS cert_expires_at \
     FROM machines m LEFT JOIN certificates c ON c.machine_id = m.id AND c.state = 'active'";

fn machine(row: &AnyRow) -> Result<MachineRecord> {
    Ok(MachineRecord {
        id: row.try_get("id")?,
        client_id: row.try_get("client_id")?,
        hostname: row.try_get("hostname")?,
        hardware_id: row.try_get("hardware_id")?,
        arch: row.try_get("arch")?,
        enrolled_at: ts(row, "enrolled_at")?,
        last_enrolled_at: ts(row, "last_enrolled_at")?,
        revoked_at: opt_ts(row, "revoked_at")?,
        certificate_serial: row.try_get("cert_serial")?,
        certificate_expires_at: opt_ts(row, "cert_expires_at")?,
        rotation_requested_at: opt_ts(row, "rotation_requested_at")?,
        recovered_at: opt_ts(row, "recovered_at")?,
        last_seen_at: opt_ts(row, "last_seen_at")?,
        health: row
            .try_get::<Option<String>, _>("health_report")?
            .map(|text| serde_json::from_str(&text))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("machine health report: {e}")))?,
        health_reported_at: opt_ts(row, "health_reported_at")?,
    })
}

/// Records that the machine was seen at `now`, when the stored time is older than
/// [`LAST_SEEN_RESOLUTION_SECS`] (the caller read it with the request's authentication).
pub async fn touch_seen<'e>(ex: impl AnyExecutor<'e>, id: &str, now: Timestamp) -> Result<()> {
    sqlx::query(
        "UPDATE machines SET last_seen_at = $1 \
         WHERE id = $2 AND (last_seen_at IS NULL OR last_seen_at <= $3)",
    )
    .bind(now.0)
    .bind(id)
    .bind(now.0 - LAST_SEEN_RESOLUTION_SECS)
    .execute(ex)
    .await?;
    Ok(())
}

/// Stores the machine's health report (`json`) when it differs from the stored one. Returns
/// whether it changed.
pub async fn set_health<'e>(
    ex: impl AnyExecutor<'e>,
    id: &str,
    json: &str,
    now: Timestamp,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE machines SET health_report = $1, health_reported_at = $2 \
         WHERE id = $3 AND (health_report IS NULL OR health_report <> $1)",
    )
    .bind(json)
    .bind(now.0)
    .bind(id)
    .execute(ex)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Machines, of one client or all, in enrollment order.
pub async fn list<'e>(
    ex: impl AnyExecutor<'e>,
    client_id: Option<&str>,
) -> Result<Vec<MachineRecord>> {
    let rows = sqlx::query(&format!(
        "{MACHINE_SELECT} WHERE ($1 IS NULL OR m.client_id = $1) ORDER BY m.enrolled_at, m.id"
    ))
    .bind(client_id)
    .fetch_all(ex)
    .await?;
    rows.iter().map(machine).collect()
}

pub async fn get<'e>(ex: impl AnyExecutor<'e>, id: &str) -> Result<Option<MachineRecord>> {
    find_one(
        ex,
        &format!("{MACHINE_SELECT} WHERE m.id = $1"),
        id,
        machine,
    )
    .await
}

/// The machine an enrollment lands on.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub id: String,
    pub revoked: bool,
    /// The row was created by this enrollment (a new machine).
    pub created: bool,
}

/// Finds the client's machine with this hardware id or creates it (with id `new_id`), in one
/// statement.
pub async fn upsert(
    conn: &mut AnyConnection,
    new_id: &str,
    client_id: &str,
    hostname: &str,
    hardware_id: &str,
    arch: &str,
    now: Timestamp,
) -> Result<Enrolled> {
    let row = sqlx::query(
        "INSERT INTO machines (id, client_id, hostname, hardware_id, arch, enrolled_at, last_enrolled_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $6) \
         ON CONFLICT (client_id, hardware_id) DO UPDATE SET \
           hostname = excluded.hostname, arch = excluded.arch, last_enrolled_at = excluded.last_enrolled_at \
         RETURNING id, revoked_at",
    )
    .bind(new_id)
    .bind(client_id)
    .bind(hostname)
    .bind(hardware_id)
    .bind(arch)
    .bind(now.0)
    .fetch_one(&mut *conn)
    .await
    .map_err(StoreError::classify)?;
    let id: String = row.try_get("id")?;
    Ok(Enrolled {
        created: id == new_id,
        revoked: opt_ts(&row, "revoked_at")?.is_some(),
        id,
    })
}

/// Re-enrolls machine `id` of `client_id` under the hardware id it now reports (an install token
/// bound to it). `None` when the client has no such machine; [`StoreError::Conflict`] when
/// another of the client's machines has that hardware id.
pub async fn rebind(
    conn: &mut AnyConnection,
    id: &str,
    client_id: &str,
    hostname: &str,
    hardware_id: &str,
    arch: &str,
    now: Timestamp,
) -> Result<Option<Enrolled>> {
    let row = sqlx::query(
        "UPDATE machines SET hostname = $1, hardware_id = $2, arch = $3, last_enrolled_at = $4 \
         WHERE id = $5 AND client_id = $6 RETURNING revoked_at",
    )
    .bind(hostname)
    .bind(hardware_id)
    .bind(arch)
    .bind(now.0)
    .bind(id)
    .bind(client_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(StoreError::classify)?;
    row.map(|row| {
        Ok(Enrolled {
            id: id.to_string(),
            revoked: opt_ts(&row, "revoked_at")?.is_some(),
            created: false,
        })
    })
    .transpose()
}

/// Runs `sql`, an `UPDATE machines SET <column> = $1 WHERE id = $2`. Returns false when there
/// is no such machine.
async fn set_column<'q, T>(
    conn: &mut AnyConnection,
    sql: &'static str,
    value: T,
    id: &'q str,
) -> Result<bool>
where
    T: 'q + Send + sqlx::Encode<'q, Any> + sqlx::Type<Any>,
{
    let done = sqlx::query(sql)
        .bind(value)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Sets or clears the machine's revocation. Returns false when there is no such machine.
pub async fn set_revoked(
    conn: &mut AnyConnection,
    id: &str,
    revoked_at: Option<Timestamp>,
) -> Result<bool> {
    let sql = "UPDATE machines SET revoked_at = $1 WHERE id = $2";
    set_column(conn, sql, revoked_at.map(|t| t.0), id).await
}

/// Sets (admin force rotation, recovery) or clears (acknowledged rotation) the rotation
/// request. Returns false when there is no such machine.
pub async fn set_rotation_requested(
    conn: &mut AnyConnection,
    id: &str,
    at: Option<Timestamp>,
) -> Result<bool> {
    let sql = "UPDATE machines SET rotation_requested_at = $1 WHERE id = $2";
    set_column(conn, sql, at.map(|t| t.0), id).await
}

/// Replaces the machine's recovery token hash (at enrollment: the previous token is void).
pub async fn set_recovery_hash(
    conn: &mut AnyConnection,
    id: &str,
    token_hash: &str,
) -> Result<bool> {
    let sql = "UPDATE machines SET recovery_hash = $1 WHERE id = $2";
    set_column(conn, sql, token_hash, id).await
}

/// Takes the machine's row lock for the rest of the transaction (PostgreSQL; SQLite's write
/// transaction already excludes every other writer), so that two rotations of one machine
/// never interleave. Returns false when there is no such machine.
pub async fn lock(conn: &mut AnyConnection, id: &str) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE machines SET rotation_requested_at = rotation_requested_at WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Deletes a machine with its certificates, secrets, licenses and rotation nonces. Returns
/// false when there is no such machine.
pub async fn delete(conn: &mut AnyConnection, id: &str) -> Result<bool> {
    for table in ["certificates", "secrets", "licenses", "rotation_nonces"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE machine_id = $1"))
            .bind(id)
            .execute(&mut *conn)
            .await?;
    }
    let done = sqlx::query("DELETE FROM machines WHERE id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Spends the machine's recovery token `token_hash` and stores `next_hash` in its place,
/// atomically: of two concurrent requests with one token exactly one gets the client id back
/// (the other's `WHERE` no longer matches once the first commits). A revoked machine's token
/// is not consumed. Also takes the machine's row lock for the rest of the transaction.
pub async fn consume_recovery_token(
    conn: &mut AnyConnection,
    id: &str,
    token_hash: &str,
    next_hash: &str,
    now: Timestamp,
) -> Result<Option<String>> {
    let row = sqlx::query(
        "UPDATE machines SET recovery_hash = $1, recovered_at = $2 \
         WHERE id = $3 AND recovery_hash = $4 AND revoked_at IS NULL RETURNING client_id",
    )
    .bind(next_hash)
    .bind(now.0)
    .bind(id)
    .bind(token_hash)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|r| Ok(r.try_get("client_id")?)).transpose()
}

/// Why [`consume_recovery_token`] refused `token_hash` for this machine.
pub async fn diagnose_recovery<'e>(
    ex: impl AnyExecutor<'e>,
    id: &str,
    token_hash: &str,
) -> Result<RecoveryProblem> {
    let row = sqlx::query("SELECT recovery_hash, revoked_at FROM machines WHERE id = $1")
        .bind(id)
        .fetch_optional(ex)
        .await?;
    let Some(row) = row else {
        return Ok(RecoveryProblem::UnknownMachine);
    };
    Ok(match row.try_get::<Option<String>, _>("recovery_hash")? {
        None => RecoveryProblem::NoToken,
        Some(h) if h != token_hash => RecoveryProblem::TokenMismatch,
        Some(_) if opt_ts(&row, "revoked_at")?.is_some() => RecoveryProblem::Revoked,
        // Spent by a concurrent request between the two queries.
        Some(_) => RecoveryProblem::TokenMismatch,
    })
}
