//! The `admin_tokens` table: bearer tokens of the admin API, stored as SHA-256 hashes, each
//! with a name (the audit actor) and a role.

use serde::Serialize;
use sqlx::{AnyConnection, Row as _};

use super::{find_one, ts, AnyExecutor, Result, StoreError};
use crate::clock::Timestamp;

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

pub async fn create(
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

/// The unrevoked token with this hash, if any.
pub async fn find<'e>(
    ex: impl AnyExecutor<'e>,
    token_hash: &str,
) -> Result<Option<AdminTokenRecord>> {
    let sql = "SELECT id, name, role, created_at FROM admin_tokens \
               WHERE token_hash = $1 AND revoked_at IS NULL";
    find_one(ex, sql, token_hash, |row| {
        Ok(AdminTokenRecord {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            role: row
                .try_get::<String, _>("role")?
                .parse()
                .map_err(StoreError::Corrupt)?,
            created_at: ts(row, "created_at")?,
        })
    })
    .await
}
