//! The server's own TLS certificate renews itself, so that it never expires unattended
//! (DESIGN.md §4b).
//!
//! Same key, hence the same SPKI pin agents hold; same names; a fresh lifetime of
//! `server_certificate_validity_days`, once 2/3 of the current certificate's own lifetime has
//! passed (or it has expired). `serve` checks at start and every
//! `server_certificate_check_interval_secs`; the new certificate is written atomically to the
//! data directory, audited as `server.certificate_renew` in the same transaction, and served
//! to new connections (`http::tls::ServerCertResolver`) while existing ones carry on. Every
//! replica renews the certificate of its own data directory; replicas sharing one directory
//! adopt the certificate another has just written instead of issuing one more.

use serde_json::json;
use time::Duration;

use super::AppState;
use crate::clock::Timestamp;
use crate::datadir::{pem_first_der, DataDirError};
use crate::pki::{self, IssuedCertificate, PkiError};
use crate::store::audit::{self, NewAuditEvent};
use crate::store::StoreError;

/// The audit action of a renewal.
pub const AUDIT_ACTION: &str = "server.certificate_renew";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerCertError {
    #[error("server certificate: {0}")]
    Pki(#[from] PkiError),
    #[error("server certificate: {0}")]
    DataDir(#[from] DataDirError),
    #[error("server certificate renewal could not be audited: {0}")]
    Store(#[from] StoreError),
}

/// What a check of the served certificate did.
#[derive(Debug)]
pub enum Renewal {
    /// Not due yet.
    NotDue,
    /// Due, but `server.pem` already holds a certificate for the same key that is not due
    /// (another process on the same data directory renewed it): serve that one (PEM).
    Adopted(String),
    /// Renewed: written to the data directory and audited.
    Renewed(IssuedCertificate),
}

/// The certificate in `pem` when it is for the same key as `der` and not due at `now`.
fn fresh_for_same_key(pem: &str, der: &[u8], now: Timestamp) -> Option<()> {
    let other = pem_first_der(pem)?;
    let same_key =
        pki::public_key_raw_of_der(&other).ok()? == pki::public_key_raw_of_der(der).ok()?;
    (same_key && now < pki::validity_of(&other).ok()?.renew_at()).then_some(())
}

/// Renews the server certificate `current_pem` when it is due at `now`.
pub async fn renew_if_due(
    state: &AppState,
    current_pem: &str,
    now: Timestamp,
) -> Result<Renewal, ServerCertError> {
    let der = pem_first_der(current_pem)
        .ok_or_else(|| PkiError::BadCertificate("server.pem holds no certificate".into()))?;
    let validity = pki::validity_of(&der)?;
    if now < validity.renew_at() {
        return Ok(Renewal::NotDue);
    }
    if let Ok(on_disk) = std::fs::read_to_string(state.settings.data_dir.server_cert()) {
        if fresh_for_same_key(&on_disk, &der, now).is_some() {
            return Ok(Renewal::Adopted(on_disk));
        }
    }
    let days = state.settings.server_certificate_validity_days;
    let mut issued = state.keys.ca.renew_server_certificate(
        &der,
        &state.keys.server_key_pem,
        Duration::days(days.into()),
    )?;
    // During a CA rollover the cross-certificate follows the leaf (`server_trust`).
    issued.pem =
        crate::server_trust::with_cross(&issued.pem, state.keys.trust.cross_certificate.as_deref());
    let details = json!({
        "old_serial": pki::serial_of(&der)?,
        "old_not_after": validity.not_after.rfc3339(),
        "expired": now >= validity.not_after,
        "serial": issued.serial,
        "not_after": issued.expires_at.rfc3339(),
        "validity_days": days,
        "server_pin": state.keys.server_pin.to_string(),
        "data_dir": state.settings.data_dir.root().display().to_string(),
    });
    let mut tx = state.store.begin_write().await?;
    let event = NewAuditEvent::success(now, "server", AUDIT_ACTION, None, details);
    audit::insert(&mut *tx, &event).await?;
    // The file is replaced before the commit: an audited renewal is one that happened, and a
    // renewal whose audit cannot commit is repeated at the next check.
    state.settings.data_dir.replace_server_cert(&issued.pem)?;
    tx.commit().await?;
    Ok(Renewal::Renewed(issued))
}
