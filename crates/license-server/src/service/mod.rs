//! What the server does, independent of how it is asked: enrollment and recovery (public listener),
//! certificate renewal, secret rotation and license validation (agent listener), and
//! administration (admin API and CLI), licenses included, Windows installers
//! (`windows_installer`), agent releases (`releases`), and the server's keys (`keys`: which
//! master key seals secrets, its online rollover, `keys status`). Enrollment, renewal and recovery
//! issue certificates through one function, `certificates::issue`.
//!
//! Every mutation commits in the same transaction as its audit row, so an action that cannot
//! be audited does not happen; refused actions are audited too.

pub mod admin;
pub mod certificates;
pub mod changes;
pub mod enroll;
pub mod fleet_alerts;
pub mod keys;
pub mod licenses;
pub mod reads;
pub mod recover;
pub mod releases;
pub mod secrets;
pub mod server_certificate;
pub mod windows_installer;

use std::path::PathBuf;
use std::sync::Arc;

use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

use crate::clock::Timestamp;
use crate::datadir::{DataDir, ServerKeys};
use crate::store::audit::{self, NewAuditEvent};
use crate::store::{Store, StoreError, WriteTx};

/// An error of an audited administrative action: the code its refusal is audited with.
pub trait Refusal: From<StoreError> {
    fn code(&self) -> license_protocol::error::ErrorCode;
}

/// Runs an administrative action to its end: commits `result` in `tx` with its audit row (by
/// `actor`), or rolls `tx` back and audits the refusal outside it. Either way nothing happens
/// without a trace. A commit is noted in the change feed at once (`reads`).
pub(crate) async fn finish_audited<T, E: Refusal>(
    state: &AppState,
    actor: &str,
    mut tx: WriteTx,
    action: &str,
    target: Option<&str>,
    details: serde_json::Value,
    result: Result<T, E>,
) -> Result<T, E> {
    match result {
        Ok(value) => {
            let concerns = changes::concerns_of(actor, action, target, &details);
            let event = NewAuditEvent::success(Timestamp::now(), actor, action, target, details);
            audit::insert(&mut *tx, &event).await?;
            tx.commit().await?;
            state.changes.note_write(&concerns);
            Ok(value)
        }
        Err(e) => {
            tx.rollback().await?;
            let event = NewAuditEvent::refused(actor, action, target, details, e.code().as_str());
            audit::insert(state.store.pool(), &event).await?;
            Err(e)
        }
    }
}

/// Shared state of a running server (or of one `admin` CLI invocation).
#[derive(Debug)]
pub struct AppState {
    pub store: Store,
    pub keys: ServerKeys,
    pub settings: Settings,
    /// The signed release key set offers carry, kept between polls (`releases`).
    pub release_keys: releases::ReleaseKeysCache,
    /// What agents must hear of at once (`changes`; followed while serving).
    pub changes: Arc<changes::ChangeFeed>,
    /// The read replica, if any, and where each machine's reads go (`reads`).
    pub reads: reads::Reads,
}

pub type SharedState = Arc<AppState>;

/// Values derived from the configuration and the bound listeners.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Public listener URL as machines see it.
    pub public_url: String,
    /// Agent listener URL as machines see it.
    pub agent_url: String,
    /// Lifetime of a new machine certificate, seconds (`certificate_validity_secs`, or
    /// `certificate_validity_days` in seconds).
    pub certificate_validity_secs: i64,
    /// `certificate_renew_after_expiry_days`, as configured (named in refusals).
    pub certificate_renew_after_expiry_days: u32,
    /// Lifetime of a renewed server TLS certificate, days.
    pub server_certificate_validity_days: u32,
    /// How often the running server checks whether its TLS certificate is due, seconds.
    pub server_certificate_check_interval_secs: u64,
    /// The data directory the server's TLS certificate is renewed in.
    pub data_dir: DataDir,
    pub install_token_ttl_secs: u64,
    pub bootstrap_rate_per_minute: u32,
    /// Connections per IPv4 address or IPv6 /64 and listener (0: no cap).
    pub max_connections_per_address: u32,
    /// Seconds a write may make no progress before its connection is closed.
    pub write_stall_timeout_secs: u64,
    pub downloads_dir: PathBuf,
    /// `valid_until - valid_from` of a new secret version, seconds.
    pub secret_validity_secs: i64,
    /// `grace_until - valid_until` of a new secret version, seconds.
    pub secret_grace_secs: i64,
    /// What the fleet is watched for, and where alerts go.
    pub fleet_alerts: fleet_alerts::FleetAlertSettings,
    /// Dashboard session lifetime, idle timeout and bound (`dashboard_session_*`).
    pub dashboard_sessions: crate::http::dashboard::session::SessionPolicy,
    /// Dashboard sign-in attempts per client IP and minute.
    pub dashboard_sign_in_per_minute: u32,
    /// The Windows agent (`license-agent.exe`) that Windows installers are built from
    /// (`windows_stub`, resolved against the data directory).
    pub windows_stub: PathBuf,
    /// The watch streams (`watch_*`).
    pub watch: WatchSettings,
    /// When agent requests are shed (`agent_max_inflight`, `agent_retry_after_secs`).
    pub shedding: Shedding,
    /// Connections the agent listener serves at once (`agent_max_connections`).
    pub agent_max_connections: usize,
}

/// The watch streams agents hold (`GET /api/v1/watch`).
#[derive(Debug, Clone, Copy)]
pub struct WatchSettings {
    pub heartbeat_secs: u64,
    pub max_secs: u64,
    pub spread_secs: u32,
    pub feed_interval_ms: u64,
}

/// Agent requests beyond `max_inflight` at once are answered 503 with a `Retry-After`
/// between half of `retry_after_secs` and all of it.
#[derive(Debug, Clone, Copy)]
pub struct Shedding {
    pub max_inflight: usize,
    pub retry_after_secs: u64,
}

impl Settings {
    /// How long after its expiry a machine certificate may still renew itself, seconds (0: not
    /// at all).
    pub fn renew_after_expiry_secs(&self) -> i64 {
        i64::from(self.certificate_renew_after_expiry_days) * 86_400
    }
}

/// A new random credential with a readable prefix (so leaked ones are easy to grep for) and
/// its SHA-256, the only form stored.
pub fn new_credential(prefix: &str) -> (zeroize::Zeroizing<String>, String) {
    use base64::Engine as _;
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(bytes.as_mut());
    let token = zeroize::Zeroizing::new(format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes.as_ref())
    ));
    let hash = credential_hash(&token);
    (token, hash)
}

/// SHA-256 hex of a credential: tokens have 256 bits of entropy, so a plain hash suffices.
pub fn credential_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}
