//! The `clients` table: the vendor's customers, each owning install tokens and machines.
//!
//! A client is only ever created and listed; its id is the first half of every machine's CN.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row as _};

use super::{find_one, ts, AnyExecutor, Result, StoreError};
use crate::clock::Timestamp;

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ClientRecord {
    pub id: String,
    pub name: String,
    pub created_at: Timestamp,
}

fn client(row: &AnyRow) -> Result<ClientRecord> {
    Ok(ClientRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        created_at: ts(row, "created_at")?,
    })
}

/// Creates a client. A duplicate name is [`StoreError::Conflict`].
pub async fn create(
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

pub async fn list<'e>(ex: impl AnyExecutor<'e>) -> Result<Vec<ClientRecord>> {
    sqlx::query("SELECT id, name, created_at FROM clients ORDER BY created_at, name")
        .fetch_all(ex)
        .await?
        .iter()
        .map(client)
        .collect()
}

pub async fn get<'e>(ex: impl AnyExecutor<'e>, id: &str) -> Result<Option<ClientRecord>> {
    let sql = "SELECT id, name, created_at FROM clients WHERE id = $1";
    find_one(ex, sql, id, client).await
}
