//! Agent releases, server side (DESIGN.md §4b, docs/OPERATIONS.md "Releasing and rolling
//! out"): publishing a binary with its signed manifest, the staged rollout (percentage, named
//! clients, pause, resume, withdraw, the automatic halt), the release key rotation, and what the
//! agent listener answers: the offer in the secret status, the binary, the update reports.
//!
//! Everything a serving process needs is in the database (`store::releases`), so every replica
//! offers and serves every release; the private release key is only in the publishing host's
//! data directory (`release_keys`). Every administrative change commits with its audit row;
//! refused ones are audited too.

use std::sync::Mutex;

use license_protocol::agent_api::StatusQuery;
use license_protocol::error::ErrorCode;
use license_protocol::identity::MachineIdentity;
use license_protocol::license_keys::KeyId;
use license_protocol::release::{
    hex, in_rollout, AnnouncedReleaseKey, Channel, ReleaseKeyState, ReleaseKeys, UpdateOffer,
    UpdateOutcome, UpdateReport, Version,
};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use sqlx::AnyConnection;
use tokio::io::AsyncReadExt as _;

use super::AppState;
use crate::clock::Timestamp;
use crate::release_keys::{ReleaseKey, ReleaseKeyFile, ReleaseKeyFileError};
use crate::store::audit::{self, NewAuditEvent};
use crate::store::releases::{
    self as stored, Candidate, KeyState, NewReport, ReleaseRow, ReleaseState, ReportCounts,
    CHUNK_BYTES,
};
use crate::store::{clients, StoreError, WriteTx};

/// Channel of `publish` without `--channel`.
pub const DEFAULT_CHANNEL: &str = "stable";
/// Failed or refused updates that halt a rollout, without `--halt-after-failures`.
pub const DEFAULT_HALT_AFTER_FAILURES: u32 = 5;
/// Longest architecture name accepted.
pub const MAX_ARCH_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReleaseError {
    #[error("{field}: {message}")]
    InvalidInput {
        field: &'static str,
        message: String,
    },
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "release key {0} is the database's current release key but this data directory's \
         release-keys.json does not hold it: publish from the host that holds it"
    )]
    KeyNotHeld(KeyId),
    #[error(transparent)]
    KeyFile(#[from] ReleaseKeyFileError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ReleaseError {
    /// Stable code for the JSON error body and the audit trail.
    pub fn code(&self) -> ErrorCode {
        match self {
            ReleaseError::InvalidInput { .. } | ReleaseError::File { .. } => {
                ErrorCode::InvalidRequest
            }
            ReleaseError::NotFound { .. } => ErrorCode::NotFound,
            ReleaseError::Conflict(_) | ReleaseError::KeyNotHeld(_) => ErrorCode::Conflict,
            ReleaseError::KeyFile(_) | ReleaseError::Store(_) => ErrorCode::InternalError,
        }
    }

    fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        ReleaseError::InvalidInput {
            field,
            message: message.into(),
        }
    }

    fn release_not_found(id: &str) -> Self {
        ReleaseError::NotFound {
            what: "release",
            id: id.to_string(),
        }
    }
}

type Result<T, E = ReleaseError> = std::result::Result<T, E>;

/// What `admin release publish` is asked, parsed.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    pub file: std::path::PathBuf,
    pub version: Version,
    pub channel: Channel,
    pub arch: String,
    pub min_version: Option<Version>,
    pub rollback: bool,
    pub percent: u8,
    pub clients: Vec<uuid::Uuid>,
    pub halt_after_failures: u32,
}

/// One release as administrators see it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ReleaseView {
    #[schema(format = Uuid)]
    pub id: String,
    pub version: String,
    pub channel: String,
    pub arch: String,
    pub state: ReleaseState,
    /// Share of the channel's machines offered the release, 0 to 100.
    pub percent: u8,
    /// Clients whose every machine is offered the release.
    pub clients: Vec<String>,
    pub published_at: Timestamp,
    /// Bytes.
    pub size: u64,
    pub sha256: String,
    pub min_version: Option<String>,
    pub rollback: bool,
    /// The release key that signed the manifest.
    pub key_id: String,
    /// Failed or refused updates that halt the rollout.
    pub halt_after_failures: u32,
    pub halted_reason: Option<String>,
    /// Machines' latest reports on this release.
    pub reports: ReportCounts,
}

impl ReleaseView {
    fn of(r: &ReleaseRow, reports: ReportCounts) -> Self {
        Self {
            id: r.id.to_string(),
            version: r.version.to_string(),
            channel: r.channel.to_string(),
            arch: r.arch.clone(),
            state: r.state,
            percent: r.percent,
            clients: r.clients.iter().map(uuid::Uuid::to_string).collect(),
            published_at: Timestamp(r.published_at),
            size: r.size,
            sha256: r.sha256.clone(),
            min_version: r.min_version.map(|v| v.to_string()),
            rollback: r.rollback,
            key_id: r.key_id.to_string(),
            halt_after_failures: r.halt_after_failures,
            halted_reason: r.halted_reason.clone(),
            reports,
        }
    }
}

/// What `admin release rotate-key` did.
#[derive(Debug, Clone, Serialize)]
pub struct RotateKeyReport {
    pub new_key_id: String,
    pub retired_key_id: String,
    /// Releases whose manifests were re-signed with the new key.
    pub resigned: Vec<String>,
}

/// Checks an architecture name as Rust spells it (`x86_64`, `aarch64`).
pub fn parse_arch(arch: &str) -> Result<String> {
    let ok = (1..=MAX_ARCH_LEN).contains(&arch.len())
        && arch
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(arch.to_string())
    } else {
        Err(ReleaseError::invalid(
            "arch",
            format!("1 to {MAX_ARCH_LEN} characters among a-z, 0-9 and '_' (e.g. x86_64)"),
        ))
    }
}

/// One administrator acting on releases (CLI or admin API); the caller names the actor.
#[derive(Debug)]
pub struct ReleaseAdmin<'a> {
    state: &'a AppState,
    actor: String,
}

impl<'a> ReleaseAdmin<'a> {
    pub fn new(state: &'a AppState, actor: impl Into<String>) -> Self {
        Self {
            state,
            actor: actor.into(),
        }
    }

    /// Commits `result` with its audit row, or rolls it back and audits the refusal.
    async fn finish<T>(
        &self,
        tx: WriteTx,
        action: &str,
        target: Option<&str>,
        details: Value,
        result: Result<T>,
    ) -> Result<T> {
        super::finish_audited(self.state, &self.actor, tx, action, target, details, result).await
    }

    /// Stores the binary in chunks while hashing it, signs its manifest with the current
    /// release key (created on first use) and records the release (`release.publish`).
    pub async fn publish(&self, req: &PublishRequest) -> Result<ReleaseView> {
        let id = uuid::Uuid::new_v4();
        let mut tx = self.state.store.begin_write().await?;
        let result = self.publish_in(&mut tx, id, req).await;
        let details = json!({
            "version": req.version.to_string(), "channel": req.channel.to_string(),
            "arch": req.arch, "percent": req.percent, "clients": req.clients,
            "rollback": req.rollback,
            "min_version": req.min_version.map(|v| v.to_string()),
            "sha256": result.as_ref().ok().map(|r| r.sha256.clone()),
            "size": result.as_ref().ok().map(|r| r.size),
        });
        let id = id.to_string();
        let row = self
            .finish(tx, "release.publish", Some(&id), details, result)
            .await?;
        tracing::info!(release = %row.id, version = %row.version, channel = %row.channel, "release published");
        Ok(ReleaseView::of(&row, ReportCounts::default()))
    }

    async fn publish_in(
        &self,
        tx: &mut AnyConnection,
        id: uuid::Uuid,
        req: &PublishRequest,
    ) -> Result<ReleaseRow> {
        parse_arch(&req.arch)?;
        if req.percent > 100 {
            return Err(ReleaseError::invalid("percent", "must be 0 to 100"));
        }
        if req.halt_after_failures == 0 {
            return Err(ReleaseError::invalid(
                "halt_after_failures",
                "must be at least 1",
            ));
        }
        self.check_clients(&req.clients).await?;
        let path = req.file.display().to_string();
        let file_err = |source| ReleaseError::File {
            path: path.clone(),
            source,
        };
        let mut file = tokio::fs::File::open(&req.file).await.map_err(file_err)?;
        let key = signing_key(tx, &self.state.settings.data_dir).await?;
        let mut row = ReleaseRow {
            id,
            version: req.version,
            channel: req.channel.clone(),
            arch: req.arch.clone(),
            sha256: String::new(),
            size: 0,
            min_version: req.min_version,
            rollback: req.rollback,
            published_at: Timestamp::now().0,
            key_id: key.id(),
            signature: String::new(),
            state: ReleaseState::Active,
            percent: req.percent,
            clients: req.clients.clone(),
            halt_after_failures: req.halt_after_failures,
            halted_reason: None,
        };
        stored::insert(tx, &row).await.map_err(|e| match e {
            StoreError::Conflict(_) => ReleaseError::Conflict(format!(
                "release {} for channel {} and arch {} already exists",
                req.version, req.channel, req.arch
            )),
            e => e.into(),
        })?;
        // One chunk in memory at a time, hashed as it is stored.
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; CHUNK_BYTES];
        let mut seq = 0u64;
        loop {
            let mut filled = 0;
            while filled < buf.len() {
                let n = file.read(&mut buf[filled..]).await.map_err(file_err)?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            hasher.update(&buf[..filled]);
            stored::insert_chunk(tx, &id, seq, &buf[..filled]).await?;
            row.size += filled as u64;
            seq += 1;
            if filled < buf.len() {
                break;
            }
        }
        if row.size == 0 {
            return Err(ReleaseError::invalid("FILE", format!("{path} is empty")));
        }
        row.sha256 = hex(&hasher.finalize());
        row.signature = UpdateOffer::signature_of(&row.manifest(), key.signing_key());
        stored::set_digest(tx, &id, &row.sha256, row.size, row.key_id, &row.signature).await?;
        Ok(row)
    }

    async fn check_clients(&self, ids: &[uuid::Uuid]) -> Result<()> {
        for id in ids {
            let id = id.to_string();
            if clients::get(self.state.store.pool(), &id).await?.is_none() {
                return Err(ReleaseError::NotFound { what: "client", id });
            }
        }
        Ok(())
    }

    /// Every release (of `channel` when given), newest first, with its report counts.
    pub async fn list(&self, channel: Option<&str>) -> Result<Vec<ReleaseView>> {
        if let Some(c) = channel {
            c.parse::<Channel>()
                .map_err(|e| ReleaseError::invalid("channel", e.to_string()))?;
        }
        let pool = self.state.store.pool();
        let rows = stored::list(pool, channel).await?;
        let counts = stored::report_counts(pool, None).await?;
        Ok(rows
            .iter()
            .map(|r| ReleaseView::of(r, counts.get(&r.id).copied().unwrap_or_default()))
            .collect())
    }

    /// One release: `release` is its id, or a version exactly one release has.
    pub async fn show(&self, release: &str) -> Result<ReleaseView> {
        let row = find(self.state.store.pool(), release).await?;
        self.view(&row).await
    }

    async fn view(&self, row: &ReleaseRow) -> Result<ReleaseView> {
        let counts = stored::report_counts(self.state.store.pool(), Some(&row.id)).await?;
        Ok(ReleaseView::of(
            row,
            counts.get(&row.id).copied().unwrap_or_default(),
        ))
    }

    /// Sets the percentage and adds named clients (`release.rollout`); refused on a withdrawn
    /// release.
    pub async fn rollout(
        &self,
        release: &str,
        percent: Option<u8>,
        clients: &[uuid::Uuid],
    ) -> Result<ReleaseView> {
        let mut tx = self.state.store.begin_write().await?;
        let result = async {
            if percent.is_some_and(|p| p > 100) {
                return Err(ReleaseError::invalid("percent", "must be 0 to 100"));
            }
            self.check_clients(clients).await?;
            let mut row = find(&mut *tx, release).await?;
            if row.state == ReleaseState::Withdrawn {
                return Err(ReleaseError::Conflict(format!(
                    "release {} is withdrawn",
                    row.id
                )));
            }
            if let Some(p) = percent {
                row.percent = p;
            }
            for c in clients {
                if !row.clients.contains(c) {
                    row.clients.push(*c);
                }
            }
            stored::set_rollout(&mut tx, &row.id, row.percent, &row.clients).await?;
            Ok(row)
        }
        .await;
        let target = result.as_ref().ok().map(|r| r.id.to_string());
        let details = json!({"release": release, "percent": percent, "clients": clients});
        let row = self
            .finish(tx, "release.rollout", target.as_deref(), details, result)
            .await?;
        self.view(&row).await
    }

    /// Stops offering a release until resumed (`release.pause`).
    pub async fn pause(&self, release: &str) -> Result<ReleaseView> {
        self.set_state(release, "release.pause", ReleaseState::Paused)
            .await
    }

    /// Offers a paused or halted release again (`release.resume`; clears a halt).
    pub async fn resume(&self, release: &str) -> Result<ReleaseView> {
        self.set_state(release, "release.resume", ReleaseState::Active)
            .await
    }

    /// Withdraws a release for good: no more offers nor downloads (`release.withdraw`).
    pub async fn withdraw(&self, release: &str) -> Result<ReleaseView> {
        self.set_state(release, "release.withdraw", ReleaseState::Withdrawn)
            .await
    }

    async fn set_state(
        &self,
        release: &str,
        action: &str,
        to: ReleaseState,
    ) -> Result<ReleaseView> {
        let mut tx = self.state.store.begin_write().await?;
        let result = async {
            let mut row = find(&mut *tx, release).await?;
            if row.state == ReleaseState::Withdrawn {
                return Err(ReleaseError::Conflict(format!(
                    "release {} is withdrawn",
                    row.id
                )));
            }
            let from = row.state;
            stored::set_state(&mut tx, &row.id, to, None).await?;
            row.state = to;
            row.halted_reason = None;
            Ok((row, from))
        }
        .await;
        let target = result.as_ref().ok().map(|(r, _)| r.id.to_string());
        let from = result.as_ref().ok().map(|(_, f)| f.as_str());
        let details = json!({"release": release, "from": from, "to": to.as_str()});
        let (row, _) = self
            .finish(tx, action, target.as_deref(), details, result)
            .await?;
        self.view(&row).await
    }

    /// A new release key becomes current, the previous one is retired, and every release not
    /// withdrawn is re-signed with the new key, in one transaction (`release.rotate_key`).
    pub async fn rotate_key(&self) -> Result<RotateKeyReport> {
        let root = self.state.settings.data_dir.root().to_path_buf();
        let mut tx = self.state.store.begin_write().await?;
        let mut new_key = None;
        let result = async {
            let old = signing_key(&mut tx, &self.state.settings.data_dir).await?;
            let now = Timestamp::now();
            let new = ReleaseKey::generate(now);
            // Both keys on disk before the database switches: a crash in between leaves the
            // current key held.
            ReleaseKeyFile {
                keys: vec![old.clone(), new.clone()],
            }
            .write(&root)?;
            stored::retire_current(&mut tx, now).await?;
            stored::insert_key(&mut tx, new.id(), &new.public_key(), now).await?;
            let mut resigned = Vec::new();
            for row in stored::list(&mut *tx, None).await? {
                if row.state == ReleaseState::Withdrawn {
                    continue;
                }
                let signature = UpdateOffer::signature_of(&row.manifest(), new.signing_key());
                stored::resign(&mut tx, &row.id, new.id(), &signature).await?;
                resigned.push(row.id.to_string());
            }
            let report = RotateKeyReport {
                new_key_id: new.id().to_string(),
                retired_key_id: old.id().to_string(),
                resigned,
            };
            new_key = Some(new);
            Ok(report)
        }
        .await;
        let details = match &result {
            Ok(r) => json!({"new_key_id": r.new_key_id, "retired_key_id": r.retired_key_id,
                             "resigned": r.resigned.len()}),
            Err(_) => json!({}),
        };
        let report = self
            .finish(tx, "release.rotate_key", None, details, result)
            .await?;
        // The retired key's private half is kept nowhere.
        if let Some(new) = new_key {
            ReleaseKeyFile { keys: vec![new] }.write(&root)?;
        }
        tracing::info!(new = %report.new_key_id, retired = %report.retired_key_id, "release key rotated");
        Ok(report)
    }
}

/// The release `release` names: its id, or a version exactly one release has.
async fn find<'e>(ex: impl crate::store::AnyExecutor<'e>, release: &str) -> Result<ReleaseRow> {
    if let Ok(id) = release.parse::<uuid::Uuid>() {
        return stored::get(ex, &id)
            .await?
            .ok_or_else(|| ReleaseError::release_not_found(release));
    }
    // A name that is neither an id nor a version names no release.
    let Ok(version) = release.parse::<Version>() else {
        return Err(ReleaseError::release_not_found(release));
    };
    let mut rows = stored::by_version(ex, version).await?;
    match rows.len() {
        0 => Err(ReleaseError::release_not_found(release)),
        1 => Ok(rows.remove(0)),
        n => Err(ReleaseError::Conflict(format!(
            "{n} releases have version {version} (one per channel and arch): name one by its id"
        ))),
    }
}

/// The private key of the database's current release key; on first use (no release key in
/// the database yet) the data directory's newest key, or a new one, becomes current.
async fn signing_key(
    conn: &mut AnyConnection,
    data_dir: &crate::datadir::DataDir,
) -> Result<ReleaseKey> {
    let root = data_dir.root();
    let file = ReleaseKeyFile::load(root)?.unwrap_or_default();
    let rows = stored::keys(&mut *conn).await?;
    if let Some(current) = rows.iter().find(|k| k.state == KeyState::Current) {
        return file
            .get(current.id)
            .cloned()
            .ok_or(ReleaseError::KeyNotHeld(current.id));
    }
    let known = |k: &ReleaseKey| rows.iter().any(|r| r.id == k.id());
    let key = match file.newest().filter(|k| !known(k)) {
        Some(k) => k.clone(),
        None => {
            let key = ReleaseKey::generate(Timestamp::now());
            ReleaseKeyFile {
                keys: vec![key.clone()],
            }
            .write(root)?;
            key
        }
    };
    stored::insert_key(conn, key.id(), &key.public_key(), Timestamp::now()).await?;
    Ok(key)
}

/// The release to offer a machine of `client_id` running `agent_version`, among the active
/// releases of its channel and architecture: the newest (by `published_at`) whose rollout
/// covers the machine, that is newer than what it runs (or a rollback to another version),
/// that it can update from (`min_version`), and that it has not declined (reported `failed`
/// or `refused`).
pub fn choose_offer<'c>(
    candidates: &'c [Candidate],
    machine_id: &uuid::Uuid,
    client_id: &uuid::Uuid,
    agent_version: Version,
) -> Option<&'c ReleaseRow> {
    candidates
        .iter()
        .filter(|c| !c.declined)
        .map(|c| &c.release)
        .filter(|r| r.state == ReleaseState::Active)
        .filter(|r| in_rollout(&r.id, r.percent, &r.clients, machine_id, client_id))
        .filter(|r| r.version > agent_version || (r.rollback && r.version != agent_version))
        .filter(|r| r.min_version.is_none_or(|min| min <= agent_version))
        .max_by_key(|r| (r.published_at, r.id))
}

/// The signed release key set a serving process announces, kept until the license keys
/// change or an offer is signed by a key it does not name current.
#[derive(Debug, Default)]
pub struct ReleaseKeysCache {
    held: Mutex<Option<(String, ReleaseKeys)>>,
}

impl ReleaseKeysCache {
    /// The set to send with a manifest signed by `key_id`.
    async fn for_key(&self, state: &AppState, key_id: KeyId) -> Result<ReleaseKeys, StoreError> {
        let license = state.keys.license_keys.snapshot();
        {
            let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((digest, keys)) = held.as_ref() {
                let names = keys
                    .keys
                    .iter()
                    .any(|k| k.id == key_id && k.state == ReleaseKeyState::Current);
                if *digest == license.digest && names {
                    return Ok(keys.clone());
                }
            }
        }
        let rows = stored::keys(state.store.pool()).await?;
        let issued_at = rows
            .iter()
            .map(|k| k.retired_at.unwrap_or(k.created_at).max(k.created_at).0)
            .max()
            .unwrap_or(0);
        let announced = rows
            .iter()
            .map(|k| AnnouncedReleaseKey {
                id: k.id,
                public_key: k.public_key.clone(),
                state: match k.state {
                    KeyState::Current => ReleaseKeyState::Current,
                    KeyState::Retired => ReleaseKeyState::Retired,
                },
            })
            .collect();
        let keys = ReleaseKeys::sign(announced, issued_at, &license.keys.signers());
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((license.digest.clone(), keys.clone()));
        Ok(keys)
    }
}

/// Why a status query is refused: the field and what is wrong with it.
pub fn check_query(query: &StatusQuery) -> Result<(), ReleaseError> {
    if query.arch.as_ref().is_some_and(|a| a.len() > MAX_ARCH_LEN) {
        return Err(ReleaseError::invalid(
            "arch",
            format!("at most {MAX_ARCH_LEN} characters"),
        ));
    }
    Ok(())
}

/// The release offered to `machine` (the `update` of its secret status), when its query names
/// its version, channel and architecture: one query on the releases of that channel and
/// architecture, on `pool` (the primary or the read replica, see `service::reads`).
pub async fn offer(
    state: &AppState,
    pool: &sqlx::AnyPool,
    machine: &MachineIdentity,
    query: &StatusQuery,
) -> Result<Option<UpdateOffer>, StoreError> {
    let (Some(version), Some(channel), Some(arch)) =
        (query.agent_version, &query.channel, &query.arch)
    else {
        return Ok(None);
    };
    let machine_id = machine.machine_id.0;
    let candidates = stored::candidates(pool, channel, arch, &machine_id.to_string()).await?;
    let Some(release) = choose_offer(&candidates, &machine_id, &machine.client_id.0, version)
    else {
        return Ok(None);
    };
    let release_keys = state.release_keys.for_key(state, release.key_id).await?;
    Ok(Some(UpdateOffer {
        manifest: release.manifest(),
        key_id: release.key_id,
        signature: release.signature.clone(),
        release_keys,
    }))
}

/// A release a machine may download: known and not withdrawn.
pub async fn downloadable(state: &AppState, release_id: &uuid::Uuid) -> Result<ReleaseRow> {
    match stored::get(state.store.pool(), release_id).await? {
        Some(r) if r.state != ReleaseState::Withdrawn => Ok(r),
        _ => Err(ReleaseError::release_not_found(&release_id.to_string())),
    }
}

/// Keeps a machine's update report (`release.report`) and halts the release's rollout when
/// its failed and refused reports reach its threshold (`release.halt`).
pub async fn report(
    state: &AppState,
    machine: &MachineIdentity,
    report: &UpdateReport,
) -> Result<()> {
    if !report.is_well_formed() {
        return Err(ReleaseError::invalid(
            "reason",
            "at most 64 characters among a-z, 0-9 and '_'",
        ));
    }
    let machine_id = machine.machine_id.to_string();
    let actor = format!("machine:{machine_id}");
    let target = report.release_id.to_string();
    let now = Timestamp::now();
    let mut tx = state.store.begin_write().await?;
    let Some(release) = stored::get(&mut *tx, &report.release_id).await? else {
        tx.rollback().await?;
        return Err(ReleaseError::release_not_found(&target));
    };
    stored::upsert_report(
        &mut tx,
        &NewReport {
            release_id: &report.release_id,
            machine_id: &machine_id,
            outcome: report.outcome,
            reason: &report.reason,
            running_version: report.running_version,
            reported_at: now,
        },
    )
    .await?;
    let details = json!({
        "outcome": report.outcome.as_str(), "reason": report.reason,
        "running_version": report.running_version.to_string(),
        "version": release.version.to_string(),
    });
    let event = NewAuditEvent::success(now, &actor, "release.report", Some(&target), details);
    audit::insert(&mut *tx, &event).await?;
    if report.outcome != UpdateOutcome::Success && release.state == ReleaseState::Active {
        let counts = stored::report_counts(&mut *tx, Some(&report.release_id)).await?;
        let bad = counts
            .get(&report.release_id)
            .map_or(0, ReportCounts::not_success);
        if bad >= u64::from(release.halt_after_failures) {
            let reason = format!("{bad} machines reported a failed update");
            if stored::halt_if_active(&mut tx, &report.release_id, &reason).await? {
                let details = json!({"reason": reason, "threshold": release.halt_after_failures,
                                     "version": release.version.to_string()});
                let event =
                    NewAuditEvent::success(now, "server", "release.halt", Some(&target), details);
                audit::insert(&mut *tx, &event).await?;
                tracing::warn!(release = %target, %reason, "rollout halted");
            }
        }
    }
    tx.commit().await?;
    // Whether this release is offered to the machine again just changed.
    state.changes.note_machine_write(&machine_id);
    Ok(())
}

impl super::Refusal for ReleaseError {
    fn code(&self) -> ErrorCode {
        ReleaseError::code(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(n: u128, version: &str, published_at: i64) -> ReleaseRow {
        ReleaseRow {
            id: uuid::Uuid::from_u128(n),
            version: version.parse().unwrap(),
            channel: "stable".parse().unwrap(),
            arch: "x86_64".into(),
            sha256: "00".repeat(32),
            size: 1,
            min_version: None,
            rollback: false,
            published_at,
            key_id: KeyId::of(&ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key()),
            signature: String::new(),
            state: ReleaseState::Active,
            percent: 100,
            clients: vec![],
            halt_after_failures: 5,
            halted_reason: None,
        }
    }

    fn cand(release: ReleaseRow) -> Candidate {
        Candidate {
            release,
            declined: false,
        }
    }

    fn chosen(cands: &[Candidate], own: &str) -> Option<String> {
        let machine = uuid::Uuid::from_u128(1000);
        let client = uuid::Uuid::from_u128(2000);
        choose_offer(cands, &machine, &client, own.parse().unwrap()).map(|r| r.version.to_string())
    }

    #[test]
    fn the_newest_applicable_release_is_offered() {
        let cands = [cand(row(1, "1.1.0", 10)), cand(row(2, "1.2.0", 20))];
        assert_eq!(chosen(&cands, "1.0.0").as_deref(), Some("1.2.0"));
        // Newest by publication, not by version.
        let cands = [cand(row(1, "1.3.0", 10)), cand(row(2, "1.2.0", 20))];
        assert_eq!(chosen(&cands, "1.0.0").as_deref(), Some("1.2.0"));
        assert_eq!(chosen(&[], "1.0.0"), None);
    }

    #[test]
    fn downgrades_the_same_version_and_too_old_agents_get_nothing() {
        let cands = [cand(row(1, "1.2.0", 10))];
        assert_eq!(chosen(&cands, "1.2.0"), None);
        assert_eq!(chosen(&cands, "1.3.0"), None);
        let mut back = row(1, "1.2.0", 10);
        back.rollback = true;
        assert_eq!(
            chosen(&[cand(back.clone())], "1.3.0").as_deref(),
            Some("1.2.0")
        );
        assert_eq!(chosen(&[cand(back)], "1.2.0"), None);
        let mut needs = row(1, "2.0.0", 10);
        needs.min_version = Some("1.5.0".parse().unwrap());
        assert_eq!(chosen(&[cand(needs.clone())], "1.4.9"), None);
        assert_eq!(chosen(&[cand(needs)], "1.5.0").as_deref(), Some("2.0.0"));
    }

    #[test]
    fn rollout_state_and_declines_are_respected() {
        let mut none = row(1, "1.2.0", 10);
        none.percent = 0;
        assert_eq!(chosen(&[cand(none.clone())], "1.0.0"), None);
        none.clients = vec![uuid::Uuid::from_u128(2000)];
        assert_eq!(chosen(&[cand(none)], "1.0.0").as_deref(), Some("1.2.0"));
        let mut paused = row(1, "1.2.0", 10);
        paused.state = ReleaseState::Paused;
        assert_eq!(chosen(&[cand(paused)], "1.0.0"), None);
        // A declined newer release leaves the older one offered.
        let cands = [
            cand(row(1, "1.1.0", 10)),
            Candidate {
                release: row(2, "1.2.0", 20),
                declined: true,
            },
        ];
        assert_eq!(chosen(&cands, "1.0.0").as_deref(), Some("1.1.0"));
    }

    #[test]
    fn architectures_and_queries_are_checked() {
        assert!(parse_arch("x86_64").is_ok());
        assert!(parse_arch("aarch64").is_ok());
        for bad in ["", "X86", "x86 64", &"a".repeat(33)] {
            let e = parse_arch(bad).unwrap_err().to_string();
            assert!(e.starts_with("arch:"), "{e}");
        }
        let long = StatusQuery {
            arch: Some("a".repeat(33)),
            ..StatusQuery::default()
        };
        assert!(check_query(&long)
            .unwrap_err()
            .to_string()
            .starts_with("arch:"));
    }
}
