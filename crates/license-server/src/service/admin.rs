//! Administration: clients, install tokens, machines, certificates (seed 004's admin
//! endpoints), admin API tokens and the audit trail. Shared by the admin HTTP API and the
//! `license-server admin` CLI; the caller names the actor. Licenses, forced rotations and
//! secret invalidation are `Admin` methods too, in `licenses` and `secrets`.

use serde::Serialize;
use serde_json::{json, Value};
use sqlx::AnyConnection;

use license_protocol::error::ErrorCode;
use license_protocol::identity::{ClientId, MachineId};

use super::{new_credential, AppState};
use crate::clock::Timestamp;
use crate::store::admin_tokens::{self, AdminTokenRecord, Role};
use crate::store::audit::{self, AuditEvent};
use crate::store::certificates::{self, CertificateRecord, CertificateStats};
use crate::store::clients::{self, ClientRecord};
use crate::store::install_tokens::{self, InstallTokenRecord};
use crate::store::machines::{self, MachineRecord};
use crate::store::{Store, StoreError, WriteTx};

/// Longest client name accepted, in characters (as the OpenAPI document's `maxLength` counts).
pub const MAX_CLIENT_NAME_LEN: usize = 200;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{field}: {message}")]
    InvalidInput {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    Conflict(String),
    /// The Windows agent an installer is built from is missing, unreadable or not a Windows
    /// executable: `field` names where its path was set (`windows_stub`, `--windows-stub`).
    #[error("{field}: cannot build a Windows installer from {path}: {reason}")]
    WindowsStub {
        field: &'static str,
        path: String,
        reason: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AdminError {
    /// Stable code for the JSON error body and the audit trail.
    pub fn code(&self) -> ErrorCode {
        match self {
            AdminError::NotFound { .. } => ErrorCode::NotFound,
            AdminError::InvalidInput { .. } => ErrorCode::InvalidRequest,
            AdminError::Conflict(_) => ErrorCode::Conflict,
            AdminError::WindowsStub { .. } => ErrorCode::WindowsStubMissing,
            AdminError::Store(_) => ErrorCode::InternalError,
        }
    }

    pub(super) fn machine_not_found(id: &str) -> Self {
        AdminError::NotFound {
            what: "machine",
            id: id.to_string(),
        }
    }
}

type Result<T> = std::result::Result<T, AdminError>;

/// An install token just created: the only time its value exists outside the caller's hands.
#[derive(Serialize, utoipa::ToSchema)]
pub struct CreatedInstallToken {
    /// The token. Shown once; only its hash is stored.
    pub token: String,
    #[serde(flatten)]
    pub record: InstallTokenRecord,
    /// The seed's one-liner, with the server pinned: run it as root on the machine.
    pub install_command: String,
}

impl std::fmt::Debug for CreatedInstallToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedInstallToken")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

/// An admin API token just created.
#[derive(Serialize, utoipa::ToSchema)]
pub struct CreatedAdminToken {
    pub token: String,
    #[serde(flatten)]
    pub record: AdminTokenRecord,
}

impl std::fmt::Debug for CreatedAdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedAdminToken")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PurgeReport {
    pub purged: u64,
}

/// One administrator acting on the server.
#[derive(Debug)]
pub struct Admin<'a> {
    pub(super) state: &'a AppState,
    actor: String,
}

pub(super) fn parse_id<T: std::str::FromStr>(field: &'static str, id: &str) -> Result<T> {
    id.parse().map_err(|_| AdminError::InvalidInput {
        field,
        message: format!("{id:?} is not a UUID"),
    })
}

fn check_serial(serial: &str) -> Result<()> {
    if serial.is_empty() || serial.len() > 64 || !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AdminError::InvalidInput {
            field: "serial",
            message: "must be a hexadecimal serial number".into(),
        });
    }
    Ok(())
}

impl<'a> Admin<'a> {
    pub fn new(state: &'a AppState, actor: impl Into<String>) -> Self {
        Self {
            state,
            actor: actor.into(),
        }
    }

    pub(super) fn store(&self) -> &Store {
        &self.state.store
    }

    /// The settings of the server this administrator acts on.
    pub fn settings(&self) -> &super::Settings {
        &self.state.settings
    }

    /// The pin of the server's TLS key, as install commands and installers carry it.
    pub fn server_pin(&self) -> &license_protocol::pin::CertPin {
        &self.state.keys.server_pin
    }

    /// Runs `result` to its end: commits it with its audit row, or rolls it back and audits
    /// the refusal. Either way nothing happens without a trace.
    pub(super) async fn finish<T>(
        &self,
        tx: WriteTx,
        action: &str,
        target: Option<&str>,
        details: Value,
        result: Result<T>,
    ) -> Result<T> {
        super::finish_audited(self.state, &self.actor, tx, action, target, details, result).await
    }

    pub(super) async fn begin(&self) -> Result<WriteTx> {
        Ok(self.store().begin_write().await?)
    }

    // --- clients ---------------------------------------------------------------------------

    pub async fn create_client(&self, name: &str) -> Result<ClientRecord> {
        let mut tx = self.begin().await?;
        let result = create_client(&mut tx, name).await;
        self.finish(tx, "client.create", None, json!({"name": name}), result)
            .await
    }

    pub async fn list_clients(&self) -> Result<Vec<ClientRecord>> {
        Ok(clients::list(self.store().pool()).await?)
    }

    // --- install tokens ----------------------------------------------------------------------

    pub async fn create_install_token(
        &self,
        client_id: &str,
        ttl_secs: Option<u64>,
        machine_id: Option<&str>,
    ) -> Result<CreatedInstallToken> {
        let ttl = ttl_secs.unwrap_or(self.state.settings.install_token_ttl_secs);
        let mut tx = self.begin().await?;
        let result = self
            .create_install_token_in(&mut tx, client_id, ttl, machine_id)
            .await;
        let target = result.as_ref().ok().map(|t| t.record.id.clone());
        self.finish(
            tx,
            "install_token.create",
            target.as_deref(),
            json!({"client_id": client_id, "ttl_secs": ttl, "machine_id": machine_id}),
            result,
        )
        .await
    }

    pub(super) async fn create_install_token_in(
        &self,
        conn: &mut AnyConnection,
        client_id: &str,
        ttl: u64,
        machine_id: Option<&str>,
    ) -> Result<CreatedInstallToken> {
        let _: ClientId = parse_id("client_id", client_id)?;
        if !(60..=30 * 86_400).contains(&ttl) {
            return Err(AdminError::InvalidInput {
                field: "ttl",
                message: "must be between 1 minute and 30 days".into(),
            });
        }
        // Read on the transaction's own connection: a second one from the pool while the
        // transaction holds one deadlocks once every connection is held by such a writer.
        if clients::get(&mut *conn, client_id).await?.is_none() {
            return Err(AdminError::NotFound {
                what: "client",
                id: client_id.to_string(),
            });
        }
        if let Some(machine_id) = machine_id {
            let _: MachineId = parse_id("machine_id", machine_id)?;
            match machines::get(&mut *conn, machine_id).await? {
                None => {
                    return Err(AdminError::NotFound {
                        what: "machine",
                        id: machine_id.to_string(),
                    })
                }
                Some(machine) if machine.client_id != client_id => {
                    return Err(AdminError::InvalidInput {
                        field: "machine_id",
                        message: format!("machine {machine_id} belongs to another client"),
                    })
                }
                Some(_) => {}
            }
        }
        let (token, hash) = new_credential("lit_");
        let now = Timestamp::now();
        let id = uuid::Uuid::new_v4().to_string();
        let ttl = i64::try_from(ttl).unwrap_or(i64::MAX);
        let expires_at = now.plus_secs(ttl);
        let record =
            install_tokens::create(conn, &id, &hash, client_id, machine_id, now, expires_at)
                .await?;
        let keys = &self.state.keys;
        let install_command = format!(
            "curl -fsSL -k --pinnedpubkey '{}' {}/install.sh | sudo bash -s -- {}",
            keys.server_pin.curl_form(),
            self.state.settings.public_url,
            token.as_str()
        );
        Ok(CreatedInstallToken {
            token: token.to_string(),
            record,
            install_command,
        })
    }

    pub async fn list_install_tokens(
        &self,
        client_id: Option<&str>,
    ) -> Result<Vec<InstallTokenRecord>> {
        Ok(install_tokens::list(self.store().pool(), client_id).await?)
    }

    // --- machines ----------------------------------------------------------------------------

    pub async fn list_machines(&self, client_id: Option<&str>) -> Result<Vec<MachineRecord>> {
        Ok(machines::list(self.store().pool(), client_id).await?)
    }

    pub async fn get_machine(&self, id: &str) -> Result<MachineRecord> {
        let _: MachineId = parse_id("machine_id", id)?;
        machines::get(self.store().pool(), id)
            .await?
            .ok_or_else(|| AdminError::machine_not_found(id))
    }

    /// Blocks one machine: its requests are refused from the next one on, on every replica.
    pub async fn revoke_machine(&self, id: &str) -> Result<MachineRecord> {
        self.set_machine_revoked(id, Some(Timestamp::now()), "machine.revoke")
            .await
    }

    pub async fn restore_machine(&self, id: &str) -> Result<MachineRecord> {
        self.set_machine_revoked(id, None, "machine.restore").await
    }

    async fn set_machine_revoked(
        &self,
        id: &str,
        at: Option<Timestamp>,
        action: &str,
    ) -> Result<MachineRecord> {
        let mut tx = self.begin().await?;
        let result = async {
            let _: MachineId = parse_id("machine_id", id)?;
            let found = machines::set_revoked(&mut tx, id, at).await?;
            found
                .then_some(())
                .ok_or_else(|| AdminError::machine_not_found(id))
        }
        .await;
        self.finish(tx, action, Some(id), json!({}), result).await?;
        self.get_machine(id).await
    }

    pub async fn delete_machine(&self, id: &str) -> Result<()> {
        let mut tx = self.begin().await?;
        let result = async {
            let _: MachineId = parse_id("machine_id", id)?;
            let found = machines::delete(&mut tx, id).await?;
            found
                .then_some(())
                .ok_or_else(|| AdminError::machine_not_found(id))
        }
        .await;
        self.finish(tx, "machine.delete", Some(id), json!({}), result)
            .await
    }

    // --- certificates ------------------------------------------------------------------------

    pub async fn certificate_stats(&self) -> Result<CertificateStats> {
        Ok(certificates::stats(self.store().pool(), Timestamp::now()).await?)
    }

    pub async fn list_certificates(
        &self,
        machine_id: Option<&str>,
        client_id: Option<&str>,
    ) -> Result<Vec<CertificateRecord>> {
        let now = Timestamp::now();
        Ok(certificates::list(self.store().pool(), machine_id, client_id, now).await?)
    }

    pub async fn revoke_certificate(&self, serial: &str) -> Result<CertificateRecord> {
        let serial = serial.to_ascii_lowercase();
        let mut tx = self.begin().await?;
        let result = async {
            check_serial(&serial)?;
            if certificates::revoke(&mut tx, &serial, Timestamp::now()).await? {
                let revoked = certificates::get(&mut *tx, &serial, Timestamp::now()).await?;
                Ok(revoked.map(|c| c.machine_id))
            } else {
                Err(self.why_not(&serial, "active").await)
            }
        }
        .await;
        // The machine in the details: its agent hears of the revocation (`changes`).
        let details = json!({"machine_id": result.as_ref().ok()});
        self.finish(tx, "certificate.revoke", Some(&serial), details, result)
            .await?;
        self.certificate(&serial).await
    }

    pub async fn restore_certificate(&self, serial: &str) -> Result<CertificateRecord> {
        let serial = serial.to_ascii_lowercase();
        let mut tx = self.begin().await?;
        let result = async {
            check_serial(&serial)?;
            match certificates::restore(&mut tx, &serial).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(self.why_not(&serial, "revoked").await),
                Err(StoreError::Conflict(_)) => Err(AdminError::Conflict(format!(
                    "certificate {serial} cannot be restored: its machine has another active certificate"
                ))),
                Err(e) => Err(e.into()),
            }
        }
        .await;
        self.finish(tx, "certificate.restore", Some(&serial), json!({}), result)
            .await?;
        self.certificate(&serial).await
    }

    pub async fn purge_certificates(&self) -> Result<PurgeReport> {
        let mut tx = self.begin().await?;
        let result = certificates::purge(&mut tx, Timestamp::now())
            .await
            .map(|purged| PurgeReport { purged })
            .map_err(AdminError::from);
        let details = json!({"purged": result.as_ref().map(|r| r.purged).unwrap_or(0)});
        self.finish(tx, "certificate.purge", None, details, result)
            .await
    }

    async fn certificate(&self, serial: &str) -> Result<CertificateRecord> {
        certificates::get(self.store().pool(), serial, Timestamp::now())
            .await?
            .ok_or_else(|| AdminError::NotFound {
                what: "certificate",
                id: serial.to_string(),
            })
    }

    async fn why_not(&self, serial: &str, wanted: &str) -> AdminError {
        match self.certificate(serial).await {
            Ok(c) => AdminError::Conflict(format!(
                "certificate {serial} is {}, not {wanted}",
                c.effective_state
            )),
            Err(e) => e,
        }
    }

    // --- admin tokens and audit --------------------------------------------------------------

    pub async fn create_admin_token(&self, name: &str, role: Role) -> Result<CreatedAdminToken> {
        let mut tx = self.begin().await?;
        let result = async {
            check_name("name", name)?;
            let (token, hash) = new_credential("lat_");
            let id = uuid::Uuid::new_v4().to_string();
            let record = admin_tokens::create(&mut tx, &id, &hash, name, role, Timestamp::now())
                .await
                .map_err(|e| match e {
                    StoreError::Conflict(_) => {
                        AdminError::Conflict("token collision; retry".into())
                    }
                    e => e.into(),
                })?;
            Ok(CreatedAdminToken {
                token: token.to_string(),
                record,
            })
        }
        .await;
        self.finish(
            tx,
            "admin_token.create",
            None,
            json!({"name": name, "role": role.as_str()}),
            result,
        )
        .await
    }

    pub async fn audit_events(&self, since_seq: i64, limit: i64) -> Result<Vec<AuditEvent>> {
        let limit = limit.clamp(1, 10_000);
        Ok(audit::list(self.store().pool(), since_seq, limit).await?)
    }
}

fn check_name(field: &'static str, name: &str) -> Result<()> {
    if name.trim().is_empty() {
        return Err(AdminError::InvalidInput {
            field,
            message: "must not be empty".into(),
        });
    }
    if name.chars().count() > MAX_CLIENT_NAME_LEN {
        return Err(AdminError::InvalidInput {
            field,
            message: format!("must be at most {MAX_CLIENT_NAME_LEN} characters"),
        });
    }
    if name.chars().any(char::is_control) {
        return Err(AdminError::InvalidInput {
            field,
            message: "must not contain control characters".into(),
        });
    }
    Ok(())
}

async fn create_client(conn: &mut AnyConnection, name: &str) -> Result<ClientRecord> {
    check_name("name", name)?;
    clients::create(
        conn,
        &ClientId::new_random().to_string(),
        name,
        Timestamp::now(),
    )
    .await
    .map_err(|e| match e {
        StoreError::Conflict(_) => {
            AdminError::Conflict(format!("a client named {name:?} already exists"))
        }
        e => e.into(),
    })
}

impl super::Refusal for AdminError {
    fn code(&self) -> ErrorCode {
        AdminError::code(self)
    }
}
