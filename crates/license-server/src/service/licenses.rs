//! Licenses: issued by an administrator for one machine, delivered to the machine as tokens
//! (`license_protocol::token`, format v2 — v1 while the server has only ever had one license key,
//! see `LicenseKeys::seal_token`: signed by the current license key, encrypted under the
//! machine's newest acknowledged secret), revoked by an administrator, and validated online
//! for a machine (`POST /api/v1/validate-license`, seed §2.4).
//!
//! Tokens are not stored: they are sealed on demand under the current secret version, so after
//! every rotation the machine fetches the same licenses re-issued under its new version.

use std::collections::BTreeMap;

use license_protocol::agent_api::{LicenseToken, MachineLicenses, ValidateLicenseResponse};
use license_protocol::identity::{ClientId, MachineId, MachineIdentity};
use license_protocol::secret::Secret;
use license_protocol::token::LicenseClaims;
use license_protocol::verdict::{self, SecretStanding, Verified};
use serde::Serialize;
use serde_json::json;

use super::admin::{parse_id, Admin, AdminError};
use super::secrets::{current_secret, open_at_rest};
use super::AppState;
use crate::clock::Timestamp;
use crate::store::licenses::{LicenseRecord, NewLicense};
use crate::store::secrets::{SealedSecretRow, SecretState};
use crate::store::{self, StoreError};

/// Most features one license may grant.
pub const MAX_FEATURES: usize = 64;
/// Most metadata entries one license may carry.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Longest feature name or metadata key (ASCII, so bytes and characters alike).
pub const MAX_NAME_LEN: usize = 64;
/// Longest metadata value, in characters (as the OpenAPI document's `maxLength` counts).
pub const MAX_METADATA_VALUE_LEN: usize = 1024;

/// What an administrator asks for when issuing a license.
#[derive(Debug, Clone)]
pub struct LicenseRequest {
    pub machine_id: String,
    pub features: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    /// Default: now.
    pub not_before: Option<Timestamp>,
    /// `None`: does not expire.
    pub expires_at: Option<Timestamp>,
}

/// A license just issued, with its token when the machine already holds a secret.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IssuedLicense {
    #[serde(flatten)]
    pub license: LicenseRecord,
    /// The token under the machine's current secret version; `null` until the machine's
    /// first acknowledged rotation (it fetches its tokens itself then).
    pub token: Option<LicenseToken>,
}

fn invalid(field: &'static str, message: impl Into<String>) -> AdminError {
    AdminError::InvalidInput {
        field,
        message: message.into(),
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

fn check_request(req: &LicenseRequest, now: Timestamp) -> Result<(), AdminError> {
    if req.features.is_empty() || req.features.len() > MAX_FEATURES {
        return Err(invalid(
            "features",
            format!("give between 1 and {MAX_FEATURES} features"),
        ));
    }
    for (i, f) in req.features.iter().enumerate() {
        if !is_name(f) {
            return Err(invalid(
                "features",
                format!("{f:?} must be 1-{MAX_NAME_LEN} characters from [A-Za-z0-9._:-]"),
            ));
        }
        if req.features[..i].contains(f) {
            return Err(invalid("features", format!("{f:?} is listed twice")));
        }
    }
    if req.metadata.len() > MAX_METADATA_ENTRIES {
        return Err(invalid(
            "metadata",
            format!("at most {MAX_METADATA_ENTRIES} entries"),
        ));
    }
    for (k, v) in &req.metadata {
        if !is_name(k) {
            return Err(invalid(
                "metadata",
                format!("key {k:?} must be 1-{MAX_NAME_LEN} characters from [A-Za-z0-9._:-]"),
            ));
        }
        if v.chars().count() > MAX_METADATA_VALUE_LEN || v.chars().any(char::is_control) {
            return Err(invalid(
                "metadata",
                format!("value of {k:?} must be at most {MAX_METADATA_VALUE_LEN} characters without control characters"),
            ));
        }
    }
    if let Some(expires_at) = req.expires_at {
        if expires_at <= now {
            return Err(invalid("expires_at", "is in the past"));
        }
        if expires_at <= req.not_before.unwrap_or(now) {
            return Err(invalid("expires_at", "must be after not_before"));
        }
    }
    Ok(())
}

/// The signed claims of a stored license.
pub fn claims_of(license: &LicenseRecord) -> Result<LicenseClaims, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("license {}: {what}", license.id));
    Ok(LicenseClaims {
        license_id: license.id.parse().map_err(|_| corrupt("id"))?,
        client_id: license
            .client_id
            .parse::<ClientId>()
            .map_err(|_| corrupt("client_id"))?,
        machine_id: license
            .machine_id
            .parse::<MachineId>()
            .map_err(|_| corrupt("machine_id"))?,
        features: license.features.clone(),
        metadata: license.metadata.clone(),
        issued_at: license.issued_at.0,
        not_before: license.not_before.0,
        expires_at: license.expires_at.map(|t| t.0),
    })
}

/// A token for `license` under `secret` of `version`.
pub fn seal_token(
    state: &AppState,
    license: &LicenseRecord,
    version: u64,
    secret: &Secret,
) -> Result<LicenseToken, StoreError> {
    let claims = claims_of(license)?;
    Ok(LicenseToken {
        license_id: claims.license_id,
        secret_version: version,
        token: state
            .keys
            .license_keys
            .snapshot()
            .keys
            .seal_token(&claims, secret, version),
        expires_at: claims.expires_at,
    })
}

/// The token of one license under its machine's current secret, or why the machine has none
/// (one sentence for the administrator).
async fn current_token(
    state: &AppState,
    license: &LicenseRecord,
) -> Result<Result<LicenseToken, String>, StoreError> {
    let now = Timestamp::now();
    let machine: MachineId = license
        .machine_id
        .parse()
        .map_err(|_| StoreError::Corrupt(format!("license {}: machine_id", license.id)))?;
    let rows = store::secrets::of_machine(state.store.pool(), &license.machine_id, now).await?;
    match current_secret(state, &machine, &rows, now)? {
        Some((version, secret)) => Ok(Ok(seal_token(state, license, version, &secret)?)),
        None => Ok(Err(no_secret_reason(&license.machine_id, &rows))),
    }
}

/// Why a machine holds no secret a token can be sealed under, from its secret versions
/// (none is usable).
fn no_secret_reason(machine_id: &str, rows: &[SealedSecretRow]) -> String {
    let newest_acknowledged = rows.iter().rev().find(|r| {
        r.record.acked_at.is_some()
            || matches!(r.record.state, SecretState::Active | SecretState::Grace)
    });
    match newest_acknowledged {
        None => format!(
            "machine {machine_id} holds no acknowledged secret yet: no token can be issued before its first rotation"
        ),
        Some(r) if r.record.state == SecretState::Invalidated => format!(
            "machine {machine_id}'s secret version {} was invalidated{}; it gets a new one at its next rotation",
            r.record.version,
            r.record
                .invalidated_at
                .map(|at| format!(" on {at}"))
                .unwrap_or_default()
        ),
        Some(r) => format!(
            "machine {machine_id}'s secrets expired on {} (version {}, end of its grace); it gets a new one at its next rotation",
            r.record.grace_until, r.record.version
        ),
    }
}

/// `GET /api/v1/licenses`: tokens of every current (not revoked, not expired) license of the
/// machine under its newest acknowledged secret, and the ids of its revoked licenses; read on
/// `pool` (the primary or the read replica, see `service::reads`).
pub async fn machine_licenses(
    state: &AppState,
    pool: &sqlx::AnyPool,
    identity: &MachineIdentity,
) -> Result<MachineLicenses, StoreError> {
    let machine_id = identity.machine_id.to_string();
    let now = Timestamp::now();
    let rows = store::secrets::of_machine(pool, &machine_id, now).await?;
    let licenses = store::licenses::list(pool, Some(&machine_id), now).await?;
    let revoked = licenses
        .iter()
        .filter(|l| l.revoked_at.is_some())
        .map(|l| {
            l.id.parse()
                .map_err(|_| StoreError::Corrupt(format!("license {}: id", l.id)))
        })
        .collect::<Result<Vec<uuid::Uuid>, _>>()?;
    let Some((version, secret)) = current_secret(state, &identity.machine_id, &rows, now)? else {
        return Ok(MachineLicenses {
            secret_version: None,
            tokens: Vec::new(),
            revoked,
        });
    };
    let tokens = licenses
        .iter()
        .filter(|l| l.is_current())
        .map(|l| seal_token(state, l, version, &secret))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(MachineLicenses {
        secret_version: Some(version),
        tokens,
        revoked,
    })
}

/// What the server knows of one of the machine's secret versions, for the verdict.
fn standing(
    state: &AppState,
    machine: &MachineId,
    rows: &[SealedSecretRow],
    version: u64,
    now: Timestamp,
) -> Result<SecretStanding, StoreError> {
    let Some(row) = rows.iter().find(|r| r.record.version == version) else {
        return Ok(SecretStanding::Unknown);
    };
    let invalidated = row.record.state == SecretState::Invalidated;
    // Destroyed at the end of its grace (an invalidated one too): the token cannot be opened.
    if row.record.destroyed {
        return Ok(SecretStanding::Gone(if invalidated {
            verdict::SecretState::Invalidated
        } else {
            verdict::SecretState::PastGrace
        }));
    }
    // No token is issued under a pending version; one that claims so is not ours to honour.
    if row.record.state == SecretState::Pending {
        return Ok(SecretStanding::Unknown);
    }
    Ok(SecretStanding::Held(
        open_at_rest(state, machine, row)?,
        verdict::SecretState::of(invalidated, row.record.grace_until.0, now.0),
    ))
}

/// `POST /api/v1/validate-license`: the server's own verdict on a token presented by the
/// machine it was issued for — the same verdict as the agent's (`license_protocol::verdict`),
/// from what the database holds: the machine's secret versions and its licenses (a license
/// deleted with its machine is as good as revoked); read on `pool` (the primary or the read
/// replica, see `service::reads`).
pub async fn validate(
    state: &AppState,
    pool: &sqlx::AnyPool,
    identity: &MachineIdentity,
    token_b64: &str,
) -> Result<ValidateLicenseResponse, StoreError> {
    let machine = identity.machine_id;
    let machine_id = machine.to_string();
    let now = Timestamp::now();
    let rows = store::secrets::of_machine(pool, &machine_id, now).await?;
    let licenses = store::licenses::list(pool, Some(&machine_id), now).await?;
    let mut failure = None;
    let license_keys = state.keys.license_keys.snapshot();
    let outcome = verdict::verdict(
        token_b64,
        &machine,
        &license_keys.trusted,
        now.0,
        |version| {
            standing(state, &machine, &rows, version, now).unwrap_or_else(|e| {
                failure = Some(e);
                SecretStanding::Unknown
            })
        },
        |id| {
            let id = id.to_string();
            licenses
                .iter()
                .find(|l| l.id == id)
                .is_none_or(|l| l.revoked_at.is_some())
        },
    );
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(match outcome {
        Ok(Verified { claims, .. }) => ValidateLicenseResponse {
            valid: true,
            reason: None,
            license_id: Some(claims.license_id),
            features: claims.features,
            expires_at: claims.expires_at,
        },
        Err(refusal) => ValidateLicenseResponse {
            valid: false,
            reason: Some(refusal.reason),
            license_id: refusal.license_id,
            features: Vec::new(),
            expires_at: None,
        },
    })
}

// ---------------------------------------------------------------------------------------------
// Administration
// ---------------------------------------------------------------------------------------------

impl Admin<'_> {
    pub async fn issue_license(&self, req: &LicenseRequest) -> Result<IssuedLicense, AdminError> {
        let now = Timestamp::now();
        let id = uuid::Uuid::new_v4().to_string();
        let mut tx = self.begin().await?;
        let result = async {
            let _: MachineId = parse_id("machine_id", &req.machine_id)?;
            check_request(req, now)?;
            let machine = self.get_machine(&req.machine_id).await?;
            if machine.revoked_at.is_some() {
                return Err(AdminError::Conflict(format!(
                    "machine {} is revoked; restore it before issuing it a license",
                    machine.id
                )));
            }
            store::licenses::insert(
                &mut tx,
                &NewLicense {
                    id: &id,
                    client_id: &machine.client_id,
                    machine_id: &machine.id,
                    features: &req.features,
                    metadata: &req.metadata,
                    issued_at: now,
                    not_before: req.not_before.unwrap_or(now),
                    expires_at: req.expires_at,
                },
            )
            .await?;
            Ok(())
        }
        .await;
        let target = result.is_ok().then_some(id.as_str());
        let details = json!({
            "machine_id": req.machine_id, "features": req.features, "metadata": req.metadata,
            "not_before": req.not_before.map(|t| t.0), "expires_at": req.expires_at.map(|t| t.0),
        });
        self.finish(tx, "license.issue", target, details, result)
            .await?;
        let license = self.get_license(&id).await?;
        let token = current_token(self.state, &license).await?.ok();
        Ok(IssuedLicense { license, token })
    }

    pub async fn list_licenses(
        &self,
        machine_id: Option<&str>,
    ) -> Result<Vec<LicenseRecord>, AdminError> {
        Ok(store::licenses::list(self.store().pool(), machine_id, Timestamp::now()).await?)
    }

    pub async fn get_license(&self, id: &str) -> Result<LicenseRecord, AdminError> {
        let _: uuid::Uuid = parse_id("license_id", id)?;
        store::licenses::get(self.store().pool(), id, Timestamp::now())
            .await?
            .ok_or_else(|| AdminError::NotFound {
                what: "license",
                id: id.to_string(),
            })
    }

    /// Revokes a license: the machine sees it in its next license fetch, and online
    /// validation answers `revoked` from now on.
    pub async fn revoke_license(&self, id: &str) -> Result<LicenseRecord, AdminError> {
        let mut tx = self.begin().await?;
        let result = async {
            let license = self.get_license(id).await?;
            if !store::licenses::revoke(&mut tx, id, Timestamp::now()).await? {
                return Err(AdminError::Conflict(format!(
                    "license {id} is already revoked"
                )));
            }
            Ok(license.machine_id)
        }
        .await;
        let details = json!({"machine_id": result.as_ref().ok()});
        self.finish(tx, "license.revoke", Some(id), details, result)
            .await?;
        self.get_license(id).await
    }

    /// The license's token under its machine's current secret version.
    pub async fn license_token(&self, id: &str) -> Result<LicenseToken, AdminError> {
        let license = self.get_license(id).await?;
        if license.revoked_at.is_some() {
            return Err(AdminError::Conflict(format!("license {id} is revoked")));
        }
        current_token(self.state, &license)
            .await?
            .map_err(AdminError::Conflict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret_row(version: u64, state: SecretState, acked: bool) -> SealedSecretRow {
        SealedSecretRow {
            record: store::secrets::SecretRecord {
                machine_id: "m".into(),
                version,
                state,
                effective_state: "expired".into(),
                valid_from: Timestamp(0),
                valid_until: Timestamp(86_400),
                grace_until: Timestamp(2 * 86_400),
                created_at: Timestamp(0),
                acked_at: acked.then_some(Timestamp(10)),
                invalidated_at: (state == SecretState::Invalidated).then_some(Timestamp(20)),
                destroyed: true,
            },
            secret_enc: Vec::new(),
        }
    }

    #[test]
    fn no_secret_reason_says_what_happened() {
        let never = no_secret_reason("m", &[secret_row(1, SecretState::Pending, false)]);
        assert!(never.contains("no acknowledged secret yet"), "{never}");
        let expired = no_secret_reason(
            "m",
            &[
                secret_row(1, SecretState::Grace, true),
                secret_row(2, SecretState::Pending, false),
            ],
        );
        assert!(
            expired.contains("secrets expired on 1970-01-03T00:00:00Z")
                && expired.contains("next rotation"),
            "{expired}"
        );
        let invalidated = no_secret_reason("m", &[secret_row(3, SecretState::Invalidated, true)]);
        assert!(
            invalidated.contains("version 3 was invalidated on 1970-01-01T00:00:20Z"),
            "{invalidated}"
        );
    }

    fn request() -> LicenseRequest {
        LicenseRequest {
            machine_id: MachineId::new_random().to_string(),
            features: vec!["pos.sale".into(), "pos.refund".into()],
            metadata: BTreeMap::from([("tier".into(), "gold".into())]),
            not_before: None,
            expires_at: None,
        }
    }

    #[test]
    fn license_requests_are_checked() {
        let now = Timestamp(1_000);
        assert!(check_request(&request(), now).is_ok());
        let field = |r: &LicenseRequest| match check_request(r, now) {
            Err(AdminError::InvalidInput { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let mut r = request();
        r.features.clear();
        assert_eq!(field(&r), "features");
        let mut r = request();
        r.features.push("pos.sale".into());
        assert_eq!(field(&r), "features");
        let mut r = request();
        r.features.push("has space".into());
        assert_eq!(field(&r), "features");
        let mut r = request();
        r.metadata.insert("k".into(), "line\nbreak".into());
        assert_eq!(field(&r), "metadata");
        let mut r = request();
        r.expires_at = Some(Timestamp(999));
        assert_eq!(field(&r), "expires_at");
        let mut r = request();
        r.not_before = Some(Timestamp(5_000));
        r.expires_at = Some(Timestamp(4_000));
        assert_eq!(field(&r), "expires_at");
    }
}
