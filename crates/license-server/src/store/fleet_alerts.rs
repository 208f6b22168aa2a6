//! The `fleet_alerts` table: one row per fleet condition and machine while the condition holds.
//! Raising inserts the rows of machines newly in the condition and deleting resolves the rows
//! of machines out of it, both in one statement that returns only the rows it changed, so
//! replicas checking at once never report a machine twice.

use sqlx::Row as _;

use super::Result;
use crate::clock::Timestamp;

/// A condition the servers watch the fleet for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// An unrevoked machine made no request to the agent listener since `before` (never seen:
    /// since its last enrollment).
    MachineUnseen { before: Timestamp },
    /// An unrevoked machine's active certificate expires before `before`: it has not renewed.
    CertificateExpiring { before: Timestamp },
}

impl Condition {
    /// The `kind` column, and the alert's name after `fleet.`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::MachineUnseen { .. } => "machine_unseen",
            Self::CertificateExpiring { .. } => "certificate_expiring",
        }
    }

    /// `SELECT` of the ids (`machine_id`) of machines in the condition, with `$2` its bound.
    fn machines_in(&self) -> &'static str {
        match self {
            Self::MachineUnseen { .. } => {
                "SELECT id AS machine_id FROM machines WHERE revoked_at IS NULL \
                 AND COALESCE(last_seen_at, last_enrolled_at) < $2"
            }
            Self::CertificateExpiring { .. } => {
                "SELECT DISTINCT c.machine_id AS machine_id FROM certificates c JOIN machines m ON m.id = c.machine_id \
                 WHERE c.state = 'active' AND m.revoked_at IS NULL AND c.expires_at < $2"
            }
        }
    }

    fn before(&self) -> Timestamp {
        match *self {
            Self::MachineUnseen { before } | Self::CertificateExpiring { before } => before,
        }
    }
}

/// What one check changed for one condition: machine ids, sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub raised: Vec<String>,
    pub resolved: Vec<String>,
}

/// Raises `condition` for the machines newly in it and resolves it for those out of it, as of
/// `now`; returns the rows this call changed.
pub async fn update(
    conn: &mut sqlx::AnyConnection,
    condition: Condition,
    now: Timestamp,
) -> Result<Changes> {
    let kind = condition.kind();
    let in_condition = condition.machines_in();
    let raise = format!(
        "INSERT INTO fleet_alerts (kind, machine_id, raised_at) \
         SELECT $1, ids.machine_id, $3 FROM ({in_condition}) AS ids WHERE true \
         ON CONFLICT (kind, machine_id) DO NOTHING RETURNING machine_id"
    );
    let resolve = format!(
        "DELETE FROM fleet_alerts WHERE kind = $1 AND machine_id NOT IN ({in_condition}) \
         RETURNING machine_id"
    );
    let before = condition.before().0;
    let ids = |rows: Vec<sqlx::any::AnyRow>| -> Result<Vec<String>> {
        let mut ids = rows
            .iter()
            .map(|r| r.try_get::<String, _>("machine_id"))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        ids.sort();
        Ok(ids)
    };
    let raised = sqlx::query(&raise)
        .bind(kind)
        .bind(before)
        .bind(now.0)
        .fetch_all(&mut *conn)
        .await?;
    let resolved = sqlx::query(&resolve)
        .bind(kind)
        .bind(before)
        .fetch_all(&mut *conn)
        .await?;
    Ok(Changes {
        raised: ids(raised)?,
        resolved: ids(resolved)?,
    })
}
