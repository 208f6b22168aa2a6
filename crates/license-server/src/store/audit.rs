//! The `audit_events` table: the server's append-only trail. Every mutation appends its row in
//! its own transaction; a refused one appends it on its own after the rollback.

use serde::Serialize;
use sqlx::Row as _;

use super::{ts, AnyExecutor, Result, StoreError};
use crate::clock::Timestamp;

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

impl<'a> NewAuditEvent<'a> {
    /// `action` by `actor` on `target` succeeded at `at`.
    pub fn success(
        at: Timestamp,
        actor: &'a str,
        action: &'a str,
        target: Option<&'a str>,
        details: serde_json::Value,
    ) -> Self {
        Self {
            at,
            actor,
            action,
            target,
            outcome: "success",
            details,
        }
    }

    /// `action` by `actor` on `target` was refused just now for `reason` (added to `details`).
    pub fn refused(
        actor: &'a str,
        action: &'a str,
        target: Option<&'a str>,
        mut details: serde_json::Value,
        reason: &str,
    ) -> Self {
        details["reason"] = serde_json::Value::from(reason);
        Self {
            at: Timestamp::now(),
            actor,
            action,
            target,
            outcome: "refused",
            details,
        }
    }
}

/// Appends one row, on the pool or inside a caller's transaction.
pub async fn insert<'e>(ex: impl AnyExecutor<'e>, e: &NewAuditEvent<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit_events (at, actor, action, target, outcome, details) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(e.at.0)
    .bind(e.actor)
    .bind(e.action)
    .bind(e.target)
    .bind(e.outcome)
    .bind(e.details.to_string())
    .execute(ex)
    .await?;
    Ok(())
}

/// Up to `limit` events after sequence number `since_seq`, in order.
pub async fn list<'e>(
    ex: impl AnyExecutor<'e>,
    since_seq: i64,
    limit: i64,
) -> Result<Vec<AuditEvent>> {
    let rows = sqlx::query(
        "SELECT seq, at, actor, action, target, outcome, details FROM audit_events \
         WHERE seq > $1 ORDER BY seq LIMIT $2",
    )
    .bind(since_seq)
    .bind(limit)
    .fetch_all(ex)
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
