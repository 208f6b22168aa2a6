//! Fleet-wide counts for `/metrics` (and the dashboard's overview): aggregate queries, never a
//! scan into memory, so they hold for a large fleet.

use sqlx::Row as _;

use super::{AnyExecutor, Result};
use crate::clock::Timestamp;

/// Machines by health, certificates and licenses expiring soon.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gauges {
    pub seen_last_hour: i64,
    pub seen_last_day: i64,
    pub seen_longer_ago: i64,
    pub never_seen: i64,
    pub revoked: i64,
    pub degraded: i64,
    pub tpm_fallback: i64,
    pub rotation_failing: i64,
    /// Unrevoked machines whose latest report shows a clock rollback.
    pub clock_rollbacks: i64,
    pub certificates_7d: i64,
    pub certificates_30d: i64,
    pub licenses_7d: i64,
    pub licenses_30d: i64,
}

const HOUR: i64 = 3_600;
const DAY: i64 = 86_400;

/// Unrevoked machines whose latest report shows degraded mode (not `inactive`).
pub const DEGRADED: &str = "revoked_at IS NULL AND health_report IS NOT NULL \
     AND health_report NOT LIKE '%\"degraded_mode\":\"inactive\"%'";
/// Unrevoked machines whose TPM is configured but whose file store is in use.
pub const TPM_FALLBACK: &str = "revoked_at IS NULL \
     AND health_report LIKE '%\"tpm_enabled\":true,\"tpm_available\":false%'";
/// Unrevoked machines whose latest report counts failed rotations.
pub const ROTATION_FAILING: &str = "revoked_at IS NULL AND health_report IS NOT NULL \
     AND health_report NOT LIKE '%\"rotation_failures\":0,%'";
/// Unrevoked machines whose latest report shows a clock rollback.
pub const CLOCK_ROLLBACK: &str = "revoked_at IS NULL AND health_report IS NOT NULL \
     AND health_report NOT LIKE '%\"clock_rollback_secs\":null%'";
/// Unrevoked machines with failed rotations or a clock rollback (the overview's list).
pub const TROUBLED: &str = "revoked_at IS NULL AND health_report IS NOT NULL \
     AND (health_report NOT LIKE '%\"rotation_failures\":0,%' \
          OR health_report NOT LIKE '%\"clock_rollback_secs\":null%')";

/// The counts as of `now`. Health problems are read from the latest reports (JSON text,
/// matched on the fields the server itself wrote). Seen buckets count unrevoked machines.
///
/// Each count is its own subquery so that each is answered from a small index of migration
/// 0007 (partial indexes whose predicates are the constants above, word for word: the
/// planners match them textually) instead of a scan of every report: a fleet of 100,000
/// machines costs a few milliseconds, not a pass over its JSON.
pub async fn gauges<'e>(ex: impl AnyExecutor<'e> + Copy, now: Timestamp) -> Result<Gauges> {
    let n = now.0;
    let count = |predicate: &str| format!("(SELECT COUNT(*) FROM machines WHERE {predicate})");
    let machines = sqlx::query(&format!(
        "SELECT {} AS hour, {} AS day, {} AS longer, {} AS never, {} AS revoked, \
           {} AS degraded, {} AS tpm_fallback, {} AS failing, {} AS rollbacks",
        count("revoked_at IS NULL AND last_seen_at >= $1"),
        count("revoked_at IS NULL AND last_seen_at < $1 AND last_seen_at >= $2"),
        count("revoked_at IS NULL AND last_seen_at < $2"),
        count("revoked_at IS NULL AND last_seen_at IS NULL"),
        count("revoked_at IS NOT NULL"),
        count(DEGRADED),
        count(TPM_FALLBACK),
        count(ROTATION_FAILING),
        count(CLOCK_ROLLBACK),
    ))
    .bind(n - HOUR)
    .bind(n - DAY)
    .fetch_one(ex)
    .await?;
    let certificates = sqlx::query(
        "SELECT \
           COALESCE(SUM(CASE WHEN expires_at <= $2 THEN 1 ELSE 0 END), 0) AS week, \
           COUNT(*) AS month \
         FROM certificates WHERE state = 'active' AND expires_at > $1 AND expires_at <= $3",
    )
    .bind(n)
    .bind(n + 7 * DAY)
    .bind(n + 30 * DAY)
    .fetch_one(ex)
    .await?;
    let licenses = sqlx::query(
        "SELECT \
           COALESCE(SUM(CASE WHEN expires_at <= $2 THEN 1 ELSE 0 END), 0) AS week, \
           COUNT(*) AS month \
         FROM licenses WHERE revoked_at IS NULL AND expires_at > $1 AND expires_at <= $3",
    )
    .bind(n)
    .bind(n + 7 * DAY)
    .bind(n + 30 * DAY)
    .fetch_one(ex)
    .await?;
    Ok(Gauges {
        seen_last_hour: machines.try_get("hour")?,
        seen_last_day: machines.try_get("day")?,
        seen_longer_ago: machines.try_get("longer")?,
        never_seen: machines.try_get("never")?,
        revoked: machines.try_get("revoked")?,
        degraded: machines.try_get("degraded")?,
        tpm_fallback: machines.try_get("tpm_fallback")?,
        rotation_failing: machines.try_get("failing")?,
        clock_rollbacks: machines.try_get("rollbacks")?,
        certificates_7d: certificates.try_get("week")?,
        certificates_30d: certificates.try_get("month")?,
        licenses_7d: licenses.try_get("week")?,
        licenses_30d: licenses.try_get("month")?,
    })
}

/// Something of one machine that expires soon (a certificate or a license).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiring {
    /// The certificate's serial or the license's id.
    pub id: String,
    pub machine_id: String,
    pub hostname: String,
    pub expires_at: Timestamp,
}

/// The `limit` active certificates that expire first within `within_secs` of `now` (not yet
/// expired), soonest first. Served by the partial index of migration 0007.
pub async fn expiring_certificates<'e>(
    ex: impl AnyExecutor<'e>,
    now: Timestamp,
    within_secs: i64,
    limit: i64,
) -> Result<Vec<Expiring>> {
    expiring(
        ex,
        "SELECT c.serial AS id, c.machine_id, m.hostname, c.expires_at FROM certificates c \
         JOIN machines m ON m.id = c.machine_id \
         WHERE c.state = 'active' AND c.expires_at > $1 AND c.expires_at <= $2 \
         ORDER BY c.expires_at, c.serial LIMIT $3",
        now,
        within_secs,
        limit,
    )
    .await
}

/// The `limit` unrevoked licenses that expire first within `within_secs` of `now`.
pub async fn expiring_licenses<'e>(
    ex: impl AnyExecutor<'e>,
    now: Timestamp,
    within_secs: i64,
    limit: i64,
) -> Result<Vec<Expiring>> {
    expiring(
        ex,
        "SELECT l.id, l.machine_id, m.hostname, l.expires_at FROM licenses l \
         JOIN machines m ON m.id = l.machine_id \
         WHERE l.revoked_at IS NULL AND l.expires_at > $1 AND l.expires_at <= $2 \
         ORDER BY l.expires_at, l.id LIMIT $3",
        now,
        within_secs,
        limit,
    )
    .await
}

async fn expiring<'e>(
    ex: impl AnyExecutor<'e>,
    sql: &str,
    now: Timestamp,
    within_secs: i64,
    limit: i64,
) -> Result<Vec<Expiring>> {
    let rows = sqlx::query(sql)
        .bind(now.0)
        .bind(now.0.saturating_add(within_secs))
        .bind(limit)
        .fetch_all(ex)
        .await?;
    rows.iter()
        .map(|row| {
            Ok(Expiring {
                id: row.try_get("id")?,
                machine_id: row.try_get("machine_id")?,
                hostname: row.try_get("hostname")?,
                expires_at: Timestamp(row.try_get("expires_at")?),
            })
        })
        .collect()
}

/// An unrevoked machine whose latest report shows a rotation failure or a clock rollback.
#[derive(Debug, Clone)]
pub struct Troubled {
    pub id: String,
    pub client_id: String,
    pub hostname: String,
    pub last_seen_at: Option<Timestamp>,
    /// The report, as stored.
    pub health: Option<serde_json::Value>,
}

/// Up to `limit` unrevoked machines whose latest report shows failed rotations or a clock
/// rollback, most recently reported first (matched on the report's JSON text as [`gauges`]
/// counts them).
pub async fn troubled_machines<'e>(ex: impl AnyExecutor<'e>, limit: i64) -> Result<Vec<Troubled>> {
    let rows = sqlx::query(&format!(
        "SELECT id, client_id, hostname, last_seen_at, health_report FROM machines \
         WHERE {TROUBLED} ORDER BY health_reported_at DESC, id LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(ex)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Troubled {
                id: row.try_get("id")?,
                client_id: row.try_get("client_id")?,
                hostname: row.try_get("hostname")?,
                last_seen_at: row
                    .try_get::<Option<i64>, _>("last_seen_at")?
                    .map(Timestamp),
                health: row
                    .try_get::<Option<String>, _>("health_report")?
                    .and_then(|text| serde_json::from_str(&text).ok()),
            })
        })
        .collect()
}

/// One client with its machine counts.
#[derive(Debug, Clone)]
pub struct ClientCounts {
    pub id: String,
    pub name: String,
    pub created_at: Timestamp,
    pub machines: i64,
    pub revoked: i64,
}

/// Every client with how many machines it has (and how many of them are revoked), by name.
pub async fn clients_with_counts<'e>(ex: impl AnyExecutor<'e>) -> Result<Vec<ClientCounts>> {
    let rows = sqlx::query(
        "SELECT c.id, c.name, c.created_at, COUNT(m.id) AS machines, \
           COALESCE(SUM(CASE WHEN m.revoked_at IS NOT NULL THEN 1 ELSE 0 END), 0) AS revoked \
         FROM clients c LEFT JOIN machines m ON m.client_id = c.id \
         GROUP BY c.id, c.name, c.created_at ORDER BY c.name",
    )
    .fetch_all(ex)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(ClientCounts {
                id: row.try_get("id")?,
                name: row.try_get("name")?,
                created_at: Timestamp(row.try_get("created_at")?),
                machines: row.try_get("machines")?,
                revoked: row.try_get("revoked")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The partial indexes of migration 0007 carry the predicates of the queries above word
    /// for word (modulo whitespace), on both backends; otherwise the planners ignore them.
    #[test]
    fn the_partial_indexes_match_the_queries() {
        let squeeze = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        for migration in [
            include_str!("../../migrations/sqlite/0007_dashboard.sql"),
            include_str!("../../migrations/postgres/0007_dashboard.sql"),
        ] {
            let migration = squeeze(migration);
            for predicate in [
                DEGRADED,
                TPM_FALLBACK,
                ROTATION_FAILING,
                CLOCK_ROLLBACK,
                TROUBLED,
            ] {
                let wanted = format!("WHERE {};", squeeze(predicate));
                assert!(migration.contains(&wanted), "{wanted}");
            }
        }
    }
}
