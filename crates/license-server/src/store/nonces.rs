//! The `rotation_nonces` table: nonces of rotate requests seen per machine, so a replayed
//! request is refused. Kept only as long as the request's timestamp could still be accepted.

use sqlx::AnyConnection;

use super::Result;
use crate::clock::Timestamp;

/// Records a rotate request's nonce. Returns false when this machine already used it.
pub async fn insert(
    conn: &mut AnyConnection,
    machine_id: &str,
    nonce: &str,
    now: Timestamp,
) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO rotation_nonces (machine_id, nonce, seen_at) VALUES ($1, $2, $3) \
         ON CONFLICT (machine_id, nonce) DO NOTHING",
    )
    .bind(machine_id)
    .bind(nonce)
    .bind(now.0)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Forgets the machine's nonces seen before `before`: requests that old are refused for their
/// timestamp. Per machine, under its lock, so concurrent rotations of different machines never
/// contend (or deadlock) on each other's rows.
pub async fn purge(conn: &mut AnyConnection, machine_id: &str, before: Timestamp) -> Result<u64> {
    let done = sqlx::query("DELETE FROM rotation_nonces WHERE machine_id = $1 AND seen_at < $2")
        .bind(machine_id)
        .bind(before.0)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected())
}
