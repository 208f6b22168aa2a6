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

/// One row as the change feed reads it (`service::changes`).
#[derive(Debug, Clone)]
pub struct FeedRow {
    pub seq: i64,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub outcome: String,
    pub details: String,
}

/// Up to `limit` rows after `after`, in order (the primary key's range).
pub async fn feed_rows<'e>(
    ex: impl AnyExecutor<'e>,
    after: i64,
    limit: i64,
) -> Result<Vec<FeedRow>> {
    let rows = sqlx::query(
        "SELECT seq, actor, action, target, outcome, details FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(ex)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(FeedRow {
                seq: r.try_get("seq")?,
                actor: r.try_get("actor")?,
                action: r.try_get("action")?,
                target: r.try_get("target")?,
                outcome: r.try_get("outcome")?,
                details: r.try_get("details")?,
            })
        })
        .collect::<std::result::Result<_, sqlx::Error>>()
        .map_err(StoreError::from)
}

/// The highest sequence number (0 when the trail is empty).
pub async fn last_seq<'e>(ex: impl AnyExecutor<'e>) -> Result<i64> {
    let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS seq FROM audit_events")
        .fetch_one(ex)
        .await?;
    Ok(row.try_get("seq")?)
}

/// The first sequence number of a row at or after `since`, if any.
pub async fn first_seq_since<'e>(
    ex: impl AnyExecutor<'e>,
    since: Timestamp,
) -> Result<Option<i64>> {
    let row = sqlx::query("SELECT MIN(seq) AS seq FROM audit_events WHERE at >= $1")
        .bind(since.0)
        .fetch_one(ex)
        .await?;
    Ok(row.try_get("seq")?)
}

/// What the dashboard's audit page filters on; `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter<'a> {
    pub actor: Option<&'a str>,
    pub action: Option<&'a str>,
    /// Events on any of these objects (machine ids, certificate serials, license ids…).
    pub targets: Option<&'a [String]>,
    /// Only events before this sequence number (paging back).
    pub before_seq: Option<i64>,
}

/// Up to `limit` events matching `filter`, newest first.
pub async fn search<'e>(
    ex: impl AnyExecutor<'e>,
    filter: &AuditFilter<'_>,
    limit: i64,
) -> Result<Vec<AuditEvent>> {
    let mut sql = String::from(
        "SELECT seq, at, actor, action, target, outcome, details FROM audit_events \
         WHERE ($1 IS NULL OR actor = $1) AND ($2 IS NULL OR action = $2) AND ($3 IS NULL OR seq < $3)",
    );
    let targets = filter.targets.unwrap_or_default();
    if filter.targets.is_some() {
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders: Vec<String> = (0..targets.len()).map(|i| format!("${}", i + 5)).collect();
        sql.push_str(&format!(" AND target IN ({})", placeholders.join(", ")));
    }
    sql.push_str(" ORDER BY seq DESC LIMIT $4");
    let mut query = sqlx::query(&sql)
        .bind(filter.actor)
        .bind(filter.action)
        .bind(filter.before_seq)
        .bind(limit);
    for target in targets {
        query = query.bind(target.as_str());
    }
    let rows = query.fetch_all(ex).await?;
    rows.iter().map(event).collect()
}

fn event(row: &sqlx::any::AnyRow) -> Result<AuditEvent> {
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
    rows.iter().map(event).collect()
}
