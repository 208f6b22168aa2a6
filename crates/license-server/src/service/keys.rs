//! The server's keys and their rollover: which master key seals new secrets, the online master
//! key rollover (`admin keys rotate-master`), the license key rollover and retirement
//! (`admin keys rotate-license`, `admin keys retire-license`), the TLS key and CA rollovers
//! (`admin keys rotate-tls|switch-tls|rotate-ca|retire-ca`, see `server_trust`), the serving
//! process's watch on its key sets, and `admin keys status` (every key the server holds, what
//! depends on it, what expires).
//!
//! A master key rollover goes staged → current → re-encrypted → retired, and each step is
//! recorded before the next starts, so running the command again after it was killed anywhere
//! finishes the job:
//! 1. a new key is added to the data directory's key set, then registered `staged`;
//! 2. once every live serving process (`master_key_holders`, refreshed every few seconds)
//!    holds it, it becomes `current`: new secrets are sealed under it, the old key becomes
//!    `previous`;
//! 3. rows under other keys are re-encrypted in batches, one transaction each, every row
//!    readable under its old or new key throughout;
//! 4. a previous key no row uses any more is `retired` and removed from the key set
//!    (`kept` with `--keep-old`), audited as `keys.rotate_master`.
//!
//! Replicas with their own data directories learn a new key by an operator copying
//! `master-keys.json` (docs/OPERATIONS.md); step 2 waits for that, so no replica ever meets a
//! row it cannot read. Key bytes never leave the key set file.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use sqlx::AnyConnection;

use license_protocol::error::ErrorCode;
use license_protocol::identity::MachineId;
use license_protocol::secret;

use super::secrets::at_rest_aad;
use super::AppState;
use crate::clock::Timestamp;
use crate::datadir::pem_first_der;
use crate::license_keys::LicenseKeyError;
use crate::master_keys::{ordinal, MasterKey, MasterKeyError};
use crate::pki::{self, PkiError};
use crate::server_trust::{self as rollover, RolloverError, Rollovers};
use crate::store::audit::{self, NewAuditEvent};
use crate::store::master_keys::{self as registry, Holder, KeyRecord, KeyState};
use crate::store::secrets::{self as stored, KeyedCiphertext};
use crate::store::{certificates, StoreError};
use license_protocol::license_keys::KeyId;

/// Audit action of a master key rollover.
pub const ROTATE_MASTER_ACTION: &str = "keys.rotate_master";
/// Audit action of a license key rollover.
pub const ROTATE_LICENSE_ACTION: &str = "keys.rotate_license";
/// Audit action of a license key retirement.
pub const RETIRE_LICENSE_ACTION: &str = "keys.retire_license";
/// Audit action of announcing the next TLS key.
pub const ROTATE_TLS_ACTION: &str = "keys.rotate_tls";
/// Audit action of switching to the announced TLS key.
pub const SWITCH_TLS_ACTION: &str = "keys.switch_tls";
/// Audit action of a CA rollover.
pub const ROTATE_CA_ACTION: &str = "keys.rotate_ca";
/// Audit action of a CA retirement.
pub const RETIRE_CA_ACTION: &str = "keys.retire_ca";
/// A serving process silent for longer than this is no longer counted as a holder.
pub const HOLDER_LIVENESS_SECS: i64 = 30;
/// How often a serving process reports the keys it holds.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// How often a serving process looks for a changed key set file.
pub const KEY_FILE_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Rows re-encrypted per transaction, by default.
pub const DEFAULT_BATCH_SIZE: i64 = 500;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeysError {
    #[error(
        "master key {0} is registered in the database but this data directory does not hold it \
         (or holds another key under that id): copy master-keys.json from the data directory \
         that rotated it"
    )]
    NotHeld(String),
    #[error(
        "master key {0} was staged by another data directory: finish the rollover there, or copy \
         its master-keys.json here first"
    )]
    StagedElsewhere(String),
    #[error(
        "master key {key} is staged but these serving processes do not hold it yet: {holders}; \
         copy {file} to their data directories, then run `keys rotate-master` again"
    )]
    ReplicasLacking {
        key: String,
        holders: String,
        file: String,
    },
    #[error("secret version {version} of machine {machine_id} does not decrypt under its master key {key}; invalidate or delete it, then run again")]
    Undecryptable {
        machine_id: String,
        version: u64,
        key: String,
    },
    #[error("{0} rows are still under master key {1}")]
    NotDrained(i64, String),
    #[error(
        "{count} active machine certificates issued by the previous CA (serial {serial}) can \
         still renew; each moves to the current CA at its next renewal: wait (`keys status` \
         counts them), or retire with --force to cut those machines off"
    )]
    CaStillNeeded { serial: String, count: usize },
    #[error(transparent)]
    Rollover(#[from] RolloverError),
    #[error(transparent)]
    MasterKeys(#[from] MasterKeyError),
    #[error(transparent)]
    LicenseKeys(#[from] LicenseKeyError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl KeysError {
    /// Stable code for the audit trail.
    pub fn code(&self) -> ErrorCode {
        match self {
            KeysError::StagedElsewhere(_)
            | KeysError::ReplicasLacking { .. }
            | KeysError::CaStillNeeded { .. }
            | KeysError::Rollover(
                RolloverError::AlreadyStaged(_)
                | RolloverError::NothingStaged
                | RolloverError::PreviousCaTrusted(_)
                | RolloverError::NoPreviousCa,
            )
            | KeysError::LicenseKeys(
                LicenseKeyError::RetireCurrent(_) | LicenseKeyError::AlreadyRetired(_),
            ) => ErrorCode::Conflict,
            KeysError::LicenseKeys(LicenseKeyError::Unknown(_)) => ErrorCode::NotFound,
            _ => ErrorCode::InternalError,
        }
    }
}

/// Aborts the process at `point` when `LICENSE_SERVER_TEST_CRASH_AT` names it: how tests kill
/// a rollover at each of its steps.
pub(crate) fn test_crash(point: &str) {
    if std::env::var("LICENSE_SERVER_TEST_CRASH_AT").is_ok_and(|v| v == point) {
        eprintln!("license-server: test crash at {point}");
        std::process::abort();
    }
}

/// The current master key, for sealing a new secret inside `conn`'s transaction (its registry
/// row share-locked on PostgreSQL until the transaction ends). An error when this data
/// directory does not hold it, after re-reading the key set once.
pub async fn seal_key(state: &AppState, conn: &mut AnyConnection) -> Result<MasterKey, StoreError> {
    let id = registry::current_for_seal(conn, state.store.backend()).await?;
    state.keys.master_keys.get(&id).ok_or_else(|| {
        tracing::error!(key = %id, "this data directory does not hold the current master key; copy master-keys.json");
        StoreError::Corrupt(format!(
            "this server does not hold master key {id}, the current one"
        ))
    })
}

/// Checks the held key set against the registry: fills the check value of keys registered
/// without one, and fails when a key rows may be under (current, previous, kept) is missing
/// or differs. Returns the ids held with a matching check value.
pub async fn check_held_keys(state: &AppState) -> Result<Vec<String>, KeysError> {
    let held = state.keys.master_keys.snapshot();
    let mut tx = state.store.begin_write().await?;
    for key in held.keys() {
        registry::fill_check(&mut tx, &key.id, &key.check_value()).await?;
    }
    let records = registry::list(&mut *tx).await?;
    tx.commit().await?;
    let mut matching = Vec::new();
    for r in &records {
        let same = held
            .get(&r.id)
            .is_some_and(|k| r.check_value.as_deref() == Some(k.check_value().as_str()));
        if same {
            matching.push(r.id.clone());
        } else if matches!(
            r.state,
            KeyState::Current | KeyState::Previous | KeyState::Kept
        ) {
            return Err(KeysError::NotHeld(r.id.clone()));
        }
    }
    Ok(matching)
}

/// One serving process's watch on its key set: re-reads it when the file changes (a rollover
/// run beside it, or a copy from another replica), drops keys the registry retired, and tells
/// the database which keys it holds.
#[derive(Debug)]
pub struct KeyWatch {
    holder_id: String,
    description: String,
    last_heartbeat: Option<Instant>,
}

impl KeyWatch {
    pub fn new(state: &AppState) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "?".into());
        Self {
            holder_id: uuid::Uuid::new_v4().to_string(),
            description: format!(
                "{host} pid {} {}",
                std::process::id(),
                state.settings.data_dir.root().display()
            ),
            last_heartbeat: None,
        }
    }

    /// Runs every [`KEY_FILE_CHECK_INTERVAL`]; reports at least every [`HEARTBEAT_INTERVAL`]
    /// and at once after a change.
    pub async fn tick(&mut self, state: &AppState) -> Result<(), KeysError> {
        if state.keys.license_keys.reload_if_changed()? {
            let held = state.keys.license_keys.snapshot();
            tracing::info!(current = %held.keys.current(), digest = %held.digest, "license key set re-read");
        }
        let ring = &state.keys.master_keys;
        let changed = ring.reload_if_changed()?;
        if changed {
            tracing::info!(keys = ?ring.snapshot().ids(), "master key set re-read");
        }
        let due = self
            .last_heartbeat
            .is_none_or(|t| t.elapsed() >= HEARTBEAT_INTERVAL);
        if !changed && !due {
            return Ok(());
        }
        let records = registry::list(state.store.pool()).await?;
        let held = ring.snapshot();
        let retired: Vec<&str> = records
            .iter()
            .filter(|r| r.state == KeyState::Retired && held.get(&r.id).is_some())
            .map(|r| r.id.as_str())
            .collect();
        if !retired.is_empty() {
            let mut set = (*held).clone();
            for id in &retired {
                set.remove(id);
            }
            ring.store(set)?;
            tracing::info!(
                ?retired,
                "retired master keys removed from this data directory"
            );
        }
        let held = ring.snapshot();
        let mut ids = Vec::new();
        for key in held.keys() {
            let record = records.iter().find(|r| r.id == key.id);
            match record.and_then(|r| r.check_value.as_deref()) {
                Some(check) if check != key.check_value() => {
                    tracing::error!(key = %key.id, "this data directory's master key differs from the registered one under the same id");
                }
                _ => ids.push(key.id.clone()),
            }
        }
        let mut tx = state.store.begin_write().await?;
        registry::heartbeat(
            &mut tx,
            &self.holder_id,
            &self.description,
            &ids,
            Timestamp::now(),
        )
        .await?;
        tx.commit().await?;
        self.last_heartbeat = Some(Instant::now());
        Ok(())
    }

    /// A process stopping cleanly stops counting as a holder at once.
    pub async fn forget(&self, state: &AppState) -> Result<(), KeysError> {
        let mut tx = state.store.begin_write().await?;
        registry::forget_holder(&mut tx, &self.holder_id).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// How `rotate-master` runs.
#[derive(Debug, Clone)]
pub struct RotateOptions {
    /// Keep the old key (state `kept`, still in the key set) once no row uses it.
    pub keep_old: bool,
    /// Rows re-encrypted per transaction.
    pub batch_size: i64,
    /// How long to wait for every live serving process to hold the new key.
    pub wait: Duration,
}

/// What `rotate-master` reports while it runs.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Progress {
    /// Resuming an unfinished rollover to `key`.
    Resumed {
        key: String,
    },
    Staged {
        key: String,
        key_set: String,
    },
    Waiting {
        key: String,
        holders: Vec<String>,
    },
    Current {
        key: String,
        previous: Vec<String>,
    },
    Batch {
        done: u64,
        total: u64,
    },
}

/// The outcome of `rotate-master`.
#[derive(Debug, Clone, Serialize)]
pub struct RotateReport {
    pub new_key_id: String,
    pub old_key_ids: Vec<String>,
    /// Rows re-encrypted by this run (a resumed run counts only its own).
    pub reencrypted: u64,
    /// Destroyed rows (no ciphertext) moved to the new key id.
    pub destroyed_rows_moved: u64,
    /// Secret rows under the new key at the end.
    pub rows_under_new_key: i64,
    pub retired: Vec<String>,
    pub kept: Vec<String>,
    pub resumed: bool,
    pub key_set: String,
}

/// `admin keys rotate-master`: see the module documentation.
pub async fn rotate_master(
    state: &AppState,
    actor: &str,
    options: &RotateOptions,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<RotateReport, KeysError> {
    let result = rotate_master_in(state, actor, options, progress).await;
    if let Err(e) = &result {
        if e.code() == ErrorCode::Conflict {
            let event = NewAuditEvent::refused(
                actor,
                ROTATE_MASTER_ACTION,
                None,
                json!({"error": e.to_string()}),
                e.code().as_str(),
            );
            audit::insert(state.store.pool(), &event).await?;
        }
    }
    result
}

async fn rotate_master_in(
    state: &AppState,
    actor: &str,
    options: &RotateOptions,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<RotateReport, KeysError> {
    let ring = &state.keys.master_keys;
    let key_set = ring.path().display().to_string();
    check_held_keys(state).await?;
    let records = registry::list(state.store.pool()).await?;
    let find = |s: KeyState| records.iter().find(|r| r.state == s);

    // 1. The key to roll to: a staged one, the current one of an unfinished rollover, or new.
    let (target, resumed) = if let Some(staged) = find(KeyState::Staged) {
        let held = ring.snapshot();
        let ours = held
            .get(&staged.id)
            .is_some_and(|k| staged.check_value.as_deref() == Some(k.check_value().as_str()));
        if !ours {
            return Err(KeysError::StagedElsewhere(staged.id.clone()));
        }
        progress(&Progress::Resumed {
            key: staged.id.clone(),
        });
        (staged.id.clone(), true)
    } else if let (Some(current), true) = (
        find(KeyState::Current),
        records.iter().any(|r| r.state == KeyState::Previous),
    ) {
        progress(&Progress::Resumed {
            key: current.id.clone(),
        });
        (current.id.clone(), true)
    } else {
        let key = stage_new_key(state, actor, &records).await?;
        progress(&Progress::Staged {
            key: key.clone(),
            key_set: key_set.clone(),
        });
        (key, false)
    };

    // 2. Current, once every live serving process can read under it.
    let records = registry::list(state.store.pool()).await?;
    if records
        .iter()
        .any(|r| r.id == target && r.state == KeyState::Staged)
    {
        wait_for_holders(state, &target, options.wait, progress).await?;
        let mut tx = state.store.begin_write().await?;
        let previous = registry::make_current(&mut tx, &target, Timestamp::now())
            .await?
            .unwrap_or_default();
        tx.commit().await?;
        progress(&Progress::Current {
            key: target.clone(),
            previous,
        });
        test_crash("master_after_switch");
    }
    let target_key = ring
        .get(&target)
        .ok_or_else(|| KeysError::NotHeld(target.clone()))?;

    // 3. Every row under the current key, batch by batch.
    let (reencrypted, destroyed_rows_moved) =
        reencrypt(state, &target_key, options.batch_size, progress).await?;

    // 4. Previous keys no row uses any more: retired (or kept), with the audit row.
    let mut tx = state.store.begin_write().await?;
    let now = Timestamp::now();
    let records = registry::list(&mut *tx).await?;
    let counts: BTreeMap<String, i64> =
        registry::rows_by_key(&mut *tx).await?.into_iter().collect();
    let superseded: Vec<&KeyRecord> = records
        .iter()
        .filter(|r| matches!(r.state, KeyState::Previous | KeyState::Kept))
        .collect();
    let old_key_ids: Vec<String> = superseded
        .iter()
        .filter(|r| r.state == KeyState::Previous)
        .map(|r| r.id.clone())
        .collect();
    let (mut retired, mut kept) = (Vec::new(), Vec::new());
    for r in &superseded {
        let rows = counts.get(&r.id).copied().unwrap_or(0);
        if rows > 0 {
            return Err(KeysError::NotDrained(rows, r.id.clone()));
        }
        let to = if options.keep_old {
            KeyState::Kept
        } else {
            KeyState::Retired
        };
        registry::settle(&mut tx, &r.id, to, now).await?;
        if options.keep_old {
            kept.push(r.id.clone());
        } else {
            retired.push(r.id.clone());
        }
    }
    let rows_under_new_key = counts.get(&target).copied().unwrap_or(0);
    let details = json!({
        "phase": "completed",
        "new_key_id": target,
        "old_key_ids": old_key_ids,
        "reencrypted": reencrypted,
        "destroyed_rows_moved": destroyed_rows_moved,
        "rows_under_new_key": rows_under_new_key,
        "retired": retired,
        "kept": kept,
        "resumed": resumed,
        "data_dir": state.settings.data_dir.root().display().to_string(),
    });
    let event = NewAuditEvent::success(now, actor, ROTATE_MASTER_ACTION, None, details);
    audit::insert(&mut *tx, &event).await?;
    // The key set loses the retired keys before the registry says so: should the commit not
    // happen, the next run finds them `previous` with no row and retires them again.
    if !retired.is_empty() {
        let mut set = (*ring.snapshot()).clone();
        for id in &retired {
            set.remove(id);
        }
        ring.store(set)?;
    }
    tx.commit().await?;
    tracing::info!(new = %target, ?old_key_ids, reencrypted, ?retired, ?kept, "master key rollover completed");
    Ok(RotateReport {
        new_key_id: target,
        old_key_ids,
        reencrypted,
        destroyed_rows_moved,
        rows_under_new_key,
        retired,
        kept,
        resumed,
        key_set,
    })
}

/// Adds a new key to the data directory's key set, then registers it `staged` with an audit
/// row. A key already in the set with a higher ordinal than every registered one was written
/// by a run killed before it registered it: that one is staged instead of another.
async fn stage_new_key(
    state: &AppState,
    actor: &str,
    records: &[KeyRecord],
) -> Result<String, KeysError> {
    let ring = &state.keys.master_keys;
    let highest = records
        .iter()
        .filter_map(|r| ordinal(&r.id))
        .max()
        .unwrap_or(0);
    let held = ring.snapshot();
    let orphan = held
        .keys()
        .iter()
        .find(|k| ordinal(&k.id).is_some_and(|n| n > highest))
        .cloned();
    let key = match orphan {
        Some(key) => key,
        None => {
            let key = MasterKey::generate(format!("k{}", highest + 1), Timestamp::now());
            let mut set = (*held).clone();
            set.insert(key.clone());
            ring.store(set)?;
            test_crash("master_after_key_file");
            key
        }
    };
    let mut tx = state.store.begin_write().await?;
    let now = Timestamp::now();
    registry::stage(&mut tx, &key.id, &key.check_value(), now).await?;
    let details = json!({
        "phase": "staged",
        "new_key_id": key.id,
        "check_value": key.check_value(),
        "data_dir": state.settings.data_dir.root().display().to_string(),
    });
    let event = NewAuditEvent::success(now, actor, ROTATE_MASTER_ACTION, None, details);
    audit::insert(&mut *tx, &event).await?;
    tx.commit().await?;
    tracing::info!(key = %key.id, "master key staged");
    test_crash("master_after_stage");
    Ok(key.id)
}

/// Waits until every serving process heard from in the last [`HOLDER_LIVENESS_SECS`] holds
/// `key`, at most `wait`.
async fn wait_for_holders(
    state: &AppState,
    key: &str,
    wait: Duration,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<(), KeysError> {
    let start = Instant::now();
    let mut reported = false;
    loop {
        let since = Timestamp::now().plus_secs(-HOLDER_LIVENESS_SECS);
        let lacking: Vec<Holder> = registry::live_holders(state.store.pool(), since)
            .await?
            .into_iter()
            .filter(|h| !h.key_ids.iter().any(|k| k == key))
            .collect();
        if lacking.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = lacking.iter().map(|h| h.description.clone()).collect();
        if start.elapsed() >= wait {
            return Err(KeysError::ReplicasLacking {
                key: key.to_string(),
                holders: names.join("; "),
                file: state.keys.master_keys.path().display().to_string(),
            });
        }
        if !reported {
            progress(&Progress::Waiting {
                key: key.to_string(),
                holders: names,
            });
            reported = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Re-encrypts every row not under `target`, `batch_size` rows per transaction. Returns (rows
/// re-encrypted, destroyed rows moved).
async fn reencrypt(
    state: &AppState,
    target: &MasterKey,
    batch_size: i64,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<(u64, u64), KeysError> {
    let total = u64::try_from(stored::count_under_other_key(state.store.pool(), &target.id).await?)
        .unwrap_or(0);
    let (mut done, mut moved) = (0u64, 0u64);
    loop {
        let mut tx = state.store.begin_write().await?;
        // A write first: on SQLite the batch then holds the write lock before it reads.
        moved += stored::rekey_destroyed(&mut tx, &target.id).await?;
        let rows = stored::under_other_key(&mut tx, &target.id, batch_size.max(1)).await?;
        if rows.is_empty() {
            tx.commit().await?;
            break;
        }
        for row in &rows {
            let sealed = reseal_one(state, target, row)?;
            if stored::reseal(&mut tx, row, &target.id, &sealed).await? {
                done += 1;
            }
        }
        tx.commit().await?;
        progress(&Progress::Batch {
            done: done + moved,
            total: total.max(done + moved),
        });
        test_crash("master_after_batch");
    }
    Ok((done, moved))
}

/// The row's secret, decrypted under the key it names and encrypted under `target`.
fn reseal_one(
    state: &AppState,
    target: &MasterKey,
    row: &KeyedCiphertext,
) -> Result<Vec<u8>, KeysError> {
    let old = state
        .keys
        .master_keys
        .get(&row.master_key_id)
        .ok_or_else(|| KeysError::NotHeld(row.master_key_id.clone()))?;
    let machine: MachineId = row.machine_id.parse().map_err(|_| {
        StoreError::Corrupt(format!("machine id {:?} of a secret row", row.machine_id))
    })?;
    let aad = at_rest_aad(&machine, row.version);
    let secret = secret::decrypt_at_rest(old.bytes(), &row.secret_enc, &aad).map_err(|_| {
        KeysError::Undecryptable {
            machine_id: row.machine_id.clone(),
            version: row.version,
            key: row.master_key_id.clone(),
        }
    })?;
    Ok(secret::encrypt_at_rest(target.bytes(), &secret, &aad))
}

// ---------------------------------------------------------------------------------------------
// license keys
// ---------------------------------------------------------------------------------------------

/// The outcome of `rotate-license` or `retire-license`.
#[derive(Debug, Clone, Serialize)]
pub struct LicenseKeysReport {
    /// The current key after the change.
    #[serde(serialize_with = "as_string")]
    pub current: KeyId,
    /// The key made current (`rotate-license`).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "opt_as_string"
    )]
    pub new_key_id: Option<KeyId>,
    /// The key that was current (`rotate-license`) or the key retired (`retire-license`).
    #[serde(serialize_with = "as_string")]
    pub old_key_id: KeyId,
    /// The keys after the change.
    pub keys: Vec<LicenseKeyStatus>,
    /// Digest of the announced set, as the secret status reports it.
    pub digest: String,
    pub key_set: String,
}

fn as_string<S: serde::Serializer>(id: &KeyId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

fn opt_as_string<S: serde::Serializer>(id: &Option<KeyId>, s: S) -> Result<S::Ok, S::Error> {
    match id {
        Some(id) => s.collect_str(id),
        None => s.serialize_none(),
    }
}

fn license_key_statuses(keys: &crate::license_keys::LicenseKeys) -> Vec<LicenseKeyStatus> {
    keys.keys()
        .iter()
        .map(|k| LicenseKeyStatus {
            id: k.id().to_string(),
            state: k.state.as_str().to_string(),
            created_at: k.created_at,
            public_key: k.public_key(),
        })
        .collect()
}

/// Audits a refused key command.
async fn audit_refusal(
    state: &AppState,
    actor: &str,
    action: &str,
    target: Option<&str>,
    e: &KeysError,
) -> Result<(), KeysError> {
    let event = NewAuditEvent::refused(
        actor,
        action,
        target,
        json!({"error": e.to_string()}),
        e.code().as_str(),
    );
    audit::insert(state.store.pool(), &event).await?;
    Ok(())
}

/// `admin keys rotate-license`: a new current license key; the current one becomes previous
/// (its tokens keep validating). Serving processes on this data directory pick the set up
/// within [`KEY_FILE_CHECK_INTERVAL`]; other replicas need a copy of `license-keys.json`.
pub async fn rotate_license(state: &AppState, actor: &str) -> Result<LicenseKeysReport, KeysError> {
    let ring = &state.keys.license_keys;
    ring.reload_if_changed()?;
    let mut keys = ring.snapshot().keys.clone();
    let now = Timestamp::now();
    let (new, old) = keys.rotate(now);
    let mut tx = state.store.begin_write().await?;
    let details = json!({
        "new_key_id": new.to_string(),
        "previous_key_id": old.to_string(),
        "data_dir": state.settings.data_dir.root().display().to_string(),
    });
    let event = NewAuditEvent::success(now, actor, ROTATE_LICENSE_ACTION, None, details);
    audit::insert(&mut *tx, &event).await?;
    ring.store(keys)?;
    tx.commit().await?;
    tracing::info!(new = %new, previous = %old, "license key rotated");
    let held = ring.snapshot();
    Ok(LicenseKeysReport {
        current: held.keys.current(),
        new_key_id: Some(new),
        old_key_id: old,
        keys: license_key_statuses(&held.keys),
        digest: held.digest.clone(),
        key_set: ring.path().display().to_string(),
    })
}

/// `admin keys retire-license <KEY_ID>`: tokens signed by the key stop validating on every
/// agent that has heard of it (`key_retired`). Refused for the current key.
pub async fn retire_license(
    state: &AppState,
    actor: &str,
    id: KeyId,
) -> Result<LicenseKeysReport, KeysError> {
    let ring = &state.keys.license_keys;
    ring.reload_if_changed()?;
    let mut keys = ring.snapshot().keys.clone();
    let now = Timestamp::now();
    let target = id.to_string();
    if let Err(e) = keys.retire(id, now) {
        let e = KeysError::from(e);
        audit_refusal(state, actor, RETIRE_LICENSE_ACTION, Some(&target), &e).await?;
        return Err(e);
    }
    let mut tx = state.store.begin_write().await?;
    let details = json!({
        "key_id": target,
        "current_key_id": keys.current().to_string(),
        "data_dir": state.settings.data_dir.root().display().to_string(),
    });
    let event = NewAuditEvent::success(now, actor, RETIRE_LICENSE_ACTION, Some(&target), details);
    audit::insert(&mut *tx, &event).await?;
    ring.store(keys)?;
    tx.commit().await?;
    tracing::warn!(key = %id, "license key retired");
    let held = ring.snapshot();
    Ok(LicenseKeysReport {
        current: held.keys.current(),
        new_key_id: None,
        old_key_id: id,
        keys: license_key_statuses(&held.keys),
        digest: held.digest.clone(),
        key_set: ring.path().display().to_string(),
    })
}

// ---------------------------------------------------------------------------------------------
// TLS key and CA rollovers (`server_trust`)
// ---------------------------------------------------------------------------------------------

/// The outcome of `rotate-tls`, `switch-tls`, `rotate-ca` or `retire-ca`, read back from the
/// data directory.
#[derive(Debug, Clone, Serialize)]
pub struct ServerTrustReport {
    /// The audit action of the step.
    pub action: &'static str,
    /// The pin of the key `server.pem` is for (served from the next start).
    pub server_pin: String,
    /// Announced ahead of a switch.
    pub next_pin: Option<String>,
    pub retired_pins: Vec<String>,
    pub ca_serial: String,
    /// Rolled over from, still trusted.
    pub previous_ca_serial: Option<String>,
    /// Active machine certificates the previous CA issued that can still renew.
    pub certificates_needing_previous_ca: usize,
    pub retired_cas: usize,
    /// Serving processes read these files at start: restart them (after copying
    /// `server-trust.json`, `ca.*` and `server.*` to replicas with their own data directory).
    pub restart_needed: bool,
}

/// Active machine certificates issued by `previous_ca` (PEM) that can still renew.
async fn needing(state: &AppState, previous_ca: Option<&str>) -> Result<usize, KeysError> {
    let Some(ca_der) = previous_ca.and_then(pem_first_der) else {
        return Ok(0);
    };
    let after = Timestamp::now().plus_secs(-state.settings.renew_after_expiry_secs());
    let pems = certificates::active_pems(state.store.pool(), after).await?;
    Ok(pems
        .iter()
        .filter_map(|pem| pem_first_der(pem))
        .filter(|der| pki::signed_by(der, &ca_der))
        .count())
}

async fn trust_report(
    state: &AppState,
    action: &'static str,
) -> Result<ServerTrustReport, KeysError> {
    let dir = &state.settings.data_dir;
    let r = Rollovers::load(dir)?;
    Ok(ServerTrustReport {
        action,
        server_pin: rollover::served_pin(dir)?.to_string(),
        next_pin: r.next_pin()?.map(|p| p.to_string()),
        retired_pins: r.retired_pins.iter().map(ToString::to_string).collect(),
        ca_serial: rollover::ca_serial(dir)?,
        previous_ca_serial: r
            .previous_ca
            .as_deref()
            .map(rollover::serial_of_pem)
            .transpose()?,
        certificates_needing_previous_ca: needing(state, r.previous_ca.as_deref()).await?,
        retired_cas: r.retired_cas.len(),
        restart_needed: true,
    })
}

/// One rollover step: `step` changes the data directory inside the transaction that audits
/// it (a step whose audit cannot commit is finished by the next load, and audited then by
/// nobody: the files are the truth, the audit names every step that was asked for).
async fn trust_step<T>(
    state: &AppState,
    actor: &str,
    action: &'static str,
    step: impl FnOnce() -> Result<T, RolloverError>,
    details: impl FnOnce(&T) -> serde_json::Value,
) -> Result<ServerTrustReport, KeysError> {
    let now = Timestamp::now();
    let mut tx = state.store.begin_write().await?;
    let done = match step() {
        Ok(done) => done,
        Err(e) => {
            drop(tx);
            let e = KeysError::from(e);
            audit_refusal(state, actor, action, None, &e).await?;
            return Err(e);
        }
    };
    let mut details = details(&done);
    details["data_dir"] = json!(state.settings.data_dir.root().display().to_string());
    let event = NewAuditEvent::success(now, actor, action, None, details);
    audit::insert(&mut *tx, &event).await?;
    tx.commit().await?;
    trust_report(state, action).await
}

/// `admin keys rotate-tls`: a new TLS key, announced to agents as next.
pub async fn rotate_tls(state: &AppState, actor: &str) -> Result<ServerTrustReport, KeysError> {
    let dir = &state.settings.data_dir;
    trust_step(
        state,
        actor,
        ROTATE_TLS_ACTION,
        || rollover::stage_tls(dir, Timestamp::now().0),
        |pin| json!({"next_pin": pin.to_string()}),
    )
    .await
}

/// `admin keys switch-tls`: the announced key is served (from the next start), the old pin
/// retired.
pub async fn switch_tls(state: &AppState, actor: &str) -> Result<ServerTrustReport, KeysError> {
    let dir = &state.settings.data_dir;
    let days = state.settings.server_certificate_validity_days;
    trust_step(
        state,
        actor,
        SWITCH_TLS_ACTION,
        || rollover::switch_tls(dir, days, Timestamp::now().0),
        |(old, new)| json!({"old_pin": old.to_string(), "new_pin": new.to_string()}),
    )
    .await
}

/// `admin keys rotate-ca`: a new current CA, cross-signed by the one it replaces.
pub async fn rotate_ca(state: &AppState, actor: &str) -> Result<ServerTrustReport, KeysError> {
    let dir = &state.settings.data_dir;
    let days = state.settings.server_certificate_validity_days;
    trust_step(
        state,
        actor,
        ROTATE_CA_ACTION,
        || rollover::rotate_ca(dir, days, Timestamp::now().0),
        |r| json!({"previous_serial": r.previous_serial, "serial": r.current_serial}),
    )
    .await
}

/// `admin keys retire-ca [--force]`: the previous CA is no longer trusted. Refused while
/// active machine certificates it issued can still renew, unless `force`.
pub async fn retire_ca(
    state: &AppState,
    actor: &str,
    force: bool,
) -> Result<ServerTrustReport, KeysError> {
    let dir = &state.settings.data_dir;
    let previous = Rollovers::load(dir)?.previous_ca;
    let count = needing(state, previous.as_deref()).await?;
    if count > 0 && !force {
        let serial = rollover::serial_of_pem(previous.as_deref().unwrap_or_default())?;
        let e = KeysError::CaStillNeeded { serial, count };
        audit_refusal(state, actor, RETIRE_CA_ACTION, None, &e).await?;
        return Err(e);
    }
    let days = state.settings.server_certificate_validity_days;
    trust_step(
        state,
        actor,
        RETIRE_CA_ACTION,
        || rollover::retire_ca(dir, days, Timestamp::now().0),
        |serial| json!({"serial": serial, "forced": force, "certificates_cut_off": count}),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// keys status
// ---------------------------------------------------------------------------------------------

/// The internal CA.
#[derive(Debug, Clone, Serialize)]
pub struct CaStatus {
    pub serial: String,
    pub not_before: Timestamp,
    pub not_after: Timestamp,
    /// Machine certificates it signed that are active now.
    pub active_machine_certificates: i64,
    /// Of those, expiring within 30 days (agents renew them by themselves).
    pub machine_certificates_expiring_soon: i64,
}

/// The CA rolled over from, still trusted until `retire-ca`.
#[derive(Debug, Clone, Serialize)]
pub struct PreviousCaStatus {
    pub serial: String,
    pub not_after: Timestamp,
    /// Active machine certificates it issued that can still renew (0: it can be retired).
    pub certificates_needing_it: usize,
}

/// The TLS certificate of the three listeners (this data directory's).
#[derive(Debug, Clone, Serialize)]
pub struct TlsStatus {
    pub serial: String,
    /// What agents pin; unchanged by renewals (same key).
    pub pin: String,
    /// The key announced ahead of a switch (`rotate-tls`).
    pub next_pin: Option<String>,
    /// Keys switched away from, refused by agents that heard of the switch.
    pub retired_pins: Vec<String>,
    pub not_before: Timestamp,
    pub not_after: Timestamp,
    pub renews_at: Timestamp,
}

/// The current license signing key.
#[derive(Debug, Clone, Serialize)]
pub struct SigningKeyStatus {
    pub public_key: String,
    pub key_id: String,
    /// When it was made.
    pub created_at: Option<Timestamp>,
}

/// One license key.
#[derive(Debug, Clone, Serialize)]
pub struct LicenseKeyStatus {
    pub id: String,
    /// `current`, `previous` or `retired`.
    pub state: String,
    pub created_at: Timestamp,
    pub public_key: String,
}

/// One master key, registered or held.
#[derive(Debug, Clone, Serialize)]
pub struct MasterKeyStatus {
    pub id: String,
    /// Registry state, or `unregistered` for a key only this data directory holds.
    pub state: String,
    pub created_at: Timestamp,
    pub activated_at: Option<Timestamp>,
    pub retired_at: Option<Timestamp>,
    /// Secret rows sealed under it.
    pub rows: i64,
    /// In this data directory's key set.
    pub held_here: bool,
    pub check_value: Option<String>,
}

/// `admin keys status`.
#[derive(Debug, Clone, Serialize)]
pub struct KeysStatus {
    pub now: Timestamp,
    pub ca: CaStatus,
    pub previous_ca: Option<PreviousCaStatus>,
    pub retired_cas: usize,
    pub server_tls: TlsStatus,
    pub license_signing_key: SigningKeyStatus,
    pub license_keys: Vec<LicenseKeyStatus>,
    pub license_key_set: String,
    pub master_keys: Vec<MasterKeyStatus>,
    pub master_key_set: String,
    /// Serving processes heard from in the last 30 s and the master keys they hold.
    pub serving_processes: Vec<Holder>,
}

/// Every key the server holds, what depends on it and when it expires.
pub async fn status(state: &AppState) -> Result<KeysStatus, KeysError> {
    let now = Timestamp::now();
    let dir = &state.settings.data_dir;
    let bad = |what: &str| PkiError::BadCertificate(format!("{what} holds no certificate"));

    let ca_der = pem_first_der(state.keys.ca.cert_pem()).ok_or_else(|| bad("ca.pem"))?;
    let ca_validity = pki::validity_of(&ca_der)?;
    let stats = certificates::stats(state.store.pool(), now).await?;
    let ca = CaStatus {
        serial: pki::serial_of(&ca_der)?,
        not_before: ca_validity.not_before,
        not_after: ca_validity.not_after,
        active_machine_certificates: stats.active,
        machine_certificates_expiring_soon: stats.expiring_soon,
    };

    // The file, not the copy loaded at start: a serving process may have renewed it since.
    let tls_pem = std::fs::read_to_string(dir.server_cert())
        .unwrap_or_else(|_| state.keys.server_cert_pem.clone());
    let tls_der = pem_first_der(&tls_pem).ok_or_else(|| bad("server.pem"))?;
    let tls_validity = pki::validity_of(&tls_der)?;
    let rollovers = Rollovers::load(dir)?;
    let previous_ca = match rollovers.previous_ca.as_deref() {
        Some(pem) => {
            let der = pem_first_der(pem).ok_or_else(|| bad("server-trust.json's previous CA"))?;
            Some(PreviousCaStatus {
                serial: pki::serial_of(&der)?,
                not_after: pki::validity_of(&der)?.not_after,
                certificates_needing_it: needing(state, Some(pem)).await?,
            })
        }
        None => None,
    };
    let server_tls = TlsStatus {
        serial: pki::serial_of(&tls_der)?,
        pin: license_protocol::pin::CertPin::of_certificate_der(&tls_der)
            .map_err(|e| PkiError::BadCertificate(e.to_string()))?
            .to_string(),
        next_pin: rollovers.next_pin()?.map(|p| p.to_string()),
        retired_pins: rollovers
            .retired_pins
            .iter()
            .map(ToString::to_string)
            .collect(),
        not_before: tls_validity.not_before,
        not_after: tls_validity.not_after,
        renews_at: tls_validity.renew_at(),
    };

    state.keys.license_keys.reload_if_changed()?;
    let license = state.keys.license_keys.snapshot();
    let current = license.keys.current();
    let license_signing_key = SigningKeyStatus {
        public_key: license.keys.current_public_key(),
        key_id: current.to_string(),
        created_at: license
            .keys
            .keys()
            .iter()
            .find(|k| k.id() == current)
            .map(|k| k.created_at),
    };
    let license_keys = license_key_statuses(&license.keys);

    let ring = &state.keys.master_keys;
    ring.reload_if_changed()?;
    let held = ring.snapshot();
    let records = registry::list(state.store.pool()).await?;
    let counts: BTreeMap<String, i64> = registry::rows_by_key(state.store.pool())
        .await?
        .into_iter()
        .collect();
    let mut master_keys: Vec<MasterKeyStatus> = records
        .iter()
        .map(|r| {
            let key = held.get(&r.id);
            MasterKeyStatus {
                id: r.id.clone(),
                state: r.state.as_str().to_string(),
                // The key set knows when a key was made; the registry, when it was registered.
                created_at: key.map_or(r.created_at, |k| k.created_at),
                activated_at: r.activated_at,
                retired_at: r.retired_at,
                rows: counts.get(&r.id).copied().unwrap_or(0),
                held_here: key.is_some(),
                check_value: r.check_value.clone(),
            }
        })
        .collect();
    for key in held.keys() {
        if !records.iter().any(|r| r.id == key.id) {
            master_keys.push(MasterKeyStatus {
                id: key.id.clone(),
                state: "unregistered".into(),
                created_at: key.created_at,
                activated_at: None,
                retired_at: None,
                rows: counts.get(&key.id).copied().unwrap_or(0),
                held_here: true,
                check_value: Some(key.check_value()),
            });
        }
    }
    let serving_processes =
        registry::live_holders(state.store.pool(), now.plus_secs(-HOLDER_LIVENESS_SECS)).await?;
    Ok(KeysStatus {
        now,
        ca,
        previous_ca,
        retired_cas: rollovers.retired_cas.len(),
        server_tls,
        license_signing_key,
        license_keys,
        license_key_set: state.keys.license_keys.path().display().to_string(),
        master_keys,
        master_key_set: ring.path().display().to_string(),
        serving_processes,
    })
}
