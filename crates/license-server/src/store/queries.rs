//! The queries, written once for both SQLite and PostgreSQL.
//!
//! Functions taking `&mut AnyConnection` run inside a caller's transaction (enrollment and
//! renewal compose several); functions on [`Store`] run on their own.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row as _};

use super::{Store, StoreError};
use crate::clock::Timestamp;

type Result<T> = std::result::Result<T, StoreError>;

fn ts(row: &AnyRow, col: &str) -> Result<Timestamp> {
    Ok(Timestamp(row.try_get::<i64, _>(col)?))
}

fn opt_ts(row: &AnyRow, col: &str) -> Result<Option<Timestamp>> {
    Ok(row.try_get::<Option<i64>, _>(col)?.map(Timestamp))
}

// ---------------------------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ClientRecord {
    pub id: String,
    pub name: String,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct InstallTokenRecord {
    pub id: String,
    pub client_id: String,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub used_at: Option<Timestamp>,
    pub used_by_machine: Option<String>,
}

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
}

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Readonly,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Readonly => "readonly",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "readonly" => Ok(Role::Readonly),
            "admin" => Ok(Role::Admin),
            other => Err(format!("role must be readonly or admin, not {other:?}")),
        }
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AdminTokenRecord {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AuditEvent {
    pub seq: i64,
    pub at: Timestamp,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub outcome: String,
    /// JSON object with the action's parameters; never a secret.
    pub details: serde_json::Value,
}

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

/// What went wrong with an install token that could not be consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenProblem {
    Unknown,
    AlreadyUsed,
    Expired,
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

fn client(row: &AnyRow) -> Result<ClientRecord> {
    Ok(ClientRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        created_at: ts(row, "created_at")?,
    })
}

impl Store {
    pub async fn create_client(
        conn: &mut AnyConnection,
        id: &str,
        name: &str,
        now: Timestamp,
    ) -> Result<ClientRecord> {
        let row = sqlx::query(
            "INSERT INTO clients (id, name, created_at) VALUES ($1, $2, $3) RETURNING id, name, created_at",
        )
        .bind(id)
        .bind(name)
        .bind(now.0)
        .fetch_one(&mut *conn)
        .await
        .map_err(StoreError::classify)?;
        client(&row)
    }

    pub async fn list_clients(&self) -> Result<Vec<ClientRecord>> {
        sqlx::query("SELECT id, name, created_at FROM clients ORDER BY created_at, name")
            .fetch_all(self.pool())
            .await?
            .iter()
            .map(client)
            .collect()
    }

    pub async fn get_client(&self, id: &str) -> Result<Option<ClientRecord>> {
        sqlx::query("SELECT id, name, created_at FROM clients WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool())
            .await?
            .as_ref()
            .map(client)
            .transpose()
    }

    // -----------------------------------------------------------------------------------------
    // Install tokens
    // -----------------------------------------------------------------------------------------

    pub async fn create_install_token(
        conn: &mut AnyConnection,
        id: &str,
        token_hash: &str,
        client_id: &str,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<InstallTokenRecord> {
        sqlx::query(
            "INSERT INTO install_tokens (id, token_hash, client_id, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(token_hash)
        .bind(client_id)
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
        })
    }

    pub async fn list_install_tokens(
        &self,
        client_id: Option<&str>,
    ) -> Result<Vec<InstallTokenRecord>> {
        let rows = sqlx::query(
            "SELECT id, client_id, created_at, expires_at, used_at, used_by_machine FROM install_tokens \
             WHERE ($1 IS NULL OR client_id = $1) ORDER BY created_at",
        )
        .bind(client_id)
        .fetch_all(self.pool())
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
                })
            })
            .collect()
    }

    /// Why a token that [`consume_install_token`] refused was refused.
    pub async fn diagnose_install_token(
        &self,
        token_hash: &str,
        now: Timestamp,
    ) -> Result<TokenProblem> {
        let row =
            sqlx::query("SELECT expires_at, used_at FROM install_tokens WHERE token_hash = $1")
                .bind(token_hash)
                .fetch_optional(self.pool())
                .await?;
        Ok(match row {
            None => TokenProblem::Unknown,
            Some(row) if opt_ts(&row, "used_at")?.is_some() => TokenProblem::AlreadyUsed,
            Some(row) if ts(&row, "expires_at")? <= now => TokenProblem::Expired,
            // Consumed by a concurrent request between the two queries.
            Some(_) => TokenProblem::AlreadyUsed,
        })
    }

    // -----------------------------------------------------------------------------------------
    // Machines
    // -----------------------------------------------------------------------------------------

    pub async fn list_machines(&self, client_id: Option<&str>) -> Result<Vec<MachineRecord>> {
        let rows = sqlx::query(&format!(
            "{MACHINE_SELECT} WHERE ($1 IS NULL OR m.client_id = $1) ORDER BY m.enrolled_at, m.id"
        ))
        .bind(client_id)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(machine).collect()
    }

    pub async fn get_machine(&self, id: &str) -> Result<Option<MachineRecord>> {
        sqlx::query(&format!("{MACHINE_SELECT} WHERE m.id = $1"))
            .bind(id)
            .fetch_optional(self.pool())
            .await?
            .as_ref()
            .map(machine)
            .transpose()
    }

    /// Sets or clears the machine's revocation. Returns false when there is no such machine.
    pub async fn set_machine_revoked(
        conn: &mut AnyConnection,
        id: &str,
        revoked_at: Option<Timestamp>,
    ) -> Result<bool> {
        let done = sqlx::query("UPDATE machines SET revoked_at = $1 WHERE id = $2")
            .bind(revoked_at.map(|t| t.0))
            .bind(id)
            .execute(&mut *conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Deletes a machine with its certificates, secrets, licenses and rotation nonces. Returns
    /// false when there is no such machine.
    pub async fn delete_machine(conn: &mut AnyConnection, id: &str) -> Result<bool> {
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

    /// Why [`consume_recovery_token`] refused `token_hash` for this machine.
    pub async fn diagnose_recovery(
        &self,
        machine_id: &str,
        token_hash: &str,
    ) -> Result<RecoveryProblem> {
        let row = sqlx::query("SELECT recovery_hash, revoked_at FROM machines WHERE id = $1")
            .bind(machine_id)
            .fetch_optional(self.pool())
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

    // -----------------------------------------------------------------------------------------
    // Certificates
    // -----------------------------------------------------------------------------------------

    /// The per-request check of the agent listener: one indexed lookup, no cache, so that a
    /// revocation is seen by every replica at the next request.
    pub async fn certificate_auth(&self, serial: &str) -> Result<Option<CertificateAuth>> {
        let row = sqlx::query(
            "SELECT c.machine_id, c.client_id, c.state, c.expires_at, m.revoked_at \
             FROM certificates c JOIN machines m ON m.id = c.machine_id WHERE c.serial = $1",
        )
        .bind(serial)
        .fetch_optional(self.pool())
        .await?;
        row.map(|row| {
            Ok(CertificateAuth {
                machine_id: row.try_get("machine_id")?,
                client_id: row.try_get("client_id")?,
                state: CertState::parse(&row.try_get::<String, _>("state")?)?,
                expires_at: ts(&row, "expires_at")?,
                machine_revoked: opt_ts(&row, "revoked_at")?.is_some(),
            })
        })
        .transpose()
    }

    pub async fn certificate_stats(&self, now: Timestamp) -> Result<CertificateStats> {
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
        .fetch_one(self.pool())
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

    pub async fn list_certificates(
        &self,
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
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(|r| certificate(r, now)).collect()
    }

    pub async fn get_certificate(
        &self,
        serial: &str,
        now: Timestamp,
    ) -> Result<Option<CertificateRecord>> {
        sqlx::query(&format!("{CERT_SELECT} WHERE serial = $1"))
            .bind(serial)
            .fetch_optional(self.pool())
            .await?
            .as_ref()
            .map(|r| certificate(r, now))
            .transpose()
    }

    /// Moves an active certificate to revoked. Returns false when it was not active.
    pub async fn revoke_certificate(
        conn: &mut AnyConnection,
        serial: &str,
        now: Timestamp,
    ) -> Result<bool> {
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
    pub async fn restore_certificate(conn: &mut AnyConnection, serial: &str) -> Result<bool> {
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
    pub async fn purge_certificates(conn: &mut AnyConnection, now: Timestamp) -> Result<u64> {
        let done =
            sqlx::query("DELETE FROM certificates WHERE state <> 'active' OR expires_at <= $1")
                .bind(now.0)
                .execute(&mut *conn)
                .await?;
        Ok(done.rows_affected())
    }

    // -----------------------------------------------------------------------------------------
    // Admin tokens
    // -----------------------------------------------------------------------------------------

    pub async fn create_admin_token(
        conn: &mut AnyConnection,
        id: &str,
        token_hash: &str,
        name: &str,
        role: Role,
        now: Timestamp,
    ) -> Result<AdminTokenRecord> {
        sqlx::query(
            "INSERT INTO admin_tokens (id, token_hash, name, role, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(token_hash)
        .bind(name)
        .bind(role.as_str())
        .bind(now.0)
        .execute(&mut *conn)
        .await
        .map_err(StoreError::classify)?;
        Ok(AdminTokenRecord {
            id: id.to_string(),
            name: name.to_string(),
            role,
            created_at: now,
        })
    }

    pub async fn admin_token(&self, token_hash: &str) -> Result<Option<AdminTokenRecord>> {
        let row = sqlx::query(
            "SELECT id, name, role, created_at FROM admin_tokens WHERE token_hash = $1 AND revoked_at IS NULL",
        )
        .bind(token_hash)
        .fetch_optional(self.pool())
        .await?;
        row.map(|row| {
            Ok(AdminTokenRecord {
                id: row.try_get("id")?,
                name: row.try_get("name")?,
                role: row
                    .try_get::<String, _>("role")?
                    .parse()
                    .map_err(StoreError::Corrupt)?,
                created_at: ts(&row, "created_at")?,
            })
        })
        .transpose()
    }

    // -----------------------------------------------------------------------------------------
    // Audit
    // -----------------------------------------------------------------------------------------

    pub async fn audit(&self, entry: &NewAuditEvent<'_>) -> Result<()> {
        let mut conn = self.pool().acquire().await?;
        insert_audit(&mut conn, entry).await
    }

    pub async fn list_audit(&self, since_seq: i64, limit: i64) -> Result<Vec<AuditEvent>> {
        let rows = sqlx::query(
            "SELECT seq, at, actor, action, target, outcome, details FROM audit_events \
             WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(since_seq)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                let details: String = row.try_get("details")?;
                Ok(AuditEvent {
                    seq: row.try_get("seq")?,
                    at: ts(row, "at")?,
                    actor: row.try_get("actor")?,
                    action: row.try_get("action")?,
                    target: row.try_get("target")?,
                    outcome: row.try_get("outcome")?,
                    details: serde_json::from_str(&details)
                        .map_err(|e| StoreError::Corrupt(format!("audit details: {e}")))?,
                })
            })
            .collect()
    }
}

const MACHINE_SELECT: &str =
    "SELECT m.id, m.client_id, m.hostname, m.hardware_id, m.arch, m.enrolled_at, \
     m.last_enrolled_at, m.revoked_at, m.rotation_requested_at, m.recovered_at, c.serial AS cert_serial, c.expires_at AS cert_expires_at \
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
    })
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

// ---------------------------------------------------------------------------------------------
// Transaction steps (enrollment, renewal)
// ---------------------------------------------------------------------------------------------

/// Marks an install token used, atomically: of two concurrent requests with one token, exactly
/// one gets the client id back. Returns `(token_id, client_id)`.
pub async fn consume_install_token(
    conn: &mut AnyConnection,
    token_hash: &str,
    now: Timestamp,
) -> Result<Option<(String, String)>> {
    let row = sqlx::query(
        "UPDATE install_tokens SET used_at = $1 \
         WHERE token_hash = $2 AND used_at IS NULL AND expires_at > $1 RETURNING id, client_id",
    )
    .bind(now.0)
    .bind(token_hash)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|r| Ok((r.try_get("id")?, r.try_get("client_id")?)))
        .transpose()
}

pub async fn mark_install_token_machine(
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

/// Finds the client's machine with this hardware id or creates it, in one statement.
/// Returns `(machine_id, revoked)`.
pub async fn upsert_machine(
    conn: &mut AnyConnection,
    new_id: &str,
    client_id: &str,
    hostname: &str,
    hardware_id: &str,
    arch: &str,
    now: Timestamp,
) -> Result<(String, bool)> {
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
    Ok((row.try_get("id")?, opt_ts(&row, "revoked_at")?.is_some()))
}

/// Replaces the machine's recovery token hash (at enrollment: the previous token is void).
pub async fn set_recovery_hash(
    conn: &mut AnyConnection,
    machine_id: &str,
    token_hash: &str,
) -> Result<()> {
    sqlx::query("UPDATE machines SET recovery_hash = $1 WHERE id = $2")
        .bind(token_hash)
        .bind(machine_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Spends the machine's recovery token `token_hash` and stores `next_hash` in its place,
/// atomically: of two concurrent requests with one token exactly one gets the client id back
/// (the other's `WHERE` no longer matches once the first commits). A revoked machine's token
/// is not consumed. Also takes the machine's row lock for the rest of the transaction.
pub async fn consume_recovery_token(
    conn: &mut AnyConnection,
    machine_id: &str,
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
    .bind(machine_id)
    .bind(token_hash)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|r| Ok(r.try_get("client_id")?)).transpose()
}

/// Supersedes the machine's current certificate (if any). Returns how many rows moved.
pub async fn supersede_active_certificate(
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

pub async fn insert_active_certificate(
    conn: &mut AnyConnection,
    cert: &NewCertificate<'_>,
) -> Result<()> {
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

/// One audit row about to be appended.
#[derive(Debug)]
pub struct NewAuditEvent<'a> {
    pub at: Timestamp,
    pub actor: &'a str,
    pub action: &'a str,
    pub target: Option<&'a str>,
    pub outcome: &'a str,
    pub details: serde_json::Value,
}

pub async fn insert_audit(conn: &mut AnyConnection, e: &NewAuditEvent<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit_events (at, actor, action, target, outcome, details) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(e.at.0)
    .bind(e.actor)
    .bind(e.action)
    .bind(e.target)
    .bind(e.outcome)
    .bind(e.details.to_string())
    .execute(&mut *conn)
    .await?;
    Ok(())
}
