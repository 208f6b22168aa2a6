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
    pub certificates_7d: i64,
    pub certificates_30d: i64,
    pub licenses_7d: i64,
    pub licenses_30d: i64,
}

const HOUR: i64 = 3_600;
const DAY: i64 = 86_400;

/// The counts as of `now`. Health problems are read from the latest reports (JSON text,
/// matched on the fields the server itself wrote). Seen buckets count unrevoked machines.
pub async fn gauges<'e>(ex: impl AnyExecutor<'e> + Copy, now: Timestamp) -> Result<Gauges> {
    let n = now.0;
    let machines = sqlx::query(
        "SELECT \
           COALESCE(SUM(CASE WHEN revoked_at IS NULL AND last_seen_at >= $1 THEN 1 ELSE 0 END), 0) AS hour, \
           COALESCE(SUM(CASE WHEN revoked_at IS NULL AND last_seen_at < $1 AND last_seen_at >= $2 THEN 1 ELSE 0 END), 0) AS day, \
           COALESCE(SUM(CASE WHEN revoked_at IS NULL AND last_seen_at < $2 THEN 1 ELSE 0 END), 0) AS longer, \
           COALESCE(SUM(CASE WHEN revoked_at IS NULL AND last_seen_at IS NULL THEN 1 ELSE 0 END), 0) AS never, \
           COALESCE(SUM(CASE WHEN revoked_at IS NOT NULL THEN 1 ELSE 0 END), 0) AS revoked, \
           COALESCE(SUM(CASE WHEN revoked_at IS NULL AND health_report LIKE '%\"degraded_mode\":\"inactive\"%' THEN 0 \
                             WHEN revoked_at IS NULL AND health_report IS NOT NULL THEN 1 ELSE 0 END), 0) AS degraded, \
           COALESCE(SUM(CASE WHEN revoked_at IS NULL AND health_report LIKE '%\"tpm_enabled\":true,\"tpm_available\":false%' THEN 1 ELSE 0 END), 0) AS tpm_fallback, \
           COALESCE(SUM(CASE WHEN revoked_at IS NULL AND health_report IS NOT NULL \
                             AND health_report NOT LIKE '%\"rotation_failures\":0,%' THEN 1 ELSE 0 END), 0) AS failing \
         FROM machines",
    )
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
        certificates_7d: certificates.try_get("week")?,
        certificates_30d: certificates.try_get("month")?,
        licenses_7d: licenses.try_get("week")?,
        licenses_30d: licenses.try_get("month")?,
    })
}
