//! The release tables: `release_keys` (the public release keys, so every replica announces
//! them), `releases` (each release's signed manifest and rollout state), `release_chunks` (the
//! binaries in 256 KiB chunks, so every replica serves them a chunk at a time) and
//! `release_reports` (each machine's latest report on each release).
//!
//! Rows are parsed into typed values here: a row that does not parse is
//! [`StoreError::Corrupt`], naming the column.

use std::collections::BTreeMap;

use license_protocol::license_keys::KeyId;
use license_protocol::release::{Channel, ReleaseManifest, UpdateOutcome, Version};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row as _};

use super::{opt_ts, ts, AnyExecutor, Result, StoreError};
use crate::clock::Timestamp;

/// Bytes per row of `release_chunks`.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// Where a release key stands in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Current,
    Retired,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Current => "current",
            KeyState::Retired => "retired",
        }
    }
}

/// One row of `release_keys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseKeyRow {
    pub id: KeyId,
    /// `ed25519:<base64>`.
    pub public_key: String,
    pub state: KeyState,
    pub created_at: Timestamp,
    pub retired_at: Option<Timestamp>,
}

fn corrupt(column: &str, value: &str) -> StoreError {
    StoreError::Corrupt(format!(
        "{column} {:?}",
        value.chars().take(64).collect::<String>()
    ))
}

fn parse<T: std::str::FromStr>(row: &AnyRow, column: &str) -> Result<T> {
    let text: String = row.try_get(column)?;
    text.parse().map_err(|_| corrupt(column, &text))
}

fn key_row(row: &AnyRow) -> Result<ReleaseKeyRow> {
    let state: String = row.try_get("state")?;
    Ok(ReleaseKeyRow {
        id: parse(row, "id")?,
        public_key: row.try_get("public_key")?,
        state: match state.as_str() {
            "current" => KeyState::Current,
            "retired" => KeyState::Retired,
            _ => return Err(corrupt("release key state", &state)),
        },
        created_at: ts(row, "created_at")?,
        retired_at: opt_ts(row, "retired_at")?,
    })
}

/// Every release key, oldest first.
pub async fn keys<'e>(ex: impl AnyExecutor<'e>) -> Result<Vec<ReleaseKeyRow>> {
    let rows = sqlx::query(
        "SELECT id, public_key, state, created_at, retired_at FROM release_keys \
         ORDER BY created_at, id",
    )
    .fetch_all(ex)
    .await?;
    rows.iter().map(key_row).collect()
}

/// Adds a key, current.
pub async fn insert_key(
    conn: &mut AnyConnection,
    id: KeyId,
    public_key: &str,
    created_at: Timestamp,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO release_keys (id, public_key, state, created_at) VALUES ($1, $2, 'current', $3)",
    )
    .bind(id.to_string())
    .bind(public_key)
    .bind(created_at.0)
    .execute(conn)
    .await
    .map_err(StoreError::classify)?;
    Ok(())
}

/// Retires the current key(s).
pub async fn retire_current(conn: &mut AnyConnection, now: Timestamp) -> Result<()> {
    sqlx::query(
        "UPDATE release_keys SET state = 'retired', retired_at = $1 WHERE state = 'current'",
    )
    .bind(now.0)
    .execute(conn)
    .await?;
    Ok(())
}

/// Where a release stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReleaseState {
    /// Offered to the machines its rollout covers.
    Active,
    /// Offered to no one until resumed.
    Paused,
    /// Paused by the server: too many machines reported a failed update.
    Halted,
    /// Final: neither offered nor downloadable.
    Withdrawn,
}

impl ReleaseState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseState::Active => "active",
            ReleaseState::Paused => "paused",
            ReleaseState::Halted => "halted",
            ReleaseState::Withdrawn => "withdrawn",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        match s {
            "active" => Ok(Self::Active),
            "paused" => Ok(Self::Paused),
            "halted" => Ok(Self::Halted),
            "withdrawn" => Ok(Self::Withdrawn),
            other => Err(corrupt("release state", other)),
        }
    }
}

/// One row of `releases`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseRow {
    pub id: uuid::Uuid,
    pub version: Version,
    pub channel: Channel,
    pub arch: String,
    pub sha256: String,
    pub size: u64,
    pub min_version: Option<Version>,
    pub rollback: bool,
    pub published_at: i64,
    pub key_id: KeyId,
    pub signature: String,
    pub state: ReleaseState,
    pub percent: u8,
    pub clients: Vec<uuid::Uuid>,
    pub halt_after_failures: u32,
    pub halted_reason: Option<String>,
}

impl ReleaseRow {
    /// The manifest as it was signed.
    pub fn manifest(&self) -> ReleaseManifest {
        ReleaseManifest {
            release_id: self.id,
            version: self.version,
            channel: self.channel.clone(),
            arch: self.arch.clone(),
            sha256: self.sha256.clone(),
            size: self.size,
            min_version: self.min_version,
            rollback: self.rollback,
            published_at: self.published_at,
        }
    }

    /// Rows of `release_chunks` the binary takes.
    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(CHUNK_BYTES as u64)
    }
}

const RELEASE_COLUMNS: &str = "r.id, r.version, r.channel, r.arch, r.sha256, r.size, \
    r.min_version, r.rollback, r.published_at, r.key_id, r.signature, r.state, r.percent, \
    r.clients, r.halt_after_failures, r.halted_reason";

fn release_row(row: &AnyRow) -> Result<ReleaseRow> {
    let size: i64 = row.try_get("size")?;
    let percent: i64 = row.try_get("percent")?;
    let halt: i64 = row.try_get("halt_after_failures")?;
    let clients: String = row.try_get("clients")?;
    let min_version: Option<String> = row.try_get("min_version")?;
    let state: String = row.try_get("state")?;
    Ok(ReleaseRow {
        id: parse(row, "id")?,
        version: parse(row, "version")?,
        channel: parse(row, "channel")?,
        arch: row.try_get("arch")?,
        sha256: row.try_get("sha256")?,
        size: u64::try_from(size).map_err(|_| corrupt("release size", &size.to_string()))?,
        min_version: min_version
            .map(|v| v.parse().map_err(|_| corrupt("min_version", &v)))
            .transpose()?,
        rollback: row.try_get::<i64, _>("rollback")? != 0,
        published_at: row.try_get("published_at")?,
        key_id: parse(row, "key_id")?,
        signature: row.try_get("signature")?,
        state: ReleaseState::parse(&state)?,
        percent: u8::try_from(percent)
            .ok()
            .filter(|p| *p <= 100)
            .ok_or_else(|| corrupt("release percent", &percent.to_string()))?,
        clients: serde_json::from_str(&clients)
            .map_err(|_| corrupt("release clients", &clients))?,
        halt_after_failures: u32::try_from(halt)
            .map_err(|_| corrupt("halt_after_failures", &halt.to_string()))?,
        halted_reason: row.try_get("halted_reason")?,
    })
}

fn clients_json(clients: &[uuid::Uuid]) -> String {
    serde_json::to_string(clients).unwrap_or_else(|_| "[]".into())
}

/// Adds a release (its binary's chunks go in after it).
pub async fn insert(conn: &mut AnyConnection, r: &ReleaseRow) -> Result<()> {
    sqlx::query(
        "INSERT INTO releases (id, version, channel, arch, sha256, size, min_version, rollback, \
         published_at, key_id, signature, state, percent, clients, halt_after_failures, halted_reason) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
    )
    .bind(r.id.to_string())
    .bind(r.version.to_string())
    .bind(r.channel.to_string())
    .bind(&r.arch)
    .bind(&r.sha256)
    .bind(i64::try_from(r.size).unwrap_or(i64::MAX))
    .bind(r.min_version.map(|v| v.to_string()))
    .bind(i64::from(r.rollback))
    .bind(r.published_at)
    .bind(r.key_id.to_string())
    .bind(&r.signature)
    .bind(r.state.as_str())
    .bind(i64::from(r.percent))
    .bind(clients_json(&r.clients))
    .bind(i64::from(r.halt_after_failures))
    .bind(&r.halted_reason)
    .execute(conn)
    .await
    .map_err(StoreError::classify)?;
    Ok(())
}

/// Stores one chunk of a release's binary.
pub async fn insert_chunk(
    conn: &mut AnyConnection,
    release_id: &uuid::Uuid,
    seq: u64,
    data: &[u8],
) -> Result<()> {
    sqlx::query("INSERT INTO release_chunks (release_id, seq, data) VALUES ($1, $2, $3)")
        .bind(release_id.to_string())
        .bind(i64::try_from(seq).unwrap_or(i64::MAX))
        .bind(data)
        .execute(conn)
        .await?;
    Ok(())
}

/// Chunk `seq` of a release's binary.
pub async fn chunk<'e>(
    ex: impl AnyExecutor<'e>,
    release_id: &uuid::Uuid,
    seq: u64,
) -> Result<Option<Vec<u8>>> {
    let row = sqlx::query("SELECT data FROM release_chunks WHERE release_id = $1 AND seq = $2")
        .bind(release_id.to_string())
        .bind(i64::try_from(seq).unwrap_or(i64::MAX))
        .fetch_optional(ex)
        .await?;
    Ok(row.map(|r| r.try_get::<Vec<u8>, _>("data")).transpose()?)
}

/// Sets a release's digest, size and signature (publish, once its chunks are in).
pub async fn set_digest(
    conn: &mut AnyConnection,
    id: &uuid::Uuid,
    sha256: &str,
    size: u64,
    key_id: KeyId,
    signature: &str,
) -> Result<()> {
    sqlx::query(
        "UPDATE releases SET sha256 = $2, size = $3, key_id = $4, signature = $5 WHERE id = $1",
    )
    .bind(id.to_string())
    .bind(sha256)
    .bind(i64::try_from(size).unwrap_or(i64::MAX))
    .bind(key_id.to_string())
    .bind(signature)
    .execute(conn)
    .await?;
    Ok(())
}

/// Re-signs a release (release key rotation).
pub async fn resign(
    conn: &mut AnyConnection,
    id: &uuid::Uuid,
    key_id: KeyId,
    signature: &str,
) -> Result<()> {
    sqlx::query("UPDATE releases SET key_id = $2, signature = $3 WHERE id = $1")
        .bind(id.to_string())
        .bind(key_id.to_string())
        .bind(signature)
        .execute(conn)
        .await?;
    Ok(())
}

/// Every release (of `channel` when given), newest first.
pub async fn list<'e>(ex: impl AnyExecutor<'e>, channel: Option<&str>) -> Result<Vec<ReleaseRow>> {
    let sql = format!(
        "SELECT {RELEASE_COLUMNS} FROM releases r WHERE ($1 IS NULL OR r.channel = $1) \
         ORDER BY r.published_at DESC, r.id"
    );
    let rows = sqlx::query(&sql).bind(channel).fetch_all(ex).await?;
    rows.iter().map(release_row).collect()
}

/// The release of id `id`.
pub async fn get<'e>(ex: impl AnyExecutor<'e>, id: &uuid::Uuid) -> Result<Option<ReleaseRow>> {
    let sql = format!("SELECT {RELEASE_COLUMNS} FROM releases r WHERE r.id = $1");
    let row = sqlx::query(&sql)
        .bind(id.to_string())
        .fetch_optional(ex)
        .await?;
    row.as_ref().map(release_row).transpose()
}

/// The releases of version `version` (one per channel and architecture).
pub async fn by_version<'e>(ex: impl AnyExecutor<'e>, version: Version) -> Result<Vec<ReleaseRow>> {
    let sql = format!("SELECT {RELEASE_COLUMNS} FROM releases r WHERE r.version = $1");
    let rows = sqlx::query(&sql)
        .bind(version.to_string())
        .fetch_all(ex)
        .await?;
    rows.iter().map(release_row).collect()
}

/// An active release of a channel and architecture, and whether the machine asking declined
/// it (reported it `failed` or `refused`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub release: ReleaseRow,
    pub declined: bool,
}

/// The active releases of `channel` and `arch`, each with whether `machine_id` declined it:
/// one query on the `(channel, arch, state)` index, the reports looked up by primary key.
pub async fn candidates<'e>(
    ex: impl AnyExecutor<'e>,
    channel: &Channel,
    arch: &str,
    machine_id: &str,
) -> Result<Vec<Candidate>> {
    let sql = format!(
        "SELECT {RELEASE_COLUMNS}, CASE WHEN EXISTS (SELECT 1 FROM release_reports p \
         WHERE p.release_id = r.id AND p.machine_id = $3 AND p.outcome <> 'success') \
         THEN 1 ELSE 0 END AS declined \
         FROM releases r WHERE r.channel = $1 AND r.arch = $2 AND r.state = 'active'"
    );
    let rows = sqlx::query(&sql)
        .bind(channel.as_str())
        .bind(arch)
        .bind(machine_id)
        .fetch_all(ex)
        .await?;
    rows.iter()
        .map(|row| {
            Ok(Candidate {
                release: release_row(row)?,
                declined: row.try_get::<i64, _>("declined")? != 0,
            })
        })
        .collect()
}

/// Sets a release's state (and the reason of a halt; cleared otherwise).
pub async fn set_state(
    conn: &mut AnyConnection,
    id: &uuid::Uuid,
    state: ReleaseState,
    halted_reason: Option<&str>,
) -> Result<()> {
    sqlx::query("UPDATE releases SET state = $2, halted_reason = $3 WHERE id = $1")
        .bind(id.to_string())
        .bind(state.as_str())
        .bind(halted_reason)
        .execute(conn)
        .await?;
    Ok(())
}

/// Halts a release if it is active; whether this call did (so one replica audits it).
pub async fn halt_if_active(
    conn: &mut AnyConnection,
    id: &uuid::Uuid,
    reason: &str,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE releases SET state = 'halted', halted_reason = $2 WHERE id = $1 AND state = 'active'",
    )
    .bind(id.to_string())
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Sets a release's rollout.
pub async fn set_rollout(
    conn: &mut AnyConnection,
    id: &uuid::Uuid,
    percent: u8,
    clients: &[uuid::Uuid],
) -> Result<()> {
    sqlx::query("UPDATE releases SET percent = $2, clients = $3 WHERE id = $1")
        .bind(id.to_string())
        .bind(i64::from(percent))
        .bind(clients_json(clients))
        .execute(conn)
        .await?;
    Ok(())
}

/// A machine's report on a release, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewReport<'a> {
    pub release_id: &'a uuid::Uuid,
    pub machine_id: &'a str,
    pub outcome: UpdateOutcome,
    pub reason: &'a str,
    pub running_version: Version,
    pub reported_at: Timestamp,
}

/// Keeps `report` as the machine's latest on its release.
pub async fn upsert_report(conn: &mut AnyConnection, report: &NewReport<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO release_reports (release_id, machine_id, outcome, reason, running_version, reported_at) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (release_id, machine_id) DO UPDATE SET \
         outcome = excluded.outcome, reason = excluded.reason, \
         running_version = excluded.running_version, reported_at = excluded.reported_at",
    )
    .bind(report.release_id.to_string())
    .bind(report.machine_id)
    .bind(report.outcome.as_str())
    .bind(report.reason)
    .bind(report.running_version.to_string())
    .bind(report.reported_at.0)
    .execute(conn)
    .await?;
    Ok(())
}

/// Counts of the machines' latest reports on one release.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct ReportCounts {
    pub success: u64,
    pub failed: u64,
    pub refused: u64,
}

impl ReportCounts {
    /// Machines whose update did not end well.
    pub fn not_success(&self) -> u64 {
        self.failed + self.refused
    }
}

/// Report counts by release id (releases without reports are absent).
pub async fn report_counts<'e>(
    ex: impl AnyExecutor<'e>,
    release_id: Option<&uuid::Uuid>,
) -> Result<BTreeMap<uuid::Uuid, ReportCounts>> {
    let rows = sqlx::query(
        "SELECT release_id, outcome, COUNT(*) AS n FROM release_reports \
         WHERE ($1 IS NULL OR release_id = $1) GROUP BY release_id, outcome",
    )
    .bind(release_id.map(uuid::Uuid::to_string))
    .fetch_all(ex)
    .await?;
    let mut counts: BTreeMap<uuid::Uuid, ReportCounts> = BTreeMap::new();
    for row in &rows {
        let id: uuid::Uuid = parse(row, "release_id")?;
        let n = u64::try_from(row.try_get::<i64, _>("n")?).unwrap_or(0);
        let outcome: String = row.try_get("outcome")?;
        let c = counts.entry(id).or_default();
        match outcome.as_str() {
            "success" => c.success += n,
            "failed" => c.failed += n,
            "refused" => c.refused += n,
            other => return Err(corrupt("report outcome", other)),
        }
    }
    Ok(counts)
}
